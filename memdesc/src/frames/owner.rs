//! Who gets a folio back when its refcount reaches zero.
//!
//! The owner is a small closed enum packed into the folio descriptor; the
//! free path dispatches on it with a `match` (see
//! [`FrameAllocator::release`](super::FrameAllocator::release)), so there is
//! no function pointer to overlay on other fields and the common
//! `Owner::Buddy` case costs one compare.

/// The owner of a folio.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Owner {
    /// The frame allocator: the last `put` frees the frames.
    #[default]
    Buddy,
    /// The balloon driver: the last `put` hands the frozen folio to it.
    Balloon,
    /// A memory pool, by id: the last `put` hands the frozen folio to it.
    Pool(u16),
    /// A shared-memory owner (waiting for a conversion), by id.
    SharedMemory(u16),
}

impl Owner {
    /// Packs into 18 bits: 2 bits kind, 16 bits id.
    #[inline]
    pub(crate) const fn encode(self) -> u64 {
        match self {
            Owner::Buddy => 0,
            Owner::Balloon => 1,
            Owner::Pool(id) => 2 | (id as u64) << 2,
            Owner::SharedMemory(id) => 3 | (id as u64) << 2,
        }
    }

    /// Inverse of [`Owner::encode`] (only the low 18 bits are looked at).
    #[inline]
    pub(crate) const fn decode(v: u64) -> Self {
        let id = ((v >> 2) & 0xffff) as u16;
        match v & 3 {
            0 => Owner::Buddy,
            1 => Owner::Balloon,
            2 => Owner::Pool(id),
            _ => Owner::SharedMemory(id),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // In tests a panic is the failure report.
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for o in [
            Owner::Buddy,
            Owner::Balloon,
            Owner::Pool(0),
            Owner::Pool(0xffff),
            Owner::SharedMemory(7),
        ] {
            assert_eq!(Owner::decode(o.encode()), o);
            assert!(o.encode() < 1 << 18);
        }
    }
}
