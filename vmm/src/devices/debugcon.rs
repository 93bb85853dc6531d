//! The debug console on port 0xe9 (Bochs/QEMU `isa-debugcon`): every byte
//! written goes to stdout as is; a read returns 0xe9, which is how a guest
//! tells the port is there. A guest prints a whole buffer with one
//! `rep outsb`: one VM exit per byte on this host (COM1 costs two), one per
//! string where KVM passes the string in one exit. The firmware uses it
//! only where the line console (`linecon`) is missing: under QEMU.

use std::io::Write;

use crate::bus::BusDevice;

pub const DEBUGCON_PORT: u16 = 0xe9;
pub const DEBUGCON_LEN: u64 = 1;
/// What a read of the port returns (QEMU's default `readback`).
pub const DEBUGCON_READBACK: u8 = 0xe9;

pub struct DebugCon {
    out: Box<dyn Write + Send>,
}

impl DebugCon {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self { out }
    }
}

impl BusDevice for DebugCon {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = DEBUGCON_READBACK;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        // Like COM1 output: a closed stdout loses the console, not the VM.
        let _ = self.out.write_all(data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::Sink;

    #[test]
    fn bytes_pass_through_and_reads_identify_the_port() {
        let sink = Sink::default();
        let mut d = DebugCon::new(Box::new(sink.clone()));
        for b in b"ok\n".chunks(1) {
            d.write(0, b);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"ok\n");
        let mut r = [0u8; 1];
        d.read(0, &mut r);
        assert_eq!(r, [0xe9]);
    }
}
