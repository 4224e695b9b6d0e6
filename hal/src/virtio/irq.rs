//! Interrupts of virtio-mmio transports (virtio 1.2, 4.2.2, 4.2.3.5): the
//! device raises a level interrupt and says why in InterruptStatus (bit 0
//! used buffer, bit 1 configuration change); the driver writes the bits it
//! has seen to InterruptACK, which lowers the line.
//!
//! A transport's interrupt is attached with [`attach`]: one shared handler
//! finds the transport by INTID, reads InterruptStatus and acknowledges
//! exactly those bits in the handler (so a level interrupt cannot storm),
//! and records them for the service loop in an [`Events`] handle, which
//! the loop sleeps on with `hal::irq::wait_until(|| events.pending())`.

use crate::irq::published::Table;
use crate::irq::{Interrupt, Intid, IrqError};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// InterruptStatus bit: the device used a buffer.
pub const USED_BUFFER: u32 = 1 << 0;
/// InterruptStatus bit: the configuration changed.
pub const CONFIG_CHANGE: u32 = 1 << 1;

const SLOTS: usize = 4;

/// Which transport each INTID belongs to (its window's base), published
/// for the handler only once complete (`crate::irq::published`).
static TABLE: Table<SLOTS> = Table::new();

/// What the handler recorded, per entry of [`TABLE`].
struct Slot {
    events: AtomicU32,
    count: AtomicU64,
}

static SLOTS_STATE: [Slot; SLOTS] = [const {
    Slot {
        events: AtomicU32::new(0),
        count: AtomicU64::new(0),
    }
}; SLOTS];

/// Why [`attach`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, defmt::Format)]
pub enum VirtioIrqError {
    /// All transport slots are taken.
    TableFull,
    /// The GIC refused.
    Irq(IrqError),
    /// The INTID (an LPI) or the window's address does not fit the table.
    Unrepresentable(crate::irq::published::PublishError),
}

/// What a transport's interrupts said since the last [`Events::take`].
#[derive(Debug)]
pub struct Events {
    slot: &'static Slot,
}

impl core::fmt::Debug for Slot {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Slot")
    }
}

impl Events {
    /// Whether an interrupt arrived that was not taken yet.
    pub fn pending(&self) -> bool {
        // Acquire: pairs with the AcqRel fetch_or of `events` in `on_irq`.
        self.slot.events.load(Ordering::Acquire) != 0
    }

    /// The InterruptStatus bits seen since the last call, cleared.
    pub fn take(&self) -> u32 {
        // AcqRel: the Acquire half pairs with the fetch_or of `events` in
        // `on_irq`; the Release half with that fetch_or's Acquire half, so
        // an interrupt after the clear sees what the taker did before it.
        self.slot.events.swap(0, Ordering::AcqRel)
    }

    /// Interrupts taken since [`attach`].
    pub fn count(&self) -> u64 {
        self.slot.count.load(Ordering::Relaxed)
    }
}

fn on_irq(intid: Intid) {
    // Found only once published: the base comes with the INTID (the
    // table's Acquire load pairs with the Release store in `publish`).
    let Some((i, base)) = TABLE.find(intid.raw()) else {
        return;
    };
    let s = &SLOTS_STATE[i];
    // SAFETY: `base` is a transport window `attach` was given by its owner
    // (claimed and mapped Device memory for good, see `super::claim`);
    // InterruptStatus (0x60) and InterruptACK (0x64) are 32-bit registers
    // whose read has no side effect and whose write only lowers the
    // interrupt for the bits written, so using them here beside the
    // transport's own accesses is harmless.
    let status = unsafe {
        let status = core::ptr::read_volatile((base + 0x60) as *const u32);
        if status != 0 {
            core::ptr::write_volatile((base + 0x64) as *mut u32, status);
        }
        status
    };
    s.count.fetch_add(1, Ordering::Relaxed);
    // AcqRel: the Release half pairs with the Acquire load in
    // `Events::pending` and the swap in `Events::take`; the Acquire half
    // with that swap's Release half.
    s.events.fetch_or(status, Ordering::AcqRel);
}

/// Attaches `irq` (the transport's interrupt from the device tree) for the
/// transport whose window starts at `base` and enables it. The handler is
/// registered first (a second transport on the same INTID is refused
/// there), then the entry is published complete, then the interrupt is
/// enabled, so the handler never finds a half-filled entry.
pub(crate) fn attach(base: u64, irq: &Interrupt) -> Result<Events, VirtioIrqError> {
    let claim = TABLE.claim().ok_or(VirtioIrqError::TableFull)?;
    let slot = &SLOTS_STATE[claim.index()];
    // Release: pairs with the Acquire load / swap of `events` in
    // `Events::pending` / `take` (a stale event of the entry's last
    // holder is gone before the new holder's handle exists).
    slot.events.store(0, Ordering::Release);
    // Dropping the unpublished claim frees the entry.
    crate::irq::register(irq.intid, on_irq).map_err(VirtioIrqError::Irq)?;
    let index = match claim.publish(irq.intid.raw(), base) {
        Ok(i) => i,
        Err(e) => {
            let _ = crate::irq::unregister(irq.intid);
            return Err(VirtioIrqError::Unrepresentable(e));
        }
    };
    if let Err(e) = crate::irq::enable(irq) {
        let _ = crate::irq::unregister(irq.intid);
        TABLE.release(index);
        return Err(VirtioIrqError::Irq(e));
    }
    Ok(Events { slot })
}
