//! Puts the linker scripts where the final link finds them and sets `cfg(hw)`
//! when building for the bare-metal AArch64 target.
use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo::rustc-check-cfg=cfg(hw)");
    let target = env::var("TARGET").unwrap_or_default();
    if target != "aarch64-unknown-none" {
        return;
    }
    println!("cargo::rustc-cfg=hw");
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let boards: Vec<&str> = ["virt", "raspi3b", "raspi4b", "imx8mp-evk", "xlnx-zcu102"]
        .into_iter()
        .filter(|b| {
            let feature = format!("CARGO_FEATURE_BOARD_{}", b.to_uppercase().replace('-', "_"));
            env::var(feature).is_ok()
        })
        .collect();
    let board = match boards.as_slice() {
        [one] => *one,
        [] => panic!("select a board feature (board-virt, board-raspi4b, ...)"),
        many => panic!("select exactly one board feature, not {many:?}"),
    };
    // The resident loader (feature `loader`) has its own layout.
    let dir = if env::var("CARGO_FEATURE_LOADER").is_ok() {
        "link/loader"
    } else {
        "link"
    };
    let memory = fs::read_to_string(format!("{dir}/{board}.ld")).expect("board MEMORY script");
    let sections = fs::read_to_string(format!("{dir}/sections.ld")).expect("sections script");
    fs::write(out.join("link.x"), format!("{memory}\n{sections}")).expect("write link.x");
    println!("cargo::rustc-link-search={}", out.display());
    println!("cargo::rerun-if-changed=link");
}
