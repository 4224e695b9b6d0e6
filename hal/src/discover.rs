//! Where the firmware learns its memory, in order: a DTB whose address the
//! loader passed in x0; a DTB at the board's fallback address (the start of
//! RAM, where QEMU puts `-dtb` for an ELF); the board's own source (the
//! VideoCore mailbox on the Pi); the board's default. Then the board
//! corrects a memory node it knows to be wrong, adds the RAM it must keep
//! (spin table, null page) to the reservations, and supplies the PSCI
//! conduit when the tree names none.

use crate::board::{self, MemoryCorrection, MemorySource};
use crate::dtb::{self, DtbError, Platform, Region, Regions};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU8, Ordering};

/// Which source the memory came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, defmt::Format)]
pub enum Source {
    /// A DTB at the address the loader passed in x0.
    DtbInX0,
    /// A DTB at the board's fallback address (start of RAM).
    DtbAtRamStart,
    /// The VideoCore mailbox (GET_ARM_MEMORY).
    VideoCoreMailbox,
    /// The board description's default RAM.
    BoardDefault,
}

/// What discovery found.
#[derive(Debug, Clone, Copy)]
pub struct Discovered {
    /// The platform facts (from the tree or made up from the board).
    pub platform: Platform<'static>,
    /// Where they came from.
    pub source: Source,
    /// Physical address of the DTB in RAM (to reserve it); 0 with size 0
    /// when there is none.
    pub dtb_addr: u64,
}

/// A DTB at physical address 0 cannot be a Rust slice (a null pointer), so
/// it is copied here once, with assembly loads, and parsed from the copy.
const COPY_MAX: usize = 64 << 10;
#[repr(C, align(8))]
struct Copy(UnsafeCell<[u8; COPY_MAX]>);
// SAFETY: written once under COPY_STATE (0 -> 1 -> 2, single core at boot)
// and only read afterwards.
unsafe impl Sync for Copy {}
static COPY: Copy = Copy(UnsafeCell::new([0; COPY_MAX]));
static COPY_STATE: AtomicU8 = AtomicU8::new(0);
static COPY_LEN: core::sync::atomic::AtomicUsize = core::sync::atomic::AtomicUsize::new(0);

fn read_word(addr: u64) -> Option<u64> {
    // SAFETY: the callers only pass aligned addresses inside the board's
    // RAM (checked by `in_ram`), which has no read side effects; a fault
    // (nothing there) comes back as an error.
    unsafe { crate::exception::probe_read_u64_quiet(addr) }.ok()
}

fn in_ram(addr: u64) -> bool {
    let b = &board::CURRENT;
    addr >= b.ram_base
        && addr.is_multiple_of(8)
        && b.ram_default
            .iter()
            .any(|r| r.base <= addr && addr + 8 <= r.end())
}

/// The DTB's `totalsize` if `addr` holds a DTB header.
fn dtb_header(addr: u64) -> Option<Result<usize, DtbError>> {
    if !in_ram(addr) {
        return None;
    }
    let header = read_word(addr)?.to_ne_bytes();
    match dtb::claimed_size(&header) {
        Err(DtbError::BadMagic(_)) => None,
        Err(e) => Some(Err(e)),
        Ok(n) => Some(Ok(n)),
    }
}

/// Parses the DTB at `addr` without the board check: the board corrects
/// known-wrong memory nodes first, then [`discover`] checks the result.
fn parse_at(addr: u64) -> Result<Platform<'static>, DtbError> {
    if addr != 0 {
        // SAFETY: `addr` is 8-byte aligned RAM holding a DTB header, and
        // the loader's blob is never written (it is reserved).
        return dtb::parse(unsafe { crate::dtb_blob_at(addr) }?);
    }
    let header = read_word(0).ok_or(DtbError::Truncated { have: 0, need: 8 })?;
    let size = dtb::blob_size(&header.to_ne_bytes(), COPY_MAX)?;
    // COPY_STATE: 0 empty, 1 being copied (by the CAS winner), 2 complete.
    // The claim needs no ordering of its own (0 is the initial value, no
    // writer before it); the copy is published by the Release store of 2,
    // which pairs with the Acquire load below.
    if COPY_STATE
        .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
        .is_ok()
    {
        let dst = COPY.0.get().cast::<u64>();
        let copied = (0..size.div_ceil(8)).try_for_each(|i| {
            let w = read_word(i as u64 * 8).ok_or(DtbError::Truncated {
                have: i * 8,
                need: size,
            })?;
            // SAFETY: i * 8 < size <= COPY_MAX; we hold the copy (state 1).
            unsafe { dst.add(i).write(w) };
            Ok(())
        });
        if let Err(e) = copied {
            // Give the claim back, so a later call copies afresh instead of
            // finding state 1 for good. Release: pairs with the Acquire of
            // the next claimer's compare-exchange (our partial writes are
            // overwritten before anyone reads them).
            COPY_STATE.store(0, Ordering::Release);
            return Err(e);
        }
        COPY_LEN.store(size, Ordering::Relaxed);
        // Release: pairs with the Acquire load below (this core's or
        // another's), so a reader of 2 sees the copy and COPY_LEN.
        COPY_STATE.store(2, Ordering::Release);
    }
    // Acquire: pairs with the Release store of 2 above.
    if COPY_STATE.load(Ordering::Acquire) != 2 {
        return Err(DtbError::Parser);
    }
    let len = COPY_LEN.load(Ordering::Relaxed);
    // SAFETY: state 2: the copy is complete and never written again.
    let blob: &'static [u8] =
        unsafe { core::slice::from_raw_parts(COPY.0.get().cast::<u8>(), len) };
    dtb::parse(blob)
}

/// Runs discovery (see the module doc). A DTB that is there but broken is
/// an error, not a reason to fall back: the loader meant it.
pub fn discover() -> Result<Discovered, DtbError> {
    let b = &board::CURRENT;
    let entry_el = crate::boot::entry_el();
    let hint = crate::boot::dtb_hint();
    // x0 = 0 is "no pointer" (an ELF boot), even where RAM starts at 0.
    let found = if let Some(h) = (hint != 0).then(|| dtb_header(hint)).flatten() {
        h?;
        Some((parse_at(hint)?, Source::DtbInX0, hint))
    } else if let Some(h) = dtb_header(b.dtb_fallback) {
        h?;
        Some((
            parse_at(b.dtb_fallback)?,
            Source::DtbAtRamStart,
            b.dtb_fallback,
        ))
    } else {
        None
    };
    let (mut platform, source, dtb_addr) = match found {
        Some(f) => f,
        None => {
            let mailbox = match b.memory_source {
                MemorySource::VideoCoreMailbox { base } => {
                    // SAFETY: the board names its own mailbox block;
                    // nothing else uses it at boot.
                    match unsafe { crate::mailbox::arm_memory(base) } {
                        Ok(r) => Some(r),
                        Err(e) => {
                            defmt::warn!("VideoCore mailbox gave no ARM memory: {}", e);
                            None
                        }
                    }
                }
                MemorySource::None => None,
            };
            match mailbox {
                Some(r) => (Platform::without_dtb(&[r])?, Source::VideoCoreMailbox, 0),
                None => (
                    Platform::without_dtb(b.ram_default)?,
                    Source::BoardDefault,
                    0,
                ),
            }
        }
    };
    correct(&mut platform)?;
    for &r in b.reserved {
        platform.reserved.push(r)?;
    }
    if platform.psci.is_none() && entry_el < 3 {
        platform.psci = b.psci;
    }
    platform.check(b)?;
    Ok(Discovered {
        platform,
        source,
        dtb_addr,
    })
}

fn correct(p: &mut Platform<'_>) -> Result<(), DtbError> {
    let b = &board::CURRENT;
    let mut out = [Region::default(); dtb::MAX_RANGES];
    let n = b
        .correct_memory(p.memory.as_slice(), &mut out, |c| match c {
            MemoryCorrection::Split {
                claimed,
                low,
                high,
            } => defmt::warn!(
                "device tree memory {=u64:#x}..{=u64:#x} is wrong on {=str}: RAM above {=u64:#x} is at {=u64:#x}; using {=u64:#x}..{=u64:#x} and {=u64:#x}..{=u64:#x}",
                claimed.base,
                claimed.end(),
                b.name,
                low.end(),
                high.base,
                low.base,
                low.end(),
                high.base,
                high.end()
            ),
            MemoryCorrection::Incomplete { claimed } => defmt::warn!(
                "device tree memory {=u64:#x}..{=u64:#x} is incomplete on {=str}: it stops at the VideoCore split with nothing above 1 GiB (QEMU writes this whatever the RAM; a real board's firmware lists the rest); using it as it is",
                claimed.base,
                claimed.end(),
                b.name
            ),
        })
        .ok_or(DtbError::TooMany)?;
    let mut memory = Regions::empty();
    for &r in &out[..n] {
        memory.push(r)?;
    }
    p.memory = memory;
    Ok(())
}
