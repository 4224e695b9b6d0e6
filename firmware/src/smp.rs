//! Bringing the secondary cores up (`hal::smp`) and saying how it went.

use hal::smp::{CoreStart, SmpReport, StartMethod};

/// Starts every secondary core the machine has and logs, per core, whether
/// it came up; a core that failed is reported and the others carry on.
/// Call once, after [`crate::init`] (the MMU must be on).
pub fn start(platform: &hal::dtb::Platform<'_>) -> SmpReport {
    let r = hal::smp::start_secondaries(platform.psci);
    for (i, c) in r.cores.iter().enumerate().skip(1) {
        match c {
            CoreStart::Absent | CoreStart::Online => {}
            CoreStart::PsciError(e) => {
                defmt::warn!("core {=usize}: PSCI CPU_ON failed ({=i64})", i, e)
            }
            CoreStart::Timeout => {
                defmt::warn!("core {=usize}: started but not at EL1 within 1 s", i)
            }
        }
    }
    let how = match r.method {
        StartMethod::PsciHvc => "PSCI CPU_ON over HVC",
        StartMethod::PsciSmc => "PSCI CPU_ON over SMC",
        StartMethod::HoldingPen => "released from the holding pen (entered at EL3, no PSCI)",
        StartMethod::None => "none: no PSCI and not entered at EL3, secondaries stay off",
    };
    if r.method == StartMethod::HoldingPen && r.online == 1 {
        defmt::info!(
            "no secondary core arrived in the holding pen (the model holds them in reset)"
        );
    }
    defmt::info!(
        "SMP: {=u32} core(s) online at EL1 (entered at EL{=u8}); start method: {=str}",
        r.online,
        hal::boot::entry_el(),
        how
    );
    r
}
