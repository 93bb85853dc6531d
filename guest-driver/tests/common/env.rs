//! The SVM suite's environment in the host loopback: simulated processes
//! (`SimMm`) whose frames are carved out of the device's guest memory.

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use faultline_abi::{CpuDevicePrivate, CpuRoot};
use faultline_device::check::{CheckMode, CpuLookup, CpuTables};

use faultline_device::sync::lock;
use faultline_driver::errno::Errno;
use faultline_driver::gpu::suite::{Prot, Segv, SvmEnv};
use faultline_driver::gpu::{FaultPolicy, Gpu, GpuConfig};
use faultline_driver::mm::{Mremap, PageState, VmFlags, PAGE_SIZE as PAGE, PMD_SIZE};
use faultline_driver::sim::{FrameSource, SimMm};

use super::loopback::Loopback;

#[derive(Default)]
struct Tracking {
    canary: Option<u64>,
    held: Vec<u64>,
    recorded: Vec<u64>,
}

/// Process frames from the loopback's guest memory.
pub struct LoopFrames {
    lb: Arc<Loopback>,
    zero: u64,
    track: Mutex<Tracking>,
}

impl LoopFrames {
    fn new(lb: Arc<Loopback>) -> Self {
        let zero = lock(&lb.frames).alloc(1, 1).expect("zero page");
        lb.write_phys(zero, &[0; PAGE as usize]);
        LoopFrames {
            lb,
            zero: zero / PAGE,
            track: Mutex::new(Tracking::default()),
        }
    }

    fn tracking(&self) -> std::sync::MutexGuard<'_, Tracking> {
        lock(&self.track)
    }
}

impl FrameSource for LoopFrames {
    fn alloc(&self, count: u64) -> Option<u64> {
        let pa = lock(&self.lb.frames).alloc(count, count)?;
        self.lb.write_phys(pa, &vec![0u8; (count * PAGE) as usize]);
        Some(pa / PAGE)
    }

    fn free(&self, pfn: u64) {
        let pa = pfn * PAGE;
        let mut t = self.tracking();
        if let Some(c) = t.canary {
            let page: Vec<u8> = (0..PAGE / 8).flat_map(|_| c.to_le_bytes()).collect();
            self.lb.write_phys(pa, &page);
            t.held.push(pa);
            t.recorded.push(pa);
            return;
        }
        drop(t);
        lock(&self.lb.frames).free(pa, 1);
    }

    fn zero_pfn(&self) -> u64 {
        self.zero
    }

    fn read(&self, pfn: u64, offset: usize, out: &mut [u8]) {
        self.lb.read_phys(pfn * PAGE + offset as u64, out);
    }

    fn write(&self, pfn: u64, offset: usize, data: &[u8]) {
        assert_ne!(pfn, self.zero, "CPU write to the zero page");
        self.lb.write_phys(pfn * PAGE + offset as u64, data);
    }

    fn atomic_add_u64(&self, pfn: u64, offset: usize, v: u64) -> u64 {
        let p = self.lb.host_ptr(pfn * PAGE + offset as u64).cast::<u64>();
        // SAFETY: an aligned u64 inside guest memory, which stays mapped for
        // the loopback's lifetime; the device accesses it atomically too.
        let a = unsafe { AtomicU64::from_ptr(p) };
        a.fetch_add(v, Ordering::SeqCst)
    }
}

/// The coherence checker's view of the simulated processes: a context's
/// `cpu_root` names a [`SimMm`] by id (`SimMm::id`), looked up under its
/// page-table lock alone (`SimMm::cpu_translation`), since the device checks
/// while a munmap holding the mmap lock waits for it.
#[derive(Default)]
pub struct SimTables {
    mms: Mutex<HashMap<u32, Weak<SimMm>>>,
}

impl SimTables {
    fn add(&self, mm: &Arc<SimMm>) {
        let mut mms = lock(&self.mms);
        mms.retain(|_, m| m.strong_count() > 0);
        mms.insert(mm.id(), Arc::downgrade(mm));
    }
}

impl CpuTables for SimTables {
    fn lookup(&self, root: CpuRoot, va: u64) -> CpuLookup {
        let id = (root.root() / PAGE) as u32;
        let mm = lock(&self.mms).get(&id).and_then(Weak::upgrade);
        let Some(mm) = mm else {
            return CpuLookup::NotMapped { pte: 0 };
        };
        match mm.cpu_translation(va) {
            Ok((pfn, writable)) => CpuLookup::Mapped {
                frame: pfn * PAGE,
                writable,
                user: true,
                pte: (pfn * PAGE) | (u64::from(writable) << 1) | 1,
            },
            Err(PageState::DevicePrivate {
                owner,
                vram_pfn,
                writable,
                huge,
            }) => {
                // A 2 MiB device page: the 4 KiB page of `va` in it.
                let page = if huge { (va % PMD_SIZE) / PAGE } else { 0 };
                let entry = CpuDevicePrivate {
                    owner: owner.get(),
                    vram: (vram_pfn + page) * PAGE,
                    writable,
                };
                CpuLookup::DevicePrivate {
                    vram: entry.vram,
                    writable,
                    pte: entry.encode().unwrap_or(0),
                }
            }
            Err(_) => CpuLookup::NotMapped { pte: 0 },
        }
    }
}

/// The loopback's checker mode: `FAULTLINE_LOOPBACK_CHECK` (off, warn,
/// fatal), fatal by default so every loopback test is also judged.
fn check_mode() -> CheckMode {
    match std::env::var("FAULTLINE_LOOPBACK_CHECK") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|e| panic!("FAULTLINE_LOOPBACK_CHECK: {e}")),
        Err(_) => CheckMode::Fatal,
    }
}

/// The loopback device's fault injection: `FAULTLINE_LOOPBACK_INJECT`, a
/// `--gpu-inject` spec (docs/testing.md "Fault injection"); none by default.
fn inject_spec() -> Option<faultline_device::InjectSpec> {
    let v = std::env::var("FAULTLINE_LOOPBACK_INJECT").ok()?;
    Some(
        v.parse()
            .unwrap_or_else(|e| panic!("FAULTLINE_LOOPBACK_INJECT: {e}")),
    )
}

/// `FAULTLINE_LOOPBACK_SVM=POLICY` (the guest's `svm=` syntax,
/// `faultline_driver::gpu::policy`): the fault-pipeline policy of every
/// `LoopEnv::new`; unset, the default one.
pub fn svm_policy() -> FaultPolicy {
    match std::env::var("FAULTLINE_LOOPBACK_SVM") {
        Ok(v) => FaultPolicy::parse(&v).unwrap_or_else(|e| panic!("FAULTLINE_LOOPBACK_SVM: {e}")),
        Err(_) => FaultPolicy::default(),
    }
}

pub struct LoopEnv {
    pub lb: Arc<Loopback>,
    pub gpu: Arc<Gpu<Loopback>>,
    pub frames: Arc<LoopFrames>,
    tables: Arc<SimTables>,
    next_va: AtomicU64,
    capacity: u64,
    pub large: u64,
}

impl LoopEnv {
    /// A device and driver with fault injection and the fault-pipeline
    /// policy from the environment (`FAULTLINE_LOOPBACK_INJECT`,
    /// `FAULTLINE_LOOPBACK_SVM`; `cfg.policy` is replaced).
    pub fn new(mem_mib: u64, cfg: GpuConfig) -> Self {
        let cfg = GpuConfig {
            policy: svm_policy(),
            ..cfg
        };
        Self::with_inject(mem_mib, cfg, inject_spec())
    }

    /// `new` with the device's fault injection given (not taken from the
    /// environment).
    pub fn with_inject(
        mem_mib: u64,
        cfg: GpuConfig,
        inject: Option<faultline_device::InjectSpec>,
    ) -> Self {
        let cfg_dev = faultline_device::Config {
            inject,
            ..faultline_device::Config::default()
        };
        let lb = Loopback::with_config(mem_mib, cfg_dev);
        let tables = Arc::new(SimTables::default());
        lb.set_checker(check_mode(), tables.clone());
        let gpu = Gpu::probe(lb.clone(), cfg).unwrap_or_else(|e| panic!("probe: {e}"));
        let frames = Arc::new(LoopFrames::new(lb.clone()));
        LoopEnv {
            lb,
            gpu,
            frames,
            tables,
            next_va: AtomicU64::new(0x10_0000_0000),
            capacity: mem_mib << 8,
            large: 256 << 20,
        }
    }
}

impl LoopEnv {
    /// A mapping of `flags` at `hint`, or (0) at an address of its own.
    fn map(&self, p: &SimMm, hint: u64, len: u64, flags: VmFlags) -> Result<u64, Errno> {
        let addr = if hint != 0 {
            hint
        } else {
            // Distinct addresses per mapping, 2 MiB apart and aligned.
            let span = len.next_multiple_of(PMD_SIZE) + PMD_SIZE;
            self.next_va.fetch_add(span, Ordering::Relaxed)
        };
        p.mmap(addr, len, flags)?;
        Ok(addr)
    }
}

fn vm_flags(prot: Prot, huge: bool) -> VmFlags {
    let mut f = VmFlags::empty();
    if prot.contains(Prot::READ) || prot.contains(Prot::WRITE) {
        f |= VmFlags::READ;
    }
    if prot.contains(Prot::WRITE) {
        f |= VmFlags::WRITE;
    }
    if huge {
        f |= VmFlags::HUGE;
    }
    f
}

impl SvmEnv for LoopEnv {
    type P = Loopback;
    type M = SimMm;
    type Process = Arc<SimMm>;

    fn gpu(&self) -> &Arc<Gpu<Loopback>> {
        &self.gpu
    }

    fn spawn(&self) -> Result<Arc<SimMm>, String> {
        let mm = SimMm::with_frames(self.frames.clone());
        self.tables.add(&mm);
        Ok(mm)
    }

    fn mm(&self, p: &Arc<SimMm>) -> Arc<SimMm> {
        p.clone()
    }

    fn exit(&self, p: Arc<SimMm>) {
        p.exit();
    }

    fn fork(&self, p: &Arc<SimMm>) -> Result<Arc<SimMm>, String> {
        let child = p.fork().map_err(|e| format!("fork: {e:?}"))?;
        self.tables.add(&child);
        Ok(child)
    }

    fn mmap(
        &self,
        p: &Arc<SimMm>,
        hint: u64,
        len: u64,
        prot: Prot,
        huge: bool,
    ) -> Result<u64, Errno> {
        self.map(p, hint, len, vm_flags(prot, huge))
    }

    fn mmap_shared(&self, p: &Arc<SimMm>, hint: u64, len: u64, prot: Prot) -> Result<u64, Errno> {
        self.map(p, hint, len, vm_flags(prot, false) | VmFlags::SHARED)
    }

    fn munmap(&self, p: &Arc<SimMm>, addr: u64, len: u64) -> Result<(), Errno> {
        p.munmap(addr, len)
    }

    fn mprotect(&self, p: &Arc<SimMm>, addr: u64, len: u64, prot: Prot) -> Result<(), Errno> {
        p.mprotect(addr, len, vm_flags(prot, false))
    }

    fn mremap(&self, p: &Arc<SimMm>, args: Mremap) -> Result<u64, Errno> {
        p.mremap(args)
    }

    fn madvise_dontneed(&self, p: &Arc<SimMm>, addr: u64, len: u64) -> Result<(), Errno> {
        p.madvise_dontneed(addr, len)
    }

    fn mm_munmap(mm: &SimMm, addr: u64, len: u64) -> Result<(), Errno> {
        mm.munmap(addr, len)
    }

    fn mm_mprotect(mm: &SimMm, addr: u64, len: u64, prot: Prot) -> Result<(), Errno> {
        mm.mprotect(addr, len, vm_flags(prot, false))
    }

    fn read(&self, p: &Arc<SimMm>, addr: u64, out: &mut [u8]) -> Result<(), Segv> {
        p.read(addr, out).map_err(|_| Segv)
    }

    fn write(&self, p: &Arc<SimMm>, addr: u64, data: &[u8]) -> Result<(), Segv> {
        p.write(addr, data).map_err(|_| Segv)
    }

    fn atomic_add_u64(&self, p: &Arc<SimMm>, addr: u64, v: u64) -> Result<u64, Segv> {
        p.atomic_add_u64(addr, v).map_err(|_| Segv)
    }

    fn cpu_phys(&self, p: &Arc<SimMm>, addr: u64) -> Option<u64> {
        p.cpu_pfn(addr).map(|(pfn, _)| pfn * PAGE + addr % PAGE)
    }

    fn free_frames(&self) -> u64 {
        self.capacity - self.lb.frames_in_use()
    }

    fn track_freed(&self, canary: Option<u64>) {
        let held = {
            let mut t = self.frames.tracking();
            t.canary = canary;
            if canary.is_some() {
                return;
            }
            t.recorded.clear();
            std::mem::take(&mut t.held)
        };
        let mut a = lock(&self.lb.frames);
        for pa in held {
            a.free(pa, 1);
        }
    }

    fn take_freed(&self) -> Vec<u64> {
        std::mem::take(&mut self.frames.tracking().recorded)
    }

    fn read_phys(&self, pa: u64, out: &mut [u8]) {
        self.lb.read_phys(pa, out);
    }

    fn large_bytes(&self) -> u64 {
        self.large
    }
}
