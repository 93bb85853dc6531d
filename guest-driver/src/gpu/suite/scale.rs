//! Scale: more faults in flight than the fault buffer holds, and a large
//! first touch.

use alloc::format;

use faultline_abi::{isa, Counter, PAGE_SIZE};

use super::helpers::*;
use super::{Needs, Pattern, SvmEnv, TestResult};
use crate::gpu::{Platform, SvmConfig};

/// A kernel touching many more pages at once than the fault buffer holds:
/// every fault is serviced, nothing lost.
pub(super) mod fault_buffer_overflow {
    use super::*;

    /// A fault buffer far smaller than the pages the kernel touches at once
    /// (the kernel is sized to 4× the buffer, 512..4096 pages): it must
    /// overflow, and lose nothing. One LAUNCH services up to 4,096
    /// single-page faults through a 16-entry buffer, which took over the
    /// default 10 s on a loaded two-core host; the wait is a hang detector.
    pub const NEEDS: Needs = Needs {
        fault_entries: Some(16),
        timeout_ns: Some(60_000_000_000),
        ..Needs::DEFAULT
    };

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let entries = u64::from(env.gpu().config().fault_entries);
        // 64 warps of 8 threads are resident at once: up to 512 faults in flight.
        let pages = (4 * entries).clamp(512, 4096);
        let (p, data) = spawn_mapped(env, pages * PAGE_SIZE)?;
        let code = mmap_rw(env, &p, PAGE_SIZE, "mmap code")?;
        // Thread t stores t + 1 at data + t * 4096.
        let k = [
            isa::encode(isa::S2R, 5, 0, 0, isa::sreg::GTID),
            isa::encode(isa::SHLI, 6, 5, 0, 12),
            isa::encode(isa::ADD, 6, 6, 1, 0),
            isa::encode(isa::ADDI, 7, 5, 0, 1),
            isa::encode(isa::ST64, 0, 6, 7, 0),
            isa::encode(isa::EXIT, 0, 0, 0, 0),
        ];
        write_code(env, &p, code, &k)?;
        // Fault-around 4 KiB so every page is its own fault.
        let cfg = SvmConfig {
            fault_around: PAGE_SIZE,
            ..SvmConfig::default()
        };
        bound_with(env, p, cfg, |p, _, chan| {
            let overflows = env.gpu().device_counter(Counter::FaultOverflows as u32);
            let grid = (pages / 64) as u32;
            ok(
                chan.run(&launch(code, &k, grid, 64, [data, 0, 0, 0])),
                "launch",
            )?;
            let overflowed = env.gpu().device_counter(Counter::FaultOverflows as u32) - overflows;
            ensure!(
                overflowed > 0,
                "the fault buffer ({entries} entries) never overflowed"
            );
            // Thread t's word, and nothing else in its page.
            for t in 0..pages {
                let page = data + t * PAGE_SIZE;
                cpu_check(env, p, page, 8, Pattern::constant(t + 1))
                    .map_err(|e| format!("thread {t}'s word: {e}"))?;
                cpu_check(env, p, page + 8, PAGE_SIZE - 8, Pattern::constant(0))
                    .map_err(|e| format!("thread {t}'s page: {e}"))?;
            }
            Ok(())
        })
    }
}

/// The GPU touches a large range the CPU never touched.
pub(super) mod large_first_touch {
    use super::*;

    /// Room for [`SvmEnv::large_bytes`] (256 MiB) of process frames plus
    /// page tables, and time for 65,536 first-touch faults where the
    /// driver runs emulated (~90 s on an idle nested-KVM host; the wait is
    /// a hang detector, so it leaves room for a loaded one).
    pub const NEEDS: Needs = Needs {
        memory_mib: 320,
        timeout_ns: Some(300_000_000_000),
        ..Needs::DEFAULT
    };

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let len = env.large_bytes();
        let (p, va) = spawn_mapped(env, len)?;
        bound(env, p, |p, svm, chan| {
            let before = counters(env);
            let t0 = env.gpu().platform().now_ns();
            ok(fill(chan, va, len, PAT), "fill")?;
            let ns = env.gpu().platform().now_ns() - t0;
            let after = counters(env);
            let pages = len / PAGE_SIZE;
            ensure!(
                after.pages_mapped - before.pages_mapped >= pages,
                "mapped {} of {pages} pages",
                after.pages_mapped - before.pages_mapped
            );
            ensure!(
                svm.device_leaves() == pages,
                "device leaves {}",
                svm.device_leaves()
            );
            cpu_check(env, p, va, len, Pattern::constant(PAT))?;
            log::info!(
                "large_first_touch: {} MiB in {} ms, {} windows",
                len >> 20,
                ns / 1_000_000,
                after.windows - before.windows
            );
            Ok(())
        })
    }
}
