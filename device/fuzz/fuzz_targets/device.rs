//! Arbitrary register writes, config writes, guest-memory contents (rings,
//! tables, commands, kernels) and doorbells against the device model.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| faultline_device::harness::run(data));
