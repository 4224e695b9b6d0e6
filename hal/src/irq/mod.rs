//! Interrupts: INTIDs, the GIC and the timer in the device tree, and (on
//! the target) the GIC driver, the IRQ entry and a fixed handler table
//! (Arm GIC Architecture Specification IHI 0069, 4.1 "Interrupt handling":
//! acknowledge, handle, end).
//!
//! Pure parts ([`intid`], [`devicetree`]) build and are tested on the host.
//!
//! On the target, after [`init`]: [`attach`] a handler to an interrupt from
//! the device tree, unmask IRQs, and sleep with [`wait_until`]. An IRQ
//! taken at EL1 (from the main thread on SP_EL0 or a handler on SP_EL1)
//! enters [`handle_pending`]: it acknowledges one interrupt, calls the
//! handler registered for its INTID, and ends it. An INTID with no handler is
//! counted, disabled (so a level interrupt cannot storm) and ended; an
//! acknowledge that finds nothing is counted as spurious. Handlers run with
//! IRQs masked, on the exception stack, and may call everything here. The
//! boot core takes the interrupts: the state here is held with IRQs masked
//! and a busy flag that refuses a second holder. Secondary cores keep IRQs
//! masked; their one interrupt is the wake-up of [`wake`], which they set
//! up and acknowledge on their own registers.
//!
//! A service loop (the balloon's, for example) does, after
//! `firmware::interrupts::init()` returned `irqs`:
//!
//! ```text
//! static EVENTS: AtomicU32 = AtomicU32::new(0);
//! fn on_balloon(_: Intid) {
//!     // read InterruptStatus, write InterruptACK (the line is level), note why
//!     EVENTS.fetch_or(status, Ordering::Relaxed);
//! }
//! let irq = irqs.device_interrupt("virtio,mmio", transport.region.base)?;
//! hal::irq::attach(&irq, on_balloon)?;
//! hal::irq::unmask_irqs();
//! loop {
//!     hal::irq::wait_until(|| EVENTS.load(Ordering::Relaxed) != 0);
//!     let events = EVENTS.swap(0, Ordering::Relaxed);
//!     // serve config changes and used buffers
//! }
//! ```

// The driver runs on the target only; host builds test its INTID mapping.
#[cfg_attr(not(hw), allow(dead_code))]
mod bcm2836;
pub mod devicetree;
pub mod intid;
pub mod published;
pub mod source;

#[cfg(hw)]
mod cpu;
#[cfg(hw)]
mod entry;
#[cfg(hw)]
mod gic;
#[cfg(hw)]
pub mod secure;
#[cfg(hw)]
pub mod wake;

#[cfg(hw)]
pub use cpu::{mask_irqs, restore_irqs, unmask_irqs, wait_for_interrupt, wait_until, without_irqs};
pub use devicetree::{GicDescription, GicVersion, Interrupt, Trigger};
#[cfg(hw)]
pub use gic::GicError;
pub use intid::{Intid, IntidClass, IntidError};
pub use source::{describe, ControllerSource, Description};

#[cfg(hw)]
use core::{
    cell::UnsafeCell,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
};

/// Handlers the table holds at once.
pub const MAX_HANDLERS: usize = 16;

/// An interrupt handler: called with the INTID it was registered for, IRQs
/// masked. A handler for a level-sensitive interrupt must quiet the device
/// (acknowledge it in the device's own registers) before returning, or it is
/// taken again at once.
pub type Handler = fn(Intid);

/// Why an interrupt operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(hw, derive(defmt::Format))]
pub enum IrqError {
    /// [`init`] has not run (or failed).
    NotInitialised,
    /// [`init`] ran already.
    AlreadyInitialised,
    /// The GIC or the table is in use further up this call chain.
    Busy,
    /// The GIC refused.
    #[cfg(hw)]
    Gic(GicError),
    /// All [`MAX_HANDLERS`] slots are taken.
    TableFull,
    /// This INTID has a handler already.
    AlreadyRegistered(Intid),
    /// This INTID has no handler.
    NotRegistered(Intid),
}

#[cfg(hw)]
impl From<GicError> for IrqError {
    fn from(e: GicError) -> Self {
        Self::Gic(e)
    }
}

/// Counts of what [`handle_pending`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(hw, derive(defmt::Format))]
pub struct IrqStats {
    /// Interrupts dispatched to a handler.
    pub handled: u64,
    /// Acknowledges that returned 1023 (or a reserved value).
    pub spurious: u64,
    /// Interrupts with no handler (each then disabled).
    pub unhandled: u64,
}

/// A value used only with IRQs masked, re-entry refused: the exclusion a
/// single core needs between the main thread and interrupt handlers.
#[cfg(hw)]
struct IrqCell<T> {
    busy: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: `value` is reached only through `with`, which masks IRQs (the
// only concurrency on one core) and refuses re-entry through `busy`, so no
// two references to it exist at once.
#[cfg(hw)]
unsafe impl<T: Send> Sync for IrqCell<T> {}

#[cfg(hw)]
impl<T> IrqCell<T> {
    const fn new(value: T) -> Self {
        Self {
            busy: AtomicBool::new(false),
            value: UnsafeCell::new(value),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> Result<R, IrqError> {
        without_irqs(|| {
            // Acquire: pairs with the Release store that clears `busy`
            // below, so this holder sees the previous holder's writes.
            if self.busy.swap(true, Ordering::Acquire) {
                return Err(IrqError::Busy);
            }
            // SAFETY: `busy` was clear and is now ours, and IRQs are
            // masked: nothing else holds a reference into `value` until we
            // clear it below.
            let r = f(unsafe { &mut *self.value.get() });
            // Release: pairs with the Acquire swap of the next holder.
            self.busy.store(false, Ordering::Release);
            Ok(r)
        })
    }
}

// SAFETY: the GIC's MMIO pointers are used by one core only (the others
// are parked), always through `IrqCell::with`.
#[cfg(hw)]
unsafe impl Send for gic::Gic {}

#[cfg(hw)]
static GIC: IrqCell<Option<gic::Gic>> = IrqCell::new(None);
#[cfg(hw)]
static HANDLERS: IrqCell<[Option<(Intid, Handler)>; MAX_HANDLERS]> =
    IrqCell::new([None; MAX_HANDLERS]);
#[cfg(hw)]
static VERSION: IrqCell<Option<GicVersion>> = IrqCell::new(None);
#[cfg(hw)]
static HANDLED: AtomicU64 = AtomicU64::new(0);
#[cfg(hw)]
static SPURIOUS: AtomicU64 = AtomicU64::new(0);
#[cfg(hw)]
static UNHANDLED: AtomicU64 = AtomicU64::new(0);

/// Brings the GIC the device tree describes up: every interrupt disabled,
/// Non-secure group, priority mask open, this PE's interface enabled. IRQs
/// stay masked at the PE until the caller unmasks them.
///
/// # Safety
///
/// `desc`'s register windows are mapped as Device memory at their physical
/// addresses, and from now on nothing but this module touches them.
#[cfg(hw)]
pub unsafe fn init(desc: &GicDescription) -> Result<GicVersion, IrqError> {
    GIC.with(|slot| {
        if slot.is_some() {
            return Err(IrqError::AlreadyInitialised);
        }
        // SAFETY: the caller's contract is `Gic::new`'s.
        *slot = Some(unsafe { gic::Gic::new(desc) }?);
        Ok(())
    })??;
    VERSION.with(|v| *v = Some(desc.version()))?;
    wake::publish(desc);
    Ok(desc.version())
}

/// The GIC version [`init`] brought up.
#[cfg(hw)]
pub fn version() -> Option<GicVersion> {
    VERSION.with(|v| *v).ok().flatten()
}

#[cfg(hw)]
fn gic_op<R>(f: impl FnOnce(&mut gic::Gic) -> Result<R, GicError>) -> Result<R, IrqError> {
    GIC.with(|slot| {
        slot.as_mut()
            .ok_or(IrqError::NotInitialised)
            .and_then(|g| Ok(f(g)?))
    })?
}

/// Puts `handler` in the table for `intid` (does not enable the interrupt).
#[cfg(hw)]
pub fn register(intid: Intid, handler: Handler) -> Result<(), IrqError> {
    HANDLERS.with(|table| {
        if table.iter().flatten().any(|&(i, _)| i == intid) {
            return Err(IrqError::AlreadyRegistered(intid));
        }
        let slot = table
            .iter_mut()
            .find(|s| s.is_none())
            .ok_or(IrqError::TableFull)?;
        *slot = Some((intid, handler));
        Ok(())
    })?
}

/// Removes the handler for `intid` (disable the interrupt first).
#[cfg(hw)]
pub fn unregister(intid: Intid) -> Result<(), IrqError> {
    HANDLERS.with(|table| {
        let slot = table
            .iter_mut()
            .find(|s| s.is_some_and(|(i, _)| i == intid))
            .ok_or(IrqError::NotRegistered(intid))?;
        *slot = None;
        Ok(())
    })?
}

/// Configures the interrupt as the device tree describes it (trigger,
/// priority, route to this PE) and enables it in the GIC.
#[cfg(hw)]
pub fn enable(interrupt: &Interrupt) -> Result<(), IrqError> {
    gic_op(|g| g.enable(interrupt.intid, interrupt.trigger))
}

/// Disables the interrupt in the GIC.
#[cfg(hw)]
pub fn disable(intid: Intid) -> Result<(), IrqError> {
    gic_op(|g| g.disable(intid))
}

/// [`register`] then [`enable`]; on failure nothing stays registered.
#[cfg(hw)]
pub fn attach(interrupt: &Interrupt, handler: Handler) -> Result<(), IrqError> {
    register(interrupt.intid, handler)?;
    enable(interrupt).inspect_err(|_| {
        let _ = unregister(interrupt.intid);
    })
}

/// [`disable`] then [`unregister`].
#[cfg(hw)]
pub fn detach(intid: Intid) -> Result<(), IrqError> {
    disable(intid)?;
    unregister(intid)
}

/// Sends software-generated interrupt `sgi` to this PE.
#[cfg(hw)]
pub fn send_sgi_to_self(sgi: Intid) -> Result<(), IrqError> {
    gic_op(|g| g.send_sgi_to_self(sgi))
}

/// What [`handle_pending`] has seen since boot.
#[cfg(hw)]
pub fn stats() -> IrqStats {
    IrqStats {
        handled: HANDLED.load(Ordering::Relaxed),
        spurious: SPURIOUS.load(Ordering::Relaxed),
        unhandled: UNHANDLED.load(Ordering::Relaxed),
    }
}

/// Acknowledges, dispatches and ends one pending interrupt; returns its
/// INTID, or `None` if nothing was pending (counted as spurious). The IRQ
/// vector calls this; with IRQs masked it can also be called to poll.
#[cfg(hw)]
pub fn handle_pending() -> Option<Intid> {
    let ack = match GIC.with(|slot| slot.as_mut().map(gic::Gic::acknowledge)) {
        Ok(Some(Some(ack))) => ack,
        _ => {
            SPURIOUS.fetch_add(1, Ordering::Relaxed);
            return None;
        }
    };
    let handled = match ack.intid {
        None => {
            SPURIOUS.fetch_add(1, Ordering::Relaxed);
            None
        }
        Some(intid) => {
            let handler = HANDLERS
                .with(|t| {
                    t.iter()
                        .flatten()
                        .find(|&&(i, _)| i == intid)
                        .map(|&(_, h)| h)
                })
                .ok()
                .flatten();
            match handler {
                Some(h) => {
                    h(intid);
                    HANDLED.fetch_add(1, Ordering::Relaxed);
                }
                None => {
                    UNHANDLED.fetch_add(1, Ordering::Relaxed);
                    defmt::warn!("irq: no handler for {}, disabling it", intid);
                    let _ = disable(intid);
                }
            }
            Some(intid)
        }
    };
    let _ = GIC.with(|slot| {
        if let Some(g) = slot.as_mut() {
            g.end(ack);
        }
    });
    handled
}
