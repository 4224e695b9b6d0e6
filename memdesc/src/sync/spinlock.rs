//! A fair (FIFO) ticket spinlock with contention counters and typed refusal
//! of same-CPU re-entry.
//!
//! `lock` takes a ticket (`next.fetch_add`) and spins until `serving` equals
//! it; unlock advances `serving`. Waiters are served in ticket order, so none
//! starves. Before taking a ticket the CPU sets its bit in `inside`, and
//! clears it after unlock: a CPU that finds its own bit already set is
//! re-entering (an exception handler that interrupted this CPU while it held
//! or waited for the lock), and a ticket taken then could never be served,
//! since the interrupted holder or waiter cannot run until the handler
//! returns. That case is [`LockError::Reentrant`] instead of a deadlock.
//! Exceptions on one CPU nest, so the single atomic `fetch_or` decides
//! exactly which of the two came first.

use super::cpu::{CpuContext, CpuId, MAX_CPUS};
use crate::frames::{AtomicCell, CoreAtomics};
use core::cell::UnsafeCell;
use core::fmt;
use core::marker::PhantomData;
use core::ops::{Deref, DerefMut};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// The atomic cells a lock is built from, and what a waiter does per spin.
///
/// [`CoreAtomics`] is what ships; the loom model supplies loom cells and a
/// `relax` that yields to loom's scheduler.
pub trait LockAtomics: Send + Sync + 'static {
    /// 32-bit cell (tickets).
    type U32: AtomicCell<u32>;
    /// 64-bit cell (the CPU bitmap, counters).
    type U64: AtomicCell<u64>;
    /// Called once per failed check of a wait loop.
    fn relax();
    /// How waiters wait. `true` (firmware CPUs, which nothing preempts): a
    /// FIFO ticket queue, so no waiter starves. `false` (host threads the
    /// OS can deschedule, more threads than cores): no queue; a waiter
    /// spins (calling [`LockAtomics::relax`]) until the lock is free and
    /// then takes it as [`SpinLock::try_lock`] does, so the lock is never
    /// handed to a waiter that is not running. The same fields, counters
    /// and re-entry check serve both.
    const FIFO: bool = true;
}

impl LockAtomics for CoreAtomics {
    type U32 = AtomicU32;
    type U64 = AtomicU64;
    #[inline(always)]
    fn relax() {
        core::hint::spin_loop()
    }
}

/// Why a lock was not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockError {
    /// This CPU already holds or waits for the lock: taking it would
    /// deadlock.
    Reentrant {
        /// The CPU.
        cpu: CpuId,
        /// Whether the second attempt came from an exception handler (the
        /// usual case); `false` is a plain recursive lock.
        in_exception: bool,
    },
    /// The CPU index is not below [`MAX_CPUS`].
    CpuOutOfRange {
        /// The index given.
        cpu: CpuId,
    },
    /// `try_lock` only: another CPU holds the lock or waits for it.
    WouldBlock,
}

impl fmt::Display for LockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Reentrant {
                cpu,
                in_exception: true,
            } => write!(
                f,
                "lock re-entered on CPU {} from an exception handler",
                cpu.0
            ),
            Self::Reentrant { cpu, .. } => {
                write!(f, "lock taken recursively on CPU {}", cpu.0)
            }
            Self::CpuOutOfRange { cpu } => {
                write!(f, "CPU index {} not below {MAX_CPUS}", cpu.0)
            }
            Self::WouldBlock => f.write_str("lock is held"),
        }
    }
}

/// Contention counters of one lock, for benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LockStats {
    /// Acquisitions (`lock` and successful `try_lock`).
    pub acquisitions: u64,
    /// Acquisitions that found the lock taken and had to wait.
    pub contended: u64,
    /// Failed checks of `serving`, summed over all waits.
    pub spins: u64,
}

/// A ticket spinlock over `T`.
pub struct SpinLock<T, A: LockAtomics = CoreAtomics> {
    /// Next ticket to hand out.
    next: A::U32,
    /// Ticket now allowed in.
    serving: A::U32,
    /// Bit `c` set: CPU `c` holds or waits for the lock.
    inside: A::U64,
    /// [`LockStats`] fields. Written only by the holder (plain load + store,
    /// no read-modify-write), read by anyone with `Relaxed`: figures, not
    /// synchronisation.
    acquisitions: A::U64,
    contended: A::U64,
    spins: A::U64,
    data: UnsafeCell<T>,
}

// SAFETY: the lock hands out `&mut T` to one holder at a time (the ticket
// protocol below), so sharing it across CPUs is sound when `T` may move
// between them.
unsafe impl<T: Send, A: LockAtomics> Sync for SpinLock<T, A> {}
// SAFETY: owning the lock is owning the `T`.
unsafe impl<T: Send, A: LockAtomics> Send for SpinLock<T, A> {}

impl<T> SpinLock<T, CoreAtomics> {
    /// An unlocked lock around `data`, in a const context (a `static`):
    /// the shipping atomics are `core`'s, whose constructors are `const`
    /// (a generic [`LockAtomics`] cell's are not). All its lock state
    /// starts at zero, so a static whose `data` is zero too lives in BSS.
    pub const fn new_const(data: T) -> Self {
        Self {
            next: AtomicU32::new(0),
            serving: AtomicU32::new(0),
            inside: AtomicU64::new(0),
            acquisitions: AtomicU64::new(0),
            contended: AtomicU64::new(0),
            spins: AtomicU64::new(0),
            data: UnsafeCell::new(data),
        }
    }
}

impl<T, A: LockAtomics> SpinLock<T, A> {
    /// An unlocked lock around `data`.
    pub fn new(data: T) -> Self {
        Self {
            next: A::U32::new(0),
            serving: A::U32::new(0),
            inside: A::U64::new(0),
            acquisitions: A::U64::new(0),
            contended: A::U64::new(0),
            spins: A::U64::new(0),
            data: UnsafeCell::new(data),
        }
    }

    /// Marks `cpu` inside; refuses a CPU that already is.
    fn enter<C: CpuContext + ?Sized>(&self, cpu: &C) -> Result<u64, LockError> {
        let id = cpu.cpu_id();
        if id.index() >= MAX_CPUS {
            return Err(LockError::CpuOutOfRange { cpu: id });
        }
        let bit = 1u64 << id.0;
        // Acquire: the ticket operations that follow stay after the bit is
        // set, as an exception handler on this CPU sees it. Pairs with the
        // Release of the `fetch_and` in `leave` (the previous exit of this
        // same CPU); other CPUs' bits are other bits of the same RMW chain.
        let before = self.inside.fetch_or(bit, Ordering::Acquire);
        if before & bit != 0 {
            return Err(LockError::Reentrant {
                cpu: id,
                in_exception: cpu.in_exception(),
            });
        }
        Ok(bit)
    }

    /// Clears `bit` from `inside`.
    fn leave(&self, bit: u64) {
        // Release: the `serving` store of the unlock (or the failed ticket
        // CAS of `try_lock`) is done before this CPU counts as outside.
        // Pairs with the Acquire `fetch_or` in `enter`.
        self.inside.fetch_and(!bit, Ordering::Release);
    }

    /// Counts one acquisition; called by the holder only.
    fn count(&self, spins: u64) {
        let bump = |c: &A::U64, by: u64| {
            c.store(
                c.load(Ordering::Relaxed).wrapping_add(by),
                Ordering::Relaxed,
            )
        };
        bump(&self.acquisitions, 1);
        if spins > 0 {
            bump(&self.contended, 1);
            bump(&self.spins, spins);
        }
    }

    /// Takes the lock, spinning in ticket order.
    ///
    /// # Errors
    ///
    /// [`LockError::Reentrant`] if `cpu` already holds or waits for this
    /// lock (the lock is left as it was); [`LockError::CpuOutOfRange`] for a
    /// CPU index not below [`MAX_CPUS`].
    pub fn lock<C: CpuContext + ?Sized>(&self, cpu: &C) -> Result<SpinGuard<'_, T, A>, LockError> {
        let bit = self.enter(cpu)?;
        if !A::FIFO {
            return Ok(self.lock_unqueued(bit));
        }
        // Relaxed: the ticket only orders waiters; the data is ordered by
        // `serving` below.
        let ticket = self.next.fetch_add(1, Ordering::Relaxed);
        let mut spins = 0u64;
        // Acquire: pairs with the Release store to `serving` in
        // `SpinGuard::drop`, so the previous holder's writes to the data are
        // visible.
        while self.serving.load(Ordering::Acquire) != ticket {
            spins += 1;
            A::relax();
        }
        self.count(spins);
        Ok(SpinGuard {
            lock: self,
            ticket,
            bit,
            _not_send: PhantomData,
        })
    }

    /// The wait of a lock without a queue ([`LockAtomics::FIFO`] false):
    /// until a free lock is taken with the ticket CAS of `try_lock`.
    fn lock_unqueued(&self, bit: u64) -> SpinGuard<'_, T, A> {
        let mut spins = 0u64;
        loop {
            // Acquire: pairs with the Release store to `serving` in
            // `SpinGuard::drop`, as in `try_lock`.
            let serving = self.serving.load(Ordering::Acquire);
            if self.next.load(Ordering::Relaxed) == serving
                && self
                    .next
                    .compare_exchange(
                        serving,
                        serving.wrapping_add(1),
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    )
                    .is_ok()
            {
                self.count(spins);
                return SpinGuard {
                    lock: self,
                    ticket: serving,
                    bit,
                    _not_send: PhantomData,
                };
            }
            spins += 1;
            A::relax();
        }
    }

    /// Takes the lock if nobody holds or waits for it.
    ///
    /// # Errors
    ///
    /// [`LockError::WouldBlock`] if another CPU holds or waits for it; the
    /// errors of [`lock`](Self::lock) otherwise.
    pub fn try_lock<C: CpuContext + ?Sized>(
        &self,
        cpu: &C,
    ) -> Result<SpinGuard<'_, T, A>, LockError> {
        let bit = self.enter(cpu)?;
        // Acquire: pairs with the Release store to `serving` in
        // `SpinGuard::drop`. If `next` still equals this value when the CAS
        // below succeeds, nobody took a ticket since, so the lock was free
        // and the previous holder's writes are visible.
        let serving = self.serving.load(Ordering::Acquire);
        match self.next.compare_exchange(
            serving,
            serving.wrapping_add(1),
            Ordering::Relaxed,
            Ordering::Relaxed,
        ) {
            Ok(_) => {
                self.count(0);
                Ok(SpinGuard {
                    lock: self,
                    ticket: serving,
                    bit,
                    _not_send: PhantomData,
                })
            }
            Err(_) => {
                self.leave(bit);
                Err(LockError::WouldBlock)
            }
        }
    }

    /// Runs `f` on the data under the lock.
    ///
    /// # Errors
    ///
    /// Those of [`lock`](Self::lock); `f` does not run then.
    pub fn with<C: CpuContext + ?Sized, R>(
        &self,
        cpu: &C,
        f: impl FnOnce(&mut T) -> R,
    ) -> Result<R, LockError> {
        let mut g = self.lock(cpu)?;
        Ok(f(&mut g))
    }

    /// Holders plus waiters right now (a snapshot, for tests and figures).
    pub fn queue_len(&self) -> u32 {
        let serving = self.serving.load(Ordering::Relaxed);
        self.next.load(Ordering::Relaxed).wrapping_sub(serving)
    }

    /// The contention counters so far (a snapshot).
    pub fn stats(&self) -> LockStats {
        LockStats {
            acquisitions: self.acquisitions.load(Ordering::Relaxed),
            contended: self.contended.load(Ordering::Relaxed),
            spins: self.spins.load(Ordering::Relaxed),
        }
    }

    /// The data, without locking: `&mut self` proves nobody else has it.
    pub fn get_mut(&mut self) -> &mut T {
        self.data.get_mut()
    }

    /// The data, consuming the lock.
    pub fn into_inner(self) -> T {
        self.data.into_inner()
    }
}

impl<T: Default, A: LockAtomics> Default for SpinLock<T, A> {
    fn default() -> Self {
        Self::new(T::default())
    }
}

impl<T, A: LockAtomics> fmt::Debug for SpinLock<T, A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpinLock")
            .field("queue_len", &self.queue_len())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// Holding a [`SpinLock`]; dropping it unlocks.
///
/// Not `Send`: the lock is released on the CPU that took it, which is the
/// one whose bit it clears.
#[must_use = "dropping the guard unlocks at once"]
pub struct SpinGuard<'a, T, A: LockAtomics = CoreAtomics> {
    lock: &'a SpinLock<T, A>,
    ticket: u32,
    bit: u64,
    _not_send: PhantomData<*const ()>,
}

// SAFETY: a shared guard only gives `&T`.
unsafe impl<T: Sync, A: LockAtomics> Sync for SpinGuard<'_, T, A> {}

impl<T, A: LockAtomics> Deref for SpinGuard<'_, T, A> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard is the one holder (its ticket is being served),
        // and `&self` only lends shared access.
        unsafe { &*self.lock.data.get() }
    }
}

impl<T, A: LockAtomics> DerefMut for SpinGuard<'_, T, A> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard is the one holder, and `&mut self` makes this the
        // only borrow through it.
        unsafe { &mut *self.lock.data.get() }
    }
}

impl<T, A: LockAtomics> Drop for SpinGuard<'_, T, A> {
    fn drop(&mut self) {
        // Release: the holder's writes to the data are visible to the next
        // holder. Pairs with the Acquire load of `serving` in `lock` and
        // `try_lock`.
        self.lock
            .serving
            .store(self.ticket.wrapping_add(1), Ordering::Release);
        // Only after the unlock: in between, a handler on this CPU is still
        // refused, never queued behind a lock nobody will release.
        self.lock.leave(self.bit);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // In tests a panic is the failure report.
mod tests {
    use super::super::FixedCpu;
    use super::*;

    const CPU0: FixedCpu = FixedCpu::new(0);
    const CPU1: FixedCpu = FixedCpu::new(1);

    #[test]
    fn lock_gives_the_data_and_unlocks_on_drop() {
        let l: SpinLock<u32> = SpinLock::new(1);
        *l.lock(&CPU0).unwrap() += 1;
        assert_eq!(l.queue_len(), 0);
        assert_eq!(*l.try_lock(&CPU1).unwrap(), 2);
        assert_eq!(l.with(&CPU0, |v| *v * 10), Ok(20));
        assert_eq!(
            l.stats(),
            LockStats {
                acquisitions: 3,
                contended: 0,
                spins: 0
            }
        );
        assert_eq!(l.into_inner(), 2);
    }

    #[test]
    fn same_cpu_is_refused_other_cpu_would_block() {
        let l: SpinLock<u32> = SpinLock::new(0);
        let g = l.lock(&CPU0).unwrap();
        assert_eq!(l.queue_len(), 1);
        let handler = CPU0.in_exception();
        assert_eq!(
            l.lock(&handler).err(),
            Some(LockError::Reentrant {
                cpu: CpuId(0),
                in_exception: true
            })
        );
        assert_eq!(
            l.try_lock(&CPU0).err(),
            Some(LockError::Reentrant {
                cpu: CpuId(0),
                in_exception: false
            })
        );
        assert_eq!(l.try_lock(&CPU1).err(), Some(LockError::WouldBlock));
        // The refusals took no ticket and left CPU 0 inside.
        assert_eq!(l.queue_len(), 1);
        drop(g);
        // CPU 1's failed try_lock cleared its bit; CPU 0's unlock its own.
        drop(l.lock(&CPU1).unwrap());
        drop(l.lock(&CPU0).unwrap());
        assert_eq!(l.stats().acquisitions, 3);
    }

    #[test]
    fn cpu_index_out_of_range_is_an_error() {
        let l: SpinLock<()> = SpinLock::new(());
        let far = FixedCpu::new(MAX_CPUS as u32);
        assert_eq!(
            l.lock(&far).err(),
            Some(LockError::CpuOutOfRange {
                cpu: CpuId(MAX_CPUS as u32)
            })
        );
        assert!(l.lock(&FixedCpu::new(MAX_CPUS as u32 - 1)).is_ok());
    }

    #[test]
    fn a_waiter_is_counted_as_contended() {
        let l: SpinLock<u32> = SpinLock::new(0);
        std::thread::scope(|s| {
            let g = l.lock(&CPU0).unwrap();
            let waiter = s.spawn(|| *l.lock(&CPU1).unwrap() += 1);
            while l.queue_len() < 2 {
                std::thread::yield_now();
            }
            // The waiter holds ticket 1; give it time to fail a check.
            std::thread::sleep(std::time::Duration::from_millis(5));
            drop(g);
            waiter.join().unwrap();
        });
        let st = l.stats();
        assert_eq!((st.acquisitions, st.contended), (2, 1));
        assert!(st.spins >= 1);
        assert_eq!(l.into_inner(), 1);
    }
}
