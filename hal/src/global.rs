//! Globals shared by every core: a value set once, then used under a fair
//! ticket spinlock that refuses re-entry from the same core (an exception
//! handler interrupting a holder or a waiter) with [`GlobalError::Busy`]
//! instead of deadlocking, and counts contention.
//!
//! Ordering: taking a ticket is a relaxed `fetch_add`; the wait loads
//! `serving` with Acquire, pairing with the Release increment of `serving`
//! at unlock, so everything the previous holder wrote is visible to the
//! next. The per-core `inside` bit is set before the ticket is taken and
//! cleared after unlock; only its own core ever changes a bit, so a core
//! that finds its bit set is re-entering (exceptions on one core nest).

use core::cell::UnsafeCell;
use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

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

/// A global initialised once, then used by one core at a time through
/// [`Global::with`] / [`Global::try_with`].
///
/// Its empty state is all zero bytes, so it lives in BSS: a firmware entered
/// a second time without being reloaded starts with every global empty.
pub struct Global<T> {
    next: AtomicU32,
    serving: AtomicU32,
    /// One bit per core that holds or waits for the lock.
    inside: AtomicU64,
    /// Acquisitions that had to wait.
    contended: AtomicU64,
    present: AtomicBool,
    value: UnsafeCell<MaybeUninit<T>>,
}

// SAFETY: `value` is only reached between a ticket being served and the
// Release that serves the next one, so at most one core (and on it, one
// context: re-entry is refused) holds the `&mut T` at a time; T: Send
// because the value moves between cores that way.
unsafe impl<T: Send> Sync for Global<T> {}

/// Releases the lock when dropped.
struct Held<'a, T> {
    global: &'a Global<T>,
    bit: u64,
}

impl<T> Drop for Held<'_, T> {
    fn drop(&mut self) {
        // Pairs with the Acquire load of `serving` in `lock`.
        self.global.serving.fetch_add(1, Ordering::Release);
        self.global.inside.fetch_and(!self.bit, Ordering::Relaxed);
    }
}

impl<T> Global<T> {
    /// An empty global.
    pub const fn new() -> Self {
        Self {
            next: AtomicU32::new(0),
            serving: AtomicU32::new(0),
            inside: AtomicU64::new(0),
            contended: AtomicU64::new(0),
            present: AtomicBool::new(false),
            value: UnsafeCell::new(MaybeUninit::uninit()),
        }
    }

    fn lock(&self) -> Result<Held<'_, T>, GlobalError> {
        let bit = 1u64 << (crate::percpu::index() % 64);
        if self.inside.fetch_or(bit, Ordering::Relaxed) & bit != 0 {
            return Err(GlobalError::Busy);
        }
        let ticket = self.next.fetch_add(1, Ordering::Relaxed);
        if self.serving.load(Ordering::Acquire) != ticket {
            self.contended.fetch_add(1, Ordering::Relaxed);
            while self.serving.load(Ordering::Acquire) != ticket {
                core::hint::spin_loop();
            }
        }
        Ok(Held { global: self, bit })
    }

    /// Stores the value; fails if one is there already.
    pub fn set(&self, v: T) -> Result<(), GlobalError> {
        let _held = self.lock()?;
        if self.present.load(Ordering::Relaxed) {
            return Err(GlobalError::AlreadyInitialised);
        }
        // SAFETY: we hold the lock, so no other reference into `value`
        // exists; it is empty (`present` is false), so nothing is leaked.
        unsafe { (*self.value.get()).write(v) };
        self.present.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Runs `f` with exclusive access to the value.
    pub fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> Result<R, GlobalError> {
        let _held = self.lock()?;
        if !self.present.load(Ordering::Relaxed) {
            return Err(GlobalError::NotInitialised);
        }
        // SAFETY: we hold the lock (no other reference into `value` exists
        // until `_held` drops after `f` returns), and `present` is set only
        // after `value` was written.
        Ok(f(unsafe { (*self.value.get()).assume_init_mut() }))
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
        self.contended.load(Ordering::Relaxed)
    }
}

impl<T> Default for Global<T> {
    fn default() -> Self {
        Self::new()
    }
}
