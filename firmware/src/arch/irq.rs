//! External interrupts: the GPU's MSI vectors, the wake-up vector of the
//! TSC-deadline timer and the interprocessor kick.
//!
//! The stubs are a few instructions of assembly and touch no lock: an MSI
//! can arrive while the interrupted code holds any of the firmware's
//! (non-IRQ-safe) spinlocks. A GPU vector sets its bit in [`PENDING`] and
//! bumps [`COUNT`]; every stub then EOIs the x2APIC. Nothing else runs in
//! interrupt context; whoever waits reads the mask. The bench build
//! (feature `bench`) also stamps the TSC of each GPU interrupt; the default
//! image has no such instructions on its interrupt path.

use core::arch::global_asm;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// The GPU's four MSI vectors (FAULT, CHANNEL, ERROR, CONTROL in ABI order).
/// Multiple-message MSI ORs the vector index into the low data bits, so the
/// base must be aligned to the vector count.
pub const GPU_VECTOR_BASE: u8 = 0x40;
pub const GPU_VECTORS: u32 = 4;
/// Raised by the TSC-deadline timer to end a timed `hlt`.
pub const WAKE_VECTOR: u8 = 0x4f;

/// TSC at the latest interrupt of each GPU vector (latency benchmarks).
#[cfg(feature = "bench")]
static LAST_TSC: [AtomicU64; GPU_VECTORS as usize] =
    [const { AtomicU64::new(0) }; GPU_VECTORS as usize];

/// Bit `v` set: GPU vector `v` arrived since the last [`take_pending`].
static PENDING: AtomicU32 = AtomicU32::new(0);
/// GPU interrupts taken since boot, per vector.
static COUNT: [AtomicU64; GPU_VECTORS as usize] =
    [const { AtomicU64::new(0) }; GPU_VECTORS as usize];

const _: () = assert!((GPU_VECTOR_BASE as u32).is_multiple_of(GPU_VECTORS));

/// The stubs, with `$stamp` (assembly, may use `{tsc}`) after the GPU
/// stubs' bookkeeping.
macro_rules! irq_stubs {
    ($stamp:literal $(, tsc = $tsc:path)?) => {
        global_asm!(
            r#"
    .pushsection .text.irq_stubs, "ax"
    .macro GPU_IRQ bit
    .p2align 4
gpu_irq_stub_\bit:
    push rax
    push rcx
    push rdx
    lock or dword ptr [rip + {pending}], 1 << \bit
    lock inc qword ptr [rip + {count} + 8 * \bit]"#,
            $stamp,
            r#"
    jmp irq_eoi_return
    .endm

    GPU_IRQ 0
    GPU_IRQ 1
    GPU_IRQ 2
    GPU_IRQ 3

    .p2align 4
wake_irq_stub:
    push rax
    push rcx
    push rdx
irq_eoi_return:
    /* x2APIC EOI: wrmsr 0x80b with 0. */
    mov ecx, 0x80b
    xor eax, eax
    xor edx, edx
    wrmsr
    pop rdx
    pop rcx
    pop rax
    iretq
    .popsection

    .pushsection .rodata.irq_stub_table, "a"
    .p2align 3
    .global irq_stub_table
irq_stub_table:
    .quad gpu_irq_stub_0, gpu_irq_stub_1, gpu_irq_stub_2, gpu_irq_stub_3
    .quad wake_irq_stub
    .popsection
"#,
            pending = sym PENDING,
            count = sym COUNT,
            $(tsc = sym $tsc,)?
        );
    };
}

#[cfg(feature = "bench")]
irq_stubs!(
    r#"
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov qword ptr [rip + {tsc} + 8 * \bit], rax"#,
    tsc = LAST_TSC
);
#[cfg(not(feature = "bench"))]
irq_stubs!("");

extern "C" {
    static irq_stub_table: [u64; 5];
}

/// Installs the GPU and wake-up gates. Call before any of those vectors can
/// be raised (before MSI or the timer is enabled).
pub fn install() {
    // SAFETY: immutable data emitted by the assembly above.
    let stubs = unsafe { &irq_stub_table };
    for (i, &stub) in stubs[..GPU_VECTORS as usize].iter().enumerate() {
        // SAFETY: each stub preserves every register it uses and returns
        // with iretq; the vector is not live yet.
        unsafe { super::idt::set_interrupt_handler(GPU_VECTOR_BASE + i as u8, stub) };
    }
    // SAFETY: as above.
    unsafe { super::idt::set_interrupt_handler(WAKE_VECTOR, stubs[4]) };
}

/// The interprocessor "look at your work slot" kick (`crate::smp`): like
/// the wake-up vector it only ends a `hlt`, through the same stub.
pub const KICK_VECTOR: u8 = 0x50;

/// Installs the kick gate. Call before any CPU can be sent a kick.
pub fn install_kick() {
    // SAFETY: immutable data emitted by the assembly above.
    let stubs = unsafe { &irq_stub_table };
    // SAFETY: the wake stub EOIs and returns with iretq, preserving every
    // register; nobody sends the kick before this.
    unsafe { super::idt::set_interrupt_handler(KICK_VECTOR, stubs[4]) };
}

/// Returns and clears the GPU vectors raised since the previous call.
pub fn take_pending() -> u32 {
    PENDING.swap(0, Ordering::AcqRel)
}

/// Whether any GPU vector is pending, without clearing it.
pub fn any_pending() -> bool {
    PENDING.load(Ordering::Acquire) != 0
}

/// GPU interrupts taken since boot on `vector` (ABI numbering).
pub fn count(vector: u32) -> u64 {
    COUNT[vector as usize].load(Ordering::Relaxed)
}

/// TSC value taken in the stub of the latest interrupt on `vector`.
#[cfg(feature = "bench")]
pub fn last_tsc(vector: u32) -> u64 {
    LAST_TSC[vector as usize].load(Ordering::Acquire)
}
