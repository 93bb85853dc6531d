//! The driver's trace ring (docs/gpu-abi.md "Trace ring"): a ring in guest
//! memory the driver writes timestamped events into (batch drained, window
//! serviced, retry, cancel, invalidate callback) and the device reads on
//! its own schedule into the host's trace (`faultline run --gpu-trace`).
//! A test and tuning facility: a device whose host records no trace reads
//! `regs::TRACE_CAP` as 0, and the driver then writes nothing.
//!
//! Layout at `TRACE_RING_LO/HI` (4 KiB aligned): a 64-byte
//! [`TraceHeader`], then `TRACE_RING_ENTRIES` × 32-byte [`TraceEntry`].
//! The driver writes entry `prod % entries`, then advances `prod`
//! (release); the device reads entries up to `prod`, then advances `cons`
//! (release). A driver that finds the ring full (`prod - cons == entries`)
//! drops the event and counts it in `dropped`.

use crate::le::{code_enum, le_struct};

/// Largest `TRACE_RING_ENTRIES` a device accepts.
pub const MAX_TRACE_ENTRIES: u32 = 4096;

/// The ring's first 64 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TraceHeader {
    /// Entries written (free-running), by the driver.
    pub prod: u32,
    /// Events the driver dropped because the ring was full, by the driver.
    pub dropped: u32,
    /// Entries read (free-running), by the device.
    pub cons: u32,
    pub _reserved: [u32; 13],
}
const _: () = assert!(core::mem::size_of::<TraceHeader>() == 64);
le_struct!(TraceHeader {
    prod: u32,
    dropped: u32,
    cons: u32,
});

impl TraceHeader {
    pub const PROD_OFFSET: usize = core::mem::offset_of!(TraceHeader, prod);
    pub const DROPPED_OFFSET: usize = core::mem::offset_of!(TraceHeader, dropped);
    pub const CONS_OFFSET: usize = core::mem::offset_of!(TraceHeader, cons);
}

code_enum! {
    /// What a driver trace entry records (`TraceEntry::kind`).
    pub enum TraceKind {
        /// The driver drained a batch from the fault buffer: `a` = entries
        /// drained, `b` = distinct faults after sort and dedup.
        BatchDrained = 1,
        /// One fault-around window serviced: `a` = its start VA, `b` = its
        /// size in bytes.
        WindowServiced = 2,
        /// A window's sequence check failed (a concurrent invalidation):
        /// `a` = start VA, `b` = size; serviced again.
        Retry = 3,
        /// Faults the driver cannot satisfy, cancelled: `a` = the faulting
        /// VA, `b` = 0.
        Cancel = 4,
        /// The mirror's invalidate callback: `a` = start VA, `b` = length.
        Invalidate = 5,
        /// The driver rang REPLAY (`a`, `b` 0).
        Replay = 6,
    }
}

/// One driver event.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TraceEntry {
    /// The driver's clock: the CPU's TSC as the guest reads it (`rdtsc`).
    pub tsc: u64,
    /// `TraceKind`; raw, since it is whatever the driver wrote.
    pub kind: u32,
    /// The GPU context the event concerns (0 where none).
    pub context: u32,
    pub a: u64,
    pub b: u64,
}
const _: () = assert!(core::mem::size_of::<TraceEntry>() == 32);
le_struct!(TraceEntry {
    tsc: u64,
    kind: u32,
    context: u32,
    a: u64,
    b: u64,
});

/// Bytes a ring of `entries` occupies.
pub const fn ring_bytes(entries: u32) -> u64 {
    TraceHeader::SIZE as u64 + entries as u64 * TraceEntry::SIZE as u64
}

/// Byte offset of entry slot `slot` from the ring's base.
pub const fn entry_offset(slot: u32) -> u64 {
    TraceHeader::SIZE as u64 + slot as u64 * TraceEntry::SIZE as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_round_trip_and_layout() {
        let e = TraceEntry {
            tsc: 0x0102_0304_0506_0708,
            kind: TraceKind::WindowServiced as u32,
            context: 7,
            a: 0x7000_0000,
            b: 0x1_0000,
        };
        let b = e.to_le_bytes();
        assert_eq!(&b[0..8], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&b[8..12], &2u32.to_le_bytes());
        assert_eq!(&b[12..16], &7u32.to_le_bytes());
        assert_eq!(&b[24..32], &0x1_0000u64.to_le_bytes());
        assert_eq!(TraceEntry::from_le_bytes(&b), e);
        assert_eq!(TraceHeader::CONS_OFFSET, 8);
        assert_eq!(entry_offset(1), 96);
        assert_eq!(ring_bytes(2), 128);
        assert_eq!(TraceKind::from_u32(6), Some(TraceKind::Replay));
        assert_eq!(TraceKind::from_u32(0), None);
    }
}
