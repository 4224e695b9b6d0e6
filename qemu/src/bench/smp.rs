//! `cargo qemu bench smp`: the shared frame allocator
//! (`memdesc::frames::SmpFrameAllocator`) on 1, 2, 4 and 8 host threads,
//! against `buddy_system_allocator::LockedFrameAllocator` (one spin mutex
//! around the buddy) in the same run.
//!
//! Records:
//! - `smp_{order0,mixed}_t{N}`: millions of allocator calls (an allocation
//!   or a free) per second summed over `N` threads, each thread running the
//!   same workload as `cargo qemu bench memdesc` on its own CPU id; `ratio`
//!   = ours / peer (higher is better for us). The machine has 2 cores, so 4
//!   and 8 threads are oversubscribed.
//! - `smp_{order0,mixed}_t{N}_cpu`: the same calls over the busiest
//!   thread's CPU time, the throughput had each thread a core of its own
//!   (the wall figures share this 2-core machine with whatever else runs).
//! - `smp_{order0,mixed}_scaling_1to2[_cpu]`: throughput at 2 threads over
//!   throughput at 1 thread, ours against the peer's.
//!
//! Each figure is the best of several repetitions, a repetition timed from
//! the moment all threads are released until the last one finishes.

use super::memdesc::{
    mixed_steps, order0_steps, run_steps, HostDescMemory, Step, BASE_PFN, FRAMES,
};
use super::Record;
use buddy_system_allocator::LockedFrameAllocator;
use memdesc::frames::{
    words_needed, Atomics, FolioRef, FrameAllocator, FrameType, Owner, PageArray, PfnRange,
    SmpFrameAllocator,
};
use memdesc::sync::{FixedCpu, LockAtomics};
use memdesc::Pfn;
use std::hint::black_box;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

const BENCH: &str = "smp";
const PEER: &str = "buddy_system_allocator::LockedFrameAllocator";
const THREADS: [usize; 4] = [1, 2, 4, 8];
const REPS: usize = 3;

/// `core::sync::atomic`, as on target, except that a waiting thread yields
/// to the OS scheduler every 128 spins: unlike a firmware CPU, a host thread holding the lock
/// can be preempted, and a ticket lock hands over in FIFO order, so pure
/// spinning behind a descheduled holder or next-in-line costs whole time
/// slices (the machine runs other jobs too). The peer's `spin::Mutex` spins.
struct HostAtomics;
impl Atomics for HostAtomics {
    type U32 = AtomicU32;
    type U64 = AtomicU64;
    fn fence(order: Ordering) {
        std::sync::atomic::fence(order)
    }
}
impl LockAtomics for HostAtomics {
    type U32 = AtomicU32;
    type U64 = AtomicU64;
    fn relax() {
        thread_local!(static SPINS: std::cell::Cell<u32> = const { std::cell::Cell::new(0) });
        // Spin a little (the holder is usually running), then yield.
        let n = SPINS.with(|c| {
            let n = c.get().wrapping_add(1);
            c.set(n);
            n
        });
        if n.is_multiple_of(128) {
            std::thread::yield_now()
        } else {
            std::hint::spin_loop()
        }
    }
    /// No waiter queue: with more threads than cores, a FIFO ticket lock
    /// hands over to a waiter the OS has descheduled, and every thread
    /// behind it waits a time slice (mixed at 4 threads: 38 -> 2 Mops/s).
    const FIFO: bool = false;
}

type Ours = SmpFrameAllocator<'static, HostDescMemory, HostAtomics, 8>;
type Peer = LockedFrameAllocator<19>;

/// Our allocator over the same 1 GiB as `cargo qemu bench memdesc`, its
/// page array starting on a 128-byte boundary as the firmware's does
/// (carved page-aligned out of RAM). A heap `Vec` of 2 MiB starts 16 bytes
/// past a page boundary, so the 64-frame batches two CPUs refill from the
/// buddy shared a cache line at every batch edge, which the firmware never
/// sees: with both threads running at once, 15.2 ns of CPU time per
/// order-0 call against 12.2 aligned (12.1 on two separate allocators).
fn new_ours() -> Ours {
    let ranges = [PfnRange::new(Pfn(BASE_PFN), Pfn(BASE_PFN + FRAMES))];
    let n = words_needed(&ranges).expect("1 GiB fits a page array") as usize;
    const LINE_WORDS: usize = 128 / std::mem::size_of::<u64>();
    let storage: &'static mut [AtomicU64] =
        Box::leak((0..n + LINE_WORDS).map(|_| AtomicU64::new(0)).collect());
    let skip = storage.as_ptr().align_offset(128);
    let storage = &mut storage[skip..skip + n];
    let pa: &'static PageArray<'static, HostAtomics> =
        Box::leak(Box::new(PageArray::new(storage, &ranges).expect("layout")));
    SmpFrameAllocator::new(FrameAllocator::new(pa, HostDescMemory, &[]).expect("fresh array"))
}

fn run_ours(
    fa: &Ours,
    cpu: &FixedCpu,
    steps: &[Step],
    live: &mut Vec<FolioRef<HostAtomics>>,
) -> u64 {
    run_steps(
        &mut (fa, cpu),
        steps,
        live,
        |(fa, cpu), o| {
            let f = fa.alloc_folio(cpu, o, Owner::Buddy).ok()?;
            let pfn = f.pfn().0;
            Some((f, pfn))
        },
        |(fa, cpu), f| fa.put(cpu, f).is_ok(),
    )
}

fn run_peer(p: &Peer, steps: &[Step], live: &mut Vec<(usize, usize)>) -> u64 {
    run_steps(
        &mut &*p,
        steps,
        live,
        |p, o| {
            let f = p.lock().alloc(1 << o)?;
            Some(((f, 1 << o), f as u64))
        },
        |p, (f, n)| {
            p.lock().dealloc(f, n);
            true
        },
    )
}

/// This thread's CPU time.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a
    // constant Linux knows.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// What one timed run of `threads` threads took.
struct Span {
    /// From the first thread's start to the last one's end.
    wall: Duration,
    /// The largest CPU time one thread used.
    cpu: Duration,
}

/// The CPUs this process may run on, in order (empty if unknown).
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: `cpu_set_t` is plain data, valid all zeroes.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable cpu_set_t of the size passed; pid 0
    // is this thread.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `set` is initialised and `c` is below CPU_SETSIZE.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect()
}

/// Pins this thread to `cpu` (best effort: an error leaves it unpinned).
fn pin_to(cpu: usize) {
    // SAFETY: `cpu_set_t` is plain data, valid all zeroes.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is initialised and `cpu` comes from `allowed_cpus`,
    // below CPU_SETSIZE; pid 0 is this thread.
    unsafe {
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Runs `work(thread)` once on each of `threads` threads from a common
/// start, thread `t` pinned to the `t % n`-th of the process's `n` allowed
/// CPUs. Without the pinning, Linux often woke both threads of a 2-thread
/// run from the barrier on one core (a run of 3-12 ms ends before the load
/// balancer moves one), so they took turns instead of racing: half the
/// "2-thread" runs measured no concurrency at all, and best-of-3 picked
/// whichever was fastest (serial for the peer's one lock, concurrent or
/// serial for ours). Each thread reads the clocks itself, so a preempted
/// coordinator cannot shorten the wall time.
fn timed(threads: usize, work: impl Fn(usize) -> u64 + Sync) -> Span {
    let cpus = allowed_cpus();
    let start = Barrier::new(threads);
    let spans: Vec<(Instant, Instant, Duration)> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (start, work, cpus) = (&start, &work, &cpus);
                sc.spawn(move || {
                    if !cpus.is_empty() {
                        pin_to(cpus[t % cpus.len()]);
                    }
                    start.wait();
                    let (t0, c0) = (Instant::now(), thread_cpu_time());
                    black_box(work(t));
                    (t0, Instant::now(), thread_cpu_time() - c0)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("benchmark thread panicked"))
            .collect()
    });
    let first = spans.iter().map(|s| s.0).min();
    let last = spans.iter().map(|s| s.1).max();
    Span {
        wall: match (first, last) {
            (Some(a), Some(b)) => b - a,
            _ => Duration::ZERO,
        },
        cpu: spans.iter().map(|s| s.2).max().unwrap_or_default(),
    }
}

/// Throughputs (M calls/s) of one configuration, ours then the peer's.
struct Figures {
    /// All calls over the wall time.
    wall: [f64; 2],
    /// All calls over the busiest thread's CPU time: the throughput had every
    /// thread a core of its own (this machine runs other jobs; the wall
    /// figures share 2 cores with them).
    cpu: [f64; 2],
}

/// Best-of-`REPS` throughputs of ours and the peer, interleaved.
fn measure(ours: &Ours, peer: &Peer, steps: &[Step], threads: usize) -> Figures {
    let calls = (steps.len() * threads) as f64;
    let mut wall = [Duration::MAX; 2];
    let mut cpu = [Duration::MAX; 2];
    // One untimed warm-up round each, then the timed repetitions.
    for rep in 0..=REPS {
        let a = timed(threads, |t| {
            let mut live = Vec::with_capacity(steps.len());
            run_ours(ours, &FixedCpu::new(t as u32), steps, &mut live)
        });
        let b = timed(threads, |_| {
            let mut live = Vec::with_capacity(steps.len());
            run_peer(peer, steps, &mut live)
        });
        if rep > 0 {
            for (i, s) in [a, b].iter().enumerate() {
                wall[i] = wall[i].min(s.wall);
                cpu[i] = cpu[i].min(s.cpu);
            }
        }
    }
    let mops = |d: Duration| calls / d.as_secs_f64() / 1e6;
    Figures {
        wall: [mops(wall[0]), mops(wall[1])],
        cpu: [mops(cpu[0]), mops(cpu[1])],
    }
}

pub fn run() -> Vec<Record> {
    let ours = new_ours();
    let peer = Peer::new();
    peer.lock()
        .add_frame(BASE_PFN as usize, (BASE_PFN + FRAMES) as usize);
    let mut out = Vec::new();
    let workloads = [
        ("order0", order0_steps(64, 2048), "per thread: 2048 bursts of 64 order-0 allocations then frees in random order (a burst fits the per-CPU cache)"),
        ("mixed", mixed_steps(200_000, 1024), "per thread: 200000-step random walk around 1024 live allocations of orders 0..9 (65% order 0), then all freed"),
    ];
    for (name, steps, what) in workloads {
        let mut at = Vec::new();
        for threads in THREADS {
            let lock_before = ours.buddy_lock_stats();
            let f = measure(&ours, &peer, &steps, threads);
            let lock = ours.buddy_lock_stats();
            let acq = lock.acquisitions - lock_before.acquisitions;
            let contended = lock.contended - lock_before.contended;
            eprintln!(
                "smp {name} {threads} threads: wall {:.2} vs {:.2}, cpu {:.2} vs {:.2} Mops/s",
                f.wall[0], f.wall[1], f.cpu[0], f.cpu[1]
            );
            let note = format!(
                "{threads} threads (2 cores), alloc_folio + put, each thread its own CPU id; {what}; {} calls per thread; 1 GiB; best of {REPS}; buddy lock: {acq} acquisitions, {contended} contended ({:.1} %)",
                steps.len(),
                100.0 * contended as f64 / acq.max(1) as f64,
            );
            out.push(
                Record::new(BENCH, format!("smp_{name}_t{threads}"), f.wall[0], "Mops/s")
                    .with_peer(PEER, f.wall[1], false)
                    .with_note(format!("all calls / wall time; {note}")),
            );
            out.push(
                Record::new(BENCH, format!("smp_{name}_t{threads}_cpu"), f.cpu[0], "Mops/s")
                    .with_peer(PEER, f.cpu[1], false)
                    .with_note(format!(
                        "all calls / the busiest thread's CPU time (as if each thread had a core); {note}"
                    )),
            );
            at.push(f);
        }
        if let [one, two, ..] = &at[..] {
            out.push(
                Record::new(
                    BENCH,
                    format!("smp_{name}_scaling_1to2"),
                    two.wall[0] / one.wall[0],
                    "x",
                )
                .with_peer(PEER, two.wall[1] / one.wall[1], false)
                .with_note("wall-time throughput at 2 threads / at 1 thread"),
            );
            out.push(
                Record::new(
                    BENCH,
                    format!("smp_{name}_scaling_1to2_cpu"),
                    two.cpu[0] / one.cpu[0],
                    "x",
                )
                .with_peer(PEER, two.cpu[1] / one.cpu[1], false)
                .with_note("CPU-time throughput at 2 threads / at 1 thread"),
            );
        }
    }
    // Every thread freed all it took: back to all free, caches included.
    let fa = ours.into_inner();
    debug_assert_eq!(fa.count(FrameType::Free), FRAMES);
    out
}
