//! BAR0: the register file. Reads and writes of the identity, control and
//! setup registers, the channel blocks (delegated to `Channel`), the
//! doorbell window and the counter window.

use faultline_abi::{
    doorbell, regs, DeviceStatus, Features, IntCause, ABI_VERSION, DEVICE_MAGIC, NUM_CONTEXTS,
    NUM_COUNTERS,
};
use vm_memory::GuestMemoryBackend;

use super::Device;

/// The setup registers: guest-physical addresses and sizes of the status
/// block, fault buffer, context table and control ring.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Setup {
    pub(super) status_block: u64,
    pub(super) fault_buf: u64,
    pub(super) fault_entries: u32,
    pub(super) ctx_table: u64,
    pub(super) ctl_ring: u64,
    pub(super) ctl_entries: u32,
}

/// Replace the low / high half of a 64-bit register pair.
pub(super) fn set_lo(v: &mut u64, lo: u32) {
    *v = (*v & !0xFFFF_FFFF) | u64::from(lo);
}
pub(super) fn set_hi(v: &mut u64, hi: u32) {
    *v = (*v & 0xFFFF_FFFF) | (u64::from(hi) << 32);
}

impl<M: GuestMemoryBackend> Device<M> {
    /// Read BAR0. Aligned 4-byte accesses (8 in the counter window);
    /// anything else reads zeros.
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let cwin = regs::COUNTERS_BASE..regs::counter(NUM_COUNTERS);
        if data.len() == 8 && offset.is_multiple_of(8) && cwin.contains(&offset) {
            let v = self
                .counters
                .slot(((offset - regs::COUNTERS_BASE) / 8) as u32);
            data.copy_from_slice(&v.to_le_bytes());
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            return;
        }
        let v = self.read_reg(offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        let r = &self.staged;
        match offset {
            regs::MAGIC => DEVICE_MAGIC,
            regs::VERSION => ABI_VERSION,
            regs::NUM_CONTEXTS => NUM_CONTEXTS,
            regs::NUM_CHANNELS => self.sizing.channels,
            regs::FAULT_BUF_MAX => self.sizing.max_fault_entries,
            regs::TLB_ENTRIES => self.sizing.tlb_entries,
            regs::FEATURES => Features::VRAM.bits(),
            regs::VRAM_SIZE_LO => self.vram.size() as u32,
            regs::VRAM_SIZE_HI => (self.vram.size() >> 32) as u32,
            regs::INJECT_ACTIVE => self.inject.as_ref().map_or(0, |i| i.spec.active().bits()),
            regs::STATUS => {
                let mut s = DeviceStatus::empty();
                s.set(DeviceStatus::ENABLED, self.enabled);
                s.set(DeviceStatus::ERROR, self.error_code != 0);
                s.bits()
            }
            regs::ENABLE => u32::from(self.enabled),
            regs::ERROR_CODE => self.error_code,
            regs::ERROR_INFO => self.error_info,
            regs::INT_STATUS => self.int_status.bits(),
            regs::INT_ENABLE => self.int_enable.bits(),
            regs::STATUS_BLOCK_LO => r.status_block as u32,
            regs::STATUS_BLOCK_HI => (r.status_block >> 32) as u32,
            regs::FAULT_BUF_LO => r.fault_buf as u32,
            regs::FAULT_BUF_HI => (r.fault_buf >> 32) as u32,
            regs::FAULT_BUF_ENTRIES => r.fault_entries,
            regs::CTX_TABLE_LO => r.ctx_table as u32,
            regs::CTX_TABLE_HI => (r.ctx_table >> 32) as u32,
            regs::CTL_RING_LO => r.ctl_ring as u32,
            regs::CTL_RING_HI => (r.ctl_ring >> 32) as u32,
            regs::CTL_RING_ENTRIES => r.ctl_entries,
            regs::TIMESTAMP_LO => {
                let t = self.now();
                self.ts_hi_latch = (t >> 32) as u32;
                t as u32
            }
            regs::TIMESTAMP_HI => self.ts_hi_latch,
            regs::TRACE_CAP..=regs::TRACE_TSC_HI => self.trace_reg_read(offset),
            o if self.channel_window().contains(&o) => {
                let (ch, reg) = channel_reg(o);
                self.channels[ch].read_reg(reg)
            }
            o if (regs::COUNTERS_BASE..regs::counter(NUM_COUNTERS)).contains(&o) => {
                let v = self.counters.slot(((o - regs::COUNTERS_BASE) / 8) as u32);
                if o % 8 == 0 {
                    v as u32
                } else {
                    (v >> 32) as u32
                }
            }
            _ => 0,
        }
    }

    /// Write BAR0 (aligned 4-byte accesses; others are ignored), then wake
    /// the worker (see [`Self::set_waker`]).
    pub fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        self.apply_mmio_write(offset, data);
        if let Some(w) = &self.waker {
            w();
        }
    }

    fn apply_mmio_write(&mut self, offset: u64, data: &[u8]) {
        if (regs::DOORBELL_BASE..doorbell::offset(doorbell::COUNT)).contains(&offset)
            && offset.is_multiple_of(regs::DOORBELL_STRIDE)
        {
            // Any size: the value is ignored, as with an ioeventfd.
            self.doorbell(((offset - regs::DOORBELL_BASE) / regs::DOORBELL_STRIDE) as u32);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        let v = u32::from_le_bytes(bytes);
        let setup_ok = !self.enabled;
        let r = &mut self.staged;
        match offset {
            regs::RESET if v == regs::RESET_VALUE => self.reset(),
            regs::ENABLE => {
                if v & 1 != 0 {
                    self.enable();
                } else {
                    self.disable();
                }
            }
            regs::ERROR_CLEAR => {
                self.error_code = 0;
                self.error_info = 0;
            }
            regs::INT_STATUS => {
                self.int_status &= !IntCause::from_bits_truncate(v);
            }
            regs::INT_ENABLE => self.int_enable = IntCause::from_bits_truncate(v),
            regs::STATUS_BLOCK_LO if setup_ok => set_lo(&mut r.status_block, v),
            regs::STATUS_BLOCK_HI if setup_ok => set_hi(&mut r.status_block, v),
            regs::FAULT_BUF_LO if setup_ok => set_lo(&mut r.fault_buf, v),
            regs::FAULT_BUF_HI if setup_ok => set_hi(&mut r.fault_buf, v),
            regs::FAULT_BUF_ENTRIES if setup_ok => r.fault_entries = v,
            regs::CTX_TABLE_LO if setup_ok => set_lo(&mut r.ctx_table, v),
            regs::CTX_TABLE_HI if setup_ok => set_hi(&mut r.ctx_table, v),
            regs::CTL_RING_LO if setup_ok => set_lo(&mut r.ctl_ring, v),
            regs::CTL_RING_HI if setup_ok => set_hi(&mut r.ctl_ring, v),
            regs::CTL_RING_ENTRIES if setup_ok => r.ctl_entries = v,
            regs::TRACE_CAP..=regs::TRACE_TSC_HI => self.trace_reg_write(offset, v),
            o if self.channel_window().contains(&o) => {
                let (ch, reg) = channel_reg(o);
                if reg == regs::CH_ENABLE {
                    if v & 1 != 0 {
                        self.channel_enable(ch);
                    } else {
                        self.channel_stop(ch);
                    }
                } else {
                    self.channels[ch].write_reg(reg, v);
                }
            }
            _ => {}
        }
    }

    /// BAR0 offsets of the blocks of the channels this device implements.
    fn channel_window(&self) -> std::ops::Range<u64> {
        regs::CHANNEL_BASE..regs::channel_reg(self.sizing.channels, 0)
    }
}

/// (channel, register within its block) of a BAR0 offset in the window.
fn channel_reg(offset: u64) -> (usize, u64) {
    let rel = offset - regs::CHANNEL_BASE;
    (
        (rel / regs::CHANNEL_STRIDE) as usize,
        rel % regs::CHANNEL_STRIDE,
    )
}
