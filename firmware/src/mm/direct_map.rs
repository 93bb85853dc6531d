//! The direct map: all RAM at `DIRECT_MAP_BASE + phys`, in 1 GiB pages
//! where the CPU has them and RAM covers a whole aligned GiB, 2 MiB pages
//! where alignment allows, 4 KiB pages at the ragged edges.
//!
//! Built by writing the entries straight into fresh tables rather than
//! through the page-table mapper: under an instruction-emulating hypervisor
//! each emulated instruction costs ~2,000 cycles, and a mapper call (walk,
//! checks, invlpg) per 2 MiB page made this the most expensive step of boot.
//! Nothing is mapped in the window before, so no entry is replaced and no
//! TLB flush is needed.

use x86_64::structures::paging::PageTableFlags as F;
use x86_64::{PhysAddr, VirtAddr};

use super::{frames, DIRECT_MAP_BASE, DIRECT_MAP_LIMIT};
use crate::arch::paging::{self, MapError};
use crate::boot::pvh::{BootInfo, E820_RAM};

const SMALL: u64 = 4096;
const LARGE: u64 = 2 << 20;
const HUGE: u64 = 1 << 30;
/// Tables are written through the boot identity map.
const IDENTITY_LIMIT: u64 = 4 << 30;

#[derive(Debug, Default, Clone, Copy)]
pub struct DirectMapStats {
    pub huge_pages: u64,
    pub large_pages: u64,
    pub small_pages: u64,
    pub tables: u64,
}

/// Whether the CPU maps 1 GiB pages (CPUID 0x8000_0001 EDX bit 26).
fn has_1g_pages() -> bool {
    let ext = core::arch::x86_64::__cpuid(0x8000_0000).eax;
    ext >= 0x8000_0001 && core::arch::x86_64::__cpuid(0x8000_0001).edx & (1 << 26) != 0
}

/// Writes page-table entries straight into the kernel tables. `offset` is
/// where physical memory is mapped (0: the boot identity map, which reaches
/// the low 4 GiB).
struct Builder {
    offset: u64,
    stats: DirectMapStats,
}

impl Builder {
    fn table_ptr(&self, pa: u64) -> *mut u64 {
        (self.offset + pa) as *mut u64
    }

    /// A fresh, zeroed table frame, not linked anywhere yet.
    fn new_table(&mut self) -> Result<u64, MapError> {
        // With offset 0 the frame is below 4 GiB (`alloc_table_at_boot`).
        let frame = frames::alloc_table_at_boot(self.offset)
            .ok_or(MapError::OutOfFrames)?
            .as_u64();
        self.stats.tables += 1;
        Ok(frame)
    }

    /// The table `entry` points at, creating and linking an empty one if
    /// `entry` is clear.
    ///
    /// # Safety
    /// `entry` must be a live page-table entry of a kernel window nobody
    /// else writes meanwhile, reachable through `offset`.
    unsafe fn next(&mut self, entry: *mut u64) -> Result<*mut u64, MapError> {
        // SAFETY: per the contract, `entry` is a valid entry.
        let e = unsafe { entry.read() };
        if e & F::PRESENT.bits() != 0 {
            // Callers never map over a large page.
            if e & F::HUGE_PAGE.bits() != 0 {
                return Err(MapError::HugePageInTheWay);
            }
            return Ok(self.table_ptr(e & ADDR_MASK));
        }
        let frame = self.new_table()?;
        // SAFETY: as for the read above.
        unsafe { entry.write(frame | TABLE) };
        Ok(self.table_ptr(frame))
    }

    /// Maps `count` pages of 4 KiB << (9 × `level`) (level 0: 4 KiB, 1:
    /// 2 MiB, 2: 1 GiB) from `va` to `frame(i)` for page `i`, stopping at
    /// the first `None`; returns how many pages it mapped.
    ///
    /// A leaf table that does not exist yet is filled before it is linked
    /// into the tree: under shadow paging (PVM) a store into a table the
    /// hypervisor already shadows is a write-protection exit, a store into
    /// an unlinked frame is an ordinary store.
    ///
    /// # Safety
    /// `[va, va + count pages)` must be unmapped kernel address space in a
    /// window nobody else changes meanwhile (so no TLB entry exists for it);
    /// each `frame(i)` must be memory the caller may alias there.
    unsafe fn map(
        &mut self,
        va: u64,
        count: u64,
        level: u32,
        leaf_flags: u64,
        mut frames: Frames<impl FnMut(u64) -> Option<PhysAddr>>,
    ) -> Result<u64, MapError> {
        let size = SMALL << (9 * level);
        let leaf_flags = leaf_flags | if level > 0 { F::HUGE_PAGE.bits() } else { 0 };
        let mut i = 0;
        while i < count {
            let v = va + i * size;
            // The entry that points at the leaf table: walk from the PML4.
            let mut parent = self.table_ptr(paging::kernel_pml4_phys().as_u64());
            // SAFETY: the PML4 slot of `v`, in the live kernel PML4.
            let mut entry = unsafe { parent.add(index(v, 3)) };
            for l in (level + 1..3).rev() {
                // SAFETY: a live entry of the kernel tables (contract).
                parent = unsafe { self.next(entry)? };
                // SAFETY: an index below 512 into that table.
                entry = unsafe { parent.add(index(v, l)) };
            }
            let first = index(v, level);
            let run = (512 - first as u64).min(count - i);
            // SAFETY: `entry` is live (see above).
            let e = unsafe { entry.read() };
            let (table, link) = if e & F::PRESENT.bits() == 0 {
                let t = self.new_table()?;
                (self.table_ptr(t), Some(t))
            } else if e & F::HUGE_PAGE.bits() != 0 {
                return Err(MapError::HugePageInTheWay);
            } else {
                (self.table_ptr(e & ADDR_MASK), None)
            };
            let mut done = 0;
            if let (Frames::Run(pa), Some(_)) = (&frames, link) {
                // SAFETY: slots `first..first + run` (< 512) of the fresh
                // table we own.
                unsafe {
                    fill_linear(
                        table.add(first),
                        run,
                        (pa.as_u64() + i * size) | leaf_flags,
                        size,
                    )
                };
                done = run;
            }
            while done < run {
                let pa = match &mut frames {
                    Frames::Run(pa) => Some(*pa + (i + done) * size),
                    Frames::Each(frame) => frame(i + done),
                };
                let Some(pa) = pa else { break };
                // SAFETY: slot `first + done` < 512 of a leaf table we own
                // (fresh) or that maps this unmapped window (contract).
                let slot = unsafe { table.add(first + done as usize) };
                // SAFETY: as above.
                if unsafe { slot.read() } & F::PRESENT.bits() != 0 {
                    return Err(MapError::AlreadyMapped);
                }
                // SAFETY: as above.
                unsafe { slot.write(pa.as_u64() | leaf_flags) };
                done += 1;
            }
            if let Some(t) = link {
                // SAFETY: `entry` is live and was clear; the table is full.
                unsafe { entry.write(t | TABLE) };
            }
            match level {
                0 => self.stats.small_pages += done,
                1 => self.stats.large_pages += done,
                _ => self.stats.huge_pages += done,
            }
            i += done;
            if done < run {
                break;
            }
        }
        Ok(i)
    }
}

/// The frames [`map_boot`] maps, page `i` to the `i`-th.
pub enum Frames<G> {
    /// Physically contiguous from this address, pages of the mapping's
    /// size: a fresh table is filled by a four-instruction loop.
    Run(PhysAddr),
    /// From `G(i)`, up to the first `None`.
    Each(G),
}

/// [`Frames::Run`] without naming the closure type nobody calls.
pub fn run(first: PhysAddr) -> Frames<fn(u64) -> Option<PhysAddr>> {
    Frames::Run(first)
}

/// Writes `n` (≥ 1) entries from `at`: `entry`, then each one `step`
/// more. Four entries a round (two instructions each plus three for the
/// round) after the `n % 4` odd ones: a leaf table is 512 of them, at ~1 µs
/// an emulated instruction.
///
/// # Safety
/// `[at, at + n)` must be entries of a table nobody else uses yet.
unsafe fn fill_linear(at: *mut u64, n: u64, entry: u64, step: u64) {
    // SAFETY: per the contract; the first loop writes `n % 4` entries, the
    // second `n / 4` rounds of four: `n` in all.
    unsafe {
        core::arch::asm!(
            "test {n}, 3",
            "jz 3f",
            "2:",
            "mov [{at}], {entry}",
            "add {entry}, {step}",
            "add {at}, 8",
            "dec {n}",
            "test {n}, 3",
            "jnz 2b",
            "3:",
            "test {n}, {n}",
            "jz 5f",
            "4:",
            "mov [{at}], {entry}",
            "add {entry}, {step}",
            "mov [{at} + 8], {entry}",
            "add {entry}, {step}",
            "mov [{at} + 16], {entry}",
            "add {entry}, {step}",
            "mov [{at} + 24], {entry}",
            "add {entry}, {step}",
            "add {at}, 32",
            "sub {n}, 4",
            "jnz 4b",
            "5:",
            at = inout(reg) at => _,
            entry = inout(reg) entry => _,
            step = in(reg) step,
            n = inout(reg) n => _,
            options(nostack)
        );
    }
}

const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Flags of an entry that points at a table: present, writable (the leaf
/// decides).
const TABLE: u64 = F::PRESENT.bits() | F::WRITABLE.bits();

/// Maps `count` 4 KiB pages (2 MiB when `large`) from `va` to `frames`,
/// writing the entries directly (see [`Builder::map`]): a few instructions
/// per page where the mapper (walk, checks, invlpg) costs hundreds. Stops at
/// the first `None` and returns how many pages it mapped.
///
/// # Safety
/// Boot only, after [`init`]: nothing else may change the kernel tables
/// meanwhile; `[va, va + count pages)` must be kernel address space nothing
/// has mapped yet (so no TLB entry exists for it), aligned to the page
/// size; each frame memory the caller may alias there.
pub unsafe fn map_boot(
    va: VirtAddr,
    count: u64,
    large: bool,
    flags: F,
    frames: Frames<impl FnMut(u64) -> Option<PhysAddr>>,
) -> Result<u64, MapError> {
    let mut b = Builder {
        offset: DIRECT_MAP_BASE,
        stats: DirectMapStats::default(),
    };
    // SAFETY: forwarded to the caller's contract.
    unsafe { b.map(va.as_u64(), count, u32::from(large), flags.bits(), frames) }
}

fn index(va: u64, level: u32) -> usize {
    ((va >> (12 + 9 * level)) & 0x1ff) as usize
}

// The direct map of the low 4 GiB, prebuilt in .data so the loader (not
// the guest, at ~1 µs an instruction) writes its 2,560 entries: a PDPT
// whose first four entries point at four page directories of 2 MiB pages
// (P | W | PS | NX) for [0, 4 GiB), the first of whose entries points at a
// table of 4 KiB pages for [0, 2 MiB). `init` links the PDPT and then only
// takes out what is not RAM (a few `rep stosq` runs) and rebuilds, in
// 4 KiB pages, the 2 MiB slots that are partly RAM.
core::arch::global_asm!(
    r#"
    .pushsection .data.direct_map_tables, "aw"
    .p2align 12
    .global dmap_pdpt
dmap_pdpt:
    .set dmap_i, 0
    .rept 4
    .quad dmap_pd + dmap_i * 0x1000 + {table}
    .set dmap_i, dmap_i + 1
    .endr
    .fill 508, 8, 0
    .global dmap_pd
dmap_pd:
    .quad dmap_pt0 + {table}
    .set dmap_i, 1
    .rept 2047
    .quad dmap_i * 0x200000 + {large}
    .set dmap_i, dmap_i + 1
    .endr
    .global dmap_pt0
dmap_pt0:
    .set dmap_i, 0
    .rept 512
    .quad dmap_i * 0x1000 + {small}
    .set dmap_i, dmap_i + 1
    .endr
    .popsection
"#,
    table = const TABLE,
    large = const TEMPLATE_LEAF | F::HUGE_PAGE.bits(),
    small = const TEMPLATE_LEAF,
    options(att_syntax)
);

extern "C" {
    static mut dmap_pdpt: [u64; 512];
    static mut dmap_pd: [u64; 4 * 512];
    static mut dmap_pt0: [u64; 512];
}

/// The leaf flags the prebuilt tables carry: `kernel_data_flags` with NX
/// on. Without NX `init` builds everything at run time.
const TEMPLATE_LEAF: u64 = F::PRESENT.bits() | F::WRITABLE.bits() | F::NO_EXECUTE.bits();

/// Stores zeros over `n` entries from `at` (one `rep stosq`).
///
/// # Safety
/// `[at, at + n)` must be entries of tables nobody else uses yet.
unsafe fn clear(at: *mut u64, n: u64) {
    // SAFETY: per the contract; DF is clear (ABI).
    unsafe {
        core::arch::asm!(
            "rep stosq",
            inout("rcx") n => _,
            inout("rdi") at => _,
            in("rax") 0u64,
            options(nostack, preserves_flags)
        );
    }
}

/// Takes the hole `[a, b)` (4 KiB aligned, below 4 GiB) out of the
/// prebuilt tables: its 4 KiB entries below 2 MiB, every 2 MiB slot above
/// it touches (a slot only partly in the hole is rebuilt by the caller),
/// and whole GiBs at the PDPT.
///
/// # Safety
/// Boot only, before the prebuilt tables are linked into any live table
/// or after, with nothing reading the direct map's hole meanwhile.
unsafe fn punch(a: u64, b: u64) {
    let (pdpt, pd, pt0) = (
        &raw mut dmap_pdpt as *mut u64,
        &raw mut dmap_pd as *mut u64,
        &raw mut dmap_pt0 as *mut u64,
    );
    if a < LARGE {
        // SAFETY: entries of the first 4 KiB table, inside it.
        unsafe { clear(pt0.add((a / SMALL) as usize), (b.min(LARGE) - a) / SMALL) };
    }
    let (mut slot, end) = ((a / LARGE).max(1), b.div_ceil(LARGE));
    while slot < end {
        let gib = slot / 512;
        let stop = end.min((gib + 1) * 512);
        if a <= gib * HUGE && b >= (gib + 1) * HUGE {
            // SAFETY: one of the four linked PDPT entries.
            unsafe { pdpt.add(gib as usize).write(0) };
        } else {
            // SAFETY: slots below 2048, inside the four directories.
            unsafe { clear(pd.add(slot as usize), stop - slot) };
        }
        slot = stop;
    }
}

/// RAM as `[start, end)` ranges, sorted, merged where they overlap or
/// touch (so nothing is mapped twice), shrunk to whole 4 KiB pages.
fn ram_ranges(boot: &BootInfo) -> impl Iterator<Item = (u64, u64)> + '_ {
    let mut ranges = boot
        .memmap()
        .iter()
        .filter(|e| e.kind == E820_RAM)
        .map(|e| (e.addr, e.end()))
        .peekable();
    core::iter::from_fn(move || loop {
        let (start, mut end) = ranges.next()?;
        while let Some(&(s, e)) = ranges.peek() {
            if s > end {
                break;
            }
            end = end.max(e);
            ranges.next();
        }
        let (start, end) = (start.div_ceil(SMALL) * SMALL, end & !(SMALL - 1));
        if start < end {
            return Some((start, end));
        }
    })
}

impl Builder {
    /// Maps RAM `[start, end)` in the largest pages that fit: each step up
    /// to the next boundary of the next larger size, or to the end.
    ///
    /// # Safety
    /// As for [`Builder::map`]: the range's part of the window is unmapped.
    unsafe fn map_ram(
        &mut self,
        start: u64,
        end: u64,
        leaf: u64,
        gb_pages: bool,
    ) -> Result<(), MapError> {
        let mut pa = start;
        while pa < end {
            let level = if gb_pages && pa.is_multiple_of(HUGE) && end - pa >= HUGE {
                2
            } else if pa.is_multiple_of(LARGE) && end - pa >= LARGE {
                1
            } else {
                0
            };
            let size = SMALL << (9 * level);
            let next_up = (pa / (size << 9) + 1) * (size << 9);
            let stop = if level == 2 { end } else { next_up.min(end) };
            let count = (stop - pa) / size;
            let base = pa;
            // SAFETY: forwarded to the caller's contract; the frames are
            // RAM, aliased there by design.
            let mapped = unsafe {
                self.map(
                    DIRECT_MAP_BASE + pa,
                    count,
                    level,
                    leaf,
                    run(PhysAddr::new(base)),
                )?
            };
            pa += mapped * size;
        }
        Ok(())
    }
}

/// Builds the direct map for every RAM entry and switches the kernel page
/// table code over to it.
///
/// # Safety
/// Call once, after `paging::init_identity` and `frames::init`, with the
/// boot identity map active.
pub unsafe fn init(boot: &BootInfo) -> Result<DirectMapStats, MapError> {
    let leaf = paging::kernel_data_flags().bits();
    let gb_pages = has_1g_pages();
    let pml4 = paging::kernel_pml4_phys().as_u64();
    assert!(pml4 + SMALL <= IDENTITY_LIMIT);
    let mut b = Builder {
        offset: 0,
        stats: DirectMapStats::default(),
    };
    if let Some((_, end)) = ram_ranges(boot).last() {
        assert!(
            DIRECT_MAP_BASE + end <= DIRECT_MAP_LIMIT,
            "RAM beyond the direct map window"
        );
    }
    // Below 4 GiB from the prebuilt tables, above in the largest pages.
    let low = leaf == TEMPLATE_LEAF;
    if low {
        let mut covered = 0;
        for (s, e) in ram_ranges(boot).chain([(IDENTITY_LIMIT, IDENTITY_LIMIT)]) {
            let s = s.min(IDENTITY_LIMIT);
            if s > covered {
                // SAFETY: boot, nothing linked yet.
                unsafe { punch(covered, s) };
            }
            covered = covered.max(e.min(IDENTITY_LIMIT));
        }
        // SAFETY: the PML4's direct-map slot is empty (nothing maps the
        // window yet); the PDPT is in the image, so identity-mapped.
        unsafe {
            let slot = (pml4 as *mut u64).add(index(DIRECT_MAP_BASE, 3));
            slot.write(&raw const dmap_pdpt as u64 | TABLE);
        }
        for (s, e) in ram_ranges(boot) {
            let (s, e) = (s.min(IDENTITY_LIMIT), e.min(IDENTITY_LIMIT));
            if s >= e {
                continue;
            }
            b.stats.small_pages += (e.min(LARGE) - s.min(LARGE)) / SMALL;
            let (s2, e2) = (s.max(LARGE), e);
            if s2 >= e2 {
                continue;
            }
            let (whole_lo, whole_hi) = (s2.div_ceil(LARGE) * LARGE, e2 / LARGE * LARGE);
            b.stats.large_pages += whole_hi.saturating_sub(whole_lo) / LARGE;
            // The ends of the range that share a 2 MiB slot with a hole,
            // which `punch` took out whole.
            let head = (s2, whole_lo.min(e2));
            let tail = (whole_hi.max(head.1), e2);
            for (a, z) in [head, tail] {
                if a < z {
                    // SAFETY: slots `punch` cleared, nothing maps them.
                    unsafe { b.map_ram(a, z, leaf, false)? };
                }
            }
        }
    }
    for (s, e) in ram_ranges(boot) {
        let s = if low { s.max(IDENTITY_LIMIT) } else { s };
        if s < e {
            // SAFETY: the window above what the prebuilt tables cover (or
            // all of it) is unmapped and only this code writes it.
            unsafe { b.map_ram(s, e, leaf, gb_pages)? };
        }
    }
    // SAFETY: the above mapped all RAM, which holds every page table.
    unsafe { paging::switch_to_direct_map(DIRECT_MAP_BASE) };
    Ok(b.stats)
}

/// Virtual address of physical `pa` in the direct map (RAM only).
pub fn phys_to_virt(pa: PhysAddr) -> VirtAddr {
    VirtAddr::new(DIRECT_MAP_BASE + pa.as_u64())
}
