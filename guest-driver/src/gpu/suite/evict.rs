//! VRAM under pressure (issue 17): eviction makes room for a working set
//! larger than VRAM (`evict_oversubscribe`), and a VRAM allocation that
//! fails leaves its page in system memory (`vram_alloc_fail`). Each runs
//! on a small part of the GPU's VRAM and ends with the VRAM leak check.

use alloc::string::String;
use alloc::vec::Vec;

use faultline_abi::PAGE_SIZE;

use super::dmem::{leak_check, setup};
use super::helpers::*;
use super::{Needs, Pattern, SvmEnv, TestResult};
use crate::gpu::vram::{CHUNK_BYTES, CHUNK_PAGES};
use crate::gpu::{DeviceMemory, MigratePolicy, VramFailure};

/// The first `chunks` chunks of the GPU's VRAM as a device memory.
pub(super) fn small_vram<E: SvmEnv>(env: &E, chunks: u64) -> Result<DeviceMemory<E::P>, String> {
    ok(
        DeviceMemory::part(env.gpu(), 0, chunks * CHUNK_BYTES),
        "device memory (the GPU needs VRAM)",
    )
}

/// Whether the CPU maps each of `pages` (offsets in pages from `va`): it
/// does not for a page in VRAM.
fn in_system<E: SvmEnv>(env: &E, p: &E::Process, va: u64, pages: &[u64]) -> Vec<bool> {
    pages
        .iter()
        .map(|i| env.cpu_phys(p, va + i * PAGE_SIZE).is_some())
        .collect()
}

/// A working set twice the VRAM, migrated one chunk-sized range at a time,
/// the GPU copying each range's first half over its second half in VRAM
/// right after: every migration moves its whole range (eviction made
/// room), the least recently migrated ranges are the ones back in system
/// memory, and the CPU reads every byte back as the GPU left it (the
/// evicted ranges from system memory, the rest after migrating it back,
/// a few pages by CPU faults).
pub(super) mod evict_oversubscribe {
    use super::*;

    /// A GPU with at least [`CHUNKS`] chunks of VRAM.
    pub const NEEDS: Needs = Needs::DEFAULT;

    /// The VRAM the test gets, in 2 MiB chunks: one, as each page costs
    /// a few ms of emulated kernel code in the guest, three times over
    /// (migrated, evicted, faulted back). The loopback's
    /// `dmem_loopback.rs` checks the LRU order over more chunks.
    const CHUNKS: u64 = 1;
    /// Ranges of one chunk in the working set.
    const RANGES: u64 = 2 * CHUNKS;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let range = CHUNK_BYTES;
        let half = range / 2;
        let pat = Pattern::page_index(0xe100);
        let (p, va) = spawn_mapped(env, RANGES * range)?;
        cpu_fill(env, &p, va, RANGES * range, pat)?;
        let dmem = small_vram(env, CHUNKS)?;
        let c0 = counters(env);
        bound(env, p, |p, svm, chan| {
            ok(dmem.attach(svm), "attach")?;
            for r in 0..RANGES {
                let a = va + r * range;
                let moved = ok(dmem.migrate_to_device(svm, a, a + range), "migrate")?;
                ensure!(
                    moved == CHUNK_PAGES,
                    "range {r}: {moved} of {CHUNK_PAGES} pages migrated ({:?})",
                    dmem.stats()
                );
                ok(copy(chan, a + half, a, half), "GPU copy in VRAM")?;
            }
            let s = dmem.stats();
            let (chunks, pages) = (RANGES - CHUNKS, (RANGES - CHUNKS) * CHUNK_PAGES);
            ensure!(
                s.evicted_chunks >= chunks && s.evicted_pages >= pages,
                "evicted {} chunks, {} pages; at least {chunks}, {pages} expected",
                s.evicted_chunks,
                s.evicted_pages
            );
            let c = counters(env);
            let driver = (
                c.pages_evicted - c0.pages_evicted,
                c.chunks_evicted - c0.chunks_evicted,
            );
            ensure!(
                driver == (s.evicted_pages, s.evicted_chunks),
                "driver counters (pages, chunks evicted) {driver:?}, DmemStats {s:?}"
            );
            ensure!(
                s.vram.pages == CHUNKS * CHUNK_PAGES,
                "VRAM holds {:?}, expected it full",
                s.vram
            );
            // Least recently migrated first: the first ranges went back.
            let probe = [0, CHUNK_PAGES / 2, CHUNK_PAGES - 1];
            for r in 0..RANGES {
                let placed = in_system(env, p, va + r * range, &probe);
                let want = r < RANGES - CHUNKS;
                ensure!(
                    placed.iter().all(|&s| s == want),
                    "range {r}: pages {probe:?} in system memory: {placed:?}, expected {want}"
                );
            }
            // What is still in VRAM comes back in one migration but for
            // its first pages, which the CPU reads fault back (a page at a
            // time: a few ms each in the guest).
            let faulted = 16 * PAGE_SIZE;
            let (a, b) = (va + (RANGES - CHUNKS) * range, va + RANGES * range);
            let back = ok(dmem.migrate_to_system(svm, a + faulted, b), "back")?;
            ensure!(
                back == CHUNKS * CHUNK_PAGES - 16,
                "{back} pages migrated back"
            );
            for r in 0..RANGES {
                let a = va + r * range;
                let first = Pattern::page_index(pat.base + r * CHUNK_PAGES);
                cpu_check(env, p, a, half, first)?;
                cpu_check(env, p, a + half, half, first)?;
            }
            let s = dmem.stats();
            ensure!(
                s.vram.pages == 0 && s.cpu_faults == 16,
                "after the CPU read it all: {s:?}"
            );
            dmem.detach(svm);
            Ok(())
        })?;
        leak_check(dmem)
    }
}

/// Injected VRAM allocation failures: the page whose allocation failed, or
/// every page after the first few, stays in system memory while the rest
/// migrates; the GPU reads all of it correctly; nothing leaks.
pub(super) mod vram_alloc_fail {
    use super::*;

    /// A GPU with VRAM.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let n = 16;
        let len = n * PAGE_SIZE;
        let pat = Pattern::page_index(0xfa00);
        let (p, src, dst) = setup(env, 2 * n, pat)?;
        let dmem = small_vram(env, 1)?;
        // Only its explicit migrations move pages, whatever `migrate=` says.
        bound_with(env, p, migrating(MigratePolicy::None), |p, svm, chan| {
            ok(dmem.attach(svm), "attach")?;
            // The 5th allocation fails: page 4 stays.
            dmem.inject_vram_failure(VramFailure::Nth(5));
            let moved = ok(dmem.migrate_to_device(svm, src, src + len), "migrate")?;
            ensure!(moved == n - 1, "{moved} of {} pages migrated", n - 1);
            let all: Vec<u64> = (0..n).collect();
            let placed = in_system(env, p, src, &all);
            ensure!(
                placed.iter().enumerate().all(|(i, &s)| s == (i == 4)),
                "pages in system memory: {placed:?}, expected page 4 alone"
            );
            // Every allocation after the first 8 fails.
            dmem.inject_vram_failure(VramFailure::After(8));
            let b = src + len;
            let moved = ok(dmem.migrate_to_device(svm, b, b + len), "migrate")?;
            ensure!(moved == 8, "{moved} of 8 pages migrated");
            let placed = in_system(env, p, b, &all);
            ensure!(
                placed.iter().enumerate().all(|(i, &s)| s == (i >= 8)),
                "pages in system memory: {placed:?}, expected pages 8.. alone"
            );
            dmem.inject_vram_failure(VramFailure::Never);
            let s = dmem.stats();
            ensure!(
                s.alloc_failures == 1 + 8 && s.vram.pages == n - 1 + 8 && s.evicted_pages == 0,
                "{s:?}"
            );
            // The GPU reads both kinds of page.
            ok(copy(chan, dst, src, 2 * len), "GPU copy")?;
            cpu_check(env, p, dst, 2 * len, pat)?;
            let back = ok(dmem.migrate_to_system(svm, src, src + 2 * len), "back")?;
            ensure!(back == n - 1 + 8, "{back} pages came back");
            cpu_check(env, p, src, 2 * len, pat)?;
            ensure!(dmem.stats().vram.pages == 0, "{:?}", dmem.stats());
            dmem.detach(svm);
            Ok(())
        })?;
        leak_check(dmem)
    }
}
