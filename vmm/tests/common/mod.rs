//! Test guests built byte by byte: tiny PVH ELFs whose 32-bit entry code is
//! given by the test, so VMM behaviour can be checked without the firmware.

#![allow(dead_code)]

pub mod gpu_client;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const LOAD_ADDR: u64 = 0x10_0000;
pub const CODE_OFFSET: u64 = 0x100;

/// A minimal ELF64 x86-64 executable: one PT_LOAD at 1 MiB holding `code` at
/// offset 0x100, and a PT_NOTE with XEN_ELFNOTE_PHYS32_ENTRY pointing at it
/// (unless `pvh_note` is false). `extra_memsz` grows the loaded segment
/// beyond the file, as .bss does.
pub fn pvh_elf(code: &[u8], pvh_note: bool, extra_memsz: u64) -> Vec<u8> {
    let entry = LOAD_ADDR + CODE_OFFSET;
    let phnum: u16 = if pvh_note { 2 } else { 1 };
    let file_len = CODE_OFFSET + code.len() as u64;
    let mut f = Vec::new();
    // ELF header
    f.extend_from_slice(b"\x7fELF");
    f.extend_from_slice(&[2, 1, 1, 0]);
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&entry.to_le_bytes());
    f.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes());
    f.extend_from_slice(&64u16.to_le_bytes());
    f.extend_from_slice(&56u16.to_le_bytes());
    f.extend_from_slice(&phnum.to_le_bytes());
    f.extend_from_slice(&64u16.to_le_bytes());
    f.extend_from_slice(&0u16.to_le_bytes());
    f.extend_from_slice(&0u16.to_le_bytes());
    assert_eq!(f.len(), 64);
    let phdr =
        |f: &mut Vec<u8>, ty: u32, off: u64, addr: u64, filesz: u64, memsz: u64, align: u64| {
            f.extend_from_slice(&ty.to_le_bytes());
            f.extend_from_slice(&7u32.to_le_bytes()); // RWX
            f.extend_from_slice(&off.to_le_bytes());
            f.extend_from_slice(&addr.to_le_bytes());
            f.extend_from_slice(&addr.to_le_bytes());
            f.extend_from_slice(&filesz.to_le_bytes());
            f.extend_from_slice(&memsz.to_le_bytes());
            f.extend_from_slice(&align.to_le_bytes());
        };
    phdr(
        &mut f,
        1,
        0,
        LOAD_ADDR,
        file_len,
        file_len + extra_memsz,
        0x1000,
    );
    let note_off = 64 + 56 * u64::from(phnum);
    if pvh_note {
        phdr(&mut f, 4, note_off, 0, 20, 20, 4);
        f.extend_from_slice(&4u32.to_le_bytes());
        f.extend_from_slice(&4u32.to_le_bytes());
        f.extend_from_slice(&18u32.to_le_bytes());
        f.extend_from_slice(b"Xen\0");
        f.extend_from_slice(&(entry as u32).to_le_bytes());
    }
    f.resize(CODE_OFFSET as usize, 0);
    f.extend_from_slice(code);
    f
}

/// `mov al, v; out 0xf4, al; jmp $`
pub fn exit_code(v: u8) -> Vec<u8> {
    vec![0xb0, v, 0xe6, 0xf4, 0xeb, 0xfe]
}

pub fn write_temp(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("faultline-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

pub fn faultline(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_faultline"))
        .args(args)
        .env_remove("FAULTLINE_FIRMWARE")
        .env_remove("FAULTLINE_KVM_DEVICE")
        .output()
        .expect("spawn faultline")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Says SKIP where it is seen: straight to the process's stderr, because
/// libtest captures `eprintln!` of a passing test, which would turn the skip
/// into a silent `ok`.
fn say_skip(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "*** SKIP {line} ***");
}

/// True when KVM is usable. When it is not, the test says SKIP loudly, or
/// fails if FAULTLINE_REQUIRE_KVM=1 (as CI sets it).
pub fn kvm_or_skip(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        if std::env::var("FAULTLINE_REQUIRE_KVM").as_deref() == Ok("1") {
            panic!("{test}: /dev/kvm is not usable and FAULTLINE_REQUIRE_KVM=1");
        }
        say_skip(&format!(
            "{test}: /dev/kvm is not usable (FAULTLINE_REQUIRE_KVM=1 makes this a failure)"
        ));
    }
    ok
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The release firmware built by scripts/build-firmware.sh, or None (a
/// SKIP line) when it is not built; with FAULTLINE_REQUIRE_KVM=1 a missing
/// build fails the test instead.
pub fn firmware() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../firmware/target/x86_64-unknown-none/release/faultline-firmware");
    if p.exists() {
        return Some(p);
    }
    if std::env::var("FAULTLINE_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!(
            "firmware not built at {}: run scripts/build-firmware.sh",
            p.display()
        );
    }
    say_skip(&format!(
        "firmware not built at {}; run scripts/build-firmware.sh \
         (FAULTLINE_REQUIRE_KVM=1 makes this a failure)",
        p.display()
    ));
    None
}

/// `pvh_elf` with the PVH note's entry point replaced by `entry`.
pub fn pvh_elf_with_entry(code: &[u8], entry: u32) -> Vec<u8> {
    let mut f = pvh_elf(code, true, 0);
    // The note follows the ELF header and two program headers; its
    // descriptor is the last 4 of its 20 bytes.
    let desc = 64 + 2 * 56 + 16;
    f[desc..desc + 4].copy_from_slice(&entry.to_le_bytes());
    f
}

/// `mov dx, 0x510; loop: out dx, al; jmp loop` — an exit to the VMM per
/// iteration on a port nobody claims (a trace-level log record each).
pub fn unclaimed_port_loop() -> Vec<u8> {
    vec![0x66, 0xba, 0x10, 0x05, 0xee, 0xeb, 0xfd]
}

/// Writes 'x' to COM1 forever.
pub fn console_forever() -> Vec<u8> {
    vec![0x66, 0xba, 0xf8, 0x03, 0xb0, b'x', 0xee, 0xeb, 0xfd]
}

/// Writes `n` bytes of 'x' to COM1, then debug-exit 0.
pub fn console_then_exit(n: u32) -> Vec<u8> {
    let mut c = vec![0xb9];
    c.extend_from_slice(&n.to_le_bytes()); // mov ecx, n
    c.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03, 0xb0, b'x']); // mov dx, 0x3f8; mov al, 'x'
    c.extend_from_slice(&[0xee, 0x49, 0x75, 0xfc]); // out dx, al; dec ecx; jnz
    c.extend_from_slice(&exit_code(0));
    c
}

/// A `faultline` child with the given stdio, environment cleaned as in
/// [`faultline`].
pub fn spawn_faultline(
    args: &[&str],
    stdout: std::process::Stdio,
    stderr: std::process::Stdio,
) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_faultline"))
        .args(args)
        .env_remove("FAULTLINE_FIRMWARE")
        .env_remove("FAULTLINE_KVM_DEVICE")
        .stdin(std::process::Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .expect("spawn faultline")
}

/// Waits up to `secs` for `child`; kills it and returns None after that
/// (a hang detector, generous for a loaded host).
pub fn wait_or_kill(
    child: &mut std::process::Child,
    secs: u64,
) -> Option<std::process::ExitStatus> {
    let t0 = std::time::Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if t0.elapsed() > std::time::Duration::from_secs(secs) {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Sends `sig` to `child`.
pub fn signal(child: &std::process::Child, sig: i32) {
    // SAFETY: kill(2) with a pid we spawned and have not reaped.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

/// A FIFO at `name` in the test's temp directory.
pub fn fifo(name: &str) -> PathBuf {
    let p = write_temp(name, b"");
    std::fs::remove_file(&p).unwrap();
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path; the result is checked.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    p
}

/// The `--stats-json` document at `p`.
pub fn stats_doc(p: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(p).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: '{text}'"))
}

/// A pipe whose buffer holds one page, as (read end, write end): a writer
/// nobody reads blocks after 4 KiB.
pub fn small_pipe() -> (std::fs::File, std::fs::File) {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two-element array; the result is checked.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: F_SETPIPE_SZ on the pipe we just made.
    unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, 4096) };
    // SAFETY: both descriptors were just created and are owned here only.
    unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    }
}
