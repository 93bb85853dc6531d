//! Local APIC in x2APIC mode: registers are MSRs (0x800 + offset/16), so no
//! MMIO mapping is needed and the same code works under every hypervisor.

use core::arch::x86_64::__cpuid;
use core::sync::atomic::{AtomicBool, Ordering};

use x86_64::registers::model_specific::Msr;

use super::idt::SPURIOUS_VECTOR;
use super::port::outb;

const IA32_APIC_BASE: u32 = 0x1b;
const APIC_BASE_X2APIC: u64 = 1 << 10;
const APIC_BASE_ENABLE: u64 = 1 << 11;
const X2APIC_ID: u32 = 0x802;
const X2APIC_VERSION: u32 = 0x803;
const X2APIC_SVR: u32 = 0x80f;
const X2APIC_LVT_TIMER: u32 = 0x832;
const X2APIC_LVT_LINT0: u32 = 0x835;
const X2APIC_LVT_ERROR: u32 = 0x837;
const IA32_TSC_DEADLINE: u32 = 0x6e0;
const LVT_TIMER_TSC_DEADLINE: u64 = 2 << 17;
const SVR_ENABLE: u64 = 1 << 8;
const LVT_MASKED: u64 = 1 << 16;

static ENABLED: AtomicBool = AtomicBool::new(false);

#[derive(Debug, Clone, Copy)]
pub struct ApicInfo {
    pub id: u32,
    pub version: u32,
    pub max_lvt: u32,
}

fn rdmsr(msr: u32) -> u64 {
    // SAFETY: only called for architectural MSRs that exist once x2APIC is
    // enabled (or IA32_APIC_BASE, which always exists with an APIC).
    unsafe { Msr::new(msr).read() }
}

fn wrmsr(msr: u32, v: u64) {
    // SAFETY: as for rdmsr; the values written are the architectural ones.
    unsafe { Msr::new(msr).write(v) }
}

pub fn x2apic_supported() -> bool {
    __cpuid(1).ecx & (1 << 21) != 0
}

/// Masks the 8259s and enables the boot CPU's x2APIC with the spurious
/// vector set and all local interrupt sources masked (interrupts stay off
/// until a driver wants them).
pub fn init() -> Result<ApicInfo, &'static str> {
    // The legacy 8259 PICs would otherwise deliver on vectors 8-15, which are
    // exceptions in long mode. Mask both; harmless where they do not exist.
    // SAFETY: OCW1 writes only change the PIC interrupt masks.
    unsafe {
        outb(0x21, 0xff);
        outb(0xa1, 0xff);
    }
    enable_local()
}

/// Enables this CPU's local APIC in x2APIC mode, every local interrupt
/// source masked (`init` on the boot CPU; each application processor
/// calls it for its own).
pub fn enable_local() -> Result<ApicInfo, &'static str> {
    if __cpuid(1).edx & (1 << 9) == 0 {
        return Err("no local APIC (CPUID.1:EDX[9])");
    }
    if !x2apic_supported() {
        return Err("no x2APIC (CPUID.1:ECX[21])");
    }
    let base = rdmsr(IA32_APIC_BASE);
    // xAPIC-enable must be set before (or with) the x2APIC bit; going from
    // disabled straight to x2APIC is an invalid transition.
    if base & APIC_BASE_ENABLE == 0 {
        wrmsr(IA32_APIC_BASE, base | APIC_BASE_ENABLE);
    }
    wrmsr(IA32_APIC_BASE, base | APIC_BASE_ENABLE | APIC_BASE_X2APIC);

    wrmsr(X2APIC_LVT_TIMER, LVT_MASKED);
    wrmsr(X2APIC_LVT_LINT0, LVT_MASKED);
    wrmsr(X2APIC_LVT_ERROR, LVT_MASKED);
    wrmsr(X2APIC_SVR, SVR_ENABLE | u64::from(SPURIOUS_VECTOR));
    ENABLED.store(true, Ordering::SeqCst);

    let version = rdmsr(X2APIC_VERSION) as u32;
    Ok(ApicInfo {
        id: rdmsr(X2APIC_ID) as u32,
        version: version & 0xff,
        max_lvt: (version >> 16) & 0xff,
    })
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::SeqCst)
}

/// Raw state for the self-test: (IA32_APIC_BASE, SVR, x2APIC ID).
pub fn snapshot() -> (u64, u64, u32) {
    (
        rdmsr(IA32_APIC_BASE),
        rdmsr(X2APIC_SVR),
        rdmsr(X2APIC_ID) as u32,
    )
}

const X2APIC_ICR: u32 = 0x830;
const ICR_FIXED: u64 = 0;
const ICR_INIT: u64 = 5 << 8;
const ICR_STARTUP: u64 = 6 << 8;
const ICR_LEVEL_ASSERT: u64 = 1 << 14;

/// An interprocessor interrupt, as the ICR encodes it.
#[derive(Debug, Clone, Copy)]
pub enum Ipi {
    /// Resets the target into wait-for-SIPI.
    Init,
    /// Starts a CPU waiting for SIPI in real mode at `page << 12`.
    Startup {
        page: u8,
    },
    Fixed {
        vector: u8,
    },
}

/// Sends `ipi` to the CPU with x2APIC ID `dest`. One MSR write: x2APIC
/// mode has no delivery-status bit to wait for.
pub fn send_ipi(dest: u32, ipi: Ipi) {
    let low = match ipi {
        Ipi::Init => ICR_INIT | ICR_LEVEL_ASSERT,
        Ipi::Startup { page } => ICR_STARTUP | ICR_LEVEL_ASSERT | u64::from(page),
        Ipi::Fixed { vector } => ICR_FIXED | ICR_LEVEL_ASSERT | u64::from(vector),
    };
    wrmsr(X2APIC_ICR, u64::from(dest) << 32 | low);
}

/// This CPU's x2APIC ID (MSI destinations).
pub fn id() -> u32 {
    rdmsr(X2APIC_ID) as u32
}

/// TSC-deadline timer mode (CPUID.1:ECX[24]).
pub fn tsc_deadline_supported() -> bool {
    enabled() && __cpuid(1).ecx & (1 << 24) != 0
}

/// Raises `vector` once the TSC reaches `tsc` (TSC-deadline mode).
pub fn arm_tsc_deadline(vector: u8, tsc: u64) {
    wrmsr(X2APIC_LVT_TIMER, LVT_TIMER_TSC_DEADLINE | u64::from(vector));
    // Ordered after the LVT write: the SDM asks for a fence between the mode
    // switch and the deadline write.
    core::sync::atomic::fence(Ordering::SeqCst);
    wrmsr(IA32_TSC_DEADLINE, tsc.max(1));
}

/// Cancels an armed deadline and masks the timer again.
pub fn disarm_timer() {
    wrmsr(IA32_TSC_DEADLINE, 0);
    wrmsr(X2APIC_LVT_TIMER, LVT_MASKED);
}
