//! The GPU's own thread: an event-manager loop over the doorbell ioeventfds
//! (KVM signals them without a VM exit), a wake eventfd (plain MMIO writes
//! to BAR0) and a shutdown eventfd, running `Device::process` whenever there
//! is work. It shares guest memory with the vCPUs through the device's
//! `GuestMemoryMmap` (same memfd-backed mappings).
//!
//! The device crate's `Worker` (condvar based) would need a second thread
//! to turn eventfds into condvar kicks; epoll-ing the eventfds directly
//! keeps a doorbell to one wake-up.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use faultline_device::Doorbells;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::error::{Error, Result};
use crate::gpu::{lock, Gpu};

struct WorkerEvents {
    doorbells: Arc<Doorbells>,
    /// (doorbell index, ioeventfd)
    doorbell_fds: Vec<(u32, EventFd)>,
    wake: Arc<EventFd>,
    shutdown: EventFd,
    stop: bool,
}

impl MutEventSubscriber for WorkerEvents {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.shutdown.as_raw_fd() {
            self.stop = true;
        } else if fd == self.wake.as_raw_fd() {
            // Consumed only; `process()` below does the work.
            let _ = self.wake.read();
        } else if let Some((i, e)) = self.doorbell_fds.iter().find(|(_, e)| e.as_raw_fd() == fd) {
            // The count is irrelevant: a doorbell means "look again".
            let _ = e.read();
            self.doorbells.ring(*i);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let fds = self
            .doorbell_fds
            .iter()
            .map(|(_, e)| e)
            .chain([&*self.wake, &self.shutdown]);
        for e in fds {
            if let Err(err) = ops.add(Events::new(e, EventSet::IN)) {
                log::error!("GPU worker cannot watch fd {}: {err:?}", e.as_raw_fd());
            }
        }
    }
}

pub struct GpuWorker {
    shutdown: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl GpuWorker {
    /// `wake` is also what BAR0 writes signal (see `gpu::Bar0`); it is
    /// installed as the device's waker here.
    pub fn spawn(
        device: Arc<Mutex<Gpu>>,
        doorbell_fds: Vec<(u32, EventFd)>,
        wake: Arc<EventFd>,
    ) -> Result<Self> {
        let shutdown = EventFd::new(EFD_NONBLOCK).map_err(Error::io("creating an eventfd"))?;
        let doorbells = {
            let mut d = lock(&device);
            let w = wake.clone();
            d.set_waker(Arc::new(move || {
                let _ = w.write(1);
            }));
            d.doorbells()
        };
        let events = Arc::new(Mutex::new(WorkerEvents {
            doorbells,
            doorbell_fds,
            wake,
            shutdown: shutdown
                .try_clone()
                .map_err(Error::io("duplicating an eventfd"))?,
            stop: false,
        }));
        let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
            .map_err(|e| Error::EventLoop(format!("GPU worker: {e:?}")))?;
        em.add_subscriber(events.clone());
        let thread = std::thread::Builder::new()
            .name("faultline-gpu".into())
            .spawn(move || run(em, &events, &device))
            .map_err(Error::io("spawning the GPU worker"))?;
        Ok(Self {
            shutdown,
            thread: Some(thread),
        })
    }

    /// Ask the thread to stop after its current slice and wait for it.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        if let Err(e) = self.shutdown.write(1) {
            log::error!("cannot stop the GPU worker: {e}");
            return;
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("the GPU worker panicked");
            }
        }
    }
}

impl Drop for GpuWorker {
    fn drop(&mut self) {
        self.halt();
    }
}

fn run(
    mut em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    events: &Mutex<WorkerEvents>,
    device: &Mutex<Gpu>,
) {
    let mut busy = false;
    loop {
        // While the device has more work, only poll (timeout 0) so new
        // doorbells are picked up between slices; idle, block.
        if let Err(e) = em.run_with_timeout(if busy { 0 } else { -1 }) {
            log::error!("GPU worker event loop: {e:?}");
            return;
        }
        if lock(events).stop {
            return;
        }
        // The lock is taken per slice so vCPU BAR0 accesses interleave.
        busy = lock(device).process();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::tests::gpu;

    fn readable(e: &EventFd) -> bool {
        let mut p = libc::pollfd {
            fd: e.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd on the stack, count 1, no timeout; poll
        // only writes `revents`.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n == 1 && p.revents & libc::POLLIN != 0
    }

    #[test]
    fn starts_wakes_and_stops() {
        let dev = gpu();
        let db = EventFd::new(EFD_NONBLOCK).unwrap();
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let w = GpuWorker::spawn(
            dev.clone(),
            vec![(0, db.try_clone().unwrap())],
            wake.clone(),
        )
        .unwrap();
        // A doorbell on a disabled device is consumed and ignored.
        db.write(1).unwrap();
        wake.write(1).unwrap();
        let mut waited = 0;
        while readable(&db) || readable(&wake) {
            assert!(waited < 5000, "worker never consumed the eventfds");
            std::thread::sleep(std::time::Duration::from_millis(1));
            waited += 1;
        }
        w.stop();
        // The device is free again after the worker stopped.
        assert!(!lock(&dev).process());
    }
}
