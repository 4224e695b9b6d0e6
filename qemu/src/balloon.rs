//! The balloon's system test, driven over QMP: boot a 1 GiB guest, balloon
//! it to 512 MiB and back, and check that `query-balloon` reaches each
//! target and that the firmware's settle report (frame accounting, linter,
//! TLB footprint) is clean each time.

use crate::boot::{boot, BootOptions, Ending};
use crate::log::{Decoder, LogLine};
use crate::machine::Machine;
use crate::qmp::{Qmp, QmpError, SocketIo};
use std::path::Path;
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

fn wait_line(
    seen: &Mutex<Vec<String>>,
    from: usize,
    pred: impl Fn(&str) -> bool,
    timeout: Duration,
) -> Result<(usize, String), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(lines) = seen.lock() {
            if let Some((i, l)) = lines.iter().enumerate().skip(from).find(|(_, l)| pred(l)) {
                return Ok((i, l.clone()));
            }
        }
        if Instant::now() >= deadline {
            return Err("timed out waiting for the firmware's log".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_actual(q: &mut Qmp<SocketIo>, target: u64, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let actual = q.query_balloon().map_err(|e| e.to_string())?;
        if actual == target {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "query-balloon stuck at {} MiB, target {} MiB",
                actual >> 20,
                target >> 20
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Balloons the guest to each of `targets` (bytes) in turn.
fn scenario(
    q: &mut Qmp<SocketIo>,
    seen: &Mutex<Vec<String>>,
    ram: u64,
    targets: &[u64],
) -> Result<Vec<Move>, String> {
    let (mut from, _) = wait_line(
        seen,
        0,
        |l| l.starts_with("balloon: up"),
        Duration::from_secs(60),
    )?;
    let mut moves = Vec::new();
    for &target in targets {
        let t0 = Instant::now();
        q.balloon(target).map_err(|e: QmpError| e.to_string())?;
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
        moves.push(Move {
            target,
            took,
            settled,
        });
    }
    Ok(moves)
}

/// Boots `elf` on `m` with QMP and runs the 1 GiB -> 512 MiB -> 1 GiB
/// scenario; `Ok(wall time)` or why it failed, with the transcript.
pub fn system_test(m: &Machine, elf: &Path, decoder: &Decoder) -> Result<Duration, String> {
    let qmp_path = std::env::temp_dir().join(format!(
        "cargo-qemu-balloon-{}-{}.qmp",
        std::process::id(),
        m.label().replace(' ', "-")
    ));
    let ram = m.mem_bytes();
    let targets = [ram / 2, ram];
    let seen = Mutex::new(Vec::<String>::new());
    let result: Mutex<Option<Result<Vec<Move>, String>>> = Mutex::new(None);
    let record = |l: &LogLine| {
        if let Ok(mut s) = seen.lock() {
            s.push(l.message.clone());
        }
        false
    };
    let drive = || {
        let r = match Qmp::connect(&qmp_path, Duration::from_secs(10)) {
            Ok(mut q) => {
                let r = scenario(&mut q, &seen, ram, &targets);
                // Ends the boot either way (QEMU exits 0 on `quit`).
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
        semihosting_args: vec![format!("entry_el={}", m.el), format!("mem_bytes={}", ram)],
        append: None,
        qmp: Some(&qmp_path),
        timeout: Duration::from_secs(300),
        echo: false,
        stop_when: Some(&record),
        on_started: Some(&drive),
    };
    let b = boot(m, elf, decoder, &opts);
    let _ = std::fs::remove_file(&qmp_path);
    let b = b?;
    let moves = result
        .into_inner()
        .ok()
        .flatten()
        .unwrap_or_else(|| Err("the QMP driver did not finish".into()));
    let verdict = moves.and_then(|moves| {
        if !matches!(b.ending, Ending::Exited(0)) {
            return Err(format!("QEMU ended {:?} instead of quitting", b.ending));
        }
        for (k, mv) in moves.iter().enumerate() {
            let (actual, ok, lint, tlb, optimum) = parse_settled(&mv.settled)
                .ok_or_else(|| format!("unparsable settle line {:?}", mv.settled))?;
            println!(
                "  balloon to {} MiB: {:.2} s, {} pages ballooned",
                mv.target >> 20,
                mv.took.as_secs_f64(),
                actual
            );
            if !ok {
                return Err(format!("frames lost: {}", mv.settled));
            }
            if lint != 0 {
                return Err(format!("linter: {}", mv.settled));
            }
            if k == moves.len() - 1 && tlb != optimum {
                return Err(format!(
                    "TLB footprint not back at the optimum: {}",
                    mv.settled
                ));
            }
        }
        Ok(())
    });
    verdict
        .map(|()| b.elapsed)
        .map_err(|e| format!("{e}\n{}", b.transcript()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settle_lines_parse() {
        let l = "balloon settled: actual 131072 pages in 812 ms; offline 131072; frames ok; lint 0; TLB entries 420 (boot optimum 154); 5 batches, 5 notifications, 513 descriptors";
        assert_eq!(parse_settled(l), Some((131072, true, 0, 420, 154)));
        let bad = l.replace("frames ok", "frames LOST");
        assert_eq!(parse_settled(&bad).map(|p| p.1), Some(false));
        assert_eq!(parse_settled("ready"), None);
    }
}
