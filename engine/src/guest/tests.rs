//! Tests of installation, fill and audit that need no KVM.

use super::layout::{param, vcpu_block, GDTR_GPA, IDTR_GPA, IDT_GPA, PDPT_GPA, PD_GPA};
use super::*;

const MIB: u64 = 1 << 20;

fn params(workload: Workload, vcpus: u32, fill: Fill) -> GuestParams {
    GuestParams {
        workload,
        vcpus,
        fill,
        tsc_khz: 2_000_000,
        ..Default::default()
    }
}

/// What the guest's check+write does, done by the host (to make pages the guest has written).
pub(super) fn host_check_write(mem: &GuestMemory, layout: &GuestLayout, page: u64) {
    let gpa = layout.data_page_gpa(page);
    let le = layout.ledger_entry_gpa(page);
    let mut c = [0u8; 4];
    mem.read(le, &mut c).unwrap();
    let c = u32::from_le_bytes(c).wrapping_add(1);
    mem.write_u64(gpa, gpa ^ HEADER_SIG).unwrap();
    mem.write_u64(gpa + 8, u64::from(c)).unwrap();
    mem.write(le, &c.to_le_bytes()).unwrap();
}

#[test]
fn install_writes_params_page_tables_code_and_ledger() {
    let mem = GuestMemory::new(&GuestMemory::simple_layout(96 * MIB, 32 * MIB)).unwrap();
    let p = GuestParams {
        wss_bytes: MIB,
        rate_pages_per_s: 5000,
        hot_bytes: 0,
        seed: 99,
        report_interval_ms: 500,
        ..params(Workload::HotCold, 3, Fill::Mixed { seed: 5 })
    };
    let l = install(&mem, &p).unwrap();
    assert_eq!(l, GuestLayout::new(96 * MIB, 3).unwrap());
    let f = |off| mem.read_u64(PARAM_GPA + off).unwrap();
    assert_eq!(f(param::MAGIC).to_le_bytes(), *b"FERRYGST");
    assert_eq!(f(param::WORKLOAD), 4);
    assert_eq!(f(param::DATA_START), l.data_start());
    assert_eq!(f(param::DATA_PAGES), l.data_pages());
    assert_eq!(f(param::LEDGER), 0x20_0000);
    assert_eq!(f(param::WSS_PAGES), 256);
    assert_eq!(f(param::RATE), 5000);
    assert_eq!(f(param::TSC_KHZ), 2_000_000);
    assert_eq!(f(param::NVCPUS), 3);
    assert_eq!(f(param::REPORT_TICKS), 1_000_000_000);
    assert_eq!(f(param::HOT_PAGES), 16);
    assert_eq!(f(param::SEED), 99);
    // 5000 steps/s: a 200 µs step, the timer at its 4 ms floor.
    assert_eq!(f(param::TIMER_COUNT), 4_000_000);
    for (i, s) in l.shares().iter().enumerate() {
        let b = |off| mem.read_u64(l.vcpu_block_gpa(i as u32) + off).unwrap();
        assert_eq!(
            (b(vcpu_block::FIRST_PAGE), b(vcpu_block::PAGES)),
            (s.first_page, s.pages)
        );
        assert_eq!(b(vcpu_block::WRITES), 0);
    }
    // Identity map: PML4 -> PDPT -> one PD per GiB, 2 MiB pages over all memory.
    assert_eq!(mem.read_u64(PML4_GPA).unwrap(), PDPT_GPA | 3);
    assert_eq!(mem.read_u64(PDPT_GPA).unwrap(), PD_GPA | 3);
    assert_eq!(mem.read_u64(PDPT_GPA + 8).unwrap(), 0);
    for j in 0..48 {
        assert_eq!(mem.read_u64(PD_GPA + j * 8).unwrap(), (j << 21) | 0x83);
    }
    assert_eq!(mem.read_u64(PD_GPA + 48 * 8).unwrap(), 0);
    // GDT (code 0x08, data 0x10), its pseudo-descriptor, and an IDT whose timer gate is a
    // present 64-bit interrupt gate into the code.
    assert_eq!(mem.read_u64(DESC_GPA).unwrap(), 0);
    assert_eq!(mem.read_u64(DESC_GPA + 8).unwrap() >> 40 & 0xff, 0x9b);
    assert_eq!(mem.read_u64(DESC_GPA + 16).unwrap() >> 40 & 0xff, 0x93);
    let mut dtr = [0u8; 10];
    mem.read(GDTR_GPA, &mut dtr).unwrap();
    assert_eq!(dtr[..2], [23, 0]);
    assert_eq!(u64::from_le_bytes(dtr[2..].try_into().unwrap()), DESC_GPA);
    mem.read(IDTR_GPA, &mut dtr).unwrap();
    assert_eq!(u16::from_le_bytes([dtr[0], dtr[1]]), 128 * 16 - 1);
    assert_eq!(u64::from_le_bytes(dtr[2..].try_into().unwrap()), IDT_GPA);
    let gate = |v: u8| {
        let lo = mem.read_u64(IDT_GPA + u64::from(v) * 16).unwrap();
        let hi = mem.read_u64(IDT_GPA + u64::from(v) * 16 + 8).unwrap();
        (lo, (lo & 0xffff) | (lo >> 48) << 16 | hi << 32)
    };
    let (lo, handler) = gate(TIMER_VECTOR);
    assert_eq!((lo >> 16 & 0xffff, lo >> 40 & 0xff), (0x08, 0x8e));
    assert!(handler > CODE_GPA && handler < LEDGER_GPA, "{handler:#x}");
    assert_ne!(gate(SPURIOUS_VECTOR).0, 0);
    assert_eq!(gate(0x21).0, 0);
    // Code at the entry point, a zero ledger, the fill in the data pages.
    assert_ne!(mem.read_u64(l.entry()).unwrap(), 0);
    let mut ledger = vec![1u8; l.ledger_bytes() as usize];
    mem.read(LEDGER_GPA, &mut ledger).unwrap();
    assert!(ledger.iter().all(|&b| b == 0));
    let mut want = vec![0u8; PAGE_SIZE];
    let mut got = vec![0u8; PAGE_SIZE];
    let fill = MixedFill::new(5);
    for page in (0..l.data_pages()).step_by(97) {
        fill.page(page, &mut want);
        mem.read(l.data_page_gpa(page), &mut got).unwrap();
        assert_eq!(want, got, "page {page}");
    }
    let st = status(&mem).unwrap();
    assert_eq!(st, vec![VcpuStatus::default(); 3]);
    let a = audit(&mem).unwrap();
    assert_eq!(a.pages_checked, l.data_pages());
    assert!(a.is_clean() && a.in_flight.is_empty(), "{a:?}");
}

#[test]
fn parallel_fill_matches_the_page_function() {
    // 256 MiB has enough pages for the threaded path.
    let mem = GuestMemory::new(&GuestMemory::simple_layout(256 * MIB, 256 * MIB)).unwrap();
    let l = install(&mem, &params(Workload::Idle, 2, Fill::Mixed { seed: 11 })).unwrap();
    let mut want = vec![0u8; PAGE_SIZE];
    let mut got = vec![0u8; PAGE_SIZE];
    let mut zero = 0;
    let fill = MixedFill::new(11);
    for page in (0..l.data_pages()).step_by(31).chain([l.data_pages() - 1]) {
        if fill.page(page, &mut want) == PageClass::Zero {
            zero += 1;
        }
        mem.read(l.data_page_gpa(page), &mut got).unwrap();
        assert_eq!(want, got, "page {page}");
    }
    assert!(zero > 0);
}

#[test]
fn install_refuses_bad_memory_and_params() {
    let holey = GuestMemory::new(&[(0, 64 * MIB), (128 * MIB, 64 * MIB)]).unwrap();
    let p = params(Workload::Seq, 1, Fill::Zero);
    assert!(matches!(
        install(&holey, &p),
        Err(GuestError::MemoryShape { .. })
    ));
    let small = GuestMemory::new(&[(0, 16 * MIB)]).unwrap();
    assert!(matches!(
        install(&small, &p),
        Err(GuestError::MemorySize { .. })
    ));
    let mem = GuestMemory::new(&[(0, 64 * MIB)]).unwrap();
    let no_tsc = GuestParams {
        tsc_khz: 0,
        ..p.clone()
    };
    assert!(matches!(install(&mem, &no_tsc), Err(GuestError::Param(_))));
    let vcpus = GuestParams { vcpus: 61, ..p };
    assert!(matches!(
        install(&mem, &vcpus),
        Err(GuestError::VcpuCount { .. })
    ));
    assert!(matches!(status(&mem), Err(GuestError::NotInstalled { .. })));
    assert!(matches!(audit(&mem), Err(GuestError::NotInstalled { .. })));
}

#[test]
fn audit_finds_corrupt_headers_and_ledger_entries() {
    let mem = GuestMemory::new(&[(0, 64 * MIB)]).unwrap();
    let l = install(&mem, &params(Workload::Seq, 2, Fill::Mixed { seed: 3 })).unwrap();
    let s1 = l.shares()[1].first_page;
    for page in [0, 1, 2, 3, s1, s1 + 1, s1 + 2] {
        host_check_write(&mem, &l, page);
        host_check_write(&mem, &l, page);
    }
    assert!(audit(&mem).unwrap().is_clean());

    // A lost ledger write, a lost header write, a header at the wrong address.
    let bump = |mem: &GuestMemory, page: u64, by: u32| {
        let le = l.ledger_entry_gpa(page);
        let mut c = [0u8; 4];
        mem.read(le, &mut c).unwrap();
        mem.write(le, &u32::from_le_bytes(c).wrapping_add(by).to_le_bytes())
            .unwrap();
    };
    bump(&mem, 1, 1);
    mem.write_u64(l.data_page_gpa(2) + 8, 7).unwrap();
    mem.write_u64(l.data_page_gpa(s1), l.data_page_gpa(s1 + 1) ^ HEADER_SIG)
        .unwrap();
    // A never-written page with a non-zero header.
    mem.write_u64(l.data_page_gpa(s1 + 100), 1).unwrap();
    let a = audit(&mem).unwrap();
    assert_eq!(a.pages_checked, l.data_pages());
    assert_eq!(a.bad_pages, 4, "{a:?}");
    let bad: Vec<_> = a.bad.iter().map(|b| (b.page, b.vcpu)).collect();
    assert_eq!(bad, [(1, 0), (2, 0), (s1, 1), (s1 + 100, 1)]);
    assert!(!a.is_clean());

    // One half-done write per vCPU (header ahead of the ledger) is a paused vCPU, two are not.
    let mem = GuestMemory::new(&[(0, 64 * MIB)]).unwrap();
    let l = install(&mem, &params(Workload::Seq, 2, Fill::Zero)).unwrap();
    for page in [5, 6, s1 + 9] {
        host_check_write(&mem, &l, page);
    }
    bump(&mem, 5, u32::MAX); // ledger one behind the header
    bump(&mem, s1 + 9, u32::MAX);
    let a = audit(&mem).unwrap();
    assert!(a.is_clean(), "{a:?}");
    assert_eq!(a.in_flight.len(), 2);
    bump(&mem, 6, u32::MAX);
    let a = audit(&mem).unwrap();
    assert_eq!(a.bad_pages, 2, "{a:?}");
    assert_eq!(a.in_flight.len(), 1);
}

#[test]
fn names_parse_and_serialize() {
    for w in Workload::ALL {
        assert_eq!(w.to_string().parse::<Workload>().unwrap(), w);
        let json = serde_json::to_string(&w).unwrap();
        assert_eq!(json, format!("\"{w}\""));
        assert_eq!(serde_json::from_str::<Workload>(&json).unwrap(), w);
    }
    assert_eq!(Workload::HotCold.to_string(), "hotcold");
    assert_eq!(Workload::DirtyAll.to_string(), "dirty-all");
    assert!("hot-cold".parse::<Workload>().is_err());
    assert_eq!("zero".parse::<Fill>().unwrap(), Fill::Zero);
    assert!(matches!(
        "mixed".parse::<Fill>().unwrap(),
        Fill::Mixed { .. }
    ));
    assert!("ones".parse::<Fill>().is_err());
    let p = GuestParams::default();
    let back: GuestParams = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
    assert_eq!(back, p);
}

#[test]
fn timer_period_follows_the_rate() {
    let count = |workload, rate, report_interval_ms| {
        let p = GuestParams {
            rate_pages_per_s: rate,
            report_interval_ms,
            ..params(workload, 1, Fill::Zero)
        };
        timer_count(&p)
    };
    // idle at its default 1000/s, and faster: the 4 ms floor.
    assert_eq!(count(Workload::Idle, 0, 1000), 4_000_000);
    assert_eq!(count(Workload::Idle, 100_000, 1000), 4_000_000);
    // Slower: one step, up to the report interval.
    assert_eq!(count(Workload::Idle, 50, 1000), 20_000_000);
    assert_eq!(count(Workload::Seq, 2, 1000), 500_000_000);
    assert_eq!(count(Workload::Seq, 2, 100), 100_000_000);
    assert_eq!(count(Workload::Seq, 1, u32::MAX), 1_000_000_000);
    // No rate limit, or one above the TSC frequency: no timer.
    assert_eq!(count(Workload::DirtyAll, 0, 1000), 0);
    assert_eq!(count(Workload::Random, 3_000_000_000, 1000), 0);
}
