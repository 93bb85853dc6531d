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
use std::os::fd::OwnedFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use faultline_device::sync::lock;
use faultline_device::{Device, Worker};
use vm_memory::GuestMemoryMmap;

use crate::error::{Error, Result};
use backend::{Backend, MsiEventfds};
use wire::{Verdict, WireError};

pub struct ServeConfig {
    pub socket: PathBuf,
    pub sizing: faultline_device::Config,
}

/// A session that ended without a protocol error.
pub struct ServeReport {
    pub gpu_counters: Vec<(String, u64)>,
}

/// Why `faultline serve` stopped; each renders as one line after "serve: ".
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{} already exists (a stale socket of an earlier server? remove it)", .0.display())]
    SocketExists(PathBuf),
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

pub fn serve(cfg: ServeConfig) -> Result<ServeReport> {
    let irq = Arc::new(MsiEventfds::default());
    let device = Device::with_config(GuestMemoryMmap::new(), irq.clone(), cfg.sizing)?;
    let device = Arc::new(faultline_device::DeviceMutex::new(device));

    let path = &cfg.socket;
    if std::fs::symlink_metadata(path).is_ok() {
        return Err(ServeError::SocketExists(path.clone()).into());
    }
    let listener = UnixListener::bind(path).map_err(|source| ServeError::Listen {
        path: path.clone(),
        source,
    })?;
    log::info!(
        "serving the Faultline GPU over vfio-user on {}",
        path.display()
    );
    let accepted = listener.accept();
    // One client per server: later connection attempts find no socket.
    drop(listener);
    let _ = std::fs::remove_file(path);
    let (client, _) = accepted.map_err(io_err("accepting a client"))?;
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
    let pump = {
        let inner = clone(&inner)?;
        let w = client_writer.clone();
        std::thread::Builder::new()
            .name("vfio-user-replies".into())
            .spawn(move || wire::pump_replies(inner, &w))
            .map_err(io_err("spawning the reply thread"))?
    };

    let outcome = guard(clone(&client)?, &mut inner, &client_writer);

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
    let gpu_counters = lock(&device).counters().named();
    match outcome {
        Ok(()) => {
            log::info!("vfio-user client disconnected");
            Ok(ServeReport { gpu_counters })
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
) -> std::result::Result<(), WireError> {
    while let Some(m) = wire::read_message(&mut client)? {
        match wire::check(&m)? {
            Verdict::Forward => wire::forward(inner, &m)?,
            Verdict::Refuse(errno, why) => {
                log::warn!("{why}");
                if m.flags & wire::FLAG_NO_REPLY == 0 {
                    lock(client_writer).write_all(&wire::error_reply(m.id, m.command, errno))?;
                }
            }
        }
    }
    Ok(())
}
