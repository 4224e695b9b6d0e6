//! Stage-1 translation for the firmware's own address space: a VMSAv8-64
//! table engine with contiguous-bit batching, its hardware traits, a linter
//! and host fakes.
//!
//! Arm ARM DDI 0487, chapter D8 ("The AArch64 Virtual Memory System
//! Architecture"): 4 KiB granule, 48-bit (start level 0) or 39-bit (start
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
//! # Access and dirty state (D8.4.3, D8.4.6)
//!
//! * Every new leaf is written with AF = 1, so CPUs without hardware access
//!   flag management never take an Access flag fault on fresh mappings.
//!   [`Stage1::test_and_clear_young`] clears AF over the whole unit (run or
//!   block) in place; with FEAT_HAFDBS the hardware sets it again on the next
//!   access, without it the next access faults and the fault handler must set
//!   it (as Linux does on CPUs without HA).
//! * Dirty follows Linux: with FEAT_HAFDBS a writable entry is DBM = 1 and
//!   starts writable-clean (AP\[2\] = 1); the first write makes the hardware
//!   clear AP\[2\], so "DBM && !AP\[2\]" is dirty. Read-only entries keep dirty
//!   in software bit 55 ([`Descriptor::SW_DIRTY`]), so [`Stage1::wrprotect`]
//!   moves "DBM && !AP\[2\]" into bit 55 and loses nothing; making the entry
//!   writable again moves it back into AP\[2\]. Without FEAT_HAFDBS nothing
//!   records a write, so writable entries are AP\[2\] = 0 with bit 55 set:
//!   conservatively dirty.
//! * Hardware changes AF and AP\[2\] of live entries behind the engine's back,
//!   so once the tree is live ([`Stage1::set_live`]) every rewrite of a
//!   valid entry is a compare-and-swap; when it fails, the AF/dirty the
//!   hardware set are carried into the new value (or into every leaf of a
//!   new split table) and the swap retried. Reads gather AF and dirty over
//!   all 16 entries of a run: the hardware may record an access to any page
//!   of a run in any one of its entries.
//! * So every rewrite that unfolds or re-forms a run ORs the state of all
//!   its old entries into every new entry (and into every leaf of a table
//!   that replaces one of them): gathered from the values the break cleared
//!   (exact: an invalid entry gets no update), or, in place under FEAT_BBM
//!   level 2, from the entries before the rewrite and once more after the
//!   TLBI, since a walker may still use the old run until then. A table
//!   collapsed into a block is re-read after the TLBI the same way (before
//!   the block is written on the break path, into the block before the
//!   table is freed on the in-place path). Setting AF or the dirty state is
//!   an upgrade that needs no TLB maintenance.
//!
//! # Valid-entry counts
//!
//! The count of valid entries per table lives with the platform
//! ([`TableMemory::adjust_valid`]): on target in the page array's PageTable
//! descriptor of the table frame, in the fake next to the frame. The engine
//! adjusts it on every store that changes validity, frees a table when it
//! reaches zero and only scans a table for a block collapse when it is 512.
//! A count the platform cannot read or change is an error
//! ([`TableMemoryError`]): the engine then neither frees nor collapses that
//! table and the operation returns [`Stage1Error::TableMemory`]. The linter
//! cross-checks the count against the table.

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
