//! More than one CPU: finding them (the ACPI MADT), starting the
//! application processors (INIT-SIPI-SIPI through the x2APIC, the real-mode
//! trampoline), per-CPU data through GS, and the one primitive that uses
//! them so far: run a function on CPU n and wait for its result.
//!
//! CPUs are numbered by index: 0 is the boot CPU, then the MADT's other
//! enabled entries in table order. Every CPU's [`PerCpu`] exists from
//! [`init`] on, whether or not the CPU came up; `online` tells.
//!
//! An AP runs [`idle`]: interrupts on, `hlt` until a kick IPI arrives, then
//! the call in its slot, with interrupts off. A call may take the
//! interrupt-safe locks (their nesting lives here, per CPU) and print, but
//! not use a process address space (no TLB shootdown yet).

pub mod acpi;
mod trampoline;

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use x86_64::registers::model_specific::Msr;

use crate::arch::{apic, gdt, idt, irq, paging, time};

const IA32_GS_BASE: u32 = 0xc000_0101;
/// CPUs started at most. Each AP costs 48 KiB of heap (IST stacks) and
/// 64 KiB of frames (kernel stack); a hostile or huge MADT must not eat
/// the heap the tests need. The rest are listed as skipped.
pub const MAX_CPUS: usize = 64;
/// An AP's kernel stack (it runs calls and interrupts, no processes).
const AP_STACK_PAGES: u64 = 16;
/// How long an AP may take from INIT to its idle loop. Under this host's
/// PVM every supervisor instruction is emulated (~1 µs); the trampoline and
/// entry are a few hundred.
const AP_START_TIMEOUT_MS: u64 = 1000;
/// How long `call_on` waits for the result.
pub const CALL_TIMEOUT_MS: u64 = 1000;

/// One CPU's state; GS points at it on that CPU.
#[repr(C)]
pub struct PerCpu {
    /// This struct's own address (read as `gs:[0]`: one load finds it).
    self_addr: AtomicU64,
    pub index: u32,
    /// Set once, before the CPU starts (the boot CPU's in `init`).
    apic_id: AtomicU32,
    online: AtomicBool,
    /// Calls this CPU ran, ever.
    calls: AtomicU64,
    /// The trampoline stage an AP that never came up reached.
    stage: AtomicU32,
    /// TSC ticks from its INIT to online.
    start_ticks: AtomicU64,
    /// `crate::sync`'s interrupt-lock nesting on this CPU, and whether
    /// interrupts were on when the outermost lock was taken. Only this CPU
    /// touches them, with interrupts off, through `gs:` (no `&self`).
    irq_depth: AtomicU32,
    irq_were_on: AtomicBool,
    slot: CallSlot,
    tables: Option<gdt::CpuTables>,
}

/// The work slot: a caller stores the function and argument and bumps
/// `request`; the CPU runs it and sets `done` to that number.
struct CallSlot {
    /// Serialises callers (a real spinlock: callers may be on any CPU).
    callers: crate::sync::Mutex<()>,
    request: AtomicU64,
    done: AtomicU64,
    func: AtomicUsize,
    arg: AtomicU64,
    result: AtomicU64,
}

impl PerCpu {
    const fn new(index: u32, apic_id: u32, tables: Option<gdt::CpuTables>) -> PerCpu {
        PerCpu {
            self_addr: AtomicU64::new(0),
            index,
            apic_id: AtomicU32::new(apic_id),
            online: AtomicBool::new(false),
            calls: AtomicU64::new(0),
            stage: AtomicU32::new(0),
            start_ticks: AtomicU64::new(0),
            irq_depth: AtomicU32::new(0),
            irq_were_on: AtomicBool::new(false),
            slot: CallSlot {
                callers: crate::sync::Mutex::new(()),
                request: AtomicU64::new(0),
                done: AtomicU64::new(0),
                func: AtomicUsize::new(0),
                arg: AtomicU64::new(0),
                result: AtomicU64::new(0),
            },
            tables,
        }
    }

    /// The x2APIC ID the platform tables gave for this CPU.
    pub fn apic_id(&self) -> u32 {
        self.apic_id.load(Ordering::Relaxed)
    }

    pub fn online(&self) -> bool {
        self.online.load(Ordering::Acquire)
    }

    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Acquire)
    }

    /// How far the trampoline got on a CPU that is not online (0: it never
    /// ran, 1 real mode, 2 protected mode, 3 long mode, 4 Rust entry).
    pub fn stage(&self) -> u32 {
        self.stage.load(Ordering::Acquire)
    }

    /// Makes GS point at `self` on the calling CPU.
    fn install(&'static self) {
        let addr = self as *const PerCpu as u64;
        self.self_addr.store(addr, Ordering::Relaxed);
        // SAFETY: IA32_GS_BASE exists in long mode; nothing in the firmware
        // uses GS but `this_cpu`, which expects exactly this.
        unsafe { Msr::new(IA32_GS_BASE).write(addr) };
    }
}

/// The boot CPU's, static so it exists before the heap does.
static BOOT_CPU: PerCpu = PerCpu::new(0, 0, None);
static BOOT_CPU_ONLY: [&PerCpu; 1] = [&BOOT_CPU];

/// Every CPU the MADT listed (index order), published once by `init`.
static CPUS: AtomicPtr<&'static PerCpu> = AtomicPtr::new(core::ptr::null_mut());
static CPU_COUNT: AtomicUsize = AtomicUsize::new(0);
/// The boot CPU's CR4, which each AP copies in its Rust entry (SMEP, SMAP:
/// the trampoline sets only PAE).
static BOOT_CR4: AtomicU64 = AtomicU64::new(0);
/// `cpus=N` from the command line: how many CPUs the run was given.
static EXPECTED: AtomicU64 = AtomicU64::new(0);

/// Points GS at the boot CPU's data. `rust_entry` calls it right after
/// loading the GDT (which clears GS), before any interrupt-safe lock can be
/// taken: their nesting count is reached through GS.
pub fn install_boot_cpu() {
    BOOT_CPU.install();
}

// The interrupt-lock nesting of `crate::sync`, one `gs:`-relative
// instruction per access: it runs on every lock and unlock, where a global
// cost the same and a `this_cpu()` pointer chase one more.

/// This CPU's interrupt-lock nesting depth.
#[inline(always)]
pub fn irq_depth() -> u32 {
    let d: u32;
    // SAFETY: GS points at this CPU's 'static PerCpu from `install_boot_cpu`
    // (boot CPU) or `ap_entry` (APs) on; the field is an AtomicU32 that only
    // this CPU accesses.
    unsafe {
        core::arch::asm!(
            "mov {d:e}, gs:[{off}]",
            d = out(reg) d,
            off = const core::mem::offset_of!(PerCpu, irq_depth),
            options(nostack, readonly, preserves_flags)
        )
    };
    d
}

#[inline(always)]
pub fn set_irq_depth(d: u32) {
    // SAFETY: as in `irq_depth`; a plain store to this CPU's own field.
    unsafe {
        core::arch::asm!(
            "mov gs:[{off}], {d:e}",
            d = in(reg) d,
            off = const core::mem::offset_of!(PerCpu, irq_depth),
            options(nostack, preserves_flags)
        )
    };
}

/// Whether interrupts were on when this CPU took its outermost
/// interrupt-safe lock.
#[inline(always)]
pub fn irq_were_on() -> bool {
    let b: u8;
    // SAFETY: as in `irq_depth`; an AtomicBool is one byte, 0 or 1.
    unsafe {
        core::arch::asm!(
            "mov {b}, byte ptr gs:[{off}]",
            b = out(reg_byte) b,
            off = const core::mem::offset_of!(PerCpu, irq_were_on),
            options(nostack, readonly, preserves_flags)
        )
    };
    b != 0
}

#[inline(always)]
pub fn set_irq_were_on(on: bool) {
    // SAFETY: as in `irq_depth`; stores 0 or 1 into an AtomicBool.
    unsafe {
        core::arch::asm!(
            "mov byte ptr gs:[{off}], {b}",
            b = in(reg_byte) u8::from(on),
            off = const core::mem::offset_of!(PerCpu, irq_were_on),
            options(nostack, preserves_flags)
        )
    };
}

/// The calling CPU's data (GS is set from `install_boot_cpu` on).
pub fn this_cpu() -> &'static PerCpu {
    let addr: u64;
    // SAFETY: `init` (boot CPU) and `ap_entry` (APs) point GS at a 'static
    // PerCpu before anything calls this; reading its first field has no
    // side effect.
    unsafe {
        core::arch::asm!("mov {}, gs:[0]", out(reg) addr, options(nostack, readonly, preserves_flags))
    };
    // SAFETY: as above: the address of a 'static PerCpu.
    unsafe { &*(addr as *const PerCpu) }
}

/// Every CPU the platform described, online or not (the boot CPU alone
/// before `init`).
pub fn cpus() -> &'static [&'static PerCpu] {
    let p = CPUS.load(Ordering::Acquire);
    if p.is_null() {
        return &BOOT_CPU_ONLY;
    }
    // SAFETY: published once by `init` from a leaked boxed slice of
    // CPU_COUNT entries, never changed afterwards.
    unsafe { core::slice::from_raw_parts(p, CPU_COUNT.load(Ordering::Acquire)) }
}

/// `cpus=N` of the command line (None if not given).
pub fn expected_cpus() -> Option<u64> {
    match EXPECTED.load(Ordering::Relaxed) {
        0 => None,
        n => Some(n),
    }
}

/// Where the trampoline may go: the highest RAM page below 640 KiB that no
/// loader data occupies. Chosen while the start info is at hand; nothing
/// below 1 MiB is ever allocated, so it stays free.
pub fn pick_trampoline_page(boot: &crate::boot::pvh::BootInfo) -> Option<u64> {
    let free = |p: u64| {
        let page = (p, p + 4096);
        boot.memmap()
            .iter()
            .any(|e| e.kind == crate::boot::pvh::E820_RAM && e.addr <= p && page.1 <= e.end())
            && boot
                .reserved()
                .iter()
                .all(|&(s, e)| e <= page.0 || s >= page.1)
    };
    (1..0xa0u64).rev().map(|n| n << 12).find(|&p| free(p))
}

/// What `init` found and did, logged by `log_report` once boot's timing
/// marks are taken (formatting a line costs ~1 ms of emulated code).
pub struct Report {
    pub listed: usize,
    pub online: usize,
    /// TSC ticks from before the first AP's stack is mapped to the last AP
    /// online (or given up on).
    pub start_ticks: u64,
    /// The RSDP's address and the MADT's skipped processor entries.
    madt: Option<(u64, u32)>,
}

/// The debug lines of `init` (its warnings and errors it prints itself),
/// and one info line when there is more than one CPU.
pub fn log_report(r: &Report) {
    if let Some((rsdp, skipped)) = r.madt {
        log::debug!(
            "acpi: RSDP at {rsdp:#x}, MADT lists {} CPUs ({skipped} skipped)",
            r.listed
        );
    }
    for cpu in cpus().iter().skip(1).filter(|c| c.online()) {
        log::debug!(
            "smp: cpu {} (APIC {}) online {} us after its INIT",
            cpu.index,
            cpu.apic_id(),
            time::ticks_to_ns(cpu.start_ticks.load(Ordering::Relaxed)) / 1000
        );
    }
    if r.listed > 1 {
        log::info!(
            "cpus: {} of {} online, APs started in {} us",
            r.online,
            r.listed,
            time::ticks_to_ns(r.start_ticks) / 1000
        );
    }
}

/// Finds the CPUs and starts every AP. `rsdp`: start_info's RSDP address
/// (0: scan); `trampoline`: from `pick_trampoline_page`; `expected`:
/// `cpus=` of the command line. On one CPU (the MADT lists only the boot
/// CPU, or there is no MADT) this reads the tables and does nothing else.
pub fn init(rsdp: u64, trampoline: Option<u64>, expected: Option<u64>) -> Report {
    EXPECTED.store(expected.unwrap_or(0), Ordering::Relaxed);
    let boot_apic = apic::id();
    BOOT_CPU.apic_id.store(boot_apic, Ordering::Relaxed);
    BOOT_CPU.online.store(true, Ordering::Release);

    let mut report = Report {
        listed: 1,
        online: 1,
        start_ticks: 0,
        madt: None,
    };
    let ids = match acpi::read_madt(rsdp) {
        Ok(m) => {
            report.madt = Some((m.rsdp, m.skipped));
            m.apic_ids
        }
        Err(e) => {
            log::warn!("acpi: {e}; running on the boot CPU only");
            Vec::new()
        }
    };
    if !ids.contains(&boot_apic) && !ids.is_empty() {
        log::warn!("acpi: the MADT does not list the boot CPU (APIC {boot_apic})");
    }
    if ids.iter().all(|&id| id == boot_apic) {
        // One CPU: `cpus()` keeps returning the boot CPU alone.
        return report;
    }
    let mut aps: Vec<u32> = ids.into_iter().filter(|&id| id != boot_apic).collect();
    if aps.len() >= MAX_CPUS {
        log::warn!(
            "smp: the MADT lists {} CPUs; starting the first {MAX_CPUS}",
            aps.len() + 1
        );
        aps.truncate(MAX_CPUS - 1);
    }
    let mut all: Vec<&'static PerCpu> = Vec::with_capacity(aps.len() + 1);
    all.push(&BOOT_CPU);
    for (i, &id) in aps.iter().enumerate() {
        let cpu = PerCpu::new(i as u32 + 1, id, Some(gdt::new_cpu_tables()));
        all.push(Box::leak(Box::new(cpu)));
    }
    let count = all.len();
    CPU_COUNT.store(count, Ordering::Release);
    CPUS.store(
        Box::leak(all.into_boxed_slice()).as_mut_ptr(),
        Ordering::Release,
    );
    report.listed = count;
    if !apic::enabled() {
        // INIT, SIPI and the kick are x2APIC MSR writes (QEMU 7.2's TCG has
        // no x2APIC and ignores them).
        log::warn!("smp: no x2APIC, so no IPIs; one CPU only");
        return report;
    }
    let Some(page) = trampoline else {
        log::warn!("smp: no free page below 640 KiB for the trampoline; one CPU only");
        return report;
    };
    irq::install_kick();
    // SAFETY: `pick_trampoline_page` chose a free low RAM page, which the
    // boot identity map covers writable and executable.
    let tramp = unsafe { trampoline::Trampoline::install(page) };
    BOOT_CR4.store(
        x86_64::registers::control::Cr4::read_raw(),
        Ordering::Relaxed,
    );
    let cr3 = paging::kernel_pml4_phys().as_u64();
    assert!(
        cr3 < 1 << 32,
        "the kernel PML4 must be reachable from 32-bit mode"
    );
    let efer = x86_64::registers::model_specific::Efer::read_raw() & !(1 << 10);
    let cr0 = x86_64::registers::control::Cr0::read_raw();
    let t0 = time::rdtsc();
    for cpu in &cpus()[1..] {
        if start_ap(&tramp, cpu, cr3 as u32, cr0 as u32, efer as u32) {
            report.online += 1;
        }
    }
    report.start_ticks = time::rdtsc() - t0;
    report
}

/// INIT-SIPI-SIPI to `cpu` and wait for it to reach its idle loop.
fn start_ap(
    t: &trampoline::Trampoline,
    cpu: &'static PerCpu,
    cr3: u32,
    cr0: u32,
    efer: u32,
) -> bool {
    let stack = match crate::boot::map_stack(AP_STACK_PAGES, None) {
        Ok(base) => base + AP_STACK_PAGES * 4096,
        Err(e) => {
            log::warn!("smp: stack of cpu {}: {e}", cpu.index);
            return false;
        }
    };
    t.prepare(trampoline::Mailbox {
        stage: 0,
        cr3,
        cr0,
        efer,
        stack_top: stack.as_u64(),
        entry: ap_entry as *const () as u64,
        arg: cpu as *const PerCpu as u64,
    });
    let t0 = time::rdtsc();
    // The SDM's waits (10 ms after INIT, 200 µs between SIPIs) are for
    // old parts; like Linux on current CPUs, none after INIT and a short
    // one before the second SIPI, which a CPU already running ignores.
    let sipi = apic::Ipi::Startup {
        page: t.sipi_page(),
    };
    apic::send_ipi(cpu.apic_id(), apic::Ipi::Init);
    apic::send_ipi(cpu.apic_id(), sipi);
    time::busy_wait_ns(10_000);
    apic::send_ipi(cpu.apic_id(), sipi);
    let up = time::Deadline::after_ms(AP_START_TIMEOUT_MS)
        .poll(|| cpu.online())
        .is_ok();
    let stage = t.stage().max(cpu.stage());
    cpu.stage.store(stage, Ordering::Release);
    if up {
        cpu.start_ticks.store(time::rdtsc() - t0, Ordering::Relaxed);
    } else {
        log::error!(
            "smp: cpu {} (APIC {}) did not come up in {AP_START_TIMEOUT_MS} ms (stage {stage})",
            cpu.index,
            cpu.apic_id()
        );
    }
    up
}

/// Stage value an AP sets once it runs Rust code.
const STAGE_RUST: u32 = 4;

/// Where the trampoline lands, on the AP's own stack, interrupts off.
extern "C" fn ap_entry(cpu: &'static PerCpu) -> ! {
    cpu.stage.store(STAGE_RUST, Ordering::Release);
    // SAFETY: the boot CPU's CR4 value, valid on an identical vCPU; the
    // trampoline set PAE, which it includes.
    unsafe { x86_64::registers::control::Cr4::write_raw(BOOT_CR4.load(Ordering::Relaxed)) };
    gdt::load_ap(cpu.tables.as_ref().expect("an AP has its own tables"));
    idt::load();
    cpu.install();
    if apic::enable_local().is_err() {
        // The boot CPU has an x2APIC, so this one has: unreachable in
        // practice, and without it no kick could reach this CPU.
        loop {
            x86_64::instructions::hlt();
        }
    }
    cpu.online.store(true, Ordering::Release);
    idle(cpu)
}

/// The AP's loop: run what the slot holds, else halt with interrupts on.
/// `sti; hlt` is one step (STI's shadow), so a kick that lands between the
/// check and the `hlt` ends that `hlt` rather than being missed.
fn idle(cpu: &'static PerCpu) -> ! {
    let slot = &cpu.slot;
    loop {
        x86_64::instructions::interrupts::disable();
        let req = slot.request.load(Ordering::Acquire);
        if req != slot.done.load(Ordering::Relaxed) {
            let f = slot.func.load(Ordering::Relaxed);
            // SAFETY: `call_on` stored a `fn(u64) -> u64` there before
            // publishing `request` (Release, read with Acquire above).
            let f: fn(u64) -> u64 = unsafe { core::mem::transmute(f) };
            let r = f(slot.arg.load(Ordering::Relaxed));
            slot.result.store(r, Ordering::Relaxed);
            cpu.calls.fetch_add(1, Ordering::Relaxed);
            slot.done.store(req, Ordering::Release);
            continue;
        }
        x86_64::instructions::interrupts::enable_and_hlt();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallError {
    NoSuchCpu,
    Offline,
    /// No result within `CALL_TIMEOUT_MS`; the CPU is marked offline.
    TimedOut,
}

/// Runs `f(arg)` on CPU `index` and returns its result: directly when that
/// is the calling CPU, else through its slot and a kick IPI, waiting up to
/// `CALL_TIMEOUT_MS`. `f` runs with interrupts off and under the limits
/// the module documentation lists.
pub fn call_on(index: usize, f: fn(u64) -> u64, arg: u64) -> Result<u64, CallError> {
    let cpu = *cpus().get(index).ok_or(CallError::NoSuchCpu)?;
    if core::ptr::eq(cpu, this_cpu()) {
        let r = f(arg);
        cpu.calls.fetch_add(1, Ordering::Relaxed);
        return Ok(r);
    }
    start_on(index, f, arg)?.wait(CALL_TIMEOUT_MS)
}

/// A call `start_on` sent, running on another CPU while the caller goes
/// on. Further calls to that CPU wait until this one is waited for.
/// Dropping it unwaited waits `CALL_TIMEOUT_MS` (the slot must not be
/// reused while the CPU may still read it).
#[must_use]
pub struct Pending {
    cpu: &'static PerCpu,
    req: u64,
    waited: bool,
    _serial: lock_api::MutexGuard<'static, crate::sync::RawSpinlock, ()>,
}

/// Sends `f(arg)` to CPU `index`, another than the calling one, and
/// returns without waiting: what the caller does meanwhile runs
/// concurrently with it.
pub fn start_on(index: usize, f: fn(u64) -> u64, arg: u64) -> Result<Pending, CallError> {
    let cpu = *cpus().get(index).ok_or(CallError::NoSuchCpu)?;
    if !cpu.online() || core::ptr::eq(cpu, this_cpu()) {
        return Err(CallError::Offline);
    }
    let slot = &cpu.slot;
    let serial = slot.callers.lock();
    slot.func.store(f as *const () as usize, Ordering::Relaxed);
    slot.arg.store(arg, Ordering::Relaxed);
    let req = slot.request.load(Ordering::Relaxed) + 1;
    slot.request.store(req, Ordering::Release);
    apic::send_ipi(
        cpu.apic_id(),
        apic::Ipi::Fixed {
            vector: irq::KICK_VECTOR,
        },
    );
    Ok(Pending {
        cpu,
        req,
        waited: false,
        _serial: serial,
    })
}

impl Pending {
    /// The call's result, waiting up to `timeout_ms` for it.
    pub fn wait(mut self, timeout_ms: u64) -> Result<u64, CallError> {
        self.finish(timeout_ms)
    }

    fn finish(&mut self, timeout_ms: u64) -> Result<u64, CallError> {
        self.waited = true;
        let slot = &self.cpu.slot;
        match time::Deadline::after_ms(timeout_ms)
            .poll(|| slot.done.load(Ordering::Acquire) == self.req)
        {
            Ok(()) => Ok(slot.result.load(Ordering::Relaxed)),
            Err(time::TimedOut) => {
                // It may still run the call later: never hand it another.
                self.cpu.online.store(false, Ordering::Release);
                Err(CallError::TimedOut)
            }
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.waited {
            let _ = self.finish(CALL_TIMEOUT_MS);
        }
    }
}
