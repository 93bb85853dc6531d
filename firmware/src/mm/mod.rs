//! Memory management: physical frames, the direct map and the kernel heap.
//!
//! Virtual layout (one PML4 entry = 512 GiB):
//!
//! | PML4      | range                                   | use                          |
//! |-----------|-----------------------------------------|------------------------------|
//! | 0         | 0 .. 4 GiB                              | boot identity map (kernel)   |
//! | 1..255    | 0x0000_0080_0000_0000 .. 0x0000_7f80_.. | user processes (`process`)   |
//! | 255       | 0x0000_7f80_0000_0000 ..                | the agent's code (`user`), in every process |
//! | 256..384  | 0xffff_8000_0000_0000 ..                | direct map of all RAM        |
//! | 384       | 0xffff_c000_0000_0000 ..                | kernel heap                  |
//! | 385       | 0xffff_c080_0000_0000 ..                | kernel vmap (ad-hoc mappings)|
//!
//! Kernel-half PML4 entries are all created at boot, so a process PML4 can
//! copy entries 0 and 256..512 once and never needs to be told about new ones.

pub mod direct_map;
pub mod frames;
pub mod heap;
pub mod process;
pub mod vmap;

pub const USER_BASE: u64 = 0x0000_0080_0000_0000;
/// End of the range processes map in; PML4 slot 255 above it holds the
/// agent (`crate::user::AGENT_BASE`).
pub const USER_END: u64 = 0x0000_7f80_0000_0000;
pub const DIRECT_MAP_BASE: u64 = 0xffff_8000_0000_0000;
/// The direct map may use PML4[256..384): 64 TiB of RAM.
pub const DIRECT_MAP_LIMIT: u64 = 0xffff_c000_0000_0000;
pub const HEAP_BASE: u64 = 0xffff_c000_0000_0000;
pub const VMAP_BASE: u64 = 0xffff_c080_0000_0000;
pub const VMAP_END: u64 = 0xffff_c100_0000_0000;

/// The kernel stack the firmware runs on after boot (the 64 KiB boot stack
/// sits next to the boot page tables with no guard).
pub const KERNEL_STACK_SIZE: u64 = 256 * 1024;

/// Heap size: 1/16 of RAM, at least 4 MiB and at most 256 MiB. Enough for the
/// driver's bookkeeping while leaving frames for process address spaces.
pub fn heap_size_for(ram_bytes: u64) -> u64 {
    (ram_bytes / 16).clamp(4 << 20, 256 << 20) & !((2 << 20) - 1)
}

use core::sync::atomic::{AtomicU64, Ordering};

static RAM_BYTES: AtomicU64 = AtomicU64::new(0);
static RAM_END: AtomicU64 = AtomicU64::new(0);
static LOW_TOP: AtomicU64 = AtomicU64::new(0);

/// Records the end of the highest memory-map entry (of any type) below
/// 4 GiB: PCI BARs the firmware assigns go above it.
pub fn set_low_top(end: u64) {
    LOW_TOP.store(end, Ordering::Relaxed);
}

pub fn low_top() -> u64 {
    LOW_TOP.load(Ordering::Relaxed)
}

/// Records RAM facts for later queries (tests, diagnostics).
pub fn set_ram(bytes: u64, end: u64) {
    RAM_BYTES.store(bytes, Ordering::Relaxed);
    RAM_END.store(end, Ordering::Relaxed);
}

/// Total bytes of type-1 (RAM) memory-map entries.
pub fn ram_bytes() -> u64 {
    RAM_BYTES.load(Ordering::Relaxed)
}

/// End of the highest RAM entry (exclusive).
pub fn ram_end() -> u64 {
    RAM_END.load(Ordering::Relaxed)
}
