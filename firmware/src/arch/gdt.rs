//! The long-mode GDT with a TSS, replacing the boot GDT from the entry code.
//!
//! Kernel code and data (DPL 0), user data and code (DPL 3, for the agent in
//! `crate::user`), and the TSS. The TSS carries the IST stacks (a double
//! fault after a stack overflow, an NMI or a machine check must not run on
//! the possibly broken current stack) and RSP0, the stack an interrupt or
//! exception from user mode switches to: `crate::user` points it at the
//! kernel stack of the code that entered user mode.

use core::sync::atomic::{AtomicBool, AtomicU16, Ordering};

use x86_64::instructions::segmentation::{Segment, CS, DS, ES, FS, GS, SS};
use x86_64::instructions::tables::load_tss;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::tss::TaskStateSegment;
use x86_64::VirtAddr;

use crate::sync::CpuStatic;

pub const IST_DOUBLE_FAULT: u16 = 0;
pub const IST_NMI: u16 = 1;
pub const IST_MACHINE_CHECK: u16 = 2;
const IST_COUNT: usize = 3;
const IST_STACK_SIZE: usize = 16 * 1024;

#[repr(C, align(16))]
struct IstStacks([[u8; IST_STACK_SIZE]; IST_COUNT]);

static IST_STACKS: CpuStatic<IstStacks> =
    CpuStatic::new(IstStacks([[0; IST_STACK_SIZE]; IST_COUNT]));
static TSS: CpuStatic<TaskStateSegment> = CpuStatic::new(TaskStateSegment::new());
static GDT: CpuStatic<GlobalDescriptorTable> = CpuStatic::new(GlobalDescriptorTable::new());
static INITIALIZED: AtomicBool = AtomicBool::new(false);

/// The selectors `init` installed (raw values, RPL included).
static KERNEL_CS: AtomicU16 = AtomicU16::new(0);
static KERNEL_SS: AtomicU16 = AtomicU16::new(0);
static USER_CS: AtomicU16 = AtomicU16::new(0);
static USER_SS: AtomicU16 = AtomicU16::new(0);

/// Segment selectors for an `iretq` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selectors {
    pub code: u16,
    pub stack: u16,
}

/// Kernel code and stack selectors (RPL 0).
pub fn kernel_selectors() -> Selectors {
    Selectors {
        code: KERNEL_CS.load(Ordering::Relaxed),
        stack: KERNEL_SS.load(Ordering::Relaxed),
    }
}

/// User code and stack selectors (RPL 3).
pub fn user_selectors() -> Selectors {
    Selectors {
        code: USER_CS.load(Ordering::Relaxed),
        stack: USER_SS.load(Ordering::Relaxed),
    }
}

/// Where the boot CPU reads RSP0 (the stack for interrupts and exceptions
/// taken in user mode; only the boot CPU enters user mode so far). Only 4-byte aligned (the TSS is packed): write it with an
/// unaligned store.
pub fn rsp0_slot() -> *mut u64 {
    // SAFETY: only the address is taken; TSS is 'static.
    unsafe { (&raw mut (*TSS.get()).privilege_stack_table[0]).cast::<u64>() }
}

pub fn init() {
    assert!(
        !INITIALIZED.swap(true, Ordering::SeqCst),
        "gdt::init called twice"
    );

    // SAFETY: the INITIALIZED guard makes this the only access to TSS, GDT and
    // IST_STACKS ever made through mutable references; afterwards the CPU
    // owns them and Rust only holds shared 'static references.
    let (tss, gdt) = unsafe {
        let stacks = IST_STACKS.get();
        let tss = &mut *TSS.get();
        for i in 0..IST_COUNT {
            let top = (&raw mut (*stacks).0[i]) as u64 + IST_STACK_SIZE as u64;
            tss.interrupt_stack_table[i] = VirtAddr::new(top & !0xf);
        }
        (&*TSS.get(), &mut *GDT.get())
    };
    let sel = fill(gdt, tss);
    KERNEL_CS.store(sel.kernel_code.0, Ordering::Relaxed);
    KERNEL_SS.store(sel.kernel_data.0, Ordering::Relaxed);
    USER_CS.store(sel.user_code.0, Ordering::Relaxed);
    USER_SS.store(sel.user_data.0, Ordering::Relaxed);
    // SAFETY: `gdt` is 'static and never mutated again (INITIALIZED guard).
    load(
        unsafe { &*GDT.get() },
        sel.kernel_code,
        sel.kernel_data,
        sel.tss,
    );
}

struct AllSelectors {
    kernel_code: SegmentSelector,
    kernel_data: SegmentSelector,
    user_data: SegmentSelector,
    user_code: SegmentSelector,
    tss: SegmentSelector,
}

/// The descriptors every CPU's GDT holds, in one order, so the selectors
/// are the same on every CPU.
fn fill(gdt: &mut GlobalDescriptorTable, tss: &'static TaskStateSegment) -> AllSelectors {
    AllSelectors {
        kernel_code: gdt.append(Descriptor::kernel_code_segment()),
        kernel_data: gdt.append(Descriptor::kernel_data_segment()),
        user_data: gdt.append(Descriptor::user_data_segment()),
        user_code: gdt.append(Descriptor::user_code_segment()),
        tss: gdt.append(Descriptor::tss_segment(tss)),
    }
}

fn load(
    gdt: &'static GlobalDescriptorTable,
    code: SegmentSelector,
    data: SegmentSelector,
    tss: SegmentSelector,
) {
    gdt.load();
    // SAFETY: the selectors index descriptors of the GDT just loaded, with
    // the types (code/data/TSS) each register requires.
    unsafe {
        CS::set_reg(code);
        SS::set_reg(data);
        DS::set_reg(data);
        ES::set_reg(data);
        FS::set_reg(SegmentSelector(0));
        GS::set_reg(SegmentSelector(0));
        load_tss(tss);
    }
}

/// An application processor's own GDT, TSS and IST stacks (a TSS is busy
/// while loaded, so no two CPUs can share one), built on the boot CPU so
/// APs never allocate, and kept for good.
pub struct CpuTables {
    gdt: &'static GlobalDescriptorTable,
    code: SegmentSelector,
    data: SegmentSelector,
    tss: SegmentSelector,
}

/// Builds one AP's tables; the selectors are the boot CPU's. After `init`.
pub fn new_cpu_tables() -> CpuTables {
    use alloc::boxed::Box;
    assert!(
        INITIALIZED.load(Ordering::SeqCst),
        "gdt::new_cpu_tables before init"
    );
    // Uninitialised: a stack is written before it is read, and zeroing
    // 48 KiB costs ~6,000 emulated stores.
    let stacks = Box::leak(Box::<IstStacks>::new_uninit()).as_mut_ptr() as u64;
    let mut tss = TaskStateSegment::new();
    for i in 0..IST_COUNT {
        let top = stacks + ((i + 1) * IST_STACK_SIZE) as u64;
        tss.interrupt_stack_table[i] = VirtAddr::new(top & !0xf);
    }
    let tss: &'static TaskStateSegment = Box::leak(Box::new(tss));
    let gdt = Box::leak(Box::new(GlobalDescriptorTable::new()));
    let sel = fill(gdt, tss);
    assert_eq!(
        (sel.kernel_code.0, sel.user_code.0),
        (
            KERNEL_CS.load(Ordering::Relaxed),
            USER_CS.load(Ordering::Relaxed)
        )
    );
    CpuTables {
        gdt,
        code: sel.kernel_code,
        data: sel.kernel_data,
        tss: sel.tss,
    }
}

/// Loads `t` on the application processor it was built for (once).
pub fn load_ap(t: &CpuTables) {
    load(t.gdt, t.code, t.data, t.tss);
}
