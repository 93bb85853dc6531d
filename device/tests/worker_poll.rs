//! The worker's bounded poll (`worker::SPIN`): rung again and again with
//! nothing to do, then left alone, it goes to sleep instead of burning a
//! CPU.

use std::sync::Arc;
use std::time::Duration;

use faultline_abi::doorbell;
use faultline_device::{Device, DeviceMutex, InterruptSink, Worker};
use vm_memory::{GuestAddress, GuestMemoryMmap};

struct NoIrq;
impl InterruptSink for NoIrq {
    fn trigger(&self, _: u32) {}
}

/// CPU time (clock ticks) of this process's thread named `name`.
fn thread_ticks(name: &str) -> u64 {
    let mut total = 0;
    for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap();
        // After the parenthesised name: state is field 3, utime 14, stime 15.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split(' ').collect();
        total += f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    }
    total
}

#[test]
fn an_idle_worker_sleeps() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let dev = Arc::new(DeviceMutex::new(Device::new(mem, Arc::new(NoIrq))));
    let worker = Worker::spawn(dev, Vec::new()).unwrap();
    let waker = worker.waker();
    for _ in 0..2000 {
        waker.ring(doorbell::REPLAY);
    }
    std::thread::sleep(Duration::from_millis(20));
    let before = thread_ticks("faultline-gpu");
    std::thread::sleep(Duration::from_millis(500));
    let used = thread_ticks("faultline-gpu") - before;
    // Clock ticks are 10 ms: a worker still polling would show ~50.
    assert!(used <= 5, "the idle worker used {used} ticks in 500 ms");
    worker.shutdown();
}
