//! The debug-exit port with QEMU isa-debug-exit semantics: a guest write of
//! `v` ends the VM, and QEMU would exit with status `(v << 1) | 1`. The same
//! image thus reports pass/fail identically under both hypervisors.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::vstate::{ExitReason, VmExit};

/// The port QEMU's `-device isa-debug-exit,iobase=0xf4` uses.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
pub const DEBUG_EXIT_LEN: u64 = 4;

pub struct DebugExit {
    exit: Arc<VmExit>,
}

impl DebugExit {
    pub fn new(exit: Arc<VmExit>) -> Self {
        Self { exit }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // QEMU takes the value of the whole access at the base port; an
        // access at another offset in the window is not an exit request.
        if offset != 0 {
            return;
        }
        let mut v = [0u8; 4];
        let n = data.len().min(4);
        v[..n].copy_from_slice(&data[..n]);
        self.exit
            .request(ExitReason::DebugExit(u32::from_le_bytes(v)));
    }
}

/// The status QEMU's isa-debug-exit would give for a written value.
pub fn qemu_status(value: u32) -> u64 {
    (u64::from(value) << 1) | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_requests_exit_with_value() {
        let exit = Arc::new(VmExit::new().unwrap());
        let mut d = DebugExit::new(exit.clone());
        d.write(1, &[9]);
        assert_eq!(exit.reason(), None);
        d.write(0, &[1, 0]);
        assert_eq!(exit.reason(), Some(ExitReason::DebugExit(1)));
        assert_eq!(qemu_status(1), 3);
        assert_eq!(qemu_status(0), 1);
    }

    #[test]
    fn first_exit_reason_wins() {
        let exit = Arc::new(VmExit::new().unwrap());
        let mut d = DebugExit::new(exit.clone());
        d.write(0, &[0]);
        d.write(0, &[2]);
        assert_eq!(exit.reason(), Some(ExitReason::DebugExit(0)));
    }
}
