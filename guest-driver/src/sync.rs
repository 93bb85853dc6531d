//! A test-and-set spin lock behind `lock_api`: the driver's own lock, and
//! the raw lock the firmware builds its `Mutex` and interrupt-safe locks on.
//!
//! The device state the driver guards (control-ring producer, channel
//! producers, page tables) is touched for short stretches and never from an
//! interrupt handler (the firmware's handler only records the vector; all
//! device work runs in the bottom half), so a spin lock is enough in the
//! guest. On the host (feature `sim`, tests) a waiter yields instead of
//! burning a shared core.

use core::sync::atomic::{AtomicBool, Ordering};

/// The raw spin lock.
pub struct RawSpin(AtomicBool);

// SAFETY: `lock` returns only after a successful acquire-CAS from false to
// true, `unlock` stores false with release order, so at most one holder
// exists and its critical section happens-before the next holder's.
unsafe impl lock_api::RawMutex for RawSpin {
    #[allow(clippy::declare_interior_mutable_const)]
    const INIT: RawSpin = RawSpin(AtomicBool::new(false));
    type GuardMarker = lock_api::GuardSend;

    fn lock(&self) {
        while !self.try_lock() {
            while self.0.load(Ordering::Relaxed) {
                relax();
            }
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

/// A mutex on [`RawSpin`].
pub type SpinMutex<T> = lock_api::Mutex<RawSpin, T>;
/// Its guard.
pub type SpinGuard<'a, T> = lock_api::MutexGuard<'a, RawSpin, T>;

#[inline]
fn relax() {
    #[cfg(any(test, feature = "sim"))]
    std::thread::yield_now();
    #[cfg(not(any(test, feature = "sim")))]
    core::hint::spin_loop();
}
