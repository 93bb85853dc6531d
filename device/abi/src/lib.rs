//! The Faultline GPU's hardware interface, shared by the device model and the
//! guest driver. `docs/gpu-abi.md` is the prose form of the same definitions.
#![no_std]
