//! The SVM suite in the guest: every test of `faultline_driver::gpu::suite`,
//! each under its own name, each on a freshly probed driver configured for
//! the test's `Needs` (the device is reset per test, so one test's
//! leftovers cannot help or hurt the next), with real processes and this
//! CPU's accesses through their page tables (`crate::svm_env`). After each
//! test the driver's counters and latencies are printed on one
//! machine-readable line, `stats <test> policy=<policy> <name>=<value> ...`
//! (`faultline_driver::gpu::StatsSnapshot`), which the VMM reads back.
//!
//! No GPU: the `gpu=` rule of the other GPU tests (fail by default, SKIPPED
//! with `gpu=optional`).

use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use core::sync::atomic::{AtomicBool, Ordering};

use faultline_driver::gpu::suite::{self, Needs, SvmEnv};
use faultline_driver::gpu::Gpu;

use super::Test;
use crate::gpu;
use crate::mm::frames;
use crate::println;
use crate::svm_env::FwEnv;

macro_rules! svm_tests {
    ($($name:ident),* $(,)?) => {
        pub const TESTS: &[Test] = &[$(Test::new(stringify!($name), $name)),*];
        $(
            fn $name() -> Result<(), String> {
                run_named(stringify!($name))
            }
        )*
    };
}

faultline_driver::svm_suite!(svm_tests);

/// Every suite test is registered here, and under its own name.
fn check_registered() -> Result<(), String> {
    let suite = suite::tests::<FwEnv>();
    for t in &suite {
        if !TESTS.iter().any(|f| f.name == t.name) {
            return Err(format!(
                "suite test {} is not registered in the firmware",
                t.name
            ));
        }
    }
    if suite.len() != TESTS.len() {
        return Err(format!(
            "{} firmware SVM tests for {} suite tests",
            TESTS.len(),
            suite.len()
        ));
    }
    Ok(())
}

/// The environment for a test: its memory checked against the free frames
/// (this VM's RAM is fixed at boot), the driver probed as it asks, under
/// the `svm=` policy if one was given.
pub(crate) fn env_for(g: &gpu::Gpu, needs: &Needs) -> Result<FwEnv, String> {
    let free_mib = (frames::stats().free * frames::FRAME_SIZE) >> 20;
    if free_mib < needs.memory_mib {
        return Err(format!(
            "needs ≥ {} MiB of guest memory, {free_mib} MiB free; boot with more --memory",
            needs.memory_mib
        ));
    }
    let platform = Arc::new(g.platform.clone());
    let mut cfg = needs.gpu_config();
    if let Some(policy) = super::params().svm {
        cfg.policy = policy;
    }
    let driver =
        Gpu::<gpu::FwPlatform>::probe(platform, cfg).map_err(|e| format!("driver probe: {e}"))?;
    Ok(FwEnv::new(driver))
}

/// [`check_registered`] passed (once per boot is enough: both lists are
/// fixed at build time, and each check costs thousands of emulated name
/// comparisons).
static REGISTERED: AtomicBool = AtomicBool::new(false);

fn run_named(name: &str) -> Result<(), String> {
    if !REGISTERED.load(Ordering::Relaxed) {
        check_registered()?;
        REGISTERED.store(true, Ordering::Relaxed);
    }
    let g = super::gpu::device()?;
    let (env, r) = suite::run(name, |needs| env_for(g, needs));
    if let Some(env) = env {
        // Read back by the VMM (vmm/src/results.rs) into --stats-json and
        // --results: only non-zero items, every console byte is a VM exit.
        println!(
            "stats {name} policy={} {}",
            env.gpu().config().policy,
            env.gpu().stats()
        );
    }
    r
}
