//! Makes sure a QEMU new enough for our boards (>= 10: `raspi4b`,
//! `imx8mp-evk`) is installed: on Debian/Ubuntu as root it installs
//! `qemu-system-arm` itself (from bookworm-backports on bookworm); otherwise it
//! prints the exact commands to run.

use std::fs;
use std::path::Path;
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

fn os_release() -> (String, String, String) {
    let text = fs::read_to_string("/etc/os-release").unwrap_or_default();
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(|v| v.trim_matches('"').to_string())
            .unwrap_or_default()
    };
    (get("ID"), get("ID_LIKE"), get("VERSION_CODENAME"))
}

fn is_root() -> bool {
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

fn run(cmd: &mut Command) -> Result<(), String> {
    eprintln!("+ {cmd:?}");
    let status = cmd.status().map_err(|e| format!("{cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed with {status}"))
    }
}

/// Ensures QEMU >= 10 is on PATH, installing it where we can.
pub fn ensure_qemu() -> Result<(), String> {
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
        return Err(format!(
            "QEMU >= {MIN_MAJOR} ({QEMU}) is needed. On Debian/Ubuntu, as root:\n  {commands}\n\
             Elsewhere install QEMU {MIN_MAJOR} or newer with your package manager."
        ));
    }
    eprintln!("qemu: installing qemu-system-arm (QEMU >= {MIN_MAJOR}) with apt-get");
    if bookworm {
        let path = Path::new(DEB822);
        let text = fs::read_to_string(path).map_err(|e| format!("{DEB822}: {e}"))?;
        if let Some(new) = add_backports_suite(&text) {
            fs::write(path, new).map_err(|e| format!("{DEB822}: {e}"))?;
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
        Some(v) => Err(format!(
            "installed QEMU {}.{} is older than {MIN_MAJOR}",
            v.0, v.1
        )),
        None => Err(format!("{QEMU} still not found after installing")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
