//! Milestone-1 loopback: the driver brings the real device model up and runs
//! commands on identity-mapped DMA memory.

mod common;

use std::sync::Arc;

use common::loopback::Loopback;
use faultline_abi::{atomic_op, regs, Pte, Status, DEVICE_MAGIC};
use faultline_driver::gpu::{
    Channel, Command, Context, DmaRegion, Gpu, GpuConfig, GpuError, PageSize, PageTable, Platform,
};

const PATTERN: u64 = 0x0123_4567_89ab_cdef;

fn setup(
    mib: u64,
    pages: usize,
) -> (
    Arc<Loopback>,
    Arc<Gpu<Loopback>>,
    DmaRegion,
    Context<Loopback>,
) {
    let lb = Loopback::new(mib);
    let gpu = Gpu::probe(lb.clone(), GpuConfig::default()).unwrap_or_else(|e| panic!("{e}"));
    let buf = lb.dma_alloc(pages).expect("dma");
    let mut pt = PageTable::new(lb.clone()).unwrap_or_else(|e| panic!("{e}"));
    pt.map_range(
        buf.phys(),
        buf.phys(),
        buf.len() as u64,
        PageSize::Size4K,
        Pte::WRITE | Pte::ATOMIC,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let ctx = Context::new(&gpu, pt).unwrap_or_else(|e| panic!("{e}"));
    (lb, gpu, buf, ctx)
}

#[test]
fn identity_fill_copy() {
    let (lb, gpu, buf, ctx) = setup(32, 16);
    let chan = Channel::open(&ctx).unwrap_or_else(|e| panic!("{e}"));
    let (src, dst, len) = (buf.phys(), buf.phys() + 8 * 4096, 8 * 4096);
    chan.run(&Command::Fill {
        dst: src,
        len,
        pattern: PATTERN,
    })
    .unwrap_or_else(|e| panic!("fill: {e}"));
    // Untouched before the copy.
    assert_eq!(buf.read_u64(8 * 4096), 0);
    chan.run(&Command::Copy { dst, src, len })
        .unwrap_or_else(|e| panic!("copy: {e}"));
    for off in (0..len as usize).step_by(4096 + 8) {
        assert_eq!(buf.read_u64(8 * 4096 + off), PATTERN, "at {off:#x}");
    }
    // The device saw the same bytes through its MMU: COPY counted them.
    assert_eq!(gpu.device_counter(11), len);
    drop(chan);
    drop(ctx);
    lb.dma_free(buf);
}

#[test]
fn inject_active_reads_the_hosts_knobs() {
    use faultline_abi::InjectKnobs;
    let plain = Loopback::new(16);
    let gpu = Gpu::probe(plain.clone(), GpuConfig::default()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(gpu.inject_active(), InjectKnobs::empty());
    let cfg = faultline_device::Config {
        inject: Some(
            "seed=3,fault_dup=0.5,tlb_ack_delay_steps=4"
                .parse()
                .unwrap(),
        ),
        ..faultline_device::Config::default()
    };
    let lb = Loopback::with_config(16, cfg);
    let gpu = Gpu::probe(lb.clone(), GpuConfig::default()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        gpu.inject_active(),
        InjectKnobs::FAULT_DUP | InjectKnobs::TLB_ACK_DELAY_STEPS
    );
}

#[test]
fn probe_checks_identity_and_enables() {
    let lb = Loopback::new(16);
    assert_eq!(lb.read32(regs::MAGIC), DEVICE_MAGIC);
    let gpu = Gpu::probe(lb.clone(), GpuConfig::default()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(lb.read32(regs::ENABLE), 1);
    let bad = GpuConfig {
        fault_entries: 3,
        ..GpuConfig::default()
    };
    drop(gpu);
    assert_eq!(lb.read32(regs::ENABLE), 0, "drop resets the device");
    assert!(matches!(
        Gpu::probe(lb.clone(), bad),
        Err(GpuError::Invalid(_))
    ));
    assert_eq!(lb.frames_in_use(), 0, "every DMA page returned");
}

#[test]
fn every_engine_command() {
    let (lb, _gpu, buf, ctx) = setup(32, 4);
    let chan = Channel::open(&ctx).unwrap_or_else(|e| panic!("{e}"));
    let base = buf.phys();
    // ATOMIC ADD returns the old value.
    buf.write_u64(0, 40);
    let old = chan
        .run(&Command::Atomic {
            va: base,
            op: atomic_op::ADD,
            wide: true,
            operand: 2,
            compare: 0,
        })
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((old, buf.read_u64(0)), (40, 42));
    // SEMAPHORE_RELEASE.
    chan.run(&Command::SemaphoreRelease {
        va: base + 8,
        wide: false,
        value: 7,
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(buf.read_u32(8), 7);
    // LAUNCH: each of 16 threads stores its global id at args[0] + 8 * id.
    use faultline_abi::isa::{self, encode, sreg};
    let code = [
        encode(isa::S2R, 5, 0, 0, sreg::GTID),
        encode(isa::SHLI, 6, 5, 0, 3),
        encode(isa::ADD, 6, 6, 1, 0),
        encode(isa::ST64, 0, 6, 5, 0),
        encode(isa::EXIT, 0, 0, 0, 0),
    ];
    for (i, w) in code.iter().enumerate() {
        buf.write_u64(4096 + 8 * i, *w);
    }
    chan.run(&Command::Launch {
        code: base + 4096,
        code_len: code.len() as u32,
        grid: 2,
        block: 8,
        args: [base + 8192, 0, 0, 0],
    })
    .unwrap_or_else(|e| panic!("{e}"));
    for i in 0..16 {
        assert_eq!(buf.read_u64(8192 + 8 * i), i as u64);
    }
    // A bad opcode and a bad field are reported as typed command errors.
    let mut raw = [0u64; 8];
    raw[0] = 99;
    assert_eq!(
        chan.run(&Command::Raw(raw)),
        Err(GpuError::Command(Status::InvalidOpcode))
    );
    assert_eq!(
        chan.run(&Command::Atomic {
            va: base + 4,
            op: atomic_op::ADD,
            wide: true,
            operand: 1,
            compare: 0
        }),
        Err(GpuError::Command(Status::Misaligned))
    );
    drop(chan);
    drop(ctx);
    lb.dma_free(buf);
}

#[test]
fn unmapped_access_is_cancelled_and_invalidate_takes_effect() {
    let (lb, gpu, buf, ctx) = setup(32, 4);
    let chan = Channel::open(&ctx).unwrap_or_else(|e| panic!("{e}"));
    // Mapped: fine (and now cached in the device TLB).
    chan.run(&Command::Fill {
        dst: buf.phys(),
        len: 4096,
        pattern: 1,
    })
    .unwrap_or_else(|e| panic!("{e}"));
    // Unmap in memory and invalidate: the next access faults, no handler,
    // so the driver cancels it and the command fails.
    let cleared = ctx.page_table().unmap_range(buf.phys(), buf.phys() + 4096);
    assert_eq!((cleared.leaves, cleared.start), (1, buf.phys()));
    let before = lb.now_ns();
    ctx.invalidate(buf.phys(), 4096)
        .unwrap_or_else(|e| panic!("{e}"));
    // The acknowledgement time benchmarks read lies within the call.
    let ack = gpu.last_tlb_ack_ns();
    assert!(
        before <= ack && ack <= lb.now_ns(),
        "ack at {ack}, call from {before}"
    );
    assert_eq!(
        chan.run(&Command::Fill {
            dst: buf.phys(),
            len: 4096,
            pattern: 2,
        }),
        Err(GpuError::Command(Status::Cancelled))
    );
    assert_eq!(buf.read_u64(0), 1, "nothing written after the invalidate");
    let c = gpu.counters().snapshot();
    assert!(
        c.faults_read >= 1 && c.cancels >= 1 && c.replays >= 1,
        "{c:?}"
    );
    // The channel still works afterwards.
    chan.run(&Command::Fill {
        dst: buf.phys() + 4096,
        len: 4096,
        pattern: 3,
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(buf.read_u64(4096), 3);
    drop(chan);
    drop(ctx);
    lb.dma_free(buf);
}

#[test]
fn huge_leaf_and_many_in_flight() {
    let (lb, _gpu, _small, ctx) = setup(64, 1);
    let big = lb.dma_alloc(1024).expect("4 MiB");
    assert_eq!(big.phys() % (2 << 20), 0);
    ctx.page_table()
        .map_range(
            big.phys(),
            big.phys(),
            4 << 20,
            PageSize::Size2M,
            Pte::WRITE,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let leaf = ctx
        .page_table()
        .lookup(big.phys() + 0x1234)
        .expect("mapped");
    assert_eq!(
        (leaf.size, leaf.phys),
        (PageSize::Size2M, big.phys() + 0x1234)
    );
    let chan = Channel::open(&ctx).unwrap_or_else(|e| panic!("{e}"));
    // More commands than slots: submit waits for slots to free up.
    let tickets: Vec<_> = (0..100u64)
        .map(|i| {
            chan.submit(&Command::Fill {
                dst: big.phys() + i * 4096,
                len: 4096,
                pattern: i,
            })
            .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    for t in tickets {
        chan.wait(t).unwrap_or_else(|e| panic!("{e}"));
    }
    for i in 0..100u64 {
        assert_eq!(big.read_u64((i * 4096 + 64) as usize), i);
    }
    drop(chan);
    drop(ctx);
    lb.dma_free(big);
}

#[test]
fn contexts_and_channels_are_released() {
    let (lb, _gpu, buf, ctx) = setup(32, 1);
    let before = lb.frames_in_use();
    for _ in 0..100 {
        let pt = PageTable::new(lb.clone()).unwrap_or_else(|e| panic!("{e}"));
        let c = Context::new(ctx.gpu(), pt).unwrap_or_else(|e| panic!("{e}"));
        let ch = Channel::open(&c).unwrap_or_else(|e| panic!("{e}"));
        drop(ch);
        drop(c);
    }
    assert_eq!(lb.frames_in_use(), before);
    drop(ctx);
    lb.dma_free(buf);
}

/// Neighbouring 4 KiB maps reuse the last level-1 table; a 2 MiB leaf that
/// replaces that table, and a 4 KiB map that splits the leaf again, must
/// not write through the stale table.
#[test]
fn page_table_leaf_table_cache_follows_replacements() {
    let lb = Loopback::new(16);
    let mut pt = PageTable::new(lb.clone()).unwrap_or_else(|e| panic!("{e}"));
    let (va, pa) = (0x4000_0000u64, 0x20_0000u64);
    let map = |pt: &mut PageTable<Loopback>, va, pa, size| {
        pt.map(va, pa, size, Pte::WRITE)
            .unwrap_or_else(|e| panic!("{e}"))
    };
    map(&mut pt, va, pa, PageSize::Size4K);
    map(&mut pt, va + 0x1000, pa + 0x1000, PageSize::Size4K);
    let tables = pt.table_count();
    map(&mut pt, va, pa, PageSize::Size2M);
    assert_eq!(pt.leaf_count(), 1);
    assert_eq!(
        pt.table_count(),
        tables,
        "the replaced table is retired, not freed"
    );
    assert_eq!(
        pt.lookup(va + 0x1000).map(|l| l.size),
        Some(PageSize::Size2M)
    );
    // Splitting again needs a fresh table: the retired one must not be
    // written (the device may still walk it until the TLB flush).
    map(&mut pt, va + 0x3000, 0x60_3000, PageSize::Size4K);
    let leaf = pt.lookup(va + 0x3000).expect("mapped");
    assert_eq!((leaf.phys, leaf.size), (0x60_3000, PageSize::Size4K));
    assert_eq!(pt.lookup(va + 0x1000), None, "the 2 MiB leaf is gone whole");
    assert_eq!(pt.leaf_count(), 1);
    assert_eq!(pt.table_count(), tables + 1);
    map(&mut pt, va + 0x4000, 0x60_4000, PageSize::Size4K);
    assert_eq!(pt.lookup(va + 0x4000).map(|l| l.phys), Some(0x60_4000));
    assert_eq!(pt.leaf_count(), 2);
}

/// `map_run` writes what `map` would, page by page: across a level-1
/// table boundary, over holes the callback skips, replacing a leaf in
/// place, with the leaf count kept.
#[test]
fn map_run_matches_map_page_by_page() {
    let lb = Loopback::new(8);
    let mut pt = PageTable::new(lb.clone()).unwrap_or_else(|e| panic!("{e}"));
    // 24 pages from 8 pages below a 2 MiB boundary; every third a hole.
    let va = (4u64 << 21) - 8 * 4096;
    let frame = |i: usize| 0x1000_0000 + i as u64 * 4096;
    let perms = |i: usize| {
        if i.is_multiple_of(2) {
            Pte::WRITE
        } else {
            Pte::empty()
        }
    };
    let leaf = |i: usize| (i % 3 != 2).then(|| (frame(i), perms(i)));
    pt.map(va + 4096, 0x2000_0000, PageSize::Size4K, Pte::empty())
        .unwrap_or_else(|e| panic!("{e}"));
    let (mapped, r) = pt.map_run(va, 24, PageSize::Size4K, leaf);
    r.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(mapped, 16);
    assert_eq!(pt.leaf_count(), 16, "the replaced leaf counted once");
    for i in 0..24 {
        let got = pt.lookup(va + i as u64 * 4096);
        match leaf(i) {
            Some((phys, p)) => {
                let l = got.unwrap_or_else(|| panic!("page {i} unmapped"));
                assert_eq!((l.phys, l.perms), (phys, Pte::VALID | p), "page {i}");
            }
            None => assert_eq!(got, None, "page {i}"),
        }
    }
    // A frame the device cannot address stops the run there.
    let (mapped, r) = pt.map_run(va, 4, PageSize::Size4K, |i| {
        Some((if i == 2 { 1 << 60 } else { frame(i) }, Pte::empty()))
    });
    assert!(r.is_err());
    assert_eq!(mapped, 2);
}

/// `clear` removes every leaf whatever the tables below the root hold,
/// keeps the retired tables until drop, and leaves a table that maps again.
#[test]
fn clear_unmaps_everything_and_maps_again() {
    let lb = Loopback::new(8);
    let mut pt = PageTable::new(lb.clone()).unwrap_or_else(|e| panic!("{e}"));
    let vas = [0x1000u64, 0x20_0000, 0x40_0000_0000, 0x7f_ffff_f000];
    for (i, &va) in vas.iter().enumerate() {
        pt.map(
            va,
            0x1000_0000 + i as u64 * 4096,
            PageSize::Size4K,
            Pte::WRITE,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }
    pt.map(0x4000_0000, 0x2000_0000, PageSize::Size2M, Pte::empty())
        .unwrap_or_else(|e| panic!("{e}"));
    let tables = pt.table_count();
    assert_eq!(pt.clear(), 5);
    assert_eq!(pt.leaf_count(), 0);
    assert_eq!(
        pt.table_count(),
        tables,
        "retired tables are kept until drop"
    );
    for va in vas.into_iter().chain([0x4000_0000]) {
        assert_eq!(pt.lookup(va), None, "{va:#x} still mapped");
    }
    assert!(!pt.has_leaves(0, faultline_abi::VA_LIMIT));
    pt.map(0x1000, 0x3000_0000, PageSize::Size4K, Pte::empty())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(pt.lookup(0x1000).map(|l| l.phys), Some(0x3000_0000));
    assert_eq!(pt.leaf_count(), 1);
}

/// `map_run` checks the run's VA once and each frame per leaf: a
/// misaligned start maps nothing, a frame beyond the PTE's address bits
/// stops the run there (the leaves before it stay), also when the run
/// continues in the level-1 table the previous run cached.
#[test]
fn page_table_map_run_rejects_bad_leaves() {
    let lb = Loopback::new(16);
    let mut pt = PageTable::new(lb.clone()).unwrap_or_else(|e| panic!("{e}"));
    let va = 0x4000_0000u64;
    let good = |i: usize| Some((0x20_0000 + i as u64 * 0x1000, Pte::WRITE));
    let (n, r) = pt.map_run(va, 2, PageSize::Size4K, good);
    assert!(r.is_ok() && n == 2, "{n} mapped, {r:?}");
    // The next runs start in the cached table: no walk checks their leaves.
    let (n, r) = pt.map_run(va + 0x2800, 4, PageSize::Size4K, good);
    assert!(r.is_err() && n == 0, "misaligned start: {n} mapped, {r:?}");
    assert_eq!(pt.leaf_count(), 2);
    let bad_third = |i: usize| match i {
        2 => Some((1u64 << 52, Pte::WRITE)),
        _ => Some((0x30_0000 + i as u64 * 0x1000, Pte::WRITE)),
    };
    let (n, r) = pt.map_run(va + 0x2000, 4, PageSize::Size4K, bad_third);
    assert!(
        r.is_err() && n == 2,
        "frame out of range: {n} mapped, {r:?}"
    );
    assert_eq!(pt.leaf_count(), 4);
    assert_eq!(pt.lookup(va + 0x3000).map(|l| l.phys), Some(0x30_1000));
    assert_eq!(
        pt.lookup(va + 0x4000),
        None,
        "nothing at or after the bad leaf"
    );
    assert_eq!(pt.lookup(va + 0x5000), None);
}
