//! The SVM suite (`faultline_driver::gpu::suite`) in the host loopback: the
//! real driver, the real device model on its worker thread, and simulated
//! processes whose frames live in the device's guest memory. One `#[test]`
//! per suite test, each on a fresh device.

mod common;

use common::env::LoopEnv;
use faultline_driver::gpu::suite::{self, SvmEnv};
use faultline_driver::gpu::GpuConfig;

fn env_for(name: &str) -> LoopEnv {
    match name {
        // The GPU touches 256 MiB: room for it plus page tables.
        "large_first_touch" => LoopEnv::new(320, GpuConfig::default()),
        // A tiny fault buffer.
        "fault_buffer_overflow" => LoopEnv::new(
            64,
            GpuConfig {
                fault_entries: 16,
                ..GpuConfig::default()
            },
        ),
        _ => LoopEnv::new(64, GpuConfig::default()),
    }
}

fn run_one(name: &str) {
    let env = env_for(name);
    let (_, t) = suite::tests::<LoopEnv>()
        .into_iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no suite test {name}"));
    let r = t(&env);
    eprintln!("{name}: {}", env.gpu().counters().snapshot());
    if let Err(e) = r {
        panic!("{name}: {e}");
    }
}

macro_rules! loopback {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                run_one(stringify!($name));
            }
        )*

        #[test]
        fn every_suite_test_runs_in_loopback() {
            let here = [$(stringify!($name)),*];
            for (name, _) in suite::tests::<LoopEnv>() {
                assert!(here.contains(&name), "{name} is not run in loopback");
            }
            assert_eq!(here.len(), suite::tests::<LoopEnv>().len());
        }
    };
}

faultline_driver::svm_suite!(loopback);
