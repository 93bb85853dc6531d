//! Engine commands and their completions (docs/gpu-abi.md "Commands").
//!
//! Every command is 64 bytes in the first device-readable descriptor of a
//! chain whose first device-writable descriptor receives a [`Completion`].
//! The `#[repr(C)]` views below are the layout of each opcode; [`Command`]
//! is the one encoder and decoder of it, and the decoder is also the
//! validator: whatever it refuses, the device completes with the status it
//! returns, before the command has any effect.

use core::mem::offset_of;

use bitflags::bitflags;

use crate::isa;
use crate::le::{code_enum, field, le_struct};
use crate::paging::VA_LIMIT;
use crate::status::Status;

code_enum! {
    /// Command opcodes (first u32 of every command).
    pub enum Opcode {
        Fill = 1,
        Copy = 2,
        Atomic = 3,
        SemaphoreRelease = 4,
        Launch = 5,
        Migrate = 6,
    }
}

impl Opcode {
    /// Short name, as in the per-opcode counters (`cmd_<name>`).
    pub const fn name(self) -> &'static str {
        match self {
            Opcode::Fill => "fill",
            Opcode::Copy => "copy",
            Opcode::Atomic => "atomic",
            Opcode::SemaphoreRelease => "semaphore",
            Opcode::Launch => "launch",
            Opcode::Migrate => "migrate",
        }
    }

    /// The opcode field of an encoded command, if it names an opcode.
    pub fn of(cmd: &[u8; COMMAND_SIZE]) -> Option<Opcode> {
        Opcode::from_u32(u32::from_le_bytes(field(
            cmd,
            offset_of!(RawCommand, opcode),
        )))
    }
}

pub const COMMAND_SIZE: usize = 64;

/// Largest FILL/COPY length.
pub const MAX_TRANSFER: u64 = 1 << 40;
/// Limits of LAUNCH.
pub const MAX_CODE_LEN: u32 = 4096;
pub const MAX_BLOCK: u32 = 1024;
pub const MAX_GRID: u32 = 1 << 20;
/// Most pages one MIGRATE moves (its list is read whole before the first
/// copy: at most 8 KiB).
pub const MAX_MIGRATE_PAGES: u32 = 512;
/// Alignment of a MIGRATE list (its entries' size).
pub const MIGRATE_LIST_ALIGN: u64 = MigrateEntry::SIZE as u64;

/// Instructions one launch may execute in total (summed over warps) before
/// failing with `Status::Timeout`.
pub const MAX_LAUNCH_STEPS: u64 = 1 << 28;

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RawCommand {
    pub opcode: u32,
    pub flags: u32,
    pub words: [u64; 7],
}
const _: () = assert!(core::mem::size_of::<RawCommand>() == COMMAND_SIZE);

/// FILL: write `len` bytes at `dst`; byte `i` is byte `(i % 8)` of `pattern`
/// (little-endian). Needs WRITE on every page.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FillCommand {
    pub opcode: u32,
    pub flags: u32,
    pub dst: u64,
    pub len: u64,
    pub pattern: u64,
    pub _reserved: [u64; 4],
}
const _: () = assert!(core::mem::size_of::<FillCommand>() == COMMAND_SIZE);

/// COPY: copy `len` bytes from `src` to `dst` (GPU VAs of the channel's
/// context). Overlapping ranges are a bad command.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyCommand {
    pub opcode: u32,
    pub flags: u32,
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub _reserved: [u64; 4],
}
const _: () = assert!(core::mem::size_of::<CopyCommand>() == COMMAND_SIZE);

/// ATOMIC operations (`AtomicCommand::op`).
pub mod atomic_op {
    pub const ADD: u32 = 0;
    pub const EXCHANGE: u32 = 1;
    /// Compare-and-swap: if *va == compare then *va = operand.
    pub const CAS: u32 = 2;
}

bitflags! {
    /// Flags of ATOMIC and SEMAPHORE_RELEASE commands.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct SizeFlags: u32 {
        /// 64-bit operand (default 32-bit).
        const SIZE64 = 1 << 0;
    }
}

/// ATOMIC: naturally aligned 32/64-bit atomic at `va`; the old value is
/// returned in `Completion::result`. Needs VALID|WRITE|ATOMIC.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AtomicCommand {
    pub opcode: u32,
    /// `SizeFlags`.
    pub flags: u32,
    pub va: u64,
    pub operand: u64,
    pub compare: u64,
    /// `atomic_op::*`.
    pub op: u32,
    pub _reserved0: u32,
    pub _reserved: [u64; 3],
}
const _: () = assert!(core::mem::size_of::<AtomicCommand>() == COMMAND_SIZE);

/// SEMAPHORE_RELEASE: store `value` (32/64-bit, naturally aligned, release
/// order after everything earlier on the channel) at `va`. Needs WRITE.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SemaphoreCommand {
    pub opcode: u32,
    /// `SizeFlags`.
    pub flags: u32,
    pub va: u64,
    pub value: u64,
    pub _reserved: [u64; 5],
}
const _: () = assert!(core::mem::size_of::<SemaphoreCommand>() == COMMAND_SIZE);

/// LAUNCH: run `code_len` instructions fetched from GPU VA `code` (8-byte
/// aligned) on `grid` blocks of `block` threads. Registers r1..r4 start with
/// `args`, all others with 0.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LaunchCommand {
    pub opcode: u32,
    pub flags: u32,
    pub code: u64,
    pub code_len: u32,
    pub grid: u32,
    pub block: u32,
    pub _reserved: u32,
    pub args: [u64; 4],
}
const _: () = assert!(core::mem::size_of::<LaunchCommand>() == COMMAND_SIZE);

bitflags! {
    /// Flags of MIGRATE.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct MigrateFlags: u32 {
        /// Every page of the list is 2 MiB (else 4 KiB).
        const LARGE = 1 << 0;
    }
}

/// MIGRATE: copy `count` pages between physical locations (system memory
/// or VRAM) named by the list at guest-physical `list`, bypassing the MMU,
/// as a copy engine moves pages for migration.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MigrateCommand {
    pub opcode: u32,
    /// `MigrateFlags`.
    pub flags: u32,
    /// GPA of `count` `MigrateEntry`s in system memory, 16-byte aligned.
    pub list: u64,
    pub count: u32,
    pub _reserved0: u32,
    pub _reserved: [u64; 5],
}
const _: () = assert!(core::mem::size_of::<MigrateCommand>() == COMMAND_SIZE);

/// One page of a MIGRATE list: copy the page at `src` to the page at `dst`.
/// Each address is page aligned (4 KiB, or 2 MiB with `LARGE`) and bit 0
/// names its aperture ([`MigrateEntry::VRAM`]: an offset in VRAM, else a
/// GPA); bits 1..11 are reserved (zero).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MigrateEntry {
    pub src: u64,
    pub dst: u64,
}
const _: () = assert!(core::mem::size_of::<MigrateEntry>() == 16);
le_struct!(MigrateEntry { src: u64, dst: u64 });

/// A physical location: the aperture and the address in it (a MIGRATE
/// entry's source or destination; inside the device, where any engine
/// access goes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhysPage {
    /// An offset in the device's VRAM, else a guest-physical address.
    pub vram: bool,
    pub addr: u64,
}

impl PhysPage {
    pub const fn system(gpa: u64) -> PhysPage {
        PhysPage {
            vram: false,
            addr: gpa,
        }
    }
    pub const fn vram(offset: u64) -> PhysPage {
        PhysPage {
            vram: true,
            addr: offset,
        }
    }
    /// The location `n` bytes further on, in the same aperture.
    pub const fn add(self, n: u64) -> PhysPage {
        PhysPage {
            vram: self.vram,
            addr: self.addr.wrapping_add(n),
        }
    }
    /// The entry word: the address with the aperture in bit 0.
    pub const fn word(self) -> u64 {
        self.addr | (self.vram as u64 * MigrateEntry::VRAM)
    }
}

impl MigrateEntry {
    /// Aperture bit of `src` / `dst`: the address is a VRAM offset.
    pub const VRAM: u64 = 1 << 0;
    /// Bits of an address word that must be zero (1..11).
    pub const RESERVED: u64 = 0xFFE;

    pub const fn new(src: PhysPage, dst: PhysPage) -> MigrateEntry {
        MigrateEntry {
            src: src.word(),
            dst: dst.word(),
        }
    }

    /// Validate for pages of `page` bytes: `Err` is the status the device
    /// completes the whole command with (docs/gpu-abi.md "MIGRATE").
    pub fn decode(&self, page: u64) -> Result<(PhysPage, PhysPage), Status> {
        let one = |w: u64| {
            if w & Self::RESERVED != 0 {
                return Err(Status::BadList);
            }
            let addr = w & !(Self::VRAM | Self::RESERVED);
            if !addr.is_multiple_of(page) {
                return Err(Status::Misaligned);
            }
            Ok(PhysPage {
                vram: w & Self::VRAM != 0,
                addr,
            })
        };
        let (src, dst) = (one(self.src)?, one(self.dst)?);
        if src == dst {
            return Err(Status::BadList);
        }
        Ok((src, dst))
    }
}

/// One engine command as the driver builds it and the device decodes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Byte `i` of `[dst, dst + len)` = byte `i % 8` of `pattern`.
    Fill {
        /// Destination VA.
        dst: u64,
        /// Bytes.
        len: u64,
        /// Little-endian pattern.
        pattern: u64,
    },
    /// Copy `len` bytes from `src` to `dst` (no overlap).
    Copy {
        /// Destination VA.
        dst: u64,
        /// Source VA.
        src: u64,
        /// Bytes.
        len: u64,
    },
    /// Atomic `op` ([`atomic_op`]) at `va`; the completion's
    /// result is the old value.
    Atomic {
        /// Naturally aligned VA.
        va: u64,
        /// `atomic_op::*`.
        op: u32,
        /// 64-bit operand (else 32-bit).
        wide: bool,
        /// Operand (new value for EXCHANGE / CAS).
        operand: u64,
        /// CAS comparison value.
        compare: u64,
    },
    /// Release-store `value` at `va`.
    SemaphoreRelease {
        /// Naturally aligned VA.
        va: u64,
        /// 64-bit store (else 32-bit).
        wide: bool,
        /// Value.
        value: u64,
    },
    /// Run a kernel (docs/gpu-abi.md "Compute ISA").
    Launch {
        /// VA of the code (8-byte aligned).
        code: u64,
        /// Instructions.
        code_len: u32,
        /// Blocks.
        grid: u32,
        /// Threads per block.
        block: u32,
        /// Initial r1..r4.
        args: [u64; 4],
    },
    /// Copy the `count` pages listed at GPA `list` ([`MigrateEntry`]).
    Migrate {
        /// GPA of the list (16-byte aligned, system memory).
        list: u64,
        /// Entries, 1..=`MAX_MIGRATE_PAGES`.
        count: u32,
        /// 2 MiB pages (else 4 KiB).
        large: bool,
    },
    /// Any 64 bytes (tests of the device's validation). Never decoded.
    Raw([u64; 8]),
}

/// `[va, va + len)` lies below 2^48.
fn range_ok(va: u64, len: u64) -> bool {
    va.checked_add(len).is_some_and(|end| end <= VA_LIMIT)
}

impl Command {
    pub const SIZE: usize = COMMAND_SIZE;

    /// The 64-byte encoding as eight words (little-endian in memory): what
    /// a driver stores into the command slot, one word at a time.
    pub fn encode(&self) -> [u64; 8] {
        let head = |op: Opcode, flags: u32| u64::from(op as u32) | u64::from(flags) << 32;
        match *self {
            Command::Fill { dst, len, pattern } => {
                [head(Opcode::Fill, 0), dst, len, pattern, 0, 0, 0, 0]
            }
            Command::Copy { dst, src, len } => [head(Opcode::Copy, 0), dst, src, len, 0, 0, 0, 0],
            Command::Atomic {
                va,
                op,
                wide,
                operand,
                compare,
            } => [
                head(Opcode::Atomic, u32::from(wide)),
                va,
                operand,
                compare,
                u64::from(op),
                0,
                0,
                0,
            ],
            Command::SemaphoreRelease { va, wide, value } => [
                head(Opcode::SemaphoreRelease, u32::from(wide)),
                va,
                value,
                0,
                0,
                0,
                0,
                0,
            ],
            Command::Launch {
                code,
                code_len,
                grid,
                block,
                args,
            } => [
                head(Opcode::Launch, 0),
                code,
                u64::from(code_len) | u64::from(grid) << 32,
                u64::from(block),
                args[0],
                args[1],
                args[2],
                args[3],
            ],
            Command::Migrate { list, count, large } => [
                head(Opcode::Migrate, u32::from(large)),
                list,
                u64::from(count),
                0,
                0,
                0,
                0,
                0,
            ],
            Command::Raw(w) => w,
        }
    }

    /// Decodes and validates eight words (see [`Command::from_le_bytes`]).
    pub fn decode(words: [u64; 8]) -> Result<Command, Status> {
        let mut b = [0u8; COMMAND_SIZE];
        for (chunk, w) in b.chunks_exact_mut(8).zip(words) {
            chunk.copy_from_slice(&w.to_le_bytes());
        }
        Self::from_le_bytes(&b)
    }

    /// The 64 bytes the device reads.
    pub fn to_le_bytes(&self) -> [u8; COMMAND_SIZE] {
        let mut b = [0u8; COMMAND_SIZE];
        for (chunk, w) in b.chunks_exact_mut(8).zip(self.encode()) {
            chunk.copy_from_slice(&w.to_le_bytes());
        }
        b
    }

    /// Decodes the 64 bytes of a command and checks every field against the
    /// rules of docs/gpu-abi.md "Commands". `Err` is the status the device
    /// completes such a command with; the first rule broken decides it, in
    /// this order per opcode: the opcode, flags and reserved fields and
    /// limits (`InvalidCommand`), addresses (`BadAddress`), alignment
    /// (`Misaligned`), and for COPY overlap last (`InvalidCommand`).
    pub fn from_le_bytes(b: &[u8; COMMAND_SIZE]) -> Result<Command, Status> {
        let u32_at = |at: usize| u32::from_le_bytes(field(b, at));
        let u64_at = |at: usize| u64::from_le_bytes(field(b, at));
        // Reserved fields run from `at` to the end of the command.
        let zero_from = |at: usize| b.iter().skip(at).all(|x| *x == 0);
        let flags = u32_at(offset_of!(RawCommand, flags));
        let op = Opcode::of(b).ok_or(Status::InvalidOpcode)?;
        Ok(match op {
            Opcode::Fill => {
                let dst = u64_at(offset_of!(FillCommand, dst));
                let len = u64_at(offset_of!(FillCommand, len));
                let pattern = u64_at(offset_of!(FillCommand, pattern));
                if flags != 0
                    || !zero_from(offset_of!(FillCommand, _reserved))
                    || len > MAX_TRANSFER
                {
                    return Err(Status::InvalidCommand);
                }
                if !range_ok(dst, len) {
                    return Err(Status::BadAddress);
                }
                Command::Fill { dst, len, pattern }
            }
            Opcode::Copy => {
                let dst = u64_at(offset_of!(CopyCommand, dst));
                let src = u64_at(offset_of!(CopyCommand, src));
                let len = u64_at(offset_of!(CopyCommand, len));
                if flags != 0
                    || !zero_from(offset_of!(CopyCommand, _reserved))
                    || len > MAX_TRANSFER
                {
                    return Err(Status::InvalidCommand);
                }
                if !range_ok(dst, len) || !range_ok(src, len) {
                    return Err(Status::BadAddress);
                }
                if len != 0 && dst < src + len && src < dst + len {
                    return Err(Status::InvalidCommand);
                }
                Command::Copy { dst, src, len }
            }
            Opcode::Atomic => {
                let va = u64_at(offset_of!(AtomicCommand, va));
                let operand = u64_at(offset_of!(AtomicCommand, operand));
                let compare = u64_at(offset_of!(AtomicCommand, compare));
                let aop = u32_at(offset_of!(AtomicCommand, op));
                let flags = SizeFlags::from_bits(flags).ok_or(Status::InvalidCommand)?;
                if !zero_from(offset_of!(AtomicCommand, _reserved0)) || aop > atomic_op::CAS {
                    return Err(Status::InvalidCommand);
                }
                let wide = flags.contains(SizeFlags::SIZE64);
                if !wide && (operand >> 32 != 0 || compare >> 32 != 0) {
                    return Err(Status::InvalidCommand);
                }
                if va >= VA_LIMIT {
                    return Err(Status::BadAddress);
                }
                if !va.is_multiple_of(if wide { 8 } else { 4 }) {
                    return Err(Status::Misaligned);
                }
                Command::Atomic {
                    va,
                    op: aop,
                    wide,
                    operand,
                    compare,
                }
            }
            Opcode::SemaphoreRelease => {
                let va = u64_at(offset_of!(SemaphoreCommand, va));
                let value = u64_at(offset_of!(SemaphoreCommand, value));
                let flags = SizeFlags::from_bits(flags).ok_or(Status::InvalidCommand)?;
                let wide = flags.contains(SizeFlags::SIZE64);
                if !zero_from(offset_of!(SemaphoreCommand, _reserved))
                    || (!wide && value >> 32 != 0)
                {
                    return Err(Status::InvalidCommand);
                }
                if va >= VA_LIMIT {
                    return Err(Status::BadAddress);
                }
                if !va.is_multiple_of(if wide { 8 } else { 4 }) {
                    return Err(Status::Misaligned);
                }
                Command::SemaphoreRelease { va, wide, value }
            }
            Opcode::Launch => {
                if flags != 0 || u32_at(offset_of!(LaunchCommand, _reserved)) != 0 {
                    return Err(Status::InvalidCommand);
                }
                let code = u64_at(offset_of!(LaunchCommand, code));
                let code_len = u32_at(offset_of!(LaunchCommand, code_len));
                let grid = u32_at(offset_of!(LaunchCommand, grid));
                let block = u32_at(offset_of!(LaunchCommand, block));
                let arg = |i: usize| u64_at(offset_of!(LaunchCommand, args) + 8 * i);
                let args = [arg(0), arg(1), arg(2), arg(3)];
                if !(1..=MAX_CODE_LEN).contains(&code_len)
                    || !(1..=MAX_GRID).contains(&grid)
                    || !(1..=MAX_BLOCK).contains(&block)
                {
                    return Err(Status::InvalidCommand);
                }
                if !range_ok(code, u64::from(code_len) * isa::INSN_SIZE) {
                    return Err(Status::BadAddress);
                }
                if !code.is_multiple_of(isa::INSN_SIZE) {
                    return Err(Status::Misaligned);
                }
                Command::Launch {
                    code,
                    code_len,
                    grid,
                    block,
                    args,
                }
            }
            Opcode::Migrate => {
                let flags = MigrateFlags::from_bits(flags).ok_or(Status::InvalidCommand)?;
                let list = u64_at(offset_of!(MigrateCommand, list));
                let count = u32_at(offset_of!(MigrateCommand, count));
                if !zero_from(offset_of!(MigrateCommand, _reserved0))
                    || !(1..=MAX_MIGRATE_PAGES).contains(&count)
                {
                    return Err(Status::InvalidCommand);
                }
                if !list.is_multiple_of(MIGRATE_LIST_ALIGN) {
                    return Err(Status::Misaligned);
                }
                Command::Migrate {
                    list,
                    count,
                    large: flags.contains(MigrateFlags::LARGE),
                }
            }
        })
    }

    /// The opcode this command carries (for `Raw`, whatever its first word
    /// says, if that is an opcode).
    pub fn opcode(&self) -> Option<Opcode> {
        match self {
            Command::Fill { .. } => Some(Opcode::Fill),
            Command::Copy { .. } => Some(Opcode::Copy),
            Command::Atomic { .. } => Some(Opcode::Atomic),
            Command::SemaphoreRelease { .. } => Some(Opcode::SemaphoreRelease),
            Command::Launch { .. } => Some(Opcode::Launch),
            Command::Migrate { .. } => Some(Opcode::Migrate),
            Command::Raw(w) => Opcode::from_u32(w[0] as u32),
        }
    }
}

/// Completion record written to the chain's writable descriptor.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Completion {
    /// `Status`.
    pub status: u32,
    pub _reserved: u32,
    /// ATOMIC: old value. MIGRATE: pages copied. Others, and failures: 0.
    pub result: u64,
}
const _: () = assert!(core::mem::size_of::<Completion>() == 16);
le_struct!(Completion {
    status: u32,
    result: u64,
});

#[cfg(test)]
mod tests;
