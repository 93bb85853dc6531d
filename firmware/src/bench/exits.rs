//! `bench=exits`: VM-exit costs of the GPU paths (`scripts/bench.sh exits`).

use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;

use faultline_abi::{regs, vector, Counter, Opcode, Pte, DEVICE_MAGIC};
use faultline_driver::gpu::{Channel, Command, Context, GpuConfig, PageSize, PageTable, Platform};

use super::{last_doorbell_tsc, Stamped};
use crate::arch::time;
use crate::mm::frames;
use crate::println;

/// Percentile `pct` of sorted `samples` (TSC ticks), in ns.
fn percentile(sorted: &[u64], pct: usize) -> u64 {
    time::ticks_to_ns(sorted[(sorted.len() * pct / 100).min(sorted.len() - 1)])
}

/// Median and minimum of `samples` (TSC ticks), in ns.
fn summarize(samples: &mut [u64]) -> (u64, u64) {
    samples.sort_unstable();
    (
        time::ticks_to_ns(samples[samples.len() / 2]),
        time::ticks_to_ns(samples[0]),
    )
}

const READS: usize = 2000;
const NOOPS: usize = 300;
/// Register reads timed while the channels stream.
const BUSY_READS: usize = 2000;
/// Channels streaming meanwhile, and what each queues: commands of
/// `STREAM_LEN` bytes over VA ranges whose 2 MiB leaves all alias one 2 MiB
/// frame (large commands, little memory), enough to outlast the reads.
const STREAM_CHANNELS: usize = 8;
const STREAM_DEPTH: usize = 8;
const STREAM_LEN: u64 = 256 << 20;

/// Prints `bench mmio_read ...` (one BAR0 register read, i.e. an MMIO exit
/// round trip), `bench doorbell_irq ...` (TSC just before the doorbell
/// write of a no-op command to TSC in the completion MSI's interrupt stub,
/// the CPU sleeping in `hlt` meanwhile) and `bench noop_total ...` (the
/// same, from the start of the driver's submit) and `bench mmio_read_busy
/// ...` (the register read while 8 channels stream large FILL/COPY: how
/// long a vCPU waits for the device lock, p50 and p99). Whether doorbells
/// and MSIs take the fast path is the VMM's choice (`--gpu-no-fastpath`).
pub fn run() -> Result<(), String> {
    let g = crate::gpu::get()?.ok_or("bench=exits needs the Faultline GPU")?;
    let p = &g.platform;
    // One BAR0 register read: an MMIO exit to the VMM and back.
    let mut s = alloc::vec![0u64; READS];
    for slot in s.iter_mut() {
        let t0 = time::rdtsc();
        let v = p.read32(regs::MAGIC);
        *slot = time::rdtsc() - t0;
        if v != DEVICE_MAGIC {
            return Err(alloc::format!("MAGIC read {v:#x}"));
        }
    }
    let (median, min) = summarize(&mut s);
    println!("bench mmio_read samples={READS} median_ns={median} min_ns={min}");

    let p = Arc::new(Stamped(g.platform.clone()));
    let cfg = GpuConfig {
        timeout_ns: 2_000_000_000,
        ..GpuConfig::default()
    };
    fn e(what: &'static str) -> impl Fn(faultline_driver::gpu::GpuError) -> String {
        move |err| format!("{what}: {err}")
    }
    let d = faultline_driver::gpu::Gpu::probe(p.clone(), cfg).map_err(e("probe"))?;
    let buf = p.dma_alloc(1).ok_or("dma_alloc failed")?;
    let mut pt = PageTable::new(p.clone()).map_err(e("page table"))?;
    pt.map(buf.phys(), buf.phys(), PageSize::Size4K, Pte::WRITE)
        .map_err(e("map"))?;
    let ctx = Context::new(&d, pt).map_err(e("context"))?;
    let chan = Channel::open(&ctx).map_err(e("channel"))?;
    // A zero-length FILL completes at once: what is left is the doorbell,
    // the device thread's wake-up, and the MSI.
    let noop = Command::Fill {
        dst: buf.phys(),
        len: 0,
        pattern: 0,
    };
    let mut s = alloc::vec![0u64; NOOPS];
    let mut sub = alloc::vec![0u64; NOOPS];
    for i in 0..NOOPS + 10 {
        p.take_interrupts();
        let before = crate::arch::irq::count(vector::CHANNEL);
        let deadline = time::Deadline::after_ms(2000);
        let t0 = time::rdtsc();
        let ticket = chan.submit(&noop).map_err(e("submit"))?;
        while crate::arch::irq::count(vector::CHANNEL) == before {
            if deadline.expired() {
                return Err("no completion MSI within 2 s".into());
            }
            p.wait_interrupt(1_000_000);
        }
        let irq_at = crate::arch::irq::last_tsc(vector::CHANNEL);
        let t = irq_at.wrapping_sub(last_doorbell_tsc());
        let total = irq_at.wrapping_sub(t0);
        chan.wait(ticket).map_err(e("no-op FILL"))?;
        // The first few warm up caches and the host threads.
        if i >= 10 {
            s[i - 10] = t;
            sub[i - 10] = total;
        }
    }
    let (median, min) = summarize(&mut s);
    println!("bench doorbell_irq samples={NOOPS} median_ns={median} min_ns={min}");
    let (median, min) = summarize(&mut sub);
    println!("bench noop_total samples={NOOPS} median_ns={median} min_ns={min}");
    drop(chan);
    drop(ctx);
    p.dma_free(buf);
    busy_reads(&d, &p)
}

/// `bench mmio_read_busy`: BAR0 reads while every channel streams.
fn busy_reads<P: Platform>(
    d: &Arc<faultline_driver::gpu::Gpu<P>>,
    p: &Arc<P>,
) -> Result<(), String> {
    fn e(what: &'static str) -> impl Fn(faultline_driver::gpu::GpuError) -> String {
        move |err| format!("{what}: {err}")
    }
    let frames = [frames::alloc_2m(), frames::alloc_2m()];
    let [Some(src), Some(dst)] = frames else {
        for f in frames.into_iter().flatten() {
            frames::free_2m(f);
        }
        return Err("no 2 MiB frames for the streams".into());
    };
    let result = (|| {
        const SRC_VA: u64 = 1 << 40;
        const DST_VA: u64 = 2 << 40;
        let mut pt = PageTable::new(p.clone()).map_err(e("page table"))?;
        for i in 0..STREAM_LEN / (2 << 20) {
            let off = i * (2 << 20);
            pt.map(SRC_VA + off, src.as_u64(), PageSize::Size2M, Pte::empty())
                .map_err(e("map"))?;
            pt.map(DST_VA + off, dst.as_u64(), PageSize::Size2M, Pte::WRITE)
                .map_err(e("map"))?;
        }
        let ctx = Context::new(d, pt).map_err(e("context"))?;
        let chans = (0..STREAM_CHANNELS)
            .map(|_| Channel::open(&ctx))
            .collect::<Result<alloc::vec::Vec<_>, _>>()
            .map_err(e("channel"))?;
        let done = |p: &P| -> u64 {
            [Opcode::Fill, Opcode::Copy]
                .iter()
                .map(|op| u64::from(p.read32(regs::counter(Counter::command_slot(*op)))))
                .sum()
        };
        let copied = |p: &P| -> u64 {
            let at = regs::counter(Counter::BytesCopied as u32);
            u64::from(p.read32(at)) | u64::from(p.read32(at + 4)) << 32
        };
        let done0 = done(p);
        for (i, c) in chans.iter().enumerate() {
            let cmd = if i % 2 == 0 {
                Command::Fill {
                    dst: DST_VA,
                    len: STREAM_LEN,
                    pattern: 0x5a5a,
                }
            } else {
                Command::Copy {
                    dst: DST_VA,
                    src: SRC_VA,
                    len: STREAM_LEN,
                }
            };
            for _ in 0..STREAM_DEPTH {
                // Never waited for: stopping the channel drops it.
                let _streaming = c.submit(&cmd).map_err(e("submit"))?;
            }
        }
        let copied0 = copied(p);
        let mut s = alloc::vec![0u64; BUSY_READS];
        for slot in s.iter_mut() {
            let t0 = time::rdtsc();
            let v = p.read32(regs::MAGIC);
            *slot = time::rdtsc() - t0;
            if v != DEVICE_MAGIC {
                return Err(alloc::format!("MAGIC read {v:#x}"));
            }
        }
        // The figure means something only if the streams outlasted it.
        let copied_mib = (copied(p) - copied0) >> 20;
        let finished = done(p) - done0;
        let queued = (STREAM_CHANNELS * STREAM_DEPTH) as u64;
        if finished >= queued {
            return Err(alloc::format!(
                "all {queued} streaming commands ended before the reads did: raise STREAM_LEN"
            ));
        }
        s.sort_unstable();
        println!(
            "bench mmio_read_busy samples={BUSY_READS} channels={STREAM_CHANNELS} \
             median_ns={} p99_ns={} max_ns={} streams_done={finished}/{queued} \
             copied_mib={copied_mib}",
            percentile(&s, 50),
            percentile(&s, 99),
            time::ticks_to_ns(s[s.len() - 1]),
        );
        // Stopping the channels drops what is still queued.
        drop(chans);
        drop(ctx);
        Ok(())
    })();
    frames::free_2m(src);
    frames::free_2m(dst);
    result
}
