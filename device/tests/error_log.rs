//! Device errors are the guest's doing: counted per kind, the first of each
//! kind logged once, outside the device lock, below warn (a passing run
//! that provokes errors on purpose stays quiet). A test binary of its own:
//! it installs the process-wide logger.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use faultline_abi::{regs, DeviceError};
use faultline_device::testing::Rig;
use faultline_device::{Device, DeviceMutex, Worker};
use vm_memory::GuestMemoryMmap;

type Shared = Arc<DeviceMutex<GuestMemoryMmap>>;

/// Every record: level, text, and whether the device lock was free while
/// it was written.
#[derive(Default)]
struct Capture {
    records: Mutex<Vec<(log::Level, String, bool)>>,
    device: Mutex<Option<Shared>>,
}

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, r: &log::Record) {
        let unlocked = match &*self.device.lock().unwrap() {
            Some(d) => d.try_lock().is_some(),
            None => true,
        };
        let text = r.args().to_string();
        self.records
            .lock()
            .unwrap()
            .push((r.level(), text, unlocked));
    }
    fn flush(&self) {}
}

fn capture() -> &'static Capture {
    static C: OnceLock<&'static Capture> = OnceLock::new();
    C.get_or_init(|| {
        let c: &'static Capture = Box::leak(Box::default());
        log::set_logger(c).unwrap();
        log::set_max_level(log::LevelFilter::Trace);
        c
    })
}

fn device_records(c: &Capture) -> Vec<(log::Level, String, bool)> {
    c.records
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, t, _)| t.contains("device error"))
        .cloned()
        .collect()
}

fn error_count(d: &Device<GuestMemoryMmap>, kind: &str) -> Option<u64> {
    d.counters()
        .named()
        .into_iter()
        .find(|(n, _)| *n == format!("errors.{kind}"))
        .map(|(_, v)| v)
}

/// The flood: ENABLE without setup, 100,000 times.
#[test]
fn error_flood_is_counted_logged_once_outside_the_lock_and_below_warn() {
    let c = capture();
    let mut r = Rig::new(16 << 20, 64);
    r.w32(regs::RESET, regs::RESET_VALUE);
    let dev: Shared = Arc::new(DeviceMutex::new(r.dev));
    *c.device.lock().unwrap() = Some(dev.clone());
    let worker = Worker::spawn(dev.clone(), Vec::new()).unwrap();
    {
        let mut d = dev.lock();
        for _ in 0..100_000 {
            d.mmio_write(regs::ENABLE, &1u32.to_le_bytes());
        }
        // Nothing is logged on the register path, under the lock.
        assert!(device_records(c).is_empty());
        let mut code = [0u8; 4];
        d.mmio_read(regs::ERROR_CODE, &mut code);
        assert_eq!(u32::from_le_bytes(code), DeviceError::BadSetup as u32);
        assert_eq!(error_count(&d, "BadSetup"), Some(100_000));
        assert_eq!(error_count(&d, "BadQueue"), Some(0));
    }
    // The worker logs the first one after its next step (a hang detector,
    // not a timing check).
    let deadline = Instant::now() + Duration::from_secs(60);
    while device_records(c).is_empty() {
        assert!(Instant::now() < deadline, "first error never logged");
        std::thread::sleep(Duration::from_millis(1));
    }
    // More errors of the same kind: counted, never logged again.
    for _ in 0..1000 {
        dev.lock().mmio_write(regs::ENABLE, &1u32.to_le_bytes());
    }
    worker.shutdown();
    let recs = device_records(c);
    assert_eq!(recs.len(), 1, "{recs:?}");
    let (level, text, unlocked) = &recs[0];
    assert!(*level > log::Level::Warn, "logged at {level}");
    assert!(text.contains("BadSetup"), "{text}");
    assert!(*unlocked, "logged while the device lock was held");
    assert_eq!(error_count(&dev.lock(), "BadSetup"), Some(101_000));
}

/// Hosts without the worker collect the same notes themselves: one per kind
/// in the device's life, however often it recurs or the device resets.
#[test]
fn first_errors_are_one_per_kind() {
    let mut r = Rig::new(16 << 20, 64);
    r.w32(regs::RESET, regs::RESET_VALUE);
    for _ in 0..3 {
        r.w32(regs::ENABLE, 1);
        r.w32(regs::channel_reg(0, regs::CH_ENABLE), 1);
        r.w32(regs::RESET, regs::RESET_VALUE);
    }
    let kinds: Vec<_> = r.dev.take_first_errors().iter().map(|e| e.code).collect();
    assert_eq!(kinds, [DeviceError::BadSetup, DeviceError::BadChannelSetup]);
    r.w32(regs::ENABLE, 1);
    assert!(r.dev.take_first_errors().is_empty());
    assert_eq!(error_count(&r.dev, "BadSetup"), Some(4));
    assert_eq!(error_count(&r.dev, "BadChannelSetup"), Some(3));
}
