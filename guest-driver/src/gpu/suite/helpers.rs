//! What the tests share: binding a context, running commands, writing and
//! checking process memory (every word of a range, one host call each).

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use faultline_abi::{isa, Status};

use super::{Pattern, Prot, SvmEnv, TestResult};
use crate::gpu::{
    Channel, Command, CounterSnapshot, GpuError, MigratePolicy, Platform, SvmConfig, SvmContext,
};

/// `return Err(format!(...))` unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err(alloc::format!($($arg)+));
        }
    };
}
pub(super) use ensure;

pub(super) fn ok<T, X: core::fmt::Debug>(r: Result<T, X>, what: &str) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e:?}"))
}

pub(super) type Svm<E> = SvmContext<<E as SvmEnv>::P, <E as SvmEnv>::M>;
pub(super) type Chan<E> = Channel<<E as SvmEnv>::P>;

pub(super) fn bind<E: SvmEnv>(env: &E, p: &E::Process) -> Result<(Svm<E>, Chan<E>), String> {
    bind_with(env, p, SvmConfig::default())
}

/// The default context configuration pinned to migration policy `m`,
/// whatever the GPU's `migrate=` says: the tests of explicit migration pin
/// `None`, the first-touch tests `FirstTouch`.
pub(super) fn migrating(m: MigratePolicy) -> SvmConfig {
    SvmConfig {
        migrate: Some(m),
        ..SvmConfig::default()
    }
}

pub(super) fn bind_with<E: SvmEnv>(
    env: &E,
    p: &E::Process,
    cfg: SvmConfig,
) -> Result<(Svm<E>, Chan<E>), String> {
    let svm = ok(SvmContext::new(env.gpu(), &env.mm(p), cfg), "svm context")?;
    let chan = ok(Channel::open(svm.context()), "channel")?;
    Ok((svm, chan))
}

pub(super) fn fill<P: Platform>(
    c: &Channel<P>,
    dst: u64,
    len: u64,
    pattern: u64,
) -> Result<u64, GpuError> {
    c.run(&Command::Fill { dst, len, pattern })
}

pub(super) fn copy<P: Platform>(
    c: &Channel<P>,
    dst: u64,
    src: u64,
    len: u64,
) -> Result<u64, GpuError> {
    c.run(&Command::Copy { dst, src, len })
}

pub(super) fn read_u64<E: SvmEnv>(env: &E, p: &E::Process, va: u64) -> Result<u64, String> {
    let mut b = [0u8; 8];
    env.read(p, va, &mut b)
        .map_err(|_| format!("CPU read of {va:#x} faulted"))?;
    Ok(u64::from_le_bytes(b))
}

pub(super) fn write_u64<E: SvmEnv>(env: &E, p: &E::Process, va: u64, v: u64) -> TestResult {
    env.write(p, va, &v.to_le_bytes())
        .map_err(|_| format!("CPU write of {va:#x} faulted"))
}

/// CPU stores of `pat` over all of `[va, va + len)`.
pub(super) fn cpu_fill<E: SvmEnv>(
    env: &E,
    p: &E::Process,
    va: u64,
    len: u64,
    pat: Pattern,
) -> TestResult {
    env.fill_pattern(p, va, len, pat)
        .map_err(|_| format!("CPU fill of {va:#x}+{len:#x} faulted"))
}

/// Checks every word of `[va, va + len)` against `pat` with CPU loads.
pub(super) fn cpu_check<E: SvmEnv>(
    env: &E,
    p: &E::Process,
    va: u64,
    len: u64,
    pat: Pattern,
) -> TestResult {
    match env.check_pattern(p, va, len, pat) {
        Ok(None) => Ok(()),
        Ok(Some(m)) => Err(format!(
            "{:#x} (+{:#x} in {va:#x}+{len:#x}) holds {:#x}, expected {:#x}",
            m.addr,
            m.addr - va,
            m.found,
            m.expected
        )),
        Err(_) => Err(format!("CPU check of {va:#x}+{len:#x} faulted")),
    }
}

pub(super) fn counters<E: SvmEnv>(env: &E) -> CounterSnapshot {
    env.gpu().counters().snapshot()
}

pub(super) fn cancelled(r: Result<u64, GpuError>) -> bool {
    r == Err(GpuError::Command(Status::Cancelled))
}

/// A new process with one anonymous read-write mapping of `len` bytes.
pub(super) fn spawn_mapped<E: SvmEnv>(env: &E, len: u64) -> Result<(E::Process, u64), String> {
    let p = env.spawn()?;
    let va = mmap_rw(env, &p, len, "mmap")?;
    Ok((p, va))
}

/// Another anonymous read-write mapping of `len` bytes, wherever the host
/// puts it.
pub(super) fn mmap_rw<E: SvmEnv>(
    env: &E,
    p: &E::Process,
    len: u64,
    what: &str,
) -> Result<u64, String> {
    ok(env.mmap(p, 0, len, Prot::RW, false), what)
}

/// Runs `body` with a context bound to `p`. On success the channel closes
/// and the process exits while the context is still alive, so its release
/// runs at exit as it would for a real process; on failure everything is
/// dropped (channel, context, process) and the error returned.
pub(super) fn bound<E: SvmEnv>(
    env: &E,
    p: E::Process,
    body: impl FnOnce(&E::Process, &Svm<E>, &Chan<E>) -> TestResult,
) -> TestResult {
    bound_with(env, p, SvmConfig::default(), body)
}

/// [`bound`] with a context configuration.
pub(super) fn bound_with<E: SvmEnv>(
    env: &E,
    p: E::Process,
    cfg: SvmConfig,
    body: impl FnOnce(&E::Process, &Svm<E>, &Chan<E>) -> TestResult,
) -> TestResult {
    let (svm, chan) = bind_with(env, &p, cfg)?;
    body(&p, &svm, &chan)?;
    drop(chan);
    env.exit(p);
    drop(svm);
    Ok(())
}

/// LAUNCH of `kernel`, already written at `code`.
pub(super) fn launch(code: u64, kernel: &[u64], grid: u32, block: u32, args: [u64; 4]) -> Command {
    Command::Launch {
        code,
        code_len: kernel.len() as u32,
        grid,
        block,
        args,
    }
}

pub(super) const PAT: u64 = 0x5a5a_1234_8765_a5a5;

/// Writes `code` (a kernel) at `va` with CPU stores.
pub(super) fn write_code<E: SvmEnv>(env: &E, p: &E::Process, va: u64, code: &[u64]) -> TestResult {
    let bytes: Vec<u8> = code.iter().flat_map(|w| w.to_le_bytes()).collect();
    env.write(p, va, &bytes)
        .map_err(|_| "writing the kernel faulted".into())
}

/// A kernel that walks a `ChaseList` from `r1`, summing each node's value
/// (at +8) into `r2`, and stores the sum at `r4` when the chain ends.
pub(super) const CHASE_KERNEL: [u64; 7] = [
    isa::encode(isa::BEQ, 0, 1, 0, 5),
    isa::encode(isa::LD64, 3, 1, 0, 8),
    isa::encode(isa::ADD, 2, 2, 3, 0),
    isa::encode(isa::LD64, 1, 1, 0, 0),
    isa::encode(isa::JMP, 0, 0, 0, -4),
    isa::encode(isa::ST64, 0, 4, 2, 0),
    isa::encode(isa::EXIT, 0, 0, 0, 0),
];
