//! The compute ISA. Every instruction is one little-endian u64:
//! bits 7:0 opcode, 15:8 rd, 23:16 rs1, 31:24 rs2, 63:32 imm (signed).
//! There are 16 registers r0..r15 of 64 bits; r0 reads as zero and writes to
//! it are discarded. Branch targets are `pc + imm` in instructions.

pub const NUM_REGS: u8 = 16;
/// Bytes per instruction (code addresses are aligned to it).
pub const INSN_SIZE: u64 = 8;
/// Threads per warp.
pub const WARP_SIZE: u32 = 8;

pub const NOP: u8 = 0x00;
/// Thread finishes.
pub const EXIT: u8 = 0x01;
/// rd = sext(imm)
pub const MOVI: u8 = 0x02;
/// rd = (rd & 0xffff_ffff) | (imm << 32)
pub const MOVHI: u8 = 0x03;
/// rd = special register `imm` (`sreg::*`)
pub const S2R: u8 = 0x04;

// rd = rs1 op rs2 (wrapping; shifts use the low 6 bits)
pub const ADD: u8 = 0x10;
pub const SUB: u8 = 0x11;
pub const MUL: u8 = 0x12;
pub const AND: u8 = 0x13;
pub const OR: u8 = 0x14;
pub const XOR: u8 = 0x15;
pub const SHL: u8 = 0x16;
pub const SHR: u8 = 0x17;
pub const SAR: u8 = 0x18;
/// signed less-than: 1 or 0
pub const SLT: u8 = 0x19;
pub const SLTU: u8 = 0x1A;
/// unsigned divide; x / 0 = u64::MAX
pub const DIVU: u8 = 0x1B;
/// unsigned remainder; x % 0 = x
pub const REMU: u8 = 0x1C;

// rd = rs1 op sext(imm)
pub const ADDI: u8 = 0x20;
pub const MULI: u8 = 0x21;
pub const ANDI: u8 = 0x22;
pub const ORI: u8 = 0x23;
pub const XORI: u8 = 0x24;
pub const SHLI: u8 = 0x25;
pub const SHRI: u8 = 0x26;

// Memory through the MMU, address rs1 + sext(imm), naturally aligned.
/// rd = zext(load32)
pub const LD32: u8 = 0x30;
pub const LD64: u8 = 0x31;
/// store low 32 bits of rs2
pub const ST32: u8 = 0x32;
pub const ST64: u8 = 0x33;
/// rd = old; mem += rs2
pub const ATOM_ADD32: u8 = 0x38;
pub const ATOM_ADD64: u8 = 0x39;
/// rd = old; mem = rs2
pub const ATOM_XCHG32: u8 = 0x3A;
pub const ATOM_XCHG64: u8 = 0x3B;
/// if mem == rd { mem = rs2 }; rd = old
pub const ATOM_CAS32: u8 = 0x3C;
pub const ATOM_CAS64: u8 = 0x3D;

// Branches: if rs1 cmp rs2 { pc += imm } else { pc += 1 }
pub const BEQ: u8 = 0x40;
pub const BNE: u8 = 0x41;
pub const BLT: u8 = 0x42;
pub const BGE: u8 = 0x43;
pub const BLTU: u8 = 0x44;
pub const BGEU: u8 = 0x45;
/// pc += imm
pub const JMP: u8 = 0x46;

/// Special registers for S2R.
pub mod sreg {
    /// Thread index within the block.
    pub const TID: i32 = 0;
    /// Block index within the grid.
    pub const BID: i32 = 1;
    /// Threads per block.
    pub const NTID: i32 = 2;
    /// Blocks in the grid.
    pub const NBID: i32 = 3;
    /// BID * NTID + TID.
    pub const GTID: i32 = 4;
    /// Lane within the warp.
    pub const LANE: i32 = 5;
    /// Warp index within the launch.
    pub const WARP: i32 = 6;
}

/// Every opcode of the ISA, in encoding order: the decoder accepts these
/// and nothing else.
#[rustfmt::skip]
pub const OPCODES: [u8; 42] = [
    NOP, EXIT, MOVI, MOVHI, S2R,
    ADD, SUB, MUL, AND, OR, XOR, SHL, SHR, SAR, SLT, SLTU, DIVU, REMU,
    ADDI, MULI, ANDI, ORI, XORI, SHLI, SHRI,
    LD32, LD64, ST32, ST64,
    ATOM_ADD32, ATOM_ADD64, ATOM_XCHG32, ATOM_XCHG64, ATOM_CAS32, ATOM_CAS64,
    BEQ, BNE, BLT, BGE, BLTU, BGEU, JMP,
];

const KNOWN: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < OPCODES.len() {
        t[OPCODES[i] as usize] = true;
        i += 1;
    }
    t
};

/// Whether `op` is an opcode of the ISA.
pub const fn is_known(op: u8) -> bool {
    KNOWN[op as usize]
}

/// Encode one instruction.
pub const fn encode(op: u8, rd: u8, rs1: u8, rs2: u8, imm: i32) -> u64 {
    op as u64
        | (rd as u64) << 8
        | (rs1 as u64) << 16
        | (rs2 as u64) << 24
        | (imm as u32 as u64) << 32
}

/// Decoded fields (not validated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fields {
    pub op: u8,
    pub rd: u8,
    pub rs1: u8,
    pub rs2: u8,
    pub imm: i32,
}

pub const fn decode(word: u64) -> Fields {
    Fields {
        op: word as u8,
        rd: (word >> 8) as u8,
        rs1: (word >> 16) as u8,
        rs2: (word >> 24) as u8,
        imm: (word >> 32) as u32 as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isa_roundtrip() {
        let w = encode(ADDI, 3, 4, 5, -7);
        let f = decode(w);
        assert_eq!((f.op, f.rd, f.rs1, f.rs2, f.imm), (ADDI, 3, 4, 5, -7));
    }

    /// docs/gpu-abi.md "Compute ISA": the opcode ranges of its table.
    #[test]
    fn known_opcodes_are_the_documented_ones() {
        let documented = |op: u8| matches!(op, 0x00..=0x04 | 0x10..=0x1C | 0x20..=0x26 | 0x30..=0x33 | 0x38..=0x3D | 0x40..=0x46);
        for op in 0..=u8::MAX {
            assert_eq!(is_known(op), documented(op), "opcode {op:#04x}");
        }
        assert!(
            OPCODES.windows(2).all(|w| w[0] < w[1]),
            "listed once, in encoding order"
        );
    }
}
