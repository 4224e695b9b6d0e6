//! Globals shared by every core: a value set once, then used under
//! [`memdesc::sync::SpinLock`] (the one ticket lock of the project: fair,
//! counts contention, refuses re-entry from the same core, an exception
//! handler interrupting a holder or a waiter, with a typed error instead
//! of deadlocking), taken as [`crate::percpu::ThisCpu`].

use crate::percpu::ThisCpu;
use core::mem::MaybeUninit;
use memdesc::sync::{LockError, SpinLock};

/// Why a global could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, defmt::Format)]
pub enum GlobalError {
    /// Used before it was set.
    NotInitialised,
    /// Set twice.
    AlreadyInitialised,
    /// This core already holds the lock or waits for it (re-entry from an
    /// exception handler, or a nested use): taking it would deadlock.
    Busy,
}

/// A failed [`Global::try_with`]: the global could not be used, or the
/// operation inside it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WithError<E> {
    /// The global was not set, or was re-entered.
    Global(GlobalError),
    /// The operation's own error.
    Op(E),
}

impl<E> From<GlobalError> for WithError<E> {
    fn from(e: GlobalError) -> Self {
        Self::Global(e)
    }
}

/// The value and whether it was set.
struct Slot<T> {
    present: bool,
    value: MaybeUninit<T>,
}

/// A global initialised once, then used by one core at a time through
/// [`Global::with`] / [`Global::try_with`].
///
/// Its empty state is all zero bytes (the lock's counters, `present`
/// false, the value uninitialised), so it lives in BSS: a firmware entered
/// a second time without being reloaded starts with every global empty.
pub struct Global<T> {
    lock: SpinLock<Slot<T>>,
}

fn busy(_: LockError) -> GlobalError {
    // Re-entry on this core (or a core index the lock cannot tell apart,
    // which `percpu` never hands out).
    GlobalError::Busy
}

impl<T> Global<T> {
    /// An empty global.
    pub const fn new() -> Self {
        Self {
            lock: SpinLock::new_const(Slot {
                present: false,
                value: MaybeUninit::uninit(),
            }),
        }
    }

    /// Stores the value; fails if one is there already.
    pub fn set(&self, v: T) -> Result<(), GlobalError> {
        let mut slot = self.lock.lock(&ThisCpu).map_err(busy)?;
        if slot.present {
            return Err(GlobalError::AlreadyInitialised);
        }
        slot.value.write(v);
        slot.present = true;
        Ok(())
    }

    /// Runs `f` with exclusive access to the value.
    pub fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> Result<R, GlobalError> {
        let mut slot = self.lock.lock(&ThisCpu).map_err(busy)?;
        if !slot.present {
            return Err(GlobalError::NotInitialised);
        }
        // SAFETY: `present` is set only after `value` was written, and the
        // value is never taken out again.
        Ok(f(unsafe { slot.value.assume_init_mut() }))
    }

    /// [`Global::with`] for an operation that can fail: one `Result`.
    pub fn try_with<R, E>(
        &self,
        f: impl FnOnce(&mut T) -> Result<R, E>,
    ) -> Result<R, WithError<E>> {
        self.with(f)?.map_err(WithError::Op)
    }

    /// How many acquisitions had to wait for another core.
    pub fn contended(&self) -> u64 {
        self.lock.stats().contended
    }
}

impl<T> Default for Global<T> {
    fn default() -> Self {
        Self::new()
    }
}
