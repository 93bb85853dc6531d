//! `bench=exits`: VM-exit costs of the GPU paths (`scripts/bench.sh exits`).

use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;

use faultline_abi::{regs, vector, Pte, DEVICE_MAGIC};
use faultline_driver::gpu::{Channel, Command, Context, GpuConfig, PageSize, PageTable, Platform};

use super::{last_doorbell_tsc, Stamped};
use crate::arch::time;
use crate::println;

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

/// Prints `bench mmio_read ...` (one BAR0 register read, i.e. an MMIO exit
/// round trip), `bench doorbell_irq ...` (TSC just before the doorbell
/// write of a no-op command to TSC in the completion MSI's interrupt stub,
/// the CPU sleeping in `hlt` meanwhile) and `bench noop_total ...` (the
/// same, from the start of the driver's submit). Whether doorbells and
/// MSIs take the fast path is the VMM's choice (`--gpu-no-fastpath`).
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
    Ok(())
}
