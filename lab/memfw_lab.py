"""What `cargo qemu test --labgrid PLACE` runs inside its labgrid venv.

    python memfw_lab.py hold PLACE [--ready REGEX] [--timeout S] [--no-strategy]

acquires PLACE through the coordinator (``LG_COORDINATOR``), brings it to
"loader ready" with ``MemfwLoaderStrategy`` (power on, wait for the ready
line on the console), and prints one JSON line: the place's network serial
port (host, port, protocol, speed; an RFC 2217 port is bridged to a raw local
TCP port, which is what the tool's serial runner speaks), its tags and the
banner seen. It then holds the place until its stdin closes (the tool exits,
however it exits: Ctrl-C does not reach this process first, see below) and
releases it, printing ``{"released": PLACE}``.

Per-test power cycles go to this process's labgrid power driver through
two FIFOs (``power_fifos`` in the JSON line; see ``power_fifos``).
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def client(*args):
    """Runs labgrid-client from this venv, in its own session so that a
    Ctrl-C in the terminal does not cut an acquire or release in half."""
    exe = os.path.join(os.path.dirname(sys.executable), "labgrid-client")
    return subprocess.run(
        [exe, *args], capture_output=True, text=True, start_new_session=True
    )


def say(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


POWER_DRIVERS = {
    "NetworkPowerPort": "NetworkPowerDriver",
    "PDUDaemonPort": "PDUDaemonDriver",
    "NetworkUSBPowerPort": "USBPowerDriver",
    "NetworkSiSPMPowerPort": "SiSPMPowerDriver",
    "TasmotaPowerPort": "TasmotaPowerDriver",
    "NetworkYKUSHPowerPort": "YKUSHPowerDriver",
}


def bridge_rfc2217(host, port, speed):
    """A raw local TCP port in front of an RFC 2217 one (ser2net's telnet
    mode, what labgrid's exporter makes of a USBSerialPort)."""
    import serial  # pyserial, a labgrid dependency

    remote = serial.serial_for_url(f"rfc2217://{host}:{port}", baudrate=speed, timeout=0.1)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve():
        while True:
            conn, _ = listener.accept()
            done = threading.Event()

            def up():
                while not done.is_set():
                    data = remote.read(4096)
                    if data:
                        try:
                            conn.sendall(data)
                        except OSError:
                            break

            t = threading.Thread(target=up, daemon=True)
            t.start()
            while True:
                data = conn.recv(4096)
                if not data:
                    break
                remote.write(data)
            done.set()
            t.join()
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1]


def power_fifos(state, place):
    """Two FIFOs through which a shell command asks for a power action:
    write ``cycle``, ``on`` or ``off`` into the first, read ``ok`` (or
    ``error …``) from the second. Much faster per test than starting
    labgrid-client, and the same labgrid power driver."""
    paths = tuple(os.path.join(state, f"power-{place}.{d}") for d in ("in", "out"))
    for p in paths:
        if os.path.exists(p):
            os.unlink(p)
        os.mkfifo(p, 0o600)
    return paths


def serve_power(target, drv, fifo_in, fifo_out):
    while True:
        with open(fifo_in) as f:
            action = f.read().strip()
        try:
            if action not in ("cycle", "on", "off"):
                raise ValueError(f"unknown power action {action!r}")
            target.activate(drv)
            getattr(drv, action)()
            reply = "ok"
        except Exception as e:  # the command that asked fails with it
            reply = f"error {type(e).__name__}: {e}"
        with open(fifo_out, "w") as f:
            f.write(reply + "\n")


def hold(args):
    # Ctrl-C goes to the whole foreground process group: the tool dies of
    # it and closes our stdin, and we release the place then.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    r = client("-p", args.place, "acquire")
    if r.returncode != 0:
        say({"error": f"acquire {args.place}: {(r.stderr or r.stdout).strip()}"})
        return 1
    try:
        return serve_place(args)
    finally:
        r = client("-p", args.place, "release")
        if r.returncode == 0:
            say({"released": args.place})
        else:
            say({"error": f"release {args.place}: {(r.stderr or r.stdout).strip()}"})


def serve_place(args):
    from labgrid import Environment
    from labgrid.factory import target_factory
    from labgrid.resource import NetworkSerialPort
    from labgrid.util.proxy import proxymanager
    import memfw_strategy  # noqa: F401 (registers MemfwLoaderStrategy)

    config = os.path.join(args.state, f"env-{args.place}.yaml")
    os.makedirs(args.state, exist_ok=True)
    with open(config, "w") as f:
        json.dump(
            {"targets": {"main": {"resources": {"RemotePlace": {"name": args.place}}}}}, f
        )
    env = Environment(config)
    try:
        target = env.get_target("main")
        place = next(r for r in target.resources if type(r).__name__ == "RemotePlace")
        serial = target.get_resource(NetworkSerialPort)
        power = next(
            (
                POWER_DRIVERS[type(r).__name__]
                for r in target.resources
                if type(r).__name__ in POWER_DRIVERS
            ),
            None,
        )
        if power is None:
            say({"error": f"place {args.place} has no power resource labgrid can drive"})
            return 1
        kwargs = {"delay": args.power_delay} if power == "NetworkPowerDriver" else {}
        power_drv = target_factory.drivers[power](target, None, **kwargs)
        banner = None
        if not args.no_strategy:
            target_factory.drivers["SerialDriver"](target, None)
            strategy = memfw_strategy.MemfwLoaderStrategy(
                target, None, ready=args.ready, timeout=args.timeout
            )
            strategy.transition("loader-ready")
            banner = strategy.banner
        fifos = power_fifos(args.state, args.place)
        threading.Thread(
            target=serve_power, args=(target, power_drv, *fifos), daemon=True
        ).start()
        host, port = proxymanager.get_host_and_port(serial)
        protocol = serial.protocol
        if protocol == "rfc2217":
            port = bridge_rfc2217(host, port, serial.speed)
            host, protocol = "127.0.0.1", "raw"
        say(
            {
                "serial": {
                    "host": host,
                    "port": port,
                    "protocol": protocol,
                    "speed": serial.speed,
                },
                "power": power,
                "power_fifos": list(fifos),
                "tags": dict(place.tags),
                "banner": banner,
            }
        )
        # Hold the place until the tool is done.
        for _ in sys.stdin:
            pass
        return 0
    except Exception as e:  # reported to the tool, which fails the run
        say({"error": f"{type(e).__name__}: {e}"})
        return 1
    finally:
        env.cleanup()


def main():
    p = argparse.ArgumentParser(prog="memfw_lab.py")
    sub = p.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("hold", help="acquire PLACE, bring it to loader ready, hold it")
    h.add_argument("place")
    h.add_argument("--ready", default=None, help="regex of the ready line")
    h.add_argument("--timeout", type=float, default=30.0)
    h.add_argument("--power-delay", type=float, default=2.0)
    h.add_argument("--no-strategy", action="store_true")
    h.add_argument("--state", default=os.getcwd(), help="where to write the environment file")
    args = p.parse_args()
    if args.ready is None:
        import memfw_strategy

        args.ready = memfw_strategy.LOADER_READY
    return hold(args)


if __name__ == "__main__":
    sys.exit(main())
