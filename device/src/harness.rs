//! The fuzz harness body, shared by the cargo-fuzz target (`device/fuzz`)
//! and a stable `#[test]` that feeds it deterministic pseudo-random inputs.
//!
//! The input is a little program of hostile guest actions: register and
//! config writes, raw writes anywhere in guest memory (biased towards the
//! rings, tables and status block), raw and structured commands, control
//! entries, doorbells, processing steps and a driver-like fault service.
//! The device must never panic and never hang.

use faultline_abi::{
    doorbell, isa, regs, CtlOp, DeviceStatus, MigrateEntry, Opcode, Pte, DEVICE_MAGIC, LEAF_4K,
};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::testing::{cmd, Rig, CMDS, CTL_RING, CTX_TABLE, DATA, FAULT_BUF, PT_POOL, QUEUES, SB};

const MEM: u64 = 8 << 20;
const CODE_VA: u64 = 0x8000;
/// Small, so VRAM leaves and MIGRATE pages land on both sides of its end.
const VRAM: u64 = 4 << 20;
/// The second 64 KiB of the VA window: VRAM leaves, half of them past
/// the end of VRAM.
const VRAM_VA: u64 = 0x1_0000;

/// Byte reader that yields zeros once the input is exhausted.
struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Input<'_> {
    fn done(&self) -> bool {
        self.pos >= self.data.len()
    }
    fn u8(&mut self) -> u8 {
        let v = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        v
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u8()).collect()
    }
    /// A GPU VA: mostly inside the small mapped window, sometimes anywhere.
    fn va(&mut self) -> u64 {
        match self.u8() % 8 {
            0 => self.u64(),
            1 => (1 << 48) - u64::from(self.u16()),
            _ => u64::from(self.u16()) * 8 % 0x2_0000,
        }
    }
    /// A MIGRATE page word: either aperture, inside or past RAM and VRAM,
    /// sometimes with reserved or misaligned bits.
    fn page_word(&mut self) -> u64 {
        let low = match self.u8() % 8 {
            0 => u64::from(self.u16()) & 0xFFF,
            n => u64::from(n & 1),
        };
        ((u64::from(self.u16()) << 12) % (2 * MEM)) | low
    }
    /// A guest-physical address, biased towards device structures.
    fn gpa(&mut self) -> u64 {
        let bases = [
            SB, CTX_TABLE, CTL_RING, FAULT_BUF, QUEUES, CMDS, PT_POOL, DATA,
        ];
        let sel = self.u8() as usize;
        match bases.get(sel % 10) {
            Some(b) => b + u64::from(self.u16()) % 0x2000,
            None => u64::from(self.u32()) % MEM,
        }
    }
}

/// Run one fuzz input. Panics if the device model does, or if a reset
/// afterwards does not bring it back.
pub fn run(data: &[u8]) {
    run_with(data, None);
}

/// `run` on a device with fault injection `inject` (`crate::inject`):
/// the same hostile program meets late acks, paused engines and the rest.
/// Returns the counters as the host reads them at exit.
pub fn run_with(data: &[u8], inject: Option<crate::InjectSpec>) -> Vec<(String, u64)> {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)])
        .unwrap_or_else(|e| panic!("guest memory: {e}"));
    let cfg = crate::Config {
        vram: VRAM,
        inject,
        ..crate::Config::default()
    };
    let mut rig = Rig::with_config(mem, 16, cfg);
    rig.dev.set_launch_step_limit(20_000);
    rig.enable_channel(0, 0);
    rig.enable_channel(1, 0);
    rig.map_range(0, 0, DATA, 0x1_0000, LEAF_4K, Pte::WRITE | Pte::ATOMIC);
    let vram_rw = Pte::WRITE | Pte::ATOMIC | Pte::VRAM;
    rig.map_range(0, VRAM_VA, VRAM - 0x8000, 0x1_0000, LEAF_4K, vram_rw);
    let kernel = [
        isa::encode(isa::S2R, 2, 0, 0, isa::sreg::GTID),
        isa::encode(isa::SHLI, 3, 2, 0, 3),
        isa::encode(isa::ADD, 3, 3, 1, 0),
        isa::encode(isa::ATOM_ADD64, 4, 3, 2, 0),
        isa::encode(isa::EXIT, 0, 0, 0, 0),
    ];
    rig.write_code(DATA + CODE_VA, &kernel);

    let mut inp = Input { data, pos: 0 };
    let mut steps = 0;
    while !inp.done() && steps < 256 {
        steps += 1;
        match inp.u8() % 12 {
            0 => {
                let off = u64::from(inp.u16());
                let v = inp.u32();
                rig.dev.mmio_write(off, &v.to_le_bytes());
            }
            1 => {
                let off = u64::from(inp.u16());
                let len = [1, 2, 4, 8][inp.u8() as usize % 4];
                let mut b = vec![0u8; len];
                rig.dev.mmio_read(off, &mut b);
            }
            2 => {
                let off = u64::from(inp.u8());
                let len = [1, 2, 4, 3][inp.u8() as usize % 4];
                let v = inp.bytes(len);
                rig.dev.config_write(off, &v);
                let mut b = vec![0u8; len];
                rig.dev.config_read(off, &mut b);
            }
            3 => {
                let gpa = inp.gpa();
                let n = inp.u8() as usize % 17;
                let b = inp.bytes(n);
                rig.write_bytes(gpa, &b);
            }
            4 => {
                let ch = inp.u8() as usize % 2;
                let mut c = [0u8; 64];
                c.copy_from_slice(&inp.bytes(64));
                // Keep most raw commands on a valid opcode so validation
                // of the other fields gets exercised.
                if c[1] & 1 == 0 {
                    c[0] = c[0] % Opcode::COUNT as u8 + 1;
                    c[1..4].fill(0);
                }
                rig.submit(ch, c);
            }
            5 => {
                let ch = inp.u8() as usize % 2;
                let c = match inp.u8() % 6 {
                    0 => cmd::fill(inp.va(), u64::from(inp.u16()), inp.u64()),
                    1 => cmd::copy(inp.va(), inp.va(), u64::from(inp.u16())),
                    2 => {
                        let op = u32::from(inp.u8() % 4);
                        let wide = inp.u8() & 1 != 0;
                        cmd::atomic(
                            inp.va() & !7,
                            op,
                            wide,
                            u64::from(inp.u32()),
                            u64::from(inp.u32()),
                        )
                    }
                    3 => cmd::semaphore(inp.va() & !7, true, inp.u64()),
                    4 => {
                        let list = inp.gpa() & !15;
                        let count = u32::from(inp.u8() % 4) + 1;
                        for i in 0..u64::from(count) {
                            let e = MigrateEntry {
                                src: inp.page_word(),
                                dst: inp.page_word(),
                            };
                            rig.write_bytes(list + i * 16, &e.to_le_bytes());
                        }
                        cmd::migrate(list, count, inp.u8() & 1 != 0)
                    }
                    _ => {
                        let grid = u32::from(inp.u8() % 4) + 1;
                        let block = u32::from(inp.u8() % 40) + 1;
                        cmd::launch(
                            CODE_VA,
                            kernel.len() as u32,
                            grid,
                            block,
                            [inp.va() & !7, 0, 0, 0],
                        )
                    }
                };
                rig.submit(ch, c);
            }
            6 => rig.dev.doorbell(u32::from(inp.u8() % 16)),
            7 => {
                for _ in 0..(inp.u8() % 8) {
                    rig.dev.process();
                }
            }
            8 => {
                // A valid op most of the time, else any value.
                let any = inp.u32();
                let sel = inp.u8() as usize % (CtlOp::COUNT + 1);
                let op = CtlOp::ALL.get(sel).map_or(any, |&op| op.into());
                let ctx = u32::from(inp.u8() % 66);
                let (start, len) = (inp.va(), u64::from(inp.u32()));
                rig.ctl(op, ctx, start, len);
            }
            9 => {
                // A driver: map faulting pages inside RAM, replay.
                for f in rig.drain_faults() {
                    if f.context == 0 && f.va < 0x10_0000 {
                        rig.map(0, f.va, DATA + f.va, LEAF_4K, Pte::WRITE | Pte::ATOMIC);
                    }
                }
                rig.ring(doorbell::FAULT_GET);
                rig.replay();
            }
            10 => {
                let ch = u32::from(inp.u8() % 8);
                let reg = u64::from(inp.u8() % 0x40) & !3;
                let v = inp.u32();
                rig.w32(regs::channel_reg(ch, reg), v);
            }
            _ => {
                let at = DATA + CODE_VA + u64::from(inp.u8() % 8) * 8;
                let w = inp.u64();
                rig.write_u64(at, w);
            }
        }
    }
    for i in 0..16 {
        rig.dev.doorbell(i);
    }
    // Bounded: every slice is bounded and launches have a step limit.
    for _ in 0..10_000 {
        if !rig.dev.process() {
            break;
        }
    }
    // Counters are read as the host does at exit.
    let named = rig.dev.named_counters();
    // Deferred work stays bounded whatever the program did.
    assert!(rig.dev.fault_backlog() <= crate::MAX_BACKLOG);
    // Whatever the input did, a reset brings the device back to power-on.
    rig.w32(regs::RESET, regs::RESET_VALUE);
    assert_eq!(rig.r32(regs::MAGIC), DEVICE_MAGIC, "identity after reset");
    assert_eq!(
        DeviceStatus::from_bits_truncate(rig.r32(regs::STATUS)),
        DeviceStatus::empty(),
        "a reset device is disabled and error-free"
    );
    named
}
