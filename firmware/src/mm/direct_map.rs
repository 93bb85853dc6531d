//! The direct map: all RAM at `DIRECT_MAP_BASE + phys`, 2 MiB pages where
//! alignment allows, 4 KiB pages at the ragged edges.

use x86_64::{PhysAddr, VirtAddr};

use super::{DIRECT_MAP_BASE, DIRECT_MAP_LIMIT};
use crate::arch::paging::{self, MapError};
use crate::boot::pvh::{BootInfo, E820_RAM};

const SMALL: u64 = 4096;
const LARGE: u64 = 2 << 20;

#[derive(Debug, Default, Clone, Copy)]
pub struct DirectMapStats {
    pub large_pages: u64,
    pub small_pages: u64,
}

/// Builds the direct map for every RAM entry and switches the kernel page
/// table code over to it.
///
/// # Safety
/// Call once, after `paging::init_identity` and `frames::init`.
pub unsafe fn init(boot: &BootInfo) -> Result<DirectMapStats, MapError> {
    let flags = paging::kernel_data_flags();
    let mut stats = DirectMapStats::default();
    // The map is sorted; merging overlapping/adjacent RAM entries keeps a
    // range from being mapped twice.
    let mut ranges = boot
        .memmap()
        .iter()
        .filter(|e| e.kind == E820_RAM)
        .map(|e| (e.addr, e.end()))
        .peekable();
    while let Some((mut start, mut end)) = ranges.next() {
        while let Some(&(s, e)) = ranges.peek() {
            if s > end {
                break;
            }
            end = end.max(e);
            ranges.next();
        }
        start = start.div_ceil(SMALL) * SMALL;
        end &= !(SMALL - 1);
        assert!(
            DIRECT_MAP_BASE + end <= DIRECT_MAP_LIMIT,
            "RAM beyond the direct map window"
        );
        let mut pa = start;
        while pa < end {
            let va = VirtAddr::new(DIRECT_MAP_BASE + pa);
            if pa % LARGE == 0 && end - pa >= LARGE {
                // SAFETY: the direct-map window is reserved for exactly this.
                unsafe { paging::map_2m(va, PhysAddr::new(pa), flags)? };
                stats.large_pages += 1;
                pa += LARGE;
            } else {
                // SAFETY: as above.
                unsafe { paging::map_4k(va, PhysAddr::new(pa), flags)? };
                stats.small_pages += 1;
                pa += SMALL;
            }
        }
    }
    // SAFETY: the loop above mapped all RAM, which holds every page table.
    unsafe { paging::switch_to_direct_map(DIRECT_MAP_BASE) };
    Ok(stats)
}

/// Virtual address of physical `pa` in the direct map (RAM only).
pub fn phys_to_virt(pa: PhysAddr) -> VirtAddr {
    VirtAddr::new(DIRECT_MAP_BASE + pa.as_u64())
}
