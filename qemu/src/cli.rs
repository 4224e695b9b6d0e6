//! The command line, parsed by `clap` (derive). Values are checked here
//! (board names, ELs, sizes); what depends on two options together (an EL
//! the board's model cannot enter at) is checked by the command.

use crate::error::{Error, Result};
use crate::machine::{self, Machine};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// `cargo qemu`: build the firmware, boot it on QEMU, run its tests.
#[derive(Debug, Parser)]
#[command(name = "cargo qemu", bin_name = "cargo qemu")]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Build the firmware, boot it on a QEMU model and show the decoded log.
    Run(RunArgs),
    /// Every test: host tests, then on-target tests under QEMU.
    Test(TestCli),
    /// Benchmarks, as JSON lines.
    Bench {
        /// Which benchmark.
        #[arg(value_enum, default_value = "all")]
        which: BenchWhich,
        /// Board for the boot benchmark.
        #[arg(long, value_parser = parse_board, default_value = "virt")]
        board: &'static str,
        /// Also run the same steps on a peer in the same run (balloon: `linux`).
        #[arg(long, value_enum)]
        peer: Option<Peer>,
    },
    /// Drive a running `cargo qemu run`'s balloon to SIZE over QMP.
    Balloon {
        /// Guest size, like 512M or 1G.
        #[arg(value_parser = parse_nonzero_size)]
        size: u64,
        /// The instance's QMP socket (default: the newest one).
        #[arg(long)]
        qmp: Option<PathBuf>,
    },
    /// Write what goes on a real board.
    Image {
        /// A real board (not virt).
        #[arg(long, value_parser = parse_real_board)]
        board: &'static str,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// The cargo target runner: boot an ELF, or run a test ELF's tests.
    Runner {
        /// The ELF cargo built.
        elf: PathBuf,
        /// What cargo passes after it (ignored).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        rest: Vec<String>,
    },
    /// Only install what the other commands need (the Rust target, QEMU).
    Setup,
}

/// `cargo qemu run` options.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Board whose build and QEMU model to use.
    #[arg(long, value_parser = parse_board, default_value = "virt")]
    pub board: &'static str,
    /// Exit 0 as soon as the firmware logs `ready`.
    #[arg(long)]
    pub exit_when_ready: bool,
    /// CPU model (max, cortex-a53, cortex-a72, …).
    #[arg(long)]
    pub cpu: Option<String>,
    /// RAM size, like 512M, 1G or 4G.
    #[arg(long, value_parser = parse_mem)]
    pub mem: Option<String>,
    /// Entry exception level.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=3))]
    pub el: Option<u8>,
    /// Interrupt controller version on virt.
    #[arg(long, value_parser = clap::value_parser!(u8).range(2..=3))]
    pub gic: Option<u8>,
    /// Number of cores (QEMU `-smp`), 1 to 8.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=8))]
    pub smp: Option<u8>,
    /// Kernel command line (`/chosen/bootargs`).
    #[arg(long)]
    pub append: Option<String>,
}

impl RunArgs {
    /// The machine these options describe; an EL the board's model cannot
    /// enter an ELF at is a usage error.
    pub fn machine(&self) -> Result<Machine> {
        let board = self.board;
        let els = Machine::entry_els(board);
        let el = self.el.unwrap_or(els[0]);
        if !els.contains(&el) {
            return Err(Error::Usage(format!(
                "{board}'s QEMU model enters an ELF at EL{els:?}, not EL{el}"
            )));
        }
        let mut m = Machine::board(board, el);
        if let Some(cpu) = &self.cpu {
            m.cpu = leak(cpu);
        }
        if let Some(mem) = &self.mem {
            m.mem = leak(mem);
        }
        if let Some(gic) = self.gic {
            m.gic_version = gic;
        }
        if let Some(smp) = self.smp {
            m.smp = smp;
        }
        Ok(m)
    }
}

/// `cargo qemu test` options.
#[derive(Debug, Args, Default)]
pub struct TestCli {
    /// Substrings of `suite::test`; a test runs if its name contains any
    /// (also passed to the host `cargo test`).
    pub filters: Vec<String>,
    /// Only this board's on-target runs (default: virt and every board model).
    #[arg(long, value_parser = parse_board)]
    pub board: Option<&'static str>,
    /// Only the host tests.
    #[arg(long, conflicts_with = "no_host")]
    pub host_only: bool,
    /// Skip the host tests.
    #[arg(long)]
    pub no_host: bool,
    /// Parallel QEMU instances (default: available cores).
    #[arg(short = 'j', long = "jobs")]
    pub jobs: Option<usize>,
    /// Run the on-target suites on a real board over its console instead:
    /// a tty (`/dev/ttyUSB0`), `unix:PATH` or `tcp:HOST:PORT`. Needs --board.
    #[arg(long, requires = "board", conflicts_with = "host_only")]
    pub serial: Option<String>,
    /// Line speed of --serial's tty.
    #[arg(long, requires = "serial", default_value_t = crate::serial::DEFAULT_BAUD)]
    pub baud: u32,
    /// Shell command run before each test to power-cycle the board into the
    /// test (`MEMFW_ELF` and `MEMFW_BOARD` are set for it).
    #[arg(long, requires = "serial")]
    pub power_cycle: Option<String>,
    /// Without the resident loader: --power-cycle must start the test ELF
    /// itself.
    #[arg(long, requires = "serial")]
    pub no_loader: bool,
    /// With `--serial qemu`: the EL the board's model enters the loader
    /// at (a real board's is fixed by its boot firmware).
    #[arg(long, requires = "serial", value_parser = clap::value_parser!(u8).range(1..=3))]
    pub el: Option<u8>,
    /// With `--serial qemu`: the model's RAM (a real board's is fixed).
    #[arg(long, requires = "serial", value_parser = parse_mem)]
    pub mem: Option<String>,
    /// Run the on-target suites on a labgrid place instead: acquire PLACE
    /// through the coordinator (LG_COORDINATOR), take its serial port and
    /// power, release it at the end. The board: --board or the place's
    /// `board` tag.
    #[arg(long, value_name = "PLACE", conflicts_with_all = ["serial", "host_only"])]
    pub labgrid: Option<String>,
    /// With --labgrid: a shell command run before each test's power cycle
    /// (`MEMFW_ELF`, `MEMFW_BOARD` set) that puts the test image where the
    /// board boots it from.
    #[arg(long, requires = "labgrid")]
    pub stage: Option<String>,
    /// With --labgrid: the regex of the loader's ready line the strategy
    /// waits for after power-on (default `memfw-loader \S+ board=\S+
    /// ready`; empty: do not wait).
    #[arg(long, value_name = "REGEX", requires = "labgrid")]
    pub loader_ready: Option<String>,
}

impl TestCli {
    /// What `test::run` takes; a bad --serial value or virt with it is a
    /// usage error.
    pub fn to_test_args(&self) -> Result<crate::test::TestArgs> {
        let serial = match &self.serial {
            None => None,
            Some(_) if self.board == Some("virt") => {
                return Err(Error::Usage(
                    "--serial takes a real board's --board, not virt".into(),
                ))
            }
            Some(s) => Some(self.serial_board(s)?),
        };
        Ok(crate::test::TestArgs {
            filters: self.filters.clone(),
            no_host: self.no_host,
            host_only: self.host_only,
            jobs: self.jobs,
            board: self.board,
            serial,
        })
    }
}

impl TestCli {
    /// `--serial PORT` (or `qemu`: the board's model running the loader)
    /// with its options.
    fn serial_board(&self, s: &str) -> Result<crate::test::SerialBoard> {
        let board = self.board.unwrap_or("virt");
        let model = if s == "qemu" {
            if self.no_loader || self.power_cycle.is_some() {
                return Err(Error::Usage(
                    "--serial qemu runs the loader on the board's model; --no-loader and --power-cycle are for a real board".into(),
                ));
            }
            // The model enters the loader where the board's own boot
            // firmware would: at EL2 (raw on the Pis), or as asked.
            let el = self.el.unwrap_or(2);
            let els: &[u8] = if board.starts_with("raspi") {
                &[2]
            } else {
                Machine::entry_els(board)
            };
            if !els.contains(&el) {
                return Err(Error::Usage(format!(
                    "{board}'s model enters the loader at EL{els:?}, not EL{el}"
                )));
            }
            let mut m = Machine::board(board, el);
            if let Some(mem) = &self.mem {
                if board.starts_with("raspi") {
                    return Err(Error::Usage(format!(
                        "{board}'s model has a fixed RAM size; --mem cannot change it"
                    )));
                }
                m.mem = leak(mem);
            }
            Some(m)
        } else {
            if self.el.is_some() || self.mem.is_some() {
                return Err(Error::Usage(format!(
                    "--el and --mem describe the QEMU model (--serial qemu); a real board's entry EL and RAM are fixed by its boot firmware and cannot be changed from here (--serial {s})"
                )));
            }
            None
        };
        Ok(crate::test::SerialBoard {
            port: if model.is_some() {
                crate::serial::PortSpec::Unix(std::path::PathBuf::new())
            } else {
                crate::serial::PortSpec::parse(s, self.baud)
                    .map_err(|e| Error::Usage(format!("--serial {e}")))?
            },
            power_cycle: self.power_cycle.clone(),
            model_pidfile: None,
            loader: (!self.no_loader).then(crate::loader::LoaderUse::default),
            name_prefix: String::new(),
            machine: None,
            model,
        })
    }
}

/// `cargo qemu bench balloon --peer NAME`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Peer {
    /// Linux's virtio_balloon (Debian's arm64 kernel, a busybox initramfs).
    Linux,
}

/// `cargo qemu bench WHICH`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchWhich {
    /// Page array and frame allocator against buddy_system_allocator.
    Memdesc,
    /// The frame allocator shared by 1, 2, 4 and 8 host threads against
    /// buddy_system_allocator's LockedFrameAllocator.
    Smp,
    /// The stage-1 engine against aarch64-paging.
    Translation,
    /// Memory bring-up timed by the firmware under QEMU.
    Boot,
    /// Balloon inflate/deflate rates over QMP.
    Balloon,
    /// memdesc, smp, translation and boot.
    All,
}

fn leak(s: &str) -> &'static str {
    Box::leak(s.to_string().into_boxed_str())
}

/// `--board NAME`: `virt` or one of [`machine::BOARD_MODELS`].
pub fn parse_board(name: &str) -> std::result::Result<&'static str, String> {
    std::iter::once(&"virt")
        .chain(machine::BOARD_MODELS)
        .find(|b| **b == name)
        .copied()
        .ok_or_else(|| {
            format!(
                "takes virt, {}, not {name:?}",
                machine::BOARD_MODELS.join(", ")
            )
        })
}

/// A board with a real counterpart (for `image` and the serial runner).
fn parse_real_board(name: &str) -> std::result::Result<&'static str, String> {
    match parse_board(name)? {
        "virt" => Err("takes a real board, not virt".into()),
        b => Ok(b),
    }
}

fn parse_mem(s: &str) -> std::result::Result<String, String> {
    match machine::parse_size(s) {
        Some(b) if b > 0 => Ok(s.to_string()),
        _ => Err(format!("takes a size like 512M, 1G or 4G, not {s:?}")),
    }
}

fn parse_nonzero_size(s: &str) -> std::result::Result<u64, String> {
    machine::parse_size(s)
        .filter(|&b| b > 0)
        .ok_or_else(|| format!("is a guest size like 512M or 1G, not {s:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    fn parse(args: &[&str]) -> std::result::Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("cargo-qemu").chain(args.iter().copied()))
    }

    #[test]
    fn host_only_and_no_host_together_are_rejected() {
        let e = parse(&["test", "--host-only", "--no-host"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ArgumentConflict);
        let e = parse(&["test", "--no-host", "boot", "--host-only"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ArgumentConflict);
        assert!(parse(&["test", "--host-only"]).is_ok());
        assert!(parse(&["test", "--no-host"]).is_ok());
    }

    #[test]
    fn test_options_and_filters() {
        let Cmd::Test(t) = parse(&["test", "boot::", "--board", "raspi3b", "-j", "3", "mmu"])
            .expect("parses")
            .cmd
        else {
            panic!("not test");
        };
        assert_eq!(t.filters, ["boot::", "mmu"]);
        assert_eq!(t.board, Some("raspi3b"));
        assert_eq!(t.jobs, Some(3));
        assert!(!t.host_only && !t.no_host);
        let a = t.to_test_args().expect("valid");
        assert_eq!(a.board, Some("raspi3b"));
        assert_eq!(a.filters, ["boot::", "mmu"]);
        let Cmd::Test(t) = parse(&["test", "--jobs", "1"]).expect("parses").cmd else {
            panic!("not test");
        };
        assert_eq!((t.jobs, t.board), (Some(1), None));
        assert!(parse(&["test", "-j", "many"]).is_err());
        assert!(parse(&["test", "--frobnicate"]).is_err());
    }

    #[test]
    fn serial_options() {
        let t = |args: &[&str]| match parse(args).map(|c| c.cmd) {
            Ok(Cmd::Test(t)) => Ok(t),
            Ok(_) => panic!("not test"),
            Err(e) => Err(e.kind()),
        };
        let a = t(&["test", "--board", "raspi3b", "--serial", "/dev/ttyUSB0"])
            .expect("parses")
            .to_test_args()
            .expect("valid");
        let s = a.serial.expect("serial");
        assert_eq!(
            s.port,
            crate::serial::PortSpec::Tty {
                path: "/dev/ttyUSB0".into(),
                baud: 115_200
            }
        );
        assert_eq!(s.power_cycle, None);
        let a = t(&[
            "test",
            "--board",
            "imx8mp-evk",
            "--serial",
            "/dev/ttyUSB2",
            "--baud",
            "921600",
            "--power-cycle",
            "relay 3 cycle",
        ])
        .expect("parses")
        .to_test_args()
        .expect("valid");
        let s = a.serial.expect("serial");
        assert!(matches!(
            s.port,
            crate::serial::PortSpec::Tty { baud: 921_600, .. }
        ));
        assert_eq!(s.power_cycle.as_deref(), Some("relay 3 cycle"));
        // --serial needs a board, and a real one; --baud and
        // --power-cycle need --serial; --host-only runs nothing on a board.
        assert_eq!(
            t(&["test", "--serial", "/dev/ttyUSB0"]).unwrap_err(),
            ErrorKind::MissingRequiredArgument
        );
        assert!(matches!(
            t(&["test", "--board", "virt", "--serial", "/dev/ttyUSB0"])
                .expect("parses")
                .to_test_args(),
            Err(Error::Usage(_))
        ));
        assert!(matches!(
            t(&["test", "--board", "raspi3b", "--serial", "/dev/x", "--baud", "7"])
                .expect("parses")
                .to_test_args(),
            Err(Error::Usage(_))
        ));
        assert_eq!(
            t(&["test", "--baud", "9600"]).unwrap_err(),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            t(&["test", "--power-cycle", "x"]).unwrap_err(),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            t(&[
                "test",
                "--board",
                "raspi3b",
                "--serial",
                "/dev/x",
                "--host-only"
            ])
            .unwrap_err(),
            ErrorKind::ArgumentConflict
        );
    }

    #[test]
    fn labgrid_options() {
        let t = |args: &[&str]| match parse(args).map(|c| c.cmd) {
            Ok(Cmd::Test(t)) => Ok(t),
            Ok(_) => panic!("not test"),
            Err(e) => Err(e.kind()),
        };
        let a = t(&["test", "--labgrid", "pi-3", "boot::", "--stage", "cp x y"]).expect("parses");
        assert_eq!(a.labgrid.as_deref(), Some("pi-3"));
        assert_eq!(a.stage.as_deref(), Some("cp x y"));
        assert_eq!(a.filters, ["boot::"]);
        assert_eq!(a.board, None, "the place's tag may name it");
        let a = t(&[
            "test",
            "--labgrid",
            "p",
            "--board",
            "raspi4b",
            "--loader-ready",
            "",
        ])
        .expect("parses");
        assert_eq!(
            (a.board, a.loader_ready.as_deref()),
            (Some("raspi4b"), Some(""))
        );
        for bad in [
            &[
                "test",
                "--labgrid",
                "p",
                "--serial",
                "/dev/x",
                "--board",
                "raspi3b",
            ][..],
            &["test", "--labgrid", "p", "--host-only"],
        ] {
            assert_eq!(t(bad).unwrap_err(), ErrorKind::ArgumentConflict, "{bad:?}");
        }
        for bad in [
            &["test", "--stage", "x"][..],
            &["test", "--loader-ready", "x"],
        ] {
            assert_eq!(
                t(bad).unwrap_err(),
                ErrorKind::MissingRequiredArgument,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn boards_are_checked() {
        assert!(parse(&["test", "--board", "raspi5"]).is_err());
        for b in ["virt", "raspi3b", "raspi4b", "imx8mp-evk", "xlnx-zcu102"] {
            assert!(parse(&["run", "--board", b]).is_ok(), "{b}");
        }
        // image needs a real board and an output directory.
        assert!(parse(&["image", "--board", "virt", "--out", "d"]).is_err());
        assert!(parse(&["image", "--board", "raspi3b"]).is_err());
        assert!(parse(&["image", "--board", "raspi3b", "--out", "d"]).is_ok());
    }

    #[test]
    fn run_options_make_the_machine() {
        let Cmd::Run(r) = parse(&[
            "run",
            "--cpu",
            "cortex-a53",
            "--mem",
            "512M",
            "--el",
            "2",
            "--gic",
            "3",
        ])
        .expect("parses")
        .cmd
        else {
            panic!("not run");
        };
        let m = r.machine().expect("valid");
        assert_eq!(
            (m.cpu, m.mem, m.el, m.gic_version),
            ("cortex-a53", "512M", 2, 3)
        );
        assert!(parse(&["run", "--el", "4"]).is_err());
        assert!(parse(&["run", "--gic", "4"]).is_err());
        assert!(parse(&["run", "--mem", "0"]).is_err());
        assert!(parse(&["run", "--mem", "lots"]).is_err());
        // raspi's model enters an ELF at EL3 only: a usage error, not a boot.
        let Cmd::Run(r) = parse(&["run", "--board", "raspi3b", "--el", "1"])
            .expect("parses")
            .cmd
        else {
            panic!("not run");
        };
        assert!(matches!(r.machine(), Err(Error::Usage(_))));
        let Cmd::Run(r) = parse(&["run", "--board", "raspi3b"]).expect("parses").cmd else {
            panic!("not run");
        };
        assert_eq!(r.machine().expect("valid").el, 3);
    }

    #[test]
    fn bench_balloon_runner_setup() {
        let Cmd::Bench { which, board, peer } = parse(&["bench"]).expect("parses").cmd else {
            panic!("not bench");
        };
        assert_eq!((which, board, peer), (BenchWhich::All, "virt", None));
        let Cmd::Bench { which, peer, .. } = parse(&["bench", "balloon", "--peer", "linux"])
            .expect("parses")
            .cmd
        else {
            panic!("not bench");
        };
        assert_eq!((which, peer), (BenchWhich::Balloon, Some(Peer::Linux)));
        assert!(parse(&["bench", "balloon", "--peer", "bsd"]).is_err());
        let Cmd::Bench { which, board, .. } = parse(&["bench", "boot", "--board", "xlnx-zcu102"])
            .expect("parses")
            .cmd
        else {
            panic!("not bench");
        };
        assert_eq!((which, board), (BenchWhich::Boot, "xlnx-zcu102"));
        assert!(parse(&["bench", "nothing"]).is_err());
        let Cmd::Balloon { size, qmp } = parse(&["balloon", "512M", "--qmp", "/tmp/q"])
            .expect("parses")
            .cmd
        else {
            panic!("not balloon");
        };
        assert_eq!(size, 512 << 20);
        assert_eq!(qmp, Some(PathBuf::from("/tmp/q")));
        assert!(parse(&["balloon", "0"]).is_err());
        assert!(parse(&["balloon"]).is_err());
        // cargo may pass more words after the ELF.
        let Cmd::Runner { elf, .. } = parse(&["runner", "t.elf", "--nocapture", "x"])
            .expect("parses")
            .cmd
        else {
            panic!("not runner");
        };
        assert_eq!(elf, PathBuf::from("t.elf"));
        assert!(matches!(parse(&["setup"]).expect("parses").cmd, Cmd::Setup));
        assert!(parse(&[]).is_err());
    }
}
