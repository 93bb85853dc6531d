//! Builds the VM from a `Config` and runs it until the guest exits, a vCPU
//! fails, or the timeout fires. The main thread runs the event-manager loop
//! (stdin → serial, VM exit, timeout); vCPUs run on their own threads.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use faultline_device::sync::lock;
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm};
use vm_superio::Serial;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use crate::boot;
use crate::bus::Bus;
use crate::devices::debug_exit::{DebugExit, DEBUG_EXIT_LEN, DEBUG_EXIT_PORT};
use crate::devices::debugcon::{DebugCon, DEBUGCON_LEN, DEBUGCON_PORT};
use crate::devices::linecon::{LineCon, LINECON_LEN, LINECON_PORT};
use crate::devices::serial::{IrqTrigger, SerialPort, COM1_GSI, COM1_LEN, COM1_PORT};
use crate::error::{Error, Result};
use crate::gpu;
use crate::memory;
use crate::output::Console;
use crate::pci::{PciBus, PciConfigIo, CONFIG_ADDRESS_PORT, CONFIG_PORTS_LEN};
use crate::signals::Shutdown;
use crate::vstate::{self, ExitReason, VcpuThreads, VmExit};

pub struct Config {
    pub kvm_path: PathBuf,
    /// Opened and checked before any VM setup (`boot::open_firmware`).
    pub firmware: boot::Firmware,
    pub memory: u64,
    pub vcpus: u32,
    pub cmdline: String,
    /// None: run until the guest exits.
    pub timeout: Option<Duration>,
    /// Host the Faultline GPU at 00:04.0, sized by this config.
    pub gpu: Option<faultline_device::Config>,
    /// Doorbell ioeventfds and MSI irqfds (false: plain exits and
    /// KVM_SIGNAL_MSI, `--gpu-no-fastpath`).
    pub gpu_fastpath: bool,
    /// Record the GPU's fault timeline (`--gpu-trace`).
    pub gpu_trace: bool,
    /// Sample the vCPUs (`--profile-guest`).
    pub profile: Option<Arc<crate::profile::Profile>>,
    /// SIGINT/SIGTERM: stops the VM like a timeout does.
    pub shutdown: &'static Shutdown,
}

/// What `run` hands back when the VM stopped without a VMM error.
pub struct Report {
    pub outcome: Outcome,
    /// The GPU's counters at exit as (name, value); None with `--no-gpu`.
    pub gpu_counters: Option<Vec<(String, u64)>>,
    /// The GPU, stopped, for what is read after the counters (the trace).
    pub gpu: Option<Arc<gpu::GpuLock>>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Guest(ExitReason),
    TimedOut,
    /// SIGINT or SIGTERM (the number).
    Signal(i32),
}

/// Where KVM keeps its TSS and identity-map pages on Intel: just below the
/// top of the 32-bit space, inside the MMIO hole and clear of any BAR we use.
const KVM_TSS_ADDR: usize = 0xfffb_d000;
const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

fn open_kvm(path: &std::path::Path) -> Result<Kvm> {
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
        Error::KvmOpen {
            path: path.to_path_buf(),
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        }
    })?;
    let kvm = Kvm::new_with_path(&cpath).map_err(|e| Error::KvmOpen {
        path: path.to_path_buf(),
        source: std::io::Error::from_raw_os_error(e.errno()),
    })?;
    let version = kvm.get_api_version();
    if version < 0 {
        return Err(Error::KvmNotKvm {
            path: path.to_path_buf(),
            source: std::io::Error::from_raw_os_error(-version),
        });
    }
    if version != 12 {
        return Err(Error::KvmVersion(version));
    }
    for (cap, name) in [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
        (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(Error::KvmCap(name));
        }
    }
    Ok(kvm)
}

/// The most vCPUs `--vcpus` accepts (KVM may allow fewer).
pub const MAX_VCPUS: usize = 255;

/// Checks `--vcpus` against the limit of this host's KVM (the command
/// line already held it to `1..=MAX_VCPUS`).
pub fn validate_vcpus(value: u32, max: usize) -> Result<u32> {
    if value == 0 || value as usize > max {
        return Err(Error::Vcpus {
            value,
            reason: format!("must be between 1 and {max}"),
        });
    }
    Ok(value)
}

pub fn run(cfg: Config) -> Result<Report> {
    let kvm = open_kvm(&cfg.kvm_path)?;
    let max_vcpus = kvm.get_max_vcpus().min(MAX_VCPUS);
    validate_vcpus(cfg.vcpus, max_vcpus)?;

    // Shared with the GPU's BAR and MSI plumbing, which (re)registers
    // ioeventfds and irqfds when the guest reprograms the device.
    let vm = Arc::new(kvm.create_vm().map_err(Error::kvm("creating the VM"))?);
    vm.set_tss_address(KVM_TSS_ADDR)
        .map_err(Error::kvm("setting the TSS address"))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
        .map_err(Error::kvm("setting the identity map address"))?;
    vm.create_irq_chip()
        .map_err(Error::kvm("creating the in-kernel irqchip"))?;
    // The speaker port (0x61) is then handled in the kernel too, which the
    // firmware's PIT calibration fallback uses.
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(Error::kvm("creating the in-kernel PIT"))?;

    let mem = memory::create_guest_memory(cfg.memory)?;
    memory::register_with_kvm(&vm, &mem)?;
    // RAM is a fresh memfd, so all zero: say so to the guest (`ram=zero`,
    // firmware/README.md), first, so a later `ram=` from the user wins.
    let cmdline = format!("ram=zero {}", cfg.cmdline);
    let entry = boot::load_firmware(
        &mem,
        cfg.memory,
        &cfg.firmware,
        cmdline.trim_end(),
        cfg.vcpus,
    )?;

    let exit = Arc::new(VmExit::new().map_err(Error::io("creating the exit eventfd"))?);
    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(Error::io("creating the serial irqfd"))?;
    vm.register_irqfd(&serial_irq, COM1_GSI)
        .map_err(Error::kvm("registering the serial irqfd"))?;
    let serial = Arc::new(Mutex::new(SerialPort(Serial::new(
        IrqTrigger(serial_irq),
        Box::new(Console) as Box<dyn std::io::Write + Send>,
    ))));

    let pio = Bus::new();
    pio.insert(serial.clone(), u64::from(COM1_PORT), COM1_LEN)
        .expect("fixed legacy ports do not overlap");
    pio.insert(
        Arc::new(Mutex::new(DebugExit::new(exit.clone()))),
        u64::from(DEBUG_EXIT_PORT),
        DEBUG_EXIT_LEN,
    )
    .expect("fixed legacy ports do not overlap");
    pio.insert(
        Arc::new(Mutex::new(DebugCon::new(Box::new(Console)))),
        u64::from(DEBUGCON_PORT),
        DEBUGCON_LEN,
    )
    .expect("fixed legacy ports do not overlap");
    pio.insert(
        Arc::new(Mutex::new(LineCon::new(mem.clone(), Box::new(Console)))),
        u64::from(LINECON_PORT),
        LINECON_LEN,
    )
    .expect("fixed legacy ports do not overlap");
    let mmio = Bus::new();
    let mut pci = PciBus::new();
    let gpu = match cfg.gpu {
        Some(sizing) => Some(gpu::attach(
            &vm,
            &mem,
            cfg.memory,
            sizing,
            &mmio,
            &mut pci,
            cfg.gpu_fastpath,
        )?),
        None => None,
    };
    if let Some(g) = gpu.as_ref().filter(|_| cfg.gpu_trace) {
        g.start_trace();
    }
    pio.insert(
        Arc::new(Mutex::new(PciConfigIo::new(pci))),
        u64::from(CONFIG_ADDRESS_PORT),
        CONFIG_PORTS_LEN,
    )
    .expect("fixed legacy ports do not overlap");

    let vcpus = vstate::create_vcpus(&kvm, &vm, cfg.vcpus, entry)?;
    let threads = VcpuThreads::start(vcpus, pio, mmio, exit.clone(), cfg.profile.clone())?;

    let mut em =
        EventManager::<Arc<Mutex<dyn MutEventSubscriber>>>::new().map_err(Error::EventLoop)?;
    let control = Arc::new(Mutex::new(Control::new(
        exit.clone(),
        cfg.timeout,
        cfg.shutdown,
    )?));
    em.add_subscriber(control.clone());
    em.add_subscriber(Arc::new(Mutex::new(StdinToSerial { serial })));

    let outcome = loop {
        em.run().map_err(Error::EventLoop)?;
        let c = lock(&control);
        if c.timed_out {
            break Outcome::TimedOut;
        }
        if let Some(sig) = c.shutdown.signal() {
            break Outcome::Signal(sig);
        }
        if let Some(reason) = exit.reason() {
            break Outcome::Guest(reason);
        }
    };
    threads.stop();
    // After the vCPUs: no doorbell or BAR access can arrive any more.
    let (gpu_counters, gpu) = gpu.map(gpu::GpuHost::stop).unzip();
    detach_vm_teardown();
    Ok(Report {
        outcome,
        gpu_counters,
        gpu,
    })
}

/// Hands the last reference to the VM to a child process, so this one can
/// report the verdict without waiting for the kernel's VM teardown.
///
/// With the in-kernel irqchip, the last `close` of the VM fd takes ~15 ms on
/// this host (the PIC/IOAPIC teardown waits for SRCU grace periods; a VM
/// without an irqchip closes in 0.2 ms), longer than everything else the
/// VMM does after the exit port. Called once the vCPUs and the device have
/// stopped, so the verdict and the counters are final. Whichever process
/// drops its reference last pays for the teardown, so the child must
/// outlive this one: it closes its stdio (a reader waiting for EOF on our
/// output is not held up), then blocks on a pipe whose write end only this
/// process holds, and exits once that read sees EOF, i.e. once this
/// process is gone. It runs no Rust code and touches no state. If `pipe2`
/// or `fork` fails, this process closes the VM itself.
fn detach_vm_teardown() {
    let mut ends = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the two-element array.
    if unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        log::debug!(
            "pipe for the VM teardown failed ({}); tearing down in place",
            std::io::Error::last_os_error()
        );
        return;
    }
    let [read_end, write_end] = ends;
    // SAFETY: fork in a process whose other threads are all joined or idle;
    // the child calls only async-signal-safe functions (close, close_range,
    // read, _exit).
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: in the child of fork: closing its own descriptors, a
        // one-byte read into a local, and exiting without running
        // destructors or atexit handlers.
        unsafe {
            libc::close_range(0, 2, 0);
            libc::close(write_end);
            let mut byte = 0u8;
            // Nothing is ever written: the read returns 0 when the parent's
            // write end closes at its exit (or -1 on a signal; either way
            // the parent is gone or going, and the child's exit then drops
            // the last reference to the VM).
            libc::read(read_end, (&raw mut byte).cast(), 1);
            libc::_exit(0);
        }
    }
    // SAFETY: closing this process's copy of the read end, which nothing
    // else uses; the write end stays open until this process exits.
    unsafe { libc::close(read_end) };
    if pid < 0 {
        log::debug!(
            "fork for the VM teardown failed ({}); tearing down in place",
            std::io::Error::last_os_error()
        );
        // SAFETY: no child holds the other end; nothing else uses it.
        unsafe { libc::close(write_end) };
    }
}

/// Watches the VM-exit eventfd and the timeout timer.
struct Control {
    exit: Arc<VmExit>,
    timer: Option<TimerFd>,
    timed_out: bool,
    shutdown: &'static Shutdown,
}

impl Control {
    fn new(
        exit: Arc<VmExit>,
        timeout: Option<Duration>,
        shutdown: &'static Shutdown,
    ) -> Result<Self> {
        let timer = match timeout {
            Some(d) => {
                let mut t = TimerFd::new()
                    .map_err(|e| Error::io("creating the timeout timer")(e.into()))?;
                t.reset(d, None)
                    .map_err(|e| Error::io("arming the timeout timer")(e.into()))?;
                Some(t)
            }
            None => None,
        };
        Ok(Self {
            exit,
            timer,
            timed_out: false,
            shutdown,
        })
    }
}

impl MutEventSubscriber for Control {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.exit.evt.as_raw_fd() {
            let _ = self.exit.evt.read();
        } else if events.fd() == self.shutdown.evt.as_raw_fd() {
            // Level-triggered and never read: the loop stops for good.
        } else if let Some(t) = self.timer.as_mut() {
            if events.fd() == t.as_raw_fd() {
                let _ = t.wait();
                self.timed_out = true;
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.exit.evt, EventSet::IN)) {
            log::error!("cannot watch the exit eventfd: {e:?}");
        }
        if let Err(e) = ops.add(Events::new(&self.shutdown.evt, EventSet::IN)) {
            log::error!("cannot watch for SIGINT/SIGTERM: {e:?}");
        }
        if let Some(t) = &self.timer {
            if let Err(e) = ops.add(Events::new(t, EventSet::IN)) {
                log::error!("cannot watch the timeout timer: {e:?}");
            }
        }
    }
}

/// Feeds host stdin into the guest's COM1 receive FIFO. Stops watching on
/// EOF or error (CI runs without input).
struct StdinToSerial {
    serial: Arc<Mutex<SerialPort>>,
}

impl MutEventSubscriber for StdinToSerial {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        let n = if events.event_set().contains(EventSet::IN) {
            std::io::stdin().lock().read(&mut buf).unwrap_or(0)
        } else {
            0
        };
        if n == 0 {
            let _ = ops.remove(Events::new(&std::io::stdin(), EventSet::IN));
            return;
        }
        let mut s = lock(&self.serial);
        // A full FIFO drops input, as a real UART would.
        if let Err(e) = s.0.enqueue_raw_bytes(&buf[..n]) {
            log::debug!("serial input dropped: {e:?}");
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        // stdin may be /dev/null or a closed descriptor: not watchable, fine.
        if let Err(e) = ops.add(Events::new(&std::io::stdin(), EventSet::IN)) {
            log::debug!("not forwarding stdin: {e:?}");
        }
    }
}
