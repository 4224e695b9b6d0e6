//! i.MX UART (i.MX 8M Plus Applications Processor Reference Manual, chapter
//! "Universal Asynchronous Receiver/Transmitter (UART)"), the EVK's debug
//! console (UART2), written with `tock-registers`.
//!
//! The boot loader (U-Boot) sets clocks and the baud rate; this driver only
//! enables the UART, 8-bit words, transmitter and receiver.

use crate::mmio::MmioBlock;
use tock_registers::{
    interfaces::{ReadWriteable, Readable, Writeable},
    register_bitfields, register_structs,
    registers::{ReadOnly, ReadWrite, WriteOnly},
};

register_bitfields! {u32,
    /// URXD: receiver register.
    URXD [
        CHARRDY OFFSET(15) NUMBITS(1) [],
        DATA OFFSET(0) NUMBITS(8) [],
    ],
    /// UTXD: transmitter register.
    UTXD [
        DATA OFFSET(0) NUMBITS(8) [],
    ],
    /// UCR1: control register 1.
    UCR1 [
        UARTEN OFFSET(0) NUMBITS(1) [],
    ],
    /// UCR2: control register 2.
    UCR2 [
        /// Ignore RTS.
        IRTS OFFSET(14) NUMBITS(1) [],
        /// 8-bit words.
        WS OFFSET(5) NUMBITS(1) [],
        TXEN OFFSET(2) NUMBITS(1) [],
        RXEN OFFSET(1) NUMBITS(1) [],
        /// Software reset, active low: must stay 1.
        SRST OFFSET(0) NUMBITS(1) [],
    ],
    /// USR2: status register 2.
    USR2 [
        /// Transmitter complete (FIFO and shifter empty).
        TXDC OFFSET(3) NUMBITS(1) [],
    ],
    /// UTS: test register.
    UTS [
        /// Loopback: the transmitter feeds the receiver.
        LOOP OFFSET(12) NUMBITS(1) [],
        TXEMPTY OFFSET(6) NUMBITS(1) [],
        RXEMPTY OFFSET(5) NUMBITS(1) [],
        TXFULL OFFSET(4) NUMBITS(1) [],
    ],
}

register_structs! {
    /// The i.MX UART register block.
    pub Registers {
        (0x00 => urxd: ReadOnly<u32, URXD::Register>),
        (0x04 => _reserved0),
        (0x40 => utxd: WriteOnly<u32, UTXD::Register>),
        (0x44 => _reserved1),
        (0x80 => ucr1: ReadWrite<u32, UCR1::Register>),
        (0x84 => ucr2: ReadWrite<u32, UCR2::Register>),
        (0x88 => _reserved2),
        (0x98 => usr2: ReadOnly<u32, USR2::Register>),
        (0x9c => _reserved3),
        (0xb4 => uts: ReadWrite<u32, UTS::Register>),
        (0xb8 => @END),
    }
}

/// An i.MX UART at a fixed MMIO address.
pub struct ImxUart {
    regs: MmioBlock<Registers>,
}

impl ImxUart {
    /// # Safety
    /// `base` must be the address of an i.MX UART register block that is
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

    /// UART on, 8-bit words, transmitter and receiver on, RTS ignored.
    pub fn init(&self) {
        let r = self.regs();
        r.ucr1.modify(UCR1::UARTEN::SET);
        r.ucr2.modify(
            UCR2::SRST::SET + UCR2::TXEN::SET + UCR2::RXEN::SET + UCR2::WS::SET + UCR2::IRTS::SET,
        );
    }

    /// Sends one byte, waiting for FIFO space.
    pub fn write_byte(&self, b: u8) {
        let r = self.regs();
        while r.uts.is_set(UTS::TXFULL) {
            core::hint::spin_loop();
        }
        r.utxd.write(UTXD::DATA.val(b as u32));
    }

    /// Waits until the transmitter is done.
    pub fn flush(&self) {
        while !self.regs().usr2.is_set(USR2::TXDC) {
            core::hint::spin_loop();
        }
    }

    /// Receives a byte if one is waiting.
    pub fn try_read_byte(&self) -> Option<u8> {
        let r = self.regs();
        if r.uts.is_set(UTS::RXEMPTY) {
            return None;
        }
        let v = r.urxd.extract();
        v.is_set(URXD::CHARRDY).then(|| v.read(URXD::DATA) as u8)
    }

    /// Internal loopback on or off.
    pub fn set_loopback(&self, on: bool) {
        self.regs()
            .uts
            .modify(if on { UTS::LOOP::SET } else { UTS::LOOP::CLEAR });
    }
}
