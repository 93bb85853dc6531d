//! Hosting the Faultline GPU (`faultline-device`) in this VMM: its config
//! space on PCI bus 0, BAR0 on the MMIO bus, one KVM ioeventfd per doorbell
//! (so doorbell writes never exit to us), MSI through irqfds (`msi.rs`) and
//! the device crate's worker thread (`faultline_device::Worker`), which
//! waits on those ioeventfds.
//!
//! BAR placement: the guest is PVH firmware with no PCI enumeration of its
//! own, so the VMM plays SeaBIOS: at boot BAR0 is assigned at
//! `BAR0_BOOT_ADDR` in the 32-bit MMIO hole and memory decode and bus
//! mastering are enabled. The guest may size and move the BAR like on real
//! hardware; every change is followed here (`Bar0Mapping::update`).

use std::sync::{Arc, Mutex};

use faultline_abi::pci::BAR0_SIZE;
use faultline_device::sync::lock;
use faultline_device::{doorbell_offsets, Device, Worker};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::{Bus, BusDevice};
use crate::error::{Error, Result};
use crate::memory::{self, MMIO_HOLE_START};
use crate::msi::{KvmIrqRoutingOps, MsiRouter, SignalMsi};
use crate::pci::{Devfn, PciBus, PciFunction};

/// The device's lock (fair hand-over from its worker, `faultline_device::sync`).
pub type GpuLock = faultline_device::DeviceMutex<GuestMemoryMmap>;

/// 00:04.0, the slot QEMU's `-device` would commonly give a first add-on card.
pub const GPU_DEVICE: u8 = 4;
/// Where the VMM assigns BAR0: the bottom of the 32-bit MMIO hole.
pub const BAR0_BOOT_ADDR: u64 = MMIO_HOLE_START;
/// IOAPIC (0xfec00000), LAPIC / MSI window (0xfee00000), KVM's TSS and
/// identity-map pages (0xfffbc000..0xfffc0000) and the reset vector all live
/// in the top 20 MiB below 4 GiB: a BAR there would be shadowed by an
/// in-kernel device or clobber KVM's pages, so it is refused.
pub const PLATFORM_RESERVED: (u64, u64) = (0xfec0_0000, 0x1_0000_0000 - 0xfec0_0000);

const PCI_COMMAND: u64 = 0x04;
const PCI_BAR0: u64 = 0x10;
const PCI_BAR0_HI: u64 = 0x14;
const COMMAND_MEMORY: u16 = 1 << 1;
const COMMAND_BUS_MASTER: u16 = 1 << 2;

/// Doorbell ioeventfds, behind a trait so BAR moves are testable without KVM.
pub trait DoorbellEvents: Send {
    /// Number of doorbells (indices 0..count).
    fn count(&self) -> usize;
    /// BAR0 offset of doorbell `i`.
    fn offset(&self, i: usize) -> u64;
    fn register(&mut self, i: usize, addr: u64) -> std::result::Result<(), kvm_ioctls::Error>;
    fn unregister(&mut self, i: usize, addr: u64) -> std::result::Result<(), kvm_ioctls::Error>;
}

/// One KVM ioeventfd without datamatch per doorbell (the ABI says the
/// written value is ignored). kvm-ioctls derives the length from the
/// datamatch type, so `NoDatamatch` registers length 0: any write size at
/// the doorbell address matches, which is what the ABI promises for plain
/// MMIO doorbell writes too.
pub struct KvmDoorbells {
    vm: Arc<VmFd>,
    /// (doorbell index, BAR0 offset, eventfd)
    events: Vec<(u32, u64, EventFd)>,
}

impl KvmDoorbells {
    pub fn new(vm: Arc<VmFd>) -> std::io::Result<Self> {
        let events = doorbell_offsets()
            .into_iter()
            .map(|(i, off)| Ok((i, off, EventFd::new(EFD_NONBLOCK)?)))
            .collect::<std::io::Result<_>>()?;
        Ok(Self { vm, events })
    }

    /// Duplicates of the eventfds for the worker, as (doorbell index, fd).
    /// KVM keeps its own reference to the same eventfd file, so the
    /// duplicates stay valid across re-registration at a new BAR address.
    pub fn worker_fds(&self) -> std::io::Result<Vec<(u32, EventFd)>> {
        self.events
            .iter()
            .map(|(i, _, e)| Ok((*i, e.try_clone()?)))
            .collect()
    }
}

impl DoorbellEvents for KvmDoorbells {
    fn count(&self) -> usize {
        self.events.len()
    }
    fn offset(&self, i: usize) -> u64 {
        self.events[i].1
    }
    fn register(&mut self, i: usize, addr: u64) -> std::result::Result<(), kvm_ioctls::Error> {
        self.vm
            .register_ioevent(&self.events[i].2, &IoEventAddress::Mmio(addr), NoDatamatch)
    }
    fn unregister(&mut self, i: usize, addr: u64) -> std::result::Result<(), kvm_ioctls::Error> {
        self.vm
            .unregister_ioevent(&self.events[i].2, &IoEventAddress::Mmio(addr), NoDatamatch)
    }
}

/// No ioeventfds at all (`--gpu-no-fastpath`): doorbell writes exit to the
/// VMM like any other BAR0 write and reach the worker through `Bar0::write`.
pub struct NoDoorbells;

impl DoorbellEvents for NoDoorbells {
    fn count(&self) -> usize {
        0
    }
    fn offset(&self, _i: usize) -> u64 {
        0
    }
    fn register(&mut self, _i: usize, _addr: u64) -> std::result::Result<(), kvm_ioctls::Error> {
        Ok(())
    }
    fn unregister(&mut self, _i: usize, _addr: u64) -> std::result::Result<(), kvm_ioctls::Error> {
        Ok(())
    }
}

/// BAR0 as seen on the MMIO bus: offsets into the 64 KiB register window.
pub struct Bar0 {
    pub device: Arc<GpuLock>,
}

impl BusDevice for Bar0 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.device).mmio_read(offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        // The device wakes its worker itself (`Device::set_waker`).
        lock(&self.device).mmio_write(offset, data);
    }
}

/// Keeps the MMIO bus range and the doorbell ioeventfds where the guest has
/// put BAR0 (or nowhere while decode is off or the address is unusable).
pub struct Bar0Mapping {
    mmio: Bus,
    bar: Arc<Mutex<dyn BusDevice>>,
    /// Guest-physical ranges (base, len) a BAR must not overlap: RAM and
    /// `PLATFORM_RESERVED`.
    reserved: Vec<(u64, u64)>,
    doorbells: Box<dyn DoorbellEvents>,
    /// Doorbells whose ioeventfd is registered at `mapped + offset`.
    registered: Vec<bool>,
    mapped: Option<u64>,
}

impl Bar0Mapping {
    pub fn new(
        mmio: Bus,
        bar: Arc<Mutex<dyn BusDevice>>,
        reserved: Vec<(u64, u64)>,
        doorbells: Box<dyn DoorbellEvents>,
    ) -> Self {
        let n = doorbells.count();
        Self {
            mmio,
            bar,
            reserved,
            doorbells,
            registered: vec![false; n],
            mapped: None,
        }
    }

    pub fn mapped(&self) -> Option<u64> {
        self.mapped
    }

    /// Why BAR0 cannot decode at `base`, if it cannot.
    fn unusable(&self, base: u64) -> Option<String> {
        let Some(end) = base.checked_add(BAR0_SIZE) else {
            return Some("wraps the address space".into());
        };
        self.reserved
            .iter()
            .find(|&&(b, len)| base < b.saturating_add(len) && b < end)
            .map(|(b, len)| format!("overlaps RAM or platform range {b:#x}+{len:#x}"))
    }

    /// Follow the guest's BAR0 programming: `want` is the decoded base
    /// (`Device::bar0_address`, None while memory decode is off). Returns
    /// the first ioeventfd registration error, if any: the doorbells then
    /// still work through ordinary MMIO exits, only slower.
    pub fn update(&mut self, want: Option<u64>) -> std::result::Result<(), kvm_ioctls::Error> {
        if want == self.mapped {
            return Ok(());
        }
        // Old addresses go first: KVM refuses a second ioeventfd on the same
        // address, and a doorbell must not fire at a range the BAR has left.
        let old = self.mapped.take();
        if let Some(old) = old {
            self.unregister_doorbells(old);
        }
        let target = want.filter(|&base| match self.unusable(base) {
            Some(why) => {
                log::warn!("GPU BAR0 at {base:#x} not mapped: {why}");
                false
            }
            None => true,
        });
        let placed = match (old, target) {
            (Some(old), Some(base)) => self.mmio.relocate(old, base).inspect_err(|_| {
                self.mmio.remove(old);
            }),
            (None, Some(base)) => self.mmio.insert(self.bar.clone(), base, BAR0_SIZE),
            (Some(old), None) => {
                self.mmio.remove(old);
                return Ok(());
            }
            (None, None) => return Ok(()),
        };
        let base = target.expect("placed only with a target");
        if let Err(e) = placed {
            log::warn!("GPU BAR0 at {base:#x} not mapped: {e}");
            return Ok(());
        }
        self.mapped = Some(base);
        let mut first_err = None;
        for i in 0..self.registered.len() {
            let addr = base + self.doorbells.offset(i);
            match self.doorbells.register(i, addr) {
                Ok(()) => self.registered[i] = true,
                Err(e) => {
                    log::warn!("doorbell {i} ioeventfd at {addr:#x}: {e}; it will exit instead");
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn unregister_doorbells(&mut self, base: u64) {
        for i in 0..self.registered.len() {
            if std::mem::take(&mut self.registered[i]) {
                let addr = base + self.doorbells.offset(i);
                if let Err(e) = self.doorbells.unregister(i, addr) {
                    log::warn!("removing doorbell {i} ioeventfd at {addr:#x}: {e}");
                }
            }
        }
    }
}

/// The GPU's PCI function: config space from the device, BAR0 changes
/// applied to the buses.
pub struct GpuPci {
    device: Arc<GpuLock>,
    bar: Bar0Mapping,
}

impl GpuPci {
    pub fn new(device: Arc<GpuLock>, bar: Bar0Mapping) -> Self {
        Self { device, bar }
    }

    /// What firmware would have done: BAR0 at `base`, memory decode and bus
    /// mastering on. Errors only if the doorbell ioeventfds cannot be
    /// registered (so a KVM without them is reported at startup).
    pub fn assign_bar0(&mut self, base: u64) -> std::result::Result<(), kvm_ioctls::Error> {
        let command = COMMAND_MEMORY | COMMAND_BUS_MASTER;
        self.write(PCI_BAR0, &(base as u32).to_le_bytes())?;
        self.write(PCI_BAR0_HI, &((base >> 32) as u32).to_le_bytes())?;
        self.write(PCI_COMMAND, &command.to_le_bytes())
    }

    pub fn bar0_mapped(&self) -> Option<u64> {
        self.bar.mapped()
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> std::result::Result<(), kvm_ioctls::Error> {
        // The device lock is dropped before the buses are touched: a vCPU
        // in the middle of a BAR0 access holds it while the remap needs the
        // MMIO map. Config writes are serialised by the 0xCF8/0xCFC lock.
        let want = {
            let mut d = lock(&self.device);
            d.config_write(offset, data);
            d.bar0_address()
        };
        self.bar.update(want)
    }
}

impl PciFunction for GpuPci {
    fn config_read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.device).config_read(offset, data);
    }

    fn config_write(&mut self, offset: u64, data: &[u8]) {
        // Already logged per doorbell; the guest keeps a working (exiting)
        // doorbell path.
        let _ = self.write(offset, data);
    }
}

/// The GPU as wired into a VM: what the rest of the VMM still needs.
pub struct GpuHost {
    device: Arc<GpuLock>,
    worker: Worker,
}

impl GpuHost {
    /// Record the GPU's fault timeline (`--gpu-trace`) from now on.
    pub fn start_trace(&self) {
        lock(&self.device).start_trace(faultline_device::trace::DEFAULT_CAPACITY);
    }

    /// Stops the worker (vCPUs must be stopped already) and returns the
    /// device counters as (name, value), and the device.
    pub fn stop(self) -> (Vec<(String, u64)>, Arc<GpuLock>) {
        self.worker.shutdown();
        let counters = lock(&self.device).named_counters();
        (counters, self.device)
    }
}

/// Creates the GPU, puts it at 00:04.0 and assigns BAR0 at boot. Without
/// `fastpath`, doorbells are plain MMIO exits and MSIs `KVM_SIGNAL_MSI`
/// ioctls (a benchmark baseline and debugging aid).
pub fn attach(
    vm: &Arc<VmFd>,
    mem: &GuestMemoryMmap,
    ram_size: u64,
    sizing: faultline_device::Config,
    mmio: &Bus,
    pci: &mut PciBus,
    fastpath: bool,
) -> Result<GpuHost> {
    let irq: Arc<dyn faultline_device::InterruptSink> = if fastpath {
        Arc::new(MsiRouter::new(Box::new(KvmIrqRoutingOps(vm.clone())))?)
    } else {
        Arc::new(SignalMsi::new(vm.clone()))
    };
    let device = Device::with_config(mem.clone(), irq, sizing)?;
    let device = Arc::new(GpuLock::new(device));
    let (doorbells, doorbell_fds): (Box<dyn DoorbellEvents>, _) = if fastpath {
        let d = KvmDoorbells::new(vm.clone())
            .map_err(Error::io("creating the GPU doorbell eventfds"))?;
        let fds = d
            .worker_fds()
            .map_err(Error::io("duplicating the GPU doorbell eventfds"))?;
        (Box::new(d), fds)
    } else {
        (Box::new(NoDoorbells), Vec::new())
    };
    let mut reserved: Vec<(u64, u64)> = memory::ram_ranges(ram_size)
        .into_iter()
        .map(|(a, len)| (a.0, len))
        .collect();
    reserved.push(PLATFORM_RESERVED);
    let bar0 = Bar0 {
        device: device.clone(),
    };
    let bar = Bar0Mapping::new(
        mmio.clone(),
        Arc::new(Mutex::new(bar0)),
        reserved,
        doorbells,
    );
    let mut function = GpuPci::new(device.clone(), bar);
    function
        .assign_bar0(BAR0_BOOT_ADDR)
        .map_err(Error::kvm("registering the GPU doorbell ioeventfds"))?;
    if function.bar0_mapped() != Some(BAR0_BOOT_ADDR) {
        return Err(Error::GpuBar0(BAR0_BOOT_ADDR));
    }
    if !pci.add(gpu_devfn(), Arc::new(Mutex::new(function))) {
        return Err(Error::GpuSlot(GPU_DEVICE));
    }
    let worker = Worker::spawn(device.clone(), doorbell_fds)
        .map_err(Error::io("starting the GPU worker"))?;
    Ok(GpuHost { device, worker })
}

pub fn gpu_devfn() -> Devfn {
    Devfn::new(GPU_DEVICE, 0).expect("constant slot is in range")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::pci::PciConfigIo;
    use faultline_abi::{regs, DEVICE_MAGIC};
    use faultline_device::InterruptSink;
    use vm_memory::GuestAddress;

    pub struct NoIrq;
    impl InterruptSink for NoIrq {
        fn trigger(&self, _vector: u32) {}
    }

    /// Records ioeventfd (un)registrations; refuses a second registration
    /// of one address, as KVM does.
    #[derive(Clone, Default)]
    pub struct FakeDoorbells {
        pub log: Arc<Mutex<Vec<(bool, usize, u64)>>>,
        pub live: Arc<Mutex<Vec<u64>>>,
    }

    impl DoorbellEvents for FakeDoorbells {
        fn count(&self) -> usize {
            doorbell_offsets().len()
        }
        fn offset(&self, i: usize) -> u64 {
            doorbell_offsets()[i].1
        }
        fn register(&mut self, i: usize, addr: u64) -> std::result::Result<(), kvm_ioctls::Error> {
            let mut live = self.live.lock().unwrap();
            if live.contains(&addr) {
                return Err(kvm_ioctls::Error::new(libc::EEXIST));
            }
            live.push(addr);
            self.log.lock().unwrap().push((true, i, addr));
            Ok(())
        }
        fn unregister(
            &mut self,
            i: usize,
            addr: u64,
        ) -> std::result::Result<(), kvm_ioctls::Error> {
            let mut live = self.live.lock().unwrap();
            let Some(p) = live.iter().position(|&a| a == addr) else {
                return Err(kvm_ioctls::Error::new(libc::ENOENT));
            };
            live.remove(p);
            self.log.lock().unwrap().push((false, i, addr));
            Ok(())
        }
    }

    pub const RAM: u64 = 64 << 20;

    pub fn gpu() -> Arc<GpuLock> {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
        Arc::new(GpuLock::new(Device::new(mem, Arc::new(NoIrq))))
    }

    struct Rig {
        io: PciConfigIo,
        mmio: Bus,
        db: FakeDoorbells,
        pci: Arc<Mutex<GpuPci>>,
    }

    fn rig() -> Rig {
        let dev = gpu();
        let mmio = Bus::new();
        let db = FakeDoorbells::default();
        let reserved = vec![(0, RAM), PLATFORM_RESERVED];
        let bar = Bar0Mapping::new(
            mmio.clone(),
            Arc::new(Mutex::new(Bar0 {
                device: dev.clone(),
            })),
            reserved,
            Box::new(db.clone()),
        );
        let pci = Arc::new(Mutex::new(GpuPci::new(dev, bar)));
        let mut bus = PciBus::new();
        assert!(bus.add(gpu_devfn(), pci.clone()));
        Rig {
            io: PciConfigIo::new(bus),
            mmio,
            db,
            pci,
        }
    }

    fn select(io: &mut PciConfigIo, reg: u8) {
        let a = 0x8000_0000u32 | (u32::from(GPU_DEVICE) << 11) | u32::from(reg);
        io.write(0, &a.to_le_bytes());
    }

    fn cfg_read(io: &mut PciConfigIo, reg: u8) -> u32 {
        select(io, reg);
        let mut d = [0u8; 4];
        io.read(4, &mut d);
        u32::from_le_bytes(d)
    }

    fn cfg_write(io: &mut PciConfigIo, reg: u8, v: u32) {
        select(io, reg);
        io.write(4, &v.to_le_bytes());
    }

    fn magic_at(mmio: &Bus, base: u64) -> Option<u32> {
        let mut d = [0u8; 4];
        mmio.read(base + regs::MAGIC, &mut d)
            .then(|| u32::from_le_bytes(d))
    }

    #[test]
    fn identity_and_bar_sizing_through_cf8() {
        let mut r = rig();
        assert_eq!(cfg_read(&mut r.io, 0x00), 0x0001_fa17);
        assert_eq!(cfg_read(&mut r.io, 0x08) >> 8, 0x03_0200);
        assert_eq!(cfg_read(&mut r.io, 0x34) & 0xff, 0x40, "MSI capability");
        // Sizing: all ones reads back the 64 KiB mask with the 64-bit flag.
        cfg_write(&mut r.io, 0x10, u32::MAX);
        cfg_write(&mut r.io, 0x14, u32::MAX);
        assert_eq!(cfg_read(&mut r.io, 0x10), 0xffff_0004);
        assert_eq!(cfg_read(&mut r.io, 0x14), u32::MAX);
        // Decode is off: nothing is mapped during or after sizing.
        assert!(!r.mmio.read(0xffff_0000, &mut [0; 4]));
        assert!(r.db.live.lock().unwrap().is_empty());
    }

    #[test]
    fn boot_assignment_maps_bar_and_doorbells() {
        let r = rig();
        r.pci.lock().unwrap().assign_bar0(BAR0_BOOT_ADDR).unwrap();
        assert_eq!(magic_at(&r.mmio, BAR0_BOOT_ADDR), Some(DEVICE_MAGIC));
        let live = r.db.live.lock().unwrap().clone();
        let want: Vec<u64> = doorbell_offsets()
            .iter()
            .map(|(_, off)| BAR0_BOOT_ADDR + off)
            .collect();
        assert_eq!(live, want);
    }

    #[test]
    fn moving_the_bar_moves_range_and_ioeventfds() {
        let mut r = rig();
        r.pci.lock().unwrap().assign_bar0(BAR0_BOOT_ADDR).unwrap();
        r.db.log.lock().unwrap().clear();
        let new = 0xd000_0000u64;
        cfg_write(&mut r.io, 0x10, new as u32);
        assert_eq!(magic_at(&r.mmio, BAR0_BOOT_ADDR), None, "old range gone");
        assert_eq!(magic_at(&r.mmio, new), Some(DEVICE_MAGIC));
        let log = r.db.log.lock().unwrap().clone();
        let n = doorbell_offsets().len();
        assert_eq!(log.len(), 2 * n);
        assert!(log[..n]
            .iter()
            .all(|&(reg, _, a)| !reg && (BAR0_BOOT_ADDR..BAR0_BOOT_ADDR + BAR0_SIZE).contains(&a)));
        assert!(log[n..]
            .iter()
            .all(|&(reg, _, a)| reg && (new..new + BAR0_SIZE).contains(&a)));

        // Decode off: unmapped everywhere; on again: back at the same place.
        let cmd = cfg_read(&mut r.io, 0x04) & 0xffff;
        cfg_write(&mut r.io, 0x04, cmd & !2);
        assert_eq!(magic_at(&r.mmio, new), None);
        assert!(r.db.live.lock().unwrap().is_empty());
        cfg_write(&mut r.io, 0x04, cmd);
        assert_eq!(magic_at(&r.mmio, new), Some(DEVICE_MAGIC));

        // A 64-bit move above 4 GiB.
        cfg_write(&mut r.io, 0x14, 0x10);
        assert_eq!(r.pci.lock().unwrap().bar0_mapped(), Some(0x10_d000_0000));
        assert_eq!(magic_at(&r.mmio, 0x10_d000_0000), Some(DEVICE_MAGIC));
    }

    #[test]
    fn bar_over_ram_or_platform_is_not_mapped() {
        let mut r = rig();
        r.pci.lock().unwrap().assign_bar0(BAR0_BOOT_ADDR).unwrap();
        for bad in [0x10_0000u64, 0xfee0_0000, 0xfffb_0000] {
            cfg_write(&mut r.io, 0x10, bad as u32);
            assert_eq!(r.pci.lock().unwrap().bar0_mapped(), None, "{bad:#x}");
            assert!(r.db.live.lock().unwrap().is_empty());
        }
        cfg_write(&mut r.io, 0x10, 0xe000_0000);
        assert_eq!(magic_at(&r.mmio, 0xe000_0000), Some(DEVICE_MAGIC));
    }

    #[test]
    fn hostile_config_writes_never_panic_or_leak_mappings() {
        let mut r = rig();
        r.pci.lock().unwrap().assign_bar0(BAR0_BOOT_ADDR).unwrap();
        // A deterministic xorshift stream over every offset and size,
        // including the MSI capability and the sizing patterns.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let reg = (x & 0xfc) as u8;
            let v = match (x >> 8) & 3 {
                0 => u32::MAX,
                1 => 0,
                _ => (x >> 32) as u32,
            };
            select(&mut r.io, reg);
            let port = 4 + ((x >> 12) & 3);
            let size = [1usize, 2, 4][((x >> 16) % 3) as usize];
            r.io.write(port, &v.to_le_bytes()[..size]);
            let mapped = r.pci.lock().unwrap().bar0_mapped();
            let live = r.db.live.lock().unwrap().len();
            match mapped {
                Some(b) => {
                    assert!(b >= RAM && b.checked_add(BAR0_SIZE).is_some());
                    assert_eq!(live, doorbell_offsets().len());
                }
                None => assert_eq!(live, 0),
            }
        }
    }
}
