//! `cargo qemu test --labgrid PLACE`: the on-target suites on a board in a
//! labgrid lab. The tool installs labgrid into its own venv
//! ([`venv`]), then runs the repo's agent there (`lab/memfw_lab.py hold`),
//! which acquires PLACE through the coordinator, brings it to "loader
//! ready" with `MemfwLoaderStrategy` (power on, the ready line on the
//! console), and reports the place's network serial port and tags. The
//! existing serial runner then runs every test over `tcp:HOST:PORT`, with
//! labgrid's power driver (in the agent, reached through two FIFOs) as the
//! per-test power cycle. The agent holds the place until the tool closes
//! its stdin, however the tool ends (a normal end, an error, Ctrl-C, a
//! kill), and releases it then.

pub mod ci;
pub mod venv;

use crate::error::{Error, OrMissing, Result};
use crate::serial::PortSpec;
use crate::test::SerialBoard;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

/// What `--labgrid` needs to reach and drive a place.
#[derive(Debug, Clone)]
pub struct Lab {
    /// The place.
    pub place: String,
    /// The coordinator's `HOST:PORT`; `None`: labgrid's own default
    /// (`LG_COORDINATOR`, else 127.0.0.1:20408).
    pub coordinator: Option<String>,
    /// The regex of the loader's ready line (`None`: the strategy's
    /// default, `memfw-loader \S+ board=\S+ ready`; empty: do not wait).
    pub ready: Option<String>,
    /// Seconds the strategy waits for it.
    pub ready_timeout: f64,
    /// Seconds off during a power cycle.
    pub power_delay: f64,
    /// Run before each power cycle with `MEMFW_ELF`/`MEMFW_BOARD` set: puts
    /// the test image where the board boots it from.
    pub stage: Option<String>,
}

impl Lab {
    /// A place with labgrid's defaults for the rest.
    pub fn new(place: &str) -> Self {
        Self {
            place: place.to_string(),
            coordinator: None,
            ready: None,
            ready_timeout: 30.0,
            power_delay: 2.0,
            stage: None,
        }
    }
}

/// The place's network serial port as labgrid reports it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct SerialInfo {
    /// Host (after labgrid's proxy resolution).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// `raw` (an RFC 2217 port arrives bridged to raw by the agent).
    pub protocol: String,
    /// Line speed the exporter set.
    pub speed: u32,
}

/// What the agent reports once the place is loader ready.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct PlaceInfo {
    /// Its console.
    pub serial: SerialInfo,
    /// The labgrid power driver it uses.
    pub power: Option<String>,
    /// The FIFOs to its power driver (in, out).
    pub power_fifos: Vec<PathBuf>,
    /// The place's tags (`board=raspi3b`).
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// The ready line the strategy saw.
    pub banner: Option<String>,
}

/// One line from the agent.
#[derive(Debug, PartialEq, Eq)]
pub enum AgentLine {
    /// The place is held and ready.
    Place(Box<PlaceInfo>),
    /// It was released.
    Released(String),
    /// Something failed.
    Error(String),
}

/// Parses one JSON line of the agent; `None` for anything else.
pub fn parse_agent_line(line: &str) -> Option<AgentLine> {
    let v: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        return Some(AgentLine::Error(e.to_string()));
    }
    if let Some(p) = v.get("released").and_then(|e| e.as_str()) {
        return Some(AgentLine::Released(p.to_string()));
    }
    if v.get("serial").is_some() {
        return match serde_json::from_value::<PlaceInfo>(v) {
            Ok(p) => Some(AgentLine::Place(Box::new(p))),
            Err(e) => Some(AgentLine::Error(format!("agent's place report: {e}"))),
        };
    }
    None
}

/// The board to build for: `--board`, which must agree with the place's
/// `board` tag if it has one, else the tag.
pub fn board_for(
    tags: &BTreeMap<String, String>,
    cli: Option<&'static str>,
    place: &str,
) -> Result<&'static str> {
    let tag = tags.get("board").map(String::as_str);
    match (cli, tag) {
        (Some(b), Some(t)) if b != t => Err(Error::Usage(format!(
            "--board {b}, but place {place} is tagged board={t}"
        ))),
        (Some("virt"), _) => Err(Error::Usage(
            "--labgrid takes a real board, not virt".into(),
        )),
        (Some(b), _) => Ok(b),
        (None, Some(t)) => crate::cli::parse_board(t)
            .ok()
            .filter(|b| *b != "virt")
            .ok_or_else(|| {
                Error::Usage(format!(
                    "place {place} is tagged board={t}, not a memfw board"
                ))
            }),
        (None, None) => Err(Error::Usage(format!(
            "place {place} has no board tag: pass --board or `labgrid-client -p {place} set-tags board=NAME`"
        ))),
    }
}

/// Single-quotes `s` for `sh`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The per-test power cycle the serial runner runs with `sh -c`: the
/// stage command if any, then `cycle` through the agent's FIFOs (at most
/// 60 s, so a dead agent fails the test instead of hanging it).
pub fn power_cycle_command(fifos: &[PathBuf], stage: Option<&str>) -> Result<String> {
    let [fin, fout] = fifos else {
        return Err(Error::protocol(
            "labgrid",
            format!("the agent gave {} power FIFOs, not 2", fifos.len()),
        ));
    };
    let q = |p: &Path| sh_quote(&p.to_string_lossy());
    let cycle = format!(
        "printf 'cycle\\n' > {} && IFS= read -r r < {} && [ \"$r\" = ok ] || {{ echo \"labgrid power cycle: ${{r:-no answer}}\" >&2; exit 1; }}",
        q(fin),
        q(fout)
    );
    let cycle = format!("timeout 60 sh -c {}", sh_quote(&cycle));
    Ok(match stage {
        Some(s) => format!("{{ {s}\n}} && {cycle}"),
        None => cycle,
    })
}

/// The serial runner's board from the agent's report. Without a stage
/// command the tests go through the resident loader on the place (each
/// image uploaded over its network serial port, skipped when the loader
/// already holds it; labgrid's power driver cycles the place only when
/// the loader does not answer). With one, the place boots each test image
/// itself: the stage command puts it in place and every test is
/// power-cycled into.
pub fn serial_board(info: &PlaceInfo, stage: Option<&str>) -> Result<SerialBoard> {
    if info.serial.protocol != "raw" {
        return Err(Error::Usage(format!(
            "the place's serial port speaks {}, the serial runner raw TCP",
            info.serial.protocol
        )));
    }
    let addr = format!("tcp:{}:{}", info.serial.host, info.serial.port);
    Ok(SerialBoard {
        port: PortSpec::parse(&addr, info.serial.speed)?,
        power_cycle: Some(power_cycle_command(&info.power_fifos, stage)?),
        model_pidfile: None,
        loader: stage.is_none().then(crate::loader::LoaderUse::default),
        name_prefix: String::new(),
        machine: None,
        model: None,
    })
}

/// A place held by the agent; dropping it releases the place.
pub struct Held {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    log: PathBuf,
    /// What the agent reported.
    pub info: PlaceInfo,
    place: String,
    /// The agent reported the place held.
    acquired: bool,
}

/// The agent's log (its stderr: labgrid's own messages), last lines.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(15);
    lines[from..].join("\n")
}

impl Held {
    /// Starts the agent and waits until the place is held and loader
    /// ready (or the agent fails).
    pub fn acquire(venv: &venv::Venv, lab: &Lab) -> Result<Self> {
        let state = venv::target_dir().join("labgrid-state");
        std::fs::create_dir_all(&state).map_err(Error::io(&state))?;
        let log = state.join(format!("agent-{}.log", lab.place));
        let log_file = std::fs::File::create(&log).map_err(Error::io(&log))?;
        let mut cmd = Command::new(venv.bin("python"));
        cmd.arg(venv.lab_dir().join("memfw_lab.py"))
            .args(["hold", &lab.place, "--state"])
            .arg(&state)
            .args(["--timeout", &lab.ready_timeout.to_string()])
            .args(["--power-delay", &lab.power_delay.to_string()]);
        match lab.ready.as_deref() {
            Some("") => {
                cmd.arg("--no-strategy");
            }
            Some(r) => {
                cmd.args(["--ready", r]);
            }
            None => {}
        }
        if let Some(c) = &lab.coordinator {
            cmd.env("LG_COORDINATOR", c);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log_file);
        let mut child = cmd
            .spawn()
            .map_err(Error::spawn(venv.bin("python").display().to_string()))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().or_missing("labgrid agent: no stdout")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut held = Held {
            child,
            stdin,
            lines,
            log,
            info: PlaceInfo {
                serial: SerialInfo {
                    host: String::new(),
                    port: 0,
                    protocol: String::new(),
                    speed: 0,
                },
                power: None,
                power_fifos: Vec::new(),
                tags: BTreeMap::new(),
                banner: None,
            },
            place: lab.place.clone(),
            acquired: false,
        };
        // Acquire, power on, the strategy's wait, slack for labgrid.
        let wait = Duration::from_secs_f64(lab.ready_timeout + 60.0);
        let deadline = std::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match held.lines.recv_timeout(left) {
                Ok(line) => match parse_agent_line(&line) {
                    Some(AgentLine::Place(p)) => {
                        held.info = *p;
                        held.acquired = true;
                        return Ok(held);
                    }
                    Some(AgentLine::Error(e)) => {
                        return Err(Error::protocol("labgrid", e).with_log(log_tail(&held.log)))
                    }
                    Some(AgentLine::Released(_)) | None => {}
                },
                Err(RecvTimeoutError::Timeout) => {
                    return Err(Error::Timeout {
                        what: format!("labgrid place {} to be loader ready", lab.place),
                        secs: wait.as_secs(),
                        detail: String::new(),
                    }
                    .with_log(log_tail(&held.log)))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(
                        Error::protocol("labgrid", "the agent ended without a report")
                            .with_log(log_tail(&held.log)),
                    )
                }
            }
        }
    }

    /// Closes the agent's stdin and waits for it to end: `Ok(true)` when
    /// it released the place, `Ok(false)` when it never held it.
    fn release(&mut self) -> Result<bool> {
        drop(self.stdin.take());
        let mut result = if self.acquired {
            Err(Error::protocol(
                "labgrid",
                format!("no release of {} reported", self.place),
            ))
        } else {
            Ok(false)
        };
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(30)) {
            match parse_agent_line(&line) {
                Some(AgentLine::Released(_)) => result = Ok(true),
                Some(AgentLine::Error(e)) => result = Err(Error::protocol("labgrid", e)),
                _ => {}
            }
        }
        let _ = self.child.wait();
        result
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        match self.release() {
            Ok(true) => println!("labgrid: released place {}", self.place),
            Ok(false) => {}
            Err(e) => println!("{e}"),
        }
    }
}

/// Acquires `lab`'s place, runs `f` on its board and serial port, and
/// releases it (also when `f` fails or panics; on Ctrl-C the agent sees
/// its stdin close and releases by itself).
pub fn with_place<T>(
    lab: &Lab,
    board: Option<&'static str>,
    f: impl FnOnce(&'static str, SerialBoard) -> T,
) -> Result<T> {
    let venv = venv::ensure()?;
    println!(
        "labgrid: acquiring place {} (labgrid {})",
        lab.place,
        venv::LABGRID_VERSION
    );
    let held = Held::acquire(&venv, lab)?;
    let board = board_for(&held.info.tags, board, &lab.place)?;
    let serial = serial_board(&held.info, lab.stage.as_deref())?;
    println!(
        "labgrid: place {} ({board}) loader ready{}; console tcp:{}:{}, power {}",
        lab.place,
        held.info
            .banner
            .as_deref()
            .map(|b| format!(" ({b:?})"))
            .unwrap_or_default(),
        held.info.serial.host,
        held.info.serial.port,
        held.info.power.as_deref().unwrap_or("?"),
    );
    let out = f(board, serial);
    drop(held);
    Ok(out)
}

/// `cargo qemu test --labgrid PLACE [--board NAME] [FILTER…]`.
pub fn cmd_test(t: &crate::cli::TestCli) -> Result<crate::test::Tally> {
    let place = t.labgrid.clone().unwrap_or_default();
    let mut lab = Lab::new(&place);
    lab.stage = t.stage.clone();
    lab.ready = t.loader_ready.clone();
    let base = t.to_test_args()?;
    with_place(&lab, t.board, |board, serial| {
        crate::test::run(&crate::test::TestArgs {
            board: Some(board),
            serial: Some(serial),
            ..base
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn agent_lines() {
        let line = r#"{"serial": {"host": "127.0.0.1", "port": 45555, "protocol": "raw", "speed": 115200}, "power": "NetworkPowerDriver", "power_fifos": ["/s/power-p.in", "/s/power-p.out"], "tags": {"board": "raspi3b"}, "banner": "memfw-loader 1 board=raspi3b ready"}"#;
        let Some(AgentLine::Place(p)) = parse_agent_line(line) else {
            panic!("not a place");
        };
        assert_eq!(p.serial.port, 45555);
        assert_eq!(p.tags.get("board").map(String::as_str), Some("raspi3b"));
        assert_eq!(p.power_fifos.len(), 2);
        assert_eq!(
            parse_agent_line(r#"{"error": "acquire p: place p is already acquired"}"#),
            Some(AgentLine::Error(
                "acquire p: place p is already acquired".into()
            ))
        );
        assert_eq!(
            parse_agent_line(r#"{"released": "p"}"#),
            Some(AgentLine::Released("p".into()))
        );
        assert!(matches!(
            parse_agent_line(r#"{"serial": {"host": "h"}}"#),
            Some(AgentLine::Error(_))
        ));
        assert_eq!(parse_agent_line("WARNING: something from labgrid"), None);
    }

    #[test]
    fn the_board_comes_from_the_option_or_the_tag() {
        let usage = |r: Result<&str>| matches!(r, Err(Error::Usage(_)));
        assert_eq!(
            board_for(&tags(&[("board", "raspi3b")]), None, "p").ok(),
            Some("raspi3b")
        );
        assert_eq!(
            board_for(&tags(&[]), Some("xlnx-zcu102"), "p").ok(),
            Some("xlnx-zcu102")
        );
        assert_eq!(
            board_for(&tags(&[("board", "raspi4b")]), Some("raspi4b"), "p").ok(),
            Some("raspi4b")
        );
        assert!(usage(board_for(
            &tags(&[("board", "raspi4b")]),
            Some("raspi3b"),
            "p"
        )));
        assert!(board_for(&tags(&[]), None, "p")
            .unwrap_err()
            .to_string()
            .contains("set-tags"));
        assert!(usage(board_for(&tags(&[("board", "pdp11")]), None, "p")));
        assert!(usage(board_for(&tags(&[("board", "virt")]), None, "p")));
        assert!(usage(board_for(&tags(&[]), Some("virt"), "p")));
    }

    #[test]
    fn power_cycle_goes_through_the_fifos_after_the_stage() {
        let fifos = [
            PathBuf::from("/s/power-p.in"),
            PathBuf::from("/s/power-p.out"),
        ];
        let c = power_cycle_command(&fifos, None).expect("two fifos");
        assert!(c.starts_with("timeout 60 sh -c '"), "{c}");
        assert!(c.contains("/s/power-p.in"), "{c}");
        let s = power_cycle_command(&fifos, Some("cp \"$MEMFW_ELF\" /srv/tftp/memfw.elf"))
            .expect("two fifos");
        assert!(
            s.starts_with("{ cp \"$MEMFW_ELF\" /srv/tftp/memfw.elf\n} && timeout 60"),
            "{s}"
        );
        assert!(power_cycle_command(&fifos[..1], None).is_err());
    }

    /// The command really talks to a FIFO server the way the agent serves
    /// it, and fails when the answer is not `ok`.
    #[test]
    fn power_cycle_command_runs_against_fifos() {
        let dir = std::env::temp_dir().join(format!("labgrid-fifo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let fifos = [dir.join("in"), dir.join("out")];
        for f in &fifos {
            let c = std::ffi::CString::new(f.to_string_lossy().as_bytes()).expect("path");
            // SAFETY: c is a NUL-terminated path.
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        }
        for answer in ["ok", "error PowerError: outlet 3 did not switch"] {
            let (fin, fout) = (fifos[0].clone(), fifos[1].clone());
            let server = std::thread::spawn(move || {
                let got = std::fs::read_to_string(&fin).expect("read fifo");
                std::fs::write(&fout, format!("{answer}\n")).expect("write fifo");
                got
            });
            let cmd = power_cycle_command(&fifos, Some("true")).expect("cmd");
            let out = Command::new("sh").arg("-c").arg(&cmd).output().expect("sh");
            assert_eq!(server.join().expect("server"), "cycle\n");
            assert_eq!(out.status.success(), answer == "ok", "{answer}: {out:?}");
        }
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    /// A place on lab1's raw port 4001 with labgrid's power FIFOs.
    fn place_on_lab1() -> PlaceInfo {
        PlaceInfo {
            serial: SerialInfo {
                host: "lab1".into(),
                port: 4001,
                protocol: "raw".into(),
                speed: 115_200,
            },
            power: Some("NetworkPowerDriver".into()),
            power_fifos: vec!["/s/in".into(), "/s/out".into()],
            tags: BTreeMap::new(),
            banner: None,
        }
    }

    #[test]
    fn only_a_raw_port_goes_to_the_serial_runner() {
        let mut info = place_on_lab1();
        let b = serial_board(&info, None).expect("raw");
        assert_eq!(b.port, PortSpec::Tcp("lab1:4001".into()));
        assert!(b.power_cycle.is_some());
        info.serial.protocol = "rfc2217".into();
        assert!(serial_board(&info, None).is_err());
    }

    /// By default the place runs each test through its resident loader,
    /// labgrid's power cycle the reset for a loader that does not answer;
    /// a stage command means the place boots the image itself, cycled
    /// into every test with the stage first.
    #[test]
    fn the_loader_is_the_default_and_a_stage_boots_the_image() {
        let info = place_on_lab1();
        let b = serial_board(&info, None).expect("loader");
        let l = b.loader.expect("through the loader");
        assert!(l.reset_hook.is_none());
        let cycle = b.power_cycle.expect("labgrid's power as the reset");
        assert!(cycle.starts_with("timeout 60 sh -c"), "{cycle}");
        let s = serial_board(&info, Some("cp \"$MEMFW_ELF\" /srv/tftp/t.elf")).expect("staged");
        assert!(s.loader.is_none());
        let cycle = s.power_cycle.expect("power-cycled into each test");
        assert!(cycle.starts_with("{ cp \"$MEMFW_ELF\""), "{cycle}");
    }
}
