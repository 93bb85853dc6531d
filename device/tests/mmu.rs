//! Walker and TLB tests.

use faultline_abi::{
    Access, ContextEntry, Counter, CtlOp, FaultReason, Pte, Status, LEAF_1G, LEAF_2M, LEAF_4K,
    PTE_ADDR_MASK,
};
use faultline_device::counters::Counters;
use faultline_device::mmu::{Mmu, Translation, XlateError, TLB_CAPACITY};
use faultline_device::testing::{cmd, context_entry, Rig, CTX_TABLE, DATA};

fn mmu() -> (Mmu, Counters) {
    let mut m = Mmu::new();
    m.set_context_table(CTX_TABLE);
    (m, Counters::default())
}

fn xl(
    rig: &Rig,
    m: &mut Mmu,
    c: &mut Counters,
    va: u64,
    a: Access,
) -> Result<Translation, XlateError> {
    m.translate(rig.mem(), c, 0, va, a)
}

#[test]
fn every_leaf_size_translates_with_offset() {
    // 2 GiB of guest RAM so a 1 GiB leaf fits at GPA 1 GiB.
    let mut rig = Rig::new(2 << 30, 16);
    rig.map(0, 0x1000, DATA, LEAF_4K, Pte::empty());
    rig.map(
        0,
        0x4000_0000 + LEAF_2M * 3,
        LEAF_2M * 5,
        LEAF_2M,
        Pte::empty(),
    );
    rig.map(0, 0x80_0000_0000, LEAF_1G, LEAF_1G, Pte::empty());
    let (mut m, mut c) = mmu();
    let t = xl(&rig, &mut m, &mut c, 0x1234, Access::Read).unwrap();
    assert_eq!(
        t,
        Translation {
            gpa: DATA + 0x234,
            avail: 0x1000 - 0x234
        }
    );
    let t = xl(
        &rig,
        &mut m,
        &mut c,
        0x4000_0000 + LEAF_2M * 3 + 0x12345,
        Access::Read,
    )
    .unwrap();
    assert_eq!(t.gpa, LEAF_2M * 5 + 0x12345);
    assert_eq!(t.avail, LEAF_2M - 0x12345);
    let t = xl(
        &rig,
        &mut m,
        &mut c,
        0x80_0000_0000 + 0x3456_789A,
        Access::Read,
    )
    .unwrap();
    assert_eq!(t.gpa, LEAF_1G + 0x3456_789A);
    assert_eq!(t.avail, LEAF_1G - 0x3456_789A);
    assert_eq!(c.get(Counter::Walks), 3);
    // Warm: hits, no more walks.
    xl(&rig, &mut m, &mut c, 0x80_0000_0000 + 8, Access::Read).unwrap();
    xl(&rig, &mut m, &mut c, 0x1008, Access::Read).unwrap();
    assert_eq!(c.get(Counter::Walks), 3);
    assert_eq!(c.get(Counter::TlbHits), 2);
}

#[test]
fn every_permission_combination() {
    let mut rig = Rig::new(16 << 20, 16);
    let combos = [
        Pte::empty(),
        Pte::WRITE,
        Pte::ATOMIC,
        Pte::WRITE | Pte::ATOMIC,
    ];
    for (i, f) in combos.iter().enumerate() {
        rig.map(0, 0x10000 * (i as u64 + 1), DATA, LEAF_4K, *f);
    }
    let (mut m, mut c) = mmu();
    for (i, f) in combos.iter().enumerate() {
        let va = 0x10000 * (i as u64 + 1);
        assert!(xl(&rig, &mut m, &mut c, va, Access::Read).is_ok());
        let w = xl(&rig, &mut m, &mut c, va, Access::Write);
        if f.contains(Pte::WRITE) {
            assert!(w.is_ok());
        } else {
            assert_eq!(
                w,
                Err(XlateError::Fault {
                    va,
                    reason: FaultReason::WriteProtect
                })
            );
        }
        let a = xl(&rig, &mut m, &mut c, va, Access::Atomic);
        match (f.contains(Pte::WRITE), f.contains(Pte::ATOMIC)) {
            (true, true) => assert!(a.is_ok()),
            (false, _) => assert_eq!(
                a,
                Err(XlateError::Fault {
                    va,
                    reason: FaultReason::WriteProtect
                })
            ),
            (true, false) => assert_eq!(
                a,
                Err(XlateError::Fault {
                    va,
                    reason: FaultReason::AtomicProtect
                })
            ),
        }
    }
    // Not present.
    assert_eq!(
        xl(&rig, &mut m, &mut c, 0x9000_0000, Access::Read),
        Err(XlateError::Fault {
            va: 0x9000_0000,
            reason: FaultReason::NotPresent
        })
    );
}

#[test]
fn non_canonical_and_out_of_ram() {
    let mut rig = Rig::new(16 << 20, 16);
    let (mut m, mut c) = mmu();
    for va in [1u64 << 48, u64::MAX, 0xFFFF_8000_0000_0000] {
        assert_eq!(
            xl(&rig, &mut m, &mut c, va, Access::Read),
            Err(XlateError::Fail(Status::BadAddress))
        );
    }
    // Leaf outside RAM: translation succeeds (the address is what the PTE
    // says) but the access fails with MemoryError.
    rig.map(0, 0x5000, 0x40_0000_0000, LEAF_4K, Pte::WRITE);
    // Intermediate table outside RAM.
    rig.write_pte(0, 0x8000_0000, 2, 0x50_0000_0000 | 1);
    let e = xl(&rig, &mut m, &mut c, 0x8000_0000, Access::Read);
    assert_eq!(e, Err(XlateError::Fail(Status::MemoryError)));
    assert!(rig.enable_channel(0, 0));
    let t = rig.exec(0, cmd::fill(0x5000, 16, 1));
    assert_eq!(rig.status(t), Status::MemoryError);
    // Context table entry not valid.
    rig.write_u32(context_entry(1) + ContextEntry::FLAGS_OFFSET as u64, 0);
    assert_eq!(
        m.translate(rig.mem(), &mut c, 1, 0, Access::Read),
        Err(XlateError::Fail(Status::InvalidContext))
    );
    assert_eq!(
        m.translate(rig.mem(), &mut c, 999, 0, Access::Read),
        Err(XlateError::Fail(Status::InvalidContext))
    );
}

#[test]
fn bad_ptes_fail_without_fault() {
    let mut rig = Rig::new(16 << 20, 16);
    let (mut m, mut c) = mmu();
    // Reserved bit in a leaf.
    rig.write_pte(0, 0x1000, 1, DATA | 1 | 0x8);
    // LEAF at level 4.
    rig.write_pte(0, 0x100_0000_0000, 4, 1 | Pte::LEAF.bits());
    // Misaligned 2 MiB leaf.
    rig.write_pte(0, 0x4000_0000, 2, (DATA + 0x1000) | 1 | Pte::LEAF.bits());
    for va in [0x1000, 0x100_0000_0000, 0x4000_0000] {
        assert_eq!(
            xl(&rig, &mut m, &mut c, va, Access::Read),
            Err(XlateError::Fail(Status::BadPte)),
            "{va:#x}"
        );
    }
    // Software bits are ignored.
    rig.write_pte(0, 0x2000, 1, DATA | 1 | 0xF00 | (0xFFF << 52));
    assert_eq!(
        xl(&rig, &mut m, &mut c, 0x2000, Access::Read).unwrap().gpa,
        DATA
    );
}

#[test]
fn self_referencing_tables_terminate() {
    let rig = Rig::new(16 << 20, 16);
    let root = rig.root(0);
    // Every root entry points at the root itself: the walk must end after
    // four levels, interpreting the root as a leaf table.
    let entries: Vec<u8> = (0..512).flat_map(|_| (root | 1).to_le_bytes()).collect();
    rig.write_bytes(root, &entries);
    let (mut m, mut c) = mmu();
    let t = xl(&rig, &mut m, &mut c, 0x1234_5678_9000, Access::Read).unwrap();
    assert_eq!(t.gpa & PTE_ADDR_MASK, root);
    assert_eq!(c.get(Counter::Walks), 1);
}

#[test]
fn tlb_is_bounded_and_counts_evictions() {
    let mut rig = Rig::new(64 << 20, 16);
    let n = TLB_CAPACITY as u64 + 300;
    rig.map_range(0, 0, DATA, n * LEAF_4K, LEAF_4K, Pte::WRITE);
    let (mut m, mut c) = mmu();
    for i in 0..n {
        xl(&rig, &mut m, &mut c, i * LEAF_4K, Access::Read).unwrap();
    }
    assert!(m.tlb_len(0) <= TLB_CAPACITY);
    assert_eq!(c.get(Counter::TlbEvictions), 300);
    assert_eq!(c.get(Counter::TlbMisses), n);
}

/// After an acknowledged invalidation no access uses the old translation.
#[test]
fn stale_translation_never_used_after_invalidate_ack() {
    let mut rig = Rig::new(64 << 20, 16);
    assert!(rig.enable_channel(0, 0));
    let (old, new) = (DATA, DATA + 0x10000);
    rig.write_u64(old, 0x01D);
    rig.write_u64(new, 0x2E2);
    rig.map(0, 0x7000, old, LEAF_4K, Pte::WRITE);
    rig.map(0, 0x9000, DATA + 0x20000, LEAF_4K, Pte::WRITE);
    let t = rig.exec(0, cmd::copy(0x9000, 0x7000, 8));
    assert_eq!(rig.status(t), Status::Ok);
    assert_eq!(rig.read_u64(DATA + 0x20000), 0x01D);
    // Remap without invalidating: the TLB still holds the old frame (this
    // is what makes the invalidation necessary).
    rig.map(0, 0x7000, new, LEAF_4K, Pte::WRITE);
    rig.exec(0, cmd::copy(0x9000, 0x7000, 8));
    assert_eq!(
        rig.read_u64(DATA + 0x20000),
        0x01D,
        "TLB caches translations"
    );
    // Range invalidation, acknowledged through ctl_cons.
    assert!(rig.ctl_ok(CtlOp::InvalidateRange, 0, 0x7000, 0x1000));
    rig.exec(0, cmd::copy(0x9000, 0x7000, 8));
    assert_eq!(rig.read_u64(DATA + 0x20000), 0x2E2);
    // Unmap + context invalidation: the next access faults.
    rig.unmap(0, 0x7000, LEAF_4K);
    assert!(rig.ctl_ok(CtlOp::InvalidateContext, 0, 0, 0));
    let t = rig.exec(0, cmd::copy(0x9000, 0x7000, 8));
    assert_eq!(rig.completion(t), None, "stalled on a fault");
    let f = rig.drain_faults();
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].va, 0x7000);
    // Map a 2 MiB leaf elsewhere, use it, then INVALIDATE_ALL.
    rig.map(0, 0x7000, old, LEAF_4K, Pte::WRITE);
    rig.replay();
    assert_eq!(rig.status(t), Status::Ok);
    rig.map(0, 0x7000, new, LEAF_4K, Pte::WRITE);
    assert!(rig.ctl_ok(CtlOp::InvalidateAll, 0, 0, 0));
    rig.write_u64(DATA + 0x20000, 0);
    rig.exec(0, cmd::copy(0x9000, 0x7000, 8));
    assert_eq!(rig.read_u64(DATA + 0x20000), 0x2E2);
    assert_eq!(rig.dev.counters().get(Counter::Invalidations), 3);
}

#[test]
fn range_invalidation_hits_large_leaves_and_spares_others() {
    let mut rig = Rig::new(64 << 20, 16);
    rig.map(0, 0, 0, LEAF_2M, Pte::WRITE);
    rig.map(0, LEAF_2M * 4, DATA, LEAF_4K, Pte::WRITE);
    let (mut m, mut c) = mmu();
    xl(&rig, &mut m, &mut c, 0x1000, Access::Read).unwrap();
    xl(&rig, &mut m, &mut c, LEAF_2M * 4, Access::Read).unwrap();
    // Invalidate a 4 KiB range inside the 2 MiB leaf: the whole leaf goes.
    m.invalidate_range(0, 0x3000, 0x4000);
    assert_eq!(m.tlb_len(0), 1);
    let walks = c.get(Counter::Walks);
    xl(&rig, &mut m, &mut c, LEAF_2M * 4 + 8, Access::Read).unwrap();
    assert_eq!(c.get(Counter::Walks), walks, "untouched entry still cached");
    xl(&rig, &mut m, &mut c, 0x10, Access::Read).unwrap();
    assert_eq!(c.get(Counter::Walks), walks + 1);
}

#[test]
fn permission_upgrade_needs_no_invalidation() {
    let mut rig = Rig::new(16 << 20, 16);
    rig.map(0, 0x1000, DATA, LEAF_4K, Pte::empty());
    let (mut m, mut c) = mmu();
    assert!(xl(&rig, &mut m, &mut c, 0x1000, Access::Write).is_err());
    rig.map(0, 0x1000, DATA, LEAF_4K, Pte::WRITE);
    assert!(xl(&rig, &mut m, &mut c, 0x1000, Access::Write).is_ok());
    assert!(xl(&rig, &mut m, &mut c, 0x1000, Access::Write).is_ok());
}

#[test]
fn control_ring_rejects_bad_entries() {
    let mut rig = Rig::new(16 << 20, 16);
    assert_eq!(rig.ctl(99u32, 0, 0, 0), (2, true));
    assert_eq!(rig.ctl(CtlOp::InvalidateContext, 64, 0, 0), (3, true));
    assert_eq!(rig.ctl(CtlOp::InvalidateRange, 0, 0, 0), (4, true));
    assert_eq!(rig.ctl(CtlOp::InvalidateRange, 0, u64::MAX, 2), (4, true));
    assert_eq!(rig.ctl(CtlOp::CancelRange, 0, 1 << 48, 0), (4, true));
    assert!(rig.ctl_ok(CtlOp::InvalidateAll, 0, 0, 0));
}

#[test]
fn contexts_are_isolated() {
    let mut rig = Rig::new(64 << 20, 16);
    rig.new_context(1);
    rig.map(0, 0x7000, DATA, LEAF_4K, Pte::WRITE);
    rig.map(1, 0x7000, DATA + 0x1000, LEAF_4K, Pte::empty());
    let (mut m, mut c) = mmu();
    assert_eq!(
        m.translate(rig.mem(), &mut c, 0, 0x7008, Access::Read)
            .unwrap()
            .gpa,
        DATA + 8
    );
    assert_eq!(
        m.translate(rig.mem(), &mut c, 1, 0x7008, Access::Read)
            .unwrap()
            .gpa,
        DATA + 0x1008
    );
    assert!(m
        .translate(rig.mem(), &mut c, 1, 0x7000, Access::Write)
        .is_err());
    // Invalidating context 1 leaves context 0 cached.
    rig.unmap(0, 0x7000, LEAF_4K);
    rig.unmap(1, 0x7000, LEAF_4K);
    m.invalidate_context(1);
    assert!(
        m.translate(rig.mem(), &mut c, 0, 0x7000, Access::Read)
            .is_ok(),
        "ctx 0 still cached"
    );
    assert!(matches!(
        m.translate(rig.mem(), &mut c, 1, 0x7000, Access::Read),
        Err(XlateError::Fault {
            reason: FaultReason::NotPresent,
            ..
        })
    ));
    m.invalidate_all();
    assert!(m
        .translate(rig.mem(), &mut c, 0, 0x7000, Access::Read)
        .is_err());
}
