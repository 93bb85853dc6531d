//! COM1 through vm-superio's 16550 model. Output goes to the VMM's stdout;
//! stdin is fed into the receive FIFO by the event loop. The interrupt line
//! is an irqfd on GSI 4, so the guest may poll or take IRQ 4.

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_LEN: u64 = 8;
pub const COM1_GSI: u32 = 4;

pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub type SerialDevice = Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>;

pub struct SerialPort(pub SerialDevice);

impl BusDevice for SerialPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = u8::try_from(offset).map_or(0xff, |o| self.0.read(o));
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(o), Some(&b)) = (u8::try_from(offset), data.first()) {
            if let Err(e) = self.0.write(o, b) {
                log::warn!("serial: {e:?}");
            }
        }
    }
}
