//! Kernel heap: talc over a virtually contiguous range at `HEAP_BASE`, backed
//! by individually allocated frames (RAM need not be contiguous).

use talc::source::Manual;
use talc::TalcLock;
use x86_64::VirtAddr;

use super::{frames, HEAP_BASE};
use crate::arch::paging::{self, MapError};
use crate::sync::RawSpinlock;

// `Manual`: the heap only grows when we claim memory; allocation before
// `init` fails (and the alloc error handler reports it) instead of corrupting.
#[global_allocator]
static HEAP: TalcLock<RawSpinlock, Manual> = TalcLock::new(Manual);

/// Maps `size` bytes at `HEAP_BASE` and hands them to the allocator.
///
/// # Safety
/// Call once, after the direct map is up.
pub unsafe fn init(size: u64) -> Result<(), MapError> {
    let flags = paging::kernel_data_flags();
    let mut off = 0;
    while off < size {
        let frame = frames::alloc().ok_or(MapError::OutOfFrames)?;
        // SAFETY: the heap window is ours and nothing is mapped there yet.
        unsafe { paging::map_4k(VirtAddr::new(HEAP_BASE + off), frame, flags)? };
        off += frames::FRAME_SIZE;
    }
    // SAFETY: [HEAP_BASE, HEAP_BASE+size) is now mapped RAM owned by nobody else.
    let claimed = unsafe { HEAP.lock().claim(HEAP_BASE as *mut u8, size as usize) };
    assert!(claimed.is_some(), "talc refused the heap");
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
