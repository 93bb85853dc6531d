//! The first-touch policy (issue 17, `MigratePolicy::FirstTouch`): with
//! device memory attached, a GPU fault migrates its window to VRAM before
//! mapping it, untouched pages as zeroed VRAM pages and CPU-written pages
//! with their data; what cannot move (a read-only mapping, a full VRAM) is
//! mapped from system memory. Each test uses one 2 MiB chunk of VRAM (a
//! `DeviceMemory::part`) and ends with the VRAM leak check.

use alloc::string::String;

use faultline_abi::{Pte, PAGE_SIZE};

use super::dmem::leak_check;
use super::evict::small_vram;
use super::helpers::*;
use super::{Needs, Pattern, Prot, SvmEnv, TestResult};
use crate::gpu::vram::CHUNK_PAGES;
use crate::gpu::{DeviceMemory, MigratePolicy, Prefetch, SnapEntry, SvmConfig, VramFailure};

/// Runs `body` on a context bound to `p` that migrates on first touch,
/// with `dmem` attached. The window is pinned to the 64 KiB fault-around
/// one: how much a window moves, and what a full VRAM evicts, depend on
/// which pages one migration takes (under the density prefetcher a
/// window's first touches are single pages, each its own migration, so a
/// nearly full chunk is evicted rather than topped up). The window is pinned to the 64 KiB fault-around
/// one: how much a window moves, and what a full VRAM evicts, depend on
/// which pages one migration takes (under the density prefetcher a
/// window's first touches are single pages, each its own migration, so a
/// nearly full chunk is evicted rather than topped up).
fn bound_first_touch<E: SvmEnv>(
    env: &E,
    p: E::Process,
    dmem: &DeviceMemory<E::P>,
    body: impl FnOnce(&E::Process, &Svm<E>, &Chan<E>) -> TestResult,
) -> TestResult {
    let cfg = SvmConfig {
        prefetch: Some(Prefetch::FaultAround),
        ..migrating(MigratePolicy::FirstTouch)
    };
    bound_with(env, p, cfg, |p, svm, chan| {
        ok(dmem.attach(svm), "attach")?;
        body(p, svm, chan)
    })
}

/// Pages of `[va, va + n pages)` that are device-private for `svm` (its
/// snapshot says Device, the CPU maps no frame, the device maps a VRAM
/// leaf), and the pages the CPU maps a frame for.
fn placement<E: SvmEnv>(
    env: &E,
    p: &E::Process,
    svm: &Svm<E>,
    va: u64,
    n: u64,
) -> Result<(u64, u64), String> {
    let snap = ok(svm.snapshot(va, va + n * PAGE_SIZE, 12), "snapshot")?;
    let (mut vram, mut system) = (0, 0);
    for (i, e) in snap.iter().enumerate() {
        let a = va + i as u64 * PAGE_SIZE;
        let cpu = env.cpu_phys(p, a);
        let leaf = svm.device_lookup(a);
        let vram_leaf = leaf.is_some_and(|l| l.perms.contains(Pte::VRAM));
        match (e, cpu) {
            (SnapEntry::Device { .. }, None) if vram_leaf => vram += 1,
            (SnapEntry::Valid { .. }, Some(_)) if leaf.is_some() && !vram_leaf => system += 1,
            _ => {
                return Err(alloc::format!(
                    "{a:#x}: {e:?}, CPU {cpu:x?}, device {leaf:x?}"
                ))
            }
        }
    }
    Ok((vram, system))
}

/// A GPU FILL over a fresh buffer and a COPY from CPU-written pages into
/// another fresh one: every page they touch moves to VRAM on its first
/// touch (the GPU then reads the copied data from VRAM), and CPU reads
/// fault each back with the GPU's data.
pub(super) mod migrate_first_touch {
    use super::*;

    /// A GPU with VRAM (every host's default).
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let n = 16;
        let len = n * PAGE_SIZE;
        let pat = Pattern::page_index(0x3100);
        let (p, src) = spawn_mapped(env, len)?;
        let fresh = mmap_rw(env, &p, len, "mmap fresh")?;
        let dst = mmap_rw(env, &p, len, "mmap dst")?;
        cpu_fill(env, &p, src, len, pat)?;
        let dmem = small_vram(env, 1)?;
        let c0 = counters(env);
        bound_first_touch(env, p, &dmem, |p, svm, chan| {
            ok(fill(chan, fresh, len, PAT), "GPU fill of fresh pages")?;
            let placed = placement(env, p, svm, fresh, n)?;
            ensure!(placed == (n, 0), "fresh pages (VRAM, system): {placed:?}");
            ensure!(dmem.stats().by_fault == n, "{:?}", dmem.stats());
            ok(copy(chan, dst, src, len), "GPU copy of CPU-written pages")?;
            for (what, va) in [("source", src), ("destination", dst)] {
                let placed = placement(env, p, svm, va, n)?;
                ensure!(placed == (n, 0), "{what} pages (VRAM, system): {placed:?}");
            }
            let s = dmem.stats();
            ensure!(
                s.by_fault == 3 * n && s.to_device == 3 * n && s.cpu_faults == 0,
                "after the copy: {s:?}"
            );
            let c = counters(env);
            let by_fault = c.pages_to_vram_by_fault - c0.pages_to_vram_by_fault;
            ensure!(
                by_fault == 3 * n,
                "driver counter: {by_fault} pages by fault"
            );
            cpu_check(env, p, dst, len, pat)?;
            cpu_check(env, p, src, len, pat)?;
            cpu_check(env, p, fresh, len, Pattern::constant(PAT))?;
            let s = dmem.stats();
            ensure!(
                s.cpu_faults == 3 * n && s.vram.pages == 0,
                "after the CPU reads: {s:?}"
            );
            dmem.detach(svm);
            Ok(())
        })?;
        leak_check(dmem)
    }
}

/// What cannot move is mapped from system memory: a read-only mapping's
/// pages stay (its copy's destination moves), so do a shared mapping's; a
/// window whose VRAM allocations fail (injected) moves nothing, and one
/// that finds VRAM nearly full moves what fits (its migration cannot evict
/// the chunk it fills); the GPU's data is correct everywhere. (A window
/// that finds VRAM full evicts: `first_touch_loopback.rs`, where a
/// chunk's eviction is cheap.)
pub(super) mod migrate_first_touch_fallback {
    use super::*;

    /// A GPU with VRAM.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let n = 16;
        let len = n * PAGE_SIZE;
        let fits = 8;
        let pat = Pattern::page_index(0x4200);
        let (p, ro) = spawn_mapped(env, len)?;
        let dst = mmap_rw(env, &p, len, "mmap dst")?;
        let filler_len = (CHUNK_PAGES - n - fits) * PAGE_SIZE;
        let filler = mmap_rw(env, &p, filler_len, "mmap filler")?;
        let part = mmap_rw(env, &p, len, "mmap part")?;
        let failing = mmap_rw(env, &p, len, "mmap failing")?;
        let shared = ok(env.mmap_shared(&p, 0, len, Prot::RW), "mmap shared")?;
        cpu_fill(env, &p, ro, len, pat)?;
        ok(env.mprotect(&p, ro, len, Prot::READ), "mprotect read-only")?;
        let dmem = small_vram(env, 1)?;
        bound_first_touch(env, p, &dmem, |p, svm, chan| {
            ok(copy(chan, dst, ro, len), "GPU copy from read-only pages")?;
            let placed = placement(env, p, svm, ro, n)?;
            ensure!(
                placed == (0, n),
                "read-only pages (VRAM, system): {placed:?}"
            );
            let placed = placement(env, p, svm, dst, n)?;
            ensure!(placed == (n, 0), "destination (VRAM, system): {placed:?}");
            ok(fill(chan, shared, len, PAT), "GPU fill of a shared mapping")?;
            let placed = placement(env, p, svm, shared, n)?;
            ensure!(placed == (0, n), "shared pages (VRAM, system): {placed:?}");
            dmem.inject_vram_failure(VramFailure::After(0));
            let r = fill(chan, failing, len, PAT ^ 1);
            dmem.inject_vram_failure(VramFailure::Never);
            ok(r, "GPU fill, VRAM allocations failing")?;
            let placed = placement(env, p, svm, failing, n)?;
            ensure!(
                placed == (0, n),
                "VRAM allocations failing (VRAM, system): {placed:?}"
            );
            let filled = ok(
                dmem.migrate_to_device(svm, filler, filler + filler_len),
                "migrate the filler",
            )?;
            ensure!(filled == filler_len / PAGE_SIZE, "{filled} filler pages");
            ok(fill(chan, part, len, PAT), "GPU fill, VRAM nearly full")?;
            let placed = placement(env, p, svm, part, n)?;
            ensure!(
                placed == (fits, n - fits),
                "VRAM nearly full (VRAM, system): {placed:?}"
            );
            let s = dmem.stats();
            ensure!(
                s.vram.pages == CHUNK_PAGES && s.by_fault == n + fits && s.evicted_pages == 0,
                "{s:?}"
            );
            cpu_check(env, p, dst, len, pat)?;
            cpu_check(env, p, part, len, Pattern::constant(PAT))?;
            cpu_check(env, p, ro, len, pat)?;
            cpu_check(env, p, shared, len, Pattern::constant(PAT))?;
            cpu_check(env, p, failing, len, Pattern::constant(PAT ^ 1))?;
            Ok(())
        })?;
        // The filler's pages were still in VRAM at exit.
        leak_check(dmem)
    }
}
