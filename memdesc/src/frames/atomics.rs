//! The atomic cells the race-relevant core (page-array words and descriptor
//! counters) is generic over.
//!
//! Production code uses [`CoreAtomics`] (`core::sync::atomic`). The loom test
//! (`tests/frames_loom.rs`) instantiates the same code with `loom` atomics
//! through newtypes implementing [`AtomicCell`], so the speculative-lookup race
//! is model-checked on exactly the code that ships, without a `cfg(loom)`
//! build.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// The subset of an integer atomic's interface the frame code uses.
///
/// The method names and semantics are those of `core::sync::atomic`.
pub trait AtomicCell<T: Copy>: Send + Sync + Sized + 'static {
    /// A new cell holding `v`.
    fn new(v: T) -> Self;
    /// Atomic load.
    fn load(&self, order: Ordering) -> T;
    /// Atomic store.
    fn store(&self, v: T, order: Ordering);
    /// Strong compare-and-exchange.
    ///
    /// # Errors
    ///
    /// `Err` holding the value the cell had when it was not `current`; the
    /// cell is then unchanged (as `core`'s `compare_exchange`, which never
    /// fails spuriously).
    fn compare_exchange(
        &self,
        current: T,
        new: T,
        success: Ordering,
        failure: Ordering,
    ) -> Result<T, T>;
    /// Atomic add, returning the previous value.
    fn fetch_add(&self, v: T, order: Ordering) -> T;
    /// Atomic subtract, returning the previous value.
    fn fetch_sub(&self, v: T, order: Ordering) -> T;
    /// Atomic bitwise or, returning the previous value.
    fn fetch_or(&self, v: T, order: Ordering) -> T;
    /// Atomic bitwise and, returning the previous value.
    fn fetch_and(&self, v: T, order: Ordering) -> T;
}

/// A family of atomic cells: 32-bit counters and 64-bit words.
pub trait Atomics: Send + Sync + 'static {
    /// 32-bit cell (refcounts, valid-entry counts, flags).
    type U32: AtomicCell<u32>;
    /// 64-bit cell (page-array words, descriptor metadata).
    type U64: AtomicCell<u64>;
    /// A memory fence (`core::sync::atomic::fence`).
    fn fence(order: Ordering);
}

/// `core::sync::atomic`: what the firmware and the benchmarks use.
#[derive(Debug, Clone, Copy, Default)]
pub struct CoreAtomics;

impl Atomics for CoreAtomics {
    type U32 = AtomicU32;
    type U64 = AtomicU64;
    #[inline(always)]
    fn fence(order: Ordering) {
        core::sync::atomic::fence(order)
    }
}

macro_rules! core_cell {
    ($atomic:ty, $int:ty) => {
        impl AtomicCell<$int> for $atomic {
            #[inline(always)]
            fn new(v: $int) -> Self {
                <$atomic>::new(v)
            }
            #[inline(always)]
            fn load(&self, order: Ordering) -> $int {
                <$atomic>::load(self, order)
            }
            #[inline(always)]
            fn store(&self, v: $int, order: Ordering) {
                <$atomic>::store(self, v, order)
            }
            #[inline(always)]
            fn compare_exchange(
                &self,
                current: $int,
                new: $int,
                success: Ordering,
                failure: Ordering,
            ) -> Result<$int, $int> {
                <$atomic>::compare_exchange(self, current, new, success, failure)
            }
            #[inline(always)]
            fn fetch_add(&self, v: $int, order: Ordering) -> $int {
                <$atomic>::fetch_add(self, v, order)
            }
            #[inline(always)]
            fn fetch_sub(&self, v: $int, order: Ordering) -> $int {
                <$atomic>::fetch_sub(self, v, order)
            }
            #[inline(always)]
            fn fetch_or(&self, v: $int, order: Ordering) -> $int {
                <$atomic>::fetch_or(self, v, order)
            }
            #[inline(always)]
            fn fetch_and(&self, v: $int, order: Ordering) -> $int {
                <$atomic>::fetch_and(self, v, order)
            }
        }
    };
}
core_cell!(AtomicU32, u32);
core_cell!(AtomicU64, u64);

#[cfg(test)]
#[allow(clippy::unwrap_used)] // In tests a panic is the failure report.
mod tests {
    use super::*;

    #[test]
    fn core_cells_behave_like_core_atomics() {
        let c = <AtomicU64 as AtomicCell<u64>>::new(5);
        assert_eq!(AtomicCell::fetch_add(&c, 2, Ordering::Relaxed), 5);
        // No other thread: AcqRel here pairs with nothing; it only checks
        // that the ordering is passed through to the core atomic.
        assert_eq!(
            AtomicCell::compare_exchange(&c, 7, 0, Ordering::AcqRel, Ordering::Relaxed),
            Ok(7)
        );
        assert_eq!(AtomicCell::load(&c, Ordering::Relaxed), 0);
        let d = <AtomicU32 as AtomicCell<u32>>::new(0b1010);
        assert_eq!(AtomicCell::fetch_or(&d, 1, Ordering::Relaxed), 0b1010);
        assert_eq!(AtomicCell::fetch_and(&d, 0b11, Ordering::Relaxed), 0b1011);
        assert_eq!(AtomicCell::load(&d, Ordering::Relaxed), 0b11);
    }
}
