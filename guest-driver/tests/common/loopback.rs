//! A [`Platform`] over the real device model in this process: guest memory
//! is a `GuestMemoryMmap`, the device runs on its own worker thread (as in
//! the VMM), MSI vectors land in a pending mask, and DMA memory and process
//! frames are carved from the same guest memory.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use faultline_abi::{doorbell, regs, PAGE_SIZE as PAGE};
use faultline_device::check::{CheckMode, CpuTables};
use faultline_device::sync::{lock, unpoisoned};
use faultline_device::{Device, DeviceMutex, InterruptSink, Waker, Worker};
use faultline_driver::gpu::{DmaRegion, Platform};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// MSI delivery: a pending mask plus a condvar to sleep on.
#[derive(Default)]
pub struct Irq {
    pending: AtomicU32,
    /// Threads asleep on `cv`.
    lock: Mutex<u32>,
    cv: Condvar,
    pub raised: AtomicU32,
}

impl InterruptSink for Irq {
    fn trigger(&self, vector: u32) {
        let sleepers = {
            // Set under the lock, so a waiter either sees the bit before
            // it sleeps or is asleep (and counted) when the notify comes.
            let g = lock(&self.lock);
            self.pending.fetch_or(1 << vector, Ordering::AcqRel);
            self.raised.fetch_add(1, Ordering::Relaxed);
            *g
        };
        // Notified with the lock released: a waiter woken while it is held
        // would only go back to sleep on the lock, one more wake-up per MSI.
        // None asleep (a waiter polling, `SPIN_NS`): no futex call.
        if sleepers > 0 {
            self.cv.notify_all();
        }
    }
}

/// First-fit allocator of 4 KiB frames over `[base, end)` of guest memory.
pub struct FrameAllocator {
    free: BTreeMap<u64, u64>,
    in_use: u64,
}

impl FrameAllocator {
    fn new(base: u64, end: u64) -> Self {
        let mut free = BTreeMap::new();
        free.insert(base, end - base);
        FrameAllocator { free, in_use: 0 }
    }

    /// `pages` contiguous frames aligned to `align` pages.
    pub fn alloc(&mut self, pages: u64, align: u64) -> Option<u64> {
        let (bytes, align) = (pages * PAGE, align * PAGE);
        let (&start, &len) = self.free.iter().find(|(&s, &l)| {
            let a = s.next_multiple_of(align);
            a + bytes <= s + l
        })?;
        let a = start.next_multiple_of(align);
        self.free.remove(&start);
        if a > start {
            self.free.insert(start, a - start);
        }
        if a + bytes < start + len {
            self.free.insert(a + bytes, start + len - a - bytes);
        }
        self.in_use += pages;
        Some(a)
    }

    pub fn free(&mut self, addr: u64, pages: u64) {
        let (mut start, mut len) = (addr, pages * PAGE);
        if let Some((&s, &l)) = self.free.range(..addr).next_back() {
            assert!(s + l <= addr, "double free of {addr:#x}");
            if s + l == addr {
                self.free.remove(&s);
                start = s;
                len += l;
            }
        }
        if let Some(&l) = self.free.get(&(addr + pages * PAGE)) {
            self.free.remove(&(addr + pages * PAGE));
            len += l;
        }
        self.free.insert(start, len);
        self.in_use -= pages;
    }

    pub fn in_use(&self) -> u64 {
        self.in_use
    }
}

pub struct Loopback {
    pub dev: Arc<DeviceMutex<GuestMemoryMmap>>,
    pub mem: GuestMemoryMmap,
    pub irq: Arc<Irq>,
    pub frames: Mutex<FrameAllocator>,
    worker: Mutex<Option<Worker>>,
    /// Doorbell writes go here, not through the device lock: the loopback's
    /// KVM ioeventfd (the guest's doorbell write never waits for a worker
    /// step in progress).
    waker: Waker,
    epoch: Instant,
}

/// How long `wait_interrupt` polls before it sleeps.
const SPIN_NS: u64 = 20_000;

/// Guest memory below this stays unused (as real firmware keeps low memory).
const RAM_BASE: u64 = 1 << 20;

impl Loopback {
    /// A device over `mem_mib` MiB of guest memory, MSI enabled with four
    /// vectors, the worker thread running.
    pub fn new(mem_mib: u64) -> Arc<Self> {
        Self::with_config(mem_mib, faultline_device::Config::default())
    }

    /// `new` for a device sized (and fault-injected) by `cfg`.
    pub fn with_config(mem_mib: u64, cfg: faultline_device::Config) -> Arc<Self> {
        let size = mem_mib << 20;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)])
            .unwrap_or_else(|e| panic!("guest memory: {e}"));
        let irq = Arc::new(Irq::default());
        let mut dev = Device::with_config(mem.clone(), irq.clone(), cfg)
            .unwrap_or_else(|e| panic!("device config: {e}"));
        // MSI: address, then enable with MME = 2 (four vectors).
        dev.config_write(0x44, &0xFEE0_0000u32.to_le_bytes());
        dev.config_write(0x42, &(1u16 | (2 << 4)).to_le_bytes());
        let dev = Arc::new(DeviceMutex::new(dev));
        let worker =
            Worker::spawn(dev.clone(), Vec::new()).unwrap_or_else(|e| panic!("worker: {e}"));
        Arc::new(Loopback {
            dev,
            mem,
            irq,
            frames: Mutex::new(FrameAllocator::new(RAM_BASE, size)),
            waker: worker.waker(),
            worker: Mutex::new(Some(worker)),
            epoch: Instant::now(),
        })
    }

    fn device(&self) -> parking_lot::MutexGuard<'_, Device<GuestMemoryMmap>> {
        lock(&self.dev)
    }

    /// Record the device's fault timeline (`--gpu-trace`) from now on; a
    /// driver probed after this writes its side too.
    pub fn start_trace(&self) {
        self.device().start_trace(1 << 16);
    }

    /// The fault timeline as `--gpu-trace` writes it (after `start_trace`).
    pub fn trace_json(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let wrote = self.device().write_trace(&mut out).expect("into memory");
        assert!(wrote, "start_trace first");
        out
    }

    /// Host pointer of guest-physical `pa`.
    pub fn host_ptr(&self, pa: u64) -> *mut u8 {
        self.mem
            .get_host_address(GuestAddress(pa))
            .unwrap_or_else(|e| panic!("gpa {pa:#x}: {e}"))
    }

    pub fn read_phys(&self, pa: u64, out: &mut [u8]) {
        self.mem
            .read_slice(out, GuestAddress(pa))
            .unwrap_or_else(|e| panic!("read {pa:#x}: {e}"));
    }

    pub fn write_phys(&self, pa: u64, data: &[u8]) {
        self.mem
            .write_slice(data, GuestAddress(pa))
            .unwrap_or_else(|e| panic!("write {pa:#x}: {e}"));
    }

    pub fn frames_in_use(&self) -> u64 {
        lock(&self.frames).in_use()
    }

    /// Sets the device's coherence checker, CPU tables from `tables`.
    pub fn set_checker(&self, mode: CheckMode, tables: Arc<dyn CpuTables>) {
        self.device().set_checker(mode, Some(tables));
    }

    /// Coherence violations the device counted over its life.
    pub fn coherence_violations(&self) -> u64 {
        self.device().coherence_violations()
    }

    /// Stops the worker (the device stays; no more processing).
    pub fn stop(&self) {
        if let Some(w) = lock(&self.worker).take() {
            w.shutdown();
        }
    }
}

impl Drop for Loopback {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Platform for Loopback {
    fn read32(&self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.device().mmio_read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn write32(&self, offset: u64, value: u32) {
        if (regs::DOORBELL_BASE..doorbell::offset(doorbell::COUNT)).contains(&offset)
            && offset.is_multiple_of(regs::DOORBELL_STRIDE)
        {
            // What `mmio_write` does for a doorbell (the value is ignored),
            // without waiting for the device lock.
            self.waker
                .ring(((offset - regs::DOORBELL_BASE) / regs::DOORBELL_STRIDE) as u32);
            return;
        }
        self.device().mmio_write(offset, &value.to_le_bytes());
    }

    fn dma_alloc(&self, pages: usize) -> Option<DmaRegion> {
        let pages = pages as u64;
        // Natural alignment up to 2 MiB so large identity maps can use
        // large leaves.
        let align = pages.next_power_of_two().min(512);
        let pa = lock(&self.frames).alloc(pages, align)?;
        let len = (pages * PAGE) as usize;
        self.mem
            .write_slice(&vec![0u8; len], GuestAddress(pa))
            .ok()?;
        let virt = NonNull::new(self.host_ptr(pa))?;
        // SAFETY: `pa..pa+len` lies in one mmapped guest-memory region that
        // lives as long as `self.mem` (which outlives every region: the
        // driver frees them through this platform), and the host pointer
        // reaches the bytes the device sees at `pa`.
        Some(unsafe { DmaRegion::new(pa, virt, len) })
    }

    fn dma_free(&self, region: DmaRegion) {
        lock(&self.frames).free(region.phys(), region.len() as u64 / PAGE);
    }

    fn take_interrupts(&self) -> u32 {
        self.irq.pending.swap(0, Ordering::AcqRel)
    }

    fn wait_interrupt(&self, timeout_ns: u64) {
        // Poll the pending mask a little before sleeping: the device
        // answers a doorbell within a few µs, and a sleep costs a wake-up
        // on top ("Loopback faults" in docs/performance.md). Yielding, not
        // spinning: on a loaded host the worker may need this CPU to
        // answer. Bounded, so a long wait polls for SPIN_NS per slice.
        let spin = Duration::from_nanos(timeout_ns.min(SPIN_NS));
        let t0 = Instant::now();
        while t0.elapsed() < spin {
            if self.irq.pending.load(Ordering::Acquire) != 0 {
                return;
            }
            std::thread::yield_now();
        }
        let mut g = lock(&self.irq.lock);
        if self.irq.pending.load(Ordering::Acquire) != 0 {
            return;
        }
        *g += 1;
        let (mut g, _) = unpoisoned(
            self.irq
                .cv
                .wait_timeout(g, Duration::from_nanos(timeout_ns)),
        );
        *g -= 1;
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn trace_tsc(&self) -> Option<u64> {
        Some(faultline_device::trace::host_tsc())
    }
}
