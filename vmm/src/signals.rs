//! SIGINT and SIGTERM: a clean stop for `run` and `serve`.
//!
//! Both signals are blocked in every thread (the mask is set before any
//! thread exists, and threads inherit it) and taken by one thread with
//! sigwait(2), so no async-signal-safety rules apply: it records the
//! signal, writes an eventfd the event loops watch, and runs the wake
//! hooks that unblock a thread sitting in a blocking read. A second signal
//! while the first is being handled ends the process at once, with the
//! same status.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Mutex, OnceLock};

use faultline_device::sync::lock;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

type Hook = Box<dyn Fn() + Send>;

pub struct Shutdown {
    /// Readable once a signal arrived.
    pub evt: EventFd,
    signal: AtomicI32,
    hooks: Mutex<Vec<Hook>>,
}

impl Shutdown {
    /// The signal that asked us to stop, if one did.
    pub fn signal(&self) -> Option<i32> {
        match self.signal.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s),
        }
    }

    /// Runs `f` when a signal arrives (at once if one already has).
    pub fn on_signal(&self, f: impl Fn() + Send + 'static) {
        let mut hooks = lock(&self.hooks);
        if self.signal().is_some() {
            drop(hooks);
            f();
        } else {
            hooks.push(Box::new(f));
        }
    }

    fn deliver(&self, sig: i32) {
        if self
            .signal
            .compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            // SAFETY: _exit takes a status and does not return; nothing
            // of ours needs running on this path (the user asked twice).
            unsafe { libc::_exit(exit_status(sig).into()) };
        }
        let _ = self.evt.write(1);
        for h in lock(&self.hooks).drain(..) {
            h();
        }
    }
}

/// 128 + the signal number, as shells report a process a signal ended.
pub fn exit_status(sig: i32) -> u8 {
    (128 + sig).clamp(0, 255) as u8
}

pub fn name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

static SHUTDOWN: OnceLock<Shutdown> = OnceLock::new();

fn set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        set
    }
}

/// Blocks SIGINT and SIGTERM in this thread (and so in every thread
/// started after) and starts the thread that takes them. Call first in
/// `main`, before any other thread exists.
pub fn install() -> std::io::Result<&'static Shutdown> {
    let set = set();
    // SAFETY: `set` is initialised; the old mask is not wanted.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    let evt = EventFd::new(EFD_NONBLOCK)?;
    let shutdown = SHUTDOWN.get_or_init(|| Shutdown {
        evt,
        signal: AtomicI32::new(0),
        hooks: Mutex::new(Vec::new()),
    });
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig = 0;
            // SAFETY: `set` is initialised and `sig` is a valid out pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                shutdown.deliver(sig);
            }
        })?;
    Ok(shutdown)
}
