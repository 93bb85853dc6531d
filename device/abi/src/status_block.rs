//! The status block: one structure in guest memory (64-byte aligned) through
//! which the fast path talks without register accesses. Each side stores
//! its fields as aligned atomic u32 words at the offsets below (release
//! after the data they publish) and reads the other side's with acquire.

use crate::le::le_struct;

/// The first cache line is written only by the device, the second only by
/// the driver.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatusBlock {
    /// Fault-buffer PUT: index of the next entry the device will write
    /// (free-running modulo 2^32; slot = put % entries).
    pub fault_put: u32,
    /// `FaultFlags`.
    pub fault_flags: u32,
    /// Control-ring consumer index: every entry before it has completed.
    pub ctl_cons: u32,
    /// Mirror of `regs::ERROR_CODE`.
    pub error_code: u32,
    /// Incremented each time REPLAY has been processed.
    pub replay_seq: u32,
    pub _device_reserved: [u32; 11],
    /// Fault-buffer GET, written by the driver (free-running like PUT).
    pub fault_get: u32,
    /// Control-ring producer index, written by the driver.
    pub ctl_prod: u32,
    pub _driver_reserved: [u32; 14],
}
const _: () = assert!(core::mem::size_of::<StatusBlock>() == 128);
le_struct!(StatusBlock {
    fault_put: u32,
    fault_flags: u32,
    ctl_cons: u32,
    error_code: u32,
    replay_seq: u32,
    fault_get: u32,
    ctl_prod: u32,
});

/// Byte offset of a field, for the atomic word accesses.
const fn at(offset: usize) -> u64 {
    offset as u64
}

pub const FAULT_PUT: u64 = at(core::mem::offset_of!(StatusBlock, fault_put));
pub const FAULT_FLAGS: u64 = at(core::mem::offset_of!(StatusBlock, fault_flags));
pub const CTL_CONS: u64 = at(core::mem::offset_of!(StatusBlock, ctl_cons));
pub const ERROR_CODE: u64 = at(core::mem::offset_of!(StatusBlock, error_code));
pub const REPLAY_SEQ: u64 = at(core::mem::offset_of!(StatusBlock, replay_seq));
pub const FAULT_GET: u64 = at(core::mem::offset_of!(StatusBlock, fault_get));
pub const CTL_PROD: u64 = at(core::mem::offset_of!(StatusBlock, ctl_prod));
/// Bytes of guest memory the block occupies, and its alignment.
pub const SIZE: u64 = StatusBlock::SIZE as u64;
pub const ALIGN: u64 = 64;

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/gpu-abi.md "Status block": the offsets in its table.
    #[test]
    fn fields_sit_at_the_documented_offsets() {
        let documented = [
            (FAULT_PUT, 0x00),
            (FAULT_FLAGS, 0x04),
            (CTL_CONS, 0x08),
            (ERROR_CODE, 0x0C),
            (REPLAY_SEQ, 0x10),
            (FAULT_GET, 0x40),
            (CTL_PROD, 0x44),
        ];
        for (i, (got, want)) in documented.into_iter().enumerate() {
            assert_eq!(got, want, "field {i}");
        }
        assert_eq!(SIZE, 128);
        let sb = StatusBlock {
            fault_put: 1,
            fault_flags: 2,
            ctl_cons: 3,
            error_code: 4,
            replay_seq: 5,
            fault_get: 6,
            ctl_prod: 7,
            ..StatusBlock::default()
        };
        let b = sb.to_le_bytes();
        for (i, (off, _)) in documented.into_iter().enumerate() {
            let off = off as usize;
            assert_eq!(b[off..off + 4], (i as u32 + 1).to_le_bytes(), "field {i}");
        }
        assert_eq!(b.iter().map(|&x| u32::from(x)).sum::<u32>(), 28);
        assert_eq!(StatusBlock::from_le_bytes(&b), sb);
    }
}
