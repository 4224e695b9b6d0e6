//! `cargo qemu bench translation` (being written).

use super::Record;

/// Runs the benchmark and returns its records.
pub fn run() -> Vec<Record> {
    Vec::new()
}
