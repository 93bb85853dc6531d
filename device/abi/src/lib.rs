//! The Faultline GPU's hardware interface, shared by the device model and the
//! guest driver. `docs/gpu-abi.md` is the prose form of the same definitions.
//!
//! All multi-byte values are little-endian. Every structure that lives in
//! guest memory is `#[repr(C)]` with its size asserted at compile time, so the
//! driver and the device cannot disagree about a layout.
#![no_std]

use bitflags::bitflags;

/// ABI version reported by `regs::VERSION`: major in bits 31:16, minor in 15:0.
pub const ABI_VERSION: u32 = 0x0001_0001;
/// Value of `regs::MAGIC` ("FLTG" read as little-endian bytes).
pub const DEVICE_MAGIC: u32 = u32::from_le_bytes(*b"FLTG");

/// Size of a GPU page and of the smallest translation.
pub const PAGE_SHIFT: u32 = 12;
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// GPU virtual addresses are 48 bits; any higher bit set is a bad address
/// (not a fault).
pub const VA_BITS: u32 = 48;
pub const VA_LIMIT: u64 = 1 << VA_BITS;
/// Page-table levels: level 4 is the root, level 1 holds 4 KiB leaves.
pub const PT_LEVELS: u32 = 4;
pub const PT_ENTRIES: u64 = 512;
/// Leaf sizes: 4 KiB at level 1, 2 MiB at level 2, 1 GiB at level 3.
pub const LEAF_4K: u64 = 1 << 12;
pub const LEAF_2M: u64 = 1 << 21;
pub const LEAF_1G: u64 = 1 << 30;

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

/// Shift of the level-`level` index within a VA (level 1..=4).
pub const fn level_shift(level: u32) -> u32 {
    PAGE_SHIFT + 9 * (level - 1)
}

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

/// BAR0 register offsets. All registers are 32 bits wide and must be accessed
/// with aligned 4-byte accesses, except the counters which may also be read as
/// aligned 8-byte values. Reads of undefined offsets return 0; writes to them
/// are ignored.
pub mod regs {
    // --- Identity (read-only) ---
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const NUM_CONTEXTS: u64 = 0x008;
    pub const NUM_CHANNELS: u64 = 0x00C;
    // --- Control ---
    /// Write `RESET_VALUE` to reset the device to its power-on state.
    pub const RESET: u64 = 0x010;
    /// Read-only `DeviceStatus`.
    pub const STATUS: u64 = 0x014;
    /// Write 1 to bit 0 to enable (validates the setup registers), 0 to
    /// disable. Reads back the enable bit.
    pub const ENABLE: u64 = 0x018;
    /// Last device error (`DeviceError`), sticky until ERROR_CLEAR.
    pub const ERROR_CODE: u64 = 0x020;
    /// Error detail (e.g. channel number).
    pub const ERROR_INFO: u64 = 0x024;
    /// Any write clears ERROR_CODE / ERROR_INFO and STATUS.ERROR.
    pub const ERROR_CLEAR: u64 = 0x028;
    /// `IntCause` bits latched when an interrupt is raised (write 1 to clear;
    /// informational, nothing needs acknowledging on the fast path).
    pub const INT_STATUS: u64 = 0x030;
    /// `IntCause` bits that may raise an MSI. Reset value: all ones.
    pub const INT_ENABLE: u64 = 0x034;
    // --- Setup (writable only while disabled) ---
    pub const STATUS_BLOCK_LO: u64 = 0x040;
    pub const STATUS_BLOCK_HI: u64 = 0x044;
    pub const FAULT_BUF_LO: u64 = 0x048;
    pub const FAULT_BUF_HI: u64 = 0x04C;
    /// Entries in the fault buffer, power of two in 2..=MAX_FAULT_ENTRIES.
    pub const FAULT_BUF_ENTRIES: u64 = 0x050;
    pub const CTX_TABLE_LO: u64 = 0x058;
    pub const CTX_TABLE_HI: u64 = 0x05C;
    pub const CTL_RING_LO: u64 = 0x060;
    pub const CTL_RING_HI: u64 = 0x064;
    /// Entries in the control ring, power of two in 2..=MAX_CTL_ENTRIES.
    pub const CTL_RING_ENTRIES: u64 = 0x068;
    /// Device timestamp in ns (read LO first: it latches HI).
    pub const TIMESTAMP_LO: u64 = 0x070;
    pub const TIMESTAMP_HI: u64 = 0x074;
    /// (ABI 1.1) Largest FAULT_BUF_ENTRIES this device accepts (a power of
    /// two, at most `MAX_FAULT_ENTRIES`). Reads 0 on 1.0 devices, which
    /// accept `MAX_FAULT_ENTRIES`.
    pub const FAULT_BUF_MAX: u64 = 0x078;
    /// (ABI 1.1) Leaf entries each context's TLB holds before evicting.
    pub const TLB_ENTRIES: u64 = 0x07C;

    // --- Channels: one 64-byte block per channel ---
    pub const CHANNEL_BASE: u64 = 0x1000;
    pub const CHANNEL_STRIDE: u64 = 0x40;
    /// Offsets within a channel block.
    pub const CH_QUEUE_SIZE: u64 = 0x00;
    pub const CH_DESC_LO: u64 = 0x04;
    pub const CH_DESC_HI: u64 = 0x08;
    pub const CH_AVAIL_LO: u64 = 0x0C;
    pub const CH_AVAIL_HI: u64 = 0x10;
    pub const CH_USED_LO: u64 = 0x14;
    pub const CH_USED_HI: u64 = 0x18;
    /// GPU context the channel's commands run in.
    pub const CH_CONTEXT: u64 = 0x1C;
    /// `ChannelFlags`.
    pub const CH_FLAGS: u64 = 0x20;
    /// Write 1 to start (validates the queue), 0 to stop. Reads back
    /// `ChannelStatus`.
    pub const CH_ENABLE: u64 = 0x24;
    /// Offset of register `reg` of channel `ch`.
    pub const fn channel_reg(ch: u32, reg: u64) -> u64 {
        CHANNEL_BASE + ch as u64 * CHANNEL_STRIDE + reg
    }

    // --- Doorbells: write-only, the written value is ignored ---
    pub const DOORBELL_BASE: u64 = 0x2000;
    pub const DOORBELL_STRIDE: u64 = 4;
    pub const DB_REPLAY: u64 = 0x2000;
    pub const DB_FAULT_GET: u64 = 0x2004;
    pub const DB_CONTROL: u64 = 0x2008;
    pub const DB_CHANNEL0: u64 = 0x200C;

    // --- Counters: read-only u64 each, indexed by `Counter` ---
    pub const COUNTERS_BASE: u64 = 0x3000;
    pub const fn counter(c: u32) -> u64 {
        COUNTERS_BASE + c as u64 * 8
    }

    /// Value written to RESET.
    pub const RESET_VALUE: u32 = 0x5EE7_0001;
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

bitflags! {
    /// `regs::STATUS`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct DeviceStatus: u32 {
        const ENABLED = 1 << 0;
        const ERROR = 1 << 1;
    }

    /// Interrupt causes: `regs::INT_STATUS` / `regs::INT_ENABLE`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct IntCause: u32 {
        const FAULT = 1 << 0;
        const CHANNEL = 1 << 1;
        const ERROR = 1 << 2;
        const CONTROL = 1 << 3;
    }

    /// `regs::CH_FLAGS`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct ChannelFlags: u32 {
        /// VIRTIO_F_EVENT_IDX semantics for notification suppression.
        const EVENT_IDX = 1 << 0;
    }

    /// Read value of `regs::CH_ENABLE`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct ChannelStatus: u32 {
        const RUNNING = 1 << 0;
        /// The last enable attempt failed validation, or the queue broke.
        const ERROR = 1 << 1;
    }

    /// Device page-table entry bits. Bits 51:12 hold the guest-physical
    /// address of the next table or of the leaf page.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Pte: u64 {
        const VALID = 1 << 0;
        /// Leaf only: writes allowed.
        const WRITE = 1 << 1;
        /// Leaf only: atomics allowed (also need WRITE).
        const ATOMIC = 1 << 2;
        /// Levels 2 and 3: this entry is a 2 MiB / 1 GiB leaf. Level 1
        /// entries are always leaves; LEAF at level 4 is a BAD_PTE.
        const LEAF = 1 << 7;
    }

    /// `ContextEntry::flags`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct ContextFlags: u32 {
        const VALID = 1 << 0;
    }

    /// `StatusBlock::fault_flags`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct FaultFlags: u32 {
        /// At least one fault could not be written because the buffer was
        /// full. The access stays stalled; the device writes the entry once
        /// the driver frees space and rings DB_FAULT_GET.
        const OVERFLOW = 1 << 0;
    }

    /// `CtlEntry::flags`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct CtlFlags: u32 {
        /// Raise the CONTROL vector when this entry completes.
        const NOTIFY = 1 << 0;
    }
}

impl Pte {
    /// A non-leaf entry pointing at the next-level table at `gpa`.
    pub const fn table(gpa: u64) -> Pte {
        Pte::from_bits_retain((gpa & PTE_ADDR_MASK) | Pte::VALID.bits())
    }
    /// A leaf at `level` (1: 4 KiB, 2: 2 MiB, 3: 1 GiB) mapping `gpa` with
    /// `perms` (WRITE / ATOMIC); VALID and, above level 1, LEAF are added.
    pub const fn leaf(gpa: u64, level: u32, perms: Pte) -> Pte {
        let leaf = if level > 1 { Pte::LEAF.bits() } else { 0 };
        Pte::from_bits_retain((gpa & PTE_ADDR_MASK) | perms.bits() | Pte::VALID.bits() | leaf)
    }
    /// The table or frame address.
    pub const fn addr(self) -> u64 {
        self.bits() & PTE_ADDR_MASK
    }
}

/// Index of `va` in a level-`level` table (level 1..=4).
pub const fn pt_index(va: u64, level: u32) -> usize {
    ((va >> level_shift(level)) & (PT_ENTRIES - 1)) as usize
}

/// Mask of the physical address in a PTE or context root.
pub const PTE_ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;
/// PTE bits that must be zero (3..=6).
pub const PTE_RESERVED_MASK: u64 = 0x78;

/// The status block: one structure in guest memory (64-byte aligned) through
/// which the fast path talks without register accesses. The first cache line
/// is written only by the device, the second only by the driver.
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

pub mod status_block {
    pub const FAULT_PUT: u64 = 0x00;
    pub const FAULT_FLAGS: u64 = 0x04;
    pub const CTL_CONS: u64 = 0x08;
    pub const ERROR_CODE: u64 = 0x0C;
    pub const REPLAY_SEQ: u64 = 0x10;
    pub const FAULT_GET: u64 = 0x40;
    pub const CTL_PROD: u64 = 0x44;
    pub const SIZE: u64 = 128;
    pub const ALIGN: u64 = 64;
}

/// One entry of the context table (guest memory, 16-byte entries,
/// `NUM_CONTEXTS` of them, 4 KiB aligned table).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ContextEntry {
    /// Guest-physical address of the level-4 table (4 KiB aligned).
    pub root: u64,
    /// `ContextFlags`.
    pub flags: u32,
    pub _reserved: u32,
}
const _: () = assert!(core::mem::size_of::<ContextEntry>() == 16);

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

/// One fault-buffer entry (32 bytes). The device writes the entry, then
/// publishes it by storing PUT (release order).
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

/// Control-ring operations.
pub mod ctl_op {
    /// Drop every TLB entry of every context.
    pub const INVALIDATE_ALL: u32 = 1;
    /// Drop every TLB entry of `context` (also required after editing its
    /// context-table entry).
    pub const INVALIDATE_CONTEXT: u32 = 2;
    /// Drop TLB entries of `context` overlapping `[start, start + len)`.
    pub const INVALIDATE_RANGE: u32 = 3;
    /// Fail stalled work of `context` whose pending fault lies in
    /// `[start, start + len)` (len 0 means the page of `start`).
    pub const CANCEL_RANGE: u32 = 4;
    /// Fail all stalled work of `context`.
    pub const CANCEL_CONTEXT: u32 = 5;
}

/// Control-ring entry (32 bytes). The driver fills it, advances
/// `StatusBlock::ctl_prod` and rings DB_CONTROL. The device writes `status`
/// (a `CtlStatus`) and then advances `StatusBlock::ctl_cons`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CtlEntry {
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
pub mod ctl_entry {
    pub const STATUS: u64 = 4;
}

/// Control-entry completion codes.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CtlStatus {
    Pending = 0,
    Ok = 1,
    BadOp = 2,
    BadContext = 3,
    BadRange = 4,
}

/// Command opcodes (first u32 of every command).
pub mod opcode {
    pub const FILL: u32 = 1;
    pub const COPY: u32 = 2;
    pub const ATOMIC: u32 = 3;
    pub const SEMAPHORE_RELEASE: u32 = 4;
    pub const LAUNCH: u32 = 5;
    pub const COUNT: usize = 6;
}

/// Every command is 64 bytes in the first (device-readable) descriptor of a
/// chain whose last descriptor is device-writable and receives a
/// `Completion`. The per-opcode views below overlay this layout.
pub const COMMAND_SIZE: usize = 64;

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RawCommand {
    pub opcode: u32,
    pub flags: u32,
    pub words: [u64; 7],
}
const _: () = assert!(core::mem::size_of::<RawCommand>() == COMMAND_SIZE);

/// FILL: write `len` bytes at `dst`; byte `i` is byte `(i % 8)` of `pattern`
/// (little-endian). Needs WRITE on every page.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FillCommand {
    pub opcode: u32,
    pub flags: u32,
    pub dst: u64,
    pub len: u64,
    pub pattern: u64,
    pub _reserved: [u64; 4],
}
const _: () = assert!(core::mem::size_of::<FillCommand>() == COMMAND_SIZE);

/// COPY: copy `len` bytes from `src` to `dst` (GPU VAs of the channel's
/// context). Overlapping ranges are a bad command.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyCommand {
    pub opcode: u32,
    pub flags: u32,
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub _reserved: [u64; 4],
}
const _: () = assert!(core::mem::size_of::<CopyCommand>() == COMMAND_SIZE);

/// ATOMIC operations (`AtomicCommand::op`).
pub mod atomic_op {
    pub const ADD: u32 = 0;
    pub const EXCHANGE: u32 = 1;
    /// Compare-and-swap: if *va == compare then *va = operand.
    pub const CAS: u32 = 2;
}

bitflags! {
    /// Flags of ATOMIC and SEMAPHORE_RELEASE commands.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct SizeFlags: u32 {
        /// 64-bit operand (default 32-bit).
        const SIZE64 = 1 << 0;
    }
}

/// ATOMIC: naturally aligned 32/64-bit atomic at `va`; the old value is
/// returned in `Completion::result`. Needs VALID|WRITE|ATOMIC.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AtomicCommand {
    pub opcode: u32,
    /// `SizeFlags`.
    pub flags: u32,
    pub va: u64,
    pub operand: u64,
    pub compare: u64,
    /// `atomic_op::*`.
    pub op: u32,
    pub _reserved0: u32,
    pub _reserved: [u64; 3],
}
const _: () = assert!(core::mem::size_of::<AtomicCommand>() == COMMAND_SIZE);

/// SEMAPHORE_RELEASE: store `value` (32/64-bit, naturally aligned, release
/// order after everything earlier on the channel) at `va`. Needs WRITE.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SemaphoreCommand {
    pub opcode: u32,
    /// `SizeFlags`.
    pub flags: u32,
    pub va: u64,
    pub value: u64,
    pub _reserved: [u64; 5],
}
const _: () = assert!(core::mem::size_of::<SemaphoreCommand>() == COMMAND_SIZE);

/// LAUNCH: run `code_len` instructions fetched from GPU VA `code` (8-byte
/// aligned) on `grid` blocks of `block` threads. Registers r1..r4 start with
/// `args`, all others with 0.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LaunchCommand {
    pub opcode: u32,
    pub flags: u32,
    pub code: u64,
    pub code_len: u32,
    pub grid: u32,
    pub block: u32,
    pub _reserved: u32,
    pub args: [u64; 4],
}
const _: () = assert!(core::mem::size_of::<LaunchCommand>() == COMMAND_SIZE);

/// Limits of LAUNCH.
pub const MAX_CODE_LEN: u32 = 4096;
pub const MAX_BLOCK: u32 = 1024;
pub const MAX_GRID: u32 = 1 << 20;
/// Instructions one launch may execute in total (summed over warps) before
/// failing with `Status::Timeout`.
pub const MAX_LAUNCH_STEPS: u64 = 1 << 28;

/// One engine command as the driver builds it (docs/gpu-abi.md "Commands");
/// [`Command::encode`] lays it out as the `#[repr(C)]` views above.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Byte `i` of `[dst, dst + len)` = byte `i % 8` of `pattern`.
    Fill {
        /// Destination VA.
        dst: u64,
        /// Bytes.
        len: u64,
        /// Little-endian pattern.
        pattern: u64,
    },
    /// Copy `len` bytes from `src` to `dst` (no overlap).
    Copy {
        /// Destination VA.
        dst: u64,
        /// Source VA.
        src: u64,
        /// Bytes.
        len: u64,
    },
    /// Atomic `op` ([`atomic_op`]) at `va`; the completion's
    /// result is the old value.
    Atomic {
        /// Naturally aligned VA.
        va: u64,
        /// `atomic_op::*`.
        op: u32,
        /// 64-bit operand (else 32-bit).
        wide: bool,
        /// Operand (new value for EXCHANGE / CAS).
        operand: u64,
        /// CAS comparison value.
        compare: u64,
    },
    /// Release-store `value` at `va`.
    SemaphoreRelease {
        /// Naturally aligned VA.
        va: u64,
        /// 64-bit store (else 32-bit).
        wide: bool,
        /// Value.
        value: u64,
    },
    /// Run a kernel (docs/gpu-abi.md "Compute ISA").
    Launch {
        /// VA of the code (8-byte aligned).
        code: u64,
        /// Instructions.
        code_len: u32,
        /// Blocks.
        grid: u32,
        /// Threads per block.
        block: u32,
        /// Initial r1..r4.
        args: [u64; 4],
    },
    /// Any 64 bytes (tests of the device's validation).
    Raw([u64; 8]),
}

impl Command {
    /// The 64-byte encoding as eight words (little-endian in memory).
    pub fn encode(&self) -> [u64; 8] {
        let head = |op: u32, flags: u32| u64::from(op) | u64::from(flags) << 32;
        match *self {
            Command::Fill { dst, len, pattern } => {
                [head(opcode::FILL, 0), dst, len, pattern, 0, 0, 0, 0]
            }
            Command::Copy { dst, src, len } => [head(opcode::COPY, 0), dst, src, len, 0, 0, 0, 0],
            Command::Atomic {
                va,
                op,
                wide,
                operand,
                compare,
            } => [
                head(opcode::ATOMIC, u32::from(wide)),
                va,
                operand,
                compare,
                u64::from(op),
                0,
                0,
                0,
            ],
            Command::SemaphoreRelease { va, wide, value } => [
                head(opcode::SEMAPHORE_RELEASE, u32::from(wide)),
                va,
                value,
                0,
                0,
                0,
                0,
                0,
            ],
            Command::Launch {
                code,
                code_len,
                grid,
                block,
                args,
            } => [
                head(opcode::LAUNCH, 0),
                code,
                u64::from(code_len) | u64::from(grid) << 32,
                u64::from(block),
                args[0],
                args[1],
                args[2],
                args[3],
            ],
            Command::Raw(w) => w,
        }
    }
}

impl Command {
    /// The 64 bytes the device reads.
    pub fn to_bytes(&self) -> [u8; COMMAND_SIZE] {
        let mut b = [0u8; COMMAND_SIZE];
        for (chunk, w) in b.chunks_exact_mut(8).zip(self.encode()) {
            chunk.copy_from_slice(&w.to_le_bytes());
        }
        b
    }
}

/// Completion record written to the chain's writable descriptor.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Completion {
    /// `Status`.
    pub status: u32,
    pub _reserved: u32,
    /// ATOMIC: old value. Others: 0.
    pub result: u64,
}
const _: () = assert!(core::mem::size_of::<Completion>() == 16);

/// Command completion status codes.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
}

impl Status {
    pub const COUNT: usize = 11;
    pub const fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            0 => Self::Ok,
            1 => Self::Cancelled,
            2 => Self::InvalidOpcode,
            3 => Self::InvalidCommand,
            4 => Self::BadAddress,
            5 => Self::Misaligned,
            6 => Self::BadPte,
            7 => Self::MemoryError,
            8 => Self::InvalidContext,
            9 => Self::InvalidInstruction,
            10 => Self::Timeout,
            _ => return None,
        })
    }
}

/// Device error codes (`regs::ERROR_CODE`), raised with the ERROR vector.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// Counters in the counter window (`regs::counter(i)`).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    Accesses = 0,
    TlbHits = 1,
    TlbMisses = 2,
    TlbEvictions = 3,
    Walks = 4,
    FaultsRaised = 5,
    FaultsDeduplicated = 6,
    FaultOverflows = 7,
    Replays = 8,
    Cancels = 9,
    Invalidations = 10,
    BytesCopied = 11,
    /// `CMD_BASE + opcode`: commands completed per opcode (1..=5).
    CmdBase = 16,
    /// `STATUS_BASE + status`: commands completed per status.
    StatusBase = 24,
}
/// Number of counter slots.
pub const NUM_COUNTERS: u32 = Counter::StatusBase as u32 + Status::COUNT as u32;
pub const COUNTER_NAMES: [&str; 12] = [
    "accesses",
    "tlb_hits",
    "tlb_misses",
    "tlb_evictions",
    "walks",
    "faults_raised",
    "faults_deduplicated",
    "fault_overflows",
    "replays",
    "cancels",
    "invalidations",
    "bytes_copied",
];

/// The compute ISA. Every instruction is one little-endian u64:
/// bits 7:0 opcode, 15:8 rd, 23:16 rs1, 31:24 rs2, 63:32 imm (signed).
/// There are 16 registers r0..r15 of 64 bits; r0 reads as zero and writes to
/// it are discarded. Branch targets are `pc + imm` in instructions.
pub mod isa {
    pub const NUM_REGS: u8 = 16;
    /// Threads per warp.
    pub const WARP_SIZE: u32 = 8;

    pub const NOP: u8 = 0x00;
    /// Thread finishes.
    pub const EXIT: u8 = 0x01;
    /// rd = sext(imm)
    pub const MOVI: u8 = 0x02;
    /// rd = (rd & 0xffff_ffff) | (imm << 32)
    pub const MOVHI: u8 = 0x03;
    /// rd = special register `imm` (`sreg::*`)
    pub const S2R: u8 = 0x04;

    // rd = rs1 op rs2 (wrapping; shifts use the low 6 bits)
    pub const ADD: u8 = 0x10;
    pub const SUB: u8 = 0x11;
    pub const MUL: u8 = 0x12;
    pub const AND: u8 = 0x13;
    pub const OR: u8 = 0x14;
    pub const XOR: u8 = 0x15;
    pub const SHL: u8 = 0x16;
    pub const SHR: u8 = 0x17;
    pub const SAR: u8 = 0x18;
    /// signed less-than: 1 or 0
    pub const SLT: u8 = 0x19;
    pub const SLTU: u8 = 0x1A;
    /// unsigned divide; x / 0 = u64::MAX
    pub const DIVU: u8 = 0x1B;
    /// unsigned remainder; x % 0 = x
    pub const REMU: u8 = 0x1C;

    // rd = rs1 op sext(imm)
    pub const ADDI: u8 = 0x20;
    pub const MULI: u8 = 0x21;
    pub const ANDI: u8 = 0x22;
    pub const ORI: u8 = 0x23;
    pub const XORI: u8 = 0x24;
    pub const SHLI: u8 = 0x25;
    pub const SHRI: u8 = 0x26;

    // Memory through the MMU, address rs1 + sext(imm), naturally aligned.
    /// rd = zext(load32)
    pub const LD32: u8 = 0x30;
    pub const LD64: u8 = 0x31;
    /// store low 32 bits of rs2
    pub const ST32: u8 = 0x32;
    pub const ST64: u8 = 0x33;
    /// rd = old; mem += rs2
    pub const ATOM_ADD32: u8 = 0x38;
    pub const ATOM_ADD64: u8 = 0x39;
    /// rd = old; mem = rs2
    pub const ATOM_XCHG32: u8 = 0x3A;
    pub const ATOM_XCHG64: u8 = 0x3B;
    /// if mem == rd { mem = rs2 }; rd = old
    pub const ATOM_CAS32: u8 = 0x3C;
    pub const ATOM_CAS64: u8 = 0x3D;

    // Branches: if rs1 cmp rs2 { pc += imm } else { pc += 1 }
    pub const BEQ: u8 = 0x40;
    pub const BNE: u8 = 0x41;
    pub const BLT: u8 = 0x42;
    pub const BGE: u8 = 0x43;
    pub const BLTU: u8 = 0x44;
    pub const BGEU: u8 = 0x45;
    /// pc += imm
    pub const JMP: u8 = 0x46;

    /// Special registers for S2R.
    pub mod sreg {
        /// Thread index within the block.
        pub const TID: i32 = 0;
        /// Block index within the grid.
        pub const BID: i32 = 1;
        /// Threads per block.
        pub const NTID: i32 = 2;
        /// Blocks in the grid.
        pub const NBID: i32 = 3;
        /// BID * NTID + TID.
        pub const GTID: i32 = 4;
        /// Lane within the warp.
        pub const LANE: i32 = 5;
        /// Warp index within the launch.
        pub const WARP: i32 = 6;
    }

    /// Encode one instruction.
    pub const fn encode(op: u8, rd: u8, rs1: u8, rs2: u8, imm: i32) -> u64 {
        op as u64
            | (rd as u64) << 8
            | (rs1 as u64) << 16
            | (rs2 as u64) << 24
            | (imm as u32 as u64) << 32
    }

    /// Decoded fields (not validated).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Fields {
        pub op: u8,
        pub rd: u8,
        pub rs1: u8,
        pub rs2: u8,
        pub imm: i32,
    }

    pub const fn decode(word: u64) -> Fields {
        Fields {
            op: word as u8,
            rd: (word >> 8) as u8,
            rs1: (word >> 16) as u8,
            rs2: (word >> 24) as u8,
            imm: (word >> 32) as u32 as i32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isa_roundtrip() {
        let w = isa::encode(isa::ADDI, 3, 4, 5, -7);
        let f = isa::decode(w);
        assert_eq!((f.op, f.rd, f.rs1, f.rs2, f.imm), (isa::ADDI, 3, 4, 5, -7));
    }

    #[test]
    fn command_encoding_matches_the_layouts() {
        use core::mem::offset_of;
        let b = Command::Launch {
            code: 0x1000,
            code_len: 7,
            grid: 3,
            block: 32,
            args: [11, 12, 13, 14],
        }
        .to_bytes();
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        assert_eq!(u32_at(offset_of!(LaunchCommand, opcode)), opcode::LAUNCH);
        assert_eq!(u64_at(offset_of!(LaunchCommand, code)), 0x1000);
        assert_eq!(u32_at(offset_of!(LaunchCommand, code_len)), 7);
        assert_eq!(u32_at(offset_of!(LaunchCommand, grid)), 3);
        assert_eq!(u32_at(offset_of!(LaunchCommand, block)), 32);
        assert_eq!(u64_at(offset_of!(LaunchCommand, args) + 24), 14);
        let b = Command::Atomic {
            va: 0x2000,
            op: atomic_op::CAS,
            wide: true,
            operand: 5,
            compare: 6,
        }
        .to_bytes();
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        assert_eq!(
            u32_at(offset_of!(AtomicCommand, flags)),
            SizeFlags::SIZE64.bits()
        );
        assert_eq!(u64_at(offset_of!(AtomicCommand, operand)), 5);
        assert_eq!(u64_at(offset_of!(AtomicCommand, compare)), 6);
        assert_eq!(u32_at(offset_of!(AtomicCommand, op)), atomic_op::CAS);
        let b = Command::Copy {
            dst: 1,
            src: 2,
            len: 3,
        }
        .to_bytes();
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        assert_eq!(u64_at(offset_of!(CopyCommand, src)), 2);
        assert_eq!(u64_at(offset_of!(CopyCommand, len)), 3);
    }

    #[test]
    fn layout_offsets() {
        assert_eq!(
            core::mem::offset_of!(StatusBlock, fault_get) as u64,
            status_block::FAULT_GET
        );
        assert_eq!(
            core::mem::offset_of!(StatusBlock, ctl_prod) as u64,
            status_block::CTL_PROD
        );
        assert_eq!(
            core::mem::offset_of!(StatusBlock, replay_seq) as u64,
            status_block::REPLAY_SEQ
        );
        assert_eq!(
            core::mem::offset_of!(CtlEntry, status) as u64,
            ctl_entry::STATUS
        );
        assert_eq!(core::mem::offset_of!(AtomicCommand, op), 32);
        assert_eq!(doorbell::offset(doorbell::channel(0)), regs::DB_CHANNEL0);
        assert_eq!(level_shift(4), 39);
        assert!(regs::counter(NUM_COUNTERS) <= 0x4000);
    }

    #[test]
    fn pte_helpers() {
        let t = Pte::table(0x1234_5000);
        assert_eq!(t.bits(), 0x1234_5001);
        let l = Pte::leaf(0x4020_0000, 2, Pte::WRITE);
        assert!(l.contains(Pte::VALID | Pte::WRITE | Pte::LEAF));
        assert_eq!(l.addr(), 0x4020_0000);
        assert!(!Pte::leaf(0x1000, 1, Pte::empty()).contains(Pte::LEAF));
        assert_eq!(pt_index(0x0000_8040_2010_3000, 4), 0x100);
        assert_eq!(pt_index(0x0000_8040_2010_3000, 3), 0x100);
        assert_eq!(pt_index(0x0000_8040_2010_3000, 2), 0x100);
        assert_eq!(pt_index(0x0000_8040_2010_3000, 1), 0x103);
    }

    #[test]
    fn status_roundtrip() {
        for v in 0..Status::COUNT as u32 {
            assert_eq!(Status::from_u32(v).map(|s| s as u32), Some(v));
        }
        assert_eq!(Status::from_u32(Status::COUNT as u32), None);
    }
}
