//! Kernel heap: talc over a virtually contiguous range at `HEAP_BASE`, backed
//! by 2 MiB runs of frames where RAM has them, single frames otherwise.

use talc::base::binning::{linear_extent_then_linearly_divided_exponential_binning, Binning};
use talc::source::Manual;
use talc::sync::TalcLock;
use x86_64::{PhysAddr, VirtAddr};

use super::{direct_map, frames, HEAP_BASE};
use crate::arch::paging::{self, MapError};
use crate::sync::RawSpinlock;

// `Manual`: the heap only grows when we claim memory; allocation before
// `init` fails (and the alloc error handler reports it) instead of corrupting.
#[global_allocator]
static HEAP: TalcLock<RawSpinlock, Manual, HeapBinning> = TalcLock::new(Manual);

/// 63 free lists in one `u64` of availability bits instead of talc's
/// default 191 in three: the first claim writes every list head, ~3
/// emulated instructions each at boot (~1 µs apiece), and one word is
/// cheaper to scan on every allocation. Sizes up to 256 bytes get a list
/// each (32-byte steps), then four lists per power of two up to ~4 MiB;
/// larger chunks share the last list.
struct HeapBinning;

impl Binning for HeapBinning {
    type AvailabilityBitField = u64;
    const BIN_COUNT: u32 = u64::BITS - 1;

    #[inline]
    fn size_to_bin(size: usize) -> u32 {
        linear_extent_then_linearly_divided_exponential_binning::<4, 2>(size)
    }
}

/// Maps `size` bytes at `HEAP_BASE` and hands them to the allocator:
/// the frames of `run` (`size` bytes, 2 MiB aligned) where the frame
/// allocator set them aside at boot, else 2 MiB runs and single frames
/// from it.
///
/// # Safety
/// Call once, during boot, after the direct map is up; `run` must be
/// frames nobody else uses.
pub unsafe fn init(size: u64, run: Option<PhysAddr>) -> Result<(), MapError> {
    // SAFETY: forwarded (boot, after the direct map, `run` ours).
    unsafe { map(size, run)? };
    // SAFETY: [HEAP_BASE, HEAP_BASE+size) is now mapped RAM owned by nobody else.
    let claimed = unsafe { HEAP.lock().claim(HEAP_BASE as *mut u8, size as usize) };
    assert!(claimed.is_some(), "talc refused the heap");
    Ok(())
}

/// Maps the heap window for [`init`].
///
/// # Safety
/// As for [`init`].
unsafe fn map(size: u64, run: Option<PhysAddr>) -> Result<(), MapError> {
    const LARGE: u64 = 2 << 20;
    let flags = paging::kernel_data_flags();
    if let Some(first) = run {
        // SAFETY: boot, after the direct map; the heap window is ours and
        // nothing is mapped there yet; the run is ours (contract).
        let mapped = unsafe {
            direct_map::map_boot(
                VirtAddr::new(HEAP_BASE),
                size / LARGE,
                true,
                flags,
                direct_map::run(first),
            )?
        };
        return if mapped == size / LARGE {
            Ok(())
        } else {
            Err(MapError::OutOfFrames)
        };
    }
    // 2 MiB pages where RAM has free 2 MiB runs: 16 mappings instead of
    // 8192 for a 32 MiB heap, which matters when the hypervisor emulates
    // us. The rest in 4 KiB pages.
    // SAFETY: boot, after the direct map; the heap window is ours and
    // nothing is mapped there yet.
    let large = unsafe {
        direct_map::map_boot(
            VirtAddr::new(HEAP_BASE),
            size / LARGE,
            true,
            flags,
            direct_map::Frames::Each(|_| frames::alloc_2m()),
        )?
    };
    let off = large * LARGE;
    let small = (size - off) / frames::FRAME_SIZE;
    // SAFETY: as above, the part of the window not mapped yet.
    let mapped = unsafe {
        direct_map::map_boot(
            VirtAddr::new(HEAP_BASE + off),
            small,
            false,
            flags,
            direct_map::Frames::Each(|_| frames::alloc()),
        )?
    };
    if mapped < small {
        return Err(MapError::OutOfFrames);
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeapStats {
    pub allocation_count: usize,
    pub allocated_bytes: usize,
    pub available_bytes: usize,
    pub claimed_bytes: usize,
}

pub fn stats() -> HeapStats {
    let talc = HEAP.lock();
    let c = talc.counters();
    HeapStats {
        allocation_count: c.allocation_count,
        allocated_bytes: c.allocated_bytes,
        available_bytes: c.available_bytes,
        claimed_bytes: c.claimed_bytes,
    }
}
