//! Guest-side driver code, `no_std` + `alloc` so the firmware and host tests
//! run the same code.
//!
//! * [`mm`]: the address-space interface (the trait the firmware's process
//!   address space implements) and the generic reference-count / notifier glue.
//! * [`hmm`]: the HMM mirror layer (Linux HMM, mid-2019 API, with a
//!   sequence-checked validity test).
//! * [`errno`]: the Linux error codes both return.
//! * [`gpu`]: the GPU driver, on the [`gpu::Platform`] machine interface.
//! * [`sync`]: the spin lock the driver and the firmware share.
//! * `sim` (feature `sim`, and in unit tests): a simulated address space on
//!   host threads.
#![cfg_attr(not(test), no_std)]
#![warn(missing_docs)]
extern crate alloc;
#[cfg(all(feature = "sim", not(test)))]
extern crate std;

pub mod errno;
pub mod gpu;
pub mod hmm;
pub mod mm;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
pub mod sync;
