//! Races: the CPU changes the address space, or touches the same memory,
//! while the GPU works on it.

use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use core::sync::atomic::{AtomicU64, Ordering};

use faultline_abi::{atomic_op, isa, Status, PAGE_SIZE};

use super::helpers::*;
use super::{Needs, Pattern, Prot, Segv, SvmEnv, TestResult};
use crate::gpu::{Command, GpuError};
use crate::mm::{
    mmu_notifier_invalidate_range_end, mmu_notifier_invalidate_range_start, MmuNotifierRange,
    MmuNotifyEvent,
};

/// What a freed frame is filled with while a test watches frees.
const CANARY: u64 = 0xcafe_f00d_dead_beef;

/// munmap half a buffer while the GPU streams over it: the command either
/// completes or fails cleanly, and no device write lands after the munmap
/// (a canary written into every freed frame survives).
pub(super) mod anon_teardown {
    use super::*;

    /// Nothing beyond the defaults.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let len = 4 << 20;
        let (p, va) = spawn_mapped(env, len)?;
        bound(env, p, |p, svm, chan| {
            let mut outcomes = [0u32; 2];
            for round in 0..4u64 {
                // Map everything on the device first so the second FILL streams
                // without faults while the munmap runs.
                ok(fill(chan, va, len, round), "warm fill")?;
                env.track_freed(Some(CANARY));
                let t = ok(
                    chan.submit(&Command::Fill {
                        dst: va,
                        len,
                        pattern: PAT,
                    }),
                    "submit",
                )?;
                let half = va + len / 2;
                let r1 = env.munmap(p, half, len / 2);
                let r = chan.wait(t);
                let freed = env.take_freed();
                ok(r1, "munmap")?;
                match r {
                    Ok(_) => outcomes[0] += 1,
                    Err(GpuError::Command(Status::Cancelled)) => outcomes[1] += 1,
                    Err(e) => return Err(format!("round {round}: fill ended with {e}")),
                }
                ensure!(
                    freed.len() as u64 == len / 2 / PAGE_SIZE,
                    "freed {} frames",
                    freed.len()
                );
                for pa in &freed {
                    let mut b = [0u8; 8];
                    env.read_phys(*pa, &mut b);
                    let v = u64::from_le_bytes(b);
                    env.read_phys(*pa + PAGE_SIZE - 8, &mut b);
                    let w = u64::from_le_bytes(b);
                    ensure!(
                        v == CANARY && w == CANARY,
                        "round {round}: freed frame {pa:#x} written after munmap ({v:#x}, {w:#x})"
                    );
                }
                env.track_freed(None);
                ensure!(
                    env.read(p, half, &mut [0; 8]) == Err(Segv),
                    "unmapped half still readable"
                );
                ensure!(
                    svm.device_lookup(half).is_none(),
                    "device still maps the unmapped half"
                );
                // The valid half holds the second pattern up to where the
                // FILL stopped (all of it if it completed) and the first
                // after that, never junk.
                let stop = match env.check_pattern(p, va, len / 2, Pattern::constant(PAT)) {
                    Ok(None) => half,
                    Ok(Some(m)) => m.addr,
                    Err(_) => {
                        return Err(format!(
                            "round {round}: CPU check of the valid half faulted"
                        ))
                    }
                };
                cpu_check(env, p, stop, half - stop, Pattern::constant(round))
                    .map_err(|e| format!("round {round}: valid half after the FILL's end: {e}"))?;
                ok(env.mmap(p, half, len / 2, Prot::RW, false), "remap")?;
            }
            // Both outcomes are legal; which one happened depends on timing.
            log::info!(
                "anon_teardown: {} completed, {} cancelled",
                outcomes[0],
                outcomes[1]
            );
            Ok(())
        })
    }
}

/// An invalidation between `range_fault` and the check forces a retry; the
/// final device state matches the CPU's.
pub(super) mod invalidate_during_fault {
    use super::*;

    /// Nothing beyond the defaults.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let len = 64 << 10;
        let (p, va) = spawn_mapped(env, len)?;
        let pat = Pattern::page_index(0x4000);
        cpu_fill(env, &p, va, len, pat)?;
        let dst = mmap_rw(env, &p, len, "mmap dst")?;
        bound(env, p, |p, svm, chan| {
            let mm = env.mm(p);
            let shots = Arc::new(AtomicU64::new(0));
            let s2 = shots.clone();
            svm.set_check_hook(Some(Arc::new(move |start, end| {
                // Once per window of the source: a full invalidation cycle that
                // starts and ends before the driver's check.
                if start < va + len && va < end && s2.fetch_add(1, Ordering::AcqRel) < 4 {
                    let r = MmuNotifierRange {
                        start,
                        end,
                        event: MmuNotifyEvent::Clear,
                        blockable: true,
                    };
                    if mmu_notifier_invalidate_range_start(&*mm, &r).is_ok() {
                        mmu_notifier_invalidate_range_end(&*mm, &r);
                    }
                }
            })));
            let before = counters(env);
            ok(copy(chan, dst, va, len), "copy")?;
            svm.set_check_hook(None);
            let after = counters(env);
            ensure!(shots.load(Ordering::Acquire) >= 1, "hook never ran");
            ensure!(after.retries > before.retries, "no retry counted");
            cpu_check(env, p, dst, len, pat)?;
            for i in 0..len / PAGE_SIZE {
                let a = va + i * PAGE_SIZE;
                let dev = svm.device_lookup(a).map(|l| l.phys);
                let cpu = env.cpu_phys(p, a);
                ensure!(
                    dev.is_none() || dev == cpu,
                    "page {i}: device {dev:?} CPU {cpu:?}"
                );
            }
            Ok(())
        })
    }
}

/// GPU atomics (kernel and ATOMIC commands) and CPU atomics on one counter.
pub(super) mod atomic_counter {
    use super::*;

    /// Nothing beyond the defaults.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let (p, buf) = spawn_mapped(env, 3 * PAGE_SIZE)?;
        let (counter, code, flag) = (buf, buf + PAGE_SIZE, buf + 2 * PAGE_SIZE);
        let iters = 200i32;
        let k = [
            // r1 = counter, r2 = 1, r3 = loop count
            isa::encode(isa::MOVI, 2, 0, 0, 1),
            isa::encode(isa::MOVI, 3, 0, 0, iters),
            isa::encode(isa::ATOM_ADD64, 4, 1, 2, 0),
            isa::encode(isa::ADDI, 3, 3, 0, -1),
            isa::encode(isa::BNE, 0, 3, 0, -2),
            isa::encode(isa::EXIT, 0, 0, 0, 0),
        ];
        write_code(env, &p, code, &k)?;
        bound(env, p, |p, _, chan| {
            // Map the counter on the device first, so the kernel and the CPU race.
            let old = ok(
                chan.run(&Command::Atomic {
                    va: counter,
                    op: atomic_op::ADD,
                    wide: true,
                    operand: 5,
                    compare: 0,
                }),
                "atomic command",
            )?;
            ensure!(old == 0, "counter started at {old}");
            let threads = 64u64;
            let t = ok(
                chan.submit(&launch(code, &k, 2, 32, [counter, 0, 0, 0])),
                "launch",
            )?;
            // Released after the kernel (a channel runs its commands in
            // order): the CPU waits for it spinning on the flag, as a user
            // program waits for a GPU fence.
            let sem = ok(
                chan.submit(&Command::SemaphoreRelease {
                    va: flag,
                    wide: true,
                    value: 1,
                }),
                "semaphore",
            )?;
            let cpu_adds = 1000u64;
            env.atomic_add_repeat(p, counter, 1, cpu_adds)
                .map_err(|_| String::from("CPU atomic faulted"))?;
            let seen = env
                .wait_u64(p, flag, 1)
                .map_err(|_| String::from("CPU spin on the semaphore faulted"))?;
            ensure!(seen, "the semaphore was never released");
            ok(chan.wait(t), "kernel")?;
            ok(chan.wait(sem), "semaphore")?;
            let total = read_u64(env, p, counter)?;
            let expect = 5 + threads * iters as u64 + cpu_adds;
            ensure!(total == expect, "counter {total}, expected {expect}");
            Ok(())
        })
    }
}

/// Faults on pages the device already maps, as a busy GPU reports them
/// (the host's `--gpu-inject spurious=P`): the driver finds nothing to do,
/// replays, and the commands complete with the right data. The test reads
/// INJECT_ACTIVE to know what to expect: with spurious faults injected
/// some must have been raised and none cancelled; without, a fully mapped
/// range must raise no fault at all.
pub(super) mod mapped_page_faults {
    use super::*;
    use faultline_abi::{Counter, InjectKnobs};

    /// Nothing beyond the defaults.
    pub const NEEDS: Needs = Needs::DEFAULT;

    /// FILL rounds over the mapped range: 64 × 256 translations, so even
    /// `spurious=0.001` raises some (expected 16; none with odds e^-16).
    const ROUNDS: u64 = 64;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let len = 1 << 20;
        let (p, va) = spawn_mapped(env, len)?;
        let knobs = env.gpu().inject_active();
        let raised = || env.gpu().device_counter(Counter::FaultsRaised as u32);
        bound(env, p, |p, _, chan| {
            ok(fill(chan, va, len, PAT), "first fill")?;
            let (f0, c0) = (raised(), counters(env));
            for round in 0..ROUNDS {
                ok(fill(chan, va, len, PAT + round), "fill of the mapped range")?;
            }
            let (faults, c) = (raised().wrapping_sub(f0), counters(env));
            cpu_check(env, p, va, len, Pattern::constant(PAT + ROUNDS - 1))?;
            ensure!(
                c.cancels == c0.cancels,
                "{} faults on mapped pages cancelled",
                c.cancels - c0.cancels
            );
            if knobs.contains(InjectKnobs::SPURIOUS) {
                ensure!(
                    faults > 0,
                    "INJECT_ACTIVE says spurious faults, but none was raised in {ROUNDS} rounds"
                );
            } else {
                ensure!(
                    faults == 0,
                    "{faults} faults raised on a range the device fully maps (no spurious injection)"
                );
            }
            Ok(())
        })
    }
}
