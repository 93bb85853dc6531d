//! The VMM's stdout (the guest's console) and stderr (log records, error
//! lines, `--stats`), each written by a thread of its own.
//!
//! Rule: no vCPU, device or event-loop thread ever blocks on stdout or
//! stderr. They append to a bounded buffer and go on; only the stream's
//! writer thread calls write(2). A reader that stalls or a stream that
//! fails (`>/dev/full`, a closed pipe) therefore cannot freeze the guest or
//! keep `--timeout` from firing, and a guest cannot grow the buffers
//! without bound:
//! - log records beyond `LOG_BUFFER` bytes of backlog are dropped and
//!   counted; error lines and `--stats` (a bounded number, written by the
//!   VMM itself) are always queued;
//! - console bytes beyond `CONSOLE_BUFFER` of backlog are dropped and
//!   counted;
//! - after a write error the stream is closed: one line on stderr says so
//!   (for stdout) and everything after it is dropped and counted.
//!
//! At exit `flush` waits for the writer while it makes progress, and gives
//! up after `STALL` without any.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use faultline_device::sync::lock;

/// Backlog of log records on stderr before further records are dropped.
pub const LOG_BUFFER: usize = 64 << 10;
/// Backlog of console output before further bytes are dropped: about ten
/// seconds of the guest's fastest serial output.
pub const CONSOLE_BUFFER: usize = 1 << 20;
/// How long `flush` waits without the writer making any progress.
pub const STALL: Duration = Duration::from_secs(2);
/// A partial console line is written after this long without a newline.
const PARTIAL_LINE: Duration = Duration::from_millis(50);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Which {
    Stdout,
    Stderr,
}

/// What a stream dropped, for `--stats` and the exit lines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Pushes dropped (log records, or console writes).
    pub items: u64,
    pub bytes: u64,
}

#[derive(Default)]
struct State {
    buf: VecDeque<u8>,
    /// Something worth writing now (a newline, a large backlog, a flush).
    ready: bool,
    /// The writer holds a chunk it is writing.
    busy: bool,
    written: u64,
    dropped: Dropped,
    /// The stream failed; everything is dropped from then on.
    failed: Option<String>,
}

pub struct Stream {
    which: Which,
    cap: usize,
    state: Mutex<State>,
    /// Wakes the writer.
    more: Condvar,
    /// Wakes `flush` when the writer made progress.
    progress: Condvar,
}

impl Stream {
    fn new(which: Which, cap: usize) -> Self {
        Self {
            which,
            cap,
            state: Mutex::new(State::default()),
            more: Condvar::new(),
            progress: Condvar::new(),
        }
    }

    /// Queues `data`; `droppable` data is dropped (and counted) once the
    /// backlog is at the cap. Never blocks on the stream.
    fn push(&self, data: &[u8], droppable: bool) {
        let mut s = lock(&self.state);
        if s.failed.is_some() || (droppable && s.buf.len() + data.len() > self.cap) {
            s.dropped.items += 1;
            s.dropped.bytes += data.len() as u64;
            return;
        }
        s.buf.extend(data);
        if !s.ready && (data.contains(&b'\n') || s.buf.len() >= 4096) {
            s.ready = true;
            self.more.notify_one();
        }
    }

    fn writer(&self) {
        let mut s = lock(&self.state);
        loop {
            let mut waited = Duration::ZERO;
            while s.buf.is_empty() || !(s.ready || waited >= PARTIAL_LINE) {
                let t0 = Instant::now();
                s = self
                    .more
                    .wait_timeout(s, PARTIAL_LINE)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                waited = if s.buf.is_empty() {
                    Duration::ZERO
                } else {
                    waited + t0.elapsed()
                };
            }
            let chunk: Vec<u8> = s.buf.drain(..).collect();
            s.ready = false;
            s.busy = true;
            drop(s);
            let result = match self.which {
                Which::Stdout => {
                    let mut o = std::io::stdout().lock();
                    o.write_all(&chunk).and_then(|()| o.flush())
                }
                Which::Stderr => std::io::stderr().lock().write_all(&chunk),
            };
            s = lock(&self.state);
            s.busy = false;
            match result {
                Ok(()) => s.written += chunk.len() as u64,
                Err(e) => {
                    s.dropped.items += 1;
                    s.dropped.bytes += (chunk.len() + s.buf.len()) as u64;
                    s.buf.clear();
                    s.failed = Some(e.to_string());
                    if self.which == Which::Stdout {
                        line(&format!(
                            "stdout: {e}; the guest's console output is dropped from here on"
                        ));
                    }
                }
            }
            self.progress.notify_all();
            if s.failed.is_some() {
                // Nothing more will be written; later pushes are counted.
                return;
            }
        }
    }

    /// Waits until everything queued is written, the stream failed, or the
    /// writer made no progress for `STALL`. True if the backlog is gone.
    fn flush(&self) -> bool {
        let mut s = lock(&self.state);
        s.ready = true;
        self.more.notify_one();
        let mut last = (s.written, Instant::now());
        while s.failed.is_none() && (s.busy || !s.buf.is_empty()) {
            if s.written != last.0 {
                last = (s.written, Instant::now());
            }
            let Some(left) = STALL.checked_sub(last.1.elapsed()) else {
                return false;
            };
            s = self
                .progress
                .wait_timeout(s, left.min(Duration::from_millis(100)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        s.failed.is_none()
    }

    fn report(&self) -> (Dropped, usize, Option<String>) {
        let s = lock(&self.state);
        (s.dropped, s.buf.len(), s.failed.clone())
    }
}

struct Outputs {
    stdout: Stream,
    stderr: Stream,
}

static OUTPUTS: OnceLock<Outputs> = OnceLock::new();

fn outputs() -> &'static Outputs {
    OUTPUTS.get_or_init(|| Outputs {
        stdout: Stream::new(Which::Stdout, CONSOLE_BUFFER),
        stderr: Stream::new(Which::Stderr, LOG_BUFFER),
    })
}

/// Starts both writer threads; call once, before any output.
pub fn init() {
    let o = outputs();
    for (name, stream) in [("stdout", &o.stdout), ("stderr", &o.stderr)] {
        let spawned = std::thread::Builder::new()
            .name(format!("{name}-writer"))
            .spawn(move || stream.writer());
        if let Err(e) = spawned {
            // Without a writer nothing reaches the stream; say so the only
            // way left.
            let _ = writeln!(std::io::stderr(), "faultline: no {name} writer thread: {e}");
        }
    }
}

/// One line on stderr, prefixed `faultline: `, never dropped for backlog.
pub fn line(msg: &str) {
    outputs()
        .stderr
        .push(format!("faultline: {msg}\n").as_bytes(), false);
}

/// A line on stderr as it is (a `--stats` table row), never dropped for
/// backlog.
pub fn text(msg: &str) {
    outputs().stderr.push(format!("{msg}\n").as_bytes(), false);
}

/// A log record: dropped (and counted) when stderr is backed up.
pub fn log_line(msg: &str) {
    outputs()
        .stderr
        .push(format!("faultline: {msg}\n").as_bytes(), true);
}

/// The guest's console output (COM1 transmit), as a `Write` for the UART
/// model: it never blocks and never fails, so the guest never sees host
/// trouble; what cannot be written is counted.
pub struct Console;

impl Write for Console {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        crate::results::feed(data);
        outputs().stdout.push(data, true);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What both streams dropped so far: (console, log records).
pub fn dropped() -> (Dropped, Dropped) {
    let o = outputs();
    (o.stdout.report().0, o.stderr.report().0)
}

/// Writes out the console, then says on stderr what was lost, if anything.
/// Call once the guest is stopped, before the exit lines and `--stats`.
pub fn finish_console() {
    let o = outputs();
    let drained = o.stdout.flush();
    let (dropped, left, failed) = o.stdout.report();
    if !drained && failed.is_none() {
        line(&format!(
            "stdout made no progress for {} s: {left} bytes of console output not written",
            STALL.as_secs()
        ));
    }
    if failed.is_none() && dropped.bytes > 0 {
        line(&format!(
            "stdout did not keep up: {} bytes of console output dropped",
            dropped.bytes
        ));
    }
}

/// Says how many log records were dropped, then writes out stderr. Call
/// last, just before the process exits.
pub fn finish_stderr() {
    let o = outputs();
    let (dropped, _, _) = o.stderr.report();
    if dropped.items > 0 {
        line(&format!(
            "{} log records dropped: stderr did not keep up",
            dropped.items
        ));
    }
    o.stderr.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn droppable_data_stops_at_the_cap_and_is_counted() {
        let s = Stream::new(Which::Stderr, 10);
        s.push(b"12345678", true);
        s.push(b"abc", true);
        s.push(b"must", false);
        let st = lock(&s.state);
        assert_eq!(st.buf.len(), 12, "the forced line went in");
        assert_eq!(st.dropped, Dropped { items: 1, bytes: 3 });
    }

    #[test]
    fn a_failed_stream_drops_everything_after() {
        let s = Stream::new(Which::Stderr, 10);
        lock(&s.state).failed = Some("EPIPE".into());
        s.push(b"x", false);
        assert_eq!(lock(&s.state).dropped.items, 1);
        assert!(!s.flush(), "a failed stream reports not drained");
    }
}
