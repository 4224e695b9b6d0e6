//! `cargo qemu bench memdesc`: the memdesc page array and frame allocator on
//! the host, against `buddy_system_allocator::FrameAllocator` in the same run.
//!
//! Records:
//! - `bytes_per_frame`: the page-array word (8 bytes, pinned by a compile-time
//!   assert in `memdesc`).
//! - `metadata_bytes_per_frame_mixed`: word plus descriptor cost per allocated
//!   frame for a realistic mix of orders (one 16-byte descriptor per folio).
//! - `alloc_free_order0_{folio,frozen}` and `alloc_free_mixed_{folio,frozen}`:
//!   ns per allocator call (an allocation or a free), against the peer with
//!   `ratio = peer_ns / our_ns` (higher is better for us).
//!
//! Both allocators get 1 GiB at PFN 0x40000 and run the same pre-generated
//! sequence of allocations and frees (allocation orders and which live
//! allocation to free come from a fixed-seed xorshift generator). Our folio
//! path also writes the descriptor and every frame's word; the frozen path is
//! the closest to what the peer does (frames only). Results are folded into a
//! checksum passed to `black_box` so nothing is optimised away; each figure is
//! the best of several repetitions.

use super::Record;
use buddy_system_allocator::FrameAllocator as PeerAllocator;
use memdesc::frames::{
    words_needed, AtomicCell, Atomics, DescChunk, DescMemory, FolioRef, FrameAllocator, FrameType,
    FrozenKind, Owner, PageArray, PfnRange,
};
use memdesc::Pfn;
use std::hint::black_box;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

const BENCH: &str = "memdesc";
const PEER: &str = "buddy_system_allocator::FrameAllocator";
pub(super) const BASE_PFN: u64 = 0x40000;
pub(super) const FRAMES: u64 = 1 << 18;
const REPS: usize = 21;

/// Descriptor memory for the host: leaked, page-aligned chunks.
pub(super) struct HostDescMemory;

// SAFETY: every chunk is a fresh leaked box of one page-aligned `DescChunk`,
// never freed or used by anything else.
unsafe impl DescMemory for HostDescMemory {
    fn chunk(&mut self) -> Option<NonNull<u8>> {
        Some(NonNull::from(Box::leak(Box::new(DescChunk::ZERO))).cast())
    }
}

pub(super) type Ours = FrameAllocator<'static, HostDescMemory>;

/// A fresh allocator over 1 GiB at [`BASE_PFN`] on atomics `A`, its page
/// array and descriptors leaked.
pub(super) fn new_allocator<A: Atomics>() -> FrameAllocator<'static, HostDescMemory, A> {
    let ranges = [PfnRange::new(Pfn(BASE_PFN), Pfn(BASE_PFN + FRAMES))];
    let n = words_needed(&ranges).expect("1 GiB fits a page array") as usize;
    let storage: &'static mut [A::U64] = Box::leak(
        (0..n)
            .map(|_| <A::U64 as AtomicCell<u64>>::new(0))
            .collect(),
    );
    let pa: &'static PageArray<'static, A> =
        Box::leak(Box::new(PageArray::new(storage, &ranges).expect("layout")));
    FrameAllocator::new(pa, HostDescMemory, &[]).expect("fresh array")
}

pub(super) fn new_ours() -> Ours {
    new_allocator()
}

fn new_peer() -> PeerAllocator<19> {
    let mut p = PeerAllocator::<19>::new();
    p.add_frame(BASE_PFN as usize, (BASE_PFN + FRAMES) as usize);
    p
}

/// One step of a workload.
#[derive(Clone, Copy)]
pub(super) enum Step {
    /// Allocate `2^order` frames.
    Alloc(u8),
    /// Free the live allocation at this index (always below the live count
    /// when no allocation failed, so no division at run time; the last one
    /// moves into its place).
    Free(u32),
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// `rounds` times: `batch` order-0 allocations, then all freed in random order.
pub(super) fn order0_steps(batch: usize, rounds: usize) -> Vec<Step> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut v = Vec::with_capacity(2 * batch * rounds);
    for _ in 0..rounds {
        v.extend((0..batch).map(|_| Step::Alloc(0)));
        for left in (1..=batch).rev() {
            v.push(Step::Free((rng.next() % left as u64) as u32));
        }
    }
    v
}

/// Allocation order of the mixed workload: mostly single frames, some
/// small folios (16 KiB..128 KiB), a few 2 MiB blocks.
fn mixed_order(r: u64) -> u8 {
    match r % 1000 {
        0..=649 => 0,
        650..=749 => 1,
        750..=829 => 2,
        830..=889 => 3,
        890..=939 => 4,
        940..=969 => 5,
        970..=989 => 6,
        990..=997 => 7,
        _ => 9,
    }
}

/// A random walk of allocations and frees around `live` live allocations,
/// ending with everything freed.
pub(super) fn mixed_steps(steps: usize, live: usize) -> Vec<Step> {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut v = Vec::with_capacity(steps + live * 2);
    let mut n = 0usize;
    for _ in 0..steps {
        let r = rng.next();
        let alloc = n == 0 || (n < 2 * live && (r >> 32) % 100 < if n < live { 70 } else { 45 });
        if alloc {
            v.push(Step::Alloc(mixed_order(r)));
            n += 1;
        } else {
            v.push(Step::Free(((r >> 16) % n as u64) as u32));
            n -= 1;
        }
    }
    while n > 0 {
        v.push(Step::Free((rng.next() % n as u64) as u32));
        n -= 1;
    }
    v
}

/// Runs `steps` on allocator `a`: `alloc(a, order)` gives a new
/// allocation and the number it adds to the checksum (`None`: refused),
/// `free(a, allocation)` false when the free failed. `live` holds what is
/// allocated. Returns the checksum (refusals and failed frees count too).
#[inline(always)]
pub(super) fn run_steps<A, T>(
    a: &mut A,
    steps: &[Step],
    live: &mut Vec<T>,
    alloc: impl Fn(&mut A, u8) -> Option<(T, u64)>,
    free: impl Fn(&mut A, T) -> bool,
) -> u64 {
    let mut sum = 0u64;
    for s in steps {
        match *s {
            Step::Alloc(o) => match alloc(a, o) {
                Some((x, n)) => {
                    sum = sum.wrapping_add(n);
                    live.push(x);
                }
                None => sum = sum.wrapping_add(1 << 40),
            },
            Step::Free(i) => {
                if live.is_empty() {
                    continue;
                }
                let x = live.swap_remove((i as usize).min(live.len() - 1));
                if !free(a, x) {
                    sum = sum.wrapping_add(1 << 41);
                }
            }
        }
    }
    sum
}

fn run_folio(fa: &mut Ours, steps: &[Step], live: &mut Vec<FolioRef>) -> u64 {
    run_steps(
        fa,
        steps,
        live,
        |fa, o| {
            let f = fa.alloc_folio(o, Owner::Buddy).ok()?;
            let pfn = f.pfn().0;
            Some((f, pfn))
        },
        |fa, f| fa.put(f).is_ok(),
    )
}

fn run_frozen(fa: &mut Ours, steps: &[Step], live: &mut Vec<(Pfn, u8)>) -> u64 {
    run_steps(
        fa,
        steps,
        live,
        |fa, o| {
            let p = fa.alloc_frozen(o, FrozenKind::Guard).ok()?;
            Some(((p, o), p.0))
        },
        |fa, (p, o)| fa.free_frozen(p, o).is_ok(),
    )
}

fn run_peer(p: &mut PeerAllocator<19>, steps: &[Step], live: &mut Vec<(usize, usize)>) -> u64 {
    run_steps(
        p,
        steps,
        live,
        |p, o| {
            let f = p.alloc(1 << o)?;
            Some(((f, 1 << o), f as u64))
        },
        |p, (f, n)| {
            p.dealloc(f, n);
            true
        },
    )
}

/// Best-of-`REPS` ns per step for each of ours-folio, ours-frozen, peer,
/// interleaved so that machine noise hits all three alike.
fn measure(steps: &[Step]) -> (f64, f64, f64, [u64; 3]) {
    let mut ours = new_ours();
    let mut peer = new_peer();
    let mut folios = Vec::with_capacity(steps.len());
    let mut frozen = Vec::with_capacity(steps.len());
    let mut plive = Vec::with_capacity(steps.len());
    let mut best = [f64::INFINITY; 3];
    let mut sums = [0u64; 3];
    // One untimed warm-up round each, then the timed repetitions.
    for rep in 0..=REPS {
        let t = Instant::now();
        sums[0] = black_box(run_folio(&mut ours, black_box(steps), &mut folios));
        let a = t.elapsed().as_nanos() as f64;
        let t = Instant::now();
        sums[1] = black_box(run_frozen(&mut ours, black_box(steps), &mut frozen));
        let b = t.elapsed().as_nanos() as f64;
        let t = Instant::now();
        sums[2] = black_box(run_peer(&mut peer, black_box(steps), &mut plive));
        let c = t.elapsed().as_nanos() as f64;
        if rep > 0 {
            best[0] = best[0].min(a);
            best[1] = best[1].min(b);
            best[2] = best[2].min(c);
        }
    }
    // Everything was freed: our allocator is back to its initial state.
    debug_assert_eq!(ours.count(FrameType::Free), FRAMES);
    let n = steps.len() as f64;
    (best[0] / n, best[1] / n, best[2] / n, sums)
}

/// Metadata per allocated frame with the mixed population alive.
fn metadata_mixed() -> (f64, u64, u64) {
    let mut fa = new_ours();
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut live = Vec::new();
    // Fill half the memory with the mix.
    while fa.count(FrameType::Folio) < FRAMES / 2 {
        match fa.alloc_folio(mixed_order(rng.next()), Owner::Buddy) {
            Ok(f) => live.push(f),
            Err(_) => break,
        }
    }
    let in_use = fa.count(FrameType::Folio);
    let folios = live.len() as u64;
    let s = fa.stats();
    // Descriptor memory actually taken (whole 4 KiB chunks of 16-byte
    // descriptors), spread over the frames in use.
    let per_frame = 8.0 + s.desc_bytes as f64 / in_use as f64;
    for f in live {
        let _ = fa.put(f);
    }
    black_box(s);
    (per_frame, folios, in_use)
}

/// Runs the benchmark and returns its records.
pub fn run() -> Vec<Record> {
    let mut out = Vec::new();
    out.push(
        Record::new(
            BENCH,
            "bytes_per_frame",
            std::mem::size_of::<AtomicU64>() as f64,
            "bytes",
        )
        .with_note("one AtomicU64 word per 4 KiB frame (Linux struct page: 64)"),
    );
    let (per_frame, folios, in_use) = metadata_mixed();
    out.push(
        Record::new(BENCH, "metadata_bytes_per_frame_mixed", per_frame, "bytes").with_note(format!(
            "8-byte word + descriptor memory taken (one 16-byte folio descriptor per allocation, in 4 KiB chunks); {folios} folios over {in_use} frames (half of 1 GiB) of orders 0..9, 65% order 0"
        )),
    );

    let workloads = [
        ("order0", order0_steps(8192, 16), "16 rounds of 8192 order-0 allocations then frees in random order"),
        ("mixed", mixed_steps(200_000, 2048), "200000-step random walk around 2048 live allocations of orders 0..9 (65% order 0), then all freed"),
    ];
    for (name, steps, what) in workloads {
        let (folio, frozen, peer, sums) = measure(&steps);
        let note = format!(
            "{what}; {} calls; 1 GiB; best of {REPS}; checksums {:x}/{:x}/{:x}",
            steps.len(),
            sums[0],
            sums[1],
            sums[2]
        );
        out.push(
            Record::new(BENCH, format!("alloc_free_{name}_folio"), folio, "ns/op")
                .with_peer(PEER, peer, true)
                .with_note(format!(
                    "alloc_folio + put (descriptor, refcount, every frame's word); {note}"
                )),
        );
        out.push(
            Record::new(BENCH, format!("alloc_free_{name}_frozen"), frozen, "ns/op")
                .with_peer(PEER, peer, true)
                .with_note(format!(
                    "alloc_frozen + free_frozen (frames only, like the peer); {note}"
                )),
        );
    }
    out
}
