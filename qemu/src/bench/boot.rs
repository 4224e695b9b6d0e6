//! `cargo qemu bench boot`: how long the firmware's memory bring-up takes in
//! guest time, under `-icount shift=0` (guest time counts instructions, 1 ns
//! each), so the figures repeat exactly from run to run. The firmware times
//! the spans itself, with no console output inside them: console output
//! waits on the host draining the pipe, which is not repeatable. QEMU TCG
//! models no caches or pipelines, so these are instruction budgets, not
//! hardware latencies.

use super::Record;
use crate::boot::{boot, Boot, BootOptions, Ending};
use crate::error::{Error, Result, Want};
use crate::log::{Decoder, LogLine};
use crate::machine::Machine;
use std::path::Path;
use std::time::Duration;

/// The durations in a message, in order: every number followed by the word
/// `ns` (`"stage-1 map 12 ns, b 34 ns"` -> `[12, 34]`).
pub fn durations_ns(message: &str) -> Vec<u64> {
    let words: Vec<&str> = message.split_whitespace().collect();
    words
        .windows(2)
        .filter(|w| w[1].trim_end_matches(',') == "ns")
        .filter_map(|w| w[0].parse().ok())
        .collect()
}

/// The defmt decoder of the ELF at `elf`.
pub(super) fn decoder(elf: &Path) -> Result<Decoder> {
    Decoder::read(elf)
}

/// Boots `elf` on `machine` with `append` as bootargs until it logs
/// `ready` (2 minutes at most); any other ending is an error, `what`
/// naming the boot in it.
pub(super) fn boot_to_ready(
    machine: &Machine,
    elf: &Path,
    decoder: &Decoder,
    append: Option<&str>,
    what: &str,
) -> Result<Boot> {
    let ready = |l: &LogLine| l.message == "ready";
    let opts = BootOptions {
        semihosting_args: vec![],
        append,
        qmp: None,
        timeout: Duration::from_secs(120),
        echo: false,
        stop_when: Some(&ready),
        on_started: None,
        paused: false,
    };
    let b = boot(machine, elf, decoder, &opts)?;
    if b.ending != Ending::Stopped {
        let ended = Error::Ending {
            got: b.ending,
            want: Want::Exit(None),
        };
        return Err(Error::during(format!("boot with {what}"))(ended).with_log(b.transcript()));
    }
    Ok(b)
}

/// Boots the firmware with 1 GiB and 4 GiB of RAM and reports the bring-up
/// spans the firmware logged.
pub fn run(elf: &Path, board: &'static str) -> Result<Vec<Record>> {
    let decoder = decoder(elf)?;
    let mut out = Vec::new();
    let base = Machine::board(board, Machine::entry_els(board)[0]);
    // The raspi models have fixed RAM; the others boot with 1 and 4 GiB.
    let mems: &[&'static str] = if board.starts_with("raspi") {
        &[base.mem]
    } else {
        &["1G", "4G"]
    };
    for &mem in mems {
        let machine = Machine {
            mem,
            icount: true,
            ..base.clone()
        };
        let b = boot_to_ready(&machine, elf, &decoder, None, &format!("-m {mem}"))?;
        let line = b
            .lines
            .iter()
            .find(|l| l.message.starts_with("bring-up time:"))
            .ok_or_else(|| Error::Missing(format!("no bring-up time line with -m {mem}")))?;
        let [frames_ns, stage1_ns] = durations_ns(&line.message)[..] else {
            return Err(Error::Parse {
                what: "bring-up line",
                detail: line.message.clone(),
            });
        };
        let note = format!(
            "QEMU {board} -cpu {} -m {mem} -icount shift=0 (1 ns per guest instruction); timed by the firmware with CNTPCT",
            machine.cpu
        );
        let mem = if board == "virt" {
            mem.to_string()
        } else {
            format!("{board}_{mem}")
        };
        out.push(
            Record::new(
                "boot",
                format!("page_array_init_{mem}"),
                frames_ns as f64 / 1e3,
                "us",
            )
            .with_note(note.clone()),
        );
        out.push(
            Record::new(
                "boot",
                format!("stage1_map_mmu_on_{mem}"),
                stage1_ns as f64 / 1e3,
                "us",
            )
            .with_note(note),
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_order() {
        assert_eq!(
            durations_ns("bring-up time: page array and allocator 6706000 ns, stage-1 map and MMU on 353000 ns"),
            vec![6_706_000, 353_000]
        );
        assert_eq!(durations_ns("stage-1 has 2 levels"), Vec::<u64>::new());
    }
}
