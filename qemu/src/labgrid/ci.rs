//! The CI proof of `--labgrid`, inside `cargo qemu test`: a real
//! `labgrid-coordinator` and `labgrid-exporter` on this machine (localhost,
//! free ports, state and logs in `target/labgrid-ci/`), the exporter
//! offering a QEMU ZCU102 model's console as a `NetworkSerialPort` (raw TCP:
//! the model's `-chardev socket,host=127.0.0.1,port=N,server=on,wait=on`)
//! and a `NetworkPowerPort` of labgrid's `rest` model (a relay behind an
//! HTTP URL: GET reads `0`/`1`, PUT sets it), which this tool serves on
//! localhost: on starts the model on the resident loader, off kills it. A
//! place matches both (tagged `board=xlnx-zcu102`); then the same
//! [`super::with_place`] as `cargo qemu test --labgrid PLACE` acquires it
//! through the coordinator, brings it to loader ready (the real loader's
//! ready line), and runs the `boot` and `platform` suites through the
//! serial runner and the loader: each image uploaded over labgrid's
//! network serial port (skipped when the loader still holds it), each
//! test's firmware resetting the model back into the loader after its
//! EXIT. Everything is torn down afterwards.
//!
//! The ZCU102 because its model enters an ELF at EL2 as U-Boot hands over
//! on the real board, which is what the serial runner tells the tests.

use super::{venv, with_place, Lab};
use crate::error::{Error, Result};
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

fn spawn(cmd: &mut Command, log: &Path) -> Result<Daemon> {
    let f = std::fs::File::create(log).map_err(Error::io(&log))?;
    let f2 = f.try_clone().map_err(Error::io(&log))?;
    cmd.stdin(Stdio::null()).stdout(f).stderr(f2);
    crate::boot::dies_with_this_tool(cmd);
    cmd.spawn()
        .map(Daemon)
        .map_err(Error::spawn(format!("{:?}", cmd.get_program())))
}

fn free_port() -> Result<u16> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(Error::io("a free port on 127.0.0.1"))
}

/// The board model behind the power relay: on boots the resident loader
/// (as the board's boot firmware would), off kills it.
struct Model {
    /// QEMU on the loader, the console on the exporter's TCP port.
    command: Box<dyn Fn() -> Command + Send + Sync>,
    log: PathBuf,
    running: Mutex<Option<Child>>,
}

impl Model {
    fn set(&self, on: bool) -> Result<()> {
        let mut running = self
            .running
            .lock()
            .map_err(|_| Error::Missing("model lock poisoned".into()))?;
        if let Some(mut c) = running.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if !on {
            return Ok(());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(Error::io(&self.log))?;
        let mut cmd = (self.command)();
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        crate::boot::dies_with_this_tool(&mut cmd);
        *running = Some(cmd.spawn().map_err(Error::spawn(crate::setup::QEMU))?);
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
                    Err(e) => ("500 Internal Server Error", e.to_string()),
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

fn client(venv: &venv::Venv, coordinator: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(venv.bin("labgrid-client"))
        .args(["-x", coordinator])
        .args(args)
        .output()
        .map_err(Error::spawn("labgrid-client"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::Failed {
            command: format!("labgrid-client {}", args.join(" ")),
            status: out.status,
            output: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

fn wait_for<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let until = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(t) = f() {
            return Ok(t);
        }
        if Instant::now() > until {
            return Err(Error::Timeout {
                what: format!("{what} to come up"),
                secs,
                detail: String::new(),
            });
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
            .map_err(Error::spawn("python"))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() && text.trim() == "ok" {
            Ok(())
        } else {
            Err(Error::Check(text))
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

fn run_proof(filters: &[String]) -> Result<Tally> {
    let venv = venv::ensure()?;
    let dir = venv::target_dir().join("labgrid-ci");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(Error::io(&dir))?;

    // The model and its power relay.
    let serial_port = free_port()?;
    let model_machine = Machine {
        semihosting: false,
        console: Console::UnixSocket(PathBuf::from("@CONSOLE@")),
        ..Machine::board(BOARD, 2)
    };
    let dtb = crate::fdt::board_dtb(&model_machine, &dir)?;
    let loader = crate::cargo::build_loader(BOARD)?;
    let kernel = crate::loader_model::loader_kernel(BOARD, &loader)?;
    let chardev_unix = "socket,id=con,path=@CONSOLE@,server=on,wait=on";
    let chardev_tcp = format!("socket,id=con,host=127.0.0.1,port={serial_port},server=on,wait=on");
    let model = Arc::new(Model {
        command: Box::new(move || {
            let c = model_machine.command_with_dtb(&kernel, &[], None, None, &dtb);
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
        log: dir.join("model.log"),
        running: Mutex::new(None),
    });
    let power = TcpListener::bind("127.0.0.1:0").map_err(Error::io("the power relay's port"))?;
    let power_port = power
        .local_addr()
        .map_err(Error::io("the power relay's port"))?
        .port();
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
    .map_err(Error::io(&exporter_yaml))?;
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

    let lab = Lab {
        place,
        coordinator: Some(coordinator),
        ready: None,
        ready_timeout: 30.0,
        power_delay: 0.1,
        stage: None,
    };
    with_place(&lab, Some(BOARD), |board, serial| {
        crate::test::run_on_serial_board(board, &serial, filters, "labgrid::")
    })?
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
