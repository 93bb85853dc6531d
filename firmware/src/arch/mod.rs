//! Everything that touches the x86-64 CPU directly.

pub mod apic;
pub mod exit;
pub mod gdt;
pub mod idt;
pub mod paging;
pub mod port;
pub mod time;
