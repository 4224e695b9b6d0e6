//! Who is taking a lock: the current CPU and whether it is in an exception
//! handler.

/// How many CPUs a lock can tell apart (one bit each in a 64-bit word).
pub const MAX_CPUS: usize = 64;

/// A CPU's index, `0..MAX_CPUS` (dense: the boot CPU is 0, not an MPIDR).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CpuId(pub u32);

impl CpuId {
    /// The index as a `usize`, for per-CPU arrays.
    pub const fn index(self) -> usize {
        self.0 as usize
    }
}

/// The execution context asking for a lock.
///
/// On target the hal implements it from the per-CPU data (`TPIDR_EL1`) and
/// its exception entry; on the host each thread uses its own [`FixedCpu`].
/// Two threads of execution that may run at the same time must never report
/// the same [`CpuId`] unless one can only run while the other is suspended
/// (an exception handler on the CPU it interrupted): that is exactly the
/// re-entry the locks refuse.
pub trait CpuContext {
    /// The current CPU.
    fn cpu_id(&self) -> CpuId;
    /// True in an exception (interrupt, abort) handler.
    fn in_exception(&self) -> bool;
}

/// A fixed context: the caller says which CPU it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FixedCpu {
    /// The CPU.
    pub id: CpuId,
    /// Whether this context stands for an exception handler.
    pub in_exception: bool,
}

impl FixedCpu {
    /// Thread (non-exception) context on CPU `id`.
    pub const fn new(id: u32) -> Self {
        Self {
            id: CpuId(id),
            in_exception: false,
        }
    }

    /// The same CPU, in an exception handler.
    pub const fn in_exception(self) -> Self {
        Self {
            id: self.id,
            in_exception: true,
        }
    }
}

impl CpuContext for FixedCpu {
    fn cpu_id(&self) -> CpuId {
        self.id
    }
    fn in_exception(&self) -> bool {
        self.in_exception
    }
}

impl<C: CpuContext + ?Sized> CpuContext for &C {
    fn cpu_id(&self) -> CpuId {
        (**self).cpu_id()
    }
    fn in_exception(&self) -> bool {
        (**self).in_exception()
    }
}
