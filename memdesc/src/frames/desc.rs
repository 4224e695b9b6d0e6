//! Descriptors: the 16-byte, 16-byte-aligned records a descriptor-typed word
//! points to.
//!
//! Every field is atomic: a speculative reader may look at a descriptor that
//! was freed and reused under it (the memory is type-stable, see
//! [`desc_cache`](super::desc_cache)), so no field is ever plain data that a
//! reader could race with. While a descriptor sits in its cache's free list,
//! one field that readers never interpret without first holding a reference
//! (folio `meta`, the others' `link`) holds the free-list link.

use super::atomics::{AtomicCell, Atomics, CoreAtomics};
use super::owner::Owner;
use super::word::{FrameType, Word};
use crate::addr::Pfn;
use core::sync::atomic::Ordering;

/// What every descriptor type gives its cache.
pub(crate) trait Desc<A: Atomics>: Sized + 'static {
    /// The frame type whose words point to this descriptor.
    const TYPE: FrameType;
    /// A descriptor as it sits in the free list.
    fn new_free() -> Self;
    /// The cell holding the free-list link while free.
    fn link(&self) -> &A::U64;
}

/// Why a raw refcount operation was refused. No refcount arithmetic wraps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefcountError {
    /// The count is zero: the folio is frozen or free (`try_get`, `put`).
    Zero,
    /// The count is at [`REFCOUNT_MAX`] (`try_get`).
    Saturated,
    /// `unfreeze` found a count that is not frozen (not zero): the count.
    NotFrozen(u32),
}

/// The highest refcount: `try_get` refuses to go above it.
pub const REFCOUNT_MAX: u32 = u32::MAX;

// ---- folio -------------------------------------------------------------------

const META_ORDER_BITS: u32 = 5;
const META_OWNER_SHIFT: u32 = 5;
const META_PFN_SHIFT: u32 = 23;

/// PFNs a folio descriptor can hold: `0..PFN_LIMIT` (41 bits, 8 PiB of
/// physical address space). The page array refuses ranges beyond it.
pub const PFN_LIMIT: u64 = 1 << (64 - META_PFN_SHIFT);

/// Folio flag: a frame of the folio was poisoned; its frames never return to
/// the allocator as a whole.
pub const FOLIO_HWPOISON: u32 = 1 << 0;
/// First folio flag bit free for users (dirty, uptodate, ...).
pub const FOLIO_FLAG_USER_SHIFT: u32 = 8;

/// Descriptor of a refcounted allocation (one per allocation, shared by all
/// its frames).
#[repr(C, align(16))]
pub struct FolioDesc<A: Atomics = CoreAtomics> {
    pub(crate) refcount: A::U32,
    flags: A::U32,
    /// Live: order (5 bits) | owner (18 bits) | head PFN (41 bits).
    /// Free: the cache's free-list link.
    meta: A::U64,
}

const _: () = assert!(core::mem::size_of::<FolioDesc<CoreAtomics>>() == 16);
const _: () = assert!(core::mem::align_of::<FolioDesc<CoreAtomics>>() == 16);

impl<A: Atomics> Desc<A> for FolioDesc<A> {
    const TYPE: FrameType = FrameType::Folio;
    fn new_free() -> Self {
        Self {
            refcount: A::U32::new(0),
            flags: A::U32::new(0),
            meta: A::U64::new(0),
        }
    }
    fn link(&self) -> &A::U64 {
        &self.meta
    }
}

impl<A: Atomics> FolioDesc<A> {
    /// Fills a free descriptor for a new allocation; refcount stays 0 until
    /// [`FolioDesc::unfreeze`].
    pub(crate) fn init(&self, head: Pfn, order: u8, owner: Owner) {
        self.flags.store(0, Ordering::Relaxed);
        self.meta.store(
            order as u64 | owner.encode() << META_OWNER_SHIFT | head.0 << META_PFN_SHIFT,
            Ordering::Relaxed,
        );
    }

    /// Current refcount (a snapshot).
    #[inline]
    pub fn refcount(&self) -> u32 {
        // Acquire: pairs with the Release half of `put`'s AcqRel and with
        // `unfreeze`'s Release, so a caller that sees a count sees what the
        // writer of that count did before.
        self.refcount.load(Ordering::Acquire)
    }

    /// Increments unless zero ([`RefcountError::Zero`]: frozen or free) or
    /// at [`REFCOUNT_MAX`] ([`RefcountError::Saturated`]); returns the new count.
    #[inline]
    pub(crate) fn try_get(&self) -> Result<u32, RefcountError> {
        let mut n = self.refcount.load(Ordering::Relaxed);
        loop {
            if n == 0 {
                return Err(RefcountError::Zero);
            }
            if n == REFCOUNT_MAX {
                return Err(RefcountError::Saturated);
            }
            // Acquire: pairs with the Release of `unfreeze` (the owner's
            // writes to the folio and descriptor before publishing it) and
            // with the Release half of `put`'s AcqRel. Failure Relaxed: the
            // loop only retries with the value.
            match self
                .refcount
                .compare_exchange(n, n + 1, Ordering::Acquire, Ordering::Relaxed)
            {
                Ok(_) => return Ok(n + 1),
                Err(now) => n = now,
            }
        }
    }

    /// Decrements; `Ok(true)` when this was the last reference. A count of
    /// zero (frozen or free) is [`RefcountError::Zero`] and stays zero.
    #[inline]
    pub(crate) fn put(&self) -> Result<bool, RefcountError> {
        let mut n = self.refcount.load(Ordering::Relaxed);
        loop {
            if n == 0 {
                return Err(RefcountError::Zero);
            }
            // AcqRel: the last putter must see every other holder's writes
            // before the owner reuses the frames. The Release half pairs
            // with this same Acquire half in the last putter (and with
            // `freeze`'s Acquire); the Acquire half pairs with the other
            // holders' Release halves.
            match self
                .refcount
                .compare_exchange(n, n - 1, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Ok(n == 1),
                Err(now) => n = now,
            }
        }
    }

    /// Compare-exchange `expected -> 0`; `Err(actual)` when the count
    /// differs. `expected` 0 (already frozen) is refused the same way.
    #[inline]
    pub(crate) fn freeze(&self, expected: u32) -> Result<(), u32> {
        if expected == 0 {
            return Err(self.refcount.load(Ordering::Relaxed));
        }
        // Acquire: pairs with the Release half of the other holders' `put`s
        // (their writes are done before the freezer owns the folio alone).
        self.refcount
            .compare_exchange(expected, 0, Ordering::Acquire, Ordering::Relaxed)
            .map(|_| ())
    }

    /// Release compare-exchange `0 -> n`: unfreezes a frozen count;
    /// [`RefcountError::NotFrozen`] when the count is not zero.
    #[inline]
    pub(crate) fn unfreeze(&self, n: u32) -> Result<(), RefcountError> {
        // Release: publishes the frozen owner's writes (and `init`'s fields)
        // to whoever takes a reference next. Pairs with the Acquire of
        // `try_get` and `refcount`.
        self.refcount
            .compare_exchange(0, n, Ordering::Release, Ordering::Relaxed)
            .map(|_| ())
            .map_err(RefcountError::NotFrozen)
    }

    /// Order of the allocation (stable while a reference is held).
    #[inline]
    pub fn order(&self) -> u8 {
        (self.meta.load(Ordering::Relaxed) & ((1 << META_ORDER_BITS) - 1)) as u8
    }

    /// Owner (stable while a reference is held).
    #[inline]
    pub fn owner(&self) -> Owner {
        Owner::decode(self.meta.load(Ordering::Relaxed) >> META_OWNER_SHIFT)
    }

    /// First frame of the allocation (stable while a reference is held).
    #[inline]
    pub fn head(&self) -> Pfn {
        Pfn(self.meta.load(Ordering::Relaxed) >> META_PFN_SHIFT)
    }

    /// Flags ([`FOLIO_HWPOISON`], user flags).
    #[inline]
    pub fn flags(&self) -> u32 {
        // Acquire: pairs with the AcqRel of `set_flags` / `clear_flags`.
        self.flags.load(Ordering::Acquire)
    }

    /// Sets flag bits; returns the previous flags.
    #[inline]
    pub fn set_flags(&self, bits: u32) -> u32 {
        // AcqRel: pairs with the Acquire of `flags` and with the other
        // flag RMWs.
        self.flags.fetch_or(bits, Ordering::AcqRel)
    }

    /// Clears flag bits; returns the previous flags.
    #[inline]
    pub fn clear_flags(&self, bits: u32) -> u32 {
        // AcqRel: as in `set_flags`.
        self.flags.fetch_and(!bits, Ordering::AcqRel)
    }
}

// ---- page table --------------------------------------------------------------

/// Entries of one 4 KiB translation table (Arm ARM D8.2: 512 descriptors).
pub const TABLE_ENTRIES: u32 = 512;

const LEVEL_MASK: u32 = 0xff;
const GENERATION_SHIFT: u32 = 8;

/// Descriptor of a translation-table frame: what the table engine tracks.
#[repr(C, align(16))]
pub struct PageTableDesc<A: Atomics = CoreAtomics> {
    valid: A::U32,
    /// Level (low 8 bits) and a 24-bit generation, bumped each time a table
    /// using the descriptor is freed, so a handle to it is recognised as
    /// stale. Kept while free (only `link` is reused then).
    level: A::U32,
    link: A::U64,
}

const _: () = assert!(core::mem::size_of::<PageTableDesc<CoreAtomics>>() == 16);

impl<A: Atomics> Desc<A> for PageTableDesc<A> {
    const TYPE: FrameType = FrameType::PageTable;
    fn new_free() -> Self {
        Self {
            valid: A::U32::new(0),
            level: A::U32::new(0),
            link: A::U64::new(0),
        }
    }
    fn link(&self) -> &A::U64 {
        &self.link
    }
}

impl<A: Atomics> PageTableDesc<A> {
    /// Fills a free descriptor for an allocation of `order` (kept in the
    /// link cell, which is only a link while the descriptor is free).
    pub(crate) fn init(&self, order: u8) {
        self.valid.store(0, Ordering::Relaxed);
        let generation = self.level.load(Ordering::Relaxed) & !LEVEL_MASK;
        self.level.store(generation, Ordering::Relaxed);
        self.link.store(order as u64, Ordering::Relaxed);
    }

    /// Ends the current table's generation (when its frame is freed or
    /// retyped): every handle made for it is stale from now on.
    pub(crate) fn retire(&self) {
        let g = self.level.load(Ordering::Relaxed) >> GENERATION_SHIFT;
        self.level
            .store(g.wrapping_add(1) << GENERATION_SHIFT, Ordering::Relaxed);
    }

    /// Order of the allocation (meaningful while allocated).
    #[inline]
    pub fn order(&self) -> u8 {
        self.link.load(Ordering::Relaxed) as u8
    }

    /// Which use of this descriptor the current table is (24 bits, wrapping).
    #[inline]
    pub fn generation(&self) -> u32 {
        self.level.load(Ordering::Relaxed) >> GENERATION_SHIFT
    }

    /// Number of valid entries in the table.
    #[inline]
    pub fn valid(&self) -> u32 {
        self.valid.load(Ordering::Relaxed)
    }

    /// One more valid entry; returns the new count. Fails above [`TABLE_ENTRIES`].
    ///
    /// # Errors
    ///
    /// [`FrameError::ValidCountOutOfRange`](super::FrameError::ValidCountOutOfRange)
    /// above [`TABLE_ENTRIES`] (the count is left as it was).
    #[inline]
    pub fn inc_valid(&self) -> Result<u32, super::FrameError> {
        self.add_valid(1)
    }

    /// One valid entry fewer; returns the new count. Fails below zero.
    ///
    /// # Errors
    ///
    /// [`FrameError::ValidCountOutOfRange`](super::FrameError::ValidCountOutOfRange)
    /// below zero (the count is left as it was).
    #[inline]
    pub fn dec_valid(&self) -> Result<u32, super::FrameError> {
        self.sub_valid(1)
    }

    /// `n` more valid entries; returns the new count.
    ///
    /// # Errors
    ///
    /// [`FrameError::ValidCountOutOfRange`](super::FrameError::ValidCountOutOfRange)
    /// above [`TABLE_ENTRIES`] (the count is left as it was).
    pub fn add_valid(&self, n: u32) -> Result<u32, super::FrameError> {
        let old = self.valid.load(Ordering::Relaxed);
        match old.checked_add(n) {
            Some(new) if new <= TABLE_ENTRIES => {
                self.valid.store(new, Ordering::Relaxed);
                Ok(new)
            }
            _ => Err(super::FrameError::ValidCountOutOfRange),
        }
    }

    /// `n` valid entries fewer; returns the new count.
    ///
    /// # Errors
    ///
    /// [`FrameError::ValidCountOutOfRange`](super::FrameError::ValidCountOutOfRange)
    /// below zero (the count is left as it was).
    pub fn sub_valid(&self, n: u32) -> Result<u32, super::FrameError> {
        let old = self.valid.load(Ordering::Relaxed);
        match old.checked_sub(n) {
            Some(new) => {
                self.valid.store(new, Ordering::Relaxed);
                Ok(new)
            }
            None => Err(super::FrameError::ValidCountOutOfRange),
        }
    }

    /// The translation level the engine recorded (0..=3), 0 by default.
    #[inline]
    pub fn level(&self) -> u32 {
        self.level.load(Ordering::Relaxed) & LEVEL_MASK
    }

    /// Records the translation level (0..=3; only the low 8 bits are kept).
    #[inline]
    pub fn set_level(&self, level: u32) {
        let g = self.level.load(Ordering::Relaxed) & !LEVEL_MASK;
        self.level
            .store(g | (level & LEVEL_MASK), Ordering::Relaxed)
    }
}

// ---- slab --------------------------------------------------------------------

/// Descriptor of a slab's backing frames.
#[repr(C, align(16))]
pub struct SlabDesc<A: Atomics = CoreAtomics> {
    in_use: A::U32,
    object_size: A::U32,
    link: A::U64,
}

const _: () = assert!(core::mem::size_of::<SlabDesc<CoreAtomics>>() == 16);

impl<A: Atomics> Desc<A> for SlabDesc<A> {
    const TYPE: FrameType = FrameType::Slab;
    fn new_free() -> Self {
        Self {
            in_use: A::U32::new(0),
            object_size: A::U32::new(0),
            link: A::U64::new(0),
        }
    }
    fn link(&self) -> &A::U64 {
        &self.link
    }
}

impl<A: Atomics> SlabDesc<A> {
    /// Fills a free descriptor for an allocation of `order` (kept in the
    /// link cell, which is only a link while the descriptor is free).
    pub(crate) fn init(&self, order: u8) {
        self.in_use.store(0, Ordering::Relaxed);
        self.object_size.store(0, Ordering::Relaxed);
        self.link.store(order as u64, Ordering::Relaxed);
    }

    /// Order of the allocation (meaningful while allocated).
    #[inline]
    pub fn order(&self) -> u8 {
        self.link.load(Ordering::Relaxed) as u8
    }
    /// Objects in use.
    pub fn in_use(&self) -> u32 {
        self.in_use.load(Ordering::Relaxed)
    }
    /// Sets the objects in use.
    pub fn set_in_use(&self, n: u32) {
        self.in_use.store(n, Ordering::Relaxed)
    }
    /// Object size the slab was set up for.
    pub fn object_size(&self) -> u32 {
        self.object_size.load(Ordering::Relaxed)
    }
    /// Sets the object size.
    pub fn set_object_size(&self, n: u32) {
        self.object_size.store(n, Ordering::Relaxed)
    }
}

// ---- hwpoison ----------------------------------------------------------------

/// Descriptor of a poisoned frame: keeps the word the frame had before.
#[repr(C, align(16))]
pub struct HwPoisonDesc<A: Atomics = CoreAtomics> {
    original: A::U64,
    link: A::U64,
}

const _: () = assert!(core::mem::size_of::<HwPoisonDesc<CoreAtomics>>() == 16);

impl<A: Atomics> Desc<A> for HwPoisonDesc<A> {
    const TYPE: FrameType = FrameType::HwPoison;
    fn new_free() -> Self {
        Self {
            original: A::U64::new(0),
            link: A::U64::new(0),
        }
    }
    fn link(&self) -> &A::U64 {
        &self.link
    }
}

impl<A: Atomics> HwPoisonDesc<A> {
    pub(crate) fn init(&self, original: Word) {
        self.original.store(original.raw(), Ordering::Relaxed)
    }
    /// The frame's word from before it was poisoned. A descriptor address in
    /// it is history: that descriptor may have been reused since.
    pub fn original(&self) -> Word {
        Word::from_raw(self.original.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // In tests a panic is the failure report.
mod tests {
    use super::*;

    #[test]
    fn refcount_rules() {
        let d = FolioDesc::<CoreAtomics>::new_free();
        assert_eq!(d.try_get(), Err(RefcountError::Zero));
        d.init(Pfn(0x1234), 3, Owner::Pool(9));
        assert_eq!(d.unfreeze(1), Ok(()));
        assert_eq!(d.unfreeze(1), Err(RefcountError::NotFrozen(1)));
        assert_eq!(d.try_get(), Ok(2));
        assert_eq!(d.freeze(1), Err(2));
        assert_eq!(d.put(), Ok(false));
        assert_eq!(d.freeze(1), Ok(()));
        assert_eq!(d.freeze(0), Err(0));
        assert_eq!(d.try_get(), Err(RefcountError::Zero));
        assert_eq!(d.unfreeze(1), Ok(()));
        assert_eq!(d.put(), Ok(true));
        assert_eq!(
            (d.head(), d.order(), d.owner()),
            (Pfn(0x1234), 3, Owner::Pool(9))
        );
        assert_eq!(d.set_flags(FOLIO_HWPOISON), 0);
        assert_eq!(d.clear_flags(FOLIO_HWPOISON), FOLIO_HWPOISON);
    }

    /// No refcount arithmetic wraps: `put` at zero and `try_get` at the
    /// ceiling are refused and leave the count as it was.
    #[test]
    fn refcount_never_wraps() {
        let d = FolioDesc::<CoreAtomics>::new_free();
        assert_eq!(d.put(), Err(RefcountError::Zero));
        assert_eq!(d.refcount(), 0);
        assert_eq!(d.unfreeze(REFCOUNT_MAX - 1), Ok(()));
        assert_eq!(d.try_get(), Ok(REFCOUNT_MAX));
        assert_eq!(d.try_get(), Err(RefcountError::Saturated));
        assert_eq!(d.refcount(), REFCOUNT_MAX);
        assert_eq!(d.freeze(REFCOUNT_MAX), Ok(()));
        assert_eq!(d.put(), Err(RefcountError::Zero));
        assert_eq!(d.refcount(), 0);
    }

    #[test]
    fn valid_counts() {
        let d = PageTableDesc::<CoreAtomics>::new_free();
        assert_eq!(
            d.dec_valid(),
            Err(super::super::FrameError::ValidCountOutOfRange)
        );
        assert_eq!(d.inc_valid(), Ok(1));
        assert_eq!(d.add_valid(511), Ok(512));
        assert!(d.inc_valid().is_err());
        assert_eq!(d.sub_valid(512), Ok(0));
        d.set_level(2);
        assert_eq!(d.level(), 2);
    }
}
