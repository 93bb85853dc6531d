//! The Faultline GPU as the firmware sees it: found on PCI bus 0, BAR0
//! mapped uncached in the vmap window, MSI pointed at this CPU's IDT, and
//! the driver's [`Platform`] implemented on top (registers, DMA frames,
//! interrupts, the TSC clock). The device access itself is the driver's
//! (`faultline_driver::gpu`); nothing here knows the register semantics
//! beyond identifying the device.
//!
//! Probing happens once, on first use. Interrupts (IF) are enabled when the
//! GPU's MSI is: every vector that can then fire has a gate (GPU, wake-up,
//! spurious), the legacy PICs, the local APIC's LVT entries and the IOAPIC
//! pins (reset state) are masked, and the interrupt stubs take no lock.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use core::ptr::NonNull;
use core::sync::atomic::{compiler_fence, AtomicU8, Ordering};

use faultline_abi::pci as id;
use faultline_driver::gpu::{DmaRegion, Platform};
use x86_64::structures::paging::PageTableFlags as F;
use x86_64::{PhysAddr, VirtAddr};

use crate::arch::{apic, irq, paging, time};
use crate::mm::{direct_map, frames, vmap};
use crate::pci::{self, Bar, Function, Msi};
use crate::sync::Mutex;

/// The probed and configured device.
#[derive(Debug)]
pub struct Gpu {
    pub function: Function,
    pub bar: Bar,
    /// True when the firmware had to place BAR0 itself.
    pub bar_assigned_here: bool,
    pub msi: Msi,
    pub platform: FwPlatform,
}

/// Whether the GPU tests fail or skip when there is no GPU (`gpu=` on the
/// command line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Default: a missing GPU fails every GPU test.
    Required,
    /// A missing GPU skips the GPU tests (loudly).
    Optional,
}

static POLICY: AtomicU8 = AtomicU8::new(0);

pub fn set_policy(p: Policy) {
    POLICY.store(p as u8, Ordering::Relaxed);
}

pub fn policy() -> Policy {
    match POLICY.load(Ordering::Relaxed) {
        0 => Policy::Required,
        _ => Policy::Optional,
    }
}

/// Outcome of the one probe: the device, "not there", or set-up failure.
type Probed = Result<Option<&'static Gpu>, String>;
static PROBED: Mutex<Option<Probed>> = Mutex::new(None);

/// The GPU, probing and configuring it on the first call. `Ok(None)`: no
/// Faultline GPU on bus 0 (or no PCI at all).
pub fn get() -> Probed {
    PROBED.lock().get_or_insert_with(probe).clone()
}

fn find() -> Option<Function> {
    pci::functions().find(|f| {
        f.vendor_device() == (id::VENDOR_ID, id::DEVICE_ID)
            && f.class() == (id::CLASS_CODE, id::SUBCLASS, id::PROG_IF)
    })
}

fn probe() -> Probed {
    if !pci::present() {
        log::info!("gpu: no PCI configuration ports (mechanism #1)");
        return Ok(None);
    }
    let Some(f) = find() else {
        log::info!("gpu: no Faultline GPU on PCI bus 0");
        return Ok(None);
    };
    let err = |what: &str, e: pci::PciError| {
        format!("gpu at 00:{:02x}.{}: {what}: {}", f.device, f.function, e.0)
    };
    let mut bar = pci::probe_bar64(f, pci::BAR0).map_err(|e| err("BAR0", e))?;
    if bar.size < id::BAR0_SIZE || !bar.size.is_power_of_two() {
        return Err(format!(
            "gpu: BAR0 size {:#x}, expected {:#x}",
            bar.size,
            id::BAR0_SIZE
        ));
    }
    let assigned_here = bar.base == 0;
    if assigned_here {
        // Nobody (SeaBIOS, the VMM) placed it: find room in the PCI window.
        bar.base = pci::free_window(f, bar.size).ok_or("gpu: no free MMIO window for BAR0")?;
        pci::set_bar64(f, pci::BAR0, bar.base);
    }
    let cmd = f.read16(pci::COMMAND);
    f.write16(
        pci::COMMAND,
        cmd | pci::COMMAND_MEMORY | pci::COMMAND_BUS_MASTER,
    );
    let regs = map_uncached(bar.base, id::BAR0_SIZE)
        .map_err(|e| format!("gpu: mapping BAR0 at {:#x}: {e:?}", bar.base))?;
    irq::install();
    let msi = pci::enable_msi(f, apic::id(), irq::GPU_VECTOR_BASE, irq::GPU_VECTORS)
        .map_err(|e| err("MSI", e))?;
    x86_64::instructions::interrupts::enable();
    log::info!(
        "gpu: 00:{:02x}.{} BAR0 {:#x} (+{:#x}{}), MSI vectors {:#x}..+{}",
        f.device,
        f.function,
        bar.base,
        bar.size,
        if assigned_here {
            ", assigned by firmware"
        } else {
            ""
        },
        msi.first_vector,
        msi.vectors
    );
    Ok(Some(Box::leak(Box::new(Gpu {
        function: f,
        bar,
        bar_assigned_here: assigned_here,
        msi,
        platform: FwPlatform {
            regs: regs.as_u64(),
        },
    }))))
}

/// Maps `[phys, phys+len)` uncached (PCD|PWT: UC with the default PAT) and
/// non-executable in the vmap window.
fn map_uncached(phys: u64, len: u64) -> Result<VirtAddr, paging::MapError> {
    let pages = len.div_ceil(4096);
    let virt = vmap::reserve(pages);
    let flags = paging::kernel_data_flags() | F::NO_CACHE | F::WRITE_THROUGH;
    for i in 0..pages {
        // SAFETY: fresh vmap space nobody else uses; the target is the
        // device's BAR, which only this module hands out.
        unsafe {
            paging::map_4k(virt + i * 4096, PhysAddr::new(phys + i * 4096), flags)?;
        }
    }
    Ok(virt)
}

/// [`Platform`] on this machine: BAR0 through its uncached mapping, DMA
/// memory from the frame allocator reached through the direct map.
#[derive(Debug, Clone)]
pub struct FwPlatform {
    regs: u64,
}

impl FwPlatform {
    fn reg(&self, offset: u64) -> *mut u32 {
        assert!(
            offset.is_multiple_of(4) && offset < id::BAR0_SIZE,
            "BAR0 offset {offset:#x} out of range"
        );
        (self.regs + offset) as *mut u32
    }

    /// Where BAR0 is mapped (tests poke it with odd sizes).
    pub fn regs_virt(&self) -> u64 {
        self.regs
    }
}

impl Platform for FwPlatform {
    fn read32(&self, offset: u64) -> u32 {
        // SAFETY: inside the mapped, uncached 64 KiB BAR0 (checked by `reg`).
        unsafe { self.reg(offset).read_volatile() }
    }

    fn write32(&self, offset: u64, value: u32) {
        // DMA memory is written with volatile stores too; the fence keeps
        // the compiler from sinking them below the doorbell. The CPU keeps
        // UC stores after earlier WB stores on its own.
        compiler_fence(Ordering::SeqCst);
        // SAFETY: as in read32.
        unsafe { self.reg(offset).write_volatile(value) }
    }

    fn dma_alloc(&self, pages: usize) -> Option<DmaRegion> {
        if pages == 0 {
            return None;
        }
        let phys = frames::alloc_contiguous(pages as u64)?;
        let virt = direct_map::phys_to_virt(phys);
        let len = pages * 4096;
        // SAFETY: fresh frames of RAM, mapped writable by the direct map.
        unsafe { core::ptr::write_bytes(virt.as_mut_ptr::<u8>(), 0, len) };
        let ptr = NonNull::new(virt.as_mut_ptr::<u8>())?;
        // SAFETY: the frames are ours until dma_free; the direct map reaches
        // exactly the bytes the device sees at `phys`.
        Some(unsafe { DmaRegion::new(phys.as_u64(), ptr, len) })
    }

    fn dma_free(&self, region: DmaRegion) {
        for i in 0..region.len() as u64 / 4096 {
            frames::free(PhysAddr::new(region.phys() + i * 4096));
        }
    }

    fn take_interrupts(&self) -> u32 {
        irq::take_pending()
    }

    /// `hlt` with IF briefly off for the check (no lost wake-up: `sti`
    /// takes effect after `hlt` starts), woken by the MSI or by a
    /// TSC-deadline timer at the timeout. `hlt` rather than a spin: the
    /// vCPU thread then sleeps in the host until the irqfd fires, which
    /// costs the 2 shared host cores nothing and is what a real driver
    /// does. Without the TSC-deadline timer it falls back to a `pause` spin.
    fn wait_interrupt(&self, timeout_ns: u64) {
        use x86_64::instructions::interrupts;
        let deadline = time::rdtsc().saturating_add(time::ns_to_ticks(timeout_ns));
        // The driver may wait inside an interrupt-safe lock (munmap's TLB
        // invalidation runs under the mm's IrqRwLock). Interrupts must be on
        // while halted or the MSI never wakes us; that is safe there because
        // the MSI stubs take no lock. On return the caller's IF is restored,
        // or the lock's "interrupts off" promise would silently end here.
        let was_enabled = interrupts::are_enabled();
        interrupts::disable();
        if !irq::any_pending() {
            if apic::tsc_deadline_supported() {
                apic::arm_tsc_deadline(irq::WAKE_VECTOR, deadline);
                interrupts::enable_and_hlt();
                apic::disarm_timer();
            } else {
                interrupts::enable();
                while !irq::any_pending() && time::rdtsc() < deadline {
                    core::hint::spin_loop();
                }
            }
        }
        if was_enabled {
            interrupts::enable();
        } else {
            interrupts::disable();
        }
    }

    fn now_ns(&self) -> u64 {
        time::now_ns()
    }

    // The raw TSC: now_ns's conversion costs ~15 µs of emulated guest
    // code per read, rdtsc ~4 µs.
    fn stats_ticks(&self) -> u64 {
        time::rdtsc()
    }

    fn stats_ticks_to_ns(&self, ticks: u64) -> u64 {
        time::ticks_to_ns(ticks)
    }

    fn trace_tsc(&self) -> Option<u64> {
        Some(time::rdtsc())
    }
}
