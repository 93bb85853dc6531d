//! The agent: the user program that performs the CPU side of the tests.
//!
//! Position-independent assembly on pages of its own (`.text.agent`, page
//! aligned and page sized), mapped read+exec at [`AGENT_BASE`] in every
//! process. It uses no stack and no memory of its own: the kernel enters it
//! at its first byte with the operation in RAX and the arguments in other
//! registers, and it ends every operation on the `ud2` at `agent_done`,
//! results in registers (RAX = 0 on success). Its only memory accesses are
//! the ones asked for, made at CPL 3, so the CPU checks U/S, W and NX
//! against the process's page tables and page faults carry U.
//!
//! | RAX | operation | in | out |
//! |-----|-----------|----|-----|
//! | 0 | nothing (a round trip) | | |
//! | 1 | load u64 | RDI addr | RDX value |
//! | 2 | store u64 | RDI addr, RSI value | |
//! | 3 | `lock xadd` u64, RCX times | RDI addr, RSI addend, RCX times (≥ 1) | RDX the last old value |
//! | 4 | store a [`Pattern`] | RDI addr, RSI len, RDX base, RCX per word, R8 per page | |
//! | 5 | check a [`Pattern`] | as 4 | RAX 1 on a mismatch: RDI addr, RSI found, RDX expected |
//! | 6 | load ≤ 64 bytes | RDI addr, RSI len | R8..R15 (little-endian) |
//! | 7 | store ≤ 64 bytes | RDI addr, RSI len, R8..R15 | |
//! | 8 | build a [`ChaseList`] | RDI heap, RSI slots, R10 step, RCX nodes, R8 value offset | |
//! | 9 | spin until a u64 equals a value | RDI addr, RSI value, RCX max polls | RAX 1 if never seen, RDX last value |
//! | 10 | jump to user code | RDI target | (the target ends with `jmp rsi`) |
//!
//! Byte accesses (6, 7) touch exactly the bytes asked for, so a range that
//! ends at a mapping's edge faults only where the CPU would.

use alloc::sync::Arc;

use super::entry::Regs;
use super::AGENT_BASE;
use crate::mm::process::{ProcessMm, Segfault};

core::arch::global_asm!(
    r#"
    .pushsection .text.agent, "ax"
    .p2align 12
    .global agent_start
    .global agent_done
    .global agent_end
agent_start:
    cmp rax, 0
    je .Lagent_ok
    cmp rax, 1
    je .Lagent_load
    cmp rax, 2
    je .Lagent_store
    cmp rax, 3
    je .Lagent_xadd
    cmp rax, 4
    je .Lagent_fill
    cmp rax, 5
    je .Lagent_check
    cmp rax, 6
    je .Lagent_load_bytes
    cmp rax, 7
    je .Lagent_store_bytes
    cmp rax, 8
    je .Lagent_list
    cmp rax, 9
    je .Lagent_spin
    cmp rax, 10
    je .Lagent_jump
    mov rax, -1
    jmp agent_done
.Lagent_ok:
    xor eax, eax
agent_done:
    ud2

.Lagent_load:
    mov rdx, [rdi]
    jmp .Lagent_ok

.Lagent_store:
    mov [rdi], rsi
    jmp .Lagent_ok

.Lagent_xadd:
    mov rdx, rsi
    lock xadd [rdi], rdx
    sub rcx, 1
    ja .Lagent_xadd
    jmp .Lagent_ok

    /* r9 = offset; rdx = the word expected at it. */
.Lagent_fill:
    xor r9d, r9d
.Lfill_word:
    cmp r9, rsi
    jae .Lagent_ok
    mov [rdi + r9], rdx
    add rdx, rcx
    add r9, 8
    test r9d, 0xfff
    jnz .Lfill_word
    add rdx, r8
    jmp .Lfill_word

.Lagent_check:
    xor r9d, r9d
.Lcheck_word:
    cmp r9, rsi
    jae .Lagent_ok
    mov r10, [rdi + r9]
    cmp r10, rdx
    jne .Lcheck_bad
    add rdx, rcx
    add r9, 8
    test r9d, 0xfff
    jnz .Lcheck_word
    add rdx, r8
    jmp .Lcheck_word
.Lcheck_bad:
    add rdi, r9
    mov rsi, r10
    mov eax, 1
    jmp agent_done

    /* Words 7 down to 0 (rbx = the word's first offset), each built from
       its bytes 7 down to 0 (rcx) in rax, bytes at or past len as zero;
       each word enters the r8..r15 chain at r8, so word 0 ends in r8. */
.Lagent_load_bytes:
    mov ebx, 56
.Lload_word:
    xor eax, eax
    mov ecx, 7
.Lload_byte:
    shl rax, 8
    lea rdx, [rbx + rcx]
    cmp rdx, rsi
    jae .Lload_skip
    movzx ebp, byte ptr [rdi + rdx]
    or rax, rbp
.Lload_skip:
    sub rcx, 1
    jae .Lload_byte
    mov r15, r14
    mov r14, r13
    mov r13, r12
    mov r12, r11
    mov r11, r10
    mov r10, r9
    mov r9, r8
    mov r8, rax
    sub rbx, 8
    jae .Lload_word
    jmp .Lagent_ok

    /* Byte rcx comes from the low byte of r8; every 8 bytes the chain
       moves down one register. */
.Lagent_store_bytes:
    xor ecx, ecx
.Lstore_byte:
    cmp rcx, rsi
    jae .Lagent_ok
    mov [rdi + rcx], r8b
    shr r8, 8
    add rcx, 1
    test cl, 7
    jnz .Lstore_byte
    mov r8, r9
    mov r9, r10
    mov r10, r11
    mov r11, r12
    mov r12, r13
    mov r13, r14
    mov r14, r15
    jmp .Lstore_byte

    /* node(i) = heap + ((i * step) % slots) * 16 holds (next, value);
       next = node(i + 1), 0 for the last; value = i * i + r8. */
.Lagent_list:
    xor r9d, r9d
.Llist_node:
    cmp r9, rcx
    jae .Lagent_ok
    mov rax, r9
    imul rax, r10
    xor edx, edx
    div rsi
    shl rdx, 4
    lea rbx, [rdi + rdx]
    lea r11, [r9 + 1]
    xor ebp, ebp
    cmp r11, rcx
    jae .Llist_store
    mov rax, r11
    imul rax, r10
    xor edx, edx
    div rsi
    shl rdx, 4
    lea rbp, [rdi + rdx]
.Llist_store:
    mov [rbx], rbp
    mov rax, r9
    imul rax, r9
    add rax, r8
    mov [rbx + 8], rax
    mov r9, r11
    jmp .Llist_node

.Lagent_spin:
    mov rdx, [rdi]
    cmp rdx, rsi
    je .Lagent_ok
    pause
    sub rcx, 1
    ja .Lagent_spin
    mov eax, 1
    jmp agent_done

    /* The target returns to .Lagent_ok: RAX = 0, then the ud2. */
.Lagent_jump:
    lea rsi, [rip + .Lagent_ok]
    jmp rdi

    .p2align 12
agent_end:
    .popsection
"#
);

extern "C" {
    static agent_start: u8;
    static agent_done: u8;
    static agent_end: u8;
}

/// Kernel (link) address of the agent's first page.
pub fn code_start() -> u64 {
    core::ptr::addr_of!(agent_start) as u64
}

/// Bytes of agent code (whole pages).
pub fn code_len() -> u64 {
    core::ptr::addr_of!(agent_end) as u64 - code_start()
}

/// The user address of the agent's `ud2`: a #UD there ends a call.
pub fn done_addr() -> u64 {
    AGENT_BASE + (core::ptr::addr_of!(agent_done) as u64 - code_start())
}

const OP_NOP: u64 = 0;
const OP_LOAD: u64 = 1;
const OP_STORE: u64 = 2;
const OP_XADD: u64 = 3;
const OP_FILL: u64 = 4;
const OP_CHECK: u64 = 5;
const OP_LOAD_BYTES: u64 = 6;
const OP_STORE_BYTES: u64 = 7;
const OP_LIST: u64 = 8;
const OP_SPIN: u64 = 9;
const OP_JUMP: u64 = 10;

/// Bytes one byte-copy operation moves (R8..R15).
const CHUNK: usize = 64;

// The agent's operations take and give the suite's own descriptions of
// what the CPU does (the pattern a range holds, a mismatch, the
// pointer-chase list); the assembly only needs their fields.
pub use faultline_driver::gpu::suite::{ChaseList, Mismatch, Pattern};

/// The agent of one process: each method is one (or, for byte copies, one
/// per 64 bytes) round trip into user mode under the process's page tables.
/// A fault the address space cannot satisfy ends the operation with its
/// [`Segfault`]; what was done before it stays done.
pub struct Agent<'a> {
    mm: &'a Arc<ProcessMm>,
}

impl<'a> Agent<'a> {
    pub fn new(mm: &'a Arc<ProcessMm>) -> Agent<'a> {
        Agent { mm }
    }

    fn call(&self, op: u64, mut regs: Regs) -> Result<Regs, Segfault> {
        regs.rax = op;
        let out = crate::mm::process::call_user(self.mm, AGENT_BASE, regs)?;
        assert!(
            out.rax <= 1,
            "agent operation {op} answered {:#x} (unknown operation?)",
            out.rax
        );
        Ok(out)
    }

    /// One round trip that touches nothing.
    pub fn nop(&self) -> Result<(), Segfault> {
        self.call(OP_NOP, Regs::default()).map(|_| ())
    }

    pub fn read_u64(&self, addr: u64) -> Result<u64, Segfault> {
        let r = self.call(
            OP_LOAD,
            Regs {
                rdi: addr,
                ..Regs::default()
            },
        )?;
        Ok(r.rdx)
    }

    pub fn write_u64(&self, addr: u64, v: u64) -> Result<(), Segfault> {
        self.call(
            OP_STORE,
            Regs {
                rdi: addr,
                rsi: v,
                ..Regs::default()
            },
        )
        .map(|_| ())
    }

    /// `lock xadd` on the u64 at `addr` (8-byte aligned); the old value.
    pub fn atomic_add_u64(&self, addr: u64, v: u64) -> Result<u64, Segfault> {
        self.atomic_add_repeat(addr, v, 1)
    }

    /// `times` (≥ 1) `lock xadd`s of `v` in one user-mode loop; the old
    /// value the last one saw.
    pub fn atomic_add_repeat(&self, addr: u64, v: u64, times: u64) -> Result<u64, Segfault> {
        assert!(addr.is_multiple_of(8), "{addr:#x} is not 8-byte aligned");
        assert!(times >= 1, "no atomic to make");
        let r = self.call(
            OP_XADD,
            Regs {
                rdi: addr,
                rsi: v,
                rcx: times,
                ..Regs::default()
            },
        )?;
        Ok(r.rdx)
    }

    fn pattern_regs(addr: u64, len: u64, pat: Pattern) -> Regs {
        assert!(
            addr.is_multiple_of(8) && len.is_multiple_of(8),
            "pattern range {addr:#x}+{len:#x} is not in whole words"
        );
        Regs {
            rdi: addr,
            rsi: len,
            rdx: pat.base,
            rcx: pat.per_word,
            r8: pat.per_page,
            ..Regs::default()
        }
    }

    /// Stores `pat` over `[addr, addr + len)` (8-byte aligned, whole words).
    pub fn fill(&self, addr: u64, len: u64, pat: Pattern) -> Result<(), Segfault> {
        self.call(OP_FILL, Self::pattern_regs(addr, len, pat))
            .map(|_| ())
    }

    /// Loads every word of `[addr, addr + len)` and compares it with `pat`:
    /// the first word that differs, if any.
    pub fn check(&self, addr: u64, len: u64, pat: Pattern) -> Result<Option<Mismatch>, Segfault> {
        let r = self.call(OP_CHECK, Self::pattern_regs(addr, len, pat))?;
        Ok((r.rax == 1).then_some(Mismatch {
            addr: r.rdi,
            found: r.rsi,
            expected: r.rdx,
        }))
    }

    /// Copies process memory at `addr` into `out`.
    pub fn read_bytes(&self, addr: u64, out: &mut [u8]) -> Result<(), Segfault> {
        for (i, chunk) in out.chunks_mut(CHUNK).enumerate() {
            let r = self.call(
                OP_LOAD_BYTES,
                Regs {
                    rdi: addr + (i * CHUNK) as u64,
                    rsi: chunk.len() as u64,
                    ..Regs::default()
                },
            )?;
            let words = [r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15];
            for (j, b) in chunk.iter_mut().enumerate() {
                *b = words[j / 8].to_le_bytes()[j % 8];
            }
        }
        Ok(())
    }

    /// Copies `data` into process memory at `addr`.
    pub fn write_bytes(&self, addr: u64, data: &[u8]) -> Result<(), Segfault> {
        for (i, chunk) in data.chunks(CHUNK).enumerate() {
            let mut w = [0u64; 8];
            for (j, &b) in chunk.iter().enumerate() {
                w[j / 8] |= u64::from(b) << (8 * (j % 8));
            }
            self.call(
                OP_STORE_BYTES,
                Regs {
                    rdi: addr + (i * CHUNK) as u64,
                    rsi: chunk.len() as u64,
                    r8: w[0],
                    r9: w[1],
                    r10: w[2],
                    r11: w[3],
                    r12: w[4],
                    r13: w[5],
                    r14: w[6],
                    r15: w[7],
                    ..Regs::default()
                },
            )?;
        }
        Ok(())
    }

    /// Writes the nodes of `list`.
    pub fn build_list(&self, list: ChaseList) -> Result<(), Segfault> {
        assert!(list.slots > 0, "a list needs slots");
        self.call(
            OP_LIST,
            Regs {
                rdi: list.heap,
                rsi: list.slots,
                r10: list.step,
                rcx: list.nodes,
                r8: list.value_offset,
                ..Regs::default()
            },
        )
        .map(|_| ())
    }

    /// Polls the u64 at `addr` up to `polls` times (with `pause`) until it
    /// equals `value`: `Ok(None)` once it does, `Ok(Some(last))` if it never
    /// did.
    pub fn spin_until(&self, addr: u64, value: u64, polls: u64) -> Result<Option<u64>, Segfault> {
        let r = self.call(
            OP_SPIN,
            Regs {
                rdi: addr,
                rsi: value,
                rcx: polls,
                ..Regs::default()
            },
        )?;
        Ok((r.rax == 1).then_some(r.rdx))
    }

    /// Runs user code at `target`, which must end with `jmp rsi` (RSI holds
    /// the agent's return address when it starts).
    pub fn jump(&self, target: u64) -> Result<(), Segfault> {
        self.call(
            OP_JUMP,
            Regs {
                rdi: target,
                ..Regs::default()
            },
        )
        .map(|_| ())
    }
}
