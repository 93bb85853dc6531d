//! `bench=faults`: the cost of the SVM fault and invalidation paths,
//! measured in the guest with the TSC (`scripts/bench.sh faults`).
//!
//! * `single_fault`: one FILL of one 4 KiB page the device has no
//!   translation for, on an otherwise idle GPU. Timestamps: the channel
//!   doorbell write, the FAULT interrupt stub, the REPLAY doorbell write
//!   and the CHANNEL (completion) interrupt stub. Three variants with the
//!   same command and the same bottom half (drain, sort, replay):
//!   `null` services the fault on a plain context whose handler writes one
//!   device PTE to a frame chosen in advance (no mirror, no HMM, no process);
//!   `svm_resident` goes through the full HMM path of an `SvmContext`
//!   (fault-around 4 KiB) on a process page the CPU already populated;
//!   `svm_first_touch` the same on a page the CPU never touched, so
//!   `range_fault` also allocates and zeroes the frame. The variants take
//!   turns, one sample each.
//! * `first_touch`: one FILL over 64 MiB the CPU never touched, per
//!   fault-around size, with 4 KiB CPU pages (and once with 2 MiB pages).
//! * `cpu_first_touch`: the yardstick for `first_touch`: the guest CPU
//!   writing the same 64 MiB of fresh pages from user mode (the process
//!   agent's fill, ring 3), one user page fault per 4 KiB page serviced by
//!   the same mm fault handler the GPU path reaches through HMM.
//! * `munmap`: munmap of a 64 KiB mapping the device has mapped, from the
//!   start of munmap to the moment the driver saw the device acknowledge the
//!   TLB invalidation, and to munmap's return; the same munmap without a
//!   mirror as the baseline.
//! * `invalidate`: the driver's TLB invalidation alone (`Context::invalidate`
//!   of one page on a plain context, no lock held), call to acknowledgement.
//!
//! With `iterations=N` only `single_fault` runs, N timed samples per
//! variant: a long steady run of the single-fault path for
//! `faultline run --profile-guest`.
//!
//! One `bench ...` line per result; every sample is checked (one fault, one
//! replay, data visible to the CPU, mappings gone) so a broken path fails
//! the run instead of producing a fast number.

use alloc::format;
use alloc::string::String;
use alloc::sync::{Arc, Weak};
use alloc::vec::Vec;

use faultline_abi::{vector, Pte, PAGE_SIZE};
use faultline_driver::gpu::{
    Channel, Command, Context, CounterSnapshot, Fault, FaultHandler, Gpu, GpuConfig, PageSize,
    PageTable, Platform, SvmConfig, SvmContext,
};

use super::{last_doorbell_tsc, Stamped};
use crate::arch::{irq, time};
use crate::mm::process::{user, MapFlags, Process, Prot};
use crate::println;

type P = Stamped;

/// Timed single faults per variant, after `WARMUP` untimed ones (unless
/// `iterations=` says otherwise).
const SINGLE: usize = 100;
const WARMUP: usize = 5;
/// First-touch buffer.
const FIRST_TOUCH_BYTES: u64 = 64 << 20;
/// munmap samples per variant and the size of each mapping.
const MUNMAP: usize = 50;
const MUNMAP_BYTES: u64 = 64 << 10;
/// GPU VAs of the `null` variant (no process behind them).
const NULL_VA: u64 = 0x40_0000_0000;
const PATTERN: u64 = 0x5a5a_0123_4567_89ab;

fn e<T: core::fmt::Display>(what: &'static str) -> impl Fn(T) -> String {
    move |err| format!("{what}: {err}")
}

fn ed<T: core::fmt::Debug>(what: &'static str) -> impl Fn(T) -> String {
    move |err| format!("{what}: {err:?}")
}

fn median_ns(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    time::ticks_to_ns(v[v.len() / 2])
}

pub fn run() -> Result<(), String> {
    let g = crate::gpu::get()?.ok_or("bench=faults needs the Faultline GPU")?;
    let p = Arc::new(Stamped(g.platform.clone()));
    let cfg = GpuConfig {
        // A 64 MiB FILL at 4 KiB fault-around is 16384 round trips.
        timeout_ns: 600_000_000_000,
        ..GpuConfig::default()
    };
    let gpu = Gpu::probe(p, cfg).map_err(e("probe"))?;
    if let Some(n) = crate::tests::params().iterations {
        let n = usize::try_from(n).ok().filter(|&n| n > 0);
        return single_faults(&gpu, n.ok_or("iterations= must be at least 1")?);
    }
    single_faults(&gpu, SINGLE)?;
    for fa in [4 << 10, 64 << 10, 2 << 20] {
        first_touch(&gpu, fa, false)?;
    }
    first_touch(&gpu, 64 << 10, true)?;
    cpu_first_touch()?;
    munmap(&gpu, true)?;
    munmap(&gpu, false)?;
    invalidate(&gpu)?;
    Ok(())
}

/// TSC stamps of one faulting command.
struct Stamps {
    doorbell: u64,
    /// `None` when the FAULT MSI was not taken between the doorbell and the
    /// replay: the bottom half found the entry on a poll-slice wake-up
    /// instead (MSIs of different vectors travel through different irqfds
    /// and may arrive late).
    fault_irq: Option<u64>,
    replay: u64,
    done_irq: u64,
}

/// Submits `cmd` (which must fault exactly once), waits for it and returns
/// its stamps, checking that the path was one fault, one batch, one replay.
fn one_fault(gpu: &Gpu<P>, chan: &Channel<P>, cmd: &Command) -> Result<Stamps, String> {
    let p = gpu.platform();
    let c0 = gpu.counters().snapshot();
    let faults0 = irq::count(vector::FAULT);
    let done0 = irq::count(vector::CHANNEL);
    let before = time::rdtsc();
    let ticket = chan.submit(cmd).map_err(e("submit"))?;
    let doorbell = last_doorbell_tsc();
    chan.wait(ticket).map_err(e("faulting FILL"))?;
    // The driver may see the completion in memory before its MSI lands.
    let deadline = time::Deadline::after_ms(2000);
    while irq::count(vector::CHANNEL) == done0 {
        if deadline.expired() {
            return Err("no completion MSI within 2 s".into());
        }
        p.wait_interrupt(1_000_000);
    }
    let replay = last_doorbell_tsc();
    let fault_irq = irq::last_tsc(vector::FAULT);
    let s = Stamps {
        doorbell,
        fault_irq: (irq::count(vector::FAULT) != faults0
            && doorbell <= fault_irq
            && fault_irq <= replay)
            .then_some(fault_irq),
        replay,
        done_irq: irq::last_tsc(vector::CHANNEL),
    };
    let c = gpu.counters().snapshot();
    let d = |f: fn(&CounterSnapshot) -> u64| f(&c) - f(&c0);
    if d(|c| c.faults_read) != 1 || d(|c| c.replays) != 1 || d(|c| c.cancels) != 0 {
        return Err(format!(
            "expected one fault and one replay, counters moved from {c0} to {c}"
        ));
    }
    if !(before <= s.doorbell && s.doorbell <= s.replay && s.replay <= s.done_irq) {
        return Err(format!(
            "stamps out of order (a doorbell or interrupt missing): submit at {before}, \
             doorbell {}, replay {}, completion MSI {}",
            s.doorbell, s.replay, s.done_irq,
        ));
    }
    Ok(s)
}

/// Samples of one variant: the round trip and its three segments.
#[derive(Default)]
struct Samples {
    total: Vec<u64>,
    to_fault: Vec<u64>,
    service: Vec<u64>,
    tail: Vec<u64>,
    /// Samples whose FAULT MSI came after the replay (in `total` and
    /// `tail`, not in the other two segments).
    late: usize,
}

impl Samples {
    fn push(&mut self, s: &Stamps) {
        self.total.push(s.done_irq - s.doorbell);
        self.tail.push(s.done_irq - s.replay);
        match s.fault_irq {
            Some(f) => {
                self.to_fault.push(f - s.doorbell);
                self.service.push(s.replay - f);
            }
            None => self.late += 1,
        }
    }

    fn print(&mut self, variant: &str, samples: usize) -> Result<(), String> {
        if self.to_fault.is_empty() {
            return Err(format!("{variant}: no FAULT MSI came before its replay"));
        }
        let min = time::ticks_to_ns(*self.total.iter().min().unwrap_or(&0));
        println!(
            "bench single_fault variant={variant} samples={samples} median_ns={} min_ns={min} \
             fault_irq_ns={} service_ns={} replay_done_ns={} late_fault_msi={}",
            median_ns(&mut self.total),
            median_ns(&mut self.to_fault),
            median_ns(&mut self.service),
            median_ns(&mut self.tail),
            self.late
        );
        Ok(())
    }
}

/// The null baseline's fault handler: one device PTE per fault, to a frame
/// known in advance. What is left is the interrupt, the bottom half's
/// drain/sort/dedup, one page-table write and the replay.
struct Preset {
    ctx: Weak<Context<P>>,
    phys: u64,
}

impl FaultHandler for Preset {
    fn service(&self, faults: &[Fault], cancel: &mut Vec<u64>) {
        let Some(ctx) = self.ctx.upgrade() else {
            cancel.extend(faults.iter().map(|f| f.va));
            return;
        };
        let mut pt = ctx.page_table();
        for f in faults {
            if pt
                .map(f.va, self.phys, PageSize::Size4K, Pte::WRITE)
                .is_err()
            {
                cancel.push(f.va);
            }
        }
    }
}

/// The three single-fault variants, interleaved sample by sample so that
/// drifting host load (2 shared cores) hits them alike.
fn single_faults(gpu: &Arc<Gpu<P>>, samples: usize) -> Result<(), String> {
    let p = gpu.platform();
    let buf = p.dma_alloc(1).ok_or("dma_alloc failed")?;
    let result = (|| {
        let pt = PageTable::new(p.clone()).map_err(e("page table"))?;
        let ctx = Arc::new(Context::new(gpu, pt).map_err(e("context"))?);
        ctx.set_fault_handler(Some(Arc::new(Preset {
            ctx: Arc::downgrade(&ctx),
            phys: buf.phys(),
        })));
        let chan = Channel::open(&ctx).map_err(e("channel"))?;
        let r = svm_pair(gpu, &chan, samples);
        drop(chan);
        ctx.set_fault_handler(None);
        r?;
        if buf.read_u64(PAGE_SIZE as usize - 8) != PATTERN {
            return Err("null variant: the FILL did not reach the frame".into());
        }
        Ok(())
    })();
    p.dma_free(buf);
    result
}

/// Sets up the two SVM variants and runs all three (`null` on `null_chan`).
fn svm_pair(gpu: &Arc<Gpu<P>>, null_chan: &Channel<P>, single: usize) -> Result<(), String> {
    let n = (single + WARMUP) as u64;
    let mut procs = Vec::new();
    for flags in [MapFlags::POPULATE, MapFlags::empty()] {
        let pr = Process::new().map_err(ed("process"))?;
        let a = pr
            .mmap(None, n * PAGE_SIZE, Prot::READ | Prot::WRITE, flags)
            .map_err(ed("mmap"))?;
        let svm = SvmContext::new(
            gpu,
            pr.mm(),
            SvmConfig {
                fault_around: PAGE_SIZE,
                ..SvmConfig::default()
            },
        )
        .map_err(e("svm context"))?;
        let chan = Channel::open(svm.context()).map_err(e("channel"))?;
        procs.push((pr, a, svm, chan));
    }
    let names = ["null", "svm_resident", "svm_first_touch"];
    let mut samples: [Samples; 3] = Default::default();
    let mapped0 = gpu.counters().snapshot().pages_mapped;
    for i in 0..single + WARMUP {
        let off = i as u64 * PAGE_SIZE;
        for (v, smp) in samples.iter_mut().enumerate() {
            let (chan, dst) = match v {
                0 => (null_chan, NULL_VA + off),
                _ => (&procs[v - 1].3, procs[v - 1].1 + off),
            };
            let cmd = Command::Fill {
                dst,
                len: PAGE_SIZE,
                pattern: PATTERN,
            };
            let s = one_fault(gpu, chan, &cmd)?;
            if i >= WARMUP {
                smp.push(&s);
            }
        }
    }
    let mapped = gpu.counters().snapshot().pages_mapped - mapped0;
    if mapped != 2 * n {
        return Err(format!(
            "svm variants: {mapped} device pages mapped for {} faults",
            2 * n
        ));
    }
    for (pr, a, _, _) in &procs {
        let (a, last) = (*a, *a + (n - 1) * PAGE_SIZE + 8);
        let seen = pr
            .run(|| (user::read_u64(a), user::read_u64(last)))
            .map_err(ed("CPU read"))?;
        if seen != (PATTERN, PATTERN) {
            return Err(format!(
                "svm variants: the CPU reads {seen:x?} after the FILLs"
            ));
        }
    }
    for (v, smp) in samples.iter_mut().enumerate() {
        smp.print(names[v], single)?;
    }
    Ok(())
}

fn first_touch(gpu: &Arc<Gpu<P>>, fault_around: u64, huge: bool) -> Result<(), String> {
    let pr = Process::new().map_err(ed("process"))?;
    let flags = if huge {
        MapFlags::HUGE
    } else {
        MapFlags::empty()
    };
    let a = pr
        .mmap(None, FIRST_TOUCH_BYTES, Prot::READ | Prot::WRITE, flags)
        .map_err(ed("mmap"))?;
    let svm = SvmContext::new(
        gpu,
        pr.mm(),
        SvmConfig {
            fault_around,
            ..SvmConfig::default()
        },
    )
    .map_err(e("svm"))?;
    let chan = Channel::open(svm.context()).map_err(e("channel"))?;
    let c0 = gpu.counters().snapshot();
    let t0 = time::rdtsc();
    chan.run(&Command::Fill {
        dst: a,
        len: FIRST_TOUCH_BYTES,
        pattern: PATTERN,
    })
    .map_err(e("64 MiB FILL"))?;
    let ns = time::ticks_to_ns(time::rdtsc() - t0);
    let c = gpu.counters().snapshot();
    let cpu_page = if huge { 2 << 20 } else { PAGE_SIZE };
    let leaves = c.pages_mapped - c0.pages_mapped;
    if leaves != FIRST_TOUCH_BYTES / cpu_page || c.cancels != c0.cancels {
        return Err(format!(
            "first touch: {leaves} device leaves of {cpu_page} bytes for 64 MiB, counters {c0} → {c}"
        ));
    }
    let probes = [a, a + FIRST_TOUCH_BYTES / 2 + 8, a + FIRST_TOUCH_BYTES - 8];
    let seen = pr
        .run(|| probes.map(user::read_u64))
        .map_err(ed("CPU read"))?;
    if seen != [PATTERN; 3] {
        return Err(format!("first touch: the CPU reads {seen:x?}"));
    }
    let before = pr.stats().faults;
    drop(chan);
    drop(svm);
    println!(
        "bench first_touch fault_around={fault_around} cpu_page={cpu_page} bytes={FIRST_TOUCH_BYTES} \
         pages={} ns={ns} windows={} batches={} faults={} mm_faults={before}",
        FIRST_TOUCH_BYTES / PAGE_SIZE,
        c.windows - c0.windows,
        c.batches - c0.batches,
        c.faults_read - c0.faults_read,
    );
    Ok(())
}

fn cpu_first_touch() -> Result<(), String> {
    use crate::user::agent::Pattern;
    let pr = Process::new().map_err(ed("process"))?;
    let a = pr
        .mmap(
            None,
            FIRST_TOUCH_BYTES,
            Prot::READ | Prot::WRITE,
            MapFlags::empty(),
        )
        .map_err(ed("mmap"))?;
    let faults0 = pr.stats().faults;
    let agent = pr.agent();
    let t0 = time::rdtsc();
    agent
        .fill(a, FIRST_TOUCH_BYTES, Pattern::constant(PATTERN))
        .map_err(ed("user-mode fill"))?;
    let ns = time::ticks_to_ns(time::rdtsc() - t0);
    let faults = pr.stats().faults - faults0;
    let pages = FIRST_TOUCH_BYTES / PAGE_SIZE;
    if faults != pages {
        return Err(format!(
            "cpu first touch: {faults} faults for {pages} fresh pages"
        ));
    }
    let probes = [a, a + FIRST_TOUCH_BYTES / 2 + 8, a + FIRST_TOUCH_BYTES - 8];
    for p in probes {
        let v = agent.read_u64(p).map_err(ed("user-mode read"))?;
        if v != PATTERN {
            return Err(format!("cpu first touch: {p:#x} reads {v:#x}"));
        }
    }
    println!(
        "bench cpu_first_touch mode=user bytes={FIRST_TOUCH_BYTES} pages={pages} ns={ns} faults={faults}"
    );
    Ok(())
}

fn munmap(gpu: &Arc<Gpu<P>>, mirrored: bool) -> Result<(), String> {
    let pr = Process::new().map_err(ed("process"))?;
    let svm = if mirrored {
        let svm = SvmContext::new(gpu, pr.mm(), SvmConfig::default()).map_err(e("svm"))?;
        let chan = Channel::open(svm.context()).map_err(e("channel"))?;
        Some((svm, chan))
    } else {
        None
    };
    let mut to_ack = Vec::with_capacity(MUNMAP);
    let mut to_irq = Vec::with_capacity(MUNMAP);
    let mut total = Vec::with_capacity(MUNMAP);
    for i in 0..MUNMAP + WARMUP {
        // Both variants free the same 16 frames: faulted in by the GPU
        // through the mirror, or populated by the CPU without one.
        let flags = if mirrored {
            MapFlags::empty()
        } else {
            MapFlags::POPULATE
        };
        let a = pr
            .mmap(None, MUNMAP_BYTES, Prot::READ | Prot::WRITE, flags)
            .map_err(ed("mmap"))?;
        if let Some((svm, chan)) = &svm {
            chan.run(&Command::Fill {
                dst: a,
                len: MUNMAP_BYTES,
                pattern: PATTERN,
            })
            .map_err(e("FILL"))?;
            let last = a + MUNMAP_BYTES - PAGE_SIZE;
            if svm.device_lookup(a).is_none() || svm.device_lookup(last).is_none() {
                return Err("munmap: the FILL left the range unmapped on the device".into());
            }
        }
        let c0 = gpu.counters().snapshot();
        let irq0 = irq::count(vector::CONTROL);
        let t0 = time::rdtsc();
        let t0_ns = time::ticks_to_ns(t0);
        pr.munmap(a, MUNMAP_BYTES).map_err(ed("munmap"))?;
        let t1 = time::rdtsc();
        let c = gpu.counters().snapshot();
        if let Some((svm, _)) = &svm {
            let ack = gpu.last_tlb_ack_ns();
            if c.tlb_invalidates - c0.tlb_invalidates != 1
                || ack < t0_ns
                || svm.device_lookup(a).is_some()
            {
                return Err(format!(
                    "munmap: expected one acknowledged TLB invalidation, counters {c0} → {c}, \
                     ack at {ack} ns, munmap from {t0_ns} ns"
                ));
            }
            // The CONTROL MSI may only be taken after munmap returned.
            let deadline = time::Deadline::after_ms(2000);
            while irq::count(vector::CONTROL) == irq0 {
                if deadline.expired() {
                    return Err("munmap: no CONTROL MSI within 2 s".into());
                }
                gpu.platform().wait_interrupt(1_000_000);
            }
            if i >= WARMUP {
                to_ack.push(time::ns_to_ticks(ack - t0_ns));
                to_irq.push(irq::last_tsc(vector::CONTROL) - t0);
            }
        } else if c.tlb_invalidates != c0.tlb_invalidates {
            return Err("munmap without a mirror invalidated the device TLB".into());
        }
        if i >= WARMUP {
            total.push(t1 - t0);
        }
    }
    if mirrored {
        println!(
            "bench munmap variant=mirror samples={MUNMAP} bytes={MUNMAP_BYTES} ack_ns={} \
             ack_irq_ns={} return_ns={}",
            median_ns(&mut to_ack),
            median_ns(&mut to_irq),
            median_ns(&mut total)
        );
    } else {
        println!(
            "bench munmap variant=nomirror samples={MUNMAP} bytes={MUNMAP_BYTES} return_ns={}",
            median_ns(&mut total)
        );
    }
    drop(svm);
    Ok(())
}

fn invalidate(gpu: &Arc<Gpu<P>>) -> Result<(), String> {
    let p = gpu.platform();
    let buf = p.dma_alloc(1).ok_or("dma_alloc failed")?;
    let result = (|| {
        let mut pt = PageTable::new(p.clone()).map_err(e("page table"))?;
        pt.map(NULL_VA, buf.phys(), PageSize::Size4K, Pte::WRITE)
            .map_err(e("map"))?;
        let ctx = Context::new(gpu, pt).map_err(e("context"))?;
        let chan = Channel::open(&ctx).map_err(e("channel"))?;
        let mut to_ack = Vec::with_capacity(MUNMAP);
        let mut to_irq = Vec::with_capacity(MUNMAP);
        for i in 0..MUNMAP + WARMUP {
            // Puts the translation in the device TLB.
            chan.run(&Command::Fill {
                dst: NULL_VA,
                len: 8,
                pattern: PATTERN,
            })
            .map_err(e("FILL"))?;
            let irq0 = irq::count(vector::CONTROL);
            let t0 = time::rdtsc();
            let t0_ns = time::ticks_to_ns(t0);
            ctx.invalidate(NULL_VA, PAGE_SIZE)
                .map_err(e("invalidate"))?;
            let ack = gpu.last_tlb_ack_ns();
            if ack < t0_ns {
                return Err("invalidate: no acknowledgement recorded".into());
            }
            // The CONTROL MSI may land after the driver saw the ack.
            let deadline = time::Deadline::after_ms(2000);
            while irq::count(vector::CONTROL) == irq0 {
                if deadline.expired() {
                    return Err("invalidate: no CONTROL MSI within 2 s".into());
                }
                p.wait_interrupt(1_000_000);
            }
            if i >= WARMUP {
                to_ack.push(time::ns_to_ticks(ack - t0_ns));
                to_irq.push(irq::last_tsc(vector::CONTROL) - t0);
            }
        }
        println!(
            "bench invalidate samples={MUNMAP} ack_ns={} ack_irq_ns={}",
            median_ns(&mut to_ack),
            median_ns(&mut to_irq)
        );
        drop(chan);
        drop(ctx);
        Ok(())
    })();
    p.dma_free(buf);
    result
}
