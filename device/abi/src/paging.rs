//! Device page tables and the context table (docs/gpu-abi.md "Context table
//! and device page tables").

use bitflags::bitflags;

use crate::le::le_struct;

/// Size of a GPU page and of the smallest translation.
pub const PAGE_SHIFT: u32 = 12;
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// GPU virtual addresses are 48 bits; any higher bit set is a bad address
/// (not a fault).
pub const VA_BITS: u32 = 48;
pub const VA_LIMIT: u64 = 1 << VA_BITS;
/// Page-table levels: level 4 is the root, level 1 holds 4 KiB leaves.
pub const PT_LEVELS: u32 = 4;
pub const PT_ENTRIES: u64 = 512;
/// Leaf sizes: 4 KiB at level 1, 2 MiB at level 2, 1 GiB at level 3.
pub const LEAF_4K: u64 = 1 << 12;
pub const LEAF_2M: u64 = 1 << 21;
pub const LEAF_1G: u64 = 1 << 30;

/// Mask of the physical address in a PTE or context root.
pub const PTE_ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;
/// PTE bits that must be zero (4..=6).
pub const PTE_RESERVED_MASK: u64 = 0x70;

/// Shift of the level-`level` index within a VA (level 1..=4).
pub const fn level_shift(level: u32) -> u32 {
    PAGE_SHIFT + 9 * (level - 1)
}

/// Index of `va` in a level-`level` table (level 1..=4).
pub const fn pt_index(va: u64, level: u32) -> usize {
    ((va >> level_shift(level)) & (PT_ENTRIES - 1)) as usize
}

bitflags! {
    /// Device page-table entry bits. Bits 51:12 hold the guest-physical
    /// address of the next table or of the leaf page.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Pte: u64 {
        const VALID = 1 << 0;
        /// Leaf only: writes allowed.
        const WRITE = 1 << 1;
        /// Leaf only: atomics allowed (also need WRITE).
        const ATOMIC = 1 << 2;
        /// Leaf only (ABI 1.2, `Features::VRAM`): the address is an offset
        /// in the device's VRAM, not a GPA. In a non-leaf entry it is a
        /// BAD_PTE: page tables always live in system memory. A device
        /// without VRAM (or before 1.2, where bit 3 was reserved) fails
        /// such a leaf, never reads guest memory through it.
        const VRAM = 1 << 3;
        /// Levels 2 and 3: this entry is a 2 MiB / 1 GiB leaf. Level 1
        /// entries are always leaves; LEAF at level 4 is a BAD_PTE.
        const LEAF = 1 << 7;
    }

    /// `ContextEntry::flags`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct ContextFlags: u32 {
        const VALID = 1 << 0;
    }
}

impl Pte {
    /// A non-leaf entry pointing at the next-level table at `gpa`.
    pub const fn table(gpa: u64) -> Pte {
        Pte::from_bits_retain((gpa & PTE_ADDR_MASK) | Pte::VALID.bits())
    }
    /// A leaf at `level` (1: 4 KiB, 2: 2 MiB, 3: 1 GiB) mapping `gpa` with
    /// `perms` (WRITE / ATOMIC); VALID and, above level 1, LEAF are added.
    pub const fn leaf(gpa: u64, level: u32, perms: Pte) -> Pte {
        let leaf = if level > 1 { Pte::LEAF.bits() } else { 0 };
        Pte::from_bits_retain((gpa & PTE_ADDR_MASK) | perms.bits() | Pte::VALID.bits() | leaf)
    }
    /// A leaf mapping VRAM offset `offset` (`leaf` with `Pte::VRAM`).
    pub const fn vram_leaf(offset: u64, level: u32, perms: Pte) -> Pte {
        Pte::leaf(offset, level, perms.union(Pte::VRAM))
    }
    /// The table or frame address.
    pub const fn addr(self) -> u64 {
        self.bits() & PTE_ADDR_MASK
    }
}

/// One entry of the context table (guest memory, `NUM_CONTEXTS` entries of
/// `ContextEntry::SIZE` bytes, 4 KiB aligned table).
///
/// The device loads `root` and `flags` as two aligned atomic words, at
/// [`ContextEntry::ROOT_OFFSET`] and [`ContextEntry::FLAGS_OFFSET`]; a
/// driver that publishes a new entry stores `root` before setting VALID.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ContextEntry {
    /// Guest-physical address of the level-4 table (4 KiB aligned).
    pub root: u64,
    /// `ContextFlags`.
    pub flags: u32,
    /// Test facility, not hardware: the mirrored process's CPU page table
    /// ([`CpuRoot`]), read only by the coherence checker.
    pub cpu_root: u32,
}
const _: () = assert!(core::mem::size_of::<ContextEntry>() == 16);
le_struct!(ContextEntry {
    root: u64,
    flags: u32,
    cpu_root: u32
});

impl ContextEntry {
    pub const ROOT_OFFSET: usize = core::mem::offset_of!(ContextEntry, root);
    pub const FLAGS_OFFSET: usize = core::mem::offset_of!(ContextEntry, flags);
    pub const CPU_ROOT_OFFSET: usize = core::mem::offset_of!(ContextEntry, cpu_root);
}

/// Paging modes a [`CpuRoot`] can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum CpuPagingMode {
    /// No CPU page table given: the checker does not check this context.
    None = 0,
    /// x86-64 4-level paging (CR4.PAE, EFER.LMA, no LA57): 4 KiB, 2 MiB
    /// and 1 GiB leaves, P/RW/US bits.
    X86_64Level4 = 1,
}

/// `ContextEntry::cpu_root`: bits 0..27 the CPU page-table root's frame
/// number (CR3 >> 12, so roots below 1 TiB), bits 28..31 the
/// [`CpuPagingMode`]. A debug interface for the coherence checker; the
/// device ignores it otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuRoot(pub u32);

impl CpuRoot {
    const FRAME_BITS: u32 = 28;
    const FRAME_MASK: u32 = (1 << Self::FRAME_BITS) - 1;
    pub const NONE: CpuRoot = CpuRoot(0);

    /// The word for a CR3 value (PCID and flag bits below 12 dropped), or
    /// `None` when the root lies at or above 1 TiB.
    pub const fn x86_64(cr3: u64) -> Option<CpuRoot> {
        let frame = cr3 >> 12;
        if frame > Self::FRAME_MASK as u64 {
            return None;
        }
        Some(CpuRoot(
            frame as u32 | (CpuPagingMode::X86_64Level4 as u32) << Self::FRAME_BITS,
        ))
    }

    /// The mode, `None` for an unknown mode value (the checker reports
    /// such a context instead of guessing).
    pub const fn mode(self) -> Option<CpuPagingMode> {
        match self.0 >> Self::FRAME_BITS {
            0 => Some(CpuPagingMode::None),
            1 => Some(CpuPagingMode::X86_64Level4),
            _ => None,
        }
    }

    /// The root table's physical address.
    pub const fn root(self) -> u64 {
        ((self.0 & Self::FRAME_MASK) as u64) << 12
    }
}

/// Faultline's encoding of a device-private page in a CPU page-table entry
/// (the checker's side of the guest mm's convention, like Linux's
/// swap-type device-private entries): a non-present x86-64 4 KiB leaf with
/// bit 10 set and bits 9 and 11 clear names page `vram` of the VRAM of the
/// device-memory owner `owner` (a guest-chosen id), writable by the device
/// when bit 1 is set. Bit 9 marks a PROT_NONE entry and bit 11 a migration
/// entry; neither names a device page. The same entry in a PDE with bit 7
/// (PS) set is a 2 MiB device page: the 512 VRAM pages from `vram` (2 MiB
/// aligned). The CPU ignores every bit of a non-present entry, so the
/// encoding is software's; the checker reads it to compare a VRAM
/// translation with the CPU's view.
///
/// A non-present 4 KiB leaf with bit 8 ([`CpuDevicePrivate::EXCLUSIVE`])
/// set and bits 9 and 10 clear is a device-exclusive entry
/// ([`CpuExclusive`]): the system frame stays in the address bits and the
/// owner in bits 52..61, like PROT_NONE it keeps its frame, and the device
/// holding it may use the frame (write it when bit 1 is set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuDevicePrivate {
    /// The device-memory owner id (10 bits).
    pub owner: u16,
    /// Byte offset of the 4 KiB page in VRAM.
    pub vram: u64,
    /// The device may write it.
    pub writable: bool,
}

impl CpuDevicePrivate {
    const PRESENT: u64 = 1;
    const WRITE: u64 = 1 << 1;
    /// Software bit: PROT_NONE (the frame is kept, the entry not present).
    pub const PROT_NONE: u64 = 1 << 9;
    /// Software bit: a swap-type entry (device-private, or a migration
    /// entry with [`Self::MIGRATION`]).
    pub const SWAP: u64 = 1 << 10;
    /// Software bit, with [`Self::SWAP`]: a migration entry.
    pub const MIGRATION: u64 = 1 << 11;
    /// Software bit, without [`Self::SWAP`] and [`Self::PROT_NONE`]: a
    /// device-exclusive entry ([`CpuExclusive`]).
    pub const EXCLUSIVE: u64 = 1 << 8;
    const OWNER_SHIFT: u32 = 52;
    /// Largest owner id the entry holds.
    pub const OWNER_MAX: u16 = (1 << 10) - 1;
    const ADDR: u64 = PTE_ADDR_MASK;

    /// The entry, or `None` when the owner or the VRAM offset does not fit
    /// (offsets below 2^52, 4 KiB aligned).
    pub const fn encode(self) -> Option<u64> {
        if self.owner > Self::OWNER_MAX || self.vram & !Self::ADDR != 0 {
            return None;
        }
        let w = if self.writable { Self::WRITE } else { 0 };
        Some(Self::SWAP | self.vram | (self.owner as u64) << Self::OWNER_SHIFT | w)
    }

    /// Whether a leaf entry is swap-type (device-private or migration).
    pub const fn is_swap(pte: u64) -> bool {
        pte & (Self::PRESENT | Self::PROT_NONE | Self::SWAP) == Self::SWAP
    }

    /// The device page a leaf entry names, `None` for any other entry.
    pub const fn decode(pte: u64) -> Option<CpuDevicePrivate> {
        if !Self::is_swap(pte) || pte & Self::MIGRATION != 0 {
            return None;
        }
        Some(CpuDevicePrivate {
            owner: ((pte >> Self::OWNER_SHIFT) as u16) & Self::OWNER_MAX,
            vram: pte & Self::ADDR,
            writable: pte & Self::WRITE != 0,
        })
    }
}

/// A device-exclusive entry in a CPU page table (see
/// [`CpuDevicePrivate`] for the bits): system frame `frame` is held by
/// device-memory owner `owner`'s device for atomics; the CPU faults on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuExclusive {
    /// The holding device's owner id (10 bits).
    pub owner: u16,
    /// Physical address of the 4 KiB system frame.
    pub frame: u64,
    /// The device (and the CPU once the entry is restored) may write it.
    pub writable: bool,
}

impl CpuExclusive {
    const MARKS: u64 = CpuDevicePrivate::PRESENT
        | CpuDevicePrivate::PROT_NONE
        | CpuDevicePrivate::SWAP
        | CpuDevicePrivate::EXCLUSIVE;

    /// The entry (with the user bit, 2, set like a PROT_NONE entry), or
    /// `None` when the owner or the frame does not fit.
    pub const fn encode(self) -> Option<u64> {
        if self.owner > CpuDevicePrivate::OWNER_MAX || self.frame & !CpuDevicePrivate::ADDR != 0 {
            return None;
        }
        let w = if self.writable {
            CpuDevicePrivate::WRITE
        } else {
            0
        };
        Some(
            CpuDevicePrivate::EXCLUSIVE
                | 1 << 2
                | self.frame
                | (self.owner as u64) << CpuDevicePrivate::OWNER_SHIFT
                | w,
        )
    }

    /// The exclusive entry a leaf holds, `None` for any other entry.
    pub const fn decode(pte: u64) -> Option<CpuExclusive> {
        if pte & Self::MARKS != CpuDevicePrivate::EXCLUSIVE {
            return None;
        }
        Some(CpuExclusive {
            owner: ((pte >> CpuDevicePrivate::OWNER_SHIFT) as u16) & CpuDevicePrivate::OWNER_MAX,
            frame: pte & CpuDevicePrivate::ADDR,
            writable: pte & CpuDevicePrivate::WRITE != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_entries_round_trip_and_are_nothing_else() {
        let x = CpuExclusive {
            owner: 5,
            frame: 0x1234_5000,
            writable: true,
        };
        let e = x.encode().unwrap();
        assert_eq!(e & 1, 0, "an exclusive entry is not present");
        assert_eq!(CpuExclusive::decode(e), Some(x));
        assert!(!CpuDevicePrivate::is_swap(e));
        assert_eq!(CpuDevicePrivate::decode(e), None);
        assert_eq!(CpuExclusive::decode(e | 1), None);
        assert_eq!(CpuExclusive::decode(e | CpuDevicePrivate::SWAP), None);
        assert_eq!(CpuExclusive::decode(e | CpuDevicePrivate::PROT_NONE), None);
        let dp = CpuDevicePrivate {
            owner: 5,
            vram: 0x1000,
            writable: true,
        };
        assert_eq!(CpuExclusive::decode(dp.encode().unwrap()), None);
        assert_eq!(CpuExclusive { owner: 1024, ..x }.encode(), None);
    }

    #[test]
    fn device_private_entries_round_trip_and_nothing_else_decodes() {
        let d = CpuDevicePrivate {
            owner: 7,
            vram: 0x3f_f000,
            writable: true,
        };
        let e = d.encode().unwrap();
        assert_eq!(e & 1, 0, "a device-private entry is not present");
        assert_eq!(CpuDevicePrivate::decode(e), Some(d));
        let ro = CpuDevicePrivate {
            writable: false,
            ..d
        };
        assert_eq!(CpuDevicePrivate::decode(ro.encode().unwrap()), Some(ro));
        assert_eq!(CpuDevicePrivate::decode(e | 1), None, "present");
        assert_eq!(
            CpuDevicePrivate::decode(e | CpuDevicePrivate::MIGRATION),
            None
        );
        assert_eq!(
            CpuDevicePrivate::decode(e | CpuDevicePrivate::PROT_NONE),
            None
        );
        assert_eq!(CpuDevicePrivate::decode(0), None);
        let big = CpuDevicePrivate { owner: 1024, ..d };
        assert_eq!(big.encode(), None);
        let odd = CpuDevicePrivate { vram: 0x800, ..d };
        assert_eq!(odd.encode(), None);
    }

    #[test]
    fn pte_helpers() {
        let t = Pte::table(0x1234_5000);
        assert_eq!(t.bits(), 0x1234_5001);
        let l = Pte::leaf(0x4020_0000, 2, Pte::WRITE);
        assert!(l.contains(Pte::VALID | Pte::WRITE | Pte::LEAF));
        assert_eq!(l.addr(), 0x4020_0000);
        assert!(!Pte::leaf(0x1000, 1, Pte::empty()).contains(Pte::LEAF));
        assert_eq!(pt_index(0x0000_8040_2010_3000, 4), 0x100);
        assert_eq!(pt_index(0x0000_8040_2010_3000, 3), 0x100);
        assert_eq!(pt_index(0x0000_8040_2010_3000, 2), 0x100);
        assert_eq!(pt_index(0x0000_8040_2010_3000, 1), 0x103);
        assert_eq!(level_shift(4), 39);
    }

    /// docs/gpu-abi.md: `ContextEntry { root: u64, flags: u32, _: u32 }`.
    #[test]
    fn context_entry_round_trip_matches_the_documented_layout() {
        let e = ContextEntry {
            root: 0x0123_4567_89ab_c000,
            flags: ContextFlags::VALID.bits(),
            cpu_root: CpuRoot::x86_64(0x1234_5000).unwrap().0,
        };
        let mut want = [0u8; 16];
        want[0..8].copy_from_slice(&e.root.to_le_bytes());
        want[8..12].copy_from_slice(&e.flags.to_le_bytes());
        want[12..16].copy_from_slice(&0x1001_2345u32.to_le_bytes());
        assert_eq!(ContextEntry::SIZE, 16);
        assert_eq!(
            (
                ContextEntry::ROOT_OFFSET,
                ContextEntry::FLAGS_OFFSET,
                ContextEntry::CPU_ROOT_OFFSET
            ),
            (0, 8, 12)
        );
        assert_eq!(e.to_le_bytes(), want);
        assert_eq!(ContextEntry::from_le_bytes(&want), e);
    }

    #[test]
    fn cpu_root_encodes_frame_and_mode() {
        let r = CpuRoot::x86_64(0x0000_00ff_ffff_f000 | 0x18).unwrap();
        assert_eq!(r.root(), 0x0000_00ff_ffff_f000);
        assert_eq!(r.mode(), Some(CpuPagingMode::X86_64Level4));
        assert_eq!(CpuRoot::x86_64(1 << 40), None);
        assert_eq!(CpuRoot::NONE.mode(), Some(CpuPagingMode::None));
        assert_eq!(CpuRoot(0x7000_0000).mode(), None);
    }
}
