//! `cargo qemu test`: host tests, then every on-target embedded-test suite
//! (one QEMU boot per test and machine configuration, in parallel), then
//! system tests of the firmware binary itself. Output is libtest-like and ends
//! with one line `N passed, N failed, N skipped`.

use crate::boot::{boot, BootOptions, Ending};
use crate::elf::{read_tests, TestCase};
use crate::error::{Error, Result, Want};
use crate::fdt::DtbPatch;
use crate::log::Decoder;
use crate::machine::{Console, Machine};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

/// Totals over everything run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Tests that passed.
    pub passed: u64,
    /// Tests that failed (including crashes and timeouts).
    pub failed: u64,
    /// Tests not run (`#[ignore]`).
    pub skipped: u64,
}

impl Tally {
    fn add(&mut self, o: Tally) {
        self.passed += o.passed;
        self.failed += o.failed;
        self.skipped += o.skipped;
    }
}

/// What the command line asked for.
#[derive(Debug, Default, Clone)]
pub struct TestArgs {
    /// Substrings; a test runs if its full name contains any (all run if empty).
    pub filters: Vec<String>,
    /// Skip the host tests.
    pub no_host: bool,
    /// Skip the on-target and system tests.
    pub host_only: bool,
    /// Parallel QEMU instances (default: available cores).
    pub jobs: Option<usize>,
    /// Only this board (`--board`); `None` runs `virt` and every board model.
    pub board: Option<&'static str>,
    /// Run the on-target suites on a real board over this console.
    pub serial: Option<SerialBoard>,
}

/// A real board on a serial line (`--serial`).
#[derive(Debug, Clone)]
pub struct SerialBoard {
    /// Its console.
    pub port: crate::serial::PortSpec,
    /// The command that power-cycles it into the next test (`--power-cycle`).
    pub power_cycle: Option<String>,
    /// A file where `power_cycle` leaves the pid of a QEMU model it
    /// started, ended after the test (the CI proof of this path).
    pub model_pidfile: Option<PathBuf>,
    /// Through the resident loader (else `power_cycle` boots the ELF).
    pub loader: Option<crate::loader::LoaderUse>,
    /// Put before each test's name (`serial::loader::` in the CI proof).
    pub name_prefix: String,
    /// What the tests are told about the board (default: entered at EL2,
    /// the model's RAM).
    pub machine: Option<Machine>,
    /// `--serial qemu`: the board's QEMU model running the loader stands
    /// in for the board (at this EL, with this RAM).
    pub model: Option<Machine>,
}

/// Parses one `test result: ok. 12 passed; 0 failed; 1 ignored; ...` line.
pub fn parse_libtest_summary(line: &str) -> Option<Tally> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let num = |key: &str| -> Option<u64> {
        rest.split(';').find_map(|part| {
            let part = part.trim();
            let idx = part.find(key)?;
            part[..idx].split_whitespace().last()?.parse().ok()
        })
    };
    Some(Tally {
        passed: num(" passed")?,
        failed: num(" failed")?,
        skipped: num(" ignored").unwrap_or(0),
    })
}

/// Runs the host crates' tests (`cargo test` on the default members),
/// echoing their output and summing their libtest summaries.
fn host_tests(args: &TestArgs) -> Tally {
    println!("== host tests (cargo test -p memdesc -p hal -p qemu)");
    let mut cmd = crate::cargo::cargo();
    // `--no-fail-fast`: a failing test in one binary must not hide the
    // results of the binaries after it (the summary counts every test).
    cmd.args([
        "test",
        "-q",
        "--no-fail-fast",
        "-p",
        "memdesc",
        "-p",
        "hal",
        "-p",
        "qemu",
    ]);
    if !args.filters.is_empty() {
        cmd.arg("--").args(&args.filters);
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
    let mut tally = Tally::default();
    let status = match cmd.spawn() {
        Ok(mut child) => {
            if let Some(out) = child.stdout.take() {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    println!("{line}");
                    if let Some(t) = parse_libtest_summary(&line) {
                        tally.add(t);
                    }
                }
            }
            child.wait().ok()
        }
        Err(e) => {
            println!("cannot run cargo test: {e}");
            None
        }
    };
    // A build failure or a crashed test binary prints no summary line for
    // what it did not run: count it as a failure so it cannot pass silently.
    if !status.is_some_and(|s| s.success()) && tally.failed == 0 {
        println!("host tests: cargo test failed without a failing test (build error or crash)");
        tally.failed += 1;
    }
    tally
}

/// QEMU's default machine entered at `el` with a GICv`gic_version`.
fn gic(el: u8, gic_version: u8) -> Machine {
    Machine {
        el,
        gic_version,
        ..Machine::default()
    }
}

/// Which machines each suite (or test) runs on for `board`. On a board
/// model: every entry EL its QEMU model gives an ELF, the RAM sizes the
/// board can have for `memory_matches_qemu` (the ZCU102's 4 GiB is split
/// across its two DDR windows), and nothing for virt-only tests.
fn machines_for(board: &'static str, suite: &str, test: &str) -> Vec<Machine> {
    if board == "virt" {
        return virt_machines_for(suite, test);
    }
    let mut ms = board_machines_for(board, suite, test);
    // The serial path, proven on the models: semihosting off, the console
    // on a pty or socket that the host opens as it would a board's serial
    // port (`serial::open`), once per test at the model's first entry EL.
    let serial = SERIAL_PROOF
        .iter()
        .find(|(b, suites, _)| *b == board && suites.contains(&suite));
    if let (Some((_, _, console)), Some(first)) = (serial, ms.first()) {
        let m = Machine {
            semihosting: false,
            console: console(),
            ..first.clone()
        };
        ms.push(m);
    }
    ms
}

/// Boards whose serial path `cargo qemu test` proves, the suites it runs
/// that way, and the console each uses (raspi3b a pty as a tty, the
/// U-Boot-style ZCU102 a Unix socket as a lab's network port would be).
#[allow(clippy::type_complexity)]
const SERIAL_PROOF: &[(&str, &[&str], fn() -> Console)] = &[
    ("raspi3b", &["boot", "platform", "mmu"], || {
        Console::Pty(PathBuf::new())
    }),
    ("xlnx-zcu102", &["boot", "platform"], || {
        Console::UnixSocket(PathBuf::new())
    }),
];

fn board_machines_for(board: &'static str, suite: &str, test: &str) -> Vec<Machine> {
    let at_every_el = || -> Vec<Machine> {
        Machine::entry_els(board)
            .iter()
            .map(|&el| Machine::board(board, el))
            .collect()
    };
    let at_sizes = |el, sizes: [&'static str; 2]| -> Vec<Machine> {
        sizes
            .into_iter()
            .map(|mem| Machine {
                mem,
                ..Machine::board(board, el)
            })
            .collect()
    };
    match (suite, test) {
        ("platform", "virt_tree_contents") => vec![],
        // QEMU's i.MX UART model ignores UTS.LOOP: the bytes go out on the
        // line (into the defmt stream) instead of coming back.
        ("boot", "uart_loopback") if board == "imx8mp-evk" => vec![],
        ("platform", "memory_matches_qemu") => match board {
            "xlnx-zcu102" => at_sizes(1, ["1G", "4G"]),
            "imx8mp-evk" => at_sizes(2, ["512M", "2G"]),
            _ => at_every_el(),
        },
        // virt's devices (virtio-mmio, the PL031) are not on the boards.
        ("irq", "virtio_transport_interrupts_resolve_to_spis")
        | ("irq", "device_spi_is_routed_and_dispatched") => vec![],
        ("boot" | "platform" | "mmu" | "irq" | "smp", _) => at_every_el(),
        _ => vec![],
    }
}

/// `m` with four vCPUs.
fn smp4(m: Machine) -> Machine {
    Machine { smp: 4, ..m }
}

/// The `virt` rows. First matching row wins; `_` for the test matches
/// every test of the suite.
fn virt_machines_for(suite: &str, test: &str) -> Vec<Machine> {
    let m = |cpu, mem, el| Machine {
        cpu,
        mem,
        el,
        ..Machine::default()
    };
    // Semihosting off: every semihosting call goes over the console
    // protocol, as on a board without a debugger (hardware in the loop).
    let console = |cpu, mem, el| Machine {
        semihosting: false,
        ..m(cpu, mem, el)
    };
    match (suite, test) {
        ("boot", _) => vec![
            m("max", "1G", 1),
            m("max", "1G", 2),
            m("max", "1G", 3),
            m("cortex-a53", "1G", 1),
            console("max", "1G", 1),
        ],
        ("platform", "memory_matches_qemu") => {
            vec![
                m("max", "512M", 1),
                m("max", "1G", 1),
                m("max", "4G", 1),
                console("max", "1G", 1),
            ]
        }
        ("irq", _) => vec![
            gic(1, 2),
            gic(1, 3),
            gic(2, 2),
            gic(2, 3),
            gic(3, 2),
            gic(3, 3),
        ],
        ("platform", _) => vec![Machine::default(), console("max", "1G", 1)],
        ("mmu", "every_virtio_window_is_mapped_device") => vec![
            Machine::default(),
            Machine {
                dtb: Some(DtbPatch::SpreadVirtio),
                ..Machine::default()
            },
        ],
        ("mmu", _) => vec![
            m("max", "1G", 1),
            m("cortex-a53", "1G", 1),
            m("neoverse-v1", "1G", 1),
        ],
        // Four vCPUs on host threads (multi-threaded TCG): PSCI over HVC
        // (EL1) and SMC (EL2), the holding pen (EL3, no PSCI).
        ("smp", _) => vec![
            smp4(m("max", "1G", 1)),
            smp4(m("cortex-a53", "1G", 1)),
            smp4(m("max", "1G", 2)),
            smp4(m("max", "1G", 3)),
        ],
        _ => vec![Machine::default()],
    }
}

enum Check {
    /// An embedded-test case.
    Embedded(TestCase),
    /// A system test of the firmware binary.
    System(SystemTest),
    /// A QMP-driven balloon system test of the firmware binary.
    Balloon(crate::balloon::Scenario),
}

struct Job {
    /// Unique within the run (names temporary files).
    id: usize,
    full_name: String,
    machine: Machine,
    elf: usize,
    check: Check,
    /// Boot this file instead of the ELF (a board image), decoding with
    /// the ELF's defmt table.
    kernel: Option<PathBuf>,
    /// Run on this real board instead of QEMU.
    serial: Option<SerialBoard>,
}

impl Job {
    /// A job that boots ELF number `elf` itself on QEMU.
    fn new(id: usize, full_name: String, machine: Machine, elf: usize, check: Check) -> Self {
        Self {
            id,
            full_name,
            machine,
            elf,
            check,
            kernel: None,
            serial: None,
        }
    }
}

/// The embedded-test cases in the ELF at `path`.
pub(crate) fn read_cases(path: &std::path::Path) -> Result<Vec<TestCase>> {
    let bytes = std::fs::read(path).map_err(Error::io(path))?;
    read_tests(&bytes).map_err(|e| Error::Elf {
        path: path.to_path_buf(),
        what: e.to_string(),
    })
}

/// Builds `board`'s test suites, records each ELF in `elfs`, and calls
/// `each(elf index, full name, case)` for every case the filters take.
/// An ignored case is not passed on; it goes to `skipped` when
/// `count_ignored`.
fn for_each_suite_case(
    board: &'static str,
    prefix: &str,
    args: &TestArgs,
    elfs: &mut Vec<(String, PathBuf)>,
    skipped: &mut Vec<String>,
    count_ignored: bool,
    mut each: impl FnMut(usize, &str, String, TestCase),
) -> Result<()> {
    for art in crate::cargo::build_tests(board).map_err(Error::during("build"))? {
        let cases = read_cases(&art.path)?;
        let idx = elfs.len();
        elfs.push((art.name.clone(), art.path.clone()));
        for case in cases {
            let full = format!("{prefix}{}::{}", art.name, case.name);
            if !matches(&args.filters, &full) {
                continue;
            }
            if case.ignored {
                if count_ignored {
                    skipped.push(full);
                }
                continue;
            }
            each(idx, &art.name, full, case);
        }
    }
    Ok(())
}

/// A boot of the firmware binary with an expected ending.
#[derive(Clone, Copy)]
struct SystemTest {
    name: &'static str,
    append: Option<&'static str>,
    machine_el: u8,
    cpu: &'static str,
    /// Boot with QEMU's device tree changed this way.
    dtb: Option<DtbPatch>,
    /// Expected exit code, or `None` for "reaches ready".
    exit: Option<i32>,
    /// Texts the log must contain, each in some line.
    must_log: &'static [&'static str],
    /// QEMU must report over QMP that the guest powered itself off
    /// (`SHUTDOWN` with reason `guest-shutdown`): a semihosting exit, which
    /// also ends QEMU with status 0, sends no such event.
    guest_shutdown: bool,
    /// Which machines run it.
    on: On,
    /// `-m` instead of the machine's default.
    mem: Option<&'static str>,
    /// Boot a board model without the tool's device tree.
    without_dtb: bool,
    /// Boot what `cargo qemu image` writes, the way the real board's loader
    /// starts it (at EL2; the Pi's raw kernel8.img with the DTB in x0).
    image: bool,
    /// QEMU serves semihosting; false: the console protocol carries it.
    semihosting: bool,
    /// The firmware hangs: the host must end it at this many seconds
    /// (expected ending: timed out) with the log so far.
    hang_timeout: Option<u64>,
    /// The guest resets the machine: booted with `-no-reboot`, QEMU must
    /// report over QMP a `SHUTDOWN` with reason `guest-reset`.
    reset: bool,
}

/// Where a system test runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum On {
    /// QEMU virt, once, at `machine_el` with `cpu`.
    Virt,
    /// Each of these board models, at every entry EL it supports.
    Boards(&'static [&'static str]),
    /// Each of these board models at the EL given (skipped where unsupported).
    BoardsAt(&'static [&'static str], u8),
}

const ALL_BOARDS: &[&str] = crate::machine::BOARD_MODELS;

const SYSTEM: SystemTest = SystemTest {
    name: "",
    append: None,
    machine_el: 1,
    cpu: "max",
    dtb: None,
    exit: None,
    must_log: &["ready"],
    guest_shutdown: false,
    on: On::Virt,
    mem: None,
    without_dtb: false,
    image: false,
    semihosting: true,
    reset: false,
    hang_timeout: None,
};

/// System tests of the firmware on the board models.
const BOARD_SYSTEM_TESTS: &[SystemTest] = &[
    SystemTest {
        on: On::BoardsAt(ALL_BOARDS, 2),
        ..REENTRY
    },
    SystemTest {
        name: "ready_on_board",
        // An ELF with -dtb: QEMU puts the tree at the start of RAM, x0 = 0.
        must_log: &[
            "memory from the DTB at",
            "(start of RAM)",
            "MMU on",
            "ready",
        ],
        on: On::Boards(ALL_BOARDS),
        ..SYSTEM
    },
    SystemTest {
        name: "crash_report_and_exit_code",
        append: Some("selftest=data-abort"),
        exit: Some(hal::exit::CRASH),
        must_log: &["Data abort from the same EL"],
        on: On::Boards(ALL_BOARDS),
        ..SYSTEM
    },
    SystemTest {
        name: "stack_overflow_hits_guard_page",
        append: Some("selftest=stack-overflow"),
        exit: Some(hal::exit::CRASH),
        must_log: &["translation fault at level 3 on write"],
        on: On::BoardsAt(ALL_BOARDS, 3),
        ..SYSTEM
    },
    SystemTest {
        name: "log_survives_fault_mid_frame",
        append: Some("selftest=nested-log"),
        must_log: &["outer frame: before-after fault true"],
        on: On::BoardsAt(ALL_BOARDS, 3),
        ..SYSTEM
    },
    SystemTest {
        name: "panic_exit_code",
        append: Some("selftest=panic"),
        exit: Some(hal::exit::PANIC),
        must_log: &["panic: panicked at", "selftest panic"],
        on: On::BoardsAt(ALL_BOARDS, 3),
        ..SYSTEM
    },
    SystemTest {
        name: "poweroff_board",
        append: Some("selftest=poweroff"),
        exit: Some(hal::exit::SUCCESS),
        must_log: &["power off:"],
        guest_shutdown: true,
        on: On::Boards(ALL_BOARDS),
        ..SYSTEM
    },
    SystemTest {
        name: "reset_board",
        append: Some("selftest=reset"),
        exit: Some(0),
        must_log: &["reset: "],
        reset: true,
        on: On::Boards(ALL_BOARDS),
        ..SYSTEM
    },
    // A hang on the serial path (semihosting off, console on a pty): the
    // host's per-test timeout ends it, and the run goes on.
    SystemTest {
        name: "hang_is_ended_by_the_timeout",
        append: Some("selftest=hang"),
        must_log: &["selftest: hanging on purpose"],
        hang_timeout: Some(4),
        semihosting: false,
        on: On::Boards(&["raspi3b"]),
        ..SYSTEM
    },
    SystemTest {
        name: "no_dtb_memory_from_videocore_mailbox",
        must_log: &[
            "memory from the VideoCore mailbox (no DTB)",
            "RAM      0x000000000..0x03c000000 (960 MiB)",
            "ready",
        ],
        on: On::Boards(&["raspi3b", "raspi4b"]),
        without_dtb: true,
        ..SYSTEM
    },
    SystemTest {
        name: "no_dtb_memory_from_board_default",
        must_log: &["memory from the board default (no DTB)", "ready"],
        on: On::BoardsAt(&["imx8mp-evk", "xlnx-zcu102"], 2),
        without_dtb: true,
        ..SYSTEM
    },
    SystemTest {
        name: "image_boots_like_the_board",
        // The raw kernel8.img, entered at EL2 with the DTB in x0 (QEMU puts
        // it at 128 MiB, like the Pi firmware's), secondaries in the stub's
        // spin table.
        must_log: &[
            "entered at EL2",
            "memory from the DTB at 0x8000000 (x0)",
            "MMU on",
            "SMP: 4 core(s) online at EL1 (entered at EL2); start method: released from the boot stub's spin table",
            "ready",
        ],
        on: On::Boards(&["raspi3b", "raspi4b"]),
        image: true,
        ..SYSTEM
    },
    SystemTest {
        name: "image_boots_like_the_board",
        // memfw.elf as U-Boot's bootelf starts it: at EL2 (U-Boot passes no
        // DTB pointer; the tree is at the start of RAM), then, because
        // bootelf leaves U-Boot's MMU and caches on, entered again that way
        // (`selftest=reenter`: MMU and caches on at the entry).
        append: Some("selftest=reenter"),
        must_log: &[
            "entered at EL2",
            "memory from the DTB at",
            "second entry, MMU and caches were on: true, off before Rust code: true",
            "MMU on",
            "ready",
        ],
        on: On::Boards(&["imx8mp-evk", "xlnx-zcu102"]),
        image: true,
        ..SYSTEM
    },
    SystemTest {
        name: "raspi4b_memory_node_reported_incomplete",
        must_log: &[
            "device tree memory 0x0..0x3c000000 is incomplete on raspi4b",
            "RAM      0x000000000..0x03c000000 (960 MiB)",
            "ready",
        ],
        on: On::Boards(&["raspi4b"]),
        ..SYSTEM
    },
    SystemTest {
        name: "zcu102_4g_memory_node_is_split",
        mem: Some("4G"),
        must_log: &[
            "is wrong on xlnx-zcu102: RAM above 0x80000000 is at 0x800000000",
            "RAM      0x800000000..0x880000000 (2048 MiB)",
            "page array: 1048576 frames",
            "ready",
        ],
        on: On::BoardsAt(&["xlnx-zcu102"], 1),
        ..SYSTEM
    },
];

/// The second entry of `selftest=reenter`: U-Boot's `go`/`bootelf` leave
/// the MMU and caches on, so the firmware entered that way must clean and
/// turn them off, then boot to ready.
const REENTRY: SystemTest = SystemTest {
    name: "reentry_with_mmu_and_caches_on",
    append: Some("selftest=reenter"),
    must_log: &[
        "entering the image at",
        "second entry, MMU and caches were on: true, off before Rust code: true",
        "MMU on",
        "ready",
    ],
    ..SYSTEM
};

const SYSTEM_TESTS: &[SystemTest] = &[
    REENTRY,
    SystemTest {
        name: "ready_el1_max",
        ..SYSTEM
    },
    SystemTest {
        name: "ready_el2_max",
        machine_el: 2,
        ..SYSTEM
    },
    SystemTest {
        name: "ready_el3_a53",
        machine_el: 3,
        cpu: "cortex-a53",
        ..SYSTEM
    },
    SystemTest {
        name: "crash_report_and_exit_code",
        append: Some("selftest=data-abort"),
        exit: Some(hal::exit::CRASH),
        must_log: &["Data abort from the same EL"],
        ..SYSTEM
    },
    SystemTest {
        name: "stack_overflow_hits_guard_page",
        append: Some("selftest=stack-overflow"),
        exit: Some(hal::exit::CRASH),
        must_log: &["translation fault at level 3 on write"],
        ..SYSTEM
    },
    SystemTest {
        name: "log_survives_fault_mid_frame",
        append: Some("selftest=nested-log"),
        must_log: &["outer frame: before-after fault true"],
        ..SYSTEM
    },
    SystemTest {
        name: "psci_poweroff_hvc",
        append: Some("selftest=poweroff"),
        exit: Some(hal::exit::SUCCESS),
        must_log: &["PSCI SYSTEM_OFF over HVC"],
        guest_shutdown: true,
        ..SYSTEM
    },
    SystemTest {
        name: "psci_poweroff_smc_from_el2_entry",
        append: Some("selftest=poweroff"),
        machine_el: 2,
        exit: Some(hal::exit::SUCCESS),
        must_log: &["PSCI SYSTEM_OFF over SMC"],
        guest_shutdown: true,
        ..SYSTEM
    },
    SystemTest {
        name: "reset_psci_hvc",
        append: Some("selftest=reset"),
        exit: Some(0),
        must_log: &["reset: PSCI SYSTEM_RESET over HVC"],
        reset: true,
        ..SYSTEM
    },
    SystemTest {
        name: "reset_psci_smc_from_el2_entry",
        append: Some("selftest=reset"),
        machine_el: 2,
        exit: Some(0),
        must_log: &["reset: PSCI SYSTEM_RESET over SMC"],
        reset: true,
        ..SYSTEM
    },
    // Semihosting off: the crash report (defmt) and the exit status, sent
    // from inside the exception handler, come over the console protocol.
    SystemTest {
        name: "crash_report_and_exit_code_over_console",
        append: Some("selftest=data-abort"),
        exit: Some(hal::exit::CRASH),
        must_log: &["Data abort from the same EL"],
        semihosting: false,
        ..SYSTEM
    },
    SystemTest {
        name: "panic_exit_code_over_console",
        append: Some("selftest=panic"),
        exit: Some(hal::exit::PANIC),
        must_log: &["panic: panicked at", "selftest panic"],
        semihosting: false,
        ..SYSTEM
    },
    SystemTest {
        name: "panic_exit_code",
        append: Some("selftest=panic"),
        exit: Some(hal::exit::PANIC),
        // Only the panic handler prints these (the self-test's own line
        // says "panicking on purpose").
        must_log: &["panic: panicked at", "selftest panic"],
        ..SYSTEM
    },
    SystemTest {
        name: "dtb_overlapping_memory_is_typed_error",
        dtb: Some(DtbPatch::OverlappingMemory),
        exit: Some(hal::exit::BAD_DTB),
        must_log: &["device tree unusable", "MemoryOverlap"],
        ..SYSTEM
    },
    SystemTest {
        name: "dtb_memory_over_devices_is_typed_error",
        dtb: Some(DtbPatch::MemoryOverDevices),
        exit: Some(hal::exit::BAD_DTB),
        must_log: &["device tree unusable", "MemoryCoversDevices"],
        ..SYSTEM
    },
    SystemTest {
        name: "dtb_all_memory_reserved_is_typed_error",
        dtb: Some(DtbPatch::AllMemoryReserved),
        exit: Some(hal::exit::BAD_DTB),
        must_log: &["device tree unusable", "AllMemoryReserved"],
        ..SYSTEM
    },
    SystemTest {
        name: "dtb_almost_all_memory_reserved_is_typed_error",
        dtb: Some(DtbPatch::AlmostAllMemoryReserved),
        exit: Some(hal::exit::BAD_DTB),
        must_log: &["device tree unusable: memory bring-up failed", "NoHole"],
        ..SYSTEM
    },
    SystemTest {
        name: "dtb_virtio_in_memory_is_typed_error",
        dtb: Some(DtbPatch::VirtioInMemory),
        exit: Some(hal::exit::BAD_DTB),
        must_log: &["device tree unusable", "VirtioInMemory"],
        ..SYSTEM
    },
    SystemTest {
        name: "dtb_64g_claimed_on_1g_is_clamped",
        dtb: Some(DtbPatch::MemoryBeyondBacked),
        must_log: &[
            "RAM 0x80000000..0x1040000000 in the device tree is not there: 0 of 64512 MiB answer; range ignored",
            "page array: 262144 frames",
            "ready",
        ],
        ..SYSTEM
    },
];

/// Judges an embedded-test boot: `Ok`, or [`Error::Ending`] with how it
/// ended against what the test wanted.
pub fn judge_embedded(ending: Ending, should_panic: bool) -> Result<()> {
    let want = if should_panic {
        Want::Panic
    } else {
        Want::Pass
    };
    match (ending, want) {
        (Ending::Exited(0), Want::Pass) => Ok(()),
        (Ending::Exited(c), Want::Panic) if c == hal::exit::PANIC => Ok(()),
        (got, want) => Err(Error::Ending { got, want }),
    }
}

fn matches(filters: &[String], name: &str) -> bool {
    filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()))
}

fn push_event(events: &Mutex<Vec<(String, serde_json::Value)>>, e: (String, serde_json::Value)) {
    if let Ok(mut v) = events.lock() {
        v.push(e);
    }
}

/// True when QEMU reported that the guest itself asked for power-off (PSCI
/// SYSTEM_OFF), as opposed to exiting through semihosting or being killed.
pub fn guest_powered_off(events: &[(String, serde_json::Value)]) -> bool {
    events.iter().any(|(name, data)| {
        name == "SHUTDOWN"
            && data.get("reason").and_then(serde_json::Value::as_str) == Some("guest-shutdown")
    })
}

/// True when QEMU reported that the guest reset the machine (PSCI
/// SYSTEM_RESET, a watchdog) under `-no-reboot`.
pub fn guest_reset(events: &[(String, serde_json::Value)]) -> bool {
    events.iter().any(|(name, data)| {
        name == "SHUTDOWN"
            && data.get("reason").and_then(serde_json::Value::as_str) == Some("guest-reset")
    })
}

/// Boots one job and judges it: `Ok(wall time)` or the reason it failed
/// followed by its decoded log.
fn run_job(job: &Job, elf: &std::path::Path, decoder: &Decoder) -> Result<Duration> {
    let m = &job.machine;
    let mut semihosting_args = vec![
        format!("entry_el={}", m.el),
        format!("mem_bytes={}", m.expected_ram_bytes()),
        format!("cpu={}", m.cpu),
        format!("gic={}", m.gic_version),
        format!("smp={}", m.vcpus()),
    ];
    let ready = |l: &crate::log::LogLine| l.message == "ready";
    // System tests that must see the guest power off watch QMP events: QEMU
    // starts paused, and the watcher resumes it once connected.
    let qmp_path = match &job.check {
        Check::System(st) if st.guest_shutdown || st.reset => Some(std::env::temp_dir().join(
            format!("cargo-qemu-test-{}-{}.qmp", std::process::id(), job.id),
        )),
        _ => None,
    };
    let events = Mutex::new(Vec::<(String, serde_json::Value)>::new());
    let watch_events = || {
        let Some(path) = &qmp_path else { return };
        let mut q = match crate::qmp::Qmp::connect(path, Duration::from_secs(10)) {
            Ok(q) => q,
            Err(e) => {
                push_event(&events, ("qmp-unavailable".into(), e.to_string().into()));
                return;
            }
        };
        if let Err(e) = q.execute("cont", None) {
            push_event(&events, ("qmp-cont-failed".into(), e.to_string().into()));
            return;
        }
        while let Ok(e) = q.next_event() {
            push_event(&events, e);
        }
    };
    let opts = match &job.check {
        Check::Embedded(case) => {
            semihosting_args.splice(0..0, ["run_addr".to_string(), case.addr.to_string()]);
            BootOptions {
                semihosting_args,
                append: None,
                qmp: None,
                timeout: Duration::from_secs(case.timeout.unwrap_or(60) as u64),
                echo: false,
                stop_when: None,
                on_started: None,
                paused: false,
            }
        }
        // Its own boot: QMP, a driver thread and its own verdict.
        Check::Balloon(which) => return crate::balloon::system_test(m, elf, decoder, *which),
        Check::System(st) => BootOptions {
            semihosting_args,
            append: st.append,
            qmp: qmp_path.as_deref(),
            timeout: Duration::from_secs(st.hang_timeout.unwrap_or(60)),
            echo: false,
            stop_when: if st.exit.is_none() && st.hang_timeout.is_none() {
                Some(&ready)
            } else {
                None
            },
            on_started: qmp_path.is_some().then_some(&watch_events),
            paused: qmp_path.is_some(),
        },
    };
    let _model = job
        .serial
        .as_ref()
        .and_then(|s| s.model_pidfile.clone())
        .map(ModelPid);
    let b = match &job.serial {
        Some(board) => crate::boot::boot_board(
            m.board,
            &board.port,
            board.power_cycle.as_deref(),
            board.loader.as_ref(),
            elf,
            decoder,
            &opts,
        ),
        None => boot(m, elf, decoder, &opts),
    };
    if let Some(p) = &qmp_path {
        let _ = std::fs::remove_file(p);
    }
    let b = b?;
    let verdict = match &job.check {
        Check::Embedded(case) => judge_embedded(b.ending, case.should_panic),
        Check::Balloon(_) => Ok(()),
        Check::System(st) => match (st.exit, b.ending) {
            _ if st.hang_timeout.is_some() => match b.ending {
                Ending::TimedOut => Ok(()),
                got => Err(Error::Ending {
                    got,
                    want: Want::Hang,
                }),
            },
            (None, Ending::Stopped) => Ok(()),
            (Some(want), Ending::Exited(got)) if want == got => Ok(()),
            (want, got) => Err(Error::Ending {
                got,
                want: Want::Exit(want),
            }),
        }
        .and_then(|()| match st.must_log.iter().find(|t| !b.logged(t)) {
            None => Ok(()),
            Some(t) => Err(Error::Check(format!("log lacks {t:?}"))),
        })
        .and_then(|()| {
            let events = events.lock().map(|e| e.clone()).unwrap_or_default();
            if st.reset {
                if guest_reset(&events) {
                    Ok(())
                } else {
                    Err(Error::Check(format!(
                        "QEMU saw no guest reset (QMP SHUTDOWN, reason guest-reset); events: {events:?}"
                    )))
                }
            } else if !st.guest_shutdown || guest_powered_off(&events) {
                Ok(())
            } else {
                Err(Error::Check(format!(
                    "QEMU saw no guest power-off (QMP SHUTDOWN, reason guest-shutdown); events: {events:?}"
                )))
            }
        }),
    };
    verdict
        .map(|()| b.elapsed)
        .map_err(|e| e.with_log(b.transcript()))
}

/// Runs everything; returns the tally (the caller prints the final line).
/// Setup, build or tooling trouble (QEMU missing, a build error) counts as
/// one failure on top of whatever ran, so the summary line stays honest.
pub fn run(args: &TestArgs) -> Tally {
    let mut tally = Tally::default();
    if !args.no_host {
        tally.add(host_tests(args));
    }
    if args.host_only {
        return tally;
    }
    match run_target(args) {
        Ok(t) => tally.add(t),
        Err(e) => {
            println!("error: {e}");
            tally.failed += 1;
        }
    }
    tally
}

/// A real board over its serial console: every test of the suites the
/// board's model runs, once each, with semihosting off. The board is
/// taken to enter at EL2, as the Pi firmware and U-Boot hand over.
fn add_serial_jobs(
    board: &'static str,
    serial: &SerialBoard,
    args: &TestArgs,
    elfs: &mut Vec<(String, PathBuf)>,
    jobs: &mut Vec<Job>,
    skipped: &mut Vec<String>,
) -> Result<()> {
    for_each_suite_case(
        board,
        &serial.name_prefix,
        args,
        elfs,
        skipped,
        true,
        |idx, suite, full, case| {
            if board_machines_for(board, suite, &case.name).is_empty() {
                return;
            }
            jobs.push(Job {
                serial: Some(serial.clone()),
                ..Job::new(
                    jobs.len(),
                    full,
                    serial.machine.clone().unwrap_or_else(|| real_board(board)),
                    idx,
                    Check::Embedded(case),
                )
            });
        },
    )
}

/// Ends the QEMU model a `--power-cycle` command started (its pid in the
/// file), when the test is over.
struct ModelPid(PathBuf);

impl Drop for ModelPid {
    fn drop(&mut self) {
        if let Some(pid) = std::fs::read_to_string(&self.0)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            // SAFETY: kill(2) with a pid our own command started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        for ext in ["pid", "sock", "dtb"] {
            let _ = std::fs::remove_file(self.0.with_extension(ext));
        }
    }
}

/// Single-quotes `s` for `sh`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The `--power-cycle` command a user would write for a QEMU board model:
/// start the model on `$MEMFW_ELF` in the background with its console on
/// the Unix socket `sock` (QEMU waits for the host to connect), and note
/// its pid in `pidfile`.
fn model_power_cycle(model: &Machine, dtb: &std::path::Path, pidfile: &std::path::Path) -> String {
    let marker = "@MEMFW_ELF@";
    let cmd = model.command_with_dtb(std::path::Path::new(marker), &[], None, None, dtb);
    let mut words = vec![sh_quote(&cmd.get_program().to_string_lossy())];
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        words.push(if a == marker {
            "\"$MEMFW_ELF\"".to_string()
        } else {
            sh_quote(&a)
        });
    }
    format!(
        "{} </dev/null >/dev/null 2>&1 & echo $! > {}",
        words.join(" "),
        sh_quote(&pidfile.to_string_lossy())
    )
}

/// The serial runner's real-board path (`--serial unix:PATH --power-cycle
/// CMD`) against a board model: the command starts the model on each test
/// ELF, the host connects to its console socket afterwards.
fn power_cycle_proof_jobs(
    board: &'static str,
    elfs: &[(String, PathBuf)],
    jobs: &mut Vec<Job>,
    args: &TestArgs,
) -> Result<()> {
    // The last `boot` ELF built is this board's (virt's comes first).
    let Some(boot_idx) = elfs.iter().rposition(|(n, _)| n == "boot") else {
        return Ok(());
    };
    let cases = read_cases(&elfs[boot_idx].1)?;
    for name in ["runs_at_el1", "bss_is_zeroed", "data_abort_report"] {
        let full = format!("serial::power_cycle::boot::{name}");
        let Some(case) = cases.iter().find(|c| c.name == name) else {
            continue;
        };
        if !matches(&args.filters, &full) {
            continue;
        }
        let id = jobs.len();
        let tmp = |ext: &str| {
            std::env::temp_dir().join(format!("cargo-qemu-{}-pc{id}.{ext}", std::process::id()))
        };
        let sock = tmp("sock");
        let model = Machine {
            semihosting: false,
            console: Console::UnixSocket(sock.clone()),
            ..Machine::board(board, Machine::entry_els(board)[0])
        };
        let made = crate::fdt::board_dtb(&model, &std::env::temp_dir())?;
        let dtb = tmp("dtb");
        std::fs::rename(&made, &dtb).map_err(Error::io(&dtb))?;
        let pidfile = tmp("pid");
        jobs.push(Job {
            serial: Some(SerialBoard {
                port: crate::serial::PortSpec::Unix(sock),
                power_cycle: Some(model_power_cycle(&model, &dtb, &pidfile)),
                model_pidfile: Some(pidfile),
                loader: None,
                name_prefix: String::new(),
                machine: None,
                model: None,
            }),
            ..Job::new(
                id,
                full,
                model.clone(),
                boot_idx,
                Check::Embedded(case.clone()),
            )
        });
    }
    Ok(())
}

/// What the tests are told about a real board: entered at EL2, its RAM as
/// the model's, semihosting off.
fn real_board(board: &'static str) -> Machine {
    Machine {
        semihosting: false,
        ..Machine::board(board, 2)
    }
}

/// Builds `board`'s test suites and firmware and queues their jobs.
fn add_board_jobs(
    board: &'static str,
    args: &TestArgs,
    elfs: &mut Vec<(String, PathBuf)>,
    jobs: &mut Vec<Job>,
    skipped: &mut Vec<String>,
) -> Result<()> {
    // An ignored test is counted once, on virt.
    let count_ignored = board == "virt";
    for_each_suite_case(
        board,
        "",
        args,
        elfs,
        skipped,
        count_ignored,
        |idx, suite, full, case| {
            for machine in machines_for(board, suite, &case.name) {
                jobs.push(Job::new(
                    jobs.len(),
                    full.clone(),
                    machine,
                    idx,
                    Check::Embedded(case.clone()),
                ));
            }
        },
    )?;
    if board == "raspi3b" {
        power_cycle_proof_jobs(board, elfs, jobs, args)?;
    }
    let firmware = crate::cargo::build_firmware(board).map_err(Error::during("build"))?;
    let fw_idx = elfs.len();
    // The board's image, written where `cargo qemu image` would put it.
    let image_kernel = if board == "virt" {
        None
    } else {
        let dir = firmware.with_file_name(format!("image-{board}"));
        let written =
            crate::image::write(board, &firmware, &dir).map_err(Error::during("image"))?;
        let name = if board.starts_with("raspi") {
            "kernel8.img"
        } else {
            "memfw.elf"
        };
        written.files.into_iter().find(|f| f.ends_with(name))
    };
    elfs.push(("firmware".into(), firmware));
    for st in system_tests_for(board) {
        let full = format!("system::{}", st.test.name);
        if matches(&args.filters, &full) {
            let kernel =
                if st.test.image {
                    Some(image_kernel.clone().ok_or_else(|| {
                        Error::Missing("image: no board image was written".into())
                    })?)
                } else {
                    None
                };
            jobs.push(Job {
                kernel,
                ..Job::new(jobs.len(), full, st.machine, fw_idx, Check::System(st.test))
            });
        }
    }
    if board == "virt" {
        use crate::balloon::Scenario::*;
        let on = |cpu, el| Machine {
            cpu,
            el,
            ..Machine::default()
        };
        let gicv3 = Machine {
            gic_version: 3,
            ..Machine::default()
        };
        for (name, which, machine) in [
            ("balloon_1g_to_512m_and_back", RoundTrip, on("max", 1)),
            (
                "balloon_1g_to_512m_and_back",
                RoundTrip,
                on("cortex-a53", 1),
            ),
            ("balloon_1g_to_512m_and_back", RoundTrip, on("max", 2)),
            ("balloon_1g_to_512m_and_back", RoundTrip, gicv3.clone()),
            ("balloon_idle_costs_no_host_cpu", IdleCpu, on("max", 1)),
            ("balloon_idle_costs_no_host_cpu", IdleCpu, gicv3.clone()),
            ("balloon_free_page_reporting", Reporting, on("max", 1)),
            (
                "balloon_touch_of_ballooned_frame_faults",
                TouchFaults,
                on("max", 1),
            ),
            ("balloon_deflate_on_oom", OomDeflates, on("max", 1)),
            (
                "balloon_deflate_on_oom_for_table_memory",
                TableOom(true),
                on("max", 1),
            ),
            (
                "balloon_table_memory_oom_without_the_feature",
                TableOom(false),
                on("max", 1),
            ),
            // No FEAT_BBM level 2, and still 64 KiB chunks (table pool).
            (
                "balloon_moves_64k_chunks_without_bbm2",
                SmallChunks,
                on("cortex-a53", 1),
            ),
            ("balloon_100_random_cycles", Cycles(100, 1), on("max", 1)),
            ("balloon_100_random_cycles", Cycles(100, 1), on("max", 2)),
            // No FEAT_BBM level 2, in 1 MiB steps (2 MiB chunks alone
            // would stop 256 pages short of every other target).
            (
                "balloon_100_random_cycles",
                Cycles(100, 1),
                on("cortex-a53", 1),
            ),
        ] {
            let full = format!("system::{name}");
            if matches(&args.filters, &full) {
                jobs.push(Job::new(
                    jobs.len(),
                    full,
                    machine,
                    fw_idx,
                    Check::Balloon(which),
                ));
            }
        }
    }
    Ok(())
}

/// A system test with the machine it boots.
struct PlannedSystemTest {
    test: SystemTest,
    machine: Machine,
}

/// The system tests for `board`, each with its machine.
fn system_tests_for(board: &'static str) -> Vec<PlannedSystemTest> {
    let mut out = Vec::new();
    if board == "virt" {
        for st in SYSTEM_TESTS {
            let machine = Machine {
                cpu: st.cpu,
                el: st.machine_el,
                dtb: st.dtb,
                mem: st.mem.unwrap_or(Machine::default().mem),
                semihosting: st.semihosting,
                no_reboot: st.reset,
                ..Machine::default()
            };
            out.push(PlannedSystemTest { test: *st, machine });
        }
        return out;
    }
    for st in BOARD_SYSTEM_TESTS {
        let on_board = match st.on {
            On::Virt => false,
            On::Boards(bs) | On::BoardsAt(bs, _) => bs.contains(&board),
        };
        if st.image && on_board {
            // The Pi firmware and U-Boot both hand over at EL2.
            out.push(PlannedSystemTest {
                test: *st,
                machine: Machine::board(board, 2),
            });
            continue;
        }
        let els: Vec<u8> = match st.on {
            _ if st.image => continue,
            On::Virt => continue,
            On::Boards(bs) if bs.contains(&board) => Machine::entry_els(board).to_vec(),
            On::BoardsAt(bs, el) if bs.contains(&board) => {
                if Machine::entry_els(board).contains(&el) {
                    vec![el]
                } else {
                    // The nearest EL the model has (raspi: only EL3).
                    Machine::entry_els(board)[..1].to_vec()
                }
            }
            _ => continue,
        };
        for el in els {
            let base = Machine::board(board, el);
            // Power-off needs PSCI or a board power-off register; the
            // ZCU102 entered at EL3 has neither (no TF-A, PMU not modelled).
            let can_power_off = base.psci_method().is_some()
                || hal::board::by_name(board)
                    .is_some_and(|b| b.power_off != hal::board::PowerOff::Psci);
            if st.guest_shutdown && !can_power_off {
                continue;
            }
            // A reset needs PSCI or the Pi's watchdog.
            let can_reset = base.psci_method().is_some()
                || hal::board::by_name(board).is_some_and(|b| {
                    matches!(b.power_off, hal::board::PowerOff::BcmWatchdog { .. })
                });
            if st.reset && !can_reset {
                continue;
            }
            let machine = Machine {
                mem: st.mem.unwrap_or(base.mem),
                without_dtb: st.without_dtb,
                no_reboot: st.reset,
                semihosting: st.semihosting,
                console: if st.semihosting {
                    Console::Stdio
                } else {
                    Console::Pty(PathBuf::new())
                },
                ..base
            };
            out.push(PlannedSystemTest { test: *st, machine });
        }
    }
    out
}

/// The on-target and system tests.
fn run_target(args: &TestArgs) -> Result<Tally> {
    let mut tally = Tally::default();
    crate::setup::ensure_qemu().map_err(Error::during("setup"))?;
    let boards: Vec<&'static str> = match args.board {
        Some(b) => vec![b],
        None => std::iter::once("virt")
            .chain(crate::machine::BOARD_MODELS.iter().copied())
            .collect(),
    };
    let mut elfs: Vec<(String, PathBuf)> = Vec::new();
    let mut jobs = Vec::new();
    let mut skipped = Vec::new();
    if let (Some(serial), Some(board)) = (&args.serial, args.board) {
        println!(
            "== building on-target tests for {board} (serial: {:?})",
            serial.port
        );
        let model = match &serial.model {
            Some(m) => Some(
                crate::loader_model::LoaderModel::start(m.clone(), false)
                    .map_err(Error::during("qemu"))?,
            ),
            None => None,
        };
        let serial = match &model {
            Some(m) => m.serial_board(""),
            None => serial.clone(),
        };
        add_serial_jobs(board, &serial, args, &mut elfs, &mut jobs, &mut skipped)?;
        return run_jobs(&elfs, jobs, &skipped, Some(1));
    }
    for &board in &boards {
        println!("== building on-target tests and firmware for {board}");
        add_board_jobs(board, args, &mut elfs, &mut jobs, &mut skipped)?;
    }

    let target = run_jobs(&elfs, jobs, &skipped, args.jobs)?;
    tally.add(target);
    for &(board, unix, suites) in LOADER_PROOF {
        if boards.contains(&board) {
            tally.add(loader_proof(board, unix, suites, args)?);
        }
    }
    // `--labgrid` against a board model through a real coordinator and
    // exporter on this machine (crate::labgrid::ci).
    if boards.contains(&crate::labgrid::ci::BOARD) {
        tally.add(crate::labgrid::ci::proof(&args.filters));
    }
    Ok(tally)
}

/// Boards whose serial path through the resident loader `cargo qemu test`
/// proves on one QEMU model kept across the run (console on a pty, or a
/// Unix socket), and the suites it runs that way (all: every suite).
/// Only `boot` by default: a QEMU model takes console input at about
/// 2 KiB/s, so each first upload of a suite's image costs 2-3 minutes
/// (`cargo qemu test --board B --serial qemu` runs every suite).
const LOADER_PROOF: &[(&str, bool, &[&str])] = &[
    ("raspi3b", true, &["boot"]),
    ("xlnx-zcu102", true, &["boot"]),
];

/// The serial runner through the loader against `board`'s model (as
/// `--serial qemu` runs it), then the loader's own proofs on that model:
/// corrupted frames, a host vanishing mid-transfer, the skip on a rerun.
fn loader_proof(
    board: &'static str,
    unix: bool,
    suites: &[&str],
    args: &TestArgs,
) -> Result<Tally> {
    let prefix = "serial::loader::";
    let mut proof_args = args.clone();
    if proof_args.filters.is_empty() && !suites.is_empty() {
        proof_args.filters = suites.iter().map(|s| format!("{prefix}{s}::")).collect();
    }
    let mut elfs = Vec::new();
    let mut jobs = Vec::new();
    let mut skipped = Vec::new();
    let planned = SerialBoard {
        port: crate::serial::PortSpec::Unix(PathBuf::new()),
        power_cycle: None,
        model_pidfile: None,
        loader: None,
        name_prefix: prefix.into(),
        machine: None,
        model: None,
    };
    add_serial_jobs(
        board,
        &planned,
        &proof_args,
        &mut elfs,
        &mut jobs,
        &mut skipped,
    )?;
    let extra = crate::loader_model::PROOFS
        .iter()
        .map(|p| format!("{prefix}{}", p.name))
        .filter(|n| matches(&args.filters, n))
        .count();
    if jobs.is_empty() && extra == 0 {
        return Ok(Tally::default());
    }
    println!("== serial path through the resident loader on one {board} model");
    let started = std::time::Instant::now();
    let model = crate::loader_model::LoaderModel::start(Machine::board(board, 2), unix)
        .map_err(Error::during("qemu"))?;
    let serial = model.serial_board(prefix);
    for j in &mut jobs {
        j.serial = Some(serial.clone());
        j.machine = serial.machine.clone().unwrap_or_else(|| real_board(board));
    }
    let mut tally = run_jobs(&elfs, jobs, &skipped, Some(1))?;
    let decoders = decoders(&elfs)?;
    for proof in crate::loader_model::PROOFS {
        let full = format!("{prefix}{}", proof.name);
        if !matches(&args.filters, &full) {
            continue;
        }
        let label = model.machine.label();
        match (proof.run)(&model, &elfs, &decoders) {
            Ok(t) => {
                println!("test {full} [{label}] ... ok ({:.1}s)", t.as_secs_f64());
                tally.passed += 1;
            }
            Err(e) => {
                println!("test {full} [{label}] ... FAILED\n---- {full} ----\n{e}");
                tally.failed += 1;
            }
        }
    }
    println!(
        "serial path through the loader on {board}: {} passed, {} failed in {:.1}s",
        tally.passed,
        tally.failed,
        started.elapsed().as_secs_f64()
    );
    Ok(tally)
}

/// The serial runner on its own (`--labgrid`'s CI proof): `board`'s
/// suites over `serial`, the tests `filters` select, each name prefixed
/// with `prefix`.
pub fn run_on_serial_board(
    board: &'static str,
    serial: &SerialBoard,
    filters: &[String],
    prefix: &str,
) -> Result<Tally> {
    let args = TestArgs {
        filters: filters.to_vec(),
        ..TestArgs::default()
    };
    let (mut elfs, mut jobs, mut skipped) = (Vec::new(), Vec::new(), Vec::new());
    add_serial_jobs(board, serial, &args, &mut elfs, &mut jobs, &mut skipped)?;
    for j in &mut jobs {
        j.full_name.insert_str(0, prefix);
    }
    let skipped: Vec<String> = skipped.iter().map(|s| format!("{prefix}{s}")).collect();
    run_jobs(&elfs, jobs, &skipped, Some(1))
}

/// The defmt decoder of each built ELF.
fn decoders(elfs: &[(String, PathBuf)]) -> Result<Vec<Decoder>> {
    elfs.iter().map(|(_, p)| Decoder::read(p)).collect()
}

/// Runs `jobs` on `jobs_in_parallel` workers (default: the available
/// cores), printing one `test NAME [MACHINE] ... ok|FAILED` line per job,
/// then the decoded log of each failure, then the `on-target:` tally.
/// `cargo qemu test` and the target runner both come through here.
fn run_jobs(
    elfs: &[(String, PathBuf)],
    jobs: Vec<Job>,
    skipped: &[String],
    jobs_in_parallel: Option<usize>,
) -> Result<Tally> {
    let decoders = decoders(elfs)?;
    let n_jobs = jobs_in_parallel
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
        .max(1);
    println!(
        "== running {} on-target boots on {} parallel QEMU instances",
        jobs.len(),
        n_jobs
    );
    for s in skipped {
        println!("test {s} ... ignored");
    }

    let queue = Mutex::new(jobs.into_iter().collect::<VecDeque<_>>());
    let results = Mutex::new((
        Tally {
            skipped: skipped.len() as u64,
            ..Tally::default()
        },
        Vec::<String>::new(),
    ));
    std::thread::scope(|s| {
        for _ in 0..n_jobs {
            s.spawn(|| loop {
                let Some(job) = queue.lock().ok().and_then(|mut q| q.pop_front()) else {
                    return;
                };
                let kernel = job.kernel.as_deref().unwrap_or(&elfs[job.elf].1);
                let verdict = run_job(&job, kernel, &decoders[job.elf]);
                let Ok(mut r) = results.lock() else { return };
                match verdict {
                    Ok(t) => {
                        println!(
                            "test {} [{}] ... ok ({:.1}s)",
                            job.full_name,
                            job.machine.label(),
                            t.as_secs_f64()
                        );
                        r.0.passed += 1;
                    }
                    Err(e) => {
                        println!(
                            "test {} [{}] ... FAILED",
                            job.full_name,
                            job.machine.label()
                        );
                        r.0.failed += 1;
                        r.1.push(format!(
                            "---- {} [{}] ----\n{e}",
                            job.full_name,
                            job.machine.label()
                        ));
                    }
                }
            });
        }
    });
    let (target, failures) = results
        .into_inner()
        .map_err(|_| Error::Missing("qemu: a test worker panicked".into()))?;
    if !failures.is_empty() {
        println!("\nfailures:\n");
        for f in &failures {
            println!("{f}");
        }
    }
    println!(
        "on-target: {} passed, {} failed, {} skipped",
        target.passed, target.failed, target.skipped
    );
    Ok(target)
}

/// The target runner's job: every test of one embedded-test ELF on
/// `machine`, through [`run_jobs`]; the suite is the ELF's name without
/// cargo's hash.
pub fn run_elf(elf: &std::path::Path, machine: Machine) -> Result<Tally> {
    let cases = read_cases(elf)?;
    let stem = elf
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let suite = suite_name(&stem).to_string();
    let mut jobs = Vec::new();
    let mut skipped = Vec::new();
    for case in cases {
        let full = format!("{suite}::{}", case.name);
        if case.ignored {
            skipped.push(full);
            continue;
        }
        jobs.push(Job::new(
            jobs.len(),
            full,
            machine.clone(),
            0,
            Check::Embedded(case),
        ));
    }
    run_jobs(&[(suite, elf.to_path_buf())], jobs, &skipped, Some(1))
}

/// `boot-0123abcd` (cargo's test binary name) -> `boot`.
fn suite_name(stem: &str) -> &str {
    match stem.rsplit_once('-') {
        Some((name, hash)) if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => {
            name
        }
        _ => stem,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtest_summaries() {
        assert_eq!(
            parse_libtest_summary("test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s"),
            Some(Tally { passed: 12, failed: 0, skipped: 1 })
        );
        assert_eq!(
            parse_libtest_summary(
                "test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out"
            ),
            Some(Tally {
                passed: 3,
                failed: 2,
                skipped: 0
            })
        );
        assert_eq!(parse_libtest_summary("running 3 tests"), None);
    }

    #[test]
    fn exit_code_mapping() {
        assert!(judge_embedded(Ending::Exited(0), false).is_ok());
        assert!(judge_embedded(Ending::Exited(0), true).is_err());
        assert!(judge_embedded(Ending::Exited(hal::exit::PANIC), true).is_ok());
        assert!(judge_embedded(Ending::Exited(hal::exit::PANIC), false).is_err());
        // A crash is never a pass, not even for should_panic.
        let crash = judge_embedded(Ending::Exited(hal::exit::CRASH), true).unwrap_err();
        assert!(matches!(
            crash,
            Error::Ending { got: Ending::Exited(c), want: Want::Panic } if c == hal::exit::CRASH
        ));
        assert!(crash.to_string().contains("crashed"));
        assert!(judge_embedded(Ending::Signalled(9), false).is_err());
    }

    #[test]
    fn a_timeout_and_a_qemu_exit_are_told_apart_by_the_variant() {
        let timeout = judge_embedded(Ending::TimedOut, false).unwrap_err();
        assert!(matches!(
            timeout,
            Error::Ending {
                got: Ending::TimedOut,
                want: Want::Pass
            }
        ));
        assert_eq!(timeout.to_string(), "timed out");
        let exit = judge_embedded(Ending::Exited(3), false).unwrap_err();
        assert!(matches!(
            exit,
            Error::Ending {
                got: Ending::Exited(3),
                ..
            }
        ));
        assert_eq!(exit.to_string(), "QEMU exited with status 3");
        // With the log attached the verdict is still there to match on.
        let logged = exit.with_log("   0.000001 INFO  ready".into());
        assert!(matches!(
            logged.root(),
            Error::Ending {
                got: Ending::Exited(3),
                ..
            }
        ));
        assert_eq!(
            logged.to_string(),
            "QEMU exited with status 3\n   0.000001 INFO  ready"
        );
    }

    #[test]
    fn irq_suite_runs_on_both_gics_at_every_el() {
        let ms = machines_for("virt", "irq", "anything");
        for gic in [2, 3] {
            for el in [1, 2, 3] {
                assert!(ms.iter().any(|m| m.gic_version == gic && m.el == el));
            }
        }
        // Every other suite stays on QEMU's default GICv2.
        for suite in ["boot", "platform", "mmu", "other"] {
            assert!(machines_for("virt", suite, "x")
                .iter()
                .all(|m| m.gic_version == 2));
        }
    }

    #[test]
    fn matrix_covers_every_el_and_both_cpus_for_boot() {
        let ms = machines_for("virt", "boot", "anything");
        for el in 1..=3 {
            assert!(ms.iter().any(|m| m.el == el));
        }
        assert!(ms.iter().any(|m| m.cpu == "cortex-a53"));
        let mem: Vec<u64> = machines_for("virt", "platform", "memory_matches_qemu")
            .iter()
            .filter(|m| m.semihosting)
            .map(Machine::mem_bytes)
            .collect();
        assert_eq!(mem, vec![512 << 20, 1 << 30, 4 << 30]);
        assert_eq!(machines_for("virt", "other", "x"), vec![Machine::default()]);
    }

    /// Every board model runs the boot, platform and mmu suites at each
    /// entry EL its model has, and the board system tests.
    #[test]
    fn matrix_covers_every_board_model() {
        for &b in crate::machine::BOARD_MODELS {
            for suite in ["boot", "platform", "mmu"] {
                let els: Vec<u8> = machines_for(b, suite, "any")
                    .iter()
                    .filter(|m| m.console == Console::Stdio)
                    .map(|m| m.el)
                    .collect();
                assert_eq!(els, Machine::entry_els(b), "{b} {suite}");
                assert!(machines_for(b, suite, "any").iter().all(|m| m.board == b));
            }
            assert!(machines_for(b, "platform", "virt_tree_contents").is_empty());
            // The generic-timer interrupt test runs on every board at every
            // entry EL; virt's device tests do not.
            let irq: Vec<u8> = machines_for(b, "irq", "timer_interrupt_wakes_wfi_once")
                .iter()
                .map(|m| m.el)
                .collect();
            assert_eq!(irq, Machine::entry_els(b), "{b} irq");
            assert!(machines_for(b, "irq", "device_spi_is_routed_and_dispatched").is_empty());
            let sys: Vec<&str> = system_tests_for(b).iter().map(|p| p.test.name).collect();
            for name in [
                "ready_on_board",
                "reentry_with_mmu_and_caches_on",
                "crash_report_and_exit_code",
            ] {
                assert!(sys.contains(&name), "{b}: {name}");
            }
            assert!(system_tests_for(b).iter().all(|p| p.machine.board == b));
        }
        let zcu: Vec<u64> = machines_for("xlnx-zcu102", "platform", "memory_matches_qemu")
            .iter()
            .map(Machine::mem_bytes)
            .collect();
        assert!(zcu.contains(&(4 << 30)), "the split DDR is exercised");
        // virt runs no board-only test.
        assert!(system_tests_for("virt").iter().all(|p| p.machine.is_virt()));
    }

    /// The boot and platform suites also run with semihosting off, over the
    /// console protocol, with a label that says so.
    #[test]
    fn boot_and_platform_run_over_the_console_protocol() {
        for (suite, test) in [
            ("boot", "runs_at_el1"),
            ("platform", "memory_matches_qemu"),
            ("platform", "virt_tree_contents"),
        ] {
            let ms = machines_for("virt", suite, test);
            let console: Vec<_> = ms.iter().filter(|m| !m.semihosting).collect();
            assert_eq!(console.len(), 1, "{suite}::{test}");
            assert!(console[0].label().contains("semihosting=off"));
            assert!(ms.iter().any(|m| m.semihosting), "{suite}::{test}");
        }
        assert!(machines_for("virt", "mmu", "x")
            .iter()
            .all(|m| m.semihosting));
    }

    /// raspi3b and the ZCU102 run their suites over a serial port too
    /// (semihosting off, a pty and a socket), once per test.
    #[test]
    fn serial_path_runs_on_raspi3b_and_zcu102() {
        for (board, suites, kind) in [
            ("raspi3b", &["boot", "platform", "mmu"][..], "serial=pty"),
            (
                "xlnx-zcu102",
                &["boot", "platform"][..],
                "serial=unix-socket",
            ),
        ] {
            for suite in suites {
                let serial: Vec<Machine> = machines_for(board, suite, "t")
                    .into_iter()
                    .filter(|m| m.console != Console::Stdio)
                    .collect();
                assert_eq!(serial.len(), 1, "{board} {suite}");
                assert!(!serial[0].semihosting);
                assert!(serial[0].label().ends_with(kind), "{}", serial[0].label());
            }
        }
        assert!(machines_for("raspi4b", "boot", "t")
            .iter()
            .all(|m| m.console == Console::Stdio));
        assert!(machines_for("xlnx-zcu102", "platform", "virt_tree_contents").is_empty());
    }

    #[test]
    fn power_cycle_command_for_a_model() {
        let m = Machine {
            semihosting: false,
            console: Console::UnixSocket("/tmp/c.sock".into()),
            ..Machine::board("raspi3b", 3)
        };
        let cmd = model_power_cycle(
            &m,
            std::path::Path::new("/tmp/b.dtb"),
            std::path::Path::new("/tmp/p"),
        );
        assert!(cmd.contains("'-kernel' \"$MEMFW_ELF\""), "{cmd}");
        assert!(cmd.contains("'socket,id=con,path=/tmp/c.sock,server=on,wait=on'"));
        assert!(cmd.ends_with("& echo $! > '/tmp/p'"));
        assert_eq!(sh_quote("it's"), "'it'\\''s'");
    }

    #[test]
    fn guest_power_off_needs_the_shutdown_event() {
        use serde_json::json;
        assert!(guest_powered_off(&[(
            "SHUTDOWN".into(),
            json!({"guest": true, "reason": "guest-shutdown"})
        )]));
        // QEMU killed from outside, or no event at all (semihosting exit).
        assert!(!guest_powered_off(&[(
            "SHUTDOWN".into(),
            json!({"guest": false, "reason": "host-signal"})
        )]));
        assert!(!guest_powered_off(&[]));
        let reset = [(
            "SHUTDOWN".to_string(),
            json!({"guest": true, "reason": "guest-reset"}),
        )];
        assert!(guest_reset(&reset));
        assert!(!guest_powered_off(&reset));
        assert!(!guest_reset(&[(
            "SHUTDOWN".into(),
            json!({"guest": true, "reason": "guest-shutdown"})
        )]));
    }

    #[test]
    fn system_tests_assert_what_they_name() {
        for st in SYSTEM_TESTS {
            assert!(!st.must_log.is_empty(), "{}", st.name);
            if st.name.contains("poweroff") {
                assert!(
                    st.guest_shutdown,
                    "{} must see the guest power off",
                    st.name
                );
            }
            if st.name.contains("is_typed_error") {
                assert_eq!(st.exit, Some(hal::exit::BAD_DTB), "{}", st.name);
                assert!(st.dtb.is_some(), "{}", st.name);
            }
        }
        // The panic test must not be satisfied by the self-test's own line.
        let panic = SYSTEM_TESTS
            .iter()
            .find(|s| s.name == "panic_exit_code")
            .expect("exists");
        assert!(panic
            .must_log
            .iter()
            .all(|t| !"selftest: panicking on purpose".contains(t)));
        let spread = machines_for("virt", "mmu", "every_virtio_window_is_mapped_device");
        assert!(spread.iter().any(|m| m.dtb == Some(DtbPatch::SpreadVirtio)));
    }

    #[test]
    fn suite_names_drop_cargos_hash() {
        assert_eq!(suite_name("boot-0123456789abcdef"), "boot");
        assert_eq!(suite_name("hal-tests-0123456789abcdef"), "hal-tests");
        assert_eq!(suite_name("firmware"), "firmware");
        assert_eq!(suite_name("x-y"), "x-y");
    }

    #[test]
    fn filters() {
        assert!(matches(&[], "boot::x"));
        assert!(matches(&["boot".into()], "boot::x"));
        assert!(!matches(&["mmu".into()], "boot::x"));
    }
}
