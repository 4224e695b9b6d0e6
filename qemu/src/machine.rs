//! QEMU machine configurations and the command lines that start them.

use crate::fdt::DtbPatch;
use std::path::Path;
use std::process::Command;

/// One way of booting a board model (`virt` by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    /// Board (`hal::board` name): `virt`, `raspi3b`, `raspi4b`,
    /// `imx8mp-evk`, `xlnx-zcu102`.
    pub board: &'static str,
    /// Boot a board model without the device tree the tool makes for it
    /// (memory then comes from the board's own source or default).
    pub without_dtb: bool,
    /// `-cpu` model: `max` (FEAT_HAFDBS, range TLBI, BBM 2) or `cortex-a53`.
    pub cpu: &'static str,
    /// `-m` size, as QEMU takes it (`512M`, `1G`, `4G`).
    pub mem: &'static str,
    /// Exception level QEMU enters the image at (1, 2 with
    /// `virtualization=on`, 3 with `secure=on`).
    pub el: u8,
    /// Make guest time count instructions (`-icount shift=0`), for repeatable figures.
    pub icount: bool,
    /// GIC architecture version: 2 (QEMU's default for `virt`, no option)
    /// or 3 (`gic-version=3`); on a board model the one it has, 0 for the
    /// Pi 3's BCM2836 local controller (no GIC).
    pub gic_version: u8,
    /// Boot with QEMU's own device tree changed this way (`-dtb`), to test
    /// how the firmware takes a hostile tree.
    pub dtb: Option<DtbPatch>,
    /// vCPUs on `virt` (`-smp`; more than one runs multi-threaded TCG, one
    /// host thread per vCPU). The board models always have their 4.
    pub smp: u8,
    /// QEMU serves semihosting (`HLT #0xF000`). When false it is off, so the
    /// instruction traps and the firmware speaks the console protocol
    /// (`console_proto`), as on a real board without a debugger.
    pub semihosting: bool,
    /// Where the board's console goes: QEMU's stdio, or a pty or socket
    /// the host opens as it would a board's serial port.
    pub console: Console,
    /// `-no-reboot`: a guest reset ends QEMU (QMP SHUTDOWN, reason
    /// guest-reset) instead of rebooting the image.
    pub no_reboot: bool,
}

/// How the console UART reaches the host.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Console {
    /// QEMU's stdin and stdout.
    #[default]
    Stdio,
    /// `-chardev pty` with a link to the pty at this path (empty: the boot
    /// picks a temporary one); the host opens it as a tty.
    Pty(std::path::PathBuf),
    /// `-chardev socket,server=on,wait=on` at this path (empty: a
    /// temporary one); the host connects to it.
    UnixSocket(std::path::PathBuf),
}

impl Console {
    /// The `-chardev` option and the `-serial` value for this console.
    fn qemu_args(&self) -> (Option<String>, String) {
        match self {
            Self::Stdio => (None, "stdio".into()),
            Self::Pty(p) => (
                Some(format!("pty,id=con,path={}", p.display())),
                "chardev:con".into(),
            ),
            Self::UnixSocket(p) => (
                Some(format!(
                    "socket,id=con,path={},server=on,wait=on",
                    p.display()
                )),
                "chardev:con".into(),
            ),
        }
    }
}

/// `-chardev …` (if any) and `-serial …` for the console.
fn serial_args(cmd: &mut Command, console: &Console) {
    let (chardev, serial) = console.qemu_args();
    if let Some(c) = chardev {
        cmd.args(["-chardev", &c]);
    }
    cmd.args(["-serial", &serial]);
}

impl Default for Machine {
    fn default() -> Self {
        Self {
            board: "virt",
            without_dtb: false,
            cpu: "max",
            mem: "1G",
            el: 1,
            icount: false,
            gic_version: 2,
            dtb: None,
            semihosting: true,
            console: Console::Stdio,
            no_reboot: false,
            smp: 1,
        }
    }
}

/// The board models besides `virt`, as `--board` takes them.
pub const BOARD_MODELS: &[&str] = &["raspi3b", "raspi4b", "imx8mp-evk", "xlnx-zcu102"];

/// The Pi firmware (and QEMU's raspi models) give the ARM cores only the
/// memory below the VideoCore's share, whatever the board has.
const RASPI_ARM_MEMORY: u64 = 0x3c00_0000;

impl Machine {
    /// The default way of booting `board` (an ELF, as QEMU loads it): its
    /// CPU and RAM, entered at `el` (which the model must support, see
    /// [`Machine::entry_els`]).
    pub fn board(board: &'static str, el: u8) -> Self {
        let (cpu, mem) = match board {
            "raspi3b" => ("cortex-a53", "1G"),
            "raspi4b" => ("cortex-a72", "2G"),
            "imx8mp-evk" | "xlnx-zcu102" => ("cortex-a53", "1G"),
            _ => ("max", "1G"),
        };
        let gic_version = match board {
            "raspi3b" => 0,
            "imx8mp-evk" => 3,
            _ => 2,
        };
        Self {
            board,
            cpu,
            mem,
            el,
            gic_version,
            ..Self::default()
        }
    }

    /// The entry ELs an ELF can get on `board`'s QEMU model: raspi enters
    /// at EL3 only; the EVK at EL3, or at EL2 with its EL3 switched off;
    /// the ZCU102 at EL1, EL2 (`virtualization=on`) or EL3 (`secure=on`).
    pub fn entry_els(board: &str) -> &'static [u8] {
        match board {
            "raspi3b" | "raspi4b" => &[3],
            "imx8mp-evk" => &[3, 2],
            _ => &[1, 2, 3],
        }
    }

    /// vCPUs QEMU gives the guest: `smp` on `virt`, 4 on the board models.
    pub fn vcpus(&self) -> u8 {
        if self.is_virt() {
            self.smp.max(1)
        } else {
            4
        }
    }

    /// True for `virt` (QEMU makes its device tree and balloon device).
    pub fn is_virt(&self) -> bool {
        self.board == "virt"
    }

    /// Bytes of RAM `mem` stands for.
    pub fn mem_bytes(&self) -> u64 {
        parse_size(self.mem).unwrap_or(0)
    }

    /// Bytes of RAM the firmware should find on this machine.
    pub fn expected_ram_bytes(&self) -> u64 {
        match self.board {
            "raspi3b" | "raspi4b" => RASPI_ARM_MEMORY,
            _ => self.mem_bytes(),
        }
    }

    /// The PSCI conduit the model offers at this entry EL, if any (none
    /// when the image enters at EL3, none at all on raspi).
    pub fn psci_method(&self) -> Option<&'static str> {
        match (self.board, self.el) {
            (_, 3) | ("raspi3b" | "raspi4b", _) => None,
            ("virt", 1) => Some("hvc"),
            _ => Some("smc"),
        }
    }

    /// Short label for test output, e.g. `el2 max 1G` (`… gicv3` on GICv3).
    pub fn label(&self) -> String {
        // A board model has one interrupt controller; only virt's is a choice.
        let gic = if self.gic_version == 2 || !self.is_virt() {
            String::new()
        } else {
            format!(" gicv{}", self.gic_version)
        };
        let mut s = match self.dtb {
            Some(p) => format!(
                "el{} {} {}{gic} dtb={}",
                self.el,
                self.cpu,
                self.mem,
                p.name()
            ),
            None => format!("el{} {} {}{gic}", self.el, self.cpu, self.mem),
        };
        if !self.is_virt() {
            s = format!("{} {s}", self.board);
            if self.without_dtb {
                s.push_str(" no-dtb");
            }
        }
        if self.smp > 1 {
            s.push_str(&format!(" smp{}", self.smp));
        }
        if !self.semihosting {
            s.push_str(" semihosting=off console-protocol");
        }
        match self.console {
            Console::Stdio => {}
            Console::Pty(_) => s.push_str(" serial=pty"),
            Console::UnixSocket(_) => s.push_str(" serial=unix-socket"),
        }
        s
    }

    /// The command that makes QEMU write the device tree this machine would
    /// give the guest to `out`, then exit.
    pub fn dump_dtb_command(&self, elf: &Path, out: &Path) -> Command {
        let dump = format!("dumpdtb={}", out.display());
        self.build(elf, &[], None, None, Some(&dump), None)
    }

    /// The QEMU command for booting `elf` on this machine. `semihosting_args`
    /// become the semihosting command line; `append` becomes
    /// `/chosen/bootargs`; `qmp` is a Unix socket path for QMP.
    pub fn command(
        &self,
        elf: &Path,
        semihosting_args: &[String],
        append: Option<&str>,
        qmp: Option<&Path>,
    ) -> Command {
        self.build(elf, semihosting_args, append, qmp, None, None)
    }

    /// [`Machine::command`] with the device tree from `dtb` instead of
    /// QEMU's own.
    pub fn command_with_dtb(
        &self,
        elf: &Path,
        semihosting_args: &[String],
        append: Option<&str>,
        qmp: Option<&Path>,
        dtb: &Path,
    ) -> Command {
        self.build(elf, semihosting_args, append, qmp, None, Some(dtb))
    }

    fn build(
        &self,
        elf: &Path,
        semihosting_args: &[String],
        append: Option<&str>,
        qmp: Option<&Path>,
        machine_option: Option<&str>,
        dtb: Option<&Path>,
    ) -> Command {
        let machine = self.machine_arg(machine_option);
        let mut cmd = Command::new(crate::setup::QEMU);
        if self.is_virt() {
            self.virt_devices(&mut cmd, &machine);
        } else {
            self.board_devices(&mut cmd, &machine);
        }
        if self.icount {
            cmd.args(["-icount", "shift=0"]);
        }
        if self.no_reboot {
            cmd.arg("-no-reboot");
        }
        tail(
            &mut cmd,
            elf,
            semihosting_args,
            append,
            qmp,
            dtb,
            self.semihosting,
        );
        cmd
    }

    /// The `-M` value: the board, its EL option (`virt` and the ZCU102),
    /// virt's GIC version, then `machine_option`.
    fn machine_arg(&self, machine_option: Option<&str>) -> String {
        let mut machine = String::from(self.board);
        if self.is_virt() || self.board == "xlnx-zcu102" {
            match self.el {
                3 => machine.push_str(",secure=on"),
                2 => machine.push_str(",virtualization=on"),
                _ => {}
            }
        }
        if self.is_virt() && self.gic_version != 2 {
            machine.push_str(&format!(",gic-version={}", self.gic_version));
        }
        if let Some(opt) = machine_option {
            // QEMU's option parser escapes a comma by doubling it.
            machine.push(',');
            machine.push_str(&opt.replace(',', ",,"));
        }
        machine
    }

    /// `virt`: CPU, RAM, vCPUs, the console and the balloon device.
    fn virt_devices(&self, cmd: &mut Command, machine: &str) {
        let smp = self.smp.max(1).to_string();
        cmd.args([
            "-M", machine, "-cpu", self.cpu, "-m", self.mem, "-smp", &smp,
        ]);
        if self.smp > 1 {
            cmd.args(["-accel", "tcg,thread=multi"]);
        }
        // Only the devices the firmware uses: no default NIC (its option ROM,
        // efi-virtio.rom, is in ipxe-qemu, which a --no-install-recommends
        // QEMU lacks), CD-ROM, parallel port, monitor or display. The serial
        // port is named explicitly; a binary defmt stream must not pass
        // through -nographic's escape handling.
        cmd.args(["-nodefaults", "-nic", "none"]);
        cmd.args(["-display", "none", "-monitor", "none"]);
        serial_args(cmd, &self.console);
        cmd.args(["-global", "virtio-mmio.force-legacy=false"]);
        cmd.args([
            "-device",
            "virtio-balloon-device,deflate-on-oom=on,free-page-reporting=on",
        ]);
    }

    /// A board model: its fixed CPUs, `-smp 4`, the console UART wired to
    /// stdio (the Pi's mini-UART and the EVK's UART2 are QEMU's second
    /// serial port), no display or audio.
    fn board_devices(&self, cmd: &mut Command, machine: &str) {
        cmd.args(["-M", machine, "-m", self.mem, "-smp", "4"]);
        if self.board == "imx8mp-evk" && self.el == 2 {
            // Without EL3 the model enters at EL2 and offers PSCI over SMC,
            // the only way its secondaries can be started.
            cmd.args(["-global", "cortex-a53-arm-cpu.has_el3=off"]);
        }
        cmd.args(["-nodefaults", "-display", "none", "-monitor", "none"]);
        if self.board == "xlnx-zcu102" {
            cmd.args(["-audio", "none"]);
        }
        if console_is_second_serial(self.board) {
            cmd.args(["-serial", "null"]);
        }
        serial_args(cmd, &self.console);
    }
}

/// The board's console is QEMU's serial1: the Pi's mini-UART (serial0 is
/// the PL011) and the EVK's UART2 (serial0 is UART1).
fn console_is_second_serial(board: &str) -> bool {
    matches!(board, "raspi3b" | "raspi4b" | "imx8mp-evk")
}

/// Semihosting, command line, QMP, device tree and the image: the same on
/// every machine.
fn tail(
    cmd: &mut Command,
    elf: &Path,
    semihosting_args: &[String],
    append: Option<&str>,
    qmp: Option<&Path>,
    dtb: Option<&Path>,
    semihosting: bool,
) {
    if semihosting {
        let mut semi = String::from("enable=on,target=native");
        for a in semihosting_args {
            // QEMU's option parser escapes a comma by doubling it.
            semi.push_str(",arg=");
            semi.push_str(&a.replace(',', ",,"));
        }
        cmd.args(["-semihosting-config", &semi]);
    } else {
        // HLT #0xF000 is then an undefined instruction; the command line
        // goes over the console (boot.rs) instead.
        cmd.args(["-semihosting-config", "enable=off"]);
    }
    if let Some(append) = append {
        cmd.args(["-append", append]);
    }
    if let Some(qmp) = qmp {
        cmd.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    }
    if let Some(dtb) = dtb {
        cmd.arg("-dtb").arg(dtb);
    }
    cmd.arg("-kernel").arg(elf);
}

/// Parses `512M`, `1G`, `4096` (MiB) like QEMU's `-m`.
pub fn parse_size(s: &str) -> Option<u64> {
    let (num, mult) = match s.chars().last()? {
        'K' | 'k' => (&s[..s.len() - 1], 1u64 << 10),
        'M' | 'm' => (&s[..s.len() - 1], 1 << 20),
        'G' | 'g' => (&s[..s.len() - 1], 1 << 30),
        'T' | 't' => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1 << 20),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("4G"), Some(4 << 30));
        assert_eq!(parse_size("1024"), Some(1 << 30));
        assert_eq!(parse_size("x"), None);
    }

    fn args(cmd: &Command) -> Vec<String> {
        cmd.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    /// The whole default command line, pinned: a new default device (or a lost
    /// `-nodefaults`/`-nic none`) must be a deliberate change to this test.
    #[test]
    fn default_command_line_is_pinned() {
        let m = Machine::default();
        let cmd = m.command(
            Path::new("fw.elf"),
            &[],
            None,
            Some(Path::new("/tmp/q.sock")),
        );
        assert_eq!(cmd.get_program(), crate::setup::QEMU);
        #[rustfmt::skip]
        let expected: Vec<&str> = vec![
            "-M", "virt", "-cpu", "max", "-m", "1G", "-smp", "1",
            "-nodefaults", "-nic", "none",
            "-display", "none", "-monitor", "none", "-serial", "stdio",
            "-global", "virtio-mmio.force-legacy=false",
            "-device", "virtio-balloon-device,deflate-on-oom=on,free-page-reporting=on",
            "-semihosting-config", "enable=on,target=native",
            "-qmp", "unix:/tmp/q.sock,server=on,wait=off",
            "-kernel", "fw.elf",
        ];
        assert_eq!(args(&cmd), expected);
        let icount = Machine {
            icount: true,
            ..Machine::default()
        };
        let a = args(&icount.command(Path::new("fw.elf"), &[], None, None));
        let at = a.iter().position(|x| x == "-icount").expect("-icount");
        assert_eq!(a[at + 1], "shift=0");
        // No device QEMU would need a ROM file for, however the line is built.
        assert!(!a.iter().any(|x| x.contains("virtio-net")));
    }

    /// `smp: 4` gives four vCPUs on host threads (multi-threaded TCG) and
    /// says so in the label; one vCPU keeps the pinned line above.
    #[test]
    fn smp_runs_multi_threaded_tcg() {
        let m = Machine {
            smp: 4,
            ..Machine::default()
        };
        let a = args(&m.command(Path::new("fw.elf"), &[], None, None));
        let at = a.iter().position(|x| x == "-smp").expect("-smp");
        assert_eq!(a[at + 1], "4");
        let at = a.iter().position(|x| x == "-accel").expect("-accel");
        assert_eq!(a[at + 1], "tcg,thread=multi");
        assert!(m.label().ends_with(" smp4"), "{}", m.label());
        assert_eq!(m.vcpus(), 4);
        assert_eq!(Machine::board("raspi3b", 3).vcpus(), 4);
        let one = args(&Machine::default().command(Path::new("fw.elf"), &[], None, None));
        assert!(!one.iter().any(|x| x == "-accel"));
    }

    /// Each board model reads the board's real console, gets its DTB and
    /// its EL options; virt's pinned line is untouched by any of it.
    #[test]
    fn board_command_lines() {
        let line = |m: &Machine| {
            args(&m.command_with_dtb(Path::new("fw.elf"), &[], None, None, Path::new("b.dtb")))
        };
        let pi = line(&Machine::board("raspi4b", 3));
        assert_eq!(&pi[..6], &["-M", "raspi4b", "-m", "2G", "-smp", "4"]);
        let serial: Vec<&str> = pi
            .windows(2)
            .filter(|w| w[0] == "-serial")
            .map(|w| w[1].as_str())
            .collect();
        // serial0 (PL011) to nothing, serial1 (mini-UART) to stdio.
        assert_eq!(serial, ["null", "stdio"]);
        assert!(!pi.iter().any(|a| a == "-cpu" || a.contains("virtio")));
        let evk = line(&Machine::board("imx8mp-evk", 2));
        assert!(evk
            .windows(2)
            .any(|w| w == ["-global", "cortex-a53-arm-cpu.has_el3=off"]));
        assert!(!line(&Machine::board("imx8mp-evk", 3))
            .iter()
            .any(|a| a.contains("has_el3")));
        let zcu = line(&Machine::board("xlnx-zcu102", 2));
        assert!(zcu.contains(&"xlnx-zcu102,virtualization=on".to_string()));
        assert!(zcu.windows(2).any(|w| w == ["-audio", "none"]));
        let serial: Vec<&str> = zcu
            .windows(2)
            .filter(|w| w[0] == "-serial")
            .map(|w| w[1].as_str())
            .collect();
        assert_eq!(serial, ["stdio"]);
        assert!(
            line(&Machine::board("xlnx-zcu102", 3)).contains(&"xlnx-zcu102,secure=on".to_string())
        );
        let at = zcu.iter().position(|a| a == "-dtb").expect("-dtb");
        assert_eq!(zcu[at + 1], "b.dtb");
        assert_eq!(zcu.last().map(String::as_str), Some("fw.elf"));
    }

    /// A console on a pty or socket replaces exactly the board's console
    /// port (the Pi's second serial port stays behind the null first one).
    #[test]
    fn console_on_a_pty_or_socket() {
        let serial = |m: &Machine| {
            let a = args(&m.command(Path::new("fw.elf"), &[], None, None));
            let c: Vec<String> = a
                .windows(2)
                .filter(|w| w[0] == "-serial" || w[0] == "-chardev")
                .map(|w| format!("{} {}", w[0], w[1]))
                .collect();
            c
        };
        let pi = Machine {
            console: Console::Pty("/tmp/p".into()),
            semihosting: false,
            ..Machine::board("raspi3b", 3)
        };
        assert_eq!(
            serial(&pi),
            [
                "-serial null",
                "-chardev pty,id=con,path=/tmp/p",
                "-serial chardev:con"
            ]
        );
        assert!(pi.label().ends_with("console-protocol serial=pty"));
        let zcu = Machine {
            console: Console::UnixSocket("/tmp/s".into()),
            ..Machine::board("xlnx-zcu102", 1)
        };
        assert_eq!(
            serial(&zcu),
            [
                "-chardev socket,id=con,path=/tmp/s,server=on,wait=on",
                "-serial chardev:con"
            ]
        );
        assert_eq!(serial(&Machine::default()), ["-serial stdio"]);
    }

    #[test]
    fn board_facts() {
        assert_eq!(
            Machine::board("raspi3b", 3).expected_ram_bytes(),
            0x3c00_0000
        );
        assert_eq!(
            Machine::board("xlnx-zcu102", 1).expected_ram_bytes(),
            1 << 30
        );
        assert_eq!(Machine::board("raspi4b", 3).psci_method(), None);
        assert_eq!(Machine::board("imx8mp-evk", 3).psci_method(), None);
        assert_eq!(Machine::board("imx8mp-evk", 2).psci_method(), Some("smc"));
        assert_eq!(Machine::board("xlnx-zcu102", 1).psci_method(), Some("smc"));
        assert_eq!(Machine::default().psci_method(), Some("hvc"));
        for b in BOARD_MODELS {
            assert!(hal::board::by_name(b).is_some(), "{b}");
            assert!(!Machine::entry_els(b).is_empty());
            assert!(Machine::board(b, 3).label().starts_with(b));
        }
    }

    #[test]
    fn semihosting_off_replaces_only_the_semihosting_option() {
        let on = Machine::default();
        let off = Machine {
            semihosting: false,
            ..Machine::default()
        };
        let words = ["run_addr".to_string(), "1".to_string()];
        let a_on = args(&on.command(Path::new("fw.elf"), &words, None, None));
        let a_off = args(&off.command(Path::new("fw.elf"), &words, None, None));
        let at = a_off
            .iter()
            .position(|x| x == "-semihosting-config")
            .expect("given");
        assert_eq!(a_off[at + 1], "enable=off");
        assert!(!a_off.iter().any(|x| x.contains("run_addr")));
        // Everything else is the same command line.
        let strip = |mut v: Vec<String>| {
            let i = v
                .iter()
                .position(|x| x == "-semihosting-config")
                .expect("given");
            v.drain(i..i + 2);
            v
        };
        assert_eq!(strip(a_on), strip(a_off));
        assert!(off.label().contains("semihosting=off"));
        assert!(!on.label().contains("semihosting"));
    }

    #[test]
    fn el_selects_machine_options() {
        let m = Machine {
            el: 3,
            ..Machine::default()
        };
        let cmd = m.command(
            Path::new("fw.elf"),
            &["run_addr".into(), "1234".into()],
            None,
            None,
        );
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(args.contains(&"virt,secure=on".to_string()));
        assert!(args.contains(&"enable=on,target=native,arg=run_addr,arg=1234".to_string()));
        assert_eq!(args.last().map(String::as_str), Some("fw.elf"));
        let m2 = Machine {
            el: 2,
            ..Machine::default()
        };
        let args2: Vec<String> = m2
            .command(Path::new("x"), &[], None, None)
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(args2.contains(&"virt,virtualization=on".to_string()));
    }

    #[test]
    fn gic_version_selects_machine_option() {
        let m = Machine {
            gic_version: 3,
            el: 2,
            ..Machine::default()
        };
        let a = args(&m.command(Path::new("x"), &[], None, None));
        assert!(a.contains(&"virt,virtualization=on,gic-version=3".to_string()));
        assert_eq!(m.label(), "el2 max 1G gicv3");
        // GICv2 is QEMU's default for virt: no option, so the pinned
        // default line stays as it is.
        let a = args(&Machine::default().command(Path::new("x"), &[], None, None));
        assert!(!a.iter().any(|x| x.contains("gic-version")));
        assert_eq!(Machine::default().label(), "el1 max 1G");
    }

    #[test]
    fn dtb_dump_and_dtb_boot_use_the_same_machine() {
        let m = Machine {
            el: 2,
            dtb: Some(DtbPatch::OverlappingMemory),
            ..Machine::default()
        };
        let args = |c: Command| -> Vec<String> {
            c.get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect()
        };
        let dump = args(m.dump_dtb_command(Path::new("fw.elf"), Path::new("/tmp/a,b.dtb")));
        assert!(dump.contains(&"virt,virtualization=on,dumpdtb=/tmp/a,,b.dtb".to_string()));
        let boot = args(m.command_with_dtb(
            Path::new("fw.elf"),
            &[],
            None,
            None,
            Path::new("/tmp/x.dtb"),
        ));
        let mut boot = boot;
        let at = boot.iter().position(|a| a == "-dtb").expect("-dtb given");
        assert_eq!(boot[at + 1], "/tmp/x.dtb");
        boot.drain(at..at + 2);
        // Everything but the dump option and -dtb is the same.
        let dump: Vec<String> = dump
            .into_iter()
            .map(|a| a.replace(",dumpdtb=/tmp/a,,b.dtb", ""))
            .collect();
        assert_eq!(dump, boot);
        assert!(m.label().contains("dtb=overlapping-memory"));
    }
}
