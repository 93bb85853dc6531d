//! `crash=` on the command line: deliberate fatal errors, so the panic and
//! exception paths (and a VMM's handling of exit status 2) can be tested.

use crate::cmdline::Crash;
use crate::mm;
use crate::println;

pub fn crash(c: Crash) -> ! {
    let unmapped = mm::vmap::NEVER_MAPPED;
    println!("crash: {c:?} requested on the command line");
    match c {
        Crash::Panic => panic!("deliberate panic requested by crash=panic"),
        // SAFETY: deliberately raises #UD; the handler never returns here.
        Crash::InvalidOpcode => unsafe { core::arch::asm!("ud2", options(noreturn)) },
        // SAFETY: deliberately reads an address that is never mapped.
        Crash::PageFault => unsafe {
            core::arch::asm!("mov rax, [{}]", "ud2", in(reg) unmapped, options(noreturn))
        },
        // SAFETY: points RSP at unmapped memory, so delivering the #PF from
        // the push fails too and the CPU raises #DF on its IST stack.
        Crash::DoubleFault => unsafe {
            core::arch::asm!("mov rsp, {}", "push rax", "ud2", in(reg) unmapped + 0x800, options(noreturn))
        },
        Crash::StackOverflow => {
            let depth = recurse(0);
            panic!("recursion returned at depth {depth} without overflowing");
        }
    }
}

/// Unbounded recursion that the optimiser cannot turn into a loop: each frame
/// keeps a live buffer. Runs into the kernel stack's guard page.
#[inline(never)]
fn recurse(depth: u64) -> u64 {
    let mut buf = [0u8; 512];
    buf[(depth % 512) as usize] = depth as u8;
    let buf = core::hint::black_box(buf);
    if depth == u64::MAX {
        return 0;
    }
    recurse(depth + 1) + u64::from(buf[0])
}
