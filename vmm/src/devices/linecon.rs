//! The line console on port 0xe0, faultline's own: one 32-bit `out` hands
//! the VMM a whole buffer of console output, where the debug console takes
//! a byte per exit on this host. The guest writes `page | (len - 1)`: the
//! guest-physical address of a 4 KiB-aligned buffer below 4 GiB in the
//! upper 20 bits, the length (1 to 4096 bytes) less one in the lower 12.
//! The VMM copies those bytes out of guest memory to the same console as
//! COM1 and port 0xe9. A 32-bit read returns [`LINECON_MAGIC`], which is how
//! the guest tells the port is there (an unclaimed port reads all ones).
//!
//! Guest input: a buffer that is not all guest RAM, a narrower write or a
//! write at another offset is dropped and counted; the first of them is
//! logged, the rest only counted (`console_writes_rejected` in the stats).

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::bus::BusDevice;

pub const LINECON_PORT: u16 = 0xe0;
pub const LINECON_LEN: u64 = 4;
/// What a 32-bit read of the port returns: "FLlc" in memory order.
pub const LINECON_MAGIC: u32 = u32::from_le_bytes(*b"FLlc");
/// Largest buffer one write hands over: one page.
pub const LINECON_MAX: usize = 4096;

/// Writes the VMM refused (see the module documentation), for `--stats`.
static REJECTED: AtomicU64 = AtomicU64::new(0);

pub fn rejected() -> u64 {
    REJECTED.load(Ordering::Relaxed)
}

pub struct LineCon {
    mem: GuestMemoryMmap,
    out: Box<dyn Write + Send>,
    buf: Box<[u8; LINECON_MAX]>,
}

impl LineCon {
    pub fn new(mem: GuestMemoryMmap, out: Box<dyn Write + Send>) -> Self {
        Self {
            mem,
            out,
            buf: Box::new([0; LINECON_MAX]),
        }
    }

    fn reject(&self, why: std::fmt::Arguments<'_>) {
        if REJECTED.fetch_add(1, Ordering::Relaxed) == 0 {
            log::warn!("line console: {why}; dropped (later rejects are only counted)");
        }
    }
}

impl BusDevice for LineCon {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let magic = LINECON_MAGIC.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset).map_or(usize::MAX, |o| o.saturating_add(i));
            *b = magic.get(at).copied().unwrap_or(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(word) = <[u8; 4]>::try_from(data) else {
            return self.reject(format_args!("{}-byte write", data.len()));
        };
        if offset != 0 {
            return self.reject(format_args!("write at offset {offset}"));
        }
        let v = u32::from_le_bytes(word);
        let addr = u64::from(v & !0xfff);
        let len = (v & 0xfff) as usize + 1;
        let buf = &mut self.buf[..len];
        if self.mem.read_slice(buf, GuestAddress(addr)).is_err() {
            return self.reject(format_args!("buffer {addr:#x}+{len:#x} is not guest RAM"));
        }
        // Like COM1 output: a closed stdout loses the console, not the VM.
        let _ = self.out.write_all(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::Sink;

    fn console(ram: u64) -> (LineCon, Sink) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), ram as usize)]).unwrap();
        let sink = Sink::default();
        (LineCon::new(mem, Box::new(sink.clone())), sink)
    }

    fn desc(page: u32, len: u32) -> [u8; 4] {
        (page | (len - 1)).to_le_bytes()
    }

    #[test]
    fn a_write_hands_over_the_buffer_and_reads_identify_the_port() {
        let (mut c, sink) = console(1 << 20);
        c.mem
            .write_slice(b"two\nlines\n", GuestAddress(0x3000))
            .unwrap();
        c.write(0, &desc(0x3000, 4));
        c.write(0, &desc(0x3000, 10));
        assert_eq!(&*sink.0.lock().unwrap(), b"two\ntwo\nlines\n");
        let mut r = [0u8; 4];
        c.read(0, &mut r);
        assert_eq!(u32::from_le_bytes(r), LINECON_MAGIC);
        let mut b = [0u8; 1];
        c.read(3, &mut b);
        assert_eq!(b, [b'c']);
    }

    #[test]
    fn a_whole_page_is_the_longest_buffer() {
        let (mut c, sink) = console(1 << 20);
        c.mem
            .write_slice(&[b'x'; 4096], GuestAddress(0x5000))
            .unwrap();
        c.write(0, &desc(0x5000, 4096));
        assert_eq!(sink.0.lock().unwrap().len(), 4096);
    }

    #[test]
    fn hostile_writes_are_dropped_and_counted() {
        let (mut c, sink) = console(1 << 20);
        let before = rejected();
        c.write(0, &desc(0x20_0000, 1)); // beyond RAM
        c.write(0, &desc(0xffff_f000, 4096)); // at the top of the 32-bit space
        c.write(0, &desc(0x1000, 1)[..2]); // narrow
        c.write(1, &desc(0x1000, 1)); // misplaced
        assert!(rejected() >= before + 4);
        assert!(sink.0.lock().unwrap().is_empty());
        // The last page of RAM is still fine.
        c.write(0, &desc(0xf_f000, 4096));
        assert_eq!(sink.0.lock().unwrap().len(), 4096);
    }
}
