//! Folio references: `try_get`/`put`/`freeze`/`unfreeze` as typed handles, and
//! the speculative `pfn -> folio` lookup (docs/architecture.md, "The page array").
//!
//! The lookup is lock-free and races with frees and reuse by design:
//! load word -> `try_get` (increment unless zero) -> reload word -> if it
//! changed, `put` and retry. Descriptor memory is type-stable, so the
//! dereference in between is always of a live-or-free *folio* descriptor.
//!
//! Handles carry no lifetime: descriptors are `'static`. A [`FolioRef`] is one
//! counted reference; dropping it without [`FolioRef::put`] leaks the folio
//! (never memory-unsafe), hence `#[must_use]`. The last `put` yields a
//! [`LastRef`] which must go to
//! [`FrameAllocator::release`](super::FrameAllocator::release), the only
//! place that needs the allocator's lock.

use super::atomics::{Atomics, CoreAtomics};
use super::desc::{FolioDesc, HwPoisonDesc, PageTableDesc, RefcountError, SlabDesc};
use super::desc_cache::desc_of;
use super::error::FrameError;
use super::owner::Owner;
use super::page_array::PageArray;
use super::word::{FrameType, Word};
use crate::addr::Pfn;
use core::num::NonZeroU32;

/// One counted reference to a folio.
#[must_use = "a FolioRef must be put, or the folio leaks"]
pub struct FolioRef<A: Atomics = CoreAtomics> {
    desc: &'static FolioDesc<A>,
}

/// The reference whose `put` brought the count to zero: hand it to
/// [`FrameAllocator::release`](super::FrameAllocator::release).
#[must_use = "the last reference must be released to the allocator"]
pub struct LastRef<A: Atomics = CoreAtomics> {
    pub(crate) desc: &'static FolioDesc<A>,
}

/// A folio whose refcount is frozen at zero, owned by the holder of this token.
#[must_use = "a frozen folio must be unfrozen, freed or offlined"]
pub struct FrozenFolio<A: Atomics = CoreAtomics> {
    pub(crate) desc: &'static FolioDesc<A>,
    /// The count it was frozen at ([`FolioRef::freeze`]'s `expected`), which
    /// [`FrozenFolio::unfreeze`] must restore; 0 for a folio whose last
    /// reference went (the owner picks the count).
    pub(crate) refs: u32,
}

/// [`FrozenFolio::unfreeze`] was refused; the frozen folio is handed back.
#[must_use]
pub struct UnfreezeError<A: Atomics = CoreAtomics> {
    /// The folio, still frozen.
    pub folio: FrozenFolio<A>,
    /// Why: [`FrameError::RefcountMismatch`] (the count it was frozen at is
    /// `actual`) or [`FrameError::Corrupt`] (the count was not frozen).
    pub error: FrameError,
}

/// [`FolioRef::freeze`] failed: the count was not the expected value. The
/// reference is handed back unchanged.
#[must_use]
pub struct FreezeError<A: Atomics = CoreAtomics> {
    /// The reference, still counted.
    pub folio: FolioRef<A>,
    /// The count found.
    pub actual: u32,
}

macro_rules! folio_accessors {
    () => {
        /// The folio descriptor.
        #[inline]
        pub fn desc(&self) -> &'static FolioDesc<A> {
            self.desc
        }
        /// First frame of the folio.
        #[inline]
        pub fn pfn(&self) -> Pfn {
            self.desc.head()
        }
        /// Order of the folio.
        #[inline]
        pub fn order(&self) -> u8 {
            self.desc.order()
        }
        /// Owner of the folio.
        #[inline]
        pub fn owner(&self) -> Owner {
            self.desc.owner()
        }
    };
}

impl<A: Atomics> FolioRef<A> {
    folio_accessors!();

    /// Current count (a snapshot).
    #[inline]
    pub fn refcount(&self) -> u32 {
        self.desc.refcount()
    }

    /// Another reference to the same folio.
    ///
    /// # Errors
    ///
    /// [`FrameError::Frozen`] if the count was frozen meanwhile;
    /// [`FrameError::RefcountSaturated`] at [`REFCOUNT_MAX`](super::REFCOUNT_MAX).
    #[inline]
    pub fn try_clone(&self) -> Result<Self, FrameError> {
        match self.desc.try_get() {
            Ok(_) => Ok(Self { desc: self.desc }),
            Err(e) => Err(refcount_error(self.pfn(), e)),
        }
    }

    /// Drops this reference; `Some` when it was the last one. A count found
    /// at zero (someone froze the folio counting this reference in, then
    /// unfroze it without) is [`FrameError::RefcountUnderflow`] and is left
    /// at zero.
    ///
    /// # Errors
    ///
    /// [`FrameError::RefcountUnderflow`] for a count found at zero.
    #[inline]
    pub fn put(self) -> Result<Option<LastRef<A>>, FrameError> {
        match self.desc.put() {
            Ok(last) => Ok(last.then_some(LastRef { desc: self.desc })),
            Err(e) => Err(refcount_error(self.pfn(), e)),
        }
    }

    /// Freezes the count: compare-exchange `expected -> 0`, where `expected`
    /// includes this reference. On success the caller owns the folio
    /// exclusively (no `try_get` can succeed until it is unfrozen).
    ///
    /// # Errors
    ///
    /// A [`FreezeError`] holding the reference back and the count found when
    /// it is not `expected`.
    pub fn freeze(self, expected: u32) -> Result<FrozenFolio<A>, FreezeError<A>> {
        match self.desc.freeze(expected) {
            Ok(()) => Ok(FrozenFolio {
                desc: self.desc,
                refs: expected,
            }),
            Err(actual) => Err(FreezeError {
                folio: self,
                actual,
            }),
        }
    }

    /// Gives up the handle without changing the count (for references kept
    /// elsewhere, e.g. one per mapping PTE); see [`FolioRef::from_raw`].
    #[inline]
    pub fn into_raw(self) -> &'static FolioDesc<A> {
        self.desc
    }

    /// Re-wraps a reference given up with [`FolioRef::into_raw`] (or counted
    /// by [`FrozenFolio::unfreeze`]).
    ///
    /// # Safety
    ///
    /// `desc` carries one counted reference that nobody else will put or
    /// re-wrap: it came from [`FolioRef::into_raw`] (or is one of the `n - 1`
    /// extra references of [`FrozenFolio::unfreeze`]) and is wrapped once.
    /// Wrapping an uncounted reference lets a `put` free the folio while its
    /// frames are still in use, so the allocator would hand them out twice.
    ///
    /// # Examples
    ///
    /// Re-wrapping needs `unsafe`, and the raw counter operations are not
    /// reachable outside the crate:
    ///
    /// ```compile_fail
    /// use memdesc::frames::{FolioDesc, FolioRef};
    /// fn forge(d: &'static FolioDesc) -> FolioRef {
    ///     FolioRef::from_raw(d) // error: call to unsafe function
    /// }
    /// ```
    /// ```compile_fail
    /// use memdesc::frames::FolioDesc;
    /// fn drop_one(d: &'static FolioDesc) -> bool {
    ///     d.put() // error: `put` is private
    /// }
    /// ```
    /// ```compile_fail
    /// use memdesc::frames::FolioDesc;
    /// fn thaw(d: &'static FolioDesc) {
    ///     d.unfreeze(5) // error: `unfreeze` is private
    /// }
    /// ```
    /// ```
    /// use memdesc::frames::{FolioDesc, FolioRef};
    /// fn rewrap(d: &'static FolioDesc) -> FolioRef {
    ///     // SAFETY: (example) `d` came from `into_raw` and is wrapped once.
    ///     unsafe { FolioRef::from_raw(d) }
    /// }
    /// ```
    #[inline]
    pub unsafe fn from_raw(desc: &'static FolioDesc<A>) -> Self {
        Self { desc }
    }

    /// Wraps the reference the allocator just counted (`unfreeze(1)`).
    #[inline]
    pub(crate) fn counted(desc: &'static FolioDesc<A>) -> Self {
        Self { desc }
    }
}

impl<A: Atomics> LastRef<A> {
    folio_accessors!();
}

impl<A: Atomics> FrozenFolio<A> {
    folio_accessors!();

    /// Unfreezes with `n` references (release compare-exchange `0 -> n`).
    /// One is returned; the other `n - 1` belong to whoever the caller
    /// accounted them to and are re-wrapped with [`FolioRef::from_raw`].
    ///
    /// A folio frozen by [`FolioRef::freeze`]`(expected)` must get back
    /// exactly `expected`: any other `n` is refused
    /// ([`FrameError::RefcountMismatch`]). A folio handed to its owner by
    /// its last `put` takes any `n`.
    ///
    /// # Errors
    ///
    /// An [`UnfreezeError`] holding the frozen folio back:
    /// [`FrameError::RefcountMismatch`] for the wrong `n`.
    #[inline]
    pub fn unfreeze(self, n: NonZeroU32) -> Result<FolioRef<A>, UnfreezeError<A>> {
        let pfn = self.pfn();
        if self.refs != 0 && n.get() != self.refs {
            let actual = self.refs;
            return Err(UnfreezeError {
                folio: self,
                error: FrameError::RefcountMismatch { pfn, actual },
            });
        }
        match self.desc.unfreeze(n.get()) {
            Ok(()) => Ok(FolioRef { desc: self.desc }),
            Err(_) => Err(UnfreezeError {
                folio: self,
                error: FrameError::Corrupt { pfn },
            }),
        }
    }

    /// The count it was frozen at (0 when its last reference went).
    #[inline]
    pub fn frozen_refs(&self) -> u32 {
        self.refs
    }
}

/// A frame allocated as a translation table, with its descriptor.
///
/// Not `Copy` or `Clone`: [`FrameAllocator::free_page_table`](super::FrameAllocator::free_page_table)
/// consumes it. A second handle from [`PageArray::page_table`] outlives a
/// free only as a stale handle: it remembers the descriptor's generation, and
/// once the frame holds another table every change through it is
/// [`FrameError::StaleHandle`].
///
/// ```compile_fail
/// # use memdesc::frames::PageTableFrame;
/// fn twice(t: PageTableFrame) -> (PageTableFrame, PageTableFrame) {
///     (t, t) // a table handle cannot be duplicated
/// }
/// ```
pub struct PageTableFrame<A: Atomics = CoreAtomics> {
    pfn: Pfn,
    desc: &'static PageTableDesc<A>,
    generation: u32,
}

impl<A: Atomics> PageTableFrame<A> {
    pub(crate) fn new(pfn: Pfn, desc: &'static PageTableDesc<A>) -> Self {
        Self {
            pfn,
            desc,
            generation: desc.generation(),
        }
    }

    /// Ok while the frame still holds the table this handle was made for.
    ///
    /// # Errors
    ///
    /// [`FrameError::StaleHandle`] once the frame holds another table or none.
    #[inline]
    pub fn check_current(&self) -> Result<(), FrameError> {
        if self.desc.generation() == self.generation {
            Ok(())
        } else {
            Err(FrameError::StaleHandle { pfn: self.pfn })
        }
    }
    /// The table's frame.
    #[inline]
    pub fn pfn(&self) -> Pfn {
        self.pfn
    }
    /// Its descriptor.
    #[inline]
    pub fn desc(&self) -> &'static PageTableDesc<A> {
        self.desc
    }
    /// Valid entries.
    #[inline]
    pub fn valid(&self) -> u32 {
        self.desc.valid()
    }
    /// One more valid entry; returns the new count.
    ///
    /// # Errors
    ///
    /// [`FrameError::StaleHandle`] (see [`PageTableFrame::check_current`]);
    /// [`FrameError::ValidCountOutOfRange`] above the table's entries.
    #[inline]
    pub fn inc_valid(&self) -> Result<u32, FrameError> {
        self.check_current()?;
        self.desc.inc_valid()
    }
    /// One valid entry fewer; returns the new count.
    ///
    /// # Errors
    ///
    /// [`FrameError::StaleHandle`] (see [`PageTableFrame::check_current`]);
    /// [`FrameError::ValidCountOutOfRange`] below zero.
    #[inline]
    pub fn dec_valid(&self) -> Result<u32, FrameError> {
        self.check_current()?;
        self.desc.dec_valid()
    }
}

/// The [`FrameError`] for a refused refcount operation on the folio at `pfn`.
#[inline]
pub(crate) fn refcount_error(pfn: Pfn, e: RefcountError) -> FrameError {
    match e {
        RefcountError::Zero => FrameError::RefcountUnderflow { pfn },
        RefcountError::Saturated => FrameError::RefcountSaturated { pfn },
        RefcountError::NotFrozen(_) => FrameError::Corrupt { pfn },
    }
}

/// The error `try_get` gives for a frame that is not a gettable folio.
#[inline]
pub(crate) fn not_folio(pfn: Pfn, w: Word) -> FrameError {
    match w.frame_type() {
        Some(FrameType::Free) => FrameError::Free { pfn },
        Some(FrameType::Offline) => FrameError::Offline { pfn },
        Some(FrameType::HwPoison) => FrameError::HwPoisoned { pfn },
        Some(found) => FrameError::WrongType { pfn, found },
        None => FrameError::Corrupt { pfn },
    }
}

impl<A: Atomics> PageArray<'_, A> {
    /// Speculative `pfn -> folio` reference, lock-free.
    ///
    /// Fails with [`FrameError::Free`], [`FrameError::Frozen`],
    /// [`FrameError::Offline`], [`FrameError::HwPoisoned`] or
    /// [`FrameError::WrongType`] when the frame is not a live folio. If the
    /// retry path drops the last reference of a folio that was freed and
    /// reused under it, `release` receives it (take the allocator lock there
    /// and call [`FrameAllocator::release`](super::FrameAllocator::release)).
    ///
    /// # Errors
    ///
    /// [`FrameError::NotManaged`] outside the array; see above for a frame
    /// that is not a live folio.
    pub fn get_folio(
        &self,
        pfn: Pfn,
        mut release: impl FnMut(LastRef<A>),
    ) -> Result<FolioRef<A>, FrameError> {
        let idx = self.index_of(pfn).ok_or(FrameError::NotManaged { pfn })?;
        loop {
            let w = self.load(idx);
            let Some(desc) = desc_of::<A, FolioDesc<A>>(w) else {
                return Err(not_folio(pfn, w));
            };
            let got = desc.try_get();
            let again = self.load(idx);
            if again == w {
                return match got {
                    Ok(_) => Ok(FolioRef { desc }),
                    Err(RefcountError::Saturated) => Err(FrameError::RefcountSaturated { pfn }),
                    Err(_) => Err(FrameError::Frozen { pfn }),
                };
            }
            // The frame changed under us: drop what we took and look again.
            // (Our reference is counted, so `put` cannot find zero.)
            if got.is_ok() && desc.put() == Ok(true) {
                release(LastRef { desc });
            }
        }
    }

    /// The translation-table frame at `pfn`.
    ///
    /// # Errors
    ///
    /// [`FrameError::NotManaged`]; the type error of a frame that is not a
    /// page table ([`FrameError::WrongType`], [`FrameError::Free`], ...).
    pub fn page_table(&self, pfn: Pfn) -> Result<PageTableFrame<A>, FrameError> {
        let w = self.word(pfn)?;
        let d = desc_of::<A, PageTableDesc<A>>(w).ok_or_else(|| not_folio(pfn, w))?;
        Ok(PageTableFrame::new(pfn, d))
    }

    /// The slab descriptor of frame `pfn`.
    ///
    /// # Errors
    ///
    /// [`FrameError::NotManaged`]; the type error of a frame that is not slab
    /// backing.
    pub fn slab(&self, pfn: Pfn) -> Result<&'static SlabDesc<A>, FrameError> {
        let w = self.word(pfn)?;
        desc_of::<A, SlabDesc<A>>(w).ok_or_else(|| not_folio(pfn, w))
    }

    /// The word a poisoned frame had before (or belongs to now, if its
    /// allocation changed type since).
    ///
    /// # Errors
    ///
    /// [`FrameError::NotManaged`]; [`FrameError::WrongType`] (or
    /// [`FrameError::Corrupt`]) for a frame that is not HwPoison.
    pub fn poisoned_original(&self, pfn: Pfn) -> Result<Word, FrameError> {
        let w = self.word(pfn)?;
        let d = desc_of::<A, HwPoisonDesc<A>>(w).ok_or(match w.frame_type() {
            Some(found) => FrameError::WrongType { pfn, found },
            None => FrameError::Corrupt { pfn },
        })?;
        Ok(d.original())
    }

    /// `w` itself, or for a poisoned frame the word it had before.
    #[inline]
    pub(crate) fn effective(&self, w: Word) -> Word {
        match desc_of::<A, HwPoisonDesc<A>>(w) {
            Some(d) => d.original(),
            None => w,
        }
    }
}
