//! The balloon's system test, driven over QMP: boot a 1 GiB guest, balloon
//! it to 512 MiB and back, and check that `query-balloon` reaches each
//! target and that the firmware's settle report (frame accounting, linter,
//! TLB footprint) is clean each time.

use crate::boot::{boot, BootOptions, Ending};
use crate::error::{Error, OrMissing, Result};
use crate::log::{Decoder, LogLine};
use crate::machine::Machine;
use crate::qmp::{Qmp, SocketIo};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const PAGE: u64 = 4096;

/// What one balloon move showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    /// Guest size asked for, bytes.
    pub target: u64,
    /// Time from the QMP command to `query-balloon` showing the target.
    pub took: Duration,
    /// The firmware's settle line.
    pub settled: String,
}

/// Parses a settle line into (actual pages, frames ok, lint, TLB entries,
/// boot optimum).
pub fn parse_settled(line: &str) -> Option<(u64, bool, u64, u64, u64)> {
    let after = |key: &str| -> Option<&str> {
        let i = line.find(key)? + key.len();
        Some(&line[i..])
    };
    let num = |key: &str| -> Option<u64> {
        let s = after(key)?;
        let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        s[..end].parse().ok()
    };
    let actual = num("balloon settled: actual ")?;
    let frames_ok = after("frames ")?.starts_with("ok");
    Some((
        actual,
        frames_ok,
        num("lint ")?,
        num("TLB entries ")?,
        num("boot optimum ")?,
    ))
}

pub(crate) fn wait_line(
    seen: &Mutex<Vec<String>>,
    from: usize,
    pred: impl Fn(&str) -> bool,
    timeout: Duration,
) -> Result<(usize, String)> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(lines) = seen.lock() {
            if let Some((i, l)) = lines.iter().enumerate().skip(from).find(|(_, l)| pred(l)) {
                return Ok((i, l.clone()));
            }
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: "the firmware's log".into(),
                secs: timeout.as_secs(),
                detail: String::new(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_actual(q: &mut Qmp<SocketIo>, target: u64, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let actual = q.query_balloon()?;
        if actual == target {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: format!("query-balloon to reach {} MiB", target >> 20),
                secs: timeout.as_secs(),
                detail: format!("stuck at {} MiB", actual >> 20),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Which balloon system test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Touch all RAM, balloon to half and back: `query-balloon` reaches each
    /// target, QEMU's resident memory drops by most of the ballooned
    /// amount, `guest-stats` carry the firmware's figures, and each settle
    /// report is clean (frames, linter; TLB footprint back at the optimum).
    RoundTrip,
    /// Balloon a little, then the firmware reads a ballooned frame: the
    /// crash report says the frame is ballooned.
    TouchFaults,
    /// Balloon nearly all RAM, then the firmware allocates until it runs
    /// out: deflate-on-OOM gives pages back, the allocation succeeds, every
    /// frame is accounted for and the host sees the guest grow.
    OomDeflates,
    /// Balloon nearly all RAM, then the firmware holds every free frame and
    /// maps pages (a new table each) until the engine runs out of table
    /// memory. With DEFLATE_ON_OOM negotiated (`true`) the map that ran out
    /// succeeds after the balloon deflated one frame plus its margin, and
    /// the host sees the guest grow; without it (the firmware declines the
    /// feature) the map gets the engine's typed error and the balloon keeps
    /// every page. Either way everything is undone, every frame accounted
    /// for, the linter clean.
    TableOom(bool),
    /// This many moves to random sizes (repeatable) in steps of this many
    /// MiB, then back to all of RAM: every settle report clean, 0 frames
    /// lost, footprint back.
    Cycles(u32, u64),
    /// Balloon to half, then sit idle: QEMU's own CPU time over a few
    /// seconds (from /proc/PID/stat) stays a small fraction of one core,
    /// because the service loop sleeps in WFI; then back to all of RAM.
    /// Both moves are interrupt-driven (the settle lines count them).
    IdleCpu,
    /// Balloon to 64 KiB short of half and back: the target is reached
    /// exactly and the settle line shows a 64 KiB chunk was inflated (on
    /// `cortex-a53`, no FEAT_BBM level 2, the balloon once moved whole
    /// 2 MiB chunks only); every settle report clean, footprint back.
    SmallChunks,
    /// RAM written first, free page reporting on: QEMU's resident memory
    /// drops without any inflate (the host discards the reported free
    /// blocks), every frame accounted for; then half and back as usual.
    Reporting,
}

impl Scenario {
    fn append(self) -> &'static str {
        match self {
            Scenario::RoundTrip => "balloon.touch balloon.touch-after-deflate",
            Scenario::TouchFaults => "selftest=balloon-touch",
            Scenario::OomDeflates => "selftest=balloon-oom",
            Scenario::TableOom(true) => "selftest=balloon-oom-tables",
            Scenario::TableOom(false) => "selftest=balloon-oom-tables balloon.no-deflate-on-oom",
            Scenario::Cycles(..) | Scenario::IdleCpu | Scenario::SmallChunks => "",
            Scenario::Reporting => "balloon.touch balloon.report",
        }
    }
}

/// The QOM path of the balloon device (QEMU names an anonymous `-device`
/// `/machine/peripheral-anon/device[N]`).
fn balloon_qom_path(q: &mut Qmp<SocketIo>) -> Result<String> {
    let base = "/machine/peripheral-anon";
    let list = q.execute("qom-list", Some(json!({ "path": base })))?;
    list.as_array()
        .into_iter()
        .flatten()
        .find(|p| {
            p.get("type")
                .and_then(Value::as_str)
                .is_some_and(|t| t.contains("virtio-balloon"))
        })
        .and_then(|p| p.get("name").and_then(Value::as_str))
        .map(|n| format!("{base}/{n}"))
        .ok_or_else(|| Error::Missing(format!("no balloon under {base}: {list}")))
}

/// Turns on stats polling and waits for the first report; returns
/// (free, total) bytes.
fn guest_stats(q: &mut Qmp<SocketIo>) -> Result<(u64, u64)> {
    let path = balloon_qom_path(q)?;
    q.execute(
        "qom-set",
        Some(json!({ "path": path, "property": "guest-stats-polling-interval", "value": 1 })),
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut first: Option<u64> = None;
    loop {
        let v = q.execute(
            "qom-get",
            Some(json!({ "path": path, "property": "guest-stats" })),
        )?;
        let stat = |k: &str| {
            v.get("stats")
                .and_then(|s| s.get(k))
                .and_then(Value::as_u64)
        };
        let updated = v.get("last-update").and_then(Value::as_u64).unwrap_or(0);
        // The first report may be the buffer posted at boot: wait for one
        // the firmware filled after the move.
        let fresh = *first.get_or_insert(updated) != updated;
        if let (true, Some(free), Some(total)) =
            (fresh, stat("stat-free-memory"), stat("stat-total-memory"))
        {
            return Ok((free, total));
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: "guest stats".into(),
                secs: 10,
                detail: v.to_string(),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `n` guest sizes between an eighth of RAM and all of it, in `step` MiB steps,
/// no two in a row equal (QEMU raises no config change for the same
/// target), then all of RAM. A fixed LCG: the same list every run.
fn random_targets(ram: u64, n: u32, step: u64) -> Vec<u64> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let (lo, span) = ((ram / 8) >> 20, (ram - ram / 8) >> 20);
    let mut out: Vec<u64> = Vec::new();
    while out.len() < n as usize {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mib = (lo + (x >> 33) % span) / step * step;
        if out.last() != Some(&(mib << 20)) && mib << 20 != ram {
            out.push(mib << 20);
        }
    }
    out.push(ram);
    out
}

/// What the driver thread found.
#[derive(Debug, Default)]
struct Findings {
    moves: Vec<Move>,
    /// QEMU's resident memory (KiB) before and after each move.
    rss: Vec<Option<u64>>,
    /// Guest-reported free and total memory (bytes) while ballooned.
    stats: Option<(u64, u64)>,
    /// The deflate-on-OOM report and `query-balloon` after it.
    oom: Option<(String, u64)>,
    /// QEMU's CPU time over wall time while the ballooned guest was idle.
    idle_cpu: Option<f64>,
    /// The firmware's reporting line and QEMU's resident memory (KiB) after.
    reported: Option<(String, Option<u64>)>,
}

/// Seconds the idle guest is watched for.
const IDLE_WATCH: Duration = Duration::from_secs(4);
/// The most of one host core an idle ballooned guest may cost QEMU (a
/// polling loop costs all of it; WFI costs about nothing).
pub const IDLE_CPU_BOUND: f64 = 0.10;

fn scenario(
    q: &mut Qmp<SocketIo>,
    qmp_path: &Path,
    seen: &Mutex<Vec<String>>,
    ram: u64,
    which: Scenario,
) -> Result<Findings> {
    let (mut from, _) = wait_line(
        seen,
        0,
        |l| l.starts_with("balloon: up"),
        Duration::from_secs(120),
    )?;
    let mut f = Findings::default();
    if which == Scenario::TouchFaults {
        q.balloon(ram - (64 << 20))?;
        wait_line(
            seen,
            from,
            |l| l.contains("FAR frame:"),
            Duration::from_secs(60),
        )?;
        return Ok(f);
    }
    if let Scenario::OomDeflates | Scenario::TableOom(_) = which {
        let small = 64 << 20;
        q.balloon(small)?;
        let report = if which == Scenario::OomDeflates {
            "balloon: deflate-on-OOM gave back"
        } else {
            "balloon: table-memory OOM:"
        };
        let (_, line) = wait_line(
            seen,
            from,
            |l| l.starts_with(report),
            Duration::from_secs(120),
        )?;
        if let Some(to) = number_after(&line, " -> ").filter(|_| which != Scenario::OomDeflates) {
            // The firmware writes `actual` once the host took the deflate.
            wait_actual(q, ram.saturating_sub(to * PAGE), Duration::from_secs(30))?;
        }
        let actual = q.query_balloon()?;
        f.oom = Some((line, actual));
        return Ok(f);
    }
    if which == Scenario::Reporting {
        let (i, line) = wait_line(
            seen,
            from,
            |l| l.starts_with("balloon: reported"),
            Duration::from_secs(60),
        )?;
        from = i + 1;
        // QEMU discards each report as it comes: give the last ones a moment.
        std::thread::sleep(Duration::from_millis(500));
        f.reported = Some((line, qemu_rss_kib(qmp_path)));
    }
    f.rss.push(qemu_rss_kib(qmp_path));
    let targets = match which {
        Scenario::Cycles(n, step) => random_targets(ram, n, step),
        Scenario::SmallChunks => vec![ram / 2 - (64 << 10), ram],
        _ => vec![ram / 2, ram],
    };
    for (k, target) in targets.into_iter().enumerate() {
        if which == Scenario::IdleCpu && k == 1 {
            // Let the last log lines drain, then watch QEMU sit idle.
            std::thread::sleep(Duration::from_millis(500));
            f.idle_cpu = Some(qemu_cpu_fraction(qmp_path, IDLE_WATCH)?);
        }
        let t0 = Instant::now();
        q.balloon(target)?;
        wait_actual(q, target, Duration::from_secs(120))?;
        let took = t0.elapsed();
        let pages = (ram - target) / PAGE;
        let want = format!("balloon settled: actual {pages} pages");
        let (i, settled) = wait_line(
            seen,
            from,
            |l| l.starts_with(&want),
            Duration::from_secs(60),
        )?;
        from = i + 1;
        if target == ram && which == Scenario::RoundTrip {
            // The firmware writes its free memory again once everything is
            // back (`balloon.touch`): the pages come back on use.
            let (i, _) = wait_line(
                seen,
                from,
                |l| l.starts_with("balloon: touched") && l.contains("after the deflate"),
                Duration::from_secs(60),
            )?;
            from = i + 1;
        }
        f.rss.push(qemu_rss_kib(qmp_path));
        if target < ram && which == Scenario::RoundTrip {
            f.stats = Some(guest_stats(q)?);
        }
        f.moves.push(Move {
            target,
            took,
            settled,
        });
    }
    Ok(f)
}

/// Boots `elf` on `m` with QMP and runs `which`; `Ok(wall time)` or why it
/// failed, with the transcript.
pub fn system_test(
    m: &Machine,
    elf: &Path,
    decoder: &Decoder,
    which: Scenario,
) -> Result<Duration> {
    let qmp_path = std::env::temp_dir().join(format!(
        "cargo-qemu-balloon-{}-{}-{}.qmp",
        std::process::id(),
        // No commas: QEMU's option parser splits -qmp's argument at them.
        format!("{which:?}").replace(|c: char| !c.is_ascii_alphanumeric(), ""),
        m.label().replace(' ', "-")
    ));
    let ram = m.mem_bytes();
    let seen = Mutex::new(Vec::<String>::new());
    let result: Mutex<Option<Result<Findings>>> = Mutex::new(None);
    let record = |l: &LogLine| {
        if let Ok(mut s) = seen.lock() {
            s.push(l.message.clone());
        }
        false
    };
    let drive = || {
        let r = match Qmp::connect(&qmp_path, Duration::from_secs(10)) {
            Ok(mut q) => {
                let r = scenario(&mut q, &qmp_path, &seen, ram, which);
                // Ends the boot either way (QEMU exits 0 on `quit`).
                if which != Scenario::TouchFaults {
                    let _ = q.execute("quit", None);
                }
                r
            }
            Err(e) => Err(e.into()),
        };
        if let Ok(mut slot) = result.lock() {
            *slot = Some(r);
        }
    };
    let opts = BootOptions {
        semihosting_args: vec![format!("entry_el={}", m.el), format!("mem_bytes={}", ram)],
        append: Some(which.append()),
        qmp: Some(&qmp_path),
        timeout: Duration::from_secs(300),
        echo: false,
        stop_when: Some(&record),
        on_started: Some(&drive),
        paused: false,
    };
    let b = boot(m, elf, decoder, &opts);
    let _ = std::fs::remove_file(&qmp_path);
    let b = b?;
    let found = result
        .into_inner()
        .ok()
        .flatten()
        .unwrap_or_else(|| Err(Error::Missing("the QMP driver did not finish".into())));
    let verdict = found.and_then(|f| match which {
        Scenario::TouchFaults => {
            if b.ending != Ending::Exited(hal::exit::CRASH) {
                return Err(Error::Check(format!(
                    "expected the crash exit, got {:?}",
                    b.ending
                )));
            }
            if !b.logged("FAR frame: ballooned") {
                return Err(Error::Check(
                    "the crash report does not say the frame is ballooned".into(),
                ));
            }
            Ok(())
        }
        Scenario::OomDeflates => {
            let (line, actual) = f.oom.or_missing("no deflate-on-OOM report")?;
            println!("  {line}; query-balloon {} MiB", actual >> 20);
            let gave: u64 = line
                .strip_prefix("balloon: deflate-on-OOM gave back ")
                .and_then(|r| r.split(' ').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            if gave == 0
                || !line.contains("through the general path")
                || !line.contains("frames ok")
                || !line.contains("lint 0")
                || !line.contains("Ok(())")
            {
                return Err(Error::Check(format!(
                    "deflate-on-OOM report not clean: {line}"
                )));
            }
            if actual <= 64 << 20 {
                return Err(Error::Check(format!(
                    "the host does not see the guest grow: {actual}"
                )));
            }
            Ok(())
        }
        Scenario::TableOom(deflates) => {
            let (line, actual) = f.oom.or_missing("no table-memory OOM report")?;
            println!("  {line}; query-balloon {} MiB", actual >> 20);
            judge_table_oom(&line, actual, ram, deflates)
        }
        Scenario::RoundTrip => judge_round_trip(&b.ending, &f, ram, true),
        Scenario::Cycles(..) => judge_round_trip(&b.ending, &f, ram, false),
        Scenario::SmallChunks => judge_small_chunks(&b.ending, &f, ram),
        Scenario::IdleCpu => judge_idle(&b, &f, ram),
        Scenario::Reporting => judge_reporting(&b, &f, ram),
    });
    verdict
        .map(|()| b.elapsed)
        .map_err(|e| e.with_log(b.transcript()))
}

/// The number after `key` in `line`.
fn number_after(line: &str, key: &str) -> Option<u64> {
    let at = line.find(key)? + key.len();
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// The firmware's table-memory OOM report (`line`) and `query-balloon`
/// after it (`actual`, bytes, of a `ram`-byte guest) against what the test
/// expects: a map that succeeded after deflating one frame plus the
/// 256-page margin, or (`deflates` false) the typed error and a balloon
/// that kept its pages. The host must agree with the firmware's count.
pub fn judge_table_oom(line: &str, actual: u64, ram: u64, deflates: bool) -> Result<()> {
    let bad = |why: &str| Err(Error::Check(format!("{why}: {line}")));
    let (Some(deflated), Some(events), Some(from), Some(to)) = (
        number_after(line, "; deflated "),
        number_after(line, "; OOM events "),
        number_after(line, "; actual "),
        number_after(line, " -> "),
    ) else {
        return bad("table-memory OOM report unreadable");
    };
    if !line.contains("(0 frames left free)") {
        return bad("free frames were left: the tables never ran short");
    }
    if !line.contains("undone true") || !line.contains("frames ok") || !line.contains("lint 0") {
        return bad("table-memory OOM report not clean");
    }
    if deflates {
        if !line.contains("last map Ok(") || deflated < 257 || events != 1 {
            return bad("the map did not succeed by deflating one frame and the margin");
        }
        if from.checked_sub(to) != Some(deflated) {
            return bad("actual did not drop by what was deflated");
        }
    } else {
        if !line.contains("last map Err(Stage1(OutOfTableMemory))") {
            return bad("no typed out-of-table-memory error");
        }
        if deflated != 0 || events != 0 || from != to {
            return bad("ballooned pages were touched without DEFLATE_ON_OOM");
        }
    }
    if actual != ram.saturating_sub(to * PAGE) {
        return Err(Error::Check(format!(
            "query-balloon says {} MiB, the firmware {} ballooned pages: {line}",
            actual >> 20,
            to
        )));
    }
    Ok(())
}

/// Chunks inflated so far by size (2 MiB, 64 KiB, 4 KiB) from a settle line.
pub fn parse_chunks(line: &str) -> Option<[u64; 3]> {
    let s = &line[line.find("chunks 2M ")? + "chunks 2M ".len()..];
    let mut out = [0; 3];
    for (k, key) in ["", " 64K ", " 4K "].iter().enumerate() {
        let s = if key.is_empty() {
            s
        } else {
            &s[s.find(key)? + key.len()..]
        };
        let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        out[k] = s[..end].parse().ok()?;
    }
    Some(out)
}

fn judge_small_chunks(ending: &Ending, f: &Findings, ram: u64) -> Result<()> {
    judge_round_trip(ending, f, ram, false)?;
    let first = f.moves.first().or_missing("no move")?;
    let chunks = parse_chunks(&first.settled)
        .ok_or_else(|| Error::Missing(format!("no chunk counts in {:?}", first.settled)))?;
    println!(
        "  chunks inflated: {} of 2 MiB, {} of 64 KiB, {} of 4 KiB",
        chunks[0], chunks[1], chunks[2]
    );
    if chunks[1] == 0 {
        return Err(Error::Check(format!(
            "no 64 KiB chunk inflated: {}",
            first.settled
        )));
    }
    Ok(())
}

fn judge_idle(b: &crate::boot::Boot, f: &Findings, ram: u64) -> Result<()> {
    judge_round_trip(&b.ending, f, ram, false)?;
    let cpu = f.idle_cpu.or_missing("QEMU's CPU time was not measured")?;
    println!(
        "  idle ballooned guest: QEMU used {:.1}% of a core over {} s (bound {:.0}%)",
        cpu * 100.0,
        IDLE_WATCH.as_secs(),
        IDLE_CPU_BOUND * 100.0
    );
    if cpu > IDLE_CPU_BOUND {
        return Err(Error::Check(format!(
            "an idle ballooned guest costs QEMU {:.1}% of a core",
            cpu * 100.0
        )));
    }
    if !b.logged("balloon: interrupt-driven") {
        return Err(Error::Check(
            "the balloon's interrupt was not attached".into(),
        ));
    }
    for mv in &f.moves {
        let irqs = interrupts_of(&mv.settled).unwrap_or(0);
        if irqs == 0 {
            return Err(Error::Check(format!(
                "a move with no interrupt taken: {}",
                mv.settled
            )));
        }
    }
    Ok(())
}

fn judge_reporting(b: &crate::boot::Boot, f: &Findings, ram: u64) -> Result<()> {
    judge_round_trip(&b.ending, f, ram, false)?;
    let (line, rss) = f.reported.as_ref().or_missing("no reporting line")?;
    let rss_mib = rss.or_missing("QEMU's resident memory could not be read")? >> 10;
    println!("  {line}; QEMU RSS then {rss_mib} MiB");
    if !line.ends_with("frames ok") {
        return Err(Error::Check(format!("frames lost while reporting: {line}")));
    }
    // RAM was written in full (about 1 GiB resident): most of it was free
    // and reported, so the host let go of most of it.
    if rss_mib << 20 > ram / 2 {
        return Err(Error::Check(format!(
            "QEMU still holds {rss_mib} MiB after free page reporting"
        )));
    }
    Ok(())
}

/// The interrupt count at the end of a settle line.
pub fn interrupts_of(line: &str) -> Option<u64> {
    // `…, N interrupts` at the end of the figures, or before `; chunks …`.
    let words: Vec<&str> = line
        .split([' ', ';', ','])
        .filter(|w| !w.is_empty())
        .collect();
    let at = words.iter().rposition(|w| *w == "interrupts")?;
    words.get(at.checked_sub(1)?)?.parse().ok()
}

fn judge_round_trip(ending: &Ending, f: &Findings, ram: u64, host_checks: bool) -> Result<()> {
    if !matches!(ending, Ending::Exited(0)) {
        return Err(Error::Check(format!(
            "QEMU ended {ending:?} instead of quitting"
        )));
    }
    for (k, mv) in f.moves.iter().enumerate() {
        let (actual, ok, lint, tlb, optimum) = parse_settled(&mv.settled)
            .ok_or_else(|| Error::Missing(format!("unparsable settle line {:?}", mv.settled)))?;
        let rss = |i: usize| f.rss.get(i).copied().flatten().map(|k| k >> 10);
        if host_checks || k + 1 == f.moves.len() {
            println!(
                "  balloon to {} MiB: {:.2} s, {} pages ballooned, QEMU RSS {:?} -> {:?} MiB",
                mv.target >> 20,
                mv.took.as_secs_f64(),
                actual,
                rss(k),
                rss(k + 1)
            );
        }
        if !ok {
            return Err(Error::Check(format!("frames lost: {}", mv.settled)));
        }
        if lint != 0 {
            return Err(Error::Check(format!("linter: {}", mv.settled)));
        }
        if k == f.moves.len() - 1 && tlb != optimum {
            return Err(Error::Check(format!(
                "TLB footprint not back at the optimum: {}",
                mv.settled
            )));
        }
    }
    if !host_checks {
        println!("  {} moves, every settle report clean", f.moves.len());
        return Ok(());
    }
    // QEMU really discarded the pages: most of the ballooned half is gone,
    // and comes back on use (the firmware wrote its free memory after the
    // deflate, so QEMU had to give it pages again).
    let rss = |i: usize| f.rss.get(i).copied().flatten();
    // Sample `high` must be above sample `low` by most of the ballooned half.
    let above = |high: usize, low: usize, what: &str| -> Result<()> {
        let (Some(h), Some(l)) = (rss(high), rss(low)) else {
            return Err(Error::Check(format!(
                "QEMU's resident memory {what} could not be read"
            )));
        };
        if h.saturating_sub(l) << 10 < (ram / 2) * 3 / 4 {
            return Err(Error::Check(format!(
                "QEMU RSS {} MiB ballooned, {} MiB {what} (ballooned {} MiB)",
                l >> 10,
                h >> 10,
                ram >> 21
            )));
        }
        Ok(())
    };
    above(0, 1, "before the inflate")?;
    above(2, 1, "after the deflate and a touch")?;
    let (free, total) = f.stats.or_missing("no guest stats")?;
    println!(
        "  guest-stats: free {} MiB, total {} MiB",
        free >> 20,
        total >> 20
    );
    // Half of RAM is ballooned: free memory is below half.
    if total > ram || total < ram / 2 || free == 0 || free > ram / 2 {
        return Err(Error::Check(format!(
            "implausible guest stats: free {free}, total {total}"
        )));
    }
    Ok(())
}

/// The newest `cargo qemu run` QMP socket in the temp directory.
fn newest_socket() -> Option<PathBuf> {
    let dir = std::env::temp_dir();
    std::fs::read_dir(&dir)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.starts_with("cargo-qemu-") && n.ends_with(".qmp") && !n.contains("balloon")
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .max()
        .map(|(_, p)| p)
}

/// The /proc directory of the QEMU process serving `qmp_path`, found by
/// its command line.
pub fn qemu_proc(qmp_path: &Path) -> Option<PathBuf> {
    let needle = qmp_path.to_string_lossy().into_owned();
    for e in std::fs::read_dir("/proc").ok()?.filter_map(Result::ok) {
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains("qemu-system") && cmdline.contains(&needle) {
            return Some(e.path());
        }
    }
    None
}

/// Resident memory (kB) of the QEMU process serving `qmp_path`.
pub fn qemu_rss_kib(qmp_path: &Path) -> Option<u64> {
    let status = std::fs::read_to_string(qemu_proc(qmp_path)?.join("status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// User plus system CPU time, in clock ticks, from a /proc/PID/stat line
/// (fields 14 and 15, counted after the parenthesised command name, which
/// may hold spaces).
pub fn cpu_ticks_of_stat(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace().skip(11);
    Some(f.next()?.parse::<u64>().ok()? + f.next()?.parse::<u64>().ok()?)
}

/// QEMU's CPU time over `watch` of wall time (1.0 = one core busy).
pub fn qemu_cpu_fraction(qmp_path: &Path, watch: Duration) -> Result<f64> {
    let dir = qemu_proc(qmp_path).or_missing("no QEMU process")?;
    let ticks = || {
        std::fs::read_to_string(dir.join("stat"))
            .ok()
            .as_deref()
            .and_then(cpu_ticks_of_stat)
            .ok_or_else(|| Error::Missing(format!("unreadable {}/stat", dir.display())))
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let (t0, w0) = (ticks()?, Instant::now());
    std::thread::sleep(watch);
    let (t1, w1) = (ticks()?, Instant::now());
    Ok((t1.saturating_sub(t0)) as f64 / hz / (w1 - w0).as_secs_f64())
}

/// The file beside `qmp_path` that `cargo qemu run` writes the balloon's
/// log lines to.
pub fn log_path(qmp_path: &Path) -> PathBuf {
    qmp_path.with_extension("balloon.log")
}

/// Creates the balloon log of a `cargo qemu run`.
pub fn open_log(qmp_path: &Path) -> Option<std::fs::File> {
    std::fs::File::create(log_path(qmp_path)).ok()
}

/// Appends `line` to the balloon log if it is one of the balloon's.
pub fn log_line(log: &Mutex<Option<std::fs::File>>, line: &str) {
    use std::io::Write;
    if line.starts_with("balloon") {
        if let Ok(mut g) = log.lock() {
            if let Some(f) = g.as_mut() {
                let _ = writeln!(f, "{line}");
            }
        }
    }
}

/// The firmware's settle report for `actual` pages written to the balloon
/// log after byte `from`, waiting up to `timeout` for it.
fn settle_report(qmp_path: &Path, from: u64, pages: u64, timeout: Duration) -> Option<String> {
    let want = format!("balloon settled: actual {pages} pages");
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read(log_path(qmp_path)).ok()?;
        let tail = String::from_utf8_lossy(text.get(from as usize..).unwrap_or(&[])).into_owned();
        if let Some(l) = tail.lines().find(|l| l.starts_with(&want)) {
            return Some(l.to_string());
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One line for a person: the settle report's time, accounting and TLB
/// footprint against the optimum.
pub fn describe_settled(line: &str) -> Option<String> {
    let (actual, ok, lint, tlb, optimum) = parse_settled(line)?;
    let ms = line
        .split(" pages in ")
        .nth(1)?
        .split(" ms")
        .next()?
        .parse::<u64>()
        .ok()?;
    Some(format!(
        "firmware: settled at {actual} pages in {ms} ms; frames {}; lint {lint}; TLB footprint {tlb} entries against an optimum of {optimum}{}",
        if ok { "ok" } else { "LOST" },
        if tlb == optimum { " (at the optimum)" } else { "" }
    ))
}

/// Sets the target, shows `actual` moving until it reaches `size` (or 120 s
/// pass), then the time, the rate and QEMU's resident memory before and
/// after. Returns where `actual` ended.
fn move_to(
    q: &mut Qmp<SocketIo>,
    path: &Path,
    size: u64,
    before: u64,
    rss_before: Option<u64>,
) -> Result<u64> {
    println!(
        "balloon: guest at {} MiB, target {} MiB",
        before >> 20,
        size >> 20
    );
    let log_from = std::fs::metadata(log_path(path)).map_or(0, |m| m.len());
    let t0 = Instant::now();
    q.balloon(size)?;
    let mut last = before;
    let actual = loop {
        let actual = q.query_balloon()?;
        if actual != last {
            let (moved, total) = (before.abs_diff(actual), before.abs_diff(size).max(1));
            println!(
                "  actual {} MiB / target {} MiB ({:.0}%, {:.2} s)",
                actual >> 20,
                size >> 20,
                moved as f64 * 100.0 / total as f64,
                t0.elapsed().as_secs_f64()
            );
            last = actual;
        }
        if actual == size {
            break actual;
        }
        if t0.elapsed() > Duration::from_secs(120) {
            println!("  not there after 120 s (the guest's floor, or no driver?)");
            break actual;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = t0.elapsed();
    let pages = before.abs_diff(actual) / PAGE;
    println!(
        "balloon: {} MiB in {:.3} s ({:.0} pages/s)",
        actual >> 20,
        took.as_secs_f64(),
        pages as f64 / took.as_secs_f64().max(1e-9)
    );
    if let (Some(a), Some(b)) = (rss_before, qemu_rss_kib(path)) {
        println!(
            "QEMU resident memory: {} MiB before, {} MiB after",
            a >> 10,
            b >> 10
        );
    }
    let ram = q
        .execute("query-memory-size-summary", None)
        .ok()
        .and_then(|v| v.get("base-memory").and_then(Value::as_u64))
        .unwrap_or(0);
    if ram > 0 {
        let pages = ram.saturating_sub(actual) / PAGE;
        match settle_report(path, log_from, pages, Duration::from_secs(5))
            .as_deref()
            .and_then(describe_settled)
        {
            Some(d) => println!("{d}"),
            None => println!("firmware: no settle report (see the log of `cargo qemu run`)"),
        }
    }
    Ok(actual)
}

/// Turns guest-stats polling on (1 s) and prints the latest figures.
fn print_stats(q: &mut Qmp<SocketIo>) -> Result<()> {
    let path = balloon_qom_path(q)?;
    q.execute(
        "qom-set",
        Some(json!({ "path": path, "property": "guest-stats-polling-interval", "value": 1 })),
    )?;
    let v = q.execute(
        "qom-get",
        Some(json!({ "path": path, "property": "guest-stats" })),
    )?;
    let stats = v
        .get("stats")
        .and_then(Value::as_object)
        .or_missing("no stats")?;
    for (k, val) in stats {
        match val.as_i64() {
            Some(n) if n >= 0 && k.ends_with("memory") => println!("  {k}: {} MiB", n >> 20),
            Some(n) if n >= 0 => println!("  {k}: {n}"),
            _ => {}
        }
    }
    println!(
        "  (last update {}; polling every 1 s from now on)",
        v.get("last-update").and_then(Value::as_u64).unwrap_or(0)
    );
    Ok(())
}

/// Reads one line from stdin if one arrives within 250 ms: `Ok(None)` on
/// timeout, `Err(())` at end of input.
fn stdin_line() -> Result<Option<String>, ()> {
    let mut fds = libc::pollfd {
        fd: 0,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut fds, 1, 250) };
    if n <= 0 {
        return Ok(None);
    }
    let mut line = String::new();
    match std::io::stdin().read_line(&mut line) {
        Ok(0) | Err(_) => Err(()),
        Ok(_) => Ok(Some(line)),
    }
}

/// The console of `cargo qemu run`: commands typed on the terminal, run
/// against QEMU over QMP, until QEMU goes away or input ends.
pub fn console(q: &mut Qmp<SocketIo>, path: &Path) {
    println!("host: console ready: `balloon SIZE` (e.g. 512M), `info balloon`, `stats`, `help`");
    loop {
        let line = match stdin_line() {
            Err(()) => return,
            Ok(None) => {
                if q.query_balloon().is_err() {
                    return;
                }
                continue;
            }
            Ok(Some(l)) => l,
        };
        let words: Vec<&str> = line.split_whitespace().collect();
        let r = match words.as_slice() {
            [] => Ok(()),
            ["balloon", size] => match crate::machine::parse_size(size).filter(|&b| b > 0) {
                Some(size) => q
                    .query_balloon()
                    .map_err(Error::from)
                    .and_then(|before| move_to(q, path, size, before, qemu_rss_kib(path)))
                    .map(drop),
                None => Err(Error::Usage(format!("not a size: {size}"))),
            },
            ["info", "balloon"] => q.query_balloon().map_err(Error::from).map(|a| {
                println!(
                    "balloon: guest at {} MiB; QEMU resident {} MiB",
                    a >> 20,
                    qemu_rss_kib(path).unwrap_or(0) >> 10
                )
            }),
            ["stats"] => print_stats(q),
            ["help"] => {
                println!("  balloon SIZE | info balloon | stats | help");
                Ok(())
            }
            _ => Err(Error::Usage(format!(
                "unknown command {:?} (try help)",
                line.trim()
            ))),
        };
        if let Err(e) = r {
            println!("host: {e}");
        }
    }
}

/// `cargo qemu balloon SIZE [--qmp PATH]`: sets the running guest's target
/// size and shows the balloon moving until `query-balloon` reaches it.
pub fn cmd_balloon(size: u64, qmp_path: Option<PathBuf>) -> Result<std::process::ExitCode> {
    let path = qmp_path
        .or_else(newest_socket)
        .or_missing("no running `cargo qemu run` found (give --qmp PATH)")?;
    let mut q = Qmp::connect(&path, Duration::from_secs(5))?;
    let before = q.query_balloon()?;
    let rss_before = qemu_rss_kib(&path);
    println!("balloon: QMP {}", path.display());
    let actual = move_to(&mut q, &path, size, before, rss_before)?;
    Ok(if actual == size {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_oom_reports_are_judged() {
        let ram = 1 << 30;
        let ok = "balloon: table-memory OOM: 9 free blocks held (0 frames left free), 200 maps; last map Ok(257); deflated 257 pages; OOM events 1; actual 245000 -> 244743; undone true; frames ok; lint 0";
        let host = ram - 244743 * PAGE;
        assert_eq!(
            judge_table_oom(ok, host, ram, true).map_err(|e| e.to_string()),
            Ok(())
        );
        // The host must agree, and the map must have needed the balloon.
        assert!(judge_table_oom(ok, host + PAGE, ram, true).is_err());
        assert!(judge_table_oom(ok, host, ram, false).is_err());
        let typed = "balloon: table-memory OOM: 9 free blocks held (0 frames left free), 200 maps; last map Err(Stage1(OutOfTableMemory)); deflated 0 pages; OOM events 0; actual 245000 -> 245000; undone true; frames ok; lint 0";
        let host = ram - 245000 * PAGE;
        assert_eq!(
            judge_table_oom(typed, host, ram, false).map_err(|e| e.to_string()),
            Ok(())
        );
        assert!(judge_table_oom(typed, host, ram, true).is_err());
        let lost = typed.replace("frames ok", "frames LOST");
        assert!(judge_table_oom(&lost, host, ram, false).is_err());
        let short = typed.replace("(0 frames", "(3 frames");
        assert!(judge_table_oom(&short, host, ram, false).is_err());
    }

    #[test]
    fn a_round_trip_needs_memory_to_leave_and_come_back() {
        let ram: u64 = 1 << 30;
        let half = ram / 2 / PAGE;
        let settle = |pages: u64| {
            Move {
            target: ram - pages * PAGE,
            took: Duration::from_millis(5),
            settled: format!("balloon settled: actual {pages} pages in 5 ms; offline {pages}; frames ok; lint 0; TLB entries 40 (boot optimum 40); 1 batches, 2 notifications, 3 descriptors, 2 interrupts; chunks 2M 256 64K 0 4K 0"),
        }
        };
        let kib = |mib: u64| Some(mib << 10);
        let findings = |rss: Vec<Option<u64>>| Findings {
            moves: vec![settle(half), settle(0)],
            rss,
            stats: Some((ram / 4, ram)),
            ..Findings::default()
        };
        let done = Ending::Exited(0);
        // 1.1 GiB resident, 600 MiB ballooned out, all back after the touch.
        let good = findings(vec![kib(1100), kib(600), kib(1100)]);
        assert_eq!(
            judge_round_trip(&done, &good, ram, true).map_err(|e| e.to_string()),
            Ok(())
        );
        // The pages never came back on use.
        let stuck = findings(vec![kib(1100), kib(600), kib(650)]);
        let e = judge_round_trip(&done, &stuck, ram, true).unwrap_err();
        assert!(
            e.to_string()
                .contains("600 MiB ballooned, 650 MiB after the deflate"),
            "{e}"
        );
        // Nothing was discarded in the first place.
        let kept = findings(vec![kib(1100), kib(1000), kib(1100)]);
        assert!(judge_round_trip(&done, &kept, ram, true).is_err());
        // No reading after the deflate.
        let blind = findings(vec![kib(1100), kib(600), None]);
        assert!(judge_round_trip(&done, &blind, ram, true).is_err());
    }

    #[test]
    fn chunk_counts_parse() {
        let line = "balloon settled: actual 131088 pages in 9 ms; offline 131088; frames ok; lint 0; TLB entries 40 (boot optimum 40); 2 batches, 4 notifications, 9 descriptors, 3 interrupts; chunks 2M 256 64K 1 4K 0";
        assert_eq!(parse_chunks(line), Some([256, 1, 0]));
        // The interrupt count before the chunk counts still reads.
        assert_eq!(interrupts_of(line), Some(3));
        assert_eq!(parse_chunks("balloon settled: actual 0 pages"), None);
    }

    #[test]
    fn settle_lines_parse() {
        let l = "balloon settled: actual 131072 pages in 812 ms; offline 131072; frames ok; lint 0; TLB entries 420 (boot optimum 154); 5 batches, 5 notifications, 513 descriptors";
        assert_eq!(parse_settled(l), Some((131072, true, 0, 420, 154)));
        let bad = l.replace("frames ok", "frames LOST");
        assert_eq!(parse_settled(&bad).map(|p| p.1), Some(false));
        assert_eq!(parse_settled("ready"), None);
        assert_eq!(interrupts_of(l), None);
        let with_irqs = format!("{l}, 17 interrupts");
        assert_eq!(interrupts_of(&with_irqs), Some(17));
        assert_eq!(parse_settled(&with_irqs), Some((131072, true, 0, 420, 154)));
    }

    #[test]
    fn settle_reports_read_for_a_person() {
        let l = "balloon settled: actual 131072 pages in 812 ms; offline 131072; frames ok; lint 0; TLB entries 154 (boot optimum 154); 5 batches, 5 notifications, 513 descriptors, 9 interrupts";
        let d = describe_settled(l).unwrap();
        assert!(
            d.contains("812 ms")
                && d.contains("154 entries against an optimum of 154 (at the optimum)"),
            "{d}"
        );
        let log = Mutex::new(None);
        log_line(&log, "balloon settled");
        assert_eq!(
            log_path(Path::new("/tmp/x.qmp")),
            PathBuf::from("/tmp/x.balloon.log")
        );
    }

    #[test]
    fn cpu_ticks_come_from_fields_14_and_15() {
        let stat = "4242 (qemu-system-aar ch64) S 1 2 3 4 5 6 7 8 9 10 250 31 0 0 20 0";
        assert_eq!(cpu_ticks_of_stat(stat), Some(281));
        assert_eq!(cpu_ticks_of_stat("garbage"), None);
    }
}
