//! A fixed table that tells an interrupt handler, by INTID, the address of
//! the device it serves (the virtio-mmio transports' shared handler uses
//! it). Filling an entry and reading it race: an attach on one core, the
//! handler on another. So an entry is one 64-bit word, published with one
//! store: the INTID in bits 63:48, the address in bits 47:0. A reader that
//! finds the INTID has the address from the same load; there is no order
//! between two stores to get wrong, and an entry reused for another INTID
//! cannot pair one's INTID with the other's address.
//!
//! - [`Table::claim`] takes a free entry by moving it to a reserved value
//!   that no INTID matches, so [`Table::find`] cannot see it yet;
//! - [`Claim::publish`] stores the word (Release);
//! - [`Table::find`] loads it (Acquire).
//!
//! Pure atomics, no hardware: host-tested.

use core::sync::atomic::{AtomicU64, Ordering};

/// An entry no one holds.
const FREE: u64 = u64::MAX;
/// An entry held by a [`Claim`] that has not published it.
const CLAIMED: u64 = u64::MAX - 1;
/// Address bits of a word.
const ADDRESS_BITS: u32 = 48;

/// Why [`Claim::publish`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(hw, derive(defmt::Format))]
pub enum PublishError {
    /// The INTID does not fit 16 bits below 0xffff (an LPI), or the
    /// address does not fit 48 bits.
    Unrepresentable {
        /// The INTID.
        intid: u32,
        /// The address.
        base: u64,
    },
}

fn word(intid: u32, base: u64) -> Option<u64> {
    (intid < 0xffff && base >> ADDRESS_BITS == 0).then(|| u64::from(intid) << ADDRESS_BITS | base)
}

/// `N` entries, each free, claimed, or published for one INTID.
pub struct Table<const N: usize> {
    entries: [AtomicU64; N],
}

impl<const N: usize> Default for Table<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> Table<N> {
    /// Every entry free.
    pub const fn new() -> Self {
        Self {
            entries: [const { AtomicU64::new(FREE) }; N],
        }
    }

    /// Takes a free entry, invisible to [`Table::find`] until published;
    /// `None` when all are taken.
    pub fn claim(&self) -> Option<Claim<'_, N>> {
        self.entries
            .iter()
            .position(|e| {
                // Acquire on success: pairs with the Release store of FREE
                // in `release`, so the last holder is done with the entry.
                e.compare_exchange(FREE, CLAIMED, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            })
            .map(|index| Claim {
                table: self,
                index,
                published: false,
            })
    }

    /// The entry published for `intid`: its index and address.
    pub fn find(&self, intid: u32) -> Option<(usize, u64)> {
        self.entries.iter().enumerate().find_map(|(i, e)| {
            // Acquire: pairs with the Release store in `Claim::publish`, so
            // what the publisher wrote before publishing is seen too.
            let w = e.load(Ordering::Acquire);
            (w != FREE && w != CLAIMED && w >> ADDRESS_BITS == u64::from(intid))
                .then_some((i, w & ((1 << ADDRESS_BITS) - 1)))
        })
    }

    /// Frees entry `index` (published or not): `find` stops finding it.
    pub fn release(&self, index: usize) {
        if let Some(e) = self.entries.get(index) {
            // Release: pairs with the Acquire compare_exchange in `claim`.
            e.store(FREE, Ordering::Release);
        }
    }
}

/// A claimed entry; dropped unpublished, it is free again.
pub struct Claim<'a, const N: usize> {
    table: &'a Table<N>,
    index: usize,
    published: bool,
}

impl<const N: usize> Claim<'_, N> {
    /// The entry's index (stable while it is held).
    pub fn index(&self) -> usize {
        self.index
    }

    /// Makes the entry findable for `intid` with `base`, both in one
    /// store. Returns the index; refused (the entry freed) when they do
    /// not fit one word.
    pub fn publish(mut self, intid: u32, base: u64) -> Result<usize, PublishError> {
        let w = word(intid, base).ok_or(PublishError::Unrepresentable { intid, base })?;
        // Release: pairs with the Acquire load in `find`.
        self.table.entries[self.index].store(w, Ordering::Release);
        self.published = true;
        Ok(self.index)
    }
}

impl<const N: usize> Drop for Claim<'_, N> {
    fn drop(&mut self) {
        if !self.published {
            self.table.release(self.index);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    extern crate std;
    use std::sync::atomic::{AtomicBool, AtomicU64};
    use std::sync::Arc;

    #[test]
    fn a_claimed_entry_is_not_found_before_it_is_published() {
        let t = Table::<2>::new();
        let c = t.claim().expect("free entry");
        assert_eq!(t.find(33), None, "found before its address was stored");
        let i = c.publish(33, 0x0a00_0000).expect("fits");
        assert_eq!(t.find(33), Some((i, 0x0a00_0000)));
        assert_eq!(t.find(34), None);
        assert_eq!(t.find(0xffff), None);
        assert_eq!(t.find(u32::MAX), None);
    }

    #[test]
    fn claims_run_out_and_come_back() {
        let t = Table::<2>::new();
        let a = t.claim().expect("first");
        let b = t.claim().expect("second");
        assert!(t.claim().is_none());
        drop(a);
        let c = t.claim().expect("freed by drop");
        let i = c.publish(40, 1).expect("fits");
        drop(b);
        assert!(t.claim().is_some());
        t.release(i);
        assert_eq!(t.find(40), None);
    }

    #[test]
    fn an_intid_or_address_that_does_not_fit_is_refused_and_frees_the_entry() {
        let t = Table::<1>::new();
        let c = t.claim().expect("free");
        assert_eq!(
            c.publish(0x1_0000, 0x1000),
            Err(PublishError::Unrepresentable {
                intid: 0x1_0000,
                base: 0x1000
            })
        );
        let c = t.claim().expect("freed after the refusal");
        assert!(c.publish(40, 1 << 48).is_err());
        let c = t.claim().expect("freed again");
        assert_eq!(c.publish(0xfffe, (1 << 48) - 1), Ok(0));
        assert_eq!(t.find(0xfffe), Some((0, (1 << 48) - 1)));
    }

    /// Real threads: one publishes and releases entries whose address is a
    /// function of the INTID, others look them up; a reader never finds an
    /// INTID with another address.
    #[test]
    fn a_reader_on_another_thread_sees_the_address_with_the_intid() {
        let t = Arc::new(Table::<4>::new());
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(AtomicU64::new(0));
        let base_of = |intid: u32| 0x1000_0000 + u64::from(intid) * 0x200;
        let readers: std::vec::Vec<_> = (0..2)
            .map(|_| {
                let (t, stop, seen) = (t.clone(), stop.clone(), seen.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        for intid in 32..40 {
                            if let Some((_, base)) = t.find(intid) {
                                assert_eq!(base, base_of(intid), "INTID {intid}");
                                seen.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                        }
                    }
                })
            })
            .collect();
        // One entry reused for ever-changing INTIDs, for 300 ms and until
        // the readers found entries 10000 times (at most 10 s on a loaded
        // machine): a reader that could see an INTID without its own
        // address would see the address of the entry's previous INTID.
        let t0 = std::time::Instant::now();
        let mut round = 0u32;
        while t0.elapsed() < std::time::Duration::from_millis(300)
            || (seen.load(Ordering::Relaxed) < 10_000 && t0.elapsed().as_secs() < 10)
        {
            let intid = 32 + round % 8;
            let c = t.claim().expect("an entry");
            let i = c.publish(intid, base_of(intid)).expect("fits");
            for _ in 0..32 {
                core::hint::spin_loop();
            }
            t.release(i);
            round = round.wrapping_add(1);
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            r.join().expect("reader");
        }
        assert!(
            seen.load(Ordering::Relaxed) > 0,
            "the readers never found an entry"
        );
    }
}
