//! `cargo qemu bench balloon`: a 2 GiB guest whose RAM was written once
//! (`balloon.touch`, so QEMU holds it resident), ballooned by 1 GiB and back
//! on `-cpu max` and `cortex-a53` under TCG. Timed on the host from the QMP
//! `balloon` command to `query-balloon` showing the target (polled every
//! 2 ms); QEMU's resident memory is read from /proc before and after.

use super::Record;
use crate::balloon::{qemu_rss_kib, wait_line};
use crate::boot::{boot, BootOptions};
use crate::log::{Decoder, LogLine};
use crate::machine::Machine;
use crate::qmp::{Qmp, SocketIo};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const GIB: u64 = 1 << 30;
const PAGES: u64 = GIB / 4096;

struct Run {
    inflate: Duration,
    deflate: Duration,
    rss_before: u64,
    rss_ballooned: u64,
}

fn timed(q: &mut Qmp<SocketIo>, target: u64) -> Result<Duration, String> {
    let t0 = Instant::now();
    q.balloon(target).map_err(|e| e.to_string())?;
    loop {
        if q.query_balloon().map_err(|e| e.to_string())? == target {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > Duration::from_secs(300) {
            return Err(format!("balloon to {} MiB did not finish", target >> 20));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn drive(q: &mut Qmp<SocketIo>, path: &Path, seen: &Mutex<Vec<String>>) -> Result<Run, String> {
    wait_line(
        seen,
        0,
        |l| l.starts_with("balloon: up"),
        Duration::from_secs(300),
    )?;
    let rss_before = qemu_rss_kib(path).ok_or("no QEMU RSS")?;
    let inflate = timed(q, GIB)?;
    let rss_ballooned = qemu_rss_kib(path).ok_or("no QEMU RSS")?;
    let deflate = timed(q, 2 * GIB)?;
    Ok(Run {
        inflate,
        deflate,
        rss_before,
        rss_ballooned,
    })
}

fn one(cpu: &'static str, elf: &Path, decoder: &Decoder) -> Result<Run, String> {
    let m = Machine {
        cpu,
        mem: "2G",
        ..Machine::default()
    };
    let path = std::env::temp_dir().join(format!(
        "cargo-qemu-balloon-bench-{}-{cpu}.qmp",
        std::process::id()
    ));
    let seen = Mutex::new(Vec::<String>::new());
    let result = Mutex::new(None);
    let record = |l: &LogLine| {
        if let Ok(mut s) = seen.lock() {
            s.push(l.message.clone());
        }
        false
    };
    let driver = || {
        let r = match Qmp::connect(&path, Duration::from_secs(10)) {
            Ok(mut q) => {
                let r = drive(&mut q, &path, &seen);
                let _ = q.execute("quit", None);
                r
            }
            Err(e) => Err(e.to_string()),
        };
        if let Ok(mut slot) = result.lock() {
            *slot = Some(r);
        }
    };
    let opts = BootOptions {
        semihosting_args: vec![],
        append: Some("balloon.touch"),
        qmp: Some(&path),
        timeout: Duration::from_secs(600),
        echo: false,
        stop_when: Some(&record),
        on_started: Some(&driver),
        paused: false,
    };
    let b = boot(&m, elf, decoder, &opts);
    let _ = std::fs::remove_file(&path);
    let b = b?;
    result
        .into_inner()
        .ok()
        .flatten()
        .unwrap_or_else(|| Err("the QMP driver did not finish".into()))
        .map_err(|e| format!("{e}\n{}", b.transcript()))
}

/// Runs the benchmark on both CPUs.
pub fn run(elf: &Path) -> Result<Vec<Record>, String> {
    let bytes = std::fs::read(elf).map_err(|e| format!("{}: {e}", elf.display()))?;
    let decoder = Decoder::new(&bytes)?;
    let mut out = Vec::new();
    for cpu in ["max", "cortex-a53"] {
        let r = one(cpu, elf, &decoder)?;
        let note = format!(
            "-cpu {cpu}, 2 GiB guest, 1 GiB step ({PAGES} pages), RAM written first; \
             QEMU RSS {} -> {} MiB; chunks: {}",
            r.rss_before >> 10,
            r.rss_ballooned >> 10,
            if cpu == "max" {
                "2M/64K/4K"
            } else {
                "2M only (no FEAT_BBM level 2)"
            }
        );
        let rate = |d: Duration| PAGES as f64 / d.as_secs_f64();
        out.push(
            Record::new(
                "balloon",
                format!("inflate_{cpu}"),
                rate(r.inflate),
                "pages/s",
            )
            .with_note(note.clone()),
        );
        out.push(
            Record::new(
                "balloon",
                format!("deflate_{cpu}"),
                rate(r.deflate),
                "pages/s",
            )
            .with_note(note.clone()),
        );
        let released = r.rss_before.saturating_sub(r.rss_ballooned) as f64 / 1024.0;
        out.push(
            Record::new(
                "balloon",
                format!("rss_released_{cpu}"),
                released / r.inflate.as_secs_f64(),
                "MiB/s",
            )
            .with_note(note),
        );
    }
    Ok(out)
}
