//! Status and error codes the device reports: command completions and
//! device errors.

use crate::le::code_enum;

code_enum! {
    /// Command completion status codes (`Completion::status`).
    pub enum Status {
        Ok = 0,
        /// A stalled access of this command was cancelled.
        Cancelled = 1,
        InvalidOpcode = 2,
        /// Bad field values (lengths, flags, reserved bits, overlap, limits).
        InvalidCommand = 3,
        /// A VA at or above 2^48, or a range wrapping past it.
        BadAddress = 4,
        Misaligned = 5,
        /// A page-table entry with reserved bits, LEAF at level 4, or a
        /// misaligned large-leaf address.
        BadPte = 6,
        /// A page table, context entry or leaf outside guest RAM.
        MemoryError = 7,
        /// The channel's context is not VALID in the context table.
        InvalidContext = 8,
        /// LAUNCH: undecodable instruction, bad register, branch out of range.
        InvalidInstruction = 9,
        /// LAUNCH exceeded MAX_LAUNCH_STEPS.
        Timeout = 10,
        /// The coherence checker (`--gpu-check=fatal`, a test facility)
        /// found a translation the CPU page table does not allow.
        CoherenceViolation = 11,
        /// A VRAM address (a leaf with the VRAM aperture, a MIGRATE page)
        /// beyond the device's VRAM (`regs::VRAM_SIZE_LO`; every one when
        /// it is 0).
        BadVram = 12,
        /// MIGRATE: the list is not in guest RAM, or an entry has reserved
        /// bits set or the same source and destination.
        BadList = 13,
    }
}

code_enum! {
    /// Device error codes (`regs::ERROR_CODE`), raised with the ERROR vector.
    pub enum DeviceError {
        None = 0,
        /// ENABLE with a missing/misaligned/out-of-RAM status block, fault
        /// buffer, context table or control ring, or a bad entry count.
        BadSetup = 1,
        /// CH_ENABLE with a bad queue (info = channel).
        BadChannelSetup = 2,
        /// A descriptor chain without a readable command or a writable
        /// completion (info = channel). The chain is returned with used len 0.
        BadChain = 3,
        /// The status block or a ring became unreadable/unwritable.
        MemoryError = 4,
        /// The control ring producer index ran ahead of the ring size.
        BadControlRing = 5,
        /// The virtqueue's avail index is inconsistent (info = channel); the
        /// channel stops.
        BadQueue = 6,
    }
}

impl DeviceError {
    /// Errors that name a channel in `ERROR_INFO` and concern only it.
    pub const fn is_channel_error(self) -> bool {
        matches!(
            self,
            DeviceError::BadChannelSetup | DeviceError::BadChain | DeviceError::BadQueue
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/gpu-abi.md "Status codes" and "Device errors".
    #[test]
    fn codes_round_trip_and_match_the_documented_values() {
        for (i, s) in Status::ALL.iter().enumerate() {
            assert_eq!(*s as u32, i as u32);
            assert_eq!(Status::from_u32(i as u32), Some(*s));
        }
        assert_eq!(Status::COUNT, 14);
        assert_eq!(Status::from_u32(14), None);
        assert_eq!(Status::BadVram as u32, 12);
        assert_eq!(Status::BadList as u32, 13);
        assert_eq!(Status::CoherenceViolation as u32, 11);
        assert_eq!(Status::Timeout as u32, 10);
        for (i, e) in DeviceError::ALL.iter().enumerate() {
            assert_eq!(DeviceError::from_u32(i as u32), Some(*e));
        }
        assert_eq!(DeviceError::BadQueue as u32, 6);
        assert_eq!(DeviceError::from_u32(7), None);
        let channel: [u32; 3] = [2, 3, 6];
        for e in DeviceError::ALL {
            assert_eq!(
                e.is_channel_error(),
                channel.contains(&(*e as u32)),
                "{e:?}"
            );
        }
    }
}
