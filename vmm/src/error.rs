//! Everything that can stop `faultline run` (before or while the guest runs)
//! or `faultline serve`. Each variant renders as one line a user can act on;
//! the cause, where there is one, stays reachable as its `source()`.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error("cannot open {path}: {source}; is KVM available (modprobe kvm_intel/kvm_amd) and is this user in the 'kvm' group?")]
    KvmOpen { path: PathBuf, source: io::Error },
    #[error("{path} is not a usable KVM device: {source}")]
    KvmNotKvm { path: PathBuf, source: io::Error },
    #[error("KVM API version {0} is not supported (need 12)")]
    KvmVersion(i32),
    #[error("KVM lacks a required capability: {0}")]
    KvmCap(&'static str),
    #[error("KVM: {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("no firmware at {0}: build it with scripts/build-firmware.sh (or scripts/run.sh), or pass --firmware PATH")]
    FirmwareMissing(PathBuf),
    #[error("cannot read firmware {path}: {source}")]
    FirmwareRead { path: PathBuf, source: io::Error },
    #[error("firmware {path}: {reason}")]
    FirmwareInvalid { path: PathBuf, reason: String },
    #[error(
        "firmware {path} needs guest RAM up to {need_mib} MiB but --memory gives {have_mib} MiB"
    )]
    FirmwareTooBig {
        path: PathBuf,
        need_mib: u64,
        have_mib: u64,
    },
    #[error("invalid --vcpus {value}: {reason}")]
    Vcpus { value: u32, reason: String },
    #[error("guest memory: {0}")]
    GuestMemory(String),
    #[error("loading firmware: {0}")]
    Load(String),
    #[error("vCPU {cpu}: {what}: {source}")]
    Vcpu {
        cpu: u32,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
    #[error("GPU: {0}")]
    GpuConfig(#[from] faultline_device::ConfigError),
    #[error("GPU: BAR0 cannot be placed at {0:#x}")]
    GpuBar0(u64),
    #[error("GPU: PCI slot 00:{0:02x}.0 is taken")]
    GpuSlot(u8),
    #[error("serve: {0}")]
    Serve(#[from] crate::serve::ServeError),
    #[error("GPU interrupts: {0}")]
    GpuIrq(#[from] crate::msi::RouterError),
    #[error("cannot write --stats-json {path}: {source}")]
    StatsWrite { path: PathBuf, source: io::Error },
    #[error("cannot write --gpu-trace {path}: {source}")]
    TraceWrite { path: PathBuf, source: io::Error },
    #[error("event loop: {0:?}")]
    EventLoop(#[source] event_manager::Error),
}

impl Error {
    /// A value the user gave is not acceptable (status 2, like a usage
    /// error clap reports); the rest are VMM or setup errors (status 3).
    pub fn is_usage(&self) -> bool {
        matches!(self, Error::Vcpus { .. })
    }

    pub fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |source| Error::Kvm { what, source }
    }

    pub fn io(what: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Io { what, source }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::ServeError;
    use std::error::Error as _;

    /// The causes below `e`, outermost first.
    fn causes(e: &Error) -> Vec<&(dyn std::error::Error + 'static)> {
        std::iter::successors(e.source(), |&c| c.source()).collect()
    }

    #[test]
    fn causes_stay_reachable_as_sources() {
        let e = Error::from(ServeError::Listen {
            path: "/run/gpu.sock".into(),
            source: io::Error::from(io::ErrorKind::AddrInUse),
        });
        let c = causes(&e);
        assert!(c[0].downcast_ref::<ServeError>().is_some(), "{c:?}");
        assert!(
            c.last().unwrap().downcast_ref::<io::Error>().is_some(),
            "{c:?}"
        );

        let e = Error::from(faultline_device::ConfigError::Channels(9));
        assert!(causes(&e)[0]
            .downcast_ref::<faultline_device::ConfigError>()
            .is_some());
        let e = Error::EventLoop(event_manager::Error::InvalidCapacity);
        assert!(causes(&e)[0]
            .downcast_ref::<event_manager::Error>()
            .is_some());
    }

    /// The one-line messages users and scripts see.
    #[test]
    fn messages_read_as_one_line() {
        let cases = [
            (
                Error::from(ServeError::SocketExists("/tmp/gpu.sock".into())),
                "serve: /tmp/gpu.sock already exists (a stale socket of an earlier server? remove it)",
            ),
            (
                Error::from(ServeError::Io {
                    what: "accepting a client",
                    source: io::Error::other("out of descriptors"),
                }),
                "serve: accepting a client: out of descriptors",
            ),
            (
                Error::from(faultline_device::ConfigError::Channels(9)),
                "GPU: channels 9 must be between 1 and 8",
            ),
            (
                Error::GpuBar0(0xc000_0000),
                "GPU: BAR0 cannot be placed at 0xc0000000",
            ),
            (Error::GpuSlot(4), "GPU: PCI slot 00:04.0 is taken"),
        ];
        for (e, want) in cases {
            assert_eq!(e.to_string(), want);
        }
    }
}
