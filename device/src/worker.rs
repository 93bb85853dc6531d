//! The device's worker thread (`faultline-gpu`), the one shape every host
//! uses (`faultline run`, `faultline serve`, the host loopback tests): an
//! epoll loop over the doorbell eventfds a host wired up (KVM ioeventfds:
//! the guest's doorbell write never exits to userspace) and a wake eventfd
//! (BAR0 writes through `Device::mmio_write`, `Waker`), running
//! `Device::process` while it reports more work. Waiting on the eventfds
//! themselves keeps a doorbell to one wake-up of this thread. Work the
//! device deferred to a time (fault injection, `Device::next_deadline`)
//! wakes it through a timerfd in the same epoll set: no spinning, and no
//! sleeping with the device lock held. After a step that did work it polls
//! briefly for the next (`SPIN`, adaptive) before it sleeps.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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

/// How long the worker polls for its next work before it sleeps in epoll,
/// after a step that did some: a driver on another CPU answers an MSI
/// (REPLAY after FAULT, the next command after a completion) within a few
/// µs, and a sleep costs a wake-up on top of that (docs/performance.md,
/// "Loopback faults"). Only where every doorbell comes through [`Waker`]
/// (no doorbell eventfds: an ioeventfd doorbell would not show in the
/// poll). Adaptive: a poll that found nothing turns polling off for the
/// next 2^k work steps (k grows to `MAX_BACKOFF` with each such poll, and
/// is reset by one that found work), so a driver that answers slower than
/// this (a vCPU's emulated bottom half, an idle device) costs at most
/// `SPIN` of host CPU per 2^`MAX_BACKOFF` wake-ups.
const SPIN: Duration = Duration::from_micros(20);
const MAX_BACKOFF: u32 = 8;

/// What [`Waker`]s share with the worker.
struct Kick {
    wake: EventFd,
    /// Set by every ring or wake; the polling worker takes it.
    kicked: AtomicBool,
    /// The worker is polling `kicked`: no eventfd write needed.
    polling: AtomicBool,
}

impl Kick {
    fn kick(&self) {
        // SeqCst on both flags, here and in `Poll::run`: either the worker
        // sees `kicked` or this sees it no longer polling and writes the
        // eventfd.
        self.kicked.store(true, Ordering::SeqCst);
        if !self.polling.load(Ordering::SeqCst) {
            // Only fails if the counter would overflow, and then the
            // worker has a wake-up pending anyway.
            let _ = self.wake.write(1);
        }
    }

    /// Before a step: the kicks so far are that step's to handle (it reads
    /// every ring made before this), so only a later one counts as work
    /// for the poll after it. Without this, a kick that woke the worker
    /// through the eventfd would end the next poll at once and reset its
    /// backoff on every wake-up.
    fn clear_for_step(&self) {
        self.kicked.store(false, Ordering::SeqCst);
    }
}

/// Rings doorbells and wakes the worker; cheap to clone, usable from any
/// thread without touching the device lock.
#[derive(Clone)]
pub struct Waker {
    doorbells: Arc<Doorbells>,
    kick: Arc<Kick>,
}

impl Waker {
    pub fn ring(&self, index: u32) {
        self.doorbells.ring(index);
        self.wake();
    }
    /// Wake without a doorbell (e.g. after a register write that enabled a
    /// channel).
    pub fn wake(&self) {
        self.kick.kick();
    }
}

/// The worker's bounded poll before sleeping (`SPIN`).
struct Poll {
    enabled: bool,
    /// Work steps to go before polling again, and the exponent of the
    /// next such wait.
    skip: u32,
    backoff: u32,
}

impl Poll {
    /// After a step that did work, the device now idle: whether new work
    /// came within `SPIN` (then step again rather than sleep).
    fn run(&mut self, kick: &Kick) -> bool {
        if !self.enabled {
            return false;
        }
        if self.skip > 0 {
            self.skip -= 1;
            return false;
        }
        kick.polling.store(true, Ordering::SeqCst);
        let t0 = Instant::now();
        let mut found = false;
        while !found && t0.elapsed() < SPIN {
            // Yielding, not spinning: on a loaded host the driver may
            // need this CPU to answer.
            std::thread::yield_now();
            found = kick.kicked.swap(false, Ordering::SeqCst);
        }
        kick.polling.store(false, Ordering::SeqCst);
        // A kick between the last look and the store above wrote no
        // eventfd: look once more.
        found |= kick.kicked.swap(false, Ordering::SeqCst);
        if found {
            self.backoff = 0;
        } else {
            self.skip = (1 << self.backoff) - 1;
            self.backoff = (self.backoff + 1).min(MAX_BACKOFF);
        }
        found
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
        let kick = Arc::new(Kick {
            wake: EventFd::new(EFD_NONBLOCK)?,
            kicked: AtomicBool::new(false),
            polling: AtomicBool::new(false),
        });
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
        watch(&kick.wake, WAKE)?;
        watch(&shutdown, SHUTDOWN)?;
        let timer = TimerFd::new()?;
        epoll.ctl(
            ControlOperation::Add,
            timer.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TIMER),
        )?;
        let doorbells = {
            let mut d = lock(&device);
            let k = kick.clone();
            d.set_waker(Arc::new(move || k.kick()));
            d.doorbells()
        };
        let waker = Waker { doorbells, kick };
        let poll = Poll {
            enabled: doorbell_fds.is_empty(),
            skip: 0,
            backoff: 0,
        };
        let thread = {
            let waker = waker.clone();
            std::thread::Builder::new()
                .name("faultline-gpu".into())
                .spawn(move || run(&epoll, &doorbell_fds, &waker, timer, &device, poll))?
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
    mut poll: Poll,
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
                    let _ = waker.kick.wake.read();
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
        waker.kick.clear_for_step();
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
        if !busy && deadline.is_none() {
            busy = poll.run(&waker.kick);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kick() -> Kick {
        Kick {
            wake: EventFd::new(EFD_NONBLOCK).unwrap(),
            kicked: AtomicBool::new(false),
            polling: AtomicBool::new(false),
        }
    }

    fn poll() -> Poll {
        Poll {
            enabled: true,
            skip: 0,
            backoff: 0,
        }
    }

    #[test]
    fn a_kick_writes_the_eventfd_only_when_nobody_polls() {
        let k = kick();
        k.polling.store(true, Ordering::SeqCst);
        k.kick();
        assert!(k.wake.read().is_err(), "no eventfd write while polled");
        assert!(k.kicked.load(Ordering::SeqCst));
        k.polling.store(false, Ordering::SeqCst);
        k.kick();
        assert_eq!(k.wake.read().unwrap(), 1);
    }

    /// A kick that woke the worker through the eventfd belongs to the step
    /// it woke, not to the poll after that step.
    #[test]
    fn a_kick_handled_by_a_step_is_not_work_for_the_next_poll() {
        let k = kick();
        let mut p = poll();
        k.kick();
        assert_eq!(k.wake.read().unwrap(), 1, "nobody polled: the eventfd");
        k.clear_for_step();
        assert!(!p.run(&k), "the poll after that step found the old kick");
        assert_eq!(p.backoff, 1, "and so never backed off");
    }

    #[test]
    fn polls_that_find_nothing_back_off_exponentially() {
        let k = kick();
        let mut p = poll();
        // Which of the next work steps poll: 1, 2, 4, 8, ... apart.
        let mut polled = Vec::new();
        for step in 0..40 {
            let skipped = p.skip > 0;
            assert!(!p.run(&k));
            if !skipped {
                polled.push(step);
            }
        }
        assert_eq!(polled, [0, 1, 3, 7, 15, 31]);
        // Capped: at most one poll per 2^MAX_BACKOFF steps.
        p.backoff = MAX_BACKOFF;
        p.skip = 0;
        assert!(!p.run(&k));
        assert_eq!(p.skip, (1 << MAX_BACKOFF) - 1);
        assert!(!p.run(&k));
        assert_eq!(p.skip, (1 << MAX_BACKOFF) - 2);
        // Work found resets the backoff; a disabled poll never polls.
        p.skip = 0;
        k.kicked.store(true, Ordering::SeqCst);
        assert!(p.run(&k));
        assert_eq!((p.skip, p.backoff), (0, 0));
        p.enabled = false;
        k.kicked.store(true, Ordering::SeqCst);
        assert!(!p.run(&k));
    }

    #[test]
    fn a_kick_during_a_poll_ends_it() {
        let k = Arc::new(kick());
        let mut p = poll();
        let k2 = k.clone();
        let t = std::thread::spawn(move || {
            while !k2.polling.load(Ordering::SeqCst) {
                std::hint::spin_loop();
            }
            k2.kick();
        });
        // The poll may time out before the thread runs on a loaded host:
        // then the kick is seen by the next one.
        let mut found = false;
        for _ in 0..1000 {
            p.skip = 0;
            if p.run(&k) {
                found = true;
                break;
            }
        }
        t.join().unwrap();
        assert!(found);
    }
}
