//! Where the interrupt controller and the generic timer's INTIDs come from:
//! the boot device tree when it names an interrupt controller (QEMU `virt`,
//! a real board's firmware), else the board description (QEMU's raspi,
//! imx8mp-evk and xlnx-zcu102 models give no tree of their own, and the
//! Pi 3's local controller has no GIC binding to find).

use super::devicetree::{self, GicDescription, GicRegisters, IrqDtError, TimerInterrupts};
use super::intid::Intid;
use super::Interrupt;
use super::Trigger;
use crate::board::{Board, GicKind};
use crate::dtb::Region;

/// GICv2 distributor frame (IHI 0048B, 4.1.2: 4 KiB).
const GICV2_GICD_SIZE: u64 = 0x1000;
/// GICv2 CPU interface frames (GICC_DIR is at 0x1000: 8 KiB).
const GICV2_GICC_SIZE: u64 = 0x2000;
/// GICv3 distributor (IHI 0069, 12.8: 64 KiB).
const GICV3_GICD_SIZE: u64 = 0x1_0000;
/// The GICv3 redistributors of a board's cores: RD_base and SGI_base
/// frames (2 x 64 KiB) for each of up to four cores (the boards have at
/// most four). The boot core drives the first; each secondary finds its
/// own by affinity to be woken from WFI (`wake.rs`).
const GICV3_GICR_SIZE: u64 = 4 * 0x2_0000;
/// The BCM2836 ARM-local block (QA7 rev 3.4: registers 0x00..0xFF).
const BCM2836_LOCAL_SIZE: u64 = 0x100;

/// Which source [`describe`] used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(hw, derive(defmt::Format))]
pub enum ControllerSource {
    /// The boot device tree's interrupt controller and timer nodes.
    DeviceTree,
    /// The board description (`hal::board`).
    Board,
}

/// The interrupt controller and the timer's interrupts, and where they
/// were learnt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(hw, derive(defmt::Format))]
pub struct Description {
    /// The interrupt controller.
    pub gic: GicDescription,
    /// The generic timer's interrupts.
    pub timer: TimerInterrupts,
    /// Where both came from.
    pub source: ControllerSource,
}

fn ppi(n: u32) -> Result<Interrupt, IrqDtError> {
    Ok(Interrupt {
        intid: Intid::ppi(n).map_err(IrqDtError::Board)?,
        trigger: Some(Trigger::Level),
    })
}

/// The interrupt controller and timer interrupts `board` describes.
pub fn from_board(board: &Board) -> Result<(GicDescription, TimerInterrupts), IrqDtError> {
    let registers = match board.gic {
        GicKind::V2 {
            distributor,
            cpu_interface,
        } => GicRegisters::V2 {
            distributor: Region {
                base: distributor,
                size: GICV2_GICD_SIZE,
            },
            cpu_interface: Region {
                base: cpu_interface,
                size: GICV2_GICC_SIZE,
            },
        },
        GicKind::V3 {
            distributor,
            redistributor,
        } => GicRegisters::V3 {
            distributor: Region {
                base: distributor,
                size: GICV3_GICD_SIZE,
            },
            redistributors: Region {
                base: redistributor,
                size: GICV3_GICR_SIZE,
            },
        },
        GicKind::Bcm2836Local { base } => GicRegisters::Bcm2836Local {
            local: Region {
                base,
                size: BCM2836_LOCAL_SIZE,
            },
        },
    };
    let gic = GicDescription {
        registers,
        phandle: None,
        interrupt_cells: 3,
    };
    let t = board.timer_ppis;
    let timer = TimerInterrupts {
        secure_physical: ppi(t.secure_physical)?,
        physical: ppi(t.physical)?,
        virtual_timer: ppi(t.virtual_timer)?,
        hypervisor: ppi(t.hypervisor)?,
        hypervisor_virtual: None,
    };
    Ok((gic, timer))
}

/// The device tree's interrupt controller and timer when `blob` is a tree
/// that names a GIC; the board's when there is no tree or it names no
/// interrupt controller. A tree that names one but is broken is an error,
/// not a reason to fall back (the firmware that wrote it meant it).
pub fn describe(blob: Option<&[u8]>, board: &Board) -> Result<Description, IrqDtError> {
    if let Some(blob) = blob {
        match devicetree::gic(blob) {
            Ok(gic) => {
                let timer = devicetree::timer(blob, &gic)?;
                return Ok(Description {
                    gic,
                    timer,
                    source: ControllerSource::DeviceTree,
                });
            }
            Err(IrqDtError::NoController) => {}
            Err(e) => return Err(e),
        }
    }
    let (gic, timer) = from_board(board)?;
    Ok(Description {
        gic,
        timer,
        source: ControllerSource::Board,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::board;
    use crate::irq::GicVersion;

    const VIRT_V3: &[u8] = include_bytes!("../../tests/dtb/virt-gicv3.dtb");
    /// A tree with memory banks and no interrupt controller.
    const NO_GIC: &[u8] = include_bytes!("../../tests/dtb/multi-bank.dtb");

    fn r(base: u64, size: u64) -> Region {
        Region { base, size }
    }

    #[test]
    fn every_board_describes_its_controller_and_timer() {
        let want = [
            ("raspi3b", GicVersion::Bcm2836Local, 0x4000_0000),
            ("raspi4b", GicVersion::V2, 0xff84_1000),
            ("imx8mp-evk", GicVersion::V3, 0x3880_0000),
            ("xlnx-zcu102", GicVersion::V2, 0xf901_0000),
        ];
        for (name, version, base) in want {
            let b = board::by_name(name).expect("board");
            let d = describe(None, b).expect("describes");
            assert_eq!(d.source, ControllerSource::Board, "{name}");
            assert_eq!(d.gic.version(), version, "{name}");
            assert_eq!(d.gic.base(), base, "{name}");
            assert_eq!(d.timer.physical.intid.raw(), 30, "{name}");
            assert_eq!(d.timer.virtual_timer.intid.raw(), 27, "{name}");
            assert_eq!(d.timer.secure_physical.intid.raw(), 29, "{name}");
            assert_eq!(d.timer.hypervisor.intid.raw(), 26, "{name}");
            assert_eq!(d.timer.physical.trigger, Some(Trigger::Level));
        }
        let pi4 = describe(None, &board::RASPI4B).expect("pi4");
        assert_eq!(
            pi4.gic.regions(),
            [Some(r(0xff84_1000, 0x1000)), Some(r(0xff84_2000, 0x2000))]
        );
        let pi3 = describe(None, &board::RASPI3B).expect("pi3");
        assert_eq!(pi3.gic.regions(), [Some(r(0x4000_0000, 0x100)), None]);
        let evk = describe(None, &board::IMX8MP_EVK).expect("evk");
        assert_eq!(
            evk.gic.regions(),
            [
                Some(r(0x3880_0000, 0x1_0000)),
                Some(r(0x3888_0000, 0x8_0000))
            ]
        );
    }

    /// A tree with a GIC wins over the board; a tree without one (the
    /// tool's stand-in for a board firmware's tree) falls back; a broken
    /// tree is an error.
    #[test]
    fn the_tree_wins_when_it_names_a_controller() {
        let d = describe(Some(VIRT_V3), &board::RASPI4B).expect("tree");
        assert_eq!(d.source, ControllerSource::DeviceTree);
        assert_eq!(d.gic.version(), GicVersion::V3);
        assert_eq!(d.gic.base(), 0x0800_0000);
        let d = describe(Some(NO_GIC), &board::RASPI4B).expect("falls back");
        assert_eq!(d.source, ControllerSource::Board);
        assert_eq!(d.gic.base(), 0xff84_1000);
        assert!(matches!(
            describe(Some(&VIRT_V3[..64]), &board::RASPI4B),
            Err(IrqDtError::Dtb(_))
        ));
    }

    #[test]
    fn a_bad_board_timer_ppi_is_a_typed_error() {
        let mut b = board::RASPI4B;
        b.timer_ppis.physical = 16;
        assert!(matches!(from_board(&b), Err(IrqDtError::Board(_))));
    }
}
