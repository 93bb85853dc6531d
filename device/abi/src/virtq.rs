//! The channels' split virtqueue layout (virtio 1.x §2.7), for drivers that
//! build the rings themselves: descriptor table, avail ring and used ring,
//! each ring a 4-byte header (`flags: u16, idx: u16`), `size` entries and a
//! trailing u16 (`used_event` / `avail_event`, used with EVENT_IDX).

use crate::le::le_struct;

/// Descriptor flags.
pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;
/// Avail-ring flag: the driver needs no used-buffer interrupt.
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Used-ring flag: the device needs no avail-buffer notification.
pub const USED_F_NO_NOTIFY: u16 = 1;

/// Alignment of the descriptor table, avail ring and used ring.
pub const DESC_ALIGN: u64 = 16;
pub const AVAIL_ALIGN: u64 = 2;
pub const USED_ALIGN: u64 = 4;

/// One descriptor-table entry.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// Guest-physical address of the buffer.
    pub addr: u64,
    pub len: u32,
    /// `DESC_F_*`.
    pub flags: u16,
    /// Next descriptor of the chain, with `DESC_F_NEXT`.
    pub next: u16,
}
const _: () = assert!(core::mem::size_of::<Descriptor>() == 16);
le_struct!(Descriptor {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
});

/// One used-ring entry: the head of a returned chain and the bytes the
/// device wrote.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsedElem {
    pub id: u32,
    pub len: u32,
}
const _: () = assert!(core::mem::size_of::<UsedElem>() == 8);
le_struct!(UsedElem { id: u32, len: u32 });

/// Offsets of the ring header fields (both rings).
pub const RING_FLAGS: usize = 0;
pub const RING_IDX: usize = 2;
const RING_HEADER: usize = 4;

/// Bytes of a descriptor table of `size` entries.
pub const fn desc_table_size(size: u16) -> usize {
    Descriptor::SIZE * size as usize
}
/// Offset of avail-ring entry `slot` (< size).
pub const fn avail_entry(slot: u16) -> usize {
    RING_HEADER + 2 * slot as usize
}
/// Bytes of an avail ring of `size` entries, `used_event` included.
pub const fn avail_ring_size(size: u16) -> usize {
    avail_entry(size) + 2
}
/// Offset of used-ring entry `slot` (< size).
pub const fn used_entry(slot: u16) -> usize {
    RING_HEADER + UsedElem::SIZE * slot as usize
}
/// Bytes of a used ring of `size` entries, `avail_event` included.
pub const fn used_ring_size(size: u16) -> usize {
    used_entry(size) + 2
}

#[cfg(test)]
mod tests {
    use super::*;

    /// virtio 1.x §2.7.5 (descriptor), §2.7.6 (avail), §2.7.8 (used).
    #[test]
    fn layout_matches_the_virtio_split_ring() {
        let d = Descriptor {
            addr: 0x1122_3344_5566_7788,
            len: 64,
            flags: DESC_F_NEXT,
            next: 3,
        };
        let mut want = [0u8; 16];
        want[0..8].copy_from_slice(&d.addr.to_le_bytes());
        want[8..12].copy_from_slice(&64u32.to_le_bytes());
        want[12..14].copy_from_slice(&1u16.to_le_bytes());
        want[14..16].copy_from_slice(&3u16.to_le_bytes());
        assert_eq!(d.to_le_bytes(), want);
        assert_eq!(Descriptor::from_le_bytes(&want), d);
        let u = UsedElem { id: 9, len: 16 };
        assert_eq!(u.to_le_bytes(), [9, 0, 0, 0, 16, 0, 0, 0]);
        assert_eq!(UsedElem::from_le_bytes(&u.to_le_bytes()), u);
        assert_eq!(desc_table_size(256), 4096);
        assert_eq!((avail_entry(0), avail_entry(3)), (4, 10));
        assert_eq!(avail_ring_size(64), 6 + 2 * 64);
        assert_eq!((used_entry(0), used_entry(3)), (4, 28));
        assert_eq!(used_ring_size(64), 6 + 8 * 64);
    }
}
