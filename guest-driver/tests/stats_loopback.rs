//! The driver's per-size latency statistics (`gpu::stats`) against the
//! real device model in one process: known workloads land in the expected
//! size classes with exact counts, and the times of one window add up.

mod common;

use std::sync::Arc;

use common::env::LoopEnv;
use common::loopback::Loopback;
use faultline_driver::gpu::stats::{Op, SizeClass};
use faultline_driver::gpu::suite::{Prot, SvmEnv};
use faultline_driver::gpu::{
    Channel, Command, FaultPolicy, GpuConfig, LatencySnapshot, Prefetch, StatsSnapshot, SvmConfig,
    SvmContext,
};
use faultline_driver::sim::SimMm;

const DATA: u64 = 0x40_0000_0000;
const HUGE: u64 = 0x42_0000_0000;

/// A fixed policy (the default: 64 KiB fault-around, one replay per
/// batch), whatever `FAULTLINE_LOOPBACK_SVM` says, so the counts are exact.
fn env() -> LoopEnv {
    env_with(FaultPolicy::default())
}

fn env_with(policy: FaultPolicy) -> LoopEnv {
    let cfg = GpuConfig {
        policy,
        ..GpuConfig::default()
    };
    LoopEnv::with_inject(64, cfg, None)
}

fn bind(
    env: &LoopEnv,
    p: &Arc<SimMm>,
    prefetch: Prefetch,
) -> (SvmContext<Loopback, SimMm>, Channel<Loopback>) {
    let cfg = SvmConfig {
        prefetch: Some(prefetch),
        ..SvmConfig::default()
    };
    let svm = SvmContext::new(env.gpu(), p, cfg).unwrap_or_else(|e| panic!("svm: {e}"));
    let chan = Channel::open(svm.context()).unwrap_or_else(|e| panic!("channel: {e}"));
    (svm, chan)
}

fn stats(env: &LoopEnv) -> StatsSnapshot {
    env.gpu().stats()
}

/// The cells whose count grew from `before` to `after`, with the growth.
fn grown(before: &LatencySnapshot, after: &LatencySnapshot) -> Vec<(String, u64)> {
    before
        .iter()
        .zip(after.iter())
        .filter(|((_, b), (_, a))| a.count != b.count)
        .map(|((n, b), (_, a))| (n.to_string(), a.count - b.count))
        .collect()
}

/// FILLs `dst..dst+len` and checks that exactly `windows` single-pass
/// windows of `class` (`4k`, `64k`, `2m`) and the batches' replays were
/// recorded; returns the stats after.
fn fill_in_windows(
    env: &LoopEnv,
    chan: &Channel<Loopback>,
    (dst, len): (u64, u64),
    class: &str,
    windows: u64,
) -> StatsSnapshot {
    let before = stats(env);
    chan.run(&Command::Fill {
        dst,
        len,
        pattern: 0x5a,
    })
    .unwrap_or_else(|e| panic!("fill {dst:#x}+{len:#x}: {e}"));
    let after = stats(env);
    let replays = after.counters.replays - before.counters.replays;
    assert_eq!(after.counters.retries, before.counters.retries, "{after}");
    let cell = |op: &str| format!("{op}.{class}");
    assert_eq!(
        grown(&before.latency, &after.latency),
        [
            (cell("window"), windows),
            (cell("range_fault"), windows),
            (cell("pte_write"), windows),
            ("replay".into(), replays)
        ],
        "{after}"
    );
    assert!(replays >= 1, "{after}");
    after
}

/// munmaps `addr..addr+len` and checks that it was one TLB invalidation
/// of `class`.
fn munmap_is_one_invalidation(env: &LoopEnv, p: &Arc<SimMm>, addr: u64, len: u64, class: &str) {
    let before = stats(env);
    env.munmap(p, addr, len).unwrap();
    let after = stats(env);
    assert_eq!(
        grown(&before.latency, &after.latency),
        [(format!("tlb_invalidate.{class}"), 1)],
        "{after}"
    );
}

/// Eight 64 KiB fault-around windows (one FILL over 512 KiB of untouched
/// memory), then a munmap of one of them: 64k windows, range_faults and
/// leaf writes, one replay per window's batch, one 64k TLB invalidation.
#[test]
fn fault_around_windows_are_64k() {
    let env = env();
    let p = env.spawn().unwrap();
    env.mmap(&p, DATA, 8 << 16, Prot::RW, false).unwrap();
    let (_svm, chan) = bind(&env, &p, Prefetch::FaultAround);
    let s1 = fill_in_windows(&env, &chan, (DATA, 8 << 16), "64k", 8);
    assert_eq!(s1.counters.windows, 8, "{s1}");
    assert!(
        s1.counters.replays >= 8,
        "one batch per window at least: {s1}"
    );
    // One pass per window: its time is its range_fault and its leaf writes.
    let l = |op| s1.latency.get(op, SizeClass::K64);
    let w = l(Op::Window);
    assert_eq!(
        w.total_ns,
        l(Op::RangeFault).total_ns + l(Op::PteWrite).total_ns,
        "{s1}"
    );
    assert!(w.max_ns > 0 && w.max_ns <= w.total_ns, "{w:?}");
    assert!(l(Op::RangeFault).max_ns <= w.max_ns, "{s1}");

    munmap_is_one_invalidation(&env, &p, DATA, 1 << 16, "64k");
}

/// Every replay policy times each REPLAY it rings, and services the same
/// windows.
#[test]
fn every_replay_policy_times_its_replays() {
    for replay in ["block", "batch", "batch_flush", "once"] {
        let policy = FaultPolicy::parse(&format!("batch:8,replay={replay}"))
            .unwrap_or_else(|e| panic!("{e}"));
        let env = env_with(policy);
        let p = env.spawn().unwrap();
        env.mmap(&p, DATA, 8 << 16, Prot::RW, false).unwrap();
        let (_svm, chan) = bind(&env, &p, Prefetch::FaultAround);
        let s = fill_in_windows(&env, &chan, (DATA, 8 << 16), "64k", 8);
        let r = s.latency.replay();
        // Every REPLAY this policy rang was timed, and took time.
        assert!(r.count >= 1 && r.total_ns > 0, "{replay}: {s}");
    }
}

/// A 2 MiB HUGE mapping faults in as one 2 MiB window (and its munmap is one
/// 2 MiB invalidation); with no prefetch, each 4 KiB page is a 4k window.
#[test]
fn huge_windows_are_2m_and_single_pages_4k() {
    let env = env();
    let p = env.spawn().unwrap();
    env.mmap(&p, HUGE, 2 << 20, Prot::RW, true).unwrap();
    env.mmap(&p, DATA, 3 << 12, Prot::RW, false).unwrap();
    let (_svm, chan) = bind(&env, &p, Prefetch::None);
    fill_in_windows(&env, &chan, (HUGE, 2 << 20), "2m", 1);
    fill_in_windows(&env, &chan, (DATA, 3 << 12), "4k", 3);
    munmap_is_one_invalidation(&env, &p, HUGE, 2 << 20, "2m");
    // The suite's line has these cells, by name, with their counts.
    let line = stats(&env).to_string();
    assert!(
        line.contains(" window.2m=1/") && line.contains(" window.4k=3/"),
        "{line}"
    );
}
