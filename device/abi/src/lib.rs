//! The Faultline GPU's hardware interface, shared by the device model and the
//! guest driver. `docs/gpu-abi.md` is the prose form of the same definitions.
//!
//! All multi-byte values are little-endian. Every structure that lives in
//! guest memory is `#[repr(C)]` with its size asserted at compile time and
//! has one encoding here (`SIZE`, `to_le_bytes` / `from_le_bytes`, or for
//! the fields accessed as atomic words, their offsets), so the driver and
//! the device cannot disagree about a layout. The modules are private; the
//! crate root re-exports everything (`faultline_abi::FaultEntry`,
//! `faultline_abi::regs::STATUS`, ...).
#![no_std]

mod command;
mod control;
mod counters;
mod fault;
pub mod isa;
pub mod le;
mod paging;
pub mod regs;
mod status;
pub mod status_block;
pub mod trace;
pub mod virtq;

pub use command::{
    atomic_op, AtomicCommand, Command, Completion, CopyCommand, FillCommand, LaunchCommand,
    MigrateCommand, MigrateEntry, MigrateFlags, Opcode, PhysPage, RawCommand, SemaphoreCommand,
    SizeFlags, COMMAND_SIZE, MAX_BLOCK, MAX_CODE_LEN, MAX_GRID, MAX_LAUNCH_STEPS,
    MAX_MIGRATE_PAGES, MAX_TRANSFER, MIGRATE_LIST_ALIGN,
};
pub use control::{CtlEntry, CtlFlags, CtlOp, CtlStatus};
pub use counters::{Counter, COUNTER_NAMES, NUM_COUNTERS};
pub use fault::{engine, Access, FaultEntry, FaultFlags, FaultReason};
pub use paging::{
    level_shift, pt_index, ContextEntry, ContextFlags, CpuDevicePrivate, CpuExclusive,
    CpuPagingMode, CpuRoot, Pte, LEAF_1G, LEAF_2M, LEAF_4K, PAGE_SHIFT, PAGE_SIZE, PTE_ADDR_MASK,
    PTE_RESERVED_MASK, PT_ENTRIES, PT_LEVELS, VA_BITS, VA_LIMIT,
};
pub use regs::{ChannelFlags, ChannelStatus, DeviceStatus, Features, InjectKnobs, IntCause};
pub use status::{DeviceError, Status};
pub use status_block::StatusBlock;
pub use trace::{TraceEntry, TraceHeader, TraceKind, MAX_TRACE_ENTRIES};

/// ABI version reported by `regs::VERSION`: major in bits 31:16, minor in 15:0.
pub const ABI_VERSION: u32 = 0x0001_0002;
/// Value of `regs::MAGIC` ("FLTG" read as little-endian bytes).
pub const DEVICE_MAGIC: u32 = u32::from_le_bytes(*b"FLTG");

/// Number of GPU contexts (address spaces), and the most channels a device
/// has (the register window and doorbells exist for all of them; read
/// `regs::NUM_CHANNELS` for how many this device implements).
pub const NUM_CONTEXTS: u32 = 64;
pub const NUM_CHANNELS: u32 = 8;
/// Largest virtqueue a channel accepts (power of two).
pub const MAX_QUEUE_SIZE: u16 = 256;
/// Fault-buffer and control-ring sizes (entries, power of two).
pub const MAX_FAULT_ENTRIES: u32 = 1 << 16;
pub const MAX_CTL_ENTRIES: u32 = 4096;

/// PCI identity. The vendor ID is not PCI-SIG assigned: the device is
/// experimental and must never meet real hardware.
pub mod pci {
    pub const VENDOR_ID: u16 = 0xFA17;
    pub const DEVICE_ID: u16 = 0x0001;
    pub const SUBSYSTEM_VENDOR_ID: u16 = 0xFA17;
    pub const SUBSYSTEM_ID: u16 = 0x0001;
    pub const REVISION: u8 = 1;
    /// Display controller / 3D controller / no programming interface.
    pub const CLASS_CODE: u8 = 0x03;
    pub const SUBCLASS: u8 = 0x02;
    pub const PROG_IF: u8 = 0x00;
    /// BAR0: 64-bit non-prefetchable memory BAR of this size.
    pub const BAR0_SIZE: u64 = 0x1_0000;
    /// Config-space offset of the MSI capability (the only capability).
    pub const MSI_CAP_OFFSET: u8 = 0x40;
    /// MSI vectors the device can use (Multiple Message Capable = log2 of it).
    pub const MSI_VECTORS: u32 = 4;
    pub const CONFIG_SPACE_SIZE: usize = 256;
}

/// MSI vectors (with fewer vectors enabled, the vector number is masked as in
/// PCI multiple-message MSI: vector & (enabled - 1)).
pub mod vector {
    /// New fault entries, or overflow of the fault buffer.
    pub const FAULT: u32 = 0;
    /// A channel added used entries and the driver asked to be notified.
    pub const CHANNEL: u32 = 1;
    /// A device error: see `regs::ERROR_CODE`.
    pub const ERROR: u32 = 2;
    /// Control-ring entries (TLB invalidate, CANCEL) completed, when
    /// requested with `CtlFlags::NOTIFY`.
    pub const CONTROL: u32 = 3;
}

/// Doorbell indices: the value passed to the device's `doorbell(index)`.
/// Doorbell `i` lives at `regs::DOORBELL_BASE + 4 * i`.
pub mod doorbell {
    use super::NUM_CHANNELS;
    pub const REPLAY: u32 = 0;
    pub const FAULT_GET: u32 = 1;
    pub const CONTROL: u32 = 2;
    pub const CHANNEL0: u32 = 3;
    pub const COUNT: u32 = CHANNEL0 + NUM_CHANNELS;
    pub const fn channel(ch: u32) -> u32 {
        CHANNEL0 + ch
    }
    pub const fn offset(index: u32) -> u64 {
        super::regs::DOORBELL_BASE + index as u64 * super::regs::DOORBELL_STRIDE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doorbells_sit_in_their_window() {
        assert_eq!(doorbell::offset(doorbell::channel(0)), regs::DB_CHANNEL0);
        assert_eq!(doorbell::offset(doorbell::REPLAY), regs::DB_REPLAY);
        assert_eq!(doorbell::offset(doorbell::CONTROL), regs::DB_CONTROL);
        assert!(doorbell::offset(doorbell::COUNT) <= regs::COUNTERS_BASE);
    }

    #[test]
    fn upper_halves_are_the_hi_registers() {
        use regs::*;
        for (lo, hi) in [
            (STATUS_BLOCK_LO, STATUS_BLOCK_HI),
            (FAULT_BUF_LO, FAULT_BUF_HI),
            (CTX_TABLE_LO, CTX_TABLE_HI),
            (CTL_RING_LO, CTL_RING_HI),
            (TIMESTAMP_LO, TIMESTAMP_HI),
            (CH_DESC_LO, CH_DESC_HI),
            (CH_AVAIL_LO, CH_AVAIL_HI),
            (CH_USED_LO, CH_USED_HI),
        ] {
            assert_eq!(upper_half(lo), hi, "{lo:#x}");
        }
        assert_eq!(upper_half(counter(3)), COUNTERS_BASE + 3 * 8 + 4);
    }
}
