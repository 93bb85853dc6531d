//! The SVM test suite, shared by the host loopback (`cargo test`) and the
//! in-guest suite: every test is a function generic over [`SvmEnv`], the
//! few things an OS offers a GPU test (processes, mmap/munmap/mprotect, CPU
//! access to process memory, frame accounting). Names follow issue 7.
//!
//! Run them with [`run`]; each returns `Err(message)` on failure.

use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use bitflags::bitflags;
use faultline_abi::{atomic_op, isa, Counter, Status, LEAF_2M, PAGE_SIZE};

use super::{
    Channel, Command, Gpu, GpuError, PageSize, Platform, SnapEntry, SvmConfig, SvmContext,
};
use crate::errno::Errno;
use crate::hmm::{range_register, range_unregister, HmmRange};
use crate::mm::{
    mmu_notifier_invalidate_range_end, mmu_notifier_invalidate_range_start, Mm, MmuNotifierRange,
    MmuNotifyEvent,
};

bitflags! {
    /// mmap/mprotect protection (empty = PROT_NONE).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Prot: u32 {
        /// PROT_READ.
        const READ = 1;
        /// PROT_WRITE (implies READ for the CPU here).
        const WRITE = 2;
    }
}

impl Prot {
    /// PROT_READ | PROT_WRITE.
    pub const RW: Prot = Prot::READ.union(Prot::WRITE);
    /// PROT_NONE.
    pub const NONE: Prot = Prot::empty();
}

/// A CPU access that would have raised SIGSEGV (or SIGBUS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segv;

/// What the suite needs from its host.
pub trait SvmEnv {
    /// The machine interface of the GPU.
    type P: Platform;
    /// The process address space.
    type M: Mm;
    /// A process (dropping it without [`SvmEnv::exit`] is not expected).
    type Process;

    /// The probed GPU.
    fn gpu(&self) -> &Arc<Gpu<Self::P>>;
    /// A new process with an empty address space.
    fn spawn(&self) -> Result<Self::Process, String>;
    /// Its address space (a structure reference).
    fn mm(&self, p: &Self::Process) -> Arc<Self::M>;
    /// Process exit: drops the process's users reference on its mm.
    fn exit(&self, p: Self::Process);
    /// Anonymous private mapping at `hint` (fixed, must not overlap; 0 lets
    /// the host choose). `huge`: 2 MiB pages (hint and len 2 MiB aligned).
    fn mmap(
        &self,
        p: &Self::Process,
        hint: u64,
        len: u64,
        prot: Prot,
        huge: bool,
    ) -> Result<u64, Errno>;
    /// munmap.
    fn munmap(&self, p: &Self::Process, addr: u64, len: u64) -> Result<(), Errno>;
    /// mprotect.
    fn mprotect(&self, p: &Self::Process, addr: u64, len: u64, prot: Prot) -> Result<(), Errno>;
    /// A CPU read of process memory.
    fn read(&self, p: &Self::Process, addr: u64, out: &mut [u8]) -> Result<(), Segv>;
    /// A CPU write of process memory.
    fn write(&self, p: &Self::Process, addr: u64, data: &[u8]) -> Result<(), Segv>;
    /// A CPU atomic add on the u64 at `addr` (naturally aligned); old value.
    fn atomic_add_u64(&self, p: &Self::Process, addr: u64, v: u64) -> Result<u64, Segv>;
    /// Physical address of the frame the CPU maps at `addr` right now.
    fn cpu_phys(&self, p: &Self::Process, addr: u64) -> Option<u64>;
    /// Free physical frames (for leak checks).
    fn free_frames(&self) -> u64;
    /// `Some(canary)`: from now on every process frame freed is filled with
    /// the 8-byte `canary` right after it is freed (after the invalidation
    /// that unmapped it completed), recorded, and held back from reuse.
    /// `None`: stop, and release the held frames.
    fn track_freed(&self, canary: Option<u64>);
    /// Physical addresses of the frames recorded since the last call.
    fn take_freed(&self) -> Vec<u64>;
    /// Reads physical memory.
    fn read_phys(&self, pa: u64, out: &mut [u8]);
    /// Bytes `large_first_touch` touches (256 MiB unless the host is small).
    fn large_bytes(&self) -> u64 {
        256 << 20
    }
}

/// A test's outcome.
pub type TestResult = Result<(), String>;
/// A test.
pub type TestFn<E> = fn(&E) -> TestResult;

/// The names of every test, in the order issue 7 lists them: the one list
/// the hosts share. `svm_suite!(m)` expands to `m! { open_close, anon_read,
/// ... }`, so each host (this module's [`tests`], the loopback's
/// `#[test]`s, the firmware's runner) generates its own entry per name.
#[macro_export]
macro_rules! svm_suite {
    ($m:ident) => {
        $m! {
            open_close,
            anon_read,
            anon_read_prot,
            anon_write,
            anon_write_prot,
            anon_write_huge,
            anon_read_multiple,
            anon_write_multiple,
            anon_teardown,
            snapshot,
            double_map,
            two_processes,
            mprotect_downgrade,
            munmap_reuse,
            release_with_context,
            release_waits_for_range,
            register_dead_mm,
            invalidate_during_fault,
            fault_buffer_overflow,
            pointer_chase,
            atomic_counter,
            large_first_touch,
        }
    };
}

/// Every test, in the order issue 7 lists them.
pub fn tests<E: SvmEnv>() -> Vec<(&'static str, TestFn<E>)> {
    macro_rules! list {
        ($($name:ident),* $(,)?) => {
            vec![$((stringify!($name), $name::<E> as TestFn<E>)),*]
        };
    }
    crate::svm_suite!(list)
}

/// Runs the tests whose name contains `filter` (all for ""), calling
/// `report(name, result)` after each; returns (passed, failed).
pub fn run<E: SvmEnv>(
    env: &E,
    filter: &str,
    mut report: impl FnMut(&str, &TestResult),
) -> (usize, usize) {
    let (mut pass, mut fail) = (0, 0);
    for (name, t) in tests::<E>() {
        if !name.contains(filter) {
            continue;
        }
        let r = t(env);
        match r {
            Ok(()) => pass += 1,
            Err(_) => fail += 1,
        }
        report(name, &r);
    }
    (pass, fail)
}

// ------------------------------------------------------------------ helpers

macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err(format!($($arg)+));
        }
    };
}

fn ok<T, X: core::fmt::Debug>(r: Result<T, X>, what: &str) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e:?}"))
}

type Svm<E> = SvmContext<<E as SvmEnv>::P, <E as SvmEnv>::M>;
type Chan<E> = Channel<<E as SvmEnv>::P>;

fn bind<E: SvmEnv>(env: &E, p: &E::Process) -> Result<(Svm<E>, Chan<E>), String> {
    bind_with(env, p, SvmConfig::default())
}

fn bind_with<E: SvmEnv>(
    env: &E,
    p: &E::Process,
    cfg: SvmConfig,
) -> Result<(Svm<E>, Chan<E>), String> {
    let svm = ok(SvmContext::new(env.gpu(), &env.mm(p), cfg), "svm context")?;
    let chan = ok(Channel::open(svm.context()), "channel")?;
    Ok((svm, chan))
}

fn fill<P: Platform>(c: &Channel<P>, dst: u64, len: u64, pattern: u64) -> Result<u64, GpuError> {
    c.run(&Command::Fill { dst, len, pattern })
}

fn copy<P: Platform>(c: &Channel<P>, dst: u64, src: u64, len: u64) -> Result<u64, GpuError> {
    c.run(&Command::Copy { dst, src, len })
}

fn read_u64<E: SvmEnv>(env: &E, p: &E::Process, va: u64) -> Result<u64, String> {
    let mut b = [0u8; 8];
    env.read(p, va, &mut b)
        .map_err(|_| format!("CPU read of {va:#x} faulted"))?;
    Ok(u64::from_le_bytes(b))
}

fn write_u64<E: SvmEnv>(env: &E, p: &E::Process, va: u64, v: u64) -> TestResult {
    env.write(p, va, &v.to_le_bytes())
        .map_err(|_| format!("CPU write of {va:#x} faulted"))
}

/// Which words of a page [`sampled`] picks: the first only, or the first
/// and the last (which also catches a short or shifted copy).
const FIRST: &[u64] = &[0];
const ENDS: &[u64] = &[0, PAGE_SIZE - 8];

/// `(page_index, address)` of the `words` of every page of `[va, va + len)`.
fn sampled(va: u64, len: u64, words: &'static [u64]) -> impl Iterator<Item = (u64, u64)> {
    (0..len / PAGE_SIZE)
        .flat_map(move |i| words.iter().map(move |off| (i, va + i * PAGE_SIZE + off)))
}

/// Checks that the word at each address of `at` equals `expect(page_index)`.
fn check_words<E: SvmEnv>(
    env: &E,
    p: &E::Process,
    at: impl Iterator<Item = (u64, u64)>,
    expect: impl Fn(u64) -> u64,
) -> TestResult {
    for (i, a) in at {
        let got = read_u64(env, p, a)?;
        ensure!(
            got == expect(i),
            "page {i}: {a:#x} holds {got:#x}, expected {:#x}",
            expect(i)
        );
    }
    Ok(())
}

fn counters<E: SvmEnv>(env: &E) -> super::CounterSnapshot {
    env.gpu().counters().snapshot()
}

fn cancelled(r: Result<u64, GpuError>) -> bool {
    r == Err(GpuError::Command(Status::Cancelled))
}

/// A new process with one anonymous read-write mapping of `len` bytes.
fn spawn_mapped<E: SvmEnv>(env: &E, len: u64) -> Result<(E::Process, u64), String> {
    let p = env.spawn()?;
    let va = mmap_rw(env, &p, len, "mmap")?;
    Ok((p, va))
}

/// Another anonymous read-write mapping of `len` bytes, wherever the host
/// puts it.
fn mmap_rw<E: SvmEnv>(env: &E, p: &E::Process, len: u64, what: &str) -> Result<u64, String> {
    ok(env.mmap(p, 0, len, Prot::RW, false), what)
}

/// Runs `body` with a context bound to `p`. On success the channel closes
/// and the process exits while the context is still alive, so its release
/// runs at exit as it would for a real process; on failure everything is
/// dropped (channel, context, process) and the error returned.
fn bound<E: SvmEnv>(
    env: &E,
    p: E::Process,
    body: impl FnOnce(&E::Process, &Svm<E>, &Chan<E>) -> TestResult,
) -> TestResult {
    bound_with(env, p, SvmConfig::default(), body)
}

/// [`bound`] with a context configuration.
fn bound_with<E: SvmEnv>(
    env: &E,
    p: E::Process,
    cfg: SvmConfig,
    body: impl FnOnce(&E::Process, &Svm<E>, &Chan<E>) -> TestResult,
) -> TestResult {
    let (svm, chan) = bind_with(env, &p, cfg)?;
    body(&p, &svm, &chan)?;
    drop(chan);
    env.exit(p);
    drop(svm);
    Ok(())
}

/// LAUNCH of `kernel`, already written at `code`.
fn launch(code: u64, kernel: &[u64], grid: u32, block: u32, args: [u64; 4]) -> Command {
    Command::Launch {
        code,
        code_len: kernel.len() as u32,
        grid,
        block,
        args,
    }
}

const PAT: u64 = 0x5a5a_1234_8765_a5a5;

// -------------------------------------------------------------------- tests

/// Bind and unbind a context repeatedly: no leaked frames, slots reused.
pub fn open_close<E: SvmEnv>(env: &E) -> TestResult {
    let len = 64 << 10;
    let (p, va) = spawn_mapped(env, len)?;
    // Populate the process side first: what is counted below is the
    // driver's own memory (page tables, rings).
    for (_, a) in sampled(va, len, FIRST) {
        write_u64(env, &p, a, 1)?;
    }
    let base = env.free_frames();
    for round in 0..20u64 {
        let (svm, chan) = bind(env, &p)?;
        ok(fill(&chan, va, len, round), "fill")?;
        ensure!(
            svm.device_leaves() >= 16,
            "round {round}: device not mapped"
        );
        drop(chan);
        drop(svm);
        let now = env.free_frames();
        ensure!(
            now == base,
            "round {round}: {} frames leaked",
            base as i64 - now as i64
        );
    }
    check_words(env, &p, sampled(va, len, ENDS), |_| 19)?;
    env.exit(p);
    Ok(())
}

/// GPU COPY reads CPU-written data; untouched pages read as zero.
pub fn anon_read<E: SvmEnv>(env: &E) -> TestResult {
    let len = 256 << 10;
    let (p, src) = spawn_mapped(env, len)?;
    let dst = mmap_rw(env, &p, len, "mmap dst")?;
    // CPU writes the first half; the second half stays untouched.
    for (i, a) in sampled(src, len / 2, ENDS) {
        write_u64(env, &p, a, 0x1000 + i)?;
    }
    bound(env, p, |p, _, chan| {
        let before = counters(env);
        ok(copy(chan, dst, src, len), "copy")?;
        let after = counters(env);
        check_words(env, p, sampled(dst, len, ENDS), |i| {
            if i < 32 {
                0x1000 + i
            } else {
                0
            }
        })?;
        ensure!(after.faults_read > before.faults_read, "no faults counted");
        ensure!(
            after.pages_mapped - before.pages_mapped >= 2 * len / PAGE_SIZE,
            "pages mapped: {}",
            after.pages_mapped - before.pages_mapped
        );
        Ok(())
    })
}

/// A PROT_NONE source: the command fails, the destination is untouched.
pub fn anon_read_prot<E: SvmEnv>(env: &E) -> TestResult {
    let len = 64 << 10;
    let (p, src) = spawn_mapped(env, len)?;
    let dst = mmap_rw(env, &p, len, "mmap dst")?;
    for (_, a) in sampled(src, len, FIRST) {
        write_u64(env, &p, a, 7)?;
    }
    for (_, a) in sampled(dst, len, ENDS) {
        write_u64(env, &p, a, 0xdead)?;
    }
    ok(env.mprotect(&p, src, len, Prot::NONE), "mprotect")?;
    bound(env, p, |p, _, chan| {
        let r = copy(chan, dst, src, len);
        ensure!(cancelled(r), "copy from PROT_NONE: {r:?}");
        check_words(env, p, sampled(dst, len, ENDS), |_| 0xdead)?;
        ensure!(
            env.read(p, src, &mut [0; 8]) == Err(Segv),
            "CPU read of PROT_NONE"
        );
        Ok(())
    })
}

/// GPU FILL, CPU reads it.
pub fn anon_write<E: SvmEnv>(env: &E) -> TestResult {
    let len = 1 << 20;
    let (p, va) = spawn_mapped(env, len)?;
    bound(env, p, |p, _, chan| {
        ok(fill(chan, va, len, PAT), "fill")?;
        check_words(env, p, sampled(va, len, ENDS), |_| PAT)
    })
}

/// Read-only: the GPU write fails and memory is unchanged; after mprotect
/// RW it succeeds.
pub fn anon_write_prot<E: SvmEnv>(env: &E) -> TestResult {
    let len = 64 << 10;
    let (p, va) = spawn_mapped(env, len)?;
    for (i, a) in sampled(va, len, ENDS) {
        write_u64(env, &p, a, i)?;
    }
    ok(env.mprotect(&p, va, len, Prot::READ), "mprotect RO")?;
    bound(env, p, |p, svm, chan| {
        let r = fill(chan, va, len, PAT);
        ensure!(cancelled(r), "fill of read-only memory: {r:?}");
        check_words(env, p, sampled(va, len, ENDS), |i| i)?;
        ensure!(
            svm.device_lookup(va)
                .is_none_or(|l| !l.perms.contains(faultline_abi::Pte::WRITE)),
            "device has a writable leaf for read-only memory"
        );
        ok(env.mprotect(p, va, len, Prot::RW), "mprotect RW")?;
        ok(fill(chan, va, len, PAT), "fill after mprotect RW")?;
        check_words(env, p, sampled(va, len, ENDS), |_| PAT)
    })
}

/// A 2 MiB mapping gets 2 MiB device leaves, data correct.
pub fn anon_write_huge<E: SvmEnv>(env: &E) -> TestResult {
    let p = env.spawn()?;
    let len = 2 * LEAF_2M;
    let va = ok(env.mmap(&p, 0, len, Prot::RW, true), "mmap huge")?;
    bound(env, p, |p, svm, chan| {
        ok(fill(chan, va, len, PAT), "fill")?;
        for off in [0, LEAF_2M] {
            let leaf = svm.device_lookup(va + off + 0x3000);
            ensure!(
                leaf.is_some_and(|l| l.size == PageSize::Size2M),
                "device leaf at +{off:#x}: {leaf:?}"
            );
            let cpu = env.cpu_phys(p, va + off + 0x3000);
            ensure!(
                leaf.map(|l| l.phys) == cpu,
                "device {leaf:?} vs CPU {cpu:?}"
            );
        }
        for off in (0..len).step_by((LEAF_2M / 4) as usize) {
            ensure!(read_u64(env, p, va + off + 8)? == PAT, "data at +{off:#x}");
        }
        Ok(())
    })
}

/// anon_read repeated with remaps at the same address.
pub fn anon_read_multiple<E: SvmEnv>(env: &E) -> TestResult {
    let len = 64 << 10;
    let (p, src) = spawn_mapped(env, len)?;
    let dst = mmap_rw(env, &p, len, "mmap dst")?;
    bound(env, p, |p, _, chan| {
        for round in 0..4u64 {
            for (i, a) in sampled(src, len, ENDS) {
                write_u64(env, p, a, round << 32 | i)?;
            }
            ok(copy(chan, dst, src, len), "copy")?;
            check_words(env, p, sampled(dst, len, ENDS), |i| round << 32 | i)?;
            ok(env.munmap(p, src, len), "munmap")?;
            let again = ok(env.mmap(p, src, len, Prot::RW, false), "remap")?;
            ensure!(again == src, "remap moved");
        }
        Ok(())
    })
}

/// anon_write repeated with remaps at the same address.
pub fn anon_write_multiple<E: SvmEnv>(env: &E) -> TestResult {
    let len = 128 << 10;
    let (p, va) = spawn_mapped(env, len)?;
    bound(env, p, |p, _, chan| {
        for round in 0..4u64 {
            ok(fill(chan, va, len, PAT ^ round), "fill")?;
            check_words(env, p, sampled(va, len, ENDS), |_| PAT ^ round)?;
            ok(env.munmap(p, va, len), "munmap")?;
            ok(env.mmap(p, va, len, Prot::RW, false), "remap")?;
            check_words(env, p, sampled(va, len, ENDS), |_| 0)?;
        }
        Ok(())
    })
}

const CANARY: u64 = 0xcafe_f00d_dead_beef;

/// munmap half a buffer while the GPU streams over it: the command either
/// completes or fails cleanly, and no device write lands after the munmap
/// (a canary written into every freed frame survives).
pub fn anon_teardown<E: SvmEnv>(env: &E) -> TestResult {
    let len = 4 << 20;
    let (p, va) = spawn_mapped(env, len)?;
    bound(env, p, |p, svm, chan| {
        let mut outcomes = [0u32; 2];
        for round in 0..4u64 {
            // Map everything on the device first so the second FILL streams
            // without faults while the munmap runs.
            ok(fill(chan, va, len, round), "warm fill")?;
            env.track_freed(Some(CANARY));
            let t = ok(
                chan.submit(&Command::Fill {
                    dst: va,
                    len,
                    pattern: PAT,
                }),
                "submit",
            )?;
            let half = va + len / 2;
            let r1 = env.munmap(p, half, len / 2);
            let r = chan.wait(t);
            let freed = env.take_freed();
            ok(r1, "munmap")?;
            match r {
                Ok(_) => outcomes[0] += 1,
                Err(GpuError::Command(Status::Cancelled)) => outcomes[1] += 1,
                Err(e) => return Err(format!("round {round}: fill ended with {e}")),
            }
            ensure!(
                freed.len() as u64 == len / 2 / PAGE_SIZE,
                "freed {} frames",
                freed.len()
            );
            for pa in &freed {
                let mut b = [0u8; 8];
                env.read_phys(*pa, &mut b);
                let v = u64::from_le_bytes(b);
                env.read_phys(*pa + PAGE_SIZE - 8, &mut b);
                let w = u64::from_le_bytes(b);
                ensure!(
                    v == CANARY && w == CANARY,
                    "round {round}: freed frame {pa:#x} written after munmap ({v:#x}, {w:#x})"
                );
            }
            env.track_freed(None);
            ensure!(
                env.read(p, half, &mut [0; 8]) == Err(Segv),
                "unmapped half still readable"
            );
            ensure!(
                svm.device_lookup(half).is_none(),
                "device still maps the unmapped half"
            );
            // The valid half holds the first or the second pattern, never junk.
            let first = read_u64(env, p, va)?;
            ensure!(
                first == PAT || first == round,
                "valid half holds {first:#x}"
            );
            ok(env.mmap(p, half, len / 2, Prot::RW, false), "remap")?;
        }
        // Both outcomes are legal; which one happened depends on timing.
        log::info!(
            "anon_teardown: {} completed, {} cancelled",
            outcomes[0],
            outcomes[1]
        );
        Ok(())
    })
}

/// Every page state, as `range_snapshot` reports it through the mirror.
pub fn snapshot<E: SvmEnv>(env: &E) -> TestResult {
    let p = env.spawn()?;
    bound(env, p, |p, svm, _| {
        let pg = PAGE_SIZE;
        // hole: a mapping removed again.
        let hole = mmap_rw(env, p, pg, "mmap hole")?;
        ok(env.munmap(p, hole, pg), "munmap hole")?;
        let r = svm.snapshot(hole, hole + pg, 12);
        ensure!(r == Err(Errno::EFAULT), "hole: {r:?}");
        // PROT_NONE.
        let none = ok(env.mmap(p, 0, pg, Prot::NONE, false), "mmap none")?;
        let r = svm.snapshot(none, none + pg, 12);
        ensure!(r == Err(Errno::EPERM), "PROT_NONE: {r:?}");
        // untouched, zero page (CPU read), writable (CPU write), read-only.
        let va = mmap_rw(env, p, 4 * pg, "mmap")?;
        env.read(p, va + pg, &mut [0; 8])
            .map_err(|_| String::from("read"))?;
        write_u64(env, p, va + 2 * pg, 1)?;
        write_u64(env, p, va + 3 * pg, 2)?;
        ok(env.mprotect(p, va + 3 * pg, pg, Prot::READ), "mprotect")?;
        let r = ok(svm.snapshot(va, va + 4 * pg, 12), "snapshot")?;
        ensure!(r[0] == SnapEntry::None, "untouched: {:?}", r[0]);
        let zero = env.cpu_phys(p, va + pg);
        ensure!(
            matches!(r[1], SnapEntry::Valid { writable: false, phys } if Some(phys) == zero),
            "zero page: {:?} (CPU {zero:?})",
            r[1]
        );
        let w = env.cpu_phys(p, va + 2 * pg);
        ensure!(
            matches!(r[2], SnapEntry::Valid { writable: true, phys } if Some(phys) == w && Some(phys) != zero),
            "writable: {:?} (CPU {w:?})",
            r[2]
        );
        let ro = env.cpu_phys(p, va + 3 * pg);
        ensure!(
            matches!(r[3], SnapEntry::Valid { writable: false, phys } if Some(phys) == ro),
            "read-only: {:?} (CPU {ro:?})",
            r[3]
        );
        // 2 MiB: one entry per leaf, untouched then touched.
        let huge = ok(env.mmap(p, 0, LEAF_2M, Prot::RW, true), "mmap huge")?;
        let r = ok(svm.snapshot(huge, huge + LEAF_2M, 21), "snapshot huge")?;
        ensure!(r == [SnapEntry::None], "untouched huge: {r:?}");
        write_u64(env, p, huge + 0x1000, 3)?;
        let r = ok(svm.snapshot(huge, huge + LEAF_2M, 21), "snapshot huge")?;
        let hp = env.cpu_phys(p, huge);
        ensure!(
            matches!(r[..], [SnapEntry::Valid { writable: true, phys }] if Some(phys) == hp && phys % LEAF_2M == 0),
            "huge: {r:?} (CPU {hp:?})"
        );
        // A snapshot never faults: the untouched page is still untouched.
        ensure!(env.cpu_phys(p, va).is_none(), "snapshot faulted a page in");
        Ok(())
    })
}

/// Two contexts mirror one process; an munmap invalidates both.
pub fn double_map<E: SvmEnv>(env: &E) -> TestResult {
    let len = 64 << 10;
    let (p, a) = spawn_mapped(env, len)?;
    let b = mmap_rw(env, &p, len, "mmap")?;
    let (svm1, ch1) = bind(env, &p)?;
    let (svm2, ch2) = bind(env, &p)?;
    ok(fill(&ch1, a, len, PAT), "fill via context 1")?;
    ok(copy(&ch2, b, a, len), "copy via context 2")?;
    check_words(env, &p, sampled(b, len, ENDS), |_| PAT)?;
    ensure!(
        svm1.device_lookup(a).is_some() && svm2.device_lookup(a).is_some(),
        "both contexts should map the buffer"
    );
    let before = counters(env).invalidations;
    ok(env.munmap(&p, a, len), "munmap")?;
    ensure!(
        counters(env).invalidations >= before + 2,
        "both mirrors should be invalidated"
    );
    for (i, s) in [&svm1, &svm2].into_iter().enumerate() {
        for off in (0..len).step_by(PAGE_SIZE as usize) {
            ensure!(
                s.device_lookup(a + off).is_none(),
                "context {i} still maps +{off:#x}"
            );
        }
    }
    ensure!(cancelled(fill(&ch1, a, len, 1)), "fill of unmapped via 1");
    ensure!(cancelled(copy(&ch2, b, a, len)), "copy of unmapped via 2");
    drop((ch1, ch2));
    env.exit(p);
    Ok(())
}

/// Same address in two processes, different data: each context sees its own.
pub fn two_processes<E: SvmEnv>(env: &E) -> TestResult {
    let len = 64 << 10;
    let (p1, va) = spawn_mapped(env, len)?;
    let p2 = env.spawn()?;
    let va2 = ok(
        env.mmap(&p2, va, len, Prot::RW, false),
        "mmap 2 at the same address",
    )?;
    ensure!(va2 == va, "fixed mapping moved");
    let d1 = mmap_rw(env, &p1, len, "dst 1")?;
    let d2 = ok(env.mmap(&p2, d1, len, Prot::RW, false), "dst 2")?;
    ensure!(d1 == d2, "fixed mapping moved");
    for (i, a) in sampled(va, len, FIRST) {
        write_u64(env, &p1, a, 0x1111_0000 + i)?;
    }
    for (i, a) in sampled(va, len, FIRST) {
        write_u64(env, &p2, a, 0x2222_0000 + i)?;
    }
    let (_s1, c1) = bind(env, &p1)?;
    let (_s2, c2) = bind(env, &p2)?;
    ok(copy(&c1, d1, va, len), "copy 1")?;
    ok(copy(&c2, d2, va, len), "copy 2")?;
    check_words(env, &p1, sampled(d1, len, FIRST), |i| 0x1111_0000 + i)?;
    check_words(env, &p2, sampled(d2, len, FIRST), |i| 0x2222_0000 + i)?;
    drop((c1, c2));
    env.exit(p1);
    env.exit(p2);
    Ok(())
}

/// RW → RO while mapped on the device: the next device write faults and
/// fails; reads still work.
pub fn mprotect_downgrade<E: SvmEnv>(env: &E) -> TestResult {
    let len = 64 << 10;
    let (p, va) = spawn_mapped(env, len)?;
    let dst = mmap_rw(env, &p, len, "mmap dst")?;
    bound(env, p, |p, svm, chan| {
        ok(fill(chan, va, len, PAT), "fill")?;
        ensure!(
            svm.device_lookup(va)
                .is_some_and(|l| l.perms.contains(faultline_abi::Pte::WRITE)),
            "device should map writable"
        );
        ok(env.mprotect(p, va, len, Prot::READ), "mprotect")?;
        ensure!(
            svm.device_lookup(va)
                .is_none_or(|l| !l.perms.contains(faultline_abi::Pte::WRITE)),
            "device still writable after mprotect"
        );
        ensure!(cancelled(fill(chan, va, len, 1)), "write after downgrade");
        check_words(env, p, sampled(va, len, ENDS), |_| PAT)?;
        ok(copy(chan, dst, va, len), "read after downgrade")?;
        check_words(env, p, sampled(dst, len, ENDS), |_| PAT)
    })
}

/// A freed frame reused by another mapping is never reached through the
/// old device mapping.
pub fn munmap_reuse<E: SvmEnv>(env: &E) -> TestResult {
    let len = 16 * PAGE_SIZE;
    let (p, old) = spawn_mapped(env, len)?;
    bound(env, p, |p, svm, chan| {
        ok(fill(chan, old, len, PAT), "fill")?;
        let frames: Vec<u64> = (0..16)
            .filter_map(|i| env.cpu_phys(p, old + i * PAGE_SIZE))
            .collect();
        ensure!(frames.len() == 16, "CPU should map every page");
        ok(env.munmap(p, old, len), "munmap")?;
        // New mappings, written by the CPU: likely to reuse the frames.
        let new = mmap_rw(env, p, 4 * len, "mmap new")?;
        ensure!(
            new >= old + len || new + 4 * len <= old,
            "the new mapping {new:#x} reuses the unmapped addresses {old:#x}"
        );
        for (_, a) in sampled(new, 4 * len, FIRST) {
            write_u64(env, p, a, 0x7777)?;
        }
        let reused = (0..4 * len / PAGE_SIZE)
            .filter(|i| {
                env.cpu_phys(p, new + i * PAGE_SIZE)
                    .is_some_and(|pa| frames.contains(&pa))
            })
            .count();
        log::info!("munmap_reuse: {reused} of 16 frames reused");
        ensure!(
            svm.device_lookup(old).is_none(),
            "old device mapping survived munmap"
        );
        ensure!(
            cancelled(fill(chan, old, len, 1)),
            "fill through the old mapping"
        );
        check_words(env, p, sampled(new, 4 * len, FIRST), |_| 0x7777)
    })
}

/// Process exit with a bound context: release runs, the context is torn
/// down, the process's frames are freed.
pub fn release_with_context<E: SvmEnv>(env: &E) -> TestResult {
    let len = 256 << 10;
    let (p, va) = spawn_mapped(env, len)?;
    let (svm, chan) = bind(env, &p)?;
    ok(fill(&chan, va, len, PAT), "fill")?;
    let before = env.free_frames();
    ensure!(!svm.is_released(), "released too early");
    env.exit(p);
    ensure!(svm.is_released(), "release did not run at exit");
    ensure!(
        svm.device_leaves() == 0,
        "{} device leaves left",
        svm.device_leaves()
    );
    ensure!(
        env.free_frames() >= before + len / PAGE_SIZE,
        "process frames not freed"
    );
    ensure!(cancelled(fill(&chan, va, len, 1)), "command after release");
    Ok(())
}

/// Teardown waits until a registered range unregisters (the seed's rule).
pub fn release_waits_for_range<E: SvmEnv>(env: &E) -> TestResult {
    let len = 64 << 10;
    let (p, va) = spawn_mapped(env, len)?;
    write_u64(env, &p, va, 5)?;
    let (svm, chan) = bind(env, &p)?;
    let mut range: HmmRange<E::M> = HmmRange::new([1, 2, 4], [8, 0, 16], 12);
    ok(
        range_register(&mut range, svm.mirror(), va, va + len, 12),
        "range_register",
    )?;
    let mm = env.mm(&p);
    env.exit(p);
    ensure!(
        !svm.is_released(),
        "release ran while a range was registered"
    );
    ensure!(mm.core().users() == 1, "users: {}", mm.core().users());
    range_unregister(&mut range);
    ensure!(
        svm.is_released(),
        "release did not run after range_unregister"
    );
    ensure!(mm.core().users() == 0, "users: {}", mm.core().users());
    drop(chan);
    Ok(())
}

/// Binding a context to an address space that already died: EFAULT.
pub fn register_dead_mm<E: SvmEnv>(env: &E) -> TestResult {
    let p = env.spawn()?;
    let mm = env.mm(&p);
    env.exit(p);
    let free = env.free_frames();
    let r = SvmContext::new(env.gpu(), &mm, SvmConfig::default());
    ensure!(
        matches!(r, Err(GpuError::Mm(Errno::EFAULT))),
        "register on a dead mm: {:?}",
        r.as_ref().err()
    );
    drop(r);
    ensure!(
        env.free_frames() == free,
        "failed registration leaked frames"
    );
    Ok(())
}

/// An invalidation between `range_fault` and the check forces a retry; the
/// final device state matches the CPU's.
pub fn invalidate_during_fault<E: SvmEnv>(env: &E) -> TestResult {
    let len = 64 << 10;
    let (p, va) = spawn_mapped(env, len)?;
    for (i, a) in sampled(va, len, FIRST) {
        write_u64(env, &p, a, 0x4000 + i)?;
    }
    let dst = mmap_rw(env, &p, len, "mmap dst")?;
    bound(env, p, |p, svm, chan| {
        let mm = env.mm(p);
        let shots = Arc::new(AtomicU64::new(0));
        let s2 = shots.clone();
        svm.set_check_hook(Some(Arc::new(move |start, end| {
            // Once per window of the source: a full invalidation cycle that
            // starts and ends before the driver's check.
            if start < va + len && va < end && s2.fetch_add(1, Ordering::AcqRel) < 4 {
                let r = MmuNotifierRange {
                    start,
                    end,
                    event: MmuNotifyEvent::Clear,
                    blockable: true,
                };
                if mmu_notifier_invalidate_range_start(&*mm, &r).is_ok() {
                    mmu_notifier_invalidate_range_end(&*mm, &r);
                }
            }
        })));
        let before = counters(env);
        ok(copy(chan, dst, va, len), "copy")?;
        svm.set_check_hook(None);
        let after = counters(env);
        ensure!(shots.load(Ordering::Acquire) >= 1, "hook never ran");
        ensure!(after.retries > before.retries, "no retry counted");
        check_words(env, p, sampled(dst, len, FIRST), |i| 0x4000 + i)?;
        for i in 0..len / PAGE_SIZE {
            let a = va + i * PAGE_SIZE;
            let dev = svm.device_lookup(a).map(|l| l.phys);
            let cpu = env.cpu_phys(p, a);
            ensure!(
                dev.is_none() || dev == cpu,
                "page {i}: device {dev:?} CPU {cpu:?}"
            );
        }
        Ok(())
    })
}

/// A kernel touching many more pages at once than the fault buffer holds:
/// every fault is serviced, nothing lost.
pub fn fault_buffer_overflow<E: SvmEnv>(env: &E) -> TestResult {
    let entries = u64::from(env.gpu().config().fault_entries);
    // 64 warps of 8 threads are resident at once: up to 512 faults in flight.
    let pages = (4 * entries).clamp(512, 4096);
    let (p, data) = spawn_mapped(env, pages * PAGE_SIZE)?;
    let code = mmap_rw(env, &p, PAGE_SIZE, "mmap code")?;
    // Thread t stores t + 1 at data + t * 4096.
    let k = [
        isa::encode(isa::S2R, 5, 0, 0, isa::sreg::GTID),
        isa::encode(isa::SHLI, 6, 5, 0, 12),
        isa::encode(isa::ADD, 6, 6, 1, 0),
        isa::encode(isa::ADDI, 7, 5, 0, 1),
        isa::encode(isa::ST64, 0, 6, 7, 0),
        isa::encode(isa::EXIT, 0, 0, 0, 0),
    ];
    write_code(env, &p, code, &k)?;
    // Fault-around 4 KiB so every page is its own fault.
    let cfg = SvmConfig {
        fault_around: PAGE_SIZE,
    };
    bound_with(env, p, cfg, |p, _, chan| {
        let overflows = env.gpu().device_counter(Counter::FaultOverflows as u32);
        let grid = (pages / 64) as u32;
        ok(
            chan.run(&launch(code, &k, grid, 64, [data, 0, 0, 0])),
            "launch",
        )?;
        let overflowed = env.gpu().device_counter(Counter::FaultOverflows as u32) - overflows;
        ensure!(
            overflowed > 0,
            "the fault buffer ({entries} entries) never overflowed"
        );
        for t in 0..pages {
            let v = read_u64(env, p, data + t * PAGE_SIZE)?;
            ensure!(v == t + 1, "thread {t} wrote {v}");
        }
        Ok(())
    })
}

fn write_code<E: SvmEnv>(env: &E, p: &E::Process, va: u64, code: &[u64]) -> TestResult {
    let bytes: Vec<u8> = code.iter().flat_map(|w| w.to_le_bytes()).collect();
    env.write(p, va, &bytes)
        .map_err(|_| "writing the kernel faulted".into())
}

/// The CPU builds a linked list; a kernel walks it through SVM.
pub fn pointer_chase<E: SvmEnv>(env: &E) -> TestResult {
    let pages = 64u64;
    let (p, heap) = spawn_mapped(env, pages * PAGE_SIZE)?;
    let out = mmap_rw(env, &p, PAGE_SIZE, "mmap out")?;
    let code = mmap_rw(env, &p, PAGE_SIZE, "mmap code")?;
    // 300 nodes {next, value} scattered over the heap pages in a scrambled
    // order (a multiplicative walk), as a heap after churn would place them.
    let n = 300u64;
    let slots = pages * PAGE_SIZE / 16;
    let node = |i: u64| heap + ((i * 7919) % slots) * 16;
    let mut sum = 0u64;
    for i in 0..n {
        let next = if i + 1 < n { node(i + 1) } else { 0 };
        let value = i * i + 3;
        sum = sum.wrapping_add(value);
        write_u64(env, &p, node(i), next)?;
        write_u64(env, &p, node(i) + 8, value)?;
    }
    let k = [
        // r1 = head, r4 = out, r2 = sum
        isa::encode(isa::BEQ, 0, 1, 0, 5),
        isa::encode(isa::LD64, 3, 1, 0, 8),
        isa::encode(isa::ADD, 2, 2, 3, 0),
        isa::encode(isa::LD64, 1, 1, 0, 0),
        isa::encode(isa::JMP, 0, 0, 0, -4),
        isa::encode(isa::ST64, 0, 4, 2, 0),
        isa::encode(isa::EXIT, 0, 0, 0, 0),
    ];
    write_code(env, &p, code, &k)?;
    bound(env, p, |p, _, chan| {
        ok(
            chan.run(&launch(code, &k, 1, 1, [node(0), 0, 0, out])),
            "launch",
        )?;
        let got = read_u64(env, p, out)?;
        ensure!(got == sum, "sum {got}, expected {sum}");
        Ok(())
    })
}

/// GPU atomics (kernel and ATOMIC commands) and CPU atomics on one counter.
pub fn atomic_counter<E: SvmEnv>(env: &E) -> TestResult {
    let (p, buf) = spawn_mapped(env, 2 * PAGE_SIZE)?;
    let (counter, code) = (buf, buf + PAGE_SIZE);
    let iters = 200i32;
    let k = [
        // r1 = counter, r2 = 1, r3 = loop count
        isa::encode(isa::MOVI, 2, 0, 0, 1),
        isa::encode(isa::MOVI, 3, 0, 0, iters),
        isa::encode(isa::ATOM_ADD64, 4, 1, 2, 0),
        isa::encode(isa::ADDI, 3, 3, 0, -1),
        isa::encode(isa::BNE, 0, 3, 0, -2),
        isa::encode(isa::EXIT, 0, 0, 0, 0),
    ];
    write_code(env, &p, code, &k)?;
    bound(env, p, |p, _, chan| {
        // Map the counter on the device first, so the kernel and the CPU race.
        let old = ok(
            chan.run(&Command::Atomic {
                va: counter,
                op: atomic_op::ADD,
                wide: true,
                operand: 5,
                compare: 0,
            }),
            "atomic command",
        )?;
        ensure!(old == 0, "counter started at {old}");
        let threads = 64u64;
        let t = ok(
            chan.submit(&launch(code, &k, 2, 32, [counter, 0, 0, 0])),
            "launch",
        )?;
        let cpu_adds = 1000u64;
        for _ in 0..cpu_adds {
            env.atomic_add_u64(p, counter, 1)
                .map_err(|_| String::from("CPU atomic faulted"))?;
        }
        ok(chan.wait(t), "kernel")?;
        let total = read_u64(env, p, counter)?;
        let expect = 5 + threads * iters as u64 + cpu_adds;
        ensure!(total == expect, "counter {total}, expected {expect}");
        Ok(())
    })
}

/// The GPU touches a large range the CPU never touched.
pub fn large_first_touch<E: SvmEnv>(env: &E) -> TestResult {
    let len = env.large_bytes();
    let (p, va) = spawn_mapped(env, len)?;
    bound(env, p, |p, svm, chan| {
        let before = counters(env);
        let t0 = env.gpu().platform().now_ns();
        ok(fill(chan, va, len, PAT), "fill")?;
        let ns = env.gpu().platform().now_ns() - t0;
        let after = counters(env);
        let pages = len / PAGE_SIZE;
        ensure!(
            after.pages_mapped - before.pages_mapped >= pages,
            "mapped {} of {pages} pages",
            after.pages_mapped - before.pages_mapped
        );
        ensure!(
            svm.device_leaves() == pages,
            "device leaves {}",
            svm.device_leaves()
        );
        for off in (0..len).step_by(1 << 20) {
            ensure!(read_u64(env, p, va + off + 8)? == PAT, "data at +{off:#x}");
        }
        log::info!(
            "large_first_touch: {} MiB in {} ms, {} windows",
            len >> 20,
            ns / 1_000_000,
            after.windows - before.windows
        );
        Ok(())
    })
}
