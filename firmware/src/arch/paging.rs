//! The kernel page tables, behind one lock, through the `x86_64` crate's
//! `OffsetPageTable`.
//!
//! Until the direct map exists the tables are reached through the identity
//! map (offset 0), which only covers 4 GiB; afterwards through the direct map.

use x86_64::registers::control::Cr3;
use x86_64::structures::paging::mapper::{MapToError, UnmapError};
use x86_64::structures::paging::{
    Mapper, OffsetPageTable, Page, PageSize, PageTable, PageTableFlags as F, PhysFrame, Size4KiB,
    Translate,
};
use x86_64::{PhysAddr, VirtAddr};

use crate::mm::frames::{self, PageTableFrames};
use crate::sync::Mutex;

const IDENTITY_LIMIT: u64 = 4 << 30;

struct Kernel {
    mapper: OffsetPageTable<'static>,
    /// Page-table frames must be reachable through the current offset.
    pt_limit: u64,
}

static KERNEL: Mutex<Option<Kernel>> = Mutex::new(None);
static NX: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

#[derive(Debug)]
pub enum MapError {
    OutOfFrames,
    AlreadyMapped,
    HugePageInTheWay,
    NotMapped,
}

impl<S: PageSize> From<MapToError<S>> for MapError {
    fn from(e: MapToError<S>) -> Self {
        match e {
            MapToError::FrameAllocationFailed => MapError::OutOfFrames,
            MapToError::PageAlreadyMapped(_) => MapError::AlreadyMapped,
            MapToError::ParentEntryHugePage => MapError::HugePageInTheWay,
        }
    }
}

impl From<UnmapError> for MapError {
    fn from(e: UnmapError) -> Self {
        match e {
            UnmapError::ParentEntryHugePage => MapError::HugePageInTheWay,
            _ => MapError::NotMapped,
        }
    }
}

/// Turns on EFER.NXE when the CPU has it, so data mappings can be non-executable.
pub fn enable_nx() {
    let ext = core::arch::x86_64::__cpuid(0x8000_0000).eax;
    if ext >= 0x8000_0001 && core::arch::x86_64::__cpuid(0x8000_0001).edx & (1 << 20) != 0 {
        // SAFETY: setting NXE only makes the NX bit meaningful; no existing
        // mapping uses it yet.
        unsafe {
            x86_64::registers::model_specific::Efer::update(|f| {
                f.insert(x86_64::registers::model_specific::EferFlags::NO_EXECUTE_ENABLE)
            })
        };
        NX.store(true, core::sync::atomic::Ordering::Relaxed);
    }
}

/// Whether EFER.NXE is on (the NX bit may be set in page-table entries).
pub fn nx_enabled() -> bool {
    NX.load(core::sync::atomic::Ordering::Relaxed)
}

/// Flags for kernel data: present, writable, and non-executable when possible.
pub fn kernel_data_flags() -> F {
    let mut f = F::PRESENT | F::WRITABLE;
    if NX.load(core::sync::atomic::Ordering::Relaxed) {
        f |= F::NO_EXECUTE;
    }
    f
}

pub fn kernel_pml4_phys() -> PhysAddr {
    Cr3::read().0.start_address()
}

/// Starts managing the boot page tables through the identity map.
///
/// # Safety
/// Call once, with the boot identity map (low 4 GiB) active in CR3.
pub unsafe fn init_identity() {
    let pml4 = kernel_pml4_phys().as_u64();
    assert!(pml4 < IDENTITY_LIMIT);
    // SAFETY: CR3 points at a live PML4 below 4 GiB, so identity-reachable;
    // from now on only KERNEL touches it.
    let mapper = unsafe { OffsetPageTable::new(&mut *(pml4 as *mut PageTable), VirtAddr::new(0)) };
    *KERNEL.lock() = Some(Kernel {
        mapper,
        pt_limit: IDENTITY_LIMIT,
    });
}

/// Switches table access to the direct map.
///
/// # Safety
/// The direct map at `offset` must cover every page-table frame (all RAM).
pub unsafe fn switch_to_direct_map(offset: u64) {
    let pml4 = kernel_pml4_phys().as_u64();
    let mut k = KERNEL.lock();
    // SAFETY: the caller guarantees the direct map covers RAM, where the PML4 lives.
    let mapper = unsafe {
        OffsetPageTable::new(
            &mut *((offset + pml4) as *mut PageTable),
            VirtAddr::new(offset),
        )
    };
    *k = Some(Kernel {
        mapper,
        pt_limit: u64::MAX,
    });
}

fn with<R>(f: impl FnOnce(&mut Kernel) -> R) -> R {
    f(KERNEL.lock().as_mut().expect("paging used before init"))
}

/// Maps one 4 KiB page.
///
/// # Safety
/// `virt` must be a kernel address nobody relies on being unmapped, and
/// `phys` must be memory (or MMIO) the caller may alias through `virt`.
pub unsafe fn map_4k(virt: VirtAddr, phys: PhysAddr, flags: F) -> Result<(), MapError> {
    with(|k| {
        let mut alloc = PageTableFrames { limit: k.pt_limit };
        let page = Page::<Size4KiB>::from_start_address(virt).expect("map_4k: unaligned virt");
        let frame = PhysFrame::from_start_address(phys).expect("map_4k: unaligned phys");
        let parents = F::PRESENT | F::WRITABLE;
        // SAFETY: forwarded to the caller's contract.
        unsafe {
            k.mapper
                .map_to_with_table_flags(page, frame, flags, parents, &mut alloc)
        }?
        .flush();
        Ok(())
    })
}

/// Unmaps one 4 KiB page and returns the frame it mapped (not freed).
///
/// # Safety
/// No live reference may point into the page.
pub unsafe fn unmap_4k(virt: VirtAddr) -> Result<PhysAddr, MapError> {
    with(|k| {
        let page = Page::<Size4KiB>::from_start_address(virt).expect("unmap_4k: unaligned virt");
        let (frame, flush) = k.mapper.unmap(page)?;
        flush.flush();
        Ok(frame.start_address())
    })
}

pub fn translate(virt: VirtAddr) -> Option<PhysAddr> {
    with(|k| k.mapper.translate_addr(virt))
}

/// Makes sure PML4[index] points at a page-table page, so the kernel half of
/// the PML4 is complete before any process copies it.
pub fn ensure_pml4_entry(index: usize) -> Result<(), MapError> {
    with(|k| {
        let offset = k.mapper.phys_offset().as_u64();
        let pml4 = k.mapper.level_4_table_mut();
        if pml4[index].is_unused() {
            // An empty table: zeroed through the current offset where it
            // does not hold zeros already.
            let frame = frames::alloc_table_at_boot(offset).ok_or(MapError::OutOfFrames)?;
            assert!(frame.as_u64() < k.pt_limit);
            pml4[index].set_addr(frame, F::PRESENT | F::WRITABLE);
        }
        Ok(())
    })
}
