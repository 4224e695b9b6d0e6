//! The resident loader (`hal::loader_proto` describes the protocol): on
//! the Pi it is `kernel8.img`, on the EVK and ZCU102 U-Boot starts it. It
//! says `memfw-loader <version> board=<name> ready` once, then HELLO every
//! second until a host speaks, loads the segments the host sends, tells
//! whether an image is already there, and runs one at the EL it was
//! entered at, with x0 as the board passed it.
#![no_std]
#![no_main]
#![deny(unsafe_code)]

use hal::console::CONSOLE;
use hal::loader_proto::{self as proto, kind, Hello, Memory, Outcome, Server};

hal::loader_entry!(main);

/// How long the line may be quiet before a partial frame is dropped and
/// HELLO is repeated.
const QUIET_US: u64 = 1_000_000;

fn send(kind: u8, seq: u8, payload: &[u8]) {
    proto::encode(kind, seq, payload, |b| CONSOLE.write_byte(b));
}

fn hello(mem: &dyn Memory, el: u8) -> Hello {
    let board = hal::board::CURRENT.name.as_bytes();
    let mut h = Hello {
        version: proto::VERSION,
        el,
        loader: mem.loader(),
        ram: [Default::default(); proto::MAX_RAM],
        ram_count: 0,
        name: [0; proto::MAX_NAME],
        name_len: board.len().min(proto::MAX_NAME) as u8,
    };
    for (slot, r) in h.ram.iter_mut().zip(mem.ram()) {
        *slot = *r;
        h.ram_count += 1;
    }
    h.name[..usize::from(h.name_len)].copy_from_slice(&board[..usize::from(h.name_len)]);
    h
}

fn main(x0: u64, el: u8) -> ! {
    CONSOLE.init();
    let mut mem = hal::loader::boot_memory(x0);
    proto::ready_line(
        env!("CARGO_PKG_VERSION"),
        hal::board::CURRENT.name,
        &mut |b| CONSOLE.write_bytes(b),
    );
    let hello = hello(&mem, el);
    let hello_payload = hello.encode();
    send(kind::HELLO, 0, hello_payload.bytes());
    let mut server = Server::new(&mem);
    let mut rx = proto::receiver();
    let mut last_rx = hal::timer::uptime_us();
    let mut last_hello = last_rx;
    loop {
        let now = hal::timer::uptime_us();
        let Some(b) = CONSOLE.try_read_byte() else {
            if now.wrapping_sub(last_rx) > QUIET_US {
                // The host went quiet (or away) mid-frame: the next frame
                // starts afresh; and say hello for whoever comes next.
                rx.reset();
                if now.wrapping_sub(last_hello) > QUIET_US {
                    send(kind::HELLO, 0, hello_payload.bytes());
                    last_hello = now;
                }
            }
            continue;
        };
        last_rx = now;
        let Some(frame) = rx.push(b) else { continue };
        let (seq, outcome) = match frame {
            Ok(m) => (m.seq, server.handle(&mut mem, Ok((m.kind, m.payload)))),
            Err(e) => (proto::SEQ_UNKNOWN, server.handle(&mut mem, Err(e))),
        };
        match outcome {
            Outcome::Reply(k) => send(k, seq, server.reply()),
            Outcome::Run {
                entry,
                x0: given,
                x,
            } => {
                send(kind::ACK, seq, &[]);
                hal::loader::jump(entry, [given.unwrap_or(x0), x[0], x[1], x[2]]);
            }
        }
    }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    CONSOLE.write_bytes(b"\r\nmemfw-loader: panic\r\n");
    loop {
        core::hint::spin_loop();
    }
}
