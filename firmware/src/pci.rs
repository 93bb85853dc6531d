//! PCI bus 0 through configuration mechanism #1 (ports 0xCF8/0xCFC): enough
//! to find the Faultline GPU, place and map its BAR0 and point its MSI
//! capability at this CPU.
//!
//! Machines without the ports (QEMU `-M microvm`) are detected by the
//! CONFIG_ADDRESS read-back and reported as "no PCI", not as an error.

use core::sync::atomic::{AtomicU8, Ordering};

use x86_64::instructions::port::Port;

use crate::sync::Mutex;

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;

pub const VENDOR_ID: u8 = 0x00;
pub const COMMAND: u8 = 0x04;
pub const STATUS: u8 = 0x06;
pub const CLASS_REV: u8 = 0x08;
pub const HEADER_TYPE: u8 = 0x0e;
pub const BAR0: u8 = 0x10;
pub const CAP_PTR: u8 = 0x34;

pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
const STATUS_CAP_LIST: u16 = 1 << 4;
const CAP_ID_MSI: u8 = 0x05;

const MSI_CTRL_ENABLE: u16 = 1 << 0;
const MSI_CTRL_64BIT: u16 = 1 << 7;
const MSI_CTRL_MASKABLE: u16 = 1 << 8;
/// The x86 MSI address window; destination APIC ID in bits 19:12, physical
/// destination mode, no redirection hint.
const MSI_ADDRESS_BASE: u32 = 0xfee0_0000;

/// BARs the firmware assigns go in [max(this, top of the memory map below
/// 4 GiB), `PCI_WINDOW_END`): above RAM, below the IOAPIC/LAPIC range.
const PCI_WINDOW_START: u64 = 0xc000_0000;
const PCI_WINDOW_END: u64 = 0xfec0_0000;

/// Serialises the CONFIG_ADDRESS/CONFIG_DATA pair.
static CONFIG: Mutex<()> = Mutex::new(());

/// A function on bus 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Function {
    pub device: u8,
    pub function: u8,
}

impl Function {
    fn address(self, offset: u8) -> u32 {
        0x8000_0000
            | (u32::from(self.device) << 11)
            | (u32::from(self.function) << 8)
            | u32::from(offset & 0xfc)
    }

    pub fn read32(self, offset: u8) -> u32 {
        let _g = CONFIG.lock();
        // SAFETY: mechanism #1 ports, serialised by CONFIG; a read of
        // CONFIG_DATA has no side effects on the functions we use.
        unsafe {
            Port::<u32>::new(CONFIG_ADDRESS).write(self.address(offset));
            Port::<u32>::new(CONFIG_DATA).read()
        }
    }

    pub fn write32(self, offset: u8, v: u32) {
        let _g = CONFIG.lock();
        // SAFETY: as in read32; the caller owns the function's config space.
        unsafe {
            Port::<u32>::new(CONFIG_ADDRESS).write(self.address(offset));
            Port::<u32>::new(CONFIG_DATA).write(v);
        }
    }

    pub fn read16(self, offset: u8) -> u16 {
        (self.read32(offset) >> ((offset & 2) * 8)) as u16
    }

    /// A real 16-bit access (no read-modify-write of the dword): STATUS,
    /// next to COMMAND, has write-1-to-clear bits.
    pub fn write16(self, offset: u8, v: u16) {
        let _g = CONFIG.lock();
        // SAFETY: as in write32.
        unsafe {
            Port::<u32>::new(CONFIG_ADDRESS).write(self.address(offset));
            Port::<u16>::new(CONFIG_DATA + u16::from(offset & 2)).write(v);
        }
    }

    pub fn read8(self, offset: u8) -> u8 {
        (self.read32(offset) >> ((offset & 3) * 8)) as u8
    }

    pub fn vendor_device(self) -> (u16, u16) {
        let v = self.read32(VENDOR_ID);
        (v as u16, (v >> 16) as u16)
    }

    /// (class, subclass, prog-if)
    pub fn class(self) -> (u8, u8, u8) {
        let v = self.read32(CLASS_REV);
        ((v >> 24) as u8, (v >> 16) as u8, (v >> 8) as u8)
    }

    /// Offset of the first capability with `id`, walking at most 48 entries
    /// (a looping list cannot hang us).
    pub fn find_capability(self, id: u8) -> Option<u8> {
        if self.read16(STATUS) & STATUS_CAP_LIST == 0 {
            return None;
        }
        let mut ptr = self.read8(CAP_PTR) & 0xfc;
        for _ in 0..48 {
            if ptr < 0x40 {
                return None;
            }
            let head = self.read16(ptr);
            if head as u8 == id {
                return Some(ptr);
            }
            ptr = (head >> 8) as u8 & 0xfc;
        }
        None
    }
}

/// 0: not probed yet, 1: mechanism #1 present, 2: absent.
static PRESENT: AtomicU8 = AtomicU8::new(0);

/// Whether configuration mechanism #1 answers: CONFIG_ADDRESS must read
/// back what was written (a missing port reads all ones or zero).
pub fn present() -> bool {
    match PRESENT.load(Ordering::Relaxed) {
        1 => return true,
        2 => return false,
        _ => {}
    }
    let ok = {
        let _g = CONFIG.lock();
        let mut port = Port::<u32>::new(CONFIG_ADDRESS);
        // SAFETY: on a machine with mechanism #1 this selects 00:00.0
        // register 0, harmless; without it the port is unclaimed.
        unsafe {
            let old = port.read();
            port.write(0x8000_0000);
            let back = port.read();
            port.write(old);
            back == 0x8000_0000
        }
    };
    PRESENT.store(if ok { 1 } else { 2 }, Ordering::Relaxed);
    ok
}

/// Every function on bus 0, in address order (empty without PCI).
pub fn functions() -> impl Iterator<Item = Function> {
    let devices = if present() { 0..32u8 } else { 0..0 };
    devices.flat_map(|device| {
        let f0 = Function {
            device,
            function: 0,
        };
        let exists = |f: &Function| !matches!(f.vendor_device().0, 0xffff | 0);
        let multi = exists(&f0) && f0.read8(HEADER_TYPE) & 0x80 != 0;
        let n = if multi { 8 } else { 1 };
        (0..n)
            .map(move |function| Function { device, function })
            .filter(exists)
    })
}

/// A 64-bit memory BAR: current base (0 = unassigned) and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bar {
    pub base: u64,
    pub size: u64,
}

/// What went wrong setting up a function; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciError(pub &'static str);

/// Sizes the 64-bit memory BAR at `offset` (memory decode off meanwhile,
/// restored afterwards), returning its base and size.
pub fn probe_bar64(f: Function, offset: u8) -> Result<Bar, PciError> {
    let lo = f.read32(offset);
    if lo & 1 != 0 || (lo >> 1) & 3 != 2 {
        return Err(PciError("BAR is not a 64-bit memory BAR"));
    }
    let hi = f.read32(offset + 4);
    let cmd = f.read16(COMMAND);
    f.write16(COMMAND, cmd & !COMMAND_MEMORY);
    f.write32(offset, u32::MAX);
    f.write32(offset + 4, u32::MAX);
    let mask = u64::from(f.read32(offset) & !0xf) | u64::from(f.read32(offset + 4)) << 32;
    f.write32(offset, lo);
    f.write32(offset + 4, hi);
    f.write16(COMMAND, cmd);
    if mask == 0 {
        return Err(PciError("BAR sizes to 0"));
    }
    Ok(Bar {
        base: u64::from(lo & !0xf) | u64::from(hi) << 32,
        size: (!mask).wrapping_add(1),
    })
}

/// Memory ranges decoded by the BARs of every function but `except`, as
/// far as they are assigned (sizing each one).
fn other_bars(except: Function) -> impl Iterator<Item = (u64, u64)> {
    functions()
        .filter(move |&f| f != except && f.read8(HEADER_TYPE) & 0x7f == 0)
        .flat_map(|f| {
            let mut out = [(0u64, 0u64); 6];
            let mut off = BAR0;
            let mut i = 0;
            while off < BAR0 + 24 {
                let lo = f.read32(off);
                let wide = lo & 1 == 0 && (lo >> 1) & 3 == 2;
                if lo & 1 == 0 {
                    if wide {
                        if let Ok(b) = probe_bar64(f, off) {
                            out[i] = (b.base, b.size);
                        }
                    } else {
                        let cmd = f.read16(COMMAND);
                        f.write16(COMMAND, cmd & !COMMAND_MEMORY);
                        f.write32(off, u32::MAX);
                        let size = (!(f.read32(off) & !0xf)).wrapping_add(1);
                        f.write32(off, lo);
                        f.write16(COMMAND, cmd);
                        out[i] = (u64::from(lo & !0xf), u64::from(size));
                    }
                }
                i += 1;
                off += if wide { 8 } else { 4 };
            }
            out.into_iter().filter(|&(b, s)| b != 0 && s != 0)
        })
}

/// A free, naturally aligned place for a BAR of `size` bytes in the 32-bit
/// PCI window, clear of the memory map and of every other assigned BAR.
pub fn free_window(f: Function, size: u64) -> Option<u64> {
    let start = PCI_WINDOW_START.max(crate::mm::low_top());
    let mut base = start.next_multiple_of(size);
    'next: while base + size <= PCI_WINDOW_END {
        for (b, s) in other_bars(f) {
            if base < b + s && b < base + size {
                base = (b + s).next_multiple_of(size);
                continue 'next;
            }
        }
        return Some(base);
    }
    None
}

/// Moves the 64-bit BAR at `offset` to `base` (decode off meanwhile).
pub fn set_bar64(f: Function, offset: u8, base: u64) {
    let cmd = f.read16(COMMAND);
    f.write16(COMMAND, cmd & !COMMAND_MEMORY);
    f.write32(offset, base as u32);
    f.write32(offset + 4, (base >> 32) as u32);
    f.write16(COMMAND, cmd);
}

/// MSI as programmed by [`enable_msi`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Msi {
    pub cap: u8,
    /// Vectors enabled (a power of two).
    pub vectors: u32,
    pub first_vector: u8,
}

/// Points the MSI capability at `apic_id` with message data `first_vector`
/// and enables up to `want` vectors (multiple-message: the device ORs the
/// vector index into the low data bits, so `first_vector` must be aligned
/// to the enabled count). Every vector is unmasked; INTx is disabled.
pub fn enable_msi(f: Function, apic_id: u32, first_vector: u8, want: u32) -> Result<Msi, PciError> {
    let cap = f
        .find_capability(CAP_ID_MSI)
        .ok_or(PciError("no MSI capability"))?;
    if apic_id > 0xff {
        return Err(PciError("APIC ID does not fit an MSI address"));
    }
    let ctrl = f.read16(cap + 2);
    let capable = 1u32 << ((ctrl >> 1) & 7).min(5);
    let vectors = capable.min(want.next_power_of_two()).max(1);
    if u32::from(first_vector) % vectors != 0 {
        return Err(PciError("MSI vector base not aligned to the vector count"));
    }
    let wide = ctrl & MSI_CTRL_64BIT != 0;
    // Disabled while reprogramming, so no message goes to a half-written
    // address.
    f.write16(cap + 2, ctrl & !MSI_CTRL_ENABLE);
    f.write32(cap + 4, MSI_ADDRESS_BASE | (apic_id << 12));
    let data_off = if wide {
        f.write32(cap + 8, 0);
        cap + 0xc
    } else {
        cap + 8
    };
    f.write16(data_off, u16::from(first_vector));
    if ctrl & MSI_CTRL_MASKABLE != 0 {
        f.write32(data_off + 4, 0);
    }
    let cmd = f.read16(COMMAND);
    f.write16(COMMAND, cmd | COMMAND_INTX_DISABLE);
    let mme = vectors.trailing_zeros() as u16;
    f.write16(cap + 2, (ctrl & !(7 << 4)) | (mme << 4) | MSI_CTRL_ENABLE);
    let back = f.read16(cap + 2);
    if back & MSI_CTRL_ENABLE == 0 || (back >> 4) & 7 != mme {
        return Err(PciError("MSI enable did not stick"));
    }
    Ok(Msi {
        cap,
        vectors,
        first_vector,
    })
}
