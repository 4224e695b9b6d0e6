//! Compaction by PFN: when a high-order allocation fails only because
//! ballooned frames sit inside an otherwise free aligned block, the
//! balloon moves them out of the way instead of deflating.
//!
//! 1. Choose the block: aligned `2^order` frames, each Free or an Offline
//!    frame of one of the balloon's chunks (in the PFN arrays), with room
//!    outside it for replacements above the floor.
//! 2. Take the block's free parts out of the allocator (transient Guard
//!    allocations), so replacements cannot come from the block itself.
//! 3. Inflate replacements of the same orders elsewhere: unmapped,
//!    appended to the arrays, sent on the inflateq, acked.
//! 4. Swap each old chunk's entries with its replacement's (same order),
//!    so the old chunks are the arrays' tail, then deflate that tail the
//!    usual way (told to the host, mapped back, freed, re-folded).
//! 5. Give the block's free parts back: the buddy allocator merges the
//!    block whole.
//!
//! Everything is PFN arrays and page-array words: Offline frames never
//! gain a refcount or a descriptor on the way. The arrays are consistent
//! after every step, so an error midway loses nothing (the balloon is
//! then at most a few chunks above its goal and deflates them later).

use super::*;
use crate::frames::FrameType;

/// Chunks and free pieces one compaction handles at most.
const MAX_PARTS: usize = 128;

#[derive(Clone, Copy, Debug, Default)]
struct Part {
    pfn: u64,
    order: u8,
    /// Position in the PFN arrays (old chunks only).
    pos: u64,
}

impl Balloon {
    /// Frees an aligned block of `2^order` frames by migrating the
    /// ballooned chunks inside it elsewhere. Returns the block's first
    /// PFN, or `None` when no block qualifies (memory is short, not
    /// fragmented by the balloon).
    ///
    /// # Errors
    ///
    /// [`BalloonError::Busy`] when an inflate or deflate in flight does not
    /// complete, or a frame of the block is taken by someone else while it
    /// is being emptied, or not every replacement chunk could be placed
    /// and sent to the host;
    /// [`BalloonError::UnknownUsedId`], [`BalloonError::WrongUsedLength`]
    /// or [`BalloonError::ResetFailed`] from the used rings;
    /// [`BalloonError::Device`] when a queue refuses a chain;
    /// [`BalloonError::Map`], [`BalloonError::Frames`],
    /// [`BalloonError::FramesBusy`], [`BalloonError::PfnTooHigh`],
    /// [`BalloonError::ArrayFull`] or [`BalloonError::Corrupt`] from the
    /// stage-1 map, the allocator or the PFN arrays. Free frames already
    /// taken out of the block go back to the allocator before an error of
    /// the migration is returned.
    pub fn compact_for<D: BalloonDevice, E: BalloonEnv>(
        &mut self,
        dev: &mut D,
        env: &mut E,
        order: u8,
    ) -> Result<Option<Pfn>, BalloonError> {
        if order == 0 || self.arr.is_empty() {
            return Ok(None);
        }
        self.wait_idle(dev, env)?;
        let mut old = [Part::default(); MAX_PARTS];
        let Some((block, nold, ballooned)) = self.choose_block(env, order, &mut old)? else {
            return Ok(None);
        };
        // Step 2: the block's free parts, out of the allocator.
        let mut pieces = [Part::default(); MAX_PARTS];
        let mut np = 0;
        let r = self.take_free_parts(env, block, order, &mut pieces, &mut np);
        let give_back = |env: &mut E, pieces: &[Part]| -> Result<(), BalloonError> {
            for p in pieces {
                env.with_frames(|fa| fa.free_frozen(Pfn(p.pfn), p.order))??;
            }
            Ok(())
        };
        if let Err(e) = r {
            give_back(env, &pieces[..np])?;
            return Err(e);
        }
        let r = self.migrate(dev, env, &old[..nold], ballooned);
        give_back(env, &pieces[..np])?;
        r?;
        self.counters.migrated += ballooned;
        self.counters.compactions += 1;
        Ok(Some(Pfn(block)))
    }

    /// Step 1. Fills `old` with the balloon's chunks inside the chosen
    /// block; returns (block, chunks, ballooned frames).
    fn choose_block<E: BalloonEnv>(
        &mut self,
        env: &mut E,
        order: u8,
        old: &mut [Part; MAX_PARTS],
    ) -> Result<Option<(u64, usize, u64)>, BalloonError> {
        let size = 1u64 << order;
        let floor = self.cfg.reserve_pages + TABLE_HEADROOM;
        let mut sections = [(0u64, 0u64); 8];
        let (ns, free) = env.with_frames(|fa| {
            let s = fa.page_array().sections();
            for (d, s) in sections.iter_mut().zip(s) {
                *d = (s.start, s.end);
            }
            (s.len().min(8), fa.count(FrameType::Free))
        })?;
        for &(start, end) in &sections[..ns] {
            let mut block = start.next_multiple_of(size);
            while block + size <= end {
                let here = block;
                block += size;
                // Count the block's frames: Free, the balloon's Offline
                // chunks, or anything else (then it does not qualify).
                let scan = env.with_frames(|fa| {
                    let mut free_in = 0u64;
                    let mut n = 0usize;
                    let mut pfn = here;
                    while pfn < here + size {
                        match fa
                            .page_array()
                            .word(Pfn(pfn))
                            .ok()
                            .and_then(|w| w.frame_type())
                        {
                            Some(FrameType::Free) => {
                                free_in += 1;
                                pfn += 1;
                            }
                            Some(FrameType::Offline) => {
                                let Ok((head, o)) = fa.offline_allocation_of(Pfn(pfn)) else {
                                    return None;
                                };
                                if head.0 != pfn || o > order || n == MAX_PARTS {
                                    return None;
                                }
                                old[n] = Part {
                                    pfn,
                                    order: o,
                                    pos: 0,
                                };
                                n += 1;
                                pfn += 1u64 << o;
                            }
                            _ => return None,
                        }
                    }
                    Some((free_in, n))
                })?;
                let Some((free_in, n)) = scan else { continue };
                let ballooned = size - free_in;
                if n == 0 || free.saturating_sub(free_in) < ballooned + floor {
                    continue;
                }
                if self.locate(env, &mut old[..n])? {
                    return Ok(Some((here, n, ballooned)));
                }
            }
        }
        Ok(None)
    }

    /// Finds each chunk's position in the arrays; false if one is not the
    /// balloon's (an Offline frame someone else owns, a report in flight).
    fn locate<E: BalloonEnv>(&self, env: &mut E, parts: &mut [Part]) -> Result<bool, BalloonError> {
        let mut found = 0;
        for p in parts.iter_mut() {
            p.pos = u64::MAX;
        }
        let mut i = 0;
        while i < self.arr.len() {
            let v = self.arr.get(env, i)? as u64;
            match parts.iter_mut().find(|p| p.pfn == v && p.pos == u64::MAX) {
                Some(p) => {
                    p.pos = i;
                    found += 1;
                    i += 1u64 << p.order;
                }
                None => i += 1,
            }
        }
        Ok(found == parts.len())
    }

    /// Step 2.
    fn take_free_parts<E: BalloonEnv>(
        &mut self,
        env: &mut E,
        block: u64,
        order: u8,
        pieces: &mut [Part; MAX_PARTS],
        np: &mut usize,
    ) -> Result<(), BalloonError> {
        let end = block + (1u64 << order);
        let mut pfn = block;
        while pfn < end {
            let max = (pfn - block).trailing_zeros().min(order as u32) as u8;
            let mut took = None;
            for o in (0..=max).rev() {
                if pfn + (1u64 << o) > end {
                    continue;
                }
                let r = env.with_frames(|fa| fa.alloc_frozen_at(Pfn(pfn), o, FrozenKind::Guard))?;
                if r.is_ok() {
                    took = Some(o);
                    break;
                }
            }
            match took {
                Some(o) => {
                    if *np == MAX_PARTS {
                        env.with_frames(|fa| fa.free_frozen(Pfn(pfn), o))??;
                        return Err(BalloonError::Busy);
                    }
                    pieces[*np] = Part {
                        pfn,
                        order: o,
                        pos: 0,
                    };
                    *np += 1;
                    pfn += 1u64 << o;
                }
                // A ballooned chunk: skip it whole.
                None => {
                    let (_, o) = env.with_frames(|fa| fa.offline_allocation_of(Pfn(pfn)))??;
                    pfn += 1u64 << o;
                }
            }
        }
        Ok(())
    }

    /// Steps 3 and 4.
    fn migrate<D: BalloonDevice, E: BalloonEnv>(
        &mut self,
        dev: &mut D,
        env: &mut E,
        old: &[Part],
        ballooned: u64,
    ) -> Result<(), BalloonError> {
        let len = self.arr.len();
        self.arr.reserve(env, ballooned)?;
        // Step 3: replacements, same order as each old chunk, in order.
        let mut added = 0usize;
        let mut err = None;
        for p in old {
            let pages = 1u64 << p.order;
            let pfn = match env.with_frames(|fa| fa.alloc_offline(p.order))? {
                Ok(pfn) => pfn,
                Err(e) => {
                    err = Some(e.into());
                    break;
                }
            };
            if pfn.0 + pages > 1 << 32 {
                env.with_frames(|fa| fa.free_frozen(pfn, p.order))??;
                err = Some(BalloonError::PfnTooHigh { pfn });
                break;
            }
            if let Err(e) = env.unmap(pfn, pages) {
                env.with_frames(|fa| fa.free_frozen(pfn, p.order))??;
                err = Some(e);
                break;
            }
            self.arr.push_run(env, pfn.0 as u32, pages)?;
            added += 1;
        }
        let end = self.arr.len();
        if added < old.len() {
            // Not all could be placed: give the new ones back untouched.
            let mut stop = end;
            let r = self.return_frames(env, len, &mut stop);
            self.arr.truncate(env, stop)?;
            r?;
            return Err(err.unwrap_or(BalloonError::Busy));
        }
        let (sent, serr) = self.submit(dev, env, Queue::Inflate, len, end);
        if sent < end || self.nchains == 0 {
            let mut stop = end;
            let r = self.return_frames(env, sent.max(len), &mut stop);
            self.arr.truncate(env, stop)?;
            if self.nchains > 0 {
                dev.notify(Queue::Inflate);
                self.counters.notifications += 1;
                self.op = Op::Inflating { start: len };
                self.wait_idle(dev, env)?;
            }
            r?;
            return Err(serr.unwrap_or(BalloonError::Busy));
        }
        dev.notify(Queue::Inflate);
        self.counters.notifications += 1;
        self.op = Op::Inflating { start: len };
        self.wait_idle(dev, env)?;
        // Step 4: old chunks to the tail (each swapped with its own
        // same-order replacement), then deflate the tail.
        let mut q = len;
        for p in old {
            let pages = 1u64 << p.order;
            for k in 0..pages {
                let a = self.arr.get(env, p.pos + k)?;
                let b = self.arr.get(env, q + k)?;
                self.arr.set(env, p.pos + k, b)?;
                self.arr.set(env, q + k, a)?;
            }
            q += pages;
        }
        let mut done = 0;
        while done < ballooned {
            let n = self.deflate(dev, env, ballooned - done)?;
            if n == 0 {
                break;
            }
            done += n;
            self.wait_idle(dev, env)?;
        }
        Ok(())
    }
}
