//! The console: the debug console on port 0xe9 where the hypervisor has one
//! (faultline's VMM; QEMU with `-device isa-debugcon,iobase=0xe9`), COM1
//! (16550) otherwise, and the `log` backend on top of it.
//!
//! Every port access is a VM exit (~27,000 cycles here), so output is
//! formatted into a line buffer first and leaves in one piece per `print`
//! call (or per full buffer): one `rep outsb` on the debug console (this
//! host's KVM exits once per byte of it, half of COM1's status poll plus
//! data write; KVM may also pass the whole string in one exit); on COM1 one
//! byte per `out` but the transmitter is polled once per 16 bytes (its FIFO
//! depth) instead of once per byte.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

use crate::arch::port::{inb, outb};
use crate::sync::Mutex;

const COM1: u16 = 0x3f8;
const LSR_THR_EMPTY: u8 = 1 << 5;
/// With the FIFO on (FCR bit 0), "THR empty" means the 16-byte transmit
/// FIFO is empty.
const TX_FIFO_DEPTH: usize = 16;
/// A missing or wedged UART must not hang boot: give up on a byte after this
/// many polls (far longer than one byte takes at 115200 baud).
const THR_POLL_LIMIT: u32 = 1_000_000;

/// Bochs/QEMU debug console: bytes written appear as is; a read returns
/// 0xe9 when it is there (an absent port reads as 0xff).
const DEBUGCON: u16 = 0xe9;
const DEBUGCON_READBACK: u8 = 0xe9;

/// Bytes formatted before they go out; longer output leaves in pieces.
const LINE: usize = 256;

/// Set by `init` when the debug console answers.
static USE_DEBUGCON: AtomicBool = AtomicBool::new(false);

pub struct Serial {
    base: u16,
}

impl Serial {
    /// # Safety
    /// `base` must be a 16550-compatible UART (or nothing) that no one else drives.
    const unsafe fn new(base: u16) -> Self {
        Serial { base }
    }

    fn init(&mut self) {
        // SAFETY: standard 16550 init sequence on the UART we own.
        unsafe {
            outb(self.base + 1, 0x00); // no interrupts: we poll
            outb(self.base + 3, 0x80); // DLAB on to set the divisor
            outb(self.base, 0x01); // 115200 baud
            outb(self.base + 1, 0x00);
            outb(self.base + 3, 0x03); // 8N1, DLAB off
            outb(self.base + 2, 0xc7); // FIFO on, cleared, 14-byte threshold
            outb(self.base + 4, 0x03); // DTR | RTS, OUT2 off (no IRQ)
        }
    }

    fn wait_tx_empty(&self) {
        for _ in 0..THR_POLL_LIMIT {
            // SAFETY: LSR read has no side effects on a 16550.
            if unsafe { inb(self.base + 5) } & LSR_THR_EMPTY != 0 {
                return;
            }
            core::hint::spin_loop();
        }
    }

    /// Sends `bytes` as they are (the line buffer already turned "\n" into
    /// "\r\n" for COM1).
    fn send(&mut self, bytes: &[u8]) {
        if USE_DEBUGCON.load(Ordering::Relaxed) {
            // SAFETY: a string write to the debug console, which has no
            // side effects on guest memory; RSI/RCX cover `bytes` exactly
            // and DF is clear (ABI).
            unsafe {
                core::arch::asm!(
                    "rep outsb",
                    in("dx") DEBUGCON,
                    inout("rsi") bytes.as_ptr() => _,
                    inout("rcx") bytes.len() => _,
                    options(nostack, preserves_flags, readonly)
                );
            }
            return;
        }
        for chunk in bytes.chunks(TX_FIFO_DEPTH) {
            self.wait_tx_empty();
            for &b in chunk {
                // SAFETY: THR write sends one byte on the UART we own.
                unsafe { outb(self.base, b) };
            }
        }
    }
}

/// Formats into a fixed buffer and hands it to the console when full and
/// when dropped, so one `print` is one burst of port writes.
struct LineBuf<'a> {
    out: &'a mut Serial,
    buf: [u8; LINE],
    len: usize,
    crlf: bool,
}

impl<'a> LineBuf<'a> {
    fn new(out: &'a mut Serial) -> Self {
        LineBuf {
            out,
            buf: [0; LINE],
            len: 0,
            // The debug console is a byte stream to a file; a UART drives a
            // terminal, which wants "\r\n".
            crlf: !USE_DEBUGCON.load(Ordering::Relaxed),
        }
    }

    fn flush(&mut self) {
        if self.len > 0 {
            self.out.send(&self.buf[..self.len]);
            self.len = 0;
        }
    }

    fn push(&mut self, b: u8) {
        if self.len == LINE {
            self.flush();
        }
        self.buf[self.len] = b;
        self.len += 1;
    }
}

impl Write for LineBuf<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for line in s.split_inclusive('\n') {
            let (text, nl) = match line.strip_suffix('\n') {
                Some(t) => (t.as_bytes(), true),
                None => (line.as_bytes(), false),
            };
            let mut rest = text;
            while !rest.is_empty() {
                if self.len == LINE {
                    self.flush();
                }
                let n = rest.len().min(LINE - self.len);
                self.buf[self.len..self.len + n].copy_from_slice(&rest[..n]);
                self.len += n;
                rest = &rest[n..];
            }
            if nl {
                if self.crlf {
                    self.push(b'\r');
                }
                self.push(b'\n');
            }
        }
        Ok(())
    }
}

impl Drop for LineBuf<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}

static CONSOLE: Mutex<Serial> = Mutex::new(
    // SAFETY: COM1 is driven only through this lock (and the panic path below).
    unsafe { Serial::new(COM1) },
);

pub fn init() {
    // SAFETY: reading 0xe9 has no side effects: the debug console answers
    // with its readback byte, an unclaimed port with all-ones.
    let debugcon = unsafe { inb(DEBUGCON) } == DEBUGCON_READBACK;
    USE_DEBUGCON.store(debugcon, Ordering::Relaxed);
    let mut c = CONSOLE.lock();
    c.init();
    // Firmware before us (SeaBIOS) may leave the cursor mid-line; start clean
    // so our first line is a whole line for anyone parsing the log.
    let _ = LineBuf::new(&mut c).write_str("\n");
    drop(c);
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
}

/// Whether output goes to the debug console (port 0xe9) rather than COM1.
pub fn uses_debugcon() -> bool {
    USE_DEBUGCON.load(Ordering::Relaxed)
}

pub fn print(args: fmt::Arguments<'_>) {
    let mut c = CONSOLE.lock();
    let _ = LineBuf::new(&mut c).write_fmt(args);
}

/// Printing from panic/exception context: the console lock may be held by the
/// code that faulted, so bypass it. Interleaved output beats a silent hang.
pub fn print_emergency(args: fmt::Arguments<'_>) {
    // SAFETY: only used on the way to exit(); the UART tolerates a concurrent
    // writer (worst case, mixed bytes).
    let mut s = unsafe { Serial::new(COM1) };
    let _ = LineBuf::new(&mut s).write_fmt(args);
}

#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::serial::print(format_args!($($arg)*)) };
}

#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::serial::print(format_args!("{}\n", format_args!($($arg)*))) };
}

struct Logger;
static LOGGER: Logger = Logger;

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            let level = match record.level() {
                log::Level::Error => "ERROR",
                log::Level::Warn => "WARN ",
                log::Level::Info => "INFO ",
                log::Level::Debug => "DEBUG",
                log::Level::Trace => "TRACE",
            };
            print(format_args!("[{level}] {}\n", record.args()));
        }
    }

    fn flush(&self) {}
}
