//! The statistics buffer (virtio 1.2, 5.5.6.3): packed `{le16 tag; le64
//! val}` entries, always the same tags in the same order, filled from the
//! frame allocator's counters each time the device hands the buffer back.

use super::env::BalloonEnv;
use crate::addr::{Pfn, PAGE_SIZE};
use crate::frames::{FrameStats, FrameType};

/// Stat tags (virtio 1.2, 5.5.6.3).
pub mod tag {
    /// Memory swapped in (bytes).
    pub const SWAP_IN: u16 = 0;
    /// Memory swapped out (bytes).
    pub const SWAP_OUT: u16 = 1;
    /// Major page faults.
    pub const MAJFLT: u16 = 2;
    /// Minor page faults.
    pub const MINFLT: u16 = 3;
    /// Free memory (bytes).
    pub const MEMFREE: u16 = 4;
    /// Total memory (bytes).
    pub const MEMTOT: u16 = 5;
    /// Memory available for new work without the balloon (bytes).
    pub const AVAIL: u16 = 6;
    /// Disk caches (bytes).
    pub const CACHES: u16 = 7;
    /// Huge page allocations.
    pub const HTLB_PGALLOC: u16 = 8;
    /// Failed huge page allocations.
    pub const HTLB_PGFAIL: u16 = 9;
}

/// Entries in the buffer.
pub const ENTRIES: usize = 10;
/// Bytes of one packed entry.
pub const ENTRY_BYTES: usize = 10;

/// The figures, in tag order 0..=9. The firmware does not swap, has no
/// page cache and takes no page faults it resolves, so those are true
/// zeros. Total is the memory the allocator manages (not reserved), less
/// the ballooned frames unless deflate-on-OOM can give them back (as Linux
/// adjusts its managed page count); available is free memory above the
/// balloon's reserve.
pub fn figures(
    s: &FrameStats,
    ballooned: u64,
    deflate_on_oom: bool,
    reserve: u64,
) -> [(u16, u64); ENTRIES] {
    let free = s.count(FrameType::Free);
    let managed = s.frames - s.count(FrameType::Reserved);
    let total = if deflate_on_oom {
        managed
    } else {
        managed.saturating_sub(ballooned)
    };
    [
        (tag::SWAP_IN, 0),
        (tag::SWAP_OUT, 0),
        (tag::MAJFLT, 0),
        (tag::MINFLT, 0),
        (tag::MEMFREE, free * PAGE_SIZE),
        (tag::MEMTOT, total * PAGE_SIZE),
        (tag::AVAIL, free.saturating_sub(reserve) * PAGE_SIZE),
        (tag::CACHES, 0),
        (tag::HTLB_PGALLOC, 0),
        (tag::HTLB_PGFAIL, 0),
    ]
}

/// Writes `values` packed into frame `frame`; returns the bytes written.
pub fn write<E: BalloonEnv>(env: &mut E, frame: Pfn, values: &[(u16, u64); ENTRIES]) -> u32 {
    let mut bytes = [0u8; ENTRIES * ENTRY_BYTES];
    for (i, (t, v)) in values.iter().enumerate() {
        let o = i * ENTRY_BYTES;
        bytes[o..o + 2].copy_from_slice(&t.to_le_bytes());
        bytes[o + 2..o + 10].copy_from_slice(&v.to_le_bytes());
    }
    let p = env.frame(frame).as_ptr();
    // SAFETY: `frame` is the balloon's own Slab frame (BalloonEnv contract:
    // 4 KiB, ours alone); 100 bytes fit.
    unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len()) };
    bytes.len() as u32
}

/// Parses a packed stats buffer (for tests and the host tool's checks).
pub fn parse(bytes: &[u8]) -> impl Iterator<Item = (u16, u64)> + '_ {
    bytes.chunks_exact(ENTRY_BYTES).map(|c| {
        let t = u16::from_le_bytes([c[0], c[1]]);
        let mut v = [0u8; 8];
        v.copy_from_slice(&c[2..10]);
        (t, u64::from_le_bytes(v))
    })
}
