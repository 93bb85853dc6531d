//! Interrupt descriptor table and exception handling.
//!
//! Stable Rust has no `extern "x86-interrupt"`, so each vector gets a tiny
//! assembly stub that normalises the stack (dummy error code where the CPU
//! pushes none, then the vector number), saves every GPR and calls
//! [`exception_dispatch`] with a pointer to the resulting [`TrapFrame`].
//! The handler may edit the frame (the recovery path rewrites RIP), and the
//! stub restores it and `iretq`s.

use core::arch::global_asm;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use x86_64::instructions::tables::lidt;
use x86_64::registers::control::Cr2;
use x86_64::structures::DescriptorTablePointer;
use x86_64::VirtAddr;

use super::exit::{exit, ExitCode};
use super::gdt;
use crate::sync::CpuStatic;

pub const SPURIOUS_VECTOR: u8 = 0xff;
const EXCEPTION_NAMES: [&str; 32] = [
    "divide error",
    "debug",
    "NMI",
    "breakpoint",
    "overflow",
    "bound range exceeded",
    "invalid opcode",
    "device not available",
    "double fault",
    "coprocessor segment overrun",
    "invalid TSS",
    "segment not present",
    "stack-segment fault",
    "general protection",
    "page fault",
    "reserved",
    "x87 floating point",
    "alignment check",
    "machine check",
    "SIMD floating point",
    "virtualization",
    "control protection",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "hypervisor injection",
    "VMM communication",
    "security",
    "reserved",
];

/// Saved state, in the order the common stub pushes it (lowest address first).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    // Pushed by the CPU.
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

// The CPU pushes an error code for 8, 10-14, 17, 21, 29 and 30; the other
// stubs push a dummy 0 so every frame has the same shape.
global_asm!(
    r#"
    .pushsection .text.exception_stubs, "ax"
    .macro STUB vec, has_err
    .p2align 4
exception_stub_\vec:
    .if \has_err == 0
    push 0
    .endif
    push \vec
    jmp exception_common
    .endm

    STUB 0, 0
    STUB 1, 0
    STUB 2, 0
    STUB 3, 0
    STUB 4, 0
    STUB 5, 0
    STUB 6, 0
    STUB 7, 0
    STUB 8, 1
    STUB 9, 0
    STUB 10, 1
    STUB 11, 1
    STUB 12, 1
    STUB 13, 1
    STUB 14, 1
    STUB 15, 0
    STUB 16, 0
    STUB 17, 1
    STUB 18, 0
    STUB 19, 0
    STUB 20, 0
    STUB 21, 1
    STUB 22, 0
    STUB 23, 0
    STUB 24, 0
    STUB 25, 0
    STUB 26, 0
    STUB 27, 0
    STUB 28, 0
    STUB 29, 1
    STUB 30, 1
    STUB 31, 0

exception_common:
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    mov rdi, rsp
    /* The SysV ABI wants a 16-byte aligned stack at the call; the CPU only
       guarantees that for the frame it pushed, not after our pushes. */
    mov rbx, rsp
    and rsp, -16
    cld
    /* Exceptions leave RFLAGS.AC as it was: user mode may have set it, and
       a fault inside a uaccess window has it set. The handler runs with
       supervisor access to user pages closed (SMAP); iretq restores the
       interrupted AC. Through popfq, not clac: see crate::user. */
    test dword ptr [rbx + {rflags}], {ac}
    jz 2f
    pushfq
    and dword ptr [rsp], {not_ac}
    popfq
2:
    call exception_dispatch
    mov rsp, rbx
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rbp
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    pop rax
    add rsp, 16
    iretq

    /* A spurious APIC interrupt needs no EOI and no work. */
    .p2align 4
spurious_stub:
    iretq
    .popsection

    .pushsection .rodata.exception_stub_table, "a"
    .p2align 3
    .global exception_stub_table
exception_stub_table:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad exception_stub_\v
    .endr
    .global spurious_stub_addr
spurious_stub_addr:
    .quad spurious_stub
    .popsection
"#,
    rflags = const core::mem::offset_of!(TrapFrame, rflags),
    ac = const crate::user::RFLAGS_AC,
    not_ac = const !(crate::user::RFLAGS_AC as u32),
);

extern "C" {
    static exception_stub_table: [u64; 32];
    static spurious_stub_addr: u64;
}

/// Gate options (bits 32..48 of a gate's low word): a 64-bit interrupt
/// gate (type 0xE, so IF is cleared on entry), DPL 0.
const GATE_INTERRUPT: u64 = 0x0e00 << 32;
const GATE_PRESENT: u64 = 0x8000 << 32;

/// The 256 gates as the CPU reads them, two words each. Written as raw
/// words (a few instructions per vector) rather than through
/// `x86_64::structures::idt::Entry` (a CS read and address checks per
/// vector): boot runs emulated at ~1 µs per instruction. A gate not set is
/// a not-present interrupt gate.
#[repr(C, align(16))]
struct Idt([[u64; 2]; 256]);

static IDT: CpuStatic<Idt> = CpuStatic::new(Idt([[GATE_INTERRUPT, 0]; 256]));
static INITIALIZED: AtomicBool = AtomicBool::new(false);

/// A present ring-0 interrupt gate to `stub` through code `selector`;
/// `ist`: the TSS IST slot (0-based) to switch to, if any.
fn gate(stub: u64, selector: u16, ist: Option<u16>) -> [u64; 2] {
    let selector = u64::from(selector);
    let ist = ist.map_or(0, |i| u64::from(i) + 1) << 32;
    [
        (stub & 0xffff)
            | (selector << 16)
            | GATE_PRESENT
            | GATE_INTERRUPT
            | ist
            | ((stub >> 16 & 0xffff) << 48),
        stub >> 32,
    ]
}

pub fn init() {
    assert!(
        !INITIALIZED.swap(true, Ordering::SeqCst),
        "idt::init called twice"
    );
    // SAFETY: first and only mutable access to IDT (INITIALIZED guard); the
    // stub table is immutable data emitted by the assembly above.
    let (idt, stubs, spurious) =
        unsafe { (&mut *IDT.get(), &exception_stub_table, spurious_stub_addr) };
    // Every stub is a valid interrupt entry point that preserves all state
    // and returns with iretq (or never returns); gdt::init filled the IST
    // slots with dedicated stacks that nothing else uses.
    let cs = gdt::kernel_selectors().code;
    for (g, &stub) in idt.0.iter_mut().zip(stubs) {
        *g = gate(stub, cs, None);
    }
    idt.0[2] = gate(stubs[2], cs, Some(gdt::IST_NMI));
    idt.0[8] = gate(stubs[8], cs, Some(gdt::IST_DOUBLE_FAULT));
    idt.0[18] = gate(stubs[18], cs, Some(gdt::IST_MACHINE_CHECK));
    // The spurious stub is a bare iretq, valid for an external interrupt.
    idt.0[SPURIOUS_VECTOR as usize] = gate(spurious, cs, None);

    load();
}

/// Loads the one IDT every CPU shares (on an application processor, after
/// `init` ran on the boot CPU).
pub fn load() {
    assert!(INITIALIZED.load(Ordering::SeqCst), "idt::load before init");
    let ptr = DescriptorTablePointer {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: VirtAddr::from_ptr(IDT.get()),
    };
    // SAFETY: IDT is 'static and was filled by `init`; later writes are
    // single gates of vectors that are quiet (`set_interrupt_handler`).
    unsafe { lidt(&ptr) };
}

/// Points external-interrupt `vector` (32..255) at `stub`.
///
/// # Safety
/// `stub` must be an entry point that preserves all state and returns with
/// `iretq`, and nothing may raise `vector` while its gate is rewritten.
pub unsafe fn set_interrupt_handler(vector: u8, stub: u64) {
    assert!(INITIALIZED.load(Ordering::SeqCst) && (32..SPURIOUS_VECTOR).contains(&vector));
    // SAFETY: single CPU; the caller guarantees the vector is quiet, and
    // the CPU reads a gate only when delivering its vector.
    unsafe { (*IDT.get()).0[usize::from(vector)] = gate(stub, gdt::kernel_selectors().code, None) };
}

/// An armed expectation: "the next exception `vector` is deliberate; resume
/// at `resume_rip`". Lets tests (and later, user-access helpers) survive a
/// fault they provoke on purpose.
static RECOVER_VECTOR: AtomicU64 = AtomicU64::new(u64::MAX);
static RECOVER_RIP: AtomicU64 = AtomicU64::new(0);
static LAST_RECOVERED: crate::sync::Mutex<Option<TrapFrame>> = crate::sync::Mutex::new(None);

/// Arms recovery for one exception of `vector`. The code about to fault
/// stores its resume address through [`recovery_rip_slot`] (from inside the
/// same asm block, so the address is a label there).
pub fn arm_recovery(vector: u8) {
    *LAST_RECOVERED.lock() = None;
    RECOVER_RIP.store(0, Ordering::SeqCst);
    RECOVER_VECTOR.store(u64::from(vector), Ordering::SeqCst);
}

/// Where the faulting code writes its resume RIP.
pub fn recovery_rip_slot() -> *mut u64 {
    RECOVER_RIP.as_ptr()
}

/// Disarms recovery and returns the frame (and CR2) of the recovered
/// exception, if one hit.
pub fn take_recovered() -> Option<(TrapFrame, u64)> {
    RECOVER_VECTOR.store(u64::MAX, Ordering::SeqCst);
    LAST_RECOVERED
        .lock()
        .take()
        .map(|f| (f, LAST_CR2.load(Ordering::SeqCst)))
}

static LAST_CR2: AtomicU64 = AtomicU64::new(0);

#[no_mangle]
extern "C" fn exception_dispatch(frame: &mut TrapFrame) {
    let cr2 = Cr2::read_raw();
    // Everything raised in user mode belongs to the user call in progress.
    if frame.cs & 3 == 3 && crate::user::entry::exception(frame, cr2) {
        return;
    }
    // Page faults at process addresses belong to the running process.
    if frame.vector == 14 && crate::mm::process::page_fault(frame, cr2) {
        return;
    }
    let resume = RECOVER_RIP.load(Ordering::SeqCst);
    if frame.vector == RECOVER_VECTOR.load(Ordering::SeqCst) && resume != 0 {
        RECOVER_VECTOR.store(u64::MAX, Ordering::SeqCst);
        LAST_CR2.store(cr2, Ordering::SeqCst);
        if let Some(mut slot) = LAST_RECOVERED.try_lock() {
            *slot = Some(*frame);
        }
        frame.rip = resume;
        return;
    }

    let name = EXCEPTION_NAMES
        .get(frame.vector as usize)
        .copied()
        .unwrap_or("interrupt");
    crate::serial::print_emergency(format_args!(
        "\nFATAL: exception {} ({name}) error_code={:#x} rip={:#x} cr2={:#x} (test {})\n\
         rsp={:#x} rflags={:#x} cs={:#x}\n\
         rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rbp={:#x}\n",
        frame.vector,
        frame.error_code,
        frame.rip,
        cr2,
        crate::tests::current_test().unwrap_or("-"),
        frame.rsp,
        frame.rflags,
        frame.cs,
        frame.rax,
        frame.rbx,
        frame.rcx,
        frame.rdx,
        frame.rsi,
        frame.rdi,
        frame.rbp,
    ));
    exit(ExitCode::Fatal);
}
