//! A small address-range bus for PIO and MMIO exits: vCPU threads look up
//! the device that owns an address and call it with the offset into its range.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use faultline_device::sync::{lock, unpoisoned};

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
    #[error("no device at {0:#x}")]
    NotFound(u64),
}

type Entry = (BusRange, Arc<Mutex<dyn BusDevice>>);
type Map = BTreeMap<u64, Entry>;

/// Clones share one map: a PCI BAR that the guest moves (a config write on
/// one vCPU) must be seen at its new address by every vCPU thread.
#[derive(Default, Clone)]
pub struct Bus {
    devices: Arc<RwLock<Map>>,
}

fn check_free(map: &Map, base: u64, len: u64) -> Result<(), BusError> {
    let end = base
        .checked_add(len)
        .filter(|_| len > 0)
        .ok_or(BusError::Invalid(base, len))?;
    // Neighbours are the closest range starting below `end`; ranges are
    // disjoint, so checking that one is enough.
    if let Some((_, (r, _))) = map.range(..end).next_back() {
        if r.base + r.len > base {
            return Err(BusError::Overlap(base, len));
        }
    }
    Ok(())
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    // A writer that panicked cannot leave the map half-updated (every
    // update is a single BTreeMap operation after the checks), so a
    // poisoned lock is still consistent.
    fn map(&self) -> std::sync::RwLockReadGuard<'_, Map> {
        unpoisoned(self.devices.read())
    }

    fn map_mut(&self) -> std::sync::RwLockWriteGuard<'_, Map> {
        unpoisoned(self.devices.write())
    }

    pub fn insert(
        &self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let mut map = self.map_mut();
        check_free(&map, base, len)?;
        map.insert(base, (BusRange { base, len }, device));
        Ok(())
    }

    /// Removes the device inserted at exactly `base`; returns its range.
    pub fn remove(&self, base: u64) -> Option<BusRange> {
        self.map_mut().remove(&base).map(|(r, _)| r)
    }

    /// Moves the device at `old_base` to `new_base` (same length) in one
    /// step, so no access sees the device at both or neither address. On
    /// error the device stays where it was.
    pub fn relocate(&self, old_base: u64, new_base: u64) -> Result<(), BusError> {
        let mut map = self.map_mut();
        let (range, dev) = map.remove(&old_base).ok_or(BusError::NotFound(old_base))?;
        if let Err(e) = check_free(&map, new_base, range.len) {
            map.insert(old_base, (range, dev));
            return Err(e);
        }
        let moved = BusRange {
            base: new_base,
            len: range.len,
        };
        map.insert(new_base, (moved, dev));
        Ok(())
    }

    /// The device and the offset into its range. The map lock is released
    /// before the device is called: a device access may itself remap the
    /// bus (a PCI config write moving a BAR), and a vCPU blocked on a
    /// device lock must not hold the map meanwhile.
    fn find(&self, addr: u64, size: usize) -> Option<(u64, Arc<Mutex<dyn BusDevice>>)> {
        let map = self.map();
        let (_, (range, dev)) = map.range(..=addr).next_back()?;
        let offset = addr - range.base;
        // An access that straddles the end of the range does not belong to
        // the device: treat it as unclaimed rather than hand it a short range.
        if offset.checked_add(size as u64)? <= range.len {
            Some((offset, dev.clone()))
        } else {
            None
        }
    }

    /// Returns false when no device claims the access; the data is then
    /// filled with all-ones, as an open bus reads on real hardware.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                lock(&dev).read(offset, data);
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
                lock(&dev).write(offset, data);
                true
            }
            None => false,
        }
    }
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
        let bus = Bus::new();
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b, [5]);
        assert!(bus.write(0x3f9, &[7]));
        assert_eq!(dev.lock().unwrap().last_write, Some((1, vec![7])));
    }

    #[test]
    fn unclaimed_reads_all_ones_and_straddling_is_unclaimed() {
        let bus = Bus::new();
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
        let bus = Bus::new();
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

    #[test]
    fn remove_and_relocate_are_seen_by_clones() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let bus = Bus::new();
        let vcpu_view = bus.clone();
        bus.insert(dev.clone(), 0x1000, 0x100).unwrap();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x3000, 0x100)
            .unwrap();
        assert!(vcpu_view.write(0x1004, &[1]));

        bus.relocate(0x1000, 0x2000).unwrap();
        assert!(!vcpu_view.write(0x1004, &[2]), "old range is gone");
        assert!(vcpu_view.write(0x2008, &[3]));
        assert_eq!(dev.lock().unwrap().last_write, Some((8, vec![3])));

        // A move onto another device or off the end fails and keeps the
        // device where it was.
        assert_eq!(
            bus.relocate(0x2000, 0x2f80),
            Err(BusError::Overlap(0x2f80, 0x100))
        );
        assert_eq!(
            bus.relocate(0x2000, u64::MAX - 0x10),
            Err(BusError::Invalid(u64::MAX - 0x10, 0x100))
        );
        assert!(vcpu_view.write(0x2000, &[4]));
        assert_eq!(
            bus.relocate(0x1000, 0x5000),
            Err(BusError::NotFound(0x1000))
        );

        assert_eq!(
            bus.remove(0x2000),
            Some(BusRange {
                base: 0x2000,
                len: 0x100
            })
        );
        assert_eq!(bus.remove(0x2000), None);
        assert!(!vcpu_view.write(0x2000, &[5]));
        // The freed range can be reused.
        bus.insert(dev, 0x2000, 0x100).unwrap();
    }
}
