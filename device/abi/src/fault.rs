//! Replayable faults: the fault-buffer entry and the codes it carries
//! (docs/gpu-abi.md "Replayable faults").

use bitflags::bitflags;

use crate::le::le_struct;
use crate::paging::Pte;

/// Memory access types, as reported in fault entries.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Access {
    Read = 0,
    Write = 1,
    Atomic = 2,
}

impl Access {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Read),
            1 => Some(Self::Write),
            2 => Some(Self::Atomic),
            _ => None,
        }
    }
    /// PTE bits a leaf needs for this access.
    pub const fn required(self) -> Pte {
        match self {
            Self::Read => Pte::VALID,
            Self::Write => Pte::VALID.union(Pte::WRITE),
            Self::Atomic => Pte::VALID.union(Pte::WRITE).union(Pte::ATOMIC),
        }
    }
}

/// Why a translation faulted.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultReason {
    /// No valid leaf maps the address.
    NotPresent = 0,
    /// The leaf lacks WRITE.
    WriteProtect = 1,
    /// The leaf lacks ATOMIC.
    AtomicProtect = 2,
}

/// Engines, as reported in fault entries.
pub mod engine {
    pub const FILL: u8 = 1;
    pub const COPY: u8 = 2;
    pub const ATOMIC: u8 = 3;
    pub const SEMAPHORE: u8 = 4;
    /// Compute (LAUNCH), including the kernel-code fetch.
    pub const COMPUTE: u8 = 5;
}

/// One fault-buffer entry. The device writes the entry, then publishes it
/// by storing PUT (release order).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultEntry {
    /// Faulting GPU VA, rounded down to 4 KiB.
    pub va: u64,
    /// Device timestamp (ns since device creation).
    pub timestamp: u64,
    pub context: u32,
    /// `Access`.
    pub access: u8,
    /// `FaultReason`.
    pub reason: u8,
    /// `engine::*`.
    pub engine: u8,
    pub channel: u8,
    /// Engine detail: for COMPUTE the warp index within the launch.
    pub info: u32,
    pub _reserved: u32,
}
const _: () = assert!(core::mem::size_of::<FaultEntry>() == 32);
le_struct!(FaultEntry {
    va: u64,
    timestamp: u64,
    context: u32,
    access: u8,
    reason: u8,
    engine: u8,
    channel: u8,
    info: u32,
});

bitflags! {
    /// `StatusBlock::fault_flags`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct FaultFlags: u32 {
        /// At least one fault could not be written because the buffer was
        /// full. The access stays stalled; the device writes the entry once
        /// the driver frees space and rings DB_FAULT_GET.
        const OVERFLOW = 1 << 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/gpu-abi.md: `va: u64, timestamp: u64, context: u32, access: u8,
    /// reason: u8, engine: u8, channel: u8, info: u32, _reserved: u32`.
    #[test]
    fn fault_entry_round_trip_matches_the_documented_layout() {
        let e = FaultEntry {
            va: 0x0000_7f12_3456_7000,
            timestamp: 0x1122_3344_5566_7788,
            context: 0x0a0b_0c0d,
            access: Access::Write as u8,
            reason: FaultReason::AtomicProtect as u8,
            engine: engine::COMPUTE,
            channel: 7,
            info: 0xdead_beef,
            _reserved: 0,
        };
        let mut want = [0u8; 32];
        want[0..8].copy_from_slice(&e.va.to_le_bytes());
        want[8..16].copy_from_slice(&e.timestamp.to_le_bytes());
        want[16..20].copy_from_slice(&e.context.to_le_bytes());
        want[20..24].copy_from_slice(&[1, 2, 5, 7]);
        want[24..28].copy_from_slice(&e.info.to_le_bytes());
        assert_eq!(FaultEntry::SIZE, 32);
        assert_eq!(core::mem::offset_of!(FaultEntry, info), 24);
        assert_eq!(e.to_le_bytes(), want);
        assert_eq!(FaultEntry::from_le_bytes(&want), e);
        // Reserved bytes are not part of the value.
        want[28] = 0xff;
        assert_eq!(FaultEntry::from_le_bytes(&want), e);
    }
}
