//! COM1 16550 UART console and the `log` backend on top of it.

use core::fmt::{self, Write};

use crate::arch::port::{inb, outb};
use crate::sync::Mutex;

const COM1: u16 = 0x3f8;
const LSR_THR_EMPTY: u8 = 1 << 5;
/// A missing or wedged UART must not hang boot: give up on a byte after this
/// many polls (far longer than one byte takes at 115200 baud).
const THR_POLL_LIMIT: u32 = 1_000_000;

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

    fn put(&mut self, byte: u8) {
        for _ in 0..THR_POLL_LIMIT {
            // SAFETY: LSR read has no side effects on a 16550.
            if unsafe { inb(self.base + 5) } & LSR_THR_EMPTY != 0 {
                break;
            }
            core::hint::spin_loop();
        }
        // SAFETY: THR write sends one byte on the UART we own.
        unsafe { outb(self.base, byte) };
    }
}

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                self.put(b'\r');
            }
            self.put(b);
        }
        Ok(())
    }
}

static CONSOLE: Mutex<Serial> = Mutex::new(
    // SAFETY: COM1 is driven only through this lock (and the panic path below).
    unsafe { Serial::new(COM1) },
);

pub fn init() {
    let mut c = CONSOLE.lock();
    c.init();
    // Firmware before us (SeaBIOS) may leave the cursor mid-line; start clean
    // so our first line is a whole line for anyone parsing the log.
    let _ = c.write_str("\n");
    drop(c);
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
}

pub fn print(args: fmt::Arguments<'_>) {
    let _ = CONSOLE.lock().write_fmt(args);
}

/// Printing from panic/exception context: the console lock may be held by the
/// code that faulted, so bypass it. Interleaved output beats a silent hang.
pub fn print_emergency(args: fmt::Arguments<'_>) {
    // SAFETY: only used on the way to exit(); the UART tolerates a concurrent
    // writer (worst case, mixed bytes).
    let mut s = unsafe { Serial::new(COM1) };
    let _ = s.write_fmt(args);
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
