//! VRAM eviction in the host loopback (`gpu::DeviceMemory`, docs/hmm.md
//! "Eviction"), where chunks are cheap: the LRU order over several chunks,
//! the rule that a migration never evicts what it filled itself, pages of
//! another process evicted (and an exited one's freed, not evicted), and
//! an injected allocation failure. The shared suite's `evict_oversubscribe`
//! and `vram_alloc_fail` run the same paths in every host.

mod common;

use std::sync::Arc;

use common::env::LoopEnv;
use common::loopback::Loopback;
use faultline_abi::Command;
use faultline_driver::gpu::suite::SvmEnv;
use faultline_driver::gpu::vram::{CHUNK_BYTES, CHUNK_PAGES};
use faultline_driver::gpu::{Channel, DeviceMemory, GpuConfig, SvmConfig, SvmContext, VramFailure};
use faultline_driver::mm::{PageState, VmFlags, PAGE_SIZE as PG};
use faultline_driver::sim::SimMm;

const RW: VmFlags = VmFlags::READ.union(VmFlags::WRITE);
const A: u64 = 0x20_0000_0000;

struct Proc {
    mm: Arc<SimMm>,
    svm: SvmContext<Loopback, SimMm>,
    chan: Channel<Loopback>,
}

/// A process with `chunks` chunks of anonymous memory at `A`, each page
/// filled with `seed`-based data, served by `dmem`.
fn process(env: &LoopEnv, dmem: &DeviceMemory<Loopback>, chunks: u64, seed: u8) -> Proc {
    let mm = env.spawn().unwrap();
    mm.mmap(A, chunks * CHUNK_BYTES, RW).unwrap();
    mm.write(A, &data(chunks, seed)).unwrap();
    let svm = SvmContext::new(&env.gpu, &mm, SvmConfig::default()).unwrap();
    let chan = Channel::open(svm.context()).unwrap();
    dmem.attach(&svm).unwrap();
    Proc { mm, svm, chan }
}

fn data(chunks: u64, seed: u8) -> Vec<u8> {
    (0..chunks * CHUNK_BYTES)
        .map(|i| (i / PG) as u8 ^ (i as u8).wrapping_mul(3) ^ seed)
        .collect()
}

fn chunk(i: u64) -> (u64, u64) {
    (A + i * CHUNK_BYTES, A + (i + 1) * CHUNK_BYTES)
}

fn in_vram(p: &Proc, i: u64, dmem: &DeviceMemory<Loopback>) -> bool {
    let (a, b) = chunk(i);
    (a..b).step_by(PG as usize).all(|va| {
        matches!(p.mm.cpu_state(va), PageState::DevicePrivate { owner, .. } if owner == dmem.owner())
    })
}

fn in_system(p: &Proc, i: u64) -> bool {
    let (a, b) = chunk(i);
    (a..b)
        .step_by(PG as usize)
        .all(|va| matches!(p.mm.cpu_state(va), PageState::Present { .. }))
}

fn migrate(p: &Proc, dmem: &DeviceMemory<Loopback>, i: u64) -> u64 {
    let (a, b) = chunk(i);
    dmem.migrate_to_device(&p.svm, a, b).unwrap()
}

/// The CPU reads everything back (faulting VRAM pages home): the data.
fn check(p: &Proc, chunks: u64, seed: u8) {
    let mut b = vec![0u8; (chunks * CHUNK_BYTES) as usize];
    p.mm.read(A, &mut b).unwrap();
    assert!(b == data(chunks, seed), "data differs");
}

fn exit(env: &LoopEnv, dmem: &DeviceMemory<Loopback>, p: Proc) {
    dmem.detach(&p.svm);
    drop(p.chan);
    env.exit(p.mm);
    drop(p.svm);
}

/// Three chunks of VRAM; ranges 0, 1, 2 migrated, then 0 again (back and
/// forth): range 1 is the least recently migrated, so range 3 evicts it,
/// and range 0 after that evicts range 2.
#[test]
fn eviction_takes_the_least_recently_migrated_chunk() {
    let env = LoopEnv::new(64, GpuConfig::default());
    let dmem = DeviceMemory::part(&env.gpu, 0, 3 * CHUNK_BYTES).unwrap();
    let p = process(&env, &dmem, 4, 1);
    for i in 0..3 {
        assert_eq!(migrate(&p, &dmem, i), CHUNK_PAGES);
    }
    let (a, b) = chunk(0);
    assert_eq!(dmem.migrate_to_system(&p.svm, a, b), Ok(CHUNK_PAGES));
    assert_eq!(migrate(&p, &dmem, 0), CHUNK_PAGES);
    assert_eq!(dmem.stats().evicted_pages, 0);
    assert_eq!(migrate(&p, &dmem, 3), CHUNK_PAGES);
    assert!(in_system(&p, 1), "range 1 (least recent) evicted");
    assert!(in_vram(&p, 0, &dmem) && in_vram(&p, 2, &dmem) && in_vram(&p, 3, &dmem));
    assert_eq!(migrate(&p, &dmem, 1), CHUNK_PAGES);
    assert!(in_system(&p, 2), "then range 2");
    let s = dmem.stats();
    assert_eq!((s.evicted_chunks, s.evicted_pages), (2, 2 * CHUNK_PAGES));
    // The GPU copies range 0 (in VRAM) over range 2 (evicted).
    let (c, _) = chunk(2);
    p.chan
        .run(&Command::Copy {
            dst: c,
            src: A,
            len: CHUNK_BYTES,
        })
        .unwrap();
    let mut want = data(4, 1);
    let (lo, hi) = (2 * CHUNK_BYTES as usize, 3 * CHUNK_BYTES as usize);
    want.copy_within(0..CHUNK_BYTES as usize, lo);
    let mut got = vec![0u8; want.len()];
    p.mm.read(A, &mut got).unwrap();
    assert!(got[lo..hi] == want[lo..hi] && got == want);
    exit(&env, &dmem, p);
    assert_eq!(dmem.teardown(), Ok(()));
}

/// A range larger than VRAM: the migration evicts the older chunk, then
/// stops with VRAM full of its own pages (never evicting what it
/// migrated, even the pages it just brought back by evicting).
#[test]
fn a_migration_never_evicts_its_own_pages() {
    let env = LoopEnv::new(64, GpuConfig::default());
    let dmem = DeviceMemory::part(&env.gpu, 0, 2 * CHUNK_BYTES).unwrap();
    let p = process(&env, &dmem, 3, 2);
    assert_eq!(migrate(&p, &dmem, 2), CHUNK_PAGES);
    let (_, end) = chunk(2);
    assert_eq!(dmem.migrate_to_device(&p.svm, A, end), Ok(2 * CHUNK_PAGES));
    assert!(in_vram(&p, 0, &dmem) && in_vram(&p, 1, &dmem) && in_system(&p, 2));
    let s = dmem.stats();
    assert_eq!((s.evicted_chunks, s.evicted_pages), (1, CHUNK_PAGES));
    check(&p, 3, 2);
    exit(&env, &dmem, p);
    assert_eq!(dmem.teardown(), Ok(()));
}

/// A chunk holding pages of this migration and older ones is not evicted
/// either: half a chunk faulted back by the CPU is refilled by the next
/// migration, which then stops (VRAM full, nothing it may evict).
#[test]
fn a_chunk_the_migration_put_pages_in_stays() {
    let env = LoopEnv::new(64, GpuConfig::default());
    let dmem = DeviceMemory::part(&env.gpu, 0, CHUNK_BYTES).unwrap();
    let p = process(&env, &dmem, 2, 3);
    assert_eq!(migrate(&p, &dmem, 0), CHUNK_PAGES);
    let mut half = vec![0u8; (CHUNK_BYTES / 2) as usize];
    p.mm.read(A, &mut half).unwrap();
    assert_eq!(dmem.stats().vram.pages, CHUNK_PAGES / 2);
    assert_eq!(migrate(&p, &dmem, 1), CHUNK_PAGES / 2);
    assert_eq!(dmem.stats().evicted_pages, 0);
    check(&p, 2, 3);
    exit(&env, &dmem, p);
    assert_eq!(dmem.teardown(), Ok(()));
}

/// One memory serving two processes: the second's migration evicts the
/// first's pages, which come back with their data; once the first has
/// exited its pages are freed, and nothing is evicted for them.
#[test]
fn eviction_crosses_processes_and_skips_exited_ones() {
    let env = LoopEnv::new(64, GpuConfig::default());
    let dmem = DeviceMemory::part(&env.gpu, 0, CHUNK_BYTES).unwrap();
    let p1 = process(&env, &dmem, 1, 4);
    let p2 = process(&env, &dmem, 1, 5);
    assert_eq!(migrate(&p1, &dmem, 0), CHUNK_PAGES);
    assert_eq!(migrate(&p2, &dmem, 0), CHUNK_PAGES);
    assert!(in_system(&p1, 0) && in_vram(&p2, 0, &dmem));
    assert_eq!(dmem.stats().evicted_pages, CHUNK_PAGES);
    check(&p1, 1, 4);
    assert_eq!(migrate(&p1, &dmem, 0), CHUNK_PAGES, "p2's pages evicted");
    assert_eq!(dmem.stats().evicted_pages, 2 * CHUNK_PAGES);
    check(&p2, 1, 5);
    // p1 exits with its pages in VRAM: they are freed, not evicted.
    drop(p1.chan);
    env.exit(p1.mm);
    drop(p1.svm);
    assert_eq!(dmem.stats().vram.pages, 0);
    assert_eq!(migrate(&p2, &dmem, 0), CHUNK_PAGES);
    assert_eq!(dmem.stats().evicted_pages, 2 * CHUNK_PAGES);
    check(&p2, 1, 5);
    exit(&env, &dmem, p2);
    assert_eq!(dmem.teardown(), Ok(()));
}

/// 2 MiB pages evict whole: one chunk of VRAM, a HUGE VMA's first 2 MiB
/// page in it; migrating the second evicts the first, which comes back as
/// a 2 MiB leaf with its data; a 4 KiB page's migration then evicts the
/// 2 MiB device page the same way.
#[test]
fn a_2m_device_page_is_evicted_whole() {
    let env = LoopEnv::new(64, GpuConfig::default());
    let dmem = DeviceMemory::part(&env.gpu, 0, CHUNK_BYTES).unwrap();
    let p = process(&env, &dmem, 1, 6);
    let h = A + 4 * CHUNK_BYTES;
    p.mm.mmap(h, 2 * CHUNK_BYTES, RW | VmFlags::HUGE).unwrap();
    let big = data(2, 7);
    p.mm.write(h, &big).unwrap();
    let huge_in_vram = |i: u64| {
        matches!(p.mm.cpu_state(h + i * CHUNK_BYTES + PG),
            PageState::DevicePrivate { huge: true, owner, .. } if owner == dmem.owner())
    };
    let huge_leaf = |i: u64| matches!(p.mm.cpu_state(h + i * CHUNK_BYTES), PageState::Huge { .. });
    let to_vram = |i: u64| {
        let a = h + i * CHUNK_BYTES;
        dmem.migrate_to_device(&p.svm, a, a + CHUNK_BYTES).unwrap()
    };
    assert_eq!(to_vram(0), CHUNK_PAGES);
    assert!(huge_in_vram(0));
    assert_eq!(to_vram(1), CHUNK_PAGES);
    assert!(
        huge_leaf(0) && huge_in_vram(1),
        "the first 2 MiB page evicted whole"
    );
    let s = dmem.stats();
    assert_eq!((s.evicted_chunks, s.evicted_pages), (1, CHUNK_PAGES));
    assert_eq!(migrate(&p, &dmem, 0), CHUNK_PAGES);
    assert!(
        huge_leaf(1) && in_vram(&p, 0, &dmem),
        "then the second, for 4 KiB pages"
    );
    let mut got = vec![0u8; big.len()];
    p.mm.read(h, &mut got).unwrap();
    assert!(got == big, "2 MiB data differs");
    check(&p, 1, 6);
    exit(&env, &dmem, p);
    assert_eq!(dmem.teardown(), Ok(()));
}

/// hmm-tests' `migrate_anon_huge_err` intent: a 2 MiB page whose chunk
/// allocation fails (injected) stays in system memory, whole, and the next
/// 2 MiB page of the range still migrates; data correct on both.
#[test]
fn a_failed_chunk_allocation_leaves_its_2m_page_in_system_memory() {
    let env = LoopEnv::new(64, GpuConfig::default());
    let dmem = DeviceMemory::part(&env.gpu, 0, 4 * CHUNK_BYTES).unwrap();
    let p = process(&env, &dmem, 1, 8);
    let h = A + 4 * CHUNK_BYTES;
    p.mm.mmap(h, 2 * CHUNK_BYTES, RW | VmFlags::HUGE).unwrap();
    let big = data(2, 9);
    p.mm.write(h, &big).unwrap();
    dmem.inject_vram_failure(VramFailure::Nth(1));
    let moved = dmem.migrate_to_device(&p.svm, h, h + 2 * CHUNK_BYTES);
    assert_eq!(moved, Ok(CHUNK_PAGES));
    assert!(matches!(p.mm.cpu_state(h + PG), PageState::Huge { .. }));
    assert!(matches!(
        p.mm.cpu_state(h + CHUNK_BYTES + PG),
        PageState::DevicePrivate { huge: true, .. }
    ));
    let s = dmem.stats();
    assert_eq!((s.alloc_failures, s.vram.chunks), (1, 1));
    let mut got = vec![0u8; big.len()];
    p.mm.read(h, &mut got).unwrap();
    assert!(got == big, "2 MiB data differs");
    exit(&env, &dmem, p);
    assert_eq!(dmem.teardown(), Ok(()));
}
