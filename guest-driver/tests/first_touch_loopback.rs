//! The first-touch migration policy's fault path in the host loopback
//! (the suite's `migrate_first_touch*` cover its outcome): what a window's
//! migration costs the fault pipeline, how the GPU's `migrate=` policy and
//! a context's `SvmConfig::migrate` combine, and that the mirror keeps the
//! density prefetcher's marks through its own migrations.

mod common;

use std::sync::Arc;

use common::env::LoopEnv;
use faultline_abi::{Pte, PAGE_SIZE};
use faultline_driver::gpu::stats::{Op, SizeClass};
use faultline_driver::gpu::suite::{Pattern, Prot, SvmEnv};
use faultline_driver::gpu::{
    Channel, Command, DeviceMemory, FaultPolicy, GpuConfig, MigratePolicy, SvmConfig, SvmContext,
};
use faultline_driver::sim::SimMm;

const DATA: u64 = 0x40_0000_0000;

type Svm = SvmContext<common::loopback::Loopback, SimMm>;
type Chan = Channel<common::loopback::Loopback>;
type Dmem = DeviceMemory<common::loopback::Loopback>;

fn env_with(policy: &str) -> LoopEnv {
    let cfg = GpuConfig {
        policy: FaultPolicy::parse(policy).unwrap_or_else(|e| panic!("{e}")),
        ..GpuConfig::default()
    };
    LoopEnv::with_inject(64, cfg, None)
}

/// A process with `pages` fresh pages at DATA and a context on it.
fn bind(env: &LoopEnv, pages: u64, cfg: SvmConfig) -> (Arc<SimMm>, Svm, Chan) {
    let p = env.spawn().unwrap();
    env.mmap(&p, DATA, pages * PAGE_SIZE, Prot::RW, false)
        .unwrap();
    let svm = SvmContext::new(env.gpu(), &p, cfg).unwrap_or_else(|e| panic!("svm: {e}"));
    let chan = Channel::open(svm.context()).unwrap_or_else(|e| panic!("channel: {e}"));
    (p, svm, chan)
}

fn fill(chan: &Chan, dst: u64, len: u64) {
    chan.run(&Command::Fill {
        dst,
        len,
        pattern: 0x5eed,
    })
    .unwrap_or_else(|e| panic!("fill {dst:#x}+{len:#x}: {e}"));
}

/// The process exits with its context; no VRAM is left.
fn finish(env: &LoopEnv, p: Arc<SimMm>, chan: Chan, svm: Svm, dmem: Dmem) {
    env.exit(p);
    drop((chan, svm));
    assert_eq!(dmem.teardown(), Ok(()));
}

fn vram_leaves(svm: &Svm, pages: u64) -> u64 {
    (0..pages)
        .filter(|i| {
            svm.device_lookup(DATA + i * PAGE_SIZE)
                .is_some_and(|l| l.perms.contains(Pte::VRAM))
        })
        .count() as u64
}

/// One window, one pass: the migration runs before the window's range is
/// registered, so its own invalidation (the only one) forces no retry, and
/// the fresh window had no leaves to shoot down; the migration is timed
/// (`fault_migrate.64k`).
#[test]
fn a_first_touch_window_is_migrated_and_mapped_in_one_pass() {
    let env = env_with("migrate=first_touch");
    let (p, svm, chan) = bind(&env, 16, SvmConfig::default());
    let dmem = DeviceMemory::new(env.gpu()).unwrap();
    dmem.attach(&svm).unwrap();
    let before = env.gpu().counters().snapshot();
    fill(&chan, DATA, 16 * PAGE_SIZE);
    let c = env.gpu().counters().snapshot();
    assert_eq!(
        (
            c.windows - before.windows,
            c.retries - before.retries,
            c.invalidations - before.invalidations,
            c.tlb_invalidates - before.tlb_invalidates,
        ),
        (1, 0, 1, 0),
        "(windows, retries, invalidations, TLB invalidates)"
    );
    assert_eq!(vram_leaves(&svm, 16), 16);
    assert_eq!((dmem.stats().by_fault, p.device_pages()), (16, 16));
    let timed = env.gpu().stats().latency;
    assert_eq!(
        timed.get(Op::FaultMigrate, SizeClass::K64).count,
        1,
        "the window's migration is timed: {timed}"
    );
    finish(&env, p, chan, svm, dmem);
}

/// The GPU's `migrate=first_touch` applies to contexts with device memory
/// attached and no policy of their own; `SvmConfig::migrate` pins one.
#[test]
fn the_gpu_policy_applies_unless_the_context_pins_its_own() {
    let env = env_with("migrate=first_touch");
    // No device memory: system leaves.
    let (p, svm, chan) = bind(&env, 16, SvmConfig::default());
    fill(&chan, DATA, 16 * PAGE_SIZE);
    assert_eq!((svm.device_leaves(), vram_leaves(&svm, 16)), (16, 0));
    env.exit(p);
    drop((chan, svm));
    // Pinned to none: device memory attached, still system leaves.
    let pinned = SvmConfig {
        migrate: Some(MigratePolicy::None),
        ..SvmConfig::default()
    };
    let (p, svm, chan) = bind(&env, 16, pinned);
    let dmem = DeviceMemory::new(env.gpu()).unwrap();
    dmem.attach(&svm).unwrap();
    fill(&chan, DATA, 16 * PAGE_SIZE);
    assert_eq!((svm.device_leaves(), vram_leaves(&svm, 16)), (16, 0));
    assert_eq!(dmem.stats().by_fault, 0);
    dmem.detach(&svm);
    finish(&env, p, chan, svm, dmem);
}

/// Under the density prefetcher each touched window migrates, and the
/// migration's invalidation, being the mirror's own, leaves the marks that
/// grow the next window: single-page touches of pages 0, 1, 2, 4 map 1, 2,
/// 4 and 8 pages, all in VRAM (as `density_maps_a_subtree_only_above_its_threshold`
/// does without migration).
#[test]
fn density_marks_survive_the_mirrors_own_migrations() {
    let env = env_with("prefetch=density:51,migrate=first_touch");
    let (p, svm, chan) = bind(&env, 512, SvmConfig::default());
    let dmem = DeviceMemory::new(env.gpu()).unwrap();
    dmem.attach(&svm).unwrap();
    let leaves: Vec<u64> = [0, 1, 2, 4]
        .iter()
        .map(|pg| {
            fill(&chan, DATA + pg * PAGE_SIZE, 8);
            vram_leaves(&svm, 512)
        })
        .collect();
    assert_eq!(leaves, [1, 2, 4, 8]);
    assert_eq!(svm.device_leaves(), 8, "every leaf in VRAM");
    assert_eq!(dmem.stats().by_fault, 8);
    finish(&env, p, chan, svm, dmem);
}

/// A window that finds VRAM full evicts as any migration to VRAM does (the
/// fault handler holds no lock, so eviction may take the mmap lock): with
/// one chunk filled by an explicit migration, a GPU FILL of a fresh window
/// evicts that chunk (512 pages, their data intact) and moves in.
#[test]
fn a_first_touch_on_a_full_vram_evicts_the_least_recently_migrated_chunk() {
    let env = env_with("");
    let chunk = 512;
    let (p, svm, chan) = bind(
        &env,
        chunk + 16,
        SvmConfig {
            migrate: Some(MigratePolicy::FirstTouch),
            ..SvmConfig::default()
        },
    );
    let dmem = DeviceMemory::part(env.gpu(), 0, chunk * PAGE_SIZE).unwrap();
    dmem.attach(&svm).unwrap();
    let filler = Pattern::page_index(0xf111);
    env.fill_pattern(&p, DATA, chunk * PAGE_SIZE, filler)
        .unwrap();
    assert_eq!(
        dmem.migrate_to_device(&svm, DATA, DATA + chunk * PAGE_SIZE),
        Ok(chunk)
    );
    let window = DATA + chunk * PAGE_SIZE;
    fill(&chan, window, 16 * PAGE_SIZE);
    let s = dmem.stats();
    assert_eq!(
        (s.by_fault, s.evicted_chunks, s.evicted_pages, s.vram.pages),
        (16, 1, chunk, 16),
        "(by fault, chunks and pages evicted, VRAM pages): {s:?}"
    );
    assert_eq!(
        vram_leaves(&svm, chunk + 16),
        16,
        "the window's VRAM leaves"
    );
    let evicted = env.check_pattern(&p, DATA, chunk * PAGE_SIZE, filler);
    assert_eq!(evicted, Ok(None), "the evicted pages' data");
    finish(&env, p, chan, svm, dmem);
}
