//! The driver's device-memory pieces against the real device model (no
//! KVM): VRAM_SIZE, the VRAM allocator and MIGRATE batches to VRAM and
//! back, 4 KiB and 2 MiB pages, with the data checked.

mod common;

use std::sync::Arc;

use common::loopback::Loopback;
use faultline_abi::{PhysPage, Status, LEAF_2M, PAGE_SIZE};
use faultline_driver::gpu::{
    Channel, Context, Gpu, GpuConfig, GpuError, MigrateList, PageSize, PageTable, Platform,
    VramAllocator,
};

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed as usize * 131 + i * 7 + i / 4096 * 3) as u8)
        .collect()
}

fn up(vram: u64) -> (Arc<Loopback>, Arc<Gpu<Loopback>>, Context<Loopback>) {
    let cfg = faultline_device::Config {
        vram,
        ..faultline_device::Config::default()
    };
    let lb = Loopback::with_config(64, cfg);
    let gpu = Gpu::probe(lb.clone(), GpuConfig::default()).unwrap_or_else(|e| panic!("{e}"));
    let pt = PageTable::new(lb.clone()).unwrap_or_else(|e| panic!("{e}"));
    let ctx = Context::new(&gpu, pt).unwrap_or_else(|e| panic!("{e}"));
    (lb, gpu, ctx)
}

/// Pages to VRAM pages from the allocator and back into other system
/// pages: the data survives both ways, the allocator and the DMA frames
/// end where they started.
fn round_trip(size: PageSize, n: usize) {
    let (lb, gpu, ctx) = up(32 << 20);
    assert_eq!(gpu.vram_size(), 32 << 20);
    let frames = lb.frames_in_use();
    let chan = Channel::open(&ctx).unwrap_or_else(|e| panic!("{e}"));
    let vram = VramAllocator::new(gpu.vram_size());
    let mut list = MigrateList::new(lb.clone()).unwrap_or_else(|e| panic!("{e}"));
    let page = size.bytes();
    let sys_pages = (n as u64 * page / PAGE_SIZE) as usize;
    let (src, dst) = (
        lb.dma_alloc(sys_pages).expect("dma"),
        lb.dma_alloc(sys_pages).expect("dma"),
    );
    let data = pattern(page, n * page as usize);
    lb.write_phys(src.phys(), &data);
    let dev: Vec<u64> = (0..n)
        .map(|_| match size {
            PageSize::Size4K => vram.alloc_page(),
            _ => vram.alloc_chunk(),
        })
        .collect::<Option<_>>()
        .expect("VRAM");
    let sys = |base: u64, i: usize| PhysPage::system(base + i as u64 * page);
    let to_dev: Vec<_> = (0..n)
        .map(|i| (sys(src.phys(), i), PhysPage::vram(dev[i])))
        .collect();
    // Back in reverse order, so a mix-up of pages shows.
    let to_sys: Vec<_> = (0..n)
        .map(|i| (PhysPage::vram(dev[i]), sys(dst.phys(), n - 1 - i)))
        .collect();
    assert_eq!(list.run(&chan, &to_dev, size), Ok(n as u64));
    lb.write_phys(src.phys(), &vec![0; data.len()]);
    assert_eq!(list.run(&chan, &to_sys, size), Ok(n as u64));
    let mut got = vec![0u8; data.len()];
    lb.read_phys(dst.phys(), &mut got);
    for i in 0..n {
        let at = (n - 1 - i) * page as usize;
        assert!(
            got[at..][..page as usize] == data[i * page as usize..][..page as usize],
            "page {i}"
        );
    }
    for d in dev {
        match size {
            PageSize::Size4K => vram.free_page(d),
            _ => vram.free_chunk(d),
        }
        .unwrap_or_else(|e| panic!("{e}"));
    }
    assert_eq!(vram.teardown(), Ok(()), "no VRAM page leaks");
    lb.dma_free(src);
    lb.dma_free(dst);
    drop(list);
    drop(chan);
    assert_eq!(lb.frames_in_use(), frames, "no DMA frame leaks");
}

#[test]
fn migrate_4k_pages_to_vram_and_back() {
    // More than one command's worth (512) of pages.
    round_trip(PageSize::Size4K, 700);
}

#[test]
fn migrate_2m_pages_to_vram_and_back() {
    round_trip(PageSize::Size2M, 5);
}

#[test]
fn without_vram_migration_fails_cleanly() {
    let (lb, gpu, ctx) = up(0);
    assert_eq!(gpu.vram_size(), 0);
    let chan = Channel::open(&ctx).unwrap_or_else(|e| panic!("{e}"));
    let mut list = MigrateList::new(lb.clone()).unwrap_or_else(|e| panic!("{e}"));
    let buf = lb.dma_alloc(1).expect("dma");
    let pages = [(PhysPage::system(buf.phys()), PhysPage::vram(0))];
    assert_eq!(
        list.run(&chan, &pages, PageSize::Size4K),
        Err(GpuError::Command(Status::BadVram))
    );
    assert_eq!(
        list.run(&chan, &pages, PageSize::Size1G),
        Err(GpuError::Invalid("MIGRATE moves 4 KiB or 2 MiB pages"))
    );
    assert!(VramAllocator::new(gpu.vram_size()).alloc_page().is_none());
    // The channel still works after the failed command.
    let off_2m = (buf.phys() & !(LEAF_2M - 1)) + PAGE_SIZE;
    let big = [(PhysPage::system(off_2m), PhysPage::system(off_2m + LEAF_2M))];
    assert_eq!(
        list.run(&chan, &big, PageSize::Size2M),
        Err(GpuError::Command(Status::Misaligned))
    );
    lb.dma_free(buf);
}
