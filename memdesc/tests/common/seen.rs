//! Outcome counters for loom models: each interleaving records which
//! outcome it reached, and a model that never reached one of its outcomes
//! proves nothing about it, so that fails the test.
#![allow(dead_code)] // Each test binary uses part of it.

use std::sync::atomic::{AtomicUsize, Ordering};

/// `N` outcome counters summed over all interleavings of one model.
pub struct Seen<const N: usize>([AtomicUsize; N]);

impl<const N: usize> Seen<N> {
    pub const fn new() -> Self {
        Self([const { AtomicUsize::new(0) }; N])
    }

    /// Records that this interleaving reached outcome `i`.
    pub fn hit(&self, i: usize) {
        self.0[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Every outcome must have been reached.
    pub fn assert_all(&self, names: &str) {
        let v: Vec<usize> = self.0.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        eprintln!("loom outcomes [{names}]: {v:?}");
        assert!(
            v.iter().all(|&n| n > 0),
            "unexplored outcome [{names}]: {v:?}"
        );
    }
}
