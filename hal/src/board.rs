//! Board descriptions: the facts generic code needs about a machine, so that
//! adding raspi3b, raspi4b, imx8mp-evk or xlnx-zcu102 touches only this table
//! and a MEMORY linker script.

use crate::dtb::Region;

/// Kind of console UART.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UartKind {
    /// Arm PrimeCell PL011 (QEMU virt, Raspberry Pi, ZCU102 uses Cadence).
    Pl011,
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
}

/// What generic code needs to know about a board.
#[derive(Debug, Clone, Copy)]
pub struct Board {
    /// Short name (`virt`, `raspi4b`, …).
    pub name: &'static str,
    /// Console UART kind.
    pub uart: UartKind,
    /// Console UART register base.
    pub uart_base: u64,
    /// First byte of RAM.
    pub ram_base: u64,
    /// Where the boot loader leaves the DTB when it does not pass it in x0.
    pub dtb_fallback: u64,
    /// Interrupt controller.
    pub gic: GicKind,
    /// Exception level the board's loader enters at by default.
    pub entry_el: u8,
    /// Physical windows the board's memory map gives to devices (MMIO,
    /// flash, PCIe). A device tree whose RAM overlaps one is rejected.
    pub device_windows: &'static [Region],
}

/// QEMU `virt` (hw/arm/virt.c memory map).
pub const VIRT: Board = Board {
    name: "virt",
    uart: UartKind::Pl011,
    uart_base: 0x0900_0000,
    ram_base: 0x4000_0000,
    dtb_fallback: 0x4000_0000,
    gic: GicKind::V3 {
        distributor: 0x0800_0000,
        redistributor: 0x080a_0000,
    },
    entry_el: 1,
    // hw/arm/virt.c: flash, GIC, UART, RTC, fw_cfg, GPIO, virtio-mmio, the
    // platform bus, secure RAM and the 32-bit PCIe windows all lie below
    // RAM, in the first GiB.
    device_windows: &[Region {
        base: 0,
        size: 0x4000_0000,
    }],
};

/// The board this build is for.
#[cfg(feature = "board-virt")]
pub const CURRENT: Board = VIRT;
