//! `faultline`: the Faultline VMM command line.

mod boot;
mod bus;
mod devices;
mod error;
mod gpu;
mod memory;
mod msi;
mod output;
mod pci;
mod platform;
mod profile;
mod results;
mod serve;
mod signals;
mod stats;
mod trace;
mod vmm;
mod vstate;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use faultline_device::CheckMode;

use crate::devices::debug_exit::qemu_status;
use crate::vmm::{Config, Outcome};
use crate::vstate::ExitReason;

/// Where `scripts/build-firmware.sh` leaves the guest image, relative to
/// the repository this binary was built from.
fn default_firmware() -> PathBuf {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(std::path::Path::new("."));
    repo.join("firmware/target/x86_64-unknown-none/release/faultline-firmware")
}

/// Process exit statuses; documented in the README's table (which
/// `vmm/tests/exit_status.rs` walks). A signal ends a run with 128 + its
/// number (`signals::exit_status`).
mod status {
    pub const GUEST_FAILED: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const VMM_ERROR: u8 = 3;
    pub const GUEST_CRASHED: u8 = 4;
    pub const TIMEOUT: u8 = 5;
    /// `--gpu-check=fatal` saw a coherence violation.
    pub const COHERENCE: u8 = 6;
}

#[derive(Parser)]
#[command(
    name = "faultline",
    version,
    about = "Faultline: a KVM test bench for GPU shared-virtual-memory drivers"
)]
struct Cli {
    /// Log verbosity of the VMM itself (error, warn, info, debug, trace).
    #[arg(long, global = true, default_value = "warn", env = "FAULTLINE_LOG")]
    log_level: log::LevelFilter,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a PVH guest image under KVM and exit with its verdict.
    ///
    /// Exit status: 0 the guest passed (debug-exit value 0), 1 the guest
    /// reported failure (value 1), 2 bad usage, 3 VMM or setup error, 4 the
    /// guest crashed (triple fault, panic value >= 2, vCPU error), 5
    /// --timeout expired, 6 --gpu-check=fatal saw a coherence violation
    /// (instead of 0 or 1), 130/143 stopped by SIGINT/SIGTERM.
    Run(RunArgs),
    /// Serve the Faultline GPU to another VMM (QEMU's vfio-user-pci) over
    /// vfio-user on a UNIX socket, for one client.
    ///
    /// Exit status: 0 the client disconnected (between messages), 2 bad
    /// usage, 3 setup error, protocol violation, or the client vanished
    /// mid-message, 6 --gpu-check=fatal saw a coherence violation (instead
    /// of 0), 130/143 stopped by SIGINT/SIGTERM (the socket file is
    /// removed).
    Serve(ServeArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// UNIX socket to listen on; must not exist. Removed once a client
    /// connected (one client per server). At most 107 bytes.
    #[arg(long, value_name = "PATH", value_parser = socket_path)]
    socket: PathBuf,
    #[command(flatten)]
    stats: StatsArgs,
    #[command(flatten)]
    gpu: GpuArgs,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Guest image (PVH ELF). Defaults to the image scripts/build-firmware.sh builds.
    #[arg(long, env = "FAULTLINE_FIRMWARE")]
    firmware: Option<PathBuf>,
    /// Guest RAM: a number of MiB, or with a K/M/G/T suffix; 16M up to
    /// the host's RAM, a multiple of 4 KiB.
    #[arg(long, value_name = "SIZE", default_value = "512M", value_parser = memory_size,
          allow_hyphen_values = true)]
    memory: u64,
    /// Number of vCPUs, 1..=255 (the firmware runs on the first; the others
    /// wait for SIPI).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = vcpu_count,
          allow_negative_numbers = true)]
    vcpus: u32,
    /// Guest command line, e.g. "test=heap loglevel=debug".
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Stop the guest after this many seconds, 0..=4294967295 (0: never).
    #[arg(long, value_name = "SECS", default_value_t = 300, value_parser = timeout_secs,
          allow_negative_numbers = true)]
    timeout: u64,
    /// The KVM device node.
    #[arg(long, default_value = "/dev/kvm", env = "FAULTLINE_KVM_DEVICE")]
    kvm_device: PathBuf,
    /// Do not attach the Faultline GPU (PCI 00:04.0, BAR0 at 0xc0000000);
    /// --stats-json then says "gpu": null.
    #[arg(long)]
    no_gpu: bool,
    /// Benchmark/debug aid: no doorbell ioeventfds (doorbells exit to the
    /// VMM like any BAR0 write) and MSIs by KVM_SIGNAL_MSI instead of irqfds.
    #[arg(long)]
    gpu_no_fastpath: bool,
    /// Write the guest's test results (its `test <name> ... ok|SKIPPED|FAILED`
    /// lines) to PATH at exit as JUnit XML; a run that ends badly without a
    /// failed test adds a failed case `faultline.run` with the reason.
    #[arg(long, value_name = "PATH")]
    results: Option<PathBuf>,
    /// Sample every vCPU's RIP and CPL while the guest runs and write the
    /// histogram to PATH at exit (scripts/profile-guest.py names the
    /// functions). Guest kernel code is emulated on nested KVM here, so
    /// samples follow instruction counts.
    #[arg(long, value_name = "PATH")]
    profile_guest: Option<PathBuf>,
    /// Samples per second per vCPU for --profile-guest, 1..=10000.
    #[arg(long, value_name = "HZ", default_value_t = profile::DEFAULT_HZ,
          value_parser = clap::value_parser!(u32).range(profile::MIN_HZ as i64..=profile::MAX_HZ as i64))]
    profile_hz: u32,
    #[command(flatten)]
    stats: StatsArgs,
    #[command(flatten)]
    gpu: GpuArgs,
}

/// The GPU's and the process's counters at exit, on every exit path (the
/// guest stopped, a timeout, a signal, an error); shared by `run` and
/// `serve`.
#[derive(clap::Args)]
pub struct StatsArgs {
    /// Print the GPU's and the process's counters to stderr at exit.
    #[arg(long)]
    stats: bool,
    /// Write the counters as JSON to PATH at exit: {"gpu": {"name": value,
    /// ...}, "guest": {"tests": ..., "total": ...}, "process":
    /// {"peak_rss_kib": N, ...}} (README "--stats-json").
    #[arg(long, value_name = "PATH")]
    stats_json: Option<PathBuf>,
    /// Write the GPU's fault timeline (device events, and the guest
    /// driver's from its trace ring) to PATH at exit as Chrome trace-event
    /// JSON, for Perfetto's UI or chrome://tracing (README "Fault timeline").
    #[arg(long, value_name = "PATH")]
    gpu_trace: Option<PathBuf>,
}

impl StatsArgs {
    /// Opens the stats and trace outputs before anything runs, so an
    /// unwritable path fails at once; `inject` is the spec the stats name.
    fn open(&self, inject: Option<String>) -> Result<(stats::Out, Option<trace::Out>), String> {
        let stats = stats::Out::open(self.stats, self.stats_json.clone())
            .map_err(|e| e.to_string())?
            .gpu_inject(inject);
        let trace = self
            .gpu_trace
            .clone()
            .map(trace::Out::open)
            .transpose()
            .map_err(|e| e.to_string())?;
        Ok((stats, trace))
    }
}

/// GPU sizing, shared by `run` and `serve`; the guest reads it back from
/// NUM_CHANNELS, FAULT_BUF_MAX, TLB_ENTRIES and VRAM_SIZE.
#[derive(clap::Args)]
struct GpuArgs {
    /// Largest fault buffer (entries) the GPU accepts: a power of two, 2..=65536.
    #[arg(long, value_name = "N", default_value_t = faultline_abi::MAX_FAULT_ENTRIES,
          value_parser = gpu_fault_entries, allow_negative_numbers = true)]
    gpu_fault_entries: u32,
    /// Leaf translations each GPU context's TLB holds: 1..=1048576.
    #[arg(long, value_name = "N", default_value_t = faultline_device::mmu::TLB_CAPACITY as u32,
          value_parser = gpu_tlb_entries, allow_negative_numbers = true)]
    gpu_tlb_entries: u32,
    /// GPU channels: 1..=8.
    #[arg(long, value_name = "N", default_value_t = faultline_abi::NUM_CHANNELS,
          value_parser = gpu_channels, allow_negative_numbers = true)]
    gpu_channels: u32,
    /// GPU memory (VRAM): host memory the GPU owns, never guest RAM,
    /// committed only as the GPU writes it; a multiple of 2M up to 64G, 0
    /// for none; a bare number is MiB.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = gpu_vram)]
    gpu_vram: u64,
    /// Test facility: check every GPU translation against the CPU page
    /// table the context entry names (docs/gpu-abi.md "Coherence
    /// checker"). warn (the bare option): report violations; fatal: they
    /// also fail the command and the run ends with status 6; off.
    #[arg(long, value_name = "MODE", num_args = 0..=1, require_equals = true,
          default_value = "off", default_missing_value = "warn", value_parser = gpu_check)]
    gpu_check: CheckMode,
    /// Deterministic fault injection, e.g.
    /// "seed=7,tlb_ack_delay_steps=64,fault_reorder=1,spurious=0.01"
    /// (knobs: docs/testing.md "Fault injection").
    #[arg(long, value_name = "SPEC")]
    gpu_inject: Option<faultline_device::InjectSpec>,
}

impl GpuArgs {
    fn config(&self) -> faultline_device::Config {
        faultline_device::Config {
            max_fault_entries: self.gpu_fault_entries,
            tlb_entries: self.gpu_tlb_entries,
            channels: self.gpu_channels,
            vram: self.gpu_vram,
            check: self.gpu_check,
            inject: self.gpu_inject,
        }
    }
}

fn gpu_check(s: &str) -> Result<CheckMode, String> {
    s.parse()
        .map_err(|e: faultline_device::check::BadCheckMode| e.to_string())
}

/// With `--gpu-check=fatal`, a run that saw a violation ends with status 6
/// unless it already ended worse than a guest verdict (a crash, a timeout,
/// a signal or a VMM error keep theirs).
fn coherence_status(code: u8, mode: CheckMode, counters: Option<&[(String, u64)]>) -> u8 {
    match fatal_violations(code, mode, counters) {
        Some(n) => fail(
            status::COHERENCE,
            &format!(
                "{n} GPU coherence violation(s) with --gpu-check=fatal (the first of each page \
                 logged above)"
            ),
        ),
        None => code,
    }
}

/// The violations that turn status `code` into 6, if they do.
fn fatal_violations(code: u8, mode: CheckMode, counters: Option<&[(String, u64)]>) -> Option<u64> {
    let violations = counters?
        .iter()
        .find(|(k, _)| k == "lifetime.coherence_violations")
        .map(|(_, v)| *v)?;
    (mode == CheckMode::Fatal && violations > 0 && code <= status::GUEST_FAILED)
        .then_some(violations)
}

/// Parses one sizing field and checks it with the device's own rules, so
/// the bounds live in one place.
fn gpu_field(s: &str, set: fn(&mut faultline_device::Config, u32)) -> Result<u32, String> {
    let check = |v| {
        let mut c = faultline_device::Config::default();
        set(&mut c, v);
        c.validate().map(|()| v).map_err(|e| e.to_string())
    };
    match s.parse() {
        Ok(v) => check(v),
        // The device's message for a value it refuses states the range.
        Err(_) => Err(format!(
            "'{s}' is not a number ({})",
            check(0).err().unwrap_or_default().replacen(" 0 ", " ", 1)
        )),
    }
}
fn gpu_fault_entries(s: &str) -> Result<u32, String> {
    gpu_field(s, |c, v| c.max_fault_entries = v)
}
fn gpu_tlb_entries(s: &str) -> Result<u32, String> {
    gpu_field(s, |c, v| c.tlb_entries = v)
}
fn gpu_channels(s: &str) -> Result<u32, String> {
    gpu_field(s, |c, v| c.channels = v)
}

/// `--gpu-vram`: a size as `--memory` takes it, checked by the device.
fn gpu_vram(s: &str) -> Result<u64, String> {
    let vram = memory::parse_size(s)?;
    let c = faultline_device::Config {
        vram,
        ..faultline_device::Config::default()
    };
    c.validate().map(|()| vram).map_err(|e| e.to_string())
}

/// `--memory`: parsed and checked against the bench's and this host's
/// limits here, so a bad value is a usage error like any other.
fn memory_size(s: &str) -> Result<u64, String> {
    let host = memory::host_ram_bytes();
    let range = format!(
        "accepted: {}M..={}M in multiples of 4 KiB; a bare number is MiB",
        memory::MIN_MEMORY / memory::MIB,
        memory::max_size(host) / memory::MIB
    );
    memory::parse_size(s)
        .and_then(|b| memory::validate_size(b, host))
        .map_err(|reason| format!("{reason} ({range})"))
}

/// An integer option in `lo..=hi`.
fn int_in(s: &str, lo: u64, hi: u64, what: &str) -> Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(v) if (lo..=hi).contains(&v) => Ok(v),
        Ok(v) => Err(format!("{v} is out of range (accepted: {lo}..={hi})")),
        Err(_) => Err(format!("'{s}' is not {what} (accepted: {lo}..={hi})")),
    }
}
/// KVM's own limit, which can be lower, is checked once /dev/kvm is open.
fn vcpu_count(s: &str) -> Result<u32, String> {
    int_in(s, 1, vmm::MAX_VCPUS as u64, "a number of vCPUs").map(|v| v as u32)
}
/// The timeout timer takes any u32 number of seconds (136 years).
fn timeout_secs(s: &str) -> Result<u64, String> {
    int_in(s, 0, u64::from(u32::MAX), "a number of seconds")
}
/// A UNIX socket address holds a path of at most 107 bytes (108 with its
/// terminating NUL).
fn socket_path(s: &str) -> Result<PathBuf, String> {
    const MAX: usize = 107;
    match s.len() {
        0 => Err("an empty path".into()),
        n if n > MAX => Err(format!(
            "the path is {n} bytes; a UNIX socket path holds at most {MAX}"
        )),
        _ => Ok(PathBuf::from(s)),
    }
}

fn main() -> ExitCode {
    // Before any thread exists: every thread inherits the signal mask.
    let shutdown = match signals::install() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("faultline: cannot set up SIGINT/SIGTERM handling: {e}");
            return ExitCode::from(status::VMM_ERROR);
        }
    };
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    output::init();
    init_logging(cli.log_level);
    let code = match cli.command {
        Command::Run(args) => run(args, shutdown),
        Command::Serve(args) => serve(args, shutdown),
    };
    output::finish_stderr();
    ExitCode::from(code)
}

/// Help and version go to stdout as clap prints them; a usage error is one
/// line on stderr and status 2.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    let text = e.to_string();
    let line = text.lines().next().unwrap_or("bad usage");
    eprintln!(
        "faultline: {}",
        line.strip_prefix("error: ").unwrap_or(line)
    );
    ExitCode::from(status::USAGE)
}

/// The exit status for a VMM error: the user's input, or the VMM's.
fn error_status(e: &error::Error) -> u8 {
    if e.is_usage() {
        status::USAGE
    } else {
        status::VMM_ERROR
    }
}

fn run(args: RunArgs, shutdown: &'static signals::Shutdown) -> u8 {
    let inject = args.gpu.gpu_inject.filter(|_| !args.no_gpu);
    let (stats, gpu_trace) = match args.stats.open(inject.map(|s| s.to_string())) {
        Ok(o) => o,
        Err(e) => return fail(status::VMM_ERROR, &e),
    };
    // The guest driver's `stats` lines are read from the console too.
    if args.stats.stats || args.stats.stats_json.is_some() {
        results::enable();
    }
    let results = match args.results.as_deref().map(results::Out::open).transpose() {
        Ok(r) => r,
        Err(e) => return fail(status::VMM_ERROR, &e),
    };
    let profile = match args.profile_guest.as_deref() {
        Some(p) => match profile::Profile::create(p, args.profile_hz) {
            Ok(p) => Some(Arc::new(p)),
            Err(e) => {
                return fail(
                    status::VMM_ERROR,
                    &format!("--profile-guest {}: {e}", p.display()),
                )
            }
        },
        None => None,
    };
    let check = args.gpu.gpu_check;
    let result = config(args, shutdown, profile.clone()).and_then(vmm::run);
    // The guest is stopped: its console output goes out before our lines.
    output::finish_console();
    let (ending, counters, gpu) = match result {
        Ok(report) => (verdict(report.outcome), report.gpu_counters, report.gpu),
        Err(e) => (Err((error_status(&e), e.to_string())), None, None),
    };
    let code = match &ending {
        Ok(()) => 0,
        Err((code, why)) => fail(*code, why),
    };
    let code = coherence_status(code, check, counters.as_deref());
    let code = match results {
        Some(r) => keep_first(code, r.write(ending.as_ref().err())),
        None => code,
    };
    let code = write_trace(code, gpu_trace, gpu.as_deref());
    let code = match profile.map(|p| p.write()) {
        Some(Err(e)) => keep_first(code, Err(e)),
        _ => code,
    };
    finish(code, stats, counters.as_deref())
}

fn serve(args: ServeArgs, shutdown: &'static signals::Shutdown) -> u8 {
    let (stats, gpu_trace) = match args.stats.open(args.gpu.gpu_inject.map(|s| s.to_string())) {
        Ok(o) => o,
        Err(e) => return fail(status::VMM_ERROR, &e),
    };
    let cfg = serve::ServeConfig {
        socket: args.socket,
        sizing: args.gpu.config(),
        gpu_trace: gpu_trace.is_some(),
        shutdown,
    };
    let check = args.gpu.gpu_check;
    let served = serve::serve(cfg);
    let code = match served.result {
        Ok(serve::Ending::Disconnected) => 0,
        Ok(serve::Ending::Signal(sig)) => stopped_by(sig),
        Err(e) => fail(error_status(&e), &e.to_string()),
    };
    let code = coherence_status(code, check, served.gpu_counters.as_deref());
    let code = write_trace(code, gpu_trace, served.gpu.as_deref());
    finish(code, stats, served.gpu_counters.as_deref())
}

/// Writes `--gpu-trace` if asked (every exit path goes through here).
fn write_trace(code: u8, out: Option<trace::Out>, gpu: Option<&gpu::GpuLock>) -> u8 {
    match out {
        Some(t) => keep_first(code, t.write(gpu).map_err(|e| e.to_string())),
        None => code,
    }
}

/// Writes the stats (every exit path goes through here). A passing run
/// whose stats were lost is a VMM error; otherwise the first status wins.
fn finish(code: u8, stats: stats::Out, counters: Option<&[(String, u64)]>) -> u8 {
    keep_first(code, stats.write(counters).map_err(|e| e.to_string()))
}

/// An output lost at exit (the stats, the results): a VMM error for a run
/// that passed, otherwise one line and the run's own status.
fn keep_first(code: u8, written: Result<(), String>) -> u8 {
    match written {
        Err(e) if code == 0 => fail(status::VMM_ERROR, &e),
        Err(e) => {
            output::line(&e);
            code
        }
        Ok(()) => code,
    }
}

fn stopped_by(sig: i32) -> u8 {
    let (code, why) = stop_reason(sig);
    fail(code, &why)
}

fn stop_reason(sig: i32) -> (u8, String) {
    (
        signals::exit_status(sig),
        format!("stopped by {}", signals::name(sig)),
    )
}

fn config(
    args: RunArgs,
    shutdown: &'static signals::Shutdown,
    profile: Option<Arc<profile::Profile>>,
) -> error::Result<Config> {
    let firmware = args.firmware.unwrap_or_else(default_firmware);
    let firmware = boot::open_firmware(&firmware, args.memory)?;
    Ok(Config {
        kvm_path: args.kvm_device,
        firmware,
        memory: args.memory,
        vcpus: args.vcpus,
        cmdline: args.cmdline,
        timeout: (args.timeout > 0).then(|| Duration::from_secs(args.timeout)),
        gpu: (!args.no_gpu).then(|| args.gpu.config()),
        gpu_fastpath: !args.gpu_no_fastpath,
        gpu_trace: args.stats.gpu_trace.is_some(),
        profile,
        shutdown,
    })
}

/// How the run ended: `Ok` for a guest that passed, else the exit status
/// and the one line that says why.
fn verdict(outcome: Outcome) -> Result<(), (u8, String)> {
    let (code, why) = match outcome {
        Outcome::Guest(ExitReason::DebugExit(0)) => return Ok(()),
        Outcome::Guest(ExitReason::DebugExit(1)) => (
            status::GUEST_FAILED,
            "guest reported failure (debug-exit value 1, QEMU status 3)".to_string(),
        ),
        Outcome::Guest(ExitReason::DebugExit(v)) => (
            status::GUEST_CRASHED,
            format!(
                "guest aborted (debug-exit value {v}, QEMU status {})",
                qemu_status(v)
            ),
        ),
        Outcome::Guest(ExitReason::TripleFault { cpu, rip }) => (
            status::GUEST_CRASHED,
            format!("guest triple fault on vCPU {cpu} at RIP {rip:#x}"),
        ),
        Outcome::Guest(ExitReason::VcpuError { cpu, what }) => {
            (status::GUEST_CRASHED, format!("vCPU {cpu}: {what}"))
        }
        Outcome::Guest(ExitReason::SystemEvent { cpu, kind }) => (
            status::GUEST_CRASHED,
            format!("guest requested reset/power-off (system event {kind}) on vCPU {cpu}"),
        ),
        Outcome::TimedOut => (
            status::TIMEOUT,
            "guest did not exit before --timeout; stopped it".to_string(),
        ),
        Outcome::Signal(sig) => stop_reason(sig),
    };
    Err((code, why))
}

fn fail(code: u8, msg: &str) -> u8 {
    output::line(msg);
    code
}

struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }
    /// Queued for the stderr writer, never written here: records come from
    /// vCPU and device threads, some holding locks (`output`).
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            output::log_line(&format!(
                "{}: {}",
                r.level().as_str().to_lowercase(),
                r.args()
            ));
        }
    }
    fn flush(&self) {}
}

fn init_logging(level: log::LevelFilter) {
    static LOGGER: StderrLogger = StderrLogger;
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fatal_violations_replace_only_guest_verdicts() {
        let seen = [("lifetime.coherence_violations".to_string(), 3)];
        let none = [("lifetime.coherence_violations".to_string(), 0)];
        let f = CheckMode::Fatal;
        assert_eq!(fatal_violations(0, f, Some(&seen)), Some(3));
        assert_eq!(
            fatal_violations(status::GUEST_FAILED, f, Some(&seen)),
            Some(3)
        );
        for code in [
            status::USAGE,
            status::VMM_ERROR,
            status::GUEST_CRASHED,
            status::TIMEOUT,
            130,
        ] {
            assert_eq!(fatal_violations(code, f, Some(&seen)), None, "{code}");
        }
        assert_eq!(fatal_violations(0, CheckMode::Warn, Some(&seen)), None);
        assert_eq!(fatal_violations(0, f, Some(&none)), None);
        assert_eq!(fatal_violations(0, f, None), None);
    }
}
