//! `cargo qemu bench balloon`: a 2 GiB guest whose RAM was written once
//! (`balloon.touch`, so QEMU holds it resident), ballooned by 1 GiB and back
//! on `-cpu max` and `cortex-a53` under TCG. Timed on the host from the QMP
//! `balloon` command to `query-balloon` showing the target (polled every
//! 2 ms); QEMU's resident memory is read from /proc before and after.

use super::Record;
use crate::balloon::{qemu_rss_kib, wait_line};
use crate::boot::{boot, BootOptions};
use crate::error::{Error, OrMissing, Result};
use crate::log::{Decoder, LogLine};
use crate::machine::Machine;
use crate::qmp::{Qmp, SocketIo};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const GIB: u64 = 1 << 30;
const PAGES: u64 = GIB / 4096;

struct Run {
    inflate: Duration,
    deflate: Duration,
    rss_before: u64,
    rss_ballooned: u64,
}

/// How one move went, from `query-balloon` polled every 2 ms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// From the command to `actual` at the target.
    pub total: Duration,
    /// From the command to the first change of `actual`.
    pub first_move: Duration,
    /// The longest time `actual` stood still once it had moved.
    pub longest_stall: Duration,
}

/// The progress of a move from `(elapsed, actual)` samples, the first
/// taken when the command was sent and the last at the target.
pub fn progress(samples: &[(Duration, u64)]) -> Option<Progress> {
    let &(_, start) = samples.first()?;
    let &(total, _) = samples.last()?;
    let first = samples.iter().find(|s| s.1 != start).map_or(total, |s| s.0);
    let mut longest = Duration::ZERO;
    let mut since = first;
    let mut last = None;
    for &(t, a) in samples.iter().filter(|s| s.0 >= first) {
        if last != Some(a) {
            longest = longest.max(t.saturating_sub(since));
            since = t;
            last = Some(a);
        }
    }
    Some(Progress {
        total,
        first_move: first,
        longest_stall: longest,
    })
}

fn timed(q: &mut Qmp<SocketIo>, target: u64, who: &str) -> Result<Duration> {
    let before = q.query_balloon()?;
    let t0 = Instant::now();
    q.balloon(target)?;
    let mut samples = vec![(Duration::ZERO, before)];
    loop {
        let actual = q.query_balloon()?;
        samples.push((t0.elapsed(), actual));
        if actual == target {
            break;
        }
        if t0.elapsed() > Duration::from_secs(300) {
            return Err(Error::Timeout {
                what: format!("balloon to {} MiB to finish", target >> 20),
                secs: 300,
                detail: String::new(),
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let p = progress(&samples).or_missing("no samples")?;
    // Where the time went: a late start, stalls, or a steady pace.
    eprintln!(
        "bench balloon: {who} to {} MiB in {:.3} s: first movement after {:.0} ms, longest stall {:.0} ms, {} samples",
        target >> 20,
        p.total.as_secs_f64(),
        p.first_move.as_secs_f64() * 1e3,
        p.longest_stall.as_secs_f64() * 1e3,
        samples.len()
    );
    Ok(p.total)
}

fn drive(q: &mut Qmp<SocketIo>, path: &Path, seen: &Mutex<Vec<String>>) -> Result<Run> {
    wait_line(
        seen,
        0,
        |l| l.starts_with("balloon: up"),
        Duration::from_secs(300),
    )?;
    let rss_before = qemu_rss_kib(path).or_missing("no QEMU RSS")?;
    let inflate = timed(q, GIB, "ours")?;
    let rss_ballooned = qemu_rss_kib(path).or_missing("no QEMU RSS")?;
    let deflate = timed(q, 2 * GIB, "ours")?;
    Ok(Run {
        inflate,
        deflate,
        rss_before,
        rss_ballooned,
    })
}

fn one(cpu: &'static str, elf: &Path, decoder: &Decoder) -> Result<Run> {
    let m = Machine {
        cpu,
        mem: "2G",
        ..Machine::default()
    };
    let path = std::env::temp_dir().join(format!(
        "cargo-qemu-balloon-bench-{}-{cpu}.qmp",
        std::process::id()
    ));
    let seen = Mutex::new(Vec::<String>::new());
    let result = Mutex::new(None);
    let record = |l: &LogLine| {
        if let Ok(mut s) = seen.lock() {
            s.push(l.message.clone());
        }
        false
    };
    let driver = || {
        let r = match Qmp::connect(&path, Duration::from_secs(10)) {
            Ok(mut q) => {
                let r = drive(&mut q, &path, &seen);
                let _ = q.execute("quit", None);
                r
            }
            Err(e) => Err(e.into()),
        };
        if let Ok(mut slot) = result.lock() {
            *slot = Some(r);
        }
    };
    let opts = BootOptions {
        semihosting_args: vec![],
        append: Some("balloon.touch"),
        qmp: Some(&path),
        timeout: Duration::from_secs(600),
        echo: false,
        stop_when: Some(&record),
        on_started: Some(&driver),
        paused: false,
    };
    let b = boot(&m, elf, decoder, &opts);
    let _ = std::fs::remove_file(&path);
    let b = b?;
    result
        .into_inner()
        .ok()
        .flatten()
        .unwrap_or_else(|| Err(Error::Missing("the QMP driver did not finish".into())))
        .map_err(|e| e.with_log(b.transcript()))
}

/// Runs the benchmark on both CPUs; with `--peer linux` in `args`, Linux's
/// driver runs the same steps on the same CPUs right after ours.
pub fn run(elf: &Path, peer: bool) -> Result<Vec<Record>> {
    let decoder = Decoder::read(elf)?;
    // target/aarch64-unknown-none/<profile>/firmware-virt -> target/
    let target = elf
        .ancestors()
        .nth(3)
        .or_missing("no target directory")?
        .join("linux-peer");
    let linux = if peer {
        std::fs::create_dir_all(&target).map_err(Error::io(&target))?;
        Some(linux::prepare(&target)?)
    } else {
        None
    };
    let mut out = Vec::new();
    for cpu in ["max", "cortex-a53"] {
        let r = one(cpu, elf, &decoder)?;
        let p = match &linux {
            Some(l) => Some(linux::run_on(l, cpu, &target)?),
            None => None,
        };
        let mut note = format!(
            "-cpu {cpu}, 2 GiB guest, 1 GiB step ({PAGES} pages), RAM written first; \
             QEMU RSS {} -> {} MiB; chunks: {}",
            r.rss_before >> 10,
            r.rss_ballooned >> 10,
            if cpu == "max" {
                "2M/64K/4K"
            } else {
                "2M only (no FEAT_BBM level 2)"
            }
        );
        if let (Some(p), Some(l)) = (&p, &linux) {
            note.push_str(&format!(
                "; peer Linux {} virtio_balloon, QEMU RSS {} -> {} MiB",
                l.version,
                p.rss_before >> 10,
                p.rss_ballooned >> 10
            ));
        }
        let rate = |d: Duration| PAGES as f64 / d.as_secs_f64();
        let released = |r: &Run| {
            r.rss_before.saturating_sub(r.rss_ballooned) as f64 / 1024.0 / r.inflate.as_secs_f64()
        };
        let with = |rec: Record, v: Option<f64>| match v {
            Some(v) if v > 0.0 => rec.with_peer("linux", v, false),
            _ => rec,
        };
        out.push(
            with(
                Record::new(
                    "balloon",
                    format!("inflate_{cpu}"),
                    rate(r.inflate),
                    "pages/s",
                ),
                p.as_ref().map(|p| rate(p.inflate)),
            )
            .with_note(note.clone()),
        );
        out.push(
            with(
                Record::new(
                    "balloon",
                    format!("deflate_{cpu}"),
                    rate(r.deflate),
                    "pages/s",
                ),
                p.as_ref().map(|p| rate(p.deflate)),
            )
            .with_note(note.clone()),
        );
        out.push(
            with(
                Record::new(
                    "balloon",
                    format!("rss_released_{cpu}"),
                    released(&r),
                    "MiB/s",
                ),
                p.as_ref().map(released),
            )
            .with_note(note),
        );
    }
    Ok(out)
}

/// `--peer linux`: Linux's `virtio_balloon` doing the same steps on the
/// same QEMU, from Debian's arm64 kernel package and a busybox initramfs
/// the tool builds. Both are fetched with apt into a private state
/// directory under the target dir (an arm64 index of the suites the host
/// already uses, read from its apt sources) and unpacked with `dpkg-deb`;
/// nothing is installed system-wide.
pub mod linux {
    use super::*;
    use std::io::Read;
    use std::path::PathBuf;
    use std::process::{Command, Stdio};

    /// Kernel and initramfs to boot.
    pub struct Peer {
        /// `vmlinuz` (an arm64 Image).
        pub kernel: PathBuf,
        /// The initramfs (newc cpio).
        pub initrd: PathBuf,
        /// The kernel package's version string.
        pub version: String,
    }

    /// (URI, suite, keyring) of the host's Debian main archive, from its
    /// deb822 sources (the first entry whose suites include a release
    /// without a dash) or a one-line `sources.list`.
    pub fn host_archive(deb822: &str) -> Option<(String, String, Option<String>)> {
        for stanza in deb822.split("\n\n") {
            let field = |k: &str| {
                stanza
                    .lines()
                    .find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_string()))
            };
            let (Some(uris), Some(suites)) = (field("URIs:"), field("Suites:")) else {
                continue;
            };
            let Some(suite) = suites.split_whitespace().find(|s| !s.contains('-')) else {
                continue;
            };
            let uri = uris.split_whitespace().next()?.to_string();
            return Some((uri, suite.to_string(), field("Signed-By:")));
        }
        None
    }

    fn run(cmd: &mut Command) -> Result<String> {
        let out = cmd
            .output()
            .map_err(Error::spawn(format!("{:?}", cmd.get_program())))?;
        if !out.status.success() {
            return Err(Error::Failed {
                command: format!("{:?}", cmd.get_program()),
                status: out.status,
                output: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// One newc cpio entry.
    fn cpio_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
        let hdr = format!(
            "070701{ino:08X}{mode:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        out.extend_from_slice(hdr.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
        out.extend_from_slice(data);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    }

    /// A newc archive of `(name, mode, contents)` with the trailer.
    pub fn cpio(files: &[(&str, u32, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, (name, mode, data)) in files.iter().enumerate() {
            cpio_entry(&mut out, i as u32 + 1, name, *mode, data);
        }
        cpio_entry(&mut out, 0, "TRAILER!!!", 0, &[]);
        out
    }

    /// The peer's /init: modules in, RAM written once (as `balloon.touch`
    /// does for ours, so QEMU holds it resident), then idle.
    pub const INIT: &str = "#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox insmod /virtio_mmio.ko
/bin/busybox insmod /virtio_balloon.ko
/bin/busybox mount -t tmpfs -o size=1700m tmpfs /tmp
/bin/busybox dd if=/dev/zero of=/tmp/fill bs=1M count=1600 2>/dev/null
/bin/busybox rm /tmp/fill
echo peer: ready
while true; do /bin/busybox sleep 3600; done
";

    /// Fetches (once) and prepares the peer under `dir`.
    pub fn prepare(dir: &Path) -> Result<Peer> {
        let kernel = dir.join("vmlinuz");
        let initrd = dir.join("initrd.cpio");
        let version_file = dir.join("version");
        if kernel.exists() && initrd.exists() {
            let version = std::fs::read_to_string(&version_file).unwrap_or_default();
            return Ok(Peer {
                kernel,
                initrd,
                version,
            });
        }
        let apt = dir.join("apt");
        for d in [
            "state/lists/partial",
            "cache/archives/partial",
            "debs",
            "root",
        ] {
            std::fs::create_dir_all(apt.join(d)).map_err(Error::io(apt.join(d)))?;
        }
        let mut sources = String::new();
        if let Ok(rd) = std::fs::read_dir("/etc/apt/sources.list.d") {
            for e in rd.filter_map(Result::ok) {
                if e.path().extension().is_some_and(|x| x == "sources") {
                    sources.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
                    sources.push_str("\n\n");
                }
            }
        }
        let (uri, suite, key) =
            host_archive(&sources).or_missing("no Debian archive in /etc/apt/sources.list.d")?;
        let signed = key.map(|k| format!(" signed-by={k}")).unwrap_or_default();
        let list = apt.join("sources.list");
        std::fs::write(
            &list,
            format!("deb [arch=arm64{signed}] {uri} {suite} main\n"),
        )
        .map_err(Error::io(&list))?;
        let opts: Vec<String> = vec![
            format!("Dir::State={}", apt.join("state").display()),
            format!("Dir::Cache={}", apt.join("cache").display()),
            format!("Dir::Etc::SourceList={}", list.display()),
            "Dir::Etc::SourceParts=/dev/null".into(),
            "Dir::State::status=/dev/null".into(),
            "APT::Architecture=arm64".into(),
            "APT::Architectures=arm64".into(),
            "APT::Sandbox::User=root".into(),
        ];
        let apt_cmd = |tool: &str| {
            let mut c = Command::new(tool);
            for o in &opts {
                c.args(["-o", o]);
            }
            c
        };
        eprintln!("peer: fetching Debian's arm64 kernel and busybox-static with apt (once)");
        run(apt_cmd("apt-get").args(["-q", "update"]))?;
        let deps = run(apt_cmd("apt-cache").args(["depends", "linux-image-arm64"]))?;
        let image = deps
            .lines()
            .find_map(|l| l.trim().strip_prefix("Depends: linux-image-"))
            .map(|v| format!("linux-image-{v}"))
            .ok_or_else(|| {
                Error::Missing(format!("linux-image-arm64 depends on no kernel: {deps}"))
            })?;
        run(apt_cmd("apt-get").current_dir(apt.join("debs")).args([
            "-q",
            "download",
            &image,
            "busybox-static",
        ]))?;
        let root = apt.join("root");
        for e in std::fs::read_dir(apt.join("debs"))
            .map_err(Error::io(apt.join("debs")))?
            .filter_map(Result::ok)
        {
            run(Command::new("dpkg-deb").arg("-x").arg(e.path()).arg(&root))?;
        }
        let version = image.trim_start_matches("linux-image-").to_string();
        let boot = root.join("boot").join(format!("vmlinuz-{version}"));
        std::fs::copy(&boot, &kernel).map_err(Error::io(boot))?;
        let module = |m: &str| {
            let p = root
                .join("lib/modules")
                .join(&version)
                .join("kernel/drivers/virtio")
                .join(format!("{m}.ko"));
            std::fs::read(&p).map_err(Error::io(&p))
        };
        let busybox_path = root.join("bin/busybox");
        let busybox = std::fs::read(&busybox_path).map_err(Error::io(&busybox_path))?;
        let archive = cpio(&[
            ("bin", 0o040755, Vec::new()),
            ("bin/busybox", 0o100755, busybox),
            ("init", 0o100755, INIT.as_bytes().to_vec()),
            ("virtio_mmio.ko", 0o100644, module("virtio_mmio")?),
            ("virtio_balloon.ko", 0o100644, module("virtio_balloon")?),
        ]);
        std::fs::write(&initrd, archive).map_err(Error::io(&initrd))?;
        std::fs::write(&version_file, &version).map_err(Error::io(&version_file))?;
        Ok(Peer {
            kernel,
            initrd,
            version,
        })
    }

    /// Boots the peer on `cpu` with a 2 GiB guest and runs the same steps.
    pub(super) fn run_on(peer: &Peer, cpu: &str, dir: &Path) -> Result<Run> {
        let qmp = std::env::temp_dir().join(format!(
            "cargo-qemu-balloon-peer-{}-{cpu}.qmp",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&qmp);
        let console = dir.join(format!("console-{cpu}.log"));
        let mut child = Command::new(crate::setup::QEMU)
            .args(["-M", "virt", "-cpu", cpu, "-m", "2G", "-smp", "1"])
            .args([
                "-nodefaults",
                "-nic",
                "none",
                "-display",
                "none",
                "-monitor",
                "none",
            ])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .args(["-global", "virtio-mmio.force-legacy=false"])
            // As ours, without free page reporting: Linux would report
            // (and QEMU discard) the written RAM by itself before the step.
            .args(["-device", "virtio-balloon-device,deflate-on-oom=on"])
            .arg("-kernel")
            .arg(&peer.kernel)
            .arg("-initrd")
            .arg(&peer.initrd)
            .args(["-append", "console=ttyAMA0 rdinit=/init quiet"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(Error::spawn(crate::setup::QEMU))?;
        let result = (|| {
            let deadline = Instant::now() + Duration::from_secs(300);
            loop {
                let text = std::fs::read_to_string(&console).unwrap_or_default();
                if text.contains("peer: ready") {
                    break;
                }
                if let Ok(Some(st)) = child.try_wait() {
                    return Err(Error::Failed {
                        command: "the peer's QEMU".into(),
                        status: st,
                        output: text,
                    });
                }
                if Instant::now() >= deadline {
                    return Err(Error::Timeout {
                        what: "the peer to come up".into(),
                        secs: 300,
                        detail: text,
                    });
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let mut q = Qmp::connect(&qmp, Duration::from_secs(10))?;
            let rss_before = qemu_rss_kib(&qmp).or_missing("no peer QEMU RSS")?;
            let inflate = timed(&mut q, GIB, "linux")?;
            let rss_ballooned = qemu_rss_kib(&qmp).or_missing("no peer QEMU RSS")?;
            let deflate = timed(&mut q, 2 * GIB, "linux")?;
            let _ = q.execute("quit", None);
            Ok(Run {
                inflate,
                deflate,
                rss_before,
                rss_ballooned,
            })
        })();
        let _ = child.kill();
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        let _ = child.wait();
        let _ = std::fs::remove_file(&qmp);
        result.map_err(|e| e.with_log(err))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn progress_shows_a_late_start_and_stalls() {
            let ms = Duration::from_millis;
            let samples = [
                (ms(0), 0),
                (ms(2), 0),
                (ms(400), 0),
                (ms(402), 256),
                (ms(404), 512),
                (ms(604), 512),
                (ms(606), 768),
            ];
            let p = progress(&samples).unwrap();
            assert_eq!(p.total, ms(606));
            assert_eq!(p.first_move, ms(402));
            assert_eq!(p.longest_stall, ms(202));
            // A move that never started shows all its time before the first movement.
            let p = progress(&[(ms(0), 5), (ms(9), 5)]).unwrap();
            assert_eq!((p.first_move, p.longest_stall), (ms(9), ms(0)));
            assert_eq!(progress(&[]), None);
        }

        #[test]
        fn the_host_archive_comes_from_deb822() {
            let s = "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /k.gpg\n\nTypes: deb\nURIs: http://sec.example\nSuites: bookworm-security\n";
            assert_eq!(
                host_archive(s),
                Some((
                    "http://mirror.example/debian".into(),
                    "bookworm".into(),
                    Some("/k.gpg".into())
                ))
            );
            assert_eq!(host_archive("Suites: x-y\nURIs: a\n"), None);
        }

        #[test]
        fn cpio_is_newc_with_a_trailer() {
            let a = cpio(&[("init", 0o100755, b"#!x".to_vec())]);
            assert!(a.starts_with(b"070701"));
            assert_eq!(a.len() % 4, 0);
            let s = String::from_utf8_lossy(&a);
            assert!(s.contains("init\0") && s.contains("TRAILER!!!\0") && s.contains("#!x"));
            // Header: 6 + 13 * 8 bytes, name "init\0" padded to 4.
            assert_eq!(&a[110..115], b"init\0");
        }
    }
}
