//! Device-tree suite: the memory QEMU was given, and malformed blobs fed to
//! the same parser the boot uses (QEMU's `-dtb` rewrites memory nodes and
//! rejects corrupt blobs, so they are embedded in the test image instead).
#![no_std]
#![no_main]
#![deny(unsafe_code)]

#[cfg(test)]
#[embedded_test::tests(default_timeout = 60)]
mod tests {
    use hal::dtb::{self, DtbError};

    const MULTI: &[u8] = include_bytes!("../../hal/tests/dtb/multi-bank.dtb");

    #[init]
    fn init() {
        let _ = firmware::init();
    }

    /// The RAM the boot DTB describes equals what QEMU was started with
    /// (the host tool runs this with -m 512M, 1G and 4G).
    #[test]
    fn memory_matches_qemu() {
        let expected = hal::semihost::arg_u64("mem_bytes").expect("host passes mem_bytes");
        let p = hal::boot_dtb().expect("boot DTB parses");
        assert_eq!(p.memory.total(), expected);
        assert_eq!(p.memory.as_slice()[0].base, hal::board::CURRENT.ram_base);
    }

    /// QEMU virt's tree names the PL011 console's transports and PSCI.
    #[test]
    fn virt_tree_contents() {
        let p = hal::boot_dtb().expect("boot DTB parses");
        assert!(!p.virtio_mmio().is_empty());
        assert!(p.virtio_mmio().iter().any(|v| v.region.base == 0x0a00_0000));
    }

    /// A blob buffer with the 8-byte alignment a loader gives.
    #[repr(C, align(8))]
    struct Buf([u8; 1024]);

    fn aligned_copy(src: &[u8], buf: &mut Buf) -> usize {
        buf.0[..src.len()].copy_from_slice(src);
        src.len()
    }

    /// A good embedded blob parses on target with several banks.
    #[test]
    fn embedded_multi_bank() {
        let p = dtb::parse(MULTI).expect("valid");
        assert_eq!(p.memory.as_slice().len(), 3);
        assert_eq!(p.reserved.as_slice().len(), 2);
    }

    /// A truncated blob is a typed error.
    #[test]
    fn truncated_dtb_is_typed_error() {
        assert!(matches!(
            dtb::parse(&MULTI[..MULTI.len() / 2]),
            Err(DtbError::Truncated { .. })
        ));
        assert!(matches!(
            dtb::parse(&MULTI[..20]),
            Err(DtbError::Truncated { .. })
        ));
    }

    /// Bad magic is a typed error naming the magic found.
    #[test]
    fn bad_magic_is_typed_error() {
        let mut buf = Buf([0; 1024]);
        let n = aligned_copy(MULTI, &mut buf);
        buf.0[0] ^= 0xff;
        assert!(matches!(
            dtb::parse(&buf.0[..n]),
            Err(DtbError::BadMagic(_))
        ));
    }

    /// An unbalanced structure block (END_NODE replaced by NOP) is rejected.
    #[test]
    fn unbalanced_structure_is_typed_error() {
        let mut buf = Buf([0; 1024]);
        let n = aligned_copy(MULTI, &mut buf);
        let bytes = &buf.0[..n];
        let off_struct = u32::from_be_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
        let size_struct = u32::from_be_bytes([bytes[36], bytes[37], bytes[38], bytes[39]]) as usize;
        // The last END_NODE sits just before the final END token.
        let at = off_struct + size_struct - 8;
        assert_eq!(&bytes[at..at + 4], &[0, 0, 0, 2]);
        let mut copy = [0u8; 1024];
        copy[..n].copy_from_slice(bytes);
        copy[at + 3] = 4; // FDT_NOP
        assert!(matches!(
            dtb::parse(&copy[..n]),
            Err(DtbError::Unbalanced { .. })
        ));
    }

    /// A DTB with 8-byte alignment, as a loader leaves it.
    #[repr(C, align(8))]
    struct Aligned([u8; MULTI.len()]);

    const fn with_total_size(mut blob: [u8; MULTI.len()], total: u32) -> [u8; MULTI.len()] {
        let t = total.to_be_bytes();
        blob[4] = t[0];
        blob[5] = t[1];
        blob[6] = t[2];
        blob[7] = t[3];
        blob
    }

    static MULTI_ALIGNED: Aligned = Aligned(*include_bytes!("../../hal/tests/dtb/multi-bank.dtb"));
    static OVERSIZED: Aligned = Aligned(with_total_size(
        *include_bytes!("../../hal/tests/dtb/multi-bank.dtb"),
        3 << 20,
    ));

    /// A blob whose header claims more than the boot path reads is
    /// reported as oversized (not truncated), and nothing past the header
    /// is read; the same bytes with their true size parse.
    #[test]
    fn oversized_dtb_is_reported_as_oversized() {
        // Only the header is read: the claimed size is refused first.
        let r = hal::dtb_in(&OVERSIZED.0);
        assert_eq!(
            r.err(),
            Some(DtbError::Oversized {
                size: 3 << 20,
                max: dtb::MAX_DTB_SIZE
            })
        );
        let blob = hal::dtb_in(&MULTI_ALIGNED.0).expect("read");
        assert_eq!(blob.len(), MULTI.len());
        // Its banks need not fit this board, so parse without the board check.
        let p = dtb::parse(blob).expect("valid");
        assert_eq!(p.memory.as_slice().len(), 3);
    }

    /// Random corruption on target: typed errors or success, never a panic.
    #[test]
    fn corruption_never_panics() {
        let mut copy = [0u8; 1024];
        let n = MULTI.len();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut errors = 0;
        for _ in 0..300 {
            copy[..n].copy_from_slice(MULTI);
            for _ in 0..4 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                copy[(seed as usize) % n] = (seed >> 32) as u8;
            }
            if dtb::parse(&copy[..n]).is_err() {
                errors += 1;
            }
        }
        assert!(errors > 0, "some corruption must be detected");
    }
}
