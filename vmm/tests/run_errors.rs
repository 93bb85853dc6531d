//! `faultline run` on bad input and misbehaving guests: one clear line on
//! stderr, no panic or backtrace, and the documented non-zero status.

mod common;

use common::*;

fn assert_clean_failure(o: &std::process::Output, status: i32, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(status), "stderr: {err}");
    assert!(err.contains(needle), "expected '{needle}' in: {err}");
    assert!(!err.contains("panicked"), "panic in: {err}");
    assert!(!err.contains("RUST_BACKTRACE"), "backtrace hint in: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line expected: {err}"
    );
}

#[test]
fn kvm_device_missing() {
    let o = faultline(&[
        "run",
        "--kvm-device",
        "/nonexistent/kvm",
        "--firmware",
        "/bin/true",
    ]);
    assert_clean_failure(&o, 3, "cannot open /nonexistent/kvm");
}

#[test]
fn kvm_device_not_kvm() {
    let o = faultline(&[
        "run",
        "--kvm-device",
        "/dev/null",
        "--firmware",
        "/bin/true",
    ]);
    assert_clean_failure(&o, 3, "/dev/null");
}

#[test]
fn firmware_missing() {
    if !kvm_or_skip("firmware_missing") {
        return;
    }
    let o = faultline(&["run", "--firmware", "/nonexistent/fw.elf"]);
    assert_clean_failure(&o, 3, "no firmware at /nonexistent/fw.elf");
    assert!(stderr(&o).contains("scripts/build-firmware.sh"));
}

#[test]
fn firmware_not_elf() {
    if !kvm_or_skip("firmware_not_elf") {
        return;
    }
    let p = write_temp("junk.bin", b"this is not an ELF image at all");
    let o = faultline(&["run", "--firmware", path_str(&p)]);
    assert_clean_failure(&o, 3, "not an ELF file");
}

#[test]
fn firmware_without_pvh_note() {
    if !kvm_or_skip("firmware_without_pvh_note") {
        return;
    }
    let p = write_temp("nonote.elf", &pvh_elf(&exit_code(0), false, 0));
    let o = faultline(&["run", "--firmware", path_str(&p)]);
    assert_clean_failure(&o, 3, "no PVH entry note");
}

#[test]
fn firmware_too_big_for_memory() {
    if !kvm_or_skip("firmware_too_big_for_memory") {
        return;
    }
    // 64 MiB of .bss does not fit in 32 MiB of RAM.
    let p = write_temp("big.elf", &pvh_elf(&exit_code(0), true, 64 << 20));
    let o = faultline(&["run", "--memory", "32M", "--firmware", path_str(&p)]);
    assert_clean_failure(
        &o,
        3,
        "needs guest RAM up to 66 MiB but --memory gives 32 MiB",
    );
}

#[test]
fn memory_unparseable() {
    let o = faultline(&["run", "--memory", "lots", "--firmware", "/bin/true"]);
    assert_clean_failure(&o, 3, "invalid --memory 'lots'");
}

#[test]
fn memory_too_small() {
    let o = faultline(&["run", "--memory", "1M", "--firmware", "/bin/true"]);
    assert_clean_failure(&o, 3, "at least 16 MiB");
}

#[test]
fn memory_too_large_for_host() {
    let o = faultline(&["run", "--memory", "900T", "--firmware", "/bin/true"]);
    assert_clean_failure(&o, 3, "invalid --memory '900T'");
}

#[test]
fn vcpus_zero_and_too_many() {
    let o = faultline(&["run", "--vcpus", "0", "--firmware", "/bin/true"]);
    assert_clean_failure(&o, 3, "invalid --vcpus 0");
    let o = faultline(&["run", "--vcpus", "4096", "--firmware", "/bin/true"]);
    assert_clean_failure(&o, 3, "invalid --vcpus 4096");
}

#[test]
fn guest_triple_fault_reports_rip() {
    if !kvm_or_skip("guest_triple_fault_reports_rip") {
        return;
    }
    // ud2 with no IDT: #UD cannot be delivered → #DF → triple fault.
    let p = write_temp("ud2.elf", &pvh_elf(&[0x0f, 0x0b], true, 0));
    let o = faultline(&["run", "--firmware", path_str(&p)]);
    assert_clean_failure(&o, 4, "guest triple fault on vCPU 0 at RIP 0x100100");
}

#[test]
fn guest_that_never_exits_times_out() {
    if !kvm_or_skip("guest_that_never_exits_times_out") {
        return;
    }
    let p = write_temp("spin.elf", &pvh_elf(&[0xeb, 0xfe], true, 0));
    let t = std::time::Instant::now();
    let o = faultline(&["run", "--timeout", "1", "--firmware", path_str(&p)]);
    assert_clean_failure(&o, 5, "did not exit before --timeout");
    assert!(t.elapsed().as_secs() < 20, "stopped promptly");
}

#[test]
fn debug_exit_values_map_to_status() {
    if !kvm_or_skip("debug_exit_values_map_to_status") {
        return;
    }
    for (v, status) in [(0u8, 0), (1, 1), (2, 4), (7, 4)] {
        let p = write_temp(&format!("exit{v}.elf"), &pvh_elf(&exit_code(v), true, 0));
        let o = faultline(&["run", "--firmware", path_str(&p), "--vcpus", "2"]);
        assert_eq!(o.status.code(), Some(status), "value {v}: {}", stderr(&o));
        if v >= 2 {
            assert!(stderr(&o).contains(&format!("QEMU status {}", (v as u32) << 1 | 1)));
        }
    }
}

#[test]
fn bad_flag_is_a_usage_error() {
    let o = faultline(&["run", "--no-such-flag"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--no-such-flag"));
}

#[test]
fn bad_gpu_sizing_is_a_usage_error() {
    for (opt, value, needle) in [
        ("--gpu-channels", "9", "channels 9 must be between 1 and 8"),
        ("--gpu-channels", "0", "channels 0 must be between 1 and 8"),
        (
            "--gpu-fault-entries",
            "100",
            "fault buffer entries 100 must be a power of two",
        ),
        ("--gpu-fault-entries", "131072", "between 2 and 65536"),
        (
            "--gpu-tlb-entries",
            "0",
            "TLB entries 0 must be between 1 and 1048576",
        ),
        ("--gpu-tlb-entries", "lots", "'lots' is not a number"),
    ] {
        for cmd in ["run", "serve"] {
            let mut args = vec![cmd, opt, value];
            if cmd == "serve" {
                args.extend(["--socket", "/nonexistent/dir/sock"]);
            }
            let o = faultline(&args);
            assert_clean_failure(&o, 2, needle);
            assert!(stderr(&o).contains(opt), "option named: {}", stderr(&o));
        }
    }
}
