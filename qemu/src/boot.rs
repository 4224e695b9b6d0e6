//! One QEMU boot: start the emulator, decode its defmt stream live, stop on
//! exit, on a timeout, or when a log line says we have seen enough; never
//! leave the emulator running behind us.

use crate::console_proto::{answer, Action, DemuxReader, Piece};
use crate::error::{Error, OrMissing, Result};
use crate::log::{Decoder, LogLine};
use crate::machine::{Console, Machine};
use crate::serial::PortSpec;
use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How a boot ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// QEMU exited with this status (the semihosting exit code, or 0 after
    /// PSCI SYSTEM_OFF), or, with semihosting off, the firmware reported
    /// this status in a console-protocol EXIT (QEMU then killed).
    Exited(i32),
    /// QEMU was killed by a signal (Ctrl-C, or killed from outside).
    Signalled(i32),
    /// The deadline passed; we killed QEMU.
    TimedOut,
    /// The `stop_when` predicate matched a line; we stopped QEMU.
    Stopped,
}

/// What a boot produced.
#[derive(Debug)]
pub struct Boot {
    /// How it ended.
    pub ending: Ending,
    /// Every decoded log line.
    pub lines: Vec<LogLine>,
    /// What QEMU wrote on stderr.
    pub stderr: String,
    /// Wall time.
    pub elapsed: Duration,
}

impl Boot {
    /// The decoded log followed by QEMU's stderr, for failure reports.
    pub fn transcript(&self) -> String {
        let mut s = String::new();
        for l in &self.lines {
            s.push_str(&l.to_string());
            s.push('\n');
        }
        if !self.stderr.trim().is_empty() {
            s.push_str("--- qemu stderr ---\n");
            s.push_str(self.stderr.trim_end());
            s.push('\n');
        }
        s
    }

    /// True if some line's message contains `needle`.
    pub fn logged(&self, needle: &str) -> bool {
        self.lines.iter().any(|l| l.message.contains(needle))
    }
}

/// Options for [`boot`].
pub struct BootOptions<'a> {
    /// Words for the semihosting command line (served over the console
    /// when the machine has semihosting off).
    pub semihosting_args: Vec<String>,
    /// Kernel command line (`/chosen/bootargs`).
    pub append: Option<&'a str>,
    /// QMP socket path.
    pub qmp: Option<&'a Path>,
    /// Kill QEMU after this long.
    pub timeout: Duration,
    /// Print each line as it arrives.
    pub echo: bool,
    /// Stop QEMU as soon as a line satisfies this.
    pub stop_when: Option<&'a (dyn Fn(&LogLine) -> bool + Sync)>,
    /// Called once QEMU has started (for example to connect to QMP); runs on
    /// its own thread while the log is decoded.
    pub on_started: Option<&'a (dyn Fn() + Sync)>,
    /// Start with the CPU stopped (`-S`); `on_started` resumes it over QMP
    /// (`cont`) once it is listening, so no event can be missed.
    pub paused: bool,
}

/// A file removed when dropped.
struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// What the console reader threads report to the boot loop.
enum Event {
    Line(LogLine),
    /// The firmware's console-protocol EXIT (semihosting off).
    Exit(i32),
}

fn host_line(message: String) -> LogLine {
    LogLine {
        level: "HOST".into(),
        timestamp: String::new(),
        message,
        location: None,
    }
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Boots `elf` on `machine` and waits for the boot to end. The console is
/// QEMU's stdio, or (`machine.console`) a pty or socket opened as a serial
/// port, exactly as a real board's would be.
pub fn boot(
    machine: &Machine,
    elf: &Path,
    decoder: &Decoder,
    opts: &BootOptions<'_>,
) -> Result<Boot> {
    let dtb = match machine.dtb {
        Some(patch) => Some(TempFile(crate::fdt::hostile_dtb(
            machine,
            elf,
            patch,
            &std::env::temp_dir(),
        )?)),
        None if !machine.is_virt() && !machine.without_dtb => Some(TempFile(
            crate::fdt::board_dtb(machine, &std::env::temp_dir())?,
        )),
        None => None,
    };
    // A console on a pty or socket gets a path of its own for this boot.
    let mut machine = machine.clone();
    let tmp = |ext: &str| {
        static N: AtomicUsize = AtomicUsize::new(0);
        std::env::temp_dir().join(format!(
            "cargo-qemu-{}-{}.{ext}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ))
    };
    let port_spec = match &mut machine.console {
        Console::Stdio => None,
        Console::Pty(p) => {
            if p.as_os_str().is_empty() {
                *p = tmp("pty");
            }
            Some(PortSpec::Tty {
                path: p.clone(),
                baud: crate::serial::DEFAULT_BAUD,
            })
        }
        Console::UnixSocket(p) => {
            if p.as_os_str().is_empty() {
                *p = tmp("sock");
            }
            Some(PortSpec::Unix(p.clone()))
        }
    };
    let _port_file = match &machine.console {
        Console::Pty(p) | Console::UnixSocket(p) => Some(TempFile(p.clone())),
        Console::Stdio => None,
    };
    // A pty drops what the guest sends before the host has opened it:
    // start paused and resume over QMP once the port is open.
    let own_qmp = matches!(machine.console, Console::Pty(_)) && opts.qmp.is_none();
    let own_qmp_path = own_qmp.then(|| tmp("qmp"));
    let _qmp_file = own_qmp_path.clone().map(TempFile);
    let qmp = opts.qmp.or(own_qmp_path.as_deref());
    let mut cmd = match &dtb {
        Some(file) => {
            machine.command_with_dtb(elf, &opts.semihosting_args, opts.append, qmp, &file.0)
        }
        None => machine.command(elf, &opts.semihosting_args, opts.append, qmp),
    };
    if opts.paused || own_qmp {
        cmd.arg("-S");
    }
    // Semihosting off: the host answers the firmware's console requests on
    // the UART's receive side (QEMU's stdin, or the port), like a serial port.
    let console = !machine.semihosting;
    let stdio_console = port_spec.is_none();
    cmd.stdin(if console && stdio_console {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(if stdio_console {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stderr(Stdio::piped());
    dies_with_this_tool(&mut cmd);
    let start = Instant::now();
    let deadline = start + opts.timeout;
    let mut child = cmd.spawn().map_err(Error::spawn(crate::setup::QEMU))?;
    let stderr_pipe = child.stderr.take().or_missing("no stderr pipe")?;
    let (rx, tx, stop): (Box<dyn Read + Send>, Option<Box<dyn Write + Send>>, _) = match &port_spec
    {
        None => {
            let stdout = child.stdout.take().or_missing("no stdout pipe")?;
            let stdin = child.stdin.take();
            (
                Box::new(stdout),
                stdin.map(|s| Box::new(s) as Box<dyn Write + Send>),
                None,
            )
        }
        Some(spec) => {
            let port = match crate::serial::open(spec, deadline.min(start + PORT_WAIT)) {
                Ok(p) => p,
                Err(e) => {
                    kill(&mut child);
                    return Err(e);
                }
            };
            if let Some(path) = &own_qmp_path {
                let resumed = crate::qmp::Qmp::connect(path, Duration::from_secs(10))
                    .and_then(|mut q| q.execute("cont", None));
                if let Err(e) = resumed {
                    kill(&mut child);
                    return Err(Error::during("QMP cont")(e.into()));
                }
            }
            (Box::new(port.rx), Some(port.tx), Some(port.stop))
        }
    };
    let mut target = QemuTarget { child, stop };
    let link = ConsoleLink {
        rx,
        tx,
        console_protocol: console,
        stderr: Some(stderr_pipe),
    };
    let (ending, lines, stderr) = session(link, decoder, opts, deadline, &mut target);
    if let Some(s) = &target.stop {
        s.store(true, Ordering::Relaxed);
    }
    Ok(Boot {
        ending,
        lines,
        stderr,
        elapsed: start.elapsed(),
    })
}

/// How long a QEMU model may take to create its console's pty or socket.
const PORT_WAIT: Duration = Duration::from_secs(20);

/// What runs the firmware: a QEMU process, or a real board.
pub trait Target {
    /// End the run now (kill QEMU; reset or power-cycle the board).
    fn end(&mut self);
    /// The console closed by itself: how did the run end? Bounded by
    /// `deadline` (then [`Ending::TimedOut`] after ending it).
    fn wait_ended(&mut self, deadline: Instant) -> Ending;
}

/// A QEMU process; `stop` ends the console reader of a port.
struct QemuTarget {
    child: Child,
    stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl Target for QemuTarget {
    fn end(&mut self) {
        kill(&mut self.child);
        if let Some(s) = &self.stop {
            s.store(true, Ordering::Relaxed);
        }
    }

    fn wait_ended(&mut self, deadline: Instant) -> Ending {
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    break match (status.code(), status.signal()) {
                        (Some(c), _) => Ending::Exited(c),
                        (None, Some(sig)) => Ending::Signalled(sig),
                        _ => Ending::Exited(-1),
                    };
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => {
                    self.end();
                    break Ending::TimedOut;
                }
            }
        }
    }
}

/// The two directions of a console and what else a [`session`] reads.
pub struct ConsoleLink {
    /// Bytes from the board (the defmt stream, maybe with console frames).
    pub rx: Box<dyn Read + Send>,
    /// Bytes to the board; `None` when nothing may be sent.
    pub tx: Option<Box<dyn Write + Send>>,
    /// Whether the stream carries semihosting-over-the-console frames.
    pub console_protocol: bool,
    /// QEMU's stderr, kept for the report.
    pub stderr: Option<std::process::ChildStderr>,
}

/// One run on a board's console, whatever carries it (QEMU's stdio, a
/// pty, a socket, a USB-serial adapter): decodes the defmt stream from
/// `rx`, answers console-protocol requests on `tx` when
/// `console_protocol`, and stops at the firmware's EXIT, at a `stop_when`
/// line or at `deadline` by ending the `target`; when the console closes
/// by itself, the target says how the run ended. Returns the ending, the
/// log lines and what `stderr` (QEMU's) held.
pub fn session(
    link: ConsoleLink,
    decoder: &Decoder,
    opts: &BootOptions<'_>,
    deadline: Instant,
    target: &mut dyn Target,
) -> (Ending, Vec<LogLine>, String) {
    let ConsoleLink {
        rx,
        mut tx,
        console_protocol,
        stderr,
    } = link;
    let cmdline = opts.semihosting_args.join(" ");
    std::thread::scope(|scope| {
        let (tx_ev, rx_ev) = mpsc::channel::<Event>();
        if console_protocol {
            let ptx = tx_ev.clone();
            let cmdline = &cmdline;
            let on_piece = move |p: Piece| {
                let event = match p {
                    Piece::Message(m) => match answer(&m, cmdline) {
                        Action::Reply(bytes) => {
                            let sent = tx
                                .as_mut()
                                .map(|s| s.write_all(&bytes).and_then(|()| s.flush()));
                            match sent {
                                Some(Ok(())) => return,
                                _ => Event::Line(host_line("cannot answer on the console".into())),
                            }
                        }
                        Action::Output(text) => Event::Line(LogLine {
                            level: "PRINT".into(),
                            timestamp: String::new(),
                            message: text,
                            location: None,
                        }),
                        Action::Exit(code) => Event::Exit(code),
                        Action::Ignore(why) => Event::Line(host_line(why)),
                    },
                    Piece::Rejected(e) => Event::Line(host_line(format!(
                        "(corrupt console frame rejected: {e:?})"
                    ))),
                    Piece::Defmt(_) => return,
                };
                let _ = ptx.send(event);
            };
            let reader = DemuxReader::new(rx, on_piece);
            scope.spawn(move || {
                decoder.decode_stream(reader, |line| drop(tx_ev.send(Event::Line(line))))
            });
        } else {
            scope.spawn(move || {
                decoder.decode_stream(rx, |line| drop(tx_ev.send(Event::Line(line))))
            });
        }
        let stderr_thread = scope.spawn(move || {
            let mut s = String::new();
            if let Some(mut pipe) = stderr {
                let _ = pipe.read_to_string(&mut s);
            }
            s
        });
        if let Some(f) = opts.on_started {
            scope.spawn(f);
        }
        let mut lines = Vec::new();
        let mut ending = None;
        loop {
            let now = Instant::now();
            if now >= deadline {
                target.end();
                ending = Some(Ending::TimedOut);
                break;
            }
            match rx_ev.recv_timeout(deadline - now) {
                Ok(Event::Exit(code)) => {
                    // The firmware waits for a reset after its EXIT; the
                    // host ends the board (QEMU: kills it) as semihosting would.
                    target.end();
                    ending = Some(Ending::Exited(code));
                    break;
                }
                Ok(Event::Line(line)) => {
                    if opts.echo {
                        println!("{line}");
                    }
                    let stop = opts.stop_when.is_some_and(|f| f(&line));
                    lines.push(line);
                    if stop {
                        target.end();
                        ending = Some(Ending::Stopped);
                        break;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        // Drain what the decoder already had.
        lines.extend(rx_ev.try_iter().filter_map(|e| match e {
            Event::Line(l) => Some(l),
            Event::Exit(_) => None,
        }));
        // The stream closed first: the target knows how the run ended.
        let ending = ending.unwrap_or_else(|| target.wait_ended(deadline));
        let stderr = stderr_thread.join().unwrap_or_default();
        (ending, lines, stderr)
    })
}

/// A real board on a serial line: a run ends when the host stops reading
/// (the next test's power cycle, or the loader, resets the board).
struct BoardTarget {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Target for BoardTarget {
    fn end(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    fn wait_ended(&mut self, _deadline: Instant) -> Ending {
        // The line closed under us (a socket's far end went away): the
        // board is gone, not finished.
        self.end();
        Ending::Stopped
    }
}

/// Makes `cmd`'s process die with this tool: if it ends (Ctrl-C, a
/// kill), the kernel sends the child SIGKILL, so no QEMU outlives a run.
pub fn dies_with_this_tool(cmd: &mut std::process::Command) {
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and only affects
    // the child.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Runs `elf` on a real board over its console `port`, with semihosting
/// over the console. `power_cycle` is a shell command that brings the board
/// up (it sees `MEMFW_ELF` and `MEMFW_BOARD`); a tty is opened before it
/// runs, so nothing the board says first is lost, a socket after. Without
/// `loader` the command must start `elf` itself and runs before every
/// test; with it the board runs the resident loader, which gets `elf`
/// ([`crate::loader`]), and the command runs only when the loader does not
/// answer.
pub fn boot_board(
    board: &str,
    port: &PortSpec,
    power_cycle: Option<&str>,
    loader: Option<&crate::loader::LoaderUse>,
    elf: &Path,
    decoder: &Decoder,
    opts: &BootOptions<'_>,
) -> Result<Boot> {
    let start = Instant::now();
    let open = || crate::serial::open(port, Instant::now() + PORT_WAIT.min(opts.timeout));
    let cycle = || -> Result<()> {
        let Some(cmd) = power_cycle else {
            return Ok(());
        };
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .env("MEMFW_ELF", elf)
            .env("MEMFW_BOARD", board)
            .stdin(Stdio::null())
            .status()
            .map_err(Error::spawn(format!("--power-cycle {cmd:?}")))?;
        if !status.success() {
            return Err(Error::Failed {
                command: format!("--power-cycle {cmd:?}"),
                status,
                output: String::new(),
            });
        }
        Ok(())
    };
    let tty = matches!(port, PortSpec::Tty { .. });
    let mut early = if tty { Some(open()?) } else { None };
    if loader.is_none() {
        cycle()?;
    }
    let port = match early.take() {
        Some(p) => p,
        None => open()?,
    };
    let mut target = BoardTarget {
        stop: port.stop.clone(),
    };
    let mut notes = Vec::new();
    let (rx, mut tx): (Box<dyn Read + Send>, crate::loader::SharedWriter) = match loader {
        None => (Box::new(port.rx), crate::loader::SharedWriter::new(port.tx)),
        Some(l) => {
            use crate::loader::{ByteStream, Client, Image, HELLO_AFTER_RESET, HELLO_WAIT};
            let bytes = std::fs::read(elf).map_err(Error::io(elf))?;
            let image = Image::from_elf(&bytes)?;
            let tx = crate::loader::SharedWriter::new(port.tx);
            let mut stream = ByteStream::spawn(Box::new(port.rx));
            let mut client = Client::new(&mut stream, tx.clone(), l.faults);
            let loaded = client
                .wait_hello(Instant::now() + HELLO_WAIT)
                .or_else(|first| {
                    if power_cycle.is_none() && l.reset_hook.is_none() {
                        return Err(Error::Missing(format!(
                            "{first} (is the loader on the board? `cargo qemu image` writes it)"
                        )));
                    }
                    notes.push(host_line(format!("{first}: resetting the board")));
                    cycle()?;
                    if let Some(h) = &l.reset_hook {
                        (h.0)()?;
                    }
                    client.wait_hello(Instant::now() + HELLO_AFTER_RESET)
                })
                .and_then(|_| client.load_and_run(&image));
            notes.push(host_line(client.stats.summary()));
            if std::env::var_os("MEMFW_LOADER_DEBUG").is_some() {
                eprintln!("{}", client.stats.summary());
            }
            if let Err(e) = loaded {
                target.end();
                return Err(e);
            }
            (Box::new(stream), tx)
        }
    };
    // The test's own time starts once it runs (an upload does not count).
    let deadline = Instant::now() + opts.timeout;
    let link = ConsoleLink {
        rx,
        tx: Some(Box::new(tx.clone())),
        console_protocol: true,
        stderr: None,
    };
    let (ending, mut lines, stderr) = session(link, decoder, opts, deadline, &mut target);
    if loader.is_some() && matches!(ending, Ending::Exited(_)) {
        // Back to the loader for the next test.
        crate::loader::Client::send_reset(&mut tx);
    }
    target.end();
    notes.append(&mut lines);
    Ok(Boot {
        ending,
        lines: notes,
        stderr,
        elapsed: start.elapsed(),
    })
}
