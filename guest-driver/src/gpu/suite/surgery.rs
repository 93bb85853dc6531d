//! Address-space surgery on memory the device has mapped (issue 18): mremap
//! (move, grow, shrink, DONTUNMAP), partial munmap and mprotect splitting a
//! VMA at its start, middle or end (4 KiB and 2 MiB), madvise(DONTNEED).
//! Each test records the notifier events the operation fires with its own
//! subscriber on the address space and checks them exactly (kind and
//! range), then checks the device side: the affected part has no leaves
//! (or read-only ones), the rest keeps its leaves on the CPU's frames and
//! is used again without a single new fault.

use alloc::format;
use alloc::string::String;
use alloc::sync::{Arc, Weak};
use alloc::vec::Vec;

use faultline_abi::{Counter, InjectKnobs, Pte, LEAF_2M, PAGE_SIZE};
use lock_api::Mutex;

use super::dmem::{device_memory, leak_check};
use super::helpers::*;
use super::{Needs, Pattern, Prot, Segv, SvmEnv, TestResult};
use crate::errno::Errno;
use crate::gpu::{CounterSnapshot, PageSize};
use crate::mm::{
    mmu_notifier_register, mmu_notifier_unregister, Mm, MmuNotifier, MmuNotifierRange,
    MmuNotifyEvent, Mremap, MremapFlags, NotifierId,
};

/// One invalidation as a test expects it: `(start, end, event)`.
type Event = (u64, u64, MmuNotifyEvent);

/// A subscriber that records every invalidation of the address space.
struct Recorder<M: Mm> {
    events: Mutex<M::RawMutex, Vec<Event>>,
}

impl<M: Mm> MmuNotifier<M> for Recorder<M> {
    fn invalidate_range_start(&self, _mm: &M, r: &MmuNotifierRange) -> Result<(), Errno> {
        self.events.lock().push((r.start, r.end, r.event));
        Ok(())
    }
    fn invalidate_range_end(&self, _mm: &M, _r: &MmuNotifierRange) {}
    fn release(&self, _mm: &M) {}
}

/// A [`Recorder`] registered on one address space until dropped.
struct Watch<M: Mm> {
    mm: Arc<M>,
    rec: Arc<Recorder<M>>,
    id: NotifierId,
}

impl<M: Mm> Watch<M> {
    fn new(mm: Arc<M>) -> Self {
        let rec = Arc::new(Recorder {
            events: Mutex::new(Vec::new()),
        });
        let weak: Weak<dyn MmuNotifier<M>> = Arc::downgrade(&rec) as _;
        let id = mmu_notifier_register(&*mm, weak);
        Watch { mm, rec, id }
    }

    /// The events since the last call.
    fn take(&self) -> Vec<Event> {
        core::mem::take(&mut *self.rec.events.lock())
    }

    /// The events since the last call are exactly `want`.
    fn expect(&self, what: &str, want: &[Event]) -> TestResult {
        let got = self.take();
        ensure!(
            got == want,
            "{what}: invalidations {got:x?}, expected {want:x?}"
        );
        Ok(())
    }
}

impl<M: Mm> Drop for Watch<M> {
    fn drop(&mut self) {
        mmu_notifier_unregister(&*self.mm, self.id);
    }
}

fn watch<E: SvmEnv>(env: &E, p: &E::Process) -> Watch<E::M> {
    Watch::new(env.mm(p))
}

/// The device maps every `step` of `[va, va + len)` on the CPU's frame,
/// writable if `write` is `Some(true)`, read-only if `Some(false)`.
fn device_maps<E: SvmEnv>(
    env: &E,
    p: &E::Process,
    svm: &Svm<E>,
    va: u64,
    len: u64,
    step: u64,
    write: Option<bool>,
) -> TestResult {
    for a in (va..va + len).step_by(step as usize) {
        let leaf = svm.device_lookup(a);
        let cpu = env.cpu_phys(p, a);
        ensure!(
            leaf.is_some_and(|l| Some(l.phys) == cpu
                && write.is_none_or(|w| l.perms.contains(Pte::WRITE) == w)
                && (step == PAGE_SIZE || l.size == PageSize::Size2M)),
            "{:#x} (+{:#x}): device {leaf:?}, CPU {cpu:?} (want the CPU's frame, write {write:?})",
            a,
            a - va
        );
    }
    Ok(())
}

/// The device maps nothing in `[va, va + len)` (checked every `step`).
fn device_unmapped<E: SvmEnv>(svm: &Svm<E>, va: u64, len: u64, step: u64) -> TestResult {
    for a in (va..va + len).step_by(step as usize) {
        let leaf = svm.device_lookup(a);
        ensure!(
            leaf.is_none(),
            "{a:#x} (+{:#x}) still mapped on the device: {leaf:?}",
            a - va
        );
    }
    Ok(())
}

/// Faults the device raised so far.
fn raised<E: SvmEnv>(env: &E) -> u64 {
    env.gpu().device_counter(Counter::FaultsRaised as u32)
}

/// No fault was raised since `since` (the device's count): what `what`
/// accessed is still mapped. Spurious faults (the host's `--gpu-inject
/// spurious=P`, which INJECT_ACTIVE reports) hit mapped pages too, so with
/// them this proves nothing and is skipped.
fn no_faults_since<E: SvmEnv>(env: &E, since: u64, what: &str) -> TestResult {
    if env.gpu().inject_active().contains(InjectKnobs::SPURIOUS) {
        return Ok(());
    }
    let n = raised(env).wrapping_sub(since);
    ensure!(n == 0, "{what} faulted again: {n} faults raised");
    Ok(())
}

/// Counter increments from `a` to `b`, of the invalidation counters (for
/// the test's report line and its checks).
fn invalidation_delta(a: &CounterSnapshot, b: &CounterSnapshot) -> [u64; 7] {
    [
        b.invalidations - a.invalidations,
        b.invalidations_unmap - a.invalidations_unmap,
        b.invalidations_clear - a.invalidations_clear,
        b.invalidations_protect_vma - a.invalidations_protect_vma,
        b.invalidations_protect_page - a.invalidations_protect_page,
        b.tlb_invalidates - a.tlb_invalidates,
        b.faults_read - a.faults_read,
    ]
}

fn report(name: &str, a: &CounterSnapshot, b: &CounterSnapshot) {
    let [all, unmap, clear, pvma, ppage, tlb, faults] = invalidation_delta(a, b);
    log::info!(
        "{name}: invalidations {all} (unmap {unmap} clear {clear} protect_vma {pvma} \
         protect_page {ppage}) tlb_invalidates {tlb} faults {faults}"
    );
}

/// Where a partial operation cuts its VMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Start,
    Middle,
    End,
}

/// Which of a VMA's three units the cut removes.
fn cut_unit(part: Part) -> u64 {
    match part {
        Part::Start => 0,
        Part::Middle => 1,
        Part::End => 2,
    }
}

/// Partial munmap of a range the device mapped writable, in a 4 KiB VMA
/// (12 pages, 4 cut) and in a HUGE one (3 × 2 MiB, one cut): exactly the
/// cut part is invalidated (one `Unmap` of its range, one TLB
/// invalidation), the device keeps the rest (writing it again raises no
/// fault, unless spurious ones are injected), the cut part faults and is refused; cutting a 2 MiB page is
/// EINVAL and fires nothing.
fn partial_munmap<E: SvmEnv>(env: &E, part: Part) -> TestResult {
    let p = env.spawn()?;
    let (units, cut) = (3, cut_unit(part));
    let small = ok(
        env.mmap(&p, 0, units * 4 * PAGE_SIZE, Prot::RW, false),
        "mmap",
    )?;
    let huge = ok(
        env.mmap(&p, 0, units * LEAF_2M, Prot::RW, true),
        "mmap huge",
    )?;
    bound(env, p, |p, svm, chan| {
        let w = watch(env, p);
        for (va, unit, step) in [(small, 4 * PAGE_SIZE, PAGE_SIZE), (huge, LEAF_2M, LEAF_2M)] {
            let len = units * unit;
            let (cut_va, cut_len) = (va + cut * unit, unit);
            ok(fill(chan, va, len, PAT), "fill")?;
            device_maps(env, p, svm, va, len, step, Some(true))?;
            if step == LEAF_2M {
                let r = env.munmap(p, cut_va + PAGE_SIZE, PAGE_SIZE);
                ensure!(r == Err(Errno::EINVAL), "munmap inside a 2 MiB page: {r:?}");
            }
            w.take();
            let c0 = counters(env);
            ok(env.munmap(p, cut_va, cut_len), "munmap")?;
            let (c1, f1) = (counters(env), raised(env));
            w.expect(
                "munmap",
                &[(cut_va, cut_va + cut_len, MmuNotifyEvent::Unmap)],
            )?;
            let [all, unmap, .., tlb, _] = invalidation_delta(&c0, &c1);
            ensure!(
                all == 1 && unmap == 1 && tlb == 1,
                "munmap: {all} invalidations ({unmap} unmap), {tlb} TLB invalidations"
            );
            device_unmapped::<E>(svm, cut_va, cut_len, step)?;
            let kept = [
                (va, cut_va - va),
                (cut_va + cut_len, va + len - cut_va - cut_len),
            ];
            for (a, n) in kept.into_iter().filter(|k| k.1 > 0) {
                device_maps(env, p, svm, a, n, step, Some(true))?;
                ok(fill(chan, a, n, !PAT), "fill of the rest")?;
                cpu_check(env, p, a, n, Pattern::constant(!PAT))?;
            }
            no_faults_since(env, f1, "the rest")?;
            let c2 = counters(env);
            ensure!(
                cancelled(fill(chan, cut_va, cut_len, PAT)),
                "GPU write of the unmapped part"
            );
            ensure!(
                env.read(p, cut_va, &mut [0; 8]) == Err(Segv),
                "CPU read of the unmapped part"
            );
            report(&format!("partial_munmap_{part:?} unit {unit:#x}"), &c0, &c2);
        }
        Ok(())
    })
}

/// [`partial_munmap`] of a VMA's first part.
pub(super) mod partial_munmap_start {
    use super::*;

    /// Nothing beyond the defaults.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        partial_munmap(env, Part::Start)
    }
}

/// [`partial_munmap`] of a VMA's middle (the VMA splits in two).
pub(super) mod partial_munmap_middle {
    use super::*;

    /// Nothing beyond the defaults.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        partial_munmap(env, Part::Middle)
    }
}

/// [`partial_munmap`] of a VMA's last part.
pub(super) mod partial_munmap_end {
    use super::*;

    /// Nothing beyond the defaults.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        partial_munmap(env, Part::End)
    }
}

/// mprotect of the middle of a range the device mapped writable, 4 KiB
/// (16 pages, 4 in the middle) and 2 MiB (3 × 2 MiB, the middle one):
/// to read-only, one `ProtectionPage` of exactly the middle, whose leaves
/// stay on their frames read-only (a device write there is refused) while
/// the rest stays writable (written again without a fault); to PROT_NONE,
/// one `ProtectionVma` of the middle, whose leaves go while the rest
/// stays. Cutting a 2 MiB page is EINVAL and fires nothing.
pub(super) mod partial_mprotect_middle {
    use super::*;

    /// Nothing beyond the defaults.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let p = env.spawn()?;
        let small = ok(env.mmap(&p, 0, 12 * PAGE_SIZE, Prot::RW, false), "mmap")?;
        let huge = ok(env.mmap(&p, 0, 3 * LEAF_2M, Prot::RW, true), "mmap huge")?;
        bound(env, p, |p, svm, chan| {
            let w = watch(env, p);
            for (va, unit, step) in [(small, 4 * PAGE_SIZE, PAGE_SIZE), (huge, LEAF_2M, LEAF_2M)] {
                let len = 3 * unit;
                let mid = va + unit;
                let sides = [(va, unit), (mid + unit, unit)];
                ok(fill(chan, va, len, PAT), "fill")?;
                if step == LEAF_2M {
                    let r = env.mprotect(p, mid + PAGE_SIZE, PAGE_SIZE, Prot::READ);
                    ensure!(
                        r == Err(Errno::EINVAL),
                        "mprotect inside a 2 MiB page: {r:?}"
                    );
                }
                w.take();
                let c0 = counters(env);
                ok(env.mprotect(p, mid, unit, Prot::READ), "mprotect RO")?;
                w.expect(
                    "mprotect RO",
                    &[(mid, mid + unit, MmuNotifyEvent::ProtectionPage)],
                )?;
                device_maps(env, p, svm, mid, unit, step, Some(false))?;
                let f1 = raised(env);
                for (a, n) in sides {
                    device_maps(env, p, svm, a, n, step, Some(true))?;
                    ok(fill(chan, a, n, !PAT), "fill of a side")?;
                }
                no_faults_since(env, f1, "the sides")?;
                ensure!(
                    cancelled(fill(chan, mid, unit, 1)),
                    "GPU write of the read-only middle"
                );
                cpu_check(env, p, mid, unit, Pattern::constant(PAT))?;
                w.take();
                ok(env.mprotect(p, mid, unit, Prot::NONE), "mprotect NONE")?;
                w.expect(
                    "mprotect NONE",
                    &[(mid, mid + unit, MmuNotifyEvent::ProtectionVma)],
                )?;
                device_unmapped::<E>(svm, mid, unit, step)?;
                for (a, n) in sides {
                    device_maps(env, p, svm, a, n, step, Some(true))?;
                    cpu_check(env, p, a, n, Pattern::constant(!PAT))?;
                }
                let c3 = counters(env);
                let [_, _, _, pvma, ppage, ..] = invalidation_delta(&c0, &c3);
                ensure!(
                    pvma == 1 && ppage == 1,
                    "{pvma} protect_vma and {ppage} protect_page invalidations"
                );
                report(&format!("partial_mprotect_middle unit {unit:#x}"), &c0, &c3);
            }
            Ok(())
        })
    }
}

/// The CPU frames of the pages of `[va, va + len)`.
fn frames_of<E: SvmEnv>(env: &E, p: &E::Process, va: u64, len: u64) -> Vec<Option<u64>> {
    (va..va + len)
        .step_by(PAGE_SIZE as usize)
        .map(|a| env.cpu_phys(p, a))
        .collect()
}

/// A free address for `len` bytes: mapped by the host and unmapped again
/// (hosts never hand an address out twice).
fn free_range<E: SvmEnv>(env: &E, p: &E::Process, len: u64) -> Result<u64, String> {
    let va = mmap_rw(env, p, len, "mmap target")?;
    ok(env.munmap(p, va, len), "munmap target")?;
    Ok(va)
}

/// mremap of a range the device read: moved with MREMAP_FIXED, the old
/// range is invalidated (one `Unmap` of exactly it) and the new one needs
/// nothing; the PTEs moved (the new range maps the old frames), the old
/// range faults and is refused on the device and SIGSEGVs on the CPU, the
/// new one faults in fresh with the same data. Grown where something is
/// mapped right after, it moves (its old range invalidated, the new tail
/// zero); grown where nothing is, it grows in place and fires nothing;
/// shrunk, its tail is unmapped. Moved while in device memory, its pages
/// stay there and fault back at the new address (hmm-tests'
/// `migrate_remap_fault`).
pub(super) mod mremap_move {
    use super::*;

    /// A GPU with VRAM (every host's default).
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let len = 16 * PAGE_SIZE;
        let pat = Pattern::page_index(0x3e00);
        let (p, src) = spawn_mapped(env, len)?;
        let dst = mmap_rw(env, &p, 2 * len, "mmap dst")?;
        cpu_fill(env, &p, src, len, pat)?;
        let dmem = device_memory(env)?;
        bound(env, p, |p, svm, chan| {
            let w = watch(env, p);
            ok(copy(chan, dst, src, len), "copy")?;
            device_maps(env, p, svm, src, len, PAGE_SIZE, None)?;
            let to = free_range(env, p, len)?;
            let before = frames_of(env, p, src, len);
            w.take();
            let c0 = counters(env);
            let flags = MremapFlags::MAYMOVE | MremapFlags::FIXED;
            let r = env.mremap(
                p,
                Mremap {
                    old: src,
                    old_len: len,
                    new_len: len,
                    flags,
                    new_addr: to,
                },
            );
            ensure!(r == Ok(to), "mremap to {to:#x}: {r:x?}");
            w.expect("mremap", &[(src, src + len, MmuNotifyEvent::Unmap)])?;
            device_unmapped::<E>(svm, src, len, PAGE_SIZE)?;
            device_unmapped::<E>(svm, to, len, PAGE_SIZE)?;
            let after = frames_of(env, p, to, len);
            ensure!(
                after == before,
                "the PTEs did not move: {before:x?} before, {after:x?} after"
            );
            ensure!(
                cancelled(copy(chan, dst, src, len)),
                "GPU read of the old range"
            );
            ensure!(
                env.read(p, src, &mut [0; 8]) == Err(Segv),
                "CPU read of the old range"
            );
            ok(copy(chan, dst, to, len), "copy from the new range")?;
            cpu_check(env, p, dst, len, pat)?;
            device_maps(env, p, svm, to, len, PAGE_SIZE, None)?;

            // Grow by moving: something is mapped right after.
            let blocker = ok(env.mmap(p, to + len, PAGE_SIZE, Prot::RW, false), "blocker")?;
            w.take();
            let m = ok(
                env.mremap(
                    p,
                    Mremap {
                        old: to,
                        old_len: len,
                        new_len: 2 * len,
                        flags: MremapFlags::MAYMOVE,
                        new_addr: 0,
                    },
                ),
                "mremap grow",
            )?;
            ensure!(m != to, "grown in place over {blocker:#x}");
            w.expect("mremap grow", &[(to, to + len, MmuNotifyEvent::Unmap)])?;
            device_unmapped::<E>(svm, to, len, PAGE_SIZE)?;
            ok(copy(chan, dst, m, 2 * len), "copy from the grown range")?;
            cpu_check(env, p, dst, len, pat)?;
            cpu_check(env, p, dst + len, len, Pattern::constant(0))?;

            // Grow in place: nothing after it (hosts leave gaps), nothing
            // changes in the page table.
            let r = env.mremap(
                p,
                Mremap {
                    old: m,
                    old_len: 2 * len,
                    new_len: 3 * len,
                    flags: MremapFlags::empty(),
                    new_addr: 0,
                },
            );
            ensure!(r == Ok(m), "mremap grow in place: {r:x?}");
            w.expect("mremap grow in place", &[])?;
            device_maps(env, p, svm, m, 2 * len, PAGE_SIZE, None)?;
            cpu_check(env, p, m + 2 * len, len, Pattern::constant(0))?;

            // Shrink: the tail is unmapped.
            let r = env.mremap(
                p,
                Mremap {
                    old: m,
                    old_len: 3 * len,
                    new_len: len,
                    flags: MremapFlags::empty(),
                    new_addr: 0,
                },
            );
            ensure!(r == Ok(m), "mremap shrink: {r:x?}");
            w.expect(
                "mremap shrink",
                &[(m + len, m + 3 * len, MmuNotifyEvent::Unmap)],
            )?;
            device_maps(env, p, svm, m, len, PAGE_SIZE, None)?;
            device_unmapped::<E>(svm, m + len, 2 * len, PAGE_SIZE)?;

            // Device-private pages move too (hmm-tests' migrate_remap_fault):
            // still in VRAM after the move, faulted back at the new address.
            ok(dmem.attach(svm), "attach")?;
            let moved = ok(dmem.migrate_to_device(svm, m, m + len), "migrate")?;
            ensure!(moved == 16, "{moved} of 16 pages migrated");
            let far = free_range(env, p, len)?;
            w.take();
            let r = env.mremap(
                p,
                Mremap {
                    old: m,
                    old_len: len,
                    new_len: len,
                    flags,
                    new_addr: far,
                },
            );
            ensure!(r == Ok(far), "mremap of device pages: {r:x?}");
            w.expect(
                "mremap device pages",
                &[(m, m + len, MmuNotifyEvent::Unmap)],
            )?;
            let s = dmem.stats();
            ensure!(s.vram.pages == 16, "after the mremap: {s:?}");
            cpu_check(env, p, far, len, pat)?;
            let s = dmem.stats();
            ensure!(
                s.vram.pages == 0 && s.cpu_faults == 16,
                "after the CPU reads: {s:?}"
            );
            ensure!(
                env.read(p, m, &mut [0; 8]) == Err(Segv),
                "CPU read of the old range"
            );
            dmem.detach(svm);
            report("mremap_move", &c0, &counters(env));
            Ok(())
        })?;
        leak_check(dmem)
    }
}

/// mremap with MREMAP_DONTUNMAP of a range the device read: the pages
/// move (the new range maps the old frames, one `Unmap` of the old
/// range), the old range stays mapped and empty: CPU and GPU read zeros
/// there, the new range has the data. A length change is EINVAL.
pub(super) mod mremap_dontunmap {
    use super::*;

    /// Nothing beyond the defaults.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let len = 16 * PAGE_SIZE;
        let pat = Pattern::page_index(0x4d00);
        let (p, src) = spawn_mapped(env, len)?;
        let dst = mmap_rw(env, &p, len, "mmap dst")?;
        cpu_fill(env, &p, src, len, pat)?;
        bound(env, p, |p, svm, chan| {
            let w = watch(env, p);
            ok(copy(chan, dst, src, len), "copy")?;
            let to = free_range(env, p, len)?;
            let before = frames_of(env, p, src, len);
            let flags = MremapFlags::MAYMOVE | MremapFlags::FIXED | MremapFlags::DONTUNMAP;
            let args = Mremap {
                old: src,
                old_len: len,
                new_len: 2 * len,
                flags,
                new_addr: to,
            };
            let r = env.mremap(p, args);
            ensure!(r == Err(Errno::EINVAL), "DONTUNMAP growing: {r:x?}");
            w.take();
            let c0 = counters(env);
            let r = env.mremap(
                p,
                Mremap {
                    new_len: len,
                    ..args
                },
            );
            ensure!(r == Ok(to), "mremap to {to:#x}: {r:x?}");
            w.expect("mremap", &[(src, src + len, MmuNotifyEvent::Unmap)])?;
            device_unmapped::<E>(svm, src, len, PAGE_SIZE)?;
            let after = frames_of(env, p, to, len);
            ensure!(
                after == before,
                "the PTEs did not move: {before:x?} before, {after:x?} after"
            );
            ensure!(
                frames_of(env, p, src, len).iter().all(Option::is_none),
                "the old range kept pages"
            );
            ok(copy(chan, dst, src, len), "copy from the old range")?;
            cpu_check(env, p, dst, len, Pattern::constant(0))?;
            cpu_check(env, p, src, len, Pattern::constant(0))?;
            ok(copy(chan, dst, to, len), "copy from the new range")?;
            cpu_check(env, p, dst, len, pat)?;
            cpu_check(env, p, to, len, pat)?;
            report("mremap_dontunmap", &c0, &counters(env));
            Ok(())
        })
    }
}

/// madvise(DONTNEED) of the middle of a range the device mapped: one
/// `Clear` of exactly the middle, whose device leaves go while the rest
/// stays; the GPU then reads zeros there (after refaulting) and the data
/// elsewhere. The same for one 2 MiB page of a HUGE VMA (cutting one is
/// EINVAL), and for pages in device memory, which go back to the device
/// (`page_free`) and read as zeros.
pub(super) mod madvise_dontneed {
    use super::*;

    /// A GPU with VRAM (every host's default).
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let p = env.spawn()?;
        let small = ok(env.mmap(&p, 0, 12 * PAGE_SIZE, Prot::RW, false), "mmap")?;
        let huge = ok(env.mmap(&p, 0, 2 * LEAF_2M, Prot::RW, true), "mmap huge")?;
        let dst = mmap_rw(env, &p, 16 * PAGE_SIZE, "mmap dst")?;
        let dev = mmap_rw(env, &p, 16 * PAGE_SIZE, "mmap dev")?;
        let dmem = device_memory(env)?;
        bound(env, p, |p, svm, chan| {
            let w = watch(env, p);
            let c0 = counters(env);
            // 4 KiB: the middle 4 of 12 pages.
            let (mid, n) = (small + 4 * PAGE_SIZE, 4 * PAGE_SIZE);
            ok(fill(chan, small, 12 * PAGE_SIZE, PAT), "fill")?;
            w.take();
            ok(env.madvise_dontneed(p, mid, n), "madvise")?;
            w.expect("madvise", &[(mid, mid + n, MmuNotifyEvent::Clear)])?;
            device_unmapped::<E>(svm, mid, n, PAGE_SIZE)?;
            device_maps(env, p, svm, small, 4 * PAGE_SIZE, PAGE_SIZE, Some(true))?;
            device_maps(env, p, svm, mid + n, 4 * PAGE_SIZE, PAGE_SIZE, Some(true))?;
            ok(copy(chan, dst, small, 12 * PAGE_SIZE), "copy")?;
            cpu_check(env, p, dst, 4 * PAGE_SIZE, Pattern::constant(PAT))?;
            cpu_check(env, p, dst + 4 * PAGE_SIZE, n, Pattern::constant(0))?;
            cpu_check(env, p, dst + 8 * PAGE_SIZE, n, Pattern::constant(PAT))?;
            cpu_check(env, p, mid, n, Pattern::constant(0))?;

            // 2 MiB: the second page of two.
            let second = huge + LEAF_2M;
            ok(fill(chan, huge, 2 * LEAF_2M, PAT), "fill huge")?;
            let r = env.madvise_dontneed(p, second + PAGE_SIZE, PAGE_SIZE);
            ensure!(
                r == Err(Errno::EINVAL),
                "madvise inside a 2 MiB page: {r:?}"
            );
            w.take();
            ok(env.madvise_dontneed(p, second, LEAF_2M), "madvise huge")?;
            w.expect(
                "madvise huge",
                &[(second, second + LEAF_2M, MmuNotifyEvent::Clear)],
            )?;
            device_unmapped::<E>(svm, second, LEAF_2M, LEAF_2M)?;
            device_maps(env, p, svm, huge, LEAF_2M, LEAF_2M, Some(true))?;
            ok(copy(chan, dst, second + LEAF_2M - n, n), "copy huge")?;
            cpu_check(env, p, dst, n, Pattern::constant(0))?;

            // Device memory: 4 of 16 pages dropped go back to the device.
            ok(dmem.attach(svm), "attach")?;
            cpu_fill(env, p, dev, 16 * PAGE_SIZE, Pattern::constant(PAT))?;
            let moved = ok(
                dmem.migrate_to_device(svm, dev, dev + 16 * PAGE_SIZE),
                "migrate",
            )?;
            ensure!(moved == 16, "{moved} of 16 pages migrated");
            w.take();
            ok(env.madvise_dontneed(p, dev, n), "madvise device pages")?;
            w.expect(
                "madvise device pages",
                &[(dev, dev + n, MmuNotifyEvent::Clear)],
            )?;
            let s = dmem.stats();
            ensure!(s.vram.pages == 12, "after the madvise: {s:?}");
            ok(copy(chan, dst, dev, 16 * PAGE_SIZE), "copy device pages")?;
            cpu_check(env, p, dst, n, Pattern::constant(0))?;
            cpu_check(env, p, dst + n, 12 * PAGE_SIZE, Pattern::constant(PAT))?;
            cpu_check(env, p, dev, n, Pattern::constant(0))?;
            cpu_check(env, p, dev + n, 12 * PAGE_SIZE, Pattern::constant(PAT))?;
            let c1 = counters(env);
            let [_, _, clear, ..] = invalidation_delta(&c0, &c1);
            ensure!(clear >= 3, "{clear} clear invalidations");
            report("madvise_dontneed", &c0, &c1);
            dmem.detach(svm);
            Ok(())
        })?;
        leak_check(dmem)
    }
}
