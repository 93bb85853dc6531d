//! Faultline guest firmware: a PVH image that sets up the CPU and memory,
//! then runs the in-guest test suite and reports through the exit port.

#![no_std]
#![no_main]

extern crate alloc;

mod arch;
mod boot;
mod cmdline;
mod mm;
mod serial;
mod sync;
mod tests;

use arch::exit::{exit, ExitCode};

/// Called by the PVH entry code in long mode, on the boot stack.
#[no_mangle]
extern "C" fn rust_entry(start_info_paddr: u32) -> ! {
    serial::init();
    arch::gdt::init();
    arch::idt::init();

    // SAFETY: the value comes straight from EBX at the PVH entry, and the
    // boot identity map is still the active page table.
    let boot = unsafe { boot::pvh::BootInfo::parse(u64::from(start_info_paddr)) }
        .unwrap_or_else(|e| fatal(format_args!("pvh: {e}")));

    let opts = cmdline::parse(boot.cmdline, |_| {});
    log::set_max_level(opts.log_level);
    // Printed, not logged: loglevel=error must not hide a typo.
    cmdline::parse(boot.cmdline, |c| println!("{c}"));

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
        .filter(|e| e.kind == boot::pvh::E820_RAM)
        .map(|e| e.end())
        .max()
        .unwrap_or(0);
    mm::set_ram(boot.ram_bytes(), ram_end);

    arch::paging::enable_nx();
    let image = boot::image_range();
    log::debug!("image: {:#x}..{:#x}", image.0, image.1);
    // SAFETY: once, with the identity map active and `boot` describing this VM.
    unsafe {
        mm::frames::init(&boot, image);
        arch::paging::init_identity();
    }
    // SAFETY: once, after frames and paging are initialised.
    let dm = unsafe { mm::direct_map::init(&boot) }
        .unwrap_or_else(|e| fatal(format_args!("direct map: {e:?}")));
    log::debug!(
        "direct map: {} x 2 MiB + {} x 4 KiB pages",
        dm.large_pages,
        dm.small_pages
    );
    for index in [384, 385] {
        arch::paging::ensure_pml4_entry(index)
            .unwrap_or_else(|e| fatal(format_args!("pml4[{index}]: {e:?}")));
    }
    let heap_size = mm::heap_size_for(boot.ram_bytes());
    // SAFETY: once, after the direct map.
    unsafe { mm::heap::init(heap_size) }.unwrap_or_else(|e| fatal(format_args!("heap: {e:?}")));
    log::debug!("heap: {} MiB at {:#x}", heap_size >> 20, mm::HEAP_BASE);

    match arch::apic::init() {
        Ok(a) => log::debug!(
            "x2apic: id {} version {:#x} max lvt {}",
            a.id,
            a.version,
            a.max_lvt
        ),
        Err(e) => log::warn!("apic: {e}"),
    }
    let (hz, src) = arch::time::init();

    let fs = mm::frames::stats();
    log::info!(
        "memory: {} of {} usable frames free after boot",
        fs.free,
        fs.total_usable
    );
    println!(
        "faultline firmware: {} MiB RAM, {} memmap entries, cmdline \"{}\", tsc {}.{:03} MHz ({})",
        mm::ram_bytes() >> 20,
        boot.memmap_reported,
        boot.cmdline,
        hz / 1_000_000,
        (hz / 1000) % 1000,
        src.name()
    );
    if let Some(c) = opts.crash {
        crash(c);
    }
    tests::run(&opts)
}

fn crash(c: cmdline::Crash) -> ! {
    let unmapped = mm::VMAP_END - 0x1000;
    println!("crash: {c:?} requested on the command line");
    match c {
        cmdline::Crash::Panic => panic!("deliberate panic requested by crash=panic"),
        // SAFETY: deliberately raises #UD; the handler never returns here.
        cmdline::Crash::InvalidOpcode => unsafe { core::arch::asm!("ud2", options(noreturn)) },
        // SAFETY: deliberately reads an address that is never mapped.
        cmdline::Crash::PageFault => unsafe {
            core::arch::asm!("mov rax, [{}]", "ud2", in(reg) unmapped, options(noreturn))
        },
        // SAFETY: points RSP at unmapped memory, so delivering the #PF from
        // the push fails too and the CPU raises #DF on its IST stack.
        cmdline::Crash::DoubleFault => unsafe {
            core::arch::asm!("mov rsp, {}", "push rax", "ud2", in(reg) unmapped + 0x800, options(noreturn))
        },
    }
}

fn fatal(args: core::fmt::Arguments<'_>) -> ! {
    serial::print_emergency(format_args!("FATAL: {args}\n"));
    exit(ExitCode::Fatal)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let test = tests::current_test().unwrap_or("-");
    match info.location() {
        Some(l) => serial::print_emergency(format_args!(
            "\nPANIC at {}:{}:{} (test {test}): {}\n",
            l.file(),
            l.line(),
            l.column(),
            info.message()
        )),
        None => {
            serial::print_emergency(format_args!("\nPANIC (test {test}): {}\n", info.message()))
        }
    }
    exit(ExitCode::Fatal)
}
