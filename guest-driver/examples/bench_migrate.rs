//! Host loopback half of `scripts/bench.sh migrate`, `REPS` times each:
//!
//! * the copy engine through the driver: one `MigrateList` batch of
//!   32 × 2 MiB pages system → VRAM and back
//!   (`bench migrate host=loopback-engine bytes=N to_device_ns=N to_system_ns=N memcpy_ns=N`);
//! * the migration workload (`faultline_driver::gpu::suite::migration`:
//!   `migrate_vma` of a process range, 4 KiB pages) over ¼ … 128 × 2 MiB
//!   (the sizes of hmm-tests' `benchmark_thp_migration`), each on a fresh
//!   device and driver
//!   (`bench migrate host=loopback bytes=N cpu_fill_ns=N to_device_ns=N to_system_ns=N memcpy_ns=N`).
//!
//! memcpy_ns is one host memcpy of the same bytes between two buffers,
//! timed in the same run.
//!
//! Run: `cargo run --release -p faultline-driver --example bench_migrate -- [REPS]`

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use common::env::LoopEnv;
use common::loopback::Loopback;
use faultline_abi::{PhysPage, PAGE_SIZE};
use faultline_driver::gpu::suite::migration;
use faultline_driver::gpu::{
    Channel, Context, Gpu, GpuConfig, MigrateList, PageSize, PageTable, Platform, VramAllocator,
};

const THP: u64 = 2 << 20;

fn memcpy_ns(bytes: usize) -> u64 {
    let src = vec![0x5au8; bytes];
    let mut dst = vec![0u8; bytes];
    // Touched once first, as the process memory and VRAM are.
    dst.copy_from_slice(&src);
    let t = Instant::now();
    dst.copy_from_slice(std::hint::black_box(&src));
    let ns = t.elapsed().as_nanos() as u64;
    std::hint::black_box(&dst);
    ns
}

/// One MIGRATE batch of `n` 2 MiB pages each way: (to VRAM, to system) ns,
/// the data checked after the round trip.
fn engine_round_trip(n: usize) -> (u64, u64) {
    let bytes = n as u64 * THP;
    let cfg = faultline_device::Config {
        vram: bytes,
        ..faultline_device::Config::default()
    };
    let lb = Loopback::with_config(((2 * bytes) >> 20) + 16, cfg);
    let gpu = Gpu::probe(lb.clone(), GpuConfig::default()).expect("probe");
    let ctx = Context::new(&gpu, PageTable::new(lb.clone()).expect("page table")).expect("context");
    let chan = Channel::open(&ctx).expect("channel");
    let vram = VramAllocator::new(gpu.vram_size());
    let mut list = MigrateList::new(lb.clone()).expect("list");
    let pages = (bytes / PAGE_SIZE) as usize;
    let (src, dst) = (
        lb.dma_alloc(pages).expect("dma"),
        lb.dma_alloc(pages).expect("dma"),
    );
    let data: Vec<u8> = (0..bytes as usize)
        .map(|i| (i * 7 + i / 4096) as u8)
        .collect();
    lb.write_phys(src.phys(), &data);
    let dev: Vec<u64> = (0..n).map(|_| vram.alloc_chunk().expect("VRAM")).collect();
    let to_dev: Vec<_> = (0..n)
        .map(|i| {
            (
                PhysPage::system(src.phys() + i as u64 * THP),
                PhysPage::vram(dev[i]),
            )
        })
        .collect();
    let to_sys: Vec<_> = (0..n)
        .map(|i| {
            (
                PhysPage::vram(dev[i]),
                PhysPage::system(dst.phys() + i as u64 * THP),
            )
        })
        .collect();
    // VRAM touched once before, as the device rows do.
    list.run(&chan, &to_dev, PageSize::Size2M).expect("warm-up");
    let t = Instant::now();
    assert_eq!(list.run(&chan, &to_dev, PageSize::Size2M), Ok(n as u64));
    let a = t.elapsed().as_nanos() as u64;
    let t = Instant::now();
    assert_eq!(list.run(&chan, &to_sys, PageSize::Size2M), Ok(n as u64));
    let b = t.elapsed().as_nanos() as u64;
    let mut got = vec![0u8; data.len()];
    lb.read_phys(dst.phys(), &mut got);
    assert!(got == data, "the round trip changed the data");
    for d in dev {
        vram.free_chunk(d).expect("free");
    }
    lb.dma_free(src);
    lb.dma_free(dst);
    (a, b)
}

fn main() {
    let reps: u32 = match std::env::args().nth(1).map(|r| r.parse()) {
        None => 3,
        Some(Ok(r)) if r > 0 => r,
        Some(_) => {
            eprintln!("usage: bench_migrate [REPS]");
            std::process::exit(2);
        }
    };
    for _ in 0..reps {
        let n = 32;
        let (a, b) = engine_round_trip(n);
        let bytes = n as u64 * THP;
        println!(
            "bench migrate host=loopback-engine bytes={bytes} to_device_ns={a} to_system_ns={b} memcpy_ns={}",
            memcpy_ns(bytes as usize)
        );
    }
    // ¼, ½, 1, 2 … 128 × 2 MiB.
    let sizes = [THP / 4, THP / 2]
        .into_iter()
        .chain((0..8).map(|k| THP << k));
    for bytes in sizes {
        for _ in 0..reps {
            // The process memory, its page tables, the driver's rings.
            let env = LoopEnv::with_inject((bytes >> 20) + 48, GpuConfig::default(), None);
            match migration::run(&env, bytes) {
                Ok(o) => println!(
                    "bench migrate host=loopback bytes={bytes} cpu_fill_ns={} to_device_ns={} to_system_ns={} memcpy_ns={}",
                    o.cpu_fill_ns,
                    o.to_device_ns,
                    o.to_system_ns,
                    memcpy_ns(bytes as usize)
                ),
                Err(e) => {
                    eprintln!("bench_migrate: {bytes} bytes: {e}");
                    std::process::exit(1);
                }
            }
        }
    }
}
