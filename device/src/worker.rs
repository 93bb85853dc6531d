//! The device's worker thread (`faultline-gpu`), the one shape every host
//! uses (`faultline run`, `faultline serve`, the host loopback tests): an
//! epoll loop over the doorbell eventfds a host wired up (KVM ioeventfds:
//! the guest's doorbell write never exits to userspace) and a wake eventfd
//! (BAR0 writes through `Device::mmio_write`, `Waker`), running
//! `Device::process` while it reports more work. Waiting on the eventfds
//! themselves keeps a doorbell to one wake-up of this thread. Work the
//! device deferred to a time (fault injection, `Device::next_deadline`)
//! wakes it through a timerfd in the same epoll set: no spinning, and no
//! sleeping with the device lock held.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use vm_memory::GuestMemoryBackend;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use crate::device::Doorbells;
use crate::sync::{lock, DeviceMutex};

/// Epoll tokens of the two eventfds that are not doorbells (doorbell fds
/// use their position in the list).
const WAKE: u64 = u64::MAX;
const SHUTDOWN: u64 = u64::MAX - 1;
/// The deadline timer: work the device deferred (fault injection's late
/// acks, MSIs and paused accesses, `Device::next_deadline`).
const TIMER: u64 = u64::MAX - 2;

/// Rings doorbells and wakes the worker; cheap to clone, usable from any
/// thread without touching the device lock.
#[derive(Clone)]
pub struct Waker {
    doorbells: Arc<Doorbells>,
    wake: Arc<EventFd>,
}

impl Waker {
    pub fn ring(&self, index: u32) {
        self.doorbells.ring(index);
        self.wake();
    }
    /// Wake without a doorbell (e.g. after a register write that enabled a
    /// channel).
    pub fn wake(&self) {
        // Only fails if the counter would overflow, and then the worker
        // has a wake-up pending anyway.
        let _ = self.wake.write(1);
    }
}

pub struct Worker {
    waker: Waker,
    shutdown: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Spawn the worker thread for `device`. `doorbell_fds` are (doorbell
    /// index, eventfd) pairs the host connected to the guest's doorbell
    /// writes (none where every BAR0 write arrives through `mmio_write`).
    /// The worker installs itself as the device's waker.
    pub fn spawn<M>(
        device: Arc<DeviceMutex<M>>,
        doorbell_fds: Vec<(u32, EventFd)>,
    ) -> io::Result<Worker>
    where
        M: GuestMemoryBackend + Send + 'static,
    {
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let shutdown = EventFd::new(EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        let watch = |fd: &EventFd, token: u64| {
            epoll.ctl(
                ControlOperation::Add,
                fd.as_raw_fd(),
                EpollEvent::new(EventSet::IN, token),
            )
        };
        for (i, (_, fd)) in doorbell_fds.iter().enumerate() {
            watch(fd, i as u64)?;
        }
        watch(&wake, WAKE)?;
        watch(&shutdown, SHUTDOWN)?;
        let timer = TimerFd::new()?;
        epoll.ctl(
            ControlOperation::Add,
            timer.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TIMER),
        )?;
        let doorbells = {
            let mut d = lock(&device);
            let w = wake.clone();
            d.set_waker(Arc::new(move || {
                let _ = w.write(1);
            }));
            d.doorbells()
        };
        let waker = Waker { doorbells, wake };
        let thread = {
            let waker = waker.clone();
            std::thread::Builder::new()
                .name("faultline-gpu".into())
                .spawn(move || run(&epoll, &doorbell_fds, &waker, timer, &device))?
        };
        Ok(Worker {
            waker,
            shutdown,
            thread: Some(thread),
        })
    }

    pub fn waker(&self) -> Waker {
        self.waker.clone()
    }

    /// Stop the thread after its current slice and wait for it.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
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

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run<M: GuestMemoryBackend>(
    epoll: &Epoll,
    doorbell_fds: &[(u32, EventFd)],
    waker: &Waker,
    mut timer: TimerFd,
    device: &DeviceMutex<M>,
) {
    let mut events = vec![EpollEvent::default(); doorbell_fds.len() + 3];
    let mut busy = false;
    let mut timer_failed = false;
    loop {
        // While the device has more work, only poll (timeout 0) so new
        // doorbells are picked up between slices; idle, block.
        let n = match epoll.wait(if busy { 0 } else { -1 }, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => {
                log::error!("GPU worker: epoll_wait: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            match ev.data() {
                SHUTDOWN => return,
                // Consumed only; `process()` below does the work.
                WAKE => {
                    let _ = waker.wake.read();
                }
                // Readable, so the read does not block; an expiry that is
                // stale by now costs one spare step.
                TIMER => {
                    let _ = timer.wait();
                }
                i => {
                    if let Some((index, fd)) = doorbell_fds.get(i as usize) {
                        // The count is irrelevant: a doorbell means "look
                        // again".
                        let _ = fd.read();
                        waker.doorbells.ring(*index);
                    }
                }
            }
        }
        // One bounded step per lock hold (`Device::process`), and a thread
        // waiting for the register file goes first (`DeviceMutex`).
        let (first_errors, violations, deadline) = {
            let mut d = device.lock_for_step();
            busy = d.process();
            let e = d.take_first_errors();
            let v = d.take_coherence_reports();
            let deadline = if busy { None } else { d.next_deadline() };
            DeviceMutex::unlock_after_step(d);
            (e, v, deadline)
        };
        // Deferred work: sleep in epoll until it is due, never with the
        // lock held and never spinning for µs delays. A zero duration
        // would disarm the timer: it is due now, so step again.
        match deadline {
            Some(d) if d.is_zero() => busy = true,
            Some(d) => {
                if let Err(e) = timer.reset(d, None) {
                    // Then poll instead (once logged).
                    if !std::mem::replace(&mut timer_failed, true) {
                        log::error!("GPU worker: timerfd: {e}");
                    }
                    busy = true;
                }
            }
            None => {}
        }
        // Logged with the lock released: a stderr that blocks stalls this
        // thread only, never a vCPU's register access. Info, not warn: the
        // guest caused them (often on purpose, in bad-input tests), and
        // the counters have the totals.
        for e in first_errors {
            log::info!("{e}");
        }
        // A driver bug the host asked to hear about (`--gpu-check`): warn,
        // once per (context, page) and at most `check::REPORT_PAGES` ever.
        for v in violations {
            log::warn!("{v}");
        }
    }
}
