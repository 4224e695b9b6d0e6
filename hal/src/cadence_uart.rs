//! Cadence UART (Zynq UltraScale+ Device TRM UG1085, chapter 21 "UART
//! Controller"; register reference "UART Module"), the ZCU102's console
//! (UART0), written with `tock-registers`.
//!
//! The transmitter resets disabled (CR.TXDIS): bytes written before TXEN is
//! set are dropped, so `init` must run before the first byte. Clocks and the
//! baud rate are left as the boot loader set them.

use crate::mmio::MmioBlock;
use tock_registers::{
    interfaces::{ReadWriteable, Readable, Writeable},
    register_bitfields, register_structs,
    registers::{ReadOnly, ReadWrite},
};

register_bitfields! {u32,
    /// Control register (CR, 0x00).
    CR [
        TXDIS OFFSET(5) NUMBITS(1) [],
        TXEN OFFSET(4) NUMBITS(1) [],
        RXDIS OFFSET(3) NUMBITS(1) [],
        RXEN OFFSET(2) NUMBITS(1) [],
    ],
    /// Mode register (MR, 0x04).
    MR [
        /// Channel mode.
        CHMODE OFFSET(8) NUMBITS(2) [Normal = 0b00, LocalLoopback = 0b10],
        /// Parity: 0b1xx is none.
        PAR OFFSET(3) NUMBITS(3) [None = 0b100],
        /// Character length: 0b0x is 8 bits.
        CHRL OFFSET(1) NUMBITS(2) [EightBit = 0b00],
    ],
    /// Channel status register (SR, 0x2C).
    SR [
        /// Transmitter state machine active.
        TACTIVE OFFSET(11) NUMBITS(1) [],
        TXFULL OFFSET(4) NUMBITS(1) [],
        TXEMPTY OFFSET(3) NUMBITS(1) [],
        RXEMPTY OFFSET(1) NUMBITS(1) [],
    ],
    /// TX/RX FIFO (0x30).
    FIFO [
        DATA OFFSET(0) NUMBITS(8) [],
    ],
}

register_structs! {
    /// The Cadence UART register block.
    pub Registers {
        (0x00 => cr: ReadWrite<u32, CR::Register>),
        (0x04 => mr: ReadWrite<u32, MR::Register>),
        (0x08 => _reserved0),
        (0x2c => sr: ReadOnly<u32, SR::Register>),
        (0x30 => fifo: ReadWrite<u32, FIFO::Register>),
        (0x34 => @END),
    }
}

/// A Cadence UART at a fixed MMIO address.
pub struct CadenceUart {
    regs: MmioBlock<Registers>,
}

impl CadenceUart {
    /// # Safety
    /// `base` must be the address of a Cadence UART register block that is
    /// mapped (or the MMU is off) and not driven by anything else.
    pub const unsafe fn new(base: u64) -> Self {
        Self {
            // SAFETY: forwarded from the caller (this function's contract).
            regs: unsafe { MmioBlock::new(base) },
        }
    }

    fn regs(&self) -> &Registers {
        &self.regs
    }

    /// 8N1, normal mode, transmitter and receiver enabled (TXEN first: the
    /// transmitter resets disabled and drops what it is given).
    pub fn init(&self) {
        let r = self.regs();
        r.cr.write(CR::TXEN::SET + CR::RXEN::SET);
        r.mr.write(MR::CHMODE::Normal + MR::PAR::None + MR::CHRL::EightBit);
    }

    /// Sends one byte, waiting for FIFO space.
    pub fn write_byte(&self, b: u8) {
        let r = self.regs();
        while r.sr.is_set(SR::TXFULL) {
            core::hint::spin_loop();
        }
        r.fifo.write(FIFO::DATA.val(b as u32));
    }

    /// Waits until the FIFO is empty and the transmitter idle.
    pub fn flush(&self) {
        let r = self.regs();
        while !r.sr.is_set(SR::TXEMPTY) || r.sr.is_set(SR::TACTIVE) {
            core::hint::spin_loop();
        }
    }

    /// Receives a byte if one is waiting.
    pub fn try_read_byte(&self) -> Option<u8> {
        let r = self.regs();
        (!r.sr.is_set(SR::RXEMPTY)).then(|| r.fifo.read(FIFO::DATA) as u8)
    }

    /// Local loopback (transmit feeds receive, nothing on the line) on or off.
    pub fn set_loopback(&self, on: bool) {
        self.regs().mr.modify(if on {
            MR::CHMODE::LocalLoopback
        } else {
            MR::CHMODE::Normal
        });
    }
}
