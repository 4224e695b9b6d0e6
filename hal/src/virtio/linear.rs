//! The balloon's memory on a firmware whose RAM is identity mapped: the
//! policy's [`BalloonEnv`] and the virtqueues' DMA [`Hal`], both over the
//! firmware's frame allocator, so that the firmware itself needs no
//! `unsafe` to drive the balloon.
//!
//! The firmware implements the safe [`FirmwareMemory`] (its allocator and
//! its own stage-1 map). Everything that turns a frame number into a
//! pointer lives here and relies on one witness: a
//! `FrameAllocator<'static, LinearMap>` exists only if someone promised
//! (`LinearMap::new` is `unsafe`) that every frame of its page array is
//! mapped writable at `pfn.addr() + offset` for the rest of the program.
//! [`LinearEnv::new`] refuses anything but an identity map (offset 0),
//! because the device is handed the same addresses the CPU uses, and it
//! remembers the page array so that a `with_frames` handing out another
//! allocator is refused instead of trusted.

use core::marker::PhantomData;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use memdesc::balloon::{BalloonEnv, BalloonError};
use memdesc::frames::{DescMemory, FrameAllocator, FrameType, FrozenKind, LinearMap, PageArray};
use memdesc::{Pfn, PAGE_SIZE};
use virtio_drivers::{BufferDirection, Hal, PhysAddr as DmaAddr};

use super::balloon::IdentityDma;

/// The firmware's frame allocator.
pub type Frames = FrameAllocator<'static, LinearMap>;

/// What the firmware provides around the balloon: its frame allocator and
/// its own stage-1 map. Safe to implement: nothing here is trusted for
/// memory safety beyond the allocator's own type (see the module doc).
pub trait FirmwareMemory {
    /// Runs `f` with exclusive access to the frame allocator
    /// ([`BalloonError::FramesBusy`] when it is held).
    fn with_frames<R>(f: impl FnOnce(&mut Frames) -> R) -> Result<R, BalloonError>;
    /// Removes `[pfn, pfn + pages)` from the firmware's own map.
    fn unmap(pfn: Pfn, pages: u64) -> Result<(), BalloonError>;
    /// Maps `[pfn, pfn + pages)` again as normal memory.
    fn map(pfn: Pfn, pages: u64) -> Result<(), BalloonError>;
    /// Re-folds runs and blocks over `[pfn, pfn + pages)`.
    fn refold(pfn: Pfn, pages: u64) -> Result<(), BalloonError>;
}

/// Why [`LinearEnv::new`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, defmt::Format)]
pub enum LinearError {
    /// The allocator was busy.
    FramesBusy,
    /// The allocator's frames are not identity mapped.
    NotIdentity,
}

/// The page array the balloon's allocator drives, for [`fault_note`] and
/// for checking that `with_frames` always hands out the same allocator.
static PAGE_ARRAY: AtomicPtr<PageArray<'static>> = AtomicPtr::new(core::ptr::null_mut());

/// Frames the virtqueues hold (Slab frames, like the balloon's arrays).
static DMA_FRAMES: AtomicU64 = AtomicU64::new(0);

/// Frames the virtqueues hold right now (the firmware's frame accounting
/// counts them with the balloon's own Slab frames).
pub fn dma_frames() -> u64 {
    DMA_FRAMES.load(Ordering::Relaxed)
}

fn page_array() -> Option<&'static PageArray<'static>> {
    // Acquire: pairs with the Release store of PAGE_ARRAY in
    // `LinearEnv::new`, so the page array it points at is initialised.
    let p = PAGE_ARRAY.load(Ordering::Acquire);
    // SAFETY: only ever set from a `&'static PageArray<'static>` (in
    // `LinearEnv::new`); the page array's words are atomics, so a shared
    // reference is fine anywhere, the exception handler included.
    unsafe { p.as_ref() }
}

/// The crash report's line about a faulting address: says when its frame
/// is ballooned (Offline) or free. Install with
/// `hal::exception::set_fault_note(hal::virtio::linear::fault_note)` after
/// [`LinearEnv::new`]; takes no lock.
pub fn fault_note(far: u64) -> Option<&'static str> {
    match page_array()?
        .word(Pfn(far / PAGE_SIZE))
        .ok()?
        .frame_type()?
    {
        FrameType::Offline => Some("ballooned (Offline: given to the host, unmapped)"),
        FrameType::Free => Some("free (owned by the frame allocator)"),
        _ => None,
    }
}

fn same_allocator(fa: &Frames) -> bool {
    // Acquire: pairs with the Release store of PAGE_ARRAY in
    // `LinearEnv::new` (only the address is compared here).
    core::ptr::eq(fa.page_array(), PAGE_ARRAY.load(Ordering::Acquire))
}

/// The writable address of `pfn` through the allocator's linear map, if
/// it is the identity (checked; see the module doc).
fn identity_frame(fa: &Frames, pfn: Pfn) -> Option<NonNull<u8>> {
    let mut m = *fa.desc_memory();
    let p = m.map_frame(pfn)?;
    (p.as_ptr() as u64 == pfn.addr().0).then_some(p)
}

/// [`BalloonEnv`] over the firmware's allocator and map.
pub struct LinearEnv<F> {
    _f: PhantomData<F>,
}

impl<F: FirmwareMemory> LinearEnv<F> {
    /// Checks that the allocator's frames are identity mapped and
    /// remembers its page array.
    pub fn new() -> Result<Self, LinearError> {
        let pa = F::with_frames(|fa| {
            identity_frame(fa, Pfn(1)).map(|_| core::ptr::from_ref(fa.page_array()))
        })
        .map_err(|_| LinearError::FramesBusy)?
        .ok_or(LinearError::NotIdentity)?;
        // Release: pairs with the Acquire loads of PAGE_ARRAY in
        // `page_array` and `same_allocator`.
        PAGE_ARRAY.store(pa.cast_mut(), Ordering::Release);
        Ok(Self { _f: PhantomData })
    }

    /// Writes every free frame once, so that QEMU's resident memory holds
    /// the guest's RAM and an inflate visibly gives it back (QEMU counts
    /// only pages the guest wrote). Every free block is taken (as a
    /// transient Guard allocation, largest first), filled, chained through
    /// its first word, then all are freed again. Returns the frames touched.
    pub fn touch_free_memory(&mut self) -> u64 {
        const END: u64 = u64::MAX;
        let mut head = END;
        let mut touched = 0;
        for order in [9u8, 4, 0] {
            loop {
                let got = F::with_frames(|fa| {
                    if !same_allocator(fa) {
                        return None;
                    }
                    let pfn = fa.alloc_frozen(order, FrozenKind::Guard).ok()?;
                    match identity_frame(fa, pfn) {
                        Some(p) => Some((pfn, p)),
                        None => {
                            let _ = fa.free_frozen(pfn, order);
                            None
                        }
                    }
                });
                let Ok(Some((pfn, p))) = got else { break };
                // SAFETY: the 2^order frames were just allocated to us (no
                // one else uses them until we free them below) and are
                // mapped writable at `p` (identity, checked); the first
                // word links to the previous block, 8-byte aligned.
                unsafe {
                    core::ptr::write_bytes(p.as_ptr(), 0x5a, (PAGE_SIZE << order) as usize);
                    p.as_ptr().cast::<u64>().write(head);
                }
                head = (pfn.0 << 8) | order as u64;
                touched += 1u64 << order;
            }
        }
        while head != END {
            let (pfn, order) = (Pfn(head >> 8), (head & 0xff) as u8);
            let p = F::with_frames(|fa| identity_frame(fa, pfn)).ok().flatten();
            let Some(p) = p else { break };
            // SAFETY: a block we allocated and linked above, still ours.
            let next = unsafe { p.as_ptr().cast::<u64>().read() };
            let _ = F::with_frames(|fa| fa.free_frozen(pfn, order));
            head = next;
        }
        touched
    }
}

// SAFETY: `frame` returns the identity-mapped address of the frame, valid
// by `LinearMap::new`'s contract (checked to be the identity in `new`);
// `with_frames` refuses any allocator but the one whose page array `new`
// recorded, so it is always the same one.
unsafe impl<F: FirmwareMemory> BalloonEnv for LinearEnv<F> {
    type Mem = LinearMap;

    fn with_frames<R>(&mut self, f: impl FnOnce(&mut Frames) -> R) -> Result<R, BalloonError> {
        F::with_frames(|fa| same_allocator(fa).then(|| f(fa)))?.ok_or(BalloonError::FramesBusy)
    }

    fn unmap(&mut self, pfn: Pfn, pages: u64) -> Result<(), BalloonError> {
        F::unmap(pfn, pages)
    }

    fn map(&mut self, pfn: Pfn, pages: u64) -> Result<(), BalloonError> {
        F::map(pfn, pages)
    }

    fn refold(&mut self, pfn: Pfn, pages: u64) -> Result<(), BalloonError> {
        F::refold(pfn, pages)
    }

    fn frame(&mut self, pfn: Pfn) -> NonNull<u8> {
        // Identity (checked in `new`); the address is the frame's.
        NonNull::new(core::ptr::with_exposed_provenance_mut(
            pfn.addr().0 as usize,
        ))
        .unwrap_or(NonNull::dangling())
    }
}

fn order_of(pages: usize) -> u8 {
    pages.max(1).next_power_of_two().trailing_zeros() as u8
}

/// Virtqueue memory from the firmware's allocator, identity mapped.
pub struct LinearDma<F> {
    _f: PhantomData<F>,
}

// SAFETY: `dma_alloc` returns zeroed frames just allocated (Slab) from the
// firmware's allocator, which nothing else uses until `dma_dealloc` frees
// them, mapped writable at the returned pointer, which equals the physical
// address (identity, checked per allocation); share/unshare are the
// identity and do nothing, which is right for identity-mapped RAM with no
// IOMMU.
unsafe impl<F: FirmwareMemory> Hal for LinearDma<F> {
    fn dma_alloc(pages: usize, _dir: BufferDirection) -> (DmaAddr, NonNull<u8>) {
        let order = order_of(pages);
        let got = F::with_frames(|fa| {
            if !same_allocator(fa) {
                return None;
            }
            let pfn = fa.alloc_frozen(order, FrozenKind::Slab).ok()?;
            match identity_frame(fa, pfn) {
                Some(p) => Some((pfn, p)),
                None => {
                    let _ = fa.free_frozen(pfn, order);
                    None
                }
            }
        });
        match got {
            Ok(Some((pfn, p))) => {
                // SAFETY: the frames were just allocated to us and are
                // mapped writable at `p`.
                unsafe { core::ptr::write_bytes(p.as_ptr(), 0, (PAGE_SIZE << order) as usize) };
                DMA_FRAMES.fetch_add(1 << order, Ordering::Relaxed);
                (pfn.addr().0, p)
            }
            _ => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(paddr: DmaAddr, _vaddr: NonNull<u8>, pages: usize) -> i32 {
        let order = order_of(pages);
        match F::with_frames(|fa| fa.free_frozen(Pfn(paddr / PAGE_SIZE), order)) {
            Ok(Ok(())) => {
                DMA_FRAMES.fetch_sub(1 << order, Ordering::Relaxed);
                0
            }
            _ => -1,
        }
    }

    unsafe fn mmio_phys_to_virt(paddr: DmaAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(core::ptr::with_exposed_provenance_mut(paddr as usize))
            .unwrap_or(NonNull::dangling())
    }

    unsafe fn share(buffer: NonNull<[u8]>, _dir: BufferDirection) -> DmaAddr {
        buffer.as_ptr().cast::<u8>() as u64
    }

    unsafe fn unshare(_paddr: DmaAddr, _buffer: NonNull<[u8]>, _dir: BufferDirection) {}
}

// SAFETY: `share` returns the buffer's address unchanged and `unshare`
// does nothing (above); the policy's buffers are its own Slab frames,
// identity mapped (the `BalloonEnv` above).
unsafe impl<F: FirmwareMemory> IdentityDma for LinearDma<F> {}
