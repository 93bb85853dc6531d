//! Throughput of `range_snapshot` and `range_fault` on an already-populated
//! 1 GiB range of the simulated address space, with 4 KiB and 2 MiB CPU
//! pages. Prints a markdown table (median of `BENCH_REPS` runs, default 7).
//!
//! `range_fault` here requests VALID|WRITE on pages that are already mapped
//! writable, so it measures the walk-and-encode path a GPU fault takes when
//! the CPU side is warm (no `handle_mm_fault`); the bench asserts that.
//!
//! Run: `cargo run --release -p faultline-driver --features sim --example bench_hmm`

use std::sync::Arc;
use std::time::{Duration, Instant};

use faultline_driver::errno::Errno;
use faultline_driver::hmm::{
    mirror_register, range_fault, range_register, range_snapshot, HmmMirrorOps, HmmRange, HmmUpdate,
};
use faultline_driver::mm::{mmap_read_lock, mmap_write_lock, VmFlags, PAGE_SHIFT, PMD_SHIFT};
use faultline_driver::sim::SimMm;

const GIB: u64 = 1 << 30;
const V: u64 = 1;
const W: u64 = 2;

struct NoDevice;
impl HmmMirrorOps<SimMm> for NoDevice {
    fn sync_cpu_device_pagetables(&self, _update: &HmmUpdate) -> Result<(), Errno> {
        Ok(())
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let reps: usize = std::env::var("BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7)
        .max(1);
    let mm = SimMm::new();
    let mirror = mirror_register(&mm, &mmap_write_lock(&*mm), Arc::new(NoDevice)).unwrap();

    let base_4k = 1u64 << 32;
    let base_2m = 1u64 << 34;
    let rw = VmFlags::READ | VmFlags::WRITE;
    mm.mmap(base_4k, GIB, rw).unwrap();
    mm.mmap(base_2m, GIB, rw | VmFlags::HUGE).unwrap();
    let t = Instant::now();
    mm.populate(base_4k, GIB, true).unwrap();
    mm.populate(base_2m, GIB, true).unwrap();
    eprintln!(
        "populated 2 x 1 GiB ({} CPU faults) in {:.2?}",
        mm.fault_count(),
        t.elapsed()
    );

    println!(
        "| op | CPU pages | range page_shift | entries | median | entries/s | 4 KiB pages/s |"
    );
    println!("|---|---|---|---:|---:|---:|---:|");
    let configs = [
        ("4 KiB", base_4k, PAGE_SHIFT),
        ("2 MiB", base_2m, PAGE_SHIFT),
        ("2 MiB", base_2m, PMD_SHIFT),
    ];
    let mut medians = Vec::new();
    for op in ["range_snapshot", "range_fault"] {
        for &(cpu, base, shift) in &configs {
            let mut range = HmmRange::new([V, W, 1 << 2], [1 << 3, 0, 1 << 4], 8);
            range_register(&mut range, &mirror, base, base + GIB, shift).unwrap();
            let faults_before = mm.fault_count();
            let mut times = Vec::with_capacity(reps);
            for _ in 0..reps {
                range.default_flags = V | W;
                range.pfn_flags_mask = 0;
                let mmap = mmap_read_lock(&*mm);
                let t = Instant::now();
                let n = if op == "range_snapshot" {
                    range_snapshot(&mut range, &mmap)
                } else {
                    range_fault(&mut range, &mmap, true)
                }
                .unwrap();
                times.push(t.elapsed());
                assert_eq!(n, range.npages());
            }
            assert_eq!(mm.fault_count(), faults_before, "the range was populated");
            assert!(range.pfns.iter().all(|&e| e & (V | W) == V | W));
            let entries = range.npages() as f64;
            let med = median(times);
            let secs = med.as_secs_f64();
            medians.push(secs);
            println!(
                "| {op} | {cpu} | {shift} | {} | {:.3} ms | {:.3e} | {:.3e} |",
                range.npages(),
                secs * 1e3,
                entries / secs,
                (GIB >> PAGE_SHIFT) as f64 / secs,
            );
        }
    }
    // Ratios of medians measured side by side in this run.
    let (snap, fault) = (&medians[..3], &medians[3..]);
    println!();
    println!(
        "range_fault / range_snapshot time: {:.2} (4 KiB), {:.2} (2 MiB, 4 KiB entries), {:.2} (2 MiB entries). \
         4 KiB / 2 MiB CPU pages, 4 KiB entries: {:.1}x (snapshot), {:.1}x (fault).",
        fault[0] / snap[0],
        fault[1] / snap[1],
        fault[2] / snap[2],
        snap[0] / snap[1],
        fault[0] / fault[1],
    );
}
