//! PCI type-0 configuration space with BAR0 sizing and an MSI capability.

use faultline_abi::pci;

const CAP: usize = pci::MSI_CAP_OFFSET as usize;
const MSI_ADDR_LO: usize = CAP + 4;
const MSI_ADDR_HI: usize = CAP + 8;
const MSI_DATA: usize = CAP + 12;
const MSI_MASK: usize = CAP + 16;
const MSI_PENDING: usize = CAP + 20;

/// log2 of the vectors the device asks for (Multiple Message Capable).
const MMC: u16 = pci::MSI_VECTORS.trailing_zeros() as u16;
const VECTOR_MASK: u32 = (1 << pci::MSI_VECTORS) - 1;

const COMMAND_WRITABLE: u16 = 0x0002 | 0x0004 | 0x0400;
const BAR0_FLAGS: u32 = 0x4; // memory, 64-bit, non-prefetchable

/// The MSI capability as programmed by the guest, for hosts that route
/// vectors (irqfd, eventfd).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MsiState {
    pub enabled: bool,
    pub address: u64,
    pub data: u16,
    /// Vectors the guest enabled (1 << Multiple Message Enable).
    pub vectors: u32,
    /// Per-vector mask bits.
    pub mask: u32,
    /// Per-vector pending bits.
    pub pending: u32,
}

impl MsiState {
    /// The (address, data) message the device sends for `vector`, or `None`
    /// while MSI is disabled. The vector is folded into the enabled count as
    /// PCI multiple-message MSI does.
    pub fn message(&self, vector: u32) -> Option<(u64, u32)> {
        if !self.enabled {
            return None;
        }
        let n = self.vectors.max(1);
        let v = vector & (n - 1);
        Some((self.address, (u32::from(self.data) & !(n - 1)) | v))
    }

    /// The vector number a raised `vector` is delivered as.
    pub fn effective_vector(&self, vector: u32) -> u32 {
        vector & (self.vectors.max(1) - 1)
    }
}

/// What a config write changed, so the device can tell the host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConfigWriteEffect {
    pub msi_changed: bool,
    pub bar_changed: bool,
}

#[derive(Debug, Clone)]
pub struct ConfigSpace {
    command: u16,
    bar0: u64,
    /// Set while the guest sizes the BAR (it wrote all ones).
    bar0_sizing_lo: bool,
    bar0_sizing_hi: bool,
    interrupt_line: u8,
    msi_ctrl: u16,
    msi_addr: u64,
    msi_data: u16,
    msi_mask: u32,
    msi_pending: u32,
}

impl Default for ConfigSpace {
    fn default() -> Self {
        Self::new()
    }
}

impl ConfigSpace {
    pub fn new() -> Self {
        Self {
            command: 0,
            bar0: 0,
            bar0_sizing_lo: false,
            bar0_sizing_hi: false,
            interrupt_line: 0,
            msi_ctrl: (MMC << 1) | (1 << 7) | (1 << 8),
            msi_addr: 0,
            msi_data: 0,
            msi_mask: 0,
            msi_pending: 0,
        }
    }

    /// BAR0 guest-physical base while memory decoding is on.
    pub fn bar0(&self) -> Option<u64> {
        (self.command & 0x2 != 0).then_some(self.bar0 & !(pci::BAR0_SIZE - 1))
    }

    pub fn msi(&self) -> MsiState {
        let mme = (self.msi_ctrl >> 4) & 7;
        MsiState {
            enabled: self.msi_ctrl & 1 != 0,
            address: self.msi_addr,
            data: self.msi_data,
            vectors: 1 << mme.min(MMC),
            mask: self.msi_mask,
            pending: self.msi_pending,
        }
    }

    /// Raise `vector`: returns the effective vector to send now, or `None`
    /// if it was latched as pending (masked or MSI disabled).
    pub fn raise(&mut self, vector: u32) -> Option<u32> {
        let msi = self.msi();
        let v = msi.effective_vector(vector);
        if msi.enabled && msi.mask & (1 << v) == 0 {
            Some(v)
        } else {
            self.msi_pending |= 1 << v;
            None
        }
    }

    /// Pending vectors that may now be delivered (clears their pending bit).
    pub fn take_deliverable(&mut self) -> u32 {
        let msi = self.msi();
        if !msi.enabled {
            return 0;
        }
        let valid = (1u32 << msi.vectors) - 1;
        let ready = self.msi_pending & !self.msi_mask & valid;
        self.msi_pending &= !ready;
        ready
    }

    fn dword(&self, reg: usize) -> u32 {
        match reg {
            0x00 => u32::from(pci::VENDOR_ID) | u32::from(pci::DEVICE_ID) << 16,
            // Status bit 4: capability list present.
            0x04 => u32::from(self.command) | (1 << 20),
            0x08 => {
                u32::from(pci::REVISION)
                    | u32::from(pci::PROG_IF) << 8
                    | u32::from(pci::SUBCLASS) << 16
                    | u32::from(pci::CLASS_CODE) << 24
            }
            0x0C => 0, // cache line, latency, header type 0, no BIST
            0x10 => {
                if self.bar0_sizing_lo {
                    (!(pci::BAR0_SIZE as u32 - 1)) | BAR0_FLAGS
                } else {
                    (self.bar0 as u32 & !(pci::BAR0_SIZE as u32 - 1)) | BAR0_FLAGS
                }
            }
            0x14 => {
                if self.bar0_sizing_hi {
                    u32::MAX
                } else {
                    (self.bar0 >> 32) as u32
                }
            }
            0x2C => u32::from(pci::SUBSYSTEM_VENDOR_ID) | u32::from(pci::SUBSYSTEM_ID) << 16,
            0x34 => u32::from(pci::MSI_CAP_OFFSET),
            0x3C => u32::from(self.interrupt_line), // pin 0: no INTx
            r if r == CAP => 0x05 | u32::from(self.msi_ctrl) << 16,
            MSI_ADDR_LO => self.msi_addr as u32 & !3,
            MSI_ADDR_HI => (self.msi_addr >> 32) as u32,
            MSI_DATA => u32::from(self.msi_data),
            MSI_MASK => self.msi_mask,
            MSI_PENDING => self.msi_pending,
            _ => 0,
        }
    }

    /// Read `data.len()` bytes (1, 2 or 4, not crossing a dword) at
    /// `offset`. Anything else reads as zeros.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some((reg, shift)) = split(offset, data.len()) else {
            return;
        };
        let v = self.dword(reg) >> shift;
        let bytes = v.to_le_bytes();
        data.copy_from_slice(&bytes[..data.len()]);
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> ConfigWriteEffect {
        let mut effect = ConfigWriteEffect::default();
        let Some((reg, shift)) = split(offset, data.len()) else {
            return effect;
        };
        let mut buf = [0u8; 4];
        buf[..data.len()].copy_from_slice(data);
        let val = u32::from_le_bytes(buf) << shift;
        let mask: u32 = if data.len() == 4 {
            u32::MAX
        } else {
            ((1u32 << (8 * data.len())) - 1) << shift
        };
        let merge = |old: u32| (old & !mask) | (val & mask);
        match reg {
            0x04 => {
                let cmd = merge(self.dword(0x04)) as u16;
                let old = self.command;
                self.command = cmd & COMMAND_WRITABLE;
                effect.bar_changed = (old ^ self.command) & 0x2 != 0;
            }
            0x10 => {
                let v = merge(self.dword(0x10) & !0xF);
                self.bar0_sizing_lo = v | 0xF == u32::MAX;
                if !self.bar0_sizing_lo {
                    self.bar0 =
                        (self.bar0 & !0xFFFF_FFFF) | u64::from(v & !(pci::BAR0_SIZE as u32 - 1));
                }
                effect.bar_changed = true;
            }
            0x14 => {
                let v = merge(self.dword(0x14));
                self.bar0_sizing_hi = v == u32::MAX;
                if !self.bar0_sizing_hi {
                    self.bar0 = (self.bar0 & 0xFFFF_FFFF) | (u64::from(v) << 32);
                }
                effect.bar_changed = true;
            }
            0x3C => self.interrupt_line = merge(self.dword(0x3C)) as u8,
            r if r == CAP => {
                let ctrl = (merge(self.dword(CAP)) >> 16) as u16;
                // Enable and MME are writable; MME is clamped to what we offer.
                let mme = ((ctrl >> 4) & 7).min(MMC);
                self.msi_ctrl = (self.msi_ctrl & !0x71) | (ctrl & 1) | (mme << 4);
                effect.msi_changed = true;
            }
            MSI_ADDR_LO => {
                let v = merge(self.dword(MSI_ADDR_LO)) & !3;
                self.msi_addr = (self.msi_addr & !0xFFFF_FFFF) | u64::from(v);
                effect.msi_changed = true;
            }
            MSI_ADDR_HI => {
                let v = merge(self.dword(MSI_ADDR_HI));
                self.msi_addr = (self.msi_addr & 0xFFFF_FFFF) | (u64::from(v) << 32);
                effect.msi_changed = true;
            }
            MSI_DATA => {
                self.msi_data = merge(self.dword(MSI_DATA)) as u16;
                effect.msi_changed = true;
            }
            MSI_MASK => {
                self.msi_mask = merge(self.dword(MSI_MASK)) & VECTOR_MASK;
                effect.msi_changed = true;
            }
            _ => {}
        }
        effect
    }
}

/// Dword index and bit shift of an access, if it is 1/2/4 bytes, naturally
/// aligned and inside config space.
fn split(offset: u64, len: usize) -> Option<(usize, u32)> {
    if !matches!(len, 1 | 2 | 4) || !offset.is_multiple_of(len as u64) {
        return None;
    }
    let end = offset.checked_add(len as u64)?;
    if end > pci::CONFIG_SPACE_SIZE as u64 {
        return None;
    }
    let reg = (offset & !3) as usize;
    Some((reg, ((offset & 3) * 8) as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rd32(c: &ConfigSpace, off: u64) -> u32 {
        let mut b = [0u8; 4];
        c.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn identity_and_class() {
        let c = ConfigSpace::new();
        assert_eq!(rd32(&c, 0), 0x0001_FA17);
        assert_eq!(rd32(&c, 8) >> 8, 0x03_02_00);
        assert_eq!(rd32(&c, 0x34) & 0xFF, 0x40);
        assert_ne!(rd32(&c, 4) & (1 << 20), 0);
        assert_eq!(rd32(&c, 0xFC), 0);
        assert_eq!(rd32(&c, 0x18), 0, "BAR2 not implemented");
        let mut b = [0xAAu8; 4];
        c.read(0x1000, &mut b);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn bar0_sizing_and_placement() {
        let mut c = ConfigSpace::new();
        c.write(0x10, &u32::MAX.to_le_bytes());
        c.write(0x14, &u32::MAX.to_le_bytes());
        assert_eq!(rd32(&c, 0x10), 0xFFFF_0004);
        assert_eq!(rd32(&c, 0x14), u32::MAX);
        c.write(0x10, &0xE000_1234u32.to_le_bytes());
        c.write(0x14, &0x1u32.to_le_bytes());
        assert_eq!(rd32(&c, 0x10), 0xE000_0004);
        assert_eq!(c.bar0(), None, "memory decode off");
        c.write(0x04, &0x6u16.to_le_bytes());
        assert_eq!(c.bar0(), Some(0x1_E000_0000));
    }

    #[test]
    fn msi_programming_masking_and_pending() {
        let mut c = ConfigSpace::new();
        let ctrl = (rd32(&c, 0x40) >> 16) as u16;
        assert_eq!((ctrl >> 1) & 7, 2, "4 vectors capable");
        assert_eq!(c.raise(0), None, "disabled: latched");
        c.write(0x44, &0xFEE0_0000u32.to_le_bytes());
        c.write(0x4C, &0x40u16.to_le_bytes());
        // Enable with MME = 7: clamped to 2 (4 vectors).
        c.write(0x42, &(1u16 | (7 << 4)).to_le_bytes());
        let msi = c.msi();
        assert!(msi.enabled);
        assert_eq!(msi.vectors, 4);
        assert_eq!(msi.message(3), Some((0xFEE0_0000, 0x43)));
        assert_eq!(c.take_deliverable(), 1, "vector 0 was pending");
        c.write(0x50, &0b10u32.to_le_bytes());
        assert_eq!(c.raise(1), None);
        assert_eq!(rd32(&c, 0x54), 0b10);
        assert_eq!(c.raise(2), Some(2));
        c.write(0x50, &0u32.to_le_bytes());
        assert_eq!(c.take_deliverable(), 0b10);
        // One vector enabled: everything folds onto vector 0.
        c.write(0x42, &1u16.to_le_bytes());
        assert_eq!(c.raise(3), Some(0));
    }
}
