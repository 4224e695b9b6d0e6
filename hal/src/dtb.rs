//! Flattened device tree: structural validation and the platform facts the
//! firmware needs (Devicetree Specification v0.4, chapter 5 "Flattened
//! Devicetree (DTB) Format").
//!
//! A DTB comes from outside (QEMU, a boot loader, a test image), so nothing in
//! it is trusted. [`validate`] walks the header, the memory reservation block
//! and the whole structure block with bounds checks before anything else reads
//! it; only a blob that passed is handed to `flat_device_tree` for navigation.
//! `reg` properties are decoded here with explicit cell sizes, so odd cell
//! counts are a typed error rather than a guess. A well-formed tree can still
//! describe a machine nothing can boot on (overlapping RAM, RAM over the
//! board's devices, a virtio window in RAM, every byte reserved):
//! [`parse_for_board`] checks the facts against each other and the board.

use crate::board::Board;
use flat_device_tree::Fdt;

/// FDT header magic (big-endian in the blob).
pub const FDT_MAGIC: u32 = 0xd00d_feed;
const FDT_BEGIN_NODE: u32 = 1;
const FDT_END_NODE: u32 = 2;
const FDT_PROP: u32 = 3;
const FDT_NOP: u32 = 4;
const FDT_END: u32 = 9;
const HEADER_LEN: usize = 40;
/// Nesting deeper than this is rejected (real trees are < 10 deep).
const MAX_DEPTH: usize = 32;

/// Capacity of each range list in [`Platform`].
pub const MAX_RANGES: usize = memdesc::frames::MAX_RANGES;
/// Capacity of the virtio-mmio transport list in [`Platform`].
pub const MAX_VIRTIO: usize = 32;
/// The largest blob the boot path reads: the loader leaves it below the
/// image, which is linked 2 MiB into RAM.
pub const MAX_DTB_SIZE: usize = 2 << 20;
/// Capacity of [`MmioWindows`]: the console, up to four board device pages,
/// and one window per transport, so no window can be dropped.
pub const MAX_MMIO_WINDOWS: usize = 1 + 4 + MAX_VIRTIO;

/// Why a device tree was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(hw, derive(defmt::Format))]
pub enum DtbError {
    /// Fewer bytes than a header, or than the header's `totalsize`.
    Truncated { have: usize, need: usize },
    /// The first word is not 0xd00dfeed.
    BadMagic(u32),
    /// `last_comp_version` is newer than version 17, or `version` older than 16.
    UnsupportedVersion { version: u32, last_comp: u32 },
    /// A block (structure, strings, reservation map) lies outside `totalsize`
    /// or is misaligned.
    BadBlock(Block),
    /// The reservation map has no terminating (0, 0) entry inside the blob.
    UnterminatedReservations,
    /// An unknown token at this offset of the structure block.
    BadToken { offset: usize, token: u32 },
    /// A node name, property or string runs past its block.
    Overrun { offset: usize },
    /// A property's name offset points outside the strings block.
    BadNameOffset { offset: usize },
    /// END_NODE without BEGIN_NODE, END inside a node, or no END at all.
    Unbalanced { offset: usize },
    /// Nodes nested deeper than we accept.
    TooDeep,
    /// A string that must be UTF-8 is not.
    NotUtf8,
    /// `#address-cells` / `#size-cells` other than 1 or 2.
    BadCells { address: u32, size: u32 },
    /// A `reg` length is not a multiple of one (address, size) entry.
    BadReg,
    /// A region whose end overflows 64 bits.
    RegionOverflow,
    /// No memory node with a non-empty region.
    NoMemory,
    /// More regions than [`MAX_RANGES`] (or virtio transports than [`MAX_VIRTIO`]).
    TooMany,
    /// `flat_device_tree` refused a blob that passed our checks.
    Parser,
    /// `totalsize` is larger than the boot path reads ([`MAX_DTB_SIZE`]).
    Oversized { size: usize, max: usize },
    /// Two memory ranges share bytes.
    MemoryOverlap { first: Region, second: Region },
    /// A memory range covers a window the board gives to devices.
    MemoryCoversDevices { memory: Region, devices: Region },
    /// A virtio-mmio register window lies in RAM.
    VirtioInMemory { virtio: Region, memory: Region },
    /// The reserved regions leave no RAM at all.
    AllMemoryReserved,
}

/// The blocks of a DTB, for [`DtbError::BadBlock`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(hw, derive(defmt::Format))]
pub enum Block {
    /// The structure block.
    Struct,
    /// The strings block.
    Strings,
    /// The memory reservation map.
    Reservations,
}

/// A physical region `[base, base + size)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(hw, derive(defmt::Format))]
pub struct Region {
    /// First byte.
    pub base: u64,
    /// Length in bytes.
    pub size: u64,
}

impl Region {
    /// One past the last byte (never overflows: checked at parse time).
    pub const fn end(&self) -> u64 {
        self.base + self.size
    }
}

/// A fixed-capacity list of regions (no allocator at boot).
#[derive(Debug, Clone, Copy)]
pub struct Regions {
    items: [Region; MAX_RANGES],
    len: usize,
}

impl Regions {
    const fn new() -> Self {
        Self {
            items: [Region { base: 0, size: 0 }; MAX_RANGES],
            len: 0,
        }
    }

    /// An empty list.
    pub const fn empty() -> Self {
        Self::new()
    }

    /// Appends `r`; [`DtbError::TooMany`] when full.
    pub fn push(&mut self, r: Region) -> Result<(), DtbError> {
        let slot = self.items.get_mut(self.len).ok_or(DtbError::TooMany)?;
        *slot = r;
        self.len += 1;
        Ok(())
    }

    /// The regions, in the order the tree lists them.
    pub fn as_slice(&self) -> &[Region] {
        &self.items[..self.len]
    }

    /// Sum of the sizes, saturating at `u64::MAX`: a corrupted tree can list
    /// overlapping regions whose sizes add up past 2^64 (rejected later by
    /// [`Platform::check`] as [`DtbError::MemoryOverlap`]), and asking for the
    /// total must not panic on the way.
    pub fn total(&self) -> u64 {
        self.as_slice()
            .iter()
            .fold(0u64, |sum, r| sum.saturating_add(r.size))
    }

    /// True when the union of these regions contains all of `r`.
    pub fn covers(&self, r: &Region) -> bool {
        // Walk up from r.base: each step jumps to the end of a region that
        // contains the current address; at most one step per region.
        let mut at = r.base;
        for _ in 0..=self.len {
            if at >= r.end() {
                return true;
            }
            match self
                .as_slice()
                .iter()
                .find(|c| c.base <= at && at < c.end())
            {
                Some(c) => at = c.end(),
                None => return false,
            }
        }
        at >= r.end()
    }

    /// Cuts region `index` to its first `size` bytes (a smaller size only);
    /// a size of 0 removes it, keeping the others in order.
    pub fn shrink(&mut self, index: usize, size: u64) {
        let Some(r) = self.items[..self.len].get_mut(index) else {
            return;
        };
        if size >= r.size {
            return;
        }
        if size != 0 {
            r.size = size;
            return;
        }
        self.items.copy_within(index + 1..self.len, index);
        self.len -= 1;
    }
}

impl Region {
    /// True when the two regions share at least one byte.
    pub const fn overlaps(&self, other: &Region) -> bool {
        self.base < other.end() && other.base < self.end()
    }
}

/// A virtio-mmio transport named by the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(hw, derive(defmt::Format))]
pub struct VirtioMmio {
    /// Register window.
    pub region: Region,
    /// First cell group of `interrupts` (the SPI number on a GIC), if given.
    pub irq: Option<u32>,
}

/// How PSCI is called, from `/psci` `method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(hw, derive(defmt::Format))]
pub enum PsciConduit {
    /// `hvc`
    Hvc,
    /// `smc`
    Smc,
}

/// What the firmware learns from the device tree.
#[derive(Debug, Clone, Copy)]
pub struct Platform<'a> {
    /// RAM from every `device_type = "memory"` node.
    pub memory: Regions,
    /// `/memreserve/` entries and `reserved-memory` children with a `reg`.
    pub reserved: Regions,
    /// virtio-mmio transports, in tree order.
    virtio: [VirtioMmio; MAX_VIRTIO],
    virtio_len: usize,
    /// `/chosen/bootargs`.
    pub bootargs: Option<&'a str>,
    /// PSCI conduit, if the tree has a `/psci` node.
    pub psci: Option<PsciConduit>,
    /// Size of the blob in bytes (`totalsize`), to reserve it.
    pub total_size: usize,
    /// `device_type = "cpu"` nodes under `/cpus` (0: no tree, or none).
    pub cpus: usize,
}

impl Platform<'_> {
    /// Stack slots to map, one per core the firmware may start: the CPUs
    /// the tree lists, or all `max` slots when it lists none (no tree, a
    /// board default).
    pub fn cpu_slots(&self, max: usize) -> usize {
        match self.cpus {
            0 => max,
            n => n.min(max),
        }
    }
}

impl Platform<'static> {
    /// A platform known without a device tree (a board source or the
    /// board's default): `memory`, nothing reserved, no devices, no
    /// bootargs, no PSCI, no blob.
    pub fn without_dtb(memory: &[Region]) -> Result<Self, DtbError> {
        let mut p = Platform {
            memory: Regions::new(),
            reserved: Regions::new(),
            virtio: [VirtioMmio::default(); MAX_VIRTIO],
            virtio_len: 0,
            bootargs: None,
            psci: None,
            total_size: 0,
            cpus: 0,
        };
        for &m in memory {
            p.memory.push(m)?;
        }
        if p.memory.total() == 0 {
            return Err(DtbError::NoMemory);
        }
        Ok(p)
    }
}

impl Platform<'_> {
    /// The virtio-mmio transports.
    pub fn virtio_mmio(&self) -> &[VirtioMmio] {
        &self.virtio[..self.virtio_len]
    }
}

fn be32(blob: &[u8], off: usize) -> Option<u32> {
    let b = blob.get(off..off.checked_add(4)?)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

fn be64(blob: &[u8], off: usize) -> Option<u64> {
    Some(((be32(blob, off)? as u64) << 32) | be32(blob, off.checked_add(4)?)? as u64)
}

const fn align4(x: usize) -> usize {
    (x + 3) & !3
}

/// Reads the `totalsize` a blob claims, after checking magic; used to learn how
/// many bytes to look at when all we have is a pointer.
pub fn claimed_size(header: &[u8]) -> Result<usize, DtbError> {
    let magic = be32(header, 0).ok_or(DtbError::Truncated {
        have: header.len(),
        need: 4,
    })?;
    if magic != FDT_MAGIC {
        return Err(DtbError::BadMagic(magic));
    }
    let total = be32(header, 4).ok_or(DtbError::Truncated {
        have: header.len(),
        need: 8,
    })?;
    Ok(total as usize)
}

/// How many bytes the blob at the start of `header` occupies: its
/// `totalsize`, checked against `max` (the most the caller will read).
pub fn blob_size(header: &[u8], max: usize) -> Result<usize, DtbError> {
    let size = claimed_size(header)?;
    if size > max {
        return Err(DtbError::Oversized { size, max });
    }
    Ok(size)
}

/// Checks that `blob` is a well-formed DTB: header, block bounds and alignment,
/// a terminated reservation map, and a structure block whose every token,
/// name, property and string offset lies in bounds, with balanced nesting and
/// a final FDT_END. Returns the blob cut to `totalsize`.
pub fn validate(blob: &[u8]) -> Result<&[u8], DtbError> {
    if blob.len() < HEADER_LEN {
        return Err(DtbError::Truncated {
            have: blob.len(),
            need: HEADER_LEN,
        });
    }
    let h = |i: usize| be32(blob, i * 4).unwrap_or(0);
    if h(0) != FDT_MAGIC {
        return Err(DtbError::BadMagic(h(0)));
    }
    let total = h(1) as usize;
    if total < HEADER_LEN || total > blob.len() {
        return Err(DtbError::Truncated {
            have: blob.len(),
            need: total.max(HEADER_LEN),
        });
    }
    let blob = &blob[..total];
    let (off_struct, off_strings, off_rsv) = (h(2) as usize, h(3) as usize, h(4) as usize);
    let (version, last_comp) = (h(5), h(6));
    let (size_strings, size_struct) = (h(8) as usize, h(9) as usize);
    if version < 16 || last_comp > 17 {
        return Err(DtbError::UnsupportedVersion { version, last_comp });
    }
    let within = |off: usize, len: usize| {
        off >= HEADER_LEN && off.checked_add(len).is_some_and(|e| e <= total)
    };
    if off_struct % 4 != 0 || size_struct % 4 != 0 || !within(off_struct, size_struct) {
        return Err(DtbError::BadBlock(Block::Struct));
    }
    if !within(off_strings, size_strings) {
        return Err(DtbError::BadBlock(Block::Strings));
    }
    if off_rsv % 8 != 0 || !within(off_rsv, 16) {
        return Err(DtbError::BadBlock(Block::Reservations));
    }
    // Reservation map: (address, size) pairs up to a (0, 0) terminator.
    let mut off = off_rsv;
    loop {
        let (a, s) = match (be64(blob, off), be64(blob, off + 8)) {
            (Some(a), Some(s)) => (a, s),
            _ => return Err(DtbError::UnterminatedReservations),
        };
        if a == 0 && s == 0 {
            break;
        }
        if a.checked_add(s).is_none() {
            return Err(DtbError::RegionOverflow);
        }
        off += 16;
    }

    let strings = &blob[off_strings..off_strings + size_strings];
    let st = &blob[off_struct..off_struct + size_struct];
    let mut pos = 0usize;
    let mut depth = 0usize;
    let mut seen_root = false;
    loop {
        let token = be32(st, pos).ok_or(DtbError::Unbalanced {
            offset: off_struct + pos,
        })?;
        let at = off_struct + pos;
        pos += 4;
        match token {
            FDT_BEGIN_NODE => {
                if depth == 0 && seen_root {
                    return Err(DtbError::Unbalanced { offset: at });
                }
                seen_root = true;
                let rest = st.get(pos..).ok_or(DtbError::Overrun { offset: at })?;
                let nul = rest
                    .iter()
                    .position(|&b| b == 0)
                    .ok_or(DtbError::Overrun { offset: at })?;
                core::str::from_utf8(&rest[..nul]).map_err(|_| DtbError::NotUtf8)?;
                pos = align4(pos + nul + 1);
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(DtbError::TooDeep);
                }
            }
            FDT_END_NODE => {
                depth = depth
                    .checked_sub(1)
                    .ok_or(DtbError::Unbalanced { offset: at })?;
            }
            FDT_PROP => {
                if depth == 0 {
                    return Err(DtbError::Unbalanced { offset: at });
                }
                let len = be32(st, pos).ok_or(DtbError::Overrun { offset: at })? as usize;
                let name_off = be32(st, pos + 4).ok_or(DtbError::Overrun { offset: at })? as usize;
                pos += 8;
                let end = pos
                    .checked_add(len)
                    .filter(|&e| e <= st.len())
                    .ok_or(DtbError::Overrun { offset: at })?;
                let name = strings
                    .get(name_off..)
                    .ok_or(DtbError::BadNameOffset { offset: at })?;
                let nul = name
                    .iter()
                    .position(|&b| b == 0)
                    .ok_or(DtbError::BadNameOffset { offset: at })?;
                core::str::from_utf8(&name[..nul]).map_err(|_| DtbError::NotUtf8)?;
                pos = align4(end);
            }
            FDT_NOP => {}
            FDT_END => {
                if depth != 0 || !seen_root {
                    return Err(DtbError::Unbalanced { offset: at });
                }
                return Ok(blob);
            }
            other => {
                return Err(DtbError::BadToken {
                    offset: at,
                    token: other,
                })
            }
        }
        if pos > st.len() {
            return Err(DtbError::Overrun { offset: at });
        }
    }
}

/// Decodes a `reg`-style property with the given cell counts.
fn push_reg(
    out: &mut Regions,
    value: &[u8],
    address_cells: u32,
    size_cells: u32,
) -> Result<(), DtbError> {
    if !(1..=2).contains(&address_cells) || size_cells > 2 {
        return Err(DtbError::BadCells {
            address: address_cells,
            size: size_cells,
        });
    }
    let entry = 4 * (address_cells + size_cells) as usize;
    if !value.len().is_multiple_of(entry) {
        return Err(DtbError::BadReg);
    }
    let read = |at: usize, cells: u32| -> Result<u64, DtbError> {
        match cells {
            0 => Ok(0),
            1 => be32(value, at).map(u64::from).ok_or(DtbError::BadReg),
            _ => be64(value, at).ok_or(DtbError::BadReg),
        }
    };
    for chunk in 0..value.len() / entry {
        let at = chunk * entry;
        let base = read(at, address_cells)?;
        let size = read(at + 4 * address_cells as usize, size_cells)?;
        base.checked_add(size).ok_or(DtbError::RegionOverflow)?;
        if size != 0 {
            out.push(Region { base, size })?;
        }
    }
    Ok(())
}

fn cells_of(node: flat_device_tree::node::FdtNode<'_, '_>) -> (u32, u32) {
    // Devicetree spec 2.3.5: defaults are 2 and 1 when absent.
    let get = |name: &str, default: u32| {
        node.property(name)
            .and_then(|p| be32(p.value, 0).filter(|_| p.value.len() == 4))
            .unwrap_or(default)
    };
    (get("#address-cells", 2), get("#size-cells", 1))
}

/// Validates `blob` and extracts the platform facts from it.
pub fn parse(blob: &[u8]) -> Result<Platform<'_>, DtbError> {
    let blob = validate(blob)?;
    let fdt = Fdt::new(blob).map_err(|_| DtbError::Parser)?;
    let mut p = Platform {
        memory: Regions::new(),
        reserved: Regions::new(),
        virtio: [VirtioMmio::default(); MAX_VIRTIO],
        virtio_len: 0,
        bootargs: None,
        psci: None,
        total_size: blob.len(),
        cpus: 0,
    };

    // /memreserve/ entries (already bounds-checked by validate()).
    let off_rsv = be32(blob, 16).unwrap_or(0) as usize;
    let mut off = off_rsv;
    while let (Some(base), Some(size)) = (be64(blob, off), be64(blob, off + 8)) {
        if base == 0 && size == 0 {
            break;
        }
        p.reserved.push(Region { base, size })?;
        off += 16;
    }

    let root = fdt.find_node("/").ok_or(DtbError::Parser)?;
    let (root_ac, root_sc) = cells_of(root);
    for node in root.children() {
        // Devicetree spec 2.3.4: a node whose status is not "okay" is not
        // usable by us (e.g. QEMU's secure-only `secram`).
        let enabled = node
            .property("status")
            .and_then(|s| s.as_str())
            .is_none_or(|s| s == "okay" || s == "ok");
        if !enabled {
            continue;
        }
        let is_memory = node.property("device_type").and_then(|v| v.as_str()) == Some("memory");
        if is_memory {
            if let Some(reg) = node.property("reg") {
                push_reg(&mut p.memory, reg.value, root_ac, root_sc)?;
            }
        }
        let base_name = node.name.split('@').next().unwrap_or("");
        match base_name {
            "reserved-memory" => {
                let (ac, sc) = cells_of(node);
                for child in node.children() {
                    if let Some(reg) = child.property("reg") {
                        push_reg(&mut p.reserved, reg.value, ac, sc)?;
                    }
                }
            }
            "chosen" => {
                if let Some(args) = node.property("bootargs") {
                    let raw = args.value.split(|&b| b == 0).next().unwrap_or(&[]);
                    p.bootargs = Some(core::str::from_utf8(raw).map_err(|_| DtbError::NotUtf8)?);
                }
            }
            "cpus" => {
                p.cpus = node
                    .children()
                    .filter(|c| c.property("device_type").and_then(|v| v.as_str()) == Some("cpu"))
                    .count();
            }
            "psci" => {
                p.psci = match node.property("method").and_then(|m| m.as_str()) {
                    Some("hvc") => Some(PsciConduit::Hvc),
                    Some("smc") => Some(PsciConduit::Smc),
                    _ => None,
                };
            }
            _ => {}
        }
        let is_virtio = node
            .property("compatible")
            .is_some_and(|c| c.value.split(|&b| b == 0).any(|s| s == b"virtio,mmio"));
        if is_virtio {
            if let Some(reg) = node.property("reg") {
                let mut one = Regions::new();
                push_reg(&mut one, reg.value, root_ac, root_sc)?;
                let region = *one.as_slice().first().ok_or(DtbError::BadReg)?;
                // GIC binding: <type number flags>; the number is the second cell.
                let irq = node.property("interrupts").and_then(|v| be32(v.value, 4));
                let slot = p.virtio.get_mut(p.virtio_len).ok_or(DtbError::TooMany)?;
                *slot = VirtioMmio { region, irq };
                p.virtio_len += 1;
            }
        }
    }
    if p.memory.total() == 0 {
        return Err(DtbError::NoMemory);
    }
    Ok(p)
}

/// Validates and parses `blob`, then checks what it says against itself and
/// against `board` (see [`Platform::check`]).
pub fn parse_for_board<'a>(blob: &'a [u8], board: &Board) -> Result<Platform<'a>, DtbError> {
    let p = parse(blob)?;
    p.check(board)?;
    Ok(p)
}

impl Platform<'_> {
    /// Checks facts that are each well-formed but together unusable: memory
    /// ranges that overlap each other or a window the board gives to
    /// devices, a virtio-mmio window inside RAM, and reserved regions that
    /// leave no RAM.
    pub fn check(&self, board: &Board) -> Result<(), DtbError> {
        let memory = self.memory.as_slice();
        for (i, a) in memory.iter().enumerate() {
            if let Some(b) = memory[i + 1..].iter().find(|b| a.overlaps(b)) {
                return Err(DtbError::MemoryOverlap {
                    first: *a,
                    second: *b,
                });
            }
            if let Some(d) = board.device_windows.iter().find(|d| a.overlaps(d)) {
                return Err(DtbError::MemoryCoversDevices {
                    memory: *a,
                    devices: *d,
                });
            }
            if let Some(v) = self.virtio_mmio().iter().find(|v| a.overlaps(&v.region)) {
                return Err(DtbError::VirtioInMemory {
                    virtio: v.region,
                    memory: *a,
                });
            }
        }
        if memory.iter().all(|m| self.reserved.covers(m)) {
            return Err(DtbError::AllMemoryReserved);
        }
        Ok(())
    }

    /// The page-granular MMIO windows to map: the board's console, the other
    /// device pages the board names, and every virtio-mmio transport, merged so that no page appears twice.
    pub fn mmio_windows(&self, board: &Board) -> Result<MmioWindows, DtbError> {
        let mut w = MmioWindows {
            items: [Region::default(); MAX_MMIO_WINDOWS],
            len: 0,
        };
        w.add(Region {
            base: board.uart_base,
            size: PAGE,
        })?;
        for &m in board.mmio {
            w.add(m)?;
        }
        for v in self.virtio_mmio() {
            w.add(v.region)?;
        }
        Ok(w)
    }
}

const PAGE: u64 = 4096;

/// Disjoint, page-aligned MMIO windows (see [`Platform::mmio_windows`]).
#[derive(Debug, Clone, Copy)]
pub struct MmioWindows {
    items: [Region; MAX_MMIO_WINDOWS],
    len: usize,
}

impl MmioWindows {
    fn add(&mut self, r: Region) -> Result<(), DtbError> {
        let start = r.base & !(PAGE - 1);
        let end = r
            .end()
            .checked_next_multiple_of(PAGE)
            .ok_or(DtbError::RegionOverflow)?;
        let (mut lo, mut hi) = (start, end);
        // Absorb every window this one touches (a new window can bridge two).
        let mut i = 0;
        while i < self.len {
            let w = self.items[i];
            if lo <= w.end() && w.base <= hi {
                lo = lo.min(w.base);
                hi = hi.max(w.end());
                self.items.copy_within(i + 1..self.len, i);
                self.len -= 1;
            } else {
                i += 1;
            }
        }
        let slot = self.items.get_mut(self.len).ok_or(DtbError::TooMany)?;
        *slot = Region {
            base: lo,
            size: hi - lo,
        };
        self.len += 1;
        Ok(())
    }

    /// The windows.
    pub fn as_slice(&self) -> &[Region] {
        &self.items[..self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VIRT_1G: &[u8] = include_bytes!("../tests/dtb/virt-1g.dtb");
    const SECURE_4G: &[u8] = include_bytes!("../tests/dtb/virt-secure-4g.dtb");
    const MULTI: &[u8] = include_bytes!("../tests/dtb/multi-bank.dtb");

    #[test]
    fn qemu_virt_1g() {
        let p = parse(VIRT_1G).expect("valid");
        assert_eq!(
            p.memory.as_slice(),
            &[Region {
                base: 0x4000_0000,
                size: 1 << 30
            }]
        );
        assert_eq!(p.psci, Some(PsciConduit::Hvc));
        assert_eq!(p.virtio_mmio().len(), 32);
        // QEMU lists transports from the top down.
        assert!(p.virtio_mmio().iter().any(|v| v.region
            == Region {
                base: 0x0a00_0000,
                size: 0x200
            }));
        assert!(p.virtio_mmio().iter().all(|v| v.irq.is_some()));
    }

    #[test]
    fn qemu_virt_secure_4g() {
        let p = parse(SECURE_4G).expect("valid");
        // The secure-only `secram` node is disabled for us and must not count.
        assert_eq!(p.memory.total(), 4 << 30);
        assert_eq!(p.memory.as_slice()[0].base, 0x4000_0000);
    }

    #[test]
    fn several_banks_reservations_and_bootargs() {
        let p = parse(MULTI).expect("valid");
        assert_eq!(
            p.memory.as_slice(),
            &[
                Region {
                    base: 0x4000_0000,
                    size: 0x1000_0000
                },
                Region {
                    base: 0x6000_0000,
                    size: 0x0800_0000
                },
                Region {
                    base: 0x1_0000_0000,
                    size: 0x2000_0000
                },
            ]
        );
        assert_eq!(
            p.reserved.as_slice(),
            &[
                Region {
                    base: 0x4800_0000,
                    size: 0x1_0000
                },
                Region {
                    base: 0x4c00_0000,
                    size: 0x20_0000
                }
            ]
        );
        assert_eq!(p.bootargs, Some("selftest=none"));
        assert_eq!(p.virtio_mmio().len(), 2);
        assert_eq!(p.virtio_mmio()[1].irq, Some(0x11));
        assert_eq!(p.psci, None);
    }

    #[test]
    fn truncated_and_bad_magic_are_typed() {
        assert!(matches!(
            parse(&VIRT_1G[..10]),
            Err(DtbError::Truncated { .. })
        ));
        assert!(matches!(
            parse(&VIRT_1G[..VIRT_1G.len() - 1]),
            Err(DtbError::Truncated { .. })
        ));
        let mut bad = VIRT_1G.to_vec();
        bad[0] = 0;
        assert_eq!(parse(&bad).err(), Some(DtbError::BadMagic(0x000d_feed)));
    }

    #[test]
    fn structure_overrun_is_typed() {
        let mut bad = MULTI.to_vec();
        // Shrink size_dt_struct so the walk runs off the end of the block.
        let sz = be32(&bad, 36).unwrap() - 8;
        bad[36..40].copy_from_slice(&sz.to_be_bytes());
        assert!(parse(&bad).is_err());
        // Point a property's name offset past the strings block.
        let mut bad = MULTI.to_vec();
        let off_struct = be32(&bad, 8).unwrap() as usize;
        let mut pos = off_struct;
        while be32(&bad, pos) != Some(FDT_PROP) {
            pos += 4;
        }
        bad[pos + 8..pos + 12].copy_from_slice(&0xffff_0000u32.to_be_bytes());
        assert!(matches!(parse(&bad), Err(DtbError::BadNameOffset { .. })));
    }

    #[test]
    fn unsupported_version() {
        let mut bad = MULTI.to_vec();
        bad[24..28].copy_from_slice(&18u32.to_be_bytes());
        assert!(matches!(
            parse(&bad),
            Err(DtbError::UnsupportedVersion { .. })
        ));
    }

    /// A minimal DTB writer for hand-made hostile trees: root cells 2/2,
    /// memory nodes, a reserved-memory node, virtio-mmio nodes.
    struct Builder {
        structure: Vec<u8>,
        strings: Vec<u8>,
        reservations: Vec<(u64, u64)>,
    }

    impl Builder {
        fn new() -> Self {
            let mut b = Self {
                structure: Vec::new(),
                strings: Vec::new(),
                reservations: Vec::new(),
            };
            b.begin("");
            b.prop_u32s("#address-cells", &[2]);
            b.prop_u32s("#size-cells", &[2]);
            b
        }
        fn word(&mut self, w: u32) {
            self.structure.extend_from_slice(&w.to_be_bytes());
        }
        fn begin(&mut self, name: &str) {
            self.word(FDT_BEGIN_NODE);
            self.structure.extend_from_slice(name.as_bytes());
            self.structure.push(0);
            while !self.structure.len().is_multiple_of(4) {
                self.structure.push(0);
            }
        }
        fn end(&mut self) {
            self.word(FDT_END_NODE);
        }
        fn prop(&mut self, name: &str, value: &[u8]) {
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(name.as_bytes());
            self.strings.push(0);
            self.word(FDT_PROP);
            self.word(value.len() as u32);
            self.word(off);
            self.structure.extend_from_slice(value);
            while !self.structure.len().is_multiple_of(4) {
                self.structure.push(0);
            }
        }
        fn prop_u32s(&mut self, name: &str, cells: &[u32]) {
            let v: Vec<u8> = cells.iter().flat_map(|c| c.to_be_bytes()).collect();
            self.prop(name, &v);
        }
        fn prop_regs(&mut self, name: &str, regs: &[(u64, u64)]) {
            let cells: Vec<u32> = regs
                .iter()
                .flat_map(|&(b, s)| [(b >> 32) as u32, b as u32, (s >> 32) as u32, s as u32])
                .collect();
            self.prop_u32s(name, &cells);
        }
        fn memory(mut self, base: u64, size: u64) -> Self {
            self.begin(&format!("memory@{base:x}"));
            self.prop("device_type", b"memory\0");
            self.prop_regs("reg", &[(base, size)]);
            self.end();
            self
        }
        fn reserved(mut self, base: u64, size: u64) -> Self {
            self.begin(&format!("reserved-memory@{base:x}"));
            self.prop_u32s("#address-cells", &[2]);
            self.prop_u32s("#size-cells", &[2]);
            self.prop("ranges", &[]);
            self.begin(&format!("area@{base:x}"));
            self.prop_regs("reg", &[(base, size)]);
            self.end();
            self.end();
            self
        }
        fn memreserve(mut self, base: u64, size: u64) -> Self {
            self.reservations.push((base, size));
            self
        }
        fn virtio(mut self, base: u64) -> Self {
            self.begin(&format!("virtio_mmio@{base:x}"));
            self.prop("compatible", b"virtio,mmio\0");
            self.prop_regs("reg", &[(base, 0x200)]);
            self.end();
            self
        }
        fn build(mut self) -> Vec<u8> {
            self.end();
            self.word(FDT_END);
            let rsv_off = HEADER_LEN;
            let struct_off = rsv_off + 16 * (self.reservations.len() + 1);
            let strings_off = struct_off + self.structure.len();
            let total = strings_off + self.strings.len();
            let mut out = Vec::new();
            for w in [
                FDT_MAGIC,
                total as u32,
                struct_off as u32,
                strings_off as u32,
                rsv_off as u32,
                17,
                16,
                0,
                self.strings.len() as u32,
                self.structure.len() as u32,
            ] {
                out.extend_from_slice(&w.to_be_bytes());
            }
            for &(b, s) in self.reservations.iter().chain([(0, 0)].iter()) {
                out.extend_from_slice(&b.to_be_bytes());
                out.extend_from_slice(&s.to_be_bytes());
            }
            out.extend_from_slice(&self.structure);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    const GIB: u64 = 1 << 30;
    const BOARD: Board = crate::board::VIRT;

    fn board_check(blob: &[u8]) -> Result<(), DtbError> {
        parse_for_board(blob, &BOARD).map(drop)
    }

    /// The stack slots to map follow the CPU nodes of `/cpus` (not its
    /// other children); a tree without them maps every slot.
    #[test]
    fn cpu_slots_follow_the_cpu_nodes() {
        let p = parse(VIRT_1G).expect("valid");
        assert_eq!((p.cpus, p.cpu_slots(8)), (1, 1));
        let mut b = Builder::new().memory(0x4000_0000, GIB);
        b.begin("cpus");
        for i in 0..3 {
            b.begin(&format!("cpu@{i}"));
            b.prop("device_type", b"cpu\0");
            b.end();
        }
        b.begin("cpu-map");
        b.end();
        b.end();
        let blob = b.build();
        let p = parse(&blob).expect("valid");
        assert_eq!((p.cpus, p.cpu_slots(8)), (3, 3));
        let blob = Builder::new().memory(0x4000_0000, GIB).build();
        let p = parse(&blob).expect("valid");
        assert_eq!((p.cpus, p.cpu_slots(8)), (0, 8));
    }

    #[test]
    fn builder_makes_a_tree_the_checks_accept() {
        let blob = Builder::new()
            .memory(0x4000_0000, GIB)
            .memory(0x1_0000_0000, GIB)
            .reserved(0x4800_0000, 0x10_0000)
            .virtio(0x0a00_0000)
            .build();
        let p = parse_for_board(&blob, &BOARD).expect("a sane tree");
        assert_eq!(p.memory.total(), 2 * GIB);
        assert_eq!(p.reserved.as_slice().len(), 1);
        assert_eq!(p.virtio_mmio().len(), 1);
        // The real QEMU trees pass too.
        for blob in [VIRT_1G, SECURE_4G, MULTI] {
            assert_eq!(board_check(blob), Ok(()));
        }
    }

    #[test]
    fn overlapping_memory_ranges_are_rejected() {
        let blob = Builder::new()
            .memory(0x4000_0000, GIB)
            .memory(0x4800_0000, 0x1000_0000)
            .build();
        assert_eq!(
            board_check(&blob),
            Err(DtbError::MemoryOverlap {
                first: Region {
                    base: 0x4000_0000,
                    size: GIB
                },
                second: Region {
                    base: 0x4800_0000,
                    size: 0x1000_0000
                },
            })
        );
        // The same range twice, and ranges listed out of order.
        let blob = Builder::new()
            .memory(0x8000_0000, GIB)
            .memory(0x4000_0000, GIB + 1)
            .build();
        assert!(matches!(
            board_check(&blob),
            Err(DtbError::MemoryOverlap { .. })
        ));
        // Adjacent ranges do not overlap.
        let blob = Builder::new()
            .memory(0x4000_0000, GIB)
            .memory(0x8000_0000, GIB)
            .build();
        assert_eq!(board_check(&blob), Ok(()));
    }

    #[test]
    fn overlapping_ranges_whose_sizes_sum_past_2_pow_64_are_a_typed_error() {
        // Found by `corrupted_blobs_never_panic`: each range fits in the
        // address space, but their sizes add up past u64::MAX, and the
        // "any memory at all" test summed them with a plain `+`.
        let huge = 0xC000_0000_0000_0000;
        let blob = Builder::new().memory(0, huge).memory(0x1000, huge).build();
        let p = parse(&blob).expect("each range is well formed");
        assert_eq!(p.memory.total(), u64::MAX);
        assert!(matches!(
            board_check(&blob),
            Err(DtbError::MemoryOverlap { .. })
        ));
    }

    #[test]
    fn memory_over_device_windows_is_rejected() {
        // RAM over the PL011 at 0x0900_0000.
        let blob = Builder::new()
            .memory(0x4000_0000, GIB)
            .memory(0x0900_0000, 0x10_0000)
            .build();
        assert_eq!(
            board_check(&blob),
            Err(DtbError::MemoryCoversDevices {
                memory: Region {
                    base: 0x0900_0000,
                    size: 0x10_0000
                },
                devices: BOARD.device_windows[0],
            })
        );
        // RAM starting one byte below the board's RAM base.
        let blob = Builder::new().memory(0x3fff_ffff, GIB).build();
        assert!(matches!(
            board_check(&blob),
            Err(DtbError::MemoryCoversDevices { .. })
        ));
    }

    #[test]
    fn virtio_window_in_ram_is_rejected() {
        let blob = Builder::new()
            .memory(0x4000_0000, GIB)
            .virtio(0x0a00_0000)
            .virtio(0x4800_0000)
            .build();
        assert_eq!(
            board_check(&blob),
            Err(DtbError::VirtioInMemory {
                virtio: Region {
                    base: 0x4800_0000,
                    size: 0x200
                },
                memory: Region {
                    base: 0x4000_0000,
                    size: GIB
                },
            })
        );
    }

    #[test]
    fn reservations_covering_all_ram_are_rejected() {
        // One reserved-memory child over all of RAM.
        let blob = Builder::new()
            .memory(0x4000_0000, GIB)
            .reserved(0x4000_0000, GIB)
            .build();
        assert_eq!(board_check(&blob), Err(DtbError::AllMemoryReserved));
        // Two banks, covered by a /memreserve/ entry, a reserved-memory node
        // and a range sticking out past RAM.
        let blob = Builder::new()
            .memory(0x4000_0000, GIB)
            .memory(0x1_0000_0000, GIB)
            .memreserve(0x4000_0000, GIB / 2)
            .reserved(0x4000_0000 + GIB / 2, GIB / 2)
            .memreserve(0xf000_0000, 2 * GIB)
            .build();
        assert_eq!(board_check(&blob), Err(DtbError::AllMemoryReserved));
        // One page left over is usable RAM.
        let blob = Builder::new()
            .memory(0x4000_0000, GIB)
            .reserved(0x4000_0000, GIB - 4096)
            .build();
        assert_eq!(board_check(&blob), Ok(()));
    }

    #[test]
    fn oversized_blob_is_reported_as_oversized() {
        let mut header = VIRT_1G[..8].to_vec();
        header[4..8].copy_from_slice(&(3u32 << 20).to_be_bytes());
        assert_eq!(
            blob_size(&header, MAX_DTB_SIZE),
            Err(DtbError::Oversized {
                size: 3 << 20,
                max: MAX_DTB_SIZE
            })
        );
        assert_eq!(blob_size(VIRT_1G, MAX_DTB_SIZE), Ok(VIRT_1G.len()));
        assert!(matches!(
            blob_size(&header[..6], MAX_DTB_SIZE),
            Err(DtbError::Truncated { .. })
        ));
    }

    #[test]
    fn every_mmio_window_is_kept() {
        // 12 transports, each on its own 64 KiB-spaced page: 13 windows
        // with the console, none dropped.
        let mut b = Builder::new().memory(0x4000_0000, GIB);
        for i in 0..12 {
            b = b.virtio(0x0a00_0000 + i * 0x1_0000);
        }
        let blob = b.build();
        let p = parse_for_board(&blob, &BOARD).expect("valid");
        let w = p.mmio_windows(&BOARD).expect("fits");
        assert_eq!(w.as_slice().len(), 13);
        for v in p.virtio_mmio() {
            assert!(w
                .as_slice()
                .iter()
                .any(|w| w.base <= v.region.base && v.region.end() <= w.end()));
        }
        // QEMU's 32 adjacent transports merge into one window.
        let p = parse(VIRT_1G).expect("valid");
        let w = p.mmio_windows(&BOARD).expect("fits");
        assert_eq!(
            w.as_slice(),
            &[
                Region {
                    base: BOARD.uart_base,
                    size: 4096
                },
                Region {
                    base: 0x0a00_0000,
                    size: 0x4000
                }
            ]
        );
    }

    #[test]
    fn mmio_windows_merge_transitively() {
        // Two windows, then one that bridges them: one window results.
        let blob = Builder::new()
            .memory(0x4000_0000, GIB)
            .virtio(0x0a00_0000)
            .virtio(0x0a00_2000)
            .virtio(0x0a00_1000)
            .build();
        let p = parse(&blob).expect("valid");
        let w = p.mmio_windows(&BOARD).expect("fits");
        assert_eq!(
            &w.as_slice()[1..],
            &[Region {
                base: 0x0a00_0000,
                size: 0x3000
            }]
        );
    }

    #[test]
    fn shrink_clamps_and_removes() {
        let blob = Builder::new()
            .memory(0x4000_0000, GIB)
            .memory(0x8000_0000, GIB)
            .memory(0x1_0000_0000, GIB)
            .build();
        let mut p = parse(&blob).expect("valid");
        p.memory.shrink(0, GIB / 2);
        p.memory.shrink(1, 0);
        p.memory.shrink(1, 2 * GIB); // never grows
        p.memory.shrink(7, 0); // out of range: nothing
        assert_eq!(
            p.memory.as_slice(),
            &[
                Region {
                    base: 0x4000_0000,
                    size: GIB / 2
                },
                Region {
                    base: 0x1_0000_0000,
                    size: GIB
                }
            ]
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(3000))]
        /// Any corruption of a real blob gives Ok or a typed error: never a panic.
        #[test]
        fn corrupted_blobs_never_panic(
            which in 0usize..3,
            edits in proptest::collection::vec((0usize..9000, proptest::prelude::any::<u8>()), 1..8),
            cut in proptest::option::of(0usize..9000),
        ) {
            let mut blob = [VIRT_1G, SECURE_4G, MULTI][which].to_vec();
            for (at, v) in edits {
                let n = blob.len();
                blob[at % n] = v;
            }
            if let Some(c) = cut {
                let n = blob.len();
                blob.truncate(c % n);
            }
            let _ = parse(&blob);
            if let Ok(p) = parse_for_board(&blob, &BOARD) {
                let _ = p.mmio_windows(&BOARD);
            }
        }

        /// Corrupting only header words (where offsets and sizes live).
        #[test]
        fn corrupted_headers_never_panic(word in 0usize..10, v in proptest::prelude::any::<u32>(), which in 0usize..3) {
            let mut blob = [VIRT_1G, SECURE_4G, MULTI][which].to_vec();
            blob[word * 4..word * 4 + 4].copy_from_slice(&v.to_be_bytes());
            let _ = parse_for_board(&blob, &BOARD);
        }
    }
}
