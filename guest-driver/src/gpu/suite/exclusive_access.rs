//! Device-exclusive access (hmm-tests' `exclusive`, `exclusive_mprotect`):
//! with [`SvmConfig::exclusive_atomics`] a GPU atomic on system memory
//! takes the pages from the CPU (`make_device_exclusive`) and maps them
//! with ATOMIC; a CPU access revokes them, a device write fault does not
//! get ATOMIC.

use faultline_abi::{atomic_op, Pte, LEAF_2M, PAGE_SIZE};

use super::helpers::*;
use super::{Needs, Pattern, Prot, SvmEnv, TestResult};
use crate::gpu::{Channel, Command, GpuError, Platform, SvmConfig};

/// Pages of each test's buffer (one fault-around window).
pub(super) const PAGES: u64 = 4;

pub(super) fn exclusive_cfg() -> SvmConfig {
    SvmConfig {
        exclusive_atomics: true,
        ..SvmConfig::default()
    }
}

/// A GPU `ATOMIC` add of `v` on the u64 at `va`: the old value.
pub(super) fn atomic_add<P: Platform>(c: &Channel<P>, va: u64, v: u64) -> Result<u64, GpuError> {
    c.run(&Command::Atomic {
        va,
        op: atomic_op::ADD,
        wide: true,
        operand: v,
        compare: 0,
    })
}

/// Page `i`'s words start at `BASE + i`.
pub(super) const BASE: u64 = 100;

/// A GPU add of 1 on the first word of each of the `PAGES` pages from
/// `va`, which must have held `BASE + i + added` (page `i`).
pub(super) fn gpu_add_each<P: Platform>(
    chan: &Channel<P>,
    va: u64,
    added: u64,
    what: &str,
) -> TestResult {
    for i in 0..PAGES {
        let old = ok(atomic_add(chan, va + i * PAGE_SIZE, 1), what)?;
        let want = BASE + i + added;
        ensure!(old == want, "{what}, page {i}: old {old}, want {want}");
    }
    Ok(())
}

/// CPU loads of the `PAGES` pages from `va`: page `i`'s first word holds
/// `BASE + i + first`, the others `BASE + i + rest`.
pub(super) fn check_words<E: SvmEnv>(
    env: &E,
    p: &E::Process,
    va: u64,
    first: u64,
    rest: u64,
) -> TestResult {
    for i in 0..PAGES {
        let a = va + i * PAGE_SIZE;
        let (w, want) = (read_u64(env, p, a)?, BASE + i + first);
        ensure!(w == want, "page {i} word 0: {w}, want {want}");
        cpu_check(
            env,
            p,
            a + 8,
            PAGE_SIZE - 8,
            Pattern::constant(BASE + i + rest),
        )?;
    }
    Ok(())
}

/// A counter moved by `want` between two snapshots.
pub(super) fn moved(what: &str, before: u64, after: u64, want: u64) -> TestResult {
    ensure!(
        after - before == want,
        "{what}: {}, want {want}",
        after - before
    );
    Ok(())
}

/// GPU atomics under exclusive access, a CPU read revoking one page, the
/// CPU incrementing every word (revoking the rest), then GPU atomics
/// again, re-faulting and re-granting: every total exact; an ordinary GPU
/// write mapped without ATOMIC, an atomic on a 2 MiB page mapped without
/// exclusive access.
pub(super) mod exclusive {
    use super::*;

    /// Nothing beyond the defaults.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let len = PAGES * PAGE_SIZE;
        let (p, va) = spawn_mapped(env, len)?;
        let plain = mmap_rw(env, &p, len, "mmap plain")?;
        let huge = ok(env.mmap(&p, 0, LEAF_2M, Prot::RW, true), "mmap huge")?;
        cpu_fill(env, &p, va, len, Pattern::page_index(BASE))?;
        bound_with(env, p, exclusive_cfg(), |p, svm, chan| {
            let c0 = counters(env);
            ok(fill(chan, plain, len, PAT), "fill")?;
            let l = svm.device_lookup(plain);
            ensure!(
                l.is_some_and(|l| l.perms.contains(Pte::WRITE) && !l.perms.contains(Pte::ATOMIC)),
                "a write fault mapped {l:?} (want WRITE without ATOMIC)"
            );
            gpu_add_each(chan, va, 0, "GPU atomic")?;
            gpu_add_each(chan, va, 1, "second GPU atomic")?;
            let c1 = counters(env);
            moved("grants", c0.exclusive_grants, c1.exclusive_grants, PAGES)?;
            for i in 0..PAGES {
                let l = svm.device_lookup(va + i * PAGE_SIZE);
                ensure!(
                    l.is_some_and(|l| l.perms.contains(Pte::ATOMIC)),
                    "page {i} held exclusive: device {l:?}"
                );
            }
            // A CPU read of page 0 revokes that page alone.
            let w = read_u64(env, p, va)?;
            ensure!(w == BASE + 2, "CPU read {w} after two GPU adds");
            let revoked = counters(env).exclusive_revocations;
            moved(
                "revocations by one CPU read",
                c1.exclusive_revocations,
                revoked,
                1,
            )?;
            ensure!(
                svm.device_lookup(va).is_none(),
                "page 0 still mapped on the device after the revoke"
            );
            ensure!(
                svm.device_lookup(va + PAGE_SIZE)
                    .is_some_and(|l| l.perms.contains(Pte::ATOMIC)),
                "page 1 lost its ATOMIC leaf to page 0's revoke"
            );
            // The CPU increments every word.
            check_words(env, p, va, 2, 0)?;
            for i in 0..PAGES {
                let a = va + i * PAGE_SIZE;
                write_u64(env, p, a, BASE + i + 3)?;
                let rest = Pattern::constant(BASE + i + 1);
                cpu_fill(env, p, a + 8, PAGE_SIZE - 8, rest)?;
            }
            let c3 = counters(env);
            let (before, after) = (c1.exclusive_revocations, c3.exclusive_revocations);
            moved("revocations by the CPU's increments", before, after, PAGES)?;
            // Further GPU atomics fault again and are granted again.
            gpu_add_each(chan, va, 3, "GPU atomic after the CPU")?;
            let regranted = counters(env).exclusive_grants;
            moved("re-grants", c3.exclusive_grants, regranted, PAGES)?;
            check_words(env, p, va, 4, 1)?;
            // 2 MiB pages are never exclusive: their atomics are mapped as
            // coherent ones.
            let old = ok(atomic_add(chan, huge + 8, 1), "GPU atomic on a 2 MiB page")?;
            ensure!(old == 0, "2 MiB page word {old}");
            moved(
                "grants for a 2 MiB page",
                regranted,
                counters(env).exclusive_grants,
                0,
            )?;
            Ok(())
        })
    }
}

/// mprotect to read-only revokes the exclusive hold (the device keeps no
/// ATOMIC leaf); the next GPU atomic faults and is refused; the data is
/// what the GPU left.
pub(super) mod exclusive_mprotect {
    use super::*;

    /// Nothing beyond the defaults.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let len = PAGES * PAGE_SIZE;
        let (p, va) = spawn_mapped(env, len)?;
        cpu_fill(env, &p, va, len, Pattern::page_index(BASE))?;
        bound_with(env, p, exclusive_cfg(), |p, svm, chan| {
            let c0 = counters(env);
            let old = ok(atomic_add(chan, va, 5), "GPU atomic")?;
            ensure!(old == BASE, "old {old}");
            ensure!(
                counters(env).exclusive_grants > c0.exclusive_grants,
                "no exclusive grant"
            );
            ok(env.mprotect(p, va, len, Prot::READ), "mprotect RO")?;
            for i in 0..PAGES {
                let l = svm.device_lookup(va + i * PAGE_SIZE);
                ensure!(
                    l.is_none_or(|l| !l.perms.intersects(Pte::WRITE | Pte::ATOMIC)),
                    "page {i} after mprotect RO: device {l:?}"
                );
            }
            for i in 0..PAGES {
                let r = atomic_add(chan, va + i * PAGE_SIZE, 1);
                ensure!(cancelled(r), "GPU atomic on read-only page {i}: {r:?}");
            }
            let w = read_u64(env, p, va)?;
            ensure!(w == BASE + 5, "page 0 holds {w}");
            cpu_check(env, p, va + 8, PAGE_SIZE - 8, Pattern::constant(BASE))?;
            cpu_check(
                env,
                p,
                va + PAGE_SIZE,
                len - PAGE_SIZE,
                Pattern::page_index(BASE + 1),
            )
        })
    }
}
