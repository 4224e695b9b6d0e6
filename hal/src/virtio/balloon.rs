//! The virtio-balloon device (virtio 1.2, 5.5) over a modern virtio-mmio
//! transport: [`memdesc::balloon::BalloonDevice`] for the policy.
//!
//! Bring-up follows virtio 1.2, 3.1.1: reset (and wait for status 0),
//! ACKNOWLEDGE, DRIVER, features ([`memdesc::balloon::negotiate`]: VERSION_1,
//! STATS_VQ, DEFLATE_ON_OOM, PAGE_REPORTING and MUST_TELL_HOST when
//! offered), FEATURES_OK and read it back (`virtio-drivers`' `begin_init`
//! does not), then the queues at the indices the negotiated features give
//! ([`memdesc::balloon::queue_index`]: packed, as QEMU does). DRIVER_OK is
//! left to the policy, which posts the stats buffer first.
//!
//! Buffers are guest-physical addresses handed in by the policy. The
//! `virtio-drivers` queue wants the same slices back when it recycles a
//! chain, only to count them and to `unshare` them; with an identity DMA
//! mapping ([`IdentityDma`]) unsharing does nothing, so only the count of
//! device-readable and device-writable descriptors per chain is kept.

use memdesc::balloon::{
    feature, negotiate, queue_index, BalloonDevice, Buffer, DeviceError, Queue, Used,
};
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::mmio::MmioTransport;
use virtio_drivers::transport::{DeviceStatus, InterruptStatus, Transport};
use virtio_drivers::Hal;

/// Entries per virtqueue (QEMU's inflate/deflate/stats queue size; its
/// reporting queue is 32 but the transport accepts up to 1024).
pub const QUEUE_SIZE: usize = 128;
/// Descriptors per chain at most.
pub const MAX_CHAIN: usize = memdesc::balloon::policy::DESCS_PER_CHAIN as usize + 1;
/// Status reads while waiting for a reset to complete.
const RESET_POLLS: u32 = 1_000_000;

/// Transport error codes in [`DeviceError::Transport`].
pub mod code {
    /// The device does not offer VIRTIO_F_VERSION_1 (legacy only).
    pub const NO_VERSION_1: u32 = 1;
    /// A queue the features call for could not be set up.
    pub const QUEUE_SETUP: u32 = 2;
    /// The config space is too small for the balloon's fields.
    pub const CONFIG: u32 = 3;
}

/// A [`Hal`] whose DMA addresses are the buffers' own addresses and whose
/// `unshare` does nothing (no bounce buffers, no IOMMU).
///
/// # Safety
///
/// `share` must return the buffer's address unchanged, `unshare` must not
/// access the buffer, and every address the policy hands the device must be
/// readable (and, for device-writable buffers, writable) at that same
/// address.
pub unsafe trait IdentityDma: Hal {}

#[derive(Clone, Copy, Default)]
struct Rec {
    ins: u8,
    outs: u8,
}

struct Q<H: Hal> {
    vq: VirtQueue<H, QUEUE_SIZE>,
    index: u16,
    recs: [Rec; QUEUE_SIZE],
}

/// A virtio-balloon device over virtio-mmio.
pub struct VirtioBalloon<H: IdentityDma> {
    t: MmioTransport<'static>,
    base: u64,
    offered: u64,
    /// Features the driver declines even when offered.
    refused: u64,
    features: u64,
    queues: [Option<Q<H>>; 4],
}

// SAFETY: the transport and queue pointers are used by one core only
// (secondary cores are parked), and a `VirtioBalloon` moved into a global
// is reached only through that global's exclusive access; the interrupt
// handler touches only InterruptStatus/InterruptACK (hal::virtio::irq).
unsafe impl<H: IdentityDma> Send for VirtioBalloon<H> {}

fn slot(q: Queue) -> usize {
    match q {
        Queue::Inflate => 0,
        Queue::Deflate => 1,
        Queue::Stats => 2,
        Queue::Reporting => 3,
    }
}

impl<H: IdentityDma> VirtioBalloon<H> {
    /// Brings the device behind `c` up to just before DRIVER_OK.
    pub fn new(c: super::Claimed) -> Result<Self, DeviceError> {
        Self::new_refusing(c, 0)
    }

    /// As [`VirtioBalloon::new`], declining the features in `refused`
    /// even when offered (VERSION_1 cannot be declined), across resets too:
    /// for example DEFLATE_ON_OOM, for a guest whose ballooned pages must
    /// stay with the host whatever it runs short of.
    pub fn new_refusing(c: super::Claimed, refused: u64) -> Result<Self, DeviceError> {
        let base = c.window().region.base;
        let mut d = Self {
            t: c.transport,
            base,
            offered: 0,
            refused: refused & !feature::VERSION_1,
            features: 0,
            queues: [None, None, None, None],
        };
        d.bring_up()?;
        Ok(d)
    }

    /// The features the device offered.
    pub fn offered(&self) -> u64 {
        self.offered
    }

    /// Attaches the transport's interrupt (`irq`, from the device tree):
    /// from now on its handler acknowledges InterruptStatus and records it
    /// in the returned [`super::irq::Events`].
    pub fn attach_interrupt(
        &self,
        irq: &crate::irq::Interrupt,
    ) -> Result<super::irq::Events, super::irq::VirtioIrqError> {
        super::irq::attach(self.base, irq)
    }

    /// Acknowledges the interrupt status (used-buffer and config-change
    /// bits) and returns it.
    pub fn ack_interrupt(&mut self) -> InterruptStatus {
        self.t.ack_interrupt()
    }

    fn bring_up(&mut self) -> Result<(), DeviceError> {
        self.t.set_status(DeviceStatus::empty());
        let mut polls = 0;
        while !self.t.get_status().is_empty() {
            polls += 1;
            if polls == RESET_POLLS {
                return Err(DeviceError::ResetTimeout);
            }
        }
        // The device is reset: it no longer reads the old rings.
        self.queues = [None, None, None, None];
        self.t.set_status(DeviceStatus::ACKNOWLEDGE);
        self.t
            .set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
        self.offered = self.t.read_device_features();
        if self.offered & feature::VERSION_1 == 0 {
            self.t.set_status(DeviceStatus::FAILED);
            return Err(DeviceError::Transport(code::NO_VERSION_1));
        }
        self.features = negotiate(self.offered) & !self.refused;
        self.t.write_driver_features(self.features);
        let ok = DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK;
        self.t.set_status(ok);
        if !self.t.get_status().contains(DeviceStatus::FEATURES_OK) {
            self.t.set_status(DeviceStatus::FAILED);
            return Err(DeviceError::FeaturesRejected);
        }
        for q in Queue::ALL {
            let Some(index) = queue_index(q, self.features) else {
                continue;
            };
            let vq = VirtQueue::new(&mut self.t, index, false, false)
                .map_err(|_| DeviceError::Transport(code::QUEUE_SETUP))?;
            self.queues[slot(q)] = Some(Q {
                vq,
                index,
                recs: [Rec::default(); QUEUE_SIZE],
            });
        }
        Ok(())
    }
}

impl<H: IdentityDma> BalloonDevice for VirtioBalloon<H> {
    fn features(&self) -> u64 {
        self.features
    }

    fn config_generation(&mut self) -> u32 {
        self.t.read_config_generation()
    }

    fn read_num_pages(&mut self) -> u32 {
        self.t.read_config_space::<u32>(0).unwrap_or(0)
    }

    fn read_actual(&mut self) -> u32 {
        self.t.read_config_space::<u32>(4).unwrap_or(0)
    }

    fn write_actual(&mut self, pages: u32) {
        let _ = self.t.write_config_space::<u32>(4, pages);
    }

    fn needs_reset(&mut self) -> bool {
        self.t
            .get_status()
            .contains(DeviceStatus::DEVICE_NEEDS_RESET)
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        self.bring_up()
    }

    fn driver_ok(&mut self) {
        self.t.set_status(
            DeviceStatus::ACKNOWLEDGE
                | DeviceStatus::DRIVER
                | DeviceStatus::FEATURES_OK
                | DeviceStatus::DRIVER_OK,
        );
    }

    fn queue_size(&self, q: Queue) -> usize {
        if self.queues[slot(q)].is_some() {
            QUEUE_SIZE
        } else {
            0
        }
    }

    fn queue_free(&self, q: Queue) -> usize {
        self.queues[slot(q)]
            .as_ref()
            .map_or(0, |q| q.vq.available_desc())
    }

    fn add(&mut self, q: Queue, chain: &[Buffer]) -> Result<u16, DeviceError> {
        let queue = self.queues[slot(q)]
            .as_mut()
            .ok_or(DeviceError::NoQueue(q))?;
        if chain.is_empty() || chain.len() > MAX_CHAIN {
            return Err(DeviceError::BadChain);
        }
        // Device-readable descriptors come first (virtio 1.2, 2.7.4).
        let ins = chain.iter().take_while(|b| !b.device_writable).count();
        if chain[ins..].iter().any(|b| !b.device_writable) || chain.iter().any(|b| b.len == 0) {
            return Err(DeviceError::BadChain);
        }
        let mut inputs: [&[u8]; MAX_CHAIN] = [&[]; MAX_CHAIN];
        let mut outputs: [&mut [u8]; MAX_CHAIN] = Default::default();
        for (i, b) in chain[..ins].iter().enumerate() {
            // SAFETY: IdentityDma: the policy's buffers are RAM readable at
            // their physical address, `len` bytes long, and not written
            // while the device owns them.
            inputs[i] =
                unsafe { core::slice::from_raw_parts(b.addr.0 as *const u8, b.len as usize) };
        }
        for (i, b) in chain[ins..].iter().enumerate() {
            // SAFETY: as above, and device-writable buffers are RAM the
            // driver does not touch until the device returns them.
            outputs[i] =
                unsafe { core::slice::from_raw_parts_mut(b.addr.0 as *mut u8, b.len as usize) };
        }
        let outs = chain.len() - ins;
        // SAFETY: the buffers stay valid and untouched by the driver until
        // the device returns the chain (the policy's rule for inflate,
        // deflate, stats and reporting buffers).
        let id =
            unsafe { queue.vq.add(&inputs[..ins], &mut outputs[..outs]) }.map_err(|e| match e {
                virtio_drivers::Error::QueueFull => DeviceError::QueueFull,
                _ => DeviceError::BadChain,
            })?;
        queue.recs[id as usize % QUEUE_SIZE] = Rec {
            ins: ins as u8,
            outs: outs as u8,
        };
        Ok(id)
    }

    fn notify(&mut self, q: Queue) {
        if let Some(queue) = self.queues[slot(q)].as_ref() {
            if queue.vq.should_notify() {
                self.t.notify(queue.index);
            }
        }
    }

    fn pop_used(&mut self, q: Queue) -> Option<Used> {
        let queue = self.queues[slot(q)].as_mut()?;
        let id = queue.vq.peek_used()?;
        let rec = match queue.recs.get(id as usize) {
            Some(r) if r.ins + r.outs > 0 => *r,
            // Not a chain in flight: leave it in the ring (the queue cannot
            // recycle it) and let the policy reset the device.
            _ => return Some(Used { id, len: 0 }),
        };
        // Stand-ins for the chain's buffers: with IdentityDma the queue
        // only counts them and unsharing touches nothing.
        let dummy_in = [0u8; 1];
        let mut dummy_out = [[0u8; 1]; MAX_CHAIN];
        let inputs: [&[u8]; MAX_CHAIN] = [&dummy_in; MAX_CHAIN];
        let mut outputs: [&mut [u8]; MAX_CHAIN] = Default::default();
        for (o, d) in outputs.iter_mut().zip(dummy_out.iter_mut()) {
            *o = d;
        }
        // SAFETY: `id` is a chain we added with `rec.ins` readable and
        // `rec.outs` writable descriptors; IdentityDma's `unshare` never
        // touches the stand-in slices' contents.
        let len = unsafe {
            queue.vq.pop_used(
                id,
                &inputs[..rec.ins as usize],
                &mut outputs[..rec.outs as usize],
            )
        }
        .ok()?;
        queue.recs[id as usize] = Rec::default();
        Some(Used { id, len })
    }
}
