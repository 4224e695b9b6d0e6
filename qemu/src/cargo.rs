//! Builds the firmware and its on-target test binaries with the same cargo
//! that runs us, and finds the produced ELF files in cargo's JSON messages.

use crate::error::{Error, OrMissing, Result};
use serde::Deserialize;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The bare-metal target triple.
pub const TARGET: &str = "aarch64-unknown-none";
/// Cargo profile for the firmware binary.
pub const FIRMWARE_PROFILE: &str = "release";
/// Cargo profile for on-target tests: optimised, with debug assertions and
/// overflow checks (defined in the workspace Cargo.toml).
pub const TEST_PROFILE: &str = "fwtest";

#[derive(Deserialize)]
struct Message {
    reason: String,
    #[serde(default)]
    target: Option<Target>,
    #[serde(default)]
    profile: Option<Profile>,
    #[serde(default)]
    executable: Option<PathBuf>,
}

#[derive(Deserialize)]
struct Target {
    name: String,
    kind: Vec<String>,
}

#[derive(Deserialize)]
struct Profile {
    test: bool,
}

/// An executable cargo produced.
#[derive(Debug, Clone)]
pub struct Artifact {
    /// The cargo target's name (binary or test file name).
    pub name: String,
    /// Path to the ELF.
    pub path: PathBuf,
    /// True for test harness binaries.
    pub test: bool,
}

/// The cargo to call: the one that started us, if any.
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn run_json(args: &[&str]) -> Result<Vec<Artifact>> {
    crate::setup::ensure_target(TARGET)?;
    let mut cmd = cargo();
    cmd.args(args)
        .args([
            "--target",
            TARGET,
            "--message-format=json-render-diagnostics",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().map_err(Error::spawn("cargo"))?;
    let stdout = child.stdout.take().or_missing("cargo: no stdout")?;
    let mut found = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(Error::io("cargo output"))?;
        let Ok(msg) = serde_json::from_str::<Message>(&line) else {
            continue;
        };
        if msg.reason != "compiler-artifact" {
            continue;
        }
        if let (Some(t), Some(path)) = (msg.target, msg.executable) {
            let test = msg.profile.is_some_and(|p| p.test) || t.kind.iter().any(|k| k == "test");
            found.push(Artifact {
                name: t.name,
                path,
                test,
            });
        }
    }
    let status = child.wait().map_err(Error::spawn("cargo"))?;
    if !status.success() {
        return Err(Error::Failed {
            command: format!("cargo {}", args.join(" ")),
            status,
            output: String::new(),
        });
    }
    Ok(found)
}

/// Cargo arguments selecting `board` (`virt` is the default feature).
fn board_args(board: &str) -> Vec<String> {
    if board == "virt" {
        Vec::new()
    } else {
        vec![
            "--no-default-features".into(),
            "--features".into(),
            format!("firmware/board-{board}"),
        ]
    }
}

/// Builds the bootable firmware for `board` and returns its ELF. Cargo
/// puts every board's binary at the same path, so each board's copy is
/// kept beside it as `firmware-<board>` (what is returned).
pub fn build_firmware(board: &str) -> Result<PathBuf> {
    let mut args: Vec<String> = [
        "build",
        "-p",
        "firmware",
        "--bin",
        "firmware",
        "--profile",
        FIRMWARE_PROFILE,
    ]
    .map(String::from)
    .to_vec();
    args.extend(board_args(board));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let arts = run_json(&refs)?;
    let path = arts
        .into_iter()
        .find(|a| a.name == "firmware" && !a.test)
        .map(|a| a.path)
        .or_missing("cargo built no firmware ELF")?;
    let kept = path.with_file_name(format!("firmware-{board}"));
    std::fs::copy(&path, &kept).map_err(Error::io(&kept))?;
    Ok(kept)
}

/// Builds every on-target test suite for `board` and returns (suite name,
/// ELF). Test binaries have a per-feature hash in their name, so boards
/// never overwrite each other's.
pub fn build_tests(board: &str) -> Result<Vec<Artifact>> {
    let mut args: Vec<String> = [
        "test",
        "-p",
        "firmware",
        "--profile",
        TEST_PROFILE,
        "--no-run",
    ]
    .map(String::from)
    .to_vec();
    args.extend(board_args(board));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let arts = run_json(&refs)?;
    Ok(arts.into_iter().filter(|a| a.test).collect())
}

/// Builds the resident loader for `board` (its own crate, `loader/`, with
/// the hal's loader layout) and returns its ELF, kept as `loader-<board>`.
pub fn build_loader(board: &str) -> Result<PathBuf> {
    let feature = format!("loader/board-{board}");
    let arts = run_json(&[
        "build",
        "-p",
        "loader",
        "--bin",
        "loader",
        "--release",
        "--no-default-features",
        "--features",
        &feature,
    ])?;
    let path = arts
        .into_iter()
        .find(|a| a.name == "loader" && !a.test)
        .map(|a| a.path)
        .or_missing("cargo built no loader ELF")?;
    let kept = path.with_file_name(format!("loader-{board}"));
    std::fs::copy(&path, &kept).map_err(Error::io(&kept))?;
    Ok(kept)
}
