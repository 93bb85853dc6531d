//! A small std-thread worker that runs `Device::process` whenever a doorbell
//! is rung. Hosts with their own event loop can ignore it and call
//! `process()` themselves.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use vm_memory::GuestMemoryBackend;

use crate::device::{Device, Doorbells};

#[derive(Default)]
struct Shared {
    kicked: Mutex<bool>,
    cv: Condvar,
    shutdown: AtomicBool,
}

impl Shared {
    fn kick(&self) {
        let mut k = self.kicked.lock().unwrap_or_else(|e| e.into_inner());
        *k = true;
        self.cv.notify_one();
    }
}

/// Rings doorbells and wakes the worker; cheap to clone, usable from
/// ioeventfd handler threads without touching the device lock.
#[derive(Clone)]
pub struct Waker {
    doorbells: Arc<Doorbells>,
    shared: Arc<Shared>,
}

impl Waker {
    pub fn ring(&self, index: u32) {
        self.doorbells.ring(index);
        self.shared.kick();
    }
    /// Wake without a doorbell (e.g. after a register write that enabled a
    /// channel).
    pub fn wake(&self) {
        self.shared.kick();
    }
}

pub struct Worker {
    /// Its `shared` is the worker thread's state too.
    waker: Waker,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Spawn the worker thread for `device`. It installs itself as the
    /// device's waker so doorbells written through `mmio_write` wake it.
    pub fn spawn<M>(device: Arc<Mutex<Device<M>>>) -> std::io::Result<Worker>
    where
        M: GuestMemoryBackend + Send + 'static,
    {
        let shared = Arc::new(Shared::default());
        let doorbells = {
            let mut d = device.lock().unwrap_or_else(|e| e.into_inner());
            let s = shared.clone();
            d.set_waker(Arc::new(move || s.kick()));
            d.doorbells()
        };
        let waker = Waker {
            doorbells,
            shared: shared.clone(),
        };
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("faultline-gpu".into())
            .spawn(move || loop {
                {
                    let mut k = s.kicked.lock().unwrap_or_else(|e| e.into_inner());
                    while !*k && !s.shutdown.load(Ordering::Acquire) {
                        k = s.cv.wait(k).unwrap_or_else(|e| e.into_inner());
                    }
                    *k = false;
                }
                if s.shutdown.load(Ordering::Acquire) {
                    return;
                }
                // Release the lock between slices so vCPU threads' MMIO is
                // never blocked for long.
                loop {
                    let more = device.lock().unwrap_or_else(|e| e.into_inner()).process();
                    if !more || s.shutdown.load(Ordering::Acquire) {
                        break;
                    }
                }
            })?;
        Ok(Worker {
            waker,
            thread: Some(thread),
        })
    }

    pub fn waker(&self) -> Waker {
        self.waker.clone()
    }

    /// Stop the thread and wait for it.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.waker.shared.shutdown.store(true, Ordering::Release);
        self.waker.shared.kick();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}
