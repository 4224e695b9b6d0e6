//! The VideoCore mailbox property interface (Raspberry Pi firmware wiki,
//! "Mailbox property interface"; BCM2835 ARM Peripherals, ARM mailbox at
//! peripheral base + 0xB880): asks the Pi firmware (or QEMU's model of it)
//! which memory belongs to the ARM cores.

use crate::dtb::Region;

const MBOX0_READ: u64 = 0x880;
const MBOX0_STATUS: u64 = 0x898;
const MBOX1_WRITE: u64 = 0x8a0;
const MBOX1_STATUS: u64 = 0x8b8;
const STATUS_FULL: u32 = 1 << 31;
const STATUS_EMPTY: u32 = 1 << 30;
const CHANNEL_PROPERTY: u32 = 8;
const TAG_GET_ARM_MEMORY: u32 = 0x0001_0005;
const RESPONSE_OK: u32 = 0x8000_0000;
/// Polls before giving up on a mailbox that never answers.
const SPINS: u32 = 1_000_000;

/// Why the mailbox gave no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, defmt::Format)]
pub enum MailboxError {
    /// The mailbox stayed full or empty for too long.
    Timeout,
    /// The firmware did not mark the request as answered.
    Refused(u32),
    /// It answered an empty or overflowing range.
    BadRange { base: u32, size: u32 },
}

/// A property message: 16-byte aligned (the low 4 bits carry the channel).
#[repr(C, align(16))]
struct Message([u32; 8]);

fn read(base: u64, off: u64) -> u32 {
    // SAFETY: `base` is the board's mailbox block (the caller of arm_memory
    // guarantees it); these offsets are its status/read registers, which
    // have no side effect but popping a read we asked for.
    unsafe { core::ptr::read_volatile((base + off) as *const u32) }
}

fn write(base: u64, off: u64, v: u32) {
    // SAFETY: as in `read`; the write register takes a message address.
    unsafe { core::ptr::write_volatile((base + off) as *mut u32, v) }
}

fn clean_invalidate(m: &Message) {
    let addr = m as *const Message as u64;
    // SAFETY: DC CIVAC on the message's own 32 bytes (less than one cache
    // line on every Armv8 core; the struct is 16-byte aligned, so it can
    // span two 64-byte lines: both are covered).
    unsafe {
        core::arch::asm!(
            "dc civac, {a}", "dc civac, {b}", "dsb sy",
            a = in(reg) addr,
            b = in(reg) addr + 31,
            options(nostack, preserves_flags)
        );
    }
}

/// Asks the firmware for the ARM's memory (GET_ARM_MEMORY).
///
/// # Safety
///
/// `base` is the VideoCore mailbox block of this SoC (peripheral base +
/// 0xB000), mapped Device (or the MMU is off), and nothing else is using
/// the mailbox.
pub unsafe fn arm_memory(base: u64) -> Result<Region, MailboxError> {
    let mut m = Message([32, 0, TAG_GET_ARM_MEMORY, 8, 0, 0, 0, 0]);
    clean_invalidate(&m);
    let addr = &mut m as *mut Message as u64;
    let bus = u32::try_from(addr).map_err(|_| MailboxError::Timeout)?;
    let mut spins = 0;
    while read(base, MBOX1_STATUS) & STATUS_FULL != 0 {
        spins += 1;
        if spins > SPINS {
            return Err(MailboxError::Timeout);
        }
    }
    write(base, MBOX1_WRITE, bus | CHANNEL_PROPERTY);
    let mut spins = 0;
    loop {
        if read(base, MBOX0_STATUS) & STATUS_EMPTY == 0
            && read(base, MBOX0_READ) & 0xf == CHANNEL_PROPERTY
        {
            break;
        }
        spins += 1;
        if spins > SPINS {
            return Err(MailboxError::Timeout);
        }
    }
    clean_invalidate(&m);
    // SAFETY: the firmware wrote the answer into `m` by DMA; reading it
    // volatile after the clean/invalidate sees those bytes.
    let v = |i: usize| unsafe { core::ptr::read_volatile(&m.0[i]) };
    if v(1) != RESPONSE_OK {
        return Err(MailboxError::Refused(v(1)));
    }
    let (rbase, rsize) = (v(5), v(6));
    if rsize == 0 {
        return Err(MailboxError::BadRange {
            base: rbase,
            size: rsize,
        });
    }
    Ok(Region {
        base: rbase as u64,
        size: rsize as u64,
    })
}
