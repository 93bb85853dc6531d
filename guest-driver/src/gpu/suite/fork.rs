//! Fork with a mirrored mm (hmm-tests' `anon_write_child`,
//! `anon_write_child_shared`, `hmm_cow_in_device`, `exclusive_cow`): the
//! parent's context keeps working across a fork of its process. The fork
//! write-protects the parent's private pages (one `ProtectionPage` per
//! private VMA, which the driver turns into read-only device leaves), the
//! child has no mirror; the first write on either side copies a shared
//! frame (a COW break, `MmCore::cow_breaks`; in the parent a `Clear` of
//! that page), shared mappings stay shared, device memory and exclusive
//! holds come back at fork. Every test ends with the frame accounting:
//! the child's exit frees only the child's own frames (canaries), and
//! once both exited every frame is back.

use alloc::vec::Vec;

use faultline_abi::{Pte, PAGE_SIZE};

use super::dmem::{device_memory, leak_check, on_device};
use super::exclusive_access::{
    check_words, exclusive_cfg, gpu_add_each, moved, BASE, PAGES as XPAGES,
};
use super::helpers::*;
use super::{Needs, Pattern, Prot, SvmEnv, TestResult};
use crate::gpu::{CounterSnapshot, MigratePolicy};
use crate::mm::Mm;

/// Pages of each buffer.
const PAGES: u64 = 4;
const LEN: u64 = PAGES * PAGE_SIZE;
/// Held-back frames are filled with this (never a value a test writes).
const CANARY: u64 = 0xdead_c0de_f0f0_0f0f;

/// The invalidation counters by kind, as one tuple per snapshot.
fn kinds(c: &CounterSnapshot) -> [u64; 7] {
    [
        c.invalidations,
        c.invalidations_unmap,
        c.invalidations_clear,
        c.invalidations_protect_vma,
        c.invalidations_protect_page,
        c.invalidations_migrate,
        c.exclusive_revocations,
    ]
}

/// Invalidations between two snapshots, by kind: `[all, unmap, clear,
/// protect_vma, protect_page, migrate, exclusive revocations]`.
fn invalidated(before: &CounterSnapshot, after: &CounterSnapshot) -> [u64; 7] {
    let (b, a) = (kinds(before), kinds(after));
    core::array::from_fn(|i| a[i] - b[i])
}

fn expect_invalidated(
    what: &str,
    before: &CounterSnapshot,
    after: &CounterSnapshot,
    want: [u64; 7],
) -> TestResult {
    let got = invalidated(before, after);
    ensure!(
        got == want,
        "{what}: invalidations [all, unmap, clear, protect_vma, protect_page, migrate, \
         revoke] {got:?}, want {want:?}"
    );
    Ok(())
}

fn cow_breaks<E: SvmEnv>(env: &E, p: &E::Process) -> u64 {
    env.mm(p).core().cow_breaks()
}

fn expect_breaks<E: SvmEnv>(env: &E, p: &E::Process, who: &str, want: u64) -> TestResult {
    let got = cow_breaks(env, p);
    ensure!(got == want, "{who}'s COW breaks: {got}, want {want}");
    Ok(())
}

/// The frames the CPU maps for `p` at the pages of `[va, va + len)`.
fn frames_of<E: SvmEnv>(env: &E, p: &E::Process, va: u64, len: u64) -> Vec<u64> {
    (0..len / PAGE_SIZE)
        .filter_map(|i| env.cpu_phys(p, va + i * PAGE_SIZE))
        .collect()
}

/// The child exits with freed frames watched: exactly `own` frames go
/// (the child's copies and what the parent's copies left it), none of
/// `parents` (what the parent still maps). The held-back frames go back
/// afterwards.
fn exit_child<E: SvmEnv>(env: &E, child: E::Process, parents: &[u64], own: usize) -> TestResult {
    env.track_freed(Some(CANARY));
    env.exit(child);
    let freed = env.take_freed();
    env.track_freed(None);
    let theirs = freed.iter().find(|f| parents.contains(f));
    ensure!(
        theirs.is_none(),
        "the child's exit freed frame {theirs:#x?}, which the parent maps"
    );
    ensure!(
        freed.len() == own,
        "the child's exit freed {} frames, want its own {own}",
        freed.len()
    );
    Ok(())
}

/// Every frame back once both processes (and the context) are gone.
fn frames_back<E: SvmEnv>(env: &E, base: u64) -> TestResult {
    let now = env.free_frames();
    ensure!(
        now == base,
        "{} frames missing after both exited",
        base as i64 - now as i64
    );
    Ok(())
}

/// Private pages: the parent's GPU fills two buffers, the process forks,
/// the child's CPU writes one buffer (its own copies) while the parent's
/// GPU reads the parent's data there; the parent's GPU then writes the
/// other buffer, faulting and breaking the COW page by page; each side
/// reads its own data in both.
pub(super) mod anon_write_child {
    use super::*;

    /// Nothing beyond the defaults.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let base = env.free_frames();
        let (pa, pb) = (Pattern::constant(0xa1), Pattern::constant(0xb1));
        let mine = Pattern::page_index(0xc0);
        let (p, a) = spawn_mapped(env, LEN)?;
        let b = mmap_rw(env, &p, LEN, "mmap b")?;
        bound(env, p, |p, svm, chan| {
            ok(fill(chan, a, LEN, pa.base), "GPU fill a")?;
            ok(fill(chan, b, LEN, pb.base), "GPU fill b")?;
            let c0 = counters(env);
            let child = env.fork(p)?;
            let c1 = counters(env);
            // One write-protection per private VMA, nothing else.
            expect_invalidated("fork", &c0, &c1, [2, 0, 0, 0, 2, 0, 0])?;
            for va in [a, b] {
                let l = svm.device_lookup(va);
                ensure!(
                    l.is_some_and(|l| !l.perms.contains(Pte::WRITE)),
                    "after the fork the device maps {va:#x} as {l:?} (want read-only)"
                );
            }
            cpu_check(env, &child, a, LEN, pa)?;
            cpu_check(env, &child, b, LEN, pb)?;
            // The child writes b: its own copies; the parent's mirror is
            // not told (the child's mm has no notifiers).
            cpu_fill(env, &child, b, LEN, mine)?;
            expect_breaks(env, &child, "child", PAGES)?;
            let c2 = counters(env);
            expect_invalidated("child's writes", &c1, &c2, [0; 7])?;
            // The parent's GPU reads its own data in b.
            let out = mmap_rw(env, p, LEN, "mmap out")?;
            ok(copy(chan, out, b, LEN), "GPU copy of b")?;
            cpu_check(env, p, out, LEN, pb)?;
            // The parent's GPU writes a: each page faults and is copied.
            let pa2 = Pattern::constant(0xa2);
            ok(fill(chan, a, LEN, pa2.base), "GPU fill a after the fork")?;
            expect_breaks(env, p, "parent", PAGES)?;
            let c3 = counters(env);
            expect_invalidated(
                "parent's GPU writes",
                &c2,
                &c3,
                [PAGES, 0, PAGES, 0, 0, 0, 0],
            )?;
            ensure!(
                svm.device_lookup(a)
                    .is_some_and(|l| l.perms.contains(Pte::WRITE)),
                "the GPU write left {:?}",
                svm.device_lookup(a)
            );
            cpu_check(env, p, a, LEN, pa2)?;
            cpu_check(env, p, b, LEN, pb)?;
            cpu_check(env, &child, a, LEN, pa)?;
            cpu_check(env, &child, b, LEN, mine)?;
            expect_breaks(env, &child, "child", PAGES)?;
            let parents: Vec<u64> = [a, b, out]
                .iter()
                .flat_map(|&va| frames_of(env, p, va, LEN))
                .collect();
            // The child's own: b's copies, and a's old frames (the
            // parent's copies left them to it).
            exit_child(env, child, &parents, 2 * PAGES as usize)?;
            cpu_check(env, p, a, LEN, pa2)?;
            cpu_check(env, p, b, LEN, pb)?;
            ensure!(
                counters(env).exclusive_grants == c0.exclusive_grants,
                "exclusive grants without atomics"
            );
            Ok(())
        })?;
        frames_back(env, base)
    }
}

/// A shared mapping stays shared: the child's CPU stores reach the
/// parent's GPU, the parent's GPU stores the child's CPU; pages the GPU
/// had not touched are populated at fork, no invalidation, no COW.
pub(super) mod anon_write_child_shared {
    use super::*;

    /// Nothing beyond the defaults.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let base = env.free_frames();
        let p = env.spawn()?;
        let s = ok(env.mmap_shared(&p, 0, LEN, Prot::RW), "mmap shared")?;
        bound(env, p, |p, svm, chan| {
            // The GPU populates the first half only.
            ok(fill(chan, s, LEN / 2, 0x51), "GPU fill")?;
            let c0 = counters(env);
            let child = env.fork(p)?;
            let c1 = counters(env);
            expect_invalidated("fork", &c0, &c1, [0; 7])?;
            ensure!(
                svm.device_lookup(s)
                    .is_some_and(|l| l.perms.contains(Pte::WRITE)),
                "shared page write-protected on the device: {:?}",
                svm.device_lookup(s)
            );
            let (fp, fc) = (frames_of(env, p, s, LEN), frames_of(env, &child, s, LEN));
            ensure!(
                fp.len() == PAGES as usize && fp == fc,
                "shared frames: parent {fp:x?}, child {fc:x?}"
            );
            let theirs = Pattern::page_index(0xc1);
            cpu_fill(env, &child, s, LEN, theirs)?;
            let out = mmap_rw(env, p, LEN, "mmap out")?;
            ok(copy(chan, out, s, LEN), "GPU copy of the child's data")?;
            cpu_check(env, p, out, LEN, theirs)?;
            ok(fill(chan, s, LEN, 0x52), "GPU fill after the fork")?;
            cpu_check(env, &child, s, LEN, Pattern::constant(0x52))?;
            expect_breaks(env, p, "parent", 0)?;
            expect_breaks(env, &child, "child", 0)?;
            expect_invalidated("after the fork", &c1, &counters(env), [0; 7])?;
            let mut parents = frames_of(env, p, s, LEN);
            parents.extend(frames_of(env, p, out, LEN));
            exit_child(env, child, &parents, 0)?;
            cpu_check(env, p, s, LEN, Pattern::constant(0x52))
        })?;
        frames_back(env, base)
    }
}

/// Device memory at fork: the pages come back to system memory (as a CPU
/// fault brings them), then COW as any; a shared frame is not migrated
/// again; both sides write and read their own data.
pub(super) mod hmm_cow_in_device {
    use super::*;

    /// A GPU with VRAM (every host's default).
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let base = env.free_frames();
        let pat = Pattern::page_index(0xd0);
        let (p, src) = spawn_mapped(env, LEN)?;
        cpu_fill(env, &p, src, LEN, pat)?;
        let dmem = device_memory(env)?;
        bound_with(env, p, migrating(MigratePolicy::None), |p, svm, chan| {
            ok(dmem.attach(svm), "attach")?;
            let moved_n = ok(dmem.migrate_to_device(svm, src, src + LEN), "migrate")?;
            ensure!(moved_n == PAGES, "{moved_n} of {PAGES} pages migrated");
            ensure!(on_device(env, p, src, PAGES), "the CPU still maps a page");
            let c0 = counters(env);
            let child = env.fork(p)?;
            let c1 = counters(env);
            moved(
                "pages faulted back at fork",
                c0.pages_cpu_faulted_back,
                c1.pages_cpu_faulted_back,
                PAGES,
            )?;
            moved(
                "explicit migrations back",
                c0.pages_to_system,
                c1.pages_to_system,
                0,
            )?;
            // Each page's migration back, then the write-protection.
            expect_invalidated("fork", &c0, &c1, [PAGES + 1, 0, 0, 0, 1, PAGES, 0])?;
            ensure!(
                (0..PAGES).all(|i| env.cpu_phys(p, src + i * PAGE_SIZE).is_some()),
                "a page stayed in device memory"
            );
            cpu_check(env, &child, src, LEN, pat)?;
            // Shared frames are not migrated (their copy in VRAM would be
            // one side's only).
            let again = ok(
                dmem.migrate_to_device(svm, src, src + LEN),
                "migrate shared",
            )?;
            ensure!(again == 0, "{again} COW-shared pages migrated");
            // Both write: the parent's GPU first (it copies), the child's
            // CPU then (its frames are its own again: no copy).
            let c2 = counters(env);
            ok(fill(chan, src, LEN, 0xd2), "GPU fill after the fork")?;
            expect_breaks(env, p, "parent", PAGES)?;
            let theirs = Pattern::page_index(0xe0);
            cpu_fill(env, &child, src, LEN, theirs)?;
            expect_breaks(env, &child, "child", 0)?;
            let c3 = counters(env);
            moved(
                "clears",
                c2.invalidations_clear,
                c3.invalidations_clear,
                PAGES,
            )?;
            let out = mmap_rw(env, p, LEN, "mmap out")?;
            ok(copy(chan, out, src, LEN), "GPU copy")?;
            cpu_check(env, p, out, LEN, Pattern::constant(0xd2))?;
            cpu_check(env, &child, src, LEN, theirs)?;
            // Unshared now: the parent's pages migrate again.
            let back = ok(dmem.migrate_to_device(svm, src, src + LEN), "migrate")?;
            ensure!(back == PAGES, "{back} of {PAGES} unshared pages migrated");
            let mut parents = frames_of(env, p, out, LEN);
            parents.extend(frames_of(env, p, src, LEN));
            exit_child(env, child, &parents, PAGES as usize)?;
            cpu_check(env, p, src, LEN, Pattern::constant(0xd2))
        })?;
        leak_check(dmem)?;
        frames_back(env, base)
    }
}

/// hmm-tests `exclusive_cow`: pages held device-exclusive for GPU atomics,
/// fork (the holds are revoked), the parent's CPU increments every word
/// (copying each page), the child keeps the data of the fork, the GPU's
/// atomics are granted again on the parent's own copies.
pub(super) mod exclusive_cow {
    use super::*;

    /// Nothing beyond the defaults.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let base = env.free_frames();
        let len = XPAGES * PAGE_SIZE;
        let (p, va) = spawn_mapped(env, len)?;
        cpu_fill(env, &p, va, len, Pattern::page_index(BASE))?;
        bound_with(env, p, exclusive_cfg(), |p, svm, chan| {
            let c0 = counters(env);
            gpu_add_each(chan, va, 0, "GPU atomic")?;
            let c1 = counters(env);
            moved("grants", c0.exclusive_grants, c1.exclusive_grants, XPAGES)?;
            let child = env.fork(p)?;
            let c2 = counters(env);
            // Every hold revoked, then the write-protection.
            expect_invalidated("fork", &c1, &c2, [XPAGES + 1, 0, 0, 0, 1, 0, XPAGES])?;
            ensure!(
                svm.device_lookup(va).is_none(),
                "the device kept page 0 after the fork revoked it"
            );
            // The parent's CPU increments every word.
            check_words(env, p, va, 1, 0)?;
            for i in 0..XPAGES {
                let a = va + i * PAGE_SIZE;
                write_u64(env, p, a, BASE + i + 2)?;
                cpu_fill(
                    env,
                    p,
                    a + 8,
                    PAGE_SIZE - 8,
                    Pattern::constant(BASE + i + 1),
                )?;
            }
            check_words(env, p, va, 2, 1)?;
            expect_breaks(env, p, "parent", XPAGES)?;
            check_words(env, &child, va, 1, 0)?;
            expect_breaks(env, &child, "child", 0)?;
            // The GPU's atomics again, on the parent's copies.
            let c3 = counters(env);
            gpu_add_each(chan, va, 2, "GPU atomic after the fork")?;
            moved(
                "grants after the fork",
                c3.exclusive_grants,
                counters(env).exclusive_grants,
                XPAGES,
            )?;
            check_words(env, &child, va, 1, 0)?;
            // The child's CPU reads revoked nothing of the parent's.
            moved(
                "revocations by the child",
                c3.exclusive_revocations,
                counters(env).exclusive_revocations,
                0,
            )?;
            let parents = frames_of_exclusive(env, p, va, len);
            exit_child(env, child, &parents, XPAGES as usize)?;
            check_words(env, p, va, 3, 1)
        })?;
        frames_back(env, base)
    }

    /// The parent's frames while the GPU holds them: through its CPU
    /// mapping (a read restores each page; `cpu_phys` sees no frame in an
    /// exclusive entry).
    fn frames_of_exclusive<E: SvmEnv>(env: &E, p: &E::Process, va: u64, len: u64) -> Vec<u64> {
        (0..len / PAGE_SIZE)
            .filter_map(|i| {
                let a = va + i * PAGE_SIZE;
                read_u64(env, p, a).ok()?;
                env.cpu_phys(p, a)
            })
            .collect()
    }
}
