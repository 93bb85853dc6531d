//! PCI configuration mechanism #1 (ports 0xCF8/0xCFC) on bus 0, with a host
//! bridge at 00:00.0. Functions plug in through `PciFunction`; the GPU's
//! config space (device crate) is one of them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use faultline_device::sync::lock;

use crate::bus::BusDevice;

pub const CONFIG_ADDRESS_PORT: u16 = 0xcf8;
/// CONFIG_ADDRESS (4 bytes) followed by CONFIG_DATA (4 bytes).
pub const CONFIG_PORTS_LEN: u64 = 8;

/// One PCI function's configuration space. Accesses are 1, 2 or 4 bytes
/// within one dword; `offset` is the byte offset in the 256-byte space.
pub trait PciFunction: Send {
    fn config_read(&mut self, offset: u64, data: &mut [u8]);
    fn config_write(&mut self, offset: u64, data: &[u8]);
}

/// Device/function address on bus 0: device 0..32, function 0..8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Devfn(pub u8);

impl Devfn {
    pub fn new(device: u8, function: u8) -> Option<Self> {
        (device < 32 && function < 8).then_some(Devfn((device << 3) | function))
    }
}

/// The host bridge: identity and class only; everything else reads zero.
struct HostBridge;

impl PciFunction for HostBridge {
    fn config_read(&mut self, offset: u64, data: &mut [u8]) {
        // Red Hat's generic PCIe host bridge ID, as QEMU's GPEX uses.
        let dword: u32 = match offset & !3 {
            0x00 => 0x0008_1b36,
            0x08 => 0x0600_0000, // class: bridge / host bridge
            _ => 0,
        };
        let bytes = (dword >> ((offset & 3) * 8)).to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    fn config_write(&mut self, _offset: u64, _data: &[u8]) {}
}

pub struct PciBus {
    functions: BTreeMap<Devfn, Arc<Mutex<dyn PciFunction>>>,
}

impl Default for PciBus {
    fn default() -> Self {
        Self::new()
    }
}

impl PciBus {
    pub fn new() -> Self {
        let mut functions: BTreeMap<Devfn, Arc<Mutex<dyn PciFunction>>> = BTreeMap::new();
        functions.insert(Devfn(0), Arc::new(Mutex::new(HostBridge)));
        Self { functions }
    }

    /// Returns false if the slot is taken.
    pub fn add(&mut self, devfn: Devfn, f: Arc<Mutex<dyn PciFunction>>) -> bool {
        if self.functions.contains_key(&devfn) {
            return false;
        }
        self.functions.insert(devfn, f);
        true
    }

    fn function(&self, devfn: Devfn) -> Option<&Arc<Mutex<dyn PciFunction>>> {
        self.functions.get(&devfn)
    }
}

/// The 0xCF8/0xCFC port pair.
pub struct PciConfigIo {
    bus: PciBus,
    address: u32,
}

impl PciConfigIo {
    pub fn new(bus: PciBus) -> Self {
        Self { bus, address: 0 }
    }

    /// The function and register CONFIG_ADDRESS selects, if enabled and on
    /// bus 0 (the only bus there is).
    fn target(&self, data_offset: u64) -> Option<(Devfn, u64)> {
        let a = self.address;
        if a & 0x8000_0000 == 0 || (a >> 16) & 0xff != 0 {
            return None;
        }
        let devfn = Devfn(((a >> 8) & 0xff) as u8);
        Some((devfn, u64::from(a & 0xfc) + data_offset))
    }

    /// The selected function and register for a CONFIG_DATA access of `len`
    /// bytes at `data_offset`, unless it is disabled, empty, or would cross
    /// the dword.
    fn selected(
        &self,
        data_offset: u64,
        len: usize,
    ) -> Option<(&Arc<Mutex<dyn PciFunction>>, u64)> {
        let (devfn, reg) = self.target(data_offset)?;
        if reg % 4 + len as u64 > 4 {
            return None;
        }
        Some((self.bus.function(devfn)?, reg))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        match offset {
            0..=3 => {
                let bytes = (self.address >> (offset * 8)).to_le_bytes();
                let n = data.len().min(4 - offset as usize);
                data[..n].copy_from_slice(&bytes[..n]);
            }
            4..=7 => {
                if let Some((f, reg)) = self.selected(offset - 4, data.len()) {
                    lock(f).config_read(reg, data);
                }
            }
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            // Only a full dword write sets CONFIG_ADDRESS; narrower writes to
            // 0xCF8 belong to other (legacy) uses and are ignored.
            0 if data.len() == 4 => {
                self.address = u32::from_le_bytes(data.try_into().unwrap()) & 0x80ff_fffc;
            }
            4..=7 => {
                if let Some((f, reg)) = self.selected(offset - 4, data.len()) {
                    lock(f).config_write(reg, data);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Regs([u8; 256]);

    impl PciFunction for Regs {
        fn config_read(&mut self, offset: u64, data: &mut [u8]) {
            let o = offset as usize;
            data.copy_from_slice(&self.0[o..o + data.len()]);
        }
        fn config_write(&mut self, offset: u64, data: &[u8]) {
            let o = offset as usize;
            self.0[o..o + data.len()].copy_from_slice(data);
        }
    }

    fn addr(dev: u8, func: u8, reg: u8) -> [u8; 4] {
        (0x8000_0000u32 | (u32::from(dev) << 11) | (u32::from(func) << 8) | u32::from(reg))
            .to_le_bytes()
    }

    fn read32(io: &mut PciConfigIo, dev: u8, reg: u8) -> u32 {
        io.write(0, &addr(dev, 0, reg));
        let mut d = [0u8; 4];
        io.read(4, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn host_bridge_and_empty_slots() {
        let mut io = PciConfigIo::new(PciBus::new());
        assert_eq!(read32(&mut io, 0, 0), 0x0008_1b36);
        assert_eq!(read32(&mut io, 0, 8) >> 16, 0x0600);
        assert_eq!(
            read32(&mut io, 3, 0),
            0xffff_ffff,
            "empty slot reads all ones"
        );
    }

    #[test]
    fn function_sees_byte_offsets_and_sub_dword_access() {
        let mut bus = PciBus::new();
        let f = Arc::new(Mutex::new(Regs([0; 256])));
        assert!(bus.add(Devfn::new(4, 0).unwrap(), f.clone()));
        assert!(!bus.add(Devfn::new(4, 0).unwrap(), f.clone()), "slot taken");
        let mut io = PciConfigIo::new(bus);
        io.write(0, &addr(4, 0, 0x3c));
        io.write(5, &[0xab]); // byte 0x3d
        assert_eq!(f.lock().unwrap().0[0x3d], 0xab);
        io.write(6, &[0x34, 0x12]); // word at 0x3e
        assert_eq!(read32(&mut io, 4, 0x3c), 0x1234_ab00);
        // CONFIG_ADDRESS reads back without the reserved low bits.
        let mut a = [0u8; 4];
        io.read(0, &mut a);
        assert_eq!(a, addr(4, 0, 0x3c));
    }

    #[test]
    fn disabled_or_other_bus_reads_ones_and_ignores_writes() {
        let mut bus = PciBus::new();
        let f = Arc::new(Mutex::new(Regs([0; 256])));
        bus.add(Devfn::new(1, 0).unwrap(), f.clone());
        let mut io = PciConfigIo::new(bus);
        io.write(0, &((1u32 << 11) | 0x10).to_le_bytes()); // enable bit clear
        io.write(4, &[1, 2, 3, 4]);
        let mut d = [0u8; 4];
        io.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
        io.write(0, &(0x8001_0000u32 | (1 << 11)).to_le_bytes()); // bus 1
        io.write(4, &[1, 2, 3, 4]);
        assert!(f.lock().unwrap().0.iter().all(|&b| b == 0));
        // A word access at offset 3 of the data window would cross the dword.
        io.write(0, &addr(1, 0, 0));
        io.write(7, &[9, 9]);
        assert!(f.lock().unwrap().0.iter().all(|&b| b == 0));
    }
}
