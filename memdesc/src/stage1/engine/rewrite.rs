//! Live rewrites: how one group of 16 entries goes from its old to its new
//! values while walkers may use it, how access/dirty state survives that,
//! and what waits for the TLB maintenance (regathering, freeing tables).
//!
//! Arm ARM DDI 0487M.a.a: D8.17.1 and D8.17.2 (break-before-make, FEAT_BBM
//! level 2), D8.5.1 and D8.5.2 (hardware updates of the access flag and
//! dirty state), D8.17 (TLB maintenance). Rules 3-7 of docs/architecture.md.

use super::fold::is_run;
use super::{LeafOp, Stage1, COUNT_UNKNOWN};
use crate::addr::PhysAddr;
use crate::stage1::attributes::Attributes;
use crate::stage1::descriptor::{level_size, AccessState, Descriptor, CONT_ENTRIES, ENTRIES};
use crate::stage1::error::Stage1Error;
use crate::stage1::flush::{TlbDebt, TlbSettled};
use crate::stage1::hardware::{TableMemory, TranslationHw};
use crate::stage1::unit::MappingUnit;

/// Tables an operation may need for splits: two boundaries, at most two
/// levels of block (1 GiB then 2 MiB) each.
pub(super) const STASH: usize = 4;
/// Freed tables waiting for the TLBI that makes freeing them safe.
const FREE_BATCH: usize = 16;
const _: () = assert!(FREE_BATCH >= CONT_ENTRIES, "a group's frees fit one batch");
/// Runs unfolded or re-formed in place, re-read after the TLBI.
const REGATHER_BATCH: usize = 8;

/// Where an entry lives: (table, index, level).
pub(super) type EntryAt = (PhysAddr, usize, u8);

/// Per-operation state besides the TLB debt (which the walks pass along by
/// value): tables to free, pre-allocated split tables, groups to regather.
pub(super) struct OpCtx {
    /// Each with the entry (table, index, level) of the block that replaced
    /// it, if any: its state is re-read into the block after the TLBI; and
    /// the VA of the live entry that linked it, if one did (the settled
    /// maintenance must cover it with a walk TLBI before the free).
    frees: [(PhysAddr, Option<EntryAt>, Option<u64>); FREE_BATCH],
    free_count: usize,
    pub(super) stash: [PhysAddr; STASH],
    pub(super) stash_count: usize,
    /// Some descriptor was written (the end of the operation publishes it).
    pub(super) wrote: bool,
    /// The largest unit the operation may create.
    pub(super) limit: MappingUnit,
    /// Why the walk could not do all of its work (a table it needed).
    pub(super) error: Option<Stage1Error>,
    /// Groups (table, first index, level) converted in place (FEAT_BBM
    /// level 2): until the TLBI completes, a walker may still record access
    /// or dirty state through the old run in any of their entries.
    regather: [EntryAt; REGATHER_BATCH],
    regather_count: usize,
    /// The proof of the last break-before-make window's maintenance (of
    /// the group just written), for the tables it unlinked.
    pub(super) broken: Option<TlbSettled>,
}

impl OpCtx {
    pub(super) const fn new(limit: MappingUnit) -> Self {
        Self {
            frees: [(PhysAddr(0), None, None); FREE_BATCH],
            free_count: 0,
            stash: [PhysAddr(0); STASH],
            stash_count: 0,
            wrote: false,
            limit,
            error: None,
            regather: [(PhysAddr(0), 0, 0); REGATHER_BATCH],
            regather_count: 0,
            broken: None,
        }
    }
}

/// An aligned group of 16 entries of one table.
#[derive(Clone, Copy, Debug)]
pub(super) struct Group {
    pub(super) table: PhysAddr,
    pub(super) level: u8,
    /// Index of the group's first entry.
    pub(super) first: usize,
    /// Input address the first entry translates.
    pub(super) va: u64,
    /// A walker may use the table.
    pub(super) live: bool,
}

/// The old and new values of a group's entries.
#[derive(Clone, Copy, Debug)]
pub(super) struct GroupChange {
    pub(super) old: [Descriptor; CONT_ENTRIES],
    pub(super) new: [Descriptor; CONT_ENTRIES],
    /// Set by [`Stage1::write_group`]: entries whose table became a block;
    /// the old table is re-read into the block after the TLBI (rule 3).
    pub(super) collapsed: u16,
}

impl GroupChange {
    pub(super) const fn new() -> Self {
        Self {
            old: [Descriptor::INVALID; CONT_ENTRIES],
            new: [Descriptor::INVALID; CONT_ENTRIES],
            collapsed: 0,
        }
    }
}

/// What replacing a live valid entry by another valid one takes (D8.17.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rewrite {
    /// Permissions, access/dirty: a store, then TLB maintenance.
    InPlace,
    /// Only the translation size (Contiguous bit, block <-> table of the
    /// same translation): in place with FEAT_BBM level 2, else a break.
    SizeOnly,
    /// Output address, memory type, shareability, nG, or one table for
    /// another: always break-before-make.
    Break,
}

/// The one rule for what a live change of `old` to `new` at `level` needs.
/// `op` tells whether a block split into a table keeps its memory type.
fn rewrite_kind(op: &LeafOp, old: Descriptor, new: Descriptor, level: u8) -> Rewrite {
    match (old.is_table(level), new.is_table(level)) {
        (true, true) if old == new => Rewrite::InPlace,
        (true, true) => Rewrite::Break,
        // A collapse: the block translates exactly as the table did.
        (true, false) => Rewrite::SizeOnly,
        (false, true) => match op {
            LeafOp::Protect(a)
                if !Attributes::from_descriptor(old).is_some_and(|o| o.same_type(a)) =>
            {
                Rewrite::Break
            }
            _ => Rewrite::SizeOnly,
        },
        (false, false) => {
            if old.output(level) != new.output(level)
                || old.attr_index() != new.attr_index()
                || (old.bits() ^ new.bits()) & (Descriptor::SH_MASK | Descriptor::NG) != 0
            {
                Rewrite::Break
            } else if old.is_contiguous() != new.is_contiguous() {
                Rewrite::SizeOnly
            } else {
                Rewrite::InPlace
            }
        }
    }
}

/// Folds AF/dirty that hardware set in `found` (but not in `seen`) into a
/// leaf `new` with the same output address.
fn absorb(new: Descriptor, seen: Descriptor, found: Descriptor, level: u8) -> Descriptor {
    if !new.is_leaf(level) || !found.is_leaf(level) || new.output(level) != found.output(level) {
        return new;
    }
    let gained = AccessState::gained(seen, found);
    if gained.is_none() {
        new
    } else {
        gained.added_to(new)
    }
}

impl<P: TableMemory + TranslationHw> Stage1<P> {
    /// Pays the TLB debt, publishes the writes, then regathers and frees
    /// what waited for that, and returns unused split tables.
    pub(super) fn finish(&mut self, ctx: &mut OpCtx, debt: TlbDebt) {
        let due = debt.is_due();
        let settled = debt.settle(&mut self.platform, self.features);
        if due {
            self.platform.isb();
        } else if ctx.wrote {
            self.platform.dsb_ishst();
            self.platform.isb();
        }
        self.regather(ctx, &settled);
        self.free_deferred(ctx, &settled);
        for i in 0..ctx.stash_count {
            // SAFETY: stash tables were allocated by this operation and
            // never linked into the tree, so nothing can cache them.
            unsafe { self.release(ctx.stash[i]) };
        }
        ctx.stash_count = 0;
    }

    /// Settles `debt` early (a batch is full) and discharges what waited.
    fn settle_now(&mut self, ctx: &mut OpCtx, debt: TlbDebt) -> TlbDebt {
        let settled = debt.settle(&mut self.platform, self.features);
        self.regather(ctx, &settled);
        self.free_deferred(ctx, &settled);
        TlbDebt::NONE
    }

    /// After the TLBI: ORs the state found in the leaves of each group
    /// converted in place into all of them (rule 3).
    fn regather(&mut self, ctx: &mut OpCtx, _settled: &TlbSettled) {
        let mut wrote = false;
        for r in 0..ctx.regather_count {
            let (table, first, level) = ctx.regather[r];
            let run = AccessState::gather(
                (0..CONT_ENTRIES).map(|k| self.read(table, first + k)),
                level,
            );
            for k in 0..CONT_ENTRIES {
                wrote |= self.spread_live(table, first + k, level, run);
            }
        }
        ctx.regather_count = 0;
        if wrote {
            self.platform.dsb_ishst();
        }
    }

    /// Frees the tables unlinked so far. `settled` is the proof that the
    /// TLB maintenance (`DSB ISHST`, TLBI, `DSB ISH`) after their unlinking
    /// has completed; a table that a live entry linked is freed only if
    /// that maintenance covered the entry with a walk TLBI, so no walker on
    /// any core can still use it.
    fn free_deferred(&mut self, ctx: &mut OpCtx, settled: &TlbSettled) {
        let mut wrote = false;
        for i in 0..ctx.free_count {
            let (table, parent, _) = ctx.frees[i];
            if let Some((parent_table, index, level)) = parent {
                // Rule 3: walkers may have written through the old table
                // until the TLBI that precedes this completed.
                let below = self.table_state(table, level + 1);
                wrote |= self.spread_live(parent_table, index, level, below);
            }
        }
        if wrote {
            self.platform.dsb_ishst();
        }
        for i in 0..ctx.free_count {
            let (table, _, linked_at) = ctx.frees[i];
            if linked_at.is_some_and(|va| !settled.covers_walk(va)) {
                // The maintenance did not remove the walk-cache entries
                // through this table's old link (an engine bug): a walker
                // may still use it, so it is kept (lost, never reused).
                debug_assert!(
                    false,
                    "{table:?} unlinked without a walk TLBI: {linked_at:x?} {settled:x?}"
                );
                continue;
            }
            // A table discarded whole (a full table collapsed into a block)
            // still counts its entries: the frame provider wants 0. A count
            // that cannot be read or zeroed keeps the table out of the
            // provider's hands (lost, never reused) and fails the operation.
            let left = self.valid_count(table);
            if left == COUNT_UNKNOWN {
                continue;
            }
            if left != 0 {
                // SAFETY: the table is still ours until it is freed below;
                // brings the count to exactly 0.
                if let Err(e) = unsafe { self.platform.adjust_valid(table, -(left as i32)) } {
                    self.note(e);
                    continue;
                }
            }
            // SAFETY: the descriptor pointing at this table was cleared or
            // replaced and the TLB debt covering it (non-last-level TLBI) was
            // settled before we got here and covered it (`settled`,
            // checked above), or the table was never linked into a live
            // tree (split then collapsed again, or no walker yet).
            unsafe { self.release(table) };
        }
        ctx.free_count = 0;
    }

    /// Makes room for `n` (at most a group's worth) more tables to free:
    /// settles the debt first when the batch would overflow. Called before
    /// the unlinks of those tables are recorded in the debt, so the proof
    /// that later discharges them is the one of the debt that records them.
    pub(super) fn room_for_frees(&mut self, ctx: &mut OpCtx, n: usize, debt: TlbDebt) -> TlbDebt {
        if ctx.free_count + n > FREE_BATCH {
            self.settle_now(ctx, debt)
        } else {
            debt
        }
    }

    /// Queues `table` (unlinked from `parent` if a block replaced it; from
    /// the live entry at `linked_at`, if one linked it) to be freed once
    /// the TLB debt is paid. The caller made room
    /// ([`Stage1::room_for_frees`]); if it did not, the debt is settled
    /// here and a linked table is not freed by that proof (kept, lost).
    pub(super) fn defer_free(
        &mut self,
        ctx: &mut OpCtx,
        table: PhysAddr,
        parent: Option<EntryAt>,
        linked_at: Option<u64>,
        mut debt: TlbDebt,
    ) -> TlbDebt {
        if ctx.free_count == FREE_BATCH {
            debug_assert!(false, "no room made for a table to free");
            debt = self.settle_now(ctx, debt);
        }
        ctx.frees[ctx.free_count] = (table, parent, linked_at);
        ctx.free_count += 1;
        debt
    }

    /// Replaces a live entry atomically. If hardware changed it since it was
    /// read (FEAT_HAFDBS), the AF/dirty it set are carried into `new` and the
    /// exchange retried. Returns the value replaced.
    pub(super) fn replace_live(
        &mut self,
        table: PhysAddr,
        index: usize,
        level: u8,
        mut current: Descriptor,
        mut new: Descriptor,
    ) -> Descriptor {
        if !self.live {
            // No walker: nothing can change the entry behind our back.
            self.write(table, index, new);
            return current;
        }
        loop {
            match self.cas(table, index, current, new) {
                Ok(()) => return current,
                Err(found) => {
                    new = self.carry_state(new, current, found, level);
                    current = found;
                }
            }
        }
    }

    /// Carries AF/dirty that hardware set in `found` (not in `seen`) into
    /// `new`: into the leaf itself, or into every leaf of a new split table.
    fn carry_state(
        &mut self,
        new: Descriptor,
        seen: Descriptor,
        found: Descriptor,
        level: u8,
    ) -> Descriptor {
        if new.is_table(level) && found.is_leaf(level) {
            return self.spread(new, AccessState::gained(seen, found), level);
        }
        absorb(new, seen, found, level)
    }

    /// Adds `state` to `d`, a new entry at `level` not yet written: to the
    /// leaf itself, or to every leaf below a new (unlinked) table.
    fn spread(&mut self, d: Descriptor, state: AccessState, level: u8) -> Descriptor {
        if state.is_none() {
            return d;
        }
        if d.is_leaf(level) {
            return state.added_to(d);
        }
        if d.is_table(level) {
            let table = d.table_address();
            for i in 0..ENTRIES {
                let child = self.read(table, i);
                let updated = self.spread(child, state, level + 1);
                if updated != child {
                    self.write(table, i, updated);
                }
            }
        }
        d
    }

    /// Adds `state` to the live entry `index` of `table` (a leaf, or every
    /// leaf below a table) with compare-and-swap: a state upgrade only,
    /// which needs no TLB maintenance.
    /// Returns whether anything was written.
    fn spread_live(
        &mut self,
        table: PhysAddr,
        index: usize,
        level: u8,
        state: AccessState,
    ) -> bool {
        if state.is_none() {
            return false;
        }
        let current = self.read(table, index);
        let mut wrote = false;
        if current.is_leaf(level) {
            let updated = state.added_to(current);
            if updated != current {
                self.replace_live(table, index, level, current, updated);
                wrote = true;
            }
        } else if current.is_table(level) {
            for i in 0..ENTRIES {
                wrote |= self.spread_live(current.table_address(), i, level + 1, state);
            }
        }
        wrote
    }

    /// Writes one group of 16 entries from `change.old` to `change.new`.
    ///
    /// Live entries whose change needs break-before-make are cleared first,
    /// then `DSB ISHST`, one TLBI pass over them, `DSB ISH`, and only then
    /// written (rules 4 and 6) -- unless FEAT_BBM level 2 covers the change,
    /// in which case they are rewritten in place. In-place changes add to
    /// the TLB debt, which is returned; changes touching a contiguous run
    /// add the whole run (rule 7). Sets `change.collapsed`: the entries
    /// where a table was replaced by a block, whose old tables must be
    /// re-read after the TLBI.
    pub(super) fn write_group(
        &mut self,
        ctx: &mut OpCtx,
        op: &LeafOp,
        group: &Group,
        change: &mut GroupChange,
        mut debt: TlbDebt,
    ) -> TlbDebt {
        let (table, level, first) = (group.table, group.level, group.first);
        let (old, new) = (&change.old, &mut change.new);
        let size = level_size(level);
        let mut delta = 0i32;
        change.collapsed = 0;
        if !group.live {
            for k in 0..CONT_ENTRIES {
                if new[k] != old[k] {
                    self.write(table, first + k, new[k]);
                    delta += new[k].is_valid() as i32 - old[k].is_valid() as i32;
                }
            }
            self.adjust(table, delta);
            return debt;
        }
        let mut current = *old;
        let mut kinds = [Rewrite::InPlace; CONT_ENTRIES];
        let mut to_break = 0u32;
        for k in 0..CONT_ENTRIES {
            if old[k].is_valid() && new[k].is_valid() && new[k] != old[k] {
                kinds[k] = rewrite_kind(op, old[k], new[k], level);
                if kinds[k] != Rewrite::InPlace {
                    to_break |= 1 << k;
                }
            }
        }
        let bbm2 = self.features.bbm_level >= 2 && !kinds.contains(&Rewrite::Break);
        if to_break != 0 && !bbm2 && old[0].is_leaf(level) && old[0].is_contiguous() {
            // Rule 4: a partial change unfolds the whole run, so every live
            // entry of the old run is cleared, not only the changed ones.
            for (k, d) in old.iter().enumerate() {
                if d.is_valid() {
                    to_break |= 1 << k;
                }
            }
        }
        // Rule 3: a run that is unfolded or re-formed hands the access and
        // dirty state of every old entry to every new one (the hardware may
        // have recorded a write to any page of a run in any of its entries).
        let convert = level >= 1 && is_run(old, level) != is_run(new, level);
        let mut gathered = AccessState::NONE;
        if convert {
            gathered = AccessState::gather(old.iter().copied(), level);
            // Before any break: a new table may lie inside the range the
            // break unmaps (the tree maps its own table frames), so every
            // new entry and table is complete before the window opens.
            for d in new.iter_mut() {
                *d = self.spread(*d, gathered, level);
            }
        }
        // State the hardware set after the gather above, found by a swap:
        // for the whole group (`late_*`) or for one new table (`carry`).
        // Written into the live entries after the make, as an upgrade that
        // needs no TLB maintenance, never into a table during the window.
        let mut late = AccessState::NONE;
        let mut carry = [AccessState::NONE; CONT_ENTRIES];
        let mut collapsed = 0u16;
        if to_break != 0 && !bbm2 {
            let (mut walk, mut finest) = (false, level);
            for k in 0..CONT_ENTRIES {
                if to_break & (1 << k) == 0 {
                    continue;
                }
                let found = self.replace_live(table, first + k, level, old[k], Descriptor::INVALID);
                if convert && found.is_leaf(level) {
                    // Exact: an invalid entry gets no hardware update.
                    late = late.or(AccessState::of(found).beyond(gathered));
                }
                if new[k].is_table(level) && found.is_leaf(level) {
                    carry[k] = AccessState::gained(old[k], found);
                } else {
                    new[k] = absorb(new[k], old[k], found, level);
                }
                if old[k].is_table(level) {
                    walk = true;
                    finest = level + 1;
                    if new[k].is_leaf(level) {
                        // Rule 3: the old table may have been written
                        // through until the TLBI completed; it is re-read
                        // into the block after the make (`free_deferred`),
                        // not here: it may lie inside the range unmapped now.
                        collapsed |= 1 << k;
                    }
                }
                current[k] = Descriptor::INVALID;
                delta -= 1;
            }
            let low = group.va + to_break.trailing_zeros() as u64 * size;
            let high = group.va + (32 - to_break.leading_zeros()) as u64 * size;
            // Paid at once (`DSB ISHST`, TLBI, `DSB ISH`); the proof
            // discharges the tables this break unlinked.
            let mut broken = TlbDebt::NONE;
            broken.add(low, high - low, finest, level, walk);
            ctx.broken = Some(broken.settle(&mut self.platform, self.features));
            ctx.wrote = true;
        }
        // Rule 7: a cached copy of any entry of a run may translate any page
        // of the run, so in-place changes of a run are paid for once, over
        // the whole run, below.
        let run_group = level >= 1 && (old[0].is_contiguous() || new[0].is_contiguous());
        let mut in_place = false;
        for k in 0..CONT_ENTRIES {
            if new[k] == current[k] {
                continue;
            }
            let entry_va = group.va + k as u64 * size;
            if current[k].is_valid() {
                let found = self.replace_live(table, first + k, level, current[k], new[k]);
                if convert && found.is_leaf(level) {
                    // In place (FEAT_BBM level 2): the hardware may have
                    // updated an entry after the gather above, also one
                    // that is now unmapped, so `regather` cannot see it.
                    late = late.or(AccessState::of(found).beyond(gathered));
                }
                in_place = true;
                if current[k].is_table(level) && new[k].is_leaf(level) {
                    collapsed |= 1 << k;
                }
                if current[k].is_table(level) {
                    if new[k].is_valid() {
                        debt.add(entry_va, size, level + 1, level, true);
                    } else {
                        debt.add_walk(entry_va);
                    }
                } else if !run_group {
                    debt.add(entry_va, size, level, level, false);
                }
            } else {
                self.write(table, first + k, new[k]);
            }
            delta += new[k].is_valid() as i32 - current[k].is_valid() as i32;
            ctx.wrote = true;
        }
        for (k, d) in new.iter().enumerate() {
            if d.is_valid() {
                self.spread_live(table, first + k, level, late.or(carry[k]));
            }
        }
        if in_place && run_group {
            debt.add(group.va, size * CONT_ENTRIES as u64, level, level, false);
        }
        if in_place && convert {
            // In place (FEAT_BBM level 2): the hardware may update any
            // entry through the old run until the TLBI has completed, also
            // entries already rewritten above; `regather` picks that up.
            if ctx.regather_count == REGATHER_BATCH {
                debt = self.settle_now(ctx, debt);
            }
            ctx.regather[ctx.regather_count] = (table, first, level);
            ctx.regather_count += 1;
        }
        self.adjust(table, delta);
        change.collapsed = collapsed;
        debt
    }

    /// Access and dirty state ORed over every leaf below `table` at `level`.
    fn table_state(&self, table: PhysAddr, level: u8) -> AccessState {
        let mut state = AccessState::NONE;
        for i in 0..ENTRIES {
            let d = self.read(table, i);
            if d.is_leaf(level) {
                state = state.or(AccessState::of(d));
            } else if d.is_table(level) {
                state = state.or(self.table_state(d.table_address(), level + 1));
            }
        }
        state
    }
}
