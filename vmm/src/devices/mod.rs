//! Legacy platform devices on the PIO bus.

pub mod debug_exit;
pub mod debugcon;
pub mod linecon;
pub mod serial;
