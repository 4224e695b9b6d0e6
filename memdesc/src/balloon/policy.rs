//! The balloon policy: follows the device's `num_pages` with Offline frames
//! from the allocator, unmaps them from the firmware's own map before the
//! host gets them, and gives them back on deflate (virtio 1.2, 5.5.6).
//!
//! One operation (an inflate or a deflate batch) is in flight at a time. A
//! batch is as many chains as the queue holds, each chain up to
//! [`DESCS_PER_CHAIN`] descriptors of at most [`MAX_PFNS_PER_DESC`] PFNs,
//! all sent with one notification; `actual` is written when the batch
//! completes, and at start-up (QEMU keeps it across resets).
//!
//! Frames come as aligned 2 MiB chunks, then 64 KiB, then 4 KiB ones, so
//! that unmapping them removes whole blocks and runs from the linear map
//! (no shattering) and a host with huge pages can discard whole host pages:
//! a chain covers [`PFNS_PER_CHAIN`] entries, so an aligned 2 MiB chunk's
//! 512 PFNs arrive in one buffer. Deflate takes entries from the end of the
//! arrays, returns whole chunks (splitting only the one chunk the cut goes
//! through), maps them again and re-folds the range.
//!
//! Device input is checked: an unknown used id, a non-zero used length on a
//! device-readable chain and DEVICE_NEEDS_RESET reset the device; a config
//! that never reads stable, a `num_pages` beyond RAM and a flapping target
//! are reported and followed as far as is safe. No path loses a frame:
//! every Offline frame is an entry of the arrays, every array frame is
//! counted in [`Balloon::own_frames`].

use super::device::{feature, BalloonDevice, Buffer, Queue, Used};
use super::env::BalloonEnv;
use super::error::{BalloonError, Inconsistency};
use super::pfn_array::PfnArray;
use super::reporting::Reporter;
use super::stats;
use crate::addr::Pfn;
use crate::frames::{FolioRef, FrameError, FrameType, FrozenKind, Owner};

mod compaction;

/// PFNs per descriptor at most (Firecracker and cloud-hypervisor skip
/// larger descriptors).
pub const MAX_PFNS_PER_DESC: u64 = 256;
/// Descriptors per chain at most.
pub const DESCS_PER_CHAIN: u64 = 8;
/// Entries per chain: chains start and end at multiples of this index.
pub const PFNS_PER_CHAIN: u64 = MAX_PFNS_PER_DESC * DESCS_PER_CHAIN;
/// Chains one batch may have in flight.
pub const MAX_CHAINS: usize = 64;
/// Frames always left free beyond the configured reserve, for the table
/// frames that unmapping and mapping back may need.
pub const TABLE_HEADROOM: u64 = 16;
/// Reads of the config before giving up on a stable generation.
pub const CONFIG_RETRIES: u32 = 8;
/// Chunk orders in order of preference: 2 MiB, 64 KiB, 4 KiB.
pub const CHUNK_ORDERS: [u8; 3] = [9, 4, 0];
/// Rounds of used-ring polling a synchronous deflate (on OOM) waits.
pub const SYNC_POLLS: u32 = 1 << 16;

/// Tunables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BalloonConfig {
    /// Free frames the balloon never takes, whatever the host asks.
    pub reserve_pages: u64,
    /// Pages per batch at most (the queue limits it too).
    pub max_batch_pages: u64,
    /// Extra pages deflated on an out-of-memory event.
    pub oom_margin_pages: u64,
    /// Window over which target changes are counted for flapping.
    pub flap_window_ns: u64,
    /// More changes than this in a window is reported as flapping.
    pub flap_changes: u32,
    /// Smallest chunk order the balloon takes (0: down to 4 KiB). A
    /// firmware whose CPU lacks FEAT_BBM level 2 sets 9 so that inflating
    /// never splits a block of its own live map with break-before-make
    /// (the split's window would unmap the tables being written); the
    /// balloon then moves in whole 2 MiB chunks and stops up to 511 pages
    /// short of a target that is not a multiple of 512.
    pub min_chunk_order: u8,
    /// Report free 2 MiB blocks on the reporting queue (when
    /// PAGE_REPORTING is negotiated) each time the balloon is settled.
    pub report_free: bool,
}

impl BalloonConfig {
    /// 4 MiB reserve, batches as large as the queue, 256-page OOM margin,
    /// flapping = more than 8 changes within 100 ms.
    pub const DEFAULT: Self = Self {
        reserve_pages: 1024,
        max_batch_pages: u64::MAX,
        oom_margin_pages: 256,
        flap_window_ns: 100_000_000,
        flap_changes: 8,
        min_chunk_order: 0,
        report_free: false,
    };
}

impl Default for BalloonConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// What is in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Nothing.
    Idle,
    /// Entries `start..len` were sent on the inflateq.
    Inflating {
        /// First entry of the batch.
        start: u64,
    },
    /// Entries `start..len` were sent on the deflateq; those from
    /// `returned_from` on are already back in the allocator.
    Deflating {
        /// First entry of the batch.
        start: u64,
        /// First entry already returned (`len` when none is).
        returned_from: u64,
    },
}

#[derive(Clone, Copy, Debug, Default)]
struct Chain {
    id: u16,
    acked: bool,
}

/// Counters since start, for logs, console and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Pages inflated (acknowledged by the host).
    pub inflated: u64,
    /// Pages deflated.
    pub deflated: u64,
    /// Batches completed.
    pub batches: u64,
    /// Notifications sent on the inflate and deflate queues.
    pub notifications: u64,
    /// Descriptors sent on the inflate and deflate queues.
    pub descriptors: u64,
    /// Device resets done by the policy.
    pub resets: u64,
    /// Out-of-memory deflations.
    pub oom_events: u64,
    /// Pages deflated on out-of-memory events.
    pub oom_pages: u64,
    /// Stats buffers returned by the device and re-posted.
    pub stats_reposts: u64,
    /// Compactions by PFN done (a block freed by migrating chunks).
    pub compactions: u64,
    /// Ballooned frames migrated by compaction.
    pub migrated: u64,
    /// Chunks taken for inflating, by size: 2 MiB, 64 KiB, 4 KiB (the
    /// order of [`CHUNK_ORDERS`]).
    pub chunks: [u64; 3],
}

/// Where the balloon stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    /// The device's `num_pages`, as last read.
    pub num_pages: u32,
    /// What the balloon is heading for (clamped to RAM, minus pages
    /// deflated on out-of-memory events).
    pub goal: u64,
    /// `actual`, as last written.
    pub actual: u32,
    /// Entries in the PFN arrays.
    pub entries: u64,
    /// Whether the floor (or the chunk granularity) kept the last inflate
    /// short of the goal.
    pub floor_limited: bool,
    /// What is in flight.
    pub op: Op,
}

impl Status {
    /// Whether nothing is in flight and `actual` equals the goal (or the
    /// floor stopped it).
    pub fn settled(&self) -> bool {
        self.op == Op::Idle
            && (self.actual as u64 == self.goal
                || (self.floor_limited && (self.actual as u64) < self.goal))
    }
}

/// The balloon driver's state.
#[derive(Debug)]
pub struct Balloon {
    cfg: BalloonConfig,
    features: u64,
    started: bool,
    arr: PfnArray,
    op: Op,
    chains: [Chain; MAX_CHAINS],
    nchains: usize,
    num_pages: u32,
    ram_pages: u64,
    oom_hold: u64,
    actual: u32,
    floor_limited: bool,
    stats_frame: Option<Pfn>,
    stats_id: Option<u16>,
    flap_start: u64,
    flap_count: u32,
    flap_reported: bool,
    counters: Counters,
    reporter: Reporter,
}

impl Balloon {
    /// A balloon with nothing ballooned; [`Balloon::start`] brings it up.
    pub const fn new(cfg: BalloonConfig) -> Self {
        Self {
            cfg,
            features: 0,
            started: false,
            arr: PfnArray::new(),
            op: Op::Idle,
            chains: [Chain {
                id: 0,
                acked: false,
            }; MAX_CHAINS],
            nchains: 0,
            num_pages: 0,
            ram_pages: 0,
            oom_hold: 0,
            actual: 0,
            floor_limited: false,
            stats_frame: None,
            stats_id: None,
            flap_start: 0,
            flap_count: 0,
            flap_reported: false,
            counters: Counters {
                inflated: 0,
                deflated: 0,
                batches: 0,
                notifications: 0,
                descriptors: 0,
                resets: 0,
                oom_events: 0,
                oom_pages: 0,
                stats_reposts: 0,
                compactions: 0,
                migrated: 0,
                chunks: [0; 3],
            },
            reporter: Reporter::new(),
        }
    }

    /// Free page reporting state.
    pub fn reporter(&self) -> &Reporter {
        &self.reporter
    }

    /// Frames Offline because a free page report is in flight (not in
    /// the PFN arrays, not unmapped).
    pub fn reporting_frames(&self) -> u64 {
        self.reporter.in_flight_frames()
    }

    /// The configuration.
    pub fn config(&self) -> BalloonConfig {
        self.cfg
    }

    /// Changes the configuration (takes effect from the next batch).
    pub fn set_config(&mut self, cfg: BalloonConfig) {
        self.cfg = cfg;
    }

    /// The negotiated features.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Counters.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Frames that are Offline because of the balloon (in the arrays and
    /// not yet given back).
    pub fn offline_frames(&self) -> u64 {
        match self.op {
            Op::Deflating { returned_from, .. } => returned_from,
            _ => self.arr.len(),
        }
    }

    /// Frames the balloon uses for itself (PFN arrays, stats buffer): Slab
    /// frames of the allocator.
    pub fn own_frames(&self) -> u64 {
        self.arr.frames() + self.stats_frame.is_some() as u64
    }

    /// PFN array entry `i` (for tests and the console).
    ///
    /// # Errors
    ///
    /// [`BalloonError::Corrupt`] when `i` is not below the number of
    /// entries (or the arrays' bookkeeping is broken).
    pub fn entry<E: BalloonEnv>(&self, env: &mut E, i: u64) -> Result<u32, BalloonError> {
        self.arr.get(env, i)
    }

    /// Where the balloon stands.
    pub fn status(&self) -> Status {
        Status {
            num_pages: self.num_pages,
            goal: self.goal(),
            actual: self.actual,
            entries: self.arr.len(),
            floor_limited: self.floor_limited,
            op: self.op,
        }
    }

    fn goal(&self) -> u64 {
        (self.num_pages as u64)
            .min(self.ram_pages)
            .saturating_sub(self.oom_hold)
    }

    fn has(&self, f: u64) -> bool {
        self.features & f != 0
    }

    /// Brings the policy up on a device that is ready for DRIVER_OK: posts
    /// the stats buffer, sets DRIVER_OK, writes `actual` (the device may
    /// have kept an old value across a reset) and reads the target.
    ///
    /// # Errors
    ///
    /// [`BalloonError::FramesBusy`] when the allocator is held elsewhere;
    /// [`BalloonError::Frames`] when no frame is left for the stats buffer;
    /// [`BalloonError::Device`] when the stats queue refuses the buffer
    /// (the policy is then not started and DRIVER_OK is not set);
    /// [`BalloonError::ConfigUnstable`] or [`BalloonError::TargetBeyondRam`]
    /// from reading the target, after which the policy is started. A
    /// flapping target is not an error here.
    pub fn start<D: BalloonDevice, E: BalloonEnv>(
        &mut self,
        dev: &mut D,
        env: &mut E,
    ) -> Result<(), BalloonError> {
        self.features = dev.features();
        self.ram_pages = env.with_frames(|fa| fa.stats().frames)?;
        if self.has(feature::STATS_VQ) && self.stats_frame.is_none() {
            self.stats_frame = Some(env.with_frames(|fa| fa.alloc_frozen(0, FrozenKind::Slab))??);
        }
        self.bring_up(dev, env)?;
        self.started = true;
        match self.read_target(dev, 0) {
            Err(BalloonError::TargetFlapping { .. }) | Ok(()) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn bring_up<D: BalloonDevice, E: BalloonEnv>(
        &mut self,
        dev: &mut D,
        env: &mut E,
    ) -> Result<(), BalloonError> {
        if self.has(feature::STATS_VQ) {
            self.post_stats(dev, env)?;
        }
        dev.driver_ok();
        let actual = self.committed_u32();
        self.set_actual(dev, actual);
        Ok(())
    }

    fn committed_u32(&self) -> u32 {
        u32::try_from(self.arr.len()).unwrap_or(u32::MAX)
    }

    fn set_actual<D: BalloonDevice>(&mut self, dev: &mut D, v: u32) {
        self.actual = v;
        dev.write_actual(v);
    }

    /// One round of service: checks the device, collects used buffers,
    /// reads the target and starts the next batch when idle. `now_ns` is
    /// any monotonic clock (for flapping detection). Work is done even when
    /// an error is returned; the error says what the device did wrong (and
    /// whether the device was reset, see [`BalloonError::needs_reset`]).
    ///
    /// # Errors
    ///
    /// The first thing that went wrong this round; later steps still run
    /// unless a reset fails or the policy could not start:
    /// - anything [`Balloon::start`] returns, when the policy was not
    ///   started yet (nothing else is done then);
    /// - [`BalloonError::ResetFailed`] when the device needed a reset and
    ///   did not come back (nothing else is done then), or
    ///   [`BalloonError::DeviceNeedsReset`] when it set DEVICE_NEEDS_RESET
    ///   and was reset;
    /// - [`BalloonError::UnknownUsedId`] or [`BalloonError::WrongUsedLength`]
    ///   when the device returned a bad used element (the device was reset);
    /// - [`BalloonError::ConfigUnstable`], [`BalloonError::TargetFlapping`]
    ///   or [`BalloonError::TargetBeyondRam`] from reading the target;
    /// - from starting a batch or a free-page report: [`BalloonError::Device`]
    ///   (the queue refused), [`BalloonError::Map`] (the stage-1 map could
    ///   not change), [`BalloonError::Frames`] or [`BalloonError::FramesBusy`]
    ///   (the allocator refused or was held), [`BalloonError::PfnTooHigh`],
    ///   [`BalloonError::ArrayFull`], or [`BalloonError::Corrupt`] when
    ///   balloon state and page array disagree.
    pub fn service<D: BalloonDevice, E: BalloonEnv>(
        &mut self,
        dev: &mut D,
        env: &mut E,
        now_ns: u64,
    ) -> Result<Status, BalloonError> {
        if !self.started {
            self.start(dev, env)?;
        }
        let mut first: Option<BalloonError> = None;
        if dev.needs_reset() {
            self.recover(dev, env)?;
            first = Some(BalloonError::DeviceNeedsReset);
        }
        if let Err(e) = self.collect_used(dev, env) {
            if e.needs_reset() {
                self.recover(dev, env)?;
            }
            first.get_or_insert(e);
        }
        if let Err(e) = self.read_target(dev, now_ns) {
            first.get_or_insert(e);
        }
        if self.op == Op::Idle {
            if let Err(e) = self.start_batch(dev, env) {
                first.get_or_insert(e);
            }
        }
        if self.cfg.report_free && self.has(feature::PAGE_REPORTING) && self.status().settled() {
            let floor = self.cfg.reserve_pages + TABLE_HEADROOM;
            if let Err(e) = self.reporter.report(dev, env, floor) {
                first.get_or_insert(e);
            }
        }
        match first {
            None => Ok(self.status()),
            Some(e) => Err(e),
        }
    }

    fn read_config<D: BalloonDevice>(dev: &mut D) -> Result<u32, BalloonError> {
        for _ in 0..CONFIG_RETRIES {
            let g = dev.config_generation();
            let v = dev.read_num_pages();
            if dev.config_generation() == g {
                return Ok(v);
            }
        }
        Err(BalloonError::ConfigUnstable)
    }

    fn read_target<D: BalloonDevice>(&mut self, dev: &mut D, now: u64) -> Result<(), BalloonError> {
        let v = Self::read_config(dev)?;
        if v == self.num_pages {
            return Ok(());
        }
        self.num_pages = v;
        self.oom_hold = 0;
        if now.wrapping_sub(self.flap_start) > self.cfg.flap_window_ns {
            self.flap_start = now;
            self.flap_count = 0;
            self.flap_reported = false;
        }
        self.flap_count += 1;
        if self.flap_count > self.cfg.flap_changes && !self.flap_reported {
            self.flap_reported = true;
            return Err(BalloonError::TargetFlapping {
                changes: self.flap_count,
            });
        }
        if v as u64 > self.ram_pages {
            return Err(BalloonError::TargetBeyondRam {
                num_pages: v,
                ram_pages: self.ram_pages,
            });
        }
        Ok(())
    }

    /// Resets the device after it misbehaved and brings it up again. What
    /// was in flight: an inflate batch stays ballooned (the host may have
    /// discarded it already, so it must not be touched), a deflate batch
    /// not yet returned stays ballooned (it is deflated again later), one
    /// already returned is dropped from the arrays.
    fn recover<D: BalloonDevice, E: BalloonEnv>(
        &mut self,
        dev: &mut D,
        env: &mut E,
    ) -> Result<(), BalloonError> {
        self.counters.resets += 1;
        if let Op::Deflating { returned_from, .. } = self.op {
            self.arr.truncate(env, returned_from)?;
        }
        self.op = Op::Idle;
        self.nchains = 0;
        self.stats_id = None;
        dev.reset().map_err(BalloonError::ResetFailed)?;
        // The reset device no longer holds the reports in flight.
        self.reporter.void(env)?;
        self.bring_up(dev, env)
    }

    fn collect_used<D: BalloonDevice, E: BalloonEnv>(
        &mut self,
        dev: &mut D,
        env: &mut E,
    ) -> Result<(), BalloonError> {
        for q in [Queue::Inflate, Queue::Deflate] {
            while let Some(u) = dev.pop_used(q) {
                self.on_used(dev, env, q, u)?;
            }
        }
        if self.has(feature::PAGE_REPORTING) {
            while let Some(u) = dev.pop_used(Queue::Reporting) {
                self.reporter.on_used(env, u)?;
            }
        }
        if self.has(feature::STATS_VQ) {
            while let Some(u) = dev.pop_used(Queue::Stats) {
                if self.stats_id != Some(u.id) {
                    return Err(BalloonError::UnknownUsedId {
                        queue: Queue::Stats,
                        id: u.id,
                    });
                }
                self.stats_id = None;
                if u.len != 0 {
                    return Err(BalloonError::WrongUsedLength {
                        queue: Queue::Stats,
                        id: u.id,
                        len: u.len,
                    });
                }
                self.counters.stats_reposts += 1;
                self.post_stats(dev, env)?;
            }
        }
        Ok(())
    }

    fn on_used<D: BalloonDevice, E: BalloonEnv>(
        &mut self,
        dev: &mut D,
        env: &mut E,
        q: Queue,
        u: Used,
    ) -> Result<(), BalloonError> {
        let expected = match self.op {
            Op::Inflating { .. } => Some(Queue::Inflate),
            Op::Deflating { .. } => Some(Queue::Deflate),
            Op::Idle => None,
        };
        let unknown = BalloonError::UnknownUsedId { queue: q, id: u.id };
        if expected != Some(q) {
            return Err(unknown);
        }
        let chain = self.chains[..self.nchains]
            .iter_mut()
            .find(|c| c.id == u.id && !c.acked)
            .ok_or(unknown)?;
        if u.len != 0 {
            return Err(BalloonError::WrongUsedLength {
                queue: q,
                id: u.id,
                len: u.len,
            });
        }
        chain.acked = true;
        if self.chains[..self.nchains].iter().all(|c| c.acked) {
            self.complete(dev, env)?;
        }
        Ok(())
    }

    /// The batch in flight was acknowledged in full.
    fn complete<D: BalloonDevice, E: BalloonEnv>(
        &mut self,
        dev: &mut D,
        env: &mut E,
    ) -> Result<(), BalloonError> {
        let len = self.arr.len();
        let mut err = None;
        match self.op {
            Op::Idle => {}
            Op::Inflating { start } => {
                self.counters.inflated += len - start;
            }
            Op::Deflating {
                start,
                returned_from,
            } => {
                let mut end = returned_from;
                if returned_from == len {
                    // MUST_TELL_HOST: only now may the frames be reused.
                    err = self.return_frames(env, start, &mut end).err();
                }
                self.counters.deflated += len - end;
                self.arr.truncate(env, end)?;
            }
        }
        self.op = Op::Idle;
        self.nchains = 0;
        self.counters.batches += 1;
        let actual = self.committed_u32();
        self.set_actual(dev, actual);
        err.map_or(Ok(()), Err)
    }

    fn start_batch<D: BalloonDevice, E: BalloonEnv>(
        &mut self,
        dev: &mut D,
        env: &mut E,
    ) -> Result<(), BalloonError> {
        let (goal, have) = (self.goal(), self.arr.len());
        if goal > have && self.reporter.in_flight_frames() > 0 {
            // Free memory the host holds for a report comes back with its
            // ack (one interrupt away): inflate then, not short of it now.
            Ok(())
        } else if goal > have {
            self.inflate(dev, env, goal - have)
        } else {
            self.floor_limited = false;
            if goal < have {
                self.deflate(dev, env, have - goal).map(drop)
            } else {
                Ok(())
            }
        }
    }

    /// Pages one batch may carry on `q` right now.
    fn batch_cap<D: BalloonDevice>(&self, dev: &D, q: Queue) -> u64 {
        let descs = dev.queue_free(q) as u64;
        let by_queue = descs.saturating_sub(1) * MAX_PFNS_PER_DESC;
        let by_chains = (MAX_CHAINS as u64 - 1) * PFNS_PER_CHAIN;
        by_queue.min(by_chains).min(self.cfg.max_batch_pages)
    }

    /// Inflates by up to `want` pages in one batch.
    fn inflate<D: BalloonDevice, E: BalloonEnv>(
        &mut self,
        dev: &mut D,
        env: &mut E,
        want: u64,
    ) -> Result<(), BalloonError> {
        let cap = self.batch_cap(dev, Queue::Inflate);
        let floor = self.cfg.reserve_pages + TABLE_HEADROOM;
        let free = env.with_frames(|fa| fa.count(FrameType::Free))?;
        let len = self.arr.len();
        let mut n = want.min(cap);
        // The arrays' own growth comes out of the same free frames.
        let room = |n: u64| {
            let grow = PfnArray::frames_for(len + n).saturating_sub(self.arr.frames());
            free.saturating_sub(floor).saturating_sub(grow)
        };
        if room(n) < n {
            n = room(n).min(n);
            n = room(n).min(n);
        }
        self.floor_limited = n < want.min(cap);
        let unit = 1u64 << self.cfg.min_chunk_order.min(CHUNK_ORDERS[0]);
        if !n.is_multiple_of(unit) {
            // Whole chunks only; the rest of the way is out of reach.
            n -= n % unit;
            self.floor_limited = true;
        }
        if n == 0 {
            return Ok(());
        }
        self.arr.reserve(env, n)?;
        let start = len;
        let mut added = 0;
        let mut max_order = CHUNK_ORDERS[0];
        let mut err = None;
        while added < n {
            let rem = n - added;
            let Some(&order) = CHUNK_ORDERS.iter().find(|&&o| {
                o <= max_order && o >= self.cfg.min_chunk_order.min(9) && (1u64 << o) <= rem
            }) else {
                break;
            };
            let pages = 1u64 << order;
            let pfn = match env.with_frames(|fa| fa.alloc_offline(order))? {
                Ok(p) => p,
                Err(FrameError::OutOfMemory { .. })
                    if order > self.cfg.min_chunk_order.min(CHUNK_ORDERS[0]) =>
                {
                    // Nothing that large left: try the next size from now on.
                    max_order = order - 1;
                    continue;
                }
                Err(e) => {
                    err = Some(e.into());
                    break;
                }
            };
            if pfn.0 + pages > 1 << 32 {
                env.with_frames(|fa| fa.free_frozen(pfn, order))??;
                err = Some(BalloonError::PfnTooHigh { pfn });
                break;
            }
            if let Err(e) = env.unmap(pfn, pages) {
                env.with_frames(|fa| fa.free_frozen(pfn, order))??;
                err = Some(e);
                break;
            }
            self.arr.push_run(env, pfn.0 as u32, pages)?;
            if let Some(k) = CHUNK_ORDERS.iter().position(|&o| o == order) {
                self.counters.chunks[k] += 1;
            }
            added += pages;
        }
        if added < n {
            self.floor_limited = true;
        }
        if added == 0 {
            self.arr.shrink(env)?;
            return err.map_or(Ok(()), Err);
        }
        let end = start + added;
        let (sent, serr) = self.submit(dev, env, Queue::Inflate, start, end);
        if let Some(e) = serr {
            err.get_or_insert(e);
        }
        if sent < end {
            // Never offered to the host: put them back at once.
            let mut stop = end;
            let r = self.return_frames(env, sent, &mut stop);
            self.arr.truncate(env, stop)?;
            if let Err(e) = r {
                err.get_or_insert(e);
            }
        }
        if self.nchains > 0 {
            dev.notify(Queue::Inflate);
            self.counters.notifications += 1;
            self.op = Op::Inflating { start };
        }
        err.map_or(Ok(()), Err)
    }

    /// Sends entries `[start, end)` on `q` as chains, from the front for
    /// the inflateq and from the back for the deflateq, so that what was
    /// sent is always a prefix (inflate) or a suffix (deflate). Returns the
    /// end (inflate) or start (deflate) of what was sent, and the error
    /// that stopped it early, if any.
    fn submit<D: BalloonDevice, E: BalloonEnv>(
        &mut self,
        dev: &mut D,
        env: &mut E,
        q: Queue,
        start: u64,
        end: u64,
    ) -> (u64, Option<BalloonError>) {
        let r = self.submit_inner(dev, env, q, start, end);
        let (lo, hi, err) = r;
        (if q == Queue::Inflate { lo } else { hi }, err)
    }

    fn submit_inner<D: BalloonDevice, E: BalloonEnv>(
        &mut self,
        dev: &mut D,
        env: &mut E,
        q: Queue,
        start: u64,
        end: u64,
    ) -> (u64, u64, Option<BalloonError>) {
        self.nchains = 0;
        let forward = q == Queue::Inflate;
        let (mut lo, mut hi) = (start, end);
        let mut bufs = [Buffer {
            addr: crate::addr::PhysAddr(0),
            len: 0,
            device_writable: false,
        }; DESCS_PER_CHAIN as usize + 1];
        while lo < hi && self.nchains < MAX_CHAINS {
            let (cs, ce) = if forward {
                (lo, hi.min((lo / PFNS_PER_CHAIN + 1) * PFNS_PER_CHAIN))
            } else {
                (lo.max((hi - 1) / PFNS_PER_CHAIN * PFNS_PER_CHAIN), hi)
            };
            let mut nb = 0;
            let mut j = cs;
            while j < ce {
                let de = ce.min((j / MAX_PFNS_PER_DESC + 1) * MAX_PFNS_PER_DESC);
                let addr = match self.arr.entry_addr(env, j) {
                    Ok(a) => a,
                    Err(e) => return (lo, hi, Some(e)),
                };
                bufs[nb] = Buffer {
                    addr,
                    len: ((de - j) * 4) as u32,
                    device_writable: false,
                };
                nb += 1;
                j = de;
            }
            let id = match dev.add(q, &bufs[..nb]) {
                Ok(id) => id,
                Err(e) => return (lo, hi, Some(e.into())),
            };
            self.chains[self.nchains] = Chain { id, acked: false };
            self.nchains += 1;
            self.counters.descriptors += nb as u64;
            if forward {
                lo = ce;
            } else {
                hi = cs;
            }
        }
        (lo, hi, None)
    }

    /// Starts a deflate batch of up to `want` pages; returns the pages in it.
    fn deflate<D: BalloonDevice, E: BalloonEnv>(
        &mut self,
        dev: &mut D,
        env: &mut E,
        want: u64,
    ) -> Result<u64, BalloonError> {
        let len = self.arr.len();
        let n = want.min(self.batch_cap(dev, Queue::Deflate)).min(len);
        if n == 0 {
            return Ok(0);
        }
        let (start, mut err) = self.submit(dev, env, Queue::Deflate, len - n, len);
        if self.nchains == 0 {
            return err.map_or(Ok(0), Err);
        }
        dev.notify(Queue::Deflate);
        self.counters.notifications += 1;
        let mut returned_from = len;
        if !self.has(feature::MUST_TELL_HOST) {
            // The host need not be told first: the frames are reusable now.
            if let Err(e) = self.return_frames(env, start, &mut returned_from) {
                err.get_or_insert(e);
            }
        }
        self.op = Op::Deflating {
            start,
            returned_from,
        };
        err.map_or(Ok(len - start), Err)
    }

    /// Gives entries `[start, *end)` back: whole Offline allocations from
    /// the end, mapped again and freed; the allocation the cut at `start`
    /// goes through is split first. `*end` moves down as frames go back,
    /// so on an error it says what is still ballooned. Re-folds the range.
    fn return_frames<E: BalloonEnv>(
        &mut self,
        env: &mut E,
        start: u64,
        end: &mut u64,
    ) -> Result<(), BalloonError> {
        let (mut lo, mut hi) = (u64::MAX, 0u64);
        let r = (|| {
            while *end > start {
                let last = *end - 1;
                let pfn = Pfn(self.arr.get(env, last)? as u64);
                let (head, order) = env.with_frames(|fa| fa.offline_allocation_of(pfn))??;
                let off = pfn.0 - head.0;
                if off > last {
                    return Err(BalloonError::Corrupt {
                        pfn,
                        what: Inconsistency::ChunkBeforeArrays,
                    });
                }
                let pos = last - off;
                if pos < start {
                    env.with_frames(|fa| fa.split_offline(head, order))??;
                    continue;
                }
                if self.arr.get(env, pos)? as u64 != head.0 {
                    return Err(BalloonError::Corrupt {
                        pfn: head,
                        what: Inconsistency::ChunkNotConsecutive,
                    });
                }
                let pages = 1u64 << order;
                env.map(head, pages)?;
                env.with_frames(|fa| fa.free_frozen(head, order))??;
                lo = lo.min(head.0);
                hi = hi.max(head.0 + pages);
                *end = pos;
            }
            Ok(())
        })();
        if lo < hi {
            env.refold(Pfn(lo), hi - lo)?;
        }
        r
    }

    fn post_stats<D: BalloonDevice, E: BalloonEnv>(
        &mut self,
        dev: &mut D,
        env: &mut E,
    ) -> Result<(), BalloonError> {
        let Some(frame) = self.stats_frame else {
            return Ok(());
        };
        let s = env.with_frames(|fa| fa.stats())?;
        let doom = self.has(feature::DEFLATE_ON_OOM);
        let values = stats::figures(&s, self.offline_frames(), doom, self.cfg.reserve_pages);
        let len = stats::write(env, frame, &values);
        let id = dev.add(
            Queue::Stats,
            &[Buffer {
                addr: env.dma_addr(frame),
                len,
                device_writable: false,
            }],
        )?;
        self.stats_id = Some(id);
        dev.notify(Queue::Stats);
        Ok(())
    }

    /// Waits (polling the used rings) until nothing is in flight.
    fn wait_idle<D: BalloonDevice, E: BalloonEnv>(
        &mut self,
        dev: &mut D,
        env: &mut E,
    ) -> Result<(), BalloonError> {
        let mut polls = 0;
        while self.op != Op::Idle {
            if polls == SYNC_POLLS {
                return Err(BalloonError::Busy);
            }
            polls += 1;
            if let Err(e) = self.collect_used(dev, env) {
                if e.needs_reset() {
                    self.recover(dev, env)?;
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Deflate-on-OOM: gives back `pages` plus the configured margin (or
    /// all there is) right now, waiting for the host's ack when
    /// MUST_TELL_HOST is negotiated. The balloon then stays that much below
    /// the target until the host changes it. Returns the pages deflated.
    /// Without DEFLATE_ON_OOM ballooned pages are never touched.
    ///
    /// # Errors
    ///
    /// [`BalloonError::DeflateOnOomNotNegotiated`] without DEFLATE_ON_OOM
    /// (nothing is done); [`BalloonError::Busy`] when an inflate or deflate
    /// in flight does not complete within the polling budget;
    /// [`BalloonError::UnknownUsedId`], [`BalloonError::WrongUsedLength`]
    /// (the device was reset) or [`BalloonError::ResetFailed`] while
    /// waiting for the used rings; from the deflate itself
    /// [`BalloonError::Device`], [`BalloonError::Map`],
    /// [`BalloonError::Frames`], [`BalloonError::FramesBusy`] or
    /// [`BalloonError::Corrupt`]. Pages deflated before an error stay given
    /// back but are not counted in the (missing) return value.
    pub fn reclaim<D: BalloonDevice, E: BalloonEnv>(
        &mut self,
        dev: &mut D,
        env: &mut E,
        pages: u64,
    ) -> Result<u64, BalloonError> {
        if !self.has(feature::DEFLATE_ON_OOM) {
            return Err(BalloonError::DeflateOnOomNotNegotiated);
        }
        self.wait_idle(dev, env)?;
        let want = (pages + self.cfg.oom_margin_pages).min(self.arr.len());
        let mut done = 0;
        while done < want {
            let n = self.deflate(dev, env, want - done)?;
            if n == 0 {
                break;
            }
            done += n;
            if self.has(feature::MUST_TELL_HOST) || done < want {
                self.wait_idle(dev, env)?;
            }
        }
        if self.op != Op::Idle {
            // Frames are back already; pick up the ack if it is there.
            if let Err(e) = self.collect_used(dev, env) {
                if e.needs_reset() {
                    self.recover(dev, env)?;
                }
            }
        }
        if done > 0 {
            self.oom_hold += done;
            self.counters.oom_events += 1;
            self.counters.oom_pages += done;
        }
        Ok(done)
    }

    /// A folio of `2^order` frames. When the allocator cannot give one:
    /// if enough frames are free and only the balloon's chunks fragment
    /// them, compaction by PFN migrates the chunks out of a block
    /// ([`Balloon::compact_for`]; the balloon keeps its size); otherwise,
    /// when DEFLATE_ON_OOM is negotiated, deflates enough and retries.
    /// Returns the folio and the pages deflated for it.
    ///
    /// # Errors
    ///
    /// As [`Balloon::alloc_with`].
    pub fn alloc_folio<D: BalloonDevice, E: BalloonEnv>(
        &mut self,
        dev: &mut D,
        env: &mut E,
        order: u8,
        owner: Owner,
    ) -> Result<(FolioRef, u64), BalloonError> {
        self.alloc_with(dev, env, order, |fa| fa.alloc_folio(order, owner))
    }

    /// Frozen frames (`2^order`, of `kind`), as [`Balloon::alloc_folio`]
    /// does it: compaction, then deflate-on-OOM when negotiated.
    ///
    /// # Errors
    ///
    /// As [`Balloon::alloc_with`].
    pub fn alloc_frozen<D: BalloonDevice, E: BalloonEnv>(
        &mut self,
        dev: &mut D,
        env: &mut E,
        order: u8,
        kind: FrozenKind,
    ) -> Result<(Pfn, u64), BalloonError> {
        self.alloc_with(dev, env, order, |fa| fa.alloc_frozen(order, kind))
    }

    /// Runs `alloc` (a request of `2^order` frames) on the allocator; when
    /// it fails for want of frames, frees them as [`Balloon::alloc_folio`]
    /// does and runs it once more: compaction by PFN when the frames are
    /// free but fragmented by the balloon's chunks, then deflate-on-OOM
    /// (when negotiated) of what [`oom_shortfall`] says is missing plus the
    /// margin. A descriptor cache that could not grow (no free frame for a
    /// chunk of descriptors) is short of one frame; compaction cannot help
    /// it. Returns the result and the pages deflated for it.
    ///
    /// # Errors
    ///
    /// [`BalloonError::Frames`] with the allocator's error when `alloc`
    /// fails and freeing memory cannot help (any error but running out of
    /// frames or descriptors), when DEFLATE_ON_OOM is not negotiated and
    /// compaction did not help, or when `alloc` fails again after the
    /// deflate; [`BalloonError::FramesBusy`] when the allocator is held
    /// elsewhere; anything [`Balloon::compact_for`] or [`Balloon::reclaim`]
    /// returns while freeing frames.
    pub fn alloc_with<D: BalloonDevice, E: BalloonEnv, T>(
        &mut self,
        dev: &mut D,
        env: &mut E,
        order: u8,
        mut alloc: impl FnMut(
            &mut crate::frames::FrameAllocator<'static, E::Mem>,
        ) -> Result<T, FrameError>,
    ) -> Result<(T, u64), BalloonError> {
        match env.with_frames(&mut alloc)? {
            Ok(f) => Ok((f, 0)),
            Err(e @ FrameError::OutOfDescriptors { .. }) => {
                if !self.has(feature::DEFLATE_ON_OOM) {
                    return Err(e.into());
                }
                let got = self.reclaim(dev, env, oom_shortfall(&e, order).unwrap_or(1))?;
                let f = env.with_frames(&mut alloc)??;
                Ok((f, got))
            }
            Err(e @ FrameError::OutOfMemory { .. }) => {
                let free = env.with_frames(|fa| fa.count(FrameType::Free))?;
                if free >= 1u64 << order && self.compact_for(dev, env, order)?.is_some() {
                    if let Ok(f) = env.with_frames(&mut alloc)? {
                        return Ok((f, 0));
                    }
                }
                if !self.has(feature::DEFLATE_ON_OOM) {
                    return Err(e.into());
                }
                let got = self.reclaim(dev, env, oom_shortfall(&e, order).unwrap_or(1))?;
                let f = env.with_frames(&mut alloc)??;
                Ok((f, got))
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// Frames a request of `2^order` frames that failed with `e` lacks, as
/// deflate-on-OOM counts them (before its margin): the request itself when
/// the allocator had no block for it, one frame when a descriptor cache
/// could not grow (a chunk of descriptors is one frame). `None` when more
/// free frames would not help.
pub fn oom_shortfall(e: &FrameError, order: u8) -> Option<u64> {
    match e {
        FrameError::OutOfMemory { .. } => Some(1u64 << order.min(63)),
        FrameError::OutOfDescriptors { .. } => Some(1),
        _ => None,
    }
}

/// Frames a stage-1 operation that failed with `e` lacks (before the
/// margin): the engine's table frames come from a pool of their own, but
/// each new table needs a page-table descriptor, and when that cache is
/// empty it grows by one frame from the allocator. So an
/// [`Stage1Error::OutOfTableMemory`](crate::stage1::Stage1Error::OutOfTableMemory)
/// is short of one frame; other errors are not for want of memory.
pub fn table_oom_shortfall(e: &crate::stage1::Stage1Error) -> Option<u64> {
    match e {
        crate::stage1::Stage1Error::OutOfTableMemory => Some(1),
        _ => None,
    }
}
