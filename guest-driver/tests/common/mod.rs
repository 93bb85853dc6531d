//! Shared pieces of the host loopback tests.
pub mod env;
pub mod loopback;
