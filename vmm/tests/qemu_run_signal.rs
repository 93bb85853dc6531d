//! `scripts/qemu-run.sh` under SIGTERM: it must stop QEMU and the server,
//! remove its mounts and work directory, say why, and exit 143 at once
//! (it used to wait for QEMU, up to its 480 s timeout, then exit 2
//! silently). QEMU here is a stand-in in a minimal root (bash and sleep
//! with their libraries) that reports itself ready for vfio-user-pci and
//! then sleeps, so the check needs neither QEMU nor its root, only root
//! privileges (the script bind-mounts) and KVM (the script checks it).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const FAKE_QEMU: &str = r#"#!/bin/bash
case "$*" in
  *"-device help"*) echo 'name "vfio-user-pci", bus PCI' ;;
  *--version*) echo "QEMU emulator version 11.0.0 (stand-in)" ;;
  *) echo "$$ $*" > /qemu.started; exec sleep 600 ;;
esac
"#;

/// Copies `bin` and the libraries it links into `root` at the same paths.
fn copy_with_libs(bin: &str, root: &Path) {
    let ldd = Command::new("ldd").arg(bin).output().expect("ldd");
    let text = String::from_utf8_lossy(&ldd.stdout).into_owned();
    let mut files = vec![bin.to_string()];
    files.extend(
        text.split_whitespace()
            .filter(|w| w.starts_with('/'))
            .map(str::to_string),
    );
    for f in files {
        let to = root.join(f.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&f, &to).unwrap_or_else(|e| panic!("copy {f}: {e}"));
    }
}

fn fake_root(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    for bin in ["/bin/bash", "/bin/sleep"] {
        copy_with_libs(bin, &root);
    }
    let qemu = root.join("usr/bin/qemu-system-x86_64");
    std::fs::create_dir_all(qemu.parent().unwrap()).unwrap();
    std::fs::write(&qemu, FAKE_QEMU).unwrap();
    std::fs::set_permissions(&qemu, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(root.join(".faultline-qemu-ready"), b"").unwrap();
    root
}

/// Undoes what a failed run of the script may leave: mounts under the
/// fake root (lazily, innermost first) and the test's directory.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        let mut ours: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| m.starts_with(self.0.to_str().unwrap()))
            .collect();
        ours.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in ours {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn alive(pid: i32) -> bool {
    // Reaped processes are gone; a zombie has no /proc/PID/exe target.
    std::fs::read_link(format!("/proc/{pid}/exe")).is_ok()
}

/// Pids of processes whose command line contains `needle`.
fn processes_with(needle: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(needle))
                .unwrap_or(false)
        })
        .collect()
}

#[test]
fn qemu_run_stops_qemu_and_the_server_on_sigterm() {
    if !kvm_or_skip("qemu_run_stops_qemu_and_the_server_on_sigterm") {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        if std::env::var("FAULTLINE_REQUIRE_KVM").as_deref() == Ok("1") {
            panic!("qemu-run.sh needs root (bind mounts, chroot)");
        }
        eprintln!("*** SKIP qemu_run_stops_qemu_and_the_server_on_sigterm: needs root ***");
        return;
    }
    let dir = std::env::temp_dir().join(format!("faultline-qemu-run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = Cleanup(dir.clone());
    let root = fake_root(&dir);
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut child = Command::new(repo.join("scripts/qemu-run.sh"))
        .arg("test=none")
        .env("FAULTLINE_QEMU_ROOT", &root)
        .env("QEMU_TIMEOUT", "60")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Builds (firmware, release VMM) come first and may take minutes.
    let started = root.join("qemu.started");
    let t0 = Instant::now();
    while !started.exists() {
        if let Some(s) = child.try_wait().unwrap() {
            let o = child.wait_with_output().unwrap();
            panic!("qemu-run.sh ended early ({s}): {}", stderr(&o));
        }
        assert!(
            t0.elapsed() < Duration::from_secs(1200),
            "QEMU never started"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let line = std::fs::read_to_string(&started).unwrap();
    let qemu_pid: i32 = line.split_whitespace().next().unwrap().parse().unwrap();
    let sock = line
        .split('"')
        .skip_while(|w| *w != "path")
        .nth(2)
        .expect("socket path in QEMU's arguments")
        .to_string();
    let work = Path::new(&sock).parent().unwrap().to_path_buf();

    signal(&child, libc::SIGTERM);
    // Well below QEMU_TIMEOUT: the script must not wait for QEMU.
    let status = wait_or_kill(&mut child, 30);
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert!(status.is_some(), "SIGTERM did not stop qemu-run.sh: {err}");
    assert_eq!(o.status.code(), Some(143), "{err}");
    assert!(err.contains("stopped by SIGTERM"), "says why: {err}");
    assert!(!alive(qemu_pid), "QEMU (pid {qemu_pid}) left running");
    assert_eq!(
        processes_with(&sock),
        Vec::<i32>::new(),
        "server left running"
    );
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(
        !mounts.contains(root.to_str().unwrap()),
        "mounts left under {}",
        root.display()
    );
    assert!(!work.exists(), "work directory {} left", work.display());
}
