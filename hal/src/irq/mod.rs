//! Interrupts: INTIDs, the GIC and the timer in the device tree, and (on
//! the target) the GIC driver, the IRQ entry and a fixed handler table.
//!
//! Pure parts ([`intid`], [`devicetree`]) build and are tested on the host.

pub mod devicetree;
pub mod intid;

pub use devicetree::{GicDescription, GicVersion, Interrupt, Trigger};
pub use intid::{Intid, IntidClass, IntidError};
