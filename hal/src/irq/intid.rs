//! Interrupt identifiers (INTIDs) and their classes (Arm GIC Architecture
//! Specification, IHI 0069, 2.2 "INTIDs", table 2-1; GICv2: IHI 0048, 2.2.1
//! "Interrupt IDs").
//!
//! | INTID        | class                                   |
//! |--------------|-----------------------------------------|
//! | 0-15         | SGI, software generated, per PE         |
//! | 16-31        | PPI, private peripheral, per PE         |
//! | 32-1019      | SPI, shared peripheral                  |
//! | 1020-1023    | special (1023: no pending interrupt)    |
//! | 1056-1119    | extended PPI (GICv3.1)                  |
//! | 4096-5119    | extended SPI (GICv3.1)                  |
//! | 8192-        | LPI (message based; not used here)      |

/// An INTID that names a real interrupt or a special value the CPU interface
/// returns; reserved numbers cannot be represented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(hw, derive(defmt::Format))]
pub struct Intid(u32);

/// What kind of interrupt an [`Intid`] names, with its index inside the class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(hw, derive(defmt::Format))]
pub enum IntidClass {
    /// Software generated interrupt `n` (0-15).
    Sgi(u8),
    /// Private peripheral interrupt `n` (0-15).
    Ppi(u8),
    /// Shared peripheral interrupt `n` (0-987).
    Spi(u16),
    /// 1020-1023: returned by an acknowledge, never raised.
    Special,
    /// Extended PPI `n` (0-63).
    ExtendedPpi(u8),
    /// Extended SPI `n` (0-1023).
    ExtendedSpi(u16),
    /// Locality-specific peripheral interrupt `n`.
    Lpi(u32),
}

/// An INTID that does not exist, or an index outside its class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(hw, derive(defmt::Format))]
pub enum IntidError {
    /// SGI number above 15.
    SgiOutOfRange(u32),
    /// PPI number above 15.
    PpiOutOfRange(u32),
    /// SPI number above 987 (INTID 1019).
    SpiOutOfRange(u32),
    /// Extended PPI number above 63.
    ExtendedPpiOutOfRange(u32),
    /// Extended SPI number above 1023.
    ExtendedSpiOutOfRange(u32),
    /// A reserved INTID (1024-1055, 1120-4095, 5120-8191, or 2^24 and up).
    Reserved(u32),
}

const PPI_BASE: u32 = 16;
const SPI_BASE: u32 = 32;
const SPECIAL_BASE: u32 = 1020;
const RESERVED_BASE: u32 = 1024;
const EPPI_BASE: u32 = 1056;
const EPPI_END: u32 = 1120;
const ESPI_BASE: u32 = 4096;
const ESPI_END: u32 = 5120;
const LPI_BASE: u32 = 8192;
const LPI_END: u32 = 1 << 24;

impl Intid {
    /// 1023: the acknowledge found no pending interrupt (a spurious entry).
    pub const SPURIOUS: Self = Self(1023);

    /// Software generated interrupt `n`.
    pub const fn sgi(n: u32) -> Result<Self, IntidError> {
        if n < PPI_BASE {
            Ok(Self(n))
        } else {
            Err(IntidError::SgiOutOfRange(n))
        }
    }

    /// Private peripheral interrupt `n` (INTID `n + 16`).
    pub const fn ppi(n: u32) -> Result<Self, IntidError> {
        if n < SPI_BASE - PPI_BASE {
            Ok(Self(PPI_BASE + n))
        } else {
            Err(IntidError::PpiOutOfRange(n))
        }
    }

    /// Shared peripheral interrupt `n` (INTID `n + 32`).
    pub const fn spi(n: u32) -> Result<Self, IntidError> {
        if n < SPECIAL_BASE - SPI_BASE {
            Ok(Self(SPI_BASE + n))
        } else {
            Err(IntidError::SpiOutOfRange(n))
        }
    }

    /// Extended PPI `n` (INTID `n + 1056`).
    pub const fn extended_ppi(n: u32) -> Result<Self, IntidError> {
        if n < EPPI_END - EPPI_BASE {
            Ok(Self(EPPI_BASE + n))
        } else {
            Err(IntidError::ExtendedPpiOutOfRange(n))
        }
    }

    /// Extended SPI `n` (INTID `n + 4096`).
    pub const fn extended_spi(n: u32) -> Result<Self, IntidError> {
        if n < ESPI_END - ESPI_BASE {
            Ok(Self(ESPI_BASE + n))
        } else {
            Err(IntidError::ExtendedSpiOutOfRange(n))
        }
    }

    /// The INTID with this raw value, as an acknowledge register returns it.
    pub const fn from_raw(raw: u32) -> Result<Self, IntidError> {
        let reserved = (raw >= RESERVED_BASE && raw < EPPI_BASE)
            || (raw >= EPPI_END && raw < ESPI_BASE)
            || (raw >= ESPI_END && raw < LPI_BASE)
            || raw >= LPI_END;
        if reserved {
            Err(IntidError::Reserved(raw))
        } else {
            Ok(Self(raw))
        }
    }

    /// The raw value, as the GIC's registers take it.
    pub const fn raw(self) -> u32 {
        self.0
    }

    /// The class and index inside it.
    pub const fn class(self) -> IntidClass {
        let n = self.0;
        if n < PPI_BASE {
            IntidClass::Sgi(n as u8)
        } else if n < SPI_BASE {
            IntidClass::Ppi((n - PPI_BASE) as u8)
        } else if n < SPECIAL_BASE {
            IntidClass::Spi((n - SPI_BASE) as u16)
        } else if n < RESERVED_BASE {
            IntidClass::Special
        } else if n < EPPI_END {
            IntidClass::ExtendedPpi((n - EPPI_BASE) as u8)
        } else if n < ESPI_END {
            IntidClass::ExtendedSpi((n - ESPI_BASE) as u16)
        } else {
            IntidClass::Lpi(n - LPI_BASE)
        }
    }

    /// True for interrupts banked per PE (SGIs, PPIs, extended PPIs), which a
    /// GICv3 configures in the redistributor rather than the distributor.
    pub const fn is_private(self) -> bool {
        matches!(
            self.class(),
            IntidClass::Sgi(_) | IntidClass::Ppi(_) | IntidClass::ExtendedPpi(_)
        )
    }

    /// True for 1020-1023, which name no interrupt.
    pub const fn is_special(self) -> bool {
        matches!(self.class(), IntidClass::Special)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_boundaries() {
        let class = |raw| Intid::from_raw(raw).map(Intid::class);
        assert_eq!(class(0), Ok(IntidClass::Sgi(0)));
        assert_eq!(class(15), Ok(IntidClass::Sgi(15)));
        assert_eq!(class(16), Ok(IntidClass::Ppi(0)));
        assert_eq!(class(30), Ok(IntidClass::Ppi(14)));
        assert_eq!(class(31), Ok(IntidClass::Ppi(15)));
        assert_eq!(class(32), Ok(IntidClass::Spi(0)));
        assert_eq!(class(1019), Ok(IntidClass::Spi(987)));
        assert_eq!(class(1020), Ok(IntidClass::Special));
        assert_eq!(class(1023), Ok(IntidClass::Special));
        assert_eq!(class(1024), Err(IntidError::Reserved(1024)));
        assert_eq!(class(1055), Err(IntidError::Reserved(1055)));
        assert_eq!(class(1056), Ok(IntidClass::ExtendedPpi(0)));
        assert_eq!(class(1119), Ok(IntidClass::ExtendedPpi(63)));
        assert_eq!(class(1120), Err(IntidError::Reserved(1120)));
        assert_eq!(class(4095), Err(IntidError::Reserved(4095)));
        assert_eq!(class(4096), Ok(IntidClass::ExtendedSpi(0)));
        assert_eq!(class(5119), Ok(IntidClass::ExtendedSpi(1023)));
        assert_eq!(class(5120), Err(IntidError::Reserved(5120)));
        assert_eq!(class(8192), Ok(IntidClass::Lpi(0)));
        assert_eq!(class(1 << 24), Err(IntidError::Reserved(1 << 24)));
        assert_eq!(class(u32::MAX), Err(IntidError::Reserved(u32::MAX)));
    }

    #[test]
    fn constructors_offset_and_refuse_out_of_range() {
        assert_eq!(Intid::sgi(7).map(Intid::raw), Ok(7));
        assert_eq!(Intid::sgi(16), Err(IntidError::SgiOutOfRange(16)));
        assert_eq!(Intid::ppi(14).map(Intid::raw), Ok(30));
        assert_eq!(Intid::ppi(16), Err(IntidError::PpiOutOfRange(16)));
        assert_eq!(Intid::spi(16).map(Intid::raw), Ok(48));
        assert_eq!(Intid::spi(987).map(Intid::raw), Ok(1019));
        assert_eq!(Intid::spi(988), Err(IntidError::SpiOutOfRange(988)));
        assert_eq!(Intid::extended_ppi(63).map(Intid::raw), Ok(1119));
        assert_eq!(
            Intid::extended_ppi(64),
            Err(IntidError::ExtendedPpiOutOfRange(64))
        );
        assert_eq!(Intid::extended_spi(1023).map(Intid::raw), Ok(5119));
        assert_eq!(
            Intid::extended_spi(1024),
            Err(IntidError::ExtendedSpiOutOfRange(1024))
        );
    }

    #[test]
    fn private_and_special() {
        assert!(Intid::sgi(0).unwrap().is_private());
        assert!(Intid::ppi(15).unwrap().is_private());
        assert!(Intid::extended_ppi(0).unwrap().is_private());
        assert!(!Intid::spi(0).unwrap().is_private());
        assert!(!Intid::extended_spi(0).unwrap().is_private());
        assert!(Intid::SPURIOUS.is_special());
        assert!(!Intid::spi(987).unwrap().is_special());
    }
}
