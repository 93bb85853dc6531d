//! Protection: the device never gets more access than the CPU mapping
//! allows, before or after an mprotect.

use faultline_abi::{Pte, PAGE_SIZE};

use super::helpers::*;
use super::{Needs, Pattern, Prot, Segv, SvmEnv, TestResult};

/// A PROT_NONE source: the command fails, the destination is untouched.
pub(super) mod anon_read_prot {
    use super::*;

    /// Nothing beyond the defaults.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let len = 64 << 10;
        let (p, src) = spawn_mapped(env, len)?;
        let dst = mmap_rw(env, &p, len, "mmap dst")?;
        cpu_fill(env, &p, src, len, Pattern::constant(7))?;
        cpu_fill(env, &p, dst, len, Pattern::constant(0xdead))?;
        ok(env.mprotect(&p, src, len, Prot::NONE), "mprotect")?;
        bound(env, p, |p, _, chan| {
            let r = copy(chan, dst, src, len);
            ensure!(cancelled(r), "copy from PROT_NONE: {r:?}");
            cpu_check(env, p, dst, len, Pattern::constant(0xdead))?;
            ensure!(
                env.read(p, src, &mut [0; 8]) == Err(Segv),
                "CPU read of PROT_NONE"
            );
            Ok(())
        })
    }
}

/// Read-only: the GPU write fails and memory is unchanged; after mprotect
/// RW it succeeds.
pub(super) mod anon_write_prot {
    use super::*;

    /// Nothing beyond the defaults.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let len = 64 << 10;
        let (p, va) = spawn_mapped(env, len)?;
        let pat = Pattern::page_index(0);
        cpu_fill(env, &p, va, len, pat)?;
        ok(env.mprotect(&p, va, len, Prot::READ), "mprotect RO")?;
        bound(env, p, |p, svm, chan| {
            let r = fill(chan, va, len, PAT);
            ensure!(cancelled(r), "fill of read-only memory: {r:?}");
            cpu_check(env, p, va, len, pat)?;
            ensure!(
                svm.device_lookup(va)
                    .is_none_or(|l| !l.perms.contains(Pte::WRITE)),
                "device has a writable leaf for read-only memory"
            );
            ok(env.mprotect(p, va, len, Prot::RW), "mprotect RW")?;
            ok(fill(chan, va, len, PAT), "fill after mprotect RW")?;
            cpu_check(env, p, va, len, Pattern::constant(PAT))
        })
    }
}

/// RW → RO while mapped on the device: a write-protection, so the device
/// keeps every leaf, read-only and on the same frame, and its TLB forgets
/// the writable ones: the next device write faults and fails; reads still
/// work.
pub(super) mod mprotect_downgrade {
    use super::*;

    /// Nothing beyond the defaults.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let len = 64 << 10;
        let (p, va) = spawn_mapped(env, len)?;
        let dst = mmap_rw(env, &p, len, "mmap dst")?;
        bound(env, p, |p, svm, chan| {
            ok(fill(chan, va, len, PAT), "fill")?;
            ensure!(
                svm.device_lookup(va)
                    .is_some_and(|l| l.perms.contains(Pte::WRITE)),
                "device should map writable"
            );
            ok(env.mprotect(p, va, len, Prot::READ), "mprotect")?;
            for i in 0..len / PAGE_SIZE {
                let a = va + i * PAGE_SIZE;
                let leaf = svm.device_lookup(a);
                let cpu = env.cpu_phys(p, a);
                ensure!(
                    leaf.is_some_and(|l| !l.perms.intersects(Pte::WRITE | Pte::ATOMIC)
                        && Some(l.phys) == cpu),
                    "page {i} after mprotect: device {leaf:?}, CPU {cpu:?} (want read-only, same frame)"
                );
            }
            // Through a stale writable TLB entry this write would succeed.
            ensure!(cancelled(fill(chan, va, len, 1)), "write after downgrade");
            cpu_check(env, p, va, len, Pattern::constant(PAT))?;
            ok(copy(chan, dst, va, len), "read after downgrade")?;
            cpu_check(env, p, dst, len, Pattern::constant(PAT))
        })
    }
}

/// A read fault and a write fault in one fault-around window of a read-only
/// mapping, serviced in one batch: the read completes (its page mapped
/// read-only on the device), only the write is cancelled. Both orders of
/// the two pages in the window.
pub(super) mod mixed_access_ro_window {
    use super::*;
    use crate::gpu::{Channel, Command, Platform, Prefetch, SvmConfig};
    use faultline_abi::{Counter, PAGE_SIZE};

    /// Nothing beyond the defaults.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let window = SvmConfig::default().fault_around;
        // One window per round, aligned so each round's two pages share it.
        let len = 2 * window;
        let p = env.spawn()?;
        let map = mmap_rw(env, &p, len + window, "mmap")?;
        let ro = (map + window - 1) & !(window - 1);
        let pat = Pattern::page_index(0x7000);
        cpu_fill(env, &p, ro, len, pat)?;
        ok(
            env.mprotect(&p, map, len + window, Prot::READ),
            "mprotect RO",
        )?;
        let dst = mmap_rw(env, &p, 2 * PAGE_SIZE, "mmap dst")?;
        cpu_fill(env, &p, dst, 2 * PAGE_SIZE, Pattern::constant(0xdead))?;
        // The test is about a fault-around window: pinned, whatever the
        // GPU's prefetch policy.
        let cfg = SvmConfig {
            prefetch: Some(Prefetch::FaultAround),
            ..SvmConfig::default()
        };
        bound_with(env, p, cfg, |p, svm, reader| {
            let writer = ok(Channel::open(svm.context()), "second channel")?;
            // (page read, page written) inside round r's window.
            let rounds = [(0u64, 1u64), (window / PAGE_SIZE + 1, window / PAGE_SIZE)];
            for (r, &(rp, wp)) in rounds.iter().enumerate() {
                let (src, wva) = (ro + rp * PAGE_SIZE, ro + wp * PAGE_SIZE);
                let out = dst + r as u64 * PAGE_SIZE;
                let raised = env.gpu().device_counter(Counter::FaultsRaised as u32);
                let tr = ok(
                    reader.submit(&Command::Copy {
                        dst: out,
                        src,
                        len: PAGE_SIZE,
                    }),
                    "submit copy",
                )?;
                let tw = ok(
                    writer.submit(&Command::Fill {
                        dst: wva,
                        len: PAGE_SIZE,
                        pattern: PAT,
                    }),
                    "submit fill",
                )?;
                // Nothing services faults until a wait: once both are in the
                // buffer, the first wait drains them as one batch.
                let deadline = env.gpu().platform().now_ns() + 10_000_000_000;
                while env.gpu().device_counter(Counter::FaultsRaised as u32) < raised + 2 {
                    ensure!(
                        env.gpu().platform().now_ns() < deadline,
                        "round {r}: the device raised {} of 2 faults",
                        env.gpu().device_counter(Counter::FaultsRaised as u32) - raised
                    );
                }
                let rr = reader.wait(tr);
                let rw = writer.wait(tw);
                ensure!(
                    rr.is_ok(),
                    "round {r}: read of page {rp} in a window with a refused write: {rr:?}"
                );
                ensure!(
                    cancelled(rw),
                    "round {r}: write to read-only page {wp}: {rw:?}"
                );
                cpu_check(
                    env,
                    p,
                    out,
                    PAGE_SIZE,
                    Pattern::constant(pat.at(rp * PAGE_SIZE)),
                )?;
                cpu_check(
                    env,
                    p,
                    wva,
                    PAGE_SIZE,
                    Pattern::constant(pat.at(wp * PAGE_SIZE)),
                )?;
                let leaf = svm.device_lookup(src);
                ensure!(
                    leaf.is_some_and(|l| !l.perms.intersects(Pte::WRITE | Pte::ATOMIC)),
                    "round {r}: device leaf of the read page: {leaf:?} (want read-only)"
                );
            }
            Ok(())
        })
    }
}
