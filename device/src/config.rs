//! Host-chosen sizing of the device (`faultline run/serve --gpu-*`). The
//! guest discovers it through read-only registers (NUM_CHANNELS,
//! FAULT_BUF_MAX, TLB_ENTRIES, VRAM_SIZE), so a driver adapts instead of
//! assuming the defaults.

use faultline_abi::{MAX_FAULT_ENTRIES, NUM_CHANNELS};

use crate::check::CheckMode;
use crate::inject::InjectSpec;
use crate::mmu::TLB_CAPACITY;
use crate::vram::{DEFAULT_VRAM, MAX_VRAM, VRAM_CHUNK};

/// Largest per-context TLB a host may ask for: far beyond any guest's
/// working set in this bench, and small enough that 64 contexts of it fit
/// in memory.
pub const MAX_TLB_ENTRIES: u32 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Largest FAULT_BUF_ENTRIES the device accepts: a power of two in
    /// 2..=`MAX_FAULT_ENTRIES`.
    pub max_fault_entries: u32,
    /// Leaf translations of each kind (4 KiB; larger) each context's TLB
    /// holds: 1..=`MAX_TLB_ENTRIES`.
    pub tlb_entries: u32,
    /// Channels the device implements: 1..=`NUM_CHANNELS`.
    pub channels: u32,
    /// Bytes of device memory (`--gpu-vram`): a multiple of 2 MiB up to
    /// `MAX_VRAM`, 0 for none.
    pub vram: u64,
    /// The coherence checker (`--gpu-check`), walking x86-64 CPU tables in
    /// the device's memory; `Device::set_checker` can give other tables.
    pub check: CheckMode,
    /// Fault injection (`--gpu-inject`, `crate::inject`); `None`: off.
    pub inject: Option<InjectSpec>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_fault_entries: MAX_FAULT_ENTRIES,
            tlb_entries: TLB_CAPACITY as u32,
            channels: NUM_CHANNELS,
            vram: DEFAULT_VRAM,
            check: CheckMode::Off,
            inject: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("fault buffer entries {0} must be a power of two between 2 and {MAX_FAULT_ENTRIES}")]
    FaultEntries(u32),
    #[error("TLB entries {0} must be between 1 and {MAX_TLB_ENTRIES}")]
    TlbEntries(u32),
    #[error("channels {0} must be between 1 and {NUM_CHANNELS}")]
    Channels(u32),
    #[error("GPU memory of {0} bytes must be a multiple of 2 MiB, at most {max} GiB", max = MAX_VRAM >> 30)]
    Vram(u64),
    #[error("cannot map {size} bytes of GPU memory: {reason}")]
    VramMap { size: u64, reason: String },
}

impl Config {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let f = self.max_fault_entries;
        if !f.is_power_of_two() || !(2..=MAX_FAULT_ENTRIES).contains(&f) {
            return Err(ConfigError::FaultEntries(f));
        }
        if !(1..=MAX_TLB_ENTRIES).contains(&self.tlb_entries) {
            return Err(ConfigError::TlbEntries(self.tlb_entries));
        }
        if !(1..=NUM_CHANNELS).contains(&self.channels) {
            return Err(ConfigError::Channels(self.channels));
        }
        if !self.vram.is_multiple_of(VRAM_CHUNK) || self.vram > MAX_VRAM {
            return Err(ConfigError::Vram(self.vram));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid_and_bounds_are_enforced() {
        assert_eq!(Config::default().validate(), Ok(()));
        let c = |f, t, ch| Config {
            max_fault_entries: f,
            tlb_entries: t,
            channels: ch,
            vram: 0,
            check: CheckMode::Off,
            inject: None,
        };
        assert_eq!(c(2, 1, 1).validate(), Ok(()));
        assert_eq!(c(1 << 16, MAX_TLB_ENTRIES, 8).validate(), Ok(()));
        for f in [0, 1, 3, 1 << 17, 96] {
            assert_eq!(c(f, 1, 1).validate(), Err(ConfigError::FaultEntries(f)));
        }
        for t in [0, MAX_TLB_ENTRIES + 1] {
            assert_eq!(c(2, t, 1).validate(), Err(ConfigError::TlbEntries(t)));
        }
        for ch in [0, 9] {
            assert_eq!(c(2, 1, ch).validate(), Err(ConfigError::Channels(ch)));
        }
        let vram = |v| Config {
            vram: v,
            ..c(2, 1, 1)
        };
        assert_eq!(vram(MAX_VRAM).validate(), Ok(()));
        for v in [1, VRAM_CHUNK + 4096, MAX_VRAM + VRAM_CHUNK] {
            assert_eq!(vram(v).validate(), Err(ConfigError::Vram(v)));
        }
    }
}
