//! Boot: the PVH entry (assembly) and the `hvm_start_info` it hands us.

pub mod entry;
pub mod pvh;

use core::sync::atomic::{AtomicU64, Ordering};

extern "C" {
    static __image_start: u8;
    static __image_end: u8;
}

/// Physical range `[start, end)` occupied by the loaded image, including .bss
/// (boot page tables, boot stack, IST stacks).
pub fn image_range() -> (u64, u64) {
    // The image runs identity-mapped, so a symbol's address is its physical address.
    let start = core::ptr::addr_of!(__image_start) as u64;
    let end = core::ptr::addr_of!(__image_end) as u64;
    (start, end)
}

use x86_64::VirtAddr;

use crate::arch::paging;
use crate::mm;

/// What `kernel_main` needs from `BootInfo` once boot is over: the banner's
/// figures and where SMP bring-up finds the CPUs and puts its trampoline.
pub struct Handoff {
    pub memmap_entries: usize,
    pub cmdline: &'static str,
    pub rsdp_paddr: u64,
    pub trampoline_page: Option<u64>,
}

impl Handoff {
    pub fn new(boot: &pvh::BootInfo) -> Handoff {
        Handoff {
            memmap_entries: boot.memmap_reported,
            cmdline: boot.cmdline,
            rsdp_paddr: boot.rsdp_paddr,
            trampoline_page: crate::smp::pick_trampoline_page(boot),
        }
    }
}

/// Points of the boot path whose TSC value `log_phases` reports (a
/// `loglevel=debug` line; what each step between two of them costs).
#[derive(Clone, Copy)]
pub enum Phase {
    Entry,
    Console,
    Cmdline,
    Frames,
    DirectMap,
    Heap,
    Memory,
    KernelStack,
    Time,
    Smp,
}

const PHASE_NAMES: [&str; 10] = [
    "rust_entry",
    "console",
    "gdt, idt, start info, cmdline",
    "frames",
    "direct map",
    "heap",
    "rest of memory",
    "kernel stack",
    "apic and time",
    "cpus",
];
static PHASES: [AtomicU64; 10] = [const { AtomicU64::new(0) }; 10];

/// Records the TSC at `p` (one rdtsc: ~5,650 cycles under PVM).
pub fn mark(p: Phase) {
    PHASES[p as usize].store(crate::arch::time::rdtsc(), Ordering::Relaxed);
}

/// One debug line: microseconds between consecutive marks, from
/// `rust_entry` on. Needs the TSC frequency.
pub fn log_phases() {
    if !log::log_enabled!(log::Level::Debug) {
        return;
    }
    let us = |ticks: u64| crate::arch::time::ticks_to_ns(ticks) / 1000;
    let mut prev = PHASES[0].load(Ordering::Relaxed);
    let mut line = alloc::string::String::new();
    for (name, t) in PHASE_NAMES.iter().zip(&PHASES).skip(1) {
        let t = t.load(Ordering::Relaxed);
        let _ = core::fmt::Write::write_fmt(
            &mut line,
            format_args!(" {name} {} us,", us(t.saturating_sub(prev))),
        );
        prev = t;
    }
    log::debug!("boot phases:{}", line.trim_end_matches(','));
}

/// Frames, direct map, kernel-half PML4 entries and heap, in that order
/// (each needs the previous one). Any failure here is fatal. `ram_zero`:
/// the command line says RAM came zeroed (`ram=zero`). Returns the run of
/// frames the frame allocator set aside for the kernel stack, if it could.
pub fn init_memory(boot: &pvh::BootInfo, ram_zero: bool) -> Option<x86_64::PhysAddr> {
    log::debug!(
        "pvh: start_info at {:#x}, rsdp at {:#x}",
        boot.start_info_paddr,
        boot.rsdp_paddr
    );
    for e in boot.memmap() {
        log::debug!(
            "memmap: {:#014x}..{:#014x} type {}",
            e.addr,
            e.end(),
            e.kind
        );
    }
    let ram_end = boot
        .memmap()
        .iter()
        .filter(|e| e.kind == pvh::E820_RAM)
        .map(|e| e.end())
        .max()
        .unwrap_or(0);
    mm::set_ram(boot.ram_bytes(), ram_end);
    mm::set_low_top(
        boot.memmap()
            .iter()
            .filter(|e| e.addr < 1 << 32)
            .map(|e| e.end().min(1 << 32))
            .max()
            .unwrap_or(0),
    );

    paging::enable_nx();
    let t0 = crate::arch::time::rdtsc();
    let image = image_range();
    log::debug!("image: {:#x}..{:#x}", image.0, image.1);
    let heap_size = mm::heap_size_for(boot.ram_bytes());
    let sizes = mm::frames::BootRunSizes {
        heap: heap_size,
        stack: mm::KERNEL_STACK_SIZE,
    };
    // SAFETY: once, with the identity map active and `boot` describing this VM.
    let runs = unsafe {
        let runs = mm::frames::init(boot, image, ram_zero, sizes);
        paging::init_identity();
        runs
    };
    mark(Phase::Frames);
    // SAFETY: once, after frames and paging are initialised.
    let dm = unsafe { mm::direct_map::init(boot) }
        .unwrap_or_else(|e| crate::fatal(format_args!("direct map: {e:?}")));
    mark(Phase::DirectMap);
    log::debug!(
        "direct map: {} x 1 GiB + {} x 2 MiB + {} x 4 KiB pages in {} tables",
        dm.huge_pages,
        dm.large_pages,
        dm.small_pages,
        dm.tables
    );
    for index in [384, 385] {
        paging::ensure_pml4_entry(index)
            .unwrap_or_else(|e| crate::fatal(format_args!("pml4[{index}]: {e:?}")));
    }
    // SAFETY: once, after the direct map; the run is the frame
    // allocator's boot run for the heap, ours alone.
    unsafe { mm::heap::init(heap_size, runs.heap) }
        .unwrap_or_else(|e| crate::fatal(format_args!("heap: {e:?}")));
    mark(Phase::Heap);
    log::debug!("heap: {} MiB at {:#x}", heap_size >> 20, mm::HEAP_BASE);
    mm::process::init();
    mark(Phase::Memory);
    // Cycles, not ns: the TSC is not calibrated yet.
    log::debug!(
        "memory bring-up took {} Mcycles",
        (crate::arch::time::rdtsc() - t0) / 1_000_000
    );
    runs.stack
}

/// Maps the kernel stack in the vmap window (with its guard page below) and
/// returns its top. `run`: `KERNEL_STACK_SIZE` of contiguous frames set
/// aside for it by `init_memory`.
pub fn init_kernel_stack(run: Option<x86_64::PhysAddr>) -> VirtAddr {
    let pages = mm::KERNEL_STACK_SIZE / mm::frames::FRAME_SIZE;
    let base =
        map_stack(pages, run).unwrap_or_else(|e| crate::fatal(format_args!("kernel stack: {e}")));
    log::debug!(
        "kernel stack: {:#x}..{:#x}",
        base.as_u64(),
        base.as_u64() + mm::KERNEL_STACK_SIZE
    );
    mark(Phase::KernelStack);
    base + mm::KERNEL_STACK_SIZE
}

/// Maps a stack of `pages` in the vmap window, an unmapped guard page
/// below it, and returns its base. `run`: contiguous frames for it, if the
/// caller has them; else one run is searched for (one allocator search
/// instead of one per page), else frames are taken one by one. Boot only
/// (the kernel tables are written directly, `direct_map::map_boot`).
pub fn map_stack(pages: u64, run: Option<x86_64::PhysAddr>) -> Result<VirtAddr, &'static str> {
    let base = mm::vmap::reserve(pages);
    let frames: mm::direct_map::Frames<fn(u64) -> Option<x86_64::PhysAddr>> =
        match run.or_else(|| mm::frames::alloc_contiguous(pages)) {
            Some(first) => mm::direct_map::Frames::Run(first),
            None => mm::direct_map::Frames::Each(|_| mm::frames::alloc()),
        };
    // SAFETY: boot, after the direct map; freshly reserved vmap pages
    // (never mapped), fresh frames.
    let mapped = unsafe {
        mm::direct_map::map_boot(base, pages, false, paging::kernel_data_flags(), frames)
    }
    .map_err(|_| "no frames for its page tables")?;
    if mapped < pages {
        return Err("no frames for it");
    }
    Ok(base)
}
