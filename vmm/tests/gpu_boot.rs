//! The real firmware drives the GPU under faultline: PCI probe, MSI through
//! irqfd (or KVM_SIGNAL_MSI with --gpu-no-fastpath), hostile register
//! writes, and the no-GPU policy (`gpu=optional`).

mod common;

use common::*;
use std::path::PathBuf;

/// Boots the firmware with `cmdline` and extra VMM arguments.
fn boot(test: &str, cmdline: &str, extra: &[&str]) -> Option<std::process::Output> {
    let (true, Some(fw)) = (kvm_or_skip(test), firmware()) else {
        return None;
    };
    let mut args = vec![
        "run",
        "--firmware",
        path_str(&fw),
        "--timeout",
        "120",
        "--cmdline",
        cmdline,
    ];
    args.extend_from_slice(extra);
    Some(faultline(&args))
}

fn assert_passed(o: &std::process::Output, tests: &[&str]) {
    let out = stdout(o);
    assert_eq!(
        o.status.code(),
        Some(0),
        "stdout:\n{out}\nstderr:\n{}",
        stderr(o)
    );
    for t in tests {
        assert!(out.contains(&format!("test {t} ... ok")), "{t}:\n{out}");
    }
    assert!(out.trim_end().ends_with(" passed, 0 failed"), "{out}");
}

fn stats_json(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("faultline-{name}-{}.json", std::process::id()))
}

fn read_json(p: &PathBuf) -> serde_json::Value {
    let text = std::fs::read_to_string(p).unwrap();
    let _ = std::fs::remove_file(p);
    serde_json::from_str(&text).unwrap()
}

#[test]
fn firmware_finds_the_gpu_and_gets_its_msi() {
    let Some(o) = boot("firmware_finds_the_gpu", "test=gpu_ loglevel=info", &[]) else {
        return;
    };
    assert_passed(
        &o,
        &["gpu_probe", "gpu_msi", "gpu_fill_copy", "gpu_bad_input"],
    );
    assert!(
        stdout(&o).contains("gpu: 00:04.0 BAR0 0xc0000000 (+0x10000), MSI vectors 0x40..+4"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn fill_and_copy_complete_through_msi_with_correct_data() {
    let json = stats_json("fill-copy");
    let Some(o) = boot(
        "fill_and_copy",
        "test=gpu_fill_copy",
        &["--stats-json", path_str(&json)],
    ) else {
        return;
    };
    // The guest test checks the data word by word and that CHANNEL MSIs
    // arrived; the device's own counters confirm what ran.
    assert_passed(&o, &["gpu_fill_copy"]);
    let doc = read_json(&json);
    // The driver resets the device when the test drops it, which zeroes
    // the counters: only their presence is checked here.
    assert!(doc["gpu"]["bytes_copied"].is_u64(), "{doc}");
}

#[test]
fn without_fastpath_doorbells_exit_and_msi_is_signalled() {
    let Some(o) = boot("without_fastpath", "test=gpu_", &["--gpu-no-fastpath"]) else {
        return;
    };
    assert_passed(&o, &["gpu_msi", "gpu_fill_copy", "gpu_bad_input"]);
}

#[test]
fn garbage_in_bar0_gets_errors_and_the_vmm_exits_cleanly() {
    let json = stats_json("bad-input");
    let Some(o) = boot(
        "garbage_in_bar0",
        "test=gpu_bad_input",
        &["--stats-json", path_str(&json)],
    ) else {
        return;
    };
    assert_passed(&o, &["gpu_bad_input"]);
    // The device counted its errors per kind; a passing run logs no
    // warnings for errors the guest provoked on purpose, and nothing
    // panicked.
    let err = stderr(&o);
    assert!(!err.contains("warn"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let doc = read_json(&json);
    for kind in ["errors.BadSetup", "errors.BadChannelSetup"] {
        assert!(doc["gpu"][kind].as_u64() >= Some(1), "{kind}: {doc}");
    }
    // Each bad command completed with its error status, counted by the
    // device (the test leaves the device enabled so the counters survive).
    for status in [
        "status_InvalidOpcode",
        "status_InvalidCommand",
        "status_BadAddress",
        "status_Cancelled",
        "status_Misaligned",
    ] {
        assert_eq!(doc["gpu"][status], 1, "{status}: {doc}");
    }
    assert_eq!(
        doc["gpu"]["status_Ok"], 1,
        "the good FILL after them: {doc}"
    );
}

#[test]
fn no_gpu_fails_gpu_tests_unless_optional() {
    let Some(o) = boot("no_gpu_fails", "test=gpu_probe", &["--no-gpu"]) else {
        return;
    };
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains("test gpu_probe ... FAILED: no Faultline GPU (fa17:0001) on PCI bus 0"),
        "{out}"
    );

    let Some(o) = boot("no_gpu_optional", "test=gpu_ gpu=optional", &["--no-gpu"]) else {
        return;
    };
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("test gpu_probe ... SKIPPED"), "{out}");
    assert!(out.contains("test(s) SKIPPED"), "{out}");
    assert!(out.trim_end().ends_with("0 passed, 0 failed"), "{out}");
}

#[test]
fn default_image_refuses_benchmarks_and_names_the_bench_build() {
    for name in ["exits", "faults"] {
        let Some(o) = boot("no_benchmarks", &format!("bench={name}"), &[]) else {
            return;
        };
        let out = stdout(&o);
        assert_eq!(o.status.code(), Some(1), "{out}");
        assert!(
            out.contains(&format!(
                "bench: FAILED: bench={name} needs the bench build of the firmware \
                 (scripts/build-firmware.sh --bench"
            )),
            "{out}"
        );
        assert!(!out.contains("bench single_fault"), "{out}");
    }
}
