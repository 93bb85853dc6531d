//! `bench=policies`: the fault pipeline's four workloads
//! (`faultline_driver::gpu::suite::workloads`) under the policy `svm=`
//! gives (the default without it), `mib=N` MiB each (64 by default), each
//! on a freshly probed driver as the SVM tests get it
//! (`scripts/bench.sh policies` boots once per policy). One line per
//! workload: `bench policies host=guest workload=W pages=N ns=N faults=N
//! replays=N`.

use alloc::format;
use alloc::string::String;

use faultline_driver::gpu::suite::workloads::{self, Workload};
use faultline_driver::gpu::suite::{Needs, SvmEnv};

use crate::println;

pub fn run() -> Result<(), String> {
    let g = crate::gpu::get()?.ok_or("bench=policies needs the Faultline GPU")?;
    let mib = crate::tests::params().mib.unwrap_or(64);
    let needs = Needs {
        // The workload, its page tables, the chase list's code and output.
        memory_mib: mib + mib / 8 + 8,
        // One command waits for all of a workload's faults (a 64 MiB FILL
        // at one page per fault is minutes here); still a hang detector.
        timeout_ns: Some(1800 * 1_000_000_000),
        ..Needs::DEFAULT
    };
    for w in Workload::ALL {
        let env = crate::tests::svm::env_for(g, &needs)?;
        let o = workloads::run(&env, w, mib << 20).map_err(|e| format!("{}: {e}", w.name()))?;
        println!(
            "bench policies host=guest policy={} workload={} pages={} ns={} faults={} replays={}",
            env.gpu().config().policy,
            w.name(),
            o.pages,
            o.ns,
            o.faults,
            o.replays
        );
    }
    Ok(())
}
