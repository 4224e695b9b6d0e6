//! Board descriptions: the facts generic code needs about a machine (RAM,
//! console, interrupt controller, timer, secondaries, power-off, PSCI), so
//! that generic code never names a board. One build per board: the cargo
//! feature `board-<name>` picks [`CURRENT`] and the MEMORY linker script
//! `link/<name>.ld`.
//!
//! Facts come from each SoC's reference manual and the QEMU 10 models
//! (hw/arm/virt.c, raspi4b.c, bcm2836.c, fsl-imx8mp.c, xlnx-zynqmp.c).

use crate::dtb::{PsciConduit, Region};

/// Kind of console UART.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UartKind {
    /// Arm PrimeCell PL011 (QEMU virt; the Pi's Bluetooth UART).
    Pl011,
    /// BCM2835 AUX mini-UART; the base is the AUX block (IO at +0x40).
    MiniUart,
    /// i.MX UART (i.MX 8M Plus RM, chapter "UART").
    Imx,
    /// Cadence UART (Zynq UltraScale+ TRM UG1085, chapter 21).
    Cadence,
}

/// Kind of interrupt controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GicKind {
    /// GICv2: distributor + CPU interface.
    V2 {
        distributor: u64,
        cpu_interface: u64,
    },
    /// GICv3: distributor + redistributors.
    V3 {
        distributor: u64,
        redistributor: u64,
    },
    /// No GIC: the BCM2836 per-core local interrupt controller (Pi 3).
    Bcm2836Local { base: u64 },
}

/// The generic timer's interrupts as PPI numbers, the way a device tree's
/// `arm,armv8-timer` node lists them (INTID = 16 + n). On the Pi 3, which
/// has no GIC, the BCM2836 local controller's four timer sources are
/// presented under these same INTIDs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerPpis {
    /// Secure EL1 physical timer.
    pub secure_physical: u32,
    /// Non-secure EL1 physical timer.
    pub physical: u32,
    /// EL1 virtual timer.
    pub virtual_timer: u32,
    /// EL2 physical timer.
    pub hypervisor: u32,
}

/// The PPIs the Server Base System Architecture recommends and every board
/// here uses (Linux `arm,armv8-timer` nodes: 13, 14, 11, 10).
pub const SBSA_TIMER_PPIS: TimerPpis = TimerPpis {
    secure_physical: 13,
    physical: 14,
    virtual_timer: 11,
    hypervisor: 10,
};

/// How secondary cores get started once parked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secondaries {
    /// PSCI CPU_ON through the board's conduit.
    Psci,
    /// A spin table: core n (1-based) waits for an entry address at
    /// `release[n - 1]` (Linux `cpu-release-addr`), woken by SEV.
    SpinTable { release: [u64; 3] },
    /// PSCI CPU_ON below EL3; entered at EL3 (no PSCI) the reset-address
    /// registers: core n's entry goes into RVBAR low at `rvbar + 8n` and
    /// high at `+ 4`, then bit n of `apu_reset` (the core's reset) is
    /// cleared and it starts there at EL3 (ZCU102: APU 0xFD5C_0040, CRF
    /// RST_FPD_APU 0xFD1A_0104).
    PsciOrResetAddress {
        /// RVBARADDR0L; core n's pair is 8n further.
        rvbar: u64,
        /// The register whose bit n holds core n in reset.
        apu_reset: u64,
    },
}

/// How the board powers itself off when PSCI is not available.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerOff {
    /// Only PSCI SYSTEM_OFF (or a semihosting exit).
    Psci,
    /// BCM2835 PM watchdog: RSTS "halt" partition 0x555, then a full reset.
    BcmWatchdog { pm_base: u64 },
    /// i.MX SNVS LPCR DP_EN | TOP (switch the PMIC off).
    Snvs { base: u64 },
}

/// Where memory is learnt when there is no device tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemorySource {
    /// Nothing but the board default.
    None,
    /// The VideoCore mailbox (property channel 8, GET_ARM_MEMORY) at `base`
    /// (the mailbox block, mailbox 0 at +0x880).
    VideoCoreMailbox { base: u64 },
}

/// A known-wrong memory node QEMU (or a loader) produces for this board.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryQuirk {
    /// None known.
    None,
    /// DDR is split: at most `low_top` bytes from 0, the rest at `high_base`
    /// (ZynqMP: 2 GiB low, then 0x8_0000_0000). A node claiming one range
    /// across `low_top` is split there.
    SplitDdr { low_top: u64, high_base: u64 },
    /// A node that is exactly RAM base..`split` (the VideoCore's share
    /// cut off) lists only the first GiB: QEMU's raspi4b writes it for its
    /// 2 GiB, where a Pi 4's firmware lists the RAM above 1 GiB as a second
    /// range. The range is used as it is (what lies above cannot be told
    /// from it) and the board says so.
    VideoCoreSplitOnly { split: u64 },
}

/// What generic code needs to know about a board.
#[derive(Debug, Clone, Copy)]
pub struct Board {
    /// Short name (`virt`, `raspi4b`, …), as `--board` takes it.
    pub name: &'static str,
    /// Console UART kind.
    pub uart: UartKind,
    /// Console UART register base.
    pub uart_base: u64,
    /// First byte of RAM.
    pub ram_base: u64,
    /// RAM when neither a device tree nor a board source says otherwise.
    pub ram_default: &'static [Region],
    /// Where the boot loader leaves the DTB when it does not pass it in x0
    /// (an ELF loaded with `-dtb` gets it at the start of RAM).
    pub dtb_fallback: u64,
    /// Interrupt controller.
    pub gic: GicKind,
    /// Nominal generic-timer frequency, used only when CNTFRQ_EL0 reads 0.
    pub timer_hz: u64,
    /// The generic timer's interrupts, when the device tree names none.
    pub timer_ppis: TimerPpis,
    /// Exception level the real board's loader enters at (Pi firmware and
    /// U-Boot: EL2).
    pub entry_el: u8,
    /// How secondaries are started (they are parked by MPIDR at entry).
    pub secondaries: Secondaries,
    /// Power-off without PSCI.
    pub power_off: PowerOff,
    /// PSCI conduit when entered below EL3 and no device tree names one.
    pub psci: Option<PsciConduit>,
    /// Where memory comes from without a device tree.
    pub memory_source: MemorySource,
    /// A known-wrong memory node and how to correct it.
    pub memory_quirk: MemoryQuirk,
    /// RAM the firmware must never hand out (spin table, the null page).
    pub reserved: &'static [Region],
    /// Device pages the firmware touches besides the console (power-off
    /// registers, mailbox): mapped Device-nGnRE.
    pub mmio: &'static [Region],
    /// Physical windows the board's memory map gives to devices (MMIO,
    /// flash, PCIe). A device tree whose RAM overlaps one is rejected.
    pub device_windows: &'static [Region],
}

const fn r(base: u64, size: u64) -> Region {
    Region { base, size }
}

const PAGE: u64 = 0x1000;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// QEMU `virt` (hw/arm/virt.c memory map).
pub const VIRT: Board = Board {
    name: "virt",
    uart: UartKind::Pl011,
    uart_base: 0x0900_0000,
    ram_base: 0x4000_0000,
    ram_default: &[r(0x4000_0000, 128 * MIB)],
    dtb_fallback: 0x4000_0000,
    gic: GicKind::V3 {
        distributor: 0x0800_0000,
        redistributor: 0x080a_0000,
    },
    timer_hz: 62_500_000,
    timer_ppis: SBSA_TIMER_PPIS,
    entry_el: 1,
    secondaries: Secondaries::Psci,
    power_off: PowerOff::Psci,
    psci: Some(PsciConduit::Hvc),
    memory_source: MemorySource::None,
    memory_quirk: MemoryQuirk::None,
    reserved: &[],
    mmio: &[],
    // hw/arm/virt.c: flash, GIC, UART, RTC, fw_cfg, GPIO, virtio-mmio, the
    // platform bus, secure RAM and the 32-bit PCIe windows all lie below
    // RAM, in the first GiB.
    device_windows: &[r(0, GIB)],
};

/// Raspberry Pi 3B (BCM2837): peripherals at 0x3F00_0000, ARM local block
/// at 0x4000_0000, the VideoCore owns the top of the first GiB.
pub const RASPI3B: Board = Board {
    name: "raspi3b",
    uart: UartKind::MiniUart,
    uart_base: 0x3f21_5000,
    ram_base: 0,
    ram_default: &[r(0, 0x3c00_0000)],
    dtb_fallback: 0,
    gic: GicKind::Bcm2836Local { base: 0x4000_0000 },
    timer_hz: 19_200_000,
    timer_ppis: SBSA_TIMER_PPIS,
    entry_el: 2,
    secondaries: Secondaries::SpinTable {
        release: [0xe0, 0xe8, 0xf0],
    },
    power_off: PowerOff::BcmWatchdog {
        pm_base: 0x3f10_0000,
    },
    psci: None,
    memory_source: MemorySource::VideoCoreMailbox { base: 0x3f00_b000 },
    memory_quirk: MemoryQuirk::None,
    // The armstub / QEMU stub and the spin table live in the first page.
    reserved: &[r(0, PAGE)],
    mmio: &[r(0x3f00_b000, PAGE), r(0x3f10_0000, PAGE)],
    device_windows: &[r(0x3f00_0000, 0x0104_0000)],
};

/// Raspberry Pi 4B (BCM2711) in low-peripheral mode: peripherals at
/// 0xFE00_0000, ARM local at 0xFF80_0000, GIC-400 at 0xFF84_0000.
pub const RASPI4B: Board = Board {
    name: "raspi4b",
    uart: UartKind::MiniUart,
    uart_base: 0xfe21_5000,
    ram_base: 0,
    ram_default: &[r(0, 0x3c00_0000)],
    dtb_fallback: 0,
    gic: GicKind::V2 {
        distributor: 0xff84_1000,
        cpu_interface: 0xff84_2000,
    },
    timer_hz: 54_000_000,
    timer_ppis: SBSA_TIMER_PPIS,
    entry_el: 2,
    secondaries: Secondaries::SpinTable {
        release: [0xe0, 0xe8, 0xf0],
    },
    power_off: PowerOff::BcmWatchdog {
        pm_base: 0xfe10_0000,
    },
    psci: None,
    memory_source: MemorySource::VideoCoreMailbox { base: 0xfe00_b000 },
    memory_quirk: MemoryQuirk::VideoCoreSplitOnly { split: 0x3c00_0000 },
    reserved: &[r(0, PAGE)],
    mmio: &[r(0xfe00_b000, PAGE), r(0xfe10_0000, PAGE)],
    device_windows: &[r(0xfc00_0000, 0x0400_0000)],
};

/// NXP i.MX 8M Plus EVK: DDR from 0x4000_0000, console UART2, GICv3.
pub const IMX8MP_EVK: Board = Board {
    name: "imx8mp-evk",
    uart: UartKind::Imx,
    uart_base: 0x3089_0000,
    ram_base: 0x4000_0000,
    ram_default: &[r(0x4000_0000, 128 * MIB)],
    dtb_fallback: 0x4000_0000,
    gic: GicKind::V3 {
        distributor: 0x3880_0000,
        redistributor: 0x3888_0000,
    },
    timer_hz: 8_000_000,
    timer_ppis: SBSA_TIMER_PPIS,
    entry_el: 2,
    secondaries: Secondaries::Psci,
    power_off: PowerOff::Snvs { base: 0x3037_0000 },
    psci: Some(PsciConduit::Smc),
    memory_source: MemorySource::None,
    memory_quirk: MemoryQuirk::None,
    reserved: &[],
    mmio: &[r(0x3037_0000, PAGE)],
    // Boot ROM, OCRAM, AIPS peripheral buses, GIC: all below 0x4000_0000.
    device_windows: &[r(0, GIB)],
};

/// AMD/Xilinx ZCU102 (Zynq UltraScale+ MPSoC): DDR 0..2 GiB and from
/// 0x8_0000_0000, Cadence UART0, GIC-400.
pub const XLNX_ZCU102: Board = Board {
    name: "xlnx-zcu102",
    uart: UartKind::Cadence,
    uart_base: 0xff00_0000,
    ram_base: 0,
    ram_default: &[r(0, 128 * MIB)],
    dtb_fallback: 0,
    gic: GicKind::V2 {
        distributor: 0xf901_0000,
        cpu_interface: 0xf902_0000,
    },
    timer_hz: 100_000_000,
    timer_ppis: SBSA_TIMER_PPIS,
    entry_el: 2,
    secondaries: Secondaries::PsciOrResetAddress {
        rvbar: 0xfd5c_0040,
        apu_reset: 0xfd1a_0104,
    },
    power_off: PowerOff::Psci,
    psci: Some(PsciConduit::Smc),
    memory_source: MemorySource::None,
    memory_quirk: MemoryQuirk::SplitDdr {
        low_top: 2 * GIB,
        high_base: 0x8_0000_0000,
    },
    // Physical page 0 is RAM here; keep it out of the allocator so no
    // frame ever has the null address.
    reserved: &[r(0, PAGE)],
    // CRF_APB (RST_FPD_APU) and the APU block (RVBARADDRn), for starting
    // the secondaries when entered at EL3.
    mmio: &[r(0xfd1a_0000, PAGE), r(0xfd5c_0000, PAGE)],
    // PL (FPGA) windows, PCIe, the low peripheral block, OCM: 2..4 GiB.
    device_windows: &[r(2 * GIB, 2 * GIB)],
};

/// Every board, for the host tool.
pub const ALL: &[Board] = &[VIRT, RASPI3B, RASPI4B, IMX8MP_EVK, XLNX_ZCU102];

/// The board called `name`.
pub fn by_name(name: &str) -> Option<&'static Board> {
    ALL.iter().find(|b| b.name == name)
}

/// What [`Board::correct_memory`] did to one memory range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryCorrection {
    /// `claimed` crossed the low DDR top: it became `low` and `high`.
    Split {
        claimed: Region,
        low: Region,
        high: Region,
    },
    /// `claimed` is known to leave RAM out (see
    /// [`MemoryQuirk::VideoCoreSplitOnly`]); it is kept as it is.
    Incomplete { claimed: Region },
}

impl Board {
    /// Corrects a memory node known to be wrong on this board, range by
    /// range: `memory` is rewritten in place (at most `out.len()` ranges)
    /// and each change is reported to `note`.
    pub fn correct_memory(
        &self,
        memory: &[Region],
        out: &mut [Region],
        mut note: impl FnMut(MemoryCorrection),
    ) -> Option<usize> {
        let mut n = 0;
        let mut put = |reg: Region, n: &mut usize| -> Option<()> {
            *out.get_mut(*n)? = reg;
            *n += 1;
            Some(())
        };
        for &m in memory {
            match self.memory_quirk {
                MemoryQuirk::SplitDdr { low_top, high_base }
                    if m.base < low_top && m.end() > low_top =>
                {
                    let low = r(m.base, low_top - m.base);
                    let high = r(high_base, m.end() - low_top);
                    put(low, &mut n)?;
                    put(high, &mut n)?;
                    note(MemoryCorrection::Split {
                        claimed: m,
                        low,
                        high,
                    });
                }
                MemoryQuirk::VideoCoreSplitOnly { split }
                    if memory.len() == 1 && m.base == self.ram_base && m.end() == split =>
                {
                    put(m, &mut n)?;
                    note(MemoryCorrection::Incomplete { claimed: m });
                }
                _ => put(m, &mut n)?,
            }
        }
        Some(n)
    }
}

/// The board this build is for.
#[cfg(feature = "board-virt")]
pub const CURRENT: Board = VIRT;
/// The board this build is for.
#[cfg(feature = "board-raspi3b")]
pub const CURRENT: Board = RASPI3B;
/// The board this build is for.
#[cfg(feature = "board-raspi4b")]
pub const CURRENT: Board = RASPI4B;
/// The board this build is for.
#[cfg(feature = "board-imx8mp-evk")]
pub const CURRENT: Board = IMX8MP_EVK;
/// The board this build is for.
#[cfg(feature = "board-xlnx-zcu102")]
pub const CURRENT: Board = XLNX_ZCU102;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_found() {
        for b in ALL {
            assert_eq!(by_name(b.name).map(|x| x.name), Some(b.name));
        }
        assert!(by_name("nope").is_none());
    }

    #[test]
    fn console_and_ram_clear_of_device_windows() {
        for b in ALL {
            for ram in b.ram_default {
                assert!(
                    !b.device_windows.iter().any(|d| d.overlaps(ram)),
                    "{}",
                    b.name
                );
                assert!(ram.base >= b.ram_base, "{}", b.name);
            }
            assert!(
                b.ram_default
                    .iter()
                    .any(|m| m.base <= b.dtb_fallback && b.dtb_fallback < m.end()),
                "{}: DTB fallback in RAM",
                b.name
            );
            assert!(
                !b.ram_default
                    .iter()
                    .any(|m| m.base <= b.uart_base && b.uart_base < m.end()),
                "{}: console not in RAM",
                b.name
            );
        }
    }

    /// QEMU's raspi4b node (0..0x3C00_0000 whatever the RAM) is kept and
    /// reported; a node with RAM above 1 GiB, as a Pi 4's firmware writes
    /// it, is not.
    #[test]
    fn raspi4b_videocore_split_only_node_is_reported() {
        let mut out = [Region::default(); 4];
        let mut notes = Vec::new();
        let qemu = [r(0, 0x3c00_0000)];
        let n = RASPI4B
            .correct_memory(&qemu, &mut out, |c| notes.push(c))
            .expect("fits");
        assert_eq!(&out[..n], &qemu);
        assert_eq!(
            notes,
            [MemoryCorrection::Incomplete {
                claimed: r(0, 0x3c00_0000)
            }]
        );
        notes.clear();
        let firmware = [r(0, 0x3b40_0000), r(0x4000_0000, 0xbc00_0000)];
        let n = RASPI4B
            .correct_memory(&firmware, &mut out, |c| notes.push(c))
            .expect("fits");
        assert_eq!(&out[..n], &firmware);
        let n = RASPI4B
            .correct_memory(&[r(0, 0x3c00_0000), r(0x4000_0000, GIB)], &mut out, |c| {
                notes.push(c)
            })
            .expect("fits");
        assert_eq!(n, 2);
        assert!(notes.is_empty());
        // The Pi 3's 0..0x3C00_0000 is all of its ARM memory: no note.
        RASPI3B
            .correct_memory(&qemu, &mut out, |c| notes.push(c))
            .expect("fits");
        assert!(notes.is_empty());
    }

    /// QEMU's zcu102 with -m 4G says 0..4 GiB; the board splits it.
    #[test]
    fn zcu102_memory_node_is_split_at_2g() {
        let mut out = [Region::default(); 4];
        let mut notes = 0;
        let n = XLNX_ZCU102
            .correct_memory(&[r(0, 4 * GIB)], &mut out, |_| notes += 1)
            .expect("fits");
        assert_eq!(&out[..n], &[r(0, 2 * GIB), r(0x8_0000_0000, 2 * GIB)]);
        assert_eq!(notes, 1);
        // A node that stays below 2 GiB is left alone.
        let n = XLNX_ZCU102
            .correct_memory(&[r(0, GIB)], &mut out, |_| notes += 1)
            .expect("fits");
        assert_eq!(&out[..n], &[r(0, GIB)]);
        assert_eq!(notes, 1);
        // Other boards never rewrite.
        let n = RASPI4B
            .correct_memory(&[r(0, 4 * GIB)], &mut out, |_| notes += 1)
            .expect("fits");
        assert_eq!(&out[..n], &[r(0, 4 * GIB)]);
        assert_eq!(notes, 1);
        // Too many ranges for the output is None, not a panic.
        assert_eq!(
            XLNX_ZCU102.correct_memory(&[r(0, 4 * GIB)], &mut out[..1], |_| ()),
            None
        );
    }
}
