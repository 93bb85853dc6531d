//! The control ring: TLB invalidation and CANCEL requests (docs/gpu-abi.md
//! "Control ring").

use bitflags::bitflags;

use crate::le::{code_enum, le_struct};

code_enum! {
    /// Control-ring operations (`CtlEntry::op`).
    pub enum CtlOp {
        /// Drop every TLB entry of every context.
        InvalidateAll = 1,
        /// Drop every TLB entry of `context` (also required after editing
        /// its context-table entry).
        InvalidateContext = 2,
        /// Drop TLB entries of `context` overlapping `[start, start + len)`.
        InvalidateRange = 3,
        /// Fail stalled work of `context` whose pending fault lies in
        /// `[start, start + len)` (len 0 means the page of `start`).
        CancelRange = 4,
        /// Fail all stalled work of `context`.
        CancelContext = 5,
        /// Fault-buffer flush (`context`, `start`, `len` ignored): the
        /// device drops the fault entries it holds back for want of space
        /// and clears OVERFLOW, then acknowledges; from the acknowledgement
        /// on the driver may discard every entry in GET..PUT. All of them
        /// are made redundant by the REPLAY that must follow: it retries
        /// every stalled access, and those still unmapped fault again.
        FlushFaults = 6,
    }
}

code_enum! {
    /// Control-entry completion codes (`CtlEntry::status`).
    pub enum CtlStatus {
        Pending = 0,
        Ok = 1,
        BadOp = 2,
        BadContext = 3,
        BadRange = 4,
    }
}

/// Control-ring entry. The driver fills it, advances
/// `StatusBlock::ctl_prod` and rings DB_CONTROL. The device writes `status`
/// (a `CtlStatus`, one aligned u32 store at [`CtlEntry::STATUS_OFFSET`])
/// and then advances `StatusBlock::ctl_cons`.
///
/// `op` stays a raw `u32`: it is whatever the driver wrote, and the device
/// answers an unknown one with `CtlStatus::BadOp`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CtlEntry {
    /// `CtlOp`.
    pub op: u32,
    /// Written by the device.
    pub status: u32,
    pub context: u32,
    /// `CtlFlags`.
    pub flags: u32,
    pub start: u64,
    pub len: u64,
}
const _: () = assert!(core::mem::size_of::<CtlEntry>() == 32);
le_struct!(CtlEntry {
    op: u32,
    status: u32,
    context: u32,
    flags: u32,
    start: u64,
    len: u64,
});

impl CtlEntry {
    pub const STATUS_OFFSET: usize = core::mem::offset_of!(CtlEntry, status);
}

bitflags! {
    /// `CtlEntry::flags`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct CtlFlags: u32 {
        /// Raise the CONTROL vector when this entry completes.
        const NOTIFY = 1 << 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/gpu-abi.md: `CtlEntry { op: u32, status: u32, context: u32,
    /// flags: u32, start: u64, len: u64 }`, ops 1..=6, statuses 0..=4.
    #[test]
    fn ctl_entry_round_trip_matches_the_documented_layout() {
        let e = CtlEntry {
            op: CtlOp::InvalidateRange.into(),
            status: CtlStatus::Pending.into(),
            context: 63,
            flags: CtlFlags::NOTIFY.bits(),
            start: 0x0000_1234_5678_9000,
            len: 0x20_0000,
        };
        let mut want = [0u8; 32];
        want[0..4].copy_from_slice(&3u32.to_le_bytes());
        want[8..12].copy_from_slice(&63u32.to_le_bytes());
        want[12..16].copy_from_slice(&1u32.to_le_bytes());
        want[16..24].copy_from_slice(&e.start.to_le_bytes());
        want[24..32].copy_from_slice(&e.len.to_le_bytes());
        assert_eq!((CtlEntry::SIZE, CtlEntry::STATUS_OFFSET), (32, 4));
        assert_eq!(e.to_le_bytes(), want);
        assert_eq!(CtlEntry::from_le_bytes(&want), e);
        want[4] = CtlStatus::BadRange as u8;
        assert_eq!(CtlEntry::from_le_bytes(&want).status, 4);
    }

    #[test]
    fn ops_and_statuses_round_trip() {
        let names = [
            (CtlOp::InvalidateAll, 1),
            (CtlOp::InvalidateContext, 2),
            (CtlOp::InvalidateRange, 3),
            (CtlOp::CancelRange, 4),
            (CtlOp::CancelContext, 5),
            (CtlOp::FlushFaults, 6),
        ];
        assert_eq!(CtlOp::COUNT, names.len());
        for (op, v) in names {
            assert_eq!(u32::from(op), v);
            assert_eq!(CtlOp::from_u32(v), Some(op));
        }
        assert_eq!(CtlOp::from_u32(0), None);
        assert_eq!(CtlOp::from_u32(7), None);
        for (i, s) in CtlStatus::ALL.iter().enumerate() {
            assert_eq!(CtlStatus::from_u32(i as u32), Some(*s));
        }
        assert_eq!(CtlStatus::from_u32(5), None);
    }
}
