//! The README's exit-status table against the binary: every row of the
//! table has cases here, every case's status is a row that names the case,
//! and each case, run, exits with that status. The table and the binary
//! cannot drift apart without this test failing.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// (status, row text) of the table under "### Exit status".
fn readme_table() -> Vec<(i32, String)> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let section = readme
        .split("### Exit status")
        .nth(1)
        .expect("README has an '### Exit status' section");
    let rows: Vec<(i32, String)> = section
        .lines()
        .skip_while(|l| !l.starts_with("| status |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            let mut cells = l.trim_matches('|').splitn(2, '|');
            let status = cells.next().unwrap().trim();
            let status = status
                .parse()
                .unwrap_or_else(|_| panic!("row status '{status}' is not a number"));
            (status, cells.next().unwrap_or("").to_string())
        })
        .collect();
    assert!(!rows.is_empty(), "no rows in the exit-status table");
    rows
}

/// How a case is run.
enum How {
    /// `faultline ARGS`.
    Args(Vec<String>),
    /// `faultline run` of a guest whose code is given (and extra args).
    Guest(Vec<u8>, Vec<String>),
    /// A guest that spins, stopped by a signal.
    RunSignal(i32),
    /// `faultline serve`, a client does something (or a signal arrives).
    Serve(fn(&PathBuf, &Child)),
    /// The same with extra `serve` options.
    ServeWith(&'static [&'static str], fn(&PathBuf, &Child)),
}

struct Case {
    status: i32,
    /// Must appear in the README row of `status`.
    names: &'static str,
    how: How,
    kvm: bool,
}

fn args(a: &[&str]) -> How {
    How::Args(a.iter().map(|s| s.to_string()).collect())
}

fn cases() -> Vec<Case> {
    let good = write_temp("table-good.elf", &pvh_elf(&exit_code(0), true, 0));
    let good = path_str(&good).to_string();
    let junk = write_temp("table-junk.bin", b"not an ELF at all");
    let big = write_temp("table-big.elf", &pvh_elf(&exit_code(0), true, 64 << 20));
    let fifo = fifo("table-fw.fifo");
    let existing = write_temp("table-existing.sock", b"");
    let long_socket = format!("/tmp/{}", "s".repeat(110));
    let c = |status, names, how, kvm| Case {
        status,
        names,
        how,
        kvm,
    };
    let run_with = |extra: &[&str]| {
        let mut a = vec!["run", "--firmware", good.as_str()];
        a.extend(extra);
        args(&a)
    };
    let none: Vec<String> = Vec::new();
    vec![
        c(
            0,
            "the guest wrote 0",
            How::Guest(exit_code(0), none.clone()),
            true,
        ),
        c(
            0,
            "the client disconnected between messages",
            How::Serve(|sock, _| drop(connect(sock))),
            false,
        ),
        c(
            1,
            "the guest wrote 1",
            How::Guest(exit_code(1), none.clone()),
            true,
        ),
        c(
            2,
            "an unknown option",
            args(&["run", "--no-such-option"]),
            false,
        ),
        c(2, "`--memory`", run_with(&["--memory", "1M"]), false),
        c(2, "`--vcpus`", run_with(&["--vcpus", "0"]), false),
        c(2, "`--timeout`", run_with(&["--timeout", "-1"]), false),
        c(2, "`--gpu-*`", run_with(&["--gpu-channels", "9"]), false),
        c(2, "`--gpu-*`", run_with(&["--gpu-check=bogus"]), false),
        c(
            2,
            "longer than 107 bytes",
            args(&["serve", "--socket", &long_socket]),
            false,
        ),
        c(
            3,
            "KVM missing",
            run_with(&["--kvm-device", "/nonexistent/kvm"]),
            false,
        ),
        c(
            3,
            "not a regular file",
            args(&["run", "--firmware", path_str(&fifo)]),
            false,
        ),
        c(
            3,
            "not an x86-64 PVH ELF",
            args(&["run", "--firmware", path_str(&junk)]),
            false,
        ),
        c(
            3,
            "too big for `--memory`",
            args(&["run", "--memory", "32M", "--firmware", path_str(&big)]),
            false,
        ),
        c(
            3,
            "`--stats-json` not writable",
            run_with(&["--stats-json", "/nonexistent/dir/stats.json"]),
            false,
        ),
        c(
            3,
            "the `--socket` path exists",
            args(&["serve", "--socket", path_str(&existing)]),
            false,
        ),
        c(
            3,
            "a protocol violation",
            How::Serve(|sock, _| {
                let mut s = connect(sock);
                s.write_all(&[1, 0, 99, 0, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
                    .unwrap();
            }),
            false,
        ),
        c(
            3,
            "before a successful VERSION handshake",
            How::Serve(|sock, _| {
                // DEVICE_GET_INFO (4), 32 bytes, first thing on the wire.
                let mut m = vec![1, 0, 4, 0, 32, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
                m.extend([0u8; 16]);
                connect(sock).write_all(&m).unwrap();
            }),
            false,
        ),
        c(
            4,
            "triple fault",
            How::Guest(vec![0x0f, 0x0b], none.clone()),
            true,
        ),
        c(
            4,
            "debug-exit value ≥ 2",
            How::Guest(exit_code(2), none.clone()),
            true,
        ),
        c(
            5,
            "`--timeout` expired",
            How::Guest(vec![0xeb, 0xfe], vec!["--timeout".into(), "1".into()]),
            true,
        ),
        c(
            6,
            "`--gpu-check=fatal`",
            How::ServeWith(&["--gpu-check=fatal"], |sock, _| {
                let status = common::gpu_client::coherence_violation_session(sock);
                assert_eq!(status, 11, "the FILL completes with CoherenceViolation");
            }),
            false,
        ),
        c(130, "SIGINT", How::RunSignal(libc::SIGINT), true),
        c(
            143,
            "SIGTERM",
            How::Serve(|_, child| signal(child, libc::SIGTERM)),
            false,
        ),
    ]
}

fn connect(sock: &PathBuf) -> UnixStream {
    let t0 = Instant::now();
    loop {
        match UnixStream::connect(sock) {
            Ok(s) => return s,
            Err(_) if t0.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("connect {}: {e}", sock.display()),
        }
    }
}

/// Runs one case; returns its exit status and stderr.
fn run_case(i: usize, how: &How) -> (Option<i32>, String) {
    let finish = |mut child: Child| {
        let status = wait_or_kill(&mut child, 60);
        let o = child.wait_with_output().unwrap();
        assert!(status.is_some(), "case {i} hung: {}", stderr(&o));
        (o.status.code(), stderr(&o))
    };
    let spawn = |a: &[&str]| spawn_faultline(a, Stdio::null(), Stdio::piped());
    match how {
        How::Args(a) => finish(spawn(&a.iter().map(String::as_str).collect::<Vec<_>>())),
        How::Guest(code, extra) => {
            let p = write_temp(&format!("table-case{i}.elf"), &pvh_elf(code, true, 0));
            let mut a = vec!["run", "--memory", "32M", "--firmware", path_str(&p)];
            a.extend(extra.iter().map(String::as_str));
            finish(spawn(&a))
        }
        How::RunSignal(sig) => {
            let p = write_temp(
                &format!("table-case{i}.elf"),
                &pvh_elf(&[0xeb, 0xfe], true, 0),
            );
            let child = spawn(&["run", "--memory", "32M", "--firmware", path_str(&p)]);
            std::thread::sleep(Duration::from_millis(500));
            signal(&child, *sig);
            finish(child)
        }
        How::Serve(client) => run_case(i, &How::ServeWith(&[], *client)),
        How::ServeWith(extra, client) => {
            let dir =
                std::env::temp_dir().join(format!("faultline-table-{}-{i}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let sock = dir.join("gpu.sock");
            let mut a = vec!["serve", "--socket", path_str(&sock)];
            a.extend(extra.iter());
            let child = spawn(&a);
            let t0 = Instant::now();
            while !sock.exists() {
                assert!(t0.elapsed() < Duration::from_secs(10), "never listened");
                std::thread::sleep(Duration::from_millis(10));
            }
            client(&sock, &child);
            let r = finish(child);
            let _ = std::fs::remove_dir_all(&dir);
            r
        }
    }
}

#[test]
fn readme_exit_status_table_matches_the_binary() {
    let table = readme_table();
    let cases = cases();
    let rows: BTreeSet<i32> = table.iter().map(|(s, _)| *s).collect();
    let covered: BTreeSet<i32> = cases.iter().map(|c| c.status).collect();
    assert_eq!(rows, covered, "README rows vs statuses this test runs");
    let kvm = kvm_or_skip("readme_exit_status_table_matches_the_binary (KVM cases)");
    for (i, case) in cases.iter().enumerate() {
        let row = &table.iter().find(|(s, _)| *s == case.status).unwrap().1;
        assert!(
            row.contains(case.names),
            "README row {} does not name '{}': {row}",
            case.status,
            case.names
        );
        if case.kvm && !kvm {
            continue;
        }
        let (status, err) = run_case(i, &case.how);
        assert_eq!(
            status,
            Some(case.status),
            "case {i} ('{}'): {err}",
            case.names
        );
        assert!(!err.contains("panicked"), "case {i}: {err}");
    }
}
