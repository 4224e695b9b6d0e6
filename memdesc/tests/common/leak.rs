//! Descriptor memory for tests: every chunk a fresh leaked box.
#![allow(dead_code)] // Each test binary uses part of it.

use core::ptr::NonNull;
use memdesc::frames::{DescChunk, DescMemory};

/// Hands out leaked, page-aligned descriptor chunks; never runs out.
pub struct Leak;

// SAFETY: every chunk is a fresh, leaked, page-aligned box, never handed
// out twice.
unsafe impl DescMemory for Leak {
    fn chunk(&mut self) -> Option<NonNull<u8>> {
        Some(NonNull::from(Box::leak(Box::new(DescChunk::ZERO))).cast())
    }
}
