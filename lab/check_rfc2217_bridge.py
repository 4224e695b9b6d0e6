"""Checks memfw_lab.py's RFC 2217 bridge (what a labgrid-exported
USBSerialPort is: ser2net in telnet mode) carries every byte value both
ways unchanged: an RFC 2217 server (pyserial's PortManager) in front of a
loopback serial port echoes 1 KiB of all byte values, telnet's IAC (0xff)
and the defmt frame delimiter (0x00) among them, through the raw side of
the bridge. Exit status 0 and "ok" when they all come back in order."""

import os
import socket
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import serial  # noqa: E402
import serial.rfc2217  # noqa: E402
from memfw_lab import bridge_rfc2217  # noqa: E402


def rfc2217_server():
    line = serial.serial_for_url("loop://", timeout=0.05)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def serve():
        conn, _ = srv.accept()

        class Out:
            def write(self, data):
                conn.sendall(data)

        pm = serial.rfc2217.PortManager(line, Out())

        def to_client():
            while True:
                data = line.read(4096)
                if data:
                    conn.sendall(b"".join(pm.escape(data)))

        threading.Thread(target=to_client, daemon=True).start()
        while True:
            data = conn.recv(4096)
            if not data:
                return
            line.write(b"".join(pm.filter(data)))

    threading.Thread(target=serve, daemon=True).start()
    return srv.getsockname()[1]


def main():
    raw = bridge_rfc2217("127.0.0.1", rfc2217_server(), 115200)
    c = socket.create_connection(("127.0.0.1", raw))
    c.settimeout(10)
    payload = bytes(range(256)) * 4 + b"\xff\xff\x00\x00\xff"
    c.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = c.recv(4096)
        if not chunk:
            break
        got += chunk
    if got != payload:
        print(f"bridge changed the bytes: sent {len(payload)}, got {len(got)}")
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
