//! Reads embedded-test 0.7's test table from a test ELF.
//!
//! Each test is a symbol in a section named `.embedded_test*` whose *name* is
//! a JSON object (`name`, `ignored`, `should_panic`, optional `timeout`) and
//! whose value is a `(fn() -> !, &'static str)` tuple; the target is started
//! with `run_addr <address of the fn>` on its semihosting command line.
//! probe-rs reads these tuples as 32-bit only, so for AArch64 this reader is ours.

use object::{Object, ObjectSection, ObjectSymbol, SectionKind};
use serde::Deserialize;

/// One on-target test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestCase {
    /// The test function's name.
    pub name: String,
    /// `#[ignore]`.
    pub ignored: bool,
    /// `#[should_panic]`.
    pub should_panic: bool,
    /// Timeout in seconds (`#[timeout]` or the suite's default), if any.
    pub timeout: Option<u32>,
    /// Address of the test's entry function, for `run_addr`.
    pub addr: u64,
}

#[derive(Deserialize)]
struct SymbolJson {
    name: String,
    #[serde(default)]
    ignored: bool,
    #[serde(default)]
    should_panic: bool,
    #[serde(default)]
    timeout: Option<u32>,
}

/// Why a test table could not be read.
#[derive(Debug, PartialEq, Eq)]
pub enum ElfError {
    /// Not an ELF `object` can read.
    Parse(String),
    /// No `.embedded_test.meta` version word: not an embedded-test binary.
    NotEmbeddedTest,
    /// A protocol version we do not speak.
    Version(u64),
    /// A test symbol whose JSON name or tuple could not be decoded.
    BadSymbol(String),
}

impl std::fmt::Display for ElfError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Parse(e) => write!(f, "not a readable ELF: {e}"),
            Self::NotEmbeddedTest => {
                write!(f, "no EMBEDDED_TEST_VERSION: not an embedded-test binary")
            }
            Self::Version(v) => write!(
                f,
                "embedded-test protocol version {v} is not supported (want 1)"
            ),
            Self::BadSymbol(s) => write!(f, "undecodable test symbol {s}"),
        }
    }
}

/// Reads the list of tests from an embedded-test ELF, sorted by name.
pub fn read_tests(elf: &[u8]) -> Result<Vec<TestCase>, ElfError> {
    let file = object::File::parse(elf).map_err(|e| ElfError::Parse(e.to_string()))?;
    let little = file.is_little_endian();
    let word = |bytes: &[u8]| -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[..8]);
        if little {
            u64::from_le_bytes(b)
        } else {
            u64::from_be_bytes(b)
        }
    };
    let text_ranges: Vec<(u64, u64)> = file
        .sections()
        .filter(|s| s.kind() == SectionKind::Text)
        .map(|s| (s.address(), s.address() + s.size()))
        .collect();
    let in_text = |a: u64| text_ranges.iter().any(|&(lo, hi)| a >= lo && a < hi);

    let version = file
        .symbols()
        .find(|s| s.name() == Ok("EMBEDDED_TEST_VERSION"))
        .ok_or(ElfError::NotEmbeddedTest)?;
    let v = symbol_bytes(&file, &version, 8)
        .map(word)
        .ok_or(ElfError::NotEmbeddedTest)?;
    if v != 1 {
        return Err(ElfError::Version(v));
    }

    let mut tests = Vec::new();
    for sym in file.symbols() {
        let Ok(name) = sym.name() else { continue };
        if !name.starts_with('{') {
            continue;
        }
        let Some(section) = sym
            .section_index()
            .and_then(|i| file.section_by_index(i).ok())
        else {
            continue;
        };
        if !section
            .name()
            .is_ok_and(|n| n.starts_with(".embedded_test"))
        {
            continue;
        }
        let meta: SymbolJson =
            serde_json::from_str(name).map_err(|_| ElfError::BadSymbol(name.to_string()))?;
        // The tuple's field order is the compiler's choice, but the `&str`
        // is one 16-byte field, so the function pointer is word 0 or word 2:
        // whichever points into executable code.
        let data = section.data().map_err(|e| ElfError::Parse(e.to_string()))?;
        let off = sym
            .address()
            .checked_sub(section.address())
            .ok_or_else(|| ElfError::BadSymbol(name.into()))? as usize;
        let tuple = data
            .get(off..off + 24)
            .ok_or_else(|| ElfError::BadSymbol(name.into()))?;
        let addr = [0, 2]
            .into_iter()
            .map(|i| word(&tuple[i * 8..]))
            .find(|&a| in_text(a))
            .ok_or_else(|| ElfError::BadSymbol(name.into()))?;
        tests.push(TestCase {
            name: meta.name,
            ignored: meta.ignored,
            should_panic: meta.should_panic,
            timeout: meta.timeout,
            addr,
        });
    }
    tests.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(tests)
}

/// `len` bytes at a symbol, read from the symbol's own section.
fn symbol_bytes<'a>(
    file: &object::File<'a>,
    sym: &object::Symbol<'a, '_>,
    len: usize,
) -> Option<&'a [u8]> {
    let section = file.section_by_index(sym.section_index()?).ok()?;
    let off = sym.address().checked_sub(section.address())? as usize;
    section.data().ok()?.get(off..off.checked_add(len)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use object::write::{Object as WObject, Symbol, SymbolSection};
    use object::{Architecture, BinaryFormat, Endianness, SymbolFlags, SymbolKind, SymbolScope};

    /// Builds a small AArch64 ELF object with a text section, a test section
    /// holding two tuples (one with the fn pointer second) and a version word.
    fn fixture(version: u64) -> Vec<u8> {
        let mut obj = WObject::new(BinaryFormat::Elf, Architecture::Aarch64, Endianness::Little);
        let text = obj.add_section(vec![], b".text".to_vec(), SectionKind::Text);
        obj.append_section_data(text, &[0u8; 64], 4);
        let tests = obj.add_section(
            vec![],
            b".embedded_test.tests".to_vec(),
            SectionKind::ReadOnlyData,
        );
        let meta = obj.add_section(
            vec![],
            b".embedded_test.meta".to_vec(),
            SectionKind::ReadOnlyData,
        );
        // In a relocatable object every section starts at 0: a text address
        // of 0x10 / 0x20 lies inside .text (0..64); the &str words do not.
        let mut data = Vec::new();
        for w in [0x10u64, 0x1000, 5, 0x2000, 7, 0x20] {
            data.extend_from_slice(&w.to_le_bytes());
        }
        obj.append_section_data(tests, &data, 8);
        obj.append_section_data(meta, &version.to_le_bytes(), 8);
        let add = |obj: &mut WObject, name: &str, section, value| {
            obj.add_symbol(Symbol {
                name: name.as_bytes().to_vec(),
                value,
                size: 24,
                kind: SymbolKind::Data,
                scope: SymbolScope::Dynamic,
                weak: false,
                section: SymbolSection::Section(section),
                flags: SymbolFlags::None,
            });
        };
        add(
            &mut obj,
            r#"{"disambiguator":1,"name":"b_second","ignored":true,"should_panic":false,"timeout":5}"#,
            tests,
            24,
        );
        add(
            &mut obj,
            r#"{"disambiguator":2,"name":"a_first","ignored":false,"should_panic":true}"#,
            tests,
            0,
        );
        add(&mut obj, "EMBEDDED_TEST_VERSION", meta, 0);
        obj.write().expect("write object")
    }

    #[test]
    fn reads_tests_and_finds_fn_pointer_in_either_field() {
        let tests = read_tests(&fixture(1)).expect("table");
        assert_eq!(
            tests,
            vec![
                TestCase {
                    name: "a_first".into(),
                    ignored: false,
                    should_panic: true,
                    timeout: None,
                    addr: 0x10
                },
                TestCase {
                    name: "b_second".into(),
                    ignored: true,
                    should_panic: false,
                    timeout: Some(5),
                    addr: 0x20
                },
            ]
        );
    }

    #[test]
    fn rejects_other_protocol_versions_and_non_elf() {
        assert_eq!(read_tests(&fixture(2)), Err(ElfError::Version(2)));
        assert!(matches!(read_tests(b"not an elf"), Err(ElfError::Parse(_))));
    }
}
