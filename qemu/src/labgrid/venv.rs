//! labgrid's Python side, installed by the tool itself: a venv under the
//! target directory (`target/labgrid-venv`) with one pinned labgrid from
//! PyPI, plus the repo's strategy and agent (`lab/*.py`, compiled in and
//! written next to it on every run so they always match this tool).
//!
//! Steps, each only when needed: `python3 -m venv DIR`; when that fails
//! for want of `ensurepip` (Debian/Ubuntu split it into `python3-venv`) or
//! there is no `python3`, as root on a Debian-like system `apt-get install
//! python3-venv` (the version-specific package Python names, if it names
//! one), otherwise an error naming that command; then `DIR/bin/python -m
//! pip install labgrid==VERSION`; a stamp file records the version.

use crate::error::{Error, Result};
use crate::setup::{is_root, os_release, run};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The labgrid release the tool installs (gRPC coordinator, no crossbar).
pub const LABGRID_VERSION: &str = "26.0.1";
const STAMP: &str = "memfw-labgrid-version";

/// The strategy and the agent, written into the venv's `memfw/` directory.
const LAB_FILES: &[(&str, &str)] = &[
    (
        "memfw_strategy.py",
        include_str!("../../../lab/memfw_strategy.py"),
    ),
    ("memfw_lab.py", include_str!("../../../lab/memfw_lab.py")),
    (
        "check_rfc2217_bridge.py",
        include_str!("../../../lab/check_rfc2217_bridge.py"),
    ),
];

/// An installed venv.
#[derive(Debug, Clone)]
pub struct Venv {
    /// Its directory.
    pub dir: PathBuf,
}

impl Venv {
    /// A program in its `bin/`.
    pub fn bin(&self, name: &str) -> PathBuf {
        self.dir.join("bin").join(name)
    }

    /// Where the strategy and the agent are.
    pub fn lab_dir(&self) -> PathBuf {
        self.dir.join("memfw")
    }
}

/// The cargo target directory: `CARGO_TARGET_DIR`, else the workspace's
/// `target/`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap_or(Path::new("."))
            .join("target"),
    }
}

/// What is in `dir` now.
#[derive(Debug, PartialEq, Eq)]
pub enum State {
    /// labgrid `LABGRID_VERSION` is installed.
    Ready,
    /// Nothing there.
    Missing,
    /// A venv with another (or a half-done) install: rebuilt from scratch.
    Stale,
}

/// Reads the stamp and checks the programs exist.
pub fn state(dir: &Path) -> State {
    if !dir.exists() {
        return State::Missing;
    }
    let stamp = std::fs::read_to_string(dir.join(STAMP)).unwrap_or_default();
    let programs = [
        "python",
        "labgrid-client",
        "labgrid-coordinator",
        "labgrid-exporter",
    ]
    .iter()
    .all(|p| dir.join("bin").join(p).exists());
    if stamp.trim() == LABGRID_VERSION && programs {
        State::Ready
    } else {
        State::Stale
    }
}

/// The apt package `python3 -m venv`'s complaint names ("apt install
/// python3.11-venv"), or `python3-venv` when the failure is the missing
/// `ensurepip`/`venv` module without a name; `None` for other failures.
pub fn venv_package_needed(stderr: &str) -> Option<String> {
    // Debian names both; the command line, last, has the versioned one.
    let named = stderr
        .split_whitespace()
        .map(|w| w.trim_matches(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '-')))
        .rfind(|w| w.starts_with("python3") && w.ends_with("-venv"));
    if let Some(p) = named {
        return Some(p.to_string());
    }
    let lacks = stderr.contains("ensurepip")
        || stderr.contains("No module named venv")
        || stderr.contains("No module named 'venv'");
    lacks.then(|| "python3-venv".to_string())
}

fn debian_like() -> bool {
    let (id, like, _) = os_release();
    id == "debian" || id == "ubuntu" || like.split_whitespace().any(|w| w == "debian")
}

fn make_venv(dir: &Path) -> Result<()> {
    let out = Command::new("python3")
        .args(["-m", "venv"])
        .arg(dir)
        .output();
    let stderr = match out {
        Ok(o) if o.status.success() => return Ok(()),
        Ok(o) => format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "no python3: ensurepip".into(),
        Err(e) => return Err(Error::spawn("python3 -m venv")(e)),
    };
    let _ = std::fs::remove_dir_all(dir);
    let Some(pkg) = venv_package_needed(&stderr) else {
        return Err(Error::Install(format!(
            "python3 -m venv {} failed:\n{stderr}",
            dir.display()
        )));
    };
    let mut pkgs = vec!["python3".to_string(), "python3-venv".to_string()];
    if !pkgs.contains(&pkg) {
        pkgs.push(pkg);
    }
    if !debian_like() || !is_root() {
        return Err(Error::Install(format!(
            "python3 -m venv needs {}; on Debian/Ubuntu, as root:\n  apt-get install -y {}",
            pkgs.join(" "),
            pkgs.join(" ")
        )));
    }
    eprintln!(
        "labgrid: python3 -m venv needs {}; installing with apt-get",
        pkgs.join(" ")
    );
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&pkgs))?;
    run(Command::new("python3").args(["-m", "venv"]).arg(dir))
}

/// Makes sure `target/labgrid-venv` holds labgrid `LABGRID_VERSION`
/// (installing it the first time) and the repo's lab files.
pub fn ensure() -> Result<Venv> {
    let dir = target_dir().join("labgrid-venv");
    match state(&dir) {
        State::Ready => {}
        s => {
            if s == State::Stale {
                std::fs::remove_dir_all(&dir).map_err(Error::io(&dir))?;
            }
            eprintln!(
                "labgrid: installing labgrid {LABGRID_VERSION} from PyPI into {}",
                dir.display()
            );
            if let Some(parent) = dir.parent() {
                std::fs::create_dir_all(parent).map_err(Error::io(parent))?;
            }
            make_venv(&dir)?;
            run(Command::new(dir.join("bin/python")).args([
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                &format!("labgrid=={LABGRID_VERSION}"),
            ]))?;
            std::fs::write(dir.join(STAMP), LABGRID_VERSION).map_err(Error::io(dir.join(STAMP)))?;
        }
    }
    let v = Venv { dir };
    let lab = v.lab_dir();
    std::fs::create_dir_all(&lab).map_err(Error::io(&lab))?;
    for (name, text) in LAB_FILES {
        let p = lab.join(name);
        if std::fs::read_to_string(&p).ok().as_deref() != Some(*text) {
            std::fs::write(&p, text).map_err(Error::io(p))?;
        }
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_apt_package_comes_from_pythons_message() {
        let debian =
            "The virtual environment was not created successfully because ensurepip is not\n\
            available.  On Debian/Ubuntu systems, you need to install the python3-venv\n\
            package using the following command.\n\n    apt install python3.11-venv\n\n\
            You may need to use sudo with that command.";
        assert_eq!(
            venv_package_needed(debian).as_deref(),
            Some("python3.11-venv")
        );
        assert_eq!(
            venv_package_needed("/usr/bin/python3: No module named venv").as_deref(),
            Some("python3-venv")
        );
        assert_eq!(
            venv_package_needed("no python3: ensurepip").as_deref(),
            Some("python3-venv")
        );
        assert_eq!(
            venv_package_needed("Error: [Errno 28] No space left on device"),
            None
        );
    }

    #[test]
    fn the_stamp_decides_whether_to_install() {
        let dir = std::env::temp_dir().join(format!("labgrid-venv-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(state(&dir), State::Missing);
        std::fs::create_dir_all(dir.join("bin")).expect("temp dir");
        // A venv without labgrid (a pip install that failed halfway).
        assert_eq!(state(&dir), State::Stale);
        for p in [
            "python",
            "labgrid-client",
            "labgrid-coordinator",
            "labgrid-exporter",
        ] {
            std::fs::write(dir.join("bin").join(p), "").expect("temp file");
        }
        assert_eq!(state(&dir), State::Stale);
        std::fs::write(dir.join(STAMP), "25.0.1\n").expect("temp file");
        assert_eq!(state(&dir), State::Stale);
        std::fs::write(dir.join(STAMP), format!("{LABGRID_VERSION}\n")).expect("temp file");
        assert_eq!(state(&dir), State::Ready);
        std::fs::remove_file(dir.join("bin/labgrid-exporter")).expect("remove");
        assert_eq!(state(&dir), State::Stale);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn the_lab_files_are_the_repos() {
        let names: Vec<&str> = LAB_FILES.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                "memfw_strategy.py",
                "memfw_lab.py",
                "check_rfc2217_bridge.py"
            ]
        );
        assert!(LAB_FILES[0]
            .1
            .contains(r#"LOADER_READY = r"memfw-loader \S+ board=\S+ ready""#));
        assert!(LAB_FILES[1].1.contains("def hold(args)"));
    }
}
