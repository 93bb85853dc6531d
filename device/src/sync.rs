//! Locks shared with the device, decided once for every thread that shares
//! it (vCPUs, the worker, vfio-user and test threads).
//!
//! Poisoning: a thread that panicked while holding a lock has already
//! reported it, and the others carry on with whatever state it left
//! instead of cascading the panic. Guest input cannot cause such a panic;
//! it would be a bug of ours, and a VMM that keeps serving the guest is
//! more use to its user than one that aborts.
//!
//! The device itself lives in a [`DeviceMutex`]: a thread that has to
//! wait for it (a vCPU's register access, a vfio-user message) is let in
//! after the engine step in progress, however busy the engines are
//! (docs/architecture.md, "Hosting the GPU"). `lock` works on it and on
//! std's `Mutex`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LockResult, Mutex, PoisonError};

use vm_memory::GuestMemoryBackend;

use crate::device::Device;

/// The lock every host shares a device through (`Worker::spawn` takes an
/// `Arc` of it).
///
/// The worker holds it for one bounded step (`Device::process`) at a time.
/// An unfair mutex is not enough: the worker, already running, retakes it
/// right after each step while a woken waiter is still being scheduled,
/// step after step (9 s for a BAR0 read with 8 busy channels). So a thread
/// that finds it taken announces itself before it blocks, and the worker
/// does not retake the lock while anyone waits; it also unlocks fairly
/// (parking_lot's hand-over to a parked waiter). A waiter thus waits for at
/// most the step in progress plus its own wake-up. parking_lot's mutex does
/// not poison, so the poisoning rule above holds by construction.
pub struct DeviceMutex<M: GuestMemoryBackend> {
    device: parking_lot::Mutex<Device<M>>,
    /// Threads blocked in `lock`.
    waiting: AtomicUsize,
}

impl<M: GuestMemoryBackend> DeviceMutex<M> {
    pub fn new(device: Device<M>) -> Self {
        Self {
            device: parking_lot::Mutex::new(device),
            waiting: AtomicUsize::new(0),
        }
    }

    /// Lock for a host thread (register access, setup, stats).
    pub fn lock(&self) -> parking_lot::MutexGuard<'_, Device<M>> {
        if let Some(g) = self.device.try_lock() {
            return g;
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let g = self.device.lock();
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        g
    }

    pub fn try_lock(&self) -> Option<parking_lot::MutexGuard<'_, Device<M>>> {
        self.device.try_lock()
    }

    /// Lock for the worker's next step: first let in every thread already
    /// waiting (it announced itself and takes the lock as soon as it runs;
    /// the worker gives up its CPU meanwhile).
    pub(crate) fn lock_for_step(&self) -> parking_lot::MutexGuard<'_, Device<M>> {
        while self.waiting.load(Ordering::SeqCst) > 0 {
            std::thread::yield_now();
        }
        self.device.lock()
    }

    /// End the worker's step: hand the lock straight to a parked waiter.
    pub(crate) fn unlock_after_step(guard: parking_lot::MutexGuard<'_, Device<M>>) {
        parking_lot::MutexGuard::unlock_fair(guard);
    }
}

/// A lock [`lock`] can take: std's `Mutex` (poisoned or not) and
/// [`DeviceMutex`], directly or behind `Arc` / `&`.
pub trait Lock {
    type Guard<'a>
    where
        Self: 'a;
    fn lock_unpoisoned(&self) -> Self::Guard<'_>;
}

impl<T: ?Sized> Lock for Mutex<T> {
    type Guard<'a>
        = std::sync::MutexGuard<'a, T>
    where
        Self: 'a;
    fn lock_unpoisoned(&self) -> Self::Guard<'_> {
        unpoisoned(self.lock())
    }
}

impl<M: GuestMemoryBackend> Lock for DeviceMutex<M> {
    type Guard<'a>
        = parking_lot::MutexGuard<'a, Device<M>>
    where
        Self: 'a;
    fn lock_unpoisoned(&self) -> Self::Guard<'_> {
        self.lock()
    }
}

impl<L: Lock + ?Sized> Lock for Arc<L> {
    type Guard<'a>
        = L::Guard<'a>
    where
        Self: 'a;
    fn lock_unpoisoned(&self) -> Self::Guard<'_> {
        (**self).lock_unpoisoned()
    }
}

impl<L: Lock + ?Sized> Lock for &L {
    type Guard<'a>
        = L::Guard<'a>
    where
        Self: 'a;
    fn lock_unpoisoned(&self) -> Self::Guard<'_> {
        (**self).lock_unpoisoned()
    }
}

/// Lock `m`, poisoned or not.
pub fn lock<L: Lock + ?Sized>(m: &L) -> L::Guard<'_> {
    m.lock_unpoisoned()
}

/// The guard of any lock result (`RwLock::read`, `Condvar::wait`, ...),
/// poisoned or not.
pub fn unpoisoned<G>(r: LockResult<G>) -> G {
    r.unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_still_locks() {
        let m = std::sync::Arc::new(Mutex::new(1));
        let m2 = m.clone();
        let r = std::thread::spawn(move || {
            let _g = m2.lock();
            panic!("poison it");
        })
        .join();
        assert!(r.is_err());
        assert!(m.is_poisoned());
        *lock(&m) += 1;
        assert_eq!(*lock(&m), 2);
    }

    #[test]
    fn a_device_lock_whose_holder_panicked_still_locks() {
        let mem =
            vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)])
                .unwrap();
        struct NoIrq;
        impl crate::InterruptSink for NoIrq {
            fn trigger(&self, _: u32) {}
        }
        let m = Arc::new(DeviceMutex::new(Device::new(mem, Arc::new(NoIrq))));
        let m2 = m.clone();
        let r = std::thread::spawn(move || {
            let _g = lock(&m2);
            panic!("unwind while holding it");
        })
        .join();
        assert!(r.is_err());
        assert!(!lock(&m).process());
        assert!(!lock(&*m).process());
    }
}
