//! Running code "inside" a process: its page tables in CR3, page faults at
//! process addresses served by its address space, and a segmentation fault
//! turned into an error value instead of a dead firmware.
//!
//! The closure runs in supervisor mode on the kernel stack (there is no user
//! mode here). A fault the address space cannot resolve abandons the closure
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
        }
    }
}

/// A segmentation fault inside [`run`]: the access, where, why, and the
/// instruction that made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segfault {
    pub addr: u64,
    pub access: Access,
    pub reason: SegvReason,
    pub rip: u64,
}

impl fmt::Display for Segfault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let access = match self.access {
            Access::Read => "read",
            Access::Write => "write",
            Access::Exec => "exec",
        };
        write!(
            f,
            "segmentation fault: {access} at {:#x} ({}), rip {:#x}",
            self.addr,
            self.reason.as_str(),
            self.rip
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
    let access = if frame.error_code & PF_FETCH != 0 {
        Access::Exec
    } else if frame.error_code & PF_WRITE != 0 {
        Access::Write
    } else {
        Access::Read
    };
    let reason = match mm.cpu_fault(cr2, access) {
        Ok(()) => return true,
        Err(r) => r,
    };
    let fault = Segfault {
        addr: cr2,
        access,
        reason,
        rip: frame.rip,
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
    // The ABI wants DF clear at a function return.
    frame.rflags &= !(1 << 10);
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

/// Process memory accessors for code inside [`run`]. They only accept
/// addresses in the user half, so they cannot scribble over the kernel; a
/// fault they cannot have resolved ends the closure with a [`Segfault`].
pub mod user {
    use super::user_ptr;

    pub fn read_u64(addr: u64) -> u64 {
        let p = user_ptr(addr, 8) as *const u64;
        // SAFETY: a user-half address inside `run`: no Rust object lives
        // there; the #PF hook backs it or abandons the closure.
        unsafe { p.read_volatile() }
    }

    pub fn write_u64(addr: u64, v: u64) {
        let p = user_ptr(addr, 8) as *mut u64;
        // SAFETY: as in `read_u64`.
        unsafe { p.write_volatile(v) }
    }

    /// `memset` of process memory (one `rep stos`: cheap even under PVM).
    pub fn fill(addr: u64, byte: u8, len: u64) {
        let p = user_ptr(addr, len);
        // SAFETY: as in `read_u64`.
        unsafe { core::ptr::write_bytes(p, byte, len as usize) }
    }

    /// `lock xadd` on the naturally aligned u64 at `addr`; the old value.
    pub fn atomic_add_u64(addr: u64, v: u64) -> u64 {
        assert!(addr.is_multiple_of(8), "{addr:#x} is not 8-byte aligned");
        let p = user_ptr(addr, 8) as *mut u64;
        // SAFETY: as in `read_u64`; aligned (checked), and every other
        // access to it (the GPU's included) is atomic or plain memory.
        let a = unsafe { core::sync::atomic::AtomicU64::from_ptr(p) };
        a.fetch_add(v, core::sync::atomic::Ordering::SeqCst)
    }

    /// Copies process memory into `buf`.
    pub fn read_bytes(addr: u64, buf: &mut [u8]) {
        let p = user_ptr(addr, buf.len() as u64);
        // SAFETY: as in `read_u64`; `buf` is kernel memory, no overlap.
        unsafe { core::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), buf.len()) }
    }

    /// Copies `buf` into process memory.
    pub fn write_bytes(addr: u64, buf: &[u8]) {
        let p = user_ptr(addr, buf.len() as u64);
        // SAFETY: as in `read_bytes`.
        unsafe { core::ptr::copy_nonoverlapping(buf.as_ptr(), p, buf.len()) }
    }
}
