//! What the balloon policy needs from the firmware around it: the frame
//! allocator, the firmware's own stage-1 map, and access to the frames that
//! hold its PFN arrays.
//!
//! The allocator is reached through [`BalloonEnv::with_frames`] rather than
//! a `&mut` held for a whole operation because changing the stage-1 map
//! allocates and frees table frames from the same allocator: the policy
//! never holds the allocator while it calls [`BalloonEnv::unmap`] or
//! [`BalloonEnv::map`].

use super::error::BalloonError;
use crate::addr::{Pfn, PhysAddr};
use crate::frames::{DescMemory, FrameAllocator};
use core::ptr::NonNull;

/// The firmware side of the balloon.
///
/// # Safety
///
/// [`BalloonEnv::frame`] must return the address, in the running address
/// space, of the 4 KiB of RAM that back `pfn`, aligned to 4 KiB, readable and
/// writable as long as the frame is allocated to the balloon (the policy
/// calls it only for frames it allocated as Slab and has not freed), and
/// used by nothing else meanwhile. [`BalloonEnv::dma_addr`] must return the
/// address a device uses for that frame. `with_frames` must hand out the
/// allocator whose frames the policy tracks, every time the same one.
pub unsafe trait BalloonEnv {
    /// The allocator's descriptor memory.
    type Mem: DescMemory;
    /// Runs `f` with exclusive access to the frame allocator.
    ///
    /// # Errors
    ///
    /// [`BalloonError::FramesBusy`] when the allocator is held by someone
    /// else (re-entrant use); `f` is then not run.
    fn with_frames<R>(
        &mut self,
        f: impl FnOnce(&mut FrameAllocator<'static, Self::Mem>) -> R,
    ) -> Result<R, BalloonError>;
    /// Removes `[pfn, pfn + pages)` from the firmware's own map, so a stray
    /// access faults instead of touching memory the host took away.
    ///
    /// # Errors
    ///
    /// [`BalloonError::Map`] when the stage-1 engine refuses the change
    /// (for example it is out of table memory), [`BalloonError::FramesBusy`]
    /// when the map or the allocator it takes table frames from is in use.
    fn unmap(&mut self, pfn: Pfn, pages: u64) -> Result<(), BalloonError>;
    /// Maps `[pfn, pfn + pages)` again as normal memory.
    ///
    /// # Errors
    ///
    /// As [`BalloonEnv::unmap`]: [`BalloonError::Map`] when the engine
    /// refuses, [`BalloonError::FramesBusy`] when the map is in use.
    fn map(&mut self, pfn: Pfn, pages: u64) -> Result<(), BalloonError>;
    /// Re-folds runs and blocks over `[pfn, pfn + pages)` (holes allowed)
    /// after a deflate (docs/architecture.md, stage-1 rule 8).
    ///
    /// # Errors
    ///
    /// As [`BalloonEnv::unmap`]: [`BalloonError::Map`] when the engine
    /// refuses, [`BalloonError::FramesBusy`] when the map is in use.
    fn refold(&mut self, pfn: Pfn, pages: u64) -> Result<(), BalloonError>;
    /// The running address of frame `pfn` (see the trait's safety section).
    fn frame(&mut self, pfn: Pfn) -> NonNull<u8>;
    /// The address a device uses for frame `pfn` (identity by default).
    fn dma_addr(&self, pfn: Pfn) -> PhysAddr {
        pfn.addr()
    }
}
