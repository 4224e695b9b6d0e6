//! `cargo qemu test`: host tests, then every on-target embedded-test suite
//! (one QEMU boot per test and machine configuration, in parallel), then
//! system tests of the firmware binary itself. Output is libtest-like and ends
//! with one line `N passed, N failed, N skipped`.

use crate::boot::{boot, BootOptions, Ending};
use crate::elf::{read_tests, TestCase};
use crate::fdt::DtbPatch;
use crate::log::Decoder;
use crate::machine::Machine;
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
    cmd.args(["test", "-q", "-p", "memdesc", "-p", "hal", "-p", "qemu"]);
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
    let at_every_el = || -> Vec<Machine> {
        Machine::entry_els(board)
            .iter()
            .map(|&el| Machine::board(board, el))
            .collect()
    };
    match (suite, test) {
        ("platform", "virt_tree_contents") => vec![],
        // QEMU's i.MX UART model ignores UTS.LOOP: the bytes go out on the
        // line (into the defmt stream) instead of coming back.
        ("boot", "uart_loopback") if board == "imx8mp-evk" => vec![],
        ("platform", "memory_matches_qemu") => match board {
            "xlnx-zcu102" => ["1G", "4G"]
                .into_iter()
                .map(|mem| Machine {
                    mem,
                    ..Machine::board(board, 1)
                })
                .collect(),
            "imx8mp-evk" => ["512M", "2G"]
                .into_iter()
                .map(|mem| Machine {
                    mem,
                    ..Machine::board(board, 2)
                })
                .collect(),
            _ => at_every_el(),
        },
        ("boot" | "platform" | "mmu" | "smp", _) => at_every_el(),
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
};

/// System tests of the firmware on the board models.
const BOARD_SYSTEM_TESTS: &[SystemTest] = &[
    SystemTest {
        on: On::BoardsAt(ALL_BOARDS, 2),
        ..REENTRY
    },
    SystemTest {
        name: "ready_on_board",
        must_log: &["memory from the DTB at", "MMU on", "ready"],
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
            "ready",
        ],
        on: On::Boards(&["raspi3b", "raspi4b"]),
        image: true,
        ..SYSTEM
    },
    SystemTest {
        name: "image_boots_like_the_board",
        // memfw.elf as U-Boot's bootelf starts it: at EL2 (U-Boot passes no
        // DTB pointer; the tree is at the start of RAM).
        must_log: &[
            "entered at EL2",
            "memory from the DTB at",
            "MMU on",
            "ready",
        ],
        on: On::Boards(&["imx8mp-evk", "xlnx-zcu102"]),
        image: true,
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

/// Judges an embedded-test boot: `Ok` or the reason it failed.
pub fn judge_embedded(ending: Ending, should_panic: bool) -> Result<(), String> {
    match (ending, should_panic) {
        (Ending::Exited(0), false) => Ok(()),
        (Ending::Exited(0), true) => Err("passed but should have panicked".into()),
        (Ending::Exited(c), true) if c == hal::exit::PANIC => Ok(()),
        (Ending::Exited(c), false) if c == hal::exit::PANIC => {
            Err("panicked (or returned Err)".into())
        }
        (Ending::Exited(c), _) if c == hal::exit::CRASH => {
            Err("crashed: unexpected exception".into())
        }
        (Ending::Exited(c), _) if c == hal::exit::BAD_DTB => {
            Err("device tree rejected at boot".into())
        }
        (Ending::Exited(c), _) if c == hal::exit::POWEROFF_FAILED => {
            Err("PSCI SYSTEM_OFF returned".into())
        }
        (Ending::Exited(c), _) => Err(format!("QEMU exited with status {c}")),
        (Ending::Signalled(s), _) => Err(format!("QEMU killed by signal {s}")),
        (Ending::TimedOut, _) => Err("timed out".into()),
        (Ending::Stopped, _) => Err("stopped early".into()),
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

/// Boots one job and judges it: `Ok(wall time)` or the reason it failed
/// followed by its decoded log.
fn run_job(job: &Job, elf: &std::path::Path, decoder: &Decoder) -> Result<Duration, String> {
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
        Check::System(st) if st.guest_shutdown => Some(std::env::temp_dir().join(format!(
            "cargo-qemu-test-{}-{}.qmp",
            std::process::id(),
            job.id
        ))),
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
            timeout: Duration::from_secs(60),
            echo: false,
            stop_when: if st.exit.is_none() {
                Some(&ready)
            } else {
                None
            },
            on_started: qmp_path.is_some().then_some(&watch_events),
            paused: qmp_path.is_some(),
        },
    };
    let b = boot(m, elf, decoder, &opts);
    if let Some(p) = &qmp_path {
        let _ = std::fs::remove_file(p);
    }
    let b = b?;
    let verdict = match &job.check {
        Check::Embedded(case) => judge_embedded(b.ending, case.should_panic),
        Check::Balloon(_) => Ok(()),
        Check::System(st) => match (st.exit, b.ending) {
            (None, Ending::Stopped) => Ok(()),
            (Some(want), Ending::Exited(got)) if want == got => Ok(()),
            (want, got) => Err(format!("expected {want:?} (None = ready), got {got:?}")),
        }
        .and_then(|()| match st.must_log.iter().find(|t| !b.logged(t)) {
            None => Ok(()),
            Some(t) => Err(format!("log lacks {t:?}")),
        })
        .and_then(|()| {
            let events = events.lock().map(|e| e.clone()).unwrap_or_default();
            if !st.guest_shutdown || guest_powered_off(&events) {
                Ok(())
            } else {
                Err(format!(
                    "QEMU saw no guest power-off (QMP SHUTDOWN, reason guest-shutdown); events: {events:?}"
                ))
            }
        }),
    };
    verdict
        .map(|()| b.elapsed)
        .map_err(|e| format!("{e}\n{}", b.transcript()))
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

/// Builds `board`'s test suites and firmware and queues their jobs.
fn add_board_jobs(
    board: &'static str,
    args: &TestArgs,
    elfs: &mut Vec<(String, PathBuf)>,
    jobs: &mut Vec<Job>,
    skipped: &mut Vec<String>,
) -> Result<(), String> {
    for art in crate::cargo::build_tests(board)? {
        let bytes = std::fs::read(&art.path).map_err(|e| format!("{}: {e}", art.path.display()))?;
        let cases = read_tests(&bytes).map_err(|e| format!("{}: {e}", art.path.display()))?;
        let idx = elfs.len();
        elfs.push((art.name.clone(), art.path.clone()));
        for case in cases {
            let full = format!("{}::{}", art.name, case.name);
            if !matches(&args.filters, &full) {
                continue;
            }
            if case.ignored {
                if board == "virt" {
                    skipped.push(full);
                }
                continue;
            }
            for machine in machines_for(board, &art.name, &case.name) {
                jobs.push(Job {
                    id: jobs.len(),
                    full_name: full.clone(),
                    machine,
                    elf: idx,
                    check: Check::Embedded(case.clone()),
                    kernel: None,
                });
            }
        }
    }
    let firmware = crate::cargo::build_firmware(board)?;
    let fw_idx = elfs.len();
    // The board's image, written where `cargo qemu image` would put it.
    let image_kernel = if board == "virt" {
        None
    } else {
        let dir = firmware.with_file_name(format!("image-{board}"));
        let written = crate::image::write(board, &firmware, &dir)?;
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
            let kernel = if st.test.image {
                Some(image_kernel.clone().ok_or("no board image was written")?)
            } else {
                None
            };
            jobs.push(Job {
                id: jobs.len(),
                full_name: full,
                machine: st.machine,
                elf: fw_idx,
                check: Check::System(st.test),
                kernel,
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
        for (name, which, machine) in [
            ("balloon_1g_to_512m_and_back", RoundTrip, on("max", 1)),
            (
                "balloon_1g_to_512m_and_back",
                RoundTrip,
                on("cortex-a53", 1),
            ),
            ("balloon_1g_to_512m_and_back", RoundTrip, on("max", 2)),
            (
                "balloon_touch_of_ballooned_frame_faults",
                TouchFaults,
                on("max", 1),
            ),
            ("balloon_deflate_on_oom", OomDeflates, on("max", 1)),
            ("balloon_100_random_cycles", Cycles(100, 1), on("max", 1)),
            // No FEAT_BBM level 2: the firmware moves in whole 2 MiB chunks.
            (
                "balloon_100_random_cycles",
                Cycles(100, 2),
                on("cortex-a53", 1),
            ),
        ] {
            let full = format!("system::{name}");
            if matches(&args.filters, &full) {
                jobs.push(Job {
                    id: jobs.len(),
                    full_name: full,
                    machine,
                    elf: fw_idx,
                    check: Check::Balloon(which),
                    kernel: None,
                });
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
            let machine = Machine {
                mem: st.mem.unwrap_or(base.mem),
                without_dtb: st.without_dtb,
                ..base
            };
            out.push(PlannedSystemTest { test: *st, machine });
        }
    }
    out
}

/// The on-target and system tests.
fn run_target(args: &TestArgs) -> Result<Tally, String> {
    let mut tally = Tally::default();
    crate::setup::ensure_qemu()?;
    let boards: Vec<&'static str> = match args.board {
        Some(b) => vec![b],
        None => std::iter::once("virt")
            .chain(crate::machine::BOARD_MODELS.iter().copied())
            .collect(),
    };
    let mut elfs: Vec<(String, PathBuf)> = Vec::new();
    let mut jobs = Vec::new();
    let mut skipped = Vec::new();
    for &board in &boards {
        println!("== building on-target tests and firmware for {board}");
        add_board_jobs(board, args, &mut elfs, &mut jobs, &mut skipped)?;
    }

    let decoders: Vec<Decoder> = elfs
        .iter()
        .map(|(_, p)| {
            std::fs::read(p)
                .map_err(|e| e.to_string())
                .and_then(|b| Decoder::new(&b))
        })
        .collect::<Result<_, _>>()?;
    let n_jobs = args
        .jobs
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
    for s in &skipped {
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
    let (target, failures) = results.into_inner().map_err(|_| "a test worker panicked")?;
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
    tally.add(target);
    Ok(tally)
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
        assert_eq!(judge_embedded(Ending::Exited(0), false), Ok(()));
        assert!(judge_embedded(Ending::Exited(0), true).is_err());
        assert_eq!(
            judge_embedded(Ending::Exited(hal::exit::PANIC), true),
            Ok(())
        );
        assert!(judge_embedded(Ending::Exited(hal::exit::PANIC), false).is_err());
        // A crash is never a pass, not even for should_panic.
        assert!(judge_embedded(Ending::Exited(hal::exit::CRASH), true)
            .unwrap_err()
            .contains("crashed"));
        assert!(judge_embedded(Ending::TimedOut, false)
            .unwrap_err()
            .contains("timed out"));
        assert!(judge_embedded(Ending::Signalled(9), false).is_err());
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
                let els: Vec<u8> = machines_for(b, suite, "any").iter().map(|m| m.el).collect();
                assert_eq!(els, Machine::entry_els(b), "{b} {suite}");
                assert!(machines_for(b, suite, "any").iter().all(|m| m.board == b));
            }
            assert!(machines_for(b, "platform", "virt_tree_contents").is_empty());
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
    fn filters() {
        assert!(matches(&[], "boot::x"));
        assert!(matches(&["boot".into()], "boot::x"));
        assert!(!matches(&["mmu".into()], "boot::x"));
    }
}
