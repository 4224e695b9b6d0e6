//! U-Boot's legacy image format ("uImage", U-Boot `include/image.h`,
//! `image_header_t`), for one kind only: a script (`IH_TYPE_SCRIPT`), what
//! `mkimage -T script` makes of `boot.cmd` and U-Boot's `source` runs. We
//! write it ourselves so no `mkimage` (u-boot-tools) is needed.
//!
//! Layout, every word big-endian:
//!
//! | offset | field | value here |
//! |---|---|---|
//! | 0 | `ih_magic` | 0x2705_1956 |
//! | 4 | `ih_hcrc` | CRC-32 of these 64 bytes with this field 0 |
//! | 8 | `ih_time` | 0 (reproducible output) |
//! | 12 | `ih_size` | bytes of data after the header |
//! | 16 | `ih_load` | 0 (a script is not loaded anywhere) |
//! | 20 | `ih_ep` | 0 |
//! | 24 | `ih_dcrc` | CRC-32 of the data |
//! | 28 | `ih_os` | 5, `IH_OS_LINUX` (what `mkimage -O linux` writes) |
//! | 29 | `ih_arch` | 22, `IH_ARCH_ARM64` |
//! | 30 | `ih_type` | 6, `IH_TYPE_SCRIPT` |
//! | 31 | `ih_comp` | 0, `IH_COMP_NONE` |
//! | 32 | `ih_name` | 32 bytes, NUL-padded |
//!
//! A script's data is a multi-file image with one file: a table of file
//! lengths (u32 each) ended by a 0 word, then the file. The CRC is the
//! IEEE 802.3 CRC-32 (zlib's `crc32`).

/// `IH_MAGIC`.
pub const MAGIC: u32 = 0x2705_1956;
/// Header length.
pub const HEADER_LEN: usize = 64;
/// `IH_OS_LINUX`.
pub const OS_LINUX: u8 = 5;
/// `IH_ARCH_ARM64`.
pub const ARCH_ARM64: u8 = 22;
/// `IH_TYPE_SCRIPT`.
pub const TYPE_SCRIPT: u8 = 6;
/// `IH_COMP_NONE`.
pub const COMP_NONE: u8 = 0;
/// `IH_NMLEN`: bytes of the name field (the name must leave one NUL).
pub const NAME_LEN: usize = 32;

/// CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320), as zlib and
/// U-Boot compute it.
pub fn crc32(data: &[u8]) -> u32 {
    hal::semihost_console::crc32(data)
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Why [`script`] or [`parse_script`] refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UImageError {
    /// The name does not fit in 31 bytes plus a NUL, or holds a NUL.
    Name,
    /// The script is empty (U-Boot's `source` refuses an empty one) or
    /// larger than a u32 length.
    Length,
    /// Shorter than a header, or than the header says.
    Truncated,
    /// Not `IH_MAGIC`.
    Magic(u32),
    /// The header CRC does not match.
    HeaderCrc,
    /// The data CRC does not match.
    DataCrc,
    /// Not a script image.
    Type(u8),
    /// The length table is not one length and a 0 word within the data.
    Table,
}

/// The script image of `script` named `name`.
pub fn script(name: &str, script: &[u8]) -> Result<Vec<u8>, UImageError> {
    if name.len() >= NAME_LEN || name.as_bytes().contains(&0) {
        return Err(UImageError::Name);
    }
    let len = u32::try_from(script.len()).map_err(|_| UImageError::Length)?;
    if len == 0 {
        return Err(UImageError::Length);
    }
    let mut data = Vec::with_capacity(8 + script.len());
    data.extend_from_slice(&len.to_be_bytes());
    data.extend_from_slice(&0u32.to_be_bytes());
    data.extend_from_slice(script);
    let size = u32::try_from(data.len()).map_err(|_| UImageError::Length)?;
    let mut h = Vec::with_capacity(HEADER_LEN + data.len());
    for word in [MAGIC, 0, 0, size, 0, 0, crc32(&data)] {
        h.extend_from_slice(&word.to_be_bytes());
    }
    h.extend_from_slice(&[OS_LINUX, ARCH_ARM64, TYPE_SCRIPT, COMP_NONE]);
    let mut n = [0u8; NAME_LEN];
    n[..name.len()].copy_from_slice(name.as_bytes());
    h.extend_from_slice(&n);
    let hcrc = crc32(&h[..HEADER_LEN]);
    h[4..8].copy_from_slice(&hcrc.to_be_bytes());
    h.extend_from_slice(&data);
    Ok(h)
}

/// Checks `image` the way U-Boot's `source` does (magic, header CRC, data
/// CRC, type, the length table) and returns the script.
pub fn parse_script(image: &[u8]) -> Result<&[u8], UImageError> {
    let h = image.get(..HEADER_LEN).ok_or(UImageError::Truncated)?;
    let magic = be32(h, 0);
    if magic != MAGIC {
        return Err(UImageError::Magic(magic));
    }
    let mut zeroed = h.to_vec();
    zeroed[4..8].fill(0);
    if crc32(&zeroed) != be32(h, 4) {
        return Err(UImageError::HeaderCrc);
    }
    let size = be32(h, 12) as usize;
    let data = image
        .get(HEADER_LEN..HEADER_LEN + size)
        .ok_or(UImageError::Truncated)?;
    if crc32(data) != be32(h, 24) {
        return Err(UImageError::DataCrc);
    }
    if h[30] != TYPE_SCRIPT {
        return Err(UImageError::Type(h[30]));
    }
    if data.len() < 8 || be32(data, 4) != 0 {
        return Err(UImageError::Table);
    }
    let len = be32(data, 0) as usize;
    if len == 0 {
        return Err(UImageError::Length);
    }
    data.get(8..8 + len).ok_or(UImageError::Table)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CRC's standard check value (CRC-32/ISO-HDLC: "123456789").
    #[test]
    fn crc_is_ieee() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }

    /// Every byte of the image of "echo hi\n", against values worked out
    /// from the format by hand (the CRCs with zlib's crc32 over exactly
    /// these bytes).
    #[test]
    fn script_header_is_byte_exact() {
        let img = script("memfw", b"echo hi\n").expect("builds");
        let data: &[u8] = &[
            0, 0, 0, 8, 0, 0, 0, 0, b'e', b'c', b'h', b'o', b' ', b'h', b'i', b'\n',
        ];
        let mut want = Vec::new();
        want.extend_from_slice(&[0x27, 0x05, 0x19, 0x56]); // ih_magic
        want.extend_from_slice(&[0xcd, 0x7e, 0xa6, 0x35]); // ih_hcrc
        want.extend_from_slice(&[0, 0, 0, 0]); // ih_time
        want.extend_from_slice(&[0, 0, 0, 16]); // ih_size
        want.extend_from_slice(&[0, 0, 0, 0]); // ih_load
        want.extend_from_slice(&[0, 0, 0, 0]); // ih_ep
        want.extend_from_slice(&[0xd9, 0x34, 0x01, 0x62]); // ih_dcrc
        want.extend_from_slice(&[5, 22, 6, 0]); // os, arch, type, comp
        let mut name = [0u8; 32];
        name[..5].copy_from_slice(b"memfw");
        want.extend_from_slice(&name);
        want.extend_from_slice(data);
        assert_eq!(img.len(), 64 + 16);
        assert_eq!(img, want);
        // Each CRC is what it claims to be.
        assert_eq!(crc32(data), 0xd934_0162);
        let mut h = want[..64].to_vec();
        h[4..8].fill(0);
        assert_eq!(crc32(&h), 0xcd7e_a635);
    }

    #[test]
    fn round_trip_and_every_check_fires() {
        let text = b"setenv a 1\nbootelf 0x48000000\n";
        let img = script("memfw imx8mp-evk", text).expect("builds");
        assert_eq!(parse_script(&img), Ok(&text[..]));
        let flip = |at: usize| {
            let mut b = img.clone();
            b[at] ^= 1;
            parse_script(&b).unwrap_err()
        };
        assert!(matches!(flip(0), UImageError::Magic(_)));
        assert_eq!(flip(9), UImageError::HeaderCrc); // ih_time
        assert_eq!(flip(30), UImageError::HeaderCrc); // ih_type
        assert_eq!(flip(64 + 8), UImageError::DataCrc); // a script byte
        assert_eq!(parse_script(&img[..63]), Err(UImageError::Truncated));
        assert_eq!(
            parse_script(&img[..img.len() - 1]),
            Err(UImageError::Truncated)
        );
        assert_eq!(script("memfw", b""), Err(UImageError::Length));
        assert_eq!(script(&"x".repeat(32), b"a"), Err(UImageError::Name));
        assert!(script(&"x".repeat(31), b"a").is_ok());
    }
}
