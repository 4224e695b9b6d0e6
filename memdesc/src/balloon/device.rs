//! What the balloon policy needs from a virtio-balloon device (virtio 1.2,
//! 5.5), as a trait: the hal implements it over virtio-mmio, host tests
//! with a recording fake.
//!
//! The trait is deliberately low level (config generation and fields read
//! separately, one descriptor chain per [`BalloonDevice::add`], used
//! elements popped raw) so that the policy, not the transport, decides what
//! a bad value from the device means: every check on device input lives in
//! [`super::Balloon`] and is host-tested.

use crate::addr::PhysAddr;

/// Feature bits of the balloon device (virtio 1.2, 5.5.3) and the one
/// transport bit the driver must accept.
pub mod feature {
    /// The driver must tell the host before it reuses a deflated page.
    pub const MUST_TELL_HOST: u64 = 1 << 0;
    /// A statistics virtqueue exists.
    pub const STATS_VQ: u64 = 1 << 1;
    /// The driver may deflate when it runs out of memory.
    pub const DEFLATE_ON_OOM: u64 = 1 << 2;
    /// Free page hinting (a free_page_vq exists). Not used by this driver.
    pub const FREE_PAGE_HINT: u64 = 1 << 3;
    /// The device knows `poison_val`. Not used by this driver.
    pub const PAGE_POISON: u64 = 1 << 4;
    /// Free page reporting (a reporting_vq exists).
    pub const PAGE_REPORTING: u64 = 1 << 5;
    /// Modern (virtio 1.x) device; the driver MUST accept it.
    pub const VERSION_1: u64 = 1 << 32;

    /// Everything this driver accepts when the device offers it.
    pub const SUPPORTED: u64 =
        MUST_TELL_HOST | STATS_VQ | DEFLATE_ON_OOM | PAGE_REPORTING | VERSION_1;
}

/// The balloon's virtqueues by role. Their indices depend on the negotiated
/// features (QEMU and Linux pack them): see [`queue_index`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Queue {
    /// inflateq: PFNs given to the host.
    Inflate,
    /// deflateq: PFNs taken back.
    Deflate,
    /// statsq: the statistics buffer (only with [`feature::STATS_VQ`]).
    Stats,
    /// reporting_vq: free page reports (only with [`feature::PAGE_REPORTING`]).
    Reporting,
}

impl Queue {
    /// All roles in spec order.
    pub const ALL: [Queue; 4] = [
        Queue::Inflate,
        Queue::Deflate,
        Queue::Stats,
        Queue::Reporting,
    ];
}

/// Index of `q`'s virtqueue with `features` negotiated, or `None` when the
/// queue does not exist. Queues whose feature is absent take no index, so
/// the ones after them move down (QEMU's `virtio_balloon_device_realize`
/// creates them in order and only when enabled; with free page hinting off
/// the reporting queue is index 3).
pub fn queue_index(q: Queue, features: u64) -> Option<u16> {
    let stats = features & feature::STATS_VQ != 0;
    let hint = features & feature::FREE_PAGE_HINT != 0;
    let report = features & feature::PAGE_REPORTING != 0;
    match q {
        Queue::Inflate => Some(0),
        Queue::Deflate => Some(1),
        Queue::Stats => stats.then_some(2),
        Queue::Reporting => report.then_some(2 + stats as u16 + hint as u16),
    }
}

/// Which optional features to accept from `offered`: everything this
/// driver supports (VERSION_1 always when offered, as the spec requires).
pub fn negotiate(offered: u64) -> u64 {
    offered & feature::SUPPORTED
}

/// One descriptor of a chain: guest-physical address and length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    /// Guest-physical address of the bytes.
    pub addr: PhysAddr,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (an "in" buffer) rather than device-readable.
    pub device_writable: bool,
}

/// A used-ring element as the device wrote it (not yet validated).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    /// Head descriptor id of the chain the device says it used.
    pub id: u16,
    /// Bytes the device says it wrote into the chain.
    pub len: u32,
}

/// A transport-level failure reported by the device implementation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceError {
    /// No room for the chain in the queue.
    QueueFull,
    /// The queue does not exist (feature not negotiated).
    NoQueue(Queue),
    /// A chain longer than the queue or with no descriptor.
    BadChain,
    /// The device did not accept the features (FEATURES_OK did not stick).
    FeaturesRejected,
    /// The device did not come back from a reset.
    ResetTimeout,
    /// Any other transport failure, with an implementation-defined code.
    Transport(u32),
}

/// A virtio-balloon device as the policy drives it.
///
/// The implementation has brought the device up to the point just before
/// DRIVER_OK (reset, ACKNOWLEDGE, DRIVER, features negotiated with
/// [`negotiate`], FEATURES_OK re-read, queues set up); the policy posts the
/// stats buffer and calls [`BalloonDevice::driver_ok`].
pub trait BalloonDevice {
    /// The negotiated feature bits.
    fn features(&self) -> u64;
    /// The transport's ConfigGeneration counter.
    fn config_generation(&mut self) -> u32;
    /// `num_pages`, read once (the caller does the generation loop).
    fn read_num_pages(&mut self) -> u32;
    /// `actual`, read once.
    fn read_actual(&mut self) -> u32;
    /// Writes `actual`.
    fn write_actual(&mut self, pages: u32);
    /// Whether the device set DEVICE_NEEDS_RESET in its status.
    fn needs_reset(&mut self) -> bool;
    /// Resets the device and brings it up again to just before DRIVER_OK
    /// with the same features; every queue is empty afterwards and ids of
    /// chains added before are void.
    ///
    /// # Errors
    ///
    /// A [`DeviceError`] when the device cannot be brought up again: an
    /// implementation returns [`DeviceError::ResetTimeout`] when the reset
    /// does not complete, [`DeviceError::FeaturesRejected`] when
    /// FEATURES_OK does not stick, and [`DeviceError::Transport`] for any
    /// other transport failure (such as queue setup).
    fn reset(&mut self) -> Result<(), DeviceError>;
    /// Sets DRIVER_OK.
    fn driver_ok(&mut self);
    /// Number of entries of `q` (0 if it does not exist).
    fn queue_size(&self, q: Queue) -> usize;
    /// Free descriptors in `q` right now.
    fn queue_free(&self, q: Queue) -> usize;
    /// Adds one descriptor chain to `q` (not yet notified); returns its head id.
    ///
    /// # Errors
    ///
    /// [`DeviceError::NoQueue`] when `q` does not exist,
    /// [`DeviceError::BadChain`] when `chain` is empty, longer than the
    /// queue allows, or otherwise not a valid chain (an implementation may
    /// also refuse zero-length buffers or device-writable buffers placed
    /// before device-readable ones), and [`DeviceError::QueueFull`] when `q`
    /// has too few free descriptors. Nothing is added on error.
    fn add(&mut self, q: Queue, chain: &[Buffer]) -> Result<u16, DeviceError>;
    /// Tells the device that `q` has new buffers.
    fn notify(&mut self, q: Queue);
    /// The next used element of `q`, if any; its descriptors are free again.
    fn pop_used(&mut self, q: Queue) -> Option<Used>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_indices_are_packed() {
        use feature::*;
        let qemu = VERSION_1 | STATS_VQ | PAGE_REPORTING;
        assert_eq!(queue_index(Queue::Reporting, qemu), Some(3));
        assert_eq!(queue_index(Queue::Stats, qemu), Some(2));
        assert_eq!(
            queue_index(Queue::Reporting, VERSION_1 | PAGE_REPORTING),
            Some(2)
        );
        assert_eq!(
            queue_index(Queue::Reporting, qemu | FREE_PAGE_HINT),
            Some(4)
        );
        assert_eq!(queue_index(Queue::Stats, VERSION_1), None);
        assert_eq!(queue_index(Queue::Reporting, qemu & !PAGE_REPORTING), None);
    }

    #[test]
    fn negotiation_keeps_what_we_support() {
        use feature::*;
        let offered =
            VERSION_1 | STATS_VQ | PAGE_POISON | FREE_PAGE_HINT | DEFLATE_ON_OOM | (1 << 40);
        assert_eq!(negotiate(offered), VERSION_1 | STATS_VQ | DEFLATE_ON_OOM);
        assert_eq!(negotiate(MUST_TELL_HOST), MUST_TELL_HOST);
    }
}
