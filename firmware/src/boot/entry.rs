//! PVH entry: 32-bit protected mode → long mode → `rust_entry`.
//!
//! The PVH boot protocol hands us EBX = physical address of `hvm_start_info`,
//! paging off, flat 32-bit segments and no usable stack. Everything up to the
//! `call` below has to work with only registers and statically placed tables.

use core::arch::global_asm;

/// Entries in each boot page-directory: 4 directories × 512 × 2 MiB = 4 GiB.
pub const BOOT_PD_COUNT: usize = 4;
/// Size of the boot stack used until (and after) `rust_entry` runs.
pub const BOOT_STACK_SIZE: usize = 64 * 1024;

// The ELF note tells the loader where the 32-bit entry is (XEN_ELFNOTE_PHYS32_ENTRY).
global_asm!(
    r#"
    .pushsection .note.pvh, "a", @note
    .p2align 2
    .long 4          /* namesz: "Xen\0" */
    .long 4          /* descsz: 32-bit physical entry */
    .long 18         /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .p2align 2
    .long pvh_start32
    .p2align 2
    .popsection
"#,
    options(att_syntax)
);

global_asm!(
    r#"
    .pushsection .text.boot, "ax"
    .code32
    .global pvh_start32
pvh_start32:
    cli
    cld

    /* The identity map (boot_pml4 and below) is prebuilt in .data: nothing
       to compute here. */

    /* CR4.PAE, then CR3, then EFER.LME, then CR0.PG|WP: the order the SDM requires. */
    movl %cr4, %eax
    orl $0x20, %eax
    movl %eax, %cr4

    movl $boot_pml4, %eax
    movl %eax, %cr3

    movl $0xc0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr

    movl %cr0, %eax
    orl $0x80010001, %eax
    movl %eax, %cr0

    lgdt boot_gdt_ptr
    ljmp $0x08, $long_mode_entry

    .code64
long_mode_entry:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs

    /* .bss holds the Rust statics that start at zero; zero it before any
       Rust runs. Nothing before this point uses .bss: the page tables are
       prebuilt in .data and the stacks sit in .stacks, which is never
       zeroed (a stack is written before it is read). That leaves a few KiB,
       cleared a qword per step with rep stosq (under an
       instruction-emulating hypervisor each step costs ~1,700 cycles; rep
       stosb would cost 8x as much per byte). The linker script aligns both
       ends to 8. EBX (start_info) survives: this touches RDI, RCX, RAX. */
    movabsq $__bss_start, %rdi
    movabsq $__bss_end, %rcx
    subq %rdi, %rcx
    shrq $3, %rcx
    xorl %eax, %eax
    rep stosq

    movabsq $boot_stack_top, %rsp
    xorl %ebp, %ebp
    movl %ebx, %edi
    call rust_entry
3:  hlt
    jmp 3b
    .popsection

    .pushsection .rodata.boot_gdt, "a"
    .p2align 3
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff   /* 0x08: 64-bit code, DPL 0 */
    .quad 0x00cf92000000ffff   /* 0x10: data, DPL 0 */
boot_gdt_end:
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .long boot_gdt
    .popsection

    /* Identity map of the low 4 GiB: PML4[0] -> PDPT, PDPT[0..4] -> four
       page directories of 512 x 2 MiB pages (present | writable | page
       size). Assembled here rather than built at run time: each emulated
       instruction of a fill loop costs ~2,000 cycles. */
    .pushsection .data.boot_tables, "aw"
    .p2align 12
    .global boot_pml4
boot_pml4:
    .quad boot_pdpt + 0x3
    .fill 511, 8, 0
boot_pdpt:
    .set boot_pd_i, 0
    .rept {pd_count}
    .quad boot_pd + boot_pd_i * 0x1000 + 0x3
    .set boot_pd_i, boot_pd_i + 1
    .endr
    .fill 512 - {pd_count}, 8, 0
boot_pd:
    .set boot_page_i, 0
    .rept {pd_entries}
    .quad boot_page_i * 0x200000 + 0x83
    .set boot_page_i, boot_page_i + 1
    .endr
    .popsection

    .pushsection .stacks.boot, "aw", @nobits
    .p2align 4
boot_stack_bottom:
    .skip {stack_size}
    .global boot_stack_top
boot_stack_top:
    .popsection
"#,
    pd_count = const BOOT_PD_COUNT,
    pd_entries = const BOOT_PD_COUNT * 512,
    stack_size = const BOOT_STACK_SIZE,
    options(att_syntax)
);
