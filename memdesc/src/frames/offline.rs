//! Offline frames: given away (ballooned), refcount frozen at 0, no
//! descriptor, never in a list threaded through page metadata.
//!
//! The balloon allocates them directly ([`FrameAllocator::alloc_offline`]) or
//! turns a frozen allocation into Offline ([`FrameAllocator::offline`],
//! [`FrameAllocator::offline_folio`]); on deflate it brings them back as a
//! folio ([`FrameAllocator::online`]), as another frozen kind
//! ([`FrameAllocator::retype_frozen`]) or frees them
//! ([`FrameAllocator::free_frozen`]). `count(FrameType::Offline)` is the
//! number of frames currently offline.

use super::allocator::FrameAllocator;
use super::atomics::Atomics;
use super::desc::FOLIO_HWPOISON;
use super::desc_cache::{desc_word, DescMemory};
use super::error::FrameError;
use super::frozen::FrozenKind;
use super::owner::Owner;
use super::refcount::{FolioRef, FrozenFolio};
use super::word::{FrameType, Word, MISC_FLAG_TAIL};
use crate::addr::Pfn;

impl<M: DescMemory, A: Atomics> FrameAllocator<'_, M, A> {
    /// `2^order` free frames straight to Offline.
    ///
    /// # Errors
    ///
    /// As [`FrameAllocator::alloc_frozen`].
    pub fn alloc_offline(&mut self, order: u8) -> Result<Pfn, FrameError> {
        self.alloc_frozen(order, FrozenKind::Offline)
    }

    /// Turns the frozen allocation `[pfn, pfn + 2^order)` (page table without
    /// valid entries, slab, guard) into Offline frames.
    ///
    /// # Errors
    ///
    /// As [`FrameAllocator::retype_frozen`].
    pub fn offline(&mut self, pfn: Pfn, order: u8) -> Result<(), FrameError> {
        self.retype_frozen(pfn, order, FrozenKind::Offline)
    }

    /// Turns a frozen allocation into another frozen kind (Offline back to
    /// Guard, PageTable, ...). Descriptors are swapped as needed; poisoned
    /// frames stay poisoned.
    ///
    /// # Errors
    ///
    /// The allocation checks of [`FrameAllocator::free_frozen`];
    /// [`FrameError::WrongType`] for reserved frames;
    /// [`FrameError::PageTableNotEmpty`] for a table with valid entries;
    /// [`FrameError::OutOfDescriptors`] when the new kind's descriptor cannot be
    /// had. Nothing changes on error.
    pub fn retype_frozen(&mut self, pfn: Pfn, order: u8, to: FrozenKind) -> Result<(), FrameError> {
        let (_, idx, head, _) = self.check_allocation(pfn, order)?;
        let from = head.frame_type().ok_or(FrameError::Corrupt { pfn })?;
        if from == FrameType::Reserved {
            return Err(FrameError::WrongType { pfn, found: from });
        }
        // `head` is the original word when the frame is poisoned: a poisoned
        // table with live entries is still a table with live entries.
        Self::check_table_empty(pfn, head)?;
        let (new_head, new_tail) = self.frozen_words(order, to)?;
        self.drop_desc(head);
        let healthy = self.rewrite(idx, order, new_head, new_tail);
        self.retally(from, new_head, healthy);
        Ok(())
    }

    /// Splits the frozen allocation `[pfn, pfn + 2^order)` of a kind without
    /// a descriptor (Offline, Guard) into `2^order` one-frame allocations of
    /// that kind, each of which can then be retyped
    /// ([`FrameAllocator::retype_frozen`]) or freed on its own. For a pool
    /// carved out of one aligned block (the firmware's page-table pool).
    /// Poisoned frames stay poisoned.
    ///
    /// # Errors
    ///
    /// The allocation checks of [`FrameAllocator::free_frozen`];
    /// [`FrameError::WrongType`] for any other kind. Nothing changes on
    /// error.
    pub fn split_frozen(&mut self, pfn: Pfn, order: u8) -> Result<(), FrameError> {
        let (_, idx, head, _) = self.check_allocation(pfn, order)?;
        let ty = head.frame_type().ok_or(FrameError::Corrupt { pfn })?;
        if !matches!(ty, FrameType::Offline | FrameType::Guard) {
            return Err(FrameError::WrongType { pfn, found: ty });
        }
        let single = Word::misc(ty, head.subtype(), 0, 0);
        for i in 0..1usize << order {
            self.rewrite(idx + i, 0, single, single);
        }
        Ok(())
    }

    /// Turns a frozen folio into Offline frames; its descriptor is freed.
    ///
    /// # Errors
    ///
    /// [`FrameError::Corrupt`] or [`FrameError::NotAllocation`] when the
    /// folio's frames no longer point at its descriptor.
    pub fn offline_folio(&mut self, f: FrozenFolio<A>) -> Result<(), FrameError> {
        let d = f.desc;
        let (pfn, order) = (d.head(), d.order());
        let idx = self.pa.index_of(pfn).ok_or(FrameError::Corrupt { pfn })?;
        if self.pa.effective(self.pa.load_relaxed(idx)) != desc_word(d) {
            return Err(FrameError::NotAllocation { pfn });
        }
        let healthy = self.rewrite(
            idx,
            order,
            Word::misc(FrameType::Offline, 0, order, 0),
            Word::misc(FrameType::Offline, 0, order, MISC_FLAG_TAIL),
        );
        self.folios.free(d);
        self.retally(
            FrameType::Folio,
            Word::misc(FrameType::Offline, 0, 0, 0),
            healthy,
        );
        Ok(())
    }

    /// Brings the Offline allocation `[pfn, pfn + 2^order)` back as a folio
    /// with refcount 1, owned by `owner`.
    ///
    /// # Errors
    ///
    /// The allocation checks of [`FrameAllocator::free_frozen`];
    /// [`FrameError::WrongType`] unless the allocation is Offline;
    /// [`FrameError::OutOfDescriptors`] when no folio descriptor can be had.
    pub fn online(&mut self, pfn: Pfn, order: u8, owner: Owner) -> Result<FolioRef<A>, FrameError> {
        let (_, idx, head, _) = self.check_allocation(pfn, order)?;
        if head.frame_type() != Some(FrameType::Offline) {
            return Err(FrameError::WrongType {
                pfn,
                found: head.frame_type().unwrap_or(FrameType::Reserved),
            });
        }
        let d = self.get_folio_desc()?;
        d.init(pfn, order, owner);
        let w = desc_word(d);
        let healthy = self.rewrite(idx, order, w, w);
        if healthy != 1u64 << order {
            d.set_flags(FOLIO_HWPOISON);
        }
        // Cannot fail: `get_folio_desc` checked the count is 0.
        let _ = d.unfreeze(1);
        self.retally(FrameType::Offline, w, healthy);
        Ok(FolioRef::counted(d))
    }

    fn retally(&mut self, from: FrameType, to: Word, healthy: u64) {
        // Wrapping: a partial sum under the SMP allocator's per-CPU deltas
        // (see `FrameAllocator::free_folio_desc`).
        self.by_type[from.index()] = self.by_type[from.index()].wrapping_sub(healthy);
        if let Some(t) = to.frame_type() {
            self.by_type[t.index()] = self.by_type[t.index()].wrapping_add(healthy);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // In tests a panic is the failure report.
mod tests {
    use crate::frames::testutil::*;
    use crate::frames::*;

    #[test]
    fn a_split_guard_block_is_one_frame_allocations() {
        let (pa, _) = setup(&[(0x100, 0x140)]);
        let mut fa = alloc(pa, &[]);
        let p = fa.alloc_frozen(4, FrozenKind::Guard).unwrap();
        assert_eq!(
            fa.split_frozen(Pfn(p.0 + 1), 0),
            Err(FrameError::NotAllocation { pfn: Pfn(p.0 + 1) })
        );
        fa.split_frozen(p, 4).unwrap();
        assert_eq!(fa.count(FrameType::Guard), 16);
        // Each frame on its own: a table, a freed frame, a guard again.
        fa.retype_frozen(Pfn(p.0 + 3), 0, FrozenKind::PageTable)
            .unwrap();
        assert_eq!(pa.page_table(Pfn(p.0 + 3)).unwrap().valid(), 0);
        fa.free_frozen(Pfn(p.0 + 5), 0).unwrap();
        assert_eq!(fa.count(FrameType::Guard), 14);
        assert_eq!(fa.count(FrameType::PageTable), 1);
        fa.check_consistency().unwrap();
        fa.retype_frozen(Pfn(p.0 + 3), 0, FrozenKind::Guard)
            .unwrap();
        assert!(fa.free_frozen(p, 4).is_err(), "no longer one allocation");
        // A table cannot be split (it has a descriptor).
        let t = fa.alloc_frozen(0, FrozenKind::PageTable).unwrap();
        assert_eq!(
            fa.split_frozen(t, 0),
            Err(FrameError::WrongType {
                pfn: t,
                found: FrameType::PageTable
            })
        );
        fa.check_consistency().unwrap();
    }

    #[test]
    fn balloon_round_trip() {
        let (pa, mut fa) = fresh(&[(0x100, 0x140)]);
        let p = fa.alloc_offline(2).unwrap();
        assert_eq!(fa.count(FrameType::Offline), 4);
        assert_eq!(
            pa.get_folio(p, |_| ()).err(),
            Some(FrameError::Offline { pfn: p })
        );
        let f = fa.online(p, 2, Owner::Balloon).unwrap();
        assert_eq!(fa.count(FrameType::Offline), 0);
        assert_eq!(fa.count(FrameType::Folio), 4);
        // Balloon-owned: the last put hands it back frozen.
        let Ok(Some(Released::ToOwner { owner, folio })) = fa.put(f) else {
            panic!("expected the owner hook")
        };
        assert_eq!(owner, Owner::Balloon);
        assert_eq!(
            pa.get_folio(p, |_| ()).err(),
            Some(FrameError::Frozen { pfn: p })
        );
        fa.offline_folio(folio).unwrap();
        assert_eq!(fa.count(FrameType::Offline), 4);
        fa.check_consistency().unwrap();
        fa.free_frozen(p, 2).unwrap();
        assert_eq!(fa.count(FrameType::Free), 0x40);
        fa.check_consistency().unwrap();
    }

    #[test]
    fn retype_and_errors() {
        let (_, mut fa) = fresh(&[(0x100, 0x140)]);
        let t = fa.alloc_page_table().unwrap();
        t.inc_valid().unwrap();
        assert!(matches!(
            fa.offline(t.pfn(), 0),
            Err(FrameError::PageTableNotEmpty { valid: 1, .. })
        ));
        t.dec_valid().unwrap();
        fa.offline(t.pfn(), 0).unwrap();
        assert_eq!(fa.count(FrameType::Offline), 1);
        assert_eq!(fa.count(FrameType::PageTable), 0);
        assert_eq!(fa.stats().live_descs[2], 0);
        fa.retype_frozen(t.pfn(), 0, FrozenKind::Slab).unwrap();
        assert_eq!(fa.count(FrameType::Slab), 1);
        assert_eq!(
            fa.online(t.pfn(), 0, Owner::Buddy).err(),
            Some(FrameError::WrongType {
                pfn: t.pfn(),
                found: FrameType::Slab
            })
        );
        let g = fa.alloc_frozen(2, FrozenKind::Guard).unwrap();
        assert_eq!(fa.offline(g, 1), Err(FrameError::NotAllocation { pfn: g }));
        assert_eq!(
            fa.offline(Pfn(g.0 + 1), 0),
            Err(FrameError::NotAllocation { pfn: Pfn(g.0 + 1) })
        );
        fa.check_consistency().unwrap();
    }
}
