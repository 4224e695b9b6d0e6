//! Host tests: QEMU's own trees (GICv2 and GICv3, with and without EL2) and
//! hand-built hostile ones.

use super::*;

/// `-M virt` (GICv2), 1 GiB.
const V2: &[u8] = include_bytes!("../../../tests/dtb/virt-1g.dtb");
/// `-M virt,virtualization=on` (GICv2 with GICH/GICV frames).
const V2_EL2: &[u8] = include_bytes!("../../../tests/dtb/virt-gicv2-el2.dtb");
/// `-M virt,gic-version=3`.
const V3: &[u8] = include_bytes!("../../../tests/dtb/virt-gicv3.dtb");
/// `-M virt,gic-version=3,virtualization=on` (five timer interrupts).
const V3_EL2: &[u8] = include_bytes!("../../../tests/dtb/virt-gicv3-el2.dtb");

fn r(base: u64, size: u64) -> Region {
    Region { base, size }
}

fn irq(intid: u32, trigger: Option<Trigger>) -> Interrupt {
    Interrupt {
        intid: Intid::from_raw(intid).unwrap(),
        trigger,
    }
}

#[test]
fn specifiers_decode_to_intids() {
    let d = decode_specifier;
    assert_eq!(d(&[0, 16, 1]), Ok(irq(48, Some(Trigger::Edge))));
    assert_eq!(d(&[0, 0, 4]), Ok(irq(32, Some(Trigger::Level))));
    assert_eq!(d(&[0, 987, 4]), Ok(irq(1019, Some(Trigger::Level))));
    // GICv2 PPI with a CPU mask in bits 15:8.
    assert_eq!(d(&[1, 14, 0x104]), Ok(irq(30, Some(Trigger::Level))));
    assert_eq!(d(&[1, 0, 0]), Ok(irq(16, None)));
    assert_eq!(d(&[1, 15, 8]), Ok(irq(31, Some(Trigger::Level))));
    assert_eq!(d(&[1, 15, 2]), Ok(irq(31, Some(Trigger::Edge))));
    assert_eq!(d(&[2, 3, 4]), Ok(irq(4099, Some(Trigger::Level))));
    assert_eq!(d(&[3, 63, 4]), Ok(irq(1119, Some(Trigger::Level))));
    // A fourth cell (GICv3 PPI partition phandle) is ignored.
    assert_eq!(d(&[1, 11, 4, 0x55]), Ok(irq(27, Some(Trigger::Level))));
}

#[test]
fn bad_specifiers_are_typed() {
    let d = decode_specifier;
    assert_eq!(d(&[0, 16]), Err(SpecifierError::CellCount(2)));
    assert_eq!(d(&[0, 16, 1, 0, 0]), Err(SpecifierError::CellCount(5)));
    assert_eq!(d(&[4, 1, 1]), Err(SpecifierError::UnknownType(4)));
    assert_eq!(
        d(&[1, 16, 4]),
        Err(SpecifierError::Number(IntidError::PpiOutOfRange(16)))
    );
    assert_eq!(
        d(&[0, 988, 4]),
        Err(SpecifierError::Number(IntidError::SpiOutOfRange(988)))
    );
    assert_eq!(
        d(&[3, 64, 4]),
        Err(SpecifierError::Number(IntidError::ExtendedPpiOutOfRange(
            64
        )))
    );
    assert_eq!(d(&[0, 1, 3]), Err(SpecifierError::Flags(3)));
    assert_eq!(d(&[0, 1, 0x1_0004]), Err(SpecifierError::Flags(0x1_0004)));
    assert_eq!(d(&[1, 1, 0x14]), Err(SpecifierError::Flags(0x14)));
    assert_eq!(d(&[0, 1, 2]), Err(SpecifierError::TriggerInvalidForSpi(2)));
    assert_eq!(d(&[2, 1, 8]), Err(SpecifierError::TriggerInvalidForSpi(8)));
}

#[test]
fn qemu_gicv2() {
    let g = gic(V2).expect("GICv2");
    assert_eq!(g.version(), GicVersion::V2);
    assert_eq!(
        g.registers,
        GicRegisters::V2 {
            distributor: r(0x0800_0000, 0x1_0000),
            cpu_interface: r(0x0801_0000, 0x1_0000),
        }
    );
    assert_eq!(g.phandle, Some(0x8002));
    assert_eq!(g.interrupt_cells, 3);
    // With virtualization the GICH/GICV frames follow; the first two stay.
    assert_eq!(gic(V2_EL2).expect("GICv2").registers, g.registers);
}

#[test]
fn qemu_gicv3() {
    for blob in [V3, V3_EL2] {
        let g = gic(blob).expect("GICv3");
        assert_eq!(g.version(), GicVersion::V3);
        assert_eq!(
            g.registers,
            GicRegisters::V3 {
                distributor: r(0x0800_0000, 0x1_0000),
                redistributors: r(0x080a_0000, 0xf6_0000),
            }
        );
        assert_eq!(
            g.regions(),
            [
                Some(r(0x0800_0000, 0x1_0000)),
                Some(r(0x080a_0000, 0xf6_0000))
            ]
        );
    }
}

#[test]
fn qemu_timer_interrupts() {
    for blob in [V2, V2_EL2, V3, V3_EL2] {
        let g = gic(blob).unwrap();
        let t = timer(blob, &g).expect("timer");
        assert_eq!(t.secure_physical, irq(29, Some(Trigger::Level)));
        assert_eq!(t.physical, irq(30, Some(Trigger::Level)));
        assert_eq!(t.virtual_timer, irq(27, Some(Trigger::Level)));
        assert_eq!(t.hypervisor, irq(26, Some(Trigger::Level)));
    }
    // QEMU lists the EL2 virtual timer only with virtualization=on.
    for (blob, hv) in [
        (V2, None),
        (V3, None),
        (V2_EL2, Some(irq(28, Some(Trigger::Level)))),
        (V3_EL2, Some(irq(28, Some(Trigger::Level)))),
    ] {
        let g = gic(blob).unwrap();
        assert_eq!(timer(blob, &g).unwrap().hypervisor_virtual, hv);
    }
}

#[test]
fn qemu_virtio_interrupts() {
    for blob in [V2, V3] {
        let g = gic(blob).unwrap();
        // QEMU's virt: transport n at 0x0a00_0000 + 0x200 n raises SPI 16 + n
        // and the tree calls it rising edge.
        assert_eq!(
            device_interrupt(blob, &g, "virtio,mmio", 0x0a00_0000),
            Ok(irq(48, Some(Trigger::Edge)))
        );
        assert_eq!(
            device_interrupt(blob, &g, "virtio,mmio", 0x0a00_0000 + 31 * 0x200),
            Ok(irq(48 + 31, Some(Trigger::Edge)))
        );
        assert_eq!(
            device_interrupt(blob, &g, "virtio,mmio", 0x0a00_0100),
            Err(IrqDtError::NoDevice)
        );
        assert_eq!(
            device_interrupt(blob, &g, "no,such-device", 0x0a00_0000),
            Err(IrqDtError::NoDevice)
        );
    }
}

#[test]
fn a_broken_blob_is_a_dtb_error() {
    assert!(matches!(gic(&V2[..20]), Err(IrqDtError::Dtb(_))));
    let mut bad = V3.to_vec();
    bad[0] = 0;
    assert!(matches!(
        gic(&bad),
        Err(IrqDtError::Dtb(DtbError::BadMagic(_)))
    ));
}

/// A minimal flattened-tree writer for hostile trees.
struct Builder {
    structure: Vec<u8>,
    strings: Vec<u8>,
}

impl Builder {
    fn new() -> Self {
        let mut b = Self {
            structure: Vec::new(),
            strings: Vec::new(),
        };
        b.begin("");
        b.cells("#address-cells", &[2]);
        b.cells("#size-cells", &[2]);
        b
    }
    fn word(&mut self, w: u32) {
        self.structure.extend_from_slice(&w.to_be_bytes());
    }
    fn begin(&mut self, name: &str) -> &mut Self {
        self.word(1);
        self.structure.extend_from_slice(name.as_bytes());
        self.structure.push(0);
        while !self.structure.len().is_multiple_of(4) {
            self.structure.push(0);
        }
        self
    }
    fn end(&mut self) -> &mut Self {
        self.word(2);
        self
    }
    fn prop(&mut self, name: &str, value: &[u8]) -> &mut Self {
        let off = self.strings.len() as u32;
        self.strings.extend_from_slice(name.as_bytes());
        self.strings.push(0);
        self.word(3);
        self.word(value.len() as u32);
        self.word(off);
        self.structure.extend_from_slice(value);
        while !self.structure.len().is_multiple_of(4) {
            self.structure.push(0);
        }
        self
    }
    fn cells(&mut self, name: &str, cells: &[u32]) -> &mut Self {
        let v: Vec<u8> = cells.iter().flat_map(|c| c.to_be_bytes()).collect();
        self.prop(name, &v)
    }
    fn string(&mut self, name: &str, s: &str) -> &mut Self {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.prop(name, &v)
    }
    /// A GIC node with the usual properties and the given `reg` cells.
    fn gic(&mut self, compatible: &str, reg: &[u32], interrupt_cells: u32) -> &mut Self {
        self.begin("intc@8000000")
            .string("compatible", compatible)
            .prop("interrupt-controller", &[])
            .cells("#interrupt-cells", &[interrupt_cells])
            .cells("reg", reg)
            .cells("phandle", &[1])
            .end()
    }
    fn timer(&mut self, interrupts: &[u32]) -> &mut Self {
        self.begin("timer")
            .string("compatible", "arm,armv8-timer")
            .cells("interrupts", interrupts)
            .end()
    }
    fn build(&mut self) -> Vec<u8> {
        self.end();
        self.word(9);
        let off_rsv = 40usize;
        let off_struct = off_rsv + 16;
        let off_strings = off_struct + self.structure.len();
        let total = off_strings + self.strings.len();
        let mut blob = Vec::new();
        for w in [
            0xd00d_feed,
            total as u32,
            off_struct as u32,
            off_strings as u32,
            off_rsv as u32,
            17,
            16,
            0,
            self.strings.len() as u32,
            self.structure.len() as u32,
        ] {
            blob.extend_from_slice(&u32::to_be_bytes(w));
        }
        blob.extend_from_slice(&[0; 16]);
        blob.extend_from_slice(&self.structure);
        blob.extend_from_slice(&self.strings);
        blob
    }
}

const V2_REG: [u32; 8] = [0, 0x0800_0000, 0, 0x1_0000, 0, 0x0801_0000, 0, 0x1_0000];
const TIMER: [u32; 12] = [1, 13, 4, 1, 14, 4, 1, 11, 4, 1, 10, 4];

fn tree_with(f: impl FnOnce(&mut Builder)) -> Vec<u8> {
    let mut b = Builder::new();
    b.cells("interrupt-parent", &[1]);
    f(&mut b);
    b.build()
}

#[test]
fn builder_tree_is_accepted() {
    let blob = tree_with(|b| {
        b.gic("arm,gic-400", &V2_REG, 3).timer(&TIMER);
    });
    let g = gic(&blob).expect("gic");
    assert_eq!(g.version(), GicVersion::V2);
    assert_eq!(g.phandle, Some(1));
    assert_eq!(timer(&blob, &g).expect("timer").physical.intid.raw(), 30);
}

#[test]
fn gic_under_a_bus_is_translated_by_ranges() {
    // /soc maps its 1-cell child addresses 0..0x100_0000 to 0xff80_0000.
    let blob = tree_with(|b| {
        b.begin("soc")
            .string("compatible", "simple-bus")
            .cells("#address-cells", &[1])
            .cells("#size-cells", &[1])
            .cells("ranges", &[0, 0, 0xff80_0000, 0x100_0000])
            .begin("interrupt-controller@41000")
            .string("compatible", "arm,gic-400")
            .prop("interrupt-controller", &[])
            .cells("#interrupt-cells", &[3])
            .cells("reg", &[0x4_1000, 0x1000, 0x4_2000, 0x2000])
            .cells("phandle", &[1])
            .end()
            .end();
    });
    assert_eq!(
        gic(&blob).expect("gic").registers,
        GicRegisters::V2 {
            distributor: r(0xff84_1000, 0x1000),
            cpu_interface: r(0xff84_2000, 0x2000),
        }
    );
    // A region outside every range cannot be translated.
    let blob = tree_with(|b| {
        b.begin("soc")
            .cells("#address-cells", &[1])
            .cells("#size-cells", &[1])
            .cells("ranges", &[0, 0, 0xff80_0000, 0x1000])
            .begin("intc@41000")
            .string("compatible", "arm,gic-400")
            .prop("interrupt-controller", &[])
            .cells("#interrupt-cells", &[3])
            .cells("reg", &[0x4_1000, 0x1000, 0x4_2000, 0x2000])
            .end()
            .end();
    });
    assert_eq!(gic(&blob), Err(IrqDtError::BadReg));
}

#[test]
fn hostile_controllers_are_typed_errors() {
    let none = tree_with(|b| {
        b.timer(&TIMER);
    });
    assert_eq!(gic(&none), Err(IrqDtError::NoController));
    let disabled = tree_with(|b| {
        b.begin("intc@8000000")
            .string("compatible", "arm,gic-v3")
            .prop("interrupt-controller", &[])
            .cells("#interrupt-cells", &[3])
            .cells("reg", &V2_REG)
            .string("status", "disabled")
            .end();
    });
    assert_eq!(gic(&disabled), Err(IrqDtError::NoController));
    let cells = tree_with(|b| {
        b.gic("arm,gic-v3", &V2_REG, 2);
    });
    assert_eq!(gic(&cells), Err(IrqDtError::InterruptCells(2)));
    let one_region = tree_with(|b| {
        b.gic("arm,cortex-a15-gic", &V2_REG[..4], 3);
    });
    assert_eq!(
        gic(&one_region),
        Err(IrqDtError::MissingRegisters { found: 1 })
    );
    let ragged_reg = tree_with(|b| {
        b.gic("arm,cortex-a15-gic", &V2_REG[..7], 3);
    });
    assert_eq!(gic(&ragged_reg), Err(IrqDtError::BadReg));
    let overflow = tree_with(|b| {
        b.gic(
            "arm,gic-v3",
            &[0xffff_ffff, 0xffff_f000, 0, 0x2000, 0, 0, 0, 1],
            3,
        );
    });
    assert_eq!(gic(&overflow), Err(IrqDtError::BadReg));
}

#[test]
fn hostile_timers_are_typed_errors() {
    let check = |interrupts: &[u32]| {
        let blob = tree_with(|b| {
            b.gic("arm,gic-400", &V2_REG, 3).timer(interrupts);
        });
        let g = gic(&blob).unwrap();
        timer(&blob, &g)
    };
    assert_eq!(
        check(&TIMER[..9]),
        Err(IrqDtError::TooFewTimerInterrupts(3))
    );
    assert_eq!(
        check(&TIMER[..10]),
        Err(IrqDtError::Specifier {
            index: 3,
            error: SpecifierError::CellCount(1)
        })
    );
    assert_eq!(check(&[]), Err(IrqDtError::NoInterrupts));
    let mut bad = TIMER;
    bad[5] = 0x30;
    assert_eq!(
        check(&bad),
        Err(IrqDtError::Specifier {
            index: 1,
            error: SpecifierError::Flags(0x30)
        })
    );
    let mut bad = TIMER;
    bad[4] = 16;
    assert_eq!(
        check(&bad),
        Err(IrqDtError::Specifier {
            index: 1,
            error: SpecifierError::Number(IntidError::PpiOutOfRange(16))
        })
    );
    let no_timer = tree_with(|b| {
        b.gic("arm,gic-400", &V2_REG, 3);
    });
    let g = gic(&no_timer).unwrap();
    assert_eq!(timer(&no_timer, &g), Err(IrqDtError::NoTimer));
}

#[test]
fn interrupt_parent_must_be_the_gic() {
    // The timer names phandle 7, which is not the GIC (phandle 1).
    let foreign = tree_with(|b| {
        b.gic("arm,gic-400", &V2_REG, 3)
            .begin("timer")
            .string("compatible", "arm,armv8-timer")
            .cells("interrupt-parent", &[7])
            .cells("interrupts", &TIMER)
            .end();
    });
    let g = gic(&foreign).unwrap();
    assert_eq!(timer(&foreign, &g), Err(IrqDtError::ForeignParent(7)));
    // No interrupt-parent anywhere.
    let orphan = Builder::new()
        .gic("arm,gic-400", &V2_REG, 3)
        .timer(&TIMER)
        .build();
    let g = gic(&orphan).unwrap();
    assert_eq!(timer(&orphan, &g), Err(IrqDtError::NoInterruptParent));
}

#[test]
fn four_cell_specifiers() {
    let blob = tree_with(|b| {
        b.gic("arm,gic-v3", &V2_REG, 4)
            .timer(&[1, 13, 4, 0, 1, 14, 4, 0, 1, 11, 4, 0, 1, 10, 4, 0]);
    });
    let g = gic(&blob).unwrap();
    assert_eq!(g.interrupt_cells, 4);
    assert_eq!(timer(&blob, &g).unwrap().virtual_timer.intid.raw(), 27);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
    /// Any corruption of a real tree gives Ok or a typed error, never a panic.
    #[test]
    fn corrupted_trees_never_panic(
        which in 0usize..4,
        edits in proptest::collection::vec((0usize..8000, proptest::prelude::any::<u8>()), 1..8),
    ) {
        let mut blob = [V2, V2_EL2, V3, V3_EL2][which].to_vec();
        for (at, v) in edits {
            let n = blob.len();
            blob[at % n] = v;
        }
        if let Ok(g) = gic(&blob) {
            let _ = timer(&blob, &g);
            let _ = device_interrupt(&blob, &g, "virtio,mmio", 0x0a00_0000);
        }
    }

    /// Every specifier decodes or gives a typed error; a decoded one has an
    /// INTID of the class its type cell names.
    #[test]
    fn any_specifier(kind in 0u32..6, number in 0u32..5000, flags in proptest::prelude::any::<u32>()) {
        if let Ok(i) = decode_specifier(&[kind, number, flags]) {
            let expected = [32, 16, 4096, 1056][kind as usize] + number;
            proptest::prop_assert_eq!(i.intid.raw(), expected);
        }
    }
}
