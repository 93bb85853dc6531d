//! Host loopback half of `scripts/bench.sh policies`: the fault pipeline's
//! workloads (`faultline_driver::gpu::suite::workloads`) under each policy
//! given, on a fresh device per run. One line per run:
//! `bench policies host=loopback policy=P workload=W pages=N ns=N faults=N replays=N`.
//!
//! Run: `cargo run --release -p faultline-driver --example bench_policies -- MIB POLICY...`
//! (POLICY in the guest's `svm=` syntax; `default` for the default policy).

#[path = "../tests/common/mod.rs"]
mod common;

use common::env::LoopEnv;
use faultline_driver::gpu::suite::workloads::{self, Workload};
use faultline_driver::gpu::{FaultPolicy, GpuConfig};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: bench_policies MIB POLICY...";
    let Some(mib) = args.first().and_then(|m| m.parse::<u64>().ok()) else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    if args.len() < 2 {
        eprintln!("{usage}");
        std::process::exit(2);
    }
    for spec in &args[1..] {
        let text = if spec == "default" { "" } else { spec.as_str() };
        let policy = FaultPolicy::parse(text).unwrap_or_else(|e| {
            eprintln!("bench_policies: {e}");
            std::process::exit(2)
        });
        for w in Workload::ALL {
            let cfg = GpuConfig {
                policy,
                ..GpuConfig::default()
            };
            // The workload's memory, its page tables and the driver's rings.
            let env = LoopEnv::with_inject(mib * 2 + 32, cfg, None);
            match workloads::run(&env, w, mib << 20) {
                Ok(o) => println!(
                    "bench policies host=loopback policy={spec} workload={} pages={} ns={} faults={} replays={}",
                    w.name(),
                    o.pages,
                    o.ns,
                    o.faults,
                    o.replays
                ),
                Err(e) => {
                    eprintln!("bench_policies: {spec} {}: {e}", w.name());
                    std::process::exit(1);
                }
            }
        }
    }
}
