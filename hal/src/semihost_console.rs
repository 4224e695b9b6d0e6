//! Semihosting over the console UART, for boards without a debugger (and
//! QEMU with semihosting off): `HLT #0xF000` (Arm IHI 0096, "Semihosting for
//! AArch32 and AArch64", 4.1) then traps as an undefined instruction (EC
//! 0x00), and the synchronous exception handler serves the call as framed,
//! checksummed messages on the console, interleaved with the defmt stream,
//! then resumes after the instruction. With semihosting on, the instruction
//! never traps and none of this runs.
//!
//! # Wire format
//!
//! A message is
//!
//! ```text
//! 0x00 0x00  COBS( 'S' 'H' kind seq len:u16le payload[len] crc32:u32le )  0x00
//! ```
//!
//! COBS removes every zero from the body, so a message is the bytes between
//! two zeros. defmt's rzcobs frames are also zero-terminated but never empty,
//! so defmt never sends two zeros in a row: a chunk is a console message if
//! and only if at least two zeros precede it, anything else is defmt. The
//! CRC-32 (IEEE 802.3, over magic to payload) and the length reject a frame
//! hit by line noise or cut short; the receiver resynchronises at the next
//! pair of zeros. The leading zeros also end a defmt frame a crash left
//! open, so the message is never swallowed by it.
//!
//! Kinds: [`kind::WRITE`] (console text: SYS_WRITEC, SYS_WRITE0, SYS_WRITE to
//! stdout/stderr), [`kind::GET_CMDLINE`] (payload: the buffer size, u32le)
//! answered by the host's [`kind::CMDLINE`] with the same `seq`,
//! [`kind::EXIT`] (payload: reason u64le, subcode u64le). The firmware
//! resends an unanswered GET_CMDLINE (and an EXIT, until reset), and drops a
//! reply whose `seq` is not the one it waits for, so a lost or duplicated
//! frame in either direction does no harm.

/// First two bytes of every message body.
pub const MAGIC: [u8; 2] = *b"SH";
/// Largest payload (a command line of 1024 bytes plus slack).
pub const MAX_PAYLOAD: usize = 1200;
/// Header: magic, kind, seq, length.
const HEADER: usize = 6;
/// Largest decoded body: header, payload, CRC.
pub const MAX_BODY: usize = HEADER + MAX_PAYLOAD + 4;
/// Largest COBS-encoded body (one code byte per 254 data bytes, plus one).
pub const MAX_ENCODED: usize = MAX_BODY + MAX_BODY / 254 + 1;

/// Message kinds.
pub mod kind {
    /// Firmware to host: text for the console (payload: the bytes).
    pub const WRITE: u8 = 0x01;
    /// Firmware to host: send the command line (payload: buffer size, u32le).
    pub const GET_CMDLINE: u8 = 0x02;
    /// Firmware to host: the program ended (payload: reason u64le, subcode u64le).
    pub const EXIT: u8 = 0x03;
    /// Host to firmware: the command line (payload: its bytes, no NUL).
    pub const CMDLINE: u8 = 0x81;
    /// Host to firmware, after EXIT: reset the board (PSCI SYSTEM_RESET or
    /// the board's own reset), back into its boot firmware or the loader.
    pub const RESET: u8 = 0x82;
}

/// Semihosting operation numbers served (IHI 0096, chapter 6).
pub mod op {
    /// SYS_WRITEC: one character at `[x1]`.
    pub const SYS_WRITEC: u64 = 0x03;
    /// SYS_WRITE0: the NUL-terminated string at `x1`.
    pub const SYS_WRITE0: u64 = 0x04;
    /// SYS_WRITE: block {fd, buf, len}.
    pub const SYS_WRITE: u64 = 0x05;
    /// SYS_ERRNO: the last error.
    pub const SYS_ERRNO: u64 = 0x13;
    /// SYS_GET_CMDLINE: block {buf, len}.
    pub const SYS_GET_CMDLINE: u64 = 0x15;
    /// SYS_EXIT: on AArch64, block {reason, subcode}.
    pub const SYS_EXIT: u64 = 0x18;
    /// SYS_EXIT_EXTENDED: block {reason, subcode}.
    pub const SYS_EXIT_EXTENDED: u64 = 0x20;
}

/// `ADP_Stopped_ApplicationExit`: the subcode is the exit status.
pub const ADP_STOPPED_APPLICATION_EXIT: u64 = 0x20026;

/// The encoding of `HLT #0xF000`.
pub const HLT_F000: u32 = 0xd45e_0000;

/// Why a chunk was not a valid message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(hw, derive(defmt::Format))]
pub enum FrameError {
    /// A COBS code byte points past the end of the chunk.
    BadCobs,
    /// Shorter than header and CRC.
    TooShort,
    /// Longer than [`MAX_ENCODED`].
    TooLong,
    /// The body does not start with [`MAGIC`].
    BadMagic,
    /// The length field disagrees with the body (a truncated frame).
    BadLength,
    /// The CRC does not match.
    BadChecksum,
}

/// A decoded message, borrowing its payload from the receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    /// One of [`kind`].
    pub kind: u8,
    /// Request number; a reply carries its request's.
    pub seq: u8,
    /// The payload.
    pub payload: &'a [u8],
}

/// CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320), bitwise: small and
/// fast enough for a serial line.
pub fn crc32(data: &[u8]) -> u32 {
    !data.iter().fold(!0u32, |crc, &b| crc32_step(crc, b))
}

/// [`crc32`] a byte at a time (memory read with volatile loads).
#[derive(Debug, Clone, Copy)]
pub struct Crc32(u32);

impl Default for Crc32 {
    fn default() -> Self {
        Self::new()
    }
}

impl Crc32 {
    /// Nothing seen yet.
    pub const fn new() -> Self {
        Self(!0)
    }
    /// One more byte.
    pub fn push(&mut self, b: u8) {
        self.0 = crc32_step(self.0, b);
    }
    /// The CRC of the bytes pushed.
    pub const fn finish(self) -> u32 {
        !self.0
    }
}

fn crc32_step(mut crc: u32, b: u8) -> u32 {
    crc ^= u32::from(b);
    for _ in 0..8 {
        crc = if crc & 1 != 0 {
            (crc >> 1) ^ 0xedb8_8320
        } else {
            crc >> 1
        };
    }
    crc
}

/// Streaming COBS encoder: at most 254 bytes of lookahead.
struct Cobs {
    block: [u8; 254],
    len: usize,
}

impl Cobs {
    fn push(&mut self, b: u8, out: &mut impl FnMut(u8)) {
        if b == 0 {
            self.emit(out);
            return;
        }
        self.block[self.len] = b;
        self.len += 1;
        if self.len == 254 {
            // A full group has no implied zero after it.
            self.emit(out);
        }
    }

    fn emit(&mut self, out: &mut impl FnMut(u8)) {
        out(self.len as u8 + 1);
        for &b in &self.block[..self.len] {
            out(b);
        }
        self.len = 0;
    }
}

/// Writes one message (`payload` at most [`MAX_PAYLOAD`] bytes, longer is
/// cut) to `out`, framing included.
pub fn encode(kind: u8, seq: u8, payload: &[u8], out: impl FnMut(u8)) {
    encode_framed(MAGIC, kind, seq, payload, out);
}

/// [`encode`] with another protocol's magic (the resident loader's,
/// `loader_proto`), the same framing, limits and CRC.
pub fn encode_framed(magic: [u8; 2], kind: u8, seq: u8, payload: &[u8], mut out: impl FnMut(u8)) {
    let payload = &payload[..payload.len().min(MAX_PAYLOAD)];
    let len = payload.len() as u16;
    let header = [
        magic[0],
        magic[1],
        kind,
        seq,
        len.to_le_bytes()[0],
        len.to_le_bytes()[1],
    ];
    // CRC over header and payload, computed alongside the encoding.
    let mut crc = !0u32;
    out(0);
    out(0);
    let mut cobs = Cobs {
        block: [0; 254],
        len: 0,
    };
    for &b in header.iter().chain(payload) {
        crc = crc32_step(crc, b);
        cobs.push(b, &mut out);
    }
    for b in (!crc).to_le_bytes() {
        cobs.push(b, &mut out);
    }
    // The final group (possibly empty: code 1), with no implied zero.
    cobs.emit(&mut out);
    out(0);
}

/// Decodes one chunk (the bytes between zeros, without them) in place and
/// checks it: the message, or why it is not one.
pub fn decode_in_place(chunk: &mut [u8]) -> Result<Message<'_>, FrameError> {
    decode_framed(MAGIC, chunk)
}

/// [`decode_in_place`] for another protocol's magic.
pub fn decode_framed(magic: [u8; 2], chunk: &mut [u8]) -> Result<Message<'_>, FrameError> {
    if chunk.len() > MAX_ENCODED {
        return Err(FrameError::TooLong);
    }
    // COBS decode: output never overtakes input, so in place is safe.
    let (mut r, mut w) = (0, 0);
    while r < chunk.len() {
        let code = chunk[r] as usize;
        if code == 0 || r + code > chunk.len() {
            return Err(FrameError::BadCobs);
        }
        r += 1;
        for _ in 1..code {
            chunk[w] = chunk[r];
            w += 1;
            r += 1;
        }
        if code < 255 && r < chunk.len() {
            chunk[w] = 0;
            w += 1;
        }
    }
    let body = &chunk[..w];
    if body.len() < HEADER + 4 {
        return Err(FrameError::TooShort);
    }
    if body[..2] != magic {
        return Err(FrameError::BadMagic);
    }
    let len = usize::from(u16::from_le_bytes([body[4], body[5]]));
    if HEADER + len + 4 != body.len() {
        return Err(FrameError::BadLength);
    }
    let (data, crc) = body.split_at(HEADER + len);
    if crc32(data) != u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]) {
        return Err(FrameError::BadChecksum);
    }
    Ok(Message {
        kind: body[2],
        seq: body[3],
        payload: &body[HEADER..HEADER + len],
    })
}

/// Splits a byte stream into chunks and decodes those that are messages
/// (preceded by at least two zeros); everything else is ignored. Fixed
/// buffer, no allocation: the firmware's receiver.
pub struct Receiver {
    magic: [u8; 2],
    buf: [u8; MAX_ENCODED],
    len: usize,
    zeros: usize,
    /// The current chunk is a message candidate.
    framed: bool,
    /// The current chunk outgrew the buffer.
    overflow: bool,
}

impl Default for Receiver {
    fn default() -> Self {
        Self::new()
    }
}

impl Receiver {
    /// An empty receiver.
    pub const fn new() -> Self {
        Self::with_magic(MAGIC)
    }

    /// An empty receiver of another protocol's messages (its `magic`).
    pub const fn with_magic(magic: [u8; 2]) -> Self {
        Self {
            magic,
            buf: [0; MAX_ENCODED],
            len: 0,
            zeros: 0,
            framed: false,
            overflow: false,
        }
    }

    /// Takes one byte; at the end of a message chunk, the message or why it
    /// was rejected.
    pub fn push(&mut self, b: u8) -> Option<Result<Message<'_>, FrameError>> {
        if b != 0 {
            if self.len == 0 && !self.overflow {
                self.framed = self.zeros >= 2;
            }
            self.zeros = 0;
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            } else {
                self.overflow = true;
            }
            return None;
        }
        self.zeros += 1;
        let (len, framed, overflow) = (self.len, self.framed, self.overflow);
        self.len = 0;
        self.framed = false;
        self.overflow = false;
        if len == 0 || !framed {
            return None;
        }
        if overflow {
            return Some(Err(FrameError::TooLong));
        }
        Some(decode_framed(self.magic, &mut self.buf[..len]))
    }

    /// Forgets a partly received chunk (the sender went quiet mid-frame).
    pub fn reset(&mut self) {
        self.len = 0;
        self.framed = false;
        self.overflow = false;
    }

    /// True while a chunk is partly received.
    pub fn in_frame(&self) -> bool {
        self.len > 0
    }
}

/// The firmware's side of a serial line, for the request/response logic.
pub trait Link {
    /// Sends one byte.
    fn send(&mut self, b: u8);
    /// A received byte, if one is waiting.
    fn recv(&mut self) -> Option<u8>;
    /// A monotonic clock in microseconds.
    fn now_us(&mut self) -> u64;
}

/// How long the firmware waits for a reply before it asks again.
pub const RETRY_US: u64 = 1_000_000;
/// How many times it asks before giving up.
pub const ATTEMPTS: u32 = 30;

/// Why no command line came back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmdlineError {
    /// No valid reply after every attempt.
    NoReply,
    /// The reply (plus its NUL) does not fit the caller's buffer.
    TooLong,
}

/// Asks the host for the command line (request `seq`), waiting `retry_us`
/// for each of `attempts` tries; copies it into `out` NUL-terminated and
/// returns its length without the NUL. Frames that are corrupt, of another
/// kind or for another request are dropped.
pub fn request_cmdline<L: Link>(
    link: &mut L,
    rx: &mut Receiver,
    seq: u8,
    out: &mut [u8],
    retry_us: u64,
    attempts: u32,
) -> Result<usize, CmdlineError> {
    let size = (out.len() as u32).to_le_bytes();
    for _ in 0..attempts {
        encode(kind::GET_CMDLINE, seq, &size, |b| link.send(b));
        let start = link.now_us();
        while link.now_us().wrapping_sub(start) < retry_us {
            let Some(b) = link.recv() else { continue };
            if let Some(Ok(m)) = rx.push(b) {
                if m.kind == kind::CMDLINE && m.seq == seq {
                    let n = m.payload.len();
                    if n + 1 > out.len() {
                        return Err(CmdlineError::TooLong);
                    }
                    out[..n].copy_from_slice(m.payload);
                    out[n] = 0;
                    return Ok(n);
                }
            }
        }
    }
    Err(CmdlineError::NoReply)
}

/// The payload of an [`kind::EXIT`] message.
pub fn exit_payload(reason: u64, subcode: u64) -> [u8; 16] {
    let mut p = [0u8; 16];
    p[..8].copy_from_slice(&reason.to_le_bytes());
    p[8..].copy_from_slice(&subcode.to_le_bytes());
    p
}

#[cfg(hw)]
pub use hw::serve;

#[cfg(hw)]
mod hw {
    use super::*;
    use crate::exception::Frame;
    use core::sync::atomic::{AtomicU8, Ordering};

    struct Console;

    impl Link for Console {
        fn send(&mut self, b: u8) {
            crate::uart::CONSOLE.write_byte(b);
        }
        fn recv(&mut self) -> Option<u8> {
            crate::uart::CONSOLE.try_read_byte()
        }
        fn now_us(&mut self) -> u64 {
            crate::timer::uptime_us()
        }
    }

    static SEQ: AtomicU8 = AtomicU8::new(0);
    /// Errno after a failed call (SYS_ERRNO): EIO.
    const EIO: u64 = 5;

    fn send(kind: u8, payload: &[u8]) {
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        encode(kind, seq, payload, |b| Console.send(b));
    }

    /// Reads the `i`th 64-bit word of the parameter block at `block`.
    ///
    /// # Safety
    ///
    /// `block` points at a readable parameter block of more than `i` words
    /// (the semihosting ABI's contract with the caller).
    unsafe fn word(block: u64, i: usize) -> u64 {
        // SAFETY: the caller's contract.
        unsafe { core::ptr::read_volatile((block as *const u64).add(i)) }
    }

    /// Serves the semihosting call in `frame` if the exception is an
    /// undefined `HLT #0xF000` at the current EL; returns whether it did
    /// (then `frame` resumes after the instruction with the result in x0).
    pub fn serve(frame: &mut Frame) -> bool {
        if crate::esr::exception_class(frame.esr) != 0 || !frame.elr.is_multiple_of(4) {
            return false;
        }
        // SAFETY: ELR is the address of the instruction that was just
        // fetched and found undefined, so it is mapped, executable and (at
        // EL1, text is RX) readable; 4-byte aligned as checked.
        let insn = unsafe { core::ptr::read_volatile(frame.elr as *const u32) };
        if insn != HLT_F000 {
            return false;
        }
        let param = frame.x[1];
        // SAFETY (for every parameter access below): the semihosting ABI
        // makes x1 point at the operation's parameter block (or character /
        // string), valid for the duration of the call; the callers are
        // the semihosting crate and this crate, which follow it.
        let ret: u64 = match frame.x[0] {
            op::SYS_WRITEC => {
                // SAFETY: see above: x1 points at one character.
                let c = unsafe { core::ptr::read_volatile(param as *const u8) };
                send(kind::WRITE, &[c]);
                0
            }
            op::SYS_WRITE0 => {
                // SAFETY: see above: x1 points at a NUL-terminated string.
                let s = unsafe { core::ffi::CStr::from_ptr(param as *const core::ffi::c_char) };
                for chunk in s.to_bytes().chunks(256) {
                    send(kind::WRITE, chunk);
                }
                0
            }
            op::SYS_WRITE => {
                // SAFETY: see above: block {fd, buf, len}.
                let (fd, buf, len) = unsafe { (word(param, 0), word(param, 1), word(param, 2)) };
                if fd == 1 || fd == 2 {
                    // SAFETY: see above: buf is readable for len bytes.
                    let s = unsafe { core::slice::from_raw_parts(buf as *const u8, len as usize) };
                    for chunk in s.chunks(256) {
                        send(kind::WRITE, chunk);
                    }
                    0 // bytes not written
                } else {
                    len
                }
            }
            op::SYS_ERRNO => EIO,
            op::SYS_GET_CMDLINE => {
                // SAFETY: see above: block {buf, len}, buf writable for len.
                let (buf, len) = unsafe { (word(param, 0), word(param, 1)) };
                // SAFETY: see above.
                let out = unsafe { core::slice::from_raw_parts_mut(buf as *mut u8, len as usize) };
                let mut rx = Receiver::new();
                let seq = SEQ.fetch_add(1, Ordering::Relaxed);
                match request_cmdline(&mut Console, &mut rx, seq, out, RETRY_US, ATTEMPTS) {
                    Ok(n) => {
                        // SAFETY: see above: the block is writable; the
                        // length word is updated as the ABI says.
                        unsafe { core::ptr::write_volatile((param as *mut u64).add(1), n as u64) };
                        0
                    }
                    Err(_) => u64::MAX,
                }
            }
            op::SYS_EXIT | op::SYS_EXIT_EXTENDED => {
                // SAFETY: see above: block {reason, subcode} (AArch64).
                let (reason, subcode) = unsafe { (word(param, 0), word(param, 1)) };
                let payload = exit_payload(reason, subcode);
                // Said again every second until the host resets us (or
                // asks us to reset: RESET), in case line noise ate it.
                let mut rx = Receiver::new();
                loop {
                    send(kind::EXIT, &payload);
                    crate::uart::CONSOLE.flush();
                    let start = Console.now_us();
                    while Console.now_us().wrapping_sub(start) < RETRY_US {
                        let Some(b) = Console.recv() else { continue };
                        if let Some(Ok(m)) = rx.push(b) {
                            if m.kind == kind::RESET {
                                crate::power::reset();
                            }
                        }
                    }
                }
            }
            _ => u64::MAX,
        };
        frame.x[0] = ret;
        frame.elr += 4;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, seq: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        encode(kind, seq, payload, |b| v.push(b));
        v
    }

    type Received = Result<(u8, u8, Vec<u8>), FrameError>;

    fn receive_all(rx: &mut Receiver, bytes: &[u8]) -> Vec<Received> {
        let mut got = Vec::new();
        for &b in bytes {
            if let Some(r) = rx.push(b) {
                got.push(r.map(|m| (m.kind, m.seq, m.payload.to_vec())));
            }
        }
        got
    }

    #[test]
    fn crc_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn round_trips_every_length_including_cobs_group_edges() {
        for len in [
            0,
            1,
            5,
            247,
            248,
            249,
            253,
            254,
            255,
            500,
            1024,
            MAX_PAYLOAD,
        ] {
            for fill in [0u8, 1, 0xff] {
                let payload: Vec<u8> = (0..len)
                    .map(|i| if fill == 1 { (i % 251) as u8 } else { fill })
                    .collect();
                let f = frame(kind::CMDLINE, 7, &payload);
                assert_eq!(&f[..2], &[0, 0]);
                assert_eq!(*f.last().unwrap(), 0);
                assert!(!f[2..f.len() - 1].contains(&0), "len {len} fill {fill}");
                assert!(f.len() - 3 <= MAX_ENCODED);
                let mut rx = Receiver::new();
                assert_eq!(
                    receive_all(&mut rx, &f),
                    vec![Ok((kind::CMDLINE, 7, payload.clone()))],
                    "len {len} fill {fill}"
                );
            }
        }
    }

    #[test]
    fn chunks_after_a_single_zero_are_not_messages() {
        // What defmt sends: nonempty chunks each ended by one zero.
        let f = frame(kind::WRITE, 1, b"hi");
        let mut rx = Receiver::new();
        let mut defmt_like = vec![1, 2, 3, 0];
        defmt_like.extend_from_slice(&f[2..]); // the body after one zero only
        assert!(receive_all(&mut rx, &defmt_like).is_empty());
        // With the two zeros it is one.
        assert_eq!(receive_all(&mut rx, &f).len(), 1);
    }

    #[test]
    fn corrupt_frames_are_rejected_and_the_next_one_is_received() {
        let good = frame(kind::CMDLINE, 3, b"run_addr 1234");
        let mut bad_crc = good.clone();
        bad_crc[good.len() / 2] ^= 0x10;
        if bad_crc[good.len() / 2] == 0 {
            bad_crc[good.len() / 2] = 0x55;
        }
        let truncated = {
            let mut t = good[..good.len() - 4].to_vec();
            t.push(0);
            t
        };
        let mut wire = Vec::new();
        wire.extend_from_slice(&bad_crc);
        wire.extend_from_slice(&[0x13, 0x37, 0xff, 0x00, 0x42]); // noise
        wire.extend_from_slice(&truncated);
        wire.extend_from_slice(&good);
        let mut rx = Receiver::new();
        let got = receive_all(&mut rx, &wire);
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(got[0].is_err());
        assert!(got[1].is_err());
        assert_eq!(got[2], Ok((kind::CMDLINE, 3, b"run_addr 1234".to_vec())));
    }

    #[test]
    fn an_endless_chunk_is_rejected_not_overflowed() {
        let mut rx = Receiver::new();
        let mut wire = vec![0, 0];
        wire.extend(std::iter::repeat_n(7u8, MAX_ENCODED + 10));
        wire.push(0);
        assert_eq!(receive_all(&mut rx, &wire), vec![Err(FrameError::TooLong)]);
        let good = frame(kind::CMDLINE, 0, b"x");
        assert_eq!(receive_all(&mut rx, &good).len(), 1);
    }

    #[test]
    fn decode_errors_are_typed() {
        assert_eq!(decode_in_place(&mut [5, 1]), Err(FrameError::BadCobs));
        assert_eq!(decode_in_place(&mut [2, 1]), Err(FrameError::TooShort));
        let mut f = frame(kind::WRITE, 0, b"abc");
        f[3] ^= 1; // inside the magic (after the code byte)
        let n = f.len();
        assert!(decode_in_place(&mut f[2..n - 1]).is_err());
    }

    /// A simulated line: the host answers each request after `delay` polls,
    /// `drop_replies` replies are lost, `corrupt` replies get a flipped bit.
    struct SimLink {
        clock: u64,
        to_host: Vec<u8>,
        to_fw: std::collections::VecDeque<u8>,
        host_rx: Receiver,
        requests: u32,
        drop_replies: u32,
        corrupt: u32,
        stale_first: bool,
        cmdline: Vec<u8>,
    }

    impl Link for SimLink {
        fn send(&mut self, b: u8) {
            self.to_host.push(b);
            if let Some(Ok(m)) = self.host_rx.push(b) {
                assert_eq!(m.kind, kind::GET_CMDLINE);
                let seq = m.seq;
                self.requests += 1;
                if self.stale_first {
                    self.stale_first = false;
                    let stale = frame(kind::CMDLINE, seq.wrapping_sub(1), b"stale");
                    self.to_fw.extend(stale);
                }
                if self.drop_replies > 0 {
                    self.drop_replies -= 1;
                    return;
                }
                let mut reply = frame(kind::CMDLINE, seq, &self.cmdline.clone());
                if self.corrupt > 0 {
                    self.corrupt -= 1;
                    let at = reply.len() - 3;
                    reply[at] = if reply[at] == 0xaa { 0xbb } else { 0xaa };
                }
                self.to_fw.extend(reply);
            }
        }
        fn recv(&mut self) -> Option<u8> {
            self.to_fw.pop_front()
        }
        fn now_us(&mut self) -> u64 {
            self.clock += 10;
            self.clock
        }
    }

    fn sim(drop_replies: u32, corrupt: u32, stale_first: bool) -> SimLink {
        SimLink {
            clock: 0,
            to_host: Vec::new(),
            to_fw: Default::default(),
            host_rx: Receiver::new(),
            requests: 0,
            drop_replies,
            corrupt,
            stale_first,
            cmdline: b"run_addr 1234 entry_el=1".to_vec(),
        }
    }

    #[test]
    fn cmdline_request_gets_the_reply() {
        let mut link = sim(0, 0, false);
        let mut out = [0xeeu8; 64];
        let n = request_cmdline(&mut link, &mut Receiver::new(), 9, &mut out, 1000, 3);
        assert_eq!(n, Ok(24));
        assert_eq!(&out[..25], b"run_addr 1234 entry_el=1\0");
        assert_eq!(link.requests, 1);
    }

    #[test]
    fn lost_and_corrupt_replies_are_retransmitted() {
        let mut link = sim(1, 1, true);
        let mut out = [0u8; 64];
        let n = request_cmdline(&mut link, &mut Receiver::new(), 9, &mut out, 1000, 5);
        assert_eq!(n, Ok(24));
        // One lost, one corrupt (and a stale reply for another request
        // ignored): the third request is answered.
        assert_eq!(link.requests, 3);
    }

    #[test]
    fn no_host_is_a_typed_error_after_the_attempts() {
        let mut link = sim(u32::MAX, 0, false);
        let mut out = [0u8; 64];
        let r = request_cmdline(&mut link, &mut Receiver::new(), 0, &mut out, 1000, 4);
        assert_eq!(r, Err(CmdlineError::NoReply));
        assert_eq!(link.requests, 4);
    }

    #[test]
    fn a_reply_too_long_for_the_buffer_is_refused() {
        let mut link = sim(0, 0, false);
        let mut out = [0u8; 8];
        let r = request_cmdline(&mut link, &mut Receiver::new(), 0, &mut out, 1000, 2);
        assert_eq!(r, Err(CmdlineError::TooLong));
    }

    #[test]
    fn exit_payload_layout() {
        let p = exit_payload(ADP_STOPPED_APPLICATION_EXIT, 134);
        assert_eq!(u64::from_le_bytes(p[..8].try_into().unwrap()), 0x20026);
        assert_eq!(u64::from_le_bytes(p[8..].try_into().unwrap()), 134);
    }
}
