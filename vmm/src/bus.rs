//! A small address-range bus for PIO and MMIO exits: vCPU threads look up
//! the device that owns an address and call it with the offset into its range.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable through port or memory-mapped I/O. The offset is
/// relative to the start of the range the device was inserted at.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusRange {
    pub base: u64,
    pub len: u64,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    #[error("bus range {0:#x}+{1:#x} is empty or wraps")]
    Invalid(u64, u64),
    #[error("bus range {0:#x}+{1:#x} overlaps an existing device")]
    Overlap(u64, u64),
}

#[derive(Default, Clone)]
pub struct Bus {
    devices: BTreeMap<u64, (BusRange, Arc<Mutex<dyn BusDevice>>)>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::Invalid(base, len))?;
        // Neighbours are the closest range starting below `end`; ranges are
        // disjoint, so checking that one is enough.
        if let Some((_, (r, _))) = self.devices.range(..end).next_back() {
            if r.base + r.len > base {
                return Err(BusError::Overlap(base, len));
            }
        }
        self.devices.insert(base, (BusRange { base, len }, device));
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &Arc<Mutex<dyn BusDevice>>)> {
        let (_, (range, dev)) = self.devices.range(..=addr).next_back()?;
        let offset = addr - range.base;
        // An access that straddles the end of the range does not belong to
        // the device: treat it as unclaimed rather than hand it a short range.
        if offset.checked_add(size as u64)? <= range.len {
            Some((offset, dev))
        } else {
            None
        }
    }

    /// Returns false when no device claims the access; the data is then
    /// filled with all-ones, as an open bus reads on real hardware.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// A device that panicked while holding its lock has already reported the
/// bug; the VM keeps going with whatever state it left.
fn lock<'a>(
    dev: &'a Mutex<dyn BusDevice + 'static>,
) -> std::sync::MutexGuard<'a, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_passes_offset_within_range() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b, [5]);
        assert!(bus.write(0x3f9, &[7]));
        assert_eq!(dev.lock().unwrap().last_write, Some((1, vec![7])));
    }

    #[test]
    fn unclaimed_reads_all_ones_and_straddling_is_unclaimed() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x100, 4)
            .unwrap();
        let mut b = [0u8; 4];
        assert!(!bus.read(0x200, &mut b));
        assert_eq!(b, [0xff; 4]);
        assert!(!bus.read(0x102, &mut b), "4 bytes at 0x102 cross the end");
        assert!(!bus.write(0xff, &[0]));
    }

    #[test]
    fn overlapping_and_empty_ranges_are_rejected() {
        let mut bus = Bus::new();
        let d = || Arc::new(Mutex::new(Recorder::default()));
        bus.insert(d(), 0x100, 0x10).unwrap();
        assert_eq!(bus.insert(d(), 0x10f, 1), Err(BusError::Overlap(0x10f, 1)));
        assert_eq!(bus.insert(d(), 0xf8, 0x9), Err(BusError::Overlap(0xf8, 9)));
        assert_eq!(bus.insert(d(), 0x200, 0), Err(BusError::Invalid(0x200, 0)));
        assert_eq!(
            bus.insert(d(), u64::MAX, 2),
            Err(BusError::Invalid(u64::MAX, 2))
        );
        bus.insert(d(), 0x110, 1).unwrap();
        bus.insert(d(), 0xf0, 0x10).unwrap();
    }
}
