//! A small QMP client (QEMU Machine Protocol, docs/interop/qmp-spec) for
//! driving the virtio-balloon from the host: `balloon` sets the guest's target
//! size in bytes, `query-balloon` reads `actual`, and `BALLOON_CHANGE` events
//! report progress.

use serde_json::{json, Value};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// One message from the server.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// The greeting sent on connect (`{"QMP": {...}}`).
    Greeting(Value),
    /// A successful command's result.
    Return(Value),
    /// A failed command: error class and description.
    Error { class: String, desc: String },
    /// An asynchronous event.
    Event { name: String, data: Value },
}

/// Errors of the QMP client.
#[derive(Debug)]
pub enum QmpError {
    /// Socket trouble.
    Io(std::io::Error),
    /// A line that is not a QMP message.
    Protocol(String),
    /// The server answered with an error.
    Command { class: String, desc: String },
    /// The server closed the connection.
    Closed,
}

impl std::fmt::Display for QmpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) => write!(f, "QMP socket: {e}"),
            Self::Protocol(s) => write!(f, "QMP protocol: {s}"),
            Self::Command { class, desc } => write!(f, "QMP error {class}: {desc}"),
            Self::Closed => write!(f, "QMP connection closed"),
        }
    }
}

impl std::error::Error for QmpError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<std::io::Error> for QmpError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

/// Classifies one line of QMP output.
pub fn parse_message(line: &str) -> Result<Message, QmpError> {
    let v: Value =
        serde_json::from_str(line).map_err(|e| QmpError::Protocol(format!("{e}: {line}")))?;
    if let Some(g) = v.get("QMP") {
        return Ok(Message::Greeting(g.clone()));
    }
    if let Some(r) = v.get("return") {
        return Ok(Message::Return(r.clone()));
    }
    if let Some(e) = v.get("error") {
        let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        return Ok(Message::Error {
            class: s("class"),
            desc: s("desc"),
        });
    }
    if let Some(name) = v.get("event").and_then(Value::as_str) {
        return Ok(Message::Event {
            name: name.to_string(),
            data: v.get("data").cloned().unwrap_or(Value::Null),
        });
    }
    Err(QmpError::Protocol(format!("unrecognised message: {line}")))
}

/// A connected, capability-negotiated QMP session.
pub struct Qmp<S: BufRead + Write> {
    stream: S,
    /// Events received while waiting for command results.
    pub events: VecDeque<(String, Value)>,
}

/// A socket split into a buffered reader and a writer.
pub struct SocketIo {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl std::io::Read for SocketIo {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.reader.read(buf)
    }
}

impl BufRead for SocketIo {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        self.reader.fill_buf()
    }
    fn consume(&mut self, n: usize) {
        self.reader.consume(n)
    }
}

impl Write for SocketIo {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.writer.write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.writer.flush()
    }
}

impl Qmp<SocketIo> {
    /// Connects to QEMU's socket, retrying until `timeout` (QEMU creates it
    /// shortly after start), and negotiates capabilities.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let deadline = Instant::now() + timeout;
        let sock = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => return Err(QmpError::Io(e)),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        sock.set_read_timeout(Some(Duration::from_secs(10)))?;
        let writer = sock.try_clone()?;
        Self::handshake(SocketIo {
            reader: BufReader::new(sock),
            writer,
        })
    }
}

impl<S: BufRead + Write> Qmp<S> {
    /// Reads the greeting and enters command mode.
    pub fn handshake(stream: S) -> Result<Self, QmpError> {
        let mut q = Self {
            stream,
            events: VecDeque::new(),
        };
        match q.read_message()? {
            Message::Greeting(_) => {}
            other => {
                return Err(QmpError::Protocol(format!(
                    "expected greeting, got {other:?}"
                )))
            }
        }
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    fn read_message(&mut self) -> Result<Message, QmpError> {
        let mut line = String::new();
        loop {
            line.clear();
            if self.stream.read_line(&mut line)? == 0 {
                return Err(QmpError::Closed);
            }
            if !line.trim().is_empty() {
                return parse_message(line.trim());
            }
        }
    }

    /// Runs a command and returns its result; events that arrive meanwhile
    /// are queued in `events`.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let mut req = json!({ "execute": command });
        if let Some(a) = arguments {
            req["arguments"] = a;
        }
        writeln!(self.stream, "{req}")?;
        self.stream.flush()?;
        loop {
            match self.read_message()? {
                Message::Return(v) => return Ok(v),
                Message::Error { class, desc } => return Err(QmpError::Command { class, desc }),
                Message::Event { name, data } => self.events.push_back((name, data)),
                Message::Greeting(_) => return Err(QmpError::Protocol("second greeting".into())),
            }
        }
    }

    /// Waits for the next event (queued or new); `Err(Closed)` once QEMU
    /// has exited.
    pub fn next_event(&mut self) -> Result<(String, Value), QmpError> {
        if let Some(e) = self.events.pop_front() {
            return Ok(e);
        }
        match self.read_message()? {
            Message::Event { name, data } => Ok((name, data)),
            other => Err(QmpError::Protocol(format!(
                "unexpected message while waiting for events: {other:?}"
            ))),
        }
    }

    /// Asks the balloon to bring the guest to `target_bytes` of RAM.
    // Used by the tests now and by the host side of the balloon driver next.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn balloon(&mut self, target_bytes: u64) -> Result<(), QmpError> {
        self.execute("balloon", Some(json!({ "value": target_bytes })))
            .map(drop)
    }

    /// The guest's current size in bytes as the balloon device reports it.
    pub fn query_balloon(&mut self) -> Result<u64, QmpError> {
        let v = self.execute("query-balloon", None)?;
        v.get("actual")
            .and_then(Value::as_u64)
            .ok_or_else(|| QmpError::Protocol(format!("no actual in {v}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// An in-memory duplex: scripted server output, captured client input.
    struct Fake {
        input: Cursor<Vec<u8>>,
        sent: Vec<u8>,
    }
    impl std::io::Read for Fake {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.input.read(buf)
        }
    }
    impl BufRead for Fake {
        fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
            self.input.fill_buf()
        }
        fn consume(&mut self, n: usize) {
            self.input.consume(n)
        }
    }
    impl Write for Fake {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.sent.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    fn fake(script: &str) -> Fake {
        Fake {
            input: Cursor::new(script.as_bytes().to_vec()),
            sent: Vec::new(),
        }
    }

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}}, "capabilities": []}}"#;

    #[test]
    fn classifies_messages() {
        assert!(matches!(parse_message(GREETING), Ok(Message::Greeting(_))));
        assert_eq!(
            parse_message(r#"{"return": {}}"#).unwrap(),
            Message::Return(json!({}))
        );
        assert_eq!(
            parse_message(r#"{"error": {"class": "DeviceNotActive", "desc": "No balloon device has been activated"}}"#)
                .unwrap(),
            Message::Error { class: "DeviceNotActive".into(), desc: "No balloon device has been activated".into() }
        );
        assert_eq!(
            parse_message(r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "BALLOON_CHANGE", "data": {"actual": 1073741824}}"#)
                .unwrap(),
            Message::Event { name: "BALLOON_CHANGE".into(), data: json!({"actual": 1073741824u64}) }
        );
        assert!(matches!(
            parse_message("{\"neither\": 1}"),
            Err(QmpError::Protocol(_))
        ));
        assert!(matches!(
            parse_message("not json"),
            Err(QmpError::Protocol(_))
        ));
    }

    #[test]
    fn handshake_balloon_and_query_with_interleaved_event() {
        let script = format!(
            "{GREETING}\n{{\"return\": {{}}}}\n{{\"return\": {{}}}}\n\
             {{\"event\": \"BALLOON_CHANGE\", \"data\": {{\"actual\": 805306368}}}}\n\
             {{\"return\": {{\"actual\": 805306368}}}}\n"
        );
        let mut q = Qmp::handshake(fake(&script)).expect("handshake");
        q.balloon(768 << 20).expect("balloon");
        assert_eq!(q.query_balloon().expect("query"), 768 << 20);
        assert_eq!(
            q.next_event().expect("queued event"),
            ("BALLOON_CHANGE".into(), json!({"actual": 805306368u64}))
        );
        let sent = String::from_utf8(q.stream.sent).unwrap();
        let lines: Vec<Value> = sent
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0], json!({"execute": "qmp_capabilities"}));
        assert_eq!(
            lines[1],
            json!({"execute": "balloon", "arguments": {"value": 805306368u64}})
        );
        assert_eq!(lines[2], json!({"execute": "query-balloon"}));
    }

    #[test]
    fn command_errors_and_closed_connections_are_typed() {
        let script = format!("{GREETING}\n{{\"return\": {{}}}}\n{{\"error\": {{\"class\": \"GenericError\", \"desc\": \"nope\"}}}}\n");
        let mut q = Qmp::handshake(fake(&script)).expect("handshake");
        assert!(
            matches!(q.query_balloon(), Err(QmpError::Command { ref class, .. }) if class == "GenericError")
        );
        assert!(matches!(q.query_balloon(), Err(QmpError::Closed)));
        assert!(matches!(q.next_event(), Err(QmpError::Closed)));
        assert!(matches!(
            Qmp::handshake(fake("{\"return\": {}}\n")),
            Err(QmpError::Protocol(_))
        ));
    }
}
