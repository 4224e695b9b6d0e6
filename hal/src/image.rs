//! The firmware image's layout, from the linker script (`link/sections.ld`):
//! every symbol declared once here, with what it marks, so the MMU code can
//! map text RX, rodata R, data RW-XN and leave the stack guard pages unmapped.

extern "C" {
    static __image_start: u8;
    static __text_start: u8;
    static __text_end: u8;
    static __rodata_start: u8;
    static __rodata_end: u8;
    static __data_start: u8;
    static __main_stack_guard: u8;
    static __main_stack_bottom: u8;
    static __main_stack_top: u8;
    static __exception_stack_guard: u8;
    static __exception_stack_bottom: u8;
    static __exception_stack_top: u8;
    static __secondary_stacks: u8;
    static __image_end: u8;
}

/// A `[start, end)` byte range of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, defmt::Format)]
pub struct Span {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

impl Span {
    /// Length in bytes.
    pub const fn len(&self) -> u64 {
        self.end - self.start
    }
    /// True when empty.
    pub const fn is_empty(&self) -> bool {
        self.end == self.start
    }
    /// True when `addr` lies inside.
    pub const fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }
}

macro_rules! addr {
    ($sym:ident) => {
        // Only the symbol's address is taken (no unsafe needed for
        // `&raw const` of an extern static); linker symbols are never read.
        &raw const $sym as u64
    };
}

/// The whole image, page aligned.
pub fn whole() -> Span {
    Span {
        start: addr!(__image_start),
        end: addr!(__image_end),
    }
}
/// Code: mapped read-only, executable.
pub fn text() -> Span {
    Span {
        start: addr!(__text_start),
        end: addr!(__text_end),
    }
}
/// Read-only data: mapped read-only, execute-never.
pub fn rodata() -> Span {
    Span {
        start: addr!(__rodata_start),
        end: addr!(__rodata_end),
    }
}
/// .data and .bss: read-write, execute-never.
pub fn data() -> Span {
    Span {
        start: addr!(__data_start),
        end: addr!(__main_stack_guard),
    }
}
/// The main thread's stack (SP_EL0).
pub fn main_stack() -> Span {
    Span {
        start: addr!(__main_stack_bottom),
        end: addr!(__main_stack_top),
    }
}
/// The page under the main stack, left unmapped.
pub fn main_stack_guard() -> Span {
    Span {
        start: addr!(__main_stack_guard),
        end: addr!(__main_stack_bottom),
    }
}
/// The exception stack (SP_EL1).
pub fn exception_stack() -> Span {
    Span {
        start: addr!(__exception_stack_bottom),
        end: addr!(__exception_stack_top),
    }
}
/// The page under the exception stack, left unmapped.
pub fn exception_stack_guard() -> Span {
    Span {
        start: addr!(__exception_stack_guard),
        end: addr!(__exception_stack_bottom),
    }
}

/// Bytes of one secondary core's stack slot (`link/sections.ld`): guard
/// page, main stack, guard page, exception stack.
pub const CPU_STACK_SLOT: u64 = 4096 + CPU_MAIN_STACK + 4096 + CPU_EXCEPTION_STACK;
/// A secondary core's main stack (SP_EL0).
pub const CPU_MAIN_STACK: u64 = 64 << 10;
/// A secondary core's exception stack (SP_EL1).
pub const CPU_EXCEPTION_STACK: u64 = 16 << 10;

/// Cores whose stacks the boot map holds (all slots until the MMU is on).
static STACK_SLOTS: core::sync::atomic::AtomicUsize =
    core::sync::atomic::AtomicUsize::new(crate::percpu::MAX_CPUS);

/// Records how many cores' stacks the boot map holds (at MMU switch-on).
pub(crate) fn set_stack_slots(n: usize) {
    // Release: pairs with the Acquire load in `stack_slots`, so the core
    // that reads the count also sees the boot map it was recorded with.
    STACK_SLOTS.store(
        n.clamp(1, crate::percpu::MAX_CPUS),
        core::sync::atomic::Ordering::Release,
    );
}

/// Cores whose stacks are mapped: the secondary starter starts no core
/// with an index at or above it.
pub fn stack_slots() -> usize {
    // Acquire: pairs with the Release store in `set_stack_slots`.
    STACK_SLOTS.load(core::sync::atomic::Ordering::Acquire)
}

/// The stacks of core `index`: `(main, main guard, exception, exception
/// guard)`. Core 0 has the boot stacks above; cores 1 to
/// [`crate::percpu::MAX_CPUS`] - 1 have a slot each.
pub fn cpu_stacks(index: usize) -> Option<[Span; 4]> {
    if index == 0 {
        return Some([
            main_stack(),
            main_stack_guard(),
            exception_stack(),
            exception_stack_guard(),
        ]);
    }
    if index >= crate::percpu::MAX_CPUS {
        return None;
    }
    let base = addr!(__secondary_stacks) + (index as u64 - 1) * CPU_STACK_SLOT;
    let main = base + 4096;
    let exc = main + CPU_MAIN_STACK + 4096;
    Some([
        Span {
            start: main,
            end: main + CPU_MAIN_STACK,
        },
        Span {
            start: base,
            end: main,
        },
        Span {
            start: exc,
            end: exc + CPU_EXCEPTION_STACK,
        },
        Span {
            start: exc - 4096,
            end: exc,
        },
    ])
}
