//! The frame allocator shared by several CPUs: per-CPU caches of free
//! blocks and folio descriptors in front of the buddy, which sits behind a
//! [`SpinLock`] (docs/architecture.md, "Concurrency").
//!
//! - Each CPU has a cache of free blocks of orders
//!   `0..=`[`PCP_MAX_ORDER`] and a stash of free folio descriptors, behind
//!   its own lock, which only that CPU takes on the fast path (so it is
//!   uncontended and its cache line stays local). Allocation pops from it;
//!   an empty cache is refilled with [`pcp_batch`] blocks (64 up to order
//!   3, fewer for larger orders) under the buddy lock, orders below
//!   [`PCP_LINE_ORDER`] by splitting whole 16-frame blocks; the stash
//!   keeps up to [`PCP_DESCS`] descriptors. A free pushes onto
//!   the freeing CPU's cache, whichever CPU allocated: the block is just a
//!   free block again. A cache that reaches [`pcp_high`] blocks of an order
//!   (128 up to order 3, then 2 MiB worth) drains a batch to the buddy
//!   first.
//! - [`SmpFrameAllocator::drain_cpu`] empties one CPU's cache (going idle or
//!   offline; may be called from another CPU). An allocation that finds the
//!   buddy empty drains every CPU's cache and retries before it fails.
//! - Cached blocks stay typed Free in the page array (a hot-cached head
//!   word), so speculative lookups ([`PageArray::get_folio`]) stay lock-free
//!   and see "free" until a CPU publishes a folio there, exactly as with one
//!   allocator.
//! - Per-type counts: the buddy counts cached frames as Free; each CPU
//!   keeps the deltas of its fast-path allocations and frees, folded into the
//!   buddy's counts whenever it holds both locks. [`SmpFrameAllocator::stats`]
//!   and [`SmpFrameAllocator::check_consistency`] take every lock and are
//!   exact.
//!
//! Lock order: a CPU's cache lock, then the buddy lock; never two cache
//! locks at once, except [`SmpFrameAllocator::with_exact`], which takes them
//! all in CPU order before the buddy. Everything not on the fast path
//! (orders above [`PCP_MAX_ORDER`], aligned and placed allocations, frozen
//! allocations, poisoned folios) runs on the buddy under its lock.

use super::allocator::{publish_folio_words, FrameAllocator, FrameStats, Released};
use super::atomics::{AtomicCell, Atomics, CoreAtomics};
use super::consistency::ConsistencyError;
use super::desc::{FolioDesc, FOLIO_HWPOISON};
use super::desc_cache::{desc_word, DescList, DescMemory};
use super::error::FrameError;
use super::frozen::FrozenKind;
use super::hot_cache::{capacity, HotCache, CACHE_MAX_ORDER, HOT_CACHE_BLOCKS};
use super::owner::Owner;
use super::page_array::PageArray;
use super::refcount::{FolioRef, LastRef};
use super::word::{FrameType, Word};
use crate::addr::Pfn;
use crate::sync::{CpuContext, CpuId, LockAtomics, LockError, LockStats, SpinGuard, SpinLock};
use core::fmt;
use core::sync::atomic::Ordering;

/// Highest order with a per-CPU cache: as Linux's per-CPU lists, the
/// small orders and the 2 MiB order 9.
pub const PCP_MAX_ORDER: u8 = CACHE_MAX_ORDER;
/// Blocks of orders up to 3 (and descriptors) moved between a CPU cache
/// and the buddy at once (one buddy lock acquisition per this many
/// fast-path calls at most); larger orders move [`pcp_batch`] blocks.
pub const PCP_BATCH: usize = 64;
/// Blocks of one order up to 3 a CPU cache holds before a free drains a
/// batch; larger orders hold [`pcp_high`] blocks.
pub const PCP_HIGH: usize = HOT_CACHE_BLOCKS;

/// Blocks of `order` a CPU cache holds before a free drains a batch: 128
/// up to order 3, then 2 MiB worth (at least 2 blocks) up to
/// [`PCP_MAX_ORDER`]; 0 above.
pub const fn pcp_high(order: u8) -> usize {
    capacity(order)
}

/// Blocks of `order` one refill or drain moves: half of [`pcp_high`] (so a
/// cache refilled or drained has room both ways), [`PCP_BATCH`] up to
/// order 3.
pub const fn pcp_batch(order: u8) -> usize {
    let n = pcp_high(order) / 2;
    if n > PCP_BATCH {
        PCP_BATCH
    } else {
        n
    }
}
/// Free folio descriptors a CPU keeps at most. A full stash gives
/// [`PCP_DESCS_DRAIN`] back to the shared cache; an empty one takes
/// [`PCP_BATCH`]. The stash is a list threaded through the descriptors
/// themselves, so its size costs no per-CPU memory; descriptor memory
/// never goes back to the frames anyway, so the most a stash strands is
/// `PCP_DESCS` x 16 bytes (64 KiB) per CPU.
///
/// Large, because a descriptor that moves between CPUs through the shared
/// cache takes its cache line's neighbours along: descriptors are 16
/// bytes, 8 to the 128-byte pair of lines that x86's adjacent-line
/// prefetcher (and some Arm cores') moves as one, and after a few rounds of
/// stashes overflowing into the shared LIFO and refilling from it, the
/// neighbours of each CPU's descriptors are the other CPU's. Two threads
/// each cycling 0 -> ~1500 -> 0 live folios (`cargo qemu bench smp`,
/// mixed orders) spent 15.3-16.8 ms of CPU per run with a stash of 128,
/// 11.8-13.5 ms with 4096, and 9.4-11.2 ms each on allocators of their own.
pub const PCP_DESCS: usize = 64 * PCP_BATCH;
/// Descriptors a full stash gives back at once.
pub const PCP_DESCS_DRAIN: usize = 4 * PCP_BATCH;
/// Orders below this are refilled by splitting whole blocks of it where
/// the buddy has them: 16 frames, whose 16 words fill one 128-byte pair of
/// cache lines, so blocks of the small orders in two CPUs' caches do not
/// share lines of the page array (the buddy's own small blocks, whose
/// neighbours some CPU holds, are taken only when no such block is left).
/// Two threads as above: 11.8-13.5 ms of CPU per run refilled by order,
/// 10.0-12.6 ms refilled by splitting.
pub const PCP_LINE_ORDER: u8 = 4;

/// Why an [`SmpFrameAllocator`] operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SmpError {
    /// The frame operation itself failed.
    Frame(FrameError),
    /// A lock was refused (re-entry from an exception handler on a CPU that
    /// holds it).
    Lock(LockError),
    /// The CPU index is not below the allocator's CPU count.
    CpuOutOfRange {
        /// The index given.
        cpu: CpuId,
    },
    /// [`SmpFrameAllocator::check_consistency`] found a violation.
    Inconsistent(ConsistencyError),
}

impl From<FrameError> for SmpError {
    fn from(e: FrameError) -> Self {
        Self::Frame(e)
    }
}

impl From<LockError> for SmpError {
    fn from(e: LockError) -> Self {
        Self::Lock(e)
    }
}

impl fmt::Display for SmpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Frame(e) => write!(f, "{e:?}"),
            Self::Lock(e) => write!(f, "{e}"),
            Self::CpuOutOfRange { cpu } => write!(f, "CPU {} has no frame cache", cpu.0),
            Self::Inconsistent(e) => write!(f, "inconsistent at PFN {:#x}: {:?}", e.pfn.0, e.what),
        }
    }
}

/// Fast-path counters of one CPU cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PcpStats {
    /// Allocations served from the cache.
    pub fast_allocs: u64,
    /// Frees that went into the cache.
    pub fast_frees: u64,
    /// Refills from the buddy.
    pub refills: u64,
    /// Batches drained to the buddy (cache too full, or explicit drains).
    pub drains: u64,
    /// Frames the cache holds now (set in [`SmpFrameAllocator::cpu_stats`]'s
    /// snapshot).
    pub cached_frames: u64,
    /// Free folio descriptors the cache's stash holds now (snapshot, as
    /// `cached_frames`).
    pub cached_descs: u64,
}

/// One CPU's cache.
pub(crate) struct PerCpu<A: Atomics> {
    pub(crate) hot: HotCache,
    descs: DescList<FolioDesc<A>, A>,
    /// Per-type frame count changes not yet folded into the buddy's.
    delta: [i64; FrameType::COUNT],
    stats: PcpStats,
}

impl<A: Atomics> PerCpu<A> {
    fn new() -> Self {
        Self {
            hot: HotCache::new(),
            descs: DescList::new(),
            delta: [0; FrameType::COUNT],
            stats: PcpStats::default(),
        }
    }

    fn pop_desc(&mut self) -> Option<&'static FolioDesc<A>> {
        self.descs.pop()
    }

    /// False when the stash is full.
    fn push_desc(&mut self, d: &'static FolioDesc<A>) -> bool {
        if self.descs.len() >= PCP_DESCS {
            return false;
        }
        self.descs.push(d);
        true
    }

    fn count(&mut self, from: FrameType, to: FrameType, n: u64) {
        self.delta[from.index()] -= n as i64;
        self.delta[to.index()] += n as i64;
    }
}

/// The buddy-side half of the per-CPU protocol: everything here runs with
/// the buddy lock held (and the CPU's cache lock).
impl<M: DescMemory, A: Atomics> FrameAllocator<'_, M, A> {
    /// Moves up to [`pcp_batch`] blocks of `order` into `pcp`; returns how
    /// many.
    fn pcp_refill(&mut self, pcp: &mut PerCpu<A>, order: u8) -> usize {
        let (batch, high) = (pcp_batch(order), pcp_high(order));
        let mut n = 0;
        if order < PCP_LINE_ORDER {
            // Whole 16-frame blocks first, split into this cache.
            let per = 1usize << (PCP_LINE_ORDER - order);
            while n + per <= batch && pcp.hot.len(order) + per <= high {
                let Ok((idx, _)) = self.take_block(PCP_LINE_ORDER, PCP_LINE_ORDER) else {
                    break;
                };
                // Highest first, so the cache hands out the lowest first.
                for k in (0..per).rev() {
                    let sub = idx + (k << order);
                    // Relaxed, as below. The tails inside each part were
                    // tails of the whole block already.
                    self.pa.store_relaxed(sub, Word::free_cached(order));
                    // Cannot fail: room for `per` was checked.
                    let _ = pcp.hot.push(order, sub);
                }
                n += per;
            }
        }
        while n < batch && pcp.hot.len(order) < high {
            let Ok((idx, _)) = self.take_block(order, order) else {
                break;
            };
            // The block stays Free, now parked in a CPU cache. Relaxed: the
            // word is the allocator's own bookkeeping; the cache lock orders
            // it for the next CPU that pops it.
            self.pa.store_relaxed(idx, Word::free_cached(order));
            // Cannot fail: the loop stops at pcp_high = the cache's capacity.
            let _ = pcp.hot.push(order, idx);
            n += 1;
        }
        if n > 0 {
            pcp.stats.refills += 1;
        }
        n
    }

    /// Fills `pcp`'s descriptor stash with up to [`PCP_BATCH`] descriptors.
    fn pcp_refill_descs(&mut self, pcp: &mut PerCpu<A>) -> Result<(), FrameError> {
        for i in 0..PCP_BATCH {
            match self.get_folio_desc() {
                Ok(d) => {
                    if !pcp.push_desc(d) {
                        self.folios.free(d);
                        break;
                    }
                }
                Err(e) if i == 0 => return Err(e),
                Err(_) => break,
            }
        }
        Ok(())
    }

    /// Gives up to `n` blocks of `order` from `pcp` back to the buddy lists.
    fn pcp_drain(&mut self, pcp: &mut PerCpu<A>, order: u8, n: usize) {
        for _ in 0..n {
            let Some(idx) = pcp.hot.pop(order) else {
                break;
            };
            let Some(pfn) = self.pa.pfn_of(idx) else {
                continue;
            };
            if let Some(sec) = self.pa.section_of(pfn.0) {
                let sec = *sec;
                self.lists.free(self.pa, &sec, idx, pfn.0, order);
            }
        }
        pcp.stats.drains += 1;
    }

    /// Empties `pcp` entirely: blocks, descriptors, count deltas.
    fn pcp_drain_all(&mut self, pcp: &mut PerCpu<A>) {
        for order in 0..=PCP_MAX_ORDER {
            if pcp.hot.len(order) > 0 {
                self.pcp_drain(pcp, order, pcp_high(order));
            }
        }
        while let Some(d) = pcp.pop_desc() {
            self.folios.free(d);
        }
        self.pcp_fold(pcp);
    }

    /// Folds `pcp`'s count deltas into the buddy's counts.
    fn pcp_fold(&mut self, pcp: &mut PerCpu<A>) {
        for (c, d) in self.by_type.iter_mut().zip(pcp.delta.iter_mut()) {
            *c = c.wrapping_add_signed(*d);
            *d = 0;
        }
    }
}

/// One CPU's slot, on its own cache lines.
#[repr(align(128))]
struct Slot<A: Atomics + LockAtomics>(SpinLock<PerCpu<A>, A>);

/// The buddy (its lock words and the allocator's own fields, written by
/// whichever CPU holds it) on cache lines of its own: off the line of
/// `pa`, which every fast-path call reads. 128 bytes:
/// two 64-byte lines, as adjacent-line prefetchers fetch pairs.
#[repr(align(128))]
struct Padded<T>(T);

/// A frame allocator shared by `CPUS` CPUs through `&self`.
///
/// Built from a [`FrameAllocator`] ([`SmpFrameAllocator::new`]); every
/// operation names the calling CPU through a [`CpuContext`].
pub struct SmpFrameAllocator<
    'a,
    M: DescMemory,
    A: Atomics + LockAtomics = CoreAtomics,
    const CPUS: usize = 8,
> {
    pa: &'a PageArray<'a, A>,
    buddy: Padded<SpinLock<FrameAllocator<'a, M, A>, A>>,
    cpus: [Slot<A>; CPUS],
}

type Buddy<'g, 'a, M, A> = SpinGuard<'g, FrameAllocator<'a, M, A>, A>;
type CpuGuard<'g, A> = SpinGuard<'g, PerCpu<A>, A>;

impl<'a, M: DescMemory + Send, A: Atomics + LockAtomics, const CPUS: usize>
    SmpFrameAllocator<'a, M, A, CPUS>
{
    /// Shares `fa` between `CPUS` CPUs, each with an empty cache.
    pub fn new(fa: FrameAllocator<'a, M, A>) -> Self {
        Self {
            pa: fa.page_array(),
            buddy: Padded(SpinLock::new(fa)),
            cpus: core::array::from_fn(|_| Slot(SpinLock::new(PerCpu::new()))),
        }
    }

    /// The page array, for lock-free speculative lookups.
    #[inline]
    pub fn page_array(&self) -> &'a PageArray<'a, A> {
        self.pa
    }

    fn slot<C: CpuContext + ?Sized>(&self, cpu: &C) -> Result<&SpinLock<PerCpu<A>, A>, SmpError> {
        let id = cpu.cpu_id();
        self.cpus
            .get(id.index())
            .map(|s| &s.0)
            .ok_or(SmpError::CpuOutOfRange { cpu: id })
    }

    fn lock_buddy<C: CpuContext + ?Sized>(&self, cpu: &C) -> Result<Buddy<'_, 'a, M, A>, SmpError> {
        Ok(self.buddy.0.lock(cpu)?)
    }

    /// A folio of `2^order` frames, refcount 1, owned by `owner`. Orders up
    /// to [`PCP_MAX_ORDER`] come from this CPU's cache.
    ///
    /// # Errors
    ///
    /// [`SmpError::Frame`] with the errors of
    /// [`FrameAllocator::alloc_folio`] (out of memory only once every CPU's
    /// cache was drained); [`SmpError::Lock`] when this CPU already holds
    /// the buddy lock (re-entry from an exception handler);
    /// [`SmpError::CpuOutOfRange`].
    pub fn alloc_folio<C: CpuContext + ?Sized>(
        &self,
        cpu: &C,
        order: u8,
        owner: Owner,
    ) -> Result<FolioRef<A>, SmpError> {
        if order <= PCP_MAX_ORDER {
            match self.slot(cpu)?.lock(cpu) {
                Ok(mut pcp) => match self.alloc_cached(cpu, &mut pcp, order, owner)? {
                    Some(f) => return Ok(f),
                    None => {
                        // Buddy empty: what other CPUs cache is all that is
                        // left. Drop our cache lock first (lock order).
                        drop(pcp);
                        self.drain_all(cpu)?;
                    }
                },
                // An exception handler interrupted this CPU inside its own
                // cache: go to the buddy directly.
                Err(LockError::Reentrant { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let r = self.lock_buddy(cpu)?.alloc_folio(order, owner);
        match r {
            Err(FrameError::OutOfMemory { .. }) if order > PCP_MAX_ORDER => {
                self.drain_all(cpu)?;
                Ok(self.lock_buddy(cpu)?.alloc_folio(order, owner)?)
            }
            r => Ok(r?),
        }
    }

    /// The fast path; `Ok(None)` when the buddy had no block to refill with.
    #[inline]
    fn alloc_cached<C: CpuContext + ?Sized>(
        &self,
        cpu: &C,
        pcp: &mut PerCpu<A>,
        order: u8,
        owner: Owner,
    ) -> Result<Option<FolioRef<A>>, SmpError> {
        if pcp.descs.is_empty() || pcp.hot.len(order) == 0 {
            let mut fa = self.lock_buddy(cpu)?;
            if pcp.descs.is_empty() {
                fa.pcp_refill_descs(pcp)?;
            }
            if pcp.hot.len(order) == 0 && fa.pcp_refill(pcp, order) == 0 {
                fa.pcp_fold(pcp);
                return Ok(None);
            }
            fa.pcp_fold(pcp);
        }
        let (Some(idx), Some(d)) = (pcp.hot.pop(order), pcp.pop_desc()) else {
            return Ok(None);
        };
        let pfn = self
            .pa
            .pfn_of(idx)
            .ok_or(FrameError::Corrupt { pfn: Pfn(u64::MAX) })?;
        pcp.count(FrameType::Free, FrameType::Folio, 1 << order);
        pcp.stats.fast_allocs += 1;
        Ok(Some(publish_folio_words(
            self.pa, d, idx, pfn.0, order, owner,
        )))
    }

    /// Drops a reference; on the last one releases the folio
    /// ([`SmpFrameAllocator::release`]). Any CPU may put any folio.
    ///
    /// # Errors
    ///
    /// As [`SmpFrameAllocator::release`], and
    /// [`FrameError::RefcountUnderflow`] for a count found at zero.
    #[inline]
    pub fn put<C: CpuContext + ?Sized>(
        &self,
        cpu: &C,
        r: FolioRef<A>,
    ) -> Result<Option<Released<A>>, SmpError> {
        match r.put()? {
            None => Ok(None),
            Some(last) => self.release(cpu, last).map(Some),
        }
    }

    /// The owner hook ([`FrameAllocator::release`]); a healthy
    /// [`Owner::Buddy`] folio of a small order goes into this CPU's cache.
    ///
    /// # Errors
    ///
    /// [`SmpError::Frame`] with the errors of [`FrameAllocator::release`];
    /// [`SmpError::Lock`], [`SmpError::CpuOutOfRange`].
    pub fn release<C: CpuContext + ?Sized>(
        &self,
        cpu: &C,
        last: LastRef<A>,
    ) -> Result<Released<A>, SmpError> {
        let d = last.desc;
        let (head, order) = (d.head(), d.order());
        if d.owner() == Owner::Buddy && order <= PCP_MAX_ORDER {
            if let Some(idx) = self.pa.index_of(head) {
                match self.slot(cpu)?.lock(cpu) {
                    Ok(mut pcp) => {
                        // Checked under this CPU's cache lock: poisoning
                        // runs under every cache lock (`with_exact`), so
                        // between this check and the stores of
                        // `free_cached` no frame of the folio can become
                        // HwPoison (checked before the lock, a tail frame
                        // poisoned meanwhile would be overwritten as Free).
                        // We hold the last reference: the words are ours.
                        if d.flags() & FOLIO_HWPOISON == 0
                            && self.pa.load_relaxed(idx) == desc_word(d)
                        {
                            self.free_cached(cpu, &mut pcp, d, idx, order)?;
                            return Ok(Released::Freed { pfn: head, order });
                        }
                    }
                    Err(LockError::Reentrant { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(self.lock_buddy(cpu)?.release(last)?)
    }

    /// The fast free: the block into `pcp`, the descriptor into its stash.
    #[inline]
    fn free_cached<C: CpuContext + ?Sized>(
        &self,
        cpu: &C,
        pcp: &mut PerCpu<A>,
        d: &'static FolioDesc<A>,
        idx: usize,
        order: u8,
    ) -> Result<(), SmpError> {
        let stash_full = pcp.descs.len() >= PCP_DESCS;
        let full = pcp.hot.len(order) >= pcp_high(order);
        if full || stash_full {
            let mut fa = self.lock_buddy(cpu)?;
            if full {
                fa.pcp_drain(pcp, order, pcp_batch(order));
            }
            if stash_full {
                for _ in 0..PCP_DESCS_DRAIN {
                    if let Some(x) = pcp.pop_desc() {
                        fa.folios.free(x);
                    }
                }
            }
            fa.pcp_fold(pcp);
        }
        let n = 1usize << order;
        // Relaxed: the last `put`'s AcqRel ordered every holder's accesses
        // before these stores; whoever takes the block next does so under
        // this cache's lock or the buddy's (Acquire/Release).
        for c in &self.pa.cells(idx, n)[1..] {
            c.store(Word::FREE_TAIL.raw(), Ordering::Relaxed);
        }
        self.pa.store_relaxed(idx, Word::free_cached(order));
        // Cannot fail: a full cache was drained above.
        let _ = pcp.hot.push(order, idx);
        let _ = pcp.push_desc(d);
        pcp.count(FrameType::Folio, FrameType::Free, n as u64);
        pcp.stats.fast_frees += 1;
        Ok(())
    }

    /// `2^order` frozen frames (on the buddy, under its lock).
    ///
    /// # Errors
    ///
    /// [`SmpError::Frame`] with the errors of
    /// [`FrameAllocator::alloc_frozen`]; [`SmpError::Lock`].
    pub fn alloc_frozen<C: CpuContext + ?Sized>(
        &self,
        cpu: &C,
        order: u8,
        kind: FrozenKind,
    ) -> Result<Pfn, SmpError> {
        match self.lock_buddy(cpu)?.alloc_frozen(order, kind) {
            Err(FrameError::OutOfMemory { .. }) => {
                self.drain_all(cpu)?;
                Ok(self.lock_buddy(cpu)?.alloc_frozen(order, kind)?)
            }
            r => Ok(r?),
        }
    }

    /// Frees a frozen allocation (on the buddy, under its lock).
    ///
    /// # Errors
    ///
    /// [`SmpError::Frame`] with the errors of
    /// [`FrameAllocator::free_frozen`]; [`SmpError::Lock`].
    pub fn free_frozen<C: CpuContext + ?Sized>(
        &self,
        cpu: &C,
        pfn: Pfn,
        order: u8,
    ) -> Result<(), SmpError> {
        Ok(self.lock_buddy(cpu)?.free_frozen(pfn, order)?)
    }

    /// Empties CPU `target`'s cache into the buddy (that CPU goes idle or
    /// offline). Any CPU may call it.
    ///
    /// # Errors
    ///
    /// [`SmpError::CpuOutOfRange`] for a `target` (or caller) without a
    /// cache; [`SmpError::Lock`] when the caller already holds the lock of
    /// `target`'s cache or the buddy.
    pub fn drain_cpu<C: CpuContext + ?Sized>(
        &self,
        cpu: &C,
        target: CpuId,
    ) -> Result<(), SmpError> {
        let slot = self
            .cpus
            .get(target.index())
            .ok_or(SmpError::CpuOutOfRange { cpu: target })?;
        let mut pcp = slot.0.lock(cpu)?;
        // Nothing cached and nothing to fold: the buddy lock is not needed
        // (an idle core calls this on every wake-up).
        if pcp.hot.is_empty() && pcp.descs.is_empty() && pcp.delta.iter().all(|&d| d == 0) {
            return Ok(());
        }
        self.lock_buddy(cpu)?.pcp_drain_all(&mut pcp);
        Ok(())
    }

    /// Empties every CPU's cache, one at a time.
    fn drain_all<C: CpuContext + ?Sized>(&self, cpu: &C) -> Result<(), SmpError> {
        for c in 0..CPUS {
            self.drain_cpu(cpu, CpuId(c as u32))?;
        }
        Ok(())
    }

    /// Runs `f` on the buddy under its lock. The CPU caches keep what they
    /// hold: use [`SmpFrameAllocator::with_exact`] for operations on
    /// specific free frames (poisoning, placing, reserving).
    ///
    /// # Errors
    ///
    /// [`SmpError::Lock`] when this CPU already holds the buddy lock.
    pub fn with_buddy<C: CpuContext + ?Sized, R>(
        &self,
        cpu: &C,
        f: impl FnOnce(&mut FrameAllocator<'a, M, A>) -> R,
    ) -> Result<R, SmpError> {
        let mut fa = self.lock_buddy(cpu)?;
        Ok(f(&mut fa))
    }

    /// Takes every CPU cache's lock (in CPU order), drains them all into the
    /// buddy and runs `f` on it under its lock: while `f` runs, every free
    /// frame is in the buddy's exact picture, and no CPU can allocate or
    /// free.
    ///
    /// # Errors
    ///
    /// [`SmpError::Lock`] when this CPU already holds one of the locks.
    pub fn with_exact<C: CpuContext + ?Sized, R>(
        &self,
        cpu: &C,
        f: impl FnOnce(&mut FrameAllocator<'a, M, A>) -> R,
    ) -> Result<R, SmpError> {
        self.with_all(cpu, |fa, pcps| {
            for p in pcps.iter_mut().flatten() {
                fa.pcp_drain_all(p);
            }
            f(fa)
        })
    }

    /// Runs `f` with every lock held: CPU caches in CPU order, then the buddy.
    fn with_all<C: CpuContext + ?Sized, R>(
        &self,
        cpu: &C,
        f: impl FnOnce(&mut FrameAllocator<'a, M, A>, &mut [Option<CpuGuard<'_, A>>; CPUS]) -> R,
    ) -> Result<R, SmpError> {
        let mut held: [Option<CpuGuard<'_, A>>; CPUS] = [const { None }; CPUS];
        for (g, s) in held.iter_mut().zip(self.cpus.iter()) {
            *g = Some(s.0.lock(cpu)?);
        }
        let mut fa = self.lock_buddy(cpu)?;
        Ok(f(&mut fa, &mut held))
    }

    /// All counters, exact (takes every lock). Frames in CPU caches count as
    /// Free and in `cached_frames`; descriptors stashed in CPU caches are not
    /// live.
    ///
    /// # Errors
    ///
    /// [`SmpError::Lock`] when this CPU already holds one of the locks.
    pub fn stats<C: CpuContext + ?Sized>(&self, cpu: &C) -> Result<FrameStats, SmpError> {
        self.with_all(cpu, |fa, pcps| {
            let mut s = fa.stats();
            for p in pcps.iter().flatten() {
                for (c, d) in s.by_type.iter_mut().zip(p.delta.iter()) {
                    *c = c.wrapping_add_signed(*d);
                }
                s.cached_frames += p.hot.frames();
                s.live_descs[0] -= p.descs.len() as u64;
            }
            s
        })
    }

    /// [`FrameAllocator::check_consistency`] over the buddy and every CPU
    /// cache, with every lock held.
    ///
    /// # Errors
    ///
    /// [`SmpError::Inconsistent`] with the first violation;
    /// [`SmpError::Lock`] when this CPU already holds one of the locks.
    pub fn check_consistency<C: CpuContext + ?Sized>(&self, cpu: &C) -> Result<(), SmpError> {
        self.with_all(cpu, |fa, pcps| {
            let mut by_type = fa.by_type;
            for p in pcps.iter().flatten() {
                for (t, d) in by_type.iter_mut().zip(p.delta.iter()) {
                    *t = t.wrapping_add_signed(*d);
                }
            }
            let refs: [&HotCache; CPUS] =
                core::array::from_fn(|i| pcps[i].as_ref().map_or(&EMPTY_CACHE, |g| &g.hot));
            fa.check_with(&refs, &by_type)
        })?
        .map_err(SmpError::Inconsistent)
    }

    /// The buddy lock's contention counters.
    pub fn buddy_lock_stats(&self) -> LockStats {
        self.buddy.0.stats()
    }

    /// CPU `target`'s cache counters (a snapshot taken under its lock).
    ///
    /// # Errors
    ///
    /// [`SmpError::CpuOutOfRange`]; [`SmpError::Lock`] when the caller holds
    /// that cache's lock.
    pub fn cpu_stats<C: CpuContext + ?Sized>(
        &self,
        cpu: &C,
        target: CpuId,
    ) -> Result<PcpStats, SmpError> {
        let slot = self
            .cpus
            .get(target.index())
            .ok_or(SmpError::CpuOutOfRange { cpu: target })?;
        let g = slot.0.lock(cpu)?;
        Ok(PcpStats {
            cached_frames: g.hot.frames(),
            cached_descs: g.descs.len() as u64,
            ..g.stats
        })
    }

    /// The single-CPU allocator back, every CPU cache drained into it.
    pub fn into_inner(mut self) -> FrameAllocator<'a, M, A> {
        let mut fa = self.buddy.0.into_inner();
        for s in self.cpus.iter_mut() {
            fa.pcp_drain_all(s.0.get_mut());
        }
        fa
    }
}

/// Stands in for a missing cache in [`SmpFrameAllocator::check_consistency`].
static EMPTY_CACHE: HotCache = HotCache::new();

impl<M: DescMemory, A: Atomics + LockAtomics, const CPUS: usize> fmt::Debug
    for SmpFrameAllocator<'_, M, A, CPUS>
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmpFrameAllocator")
            .field("cpus", &CPUS)
            .field("buddy_lock", &self.buddy.0.stats())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // In tests a panic is the failure report.
mod tests {
    use super::super::desc_cache::tests::LeakMemory;
    use super::super::desc_cache::{desc_addr, desc_of};
    use super::super::testutil::{alloc, setup};
    use super::super::Poisoned;
    use super::*;
    use crate::sync::FixedCpu;

    type Smp = SmpFrameAllocator<'static, LeakMemory, CoreAtomics, 2>;
    const CPU0: FixedCpu = FixedCpu::new(0);
    const CPU1: FixedCpu = FixedCpu::new(1);

    // Shared by reference between CPUs.
    const _: fn() = || {
        fn sync_and_send<T: Sync + Send>() {}
        sync_and_send::<Smp>();
    };

    fn smp(frames: u64) -> Smp {
        let (pa, _) = setup(&[(0x100, 0x100 + frames)]);
        SmpFrameAllocator::new(alloc(pa, &[]))
    }

    fn free_frames(s: &Smp) -> u64 {
        s.stats(&CPU0).unwrap().count(FrameType::Free)
    }

    /// The buddy's per-type counts are partial sums while CPU caches hold
    /// deltas: a poisoned folio freed on the buddy after another CPU folded
    /// a negative delta must not trip an underflow, and the exact totals
    /// (buddy + deltas) stay right.
    #[test]
    fn a_buddy_free_below_the_partial_count_keeps_exact_totals() {
        let s = smp(0x200);
        let total = free_frames(&s);
        let p = s.alloc_folio(&CPU0, 3, Owner::Buddy).unwrap();
        // Poisoning runs on the exact view: every delta folded (Folio 8).
        s.with_exact(&CPU0, |fa| fa.poison(Pfn(p.pfn().0 + 1)))
            .unwrap()
            .unwrap();
        // A folio of CPU 0's cache freed on CPU 1, whose delta is folded
        // by its drain: the buddy's Folio count drops to 6, CPU 0's delta
        // keeps the +2.
        let q = s.alloc_folio(&CPU0, 1, Owner::Buddy).unwrap();
        assert!(s.put(&CPU1, q).unwrap().is_some());
        s.drain_cpu(&CPU1, CpuId(1)).unwrap();
        // The poisoned folio goes back through the buddy (not a cache).
        assert!(s.put(&CPU0, p).unwrap().is_some());
        let st = s.stats(&CPU0).unwrap();
        assert_eq!(st.count(FrameType::Folio), 0);
        assert_eq!(st.count(FrameType::HwPoison), 1);
        assert_eq!(st.count(FrameType::Free), total - 1);
        s.check_consistency(&CPU0).unwrap();
    }

    #[test]
    fn free_on_another_cpu_lands_in_its_cache_and_counts_stay_exact() {
        let s = smp(0x100);
        let total = free_frames(&s);
        let f = s.alloc_folio(&CPU0, 1, Owner::Buddy).unwrap();
        let pfn = f.pfn();
        let st = s.stats(&CPU0).unwrap();
        assert_eq!(st.count(FrameType::Folio), 2);
        assert_eq!(st.count(FrameType::Free), total - 2);
        // The rest of CPU 0's refill batch is cached, still free.
        assert_eq!(st.cached_frames, 2 * (PCP_BATCH as u64 - 1));
        s.check_consistency(&CPU0).unwrap();
        let r = s.put(&CPU1, f).unwrap();
        assert!(matches!(r, Some(Released::Freed { pfn: p, order: 1 }) if p == pfn));
        assert_eq!(s.cpu_stats(&CPU0, CpuId(1)).unwrap().fast_frees, 1);
        assert_eq!(free_frames(&s), total);
        s.check_consistency(&CPU1).unwrap();
        // CPU 1 reuses the block it was given.
        let g = s.alloc_folio(&CPU1, 1, Owner::Buddy).unwrap();
        assert_eq!(g.pfn(), pfn);
        assert!(s.put(&CPU0, g).unwrap().is_some());
        assert_eq!(s.stats(&CPU0).unwrap().live_descs[0], 0);
    }

    #[test]
    fn a_full_cache_drains_and_drain_cpu_empties_it() {
        let s = smp(0x200);
        let mut v = Vec::new();
        for _ in 0..PCP_HIGH + 8 {
            v.push(s.alloc_folio(&CPU0, 0, Owner::Buddy).unwrap());
        }
        for f in v {
            assert!(s.put(&CPU1, f).unwrap().is_some());
        }
        let c1 = s.cpu_stats(&CPU0, CpuId(1)).unwrap();
        assert!(c1.drains >= 1, "{c1:?}");
        let st = s.stats(&CPU0).unwrap();
        assert!(st.cached_frames <= 2 * PCP_HIGH as u64);
        s.check_consistency(&CPU0).unwrap();
        s.drain_cpu(&CPU0, CpuId(1)).unwrap();
        s.drain_cpu(&CPU1, CpuId(0)).unwrap();
        assert_eq!(s.stats(&CPU0).unwrap().cached_frames, 0);
        s.check_consistency(&CPU0).unwrap();
        let fa = s.into_inner();
        assert_eq!(fa.count(FrameType::Free), 0x200);
        fa.check_consistency().unwrap();
    }

    #[test]
    fn out_of_memory_only_after_every_cache_was_drained() {
        let s = smp(0x40);
        // CPU 0 takes and frees one frame: its cache keeps a batch.
        let f = s.alloc_folio(&CPU0, 0, Owner::Buddy).unwrap();
        s.put(&CPU0, f).unwrap();
        let total = free_frames(&s);
        let mut v = Vec::new();
        loop {
            match s.alloc_folio(&CPU1, 0, Owner::Buddy) {
                Ok(f) => v.push(f),
                Err(e) => {
                    assert!(
                        matches!(
                            e,
                            SmpError::Frame(FrameError::OutOfMemory { .. })
                                | SmpError::Frame(FrameError::OutOfDescriptors { .. })
                        ),
                        "{e:?}"
                    );
                    break;
                }
            }
        }
        // Every frame not holding descriptors was handed out.
        let st = s.stats(&CPU0).unwrap();
        assert_eq!(st.count(FrameType::Free), 0);
        assert_eq!(v.len() as u64 + st.count(FrameType::Reserved), total);
        for f in v {
            s.put(&CPU0, f).unwrap();
        }
        s.check_consistency(&CPU0).unwrap();
    }

    #[test]
    fn reentry_and_bad_cpus_are_typed_errors() {
        let s = smp(0x40);
        let inner = s.with_buddy(&CPU0, |_| {
            // An exception handler on CPU 0 while CPU 0 holds the buddy lock.
            s.alloc_folio(&CPU0.in_exception(), 0, Owner::Buddy)
                .map(|_| ())
        });
        assert!(matches!(
            inner,
            Ok(Err(SmpError::Lock(LockError::Reentrant {
                in_exception: true,
                ..
            })))
        ));
        let far = FixedCpu::new(2);
        assert_eq!(
            s.alloc_folio(&far, 0, Owner::Buddy).err(),
            Some(SmpError::CpuOutOfRange { cpu: CpuId(2) })
        );
        assert_eq!(
            s.drain_cpu(&CPU0, CpuId(9)).err(),
            Some(SmpError::CpuOutOfRange { cpu: CpuId(9) })
        );
        s.check_consistency(&CPU0).unwrap();
    }

    /// Orders above the per-CPU caches go through the buddy (one lock
    /// acquisition each): counts and the consistency check stay exact with
    /// them live, freed on another CPU, and merged back into the buddy.
    #[test]
    fn large_folios_through_the_buddy_keep_exact_counts() {
        // PFNs 0x100..0x1100: one order-10 and one order-11 block.
        let s = smp(0x1000);
        let total = free_frames(&s);
        let acq = s.buddy_lock_stats().acquisitions;
        let a = s
            .alloc_folio(&CPU0, PCP_MAX_ORDER + 1, Owner::Buddy)
            .unwrap();
        let b = s
            .alloc_folio(&CPU1, PCP_MAX_ORDER + 2, Owner::Buddy)
            .unwrap();
        assert_eq!(s.buddy_lock_stats().acquisitions - acq, 2);
        let st = s.stats(&CPU0).unwrap();
        assert_eq!(st.cached_frames, 0);
        assert_eq!(st.count(FrameType::Folio), 1024 + 2048);
        assert_eq!(st.count(FrameType::Free), total - 1024 - 2048);
        s.check_consistency(&CPU0).unwrap();
        // Every frame of a published folio carries its descriptor word.
        for f in [&a, &b] {
            let idx = s.pa.index_of(f.pfn()).unwrap();
            let w = s.pa.load_relaxed(idx);
            assert!(desc_of::<CoreAtomics, FolioDesc<CoreAtomics>>(w).is_some());
            for i in 0..1usize << f.order() {
                assert_eq!(s.pa.load_relaxed(idx + i), w, "frame {i}");
            }
        }
        assert!(matches!(
            s.put(&CPU1, a).unwrap(),
            Some(Released::Freed { order: 10, .. })
        ));
        assert!(s.put(&CPU0, b).unwrap().is_some());
        let st = s.stats(&CPU1).unwrap();
        assert_eq!(st.count(FrameType::Folio), 0);
        assert_eq!(st.count(FrameType::Free), total);
        s.check_consistency(&CPU1).unwrap();
        // Merged back: the whole range is one block again.
        let fa = s.into_inner();
        assert_eq!(fa.count(FrameType::Free), 0x1000);
        fa.check_consistency().unwrap();
    }

    /// Orders 4..=9 have per-CPU caches too, with smaller batches: an
    /// order-5 allocation refills a batch of [`pcp_batch`]`(5)` blocks in one
    /// lock acquisition, the next ones come from the cache without the
    /// lock, frees on another CPU go into that CPU's cache until it holds
    /// [`pcp_high`]`(5)` blocks and then drain a batch; an order-9 block
    /// freed on a CPU is reused there. Counts and the consistency check stay
    /// exact throughout, and everything merges back at the end.
    #[test]
    fn large_orders_are_cached_per_cpu_with_their_own_batches() {
        let s = smp(0x2000);
        let total = free_frames(&s);
        let (batch, high) = (pcp_batch(5), pcp_high(5));
        assert!(batch >= 2 && high >= 2 * batch, "{batch} {high}");
        let acq = s.buddy_lock_stats().acquisitions;
        let mut v = vec![s.alloc_folio(&CPU0, 5, Owner::Buddy).unwrap()];
        assert_eq!(s.buddy_lock_stats().acquisitions - acq, 1);
        let st = s.stats(&CPU0).unwrap();
        assert_eq!(st.cached_frames, 32 * (batch as u64 - 1));
        assert_eq!(st.count(FrameType::Folio), 32);
        s.check_consistency(&CPU0).unwrap();
        let acq = s.buddy_lock_stats().acquisitions;
        for _ in 1..batch {
            v.push(s.alloc_folio(&CPU0, 5, Owner::Buddy).unwrap());
        }
        assert_eq!(
            s.buddy_lock_stats().acquisitions,
            acq,
            "served from the cache"
        );
        // More than the cache holds, all freed on CPU 1.
        while v.len() < high + batch {
            v.push(s.alloc_folio(&CPU0, 5, Owner::Buddy).unwrap());
        }
        for f in v {
            assert!(matches!(
                s.put(&CPU1, f).unwrap(),
                Some(Released::Freed { order: 5, .. })
            ));
        }
        let c1 = s.cpu_stats(&CPU0, CpuId(1)).unwrap();
        assert!(c1.drains >= 1, "{c1:?}");
        assert!(c1.cached_frames <= 32 * high as u64, "{c1:?}");
        assert_eq!(free_frames(&s), total);
        s.check_consistency(&CPU0).unwrap();
        // Order 9: freed on CPU 1, reused by CPU 1 without the buddy.
        let big = s.alloc_folio(&CPU0, 9, Owner::Buddy).unwrap();
        let pfn = big.pfn();
        s.put(&CPU1, big).unwrap();
        let acq = s.buddy_lock_stats().acquisitions;
        let again = s.alloc_folio(&CPU1, 9, Owner::Buddy).unwrap();
        assert_eq!(again.pfn(), pfn);
        assert_eq!(s.buddy_lock_stats().acquisitions, acq);
        s.check_consistency(&CPU1).unwrap();
        s.put(&CPU0, again).unwrap();
        let fa = s.into_inner();
        assert_eq!(fa.count(FrameType::Free), 0x2000);
        fa.check_consistency().unwrap();
    }

    /// A large free refused the buddy lock (an exception handler on a CPU
    /// inside the buddy) leaves the folio's words as they were.
    #[test]
    fn a_refused_large_free_leaves_the_words() {
        // PFNs 0x100..0x900 hold one aligned order-10 block.
        let s = smp(0x800);
        let f = s
            .alloc_folio(&CPU0, PCP_MAX_ORDER + 1, Owner::Buddy)
            .unwrap();
        let idx = s.pa.index_of(f.pfn()).unwrap();
        let w = s.pa.load_relaxed(idx);
        let r = s.with_buddy(&CPU0, |_| s.put(&CPU0.in_exception(), f).map(|_| ()));
        assert!(matches!(
            r,
            Ok(Err(SmpError::Lock(LockError::Reentrant { .. })))
        ));
        for i in 0..1024 {
            assert_eq!(s.pa.load_relaxed(idx + i), w, "frame {i}");
        }
        // Not taken back: the frames still count as the folio's.
        assert_eq!(s.stats(&CPU0).unwrap().count(FrameType::Folio), 1024);
    }

    #[test]
    fn with_exact_sees_frames_parked_in_cpu_caches() {
        let s = smp(0x40);
        let f = s.alloc_folio(&CPU0, 0, Owner::Buddy).unwrap();
        let pfn = f.pfn();
        s.put(&CPU1, f).unwrap();
        // `pfn` sits in CPU 1's cache; poisoning it needs the exact picture.
        let p = s.with_exact(&CPU0, |fa| fa.poison(pfn)).unwrap();
        assert_eq!(p, Ok(Poisoned::WasFree));
        assert_eq!(s.stats(&CPU0).unwrap().count(FrameType::HwPoison), 1);
        s.check_consistency(&CPU0).unwrap();
    }

    #[test]
    fn small_orders_are_refilled_from_whole_16_frame_blocks_while_there_are_any() {
        // 0x100 frames at PFN 0x100: the first 0x80 allocated one by one,
        // then every other one freed, so the buddy holds 0x40 single frames
        // whose neighbours are all in use, and whole blocks above them.
        let (pa, _) = setup(&[(0x100, 0x200)]);
        let mut fa = alloc(pa, &[]);
        let held: Vec<_> = (0..0x80)
            .map(|_| fa.alloc_folio(0, Owner::Buddy).unwrap())
            .collect();
        let mut kept = Vec::new();
        for f in held {
            if f.pfn().0 % 2 == 1 {
                assert!(fa.put(f).unwrap().is_some());
            } else {
                kept.push(f);
            }
        }
        let lonely: Vec<u64> = (0x100..0x180).filter(|p| p % 2 == 1).collect();
        let s: Smp = SmpFrameAllocator::new(fa);
        let group = |p: u64| p >> PCP_LINE_ORDER;
        let mut got = Vec::new();
        for cpu in [&CPU0, &CPU1] {
            let f = s.alloc_folio(cpu, 0, Owner::Buddy).unwrap();
            let p = f.pfn().0;
            assert!(
                p >= 0x180,
                "CPU took {p:#x}, a frame whose neighbours are in use"
            );
            got.push((p, f));
        }
        // The two CPUs' refills came from different 16-frame blocks, and
        // each cached its block whole.
        assert_ne!(group(got[0].0), group(got[1].0));
        let st = s.cpu_stats(&CPU0, CpuId(1)).unwrap();
        assert_eq!(
            st.cached_frames % (1 << PCP_LINE_ORDER),
            (1 << PCP_LINE_ORDER) - 1
        );
        s.check_consistency(&CPU0).unwrap();
        // Once no whole block is left, the single frames are used too.
        let mut rest = Vec::new();
        while let Ok(f) = s.alloc_folio(&CPU0, 0, Owner::Buddy) {
            rest.push(f);
        }
        let mut pfns: Vec<u64> = rest.iter().map(|f| f.pfn().0).collect();
        pfns.sort_unstable();
        assert!(lonely.iter().all(|p| pfns.binary_search(p).is_ok()));
        for f in rest
            .into_iter()
            .chain(kept)
            .chain(got.into_iter().map(|(_, f)| f))
        {
            assert!(s.put(&CPU1, f).unwrap().is_some());
        }
        assert_eq!(free_frames(&s), 0x100);
        s.check_consistency(&CPU0).unwrap();
    }

    #[test]
    fn a_cpu_keeps_the_descriptors_it_freed_up_to_pcp_descs() {
        let s = smp(0x4000);
        let cached = |c: u32| s.cpu_stats(&CPU0, CpuId(c)).unwrap().cached_descs;
        let m = PCP_DESCS / 2;
        let held: Vec<_> = (0..m)
            .map(|_| s.alloc_folio(&CPU0, 0, Owner::Buddy).unwrap())
            .collect();
        let addrs: Vec<usize> = held.iter().map(|f| desc_addr(f.desc())).collect();
        let before = cached(0);
        assert!(before < PCP_BATCH as u64);
        for f in held {
            assert!(s.put(&CPU0, f).unwrap().is_some());
        }
        // Every one freed stays with CPU 0.
        assert_eq!(cached(0), before + m as u64);
        // So CPU 1 gets descriptors CPU 0 never used: their cache lines
        // stay CPU 0's.
        let g = s.alloc_folio(&CPU1, 0, Owner::Buddy).unwrap();
        assert!(!addrs.contains(&desc_addr(g.desc())));
        // A free into a full stash first gives PCP_DESCS_DRAIN back.
        let need = PCP_DESCS - cached(0) as usize + 1;
        let extra: Vec<_> = (0..need)
            .map(|_| s.alloc_folio(&CPU1, 0, Owner::Buddy).unwrap())
            .collect();
        for f in extra {
            assert!(s.put(&CPU0, f).unwrap().is_some());
        }
        assert_eq!(cached(0), (PCP_DESCS - PCP_DESCS_DRAIN + 1) as u64);
        assert!(s.put(&CPU1, g).unwrap().is_some());
        s.check_consistency(&CPU0).unwrap();
        assert_eq!(s.stats(&CPU0).unwrap().live_descs[0], 0);
        s.drain_cpu(&CPU1, CpuId(0)).unwrap();
        assert_eq!(cached(0), 0);
        s.check_consistency(&CPU1).unwrap();
    }
}
