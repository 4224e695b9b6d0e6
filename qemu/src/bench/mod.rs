//! Benchmarks behind `cargo qemu bench <name>`: one JSON object per line on stdout.
//!
//! Every record has `bench`, `metric`, `value`, `unit`; when a peer was measured
//! in the same run it also has `peer`, `peer_value` and `ratio`.

pub mod balloon;
pub mod boot;
pub mod memdesc;
pub mod smp;
pub mod smp_target;
pub mod translation;

use serde::Serialize;

/// One benchmark result line.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// Benchmark group, e.g. `memdesc` or `translation`.
    pub bench: &'static str,
    /// What was measured, e.g. `alloc_free_order0`.
    pub metric: String,
    /// Our figure.
    pub value: f64,
    /// Unit of `value` and `peer_value`, e.g. `ns/op`, `bytes`, `writes`.
    pub unit: &'static str,
    /// The peer measured in the same run, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<&'static str>,
    /// The peer's figure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_value: Option<f64>,
    /// How much better we are: `peer_value / value` for lower-is-better units
    /// (time, writes), `value / peer_value` for higher-is-better (ops/s).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    /// Free-form context (workload sizes, iteration counts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Record {
    /// A record without a peer.
    pub fn new(
        bench: &'static str,
        metric: impl Into<String>,
        value: f64,
        unit: &'static str,
    ) -> Self {
        Self {
            bench,
            metric: metric.into(),
            value,
            unit,
            peer: None,
            peer_value: None,
            ratio: None,
            note: None,
        }
    }

    /// Adds a peer measured in the same run; `lower_is_better` picks the ratio's direction.
    pub fn with_peer(mut self, peer: &'static str, peer_value: f64, lower_is_better: bool) -> Self {
        self.peer = Some(peer);
        self.peer_value = Some(peer_value);
        self.ratio = Some(if lower_is_better {
            peer_value / self.value
        } else {
            self.value / peer_value
        });
        self
    }

    /// Adds a note.
    pub fn with_note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }

    /// Prints the record as one JSON line on stdout.
    pub fn emit(&self) {
        match serde_json::to_string(self) {
            Ok(line) => println!("{line}"),
            Err(e) => eprintln!("bench: cannot serialise record: {e}"),
        }
    }
}
