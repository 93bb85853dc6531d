//! The SVM suite (`faultline_driver::gpu::suite`) in the host loopback: the
//! real driver, the real device model on its worker thread, and simulated
//! processes whose frames live in the device's guest memory. One `#[test]`
//! per suite test, each on a fresh device built for the test's `Needs`
//! (guest memory, driver configuration).

mod common;

use common::env::LoopEnv;
use faultline_driver::gpu::suite::{self, SvmEnv};

fn run_one(name: &str) {
    let (env, r) = suite::run(name, |needs| {
        Ok(LoopEnv::new(needs.memory_mib, needs.gpu_config()))
    });
    if let Some(env) = env {
        eprintln!("{name}: {}", env.gpu().stats());
    }
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
            let suite = suite::tests::<LoopEnv>();
            for t in &suite {
                assert!(here.contains(&t.name), "{} is not run in loopback", t.name);
            }
            assert_eq!(here.len(), suite.len());
        }
    };
}

faultline_driver::svm_suite!(loopback);
