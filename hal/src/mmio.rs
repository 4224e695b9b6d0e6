//! A device's register block at a fixed MMIO address: the one place the
//! console drivers turn an address into a `&Registers`.

/// The tock-registers block `R` at a fixed physical (= identity-mapped)
/// address.
pub struct MmioBlock<R> {
    base: *const R,
}

// SAFETY: the block is MMIO, reached only through tock-registers' volatile
// accessors; the drivers built on it are consoles, which the logger hands
// to one core and one context at a time, so sharing the handle is sound.
unsafe impl<R> Sync for MmioBlock<R> {}

impl<R> MmioBlock<R> {
    /// # Safety
    ///
    /// `base` is the address of a live `R` register block that is mapped as
    /// Device memory (or the MMU is off), and nothing but the driver holding
    /// this value touches it.
    pub const unsafe fn new(base: u64) -> Self {
        Self {
            base: base as *const R,
        }
    }
}

impl<R> core::ops::Deref for MmioBlock<R> {
    type Target = R;

    fn deref(&self) -> &R {
        // SAFETY: `new`'s contract: `base` points at a live `R` block.
        unsafe { &*self.base }
    }
}
