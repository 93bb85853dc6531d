//! The device's clock: nanoseconds since the device was created.
//!
//! Only fault injection's deadlines (late acks and MSIs, paused engine
//! accesses) and the trace read it. It follows the host's monotonic clock,
//! except in tests that drive it by hand (`test-utils`): a test asserting
//! that an access is still paused must not depend on how long the host
//! took to get from the doorbell to the assertion.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Clone)]
pub(crate) struct Clock {
    epoch: Instant,
    manual: Option<Arc<AtomicU64>>,
}

impl Clock {
    pub(crate) fn new() -> Clock {
        Clock {
            epoch: Instant::now(),
            manual: None,
        }
    }

    pub(crate) fn now(&self) -> u64 {
        match &self.manual {
            // Relaxed: the value is the whole message; whoever advances it
            // then calls into the device, which orders the rest.
            Some(t) => t.load(Ordering::Relaxed),
            None => self.epoch.elapsed().as_nanos() as u64,
        }
    }

    #[cfg(feature = "test-utils")]
    pub(crate) fn set_manual(&mut self, t: &ManualClock) {
        self.manual = Some(t.0.clone());
    }
}

/// A device clock that moves only when told (tests). Cloning shares it.
#[cfg(feature = "test-utils")]
#[derive(Debug, Clone, Default)]
pub struct ManualClock(Arc<AtomicU64>);

#[cfg(feature = "test-utils")]
impl ManualClock {
    /// Device time now (ns).
    pub fn now(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Moves the clock forward by `ns`.
    pub fn advance(&self, ns: u64) {
        self.0.fetch_add(ns, Ordering::Relaxed);
    }
}
