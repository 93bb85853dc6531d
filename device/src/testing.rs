//! A driver-side rig for tests, the fuzz harness and benchmarks: guest
//! memory, page-table construction, a minimal split-virtqueue producer, the
//! control ring and fault-buffer consumer. It plays the guest driver's part
//! with the same `faultline_abi` definitions.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use faultline_abi::{
    pt_index, regs, status_block, virtq, Completion, ContextEntry, ContextFlags, CtlEntry, CtlOp,
    CtlStatus, FaultEntry, Pte, Status, COMMAND_SIZE, LEAF_1G, LEAF_2M, LEAF_4K, NUM_CONTEXTS,
    PTE_ADDR_MASK,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::device::{Device, InterruptSink};
use crate::pci::MsiState;
use crate::sync::lock;

/// Records every vector the device triggers.
#[derive(Default)]
pub struct RecordingIrq {
    pub fired: Mutex<Vec<u32>>,
    pub msi_changes: Mutex<Vec<MsiState>>,
}

impl RecordingIrq {
    pub fn take(&self) -> Vec<u32> {
        std::mem::take(&mut *lock(&self.fired))
    }
}

impl InterruptSink for RecordingIrq {
    fn trigger(&self, vector: u32) {
        lock(&self.fired).push(vector);
    }
    fn msi_changed(&self, msi: &MsiState) {
        lock(&self.msi_changes).push(*msi);
    }
}

// Guest-physical layout used by the rig.
pub const SB: u64 = 0x800;
pub const CTX_TABLE: u64 = 0x1000;
pub const CTL_RING: u64 = 0x2000;
pub const CTL_ENTRIES: u32 = 64;
pub const FAULT_BUF: u64 = 0x4000;
pub const QUEUES: u64 = 0x10000;
pub const QUEUE_STRIDE: u64 = 0x2000;
pub const QUEUE_SIZE: u16 = 64;
pub const CMDS: u64 = 0x40000;
pub const CMD_STRIDE: u64 = 0x2000;
pub const PT_POOL: u64 = 0x100000;
pub const PT_POOL_END: u64 = 0x400000;
/// First byte of memory free for test data.
pub const DATA: u64 = 0x400000;
/// Offset of the completions within a channel's command area.
const COMPLETIONS: u64 = 0x1000;

/// Guest-physical address of context `ctx`'s entry in the rig's table.
pub fn context_entry(ctx: u32) -> u64 {
    CTX_TABLE + u64::from(ctx) * ContextEntry::SIZE as u64
}

/// Command builders (64-byte commands as the driver writes them, through
/// the ABI's own encoder).
pub mod cmd {
    use faultline_abi::Command;

    pub fn fill(dst: u64, len: u64, pattern: u64) -> [u8; 64] {
        Command::Fill { dst, len, pattern }.to_le_bytes()
    }
    pub fn copy(dst: u64, src: u64, len: u64) -> [u8; 64] {
        Command::Copy { dst, src, len }.to_le_bytes()
    }
    pub fn atomic(va: u64, op: u32, wide: bool, operand: u64, compare: u64) -> [u8; 64] {
        Command::Atomic {
            va,
            op,
            wide,
            operand,
            compare,
        }
        .to_le_bytes()
    }
    pub fn semaphore(va: u64, wide: bool, value: u64) -> [u8; 64] {
        Command::SemaphoreRelease { va, wide, value }.to_le_bytes()
    }
    pub fn migrate(list: u64, count: u32, large: bool) -> [u8; 64] {
        Command::Migrate { list, count, large }.to_le_bytes()
    }
    pub fn launch(code: u64, code_len: u32, grid: u32, block: u32, args: [u64; 4]) -> [u8; 64] {
        Command::Launch {
            code,
            code_len,
            grid,
            block,
            args,
        }
        .to_le_bytes()
    }
}

/// Driver side of one split virtqueue: two descriptors per command (the
/// command, then the completion).
struct DriverQueue {
    base: u64,
    cmds: u64,
    avail_idx: u16,
    seq: u64,
}

impl DriverQueue {
    fn desc(&self) -> u64 {
        self.base
    }
    fn avail(&self) -> u64 {
        self.base + virtq::desc_table_size(QUEUE_SIZE) as u64
    }
    fn used(&self) -> u64 {
        let end = self.avail() + virtq::avail_ring_size(QUEUE_SIZE) as u64;
        end.next_multiple_of(virtq::USED_ALIGN)
    }
}

/// Token for a submitted command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    pub channel: usize,
    pub slot: u64,
    pub completion: u64,
}

pub struct Rig {
    pub dev: Device<GuestMemoryMmap>,
    pub irq: Arc<RecordingIrq>,
    roots: Vec<u64>,
    pt_next: u64,
    queues: Vec<Option<DriverQueue>>,
    ctl_prod: u32,
    fault_get: u32,
    pub fault_entries: u32,
    clock: Option<crate::ManualClock>,
}

impl Rig {
    /// Guest RAM `[0, mem_size)`, device enabled, context 0 valid with an
    /// empty page table.
    pub fn new(mem_size: u64, fault_entries: u32) -> Rig {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mem_size as usize)])
            .unwrap_or_else(|e| panic!("guest memory: {e}"));
        Self::with_memory(mem, fault_entries)
    }

    pub fn with_memory(mem: GuestMemoryMmap, fault_entries: u32) -> Rig {
        Self::with_config(mem, fault_entries, crate::Config::default())
    }

    /// Like `with_memory`, for a device sized by `cfg` (which must be valid).
    pub fn with_config(mem: GuestMemoryMmap, fault_entries: u32, cfg: crate::Config) -> Rig {
        let irq = Arc::new(RecordingIrq::default());
        let dev = Device::with_config(mem, irq.clone(), cfg)
            .unwrap_or_else(|e| panic!("device config: {e}"));
        let mut rig = Rig {
            dev,
            irq,
            roots: vec![0; NUM_CONTEXTS as usize],
            pt_next: PT_POOL,
            queues: (0..8).map(|_| None).collect(),
            ctl_prod: 0,
            fault_get: 0,
            fault_entries,
            clock: None,
        };
        // MSI on, 4 vectors, so tests see vectors directly.
        rig.dev.config_write(0x44, &0xFEE0_0000u32.to_le_bytes());
        rig.dev.config_write(0x42, &(1u16 | (2 << 4)).to_le_bytes());
        rig.w32(regs::STATUS_BLOCK_LO, SB as u32);
        rig.w32(regs::FAULT_BUF_LO, FAULT_BUF as u32);
        rig.w32(regs::FAULT_BUF_ENTRIES, fault_entries);
        rig.w32(regs::CTX_TABLE_LO, CTX_TABLE as u32);
        rig.w32(regs::CTL_RING_LO, CTL_RING as u32);
        rig.w32(regs::CTL_RING_ENTRIES, CTL_ENTRIES);
        rig.w32(regs::ENABLE, 1);
        rig.new_context(0);
        rig
    }

    /// `Rig::new` for a device with fault injection `spec`.
    pub fn with_inject(mem_size: u64, fault_entries: u32, spec: crate::InjectSpec) -> Rig {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mem_size as usize)])
            .unwrap_or_else(|e| panic!("guest memory: {e}"));
        let cfg = crate::Config {
            inject: Some(spec),
            ..crate::Config::default()
        };
        Self::with_config(mem, fault_entries, cfg)
    }

    /// The device's clock from now on moves only when the test (or
    /// `settle`) advances it, so what a test sees between two calls does
    /// not depend on how long the host took between them.
    pub fn manual_clock(&mut self) -> crate::ManualClock {
        let c = self.clock.get_or_insert_with(Default::default).clone();
        self.dev.set_manual_clock(&c);
        c
    }

    /// Run until idle and nothing deferred is left (fault injection's
    /// delays), waiting for each deadline as a worker would: sleeping, or
    /// advancing the manual clock. Bounded: panics after 10 s of sleeps or
    /// 10,000 deferrals.
    pub fn settle(&mut self) {
        let start = std::time::Instant::now();
        for _ in 0..10_000 {
            self.dev.run_until_idle();
            let Some(d) = self.dev.next_deadline() else {
                return;
            };
            assert!(start.elapsed().as_secs() < 10, "deferred work never ends");
            match &self.clock {
                Some(c) => c.advance(d.as_nanos().max(1) as u64),
                None => std::thread::sleep(d),
            }
            self.dev.process();
        }
        panic!("deferred work never ends");
    }

    /// Post a control entry and ring DB_CONTROL without running the
    /// device; returns the entry's GPA (its status is at
    /// `CtlEntry::STATUS_OFFSET`).
    pub fn post_ctl(&mut self, op: impl Into<u32>, ctx: u32, start: u64, len: u64) -> u64 {
        let idx = self.ctl_prod;
        let a = CTL_RING + u64::from(idx % CTL_ENTRIES) * CtlEntry::SIZE as u64;
        let e = CtlEntry {
            op: op.into(),
            context: ctx,
            start,
            len,
            ..CtlEntry::default()
        };
        self.write_bytes(a, &e.to_le_bytes());
        self.ctl_prod = idx.wrapping_add(1);
        self.mem()
            .write_obj(self.ctl_prod, GuestAddress(SB + status_block::CTL_PROD))
            .unwrap_or(());
        self.dev.doorbell(faultline_abi::doorbell::CONTROL);
        a
    }

    /// Whether `ctl_cons` acknowledged every entry posted so far.
    pub fn ctl_acked(&self) -> bool {
        self.sb(status_block::CTL_CONS).wrapping_sub(self.ctl_prod) as i32 >= 0
    }

    pub fn mem(&self) -> &GuestMemoryMmap {
        self.dev.memory()
    }

    pub fn w32(&mut self, off: u64, v: u32) {
        self.dev.mmio_write(off, &v.to_le_bytes());
    }

    pub fn r32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.dev.mmio_read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn alloc_table(&mut self) -> u64 {
        let t = self.pt_next;
        assert!(t < PT_POOL_END, "rig page-table pool exhausted");
        self.pt_next += LEAF_4K;
        self.mem()
            .write_slice(&[0u8; 4096], GuestAddress(t))
            .unwrap_or_else(|e| panic!("{e}"));
        t
    }

    /// Give context `ctx` a fresh, empty page table and mark it valid.
    pub fn new_context(&mut self, ctx: u32) {
        let root = self.alloc_table();
        self.roots[ctx as usize] = root;
        let e = ContextEntry {
            root,
            flags: ContextFlags::VALID.bits(),
            cpu_root: 0,
        };
        self.write_bytes(context_entry(ctx), &e.to_le_bytes());
    }

    pub fn root(&self, ctx: u32) -> u64 {
        self.roots[ctx as usize]
    }

    fn pte_addr(&mut self, ctx: u32, va: u64, leaf_level: u32, create: bool) -> Option<u64> {
        let mut table = self.roots[ctx as usize];
        for level in (leaf_level + 1..=4).rev() {
            let slot = table + pt_index(va, level) as u64 * 8;
            let pte: u64 = self.mem().read_obj(GuestAddress(slot)).unwrap_or(0);
            if pte & 1 == 0 || pte & Pte::LEAF.bits() != 0 && level < 4 {
                if !create {
                    return None;
                }
                let t = self.alloc_table();
                self.mem()
                    .write_obj(Pte::table(t).bits(), GuestAddress(slot))
                    .unwrap_or(());
                table = t;
            } else {
                table = pte & PTE_ADDR_MASK;
            }
        }
        Some(table + pt_index(va, leaf_level) as u64 * 8)
    }

    fn leaf_level(size: u64) -> u32 {
        match size {
            LEAF_4K => 1,
            LEAF_2M => 2,
            LEAF_1G => 3,
            _ => panic!("bad leaf size {size:#x}"),
        }
    }

    /// Write a leaf PTE mapping `va` → `gpa` (`size` 4 KiB / 2 MiB / 1 GiB)
    /// with `flags` (VALID is added). No TLB invalidation.
    pub fn map(&mut self, ctx: u32, va: u64, gpa: u64, size: u64, flags: Pte) {
        let level = Self::leaf_level(size);
        let slot = self.pte_addr(ctx, va, level, true).unwrap_or(0);
        let pte = Pte::leaf(gpa, level, flags).bits();
        self.mem().write_obj(pte, GuestAddress(slot)).unwrap_or(());
    }

    /// Map `[va, va+len)` to `[gpa, ...)` with pages of `size`.
    pub fn map_range(&mut self, ctx: u32, va: u64, gpa: u64, len: u64, size: u64, flags: Pte) {
        let mut off = 0;
        while off < len {
            self.map(ctx, va + off, gpa + off, size, flags);
            off += size;
        }
    }

    /// Clear the leaf PTE of `va` (no TLB invalidation).
    pub fn unmap(&mut self, ctx: u32, va: u64, size: u64) {
        let level = Self::leaf_level(size);
        if let Some(slot) = self.pte_addr(ctx, va, level, false) {
            self.mem().write_obj(0u64, GuestAddress(slot)).unwrap_or(());
        }
    }

    /// The level-`level` entry on `va`'s walk (0 if the walk ends above).
    pub fn read_pte(&mut self, ctx: u32, va: u64, level: u32) -> u64 {
        self.pte_addr(ctx, va, level, false)
            .and_then(|slot| self.mem().read_obj(GuestAddress(slot)).ok())
            .unwrap_or(0)
    }

    /// Raw PTE write at the slot for `va` at `level` (for hostile tables).
    pub fn write_pte(&mut self, ctx: u32, va: u64, level: u32, pte: u64) {
        let slot = self.pte_addr(ctx, va, level, true).unwrap_or(0);
        self.mem().write_obj(pte, GuestAddress(slot)).unwrap_or(());
    }

    pub fn enable_channel(&mut self, ch: usize, ctx: u32) -> bool {
        let q = DriverQueue {
            base: QUEUES + ch as u64 * QUEUE_STRIDE,
            cmds: CMDS + ch as u64 * CMD_STRIDE,
            avail_idx: 0,
            seq: 0,
        };
        self.mem()
            .write_slice(&[0u8; QUEUE_STRIDE as usize], GuestAddress(q.base))
            .unwrap_or(());
        let c = ch as u32;
        self.w32(regs::channel_reg(c, regs::CH_QUEUE_SIZE), QUEUE_SIZE.into());
        self.w32(regs::channel_reg(c, regs::CH_DESC_LO), q.desc() as u32);
        self.w32(regs::channel_reg(c, regs::CH_AVAIL_LO), q.avail() as u32);
        self.w32(regs::channel_reg(c, regs::CH_USED_LO), q.used() as u32);
        self.w32(regs::channel_reg(c, regs::CH_CONTEXT), ctx);
        self.w32(regs::channel_reg(c, regs::CH_ENABLE), 1);
        self.queues[ch] = Some(q);
        self.r32(regs::channel_reg(c, regs::CH_ENABLE)) & 1 != 0
    }

    /// Queue a command on channel `ch` (no doorbell). At most
    /// QUEUE_SIZE / 2 commands may be outstanding per channel.
    pub fn submit(&mut self, ch: usize, cmd: [u8; 64]) -> Ticket {
        let q = self.queues[ch]
            .as_mut()
            .unwrap_or_else(|| panic!("channel {ch} not set up"));
        let slot = q.seq % (u64::from(QUEUE_SIZE) / 2);
        q.seq += 1;
        let cmd_addr = q.cmds + slot * COMMAND_SIZE as u64;
        let comp = q.cmds + COMPLETIONS + slot * Completion::SIZE as u64;
        let head = (slot * 2) as u16;
        let desc = q.desc() + u64::from(head) * virtq::Descriptor::SIZE as u64;
        let avail = q.avail();
        let idx = q.avail_idx;
        q.avail_idx = idx.wrapping_add(1);
        let mem = self.dev.memory();
        let w = |v: &[u8], a: u64| mem.write_slice(v, GuestAddress(a)).unwrap_or(());
        w(&cmd, cmd_addr);
        w(&[0xFF; Completion::SIZE], comp);
        let command = virtq::Descriptor {
            addr: cmd_addr,
            len: COMMAND_SIZE as u32,
            flags: virtq::DESC_F_NEXT,
            next: head + 1,
        };
        let completion = virtq::Descriptor {
            addr: comp,
            len: Completion::SIZE as u32,
            flags: virtq::DESC_F_WRITE,
            next: 0,
        };
        w(&command.to_le_bytes(), desc);
        w(
            &completion.to_le_bytes(),
            desc + virtq::Descriptor::SIZE as u64,
        );
        let ring = avail + virtq::avail_entry(idx % QUEUE_SIZE) as u64;
        w(&head.to_le_bytes(), ring);
        mem.store(
            q.avail_idx.to_le(),
            GuestAddress(avail + virtq::RING_IDX as u64),
            Ordering::Release,
        )
        .unwrap_or(());
        Ticket {
            channel: ch,
            slot,
            completion: comp,
        }
    }

    /// Submit, ring the channel doorbell and run the device until idle.
    pub fn exec(&mut self, ch: usize, cmd: [u8; 64]) -> Ticket {
        let t = self.submit(ch, cmd);
        self.dev
            .doorbell(faultline_abi::doorbell::channel(ch as u32));
        self.dev.run_until_idle();
        t
    }

    /// Completion of a ticket: `None` while pending; `Err(raw)` for a
    /// status outside the ABI.
    pub fn completion(&self, t: Ticket) -> Option<Result<(Status, u64), u32>> {
        let mut b = [0u8; Completion::SIZE];
        self.mem()
            .read_slice(&mut b, GuestAddress(t.completion))
            .unwrap_or(());
        let c = Completion::from_le_bytes(&b);
        if c.status == u32::MAX {
            return None;
        }
        Some(
            Status::from_u32(c.status)
                .map(|s| (s, c.result))
                .ok_or(c.status),
        )
    }

    /// Status of a completed ticket (panics if pending: test helper).
    pub fn status(&self, t: Ticket) -> Status {
        match self.completion(t) {
            Some(Ok((s, _))) => s,
            other => panic!("ticket {t:?} not completed properly: {other:?}"),
        }
    }

    pub fn used_idx(&self, ch: usize) -> u16 {
        let q = self.queues[ch].as_ref().map_or(0, |q| q.used());
        self.mem()
            .read_obj(GuestAddress(q + virtq::RING_IDX as u64))
            .unwrap_or(0)
    }

    pub fn sb(&self, off: u64) -> u32 {
        self.mem().read_obj(GuestAddress(SB + off)).unwrap_or(0)
    }

    /// Drain published fault entries and advance GET in the status block
    /// (no doorbell).
    pub fn drain_faults(&mut self) -> Vec<FaultEntry> {
        let put = self.sb(status_block::FAULT_PUT);
        let mut out = Vec::new();
        // A sane driver never trusts PUT to be within one buffer of GET.
        let avail = put.wrapping_sub(self.fault_get).min(self.fault_entries);
        let put = self.fault_get.wrapping_add(avail);
        while self.fault_get != put {
            let slot = u64::from(self.fault_get % self.fault_entries);
            let a = FAULT_BUF + slot * FaultEntry::SIZE as u64;
            let mut b = [0u8; FaultEntry::SIZE];
            self.mem().read_slice(&mut b, GuestAddress(a)).unwrap_or(());
            out.push(FaultEntry::from_le_bytes(&b));
            self.fault_get = self.fault_get.wrapping_add(1);
        }
        self.mem()
            .write_obj(self.fault_get, GuestAddress(SB + status_block::FAULT_GET))
            .unwrap_or(());
        out
    }

    /// Ring a doorbell and run until idle.
    pub fn ring(&mut self, index: u32) {
        self.dev.doorbell(index);
        self.dev.run_until_idle();
    }

    pub fn replay(&mut self) {
        self.ring(faultline_abi::doorbell::REPLAY);
    }

    /// Post a control entry, ring DB_CONTROL, run; returns the entry status
    /// and whether `ctl_cons` acknowledged it.
    /// `op` may be any value (a `CtlOp` or a raw one, to test BadOp).
    pub fn ctl(&mut self, op: impl Into<u32>, ctx: u32, start: u64, len: u64) -> (u32, bool) {
        let a = self.post_ctl(op, ctx, start, len);
        self.dev.run_until_idle();
        let st = self.read_u32(a + CtlEntry::STATUS_OFFSET as u64);
        let acked = self.sb(status_block::CTL_CONS).wrapping_sub(self.ctl_prod) as i32 >= 0;
        (st, acked)
    }

    pub fn ctl_ok(&mut self, op: CtlOp, ctx: u32, start: u64, len: u64) -> bool {
        self.ctl(op, ctx, start, len) == (CtlStatus::Ok as u32, true)
    }

    pub fn read_u64(&self, gpa: u64) -> u64 {
        self.mem().read_obj(GuestAddress(gpa)).unwrap_or(0)
    }
    pub fn write_u64(&self, gpa: u64, v: u64) {
        self.mem().write_obj(v, GuestAddress(gpa)).unwrap_or(());
    }
    pub fn read_u32(&self, gpa: u64) -> u32 {
        self.mem().read_obj(GuestAddress(gpa)).unwrap_or(0)
    }
    pub fn write_u32(&self, gpa: u64, v: u32) {
        self.mem().write_obj(v, GuestAddress(gpa)).unwrap_or(());
    }
    pub fn write_bytes(&self, gpa: u64, b: &[u8]) {
        self.mem().write_slice(b, GuestAddress(gpa)).unwrap_or(());
    }
    pub fn read_bytes(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem()
            .read_slice(&mut v, GuestAddress(gpa))
            .unwrap_or(());
        v
    }

    /// Write a kernel at `gpa` (little-endian words).
    pub fn write_code(&self, gpa: u64, code: &[u64]) {
        let b: Vec<u8> = code.iter().flat_map(|w| w.to_le_bytes()).collect();
        self.write_bytes(gpa, &b);
    }
}

/// An x86-64 4-level CPU page table in the rig's guest memory, built as an
/// OS would (intermediate entries present, writable, user), for the
/// coherence checker: `attach` names it in a context entry's `cpu_root`.
/// Tables come from `[pool, pool_end)`, which must lie in RAM outside what
/// the test uses otherwise.
pub struct CpuPageTable {
    next: u64,
    end: u64,
    pub root: u64,
}

impl CpuPageTable {
    pub const P: u64 = 1;
    pub const RW: u64 = 1 << 1;
    pub const US: u64 = 1 << 2;
    pub const PS: u64 = 1 << 7;
    pub const USER_RW: u64 = Self::P | Self::RW | Self::US;
    pub const USER_RO: u64 = Self::P | Self::US;
    const ADDR: u64 = 0x000f_ffff_ffff_f000;

    pub fn new(rig: &Rig, pool: u64, pool_end: u64) -> CpuPageTable {
        let mut pt = CpuPageTable {
            next: pool,
            end: pool_end,
            root: 0,
        };
        pt.root = pt.alloc(rig);
        pt
    }

    fn alloc(&mut self, rig: &Rig) -> u64 {
        let t = self.next;
        assert!(t < self.end, "CPU page-table pool exhausted");
        self.next += LEAF_4K;
        rig.write_bytes(t, &[0u8; 4096]);
        t
    }

    /// The slot of `va`'s entry at `level` (1 = PTE .. 4 = PML4E),
    /// creating user-writable tables on the way.
    pub fn slot(&mut self, rig: &Rig, va: u64, level: u32) -> u64 {
        let mut table = self.root;
        for l in (level + 1..=4).rev() {
            let slot = table + ((va >> (12 + 9 * (l - 1))) & 511) * 8;
            let e = rig.read_u64(slot);
            table = if e & Self::P == 0 {
                let t = self.alloc(rig);
                rig.write_u64(slot, t | Self::USER_RW);
                t
            } else {
                e & Self::ADDR
            };
        }
        table + ((va >> (12 + 9 * (level - 1))) & 511) * 8
    }

    /// Map `va` → `pa` with a leaf of `size` (4 KiB, 2 MiB, 1 GiB) and the
    /// raw entry bits `flags` (PS is added for large leaves; 0 unmaps).
    pub fn map(&mut self, rig: &Rig, va: u64, pa: u64, size: u64, flags: u64) {
        let (level, ps) = match size {
            LEAF_4K => (1, 0),
            LEAF_2M => (2, Self::PS),
            LEAF_1G => (3, Self::PS),
            _ => panic!("bad leaf size {size:#x}"),
        };
        let slot = self.slot(rig, va, level);
        let ps = if flags == 0 { 0 } else { ps };
        rig.write_u64(slot, pa | flags | ps);
    }

    /// Map `[va, va+len)` → `[pa, ...)` with leaves of `size`.
    pub fn map_range(&mut self, rig: &Rig, va: u64, pa: u64, len: u64, size: u64, flags: u64) {
        let mut off = 0;
        while off < len {
            self.map(rig, va + off, pa + off, size, flags);
            off += size;
        }
    }

    /// Name this table in context `ctx`'s `cpu_root`.
    pub fn attach(&self, rig: &Rig, ctx: u32) {
        let word = faultline_abi::CpuRoot::x86_64(self.root)
            .unwrap_or_else(|| panic!("CPU root {:#x} above 1 TiB", self.root));
        rig.write_u32(
            context_entry(ctx) + ContextEntry::CPU_ROOT_OFFSET as u64,
            word.0,
        );
    }
}
