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
            addr: DATA + 0x234,
            avail: 0x1000 - 0x234,
            vram: false,
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
    assert_eq!(t.addr, LEAF_2M * 5 + 0x12345);
    assert_eq!(t.avail, LEAF_2M - 0x12345);
    let t = xl(
        &rig,
        &mut m,
        &mut c,
        0x80_0000_0000 + 0x3456_789A,
        Access::Read,
    )
    .unwrap();
    assert_eq!(t.addr, LEAF_1G + 0x3456_789A);
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
    rig.write_pte(0, 0x1000, 1, DATA | 1 | 0x10);
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
        xl(&rig, &mut m, &mut c, 0x2000, Access::Read).unwrap().addr,
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
    assert_eq!(t.addr & PTE_ADDR_MASK, root);
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
    // A walk caches the valid leaves of its 64-byte line: one miss per 8
    // pages.
    assert_eq!(c.get(Counter::TlbMisses), n.div_ceil(8));
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
            .addr,
        DATA + 8
    );
    assert_eq!(
        m.translate(rig.mem(), &mut c, 1, 0x7008, Access::Read)
            .unwrap()
            .addr,
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

/// How a test drops what the MMU caches about context 0.
#[derive(Debug, Clone, Copy)]
enum Drop0 {
    /// INVALIDATE_RANGE of one page inside the changed entry's 2 MiB.
    RangeInside,
    /// INVALIDATE_RANGE of the next 2 MiB block: does not cover it.
    RangeOutside,
    Context,
    All,
    ContextTable,
}

/// Base of the 2 MiB block whose level-2 entry the walk-cache tests swap.
const BLOCK: u64 = 0x40_4000_0000;

/// Pages of `BLOCK` the walk-cache tests use are this far apart: their
/// entries lie in different 64-byte lines of the level-1 table, so the
/// device's prefetch of a line's neighbours does not cache one with another.
const STRIDE: u64 = 8 * LEAF_4K;

/// A level-1 table at `t` mapping `BLOCK + k * STRIDE` (k = 0, 1, 2) to
/// `frames[k]`.
fn l1_table(rig: &Rig, t: u64, frames: [u64; 3]) {
    rig.write_bytes(t, &[0u8; 4096]);
    for (k, f) in frames.into_iter().enumerate() {
        let slot = k as u64 * STRIDE / LEAF_4K * 8;
        rig.write_u64(t + slot, Pte::leaf(f, 1, Pte::WRITE).bits());
    }
}

fn gpa_of(rig: &Rig, m: &mut Mmu, c: &mut Counters, va: u64) -> u64 {
    xl(rig, m, c, va, Access::Read)
        .unwrap_or_else(|e| panic!("{va:#x}: {e}"))
        .addr
}

/// docs/gpu-abi.md "TLB and invalidation": the device caches the tables
/// upper-level entries point to, so after the guest points a level-2 entry
/// at another table the device may go on using the old one (for pages not
/// in the TLB too), until an invalidation covering part of the entry's
/// 2 MiB, of the context or of everything; then it walks the new table.
#[test]
fn upper_level_change_is_seen_after_the_documented_invalidation() {
    let (t1, t2) = (DATA + 0x10_0000, DATA + 0x20_0000);
    let old = [DATA, DATA + 0x1000, DATA + 0x2000];
    let new = [DATA, DATA + 0x5000, DATA + 0x6000];
    for how in [
        Drop0::RangeInside,
        Drop0::RangeOutside,
        Drop0::Context,
        Drop0::All,
        Drop0::ContextTable,
    ] {
        let mut rig = Rig::new(64 << 20, 16);
        l1_table(&rig, t1, old);
        rig.write_pte(0, BLOCK, 2, Pte::table(t1).bits());
        let (mut m, mut c) = mmu();
        assert_eq!(gpa_of(&rig, &mut m, &mut c, BLOCK), old[0]);
        assert!(m.walk_cache_len(0) >= 1, "{how:?}: tables cached");
        // The guest relinks the block to t2 (t1 stays intact, as the
        // driver keeps unlinked tables until the page table is dropped).
        l1_table(&rig, t2, new);
        rig.write_pte(0, BLOCK, 2, Pte::table(t2).bits());
        let walks = c.get(Counter::Walks);
        assert_eq!(
            gpa_of(&rig, &mut m, &mut c, BLOCK + STRIDE),
            old[1],
            "{how:?}: a TLB miss walks the cached old table"
        );
        assert_eq!(c.get(Counter::Walks), walks + 1, "{how:?}: it was a miss");
        match how {
            Drop0::RangeInside => m.invalidate_range(0, BLOCK + 0x1F_F000, BLOCK + LEAF_2M),
            Drop0::RangeOutside => m.invalidate_range(0, BLOCK + LEAF_2M, BLOCK + LEAF_2M + 1),
            Drop0::Context => m.invalidate_context(0),
            Drop0::All => m.invalidate_all(),
            Drop0::ContextTable => m.set_context_table(CTX_TABLE),
        }
        let want = match how {
            Drop0::RangeOutside => old[2],
            _ => new[2],
        };
        assert_eq!(
            gpa_of(&rig, &mut m, &mut c, BLOCK + 2 * STRIDE),
            want,
            "{how:?}: page 2 after the invalidation"
        );
    }
}

/// The same through the control ring: once `ctl_cons` passed an
/// INVALIDATE_RANGE of one page of the block, a COPY reads through the new
/// table.
#[test]
fn walk_cache_never_outlives_an_acknowledged_range_invalidate() {
    let mut rig = Rig::new(64 << 20, 16);
    assert!(rig.enable_channel(0, 0));
    let (t1, t2) = (DATA + 0x10_0000, DATA + 0x20_0000);
    let old = [DATA, DATA + 0x1000, DATA + 0x2000];
    let new = [DATA, DATA + 0x3000, DATA + 0x4000];
    l1_table(&rig, t1, old);
    l1_table(&rig, t2, new);
    for (i, (o, n)) in old.iter().zip(new).enumerate().skip(1) {
        rig.write_u64(*o, 0x100 + i as u64);
        rig.write_u64(n, 0x200 + i as u64);
    }
    rig.write_pte(0, BLOCK, 2, Pte::table(t1).bits());
    let out = DATA + 0x8000;
    rig.map(0, 0x9000, out, LEAF_4K, Pte::WRITE);
    let copy = |rig: &mut Rig, page: u64| {
        let t = rig.exec(0, cmd::copy(0x9000, BLOCK + page * STRIDE, 8));
        assert_eq!(rig.status(t), Status::Ok);
        rig.read_u64(out)
    };
    // Page 0 only: the block's table is cached, pages 1 and 2 are not in
    // the TLB.
    copy(&mut rig, 0);
    rig.write_pte(0, BLOCK, 2, Pte::table(t2).bits());
    assert_eq!(copy(&mut rig, 1), 0x101, "read through the cached table");
    assert!(rig.ctl_ok(CtlOp::InvalidateRange, 0, BLOCK, 0x1000));
    assert_eq!(copy(&mut rig, 2), 0x202, "read through the new table");
}

/// A cached table that no longer leads to a leaf never makes a fault: the
/// walk is redone from the context entry (here the guest replaced the
/// table by a 2 MiB leaf without invalidating, as a driver may when the
/// table held no valid leaf for the page).
#[test]
fn stale_cached_table_never_faults_what_the_tables_map() {
    let mut rig = Rig::new(64 << 20, 16);
    let t1 = DATA + 0x10_0000;
    l1_table(&rig, t1, [DATA, DATA + 0x1000, DATA + 0x2000]);
    rig.write_pte(0, BLOCK, 2, Pte::table(t1).bits());
    let (mut m, mut c) = mmu();
    assert_eq!(gpa_of(&rig, &mut m, &mut c, BLOCK), DATA);
    rig.write_pte(0, BLOCK, 2, Pte::leaf(LEAF_2M * 8, 2, Pte::WRITE).bits());
    // Page 3 is not in t1.
    assert_eq!(
        gpa_of(&rig, &mut m, &mut c, BLOCK + 0x3008),
        LEAF_2M * 8 + 0x3008
    );
    // And a fault that the tables as they are now give is still a fault.
    rig.write_pte(0, BLOCK + LEAF_2M, 2, Pte::table(t1).bits());
    assert_eq!(gpa_of(&rig, &mut m, &mut c, BLOCK + LEAF_2M), DATA);
    rig.write_pte(0, BLOCK + LEAF_2M, 2, 0);
    assert!(matches!(
        xl(&rig, &mut m, &mut c, BLOCK + LEAF_2M + 0x3000, Access::Read),
        Err(XlateError::Fault {
            reason: FaultReason::NotPresent,
            ..
        })
    ));
}

/// The walk cache holds at most 256 tables and the root per context,
/// however many blocks are walked, and stays correct when it evicts.
#[test]
fn walk_cache_is_bounded() {
    let mut rig = Rig::new(64 << 20, 16);
    let t1 = DATA + 0x10_0000;
    l1_table(&rig, t1, [DATA, DATA + 0x1000, DATA + 0x2000]);
    let blocks = 2000u64;
    for i in 0..blocks {
        rig.write_pte(0, i * LEAF_2M, 2, Pte::table(t1).bits());
    }
    let (mut m, mut c) = mmu();
    for round in 0..2 {
        for i in 0..blocks {
            let va = i * LEAF_2M + STRIDE * (i % 3);
            let want = DATA + 0x1000 * (i % 3);
            assert_eq!(gpa_of(&rig, &mut m, &mut c, va), want, "{round} {i}");
            assert!(m.walk_cache_len(0) <= 257);
        }
    }
    assert!(m.walk_cache_len(0) > 100, "the cache was used");
}

/// Each kind of leaf is bounded by the capacity: 4 KiB ones in 2-way sets
/// (a power of two of them, at most capacity / 2), large ones FIFO; every
/// translation stays right across evictions.
#[test]
fn both_kinds_of_leaf_are_bounded_by_the_capacity() {
    for cap in [1usize, 2, 5, 16] {
        let mut rig = Rig::new(64 << 20, 16);
        let n = 40u64;
        // Every 9th page: one per 64-byte line of the level-1 table (no
        // prefetched neighbours), spread over all sets.
        let page = |i: u64| 9 * i * LEAF_4K;
        for i in 0..n {
            rig.map(0, page(i), DATA + i * LEAF_4K, LEAF_4K, Pte::WRITE);
            rig.map(0, LEAF_1G + i * LEAF_2M, 0, LEAF_2M, Pte::WRITE);
        }
        let mut m = Mmu::with_tlb_capacity(cap);
        m.set_context_table(CTX_TABLE);
        let mut c = Counters::default();
        for round in 0..2 {
            for i in 0..n {
                let va = page(i) + 8;
                assert_eq!(
                    gpa_of(&rig, &mut m, &mut c, va),
                    DATA + i * LEAF_4K + 8,
                    "{cap} {round}"
                );
                assert_eq!(gpa_of(&rig, &mut m, &mut c, LEAF_1G + i * LEAF_2M + 8), 8);
                assert!(m.tlb_len(0) <= 2 * cap, "cap {cap}: {}", m.tlb_len(0));
            }
        }
        // 4 KiB entries: sets * 2 ways (one way when the capacity is 1).
        let pages = if cap == 1 { 1 } else { 2 << (cap / 2).ilog2() };
        assert_eq!(m.tlb_len(0), pages + cap, "cap {cap}: full of both kinds");
        // Both rounds miss on every access (cyclic over more than fits):
        // every insert but the ones that filled the TLB evicts.
        assert_eq!(
            c.get(Counter::TlbEvictions),
            4 * n - (pages + cap) as u64,
            "cap {cap}"
        );
    }
}

/// A range invalidation drops a large leaf from the most-recently-used
/// copies too, while other large leaves stay cached.
#[test]
fn range_invalidation_drops_recent_large_leaves() {
    let mut rig = Rig::new(64 << 20, 16);
    rig.map(0, 0, LEAF_2M, LEAF_2M, Pte::WRITE);
    rig.map(0, LEAF_2M, 2 * LEAF_2M, LEAF_2M, Pte::WRITE);
    let (mut m, mut c) = mmu();
    assert_eq!(gpa_of(&rig, &mut m, &mut c, 0x10), LEAF_2M + 0x10);
    assert_eq!(gpa_of(&rig, &mut m, &mut c, LEAF_2M), 2 * LEAF_2M);
    rig.map(0, 0, 3 * LEAF_2M, LEAF_2M, Pte::WRITE);
    m.invalidate_range(0, 0x1000, 0x2000);
    assert_eq!(gpa_of(&rig, &mut m, &mut c, 0x10), 3 * LEAF_2M + 0x10);
    let walks = c.get(Counter::Walks);
    assert_eq!(gpa_of(&rig, &mut m, &mut c, LEAF_2M + 8), 2 * LEAF_2M + 8);
    assert_eq!(c.get(Counter::Walks), walks, "the other leaf stayed cached");
}

/// A walk to a 4 KiB leaf caches the valid leaves of its 64-byte line
/// (docs/gpu-abi.md): their first use is a hit; a not-present neighbour is
/// not cached (it faults, then maps without an invalidation); and an
/// invalidation drops a prefetched leaf like any other.
#[test]
fn walks_prefetch_the_leaves_of_their_line() {
    let mut rig = Rig::new(64 << 20, 16);
    for p in [0u64, 1, 2, 3, 5, 6, 7, 8] {
        rig.map(0, p * LEAF_4K, DATA + p * LEAF_4K, LEAF_4K, Pte::WRITE);
    }
    let (mut m, mut c) = mmu();
    assert_eq!(
        gpa_of(&rig, &mut m, &mut c, 2 * LEAF_4K),
        DATA + 2 * LEAF_4K
    );
    assert_eq!(c.get(Counter::Walks), 1);
    for p in [0u64, 1, 3, 5, 6, 7] {
        assert_eq!(
            gpa_of(&rig, &mut m, &mut c, p * LEAF_4K + 8),
            DATA + p * LEAF_4K + 8
        );
    }
    assert_eq!(c.get(Counter::Walks), 1, "the line's leaves were cached");
    // Page 8 is in the next line.
    gpa_of(&rig, &mut m, &mut c, 8 * LEAF_4K);
    assert_eq!(c.get(Counter::Walks), 2);
    // Page 4 was not present when the line was read.
    assert!(xl(&rig, &mut m, &mut c, 4 * LEAF_4K, Access::Read).is_err());
    rig.map(0, 4 * LEAF_4K, DATA + 0x20_0000, LEAF_4K, Pte::WRITE);
    assert_eq!(gpa_of(&rig, &mut m, &mut c, 4 * LEAF_4K), DATA + 0x20_0000);
    // Page 6, prefetched, remapped: stale until invalidated, then new.
    rig.map(0, 6 * LEAF_4K, DATA + 0x30_0000, LEAF_4K, Pte::WRITE);
    assert_eq!(
        gpa_of(&rig, &mut m, &mut c, 6 * LEAF_4K),
        DATA + 6 * LEAF_4K
    );
    m.invalidate_range(0, 6 * LEAF_4K, 7 * LEAF_4K);
    assert_eq!(gpa_of(&rig, &mut m, &mut c, 6 * LEAF_4K), DATA + 0x30_0000);
}
