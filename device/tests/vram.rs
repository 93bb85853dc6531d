//! Device memory (docs/gpu-abi.md "Device memory (VRAM)"): VRAM-aperture
//! leaves in every engine, MIGRATE between apertures, and the error cases:
//! a VRAM address outside VRAM, the aperture bit on a table entry, a
//! device without VRAM, bad lists.

use faultline_abi::isa::{encode, sreg, ADD, EXIT, S2R, SHLI, ST64};
use faultline_abi::{
    atomic_op, regs, Access, Counter, MigrateEntry, Opcode, PhysPage, Pte, Status, LEAF_2M, LEAF_4K,
};
use faultline_device::check::CheckMode;
use faultline_device::mmu::{Mmu, XlateError};
use faultline_device::testing::{cmd, CpuPageTable, Rig, DATA};
use faultline_device::{Config, Counters, DEFAULT_VRAM};
use vm_memory::{GuestAddress, GuestMemoryMmap};

const RW: Pte = Pte::WRITE.union(Pte::ATOMIC);
const VRW: Pte = RW.union(Pte::VRAM);
/// VAs: one range mapped to VRAM, one to system memory.
const VA_VRAM: u64 = 0x1000_0000;
const VA_SYS: u64 = 0x2000_0000;
/// MIGRATE lists live here.
const LIST: u64 = DATA + 0x80_0000;
/// System pages the tests fill (2 MiB aligned).
const SYS: u64 = DATA + 0x40_0000 - DATA % LEAF_2M;

fn rig_with_vram(vram: u64) -> Rig {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
    let cfg = Config {
        vram,
        ..Config::default()
    };
    let mut r = Rig::with_config(mem, 64, cfg);
    assert!(r.enable_channel(0, 0));
    r
}

fn rig() -> Rig {
    rig_with_vram(DEFAULT_VRAM)
}

fn vram_bytes(r: &Rig, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0; len];
    r.dev.vram().read(off, &mut b).unwrap();
    b
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed.wrapping_mul(31) as usize + i * 7 + i / 4096) as u8)
        .collect()
}

fn write_list(r: &Rig, entries: &[MigrateEntry]) {
    for (i, e) in entries.iter().enumerate() {
        r.write_bytes(LIST + i as u64 * 16, &e.to_le_bytes());
    }
}

fn named(r: &Rig, name: &str) -> u64 {
    let all = r.dev.named_counters();
    all.iter()
        .find(|(k, _)| k == name)
        .unwrap_or_else(|| panic!("no counter {name}"))
        .1
}

#[test]
fn the_device_announces_its_vram() {
    let mut r = rig_with_vram(6 << 30);
    assert_eq!(r.r32(regs::VRAM_SIZE_LO), 2 << 30);
    assert_eq!(r.r32(regs::VRAM_SIZE_HI), 1);
    assert_eq!(named(&r, "vram.size"), 6 << 30);
    assert_eq!(named(&r, "vram.touched_bytes"), 0);
    let mut r = rig_with_vram(0);
    assert_eq!(r.r32(regs::VRAM_SIZE_LO), 0);
    assert_eq!(r.r32(regs::FEATURES), 1, "the feature stays: leaves fail");
}

/// FILL into VRAM leaves (4 KiB and 2 MiB), COPY back to system memory:
/// the data went to VRAM, not to the guest frame of the same number.
#[test]
fn fill_into_vram_then_copy_back() {
    let mut r = rig();
    let guest_before = r.read_bytes(0x20_0000, 0x3000);
    r.map_range(0, VA_VRAM, 0x20_0000, 0x3000, LEAF_4K, VRW);
    r.map_range(0, VA_SYS, SYS, 0x3000, LEAF_4K, RW);
    let t = r.exec(
        0,
        cmd::fill(VA_VRAM + 8, 0x3000 - 16, 0x1122_3344_5566_7788),
    );
    assert_eq!(r.status(t), Status::Ok);
    let mut want = vec![0u8; 0x3000];
    for (i, b) in want[8..0x3000 - 8].iter_mut().enumerate() {
        *b = 0x1122_3344_5566_7788u64.to_le_bytes()[i % 8];
    }
    assert_eq!(vram_bytes(&r, 0x20_0000, 0x3000), want);
    assert_eq!(r.read_bytes(0x20_0000, 0x3000), guest_before);
    let t = r.exec(0, cmd::copy(VA_SYS, VA_VRAM, 0x3000));
    assert_eq!(r.status(t), Status::Ok);
    assert_eq!(r.read_bytes(SYS, 0x3000), want);
    assert_eq!(named(&r, "vram.touched_bytes"), LEAF_2M);

    // A 2 MiB VRAM leaf: system → VRAM → system through the COPY engine.
    let (va2, back) = (0x4000_0000, SYS + LEAF_2M);
    r.map(0, va2, 0x60_0000, LEAF_2M, VRW);
    r.map(0, VA_SYS + LEAF_2M, SYS, LEAF_2M, RW);
    r.map(0, VA_SYS + 2 * LEAF_2M, back, LEAF_2M, RW);
    let data = pattern(2, LEAF_2M as usize);
    r.write_bytes(SYS, &data);
    let t = r.exec(0, cmd::copy(va2, VA_SYS + LEAF_2M, LEAF_2M));
    assert_eq!(r.status(t), Status::Ok);
    let t = r.exec(0, cmd::copy(VA_SYS + 2 * LEAF_2M, va2, LEAF_2M));
    assert_eq!(r.status(t), Status::Ok);
    assert_eq!(vram_bytes(&r, 0x60_0000, LEAF_2M as usize), data);
    assert_eq!(r.read_bytes(back, LEAF_2M as usize), data);
}

/// ATOMIC, SEMAPHORE_RELEASE and LAUNCH's stores and atomics reach VRAM.
#[test]
fn atomics_semaphores_and_kernels_use_vram_leaves() {
    let mut r = rig();
    r.map_range(0, VA_VRAM, 0x1000, 0x2000, LEAF_4K, VRW);
    r.dev.vram().write(0x1000, &41u64.to_le_bytes()).unwrap();
    let t = r.exec(0, cmd::atomic(VA_VRAM, atomic_op::ADD, true, 1, 0));
    assert_eq!(r.completion(t), Some(Ok((Status::Ok, 41))));
    assert_eq!(vram_bytes(&r, 0x1000, 8), 42u64.to_le_bytes());
    let t = r.exec(0, cmd::semaphore(VA_VRAM + 8, false, 0xabcd));
    assert_eq!(r.status(t), Status::Ok);
    assert_eq!(vram_bytes(&r, 0x1008, 4), 0xabcdu32.to_le_bytes());
    // Each of 64 threads stores its id at r1 + 8 * id (code in system
    // memory, data in VRAM).
    let code = [
        encode(S2R, 2, 0, 0, sreg::GTID),
        encode(SHLI, 3, 2, 0, 3),
        encode(ADD, 3, 3, 1, 0),
        encode(ST64, 0, 3, 2, 0),
        encode(EXIT, 0, 0, 0, 0),
    ];
    r.map(0, VA_SYS, SYS, LEAF_4K, RW);
    r.write_code(SYS, &code);
    let t = r.exec(
        0,
        cmd::launch(
            VA_SYS,
            code.len() as u32,
            2,
            32,
            [VA_VRAM + 0x1000, 0, 0, 0],
        ),
    );
    assert_eq!(r.status(t), Status::Ok);
    let got = vram_bytes(&r, 0x2000, 64 * 8);
    for i in 0..64u64 {
        assert_eq!(got[i as usize * 8..][..8], i.to_le_bytes(), "thread {i}");
    }
}

/// MIGRATE moves a batch of scattered pages to VRAM and another batch
/// back, 4 KiB and 2 MiB, with the data intact and the counters counting.
#[test]
fn migrate_batches_both_ways() {
    let mut r = rig();
    let n = 8u64;
    let data = pattern(9, (n * LEAF_4K) as usize);
    r.write_bytes(SYS, &data);
    // System page i → VRAM page 3 * i (scattered), then VRAM → other
    // system pages in reverse order.
    let to_vram: Vec<_> = (0..n)
        .map(|i| {
            MigrateEntry::new(
                PhysPage::system(SYS + i * LEAF_4K),
                PhysPage::vram(3 * i * LEAF_4K),
            )
        })
        .collect();
    write_list(&r, &to_vram);
    let t = r.exec(0, cmd::migrate(LIST, n as u32, false));
    assert_eq!(r.completion(t), Some(Ok((Status::Ok, n))));
    for i in 0..n {
        let page = &data[(i * LEAF_4K) as usize..][..LEAF_4K as usize];
        assert_eq!(vram_bytes(&r, 3 * i * LEAF_4K, LEAF_4K as usize), page);
    }
    let back = SYS + LEAF_2M;
    let to_sys: Vec<_> = (0..n)
        .map(|i| {
            MigrateEntry::new(
                PhysPage::vram(3 * i * LEAF_4K),
                PhysPage::system(back + (n - 1 - i) * LEAF_4K),
            )
        })
        .collect();
    write_list(&r, &to_sys);
    let t = r.exec(0, cmd::migrate(LIST, n as u32, false));
    assert_eq!(r.completion(t), Some(Ok((Status::Ok, n))));
    for i in 0..n {
        let page = &data[(i * LEAF_4K) as usize..][..LEAF_4K as usize];
        let at = back + (n - 1 - i) * LEAF_4K;
        assert_eq!(r.read_bytes(at, LEAF_4K as usize), page, "page {i}");
    }

    // Two 2 MiB pages (more than one slice each): system → VRAM → system.
    let big = pattern(5, 2 * LEAF_2M as usize);
    r.write_bytes(SYS, &big);
    write_list(
        &r,
        &[
            MigrateEntry::new(PhysPage::system(SYS), PhysPage::vram(4 * LEAF_2M)),
            MigrateEntry::new(PhysPage::system(SYS + LEAF_2M), PhysPage::vram(LEAF_2M)),
        ],
    );
    let t = r.exec(0, cmd::migrate(LIST, 2, true));
    assert_eq!(r.completion(t), Some(Ok((Status::Ok, 2))));
    let (lo, hi) = big.split_at(LEAF_2M as usize);
    assert_eq!(vram_bytes(&r, 4 * LEAF_2M, LEAF_2M as usize), lo);
    assert_eq!(vram_bytes(&r, LEAF_2M, LEAF_2M as usize), hi);
    // VRAM → VRAM, then back to system.
    write_list(
        &r,
        &[
            MigrateEntry::new(PhysPage::vram(4 * LEAF_2M), PhysPage::vram(7 * LEAF_2M)),
            MigrateEntry::new(
                PhysPage::vram(7 * LEAF_2M),
                PhysPage::system(SYS + 4 * LEAF_2M),
            ),
        ],
    );
    let t = r.exec(0, cmd::migrate(LIST, 2, true));
    assert_eq!(r.status(t), Status::Ok);
    assert_eq!(r.read_bytes(SYS + 4 * LEAF_2M, LEAF_2M as usize), lo);

    let c = r.dev.counters();
    assert_eq!(c.commands(Opcode::Migrate), 4);
    let moved = 2 * n * LEAF_4K + 4 * LEAF_2M;
    assert_eq!(c.get(Counter::BytesMigrated), moved);
    assert_eq!(named(&r, "bytes_migrated"), moved);
    assert_eq!(named(&r, "cmd_migrate"), 4);
}

/// An address outside VRAM fails with BadVram, at the walk (the leaf) or
/// before MIGRATE moves anything; what lies inside is untouched.
#[test]
fn out_of_range_vram_fails_without_access() {
    let mut r = rig_with_vram(2 * LEAF_2M);
    let end = 2 * LEAF_2M;
    // The last page is fine; a FILL running on into the page past VRAM
    // writes the last page, then fails.
    r.map(0, VA_VRAM, end - LEAF_4K, LEAF_4K, VRW);
    r.map(0, VA_VRAM + LEAF_4K, end, LEAF_4K, VRW);
    let t = r.exec(0, cmd::fill(VA_VRAM, 2 * LEAF_4K, u64::MAX));
    assert_eq!(r.status(t), Status::BadVram);
    assert_eq!(vram_bytes(&r, end - LEAF_4K, 8), [0xff; 8]);
    // A 2 MiB leaf that starts inside but ends outside; a 1 GiB leaf.
    r.map(0, 0x4000_0000, end, LEAF_2M, VRW);
    r.map(0, 0x80_0000_0000, 0, 1 << 30, VRW);
    for va in [0x4000_0000, 0x80_0000_0000] {
        let t = r.exec(0, cmd::fill(va, 8, 1));
        assert_eq!(r.status(t), Status::BadVram, "{va:#x}");
    }
    assert_eq!(r.drain_faults(), vec![], "not replayable");

    // MIGRATE: the first entry is valid, the second names a page past
    // VRAM: nothing is copied.
    r.write_bytes(SYS, &[7; 4096]);
    for (bad, status) in [
        (PhysPage::vram(end), Status::BadVram),
        (PhysPage::vram(!0xFFF), Status::BadVram),
        (PhysPage::system(64 << 20), Status::MemoryError),
    ] {
        write_list(
            &r,
            &[
                MigrateEntry::new(PhysPage::system(SYS), PhysPage::vram(0)),
                MigrateEntry::new(PhysPage::system(SYS), bad),
            ],
        );
        let t = r.exec(0, cmd::migrate(LIST, 2, false));
        assert_eq!(r.completion(t), Some(Ok((status, 0))), "{bad:?}");
        assert_eq!(vram_bytes(&r, 0, 8), [0; 8], "{bad:?}");
    }
    assert_eq!(r.dev.counters().get(Counter::BytesMigrated), 0);
}

/// The walker itself refuses a VRAM leaf beyond VRAM (the engines' own
/// bounds check is the second line).
#[test]
fn the_walker_bounds_vram_leaves() {
    let mut r = rig();
    r.map(0, VA_VRAM, DEFAULT_VRAM - LEAF_2M, LEAF_2M, VRW);
    r.map(0, VA_VRAM + LEAF_2M, DEFAULT_VRAM, LEAF_2M, VRW);
    let mut m = Mmu::new();
    m.set_context_table(faultline_device::testing::CTX_TABLE);
    m.set_vram_size(DEFAULT_VRAM);
    let mut c = Counters::default();
    let t = m
        .translate(r.mem(), &mut c, 0, VA_VRAM + 0x1234, Access::Write)
        .unwrap();
    assert_eq!(
        (t.addr, t.vram, t.avail),
        (DEFAULT_VRAM - LEAF_2M + 0x1234, true, LEAF_2M - 0x1234)
    );
    assert_eq!(
        m.translate(r.mem(), &mut c, 0, VA_VRAM + LEAF_2M, Access::Read),
        Err(XlateError::Fail(Status::BadVram))
    );
    // The same page through the TLB (a hit) keeps its aperture.
    let t = m
        .translate(r.mem(), &mut c, 0, VA_VRAM, Access::Read)
        .unwrap();
    assert!(t.vram);
}

/// Page tables live in system memory: the aperture bit on a table entry is
/// a BadPte, at every level.
#[test]
fn the_aperture_bit_on_a_table_entry_is_a_bad_pte() {
    for level in [4, 3, 2] {
        let mut r = rig();
        r.map(0, VA_VRAM, SYS, LEAF_4K, RW);
        let t = r.exec(0, cmd::fill(VA_VRAM, 8, 1));
        assert_eq!(r.status(t), Status::Ok);
        let table = r.read_pte(0, VA_VRAM, level);
        r.write_pte(0, VA_VRAM, level, table | Pte::VRAM.bits());
        r.ctl_ok(faultline_abi::CtlOp::InvalidateAll, 0, 0, 0);
        let t = r.exec(0, cmd::fill(VA_VRAM, 8, 1));
        assert_eq!(r.status(t), Status::BadPte, "level {level}");
    }
}

/// Without VRAM every VRAM leaf and MIGRATE page fails with BadVram.
#[test]
fn a_device_without_vram_fails_vram_accesses() {
    let mut r = rig_with_vram(0);
    r.map(0, VA_VRAM, 0, LEAF_4K, VRW);
    for c in [
        cmd::fill(VA_VRAM, 8, 1),
        cmd::atomic(VA_VRAM, atomic_op::ADD, false, 1, 0),
        cmd::semaphore(VA_VRAM, false, 1),
    ] {
        let t = r.exec(0, c);
        assert_eq!(r.status(t), Status::BadVram);
    }
    write_list(
        &r,
        &[MigrateEntry::new(PhysPage::system(SYS), PhysPage::vram(0))],
    );
    let t = r.exec(0, cmd::migrate(LIST, 1, false));
    assert_eq!(r.status(t), Status::BadVram);
    assert_eq!(named(&r, "vram.touched_bytes"), 0);
}

/// A list outside RAM, reserved bits, a misaligned page or list, the same
/// page as source and destination: each its documented status, nothing
/// copied.
#[test]
fn bad_lists_fail_with_their_status() {
    let mut r = rig();
    let ok = MigrateEntry::new(PhysPage::system(SYS), PhysPage::vram(0));
    let e = |src, dst| MigrateEntry { src, dst };
    for (list, count, large, entries, status) in [
        ((64 << 20) - 16, 2, false, vec![], Status::BadList),
        (!15, 1, false, vec![], Status::BadList),
        (
            LIST,
            2,
            false,
            vec![ok, e(SYS | 0x10, 0x1001)],
            Status::BadList,
        ),
        (LIST, 1, false, vec![e(SYS, SYS)], Status::BadList),
        (
            LIST,
            2,
            true,
            vec![ok, e(SYS + LEAF_4K, 1)],
            Status::Misaligned,
        ),
        (LIST, 1, true, vec![e(SYS, LEAF_4K | 1)], Status::Misaligned),
        (LIST + 8, 1, false, vec![], Status::Misaligned),
        (LIST, 0, false, vec![], Status::InvalidCommand),
    ] {
        write_list(&r, &entries);
        let t = r.exec(0, cmd::migrate(list, count, large));
        assert_eq!(r.status(t), status, "{list:#x} {entries:?}");
    }
    assert_eq!(r.dev.counters().get(Counter::BytesMigrated), 0);
    assert_eq!(named(&r, "vram.touched_bytes"), 0);
}

/// The checker judges VRAM translations too: a VRAM leaf the CPU's table
/// names no device-private entry for is a violation (device/tests/check.rs
/// has the cases where it does).
#[test]
fn the_checker_judges_vram_translations() {
    let mut r = rig();
    r.dev.set_checker(CheckMode::Fatal, None);
    let pt = CpuPageTable::new(&r, 0x80_0000, 0xC0_0000);
    pt.attach(&r, 0);
    r.map_range(0, VA_VRAM, 0, 0x2000, LEAF_4K, VRW);
    let t = r.exec(0, cmd::fill(VA_VRAM, 0x2000, 3));
    assert_eq!(r.status(t), Status::CoherenceViolation);
    let c = r.dev.counters();
    assert_eq!(c.get(Counter::CoherenceViolations), 1);
    assert_eq!((c.check.checked, c.check.unchecked), (1, 0));
    let v = r.dev.take_coherence_reports();
    assert!(v[0].device_vram, "{}", v[0]);
}
