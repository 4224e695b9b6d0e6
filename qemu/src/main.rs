//! `cargo qemu …`: the host side of the firmware.
//!
//! - `cargo qemu run [--board B] [--exit-when-ready] [--cpu C] [--mem M] [--el N] [--gic 2|3] [--smp N] [--append ARGS]`
//!   builds the firmware for board B (default `virt`), makes sure QEMU >= 10
//!   is installed, boots B's QEMU model and shows the decoded log.
//! - `cargo qemu test [FILTER…] [--host-only] [--no-host] [-j N]` runs every test.
//! - `cargo qemu bench <memdesc|translation|boot|balloon|all>` prints JSON lines.
//! - `cargo qemu runner ELF` is the cargo target runner.
//! - `cargo qemu setup` only installs what the others would (the Rust target,
//!   QEMU); CI calls it before its lint gates.

mod balloon;
mod bench;
mod boot;
mod cargo;
mod console_proto;
mod elf;
mod fdt;
mod image;
mod log;
mod machine;
mod qmp;
mod setup;
mod test;

use boot::{BootOptions, Ending};
use machine::Machine;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

const USAGE: &str = "usage:
  cargo qemu run [--board NAME] [--exit-when-ready] [--cpu max|cortex-a53|…] [--mem 1G] [--el 1|2|3] [--gic 2|3] [--smp 1-8] [--append \"ARGS\"]
  cargo qemu test [FILTER…] [--board NAME] [--host-only] [--no-host] [-j N]
  cargo qemu bench <memdesc|translation|boot|balloon|all> [--board NAME]
  cargo qemu balloon SIZE [--qmp PATH]   (a running `cargo qemu run`'s guest to SIZE)
  cargo qemu image --board NAME --out DIR
  boards: virt (default), raspi3b, raspi4b, imx8mp-evk, xlnx-zcu102
  cargo qemu runner ELF
  cargo qemu setup";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => cmd_run(&args[1..]),
        Some("runner") => cmd_runner(&args[1..]),
        Some("test") => cmd_test(&args[1..]),
        Some("bench") => cmd_bench(&args[1..]),
        Some("balloon") => balloon::cmd_balloon(&args[1..]),
        Some("setup") => cmd_setup(),
        Some("image") => cmd_image(&args[1..]),
        _ => Err(USAGE.to_string()),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn value<'a>(args: &'a [String], i: &mut usize, flag: &str) -> Result<&'a str, String> {
    *i += 1;
    args.get(*i)
        .map(String::as_str)
        .ok_or_else(|| format!("{flag} needs a value"))
}

fn leak(s: &str) -> &'static str {
    Box::leak(s.to_string().into_boxed_str())
}

fn ending_code(ending: Ending) -> ExitCode {
    match ending {
        Ending::Exited(c) => ExitCode::from(c.clamp(0, 255) as u8),
        Ending::Signalled(_) => ExitCode::from(130),
        Ending::TimedOut => ExitCode::from(124),
        Ending::Stopped => ExitCode::SUCCESS,
    }
}

/// `--board NAME`: `virt` or one of [`machine::BOARD_MODELS`].
fn board_name(name: &str) -> Result<&'static str, String> {
    std::iter::once(&"virt")
        .chain(machine::BOARD_MODELS)
        .find(|b| **b == name)
        .copied()
        .ok_or_else(|| {
            format!(
                "--board takes virt, {}, not {name:?}",
                machine::BOARD_MODELS.join(", ")
            )
        })
}

/// Finds `--board NAME` anywhere in `args` (so other options can refine the
/// board's machine), removing it; `virt` when absent.
fn take_board(args: &[String]) -> Result<(&'static str, Vec<String>), String> {
    let (board, rest) = take_board_option(args)?;
    Ok((board.unwrap_or("virt"), rest))
}

/// [`take_board`], `None` when `--board` is absent.
fn take_board_option(args: &[String]) -> Result<(Option<&'static str>, Vec<String>), String> {
    let mut rest = Vec::new();
    let mut board = None;
    let mut i = 0;
    while i < args.len() {
        if args[i] == "--board" {
            board = Some(board_name(value(args, &mut i, "--board")?)?);
        } else {
            rest.push(args[i].clone());
        }
        i += 1;
    }
    Ok((board, rest))
}

fn cmd_run(args: &[String]) -> Result<ExitCode, String> {
    let (board, args) = take_board(args)?;
    let args = args.as_slice();
    let mut machine = Machine::board(board, Machine::entry_els(board)[0]);
    let mut exit_when_ready = false;
    let mut append: Option<String> = None;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--exit-when-ready" => exit_when_ready = true,
            "--cpu" => machine.cpu = leak(value(args, &mut i, "--cpu")?),
            "--mem" => {
                let m = value(args, &mut i, "--mem")?;
                if machine::parse_size(m).is_none_or(|b| b == 0) {
                    return Err(format!("--mem takes a size like 512M, 1G or 4G, not {m:?}"));
                }
                machine.mem = leak(m);
            }
            "--el" => {
                machine.el = match value(args, &mut i, "--el")? {
                    "1" => 1,
                    "2" => 2,
                    "3" => 3,
                    other => return Err(format!("--el takes 1, 2 or 3, not {other:?}")),
                };
                if !Machine::entry_els(board).contains(&machine.el) {
                    return Err(format!(
                        "{board}'s QEMU model enters an ELF at EL{:?}, not EL{}",
                        Machine::entry_els(board),
                        machine.el
                    ));
                }
            }
            "--gic" => {
                machine.gic_version = match value(args, &mut i, "--gic")? {
                    "2" => 2,
                    "3" => 3,
                    other => return Err(format!("--gic takes 2 or 3, not {other:?}")),
                }
            }
            "--smp" => {
                machine.smp = match value(args, &mut i, "--smp")?.parse() {
                    Ok(n @ 1..=8) => n,
                    _ => return Err("--smp takes 1 to 8".to_string()),
                }
            }
            "--append" => append = Some(value(args, &mut i, "--append")?.to_string()),
            other => return Err(format!("unknown option {other}\n{USAGE}")),
        }
        i += 1;
    }
    setup::ensure_qemu()?;
    let elf = cargo::build_firmware(board)?;
    boot_interactive(&machine, &elf, append.as_deref(), exit_when_ready)
}

/// Boots an ELF with the log on stdout and a QMP socket; reports the balloon
/// device's view once the firmware is up.
fn boot_interactive(
    machine: &Machine,
    elf: &Path,
    append: Option<&str>,
    exit_when_ready: bool,
) -> Result<ExitCode, String> {
    let bytes = std::fs::read(elf).map_err(|e| format!("{}: {e}", elf.display()))?;
    let decoder = log::Decoder::new(&bytes)?;
    let qmp_path = std::env::temp_dir().join(format!("cargo-qemu-{}.qmp", std::process::id()));
    println!(
        "qemu: booting {} on {} [{}], QMP at {}",
        elf.display(),
        machine.board,
        machine.label(),
        qmp_path.display()
    );
    let ready = |l: &log::LogLine| l.message == "ready";
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
        stop_when: if exit_when_ready { Some(&ready) } else { None },
        on_started: Some(&qmp_report),
        paused: false,
    };
    let result = boot::boot(machine, elf, &decoder, &opts);
    let _ = std::fs::remove_file(&qmp_path);
    let b = result?;
    if !b.stderr.trim().is_empty() {
        eprintln!("{}", b.stderr.trim_end());
    }
    println!("qemu: {:?} after {:.1}s", b.ending, b.elapsed.as_secs_f64());
    Ok(ending_code(b.ending))
}

fn cmd_image(args: &[String]) -> Result<ExitCode, String> {
    let (board, args) = take_board_option(args)?;
    let board = board.ok_or("image needs --board NAME (a real board, not virt)")?;
    let mut out: Option<PathBuf> = None;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--out" => out = Some(PathBuf::from(value(&args, &mut i, "--out")?)),
            other => return Err(format!("unknown option {other}\n{USAGE}")),
        }
        i += 1;
    }
    let out = out.ok_or("image needs --out DIR")?;
    let elf = cargo::build_firmware(board)?;
    let written = image::write(board, &elf, &out)?;
    for f in &written.files {
        println!("image: wrote {}", f.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_setup() -> Result<ExitCode, String> {
    setup::ensure_target(cargo::TARGET)?;
    setup::ensure_qemu()?;
    println!(
        "qemu: the Rust target {} and QEMU >= {} are installed",
        cargo::TARGET,
        setup::MIN_MAJOR
    );
    Ok(ExitCode::SUCCESS)
}

fn cmd_runner(args: &[String]) -> Result<ExitCode, String> {
    let elf = PathBuf::from(args.first().ok_or("runner needs an ELF")?);
    setup::ensure_qemu()?;
    let bytes = std::fs::read(&elf).map_err(|e| format!("{}: {e}", elf.display()))?;
    match elf::read_tests(&bytes) {
        Ok(cases) => {
            // A test binary (cargo test --target …): run each of its tests once.
            let decoder = log::Decoder::new(&bytes)?;
            let machine = Machine::default();
            let (mut passed, mut failed, mut skipped) = (0, 0, 0);
            for case in cases {
                if case.ignored {
                    println!("test {} ... ignored", case.name);
                    skipped += 1;
                    continue;
                }
                let opts = BootOptions {
                    semihosting_args: vec![
                        "run_addr".into(),
                        case.addr.to_string(),
                        format!("entry_el={}", machine.el),
                        format!("mem_bytes={}", machine.mem_bytes()),
                    ],
                    append: None,
                    qmp: None,
                    timeout: Duration::from_secs(case.timeout.unwrap_or(60) as u64),
                    echo: false,
                    stop_when: None,
                    on_started: None,
                    paused: false,
                };
                let b = boot::boot(&machine, &elf, &decoder, &opts)?;
                match test::judge_embedded(b.ending, case.should_panic) {
                    Ok(()) => {
                        println!("test {} ... ok", case.name);
                        passed += 1;
                    }
                    Err(e) => {
                        println!("test {} ... FAILED: {e}\n{}", case.name, b.transcript());
                        failed += 1;
                    }
                }
            }
            println!("{passed} passed, {failed} failed, {skipped} skipped");
            Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Err(elf::ElfError::NotEmbeddedTest) => {
            boot_interactive(&Machine::default(), &elf, None, false)
        }
        Err(e) => Err(e.to_string()),
    }
}

fn cmd_test(args: &[String]) -> Result<ExitCode, String> {
    let mut t = test::TestArgs::default();
    let (board, args) = take_board_option(args)?;
    let args = args.as_slice();
    t.board = board;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--host-only" => t.host_only = true,
            "--no-host" => t.no_host = true,
            "-j" | "--jobs" => {
                t.jobs = Some(
                    value(args, &mut i, "-j")?
                        .parse()
                        .map_err(|_| "-j takes a number")?,
                )
            }
            f if f.starts_with('-') => return Err(format!("unknown option {f}\n{USAGE}")),
            f => t.filters.push(f.to_string()),
        }
        i += 1;
    }
    let tally = test::run(&t);
    println!(
        "{} passed, {} failed, {} skipped",
        tally.passed, tally.failed, tally.skipped
    );
    Ok(if tally.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn boot_bench(board: &'static str) -> Result<Vec<bench::Record>, String> {
    setup::ensure_qemu()?;
    let elf = cargo::build_firmware(board)?;
    bench::boot::run(&elf, board)
}

fn cmd_bench(args: &[String]) -> Result<ExitCode, String> {
    let (board, args) = take_board(args)?;
    let which = args.first().map(String::as_str).unwrap_or("all");
    let records = match which {
        "memdesc" => bench::memdesc::run(),
        "translation" => bench::translation::run(),
        "boot" => boot_bench(board)?,
        "balloon" => {
            setup::ensure_qemu()?;
            bench::balloon::run(&cargo::build_firmware("virt")?)?
        }
        "all" => {
            let mut r = bench::memdesc::run();
            r.extend(bench::translation::run());
            r.extend(boot_bench(board)?);
            r
        }
        other => return Err(format!("unknown benchmark {other}\n{USAGE}")),
    };
    for r in &records {
        r.emit();
    }
    Ok(ExitCode::SUCCESS)
}
