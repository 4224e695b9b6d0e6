//! Locks for firmware: a fair ticket spinlock that counts its contention and
//! refuses re-entry from the same CPU (an exception handler interrupting a
//! holder or waiter) with a typed error instead of deadlocking.
//!
//! - [`SpinLock`] ([`spinlock`]): FIFO ticket lock (each waiter spins on the
//!   "now serving" counter until its ticket comes up), with a guard;
//!   `const` in a `static` through [`SpinLock::new_const`] (the hal's
//!   globals are built on it); without a queue for host threads
//!   ([`LockAtomics::FIFO`]).
//! - [`CpuContext`] ([`cpu`]): who is asking, the current CPU's index and
//!   whether it runs an exception handler; the hal implements it on target
//!   (per-CPU data), host code with [`FixedCpu`] per thread.
//!
//! Why not `spin` or `lock_api`: `lock_api::RawMutex::lock` cannot fail, so a
//! re-entry can only deadlock or panic there; `spin::TicketMutex` keeps no
//! record of which CPU is inside and counts nothing. Both use
//! `core::sync::atomic` directly, while this lock is generic over
//! [`LockAtomics`] so the loom model (`tests/sync_loom.rs`) checks the code
//! that ships.

pub mod cpu;
pub mod spinlock;

pub use cpu::{CpuContext, CpuId, FixedCpu, MAX_CPUS};
pub use spinlock::{LockAtomics, LockError, LockStats, SpinGuard, SpinLock};
