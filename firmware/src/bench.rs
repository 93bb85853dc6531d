//! In-guest benchmarks selected by `bench=` on the command line. Output is
//! one `bench <name> key=value ...` line per result for scripts to parse
//! (`scripts/bench-exits.sh`), then the exit port says success or failure.

use faultline_abi::{regs, DEVICE_MAGIC};
use faultline_driver::gpu::Platform;

use crate::arch::exit::{exit, ExitCode};
use crate::arch::time;
use crate::cmdline::Bench;
use crate::println;

pub fn run(b: Bench) -> ! {
    let result = match b {
        Bench::Exits => exits(),
    };
    match result {
        Ok(()) => exit(ExitCode::Success),
        Err(e) => {
            println!("bench: FAILED: {e}");
            exit(ExitCode::TestsFailed)
        }
    }
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

fn exits() -> Result<(), alloc::string::String> {
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
    Ok(())
}
