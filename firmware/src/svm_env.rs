//! The SVM suite's environment in the guest (`faultline_driver::gpu::suite::SvmEnv`):
//! real processes (`mm::process`), CPU accesses made in user mode by each
//! process's agent (`crate::user::agent`: a fault the address space cannot
//! resolve comes back as `Segv`; fills and checks cover a whole range per
//! call), frame accounting from the frame allocator, and the GPU through
//! the driver on the PCI device.

use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use faultline_driver::errno::Errno;
use faultline_driver::gpu::suite::{self, ChaseList, Mismatch, Pattern, Segv, SvmEnv};
use faultline_driver::gpu::Gpu;
use faultline_driver::mm::{Mremap, PageState, PAGE_SHIFT, PAGE_SIZE, PMD_SIZE};

use crate::gpu::FwPlatform;
use crate::mm::process::{self, freed, MapFlags, Process, ProcessMm, Segfault};
use crate::mm::{direct_map, frames};

/// One probed driver and everything else from the running firmware.
pub struct FwEnv {
    gpu: Arc<Gpu<FwPlatform>>,
    /// Where the next mapping without an address goes.
    next_va: AtomicU64,
}

/// Mappings the suite does not place go here and upwards.
const MMAP_BASE: u64 = crate::mm::USER_BASE + (1 << 30);

impl FwEnv {
    pub fn new(gpu: Arc<Gpu<FwPlatform>>) -> FwEnv {
        FwEnv {
            gpu,
            next_va: AtomicU64::new(MMAP_BASE),
        }
    }

    /// A mapping with `flags` at `hint` (FIXED), or (0) at a fresh address.
    fn map(
        &self,
        p: &Process,
        hint: u64,
        len: u64,
        pr: suite::Prot,
        mut flags: MapFlags,
    ) -> Result<u64, Errno> {
        let addr = if hint == 0 {
            // Never reuse an address within a test (the address space's own
            // choice would be the lowest gap): tests such as munmap_reuse
            // check that an unmapped range stays unmapped. 2 MiB aligned,
            // with a 2 MiB gap between mappings, as in the host loopback.
            let span = len.next_multiple_of(PMD_SIZE) + PMD_SIZE;
            self.next_va.fetch_add(span, Ordering::Relaxed)
        } else {
            flags |= MapFlags::FIXED;
            hint
        };
        p.mmap(Some(addr), len, prot(pr), flags)
    }
}

fn prot(p: suite::Prot) -> process::Prot {
    let mut out = process::Prot::empty();
    if p.contains(suite::Prot::READ) {
        out |= process::Prot::READ;
    }
    if p.contains(suite::Prot::WRITE) {
        out |= process::Prot::WRITE;
    }
    out
}

/// A segmentation fault becomes `Segv` (logged at debug level: several
/// tests expect one).
fn segv<R>(r: Result<R, Segfault>) -> Result<R, Segv> {
    r.map_err(|e| {
        log::debug!("svm env: {e}");
        Segv
    })
}

/// Polls per user-mode spin before the kernel runs the driver's bottom
/// half again (the GPU may be waiting for a fault to be serviced).
const SPIN_POLLS: u64 = 20_000;

impl SvmEnv for FwEnv {
    type P = FwPlatform;
    type M = ProcessMm;
    type Process = Process;

    fn gpu(&self) -> &Arc<Gpu<FwPlatform>> {
        &self.gpu
    }

    fn spawn(&self) -> Result<Process, String> {
        Process::new().map_err(|e| format!("process creation: {e:?}"))
    }

    fn mm(&self, p: &Process) -> Arc<ProcessMm> {
        p.mm().clone()
    }

    fn exit(&self, p: Process) {
        drop(p);
    }

    fn fork(&self, p: &Process) -> Result<Process, String> {
        p.fork().map_err(|e| format!("fork: {e:?}"))
    }

    fn mmap(
        &self,
        p: &Process,
        hint: u64,
        len: u64,
        pr: suite::Prot,
        huge: bool,
    ) -> Result<u64, Errno> {
        let flags = if huge {
            MapFlags::HUGE
        } else {
            MapFlags::empty()
        };
        self.map(p, hint, len, pr, flags)
    }

    fn mmap_shared(&self, p: &Process, hint: u64, len: u64, pr: suite::Prot) -> Result<u64, Errno> {
        self.map(p, hint, len, pr, MapFlags::SHARED)
    }

    fn munmap(&self, p: &Process, addr: u64, len: u64) -> Result<(), Errno> {
        p.munmap(addr, len)
    }

    fn mprotect(&self, p: &Process, addr: u64, len: u64, pr: suite::Prot) -> Result<(), Errno> {
        p.mprotect(addr, len, prot(pr))
    }

    fn mremap(&self, p: &Process, args: Mremap) -> Result<u64, Errno> {
        p.mremap(args)
    }

    fn madvise_dontneed(&self, p: &Process, addr: u64, len: u64) -> Result<(), Errno> {
        p.madvise_dontneed(addr, len)
    }

    fn mm_munmap(mm: &ProcessMm, addr: u64, len: u64) -> Result<(), Errno> {
        mm.munmap(addr, len)
    }

    fn mm_mprotect(mm: &ProcessMm, addr: u64, len: u64, pr: suite::Prot) -> Result<(), Errno> {
        mm.mprotect(addr, len, prot(pr))
    }

    fn read(&self, p: &Process, addr: u64, out: &mut [u8]) -> Result<(), Segv> {
        segv(p.agent().read_bytes(addr, out))
    }

    fn write(&self, p: &Process, addr: u64, data: &[u8]) -> Result<(), Segv> {
        segv(p.agent().write_bytes(addr, data))
    }

    fn atomic_add_u64(&self, p: &Process, addr: u64, v: u64) -> Result<u64, Segv> {
        segv(p.agent().atomic_add_u64(addr, v))
    }

    fn atomic_add_repeat(&self, p: &Process, addr: u64, v: u64, times: u64) -> Result<(), Segv> {
        if times == 0 {
            return Ok(());
        }
        segv(p.agent().atomic_add_repeat(addr, v, times)).map(|_| ())
    }

    fn fill_pattern(&self, p: &Process, addr: u64, len: u64, pat: Pattern) -> Result<(), Segv> {
        segv(p.agent().fill(addr, len, pat))
    }

    fn check_pattern(
        &self,
        p: &Process,
        addr: u64,
        len: u64,
        pat: Pattern,
    ) -> Result<Option<Mismatch>, Segv> {
        segv(p.agent().check(addr, len, pat))
    }

    fn build_list(&self, p: &Process, list: ChaseList) -> Result<(), Segv> {
        segv(p.agent().build_list(list))
    }

    fn wait_u64(&self, p: &Process, addr: u64, value: u64) -> Result<bool, Segv> {
        let deadline = crate::arch::time::now_ns() + self.gpu.config().timeout_ns;
        loop {
            if segv(p.agent().spin_until(addr, value, SPIN_POLLS))?.is_none() {
                return Ok(true);
            }
            if crate::arch::time::now_ns() > deadline {
                return Ok(false);
            }
            self.gpu.poll(true);
        }
    }

    fn cpu_phys(&self, p: &Process, addr: u64) -> Option<u64> {
        match p.translate(addr).state {
            PageState::Present { pfn, .. } | PageState::Zero { pfn } => {
                Some((pfn << PAGE_SHIFT) + addr % PAGE_SIZE)
            }
            PageState::Huge { pfn, .. } => Some((pfn << PAGE_SHIFT) + addr % PMD_SIZE),
            PageState::None
            | PageState::Special
            | PageState::DevicePrivate { .. }
            | PageState::Migration
            | PageState::Exclusive { .. } => None,
        }
    }

    fn free_frames(&self) -> u64 {
        frames::stats().free
    }

    fn track_freed(&self, canary: Option<u64>) {
        freed::track(canary);
    }

    fn take_freed(&self) -> Vec<u64> {
        freed::take()
    }

    fn read_phys(&self, pa: u64, out: &mut [u8]) {
        let src = direct_map::phys_to_virt(x86_64::PhysAddr::new(pa));
        // SAFETY: the direct map covers all RAM; the suite reads frames it
        // got from `take_freed` (held back, so nobody frees them under us).
        unsafe { core::ptr::copy_nonoverlapping(src.as_ptr::<u8>(), out.as_mut_ptr(), out.len()) }
    }
}
