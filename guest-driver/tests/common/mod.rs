//! Shared pieces of the host loopback tests.
pub mod loopback;
