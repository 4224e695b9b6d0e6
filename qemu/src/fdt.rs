//! Hostile device trees for system tests (Devicetree Specification v0.4,
//! chapter 5 "Flattened Devicetree (DTB) Format").
//!
//! QEMU writes the tree it would give the guest with `-machine
//! dumpdtb=FILE`; this module reads such a blob into a tree, applies one
//! [`DtbPatch`] and writes it back, and the boot passes it with `-dtb`.
//! QEMU's loader replaces every node named `memory` or `memory@…` with its
//! own and rewrites `/chosen/bootargs`, but keeps every other node, so extra
//! RAM is claimed by nodes named `ram@…` with `device_type = "memory"`.

use crate::error::{Error, Result};
use crate::machine::Machine;
use std::path::{Path, PathBuf};

/// One way of lying to the firmware in the device tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DtbPatch {
    /// A second memory range inside QEMU's RAM.
    OverlappingMemory,
    /// A memory range over the PL011 console (the board's device window).
    MemoryOverDevices,
    /// A reserved-memory region over all of RAM.
    AllMemoryReserved,
    /// Reserved regions over all of RAM but its last 64 KiB: the tree passes
    /// the board check, but the page array (2 MiB for 1 GiB) fits nowhere.
    AlmostAllMemoryReserved,
    /// The first virtio-mmio transport moved into RAM.
    VirtioInMemory,
    /// 63 GiB more RAM right after the real RAM: 64 GiB claimed on 1 GiB.
    MemoryBeyondBacked,
    /// Every virtio-mmio transport on its own 64 KiB-spaced page, so the
    /// boot map needs one MMIO window per transport.
    SpreadVirtio,
}

impl DtbPatch {
    /// Short name for test labels.
    pub fn name(self) -> &'static str {
        match self {
            Self::OverlappingMemory => "overlapping-memory",
            Self::MemoryOverDevices => "memory-over-devices",
            Self::AllMemoryReserved => "all-memory-reserved",
            Self::AlmostAllMemoryReserved => "almost-all-memory-reserved",
            Self::VirtioInMemory => "virtio-in-memory",
            Self::MemoryBeyondBacked => "64g-claimed",
            Self::SpreadVirtio => "spread-virtio",
        }
    }
}

/// A node of the tree: name, properties in order, children in order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Node {
    /// Node name with unit address (`virtio_mmio@a000000`); empty for the root.
    pub name: String,
    /// `(name, value)` pairs.
    pub props: Vec<(String, Vec<u8>)>,
    /// Child nodes.
    pub children: Vec<Node>,
}

impl Node {
    fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            ..Self::default()
        }
    }

    /// The value of property `name`.
    pub fn prop(&self, name: &str) -> Option<&[u8]> {
        self.props
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// Sets (or adds) property `name`.
    pub fn set(&mut self, name: &str, value: Vec<u8>) {
        match self.props.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = value,
            None => self.props.push((name.to_string(), value)),
        }
    }

    fn with(mut self, name: &str, value: Vec<u8>) -> Self {
        self.set(name, value);
        self
    }
}

/// A whole device tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    /// `/memreserve/` entries.
    pub reservations: Vec<(u64, u64)>,
    /// `boot_cpuid_phys` from the header.
    pub boot_cpuid: u32,
    /// The root node.
    pub root: Node,
}

const FDT_BEGIN_NODE: u32 = 1;
const FDT_END_NODE: u32 = 2;
const FDT_PROP: u32 = 3;
const FDT_NOP: u32 = 4;
const FDT_END: u32 = 9;

fn be32(b: &[u8], at: usize) -> Result<u32> {
    b.get(at..at + 4)
        .map(|w| u32::from_be_bytes([w[0], w[1], w[2], w[3]]))
        .ok_or_else(|| dtb_error(format!("truncated at {at:#x}")))
}

fn be64(b: &[u8], at: usize) -> Result<u64> {
    Ok((u64::from(be32(b, at)?) << 32) | u64::from(be32(b, at + 4)?))
}

fn cstr(b: &[u8], at: usize) -> Result<&str> {
    let rest = b
        .get(at..)
        .ok_or_else(|| dtb_error(format!("string offset {at:#x} out of range")))?;
    let nul = rest
        .iter()
        .position(|&c| c == 0)
        .ok_or_else(|| dtb_error(format!("unterminated string at {at:#x}")))?;
    std::str::from_utf8(&rest[..nul]).map_err(|e| dtb_error(format!("string at {at:#x}: {e}")))
}

/// `reg` cells for `#address-cells = <2>` and `#size-cells = <2>`.
pub fn reg(entries: &[(u64, u64)]) -> Vec<u8> {
    entries
        .iter()
        .flat_map(|&(base, size)| [base.to_be_bytes(), size.to_be_bytes()])
        .flatten()
        .collect()
}

/// A [`Error::Parse`] of the DTB.
fn dtb_error(detail: String) -> Error {
    Error::Parse {
        what: "DTB",
        detail,
    }
}

fn cell(v: u32) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

impl Tree {
    /// Reads a blob (validated by the firmware's own validator first).
    pub fn parse(blob: &[u8]) -> Result<Self> {
        let blob = hal::dtb::validate(blob).map_err(|e| dtb_error(format!("invalid: {e:?}")))?;
        let off_struct = be32(blob, 8)? as usize;
        let off_strings = be32(blob, 12)? as usize;
        let off_rsv = be32(blob, 16)? as usize;
        let mut reservations = Vec::new();
        let mut at = off_rsv;
        loop {
            let (base, size) = (be64(blob, at)?, be64(blob, at + 8)?);
            if base == 0 && size == 0 {
                break;
            }
            reservations.push((base, size));
            at += 16;
        }
        let strings = &blob[off_strings..];
        let mut stack: Vec<Node> = Vec::new();
        let mut root = None;
        let mut pos = off_struct;
        loop {
            let token = be32(blob, pos)?;
            pos += 4;
            match token {
                FDT_BEGIN_NODE => {
                    let name = cstr(blob, pos)?.to_string();
                    pos = (pos + name.len() + 1).next_multiple_of(4);
                    stack.push(Node::new(&name));
                }
                FDT_END_NODE => {
                    let node = stack.pop().ok_or_else(|| {
                        dtb_error(format!("END_NODE without BEGIN_NODE at {:#x}", pos - 4))
                    })?;
                    match stack.last_mut() {
                        Some(parent) => parent.children.push(node),
                        None => root = Some(node),
                    }
                }
                FDT_PROP => {
                    let len = be32(blob, pos)? as usize;
                    let name = cstr(strings, be32(blob, pos + 4)? as usize)?.to_string();
                    let value = blob
                        .get(pos + 8..pos + 8 + len)
                        .ok_or_else(|| {
                            dtb_error(format!("property at {:#x} overruns the blob", pos - 4))
                        })?
                        .to_vec();
                    pos = (pos + 8 + len).next_multiple_of(4);
                    stack
                        .last_mut()
                        .ok_or_else(|| {
                            dtb_error(format!("property at {:#x} outside a node", pos - 4))
                        })?
                        .props
                        .push((name, value));
                }
                FDT_NOP => {}
                FDT_END => break,
                other => return Err(dtb_error(format!("bad token {other:#x} at {:#x}", pos - 4))),
            }
        }
        Ok(Self {
            reservations,
            boot_cpuid: be32(blob, 28)?,
            root: root.ok_or_else(|| dtb_error("no root node".into()))?,
        })
    }

    /// Writes the tree as a version-17 blob, packed (no free space).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut structure = Vec::new();
        let mut strings: Vec<u8> = Vec::new();
        fn word(out: &mut Vec<u8>, w: u32) {
            out.extend_from_slice(&w.to_be_bytes());
        }
        fn pad(out: &mut Vec<u8>) {
            while !out.len().is_multiple_of(4) {
                out.push(0);
            }
        }
        fn emit(n: &Node, out: &mut Vec<u8>, strings: &mut Vec<u8>) {
            word(out, FDT_BEGIN_NODE);
            out.extend_from_slice(n.name.as_bytes());
            out.push(0);
            pad(out);
            for (name, value) in &n.props {
                let off = find_or_add(strings, name);
                word(out, FDT_PROP);
                word(out, value.len() as u32);
                word(out, off);
                out.extend_from_slice(value);
                pad(out);
            }
            for c in &n.children {
                emit(c, out, strings);
            }
            word(out, FDT_END_NODE);
        }
        fn find_or_add(strings: &mut Vec<u8>, name: &str) -> u32 {
            let mut at = 0;
            while at < strings.len() {
                let end = at + strings[at..].iter().position(|&c| c == 0).unwrap_or(0);
                if &strings[at..end] == name.as_bytes() {
                    return at as u32;
                }
                at = end + 1;
            }
            let off = strings.len() as u32;
            strings.extend_from_slice(name.as_bytes());
            strings.push(0);
            off
        }
        emit(&self.root, &mut structure, &mut strings);
        word(&mut structure, FDT_END);
        let off_rsv = 40;
        let off_struct = off_rsv + 16 * (self.reservations.len() + 1);
        let off_strings = off_struct + structure.len();
        let total = off_strings + strings.len();
        let mut out = Vec::with_capacity(total);
        for w in [
            hal::dtb::FDT_MAGIC,
            total as u32,
            off_struct as u32,
            off_strings as u32,
            off_rsv as u32,
            17,
            16,
            self.boot_cpuid,
            strings.len() as u32,
            structure.len() as u32,
        ] {
            word(&mut out, w);
        }
        for &(base, size) in self.reservations.iter().chain(&[(0, 0)]) {
            out.extend_from_slice(&base.to_be_bytes());
            out.extend_from_slice(&size.to_be_bytes());
        }
        out.extend_from_slice(&structure);
        out.extend_from_slice(&strings);
        out
    }

    fn virtio_nodes(&mut self) -> impl Iterator<Item = &mut Node> {
        self.root.children.iter_mut().filter(|n| {
            n.prop("compatible")
                .is_some_and(|c| c.split(|&b| b == 0).any(|s| s == b"virtio,mmio"))
        })
    }

    /// Applies `patch` for a machine with `ram_bytes` of RAM at `ram_base`.
    pub fn apply(&mut self, patch: DtbPatch, ram_base: u64, ram_bytes: u64) -> Result<()> {
        let memory = |name: &str, base: u64, size: u64| {
            Node::new(name)
                .with("device_type", b"memory\0".to_vec())
                .with("reg", reg(&[(base, size)]))
        };
        match patch {
            DtbPatch::OverlappingMemory => {
                let base = ram_base + ram_bytes / 4;
                let node = memory(&format!("ram@{base:x}"), base, ram_bytes / 4);
                self.root.children.push(node);
            }
            DtbPatch::MemoryOverDevices => {
                let node = memory("ram@9000000", 0x0900_0000, 0x10_0000);
                self.root.children.push(node);
            }
            DtbPatch::AllMemoryReserved | DtbPatch::AlmostAllMemoryReserved => {
                let size = if patch == DtbPatch::AllMemoryReserved {
                    ram_bytes
                } else {
                    ram_bytes - (64 << 10)
                };
                let area = Node::new(&format!("all@{ram_base:x}"))
                    .with("reg", reg(&[(ram_base, size)]))
                    .with("no-map", Vec::new());
                let mut rm = Node::new("reserved-memory")
                    .with("#address-cells", cell(2))
                    .with("#size-cells", cell(2))
                    .with("ranges", Vec::new());
                rm.children.push(area);
                self.root.children.push(rm);
            }
            DtbPatch::VirtioInMemory => {
                let base = ram_base + ram_bytes / 2;
                let v = self
                    .virtio_nodes()
                    .next()
                    .ok_or_else(|| Error::Missing("no virtio-mmio node to move".into()))?;
                v.set("reg", reg(&[(base, 0x200)]));
            }
            DtbPatch::MemoryBeyondBacked => {
                let base = ram_base + ram_bytes;
                let node = memory(&format!("ram@{base:x}"), base, (64 << 30) - ram_bytes);
                self.root.children.push(node);
            }
            DtbPatch::SpreadVirtio => {
                let mut n = 0u64;
                for v in self.virtio_nodes() {
                    v.set("reg", reg(&[(0x0a00_0000 + n * 0x1_0000, 0x200)]));
                    n += 1;
                }
                if n < 9 {
                    return Err(Error::Missing(format!(
                        "only {n} virtio-mmio nodes to spread"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Makes the hostile DTB for `machine` in `dir`: QEMU dumps the tree it
/// would pass (same machine options, so the same nodes), then `patch` is
/// applied. Returns the file's path.
pub fn hostile_dtb(machine: &Machine, elf: &Path, patch: DtbPatch, dir: &Path) -> Result<PathBuf> {
    let stem = format!(
        "cargo-qemu-{}-{}-{}",
        std::process::id(),
        patch.name(),
        unique()
    );
    let dumped = dir.join(format!("{stem}.qemu.dtb"));
    let out = dir.join(format!("{stem}.dtb"));
    let mut cmd = machine.dump_dtb_command(elf, &dumped);
    let run = cmd.output().map_err(Error::spawn(crate::setup::QEMU))?;
    let blob = std::fs::read(&dumped).map_err(|e| {
        Error::Missing(format!(
            "QEMU did not dump its DTB ({e}); stderr: {}",
            String::from_utf8_lossy(&run.stderr)
        ))
    })?;
    let _ = std::fs::remove_file(&dumped);
    let mut tree = Tree::parse(&blob)?;
    tree.apply(patch, hal::board::VIRT.ram_base, machine.mem_bytes())?;
    std::fs::write(&out, tree.to_bytes()).map_err(Error::io(&out))?;
    Ok(out)
}

/// The device tree a board model needs, since only `virt` generates one:
/// root cells, a memory node (QEMU rewrites it with the RAM it models),
/// `/chosen` (QEMU writes `bootargs` there) and, where the model has PSCI
/// at this entry EL, `/psci` with its conduit. Written to `dir`; returns
/// the file's path.
pub fn board_dtb(machine: &Machine, dir: &Path) -> Result<PathBuf> {
    let board = hal::board::by_name(machine.board)
        .ok_or_else(|| Error::Usage(format!("unknown board {}", machine.board)))?;
    let mut root = Node::new("")
        .with("#address-cells", cell(2))
        .with("#size-cells", cell(2))
        .with("model", format!("memfw {}\0", board.name).into_bytes());
    root.children.push(
        Node::new(&format!("memory@{:x}", board.ram_base))
            .with("device_type", b"memory\0".to_vec())
            .with("reg", reg(&[(board.ram_base, machine.mem_bytes())])),
    );
    root.children.push(Node::new("chosen"));
    if let Some(method) = machine.psci_method() {
        root.children.push(
            Node::new("psci")
                .with("compatible", b"arm,psci-1.0\0".to_vec())
                .with("method", format!("{method}\0").into_bytes()),
        );
    }
    let tree = Tree {
        reservations: Vec::new(),
        boot_cpuid: 0,
        root,
    };
    let out = dir.join(format!(
        "cargo-qemu-{}-{}-{}.dtb",
        std::process::id(),
        board.name,
        unique()
    ));
    std::fs::write(&out, tree.to_bytes()).map_err(Error::io(&out))?;
    Ok(out)
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hal::dtb::{parse, parse_for_board, DtbError, Region};

    const VIRT_1G: &[u8] = include_bytes!("../../hal/tests/dtb/virt-1g.dtb");
    const GIB: u64 = 1 << 30;
    const BASE: u64 = 0x4000_0000;

    fn patched(patch: DtbPatch) -> Vec<u8> {
        let mut t = Tree::parse(VIRT_1G).expect("QEMU's tree parses");
        t.apply(patch, BASE, GIB).expect("applies");
        t.to_bytes()
    }

    /// What QEMU's loader does to a `-dtb` before the guest sees it: every
    /// `memory`/`memory@…` node becomes its own.
    fn as_qemu_loads(blob: &[u8]) -> Vec<u8> {
        let mut t = Tree::parse(blob).expect("parses");
        t.root
            .children
            .retain(|n| n.name != "memory" && !n.name.starts_with("memory@"));
        t.root.children.push(
            Node::new("memory@40000000")
                .with("device_type", b"memory\0".to_vec())
                .with("reg", reg(&[(BASE, GIB)])),
        );
        t.to_bytes()
    }

    #[test]
    fn round_trip_keeps_every_fact() {
        let t = Tree::parse(VIRT_1G).expect("parses");
        let again = Tree::parse(&t.to_bytes()).expect("own output parses");
        assert_eq!(t, again);
        let bytes = t.to_bytes();
        let (a, b) = (parse(VIRT_1G).unwrap(), parse(&bytes).unwrap());
        assert_eq!(a.memory.as_slice(), b.memory.as_slice());
        assert_eq!(a.virtio_mmio(), b.virtio_mmio());
        assert_eq!(a.psci, b.psci);
    }

    #[test]
    fn each_patch_gives_its_typed_error_after_qemu_loads_it() {
        let board = hal::board::VIRT;
        let check = |p| parse_for_board(&as_qemu_loads(&patched(p)), &board).map(drop);
        assert!(matches!(
            check(DtbPatch::OverlappingMemory),
            Err(DtbError::MemoryOverlap { .. })
        ));
        assert!(matches!(
            check(DtbPatch::MemoryOverDevices),
            Err(DtbError::MemoryCoversDevices { .. })
        ));
        assert_eq!(
            check(DtbPatch::AllMemoryReserved),
            Err(DtbError::AllMemoryReserved)
        );
        assert!(matches!(
            check(DtbPatch::VirtioInMemory),
            Err(DtbError::VirtioInMemory { .. })
        ));
        // These are valid trees: the firmware has to find out on the machine.
        let blob = as_qemu_loads(&patched(DtbPatch::AlmostAllMemoryReserved));
        let p = parse_for_board(&blob, &board).expect("passes the board check");
        assert_eq!(p.reserved.total(), GIB - (64 << 10));
        let blob = as_qemu_loads(&patched(DtbPatch::MemoryBeyondBacked));
        let p = parse_for_board(&blob, &board).expect("passes the board check");
        assert_eq!(p.memory.total(), 64 * GIB);
        let blob = as_qemu_loads(&patched(DtbPatch::SpreadVirtio));
        let p = parse_for_board(&blob, &board).expect("passes the board check");
        let windows = p.mmio_windows(&board).expect("fits");
        assert_eq!(windows.as_slice().len(), 1 + p.virtio_mmio().len());
        assert!(windows.as_slice().len() > 8);
        assert!(p.virtio_mmio().iter().any(|v| v.region
            == Region {
                base: 0x0a1f_0000,
                size: 0x200
            }));
    }
}
