//! Locking for an interrupts-off kernel on one or more CPUs.
//!
//! The driver's test-and-set spinlock (`faultline_driver::sync`), so one raw lock backs
//! our own `Mutex<T>` and talc's `TalcLock`; and interrupt-safe variants
//! ([`IrqMutex`], [`IrqRwLock`]) for state that handlers share with the code
//! they interrupt.

pub use faultline_driver::sync::RawSpin as RawSpinlock;

pub type Mutex<T> = lock_api::Mutex<RawSpinlock, T>;

/// A static the CPU (or a hypervisor) reads by address, written once during
/// single-threaded bring-up: GDT, TSS, IDT, IST stacks, pvclock page.
/// Gives out raw pointers only; each user states why its access is exclusive.
#[repr(transparent)]
pub struct CpuStatic<T>(core::cell::UnsafeCell<T>);

// SAFETY: CpuStatic hands out raw pointers only; every dereference is an
// `unsafe` block at the use site that argues exclusivity (init-once guards).
unsafe impl<T> Sync for CpuStatic<T> {}

impl<T> CpuStatic<T> {
    pub const fn new(v: T) -> Self {
        CpuStatic(core::cell::UnsafeCell::new(v))
    }

    pub const fn get(&self) -> *mut T {
        self.0.get()
    }
}

// Interrupt-safe locks.
//
// A lock that an interrupt (or exception) handler may also take must keep
// interrupts off while held: on one CPU, a handler spinning on a lock the
// interrupted code holds never returns. The process address spaces use these
// (the GPU fault path may run from an interrupt bottom half on the same CPU).
//
// `lock_api` guards carry no per-guard state, so the "were interrupts on"
// bit lives in a per-CPU nesting count instead (`smp::PerCpu`, reached
// through GS): the first lock a CPU takes records it, its last one released
// restores it. Locks may be released in any order.

use core::sync::atomic::{AtomicU32, Ordering as AtomicOrdering};

use crate::smp;

// Plain loads and stores, no locked read-modify-write: the count is this
// CPU's and only changes with interrupts off, so nothing can interleave (and
// locked instructions are dear under an emulating hypervisor).
fn irq_push() {
    let were_on = x86_64::instructions::interrupts::are_enabled();
    x86_64::instructions::interrupts::disable();
    let depth = smp::irq_depth();
    smp::set_irq_depth(depth + 1);
    if depth == 0 {
        smp::set_irq_were_on(were_on);
    }
}

fn irq_pop() {
    let depth = smp::irq_depth();
    debug_assert!(depth > 0, "irq_pop without irq_push");
    smp::set_irq_depth(depth - 1);
    if depth == 1 && smp::irq_were_on() {
        x86_64::instructions::interrupts::enable();
    }
}

/// How many interrupt-safe locks this CPU holds right now. The process
/// runner checks it: a segmentation fault that abandons code holding one of
/// these locks would leave the lock (and interrupts) taken forever.
pub fn irq_lock_depth() -> u32 {
    smp::irq_depth()
}

/// Spins until `try_acquire` succeeds. Holders keep interrupts off and hold
/// briefly, so 10 s of contention means a deadlock (most likely a handler
/// spinning on what the code it interrupted holds). Say so instead of
/// hanging until the VMM's timeout.
#[cold]
fn spin_until(what: &str, mut try_acquire: impl FnMut() -> bool) {
    let deadline = crate::arch::time::Deadline::after_ms(10_000);
    while !try_acquire() {
        if deadline.expired() {
            panic!("{what}: spun for 10 s with interrupts off (deadlock?)");
        }
        core::hint::spin_loop();
    }
}

/// A spin lock that keeps interrupts off while held.
pub struct RawIrqSpinlock(RawSpinlock);

// SAFETY: mutual exclusion is RawSpinlock's (see there); the interrupt
// bookkeeping is balanced: every successful acquire pushes once and every
// release pops once, and a failed try pops what it pushed.
unsafe impl lock_api::RawMutex for RawIrqSpinlock {
    #[allow(clippy::declare_interior_mutable_const)]
    const INIT: Self = RawIrqSpinlock(RawSpinlock::INIT);
    // The interrupt state belongs to this CPU: a guard must not move.
    type GuardMarker = lock_api::GuardNoSend;

    fn lock(&self) {
        irq_push();
        if !lock_api::RawMutex::try_lock(&self.0) {
            spin_until("irq spinlock", || lock_api::RawMutex::try_lock(&self.0));
        }
    }

    fn try_lock(&self) -> bool {
        irq_push();
        let ok = lock_api::RawMutex::try_lock(&self.0);
        if !ok {
            irq_pop();
        }
        ok
    }

    unsafe fn unlock(&self) {
        // SAFETY: forwarded: the caller holds the lock.
        unsafe { lock_api::RawMutex::unlock(&self.0) };
        irq_pop();
    }
}

pub type IrqMutex<T> = lock_api::Mutex<RawIrqSpinlock, T>;

/// A reader/writer spin lock that keeps interrupts off while held (readers
/// included). Writers do not wait for readers to drain ahead of new readers:
/// readers on other CPUs could starve them, and no AP takes one yet.
pub struct RawIrqRwLock(AtomicU32);

const WRITER: u32 = 1 << 31;

impl RawIrqRwLock {
    fn try_shared(&self) -> bool {
        let s = self.0.load(AtomicOrdering::Relaxed);
        s & WRITER == 0
            && s + 1 < WRITER
            && self
                .0
                .compare_exchange(s, s + 1, AtomicOrdering::Acquire, AtomicOrdering::Relaxed)
                .is_ok()
    }

    fn try_exclusive(&self) -> bool {
        self.0
            .compare_exchange(0, WRITER, AtomicOrdering::Acquire, AtomicOrdering::Relaxed)
            .is_ok()
    }
}

// SAFETY: the state word is WRITER alone (one exclusive holder) or a reader
// count without WRITER; each transition is a CAS from an observed state, so a
// writer only enters from 0 and readers only while WRITER is clear. Acquire
// on entry and Release on exit order the protected data. Interrupt
// bookkeeping as for RawIrqSpinlock.
unsafe impl lock_api::RawRwLock for RawIrqRwLock {
    #[allow(clippy::declare_interior_mutable_const)]
    const INIT: Self = RawIrqRwLock(AtomicU32::new(0));
    type GuardMarker = lock_api::GuardNoSend;

    fn lock_shared(&self) {
        irq_push();
        if !self.try_shared() {
            spin_until("irq rwlock (read)", || self.try_shared());
        }
    }

    fn try_lock_shared(&self) -> bool {
        irq_push();
        let ok = self.try_shared();
        if !ok {
            irq_pop();
        }
        ok
    }

    unsafe fn unlock_shared(&self) {
        self.0.fetch_sub(1, AtomicOrdering::Release);
        irq_pop();
    }

    fn lock_exclusive(&self) {
        irq_push();
        if !self.try_exclusive() {
            spin_until("irq rwlock (write)", || self.try_exclusive());
        }
    }

    fn try_lock_exclusive(&self) -> bool {
        irq_push();
        let ok = self.try_exclusive();
        if !ok {
            irq_pop();
        }
        ok
    }

    unsafe fn unlock_exclusive(&self) {
        self.0.store(0, AtomicOrdering::Release);
        irq_pop();
    }

    fn is_locked(&self) -> bool {
        self.0.load(AtomicOrdering::Relaxed) != 0
    }

    fn is_locked_exclusive(&self) -> bool {
        self.0.load(AtomicOrdering::Relaxed) & WRITER != 0
    }
}

pub type IrqRwLock<T> = lock_api::RwLock<RawIrqRwLock, T>;
