//! The hardware seen by the stage-1 engine: TLB maintenance and barriers
//! ([`TranslationHw`]) and translation table memory ([`TableMemory`]).
//!
//! Arm ARM DDI 0487M.a.a, D8.17.5 (TLB maintenance instructions: TLBI by VA,
//! last-level, TTL level hint, range TLBI with FEAT_TLBIRANGE) and D8.17.1,
//! D8.17.2 (break-before-make, FEAT_BBM). The `hal` crate implements both traits on target; the fakes in
//! `stage1::fake` (feature `testing`) implement them on the host and record what happened.

use crate::addr::{PhysAddr, VirtAddr};

/// CPU features that change which maintenance path the engine takes.
///
/// Probed by the hal from ID_AA64MMFR1_EL1 (HAFDBS, and the hal must have
/// set TCR_EL1.HA and HD), ID_AA64ISAR0_EL1.TLB (range) and ID_AA64MMFR2_EL1.BBM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Features {
    /// FEAT_HAFDBS with TCR_ELx.{HA,HD} set: hardware sets AF and clears
    /// AP\[2\] on the first write to a DBM entry.
    pub hafdbs: bool,
    /// FEAT_TLBIRANGE: `TLBI RVA(L)E1IS` may be used.
    pub tlbi_range: bool,
    /// FEAT_BBM level (0, 1 or 2). Level 2 lets the engine change the
    /// translation size (Contiguous bit, block <-> table) in place, followed
    /// by a TLBI, instead of break-before-make. Output address and memory
    /// type changes always break. Level 1 is treated as 0 (the engine does
    /// not use the nT-bit sequence).
    ///
    /// FEAT_BBM level 2 still permits the CPU to raise a TLB conflict abort
    /// while both sizes are cached (Linux only uses the path on CPUs known
    /// not to, "BBML2_NOABORT"). The hal should report 2 only for such CPUs
    /// (or QEMU TCG, which never raises it), or when its exception handler
    /// answers a TLB conflict abort (DFSC 0b110000) with `TLBI VMALLE1IS;
    /// DSB ISH; ISB` and a retry; otherwise report at most 1.
    pub bbm_level: u8,
}

impl Features {
    /// No optional feature (Cortex-A53/A72).
    pub const NONE: Self = Self {
        hafdbs: false,
        tlbi_range: false,
        bbm_level: 0,
    };
    /// All features the engine uses (QEMU `-cpu max`).
    pub const ALL: Self = Self {
        hafdbs: true,
        tlbi_range: true,
        bbm_level: 2,
    };
}

/// Which cached entries a TLBI must remove.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlbiScope {
    /// Only last-level (leaf) entries changed: `TLBI VALE1IS`/`RVALE1IS`.
    /// When false a table descriptor changed too, so walk-cache entries must
    /// go as well: `TLBI VAE1IS`/`RVAE1IS`.
    pub last_level_only: bool,
    /// TTL hint: every entry to remove is a leaf at this level. `None` when
    /// unknown or mixed (the hal then passes TTL = 0).
    pub level: Option<u8>,
}

/// TLB maintenance and barriers for the translation regime the engine edits.
///
/// All operations must be the Inner Shareable forms on target (`...IS`,
/// `DSB ISH`/`ISHST`): they reach the TLBs and walk caches of every core,
/// and the engine relies on that when it frees a table frame or reports an
/// unmap done (a `TlbSettled` proof is only as good as these). The engine calls
/// `dsb_ishst` between descriptor stores and the TLBIs that depend on them,
/// `dsb_ish` to wait for TLBI completion, and `isb` at the end of an
/// operation.
pub trait TranslationHw {
    /// Invalidates the entries translating `va` (`TLBI VA(L)E1IS`).
    fn tlbi_va(&mut self, va: VirtAddr, scope: TlbiScope);
    /// Invalidates the entries translating any address in `[va, va + len)`
    /// (`TLBI RVA(L)E1IS`; the hal splits into NUM/SCALE encodings). Only
    /// called when [`Features::tlbi_range`] is set. `va` and `len` are 4 KiB
    /// multiples.
    fn tlbi_va_range(&mut self, va: VirtAddr, len: u64, scope: TlbiScope);
    /// Invalidates every stage-1 entry of the regime (`TLBI VMALLE1IS`).
    fn tlbi_all(&mut self);
    /// `DSB ISHST`: descriptor stores are visible to table walks before what follows.
    fn dsb_ishst(&mut self);
    /// `DSB ISH`: earlier TLBIs have completed everywhere.
    fn dsb_ish(&mut self);
    /// `ISB`: later instructions see the new translations.
    fn isb(&mut self);
}

/// Why the table-memory provider failed a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableMemoryError {
    /// No table frame is left.
    OutOfMemory,
    /// The provider is in use (re-entered, for example from an exception
    /// handler that interrupted it).
    Busy,
    /// The provider cannot serve requests (not initialised, or it failed
    /// in a way none of the other variants names).
    Unavailable,
    /// `table` is not a table frame the provider handed out.
    NotATable {
        /// The address given.
        table: PhysAddr,
    },
    /// The valid-entry count of `table` would leave `0..=512`.
    CountOutOfRange {
        /// The table.
        table: PhysAddr,
    },
    /// The provider refused to take `table` back.
    FreeRefused {
        /// The table.
        table: PhysAddr,
    },
}

/// Translation table memory: frames for tables, and descriptor access.
///
/// Every descriptor read and write of the engine goes through here, so a
/// fake can count them. On target the hal converts a table's physical
/// address through its linear (or identity) map and uses volatile (and, for
/// [`TableMemory::compare_exchange_entry`], atomic) accesses; the table
/// frames are page-table frames of the page array, whose descriptor also
/// holds the valid-entry count of [`TableMemory::adjust_valid`].
///
/// # Safety
///
/// An implementation must guarantee that:
/// 1. `alloc_table` returns the physical address of a 4 KiB-aligned, zeroed
///    frame below 2^48 that nothing else uses until it is passed to
///    `free_table`, and a valid-entry count of 0 for it;
/// 2. `read_entry`/`write_entry`/`compare_exchange_entry` access entry
///    `index` of that frame and nothing else, with single-copy-atomic 64-bit
///    accesses;
/// 3. `compare_exchange_entry` is an atomic compare-and-swap (hardware may
///    update AF/AP\[2\] of live entries concurrently under FEAT_HAFDBS).
pub unsafe trait TableMemory {
    /// Allocates a zeroed table frame.
    ///
    /// # Errors
    ///
    /// [`TableMemoryError::OutOfMemory`] when none is left; any other
    /// variant when the provider cannot serve the request.
    fn alloc_table(&mut self) -> Result<PhysAddr, TableMemoryError>;

    /// Returns a table frame to the provider.
    ///
    /// # Errors
    ///
    /// Any [`TableMemoryError`] but `OutOfMemory` when the provider cannot
    /// take it back ([`TableMemoryError::NotATable`],
    /// [`TableMemoryError::FreeRefused`], ...). The frame is then lost to
    /// the engine (it never uses it again) and the error reaches the caller
    /// of the operation.
    ///
    /// # Safety
    ///
    /// `table` came from `alloc_table`, is no longer referenced by any
    /// descriptor, no TLB or walk cache can still hold entries read from it,
    /// its valid-entry count is 0 (the engine zeroes the count of a table it
    /// discards whole, such as a full table collapsed into a block), and it
    /// is not used again.
    unsafe fn free_table(&mut self, table: PhysAddr) -> Result<(), TableMemoryError>;

    /// Reads entry `index` of `table`.
    ///
    /// # Safety
    ///
    /// `table` came from `alloc_table` and was not freed; `index < 512`.
    unsafe fn read_entry(&self, table: PhysAddr, index: usize) -> u64;

    /// Writes entry `index` of `table` (single-copy atomic store).
    ///
    /// # Safety
    ///
    /// As for [`TableMemory::read_entry`]; the write must be legal for the
    /// live translation (break-before-make is the caller's job).
    unsafe fn write_entry(&mut self, table: PhysAddr, index: usize, value: u64);

    /// Writes `count` consecutive entries from `index`: entry `index + k`
    /// gets `first + k * step`. The engine uses it for runs of new leaves
    /// and split tables (entries that are invalid, or in a table not yet
    /// linked); an implementation may convert the table address once and
    /// store in a loop. Each entry counts as one descriptor write.
    ///
    /// # Safety
    ///
    /// As for [`TableMemory::write_entry`], with `index + count <= 512`.
    unsafe fn fill_entries(
        &mut self,
        table: PhysAddr,
        index: usize,
        first: u64,
        step: u64,
        count: usize,
    ) {
        for k in 0..count {
            // SAFETY: forwarded from the caller, `index + k < 512`.
            unsafe { self.write_entry(table, index + k, first + k as u64 * step) }
        }
    }

    /// Atomically replaces entry `index` with `new` if it still holds
    /// `current`.
    ///
    /// # Errors
    ///
    /// The value found when it is not `current` (nothing was written).
    ///
    /// # Safety
    ///
    /// As for [`TableMemory::write_entry`].
    unsafe fn compare_exchange_entry(
        &mut self,
        table: PhysAddr,
        index: usize,
        current: u64,
        new: u64,
    ) -> Result<(), u64>;

    /// Adds `delta` to the valid-entry count of `table` and returns the new
    /// count (`delta == 0` reads it). The engine frees a non-root table when
    /// its count drops to zero, so a count that cannot be read or changed
    /// must be an error, never a made-up value: the engine then keeps the
    /// table and reports the error.
    ///
    /// # Errors
    ///
    /// [`TableMemoryError::CountOutOfRange`] when the count would leave
    /// `0..=512`, [`TableMemoryError::NotATable`] for a frame that is not a
    /// table, any other variant when the provider cannot serve the request.
    ///
    /// # Safety
    ///
    /// `table` came from `alloc_table` and was not freed; the count never
    /// leaves `0..=512` when the engine is the only writer.
    unsafe fn adjust_valid(&mut self, table: PhysAddr, delta: i32)
        -> Result<u32, TableMemoryError>;
}
