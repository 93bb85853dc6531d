//! Lock poisoning, decided once for every thread that shares the device
//! (vCPUs, the worker, vfio-user and test threads): a thread that panicked
//! while holding a lock has already reported it, and the others carry on
//! with whatever state it left instead of cascading the panic. Guest input
//! cannot cause such a panic; it would be a bug of ours, and a VMM that
//! keeps serving the guest is more use to its user than one that aborts.

use std::sync::{LockResult, Mutex, MutexGuard, PoisonError};

/// Lock `m`, poisoned or not.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    unpoisoned(m.lock())
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
}
