//! `gpu_fault_flood` (opt-in: `test=gpu_fault_flood`, `cycles=N`): the
//! fault-bookkeeping flood of issue 13 item 1. With a 2-entry fault buffer
//! that is never drained, each cycle LAUNCHes 512 threads storing to 512
//! distinct unmapped pages (64 warps stall, nearly all their faults find
//! the buffer full), then either cancels the context (even cycles) or
//! stops and restarts the channel (odd cycles). The device must keep what
//! it remembers of those faults bounded: the guest cannot see host memory,
//! so `scripts/soak.sh` asserts the VMM's peak RSS; here each cycle must
//! end as the ABI says (the LAUNCH completes `Cancelled` after a cancel,
//! the channel runs again after a restart) and a RESET, probe and FILL +
//! COPY must work at the end.
//!
//! Driven through raw registers and rings, not the driver: the driver
//! drains the fault buffer whenever it waits.

use alloc::format;
use alloc::string::String;

use faultline_abi::{
    isa, regs, status_block, virtq, Command, ContextEntry, Counter, CtlEntry, CtlFlags, CtlOp, Pte,
    Status,
};
use faultline_driver::gpu::{DmaRegion, Platform};

use super::Test;
use crate::gpu::FwPlatform;
use crate::println;

pub const TESTS: &[Test] = &[Test::new("gpu_fault_flood", gpu_fault_flood)];

const DEFAULT_CYCLES: u64 = 1000;
const PAGE: usize = 4096;
/// Page indices in the region.
const SB: usize = 0;
const FAULTS: usize = 1;
const CTX: usize = 2;
const L4: usize = 3; // L4, L3, L2, L1 tables at 3..=6
const CODE: usize = 7;
const CTL: usize = 8;
const DESC: usize = 9;
const AVAIL: usize = 10;
const USED: usize = 11;
const CMD: usize = 12;
const PAGES: usize = 13;

const CODE_VA: u64 = 0x1000_0000;
/// Thread t stores to DATA_VA + 2 MiB · cycle + t · 4096: nothing is mapped
/// there.
const DATA_VA: u64 = 0x4000_0000;
const THREADS: u64 = 512;
const FAULT_ENTRIES: u32 = 2;
const CTL_ENTRIES: u32 = 16;
const QUEUE: u16 = 4;

struct Flood<'a> {
    p: &'a FwPlatform,
    m: DmaRegion,
    avail_idx: u16,
    used_idx: u16,
    ctl_prod: u32,
}

impl Flood<'_> {
    fn phys(&self, page: usize) -> u64 {
        self.m.phys() + (page * PAGE) as u64
    }

    fn deadline(&self) -> u64 {
        self.p.now_ns() + 10_000_000_000
    }

    /// Device and channel 0 set up and enabled.
    fn enable(&mut self) -> Result<(), String> {
        let p = self.p;
        let set64 = |lo: u64, v: u64| {
            p.write32(lo, v as u32);
            p.write32(regs::upper_half(lo), (v >> 32) as u32);
        };
        set64(regs::STATUS_BLOCK_LO, self.phys(SB));
        set64(regs::FAULT_BUF_LO, self.phys(FAULTS));
        p.write32(regs::FAULT_BUF_ENTRIES, FAULT_ENTRIES);
        set64(regs::CTX_TABLE_LO, self.phys(CTX));
        set64(regs::CTL_RING_LO, self.phys(CTL));
        p.write32(regs::CTL_RING_ENTRIES, CTL_ENTRIES);
        p.write32(regs::ENABLE, 1);
        if p.read32(regs::STATUS) & 1 == 0 {
            return Err(format!(
                "device did not enable: ERROR_CODE {}",
                p.read32(regs::ERROR_CODE)
            ));
        }
        self.ctl_prod = 0;
        self.start_channel()
    }

    fn start_channel(&mut self) -> Result<(), String> {
        let p = self.p;
        let reg = |r| regs::channel_reg(0, r);
        // Fresh rings: the device starts at index 0.
        self.m.write_bytes(AVAIL * PAGE, &[0; 8]);
        self.m.write_bytes(USED * PAGE, &[0; 8]);
        self.avail_idx = 0;
        self.used_idx = 0;
        p.write32(reg(regs::CH_QUEUE_SIZE), u32::from(QUEUE));
        for (r, page) in [
            (regs::CH_DESC_LO, DESC),
            (regs::CH_AVAIL_LO, AVAIL),
            (regs::CH_USED_LO, USED),
        ] {
            let a = self.phys(page);
            p.write32(reg(r), a as u32);
            p.write32(reg(r + 4), (a >> 32) as u32);
        }
        p.write32(reg(regs::CH_CONTEXT), 0);
        p.write32(reg(regs::CH_ENABLE), 1);
        if p.read32(reg(regs::CH_ENABLE)) & 1 == 0 {
            return Err(format!(
                "channel did not start: ERROR_CODE {}",
                p.read32(regs::ERROR_CODE)
            ));
        }
        Ok(())
    }

    /// The LAUNCH of 512 faulting threads, posted and rung. Each cycle
    /// uses pages no earlier cycle used (2 MiB further on, wrapping at
    /// 2^40), so nothing the device kept of earlier faults matches.
    fn launch(&mut self, cycle: u64) {
        let cmd = Command::Launch {
            code: CODE_VA,
            code_len: 6,
            grid: (THREADS / 64) as u32,
            block: 64,
            args: [DATA_VA + ((cycle << 21) & ((1 << 40) - 1)), 0, 0, 0],
        };
        self.m.write_words(CMD * PAGE, &cmd.encode());
        self.m.write_u32(CMD * PAGE + 64, u32::MAX); // completion status: none yet
        let desc = [
            virtq::Descriptor {
                addr: self.phys(CMD),
                len: 64,
                flags: virtq::DESC_F_NEXT,
                next: 1,
            },
            virtq::Descriptor {
                addr: self.phys(CMD) + 64,
                len: 16,
                flags: virtq::DESC_F_WRITE,
                next: 0,
            },
        ];
        for (i, d) in desc.iter().enumerate() {
            self.m.write_array(DESC * PAGE + 16 * i, &d.to_le_bytes());
        }
        let slot = virtq::avail_entry(self.avail_idx % QUEUE);
        self.m.write_u16(AVAIL * PAGE + slot, 0);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.m
            .write_u16(AVAIL * PAGE + virtq::RING_IDX, self.avail_idx);
        self.p.write32(regs::DB_CHANNEL0, 1);
    }

    /// Waits until this cycle's warps have faulted (`before`: faults raised
    /// plus overflows when the launch was posted).
    fn wait_faults(&self, before: u64) -> Result<(), String> {
        let deadline = self.deadline();
        loop {
            let now = faults_seen(self.p);
            if now >= before + 64 {
                return Ok(());
            }
            if self.p.now_ns() > deadline {
                return Err(format!(
                    "the launch raised {} faults in 10 s, expected 64",
                    now - before
                ));
            }
        }
    }

    fn cancel_context(&mut self) -> Result<(), String> {
        let e = CtlEntry {
            op: CtlOp::CancelContext.into(),
            status: 0,
            context: 0,
            flags: CtlFlags::NOTIFY.bits(),
            start: 0,
            len: 0,
        };
        let slot = (self.ctl_prod % CTL_ENTRIES) as usize;
        self.m.write_array(CTL * PAGE + 32 * slot, &e.to_le_bytes());
        self.ctl_prod = self.ctl_prod.wrapping_add(1);
        self.m
            .write_u32(SB * PAGE + status_block::CTL_PROD as usize, self.ctl_prod);
        self.p.write32(regs::DB_CONTROL, 1);
        let deadline = self.deadline();
        while self.m.read_u32(SB * PAGE + status_block::CTL_CONS as usize) != self.ctl_prod {
            if self.p.now_ns() > deadline {
                return Err("CANCEL_CONTEXT not acknowledged in 10 s".into());
            }
        }
        // The launch completes Cancelled.
        while self.m.read_u16(USED * PAGE + virtq::RING_IDX) == self.used_idx {
            if self.p.now_ns() > deadline {
                return Err("the cancelled launch never completed".into());
            }
        }
        self.used_idx = self.used_idx.wrapping_add(1);
        let st = self.m.read_u32(CMD * PAGE + 64);
        if st != Status::Cancelled as u32 {
            return Err(format!("the cancelled launch completed with status {st}"));
        }
        Ok(())
    }

    fn restart_channel(&mut self) -> Result<(), String> {
        self.p.write32(regs::channel_reg(0, regs::CH_ENABLE), 0);
        self.start_channel()
    }
}

/// Faults the device raised or found the buffer full for (per RESET).
fn faults_seen(p: &FwPlatform) -> u64 {
    let c = |i: Counter| {
        let o = regs::counter(i as u32);
        u64::from(p.read32(o)) | u64::from(p.read32(regs::upper_half(o))) << 32
    };
    c(Counter::FaultsRaised) + c(Counter::FaultOverflows)
}

fn gpu_fault_flood() -> Result<(), String> {
    let g = super::gpu::device()?;
    let p = &g.platform;
    let cycles = super::params().cycles.unwrap_or(DEFAULT_CYCLES);
    println!("gpu_fault_flood: {cycles} cycles");
    p.write32(regs::RESET, regs::RESET_VALUE);
    let frames_before = crate::mm::frames::stats().free;
    let m = p.dma_alloc(PAGES).ok_or("dma_alloc failed")?;
    // Context 0: L4 -> L3 -> L2 -> L1 -> the code page (read-only).
    let ctx = ContextEntry {
        root: m.phys() + (L4 * PAGE) as u64,
        flags: 1,
        cpu_root: 0,
    };
    m.write_array(CTX * PAGE, &ctx.to_le_bytes());
    for level in 0..4 {
        let shift = 39 - 9 * level;
        let idx = ((CODE_VA >> shift) & 511) as usize;
        let next = if level == 3 {
            m.phys() + (CODE * PAGE) as u64
        } else {
            m.phys() + ((L4 + level as usize + 1) * PAGE) as u64
        };
        m.write_u64(
            (L4 + level as usize) * PAGE + 8 * idx,
            next | Pte::VALID.bits(),
        );
    }
    // Thread t stores t + 1 at args[0] + t * 4096.
    let kernel = [
        isa::encode(isa::S2R, 5, 0, 0, isa::sreg::GTID),
        isa::encode(isa::SHLI, 6, 5, 0, 12),
        isa::encode(isa::ADD, 6, 6, 1, 0),
        isa::encode(isa::ADDI, 7, 5, 0, 1),
        isa::encode(isa::ST64, 0, 6, 7, 0),
        isa::encode(isa::EXIT, 0, 0, 0, 0),
    ];
    m.write_words(CODE * PAGE, &kernel);
    let mut f = Flood {
        p,
        m,
        avail_idx: 0,
        used_idx: 0,
        ctl_prod: 0,
    };
    let r = (|| {
        f.enable()?;
        for cycle in 0..cycles {
            let before = faults_seen(p);
            f.launch(cycle);
            f.wait_faults(before)
                .map_err(|e| format!("cycle {cycle}: {e}"))?;
            if cycle % 2 == 0 {
                f.cancel_context()
            } else {
                f.restart_channel()
            }
            .map_err(|e| format!("cycle {cycle}: {e}"))?;
            p.take_interrupts();
        }
        Ok::<(), String>(())
    })();
    let seen = faults_seen(p);
    p.write32(regs::RESET, regs::RESET_VALUE);
    p.take_interrupts();
    p.dma_free(f.m);
    r?;
    println!("gpu_fault_flood: {seen} faults raised or overflowed");
    super::gpu::probe_fill_copy(g)?;
    super::gpu::no_frames_leaked(frames_before)
}
