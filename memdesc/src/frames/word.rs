//! The memdesc word: one 64-bit value per physical frame (docs/architecture.md,
//! "The page array").
//!
//! ```text
//!  63                                    4 3    0
//! +---------------------------------------+------+
//! | descriptor address (16-byte aligned)  | type |  Folio, Slab, PageTable, HwPoison
//! +-------+------------------+------------+------+
//! | flags | order (12..=17)  | subtype    | type |  Reserved, Guard, Offline
//! +-------+------------------+------------+------+
//! | prev (37..=63) | next (10..=36) |ord|H| type |  Free (buddy)
//! +----------------+----------------+---+-+------+
//! ```
//!
//! Free words use their own dense layout: bit 4 says head (1) or not (0) of a free
//! block (a non-head is a tail, all other bits 0, or, with bit 5 set, the
//! first frame of a block parked in a hot cache, see [`Word::is_free_cached`]),
//! bits 5..=9 of a head hold the block order, and two 27-bit page-array indexes
//! link the head into its per-order doubly linked free list (all-ones =
//! none). That is what lets the buddy allocator keep all its free state in the
//! page array and unlink a buddy in O(1). 27 bits cover 2^27 - 1 frames, 512 GiB
//! of RAM per page array.
//!
//! Tag bit 3 set means "the rest of the word is a descriptor address".

use core::fmt;

/// Number of low bits holding the [`FrameType`] tag.
pub const TYPE_BITS: u32 = 4;
const TYPE_MASK: u64 = (1 << TYPE_BITS) - 1;

/// Width of a free-list link (a page-array index).
pub const LINK_BITS: u32 = 27;
/// The "no link" value of a free-list link.
pub const NO_LINK: u32 = (1 << LINK_BITS) - 1;
/// Most frames one page array can describe (every index must differ from [`NO_LINK`]).
pub const MAX_FRAMES: u64 = NO_LINK as u64;

const FREE_HEAD: u64 = 1 << 4;
const FREE_CACHED: u64 = 1 << 5;
const FREE_ORDER_SHIFT: u32 = 5;
const FREE_NEXT_SHIFT: u32 = 10;
const FREE_PREV_SHIFT: u32 = 37;
const LINK_MASK: u64 = NO_LINK as u64;

const SUBTYPE_SHIFT: u32 = 4;
const MISC_ORDER_SHIFT: u32 = 12;
const MISC_FLAGS_SHIFT: u32 = 18;

/// Misc-word flag: this frame is a tail (not the first frame) of its allocation.
pub const MISC_FLAG_TAIL: u64 = 1;

// The page array must cost exactly 8 bytes per frame.
const _: () = assert!(core::mem::size_of::<Word>() == 8);
const _: () = assert!(core::mem::size_of::<core::sync::atomic::AtomicU64>() == 8);
const _: () = assert!(FREE_PREV_SHIFT + LINK_BITS == 64);

/// What a frame is used for: the low four bits of its word.
///
/// The other classifications refine one frame type each; none overlaps
/// another:
///
/// | frame type | refined by | where it lives |
/// |---|---|---|
/// | `Reserved` | [`ReservedKind`]: why it is kept from the allocator | the word's subtype |
/// | `Free` | order, hot-cached or listed | the word |
/// | `Folio` | [`Owner`](super::Owner): who gets it at refcount zero | the [`FolioDesc`](super::FolioDesc) |
/// | `PageTable`, `Slab`, `Offline`, `Guard` | are the four [`FrozenKind`](super::FrozenKind)s (allocations with no refcount) | the type itself |
/// | `HwPoison` | the frame's previous word | the [`HwPoisonDesc`](super::HwPoisonDesc) |
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum FrameType {
    /// Not available to the allocator (firmware image, DTB, descriptor memory...).
    /// Zero, so an all-zero word is never mistaken for anything allocatable.
    Reserved = 0,
    /// Owned by the buddy allocator.
    Free = 1,
    /// A guard frame (never mapped).
    Guard = 2,
    /// Given away (ballooned): refcount frozen at 0, no descriptor.
    Offline = 3,
    /// Refcounted allocation; the word points to a [`FolioDesc`](super::FolioDesc).
    Folio = 8,
    /// Slab backing; the word points to a [`SlabDesc`](super::SlabDesc).
    Slab = 9,
    /// A translation table; the word points to a [`PageTableDesc`](super::PageTableDesc).
    PageTable = 10,
    /// Hardware-poisoned; the word points to a [`HwPoisonDesc`](super::HwPoisonDesc)
    /// keeping the frame's previous word.
    HwPoison = 11,
}

impl FrameType {
    /// Every type, in [`FrameType::index`] order.
    pub const ALL: [FrameType; 8] = [
        FrameType::Reserved,
        FrameType::Free,
        FrameType::Guard,
        FrameType::Offline,
        FrameType::Folio,
        FrameType::Slab,
        FrameType::PageTable,
        FrameType::HwPoison,
    ];
    /// Number of types.
    pub const COUNT: usize = 8;

    /// Decodes a 4-bit tag; `None` for tags no type uses.
    #[inline]
    pub const fn from_tag(tag: u8) -> Option<Self> {
        Some(match tag {
            0 => Self::Reserved,
            1 => Self::Free,
            2 => Self::Guard,
            3 => Self::Offline,
            8 => Self::Folio,
            9 => Self::Slab,
            10 => Self::PageTable,
            11 => Self::HwPoison,
            _ => return None,
        })
    }

    /// The 4-bit tag.
    #[inline]
    pub const fn tag(self) -> u8 {
        self as u8
    }

    /// True for types whose word holds a descriptor address.
    #[inline]
    pub const fn has_descriptor(self) -> bool {
        self as u8 & 8 != 0
    }

    /// Dense index 0..[`FrameType::COUNT`], for per-type counters.
    #[inline]
    pub const fn index(self) -> usize {
        match self {
            Self::Reserved => 0,
            Self::Free => 1,
            Self::Guard => 2,
            Self::Offline => 3,
            Self::Folio => 4,
            Self::Slab => 5,
            Self::PageTable => 6,
            Self::HwPoison => 7,
        }
    }
}

/// Why a frame is reserved: the subtype of a [`FrameType::Reserved`] word.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ReservedKind {
    /// Not said (also what a fresh page array holds).
    Unspecified = 0,
    /// The firmware image.
    Image = 1,
    /// The device tree blob.
    DeviceTree = 2,
    /// MMIO or another hole inside a described RAM range.
    Mmio = 3,
    /// The page array itself.
    PageArray = 4,
    /// Backing of a descriptor cache.
    DescriptorCache = 5,
    /// Anything else the firmware wants kept away from the allocator.
    Other = 6,
}

impl ReservedKind {
    /// Decodes a subtype; unknown values read as [`ReservedKind::Other`].
    pub const fn from_subtype(v: u8) -> Self {
        match v {
            0 => Self::Unspecified,
            1 => Self::Image,
            2 => Self::DeviceTree,
            3 => Self::Mmio,
            4 => Self::PageArray,
            5 => Self::DescriptorCache,
            _ => Self::Other,
        }
    }
}

/// A decoded copy of one page-array word.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
#[repr(transparent)]
pub struct Word(u64);

impl Word {
    /// The word a fresh page array holds: reserved, unspecified, order 0.
    pub const RESERVED: Word = Word(0);
    /// The word of every non-first frame of a free block.
    pub const FREE_TAIL: Word = Word(FrameType::Free as u64);

    /// Wraps a raw value (for inspection; only this module's constructors are
    /// ever stored in a page array).
    #[inline]
    pub const fn from_raw(raw: u64) -> Self {
        Self(raw)
    }

    /// The raw 64-bit value.
    #[inline]
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// The raw 4-bit tag.
    #[inline]
    pub const fn tag(self) -> u8 {
        (self.0 & TYPE_MASK) as u8
    }

    /// The frame type, `None` if the tag is not a known type.
    #[inline]
    pub const fn frame_type(self) -> Option<FrameType> {
        FrameType::from_tag(self.tag())
    }

    // ---- free words -------------------------------------------------------

    /// Head word of a free block of `order` with free-list links `next`/`prev`.
    #[inline]
    pub(crate) const fn free_head(order: u8, next: u32, prev: u32) -> Self {
        Self(
            FrameType::Free as u64
                | FREE_HEAD
                | (order as u64) << FREE_ORDER_SHIFT
                | (next as u64 & LINK_MASK) << FREE_NEXT_SHIFT
                | (prev as u64 & LINK_MASK) << FREE_PREV_SHIFT,
        )
    }

    /// True for the first frame of a free block.
    #[inline]
    pub const fn is_free_head(self) -> bool {
        self.0 & (TYPE_MASK | FREE_HEAD) == FrameType::Free as u64 | FREE_HEAD
    }

    /// True for a non-first frame of a free block.
    #[inline]
    pub const fn is_free_tail(self) -> bool {
        self.0 == Self::FREE_TAIL.0
    }

    /// Head word of a free block of `order` parked in a hot cache (no head
    /// bit: the buddy never merges with it; the order sits in the unused
    /// `next` field).
    #[inline]
    pub(crate) const fn free_cached(order: u8) -> Self {
        Self(FrameType::Free as u64 | FREE_CACHED | (order as u64) << FREE_NEXT_SHIFT)
    }

    /// True for the head of a free block in a hot cache.
    #[inline]
    pub const fn is_free_cached(self) -> bool {
        self.0 & (TYPE_MASK | FREE_HEAD | FREE_CACHED) == FrameType::Free as u64 | FREE_CACHED
    }

    /// Order of a hot-cached free block (meaningful when [`Word::is_free_cached`]).
    #[inline]
    pub const fn free_cached_order(self) -> u8 {
        ((self.0 >> FREE_NEXT_SHIFT) & 0x1f) as u8
    }

    /// Order of a free block (meaningful on a free head).
    #[inline]
    pub const fn free_order(self) -> u8 {
        ((self.0 >> FREE_ORDER_SHIFT) & 0x1f) as u8
    }

    /// Next free block's page-array index, or [`NO_LINK`].
    #[inline]
    pub const fn free_next(self) -> u32 {
        ((self.0 >> FREE_NEXT_SHIFT) & LINK_MASK) as u32
    }

    /// Previous free block's page-array index, or [`NO_LINK`].
    #[inline]
    pub const fn free_prev(self) -> u32 {
        ((self.0 >> FREE_PREV_SHIFT) & LINK_MASK) as u32
    }

    /// This free head with another `next` link.
    #[inline]
    pub(crate) const fn with_free_next(self, next: u32) -> Self {
        Self(
            self.0 & !(LINK_MASK << FREE_NEXT_SHIFT) | (next as u64 & LINK_MASK) << FREE_NEXT_SHIFT,
        )
    }

    /// This free head with another `prev` link.
    #[inline]
    pub(crate) const fn with_free_prev(self, prev: u32) -> Self {
        Self(
            self.0 & !(LINK_MASK << FREE_PREV_SHIFT) | (prev as u64 & LINK_MASK) << FREE_PREV_SHIFT,
        )
    }

    // ---- misc (descriptor-less, non-free) words ----------------------------

    /// A descriptor-less word. `ty` must not have a descriptor or be Free.
    #[inline]
    pub(crate) const fn misc(ty: FrameType, subtype: u8, order: u8, flags: u64) -> Self {
        Self(
            ty as u64
                | (subtype as u64) << SUBTYPE_SHIFT
                | ((order as u64) & 0x3f) << MISC_ORDER_SHIFT
                | flags << MISC_FLAGS_SHIFT,
        )
    }

    /// Subtype of a descriptor-less word (for Reserved: a [`ReservedKind`]).
    #[inline]
    pub const fn subtype(self) -> u8 {
        (self.0 >> SUBTYPE_SHIFT) as u8
    }

    /// Allocation order recorded in a descriptor-less word.
    #[inline]
    pub const fn misc_order(self) -> u8 {
        ((self.0 >> MISC_ORDER_SHIFT) & 0x3f) as u8
    }

    /// Flags of a descriptor-less word ([`MISC_FLAG_TAIL`], ...).
    #[inline]
    pub const fn misc_flags(self) -> u64 {
        self.0 >> MISC_FLAGS_SHIFT
    }

    // ---- descriptor words ---------------------------------------------------

    /// A word pointing at a descriptor at `addr` (16-byte aligned). Only
    /// `desc_cache::desc_word` calls it (tests aside), with the type the
    /// descriptor has: `desc_of` relies on the tag naming that type.
    #[inline]
    pub(crate) const fn with_desc(ty: FrameType, addr: usize) -> Self {
        Self(addr as u64 | ty as u64)
    }

    /// Descriptor address of a descriptor-typed word.
    #[inline]
    pub const fn desc_addr(self) -> usize {
        (self.0 & !TYPE_MASK) as usize
    }
}

impl fmt::Debug for Word {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.frame_type() {
            Some(FrameType::Free) if self.is_free_head() => write!(
                f,
                "Word(Free head order {} next {:#x} prev {:#x})",
                self.free_order(),
                self.free_next(),
                self.free_prev()
            ),
            Some(FrameType::Free) if self.is_free_cached() => {
                write!(f, "Word(Free cached order {})", self.free_cached_order())
            }
            Some(FrameType::Free) => write!(f, "Word(Free tail)"),
            Some(t) if t.has_descriptor() => write!(f, "Word({t:?} @ {:#x})", self.desc_addr()),
            Some(t) => write!(
                f,
                "Word({t:?} subtype {} order {} flags {:#x})",
                self.subtype(),
                self.misc_order(),
                self.misc_flags()
            ),
            None => write!(f, "Word(unknown {:#x})", self.0),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // In tests a panic is the failure report.
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip() {
        for t in FrameType::ALL {
            assert_eq!(FrameType::from_tag(t.tag()), Some(t));
            assert_eq!(FrameType::ALL[t.index()], t);
        }
        assert_eq!(FrameType::from_tag(5), None);
        assert!(FrameType::Folio.has_descriptor());
        assert!(!FrameType::Offline.has_descriptor());
        assert_eq!(Word::RESERVED.frame_type(), Some(FrameType::Reserved));
    }

    #[test]
    fn free_head_fields() {
        let w = Word::free_head(18, NO_LINK, 0x123_4567);
        assert!(w.is_free_head() && !w.is_free_tail());
        assert_eq!(w.frame_type(), Some(FrameType::Free));
        assert_eq!(w.free_order(), 18);
        assert_eq!(w.free_next(), NO_LINK);
        assert_eq!(w.free_prev(), 0x123_4567);
        let w = w.with_free_next(7).with_free_prev(NO_LINK);
        assert_eq!(
            (w.free_next(), w.free_prev(), w.free_order()),
            (7, NO_LINK, 18)
        );
        assert!(Word::FREE_TAIL.is_free_tail() && !Word::FREE_TAIL.is_free_head());
        let c = Word::free_cached(3);
        assert!(c.is_free_cached() && !c.is_free_head() && !c.is_free_tail());
        assert_eq!(c.free_cached_order(), 3);
        assert!(!Word::free_head(1, 2, 3).is_free_cached());
        assert_eq!(c.frame_type(), Some(FrameType::Free));
    }

    #[test]
    fn misc_fields() {
        let w = Word::misc(FrameType::Offline, 3, 9, MISC_FLAG_TAIL);
        assert_eq!(w.frame_type(), Some(FrameType::Offline));
        assert_eq!(
            (w.subtype(), w.misc_order(), w.misc_flags()),
            (3, 9, MISC_FLAG_TAIL)
        );
    }

    #[test]
    fn desc_fields() {
        let w = Word::with_desc(FrameType::PageTable, 0xffff_8000_1234_5670);
        assert_eq!(w.frame_type(), Some(FrameType::PageTable));
        assert_eq!(w.desc_addr(), 0xffff_8000_1234_5670);
        assert!(format!("{w:?}").contains("PageTable"));
    }
}
