//! Everything that can stop `faultline run` before or while the guest runs.
//! Each variant renders as one line a user can act on.

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
    #[error("invalid --memory '{value}': {reason}")]
    Memory { value: String, reason: String },
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
    Gpu(String),
    #[error("serve: {0}")]
    Serve(String),
    #[error("GPU interrupts: {0}")]
    GpuIrq(#[from] crate::msi::RouterError),
    #[error("cannot write --stats-json {path}: {source}")]
    StatsWrite { path: PathBuf, source: io::Error },
    #[error("event loop: {0}")]
    EventLoop(String),
}

impl Error {
    pub fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |source| Error::Kvm { what, source }
    }

    pub fn io(what: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Io { what, source }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
