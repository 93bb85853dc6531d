//! `faultline run` against its own stdout and stderr and against signals:
//! a stalled or broken stream must neither freeze the guest nor keep
//! `--timeout` from firing; SIGINT/SIGTERM stop the run cleanly; the
//! stats are written on every way out.

mod common;

use std::process::Stdio;

use common::*;

/// Runs `code` as the guest with stdout and stderr as given and returns
/// (exit status, stderr if piped-and-read) or fails after 60 s.
fn run_guest(
    name: &str,
    code: &[u8],
    extra: &[&str],
    out: Stdio,
    err: Stdio,
) -> (Option<i32>, String) {
    let p = write_temp(name, &pvh_elf(code, true, 0));
    let mut args = vec!["run", "--memory", "32M", "--firmware", path_str(&p)];
    args.extend(extra);
    let mut child = spawn_faultline(&args, out, err);
    let status = wait_or_kill(&mut child, 60);
    let o = child.wait_with_output().unwrap();
    let status = status.unwrap_or_else(|| panic!("{name}: still running after 60 s"));
    (status.code(), stderr(&o))
}

#[test]
fn timeout_holds_while_nobody_reads_stderr() {
    if !kvm_or_skip("timeout_holds_while_nobody_reads_stderr") {
        return;
    }
    // A trace record per guest exit fills the pipe within milliseconds;
    // the test reads it only once the VMM has exited.
    let (_reader, writer) = small_pipe();
    let (code, _) = run_guest(
        "stderr-stall.elf",
        &unclaimed_port_loop(),
        &["--timeout", "1", "--log-level", "trace"],
        Stdio::null(),
        Stdio::from(writer),
    );
    assert_eq!(code, Some(5));
}

/// The guest is not frozen either: 20,000 logged exits with stderr
/// stalled, and it still reaches its own exit (status 0, not the timeout).
#[test]
fn guest_runs_on_while_nobody_reads_stderr() {
    if !kvm_or_skip("guest_runs_on_while_nobody_reads_stderr") {
        return;
    }
    let mut code = vec![0xb9];
    code.extend_from_slice(&20_000u32.to_le_bytes()); // mov ecx, 20000
    code.extend_from_slice(&[0x66, 0xba, 0x10, 0x05]); // mov dx, 0x510
    code.extend_from_slice(&[0xee, 0x49, 0x75, 0xfc]); // out dx, al; dec ecx; jnz
    code.extend_from_slice(&exit_code(0));
    let (_reader, writer) = small_pipe();
    let (status, _) = run_guest(
        "stderr-stall-exit.elf",
        &code,
        &["--timeout", "50", "--log-level", "trace"],
        Stdio::null(),
        Stdio::from(writer),
    );
    assert_eq!(status, Some(0));
}

/// Likewise with stdout stalled: the guest's 100,000 console bytes are
/// queued (and the rest dropped), it reaches its own exit, and stderr says
/// what was not written.
#[test]
fn guest_runs_on_while_nobody_reads_stdout() {
    if !kvm_or_skip("guest_runs_on_while_nobody_reads_stdout") {
        return;
    }
    let (_reader, writer) = small_pipe();
    let (status, err) = run_guest(
        "stdout-stall-exit.elf",
        &console_then_exit(100_000),
        &["--timeout", "50"],
        Stdio::from(writer),
        Stdio::piped(),
    );
    assert_eq!(status, Some(0), "{err}");
    assert!(err.contains("console output not written"), "{err}");
}

#[test]
fn timeout_holds_while_nobody_reads_stdout() {
    if !kvm_or_skip("timeout_holds_while_nobody_reads_stdout") {
        return;
    }
    // Held open, never read.
    let (_reader, writer) = small_pipe();
    let (code, err) = run_guest(
        "stdout-stall.elf",
        &console_forever(),
        &["--timeout", "1"],
        Stdio::from(writer),
        Stdio::piped(),
    );
    assert_eq!(code, Some(5), "{err}");
    assert!(err.contains("did not exit before --timeout"), "{err}");
    assert!(
        err.contains("console output"),
        "says output was lost: {err}"
    );
}

fn assert_one_stdout_line(err: &str) {
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("stdout")).collect();
    assert_eq!(lines.len(), 1, "one line about stdout: {err}");
    assert!(lines[0].contains("dropped from here on"), "{err}");
    assert_eq!(err.lines().count(), 1, "nothing else: {err}");
}

#[test]
fn stdout_full_is_one_line_and_the_run_goes_on() {
    if !kvm_or_skip("stdout_full_is_one_line_and_the_run_goes_on") {
        return;
    }
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let (code, err) = run_guest(
        "devfull.elf",
        &console_then_exit(20_000),
        &[],
        Stdio::from(full),
        Stdio::piped(),
    );
    assert_eq!(code, Some(0), "{err}");
    assert_one_stdout_line(&err);
    assert!(err.contains("No space left on device"), "{err}");
}

#[test]
fn stdout_closed_is_one_line_and_the_run_goes_on() {
    if !kvm_or_skip("stdout_closed_is_one_line_and_the_run_goes_on") {
        return;
    }
    let p = write_temp("closed.elf", &pvh_elf(&console_then_exit(20_000), true, 0));
    let mut child = spawn_faultline(
        &["run", "--memory", "32M", "--firmware", path_str(&p)],
        Stdio::piped(),
        Stdio::piped(),
    );
    drop(child.stdout.take()); // the reader goes away at once
    let status = wait_or_kill(&mut child, 60);
    let o = child.wait_with_output().unwrap();
    assert!(status.is_some(), "hung: {}", stderr(&o));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_one_stdout_line(&stderr(&o));
}

/// SIGINT and SIGTERM stop a running guest: one line, 128 + the signal,
/// and the stats written on the way out.
#[test]
fn signals_stop_the_run_and_write_stats() {
    if !kvm_or_skip("signals_stop_the_run_and_write_stats") {
        return;
    }
    let p = write_temp("spin-sig.elf", &pvh_elf(&[0xeb, 0xfe], true, 0));
    for (sig, name, want) in [
        (libc::SIGTERM, "SIGTERM", 143),
        (libc::SIGINT, "SIGINT", 130),
    ] {
        let json = write_temp(&format!("sig-{name}.json"), b"");
        let mut child = spawn_faultline(
            &[
                "run",
                "--memory",
                "32M",
                "--firmware",
                path_str(&p),
                "--stats-json",
                path_str(&json),
            ],
            Stdio::null(),
            Stdio::piped(),
        );
        // The JSON file is created before the VM starts; give the guest a
        // moment to be running.
        std::thread::sleep(std::time::Duration::from_millis(500));
        signal(&child, sig);
        let status = wait_or_kill(&mut child, 60);
        let o = child.wait_with_output().unwrap();
        assert!(status.is_some(), "{name} ignored: {}", stderr(&o));
        assert_eq!(o.status.code(), Some(want), "{name}: {}", stderr(&o));
        assert_eq!(
            stderr(&o).trim_end(),
            format!("faultline: stopped by {name}")
        );
        let doc = stats_doc(&json);
        assert!(doc["gpu"].is_object(), "{doc}");
        assert!(
            doc["process"]["peak_rss_kib"].as_u64().unwrap() > 0,
            "{doc}"
        );
    }
}

/// Stats are written on every exit path: here a timeout and a setup error.
#[test]
fn stats_are_written_on_timeout_and_on_errors() {
    if !kvm_or_skip("stats_are_written_on_timeout_and_on_errors") {
        return;
    }
    let json = write_temp("timeout-stats.json", b"");
    let (code, err) = run_guest(
        "spin-stats.elf",
        &[0xeb, 0xfe],
        &["--timeout", "1", "--stats", "--stats-json", path_str(&json)],
        Stdio::null(),
        Stdio::piped(),
    );
    assert_eq!(code, Some(5), "{err}");
    assert!(
        err.contains("GPU counters:") && err.contains("peak_rss_kib"),
        "{err}"
    );
    let doc = stats_doc(&json);
    assert!(
        doc["gpu"].is_object() && doc["process"]["peak_rss_kib"].is_u64(),
        "{doc}"
    );
    // A guest that printed no `stats` line: read, and empty.
    assert_eq!(doc["guest"]["tests"], serde_json::json!({}), "{doc}");

    let json = write_temp("error-stats.json", b"");
    let o = faultline(&[
        "run",
        "--kvm-device",
        "/nonexistent/kvm",
        "--firmware",
        path_str(&write_temp("ok.elf", &pvh_elf(&exit_code(0), true, 0))),
        "--stats-json",
        path_str(&json),
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let doc = stats_doc(&json);
    assert!(
        doc["gpu"].is_null() && doc["process"]["peak_rss_kib"].is_u64(),
        "{doc}"
    );
}

/// `--profile-guest`: a guest spinning in a two-instruction loop at CPL0
/// is sampled there: the profile's header counts the samples and every
/// sampled RIP is one of the loop's two instructions.
#[test]
fn profile_guest_samples_where_the_guest_runs() {
    if !kvm_or_skip("profile_guest_samples_where_the_guest_runs") {
        return;
    }
    let mut code = vec![0xb9];
    code.extend_from_slice(&300_000u32.to_le_bytes()); // mov ecx, 300000
    let spin = LOAD_ADDR + CODE_OFFSET + code.len() as u64;
    code.extend_from_slice(&[0x49, 0x75, 0xfd]); // spin: dec ecx; jnz spin
    code.extend_from_slice(&exit_code(0));
    let out = std::env::temp_dir().join(format!("faultline-profile-{}.txt", std::process::id()));
    let out_s = out.to_str().unwrap().to_string();
    let (status, err) = run_guest(
        "profile-spin.elf",
        &code,
        &["--profile-guest", &out_s, "--profile-hz", "10000"],
        Stdio::null(),
        Stdio::piped(),
    );
    assert_eq!(status, Some(0), "{err}");
    let text = std::fs::read_to_string(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    let header = text.lines().next().unwrap();
    let total: u64 = header
        .strip_prefix("# faultline guest profile: ")
        .and_then(|h| h.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("header: {header}"));
    let sites: Vec<(u64, u64, u8)> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let rip = u64::from_str_radix(f[1].trim_start_matches("0x"), 16).unwrap();
            (f[0].parse().unwrap(), rip, f[2].parse().unwrap())
        })
        .collect();
    assert!(
        total >= 10,
        "{total} samples of a spin of ~0.3 s at 10 kHz:\n{text}"
    );
    assert_eq!(sites.iter().map(|s| s.0).sum::<u64>(), total, "{text}");
    // The sample lands on an instruction boundary: `dec ecx` or `jnz`,
    // or the exit's instructions if the last kick came late.
    let exit_at = spin + 3;
    for (n, rip, cpl) in &sites {
        assert_eq!(*cpl, 0, "{text}");
        assert!(
            (spin..=spin + 1).contains(rip) || (exit_at..exit_at + 6).contains(rip),
            "{n} samples at {rip:#x}, outside the spin at {spin:#x}:\n{text}"
        );
    }
}

#[test]
fn profile_guest_to_an_unwritable_path_is_a_vmm_error() {
    if !kvm_or_skip("profile_guest_to_an_unwritable_path_is_a_vmm_error") {
        return;
    }
    let (status, err) = run_guest(
        "profile-bad.elf",
        &exit_code(0),
        &["--profile-guest", "/nonexistent/dir/p.txt"],
        Stdio::null(),
        Stdio::piped(),
    );
    assert_eq!(status, Some(3), "{err}");
    assert!(
        err.contains("--profile-guest /nonexistent/dir/p.txt"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}
