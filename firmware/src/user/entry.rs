//! Into ring 3 and back.
//!
//! [`enter`] saves the kernel's callee-saved registers on the kernel stack,
//! points TSS.RSP0 just below them (so everything user mode raises, from a
//! page fault to a GPU interrupt, runs on this stack without touching what
//! the caller left there), loads the argument registers and `iretq`s to the
//! agent at CPL 3. The agent never returns by instruction: it ends on its
//! `ud2` (one known address, [`super::agent::done_addr`]). The #UD handler
//! ([`exception`]) recognises that address, copies the user registers out
//! and rewrites its trap frame to resume the kernel at `user_landing` with
//! the saved stack pointer and flags: the common exception stub's own
//! `iretq` then returns to CPL 0, where `user_landing` restores the
//! callee-saved registers and returns from `enter`.
//!
//! Why an exception and not a system-call instruction: under this host's
//! KVM (kvm_pvm) an `int 0x80` through a DPL-3 gate arrives as #UD and
//! `syscall` jumps to LSTAR but stays at CPL 3, while a `ud2` raises #UD
//! through the IDT the same way under KVM on VMX/SVM, under PVM and under
//! QEMU's TCG. The exception path also needs no MSRs (STAR/LSTAR/SFMASK)
//! and no `swapgs`, and it is the path a user page fault takes anyway, so
//! one mechanism ends a call whichever way it ends.
//!
//! A user page fault goes to the running process (`mm::process::
//! user_page_fault`): resolved, the agent resumes; refused, the call ends
//! with that `Segfault`. Any other exception in user mode ends the call
//! with a `Segfault` whose reason is `UserException`.

use core::mem::offset_of;
use core::sync::atomic::{AtomicPtr, Ordering};

use crate::arch::gdt;
use crate::arch::idt::TrapFrame;
use crate::mm::process::{Access, Segfault, SegvReason};

/// The general-purpose registers user mode starts with and ends with (RSP
/// is the agent's own business: it has no stack).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
}

/// One call into user mode; the layout is shared with the assembly.
#[repr(C)]
struct Call {
    /// In: loaded before `iretq`. Out: the registers at the `ud2`.
    regs: Regs,
    /// The `iretq` frame into user mode, in the order the CPU pops it.
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
    /// Kernel RSP after `user_enter`'s pushes: where `user_landing` resumes.
    ksp: u64,
    /// RFLAGS the kernel resumes with (its own at the call).
    kflags: u64,
    /// How the call ended (written by the exception handler).
    end: Option<Result<(), Segfault>>,
}

// user_enter(call: *mut Call, rsp0: *mut u64): see the module docs.
// user_landing: where the exception handler resumes the kernel, with RSP =
// call.ksp; returns from user_enter.
core::arch::global_asm!(
    r#"
    .pushsection .text.user_enter, "ax"
    .global user_enter
    .global user_landing
user_enter:
    push rbx
    push rbp
    push r12
    push r13
    push r14
    push r15
    mov [rdi + {ksp}], rsp
    /* TSS.RSP0 is only 4-byte aligned: a plain (unaligned) store. */
    mov [rsi], rsp
    push qword ptr [rdi + {ss}]
    push qword ptr [rdi + {rsp}]
    push qword ptr [rdi + {rflags}]
    push qword ptr [rdi + {cs}]
    push qword ptr [rdi + {rip}]
    mov rax, [rdi + 0]
    mov rbx, [rdi + 8]
    mov rcx, [rdi + 16]
    mov rdx, [rdi + 24]
    mov rsi, [rdi + 32]
    mov rbp, [rdi + 48]
    mov r8, [rdi + 56]
    mov r9, [rdi + 64]
    mov r10, [rdi + 72]
    mov r11, [rdi + 80]
    mov r12, [rdi + 88]
    mov r13, [rdi + 96]
    mov r14, [rdi + 104]
    mov r15, [rdi + 112]
    mov rdi, [rdi + 40]
    iretq
user_landing:
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbp
    pop rbx
    ret
    .popsection
"#,
    ksp = const offset_of!(Call, ksp),
    ss = const offset_of!(Call, ss),
    rsp = const offset_of!(Call, rsp),
    rflags = const offset_of!(Call, rflags),
    cs = const offset_of!(Call, cs),
    rip = const offset_of!(Call, rip),
);

const _: () = {
    assert!(offset_of!(Call, regs) == 0);
    assert!(offset_of!(Regs, rdi) == 40 && offset_of!(Regs, rbp) == 48);
    assert!(offset_of!(Regs, r8) == 56 && offset_of!(Regs, r15) == 112);
};

extern "C" {
    fn user_enter(call: *mut core::ffi::c_void, rsp0: *mut u64);
    static user_landing: u8;
}

/// The call in progress (one CPU; user mode cannot start another).
static CURRENT: AtomicPtr<Call> = AtomicPtr::new(core::ptr::null_mut());

const RFLAGS_RESERVED: u64 = 1 << 1;
const RFLAGS_IF: u64 = 1 << 9;

/// Runs user code at `rip` with `regs` (and the current CR3) until it
/// reaches the agent's `ud2` or a fault ends it. Interrupts stay as the
/// caller has them (on, normally: a GPU interrupt may arrive in user mode).
pub fn enter(rip: u64, regs: Regs) -> Result<Regs, Segfault> {
    let kflags = x86_64::registers::rflags::read_raw();
    let sel = gdt::user_selectors();
    let mut call = Call {
        regs,
        rip,
        cs: u64::from(sel.code),
        // IOPL 0, AC clear, IF as the kernel has it.
        rflags: RFLAGS_RESERVED | (kflags & RFLAGS_IF),
        rsp: 0,
        ss: u64::from(sel.stack),
        ksp: 0,
        kflags,
        end: None,
    };
    let prev = CURRENT.swap(&mut call, Ordering::SeqCst);
    assert!(prev.is_null(), "user::entry::enter nested");
    // SAFETY: `call` outlives the call (the handler reaches it through
    // CURRENT only until it resumes us); `user_enter` preserves the
    // callee-saved registers and returns through `user_landing` with the
    // stack it had; rsp0_slot is the live TSS's RSP0.
    unsafe { user_enter((&raw mut call).cast(), gdt::rsp0_slot()) };
    CURRENT.store(core::ptr::null_mut(), Ordering::SeqCst);
    match call.end.take() {
        Some(Ok(())) => Ok(call.regs),
        Some(Err(s)) => Err(s),
        None => unreachable!("user call returned without an end"),
    }
}

const PF_WRITE: u64 = 1 << 1;
const PF_FETCH: u64 = 1 << 4;

/// The exception hook for everything raised at CPL 3 (the dispatcher calls
/// it when the saved CS has RPL 3). Returns false for what must stay fatal
/// (NMI, double fault, machine check, or user mode without a call).
pub fn exception(frame: &mut TrapFrame, cr2: u64) -> bool {
    let call = CURRENT.load(Ordering::SeqCst);
    if call.is_null() || matches!(frame.vector, 2 | 8 | 18) {
        return false;
    }
    // SAFETY: `enter` keeps the Call alive and untouched while CURRENT
    // points at it, which is the whole time user mode runs.
    let call = unsafe { &mut *call };
    let end = match frame.vector {
        14 => match crate::mm::process::user_page_fault(cr2, frame.error_code, frame.rip) {
            Ok(()) => return true,
            Err(s) => Err(s),
        },
        6 if frame.rip == super::agent::done_addr() => {
            call.regs = Regs {
                rax: frame.rax,
                rbx: frame.rbx,
                rcx: frame.rcx,
                rdx: frame.rdx,
                rsi: frame.rsi,
                rdi: frame.rdi,
                rbp: frame.rbp,
                r8: frame.r8,
                r9: frame.r9,
                r10: frame.r10,
                r11: frame.r11,
                r12: frame.r12,
                r13: frame.r13,
                r14: frame.r14,
                r15: frame.r15,
            };
            Ok(())
        }
        v => Err(Segfault {
            addr: frame.rip,
            access: if frame.error_code & PF_FETCH != 0 {
                Access::Exec
            } else if frame.error_code & PF_WRITE != 0 {
                Access::Write
            } else {
                Access::Read
            },
            reason: SegvReason::UserException,
            rip: frame.rip,
            vector: v as u8,
            error: frame.error_code,
        }),
    };
    call.end = Some(end);
    let k = gdt::kernel_selectors();
    frame.rip = core::ptr::addr_of!(user_landing) as u64;
    frame.cs = u64::from(k.code);
    frame.ss = u64::from(k.stack);
    frame.rsp = call.ksp;
    frame.rflags = call.kflags;
    true
}
