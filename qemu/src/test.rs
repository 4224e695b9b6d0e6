//! `cargo qemu test`: host tests, then every on-target embedded-test suite
//! (one QEMU boot per test and machine configuration, in parallel), then
//! system tests of the firmware binary itself. Output is libtest-like and ends
//! with one line `N passed, N failed, N skipped`.

use crate::boot::{boot, BootOptions, Ending};
use crate::elf::{read_tests, TestCase};
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

/// Which machines each suite (or test) runs on. First matching row wins;
/// `None` for the test matches every test of the suite.
fn machines_for(suite: &str, test: &str) -> Vec<Machine> {
    let m = |cpu, mem, el| Machine {
        cpu,
        mem,
        el,
        icount: false,
    };
    match (suite, test) {
        ("boot", _) => vec![
            m("max", "1G", 1),
            m("max", "1G", 2),
            m("max", "1G", 3),
            m("cortex-a53", "1G", 1),
        ],
        ("platform", "memory_matches_qemu") => {
            vec![m("max", "512M", 1), m("max", "1G", 1), m("max", "4G", 1)]
        }
        ("mmu", _) => vec![
            m("max", "1G", 1),
            m("cortex-a53", "1G", 1),
            m("neoverse-v1", "1G", 1),
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
    full_name: String,
    machine: Machine,
    elf: usize,
    check: Check,
}

/// A boot of the firmware binary with an expected ending.
#[derive(Clone, Copy)]
struct SystemTest {
    name: &'static str,
    append: Option<&'static str>,
    machine_el: u8,
    cpu: &'static str,
    /// Expected exit code, or `None` for "reaches ready".
    exit: Option<i32>,
    /// Text the log must contain.
    must_log: &'static str,
}

const SYSTEM_TESTS: &[SystemTest] = &[
    SystemTest {
        name: "ready_el1_max",
        append: None,
        machine_el: 1,
        cpu: "max",
        exit: None,
        must_log: "ready",
    },
    SystemTest {
        name: "ready_el2_max",
        append: None,
        machine_el: 2,
        cpu: "max",
        exit: None,
        must_log: "ready",
    },
    SystemTest {
        name: "ready_el3_a53",
        append: None,
        machine_el: 3,
        cpu: "cortex-a53",
        exit: None,
        must_log: "ready",
    },
    SystemTest {
        name: "crash_report_and_exit_code",
        append: Some("selftest=data-abort"),
        machine_el: 1,
        cpu: "max",
        exit: Some(hal::exit::CRASH),
        must_log: "Data abort from the same EL",
    },
    SystemTest {
        name: "stack_overflow_hits_guard_page",
        append: Some("selftest=stack-overflow"),
        machine_el: 1,
        cpu: "max",
        exit: Some(hal::exit::CRASH),
        must_log: "translation fault at level 3 on write",
    },
    SystemTest {
        name: "log_survives_fault_mid_frame",
        append: Some("selftest=nested-log"),
        machine_el: 1,
        cpu: "max",
        exit: None,
        must_log: "outer frame: before-after fault true",
    },
    SystemTest {
        name: "psci_poweroff_hvc",
        append: Some("selftest=poweroff"),
        machine_el: 1,
        cpu: "max",
        exit: Some(hal::exit::SUCCESS),
        must_log: "PSCI SYSTEM_OFF over HVC",
    },
    SystemTest {
        name: "psci_poweroff_smc_from_el2_entry",
        append: Some("selftest=poweroff"),
        machine_el: 2,
        cpu: "max",
        exit: Some(hal::exit::SUCCESS),
        must_log: "PSCI SYSTEM_OFF over SMC",
    },
    SystemTest {
        name: "panic_exit_code",
        append: Some("selftest=panic"),
        machine_el: 1,
        cpu: "max",
        exit: Some(hal::exit::PANIC),
        must_log: "panic",
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
        (Ending::Exited(c), _) => Err(format!("QEMU exited with status {c}")),
        (Ending::Signalled(s), _) => Err(format!("QEMU killed by signal {s}")),
        (Ending::TimedOut, _) => Err("timed out".into()),
        (Ending::Stopped, _) => Err("stopped early".into()),
    }
}

fn matches(filters: &[String], name: &str) -> bool {
    filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()))
}

/// Boots one job and judges it: `Ok(wall time)` or the reason it failed
/// followed by its decoded log.
fn run_job(job: &Job, elf: &std::path::Path, decoder: &Decoder) -> Result<Duration, String> {
    let m = &job.machine;
    let mut semihosting_args = vec![
        format!("entry_el={}", m.el),
        format!("mem_bytes={}", m.mem_bytes()),
        format!("cpu={}", m.cpu),
    ];
    let ready = |l: &crate::log::LogLine| l.message == "ready";
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
            }
        }
        // Its own boot: QMP, a driver thread and its own verdict.
        Check::Balloon(which) => return crate::balloon::system_test(m, elf, decoder, *which),
        Check::System(st) => BootOptions {
            semihosting_args,
            append: st.append,
            qmp: None,
            timeout: Duration::from_secs(60),
            echo: false,
            stop_when: if st.exit.is_none() {
                Some(&ready)
            } else {
                None
            },
            on_started: None,
        },
    };
    let b = boot(m, elf, decoder, &opts)?;
    let verdict = match &job.check {
        Check::Embedded(case) => judge_embedded(b.ending, case.should_panic),
        Check::Balloon(_) => Ok(()),
        Check::System(st) => match (st.exit, b.ending) {
            (None, Ending::Stopped) => Ok(()),
            (Some(want), Ending::Exited(got)) if want == got => Ok(()),
            (want, got) => Err(format!("expected {want:?} (None = ready), got {got:?}")),
        }
        .and_then(|()| {
            if b.logged(st.must_log) {
                Ok(())
            } else {
                Err(format!("log lacks {:?}", st.must_log))
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

/// The on-target and system tests.
fn run_target(args: &TestArgs) -> Result<Tally, String> {
    let mut tally = Tally::default();
    crate::setup::ensure_qemu()?;
    println!("== building on-target tests and firmware");
    let mut elfs: Vec<(String, PathBuf)> = Vec::new();
    let mut jobs = Vec::new();
    let mut skipped = Vec::new();
    for art in crate::cargo::build_tests()? {
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
                skipped.push(full);
                continue;
            }
            for machine in machines_for(&art.name, &case.name) {
                jobs.push(Job {
                    full_name: full.clone(),
                    machine,
                    elf: idx,
                    check: Check::Embedded(case.clone()),
                });
            }
        }
    }
    let firmware = crate::cargo::build_firmware()?;
    let fw_idx = elfs.len();
    elfs.push(("firmware".into(), firmware));
    for st in SYSTEM_TESTS {
        let full = format!("system::{}", st.name);
        if matches(&args.filters, &full) {
            let machine = Machine {
                cpu: st.cpu,
                el: st.machine_el,
                ..Machine::default()
            };
            jobs.push(Job {
                full_name: full,
                machine,
                elf: fw_idx,
                check: Check::System(*st),
            });
        }
    }
    {
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
                    full_name: full,
                    machine,
                    elf: fw_idx,
                    check: Check::Balloon(which),
                });
            }
        }
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
                let verdict = run_job(&job, &elfs[job.elf].1, &decoders[job.elf]);
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
    fn matrix_covers_every_el_and_both_cpus_for_boot() {
        let ms = machines_for("boot", "anything");
        for el in 1..=3 {
            assert!(ms.iter().any(|m| m.el == el));
        }
        assert!(ms.iter().any(|m| m.cpu == "cortex-a53"));
        let mem: Vec<u64> = machines_for("platform", "memory_matches_qemu")
            .iter()
            .map(Machine::mem_bytes)
            .collect();
        assert_eq!(mem, vec![512 << 20, 1 << 30, 4 << 30]);
        assert_eq!(machines_for("other", "x"), vec![Machine::default()]);
    }

    #[test]
    fn filters() {
        assert!(matches(&[], "boot::x"));
        assert!(matches(&["boot".into()], "boot::x"));
        assert!(!matches(&["mmu".into()], "boot::x"));
    }
}
