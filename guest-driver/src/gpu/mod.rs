//! The Faultline GPU driver.
//!
//! The driver talks to the device only through [`Platform`]: BAR0 register
//! access, DMA memory, interrupts and a clock. The firmware implements it on
//! real PCI/MSI/page frames; the host loopback tests implement it on the
//! device model in the same process. Nothing here knows about x86 boot,
//! KVM or PCI enumeration.

pub mod platform;

pub use platform::{DmaRegion, Platform};
