//! Guest-side driver code, `no_std` + `alloc` so the firmware and host tests
//! run the same code.
#![cfg_attr(not(test), no_std)]
extern crate alloc;
