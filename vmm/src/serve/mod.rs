//! `faultline serve`: the same GPU model served to another VMM (QEMU's
//! `vfio-user-pci`) over vfio-user on a UNIX socket.
//!
//! Threads: the caller's thread reads the client's messages and checks them
//! (`wire`), the `vfio_user` crate's server runs the accepted ones against
//! the device (`backend`) on its own thread over a private socket pair, a
//! pump copies its replies back, and the device crate's `Worker` runs the
//! device (as under `faultline run`, minus the doorbell eventfds: every
//! doorbell arrives as a REGION_WRITE, and `mmio_write` wakes the worker). One client per server process: the socket path is removed once
//! a client connected, and the server exits when that client goes away.

mod backend;
mod wire;

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::fd::OwnedFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use faultline_device::sync::lock;
use faultline_device::{Device, Worker};
use vm_memory::GuestMemoryMmap;

use crate::error::{Error, Result};
use crate::signals::Shutdown;
use backend::{Backend, MsiEventfds, ServedGpuLock};
use wire::{Verdict, WireError};

pub struct ServeConfig {
    pub socket: PathBuf,
    pub sizing: faultline_device::Config,
    /// Record the GPU's fault timeline (`--gpu-trace`).
    pub gpu_trace: bool,
    /// SIGINT/SIGTERM end the session (or the wait for a client).
    pub shutdown: &'static Shutdown,
}

/// How a session ended without an error.
#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    /// The client disconnected between messages.
    Disconnected,
    /// SIGINT or SIGTERM (the number).
    Signal(i32),
}

/// What `serve` hands back on every path: how it ended and the GPU's
/// counters (None only if the device could not be created).
pub struct Served {
    pub result: Result<Ending>,
    pub gpu_counters: Option<Vec<(String, u64)>>,
    /// The device, for what is read after the counters (the trace).
    pub gpu: Option<Arc<crate::gpu::GpuLock>>,
}

/// Why `faultline serve` stopped; each renders as one line after "serve: ".
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{} already exists (a stale socket of an earlier server? remove it)", .0.display())]
    SocketExists(PathBuf),
    #[error("{} is a directory: --socket names the socket file to create, e.g. {}", .0.display(), .0.join("gpu.sock").display())]
    SocketIsDirectory(PathBuf),
    #[error("{} already exists and is not a socket: choose a path that does not exist", .0.display())]
    SocketPathTaken(PathBuf),
    #[error("cannot listen on {}: {source}", .path.display())]
    Listen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    Session(#[from] WireError),
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| ServeError::Io { what, source }.into()
}

/// The private listener the crate's server accepts from: an abstract UNIX
/// address with an unguessable name, so nothing else can get in first.
fn private_listener() -> Result<(UnixListener, SocketAddr)> {
    let tag = RandomState::new().hash_one(std::process::id());
    let name = format!("faultline-vfio-user-{}-{tag:016x}", std::process::id());
    let addr = SocketAddr::from_abstract_name(name.as_bytes())
        .map_err(io_err("private socket address"))?;
    let l = UnixListener::bind_addr(&addr).map_err(io_err("binding the private socket"))?;
    Ok((l, addr))
}

pub fn serve(cfg: ServeConfig) -> Served {
    let irq = Arc::new(MsiEventfds::default());
    let device = match Device::with_config(GuestMemoryMmap::new(), irq.clone(), cfg.sizing) {
        Ok(mut d) => {
            if cfg.gpu_trace {
                d.start_trace(faultline_device::trace::DEFAULT_CAPACITY);
            }
            Arc::new(faultline_device::DeviceMutex::new(d))
        }
        Err(e) => {
            return Served {
                result: Err(e.into()),
                gpu_counters: None,
                gpu: None,
            }
        }
    };
    let result = session(&cfg, device.clone(), irq);
    let gpu_counters = Some(lock(&device).named_counters());
    Served {
        result,
        gpu_counters,
        gpu: Some(device),
    }
}

/// Refuses an existing path with a message that fits what is there.
fn check_socket_path(path: &Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    let err = if meta.is_dir() {
        ServeError::SocketIsDirectory(path.to_path_buf())
    } else if meta.file_type().is_socket() {
        ServeError::SocketExists(path.to_path_buf())
    } else {
        ServeError::SocketPathTaken(path.to_path_buf())
    };
    Err(err.into())
}

/// Waits until `fd` is readable or a signal arrived; true for the signal.
fn wait_readable(fd: &impl AsRawFd, shutdown: &Shutdown) -> Result<bool> {
    let mut fds = [
        libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: shutdown.evt.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfds for the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n >= 0 {
            return Ok(fds[1].revents != 0);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(io_err("waiting for a client")(e));
        }
    }
}

fn session(cfg: &ServeConfig, device: Arc<ServedGpuLock>, irq: Arc<MsiEventfds>) -> Result<Ending> {
    let path = &cfg.socket;
    check_socket_path(path)?;
    let listener = UnixListener::bind(path).map_err(|source| ServeError::Listen {
        path: path.clone(),
        source,
    })?;
    log::info!(
        "serving the Faultline GPU over vfio-user on {}",
        path.display()
    );
    let accepted = match wait_readable(&listener, cfg.shutdown) {
        Ok(false) => listener
            .accept()
            .map(|(c, _)| Some(c))
            .map_err(io_err("accepting a client")),
        Ok(true) => Ok(None),
        Err(e) => Err(e),
    };
    // One client per server: later connection attempts find no socket
    // (and a signal leaves none behind either).
    drop(listener);
    let _ = std::fs::remove_file(path);
    let Some(client) = accepted? else {
        return Ok(Ending::Signal(
            cfg.shutdown.signal().unwrap_or(libc::SIGTERM),
        ));
    };
    log::info!("vfio-user client connected");

    let worker =
        Worker::spawn(device.clone(), Vec::new()).map_err(io_err("starting the GPU worker"))?;
    let backend = Backend::new(device.clone(), irq);
    let (private, addr) = private_listener()?;
    let mut inner =
        UnixStream::connect_addr(&addr).map_err(io_err("connecting the private socket"))?;
    let server = vfio_user::Server::from_owned_fd(
        OwnedFd::from(private),
        true,
        backend::irqs(),
        backend::regions(),
    );
    let server_thread = std::thread::Builder::new()
        .name("vfio-user".into())
        .spawn(move || {
            let mut backend = backend;
            server.run(&mut backend)
        })
        .map_err(io_err("spawning the vfio-user thread"))?;

    let clone = |s: &UnixStream| s.try_clone().map_err(io_err("duplicating a socket"));
    let client_writer = Arc::new(Mutex::new(clone(&client)?));
    let handshake = Arc::new(wire::Handshake::default());
    let pump = {
        let inner = clone(&inner)?;
        let w = client_writer.clone();
        let hs = handshake.clone();
        std::thread::Builder::new()
            .name("vfio-user-replies".into())
            .spawn(move || wire::pump_replies(inner, &w, &hs))
            .map_err(io_err("spawning the reply thread"))?
    };
    // A signal ends the guard's blocking read: the client socket reads EOF.
    let wake = clone(&client)?;
    cfg.shutdown.on_signal(move || {
        let _ = wake.shutdown(std::net::Shutdown::Read);
    });

    let outcome = guard(clone(&client)?, &mut inner, &client_writer, &handshake);

    // Closing our end of the private socket ends the crate's loop (EOF, or
    // EPIPE on a reply nobody will read), which ends the pump.
    let _ = inner.shutdown(std::net::Shutdown::Both);
    let _ = client.shutdown(std::net::Shutdown::Both);
    match server_thread.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => log::debug!("vfio-user server loop ended: {e}"),
        Err(_) => log::error!("the vfio-user server thread panicked"),
    }
    let _ = pump.join();
    worker.shutdown();
    if let Some(sig) = cfg.shutdown.signal() {
        return Ok(Ending::Signal(sig));
    }
    match outcome {
        Ok(()) => {
            log::info!("vfio-user client disconnected");
            Ok(Ending::Disconnected)
        }
        Err(e) => Err(ServeError::Session(e).into()),
    }
}

/// Reads the client until it disconnects between messages (`Ok`) or breaks
/// the protocol.
fn guard(
    mut client: UnixStream,
    inner: &mut UnixStream,
    client_writer: &Mutex<UnixStream>,
    handshake: &wire::Handshake,
) -> std::result::Result<(), WireError> {
    // Refusals are logged once per command, so a client cannot flood the log.
    let mut refused = std::collections::HashSet::new();
    while let Some(m) = wire::read_message(&mut client)? {
        let verdict = wire::check(&m)?;
        handshake.admit(&m)?;
        match verdict {
            Verdict::Forward => wire::forward(inner, &m)?,
            Verdict::Refuse(errno, why) => {
                if refused.insert(m.command) {
                    log::warn!("{why} (further refusals of this command are not logged)");
                } else {
                    log::debug!("{why}");
                }
                if m.flags & wire::FLAG_NO_REPLY == 0 {
                    lock(client_writer).write_all(&wire::error_reply(m.id, m.command, errno))?;
                }
            }
        }
    }
    Ok(())
}
