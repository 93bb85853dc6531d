//! The Faultline GPU driver.
//!
//! The driver talks to the device only through [`Platform`]: BAR0 register
//! access, DMA memory, interrupts and a clock. The firmware implements it on
//! real PCI/MSI/page frames; the host loopback tests implement it on the
//! device model in the same process. Nothing here knows about x86 boot,
//! KVM or PCI enumeration.
//!
//! # Pieces
//!
//! * [`Gpu::probe`]: identity check, reset, status block, fault buffer
//!   ([`GpuConfig::fault_entries`]), context table, control ring, interrupt
//!   causes, enable. [`Gpu::poll`] is the interrupt bottom half (takes the
//!   pending vectors, records device errors, services faults);
//!   [`Gpu::invalidate_range`] / [`Gpu::invalidate_context`] go through the
//!   control ring and return once the device acknowledged.
//! * [`PageTable`]: a device page table in DMA memory (4 KiB / 2 MiB / 1 GiB
//!   leaves, [`PageTable::root`]).
//! * [`Context`]: a context slot bound to a page table (the page-table lock
//!   is the driver's update lock); drop tears the slot down.
//! * [`Channel`]: a virtqueue bound to a context; [`Channel::submit`] /
//!   [`Channel::wait`] / [`Channel::run`] take a [`Command`] (FILL, COPY,
//!   ATOMIC, SEMAPHORE_RELEASE, LAUNCH). Waiting runs the bottom half:
//!   `take_interrupts` → handle → check the completion → `wait_interrupt`,
//!   until [`GpuConfig::timeout_ns`] gives [`GpuError::Timeout`].
//! * Device memory: [`Gpu::vram_size`] (VRAM_SIZE, 0 without
//!   `Features::VRAM`), a [`VramAllocator`] over it (2 MiB chunks, whole
//!   or carved into 4 KiB pages, a leak check at teardown) and
//!   [`MigrateList::run`], which copies batches of pages between system
//!   memory and VRAM with MIGRATE.
//! * Errors are [`GpuError`]: a failed command is `Command(status)`, a
//!   device error `Device { code, info }`.
//!
//! # What the firmware calls: identity-map a buffer, FILL, COPY, check
//!
//! ```ignore
//! use alloc::sync::Arc;
//! use faultline_abi::Pte;
//! use faultline_driver::gpu::*;
//!
//! // 1. BAR0 mapped, MSI enabled and routed so that the interrupt handler
//! //    records vectors for `take_interrupts`; then:
//! let platform: Arc<MyPlatform> = ...;
//! let gpu = Gpu::probe(platform.clone(), GpuConfig::default())?;
//!
//! // 2. A buffer the device can reach, identity-mapped (VA == GPA).
//! let buf = platform.dma_alloc(4).ok_or(GpuError::NoMemory)?; // 16 KiB
//! let mut pt = PageTable::new(platform.clone())?;
//! pt.map_range(buf.phys(), buf.phys(), 4 * 4096, PageSize::Size4K, Pte::WRITE)?;
//! let ctx = Context::new(&gpu, pt)?;
//! let chan = Channel::open(&ctx)?;
//!
//! // 3. FILL the first half, COPY it to the second half, wait for each.
//! let (src, dst, len) = (buf.phys(), buf.phys() + 8192, 8192);
//! chan.run(&Command::Fill { dst: src, len, pattern: 0x0123_4567_89ab_cdef })?;
//! chan.run(&Command::Copy { dst, src, len })?;
//!
//! // 4. Check through the CPU mapping.
//! assert_eq!(buf.read_u64(8192 + 8), 0x0123_4567_89ab_cdef);
//!
//! // 5. Teardown order: channel, context (frees the page table), buffer.
//! drop(chan);
//! drop(ctx);
//! platform.dma_free(buf);
//! ```
//!
//! A command on an address the page table does not map faults; a context
//! without a [`FaultHandler`] gets the fault cancelled, so `run` returns
//! `Err(GpuError::Command(Status::Cancelled))`.
//!
//! # Shared virtual memory
//!
//! [`SvmContext::new(&gpu, &mm, SvmConfig::default())`](SvmContext::new)
//! binds a context to a process address space (any [`crate::mm::Mm`]) through
//! an HMM mirror; open a [`Channel`] on [`SvmContext::context`] and submit
//! commands on process virtual addresses. Faults are serviced by whoever
//! runs the bottom half ([`Gpu::poll`], which every wait calls), so the
//! firmware needs no extra thread: submit, then `wait`. CPU munmap/mprotect
//! reach the driver through the mirror and return only after the device
//! acknowledged the TLB invalidation. Never call `poll(true)` (or a channel
//! wait) with the process's mmap lock held.
//!
//! # The SVM suite
//!
//! [`suite`] holds the SVM tests, generic over [`suite::SvmEnv`], each
//! declaring beside its body what it needs ([`suite::Needs`]: fault-buffer
//! entries, driver timeout, guest memory); [`suite::tests`] lists them. A
//! host runs one with [`suite::run`], which builds the environment for the
//! test's needs first: the host loopback in `cargo test`
//! (`tests/svm_loopback.rs`) and the firmware on its processes, one test
//! of its own per suite test. `large_first_touch` touches
//! [`suite::SvmEnv::large_bytes`] (256 MiB unless the environment says
//! less).

mod channel;
mod context;
mod counters;
mod density;
mod device;
mod dmem;
mod error;
mod migrate;
#[cfg(feature = "mutants")]
pub mod mutant;
mod pagetable;
pub mod platform;
pub mod policy;
pub mod stats;
pub mod suite;
mod svm;
mod trace;
pub mod vram;

pub use channel::{Channel, Ticket};
pub use context::Context;
pub use counters::{CounterSnapshot, DriverCounters};
pub use device::{Fault, FaultHandler, Gpu, GpuConfig};
pub use dmem::{DeviceMemory, DmemStats, VramFailure};
pub use error::GpuError;
pub use faultline_abi::Command;
pub use migrate::MigrateList;
pub use pagetable::{Cleared, Leaf, PageSize, PageTable};
pub use platform::{DmaRegion, Platform};
pub use policy::{FaultPolicy, MigratePolicy, Prefetch, Replay};
pub use stats::{Latency, LatencySnapshot, StatsSnapshot};
pub use svm::{CheckHook, MigrateHook, SnapEntry, SvmConfig, SvmContext};
pub use vram::{VramAllocator, VramLeak, VramUsage};
