//! Interrupt bring-up: the interrupt controller and the generic timer from
//! the device tree (else the board description), the controller's register
//! windows mapped as device memory, and `hal::irq` initialised. A service loop then attaches its handlers and sleeps with
//! `hal::irq::wait_until`.

use crate::mm::MmError;
use hal::irq::devicetree::{self, IrqDtError, TimerInterrupts};
use hal::irq::{ControllerSource, GicDescription, Interrupt, IrqError};
use hal::memory::GicInitError;

/// What [`init`] found.
#[derive(Debug, Clone, Copy)]
pub struct Interrupts {
    /// The interrupt controller.
    pub gic: GicDescription,
    /// The generic timer's interrupts.
    pub timer: TimerInterrupts,
    /// Where both came from.
    pub source: ControllerSource,
}

impl Interrupts {
    /// The first interrupt of the boot tree's enabled device with
    /// `compatible` whose first `reg` region starts at `base`: for a
    /// virtio-mmio transport, `device_interrupt("virtio,mmio",
    /// transport.region.base)`. Pass the result to `hal::irq::attach`.
    pub fn device_interrupt(&self, compatible: &str, base: u64) -> Result<Interrupt, IrqDtError> {
        devicetree::device_interrupt(boot_blob()?, &self.gic, compatible, base)
    }
}

/// Why interrupts could not be brought up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptsError {
    /// The device tree's interrupt description is unusable.
    DeviceTree(IrqDtError),
    /// Mapping the GIC's registers failed.
    Map(MmError),
    /// A GIC register window overlaps RAM.
    WindowInRam {
        /// The window's base.
        base: u64,
    },
    /// The GIC refused.
    Irq(IrqError),
}

impl defmt::Format for InterruptsError {
    fn format(&self, f: defmt::Formatter<'_>) {
        match self {
            Self::DeviceTree(e) => defmt::write!(f, "device tree: {}", e),
            Self::Map(e) => defmt::write!(f, "mapping the GIC: {}", defmt::Debug2Format(e)),
            Self::Irq(e) => defmt::write!(f, "GIC: {}", e),
            Self::WindowInRam { base } => {
                defmt::write!(f, "GIC window at {=u64:#x} overlaps RAM", base)
            }
        }
    }
}

/// The boot device tree as bytes.
fn boot_blob() -> Result<&'static [u8], IrqDtError> {
    hal::irq::secure::boot_blob()
}

/// Finds the interrupt controller and the timer (in the boot device tree,
/// else in the board description), maps the controller and brings it up
/// (every interrupt disabled, IRQs still masked at the PE). Call once,
/// after [`crate::init`] (the MMU must be on).
pub fn init() -> Result<Interrupts, InterruptsError> {
    let found = hal::irq::describe(boot_blob().ok(), &hal::board::CURRENT)
        .map_err(InterruptsError::DeviceTree)?;
    let (gic, timer) = (found.gic, found.timer);
    if hal::irq::version().is_some() {
        return Err(InterruptsError::Irq(IrqError::AlreadyInitialised));
    }
    let version = hal::memory::init_interrupts(&gic).map_err(|e| match e {
        GicInitError::WindowInRam { base } => InterruptsError::WindowInRam { base },
        GicInitError::Map(e) => InterruptsError::Map(e.into()),
        GicInitError::Irq(e) => InterruptsError::Irq(e),
    })?;
    let from = match found.source {
        ControllerSource::DeviceTree => "the device tree",
        ControllerSource::Board => "the board description",
    };
    defmt::info!(
        "interrupts: {} at {=u64:#x} (from {=str}), timer INTID {=u32}",
        version,
        gic.base(),
        from,
        timer.physical.intid.raw()
    );
    Ok(Interrupts {
        gic,
        timer,
        source: found.source,
    })
}
