//! The resident loader's protocol, shared by the loader (`loader/`) and the
//! host (`qemu/src/loader.rs`): pure, no hardware, host-tested.
//!
//! # Wire format
//!
//! Frames are those of semihosting over the console
//! ([`crate::semihost_console`]): `0x00 0x00 COBS('L' 'D' kind seq len
//! payload crc32) 0x00`, so a receiver resynchronises at the next pair of
//! zeros after noise or a cut frame, and the CRC-32 rejects a corrupted or
//! truncated one. All integers are little-endian.
//!
//! # Exchange
//!
//! The loader starts with one plain text line, exactly
//! `memfw-loader <version> board=<name> ready`, then sends [`kind::HELLO`]
//! and repeats it every second while no request arrives (a host that
//! connects late, or after another host vanished mid-transfer, sees one).
//! The host then sends requests one at a time; each is answered with the
//! request's `seq`: [`kind::ACK`], [`kind::HAVE`] or [`kind::NAK`] with a
//! typed [`LoadError`]. A request whose frame fails its checks is answered
//! with `NAK` [`LoadError::Corrupt`] (seq 0xFF): the host resends at once; a
//! lost reply makes the host resend after its timeout. Every request is
//! idempotent, so a resent one does no harm.
//!
//! - `QUERY image` → `HAVE`: whether the loader's record (kept in RAM just
//!   below the loader, so it survives a reset) is of this image, how many
//!   segments it has, and which of them are still intact in memory (their
//!   CRC recomputed now).
//! - `BEGIN image count` starts (or continues, for the same image) a
//!   record of `count` segments.
//! - `SEGMENT index addr filesz memsz crc` → refused unless it lies in RAM,
//!   clear of the loader and every reserved range; then `DATA offset bytes`
//!   in order (a resend of earlier data is rewritten, a gap is refused),
//!   then `END`: the segment is checked whole (length, CRC over `filesz`
//!   bytes in memory), zero-filled up to `memsz` and recorded.
//! - `RUN entry x0 x1 x2 x3` (x0 may be "as the board passed it") is
//!   acknowledged, then the loader jumps to `entry` at its own EL.

use crate::dtb::Region;
use crate::semihost_console::{self as frame, FrameError, Receiver};

/// First two bytes of every loader frame body.
pub const MAGIC: [u8; 2] = *b"LD";
/// Protocol version (HELLO carries it; the host refuses another).
pub const VERSION: u16 = 1;
/// Data bytes per `DATA` frame.
pub const CHUNK: usize = 1024;
/// Most segments an image may have.
pub const MAX_SEGMENTS: usize = 16;
/// Most RAM ranges HELLO reports.
pub const MAX_RAM: usize = 4;
/// Longest board name.
pub const MAX_NAME: usize = 32;
/// The seq of a `NAK` for a frame that could not be read.
pub const SEQ_UNKNOWN: u8 = 0xff;

/// Frame kinds.
pub mod kind {
    /// Loader: version, entry EL, its own range, RAM, board name.
    pub const HELLO: u8 = 0x01;
    /// Loader: the request was carried out.
    pub const ACK: u8 = 0x02;
    /// Loader: the request was refused (a [`super::LoadError`]).
    pub const NAK: u8 = 0x03;
    /// Loader: the answer to QUERY.
    pub const HAVE: u8 = 0x04;
    /// Host: is this image here?
    pub const QUERY: u8 = 0x81;
    /// Host: an image of this many segments follows.
    pub const BEGIN: u8 = 0x82;
    /// Host: a segment's place, size and checksum.
    pub const SEGMENT: u8 = 0x83;
    /// Host: bytes of the current segment.
    pub const DATA: u8 = 0x84;
    /// Host: the current segment is complete.
    pub const END: u8 = 0x85;
    /// Host: jump to the entry.
    pub const RUN: u8 = 0x86;
}

/// Why the loader refused a request: typed on the wire as a code and two
/// words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(hw, derive(defmt::Format))]
pub enum LoadError {
    /// The frame failed its checks (noise, truncation).
    Corrupt,
    /// A payload of the wrong size for its kind, or an unknown kind.
    Malformed {
        /// The request's kind.
        kind: u8,
    },
    /// The segment does not lie inside RAM.
    OutsideRam {
        /// Segment start.
        addr: u64,
        /// Segment size in memory.
        size: u64,
    },
    /// The segment overlaps the loader itself (image, stack, record).
    OverlapsLoader {
        /// The loader's start.
        base: u64,
        /// The loader's size.
        size: u64,
    },
    /// The segment overlaps a range that must be kept (the DTB, the spin
    /// table).
    OverlapsReserved {
        /// The range's start.
        base: u64,
        /// The range's size.
        size: u64,
    },
    /// DATA or END with no SEGMENT, SEGMENT with no BEGIN, or an index
    /// beyond BEGIN's count.
    NoSegment,
    /// DATA beyond what was received so far (a chunk went missing).
    OutOfOrder {
        /// The offset the loader expects next.
        expected: u64,
    },
    /// END before all `filesz` bytes arrived.
    Short {
        /// Bytes received.
        got: u64,
        /// Bytes announced.
        want: u64,
    },
    /// END: the segment in memory does not have the announced CRC.
    BadChecksum {
        /// The CRC of what is in memory.
        got: u32,
        /// The CRC announced.
        want: u32,
    },
    /// More segments than [`MAX_SEGMENTS`], or filesz above memsz.
    TooManySegments,
    /// RUN before every segment of the image was loaded.
    NotLoaded {
        /// Segments recorded.
        have: u64,
        /// Segments announced.
        want: u64,
    },
    /// RUN: the entry lies in no loaded segment.
    EntryOutside {
        /// The entry.
        entry: u64,
    },
}

impl LoadError {
    /// Code and two words, as sent.
    pub fn to_wire(self) -> (u8, u64, u64) {
        use LoadError::*;
        match self {
            Corrupt => (1, 0, 0),
            Malformed { kind } => (2, kind.into(), 0),
            OutsideRam { addr, size } => (3, addr, size),
            OverlapsLoader { base, size } => (4, base, size),
            OverlapsReserved { base, size } => (5, base, size),
            NoSegment => (6, 0, 0),
            OutOfOrder { expected } => (7, expected, 0),
            Short { got, want } => (8, got, want),
            BadChecksum { got, want } => (9, got.into(), want.into()),
            TooManySegments => (10, 0, 0),
            NotLoaded { have, want } => (11, have, want),
            EntryOutside { entry } => (12, entry, 0),
        }
    }

    /// The error a code and two words stand for.
    pub fn from_wire(code: u8, a: u64, b: u64) -> Option<Self> {
        use LoadError::*;
        Some(match code {
            1 => Corrupt,
            2 => Malformed { kind: a as u8 },
            3 => OutsideRam { addr: a, size: b },
            4 => OverlapsLoader { base: a, size: b },
            5 => OverlapsReserved { base: a, size: b },
            6 => NoSegment,
            7 => OutOfOrder { expected: a },
            8 => Short { got: a, want: b },
            9 => BadChecksum {
                got: a as u32,
                want: b as u32,
            },
            10 => TooManySegments,
            11 => NotLoaded { have: a, want: b },
            12 => EntryOutside { entry: a },
            _ => return None,
        })
    }
}

/// A little-endian reader over a payload.
struct Rd<'a>(&'a [u8]);

impl<'a> Rd<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        let b = self.take(4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Option<u64> {
        let mut w = [0u8; 8];
        w.copy_from_slice(self.take(8)?);
        Some(u64::from_le_bytes(w))
    }
    fn done(&self) -> bool {
        self.0.is_empty()
    }
}

/// A little-endian writer into a fixed buffer.
pub struct Wr<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> Default for Wr<N> {
    fn default() -> Self {
        Self {
            buf: [0; N],
            len: 0,
        }
    }
}

impl<const N: usize> Wr<N> {
    fn put(&mut self, b: &[u8]) -> &mut Self {
        let n = b.len().min(N - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&b[..n]);
        self.len += n;
        self
    }
    fn u8(&mut self, v: u8) -> &mut Self {
        self.put(&[v])
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.put(&v.to_le_bytes())
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.put(&v.to_le_bytes())
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.put(&v.to_le_bytes())
    }
    /// The bytes written.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// A request from the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request<'a> {
    /// Is the image with this hash here?
    Query {
        /// The image's hash (the host's choice of function).
        image: u64,
    },
    /// An image of `count` segments follows.
    Begin {
        /// Its hash.
        image: u64,
        /// Its number of segments.
        count: u8,
    },
    /// Segment `index`: `filesz` bytes with CRC-32 `crc` at `addr`, then
    /// zeros up to `memsz`.
    Segment {
        /// Which segment of the image.
        index: u8,
        /// Physical address.
        addr: u64,
        /// Bytes sent.
        filesz: u64,
        /// Bytes in memory.
        memsz: u64,
        /// CRC-32 of the `filesz` bytes.
        crc: u32,
    },
    /// Bytes at `offset` into the current segment.
    Data {
        /// Offset into the segment.
        offset: u64,
        /// At most [`CHUNK`] bytes.
        bytes: &'a [u8],
    },
    /// The current segment is complete.
    End,
    /// Jump to `entry` with these registers (`x0: None`: as the board
    /// passed it to the loader, the DTB).
    Run {
        /// Entry address.
        entry: u64,
        /// x0, or the board's.
        x0: Option<u64>,
        /// x1..x3.
        x: [u64; 3],
    },
}

impl<'a> Request<'a> {
    /// Kind and payload.
    pub fn encode(&self) -> (u8, Wr<{ frame::MAX_PAYLOAD }>) {
        let mut w = Wr::default();
        let k = match *self {
            Request::Query { image } => {
                w.u64(image);
                kind::QUERY
            }
            Request::Begin { image, count } => {
                w.u64(image).u8(count);
                kind::BEGIN
            }
            Request::Segment {
                index,
                addr,
                filesz,
                memsz,
                crc,
            } => {
                w.u8(index).u64(addr).u64(filesz).u64(memsz).u32(crc);
                kind::SEGMENT
            }
            Request::Data { offset, bytes } => {
                w.u64(offset).put(&bytes[..bytes.len().min(CHUNK)]);
                kind::DATA
            }
            Request::End => kind::END,
            Request::Run { entry, x0, x } => {
                w.u64(entry)
                    .u8(x0.is_some().into())
                    .u64(x0.unwrap_or(0))
                    .u64(x[0])
                    .u64(x[1])
                    .u64(x[2]);
                kind::RUN
            }
        };
        (k, w)
    }

    /// The request a frame of `kind` with `payload` carries.
    pub fn decode(k: u8, payload: &'a [u8]) -> Result<Self, LoadError> {
        let bad = LoadError::Malformed { kind: k };
        let mut r = Rd(payload);
        let req = match k {
            kind::QUERY => Request::Query {
                image: r.u64().ok_or(bad)?,
            },
            kind::BEGIN => Request::Begin {
                image: r.u64().ok_or(bad)?,
                count: r.u8().ok_or(bad)?,
            },
            kind::SEGMENT => Request::Segment {
                index: r.u8().ok_or(bad)?,
                addr: r.u64().ok_or(bad)?,
                filesz: r.u64().ok_or(bad)?,
                memsz: r.u64().ok_or(bad)?,
                crc: r.u32().ok_or(bad)?,
            },
            kind::DATA => {
                let offset = r.u64().ok_or(bad)?;
                let bytes = r.take(r.0.len()).ok_or(bad)?;
                if bytes.is_empty() || bytes.len() > CHUNK {
                    return Err(bad);
                }
                Request::Data { offset, bytes }
            }
            kind::END => Request::End,
            kind::RUN => {
                let entry = r.u64().ok_or(bad)?;
                let given = r.u8().ok_or(bad)?;
                let x0 = r.u64().ok_or(bad)?;
                let x = [
                    r.u64().ok_or(bad)?,
                    r.u64().ok_or(bad)?,
                    r.u64().ok_or(bad)?,
                ];
                Request::Run {
                    entry,
                    x0: (given != 0).then_some(x0),
                    x,
                }
            }
            _ => return Err(bad),
        };
        if r.done() {
            Ok(req)
        } else {
            Err(bad)
        }
    }
}

/// What the loader says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// [`VERSION`].
    pub version: u16,
    /// The EL it runs (and starts images) at.
    pub el: u8,
    /// Its own footprint (image, stack, record).
    pub loader: Region,
    /// RAM it loads into.
    pub ram: [Region; MAX_RAM],
    /// How many of `ram` are used.
    pub ram_count: u8,
    /// Board name bytes.
    pub name: [u8; MAX_NAME],
    /// How many of `name` are used.
    pub name_len: u8,
}

impl Hello {
    /// The payload.
    pub fn encode(&self) -> Wr<{ frame::MAX_PAYLOAD }> {
        let mut w = Wr::default();
        w.u16(self.version)
            .u8(self.el)
            .u8(self.ram_count)
            .u64(self.loader.base)
            .u64(self.loader.size);
        for r in &self.ram[..usize::from(self.ram_count).min(MAX_RAM)] {
            w.u64(r.base).u64(r.size);
        }
        w.put(self.name());
        w
    }

    /// A HELLO payload's contents.
    pub fn decode(payload: &[u8]) -> Option<Self> {
        let mut r = Rd(payload);
        let version = r.u16()?;
        let el = r.u8()?;
        let ram_count = r.u8()?;
        if usize::from(ram_count) > MAX_RAM {
            return None;
        }
        let loader = Region {
            base: r.u64()?,
            size: r.u64()?,
        };
        let mut ram = [Region::default(); MAX_RAM];
        for slot in ram.iter_mut().take(ram_count.into()) {
            *slot = Region {
                base: r.u64()?,
                size: r.u64()?,
            };
        }
        let rest = r.take(r.0.len())?;
        if rest.len() > MAX_NAME {
            return None;
        }
        let mut name = [0u8; MAX_NAME];
        name[..rest.len()].copy_from_slice(rest);
        Some(Self {
            version,
            el,
            loader,
            ram,
            ram_count,
            name,
            name_len: rest.len() as u8,
        })
    }

    /// The board name.
    pub fn name(&self) -> &[u8] {
        &self.name[..usize::from(self.name_len).min(MAX_NAME)]
    }

    /// The RAM ranges.
    pub fn ram(&self) -> &[Region] {
        &self.ram[..usize::from(self.ram_count).min(MAX_RAM)]
    }
}

/// The answer to QUERY.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Have {
    /// The record is of the image asked about.
    pub same_image: bool,
    /// Segments the record announces.
    pub count: u8,
    /// Bit `i`: segment `i` is recorded and its bytes in memory still have
    /// its CRC.
    pub intact: u32,
}

impl Have {
    /// True when every segment is there: nothing to upload.
    pub fn complete(&self) -> bool {
        self.same_image && self.count > 0 && self.intact == mask(self.count)
    }

    /// The payload.
    pub fn encode(&self) -> Wr<{ frame::MAX_PAYLOAD }> {
        let mut w = Wr::default();
        w.u8(self.same_image.into()).u8(self.count).u32(self.intact);
        w
    }

    /// A HAVE payload's contents.
    pub fn decode(payload: &[u8]) -> Option<Self> {
        let mut r = Rd(payload);
        let h = Self {
            same_image: r.u8()? != 0,
            count: r.u8()?,
            intact: r.u32()?,
        };
        r.done().then_some(h)
    }
}

/// The bits of `count` segments.
pub fn mask(count: u8) -> u32 {
    if count >= 32 {
        u32::MAX
    } else {
        (1u32 << count) - 1
    }
}

/// A NAK payload.
pub fn nak_payload(e: LoadError) -> Wr<{ frame::MAX_PAYLOAD }> {
    let (code, a, b) = e.to_wire();
    let mut w = Wr::default();
    w.u8(code).u64(a).u64(b);
    w
}

/// A NAK payload's error.
pub fn decode_nak(payload: &[u8]) -> Option<LoadError> {
    let mut r = Rd(payload);
    let (code, a, b) = (r.u8()?, r.u64()?, r.u64()?);
    if !r.done() {
        return None;
    }
    LoadError::from_wire(code, a, b)
}

/// Writes one loader frame.
pub fn encode(kind: u8, seq: u8, payload: &[u8], out: impl FnMut(u8)) {
    frame::encode_framed(MAGIC, kind, seq, payload, out);
}

/// A receiver of loader frames.
pub const fn receiver() -> Receiver {
    Receiver::with_magic(MAGIC)
}

/// One recorded segment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Seg {
    /// Address.
    pub addr: u64,
    /// Bytes with `crc`.
    pub filesz: u64,
    /// Bytes in memory.
    pub memsz: u64,
    /// CRC-32 of the `filesz` bytes.
    pub crc: u32,
    /// Loaded and checked.
    pub valid: bool,
}

/// What the loader remembers across a reset: which image, which segments.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Record {
    /// The image's hash.
    pub image: u64,
    /// Segments announced.
    pub count: u8,
    /// The segments.
    pub segs: [Seg; MAX_SEGMENTS],
}

/// Bytes of a stored record.
pub const RECORD_BYTES: usize = 8 + 8 + 1 + MAX_SEGMENTS * (8 * 3 + 4 + 1) + 4;
const RECORD_MAGIC: u64 = u64::from_le_bytes(*b"memfwREC");

impl Record {
    /// The stored form, with a magic and a CRC.
    pub fn to_bytes(&self) -> [u8; RECORD_BYTES] {
        let mut w = Wr::<RECORD_BYTES>::default();
        w.u64(RECORD_MAGIC).u64(self.image).u8(self.count);
        for s in &self.segs {
            w.u64(s.addr)
                .u64(s.filesz)
                .u64(s.memsz)
                .u32(s.crc)
                .u8(s.valid.into());
        }
        let crc = frame::crc32(w.bytes());
        w.u32(crc);
        w.buf
    }

    /// A stored record, if `b` holds a whole one (magic and CRC right).
    pub fn from_bytes(b: &[u8; RECORD_BYTES]) -> Option<Self> {
        let (body, crc) = b.split_at(RECORD_BYTES - 4);
        if frame::crc32(body).to_le_bytes() != crc {
            return None;
        }
        let mut r = Rd(body);
        if r.u64()? != RECORD_MAGIC {
            return None;
        }
        let mut rec = Record {
            image: r.u64()?,
            count: r.u8()?,
            ..Record::default()
        };
        if usize::from(rec.count) > MAX_SEGMENTS {
            return None;
        }
        for s in rec.segs.iter_mut() {
            *s = Seg {
                addr: r.u64()?,
                filesz: r.u64()?,
                memsz: r.u64()?,
                crc: r.u32()?,
                valid: r.u8()? != 0,
            };
        }
        Some(rec)
    }
}

/// The memory the loader loads into, as the protocol logic sees it. The
/// loader's implementation lives in the hal (`hal::loader`), tests use a
/// fake.
pub trait Memory {
    /// RAM that segments may use.
    fn ram(&self) -> &[Region];
    /// The loader's own footprint.
    fn loader(&self) -> Region;
    /// Ranges no segment may touch besides the loader (the DTB, the spin
    /// table).
    fn reserved(&self) -> &[Region];
    /// Writes `bytes` at `addr` (checked by the caller to lie in RAM and
    /// clear of the loader and the reserved ranges).
    fn write(&mut self, addr: u64, bytes: &[u8]);
    /// Zeroes `len` bytes at `addr` (checked as for `write`).
    fn zero(&mut self, addr: u64, len: u64);
    /// CRC-32 of `len` bytes at `addr` (checked as for `write`).
    fn crc32(&self, addr: u64, len: u64) -> u32;
    /// The stored record's bytes.
    fn load_record(&self) -> [u8; RECORD_BYTES];
    /// Stores the record's bytes.
    fn store_record(&mut self, b: &[u8; RECORD_BYTES]);
}

/// Checks that `addr..addr+size` lies in one RAM range, clear of the loader
/// and the reserved ranges.
pub fn check_range(mem: &dyn Memory, addr: u64, size: u64) -> Result<(), LoadError> {
    let outside = LoadError::OutsideRam { addr, size };
    let end = addr.checked_add(size).ok_or(outside)?;
    let seg = Region { base: addr, size };
    if size == 0 || !mem.ram().iter().any(|r| r.base <= addr && end <= r.end()) {
        return Err(outside);
    }
    let l = mem.loader();
    if seg.overlaps(&l) {
        return Err(LoadError::OverlapsLoader {
            base: l.base,
            size: l.size,
        });
    }
    if let Some(r) = mem.reserved().iter().find(|r| seg.overlaps(r)) {
        return Err(LoadError::OverlapsReserved {
            base: r.base,
            size: r.size,
        });
    }
    Ok(())
}

/// The current segment being received.
#[derive(Debug, Clone, Copy)]
struct Current {
    index: u8,
    seg: Seg,
    received: u64,
}

/// What the loader does with one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Reply with this kind (the payload is in [`Server::reply`]).
    Reply(u8),
    /// Acknowledge, then jump.
    Run {
        /// Entry.
        entry: u64,
        /// x0 (`None`: the board's).
        x0: Option<u64>,
        /// x1..x3.
        x: [u64; 3],
    },
}

/// The loader's protocol logic: one request in, one outcome out.
pub struct Server {
    record: Record,
    current: Option<Current>,
    /// The segment the last END completed (so a resent END, its ACK lost,
    /// is acknowledged again).
    finished: Option<u8>,
    reply: Wr<{ frame::MAX_PAYLOAD }>,
}

impl Server {
    /// Starts with the record `mem` kept (none if it is not a valid one).
    pub fn new(mem: &dyn Memory) -> Self {
        Self {
            record: Record::from_bytes(&mem.load_record()).unwrap_or_default(),
            current: None,
            finished: None,
            reply: Wr::default(),
        }
    }

    /// The payload of the last reply.
    pub fn reply(&self) -> &[u8] {
        self.reply.bytes()
    }

    /// The record as it stands.
    pub fn record(&self) -> &Record {
        &self.record
    }

    /// Handles a received frame (or a frame error).
    pub fn handle(
        &mut self,
        mem: &mut dyn Memory,
        frame: Result<(u8, &[u8]), FrameError>,
    ) -> Outcome {
        let result = match frame {
            Err(_) => Err(LoadError::Corrupt),
            Ok((k, payload)) => Request::decode(k, payload).and_then(|req| self.serve(mem, req)),
        };
        match result {
            Ok(o) => o,
            Err(e) => {
                self.reply = nak_payload(e);
                Outcome::Reply(kind::NAK)
            }
        }
    }

    fn ack(&mut self) -> Result<Outcome, LoadError> {
        self.reply = Wr::default();
        Ok(Outcome::Reply(kind::ACK))
    }

    fn serve(&mut self, mem: &mut dyn Memory, req: Request<'_>) -> Result<Outcome, LoadError> {
        match req {
            Request::Query { image } => {
                let rec = &self.record;
                let mut intact = 0u32;
                for (i, s) in rec.segs[..usize::from(rec.count)].iter().enumerate() {
                    if s.valid
                        && check_range(mem, s.addr, s.memsz).is_ok()
                        && mem.crc32(s.addr, s.filesz) == s.crc
                    {
                        intact |= 1 << i;
                    }
                }
                let have = Have {
                    same_image: rec.image == image && rec.count > 0,
                    count: rec.count,
                    intact,
                };
                self.reply = have.encode();
                Ok(Outcome::Reply(kind::HAVE))
            }
            Request::Begin { image, count } => {
                if count == 0 || usize::from(count) > MAX_SEGMENTS {
                    return Err(LoadError::TooManySegments);
                }
                if self.record.image != image || self.record.count != count {
                    self.record = Record {
                        image,
                        count,
                        ..Record::default()
                    };
                }
                self.current = None;
                self.finished = None;
                mem.store_record(&self.record.to_bytes());
                self.ack()
            }
            Request::Segment {
                index,
                addr,
                filesz,
                memsz,
                crc,
            } => {
                if index >= self.record.count {
                    return Err(LoadError::NoSegment);
                }
                if filesz > memsz {
                    return Err(LoadError::TooManySegments);
                }
                check_range(mem, addr, memsz)?;
                let seg = Seg {
                    addr,
                    filesz,
                    memsz,
                    crc,
                    valid: false,
                };
                self.record.segs[usize::from(index)] = seg;
                mem.store_record(&self.record.to_bytes());
                self.current = Some(Current {
                    index,
                    seg,
                    received: 0,
                });
                self.finished = None;
                self.ack()
            }
            Request::Data { offset, bytes } => {
                let cur = self.current.as_mut().ok_or(LoadError::NoSegment)?;
                if offset > cur.received {
                    return Err(LoadError::OutOfOrder {
                        expected: cur.received,
                    });
                }
                let end = offset + bytes.len() as u64;
                if end > cur.seg.filesz {
                    return Err(LoadError::OutsideRam {
                        addr: cur.seg.addr + offset,
                        size: bytes.len() as u64,
                    });
                }
                mem.write(cur.seg.addr + offset, bytes);
                cur.received = cur.received.max(end);
                self.ack()
            }
            Request::End => {
                let cur = match (self.current, self.finished) {
                    (Some(c), _) => c,
                    (None, Some(i)) if self.record.segs[usize::from(i)].valid => {
                        return self.ack();
                    }
                    _ => return Err(LoadError::NoSegment),
                };
                if cur.received != cur.seg.filesz {
                    return Err(LoadError::Short {
                        got: cur.received,
                        want: cur.seg.filesz,
                    });
                }
                let got = mem.crc32(cur.seg.addr, cur.seg.filesz);
                if got != cur.seg.crc {
                    return Err(LoadError::BadChecksum {
                        got,
                        want: cur.seg.crc,
                    });
                }
                mem.zero(
                    cur.seg.addr + cur.seg.filesz,
                    cur.seg.memsz - cur.seg.filesz,
                );
                self.record.segs[usize::from(cur.index)].valid = true;
                mem.store_record(&self.record.to_bytes());
                self.current = None;
                self.finished = Some(cur.index);
                self.ack()
            }
            Request::Run { entry, x0, x } => {
                let rec = &self.record;
                let segs = &rec.segs[..usize::from(rec.count)];
                let have = segs.iter().filter(|s| s.valid).count() as u64;
                if rec.count == 0 || have != u64::from(rec.count) {
                    return Err(LoadError::NotLoaded {
                        have,
                        want: rec.count.into(),
                    });
                }
                if !segs
                    .iter()
                    .any(|s| s.addr <= entry && entry < s.addr + s.filesz)
                {
                    return Err(LoadError::EntryOutside { entry });
                }
                self.reply = Wr::default();
                Ok(Outcome::Run { entry, x0, x })
            }
        }
    }
}

/// The loader's first line on the console, exactly.
pub fn ready_line(version: &str, board: &str, out: &mut impl FnMut(&[u8])) {
    out(b"memfw-loader ");
    out(version.as_bytes());
    out(b" board=");
    out(board.as_bytes());
    out(b" ready\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_bytes(kind: u8, seq: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        encode(kind, seq, payload, |b| v.push(b));
        v
    }

    /// Feeds `wire` to a loader receiver: the frames or errors it yields.
    type Received = Result<(u8, u8, Vec<u8>), FrameError>;

    fn receive(wire: &[u8]) -> Vec<Received> {
        let mut rx = receiver();
        let mut got = Vec::new();
        for &b in wire {
            if let Some(r) = rx.push(b) {
                got.push(r.map(|m| (m.kind, m.seq, m.payload.to_vec())));
            }
        }
        got
    }

    fn req_frame(seq: u8, r: Request<'_>) -> Vec<u8> {
        let (k, w) = r.encode();
        frame_bytes(k, seq, w.bytes())
    }

    #[test]
    fn every_request_round_trips() {
        let data = [7u8; CHUNK];
        let reqs = [
            Request::Query {
                image: 0x1122_3344_5566_7788,
            },
            Request::Begin { image: 9, count: 3 },
            Request::Segment {
                index: 2,
                addr: 0x20_0000,
                filesz: 12345,
                memsz: 99999,
                crc: 0xdead_beef,
            },
            Request::Data {
                offset: 4096,
                bytes: &data,
            },
            Request::Data {
                offset: 0,
                bytes: &data[..1],
            },
            Request::End,
            Request::Run {
                entry: 0x20_0000,
                x0: None,
                x: [1, 2, 3],
            },
            Request::Run {
                entry: 0x20_0000,
                x0: Some(0x800_0000),
                x: [0, 0, u64::MAX],
            },
        ];
        for (i, r) in reqs.iter().enumerate() {
            let got = receive(&req_frame(i as u8, *r));
            assert_eq!(got.len(), 1, "{r:?}");
            let (k, seq, payload) = got[0].clone().expect("valid frame");
            assert_eq!(seq, i as u8);
            assert_eq!(Request::decode(k, &payload), Ok(*r));
        }
    }

    #[test]
    fn malformed_payloads_are_typed_errors() {
        // One byte short, one byte long, an unknown kind, empty and
        // oversized data.
        let (k, w) = Request::Segment {
            index: 0,
            addr: 1,
            filesz: 2,
            memsz: 3,
            crc: 4,
        }
        .encode();
        let b = w.bytes();
        assert_eq!(
            Request::decode(k, &b[..b.len() - 1]),
            Err(LoadError::Malformed { kind: k })
        );
        let mut long = b.to_vec();
        long.push(0);
        assert_eq!(
            Request::decode(k, &long),
            Err(LoadError::Malformed { kind: k })
        );
        assert_eq!(
            Request::decode(0x99, &[]),
            Err(LoadError::Malformed { kind: 0x99 })
        );
        assert!(Request::decode(kind::DATA, &0u64.to_le_bytes()).is_err());
        let mut big = 0u64.to_le_bytes().to_vec();
        big.extend([1u8; CHUNK + 1]);
        assert!(Request::decode(kind::DATA, &big).is_err());
    }

    #[test]
    fn errors_hello_and_have_round_trip() {
        let errors = [
            LoadError::Corrupt,
            LoadError::Malformed { kind: 0x83 },
            LoadError::OutsideRam { addr: 1, size: 2 },
            LoadError::OverlapsLoader { base: 3, size: 4 },
            LoadError::OverlapsReserved { base: 5, size: 6 },
            LoadError::NoSegment,
            LoadError::OutOfOrder { expected: 7 },
            LoadError::Short { got: 8, want: 9 },
            LoadError::BadChecksum { got: 10, want: 11 },
            LoadError::TooManySegments,
            LoadError::NotLoaded { have: 1, want: 2 },
            LoadError::EntryOutside { entry: 12 },
        ];
        for e in errors {
            assert_eq!(decode_nak(nak_payload(e).bytes()), Some(e));
        }
        assert_eq!(
            decode_nak(&[99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            None
        );
        assert_eq!(decode_nak(&[1]), None);
        let mut name = [0u8; MAX_NAME];
        name[..7].copy_from_slice(b"raspi3b");
        let mut ram = [Region::default(); MAX_RAM];
        ram[0] = Region {
            base: 0,
            size: 0x3c00_0000,
        };
        let h = Hello {
            version: VERSION,
            el: 2,
            loader: Region {
                base: 0x3b00_0000,
                size: 0x10_0000,
            },
            ram,
            ram_count: 1,
            name,
            name_len: 7,
        };
        let back = Hello::decode(h.encode().bytes()).expect("decodes");
        assert_eq!(back, h);
        assert_eq!(back.name(), b"raspi3b");
        assert_eq!(back.ram(), &ram[..1]);
        assert_eq!(Hello::decode(&h.encode().bytes()[..10]), None);
        let have = Have {
            same_image: true,
            count: 3,
            intact: 0b101,
        };
        assert_eq!(Have::decode(have.encode().bytes()), Some(have));
        assert!(!have.complete());
        assert!(Have {
            intact: 0b111,
            ..have
        }
        .complete());
        assert!(!Have {
            same_image: false,
            intact: 0b111,
            ..have
        }
        .complete());
    }

    /// Byte flips anywhere in a frame, a truncated frame and noise: each
    /// is rejected (never taken for another valid frame), and the next
    /// good frame after it is received.
    #[test]
    fn corruption_and_truncation_are_rejected_and_the_stream_resynchronises() {
        let data: Vec<u8> = (0..200u32).map(|i| (i * 7 + 1) as u8).collect();
        let good = req_frame(
            5,
            Request::Data {
                offset: 1024,
                bytes: &data,
            },
        );
        for at in 2..good.len() - 1 {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bad = good.clone();
                bad[at] ^= flip;
                let mut wire = bad;
                wire.extend(&good);
                let got = receive(&wire);
                let oks: Vec<_> = got.iter().filter(|r| r.is_ok()).collect();
                assert_eq!(oks.len(), 1, "flip {flip:#x} at {at}: {got:?}");
                assert_eq!(oks[0].as_ref().unwrap().2, good_payload(&data));
                assert!(got.last().unwrap().is_ok(), "flip at {at}");
            }
        }
        for cut in 3..good.len() - 1 {
            let mut wire = good[..cut].to_vec();
            wire.extend(&good);
            let got = receive(&wire);
            assert_eq!(got.last().map(|r| r.is_ok()), Some(true), "cut at {cut}");
            assert_eq!(got.iter().filter(|r| r.is_ok()).count(), 1, "cut {cut}");
        }
        // A semihosting frame is not a loader frame.
        let mut sh = Vec::new();
        frame::encode(0x01, 0, b"hello", |b| sh.push(b));
        assert_eq!(receive(&sh), vec![Err(FrameError::BadMagic)]);
    }

    fn good_payload(data: &[u8]) -> Vec<u8> {
        let mut p = 1024u64.to_le_bytes().to_vec();
        p.extend(data);
        p
    }

    /// A fake RAM: 0x1000..0x21000, the loader at 0x18000..0x1c000, a
    /// reserved page at 0x1000.
    struct Fake {
        bytes: Vec<u8>,
        record: [u8; RECORD_BYTES],
        ram: [Region; 1],
        reserved: [Region; 1],
    }

    const BASE: u64 = 0x1000;

    impl Fake {
        fn new() -> Self {
            Self {
                bytes: vec![0xa5; 0x20000],
                record: [0; RECORD_BYTES],
                ram: [Region {
                    base: BASE,
                    size: 0x20000,
                }],
                reserved: [Region {
                    base: BASE,
                    size: 0x1000,
                }],
            }
        }
        fn at(&self, addr: u64, len: u64) -> &[u8] {
            &self.bytes[(addr - BASE) as usize..(addr - BASE + len) as usize]
        }
    }

    impl Memory for Fake {
        fn ram(&self) -> &[Region] {
            &self.ram
        }
        fn loader(&self) -> Region {
            Region {
                base: 0x18000,
                size: 0x4000,
            }
        }
        fn reserved(&self) -> &[Region] {
            &self.reserved
        }
        fn write(&mut self, addr: u64, b: &[u8]) {
            let o = (addr - BASE) as usize;
            self.bytes[o..o + b.len()].copy_from_slice(b);
        }
        fn zero(&mut self, addr: u64, len: u64) {
            let o = (addr - BASE) as usize;
            self.bytes[o..o + len as usize].fill(0);
        }
        fn crc32(&self, addr: u64, len: u64) -> u32 {
            frame::crc32(self.at(addr, len))
        }
        fn load_record(&self) -> [u8; RECORD_BYTES] {
            self.record
        }
        fn store_record(&mut self, b: &[u8; RECORD_BYTES]) {
            self.record = *b;
        }
    }

    fn serve(s: &mut Server, m: &mut Fake, r: Request<'_>) -> Result<Outcome, LoadError> {
        let (k, w) = r.encode();
        match s.handle(m, Ok((k, w.bytes()))) {
            Outcome::Reply(kind::NAK) => Err(decode_nak(s.reply()).expect("typed NAK")),
            o => Ok(o),
        }
    }

    fn ok(s: &mut Server, m: &mut Fake, r: Request<'_>) {
        assert_eq!(serve(s, m, r), Ok(Outcome::Reply(kind::ACK)), "{r:?}");
    }

    fn query(s: &mut Server, m: &mut Fake, image: u64) -> Have {
        assert_eq!(
            serve(s, m, Request::Query { image }),
            Ok(Outcome::Reply(kind::HAVE))
        );
        Have::decode(s.reply()).expect("HAVE")
    }

    fn upload(s: &mut Server, m: &mut Fake, index: u8, addr: u64, data: &[u8], memsz: u64) {
        ok(
            s,
            m,
            Request::Segment {
                index,
                addr,
                filesz: data.len() as u64,
                memsz,
                crc: frame::crc32(data),
            },
        );
        for (i, c) in data.chunks(CHUNK).enumerate() {
            ok(
                s,
                m,
                Request::Data {
                    offset: (i * CHUNK) as u64,
                    bytes: c,
                },
            );
        }
        ok(s, m, Request::End);
    }

    #[test]
    fn an_image_loads_runs_and_is_found_again_after_a_reset() {
        let mut m = Fake::new();
        let mut s = Server::new(&m);
        let text: Vec<u8> = (0..3000u32).map(|i| (i % 253) as u8).collect();
        let data = b"data!".to_vec();
        assert!(!query(&mut s, &mut m, 42).same_image);
        assert!(matches!(
            serve(
                &mut s,
                &mut m,
                Request::Run {
                    entry: 0x2000,
                    x0: None,
                    x: [0; 3]
                }
            ),
            Err(LoadError::NotLoaded { .. })
        ));
        ok(
            &mut s,
            &mut m,
            Request::Begin {
                image: 42,
                count: 2,
            },
        );
        upload(&mut s, &mut m, 0, 0x2000, &text, text.len() as u64);
        upload(&mut s, &mut m, 1, 0x8000, &data, 0x100);
        assert_eq!(m.at(0x2000, 3000), &text[..]);
        assert_eq!(m.at(0x8000, 5), &data[..]);
        assert!(m.at(0x8005, 0xfb).iter().all(|&b| b == 0), "zero-filled");
        assert_eq!(m.at(0x8100, 1), &[0xa5], "not beyond memsz");
        assert_eq!(
            serve(
                &mut s,
                &mut m,
                Request::Run {
                    entry: 0x2010,
                    x0: None,
                    x: [1, 2, 3]
                }
            ),
            Ok(Outcome::Run {
                entry: 0x2010,
                x0: None,
                x: [1, 2, 3]
            })
        );
        assert_eq!(
            serve(
                &mut s,
                &mut m,
                Request::Run {
                    entry: 0x7000,
                    x0: None,
                    x: [0; 3]
                }
            ),
            Err(LoadError::EntryOutside { entry: 0x7000 })
        );
        // A reset: a new server finds the record in memory; the image ran
        // and wrote its data segment, so only that one is reported stale.
        m.write(0x8001, b"X");
        let mut s = Server::new(&m);
        let have = query(&mut s, &mut m, 42);
        assert_eq!(
            have,
            Have {
                same_image: true,
                count: 2,
                intact: 0b01
            }
        );
        assert!(!have.complete());
        ok(
            &mut s,
            &mut m,
            Request::Begin {
                image: 42,
                count: 2,
            },
        );
        upload(&mut s, &mut m, 1, 0x8000, &data, 0x100);
        assert!(query(&mut s, &mut m, 42).complete());
        // Another image: nothing of it is here.
        assert!(!query(&mut s, &mut m, 43).same_image);
        // A record corrupted in memory is no record.
        m.record[20] ^= 1;
        let mut s = Server::new(&m);
        assert_eq!(query(&mut s, &mut m, 42).count, 0);
    }

    #[test]
    fn bad_segments_are_refused_with_typed_errors() {
        let mut m = Fake::new();
        let mut s = Server::new(&m);
        let seg = |addr, memsz| Request::Segment {
            index: 0,
            addr,
            filesz: 16,
            memsz,
            crc: 0,
        };
        assert_eq!(
            serve(&mut s, &mut m, seg(0x2000, 16)),
            Err(LoadError::NoSegment)
        );
        ok(&mut s, &mut m, Request::Begin { image: 1, count: 1 });
        assert_eq!(
            serve(&mut s, &mut m, seg(0x20ff0, 0x20)),
            Err(LoadError::OutsideRam {
                addr: 0x20ff0,
                size: 0x20
            })
        );
        assert_eq!(
            serve(&mut s, &mut m, seg(u64::MAX - 4, 16)),
            Err(LoadError::OutsideRam {
                addr: u64::MAX - 4,
                size: 16
            })
        );
        assert_eq!(
            serve(&mut s, &mut m, seg(0x17ff0, 0x20)),
            Err(LoadError::OverlapsLoader {
                base: 0x18000,
                size: 0x4000
            })
        );
        assert_eq!(
            serve(&mut s, &mut m, seg(0x1800, 0x20)),
            Err(LoadError::OverlapsReserved {
                base: 0x1000,
                size: 0x1000
            })
        );
        assert_eq!(
            serve(
                &mut s,
                &mut m,
                Request::Segment {
                    index: 1,
                    addr: 0x2000,
                    filesz: 1,
                    memsz: 1,
                    crc: 0
                }
            ),
            Err(LoadError::NoSegment)
        );
        assert_eq!(
            serve(&mut s, &mut m, Request::End),
            Err(LoadError::NoSegment)
        );
        assert_eq!(
            serve(
                &mut s,
                &mut m,
                Request::Begin {
                    image: 1,
                    count: MAX_SEGMENTS as u8 + 1
                }
            ),
            Err(LoadError::TooManySegments)
        );
        assert_eq!(m.at(0x2000, 16), &[0xa5; 16], "nothing written");
    }

    /// A missing chunk is refused (the host resends from there), a resent
    /// chunk is taken again, END before the last byte is Short, and memory
    /// that changed under the upload is a checksum failure; the host then
    /// resends the segment and it loads.
    #[test]
    fn short_and_corrupted_segments_are_refused_and_a_resend_recovers() {
        let mut m = Fake::new();
        let mut s = Server::new(&m);
        let data: Vec<u8> = (0..2500u32).map(|i| (i * 3) as u8).collect();
        let crc = frame::crc32(&data);
        let seg = Request::Segment {
            index: 0,
            addr: 0x4000,
            filesz: 2500,
            memsz: 2500,
            crc,
        };
        ok(&mut s, &mut m, Request::Begin { image: 7, count: 1 });
        ok(&mut s, &mut m, seg);
        ok(
            &mut s,
            &mut m,
            Request::Data {
                offset: 0,
                bytes: &data[..CHUNK],
            },
        );
        assert_eq!(
            serve(
                &mut s,
                &mut m,
                Request::Data {
                    offset: 2048,
                    bytes: &data[2048..]
                }
            ),
            Err(LoadError::OutOfOrder { expected: 1024 })
        );
        ok(
            &mut s,
            &mut m,
            Request::Data {
                offset: 0,
                bytes: &data[..CHUNK],
            },
        );
        ok(
            &mut s,
            &mut m,
            Request::Data {
                offset: 1024,
                bytes: &data[1024..2048],
            },
        );
        assert_eq!(
            serve(&mut s, &mut m, Request::End),
            Err(LoadError::Short {
                got: 2048,
                want: 2500
            })
        );
        ok(
            &mut s,
            &mut m,
            Request::Data {
                offset: 2048,
                bytes: &data[2048..],
            },
        );
        m.write(0x4010, &[0]);
        assert!(matches!(
            serve(&mut s, &mut m, Request::End),
            Err(LoadError::BadChecksum { want, .. }) if want == crc
        ));
        assert!(!query(&mut s, &mut m, 7).complete());
        upload(&mut s, &mut m, 0, 0x4000, &data, 2500);
        // END again (its ACK was lost): acknowledged again.
        ok(&mut s, &mut m, Request::End);
        assert!(query(&mut s, &mut m, 7).complete());
        // Data past filesz is refused.
        ok(&mut s, &mut m, seg);
        assert!(serve(
            &mut s,
            &mut m,
            Request::Data {
                offset: 2000,
                bytes: &data[..CHUNK]
            }
        )
        .is_err());
    }

    #[test]
    fn a_corrupt_frame_is_naked_as_corrupt() {
        let mut m = Fake::new();
        let mut s = Server::new(&m);
        assert_eq!(
            s.handle(&mut m, Err(FrameError::BadChecksum)),
            Outcome::Reply(kind::NAK)
        );
        assert_eq!(decode_nak(s.reply()), Some(LoadError::Corrupt));
        assert_eq!(
            s.handle(&mut m, Ok((kind::QUERY, &[1, 2]))),
            Outcome::Reply(kind::NAK)
        );
        assert_eq!(
            decode_nak(s.reply()),
            Some(LoadError::Malformed { kind: kind::QUERY })
        );
    }

    #[test]
    fn record_round_trips_and_rejects_damage() {
        let mut r = Record {
            image: 5,
            count: 2,
            ..Record::default()
        };
        r.segs[1] = Seg {
            addr: 1,
            filesz: 2,
            memsz: 3,
            crc: 4,
            valid: true,
        };
        let b = r.to_bytes();
        assert_eq!(Record::from_bytes(&b), Some(r));
        for at in [0, 9, RECORD_BYTES - 1] {
            let mut d = b;
            d[at] ^= 0x40;
            assert_eq!(Record::from_bytes(&d), None, "damage at {at}");
        }
        assert_eq!(Record::from_bytes(&[0; RECORD_BYTES]), None);
    }

    #[test]
    fn ready_line_is_exact() {
        let mut v = Vec::new();
        ready_line("0.1.0", "raspi3b", &mut |b| v.extend_from_slice(b));
        assert_eq!(v, b"memfw-loader 0.1.0 board=raspi3b ready\r\n");
    }
}
