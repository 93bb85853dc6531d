//! The driver's error type.

use core::fmt;

use faultline_abi::Status;

/// Everything a driver call can fail with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuError {
    /// BAR0 does not identify a Faultline GPU (the MAGIC read back).
    NotFound(u32),
    /// The device speaks an ABI major version this driver does not.
    Version(u32),
    /// `Platform::dma_alloc` failed, or no context/channel slot is free.
    NoMemory,
    /// Every context (or channel) slot is in use.
    NoSlot,
    /// A caller error: misaligned or out-of-range address, bad size.
    Invalid(&'static str),
    /// The device reported `ERROR_CODE = code` with `ERROR_INFO = info`
    /// (values of `faultline_abi::DeviceError`).
    Device {
        /// `DeviceError` as a raw value.
        code: u32,
        /// Detail, e.g. the channel.
        info: u32,
    },
    /// A command completed with a status other than `Ok`.
    Command(Status),
    /// A command completion carried a status outside the ABI.
    BadCompletion(u32),
    /// A control-ring entry completed with a status other than `Ok`.
    Control(u32),
    /// The address-space layer refused (e.g. EFAULT: the process is dying).
    Mm(crate::errno::Errno),
    /// The device did not answer in time; the string names what was awaited.
    Timeout(&'static str),
}

impl fmt::Display for GpuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GpuError::NotFound(m) => write!(f, "no Faultline GPU (magic {m:#x})"),
            GpuError::Version(v) => write!(f, "unsupported GPU ABI version {v:#x}"),
            GpuError::NoMemory => f.write_str("out of DMA memory"),
            GpuError::NoSlot => f.write_str("no free context or channel"),
            GpuError::Invalid(what) => write!(f, "invalid argument: {what}"),
            GpuError::Device { code, info } => {
                write!(f, "device error {code} (info {info:#x})")
            }
            GpuError::Command(s) => write!(f, "command failed: {s:?}"),
            GpuError::BadCompletion(s) => write!(f, "bad completion status {s:#x}"),
            GpuError::Control(s) => write!(f, "control entry failed with status {s}"),
            GpuError::Mm(e) => write!(f, "address space: {e}"),
            GpuError::Timeout(what) => write!(f, "timeout waiting for {what}"),
        }
    }
}

impl core::error::Error for GpuError {}
