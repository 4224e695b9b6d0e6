//! `cargo qemu …`: the host side of the firmware (being written).
mod bench;

fn main() {
    bench::Record::new("skeleton", "none", 0.0, "none");
}
