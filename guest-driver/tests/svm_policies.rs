//! The fault pipeline's policies in the host loopback, each shown by what
//! it changes: one LAUNCH whose 64 threads each write their own page puts
//! 64 faults in the buffer at once, drained 8 at a time; the driver's and
//! the device's counters then tell the replay policies apart. The density
//! prefetcher is shown by the leaves single-page faults leave behind.

mod common;

use std::sync::Arc;

use common::env::LoopEnv;
use faultline_abi::{isa, Counter, PAGE_SIZE};
use faultline_driver::gpu::suite::{Prot, SvmEnv};
use faultline_driver::gpu::{
    Channel, Command, CounterSnapshot, FaultPolicy, GpuConfig, Platform, Prefetch, SvmConfig,
    SvmContext,
};
use faultline_driver::sim::SimMm;

const PAGES: u64 = 64;
const DATA: u64 = 0x40_0000_0000;
const CODE: u64 = 0x41_0000_0000;

fn env_with(policy: &str) -> LoopEnv {
    let cfg = GpuConfig {
        policy: FaultPolicy::parse(policy).unwrap_or_else(|e| panic!("{e}")),
        ..GpuConfig::default()
    };
    LoopEnv::with_inject(64, cfg, None)
}

/// Only the faulting page is mapped, so every page is one fault.
fn bind(
    env: &LoopEnv,
    p: &Arc<SimMm>,
) -> (
    SvmContext<common::loopback::Loopback, SimMm>,
    Channel<common::loopback::Loopback>,
) {
    let cfg = SvmConfig {
        prefetch: Some(Prefetch::None),
        ..SvmConfig::default()
    };
    let svm = SvmContext::new(env.gpu(), p, cfg).unwrap_or_else(|e| panic!("svm: {e}"));
    let chan = Channel::open(svm.context()).unwrap_or_else(|e| panic!("channel: {e}"));
    (svm, chan)
}

struct Burst {
    driver: CounterSnapshot,
    device_replays: u64,
}

/// Thread t stores t + 1 at DATA + t * 4096: 64 faults, all in the buffer
/// before the first wait services any. Returns the counters' growth.
fn burst(policy: &str) -> Burst {
    let env = env_with(policy);
    let p = env.spawn().unwrap();
    env.mmap(&p, DATA, PAGES * PAGE_SIZE, Prot::RW, false)
        .unwrap();
    env.mmap(&p, CODE, PAGE_SIZE, Prot::RW, false).unwrap();
    let k = [
        isa::encode(isa::S2R, 5, 0, 0, isa::sreg::GTID),
        isa::encode(isa::SHLI, 6, 5, 0, 12),
        isa::encode(isa::ADD, 6, 6, 1, 0),
        isa::encode(isa::ADDI, 7, 5, 0, 1),
        isa::encode(isa::ST64, 0, 6, 7, 0),
        isa::encode(isa::EXIT, 0, 0, 0, 0),
    ];
    let bytes: Vec<u8> = k.iter().flat_map(|w| w.to_le_bytes()).collect();
    env.write(&p, CODE, &bytes).unwrap();
    let (_svm, chan) = bind(&env, &p);
    // The code page faults first; get it mapped before counting.
    chan.run(&Command::Fill {
        dst: CODE + PAGE_SIZE - 8,
        len: 8,
        pattern: 0,
    })
    .unwrap();
    let gpu = env.gpu();
    let before = gpu.counters().snapshot();
    let replays = gpu.device_counter(Counter::Replays as u32);
    let raised = gpu.device_counter(Counter::FaultsRaised as u32);
    let t = chan
        .submit(&Command::Launch {
            code: CODE,
            code_len: k.len() as u32,
            grid: (PAGES / 8) as u32,
            block: 8,
            args: [DATA, 0, 0, 0],
        })
        .unwrap();
    let deadline = gpu.platform().now_ns() + 10_000_000_000;
    while gpu.device_counter(Counter::FaultsRaised as u32) < raised + PAGES {
        assert!(
            gpu.platform().now_ns() < deadline,
            "the 64 faults never came"
        );
    }
    chan.wait(t)
        .unwrap_or_else(|e| panic!("launch under {policy}: {e}"));
    for t in 0..PAGES {
        let mut b = [0u8; 8];
        env.read(&p, DATA + t * PAGE_SIZE, &mut b).unwrap();
        assert_eq!(
            u64::from_le_bytes(b),
            t + 1,
            "thread {t}'s word under {policy}"
        );
    }
    let after = gpu.counters().snapshot();
    let d = |f: fn(&CounterSnapshot) -> u64| f(&after) - f(&before);
    Burst {
        driver: CounterSnapshot {
            faults_read: d(|c| c.faults_read),
            faults_serviced: d(|c| c.faults_serviced),
            faults_flushed: d(|c| c.faults_flushed),
            batches: d(|c| c.batches),
            replays: d(|c| c.replays),
            pages_mapped: d(|c| c.pages_mapped),
            ..CounterSnapshot::default()
        },
        device_replays: gpu.device_counter(Counter::Replays as u32) - replays,
    }
}

#[test]
fn batch_replays_once_per_batch_and_keeps_what_is_left_in_the_buffer() {
    let b = burst("batch:8,replay=batch");
    eprintln!("batch: {:?}", b.driver);
    assert_eq!(b.driver.replays, b.driver.batches);
    assert!(b.driver.batches >= PAGES / 8);
    assert!((1..=b.driver.replays).contains(&b.device_replays));
    // Nothing is discarded: every entry is read and serviced. Whether a
    // replay also makes some still-listed access fault again (and its page
    // be serviced twice) depends on when the device runs relative to the
    // driver, so only "at least once" is certain here; batch_flush below
    // is exactly once.
    assert_eq!(b.driver.faults_flushed, 0);
    assert_eq!(b.driver.faults_read, b.driver.faults_serviced);
    assert!(b.driver.faults_serviced >= PAGES);
}

#[test]
fn batch_flush_discards_what_the_replay_raises_again() {
    let b = burst("batch:8,replay=batch_flush");
    eprintln!("batch_flush: {:?}", b.driver);
    assert_eq!(b.driver.replays, b.driver.batches);
    assert!((1..=b.driver.replays).contains(&b.device_replays));
    assert!(b.driver.faults_flushed > 0, "nothing flushed");
    // Every page serviced exactly once.
    assert_eq!(b.driver.faults_serviced, PAGES);
    assert_eq!(b.driver.pages_mapped, PAGES);
}

#[test]
fn block_replays_after_every_fault() {
    let b = burst("batch:8,replay=block");
    eprintln!("block: {:?}", b.driver);
    assert_eq!(b.driver.replays, b.driver.faults_serviced);
    // Doorbells rung before the device runs count once there.
    assert!((1..=b.driver.replays).contains(&b.device_replays));
    assert!(b.driver.replays >= PAGES);
}

#[test]
fn once_replays_only_when_the_buffer_is_empty() {
    let b = burst("batch:8,replay=once");
    eprintln!("once: {:?}", b.driver);
    // 64 entries in batches of 8, then one replay that completes the launch.
    assert_eq!(b.driver.batches, PAGES / 8);
    assert_eq!(b.driver.replays, 1);
    assert_eq!(b.device_replays, 1);
    assert_eq!(b.driver.faults_serviced, PAGES);
}

/// Single-page FILLs in a fresh 2 MiB-aligned mapping; the device leaves
/// after each.
fn density_leaves(policy: &str, vma_pages: u64, touches: &[u64]) -> Vec<u64> {
    let env = env_with(policy);
    let p = env.spawn().unwrap();
    env.mmap(&p, DATA, vma_pages * PAGE_SIZE, Prot::RW, false)
        .unwrap();
    let svm = SvmContext::new(env.gpu(), &p, SvmConfig::default()).unwrap();
    let chan = Channel::open(svm.context()).unwrap();
    touches
        .iter()
        .map(|&pg| {
            chan.run(&Command::Fill {
                dst: DATA + pg * PAGE_SIZE,
                len: 8,
                pattern: pg,
            })
            .unwrap();
            svm.device_leaves()
        })
        .collect()
}

#[test]
fn density_maps_a_subtree_only_above_its_threshold() {
    // 51 %: one page of two is not enough; three of four and five of eight are.
    assert_eq!(
        density_leaves("prefetch=density:51", 512, &[0, 1, 2, 4]),
        [1, 2, 4, 8]
    );
    // 50 %: one page of two is not more than it.
    assert_eq!(density_leaves("prefetch=density:50", 512, &[0]), [1]);
    // 49 %: one page of two is.
    assert_eq!(density_leaves("prefetch=density:49", 512, &[0]), [2]);
    // 0 %: the whole 2 MiB region, clipped to the VMA.
    assert_eq!(density_leaves("prefetch=density:0", 512, &[7]), [512]);
    assert_eq!(density_leaves("prefetch=density:0", 40, &[7]), [40]);
    // Against the fixed 64 KiB window and none.
    assert_eq!(density_leaves("prefetch=fault_around", 512, &[0]), [16]);
    assert_eq!(density_leaves("prefetch=none", 512, &[0, 1]), [1, 2]);
}
