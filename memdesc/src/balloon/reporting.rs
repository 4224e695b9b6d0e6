//! Free page reporting (virtio 1.2, 5.5.6.7): whole free 2 MiB blocks are
//! offered to the host on the reporting queue as device-writable buffers,
//! so it can discard their backing.
//!
//! - A block in flight is taken out of the allocator as an Offline
//!   allocation (no descriptor, no refcount), so nothing can reuse it
//!   before the host acknowledges it; the ack frees it again.
//! - A reported block is remembered in a bitmap (one bit per 2 MiB block,
//!   in the policy's own state, not in the page array) and is not reported
//!   again until it has been used: each scan first drops the bit of every
//!   block that is no longer wholly free. A block that was allocated and
//!   freed between two scans keeps its bit and is not reported again; that
//!   only costs the host memory it could have had, never a wrong report.
//! - A device reset voids the reports in flight: their blocks go back to
//!   the allocator unmarked (the host may or may not have discarded them;
//!   free memory has no contents to keep).

use super::device::{BalloonDevice, Buffer, Queue, Used};
use super::env::BalloonEnv;
use super::error::BalloonError;
use crate::addr::Pfn;
use crate::frames::FrozenKind;

/// Order of a reported block: 2 MiB.
pub const REPORT_ORDER: u8 = 9;
/// Frames per reported block.
pub const REPORT_PAGES: u64 = 1 << REPORT_ORDER;
/// Reports in flight at most (QEMU's reporting queue holds 32).
pub const MAX_IN_FLIGHT: usize = 32;
/// Bitmap words: 64 blocks each, 16 GiB from the first RAM frame.
const BITMAP_WORDS: usize = 128;
/// Blocks the bitmap covers.
pub const MAX_BLOCKS: u64 = BITMAP_WORDS as u64 * 64;

#[derive(Clone, Copy, Debug, Default)]
struct InFlight {
    id: u16,
    pfn: u64,
}

/// What the reporter has done since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReportCounters {
    /// Blocks reported and acknowledged.
    pub reported: u64,
    /// Blocks skipped because they were reported before and not used since.
    pub skipped_unused: u64,
    /// Reports dropped by a device reset.
    pub voided: u64,
}

/// Free page reporting state.
#[derive(Debug)]
pub struct Reporter {
    base: u64,
    reported: [u64; BITMAP_WORDS],
    in_flight: [InFlight; MAX_IN_FLIGHT],
    n: usize,
    counters: ReportCounters,
}

impl Default for Reporter {
    fn default() -> Self {
        Self::new()
    }
}

impl Reporter {
    /// Nothing reported yet.
    pub const fn new() -> Self {
        Self {
            base: 0,
            reported: [0; BITMAP_WORDS],
            in_flight: [InFlight { id: 0, pfn: 0 }; MAX_IN_FLIGHT],
            n: 0,
            counters: ReportCounters {
                reported: 0,
                skipped_unused: 0,
                voided: 0,
            },
        }
    }

    /// Counters.
    pub fn counters(&self) -> ReportCounters {
        self.counters
    }

    /// Frames the host holds for reports not yet acknowledged (Offline).
    pub fn in_flight_frames(&self) -> u64 {
        self.n as u64 * REPORT_PAGES
    }

    /// Whether the 2 MiB block at `pfn` is marked reported.
    pub fn is_reported(&self, pfn: Pfn) -> bool {
        self.bit(pfn.0)
            .is_some_and(|(w, m)| self.reported[w] & m != 0)
    }

    /// Whether the block at `pfn` is in flight.
    pub fn is_in_flight(&self, pfn: Pfn) -> bool {
        self.in_flight[..self.n].iter().any(|r| r.pfn == pfn.0)
    }

    fn bit(&self, pfn: u64) -> Option<(usize, u64)> {
        let b = pfn.checked_sub(self.base)? / REPORT_PAGES;
        (b < MAX_BLOCKS).then(|| ((b / 64) as usize, 1u64 << (b % 64)))
    }

    fn set(&mut self, pfn: u64, on: bool) {
        if let Some((w, m)) = self.bit(pfn) {
            if on {
                self.reported[w] |= m;
            } else {
                self.reported[w] &= !m;
            }
        }
    }

    /// Scans RAM for whole free 2 MiB blocks not reported since their last
    /// use and reports as many as the queue takes, with one notification.
    /// Returns the blocks sent.
    ///
    /// Reports never take free memory below `floor` frames: the firmware's
    /// own allocations keep their headroom while the host holds a report.
    ///
    /// # Errors
    ///
    /// [`BalloonError::Device`] when the reporting queue refuses a buffer
    /// (the blocks sent before stay in flight, that block goes back);
    /// [`BalloonError::FramesBusy`] when the allocator is held elsewhere;
    /// [`BalloonError::Frames`] when the allocator refuses to take back a
    /// block it just gave.
    pub fn report<D: BalloonDevice, E: BalloonEnv>(
        &mut self,
        dev: &mut D,
        env: &mut E,
        floor: u64,
    ) -> Result<u64, BalloonError> {
        if dev.queue_size(Queue::Reporting) == 0 {
            return Ok(0);
        }
        let mut sections = [(0u64, 0u64); 8];
        let ns = env.with_frames(|fa| {
            let s = fa.page_array().sections();
            for (d, s) in sections.iter_mut().zip(s) {
                *d = (s.start, s.end);
            }
            s.len().min(8)
        })?;
        if ns == 0 {
            return Ok(0);
        }
        self.base = sections[0].0 & !(REPORT_PAGES - 1);
        let mut sent = 0;
        let mut err = None;
        'scan: for &(start, end) in &sections[..ns] {
            let mut pfn = start.next_multiple_of(REPORT_PAGES);
            while pfn + REPORT_PAGES <= end {
                let here = pfn;
                pfn += REPORT_PAGES;
                if self.bit(here).is_none() || self.is_in_flight(Pfn(here)) {
                    continue;
                }
                let taken = env.with_frames(|fa| {
                    fa.alloc_frozen_at(Pfn(here), REPORT_ORDER, FrozenKind::Offline)
                })?;
                if taken.is_err() {
                    // Not wholly free: used (or in use) since any report.
                    self.set(here, false);
                    continue;
                }
                if self.is_reported(Pfn(here)) {
                    self.counters.skipped_unused += 1;
                    env.with_frames(|fa| fa.free_frozen(Pfn(here), REPORT_ORDER))??;
                    continue;
                }
                let free = env.with_frames(|fa| fa.count(crate::frames::FrameType::Free))?;
                if self.n == MAX_IN_FLIGHT || dev.queue_free(Queue::Reporting) == 0 || free < floor
                {
                    env.with_frames(|fa| fa.free_frozen(Pfn(here), REPORT_ORDER))??;
                    break 'scan;
                }
                let buf = Buffer {
                    addr: env.dma_addr(Pfn(here)),
                    len: (REPORT_PAGES * crate::PAGE_SIZE) as u32,
                    device_writable: true,
                };
                match dev.add(Queue::Reporting, &[buf]) {
                    Ok(id) => {
                        self.in_flight[self.n] = InFlight { id, pfn: here };
                        self.n += 1;
                        sent += 1;
                    }
                    Err(e) => {
                        env.with_frames(|fa| fa.free_frozen(Pfn(here), REPORT_ORDER))??;
                        err = Some(e.into());
                        break 'scan;
                    }
                }
            }
        }
        if sent > 0 {
            dev.notify(Queue::Reporting);
        }
        err.map_or(Ok(sent), Err)
    }

    /// The host acknowledged `u`: its block is free again, and marked.
    ///
    /// # Errors
    ///
    /// [`BalloonError::UnknownUsedId`] when `u.id` is not a report in
    /// flight, [`BalloonError::WrongUsedLength`] when the device claims to
    /// have written more than the block (both leave the report in flight);
    /// [`BalloonError::FramesBusy`] or [`BalloonError::Frames`] when the
    /// allocator is held or refuses to take the block back.
    pub fn on_used<E: BalloonEnv>(&mut self, env: &mut E, u: Used) -> Result<(), BalloonError> {
        let i = self.in_flight[..self.n]
            .iter()
            .position(|r| r.id == u.id)
            .ok_or(BalloonError::UnknownUsedId {
                queue: Queue::Reporting,
                id: u.id,
            })?;
        let r = self.in_flight[i];
        if u64::from(u.len) > REPORT_PAGES * crate::PAGE_SIZE {
            return Err(BalloonError::WrongUsedLength {
                queue: Queue::Reporting,
                id: u.id,
                len: u.len,
            });
        }
        self.in_flight[i] = self.in_flight[self.n - 1];
        self.n -= 1;
        env.with_frames(|fa| fa.free_frozen(Pfn(r.pfn), REPORT_ORDER))??;
        self.set(r.pfn, true);
        self.counters.reported += 1;
        Ok(())
    }

    /// The device was reset: every report in flight is void, its block
    /// goes back to the allocator unmarked.
    ///
    /// # Errors
    ///
    /// [`BalloonError::FramesBusy`] or [`BalloonError::Frames`] when the
    /// allocator is held or refuses to take a block back; the reports not
    /// yet voided stay in flight.
    pub fn void<E: BalloonEnv>(&mut self, env: &mut E) -> Result<(), BalloonError> {
        while self.n > 0 {
            let r = self.in_flight[self.n - 1];
            env.with_frames(|fa| fa.free_frozen(Pfn(r.pfn), REPORT_ORDER))??;
            self.n -= 1;
            self.counters.voided += 1;
        }
        Ok(())
    }
}
