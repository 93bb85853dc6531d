//! Everything that touches the x86-64 CPU directly.

pub mod apic;
pub mod exit;
pub mod gdt;
pub mod idt;
pub mod irq;
pub mod paging;
pub mod port;
pub mod time;

/// Moves execution to a new stack and calls `f(arg)` there; never returns.
///
/// # Safety
/// `top` must be the 16-byte aligned top of a mapped, otherwise unused stack,
/// and `*arg` must stay valid for as long as `f` runs.
pub unsafe fn switch_stack<T>(top: x86_64::VirtAddr, f: extern "C" fn(&T) -> !, arg: &T) -> ! {
    assert!(top.is_aligned(16u64));
    // SAFETY: per the contract; `call` leaves RSP ≡ 8 (mod 16) at entry, as
    // the SysV ABI expects, and `f` never returns so nothing is popped.
    unsafe {
        core::arch::asm!(
            "mov rsp, {top}",
            "xor ebp, ebp",
            "call {f}",
            "ud2",
            top = in(reg) top.as_u64(),
            f = in(reg) f,
            in("rdi") arg,
            options(noreturn),
        )
    }
}
