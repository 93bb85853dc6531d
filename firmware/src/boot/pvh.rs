//! `hvm_start_info` (Xen public/arch-x86/hvm/start_info.h), as written by QEMU,
//! cloud-hypervisor and our VMM.
//!
//! All pointers in it are physical. We read them through the boot identity
//! map, so anything above 4 GiB is rejected rather than dereferenced.

use core::cell::UnsafeCell;
use core::mem::{size_of, MaybeUninit};

const START_INFO_MAGIC: u32 = 0x336e_c578;
const IDENTITY_LIMIT: u64 = 4 << 30;
/// Bound on the command line scan: a missing NUL must not run through RAM.
const CMDLINE_MAX: usize = 4096;
/// Entries beyond this are dropped with a warning (QEMU produces < 10,
/// faultline 4). Small on purpose: `BootInfo` is zeroed and moved at
/// boot, ~1 µs per qword under an instruction-emulating hypervisor.
pub const MEMMAP_MAX: usize = 32;
/// Reserved ranges the frame allocator must skip (start_info, cmdline, ...).
pub const RESERVED_MAX: usize = 16;

pub const E820_RAM: u32 = 1;

#[repr(C)]
#[derive(Clone, Copy)]
struct StartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    // Version 1 and later.
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct RawMemmapEntry {
    addr: u64,
    size: u64,
    kind: u32,
    reserved: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct RawModlistEntry {
    paddr: u64,
    size: u64,
    cmdline_paddr: u64,
    reserved: u64,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct MemmapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

impl MemmapEntry {
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }
}

/// Where `BootInfo::parse` copies the memory map and the loader-owned
/// ranges: a static, so the `BootInfo` it returns is small to zero and to
/// move (~1 µs a qword under an instruction-emulating hypervisor). Matched
/// by name into layout.ld's `.stacks`, which is not zeroed: only slots
/// `parse` wrote are read.
struct MemmapSlots(UnsafeCell<MaybeUninit<Slots>>);

#[repr(C)]
struct Slots {
    memmap: [MemmapEntry; MEMMAP_MAX],
    reserved: [(u64, u64); RESERVED_MAX],
}

// SAFETY: written once, by `BootInfo::parse` at boot, then only read.
unsafe impl Sync for MemmapSlots {}

static MEMMAP_SLOTS: MemmapSlots = MemmapSlots(UnsafeCell::new(MaybeUninit::uninit()));

/// Everything the rest of the firmware needs from the loader, copied out so
/// it no longer depends on loader memory layout.
pub struct BootInfo {
    pub start_info_paddr: u64,
    /// Sorted by address; zero-size entries dropped. In `MEMMAP_SLOTS`.
    memmap: &'static [MemmapEntry],
    /// Entry count as reported by the loader (before dropping empty ones).
    pub memmap_reported: usize,
    pub cmdline: &'static str,
    pub rsdp_paddr: u64,
    /// `RESERVED_MAX` slots in `MEMMAP_SLOTS`, the first `reserved_len`
    /// written.
    reserved: *mut (u64, u64),
    reserved_len: usize,
}

#[derive(Debug)]
pub enum PvhError {
    BadMagic(u32),
    NoMemmap(u32),
    AboveIdentityMap(&'static str, u64),
    EmptyMemmap,
}

impl core::fmt::Display for PvhError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            PvhError::BadMagic(m) => write!(
                f,
                "hvm_start_info magic {m:#x}, expected {START_INFO_MAGIC:#x} (not booted via PVH?)"
            ),
            PvhError::NoMemmap(v) => write!(
                f,
                "hvm_start_info version {v} has no memory map (need >= 1)"
            ),
            PvhError::AboveIdentityMap(what, a) => {
                write!(f, "{what} at {a:#x} is above the 4 GiB boot identity map")
            }
            PvhError::EmptyMemmap => write!(f, "memory map has no RAM"),
        }
    }
}

fn check_low(what: &'static str, paddr: u64, len: u64) -> Result<(), PvhError> {
    match paddr.checked_add(len) {
        Some(end) if end <= IDENTITY_LIMIT => Ok(()),
        _ => Err(PvhError::AboveIdentityMap(what, paddr)),
    }
}

/// Reads a `T` at physical address `paddr` through the identity map.
///
/// # Safety
/// `paddr..paddr+size_of::<T>()` must be below 4 GiB and hold a valid `T`.
unsafe fn read_phys<T: Copy>(paddr: u64) -> T {
    // SAFETY: the caller checked the range is identity-mapped; loader data has
    // no alignment guarantee, hence read_unaligned.
    unsafe { core::ptr::read_unaligned(paddr as *const T) }
}

impl BootInfo {
    /// Parses and copies out the loader's data.
    ///
    /// # Safety
    /// Call once; `paddr` must be the value the PVH loader passed in EBX,
    /// and the boot identity map of the low 4 GiB must be active.
    pub unsafe fn parse(paddr: u64) -> Result<BootInfo, PvhError> {
        check_low("start_info", paddr, size_of::<StartInfo>() as u64)?;
        // SAFETY: range checked above; the loader placed a start_info there.
        let si: StartInfo = unsafe { read_phys(paddr) };
        if si.magic != START_INFO_MAGIC {
            return Err(PvhError::BadMagic(si.magic));
        }
        if si.version < 1 {
            return Err(PvhError::NoMemmap(si.version));
        }

        let slots = MEMMAP_SLOTS.0.get().cast::<Slots>();
        let mut info = BootInfo {
            start_info_paddr: paddr,
            memmap: &[],
            memmap_reported: si.memmap_entries as usize,
            cmdline: "",
            rsdp_paddr: si.rsdp_paddr,
            // SAFETY: a field of the static; no reference is made.
            reserved: unsafe { (&raw mut (*slots).reserved).cast() },
            reserved_len: 0,
        };
        info.reserve(paddr, size_of::<StartInfo>() as u64);

        let map_bytes = u64::from(si.memmap_entries) * size_of::<RawMemmapEntry>() as u64;
        check_low("memmap", si.memmap_paddr, map_bytes)?;
        info.reserve(si.memmap_paddr, map_bytes);
        // SAFETY: as above.
        let slots = unsafe { (&raw mut (*slots).memmap).cast::<MemmapEntry>() };
        let mut len = 0;
        for i in 0..si.memmap_entries as u64 {
            let at = si.memmap_paddr + i * size_of::<RawMemmapEntry>() as u64;
            // SAFETY: inside the memmap range checked above.
            let raw: RawMemmapEntry = unsafe { read_phys(at) };
            // qboot emits zero-size entries; they carry no information.
            if raw.size == 0 {
                continue;
            }
            if len == MEMMAP_MAX {
                log::warn!("pvh: memory map has more than {MEMMAP_MAX} entries, rest ignored");
                break;
            }
            let e = MemmapEntry {
                addr: raw.addr,
                size: raw.size,
                kind: raw.kind,
            };
            // SAFETY: slot `len` < MEMMAP_MAX; this call (the only one,
            // per the contract) is the slots' only user so far.
            unsafe { slots.add(len).write(e) };
            len += 1;
        }
        // SAFETY: the first `len` slots were written above; nothing else
        // ever writes them.
        let map: &'static mut [MemmapEntry] =
            unsafe { core::slice::from_raw_parts_mut(slots, len) };
        // Loaders do not promise order; insertion sort needs no allocator.
        for i in 1..map.len() {
            let mut j = i;
            while j > 0 && map[j - 1].addr > map[j].addr {
                map.swap(j - 1, j);
                j -= 1;
            }
        }
        info.memmap = map;
        if !info.memmap().iter().any(|e| e.kind == E820_RAM) {
            return Err(PvhError::EmptyMemmap);
        }

        if si.cmdline_paddr != 0 {
            check_low("cmdline", si.cmdline_paddr, 1)?;
            let limit = (IDENTITY_LIMIT - si.cmdline_paddr).min(CMDLINE_MAX as u64) as usize;
            // SAFETY: the whole scan stays below 4 GiB (limit) and the loader
            // put a NUL-terminated string here.
            let bytes =
                unsafe { core::slice::from_raw_parts(si.cmdline_paddr as *const u8, limit) };
            let len = bytes.iter().position(|&b| b == 0).unwrap_or_else(|| {
                log::warn!("pvh: cmdline not NUL-terminated within {limit} bytes, truncated");
                limit
            });
            info.reserve(si.cmdline_paddr, len as u64 + 1);
            info.cmdline = match core::str::from_utf8(&bytes[..len]) {
                Ok(s) => s,
                Err(e) => {
                    log::warn!(
                        "pvh: cmdline is not UTF-8 after byte {}, truncated",
                        e.valid_up_to()
                    );
                    // SAFETY: from_utf8 vouched for this prefix.
                    unsafe { core::str::from_utf8_unchecked(&bytes[..e.valid_up_to()]) }
                }
            };
        }

        if si.nr_modules != 0 {
            let list_bytes = u64::from(si.nr_modules) * size_of::<RawModlistEntry>() as u64;
            check_low("modlist", si.modlist_paddr, list_bytes)?;
            info.reserve(si.modlist_paddr, list_bytes);
            for i in 0..si.nr_modules as u64 {
                // SAFETY: inside the modlist range checked above.
                let m: RawModlistEntry = unsafe {
                    read_phys(si.modlist_paddr + i * size_of::<RawModlistEntry>() as u64)
                };
                info.reserve(m.paddr, m.size);
            }
        }
        Ok(info)
    }

    fn reserve(&mut self, start: u64, len: u64) {
        if len == 0 {
            return;
        }
        if self.reserved_len == RESERVED_MAX {
            // Dropping a reservation could hand loader data out as free memory.
            panic!("pvh: more than {RESERVED_MAX} loader-owned ranges");
        }
        // SAFETY: slot `reserved_len` < RESERVED_MAX of the static, which
        // only `parse` (once, contract) writes.
        unsafe {
            self.reserved
                .add(self.reserved_len)
                .write((start, start.saturating_add(len)))
        };
        self.reserved_len += 1;
    }

    pub fn memmap(&self) -> &[MemmapEntry] {
        self.memmap
    }

    /// Loader-owned physical ranges `[start, end)` that must never be allocated.
    pub fn reserved(&self) -> &[(u64, u64)] {
        // SAFETY: the slots `reserve` wrote, never written again.
        unsafe { core::slice::from_raw_parts(self.reserved, self.reserved_len) }
    }

    pub fn ram_bytes(&self) -> u64 {
        self.memmap()
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum()
    }
}
