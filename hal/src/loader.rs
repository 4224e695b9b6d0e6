//! The resident loader's hardware side (feature `loader`, with its own link
//! layout in `link/loader/`): the entry that moves the loader out of the
//! test images' way, the RAM it loads into ([`Ram`], the
//! [`loader_proto::Memory`] of the protocol logic), and the jump into a
//! loaded image.
//!
//! The entry is an arm64 Image header (text_offset 0x80000, where QEMU's
//! raw boot and the Pi firmware with `kernel_address=0x80000` put it)
//! followed by a position-independent stub: park every core but the first,
//! turn the MMU and caches off if the boot loader left them on (U-Boot's
//! `bootelf`), untrap FP/SIMD, then copy the image to its link address
//! near the top of RAM if it is not there already (U-Boot and QEMU load
//! the ELF there), invalidate the instruction cache and continue there:
//! stack, BSS, then `loader_main(x0 as the board passed it, entry EL)`.
//! The entry EL is left as it was: images run where the board's own boot
//! firmware would have started them.

use crate::dtb::Region;
use crate::loader_proto::{Memory, RECORD_BYTES};

core::arch::global_asm!(
    r#"
.section .text.loader_entry, "ax"
.global _loader_start
_loader_start:
    b       1f                      // code0
    .long   0                       // code1
    .quad   0x80000                 // text_offset
    .quad   __loader_image_size     // image_size (with BSS and stack)
    .quad   0xa                     // flags: little-endian, 4 KiB pages, anywhere
    .quad   0
    .quad   0
    .quad   0
    .ascii  "ARM\x64"
    .long   0
1:  mov     x19, x0
    mrs     x1, mpidr_el1
    and     x1, x1, #0xffffff
    cbnz    x1, 9f
    mrs     x20, CurrentEL
    ubfx    x20, x20, #2, #2
    bl      hal_entry_mmu_caches_off_asm
    cmp     x20, #3
    b.ne    2f
    msr     cptr_el3, xzr
    b       3f
2:  cmp     x20, #2
    b.ne    3f
    mov     x1, #0x33ff
    msr     cptr_el2, x1
3:  mov     x1, #(3 << 20)
    msr     cpacr_el1, x1
    isb
    // Where we run (PC-relative) and where we are linked (absolute).
    adr     x1, _loader_start
    ldr     x2, =_loader_start
    cmp     x1, x2
    b.eq    5f
    ldr     x3, =__loader_load_size
    add     x3, x1, x3
4:  ldp     x5, x6, [x1], #16
    stp     x5, x6, [x2], #16
    cmp     x1, x3
    b.lo    4b
    dsb     sy
    ic      iallu
    dsb     sy
    isb
5:  ldr     x1, =6f
    br      x1
6:  ldr     x1, =__loader_stack_top
    mov     sp, x1
    ldr     x1, =__loader_bss_start
    ldr     x2, =__loader_bss_end
7:  cmp     x1, x2
    b.hs    8f
    stp     xzr, xzr, [x1], #16
    b       7b
8:  mov     x0, x19
    mov     x1, x20
    bl      loader_main
9:  wfe
    b       9b
.ltorg

// hal_loader_jump(entry, x0, x1, x2, x3): no return.
.global hal_loader_jump
hal_loader_jump:
    mov     x9, x0
    mov     x0, x1
    mov     x1, x2
    mov     x2, x3
    mov     x3, x4
    dsb     sy
    ic      iallu
    dsb     sy
    isb
    br      x9
"#
);

extern "C" {
    static __loader_start: u8;
    static __loader_end: u8;
    static __loader_record: u8;
    fn hal_loader_jump(entry: u64, x0: u64, x1: u64, x2: u64, x3: u64) -> !;
}

/// Defines `loader_main`, the symbol the loader's entry calls once the
/// loader runs at its link address with a stack and BSS, as a call of
/// `$f: fn(u64, u8) -> !` (x0 as the board passed it, the entry EL).
#[macro_export]
macro_rules! loader_entry {
    ($f:path) => {
        // The entry (hal::loader) calls exactly one `loader_main`.
        #[allow(unsafe_code)]
        #[export_name = "loader_main"]
        extern "C" fn __hal_loader_main(x0: u64, el: u64) -> ! {
            let f: fn(u64, u8) -> ! = $f;
            f(x0, el as u8)
        }
    };
}

/// The loader's own footprint: its image, BSS and stack, and the record
/// page below it.
pub fn footprint() -> Region {
    // Linker symbols; only their addresses are taken.
    let (start, end) = (
        core::ptr::addr_of!(__loader_record) as u64,
        core::ptr::addr_of!(__loader_end) as u64,
    );
    Region {
        base: start,
        size: end - start,
    }
}

/// Where the loader runs (its link address).
pub fn base() -> u64 {
    // A linker symbol; only its address is taken.
    core::ptr::addr_of!(__loader_start) as u64
}

/// Most reserved ranges [`Ram`] keeps.
pub const MAX_RESERVED: usize = 4;

/// The RAM segments are loaded into: physical memory outside the loader's
/// footprint and the reserved ranges, which no Rust object of the loader
/// lives in. Every access is range-checked again here, so a protocol bug
/// cannot write over the loader.
pub struct Ram {
    ram: [Region; crate::loader_proto::MAX_RAM],
    ram_count: usize,
    reserved: [Region; MAX_RESERVED],
    reserved_count: usize,
}

impl Ram {
    /// `ram` (at most `MAX_RAM` ranges; more are ignored) minus the loader
    /// and `reserved` (at most [`MAX_RESERVED`]).
    pub fn new(ram: &[Region], reserved: &[Region]) -> Self {
        let mut r = Self {
            ram: [Region::default(); crate::loader_proto::MAX_RAM],
            ram_count: 0,
            reserved: [Region::default(); MAX_RESERVED],
            reserved_count: 0,
        };
        for (slot, x) in r.ram.iter_mut().zip(ram) {
            *slot = *x;
            r.ram_count += 1;
        }
        for (slot, x) in r.reserved.iter_mut().zip(reserved) {
            *slot = *x;
            r.reserved_count += 1;
        }
        r
    }

    /// True when `addr..addr+len` may be touched (a zero length always).
    fn allowed(&self, addr: u64, len: u64) -> bool {
        len == 0 || (addr != 0 && crate::loader_proto::check_range(self, addr, len).is_ok())
    }
}

impl Memory for Ram {
    fn ram(&self) -> &[Region] {
        &self.ram[..self.ram_count]
    }

    fn loader(&self) -> Region {
        footprint()
    }

    fn reserved(&self) -> &[Region] {
        &self.reserved[..self.reserved_count]
    }

    fn write(&mut self, addr: u64, bytes: &[u8]) {
        if !self.allowed(addr, bytes.len() as u64) {
            return;
        }
        for (i, &b) in bytes.iter().enumerate() {
            // SAFETY: checked above: RAM, not address 0, clear of the
            // loader's image, stack, BSS and record and of the reserved
            // ranges, so no Rust object is behind it. Byte stores: the
            // MMU is off (Device memory, no unaligned access).
            unsafe { core::ptr::write_volatile((addr + i as u64) as *mut u8, b) };
        }
    }

    fn zero(&mut self, addr: u64, len: u64) {
        if !self.allowed(addr, len) {
            return;
        }
        for i in 0..len {
            // SAFETY: as in `write`.
            unsafe { core::ptr::write_volatile((addr + i) as *mut u8, 0) };
        }
    }

    fn crc32(&self, addr: u64, len: u64) -> u32 {
        if !self.allowed(addr, len) {
            return 0;
        }
        let mut crc = crate::semihost_console::Crc32::new();
        for i in 0..len {
            // SAFETY: as in `write`; reads only.
            crc.push(unsafe { core::ptr::read_volatile((addr + i) as *const u8) });
        }
        crc.finish()
    }

    fn load_record(&self) -> [u8; RECORD_BYTES] {
        let mut b = [0u8; RECORD_BYTES];
        // The record page (`__loader_record`, 4 KiB below the image,
        // larger than RECORD_BYTES) is RAM the loader owns and no Rust
        // object occupies (it is outside every section).
        let p = core::ptr::addr_of!(__loader_record);
        for (i, slot) in b.iter_mut().enumerate() {
            // SAFETY: see above.
            *slot = unsafe { core::ptr::read_volatile(p.add(i)) };
        }
        b
    }

    fn store_record(&mut self, b: &[u8; RECORD_BYTES]) {
        let p = core::ptr::addr_of!(__loader_record).cast_mut();
        for (i, &v) in b.iter().enumerate() {
            // SAFETY: as in `load_record`.
            unsafe { core::ptr::write_volatile(p.add(i), v) };
        }
    }
}

/// Jumps to `entry` at the current EL with x0..x3, MMU and caches off, the
/// instruction cache invalidated. The loader's last act: it keeps no state
/// the image could depend on, and the image was checked (loaded, CRC
/// verified, `entry` inside it) by the protocol logic before this is called.
pub fn jump(entry: u64, x: [u64; 4]) -> ! {
    crate::console::CONSOLE.flush();
    // SAFETY: `entry` lies in a segment the host loaded and the loader
    // verified; control never comes back, so nothing of the loader's
    // state is used after the jump.
    unsafe { hal_loader_jump(entry, x[0], x[1], x[2], x[3]) }
}

/// Reads the 8 bytes at physical `addr` (8-byte aligned, in the board's RAM,
/// address 0 included, which a Rust pointer cannot be).
fn read_phys_u64(addr: u64) -> u64 {
    let v: u64;
    // SAFETY: the callers pass 8-byte aligned addresses inside the board's
    // default RAM, which has no read side effects; the load is plain asm,
    // so address 0 is no null-pointer dereference.
    unsafe {
        core::arch::asm!("ldr {v}, [{a}]", v = out(reg) v, a = in(reg) addr, options(nostack, readonly))
    };
    v
}

/// The DTB header's `totalsize` at `addr`, if a DTB starts there.
fn dtb_at(addr: u64) -> Option<u64> {
    let b = &crate::board::CURRENT;
    let in_ram = addr.is_multiple_of(8)
        && b.ram_default
            .iter()
            .any(|r| r.base <= addr && addr.saturating_add(8) <= r.end());
    if !in_ram {
        return None;
    }
    let header = read_phys_u64(addr).to_ne_bytes();
    crate::dtb::claimed_size(&header).ok().map(|n| n as u64)
}

/// What the board gave the loader: the RAM to load into (the DTB's memory
/// node when x0 points at a valid DTB, else the board's default RAM) and
/// the ranges to keep (the board's reserved RAM, the DTB at x0 or at the
/// board's fallback address).
pub fn boot_memory(x0: u64) -> Ram {
    let b = &crate::board::CURRENT;
    let mut reserved = [Region::default(); MAX_RESERVED];
    let mut n = 0;
    for r in b.reserved.iter().take(MAX_RESERVED - 1) {
        reserved[n] = *r;
        n += 1;
    }
    let at = if x0 != 0 { x0 } else { b.dtb_fallback };
    if let Some(size) = dtb_at(at) {
        reserved[n] = Region { base: at, size };
        n += 1;
        if at != 0 {
            // SAFETY: `at` is non-zero, aligned RAM holding a DTB header
            // of `size` bytes; the DTB is reserved, so never written.
            let parsed = unsafe { crate::dtb_blob_at(at) }.and_then(crate::dtb::parse);
            if let Ok(p) = parsed {
                if !p.memory.as_slice().is_empty() {
                    return Ram::new(p.memory.as_slice(), &reserved[..n]);
                }
            }
        }
    }
    Ram::new(b.ram_default, &reserved[..n])
}
