//! The fault timeline (`faultline_device::trace`): device events in order,
//! the bounded ring, the driver's trace ring merged on the host clock, and
//! the JSON Perfetto opens.

use faultline_abi::{
    regs, trace as ring, vector, CtlOp, Pte, Status, TraceEntry, TraceHeader, TraceKind, LEAF_4K,
    MAX_TRACE_ENTRIES,
};
use faultline_device::testing::{cmd, Rig, DATA};
use faultline_device::trace::{host_tsc, Event, Trace};

fn rig() -> Rig {
    let mut r = Rig::new(64 << 20, 64);
    assert!(r.enable_channel(0, 0));
    r
}

fn json(r: &mut Rig) -> serde_json::Value {
    let mut out = Vec::new();
    assert!(r.dev.write_trace(&mut out).unwrap());
    serde_json::from_slice(&out).expect("the trace is JSON")
}

fn events(r: &mut Rig) -> Vec<(u64, Event)> {
    r.dev.trace().expect("tracing").events().collect()
}

/// Where the driver's ring lives in the rig's memory (clear of its rings).
const TRACE_RING: u64 = 0x30_0000;

#[test]
fn a_fault_is_traced_from_raise_to_completion() {
    let mut r = rig();
    r.dev.start_trace(1024);
    r.map(0, 0x2000, DATA, LEAF_4K, Pte::empty());
    let t = r.exec(0, cmd::fill(0x2010, 8, 1));
    assert_eq!(r.completion(t), None);
    r.drain_faults();
    r.map(0, 0x2000, DATA, LEAF_4K, Pte::WRITE);
    assert!(r.ctl_ok(CtlOp::InvalidateRange, 0, 0x2000, 0x1000));
    r.replay();
    assert_eq!(r.status(t), Status::Ok);

    let ev = events(&mut r);
    let kinds: Vec<&str> = ev
        .iter()
        .map(|(_, e)| match e {
            Event::CmdStart { .. } => "start",
            Event::FaultRaised { .. } => "fault",
            Event::Msi {
                vector: vector::FAULT,
            } => "msi",
            Event::Msi { .. } => "other msi",
            Event::CtlStart { .. } => "ctl",
            Event::CtlAck { .. } => "ack",
            Event::Replay { .. } => "replay",
            Event::CmdComplete { .. } => "complete",
            Event::Driver { .. } => "driver",
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "start",
            "fault",
            "msi",
            "ctl",
            "ack",
            "replay",
            "complete",
            "other msi"
        ],
        "{ev:?}"
    );
    assert!(
        ev.windows(2).all(|w| w[0].0 <= w[1].0),
        "time order: {ev:?}"
    );
    assert_eq!(
        ev[1].1,
        Event::FaultRaised {
            context: 0,
            va: 0x2000,
            access: 1,
            channel: 0
        }
    );

    let doc = json(&mut r);
    let te = doc["traceEvents"].as_array().unwrap();
    let find = |ph: &str, name: &str| {
        te.iter()
            .find(|e| e["ph"] == ph && e["name"].as_str().is_some_and(|n| n.starts_with(name)))
            .unwrap_or_else(|| panic!("no {ph} {name} in {te:#?}"))
    };
    let b = find("b", "fault 0x2000");
    let e = find("e", "fault 0x2000");
    assert_eq!(b["id"], e["id"]);
    assert!(e["ts"].as_f64() >= b["ts"].as_f64());
    assert_eq!(b["args"]["access"], "write");
    let fill = find("X", "Fill");
    assert_eq!(fill["args"]["status"], "Ok");
    assert_eq!(fill["tid"], 10);
    assert!(fill["dur"].as_f64().unwrap() >= 0.0);
    find("b", "InvalidateRange");
    find("e", "InvalidateRange");
    find("i", "MSI FAULT");
    find("i", "replay received");
    assert_eq!(doc["otherData"]["dropped"], 0);
}

#[test]
fn the_ring_keeps_the_last_events_and_counts_the_rest() {
    let mut t = Trace::new(4, 0);
    for seq in 0..10 {
        t.push(u64::from(seq), Event::Replay { seq });
    }
    assert_eq!(t.len(), 4);
    assert_eq!(t.dropped(), 6);
    let kept: Vec<u64> = t.events().map(|(ts, _)| ts).collect();
    assert_eq!(kept, [6, 7, 8, 9]);
    let mut out = Vec::new();
    t.write_json(10, &mut out).unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(doc["otherData"]["dropped"], 6);
}

#[test]
fn without_a_trace_the_registers_read_zero_and_nothing_is_written() {
    let mut r = rig();
    assert_eq!(r.r32(regs::TRACE_CAP), 0);
    r.w32(regs::TRACE_RING_LO, TRACE_RING as u32);
    r.w32(regs::TRACE_RING_ENTRIES, 16);
    assert_eq!(r.r32(regs::TRACE_RING_ENTRIES), 0);
    assert!(r.dev.trace().is_none());
    assert!(!r.dev.write_trace(&mut Vec::new()).unwrap());
}

fn register_ring(r: &mut Rig, entries: u32) {
    r.w32(regs::TRACE_RING_LO, TRACE_RING as u32);
    r.w32(regs::TRACE_RING_HI, 0);
    r.w32(regs::TRACE_RING_ENTRIES, entries);
}

fn push_driver(r: &Rig, prod: &mut u32, entries: u32, e: TraceEntry) {
    let at = TRACE_RING + ring::entry_offset(*prod % entries);
    r.write_bytes(at, &e.to_le_bytes());
    *prod += 1;
    r.write_u32(TRACE_RING + TraceHeader::PROD_OFFSET as u64, *prod);
}

#[test]
fn driver_events_are_merged_on_the_device_clock() {
    let mut r = rig();
    r.dev.start_trace(1024);
    assert_eq!(r.r32(regs::TRACE_CAP), MAX_TRACE_ENTRIES);
    // Outside RAM or misaligned: refused.
    r.w32(regs::TRACE_RING_LO, 0x123);
    r.w32(regs::TRACE_RING_ENTRIES, 16);
    assert_eq!(r.r32(regs::TRACE_RING_ENTRIES), 0);
    r.w32(regs::TRACE_RING_HI, 0x100);
    r.w32(regs::TRACE_RING_ENTRIES, 16);
    assert_eq!(r.r32(regs::TRACE_RING_ENTRIES), 0);
    register_ring(&mut r, 16);
    assert_eq!(r.r32(regs::TRACE_RING_ENTRIES), 16);
    // The pairing as a driver makes it, with a "guest" TSC 1e9 behind.
    const BEHIND: u64 = 1_000_000_000;
    let t1 = host_tsc() - BEHIND;
    r.w32(regs::TRACE_SYNC, 0);
    let t2 = host_tsc() - BEHIND;
    let mid = t1 / 2 + t2 / 2;
    r.w32(regs::TRACE_TSC_LO, mid as u32);
    r.w32(regs::TRACE_TSC_HI, (mid >> 32) as u32);

    // Device event, then a driver event, then a device event.
    r.map(0, 0x2000, DATA, LEAF_4K, Pte::empty());
    let t = r.exec(0, cmd::fill(0x2000, 8, 1));
    std::thread::sleep(std::time::Duration::from_millis(2));
    let mut prod = 0;
    let window = TraceEntry {
        tsc: host_tsc() - BEHIND,
        kind: TraceKind::WindowServiced as u32,
        context: 0,
        a: 0x2000,
        b: 0x1_0000,
    };
    push_driver(&r, &mut prod, 16, window);
    std::thread::sleep(std::time::Duration::from_millis(2));
    r.map(0, 0x2000, DATA, LEAF_4K, Pte::WRITE);
    r.replay();
    assert_eq!(r.status(t), Status::Ok);
    // Read by the step the REPLAY ran.
    assert_eq!(r.read_u32(TRACE_RING + TraceHeader::CONS_OFFSET as u64), 1);
    let tr = r.dev.trace().unwrap();
    let off = tr.tsc_offset().expect("paired");
    assert!((off - BEHIND as i64).abs() < 1_000_000, "offset {off}");

    let doc = json(&mut r);
    let te = doc["traceEvents"].as_array().unwrap();
    let ts = |name: &str| {
        te.iter()
            .find(|e| e["name"].as_str() == Some(name))
            .and_then(|e| e["ts"].as_f64())
            .unwrap_or_else(|| panic!("no {name}"))
    };
    let w = te
        .iter()
        .find(|e| e["name"] == "window serviced")
        .expect("the driver's window");
    assert_eq!(w["pid"], 2);
    assert_eq!(w["args"]["size_kib"], 64);
    let end = w["ts"].as_f64().unwrap() + w["dur"].as_f64().unwrap();
    let (raised, replayed) = (ts("fault raised"), ts("replay received"));
    // 2 ms either side; the pairing is good to microseconds in-process.
    assert!(
        raised + 1000.0 < end && end + 1000.0 < replayed,
        "raised {raised} window end {end} replay {replayed}"
    );
    assert!(doc["otherData"]["clock"]
        .as_str()
        .unwrap()
        .contains("TRACE_SYNC pairing"));
}

#[test]
fn a_hostile_driver_ring_is_bounded() {
    let mut r = rig();
    r.dev.start_trace(1 << 16);
    register_ring(&mut r, 4);
    // PUT far ahead of what the ring holds: only the last 4 are read.
    r.write_u32(TRACE_RING + TraceHeader::PROD_OFFSET as u64, 1_000_000);
    r.write_u32(TRACE_RING + TraceHeader::DROPPED_OFFSET as u64, 7);
    r.exec(0, cmd::fill(0x2000, 0, 0));
    let tr = r.dev.trace().unwrap();
    let driver = tr
        .events()
        .filter(|(_, e)| matches!(e, Event::Driver { .. }))
        .count();
    assert_eq!(driver, 4);
    let doc = json(&mut r);
    assert_eq!(doc["otherData"]["guest_skipped"], 1_000_000 - 4);
    assert_eq!(doc["otherData"]["guest_dropped"], 7);
    // Unknown kinds are shown, not trusted.
    let te = doc["traceEvents"].as_array().unwrap();
    assert!(te.iter().any(|e| e["name"] == "unknown driver event"));
    // RESET unregisters the ring.
    r.w32(regs::RESET, regs::RESET_VALUE);
    assert_eq!(r.r32(regs::TRACE_RING_ENTRIES), 0);
}
