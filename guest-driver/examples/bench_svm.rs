//! Host loopback benchmark of the SVM fault path (the real driver, the real
//! device model on its worker thread, simulated processes). Prints a
//! markdown table; medians of `BENCH_REPS` runs (default 5).
//!
//! * single-fault round trip: an 8-byte FILL on a page the device has not
//!   mapped (CPU-populated, fault-around 4 KiB) → fault → HMM → replay →
//!   done, against a null baseline where the handler writes the leaf
//!   directly (device fault, interrupt and replay only);
//! * sequential first touch of 64 MiB the CPU never touched, fault-around
//!   4 KiB / 64 KiB / 2 MiB (pages/s);
//! * munmap of one device-mapped page until the device acknowledged the
//!   TLB invalidation (the whole munmap call);
//! * the host's wake-up floor: two threads handing a token back and forth
//!   through a `Mutex` + `Condvar` (futex-based, the primitives the
//!   loopback's MSI delivery uses), per round trip. A single fault costs at
//!   least two such round trips: doorbell → worker → FAULT MSI → driver,
//!   REPLAY doorbell → worker → completion MSI → driver.
//!
//! The round trips and the floor take turns in chunks of 100, so host load
//! hits them alike; medians over all chunks, and the fastest chunk.
//!
//! Run: `cargo run --release -p faultline-driver --example bench_svm`

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use common::env::LoopEnv;
use common::loopback::Loopback;
use faultline_abi::{Pte, PAGE_SIZE};
use faultline_driver::gpu::suite::{Prot, SvmEnv};
use faultline_driver::gpu::{
    Channel, Command, Context, Fault, FaultHandler, GpuConfig, PageSize, PageTable, Platform,
    SvmConfig, SvmContext,
};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Maps the faulting page identity (VA == GPA), no HMM.
struct Direct(Arc<Context<Loopback>>);

impl FaultHandler for Direct {
    fn service(&self, faults: &[Fault], _cancel: &mut Vec<u64>) {
        let mut pt = self.0.page_table();
        for f in faults {
            pt.map(f.va, f.va, PageSize::Size4K, Pte::WRITE)
                .unwrap_or_else(|e| panic!("map: {e}"));
        }
    }
}

/// Round trips per chunk, chunks per repetition: the subjects take turns
/// chunk by chunk, so a burst of host load hits them alike and shows as a
/// few slow chunks rather than one slow subject.
const CHUNK: u64 = 100;
const CHUNKS: u64 = 20;
const ROUND_TRIPS: u64 = CHUNK * CHUNKS;

/// Something timed in chunks: `run(i)` does round trips `i * CHUNK ..
/// (i + 1) * CHUNK` and returns ns per round trip; `done` tears it down
/// once `run` is dropped.
struct Subject {
    run: Box<dyn FnMut(u64) -> f64>,
    done: Box<dyn FnOnce()>,
}

impl Subject {
    fn finish(self) {
        drop(self.run);
        (self.done)();
    }
}

fn per_round_trip(t: Instant) -> f64 {
    t.elapsed().as_nanos() as f64 / CHUNK as f64
}

/// Single faults whose handler maps the page directly (no HMM).
fn null_round_trip() -> Subject {
    let lb = Loopback::new(64);
    let gpu = faultline_driver::gpu::Gpu::probe(lb.clone(), GpuConfig::default())
        .unwrap_or_else(|e| panic!("{e}"));
    let buf = lb.dma_alloc(ROUND_TRIPS as usize).expect("dma");
    let pt = PageTable::new(lb.clone()).unwrap_or_else(|e| panic!("{e}"));
    let ctx = Arc::new(Context::new(&gpu, pt).unwrap_or_else(|e| panic!("{e}")));
    ctx.set_fault_handler(Some(Arc::new(Direct(ctx.clone()))));
    let chan = Channel::open(&ctx).unwrap_or_else(|e| panic!("{e}"));
    let base = buf.phys();
    Subject {
        run: Box::new(move |i| {
            let t = Instant::now();
            for k in i * CHUNK..(i + 1) * CHUNK {
                chan.run(&Command::Fill {
                    dst: base + k * PAGE_SIZE,
                    len: 8,
                    pattern: k,
                })
                .unwrap_or_else(|e| panic!("{e}"));
            }
            per_round_trip(t)
        }),
        done: Box::new(move || {
            ctx.set_fault_handler(None);
            lb.dma_free(buf);
            drop(gpu);
        }),
    }
}

/// Single faults through the whole HMM path on CPU-populated pages.
fn svm_round_trip() -> Subject {
    let env = LoopEnv::new(64, GpuConfig::default());
    let p = env.spawn().unwrap_or_else(|e| panic!("{e}"));
    let len = ROUND_TRIPS * PAGE_SIZE;
    let va = env.mmap(&p, 0, len, Prot::RW, false).expect("mmap");
    for i in 0..ROUND_TRIPS {
        env.write(&p, va + i * PAGE_SIZE, &[1]).expect("populate");
    }
    let svm = SvmContext::new(
        env.gpu(),
        &p,
        SvmConfig {
            fault_around: PAGE_SIZE,
            ..SvmConfig::default()
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let chan = Channel::open(svm.context()).unwrap_or_else(|e| panic!("{e}"));
    Subject {
        run: Box::new(move |i| {
            let t = Instant::now();
            for k in i * CHUNK..(i + 1) * CHUNK {
                chan.run(&Command::Fill {
                    dst: va + k * PAGE_SIZE,
                    len: 8,
                    pattern: k,
                })
                .unwrap_or_else(|e| panic!("{e}"));
            }
            per_round_trip(t)
        }),
        done: Box::new(move || {
            env.exit(p);
            drop(svm);
        }),
    }
}

/// The wake-up floor: two threads pass a counter back and forth, each
/// sleeping on the condvar until it is its turn (two wake-ups per round
/// trip).
fn wake_floor() -> Subject {
    let ball = Arc::new((Mutex::new(0u64), Condvar::new()));
    let other = {
        let ball = ball.clone();
        std::thread::spawn(move || {
            let (m, cv) = &*ball;
            let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                // Odd: our turn; u64::MAX: stop.
                while *g % 2 == 0 {
                    g = cv.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                if *g == u64::MAX {
                    return;
                }
                *g += 1;
                // Notified with the lock held, the other thread would wake
                // only to sleep on the lock: release it first.
                drop(g);
                cv.notify_one();
                g = m.lock().unwrap_or_else(|e| e.into_inner());
            }
        })
    };
    let ours = ball.clone();
    Subject {
        run: Box::new(move |_| {
            let (m, cv) = &*ours;
            let t = Instant::now();
            for _ in 0..CHUNK {
                *m.lock().unwrap_or_else(|e| e.into_inner()) += 1;
                cv.notify_one();
                let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
                while *g % 2 == 1 {
                    g = cv.wait(g).unwrap_or_else(|e| e.into_inner());
                }
            }
            per_round_trip(t)
        }),
        done: Box::new(move || {
            let (m, cv) = &*ball;
            *m.lock().unwrap_or_else(|e| e.into_inner()) = u64::MAX;
            cv.notify_one();
            other.join().expect("ping-pong thread");
        }),
    }
}

fn first_touch(around: u64) -> f64 {
    let env = LoopEnv::new(160, GpuConfig::default());
    let p = env.spawn().unwrap_or_else(|e| panic!("{e}"));
    let len = 64 << 20;
    let va = env.mmap(&p, 0, len, Prot::RW, false).expect("mmap");
    let svm = SvmContext::new(
        env.gpu(),
        &p,
        SvmConfig {
            fault_around: around,
            ..SvmConfig::default()
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let chan = Channel::open(svm.context()).unwrap_or_else(|e| panic!("{e}"));
    let t = Instant::now();
    chan.run(&Command::Fill {
        dst: va,
        len,
        pattern: 7,
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let pages_per_s = (len / PAGE_SIZE) as f64 / t.elapsed().as_secs_f64();
    drop(chan);
    env.exit(p);
    pages_per_s
}

fn munmap_to_ack() -> f64 {
    let env = LoopEnv::new(64, GpuConfig::default());
    let p = env.spawn().unwrap_or_else(|e| panic!("{e}"));
    let svm =
        SvmContext::new(env.gpu(), &p, SvmConfig::default()).unwrap_or_else(|e| panic!("{e}"));
    let chan = Channel::open(svm.context()).unwrap_or_else(|e| panic!("{e}"));
    let mut samples = Vec::new();
    for _ in 0..500 {
        let va = env.mmap(&p, 0, PAGE_SIZE, Prot::RW, false).expect("mmap");
        chan.run(&Command::Fill {
            dst: va,
            len: 8,
            pattern: 1,
        })
        .unwrap_or_else(|e| panic!("{e}"));
        let t = Instant::now();
        env.munmap(&p, va, PAGE_SIZE).expect("munmap");
        samples.push(t.elapsed().as_nanos() as f64);
        assert!(svm.device_lookup(va).is_none());
    }
    drop(chan);
    env.exit(p);
    median(samples)
}

fn main() {
    let reps: usize = std::env::var("BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    // Per chunk, per subject: [null, svm, floor]; and each repetition's
    // medians.
    let mut chunks: [Vec<f64>; 3] = Default::default();
    let mut runs: [Vec<f64>; 3] = Default::default();
    for _ in 0..reps {
        let mut subjects = [null_round_trip(), svm_round_trip(), wake_floor()];
        let mut this: [Vec<f64>; 3] = Default::default();
        for i in 0..CHUNKS {
            for (s, out) in subjects.iter_mut().zip(this.iter_mut()) {
                out.push((s.run)(i));
            }
        }
        for s in subjects {
            s.finish();
        }
        for k in 0..3 {
            runs[k].push(median(this[k].clone()));
            chunks[k].extend_from_slice(&this[k]);
        }
    }
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let each = |v: &[f64]| {
        v.iter()
            .map(|ns| format!("{:.1}", ns / 1e3))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let [null, svm, floor] = chunks.clone().map(median);
    let [null_min, svm_min, floor_min] = [&chunks[0], &chunks[1], &chunks[2]].map(|v| min(v));
    println!("| host loopback (device model on a worker thread) | median | fastest chunk | per-run medians |");
    println!("|---|---|---|---|");
    for (name, k) in [
        ("single-fault round trip, SVM (HMM, 4 KiB window)", 1),
        ("single-fault round trip, null handler", 0),
        (
            "wake-up floor: two-thread Mutex + Condvar ping-pong, per round trip",
            2,
        ),
    ] {
        println!(
            "| {name} | {:.1} µs | {:.1} µs | {} |",
            median(chunks[k].clone()) / 1e3,
            min(&chunks[k]) / 1e3,
            each(&runs[k])
        );
    }
    println!(
        "| ratio SVM / null | {:.2} | {:.2} | |",
        svm / null,
        svm_min / null_min
    );
    println!(
        "| **ratio SVM single fault / wake-up floor** (target ≤ 3) | **{:.2}** | {:.2} | {} |",
        svm / floor,
        svm_min / floor_min,
        runs[1]
            .iter()
            .zip(&runs[2])
            .map(|(s, f)| format!("{:.2}", s / f))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "| ratio null single fault / wake-up floor | {:.2} | {:.2} | |",
        null / floor,
        null_min / floor_min
    );
    for (name, around) in [("4 KiB", 4096u64), ("64 KiB", 64 << 10), ("2 MiB", 2 << 20)] {
        let pps = median((0..reps).map(|_| first_touch(around)).collect());
        println!(
            "| first touch 64 MiB, fault-around {name} | {:.0} pages/s | | |",
            pps
        );
    }
    let ack = median((0..reps).map(|_| munmap_to_ack()).collect());
    println!(
        "| munmap of a device-mapped page → TLB ack | {:.1} µs | | |",
        ack / 1e3
    );
}
