//! The on-target half of `cargo qemu bench smp`: order-0 folio alloc + free
//! throughput per vCPU with 1, 2 and 4 vCPUs on `virt` (`-smp N`, one host
//! thread per vCPU, multi-threaded TCG). The firmware binary, booted with
//! `bench=smp` in its bootargs, starts its secondaries, has every core
//! allocate and free for a fixed guest time, and logs one line per run
//! (firmware/src/smp.rs); this boots it once per vCPU count and turns the
//! lines into records. Wall-clock guest time (CNTPCT follows the host under
//! TCG, and `-icount` would force one thread), so the figures are noisy,
//! and on a machine with fewer host cores than vCPUs they are bounded by
//! the host, not by the allocator.

use super::Record;
use crate::error::{Error, Result};
use crate::machine::Machine;
use std::path::Path;

/// vCPU counts measured.
pub const VCPUS: [u8; 3] = [1, 2, 4];

/// What one bench line says: (cores that ran, alloc+free pairs in total,
/// nanoseconds of guest time).
pub fn parse_line(message: &str) -> Option<(u64, u64, u64)> {
    let words: Vec<&str> = message
        .strip_prefix("smp bench: ")?
        .split_whitespace()
        .collect();
    let before = |unit: &str| {
        words
            .windows(2)
            .find(|w| w[1].trim_end_matches(',') == unit)
            .and_then(|w| w[0].parse::<u64>().ok())
    };
    let (cores, ns) = (before("cores")?, before("ns")?);
    let pairs = words.get(2)?.parse().ok()?;
    (cores > 0 && ns > 0).then_some((cores, pairs, ns))
}

/// Boots the firmware binary `elf` (built for `virt`) with 1, 2 and 4 vCPUs
/// and reports alloc+free pairs per second per vCPU, and the scaling of the
/// total against one vCPU.
pub fn run(elf: &Path) -> Result<Vec<Record>> {
    let decoder = super::boot::decoder(elf)?;
    let mut out = Vec::new();
    let mut one_vcpu_total = None;
    for smp in VCPUS {
        let machine = Machine {
            smp,
            ..Machine::default()
        };
        let b = super::boot::boot_to_ready(
            &machine,
            elf,
            &decoder,
            Some("bench=smp"),
            &format!("-smp {smp}"),
        )?;
        let (cores, pairs, ns) = b
            .lines
            .iter()
            .find_map(|l| parse_line(&l.message))
            .ok_or_else(|| {
                Error::Missing(format!(
                    "no smp bench line with -smp {smp}:\n{}",
                    b.transcript()
                ))
            })?;
        if cores != u64::from(smp) {
            return Err(Error::Check(format!(
                "-smp {smp}: only {cores} cores ran the bench"
            )));
        }
        let total = pairs as f64 * 1e9 / ns as f64;
        let note = format!(
            "QEMU virt -cpu max -smp {smp} -accel tcg,thread=multi, order-0 folio alloc + free on every vCPU for {} ms of guest wall time, through FRAMES (the SmpFrameAllocator: per-CPU caches in front of the buddy lock)",
            ns / 1_000_000
        );
        out.push(
            Record::new(
                "smp",
                format!("target_alloc_free_per_vcpu_{smp}vcpu"),
                total / smp as f64,
                "pairs/s",
            )
            .with_note(note.clone()),
        );
        match one_vcpu_total {
            None => one_vcpu_total = Some(total),
            Some(base) => out.push(
                Record::new(
                    "smp",
                    format!("target_alloc_free_scaling_1_to_{smp}vcpu"),
                    total / base,
                    "x",
                )
                .with_note(note),
            ),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_line_parses() {
        assert_eq!(
            parse_line("smp bench: 4 cores, 123456 order-0 alloc+free pairs in 500000000 ns"),
            Some((4, 123_456, 500_000_000))
        );
        assert_eq!(parse_line("smp bench: 0 cores, 1 pairs in 2 ns"), None);
        assert_eq!(parse_line("ready"), None);
    }
}
