//! 2 MiB device pages (issue 17's `migrate_huge`, and hmm-tests'
//! `migrate_anon_huge_empty` / `_zero` / `_free` / `_fault` intents): a
//! HUGE VMA's 2 MiB leaves migrate whole to VRAM chunks, the GPU maps each
//! with one 2 MiB VRAM leaf, and a CPU fault brings the whole 2 MiB back.
//! Each test pins the migration policy to explicit migrations (a
//! first-touch policy would move the GPU's destinations too) and ends with
//! the VRAM leak check.

use alloc::string::String;
use alloc::vec::Vec;

use faultline_abi::{Pte, LEAF_2M, PAGE_SIZE};

use super::helpers::*;
use super::{Needs, Pattern, Prot, SvmEnv, TestResult};
use crate::gpu::vram::CHUNK_PAGES;
use crate::gpu::{DeviceMemory, MigratePolicy, PageSize, SnapEntry};
use crate::mm::PMD_SHIFT;

/// A HUGE read-write mapping of `leaves` 2 MiB pages.
fn mmap_huge<E: SvmEnv>(env: &E, p: &E::Process, leaves: u64, what: &str) -> Result<u64, String> {
    ok(env.mmap(p, 0, leaves * LEAF_2M, Prot::RW, true), what)
}

/// The VRAM offset of each 2 MiB entry of `[va, va + leaves * 2 MiB)` in
/// a 2 MiB snapshot: `None` for an entry that is not a writable device
/// page.
pub(super) fn device_chunks<E: SvmEnv>(
    svm: &Svm<E>,
    va: u64,
    leaves: u64,
) -> Result<Vec<Option<u64>>, String> {
    let snap = ok(
        svm.snapshot(va, va + leaves * LEAF_2M, PMD_SHIFT),
        "snapshot",
    )?;
    ensure!(
        snap.len() as u64 == leaves,
        "{} entries for {leaves} leaves",
        snap.len()
    );
    Ok(snap
        .iter()
        .map(|e| match *e {
            SnapEntry::Device {
                vram,
                writable: true,
            } => Some(vram),
            _ => None,
        })
        .collect())
}

/// Whether the CPU maps `va`'s 2 MiB with one 2 MiB frame run (aligned,
/// contiguous at both ends).
pub(super) fn cpu_huge<E: SvmEnv>(env: &E, p: &E::Process, va: u64) -> bool {
    let first = env.cpu_phys(p, va);
    let last = env.cpu_phys(p, va + LEAF_2M - PAGE_SIZE);
    first.is_some_and(|f| f % LEAF_2M == 0 && last == Some(f + LEAF_2M - PAGE_SIZE))
}

/// Two CPU-written 2 MiB pages migrate to two VRAM chunks (one Device
/// entry each in a 2 MiB snapshot); the GPU maps each with one 2 MiB VRAM
/// leaf and reads them without migrating anything back, then overwrites
/// them; the first comes back by an explicit migration, the second by CPU
/// reads (hmm-tests' `migrate_anon_huge_fault`), each whole into a 2 MiB
/// frame run with the GPU's data.
pub(super) mod migrate_huge {
    use super::*;

    /// A GPU with VRAM.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let leaves = 2;
        let len = leaves * LEAF_2M;
        let pat = Pattern::page_index(0x4b00);
        let p = env.spawn()?;
        let src = mmap_huge(env, &p, leaves, "mmap src")?;
        let dst = mmap_huge(env, &p, leaves, "mmap dst")?;
        cpu_fill(env, &p, src, len, pat)?;
        let dmem = ok(
            DeviceMemory::new(env.gpu()),
            "device memory (the GPU needs VRAM)",
        )?;
        bound_with(env, p, migrating(MigratePolicy::None), |p, svm, chan| {
            ok(dmem.attach(svm), "attach")?;
            let moved = ok(dmem.migrate_to_device(svm, src, src + len), "migrate")?;
            ensure!(moved == leaves * CHUNK_PAGES, "{moved} pages migrated");
            let s = dmem.stats();
            ensure!(s.vram.chunks == leaves && s.vram.pages == moved, "{s:?}");
            let chunks = device_chunks::<E>(svm, src, leaves)?;
            ensure!(
                chunks.iter().all(|c| c.is_some_and(|v| v % LEAF_2M == 0))
                    && chunks[0] != chunks[1],
                "2 MiB snapshot: {chunks:?}"
            );
            ensure!(
                env.cpu_phys(p, src).is_none() && env.cpu_phys(p, src + LEAF_2M).is_none(),
                "the CPU still maps a migrated page"
            );
            ok(copy(chan, dst, src, len), "copy from VRAM")?;
            for (k, chunk) in chunks.iter().enumerate() {
                let off = k as u64 * LEAF_2M + 0x3000;
                let leaf = svm.device_lookup(src + off);
                ensure!(
                    leaf.is_some_and(|l| l.size == PageSize::Size2M
                        && l.perms.contains(Pte::VRAM)
                        && Some(l.phys) == chunk.map(|v| v + 0x3000)),
                    "device leaf at +{off:#x}: {leaf:?}, chunk {chunk:?}"
                );
            }
            cpu_check(env, p, dst, len, pat)?;
            ensure!(
                dmem.stats().cpu_faults == 0 && env.cpu_phys(p, src).is_none(),
                "a GPU read migrated a page back: {:?}",
                dmem.stats()
            );
            ok(fill(chan, src, len, PAT), "fill VRAM")?;
            let back = ok(
                dmem.migrate_to_system(svm, src, src + LEAF_2M),
                "migrate back",
            )?;
            ensure!(back == CHUNK_PAGES, "{back} pages migrated back");
            cpu_check(env, p, src, len, Pattern::constant(PAT))?;
            for k in 0..leaves {
                ensure!(
                    cpu_huge(env, p, src + k * LEAF_2M),
                    "leaf {k} did not come back as a 2 MiB page"
                );
            }
            let s = dmem.stats();
            ensure!(
                s.to_system == CHUNK_PAGES && s.cpu_faults == CHUNK_PAGES && s.vram.pages == 0,
                "after the CPU reads: {s:?}"
            );
            dmem.detach(svm);
            Ok(())
        })?;
        ok(dmem.teardown(), "VRAM left allocated")
    }
}

/// Three 2 MiB pages into two chunks of VRAM: an untouched one (a hole:
/// `migrate_anon_huge_empty`) and a CPU-read one (zeroed: there is no huge
/// zero page, `_zero`) migrate and read as zeroes on the GPU; the third,
/// with data, finds no free chunk and stays in system memory (a HUGE VMA
/// takes no 4 KiB pages); munmap of a device page frees its chunk at once
/// (`_free`), process exit the other.
pub(super) mod migrate_huge_empty {
    use super::*;

    /// A GPU with at least 4 MiB of VRAM.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let leaves = 3;
        let len = leaves * LEAF_2M;
        let pat = Pattern::page_index(0x6e00);
        let p = env.spawn()?;
        let src = mmap_huge(env, &p, leaves, "mmap src")?;
        let dst = mmap_huge(env, &p, leaves, "mmap dst")?;
        let data = src + 2 * LEAF_2M;
        ensure!(
            read_u64(env, &p, src + LEAF_2M)? == 0,
            "a fresh page is not zero"
        );
        cpu_fill(env, &p, data, LEAF_2M, pat)?;
        let dmem = ok(
            DeviceMemory::part(env.gpu(), 0, 2 * LEAF_2M),
            "two chunks of VRAM",
        )?;
        bound_with(env, p, migrating(MigratePolicy::None), |p, svm, chan| {
            ok(dmem.attach(svm), "attach")?;
            let moved = ok(dmem.migrate_to_device(svm, src, src + len), "migrate")?;
            ensure!(moved == 2 * CHUNK_PAGES, "{moved} pages migrated");
            let chunks = device_chunks::<E>(svm, src, leaves)?;
            ensure!(
                chunks[0].is_some() && chunks[1].is_some() && chunks[2].is_none(),
                "2 MiB snapshot: {chunks:?}"
            );
            ensure!(
                cpu_huge(env, p, data),
                "the page VRAM had no room for moved"
            );
            ok(copy(chan, dst, src, len), "copy")?;
            cpu_check(env, p, dst, 2 * LEAF_2M, Pattern::constant(0))?;
            cpu_check(env, p, dst + 2 * LEAF_2M, LEAF_2M, pat)?;
            ok(env.munmap(p, src, LEAF_2M), "munmap the hole's page")?;
            let s = dmem.stats();
            ensure!(
                s.vram.chunks == 1 && s.vram.pages == CHUNK_PAGES && s.cpu_faults == 0,
                "after the munmap: {s:?}"
            );
            ensure!(
                env.read(p, src, &mut [0u8; 8]).is_err(),
                "the unmapped page is still readable"
            );
            Ok(())
        })?;
        let s = dmem.stats();
        ensure!(s.vram.pages == 0 && s.cpu_faults == 0, "exit left {s:?}");
        ok(dmem.teardown(), "VRAM left allocated")
    }
}
