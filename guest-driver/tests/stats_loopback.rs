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
    Channel, Command, GpuConfig, LatencySnapshot, Prefetch, StatsSnapshot, SvmConfig, SvmContext,
};
use faultline_driver::sim::SimMm;

const DATA: u64 = 0x40_0000_0000;
const HUGE: u64 = 0x42_0000_0000;

/// A fixed policy (the default: 64 KiB fault-around, one replay per
/// batch), whatever `FAULTLINE_LOOPBACK_SVM` says, so the counts are exact.
fn env() -> LoopEnv {
    LoopEnv::with_inject(64, GpuConfig::default(), None)
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
    env.gpu().counters().stats()
}

/// The cells whose count grew from `before` to `after`, with the growth.
fn grown(before: &LatencySnapshot, after: &LatencySnapshot) -> Vec<(&'static str, u64)> {
    before
        .iter()
        .zip(after.iter())
        .filter(|((_, b), (_, a))| a.count != b.count)
        .map(|((n, b), (_, a))| (n, a.count - b.count))
        .collect()
}

fn fill(chan: &Channel<Loopback>, dst: u64, len: u64) {
    chan.run(&Command::Fill {
        dst,
        len,
        pattern: 0x5a,
    })
    .unwrap_or_else(|e| panic!("fill {dst:#x}+{len:#x}: {e}"));
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
    let s0 = stats(&env);
    fill(&chan, DATA, 8 << 16);
    let s1 = stats(&env);
    let replays = s1.counters.replays - s0.counters.replays;
    assert_eq!(s1.counters.retries, 0, "{s1}");
    assert_eq!(s1.counters.windows - s0.counters.windows, 8, "{s1}");
    assert_eq!(
        grown(&s0.latency, &s1.latency),
        [
            ("window.64k", 8),
            ("range_fault.64k", 8),
            ("pte_write.64k", 8),
            ("replay", replays)
        ],
        "{s1}"
    );
    assert!(replays >= 8, "one batch per window at least: {s1}");
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

    env.munmap(&p, DATA, 1 << 16).unwrap();
    let s2 = stats(&env);
    assert_eq!(
        grown(&s1.latency, &s2.latency),
        [("tlb_invalidate.64k", 1)],
        "{s2}"
    );
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
    let s0 = stats(&env);
    fill(&chan, HUGE, 2 << 20);
    let s1 = stats(&env);
    let replays = s1.counters.replays - s0.counters.replays;
    assert_eq!(
        grown(&s0.latency, &s1.latency),
        [
            ("window.2m", 1),
            ("range_fault.2m", 1),
            ("pte_write.2m", 1),
            ("replay", replays)
        ],
        "{s1}"
    );
    fill(&chan, DATA, 3 << 12);
    let s2 = stats(&env);
    let replays = s2.counters.replays - s1.counters.replays;
    assert_eq!(
        grown(&s1.latency, &s2.latency),
        [
            ("window.4k", 3),
            ("range_fault.4k", 3),
            ("pte_write.4k", 3),
            ("replay", replays)
        ],
        "{s2}"
    );
    env.munmap(&p, HUGE, 2 << 20).unwrap();
    let s3 = stats(&env);
    assert_eq!(
        grown(&s2.latency, &s3.latency),
        [("tlb_invalidate.2m", 1)],
        "{s3}"
    );
    // The suite's line has these cells, by name, with their counts.
    let line = s3.to_string();
    assert!(
        line.contains(" window.2m=1/") && line.contains(" window.4k=3/"),
        "{line}"
    );
}
