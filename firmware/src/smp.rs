//! Bringing the secondary cores up (`hal::smp`) and saying how it went.

use crate::mm::FRAMES;
use core::sync::atomic::{AtomicU64, Ordering};
use hal::percpu::MAX_CPUS;
use hal::smp::{CoreStart, SmpError, SmpReport, StartMethod};
use memdesc::frames::Owner;

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
        StartMethod::SpinTable => "released from the boot stub's spin table",
        StartMethod::ResetAddress => "reset-address registers (entered at EL3, no PSCI)",
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

/// Guest time each core spends in [`bench_alloc_free`].
const BENCH_US: u64 = 500_000;
static BENCH_DEADLINE_US: AtomicU64 = AtomicU64::new(0);
static BENCH_PAIRS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

fn bench_job(core: usize) {
    let mut pairs = 0;
    while hal::timer::uptime_us() < BENCH_DEADLINE_US.load(Ordering::Relaxed) {
        match FRAMES.alloc_folio(0, Owner::Buddy) {
            Ok(f) => {
                if FRAMES.put(f).is_err() {
                    break;
                }
                pairs += 1;
            }
            Err(_) => break,
        }
    }
    BENCH_PAIRS[core].store(pairs, Ordering::Release);
}

/// The on-target half of `cargo qemu bench smp`: every online core
/// allocates and frees order-0 folios for the same half second of guest
/// time; logs `smp bench: N cores, P order-0 alloc+free pairs in T ns`.
/// Run before [`hal::smp::sleep_when_idle`].
pub fn bench_alloc_free() {
    let online = hal::smp::online();
    let t0 = hal::timer::ticks();
    BENCH_DEADLINE_US.store(hal::timer::uptime_us() + BENCH_US, Ordering::Relaxed);
    let mut tickets = [0u64; MAX_CPUS];
    for (i, t) in tickets.iter_mut().enumerate().skip(1) {
        if online & (1 << i) != 0 {
            *t = hal::smp::run_on(i, bench_job).unwrap_or(0);
        }
    }
    bench_job(0);
    let mut cores = 1u32;
    let mut pairs = BENCH_PAIRS[0].load(Ordering::Acquire);
    for (i, &t) in tickets.iter().enumerate().skip(1) {
        if t != 0 && hal::smp::wait(i, t, 10_000_000) {
            cores += 1;
            pairs += BENCH_PAIRS[i].load(Ordering::Acquire);
        }
    }
    let ns = hal::timer::ticks_to_ns(hal::timer::ticks() - t0);
    defmt::info!(
        "smp bench: {=u32} cores, {=u64} order-0 alloc+free pairs in {=u64} ns (buddy lock waited {=u64} times)",
        cores,
        pairs,
        ns,
        FRAMES.contended()
    );
}

/// Takes secondary core `index` offline ([`hal::smp::cpu_off`]): it drains
/// its frame cache to the buddy, then stops (PSCI CPU_OFF, or parked where
/// the cores were not started by PSCI). Logs the outcome.
///
/// # Errors
///
/// Those of [`hal::smp::cpu_off`].
pub fn cpu_off(index: usize) -> Result<(), SmpError> {
    let r = hal::smp::cpu_off(index);
    match r {
        Ok(()) => defmt::info!("core {=usize} offline (frame cache drained)", index),
        Err(e) => defmt::warn!("core {=usize} not taken offline: {}", index, e),
    }
    r
}

/// Brings back a core [`cpu_off`] took offline ([`hal::smp::cpu_on`]); it
/// rejoins the service loop. Logs the outcome.
///
/// # Errors
///
/// Those of [`hal::smp::cpu_on`].
pub fn cpu_on(index: usize) -> Result<(), SmpError> {
    let r = hal::smp::cpu_on(index);
    match r {
        Ok(()) => defmt::info!("core {=usize} online again", index),
        Err(e) => defmt::warn!("core {=usize} not brought back: {}", index, e),
    }
    r
}
