//! The host's side of the resident loader (`hal::loader_proto`): wait for
//! its HELLO (resetting a firmware still sitting after its EXIT), ask
//! whether the test image is already there, upload what is missing
//! (segment by segment, each chunk acknowledged, resent on a NAK or a
//! timeout), and RUN it; the console then carries the test as before.

use crate::error::{Error, Result};
use hal::loader_proto::{self as proto, kind, Hello, LoadError, Request};
use hal::semihost_console as sh;
use object::{Object, ObjectSegment};
use std::io::{Read, Write};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One loadable segment of a test image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// Physical address.
    pub addr: u64,
    /// Bytes to send.
    pub data: Vec<u8>,
    /// Bytes in memory (the rest zero).
    pub memsz: u64,
}

/// A test image as the loader takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Entry address.
    pub entry: u64,
    /// Loadable segments.
    pub segments: Vec<Segment>,
    /// FNV-1a over entry and segments.
    pub hash: u64,
}

fn fnv(h: &mut u64, bytes: &[u8]) {
    for &b in bytes {
        *h ^= u64::from(b);
        *h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
}

impl Image {
    /// The PT_LOAD segments and entry of an ELF.
    pub fn from_elf(elf: &[u8]) -> Result<Self> {
        let elf_error = |detail: String| Error::Parse {
            what: "ELF",
            detail,
        };
        let file = object::File::parse(elf).map_err(|e| elf_error(e.to_string()))?;
        let mut segments = Vec::new();
        for seg in file.segments() {
            let data = seg.data().map_err(|e| elf_error(e.to_string()))?;
            if seg.size() == 0 {
                continue;
            }
            segments.push(Segment {
                addr: seg.address(),
                data: data.to_vec(),
                memsz: seg.size().max(data.len() as u64),
            });
        }
        if segments.is_empty() || segments.len() > proto::MAX_SEGMENTS {
            return Err(elf_error(format!(
                "{} loadable segments (1 to {} can be loaded)",
                segments.len(),
                proto::MAX_SEGMENTS
            )));
        }
        let entry = file.entry();
        let mut hash = 0xcbf2_9ce4_8422_2325u64;
        fnv(&mut hash, &entry.to_le_bytes());
        for s in &segments {
            fnv(&mut hash, &s.addr.to_le_bytes());
            fnv(&mut hash, &s.memsz.to_le_bytes());
            fnv(&mut hash, &(s.data.len() as u64).to_le_bytes());
            fnv(&mut hash, &s.data);
        }
        Ok(Self {
            entry,
            segments,
            hash,
        })
    }
}

/// The board's bytes, read on a thread of their own so the loader's
/// exchange can wait with a timeout; afterwards the same stream is the
/// console session's reader (`Read`), nothing lost in between.
pub struct ByteStream {
    rx: mpsc::Receiver<Vec<u8>>,
    pending: Vec<u8>,
    at: usize,
}

impl ByteStream {
    /// Starts reading `inner` until it ends.
    pub fn spawn(mut inner: Box<dyn Read + Send>) -> Self {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match inner.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if tx.send(buf[..n].to_vec()).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Self {
            rx,
            pending: Vec::new(),
            at: 0,
        }
    }

    /// The next byte, waiting until `deadline`; `None` on timeout or end.
    fn byte(&mut self, deadline: Instant) -> Option<u8> {
        while self.at >= self.pending.len() {
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            match self.rx.recv_timeout(deadline - now) {
                Ok(v) => {
                    self.pending = v;
                    self.at = 0;
                }
                Err(_) => return None,
            }
        }
        let b = self.pending[self.at];
        self.at += 1;
        Some(b)
    }
}

impl Read for ByteStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.at >= self.pending.len() {
            match self.rx.recv() {
                Ok(v) => {
                    self.pending = v;
                    self.at = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.pending.len() - self.at);
        buf[..n].copy_from_slice(&self.pending[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// A writer shared by the loader exchange, the console session and the
/// reset after EXIT.
#[derive(Clone)]
pub struct SharedWriter(Arc<Mutex<Box<dyn Write + Send>>>);

impl SharedWriter {
    /// Wraps `w`.
    pub fn new(w: Box<dyn Write + Send>) -> Self {
        Self(Arc::new(Mutex::new(w)))
    }
}

impl Write for SharedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut w = self
            .0
            .lock()
            .map_err(|_| std::io::Error::other("writer poisoned"))?;
        w.write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("writer poisoned"))?
            .flush()
    }
}

/// Test-only damage to frames on the wire: flips a byte in every
/// `every`-th frame the host sends (the CI proof that a transfer recovers).
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// Corrupt one frame in this many (0: none).
    pub corrupt_every: u32,
    /// Give up (as a host that vanishes) after this many DATA frames, in
    /// the middle of the next one (0: never).
    pub vanish_after_data: u32,
}

/// What an exchange did, for the log and the tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// The loader's HELLO.
    pub board: String,
    /// QUERY said every segment was there: nothing uploaded.
    pub skipped: bool,
    /// Segments uploaded.
    pub segments_sent: usize,
    /// Segment bytes uploaded.
    pub bytes_sent: u64,
    /// Frames resent (after a NAK or a timeout).
    pub resends: u32,
    /// NAKs for corrupt frames.
    pub corrupt_naks: u32,
    /// Frames the host damaged on purpose (`Faults`).
    pub corrupted: u32,
    /// Time from the first byte sent to RUN acknowledged.
    pub elapsed: Duration,
}

impl Stats {
    /// One line for the log.
    pub fn summary(&self) -> String {
        if self.skipped {
            format!(
                "loader on {}: image already here, upload skipped",
                self.board
            )
        } else {
            format!(
                "loader on {}: uploaded {} segment(s), {} bytes in {:.2}s ({} resent, {} corrupt frames refused)",
                self.board,
                self.segments_sent,
                self.bytes_sent,
                self.elapsed.as_secs_f64(),
                self.resends,
                self.corrupt_naks
            )
        }
    }
}

/// How long one request waits for its reply before it is resent.
const REPLY_WAIT: Duration = Duration::from_secs(2);
/// How often a request is sent before the exchange fails.
const ATTEMPTS: u32 = 10;
/// How often a segment is resent after the loader refused it whole.
const SEGMENT_ATTEMPTS: u32 = 4;

/// A reply from the loader.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    Ack,
    Have(proto::Have),
    Nak(LoadError),
}

/// The exchange with the loader over one console connection.
pub struct Client<'a> {
    rx: &'a mut ByteStream,
    tx: SharedWriter,
    loader_rx: sh::Receiver,
    firmware_rx: sh::Receiver,
    seq: u8,
    faults: Faults,
    frames_sent: u32,
    data_sent: u32,
    /// How long a request waits for its reply before it is resent.
    pub reply_wait: Duration,
    /// What happened.
    pub stats: Stats,
}

impl<'a> Client<'a> {
    /// A client on `rx`/`tx`.
    pub fn new(rx: &'a mut ByteStream, tx: SharedWriter, faults: Faults) -> Self {
        Self {
            rx,
            tx,
            loader_rx: proto::receiver(),
            firmware_rx: sh::Receiver::new(),
            seq: 0,
            faults,
            frames_sent: 0,
            data_sent: 0,
            reply_wait: REPLY_WAIT,
            stats: Stats::default(),
        }
    }

    fn send_frame(&mut self, k: u8, seq: u8, payload: &[u8]) -> Result<()> {
        let mut bytes = Vec::new();
        proto::encode(k, seq, payload, |b| bytes.push(b));
        self.frames_sent += 1;
        let every = self.faults.corrupt_every;
        if every > 0 && self.frames_sent.is_multiple_of(every) {
            // Flip a bit in the middle of the body: the loader must refuse it.
            let at = bytes.len() / 2;
            bytes[at] ^= 0x20;
            if bytes[at] == 0 {
                bytes[at] = 0x5a;
            }
            self.stats.corrupted += 1;
        }
        if k == kind::DATA && self.faults.vanish_after_data > 0 {
            if self.data_sent == self.faults.vanish_after_data {
                // Half a frame, then gone.
                let half = bytes.len() / 2;
                let _ = self.tx.write_all(&bytes[..half]);
                let _ = self.tx.flush();
                return Err(Error::FaultInjected("host vanished mid-transfer"));
            }
            self.data_sent += 1;
        }
        self.tx
            .write_all(&bytes)
            .and_then(|()| self.tx.flush())
            .map_err(Error::io("console write"))
    }

    /// Asks a firmware that finished (it repeats its EXIT) to reset.
    pub fn send_reset(tx: &mut SharedWriter) {
        let mut bytes = Vec::new();
        sh::encode(sh::kind::RESET, 0, &[], |b| bytes.push(b));
        let _ = tx.write_all(&bytes).and_then(|()| tx.flush());
    }

    /// Waits for the loader's HELLO until `deadline`. A firmware that is
    /// still running its last test's EXIT is asked to reset.
    pub fn wait_hello(&mut self, deadline: Instant) -> Result<Hello> {
        while let Some(b) = self.rx.byte(deadline) {
            if let Some(Ok(m)) = self.firmware_rx.push(b) {
                if m.kind == sh::kind::EXIT {
                    Self::send_reset(&mut self.tx);
                }
            }
            if let Some(Ok(m)) = self.loader_rx.push(b) {
                if m.kind == kind::HELLO {
                    let h = Hello::decode(m.payload)
                        .ok_or_else(|| Error::protocol("loader", "malformed HELLO"))?;
                    if h.version != proto::VERSION {
                        return Err(Error::protocol(
                            "loader",
                            format!(
                                "speaks protocol version {}, this tool {}",
                                h.version,
                                proto::VERSION
                            ),
                        ));
                    }
                    self.stats.board = String::from_utf8_lossy(h.name()).into_owned();
                    return Ok(h);
                }
            }
        }
        Err(Error::protocol("loader", "no HELLO"))
    }

    /// One request, resent until its reply comes (or the attempts run out).
    fn request(&mut self, req: Request<'_>) -> Result<Reply> {
        self.seq = self.seq.wrapping_add(1);
        if self.seq == proto::SEQ_UNKNOWN {
            self.seq = 0;
        }
        let seq = self.seq;
        let (k, payload) = req.encode();
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                self.stats.resends += 1;
            }
            self.send_frame(k, seq, payload.bytes())?;
            let deadline = Instant::now() + self.reply_wait;
            let reply = loop {
                let Some(b) = self.rx.byte(deadline) else {
                    break None;
                };
                // RUN's ACK lost: the image already speaks (its first
                // GET_CMDLINE, which it repeats every second).
                if let (Request::Run { .. }, Some(Ok(_))) = (req, self.firmware_rx.push(b)) {
                    break Some(Reply::Ack);
                }
                let Some(r) = self.loader_rx.push(b) else {
                    continue;
                };
                let Ok(m) = r else { continue };
                let nak = |p: &[u8]| proto::decode_nak(p).map(Reply::Nak);
                match (m.kind, m.seq) {
                    (kind::NAK, proto::SEQ_UNKNOWN) => {
                        if let Some(Reply::Nak(LoadError::Corrupt)) = nak(m.payload) {
                            self.stats.corrupt_naks += 1;
                            break None;
                        }
                    }
                    (_, s) if s != seq => {}
                    (kind::ACK, _) => break Some(Reply::Ack),
                    (kind::HAVE, _) => {
                        break proto::Have::decode(m.payload).map(Reply::Have);
                    }
                    (kind::NAK, _) => match nak(m.payload) {
                        Some(Reply::Nak(LoadError::Corrupt)) => {
                            self.stats.corrupt_naks += 1;
                            break None;
                        }
                        other => break other,
                    },
                    _ => {}
                }
            };
            if let Some(r) = reply {
                return Ok(r);
            }
        }
        Err(Error::protocol(
            "loader",
            format!("no reply to {req:?} after {ATTEMPTS} attempts"),
        ))
    }

    fn expect_ack(&mut self, req: Request<'_>) -> Result<Result<(), LoadError>> {
        match self.request(req)? {
            Reply::Ack => Ok(Ok(())),
            Reply::Nak(e) => Ok(Err(e)),
            Reply::Have(_) => Err(Error::protocol(
                "loader",
                format!("HAVE in answer to {req:?}"),
            )),
        }
    }

    fn upload_segment(&mut self, index: u8, s: &Segment) -> Result<()> {
        let crc = sh::crc32(&s.data);
        let mut last = None;
        for _ in 0..SEGMENT_ATTEMPTS {
            let seg = Request::Segment {
                index,
                addr: s.addr,
                filesz: s.data.len() as u64,
                memsz: s.memsz,
                crc,
            };
            // A refused place is final: the image does not fit this board.
            if let Err(e) = self.expect_ack(seg)? {
                return Err(Error::protocol(
                    "loader",
                    format!("refused segment {index} at {:#x}: {e:?}", s.addr),
                ));
            }
            let mut refused = None;
            for (i, chunk) in s.data.chunks(proto::CHUNK).enumerate() {
                let offset = (i * proto::CHUNK) as u64;
                if let Err(e) = self.expect_ack(Request::Data {
                    offset,
                    bytes: chunk,
                })? {
                    refused = Some(e);
                    break;
                }
            }
            let verdict = match refused {
                Some(e) => Err(e),
                None => self.expect_ack(Request::End)?,
            };
            match verdict {
                Ok(()) => {
                    self.stats.segments_sent += 1;
                    self.stats.bytes_sent += s.data.len() as u64;
                    return Ok(());
                }
                Err(
                    e @ (LoadError::Short { .. }
                    | LoadError::BadChecksum { .. }
                    | LoadError::OutOfOrder { .. }),
                ) => {
                    self.stats.resends += 1;
                    last = Some(e);
                }
                Err(e) => {
                    return Err(Error::protocol(
                        "loader",
                        format!("refused segment {index}: {e:?}"),
                    ))
                }
            }
        }
        Err(Error::protocol(
            "loader",
            format!("segment {index} at {:#x} never loaded: {last:?}", s.addr),
        ))
    }

    /// QUERY, then the missing segments, then RUN.
    pub fn load_and_run(&mut self, image: &Image) -> Result<()> {
        let start = Instant::now();
        let have = match self.request(Request::Query { image: image.hash })? {
            Reply::Have(h) => h,
            other => {
                return Err(Error::protocol(
                    "loader",
                    format!("QUERY answered with {other:?}"),
                ))
            }
        };
        let count = image.segments.len() as u8;
        let same = have.same_image && have.count == count;
        if same && have.complete() {
            self.stats.skipped = true;
        } else {
            if let Err(e) = self.expect_ack(Request::Begin {
                image: image.hash,
                count,
            })? {
                return Err(Error::protocol("loader", format!("BEGIN refused: {e:?}")));
            }
            for (i, s) in image.segments.iter().enumerate() {
                if same && have.intact & (1 << i) != 0 {
                    continue;
                }
                self.upload_segment(i as u8, s)?;
            }
        }
        let run = Request::Run {
            entry: image.entry,
            x0: None,
            x: [0; 3],
        };
        if let Err(e) = self.expect_ack(run)? {
            return Err(Error::protocol("loader", format!("RUN refused: {e:?}")));
        }
        self.stats.elapsed = start.elapsed();
        Ok(())
    }
}

/// What resets a board when its loader does not answer: `--power-cycle`,
/// or (the CI proof) the QEMU model's own reset.
#[derive(Clone)]
pub struct ResetHook(pub Arc<dyn Fn() -> Result<()> + Send + Sync>);

impl std::fmt::Debug for ResetHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResetHook")
    }
}

/// The serial runner goes through the loader, with these extras.
#[derive(Debug, Clone, Default)]
pub struct LoaderUse {
    /// Resets the board when the loader does not answer and there is no
    /// `--power-cycle` (the CI proof: the QEMU model's `system_reset`).
    pub reset_hook: Option<ResetHook>,
    /// Test-only damage on the wire.
    pub faults: Faults,
}

/// How long the loader may take to say HELLO before the board is reset.
pub const HELLO_WAIT: Duration = Duration::from_secs(4);
/// How long after a reset.
pub const HELLO_AFTER_RESET: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    /// A loader on the far side of a pipe: `hal::loader_proto::Server`
    /// over a fake RAM, answering what the client sends, optionally
    /// flipping bytes on the way back.
    struct Board {
        mem: Vec<u8>,
        record: [u8; proto::RECORD_BYTES],
    }

    const BASE: u64 = 0x10_0000;

    impl proto::Memory for Board {
        fn ram(&self) -> &[hal::dtb::Region] {
            &[hal::dtb::Region {
                base: BASE,
                size: 0x10_0000,
            }]
        }
        fn loader(&self) -> hal::dtb::Region {
            hal::dtb::Region {
                base: 0x1f_0000,
                size: 0x1_0000,
            }
        }
        fn reserved(&self) -> &[hal::dtb::Region] {
            &[]
        }
        fn write(&mut self, addr: u64, b: &[u8]) {
            let o = (addr - BASE) as usize;
            self.mem[o..o + b.len()].copy_from_slice(b);
        }
        fn zero(&mut self, addr: u64, len: u64) {
            let o = (addr - BASE) as usize;
            self.mem[o..o + len as usize].fill(0);
        }
        fn crc32(&self, addr: u64, len: u64) -> u32 {
            let o = (addr - BASE) as usize;
            sh::crc32(&self.mem[o..o + len as usize])
        }
        fn load_record(&self) -> [u8; proto::RECORD_BYTES] {
            self.record
        }
        fn store_record(&mut self, b: &[u8; proto::RECORD_BYTES]) {
            self.record = *b;
        }
    }

    /// Runs a simulated loader on a thread: bytes from the host come in on
    /// `from_host`, replies go to `to_host`; returns the board at the end
    /// (RUN or the host hanging up).
    fn simulated(
        mut board: Board,
        from_host: mpsc::Receiver<Vec<u8>>,
        to_host: mpsc::Sender<Vec<u8>>,
        corrupt_replies_every: u32,
    ) -> std::thread::JoinHandle<(Board, Option<u64>)> {
        std::thread::spawn(move || {
            let mut server = proto::Server::new(&board);
            let mut rx = proto::receiver();
            let mut replies = 0u32;
            let mut hello = Vec::new();
            let mut name = [0u8; proto::MAX_NAME];
            name[..4].copy_from_slice(b"fake");
            let h = Hello {
                version: proto::VERSION,
                el: 2,
                loader: proto::Memory::loader(&board),
                ram: [hal::dtb::Region::default(); proto::MAX_RAM],
                ram_count: 0,
                name,
                name_len: 4,
            };
            proto::encode(kind::HELLO, 0, h.encode().bytes(), |b| hello.push(b));
            let _ = to_host.send(b"memfw-loader 0 board=fake ready\r\n".to_vec());
            let _ = to_host.send(hello);
            while let Ok(bytes) = from_host.recv() {
                for b in bytes {
                    let Some(r) = rx.push(b) else { continue };
                    let (seq, out) = match r {
                        Ok(m) => (m.seq, server.handle(&mut board, Ok((m.kind, m.payload)))),
                        Err(e) => (proto::SEQ_UNKNOWN, server.handle(&mut board, Err(e))),
                    };
                    let (k, entry) = match out {
                        proto::Outcome::Reply(k) => (k, None),
                        proto::Outcome::Run { entry, .. } => (kind::ACK, Some(entry)),
                    };
                    let mut f = Vec::new();
                    proto::encode(k, seq, server.reply(), |b| f.push(b));
                    replies += 1;
                    if corrupt_replies_every > 0 && replies.is_multiple_of(corrupt_replies_every) {
                        let at = f.len() / 2;
                        f[at] ^= 0x01;
                        if f[at] == 0 {
                            f[at] = 0x33;
                        }
                    }
                    let _ = to_host.send(f);
                    if entry.is_some() {
                        return (board, entry);
                    }
                }
            }
            (board, None)
        })
    }

    struct ChanWriter(mpsc::Sender<Vec<u8>>);
    impl Write for ChanWriter {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .send(b.to_vec())
                .map_err(|_| std::io::Error::other("closed"))?;
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn image() -> Image {
        let text: Vec<u8> = (0..5000u32).map(|i| (i * 13 % 256) as u8).collect();
        Image {
            entry: BASE + 0x1000,
            segments: vec![
                Segment {
                    addr: BASE + 0x1000,
                    data: text,
                    memsz: 5000,
                },
                Segment {
                    addr: BASE + 0x4_0000,
                    data: vec![1, 0, 2, 0, 3],
                    memsz: 0x100,
                },
            ],
            hash: 0x1234,
        }
    }

    fn session(
        board: Board,
        faults: Faults,
        corrupt_replies_every: u32,
    ) -> (Result<()>, Stats, Board, Option<u64>) {
        let (h2b_tx, h2b_rx) = mpsc::channel();
        let (b2h_tx, b2h_rx) = mpsc::channel();
        let t = simulated(board, h2b_rx, b2h_tx, corrupt_replies_every);
        let mut stream = ByteStream {
            rx: b2h_rx,
            pending: Vec::new(),
            at: 0,
        };
        let tx = SharedWriter::new(Box::new(ChanWriter(h2b_tx)));
        let mut c = Client::new(&mut stream, tx, faults);
        c.reply_wait = Duration::from_millis(200);
        let r = c
            .wait_hello(Instant::now() + Duration::from_secs(5))
            .map(|_| ())
            .and_then(|()| c.load_and_run(&image()));
        let stats = c.stats.clone();
        drop(c);
        drop(stream);
        let (b, entry) = t.join().expect("board thread");
        (r, stats, b, entry)
    }

    fn fresh() -> Board {
        Board {
            mem: vec![0xee; 0x10_0000],
            record: [0; proto::RECORD_BYTES],
        }
    }

    #[test]
    fn upload_then_rerun_skips_what_is_there() {
        let (r, s, mut b, entry) = session(fresh(), Faults::default(), 0);
        assert_eq!(r.map_err(|e| e.to_string()), Ok(()));
        assert_eq!(entry, Some(BASE + 0x1000));
        assert_eq!(s.board, "fake");
        assert!(!s.skipped);
        assert_eq!((s.segments_sent, s.bytes_sent), (2, 5005));
        assert_eq!(s.resends, 0);
        let img = image();
        assert_eq!(&b.mem[0x1000..0x1000 + 5000], &img.segments[0].data[..]);
        // The same board again: nothing to send.
        let (r, s, _, entry) = session(b, Faults::default(), 0);
        assert_eq!(r.map_err(|e| e.to_string()), Ok(()));
        assert!(s.skipped, "{s:?}");
        assert_eq!(entry, Some(BASE + 0x1000));
        // The image wrote its data segment while it ran: only that goes.
        let (_, _, b2, _) = session(fresh(), Faults::default(), 0);
        b = b2;
        b.mem[0x4_0002] = 9;
        let (r, s, _, _) = session(b, Faults::default(), 0);
        assert_eq!(r.map_err(|e| e.to_string()), Ok(()));
        assert_eq!((s.skipped, s.segments_sent, s.bytes_sent), (false, 1, 5));
    }

    /// Every third frame the host sends and every fourth the loader sends
    /// is damaged: the upload still completes, byte for byte.
    #[test]
    fn corrupted_frames_both_ways_are_resent_and_the_upload_completes() {
        let faults = Faults {
            corrupt_every: 3,
            ..Faults::default()
        };
        let (r, s, b, entry) = session(fresh(), faults, 4);
        assert_eq!(r.map_err(|e| e.to_string()), Ok(()));
        assert_eq!(entry, Some(BASE + 0x1000));
        assert!(s.corrupted > 0 && s.corrupt_naks > 0, "{s:?}");
        assert!(s.resends >= s.corrupted, "{s:?}");
        assert_eq!(&b.mem[0x1000..0x1000 + 5000], &image().segments[0].data[..]);
    }

    /// A host that vanishes half-way through a DATA frame: the next host
    /// finds the image incomplete and loads it.
    #[test]
    fn a_host_vanishing_mid_frame_is_survived() {
        let faults = Faults {
            vanish_after_data: 2,
            ..Faults::default()
        };
        let (r, _, b, entry) = session(fresh(), faults, 0);
        // The proof on a model tells this fault from a real failure by it.
        assert!(matches!(r, Err(Error::FaultInjected(_))), "{r:?}");
        assert_eq!(entry, None);
        let (r, s, _, entry) = session(b, Faults::default(), 0);
        assert_eq!(r.map_err(|e| e.to_string()), Ok(()));
        assert!(!s.skipped);
        assert_eq!(entry, Some(BASE + 0x1000));
    }

    #[test]
    fn images_come_from_elf_segments() {
        assert!(Image::from_elf(b"not an elf").is_err());
    }
}
