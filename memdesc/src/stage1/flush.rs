//! TLB maintenance batching: the "TLB debt" an operation accumulates and
//! how it is paid.
//!
//! Arm ARM DDI 0487M.a.a, D8.17 (TLB maintenance) and D8.17.5.2 (range
//! TLBI, FEAT_TLBIRANGE). An operation records every live entry it changed in
//! place or cleared; at the end it pays with one TLBI pass bracketed by
//! `DSB ISHST` (stores visible to walks first) and `DSB ISH` (TLBIs done).
//! Break-before-make pays its own debt immediately, before the "make".

use super::descriptor::level_size;
use super::hardware::{Features, TlbiScope, TranslationHw};
use crate::addr::VirtAddr;

/// Above this many per-VA TLBIs one `TLBI VMALLE1IS` is cheaper (Linux uses
/// the same order of magnitude, MAX_DVM_OPS).
pub const MAX_TLBI_BY_VA: u64 = 512;

/// Invalidates `[lo, hi)` whose changed entries are leaves at levels
/// `finest..=coarsest` (numerically `coarsest <= finest`); `walk` when a
/// table descriptor changed (walk caches must go too). Returns true when
/// it invalidated everything instead (`TLBI VMALLE1IS`).
///
/// Without FEAT_TLBIRANGE one `TLBI VA` per finest-level entry is needed: a
/// contiguous run may be cached entry by entry, so one TLBI per run is not
/// enough (D8.7.1).
pub fn invalidate<H: TranslationHw + ?Sized>(
    hw: &mut H,
    features: Features,
    lo: u64,
    hi: u64,
    finest: u8,
    coarsest: u8,
    walk: bool,
) -> bool {
    let scope = TlbiScope {
        last_level_only: !walk,
        level: if !walk && finest == coarsest {
            Some(finest)
        } else {
            None
        },
    };
    if features.tlbi_range {
        hw.tlbi_va_range(VirtAddr(lo), hi - lo, scope);
        return false;
    }
    let stride = level_size(finest);
    let lo = lo & !(stride - 1);
    let count = (hi - lo).div_ceil(stride);
    if count >= MAX_TLBI_BY_VA {
        hw.tlbi_all();
        return true;
    }
    let mut va = lo;
    while va < hi {
        hw.tlbi_va(VirtAddr(va), scope);
        va += stride;
    }
    false
}

/// Live entries changed but not yet invalidated: one merged VA span.
///
/// A token, neither `Copy` nor `Clone`: the engine's walks take the debt
/// by value and return it, so dropping it on the floor is an
/// `unused_must_use` warning (an error under the CI's `-D warnings`), and
/// only [`TlbDebt::settle`] consumes it.
///
/// ```compile_fail
/// #![deny(unused_must_use)]
/// use memdesc::stage1::flush::TlbDebt;
/// fn rewrite() -> TlbDebt {
///     TlbDebt::NONE
/// }
/// rewrite(); // a debt dropped: does not compile
/// ```
#[derive(Debug)]
#[must_use = "a TLB debt must be passed on or settled before the operation returns"]
pub struct TlbDebt {
    lo: u64,
    hi: u64,
    finest: u8,
    coarsest: u8,
    walk: bool,
    any: bool,
}

impl TlbDebt {
    /// No debt.
    pub const NONE: Self = Self {
        lo: u64::MAX,
        hi: 0,
        finest: 0,
        coarsest: 3,
        walk: false,
        any: false,
    };

    /// True when something must be invalidated.
    #[inline]
    pub const fn is_due(&self) -> bool {
        self.any
    }

    /// Records a changed entry `[va, va + len)` whose cached leaves are at
    /// levels `coarsest..=finest`; `walk` when a table descriptor was
    /// removed or replaced.
    #[inline]
    pub fn add(&mut self, va: u64, len: u64, finest: u8, coarsest: u8, walk: bool) {
        self.lo = self.lo.min(va);
        self.hi = self.hi.max(va + len);
        self.finest = self.finest.max(finest);
        self.coarsest = self.coarsest.min(coarsest);
        self.walk |= walk;
        self.any = true;
    }

    /// Records that a table descriptor whose range contains `va` was
    /// removed, so walk-cache entries must go. One non-last-level TLBI at any
    /// address in the table's range removes them; when the table became empty
    /// because this operation cleared its last leaf, `va` is already inside
    /// the span and nothing widens.
    #[inline]
    pub fn add_walk(&mut self, va: u64) {
        let va = va & !(level_size(3) - 1);
        if !(self.lo <= va && va < self.hi) {
            self.lo = self.lo.min(va);
            self.hi = self.hi.max(va + level_size(3));
            if !self.any {
                self.finest = 3;
                self.coarsest = 3;
            }
        }
        self.walk = true;
        self.any = true;
    }

    /// Pays the debt: `DSB ISHST`, one TLBI pass, `DSB ISH` (nothing when
    /// nothing is due). The returned proof says what was invalidated; it
    /// discharges the free of an unlinked table only if that covered the
    /// table's range with a walk TLBI, so a proof of no debt
    /// (`TlbDebt::NONE.settle(..)`) discharges nothing.
    pub fn settle<H: TranslationHw + ?Sized>(self, hw: &mut H, features: Features) -> TlbSettled {
        if !self.any {
            return TlbSettled {
                lo: u64::MAX,
                hi: 0,
                walk: false,
                all: false,
            };
        }
        hw.dsb_ishst();
        let all = invalidate(
            hw,
            features,
            self.lo,
            self.hi,
            self.finest,
            self.coarsest,
            self.walk,
        );
        hw.dsb_ish();
        TlbSettled {
            lo: self.lo,
            hi: self.hi,
            walk: self.walk,
            all,
        }
    }
}

/// Proof that a [`TlbDebt`] was settled: every TLBI for the entries it
/// recorded was issued and a `DSB ISH` has waited for them on every core of
/// the Inner Shareable domain. Only [`TlbDebt::settle`] makes one, and it
/// carries what was invalidated: [`TlbSettled::covers_walk`] is true only
/// for addresses whose walk-cache entries that maintenance removed. It is
/// neither `Clone` nor constructible elsewhere, so a proof cannot outlive
/// its settle to discharge a table unlinked after it, nor be made up:
///
/// ```compile_fail,E0451
/// use memdesc::stage1::flush::TlbSettled;
/// // No proof without the maintenance: the fields are private.
/// let proof = TlbSettled { lo: 0, hi: u64::MAX, walk: true, all: true };
/// ```
///
/// ```compile_fail,E0599
/// use memdesc::stage1::flush::TlbSettled;
/// fn keep(p: &TlbSettled) -> TlbSettled {
///     TlbSettled::clone(p) // a proof kept for later: not Clone
/// }
/// ```
///
/// And the proof of no debt covers nothing:
///
/// ```
/// use memdesc::stage1::flush::TlbDebt;
/// use memdesc::stage1::{Features, TlbiScope, TranslationHw};
/// use memdesc::VirtAddr;
/// struct NoHw;
/// impl TranslationHw for NoHw {
///     fn tlbi_va(&mut self, _: VirtAddr, _: TlbiScope) {}
///     fn tlbi_va_range(&mut self, _: VirtAddr, _: u64, _: TlbiScope) {}
///     fn tlbi_all(&mut self) {}
///     fn dsb_ishst(&mut self) {}
///     fn dsb_ish(&mut self) {}
///     fn isb(&mut self) {}
/// }
/// let proof = TlbDebt::NONE.settle(&mut NoHw, Features::NONE);
/// assert!(!proof.covers_walk(0x4000_0000));
/// let mut debt = TlbDebt::NONE;
/// debt.add_walk(0x4000_0000);
/// let proof = debt.settle(&mut NoHw, Features::NONE);
/// assert!(proof.covers_walk(0x4000_0000));
/// assert!(!proof.covers_walk(0x8000_0000));
/// ```
#[derive(Debug)]
pub struct TlbSettled {
    lo: u64,
    hi: u64,
    walk: bool,
    all: bool,
}

impl TlbSettled {
    /// True when the settled maintenance removed walk-cache entries (a
    /// TLBI that is not last-level only) for `va`, or everything.
    #[inline]
    pub fn covers_walk(&self, va: u64) -> bool {
        self.all || (self.walk && self.lo <= va && va < self.hi)
    }
}
