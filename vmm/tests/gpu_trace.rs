//! `--gpu-trace PATH`: the fault timeline of a real guest run (one fault
//! from raise to completion, device and driver events on one clock), the
//! file on a timeout, and an unwritable path.

mod common;

use common::*;
use serde_json::Value;

fn trace_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "faultline-trace-{name}-{}.json",
        std::process::id()
    ))
}

fn read_trace(p: &std::path::Path) -> Value {
    let doc = stats_doc(p);
    let _ = std::fs::remove_file(p);
    doc
}

fn name(e: &Value) -> &str {
    e["name"].as_str().unwrap_or("")
}

fn ts(e: &Value) -> f64 {
    e["ts"].as_f64().unwrap_or_else(|| panic!("no ts: {e}"))
}

fn end(e: &Value) -> f64 {
    ts(e) + e["dur"].as_f64().unwrap_or(0.0)
}

fn va_of(s: &Value) -> u64 {
    u64::from_str_radix(s.as_str().unwrap().trim_start_matches("0x"), 16).unwrap()
}

/// The driver's events are placed on the device clock by the pairing at
/// bind, good to half an MMIO exit (docs/gpu-abi.md "Trace ring"):
/// comparisons across the two clocks allow this much (µs).
const PAIRING_SLACK_US: f64 = 25.0;

#[test]
fn anon_read_trace_shows_one_fault_from_raise_to_completion() {
    let (true, Some(fw)) = (kvm_or_skip("anon_read_trace"), firmware()) else {
        return;
    };
    let path = trace_path("anon-read");
    let o = faultline(&[
        "run",
        "--firmware",
        path_str(&fw),
        "--timeout",
        "120",
        "--gpu-trace",
        path_str(&path),
        "--cmdline",
        "test=anon_read",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}\n{}", stdout(&o), stderr(&o));
    let summary = script("trace-summary.py", &[&path]);
    let page = std::env::temp_dir().join(format!("faultline-trace-{}.html", std::process::id()));
    script("trace-html.py", &[&path, &page]);
    let html = std::fs::read_to_string(&page).unwrap();
    let _ = std::fs::remove_file(&page);
    for what in [
        "fault raised",
        "MSI FAULT",
        "window serviced",
        "replay rung",
        "fault 0x",
    ] {
        assert!(html.contains(what), "trace-html.py draws no {what}");
    }
    let doc = read_trace(&path);
    assert_eq!(doc["otherData"]["dropped"], 0);
    let clock = doc["otherData"]["clock"].as_str().unwrap();
    assert!(clock.contains("TRACE_SYNC pairing"), "{clock}");
    let mut ev: Vec<Value> = doc["traceEvents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["ph"] != "M")
        .cloned()
        .collect();
    ev.sort_by(|a, b| ts(a).total_cmp(&ts(b)));
    let device = |e: &Value| e["pid"] == 1;
    let after = |t: f64, what: &str, pred: &dyn Fn(&Value) -> bool| -> Value {
        ev.iter()
            .find(|e| ts(e) >= t && pred(e))
            .cloned()
            .unwrap_or_else(|| panic!("no {what} after {t} µs"))
    };

    // The first fault the device raised.
    let fault = after(0.0, "fault raised", &|e| {
        device(e) && e["ph"] == "i" && name(e) == "fault raised"
    });
    let (va, t_fault) = (va_of(&fault["args"]["va"]), ts(&fault));
    let channel = fault["args"]["channel"].as_u64().unwrap();
    let msi = after(t_fault, "MSI FAULT", &|e| {
        device(e) && name(e) == "MSI FAULT"
    });
    let batch = after(ts(&msi) - PAIRING_SLACK_US, "driver batch", &|e| {
        e["pid"] == 2 && name(e) == "batch drained"
    });
    let window = after(
        ts(&batch) - PAIRING_SLACK_US,
        "window covering the fault",
        &|e| {
            e["pid"] == 2 && e["ph"] == "X" && name(e) == "window serviced" && {
                let start = va_of(&e["args"]["va"]);
                let size = e["args"]["size"].as_u64().unwrap();
                (start..start + size).contains(&va)
            }
        },
    );
    assert!(
        window["args"]["size_kib"].as_u64().unwrap() >= 4,
        "{window}"
    );
    let rung = after(end(&window), "driver replay", &|e| {
        e["pid"] == 2 && name(e) == "replay rung"
    });
    let replay = after(ts(&rung) - PAIRING_SLACK_US, "replay received", &|e| {
        device(e) && name(e) == "replay received"
    });
    // The fault's span ends at that replay.
    let span = format!("fault {va:#x}");
    let b = ev
        .iter()
        .find(|e| e["ph"] == "b" && name(e) == span)
        .expect("the fault's span");
    let e = ev
        .iter()
        .find(|e| e["ph"] == "e" && e["id"] == b["id"])
        .expect("the fault's span ends");
    assert_eq!(ts(e), ts(&replay), "span ends at the replay");
    // The command that faulted completes after the replay, on its channel.
    // (An "X" event: it starts before the fault and ends after the replay.)
    let done = ev
        .iter()
        .find(|e| {
            device(e)
                && e["ph"] == "X"
                && e["tid"] == 10 + channel
                && ts(e) <= t_fault
                && end(e) >= ts(&replay)
        })
        .unwrap_or_else(|| panic!("no command on channel {channel} spanning the fault"));
    assert_eq!(done["args"]["status"], "Ok", "{done}");
    // Driver events land between the device's: after the MSI, before the
    // replay the device received.
    assert!(ts(&batch) + PAIRING_SLACK_US >= ts(&msi));
    assert!(ts(&rung) <= ts(&replay) + PAIRING_SLACK_US);

    // scripts/trace-summary.py puts this fault under its window's size.
    let row = format!("| {} KiB | ", window["args"]["size_kib"]);
    let line = summary
        .lines()
        .find(|l| l.starts_with(&row))
        .unwrap_or_else(|| panic!("no {row} row in:\n{summary}"));
    let cols: Vec<&str> = line.split('|').map(str::trim).collect();
    let faults: u64 = cols[2].parse().unwrap();
    let p50: f64 = cols[3].parse().unwrap();
    assert!(faults >= 1, "{line}");
    assert!(
        p50 > 0.0 && p50 <= cols[6].parse::<f64>().unwrap(),
        "{line}"
    );
}

/// The output of `scripts/<name> ARGS...` (it must succeed).
fn script(name: &str, args: &[&std::path::Path]) -> String {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scripts")
        .join(name);
    let o = std::process::Command::new("python3")
        .arg(script)
        .args(args)
        .output()
        .expect("python3 runs");
    assert!(
        o.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn the_trace_is_written_on_a_timeout_too() {
    if !kvm_or_skip("the_trace_is_written_on_a_timeout_too") {
        return;
    }
    let fw = write_temp("trace-timeout.elf", &pvh_elf(&console_forever(), true, 0));
    let path = trace_path("timeout");
    let o = faultline(&[
        "run",
        "--firmware",
        path_str(&fw),
        "--timeout",
        "1",
        "--gpu-trace",
        path_str(&path),
    ]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    let doc = read_trace(&path);
    assert!(doc["traceEvents"].is_array(), "{doc}");
    assert_eq!(doc["otherData"]["dropped"], 0);
}

#[test]
fn an_unwritable_trace_path_is_a_vmm_error() {
    let o = faultline(&[
        "run",
        "--gpu-trace",
        "/nonexistent-dir/t.json",
        "--firmware",
        "/nonexistent",
    ]);
    assert_eq!(o.status.code(), Some(3));
    let err = stderr(&o);
    assert!(
        err.contains("cannot write --gpu-trace /nonexistent-dir/t.json"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}
