//! Invalidation and teardown: munmap reaches every mirror, freed frames are
//! unreachable from the device, process exit releases the context (and
//! waits for registered ranges), a dead address space cannot be mirrored.

use alloc::vec::Vec;

use faultline_abi::PAGE_SIZE;

use super::helpers::*;
use super::{Needs, Pattern, SvmEnv, TestResult};
use crate::errno::Errno;
use crate::gpu::{GpuError, SvmConfig, SvmContext};
use crate::hmm::{range_register, range_unregister, HmmRange};
use crate::mm::Mm;

/// Two contexts mirror one process; an munmap invalidates both.
pub(super) mod double_map {
    use super::*;

    /// Nothing beyond the defaults.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let len = 64 << 10;
        let (p, a) = spawn_mapped(env, len)?;
        let b = mmap_rw(env, &p, len, "mmap")?;
        let (svm1, ch1) = bind(env, &p)?;
        let (svm2, ch2) = bind(env, &p)?;
        ok(fill(&ch1, a, len, PAT), "fill via context 1")?;
        ok(copy(&ch2, b, a, len), "copy via context 2")?;
        cpu_check(env, &p, b, len, Pattern::constant(PAT))?;
        ensure!(
            svm1.device_lookup(a).is_some() && svm2.device_lookup(a).is_some(),
            "both contexts should map the buffer"
        );
        let before = counters(env).invalidations;
        ok(env.munmap(&p, a, len), "munmap")?;
        ensure!(
            counters(env).invalidations >= before + 2,
            "both mirrors should be invalidated"
        );
        for (i, s) in [&svm1, &svm2].into_iter().enumerate() {
            for off in (0..len).step_by(PAGE_SIZE as usize) {
                ensure!(
                    s.device_lookup(a + off).is_none(),
                    "context {i} still maps +{off:#x}"
                );
            }
        }
        ensure!(cancelled(fill(&ch1, a, len, 1)), "fill of unmapped via 1");
        ensure!(cancelled(copy(&ch2, b, a, len)), "copy of unmapped via 2");
        drop((ch1, ch2));
        env.exit(p);
        Ok(())
    }
}

/// A freed frame reused by another mapping is never reached through the
/// old device mapping.
pub(super) mod munmap_reuse {
    use super::*;

    /// Nothing beyond the defaults.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let len = 16 * PAGE_SIZE;
        let (p, old) = spawn_mapped(env, len)?;
        bound(env, p, |p, svm, chan| {
            ok(fill(chan, old, len, PAT), "fill")?;
            let frames: Vec<u64> = (0..16)
                .filter_map(|i| env.cpu_phys(p, old + i * PAGE_SIZE))
                .collect();
            ensure!(frames.len() == 16, "CPU should map every page");
            ok(env.munmap(p, old, len), "munmap")?;
            // New mappings, written by the CPU: likely to reuse the frames.
            let new = mmap_rw(env, p, 4 * len, "mmap new")?;
            ensure!(
                new >= old + len || new + 4 * len <= old,
                "the new mapping {new:#x} reuses the unmapped addresses {old:#x}"
            );
            cpu_fill(env, p, new, 4 * len, Pattern::constant(0x7777))?;
            let reused = (0..4 * len / PAGE_SIZE)
                .filter(|i| {
                    env.cpu_phys(p, new + i * PAGE_SIZE)
                        .is_some_and(|pa| frames.contains(&pa))
                })
                .count();
            log::info!("munmap_reuse: {reused} of 16 frames reused");
            ensure!(
                svm.device_lookup(old).is_none(),
                "old device mapping survived munmap"
            );
            ensure!(
                cancelled(fill(chan, old, len, 1)),
                "fill through the old mapping"
            );
            cpu_check(env, p, new, 4 * len, Pattern::constant(0x7777))
        })
    }
}

/// Process exit with a bound context: release runs, the context is torn
/// down, the process's frames are freed.
pub(super) mod release_with_context {
    use super::*;

    /// Nothing beyond the defaults.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let len = 256 << 10;
        let (p, va) = spawn_mapped(env, len)?;
        let (svm, chan) = bind(env, &p)?;
        ok(fill(&chan, va, len, PAT), "fill")?;
        let before = env.free_frames();
        ensure!(!svm.is_released(), "released too early");
        env.exit(p);
        ensure!(svm.is_released(), "release did not run at exit");
        ensure!(
            svm.device_leaves() == 0,
            "{} device leaves left",
            svm.device_leaves()
        );
        ensure!(
            env.free_frames() >= before + len / PAGE_SIZE,
            "process frames not freed"
        );
        ensure!(cancelled(fill(&chan, va, len, 1)), "command after release");
        Ok(())
    }
}

/// Teardown waits until a registered range unregisters: a range holds an mm
/// users reference, so release cannot run while it exists.
pub(super) mod release_waits_for_range {
    use super::*;

    /// Nothing beyond the defaults.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let len = 64 << 10;
        let (p, va) = spawn_mapped(env, len)?;
        write_u64(env, &p, va, 5)?;
        let (svm, chan) = bind(env, &p)?;
        let mut range: HmmRange<E::M> = HmmRange::new([1, 2, 4], [8, 0, 16], 12);
        ok(
            range_register(&mut range, svm.mirror(), va, va + len, 12),
            "range_register",
        )?;
        let mm = env.mm(&p);
        env.exit(p);
        ensure!(
            !svm.is_released(),
            "release ran while a range was registered"
        );
        ensure!(mm.core().users() == 1, "users: {}", mm.core().users());
        range_unregister(&mut range);
        ensure!(
            svm.is_released(),
            "release did not run after range_unregister"
        );
        ensure!(mm.core().users() == 0, "users: {}", mm.core().users());
        drop(chan);
        Ok(())
    }
}

/// Binding a context to an address space that already died: EFAULT.
pub(super) mod register_dead_mm {
    use super::*;

    /// Nothing beyond the defaults.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let p = env.spawn()?;
        let mm = env.mm(&p);
        env.exit(p);
        let free = env.free_frames();
        let r = SvmContext::new(env.gpu(), &mm, SvmConfig::default());
        ensure!(
            matches!(r, Err(GpuError::Mm(Errno::EFAULT))),
            "register on a dead mm: {:?}",
            r.as_ref().err()
        );
        drop(r);
        ensure!(
            env.free_frames() == free,
            "failed registration leaked frames"
        );
        Ok(())
    }
}
