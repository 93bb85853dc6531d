//! The SVM suite of issue 7 in the guest: the 22 tests of
//! `faultline_driver::gpu::suite`, each under its own name, each on a
//! freshly probed driver (the device is reset per test, so one test's
//! leftovers cannot help or hurt the next), with real processes and this
//! CPU's accesses through their page tables (`crate::svm_env`). After each
//! test the driver's counters are printed on one line.
//!
//! No GPU: the `gpu=` rule of the other GPU tests (fail by default, SKIPPED
//! with `gpu=optional`).

use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;

use faultline_driver::gpu::suite::{self, SvmEnv};
use faultline_driver::gpu::{Gpu, GpuConfig};

use super::Test;
use crate::gpu;
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

/// The driver configuration a test wants.
fn config(name: &str) -> GpuConfig {
    let base = GpuConfig {
        // A lost interrupt shows up as a timeout, not a hang.
        timeout_ns: 10_000_000_000,
        ..GpuConfig::default()
    };
    match name {
        // The suite sizes its kernel to 4x the buffer: a tiny buffer must
        // overflow and lose nothing.
        "fault_buffer_overflow" => GpuConfig {
            fault_entries: 16,
            ..base
        },
        // 65,536 first-touch faults serviced by emulated supervisor code.
        "large_first_touch" => GpuConfig {
            timeout_ns: 120_000_000_000,
            ..base
        },
        _ => base,
    }
}

/// Every suite test is registered here, and under its own name.
fn check_registered() -> Result<(), String> {
    let suite = suite::tests::<FwEnv>();
    for (n, _) in &suite {
        if !TESTS.iter().any(|t| t.name == *n) {
            return Err(format!("suite test {n} is not registered in the firmware"));
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

fn run_named(name: &str) -> Result<(), String> {
    check_registered()?;
    let g = super::gpu::device()?;
    let (_, test) = suite::tests::<FwEnv>()
        .into_iter()
        .find(|(n, _)| *n == name)
        .ok_or_else(|| format!("no suite test {name}"))?;
    let platform = Arc::new(g.platform.clone());
    let driver = Gpu::<gpu::FwPlatform>::probe(platform, config(name))
        .map_err(|e| format!("driver probe: {e}"))?;
    let env = FwEnv::new(driver);
    let r = test(&env);
    println!("svm {name}: {}", env.gpu().counters().snapshot());
    r
}
