//! `cargo qemu …`: the host side of the firmware.
//!
//! - `cargo qemu run [--board B] [--exit-when-ready] [--cpu C] [--mem M] [--el N] [--gic 2|3] [--smp N] [--append ARGS]`
//!   builds the firmware for board B (default `virt`), makes sure QEMU >= 10
//!   is installed, boots B's QEMU model and shows the decoded log.
//! - `cargo qemu test [FILTER…] [--host-only | --no-host] [-j N]` runs every test;
//!   `--board B --serial PORT [--baud N] [--power-cycle CMD]` runs the
//!   on-target suites on a real board over its console; `--labgrid PLACE
//!   [--board B] [--stage CMD]` on a place of a labgrid lab.
//! - `cargo qemu bench <memdesc|smp|translation|boot|balloon|all>` prints JSON lines.
//! - `cargo qemu runner ELF` is the cargo target runner.
//! - `cargo qemu setup` only installs what the others would (the Rust target,
//!   QEMU); CI calls it before its lint gates.
//!
//! The options are parsed by `clap` ([`cli`]); every command returns the
//! tool's one [`Error`] type.

mod balloon;
mod bench;
mod boot;
mod cargo;
mod cli;
mod console_proto;
mod elf;
mod error;
mod fdt;
mod image;
mod labgrid;
mod loader;
mod loader_model;
mod log;
mod machine;
mod qmp;
mod serial;
mod setup;
mod test;

use boot::{BootOptions, Ending};
use clap::Parser;
use cli::{BenchWhich, Cli, Cmd, Peer, RunArgs, TestCli};
use error::{Error, Result};
use machine::Machine;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // --help and --version are not errors.
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let result = match cli.cmd {
        Cmd::Run(a) => cmd_run(a),
        Cmd::Runner { elf, rest: _ } => cmd_runner(&elf),
        Cmd::Test(t) => cmd_test(t),
        Cmd::Bench { which, board, peer } => cmd_bench(which, board, peer),
        Cmd::Balloon { size, qmp } => {
            balloon::cmd_balloon(size, qmp).map_err(Error::during("balloon"))
        }
        Cmd::Setup => cmd_setup(),
        Cmd::Image { board, out } => cmd_image(board, &out),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn ending_code(ending: Ending) -> ExitCode {
    match ending {
        Ending::Exited(c) => ExitCode::from(c.clamp(0, 255) as u8),
        Ending::Signalled(_) => ExitCode::from(130),
        Ending::TimedOut => ExitCode::from(124),
        Ending::Stopped => ExitCode::SUCCESS,
    }
}

fn cmd_run(a: RunArgs) -> Result<ExitCode> {
    let machine = a.machine()?;
    setup::ensure_qemu().map_err(Error::during("setup"))?;
    let elf = cargo::build_firmware(machine.board).map_err(Error::during("build"))?;
    boot_interactive(&machine, &elf, a.append.as_deref(), a.exit_when_ready)
}

/// Boots an ELF with the log on stdout and a QMP socket; reports the balloon
/// device's view once the firmware is up.
fn boot_interactive(
    machine: &Machine,
    elf: &Path,
    append: Option<&str>,
    exit_when_ready: bool,
) -> Result<ExitCode> {
    let decoder = log::Decoder::read(elf)?;
    let qmp_path = std::env::temp_dir().join(format!("cargo-qemu-{}.qmp", std::process::id()));
    println!(
        "qemu: booting {} on {} [{}], QMP at {}",
        elf.display(),
        machine.board,
        machine.label(),
        qmp_path.display()
    );
    // The balloon's lines also go to a file beside the QMP socket, where
    // `cargo qemu balloon` from another terminal reads the settle report.
    let balloon_log = std::sync::Mutex::new(balloon::open_log(&qmp_path));
    let ready = |l: &log::LogLine| {
        balloon::log_line(&balloon_log, &l.message);
        exit_when_ready && l.message == "ready"
    };
    let qmp_report = || match qmp::Qmp::connect(&qmp_path, Duration::from_secs(5)) {
        Ok(_) if !machine.is_virt() => println!("host: QMP connected (no balloon on this board)"),
        Ok(mut q) => {
            match q.query_balloon() {
                Ok(actual) => println!(
                    "host: QMP connected; balloon reports the guest at {} MiB",
                    actual >> 20
                ),
                Err(e) => println!("host: QMP connected; query-balloon: {e}"),
            }
            if !exit_when_ready {
                balloon::console(&mut q, &qmp_path);
            }
        }
        Err(e) => println!("host: QMP unavailable: {e}"),
    };
    let opts = BootOptions {
        semihosting_args: vec![
            format!("entry_el={}", machine.el),
            format!("mem_bytes={}", machine.expected_ram_bytes()),
        ],
        append,
        qmp: Some(&qmp_path),
        timeout: if exit_when_ready {
            Duration::from_secs(60)
        } else {
            Duration::from_secs(365 * 24 * 3600)
        },
        echo: true,
        stop_when: Some(&ready),
        on_started: Some(&qmp_report),
        paused: false,
    };
    let result = boot::boot(machine, elf, &decoder, &opts);
    let _ = std::fs::remove_file(&qmp_path);
    let _ = std::fs::remove_file(balloon::log_path(&qmp_path));
    let b = result.map_err(Error::during("qemu"))?;
    if !b.stderr.trim().is_empty() {
        eprintln!("{}", b.stderr.trim_end());
    }
    println!("qemu: {:?} after {:.1}s", b.ending, b.elapsed.as_secs_f64());
    Ok(ending_code(b.ending))
}

fn cmd_image(board: &'static str, out: &Path) -> Result<ExitCode> {
    let elf = cargo::build_firmware(board).map_err(Error::during("build"))?;
    let mut written = image::write(board, &elf, out).map_err(Error::during("image"))?;
    // The resident loader for `cargo qemu test --serial`, in loader/.
    let loader = cargo::build_loader(board).map_err(Error::during("build"))?;
    let more =
        image::write_loader(board, &loader, &out.join("loader")).map_err(Error::during("image"))?;
    written.files.extend(more.files);
    for f in &written.files {
        println!("image: wrote {}", f.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_setup() -> Result<ExitCode> {
    setup::ensure_target(cargo::TARGET).map_err(Error::during("setup"))?;
    setup::ensure_qemu().map_err(Error::during("setup"))?;
    labgrid::venv::ensure().map_err(Error::during("setup"))?;
    println!(
        "qemu: the Rust target {}, QEMU >= {} and labgrid {} are installed",
        cargo::TARGET,
        setup::MIN_MAJOR,
        labgrid::venv::LABGRID_VERSION
    );
    Ok(ExitCode::SUCCESS)
}

/// The cargo target runner: a test binary's tests go through the same job
/// runner as `cargo qemu test`; any other ELF boots interactively.
fn cmd_runner(elf: &Path) -> Result<ExitCode> {
    setup::ensure_qemu().map_err(Error::during("setup"))?;
    let bytes = std::fs::read(elf).map_err(Error::io(elf))?;
    match elf::read_tests(&bytes) {
        Ok(_) => Ok(summary(test::run_elf(elf, Machine::default())?)),
        Err(elf::ElfError::NotEmbeddedTest) => {
            boot_interactive(&Machine::default(), elf, None, false)
        }
        Err(e) => Err(Error::Elf {
            path: elf.to_path_buf(),
            what: e.to_string(),
        }),
    }
}

/// Prints the one summary line and turns it into the exit status.
fn summary(tally: test::Tally) -> ExitCode {
    println!(
        "{} passed, {} failed, {} skipped",
        tally.passed, tally.failed, tally.skipped
    );
    if tally.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn cmd_test(t: TestCli) -> Result<ExitCode> {
    if t.labgrid.is_some() {
        return Ok(summary(labgrid::cmd_test(&t)?));
    }
    Ok(summary(test::run(&t.to_test_args()?)))
}

fn boot_bench(board: &'static str) -> Result<Vec<bench::Record>> {
    setup::ensure_qemu().map_err(Error::during("setup"))?;
    let elf = cargo::build_firmware(board).map_err(Error::during("build"))?;
    bench::boot::run(&elf, board).map_err(Error::during("bench"))
}

fn cmd_bench(which: BenchWhich, board: &'static str, peer: Option<Peer>) -> Result<ExitCode> {
    if peer.is_some() && which != BenchWhich::Balloon {
        return Err(Error::Usage(
            "--peer linux applies to `cargo qemu bench balloon` only".into(),
        ));
    }
    let records = match which {
        BenchWhich::Memdesc => bench::memdesc::run(),
        BenchWhich::Smp => {
            let mut r = bench::smp::run();
            setup::ensure_qemu().map_err(Error::during("setup"))?;
            let elf = cargo::build_firmware("virt").map_err(Error::during("build"))?;
            r.extend(bench::smp_target::run(&elf).map_err(Error::during("bench"))?);
            r
        }
        BenchWhich::Translation => bench::translation::run(),
        BenchWhich::Boot => boot_bench(board)?,
        BenchWhich::Balloon => {
            setup::ensure_qemu().map_err(Error::during("setup"))?;
            let elf = cargo::build_firmware("virt").map_err(Error::during("build"))?;
            bench::balloon::run(&elf, peer.is_some()).map_err(Error::during("bench"))?
        }
        BenchWhich::All => {
            let mut r = bench::memdesc::run();
            r.extend(bench::smp::run());
            r.extend(bench::translation::run());
            r.extend(boot_bench(board)?);
            r
        }
    };
    for r in &records {
        r.emit();
    }
    Ok(ExitCode::SUCCESS)
}
