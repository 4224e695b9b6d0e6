//! BCM2835 AUX mini-UART (BCM2835 ARM Peripherals, section 2.2 "Mini
//! UART"), the console on a Raspberry Pi's header pins (GPIO14/15, ALT5),
//! written with `tock-registers`.
//!
//! The Pi firmware (`enable_uart=1`) muxes the pins and sets the baud rate
//! from the core clock; this driver only enables the block, 8-bit mode and
//! the transmitter/receiver. The mini-UART has no loopback mode.

use crate::mmio::MmioBlock;
use tock_registers::{
    interfaces::{ReadWriteable, Readable, Writeable},
    register_bitfields, register_structs,
    registers::{ReadOnly, ReadWrite},
};

register_bitfields! {u32,
    /// AUX_ENABLES (2.1.1).
    ENABLES [
        MINI_UART OFFSET(0) NUMBITS(1) [],
    ],
    /// AUX_MU_IO_REG (2.2.2).
    IO [
        DATA OFFSET(0) NUMBITS(8) [],
    ],
    /// AUX_MU_LCR_REG (2.2.2): data size.
    LCR [
        DATA_SIZE OFFSET(0) NUMBITS(2) [SevenBit = 0b00, EightBit = 0b11],
    ],
    /// AUX_MU_LSR_REG (2.2.2).
    LSR [
        /// The transmitter is idle (FIFO empty and shifter done).
        TX_IDLE OFFSET(6) NUMBITS(1) [],
        /// The transmit FIFO can accept at least one byte.
        TX_EMPTY OFFSET(5) NUMBITS(1) [],
        /// The receive FIFO holds at least one byte.
        DATA_READY OFFSET(0) NUMBITS(1) [],
    ],
    /// AUX_MU_CNTL_REG (2.2.2).
    CNTL [
        TX_ENABLE OFFSET(1) NUMBITS(1) [],
        RX_ENABLE OFFSET(0) NUMBITS(1) [],
    ],
}

register_structs! {
    /// The AUX block, from its base (0x7E21_5000 bus address).
    pub Registers {
        (0x00 => _irq),
        (0x04 => enables: ReadWrite<u32, ENABLES::Register>),
        (0x08 => _reserved0),
        (0x40 => io: ReadWrite<u32, IO::Register>),
        (0x44 => _ier),
        (0x4c => lcr: ReadWrite<u32, LCR::Register>),
        (0x50 => _mcr),
        (0x54 => lsr: ReadOnly<u32, LSR::Register>),
        (0x58 => _reserved1),
        (0x60 => cntl: ReadWrite<u32, CNTL::Register>),
        (0x64 => @END),
    }
}

/// The mini-UART of an AUX block at a fixed MMIO address.
pub struct MiniUart {
    regs: MmioBlock<Registers>,
}

impl MiniUart {
    /// # Safety
    /// `base` must be the address of a BCM2835 AUX block that is mapped (or
    /// the MMU is off) and not driven by anything else.
    pub const unsafe fn new(base: u64) -> Self {
        Self {
            // SAFETY: forwarded from the caller (this function's contract).
            regs: unsafe { MmioBlock::new(base) },
        }
    }

    fn regs(&self) -> &Registers {
        &self.regs
    }

    /// Enables the mini-UART, 8 data bits, transmitter and receiver. The
    /// baud divisor is left as the Pi firmware set it.
    pub fn init(&self) {
        let r = self.regs();
        r.enables.modify(ENABLES::MINI_UART::SET);
        r.lcr.write(LCR::DATA_SIZE::EightBit);
        r.cntl.write(CNTL::TX_ENABLE::SET + CNTL::RX_ENABLE::SET);
    }

    /// Sends one byte, waiting for FIFO space.
    pub fn write_byte(&self, b: u8) {
        let r = self.regs();
        while !r.lsr.is_set(LSR::TX_EMPTY) {
            core::hint::spin_loop();
        }
        r.io.write(IO::DATA.val(b as u32));
    }

    /// Waits until the transmitter is idle.
    pub fn flush(&self) {
        while !self.regs().lsr.is_set(LSR::TX_IDLE) {
            core::hint::spin_loop();
        }
    }

    /// Receives a byte if one is waiting.
    pub fn try_read_byte(&self) -> Option<u8> {
        let r = self.regs();
        r.lsr
            .is_set(LSR::DATA_READY)
            .then(|| r.io.read(IO::DATA) as u8)
    }
}
