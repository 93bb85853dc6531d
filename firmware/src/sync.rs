//! Locking for a single-CPU, interrupts-off kernel that will grow more CPUs.
//!
//! A plain test-and-set spinlock behind `lock_api`, so the same raw lock backs
//! our own `Mutex<T>` and talc's `TalcLock`.

use core::sync::atomic::{AtomicBool, Ordering};

pub struct RawSpinlock(AtomicBool);

// SAFETY: `lock` only returns once this CPU swapped the flag from false to
// true, and `unlock` is the only way it becomes false again, so at most one
// holder exists at a time; Acquire/Release order the protected data.
unsafe impl lock_api::RawMutex for RawSpinlock {
    #[allow(clippy::declare_interior_mutable_const)]
    const INIT: Self = RawSpinlock(AtomicBool::new(false));
    type GuardMarker = lock_api::GuardSend;

    fn lock(&self) {
        while !self.try_lock() {
            core::hint::spin_loop();
        }
    }

    fn try_lock(&self) -> bool {
        self.0
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    unsafe fn unlock(&self) {
        self.0.store(false, Ordering::Release);
    }
}

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
