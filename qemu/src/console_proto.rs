//! The host's side of semihosting over the console (the frame format is in
//! `hal::semihost_console`): the byte stream from the board's console is
//! split into defmt bytes (for the defmt decoder) and console messages, and
//! each message is answered the way QEMU's semihosting would: the command
//! line for GET_CMDLINE, text for WRITE, the exit status for EXIT.

use hal::semihost_console::{self as proto, kind, FrameError};
use std::collections::VecDeque;
use std::io::Read;

/// One console message, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    /// One of `hal::semihost_console::kind`.
    pub kind: u8,
    /// Request number.
    pub seq: u8,
    /// Payload bytes.
    pub payload: Vec<u8>,
}

/// What the demultiplexer found in the stream, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Bytes for the defmt decoder (whole rzcobs frames with their zero).
    Defmt(Vec<u8>),
    /// A valid console message.
    Message(Msg),
    /// A chunk framed as a console message that failed its checks.
    Rejected(FrameError),
}

/// Splits the console stream: a chunk (the bytes between zeros) after at
/// least two zeros is a console message, anything else is defmt.
#[derive(Debug, Default)]
pub struct Demux {
    chunk: Vec<u8>,
    zeros: usize,
    framed: bool,
}

impl Demux {
    /// Feeds bytes; returns the pieces they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Piece> {
        let mut out = Vec::new();
        for &b in bytes {
            if b != 0 {
                if self.chunk.is_empty() {
                    self.framed = self.zeros >= 2;
                }
                self.zeros = 0;
                // Bound a framed chunk that never ends (noise, no zero).
                if !(self.framed && self.chunk.len() > proto::MAX_ENCODED) {
                    self.chunk.push(b);
                }
                continue;
            }
            self.zeros += 1;
            if self.chunk.is_empty() {
                continue;
            }
            let mut chunk = std::mem::take(&mut self.chunk);
            if self.framed {
                out.push(match proto::decode_in_place(&mut chunk) {
                    Ok(m) => Piece::Message(Msg {
                        kind: m.kind,
                        seq: m.seq,
                        payload: m.payload.to_vec(),
                    }),
                    Err(e) => Piece::Rejected(e),
                });
            } else {
                chunk.push(0);
                match out.last_mut() {
                    Some(Piece::Defmt(d)) => d.extend_from_slice(&chunk),
                    _ => out.push(Piece::Defmt(chunk)),
                }
            }
        }
        out
    }
}

/// The bytes of one framed message.
pub fn encode(kind: u8, seq: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    proto::encode(kind, seq, payload, |b| v.push(b));
    v
}

/// The exit status QEMU's semihosting gives for SYS_EXIT {reason, subcode}:
/// the subcode for `ADP_Stopped_ApplicationExit`, else 1.
pub fn exit_status(reason: u64, subcode: u64) -> i32 {
    if reason == proto::ADP_STOPPED_APPLICATION_EXIT {
        subcode as i32
    } else {
        1
    }
}

/// What to do about one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send these bytes to the board.
    Reply(Vec<u8>),
    /// Console text from the firmware.
    Output(String),
    /// The program ended with this status.
    Exit(i32),
    /// Nothing (an unknown or malformed message, described).
    Ignore(String),
}

/// Answers a message as semihosting would, with `cmdline` as the command line.
pub fn answer(msg: &Msg, cmdline: &str) -> Action {
    match msg.kind {
        kind::GET_CMDLINE => Action::Reply(encode(kind::CMDLINE, msg.seq, cmdline.as_bytes())),
        kind::WRITE => Action::Output(String::from_utf8_lossy(&msg.payload).into_owned()),
        kind::EXIT if msg.payload.len() == 16 => {
            let word = |i: usize| {
                let mut w = [0u8; 8];
                w.copy_from_slice(&msg.payload[i * 8..i * 8 + 8]);
                u64::from_le_bytes(w)
            };
            Action::Exit(exit_status(word(0), word(1)))
        }
        k => Action::Ignore(format!(
            "console message kind {k:#04x} with {} payload bytes ignored",
            msg.payload.len()
        )),
    }
}

/// A reader of the console that yields only the defmt bytes and hands every
/// other piece to `on_piece`, in stream order: a message is handed over only
/// after the defmt bytes before it have been returned (so the log lines
/// before an exit are decoded before the exit is seen).
pub struct DemuxReader<R, F> {
    inner: R,
    demux: Demux,
    pending: VecDeque<Piece>,
    on_piece: F,
}

impl<R: Read, F: FnMut(Piece)> DemuxReader<R, F> {
    /// Wraps `inner`.
    pub fn new(inner: R, on_piece: F) -> Self {
        Self {
            inner,
            demux: Demux::default(),
            pending: VecDeque::new(),
            on_piece,
        }
    }
}

impl<R: Read, F: FnMut(Piece)> Read for DemuxReader<R, F> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match self.pending.pop_front() {
                Some(Piece::Defmt(mut d)) => {
                    let n = d.len().min(buf.len());
                    buf[..n].copy_from_slice(&d[..n]);
                    if n < d.len() {
                        self.pending.push_front(Piece::Defmt(d.split_off(n)));
                    }
                    return Ok(n);
                }
                Some(other) => (self.on_piece)(other),
                None => {
                    let mut tmp = [0u8; 4096];
                    let n = self.inner.read(&mut tmp)?;
                    if n == 0 {
                        return Ok(0);
                    }
                    self.pending.extend(self.demux.push(&tmp[..n]));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defmt_like(n: u8) -> Vec<u8> {
        // Nonempty, zero-free, one zero at the end: what rzcobs frames are.
        let mut v: Vec<u8> = (1..=n).collect();
        v.push(0);
        v
    }

    fn exit_msg(seq: u8, code: u64) -> Vec<u8> {
        encode(
            kind::EXIT,
            seq,
            &proto::exit_payload(proto::ADP_STOPPED_APPLICATION_EXIT, code),
        )
    }

    #[test]
    fn defmt_and_messages_are_separated_in_order() {
        let mut wire = defmt_like(5);
        wire.extend(encode(kind::GET_CMDLINE, 0, &1024u32.to_le_bytes()));
        wire.extend(defmt_like(9));
        wire.extend(defmt_like(3));
        wire.extend(exit_msg(1, 0));
        // Fed one byte at a time and all at once: the same pieces.
        for split in [1, wire.len()] {
            let mut d = Demux::default();
            let pieces: Vec<Piece> = wire.chunks(split).flat_map(|c| d.push(c)).collect();
            let mut merged: Vec<Piece> = Vec::new();
            for p in pieces {
                match (merged.last_mut(), p) {
                    (Some(Piece::Defmt(a)), Piece::Defmt(b)) => a.extend(b),
                    (_, p) => merged.push(p),
                }
            }
            let mut second = defmt_like(9);
            second.extend(defmt_like(3));
            assert_eq!(
                merged,
                vec![
                    Piece::Defmt(defmt_like(5)),
                    Piece::Message(Msg {
                        kind: kind::GET_CMDLINE,
                        seq: 0,
                        payload: 1024u32.to_le_bytes().to_vec()
                    }),
                    Piece::Defmt(second),
                    Piece::Message(Msg {
                        kind: kind::EXIT,
                        seq: 1,
                        payload: proto::exit_payload(proto::ADP_STOPPED_APPLICATION_EXIT, 0)
                            .to_vec()
                    }),
                ]
            );
        }
    }

    /// Bad checksum, a truncated frame and noise between frames: each bad
    /// one is rejected, and both the defmt stream and the next message come
    /// through.
    #[test]
    fn corrupted_frames_are_rejected_and_the_stream_resynchronises() {
        let good = exit_msg(4, 134);
        let mut bad_crc = encode(kind::WRITE, 2, b"hello, world");
        let at = bad_crc.len() - 4;
        bad_crc[at] = if bad_crc[at] == 0x77 { 0x78 } else { 0x77 };
        let mut truncated = encode(kind::WRITE, 3, b"cut short here");
        truncated.truncate(truncated.len() - 6);
        truncated.push(0);

        let mut wire = bad_crc;
        wire.extend(defmt_like(4));
        wire.extend([0x00, 0x00, 0x5a, 0xa5, 0xff]); // noise, framed like a message
        wire.extend(truncated);
        wire.extend([0x11, 0x22]); // noise glued to the next frame's zeros
        wire.extend(good.iter().copied());
        wire.extend(defmt_like(6));
        let pieces = Demux::default().push(&wire);
        let rejected = pieces
            .iter()
            .filter(|p| matches!(p, Piece::Rejected(_)))
            .count();
        assert_eq!(rejected, 3, "{pieces:?}");
        // The noise before the good frame ended up in a defmt chunk (which
        // the defmt decoder rejects on its own); the good message survives.
        let msgs: Vec<_> = pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Message(m) => Some(answer(m, "")),
                _ => None,
            })
            .collect();
        assert_eq!(msgs, vec![Action::Exit(134)]);
        assert_eq!(pieces.last(), Some(&Piece::Defmt(defmt_like(6))));
        assert!(pieces.contains(&Piece::Defmt(defmt_like(4))));
    }

    #[test]
    fn get_cmdline_is_answered_with_the_same_seq() {
        let m = Msg {
            kind: kind::GET_CMDLINE,
            seq: 42,
            payload: vec![0, 4, 0, 0],
        };
        let Action::Reply(bytes) = answer(&m, "run_addr 99 cpu=max") else {
            panic!("no reply");
        };
        let mut rx = proto::Receiver::new();
        let got: Vec<_> = bytes
            .iter()
            .filter_map(|&b| {
                rx.push(b)
                    .map(|r| r.map(|m| (m.kind, m.seq, m.payload.to_vec())))
            })
            .collect();
        assert_eq!(
            got,
            vec![Ok((kind::CMDLINE, 42, b"run_addr 99 cpu=max".to_vec()))]
        );
    }

    #[test]
    fn exit_statuses_follow_qemu() {
        assert_eq!(exit_status(proto::ADP_STOPPED_APPLICATION_EXIT, 0), 0);
        assert_eq!(exit_status(proto::ADP_STOPPED_APPLICATION_EXIT, 134), 134);
        assert_eq!(exit_status(0x20023, 0), 1);
        let short = Msg {
            kind: kind::EXIT,
            seq: 0,
            payload: vec![1, 2],
        };
        assert!(matches!(answer(&short, ""), Action::Ignore(_)));
    }

    #[test]
    fn reader_yields_defmt_before_the_message_that_follows_it() {
        let mut wire = defmt_like(3);
        wire.extend(exit_msg(0, 7));
        let events = std::cell::RefCell::new(Vec::<String>::new());
        let mut r = DemuxReader::new(&wire[..], |p| {
            events.borrow_mut().push(format!("{p:?}"));
        });
        let mut buf = [0u8; 64];
        let n = r.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], &defmt_like(3)[..]);
        assert!(events.borrow().is_empty(), "message seen before its defmt");
        assert_eq!(r.read(&mut buf).unwrap(), 0);
        assert_eq!(events.borrow().len(), 1);
    }
}
