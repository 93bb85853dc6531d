use core::mem::offset_of;

use super::*;
use crate::paging::{LEAF_2M, LEAF_4K};

fn u32_at(b: &[u8], at: usize) -> u32 {
    crate::le::u32_at(b, at).unwrap()
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    crate::le::u64_at(b, at).unwrap()
}

fn samples() -> [Command; 7] {
    [
        Command::Fill {
            dst: 0x1000,
            len: 0x2345,
            pattern: 0x0123_4567_89ab_cdef,
        },
        Command::Copy {
            dst: 0x10_0000,
            src: 0x20_0000,
            len: 0x1_0000,
        },
        Command::Atomic {
            va: 0x2000,
            op: atomic_op::CAS,
            wide: true,
            operand: 5,
            compare: u64::MAX,
        },
        Command::Atomic {
            va: 0x2004,
            op: atomic_op::EXCHANGE,
            wide: false,
            operand: 0xffff_ffff,
            compare: 0,
        },
        Command::SemaphoreRelease {
            va: 0x3008,
            wide: true,
            value: 1 << 40,
        },
        Command::Launch {
            code: 0x1000,
            code_len: 7,
            grid: 3,
            block: 32,
            args: [11, 12, 13, 14],
        },
        Command::Migrate {
            list: 0x5010,
            count: 3,
            large: true,
        },
    ]
}

#[test]
fn every_command_round_trips() {
    for c in samples() {
        assert_eq!(Command::decode(c.encode()), Ok(c), "{c:?}");
        assert_eq!(Command::from_le_bytes(&c.to_le_bytes()), Ok(c), "{c:?}");
        assert_eq!(Opcode::of(&c.to_le_bytes()), c.opcode());
    }
}

/// The encoding puts each field where the `#[repr(C)]` view says, and the
/// views are the layout of docs/gpu-abi.md (`opcode: u32, flags: u32`,
/// then the fields in the order of its table).
#[test]
fn encoding_matches_the_views_and_the_documented_offsets() {
    let [fill, copy, atomic, _, sem, launch, migrate] = samples().map(|c| c.to_le_bytes());
    assert_eq!(u32_at(&fill, offset_of!(FillCommand, opcode)), 1);
    assert_eq!(offset_of!(FillCommand, pattern), 24);
    assert_eq!(
        u64_at(&fill, offset_of!(FillCommand, pattern)),
        0x0123_4567_89ab_cdef
    );
    assert_eq!(u64_at(&fill, offset_of!(FillCommand, len)), 0x2345);

    assert_eq!(u32_at(&copy, 0), 2);
    assert_eq!(
        (offset_of!(CopyCommand, src), offset_of!(CopyCommand, len)),
        (16, 24)
    );
    assert_eq!(u64_at(&copy, offset_of!(CopyCommand, src)), 0x20_0000);
    assert_eq!(u64_at(&copy, offset_of!(CopyCommand, len)), 0x1_0000);

    assert_eq!(u32_at(&atomic, 0), 3);
    assert_eq!(offset_of!(AtomicCommand, op), 32);
    assert_eq!(
        u32_at(&atomic, offset_of!(AtomicCommand, flags)),
        SizeFlags::SIZE64.bits()
    );
    assert_eq!(u64_at(&atomic, offset_of!(AtomicCommand, operand)), 5);
    assert_eq!(
        u64_at(&atomic, offset_of!(AtomicCommand, compare)),
        u64::MAX
    );
    assert_eq!(
        u32_at(&atomic, offset_of!(AtomicCommand, op)),
        atomic_op::CAS
    );

    assert_eq!(u32_at(&sem, 0), 4);
    assert_eq!(u64_at(&sem, offset_of!(SemaphoreCommand, value)), 1 << 40);

    assert_eq!(u32_at(&launch, 0), 5);
    assert_eq!(
        (
            offset_of!(LaunchCommand, code_len),
            offset_of!(LaunchCommand, block),
            offset_of!(LaunchCommand, args)
        ),
        (16, 24, 32)
    );
    assert_eq!(u64_at(&launch, offset_of!(LaunchCommand, code)), 0x1000);
    assert_eq!(u32_at(&launch, offset_of!(LaunchCommand, code_len)), 7);
    assert_eq!(u32_at(&launch, offset_of!(LaunchCommand, grid)), 3);
    assert_eq!(u32_at(&launch, offset_of!(LaunchCommand, block)), 32);
    assert_eq!(u64_at(&launch, offset_of!(LaunchCommand, args) + 24), 14);

    assert_eq!(u32_at(&migrate, 0), 6);
    assert_eq!(
        (
            offset_of!(MigrateCommand, list),
            offset_of!(MigrateCommand, count)
        ),
        (8, 16)
    );
    assert_eq!(
        u32_at(&migrate, offset_of!(MigrateCommand, flags)),
        MigrateFlags::LARGE.bits()
    );
    assert_eq!(u64_at(&migrate, offset_of!(MigrateCommand, list)), 0x5010);
    assert_eq!(u32_at(&migrate, offset_of!(MigrateCommand, count)), 3);
}

/// docs/gpu-abi.md "MIGRATE": `{ src: u64, dst: u64 }`, aperture in bit 0.
#[test]
fn migrate_entries_encode_the_aperture_and_refuse_bad_pages() {
    let e = MigrateEntry::new(PhysPage::system(0x20_0000), PhysPage::vram(0x40_0000));
    let b = e.to_le_bytes();
    assert_eq!((u64_at(&b, 0), u64_at(&b, 8)), (0x20_0000, 0x40_0001));
    assert_eq!(MigrateEntry::from_le_bytes(&b), e);
    assert_eq!(
        e.decode(LEAF_2M),
        Ok((PhysPage::system(0x20_0000), PhysPage::vram(0x40_0000)))
    );
    let raw = |src, dst| MigrateEntry { src, dst };
    assert_eq!(raw(0x1000, 0x2001).decode(LEAF_2M), Err(Status::Misaligned));
    assert_eq!(raw(0x1002, 0x2000).decode(LEAF_4K), Err(Status::BadList));
    assert_eq!(raw(0x1000, 0x1000).decode(LEAF_4K), Err(Status::BadList));
    assert_eq!(
        raw(0x1000, 0x1001).decode(LEAF_4K).map(|_| ()),
        Ok(()),
        "same address, other aperture"
    );
}

#[test]
fn decode_refuses_with_the_documented_status() {
    let raw = |w: [u64; 8]| Command::decode(w);
    let fill = |flags: u64, dst: u64, len: u64| raw([1 | flags << 32, dst, len, 0, 0, 0, 0, 0]);
    assert_eq!(raw([0; 8]), Err(Status::InvalidOpcode));
    assert_eq!(raw([99, 0, 0, 0, 0, 0, 0, 0]), Err(Status::InvalidOpcode));
    assert_eq!(fill(1, 0, 0), Err(Status::InvalidCommand), "flags");
    assert_eq!(fill(0, 0, MAX_TRANSFER + 1), Err(Status::InvalidCommand));
    assert_eq!(fill(0, VA_LIMIT - 1, 2), Err(Status::BadAddress));
    assert_eq!(fill(0, VA_LIMIT - 1, 1).map(|_| ()), Ok(()));
    let reserved = raw([1, 0, 0, 0, 0, 0, 0, 1]);
    assert_eq!(reserved, Err(Status::InvalidCommand));
    // COPY: addresses before overlap.
    let copy = |dst: u64, src: u64, len: u64| raw([2, dst, src, len, 0, 0, 0, 0]);
    assert_eq!(copy(0x1000, 0x1800, 0x1000), Err(Status::InvalidCommand));
    assert_eq!(copy(VA_LIMIT, 0x1000, 0x1000), Err(Status::BadAddress));
    assert_eq!(copy(0x1000, 0x1000, 0).map(|_| ()), Ok(()));
    // ATOMIC: unknown op, narrow operand, alignment.
    let atomic = |flags: u64, va: u64, operand: u64, op: u64| {
        raw([3 | flags << 32, va, operand, 0, op, 0, 0, 0])
    };
    assert_eq!(
        atomic(2, 0x1000, 0, 0),
        Err(Status::InvalidCommand),
        "flags"
    );
    assert_eq!(atomic(1, 0x1000, 0, 3), Err(Status::InvalidCommand), "op");
    assert_eq!(atomic(0, 0x1000, 1 << 32, 0), Err(Status::InvalidCommand));
    assert_eq!(atomic(1, VA_LIMIT, 0, 0), Err(Status::BadAddress));
    assert_eq!(atomic(1, 0x1004, 0, 0), Err(Status::Misaligned));
    assert_eq!(atomic(0, 0x1004, 0, 0).map(|_| ()), Ok(()));
    assert_eq!(
        raw([3, 0x1000, 0, 0, 1 << 32, 0, 0, 0]),
        Err(Status::InvalidCommand),
        "reserved word after op"
    );
    // SEMAPHORE_RELEASE.
    assert_eq!(
        raw([4, 0x1000, 1 << 32, 0, 0, 0, 0, 0]),
        Err(Status::InvalidCommand)
    );
    assert_eq!(
        raw([4 | 1 << 32, 0x1004, 0, 0, 0, 0, 0, 0]),
        Err(Status::Misaligned)
    );
    // LAUNCH: reserved, limits, code range and alignment.
    let launch = |code: u64, len: u64, grid: u64, block: u64| {
        raw([5, code, len | grid << 32, block, 0, 0, 0, 0])
    };
    assert_eq!(launch(0x1000, 1, 1, 1).map(|_| ()), Ok(()));
    assert_eq!(
        raw([5, 0x1000, 1 | 1 << 32, 1 | 1 << 32, 0, 0, 0, 0]),
        Err(Status::InvalidCommand),
        "reserved"
    );
    assert_eq!(launch(0x1000, 0, 1, 1), Err(Status::InvalidCommand));
    assert_eq!(launch(0x1000, 1, 1, 1025), Err(Status::InvalidCommand));
    assert_eq!(launch(0x1000, 1, 1 << 21, 1), Err(Status::InvalidCommand));
    assert_eq!(launch(VA_LIMIT - 8, 2, 1, 1), Err(Status::BadAddress));
    assert_eq!(launch(0x1004, 1, 1, 1), Err(Status::Misaligned));
    // MIGRATE: flags, count, reserved, list alignment.
    let migrate =
        |flags: u64, list: u64, count: u64| raw([6 | flags << 32, list, count, 0, 0, 0, 0, 0]);
    assert_eq!(migrate(1, 0x1000, 1).map(|_| ()), Ok(()));
    assert_eq!(migrate(2, 0x1000, 1), Err(Status::InvalidCommand), "flags");
    assert_eq!(migrate(0, 0x1000, 0), Err(Status::InvalidCommand));
    assert_eq!(
        migrate(0, 0x1000, u64::from(MAX_MIGRATE_PAGES) + 1),
        Err(Status::InvalidCommand)
    );
    assert_eq!(
        migrate(0, 0x1000, 1 << 32 | 1),
        Err(Status::InvalidCommand),
        "reserved word after count"
    );
    assert_eq!(migrate(0, 0x1008, 1), Err(Status::Misaligned));
}

#[test]
fn opcodes_round_trip() {
    assert_eq!(Opcode::COUNT, 6);
    for (i, op) in Opcode::ALL.iter().enumerate() {
        assert_eq!(*op as u32, i as u32 + 1);
        assert_eq!(Opcode::from_u32(i as u32 + 1), Some(*op));
    }
    assert_eq!(Opcode::from_u32(0), None);
    assert_eq!(Opcode::from_u32(7), None);
    assert_eq!(
        Command::Raw([3, 0, 0, 0, 0, 0, 0, 0]).opcode(),
        Some(Opcode::Atomic)
    );
    assert_eq!(Command::Raw([99, 0, 0, 0, 0, 0, 0, 0]).opcode(), None);
}

/// docs/gpu-abi.md: `Completion { status: u32, _: u32, result: u64 }`.
#[test]
fn completion_round_trip_matches_the_documented_layout() {
    let c = Completion {
        status: Status::BadPte as u32,
        _reserved: 0,
        result: 0x8877_6655_4433_2211,
    };
    let mut want = [0u8; 16];
    want[0..4].copy_from_slice(&6u32.to_le_bytes());
    want[8..16].copy_from_slice(&c.result.to_le_bytes());
    assert_eq!(Completion::SIZE, 16);
    assert_eq!(c.to_le_bytes(), want);
    assert_eq!(Completion::from_le_bytes(&want), c);
}
