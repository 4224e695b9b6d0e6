//! Stage-1 translation for the firmware's own address space: a VMSAv8-64
//! table engine with contiguous-bit batching, its hardware traits, a linter
//! and host fakes.
//!
//! Arm ARM DDI 0487M.a.a (the revision every section number in this crate
//! is from), chapter D8 ("The AArch64 Virtual Memory System Architecture"): 4 KiB granule, 48-bit (start level 0) or 39-bit (start
//! level 1) input range, 48-bit output. The rules 1-8 of docs/architecture.md are
//! what the engine ([`Stage1`]) does, what the linter ([`Stage1::lint`])
//! checks on a tree, and what the fake (`fake::FakePlatform`, feature `testing`) checks on
//! the sequence of stores, TLBIs and barriers.
//!
//! On target the hal implements [`TableMemory`] and [`TranslationHw`] on one
//! object, builds `Stage1::new_detached(platform, VaSize::Bits48, features)`
//! (plain stores while no walker can see the tree), maps, calls
//! [`Stage1::set_live`], programs MAIR_EL1 = [`MAIR_VALUE`], TCR_EL1.T0SZ =
//! [`VaSize::t0sz`] of [`Stage1::va_size`] (the one place the VA size is
//! chosen; TG0 = 4 KiB, IPS >= 48 bits, HA/HD when [`Features::hafdbs`]) and
//! TTBR0_EL1 = [`Stage1::root`], and turns the MMU on. Tables written with
//! the data cache off must be cleaned to the point of coherency (or TCR's
//! IRGN0/ORGN0 set to non-cacheable) before the MMU walks them.
//!
//! Access and dirty state (D8.5.1, D8.5.2: AF, DBM and AP\[2\], software
//! dirty in bit 55) and the valid-entry counts kept by [`TableMemory`] are
//! described in docs/architecture.md, "Access and dirty state" and
//! "Valid-entry counts".

pub mod attributes;
pub mod descriptor;
pub mod engine;
pub mod error;
#[cfg(any(test, feature = "testing"))]
pub mod fake;
pub mod flush;
pub mod hardware;
pub mod lint;
pub mod tlbi;
pub mod unit;

#[cfg(test)]
mod tests;

pub use attributes::{Attributes, MemoryKind, Shareability, MAIR_VALUE};
pub use descriptor::Descriptor;
pub use engine::{Stage1, Translation, VaSize};
pub use error::Stage1Error;
pub use hardware::{Features, TableMemory, TableMemoryError, TlbiScope, TranslationHw};
pub use lint::{Rule, Violation};
pub use unit::{MappingSummary, MappingUnit};
