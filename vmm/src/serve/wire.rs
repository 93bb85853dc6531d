//! The vfio-user wire as the client speaks it, checked before the
//! `vfio_user` crate sees it. The crate trusts its peer (it sizes buffers
//! from the header and unwraps the VERSION payload), so every message from
//! the client is framed, bounded and checked here and only well-formed ones
//! are forwarded to the crate's server over a private socket; its replies
//! come back through `pump_replies`.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use faultline_abi::le;
use faultline_device::sync::lock;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

pub const HEADER: usize = 16;
/// What the crate advertises as `max_data_xfer_size` (1 MiB) plus the
/// largest fixed part of a message.
pub const MAX_DATA: u32 = 1 << 20;
const MAX_MESSAGE: u32 = HEADER as u32 + 32 + MAX_DATA;
/// SCM_RIGHTS descriptors taken per message; the kernel drops any beyond.
const MAX_FDS: usize = 16;

// Header flags, as the vfio-user spec's message header defines them.
/// Bits 0-3, the message type: 0 a command, 1 a reply.
const FLAG_TYPE: u32 = 0xf;
const TYPE_REPLY: u32 = 1;
/// Bit 4, "No_reply": the sender of a command wants no reply to it, not
/// even an error reply.
pub const FLAG_NO_REPLY: u32 = 0x10;
/// Bit 5, "Error": a reply reporting failure, with the errno in the
/// header's error field.
const FLAG_ERROR: u32 = 0x20;
/// DMA_MAP's flags: bit 1, "WRITE", the client lets the device write there.
const DMA_MAP_WRITE: u32 = 2;

pub mod cmd {
    pub const VERSION: u16 = 1;
    pub const DMA_MAP: u16 = 2;
    pub const DMA_UNMAP: u16 = 3;
    pub const DEVICE_GET_INFO: u16 = 4;
    pub const GET_REGION_INFO: u16 = 5;
    pub const GET_REGION_IO_FDS: u16 = 6;
    pub const GET_IRQ_INFO: u16 = 7;
    pub const SET_IRQS: u16 = 8;
    pub const REGION_READ: u16 = 9;
    pub const REGION_WRITE: u16 = 10;
    pub const DMA_READ: u16 = 11;
    pub const DMA_WRITE: u16 = 12;
    pub const DEVICE_RESET: u16 = 13;
    pub const DIRTY_PAGES: u16 = 14;
}

pub fn command_name(c: u16) -> String {
    let n = match c {
        cmd::VERSION => "VERSION",
        cmd::DMA_MAP => "DMA_MAP",
        cmd::DMA_UNMAP => "DMA_UNMAP",
        cmd::DEVICE_GET_INFO => "DEVICE_GET_INFO",
        cmd::GET_REGION_INFO => "DEVICE_GET_REGION_INFO",
        cmd::GET_REGION_IO_FDS => "DEVICE_GET_REGION_IO_FDS",
        cmd::GET_IRQ_INFO => "DEVICE_GET_IRQ_INFO",
        cmd::SET_IRQS => "DEVICE_SET_IRQS",
        cmd::REGION_READ => "REGION_READ",
        cmd::REGION_WRITE => "REGION_WRITE",
        cmd::DMA_READ => "DMA_READ",
        cmd::DMA_WRITE => "DMA_WRITE",
        cmd::DEVICE_RESET => "DEVICE_RESET",
        cmd::DIRTY_PAGES => "DIRTY_PAGES",
        _ => return format!("command {c}"),
    };
    n.to_string()
}

/// Why a session ended badly. Each renders as one line.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("vfio-user protocol violation by the client: {0}")]
    Violation(String),
    #[error("the client disconnected in the middle of a {0} message")]
    Truncated(String),
    #[error("vfio-user socket: {0}")]
    Io(#[from] std::io::Error),
}

pub struct Message {
    pub id: u16,
    pub command: u16,
    pub flags: u32,
    /// Header and payload as received.
    pub bytes: Vec<u8>,
    pub fds: Vec<File>,
}

// Fields of messages whose length the framing or `check` established
// first; a field past the end would read as 0, never panic.
fn u16_at(b: &[u8], at: usize) -> u16 {
    le::u16_at(b, at).unwrap_or(0)
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    le::u32_at(b, at).unwrap_or(0)
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    le::u64_at(b, at).unwrap_or(0)
}

fn read_rest(s: &mut UnixStream, buf: &mut [u8], what: u16) -> Result<(), WireError> {
    s.read_exact(buf).map_err(|e| match e.kind() {
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset => {
            WireError::Truncated(command_name(what))
        }
        _ => WireError::Io(e),
    })
}

/// Reads one message. `Ok(None)`: the client closed the connection between
/// messages.
pub fn read_message(s: &mut UnixStream) -> Result<Option<Message>, WireError> {
    let mut header = [0u8; HEADER];
    let mut raw_fds = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: HEADER,
    }];
    // SAFETY: the iovec points at `header`, which outlives the call, and
    // `raw_fds` has room for MAX_FDS descriptors.
    let (n, nfds) = unsafe { s.recv_with_fds(&mut iov, &mut raw_fds) }
        .map_err(|e| WireError::Io(std::io::Error::from_raw_os_error(e.errno())))?;
    let fds: Vec<File> = raw_fds[..nfds]
        .iter()
        // SAFETY: recvmsg just installed these descriptors in this process;
        // nothing else owns them.
        .map(|&fd| unsafe { File::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Ok(None);
    }
    if n < HEADER {
        // The command is unknown until the header is complete.
        read_rest(s, &mut header[n..], 0).map_err(|e| match e {
            WireError::Truncated(_) => WireError::Truncated("(header of a)".into()),
            e => e,
        })?;
    }
    let command = u16_at(&header, 2);
    let size = u32_at(&header, 4);
    let flags = u32_at(&header, 8);
    if !(HEADER as u32..=MAX_MESSAGE).contains(&size) {
        return Err(WireError::Violation(format!(
            "{} message of {size} bytes (must be {HEADER}..={MAX_MESSAGE})",
            command_name(command)
        )));
    }
    let mut bytes = vec![0u8; size as usize];
    bytes[..HEADER].copy_from_slice(&header);
    read_rest(s, &mut bytes[HEADER..], command)?;
    Ok(Some(Message {
        id: u16_at(&header, 0),
        command,
        flags,
        bytes,
        fds,
    }))
}

/// What to do with a well-framed message.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Forward,
    /// Answer with an error reply (errno) and go on: a request this server
    /// declines but that a client may legitimately try.
    Refuse(i32, String),
}

/// Exact sizes of the fixed-size messages (header included).
fn fixed_size(command: u16) -> Option<usize> {
    Some(match command {
        cmd::DMA_MAP => HEADER + 32,
        cmd::DMA_UNMAP => HEADER + 24,
        cmd::DEVICE_GET_INFO | cmd::GET_IRQ_INFO | cmd::REGION_READ => HEADER + 16,
        cmd::GET_REGION_INFO => HEADER + 32,
        cmd::SET_IRQS => HEADER + 20,
        cmd::DEVICE_RESET => HEADER,
        _ => return None,
    })
}

pub fn check(m: &Message) -> Result<Verdict, WireError> {
    let name = command_name(m.command);
    let violation = |why: String| Err(WireError::Violation(format!("{name}: {why}")));
    if m.flags & FLAG_TYPE != 0 || m.flags & FLAG_ERROR != 0 {
        return violation(format!(
            "flags {:#x}: the client may only send requests",
            m.flags
        ));
    }
    let fd_ok = match m.command {
        cmd::DMA_MAP => m.fds.len() <= 1,
        cmd::SET_IRQS => true,
        _ => m.fds.is_empty(),
    };
    if !fd_ok {
        return violation(format!("{} file descriptors attached", m.fds.len()));
    }
    let len = m.bytes.len();
    match m.command {
        cmd::VERSION => {
            // major, minor, then a NUL-terminated JSON capabilities string.
            let json = &m.bytes[m.bytes.len().min(HEADER + 4)..];
            match json.split_last() {
                Some((0, text)) if !text.contains(&0) => {}
                _ => return violation("capabilities are not one NUL-terminated string".into()),
            }
        }
        cmd::REGION_WRITE => {
            let count = if len >= HEADER + 16 {
                u32_at(&m.bytes, HEADER + 12)
            } else {
                return violation(format!("{len} bytes"));
            };
            if count > MAX_DATA || len != HEADER + 16 + count as usize {
                return violation(format!("{count} data bytes in a {len}-byte message"));
            }
        }
        cmd::GET_REGION_IO_FDS | cmd::DMA_READ | cmd::DMA_WRITE | cmd::DIRTY_PAGES => {
            return Ok(Verdict::Refuse(
                libc::ENOTSUP,
                format!("{name} is not supported by this server"),
            ));
        }
        c => match fixed_size(c) {
            Some(want) if want != len => {
                return violation(format!("{len} bytes, expected {want}"));
            }
            Some(_) => {}
            None => return Err(WireError::Violation(format!("unknown {name}"))),
        },
    }
    if m.command == cmd::REGION_READ && u32_at(&m.bytes, HEADER + 12) > MAX_DATA {
        return violation(format!("read of more than {MAX_DATA} bytes"));
    }
    // Read-only maps go through: the backend leaves them out quietly.
    let writable = |m: &Message| u32_at(&m.bytes, HEADER + 4) & DMA_MAP_WRITE != 0;
    if m.command == cmd::DMA_MAP && m.fds.is_empty() && writable(m) {
        let iova = u64_at(&m.bytes, HEADER + 16);
        let size = u64_at(&m.bytes, HEADER + 24);
        return Ok(Verdict::Refuse(
            libc::EINVAL,
            format!(
                "DMA map of {size:#x} bytes at {iova:#x} without a file descriptor refused: \
                 the GPU can only reach shared guest memory (QEMU: memory-backend-memfd,share=on); \
                 device DMA there will fail"
            ),
        ));
    }
    Ok(Verdict::Forward)
}

/// The VERSION handshake, which must succeed before any other request is
/// served (the spec's rule; the crate would answer anything). The guard
/// admits requests, the reply pump reports the crate's VERSION replies.
#[derive(Default)]
pub struct Handshake {
    state: Mutex<HandshakeState>,
    replied: Condvar,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum HandshakeState {
    #[default]
    None,
    /// VERSION forwarded, its reply not seen yet.
    Pending,
    Done,
    Failed,
}

/// How long a request that follows VERSION waits for the VERSION reply.
const VERSION_REPLY_WAIT: Duration = Duration::from_secs(10);

impl Handshake {
    /// Lets `m` through, or says why it breaks the protocol: anything but
    /// VERSION before a successful VERSION (a failed one may be retried).
    pub fn admit(&self, m: &Message) -> Result<(), WireError> {
        let mut s = lock(&self.state);
        if m.command == cmd::VERSION {
            if *s != HandshakeState::Done {
                *s = HandshakeState::Pending;
            }
            return Ok(());
        }
        // A client may send its next request before reading the reply.
        let t0 = Instant::now();
        while *s == HandshakeState::Pending && t0.elapsed() < VERSION_REPLY_WAIT {
            s = self
                .replied
                .wait_timeout(s, VERSION_REPLY_WAIT)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let name = command_name(m.command);
        match *s {
            HandshakeState::Done => Ok(()),
            HandshakeState::Failed => Err(WireError::Violation(format!(
                "{name} after a failed VERSION handshake"
            ))),
            HandshakeState::Pending => Err(WireError::Violation(format!(
                "{name}: no reply to VERSION within {} s",
                VERSION_REPLY_WAIT.as_secs()
            ))),
            HandshakeState::None => Err(WireError::Violation(format!(
                "{name} before the VERSION handshake"
            ))),
        }
    }

    /// The crate replied to `command`, with the error flag or not.
    fn reply(&self, command: u16, error: bool) {
        if command != cmd::VERSION {
            return;
        }
        let mut s = lock(&self.state);
        if *s == HandshakeState::Pending {
            *s = if error {
                HandshakeState::Failed
            } else {
                HandshakeState::Done
            };
            self.replied.notify_all();
        }
    }
}

/// An error reply to `m`, as the client expects it.
pub fn error_reply(id: u16, command: u16, errno: i32) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[0..2].copy_from_slice(&id.to_le_bytes());
    h[2..4].copy_from_slice(&command.to_le_bytes());
    h[4..8].copy_from_slice(&(HEADER as u32).to_le_bytes());
    h[8..12].copy_from_slice(&(TYPE_REPLY | FLAG_ERROR).to_le_bytes());
    h[12..16].copy_from_slice(&(errno as u32).to_le_bytes());
    h
}

/// Sends `m` with its descriptors to the crate's server.
pub fn forward(inner: &mut UnixStream, m: &Message) -> std::io::Result<()> {
    let fds: Vec<RawFd> = m.fds.iter().map(|f| f.as_raw_fd()).collect();
    let sent = inner
        .send_with_fds(&[&m.bytes[..]], &fds)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    // A stream socket may take a large message in several pieces; the
    // descriptors went with the first.
    inner.write_all(&m.bytes[sent..])
}

/// Copies the crate's replies to the client, one whole message at a time
/// so the guard's own error replies never interleave with them. Returns
/// when either side closes.
pub fn pump_replies(mut inner: UnixStream, client: &Mutex<UnixStream>, handshake: &Handshake) {
    loop {
        let mut header = [0u8; HEADER];
        if inner.read_exact(&mut header).is_err() {
            return;
        }
        let size = (u32_at(&header, 4) as usize).max(HEADER);
        let mut msg = vec![0u8; size];
        msg[..HEADER].copy_from_slice(&header);
        if inner.read_exact(&mut msg[HEADER..]).is_err() {
            return;
        }
        // The crate answers a failed backend call with the error flag but
        // errno 0, which QEMU reports as "Success"; say what kind of failure
        // it was (the backend refuses only invalid requests).
        if u32_at(&msg, 8) & FLAG_ERROR != 0 && u32_at(&msg, 12) == 0 {
            msg[12..16].copy_from_slice(&(libc::EINVAL as u32).to_le_bytes());
        }
        // Before the client sees the reply, so its next request is admitted.
        handshake.reply(u16_at(&msg, 2), u32_at(&msg, 8) & FLAG_ERROR != 0);
        if let Err(e) = lock(client).write_all(&msg) {
            log::debug!("reply to the client lost: {e}");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(command: u16, flags: u32, body: &[u8], fds: usize) -> Message {
        let mut bytes = vec![0u8; HEADER];
        bytes[2..4].copy_from_slice(&command.to_le_bytes());
        bytes[4..8].copy_from_slice(&((HEADER + body.len()) as u32).to_le_bytes());
        bytes[8..12].copy_from_slice(&flags.to_le_bytes());
        bytes.extend_from_slice(body);
        Message {
            id: 7,
            command,
            flags,
            bytes,
            fds: (0..fds).map(|_| File::open("/dev/null").unwrap()).collect(),
        }
    }

    fn violation(m: &Message) -> String {
        match check(m) {
            Err(WireError::Violation(s)) => s,
            other => panic!("expected a violation, got {other:?}"),
        }
    }

    #[test]
    fn error_replies_without_errno_get_einval() {
        let (mut crate_side, inner) = UnixStream::pair().unwrap();
        let (client_far, client_near) = UnixStream::pair().unwrap();
        let mut bare = error_reply(7, 2, 0);
        crate_side.write_all(&bare).unwrap();
        let ok_reply = {
            let mut h = error_reply(8, 2, 0);
            h[8..12].copy_from_slice(&TYPE_REPLY.to_le_bytes());
            h
        };
        crate_side.write_all(&ok_reply).unwrap();
        drop(crate_side);
        pump_replies(inner, &Mutex::new(client_near), &Handshake::default());
        let mut got = [0u8; 2 * HEADER];
        (&client_far).read_exact(&mut got).unwrap();
        bare[12..16].copy_from_slice(&(libc::EINVAL as u32).to_le_bytes());
        assert_eq!(&got[..HEADER], &bare, "errno filled in");
        assert_eq!(&got[HEADER..], &ok_reply, "success untouched");
    }

    #[test]
    fn requests_wait_for_a_successful_version() {
        let hs = Handshake::default();
        let info = msg(cmd::DEVICE_GET_INFO, 0, &[0; 16], 0);
        let version = msg(cmd::VERSION, 0, &[], 0);
        assert!(
            matches!(hs.admit(&info), Err(WireError::Violation(s)) if s.contains("before the VERSION"))
        );
        hs.admit(&version).unwrap();
        hs.reply(cmd::VERSION, true);
        assert!(
            matches!(hs.admit(&info), Err(WireError::Violation(s)) if s.contains("failed VERSION"))
        );
        hs.admit(&version).unwrap();
        hs.reply(cmd::VERSION, false);
        hs.admit(&info).unwrap();
    }

    #[test]
    fn version_payload_must_be_one_nul_terminated_string() {
        let good = [&[0, 0, 0, 0][..], b"{\"capabilities\":{}}\0"].concat();
        assert_eq!(
            check(&msg(cmd::VERSION, 0, &good, 0)).unwrap(),
            Verdict::Forward
        );
        for bad in [&b""[..], b"\0\0", b"\0\0\0\0{}", b"\0\0\0\0{\0}\0"] {
            assert!(violation(&msg(cmd::VERSION, 0, bad, 0)).contains("NUL"));
        }
    }

    #[test]
    fn fixed_sizes_fds_and_types_are_enforced() {
        assert_eq!(
            check(&msg(cmd::DEVICE_RESET, 0, &[], 0)).unwrap(),
            Verdict::Forward
        );
        assert!(violation(&msg(cmd::DEVICE_RESET, 0, &[0; 4], 0)).contains("expected 16"));
        assert!(violation(&msg(cmd::DEVICE_GET_INFO, 0, &[0; 16], 1)).contains("descriptors"));
        assert!(violation(&msg(cmd::DEVICE_GET_INFO, 1, &[0; 16], 0)).contains("requests"));
        assert!(violation(&msg(99, 0, &[], 0)).contains("unknown command 99"));
        assert!(violation(&msg(0, 0, &[], 0)).contains("unknown command 0"));
        // No-reply requests are fine.
        assert_eq!(
            check(&msg(cmd::DEVICE_GET_INFO, FLAG_NO_REPLY, &[0; 16], 0)).unwrap(),
            Verdict::Forward
        );
    }

    #[test]
    fn region_access_lengths_are_bounded_and_consistent() {
        let rw = |count: u32, data: usize| {
            let mut b = vec![0u8; 16];
            b[12..16].copy_from_slice(&count.to_le_bytes());
            b.extend(std::iter::repeat_n(0u8, data));
            b
        };
        assert_eq!(
            check(&msg(cmd::REGION_WRITE, 0, &rw(4, 4), 0)).unwrap(),
            Verdict::Forward
        );
        assert!(violation(&msg(cmd::REGION_WRITE, 0, &rw(8, 4), 0)).contains("8 data bytes"));
        assert!(violation(&msg(cmd::REGION_READ, 0, &rw(MAX_DATA + 1, 0), 0)).contains("read"));
        assert_eq!(
            check(&msg(cmd::REGION_READ, 0, &rw(256, 0), 0)).unwrap(),
            Verdict::Forward
        );
    }

    #[test]
    fn dma_map_without_fd_and_optional_commands_are_refused_not_fatal() {
        let mut rw = [0u8; 32];
        rw[4] = 3; // READ | WRITE
        assert!(matches!(
            check(&msg(cmd::DMA_MAP, 0, &rw, 0)).unwrap(),
            Verdict::Refuse(libc::EINVAL, s) if s.contains("without a file descriptor")
        ));
        // A read-only one (a ROM) is the backend's to ignore.
        assert_eq!(
            check(&msg(cmd::DMA_MAP, 0, &[0; 32], 0)).unwrap(),
            Verdict::Forward
        );
        assert_eq!(
            check(&msg(cmd::DMA_MAP, 0, &[0; 32], 1)).unwrap(),
            Verdict::Forward
        );
        assert!(violation(&msg(cmd::DMA_MAP, 0, &[0; 32], 2)).contains("2 file descriptors"));
        assert!(matches!(
            check(&msg(cmd::GET_REGION_IO_FDS, 0, &[0; 16], 0)).unwrap(),
            Verdict::Refuse(libc::ENOTSUP, _)
        ));
    }

    #[test]
    fn framing_rejects_bad_sizes_and_reports_truncation() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        // Size 8 is smaller than a header.
        let mut h = [0u8; HEADER];
        h[2] = cmd::DEVICE_RESET as u8;
        h[4] = 8;
        a.write_all(&h).unwrap();
        assert!(matches!(read_message(&mut b), Err(WireError::Violation(_))));
        // A REGION_WRITE announced with 100 bytes, 10 sent, then EOF.
        h[2] = cmd::REGION_WRITE as u8;
        h[4] = 100;
        a.write_all(&h).unwrap();
        a.write_all(&[0; 10]).unwrap();
        drop(a);
        match read_message(&mut b) {
            Err(WireError::Truncated(c)) => assert_eq!(c, "REGION_WRITE"),
            other => panic!("{:?}", other.map(|m| m.map(|m| m.command))),
        }
        assert!(matches!(read_message(&mut b), Ok(None)));
    }
}
