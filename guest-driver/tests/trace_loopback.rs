//! The driver's side of the fault timeline against the real device model,
//! in one process (no KVM): a fault no handler takes is drained, cancelled
//! and replayed, and the driver's events land between the device's on the
//! device clock.

mod common;

use common::loopback::Loopback;
use faultline_abi::{Pte, Status};
use faultline_driver::gpu::{
    Channel, Command, Context, Gpu, GpuConfig, GpuError, PageSize, PageTable, Platform,
};
use serde_json::Value;

fn find<'a>(ev: &'a [Value], pid: u64, name: &str) -> &'a Value {
    ev.iter()
        .find(|e| e["pid"] == pid && e["name"] == name)
        .unwrap_or_else(|| panic!("no {name} (pid {pid}) in {ev:#?}"))
}

fn ts(e: &Value) -> f64 {
    e["ts"].as_f64().unwrap()
}

#[test]
fn a_cancelled_fault_reads_in_order_on_one_clock() {
    let lb = Loopback::new(32);
    lb.start_trace();
    let gpu = Gpu::probe(lb.clone(), GpuConfig::default()).unwrap_or_else(|e| panic!("{e}"));
    let buf = lb.dma_alloc(1).expect("dma");
    let mut pt = PageTable::new(lb.clone()).unwrap_or_else(|e| panic!("{e}"));
    pt.map_range(buf.phys(), buf.phys(), 4096, PageSize::Size4K, Pte::empty())
        .unwrap_or_else(|e| panic!("{e}"));
    let ctx = Context::new(&gpu, pt).unwrap_or_else(|e| panic!("{e}"));
    let chan = Channel::open(&ctx).unwrap_or_else(|e| panic!("{e}"));
    // Read-only page, no fault handler: the write faults and is cancelled.
    let r = chan.run(&Command::Fill {
        dst: buf.phys(),
        len: 8,
        pattern: 1,
    });
    assert_eq!(r, Err(GpuError::Command(Status::Cancelled)));
    drop(chan);
    drop(ctx);
    let doc: Value = serde_json::from_slice(&lb.trace_json()).expect("JSON");
    drop(gpu);
    lb.dma_free(buf);

    let clock = doc["otherData"]["clock"].as_str().unwrap();
    assert!(clock.contains("TRACE_SYNC pairing"), "{clock}");
    assert_eq!(doc["otherData"]["guest_dropped"], 0);
    let mut ev: Vec<Value> = doc["traceEvents"].as_array().unwrap().clone();
    ev.retain(|e| e["ph"] != "M");
    ev.sort_by(|a, b| ts(a).total_cmp(&ts(b)));
    let raised = find(&ev, 1, "fault raised");
    let batch = find(&ev, 2, "batch drained");
    let cancel = find(&ev, 2, "cancel");
    let ctl = find(&ev, 1, "CancelRange");
    let rung = find(&ev, 2, "replay rung");
    let replay = find(&ev, 1, "replay received");
    let fill = find(&ev, 1, "Fill");
    assert_eq!(batch["args"]["entries"], 1);
    assert_eq!(cancel["args"]["va"].as_str(), raised["args"]["va"].as_str());
    assert_eq!(fill["args"]["status"], "Cancelled");
    // One process, one TSC: the pairing is exact to well under a µs, and
    // each step below is a handoff that takes longer.
    let order = [raised, batch, cancel, ctl, rung, replay];
    for w in order.windows(2) {
        assert!(
            ts(w[0]) <= ts(w[1]),
            "{} at {} before {} at {}",
            w[0]["name"],
            ts(w[0]),
            w[1]["name"],
            ts(w[1])
        );
    }
    assert!(ts(fill) + fill["dur"].as_f64().unwrap() >= ts(ctl));
}

#[test]
fn the_driver_registers_a_ring_only_when_the_host_traces() {
    use faultline_abi::regs;
    let lb = Loopback::new(32);
    let gpu = Gpu::probe(lb.clone(), GpuConfig::default()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(lb.read32(regs::TRACE_CAP), 0);
    assert_eq!(lb.read32(regs::TRACE_RING_ENTRIES), 0);
    let used = lb.frames_in_use();
    drop(gpu);

    let lb = Loopback::new(32);
    lb.start_trace();
    let gpu = Gpu::probe(lb.clone(), GpuConfig::default()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(lb.read32(regs::TRACE_RING_ENTRIES), 1024);
    // The ring: a 64-byte header and 1024 × 32 bytes, 9 pages; nothing else.
    assert_eq!(lb.frames_in_use(), used + 9);
    drop(gpu);
    assert_eq!(lb.frames_in_use(), 0, "the ring is freed with the GPU");
}
