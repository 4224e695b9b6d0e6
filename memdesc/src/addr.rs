//! Physical and virtual addresses and page frame numbers (4 KiB granule).
//!
//! Newtypes keep a physical address from being used where a virtual one is
//! meant, and a frame number from being used as a byte address.

use core::fmt;

/// log2 of the translation granule and frame size (4 KiB).
pub const PAGE_SHIFT: u32 = 12;
/// Size of a frame / level-3 page in bytes.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;

/// A physical byte address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(transparent)]
pub struct PhysAddr(pub u64);

/// A virtual byte address (stage-1 input address).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(transparent)]
pub struct VirtAddr(pub u64);

/// A physical frame number: a physical address shifted right by [`PAGE_SHIFT`].
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(transparent)]
pub struct Pfn(pub u64);

macro_rules! addr_common {
    ($t:ident, $prefix:literal) => {
        impl $t {
            /// The raw value.
            #[inline]
            pub const fn as_u64(self) -> u64 {
                self.0
            }
            /// True when the address is a multiple of `align` (a power of two).
            #[inline]
            pub const fn is_aligned(self, align: u64) -> bool {
                self.0 & (align - 1) == 0
            }
            /// Rounds down to a multiple of `align` (a power of two).
            #[inline]
            pub const fn align_down(self, align: u64) -> Self {
                Self(self.0 & !(align - 1))
            }
            /// Rounds up to a multiple of `align` (a power of two); `None` on overflow.
            #[inline]
            pub const fn checked_align_up(self, align: u64) -> Option<Self> {
                match self.0.checked_add(align - 1) {
                    Some(v) => Some(Self(v & !(align - 1))),
                    None => None,
                }
            }
            /// Adds a byte offset; `None` on overflow.
            #[inline]
            pub const fn checked_add(self, off: u64) -> Option<Self> {
                match self.0.checked_add(off) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "({:#x})"), self.0)
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}
addr_common!(PhysAddr, "PhysAddr");
addr_common!(VirtAddr, "VirtAddr");

impl PhysAddr {
    /// The frame containing this address.
    #[inline]
    pub const fn pfn(self) -> Pfn {
        Pfn(self.0 >> PAGE_SHIFT)
    }
}

impl Pfn {
    /// The first byte address of the frame.
    #[inline]
    pub const fn addr(self) -> PhysAddr {
        PhysAddr(self.0 << PAGE_SHIFT)
    }
    /// The raw frame number.
    #[inline]
    pub const fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Debug for Pfn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pfn({:#x})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pfn_round_trip() {
        let pa = PhysAddr(0x4000_3123);
        assert_eq!(pa.pfn(), Pfn(0x40003));
        assert_eq!(pa.pfn().addr(), PhysAddr(0x4000_3000));
    }

    #[test]
    fn alignment() {
        assert!(PhysAddr(0x1_0000).is_aligned(0x1_0000));
        assert!(!VirtAddr(0x1_1000).is_aligned(0x1_0000));
        assert_eq!(VirtAddr(0x1_1000).align_down(0x1_0000), VirtAddr(0x1_0000));
        assert_eq!(
            VirtAddr(0x1_1000).checked_align_up(0x1_0000),
            Some(VirtAddr(0x2_0000))
        );
        assert_eq!(VirtAddr(u64::MAX).checked_align_up(0x1000), None);
    }
}
