//! The fake's record of what the engine did: an event log in a lent buffer
//! and operation counters.
//!
//! One [`Event`] per descriptor store, TLBI (Arm ARM DDI 0487M.a.a, C5.5), DSB
//! or ISB (B2.3), and table allocation or free, in program order.

use crate::addr::{PhysAddr, VirtAddr};
use crate::stage1::hardware::TlbiScope;

/// One recorded operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A descriptor store (plain or compare-and-swap).
    Write {
        /// Table frame.
        table: PhysAddr,
        /// Entry index.
        index: u16,
        /// Value before.
        old: u64,
        /// Value after.
        new: u64,
    },
    /// `TLBI VA(L)E1IS`.
    TlbiVa {
        /// Address.
        va: VirtAddr,
        /// Scope.
        scope: TlbiScope,
    },
    /// `TLBI RVA(L)E1IS`.
    TlbiRange {
        /// First address.
        va: VirtAddr,
        /// Length in bytes.
        len: u64,
        /// Scope.
        scope: TlbiScope,
    },
    /// `TLBI VMALLE1IS`.
    TlbiAll,
    /// `DSB ISHST`.
    DsbIshst,
    /// `DSB ISH`.
    DsbIsh,
    /// `ISB`.
    Isb,
    /// A table frame was allocated.
    Alloc(PhysAddr),
    /// A table frame was freed.
    Free(PhysAddr),
}

impl Event {
    /// True for any TLBI.
    pub const fn is_tlbi(&self) -> bool {
        matches!(
            self,
            Self::TlbiVa { .. } | Self::TlbiRange { .. } | Self::TlbiAll
        )
    }
}

/// Operation counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Descriptor reads.
    pub reads: u64,
    /// Descriptor writes (successful stores and compare-and-swaps).
    pub writes: u64,
    /// `TLBI` by VA.
    pub tlbi_va: u64,
    /// `TLBI` by range.
    pub tlbi_range: u64,
    /// `TLBI VMALLE1IS`.
    pub tlbi_all: u64,
    /// `DSB ISHST`.
    pub dsb_ishst: u64,
    /// `DSB ISH`.
    pub dsb_ish: u64,
    /// `ISB`.
    pub isb: u64,
    /// Table frames allocated.
    pub allocs: u64,
    /// Table frames freed.
    pub frees: u64,
}

impl Counters {
    /// All TLBI instructions.
    pub const fn tlbi(&self) -> u64 {
        self.tlbi_va + self.tlbi_range + self.tlbi_all
    }

    /// All DSB instructions.
    pub const fn dsb(&self) -> u64 {
        self.dsb_ishst + self.dsb_ish
    }
}

/// The event log: a lent buffer, filled in order; events past its end are
/// counted, not kept.
pub(super) struct Log<'a> {
    buffer: &'a mut [Event],
    len: usize,
    dropped: u64,
}

impl<'a> Log<'a> {
    pub(super) fn new(buffer: &'a mut [Event]) -> Self {
        Self {
            buffer,
            len: 0,
            dropped: 0,
        }
    }

    #[inline]
    pub(super) fn record(&mut self, e: Event) {
        if self.len < self.buffer.len() {
            self.buffer[self.len] = e;
            self.len += 1;
        } else {
            self.dropped += 1;
        }
    }

    pub(super) fn events(&self) -> &[Event] {
        &self.buffer[..self.len]
    }

    pub(super) fn dropped(&self) -> u64 {
        self.dropped
    }

    pub(super) fn clear(&mut self) {
        self.len = 0;
        self.dropped = 0;
    }
}
