//! One QEMU boot: start the emulator, decode its defmt stream live, stop on
//! exit, on a timeout, or when a log line says we have seen enough; never
//! leave the emulator running behind us.

use crate::console_proto::{answer, Action, DemuxReader, Piece};
use crate::log::{Decoder, LogLine};
use crate::machine::Machine;
use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Stdio};
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

/// Boots `elf` on `machine` and waits for the boot to end.
pub fn boot(
    machine: &Machine,
    elf: &Path,
    decoder: &Decoder,
    opts: &BootOptions<'_>,
) -> Result<Boot, String> {
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
    let mut cmd = match &dtb {
        Some(file) => {
            machine.command_with_dtb(elf, &opts.semihosting_args, opts.append, opts.qmp, &file.0)
        }
        None => machine.command(elf, &opts.semihosting_args, opts.append, opts.qmp),
    };
    if opts.paused {
        cmd.arg("-S");
    }
    // Semihosting off: the host answers the firmware's console requests on
    // QEMU's stdin (the UART's receive side), like a serial port.
    let console = !machine.semihosting;
    cmd.stdin(if console {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and only affects
    // the child: if this tool dies (Ctrl-C, kill), the kernel kills QEMU too.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", crate::setup::QEMU))?;
    let stdout = child.stdout.take().ok_or("no stdout pipe")?;
    let mut stderr_pipe = child.stderr.take().ok_or("no stderr pipe")?;
    let mut stdin = child.stdin.take();
    let cmdline = opts.semihosting_args.join(" ");
    let deadline = start + opts.timeout;

    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel::<Event>();
        if console {
            let ptx = tx.clone();
            let cmdline = &cmdline;
            let on_piece = move |p: Piece| {
                let event = match p {
                    Piece::Message(m) => match answer(&m, cmdline) {
                        Action::Reply(bytes) => {
                            let sent = stdin
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
            let reader = DemuxReader::new(stdout, on_piece);
            scope.spawn(move || {
                decoder.decode_stream(reader, |line| drop(tx.send(Event::Line(line))))
            });
        } else {
            scope.spawn(move || {
                decoder.decode_stream(stdout, |line| drop(tx.send(Event::Line(line))))
            });
        }
        let stderr_thread = scope.spawn(move || {
            let mut s = String::new();
            let _ = stderr_pipe.read_to_string(&mut s);
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
                kill(&mut child);
                ending = Some(Ending::TimedOut);
                break;
            }
            match rx.recv_timeout(deadline - now) {
                Ok(Event::Exit(code)) => {
                    // The firmware waits for a reset after its EXIT; the
                    // host ends the board (here: QEMU) as semihosting would.
                    kill(&mut child);
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
                        kill(&mut child);
                        ending = Some(Ending::Stopped);
                        break;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        // Drain what the decoder already had.
        lines.extend(rx.try_iter().filter_map(|e| match e {
            Event::Line(l) => Some(l),
            Event::Exit(_) => None,
        }));
        let ending = match ending {
            Some(e) => e,
            None => {
                // stdout closed: QEMU is exiting; bound the wait by the deadline.
                loop {
                    match child.try_wait() {
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
                            kill(&mut child);
                            break Ending::TimedOut;
                        }
                    }
                }
            }
        };
        let stderr = stderr_thread.join().unwrap_or_default();
        Ok(Boot {
            ending,
            lines,
            stderr,
            elapsed: start.elapsed(),
        })
    })
}
