//! Device-private pages and migration against the simulated address space,
//! with a device whose memory is a host map (the hmm-tests intents:
//! `migrate`, `migrate_fault`, `migrate_release`, `migrate_shared`,
//! `migrate_multiple`, `snapshot_device`, plus the page lock and the
//! failure paths).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::vec::Vec;

use parking_lot::Mutex;

use super::*;
use crate::hmm::{
    mirror_register, range_fault, range_register, range_snapshot, HmmMirrorOps, HmmRange,
    HmmUpdate, HMM_PFN_FLAG_MAX, HMM_PFN_VALUE_MAX,
};
use crate::mm::{
    mmap_read_lock, mmap_write_lock, mmu_notifier_register, MmuNotifier, Walk, PAGE_SIZE as PG,
};
use crate::sim::SimMm;

const BASE: u64 = 0x4000_0000;
const RW: VmFlags = VmFlags::READ.union(VmFlags::WRITE);

/// A device with `pages` pages of memory kept in a host map.
struct FakeDev {
    owner: DeviceOwner,
    mem: Mutex<HashMap<u64, Vec<u8>>>,
    free: Mutex<Vec<u64>>,
    to_ram: AtomicUsize,
    fail_to_ram: AtomicBool,
    /// Microseconds `migrate_to_ram` sleeps (widens the page-lock window).
    slow_us: AtomicU64,
    in_copy: AtomicUsize,
    overlapping_copies: AtomicUsize,
}

impl FakeDev {
    fn new(pages: u64) -> Arc<FakeDev> {
        Arc::new(FakeDev {
            owner: DeviceOwner::alloc().expect("owner ids"),
            mem: Mutex::new(HashMap::new()),
            free: Mutex::new((0..pages).rev().collect()),
            to_ram: AtomicUsize::new(0),
            fail_to_ram: AtomicBool::new(false),
            slow_us: AtomicU64::new(0),
            in_copy: AtomicUsize::new(0),
            overlapping_copies: AtomicUsize::new(0),
        })
    }

    fn in_use(&self) -> usize {
        self.mem.lock().len()
    }

    /// The driver's migrate_to_device, as test_hmm's: every collected
    /// system page (and hole) to a fresh device page, data copied.
    fn migrate_to_device(&self, mm: &Arc<SimMm>, start: u64, end: u64) -> Result<usize, Errno> {
        let mmap = mmap_read_lock(&**mm);
        let mut mig =
            migrate_vma_setup(&mmap, start, end, MigrateSelect::SYSTEM, Some(self.owner))?;
        for i in 0..mig.pages().len() {
            let mut data = vec![0u8; PG as usize];
            match mig.pages()[i].src {
                MigrateSrc::Page(MigratePfn::System { pfn }) => {
                    mm.frame_source().read(pfn, 0, &mut data)
                }
                MigrateSrc::Empty => {}
                _ => continue,
            }
            let Some(v) = self.free.lock().pop() else {
                break;
            };
            self.mem.lock().insert(v, data);
            mig.set_dst(
                i,
                MigratePfn::Device {
                    owner: self.owner,
                    vram_pfn: v,
                },
            );
        }
        mig.migrate_pages();
        Ok(mig.finalize())
    }

    /// migrate_to_system: this device's pages of the range back.
    fn migrate_to_system(&self, mm: &Arc<SimMm>, start: u64, end: u64) -> Result<usize, Errno> {
        let mmap = mmap_read_lock(&**mm);
        let mut mig = migrate_vma_setup(
            &mmap,
            start,
            end,
            MigrateSelect::DEVICE_PRIVATE,
            Some(self.owner),
        )?;
        for i in 0..mig.pages().len() {
            let MigrateSrc::Page(MigratePfn::Device { vram_pfn, .. }) = mig.pages()[i].src else {
                continue;
            };
            let pfn = mm.alloc_frame().ok_or(Errno::ENOMEM)?;
            mm.frame_source().write(pfn, 0, &self.mem.lock()[&vram_pfn]);
            mig.set_dst(i, MigratePfn::System { pfn });
        }
        mig.migrate_pages();
        Ok(mig.finalize())
    }
}

/// 4 KiB pages in a 2 MiB one.
const HUGE_PAGES: u64 = PMD_SIZE / PAGE_SIZE;

/// 4 KiB pages in a device page (`huge`: 2 MiB).
fn pages(huge: bool) -> u64 {
    if huge {
        HUGE_PAGES
    } else {
        1
    }
}

impl DevPagemapOps<SimMm> for FakeDev {
    fn migrate_to_ram(
        &self,
        mm: &SimMm,
        _addr: u64,
        vram_pfn: u64,
        dst_pfn: u64,
        huge: bool,
    ) -> Result<(), Errno> {
        if self.in_copy.fetch_add(1, Ordering::SeqCst) > 0 {
            self.overlapping_copies.fetch_add(1, Ordering::SeqCst);
        }
        let us = self.slow_us.load(Ordering::SeqCst);
        if us > 0 {
            std::thread::sleep(std::time::Duration::from_micros(us));
        }
        let r = if self.fail_to_ram.load(Ordering::SeqCst) {
            Err(Errno::EFAULT)
        } else {
            self.to_ram.fetch_add(1, Ordering::SeqCst);
            let mem = self.mem.lock();
            for k in 0..pages(huge) {
                mm.frame_source()
                    .write(dst_pfn + k, 0, &mem[&(vram_pfn + k)]);
            }
            Ok(())
        };
        self.in_copy.fetch_sub(1, Ordering::SeqCst);
        r
    }

    fn page_free(&self, vram_pfn: u64, huge: bool) {
        for p in vram_pfn..vram_pfn + pages(huge) {
            assert!(
                self.mem.lock().remove(&p).is_some(),
                "device page {p:#x} freed twice"
            );
            self.free.lock().push(p);
        }
    }
}

/// Records every notifier range.
#[derive(Default)]
struct Spy(Mutex<Vec<MmuNotifierRange>>);

impl MmuNotifier<SimMm> for Spy {
    fn invalidate_range_start(&self, _: &SimMm, r: &MmuNotifierRange) -> Result<(), Errno> {
        self.0.lock().push(*r);
        Ok(())
    }
    fn invalidate_range_end(&self, _: &SimMm, _: &MmuNotifierRange) {}
    fn release(&self, _: &SimMm) {}
}

fn pattern(page: u64, round: u64) -> Vec<u8> {
    (0..PG)
        .map(|b| (page * 31 + b * 7 + round * 13) as u8)
        .collect()
}

/// A process with `n` RW pages at BASE, each written with `pattern(i, 0)`,
/// and a device of `dev_pages` pages registered on it.
fn setup(n: u64, dev_pages: u64) -> (Arc<SimMm>, Arc<FakeDev>) {
    let mm = SimMm::new();
    mm.mmap(BASE, n * PG, RW).unwrap();
    for i in 0..n {
        mm.write(BASE + i * PG, &pattern(i, 0)).unwrap();
    }
    let dev = FakeDev::new(dev_pages);
    dev_pagemap_register(&*mm, dev.owner, dev.clone()).unwrap();
    (mm, dev)
}

fn read_page(mm: &SimMm, addr: u64) -> Result<Vec<u8>, FaultError> {
    let mut b = vec![0u8; PG as usize];
    mm.read(addr, &mut b)?;
    Ok(b)
}

fn is_device(mm: &SimMm, addr: u64, dev: &FakeDev) -> bool {
    matches!(mm.cpu_state(addr), PageState::DevicePrivate { owner, .. } if owner == dev.owner)
}

#[test]
fn migrate_moves_pages_to_the_device_and_cpu_faults_bring_them_back() {
    let n = 8;
    let (mm, dev) = setup(n, 64);
    let spy = Arc::new(Spy::default());
    let weak: Weak<dyn MmuNotifier<SimMm>> = Arc::downgrade(&spy) as _;
    mmu_notifier_register(&*mm, weak);
    let frames = mm.frames_in_use();
    assert_eq!(
        dev.migrate_to_device(&mm, BASE, BASE + n * PG),
        Ok(n as usize)
    );
    assert!((0..n).all(|i| is_device(&mm, BASE + i * PG, &dev)));
    assert_eq!(mm.device_pages(), n);
    assert_eq!(dev.in_use(), n as usize);
    assert_eq!(
        mm.frames_in_use(),
        frames - n,
        "the system frames were freed"
    );
    assert!(
        spy.0.lock().iter().any(|r| (r.start, r.end, r.event)
            == (
                BASE,
                BASE + n * PG,
                MmuNotifyEvent::Migrate {
                    owner: Some(dev.owner)
                }
            )),
        "the unmap is a Migrate event naming the device"
    );
    for i in 0..n {
        assert_eq!(
            read_page(&mm, BASE + i * PG).unwrap(),
            pattern(i, 0),
            "page {i}"
        );
    }
    assert_eq!(dev.to_ram.load(Ordering::SeqCst), n as usize);
    assert_eq!(mm.device_pages(), 0);
    assert_eq!(dev.in_use(), 0, "every device page freed after its copy");
    assert_eq!(mm.frames_in_use(), frames);
    // The CPU fault kept the page writable.
    mm.write(BASE, &[1]).unwrap();
}

#[test]
fn migrate_fault_half_back_then_the_mix_again() {
    let n = 16;
    let (mm, dev) = setup(n, 64);
    assert_eq!(
        dev.migrate_to_device(&mm, BASE, BASE + n * PG),
        Ok(n as usize)
    );
    for i in (0..n).step_by(2) {
        assert_eq!(read_page(&mm, BASE + i * PG).unwrap(), pattern(i, 0));
    }
    assert_eq!(mm.device_pages(), n / 2);
    // Device pages of this device are not system memory: only the half
    // faulted back moves.
    assert_eq!(
        dev.migrate_to_device(&mm, BASE, BASE + n * PG),
        Ok(n as usize / 2)
    );
    assert_eq!(mm.device_pages(), n);
    assert_eq!(
        dev.migrate_to_system(&mm, BASE, BASE + n * PG),
        Ok(n as usize)
    );
    for i in 0..n {
        assert_eq!(
            read_page(&mm, BASE + i * PG).unwrap(),
            pattern(i, 0),
            "page {i}"
        );
    }
    assert_eq!(dev.in_use(), 0);
    assert_eq!(dev.to_ram.load(Ordering::SeqCst), n as usize / 2);
}

#[test]
fn migrate_release_frees_every_device_page() {
    let n = 10;
    let (mm, dev) = setup(n, 64);
    assert_eq!(
        dev.migrate_to_device(&mm, BASE, BASE + n * PG),
        Ok(n as usize)
    );
    // munmap of part, exit for the rest.
    mm.munmap(BASE, 3 * PG).unwrap();
    assert_eq!(dev.in_use(), n as usize - 3);
    assert_eq!(mm.device_pages(), n - 3);
    mm.exit();
    assert_eq!(dev.in_use(), 0, "no device page leaks at exit");
    assert_eq!(mm.device_pages(), 0);
    assert_eq!(mm.frames_in_use(), 0);
    assert_eq!(dev.to_ram.load(Ordering::SeqCst), 0);
}

#[test]
fn migrate_shared_is_refused() {
    let mm = SimMm::new();
    mm.mmap(BASE, 4 * PG, RW | VmFlags::SHARED).unwrap();
    mm.populate(BASE, 4 * PG, true).unwrap();
    let dev = FakeDev::new(8);
    dev_pagemap_register(&*mm, dev.owner, dev.clone()).unwrap();
    let before: Vec<PageState> = (0..4).map(|i| mm.cpu_state(BASE + i * PG)).collect();
    assert_eq!(dev.migrate_to_device(&mm, BASE, BASE + 4 * PG), Ok(0));
    let after: Vec<PageState> = (0..4).map(|i| mm.cpu_state(BASE + i * PG)).collect();
    assert_eq!(before, after);
    assert_eq!(dev.in_use(), 0);
}

#[test]
fn migrate_mixed_holes_zero_page_and_read_only() {
    let mm = SimMm::new();
    mm.mmap(BASE, 4 * PG, RW).unwrap();
    mm.mmap(BASE + 4 * PG, 2 * PG, VmFlags::READ).unwrap();
    mm.write(BASE, &pattern(0, 0)).unwrap(); // page 0 data, page 1 hole
    mm.touch(BASE + 2 * PG, false).unwrap(); // page 2 zero page
    mm.touch(BASE + 4 * PG, false).unwrap(); // RO zero page
    let dev = FakeDev::new(16);
    dev_pagemap_register(&*mm, dev.owner, dev.clone()).unwrap();
    assert_eq!(dev.migrate_to_device(&mm, BASE, BASE + 4 * PG), Ok(4));
    assert_eq!(
        dev.migrate_to_device(&mm, BASE + 2 * PG, BASE + 6 * PG),
        Err(Errno::EINVAL),
        "a migration stays inside one VMA"
    );
    assert_eq!(
        dev.migrate_to_device(&mm, BASE + 4 * PG, BASE + 6 * PG),
        Ok(2)
    );
    assert!(matches!(
        mm.cpu_state(BASE + 4 * PG),
        PageState::DevicePrivate {
            writable: false,
            ..
        }
    ));
    assert!(matches!(
        mm.cpu_state(BASE + PG),
        PageState::DevicePrivate { writable: true, .. }
    ));
    assert_eq!(read_page(&mm, BASE).unwrap(), pattern(0, 0));
    for i in 1..6 {
        assert_eq!(read_page(&mm, BASE + i * PG).unwrap(), vec![0; PG as usize]);
    }
    assert_eq!(mm.write(BASE + 4 * PG, &[1]), Err(FaultError::Sigsegv));
    mm.write(BASE + PG, &[1]).unwrap();
    assert_eq!(dev.in_use(), 0);
}

#[test]
fn migrate_multiple_round_trips() {
    let n = 6;
    let (mm, dev) = setup(n, 64);
    let frames = mm.frames_in_use();
    for round in 1..=10 {
        for i in 0..n {
            mm.write(BASE + i * PG, &pattern(i, round)).unwrap();
        }
        assert_eq!(
            dev.migrate_to_device(&mm, BASE, BASE + n * PG),
            Ok(n as usize)
        );
        assert_eq!(
            dev.migrate_to_system(&mm, BASE, BASE + n * PG),
            Ok(n as usize)
        );
        for i in 0..n {
            assert_eq!(read_page(&mm, BASE + i * PG).unwrap(), pattern(i, round));
        }
    }
    assert_eq!(dev.in_use(), 0);
    assert_eq!(mm.frames_in_use(), frames);
}

#[test]
fn an_unfinished_migration_restores_every_page() {
    let n = 4;
    let (mm, dev) = setup(n, 64);
    let before: Vec<PageState> = (0..n).map(|i| mm.cpu_state(BASE + i * PG)).collect();
    {
        let mmap = mmap_read_lock(&*mm);
        let mig = migrate_vma_setup(
            &mmap,
            BASE,
            BASE + n * PG,
            MigrateSelect::SYSTEM,
            Some(dev.owner),
        )
        .unwrap();
        let mut mig = mig;
        assert_eq!(mig.collected(), n as usize);
        assert_eq!(mm.walk(&mmap, BASE).state, PageState::Migration);
        // A destination chosen but never installed goes back to its owner.
        let v = dev.free.lock().pop().unwrap();
        dev.mem.lock().insert(v, vec![0; PG as usize]);
        let owner = dev.owner;
        mig.set_dst(0, MigratePfn::Device { owner, vram_pfn: v });
        // A faulting device must not wait here: it retries.
        assert_eq!(
            mm.handle_mm_fault(&mmap, BASE, FaultFlags::REMOTE | FaultFlags::ALLOW_RETRY),
            Err(FaultError::Retry)
        );
    }
    let after: Vec<PageState> = (0..n).map(|i| mm.cpu_state(BASE + i * PG)).collect();
    assert_eq!(before, after);
    assert_eq!(dev.in_use(), 0, "the unused destination was freed");
    assert_eq!(read_page(&mm, BASE + PG).unwrap(), pattern(1, 0));
}

/// Reclaim (no mmap lock) takes a page's migration entry away mid-way:
/// that page alone is neither installed nor restored, its destination and
/// its old frame are freed, the others migrate.
#[test]
fn a_page_reclaimed_under_migration_is_not_installed() {
    let n = 4;
    let (mm, dev) = setup(n, 64);
    let frames = mm.frames_in_use();
    {
        let mmap = mmap_read_lock(&*mm);
        let sel = MigrateSelect::SYSTEM;
        let mut mig = migrate_vma_setup(&mmap, BASE, BASE + n * PG, sel, Some(dev.owner)).unwrap();
        assert_eq!(mig.collected(), n as usize);
        assert_eq!(
            mm.reclaim(BASE + PG, BASE + 2 * PG),
            0,
            "no frame behind a migration entry"
        );
        let owner = dev.owner;
        for i in 0..n as usize {
            let v = dev.free.lock().pop().unwrap();
            dev.mem.lock().insert(v, vec![0; PG as usize]);
            mig.set_dst(i, MigratePfn::Device { owner, vram_pfn: v });
        }
        assert_eq!(mig.migrate_pages(), n as usize - 1);
        assert_eq!(mig.finalize(), n as usize - 1);
    }
    assert_eq!(mm.cpu_state(BASE + PG), PageState::None);
    for i in [0, 2, 3] {
        assert!(is_device(&mm, BASE + i * PG, &dev), "page {i} migrated");
    }
    assert_eq!(
        dev.in_use(),
        n as usize - 1,
        "the reclaimed page's destination was freed"
    );
    assert_eq!(mm.frames_in_use(), frames - n, "every old frame was freed");
}

#[test]
fn a_failed_migrate_to_ram_is_sigbus_and_leaves_the_page_on_the_device() {
    let (mm, dev) = setup(2, 8);
    dev.migrate_to_device(&mm, BASE, BASE + 2 * PG).unwrap();
    dev.fail_to_ram.store(true, Ordering::SeqCst);
    let frames = mm.frames_in_use();
    assert_eq!(read_page(&mm, BASE), Err(FaultError::Sigbus));
    assert!(is_device(&mm, BASE, &dev));
    assert_eq!(mm.frames_in_use(), frames, "the frame went back");
    dev.fail_to_ram.store(false, Ordering::SeqCst);
    assert_eq!(read_page(&mm, BASE).unwrap(), pattern(0, 0));
    // An owner that went away: the access fails, it does not hang.
    dev_pagemap_unregister(&*mm, dev.owner);
    assert_eq!(read_page(&mm, BASE + PG), Err(FaultError::Sigbus));
}

/// Holds the first Migrate invalidation that reaches it until the device
/// is copying: the fault that saw a device-private entry first then finds
/// the page locked by the second one.
struct Gate {
    dev: Arc<FakeDev>,
    armed: AtomicBool,
    holding: AtomicBool,
}

impl MmuNotifier<SimMm> for Gate {
    fn invalidate_range_start(&self, _: &SimMm, r: &MmuNotifierRange) -> Result<(), Errno> {
        if matches!(r.event, MmuNotifyEvent::Migrate { .. })
            && self.armed.swap(false, Ordering::SeqCst)
        {
            self.holding.store(true, Ordering::SeqCst);
            let t = std::time::Instant::now();
            while self.dev.in_copy.load(Ordering::SeqCst) == 0
                && t.elapsed() < std::time::Duration::from_secs(5)
            {
                std::thread::yield_now();
            }
        }
        Ok(())
    }
    fn invalidate_range_end(&self, _: &SimMm, _: &MmuNotifierRange) {}
    fn release(&self, _: &SimMm) {}
}

#[test]
fn concurrent_cpu_faults_on_one_device_page_copy_it_once() {
    let (mm, dev) = setup(1, 8);
    dev.migrate_to_device(&mm, BASE, BASE + PG).unwrap();
    dev.slow_us.store(50_000, Ordering::SeqCst);
    let gate = Arc::new(Gate {
        dev: dev.clone(),
        armed: AtomicBool::new(true),
        holding: AtomicBool::new(false),
    });
    let weak: Weak<dyn MmuNotifier<SimMm>> = Arc::downgrade(&gate) as _;
    mmu_notifier_register(&*mm, weak);
    let spawn = || {
        let mm = mm.clone();
        std::thread::spawn(move || read_page(&mm, BASE))
    };
    // The first fault saw the device-private entry and stops before
    // locking the page; the second locks it and copies.
    let first = spawn();
    while !gate.holding.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    let threads = [first, spawn(), spawn()];
    for t in threads {
        assert_eq!(t.join().unwrap().unwrap(), pattern(0, 0));
    }
    assert_eq!(dev.to_ram.load(Ordering::SeqCst), 1, "one copy");
    assert_eq!(dev.overlapping_copies.load(Ordering::SeqCst), 0);
    assert_eq!(dev.in_use(), 0);
    assert_eq!(mm.frames_in_use(), 1, "no frame lost to the race");
}

const V: u64 = 1;
const W: u64 = 2;
const DP: u64 = 4;
const FLAGS: [u64; HMM_PFN_FLAG_MAX] = [V, W, DP];
const VALUES: [u64; HMM_PFN_VALUE_MAX] = [8, 0, 16];

struct NoSync;
impl HmmMirrorOps<SimMm> for NoSync {
    fn sync_cpu_device_pagetables(&self, _: &HmmUpdate) -> Result<(), Errno> {
        Ok(())
    }
}

#[test]
fn snapshot_device_reports_own_pages_and_faults_back_other_devices_pages() {
    let n = 4;
    let (mm, dev) = setup(n, 8);
    let other = FakeDev::new(8);
    dev_pagemap_register(&*mm, other.owner, other.clone()).unwrap();
    dev.migrate_to_device(&mm, BASE, BASE + 2 * PG).unwrap();
    other
        .migrate_to_device(&mm, BASE + 2 * PG, BASE + n * PG)
        .unwrap();
    let mirror = mirror_register(&mm, &mmap_write_lock(&*mm), Arc::new(NoSync)).unwrap();
    let mut range = HmmRange::<SimMm>::new(FLAGS, VALUES, 8);
    range.dev_private_owner = Some(dev.owner);
    range_register(&mut range, &mirror, BASE, BASE + n * PG, PAGE_SHIFT).unwrap();
    let faults = mm.fault_count();
    {
        let mmap = mmap_read_lock(&*mm);
        range_snapshot(&mut range, &mmap).unwrap();
    }
    for i in 0..2 {
        let e = range.pfns[i];
        let PageState::DevicePrivate { vram_pfn, .. } = mm.cpu_state(BASE + i as u64 * PG) else {
            panic!("page {i} left the device");
        };
        assert!(range.entry_is_device_private(e), "page {i}: {e:#x}");
        assert_eq!(range.entry_to_pfn(e), Some(vram_pfn));
        assert!(range.entry_is_writable(e));
    }
    assert_eq!(&range.pfns[2..], &[0, 0], "another device's pages: none");
    assert_eq!(mm.fault_count(), faults, "no CPU fault");
    // range_fault asking for every page: ours stay, the other's come back.
    range.pfns.fill(V);
    {
        let mmap = mmap_read_lock(&*mm);
        range_fault(&mut range, &mmap, true).unwrap();
    }
    assert!(range.entry_is_device_private(range.pfns[0]));
    assert_eq!(other.to_ram.load(Ordering::SeqCst), 2);
    assert_eq!(dev.to_ram.load(Ordering::SeqCst), 0);
    for i in 2..n as usize {
        let e = range.pfns[i];
        assert!(!range.entry_is_device_private(e));
        assert_eq!(
            range.entry_to_pfn(e),
            mm.cpu_pfn(BASE + i as u64 * PG).map(|(p, _)| p)
        );
    }
    assert_eq!(other.in_use(), 0);
    // A range for no device sees none of them.
    let mut plain = HmmRange::<SimMm>::new(FLAGS, VALUES, 8);
    range_register(&mut plain, &mirror, BASE, BASE + PG, PAGE_SHIFT).unwrap();
    {
        let mmap = mmap_read_lock(&*mm);
        range_snapshot(&mut plain, &mmap).unwrap();
    }
    assert_eq!(plain.pfns[0], 0);
    drop(range);
    drop(plain);
    drop(mirror);
    dev.migrate_to_system(&mm, BASE, BASE + n * PG).unwrap();
    assert_eq!(dev.in_use(), 0);
}

#[test]
fn owner_ids_are_unique_and_registration_is_exclusive() {
    let a = DeviceOwner::alloc().unwrap();
    let b = DeviceOwner::alloc().unwrap();
    assert_ne!(a, b);
    assert_eq!(DeviceOwner::from_raw(a.get()), Some(a));
    assert_eq!(DeviceOwner::from_raw(0), None);
    assert_eq!(DeviceOwner::from_raw(DeviceOwner::MAX + 1), None);
    let mm = SimMm::new();
    let dev = FakeDev::new(1);
    dev_pagemap_register(&*mm, a, dev.clone()).unwrap();
    assert_eq!(
        dev_pagemap_register(&*mm, a, dev.clone()),
        Err(Errno::EBUSY)
    );
}

#[test]
fn a_device_fault_on_a_page_under_migration_is_eagain_without_waiting() {
    let (mm, dev) = setup(2, 8);
    let mirror = mirror_register(&mm, &mmap_write_lock(&*mm), Arc::new(NoSync)).unwrap();
    let mut range = HmmRange::<SimMm>::new(FLAGS, VALUES, 8);
    range_register(&mut range, &mirror, BASE, BASE + 2 * PG, PAGE_SHIFT).unwrap();
    let mmap = mmap_read_lock(&*mm);
    let mig = migrate_vma_setup(
        &mmap,
        BASE + PG,
        BASE + 2 * PG,
        MigrateSelect::SYSTEM,
        Some(dev.owner),
    )
    .unwrap();
    // The migration is this thread's own (as when the driver services a
    // fault while it waits for its copy): waiting would be for nothing.
    range.pfns.fill(V);
    let t = std::time::Instant::now();
    assert_eq!(range_fault(&mut range, &mmap, true), Err(Errno::EAGAIN));
    assert!(t.elapsed() < std::time::Duration::from_millis(500));
    drop(mig);
    range.pfns.fill(V);
    range_fault(&mut range, &mmap, true).unwrap();
    drop(mmap);
}

/// A HUGE VMA's 2 MiB pages are collected whole (one PMD migration entry
/// each, holes too), restored whole, installed as 2 MiB device-private
/// entries, and come back whole on a CPU fault (not when the copy fails);
/// munmap gives a 2 MiB device page back through `page_free` (`huge`).
#[test]
fn huge_pages_migrate_and_come_back_whole() {
    let leaf = PMD_SIZE;
    let mm = SimMm::new();
    mm.mmap(BASE, 2 * leaf, RW | VmFlags::HUGE).unwrap();
    mm.write(BASE + 3 * PG, &pattern(3, 0)).unwrap();
    let PageState::Huge { pfn, .. } = mm.cpu_state(BASE) else {
        panic!("no 2 MiB leaf");
    };
    let dev = FakeDev::new(0);
    dev_pagemap_register(&*mm, dev.owner, dev.clone()).unwrap();
    let frames = mm.frames_in_use();
    {
        let mmap = mmap_read_lock(&*mm);
        let sel = MigrateSelect::SYSTEM;
        assert_eq!(
            migrate_vma_setup(&mmap, BASE + PG, BASE + leaf, sel, Some(dev.owner)).err(),
            Some(Errno::EINVAL),
            "a 4 KiB part of a 2 MiB page"
        );
        let mut mig =
            migrate_vma_setup(&mmap, BASE, BASE + 2 * leaf, sel, Some(dev.owner)).unwrap();
        assert_eq!(mig.page_shift(), PMD_SHIFT);
        let srcs: Vec<MigrateSrc> = mig.pages().iter().map(|p| p.src).collect();
        assert_eq!(
            srcs,
            [
                MigrateSrc::Page(MigratePfn::System { pfn }),
                MigrateSrc::Empty
            ]
        );
        for a in [BASE + 5 * PG, BASE + leaf + 7 * PG] {
            assert_eq!(
                mm.walk(&mmap, a),
                Walk {
                    state: PageState::Migration,
                    shift: PMD_SHIFT
                }
            );
        }
        drop(mig);
        assert_eq!(
            mm.walk(&mmap, BASE).state,
            PageState::Huge {
                pfn,
                writable: true
            }
        );
        assert_eq!(mm.walk(&mmap, BASE + leaf).state, PageState::None);
        // Now to the device: 512 device pages from 0 and from 512.
        mig = migrate_vma_setup(&mmap, BASE, BASE + 2 * leaf, sel, Some(dev.owner)).unwrap();
        for i in 0..2 {
            let v = i as u64 * HUGE_PAGES;
            for k in 0..HUGE_PAGES {
                let mut data = vec![0u8; PG as usize];
                if i == 0 {
                    mm.frame_source().read(pfn + k, 0, &mut data);
                }
                dev.mem.lock().insert(v + k, data);
            }
            mig.set_dst(
                i,
                MigratePfn::Device {
                    owner: dev.owner,
                    vram_pfn: v,
                },
            );
        }
        assert_eq!(mig.migrate_pages(), 2);
        assert_eq!(mig.finalize(), 2);
    }
    let want = |v| PageState::DevicePrivate {
        owner: dev.owner,
        vram_pfn: v,
        writable: true,
        huge: true,
    };
    assert_eq!(mm.cpu_state(BASE + 9 * PG), want(0));
    assert_eq!(mm.cpu_state(BASE + leaf), want(HUGE_PAGES));
    assert_eq!(mm.device_pages(), 2 * HUGE_PAGES);
    assert_eq!(mm.frames_in_use(), frames - HUGE_PAGES);
    dev.fail_to_ram.store(true, Ordering::SeqCst);
    assert_eq!(read_page(&mm, BASE + 3 * PG), Err(FaultError::Sigbus));
    assert_eq!(mm.cpu_state(BASE), want(0), "a failed copy keeps the page");
    assert_eq!(
        mm.frames_in_use(),
        frames - HUGE_PAGES,
        "its frames went back"
    );
    dev.fail_to_ram.store(false, Ordering::SeqCst);
    assert_eq!(read_page(&mm, BASE + 3 * PG).unwrap(), pattern(3, 0));
    assert!(matches!(
        mm.cpu_state(BASE + leaf - PG),
        PageState::Huge { .. }
    ));
    assert_eq!(dev.to_ram.load(Ordering::SeqCst), 1, "one copy for 2 MiB");
    assert_eq!(
        (mm.device_pages(), dev.in_use() as u64),
        (HUGE_PAGES, HUGE_PAGES)
    );
    mm.munmap(BASE + leaf, leaf).unwrap();
    assert_eq!((mm.device_pages(), dev.in_use()), (0, 0));
    assert_eq!(mm.frames_in_use(), frames);
}

/// Frames from `HostFrames`, but no 2 MiB run while `no_runs` is set.
#[derive(Default)]
struct NoRuns {
    inner: crate::sim::HostFrames,
    no_runs: AtomicBool,
}

impl crate::sim::FrameSource for NoRuns {
    fn alloc(&self, count: u64) -> Option<u64> {
        if count > 1 && self.no_runs.load(Ordering::SeqCst) {
            return None;
        }
        self.inner.alloc(count)
    }
    fn free(&self, pfn: u64) {
        self.inner.free(pfn)
    }
    fn zero_pfn(&self) -> u64 {
        self.inner.zero_pfn()
    }
    fn read(&self, pfn: u64, offset: usize, out: &mut [u8]) {
        self.inner.read(pfn, offset, out)
    }
    fn write(&self, pfn: u64, offset: usize, data: &[u8]) {
        self.inner.write(pfn, offset, data)
    }
    fn atomic_add_u64(&self, pfn: u64, offset: usize, v: u64) -> u64 {
        self.inner.atomic_add_u64(pfn, offset, v)
    }
}

/// A CPU fault on a 2 MiB device page with no free 2 MiB run of frames is
/// `Oom` and the page stays on the device, whole (it is never split into
/// 4 KiB pages); once a run is free the fault brings it back.
#[test]
fn a_2m_device_page_without_a_free_run_stays_on_the_device() {
    let frames = Arc::new(NoRuns::default());
    let mm = SimMm::with_frames(frames.clone());
    mm.mmap(BASE, PMD_SIZE, RW | VmFlags::HUGE).unwrap();
    mm.write(BASE + 5 * PG, &pattern(5, 1)).unwrap();
    let PageState::Huge { pfn, .. } = mm.cpu_state(BASE) else {
        panic!("no 2 MiB leaf");
    };
    let dev = FakeDev::new(0);
    dev_pagemap_register(&*mm, dev.owner, dev.clone()).unwrap();
    {
        let mmap = mmap_read_lock(&*mm);
        let sel = MigrateSelect::SYSTEM;
        let mut mig =
            migrate_vma_setup(&mmap, BASE, BASE + PMD_SIZE, sel, Some(dev.owner)).unwrap();
        for k in 0..HUGE_PAGES {
            let mut data = vec![0u8; PG as usize];
            mm.frame_source().read(pfn + k, 0, &mut data);
            dev.mem.lock().insert(k, data);
        }
        let owner = dev.owner;
        mig.set_dst(0, MigratePfn::Device { owner, vram_pfn: 0 });
        assert_eq!(mig.migrate_pages(), 1);
    }
    frames.no_runs.store(true, Ordering::SeqCst);
    assert_eq!(read_page(&mm, BASE + 5 * PG), Err(FaultError::Oom));
    assert!(matches!(
        mm.cpu_state(BASE + 5 * PG),
        PageState::DevicePrivate { huge: true, .. }
    ));
    assert_eq!(dev.to_ram.load(Ordering::SeqCst), 0);
    frames.no_runs.store(false, Ordering::SeqCst);
    assert_eq!(read_page(&mm, BASE + 5 * PG).unwrap(), pattern(5, 1));
    assert!(matches!(mm.cpu_state(BASE), PageState::Huge { .. }));
    assert_eq!((mm.device_pages(), dev.in_use()), (0, 0));
}
