//! User mode: the CPU protections that separate it from the kernel, the way
//! in and out of ring 3, and the agent, the small user program that makes
//! the CPU side of every test's accesses to process memory.
//!
//! * **Protections.** User leaves (and the tables above them) carry U/S;
//!   kernel ones never do, so a user access to kernel memory is a page
//!   fault with P and U set. [`init`] turns on SMEP (the kernel never runs
//!   user code) and SMAP (the kernel touches user memory only inside
//!   [`with_user_access`], with RFLAGS.AC set) where CPUID leaf 7 reports
//!   them; [`smep_enabled`] / [`smap_enabled`] say which.
//! * **Entry and return** ([`entry`]): the kernel enters the agent with
//!   `iretq` (arguments in registers); the agent ends with `ud2` at one
//!   known address, and the #UD brings the result back (why an exception
//!   and not `syscall` or `int`: see [`entry`]). A user page fault goes to
//!   the running process's fault handler; one it cannot satisfy ends the
//!   call with a `Segfault`.
//! * **The agent** ([`agent`]): position-independent code on its own pages,
//!   mapped read+exec, user, into every process at [`AGENT_BASE`]. It has no
//!   stack and no data: everything travels in registers.
//!
//! The agent's mapping lives in PML4 slot 255, just above the processes'
//! range (`mm::USER_END`): one set of tables, built here once and linked
//! into every process PML4 like the kernel half, so mmap can never place a
//! mapping over it and process teardown never frees it (Linux's vsyscall
//! page is the same idea).

pub mod agent;
pub mod entry;

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use x86_64::registers::control::{Cr4, Cr4Flags};
use x86_64::VirtAddr;

use crate::arch::paging;
use crate::mm::process::pt_entry;

/// Where the agent's code is mapped in every process (PML4 slot 255).
pub const AGENT_BASE: u64 = 0x0000_7f80_0000_0000;

/// SMEP / SMAP are on (CR4), set once by [`init`].
static SMEP_ON: AtomicBool = AtomicBool::new(false);
static SMAP_ON: AtomicBool = AtomicBool::new(false);
/// The PML4 entry every process gets at slot 255 (0 before [`init`]).
static AGENT_PML4E: AtomicU64 = AtomicU64::new(0);

/// CPUID.(EAX=7,ECX=0):EBX bits.
const CPUID7_SMEP: u32 = 1 << 7;
const CPUID7_SMAP: u32 = 1 << 20;

/// Turns on SMEP and SMAP where the CPU has them and builds the agent's
/// page tables. Call once at boot, after the direct map and the frame
/// allocator, before the first process.
pub fn init() {
    let max = core::arch::x86_64::__cpuid(0).eax;
    let ebx = if max >= 7 {
        core::arch::x86_64::__cpuid_count(7, 0).ebx
    } else {
        0
    };
    let mut cr4 = Cr4Flags::empty();
    if ebx & CPUID7_SMEP != 0 {
        cr4 |= Cr4Flags::SUPERVISOR_MODE_EXECUTION_PROTECTION;
    }
    if ebx & CPUID7_SMAP != 0 {
        cr4 |= Cr4Flags::SUPERVISOR_MODE_ACCESS_PREVENTION;
    }
    // SAFETY: the kernel runs no user code (SMEP), and touches user memory
    // only through `with_user_access` (SMAP), which sets AC once SMAP_ON
    // says so; nothing touches user memory before the first process.
    unsafe { Cr4::update(|f| f.insert(cr4)) };
    SMAP_ON.store(
        cr4.contains(Cr4Flags::SUPERVISOR_MODE_ACCESS_PREVENTION),
        Ordering::SeqCst,
    );
    SMEP_ON.store(
        cr4.contains(Cr4Flags::SUPERVISOR_MODE_EXECUTION_PROTECTION),
        Ordering::SeqCst,
    );
    AGENT_PML4E.store(map_agent(), Ordering::SeqCst);
    log::debug!(
        "user mode: SMEP {}, SMAP {}, agent {} bytes at {AGENT_BASE:#x}",
        if smep_enabled() { "on" } else { "absent" },
        if smap_enabled() { "on" } else { "absent" },
        agent::code_len()
    );
}

/// Builds PDPT → PD → PT for the agent's pages at [`AGENT_BASE`] and
/// returns the PML4 entry that links them.
fn map_agent() -> u64 {
    use pt_entry::{A, P, U, W};
    let alloc = || {
        pt_entry::alloc_zeroed()
            .unwrap_or_else(|_| crate::fatal(format_args!("no frame for the agent's page tables")))
    };
    let (pdpt, pd, pt) = (alloc(), alloc(), alloc());
    let code = agent::code_start();
    let pages = agent::code_len().div_ceil(4096);
    assert!(
        code.is_multiple_of(4096) && pages <= 512,
        "agent code misplaced"
    );
    for i in 0..pages {
        let va = VirtAddr::new(code + i * 4096);
        let pa = paging::translate(va)
            .unwrap_or_else(|| crate::fatal(format_args!("agent code {va:?} not mapped")))
            .as_u64();
        // Read + exec (no W, no NX), user; A preset as for every leaf.
        pt_entry::write(pt, i as usize, pa | P | U | A);
    }
    // Tables: permissions are decided at the leaf.
    pt_entry::write(pd, 0, pt | P | W | U | A);
    pt_entry::write(pdpt, 0, pd | P | W | U | A);
    pdpt | P | W | U | A
}

/// The PML4 entry (slot 255) that maps the agent into a process.
pub fn agent_pml4e() -> u64 {
    let e = AGENT_PML4E.load(Ordering::Relaxed);
    assert!(e != 0, "user::init not called");
    e
}

pub fn smep_enabled() -> bool {
    SMEP_ON.load(Ordering::Relaxed)
}

pub fn smap_enabled() -> bool {
    SMAP_ON.load(Ordering::Relaxed)
}

/// RFLAGS.AC: with SMAP on, supervisor accesses to user pages are allowed
/// only while it is set.
pub const RFLAGS_AC: u64 = 1 << 18;

/// Runs `f` with supervisor access to user pages open (RFLAGS.AC set where
/// SMAP is on). The only place the kernel may touch user memory directly
/// (`mm::process::user`); a fault that abandons `f` clears AC on its way
/// out.
///
/// AC is set and cleared with `pushfq`/`popfq`, not `stac`/`clac`: this
/// host's KVM (kvm_pvm) emulates ring 0 and stops the VM with an internal
/// error at `stac`/`clac`, while `popfq` works on every hypervisor and has
/// the same effect on AC. The exception entry (`arch::idt`) clears AC the
/// same way.
pub fn with_user_access<R>(f: impl FnOnce() -> R) -> R {
    let smap = smap_enabled();
    if smap {
        set_ac(true);
    }
    let r = f();
    if smap {
        set_ac(false);
    }
    r
}

fn set_ac(on: bool) {
    let flags = x86_64::registers::rflags::read_raw();
    let flags = if on {
        flags | RFLAGS_AC
    } else {
        flags & !RFLAGS_AC
    };
    // SAFETY: only AC changes (every other flag is written back as read);
    // AC opens or closes supervisor access to user pages, nothing else in
    // ring 0. No `nomem`: memory accesses must not move across it.
    unsafe { core::arch::asm!("push {0}", "popfq", in(reg) flags) };
}
