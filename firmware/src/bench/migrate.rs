//! `bench=migrate`: the migration workload
//! (`faultline_driver::gpu::suite::migration`) over `mib=N` MiB (64 by
//! default) of a process's memory, `iterations=N` times (3 by default),
//! each iteration with 4 KiB pages and then (for a whole number of 2 MiB
//! pages) with 2 MiB pages, each run on a freshly probed driver as the SVM
//! tests get it. One line per run:
//! `bench migrate host=guest bytes=N pages=4k|2m cpu_fill_ns=N to_device_ns=N to_system_ns=N`
//! (the CPU's fill is the process agent's, from ring 3).

use alloc::format;
use alloc::string::String;

use faultline_abi::LEAF_2M;
use faultline_driver::gpu::suite::migration;
use faultline_driver::gpu::suite::Needs;

use crate::println;

pub fn run() -> Result<(), String> {
    let g = crate::gpu::get()?.ok_or("bench=migrate needs the Faultline GPU")?;
    let params = crate::tests::params();
    let mib = params.mib.unwrap_or(64);
    let needs = Needs {
        // The range, its page tables and the frames it comes back to.
        memory_mib: 2 * mib + 8,
        // Minutes per direction at 64 MiB where the kernel is emulated;
        // still a hang detector.
        timeout_ns: Some(1800 * 1_000_000_000),
        ..Needs::DEFAULT
    };
    let bytes = mib << 20;
    // A HUGE VMA is whole 2 MiB pages.
    let variants: &[(bool, &str)] = if bytes.is_multiple_of(LEAF_2M) {
        &[(false, "4k"), (true, "2m")]
    } else {
        &[(false, "4k")]
    };
    for _ in 0..params.iterations.unwrap_or(3) {
        for &(huge, pages) in variants {
            let env = crate::tests::svm::env_for(g, &needs)?;
            let o = migration::run(&env, bytes, huge)
                .map_err(|e| format!("migrate ({pages} pages): {e}"))?;
            println!(
                "bench migrate host=guest bytes={bytes} pages={pages} cpu_fill_ns={} to_device_ns={} to_system_ns={}",
                o.cpu_fill_ns,
                o.to_device_ns,
                o.to_system_ns
            );
        }
    }
    Ok(())
}
