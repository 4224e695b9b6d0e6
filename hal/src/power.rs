//! Power-off and exit: PSCI SYSTEM_OFF (Arm DEN 0022, PSCI 1.x, 5.10) through
//! the conduit the device tree (or the board) names, else the board's own
//! power-off (BCM2835 PM watchdog, i.MX SNVS), and semihosting SYS_EXIT (Arm
//! IHI 0096, "Semihosting for AArch32 and AArch64", 6.5) for test outcomes.

use crate::board::PowerOff;
use crate::dtb::PsciConduit;
use core::sync::atomic::{AtomicU8, Ordering};

const NONE: u8 = 0;
const HVC: u8 = 1;
const SMC: u8 = 2;
static CONDUIT: AtomicU8 = AtomicU8::new(NONE);

/// Records how to call PSCI (from the device tree's `/psci` node).
pub fn set_psci(conduit: Option<PsciConduit>) {
    let v = match conduit {
        Some(PsciConduit::Hvc) => HVC,
        Some(PsciConduit::Smc) => SMC,
        None => NONE,
    };
    CONDUIT.store(v, Ordering::Relaxed);
}

/// Flushes the console, then ends the run with `code` through semihosting.
/// Under a debugger or QEMU this becomes the process exit status.
pub fn exit(code: i32) -> ! {
    crate::uart::CONSOLE.flush();
    semihosting::process::exit(code)
}

/// Powers the machine off: PSCI SYSTEM_OFF when the tree named a conduit,
/// otherwise a semihosting exit with status 0. SYSTEM_OFF does not return
/// when it works, so a return (with an error or without) ends the run with
/// [`crate::exit::POWEROFF_FAILED`], never with a status that looks like a
/// clean power-off.
pub fn poweroff() -> ! {
    let conduit = CONDUIT.load(Ordering::Relaxed);
    match conduit {
        HVC => defmt::info!("power off: PSCI SYSTEM_OFF over HVC"),
        SMC => defmt::info!("power off: PSCI SYSTEM_OFF over SMC"),
        _ => match crate::board::CURRENT.power_off {
            PowerOff::BcmWatchdog { .. } => {
                defmt::info!("power off: no PSCI; BCM2835 PM watchdog halt")
            }
            PowerOff::Snvs { .. } => defmt::info!("power off: no PSCI; i.MX SNVS LPCR power-down"),
            PowerOff::Psci => {
                defmt::info!("power off: no PSCI in the device tree; semihosting exit")
            }
        },
    }
    crate::uart::CONSOLE.flush();
    let returned = match conduit {
        HVC => smccc::psci::system_off::<smccc::Hvc>(),
        SMC => smccc::psci::system_off::<smccc::Smc>(),
        _ => {
            board_power_off();
            semihosting::process::exit(crate::exit::SUCCESS)
        }
    };
    match returned {
        Err(e) => defmt::error!("PSCI SYSTEM_OFF failed ({=i64})", psci_code(e)),
        Ok(()) => defmt::error!("PSCI SYSTEM_OFF returned success, but the machine is still on"),
    }
    exit(crate::exit::POWEROFF_FAILED)
}

/// Resets the machine, as the host needs between tests on a real board
/// (the board comes back in its boot firmware and the resident image):
/// PSCI SYSTEM_RESET (DEN 0022, 5.11) when the tree named a conduit,
/// otherwise the board's own reset (the BCM2835 PM watchdog's full reset
/// on the Pi). Where neither exists, or the reset returns, it says so and
/// ends the run with [`crate::exit::POWEROFF_FAILED`]; the host's per-test
/// timeout and `--power-cycle` are then what resets the board.
pub fn reset() -> ! {
    let conduit = CONDUIT.load(Ordering::Relaxed);
    match conduit {
        HVC => defmt::info!("reset: PSCI SYSTEM_RESET over HVC"),
        SMC => defmt::info!("reset: PSCI SYSTEM_RESET over SMC"),
        _ => match crate::board::CURRENT.power_off {
            PowerOff::BcmWatchdog { .. } => {
                defmt::info!("reset: no PSCI; BCM2835 PM watchdog reset")
            }
            _ => defmt::error!("reset: no PSCI and no board reset known"),
        },
    }
    crate::uart::CONSOLE.flush();
    let returned = match conduit {
        HVC => smccc::psci::system_reset::<smccc::Hvc>(),
        SMC => smccc::psci::system_reset::<smccc::Smc>(),
        _ => {
            if let PowerOff::BcmWatchdog { pm_base } = crate::board::CURRENT.power_off {
                const PASSWORD: u32 = 0x5a00_0000;
                // SAFETY: the board names its PM block; RSTS (+0x20)
                // partition 0 is "boot normally" to the Pi firmware, WDOG
                // (+0x24) a 10-tick timeout, RSTC (+0x1C) WRCFG = full reset.
                unsafe {
                    core::ptr::write_volatile((pm_base + 0x20) as *mut u32, PASSWORD);
                    core::ptr::write_volatile((pm_base + 0x24) as *mut u32, PASSWORD | 10);
                    core::ptr::write_volatile((pm_base + 0x1c) as *mut u32, PASSWORD | 0x20);
                }
                crate::timer::delay_us(100_000);
            }
            Ok(())
        }
    };
    match returned {
        Err(e) => defmt::error!("PSCI SYSTEM_RESET failed ({=i64})", psci_code(e)),
        Ok(()) => defmt::error!("reset returned, but the machine is still running"),
    }
    exit(crate::exit::POWEROFF_FAILED)
}

/// The board's own power-off; returns if the machine is still on after it.
fn board_power_off() {
    match crate::board::CURRENT.power_off {
        PowerOff::BcmWatchdog { pm_base } => {
            const PASSWORD: u32 = 0x5a00_0000;
            // SAFETY: the board names its PM block; RSTS (+0x20) partition
            // 0x555 is "halt" to the Pi firmware, WDOG (+0x24) a 10-tick
            // timeout, RSTC (+0x1C) WRCFG = full reset: the SoC resets into
            // the halt the firmware (and QEMU) treats as power-off.
            unsafe {
                core::ptr::write_volatile((pm_base + 0x20) as *mut u32, PASSWORD | 0x555);
                core::ptr::write_volatile((pm_base + 0x24) as *mut u32, PASSWORD | 10);
                core::ptr::write_volatile((pm_base + 0x1c) as *mut u32, PASSWORD | 0x20);
            }
        }
        PowerOff::Snvs { base } => {
            // SAFETY: the board names its SNVS block; LPCR (+0x38) DP_EN
            // (bit 5) | TOP (bit 6) asks the PMIC to switch off.
            unsafe { core::ptr::write_volatile((base + 0x38) as *mut u32, 0x60) }
        }
        PowerOff::Psci => return,
    }
    // Give the power-off time to take effect before falling back.
    crate::timer::delay_us(100_000);
}

fn psci_code(e: smccc::psci::Error) -> i64 {
    i64::from(e)
}
