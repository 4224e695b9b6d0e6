//! The tool's one error type.

use std::path::PathBuf;

/// Why a `cargo qemu` command failed (exit status 2). Test failures are not
/// errors: they are counted in the summary line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Options that cannot go together, or a value the command cannot use.
    #[error("{0}")]
    Usage(String),
    /// Installing the Rust target or QEMU failed.
    #[error("setup: {0}")]
    Setup(String),
    /// cargo failed to build the firmware or its tests.
    #[error("build: {0}")]
    Build(String),
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// An ELF without a readable test table or defmt table.
    #[error("{}: {what}", path.display())]
    Elf {
        /// The file.
        path: PathBuf,
        /// What was wrong with it.
        what: String,
    },
    /// QEMU could not be started or driven.
    #[error("qemu: {0}")]
    Qemu(String),
    /// The serial port, its socket or the board's power control failed.
    #[error("serial: {0}")]
    Serial(String),
    /// A labgrid place could not be set up, acquired or driven.
    #[error("{0}")]
    Labgrid(String),
    /// Writing a board image failed.
    #[error("image: {0}")]
    Image(String),
    /// The balloon command failed (QMP, no running instance).
    #[error("balloon: {0}")]
    Balloon(String),
    /// A benchmark could not run.
    #[error("bench: {0}")]
    Bench(String),
}

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }
}

/// The tool's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;
