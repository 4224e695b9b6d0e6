//! A QEMU board model that runs the resident loader as its kernel, with
//! semihosting off and the console on a pty or Unix socket: the stand-in
//! for a real board on a serial line (`cargo qemu test --serial qemu`, and
//! the CI proof inside `cargo qemu test`). One model serves a whole run:
//! each test's firmware resets the machine after its EXIT (PSCI or the
//! watchdog), QEMU then reloads the kernel, so the loader comes back; a
//! test that hangs is ended by the model's `system_reset` over QMP.

use crate::boot::{Boot, BootOptions};
use crate::elf::TestCase;
use crate::error::{Error, Result};
use crate::loader::{Faults, ResetHook};
use crate::log::Decoder;
use crate::machine::{Console, Machine};
use crate::serial::PortSpec;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::Duration;

/// A running model.
pub struct LoaderModel {
    child: Child,
    /// Its console, as the serial runner opens it.
    pub port: PortSpec,
    qmp_conn: Arc<std::sync::Mutex<Option<crate::qmp::Qmp<crate::qmp::SocketIo>>>>,
    alive: Arc<std::sync::atomic::AtomicBool>,
    files: Vec<PathBuf>,
    /// What the model is (what the tests are told).
    pub machine: Machine,
}

/// The kernel QEMU boots for the loader on `board`: the Pi's raw
/// `kernel8.img` (entered at EL2 with the DTB in x0, as the Pi firmware
/// does), the ELF elsewhere (as U-Boot's `bootelf` loads it).
pub fn loader_kernel(board: &str, elf: &std::path::Path) -> Result<PathBuf> {
    if !board.starts_with("raspi") {
        return Ok(elf.to_path_buf());
    }
    let bytes = std::fs::read(elf).map_err(Error::io(elf))?;
    let (_, raw) = crate::image::raw_image(&bytes)?;
    let out = elf.with_file_name(format!("loader-{board}.img"));
    std::fs::write(&out, raw).map_err(Error::io(&out))?;
    Ok(out)
}

impl LoaderModel {
    /// Builds the loader for `machine.board` and starts the model on it.
    /// `unix`: the console on a Unix socket (else a pty).
    pub fn start(machine: Machine, unix: bool) -> Result<Self> {
        let elf = crate::cargo::build_loader(machine.board)?;
        let kernel = loader_kernel(machine.board, &elf)?;
        let tmp = |ext: &str| {
            std::env::temp_dir().join(format!(
                "cargo-qemu-{}-loader-{}.{ext}",
                std::process::id(),
                machine.board
            ))
        };
        let (console, port) = if unix {
            let p = tmp("sock");
            (Console::UnixSocket(p.clone()), PortSpec::Unix(p))
        } else {
            let p = tmp("pty");
            (
                Console::Pty(p.clone()),
                PortSpec::Tty {
                    path: p,
                    baud: crate::serial::DEFAULT_BAUD,
                },
            )
        };
        let machine = Machine {
            semihosting: false,
            console,
            no_reboot: false,
            ..machine
        };
        let qmp = tmp("qmp");
        let made = crate::fdt::board_dtb(&machine, &std::env::temp_dir())?;
        let dtb = tmp("dtb");
        std::fs::rename(&made, &dtb).map_err(Error::io(&dtb))?;
        let mut files = vec![qmp.clone()];
        if let PortSpec::Unix(p) | PortSpec::Tty { path: p, .. } = &port {
            files.push(p.clone());
        }
        // Left over from a run that was killed.
        for f in &files {
            let _ = std::fs::remove_file(f);
        }
        files.push(dtb.clone());
        let mut cmd = machine.command_with_dtb(&kernel, &[], None, Some(&qmp), &dtb);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        crate::boot::dies_with_this_tool(&mut cmd);
        let child = cmd.spawn().map_err(Error::spawn(crate::setup::QEMU))?;
        // QEMU moves console input into a full UART FIFO only when its
        // main loop runs again, which an idle model does rarely (the
        // mini-UART's 8 bytes then arrive about once a second). A QMP
        // query every few milliseconds keeps the loop turning, as a real
        // line's steady stream would.
        // (A console on a socket with wait=on holds QEMU until the first
        // test connects, so the thread connects to QMP in its own time.)
        let conn: Arc<std::sync::Mutex<Option<crate::qmp::Qmp<crate::qmp::SocketIo>>>> =
            Arc::default();
        let alive = Arc::new(std::sync::atomic::AtomicBool::new(true));
        {
            let conn = conn.clone();
            let alive = alive.clone();
            let path = qmp.clone();
            std::thread::spawn(move || {
                let Ok(q) = crate::qmp::Qmp::connect(&path, Duration::from_secs(600)) else {
                    return;
                };
                if let Ok(mut c) = conn.lock() {
                    *c = Some(q);
                }
                while alive.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(mut c) = conn.lock() {
                        match c.as_mut().map(|q| q.execute("query-status", None)) {
                            Some(Ok(_)) => {}
                            _ => return,
                        }
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            });
        }
        Ok(Self {
            child,
            port,
            qmp_conn: conn,
            alive,
            files,
            machine,
        })
    }

    /// `system_reset` over the model's QMP socket.
    pub fn reset_hook(&self) -> ResetHook {
        let qmp = self.qmp_conn.clone();
        ResetHook(Arc::new(move || {
            let mut c = qmp
                .lock()
                .map_err(|_| Error::Missing("the model's QMP lock is poisoned".into()))?;
            let q = c
                .as_mut()
                .ok_or_else(|| Error::Missing("the model's QMP is not connected".into()))?;
            q.execute("system_reset", None)
                .map(|_| ())
                .map_err(|e| Error::during("QMP system_reset")(e.into()))
        }))
    }
}

impl Drop for LoaderModel {
    fn drop(&mut self) {
        self.alive
            .store(false, std::sync::atomic::Ordering::Relaxed);
        let _ = self.child.kill();
        let _ = self.child.wait();
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

impl LoaderModel {
    /// The serial runner's view of this model: its console, the loader,
    /// `system_reset` when the loader does not answer, what the tests are
    /// told (entered at the model's EL, its RAM), names prefixed.
    pub fn serial_board(&self, prefix: &str) -> crate::test::SerialBoard {
        crate::test::SerialBoard {
            port: self.port.clone(),
            power_cycle: None,
            model_pidfile: None,
            loader: Some(crate::loader::LoaderUse {
                reset_hook: Some(self.reset_hook()),
                faults: Faults::default(),
            }),
            name_prefix: prefix.into(),
            machine: Some(self.machine.clone()),
            model: None,
        }
    }

    /// Runs `case` of `elf` once through the loader with `faults`.
    fn run_case(
        &self,
        elf: &Path,
        decoder: &Decoder,
        case: &TestCase,
        faults: Faults,
    ) -> Result<Boot> {
        let m = &self.machine;
        let opts = BootOptions {
            semihosting_args: vec![
                "run_addr".into(),
                case.addr.to_string(),
                format!("entry_el={}", m.el),
                format!("mem_bytes={}", m.expected_ram_bytes()),
                format!("cpu={}", m.cpu),
                format!("gic={}", m.gic_version),
                format!("smp={}", m.vcpus()),
            ],
            append: None,
            qmp: None,
            timeout: Duration::from_secs(60),
            echo: false,
            stop_when: None,
            on_started: None,
            paused: false,
        };
        let use_ = crate::loader::LoaderUse {
            reset_hook: Some(self.reset_hook()),
            faults,
        };
        crate::boot::boot_board(m.board, &self.port, None, Some(&use_), elf, decoder, &opts)
    }
}

/// One of the loader's own proofs on a model.
pub struct Proof {
    /// Test name (after `serial::loader::`).
    pub name: &'static str,
    /// Runs it: the wall time, or why it failed.
    #[allow(clippy::type_complexity)]
    pub run: fn(&LoaderModel, &[(String, PathBuf)], &[Decoder]) -> Result<Duration>,
}

/// The loader's proofs: frames corrupted on the wire, a host that
/// vanishes mid-transfer, the "already here" skip on a rerun.
pub const PROOFS: &[Proof] = &[
    Proof {
        name: "corrupted_frames_are_refused_and_resent",
        run: corrupted_frames,
    },
    Proof {
        name: "host_vanishing_mid_transfer_is_survived",
        run: host_vanishes,
    },
    Proof {
        name: "rerun_skips_the_upload",
        run: rerun_skips,
    },
];

/// The ELF of `suite`, its decoder and the case `name`.
fn case<'a>(
    elfs: &'a [(String, PathBuf)],
    decoders: &'a [Decoder],
    suite: &str,
    name: &str,
) -> Result<(&'a Path, &'a Decoder, TestCase)> {
    let i = elfs
        .iter()
        .position(|(n, _)| n == suite)
        .ok_or_else(|| Error::Missing(format!("no {suite} suite built")))?;
    let c = crate::test::read_cases(&elfs[i].1)?
        .into_iter()
        .find(|c| c.name == name)
        .ok_or_else(|| Error::Missing(format!("no test {suite}::{name}")))?;
    Ok((&elfs[i].1, &decoders[i], c))
}

/// The loader's note in a boot's log.
fn note(b: &Boot) -> String {
    b.lines
        .iter()
        .find(|l| l.message.starts_with("loader on "))
        .map(|l| l.message.clone())
        .unwrap_or_default()
}

/// A number in the note right before `word`.
fn figure(note: &str, word: &str) -> Option<u64> {
    let at = note.find(word)?;
    note[..at]
        .split_whitespace()
        .last()?
        .trim_start_matches('(')
        .parse()
        .ok()
}

fn passed(b: &Boot, case: &TestCase) -> Result<()> {
    crate::test::judge_embedded(b.ending, case.should_panic).map_err(|e| e.with_log(b.transcript()))
}

/// A different image each time (so something is uploaded): the suites
/// the model has not just run.
fn corrupted_frames(
    model: &LoaderModel,
    elfs: &[(String, PathBuf)],
    decoders: &[Decoder],
) -> Result<Duration> {
    let start = std::time::Instant::now();
    let (elf, dec, c) = case(elfs, decoders, "mmu", "linter_clean_after_boot")
        .or_else(|_| case(elfs, decoders, "boot", "runs_at_el1"))?;
    // Every second frame: even an exchange of QUERY and RUN alone has one.
    let faults = Faults {
        corrupt_every: 2,
        ..Faults::default()
    };
    let b = model.run_case(elf, dec, &c, faults)?;
    passed(&b, &c)?;
    let n = note(&b);
    let refused = figure(&n, "corrupt frames refused").unwrap_or(0);
    if refused == 0 || figure(&n, "bytes").unwrap_or(0) == 0 {
        return Err(Error::Check(format!(
            "expected an upload with corrupt frames refused: {n}"
        ))
        .with_log(b.transcript()));
    }
    Ok(start.elapsed())
}

fn host_vanishes(
    model: &LoaderModel,
    elfs: &[(String, PathBuf)],
    decoders: &[Decoder],
) -> Result<Duration> {
    let start = std::time::Instant::now();
    let (elf, dec, c) = case(elfs, decoders, "platform", "memory_matches_qemu")?;
    let faults = Faults {
        vanish_after_data: 5,
        ..Faults::default()
    };
    match model.run_case(elf, dec, &c, faults) {
        Err(e) if matches!(e.root(), Error::FaultInjected(_)) => {}
        other => {
            return Err(Error::Check(format!(
                "the first host should have vanished: {other:?}"
            )))
        }
    }
    // The next host: the loader dropped the half frame, says HELLO again,
    // and takes the (incomplete) image.
    let b = model.run_case(elf, dec, &c, Faults::default())?;
    passed(&b, &c)?;
    let n = note(&b);
    if figure(&n, "bytes").unwrap_or(0) == 0 {
        return Err(Error::Check(format!(
            "expected the rest to be uploaded: {n}"
        )));
    }
    Ok(start.elapsed())
}

fn rerun_skips(
    model: &LoaderModel,
    elfs: &[(String, PathBuf)],
    decoders: &[Decoder],
) -> Result<Duration> {
    let start = std::time::Instant::now();
    let (elf, dec, c) = case(elfs, decoders, "boot", "bss_is_zeroed")?;
    let first = model.run_case(elf, dec, &c, Faults::default())?;
    passed(&first, &c)?;
    let second = model.run_case(elf, dec, &c, Faults::default())?;
    passed(&second, &c)?;
    let image: u64 = crate::loader::Image::from_elf(&std::fs::read(elf).map_err(Error::io(elf))?)?
        .segments
        .iter()
        .map(|s| s.data.len() as u64)
        .sum();
    let n = note(&second);
    // The test wrote its own data segment while it ran, so that one goes
    // again; the rest (code, read-only data) must be found in place.
    let sent = if n.contains("already here") {
        0
    } else {
        figure(&n, "bytes").ok_or_else(|| Error::Check(format!("no upload figure in {n:?}")))?
    };
    if sent * 10 > image {
        return Err(Error::Check(format!(
            "the rerun sent {sent} of the image's {image} bytes: {n}\nfirst: {}",
            note(&first)
        )));
    }
    Ok(start.elapsed())
}
