//! The balloon's PFN arrays: every ballooned 4 KiB frame as a le32 PFN
//! (virtio 1.2, 5.5.6: "address >> 12" whatever the page size), in frames of
//! their own, never in lists threaded through the page array.
//!
//! Two levels: a few directory frames (their PFNs kept here) each hold 1024
//! le32 PFNs of array frames, and each array frame holds 1024 le32 PFNs of
//! ballooned frames. The array frames double as the inflate and deflate
//! buffers: a chain is simply a slice of an array frame, so nothing is
//! copied. Entries are appended in allocation order, so the frames of one
//! Offline allocation (a chunk) are consecutive entries with ascending PFNs
//! and the head first; the policy relies on that to return whole chunks.
//!
//! Array and directory frames are Slab frames of the allocator (frozen, with
//! a Slab descriptor): the balloon's own memory, which the floor keeps.

use super::env::BalloonEnv;
use super::error::{BalloonError, Inconsistency};
use crate::addr::{Pfn, PhysAddr};
use crate::frames::FrozenKind;

/// le32 PFNs per 4 KiB frame.
pub const PFNS_PER_FRAME: u64 = 1024;
/// Directory frames: `DIR_FRAMES * 1024 * 1024` entries, 32 GiB of 4 KiB frames.
pub const DIR_FRAMES: usize = 8;
/// Entries the arrays can hold at most.
pub const MAX_ENTRIES: u64 = DIR_FRAMES as u64 * PFNS_PER_FRAME * PFNS_PER_FRAME;

/// The two-level PFN array.
#[derive(Debug, Default)]
pub struct PfnArray {
    dir: [Option<Pfn>; DIR_FRAMES],
    pages: u64,
    len: u64,
}

fn read_u32<E: BalloonEnv>(env: &mut E, frame: Pfn, i: u64) -> u32 {
    let p = env.frame(frame).as_ptr().cast::<u32>();
    // SAFETY: `frame` is one of our Slab frames (BalloonEnv contract: 4 KiB,
    // aligned, ours alone) and `i < 1024`, so the read is in bounds and aligned.
    unsafe { p.add((i % PFNS_PER_FRAME) as usize).read() }
}

fn write_u32<E: BalloonEnv>(env: &mut E, frame: Pfn, i: u64, v: u32) {
    let p = env.frame(frame).as_ptr().cast::<u32>();
    // SAFETY: as in `read_u32`. The value is stored little-endian, as virtio
    // wants, on a little-endian CPU; on a big-endian one `to_le` swaps it.
    unsafe { p.add((i % PFNS_PER_FRAME) as usize).write(v.to_le()) }
}

impl PfnArray {
    /// An empty array (no frames).
    pub const fn new() -> Self {
        Self {
            dir: [None; DIR_FRAMES],
            pages: 0,
            len: 0,
        }
    }

    /// Entries.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Entries the allocated frames hold.
    pub fn capacity(&self) -> u64 {
        self.pages * PFNS_PER_FRAME
    }

    /// Frames the array itself uses (array and directory frames).
    pub fn frames(&self) -> u64 {
        self.pages + self.dir.iter().flatten().count() as u64
    }

    /// Frames needed to hold `entries` entries (array plus directory).
    pub fn frames_for(entries: u64) -> u64 {
        let pages = entries.div_ceil(PFNS_PER_FRAME);
        pages + pages.div_ceil(PFNS_PER_FRAME)
    }

    fn page_pfn<E: BalloonEnv>(&self, env: &mut E, page: u64) -> Result<Pfn, BalloonError> {
        let d = self
            .dir
            .get((page / PFNS_PER_FRAME) as usize)
            .copied()
            .flatten()
            .ok_or(BalloonError::Corrupt {
                pfn: Pfn(page),
                what: Inconsistency::NoDirectoryFrame,
            })?;
        Ok(Pfn(read_u32(env, d, page) as u64))
    }

    /// Entry `i` (must be `< len`).
    ///
    /// # Errors
    ///
    /// [`BalloonError::Corrupt`] when `i` is not below `len` or the array
    /// page holding it has no directory frame (a bug in the array's
    /// bookkeeping).
    pub fn get<E: BalloonEnv>(&self, env: &mut E, i: u64) -> Result<u32, BalloonError> {
        if i >= self.len {
            return Err(BalloonError::Corrupt {
                pfn: Pfn(i),
                what: Inconsistency::IndexOutOfRange,
            });
        }
        let page = self.page_pfn(env, i / PFNS_PER_FRAME)?;
        Ok(u32::from_le(read_u32(env, page, i)))
    }

    /// Overwrites entry `i` (must be `< len`).
    ///
    /// # Errors
    ///
    /// [`BalloonError::Corrupt`] when `i` is not below `len` or the array
    /// page holding it has no directory frame (a bug in the array's
    /// bookkeeping). Nothing is written on error.
    pub fn set<E: BalloonEnv>(&mut self, env: &mut E, i: u64, v: u32) -> Result<(), BalloonError> {
        if i >= self.len {
            return Err(BalloonError::Corrupt {
                pfn: Pfn(i),
                what: Inconsistency::IndexOutOfRange,
            });
        }
        let page = self.page_pfn(env, i / PFNS_PER_FRAME)?;
        write_u32(env, page, i, v);
        Ok(())
    }

    /// Device address of entry `i` (which must be within capacity).
    ///
    /// # Errors
    ///
    /// [`BalloonError::Corrupt`] when the array page holding entry `i` has
    /// no directory frame, which is the case when `i` is beyond capacity.
    pub fn entry_addr<E: BalloonEnv>(&self, env: &mut E, i: u64) -> Result<PhysAddr, BalloonError> {
        let page = self.page_pfn(env, i / PFNS_PER_FRAME)?;
        Ok(PhysAddr(env.dma_addr(page).0 + (i % PFNS_PER_FRAME) * 4))
    }

    /// Appends `n` consecutive PFNs starting at `first`; the capacity must
    /// have been reserved.
    ///
    /// # Errors
    ///
    /// [`BalloonError::ArrayFull`] when `n` more entries do not fit the
    /// reserved capacity (nothing is written), [`BalloonError::Corrupt`]
    /// when an array page has no directory frame. `len` grows only on
    /// success.
    pub fn push_run<E: BalloonEnv>(
        &mut self,
        env: &mut E,
        first: u32,
        n: u64,
    ) -> Result<(), BalloonError> {
        if self.len + n > self.capacity() {
            return Err(BalloonError::ArrayFull);
        }
        let mut i = 0;
        while i < n {
            let at = self.len + i;
            let page = self.page_pfn(env, at / PFNS_PER_FRAME)?;
            let in_page = (PFNS_PER_FRAME - at % PFNS_PER_FRAME).min(n - i);
            for k in 0..in_page {
                write_u32(env, page, at + k, first + (i + k) as u32);
            }
            i += in_page;
        }
        self.len += n;
        Ok(())
    }

    /// Grows the frames so that `extra` more entries fit. On failure the
    /// frames allocated so far stay (they are used by the next growth or
    /// freed by [`PfnArray::shrink`]).
    ///
    /// # Errors
    ///
    /// [`BalloonError::ArrayFull`] when `len + extra` exceeds what the
    /// directory can address; [`BalloonError::Frames`] when the allocator
    /// has no frame to give (or refuses to take back one it gave);
    /// [`BalloonError::FramesBusy`] when the allocator is held elsewhere;
    /// [`BalloonError::PfnTooHigh`] when the allocator hands out a frame a
    /// 32-bit PFN cannot name (that frame is freed again).
    pub fn reserve<E: BalloonEnv>(&mut self, env: &mut E, extra: u64) -> Result<(), BalloonError> {
        let want = self.len + extra;
        if want > MAX_ENTRIES {
            return Err(BalloonError::ArrayFull);
        }
        while self.capacity() < want {
            let page = self.pages;
            let d = (page / PFNS_PER_FRAME) as usize;
            if self.dir[d].is_none() {
                let f = env.with_frames(|fa| fa.alloc_frozen(0, FrozenKind::Slab))??;
                self.dir[d] = Some(f);
            }
            let f = env.with_frames(|fa| fa.alloc_frozen(0, FrozenKind::Slab))??;
            let Ok(v) = u32::try_from(f.0) else {
                env.with_frames(|fa| fa.free_frozen(f, 0))??;
                return Err(BalloonError::PfnTooHigh { pfn: f });
            };
            let dir = self.dir[d].ok_or(BalloonError::ArrayFull)?;
            write_u32(env, dir, page, v);
            self.pages += 1;
        }
        Ok(())
    }

    /// Drops entries from `new_len` on and frees the frames no longer needed.
    ///
    /// # Errors
    ///
    /// As [`PfnArray::shrink`]; the entries are dropped even then.
    pub fn truncate<E: BalloonEnv>(
        &mut self,
        env: &mut E,
        new_len: u64,
    ) -> Result<(), BalloonError> {
        self.len = self.len.min(new_len);
        self.shrink(env)
    }

    /// Frees array and directory frames beyond what `len` needs.
    ///
    /// # Errors
    ///
    /// [`BalloonError::Corrupt`] when an array page to free has no
    /// directory frame; [`BalloonError::Frames`] when the allocator refuses
    /// to free a frame; [`BalloonError::FramesBusy`] when the allocator is
    /// held elsewhere. Frames freed before the error stay freed.
    pub fn shrink<E: BalloonEnv>(&mut self, env: &mut E) -> Result<(), BalloonError> {
        let keep = self.len.div_ceil(PFNS_PER_FRAME);
        while self.pages > keep {
            let f = self.page_pfn(env, self.pages - 1)?;
            env.with_frames(|fa| fa.free_frozen(f, 0))??;
            self.pages -= 1;
        }
        let keep_dirs = self.pages.div_ceil(PFNS_PER_FRAME) as usize;
        for slot in self.dir.iter_mut().skip(keep_dirs) {
            if let Some(f) = slot.take() {
                env.with_frames(|fa| fa.free_frozen(f, 0))??;
            }
        }
        Ok(())
    }
}
