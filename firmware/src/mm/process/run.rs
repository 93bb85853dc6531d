//! Running code "inside" a process: its page tables in CR3, page faults at
//! process addresses served by its address space, and a segmentation fault
//! turned into an error value instead of a dead firmware.
//!
//! Two ways in. [`call_user`] runs user code (the agent, `crate::user`) at
//! CPL 3: that is how tests touch process memory. [`run`] runs a kernel
//! closure with the process's tables loaded, the context of a system call:
//! the closure may call mm operations (munmap from "inside" the process) and
//! the agent, and touch process memory itself only through [`user`], inside
//! `stac`/`clac` where SMAP is on (`crate::user::with_user_access`).
//!
//! A kernel-mode fault at a user address with SMAP on and RFLAGS.AC clear
//! (an access outside [`user`]) is refused (`SegvReason::Smap`), as is any
//! kernel instruction fetch from a user address (`KernelExec`); the mm is
//! not asked. The closure runs on the kernel stack. A fault the address
//! space cannot resolve abandons the closure
//! the way `longjmp` would: the exception handler rewrites the trap frame to
//! resume in [`run`]'s trampoline with the callee-saved registers and stack
//! pointer saved on entry. Nothing on the closure's part of the stack is
//! dropped (it is leaked, as by `mem::forget`), so a closure must not hold a
//! lock while it touches process memory: the runner refuses to abandon code
//! that holds an interrupt-safe lock and reports that as a fatal exception.

use alloc::sync::Arc;
use core::fmt;
use core::sync::atomic::{AtomicPtr, Ordering};

use x86_64::registers::control::Cr3;
use x86_64::structures::paging::PhysFrame;
use x86_64::PhysAddr;

use super::ProcessMm;
use crate::arch::idt::TrapFrame;
use crate::mm::{USER_BASE, USER_END};

/// What the faulting access was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    Exec,
}

/// Why an access to process memory could not be satisfied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegvReason {
    /// No VMA contains the address (never mapped, or unmapped).
    NoMapping,
    /// The VMA is PROT_NONE.
    NoAccess,
    /// A write to a VMA without PROT_WRITE.
    ReadOnly,
    /// An instruction fetch from a VMA without PROT_EXEC.
    NoExec,
    /// No frame left to back the page.
    OutOfMemory,
    /// The address space was torn down (its last user is gone).
    Dead,
    /// The mmap lock was held for writing by the interrupted code (a kernel
    /// bug: process memory touched in the middle of mmap/munmap/mprotect).
    MmapLockHeld,
    /// A notifier refused a blockable invalidation (a broken subscriber).
    Notifier,
    /// A user-mode access outside the process's range (`mm::USER_BASE..
    /// USER_END`): kernel memory, whose pages lack U/S, or the agent's
    /// read-only code.
    NotUser,
    /// A kernel access to user memory with SMAP on and RFLAGS.AC clear.
    Smap,
    /// A kernel instruction fetch from a user address.
    KernelExec,
    /// An exception other than a page fault in user mode (`Segfault::vector`).
    UserException,
    /// The page lives in device memory and could not be brought back (the
    /// device's copy failed or its memory is gone).
    DeviceMemory,
    /// The page is under migration and the fault may not wait (a remote
    /// fault with ALLOW_RETRY).
    Busy,
}

impl SegvReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SegvReason::NoMapping => "no mapping",
            SegvReason::NoAccess => "PROT_NONE",
            SegvReason::ReadOnly => "read-only mapping",
            SegvReason::NoExec => "mapping not executable",
            SegvReason::OutOfMemory => "out of memory",
            SegvReason::Dead => "address space torn down",
            SegvReason::MmapLockHeld => "mmap lock held for writing",
            SegvReason::Notifier => "a notifier refused the invalidation",
            SegvReason::NotUser => "not a user address",
            SegvReason::Smap => "kernel access to user memory outside a uaccess window (SMAP)",
            SegvReason::KernelExec => "kernel fetch from user memory",
            SegvReason::UserException => "exception in user mode",
            SegvReason::DeviceMemory => "device memory page could not be brought back",
            SegvReason::Busy => "page under migration",
        }
    }
}

/// A segmentation fault inside [`run`] or [`call_user`]: the access,
/// where, why, the instruction that made it, and the exception (vector
/// 14 and the page-fault error code for page faults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segfault {
    pub addr: u64,
    pub access: Access,
    pub reason: SegvReason,
    pub rip: u64,
    pub vector: u8,
    pub error: u64,
}

impl fmt::Display for Segfault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let access = match self.access {
            Access::Read => "read",
            Access::Write => "write",
            Access::Exec => "exec",
        };
        if self.reason == SegvReason::UserException {
            return write!(
                f,
                "exception {} (error code {:#x}) in user mode at rip {:#x}",
                self.vector, self.error, self.rip
            );
        }
        write!(
            f,
            "segmentation fault: {access} at {:#x} ({}), rip {:#x}, error code {:#x}",
            self.addr,
            self.reason.as_str(),
            self.rip,
            self.error
        )
    }
}

/// Callee-saved state at the entry of the trampoline, the landing place of
/// an abandoned closure. Layout shared with the assembly below.
#[repr(C)]
#[derive(Default)]
struct JmpBuf {
    rbx: u64,
    rbp: u64,
    r12: u64,
    r13: u64,
    r14: u64,
    r15: u64,
    rsp: u64,
}

struct RunFrame {
    buf: JmpBuf,
    /// Interrupt-safe locks held when the closure started.
    lock_depth: u32,
    fault: Option<Segfault>,
}

// process_try_call(f, data, buf): saves the callee-saved registers and RSP
// in *buf, calls f(data) and returns 0. process_try_abort is where an
// abandoned closure resumes (with those registers and RSP restored by the
// exception return): it returns 1 from process_try_call.
core::arch::global_asm!(
    r#"
    .pushsection .text.process_try_call, "ax"
    .global process_try_call
    .global process_try_abort
process_try_call:
    mov [rdx + 0], rbx
    mov [rdx + 8], rbp
    mov [rdx + 16], r12
    mov [rdx + 24], r13
    mov [rdx + 32], r14
    mov [rdx + 40], r15
    mov [rdx + 48], rsp
    /* At entry RSP = 8 mod 16; the call below needs it 16-aligned. */
    sub rsp, 8
    mov rax, rdi
    mov rdi, rsi
    call rax
    add rsp, 8
    xor eax, eax
    ret
process_try_abort:
    mov eax, 1
    ret
    .popsection
"#
);

extern "C" {
    fn process_try_call(f: extern "C" fn(*mut u8), data: *mut u8, buf: *mut JmpBuf) -> u64;
    static process_try_abort: u8;
}

/// The process whose tables are in CR3 (set by [`run`] only).
static ACTIVE: AtomicPtr<ProcessMm> = AtomicPtr::new(core::ptr::null_mut());
/// The innermost [`run`]'s landing frame.
static LANDING: AtomicPtr<RunFrame> = AtomicPtr::new(core::ptr::null_mut());

/// Whether `mm`'s page tables are loaded in CR3 right now.
pub fn is_active(mm: &ProcessMm) -> bool {
    core::ptr::eq(ACTIVE.load(Ordering::Relaxed), mm)
}

fn write_cr3(pml4: u64) {
    let frame = PhysFrame::containing_address(PhysAddr::new(pml4));
    // SAFETY: both the kernel PML4 and every process PML4 map the kernel
    // half identically (processes copy it), so the running code, its stack
    // and every kernel object stay mapped across the switch.
    unsafe { Cr3::write(frame, Cr3::read().1) };
}

/// Runs `f` with `mm`'s page tables loaded; see the module docs. Nests
/// (a closure may run another process), restores the previous CR3.
pub fn run<F: FnOnce() -> R, R>(mm: &Arc<ProcessMm>, f: F) -> Result<R, Segfault> {
    struct Ctx<F, R> {
        f: Option<F>,
        r: Option<R>,
    }
    extern "C" fn trampoline<F: FnOnce() -> R, R>(data: *mut u8) {
        // SAFETY: `data` is the `Ctx<F, R>` that `run` passed, alive and not
        // otherwise borrowed while process_try_call runs.
        let ctx = unsafe { &mut *(data as *mut Ctx<F, R>) };
        if let Some(f) = ctx.f.take() {
            ctx.r = Some(f());
        }
    }

    let mut ctx = Ctx {
        f: Some(f),
        r: None,
    };
    let mut frame = RunFrame {
        buf: JmpBuf::default(),
        lock_depth: crate::sync::irq_lock_depth(),
        fault: None,
    };
    // One raw pointer for everything the exception handler may write.
    let fp: *mut RunFrame = &mut frame;
    let prev_active = ACTIVE.swap(Arc::as_ptr(mm) as *mut ProcessMm, Ordering::SeqCst);
    let prev_landing = LANDING.swap(fp, Ordering::SeqCst);
    let prev_cr3 = Cr3::read().0.start_address().as_u64();
    let pml4 = mm.pml4_phys();
    if prev_cr3 != pml4 {
        write_cr3(pml4);
    }
    // SAFETY: the trampoline matches the Ctx type; `fp` stays valid for the
    // call (it is this function's local); the callee-saved registers the
    // assembly saves are restored before it returns either way.
    let aborted = unsafe {
        process_try_call(
            trampoline::<F, R>,
            (&mut ctx as *mut Ctx<F, R>).cast(),
            core::ptr::addr_of_mut!((*fp).buf),
        )
    };
    if prev_cr3 != pml4 {
        write_cr3(prev_cr3);
    }
    LANDING.store(prev_landing, Ordering::SeqCst);
    ACTIVE.store(prev_active, Ordering::SeqCst);
    if aborted != 0 {
        // SAFETY: `fp` points at `frame`, written by the handler before it
        // resumed us; no reference to it is alive.
        let fault = unsafe { (*fp).fault.take() };
        return Err(fault.expect("closure abandoned without a recorded fault"));
    }
    Ok(ctx.r.take().expect("closure neither returned nor faulted"))
}

/// Runs user code at `rip` with `regs` under `mm`'s page tables until the
/// agent's return (`crate::user::entry::enter`). Nests inside [`run`] (the
/// tables stay loaded, and so do their TLB entries); restores CR3.
pub fn call_user(
    mm: &Arc<ProcessMm>,
    rip: u64,
    regs: crate::user::entry::Regs,
) -> Result<crate::user::entry::Regs, Segfault> {
    let prev_active = ACTIVE.swap(Arc::as_ptr(mm) as *mut ProcessMm, Ordering::SeqCst);
    let prev_cr3 = Cr3::read().0.start_address().as_u64();
    let pml4 = mm.pml4_phys();
    if prev_cr3 != pml4 {
        write_cr3(pml4);
    }
    let r = crate::user::entry::enter(rip, regs);
    if prev_cr3 != pml4 {
        write_cr3(prev_cr3);
    }
    ACTIVE.store(prev_active, Ordering::SeqCst);
    r
}

/// A page fault in user mode (error code U), from `crate::user::entry`:
/// `Ok` when the running process's fault handler resolved it, the
/// `Segfault` that ends the user call otherwise.
pub fn user_page_fault(cr2: u64, error: u64, rip: u64) -> Result<(), Segfault> {
    let access = access_of(error);
    let segv = |reason| Segfault {
        addr: cr2,
        access,
        reason,
        rip,
        vector: 14,
        error,
    };
    if !(USER_BASE..USER_END).contains(&cr2) {
        return Err(segv(SegvReason::NotUser));
    }
    let active = ACTIVE.load(Ordering::SeqCst);
    assert!(!active.is_null(), "user mode without a process");
    // SAFETY: `call_user` holds an `Arc` of the process for as long as
    // ACTIVE points at it.
    let mm = unsafe { &*active };
    mm.cpu_fault(cr2, access).map_err(segv)
}

fn access_of(error: u64) -> Access {
    if error & PF_FETCH != 0 {
        Access::Exec
    } else if error & PF_WRITE != 0 {
        Access::Write
    } else {
        Access::Read
    }
}

const PF_WRITE: u64 = 1 << 1;
const PF_RSVD: u64 = 1 << 3;
const PF_FETCH: u64 = 1 << 4;

/// The #PF hook (called by the exception dispatcher): returns true if the
/// fault was a process fault that is now handled (resolved, or the running
/// closure abandoned), false to let the dispatcher treat it as fatal.
pub fn page_fault(frame: &mut TrapFrame, cr2: u64) -> bool {
    if !(USER_BASE..USER_END).contains(&cr2) || frame.error_code & PF_RSVD != 0 {
        return false;
    }
    let active = ACTIVE.load(Ordering::SeqCst);
    if active.is_null() {
        return false;
    }
    // SAFETY: `run` holds an `Arc` of the active process for as long as
    // ACTIVE points at it.
    let mm = unsafe { &*active };
    let access = access_of(frame.error_code);
    let refused = if access == Access::Exec {
        // SMEP or not, the kernel never runs user code.
        Err(SegvReason::KernelExec)
    } else if crate::user::smap_enabled() && frame.rflags & crate::user::RFLAGS_AC == 0 {
        // Outside `user`'s stac window: a kernel bug (or the SMAP test).
        Err(SegvReason::Smap)
    } else {
        mm.cpu_fault(cr2, access)
    };
    let reason = match refused {
        Ok(()) => return true,
        Err(r) => r,
    };
    let fault = Segfault {
        addr: cr2,
        access,
        reason,
        rip: frame.rip,
        vector: 14,
        error: frame.error_code,
    };
    let landing = LANDING.load(Ordering::SeqCst);
    if landing.is_null() {
        crate::serial::print_emergency(format_args!("\n{fault} outside process::run\n"));
        return false;
    }
    // SAFETY: LANDING points at the innermost live `run`'s frame.
    let landing = unsafe { &mut *landing };
    if crate::sync::irq_lock_depth() != landing.lock_depth {
        crate::serial::print_emergency(format_args!(
            "\n{fault} while holding an interrupt-safe lock: cannot abandon the closure\n"
        ));
        return false;
    }
    landing.fault = Some(fault);
    let b = &landing.buf;
    frame.rbx = b.rbx;
    frame.rbp = b.rbp;
    frame.r12 = b.r12;
    frame.r13 = b.r13;
    frame.r14 = b.r14;
    frame.r15 = b.r15;
    frame.rsp = b.rsp;
    frame.rip = core::ptr::addr_of!(process_try_abort) as u64;
    // The ABI wants DF clear at a function return; the stac window of the
    // abandoned access ends here too.
    frame.rflags &= !((1 << 10) | crate::user::RFLAGS_AC);
    true
}

/// The range `[addr, addr + len)` as a pointer, after checking that it lies
/// in the user half and that a process is running (so an access can only
/// reach process memory, and a bad one ends the closure, not the firmware).
fn user_ptr(addr: u64, len: u64) -> *mut u8 {
    assert!(
        !LANDING.load(Ordering::Relaxed).is_null(),
        "process memory accessed outside process::run"
    );
    assert!(
        addr >= USER_BASE && addr.checked_add(len).is_some_and(|e| e <= USER_END),
        "{addr:#x}+{len:#x} is not a process address range"
    );
    addr as *mut u8
}

/// Process memory accessors for kernel code inside [`run`] (Linux's
/// `get_user`/`copy_to_user`; tests use the agent instead). They only
/// accept addresses in the user half, so they cannot scribble over the
/// kernel, and open SMAP's window (`stac`) for exactly their access; a
/// fault they cannot have resolved ends the closure with a [`Segfault`].
pub mod user {
    use super::user_ptr;
    use crate::user::with_user_access as uaccess;

    pub fn read_u64(addr: u64) -> u64 {
        let p = user_ptr(addr, 8) as *const u64;
        // SAFETY: a user-half address inside `run`: no Rust object lives
        // there; the #PF hook backs it or abandons the closure.
        uaccess(|| unsafe { p.read_volatile() })
    }

    pub fn write_u64(addr: u64, v: u64) {
        let p = user_ptr(addr, 8) as *mut u64;
        // SAFETY: as in `read_u64`.
        uaccess(|| unsafe { p.write_volatile(v) })
    }
}
