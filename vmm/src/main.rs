//! `faultline`: the Faultline VMM command line.

mod boot;
mod bus;
mod devices;
mod error;
mod gpu;
mod memory;
mod msi;
mod pci;
mod serve;
mod vmm;
mod vstate;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

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

/// Process exit statuses; documented in the README.
mod status {
    pub const GUEST_FAILED: u8 = 1;
    pub const VMM_ERROR: u8 = 3;
    pub const GUEST_CRASHED: u8 = 4;
    pub const TIMEOUT: u8 = 5;
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
    /// reported failure (value 1), 3 VMM or setup error, 4 the guest crashed
    /// (triple fault, panic value >= 2, vCPU error), 5 --timeout expired.
    Run(RunArgs),
    /// Serve the Faultline GPU to another VMM (QEMU's vfio-user-pci) over
    /// vfio-user on a UNIX socket, for one client.
    ///
    /// Exit status: 0 the client disconnected (between messages), 3 setup
    /// error, protocol violation, or the client vanished mid-message.
    Serve(ServeArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// UNIX socket to listen on; must not exist. Removed once a client
    /// connected (one client per server).
    #[arg(long, value_name = "PATH")]
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
    /// Guest RAM: a number of MiB, or with a K/M/G/T suffix.
    #[arg(long, default_value = "512M")]
    memory: String,
    /// Number of vCPUs (the firmware runs on the first; the others wait for SIPI).
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Guest command line, e.g. "test=heap loglevel=debug".
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Stop the guest after this many seconds (0: never).
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// The KVM device node.
    #[arg(long, default_value = "/dev/kvm", env = "FAULTLINE_KVM_DEVICE")]
    kvm_device: PathBuf,
    /// Do not attach the Faultline GPU (PCI 00:04.0, BAR0 at 0xc0000000).
    #[arg(long)]
    no_gpu: bool,
    /// Benchmark/debug aid: no doorbell ioeventfds (doorbells exit to the
    /// VMM like any BAR0 write) and MSIs by KVM_SIGNAL_MSI instead of irqfds.
    #[arg(long)]
    gpu_no_fastpath: bool,
    #[command(flatten)]
    stats: StatsArgs,
    #[command(flatten)]
    gpu: GpuArgs,
}

/// The GPU's counters at exit (the VM stopped, or the client disconnected);
/// shared by `run` and `serve`.
#[derive(clap::Args)]
struct StatsArgs {
    /// Print the GPU's counters to stderr at exit.
    #[arg(long)]
    stats: bool,
    /// Write the GPU's counters as JSON to PATH at exit
    /// ({"gpu": {"name": value, ...}}, "gpu": null with --no-gpu).
    #[arg(long, value_name = "PATH")]
    stats_json: Option<PathBuf>,
}

/// GPU sizing, shared by `run` and `serve`; the guest reads it back from
/// NUM_CHANNELS, FAULT_BUF_MAX and TLB_ENTRIES.
#[derive(clap::Args)]
struct GpuArgs {
    /// Largest fault buffer (entries) the GPU accepts: a power of two, 2..=65536.
    #[arg(long, value_name = "N", default_value_t = faultline_abi::MAX_FAULT_ENTRIES,
          value_parser = gpu_fault_entries)]
    gpu_fault_entries: u32,
    /// Leaf translations each GPU context's TLB holds: 1..=1048576.
    #[arg(long, value_name = "N", default_value_t = faultline_device::mmu::TLB_CAPACITY as u32,
          value_parser = gpu_tlb_entries)]
    gpu_tlb_entries: u32,
    /// GPU channels: 1..=8.
    #[arg(long, value_name = "N", default_value_t = faultline_abi::NUM_CHANNELS,
          value_parser = gpu_channels)]
    gpu_channels: u32,
}

impl GpuArgs {
    fn config(&self) -> faultline_device::Config {
        faultline_device::Config {
            max_fault_entries: self.gpu_fault_entries,
            tlb_entries: self.gpu_tlb_entries,
            channels: self.gpu_channels,
        }
    }
}

/// Parses one sizing field and checks it with the device's own rules, so
/// the bounds live in one place.
fn gpu_field(s: &str, set: fn(&mut faultline_device::Config, u32)) -> Result<u32, String> {
    let v: u32 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    let mut c = faultline_device::Config::default();
    set(&mut c, v);
    c.validate().map(|()| v).map_err(|e| e.to_string())
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

/// What to do with the counters once the VM stopped.
struct StatsOut {
    print: bool,
    /// Created (truncated) before the VM starts, so a bad path fails fast.
    json: Option<(PathBuf, std::fs::File)>,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    init_logging(cli.log_level);
    let code = match cli.command {
        Command::Run(args) => run(args),
        Command::Serve(args) => serve(args),
    };
    let _ = std::io::stdout().flush();
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
    ExitCode::from(2)
}

fn run(args: RunArgs) -> u8 {
    let (config, stats) = match config(args) {
        Ok(c) => c,
        Err(e) => return fail(status::VMM_ERROR, &e.to_string()),
    };
    let report = match vmm::run(config) {
        Ok(r) => r,
        Err(e) => return fail(status::VMM_ERROR, &e.to_string()),
    };
    let code = verdict(report.outcome);
    match write_stats(stats, report.gpu_counters.as_deref()) {
        // The guest's verdict wins over a stats failure only if it already
        // failed; a passing run whose stats were lost is a VMM error.
        Err(e) if code == 0 => fail(status::VMM_ERROR, &e.to_string()),
        Err(e) => {
            eprintln!("faultline: {e}");
            code
        }
        Ok(()) => code,
    }
}

fn serve(args: ServeArgs) -> u8 {
    let stats = match stats_out(args.stats) {
        Ok(s) => s,
        Err(e) => return fail(status::VMM_ERROR, &e.to_string()),
    };
    let cfg = serve::ServeConfig {
        socket: args.socket,
        sizing: args.gpu.config(),
    };
    let report = match serve::serve(cfg) {
        Ok(r) => r,
        Err(e) => return fail(status::VMM_ERROR, &e.to_string()),
    };
    match write_stats(stats, Some(&report.gpu_counters)) {
        Ok(()) => 0,
        Err(e) => fail(status::VMM_ERROR, &e.to_string()),
    }
}

/// Creates (truncates) the JSON file before anything starts, so a bad path
/// fails fast.
fn stats_out(
    StatsArgs {
        stats: print,
        stats_json: json,
    }: StatsArgs,
) -> error::Result<StatsOut> {
    let json = match json {
        Some(path) => match std::fs::File::create(&path) {
            Ok(f) => Some((path, f)),
            Err(source) => return Err(error::Error::StatsWrite { path, source }),
        },
        None => None,
    };
    Ok(StatsOut { print, json })
}

fn write_stats(out: StatsOut, counters: Option<&[(String, u64)]>) -> error::Result<()> {
    if out.print {
        match counters {
            None => eprintln!("faultline: no GPU attached, no counters"),
            Some(c) => {
                eprintln!("faultline: GPU counters:");
                for (name, v) in c {
                    eprintln!("  {name:<24} {v}");
                }
            }
        }
    }
    if let Some((path, mut file)) = out.json {
        let gpu = counters.map(|c| {
            c.iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::from(*v)))
                .collect::<serde_json::Map<_, _>>()
        });
        let doc = serde_json::json!({ "gpu": gpu });
        let text = serde_json::to_string_pretty(&doc).expect("a JSON value always serialises");
        writeln!(file, "{text}").map_err(|source| error::Error::StatsWrite { path, source })?;
    }
    Ok(())
}

fn config(args: RunArgs) -> error::Result<(Config, StatsOut)> {
    let bytes = memory::parse_size(&args.memory).map_err(|reason| error::Error::Memory {
        value: args.memory.clone(),
        reason,
    })?;
    let memory = memory::validate_size(&args.memory, bytes, memory::host_ram_bytes())?;
    // KVM's own limit is checked again once /dev/kvm is open.
    vmm::validate_vcpus(args.vcpus, 255)?;
    let stats = stats_out(args.stats)?;
    let config = Config {
        kvm_path: args.kvm_device,
        firmware: args.firmware.unwrap_or_else(default_firmware),
        memory,
        vcpus: args.vcpus,
        cmdline: args.cmdline,
        timeout: (args.timeout > 0).then(|| Duration::from_secs(args.timeout)),
        gpu: (!args.no_gpu).then(|| args.gpu.config()),
        gpu_fastpath: !args.gpu_no_fastpath,
    };
    Ok((config, stats))
}

fn verdict(outcome: Outcome) -> u8 {
    match outcome {
        Outcome::Guest(ExitReason::DebugExit(0)) => 0,
        Outcome::Guest(ExitReason::DebugExit(1)) => fail(
            status::GUEST_FAILED,
            "guest reported failure (debug-exit value 1, QEMU status 3)",
        ),
        Outcome::Guest(ExitReason::DebugExit(v)) => fail(
            status::GUEST_CRASHED,
            &format!(
                "guest aborted (debug-exit value {v}, QEMU status {})",
                qemu_status(v)
            ),
        ),
        Outcome::Guest(ExitReason::TripleFault { cpu, rip }) => fail(
            status::GUEST_CRASHED,
            &format!("guest triple fault on vCPU {cpu} at RIP {rip:#x}"),
        ),
        Outcome::Guest(ExitReason::VcpuError { cpu, what }) => {
            fail(status::GUEST_CRASHED, &format!("vCPU {cpu}: {what}"))
        }
        Outcome::Guest(ExitReason::SystemEvent { cpu, kind }) => fail(
            status::GUEST_CRASHED,
            &format!("guest requested reset/power-off (system event {kind}) on vCPU {cpu}"),
        ),
        Outcome::TimedOut => fail(
            status::TIMEOUT,
            "guest did not exit before --timeout; stopped it",
        ),
    }
}

fn fail(code: u8, msg: &str) -> u8 {
    let _ = std::io::stdout().flush();
    eprintln!("faultline: {msg}");
    code
}

struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            eprintln!(
                "faultline: {}: {}",
                r.level().as_str().to_lowercase(),
                r.args()
            );
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
