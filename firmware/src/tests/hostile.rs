//! `gpu_hostile`: the firmware as a malicious driver. Seeded random BAR0
//! writes of every size, rings and buffers at random guest-physical
//! addresses (overlapping each other, beyond RAM, in the MMIO hole, at
//! BAR0), self-referencing and cyclic device page tables, roots in MMIO,
//! random commands, descriptor chains and control entries, RESET / ENABLE /
//! channel stop at random moments. Then a RESET must bring every register
//! back to its reset value, and the driver must probe and run a FILL + COPY
//! with correct data. `seed=` and `iterations=` on the command line; the
//! seed is printed so a failure can be replayed.
//!
//! The guest stays safe although the device is told garbage: every
//! guest-physical address the test hands the device, in a register or in a
//! structure the device reads addresses from, is outside the RAM the
//! firmware uses. Three scratch zones of RAM are reserved for it, and what
//! lives in them keeps that rule whatever the device reads them as:
//!
//! * T (translation): page tables and the context table. Only the CPU
//!   writes it. Every word, read as a PTE or a context root, points into T
//!   read-only (WRITE and ATOMIC clear, so a T page reached as a leaf is
//!   never written), into D with LEAF set (never followed as a table), or
//!   outside RAM.
//! * R (descriptors): descriptor tables. Only the CPU writes it, always as
//!   whole descriptors: an INDIRECT one points into R with a length that
//!   stays inside R, any other into D (64 bytes of room: the device reads a
//!   64-byte command and writes a 16-byte completion) or outside RAM.
//! * D (data): everything the device writes or reads as plain data (status
//!   block, fault buffer, control ring, avail and used rings, commands,
//!   completions, leaves), overlapping freely. Nothing in D is ever used
//!   as an address.
//!
//! Address registers are written only with whole aligned 32-bit writes: a
//! low half taken from an address of the register's zone (below 4 GiB) or
//! outside RAM, a high half of 0 or one that puts the address above 2^46,
//! so any mix of halves is safe. Sub-word writes skip them (the ABI ignores
//! those, and a device that did not would otherwise be handed a mixed
//! address). Size registers get anything: bounds are the device's job.
//!
//! Per iteration the work is a handful of MMIO accesses and a few hundred
//! instructions: guest CPL0 code runs emulated where KVM is nested.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use faultline_abi::{regs, status_block, DEVICE_MAGIC, NUM_COUNTERS};
use faultline_driver::gpu::{DmaRegion, Platform};

use super::Test;
use crate::gpu::FwPlatform;
use crate::println;

pub const TESTS: &[Test] = &[Test::new("gpu_hostile", gpu_hostile)];

/// Iterations without `iterations=` (a smoke run inside the default suite).
const DEFAULT_ITERATIONS: u64 = 300;
/// Seed without `seed=`.
const DEFAULT_SEED: u64 = 1;

/// xorshift64* seeded through splitmix64: a few lines, reproducible from
/// the printed seed, no dependency; statistical quality is irrelevant here.
pub(super) struct Rng(u64);

impl Rng {
    pub(super) fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    pub(super) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform enough in `0..n` (n > 0).
    pub(super) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

const PAGE: u64 = 4096;
const D_PAGES: usize = 1024; // 4 MiB: room for a 2 MiB fault buffer anywhere in its first half
const R_PAGES: usize = 4;
const T_PAGES: usize = 32;
/// The device reads at most this much at a descriptor's address.
const DESC_REACH: u64 = 64;
const DESC_SIZE: u64 = 16;
/// Where the MMIO-hole addresses are taken from: inside [3 GiB, 4 GiB),
/// below the APIC/flash area, with 256 MiB of room above each.
const HOLE: (u64, u64) = (0xc000_0000, 0xf000_0000);
/// Addresses at or above this are beyond any RAM a guest here can have.
const FAR: u64 = 1 << 46;

/// The three scratch zones and what else counts as "outside RAM".
struct Zones {
    d: DmaRegion,
    r: DmaRegion,
    t: DmaRegion,
    bar: u64,
    ram_end: u64,
}

fn within(z: &DmaRegion, a: u64, len: u64) -> bool {
    a >= z.phys() && a.saturating_add(len) <= z.phys() + z.len() as u64
}

impl Zones {
    /// An address outside RAM with `len` bytes of room: beyond the last
    /// RAM entry, in the MMIO hole, at BAR0, or far above everything.
    fn outside(&self, rng: &mut Rng, len: u64, align: u64) -> u64 {
        let a = match rng.below(4) {
            0 if self.ram_end + len < HOLE.0 => {
                self.ram_end + rng.below(HOLE.0 - self.ram_end - len)
            }
            1 => self.bar + rng.below(0x10000),
            2 => FAR + rng.below(1 << 40),
            _ => HOLE.0 + rng.below(HOLE.1 - HOLE.0),
        };
        a & !(align - 1)
    }

    /// An address in `z` with `len` bytes of room after it.
    fn inside(&self, z: &DmaRegion, rng: &mut Rng, len: u64, align: u64) -> u64 {
        let room = z.len() as u64 - len;
        (z.phys() + rng.below(room + 1)) & !(align - 1)
    }

    /// A page of `z` that is safe as a leaf of any size: not 2 MiB aligned
    /// unless the whole 2 MiB is in `z` (1 GiB alignment implies 2 MiB).
    fn leaf_page(&self, z: &DmaRegion, rng: &mut Rng) -> u64 {
        loop {
            let p = z.phys() + rng.below(z.len() as u64 / PAGE) * PAGE;
            if p & ((2 << 20) - 1) != 0 || within(z, p, 2 << 20) {
                return p;
            }
        }
    }

    /// A page outside RAM, safe as a leaf of any size.
    fn outside_page(&self, rng: &mut Rng) -> u64 {
        if rng.chance(10) {
            return HOLE.0; // a 1 GiB leaf over the whole hole
        }
        let p = self.outside(rng, 4 << 20, PAGE);
        // A 1 GiB-aligned one other than the hole's start could reach RAM
        // above 4 GiB.
        if p & ((1 << 30) - 1) == 0 && p != HOLE.0 {
            p + PAGE
        } else {
            p
        }
    }

    /// A word for T: as a PTE or a context root it points into T
    /// read-only, into D as a leaf, outside RAM, or nowhere (invalid).
    fn t_word(&self, rng: &mut Rng) -> u64 {
        let r = rng.next();
        // VALID (mostly), a reserved bit now and then, software bits.
        let mut flags = (r & 1 | u64::from(r & 0x30 != 0)) | (r & 0x06);
        if r & 0x3c0 == 0 {
            flags |= 1 << (3 + (r >> 10) % 4); // reserved: BAD_PTE
        }
        let soft = (r >> 16) & 0xf00
            | if r & (1 << 20) != 0 {
                (r >> 21) << 52
            } else {
                0
            };
        const LEAF: u64 = 1 << 7;
        const RW: u64 = 0x6;
        match (r >> 56) % 8 {
            0 => 0,
            1..=3 => {
                // Into T: tables, self references, cycles. Read-only.
                let leaf = if r & (1 << 12) != 0 { LEAF } else { 0 };
                self.leaf_page(&self.t, rng) | (flags & !RW) | leaf | soft
            }
            4 | 5 => self.leaf_page(&self.d, rng) | flags | LEAF | soft,
            _ => self.outside_page(rng) | flags | (r & LEAF) | soft,
        }
    }

    /// A descriptor for R at `slot` (16-byte aligned, inside R).
    fn desc(&self, rng: &mut Rng) -> [u64; 2] {
        let r = rng.next();
        // NEXT / WRITE / INDIRECT mostly, any bits now and then.
        let flags = if r & 0xf == 0 {
            (r >> 4) & 0xffff
        } else {
            (r >> 4) & 0x7
        };
        let next = (r >> 20) % 300;
        let (addr, len) = if flags & 4 != 0 {
            // An indirect table: inside R, its length too.
            let a = self.inside(&self.r, rng, DESC_SIZE, DESC_SIZE);
            let room = self.r.phys() + self.r.len() as u64 - a;
            (a, rng.below(room + 1).min(u64::from(u32::MAX)))
        } else {
            let a = if rng.chance(85) {
                self.inside(&self.d, rng, DESC_REACH, 1)
            } else {
                self.outside(rng, DESC_REACH, 1)
            };
            let len = match rng.below(4) {
                0 => 64,
                1 => 16,
                2 => rng.below(128),
                _ => rng.next() & 0xffff_ffff,
            };
            (a, len)
        };
        [addr, len | flags << 32 | next << 48]
    }
}

/// The address registers (device-wide and per channel) with the zone and
/// room each may point into.
#[derive(Clone, Copy)]
enum Kind {
    Status,
    FaultBuf,
    CtxTable,
    CtlRing,
    Desc,
    Avail,
    Used,
}

fn kind_of(lo: u64) -> Option<Kind> {
    Some(match lo {
        regs::STATUS_BLOCK_LO => Kind::Status,
        regs::FAULT_BUF_LO => Kind::FaultBuf,
        regs::CTX_TABLE_LO => Kind::CtxTable,
        regs::CTL_RING_LO => Kind::CtlRing,
        o if (regs::CHANNEL_BASE..regs::CHANNEL_BASE + 8 * regs::CHANNEL_STRIDE).contains(&o) => {
            match (o - regs::CHANNEL_BASE) % regs::CHANNEL_STRIDE {
                regs::CH_DESC_LO => Kind::Desc,
                regs::CH_AVAIL_LO => Kind::Avail,
                regs::CH_USED_LO => Kind::Used,
                _ => return None,
            }
        }
        _ => return None,
    })
}

/// The low-half offset of the address register the 32-bit word at `w`
/// belongs to, and whether `w` is its high half.
fn addr_reg(w: u64) -> Option<(u64, bool)> {
    if let Some(_k) = kind_of(w) {
        return Some((w, false));
    }
    kind_of(w - 4).map(|_| (w - 4, true))
}

impl Zones {
    /// A fresh address for a register of `kind`: in its zone with room for
    /// the largest structure it can describe, or outside RAM.
    fn addr_for(&self, rng: &mut Rng, kind: Kind, good: bool) -> u64 {
        let (zone, len, align) = match kind {
            Kind::Status => (&self.d, 128, 64),
            Kind::FaultBuf => (&self.d, 2 << 20, PAGE),
            Kind::CtxTable => (&self.t, 1024, PAGE),
            Kind::CtlRing => (&self.d, 4096 * 32, PAGE),
            Kind::Desc => (&self.r, 256 * DESC_SIZE, DESC_SIZE),
            Kind::Avail => (&self.d, 6 + 2 * 256, 2),
            Kind::Used => (&self.d, 6 + 8 * 256, 4),
        };
        if good {
            return self.inside(zone, rng, len, align);
        }
        match rng.below(10) {
            // Misaligned now and then, where the zone can take it.
            0 if !matches!(kind, Kind::Desc | Kind::CtxTable) => self.inside(zone, rng, len, 1),
            0..=6 => self.inside(zone, rng, len, align),
            _ => {
                let a = if rng.chance(50) { align } else { 1 };
                self.outside(rng, len, a)
            }
        }
    }

    /// The halves to write to a register of `kind`: the low half of a fresh
    /// address below 4 GiB, and 0 or a high half that makes it far.
    /// `good`: one the device should accept (aligned, in its zone).
    fn halves(&self, rng: &mut Rng, kind: Kind, good: bool) -> (u32, u32) {
        let lo = loop {
            let a = self.addr_for(rng, kind, good);
            if a >> 32 == 0 {
                break a as u32;
            }
        };
        let hi = if !good && rng.chance(20) {
            ((FAR >> 32) as u32) | (rng.next() as u32 & 0x00ff_ffff)
        } else {
            0
        };
        (lo, hi)
    }
}

/// What the test set up last (where it writes commands and ring entries).
#[derive(Clone, Copy, Default)]
struct Shadow {
    status: u64,
    ctl: u64,
    ctl_prod: u32,
    ctx_table: u64,
    /// VAs (< 1 GiB) the test mapped to a D page in context 0..4.
    mapped: [u64; 8],
    chans: [Chan; 8],
}

#[derive(Clone, Copy, Default)]
struct Chan {
    desc: u64,
    avail: u64,
    size: u32,
    idx: u16,
}

struct Hostile<'a> {
    p: &'a FwPlatform,
    z: Zones,
    rng: Rng,
    s: Shadow,
    nchan: u32,
}

/// Writes `v` at BAR0 + `off` with a `size`-byte store (any alignment).
fn mmio_write(p: &FwPlatform, off: u64, size: u64, v: u64) {
    let a = p.regs_virt() + off;
    // SAFETY: `off + size` ≤ 64 KiB, inside the uncached BAR0 mapping;
    // odd sizes and alignments are what the test is about (the ABI ignores
    // them, and x86 allows unaligned stores to UC memory).
    unsafe {
        match size {
            1 => (a as *mut u8).write_volatile(v as u8),
            2 => (a as *mut u16).write_unaligned(v as u16),
            4 => (a as *mut u32).write_unaligned(v as u32),
            _ => (a as *mut u64).write_unaligned(v),
        }
    }
}

fn mmio_read(p: &FwPlatform, off: u64, size: u64) -> u64 {
    let a = p.regs_virt() + off;
    // SAFETY: as in `mmio_write`; reads have no side effect but TIMESTAMP's latch.
    unsafe {
        match size {
            1 => u64::from((a as *const u8).read_volatile()),
            2 => u64::from((a as *const u16).read_unaligned()),
            4 => u64::from((a as *const u32).read_unaligned()),
            _ => (a as *const u64).read_unaligned(),
        }
    }
}

impl Hostile<'_> {
    fn d_write_u64(&self, pa: u64, v: u64) {
        let off = (pa - self.z.d.phys()) as usize;
        if off + 8 <= self.z.d.len() {
            self.z.d.write_u64(off & !7, v);
        }
    }

    fn in_d(&self, pa: u64, len: u64) -> bool {
        within(&self.z.d, pa, len)
    }

    /// A random BAR0 access: mostly the setup page, channel blocks,
    /// doorbells and counters; any size, any offset.
    fn random_access(&mut self) {
        let r = self.rng.next();
        let size = [1u64, 2, 4, 8][(r & 3) as usize];
        let off = match (r >> 2) % 10 {
            0..=2 => (r >> 8) % 0x80,
            3 | 4 => regs::CHANNEL_BASE + (r >> 8) % (9 * regs::CHANNEL_STRIDE),
            5 | 6 => regs::DOORBELL_BASE + (r >> 8) % 0x40,
            7 => regs::COUNTERS_BASE + (r >> 8) % 0x200,
            _ => (r >> 8) % 0x10000,
        }
        .min(0x10000 - size);
        if (r >> 40).is_multiple_of(4) {
            let _ = mmio_read(self.p, off, size);
            return;
        }
        // Address registers: whole aligned words of safe halves only.
        let (first, last) = (off & !3, (off + size - 1) & !3);
        let mut w = first;
        while w <= last {
            if let Some((lo, high)) = addr_reg(w) {
                self.write_addr_reg(lo, high);
                return;
            }
            w += 4;
        }
        if off & !3 == regs::RESET && !r.is_multiple_of(64) {
            return; // RESET has its own, rarer, action
        }
        mmio_write(self.p, off, size, self.rng.next());
    }

    fn write_addr_reg(&mut self, lo: u64, high: bool) {
        let kind = kind_of(lo).expect("an address register");
        let (l, h) = self.z.halves(&mut self.rng, kind, false);
        if high {
            self.p.write32(lo + 4, h);
        } else {
            self.p.write32(lo, l);
        }
    }

    fn set_addr(&mut self, lo: u64, good: bool) -> u64 {
        let kind = kind_of(lo).expect("an address register");
        let (l, h) = self.z.halves(&mut self.rng, kind, good);
        self.p.write32(lo, l);
        self.p.write32(lo + 4, h);
        u64::from(l) | u64::from(h) << 32
    }

    /// A size register value: mostly a valid power of two, sometimes junk.
    fn size(&mut self, max_log2: u64, good: bool) -> u32 {
        if good {
            return 1 << (1 + self.rng.below(max_log2));
        }
        match self.rng.below(8) {
            0 => self.rng.next() as u32,
            1 => 0,
            _ => 1 << (1 + self.rng.below(max_log2)),
        }
    }

    /// A whole device setup with fresh addresses, then ENABLE (or not).
    /// Mostly a setup the device accepts (then the chaos is in what it
    /// points to), else any mix of bad addresses and sizes.
    fn setup_and_enable(&mut self) {
        self.p.write32(regs::ENABLE, 0);
        let good = self.rng.chance(75);
        self.s.status = self.set_addr(regs::STATUS_BLOCK_LO, good);
        self.set_addr(regs::FAULT_BUF_LO, good);
        let fe = self.size(16, good);
        self.p.write32(regs::FAULT_BUF_ENTRIES, fe);
        self.s.ctx_table = self.set_addr(regs::CTX_TABLE_LO, good);
        self.s.ctl = self.set_addr(regs::CTL_RING_LO, good);
        let ce = self.size(12, good);
        self.p.write32(regs::CTL_RING_ENTRIES, ce);
        self.s.ctl_prod = 0;
        if self.rng.chance(90) {
            self.p.write32(regs::ENABLE, 1);
        }
    }

    fn setup_channel(&mut self, ch: u32) {
        let reg = |r| regs::channel_reg(ch, r);
        let c = &mut self.s.chans[ch as usize];
        *c = Chan::default();
        let good = self.rng.chance(75);
        let size = match self.rng.below(8) {
            0 if !good => self.rng.next() as u32 & 0x3ff,
            _ => 1 << self.rng.below(9),
        };
        self.p.write32(reg(regs::CH_ENABLE), 0);
        self.s.chans[ch as usize].size = size;
        self.p.write32(reg(regs::CH_QUEUE_SIZE), size);
        self.s.chans[ch as usize].desc = self.set_addr(reg(regs::CH_DESC_LO), good);
        self.s.chans[ch as usize].avail = self.set_addr(reg(regs::CH_AVAIL_LO), good);
        let used = self.set_addr(reg(regs::CH_USED_LO), good);
        if good && self.in_d(used, 6 + 8 * 256) {
            // Virtio rings start zeroed; the used ring is the device's.
            let off = (used - self.z.d.phys()) as usize;
            self.z.d.write_u32(off & !3, 0);
        }
        if good && self.in_d(self.s.chans[ch as usize].avail, 6 + 2 * 256) {
            let off = (self.s.chans[ch as usize].avail - self.z.d.phys()) as usize;
            self.z.d.write_u32(off & !3, 0);
        }
        self.p.write32(
            reg(regs::CH_CONTEXT),
            if self.rng.chance(80) {
                self.rng.below(4)
            } else {
                self.rng.below(70)
            } as u32,
        );
        self.p
            .write32(reg(regs::CH_FLAGS), self.rng.below(4) as u32);
        self.p.write32(reg(regs::CH_ENABLE), 1);
    }

    /// A random command (64 bytes) in D, and a chain for it in the
    /// channel's descriptor table when that is in R; then the avail entry
    /// and maybe the doorbell.
    fn post(&mut self, ch: u32) {
        let c = self.s.chans[ch as usize];
        let size = u64::from(c.size.clamp(1, 256));
        let cmd = self.z.inside(&self.z.d, &mut self.rng, 64, 8);
        let words = self.command();
        for (i, w) in words.iter().enumerate() {
            self.d_write_u64(cmd + 8 * i as u64, *w);
        }
        let r = &self.z.r;
        if within(r, c.desc, size * DESC_SIZE) {
            // Head: the command (read); then a completion (write); or junk.
            let head = self.rng.below(size);
            let tail = self.rng.below(size);
            let comp = self.z.inside(&self.z.d, &mut self.rng, 16, 8);
            let base = (c.desc - r.phys()) as usize;
            if self.rng.chance(70) {
                r.write_u64(base + head as usize * 16, cmd);
                r.write_u64(base + head as usize * 16 + 8, 64 | 1 << 32 | tail << 48);
                r.write_u64(base + tail as usize * 16, comp);
                r.write_u64(base + tail as usize * 16 + 8, 16 | 2 << 32);
            } else {
                let d = self.z.desc(&mut self.rng);
                r.write_u64(base + head as usize * 16, d[0]);
                r.write_u64(base + head as usize * 16 + 8, d[1]);
            }
            // (A misaligned ring is left to the device to refuse.)
            if self.in_d(c.avail, 4 + 2 * size) && c.avail.is_multiple_of(2) {
                let off = (c.avail - self.z.d.phys()) as usize;
                let slot = off + 4 + 2 * (c.idx as usize % size as usize);
                let h = if self.rng.chance(90) {
                    head as u16
                } else {
                    self.rng.next() as u16
                };
                self.z.d.write_u16(slot, h);
                let idx = c.idx.wrapping_add(1);
                self.s.chans[ch as usize].idx = idx;
                self.z.d.write_u16(off + 2, idx);
            }
        }
        if self.rng.chance(80) {
            self.p
                .write32(regs::DOORBELL_BASE + 4 * (3 + u64::from(ch)), 1);
        }
    }

    /// A random command: a valid opcode mostly, fields biased towards the
    /// small VA range the random page tables cover, small launches.
    fn command(&mut self) -> [u64; 8] {
        let mut w = [0u64; 8];
        for x in w.iter_mut() {
            *x = self.rng.next();
        }
        let op = if self.rng.chance(90) {
            1 + self.rng.below(5)
        } else {
            self.rng.below(256)
        };
        // Fields past the opcode word: VAs under 1 GiB, lengths under 64 KiB.
        // Word 0: opcode | flags << 32 (flags mostly 0 or SIZE64).
        let flags = if self.rng.chance(80) {
            self.rng.below(2)
        } else {
            w[0] >> 32
        };
        w[0] = op | flags << 32;
        for x in w[1..4].iter_mut() {
            if self.rng.chance(80) {
                *x &= (1 << 30) - 1;
            }
        }
        // Reserved words clear mostly (LAUNCH's are its args; ATOMIC's
        // first is its op).
        if op != 5 && self.rng.chance(85) {
            w[4..].fill(0);
            if op == 3 {
                w[4] = self.rng.below(3);
            }
        }
        match op {
            // FILL dst, len, pattern / COPY dst, src, len: short lengths.
            1 => w[2] &= 0xffff,
            2 => w[3] &= 0xffff,
            // LAUNCH code, code_len | grid << 32, block: small launches.
            5 => {
                w[2] = (1 + self.rng.below(16)) | (1 + self.rng.below(4)) << 32;
                w[3] = 1 + self.rng.below(64);
            }
            _ => {}
        }
        // Now and then on a page the test mapped, so some commands succeed.
        let m = self.s.mapped[self.rng.below(8) as usize];
        if m != 0 && self.rng.chance(50) {
            let off = self.rng.below(PAGE / 2) & !7;
            w[1] = m + off;
            match op {
                1 => w[2] = self.rng.below(PAGE - off),
                2 => {
                    w[2] = m + PAGE / 2 + (self.rng.below(PAGE / 4) & !7);
                    w[3] = self.rng.below(PAGE / 4);
                }
                5 => w[1] = m,
                _ => {}
            }
        }
        w
    }

    /// A control entry in the control ring (in D), published.
    fn control(&mut self) {
        let entries = 64; // wherever the device's count lands, stay in the first 64
        let ctl = self.s.ctl;
        if !self.in_d(ctl, 32 * entries)
            || !self.in_d(self.s.status, 128)
            || !self.s.status.is_multiple_of(4)
        {
            return;
        }
        let slot = ctl + 32 * u64::from(self.s.ctl_prod % entries as u32);
        let op = if self.rng.chance(90) {
            1 + self.rng.below(6)
        } else {
            self.rng.next() & 0xffff_ffff
        };
        let ctx = self.rng.below(70);
        self.d_write_u64(slot, op);
        let (notify, start, len) = (
            self.rng.below(2),
            self.rng.next() & ((1 << 31) - 1),
            self.rng.next() & ((1 << 22) - 1),
        );
        self.d_write_u64(slot + 8, ctx | notify << 32);
        self.d_write_u64(slot + 16, start);
        self.d_write_u64(slot + 24, len);
        self.s.ctl_prod = self.s.ctl_prod.wrapping_add(1);
        let sb = (self.s.status - self.z.d.phys()) as usize;
        self.z
            .d
            .write_u32(sb + status_block::CTL_PROD as usize, self.s.ctl_prod);
        self.p.write32(regs::DB_CONTROL, 1);
    }

    /// Rewrites a few words of T: page tables, context entries, cycles.
    fn mutate_t(&mut self) {
        for _ in 0..1 + self.rng.below(8) {
            let off = self.rng.below(self.z.t.len() as u64 / 8) as usize * 8;
            let w = self.z.t_word(&mut self.rng);
            self.z.t.write_u64(off, w);
        }
    }

    /// A 4-level mapping of a random VA under 1 GiB to a D page in
    /// context 0..4 (if the context table is in T), built from T pages;
    /// sometimes self-referencing or cyclic, sometimes rooted outside RAM.
    fn map_page(&mut self) {
        const VALID: u64 = 1;
        const LEAF: u64 = 1 << 7;
        let t = &self.z.t;
        if !within(t, self.s.ctx_table, 1024) {
            return;
        }
        let rng = &mut self.rng;
        let va = rng.below(1 << 18) << 12;
        let k = rng.below(4);
        let ctx = (self.s.ctx_table - t.phys()) as usize + 16 * k as usize;
        let mut pages = [0u64; 4];
        for p in pages.iter_mut() {
            *p = t.phys() + rng.below(t.len() as u64 / PAGE) * PAGE;
        }
        match rng.below(10) {
            0 => pages[1] = pages[0], // the root refers to itself
            1 => pages[3] = pages[1], // a cycle through two levels
            _ => {}
        }
        let root = if rng.chance(15) {
            self.z.outside_page(rng)
        } else {
            pages[0]
        };
        // Context entry: root, then flags VALID in a word that, read as a
        // PTE, points far outside RAM.
        t.write_u64(ctx, root);
        t.write_u64(ctx + 8, VALID | FAR);
        let leaf = self.z.leaf_page(&self.z.d, rng);
        let rw = if rng.chance(80) {
            0x6
        } else {
            rng.below(8) & 0x6
        };
        for level in (1..=4u32).rev() {
            let idx = (va >> (12 + 9 * (level - 1))) & 511;
            let table = pages[4 - level as usize];
            if !within(t, table, PAGE) {
                break;
            }
            let entry = if level == 1 {
                leaf | VALID | rw | LEAF
            } else {
                pages[5 - level as usize] | VALID
            };
            t.write_u64((table - t.phys()) as usize + 8 * idx as usize, entry);
        }
        let slot = rng.below(8) as usize;
        self.s.mapped[slot] = va;
    }

    /// Rewrites a few descriptors of R.
    fn mutate_r(&mut self) {
        for _ in 0..1 + self.rng.below(4) {
            let off = self.rng.below(self.z.r.len() as u64 / DESC_SIZE) as usize * 16;
            let d = self.z.desc(&mut self.rng);
            self.z.r.write_u64(off, d[0]);
            self.z.r.write_u64(off + 8, d[1]);
        }
    }

    /// Drains or corrupts the fault GET index, replays.
    fn faults(&mut self) {
        if self.in_d(self.s.status, 128) && self.s.status.is_multiple_of(4) {
            let sb = (self.s.status - self.z.d.phys()) as usize;
            let get = if self.rng.chance(50) {
                self.z.d.read_u32(sb + status_block::FAULT_PUT as usize)
            } else {
                self.rng.next() as u32
            };
            self.z
                .d
                .write_u32(sb + status_block::FAULT_GET as usize, get);
            self.p.write32(regs::DB_FAULT_GET, 1);
        }
        if self.rng.chance(70) {
            self.p.write32(regs::DB_REPLAY, 1);
        }
    }

    fn step(&mut self) {
        let ch = self.rng.below(u64::from(self.nchan.max(1))) as u32;
        match self.rng.below(200) {
            0..=39 => {
                for _ in 0..1 + self.rng.below(4) {
                    self.random_access();
                }
            }
            // (Re)configure what is not running, so that most of the time
            // something is.
            40..=59 => {
                if self.p.read32(regs::STATUS) & 1 == 0 {
                    self.setup_and_enable();
                } else if self.p.read32(regs::channel_reg(ch, regs::CH_ENABLE)) & 1 == 0 {
                    self.setup_channel(ch);
                }
            }
            60..=119 => self.post(ch),
            120..=134 => self.control(),
            135..=149 => self.mutate_t(),
            150..=164 => self.map_page(),
            165..=174 => self.mutate_r(),
            175..=189 => self.faults(),
            190..=193 => self.setup_and_enable(),
            194..=196 => self.p.write32(regs::channel_reg(ch, regs::CH_ENABLE), 0),
            197 => self.p.write32(regs::ENABLE, self.rng.below(2) as u32),
            _ => self.p.write32(regs::RESET, regs::RESET_VALUE),
        }
        // Interrupts arrive as they will; forget them.
        self.p.take_interrupts();
    }
}

/// The reset value of every 32-bit register word in BAR0's defined
/// windows (`init`: what the identity and sizing registers read before
/// the test), compared after RESET.
fn check_reset_state(p: &FwPlatform, init: &[(u64, u32)], nchan: u32) -> Result<(), String> {
    let mut bad = Vec::new();
    let mut expect = |off: u64, want: u32| {
        let got = p.read32(off);
        if got != want && bad.len() < 8 {
            bad.push(format!("{off:#x} reads {got:#x}, reset value {want:#x}"));
        }
    };
    for off in (0..0x80).step_by(4) {
        if off == regs::TIMESTAMP_LO || off == regs::TIMESTAMP_HI {
            continue;
        }
        let want = match init.iter().find(|(o, _)| *o == off) {
            Some(&(_, v)) => v,
            None if off == regs::INT_ENABLE => 0xf,
            None => 0,
        };
        expect(off, want);
    }
    for off in (regs::CHANNEL_BASE..regs::CHANNEL_BASE + 8 * regs::CHANNEL_STRIDE).step_by(4) {
        expect(off, 0);
    }
    for db in 0..3 + u64::from(nchan) {
        expect(regs::DOORBELL_BASE + 4 * db, 0);
    }
    for c in 0..NUM_COUNTERS {
        expect(regs::counter(c), 0);
        expect(regs::upper_half(regs::counter(c)), 0);
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(format!("after RESET: {}", bad.join("; ")))
    }
}

fn gpu_hostile() -> Result<(), String> {
    let g = super::gpu::device()?;
    let p = &g.platform;
    let (seed, iterations) = {
        let o = super::params();
        (
            o.seed.unwrap_or(DEFAULT_SEED),
            o.iterations.unwrap_or(DEFAULT_ITERATIONS),
        )
    };
    println!("gpu_hostile: seed {seed}, {iterations} iterations");
    p.write32(regs::RESET, regs::RESET_VALUE);
    let init: Vec<(u64, u32)> = [
        regs::MAGIC,
        regs::VERSION,
        regs::NUM_CONTEXTS,
        regs::NUM_CHANNELS,
        regs::FAULT_BUF_MAX,
        regs::TLB_ENTRIES,
    ]
    .iter()
    .map(|&o| (o, p.read32(o)))
    .collect();
    if init[0].1 != DEVICE_MAGIC {
        return Err(format!("MAGIC reads {:#x} before the test", init[0].1));
    }
    let nchan = init[3].1.min(8);
    let frames_before = crate::mm::frames::stats().free;
    let alloc = |n| {
        p.dma_alloc(n)
            .ok_or_else(|| format!("no {n} contiguous scratch pages"))
    };
    let z = Zones {
        d: alloc(D_PAGES)?,
        r: alloc(R_PAGES)?,
        t: alloc(T_PAGES)?,
        bar: g.bar.base,
        ram_end: crate::mm::ram_end(),
    };
    if [&z.d, &z.r, &z.t]
        .iter()
        .any(|r| r.phys() + r.len() as u64 > HOLE.0)
    {
        for r in [z.d, z.r, z.t] {
            p.dma_free(r);
        }
        return Err("scratch zones must lie below 3 GiB".into());
    }
    let mut h = Hostile {
        p,
        z,
        rng: Rng::new(seed),
        s: Shadow::default(),
        nchan,
    };
    // R holds only safe descriptors from the start.
    for off in (0..h.z.r.len()).step_by(16) {
        let d = h.z.desc(&mut h.rng);
        h.z.r.write_u64(off, d[0]);
        h.z.r.write_u64(off + 8, d[1]);
    }
    for _ in 0..iterations {
        h.step();
    }
    // Whatever state it is in, RESET brings it back, and the device no
    // longer touches the scratch zones.
    p.write32(regs::RESET, regs::RESET_VALUE);
    p.take_interrupts();
    let reset_ok = check_reset_state(p, &init, nchan);
    let Hostile { z, .. } = h;
    for r in [z.d, z.r, z.t] {
        p.dma_free(r);
    }
    reset_ok?;
    super::gpu::probe_fill_copy(g)?;
    super::gpu::no_frames_leaked(frames_before)
}
