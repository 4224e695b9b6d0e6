//! The bootable firmware: brings the machine up, starts the memory manager,
//! reports ready and serves until powered off.
#![no_std]
#![no_main]
#![deny(unsafe_code)]

use core::panic::PanicInfo;

hal::entry!(main);

fn main() -> ! {
    let platform = firmware::init();
    firmware::smp::start(&platform);
    let bench = platform
        .bootargs
        .is_some_and(|a| a.split_ascii_whitespace().any(|w| w == "bench=smp"));
    if bench {
        firmware::smp::bench_alloc_free();
    }
    // Nothing for the secondaries to do in this binary: they idle in WFI.
    hal::smp::sleep_when_idle();
    firmware::selftest::run(platform.bootargs);
    if let Err(e) = firmware::demo::run() {
        defmt::error!("demo workload failed: {}", defmt::Debug2Format(&e));
    }
    defmt::info!("ready");
    firmware::balloon::run(&platform)
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    defmt::error!("panic: {}", defmt::Display2Format(info));
    hal::power::exit(hal::exit::PANIC)
}
