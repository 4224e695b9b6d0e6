//! Builds the firmware and its on-target test binaries with the same cargo
//! that runs us, and finds the produced ELF files in cargo's JSON messages.

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

fn run_json(args: &[&str]) -> Result<Vec<Artifact>, String> {
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
    let mut child = cmd.spawn().map_err(|e| format!("cargo: {e}"))?;
    let stdout = child.stdout.take().ok_or("cargo: no stdout")?;
    let mut found = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| format!("cargo output: {e}"))?;
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
    let status = child.wait().map_err(|e| format!("cargo: {e}"))?;
    if !status.success() {
        return Err(format!("cargo {} failed ({status})", args.join(" ")));
    }
    Ok(found)
}

/// Builds the bootable firmware and returns its ELF.
pub fn build_firmware() -> Result<PathBuf, String> {
    let arts = run_json(&[
        "build",
        "-p",
        "firmware",
        "--bin",
        "firmware",
        "--profile",
        FIRMWARE_PROFILE,
    ])?;
    arts.into_iter()
        .find(|a| a.name == "firmware" && !a.test)
        .map(|a| a.path)
        .ok_or_else(|| "cargo built no firmware ELF".into())
}

/// Builds every on-target test suite and returns (suite name, ELF).
pub fn build_tests() -> Result<Vec<Artifact>, String> {
    let arts = run_json(&[
        "test",
        "-p",
        "firmware",
        "--profile",
        TEST_PROFILE,
        "--no-run",
    ])?;
    Ok(arts.into_iter().filter(|a| a.test).collect())
}
