//! Stage-1 translation for the firmware's own address space: a VMSAv8-64
//! table engine with contiguous-bit batching, its hardware traits, a linter
//! and host fakes.
//!
//! Arm ARM DDI 0487, chapter D8 ("The AArch64 Virtual Memory System
//! Architecture"): 4 KiB granule, 48-bit (start level 0) or 39-bit (start
//! level 1) input range, 48-bit output. DESIGN.md "Stage-1 rules" 1-8 are
//! what the engine ([`Stage1`]) does, what the linter ([`Stage1::lint`])
//! checks on a tree, and what the fake ([`fake::FakePlatform`]) checks on
//! the sequence of stores, TLBIs and barriers.
//!
//! On target the hal implements [`TableMemory`] and [`TranslationHw`] on one
//! object, builds `Stage1::new(platform, VaSize::Bits48, features)`, maps,
//! programs MAIR_EL1 = [`MAIR_VALUE`], TCR_EL1.T0SZ = [`VaSize::t0sz`] and
//! TTBR0_EL1 = [`Stage1::root`], and turns the MMU on.

pub mod attributes;
pub mod descriptor;
pub mod engine;
pub mod error;
pub mod fake;
pub mod flush;
pub mod hardware;
pub mod lint;
pub mod unit;

#[cfg(test)]
mod tests;

pub use attributes::{Attributes, MemoryKind, Shareability, MAIR_VALUE};
pub use descriptor::Descriptor;
pub use engine::{Stage1, Translation, VaSize};
pub use error::Stage1Error;
pub use hardware::{Features, TableMemory, TlbiScope, TranslationHw};
pub use lint::{Rule, Violation};
pub use unit::{MappingSummary, MappingUnit};
