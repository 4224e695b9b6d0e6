//! The CI proof of `--labgrid`, inside `cargo qemu test`: a real
//! `labgrid-coordinator` and `labgrid-exporter` on this machine (localhost,
//! free ports, state and logs in `target/labgrid-ci/`), the exporter
//! offering a QEMU ZCU102 model's console as a `NetworkSerialPort` (raw TCP:
//! the model's `-chardev socket,host=127.0.0.1,port=N,server=on,wait=on`)
//! and a `NetworkPowerPort` of labgrid's `rest` model (a relay behind an
//! HTTP URL: GET reads `0`/`1`, PUT sets it), which this tool serves on
//! localhost: on starts the model, off kills it. A place matches both
//! (tagged `board=xlnx-zcu102`); then the same [`super::with_place`] as
//! `cargo qemu test --labgrid PLACE` acquires it through the coordinator,
//! brings it to loader ready (the model's first boot is a stand-in that
//! prints the loader's ready line: the resident loader is not in this tree
//! yet), and runs the `boot` and `platform` suites through the serial runner,
//! each test staged (its ELF noted where the "board" boots it from) and
//! power-cycled through labgrid. Everything is torn down afterwards.
//!
//! The ZCU102 because its model enters an ELF at EL2 as U-Boot hands over
//! on the real board, which is what the serial runner tells the tests.

use super::{venv, with_place, Lab};
use crate::machine::{Console, Machine};
use crate::test::Tally;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The board model the proof runs on.
pub const BOARD: &str = "xlnx-zcu102";
/// Its suites.
const SUITES: &[&str] = &["boot::", "platform::"];

/// The filters the proof's run takes from the user's: all its suites when
/// there are none or one names `labgrid` (or a prefix of it); a filter
/// that selects inside a suite (`boot::runs_at_el1`, `labgrid::platform::`)
/// as it is; empty: the proof does not run.
pub fn proof_filters(user: &[String]) -> Vec<String> {
    if user.is_empty() {
        return SUITES.iter().map(|s| s.to_string()).collect();
    }
    let mut out = Vec::new();
    for f in user {
        let inner = f.strip_prefix("labgrid::");
        let g = inner.unwrap_or(f);
        let all = inner == Some("") || (inner.is_none() && "labgrid::".starts_with(g));
        if all || (inner.is_none() && f.contains("labgrid")) {
            return SUITES.iter().map(|s| s.to_string()).collect();
        }
        let in_suite = SUITES
            .iter()
            .any(|s| g.starts_with(s) || (inner.is_some() && s.starts_with(g)));
        if in_suite && !out.contains(&g.to_string()) {
            out.push(g.to_string());
        }
    }
    out
}

/// A raw AArch64 program that writes `line` to `board`'s console UART and
/// waits: the stand-in for the resident loader's ready banner. Position
/// independent; QEMU starts it wherever `-kernel` puts a raw image.
pub fn standin_loader(board: &str, line: &str) -> Option<Vec<u8>> {
    // (UART base, init register offset, init value, TX register offset)
    let (base, init_off, init_val, tx_off): (u64, u32, u32, u32) = match board {
        // Cadence UART: CR = TX_EN | RX_EN, then the TX/RX FIFO.
        "xlnx-zcu102" => (0xFF00_0000, 0x0, 0x14, 0x30),
        // Mini-UART: IER = 0, then AUX_MU_IO.
        "raspi3b" => (0x3F21_5040, 0x4, 0x0, 0x0),
        _ => return None,
    };
    let words: [u32; 10] = [
        0x5800_0141,                                         // ldr  x1, base (pc + 40)
        0x5280_0000 | (init_val << 5) | 4,                   // movz w4, #init_val
        0xB900_0000 | ((init_off / 4) << 10) | (1 << 5) | 4, // str w4, [x1, #init_off]
        0x1000_0122,                                         // adr  x2, line (pc + 36)
        0x3840_1443,                                         // 1: ldrb w3, [x2], #1
        0x3400_0063,                                         // cbz  w3, 2f
        0xB900_0000 | ((tx_off / 4) << 10) | (1 << 5) | 3,   // str w3, [x1, #tx_off]
        0x17FF_FFFD,                                         // b    1b
        0xD503_205F,                                         // 2: wfe
        0x17FF_FFFF,                                         // b    2b
    ];
    let mut out: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    out.extend_from_slice(&base.to_le_bytes());
    out.extend_from_slice(line.as_bytes());
    out.extend_from_slice(b"\r\n\0");
    Some(out)
}

/// One HTTP request: method, path, body.
pub fn parse_request(buf: &[u8]) -> Option<(String, String, Vec<u8>)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split_whitespace();
    let method = first.next()?.to_string();
    let path = first.next()?.to_string();
    let len: usize = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.trim().parse().ok())
        .unwrap_or(Some(0))?;
    let body = buf.get(end + 4..end + 4 + len)?.to_vec();
    Some((method, path, body))
}

fn kill_on_parent_death(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and only affects
    // the child: if this tool dies, the kernel ends the child too.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A background process of the proof, ended (SIGTERM, then SIGKILL) when
/// dropped.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = self.0.id() as i32;
        // SAFETY: kill(2) on the pid of our own child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(cmd: &mut Command, log: &Path) -> Result<Daemon, String> {
    let f = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let f2 = f.try_clone().map_err(|e| e.to_string())?;
    cmd.stdin(Stdio::null()).stdout(f).stderr(f2);
    kill_on_parent_death(cmd);
    cmd.spawn()
        .map(Daemon)
        .map_err(|e| format!("{:?}: {e}", cmd.get_program()))
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// The board model behind the power relay.
struct Model {
    /// The command for a kernel (the stand-in or a staged test ELF).
    command: Box<dyn Fn(&Path) -> Command + Send + Sync>,
    standin: PathBuf,
    /// Where the stage command notes the test ELF.
    stage_file: PathBuf,
    log: PathBuf,
    running: Mutex<Option<Child>>,
}

impl Model {
    fn set(&self, on: bool) -> Result<(), String> {
        let mut running = self.running.lock().map_err(|_| "model lock poisoned")?;
        if let Some(mut c) = running.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if !on {
            return Ok(());
        }
        let staged = std::fs::read_to_string(&self.stage_file).unwrap_or_default();
        let kernel = match staged.trim() {
            "" => self.standin.clone(),
            p => PathBuf::from(p),
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("{}: {e}", self.log.display()))?;
        let mut cmd = (self.command)(&kernel);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        kill_on_parent_death(&mut cmd);
        *running = Some(cmd.spawn().map_err(|e| format!("qemu: {e}"))?);
        Ok(())
    }

    fn is_on(&self) -> bool {
        self.running
            .lock()
            .map(|mut r| r.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None))))
            .unwrap_or(false)
    }
}

/// labgrid's `rest` power backend, served for the model: `GET /power/0`
/// answers `0` or `1`, `PUT /power/0` with `0` or `1` switches it.
fn serve_power(listener: TcpListener, model: Arc<Model>, stop: Arc<AtomicBool>) {
    for conn in listener.incoming() {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let Ok(mut conn) = conn else { continue };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        let req = loop {
            if let Some(r) = parse_request(&buf) {
                break Some(r);
            }
            match conn.read(&mut chunk) {
                Ok(0) | Err(_) => break None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let (status, body) = match req {
            Some((m, p, _)) if m == "GET" && p == "/power/0" => {
                ("200 OK", if model.is_on() { "1" } else { "0" }.to_string())
            }
            Some((m, p, b)) if m == "PUT" && p == "/power/0" => {
                match model.set(b.trim_ascii() == b"1") {
                    Ok(()) => ("200 OK", String::new()),
                    Err(e) => ("500 Internal Server Error", e),
                }
            }
            Some(_) => ("404 Not Found", String::new()),
            None => ("400 Bad Request", String::new()),
        };
        let _ = write!(
            conn,
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
}

fn client(venv: &venv::Venv, coordinator: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(venv.bin("labgrid-client"))
        .args(["-x", coordinator])
        .args(args)
        .output()
        .map_err(|e| format!("labgrid-client: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "labgrid-client {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn wait_for<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> Result<T, String> {
    let until = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(t) = f() {
            return Ok(t);
        }
        if Instant::now() > until {
            return Err(format!("{what} not up after {secs} s"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs the proof; setup trouble counts as one failure.
pub fn proof(user_filters: &[String]) -> Tally {
    let filters = proof_filters(user_filters);
    if filters.is_empty() {
        return Tally::default();
    }
    println!("== labgrid: coordinator, exporter and a place for the {BOARD} model on localhost");
    let start = Instant::now();
    let mut tally = Tally::default();
    if matches_any(user_filters, BRIDGE_TEST) {
        tally = sum(tally, bridge_test());
    }
    let result = run_proof(&filters);
    println!("labgrid: proof took {:.1}s", start.elapsed().as_secs_f64());
    match result {
        Ok(t) => tally = sum(tally, t),
        Err(e) => {
            println!("labgrid proof: {e}");
            tally.failed += 1;
        }
    }
    tally
}

fn sum(a: Tally, b: Tally) -> Tally {
    Tally {
        passed: a.passed + b.passed,
        failed: a.failed + b.failed,
        skipped: a.skipped + b.skipped,
    }
}

const BRIDGE_TEST: &str = "labgrid::rfc2217_bridge_is_transparent";

fn matches_any(filters: &[String], name: &str) -> bool {
    filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()))
}

/// The agent's RFC 2217 bridge (`lab/check_rfc2217_bridge.py`) passes
/// every byte value both ways.
fn bridge_test() -> Tally {
    let start = Instant::now();
    let verdict = venv::ensure().and_then(|v| {
        let out = Command::new(v.bin("python"))
            .arg(v.lab_dir().join("check_rfc2217_bridge.py"))
            .output()
            .map_err(|e| format!("python: {e}"))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() && text.trim() == "ok" {
            Ok(())
        } else {
            Err(text)
        }
    });
    match verdict {
        Ok(()) => {
            println!(
                "test {BRIDGE_TEST} ... ok ({:.1}s)",
                start.elapsed().as_secs_f64()
            );
            Tally {
                passed: 1,
                ..Tally::default()
            }
        }
        Err(e) => {
            println!("test {BRIDGE_TEST} ... FAILED\n{e}");
            Tally {
                failed: 1,
                ..Tally::default()
            }
        }
    }
}

fn run_proof(filters: &[String]) -> Result<Tally, String> {
    let venv = venv::ensure()?;
    let dir = venv::target_dir().join("labgrid-ci");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;

    // The model and its power relay.
    let serial_port = free_port()?;
    let model_machine = Machine {
        semihosting: false,
        console: Console::UnixSocket(PathBuf::from("@CONSOLE@")),
        ..Machine::board(BOARD, 2)
    };
    let dtb = crate::fdt::board_dtb(&model_machine, &dir)?;
    let standin = dir.join("standin-loader.bin");
    let banner = format!("memfw-loader ci-standin board={BOARD} ready");
    let code = standin_loader(BOARD, &banner).ok_or("no stand-in for this board")?;
    std::fs::write(&standin, code).map_err(|e| format!("{}: {e}", standin.display()))?;
    let chardev_unix = "socket,id=con,path=@CONSOLE@,server=on,wait=on";
    let chardev_tcp = format!("socket,id=con,host=127.0.0.1,port={serial_port},server=on,wait=on");
    let model = Arc::new(Model {
        command: Box::new(move |kernel: &Path| {
            let c = model_machine.command_with_dtb(kernel, &[], None, None, &dtb);
            let mut out = Command::new(c.get_program());
            for a in c.get_args() {
                if a == chardev_unix {
                    out.arg(&chardev_tcp);
                } else {
                    out.arg(a);
                }
            }
            out
        }),
        standin,
        stage_file: dir.join("staged-elf"),
        log: dir.join("model.log"),
        running: Mutex::new(None),
    });
    let power = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("power relay: {e}"))?;
    let power_port = power.local_addr().map_err(|e| e.to_string())?.port();
    let stop = Arc::new(AtomicBool::new(false));
    let relay = {
        let (model, stop) = (model.clone(), stop.clone());
        std::thread::spawn(move || serve_power(power, model, stop))
    };
    let _relay_stop = Defer(Some(move || {
        stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", power_port));
        let _ = relay.join();
    }));
    let _model_off = Defer(Some({
        let model = model.clone();
        move || {
            let _ = model.set(false);
        }
    }));

    // Coordinator and exporter.
    let coordinator = format!("127.0.0.1:{}", free_port()?);
    let _coord = spawn(
        Command::new(venv.bin("labgrid-coordinator"))
            .args(["-l", &coordinator])
            .current_dir(&dir),
        &dir.join("coordinator.log"),
    )?;
    wait_for("labgrid-coordinator", 30, || {
        TcpStream::connect(&coordinator).ok()
    })?;
    let group = format!("memfw-ci-{BOARD}");
    let exporter_yaml = dir.join("exporter.yaml");
    std::fs::write(
        &exporter_yaml,
        format!(
            "{group}:\n  NetworkSerialPort:\n    host: 127.0.0.1\n    port: {serial_port}\n    \
             speed: 115200\n    protocol: raw\n  NetworkPowerPort:\n    model: rest\n    \
             host: 'http://127.0.0.1:{power_port}/power/{{index}}'\n    index: 0\n"
        ),
    )
    .map_err(|e| format!("{}: {e}", exporter_yaml.display()))?;
    let exporter = format!("memfw-ci-{}", std::process::id());
    let _exp = spawn(
        Command::new(venv.bin("labgrid-exporter"))
            .args([
                "-c",
                &coordinator,
                "-n",
                &exporter,
                "--hostname",
                "127.0.0.1",
            ])
            .arg(&exporter_yaml)
            .current_dir(&dir),
        &dir.join("exporter.log"),
    )?;
    let place = format!("memfw-ci-{}", std::process::id());
    client(&venv, &coordinator, &["-p", &place, "create"])?;
    client(
        &venv,
        &coordinator,
        &["-p", &place, "add-match", &format!("{exporter}/{group}/*")],
    )?;
    client(
        &venv,
        &coordinator,
        &["-p", &place, "set-tags", &format!("board={BOARD}")],
    )?;
    wait_for("the exporter's resources", 30, || {
        client(&venv, &coordinator, &["resources"])
            .ok()
            .filter(|r| r.contains(&group))
    })?;

    let stage_file = dir.join("staged-elf");
    let lab = Lab {
        place,
        coordinator: Some(coordinator),
        ready: None,
        ready_timeout: 30.0,
        power_delay: 0.1,
        stage: Some(format!(
            "printf '%s' \"$MEMFW_ELF\" > {}",
            super::sh_quote(&stage_file.to_string_lossy())
        )),
    };
    with_place(&lab, Some(BOARD), |board, serial| {
        crate::test::run_on_serial_board(board, &serial, filters, "labgrid::")
    })?
    .map_err(|e| e.to_string())
}

/// Runs a closure when dropped.
struct Defer<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> Drop for Defer<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn filters_select_the_proof() {
        assert_eq!(proof_filters(&[]), f(&["boot::", "platform::"]));
        assert_eq!(
            proof_filters(&f(&["labgrid"])),
            f(&["boot::", "platform::"])
        );
        assert_eq!(
            proof_filters(&f(&["labgrid::"])),
            f(&["boot::", "platform::"])
        );
        assert_eq!(proof_filters(&f(&["lab"])), f(&["boot::", "platform::"]));
        assert_eq!(proof_filters(&f(&["labgrid::boot"])), f(&["boot"]));
        assert_eq!(
            proof_filters(&f(&["boot::runs_at_el1", "mmu::"])),
            f(&["boot::runs_at_el1"])
        );
        assert!(proof_filters(&f(&["mmu::", "system::"])).is_empty());
        assert!(proof_filters(&f(&["memdesc"])).is_empty());
    }

    #[test]
    fn standin_prints_the_loader_line() {
        let line = "memfw-loader ci-standin board=xlnx-zcu102 ready";
        let code = standin_loader("xlnx-zcu102", line).expect("zcu102");
        // ldr x1, [pc + 40] reads the UART base at offset 40, 8-aligned;
        // adr x2, pc + 36 at offset 12 points at the line at 48.
        assert_eq!(&code[40..48], &0xFF00_0000u64.to_le_bytes());
        assert_eq!(&code[48..48 + line.len()], line.as_bytes());
        assert_eq!(code.last(), Some(&0));
        let ready = regex_like(line);
        assert!(ready, "matches memfw-loader \\S+ board=\\S+ ready");
        assert!(standin_loader("raspi3b", line).is_some());
        assert!(standin_loader("virt", line).is_none());
    }

    /// `memfw-loader \S+ board=\S+ ready` without a regex crate.
    fn regex_like(line: &str) -> bool {
        let w: Vec<&str> = line.split(' ').collect();
        w.len() == 4 && w[0] == "memfw-loader" && w[2].starts_with("board=") && w[3] == "ready"
    }

    #[test]
    fn http_requests() {
        let put = b"PUT /power/0 HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n1";
        assert_eq!(
            parse_request(put),
            Some(("PUT".into(), "/power/0".into(), b"1".to_vec()))
        );
        let get = b"GET /power/0 HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(
            parse_request(get),
            Some(("GET".into(), "/power/0".into(), vec![]))
        );
        // Not complete yet: the body or the head is still coming.
        assert_eq!(parse_request(&put[..put.len() - 1]), None);
        assert_eq!(parse_request(b"GET /power/0 HTTP/1.1\r\n"), None);
    }
}
