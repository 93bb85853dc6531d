//! Kernel virtual address space for ad-hoc mappings (the kernel stack,
//! tests, later MMIO BARs): a bump allocator over the vmap window. Every
//! reservation is preceded by an unmapped guard page, so running off the low
//! end of a stack faults instead of silently corrupting a neighbour.

use core::sync::atomic::{AtomicU64, Ordering};

use x86_64::VirtAddr;

use super::{VMAP_BASE, VMAP_END};

const PAGE: u64 = 4096;

/// The top page of the window is never handed out: a known-unmapped address
/// for tests that provoke page faults.
pub const NEVER_MAPPED: u64 = VMAP_END - PAGE;

static NEXT: AtomicU64 = AtomicU64::new(VMAP_BASE);

/// Reserves `pages` pages of kernel virtual space (not mapped). Virtual space
/// is plentiful (512 GiB), so reservations are never returned.
pub fn reserve(pages: u64) -> VirtAddr {
    let size = (pages + 1) * PAGE;
    let start = NEXT.fetch_add(size, Ordering::SeqCst);
    assert!(start + size <= NEVER_MAPPED, "vmap window exhausted");
    VirtAddr::new(start + PAGE)
}
