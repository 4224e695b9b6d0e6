//! Exit codes the firmware reports through semihosting, shared with the host
//! tool so both sides agree on what an exit status means.

/// Test passed, or the firmware finished normally.
pub const SUCCESS: i32 = 0;
/// A panic or a test returning `Err`: what `semihosting::process::abort` uses
/// (128 + SIGABRT), and what embedded-test expects for `should_panic`.
pub const PANIC: i32 = 134;
/// An unexpected exception: the vector handler printed a crash report.
/// Distinct from every test outcome.
pub const CRASH: i32 = 70;
/// The device tree could not be used (typed error printed before exiting).
pub const BAD_DTB: i32 = 71;
/// PSCI SYSTEM_OFF returned: the machine could not power itself off.
pub const POWEROFF_FAILED: i32 = 72;
