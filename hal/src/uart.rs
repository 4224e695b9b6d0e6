//! Arm PrimeCell UART (PL011) driver (PL011 TRM, DDI 0183G, chapter 3
//! "Programmers Model"), written with `tock-registers`.
//!
//! The console is the only user: blocking transmit, optional loopback for
//! self-tests, receive polling.

use crate::mmio::MmioBlock;
use tock_registers::{
    interfaces::{ReadWriteable, Readable, Writeable},
    register_bitfields, register_structs,
    registers::{ReadOnly, ReadWrite, WriteOnly},
};

register_bitfields! {u32,
    /// Data register (TRM 3.3.1).
    DR [
        DATA OFFSET(0) NUMBITS(8) [],
    ],
    /// Flag register (TRM 3.3.3).
    FR [
        /// Transmit FIFO empty.
        TXFE OFFSET(7) NUMBITS(1) [],
        /// Receive FIFO full.
        RXFF OFFSET(6) NUMBITS(1) [],
        /// Transmit FIFO full.
        TXFF OFFSET(5) NUMBITS(1) [],
        /// Receive FIFO empty.
        RXFE OFFSET(4) NUMBITS(1) [],
        /// UART busy transmitting.
        BUSY OFFSET(3) NUMBITS(1) [],
    ],
    /// Line control register (TRM 3.3.7).
    LCR_H [
        /// Word length.
        WLEN OFFSET(5) NUMBITS(2) [EightBit = 0b11],
        /// FIFO enable.
        FEN OFFSET(4) NUMBITS(1) [],
    ],
    /// Control register (TRM 3.3.8).
    CR [
        /// Receive enable.
        RXE OFFSET(9) NUMBITS(1) [],
        /// Transmit enable.
        TXE OFFSET(8) NUMBITS(1) [],
        /// Loopback enable: transmit feeds receive.
        LBE OFFSET(7) NUMBITS(1) [],
        /// UART enable.
        UARTEN OFFSET(0) NUMBITS(1) [],
    ],
    /// Interrupt clear register (TRM 3.3.13).
    ICR [
        ALL OFFSET(0) NUMBITS(11) [],
    ],
}

register_structs! {
    /// The PL011 register block.
    pub Registers {
        (0x000 => dr: ReadWrite<u32, DR::Register>),
        (0x004 => _reserved0),
        (0x018 => fr: ReadOnly<u32, FR::Register>),
        (0x01c => _reserved1),
        (0x02c => lcr_h: ReadWrite<u32, LCR_H::Register>),
        (0x030 => cr: ReadWrite<u32, CR::Register>),
        (0x034 => _reserved2),
        (0x044 => icr: WriteOnly<u32, ICR::Register>),
        (0x048 => @END),
    }
}

/// A PL011 at a fixed MMIO address.
pub struct Pl011 {
    regs: MmioBlock<Registers>,
}

impl Pl011 {
    /// # Safety
    /// `base` must be the address of a PL011 register block that is mapped
    /// (or the MMU is off) and not used through any other driver.
    pub const unsafe fn new(base: u64) -> Self {
        Self {
            // SAFETY: forwarded from the caller (this function's contract).
            regs: unsafe { MmioBlock::new(base) },
        }
    }

    fn regs(&self) -> &Registers {
        &self.regs
    }

    /// 8N1 with FIFOs, transmit and receive enabled. The baud divisor is left
    /// as the loader set it (QEMU ignores it; real boards' firmware sets it).
    pub fn init(&self) {
        let r = self.regs();
        r.cr.set(0);
        r.icr.write(ICR::ALL.val(0x7ff));
        r.lcr_h.write(LCR_H::WLEN::EightBit + LCR_H::FEN::SET);
        r.cr.write(CR::UARTEN::SET + CR::TXE::SET + CR::RXE::SET);
    }

    /// Sends one byte, waiting for FIFO space.
    pub fn write_byte(&self, b: u8) {
        let r = self.regs();
        while r.fr.is_set(FR::TXFF) {
            core::hint::spin_loop();
        }
        r.dr.write(DR::DATA.val(b as u32));
    }

    /// Sends bytes.
    pub fn write_bytes(&self, bytes: &[u8]) {
        for &b in bytes {
            self.write_byte(b);
        }
    }

    /// Waits until everything queued has left the shift register.
    pub fn flush(&self) {
        let r = self.regs();
        while !r.fr.is_set(FR::TXFE) || r.fr.is_set(FR::BUSY) {
            core::hint::spin_loop();
        }
    }

    /// Receives a byte if one is waiting.
    pub fn try_read_byte(&self) -> Option<u8> {
        let r = self.regs();
        if r.fr.is_set(FR::RXFE) {
            None
        } else {
            Some(r.dr.read(DR::DATA) as u8)
        }
    }

    /// Turns internal loopback on or off (transmitted bytes arrive at receive
    /// instead of the line).
    pub fn set_loopback(&self, on: bool) {
        self.regs()
            .cr
            .modify(if on { CR::LBE::SET } else { CR::LBE::CLEAR });
    }
}

/// The console UART of the current board (see [`crate::console`]).
pub use crate::console::CONSOLE;

/// Initialises the console.
pub fn init() {
    CONSOLE.init();
}
