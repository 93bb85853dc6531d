//! The emulated Faultline GPU. Knows nothing of KVM: hosts drive it through
//! its register, doorbell and interrupt traits.
//!
//! Host integration in short:
//! * create a [`Device`] over the guest memory (any vm-memory
//!   `GuestMemoryBackend`) and an [`InterruptSink`];
//! * route PCI config accesses to [`Device::config_read`] /
//!   [`Device::config_write`] and BAR0 accesses to [`Device::mmio_read`] /
//!   [`Device::mmio_write`];
//! * register one ioeventfd per entry of [`doorbell_offsets`] and hand them
//!   to the [`Worker`] (or call [`Doorbells::ring`] / [`Device::doorbell`]
//!   when one fires);
//! * run [`Device::process`] until it returns `false` whenever a doorbell
//!   or a BAR0 write made work: [`Worker`] is that loop on its own thread,
//!   woken by the doorbell eventfds and by `mmio_write`.
//!
//! The hardware interface itself is `faultline_abi` / `docs/gpu-abi.md`.
//!
//! With the `test-utils` feature, `testing` (a driver-side rig over real
//! guest memory) and `harness` (the fuzz body) are built too; production
//! builds leave them out.

pub mod check;
mod clock;
pub mod config;
pub mod counters;
mod device;
pub mod engine;
#[cfg(feature = "test-utils")]
pub mod harness;
pub mod inject;
pub mod isa;
pub mod mmu;
pub mod pci;
pub mod sync;
#[cfg(feature = "test-utils")]
pub mod testing;
pub mod trace;
pub mod vram;
mod worker;

#[cfg(feature = "test-utils")]
pub use clock::ManualClock;

pub use check::{CheckMode, CpuLookup, CpuTables};
pub use config::{Config, ConfigError};
pub use counters::Counters;
pub use device::{
    doorbell_offsets, Device, Doorbells, FirstError, InterruptSink, MAX_BACKLOG,
    STEP_CONTROL_ENTRIES, STEP_SLICES,
};
pub use inject::{InjectError, InjectSpec};
pub use pci::MsiState;
pub use sync::DeviceMutex;
pub use vram::{Vram, DEFAULT_VRAM, MAX_VRAM};
pub use worker::{Waker, Worker};
