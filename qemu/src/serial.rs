//! A board's console as the host sees it: a tty (a USB-serial adapter, or
//! the pty of a QEMU board model), or a Unix or TCP socket (a QEMU model's
//! `-chardev socket`, a lab's network serial port). Opened raw, 8N1, at the
//! given baud rate; reads wake up every 100 ms so a session can be ended.

use crate::error::{Error, Result};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The console's default speed on every board (115200 8N1).
pub const DEFAULT_BAUD: u32 = 115_200;

/// Where the console is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortSpec {
    /// A tty device (`/dev/ttyUSB0`, `/dev/pts/3`, a symlink to one).
    Tty {
        /// The device.
        path: PathBuf,
        /// Line speed.
        baud: u32,
    },
    /// `unix:PATH`: a Unix stream socket.
    Unix(PathBuf),
    /// `tcp:HOST:PORT`: a raw TCP serial port (no RFC 2217).
    Tcp(String),
}

impl PortSpec {
    /// `unix:PATH`, `tcp:HOST:PORT`, anything else a tty path.
    pub fn parse(s: &str, baud: u32) -> Result<Self> {
        if let Some(p) = s.strip_prefix("unix:") {
            return match p {
                "" => Err(Error::Usage("unix: needs a socket path".into())),
                p => Ok(Self::Unix(p.into())),
            };
        }
        if let Some(a) = s.strip_prefix("tcp:") {
            return match a.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                    Ok(Self::Tcp(a.to_string()))
                }
                _ => Err(Error::Usage(format!("tcp: takes HOST:PORT, not {a:?}"))),
            };
        }
        if s.is_empty() {
            return Err(Error::Usage(
                "needs a serial device or unix:PATH / tcp:HOST:PORT".into(),
            ));
        }
        if speed(baud).is_none() {
            return Err(Error::Usage(format!(
                "baud rate {baud} is not a standard tty speed"
            )));
        }
        Ok(Self::Tty {
            path: s.into(),
            baud,
        })
    }
}

/// The termios constant for `baud`.
fn speed(baud: u32) -> Option<libc::speed_t> {
    Some(match baud {
        9600 => libc::B9600,
        19200 => libc::B19200,
        38400 => libc::B38400,
        57600 => libc::B57600,
        115_200 => libc::B115200,
        230_400 => libc::B230400,
        460_800 => libc::B460800,
        921_600 => libc::B921600,
        1_000_000 => libc::B1000000,
        1_500_000 => libc::B1500000,
        2_000_000 => libc::B2000000,
        3_000_000 => libc::B3000000,
        _ => return None,
    })
}

/// An open console: a reader and a writer on the same line.
pub struct Port {
    /// Bytes from the board.
    pub rx: PortReader,
    /// Bytes to the board.
    pub tx: Box<dyn Write + Send>,
    /// Set to make `rx` report end of stream at its next wake-up.
    pub stop: Arc<AtomicBool>,
}

/// The read side: a blocking read that wakes every 100 ms to look at the
/// stop flag, and reports end of stream once it is set or the line hangs
/// up (EIO on a pty whose other end closed).
pub struct PortReader {
    inner: Box<dyn Read + Send>,
    stop: Arc<AtomicBool>,
    /// A tty's read returns 0 on its timeout, not at end of stream.
    tty: bool,
}

impl Read for PortReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Ok(0);
            }
            match self.inner.read(buf) {
                // A tty in VMIN=0/VTIME=1 mode: the 100 ms passed.
                Ok(0) if self.tty => continue,
                Ok(n) => return Ok(n),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                // EIO: the other side of a pty went away (QEMU exited).
                Err(e) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Err(e) => return Err(e),
            }
        }
    }
}

/// Opens `spec`, retrying until `deadline` while it does not exist yet
/// (a QEMU model creating its pty link or socket).
pub fn open(spec: &PortSpec, deadline: Instant) -> Result<Port> {
    let stop = Arc::new(AtomicBool::new(false));
    loop {
        let attempt = open_once(spec, &stop);
        match attempt {
            Ok(p) => return Ok(p),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn open_once(spec: &PortSpec, stop: &Arc<AtomicBool>) -> Result<Port> {
    let wake = Some(Duration::from_millis(100));
    let (rx, tx, tty): (Box<dyn Read + Send>, Box<dyn Write + Send>, bool) = match spec {
        PortSpec::Tty { path, baud } => {
            use std::os::unix::fs::OpenOptionsExt;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NOCTTY)
                .open(path)
                .map_err(Error::io(path))?;
            make_raw(&f, *baud).map_err(Error::io(path))?;
            let w = f.try_clone().map_err(Error::io(path))?;
            (Box::new(f), Box::new(w), true)
        }
        PortSpec::Unix(path) => {
            let name = format!("unix:{}", path.display());
            let s = std::os::unix::net::UnixStream::connect(path).map_err(Error::io(&name))?;
            s.set_read_timeout(wake).map_err(Error::io(&name))?;
            let w = s.try_clone().map_err(Error::io(&name))?;
            (Box::new(s), Box::new(w), false)
        }
        PortSpec::Tcp(addr) => {
            let name = format!("tcp:{addr}");
            let s = std::net::TcpStream::connect(addr).map_err(Error::io(&name))?;
            s.set_read_timeout(wake).map_err(Error::io(&name))?;
            let _ = s.set_nodelay(true);
            let w = s.try_clone().map_err(Error::io(&name))?;
            (Box::new(s), Box::new(w), false)
        }
    };
    Ok(Port {
        rx: PortReader {
            inner: rx,
            stop: stop.clone(),
            tty,
        },
        tx,
        stop: stop.clone(),
    })
}

/// Raw mode, 8N1, no flow control, `baud`, reads returning after at most
/// 100 ms (VMIN 0, VTIME 1).
fn make_raw(f: &std::fs::File, baud: u32) -> std::io::Result<()> {
    let fd = f.as_raw_fd();
    let sp = speed(baud).ok_or_else(|| std::io::Error::other(format!("baud {baud}")))?;
    // SAFETY: termios is plain data; zeroed is a valid value to fill in.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd is an open descriptor owned by `f`; t is a valid termios.
    if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: t was filled by tcgetattr.
    unsafe { libc::cfmakeraw(&mut t) };
    t.c_cflag |= libc::CLOCAL | libc::CREAD;
    t.c_cflag &= !(libc::CRTSCTS | libc::CSTOPB | libc::PARENB);
    t.c_iflag &= !(libc::IXON | libc::IXOFF);
    t.c_cc[libc::VMIN] = 0;
    t.c_cc[libc::VTIME] = 1;
    // SAFETY: t is a valid termios; sp is one of the B* constants.
    let ok = unsafe { libc::cfsetispeed(&mut t, sp) == 0 && libc::cfsetospeed(&mut t, sp) == 0 };
    if !ok {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is open; t is a valid termios.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // Whatever the line held before this run is not ours.
    // SAFETY: fd is open.
    unsafe { libc::tcflush(fd, libc::TCIOFLUSH) };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_specs() {
        assert_eq!(
            PortSpec::parse("/dev/ttyUSB0", 115_200).ok(),
            Some(PortSpec::Tty {
                path: "/dev/ttyUSB0".into(),
                baud: 115_200
            })
        );
        assert_eq!(
            PortSpec::parse("unix:/tmp/c.sock", 115_200).ok(),
            Some(PortSpec::Unix("/tmp/c.sock".into()))
        );
        assert_eq!(
            PortSpec::parse("tcp:lab1:4001", 115_200).ok(),
            Some(PortSpec::Tcp("lab1:4001".into()))
        );
        assert!(PortSpec::parse("tcp:lab1", 115_200).is_err());
        assert!(PortSpec::parse("tcp::80", 115_200).is_err());
        assert!(PortSpec::parse("unix:", 115_200).is_err());
        assert!(PortSpec::parse("", 115_200).is_err());
        assert!(matches!(
            PortSpec::parse("/dev/ttyUSB0", 12_345),
            Err(Error::Usage(_))
        ));
    }

    /// A pty pair stands in for a USB-serial adapter: bytes written on one
    /// side come out of the port opened on the other, raw (no CR/LF or
    /// echo processing), both ways; and the reader ends once stopped.
    #[test]
    fn tty_is_raw_and_bidirectional() {
        let (mut master, slave) = openpty();
        let mut port = open(
            &PortSpec::Tty {
                path: slave,
                baud: 115_200,
            },
            Instant::now() + Duration::from_secs(2),
        )
        .expect("opens");
        let bytes: Vec<u8> = vec![0, 0, b'\n', b'\r', 3, 0x11, 0x13, 0xff, 0x7f, 4];
        master.write_all(&bytes).expect("write");
        let mut got = vec![0u8; bytes.len()];
        port.rx.read_exact(&mut got).expect("read");
        assert_eq!(got, bytes);
        port.tx.write_all(&bytes).expect("write");
        port.tx.flush().expect("flush");
        let mut back = vec![0u8; bytes.len()];
        master.read_exact(&mut back).expect("read");
        assert_eq!(back, bytes);
        port.stop.store(true, Ordering::Relaxed);
        let mut b = [0u8; 4];
        assert_eq!(port.rx.read(&mut b).expect("ends"), 0);
    }

    #[test]
    fn unix_socket_port() {
        let dir = std::env::temp_dir().join(format!("serial-test-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("c.sock");
        let _ = std::fs::remove_file(&path);
        let l = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let mut port = open(
            &PortSpec::Unix(path.clone()),
            Instant::now() + Duration::from_secs(2),
        )
        .expect("opens");
        let (mut peer, _) = l.accept().expect("accept");
        peer.write_all(b"\x00\x00hello").expect("write");
        let mut got = [0u8; 7];
        port.rx.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"\x00\x00hello");
        drop(peer);
        assert_eq!(port.rx.read(&mut got).expect("eof"), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A pty pair: (master, slave path).
    pub(crate) fn openpty() -> (std::fs::File, PathBuf) {
        use std::os::fd::FromRawFd;
        // SAFETY: posix_openpt returns a new descriptor or -1.
        let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY) };
        assert!(fd >= 0);
        // SAFETY: fd is a pty master just opened.
        assert_eq!(unsafe { libc::grantpt(fd) }, 0);
        // SAFETY: as above.
        assert_eq!(unsafe { libc::unlockpt(fd) }, 0);
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: name is writable for its length.
        let rc = unsafe { libc::ptsname_r(fd, name.as_mut_ptr(), name.len()) };
        assert_eq!(rc, 0);
        // SAFETY: ptsname_r wrote a NUL-terminated string.
        let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: fd is owned by nothing else.
        (unsafe { std::fs::File::from_raw_fd(fd) }, path.into())
    }
}
