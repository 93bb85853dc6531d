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

/// A guest image that passes every check made before KVM is opened.
fn good_elf() -> std::path::PathBuf {
    write_temp("good.elf", &pvh_elf(&exit_code(0), true, 0))
}

#[test]
fn kvm_device_missing() {
    let fw = good_elf();
    let o = faultline(&[
        "run",
        "--kvm-device",
        "/nonexistent/kvm",
        "--firmware",
        path_str(&fw),
    ]);
    assert_clean_failure(&o, 3, "cannot open /nonexistent/kvm");
}

#[test]
fn kvm_device_not_kvm() {
    let fw = good_elf();
    let o = faultline(&[
        "run",
        "--kvm-device",
        "/dev/null",
        "--firmware",
        path_str(&fw),
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

/// Every bad value is a usage error (status 2) whose line names the option
/// and the accepted range, and quotes the user's text as given.
#[test]
fn bad_values_are_usage_errors_with_the_accepted_range() {
    for (opt, value, needle) in [
        ("--memory", "lots", "'lots' for '--memory"),
        ("--memory", "1M", "at least 16 MiB"),
        ("--memory", "900T", "'900T' for '--memory"),
        ("--memory", "0x40000000", "hexadecimal"),
        ("--memory", "12xyz", "unknown size suffix 'xyz'"),
        ("--vcpus", "0", "accepted: 1..=255"),
        ("--vcpus", "-1", "accepted: 1..=255"),
        ("--vcpus", "4096", "accepted: 1..=255"),
        (
            "--timeout",
            "18446744073709551615",
            "accepted: 0..=4294967295",
        ),
        ("--timeout", "soon", "accepted: 0..=4294967295"),
    ] {
        let o = faultline(&["run", opt, value, "--firmware", "/bin/true"]);
        assert_clean_failure(&o, 2, needle);
        assert!(stderr(&o).contains(opt), "option named: {}", stderr(&o));
        if opt == "--memory" {
            assert!(stderr(&o).contains("accepted: 16M..="), "{}", stderr(&o));
        }
    }
}

#[test]
fn firmware_fifo_is_refused_before_any_vm_setup() {
    let p = fifo("fw.fifo");
    // A KVM device that cannot open proves the check comes first.
    let mut child = spawn_faultline(
        &[
            "run",
            "--timeout",
            "2",
            "--kvm-device",
            "/nonexistent/kvm",
            "--firmware",
            path_str(&p),
        ],
        std::process::Stdio::null(),
        std::process::Stdio::piped(),
    );
    let status = wait_or_kill(&mut child, 30);
    let o = child.wait_with_output().unwrap();
    assert!(status.is_some(), "hung opening a FIFO: {}", stderr(&o));
    assert_clean_failure(&o, 3, "not a regular file (a FIFO)");
}

/// The image is judged from its headers: a 2 GiB sparse file costs no
/// memory (it used to be read whole before its magic was checked).
#[test]
fn huge_firmware_is_judged_from_its_headers() {
    let p = write_temp("huge.bin", b"");
    std::fs::File::options()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(2 << 30)
        .unwrap();
    let child = spawn_faultline(
        &["run", "--firmware", path_str(&p)],
        std::process::Stdio::null(),
        std::process::Stdio::piped(),
    );
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it for our child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 on a child we spawned and have not reaped.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    assert_eq!(pid, child.id() as i32);
    // Reaped by wait4 above; this only tells `Child` (it reports ECHILD).
    let mut child = child;
    let _ = child.wait();
    let _ = std::fs::remove_file(&p);
    assert_eq!(libc::WEXITSTATUS(status), 3);
    assert!(
        ru.ru_maxrss < 64 << 10,
        "peak RSS {} KiB judging a sparse file",
        ru.ru_maxrss
    );
}

#[test]
fn pvh_entry_outside_ram_is_a_load_error() {
    let p = write_temp(
        "far-entry.elf",
        &pvh_elf_with_entry(&exit_code(0), 0xe000_0000),
    );
    let o = faultline(&["run", "--memory", "64M", "--firmware", path_str(&p)]);
    assert_clean_failure(&o, 3, "PVH entry point 0xe0000000 is outside guest RAM");
}

#[test]
fn segment_past_the_end_of_the_file_is_named() {
    let mut elf = pvh_elf(&exit_code(0), true, 0);
    // p_filesz of the PT_LOAD (program header 0, offset 64 + 32).
    elf[96..104].copy_from_slice(&0x10_0000u64.to_le_bytes());
    elf[104..112].copy_from_slice(&0x10_0000u64.to_le_bytes());
    let p = write_temp("short.elf", &elf);
    let o = faultline(&["run", "--firmware", path_str(&p)]);
    assert_clean_failure(&o, 3, "PT_LOAD segment 0 (guest 0x100000..0x200000");
    assert!(stderr(&o).contains("extends past the end of the file"));
    assert!(!stderr(&o).contains("Kernel Loader"), "{}", stderr(&o));
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
        (
            "--gpu-vram",
            "3M",
            "GPU memory of 3145728 bytes must be a multiple of 2 MiB, at most 64 GiB",
        ),
        (
            "--gpu-vram",
            "65G",
            "must be a multiple of 2 MiB, at most 64 GiB",
        ),
        (
            "--gpu-vram",
            "lots",
            "expected a number with an optional K/M/G/T suffix",
        ),
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

#[test]
fn bad_gpu_inject_spec_is_a_usage_error_naming_the_key() {
    for (value, needle) in [
        ("bogus=1", "unknown fault-injection knob 'bogus'"),
        ("spurious=2", "spurious=2: not a probability"),
        (
            "fault_overflow_at=0",
            "fault_overflow_at=0: must be at least 1",
        ),
        ("seed", "'seed' is not key=value"),
        ("engine_stall=0.5", "engine_stall=0.5 needs engine_stall_us"),
    ] {
        for cmd in ["run", "serve"] {
            let mut args = vec![cmd, "--gpu-inject", value];
            if cmd == "serve" {
                args.extend(["--socket", "/nonexistent/dir/sock"]);
            }
            let o = faultline(&args);
            assert_clean_failure(&o, 2, needle);
            assert!(stderr(&o).contains("--gpu-inject"), "{}", stderr(&o));
        }
    }
}
