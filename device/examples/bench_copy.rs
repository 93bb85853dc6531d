//! COPY through the device MMU (warm TLB) against a plain host memcpy of the
//! same bytes, for 4 KiB and 2 MiB mappings; MIGRATE between system memory
//! and VRAM against the same memcpy; then the coherence checker's cost
//! (`--gpu-check`): COPY and a device-only single fault with the checker on
//! against off, side by side. Prints markdown tables.
//!
//! Usage: bench_copy [reps]
//!
//! `BENCH_ROWS=a,b` runs only the rows whose name contains one of the
//! words (for iterating on one path); names: `copy-4k-shuffled-4m`
//! (`copy-{4k,2m}-{contiguous,shuffled}-{4m,64m}`), `migrate`, `check`,
//! `trace`. Tables whose rows were all left out are not printed.

use std::time::Instant;

use faultline_abi::{doorbell, MigrateEntry, PhysPage, Pte, Status, LEAF_2M, LEAF_4K};
use faultline_device::check::CheckMode;
use faultline_device::mmu::TLB_CAPACITY;
use faultline_device::testing::{cmd, CpuPageTable, Rig};
use faultline_device::vram::{Phys, PhysMem};
use faultline_device::Config;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const SRC_GPA: u64 = 64 << 20;
const DST_GPA: u64 = 192 << 20;
const SRC_VA: u64 = 0x10_0000_0000;
const DST_VA: u64 = 0x20_0000_0000;

/// The checker benches' CPU page tables and fault frames.
const CPU_PT: u64 = 16 << 20;
const CPU_PT_END: u64 = 32 << 20;
const FAULT_GPA: u64 = 32 << 20;
const FAULT_PAGES: u64 = 8192;
const FAULT_VA: u64 = 0x30_0000_0000;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct Row {
    page: &'static str,
    scattered: bool,
    size: u64,
    warm: bool,
    dev_gibs: f64,
    host_gibs: f64,
    /// Host memcpy page by page into the same frames (the memory-access
    /// pattern of the device copy, without translation).
    host_paged_gibs: f64,
}

/// `scattered`: destination pages map to frames in a shuffled order, so no
/// two neighbouring pages coalesce into one host copy.
fn bench(page: u64, size: u64, scattered: bool, reps: usize) -> Row {
    let mut rig = Rig::new(320 << 20, 64);
    assert!(rig.enable_channel(0, 0));
    rig.map_range(0, SRC_VA, SRC_GPA, size, page, Pte::empty());
    let n = size / page;
    let frame = |i: u64| if scattered { (i * 7919 + 13) % n } else { i };
    for i in 0..n {
        rig.map(
            0,
            DST_VA + i * page,
            DST_GPA + frame(i) * page,
            page,
            Pte::WRITE,
        );
    }
    let pattern: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
    rig.write_bytes(SRC_GPA, &pattern);
    rig.write_bytes(DST_GPA, &vec![0u8; size as usize]);

    let copy = |rig: &mut Rig| {
        let t = rig.submit(0, cmd::copy(DST_VA, SRC_VA, size));
        rig.dev.doorbell(doorbell::channel(0));
        rig.dev.run_until_idle();
        assert_eq!(rig.status(t), Status::Ok);
    };
    // Warm the TLB (and the caches) once.
    copy(&mut rig);
    for i in [0, n / 2, n - 1] {
        let got = rig.read_bytes(DST_GPA + frame(i) * page, page as usize);
        let want = &pattern[(i * page) as usize..((i + 1) * page) as usize];
        assert!(got == want, "COPY result, page {i}");
    }

    let gib = size as f64 / (1u64 << 30) as f64;
    let mut dev = Vec::new();
    let mut host = Vec::new();
    let mut paged = Vec::new();
    for _ in 0..reps {
        // Interleave the two so both see the same machine state.
        let t0 = Instant::now();
        copy(&mut rig);
        dev.push(gib / t0.elapsed().as_secs_f64());

        let mem = rig.mem();
        let s = mem.get_slice(GuestAddress(SRC_GPA), size as usize).unwrap();
        let d = mem.get_slice(GuestAddress(DST_GPA), size as usize).unwrap();
        let t0 = Instant::now();
        s.copy_to_volatile_slice(d);
        host.push(gib / t0.elapsed().as_secs_f64());

        let t0 = Instant::now();
        for i in 0..n {
            let s = mem
                .get_slice(GuestAddress(SRC_GPA + i * page), page as usize)
                .unwrap();
            let d = mem
                .get_slice(GuestAddress(DST_GPA + frame(i) * page), page as usize)
                .unwrap();
            s.copy_to_volatile_slice(d);
        }
        paged.push(gib / t0.elapsed().as_secs_f64());
    }
    if std::env::var_os("BENCH_COUNTERS").is_some() {
        eprintln!("{:?}", rig.dev.counters().named());
    }
    let pages_needed = 2 * size / page;
    Row {
        page: if page == LEAF_4K { "4 KiB" } else { "2 MiB" },
        scattered,
        size,
        warm: pages_needed <= TLB_CAPACITY as u64,
        dev_gibs: median(dev),
        host_gibs: median(host),
        host_paged_gibs: median(paged),
    }
}

/// Where MIGRATE's page lists live.
const LIST_GPA: u64 = 48 << 20;

/// MIGRATE of `size` bytes in pages of `page` (one command, at most 512
/// pages), system → VRAM and VRAM → system, each against one host memcpy
/// of the same bytes between the same buffers, interleaved: GiB/s of
/// [(MIGRATE, memcpy) to VRAM, (MIGRATE, memcpy) to system].
fn bench_migrate(page: u64, size: u64, reps: usize) -> [(f64, f64); 2] {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 320 << 20)]).unwrap();
    let cfg = Config {
        vram: size,
        ..Config::default()
    };
    let mut rig = Rig::with_config(mem, 64, cfg);
    assert!(rig.enable_channel(0, 0));
    let n = size / page;
    let list = |rig: &Rig, at: u64, to_vram: bool| {
        for i in 0..n {
            let (sys, vram) = (
                PhysPage::system(SRC_GPA + i * page),
                PhysPage::vram(i * page),
            );
            let e = match to_vram {
                true => MigrateEntry::new(sys, vram),
                false => MigrateEntry::new(vram, PhysPage::system(DST_GPA + i * page)),
            };
            rig.write_bytes(at + i * 16, &e.to_le_bytes());
        }
    };
    let (to_vram, to_sys) = (LIST_GPA, LIST_GPA + n * 16);
    list(&rig, to_vram, true);
    list(&rig, to_sys, false);
    let pattern: Vec<u8> = (0..size).map(|i| (i * 29 % 251) as u8).collect();
    rig.write_bytes(SRC_GPA, &pattern);
    let migrate = |rig: &mut Rig, at: u64| {
        let t = rig.submit(0, cmd::migrate(at, n as u32, page == LEAF_2M));
        rig.dev.doorbell(doorbell::channel(0));
        rig.dev.run_until_idle();
        assert_eq!(rig.status(t), Status::Ok);
    };
    // Touch every VRAM page once (the mapping commits on first write).
    migrate(&mut rig, to_vram);
    migrate(&mut rig, to_sys);
    assert!(
        rig.read_bytes(DST_GPA, size as usize) == pattern,
        "MIGRATE result"
    );
    let gib = size as f64 / (1u64 << 30) as f64;
    let [mut up, mut up_host, mut down, mut down_host] = [(); 4].map(|()| Vec::new());
    let vram = Phys {
        addr: 0,
        vram: true,
    };
    let (sys_src, sys_dst) = (Phys::system(SRC_GPA), Phys::system(DST_GPA));
    for _ in 0..reps {
        let t0 = Instant::now();
        migrate(&mut rig, to_vram);
        up.push(gib / t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        migrate(&mut rig, to_sys);
        down.push(gib / t0.elapsed().as_secs_f64());
        let host = PhysMem {
            mem: rig.mem(),
            vram: rig.dev.vram(),
        };
        let t0 = Instant::now();
        host.copy(vram, sys_src, size).unwrap();
        up_host.push(gib / t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        host.copy(sys_dst, vram, size).unwrap();
        down_host.push(gib / t0.elapsed().as_secs_f64());
    }
    [
        (median(up), median(up_host)),
        (median(down), median(down_host)),
    ]
}

/// COPY GiB/s with the checker off and on (warn), interleaved on one rig
/// whose CPU table maps both buffers like the device does.
fn bench_checked(page: u64, size: u64, reps: usize) -> (f64, f64) {
    let mut rig = Rig::new(320 << 20, 64);
    assert!(rig.enable_channel(0, 0));
    rig.map_range(0, SRC_VA, SRC_GPA, size, page, Pte::empty());
    rig.map_range(0, DST_VA, DST_GPA, size, page, Pte::WRITE);
    let mut pt = CpuPageTable::new(&rig, CPU_PT, CPU_PT_END);
    pt.map_range(&rig, SRC_VA, SRC_GPA, size, page, CpuPageTable::USER_RO);
    pt.map_range(&rig, DST_VA, DST_GPA, size, page, CpuPageTable::USER_RW);
    pt.attach(&rig, 0);
    let copy = |rig: &mut Rig| {
        let t = rig.submit(0, cmd::copy(DST_VA, SRC_VA, size));
        rig.dev.doorbell(doorbell::channel(0));
        rig.dev.run_until_idle();
        assert_eq!(rig.status(t), Status::Ok);
    };
    copy(&mut rig);
    let gib = size as f64 / (1u64 << 30) as f64;
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        for (mode, out) in [(CheckMode::Off, &mut off), (CheckMode::Warn, &mut on)] {
            rig.dev.set_checker(mode, None);
            let t0 = Instant::now();
            copy(&mut rig);
            out.push(gib / t0.elapsed().as_secs_f64());
        }
    }
    assert_eq!(
        rig.dev.coherence_violations(),
        0,
        "the bench's CPU table matches the device's"
    );
    assert!(rig.dev.counters().check.checked > 0, "the checker ran");
    (median(off), median(on))
}

/// One 8-byte FILL on a page the device has not mapped (the CPU has): the
/// fault, the host maps the page, REPLAY, completion; median µs with the
/// checker off and on, interleaved.
fn single_fault(reps: usize) -> (f64, f64) {
    let mut rig = Rig::new(320 << 20, 64);
    assert!(rig.enable_channel(0, 0));
    let n = (reps as u64 * 100).min(FAULT_PAGES);
    let mut pt = CpuPageTable::new(&rig, CPU_PT, CPU_PT_END);
    let len = n * LEAF_4K;
    pt.map_range(
        &rig,
        FAULT_VA,
        FAULT_GPA,
        len,
        LEAF_4K,
        CpuPageTable::USER_RW,
    );
    pt.attach(&rig, 0);
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for i in 0..n {
        let (mode, out) = if i % 2 == 0 {
            (CheckMode::Off, &mut off)
        } else {
            (CheckMode::Warn, &mut on)
        };
        rig.dev.set_checker(mode, None);
        out.push(single_fault_us(&mut rig, i));
    }
    assert_eq!(rig.dev.coherence_violations(), 0);
    (median(off), median(on))
}

/// One FILL of the unmapped page `i` of the fault area: fault, map,
/// REPLAY, completion; µs.
fn single_fault_us(rig: &mut Rig, i: u64) -> f64 {
    let va = FAULT_VA + i * LEAF_4K;
    let t0 = Instant::now();
    let t = rig.submit(0, cmd::fill(va, 8, i));
    rig.dev.doorbell(doorbell::channel(0));
    rig.dev.run_until_idle();
    assert_eq!(rig.drain_faults().len(), 1, "one fault");
    rig.map(0, va, FAULT_GPA + i * LEAF_4K, LEAF_4K, Pte::WRITE);
    rig.replay();
    assert_eq!(rig.status(t), Status::Ok);
    t0.elapsed().as_secs_f64() * 1e6
}

/// A rig with both buffers mapped in 4 KiB pages, tracing or not.
fn copy_rig(size: u64, trace: bool) -> Rig {
    let mut rig = Rig::new(320 << 20, 64);
    assert!(rig.enable_channel(0, 0));
    rig.map_range(0, SRC_VA, SRC_GPA, size, LEAF_4K, Pte::empty());
    rig.map_range(0, DST_VA, DST_GPA, size, LEAF_4K, Pte::WRITE);
    if trace {
        rig.dev
            .start_trace(faultline_device::trace::DEFAULT_CAPACITY);
    }
    rig
}

/// COPY GiB/s (4 KiB pages, warm TLB) and the single-fault round trip (µs)
/// without and with the fault timeline (`--gpu-trace`), two rigs
/// interleaved.
fn bench_traced(size: u64, reps: usize) -> [(f64, f64); 2] {
    let mut rigs = [copy_rig(size, false), copy_rig(size, true)];
    let copy = |rig: &mut Rig| {
        let t = rig.submit(0, cmd::copy(DST_VA, SRC_VA, size));
        rig.dev.doorbell(doorbell::channel(0));
        rig.dev.run_until_idle();
        assert_eq!(rig.status(t), Status::Ok);
    };
    let gib = size as f64 / (1u64 << 30) as f64;
    let mut copies = [Vec::new(), Vec::new()];
    for rig in &mut rigs {
        copy(rig);
    }
    for _ in 0..reps {
        for (rig, out) in rigs.iter_mut().zip(&mut copies) {
            let t0 = Instant::now();
            copy(rig);
            out.push(gib / t0.elapsed().as_secs_f64());
        }
    }
    let mut faults = [Vec::new(), Vec::new()];
    let n = (reps as u64 * 100).min(FAULT_PAGES);
    for i in 0..n {
        for (rig, out) in rigs.iter_mut().zip(&mut faults) {
            out.push(single_fault_us(rig, i));
        }
    }
    let traced = rigs[1].dev.trace().map_or(0, |t| t.len());
    assert!(traced > 0, "the traced rig recorded events");
    let [c0, c1] = copies;
    let [f0, f1] = faults;
    [(median(c0), median(c1)), (median(f0), median(f1))]
}

/// Whether `BENCH_ROWS` (unset: every row) selects the row `name`
/// (`scripts/bench.sh migrate` runs `BENCH_ROWS=migrate`).
fn wanted(name: &str) -> bool {
    std::env::var("BENCH_ROWS").map_or(true, |w| {
        w.split(',').any(|w| !w.is_empty() && name.contains(w))
    })
}

fn copy_row_name(page: u64, size: u64, scattered: bool) -> String {
    format!(
        "copy-{}-{}-{}m",
        if page == LEAF_4K { "4k" } else { "2m" },
        if scattered { "shuffled" } else { "contiguous" },
        size >> 20
    )
}

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(9);
    let mut rows = Vec::new();
    for size in [4u64 << 20, 64 << 20] {
        for (page, scattered) in [(LEAF_4K, false), (LEAF_2M, false), (LEAF_4K, true)] {
            if wanted(&copy_row_name(page, size, scattered)) {
                rows.push(bench(page, size, scattered, reps));
            }
        }
    }
    if !rows.is_empty() {
        copy_table(&rows, reps);
    }
    if wanted("migrate") {
        migrate_table(reps);
    }
    if wanted("check") {
        check_table(reps);
    }
    if wanted("trace") {
        trace_table(reps);
    }
}

fn copy_table(rows: &[Row], reps: usize) {
    println!("| mapping | dst frames | bytes per COPY | TLB covers buffers | COPY via MMU (GiB/s) | host memcpy (GiB/s) | ratio | host per-page memcpy, same frames (GiB/s) | ratio to per-page |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} MiB | {} | {:.2} | {:.2} | **{:.3}** | {:.2} | {:.3} |",
            r.page,
            if r.scattered {
                "shuffled"
            } else {
                "contiguous"
            },
            r.size >> 20,
            if r.warm { "yes (warm)" } else { "no (misses)" },
            r.dev_gibs,
            r.host_gibs,
            r.dev_gibs / r.host_gibs,
            r.host_paged_gibs,
            r.dev_gibs / r.host_paged_gibs
        );
    }
    println!();
    println!("median of {reps} interleaved repetitions; TLB capacity {TLB_CAPACITY} entries/context; targets: >= 0.7 (4 KiB), >= 0.9 (2 MiB) with a warm TLB");
    println!();
}

/// The MIGRATE rows (`scripts/bench.sh device`, and alone for
/// `scripts/bench.sh migrate`).
fn migrate_table(reps: usize) {
    println!("MIGRATE (docs/gpu-abi.md \"Device memory (VRAM)\"): one command of physical page copies, each direction against one host memcpy of the same bytes between the same buffers, interleaved (VRAM touched once before):");
    println!();
    println!(
        "| pages | bytes per MIGRATE | direction | MIGRATE (GiB/s) | host memcpy (GiB/s) | ratio |"
    );
    println!("|---|---|---|---|---|---|");
    for (page, size) in [
        (LEAF_2M, 64u64 << 20),
        (LEAF_2M, 4 << 20),
        (LEAF_4K, 2 << 20),
    ] {
        let dirs = bench_migrate(page, size, reps);
        for ((dev, host), dir) in dirs.into_iter().zip(["system → VRAM", "VRAM → system"]) {
            println!(
                "| {} × {} | {} MiB | {dir} | {dev:.2} | {host:.2} | **{:.3}** |",
                size / page,
                if page == LEAF_4K { "4 KiB" } else { "2 MiB" },
                size >> 20,
                dev / host
            );
        }
    }
    println!();
    println!("median of {reps} interleaved repetitions; target >= 0.8 at 2 MiB pages. The device copies at most 128 KiB a scheduling slice (`engine::XFER_SLICE`), so a 2 MiB page takes 16 slices.");
    println!();
}

fn check_table(reps: usize) {
    println!("Coherence checker (`--gpu-check`, docs/gpu-abi.md): on (warn, CPU tables consistent, so no violation) against off, same rig, interleaved:");
    println!();
    println!("| measurement | checker off | checker on | ratio on / off |");
    println!("|---|---|---|---|");
    for page in [LEAF_4K, LEAF_2M] {
        let (off, on) = bench_checked(page, 4 << 20, reps);
        println!(
            "| COPY with --gpu-check, {} pages, 4 MiB, warm TLB (GiB/s) | {off:.2} | {on:.2} | **{:.3}** |",
            if page == LEAF_4K { "4 KiB" } else { "2 MiB" },
            on / off
        );
    }
    let (off, on) = single_fault(reps);
    println!(
        "| single fault with --gpu-check, device only: FILL → fault → map → REPLAY → completion (µs) | {off:.1} | {on:.1} | **{:.3}** |",
        on / off
    );
    println!();
    println!("COPY: median of {reps} interleaved repetitions; single fault: median of {} faults per mode. The checker walks the CPU table for every 4 KiB page a translation covers, so a 2 MiB mapping costs 512 checks per leaf.", (reps * 100).min(FAULT_PAGES as usize) / 2);
    println!();
}

fn trace_table(reps: usize) {
    println!("Fault timeline (`--gpu-trace`): on against off, two rigs interleaved:");
    println!();
    println!("| measurement | trace off | trace on | ratio on / off |");
    println!("|---|---|---|---|");
    let [(c0, c1), (f0, f1)] = bench_traced(4 << 20, reps);
    println!(
        "| COPY with --gpu-trace, 4 KiB pages, 4 MiB, warm TLB (GiB/s) | {c0:.2} | {c1:.2} | **{:.3}** |",
        c1 / c0
    );
    println!(
        "| single fault with --gpu-trace, device only: FILL → fault → map → REPLAY → completion (µs) | {f0:.1} | {f1:.1} | **{:.3}** |",
        f1 / f0
    );
    println!();
    println!("Off, every hook is one branch on an `Option`; on, an event per command start and completion, fault raised, MSI, replay and control entry (none per page copied).");
}
