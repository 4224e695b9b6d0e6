//! Makes sure what the tool needs beyond the host toolchain is installed:
//!
//! - the Rust target `aarch64-unknown-none` in the active toolchain's sysroot
//!   (rustup does not add `rust-toolchain.toml`'s `targets` by itself when the
//!   pinned toolchain already exists or `RUSTUP_AUTO_INSTALL=0`): installed
//!   with `rustup target add`, or a clear error naming that command;
//! - a QEMU new enough for our boards (>= 10: `raspi4b`, `imx8mp-evk`): on
//!   Debian/Ubuntu as root it installs `qemu-system-arm` itself (from
//!   bookworm-backports on bookworm); otherwise it prints the exact commands.

use crate::error::{Error, Result};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The emulator binary we drive.
pub const QEMU: &str = "qemu-system-aarch64";
/// Oldest major version with every board model we use.
pub const MIN_MAJOR: u32 = 10;
const DEB822: &str = "/etc/apt/sources.list.d/debian.sources";

/// Parses `QEMU emulator version 10.0.2 (...)` into (major, minor).
pub fn parse_version(banner: &str) -> Option<(u32, u32)> {
    let rest = banner.split("version ").nth(1)?;
    let mut it = rest
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

fn installed_version() -> Option<(u32, u32)> {
    let out = Command::new(QEMU).arg("--version").output().ok()?;
    parse_version(&String::from_utf8_lossy(&out.stdout))
}

pub(crate) fn os_release() -> (String, String, String) {
    let text = fs::read_to_string("/etc/os-release").unwrap_or_default();
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(|v| v.trim_matches('"').to_string())
            .unwrap_or_default()
    };
    (get("ID"), get("ID_LIKE"), get("VERSION_CODENAME"))
}

pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Adds `bookworm-backports` to the `Suites:` line of the deb822 source that
/// already lists `bookworm`, reusing its mirror. Returns whether it changed.
pub fn add_backports_suite(deb822: &str) -> Option<String> {
    let mut changed = false;
    let out: Vec<String> = deb822
        .lines()
        .map(|line| {
            if let Some(suites) = line.strip_prefix("Suites:") {
                let words: Vec<&str> = suites.split_whitespace().collect();
                if words.contains(&"bookworm") && !words.contains(&"bookworm-backports") {
                    changed = true;
                    return format!("Suites: {} bookworm-backports", words.join(" "));
                }
            }
            line.to_string()
        })
        .collect();
    changed.then(|| out.join("\n") + "\n")
}

pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd.status().map_err(Error::spawn(format!("{cmd:?}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::Failed {
            command: format!("{cmd:?}"),
            status,
            output: String::new(),
        })
    }
}

/// The active toolchain's sysroot, from the `rustc` cargo would run.
fn sysroot() -> Result<PathBuf> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let out = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .map_err(Error::spawn(rustc.to_string_lossy()))?;
    if !out.status.success() {
        return Err(Error::Failed {
            command: format!("{} --print sysroot", rustc.to_string_lossy()),
            status: out.status,
            output: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// Whether `sysroot` holds the standard library (`core`) for `target`.
pub fn target_installed(sysroot: &Path, target: &str) -> bool {
    let lib = sysroot.join("lib").join("rustlib").join(target).join("lib");
    fs::read_dir(&lib).is_ok_and(|mut entries| {
        entries.any(|e| {
            e.is_ok_and(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.starts_with("libcore-") && name.ends_with(".rlib")
            })
        })
    })
}

/// The command that installs `target`, as a person would type it.
pub fn target_add_command(target: &str) -> String {
    format!("rustup target add {target}")
}

fn have_rustup() -> bool {
    Command::new("rustup")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Ensures the active toolchain can build for `target`, adding it with rustup
/// when it is missing. Never relies on rustup's auto-install.
pub fn ensure_target(target: &str) -> Result<()> {
    let root = sysroot()?;
    if target_installed(&root, target) {
        return Ok(());
    }
    let add = target_add_command(target);
    if !have_rustup() {
        return Err(Error::Install(format!(
            "the Rust target {target} is not installed in {} and rustup is not on PATH.\n\
             Install rustup (https://rustup.rs) and run:\n  {add}\n\
             or install your distribution's standard library for {target}.",
            root.display()
        )));
    }
    eprintln!(
        "qemu: the Rust target {target} is missing from {}; installing it: {add}",
        root.display()
    );
    run(Command::new("rustup").args(["target", "add", target]))
        .map_err(|e| Error::Install(format!("{e}\nrun `{add}` yourself and try again")))?;
    if target_installed(&root, target) {
        Ok(())
    } else {
        Err(Error::Install(format!(
            "`{add}` succeeded but {} still has no {target} standard library; \
             is another toolchain active here (rust-toolchain.toml, RUSTUP_TOOLCHAIN)?",
            root.display()
        )))
    }
}

/// Ensures QEMU >= 10 is on PATH, installing it where we can.
pub fn ensure_qemu() -> Result<()> {
    if let Some(v) = installed_version() {
        if v.0 >= MIN_MAJOR {
            return Ok(());
        }
        eprintln!("qemu: found QEMU {}.{}, need >= {MIN_MAJOR}", v.0, v.1);
    }
    let (id, like, codename) = os_release();
    let debian_like =
        id == "debian" || id == "ubuntu" || like.split_whitespace().any(|w| w == "debian");
    let bookworm = codename == "bookworm";
    let commands = if bookworm {
        format!(
            "add bookworm-backports to the Suites: line of {DEB822}, then\n  \
             apt-get update && apt-get install -y -t bookworm-backports qemu-system-arm"
        )
    } else {
        "apt-get update && apt-get install -y qemu-system-arm".to_string()
    };
    if !debian_like || !is_root() {
        return Err(Error::Install(format!(
            "QEMU >= {MIN_MAJOR} ({QEMU}) is needed. On Debian/Ubuntu, as root:\n  {commands}\n\
             Elsewhere install QEMU {MIN_MAJOR} or newer with your package manager."
        )));
    }
    eprintln!("qemu: installing qemu-system-arm (QEMU >= {MIN_MAJOR}) with apt-get");
    if bookworm {
        let path = Path::new(DEB822);
        let text = fs::read_to_string(path).map_err(Error::io(path))?;
        if let Some(new) = add_backports_suite(&text) {
            fs::write(path, new).map_err(Error::io(path))?;
        }
    }
    run(Command::new("apt-get").args(["update", "-q"]))?;
    let mut install = Command::new("apt-get");
    install.env("DEBIAN_FRONTEND", "noninteractive").args([
        "install",
        "-y",
        "-q",
        "--no-install-recommends",
    ]);
    if bookworm {
        install.args(["-t", "bookworm-backports"]);
    }
    run(install.arg("qemu-system-arm"))?;
    match installed_version() {
        Some(v) if v.0 >= MIN_MAJOR => Ok(()),
        Some(v) => Err(Error::Install(format!(
            "installed QEMU {}.{} is older than {MIN_MAJOR}",
            v.0, v.1
        ))),
        None => Err(Error::Install(format!(
            "{QEMU} still not found after installing"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_presence_is_read_from_the_sysroot() {
        let root = std::env::temp_dir().join(format!("qemu-sysroot-{}", std::process::id()));
        let lib = root.join("lib/rustlib/aarch64-unknown-none/lib");
        fs::create_dir_all(&lib).expect("temp dir");
        assert!(!target_installed(&root, "aarch64-unknown-none"));
        fs::write(lib.join("libcore-0123abcd.rlib"), b"").expect("temp file");
        assert!(target_installed(&root, "aarch64-unknown-none"));
        assert!(!target_installed(&root, "aarch64-unknown-linux-gnu"));
        fs::remove_dir_all(&root).expect("cleanup");
        assert_eq!(
            target_add_command("aarch64-unknown-none"),
            "rustup target add aarch64-unknown-none"
        );
    }

    #[test]
    fn this_toolchain_reports_its_sysroot() {
        // The host target is always in the sysroot of the toolchain running us.
        let root = sysroot().expect("rustc --print sysroot");
        let vv = Command::new("rustc")
            .arg("-vV")
            .output()
            .expect("rustc -vV");
        let vv = String::from_utf8_lossy(&vv.stdout);
        let host = vv
            .lines()
            .find_map(|l| l.strip_prefix("host: "))
            .expect("rustc -vV names the host");
        assert!(
            target_installed(&root, host),
            "{host} in {}",
            root.display()
        );
        assert!(!target_installed(&root, "no-such-target"));
    }

    #[test]
    fn version_banner() {
        assert_eq!(
            parse_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)"),
            Some((10, 0))
        );
        assert_eq!(parse_version("QEMU emulator version 7.2.15"), Some((7, 2)));
        assert_eq!(parse_version("garbage"), None);
    }

    #[test]
    fn backports_added_once_to_the_bookworm_stanza() {
        let src =
            "Types: deb\nURIs: http://mirror.invalid/debian\nSuites: bookworm bookworm-updates\n\
                   Components: main\n\nTypes: deb\nURIs: http://mirror.invalid/debian-security\n\
                   Suites: bookworm-security\nComponents: main\n";
        let new = add_backports_suite(src).expect("changed");
        assert!(new.contains("Suites: bookworm bookworm-updates bookworm-backports\n"));
        assert!(new.contains("Suites: bookworm-security\n"));
        assert_eq!(add_backports_suite(&new), None);
    }
}
