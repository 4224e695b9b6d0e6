//! Walking the tree: the [`Cursor`] that holds where a walk stands, and the
//! walks built on it (leaf lookup, range scans, the summary, the two phases
//! of `map` and the group-by-group rewrite of every other operation).
//!
//! Arm ARM DDI 0487M.a.a, D8.2.8 (translation using the 4 KiB granule: 512
//! entries per table, levels 0-3) and D8.7.1 (16-entry Contiguous groups).
//! The walks recurse at most four levels; each level's state is one
//! cursor value, a small copy on the stack.

use super::rewrite::{Group, GroupChange, OpCtx};
use super::{LeafOp, Stage1};
use crate::addr::{PhysAddr, PAGE_SIZE};
use crate::stage1::attributes::Attributes;
use crate::stage1::descriptor::{
    leaf_allowed, level_shift, level_size, Descriptor, DescriptorKind, CONT_ENTRIES, ENTRIES,
};
use crate::stage1::flush::TlbDebt;
use crate::stage1::hardware::{TableMemory, TranslationHw};
use crate::stage1::unit::{MappingSummary, MappingUnit};

/// Deepest walk: levels 0 to 3.
const LEVELS: usize = 4;

/// Where a walk stands: the tables from the root down to the current one
/// (`path`), the current `level`, the input address that entry 0 of the
/// current table translates, and the part `[start, end)` of the
/// operation's range that lies inside the current table. Moving down one
/// level ([`Cursor::down`]) narrows the range to one entry.
#[derive(Clone, Copy, Debug)]
pub(in crate::stage1) struct Cursor {
    /// `path[l]`: the table at level `l`, from the root's level to `level`.
    path: [PhysAddr; LEVELS],
    level: u8,
    table_va: u64,
    start: u64,
    end: u64,
    /// A walker may use the current table (false inside a new table that
    /// is not linked yet).
    live: bool,
}

impl Cursor {
    /// A cursor on the root table (at `level`) covering `[start, end)`.
    pub(in crate::stage1) fn new(root: PhysAddr, level: u8, start: u64, end: u64) -> Self {
        let mut path = [PhysAddr(0); LEVELS];
        path[level as usize] = root;
        Self {
            path,
            level,
            table_va: 0,
            start,
            end,
            live: true,
        }
    }

    /// The current table.
    #[inline]
    pub(in crate::stage1) fn table(&self) -> PhysAddr {
        self.path[self.level as usize]
    }

    /// The current level.
    #[inline]
    pub(in crate::stage1) fn level(&self) -> u8 {
        self.level
    }

    /// True when a walker may use the current table.
    #[inline]
    pub(super) fn is_live(&self) -> bool {
        self.live
    }

    /// Bytes one entry of the current table translates.
    #[inline]
    fn entry_size(&self) -> u64 {
        level_size(self.level)
    }

    /// Index of the entry of the current table that translates `va`.
    #[inline]
    pub(in crate::stage1) fn index_of(&self, va: u64) -> usize {
        entry_index(va, self.level)
    }

    /// The entries of the current table that overlap the range.
    #[inline]
    pub(in crate::stage1) fn indices(&self) -> core::ops::Range<usize> {
        let shift = level_shift(self.level);
        let first = ((self.start - self.table_va) >> shift) as usize;
        let last = ((self.end - 1 - self.table_va) >> shift) as usize;
        first..(last + 1).min(ENTRIES)
    }

    /// First input address entry `index` translates.
    #[inline]
    pub(in crate::stage1) fn entry_va(&self, index: usize) -> u64 {
        self.table_va + ((index as u64) << level_shift(self.level))
    }

    /// The part of the range inside entry `index`: `(start, end)`.
    #[inline]
    fn clipped(&self, index: usize) -> (u64, u64) {
        let va = self.entry_va(index);
        (self.start.max(va), self.end.min(va + self.entry_size()))
    }

    /// True when the range covers all of entry `index`.
    #[inline]
    fn covers(&self, index: usize) -> bool {
        let va = self.entry_va(index);
        self.start <= va && va + self.entry_size() <= self.end
    }

    /// The cursor one level down, in `child` (the table of entry `index`),
    /// with the range narrowed to that entry.
    #[inline]
    pub(in crate::stage1) fn down(&self, index: usize, child: PhysAddr) -> Self {
        let (start, end) = self.clipped(index);
        let mut path = self.path;
        path[self.level as usize + 1] = child;
        Self {
            path,
            level: self.level + 1,
            table_va: self.entry_va(index),
            start,
            end,
            live: self.live,
        }
    }

    /// The same position in a table no walker can see yet.
    #[inline]
    fn detached(mut self) -> Self {
        self.live = false;
        self
    }
}

/// Index of the entry translating `va` in its table at `level`.
#[inline]
pub(in crate::stage1) fn entry_index(va: u64, level: u8) -> usize {
    ((va >> level_shift(level)) & (ENTRIES as u64 - 1)) as usize
}

/// A leaf found by [`Stage1::find_leaf`]: where it is and its value.
#[derive(Clone, Copy, Debug)]
pub(in crate::stage1) struct LeafAt {
    /// The table holding it.
    pub table: PhysAddr,
    /// Its index in that table.
    pub index: usize,
    /// Its level.
    pub level: u8,
    /// Its value.
    pub descriptor: Descriptor,
}

impl<P: TableMemory + TranslationHw> Stage1<P> {
    /// The leaf translating `va`, if any.
    pub(in crate::stage1) fn find_leaf(&self, va: u64) -> Option<LeafAt> {
        if va >= self.va_size.limit() {
            return None;
        }
        let mut cursor = Cursor::new(self.root, self.va_size.start_level(), va, va + 1);
        loop {
            let index = cursor.index_of(va);
            let d = self.read(cursor.table(), index);
            match d.kind(cursor.level()) {
                DescriptorKind::Table(next) => cursor = cursor.down(index, next),
                DescriptorKind::Leaf => {
                    return Some(LeafAt {
                        table: cursor.table(),
                        index,
                        level: cursor.level(),
                        descriptor: d,
                    })
                }
                _ => return None,
            }
        }
    }

    /// First address of the cursor's range covered by a leaf
    /// (`want_mapped`) or by no leaf (`!want_mapped`).
    pub(super) fn first_where(&self, cursor: &Cursor, want_mapped: bool) -> Option<u64> {
        for index in cursor.indices() {
            let (start, _) = cursor.clipped(index);
            match self.read(cursor.table(), index).kind(cursor.level()) {
                DescriptorKind::Table(next) => {
                    let below = cursor.down(index, next);
                    if let Some(va) = self.first_where(&below, want_mapped) {
                        return Some(va);
                    }
                }
                DescriptorKind::Leaf if want_mapped => return Some(start),
                DescriptorKind::Leaf => {}
                _ if !want_mapped => return Some(start),
                _ => {}
            }
        }
        None
    }

    /// Adds the units and tables of `table` (at `level`) and below to `summary`.
    pub(super) fn summarize(&self, table: PhysAddr, level: u8, summary: &mut MappingSummary) {
        summary.tables += 1;
        for i in 0..ENTRIES {
            let d = self.read(table, i);
            match d.kind(level) {
                DescriptorKind::Table(next) => self.summarize(next, level + 1, summary),
                DescriptorKind::Leaf => {
                    let contiguous = d.is_contiguous();
                    if !contiguous || i % CONT_ENTRIES == 0 {
                        summary.add(MappingUnit::of_leaf(level, contiguous), 1);
                    }
                }
                _ => {}
            }
        }
    }

    /// Phase one of `map`: writes leaves and creates tables, entry by entry,
    /// into entries validated to be invalid; the output address is the
    /// input address plus `offset` (wrapping). On `Err(va)` no table could be had for `va`;
    /// everything below `va` is mapped. The TLB debt (of a table removed
    /// again on the way back) is returned either way.
    pub(super) fn map_level(
        &mut self,
        ctx: &mut OpCtx,
        attrs: &Attributes,
        cursor: &Cursor,
        offset: u64,
        mut debt: TlbDebt,
    ) -> (Result<(), u64>, TlbDebt) {
        let (table, level) = (cursor.table(), cursor.level());
        let entries = cursor.indices();
        let size = cursor.entry_size();
        let leaf_ok = leaf_allowed(level) && ctx.limit.allows_leaf(level);
        let contiguous_ok = leaf_ok && ctx.limit.allows_contiguous(level);
        let run_size = size * CONT_ENTRIES as u64;
        let template = self.leaf_template(attrs, level);
        let mut added = 0i32;
        let mut i = entries.start;
        while i < entries.end {
            let entry_va = cursor.entry_va(i);
            let output = entry_va.wrapping_add(offset);
            // A pinned chunk (`Stage1::pin_small`) under a block entry
            // stops the bulk leaves there: that entry becomes a table.
            let pinned_stop = |last: usize| match self
                .pinned_in(entry_va, entry_va.wrapping_add((last - i) as u64 * size))
            {
                Some(chunk) => i + (chunk.saturating_sub(entry_va) >> level_shift(level)) as usize,
                None => last,
            };
            let last_leaf = if leaf_ok && cursor.covers(i) && output & (size - 1) == 0 {
                let last =
                    (i + ((cursor.end - entry_va) >> level_shift(level)) as usize).min(entries.end);
                if size > 16 * PAGE_SIZE {
                    pinned_stop(last)
                } else {
                    last
                }
            } else {
                i
            };
            if last_leaf > i {
                // Every following entry up to the last one wholly inside
                // the range is a leaf too (same alignment): write them in
                // bulk, whole aligned groups with the Contiguous bit.
                let last = last_leaf;
                let group_output = output.wrapping_sub((i % CONT_ENTRIES) as u64 * size);
                let runs_from = if contiguous_ok && group_output & (run_size - 1) == 0 {
                    i.next_multiple_of(CONT_ENTRIES).min(last)
                } else {
                    last
                };
                let at = |index: usize| PhysAddr(output + (index - i) as u64 * size);
                self.fill(table, i, template.with_output(at(i)), size, runs_from - i);
                let whole = (last - runs_from) / CONT_ENTRIES * CONT_ENTRIES;
                let contiguous = template.with(Descriptor::CONT, true);
                self.fill(
                    table,
                    runs_from,
                    contiguous.with_output(at(runs_from)),
                    size,
                    whole,
                );
                let tail = runs_from + whole;
                self.fill(
                    table,
                    tail,
                    template.with_output(at(tail)),
                    size,
                    last - tail,
                );
                added += (last - i) as i32;
                i = last;
                ctx.wrote = true;
                continue;
            }
            let d = self.read(table, i);
            let child = if let DescriptorKind::Table(next) = d.kind(level) {
                next
            } else {
                let next = match self.platform.alloc_table() {
                    Ok(next) => next,
                    Err(e) => {
                        self.adjust(table, added);
                        ctx.error = Some(e.into());
                        return (Err(cursor.clipped(i).0), debt);
                    }
                };
                self.write(table, i, Descriptor::table(next));
                added += 1;
                ctx.wrote = true;
                next
            };
            let below = cursor.down(i, child);
            let (mapped, owed) = self.map_level(ctx, attrs, &below, offset, debt);
            debt = owed;
            if let Err(stopped_at) = mapped {
                self.adjust(table, added);
                if self.valid_count(child) == 0 {
                    let current = self.read(table, i);
                    self.replace_live(table, i, level, current, Descriptor::INVALID);
                    self.adjust(table, -1);
                    debt = self.room_for_frees(ctx, 1, debt);
                    debt.add_walk(entry_va);
                    let linked_at = cursor.is_live().then_some(entry_va);
                    debt = self.defer_free(ctx, child, None, linked_at, debt);
                }
                return (Err(stopped_at), debt);
            }
            i += 1;
        }
        self.adjust(table, added);
        (Ok(()), debt)
    }

    /// Applies `op` to the cursor's range, group of 16 by group of 16,
    /// folding, unfolding, splitting and collapsing as needed, and returns
    /// the TLB debt of what it changed in place.
    pub(super) fn modify_level(
        &mut self,
        ctx: &mut OpCtx,
        op: &LeafOp,
        cursor: &Cursor,
        mut debt: TlbDebt,
    ) -> TlbDebt {
        let (table, level) = (cursor.table(), cursor.level());
        let entries = cursor.indices();
        let mut first = entries.start & !(CONT_ENTRIES - 1);
        while first < entries.end {
            // Entries of this group inside the range are read first; the
            // others only when a fold decision needs them.
            let in_range =
                entries.start.max(first) - first..entries.end.min(first + CONT_ENTRIES) - first;
            let mut change = GroupChange::new();
            for k in in_range.clone() {
                change.old[k] = self.read(table, first + k);
            }
            change.new = change.old;
            let mut to_free = [None; CONT_ENTRIES];
            for k in in_range.clone() {
                let index = first + k;
                let d = change.old[k];
                match d.kind(level) {
                    DescriptorKind::Table(child)
                        if matches!(op, LeafOp::Refold)
                            && cursor.covers(index)
                            && self.valid_count(child) as usize == ENTRIES
                            && self
                                .collapse_candidate(child, level, cursor.entry_va(index), ctx.limit)
                                .is_some() =>
                    {
                        // Collapsing directly beats folding its runs first.
                        if let Some(block) =
                            self.collapse_candidate(child, level, cursor.entry_va(index), ctx.limit)
                        {
                            change.new[k] = block;
                            to_free[k] = Some(child);
                        }
                    }
                    DescriptorKind::Table(child) => {
                        debt = self.modify_level(ctx, op, &cursor.down(index, child), debt);
                        let valid = self.valid_count(child);
                        if valid == 0 {
                            change.new[k] = Descriptor::INVALID;
                            to_free[k] = Some(child);
                        } else if valid as usize == ENTRIES {
                            if let Some(block) = self.collapse_candidate(
                                child,
                                level,
                                cursor.entry_va(index),
                                ctx.limit,
                            ) {
                                change.new[k] = block;
                                to_free[k] = Some(child);
                            }
                        }
                    }
                    DescriptorKind::Leaf if cursor.covers(index) => {
                        change.new[k] = self.apply(op, d, level)
                    }
                    DescriptorKind::Leaf if !matches!(op, LeafOp::Refold) => {
                        let split = match self.take_split_table(ctx) {
                            Ok(t) => t,
                            Err(e) => {
                                // `splits_needed` allocated one table per
                                // partly covered block, so this is not
                                // reached; if it were, the block stays
                                // whole and the operation fails.
                                ctx.error.get_or_insert(e);
                                continue;
                            }
                        };
                        self.fill_split(split, d, level);
                        let below = cursor.down(index, split).detached();
                        debt = self.modify_level(ctx, op, &below, debt);
                        if let Some(block) = self.collapse_candidate(
                            split,
                            level,
                            cursor.entry_va(index),
                            MappingUnit::LARGEST,
                        ) {
                            change.new[k] = block;
                            to_free[k] = Some(split);
                        } else {
                            change.new[k] = Descriptor::table(split);
                        }
                    }
                    _ => {}
                }
            }
            let group = Group {
                table,
                level,
                first,
                va: cursor.entry_va(first),
                live: cursor.is_live(),
            };
            if level >= 1 && self.complete_group(&group, in_range, &mut change) {
                change.fold(level, ctx.limit);
            }
            let freeing = to_free.iter().flatten().count();
            debt = self.room_for_frees(ctx, freeing, debt);
            debt = self.write_group(ctx, op, &group, &mut change, debt);
            let broken = ctx.broken.take();
            for (k, freed) in to_free.into_iter().enumerate() {
                if let Some(freed) = freed {
                    let parent =
                        (change.collapsed & (1 << k) != 0).then_some((table, first + k, level));
                    // Linked if the entry pointed at it (not a split table
                    // collapsed again before it was linked).
                    // Already discharged if the group's break covered it.
                    let va = cursor.entry_va(first + k);
                    let linked_at = (group.live
                        && change.old[k].is_table(level)
                        && !broken.as_ref().is_some_and(|p| p.covers_walk(va)))
                    .then_some(va);
                    debt = self.defer_free(ctx, freed, parent, linked_at, debt);
                }
            }
            first += CONT_ENTRIES;
        }
        debt
    }
}
