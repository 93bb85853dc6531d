//! The migration benchmark's workload (`gpu::suite::migration`, run by
//! `scripts/bench.sh migrate`) checks what it times: a small run in the
//! loopback passes, and each direction took time.

mod common;

use common::env::LoopEnv;
use faultline_driver::gpu::suite::migration;
use faultline_driver::gpu::GpuConfig;

#[test]
fn a_megabyte_goes_to_vram_and_back_intact() {
    let env = LoopEnv::with_inject(32, GpuConfig::default(), None);
    let o = migration::run(&env, 1 << 20).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        o.to_device_ns > 0 && o.to_system_ns > 0 && o.cpu_fill_ns > 0,
        "{o:?}"
    );
}

#[test]
fn sizes_that_are_not_whole_pages_are_refused() {
    let env = LoopEnv::with_inject(32, GpuConfig::default(), None);
    let e = migration::run(&env, 4096 + 8).expect_err("a partial page");
    assert!(e.contains("multiple of 4 KiB"), "{e}");
}
