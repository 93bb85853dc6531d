//! The migration benchmark's workload (`gpu::suite::migration`, run by
//! `scripts/bench.sh migrate`) checks what it times: a small run in the
//! loopback passes, and each direction took time, with 4 KiB pages and
//! with 2 MiB ones (whose pages must move whole).

mod common;

use common::env::LoopEnv;
use faultline_driver::gpu::suite::migration;
use faultline_driver::gpu::GpuConfig;

fn round_trip(bytes: u64, huge: bool) {
    let env = LoopEnv::with_inject(32, GpuConfig::default(), None);
    let o = migration::run(&env, bytes, huge).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        o.to_device_ns > 0 && o.to_system_ns > 0 && o.cpu_fill_ns > 0,
        "{o:?}"
    );
}

#[test]
fn a_megabyte_goes_to_vram_and_back_intact() {
    round_trip(1 << 20, false);
}

#[test]
fn two_2m_pages_go_to_vram_and_back_whole_and_intact() {
    round_trip(4 << 20, true);
}

#[test]
fn sizes_that_are_not_whole_pages_are_refused() {
    let env = LoopEnv::with_inject(32, GpuConfig::default(), None);
    let e = migration::run(&env, 4096 + 8, false).expect_err("a partial page");
    assert!(e.contains("multiple of 4 KiB"), "{e}");
    let e = migration::run(&env, 1 << 20, true).expect_err("half a 2 MiB page");
    assert!(e.contains("multiple of 2048 KiB"), "{e}");
}
