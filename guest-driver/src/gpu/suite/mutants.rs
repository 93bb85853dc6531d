//! Coherence under the windows classic SVM driver bugs fall into: each test
//! opens one (a munmap or mprotect while the device streams over the range,
//! an address-space change between `range_fault` and the map) and fails if
//! the device ever used a translation the CPU page table did not allow: a
//! command that ends with `Status::CoherenceViolation` (the device's checker
//! under `--gpu-check=fatal`) or a rise of the device's
//! `coherence_violations` counter, besides the test's own checks of device
//! leaves and memory. Each is the test that catches one driver mutant
//! (`gpu::mutant`, cargo feature `mutants`; `scripts/mutants.sh` runs
//! them); on the real driver they pass, with or without the checker.

use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use core::sync::atomic::{AtomicBool, Ordering};

use faultline_abi::{isa, Counter, Pte, Status, PAGE_SIZE};

use super::helpers::*;
use super::{Needs, Pattern, Prot, Segv, SvmEnv, TestResult};
use crate::gpu::{GpuError, Platform, Prefetch, SvmConfig};

/// What a freed frame is filled with while a test watches frees.
const CANARY: u64 = 0x0bad_f00d_feed_c0de;

/// The device's coherence-violation counter (0 without `--gpu-check`).
fn violations<E: SvmEnv>(env: &E) -> u64 {
    env.gpu()
        .device_counter(Counter::CoherenceViolations as u32)
}

/// Fails if the device counted a coherence violation since `before`.
fn no_new_violations<E: SvmEnv>(env: &E, before: u64, what: &str) -> TestResult {
    let n = violations(env).wrapping_sub(before);
    ensure!(
        n == 0,
        "{what}: the device used {n} translation(s) the CPU page table did not allow"
    );
    Ok(())
}

/// A command racing an address-space change may complete or be cancelled;
/// anything else (a coherence violation above all) fails the test.
fn completed_or_cancelled(r: Result<u64, GpuError>, what: &str) -> TestResult {
    match r {
        Ok(_) | Err(GpuError::Command(Status::Cancelled)) => Ok(()),
        Err(GpuError::Command(Status::CoherenceViolation)) => Err(format!(
            "{what}: the device's checker stopped it (coherence violation)"
        )),
        Err(e) => Err(format!("{what}: {e}")),
    }
}

/// Frames freed since tracking started that no longer hold the canary (the
/// device wrote them after the CPU gave them back).
fn overwritten<E: SvmEnv>(env: &E, freed: &[u64]) -> Option<u64> {
    freed.iter().copied().find(|&pa| {
        let mut b = [0u8; 8];
        env.read_phys(pa, &mut b);
        u64::from_le_bytes(b) != CANARY
    })
}

/// Pages the streaming kernel stores to, round after round.
const STREAM_PAGES: u64 = 4;
/// Rounds before the kernel gives up waiting for its stop word (a bound
/// for a broken run, about 2^24 warp-instructions; a good run stops after
/// a few).
const STREAM_ROUNDS: i32 = 1 << 20;

/// One thread that stores its countdown (`r3`, one less each round) to the
/// first word of every page of `[r1, r1 + r4)`, then to the progress word
/// (`r2 + 8`), and ends when the stop word (`r2`) is non-zero or the count
/// reaches 0. Its translations of the target stay in the device TLB while
/// the CPU changes the range.
const STREAM_KERNEL: [u64; 11] = [
    isa::encode(isa::MOVI, 6, 0, 0, 0),
    isa::encode(isa::ADD, 7, 1, 6, 0),
    isa::encode(isa::ST64, 0, 7, 3, 0),
    isa::encode(isa::ADDI, 6, 6, 0, PAGE_SIZE as i32),
    isa::encode(isa::BNE, 0, 6, 4, -3),
    isa::encode(isa::ST64, 0, 2, 3, 8),
    isa::encode(isa::LD64, 8, 2, 0, 0),
    isa::encode(isa::BNE, 0, 8, 0, 3),
    isa::encode(isa::ADDI, 3, 3, 0, -1),
    isa::encode(isa::BNE, 0, 3, 0, -9),
    isa::encode(isa::EXIT, 0, 0, 0, 0),
];

/// How long the CPU lets the kernel run on after the change (it goes on
/// only where the driver left it a translation), by the driver's clock.
const RUN_ON_NS: u64 = 50_000_000;

/// Spins (running the bottom half) until the u64 at `addr` differs from
/// `old` or `ns` passed.
fn wait_change<E: SvmEnv>(env: &E, p: &E::Process, addr: u64, old: u64, ns: u64) -> TestResult {
    let clock = env.gpu().platform().clone();
    let deadline = clock.now_ns().saturating_add(ns);
    while read_u64(env, p, addr)? == old && clock.now_ns() < deadline {
        env.gpu().poll(true);
    }
    Ok(())
}

/// What the CPU does to the target while the kernel streams over it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Change {
    /// munmap all of it (frames freed, under canary watch).
    Munmap,
    /// mprotect it read-only (a write-protection).
    ReadOnly,
}

/// Starts the streaming kernel over a fresh target, waits until it stored
/// to every page once, applies `change`, lets the kernel run on for a
/// while (until its next round or [`RUN_ON_NS`]), then stops it. Checks: the
/// kernel completed or was cancelled, no coherence violation, the device
/// keeps no leaf (munmap) or no writable leaf (mprotect) of the target, no
/// freed frame was written, and a read-only target did not change after
/// the mprotect returned.
fn stream_and_change<E: SvmEnv>(env: &E, change: Change) -> TestResult {
    let len = STREAM_PAGES * PAGE_SIZE;
    let (p, target) = spawn_mapped(env, len)?;
    let flags = mmap_rw(env, &p, PAGE_SIZE, "mmap flags")?;
    let code = mmap_rw(env, &p, PAGE_SIZE, "mmap code")?;
    write_code(env, &p, code, &STREAM_KERNEL)?;
    bound(env, p, |p, svm, chan| {
        let before = violations(env);
        let t = ok(
            chan.submit(&launch(
                code,
                &STREAM_KERNEL,
                1,
                1,
                [target, flags, STREAM_ROUNDS as u64, len],
            )),
            "launch",
        )?;
        // The bottom half runs while the CPU spins, so the kernel's first
        // faults are serviced here.
        wait_change(env, p, flags + 8, 0, env.gpu().config().timeout_ns)?;
        ensure!(
            read_u64(env, p, flags + 8)? != 0,
            "the kernel never finished a round"
        );
        if change == Change::Munmap {
            env.track_freed(Some(CANARY));
        }
        let r = match change {
            Change::Munmap => env.munmap(p, target, len),
            Change::ReadOnly => env.mprotect(p, target, len, Prot::READ),
        };
        // What the target holds once the change returned: from here on the
        // device must not write it.
        let after_change = match change {
            Change::Munmap => None,
            Change::ReadOnly => Some(read_u64(env, p, target)?),
        };
        // Let the kernel run on (if the driver left it a way) before it is
        // told to stop.
        let progress = read_u64(env, p, flags + 8)?;
        wait_change(env, p, flags + 8, progress, RUN_ON_NS)?;
        let freed = env.take_freed();
        write_u64(env, p, flags, 1)?;
        let done = chan.wait(t);
        let late = overwritten(env, &freed).or_else(|| overwritten(env, &env.take_freed()));
        env.track_freed(None);
        ok(r, "change of the target")?;
        completed_or_cancelled(done, "streaming kernel")?;
        no_new_violations(env, before, "streaming kernel")?;
        if let Some(pa) = late {
            return Err(format!(
                "freed frame {pa:#x} written by the device after the munmap"
            ));
        }
        for i in 0..STREAM_PAGES {
            let a = target + i * PAGE_SIZE;
            let leaf = svm.device_lookup(a);
            match change {
                Change::Munmap => {
                    ensure!(
                        leaf.is_none(),
                        "page {i}: device leaf {leaf:?} after munmap"
                    )
                }
                Change::ReadOnly => ensure!(
                    leaf.is_none_or(|l| !l.perms.intersects(Pte::WRITE | Pte::ATOMIC)),
                    "page {i}: device leaf {leaf:?} writable after mprotect read-only"
                ),
            }
        }
        match after_change {
            Some(v) => {
                let now = read_u64(env, p, target)?;
                ensure!(
                    now == v,
                    "read-only target changed from {v:#x} to {now:#x} after the mprotect"
                );
            }
            None => ensure!(
                env.read(p, target, &mut [0; 8]) == Err(Segv),
                "unmapped target still readable"
            ),
        }
        Ok(())
    })
}

/// munmap while a kernel stores to the range from its TLB: the munmap must
/// not return (and free the frames) before the device acknowledged the TLB
/// invalidate. Catches mutant (a) `NoAckWait`, with a late acknowledgement
/// (`--gpu-inject tlb_ack_delay_us=...`) holding the window open.
pub(super) mod munmap_during_stream {
    use super::*;

    /// Nothing beyond the defaults.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        stream_and_change(env, Change::Munmap)
    }
}

/// mprotect read-only while a kernel stores to the range from its TLB: the
/// downgrade must flush the device TLB, or the kernel goes on writing
/// read-only memory. Catches mutant (d) `MprotectNoFlush`.
pub(super) mod mprotect_during_stream {
    use super::*;

    /// Nothing beyond the defaults.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        stream_and_change(env, Change::ReadOnly)
    }
}

/// munmap half of a buffer the device has mapped while FILLs stream over
/// it: when the munmap returns the device maps none of the half, and no
/// freed frame is ever written. Catches mutant (e) `UnmapAfterFree`, whose
/// leaves survive the munmap.
pub(super) mod munmap_frees_after_clear {
    use super::*;

    /// Nothing beyond the defaults.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let len = 1 << 20;
        let (p, va) = spawn_mapped(env, len)?;
        bound(env, p, |p, svm, chan| {
            let before = violations(env);
            // Map everything on the device first, so the FILLs stream from
            // the TLB while the munmap runs.
            ok(fill(chan, va, len, 1), "warm fill")?;
            let half = va + len / 2;
            let mut tickets = alloc::vec::Vec::new();
            for i in 0..4 {
                tickets.push(ok(
                    chan.submit(&crate::gpu::Command::Fill {
                        dst: va,
                        len,
                        pattern: PAT + i,
                    }),
                    "submit",
                )?);
            }
            env.track_freed(Some(CANARY));
            let r = env.munmap(p, half, len / 2);
            let leaves: u64 = (0..len / 2 / PAGE_SIZE)
                .filter(|i| svm.device_lookup(half + i * PAGE_SIZE).is_some())
                .count() as u64;
            let mut outcome = Ok(());
            for t in tickets {
                if outcome.is_ok() {
                    outcome = completed_or_cancelled(chan.wait(t), "fill");
                } else {
                    let _ = chan.wait(t);
                }
            }
            // A device write to the unmapped half must fault and be
            // cancelled (the fault service is also where mutant (e) clears
            // the half, too late).
            let again = fill(chan, half, PAGE_SIZE, 2);
            let freed = env.take_freed();
            let late = overwritten(env, &freed);
            env.track_freed(None);
            ok(r, "munmap")?;
            ensure!(
                leaves == 0,
                "{leaves} device leaves of the unmapped half when munmap returned"
            );
            outcome?;
            no_new_violations(env, before, "fills")?;
            ensure!(cancelled(again), "write to the unmapped half: {again:?}");
            ensure!(
                freed.len() as u64 == len / 2 / PAGE_SIZE,
                "freed {} frames",
                freed.len()
            );
            if let Some(pa) = late {
                return Err(format!(
                    "freed frame {pa:#x} written by the device after the munmap"
                ));
            }
            Ok(())
        })
    }
}

/// The first fault-around window aligned inside a fresh read-write mapping:
/// the process, the mapping's start and the window's start.
fn aligned_window<E: SvmEnv>(env: &E) -> Result<(E::Process, u64), String> {
    let window = SvmConfig::default().fault_around;
    let p = env.spawn()?;
    let map = mmap_rw(env, &p, 2 * window, "mmap")?;
    Ok((p, (map + window - 1) & !(window - 1)))
}

/// munmap of half a window between `range_fault` and the driver's sequence
/// check (a check hook): the driver must retry and not map the pfns it got
/// before the munmap, whose frames are freed. Catches mutant (b)
/// `NoSeqCheck`.
pub(super) mod munmap_between_fault_and_map {
    use super::*;

    /// Nothing beyond the defaults.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let window = SvmConfig::default().fault_around;
        let (p, src) = aligned_window(env)?;
        let pat = Pattern::page_index(0x9000);
        cpu_fill(env, &p, src, window, pat)?;
        let dst = mmap_rw(env, &p, window, "mmap dst")?;
        let gone = src + window / 2;
        bound(env, p, |p, svm, chan| {
            let before = violations(env);
            let mm = env.mm(p);
            let fired = Arc::new(AtomicBool::new(false));
            let f2 = fired.clone();
            svm.set_check_hook(Some(Arc::new(move |start, end| {
                if start <= gone && gone < end && !f2.swap(true, Ordering::AcqRel) {
                    if let Err(e) = E::mm_munmap(&mm, gone, window / 2) {
                        log::warn!("munmap_between_fault_and_map: munmap: {e:?}");
                    }
                }
            })));
            env.track_freed(Some(CANARY));
            let r = copy(chan, dst, src, window);
            svm.set_check_hook(None);
            let freed = env.take_freed();
            env.track_freed(None);
            ensure!(fired.load(Ordering::Acquire), "the hook never ran");
            ensure!(
                freed.len() as u64 == window / 2 / PAGE_SIZE,
                "the hook's munmap freed {} frames",
                freed.len()
            );
            completed_or_cancelled(r, "copy")?;
            no_new_violations(env, before, "copy")?;
            for i in 0..window / PAGE_SIZE {
                let a = src + i * PAGE_SIZE;
                let dev = svm.device_lookup(a).map(|l| l.phys);
                let cpu = env.cpu_phys(p, a);
                ensure!(
                    dev.is_none() || dev == cpu,
                    "page {i}: device maps {dev:?}, CPU {cpu:?}"
                );
            }
            Ok(())
        })
    }
}

/// A write fault on the first page of a window whose other pages turn
/// read-only between `range_fault` and the sequence check (a check hook
/// runs mprotect): the retry maps each page with what its own pfn allows,
/// so the first page is writable, the others read-only, and a later device
/// write to one of them is refused. Catches mutant (c) `StrongestAccess`.
pub(super) mod window_access_per_page {
    use super::*;

    /// Nothing beyond the defaults.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let window = SvmConfig::default().fault_around;
        let (p, w) = aligned_window(env)?;
        let pat = Pattern::page_index(0xa000);
        cpu_fill(env, &p, w, window, pat)?;
        let ro = w + PAGE_SIZE;
        // The test is about a fault-around window: pinned, whatever the
        // GPU's prefetch policy.
        let cfg = SvmConfig {
            prefetch: Some(Prefetch::FaultAround),
            ..SvmConfig::default()
        };
        bound_with(env, p, cfg, |p, svm, chan| {
            let before = violations(env);
            let mm = env.mm(p);
            let fired = Arc::new(AtomicBool::new(false));
            let f2 = fired.clone();
            svm.set_check_hook(Some(Arc::new(move |start, end| {
                if start <= ro && ro < end && !f2.swap(true, Ordering::AcqRel) {
                    if let Err(e) = E::mm_mprotect(&mm, ro, window - PAGE_SIZE, Prot::READ) {
                        log::warn!("window_access_per_page: mprotect: {e:?}");
                    }
                }
            })));
            let r = fill(chan, w, PAGE_SIZE, PAT);
            svm.set_check_hook(None);
            ensure!(fired.load(Ordering::Acquire), "the hook never ran");
            ok(r, "write to the writable page")?;
            let leaf = svm.device_lookup(ro);
            let r = fill(chan, ro, PAGE_SIZE, PAT);
            if r == Err(GpuError::Command(Status::CoherenceViolation)) {
                return Err(String::from(
                    "write to the read-only page: the device's checker stopped it",
                ));
            }
            ensure!(cancelled(r), "write to the read-only page: {r:?}");
            no_new_violations(env, before, "fills")?;
            ensure!(
                leaf.is_none_or(|l| !l.perms.intersects(Pte::WRITE | Pte::ATOMIC)),
                "device leaf {leaf:?} of a read-only page is writable"
            );
            cpu_check(env, p, w, PAGE_SIZE, Pattern::constant(PAT))?;
            cpu_check(
                env,
                p,
                ro,
                window - PAGE_SIZE,
                Pattern::page_index(pat.at(PAGE_SIZE)),
            )
        })
    }
}
