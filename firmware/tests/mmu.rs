//! MMU suite: the boot address space the firmware runs in. The host tool runs
//! it on `-cpu max` (FEAT_HAFDBS, range TLBI, BBM level 2) and on
//! `-cpu cortex-a53` (none of them), so both maintenance paths run for real.
#![no_std]
#![no_main]
#![deny(unsafe_code)]

#[cfg(test)]
#[embedded_test::tests(default_timeout = 60)]
mod tests {
    use firmware::mm::{FRAMES, STAGE1};
    use hal::esr::FaultKind;
    use hal::memory::{scratch_read_u64, scratch_write_u64, ScratchError};
    use memdesc::frames::Owner;
    use memdesc::stage1::{Attributes, MappingUnit};
    use memdesc::{PhysAddr, VirtAddr};

    /// A VA far from the identity map, for mappings the tests make.
    const TEST_VA: u64 = 0x40_0000_0000;
    const RUN: u64 = 64 << 10;

    #[init]
    fn init() {
        let _ = firmware::init();
    }

    fn hafdbs() -> bool {
        STAGE1
            .with(|s| s.features().hafdbs)
            .expect("stage-1 initialised")
    }

    /// Maps a fresh, 64 KiB-aligned folio at TEST_VA; returns its PA.
    fn map_fresh_run() -> u64 {
        let folio = FRAMES
            .try_with(|fa| fa.alloc_folio(4, Owner::Buddy))
            .expect("64 KiB folio");
        let pa = folio.pfn().addr().0;
        STAGE1
            .try_with(|s| s.map(VirtAddr(TEST_VA), PhysAddr(pa), RUN, Attributes::DATA))
            .expect("map");
        pa
    }

    /// The feature probe matches the CPU model the host started, and the
    /// engine was handed exactly what the probe found.
    #[test]
    fn probe_matches_cpu_model() {
        let mut buf = [0u8; 1024];
        let cpu = hal::semihost::arg(&mut buf, "cpu").expect("host passes cpu");
        let probe = hal::mmu::Probe::read();
        let f = probe.features();
        match cpu {
            "max" => {
                assert!(f.hafdbs && f.tlbi_range, "{:?}", probe);
                assert_eq!(f.bbm_level, 2);
            }
            "cortex-a53" | "cortex-a72" => {
                assert!(!f.hafdbs && !f.tlbi_range, "{:?}", probe);
                assert_eq!(f.bbm_level, 0);
            }
            "neoverse-v1" => {
                // Advertises BBM level 2, but is not known never to raise TLB
                // conflict aborts: the engine must keep break-before-make.
                assert_eq!(probe.bbm, 2, "{:?}", probe);
                assert!(f.hafdbs && !f.tlbi_range, "{:?}", probe);
                assert_eq!(f.bbm_level, 0);
            }
            other => panic!("unexpected cpu {}", other),
        }
        assert_eq!(STAGE1.with(|s| s.features()).expect("stage-1"), f);
    }

    /// The linter finds no rule violation in the live tables after boot.
    #[test]
    fn linter_clean_after_boot() {
        assert_eq!(firmware::mm::lint().expect("stage-1"), 0);
    }

    /// Every virtio-mmio window and the console are mapped Device, however
    /// many separate windows the tree names (the host also boots this with
    /// 32 transports on 32 separate pages).
    #[test]
    fn every_virtio_window_is_mapped_device() {
        let p = hal::boot_dtb().expect("boot DTB parses");
        let windows = p.mmio_windows(&hal::board::CURRENT).expect("windows fit");
        let mut checked = 0;
        for v in p.virtio_mmio() {
            let t = STAGE1
                .with(|s| s.query(VirtAddr(v.region.base)))
                .expect("stage-1")
                .unwrap_or_else(|e| panic!("virtio window {:#x}: {:?}", v.region.base, e));
            assert_eq!(t.attributes, Attributes::DEVICE);
            assert_eq!(t.output, PhysAddr(v.region.base));
            checked += 1;
        }
        let uart = hal::board::CURRENT.uart_base;
        let t = STAGE1
            .try_with(|s| s.query(VirtAddr(uart)))
            .expect("console mapped");
        assert_eq!(t.attributes, Attributes::DEVICE);
        assert_eq!(checked, p.virtio_mmio().len());
        defmt::info!(
            "{=usize} virtio windows in {=usize} MMIO windows, all mapped Device",
            checked,
            windows.as_slice().len()
        );
    }

    /// Boot used large units and exactly the optimum TLB footprint, and
    /// every image section has the permissions W^X asks for.
    #[test]
    fn boot_map_is_optimal_and_w_xor_x() {
        let (summary, text, rodata, data) = STAGE1
            .with(|s| {
                let q = |a: u64| s.query(VirtAddr(a)).expect("mapped");
                (
                    s.summary(),
                    q(hal::image::text().start),
                    q(hal::image::rodata().start),
                    q(hal::image::data().start),
                )
            })
            .expect("stage-1");
        assert!(summary.count(MappingUnit::Block2M) + summary.count(MappingUnit::Cont32M) > 0);
        let report = firmware::mm::BOOT_MAP
            .with(|r| *r)
            .expect("boot map report");
        assert_eq!(report.summary, summary);
        assert_eq!(
            summary.tlb_entries(),
            report.optimum.tlb_entries(),
            "TLB footprint equals the optimum"
        );
        assert_eq!(text.attributes, Attributes::TEXT);
        assert_eq!(rodata.attributes, Attributes::RODATA);
        assert_eq!(data.attributes, Attributes::DATA);
        assert!(!(text.attributes.write && text.attributes.execute));
        assert_eq!(text.output.0, hal::image::text().start, "identity map");
    }

    /// Reads and writes through the linear map land in the frames the
    /// allocator handed out, and the tables say so.
    #[test]
    fn linear_map_reads_and_writes() {
        let folio = FRAMES
            .try_with(|fa| fa.alloc_folio(4, Owner::Buddy))
            .expect("folio");
        let base = folio.pfn().addr().0;
        for i in 0..(RUN / 8) {
            hal::memory::folio_write_u64(base + i * 8, i ^ 0x5a5a_5a5a_0000_0000)
                .expect("our folio");
        }
        for i in 0..(RUN / 8) {
            let v = hal::memory::folio_read_u64(base + i * 8).expect("our folio");
            assert_eq!(v, i ^ 0x5a5a_5a5a_0000_0000);
        }
        let t = STAGE1
            .try_with(|s| s.query(VirtAddr(base + 0x3000)))
            .expect("mapped");
        assert_eq!(t.output, PhysAddr(base + 0x3000));
        assert_eq!(t.attributes, Attributes::DATA);
    }

    /// A write to text is a permission fault reported as a write.
    #[test]
    fn write_to_text_faults() {
        let target = hal::image::text().start + 0x40;
        let fault = hal::memory::probe_write_expecting_fault(target, 0).expect("text is read-only");
        let abort = fault.abort().expect("an abort");
        assert_eq!(fault.class_name(), "Data abort from the same EL");
        assert!(
            matches!(abort.kind, FaultKind::Permission(_)),
            "{}",
            abort.kind.name()
        );
        assert!(abort.write);
        assert_eq!(fault.far, target);
    }

    // Atomics (interior mutability) keep it in .data, not .rodata.
    static RET_IN_DATA: [core::sync::atomic::AtomicU32; 4] =
        [const { core::sync::atomic::AtomicU32::new(0xd65f_03c0) }; 4]; // `ret`

    /// Executing from data is a permission fault on instruction fetch.
    #[test]
    fn execute_from_data_faults() {
        let target = RET_IN_DATA.as_ptr() as u64;
        let fault =
            hal::memory::probe_call_expecting_fault(target).expect("data is not executable");
        let abort = fault.abort().expect("an abort");
        assert_eq!(fault.class_name(), "Instruction abort from the same EL");
        assert!(abort.instruction);
        assert!(
            matches!(abort.kind, FaultKind::Permission(_)),
            "{}",
            abort.kind.name()
        );
        assert_eq!(fault.far, target);
    }

    fn touch_faults_with_translation_fault(addr: u64) {
        let fault = hal::memory::probe_write_expecting_fault(addr, 0xdead)
            .expect("a guard page is unmapped");
        let abort = fault.abort().expect("an abort");
        assert!(
            matches!(abort.kind, FaultKind::Translation(3)),
            "{}",
            abort.kind.name()
        );
        assert_eq!(fault.far, addr);
    }

    /// The page under the main stack is unmapped.
    #[test]
    fn main_stack_guard_faults() {
        let g = hal::image::main_stack_guard();
        assert_eq!(g.len(), 4096);
        touch_faults_with_translation_fault(g.end - 8);
    }

    /// The page under the exception stack is unmapped.
    #[test]
    fn exception_stack_guard_faults() {
        touch_faults_with_translation_fault(hal::image::exception_stack_guard().start);
    }

    /// A fresh aligned 64 KiB mapping becomes one Contiguous run; the dirty
    /// state of one written page is seen from every page of the run.
    #[test]
    fn dirty_gathered_across_run() {
        map_fresh_run();
        let q = |off: u64| {
            STAGE1
                .try_with(|s| s.query(VirtAddr(TEST_VA + off)))
                .expect("mapped")
        };
        assert_eq!(q(0).unit, MappingUnit::Cont64K);
        if hafdbs() {
            assert!(!q(0).dirty, "fresh mapping starts clean under FEAT_HAFDBS");
            scratch_write_u64(TEST_VA + 5 * 4096, 1).expect("mapped read-write");
            assert!(
                q(0).dirty && q(10 * 4096).dirty,
                "hardware dirty state on entry 5 is gathered over the run"
            );
        } else {
            assert!(
                q(0).dirty,
                "without FEAT_HAFDBS a writable entry is conservatively dirty"
            );
        }
        assert_eq!(firmware::mm::lint().expect("stage-1"), 0);
    }

    /// Clearing young clears the whole run; an access to one page sets it
    /// again in hardware (max) or raises an access flag fault (cortex-a53).
    #[test]
    fn young_gathered_across_run() {
        map_fresh_run();
        let young = |off: u64| {
            STAGE1
                .with(|s| s.query(VirtAddr(TEST_VA + off)).map(|t| t.young))
                .expect("stage-1")
        };
        assert_eq!(young(0), Ok(true), "mapped with AF set");
        assert_eq!(
            STAGE1
                .with(|s| s.test_and_clear_young(VirtAddr(TEST_VA)))
                .expect("stage-1"),
            Ok(true)
        );
        assert_eq!(young(15 * 4096), Ok(false), "cleared across the whole run");
        let addr = TEST_VA + 9 * 4096;
        if hafdbs() {
            scratch_read_u64(addr).expect("mapped read-write");
            assert_eq!(
                young(0),
                Ok(true),
                "hardware AF on entry 9 is gathered over the run"
            );
        } else {
            let Err(ScratchError::Fault(fault)) = scratch_read_u64(addr) else {
                panic!("AF clear without FEAT_HAFDBS must fault");
            };
            assert!(matches!(
                fault.abort().map(|a| a.kind),
                Some(FaultKind::AccessFlag(3))
            ));
            assert_eq!(fault.far, addr);
        }
        assert_eq!(firmware::mm::lint().expect("stage-1"), 0);
    }

    /// Write-protecting one page of a live run unfolds it; writes there fault,
    /// writes elsewhere work; making it writable again refolds the run.
    #[test]
    fn protect_inside_run_unfolds_and_refolds() {
        map_fresh_run();
        let unit = |off: u64| {
            STAGE1
                .with(|s| s.query(VirtAddr(TEST_VA + off)).map(|t| t.unit))
                .expect("stage-1")
        };
        let page = TEST_VA + 7 * 4096;
        STAGE1
            .try_with(|s| s.protect(VirtAddr(page), 4096, Attributes::RODATA))
            .expect("protect");
        assert_eq!(unit(0), Ok(MappingUnit::Page4K));
        assert_eq!(firmware::mm::lint().expect("stage-1"), 0);
        let fault = scratch_write_u64(page, 7);
        assert!(matches!(
            fault
                .err()
                .and_then(|f| match f {
                    ScratchError::Fault(f) => f.abort(),
                    _ => None,
                })
                .map(|a| a.kind),
            Some(FaultKind::Permission(3))
        ));
        scratch_write_u64(TEST_VA + 8 * 4096, 8).expect("page 8 is still writable");
        STAGE1
            .try_with(|s| s.protect(VirtAddr(page), 4096, Attributes::DATA))
            .expect("protect");
        assert_eq!(
            unit(0),
            Ok(MappingUnit::Cont64K),
            "refolded after the change made the run eligible"
        );
        scratch_write_u64(page, 7).expect("writable again");
        assert_eq!(firmware::mm::lint().expect("stage-1"), 0);
    }

    /// The dirty state the hardware
    /// recorded for one page of a run survives unfolding the run (a
    /// permission change of another page): every page of the old run still
    /// reads dirty.
    #[test]
    fn dirty_survives_unfolding_a_run() {
        map_fresh_run();
        scratch_write_u64(TEST_VA + 5 * 4096, 5).expect("mapped read-write");
        STAGE1
            .try_with(|s| s.protect(VirtAddr(TEST_VA + 9 * 4096), 4096, Attributes::RODATA))
            .expect("protect");
        for p in 0..16 {
            let q = STAGE1
                .try_with(|s| s.query(VirtAddr(TEST_VA + p * 4096)))
                .expect("mapped");
            assert_eq!(q.unit, MappingUnit::Page4K);
            assert!(q.dirty, "page {} lost the run's dirty state", p);
        }
        assert_eq!(firmware::mm::lint().expect("stage-1"), 0);
    }

    /// TCR_EL1.T0SZ comes from the engine's VA size.
    #[test]
    fn tcr_input_size_is_the_engines() {
        let bits = STAGE1.with(|s| s.va_size().bits()).expect("stage-1");
        assert_eq!(hal::mmu::input_bits(), bits);
    }

    /// While the frame allocator is in use, the engine's
    /// table memory fails with a typed `Busy`, not "out of memory"; a
    /// table's valid count is read without the allocator (an atomic in its
    /// descriptor), so an unmap then works and never drops a live table.
    #[test]
    fn busy_table_memory_is_a_typed_error() {
        use memdesc::stage1::{Stage1Error, TableMemoryError};
        let busy = Err(Stage1Error::TableMemory(TableMemoryError::Busy));
        let far = VirtAddr(TEST_VA + (1 << 30));
        let r = FRAMES
            .with(|_| STAGE1.with(|s| s.map(far, PhysAddr(0), 4096, Attributes::RODATA)))
            .expect("frames");
        assert_eq!(r, Ok(busy), "a new table needs the frame allocator");
        map_fresh_run();
        let r = FRAMES
            .with(|_| STAGE1.with(|s| s.unmap(VirtAddr(TEST_VA + 3 * 4096), 4096).map(drop)))
            .expect("frames");
        assert_eq!(r, Ok(Ok(())), "the valid count is lock-free");
        let q = STAGE1
            .with(|s| s.query(VirtAddr(TEST_VA + 3 * 4096)))
            .expect("stage-1");
        assert!(q.is_err(), "page 3 is still mapped: {:?}", q);
        for p in [0, 2, 4, 15] {
            let q = STAGE1
                .with(|s| s.query(VirtAddr(TEST_VA + p * 4096)))
                .expect("stage-1");
            assert!(q.is_ok(), "page {} of the table was dropped: {:?}", p, q);
        }
    }

    /// The `cargo qemu run` workload: every step behaves and everything
    /// comes back (poisoned frames excepted; descriptor caches keep the
    /// chunks they grew by), including the table frames that folding freed.
    #[test]
    fn demo_workload() {
        let r = firmware::demo::run().expect("demo runs");
        assert_eq!(r.speculative_refcount, 2);
        assert!(r.free_lookup_refused);
        assert_eq!(r.unit_page_by_page, MappingUnit::Page4K);
        assert_eq!(r.unit_refolded, MappingUnit::Block2M);
        assert!(matches!(
            r.unit_after_partial_change,
            MappingUnit::Page4K | MappingUnit::Cont64K
        ));
        assert_eq!(r.unit_after_undo, MappingUnit::Block2M);
        assert_eq!(r.poisoned, 1);
        assert_eq!(r.offline_peak, 8);
        assert_eq!(r.lint_errors, 0);
        // Exact bookkeeping: every frame is back except the poisoned one and
        // the chunks the descriptor caches grew by (no leaked table frames).
        assert_eq!(
            r.free_before,
            r.free_after + r.poisoned + r.descriptor_frames
        );
        assert!(
            r.descriptor_frames <= 2,
            "{} descriptor chunks",
            r.descriptor_frames
        );
    }
}
