/* The smallest PVH guest: writes 0 to the debug-exit port (0xf4) and halts.
   `scripts/bench.sh boot` boots it to measure what a hypervisor costs
   around a guest that does nothing. Built by scripts/pvh-min/build.sh. */

    .section .note.pvh, "a", @note
    .p2align 2
    .long 4          /* namesz: "Xen\0" */
    .long 4          /* descsz: 32-bit physical entry */
    .long 18         /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .p2align 2
    .long pvh_start32

    .text
    .code32
    .globl pvh_start32
pvh_start32:
    xorl %eax, %eax
    outl %eax, $0xf4
1:  hlt
    jmp 1b
