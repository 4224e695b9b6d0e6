//! Deliberate faults selected by `selftest=` on the kernel command line
//! (`/chosen/bootargs`), so the host tool can check end to end that a crash
//! produces the decoded report and the crash exit code.

/// An address nothing maps or backs (see [`hal::exception::UNMAPPED`]).
pub const UNMAPPED: u64 = hal::exception::UNMAPPED;

/// Runs the self-test named in `bootargs`, if any. Returns when none is asked for.
pub fn run(bootargs: Option<&str>) {
    let Some(args) = bootargs else { return };
    for word in args.split_ascii_whitespace() {
        match word.strip_prefix("selftest=") {
            Some("data-abort") => {
                defmt::warn!("selftest: reading {=u64:#x} on purpose", UNMAPPED);
                let v = hal::exception::crash_on_unmapped_read();
                defmt::error!("selftest: the read did not fault (got {=u64:#x})", v);
            }
            Some("stack-overflow") => {
                defmt::warn!("selftest: recursing until the main stack overflows");
                let depth = recurse(0);
                defmt::error!("selftest: recursion returned at depth {=u64}", depth);
            }
            Some("nested-log") => {
                defmt::info!("outer frame: {}", FaultsWhileFormatting);
                defmt::info!("selftest: logging continues after a nested frame");
            }
            Some("poweroff") => {
                defmt::info!("selftest: powering off");
                hal::power::poweroff();
            }
            Some("hang") => {
                defmt::warn!("selftest: hanging on purpose");
                hal::uart::CONSOLE.flush();
                loop {
                    core::hint::spin_loop();
                }
            }
            Some("reset") => {
                defmt::info!("selftest: resetting");
                hal::power::reset();
            }
            Some("reenter") if hal::boot::entry_x1() == REENTRY_MARK => {
                defmt::info!(
                    "selftest: second entry, MMU and caches were on: {=bool}, off before Rust code: {=bool}",
                    hal::boot::entered_with_mmu_or_caches_on(),
                    hal::boot::sctlr_at_rust_entry() & 0b101 == 0
                );
            }
            Some("reenter") => reenter(),
            Some("panic") => {
                defmt::warn!("selftest: panicking on purpose");
                panic!("selftest panic");
            }
            // Run by the balloon service once it has ballooned frames.
            Some("balloon-touch" | "balloon-oom") => {}
            Some(other) => defmt::warn!("selftest: unknown test {=str}", other),
            None => {}
        }
    }
}

/// x1 of the second entry, so the re-entered firmware does not re-enter
/// again (a loader passes 0).
pub const REENTRY_MARK: u64 = 0x5245_454e_5452_5921;

/// Enters the firmware again at its entry point the way U-Boot's `go` and
/// `bootelf` do: at this EL, with the MMU and caches on and x0 = the DTB.
fn reenter() -> ! {
    // The secondaries would otherwise keep serving (in WFE until the
    // interrupt controller is up) on the data the second entry rebuilds.
    let halted = hal::smp::halt_secondaries();
    defmt::info!(
        "selftest: secondaries halted before the second entry: {=u64:#x}",
        halted
    );
    defmt::info!(
        "selftest: entering the image at {=u64:#x} again with the MMU and caches on",
        hal::image::whole().start
    );
    hal::boot::reenter(REENTRY_MARK)
}

/// Recurses with a page-sized frame until the guard page under the main stack
/// is hit; the exception is taken on the separate exception stack.
#[inline(never)]
#[allow(unconditional_recursion)] // the point: it ends in the guard page
fn recurse(depth: u64) -> u64 {
    let mut frame = [0u8; 4096];
    frame[0] = depth as u8;
    let frame = core::hint::black_box(frame);
    recurse(depth + 1) + frame[0] as u64 + frame[4095] as u64
}

/// Takes (and catches) a data abort in the middle of being formatted: the
/// exception handler logs while the outer defmt frame is open, and the
/// logger must drop that nested frame rather than corrupt the outer one.
struct FaultsWhileFormatting;

impl defmt::Format for FaultsWhileFormatting {
    fn format(&self, f: defmt::Formatter<'_>) {
        defmt::write!(f, "before-");
        let fault = hal::exception::probe_unmapped();
        defmt::write!(f, "after fault {=bool}", fault.is_err());
    }
}
