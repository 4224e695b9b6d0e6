//! The semihosting command line (Arm IHI 0096, SYS_GET_CMDLINE), beyond the
//! first two words embedded-test reads: the host tool appends `key=value`
//! words (for example the memory size QEMU was started with) that tests check
//! the hardware against.

/// Looks up `key=value` on the semihosting command line; `None` when absent or
/// when semihosting gives no command line.
pub fn arg<'a>(buf: &'a mut [u8; 1024], key: &str) -> Option<&'a str> {
    let args = semihosting::experimental::env::args::<1024>().ok()?;
    let mut found: Option<(usize, usize)> = None;
    let mut used = 0;
    for word in args.into_iter().flatten() {
        if let Some(v) = word.strip_prefix(key).and_then(|r| r.strip_prefix('=')) {
            let n = v.len().min(buf.len() - used);
            buf[used..used + n].copy_from_slice(&v.as_bytes()[..n]);
            found = Some((used, n));
            used += n;
        }
    }
    let (at, n) = found?;
    core::str::from_utf8(&buf[at..at + n]).ok()
}

/// Looks up `key=<u64>` (decimal, or hex with 0x) on the command line.
pub fn arg_u64(key: &str) -> Option<u64> {
    let mut buf = [0u8; 1024];
    let v = arg(&mut buf, key)?;
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}
