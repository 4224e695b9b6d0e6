//! Loom model of the ticket spinlock (`memdesc::sync::SpinLock`), on the
//! shipping code instantiated with loom atomics.
//!
//! - two CPUs lock and write the data: mutual exclusion (the data is a loom
//!   `UnsafeCell`, so an access not ordered by the lock is a reported race),
//!   the holder's writes visible to the next holder, the contention counters
//!   exact;
//! - `try_lock` racing `lock`;
//! - a holder's own CPU re-entering (as an exception handler would) is
//!   refused while another CPU waits, and the waiter still gets the lock;
//! - the same two properties for the lock without a waiter queue
//!   (`LockAtomics::FIFO` false, the host threads' policy).
//!
//! Every model is explored exhaustively (no preemption bound).
#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use loom::cell::UnsafeCell;
use loom::sync::Arc;
use memdesc::sync::{CpuId, FixedCpu, LockError, SpinLock};

mod common;
use common::loom_atomics::{LoomAtomics, LoomUnqueued};
use common::seen::Seen;

/// The protected data: a loom cell, so unsynchronised access is a race.
struct Data(UnsafeCell<u32>);
impl Data {
    fn add(&self, v: u32) -> u32 {
        // SAFETY: loom reports any access racing this one.
        self.0.with_mut(|p| unsafe {
            *p += v;
            *p
        })
    }
}

type Lock = SpinLock<Data, LoomAtomics>;

fn new_lock() -> Arc<Lock> {
    Arc::new(SpinLock::new(Data(UnsafeCell::new(0))))
}

static TWO_LOCKERS: Seen<2> = Seen::new();

#[test]
fn two_cpus_exclude_each_other_and_are_counted() {
    loom::model(|| {
        let l = new_lock();
        let l2 = l.clone();
        let t = loom::thread::spawn(move || l2.lock(&FixedCpu::new(1)).unwrap().add(1));
        let mine = l.lock(&FixedCpu::new(0)).unwrap().add(10);
        let theirs = t.join().unwrap();
        // Whoever came second saw the first one's write.
        assert!(
            (mine, theirs) == (10, 11) || (mine, theirs) == (11, 1),
            "{mine} {theirs}"
        );
        let st = l.stats();
        assert_eq!(st.acquisitions, 2);
        assert!(st.contended <= 1);
        assert_eq!(st.contended == 0, st.spins == 0);
        TWO_LOCKERS.hit(st.contended as usize);
        assert_eq!(l.queue_len(), 0);
    });
    TWO_LOCKERS.assert_all("uncontended, contended");
}

static TRY_LOCK: Seen<2> = Seen::new();

#[test]
fn try_lock_races_lock() {
    loom::model(|| {
        let l = new_lock();
        let l2 = l.clone();
        let t = loom::thread::spawn(move || l2.lock(&FixedCpu::new(1)).unwrap().add(1));
        match l.try_lock(&FixedCpu::new(0)) {
            Ok(g) => {
                TRY_LOCK.hit(0);
                g.add(10);
            }
            Err(e) => {
                assert_eq!(e, LockError::WouldBlock);
                TRY_LOCK.hit(1);
            }
        }
        t.join().unwrap();
        // Both CPUs are outside again: each can take it.
        drop(l.lock(&FixedCpu::new(0)).unwrap());
        drop(l.lock(&FixedCpu::new(1)).unwrap());
    });
    TRY_LOCK.assert_all("got it, would block");
}

#[test]
fn same_cpu_reentry_is_refused_while_another_waits() {
    loom::model(|| {
        let l = new_lock();
        let l2 = l.clone();
        let t = loom::thread::spawn(move || l2.lock(&FixedCpu::new(1)).unwrap().add(1));
        {
            let g = l.lock(&FixedCpu::new(0)).unwrap();
            // An exception handler on CPU 0 while CPU 0 holds the lock.
            let handler = FixedCpu::new(0).in_exception();
            assert_eq!(
                l.lock(&handler).err(),
                Some(LockError::Reentrant {
                    cpu: CpuId(0),
                    in_exception: true
                })
            );
            g.add(10);
        }
        t.join().unwrap();
        assert_eq!(l.lock(&FixedCpu::new(0)).unwrap().add(0), 11);
    });
}

type Unqueued = SpinLock<Data, LoomUnqueued>;

static UNQUEUED: Seen<2> = Seen::new();

#[test]
fn unqueued_lock_excludes_counts_and_refuses_reentry() {
    loom::model(|| {
        let l = Arc::new(Unqueued::new(Data(UnsafeCell::new(0))));
        let l2 = l.clone();
        let t = loom::thread::spawn(move || l2.lock(&FixedCpu::new(1)).unwrap().add(1));
        let mine = {
            let g = l.lock(&FixedCpu::new(0)).unwrap();
            assert_eq!(
                l.lock(&FixedCpu::new(0).in_exception()).err(),
                Some(LockError::Reentrant {
                    cpu: CpuId(0),
                    in_exception: true
                })
            );
            g.add(10)
        };
        let theirs = t.join().unwrap();
        assert!(
            (mine, theirs) == (10, 11) || (mine, theirs) == (11, 1),
            "{mine} {theirs}"
        );
        let st = l.stats();
        assert_eq!(st.acquisitions, 2);
        assert_eq!(st.contended == 0, st.spins == 0);
        UNQUEUED.hit(st.contended.min(1) as usize);
        assert_eq!(l.queue_len(), 0);
    });
    UNQUEUED.assert_all("uncontended, contended");
}
