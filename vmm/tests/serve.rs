//! `faultline serve` from the client's side: a real vfio-user session
//! (config space, BAR0, DMA through a memfd, MSI through an eventfd,
//! counters at exit) and the bad-input paths: garbage, a DMA map without an
//! fd, DMA to unmapped memory, a client vanishing mid-message. The server
//! must answer with an error or exit with one clear line, never panic, and
//! never outlive its client.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const BAR0: u32 = 0;
const CONFIG: u32 = 7;
const MSI: u32 = 1;
// Guest-physical layout of the test's "RAM" (one memfd mapped at 0).
const RAM: u64 = 1 << 20;
const SB: u64 = 0x1000;
const FAULT_BUF: u64 = 0x2000;
const CTX_TABLE: u64 = 0x3000;
const CTL_RING: u64 = 0x4000;

struct Server {
    child: Option<Child>,
    socket: PathBuf,
    dir: PathBuf,
}

impl Server {
    fn start(name: &str, extra: &[&str]) -> Server {
        let dir =
            std::env::temp_dir().join(format!("faultline-serve-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("gpu.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_faultline"))
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let s = Server {
            child: Some(child),
            socket,
            dir,
        };
        let t0 = Instant::now();
        while !s.socket.exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "server never listened"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        s
    }

    /// A `vfio_user` client session, retried like [`Server::connect`].
    fn client(&self) -> vfio_user::Client {
        let t0 = Instant::now();
        loop {
            match vfio_user::Client::new(&self.socket) {
                Ok(c) => return c,
                // Refused before listen(); anything else repeats until the
                // deadline and is then reported.
                Err(_) if t0.elapsed() < Duration::from_secs(10) => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("vfio-user client on {}: {e:?}", self.socket.display()),
            }
        }
    }

    fn connect(&self) -> UnixStream {
        // The socket file appears at bind(), a moment before listen(): a
        // connect in between is refused, so retry that (and only that).
        let t0 = Instant::now();
        let s = loop {
            match UnixStream::connect(&self.socket) {
                Ok(s) => break s,
                Err(e)
                    if e.kind() == std::io::ErrorKind::ConnectionRefused
                        && t0.elapsed() < Duration::from_secs(10) =>
                {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("connect to {}: {e}", self.socket.display()),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    /// Waits for the server to exit (killing it after 10 s, which fails the
    /// test: it must never outlive its client).
    fn finish(mut self) -> Output {
        let mut child = self.child.take().unwrap();
        let t0 = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if t0.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                let o = child.wait_with_output().unwrap();
                panic!("server still running 10 s after its client: {}", stderr(&o));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        child.wait_with_output().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn assert_clean_error(o: &Output, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(3), "stderr: {err}");
    assert!(err.contains(needle), "expected '{needle}' in: {err}");
    assert!(!err.contains("panicked"), "panic in: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line expected: {err}"
    );
}

// ---------------------------------------------------------------- raw wire

fn header(id: u16, cmd: u16, size: usize, flags: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(size);
    h.extend_from_slice(&id.to_le_bytes());
    h.extend_from_slice(&cmd.to_le_bytes());
    h.extend_from_slice(&(size as u32).to_le_bytes());
    h.extend_from_slice(&flags.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h
}

/// One request, one reply: (reply flags, error, payload).
fn request(s: &mut UnixStream, id: u16, cmd: u16, body: &[u8]) -> (u32, u32, Vec<u8>) {
    let mut m = header(id, cmd, 16 + body.len(), 0);
    m.extend_from_slice(body);
    s.write_all(&m).unwrap();
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().unwrap());
    assert_eq!(u16::from_le_bytes([h[0], h[1]]), id, "reply to our request");
    let mut payload = vec![0u8; u32_at(4) as usize - 16];
    s.read_exact(&mut payload).unwrap();
    (u32_at(8), u32_at(12), payload)
}

fn handshake(s: &mut UnixStream) {
    let mut body = vec![0, 0, 0, 0];
    body.extend_from_slice(b"{\"capabilities\":{\"max_msg_fds\":8}}\0");
    let (flags, _, payload) = request(s, 1, 1, &body);
    assert_eq!(flags & 0x20, 0, "VERSION accepted");
    assert!(String::from_utf8_lossy(&payload).contains("max_data_xfer_size"));
}

fn region_io(s: &mut UnixStream, id: u16, write: Option<u32>, region: u32, off: u64) -> u32 {
    let mut body = off.to_le_bytes().to_vec();
    body.extend_from_slice(&region.to_le_bytes());
    body.extend_from_slice(&4u32.to_le_bytes());
    let cmd = match write {
        Some(v) => {
            body.extend_from_slice(&v.to_le_bytes());
            10
        }
        None => 9,
    };
    let (flags, err, payload) = request(s, id, cmd, &body);
    assert_eq!(flags & 0x20, 0, "region access refused: errno {err}");
    if write.is_some() {
        return 0;
    }
    u32::from_le_bytes(payload[16..20].try_into().unwrap())
}

// ------------------------------------------------------------------- tests

#[test]
fn session_config_bar0_dma_msi_and_counters() {
    let json = std::env::temp_dir().join(format!("faultline-serve-{}.json", std::process::id()));
    let srv = Server::start(
        "session",
        &[
            "--gpu-channels",
            "2",
            "--stats-json",
            json.to_str().unwrap(),
        ],
    );
    let mut c = srv.client();
    let rd = |c: &mut vfio_user::Client, region, off| {
        let mut b = [0u8; 4];
        c.region_read(region, off, &mut b).unwrap();
        u32::from_le_bytes(b)
    };
    let wr = |c: &mut vfio_user::Client, region, off, v: u32| {
        c.region_write(region, off, &v.to_le_bytes()).unwrap()
    };
    // Config space: identity, MSI capability; one 256-byte read works too.
    assert_eq!(rd(&mut c, CONFIG, 0), 0x0001_fa17);
    assert_eq!(rd(&mut c, CONFIG, 0x40) & 0xff, 0x05);
    let mut all = [0u8; 256];
    c.region_read(CONFIG, 0, &mut all).unwrap();
    assert_eq!(&all[0..4], &[0x17, 0xfa, 0x01, 0x00]);
    // BAR0: identity and the sizing option.
    assert_eq!(rd(&mut c, BAR0, 0), u32::from_le_bytes(*b"FLTG"));
    assert_eq!(
        rd(&mut c, BAR0, 0x0c),
        2,
        "NUM_CHANNELS from --gpu-channels"
    );

    // Guest RAM: a memfd mapped at GPA 0.
    let ram = memfd(libc::MFD_ALLOW_SEALING);
    c.dma_map(0, 0, RAM, ram.as_raw_fd()).unwrap();
    assert!(
        ram.set_len(RAM / 2).is_err(),
        "the server sealed guest RAM against shrinking"
    );
    // MSI: 4 vectors enabled in config space, eventfd for CONTROL (3).
    let ev: Vec<EventFd> = (0..4)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let raw: Vec<i32> = ev.iter().map(|e| e.as_raw_fd()).collect();
    c.set_irqs(MSI, 0x4 | 0x20, 0, 4, &raw).unwrap();
    c.region_write(CONFIG, 0x42, &(1u16 | (2 << 4)).to_le_bytes())
        .unwrap();

    wr(&mut c, BAR0, 0x40, SB as u32);
    wr(&mut c, BAR0, 0x48, FAULT_BUF as u32);
    wr(&mut c, BAR0, 0x50, 16);
    wr(&mut c, BAR0, 0x58, CTX_TABLE as u32);
    wr(&mut c, BAR0, 0x60, CTL_RING as u32);
    wr(&mut c, BAR0, 0x68, 8);
    wr(&mut c, BAR0, 0x18, 1);
    assert_eq!(
        rd(&mut c, BAR0, 0x14),
        1,
        "device enabled on the mapped RAM"
    );
    // INVALIDATE_ALL with NOTIFY through the control ring and its doorbell.
    let mut entry = [0u8; 32];
    entry[0] = 1; // op
    entry[12] = 1; // flags: NOTIFY
    ram.write_all_at(&entry, CTL_RING).unwrap();
    ram.write_all_at(&1u32.to_le_bytes(), SB + 0x44).unwrap();
    wr(&mut c, BAR0, 0x2008, 0);
    let t0 = Instant::now();
    while ev[3].read().is_err() {
        assert!(t0.elapsed() < Duration::from_secs(10), "no CONTROL MSI");
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut cons = [0u8; 4];
    ram.read_exact_at(&mut cons, SB + 0x08).unwrap();
    assert_eq!(
        u32::from_le_bytes(cons),
        1,
        "ctl_cons advanced in guest RAM"
    );
    let mut status = [0u8; 4];
    ram.read_exact_at(&mut status, CTL_RING + 4).unwrap();
    assert_eq!(u32::from_le_bytes(status), 1, "entry status Ok");
    assert_eq!(
        rd(&mut c, BAR0, 0x3000 + 8 * 10),
        1,
        "invalidations counter"
    );
    // A vector without an eventfd is not an error; reset works.
    c.set_irqs(MSI, 0x1 | 0x20, 0, 0, &[]).unwrap();
    c.reset().unwrap();
    assert_eq!(rd(&mut c, BAR0, 0x14), 0, "disabled by reset");
    drop(c);

    let o = srv.finish();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let doc = std::fs::read_to_string(&json).unwrap();
    let _ = std::fs::remove_file(&json);
    // Reset clears the counters, so what was counted before it is gone;
    // the document itself must be there and well-formed.
    let v: serde_json::Value = serde_json::from_str(&doc).unwrap();
    assert!(v["gpu"]["invalidations"].is_u64(), "{doc}");
}

#[test]
fn gpu_inject_reaches_the_served_device_and_its_stats() {
    let json =
        std::env::temp_dir().join(format!("faultline-serve-{}-inj.json", std::process::id()));
    let srv = Server::start(
        "inject",
        &[
            "--gpu-inject",
            "seed=5,fault_dup=0.5,tlb_ack_delay_steps=3",
            "--stats-json",
            json.to_str().unwrap(),
        ],
    );
    let mut c = srv.client();
    let mut b = [0u8; 4];
    c.region_read(BAR0, 0x080, &mut b).unwrap();
    // INJECT_ACTIVE: TLB_ACK_DELAY_STEPS (bit 0) | FAULT_DUP (bit 4).
    assert_eq!(u32::from_le_bytes(b), 0x11);
    drop(c);
    let o = srv.finish();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let doc = stats_doc(&json);
    let _ = std::fs::remove_file(&json);
    assert_eq!(
        doc["gpu_inject"], "seed=5,tlb_ack_delay_steps=3,fault_dup=0.5",
        "the canonical spec: {doc}"
    );
    assert_eq!(doc["gpu"]["inject.spec.seed"], 5, "{doc}");
    assert_eq!(doc["gpu"]["inject.spec.fault_dup_ppm"], 500_000, "{doc}");
    assert_eq!(doc["gpu"]["inject.spec.tlb_ack_delay_steps"], 3, "{doc}");
    assert!(doc["gpu"]["inject.fired.fault_dup"].is_u64(), "{doc}");
    assert!(
        doc["guest"].is_null(),
        "the guest's console is QEMU's: {doc}"
    );
}

#[test]
fn garbage_on_the_socket_is_a_clear_error() {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut noise = vec![0u8; 64];
    for b in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("short", header(1, 4, 4, 0), "protocol violation"),
        ("unknown", header(1, 99, 16, 0), "unknown command 99"),
        // The crate would unwrap this payload: it must never see it.
        (
            "version",
            [header(1, 1, 24, 0), b"\0\0\0\0abcd".to_vec()].concat(),
            "NUL-terminated",
        ),
        (
            "huge",
            header(1, 10, u32::MAX as usize, 0),
            "protocol violation",
        ),
        (
            "reply",
            header(1, 4, 32, 1).into_iter().chain([0; 16]).collect(),
            "only send requests",
        ),
        ("noise", noise, "protocol violation"),
    ];
    for (name, bytes, needle) in cases {
        let srv = Server::start(&format!("garbage-{name}"), &[]);
        let mut s = srv.connect();
        s.write_all(&bytes).unwrap();
        let o = srv.finish();
        assert_clean_error(&o, needle);
    }
}

/// `RAM` bytes of memfd, created with `flags`.
fn memfd(flags: libc::c_uint) -> File {
    // SAFETY: a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"faultline-test-ram".as_ptr(), flags) };
    assert!(fd >= 0);
    // SAFETY: memfd_create just returned this descriptor to us.
    let ram = unsafe { File::from_raw_fd(fd) };
    ram.set_len(RAM).unwrap();
    ram
}

#[test]
fn dma_map_of_unsealable_memory_is_refused() {
    let srv = Server::start("unsealable", &[]);
    let mut c = srv.client();
    // Without MFD_ALLOW_SEALING the memfd can never be sealed: the client
    // could shrink it under the device.
    let ram = memfd(0);
    // The crate's client ignores the error reply; stderr shows the refusal.
    let _ = c.dma_map(0, 0, RAM, ram.as_raw_fd());
    let mut magic = [0u8; 4];
    c.region_read(BAR0, 0, &mut magic).unwrap();
    assert_eq!(&magic, b"FLTG", "still serving");
    drop(c);
    let o = srv.finish();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("sealed against shrinking"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn dma_map_without_fd_is_refused_and_unmapped_dma_fails_cleanly() {
    let srv = Server::start("nofd", &[]);
    let mut s = srv.connect();
    handshake(&mut s);
    // DMA_MAP: argsz, flags READ|WRITE, offset, iova, size; no fd.
    let mut body = 32u32.to_le_bytes().to_vec();
    body.extend_from_slice(&3u32.to_le_bytes());
    body.extend_from_slice(&0u64.to_le_bytes());
    body.extend_from_slice(&0u64.to_le_bytes());
    body.extend_from_slice(&RAM.to_le_bytes());
    let (flags, err, _) = request(&mut s, 2, 2, &body);
    assert_ne!(flags & 0x20, 0, "refused");
    assert_eq!(err, libc::EINVAL as u32);
    // The server is still there; the device has no memory, so enabling it
    // is a bad setup, reported through its registers.
    for (i, (off, v)) in [
        (0x40, SB),
        (0x48, FAULT_BUF),
        (0x50, 16),
        (0x58, CTX_TABLE),
        (0x60, CTL_RING),
        (0x68, 8),
        (0x18, 1),
    ]
    .into_iter()
    .enumerate()
    {
        region_io(&mut s, 10 + i as u16, Some(v as u32), BAR0, off);
    }
    assert_eq!(region_io(&mut s, 20, None, BAR0, 0x18), 0, "not enabled");
    assert_eq!(
        region_io(&mut s, 21, None, BAR0, 0x20),
        1,
        "ERROR_CODE BadSetup"
    );
    // An out-of-range region access is an error reply, not the end.
    let mut body = 0xfff0u64.to_le_bytes().to_vec();
    body.extend_from_slice(&BAR0.to_le_bytes());
    body.extend_from_slice(&64u32.to_le_bytes());
    let (flags, _, _) = request(&mut s, 22, 9, &body);
    assert_ne!(flags & 0x20, 0);
    assert_eq!(region_io(&mut s, 23, None, CONFIG, 0), 0x0001_fa17);
    drop(s);
    let o = srv.finish();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("without a file descriptor"),
        "{}",
        stderr(&o)
    );
    assert!(!stderr(&o).contains("panicked"));
}

#[test]
fn refused_request_marked_no_reply_gets_no_error_reply() {
    const NO_REPLY: u32 = 0x10;
    const DMA_READ: u16 = 11;
    let srv = Server::start("noreply", &[]);
    let mut s = srv.connect();
    handshake(&mut s);
    // Refused (this server does no DMA_READ), and the client asked for no
    // reply: the next reply on the wire must be the one to request 3.
    s.write_all(&header(2, DMA_READ, 16, NO_REPLY)).unwrap();
    assert_eq!(region_io(&mut s, 3, None, CONFIG, 0), 0x0001_fa17);
    drop(s);
    let o = srv.finish();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("DMA_READ is not supported"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn client_disconnect_mid_command_is_a_clear_error() {
    let srv = Server::start("midcmd", &[]);
    let mut s = srv.connect();
    handshake(&mut s);
    // A REGION_WRITE announced with 100 bytes; only 10 arrive.
    let mut m = header(5, 10, 100, 0);
    m.extend_from_slice(&[0u8; 10]);
    s.write_all(&m).unwrap();
    drop(s);
    let o = srv.finish();
    assert_clean_error(&o, "disconnected in the middle of a REGION_WRITE message");
}

#[test]
fn existing_socket_path_is_refused() {
    let p = write_temp("serve-existing.sock", b"");
    let o = faultline(&["serve", "--socket", path_str(&p)]);
    assert_clean_error(&o, "already exists");
    assert!(Path::new(&p).exists(), "not ours to remove");
}

// ------------------------------------------- hostile clients, signals, usage

const SET_IRQS: u16 = 8;
const DATA_EVENTFD: u32 = 0x4;
const DATA_NONE: u32 = 0x1;
const ACTION_TRIGGER: u32 = 0x20;

/// One request carrying descriptors; returns the reply's flags.
fn request_with_fds(s: &mut UnixStream, id: u16, cmd: u16, body: &[u8], fds: &[i32]) -> u32 {
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let mut m = header(id, cmd, 16 + body.len(), 0);
    m.extend_from_slice(body);
    s.send_with_fds(&[&m[..]], fds).unwrap();
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    let size = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
    let mut rest = vec![0u8; size - 16];
    s.read_exact(&mut rest).unwrap();
    assert_eq!(u16::from_le_bytes([h[0], h[1]]), id, "reply to our request");
    u32::from_le_bytes(h[8..12].try_into().unwrap())
}

fn set_irqs_body(flags: u32, start: u32, count: u32) -> Vec<u8> {
    [20u32, flags, MSI, start, count]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

#[test]
fn an_msi_fd_that_is_not_an_eventfd_is_refused() {
    let srv = Server::start("irqfds", &[]);
    let mut s = srv.connect();
    handshake(&mut s);
    // A pipe nobody drains would block the device's worker: refused.
    let mut p = [0i32; 2];
    // SAFETY: pipe fills the array; checked.
    assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
    let flags = request_with_fds(
        &mut s,
        2,
        SET_IRQS,
        &set_irqs_body(DATA_EVENTFD | ACTION_TRIGGER, 0, 1),
        &[p[1]],
    );
    assert_ne!(flags & 0x20, 0, "a pipe as an MSI eventfd is refused");
    assert_eq!(
        region_io(&mut s, 3, None, CONFIG, 0),
        0x0001_fa17,
        "still serving"
    );
    drop(s);
    let o = srv.finish();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("not an eventfd"), "{}", stderr(&o));
    // SAFETY: closing the pipe we made.
    unsafe {
        libc::close(p[0]);
        libc::close(p[1]);
    }
}

#[test]
fn a_saturated_msi_eventfd_never_blocks_the_server() {
    let srv = Server::start("irqfull", &[]);
    let mut s = srv.connect();
    handshake(&mut s);
    // An eventfd whose counter is saturated: signalling it must not block.
    let ev = EventFd::new(0).unwrap();
    ev.write(u64::MAX - 1).unwrap();
    let flags = request_with_fds(
        &mut s,
        3,
        SET_IRQS,
        &set_irqs_body(DATA_EVENTFD | ACTION_TRIGGER, 0, 1),
        &[ev.as_raw_fd()],
    );
    assert_eq!(flags & 0x20, 0, "an eventfd is accepted");
    // DATA_NONE + TRIGGER fires the vector on the server's side.
    let flags = request_with_fds(
        &mut s,
        4,
        SET_IRQS,
        &set_irqs_body(DATA_NONE | ACTION_TRIGGER, 0, 1),
        &[],
    );
    assert_eq!(flags & 0x20, 0);
    assert_eq!(
        region_io(&mut s, 5, None, CONFIG, 0),
        0x0001_fa17,
        "still serving"
    );
    drop(s);
    let o = srv.finish();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

/// A client that shrinks its memfd while the server maps it: whatever the
/// interleaving, a map the server accepts is sealed at a size that covers
/// it (checking the size before sealing let a truncation slip in between,
/// and device DMA then raised SIGBUS in the server).
#[test]
fn dma_map_is_checked_after_sealing_against_a_racing_truncate() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let srv = Server::start("sealrace", &[]);
    let mut s = srv.connect();
    handshake(&mut s);
    let mut map = 32u32.to_le_bytes().to_vec();
    map.extend_from_slice(&3u32.to_le_bytes()); // READ | WRITE
    map.extend_from_slice(&0u64.to_le_bytes()); // file offset
    map.extend_from_slice(&0u64.to_le_bytes()); // iova
    map.extend_from_slice(&RAM.to_le_bytes());
    let mut unmap = 24u32.to_le_bytes().to_vec();
    unmap.extend_from_slice(&0u32.to_le_bytes());
    unmap.extend_from_slice(&0u64.to_le_bytes());
    unmap.extend_from_slice(&RAM.to_le_bytes());
    let (mut accepted, mut refused) = (0, 0);
    for i in 0..2000u16 {
        let ram = Arc::new(memfd(libc::MFD_ALLOW_SEALING));
        let stop = Arc::new(AtomicBool::new(false));
        let racer = {
            let (ram, stop) = (ram.clone(), stop.clone());
            std::thread::spawn(move || {
                let fd = ram.as_raw_fd();
                while !stop.load(Ordering::Relaxed) {
                    // SAFETY: ftruncate/fcntl on the memfd we own.
                    unsafe {
                        libc::ftruncate(fd, RAM as i64);
                        if libc::ftruncate(fd, 0) != 0 {
                            break; // sealed at full size
                        }
                        if libc::fcntl(fd, libc::F_GET_SEALS) & libc::F_SEAL_SHRINK != 0 {
                            break; // sealed, now empty for good
                        }
                    }
                }
            })
        };
        let flags = request_with_fds(&mut s, 2 * i + 100, 2, &map, &[ram.as_raw_fd()]);
        stop.store(true, Ordering::Relaxed);
        racer.join().unwrap();
        if flags & 0x20 != 0 {
            refused += 1;
            continue;
        }
        accepted += 1;
        let len = ram.metadata().unwrap().len();
        assert!(
            len >= RAM,
            "map {i} accepted over a {len}-byte file (needs {RAM}): device DMA would fault"
        );
        let (flags, _, _) = request(&mut s, 2 * i + 101, 3, &unmap);
        assert_eq!(flags & 0x20, 0, "unmap");
    }
    drop(s);
    let o = srv.finish();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    eprintln!("seal race: {accepted} maps accepted, {refused} refused");
}

#[test]
fn requests_before_a_successful_version_end_the_session() {
    // No VERSION at all.
    let srv = Server::start("nohandshake", &[]);
    let mut s = srv.connect();
    s.write_all(&[header(1, 4, 32, 0), vec![0; 16]].concat())
        .unwrap();
    assert_clean_error(
        &srv.finish(),
        "DEVICE_GET_INFO before the VERSION handshake",
    );

    // A VERSION the crate refuses (its capabilities are not JSON).
    let srv = Server::start("badhandshake", &[]);
    let mut s = srv.connect();
    let (flags, _, _) = request(&mut s, 1, 1, b"\0\0\0\0not json\0");
    assert_ne!(flags & 0x20, 0, "VERSION refused");
    s.write_all(&[header(2, 4, 32, 0), vec![0; 16]].concat())
        .unwrap();
    let o = srv.finish();
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("DEVICE_GET_INFO after a failed VERSION handshake"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn protocol_error_exit_still_writes_stats() {
    let json =
        std::env::temp_dir().join(format!("faultline-serve-{}-perr.json", std::process::id()));
    let srv = Server::start("perr", &["--stats", "--stats-json", json.to_str().unwrap()]);
    let mut s = srv.connect();
    s.write_all(&header(1, 99, 16, 0)).unwrap();
    let o = srv.finish();
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("unknown command 99"), "{}", stderr(&o));
    assert!(stderr(&o).contains("GPU counters:"), "{}", stderr(&o));
    let doc = stats_doc(&json);
    let _ = std::fs::remove_file(&json);
    assert!(doc["gpu"].is_object(), "{doc}");
    assert!(doc["gpu_inject"].is_null(), "no --gpu-inject: {doc}");
    assert!(
        doc["process"]["peak_rss_kib"].as_u64().unwrap() > 0,
        "{doc}"
    );
}

#[test]
fn signals_stop_the_server_remove_its_socket_and_write_stats() {
    // Before a client connects: SIGTERM.
    let json =
        std::env::temp_dir().join(format!("faultline-serve-{}-sig.json", std::process::id()));
    let trace = std::env::temp_dir().join(format!(
        "faultline-serve-{}-sig-trace.json",
        std::process::id()
    ));
    let mut srv = Server::start(
        "sigterm",
        &[
            "--stats-json",
            json.to_str().unwrap(),
            "--gpu-trace",
            trace.to_str().unwrap(),
        ],
    );
    signal(srv.child.as_ref().unwrap(), libc::SIGTERM);
    let socket = srv.socket.clone();
    let child = srv.child.as_mut().unwrap();
    assert!(wait_or_kill(child, 30).is_some(), "SIGTERM ignored");
    let o = srv.finish();
    assert_eq!(o.status.code(), Some(143), "{}", stderr(&o));
    assert_eq!(stderr(&o).trim_end(), "faultline: stopped by SIGTERM");
    assert!(!socket.exists(), "socket file left behind");
    let doc = stats_doc(&json);
    let _ = std::fs::remove_file(&json);
    assert!(
        doc["gpu"].is_object() && doc["process"]["peak_rss_kib"].is_u64(),
        "{doc}"
    );
    // --gpu-trace is written on this path too: the device's (empty) trace.
    let doc = stats_doc(&trace);
    let _ = std::fs::remove_file(&trace);
    assert!(doc["traceEvents"].is_array(), "{doc}");
    assert_eq!(doc["otherData"]["dropped"], 0, "{doc}");

    // In a session: SIGINT.
    let mut srv = Server::start("sigint", &[]);
    let mut s = srv.connect();
    handshake(&mut s);
    signal(srv.child.as_ref().unwrap(), libc::SIGINT);
    assert!(
        wait_or_kill(srv.child.as_mut().unwrap(), 30).is_some(),
        "SIGINT ignored"
    );
    let o = srv.finish();
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert_eq!(stderr(&o).trim_end(), "faultline: stopped by SIGINT");
}

#[test]
fn socket_path_mistakes_get_their_own_message() {
    let dir = std::env::temp_dir().join(format!("faultline-serve-{}-dir", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let o = faultline(&["serve", "--socket", dir.to_str().unwrap()]);
    assert_clean_error(
        &o,
        "is a directory: --socket names the socket file to create",
    );
    assert!(!stderr(&o).contains("remove it"), "{}", stderr(&o));
    let long = format!("/tmp/{}", "s".repeat(120));
    let o = faultline(&["serve", "--socket", &long]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("at most 107"), "{}", stderr(&o));
    let help = faultline(&["serve", "--help"]);
    assert_eq!(help.status.code(), Some(0));
    assert!(!stdout(&help).contains("--no-gpu"), "{}", stdout(&help));
}

#[test]
fn gpu_check_warn_reports_a_violation_once_and_counts_it() {
    let json = std::env::temp_dir().join(format!("faultline-check-{}.json", std::process::id()));
    let srv = Server::start(
        "check-warn",
        &["--gpu-check", "--stats-json", json.to_str().unwrap()],
    );
    let status = common::gpu_client::coherence_violation_session(&srv.socket);
    assert_eq!(status, 0, "warn: the FILL completes Ok");
    let o = srv.finish();
    let err = stderr(&o);
    assert_eq!(
        o.status.code(),
        Some(0),
        "warn never changes the status: {err}"
    );
    assert_eq!(
        err.matches("GPU coherence violation: context 0 VA 0x0 Write")
            .count(),
        1,
        "{err}"
    );
    let doc = std::fs::read_to_string(&json).unwrap();
    let _ = std::fs::remove_file(&json);
    let v: serde_json::Value = serde_json::from_str(&doc).unwrap();
    assert_eq!(v["gpu"]["lifetime.coherence_violations"], 1, "{doc}");
    assert_eq!(v["gpu"]["check.mode"], 1, "{doc}");
    assert_eq!(v["gpu"]["check.checked"], 1, "{doc}");
}
