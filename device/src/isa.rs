//! LAUNCH: the compute ISA interpreter. Warps of `WARP_SIZE` threads run
//! independently; a warp whose memory instruction faults stalls alone until
//! REPLAY while the others keep running.

use faultline_abi::isa::{self, decode, sreg, INSN_SIZE, NUM_REGS, WARP_SIZE};
use faultline_abi::{atomic_op, engine, le, Access, Status};
use vm_memory::GuestMemoryBackend;

use crate::engine::{Env, Outcome};
use crate::vram::Phys;

/// Warps resident at once; more start as these finish.
pub const MAX_RESIDENT_WARPS: usize = 64;
/// Warp-instructions per scheduling slice: some tens of µs even when every
/// lane's access misses the TLB (the device lock is held for at most
/// `STEP_SLICES` slices, `Device::process`). Checked after each warp's
/// turn, so a slice runs at most SLICE_STEPS + WARP_QUANTUM - 1; the next
/// slice resumes with the next warp, so every warp gets its turns.
pub const SLICE_STEPS: u64 = 64;
/// Instructions a warp runs before the scheduler moves to the next warp.
pub const WARP_QUANTUM: u32 = 16;

const W: usize = WARP_SIZE as usize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Insn {
    op: u8,
    rd: usize,
    rs1: usize,
    rs2: usize,
    imm: i32,
}

/// Decode and check a whole kernel: nothing runs unless all of it is valid.
fn decode_program(words: &[u64]) -> Result<Vec<Insn>, Status> {
    let len = words.len() as i64;
    words
        .iter()
        .enumerate()
        .map(|(pc, w)| {
            let f = decode(*w);
            if !isa::is_known(f.op) || f.rd >= NUM_REGS || f.rs1 >= NUM_REGS || f.rs2 >= NUM_REGS {
                return Err(Status::InvalidInstruction);
            }
            if (isa::BEQ..=isa::JMP).contains(&f.op) {
                let target = pc as i64 + i64::from(f.imm);
                if !(0..=len).contains(&target) {
                    return Err(Status::InvalidInstruction);
                }
            }
            if f.op == isa::S2R && !(sreg::TID..=sreg::WARP).contains(&f.imm) {
                return Err(Status::InvalidInstruction);
            }
            Ok(Insn {
                op: f.op,
                rd: f.rd.into(),
                rs1: f.rs1.into(),
                rs2: f.rs2.into(),
                imm: f.imm,
            })
        })
        .collect()
}

#[derive(Debug)]
struct Warp {
    index: u64,
    block: u32,
    first_tid: u32,
    /// Bit per lane: thread still running.
    live: u8,
    pc: [u32; W],
    regs: [[u64; NUM_REGS as usize]; W],
    /// Pages this warp waits on; empty when runnable.
    stalled: Vec<u64>,
}

enum WarpStep {
    Continue,
    Exited,
    Stalled,
}

#[derive(Debug)]
pub struct LaunchJob {
    code: u64,
    code_len: u32,
    grid: u32,
    block: u32,
    args: [u64; 4],
    fetched: Vec<u8>,
    fetch_stalled: Vec<u64>,
    prog: Vec<Insn>,
    warps: Vec<Warp>,
    next_warp: u64,
    /// Index in `warps` of the warp whose turn is next (round-robin across
    /// slices).
    cursor: usize,
    warps_per_block: u64,
    total_warps: u64,
    steps: u64,
}

impl LaunchJob {
    /// The execution state of a decoded LAUNCH (`Command::from_le_bytes`
    /// checked the geometry and the code range).
    pub fn new(code: u64, code_len: u32, grid: u32, block: u32, args: [u64; 4]) -> Self {
        let warps_per_block = u64::from(block.div_ceil(WARP_SIZE));
        Self {
            code,
            code_len,
            grid,
            block,
            args,
            fetched: Vec::new(),
            fetch_stalled: Vec::new(),
            prog: Vec::new(),
            warps: Vec::new(),
            next_warp: 0,
            cursor: 0,
            warps_per_block,
            total_warps: warps_per_block * u64::from(grid),
            steps: 0,
        }
    }

    pub fn unstall(&mut self) {
        self.fetch_stalled.clear();
        for w in &mut self.warps {
            w.stalled.clear();
        }
    }

    pub fn stalled_pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.fetch_stalled
            .iter()
            .chain(self.warps.iter().flat_map(|w| w.stalled.iter()))
            .copied()
    }

    fn fetch<M: GuestMemoryBackend>(&mut self, env: &mut Env<'_, M>) -> Result<bool, Status> {
        let insn = INSN_SIZE as usize;
        let total = self.code_len as usize * insn;
        while self.fetched.len() < total {
            let va = self.code + self.fetched.len() as u64;
            let mark = env.faults.len();
            let Some(t) = env.xlate(va, Access::Read, engine::COMPUTE, 0)? else {
                self.fetch_stalled
                    .extend(env.faults[mark..].iter().map(|f| f.page));
                return Ok(false);
            };
            let n = ((total - self.fetched.len()) as u64).min(t.avail) as usize;
            let start = self.fetched.len();
            self.fetched.resize(start + n, 0);
            env.phys().read(t.phys(), &mut self.fetched[start..])?;
        }
        let words: Vec<u64> = self
            .fetched
            .chunks_exact(insn)
            .map(|c| le::u64_at(c, 0).unwrap_or(0))
            .collect();
        self.prog = decode_program(&words)?;
        Ok(true)
    }

    fn spawn(&mut self) {
        while self.warps.len() < MAX_RESIDENT_WARPS && self.next_warp < self.total_warps {
            let index = self.next_warp;
            self.next_warp += 1;
            let block = (index / self.warps_per_block) as u32;
            let first_tid = (index % self.warps_per_block) as u32 * WARP_SIZE;
            let n = (self.block - first_tid).min(WARP_SIZE);
            let mut regs = [[0u64; NUM_REGS as usize]; W];
            for r in regs.iter_mut() {
                r[1..5].copy_from_slice(&self.args);
            }
            self.warps.push(Warp {
                index,
                block,
                first_tid,
                live: ((1u16 << n) - 1) as u8,
                pc: [0; W],
                regs,
                stalled: Vec::new(),
            });
        }
    }

    pub fn run<M: GuestMemoryBackend>(&mut self, env: &mut Env<'_, M>) -> Outcome {
        if self.prog.is_empty() {
            if !self.fetch_stalled.is_empty() {
                return Outcome::Stalled;
            }
            match self.fetch(env) {
                Ok(true) => {}
                Ok(false) => return Outcome::Stalled,
                Err(s) => return Outcome::Done(s, 0),
            }
        }
        let mut slice = 0u64;
        // Stalled warps passed over in a row: all of them means nothing can
        // run until REPLAY (or CANCEL).
        let mut skipped = 0;
        loop {
            self.spawn();
            if self.warps.is_empty() {
                return Outcome::Done(Status::Ok, 0);
            }
            if skipped >= self.warps.len() {
                // spawn() filled every free slot, so nothing can run.
                return Outcome::Stalled;
            }
            let i = self.cursor % self.warps.len();
            if !self.warps[i].stalled.is_empty() {
                skipped += 1;
                self.cursor = i + 1;
                continue;
            }
            skipped = 0;
            let mut exited = false;
            for _ in 0..WARP_QUANTUM {
                self.steps += 1;
                slice += 1;
                if self.steps > env.launch_step_limit {
                    return Outcome::Done(Status::Timeout, 0);
                }
                match self.step(i, env) {
                    Ok(WarpStep::Continue) => {}
                    Ok(WarpStep::Exited) => {
                        exited = true;
                        break;
                    }
                    Ok(WarpStep::Stalled) => break,
                    Err(s) => return Outcome::Done(s, 0),
                }
            }
            if exited {
                // The last warp moves into slot i and has its turn next.
                self.warps.swap_remove(i);
                self.cursor = i;
            } else {
                self.cursor = i + 1;
            }
            if slice >= SLICE_STEPS {
                return Outcome::Yield;
            }
        }
    }

    fn sreg(&self, w: &Warp, lane: usize, which: i32) -> u64 {
        let tid = u64::from(w.first_tid) + lane as u64;
        match which {
            sreg::TID => tid,
            sreg::BID => u64::from(w.block),
            sreg::NTID => u64::from(self.block),
            sreg::NBID => u64::from(self.grid),
            sreg::GTID => u64::from(w.block) * u64::from(self.block) + tid,
            sreg::LANE => lane as u64,
            _ => w.index,
        }
    }

    /// Execute one instruction of warp `wi` for the threads at the smallest
    /// PC.
    fn step<M: GuestMemoryBackend>(
        &mut self,
        wi: usize,
        env: &mut Env<'_, M>,
    ) -> Result<WarpStep, Status> {
        let w = &self.warps[wi];
        if w.live == 0 {
            return Ok(WarpStep::Exited);
        }
        let lanes = || (0..W).filter(move |l| w.live & (1 << l) != 0);
        let pc = lanes().map(|l| w.pc[l]).min().unwrap_or(0);
        let active: u8 = lanes()
            .filter(|l| w.pc[*l] == pc)
            .fold(0, |m, l| m | (1 << l));
        let Some(&ins) = self.prog.get(pc as usize) else {
            // Past the end: EXIT.
            self.warps[wi].live &= !active;
            return Ok(if self.warps[wi].live == 0 {
                WarpStep::Exited
            } else {
                WarpStep::Continue
            });
        };
        let imm = i64::from(ins.imm) as u64;
        // Executing lanes, without allocating on every instruction.
        let mut lane_buf = [0usize; W];
        let mut n = 0;
        for l in (0..W).filter(|l| active & (1 << l) != 0) {
            lane_buf[n] = l;
            n += 1;
        }
        let lanes = &lane_buf[..n];

        if (isa::LD32..=isa::ATOM_CAS64).contains(&ins.op) {
            return self.memory(wi, lanes, ins, env);
        }

        let mut sregs = [0u64; W];
        if ins.op == isa::S2R {
            for (k, &l) in lanes.iter().enumerate() {
                sregs[k] = self.sreg(w, l, ins.imm);
            }
        }
        let w = &mut self.warps[wi];
        for (k, &l) in lanes.iter().enumerate() {
            let r = &mut w.regs[l];
            let (a, b, d) = (r[ins.rs1], r[ins.rs2], r[ins.rd]);
            let mut next = pc + 1;
            let mut set = |v: u64| {
                if ins.rd != 0 {
                    r[ins.rd] = v;
                }
            };
            let branch = |c: bool| {
                if c {
                    (pc as i64 + imm as i64) as u32
                } else {
                    pc + 1
                }
            };
            match ins.op {
                isa::NOP => {}
                isa::EXIT => {
                    w.live &= !(1 << l);
                    continue;
                }
                isa::MOVI => set(imm),
                isa::MOVHI => set((d & 0xFFFF_FFFF) | (imm << 32)),
                isa::S2R => set(sregs[k]),
                isa::ADD => set(a.wrapping_add(b)),
                isa::SUB => set(a.wrapping_sub(b)),
                isa::MUL => set(a.wrapping_mul(b)),
                isa::AND => set(a & b),
                isa::OR => set(a | b),
                isa::XOR => set(a ^ b),
                isa::SHL => set(a << (b & 63)),
                isa::SHR => set(a >> (b & 63)),
                isa::SAR => set(((a as i64) >> (b & 63)) as u64),
                isa::SLT => set(u64::from((a as i64) < (b as i64))),
                isa::SLTU => set(u64::from(a < b)),
                isa::DIVU => set(a.checked_div(b).unwrap_or(u64::MAX)),
                isa::REMU => set(a.checked_rem(b).unwrap_or(a)),
                isa::ADDI => set(a.wrapping_add(imm)),
                isa::MULI => set(a.wrapping_mul(imm)),
                isa::ANDI => set(a & imm),
                isa::ORI => set(a | imm),
                isa::XORI => set(a ^ imm),
                isa::SHLI => set(a << (imm & 63)),
                isa::SHRI => set(a >> (imm & 63)),
                isa::BEQ => next = branch(a == b),
                isa::BNE => next = branch(a != b),
                isa::BLT => next = branch((a as i64) < (b as i64)),
                isa::BGE => next = branch((a as i64) >= (b as i64)),
                isa::BLTU => next = branch(a < b),
                isa::BGEU => next = branch(a >= b),
                isa::JMP => next = branch(true),
                // Memory ops were handled above; decode rejected the rest.
                _ => return Err(Status::InvalidInstruction),
            }
            w.pc[l] = next;
        }
        Ok(if w.live == 0 {
            WarpStep::Exited
        } else {
            WarpStep::Continue
        })
    }

    /// A memory instruction: translate every lane first; only if none
    /// faults do the accesses happen, so a retry after REPLAY is exact.
    fn memory<M: GuestMemoryBackend>(
        &mut self,
        wi: usize,
        lanes: &[usize],
        ins: Insn,
        env: &mut Env<'_, M>,
    ) -> Result<WarpStep, Status> {
        let wide = matches!(
            ins.op,
            isa::LD64 | isa::ST64 | isa::ATOM_ADD64 | isa::ATOM_XCHG64 | isa::ATOM_CAS64
        );
        let access = match ins.op {
            isa::LD32 | isa::LD64 => Access::Read,
            isa::ST32 | isa::ST64 => Access::Write,
            _ => Access::Atomic,
        };
        let size = if wide { 8 } else { 4 };
        let w = &self.warps[wi];
        let mark = env.faults.len();
        let mut at = [Phys::system(0); W];
        let mut faulted = false;
        for &l in lanes {
            let va = w.regs[l][ins.rs1].wrapping_add(i64::from(ins.imm) as u64);
            if !va.is_multiple_of(size) {
                return Err(Status::Misaligned);
            }
            match env.xlate(va, access, engine::COMPUTE, w.index as u32)? {
                Some(t) => at[l] = t.phys(),
                None => faulted = true,
            }
        }
        let w = &mut self.warps[wi];
        if faulted {
            let mut pages: Vec<u64> = env.faults[mark..].iter().map(|f| f.page).collect();
            pages.sort_unstable();
            pages.dedup();
            w.stalled = pages;
            return Ok(WarpStep::Stalled);
        }
        let mem = env.phys();
        for &l in lanes {
            let r = &mut w.regs[l];
            let result = match ins.op {
                isa::LD32 | isa::LD64 => Some(mem.load(at[l], wide)?),
                isa::ST32 | isa::ST64 => {
                    let n = if wide { 8 } else { 4 };
                    mem.write(at[l], &r[ins.rs2].to_le_bytes()[..n])?;
                    None
                }
                _ => {
                    let op = match ins.op {
                        isa::ATOM_ADD32 | isa::ATOM_ADD64 => atomic_op::ADD,
                        isa::ATOM_XCHG32 | isa::ATOM_XCHG64 => atomic_op::EXCHANGE,
                        _ => atomic_op::CAS,
                    };
                    let mask = if wide { u64::MAX } else { 0xFFFF_FFFF };
                    Some(mem.atomic(at[l], op, wide, r[ins.rs2] & mask, r[ins.rd] & mask)?)
                }
            };
            if let (Some(v), true) = (result, ins.rd != 0) {
                r[ins.rd] = v;
            }
            w.pc[l] += 1;
        }
        Ok(WarpStep::Continue)
    }
}
