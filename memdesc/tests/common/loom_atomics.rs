//! Loom atomics for the shipping code: newtypes over loom's cells
//! implementing [`AtomicCell`], and [`LoomAtomics`] implementing both
//! [`Atomics`] (frames) and [`LockAtomics`] (locks, whose spin loops yield
//! to loom's scheduler).
#![allow(dead_code)] // Each test binary uses part of it.

use loom::sync::atomic::Ordering;
use memdesc::frames::{AtomicCell, Atomics};
use memdesc::sync::LockAtomics;

macro_rules! loom_cell {
    ($name:ident, $atomic:ty, $int:ty) => {
        pub struct $name($atomic);
        impl AtomicCell<$int> for $name {
            fn new(v: $int) -> Self {
                Self(<$atomic>::new(v))
            }
            fn load(&self, o: Ordering) -> $int {
                self.0.load(o)
            }
            fn store(&self, v: $int, o: Ordering) {
                self.0.store(v, o)
            }
            fn compare_exchange(
                &self,
                c: $int,
                n: $int,
                s: Ordering,
                f: Ordering,
            ) -> Result<$int, $int> {
                self.0.compare_exchange(c, n, s, f)
            }
            fn fetch_add(&self, v: $int, o: Ordering) -> $int {
                self.0.fetch_add(v, o)
            }
            fn fetch_sub(&self, v: $int, o: Ordering) -> $int {
                self.0.fetch_sub(v, o)
            }
            fn fetch_or(&self, v: $int, o: Ordering) -> $int {
                self.0.fetch_or(v, o)
            }
            fn fetch_and(&self, v: $int, o: Ordering) -> $int {
                self.0.fetch_and(v, o)
            }
        }
    };
}
loom_cell!(LoomU32, loom::sync::atomic::AtomicU32, u32);
loom_cell!(LoomU64, loom::sync::atomic::AtomicU64, u64);

pub struct LoomAtomics;
impl LockAtomics for LoomAtomics {
    type U32 = LoomU32;
    type U64 = LoomU64;
    fn relax() {
        loom::thread::yield_now()
    }
}
impl Atomics for LoomAtomics {
    type U32 = LoomU32;
    type U64 = LoomU64;
    fn fence(order: Ordering) {
        loom::sync::atomic::fence(order)
    }
}

/// [`LoomAtomics`] for a lock without a waiter queue
/// ([`LockAtomics::FIFO`] false: the host threads' policy).
pub struct LoomUnqueued;
impl LockAtomics for LoomUnqueued {
    type U32 = LoomU32;
    type U64 = LoomU64;
    fn relax() {
        loom::thread::yield_now()
    }
    const FIFO: bool = false;
}
