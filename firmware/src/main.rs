//! Faultline guest firmware: a PVH image that sets up the CPU and memory,
//! then runs the in-guest test suite and reports through the exit port.

#![no_std]
#![no_main]

extern crate alloc;

mod arch;
mod bench;
mod boot;
mod cmdline;
mod gpu;
mod mm;
mod pci;
mod serial;
mod smp;
mod svm_env;
mod sync;
mod tests;
mod user;

use arch::exit::{exit, ExitCode};
use cmdline::Options;

/// Called by the PVH entry code in long mode, on the boot stack.
#[no_mangle]
extern "C" fn rust_entry(start_info_paddr: u32) -> ! {
    boot::mark(boot::Phase::Entry);
    serial::init();
    boot::mark(boot::Phase::Console);
    arch::gdt::init();
    smp::install_boot_cpu();
    arch::idt::init();

    // SAFETY: the value comes straight from EBX at the PVH entry, and the
    // boot identity map is still the active page table.
    let boot = unsafe { boot::pvh::BootInfo::parse(u64::from(start_info_paddr)) }
        .unwrap_or_else(|e| fatal(format_args!("pvh: {e}")));

    // Complaints are printed, not logged: loglevel=error must not hide a
    // typo.
    let opts = cmdline::parse(boot.cmdline, |c| println!("{c}"));
    log::set_max_level(opts.log_level);
    if opts.svm.is_err() {
        // Running the tests under another policy than asked would pass for
        // a run of that policy.
        exit(ExitCode::TestsFailed);
    }

    boot::mark(boot::Phase::Cmdline);
    let stack_run = boot::init_memory(&boot, opts.ram_zero);
    let stack_top = boot::init_kernel_stack(stack_run);
    let handoff = boot::Handoff::new(&boot);
    // SAFETY: the new stack is mapped, owned by nothing else, and `opts` and
    // `handoff` live on the boot stack, which is never reused.
    unsafe { arch::switch_stack(stack_top, kernel_main, &(opts, handoff)) }
}

/// Everything after memory bring-up, on the guarded kernel stack.
extern "C" fn kernel_main(args: &(Options<'static>, boot::Handoff)) -> ! {
    let (opts, handoff) = args;
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
    boot::mark(boot::Phase::Time);
    let smp = smp::init(handoff.rsdp_paddr, handoff.trampoline_page, opts.cpus);
    boot::mark(boot::Phase::Smp);
    smp::log_report(&smp);
    boot::log_phases();
    arch::time::log_sources();
    log::debug!("console: {}", serial::console_name());

    let fs = mm::frames::stats();
    use serial::Part::{Dec, Dec3, Str};
    serial::print_parts(
        Some(log::Level::Info),
        &[
            Str("memory: "),
            Dec(fs.free),
            Str(" of "),
            Dec(fs.total_usable),
            Str(" usable frames free after boot"),
        ],
    );
    serial::print_parts(
        None,
        &[
            Str("faultline firmware: "),
            Dec(mm::ram_bytes() >> 20),
            Str(" MiB RAM, "),
            Dec(handoff.memmap_entries as u64),
            Str(" memmap entries, cmdline \""),
            Str(handoff.cmdline),
            Str("\", tsc "),
            Dec(hz / 1_000_000),
            Str("."),
            Dec3((hz / 1000) % 1000),
            Str(" MHz ("),
            Str(src.name()),
            Str(")"),
        ],
    );
    if let Some(c) = opts.crash {
        tests::crash::crash(c);
    }
    gpu::set_policy(if opts.gpu_optional {
        gpu::Policy::Optional
    } else {
        gpu::Policy::Required
    });
    #[cfg(feature = "mutants")]
    if let Some(m) = opts.mutant {
        faultline_driver::gpu::mutant::set(Some(m));
        println!("mutant: {} ({}) active", m.name(), m.letter());
    }
    tests::set_params(opts);
    if let Some(b) = opts.bench {
        bench::run(b);
    }
    tests::run(opts)
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
