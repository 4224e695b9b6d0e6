//! Per-core data, reached through `TPIDR_EL1` (Arm ARM DDI 0487, D24.2.205
//! "TPIDR_EL1, EL1 Software Thread ID Register"): each core's register holds
//! the address of its own [`PerCpu`] slot, set once when the core comes up
//! at EL1 (the firmware always runs at EL1, whatever the entry EL).

use aarch64_cpu::registers::*;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Cores the firmware can run (the boards have at most 4; `virt` takes
/// `-smp 8`).
pub const MAX_CPUS: usize = 8;

/// One core's data.
#[repr(C, align(64))]
pub struct PerCpu {
    /// Dense index: 0 is the boot core.
    index: AtomicU32,
    /// MPIDR_EL1 as the core read it.
    mpidr: AtomicU64,
    /// Free for per-core counters of the firmware's own services.
    pub counters: [AtomicU64; 4],
}

impl PerCpu {
    const fn new(index: u32) -> Self {
        Self {
            index: AtomicU32::new(index),
            mpidr: AtomicU64::new(0),
            counters: [const { AtomicU64::new(0) }; 4],
        }
    }

    /// The core's dense index.
    pub fn index(&self) -> u32 {
        self.index.load(Ordering::Relaxed)
    }

    /// The core's MPIDR_EL1.
    pub fn mpidr(&self) -> u64 {
        self.mpidr.load(Ordering::Relaxed)
    }
}

static CPUS: [PerCpu; MAX_CPUS] = {
    let mut a = [const { PerCpu::new(0) }; MAX_CPUS];
    let mut i = 0;
    while i < MAX_CPUS {
        a[i] = PerCpu::new(i as u32);
        i += 1;
    }
    a
};

/// Points this core's `TPIDR_EL1` at slot `index` (wrapped into range).
/// Called once per core on its way into Rust code at EL1.
pub fn install(index: usize) {
    let slot = &CPUS[index % MAX_CPUS];
    slot.mpidr.store(MPIDR_EL1.get(), Ordering::Relaxed);
    TPIDR_EL1.set(slot as *const PerCpu as u64);
}

/// This core's data. Before [`install`] ran (the first instructions of the
/// boot), the boot core's slot.
pub fn current() -> &'static PerCpu {
    let p = TPIDR_EL1.get() as usize;
    let base = CPUS.as_ptr() as usize;
    let i = p.wrapping_sub(base) / core::mem::size_of::<PerCpu>();
    // Only an address that is exactly one of our slots is trusted; any
    // other value (TPIDR_EL1 is UNKNOWN at reset) means "not installed".
    match CPUS.get(i) {
        Some(slot) if core::ptr::eq(slot, p as *const PerCpu) => slot,
        _ => &CPUS[0],
    }
}

/// This core's dense index.
pub fn index() -> usize {
    current().index() as usize
}

/// The slot of core `index`, for reports about other cores.
pub fn of(index: usize) -> Option<&'static PerCpu> {
    CPUS.get(index)
}

/// The calling core as the context of a lock or the shared allocator
/// (`memdesc::sync::CpuContext`): its dense index, and whether it runs an
/// exception handler, which is when it is on SP_EL1 (every core's main
/// thread runs on SP_EL0, its exceptions on SP_EL1).
#[derive(Clone, Copy, Debug, Default)]
pub struct ThisCpu;

impl memdesc::sync::CpuContext for ThisCpu {
    #[inline]
    fn cpu_id(&self) -> memdesc::sync::CpuId {
        memdesc::sync::CpuId(index() as u32)
    }
    #[inline]
    fn in_exception(&self) -> bool {
        SPSel.get() & 1 == 1
    }
}
