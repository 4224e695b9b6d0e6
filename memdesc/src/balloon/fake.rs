//! Host fakes for the balloon: a recording virtio-balloon device that
//! reads the PFNs out of the buffers and checks the driver's rules as it
//! goes, and a firmware environment over a real frame allocator with an
//! optional real stage-1 engine (on the recording table fake).

use super::device::{feature, BalloonDevice, Buffer, DeviceError, Queue, Used};
use super::env::BalloonEnv;
use super::error::BalloonError;
use crate::addr::{Pfn, PhysAddr, VirtAddr, PAGE_SIZE};
use crate::frames::desc_cache::tests::LeakMemory;
use crate::frames::FrameAllocator;
use crate::stage1::fake::FakePlatform;
use crate::stage1::{Attributes, Stage1, Stage1Error};
use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::ptr::NonNull;
use std::rc::Rc;

/// Descriptors longer than this are skipped by Firecracker and
/// cloud-hypervisor: the fake flags them (independent of the policy's own
/// constant).
const HYPERVISOR_MAX_PFNS: u64 = 256;

/// Memory and mapping state shared by the fake device and environment.
#[derive(Default)]
pub struct World {
    /// Backing of the frames the balloon writes (its arrays, stats).
    pub ram: HashMap<u64, Box<[u64; 512]>>,
    /// Frames currently unmapped from the firmware's map.
    pub unmapped: HashSet<u64>,
}

impl World {
    fn read(&self, addr: PhysAddr, len: usize) -> Vec<u8> {
        let (pfn, off) = (addr.0 / PAGE_SIZE, (addr.0 % PAGE_SIZE) as usize);
        assert!(off + len <= PAGE_SIZE as usize, "buffer crosses a frame");
        let f = self
            .ram
            .get(&pfn)
            .expect("buffer in a frame the driver never wrote");
        // SAFETY: a 4 KiB box read as bytes, in bounds (checked above).
        let bytes = unsafe { std::slice::from_raw_parts(f.as_ptr().cast::<u8>(), 4096) };
        bytes[off..off + len].to_vec()
    }
}

/// One thing the fake device saw, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DevEvent {
    /// A chain added: queue, descriptors, PFNs (inflate/deflate) in it.
    Add(Queue, usize, usize),
    /// A notification: queue, chains pending at that moment.
    Notify(Queue, usize),
    /// A used element returned.
    Used(Queue, u16),
    /// `actual` written.
    WriteActual(u32),
    /// DRIVER_OK.
    DriverOk,
    /// Reset.
    Reset,
}

/// Bad used elements the fake can be told to return.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadUsed {
    /// An id no chain has.
    UnknownId,
    /// A non-zero length.
    WrongLength(u32),
}

#[derive(Default)]
struct FakeQueue {
    size: usize,
    free: usize,
    next_id: u16,
    pending: Vec<(u16, Vec<Buffer>)>,
    taken: Vec<(u16, Vec<Buffer>)>,
    used: VecDeque<Used>,
}

/// The recording fake device.
pub struct FakeDevice {
    world: Rc<RefCell<World>>,
    features: u64,
    queues: [FakeQueue; 4],
    /// `num_pages`.
    pub num_pages: u32,
    /// `actual` as the driver last wrote it.
    pub actual: u32,
    generation: u32,
    /// Reads of ConfigGeneration that return a new value (a config change
    /// racing the driver's read).
    pub unstable_reads: u32,
    /// DEVICE_NEEDS_RESET.
    pub needs_reset: bool,
    /// Process chains on notification (else [`FakeDevice::process`]).
    pub auto_ack: bool,
    /// The next used element returned is bad this way.
    pub bad_next: Option<BadUsed>,
    /// Reset fails this many times.
    pub reset_failures: u32,
    /// DRIVER_OK set.
    pub driver_ok: bool,
    /// PFNs the host holds.
    pub host: BTreeSet<u32>,
    /// Rule breaks seen (a test asserts this is empty).
    pub violations: Vec<String>,
    /// Inflates of a PFN the host already had, deflates of one it did not
    /// (legal after a reset lost what was in flight; QEMU ignores both).
    pub repeats: u64,
    /// Everything, in order.
    pub events: Vec<DevEvent>,
    /// Last stats buffer seen (tag, value).
    pub last_stats: Vec<(u16, u64)>,
    /// Whether a stats buffer was posted before DRIVER_OK.
    pub stats_before_driver_ok: bool,
    /// First PFNs of the free page reports received, in order.
    pub reports: Vec<u64>,
}

fn qi(q: Queue) -> usize {
    match q {
        Queue::Inflate => 0,
        Queue::Deflate => 1,
        Queue::Stats => 2,
        Queue::Reporting => 3,
    }
}

impl FakeDevice {
    /// A device with `features` negotiated, QEMU's queue sizes.
    pub fn new(world: Rc<RefCell<World>>, features: u64) -> Self {
        let mut d = Self {
            world,
            features,
            queues: Default::default(),
            num_pages: 0,
            actual: 0,
            generation: 0,
            unstable_reads: 0,
            needs_reset: false,
            auto_ack: true,
            bad_next: None,
            reset_failures: 0,
            driver_ok: false,
            host: BTreeSet::new(),
            violations: Vec::new(),
            repeats: 0,
            events: Vec::new(),
            last_stats: Vec::new(),
            stats_before_driver_ok: false,
            reports: Vec::new(),
        };
        d.init_queues();
        d
    }

    fn init_queues(&mut self) {
        let sizes = [
            128,
            128,
            if self.features & feature::STATS_VQ != 0 {
                128
            } else {
                0
            },
            if self.features & feature::PAGE_REPORTING != 0 {
                32
            } else {
                0
            },
        ];
        for (q, s) in self.queues.iter_mut().zip(sizes) {
            *q = FakeQueue {
                size: s,
                free: s,
                ..Default::default()
            };
        }
    }

    /// Sets `num_pages` as QMP `balloon` would (a config change).
    pub fn set_num_pages(&mut self, n: u32) {
        self.num_pages = n;
        self.generation = self.generation.wrapping_add(1);
    }

    /// Chains of `q` notified but not yet used.
    pub fn pending(&self, q: Queue) -> usize {
        self.queues[qi(q)].pending.len()
    }

    /// Processes every notified chain of `q` and returns them used.
    pub fn process(&mut self, q: Queue) {
        let pending = std::mem::take(&mut self.queues[qi(q)].pending);
        for (id, chain) in pending {
            self.consume(q, &chain);
            if q == Queue::Stats {
                // QEMU keeps the stats element until its timer fires.
                self.queues[qi(q)].taken.push((id, chain));
                continue;
            }
            self.push_used(q, id, chain.len());
        }
    }

    /// Returns the stats buffer the device holds (its polling timer fired).
    pub fn return_stats(&mut self) {
        let taken = std::mem::take(&mut self.queues[2].taken);
        for (id, chain) in taken {
            self.push_used(Queue::Stats, id, chain.len());
        }
    }

    fn push_used(&mut self, q: Queue, id: u16, descs: usize) {
        let fq = &mut self.queues[qi(q)];
        fq.free += descs;
        let u = match self.bad_next.take() {
            None => Used { id, len: 0 },
            Some(BadUsed::UnknownId) => Used {
                id: id.wrapping_add(1000),
                len: 0,
            },
            Some(BadUsed::WrongLength(len)) => Used { id, len },
        };
        fq.used.push_back(u);
    }

    fn consume(&mut self, q: Queue, chain: &[Buffer]) {
        let world = self.world.borrow();
        for b in chain {
            if q == Queue::Reporting {
                let two_mib = 2 << 20;
                if !b.device_writable {
                    self.violations
                        .push("report: device-readable buffer".into());
                }
                if !b.addr.0.is_multiple_of(two_mib)
                    || !(b.len as u64).is_multiple_of(two_mib)
                    || b.len == 0
                {
                    self.violations.push(format!(
                        "report: {:#x}+{:#x} not whole 2 MiB",
                        b.addr.0, b.len
                    ));
                }
                if world.unmapped.contains(&(b.addr.0 / PAGE_SIZE)) {
                    self.violations.push("report of a ballooned frame".into());
                }
                self.reports.push(b.addr.0 / PAGE_SIZE);
                continue;
            }
            if b.device_writable {
                self.violations
                    .push(format!("{q:?}: device-writable buffer"));
            }
            if q == Queue::Stats {
                self.last_stats =
                    super::stats::parse(&world.read(b.addr, b.len as usize)).collect();
                continue;
            }
            if b.len % 4 != 0 || b.len == 0 {
                self.violations
                    .push(format!("{q:?}: length {} not whole PFNs", b.len));
            }
            if b.len as u64 > HYPERVISOR_MAX_PFNS * 4 {
                self.violations
                    .push(format!("{q:?}: {} PFNs in one descriptor", b.len / 4));
            }
            let bytes = world.read(b.addr, b.len as usize);
            for c in bytes.chunks_exact(4) {
                let pfn = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                match q {
                    Queue::Inflate => {
                        if !world.unmapped.contains(&(pfn as u64)) {
                            self.violations
                                .push(format!("inflate of mapped PFN {pfn:#x}"));
                        }
                        if !self.host.insert(pfn) {
                            self.repeats += 1;
                        }
                    }
                    Queue::Deflate if !self.host.remove(&pfn) => self.repeats += 1,
                    _ => {}
                }
            }
        }
    }
}

impl BalloonDevice for FakeDevice {
    fn features(&self) -> u64 {
        self.features
    }
    fn config_generation(&mut self) -> u32 {
        if self.unstable_reads > 0 {
            self.unstable_reads -= 1;
            self.generation = self.generation.wrapping_add(1);
        }
        self.generation
    }
    fn read_num_pages(&mut self) -> u32 {
        self.num_pages
    }
    fn read_actual(&mut self) -> u32 {
        self.actual
    }
    fn write_actual(&mut self, pages: u32) {
        self.actual = pages;
        self.events.push(DevEvent::WriteActual(pages));
    }
    fn needs_reset(&mut self) -> bool {
        self.needs_reset
    }
    fn reset(&mut self) -> Result<(), DeviceError> {
        self.events.push(DevEvent::Reset);
        if self.reset_failures > 0 {
            self.reset_failures -= 1;
            return Err(DeviceError::ResetTimeout);
        }
        // QEMU keeps num_pages and actual; queues start empty.
        self.needs_reset = false;
        self.driver_ok = false;
        self.stats_before_driver_ok = false;
        self.init_queues();
        Ok(())
    }
    fn driver_ok(&mut self) {
        self.driver_ok = true;
        self.events.push(DevEvent::DriverOk);
    }
    fn queue_size(&self, q: Queue) -> usize {
        self.queues[qi(q)].size
    }
    fn queue_free(&self, q: Queue) -> usize {
        self.queues[qi(q)].free
    }
    fn add(&mut self, q: Queue, chain: &[Buffer]) -> Result<u16, DeviceError> {
        let fq = &mut self.queues[qi(q)];
        if fq.size == 0 {
            return Err(DeviceError::NoQueue(q));
        }
        if chain.is_empty() || chain.len() > fq.size {
            return Err(DeviceError::BadChain);
        }
        if chain.len() > fq.free {
            return Err(DeviceError::QueueFull);
        }
        fq.free -= chain.len();
        let id = fq.next_id;
        fq.next_id = fq.next_id.wrapping_add(1);
        fq.pending.push((id, chain.to_vec()));
        let pfns = chain.iter().map(|b| b.len as usize / 4).sum();
        if q == Queue::Stats && !self.driver_ok {
            self.stats_before_driver_ok = true;
        }
        self.events.push(DevEvent::Add(q, chain.len(), pfns));
        Ok(id)
    }
    fn notify(&mut self, q: Queue) {
        let n = self.queues[qi(q)].pending.len();
        self.events.push(DevEvent::Notify(q, n));
        if self.auto_ack || q == Queue::Stats {
            self.process(q);
        }
    }
    fn pop_used(&mut self, q: Queue) -> Option<Used> {
        let u = self.queues[qi(q)].used.pop_front()?;
        self.events.push(DevEvent::Used(q, u.id));
        Some(u)
    }
}

/// One thing the fake environment saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnvEvent {
    /// Frames unmapped.
    Unmap(u64, u64),
    /// Frames mapped again.
    Map(u64, u64),
    /// Re-fold over a range.
    Refold(u64, u64),
}

/// The firmware environment: a real allocator, the shared world, and
/// optionally a real stage-1 engine holding an identity map of RAM.
pub struct FakeEnv {
    /// The allocator.
    pub fa: FrameAllocator<'static, LeakMemory>,
    /// Shared memory and mapping state.
    pub world: Rc<RefCell<World>>,
    /// The stage-1 engine, if the test wants one.
    pub stage1: Option<Stage1<FakePlatform<'static>>>,
    /// Everything, in order.
    pub events: Vec<EnvEvent>,
    /// Unmap fails after this many more successes.
    pub unmap_fail_after: Option<u64>,
    /// Map fails after this many more successes.
    pub map_fail_after: Option<u64>,
    /// Record events (off for big property runs).
    pub record: bool,
    /// The fewest free frames seen when a frame was handed to the host
    /// (the floor check).
    pub min_free_at_unmap: u64,
}

impl FakeEnv {
    /// An environment over `fa`.
    pub fn new(fa: FrameAllocator<'static, LeakMemory>, world: Rc<RefCell<World>>) -> Self {
        Self {
            fa,
            world,
            stage1: None,
            events: Vec::new(),
            unmap_fail_after: None,
            map_fail_after: None,
            record: true,
            min_free_at_unmap: u64::MAX,
        }
    }

    fn fail(n: &mut Option<u64>) -> bool {
        match n {
            Some(0) => true,
            Some(k) => {
                *k -= 1;
                false
            }
            None => false,
        }
    }
}

// SAFETY: frames are 4 KiB boxes kept in the world's map for the rest of
// the test, aligned to 8 (the policy only does u32 and byte accesses; the
// fake accepts that the real contract's 4 KiB alignment is not modelled).
unsafe impl BalloonEnv for FakeEnv {
    type Mem = LeakMemory;
    fn with_frames<R>(
        &mut self,
        f: impl FnOnce(&mut FrameAllocator<'static, LeakMemory>) -> R,
    ) -> Result<R, BalloonError> {
        Ok(f(&mut self.fa))
    }
    fn unmap(&mut self, pfn: Pfn, pages: u64) -> Result<(), BalloonError> {
        if Self::fail(&mut self.unmap_fail_after) {
            return Err(BalloonError::Map(Stage1Error::OutOfTableMemory));
        }
        let free = self.fa.count(crate::frames::FrameType::Free);
        self.min_free_at_unmap = self.min_free_at_unmap.min(free);
        if let Some(s) = self.stage1.as_mut() {
            s.unmap(VirtAddr(pfn.addr().0), pages * PAGE_SIZE)?;
        }
        let mut w = self.world.borrow_mut();
        for p in pfn.0..pfn.0 + pages {
            assert!(w.unmapped.insert(p), "unmap of unmapped {p:#x}");
        }
        if self.record {
            self.events.push(EnvEvent::Unmap(pfn.0, pages));
        }
        Ok(())
    }
    fn map(&mut self, pfn: Pfn, pages: u64) -> Result<(), BalloonError> {
        if Self::fail(&mut self.map_fail_after) {
            return Err(BalloonError::Map(Stage1Error::OutOfTableMemory));
        }
        if let Some(s) = self.stage1.as_mut() {
            s.map(
                VirtAddr(pfn.addr().0),
                pfn.addr(),
                pages * PAGE_SIZE,
                Attributes::DATA,
            )?;
        }
        let mut w = self.world.borrow_mut();
        for p in pfn.0..pfn.0 + pages {
            assert!(w.unmapped.remove(&p), "map of mapped {p:#x}");
        }
        if self.record {
            self.events.push(EnvEvent::Map(pfn.0, pages));
        }
        Ok(())
    }
    fn refold(&mut self, pfn: Pfn, pages: u64) -> Result<(), BalloonError> {
        if let Some(s) = self.stage1.as_mut() {
            s.refold(VirtAddr(pfn.addr().0), pages * PAGE_SIZE)?;
        }
        if self.record {
            self.events.push(EnvEvent::Refold(pfn.0, pages));
        }
        Ok(())
    }
    fn frame(&mut self, pfn: Pfn) -> NonNull<u8> {
        let mut w = self.world.borrow_mut();
        let f = w.ram.entry(pfn.0).or_insert_with(|| Box::new([0; 512]));
        NonNull::from(&mut **f).cast()
    }
}
