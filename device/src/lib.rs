//! The emulated Faultline GPU. Knows nothing of KVM: hosts drive it through
//! its register, doorbell and interrupt traits.
//!
//! Host integration in short:
//! * create a [`Device`] over the guest memory (any vm-memory
//!   `GuestMemoryBackend`) and an [`InterruptSink`];
//! * route PCI config accesses to [`Device::config_read`] /
//!   [`Device::config_write`] and BAR0 accesses to [`Device::mmio_read`] /
//!   [`Device::mmio_write`];
//! * register one ioeventfd per entry of [`doorbell_offsets`] and call
//!   [`Doorbells::ring`] (or [`Device::doorbell`]) when it fires;
//! * call [`Device::process`] on a worker (see [`Worker`]) until it returns
//!   `false`.
//!
//! The hardware interface itself is `faultline_abi` / `docs/gpu-abi.md`.

pub mod config;
pub mod counters;
mod device;
pub mod engine;
pub mod harness;
pub mod isa;
pub mod mmu;
pub mod pci;
pub mod testing;
mod worker;

pub use config::{Config, ConfigError};
pub use counters::Counters;
pub use device::{doorbell_offsets, Device, Doorbells, InterruptSink};
pub use pci::MsiState;
pub use worker::{Waker, Worker};
