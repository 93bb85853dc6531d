//! Jobs (a decoded command in progress) and the FILL / COPY / ATOMIC /
//! SEMAPHORE / MIGRATE engines. LAUNCH lives in `isa`. Every data access
//! goes through `vram::PhysMem`, so each engine handles both apertures.

use faultline_abi::isa::WARP_SIZE;
use faultline_abi::{
    engine, Access, Command, Counter, FaultReason, MigrateEntry, Opcode, Status, COMMAND_SIZE,
    LEAF_2M, PAGE_SIZE,
};
use vm_memory::bitmap::MS;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, VolatileSlice,
};

use crate::check::Origin;
use crate::counters::Counters;
use crate::inject::{Injector, Knob, MAX_SPURIOUS_PER_STEP};
use crate::isa::LaunchJob;
use crate::mmu::{Mmu, PageHits, Translation, XlateError};
use crate::vram::{Phys, PhysMem, Vram};

/// Bytes a FILL/COPY moves per scheduling slice before yielding, so one huge
/// command can neither starve control-ring processing (invalidations) nor
/// hold the device lock long (`Device::process`: at most `STEP_SLICES`
/// slices a step): 128 KiB is some tens of µs of memcpy.
pub const XFER_SLICE: u64 = 128 << 10;

/// The most distinct pages one command can be stalled on at once: a LAUNCH
/// with every resident warp stalled, each on a page per lane (its code
/// fetch stalls on one page, before any warp runs); a COPY stalls on two,
/// the other commands on one. Bounds the device's fault bookkeeping.
pub const MAX_STALLED_PAGES: usize = crate::isa::MAX_RESIDENT_WARPS * WARP_SIZE as usize;
const _: () = assert!(MAX_STALLED_PAGES >= 2);

/// A fault to report in the fault buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultRec {
    pub ctx: u32,
    pub page: u64,
    pub access: Access,
    pub reason: FaultReason,
    pub engine: u8,
    pub channel: u8,
    pub info: u32,
}

/// What an engine needs from the device while it runs one slice.
pub struct Env<'a, M> {
    pub mem: &'a M,
    pub vram: &'a Vram,
    pub mmu: &'a mut Mmu,
    pub counters: &'a mut Counters,
    pub faults: &'a mut Vec<FaultRec>,
    pub ctx: u32,
    pub channel: u8,
    /// Warp-instructions a LAUNCH may execute before `Timeout`.
    pub launch_step_limit: u64,
    /// Fault injection, if the host configured it.
    pub inject: Option<&'a mut Injector>,
    /// Device time (ns) of this slice; only read with `inject`.
    pub now: u64,
}

impl<M> Env<'_, M> {
    /// The TLB-hit path of `xlate` for a per-page loop (`Mmu::hits`),
    /// `None` under fault injection: it may report a spurious fault beside,
    /// or pause at, any translation `xlate` makes, so every one goes there.
    fn hits(&self) -> Option<PageHits<'_>> {
        match self.inject {
            None => self.mmu.hits(self.ctx),
            Some(_) => None,
        }
    }

    /// Guest memory and VRAM, for the data accesses.
    pub fn phys(&self) -> PhysMem<'_, M> {
        PhysMem {
            mem: self.mem,
            vram: self.vram,
        }
    }
}

impl<M: GuestMemoryBackend> Env<'_, M> {
    /// Translate; `Ok(None)` means the access faulted (already queued for
    /// reporting) and must stall.
    pub fn xlate(
        &mut self,
        va: u64,
        access: Access,
        engine: u8,
        info: u32,
    ) -> Result<Option<Translation>, Status> {
        let origin = Origin {
            engine,
            channel: self.channel,
            info,
        };
        match self
            .mmu
            .translate_for(self.mem, self.counters, self.ctx, va, access, origin)
        {
            Ok(t) => {
                if let Some(inj) = self.inject.as_deref_mut() {
                    if inj.spurious.len() < MAX_SPURIOUS_PER_STEP
                        && inj.rng.chance(inj.spec.spurious_ppm)
                    {
                        // Reported beside the real faults of the step; the
                        // access itself goes ahead.
                        inj.spurious.push(FaultRec {
                            ctx: self.ctx,
                            page: va & !(PAGE_SIZE - 1),
                            access,
                            reason: FaultReason::NotPresent,
                            engine,
                            channel: self.channel,
                            info,
                        });
                    }
                }
                Ok(Some(t))
            }
            Err(XlateError::Fail(s)) => Err(s),
            Err(XlateError::Fault { va, reason }) => {
                let rec = FaultRec {
                    ctx: self.ctx,
                    page: va & !(PAGE_SIZE - 1),
                    access,
                    reason,
                    engine,
                    channel: self.channel,
                    info,
                };
                // Always queued, even if identical to one already queued: the
                // caller detects a stall by the queue growing. The fault
                // unit deduplicates.
                self.faults.push(rec);
                Ok(None)
            }
        }
    }
}

impl<M: GuestMemoryBackend> Env<'_, M> {
    /// A paused access runs now with the translation it held: the
    /// coherence checker looks at it again (the CPU's table may have
    /// changed meanwhile). `Err` under the checker's `Fatal`.
    fn recheck(
        &mut self,
        va: u64,
        access: Access,
        engine: u8,
        t: Translation,
    ) -> Result<(), Status> {
        let origin = Origin {
            engine,
            channel: self.channel,
            info: 0,
        };
        self.mmu
            .recheck(
                self.mem,
                self.counters,
                self.ctx,
                va,
                access,
                t.phys(),
                origin,
            )
            .map_err(|e| match e {
                XlateError::Fail(s) => s,
                XlateError::Fault { .. } => Status::CoherenceViolation,
            })
    }
}

impl<M> Env<'_, M> {
    /// Fault injection's `engine_stall_us`: whether the access just
    /// translated pauses, and until when (device ns).
    fn pause(&mut self) -> Option<u64> {
        let inj = self.inject.as_deref_mut()?;
        let us = inj.spec.engine_stall_us;
        if us == 0 || !inj.rng.chance(inj.spec.engine_stall_ppm) {
            return None;
        }
        inj.fire(Knob::EngineStall);
        Some(self.now + us * 1000)
    }
}

/// An access paused between its translation and its data access (fault
/// injection, `engine_stall_us`), with the translation it holds. An
/// invalidate overlapping it is not acknowledged before it ran.
#[derive(Debug, Clone, Copy)]
pub struct Held {
    /// Device time (ns) the access runs at.
    pub until: u64,
    access: HeldAccess,
}

#[derive(Debug, Clone, Copy)]
enum HeldAccess {
    Fill {
        va: u64,
        t: Translation,
        n: u64,
    },
    Copy {
        src: u64,
        dst: u64,
        s: Translation,
        d: Translation,
        n: u64,
    },
    Atomic {
        va: u64,
        t: Translation,
        size: u64,
    },
}

impl Held {
    /// Whether the pages the access touches meet `[start, end)`.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        let pages = |va: u64, n: u64| {
            let first = va & !(PAGE_SIZE - 1);
            let last = va.saturating_add(n.max(1)).next_multiple_of(PAGE_SIZE);
            first < end && start < last
        };
        match self.access {
            HeldAccess::Fill { va, n, .. } => pages(va, n),
            HeldAccess::Copy { src, dst, n, .. } => pages(src, n) || pages(dst, n),
            HeldAccess::Atomic { va, size, .. } => pages(va, size),
        }
    }
}

/// Result of running one slice of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done(Status, u64),
    /// Waiting for REPLAY (or CANCEL).
    Stalled,
    /// An access paused holding its translation until `Job::held_until`
    /// (fault injection).
    Paused,
    /// Budget used up; run again.
    Yield,
}

/// A decoded command in progress: the command itself, and for LAUNCH the
/// state of its warps.
#[derive(Debug)]
pub struct Job {
    command: Command,
    launch: Option<Box<LaunchJob>>,
    /// FILL/COPY progress in bytes.
    done: u64,
    /// Pages the (non-LAUNCH) job is stalled on.
    stalled: Vec<u64>,
    /// The access paused with its translation (fault injection).
    held: Option<Held>,
    /// MIGRATE: the validated list, read on the first run.
    pages: Vec<(Phys, Phys)>,
}

impl Job {
    /// Decode and validate a whole command before it may have any effect
    /// (`Command::from_le_bytes` holds the rules); `Err` is the status to
    /// complete it with.
    pub fn decode(raw: &[u8; COMMAND_SIZE]) -> Result<Job, Status> {
        Command::from_le_bytes(raw).map(Job::new)
    }

    /// A job for a decoded command.
    pub fn new(command: Command) -> Job {
        let launch = match command {
            Command::Launch {
                code,
                code_len,
                grid,
                block,
                args,
            } => Some(Box::new(LaunchJob::new(code, code_len, grid, block, args))),
            _ => None,
        };
        Job {
            command,
            launch,
            done: 0,
            stalled: Vec::new(),
            held: None,
            pages: Vec::new(),
        }
    }

    /// When the paused access runs (device ns), if one is paused.
    pub fn held_until(&self) -> Option<u64> {
        self.held.map(|h| h.until)
    }

    /// Whether a paused access holds a translation of a page in
    /// `[start, end)`.
    pub fn held_overlaps(&self, start: u64, end: u64) -> bool {
        self.held.is_some_and(|h| h.overlaps(start, end))
    }

    pub fn opcode(&self) -> Option<Opcode> {
        self.command.opcode()
    }

    /// Make stalled accesses runnable again (REPLAY).
    pub fn unstall(&mut self) {
        self.stalled.clear();
        if let Some(l) = &mut self.launch {
            l.unstall();
        }
    }

    /// Whether any access of this job waits on a fault in `[start, end)`.
    pub fn waits_on(&self, start: u64, end: u64) -> bool {
        let hit = |p: &u64| *p < end && start < p + PAGE_SIZE;
        match &self.launch {
            Some(l) => l.stalled_pages().any(|p| hit(&p)),
            None => self.stalled.iter().any(hit),
        }
    }

    pub fn has_stall(&self) -> bool {
        match &self.launch {
            Some(l) => l.stalled_pages().next().is_some(),
            None => !self.stalled.is_empty(),
        }
    }

    /// Stall on the faults queued since `mark`.
    fn stall_from<M>(&mut self, env: &Env<'_, M>, mark: usize) -> Outcome {
        self.stalled
            .extend(env.faults[mark..].iter().map(|f| f.page));
        Outcome::Stalled
    }

    pub fn run<M: GuestMemoryBackend>(&mut self, env: &mut Env<'_, M>) -> Outcome {
        if let Some(l) = &mut self.launch {
            return l.run(env);
        }
        if !self.stalled.is_empty() {
            return Outcome::Stalled;
        }
        let mark = env.faults.len();
        let held = &mut self.held;
        let r = match self.command {
            Command::Fill { dst, len, pattern } => {
                fill(env, dst, len, pattern, &mut self.done, held)
            }
            Command::Copy { dst, src, len } => copy(env, dst, src, len, &mut self.done, held),
            Command::Atomic {
                va,
                op,
                wide,
                operand,
                compare,
            } => atomic(env, va, op, wide, operand, compare, held),
            Command::SemaphoreRelease { va, wide, value } => semaphore(env, va, wide, value),
            Command::Migrate { list, count, large } => {
                let page = if large { LEAF_2M } else { PAGE_SIZE };
                migrate(env, list, count, page, &mut self.pages, &mut self.done)
            }
            // LAUNCH ran above; decoding never yields `Raw`.
            Command::Launch { .. } | Command::Raw(_) => Err(Status::InvalidOpcode),
        };
        match r {
            Ok(Some(result)) => Outcome::Done(Status::Ok, result),
            Ok(None) if self.held.is_some() => Outcome::Paused,
            Ok(None) if env.faults.len() > mark => self.stall_from(env, mark),
            Ok(None) => Outcome::Yield,
            Err(s) => Outcome::Done(s, 0),
        }
    }
}

/// `Ok(Some(result))` done, `Ok(None)` stalled or out of budget (the caller
/// tells them apart by whether faults were queued), `Err` failed.
type Step = Result<Option<u64>, Status>;

fn fill<M: GuestMemoryBackend>(
    env: &mut Env<'_, M>,
    dst: u64,
    len: u64,
    pattern: u64,
    done: &mut u64,
    held: &mut Option<Held>,
) -> Step {
    // Pattern repeated over one page plus one period, so any phase can be
    // sliced out of it; only as far as this run can write (up to a page
    // per write): a byte-by-byte 4 KiB pattern per run was most of a small
    // FILL's cost.
    let mut buf = [0u8; PAGE_SIZE as usize + 8];
    let want = (len.saturating_sub(*done).min(PAGE_SIZE) as usize + 8).next_multiple_of(8);
    for c in buf[..want].chunks_exact_mut(8) {
        c.copy_from_slice(&pattern.to_le_bytes());
    }
    let write = |env: &Env<'_, M>, t: Translation, n: u64, done: u64| {
        let mut off = 0;
        while off < n {
            let phase = ((done + off) % 8) as usize;
            let m = (n - off).min(PAGE_SIZE);
            env.phys()
                .write(t.phys().add(off), &buf[phase..phase + m as usize])?;
            off += m;
        }
        Ok::<(), Status>(())
    };
    if let Some(Held {
        access: HeldAccess::Fill { va, t, n },
        ..
    }) = held.take()
    {
        env.recheck(va, Access::Write, engine::FILL, t)?;
        write(env, t, n, *done)?;
        *done += n;
    }
    let stop = len.min(done.saturating_add(XFER_SLICE));
    while *done < stop {
        let va = dst + *done;
        let Some(t) = env.xlate(va, Access::Write, engine::FILL, 0)? else {
            return Ok(None);
        };
        // Never past the slice, however large the leaf.
        let n = (stop - *done).min(t.avail);
        if let Some(until) = env.pause() {
            *held = Some(Held {
                until,
                access: HeldAccess::Fill { va, t, n },
            });
            return Ok(None);
        }
        write(env, t, n, *done)?;
        *done += n;
    }
    Ok((*done == len).then_some(0))
}

type HostSlice<'a, M> = VolatileSlice<'a, MS<'a, M>>;

/// The guest-memory regions a COPY slice touched last, as whole host
/// slices, one per side: a page's copy then costs a bounds check instead
/// of a region lookup.
struct Regions<'a, M: GuestMemoryBackend> {
    phys: PhysMem<'a, M>,
    src: Option<(u64, HostSlice<'a, M>)>,
    dst: Option<(u64, HostSlice<'a, M>)>,
}

/// `n` bytes at `gpa` from the region `cache` holds, else from the region
/// holding `gpa` (cached then); `None` if they are not one host slice.
#[inline(always)]
fn region_slice<'a, M: GuestMemoryBackend>(
    cache: &mut Option<(u64, HostSlice<'a, M>)>,
    mem: &'a M,
    gpa: u64,
    n: u64,
) -> Option<HostSlice<'a, M>> {
    if let Some((start, whole)) = cache {
        if let Some(s) = subslice::<M>(whole, gpa.wrapping_sub(*start), n) {
            return Some(s);
        }
    }
    region_slice_cold(cache, mem, gpa, n)
}

/// `[off, off + n)` of `whole`, if inside.
#[inline(always)]
fn subslice<'a, M: GuestMemoryBackend>(
    whole: &HostSlice<'a, M>,
    off: u64,
    n: u64,
) -> Option<HostSlice<'a, M>> {
    // A GPA below the region's start wraps to an offset past its end.
    let off = usize::try_from(off).ok()?;
    let n = usize::try_from(n).ok()?;
    whole.subslice(off, n).ok()
}

#[cold]
fn region_slice_cold<'a, M: GuestMemoryBackend>(
    cache: &mut Option<(u64, HostSlice<'a, M>)>,
    mem: &'a M,
    gpa: u64,
    n: u64,
) -> Option<HostSlice<'a, M>> {
    let r = mem.find_region(GuestAddress(gpa))?;
    let start = r.start_addr().raw_value();
    let (_, whole) = cache.insert((start, r.as_volatile_slice().ok()?));
    subslice::<M>(whole, gpa - start, n)
}

impl<'a, M: GuestMemoryBackend> Regions<'a, M> {
    fn new(mem: &'a M, vram: &'a Vram) -> Self {
        Regions {
            phys: PhysMem { mem, vram },
            src: None,
            dst: None,
        }
    }

    /// `PhysMem::copy`, through the cached regions when both sides are
    /// system memory.
    #[inline(always)]
    fn copy(&mut self, dst: Phys, src: Phys, n: u64) -> Result<(), Status> {
        if !src.vram && !dst.vram {
            let s = region_slice(&mut self.src, self.phys.mem, src.addr, n);
            let d = region_slice(&mut self.dst, self.phys.mem, dst.addr, n);
            if let (Some(s), Some(d)) = (s, d) {
                s.copy_to_volatile_slice(d);
                return Ok(());
            }
        }
        self.phys.copy(dst, src, n)
    }
}

fn copy<M: GuestMemoryBackend>(
    env: &mut Env<'_, M>,
    dst: u64,
    src: u64,
    len: u64,
    done: &mut u64,
    held: &mut Option<Held>,
) -> Step {
    // Counted once per slice, not per page.
    let (before, mut hits) = (*done, 0);
    let r = copy_slice(env, dst, src, len, done, held, &mut hits);
    Mmu::count_hits(env.counters, hits);
    env.counters.add(Counter::BytesCopied, *done - before);
    r
}

/// One COPY slice's progress: the bytes copied, and the run translated
/// after them but not copied yet, physically contiguous on both sides so
/// one host copy. Small and `Copy`, so a loop keeps it in registers.
#[derive(Clone, Copy)]
struct Run {
    /// Bytes of the command copied.
    done: u64,
    src: Phys,
    dst: Phys,
    /// Bytes of the run.
    n: u64,
}

impl Run {
    /// Bytes of the command translated.
    fn at(&self) -> u64 {
        self.done + self.n
    }

    /// `n` more bytes, translated to `s` and `d`: they extend the run, or
    /// the run is copied and they start the next.
    #[inline(always)]
    fn add<'a, M: GuestMemoryBackend>(
        &mut self,
        regions: &mut Regions<'a, M>,
        s: Translation,
        d: Translation,
        n: u64,
    ) -> Result<(), Status> {
        let (s, d) = (s.phys(), d.phys());
        if s != self.src.add(self.n) || d != self.dst.add(self.n) {
            self.flush(regions)?;
            self.src = s;
            self.dst = d;
        }
        self.n += n;
        Ok(())
    }

    /// Copy the run.
    #[inline(always)]
    fn flush<'a, M: GuestMemoryBackend>(
        &mut self,
        regions: &mut Regions<'a, M>,
    ) -> Result<(), Status> {
        let n = std::mem::take(&mut self.n);
        if n > 0 {
            regions.copy(self.dst, self.src, n)?;
            self.done += n;
        }
        Ok(())
    }

    /// The pages from `at()` on whose translations both hit `tlb` in
    /// system memory, up to `stop`: COPY's common case, kept to one tight
    /// loop. Returns the translations served.
    #[inline(never)]
    fn hits<'a, M: GuestMemoryBackend>(
        &mut self,
        regions: &mut Regions<'a, M>,
        tlb: PageHits<'_>,
        src: u64,
        dst: u64,
        stop: u64,
    ) -> Result<u64, Status> {
        // VRAM pages take the general path, so this loop knows both sides
        // are system memory; a pending VRAM run stays pending there, to be
        // joined by the next VRAM page if it is contiguous.
        if self.src.vram || self.dst.vram {
            return Ok(0);
        }
        let mut run = *self;
        let mut pages = 0;
        let r = loop {
            let at = run.at();
            if at >= stop {
                break Ok(());
            }
            let (Some(s), Some(d)) = (
                tlb.get(src + at, Access::Read),
                tlb.get(dst + at, Access::Write),
            ) else {
                break Ok(());
            };
            if s.vram || d.vram {
                break Ok(());
            }
            pages += 1;
            if let Err(e) = run.add(regions, s, d, (stop - at).min(s.avail).min(d.avail)) {
                break Err(e);
            }
        };
        *self = run;
        r.map(|()| 2 * pages)
    }
}

fn copy_slice<M: GuestMemoryBackend>(
    env: &mut Env<'_, M>,
    dst: u64,
    src: u64,
    len: u64,
    done: &mut u64,
    held: &mut Option<Held>,
    hits: &mut u64,
) -> Step {
    if let Some(Held {
        access: HeldAccess::Copy { src, dst, s, d, n },
        ..
    }) = held.take()
    {
        env.recheck(src, Access::Read, engine::COPY, s)?;
        env.recheck(dst, Access::Write, engine::COPY, d)?;
        env.phys().copy(d.phys(), s.phys(), n)?;
        *done += n;
    }
    let mut regions = Regions::new(env.mem, env.vram);
    let mut run = Run {
        done: *done,
        src: Phys::system(0),
        dst: Phys::system(0),
        n: 0,
    };
    let r = copy_pages(env, &mut regions, &mut run, hits, dst, src, len, held);
    *done = run.done;
    r
}

/// Still one translation per page (or leaf), but physically contiguous
/// pages on both sides coalesce into one bulk copy. The translations never
/// outlive this slice, so no control step (invalidation) can come between
/// one and its copy.
#[allow(clippy::too_many_arguments)]
fn copy_pages<'a, M: GuestMemoryBackend>(
    env: &mut Env<'a, M>,
    regions: &mut Regions<'a, M>,
    run: &mut Run,
    hits: &mut u64,
    dst: u64,
    src: u64,
    len: u64,
    held: &mut Option<Held>,
) -> Step {
    let stop = len.min(run.done.saturating_add(XFER_SLICE));
    while run.at() < stop {
        if let Some(tlb) = env.hits() {
            *hits += run.hits(regions, tlb, src, dst, stop)?;
            if run.at() >= stop {
                break;
            }
        }
        let at = run.at();
        // Translate the destination even if the source faulted, so both
        // faults are reported in one round trip.
        let pair = env
            .xlate(src + at, Access::Read, engine::COPY, 0)
            .and_then(|s| Ok((s, env.xlate(dst + at, Access::Write, engine::COPY, 0)?)));
        let (s, d) = match pair {
            Ok((Some(s), Some(d))) => (s, d),
            // A fault stalls, an error fails the command: either after
            // what was translated before.
            r => {
                run.flush(regions)?;
                return r.map(|_| None);
            }
        };
        let n = (stop - at).min(s.avail).min(d.avail);
        if let Some(until) = env.pause() {
            run.flush(regions)?;
            *held = Some(Held {
                until,
                access: HeldAccess::Copy {
                    src: src + at,
                    dst: dst + at,
                    s,
                    d,
                    n,
                },
            });
            return Ok(None);
        }
        run.add(regions, s, d, n)?;
    }
    run.flush(regions)?;
    Ok((run.done == len).then_some(0))
}

fn atomic<M: GuestMemoryBackend>(
    env: &mut Env<'_, M>,
    va: u64,
    op: u32,
    wide: bool,
    operand: u64,
    compare: u64,
    held: &mut Option<Held>,
) -> Step {
    let t = match held.take() {
        Some(Held {
            access: HeldAccess::Atomic { va, t, .. },
            ..
        }) => {
            env.recheck(va, Access::Atomic, engine::ATOMIC, t)?;
            t
        }
        _ => {
            let Some(t) = env.xlate(va, Access::Atomic, engine::ATOMIC, 0)? else {
                return Ok(None);
            };
            if let Some(until) = env.pause() {
                let size = if wide { 8 } else { 4 };
                *held = Some(Held {
                    until,
                    access: HeldAccess::Atomic { va, t, size },
                });
                return Ok(None);
            }
            t
        }
    };
    env.phys()
        .atomic(t.phys(), op, wide, operand, compare)
        .map(Some)
}

fn semaphore<M: GuestMemoryBackend>(env: &mut Env<'_, M>, va: u64, wide: bool, value: u64) -> Step {
    let Some(t) = env.xlate(va, Access::Write, engine::SEMAPHORE, 0)? else {
        return Ok(None);
    };
    // Release: every earlier write of the channel is visible before the fence.
    env.phys().store_release(t.phys(), value, wide)?;
    Ok(Some(0))
}

/// Read and validate a MIGRATE list of `count` pages of `page` bytes at
/// GPA `list`: every entry well formed and every page inside guest RAM or
/// VRAM, before the first byte moves.
fn migrate_list<M: GuestMemoryBackend>(
    env: &Env<'_, M>,
    list: u64,
    count: u32,
    page: u64,
) -> Result<Vec<(Phys, Phys)>, Status> {
    let mut raw = vec![0u8; count as usize * MigrateEntry::SIZE];
    env.mem
        .read_slice(&mut raw, GuestAddress(list))
        .map_err(|_| Status::BadList)?;
    let inside = |p: Phys| match p.vram {
        true => env
            .vram
            .contains(p.addr, page)
            .then_some(p)
            .ok_or(Status::BadVram),
        false => usize::try_from(page)
            .ok()
            .filter(|&n| env.mem.check_range(GuestAddress(p.addr), n))
            .map(|_| p)
            .ok_or(Status::MemoryError),
    };
    raw.chunks_exact(MigrateEntry::SIZE)
        .map(|b| {
            let e = MigrateEntry::from_le_bytes(b.try_into().map_err(|_| Status::BadList)?);
            let (src, dst) = e.decode(page)?;
            Ok((inside(src)?, inside(dst)?))
        })
        .collect()
}

/// MIGRATE: physical page copies, no translation (so no fault and no
/// coherence check), at most `XFER_SLICE` bytes a run.
fn migrate<M: GuestMemoryBackend>(
    env: &mut Env<'_, M>,
    list: u64,
    count: u32,
    page: u64,
    pages: &mut Vec<(Phys, Phys)>,
    done: &mut u64,
) -> Step {
    if pages.is_empty() {
        *pages = migrate_list(env, list, count, page)?;
    }
    let len = page * pages.len() as u64;
    let stop = len.min(done.saturating_add(XFER_SLICE));
    while *done < stop {
        let Some(&(src, dst)) = pages.get((*done / page) as usize) else {
            break;
        };
        let off = *done % page;
        let n = (page - off).min(stop - *done);
        env.phys().copy(dst.add(off), src.add(off), n)?;
        env.counters.add(Counter::BytesMigrated, n);
        *done += n;
    }
    Ok((*done >= len).then_some(pages.len() as u64))
}
