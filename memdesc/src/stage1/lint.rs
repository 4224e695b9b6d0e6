//! The table linter: walks a whole tree and reports every breach of the
//! stage-1 rules of docs/architecture.md as data.
//!
//! Arm ARM DDI 0487M.a.a: D8.3 (descriptor formats, RES0 fields, block output
//! address alignment), D8.4.1 (permissions: W^X, no executable Device memory)
//! and D8.7.1 (Contiguous bit: 16 entries, aligned output, consecutive
//! addresses, identical attributes, all or none of the group). Rules 4-7
//! are about ordering over time and are checked by the fake's break-before-make checker
//! (`stage1::fake`, feature `testing`) instead.
//! It only reads descriptors, so the firmware can run it on target after
//! any operation and log what it finds.

use super::attributes::MemoryKind;
use super::descriptor::{
    level_shift, level_size, Descriptor, DescriptorKind, CONT_ENTRIES, ENTRIES,
};
use super::engine::{run_eligible, RunShape, Stage1, COUNT_UNKNOWN};
use super::hardware::{TableMemory, TranslationHw};
use super::unit::MappingUnit;
use crate::addr::{PhysAddr, VirtAddr};

/// Which rule an entry breaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// Rule 1: a contiguous run whose output address is not aligned to the run size.
    ContRunMisaligned,
    /// Rule 2: some but not all 16 entries of an aligned group carry the Contiguous bit.
    ContRunPartial,
    /// Rule 2: run entries whose output addresses are not consecutive.
    ContRunNotConsecutive,
    /// Rule 2: run entries whose attributes or permissions differ.
    ContRunAttributesDiffer,
    /// A writable and executable leaf (W^X).
    WriteAndExecute,
    /// An executable Device leaf.
    ExecutableDevice,
    /// bits\[1:0\] = 0b01 where no block is allowed (level 0 or level 3).
    ReservedDescriptor,
    /// A RES0 field is set (OA\[51:48\]/GP) or SH has the reserved value 0b01.
    ReservedBitsSet,
    /// A block whose output address has bits below the block size set.
    BlockOutputMisaligned,
    /// AttrIndx outside the engine's MAIR layout.
    UnknownMemoryAttribute,
    /// The table-memory valid-entry count disagrees with the table.
    ValidCountMismatch {
        /// The count kept by the platform.
        recorded: u32,
        /// Valid entries found.
        actual: u32,
    },
    /// The table-memory provider could not report the valid-entry count.
    ValidCountUnreadable,
    /// A non-root table with no valid entry is still linked.
    EmptyTable,
    /// Advisory: 16 entries eligible for a run are not folded (rule 8).
    MissedFold,
    /// Advisory: a full table that could be one block is not collapsed.
    MissedCollapse,
}

impl Rule {
    /// A short stable name, for logs that cannot use `Debug` (defmt).
    pub const fn name(&self) -> &'static str {
        match self {
            Self::ContRunMisaligned => "cont-run-misaligned",
            Self::ContRunPartial => "cont-run-partial",
            Self::ContRunNotConsecutive => "cont-run-not-consecutive",
            Self::ContRunAttributesDiffer => "cont-run-attributes-differ",
            Self::WriteAndExecute => "write-and-execute",
            Self::ExecutableDevice => "executable-device",
            Self::ReservedDescriptor => "reserved-descriptor",
            Self::ReservedBitsSet => "reserved-bits-set",
            Self::BlockOutputMisaligned => "block-output-misaligned",
            Self::UnknownMemoryAttribute => "unknown-memory-attribute",
            Self::ValidCountMismatch { .. } => "valid-count-mismatch",
            Self::ValidCountUnreadable => "valid-count-unreadable",
            Self::EmptyTable => "empty-table",
            Self::MissedFold => "missed-fold",
            Self::MissedCollapse => "missed-collapse",
        }
    }

    /// True for findings that are suboptimal but architecturally correct.
    pub const fn is_advisory(&self) -> bool {
        matches!(self, Self::MissedFold | Self::MissedCollapse)
    }
}

/// One finding of the linter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Violation {
    /// First input address of the offending entry (or run).
    pub va: VirtAddr,
    /// Table level of the entry.
    pub level: u8,
    /// The rule broken.
    pub rule: Rule,
}

impl<P: TableMemory + TranslationHw> Stage1<P> {
    /// Walks the whole tree, calls `sink` for every finding, and returns how
    /// many findings were not advisory. Never writes a descriptor.
    pub fn lint(&mut self, sink: &mut dyn FnMut(Violation)) -> usize {
        let mut errors = 0;
        let (root, level) = (self.root(), self.va_size().start_level());
        self.lint_table(root, level, 0, true, &mut |v| {
            if !v.rule.is_advisory() {
                errors += 1;
            }
            sink(v);
        });
        self.clear_fault();
        errors
    }

    fn lint_table(
        &mut self,
        table: PhysAddr,
        level: u8,
        base: u64,
        is_root: bool,
        sink: &mut dyn FnMut(Violation),
    ) {
        let sh = level_shift(level);
        let size = level_size(level);
        let mut actual = 0u32;
        for i in 0..ENTRIES {
            let d = self.read(table, i);
            let va = base + ((i as u64) << sh);
            let mut report = |rule| {
                sink(Violation {
                    va: VirtAddr(va),
                    level,
                    rule,
                })
            };
            if d.is_valid() {
                actual += 1;
            }
            match d.kind(level) {
                DescriptorKind::Invalid => {}
                DescriptorKind::Reserved => report(Rule::ReservedDescriptor),
                DescriptorKind::Table(next) => {
                    if d.has(Descriptor::HIGH_RES0) {
                        report(Rule::ReservedBitsSet);
                    }
                    let count = self.valid_count(next);
                    if count as usize == ENTRIES
                        && self
                            .collapse_candidate(next, level, va, MappingUnit::LARGEST)
                            .is_some()
                    {
                        report(Rule::MissedCollapse);
                    }
                    self.lint_table(next, level + 1, va, false, sink);
                }
                DescriptorKind::Leaf => {
                    if d.has(Descriptor::HIGH_RES0)
                        || (d.bits() & Descriptor::SH_MASK) >> Descriptor::SH_SHIFT == 0b01
                    {
                        report(Rule::ReservedBitsSet);
                    }
                    if d.bits() & Descriptor::OA_MASK & (size - 1) != 0 {
                        report(Rule::BlockOutputMisaligned);
                    }
                    match MemoryKind::from_mair_index(d.attr_index()) {
                        None => report(Rule::UnknownMemoryAttribute),
                        Some(kind) => {
                            if kind.is_device() && d.is_executable() {
                                report(Rule::ExecutableDevice);
                            }
                        }
                    }
                    if d.is_writable() && d.is_executable() {
                        report(Rule::WriteAndExecute);
                    }
                }
            }
        }
        if level >= 1 {
            for g in (0..ENTRIES).step_by(CONT_ENTRIES) {
                self.lint_group(table, level, base + ((g as u64) << sh), g, sink);
            }
        }
        let recorded = self.valid_count(table);
        if recorded == COUNT_UNKNOWN {
            sink(Violation {
                va: VirtAddr(base),
                level,
                rule: Rule::ValidCountUnreadable,
            });
        } else if recorded != actual {
            sink(Violation {
                va: VirtAddr(base),
                level,
                rule: Rule::ValidCountMismatch { recorded, actual },
            });
        }
        if !is_root && actual == 0 {
            sink(Violation {
                va: VirtAddr(base),
                level,
                rule: Rule::EmptyTable,
            });
        }
    }

    fn lint_group(
        &mut self,
        table: PhysAddr,
        level: u8,
        group_va: u64,
        first: usize,
        sink: &mut dyn FnMut(Violation),
    ) {
        let mut run = [Descriptor::INVALID; CONT_ENTRIES];
        for (k, d) in run.iter_mut().enumerate() {
            *d = self.read(table, first + k);
        }
        let report = |sink: &mut dyn FnMut(Violation), rule| {
            sink(Violation {
                va: VirtAddr(group_va),
                level,
                rule,
            })
        };
        let cont = run
            .iter()
            .filter(|d| d.is_leaf(level) && d.is_contiguous())
            .count();
        if cont == 0 {
            if run_eligible(&run, level) {
                report(sink, Rule::MissedFold);
            }
            return;
        }
        if cont != CONT_ENTRIES {
            report(sink, Rule::ContRunPartial);
            return;
        }
        // Every entry is a leaf here, so the shape exists.
        let Some(shape) = RunShape::around(run[0], 0, level) else {
            return;
        };
        if !shape.is_aligned(CONT_ENTRIES) {
            report(sink, Rule::ContRunMisaligned);
        }
        if run.iter().enumerate().any(|(k, d)| !shape.follows(k, *d)) {
            report(sink, Rule::ContRunNotConsecutive);
        }
        if run.iter().any(|d| !shape.same_key(*d)) {
            report(sink, Rule::ContRunAttributesDiffer);
        }
    }
}
