//! BAR0 register offsets. All registers are 32 bits wide and must be accessed
//! with aligned 4-byte accesses, except the counters which may also be read as
//! aligned 8-byte values. Reads of undefined offsets return 0; writes to them
//! are ignored.

use bitflags::bitflags;

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
/// Host fault-injection knobs in effect (`InjectKnobs`), read-only; 0 on a
/// device without injection (and on any device predating it, since
/// undefined offsets read 0).
pub const INJECT_ACTIVE: u64 = 0x080;
/// The driver's trace ring (`crate::trace`), a host test facility like
/// INJECT_ACTIVE: the largest TRACE_RING_ENTRIES accepted while the host
/// records a trace, 0 otherwise (and on devices predating it).
pub const TRACE_CAP: u64 = 0x084;
/// GPA of the trace ring (4 KiB aligned); writable at any time.
pub const TRACE_RING_LO: u64 = 0x088;
pub const TRACE_RING_HI: u64 = 0x08C;
/// Entries of the trace ring, a power of two in 2..=TRACE_CAP: writing it
/// registers the ring at TRACE_RING (0 unregisters; a bad value or ring
/// outside RAM is ignored and reads back 0).
pub const TRACE_RING_ENTRIES: u64 = 0x090;
/// Clock alignment, write-only: a write to TRACE_SYNC makes the device
/// sample its clock; the driver then writes the TSC it read halfway
/// around that write (the mean of `rdtsc` just before and just after) to
/// TRACE_TSC_LO and TRACE_TSC_HI, and the HI write pairs the two.
pub const TRACE_SYNC: u64 = 0x094;
pub const TRACE_TSC_LO: u64 = 0x098;
pub const TRACE_TSC_HI: u64 = 0x09C;
/// (ABI 1.2) Read-only `Features` this device implements; 0 on devices
/// predating it (an undefined offset).
pub const FEATURES: u64 = 0x0A0;
/// (ABI 1.2) Bytes of device memory (VRAM), a multiple of 2 MiB, 0 when the
/// device has none; read-only, host-configured. Read LO, then HI.
pub const VRAM_SIZE_LO: u64 = 0x0A8;
pub const VRAM_SIZE_HI: u64 = 0x0AC;

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

/// Offset of the upper 32 bits of the 64-bit value whose lower half is the
/// register at `lo` (every `*_LO` register, and each counter).
pub const fn upper_half(lo: u64) -> u64 {
    lo + 4
}

/// Value written to RESET.
pub const RESET_VALUE: u32 = 0x5EE7_0001;

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

    /// `regs::INJECT_ACTIVE`: the fault-injection knobs the host turned on
    /// (`faultline run/serve --gpu-inject`, docs/testing.md), a bit per
    /// knob, so a guest test can state what it expects to see.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct InjectKnobs: u32 {
        /// The control ring is served late, counted in device steps.
        const TLB_ACK_DELAY_STEPS = 1 << 0;
        /// The control ring is served late, counted in microseconds.
        const TLB_ACK_DELAY_US = 1 << 1;
        /// The FAULT MSI comes late after the entries it announces.
        const FAULT_MSI_DELAY = 1 << 2;
        /// Entries of one batch are written in a seeded permutation.
        const FAULT_REORDER = 1 << 3;
        /// Fault entries are sometimes written twice.
        const FAULT_DUP = 1 << 4;
        /// Translations that hit a valid mapping sometimes report a fault.
        const SPURIOUS = 1 << 5;
        /// The fault buffer counts as full below its real size.
        const FAULT_OVERFLOW_AT = 1 << 6;
        /// FILL/COPY/ATOMIC sometimes pause between translation and access.
        const ENGINE_STALL = 1 << 7;
    }

    /// `regs::FEATURES`: optional parts of the interface this device
    /// implements.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Features: u32 {
        /// Device memory: `Pte::VRAM`, VRAM_SIZE and MIGRATE. Set even when
        /// VRAM_SIZE is 0 (the host gave no memory): VRAM leaves and pages
        /// then fail with `Status::BadVram`.
        const VRAM = 1 << 0;
    }

    /// Read value of `regs::CH_ENABLE`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct ChannelStatus: u32 {
        const RUNNING = 1 << 0;
        /// The last enable attempt failed validation, or the queue broke.
        const ERROR = 1 << 1;
    }
}
