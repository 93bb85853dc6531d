//! The coherence checker (`faultline_device::check`): real x86-64 CPU page
//! tables in the rig's guest memory next to the device's own, and commands
//! whose translations the checker compares against them.

use std::sync::Arc;

use faultline_abi::{atomic_op, Access, ContextEntry, Counter, CpuRoot, CtlOp, Pte, Status};
use faultline_abi::{CpuDevicePrivate, CpuExclusive, LEAF_1G, LEAF_2M, LEAF_4K};
use faultline_device::check::{
    x86_64_lookup, CheckMode, CpuLookup, CpuTables, Violation, ViolationKind, REPORT_PAGES,
};
use faultline_device::testing::{cmd, context_entry, CpuPageTable as CpuPt, Rig, DATA};
use vm_memory::{Bytes, GuestAddress};

const US: u64 = CpuPt::US;
const PS: u64 = CpuPt::PS;
const USER_RW: u64 = CpuPt::USER_RW;
const USER_RO: u64 = CpuPt::USER_RO;

/// CPU page tables live here, apart from the rig's device tables and data.
const CPU_PT: u64 = 0x80_0000;
const CPU_PT_END: u64 = 0xC0_0000;
/// Data frames for the tests (the rig's DATA region).
const F: u64 = DATA;
/// The VA the tests use.
const VA: u64 = 0x7000_0000;

fn set_cpu_root(rig: &Rig, ctx: u32, word: u32) {
    rig.write_u32(
        context_entry(ctx) + ContextEntry::CPU_ROOT_OFFSET as u64,
        word,
    );
}

/// A rig with the checker in `mode`, channel 0 on context 0, and a CPU
/// table attached to context 0.
fn setup(mode: CheckMode, mem: u64) -> (Rig, CpuPt) {
    let mut rig = Rig::new(mem, 16);
    rig.dev.set_checker(mode, None);
    assert!(rig.enable_channel(0, 0));
    let pt = CpuPt::new(&rig, CPU_PT, CPU_PT_END);
    pt.attach(&rig, 0);
    (rig, pt)
}

/// Map `pages` 4 KiB pages at VA on both sides, consistently.
fn map_both(rig: &mut Rig, pt: &mut CpuPt, pages: u64, dev: Pte, cpu: u64) {
    for i in 0..pages {
        rig.map(0, VA + i * LEAF_4K, F + i * LEAF_4K, LEAF_4K, dev);
        pt.map(rig, VA + i * LEAF_4K, F + i * LEAF_4K, LEAF_4K, cpu);
    }
}

const DEV_RW: Pte = Pte::WRITE.union(Pte::ATOMIC);

fn violations(rig: &Rig) -> u64 {
    rig.dev.counters().get(Counter::CoherenceViolations)
}

fn reports(rig: &mut Rig) -> Vec<Violation> {
    rig.dev.take_coherence_reports()
}

fn named(rig: &Rig, name: &str) -> u64 {
    let n = rig.dev.counters().named();
    n.iter()
        .find(|(k, _)| k == name)
        .unwrap_or_else(|| panic!("no counter {name}"))
        .1
}

#[test]
fn consistent_mappings_pass_and_every_page_is_checked() {
    let (mut rig, mut pt) = setup(CheckMode::Fatal, 64 << 20);
    map_both(&mut rig, &mut pt, 4, DEV_RW, USER_RW);
    let t = rig.exec(0, cmd::fill(VA, 4 * LEAF_4K, 0x1122_3344_5566_7788));
    assert_eq!(rig.status(t), Status::Ok);
    let t = rig.exec(0, cmd::copy(VA + 2 * LEAF_4K, VA, 2 * LEAF_4K));
    assert_eq!(rig.status(t), Status::Ok);
    assert_eq!(violations(&rig), 0);
    assert!(reports(&mut rig).is_empty());
    // FILL: 4 pages; COPY: 2 pages each side.
    assert_eq!(named(&rig, "check.checked"), 8);
    assert_eq!(named(&rig, "check.mode"), 2);
    assert_eq!(named(&rig, "check.unchecked"), 0);
}

#[test]
fn off_checks_nothing() {
    let (mut rig, mut pt) = setup(CheckMode::Off, 64 << 20);
    map_both(&mut rig, &mut pt, 1, DEV_RW, 0);
    let t = rig.exec(0, cmd::fill(VA, LEAF_4K, 1));
    assert_eq!(rig.status(t), Status::Ok);
    assert_eq!(violations(&rig), 0);
    assert_eq!(named(&rig, "check.checked"), 0);
    assert_eq!(named(&rig, "check.mode"), 0);
}

/// The classic bug: the CPU unmapped a page, the device TLB still holds
/// it because nobody invalidated.
fn stale_tlb(mode: CheckMode) -> Rig {
    let (mut rig, mut pt) = setup(mode, 64 << 20);
    map_both(&mut rig, &mut pt, 1, DEV_RW, USER_RW);
    let t = rig.exec(0, cmd::fill(VA, 8, 1));
    assert_eq!(rig.status(t), Status::Ok);
    assert_eq!(violations(&rig), 0);
    // CPU PTE cleared, device PTE too, but no INVALIDATE: the device still
    // has the translation cached.
    pt.map(&rig, VA, 0, LEAF_4K, 0);
    rig.unmap(0, VA, LEAF_4K);
    let hits = rig.dev.counters().get(Counter::TlbHits);
    let t = rig.exec(0, cmd::fill(VA, 8, 0xAB));
    assert!(rig.dev.counters().get(Counter::TlbHits) > hits, "a TLB hit");
    assert_eq!(violations(&rig), 1);
    let r = reports(&mut rig);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].ctx, 0);
    assert_eq!(r[0].va, VA);
    assert_eq!(r[0].access, Access::Write);
    assert_eq!(r[0].device_frame, F);
    assert_eq!(r[0].kind, ViolationKind::NotMapped);
    assert_eq!(r[0].cpu_pte, 0);
    assert_eq!(r[0].origin.engine, faultline_abi::engine::FILL);
    assert_eq!(r[0].origin.channel, 0);
    let line = r[0].to_string();
    assert!(
        line.contains("context 0 VA 0x70000000 Write") && line.contains("FILL"),
        "{line}"
    );
    let expect = if mode == CheckMode::Fatal {
        Status::CoherenceViolation
    } else {
        Status::Ok
    };
    assert_eq!(rig.status(t), expect);
    rig
}

#[test]
fn stale_tlb_hit_fails_the_command_under_fatal() {
    let rig = stale_tlb(CheckMode::Fatal);
    assert_eq!(rig.read_u64(F), 1, "the access did not happen");
    assert_eq!(
        rig.dev.counters().with_status(Status::CoherenceViolation),
        1
    );
    assert_eq!(rig.dev.coherence_violations(), 1);
}

#[test]
fn stale_tlb_hit_proceeds_under_warn() {
    let mut rig = stale_tlb(CheckMode::Warn);
    assert_eq!(rig.read_u64(F), 0xAB, "the access was performed");
    // After the invalidation the device walks, finds nothing, and faults:
    // no translation used, so no violation.
    assert!(rig.ctl_ok(CtlOp::InvalidateContext, 0, 0, 0));
    let t = rig.submit(0, cmd::fill(VA, 8, 2));
    rig.dev.doorbell(faultline_abi::doorbell::channel(0));
    rig.dev.run_until_idle();
    assert!(rig.completion(t).is_none(), "stalled on a fault");
    assert_eq!(violations(&rig), 1);
}

#[test]
fn device_write_where_the_cpu_is_read_only() {
    let (mut rig, mut pt) = setup(CheckMode::Fatal, 64 << 20);
    map_both(&mut rig, &mut pt, 1, DEV_RW, USER_RO);
    rig.map(0, VA + LEAF_4K, F + LEAF_4K, LEAF_4K, DEV_RW);
    pt.map(&rig, VA + LEAF_4K, F + LEAF_4K, LEAF_4K, USER_RW);
    // Reading the read-only page is fine.
    let t = rig.exec(0, cmd::copy(VA + LEAF_4K, VA, 64));
    assert_eq!(rig.status(t), Status::Ok);
    assert_eq!(violations(&rig), 0);
    let t = rig.exec(0, cmd::fill(VA, 8, 1));
    assert_eq!(rig.status(t), Status::CoherenceViolation);
    let t = rig.exec(0, cmd::atomic(VA, atomic_op::ADD, true, 1, 0));
    assert_eq!(rig.status(t), Status::CoherenceViolation);
    assert_eq!(violations(&rig), 2);
    let r = reports(&mut rig);
    assert_eq!(r.len(), 1, "one report per page: {r:?}");
    assert_eq!(r[0].kind, ViolationKind::ReadOnly);
    assert_eq!(r[0].cpu_pte, F | USER_RO);
    assert_eq!(named(&rig, "check.unreported"), 1);
}

/// A device-exclusive CPU entry keeping frame `frame`.
fn exclusive(frame: u64, writable: bool) -> u64 {
    CpuExclusive {
        owner: 3,
        frame,
        writable,
    }
    .encode()
    .unwrap()
}

#[test]
fn device_exclusive_entries_map_their_frame_for_the_device() {
    let (mut rig, mut pt) = setup(CheckMode::Fatal, 64 << 20);
    for (i, cpu) in [exclusive(F, true), exclusive(F + 2 * LEAF_4K, true)]
        .into_iter()
        .chain([exclusive(F + 2 * LEAF_4K, false)])
        .enumerate()
    {
        let va = VA + i as u64 * LEAF_4K;
        rig.map(0, va, F + i as u64 * LEAF_4K, LEAF_4K, DEV_RW);
        pt.map(&rig, va, 0, LEAF_4K, cpu);
    }
    let t = rig.exec(0, cmd::atomic(VA, atomic_op::ADD, true, 1, 0));
    assert_eq!(rig.status(t), Status::Ok);
    assert_eq!(violations(&rig), 0);
    // The entry names another frame than the device uses.
    let t = rig.exec(0, cmd::atomic(VA + LEAF_4K, atomic_op::ADD, true, 1, 0));
    assert_eq!(rig.status(t), Status::CoherenceViolation);
    // Held read-only: the device may read, not write.
    let t = rig.exec(0, cmd::copy(VA, VA + 2 * LEAF_4K, 64));
    assert_eq!(rig.status(t), Status::Ok);
    let t = rig.exec(0, cmd::fill(VA + 2 * LEAF_4K, 8, 1));
    assert_eq!(rig.status(t), Status::CoherenceViolation);
    let r = reports(&mut rig);
    assert_eq!(r.len(), 2, "{r:?}");
    assert_eq!(
        r[0].kind,
        ViolationKind::FrameMismatch {
            cpu_frame: F + 2 * LEAF_4K
        }
    );
    assert_eq!(r[1].kind, ViolationKind::ReadOnly);
}

#[test]
fn frame_mismatch() {
    let (mut rig, mut pt) = setup(CheckMode::Warn, 64 << 20);
    rig.map(0, VA, F, LEAF_4K, DEV_RW);
    pt.map(&rig, VA, F + LEAF_4K, LEAF_4K, USER_RW);
    let t = rig.exec(0, cmd::fill(VA, 8, 1));
    assert_eq!(rig.status(t), Status::Ok);
    let r = reports(&mut rig);
    assert_eq!(r.len(), 1);
    assert_eq!(
        r[0].kind,
        ViolationKind::FrameMismatch {
            cpu_frame: F + LEAF_4K
        }
    );
    assert_eq!(r[0].device_frame, F);
}

#[test]
fn a_large_device_leaf_is_checked_page_by_page() {
    // Device: one 2 MiB leaf. CPU: 4 KiB pages, page 300 wrong.
    let (mut rig, mut pt) = setup(CheckMode::Warn, 64 << 20);
    let base = 0x100_0000;
    rig.map(0, VA, base, LEAF_2M, DEV_RW);
    for i in 0..512 {
        let frame = if i == 300 { F } else { base + i * LEAF_4K };
        pt.map(&rig, VA + i * LEAF_4K, frame, LEAF_4K, USER_RW);
    }
    let t = rig.exec(0, cmd::fill(VA, LEAF_2M, 7));
    assert_eq!(rig.status(t), Status::Ok);
    assert_eq!(violations(&rig), 1);
    let r = reports(&mut rig);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].va, VA + 300 * LEAF_4K);
    assert_eq!(named(&rig, "check.checked"), 512);
}

#[test]
fn large_cpu_leaves() {
    // 2 GiB of RAM so a 1 GiB CPU leaf at GPA 1 GiB exists.
    let (mut rig, mut pt) = setup(CheckMode::Fatal, 2 << 30);
    let va2m = VA;
    let va1g = 0x80_0000_0000;
    pt.map(&rig, va2m, 0x100_0000, LEAF_2M, USER_RW);
    pt.map(&rig, va1g, LEAF_1G, LEAF_1G, USER_RW);
    // Device pages inside both leaves, at the matching offsets.
    rig.map(
        0,
        va2m + 5 * LEAF_4K,
        0x100_0000 + 5 * LEAF_4K,
        LEAF_4K,
        DEV_RW,
    );
    rig.map(
        0,
        va1g + LEAF_2M + LEAF_4K,
        LEAF_1G + LEAF_2M + LEAF_4K,
        LEAF_4K,
        DEV_RW,
    );
    for va in [va2m + 5 * LEAF_4K, va1g + LEAF_2M + LEAF_4K] {
        let t = rig.exec(0, cmd::fill(va + 8, 8, 1));
        assert_eq!(rig.status(t), Status::Ok, "{va:#x}");
    }
    assert_eq!(violations(&rig), 0);
    // Off by one page inside each leaf.
    rig.map(
        0,
        va2m + 6 * LEAF_4K,
        0x100_0000 + 7 * LEAF_4K,
        LEAF_4K,
        DEV_RW,
    );
    rig.map(
        0,
        va1g + 2 * LEAF_4K,
        LEAF_1G + 3 * LEAF_4K,
        LEAF_4K,
        DEV_RW,
    );
    for va in [va2m + 6 * LEAF_4K, va1g + 2 * LEAF_4K] {
        let t = rig.exec(0, cmd::fill(va, 8, 1));
        assert_eq!(rig.status(t), Status::CoherenceViolation, "{va:#x}");
    }
    let r = reports(&mut rig);
    let kinds: Vec<_> = r.iter().map(|v| v.kind).collect();
    assert_eq!(
        kinds,
        [
            ViolationKind::FrameMismatch {
                cpu_frame: 0x100_0000 + 6 * LEAF_4K
            },
            ViolationKind::FrameMismatch {
                cpu_frame: LEAF_1G + 2 * LEAF_4K
            },
        ]
    );
    assert_eq!(r[0].cpu_pte, 0x100_0000 | USER_RW | PS);
}

#[test]
fn supervisor_pages_are_violations() {
    let (mut rig, mut pt) = setup(CheckMode::Fatal, 64 << 20);
    map_both(&mut rig, &mut pt, 1, DEV_RW, USER_RW);
    // US clear in the level-3 entry, not in the leaf: the AND counts.
    let l4 = pt.root + ((VA >> 39) & 511) * 8;
    let l3 = (rig.read_u64(l4) & !0xfff) + ((VA >> 30) & 511) * 8;
    rig.write_u64(l3, rig.read_u64(l3) & !US);
    let t = rig.exec(0, cmd::fill(VA, 8, 1));
    assert_eq!(rig.status(t), Status::CoherenceViolation);
    assert_eq!(reports(&mut rig)[0].kind, ViolationKind::Supervisor);
}

#[test]
fn contexts_without_a_cpu_table_are_counted_unchecked() {
    let (mut rig, mut pt) = setup(CheckMode::Fatal, 64 << 20);
    map_both(&mut rig, &mut pt, 2, DEV_RW, 0);
    set_cpu_root(&rig, 0, CpuRoot::NONE.0);
    let t = rig.exec(0, cmd::fill(VA, 2 * LEAF_4K, 1));
    assert_eq!(rig.status(t), Status::Ok);
    assert_eq!(violations(&rig), 0);
    assert_eq!(named(&rig, "check.unchecked"), 2);
    assert_eq!(named(&rig, "check.checked"), 0);
}

#[test]
fn an_unknown_paging_mode_is_reported_not_guessed() {
    let (mut rig, mut pt) = setup(CheckMode::Fatal, 64 << 20);
    map_both(&mut rig, &mut pt, 1, DEV_RW, USER_RW);
    set_cpu_root(&rig, 0, (2 << 28) | (pt.root >> 12) as u32);
    let t = rig.exec(0, cmd::fill(VA, 8, 1));
    assert_eq!(rig.status(t), Status::CoherenceViolation);
    assert!(matches!(
        reports(&mut rig)[0].kind,
        ViolationKind::BadCpuRoot { .. }
    ));
}

#[test]
fn hostile_cpu_tables_end_the_walk() {
    let (mut rig, mut pt) = setup(CheckMode::Warn, 64 << 20);
    map_both(&mut rig, &mut pt, 1, DEV_RW, USER_RW);
    let root = CpuRoot::x86_64(pt.root).unwrap();
    let mem = rig.mem();
    // A PML4 entry pointing back at the PML4, at every level.
    let l4 = pt.root + ((VA >> 39) & 511) * 8;
    rig.write_u64(l4, pt.root | USER_RW);
    // Level 3 then reads the PML4's slot for VA's level-3 index, empty.
    assert_eq!(
        x86_64_lookup(mem, root, VA),
        CpuLookup::NotMapped { pte: 0 }
    );
    // A table outside RAM: not mapped, with the entry that led there.
    let out = (1u64 << 40) | USER_RW;
    rig.write_u64(l4, out);
    assert_eq!(
        x86_64_lookup(mem, root, VA),
        CpuLookup::NotMapped { pte: out }
    );
    // A root outside RAM.
    let far = CpuRoot::x86_64(0xFF_F000_0000).unwrap();
    assert_eq!(x86_64_lookup(mem, far, VA), CpuLookup::NotMapped { pte: 0 });
    // PS in a PML4 entry is reserved.
    rig.write_u64(l4, LEAF_1G | USER_RW | PS);
    assert_eq!(
        x86_64_lookup(mem, root, VA),
        CpuLookup::NotMapped {
            pte: LEAF_1G | USER_RW | PS
        }
    );
    // A 2 MiB leaf with reserved low address bits.
    pt.map(&rig, 0x100_0000_0000, 0x100_0000 | 0x2000, LEAF_2M, USER_RW);
    let bad = CpuRoot::x86_64(pt.root).unwrap();
    assert_eq!(
        x86_64_lookup(rig.mem(), bad, 0x100_0000_0000),
        CpuLookup::NotMapped {
            pte: 0x100_2000 | USER_RW | PS
        }
    );
    // Through the device: the loop and a garbage root, no panic, each
    // reported.
    rig.write_u64(l4, pt.root | USER_RW);
    let t = rig.exec(0, cmd::fill(VA, 8, 1));
    assert_eq!(rig.status(t), Status::Ok);
    set_cpu_root(&rig, 0, (1 << 28) | (u32::MAX >> 4));
    rig.map(0, VA + LEAF_4K, F + LEAF_4K, LEAF_4K, DEV_RW);
    let t = rig.exec(0, cmd::fill(VA + LEAF_4K, 8, 1));
    assert_eq!(rig.status(t), Status::Ok);
    assert_eq!(violations(&rig), 2);
    assert_eq!(reports(&mut rig).len(), 2);
}

#[test]
fn reported_once_per_page_and_bounded() {
    let (mut rig, mut pt) = setup(CheckMode::Warn, 64 << 20);
    map_both(&mut rig, &mut pt, 1, DEV_RW, USER_RO);
    for _ in 0..2 {
        let t = rig.exec(0, cmd::fill(VA, 8, 1));
        assert_eq!(rig.status(t), Status::Ok);
    }
    assert_eq!(violations(&rig), 2);
    assert_eq!(reports(&mut rig).len(), 1);
    assert_eq!(named(&rig, "check.unreported"), 1);
    // The report set is bounded: the checker keeps at most REPORT_PAGES
    // pages, then counts only. A large leaf with no CPU mapping at all
    // gives a new page per 4 KiB.
    let many = REPORT_PAGES as u64 + 16;
    let base = 0x40_0000_0000;
    rig.map_range(0, base, 0x100_0000, 9 * LEAF_2M, LEAF_2M, DEV_RW);
    let t = rig.exec(0, cmd::fill(base, many * LEAF_4K, 0));
    assert_eq!(rig.status(t), Status::Ok);
    assert_eq!(reports(&mut rig).len(), REPORT_PAGES - 1);
    assert_eq!(violations(&rig), 2 + many);
    assert_eq!(
        named(&rig, "check.unreported"),
        1 + many - (REPORT_PAGES as u64 - 1)
    );
}

/// A host-supplied table (the loopback's simulated mm): everything mapped
/// identity, user, read-only.
struct ReadOnlyIdentity;
impl CpuTables for ReadOnlyIdentity {
    fn lookup(&self, _root: CpuRoot, va: u64) -> CpuLookup {
        CpuLookup::Mapped {
            frame: va & !0xfff,
            writable: false,
            user: true,
            pte: 0x42,
        }
    }
}

#[test]
fn host_supplied_tables_are_used() {
    let (mut rig, _pt) = setup(CheckMode::Fatal, 64 << 20);
    rig.dev
        .set_checker(CheckMode::Fatal, Some(Arc::new(ReadOnlyIdentity)));
    rig.map(0, F, F, LEAF_4K, DEV_RW);
    rig.map(0, F + LEAF_4K, F + LEAF_4K, LEAF_4K, DEV_RW);
    let t = rig.exec(0, cmd::atomic(F, atomic_op::ADD, true, 1, 0));
    assert_eq!(rig.status(t), Status::CoherenceViolation);
    let r = reports(&mut rig);
    assert_eq!((r[0].kind, r[0].cpu_pte), (ViolationKind::ReadOnly, 0x42));
    // Reads agree with it.
    let t = rig.exec(0, cmd::copy(F + LEAF_4K, F, 8));
    assert_eq!(rig.status(t), Status::CoherenceViolation, "the COPY writes");
    assert_eq!(rig.mem().read_obj::<u64>(GuestAddress(F)).unwrap(), 0);
}

#[test]
fn config_turns_the_checker_on() {
    use faultline_device::Config;
    use vm_memory::GuestMemoryMmap;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
    let cfg = Config {
        check: CheckMode::Warn,
        ..Config::default()
    };
    let rig = Rig::with_config(mem, 16, cfg);
    assert_eq!(named(&rig, "check.mode"), 1);
    assert_eq!(rig.dev.config().check, CheckMode::Warn);
    assert_eq!("fatal".parse(), Ok(CheckMode::Fatal));
    assert_eq!("warn".parse(), Ok(CheckMode::Warn));
    assert_eq!("off".parse(), Ok(CheckMode::Off));
    assert!("Warn".parse::<CheckMode>().is_err());
}

#[test]
fn a_copy_counts_one_violation_per_use() {
    // COPY peeks at the next page to coalesce; a peek that hits a
    // violation must not count it twice (once peeking, once translating).
    let (mut rig, mut pt) = setup(CheckMode::Fatal, 64 << 20);
    map_both(&mut rig, &mut pt, 4, DEV_RW, USER_RW);
    // Page 1 of the source: the CPU maps another frame.
    pt.map(&rig, VA + LEAF_4K, F + 3 * LEAF_4K, LEAF_4K, USER_RW);
    let t = rig.exec(0, cmd::copy(VA + 2 * LEAF_4K, VA, 2 * LEAF_4K));
    assert_eq!(rig.status(t), Status::CoherenceViolation);
    assert_eq!(violations(&rig), 1);
    assert_eq!(reports(&mut rig).len(), 1);
}

#[test]
fn a_launch_names_its_warp() {
    use faultline_abi::isa::{encode, sreg, ADD, EXIT, S2R, SHLI, ST64};
    // Each thread stores to out[GTID * 512] (one page per thread); the CPU
    // maps thread 9's page (warp 1, lane 1) read-only.
    let code = [
        encode(S2R, 5, 0, 0, sreg::GTID),
        encode(SHLI, 5, 5, 0, 12),
        encode(ADD, 5, 5, 1, 0),
        encode(ST64, 0, 5, 5, 0),
        encode(EXIT, 0, 0, 0, 0),
    ];
    let (mut rig, mut pt) = setup(CheckMode::Fatal, 64 << 20);
    let code_va = 0x1000;
    let code_gpa = F + 0x20_0000;
    rig.write_code(code_gpa, &code);
    rig.map(0, code_va, code_gpa, LEAF_4K, Pte::empty());
    pt.map(&rig, code_va, code_gpa, LEAF_4K, USER_RO);
    map_both(&mut rig, &mut pt, 16, DEV_RW, USER_RW);
    pt.map(&rig, VA + 9 * LEAF_4K, F + 9 * LEAF_4K, LEAF_4K, USER_RO);
    let t = rig.exec(
        0,
        cmd::launch(code_va, code.len() as u32, 1, 16, [VA, 0, 0, 0]),
    );
    assert_eq!(rig.status(t), Status::CoherenceViolation);
    let r = reports(&mut rig);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].va, VA + 9 * LEAF_4K);
    assert_eq!(r[0].kind, ViolationKind::ReadOnly);
    assert_eq!(r[0].origin.engine, faultline_abi::engine::COMPUTE);
    assert_eq!(r[0].origin.info, 1, "warp 1");
    assert!(
        r[0].to_string().contains("LAUNCH on channel 0 warp 1"),
        "{}",
        r[0]
    );
}

/// A device-private CPU entry for VRAM page `vram`.
fn device_private(vram: u64, writable: bool) -> u64 {
    CpuDevicePrivate {
        owner: 3,
        vram,
        writable,
    }
    .encode()
    .unwrap()
}

const VRAM_PAGE: u64 = 0x5000;
const DEV_VRAM_RW: Pte = DEV_RW.union(Pte::VRAM);

#[test]
fn vram_pages_are_checked_against_device_private_entries() {
    let (mut rig, mut pt) = setup(CheckMode::Fatal, 64 << 20);
    rig.map(0, VA, VRAM_PAGE, LEAF_4K, DEV_VRAM_RW);
    pt.map(&rig, VA, 0, LEAF_4K, device_private(VRAM_PAGE, true));
    let t = rig.exec(0, cmd::fill(VA, 64, 0xab));
    assert_eq!(rig.status(t), Status::Ok);
    let t = rig.exec(0, cmd::atomic(VA, atomic_op::ADD, true, 1, 0));
    assert_eq!(rig.status(t), Status::Ok);
    assert_eq!(violations(&rig), 0);
    assert_eq!(named(&rig, "check.checked"), 2);
    assert_eq!(named(&rig, "check.unchecked"), 0);
}

#[test]
fn a_vram_page_the_cpu_entry_does_not_name() {
    let (mut rig, mut pt) = setup(CheckMode::Fatal, 64 << 20);
    rig.map(0, VA, VRAM_PAGE, LEAF_4K, DEV_VRAM_RW);
    pt.map(
        &rig,
        VA,
        0,
        LEAF_4K,
        device_private(VRAM_PAGE + LEAF_4K, true),
    );
    let t = rig.exec(0, cmd::fill(VA, 64, 1));
    assert_eq!(rig.status(t), Status::CoherenceViolation);
    let r = reports(&mut rig);
    assert_eq!(r.len(), 1);
    assert_eq!(
        r[0].kind,
        ViolationKind::DevicePrivate {
            cpu_vram: VRAM_PAGE + LEAF_4K
        }
    );
    assert!(r[0].device_vram);
    assert_eq!(r[0].device_frame, VRAM_PAGE);
    assert!(
        r[0].to_string().contains("through VRAM page 0x5000"),
        "{}",
        r[0]
    );
}

#[test]
fn a_device_write_to_a_read_only_device_private_page() {
    let (mut rig, mut pt) = setup(CheckMode::Fatal, 64 << 20);
    rig.map(0, VA, VRAM_PAGE, LEAF_4K, DEV_VRAM_RW);
    pt.map(&rig, VA, 0, LEAF_4K, device_private(VRAM_PAGE, false));
    map_both_at(&mut rig, &mut pt, VA + LEAF_4K);
    let t = rig.exec(0, cmd::copy(VA + LEAF_4K, VA, 64));
    assert_eq!(rig.status(t), Status::Ok, "reading it is allowed");
    let t = rig.exec(0, cmd::fill(VA, 64, 1));
    assert_eq!(rig.status(t), Status::CoherenceViolation);
    let r = reports(&mut rig);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].kind, ViolationKind::ReadOnly);
}

/// One system page at `va`, the same on both sides.
fn map_both_at(rig: &mut Rig, pt: &mut CpuPt, va: u64) {
    rig.map(0, va, F, LEAF_4K, DEV_RW);
    pt.map(rig, va, F, LEAF_4K, USER_RW);
}

#[test]
fn system_and_device_memory_never_stand_in_for_each_other() {
    // The device uses the old system frame after the CPU's page moved to
    // VRAM (a missed migration invalidation)...
    let (mut rig, mut pt) = setup(CheckMode::Warn, 64 << 20);
    rig.map(0, VA, F, LEAF_4K, DEV_RW);
    pt.map(&rig, VA, 0, LEAF_4K, device_private(F, true));
    let t = rig.exec(0, cmd::fill(VA, 8, 1));
    assert_eq!(rig.status(t), Status::Ok);
    // ...or a VRAM page after it came back to a frame, even at the same
    // address.
    rig.map(0, VA + LEAF_4K, F, LEAF_4K, DEV_VRAM_RW);
    pt.map(&rig, VA + LEAF_4K, F, LEAF_4K, USER_RW);
    let t = rig.exec(0, cmd::fill(VA + LEAF_4K, 8, 1));
    assert_eq!(rig.status(t), Status::Ok);
    let r = reports(&mut rig);
    assert_eq!(r.len(), 2, "{r:?}");
    assert_eq!(r[0].kind, ViolationKind::DevicePrivate { cpu_vram: F });
    assert!(!r[0].device_vram);
    assert_eq!(r[1].kind, ViolationKind::FrameMismatch { cpu_frame: F });
    assert!(r[1].device_vram);
}

#[test]
fn migration_and_prot_none_entries_name_no_page() {
    let (mut rig, mut pt) = setup(CheckMode::Warn, 64 << 20);
    let migration = CpuDevicePrivate::SWAP | CpuDevicePrivate::MIGRATION;
    let prot_none = device_private(VRAM_PAGE, true) | CpuDevicePrivate::PROT_NONE;
    for (i, cpu) in [migration, prot_none].into_iter().enumerate() {
        let va = VA + i as u64 * LEAF_4K;
        rig.map(0, va, VRAM_PAGE, LEAF_4K, DEV_VRAM_RW);
        pt.map(&rig, va, 0, LEAF_4K, cpu);
        let t = rig.exec(0, cmd::fill(va, 8, 1));
        assert_eq!(rig.status(t), Status::Ok);
    }
    let kinds: Vec<_> = reports(&mut rig).iter().map(|r| r.kind).collect();
    assert_eq!(kinds, [ViolationKind::NotMapped; 2]);
}

#[test]
fn a_2m_vram_leaf_is_checked_against_a_2m_device_private_pde() {
    let (mut rig, mut pt) = setup(CheckMode::Fatal, 64 << 20);
    let chunk = 2 * LEAF_2M;
    rig.map(0, VA, chunk, LEAF_2M, DEV_VRAM_RW);
    pt.map(&rig, VA, 0, LEAF_2M, device_private(chunk, true));
    for off in [0x3000, LEAF_2M - 64] {
        let t = rig.exec(0, cmd::fill(VA + off, 64, 0xab));
        assert_eq!(rig.status(t), Status::Ok, "+{off:#x}");
    }
    assert_eq!(violations(&rig), 0);
    assert_eq!(named(&rig, "check.checked"), 2);
    // The CPU's 2 MiB entry names another chunk: the 4 KiB page inside it.
    pt.map(&rig, VA, 0, LEAF_2M, device_private(2 * chunk, true));
    let t = rig.exec(0, cmd::fill(VA + 0x3000, 64, 1));
    assert_eq!(rig.status(t), Status::CoherenceViolation);
    let r = reports(&mut rig);
    assert_eq!(r.len(), 1);
    assert_eq!(
        r[0].kind,
        ViolationKind::DevicePrivate {
            cpu_vram: 2 * chunk + 0x3000
        }
    );
}
