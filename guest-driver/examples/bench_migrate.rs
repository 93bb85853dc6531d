//! Host loopback half of `scripts/bench.sh migrate`, `REPS` times each:
//!
//! * the copy engine through the driver: one `MigrateList` batch of
//!   32 × 2 MiB pages system → VRAM and back
//!   (`bench migrate host=loopback-engine bytes=N to_device_ns=N to_system_ns=N memcpy_ns=N`);
//! * the migration workload (`faultline_driver::gpu::suite::migration`:
//!   `migrate_vma` of a process range) over ¼ … 128 × 2 MiB (the sizes of
//!   hmm-tests' `benchmark_thp_migration`), each on a fresh device and
//!   driver, with 4 KiB pages and, from 2 MiB up, with 2 MiB pages (a HUGE
//!   VMA, hmm-tests' THP buffer), the two interleaved rep by rep, each
//!   timed on its second run on its device (the first warms the host
//!   memory behind VRAM and the process)
//!   (`bench migrate host=loopback bytes=N pages=4k|2m cpu_fill_ns=N to_device_ns=N to_system_ns=N memcpy_ns=N`).
//!
//! * the first-touch policy's cost per fault window: one GPU FILL over
//!   256 fresh (or CPU-written) 64 KiB windows of a context with device
//!   memory attached, under `migrate=none` and `migrate=first_touch` side
//!   by side, each on a fresh device and driver
//!   (`bench migrate host=loopback-first-touch bytes=N pages=fresh|written none_ns=N first_touch_ns=N`).
//!
//! memcpy_ns is one host memcpy of the same bytes between two buffers,
//! timed in the same run.
//!
//! `BENCH_ROWS=a,b` runs only the rows whose name contains one of the
//! words: `engine`, `migrate_vma`, `first_touch`.
//!
//! Run: `cargo run --release -p faultline-driver --example bench_migrate -- [REPS]`

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use common::env::LoopEnv;
use common::loopback::Loopback;
use faultline_abi::{Command, PhysPage, PAGE_SIZE};
use faultline_driver::gpu::suite::{migration, Pattern, Prot, SvmEnv};
use faultline_driver::gpu::{
    Channel, Context, DeviceMemory, Gpu, GpuConfig, MigrateList, MigratePolicy, PageSize,
    PageTable, Platform, SvmConfig, SvmContext, VramAllocator,
};

const THP: u64 = 2 << 20;
/// The fault-around window the first-touch row counts in.
const WINDOW: u64 = 64 << 10;
/// Windows of the first-touch row's FILL.
const WINDOWS: u64 = 256;

/// Whether `BENCH_ROWS` (unset: every row) selects the row `name`.
fn wanted(name: &str) -> bool {
    std::env::var("BENCH_ROWS").map_or(true, |w| {
        w.split(',').any(|w| !w.is_empty() && name.contains(w))
    })
}

/// One GPU FILL over `WINDOWS` fresh windows (CPU-written first if
/// `written`) of a context under `policy` with all of VRAM attached: its
/// ns, the pages checked by the CPU afterwards and the placement by the
/// device memory's counters.
fn first_touch_fill(policy: MigratePolicy, written: bool) -> u64 {
    let bytes = WINDOWS * WINDOW;
    let env = LoopEnv::with_inject((bytes >> 20) + 48, GpuConfig::default(), None);
    let p = env.spawn().expect("spawn");
    let va = env.mmap(&p, 0, bytes, Prot::RW, false).expect("mmap");
    if written {
        env.fill_pattern(&p, va, bytes, Pattern::page_index(1))
            .expect("CPU fill");
    }
    let cfg = SvmConfig {
        migrate: Some(policy),
        ..SvmConfig::default()
    };
    let svm = SvmContext::new(env.gpu(), &p, cfg).expect("svm");
    let chan = Channel::open(svm.context()).expect("channel");
    let dmem = DeviceMemory::new(env.gpu()).expect("device memory");
    dmem.attach(&svm).expect("attach");
    let pattern = 0x7e57_0000_0000_0001;
    let t = Instant::now();
    chan.run(&Command::Fill {
        dst: va,
        len: bytes,
        pattern,
    })
    .expect("GPU fill");
    let ns = t.elapsed().as_nanos() as u64;
    let moved = match policy {
        MigratePolicy::None => 0,
        MigratePolicy::FirstTouch => bytes / PAGE_SIZE,
    };
    assert_eq!(dmem.stats().by_fault, moved, "pages migrated by fault");
    let bad = env.check_pattern(&p, va, bytes, Pattern::constant(pattern));
    assert_eq!(bad, Ok(None), "the GPU's data");
    env.exit(p);
    drop((chan, svm));
    dmem.teardown().expect("VRAM leak");
    ns
}

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
        if !wanted("engine") {
            break;
        }
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
    for bytes in sizes.filter(|_| wanted("migrate_vma")) {
        for _ in 0..reps {
            // A HUGE VMA is whole 2 MiB pages: none below 2 MiB.
            for (huge, pages) in [(false, "4k"), (true, "2m")] {
                if huge && bytes < THP {
                    continue;
                }
                // The process memory, its page tables, the driver's rings.
                let env = LoopEnv::with_inject((bytes >> 20) + 48, GpuConfig::default(), None);
                // A fresh device's VRAM and the process memory are host
                // memory no one has touched: the first run's host page
                // faults cost several times the migration itself (64 MiB
                // to VRAM: 76 ms cold, 13 ms warm), so one run, the same
                // workload, warms them untimed, as the engine rows warm
                // VRAM.
                let timed = migration::run(&env, bytes, huge)
                    .and_then(|_| migration::run(&env, bytes, huge));
                match timed {
                    Ok(o) => println!(
                        "bench migrate host=loopback bytes={bytes} pages={pages} cpu_fill_ns={} to_device_ns={} to_system_ns={} memcpy_ns={}",
                        o.cpu_fill_ns,
                        o.to_device_ns,
                        o.to_system_ns,
                        memcpy_ns(bytes as usize)
                    ),
                    Err(e) => {
                        eprintln!("bench_migrate: {bytes} bytes, {pages} pages: {e}");
                        std::process::exit(1);
                    }
                }
            }
        }
    }
    for (written, pages) in [(false, "fresh"), (true, "written")] {
        for _ in 0..reps {
            if !wanted("first_touch") {
                break;
            }
            let none = first_touch_fill(MigratePolicy::None, written);
            let first = first_touch_fill(MigratePolicy::FirstTouch, written);
            println!(
                "bench migrate host=loopback-first-touch bytes={} pages={pages} none_ns={none} first_touch_ns={first}",
                WINDOWS * WINDOW
            );
        }
    }
}
