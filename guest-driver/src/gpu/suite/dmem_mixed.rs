//! Device memory over mappings that are not plain private RW memory, and
//! a migration racing a CPU fault (issue 17, hmm-tests' `migrate_shared`,
//! `migrate_mixed`; `migrate_race` staged on one CPU). Each test ends with
//! the VRAM leak check of every device memory it used; each pins the
//! migration policy to `None`, so only its explicit migrations move pages.
//!
//! hmm-tests reads test_hmm's errors: `-ENOENT` when, after the migration,
//! the device's own table has no page of the range, `-EINVAL` at the first
//! hole or unreadable VMA. [`DeviceMemory::migrate_to_device`] answers with
//! the number of pages migrated instead and steps over holes and
//! unreadable VMAs (the range is served VMA by VMA, as a prefetch is), so
//! these tests check `Ok(0)` where hmm-tests expects `-ENOENT`, plus a
//! snapshot that shows no device page; and that a hole or a PROT_NONE VMA
//! inside the range keeps its pages where they were.

use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;

use faultline_abi::{Pte, PAGE_SIZE};

use super::dmem::{device_memory, leak_check, on_device, setup, two_devices};
use super::helpers::*;
use super::{Needs, Pattern, Prot, Segv, SvmEnv, TestResult};
use crate::errno::Errno;
use crate::gpu::{DmemStats, MigrateHook, MigratePolicy, SnapEntry};
use crate::mm::migrate::{migrate_vma_setup, MigrateSelect, MigrateSrc};
use crate::mm::{DeviceOwner, FaultError, FaultFlags, Mm, MmapReadGuard, PageState};
use crate::sync::SpinMutex;

/// A shared anonymous mapping is not migrated (hmm-tests expects ENOENT:
/// no page of it reached the device); its pages stay system pages, which
/// the GPU still reads and writes through HMM as usual.
pub(super) mod migrate_shared {
    use super::*;

    /// A GPU with VRAM.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let n = 8;
        let len = n * PAGE_SIZE;
        let pat = Pattern::page_index(0x5400);
        let p = env.spawn()?;
        let src = ok(env.mmap_shared(&p, 0, len, Prot::RW), "mmap shared")?;
        let dst = mmap_rw(env, &p, len, "mmap dst")?;
        cpu_fill(env, &p, src, len, pat)?;
        let dmem = device_memory(env)?;
        bound_with(env, p, migrating(MigratePolicy::None), |p, svm, chan| {
            ok(dmem.attach(svm), "attach")?;
            let moved = ok(dmem.migrate_to_device(svm, src, src + len), "migrate")?;
            ensure!(moved == 0, "{moved} pages of a shared mapping migrated");
            let snap = ok(svm.snapshot(src, src + len, 12), "snapshot")?;
            for (i, e) in snap.iter().enumerate() {
                let cpu = env.cpu_phys(p, src + i as u64 * PAGE_SIZE);
                let fine =
                    matches!(*e, SnapEntry::Valid { phys, writable: true } if Some(phys) == cpu);
                ensure!(fine, "page {i}: {e:?}, the CPU maps {cpu:?}");
            }
            ok(
                copy(chan, dst, src, len),
                "GPU copy from the shared mapping",
            )?;
            cpu_check(env, p, dst, len, pat)?;
            ok(fill(chan, src, len, PAT), "GPU fill of the shared mapping")?;
            cpu_check(env, p, src, len, Pattern::constant(PAT))?;
            let s = dmem.stats();
            ensure!(s == DmemStats::default(), "{s:?}");
            dmem.detach(svm);
            Ok(())
        })?;
        leak_check(dmem)
    }
}

/// One range of every kind hmm-tests' `migrate_mixed` and `snapshot` mix,
/// migrated to device A at once: each kind does what Linux's migrate_vma
/// does with it, the GPU reads all of it with the right data, read-only
/// stays read-only for the GPU, CPU reads bring everything back.
pub(super) mod migrate_mixed {
    use super::*;

    /// A GPU with VRAM.
    pub const NEEDS: Needs = Needs::DEFAULT;

    /// What one page of the range is.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Kind {
        /// Written, read-write.
        Data,
        /// Unmapped: skipped by the migration, a fault for the GPU.
        Hole,
        /// Written, then PROT_NONE: skipped, a fault for the GPU.
        ProtNone,
        /// Written, then read-only: migrated, read-only on the device.
        ReadOnly,
        /// Read-only, read by the CPU (the zero page): a zeroed device
        /// page, read-only.
        ReadOnlyZero,
        /// Never touched: a zeroed device page (Linux migrates holes of
        /// private anonymous VMAs).
        Untouched,
        /// Read by the CPU (the zero page): a zeroed device page,
        /// writable as its VMA.
        Zero,
        /// Written, then migrated to device B: A's migration selects
        /// system memory only, so the page stays with B.
        Theirs,
    }
    use Kind::*;

    const LAYOUT: [Kind; 9] = [
        Data,
        Hole,
        ProtNone,
        ReadOnly,
        ReadOnlyZero,
        Untouched,
        Zero,
        Data,
        Theirs,
    ];

    fn written(k: Kind) -> bool {
        matches!(k, Data | ProtNone | ReadOnly | Theirs)
    }

    fn to_a(k: Kind) -> bool {
        matches!(k, Data | ReadOnly | ReadOnlyZero | Untouched | Zero)
    }

    /// What every word of page `i` holds.
    fn want(i: usize) -> Pattern {
        if written(LAYOUT[i]) {
            Pattern::constant(0x6d00 + i as u64)
        } else {
            Pattern::constant(0)
        }
    }

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let n = LAYOUT.len() as u64;
        let (p, base) = spawn_mapped(env, n * PAGE_SIZE)?;
        let dst = mmap_rw(env, &p, n * PAGE_SIZE, "mmap dst")?;
        let page = |i: usize| base + i as u64 * PAGE_SIZE;
        for (i, &k) in LAYOUT.iter().enumerate() {
            if written(k) {
                cpu_fill(env, &p, page(i), PAGE_SIZE, want(i))?;
            }
            match k {
                Hole => ok(env.munmap(&p, page(i), PAGE_SIZE), "munmap")?,
                ProtNone => ok(
                    env.mprotect(&p, page(i), PAGE_SIZE, Prot::NONE),
                    "PROT_NONE",
                )?,
                ReadOnly | ReadOnlyZero => ok(
                    env.mprotect(&p, page(i), PAGE_SIZE, Prot::READ),
                    "read-only",
                )?,
                _ => {}
            }
            if matches!(k, Zero | ReadOnlyZero) {
                ensure!(read_u64(env, &p, page(i))? == 0, "page {i} is not zero");
            }
        }
        let theirs_at = LAYOUT
            .iter()
            .position(|&k| k == Theirs)
            .expect("in the layout");
        let (a, b) = two_devices(env)?;
        let (other, _other_chan) = bind_with(env, &p, migrating(MigratePolicy::None))?;
        ok(b.attach(&other), "attach B")?;
        let moved = ok(
            b.migrate_to_device(&other, page(theirs_at), page(theirs_at) + PAGE_SIZE),
            "migrate to B",
        )?;
        ensure!(moved == 1, "{moved} pages migrated to B");
        bound_with(env, p, migrating(MigratePolicy::None), |p, svm, chan| {
            ok(a.attach(svm), "attach A")?;
            let moved = ok(
                a.migrate_to_device(svm, base, page(LAYOUT.len())),
                "migrate",
            )?;
            let expect = LAYOUT.iter().filter(|&&k| to_a(k)).count() as u64;
            ensure!(
                moved == expect,
                "{moved} pages migrated to A, expected {expect}"
            );
            ensure!(b.stats().vram.pages == 1, "B: {:?}", b.stats());
            for (i, &k) in LAYOUT.iter().enumerate() {
                let snap = svm.snapshot(page(i), page(i) + PAGE_SIZE, 12);
                let fine = match (k, snap.as_deref()) {
                    (Hole, Err(Errno::EFAULT)) | (ProtNone, Err(Errno::EPERM)) => true,
                    (Theirs, Ok([SnapEntry::None])) => true,
                    (_, Ok([SnapEntry::Device { writable, .. }])) => {
                        to_a(k) && *writable == !matches!(k, ReadOnly | ReadOnlyZero)
                    }
                    _ => false,
                };
                ensure!(fine, "page {i} ({k:?}) after the migration: {snap:?}");
                if to_a(k) || k == Theirs {
                    ensure!(env.cpu_phys(p, page(i)).is_none(), "the CPU maps page {i}");
                }
            }
            // The GPU reads every page: A's from VRAM, B's brought back to
            // system memory by B, the hole and PROT_NONE refused.
            for (i, &k) in LAYOUT.iter().enumerate() {
                let r = copy(chan, dst + i as u64 * PAGE_SIZE, page(i), PAGE_SIZE);
                if matches!(k, Hole | ProtNone) {
                    ensure!(cancelled(r), "GPU read of page {i} ({k:?}): {r:?}");
                    continue;
                }
                ok(r, "GPU read")?;
                cpu_check(env, p, dst + i as u64 * PAGE_SIZE, PAGE_SIZE, want(i))
                    .map_err(|e| alloc::format!("page {i} ({k:?}) as the GPU read it: {e}"))?;
            }
            let s = b.stats();
            ensure!(s.cpu_faults == 1 && s.vram.pages == 0, "B: {s:?}");
            ensure!(a.stats().cpu_faults == 0, "A: {:?}", a.stats());
            for (i, &k) in LAYOUT.iter().enumerate() {
                if !matches!(k, ReadOnly | ReadOnlyZero) {
                    continue;
                }
                let leaf = svm.device_lookup(page(i));
                let ro_vram = leaf
                    .is_some_and(|l| l.perms.contains(Pte::VRAM) && !l.perms.contains(Pte::WRITE));
                ensure!(ro_vram, "page {i} ({k:?}) is mapped {leaf:?}");
                let r = fill(chan, page(i), PAGE_SIZE, PAT);
                ensure!(cancelled(r), "GPU write of page {i} ({k:?}): {r:?}");
            }
            // CPU reads bring A's pages back, with their data.
            for (i, &k) in LAYOUT.iter().enumerate() {
                match k {
                    Hole => ensure!(
                        env.read(p, page(i), &mut [0u8; 8]) == Err(Segv),
                        "the hole is readable"
                    ),
                    ProtNone => {
                        ok(env.mprotect(p, page(i), PAGE_SIZE, Prot::READ), "mprotect")?;
                        cpu_check(env, p, page(i), PAGE_SIZE, want(i))?;
                    }
                    _ => cpu_check(env, p, page(i), PAGE_SIZE, want(i))?,
                }
            }
            let s = a.stats();
            let back = DmemStats {
                to_device: expect,
                by_fault: 0,
                to_system: 0,
                cpu_faults: expect,
                ..Default::default()
            };
            ensure!(s == back, "A at the end: {s:?}");
            a.detach(svm);
            Ok(())
        })?;
        b.detach(&other);
        drop(other);
        leak_check(a)?;
        leak_check(b)
    }
}

/// A CPU fault and a second migration while `migrate_to_device` holds the
/// range between setup and copy, staged on one CPU with the migration's
/// hook (the hook runs what a second CPU would, under the mmap lock the
/// migration shares with it). The first half of the range is already in
/// VRAM, the second half in system memory; the migration collects (locks)
/// the second half. Meanwhile:
///
/// 1. the CPU faults on every page: a device page of the first half,
///    which the migration did not collect, comes back at once (the
///    fault's own one-page migration, `migrate_to_ram`); a page of the
///    second half is locked, so the fault answers `Retry` (Linux's
///    `do_swap_page` waits on the migration entry; with ALLOW_RETRY it
///    returns instead, and one CPU cannot wait for itself);
/// 2. another migration of the range collects only what nobody holds:
///    the first half, just back in system memory, and not one page of the
///    second (Linux's `migrate_vma_collect_pmd` skips what it cannot lock).
///    It is abandoned, which puts its pages back.
///
/// Then the first migration copies and installs its half. Final state:
/// first half in system memory, second in VRAM, data right in both
/// places and for the GPU, no stale device leaf; CPU reads bring it all
/// back, and no VRAM is left allocated.
pub(super) mod migrate_race {
    use super::*;

    /// A GPU with VRAM.
    pub const NEEDS: Needs = Needs::DEFAULT;

    /// The hook's stage, on the range `[src, src + n pages)` whose pages
    /// below `half` are device pages this migration did not take.
    fn stage<M: Mm>(
        mmap: &MmapReadGuard<'_, M>,
        src: u64,
        n: u64,
        half: u64,
        owner: DeviceOwner,
    ) -> TestResult {
        let mm = mmap.mm();
        for i in 0..n {
            let va = src + i * PAGE_SIZE;
            let r = mm.handle_mm_fault(mmap, va, FaultFlags::ALLOW_RETRY);
            let now = mm.walk(mmap, va).state;
            let fine = if i < half {
                r.is_ok() && matches!(now, PageState::Present { .. })
            } else {
                r == Err(FaultError::Retry) && now == PageState::Migration
            };
            ensure!(fine, "page {i}: CPU fault {r:?}, then {now:?}");
        }
        let select = MigrateSelect::SYSTEM | MigrateSelect::DEVICE_PRIVATE;
        let other = ok(
            migrate_vma_setup(mmap, src, src + n * PAGE_SIZE, select, Some(owner)),
            "second migration",
        )?;
        let taken: Vec<usize> = other
            .pages()
            .iter()
            .enumerate()
            .filter(|(_, p)| p.src != MigrateSrc::Skip)
            .map(|(i, _)| i)
            .collect();
        ensure!(
            taken.iter().copied().eq(0..half as usize),
            "the second migration collected pages {taken:?}"
        );
        Ok(())
    }

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let (n, half) = (16, 8);
        let len = n * PAGE_SIZE;
        let pat = Pattern::page_index(0x3c00);
        let (p, src, dst) = setup(env, n, pat)?;
        let dmem = device_memory(env)?;
        bound_with(env, p, migrating(MigratePolicy::None), |p, svm, chan| {
            ok(dmem.attach(svm), "attach")?;
            let first = half * PAGE_SIZE;
            let moved = ok(dmem.migrate_to_device(svm, src, src + first), "first half")?;
            ensure!(moved == half, "{moved} pages of the first half migrated");
            // The GPU maps both halves (VRAM and system leaves) first.
            ok(copy(chan, dst, src, len), "copy before the race")?;
            let owner = dmem.owner();
            let report: Arc<SpinMutex<Option<TestResult>>> = Arc::new(SpinMutex::new(None));
            let r2 = report.clone();
            let hook: MigrateHook<E::M> =
                Arc::new(move |mmap: &MmapReadGuard<'_, E::M>, a: u64, b: u64| {
                    if a < src + len && src < b && r2.lock().is_none() {
                        let r = stage(mmap, src, n, half, owner);
                        *r2.lock() = Some(r);
                    }
                });
            svm.set_migrate_hook(Some(hook));
            let moved = dmem.migrate_to_device(svm, src, src + len);
            svm.set_migrate_hook(None);
            let staged = report.lock().take();
            match staged {
                Some(r) => r?,
                None => return Err(String::from("the migration never ran the hook")),
            }
            let moved = ok(moved, "migrate during the race")?;
            ensure!(moved == n - half, "{moved} pages migrated during the race");
            let s = dmem.stats();
            ensure!(
                s.to_device == n && s.cpu_faults == half && s.vram.pages == n - half,
                "after the race: {s:?}"
            );
            for i in 0..n {
                let va = src + i * PAGE_SIZE;
                let (cpu, dev) = (env.cpu_phys(p, va), svm.device_lookup(va));
                let vram = dev.map(|l| l.perms.contains(Pte::VRAM));
                let fine = if i < half {
                    cpu.is_some()
                        && (dev.is_none() || (vram == Some(false) && dev.map(|l| l.phys) == cpu))
                } else {
                    cpu.is_none() && (dev.is_none() || vram == Some(true))
                };
                ensure!(fine, "page {i}: CPU {cpu:?}, device {dev:?}");
            }
            cpu_fill(env, p, dst, len, Pattern::constant(0))?;
            ok(copy(chan, dst, src, len), "copy after the race")?;
            cpu_check(env, p, dst, len, pat)?;
            ensure!(
                on_device(env, p, src + first, n - half),
                "a GPU read brought a page back"
            );
            cpu_check(env, p, src, len, pat)?;
            let s = dmem.stats();
            ensure!(
                s.cpu_faults == n && s.vram.pages == 0,
                "after the CPU reads: {s:?}"
            );
            dmem.detach(svm);
            Ok(())
        })?;
        leak_check(dmem)
    }
}
