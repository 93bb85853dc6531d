//! The fault-pipeline benchmark's workloads (`scripts/bench.sh policies`),
//! generic over [`SvmEnv`] like the suite, so the loopback
//! (`examples/bench_policies.rs`) and the guest (`bench=policies`) run the
//! same code. Each runs in a fresh process on memory the device never
//! mapped, under whatever policy the environment's GPU was probed with, and
//! checks what the GPU wrote or read, so a broken path fails instead of
//! producing a number.

use alloc::format;
use alloc::string::String;
use alloc::vec;

use faultline_abi::{Counter, PAGE_SIZE};

use super::helpers::*;
use super::{ChaseList, Pattern, SvmEnv};
use crate::gpu::Platform;

/// A workload over `bytes` of fresh anonymous memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// One FILL over all of it (first touch, in order).
    Sequential,
    /// An 8-byte FILL into every 4 KiB page, in a scrambled order.
    Random,
    /// An 8-byte FILL every 64 KiB, in order.
    Strided,
    /// One GPU thread following a linked list of one node per 4 KiB of
    /// memory, scattered (the CPU built it, so the pages are resident on
    /// the CPU and fault only on the device).
    Chase,
}

impl Workload {
    /// All of them, in table order.
    pub const ALL: [Workload; 4] = [
        Workload::Sequential,
        Workload::Random,
        Workload::Strided,
        Workload::Chase,
    ];

    /// Its name in the bench output.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Sequential => "sequential",
            Workload::Random => "random",
            Workload::Strided => "strided",
            Workload::Chase => "chase",
        }
    }
}

/// What one run measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Distinct 4 KiB pages the GPU touched.
    pub pages: u64,
    /// From the first submit to the last completion.
    pub ns: u64,
    /// Faults the device raised meanwhile.
    pub faults: u64,
    /// REPLAY doorbells the driver rang meanwhile.
    pub replays: u64,
}

/// An odd multiplier, so `i * STEP % n` visits every `i < n` once for a
/// power-of-two `n`.
const STEP: u64 = 7919;

/// Runs `w` over `bytes` (a power of two, ≥ 64 KiB).
pub fn run<E: SvmEnv>(env: &E, w: Workload, bytes: u64) -> Result<Outcome, String> {
    ensure!(
        bytes.is_power_of_two() && bytes >= 64 << 10,
        "workload size {bytes} is not a power of two ≥ 64 KiB"
    );
    let pages = bytes / PAGE_SIZE;
    let (p, base) = spawn_mapped(env, bytes)?;
    let code = mmap_rw(env, &p, PAGE_SIZE, "mmap code")?;
    let out = mmap_rw(env, &p, PAGE_SIZE, "mmap out")?;
    let chase = ChaseList {
        heap: base,
        slots: bytes / 16,
        step: STEP,
        nodes: pages,
        value_offset: 11,
    };
    let k = CHASE_KERNEL;
    let mut touched = pages;
    if w == Workload::Chase {
        env.build_list(&p, chase)
            .map_err(|_| String::from("building the list faulted"))?;
        let mut seen = vec![false; pages as usize];
        for i in 0..chase.nodes {
            seen[((chase.node(i) - base) / PAGE_SIZE) as usize] = true;
        }
        touched = seen.iter().filter(|s| **s).count() as u64;
    }
    write_code(env, &p, code, &k)?;
    let mut outcome = None;
    bound(env, p, |p, _, chan| {
        // The code and output pages fault once, outside the measurement.
        ok(fill(chan, out, 8, 0), "warm-up")?;
        ok(
            chan.run(&launch(code, &k, 1, 1, [0, 0, 0, out])),
            "warm-up launch",
        )?;
        let gpu = env.gpu();
        let faults = gpu.device_counter(Counter::FaultsRaised as u32);
        let replays = counters(env).replays;
        let t0 = gpu.platform().now_ns();
        match w {
            Workload::Sequential => {
                ok(fill(chan, base, bytes, 0x5e9), "fill")?;
            }
            Workload::Random => {
                for i in 0..pages {
                    let pg = i * STEP % pages;
                    ok(fill(chan, base + pg * PAGE_SIZE, 8, pg), "random fill")?;
                }
            }
            Workload::Strided => {
                touched = bytes / (64 << 10);
                for i in 0..touched {
                    ok(fill(chan, base + i * (64 << 10), 8, i), "strided fill")?;
                }
            }
            Workload::Chase => {
                ok(
                    chan.run(&launch(code, &k, 1, 1, [chase.node(0), 0, 0, out])),
                    "chase launch",
                )?;
            }
        }
        let ns = gpu.platform().now_ns() - t0;
        let faults = gpu.device_counter(Counter::FaultsRaised as u32) - faults;
        let replays = counters(env).replays - replays;
        match w {
            Workload::Sequential => {
                for pg in [0, pages / 2, pages - 1] {
                    cpu_check(env, p, base + pg * PAGE_SIZE, 8, Pattern::constant(0x5e9))?;
                }
            }
            Workload::Random => {
                for pg in [0, pages / 3, pages - 1] {
                    cpu_check(env, p, base + pg * PAGE_SIZE, 8, Pattern::constant(pg))?;
                }
            }
            Workload::Strided => {
                let last = touched - 1;
                cpu_check(env, p, base + last * (64 << 10), 8, Pattern::constant(last))?;
            }
            Workload::Chase => {
                let sum = (0..chase.nodes).fold(0u64, |s, i| s.wrapping_add(chase.value(i)));
                let got = read_u64(env, p, out)?;
                ensure!(got == sum, "chase sum {got}, expected {sum}");
            }
        }
        outcome = Some(Outcome {
            pages: touched,
            ns,
            faults,
            replays,
        });
        Ok(())
    })?;
    outcome.ok_or_else(|| format!("{} produced no outcome", w.name()))
}
