//! Live decoding of the firmware's defmt stream (defmt wire format, rzcobs
//! framing) against the ELF it came from, with levels, timestamps and
//! file:line locations.

use crate::error::{Error, Result};
use defmt_decoder::{DecodeError, Frame, Locations, Table};
use std::io::Read;
use std::path::Path;

/// One decoded log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// `ERROR`, `WARN`, `INFO`, `DEBUG`, `TRACE`, or `PRINT` for `println!`.
    pub level: String,
    /// The firmware's timestamp, formatted (seconds since reset).
    pub timestamp: String,
    /// The message text.
    pub message: String,
    /// `file:line` of the log statement, when the ELF has it.
    pub location: Option<String>,
}

impl std::fmt::Display for LogLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:>12} {:<5} {}",
            self.timestamp, self.level, self.message
        )?;
        if let Some(loc) = &self.location {
            write!(f, "  ({loc})")?;
        }
        Ok(())
    }
}

/// The decoding tables of one ELF.
pub struct Decoder {
    table: Table,
    locations: Option<Locations>,
}

impl Decoder {
    /// Reads the defmt tables (and, when present, DWARF locations) of the
    /// ELF `elf` read from `path`.
    ///
    /// # Errors
    ///
    /// [`Error::Elf`] naming `path` when the ELF has no readable defmt table.
    pub fn new(elf: &[u8], path: &Path) -> Result<Self> {
        let elf_error = |what: String| Error::Elf {
            path: path.to_path_buf(),
            what,
        };
        let table = Table::parse(elf)
            .map_err(|e| elf_error(format!("defmt table: {e}")))?
            .ok_or_else(|| elf_error("the ELF has no defmt data".into()))?;
        let locations = table.get_locations(elf).ok().filter(|l| !l.is_empty());
        Ok(Self { table, locations })
    }

    /// [`Decoder::new`] for the ELF file at `path`.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when it cannot be read, else as [`Decoder::new`].
    pub fn read(path: &Path) -> Result<Self> {
        Self::new(&std::fs::read(path).map_err(Error::io(path))?, path)
    }

    fn line(&self, frame: &Frame<'_>) -> LogLine {
        let level = frame
            .level()
            .map(|l| l.as_str().to_uppercase())
            .unwrap_or_else(|| "PRINT".into());
        let timestamp = frame
            .display_timestamp()
            .map(|t| t.to_string())
            .unwrap_or_default();
        let location = self
            .locations
            .as_ref()
            .and_then(|locs| locs.get(&frame.index()))
            .map(|loc| {
                let file = loc.file.to_string_lossy();
                // Keep paths short: from the crate directory on.
                let short = ["/firmware/", "/hal/", "/memdesc/", "/src/"]
                    .iter()
                    .find_map(|m| file.rfind(m).map(|i| &file[i + 1..]))
                    .unwrap_or(&file);
                format!("{short}:{}", loc.line)
            });
        LogLine {
            level,
            timestamp,
            message: frame.display_message().to_string(),
            location,
        }
    }

    /// Decodes everything `reader` yields until EOF, calling `on_line` for
    /// each frame. Malformed frames (a reset mid-frame, line noise) are
    /// reported as a line and skipped; rzcobs resynchronises at the next frame.
    pub fn decode_stream(&self, mut reader: impl Read, mut on_line: impl FnMut(LogLine)) {
        let mut stream = self.table.new_stream_decoder();
        let mut buf = [0u8; 4096];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            stream.received(&buf[..n]);
            loop {
                match stream.decode() {
                    Ok(frame) => on_line(self.line(&frame)),
                    Err(DecodeError::UnexpectedEof) => break,
                    Err(DecodeError::Malformed) => on_line(LogLine {
                        level: "HOST".into(),
                        timestamp: String::new(),
                        message: "(malformed defmt frame skipped)".into(),
                        location: None,
                    }),
                }
            }
        }
    }
}
