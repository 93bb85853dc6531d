//! The console: faultline's line console on port 0xe0 where the VMM has
//! it, else the debug console on port 0xe9 where the hypervisor has one
//! (QEMU with `-device isa-debugcon,iobase=0xe9`), else COM1 (16550); and
//! the `log` backend on top of it.
//!
//! Every port access is a VM exit (~13 µs here) and every guest-kernel
//! instruction ~1 µs, so one `print` formats straight into a page-sized
//! buffer and leaves in one piece when it is done (or when the buffer is
//! full): one 32-bit `out` on the line console, whatever the length (the
//! VMM copies the buffer out of guest memory); one `rep outsb` on the debug
//! console (this host's KVM exits once per byte of it); on COM1 one byte
//! per `out`, with the transmitter polled once per 16 bytes (its FIFO
//! depth). Only COM1 gets "\n" as "\r\n", so only there is the text
//! scanned for newlines.

use core::cell::UnsafeCell;
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicU8, Ordering};

use crate::arch::port::{inb, inl, outb, outl};
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

/// faultline's line console (docs/architecture.md): a 32-bit write of
/// `page | (len - 1)` prints `len` bytes (1..=4096) of the 4 KiB-aligned
/// guest-physical page below 4 GiB; a 32-bit read returns the magic.
const LINECON: u16 = 0xe0;
const LINECON_MAGIC: u32 = u32::from_le_bytes(*b"FLlc");

/// Bytes one `print` formats before they go out; longer output leaves in
/// pieces. One page: the most the line console takes at once.
const LINE: usize = 4096;

#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Sink {
    Com1 = 0,
    DebugCon = 1,
    LineCon = 2,
}

/// Where `print` sends its buffer, set by `init`.
static SINK: AtomicU8 = AtomicU8::new(Sink::Com1 as u8);
/// Where `print_emergency` sends its bytes: the debug console if it
/// answered, else COM1 (it has no page of its own for the line console).
static EMERGENCY_SINK: AtomicU8 = AtomicU8::new(Sink::Com1 as u8);

fn load(s: &AtomicU8) -> Sink {
    match s.load(Ordering::Relaxed) {
        2 => Sink::LineCon,
        1 => Sink::DebugCon,
        _ => Sink::Com1,
    }
}

/// The buffer `print` formats into: page-aligned so the line console can
/// take it by address. It sits in the image, which runs identity-mapped in
/// every address space (a symbol's address is its physical address), and
/// is matched by name into layout.ld's `.stacks`, which is not zeroed: no
/// byte of it is read before `print` wrote it.
#[repr(C, align(4096))]
struct Page(UnsafeCell<[u8; LINE]>);

// SAFETY: only `print` touches it, under the `CONSOLE` lock.
unsafe impl Sync for Page {}

static CONSOLE_PAGE: Page = Page(UnsafeCell::new([0; LINE]));

fn init_com1() {
    // SAFETY: standard 16550 init sequence on COM1, which only this module
    // drives.
    unsafe {
        outb(COM1 + 1, 0x00); // no interrupts: we poll
        outb(COM1 + 3, 0x80); // DLAB on to set the divisor
        outb(COM1, 0x01); // 115200 baud
        outb(COM1 + 1, 0x00);
        outb(COM1 + 3, 0x03); // 8N1, DLAB off
        outb(COM1 + 2, 0xc7); // FIFO on, cleared, 14-byte threshold
        outb(COM1 + 4, 0x03); // DTR | RTS, OUT2 off (no IRQ)
    }
}

fn wait_tx_empty() {
    for _ in 0..THR_POLL_LIMIT {
        // SAFETY: LSR read has no side effects on a 16550.
        if unsafe { inb(COM1 + 5) } & LSR_THR_EMPTY != 0 {
            return;
        }
        core::hint::spin_loop();
    }
}

/// Sends `bytes` as they are (the line buffer already turned "\n" into
/// "\r\n" for COM1). For the line console `bytes` must start a
/// page-aligned buffer below 4 GiB whose virtual address is its physical
/// one, and be at most a page long: `CONSOLE_PAGE` is the only such buffer.
#[inline(never)]
fn send(sink: Sink, bytes: &[u8]) {
    match sink {
        Sink::LineCon => {
            let page = bytes.as_ptr() as u64;
            debug_assert!(page.is_multiple_of(LINE as u64) && page < 1 << 32);
            debug_assert!(!bytes.is_empty() && bytes.len() <= LINE);
            // SAFETY: the VMM reads the bytes named by the word and
            // nothing else; the buffer is ours and unchanged until the
            // `out` returns.
            unsafe { outl(LINECON, page as u32 | (bytes.len() as u32 - 1)) };
        }
        Sink::DebugCon => {
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
        }
        Sink::Com1 => {
            for chunk in bytes.chunks(TX_FIFO_DEPTH) {
                wait_tx_empty();
                for &b in chunk {
                    // SAFETY: THR write sends one byte on COM1, ours.
                    unsafe { outb(COM1, b) };
                }
            }
        }
    }
}

/// `dst.copy_from_slice(src)`, with the short copies most pieces of a
/// line are done in two loads and two stores (overlapping where the
/// length is not a power of two) rather than memcpy's three `rep movs`,
/// which cost ~30 µs whatever the length under an instruction-emulating
/// hypervisor.
#[inline(always)]
fn copy(dst: &mut [u8], src: &[u8]) {
    let n = src.len();
    assert_eq!(dst.len(), n);
    let (d, s) = (dst.as_mut_ptr(), src.as_ptr());
    // SAFETY: every access is an unaligned read of `src` or write of `dst`
    // of 1 to 8 bytes inside their `n` bytes (each pair covers [0, n)).
    unsafe {
        macro_rules! ends {
            ($t:ty) => {{
                let w = size_of::<$t>();
                let (a, b) = (
                    s.cast::<$t>().read_unaligned(),
                    s.add(n - w).cast::<$t>().read_unaligned(),
                );
                d.cast::<$t>().write_unaligned(a);
                d.add(n - w).cast::<$t>().write_unaligned(b);
            }};
        }
        match n {
            0 => {}
            1 => *d = *s,
            2..=3 => ends!(u16),
            4..=7 => ends!(u32),
            8..=16 => ends!(u64),
            _ => dst.copy_from_slice(src),
        }
    }
}

/// Formats into a buffer and hands it to the console when full and when
/// flushed, so one `print` is one burst of port writes.
struct LineBuf<'a> {
    buf: &'a mut [u8],
    len: &'a mut usize,
    sink: Sink,
}

impl LineBuf<'_> {
    fn crlf(&self) -> bool {
        // The other consoles are byte streams to a file; a UART drives a
        // terminal, which wants "\r\n".
        self.sink == Sink::Com1
    }

    fn flush(&mut self) {
        if *self.len > 0 {
            send(self.sink, &self.buf[..*self.len]);
            *self.len = 0;
        }
    }

    /// Appends `bytes`; inline for the common case that they fit, since
    /// under an instruction-emulating hypervisor a call's prologue costs
    /// as much as a short copy.
    #[inline(always)]
    fn push_bytes(&mut self, bytes: &[u8]) {
        let len = *self.len;
        if bytes.len() <= self.buf.len() - len {
            copy(&mut self.buf[len..len + bytes.len()], bytes);
            *self.len = len + bytes.len();
        } else {
            self.push_split(bytes);
        }
    }

    /// `push_bytes` for bytes that do not fit: sends full buffers.
    #[inline(never)]
    fn push_split(&mut self, mut rest: &[u8]) {
        while !rest.is_empty() {
            if *self.len == self.buf.len() {
                self.flush();
            }
            let n = rest.len().min(self.buf.len() - *self.len);
            copy(&mut self.buf[*self.len..*self.len + n], &rest[..n]);
            *self.len += n;
            rest = &rest[n..];
        }
    }

    fn newline(&mut self) {
        self.push_bytes(if self.crlf() { b"\r\n" } else { b"\n" });
    }
}

impl LineBuf<'_> {
    #[inline(always)]
    fn write_bytes(&mut self, bytes: &[u8]) {
        if self.crlf() {
            self.write_crlf(bytes);
        } else {
            self.push_bytes(bytes);
        }
    }

    /// `write_bytes` for COM1: "\n" as "\r\n".
    #[inline(never)]
    fn write_crlf(&mut self, bytes: &[u8]) {
        let mut lines = bytes.split(|&b| b == b'\n');
        if let Some(first) = lines.next() {
            self.push_bytes(first);
        }
        for line in lines {
            self.newline();
            self.push_bytes(line);
        }
    }
}

impl Write for LineBuf<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.write_bytes(s.as_bytes());
        Ok(())
    }
}

/// Bytes of `CONSOLE_PAGE` not sent yet (between prints only what `init`
/// left there).
static CONSOLE: Mutex<usize> = Mutex::new(0);

/// Runs `f` on the console's buffer under its lock, then sends what it
/// wrote.
fn with_console(f: impl FnOnce(&mut LineBuf<'_>)) {
    with_console_buffered(|w| {
        f(w);
        w.flush();
    });
}

/// The console's buffer under its lock, without the final flush: what `f`
/// leaves buffered goes out with the next print.
fn with_console_buffered(f: impl FnOnce(&mut LineBuf<'_>)) {
    let mut len = CONSOLE.lock();
    // SAFETY: the page is only ever touched here, under the lock we hold.
    let buf = unsafe { &mut *CONSOLE_PAGE.0.get() };
    f(&mut LineBuf {
        buf,
        len: &mut len,
        sink: load(&SINK),
    });
}

pub fn init() {
    // SAFETY: reading 0xe0 and 0xe9 has no side effects: a console answers
    // with its magic, an unclaimed port with all-ones.
    let (linecon, debugcon) = unsafe {
        (
            inl(LINECON) == LINECON_MAGIC,
            inb(DEBUGCON) == DEBUGCON_READBACK,
        )
    };
    let emergency = if debugcon { Sink::DebugCon } else { Sink::Com1 };
    if emergency == Sink::Com1 {
        init_com1();
    }
    let sink = if linecon { Sink::LineCon } else { emergency };
    EMERGENCY_SINK.store(emergency as u8, Ordering::Relaxed);
    SINK.store(sink as u8, Ordering::Relaxed);
    // Firmware before us (SeaBIOS) may leave the cursor mid-line; start clean
    // so our first line is a whole line for anyone parsing the log. It
    // leaves with the first print.
    with_console_buffered(|w| w.newline());
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
}

/// Which port the console writes to, for the boot log.
pub fn console_name() -> &'static str {
    match load(&SINK) {
        Sink::LineCon => "line console (port 0xe0)",
        Sink::DebugCon => "debug port 0xe9",
        Sink::Com1 => "COM1",
    }
}

/// Prints `args` and a newline in one burst.
pub fn print_line(args: fmt::Arguments<'_>) {
    with_console(|w| {
        let _ = w.write_fmt(args);
        w.newline();
    });
}

/// Prints `text`, which lives in the image: on the line console straight
/// from where it is, a page per write, when it starts on a page boundary;
/// otherwise like any print. Bytes, not `str`: checking that they are
/// UTF-8 would cost an instruction or so per byte.
pub fn print_static(text: &'static [u8]) {
    with_console(|w| {
        let at = text.as_ptr() as u64;
        if w.sink != Sink::LineCon || !at.is_multiple_of(LINE as u64) || at >= 1 << 32 {
            return w.write_bytes(text);
        }
        // What is buffered (init's newline) goes first.
        w.flush();
        for page in text.chunks(LINE) {
            send(Sink::LineCon, page);
        }
    });
}

/// Printing from panic/exception context: the console lock may be held by the
/// code that faulted, so bypass it (and its page). Interleaved output beats
/// a silent hang.
pub fn print_emergency(args: fmt::Arguments<'_>) {
    let mut buf = [0u8; 256];
    let mut len = 0;
    let mut w = LineBuf {
        buf: &mut buf,
        len: &mut len,
        sink: load(&EMERGENCY_SINK),
    };
    let _ = w.write_fmt(args);
    w.flush();
}

#[macro_export]
macro_rules! println {
    () => { $crate::serial::print_line(format_args!("")) };
    ($($arg:tt)*) => { $crate::serial::print_line(format_args!($($arg)*)) };
}

/// How a log line starts.
fn tag(level: log::Level) -> &'static [u8] {
    match level {
        log::Level::Error => b"[ERROR] ",
        log::Level::Warn => b"[WARN ] ",
        log::Level::Info => b"[INFO ] ",
        log::Level::Debug => b"[DEBUG] ",
        log::Level::Trace => b"[TRACE] ",
    }
}

/// A piece of a line for [`print_parts`].
pub enum Part<'a> {
    Str(&'a str),
    /// In decimal.
    Dec(u64),
    /// In decimal, at least three digits (zeros in front).
    Dec3(u64),
}

/// "00" to "99": `dec` turns two digits into text per division.
const DIGIT_PAIRS: [u8; 200] = {
    let mut t = [0u8; 200];
    let mut i = 0;
    while i < 100 {
        t[2 * i] = b'0' + (i / 10) as u8;
        t[2 * i + 1] = b'0' + (i % 10) as u8;
        i += 1;
    }
    t
};

/// `v` in decimal, zeros in front up to `min_digits` (at most 20), in the
/// tail of `digits`. Two digits a step: boot prints its banner emulated,
/// at ~1 µs an instruction.
pub fn decimal(mut v: u64, min_digits: usize, digits: &mut [u8; 20]) -> &[u8] {
    *digits = [b'0'; 20];
    let mut at = digits.len();
    while v >= 10 {
        let p = (v % 100) as usize * 2;
        v /= 100;
        at -= 2;
        digits[at..at + 2].copy_from_slice(&DIGIT_PAIRS[p..p + 2]);
    }
    // The top pair is at least 10, so what is left is the leading digit,
    // or nothing (or the one "0" of zero).
    if v != 0 || at == digits.len() {
        at -= 1;
        digits[at] = b'0' + v as u8;
    }
    at = at.min(digits.len() - min_digits.clamp(1, 20));
    &digits[at..]
}

impl LineBuf<'_> {
    fn dec(&mut self, v: u64, min_digits: usize) {
        let mut digits = [0; 20];
        self.push_bytes(decimal(v, min_digits, &mut digits));
    }
}

/// `println!` for a line of plain strings and numbers, without core::fmt:
/// its dispatch per piece and argument (`Formatter::pad_integral`, a
/// memcpy per piece) made the boot banner's two lines cost ~4 ms under an
/// instruction-emulating hypervisor. With `level`, a log line at that
/// level (printed only where the level is enabled, as `log` would).
pub fn print_parts(level: Option<log::Level>, parts: &[Part<'_>]) {
    if level.is_some_and(|l| l > log::max_level()) {
        return;
    }
    with_console(|w| {
        if let Some(l) = level {
            w.push_bytes(tag(l));
        }
        for p in parts {
            match *p {
                Part::Str(s) => w.write_bytes(s.as_bytes()),
                Part::Dec(v) => w.dec(v, 1),
                Part::Dec3(v) => w.dec(v, 3),
            }
        }
        w.newline();
    });
}

struct Logger;
static LOGGER: Logger = Logger;

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            with_console(|w| {
                w.push_bytes(tag(record.level()));
                let _ = w.write_fmt(*record.args());
                w.newline();
            });
        }
    }

    fn flush(&self) {}
}
