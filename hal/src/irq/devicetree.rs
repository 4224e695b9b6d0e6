//! The interrupt controller and interrupt specifiers in the device tree
//! (Linux bindings `interrupt-controller/arm,gic.yaml` and
//! `arm,gic-v3.yaml`, `timer/arm,arch_timer.yaml`; Devicetree Specification
//! v0.4, 2.4 "Interrupts and Interrupt Mapping", 2.3.8 `ranges`).
//!
//! A GIC specifier is `<type number flags>` (a fourth cell, a GICv3 PPI
//! partition, is accepted and ignored): type 0 is an SPI (INTID `number +
//! 32`), 1 a PPI (`number + 16`), 2 an extended SPI (`number + 4096`), 3 an
//! extended PPI (`number + 1056`); flags bits 3:0 give the trigger (1 rising
//! edge, 2 falling edge, 4 high level, 8 low level; falling and low are
//! invalid for SPIs), bits 15:8 a GICv2 PPI CPU mask. Everything in the tree
//! is checked: bad cells, numbers or flags are typed errors.

use super::intid::{Intid, IntidError};
use crate::dtb::{self, DtbError, Region};
use flat_device_tree::{node::FdtNode, Fdt};

/// Nodes nested deeper than this under the root are not searched.
const MAX_BUS_DEPTH: usize = 8;
/// Register regions kept per node (a GICv2 with virtualization has 4, a
/// GICv3 1 + its redistributor regions + up to 3 legacy ones).
const MAX_REGS: usize = 8;

/// Which GIC architecture the tree names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(hw, derive(defmt::Format))]
pub enum GicVersion {
    /// GICv2 (`arm,cortex-a15-gic`, `arm,gic-400`, …): memory-mapped CPU interface.
    V2,
    /// GICv3 or GICv4 (`arm,gic-v3`): redistributors and system-register CPU interface.
    V3,
    /// No GIC: the BCM2836 per-core local interrupt controller
    /// (`brcm,bcm2836-l1-intc`, Raspberry Pi 3), which routes each core's
    /// generic-timer outputs and mailboxes to its IRQ line.
    Bcm2836Local,
}

/// The GIC's register frames, in the root's physical address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(hw, derive(defmt::Format))]
pub enum GicRegisters {
    /// GICv2: distributor (GICD) and CPU interface (GICC).
    V2 {
        /// GICD.
        distributor: Region,
        /// GICC.
        cpu_interface: Region,
    },
    /// GICv3: distributor (GICD) and the first redistributor region (GICR).
    V3 {
        /// GICD.
        distributor: Region,
        /// The first `#redistributor-regions` entry: contiguous GICR frames.
        redistributors: Region,
    },
    /// The BCM2836 ARM-local block (QA7 rev 3.4, from its base).
    Bcm2836Local {
        /// The block's registers (0x100 bytes).
        local: Region,
    },
}

/// The interrupt controller the tree describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(hw, derive(defmt::Format))]
pub struct GicDescription {
    /// Register frames.
    pub registers: GicRegisters,
    /// The node's phandle, which `interrupt-parent` properties name.
    pub phandle: Option<u32>,
    /// `#interrupt-cells` (3, or 4 on a GICv3 with PPI partitions).
    pub interrupt_cells: usize,
}

impl GicDescription {
    /// GICv2 or GICv3.
    pub const fn version(&self) -> GicVersion {
        match self.registers {
            GicRegisters::V2 { .. } => GicVersion::V2,
            GicRegisters::V3 { .. } => GicVersion::V3,
            GicRegisters::Bcm2836Local { .. } => GicVersion::Bcm2836Local,
        }
    }

    /// The register regions a driver touches, to map them as device memory
    /// (the first is the controller's main block; the second, when there is
    /// one, its CPU interface or redistributors).
    pub const fn regions(&self) -> [Option<Region>; 2] {
        match self.registers {
            GicRegisters::V2 {
                distributor,
                cpu_interface,
            } => [Some(distributor), Some(cpu_interface)],
            GicRegisters::V3 {
                distributor,
                redistributors,
            } => [Some(distributor), Some(redistributors)],
            GicRegisters::Bcm2836Local { local } => [Some(local), None],
        }
    }

    /// Base of the controller's main register block (GICD, or the BCM2836
    /// local block).
    pub const fn base(&self) -> u64 {
        match self.regions()[0] {
            Some(r) => r.base,
            None => 0,
        }
    }
}

/// How an interrupt signals (the GIC's `GICD_ICFGR` setting).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(hw, derive(defmt::Format))]
pub enum Trigger {
    /// Edge triggered (flags 1 or 2).
    Edge,
    /// Level sensitive (flags 4 or 8).
    Level,
}

/// One decoded interrupt specifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(hw, derive(defmt::Format))]
pub struct Interrupt {
    /// The INTID the GIC acknowledges it with.
    pub intid: Intid,
    /// The trigger, or `None` when the flags leave it unspecified (0): the
    /// GIC's configuration is then left as it is.
    pub trigger: Option<Trigger>,
}

/// Why a specifier could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(hw, derive(defmt::Format))]
pub enum SpecifierError {
    /// Not 3 or 4 cells.
    CellCount(usize),
    /// A type cell other than 0 (SPI), 1 (PPI), 2 (extended SPI), 3 (extended PPI).
    UnknownType(u32),
    /// The number is out of range for its type.
    Number(IntidError),
    /// Flags with undefined bits or more than one trigger bit.
    Flags(u32),
    /// Falling edge or low level on an SPI, which the GIC cannot take.
    TriggerInvalidForSpi(u32),
}

/// Why the tree's interrupt description could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(hw, derive(defmt::Format))]
pub enum IrqDtError {
    /// The blob itself is malformed.
    Dtb(DtbError),
    /// No enabled node with a GIC `compatible` and `interrupt-controller`.
    NoController,
    /// `#interrupt-cells` missing or not 3 or 4.
    InterruptCells(u32),
    /// The controller's `reg` has fewer regions than its version needs.
    MissingRegisters {
        /// Regions found.
        found: usize,
    },
    /// A `reg` that does not decode with the parent's cell sizes, or a
    /// region that cannot be translated by the buses' `ranges`.
    BadReg,
    /// No enabled `arm,armv8-timer` (or `arm,armv7-timer`) node.
    NoTimer,
    /// The timer lists fewer than the 4 interrupts the binding requires.
    TooFewTimerInterrupts(usize),
    /// No enabled node with this `compatible` at this address.
    NoDevice,
    /// The node has no `interrupts` property.
    NoInterrupts,
    /// The node (or an ancestor) names an interrupt parent other than the GIC.
    ForeignParent(u32),
    /// Neither the node nor any ancestor has an `interrupt-parent`.
    NoInterruptParent,
    /// The board description names an INTID that does not exist.
    Board(IntidError),
    /// Specifier `index` of the node's `interrupts` is bad.
    Specifier {
        /// Which specifier (0-based).
        index: usize,
        /// What is wrong with it.
        error: SpecifierError,
    },
}

impl From<DtbError> for IrqDtError {
    fn from(e: DtbError) -> Self {
        Self::Dtb(e)
    }
}

/// Decodes one GIC interrupt specifier, `<type number flags>` (a fourth
/// cell is ignored).
pub fn decode_specifier(cells: &[u32]) -> Result<Interrupt, SpecifierError> {
    let (kind, number, flags) = match *cells {
        [kind, number, flags] | [kind, number, flags, _] => (kind, number, flags),
        _ => return Err(SpecifierError::CellCount(cells.len())),
    };
    let intid = match kind {
        0 => Intid::spi(number),
        1 => Intid::ppi(number),
        2 => Intid::extended_spi(number),
        3 => Intid::extended_ppi(number),
        other => return Err(SpecifierError::UnknownType(other)),
    }
    .map_err(SpecifierError::Number)?;
    // Bits 15:8 are the GICv2 PPI CPU mask, bits 3:0 the trigger; no other
    // bit is defined.
    if flags & !0xff0f != 0 {
        return Err(SpecifierError::Flags(flags));
    }
    let spi = matches!(kind, 0 | 2);
    let trigger = match flags & 0xf {
        0 => None,
        1 => Some(Trigger::Edge),
        4 => Some(Trigger::Level),
        2 | 8 if spi => return Err(SpecifierError::TriggerInvalidForSpi(flags)),
        2 => Some(Trigger::Edge),
        8 => Some(Trigger::Level),
        _ => return Err(SpecifierError::Flags(flags)),
    };
    Ok(Interrupt { intid, trigger })
}

/// The Arm generic timer's interrupts, in the binding's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(hw, derive(defmt::Format))]
pub struct TimerInterrupts {
    /// Secure EL1 physical timer.
    pub secure_physical: Interrupt,
    /// Non-secure EL1 physical timer (CNTP_*_EL0 at Non-secure EL1).
    pub physical: Interrupt,
    /// EL1 virtual timer (CNTV_*_EL0).
    pub virtual_timer: Interrupt,
    /// EL2 physical timer.
    pub hypervisor: Interrupt,
    /// EL2 virtual timer, if listed (FEAT_VHE).
    pub hypervisor_virtual: Option<Interrupt>,
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    let w = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([w[0], w[1], w[2], w[3]]))
}

fn u32_prop(node: FdtNode<'_, '_>, name: &str) -> Option<u32> {
    node.property(name)
        .and_then(|p| be32(p.value, 0).filter(|_| p.value.len() == 4))
}

fn has_compatible(node: FdtNode<'_, '_>, wanted: &[&str]) -> bool {
    node.property("compatible").is_some_and(|c| {
        c.value
            .split(|&b| b == 0)
            .any(|s| wanted.iter().any(|w| w.as_bytes() == s))
    })
}

fn enabled(node: FdtNode<'_, '_>) -> bool {
    node.property("status")
        .and_then(|s| s.as_str())
        .is_none_or(|s| s == "okay" || s == "ok")
}

/// `#address-cells` and `#size-cells` a node gives its children.
fn child_cells(node: FdtNode<'_, '_>) -> (u32, u32) {
    (
        u32_prop(node, "#address-cells").unwrap_or(2),
        u32_prop(node, "#size-cells").unwrap_or(1),
    )
}

fn read_cells(value: &[u8], at: usize, cells: u32) -> Result<u64, IrqDtError> {
    match cells {
        0 => Ok(0),
        1 => be32(value, at).map(u64::from).ok_or(IrqDtError::BadReg),
        2 => Ok(
            (u64::from(be32(value, at).ok_or(IrqDtError::BadReg)?) << 32)
                | u64::from(be32(value, at + 4).ok_or(IrqDtError::BadReg)?),
        ),
        _ => Err(IrqDtError::BadReg),
    }
}

/// Register regions of a node, in its parent's address space.
#[derive(Debug, Clone, Copy)]
struct Regs {
    items: [Region; MAX_REGS],
    len: usize,
}

impl Regs {
    fn as_slice(&self) -> &[Region] {
        &self.items[..self.len]
    }
}

fn decode_reg(node: FdtNode<'_, '_>, ac: u32, sc: u32) -> Result<Regs, IrqDtError> {
    let mut regs = Regs {
        items: [Region::default(); MAX_REGS],
        len: 0,
    };
    let Some(reg) = node.property("reg") else {
        return Ok(regs);
    };
    if !(1..=2).contains(&ac) || sc > 2 {
        return Err(IrqDtError::BadReg);
    }
    let entry = 4 * (ac + sc) as usize;
    if !reg.value.len().is_multiple_of(entry) {
        return Err(IrqDtError::BadReg);
    }
    for at in (0..reg.value.len()).step_by(entry).take(MAX_REGS) {
        let base = read_cells(reg.value, at, ac)?;
        let size = read_cells(reg.value, at + 4 * ac as usize, sc)?;
        base.checked_add(size).ok_or(IrqDtError::BadReg)?;
        regs.items[regs.len] = Region { base, size };
        regs.len += 1;
    }
    Ok(regs)
}

/// Translates `regs` from `bus`'s child address space into its parent's
/// (`parent_ac` cells) through `bus`'s `ranges`; an empty `ranges` is the
/// identity.
fn translate(bus: FdtNode<'_, '_>, parent_ac: u32, regs: &mut Regs) -> Result<(), IrqDtError> {
    let ranges = bus.property("ranges").ok_or(IrqDtError::BadReg)?.value;
    if ranges.is_empty() {
        return Ok(());
    }
    let (ac, sc) = child_cells(bus);
    let entry = 4 * (ac + parent_ac + sc) as usize;
    if entry == 0 || !ranges.len().is_multiple_of(entry) {
        return Err(IrqDtError::BadReg);
    }
    for r in regs.items[..regs.len].iter_mut() {
        let mut done = false;
        for at in (0..ranges.len()).step_by(entry) {
            let child = read_cells(ranges, at, ac)?;
            let parent = read_cells(ranges, at + 4 * ac as usize, parent_ac)?;
            let len = read_cells(ranges, at + 4 * (ac + parent_ac) as usize, sc)?;
            let inside = r.base >= child
                && r.base
                    .checked_add(r.size)
                    .is_some_and(|end| child.checked_add(len).is_some_and(|limit| end <= limit));
            if inside {
                r.base = (r.base - child)
                    .checked_add(parent)
                    .filter(|b| b.checked_add(r.size).is_some())
                    .ok_or(IrqDtError::BadReg)?;
                done = true;
                break;
            }
        }
        if !done {
            return Err(IrqDtError::BadReg);
        }
    }
    Ok(())
}

/// A node the search matched, with what it inherits from its ancestors.
struct Found<'b, 'a> {
    node: FdtNode<'b, 'a>,
    /// `reg`, translated to the root's address space.
    regs: Regs,
    /// Its own `interrupt-parent`, else the nearest ancestor's.
    interrupt_parent: Option<u32>,
}

/// Calls `visit` on every enabled node matching `pred` (depth first, in
/// tree order) until it returns `Some`. Only buses with `ranges` are
/// entered, so every `reg` handed out can be translated.
fn search<'b, 'a, T>(
    parent: FdtNode<'b, 'a>,
    depth: usize,
    inherited_parent: Option<u32>,
    pred: &dyn Fn(FdtNode<'b, 'a>) -> bool,
    visit: &mut dyn FnMut(Found<'b, 'a>) -> Result<Option<T>, IrqDtError>,
) -> Result<Option<T>, IrqDtError> {
    let (ac, sc) = child_cells(parent);
    let inherited_parent = u32_prop(parent, "interrupt-parent").or(inherited_parent);
    for child in parent.children() {
        if !enabled(child) {
            continue;
        }
        if pred(child) {
            let found = Found {
                node: child,
                regs: decode_reg(child, ac, sc)?,
                interrupt_parent: u32_prop(child, "interrupt-parent").or(inherited_parent),
            };
            if let Some(t) = visit(found)? {
                return Ok(Some(t));
            }
        }
        if depth < MAX_BUS_DEPTH && child.property("ranges").is_some() {
            let mut inner = |mut f: Found<'b, 'a>| {
                translate(child, ac, &mut f.regs)?;
                visit(f)
            };
            if let Some(t) = search(child, depth + 1, inherited_parent, pred, &mut inner)? {
                return Ok(Some(t));
            }
        }
    }
    Ok(None)
}

fn open(blob: &[u8]) -> Result<Fdt<'_>, IrqDtError> {
    let blob = dtb::validate(blob)?;
    Fdt::new(blob).map_err(|_| IrqDtError::Dtb(DtbError::Parser))
}

/// Compatible strings of GICv2-style controllers (memory-mapped CPU interface).
const GIC_V2: &[&str] = &[
    "arm,cortex-a15-gic",
    "arm,gic-400",
    "arm,cortex-a9-gic",
    "arm,cortex-a7-gic",
    "arm,arm11mp-gic",
];
/// Compatible strings of GICv3/v4 controllers.
const GIC_V3: &[&str] = &["arm,gic-v3"];

/// Finds the GIC: validates `blob`, then looks for an enabled node with a
/// GIC `compatible` and an `interrupt-controller` property.
pub fn gic(blob: &[u8]) -> Result<GicDescription, IrqDtError> {
    let fdt = open(blob)?;
    let root = fdt
        .find_node("/")
        .ok_or(IrqDtError::Dtb(DtbError::Parser))?;
    let pred = |n: FdtNode<'_, '_>| {
        n.property("interrupt-controller").is_some()
            && (has_compatible(n, GIC_V2) || has_compatible(n, GIC_V3))
    };
    let mut visit = |f: Found<'_, '_>| -> Result<Option<GicDescription>, IrqDtError> {
        let cells = u32_prop(f.node, "#interrupt-cells").unwrap_or(0);
        if !(3..=4).contains(&cells) {
            return Err(IrqDtError::InterruptCells(cells));
        }
        let regs = f.regs.as_slice();
        let (first, second) = match regs {
            [a, b, ..] => (*a, *b),
            _ => return Err(IrqDtError::MissingRegisters { found: regs.len() }),
        };
        let registers = if has_compatible(f.node, GIC_V3) {
            GicRegisters::V3 {
                distributor: first,
                redistributors: second,
            }
        } else {
            GicRegisters::V2 {
                distributor: first,
                cpu_interface: second,
            }
        };
        Ok(Some(GicDescription {
            registers,
            phandle: u32_prop(f.node, "phandle"),
            interrupt_cells: cells as usize,
        }))
    };
    search(root, 0, None, &pred, &mut visit)?.ok_or(IrqDtError::NoController)
}

/// The node's interrupts, each decoded; `out` receives up to its length.
fn node_interrupts(
    f: &Found<'_, '_>,
    gic: &GicDescription,
    out: &mut [Option<Interrupt>],
) -> Result<usize, IrqDtError> {
    match (f.interrupt_parent, gic.phandle) {
        (None, _) => return Err(IrqDtError::NoInterruptParent),
        (Some(p), Some(g)) if p == g => {}
        (Some(p), _) => return Err(IrqDtError::ForeignParent(p)),
    }
    let value = f
        .node
        .property("interrupts")
        .ok_or(IrqDtError::NoInterrupts)?
        .value;
    let entry = 4 * gic.interrupt_cells;
    if value.is_empty() {
        return Err(IrqDtError::NoInterrupts);
    }
    if !value.len().is_multiple_of(entry) {
        return Err(IrqDtError::Specifier {
            index: value.len() / entry,
            error: SpecifierError::CellCount((value.len() % entry) / 4),
        });
    }
    let count = value.len() / entry;
    for (index, slot) in out.iter_mut().enumerate().take(count) {
        let mut cells = [0u32; 4];
        for (i, c) in cells[..gic.interrupt_cells].iter_mut().enumerate() {
            *c = be32(value, index * entry + 4 * i).ok_or(IrqDtError::BadReg)?;
        }
        let spec = decode_specifier(&cells[..gic.interrupt_cells])
            .map_err(|error| IrqDtError::Specifier { index, error })?;
        *slot = Some(spec);
    }
    Ok(count)
}

/// The generic timer's interrupts, from the enabled `arm,armv8-timer` node.
pub fn timer(blob: &[u8], gic: &GicDescription) -> Result<TimerInterrupts, IrqDtError> {
    let fdt = open(blob)?;
    let root = fdt
        .find_node("/")
        .ok_or(IrqDtError::Dtb(DtbError::Parser))?;
    let pred = |n: FdtNode<'_, '_>| has_compatible(n, &["arm,armv8-timer", "arm,armv7-timer"]);
    let mut visit = |f: Found<'_, '_>| -> Result<Option<TimerInterrupts>, IrqDtError> {
        let mut list = [None; 5];
        let count = node_interrupts(&f, gic, &mut list)?;
        match list {
            [Some(secure_physical), Some(physical), Some(virtual_timer), Some(hypervisor), hv] => {
                Ok(Some(TimerInterrupts {
                    secure_physical,
                    physical,
                    virtual_timer,
                    hypervisor,
                    hypervisor_virtual: hv,
                }))
            }
            _ => Err(IrqDtError::TooFewTimerInterrupts(count)),
        }
    };
    search(root, 0, None, &pred, &mut visit)?.ok_or(IrqDtError::NoTimer)
}

/// The first interrupt of the enabled device with `compatible` whose first
/// `reg` region starts at `base` (for example a `virtio,mmio` transport).
pub fn device_interrupt(
    blob: &[u8],
    gic: &GicDescription,
    compatible: &str,
    base: u64,
) -> Result<Interrupt, IrqDtError> {
    let fdt = open(blob)?;
    let root = fdt
        .find_node("/")
        .ok_or(IrqDtError::Dtb(DtbError::Parser))?;
    let wanted = [compatible];
    let pred = |n: FdtNode<'_, '_>| has_compatible(n, &wanted);
    let mut visit = |f: Found<'_, '_>| -> Result<Option<Interrupt>, IrqDtError> {
        if f.regs.as_slice().first().map(|r| r.base) != Some(base) {
            return Ok(None);
        }
        let mut first = [None];
        node_interrupts(&f, gic, &mut first)?;
        Ok(first[0])
    };
    search(root, 0, None, &pred, &mut visit)?.ok_or(IrqDtError::NoDevice)
}

#[cfg(test)]
mod tests;
