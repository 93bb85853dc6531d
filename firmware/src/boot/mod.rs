//! Boot: the PVH entry (assembly) and the `hvm_start_info` it hands us.

pub mod entry;
pub mod pvh;

extern "C" {
    static __image_start: u8;
    static __image_end: u8;
}

/// Physical range `[start, end)` occupied by the loaded image, including .bss
/// (boot page tables, boot stack, IST stacks).
pub fn image_range() -> (u64, u64) {
    // The image runs identity-mapped, so a symbol's address is its physical address.
    let start = core::ptr::addr_of!(__image_start) as u64;
    let end = core::ptr::addr_of!(__image_end) as u64;
    (start, end)
}
