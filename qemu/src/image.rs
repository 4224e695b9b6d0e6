//! `cargo qemu image --board NAME --out DIR`: what goes on a real board.
//!
//! - Raspberry Pi 3B/4B: `kernel8.img`, the firmware as a raw image that
//!   starts with the arm64 Image header (hal/src/boot.rs), `config.txt`
//!   (64-bit, UART on, load address pinned to the link address) and a
//!   README naming the boot firmware files to copy from the Raspberry Pi
//!   firmware release. The Pi firmware (and QEMU's raw boot) loads it at
//!   `kernel_address` and enters at EL2 with the DTB in x0.
//! - i.MX 8M Plus EVK, ZCU102: `memfw.elf`, a U-Boot script `boot.cmd`
//!   that loads it from the SD card and starts it with `bootelf`, and
//!   `boot.scr`, the same script as a legacy U-Boot script image, which
//!   [`uimage`] writes (no `mkimage` needed).

pub mod uimage;

use crate::error::{Error, Result};
use object::{Object, ObjectSegment};
use std::path::{Path, PathBuf};

/// The raw image of `elf`: its loadable bytes from the lowest load
/// address, zero-filled between segments (BSS is not included; the arm64
/// header's `image_size` covers it). Returns (load address, bytes).
pub fn raw_image(elf: &[u8]) -> Result<(u64, Vec<u8>)> {
    let file = object::File::parse(elf).map_err(elf_error)?;
    let mut segs = Vec::new();
    for seg in file.segments() {
        let data = seg.data().map_err(elf_error)?;
        if !data.is_empty() {
            segs.push((seg.address(), data));
        }
    }
    let base = segs.iter().map(|s| s.0).min().ok_or_else(|| Error::Parse {
        what: "ELF",
        detail: "no loadable segment".into(),
    })?;
    let end = segs
        .iter()
        .map(|(a, d)| a + d.len() as u64)
        .max()
        .unwrap_or(base);
    let mut out = vec![0u8; (end - base) as usize];
    for (a, d) in segs {
        let at = (a - base) as usize;
        out[at..at + d.len()].copy_from_slice(d);
    }
    if out.get(0x38..0x3c) != Some(b"ARM\x64".as_slice()) {
        return Err(Error::Parse {
            what: "ELF",
            detail: "the image has no arm64 header at its start".into(),
        });
    }
    Ok((base, out))
}

/// The Pi's config.txt.
pub fn config_txt(board: &str, load: u64) -> String {
    format!(
        "# memfw for {board}\n\
         arm_64bit=1\n\
         # The mini-UART on GPIO14/15 (header pins 8/10) at 115200 8N1, its\n\
         # clock fixed so the baud rate holds.\n\
         enable_uart=1\n\
         kernel=kernel8.img\n\
         # The address the image is linked for; the arm64 header says the same.\n\
         kernel_address={load:#x}\n"
    )
}

/// The Pi's README: which boot firmware files to copy.
pub fn pi_readme(board: &str) -> String {
    let files = if board == "raspi3b" {
        "bootcode.bin, start.elf, fixup.dat, bcm2710-rpi-3-b.dtb"
    } else {
        "start4.elf, fixup4.dat, bcm2711-rpi-4-b.dtb"
    };
    format!(
        "memfw for {board}\n\n\
         Format a micro-SD card with one FAT32 partition and copy to it:\n\
         - from the Raspberry Pi firmware release (github.com/raspberrypi/firmware,\n\
           directory boot/): {files}\n\
         - from here: kernel8.img, config.txt\n\n\
         Console: a 3.3 V USB-serial adapter on GPIO14 (TXD, pin 8), GPIO15 (RXD,\n\
         pin 10) and GND (pin 6), 115200 8N1. The log is a binary defmt stream:\n\
         decode it with `defmt-print -e firmware-{board}.elf` (the ELF is next to\n\
         this file).\n"
    )
}

/// The U-Boot script for the EVK or the ZCU102.
pub fn boot_cmd(board: &str) -> String {
    boot_cmd_for(board, "memfw.elf")
}

/// The U-Boot script that loads `file` (an ELF on the SD card) and starts it.
pub fn boot_cmd_for(board: &str, file: &str) -> String {
    // SD card device and a staging address clear of the image's link
    // address (bootelf copies the segments there).
    let (mmc, staging) = if board == "imx8mp-evk" {
        ("1:1", "0x48000000")
    } else {
        ("0:1", "0x10000000")
    };
    format!(
        "# memfw for {board}: load the ELF from the SD card's first partition\n\
         # and start it at U-Boot's EL (EL2), MMU and caches as U-Boot left them.\n\
         setenv memfw_staging {staging}\n\
         load mmc {mmc} ${{memfw_staging}} {file}\n\
         bootelf ${{memfw_staging}}\n"
    )
}

/// An ELF that `object` cannot read.
fn elf_error(e: object::Error) -> Error {
    Error::Parse {
        what: "ELF",
        detail: e.to_string(),
    }
}

/// Writes the resident loader for `board` (its ELF `loader_elf`) into
/// `out`: on the Pis `kernel8.img` (loaded at 0x80000; it moves itself up)
/// and a `config.txt` for it, on the EVK and ZCU102 `memfw-loader.elf` and
/// the U-Boot script (`boot.cmd`, `boot.scr`) that `bootelf`s it.
pub fn write_loader(board: &str, loader_elf: &Path, out: &Path) -> Result<Written> {
    let (mut o, bytes) = Output::open(out, loader_elf)?;
    match board {
        "raspi3b" | "raspi4b" => {
            let (_, raw) = raw_image(&bytes)?;
            o.put("kernel8.img", &raw)?;
            // Its arm64 header's text_offset; the stub then copies the
            // loader to its link address near the top of RAM.
            o.put("config.txt", config_txt(board, 0x8_0000).as_bytes())?;
        }
        "imx8mp-evk" | "xlnx-zcu102" => {
            let cmd = boot_cmd_for(board, "memfw-loader.elf");
            o.uboot(
                &format!("memfw-loader {board}"),
                "memfw-loader.elf",
                &bytes,
                &cmd,
            )?;
        }
        other => return Err(Error::Usage(format!("no loader image for board {other}"))),
    }
    Ok(Written { files: o.files })
}

/// What `image` wrote.
#[derive(Debug)]
pub struct Written {
    /// Files in the output directory.
    pub files: Vec<PathBuf>,
}

/// An output directory being filled, and the files written to it.
struct Output<'a> {
    dir: &'a Path,
    files: Vec<PathBuf>,
}

impl<'a> Output<'a> {
    /// Creates `dir` and reads the ELF the image is made from.
    fn open(dir: &'a Path, elf: &Path) -> Result<(Self, Vec<u8>)> {
        std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
        let bytes = std::fs::read(elf).map_err(Error::io(elf))?;
        let files = Vec::new();
        Ok((Self { dir, files }, bytes))
    }

    fn put(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let p = self.dir.join(name);
        std::fs::write(&p, data).map_err(Error::io(&p))?;
        self.files.push(p);
        Ok(())
    }

    /// The ELF, its U-Boot script `boot.cmd` and that script as the
    /// legacy uImage `boot.scr`, checked by reading it back the way U-Boot's
    /// `source` does.
    fn uboot(&mut self, title: &str, elf_name: &str, elf: &[u8], cmd: &str) -> Result<()> {
        self.put(elf_name, elf)?;
        self.put("boot.cmd", cmd.as_bytes())?;
        let scr = uimage::script(title, cmd.as_bytes()).map_err(|e| Error::Parse {
            what: "boot.scr",
            detail: format!("{e:?}"),
        })?;
        if uimage::parse_script(&scr).ok() != Some(cmd.as_bytes()) {
            return Err(Error::Check(
                "boot.scr does not read back as boot.cmd".into(),
            ));
        }
        self.put("boot.scr", &scr)
    }
}

/// Writes the image for `board` from its firmware `elf` into `out`.
pub fn write(board: &str, elf: &Path, out: &Path) -> Result<Written> {
    let (mut o, bytes) = Output::open(out, elf)?;
    match board {
        "raspi3b" | "raspi4b" => {
            let (load, raw) = raw_image(&bytes)?;
            o.put("kernel8.img", &raw)?;
            o.put("config.txt", config_txt(board, load).as_bytes())?;
            o.put("README.txt", pi_readme(board).as_bytes())?;
            o.put(&format!("firmware-{board}.elf"), &bytes)?;
        }
        "imx8mp-evk" | "xlnx-zcu102" => {
            o.uboot(
                &format!("memfw {board}"),
                "memfw.elf",
                &bytes,
                &boot_cmd(board),
            )?;
        }
        other => return Err(Error::Usage(format!("no image format for board {other}"))),
    }
    Ok(Written { files: o.files })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_name_the_files_they_load() {
        for b in ["imx8mp-evk", "xlnx-zcu102"] {
            let s = boot_cmd(b);
            assert!(s.contains("load mmc") && s.contains("memfw.elf"), "{s}");
            assert!(s.contains("bootelf ${memfw_staging}"), "{s}");
        }
        let c = config_txt("raspi4b", 0x20_0000);
        for line in [
            "arm_64bit=1",
            "enable_uart=1",
            "kernel=kernel8.img",
            "kernel_address=0x200000",
        ] {
            assert!(c.lines().any(|l| l == line), "{line}");
        }
        assert!(pi_readme("raspi3b").contains("bootcode.bin"));
        assert!(pi_readme("raspi4b").contains("start4.elf"));
    }

    /// The EVK and ZCU102 images hold the ELF, boot.cmd and a boot.scr
    /// that U-Boot's `source` accepts and that carries boot.cmd exactly.
    #[test]
    fn uboot_images_carry_a_valid_boot_scr() {
        let dir = std::env::temp_dir().join(format!("memfw-image-test-{}", std::process::id()));
        // Any ELF-shaped input will do: the U-Boot boards copy it as it is.
        let elf = dir.join("in.elf");
        std::fs::create_dir_all(&dir).expect("tmp");
        std::fs::write(&elf, b"\x7fELF stand-in").expect("write");
        for b in ["imx8mp-evk", "xlnx-zcu102"] {
            let out = dir.join(b);
            let w = write(b, &elf, &out).expect("writes");
            let names: Vec<String> = w
                .files
                .iter()
                .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
                .collect();
            assert_eq!(names, ["memfw.elf", "boot.cmd", "boot.scr"], "{b}");
            let scr = std::fs::read(out.join("boot.scr")).expect("boot.scr");
            let cmd = std::fs::read(out.join("boot.cmd")).expect("boot.cmd");
            assert_eq!(uimage::parse_script(&scr), Ok(&cmd[..]), "{b}");
            assert_eq!(&scr[32..32 + 6], b"memfw ", "{b}: ih_name");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn loader_scripts_bootelf_the_loader() {
        let dir = std::env::temp_dir().join(format!("memfw-loader-image-{}", std::process::id()));
        let elf = dir.join("loader.elf");
        std::fs::create_dir_all(&dir).expect("tmp");
        std::fs::write(&elf, b"\x7fELF stand-in").expect("write");
        for b in ["imx8mp-evk", "xlnx-zcu102"] {
            let out = dir.join(b);
            write_loader(b, &elf, &out).expect("writes");
            let cmd = std::fs::read_to_string(out.join("boot.cmd")).expect("boot.cmd");
            assert!(cmd.contains("} memfw-loader.elf\n"), "{cmd}");
            assert!(cmd.contains("bootelf ${memfw_staging}"), "{cmd}");
            let scr = std::fs::read(out.join("boot.scr")).expect("boot.scr");
            assert_eq!(uimage::parse_script(&scr), Ok(cmd.as_bytes()), "{b}");
        }
        // The Pis need the arm64 header, which the stand-in lacks.
        assert!(write_loader("raspi3b", &elf, &dir.join("pi")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn raw_image_needs_the_arm64_header() {
        assert!(raw_image(b"not an elf").is_err());
    }
}
