//! The console: whichever UART the board description names, behind one
//! type, so the logger, crash reports and tests never name a board.

use crate::board::UartKind;
use crate::cadence_uart::CadenceUart;
use crate::imx_uart::ImxUart;
use crate::mini_uart::MiniUart;
use crate::uart::Pl011;

/// The UART has no loopback mode (the BCM2835 mini-UART).
#[derive(Debug, Clone, Copy, PartialEq, Eq, defmt::Format)]
pub struct LoopbackUnsupported;

/// One of the console UART drivers.
pub enum Console {
    /// Arm PL011.
    Pl011(Pl011),
    /// BCM2835 mini-UART.
    MiniUart(MiniUart),
    /// i.MX UART.
    Imx(ImxUart),
    /// Cadence UART.
    Cadence(CadenceUart),
}

impl Console {
    /// # Safety
    /// `base` must be the register block of a UART of kind `kind` that is
    /// mapped (or the MMU is off) and driven by nothing else.
    pub const unsafe fn new(kind: UartKind, base: u64) -> Self {
        // SAFETY: forwarded from the caller.
        unsafe {
            match kind {
                UartKind::Pl011 => Self::Pl011(Pl011::new(base)),
                UartKind::MiniUart => Self::MiniUart(MiniUart::new(base)),
                UartKind::Imx => Self::Imx(ImxUart::new(base)),
                UartKind::Cadence => Self::Cadence(CadenceUart::new(base)),
            }
        }
    }

    /// Makes the UART transmit and receive (baud left as the loader set it).
    pub fn init(&self) {
        match self {
            Self::Pl011(u) => u.init(),
            Self::MiniUart(u) => u.init(),
            Self::Imx(u) => u.init(),
            Self::Cadence(u) => u.init(),
        }
    }

    /// Sends one byte, waiting for FIFO space.
    pub fn write_byte(&self, b: u8) {
        match self {
            Self::Pl011(u) => u.write_byte(b),
            Self::MiniUart(u) => u.write_byte(b),
            Self::Imx(u) => u.write_byte(b),
            Self::Cadence(u) => u.write_byte(b),
        }
    }

    /// Sends bytes.
    pub fn write_bytes(&self, bytes: &[u8]) {
        for &b in bytes {
            self.write_byte(b);
        }
    }

    /// Waits until everything queued has left the transmitter.
    pub fn flush(&self) {
        match self {
            Self::Pl011(u) => u.flush(),
            Self::MiniUart(u) => u.flush(),
            Self::Imx(u) => u.flush(),
            Self::Cadence(u) => u.flush(),
        }
    }

    /// Receives a byte if one is waiting.
    pub fn try_read_byte(&self) -> Option<u8> {
        match self {
            Self::Pl011(u) => u.try_read_byte(),
            Self::MiniUart(u) => u.try_read_byte(),
            Self::Imx(u) => u.try_read_byte(),
            Self::Cadence(u) => u.try_read_byte(),
        }
    }

    /// Internal loopback on or off, where the UART has one.
    pub fn set_loopback(&self, on: bool) -> Result<(), LoopbackUnsupported> {
        match self {
            Self::Pl011(u) => u.set_loopback(on),
            Self::MiniUart(_) => return Err(LoopbackUnsupported),
            Self::Imx(u) => u.set_loopback(on),
            Self::Cadence(u) => u.set_loopback(on),
        }
        Ok(())
    }
}

/// The console UART of the current board.
// SAFETY: the board table names the console's kind and base; nothing else
// drives it.
pub static CONSOLE: Console =
    unsafe { Console::new(crate::board::CURRENT.uart, crate::board::CURRENT.uart_base) };
