//! Device memory (issue 17): pages migrated to VRAM are read and written by
//! the GPU through VRAM leaves, and come back on a CPU fault or an explicit
//! migration (the hmm-tests intents `migrate`, `migrate_fault`,
//! `migrate_release`, `migrate_multiple`, `snapshot_device`). Each test
//! needs a GPU with VRAM, pins the migration policy to `None` (only its
//! explicit migrations move pages) and ends with the VRAM leak check.

use alloc::format;
use alloc::string::String;

use faultline_abi::{LEAF_2M, PAGE_SIZE};

use super::helpers::*;
use super::{Needs, Pattern, SvmEnv, TestResult};
use crate::gpu::{DeviceMemory, DmemStats, MigratePolicy, SnapEntry};

/// The device memory of the environment's GPU.
pub(super) fn device_memory<E: SvmEnv>(env: &E) -> Result<DeviceMemory<E::P>, String> {
    ok(
        DeviceMemory::new(env.gpu()),
        "device memory (the GPU needs VRAM)",
    )
}

/// A process with `pages` pages at `src` written with `pat`, and `pages`
/// more at `dst`.
pub(super) fn setup<E: SvmEnv>(
    env: &E,
    pages: u64,
    pat: Pattern,
) -> Result<(E::Process, u64, u64), String> {
    let len = pages * PAGE_SIZE;
    let (p, src) = spawn_mapped(env, len)?;
    let dst = mmap_rw(env, &p, len, "mmap dst")?;
    cpu_fill(env, &p, src, len, pat)?;
    Ok((p, src, dst))
}

pub(super) fn on_device<E: SvmEnv>(env: &E, p: &E::Process, va: u64, pages: u64) -> bool {
    (0..pages).all(|i| env.cpu_phys(p, va + i * PAGE_SIZE).is_none())
}

/// A device memory of the environment's GPU.
type DevMem<E> = DeviceMemory<<E as SvmEnv>::P>;

/// The two halves of the environment's VRAM, as two devices.
pub(super) fn two_devices<E: SvmEnv>(env: &E) -> Result<(DevMem<E>, DevMem<E>), String> {
    let half = (env.gpu().vram_size() / 2) & !(LEAF_2M - 1);
    let first = ok(DeviceMemory::part(env.gpu(), 0, half), "first half")?;
    let second = ok(DeviceMemory::part(env.gpu(), half, half), "second half")?;
    Ok((first, second))
}

pub(super) fn leak_check<P: crate::gpu::Platform>(dmem: DeviceMemory<P>) -> TestResult {
    ok(dmem.teardown(), "VRAM left allocated")
}

/// Migrate to VRAM; the GPU copies from the device pages (no CPU fault)
/// and fills them; CPU reads fault every page back with the GPU's data.
pub(super) mod migrate {
    use super::*;

    /// A GPU with VRAM (every host's default).
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let n = 16;
        let len = n * PAGE_SIZE;
        let pat = Pattern::page_index(0x7700);
        let (p, src, dst) = setup(env, n, pat)?;
        let dmem = device_memory(env)?;
        let c0 = counters(env);
        bound_with(env, p, migrating(MigratePolicy::None), |p, svm, chan| {
            ok(dmem.attach(svm), "attach")?;
            let moved = ok(dmem.migrate_to_device(svm, src, src + len), "migrate")?;
            ensure!(moved == n, "{moved} of {n} pages migrated");
            ensure!(on_device(env, p, src, n), "the CPU still maps a page");
            ok(copy(chan, dst, src, len), "copy from VRAM")?;
            cpu_check(env, p, dst, len, pat)?;
            ensure!(on_device(env, p, src, n), "a GPU read migrated a page back");
            ok(fill(chan, src, len, PAT), "fill VRAM")?;
            let s = dmem.stats();
            ensure!(
                s.cpu_faults == 0,
                "{} CPU faults before any CPU access",
                s.cpu_faults
            );
            cpu_check(env, p, src, len, Pattern::constant(PAT))?;
            let s = dmem.stats();
            ensure!(
                s == DmemStats {
                    to_device: n,
                    by_fault: 0,
                    to_system: 0,
                    cpu_faults: n,
                    ..Default::default()
                },
                "{s:?}"
            );
            // The GPU's counters (the per-test stats line) say the same.
            let c = counters(env);
            let moved = (
                c.pages_to_vram - c0.pages_to_vram,
                c.pages_to_system - c0.pages_to_system,
                c.pages_cpu_faulted_back - c0.pages_cpu_faulted_back,
            );
            ensure!(moved == (n, 0, n), "driver counters {moved:?}");
            dmem.detach(svm);
            Ok(())
        })?;
        leak_check(dmem)
    }
}

/// Migrate, fault half back with the CPU, migrate the mix again (only the
/// half in system memory moves), GPU copy, all back explicitly.
pub(super) mod migrate_fault {
    use super::*;

    /// A GPU with VRAM.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let n = 16;
        let len = n * PAGE_SIZE;
        let pat = Pattern::page_index(0x1f00);
        let (p, src, dst) = setup(env, n, pat)?;
        let dmem = device_memory(env)?;
        bound_with(env, p, migrating(MigratePolicy::None), |p, svm, chan| {
            ok(dmem.attach(svm), "attach")?;
            ok(dmem.migrate_to_device(svm, src, src + len), "migrate")?;
            cpu_check(env, p, src, len / 2, pat)?;
            let moved = ok(dmem.migrate_to_device(svm, src, src + len), "migrate again")?;
            ensure!(moved == n / 2, "{moved} pages migrated the second time");
            ok(copy(chan, dst, src, len), "copy from VRAM")?;
            cpu_check(env, p, dst, len, pat)?;
            let back = ok(dmem.migrate_to_system(svm, src, src + len), "migrate back")?;
            ensure!(back == n, "{back} of {n} pages migrated back");
            ensure!(dmem.stats().cpu_faults == n / 2, "{:?}", dmem.stats());
            cpu_check(env, p, src, len, pat)?;
            dmem.detach(svm);
            Ok(())
        })?;
        leak_check(dmem)
    }
}

/// The process exits with its pages in VRAM: every VRAM page is freed.
pub(super) mod migrate_release {
    use super::*;

    /// A GPU with VRAM.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let n = 32;
        let len = n * PAGE_SIZE;
        let (p, src, dst) = setup(env, n, Pattern::page_index(3))?;
        let dmem = device_memory(env)?;
        bound_with(env, p, migrating(MigratePolicy::None), |_, svm, chan| {
            ok(dmem.attach(svm), "attach")?;
            ok(dmem.migrate_to_device(svm, src, src + len), "migrate")?;
            ok(copy(chan, dst, src, len), "copy from VRAM")?;
            ensure!(dmem.stats().vram.pages == n, "{:?}", dmem.stats());
            Ok(())
        })?;
        ensure!(
            dmem.stats().vram.pages == 0,
            "exit left {:?}",
            dmem.stats().vram
        );
        leak_check(dmem)
    }
}

/// Ten round trips to VRAM and back, the GPU reading the device pages each
/// time, the CPU rewriting them in between.
pub(super) mod migrate_multiple {
    use super::*;

    /// A GPU with VRAM.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let n = 8;
        let len = n * PAGE_SIZE;
        let (p, src, dst) = setup(env, n, Pattern::constant(0))?;
        let dmem = device_memory(env)?;
        bound_with(env, p, migrating(MigratePolicy::None), |p, svm, chan| {
            ok(dmem.attach(svm), "attach")?;
            for round in 0..10 {
                let pat = Pattern::page_index(round << 32);
                cpu_fill(env, p, src, len, pat)?;
                let moved = ok(dmem.migrate_to_device(svm, src, src + len), "migrate")?;
                ensure!(moved == n, "round {round}: {moved} pages migrated");
                ok(copy(chan, dst, src, len), "copy from VRAM")?;
                cpu_check(env, p, dst, len, pat).map_err(|e| format!("round {round}: {e}"))?;
                let back = ok(dmem.migrate_to_system(svm, src, src + len), "back")?;
                ensure!(back == n, "round {round}: {back} pages back");
            }
            ensure!(dmem.stats().cpu_faults == 0, "{:?}", dmem.stats());
            dmem.detach(svm);
            Ok(())
        })?;
        leak_check(dmem)
    }
}

/// Migrate, munmap the middle of the range: its device pages go back to
/// the VRAM allocator at once (`page_free`) and its addresses fault; the
/// pages left on either side fault back with their data (hmm-tests'
/// `migrate_partial_unmap_fault`).
pub(super) mod migrate_partial_unmap_fault {
    use super::*;

    /// A GPU with VRAM.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let n = 16;
        let len = n * PAGE_SIZE;
        let (hole, hole_pages) = (4 * PAGE_SIZE, 4);
        let pat = Pattern::page_index(0x9a00);
        let (p, src, _) = setup(env, n, pat)?;
        let dmem = device_memory(env)?;
        bound_with(env, p, migrating(MigratePolicy::None), |p, svm, _| {
            ok(dmem.attach(svm), "attach")?;
            let moved = ok(dmem.migrate_to_device(svm, src, src + len), "migrate")?;
            ensure!(moved == n, "{moved} of {n} pages migrated");
            ok(
                env.munmap(p, src + hole, hole_pages * PAGE_SIZE),
                "munmap the middle",
            )?;
            let left = n - hole_pages;
            ensure!(
                dmem.stats().vram.pages == left,
                "after the munmap: {:?}",
                dmem.stats().vram
            );
            ensure!(
                env.read(p, src + hole, &mut [0u8; 8]).is_err(),
                "the unmapped middle is still readable"
            );
            // Each side against the pattern at its own offset.
            cpu_check(env, p, src, hole, pat)?;
            let after = src + hole + hole_pages * PAGE_SIZE;
            let rest = src + len - after;
            let shifted = Pattern::page_index(0x9a00 + hole / PAGE_SIZE + hole_pages);
            cpu_check(env, p, after, rest, shifted)?;
            let s = dmem.stats();
            ensure!(
                s.cpu_faults == left && s.vram.pages == 0,
                "after the CPU reads: {s:?}"
            );
            dmem.detach(svm);
            Ok(())
        })?;
        leak_check(dmem)
    }
}

/// A snapshot reports this context's device pages as device pages (their
/// VRAM offsets) without bringing them back, and another device memory's
/// pages as not there; a GPU access through this context faults those
/// back to system memory (the other memory's `migrate_to_ram`).
pub(super) mod snapshot_device {
    use super::*;

    /// A GPU with VRAM.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let n = 8;
        let len = n * PAGE_SIZE;
        let pat = Pattern::page_index(0x5d00);
        let (p, src, dst) = setup(env, 2 * n, pat)?;
        let (mine, theirs) = two_devices(env)?;
        let (other, _other_chan) = bind_with(env, &p, migrating(MigratePolicy::None))?;
        ok(theirs.attach(&other), "attach the other memory")?;
        bound_with(env, p, migrating(MigratePolicy::None), |p, svm, chan| {
            ok(mine.attach(svm), "attach")?;
            ok(mine.migrate_to_device(svm, src, src + len), "migrate")?;
            let far = src + len;
            ok(
                theirs.migrate_to_device(&other, far, far + len),
                "migrate (other)",
            )?;
            let snap = ok(svm.snapshot(src, src + 2 * len, 12), "snapshot")?;
            for (i, e) in snap.iter().enumerate() {
                let want_mine = (i as u64) < n;
                let fine = match *e {
                    SnapEntry::Device { vram, writable } => {
                        want_mine && writable && vram % PAGE_SIZE == 0
                    }
                    SnapEntry::None => !want_mine,
                    _ => false,
                };
                ensure!(fine, "page {i}: {e:?}");
            }
            let mut vram: alloc::vec::Vec<u64> = snap
                .iter()
                .filter_map(|e| match e {
                    SnapEntry::Device { vram, .. } => Some(*vram),
                    _ => None,
                })
                .collect();
            vram.sort_unstable();
            vram.dedup();
            ensure!(vram.len() as u64 == n, "VRAM pages shared: {vram:?}");
            ensure!(
                on_device(env, p, src, 2 * n),
                "a snapshot migrated a page back"
            );
            // The GPU reads both halves through this context.
            ok(copy(chan, dst, src, 2 * len), "copy")?;
            cpu_check(env, p, dst, 2 * len, pat)?;
            ensure!(on_device(env, p, src, n), "this device's pages came back");
            let s = theirs.stats();
            ensure!(
                s.cpu_faults == n && s.vram.pages == 0,
                "other memory: {s:?}"
            );
            ensure!(mine.stats().cpu_faults == 0, "{:?}", mine.stats());
            ok(mine.migrate_to_system(svm, src, src + len), "back")?;
            mine.detach(svm);
            Ok(())
        })?;
        theirs.detach(&other);
        drop(other);
        leak_check(mine)?;
        leak_check(theirs)
    }
}
