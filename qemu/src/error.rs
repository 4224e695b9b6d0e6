//! The tool's one error type.
//!
//! Every fallible function of the tool returns [`Error`]. Leaf variants say
//! what went wrong in terms a caller can match on (a file and its I/O error,
//! a program and its exit status, how the guest ended against what the test
//! wanted); [`Error::Step`] and [`Error::WithLog`] add where it happened and
//! the decoded log, so the top level prints the whole story in one message.

use crate::boot::Ending;
use crate::qmp::QmpError;
use std::path::PathBuf;
use std::process::ExitStatus;

/// Why a `cargo qemu` command, or one test, failed. A command's error ends
/// it with exit status 2; a test's is its verdict and counts in the summary.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Options that cannot go together, or a value the command cannot use.
    #[error("{0}")]
    Usage(String),
    /// A file, directory, pipe or socket could not be read, written or made.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file (or socket, or `cargo output` for a pipe).
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// A program could not be started or waited for.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The program as a person would type it (with arguments where
        /// they matter).
        program: String,
        /// What went wrong.
        source: std::io::Error,
    },
    /// A program ran and failed.
    #[error("{command} failed ({status}){}", tail(output))]
    Failed {
        /// The command line as a person would type it.
        command: String,
        /// Its exit status.
        status: ExitStatus,
        /// What it printed that says why (stderr), possibly empty.
        output: String,
    },
    /// An ELF without a readable test table or defmt table.
    #[error("{}: {what}", path.display())]
    Elf {
        /// The file.
        path: PathBuf,
        /// What was wrong with it.
        what: String,
    },
    /// Data that does not parse: which data, and what is wrong where.
    #[error("{what}: {detail}")]
    Parse {
        /// What was being parsed (`DTB`, `ELF`, `settle line`, …).
        what: &'static str,
        /// What is wrong and where (an offset, the text).
        detail: String,
    },
    /// The QMP client failed (socket, protocol, a command QEMU refused).
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// A peer answered something the tool cannot use: the resident loader,
    /// the labgrid agent, QEMU over QMP.
    #[error("{peer}: {what}")]
    Protocol {
        /// Who answered (`loader`, `labgrid`, `QMP`).
        peer: &'static str,
        /// What it said or failed to say.
        what: String,
    },
    /// The guest ended otherwise than the test wanted.
    #[error("{}", ending_message(*got, *want))]
    Ending {
        /// How it ended.
        got: Ending,
        /// What the test wanted.
        want: Want,
    },
    /// Something the tool waits for did not happen in time.
    #[error("timed out after {secs} s waiting for {what}{}", tail(detail))]
    Timeout {
        /// What did not happen.
        what: String,
        /// How long the tool waited.
        secs: u64,
        /// What was seen instead, possibly empty.
        detail: String,
    },
    /// A fault the tool injected on purpose (a loader proof's host that
    /// vanishes mid-transfer); the proof expects exactly this error.
    #[error("{0} (test fault)")]
    FaultInjected(&'static str),
    /// A test's check of the log or of the host's view failed.
    #[error("{0}")]
    Check(String),
    /// Something the tool needed or a test expected is not there (a pipe,
    /// a process, an artifact cargo should have built, a report line).
    #[error("{0}")]
    Missing(String),
    /// What is needed cannot be installed from here; the text says what to
    /// run instead.
    #[error("{0}")]
    Install(String),
    /// A step of a command failed: which step, and why.
    #[error("{step}: {source}")]
    Step {
        /// The step (`setup`, `build`, `qemu`, `--serial`, …).
        step: String,
        /// Why it failed.
        source: Box<Error>,
    },
    /// A failure with the decoded log of the boot it happened in.
    #[error("{source}\n{log}")]
    WithLog {
        /// The failure.
        source: Box<Error>,
        /// The boot's decoded log.
        log: String,
    },
}

/// What a test wanted from the guest's ending (see [`Error::Ending`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Exit status 0.
    Pass,
    /// The panic exit status (a `should_panic` test).
    Panic,
    /// This exit status, or `None`: the `ready` line (QEMU then stopped).
    Exit(Option<i32>),
    /// A hang, ended by the tool's timeout.
    Hang,
}

/// `": detail"`, or nothing for an empty detail.
fn tail(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    }
}

fn ending_message(got: Ending, want: Want) -> String {
    match (want, got) {
        (Want::Pass | Want::Panic, got) => match got {
            Ending::Exited(0) => "passed but should have panicked".into(),
            Ending::Exited(c) if c == hal::exit::PANIC => "panicked (or returned Err)".into(),
            Ending::Exited(c) if c == hal::exit::CRASH => "crashed: unexpected exception".into(),
            Ending::Exited(c) if c == hal::exit::BAD_DTB => "device tree rejected at boot".into(),
            Ending::Exited(c) if c == hal::exit::POWEROFF_FAILED => {
                "PSCI SYSTEM_OFF returned".into()
            }
            Ending::Exited(c) => format!("QEMU exited with status {c}"),
            Ending::Signalled(s) => format!("QEMU killed by signal {s}"),
            Ending::TimedOut => "timed out".into(),
            Ending::Stopped => "stopped early".into(),
        },
        (Want::Hang, got) => format!("expected a hang ended by the timeout, got {got:?}"),
        (Want::Exit(want), got) => format!("expected {want:?} (None = ready), got {got:?}"),
    }
}

impl Error {
    /// An [`Error::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }

    /// An [`Error::Spawn`] for `program`.
    pub fn spawn(program: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let program = program.into();
        move |source| Self::Spawn { program, source }
    }

    /// Wraps an error as having happened during `step`.
    pub fn during(step: impl Into<String>) -> impl FnOnce(Self) -> Self {
        let step = step.into();
        move |e| Self::Step {
            step,
            source: Box::new(e),
        }
    }

    /// Attaches a boot's decoded log.
    pub fn with_log(self, log: String) -> Self {
        Self::WithLog {
            source: Box::new(self),
            log,
        }
    }

    /// A [`Error::Protocol`] error from `peer`.
    pub fn protocol(peer: &'static str, what: impl Into<String>) -> Self {
        Self::Protocol {
            peer,
            what: what.into(),
        }
    }

    /// The innermost error, past the steps and logs wrapped around it.
    pub fn root(&self) -> &Self {
        match self {
            Self::Step { source, .. } | Self::WithLog { source, .. } => source.root(),
            e => e,
        }
    }
}

/// `Option` to a [`Error::Missing`].
pub trait OrMissing<T> {
    /// `Some(t)` to `Ok(t)`, `None` to `Err(Error::Missing(what))`.
    fn or_missing(self, what: &str) -> Result<T>;
}

impl<T> OrMissing<T> for Option<T> {
    fn or_missing(self, what: &str) -> Result<T> {
        self.ok_or_else(|| Error::Missing(what.to_string()))
    }
}

/// The tool's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    /// The top level prints what the `String` errors said: the file, the
    /// command and its exit status, the step, the log.
    #[test]
    fn messages_keep_the_path_the_command_and_the_status() {
        let not_found = || std::io::Error::from(std::io::ErrorKind::NotFound);
        let io = Error::io("/tmp/x.dtb")(not_found());
        assert_eq!(io.to_string(), format!("/tmp/x.dtb: {}", not_found()));
        let spawn = Error::spawn("qemu-system-aarch64")(not_found());
        assert_eq!(
            spawn.to_string(),
            format!("cannot start qemu-system-aarch64: {}", not_found())
        );
        let failed = Error::Failed {
            command: "cargo build -p firmware".into(),
            status: std::process::ExitStatus::from_raw(101 << 8),
            output: String::new(),
        };
        assert_eq!(
            failed.to_string(),
            "cargo build -p firmware failed (exit status: 101)"
        );
        let with_stderr = Error::Failed {
            command: "rustc --print sysroot".into(),
            status: std::process::ExitStatus::from_raw(1 << 8),
            output: "no such toolchain".into(),
        };
        assert_eq!(
            with_stderr.to_string(),
            "rustc --print sysroot failed (exit status: 1): no such toolchain"
        );
        let step = Error::during("build")(failed);
        assert_eq!(
            step.to_string(),
            "build: cargo build -p firmware failed (exit status: 101)"
        );
        assert!(matches!(step.root(), Error::Failed { .. }));
        let timeout = Error::Timeout {
            what: "query-balloon to reach 512 MiB".into(),
            secs: 120,
            detail: "stuck at 700 MiB".into(),
        };
        assert_eq!(
            timeout.to_string(),
            "timed out after 120 s waiting for query-balloon to reach 512 MiB: stuck at 700 MiB"
        );
        let qmp: Error = QmpError::Command {
            class: "GenericError".into(),
            desc: "no balloon".into(),
        }
        .into();
        assert_eq!(qmp.to_string(), "QMP error GenericError: no balloon");
    }

    #[test]
    fn a_system_test_reports_the_ending_it_got_against_the_one_it_wanted() {
        let hang = Error::Ending {
            got: Ending::Exited(0),
            want: Want::Hang,
        };
        assert_eq!(
            hang.to_string(),
            "expected a hang ended by the timeout, got Exited(0)"
        );
        let ready = Error::Ending {
            got: Ending::TimedOut,
            want: Want::Exit(None),
        };
        assert_eq!(
            ready.to_string(),
            "expected None (None = ready), got TimedOut"
        );
    }
}
