//! The application processors' way in: a startup IPI starts a CPU in real
//! mode at `page << 12` (so the code must sit below 1 MiB, page-aligned);
//! the trampoline takes it through 32-bit protected mode into long mode on
//! the kernel's page tables and calls `entry(arg)` on its own stack.
//!
//! The code is assembled into the image and copied to the chosen low page
//! at run time, so it may not depend on where it runs: real-mode data is
//! addressed through DS = CS, the few absolute addresses (the GDT's base,
//! the two far-jump targets) are computed by the AP from CS itself, and
//! everything after protected mode is relative to EBX = the page's base.
//! What the AP needs from the boot CPU is in the [`Mailbox`] at the end of
//! the copy; `stage` there tells how far a CPU that never came up got.

use core::arch::global_asm;
use core::mem::offset_of;

/// Filled by the boot CPU before each startup IPI, read by the AP.
#[repr(C)]
pub struct Mailbox {
    /// Written by the AP as it goes: 1 real mode, 2 protected mode, 3 long
    /// mode (about to call `entry`).
    pub stage: u32,
    /// CR3 (below 4 GiB: loaded in 32-bit mode), CR0 (PG and all), EFER
    /// (LME, NXE; LMA clear: the CPU sets it).
    pub cr3: u32,
    pub cr0: u32,
    pub efer: u32,
    pub stack_top: u64,
    pub entry: u64,
    pub arg: u64,
}

pub const STAGE_REAL: u32 = 1;
pub const STAGE_PROTECTED: u32 = 2;
pub const STAGE_LONG: u32 = 3;

global_asm!(
    r#"
    /* Copied, never run in place: data to the image. */
    .pushsection .rodata.smp_trampoline, "a"
    .p2align 4
    .global smp_trampoline_start
smp_trampoline_start:
    .code16
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    movzwl %ax, %ebx
    shll $4, %ebx
    movl ${real}, (tr_mailbox - smp_trampoline_start + {stage})
    leal (tr_gdt - smp_trampoline_start)(%ebx), %eax
    movl %eax, (tr_gdtr - smp_trampoline_start + 2)
    leal (tr_protected - smp_trampoline_start)(%ebx), %eax
    movl %eax, (tr_far32 - smp_trampoline_start)
    leal (tr_long - smp_trampoline_start)(%ebx), %eax
    movl %eax, (tr_far64 - smp_trampoline_start)
    lgdtl (tr_gdtr - smp_trampoline_start)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl *(tr_far32 - smp_trampoline_start)

    .code32
tr_protected:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl ${protected}, (tr_mailbox - smp_trampoline_start + {stage})(%ebx)
    /* CR4.PAE, CR3, EFER.LME, then CR0.PG: the order the SDM requires.
       The rest of CR4 is the boot CPU's, set by the Rust entry. */
    movl $0x20, %eax
    movl %eax, %cr4
    movl (tr_mailbox - smp_trampoline_start + {cr3})(%ebx), %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx
    movl (tr_mailbox - smp_trampoline_start + {efer})(%ebx), %eax
    xorl %edx, %edx
    wrmsr
    movl (tr_mailbox - smp_trampoline_start + {cr0})(%ebx), %eax
    movl %eax, %cr0
    ljmpl *(tr_far64 - smp_trampoline_start)(%ebx)

    .code64
tr_long:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl ${long}, (tr_mailbox - smp_trampoline_start + {stage})(%rbx)
    movq (tr_mailbox - smp_trampoline_start + {stack})(%rbx), %rsp
    movq (tr_mailbox - smp_trampoline_start + {arg})(%rbx), %rdi
    xorl %ebp, %ebp
    callq *(tr_mailbox - smp_trampoline_start + {entry})(%rbx)
    ud2

    .p2align 3
tr_gdt:
    .quad 0
    .quad 0x00cf9a000000ffff   /* 0x08: 32-bit code */
    .quad 0x00cf92000000ffff   /* 0x10: data */
    .quad 0x00af9a000000ffff   /* 0x18: 64-bit code */
tr_gdtr:
    .word 4 * 8 - 1
    .long 0
tr_far32:
    .long 0
    .word 0x08
tr_far64:
    .long 0
    .word 0x18
    .p2align 3
    .global smp_trampoline_mailbox
smp_trampoline_mailbox:
tr_mailbox:
    .skip {mailbox_size}
    .global smp_trampoline_end
smp_trampoline_end:
    .popsection
"#,
    real = const STAGE_REAL,
    protected = const STAGE_PROTECTED,
    long = const STAGE_LONG,
    stage = const offset_of!(Mailbox, stage),
    cr3 = const offset_of!(Mailbox, cr3),
    cr0 = const offset_of!(Mailbox, cr0),
    efer = const offset_of!(Mailbox, efer),
    stack = const offset_of!(Mailbox, stack_top),
    entry = const offset_of!(Mailbox, entry),
    arg = const offset_of!(Mailbox, arg),
    mailbox_size = const core::mem::size_of::<Mailbox>(),
    options(att_syntax)
);

extern "C" {
    static smp_trampoline_start: u8;
    static smp_trampoline_mailbox: u8;
    static smp_trampoline_end: u8;
}

/// The trampoline copied to `page` (a 4 KiB page below 1 MiB).
pub struct Trampoline {
    page: u64,
}

impl Trampoline {
    /// Copies the code to `page`.
    ///
    /// # Safety
    /// `page` must be a page-aligned RAM page below 1 MiB that nothing else
    /// uses, identity-mapped writable and executable (the boot map is).
    pub unsafe fn install(page: u64) -> Trampoline {
        assert!(page.is_multiple_of(4096) && page < 1 << 20 && page != 0);
        let start = core::ptr::addr_of!(smp_trampoline_start);
        let len = core::ptr::addr_of!(smp_trampoline_end) as usize - start as usize;
        assert!(len <= 4096);
        // SAFETY: the blob is immutable image data of `len` bytes; the
        // destination is the caller's page, disjoint from the image.
        unsafe { core::ptr::copy_nonoverlapping(start, page as *mut u8, len) };
        Trampoline { page }
    }

    /// The startup IPI's vector: the page number.
    pub fn sipi_page(&self) -> u8 {
        (self.page >> 12) as u8
    }

    fn mailbox(&self) -> *mut Mailbox {
        let off = core::ptr::addr_of!(smp_trampoline_mailbox) as u64
            - core::ptr::addr_of!(smp_trampoline_start) as u64;
        (self.page + off) as *mut Mailbox
    }

    /// Fills the mailbox for the next AP (stage back to 0).
    pub fn prepare(&self, m: Mailbox) {
        // SAFETY: the mailbox lies inside the installed page, which only
        // the AP being started (after this write, when sent the SIPI) and
        // this CPU touch; the previous AP is done with it once it is online.
        unsafe { core::ptr::write_volatile(self.mailbox(), m) };
    }

    /// How far the last AP got (`STAGE_*`, 0: not started).
    pub fn stage(&self) -> u32 {
        // SAFETY: as for `prepare`; the AP writes this word concurrently,
        // an aligned u32 store, read here with a volatile load.
        unsafe { core::ptr::read_volatile(&raw const (*self.mailbox()).stage) }
    }
}
