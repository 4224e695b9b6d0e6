//! The page array every frames test starts from: zeroed words over some
//! ranges, leaked so it lives as long as the test, for any [`Atomics`].
#![allow(dead_code)] // Each test binary uses part of it.

use memdesc::frames::{words_needed, AtomicCell, Atomics, PageArray, PfnRange};
use memdesc::Pfn;

/// A fresh page array over `ranges`.
pub fn leaked_page_array<A: Atomics>(ranges: &[PfnRange]) -> &'static PageArray<'static, A> {
    let n = words_needed(ranges).unwrap() as usize;
    let storage: &'static mut [A::U64] = Box::leak(
        (0..n)
            .map(|_| <A::U64 as AtomicCell<u64>>::new(0))
            .collect(),
    );
    Box::leak(Box::new(PageArray::new(storage, ranges).unwrap()))
}

/// A fresh page array over the one range `[base, base + frames)`.
pub fn leaked_page_array_at<A: Atomics>(base: u64, frames: u64) -> &'static PageArray<'static, A> {
    leaked_page_array(&[PfnRange::new(Pfn(base), Pfn(base + frames))])
}
