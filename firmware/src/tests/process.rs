//! Process address spaces: demand paging, the zero page, segmentation
//! faults, mprotect/munmap, mremap, 2 MiB pages, notifier ordering, isolation, TLB
//! maintenance, device-exclusive entries, fork and copy-on-write (`fork`),
//! the mirror layer on top, teardown accounting, a long random run against
//! a reference model, and the walls between user and kernel (U/S, SMAP,
//! SMEP).
//!
//! Every CPU access to process memory here is made in user mode by the
//! process's agent (`crate::user::agent`), so faults carry U and the CPU
//! checks the user permissions; `Process::run` (kernel code in the
//! process's context) is used where a test needs the tables to stay
//! loaded between accesses, or kernel access itself is under test.

use alloc::format;
use alloc::string::String;
use alloc::sync::{Arc, Weak};
use alloc::vec;
use alloc::vec::Vec;

use faultline_driver::errno::Errno;
use faultline_driver::hmm::{
    mirror_register, range_fault, range_register, HmmMirrorOps, HmmRange, HmmUpdate,
    HMM_PFN_FLAG_MAX, HMM_PFN_VALUE_MAX,
};
use faultline_driver::mm::{
    make_device_exclusive, mmap_read_lock, mmap_write_lock, mmget, mmget_not_zero, mmput,
    mmu_notifier_register, DeviceOwner, FaultError, FaultFlags, Mm, MmuNotifier, MmuNotifierRange,
    MmuNotifyEvent, Mremap, MremapFlags, PageState, VmFlags, Walk, PAGE_SHIFT, PAGE_SIZE as PG,
    PMD_SHIFT, PMD_SIZE as HUGE,
};
use x86_64::PhysAddr;

use super::Test;

mod fork;
use crate::mm::process::{
    user, zero_pfn, Access, MapFlags, Process, ProcessMm, Prot, Segfault, SegvReason,
};
use crate::mm::{direct_map, frames, USER_BASE};
use crate::sync::IrqMutex;
use crate::user::agent::{Agent, ChaseList, Pattern};

pub const TESTS: &[Test] = &[
    Test::new("process_demand_paging", demand_paging),
    Test::new("process_zero_page_cow", zero_page_cow),
    Test::new("process_segfaults", segfaults),
    Test::new("process_mprotect", mprotect),
    Test::new("process_munmap", munmap),
    Test::new("process_huge_pages", huge_pages),
    Test::new("process_mremap", mremap),
    Test::new("process_notifier_order", notifier_order),
    Test::new("process_exclusive", exclusive),
    Test::new("process_fork", fork::fork_cow),
    Test::new("process_fork_exit_order", fork::fork_exit_order),
    Test::new("process_fork_exclusive", fork::fork_exclusive),
    Test::new("process_fork_shared_mprotect", fork::fork_shared_mprotect),
    Test::new("process_fork_enomem", fork::fork_enomem),
    Test::new("process_isolation", isolation),
    Test::new("process_tlb_flush", tlb_flush),
    Test::new("process_remote_fault", remote_fault),
    Test::new("process_hmm_mirror", hmm_mirror),
    Test::new("process_teardown", teardown),
    Test::new("process_random_ops", random_ops),
    Test::new("process_agent_ops", agent_ops),
    Test::new("process_user_kernel_pages", user_kernel_pages),
    Test::new("process_smap", smap),
    Test::new("process_smep", smep),
];

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)*) => {
        if !$cond {
            return Err(format!($($fmt)*));
        }
    };
}

const RW: Prot = Prot::READ.union(Prot::WRITE);

fn new_process() -> Result<Process, String> {
    Process::new().map_err(|e| format!("Process::new: {e:?}"))
}

fn map(p: &Process, addr: Option<u64>, len: u64, prot: Prot, f: MapFlags) -> Result<u64, String> {
    p.mmap(addr, len, prot, f)
        .map_err(|e| format!("mmap({addr:x?}, {len:#x}, {prot:?}, {f:?}): {e:?}"))
}

/// A process with a notifier [`Recorder`] attached, then one RW mapping of
/// `len` bytes where the process puts it.
fn watched(len: u64, f: MapFlags) -> Result<(Process, Arc<Recorder>, u64), String> {
    let p = new_process()?;
    let rec = Recorder::attach(&p);
    let a = map(&p, None, len, RW, f)?;
    Ok((p, rec, a))
}

fn debug_str(e: impl core::fmt::Debug) -> String {
    format!("{e:?}")
}

/// A user-mode load of the u64 at `addr`.
fn read(p: &Process, addr: u64) -> Result<u64, Segfault> {
    p.agent().read_u64(addr)
}

/// A user-mode store.
fn write(p: &Process, addr: u64, v: u64) -> Result<(), Segfault> {
    p.agent().write_u64(addr, v)
}

/// Page-fault error code bits.
const PF_P: u64 = 1 << 0;
const PF_W: u64 = 1 << 1;
const PF_U: u64 = 1 << 2;
const PF_I: u64 = 1 << 4;

/// A word of a frame, through the direct map (what the device would see).
fn frame_word(pfn: u64, offset: u64) -> u64 {
    let va = direct_map::phys_to_virt(PhysAddr::new((pfn << PAGE_SHIFT) + offset));
    // SAFETY: `pfn` is a RAM frame (mapped by a process we own), so it is in
    // the direct map; a volatile read races with nothing on one CPU.
    unsafe { va.as_ptr::<u64>().read_volatile() }
}

fn present(w: Walk) -> Option<(u64, bool)> {
    match w.state {
        PageState::Present { pfn, writable } => Some((pfn, writable)),
        _ => None,
    }
}

/// [`present`] for the 4 KiB PTE a notifier call saw.
fn present_at(s: &Seen) -> Option<(u64, bool)> {
    present(Walk {
        state: s.state,
        shift: 12,
    })
}

fn demand_paging() -> Result<(), String> {
    let p = new_process()?;
    let a = map(&p, None, 4 * PG, RW, MapFlags::empty())?;
    ensure!(a >= USER_BASE && a % PG == 0, "mmap returned {a:#x}");
    for i in 0..4 {
        let w = p.translate(a + i * PG);
        ensure!(
            w.state == PageState::None,
            "page {i} mapped before any touch: {w:?}"
        );
    }
    let before = p.stats();
    write(&p, a, 0x1111).map_err(|e| format!("write page 0: {e}"))?;
    write(&p, a + 2 * PG + 8, 0x2222).map_err(|e| format!("write page 2: {e}"))?;
    let r1 = read(&p, a + PG).map_err(|e| format!("read page 1: {e}"))?;
    let r0 = read(&p, a).map_err(|e| format!("read page 0: {e}"))?;
    let r2 = read(&p, a + 2 * PG + 8).map_err(|e| format!("read page 2: {e}"))?;
    ensure!(
        r0 == 0x1111 && r2 == 0x2222 && r1 == 0,
        "read back {r0:#x} {r1:#x} {r2:#x}"
    );
    let (pfn0, w0) = present(p.translate(a)).ok_or("page 0 not present after a write")?;
    let (pfn2, w2) = present(p.translate(a + 2 * PG)).ok_or("page 2 not present after a write")?;
    ensure!(w0 && w2, "written pages not writable");
    ensure!(pfn0 != pfn2, "two pages share frame {pfn0:#x}");
    ensure!(
        frame_word(pfn0, 0) == 0x1111 && frame_word(pfn2, 8) == 0x2222,
        "frames do not hold the written data"
    );
    let w1 = p.translate(a + PG);
    ensure!(
        w1.state == PageState::Zero { pfn: zero_pfn() } && w1.shift == PAGE_SHIFT,
        "page 1 after a read: {w1:?}"
    );
    ensure!(
        p.translate(a + 3 * PG).state == PageState::None,
        "untouched page 3 got mapped"
    );
    let after = p.stats();
    // Bulk accessors: a pattern over a fresh page, checked word by word,
    // then bytes in and out at unaligned addresses.
    let ag = p.agent();
    let fill = Pattern::constant(0xabab_abab_abab_abab);
    ag.fill(a + 3 * PG, PG, fill)
        .map_err(|e| format!("fill: {e}"))?;
    let bad = ag
        .check(a + 3 * PG, PG, fill)
        .map_err(|e| format!("check: {e}"))?;
    ensure!(bad.is_none(), "filled page: {bad:x?}");
    let bytes: [u8; 5] = [1, 2, 3, 4, 5];
    let mut got = [0u8; 16];
    ag.write_bytes(a + 3 * PG + 100, &bytes)
        .map_err(|e| format!("write_bytes: {e}"))?;
    ag.read_bytes(a + 3 * PG + 96, &mut got)
        .map_err(|e| format!("read_bytes: {e}"))?;
    ensure!(
        got[..4] == [0xab; 4] && got[4..9] == bytes && got[9..] == [0xab; 7],
        "bulk access read back {got:x?}"
    );
    // A check sees a changed word (the word holding byte 100 onwards).
    let bad = ag
        .check(a + 3 * PG, PG, fill)
        .map_err(|e| format!("check: {e}"))?;
    ensure!(
        bad.is_some_and(|m| m.addr == a + 3 * PG + 96 && m.expected == fill.base),
        "check after the byte writes: {bad:x?}"
    );
    // Longer than one register load: 200 bytes across the page end.
    let long: Vec<u8> = (0..200u32).map(|i| (i * 7) as u8).collect();
    let at = a + 3 * PG + PG - 100;
    let r = ag.write_bytes(at, &long);
    ensure!(
        r.is_err_and(|s| s.addr == a + 4 * PG && s.reason == SegvReason::NoMapping),
        "write_bytes past the mapping: {r:?}"
    );
    let mut back = [0u8; 100];
    ag.read_bytes(at, &mut back)
        .map_err(|e| format!("read_bytes: {e}"))?;
    ensure!(back[..] == long[..100], "bytes up to the mapping's end");
    ensure!(
        after.faults - before.faults == 3,
        "{} faults for three first touches (re-reads must not fault)",
        after.faults - before.faults
    );
    ensure!(
        after.data_frames - before.data_frames == 2,
        "{} data frames for two written pages",
        after.data_frames - before.data_frames
    );
    Ok(())
}

/// Records every notifier call with the page-table state the callback saw.
struct Recorder {
    mm: Weak<ProcessMm>,
    /// Frame whose free state is sampled at each call (0: none).
    watch_pfn: core::sync::atomic::AtomicU64,
    log: IrqMutex<Vec<Seen>>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Seen {
    phase: &'static str,
    start: u64,
    end: u64,
    event: Option<MmuNotifyEvent>,
    state: PageState,
    watched_free: bool,
}

impl Recorder {
    fn attach(p: &Process) -> Arc<Recorder> {
        let r = Arc::new(Recorder {
            mm: Arc::downgrade(p.mm()),
            watch_pfn: core::sync::atomic::AtomicU64::new(0),
            log: IrqMutex::new(Vec::new()),
        });
        let weak: Weak<dyn MmuNotifier<ProcessMm>> = Arc::downgrade(&r) as _;
        mmu_notifier_register(&**p.mm(), weak);
        r
    }

    fn record(&self, phase: &'static str, range: Option<&MmuNotifierRange>) {
        let start = range.map_or(0, |r| r.start);
        let state = match self.mm.upgrade() {
            Some(mm) if range.is_some() => mm.translate(start).state,
            _ => PageState::None,
        };
        let pfn = self.watch_pfn.load(core::sync::atomic::Ordering::Relaxed);
        let watched_free = pfn != 0 && frames::is_free(PhysAddr::new(pfn << PAGE_SHIFT));
        self.log.lock().push(Seen {
            phase,
            start,
            end: range.map_or(0, |r| r.end),
            event: range.map(|r| r.event),
            state,
            watched_free,
        });
    }

    fn take(&self) -> Vec<Seen> {
        core::mem::take(&mut *self.log.lock())
    }
}

impl MmuNotifier<ProcessMm> for Recorder {
    fn invalidate_range_start(&self, _: &ProcessMm, r: &MmuNotifierRange) -> Result<(), Errno> {
        self.record("start", Some(r));
        Ok(())
    }
    fn invalidate_range_end(&self, _: &ProcessMm, r: &MmuNotifierRange) {
        self.record("end", Some(r));
    }
    fn release(&self, _: &ProcessMm) {
        self.record("release", None);
    }
}

fn zero_page_cow() -> Result<(), String> {
    let (p, rec, a) = watched(PG, MapFlags::empty())?;
    ensure!(read(&p, a + 64) == Ok(0), "fresh page does not read 0");
    let z = Walk {
        state: PageState::Zero { pfn: zero_pfn() },
        shift: PAGE_SHIFT,
    };
    ensure!(
        p.translate(a) == z,
        "read fault mapped {:?}, not the zero page",
        p.translate(a)
    );
    ensure!(rec.take().is_empty(), "a read fault sent notifications");
    write(&p, a + 64, 0xabcd).map_err(|e| format!("write after read: {e}"))?;
    let (pfn, w) = present(p.translate(a)).ok_or("no private frame after the write")?;
    ensure!(pfn != zero_pfn() && w, "COW left pfn {pfn:#x} writable={w}");
    ensure!(read(&p, a + 64) == Ok(0xabcd), "COW page lost the write");
    ensure!(read(&p, a) == Ok(0), "COW copy is not zero elsewhere");
    ensure!(
        frame_word(zero_pfn(), 64) == 0,
        "the write reached the shared zero page"
    );
    let log = rec.take();
    let want_range = (a, a + PG, Some(MmuNotifyEvent::Clear));
    ensure!(
        log.len() == 2
            && log.iter().all(|s| (s.start, s.end, s.event) == want_range)
            && log[0].phase == "start"
            && log[0].state == z.state
            && log[1].phase == "end"
            && present_at(&log[1]) == Some((pfn, true)),
        "COW notifications {log:?}"
    );
    Ok(())
}

fn expect_segv(
    r: Result<u64, Segfault>,
    addr: u64,
    access: Access,
    reason: SegvReason,
) -> Result<(), String> {
    match r {
        // From user mode (U), as every access of the tests' agent.
        Err(s)
            if s.addr == addr
                && s.access == access
                && s.reason == reason
                && s.error & PF_U != 0 =>
        {
            Ok(())
        }
        Err(s) => Err(format!(
            "expected {access:?} fault at {addr:#x} ({reason:?}), got {s}"
        )),
        Ok(v) => Err(format!(
            "{access:?} at {addr:#x} succeeded ({v:#x}), expected {reason:?}"
        )),
    }
}

fn segfaults() -> Result<(), String> {
    let p = new_process()?;
    let none = map(&p, None, PG, Prot::empty(), MapFlags::empty())?;
    let ro = map(&p, None, PG, Prot::READ, MapFlags::empty())?;
    let rw = map(&p, None, PG, RW, MapFlags::empty())?;
    expect_segv(read(&p, none), none, Access::Read, SegvReason::NoAccess)?;
    expect_segv(
        write(&p, none + 8, 1).map(|_| 0),
        none + 8,
        Access::Write,
        SegvReason::NoAccess,
    )?;
    ensure!(read(&p, ro) == Ok(0), "read-only page does not read 0");
    expect_segv(
        write(&p, ro, 1).map(|_| 0),
        ro,
        Access::Write,
        SegvReason::ReadOnly,
    )?;
    let hole = rw + 64 * PG;
    expect_segv(read(&p, hole), hole, Access::Read, SegvReason::NoMapping)?;
    // Kernel code in the process (the `user` accessors, inside stac/clac):
    // the closure ends at the fault, nothing after it runs, nothing is
    // returned, and the process keeps working.
    let mut reached = false;
    let r = p.run(|| {
        user::write_u64(rw, 7);
        user::write_u64(ro, 8);
        reached = true;
    });
    ensure!(
        r.is_err_and(|s| s.addr == ro) && !reached,
        "closure not ended at the faulting write"
    );
    ensure!(read(&p, rw) == Ok(7), "write before the fault lost");
    // Instruction fetch from a non-executable mapping (with NX available),
    // in user mode: the agent jumps to `jmp rsi`, which returns to it.
    if crate::arch::paging::nx_enabled() {
        let code = map(&p, None, PG, RW, MapFlags::empty())?;
        write(&p, code, JMP_RSI).map_err(|e| format!("write jmp: {e}"))?;
        let call = |p: &Process| p.agent().jump(code).map(|_| 0);
        expect_segv(call(&p), code, Access::Exec, SegvReason::NoExec)?;
        p.mprotect(code, PG, Prot::READ | Prot::EXEC)
            .map_err(|e| format!("mprotect exec: {e:?}"))?;
        ensure!(
            call(&p) == Ok(0),
            "executable page did not run: {:?}",
            call(&p)
        );
    }
    // Remote faults get the same verdicts as error values.
    let mm = p.mm();
    let g = mmap_read_lock(&**mm);
    let remote = |addr, flags| mm.handle_mm_fault(&g, addr, flags | FaultFlags::REMOTE);
    ensure!(
        remote(none, FaultFlags::empty()) == Err(FaultError::Sigsegv)
            && remote(ro, FaultFlags::WRITE) == Err(FaultError::Sigsegv)
            && remote(hole, FaultFlags::empty()) == Err(FaultError::Sigsegv),
        "remote faults on PROT_NONE / read-only / hole did not fail"
    );
    Ok(())
}

fn mprotect() -> Result<(), String> {
    let (p, rec, a) = watched(2 * PG, MapFlags::empty())?;
    write(&p, a, 0x55).map_err(|e| format!("write: {e}"))?;
    let (pfn, _) = present(p.translate(a)).ok_or("not present")?;
    rec.take();
    // Down to read-only: the frame stays, loses write.
    p.mprotect(a, PG, Prot::READ).map_err(debug_str)?;
    ensure!(
        p.vmas().len() == 2,
        "mprotect of one page did not split: {:?}",
        p.vmas()
    );
    ensure!(
        present(p.translate(a)) == Some((pfn, false)),
        "after R: {:?}",
        p.translate(a)
    );
    ensure!(read(&p, a) == Ok(0x55), "read after R");
    expect_segv(
        write(&p, a, 1).map(|_| 0),
        a,
        Access::Write,
        SegvReason::ReadOnly,
    )?;
    // Down to nothing: the walk still reports the (kept) frame, read-only.
    p.mprotect(a, PG, Prot::empty()).map_err(debug_str)?;
    ensure!(
        present(p.translate(a)) == Some((pfn, false)),
        "after NONE: {:?}",
        p.translate(a)
    );
    expect_segv(read(&p, a), a, Access::Read, SegvReason::NoAccess)?;
    // Up to read-write: same frame and data; the write upgrades in place.
    p.mprotect(a, PG, RW).map_err(debug_str)?;
    ensure!(
        p.vmas().len() == 1,
        "equal neighbours not merged: {:?}",
        p.vmas()
    );
    ensure!(read(&p, a) == Ok(0x55), "data lost across PROT_NONE");
    write(&p, a, 0x66).map_err(|e| format!("write after RW: {e}"))?;
    ensure!(
        present(p.translate(a)) == Some((pfn, true)),
        "after RW + write: {:?}",
        p.translate(a)
    );
    // Start and end of each: read-only is a write-protection (translations
    // kept), PROT_NONE and the upgrade are not.
    let log = rec.take();
    let events = [
        MmuNotifyEvent::ProtectionPage,
        MmuNotifyEvent::ProtectionVma,
        MmuNotifyEvent::ProtectionVma,
    ];
    ensure!(
        log.len() == 6
            && log
                .iter()
                .zip(events.iter().flat_map(|&e| [e, e]))
                .all(|(s, e)| (s.start, s.end, s.event) == (a, a + PG, Some(e))),
        "mprotect notifications {log:?}"
    );
    // A hole in the range: ENOMEM and nothing changes.
    ensure!(
        p.mprotect(a, 8 * PG, Prot::READ) == Err(Errno::ENOMEM),
        "mprotect over a hole did not fail"
    );
    ensure!(
        present(p.translate(a)) == Some((pfn, true)),
        "failed mprotect changed the PTE"
    );
    ensure!(
        p.mprotect(a + 1, PG, Prot::READ) == Err(Errno::EINVAL),
        "unaligned mprotect"
    );
    Ok(())
}

fn munmap() -> Result<(), String> {
    let (p, rec, a) = watched(3 * PG, MapFlags::empty())?;
    for i in 0..3 {
        write(&p, a + i * PG, i + 1).map_err(|e| format!("write {i}: {e}"))?;
    }
    let (pfn, _) = present(p.translate(a + PG)).ok_or("not present")?;
    let free = frames::stats().free;
    rec.take();
    p.munmap(a + PG, PG).map_err(debug_str)?;
    ensure!(
        frames::stats().free == free + 1 && frames::is_free(PhysAddr::new(pfn << 12)),
        "munmap of one page returned {} frames",
        frames::stats().free - free
    );
    ensure!(
        p.vmas().len() == 2,
        "hole did not split the VMA: {:?}",
        p.vmas()
    );
    ensure!(
        p.translate(a + PG).state == PageState::None,
        "unmapped page still mapped"
    );
    expect_segv(
        read(&p, a + PG),
        a + PG,
        Access::Read,
        SegvReason::NoMapping,
    )?;
    ensure!(
        read(&p, a) == Ok(1) && read(&p, a + 2 * PG) == Ok(3),
        "neighbours of the hole changed"
    );
    let log = rec.take();
    ensure!(
        log.len() == 2
            && log
                .iter()
                .all(|s| (s.start, s.end, s.event)
                    == (a + PG, a + 2 * PG, Some(MmuNotifyEvent::Unmap))),
        "munmap notifications {log:?}"
    );
    // Unmapping everything also frees the page-table pages (PDPT, PD, PT).
    let tables = p.stats().page_tables;
    let free = frames::stats().free;
    p.munmap(a, 3 * PG).map_err(debug_str)?;
    ensure!(
        p.stats().page_tables == 1 && frames::stats().free == free + 2 + (tables - 1),
        "full munmap left {} tables, returned {} frames",
        p.stats().page_tables,
        frames::stats().free - free
    );
    ensure!(p.munmap(a, 3 * PG).is_ok(), "munmap of nothing failed");
    ensure!(
        rec.take().len() == 2,
        "one munmap with a mapping = one start/end pair"
    );
    expect_segv(read(&p, a), a, Access::Read, SegvReason::NoMapping)?;
    Ok(())
}

/// mremap moves entries, not data: a 4 KiB move and a 2 MiB move keep
/// their frames (the data count unchanged, the frames free count too),
/// the old range's page tables are pruned, a misaligned HUGE mremap is
/// EINVAL, and unmapping the moved ranges gives every frame and table
/// back.
fn mremap() -> Result<(), String> {
    let p = new_process()?;
    let base = (frames::stats().free, p.stats().page_tables);
    let a = map(&p, None, 4 * PG, RW, MapFlags::POPULATE)?;
    let h = map(&p, None, 2 * HUGE, RW, MapFlags::HUGE | MapFlags::POPULATE)?;
    write(&p, a + PG, 0x11).map_err(|e| format!("write: {e}"))?;
    write(&p, h + HUGE + 8, 0x22).map_err(|e| format!("write: {e}"))?;
    let (small, huge) = (present(p.translate(a + PG)), p.translate(h + HUGE).state);
    let (free, data) = (frames::stats().free, p.stats().data_frames);
    let fixed = MremapFlags::MAYMOVE | MremapFlags::FIXED;
    let far = h + 64 * HUGE;
    let bad = p.mremap(Mremap {
        old: h + PG,
        old_len: HUGE,
        new_len: HUGE,
        flags: fixed,
        new_addr: far,
    });
    ensure!(bad == Err(Errno::EINVAL), "misaligned HUGE mremap: {bad:?}");
    let to = |old, len, new_addr| Mremap {
        old,
        old_len: len,
        new_len: len,
        flags: fixed,
        new_addr,
    };
    let m = p.mremap(to(a, 4 * PG, far + 8 * HUGE)).map_err(debug_str)?;
    let g = p.mremap(to(h, 2 * HUGE, far)).map_err(debug_str)?;
    ensure!(
        present(p.translate(m + PG)) == small && p.translate(g + HUGE).state == huge,
        "entries did not move: {:?} {:?}",
        p.translate(m + PG),
        p.translate(g + HUGE)
    );
    ensure!(
        p.translate(a + PG).state == PageState::None
            && p.translate(h + HUGE).state == PageState::None,
        "old ranges still mapped"
    );
    // The destination's tables came, the old ones went: at most one
    // table more per level of a new branch (the moves went 128 MiB up).
    ensure!(
        frames::stats().free + 3 >= free && p.stats().data_frames == data,
        "move changed the frames: {} free (was {free}), {} data (was {data})",
        frames::stats().free,
        p.stats().data_frames
    );
    ensure!(
        read(&p, m + PG) == Ok(0x11) && read(&p, g + HUGE + 8) == Ok(0x22),
        "data did not move"
    );
    p.munmap(m, 4 * PG).map_err(debug_str)?;
    p.munmap(g, 2 * HUGE).map_err(debug_str)?;
    ensure!(
        (frames::stats().free, p.stats().page_tables) == base,
        "after unmapping: {} free frames, {} tables (was {base:?})",
        frames::stats().free,
        p.stats().page_tables
    );
    Ok(())
}

fn huge_pages() -> Result<(), String> {
    let p = new_process()?;
    ensure!(
        p.mmap(
            Some(USER_BASE + PG),
            HUGE,
            RW,
            MapFlags::HUGE | MapFlags::FIXED
        ) == Err(Errno::EINVAL),
        "misaligned huge mmap accepted"
    );
    let h = map(&p, None, 2 * HUGE, RW, MapFlags::HUGE)?;
    ensure!(h % HUGE == 0, "huge mapping at {h:#x}");
    let free = frames::stats().free;
    write(&p, h + 5 * PG + 16, 0xbeef).map_err(|e| format!("write: {e}"))?;
    let w = p.translate(h + 7 * PG);
    let PageState::Huge {
        pfn,
        writable: true,
    } = w.state
    else {
        return Err(format!("not a writable 2 MiB leaf: {w:?}"));
    };
    ensure!(w.shift == PMD_SHIFT && pfn % 512 == 0, "leaf {w:?}");
    ensure!(
        frame_word(pfn + 5, 16) == 0xbeef,
        "2 MiB frame lacks the write"
    );
    ensure!(read(&p, h + 5 * PG + 16) == Ok(0xbeef), "read back");
    ensure!(
        read(&p, h + HUGE - 8) == Ok(0),
        "end of the 2 MiB page not zero"
    );
    let st = p.stats();
    // One leaf PDE: PDPT + PD only, no page table below it.
    ensure!(
        st.page_tables == 3 && st.data_frames == 512,
        "after one 2 MiB fault: {st:?}"
    );
    ensure!(
        free - frames::stats().free == 512 + 2,
        "one 2 MiB page cost {} frames",
        free - frames::stats().free
    );
    // A read fault in the second 2 MiB also maps a whole leaf.
    ensure!(read(&p, h + HUGE + 8) == Ok(0), "second page read");
    ensure!(
        matches!(p.translate(h + HUGE).state, PageState::Huge { .. }),
        "second leaf {:?}",
        p.translate(h + HUGE)
    );
    ensure!(
        p.munmap(h + PG, PG) == Err(Errno::EINVAL),
        "munmap split a 2 MiB page"
    );
    ensure!(
        p.mprotect(h, HUGE / 2, Prot::READ) == Err(Errno::EINVAL),
        "mprotect split a 2 MiB page"
    );
    p.mprotect(h, HUGE, Prot::READ).map_err(debug_str)?;
    ensure!(
        p.translate(h).state
            == PageState::Huge {
                pfn,
                writable: false
            },
        "after R: {:?}",
        p.translate(h)
    );
    expect_segv(
        write(&p, h, 1).map(|_| 0),
        h,
        Access::Write,
        SegvReason::ReadOnly,
    )?;
    p.munmap(h, 2 * HUGE).map_err(debug_str)?;
    // Frames and both page-table pages back: the count from before the faults.
    ensure!(
        frames::stats().free == free,
        "munmap of two 2 MiB pages: free {} vs {free} before the faults",
        frames::stats().free
    );
    Ok(())
}

fn notifier_order() -> Result<(), String> {
    let (p, rec, a) = watched(2 * PG, MapFlags::empty())?;
    write(&p, a, 1).map_err(|e| format!("{e}"))?;
    write(&p, a + PG, 2).map_err(|e| format!("{e}"))?;
    let (pfn, _) = present(p.translate(a)).ok_or("not present")?;
    rec.watch_pfn
        .store(pfn, core::sync::atomic::Ordering::Relaxed);
    rec.take();

    p.mprotect(a, 2 * PG, Prot::READ).map_err(debug_str)?;
    let log = rec.take();
    ensure!(
        log.len() == 2
            && log[0].phase == "start"
            && present_at(&log[0]) == Some((pfn, true))
            && log[1].phase == "end"
            && present_at(&log[1]) == Some((pfn, false))
            && log.iter().all(|s| (s.start, s.end) == (a, a + 2 * PG)),
        "mprotect: start must see the old PTE, end the new one: {log:?}"
    );

    p.munmap(a, 2 * PG).map_err(debug_str)?;
    let log = rec.take();
    ensure!(
        log.len() == 2
            && log[0].phase == "start"
            && present_at(&log[0]) == Some((pfn, false))
            && !log[0].watched_free
            && log[1].phase == "end"
            && log[1].state == PageState::None
            && !log[1].watched_free
            && log
                .iter()
                .all(|s| (s.start, s.end, s.event) == (a, a + 2 * PG, Some(MmuNotifyEvent::Unmap))),
        "munmap: PTE cleared between start and end, frame still owned at end: {log:?}"
    );
    ensure!(
        frames::is_free(PhysAddr::new(pfn << 12)),
        "frame not freed after munmap returned"
    );
    drop(p);
    let log = rec.take();
    ensure!(
        log.len() == 1 && log[0].phase == "release",
        "exit notifications {log:?}"
    );
    Ok(())
}

/// Device-exclusive entries in real page tables: they keep their frames
/// (the process's frame count does not move), a user-mode read restores
/// the PTE between the start and end of an `Exclusive { owner: None }` of
/// its page, mprotect restores the rest, munmap frees the frames.
fn exclusive() -> Result<(), String> {
    let (p, rec, a) = watched(2 * PG, MapFlags::empty())?;
    write(&p, a, 7).map_err(|e| format!("{e}"))?;
    let owner = DeviceOwner::alloc().ok_or("no owner id left")?;
    let take = |p: &Process| {
        let mmap = mmap_read_lock(&**p.mm());
        make_device_exclusive(&mmap, a, a + 2 * PG, owner)
    };
    let data = p.stats().data_frames;
    rec.take();
    let held = take(&p).map_err(debug_str)?;
    ensure!(held.len() == 2, "frames {held:?}");
    // Page 1 was faulted in writable; no frame went anywhere.
    ensure!(
        p.stats().data_frames == data + 1,
        "data frames {} (want {})",
        p.stats().data_frames,
        data + 1
    );
    for (i, &pfn) in held.iter().enumerate() {
        let want = PageState::Exclusive {
            owner,
            pfn,
            writable: true,
        };
        let got = p.translate(a + i as u64 * PG).state;
        ensure!(got == want, "page {i}: {got:?}, want {want:?}");
    }
    let asked = MmuNotifyEvent::Exclusive { owner: Some(owner) };
    let log = rec.take();
    ensure!(
        log.last().is_some_and(
            |s| (s.phase, s.start, s.end, s.event) == ("end", a, a + 2 * PG, Some(asked))
        ),
        "request events {log:?}"
    );
    ensure!(read(&p, a) == Ok(7), "user read of an exclusive page");
    let log = rec.take();
    let revoke = Some(MmuNotifyEvent::Exclusive { owner: None });
    ensure!(
        log.len() == 2
            && log
                .iter()
                .all(|s| (s.start, s.end, s.event) == (a, a + PG, revoke))
            && matches!(log[0].state, PageState::Exclusive { .. })
            && present_at(&log[1]) == Some((held[0], true)),
        "revoke: start must see the exclusive entry, end the present one: {log:?}"
    );
    ensure!(
        matches!(p.translate(a + PG).state, PageState::Exclusive { .. }),
        "page 1 revoked with page 0"
    );
    p.mprotect(a, 2 * PG, Prot::READ).map_err(debug_str)?;
    ensure!(
        present(p.translate(a + PG)) == Some((held[1], false)),
        "mprotect RO left {:?}",
        p.translate(a + PG)
    );
    ensure!(
        take(&p) == Err(Errno::EPERM),
        "exclusive on a read-only VMA"
    );
    p.mprotect(a, 2 * PG, RW).map_err(debug_str)?;
    ensure!(
        take(&p).map_err(debug_str)? == held,
        "second request moved frames"
    );
    p.munmap(a, 2 * PG).map_err(debug_str)?;
    ensure!(
        held.iter()
            .all(|&f| frames::is_free(PhysAddr::new(f << PAGE_SHIFT))),
        "munmap kept an exclusive entry's frame"
    );
    ensure!(
        p.stats().data_frames == data - 1,
        "data frames {} after munmap (want {})",
        p.stats().data_frames,
        data - 1
    );
    Ok(())
}

fn isolation() -> Result<(), String> {
    let p1 = new_process()?;
    let p2 = new_process()?;
    let a = USER_BASE + 0x1234_5000;
    for p in [&p1, &p2] {
        ensure!(
            map(p, Some(a), PG, RW, MapFlags::FIXED)? == a,
            "FIXED mapping moved"
        );
    }
    write(&p1, a, 0x1111_1111).map_err(|e| format!("{e}"))?;
    write(&p2, a, 0x2222_2222).map_err(|e| format!("{e}"))?;
    ensure!(
        read(&p1, a) == Ok(0x1111_1111) && read(&p2, a) == Ok(0x2222_2222),
        "same address, shared data"
    );
    // Nested: p2's agent runs inside p1's closure, and p1's tables come
    // back after.
    let nested = p1.run(|| (p2.agent().read_u64(a), p1.agent().read_u64(a)));
    ensure!(
        nested == Ok((Ok(0x2222_2222), Ok(0x1111_1111))),
        "nested run: {nested:?}"
    );
    let f1 = present(p1.translate(a)).ok_or("p1 not mapped")?.0;
    let f2 = present(p2.translate(a)).ok_or("p2 not mapped")?.0;
    ensure!(f1 != f2, "both processes map frame {f1:#x}");
    ensure!(
        p1.pml4_phys() != p2.pml4_phys()
            && p1.pml4_phys() != crate::arch::paging::kernel_pml4_phys().as_u64(),
        "processes share a PML4"
    );
    p1.munmap(a, PG).map_err(debug_str)?;
    ensure!(read(&p2, a) == Ok(0x2222_2222), "munmap in p1 hit p2");
    Ok(())
}

/// munmap/mprotect from inside the running process must drop the TLB
/// entries the agent just used: a stale entry would let the next access
/// through instead of faulting. `run` keeps the process's tables (and
/// their TLB entries) loaded between the agent's calls.
fn tlb_flush() -> Result<(), String> {
    let p = new_process()?;
    let a = map(&p, None, 16 * PG, RW, MapFlags::empty())?;
    // What the call inside the process returned: a refused call would
    // otherwise show up below as a missing flush.
    let called = core::cell::Cell::new(None);
    let refused = |what: &str, c: &core::cell::Cell<Option<Result<(), Errno>>>| match c.take() {
        Some(Ok(())) => Ok(()),
        other => Err(format!("{what} inside the process: {other:?}")),
    };
    let ag = p.agent();
    let inside = |f: &dyn Fn() -> Result<u64, Segfault>| {
        p.run(f).map_err(|e| format!("kernel side faulted: {e}"))
    };
    let r = inside(&|| {
        ag.write_u64(a, 1)?;
        called.set(Some(p.mprotect(a, PG, Prot::READ)));
        ag.write_u64(a, 2).map(|_| 0)
    })?;
    refused("mprotect(READ)", &called)?;
    expect_segv(r, a, Access::Write, SegvReason::ReadOnly)?;
    let r = inside(&|| {
        let v = ag.read_u64(a + PG)?;
        called.set(Some(p.munmap(a + PG, PG)));
        Ok(v + ag.read_u64(a + PG)?)
    })?;
    refused("munmap", &called)?;
    expect_segv(r, a + PG, Access::Read, SegvReason::NoMapping)?;
    // More pages than invlpg covers: the CR3 reload path.
    let r = inside(&|| {
        for i in 2..16 {
            ag.write_u64(a + i * PG, i)?;
        }
        called.set(Some(p.mprotect(a + 2 * PG, 14 * PG, Prot::empty())));
        ag.read_u64(a + 15 * PG)
    })?;
    refused("mprotect(NONE) of 14 pages", &called)?;
    expect_segv(r, a + 15 * PG, Access::Read, SegvReason::NoAccess)?;
    // COW from the device side while the CPU caches the zero page.
    let b = map(&p, None, PG, RW, MapFlags::empty())?;
    let r = p.run(|| {
        let z = ag.read_u64(b);
        let g = mmap_read_lock(&**p.mm());
        let f = p
            .mm()
            .handle_mm_fault(&g, b, FaultFlags::WRITE | FaultFlags::REMOTE);
        drop(g);
        let (pfn, _) = present(p.translate(b)).unwrap_or((0, false));
        // The "device" writes through the new frame; the CPU must see it.
        let va = direct_map::phys_to_virt(PhysAddr::new(pfn << 12));
        if pfn != 0 && pfn != zero_pfn() {
            // SAFETY: the frame just mapped for the process, in the direct map.
            unsafe { va.as_mut_ptr::<u64>().write_volatile(0x77) };
        }
        (z, f, ag.read_u64(b))
    });
    ensure!(
        r == Ok((Ok(0), Ok(()), Ok(0x77))),
        "CPU read after a remote COW saw {r:?} (stale zero page?)"
    );
    Ok(())
}

fn remote_fault() -> Result<(), String> {
    let p = new_process()?;
    let a = map(&p, None, 2 * PG, RW, MapFlags::empty())?;
    let mm = p.mm();
    {
        let g = mmap_read_lock(&**mm);
        mm.handle_mm_fault(&g, a, FaultFlags::REMOTE)
            .map_err(|e| format!("remote read fault: {e}"))?;
        ensure!(
            mm.walk(&g, a).state == PageState::Zero { pfn: zero_pfn() },
            "remote read did not map the zero page"
        );
        mm.handle_mm_fault(&g, a + PG, FaultFlags::REMOTE | FaultFlags::WRITE)
            .map_err(|e| format!("remote write fault: {e}"))?;
        ensure!(
            present(mm.walk(&g, a + PG)).is_some_and(|(_, w)| w),
            "remote write did not map a writable frame"
        );
        ensure!(
            mm.vma_lookup(&g, a)
                .is_some_and(|v| v.flags == VmFlags::READ | VmFlags::WRITE)
                && mm.vma_lookup(&g, a + 2 * PG).is_none(),
            "vma_lookup"
        );
    }
    // The CPU then uses the pages without faulting.
    let faults = p.stats().faults;
    ensure!(
        read(&p, a + PG) == Ok(0) && read(&p, a) == Ok(0),
        "CPU reads"
    );
    ensure!(
        p.stats().faults == faults,
        "CPU faulted on remotely mapped pages"
    );
    Ok(())
}

struct CountingMirror {
    updates: IrqMutex<Vec<HmmUpdate>>,
}

impl HmmMirrorOps<ProcessMm> for CountingMirror {
    fn sync_cpu_device_pagetables(&self, u: &HmmUpdate) -> Result<(), Errno> {
        self.updates.lock().push(*u);
        Ok(())
    }
}

/// The mirror layer on the real address space: range_fault faults pages in
/// through `handle_mm_fault` and reports the frames the CPU walk sees; a
/// munmap reaches the mirror.
fn hmm_mirror() -> Result<(), String> {
    const V: u64 = 1;
    const WR: u64 = 2;
    const FLAGS: [u64; HMM_PFN_FLAG_MAX] = [V, WR, 4];
    const VALUES: [u64; HMM_PFN_VALUE_MAX] = [8, 0, 16];
    let p = new_process()?;
    let a = map(&p, None, 4 * PG, RW, MapFlags::empty())?;
    let ops = Arc::new(CountingMirror {
        updates: IrqMutex::new(Vec::new()),
    });
    let mirror = {
        let g = mmap_write_lock(&**p.mm());
        mirror_register(p.mm(), &g, ops.clone()).map_err(|e| format!("mirror_register: {e}"))?
    };
    let mut range = HmmRange::new(FLAGS, VALUES, 8);
    range_register(&mut range, &mirror, a, a + 4 * PG, PAGE_SHIFT)
        .map_err(|e| format!("range_register: {e}"))?;
    ensure!(p.mm().core().users() == 2, "range holds no users reference");
    range.pfns = vec![V | WR, V, 0, V | WR];
    {
        let g = mmap_read_lock(&**p.mm());
        range_fault(&mut range, &g, true).map_err(|e| format!("range_fault: {e}"))?;
    }
    for (i, &e) in range.pfns.iter().enumerate() {
        let w = p.translate(a + i as u64 * PG).state;
        let want = match w {
            PageState::Present { pfn, writable } => range.entry_from_pfn(pfn, writable),
            PageState::Zero { pfn } => range.entry_from_pfn(pfn, false),
            PageState::None => 0,
            other => return Err(format!("page {i}: {other:?}")),
        };
        ensure!(e == want, "pfns[{i}] = {e:#x}, CPU walk says {w:?}");
    }
    ensure!(
        range.entry_is_writable(range.pfns[0])
            && range.entry_to_pfn(range.pfns[1]) == Some(zero_pfn())
            && range.pfns[2] == 0,
        "requests not honoured: {:x?}",
        range.pfns
    );
    drop(range);
    ensure!(p.mm().core().users() == 1, "range kept its users reference");
    p.munmap(a, 2 * PG).map_err(debug_str)?;
    let ups = ops.updates.lock().clone();
    ensure!(
        ups.iter()
            .any(|u| (u.start, u.end, u.event) == (a, a + 2 * PG, MmuNotifyEvent::Unmap)),
        "mirror not told about the munmap: {ups:?}"
    );
    drop(mirror);
    Ok(())
}

fn teardown() -> Result<(), String> {
    let free = frames::stats().free;
    let heap = crate::mm::heap::stats();
    {
        let (p, rec, a) = watched(8 * PG, MapFlags::POPULATE)?;
        let h = map(&p, Some(USER_BASE + (300 << 30)), HUGE, RW, MapFlags::HUGE)?;
        let far = map(
            &p,
            Some(USER_BASE + (200u64 << 39)),
            PG,
            Prot::READ,
            MapFlags::FIXED,
        )?;
        write(&p, h, 1).map_err(|e| format!("{e}"))?;
        ensure!(read(&p, far) == Ok(0), "far read");
        p.mprotect(a, PG, Prot::empty()).map_err(debug_str)?;
        let st = p.stats();
        ensure!(
            st.data_frames == 8 + 512,
            "POPULATE + one 2 MiB page: {st:?}"
        );
        let used = free - frames::stats().free;
        ensure!(
            used == st.page_tables + st.data_frames,
            "process holds {used} frames, its counters say {st:?}"
        );
        // An extra user keeps the address space alive past the owner.
        rec.take();
        let mm = p.mm().clone();
        mmget(&*mm);
        drop(p);
        ensure!(
            !mm.is_dead() && rec.take().is_empty(),
            "torn down with a user left"
        );
        ensure!(
            read_via(&mm, a + PG) == Ok(0),
            "still usable through the extra user"
        );
        mmput(&*mm);
        ensure!(mm.is_dead(), "last mmput did not tear down");
        ensure!(
            !mmget_not_zero(&*mm),
            "mmget_not_zero on a dead address space"
        );
        let log = rec.take();
        ensure!(
            log.len() == 1 && log[0].phase == "release",
            "release notifications {log:?}"
        );
        ensure!(
            read_via(&mm, a + PG).is_err_and(|s| s.reason == SegvReason::Dead),
            "dead address space still faults pages in"
        );
        ensure!(
            frames::stats().free == free - 1,
            "after exit_mmap only the PML4 may remain: {} frames missing",
            free - frames::stats().free
        );
    }
    ensure!(
        frames::stats().free == free,
        "frames before {free}, after {}",
        frames::stats().free
    );
    // Unwatched, exit gives data frames back in physically consecutive
    // runs: the bitmap must agree with the counter afterwards.
    {
        let p = new_process()?;
        map(&p, None, 100 * PG, RW, MapFlags::POPULATE)?;
    }
    let (counted, recounted) = (frames::stats().free, frames::recount());
    ensure!(
        counted == free && recounted == free,
        "after an unwatched exit: {counted} free by the counter, {recounted} in the bitmap, {free} before"
    );
    let now = crate::mm::heap::stats();
    ensure!(
        now.allocated_bytes <= heap.allocated_bytes,
        "heap grew from {} to {} bytes",
        heap.allocated_bytes,
        now.allocated_bytes
    );
    Ok(())
}

fn read_via(mm: &Arc<ProcessMm>, addr: u64) -> Result<u64, Segfault> {
    Agent::new(mm).read_u64(addr)
}

// The random run. A 48-page window of 4 KiB mappings and two 2 MiB pages,
// with a reference model per page; every operation is checked against it
// (return value, data read, software walk and VMA at the edges of its
// range), and every 1000 operations (and at the end) the whole window, the
// frame contents, the VMA count and the frame accounting too. Each check
// costs tens of microseconds under PVM, hence the edges only per operation.

const NPAGES: usize = 48;
const NHUGE: usize = 2;
const OPS: u32 = 10_000;

#[derive(Debug, Clone, Copy, PartialEq)]
enum St {
    Empty,
    Zero,
    Frame { pfn: u64, val: u64, writable: bool },
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct MPage {
    prot: Option<Prot>,
    st: St,
}

struct Model {
    base: u64,
    hbase: u64,
    small: [MPage; NPAGES],
    huge: [MPage; NHUGE],
}

impl Model {
    fn page(&mut self, huge: bool, i: usize) -> &mut MPage {
        if huge {
            &mut self.huge[i]
        } else {
            &mut self.small[i]
        }
    }

    fn addr(&self, huge: bool, i: usize) -> u64 {
        if huge {
            self.hbase + i as u64 * HUGE
        } else {
            self.base + i as u64 * PG
        }
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        (self.next() >> 32) % n
    }
}

fn vm_of(prot: Prot, huge: bool) -> VmFlags {
    let mut f = if prot.is_empty() {
        VmFlags::empty()
    } else {
        VmFlags::READ
    };
    if prot.contains(Prot::WRITE) {
        f |= VmFlags::WRITE;
    }
    if huge {
        f |= VmFlags::HUGE;
    }
    f
}

/// Checks one page of the model against the page tables and the VMA tree.
fn check_page(p: &Process, m: &Model, huge: bool, i: usize, g: &Guard<'_>) -> Result<(), String> {
    let mp = if huge { m.huge[i] } else { m.small[i] };
    let addr = m.addr(huge, i);
    let w = p.translate(addr).state;
    let want = match (mp.st, huge) {
        (St::Empty, _) => PageState::None,
        (St::Zero, _) => PageState::Zero { pfn: zero_pfn() },
        (St::Frame { pfn, writable, .. }, false) => PageState::Present { pfn, writable },
        (St::Frame { pfn, writable, .. }, true) => PageState::Huge { pfn, writable },
    };
    ensure!(w == want, "{addr:#x}: walk {w:?}, model {mp:?}");
    let vma = p.mm().vma_lookup(g, addr).map(|v| v.flags);
    ensure!(
        vma == mp.prot.map(|pr| vm_of(pr, huge)),
        "{addr:#x}: VMA {vma:?}, model {mp:?}"
    );
    Ok(())
}

type Guard<'a> = faultline_driver::mm::MmapReadGuard<'a, ProcessMm>;

fn check_all(p: &Process, m: &Model, free_at_start: u64) -> Result<(), String> {
    let g = mmap_read_lock(&**p.mm());
    let mut data = 0;
    for huge in [false, true] {
        let n = if huge { NHUGE } else { NPAGES };
        for i in 0..n {
            check_page(p, m, huge, i, &g)?;
            if let St::Frame { pfn, val, .. } = if huge { m.huge[i] } else { m.small[i] }.st {
                ensure!(
                    frame_word(pfn, 0) == val,
                    "frame {pfn:#x} holds {:#x}, model {val:#x}",
                    frame_word(pfn, 0)
                );
                data += if huge { 512 } else { 1 };
            }
        }
    }
    drop(g);
    let st = p.stats();
    ensure!(
        st.data_frames == data,
        "{} data frames, model {data}",
        st.data_frames
    );
    let used = free_at_start - frames::stats().free;
    ensure!(
        used == st.page_tables + st.data_frames,
        "{used} frames in use, counters {st:?}"
    );
    // Merging keeps one VMA per run of equal protection.
    let runs = |pages: &[MPage]| {
        pages
            .iter()
            .enumerate()
            .filter(|&(i, mp)| mp.prot.is_some() && (i == 0 || pages[i - 1].prot != mp.prot))
            .count()
    };
    let want = runs(&m.small) + runs(&m.huge);
    ensure!(
        p.vmas().len() == want,
        "{} VMAs, model has {want} runs",
        p.vmas().len()
    );
    Ok(())
}

fn random_ops() -> Result<(), String> {
    let free_at_start = frames::stats().free;
    let p = new_process()?;
    let mut m = Model {
        base: USER_BASE + (1 << 30),
        hbase: USER_BASE + (2 << 30),
        small: [MPage {
            prot: None,
            st: St::Empty,
        }; NPAGES],
        huge: [MPage {
            prot: None,
            st: St::Empty,
        }; NHUGE],
    };
    let mut rng = Rng(0x5eed_f00d_1234_5678);
    let prots = [Prot::empty(), Prot::READ, RW, RW];
    let mut counts = [0u32; 4];
    for k in 0..OPS {
        let ctx = |e: String| format!("op {k}: {e}");
        let huge = rng.below(100) < 4;
        let (n_max, n_pages) = if huge { (NHUGE, NHUGE) } else { (4, NPAGES) };
        let i = rng.below(n_pages as u64) as usize;
        let n = (1 + rng.below(n_max as u64) as usize).min(n_pages - i);
        let (unit, start) = (if huge { HUGE } else { PG }, m.addr(huge, i));
        let len = n as u64 * unit;
        let kind = rng.below(100);
        let inside = rng.below(2) == 0;
        let mut touched = (i, 1);
        if kind < 15 {
            counts[0] += 1;
            let prot = prots[rng.below(4) as usize];
            let flags = if huge {
                MapFlags::FIXED | MapFlags::HUGE
            } else {
                MapFlags::FIXED
            };
            let free = (i..i + n).all(|j| m.page(huge, j).prot.is_none());
            let r = p.mmap(Some(start), len, prot, flags);
            let want = if free { Ok(start) } else { Err(Errno::EINVAL) };
            ensure!(
                r == want,
                "{}",
                ctx(format!("mmap {start:#x}+{len:#x}: {r:?}, want {want:?}"))
            );
            if free {
                for j in i..i + n {
                    *m.page(huge, j) = MPage {
                        prot: Some(prot),
                        st: St::Empty,
                    };
                }
            }
            touched = (i, n);
        } else if kind < 27 {
            counts[1] += 1;
            let r = if inside {
                p.run(|| p.munmap(start, len))
                    .map_err(|e| ctx(format!("{e}")))?
            } else {
                p.munmap(start, len)
            };
            ensure!(
                r.is_ok(),
                "{}",
                ctx(format!("munmap {start:#x}+{len:#x}: {r:?}"))
            );
            for j in i..i + n {
                *m.page(huge, j) = MPage {
                    prot: None,
                    st: St::Empty,
                };
            }
            touched = (i, n);
        } else if kind < 42 {
            counts[2] += 1;
            let prot = prots[rng.below(4) as usize];
            let covered = (i..i + n).all(|j| m.page(huge, j).prot.is_some());
            let r = if inside {
                p.run(|| p.mprotect(start, len, prot))
                    .map_err(|e| ctx(format!("{e}")))?
            } else {
                p.mprotect(start, len, prot)
            };
            let want = if covered { Ok(()) } else { Err(Errno::ENOMEM) };
            ensure!(
                r == want,
                "{}",
                ctx(format!(
                    "mprotect {start:#x}+{len:#x} {prot:?}: {r:?}, want {want:?}"
                ))
            );
            if covered {
                for j in i..i + n {
                    let mp = m.page(huge, j);
                    mp.prot = Some(prot);
                    if let St::Frame { writable, .. } = &mut mp.st {
                        *writable &= prot.contains(Prot::WRITE);
                    }
                }
            }
            touched = (i, n);
        } else {
            counts[3] += 1;
            let write = rng.below(2) == 0;
            let val = (u64::from(k) + 1) | ((i as u64) << 32) | ((huge as u64) << 48);
            let mp = *m.page(huge, i);
            let r = if write {
                p.agent().write_u64(start, val).map(|_| 0)
            } else {
                p.agent().read_u64(start)
            };
            let access = if write { Access::Write } else { Access::Read };
            let want_err = match mp.prot {
                None => Some(SegvReason::NoMapping),
                Some(pr) if pr.is_empty() => Some(SegvReason::NoAccess),
                Some(pr) if write && !pr.contains(Prot::WRITE) => Some(SegvReason::ReadOnly),
                _ => None,
            };
            match (want_err, r) {
                (Some(reason), r) => expect_segv(r, start, access, reason).map_err(ctx)?,
                (None, Err(e)) => return Err(ctx(format!("unexpected {e}; model {mp:?}"))),
                (None, Ok(v)) => {
                    let old = match mp.st {
                        St::Frame { val, .. } => val,
                        _ => 0,
                    };
                    ensure!(
                        write || v == old,
                        "{}",
                        ctx(format!("read {v:#x} at {start:#x}, model {mp:?}"))
                    );
                    let writable_vma = mp.prot.is_some_and(|pr| pr.contains(Prot::WRITE));
                    let st = &mut m.page(huge, i).st;
                    *st = match (*st, write) {
                        (St::Frame { pfn, .. }, true) => St::Frame {
                            pfn,
                            val,
                            writable: true,
                        },
                        (St::Frame { .. }, false) => *st,
                        (St::Empty | St::Zero, false) if !huge => St::Zero,
                        // A new frame: learn its pfn from the walk (checked
                        // for plausibility: not the zero page, not free).
                        _ => {
                            let pfn = match p.translate(start).state {
                                PageState::Present { pfn, .. } | PageState::Huge { pfn, .. } => pfn,
                                s => {
                                    return Err(ctx(format!(
                                        "no frame after a fault at {start:#x}: {s:?}"
                                    )))
                                }
                            };
                            ensure!(
                                pfn != zero_pfn() && !frames::is_free(PhysAddr::new(pfn << 12)),
                                "{}",
                                ctx(format!("new frame {pfn:#x} is the zero page or free"))
                            );
                            // Any fault in a 2 MiB VMA maps the page writable if allowed.
                            St::Frame {
                                pfn,
                                val: if write { val } else { 0 },
                                writable: write || writable_vma,
                            }
                        }
                    };
                }
            }
        }
        let g = mmap_read_lock(&**p.mm());
        // The edges of the range (where splits happen); check_all below
        // covers the rest.
        let (first, last) = (touched.0, touched.0 + touched.1 - 1);
        check_page(&p, &m, huge, first, &g).map_err(ctx)?;
        if last != first {
            check_page(&p, &m, huge, last, &g).map_err(ctx)?;
        }
        drop(g);
        if (k + 1) % 1000 == 0 {
            check_all(&p, &m, free_at_start).map_err(ctx)?;
        }
    }
    check_all(&p, &m, free_at_start)?;
    ensure!(
        counts.iter().all(|&c| c > 500),
        "operation mix too thin: {counts:?}"
    );
    drop(p);
    ensure!(
        frames::stats().free == free_at_start,
        "teardown after the random run: {} frames missing",
        free_at_start - frames::stats().free
    );
    log::debug!(
        "random ops: mmap/munmap/mprotect/touch = {counts:?}, free frames {free_at_start} before, {} after",
        frames::stats().free
    );
    Ok(())
}

/// `jmp rsi` (FF E6) as the u64 that holds it: user code the agent's jump
/// operation runs returns with it.
const JMP_RSI: u64 = 0xe6ff;

/// User mode cannot touch kernel memory: no kernel page carries U/S, so
/// the CPU refuses every agent access to one with a protection fault (P
/// and U in the error code: the page is there, just not for user mode),
/// and nothing lands. The same agent reads and writes its own process's
/// page, and may read (not write) its own code.
fn user_kernel_pages() -> Result<(), String> {
    static KERNEL_WORD: core::sync::atomic::AtomicU64 =
        core::sync::atomic::AtomicU64::new(0x6b65_726e);
    let p = new_process()?;
    let ag = p.agent();
    let a = map(&p, None, PG, RW, MapFlags::empty())?;
    write(&p, a, 0x5157).map_err(|e| format!("own page: {e}"))?;
    ensure!(read(&p, a) == Ok(0x5157), "own page reads back wrong");
    let heap = alloc::boxed::Box::new(0x6865_6170u64);
    let stack_word = 0x7374_6b00u64;
    let image = KERNEL_WORD.as_ptr() as u64;
    let pml4 = direct_map::phys_to_virt(crate::arch::paging::kernel_pml4_phys()).as_u64();
    let heap_va = &*heap as *const u64 as u64;
    let stack_va = core::ptr::addr_of!(stack_word) as u64;
    let agent = crate::user::AGENT_BASE;
    let cases = [
        ("the kernel image (identity map)", image, false),
        ("the kernel image (identity map)", image, true),
        ("the kernel PML4 (direct map)", pml4, false),
        ("the kernel heap", heap_va, false),
        ("the kernel stack (vmap)", stack_va, true),
        ("the agent's own code", agent, true),
    ];
    for (what, addr, w) in cases {
        let r = if w {
            ag.write_u64(addr, 0xbad).map(|_| 0)
        } else {
            ag.read_u64(addr)
        };
        let want_err = PF_P | PF_U | if w { PF_W } else { 0 };
        // In the kernel half a hypervisor may answer "not present" instead
        // (this host's kvm_pvm does: its shadow tables keep the guest
        // kernel half out of user mode altogether); below it (the identity
        // map, the agent) the walk is the guest's own, so P must be set.
        let mask = if addr >= crate::mm::DIRECT_MAP_BASE {
            PF_U | PF_W
        } else {
            PF_P | PF_U | PF_W
        };
        match r {
            Err(s)
                if s.addr == addr
                    && s.reason == SegvReason::NotUser
                    && s.error & mask == want_err & mask => {}
            other => {
                return Err(format!(
                    "user {} of {what} at {addr:#x}: {other:x?}, expected a protection fault (error code {want_err:#x})",
                    if w { "write" } else { "read" }
                ))
            }
        }
    }
    ensure!(
        KERNEL_WORD.load(core::sync::atomic::Ordering::SeqCst) == 0x6b65_726e
            && *heap == 0x6865_6170
            // SAFETY: a local the agent was refused write access to.
            && unsafe { core::ptr::read_volatile(&stack_word) } == 0x7374_6b00,
        "a refused user write landed"
    );
    let first = ag
        .read_u64(agent)
        .map_err(|e| format!("agent reading its own code: {e}"))?;
    // SAFETY: the agent's first page is kernel text, mapped and 8 bytes long at least.
    let want = unsafe { (crate::user::agent::code_start() as *const u64).read_volatile() };
    ensure!(
        first == want,
        "agent code reads {first:#x} in user mode, {want:#x} in the kernel"
    );
    Ok(())
}

/// SMAP: kernel code touching a present, user-accessible page without
/// `stac` is refused by the CPU (a protection fault from supervisor mode:
/// P set, U clear), for reads and writes; the `user` accessors, which open
/// the window, get through.
fn smap() -> Result<(), String> {
    if !crate::user::smap_enabled() {
        return Err(super::skip(
            "this CPU has no SMAP (CPUID.(EAX=7,ECX=0):EBX bit 20 clear), so nothing stops the kernel touching user memory",
        ));
    }
    let p = new_process()?;
    let a = map(&p, None, PG, RW, MapFlags::empty())?;
    // Present, user, writable: only SMAP can refuse the kernel now.
    write(&p, a, 0x5a5a).map_err(|e| format!("agent write: {e}"))?;
    // SAFETY: a user address inside `run`: no Rust object lives there, and
    // the fault (the point of the test) ends the closure.
    let r = p.run(|| unsafe { (a as *const u64).read_volatile() });
    let refused = |r: &Result<u64, Segfault>, w: bool| {
        matches!(r, Err(s) if s.addr == a
            && s.reason == SegvReason::Smap
            && s.error & (PF_P | PF_U | PF_W) == PF_P | if w { PF_W } else { 0 })
    };
    ensure!(
        refused(&r, false),
        "kernel read of user memory without stac: {r:x?}"
    );
    // SAFETY: as above.
    let r = p
        .run(|| unsafe { (a as *mut u64).write_volatile(0xbad) })
        .map(|_| 0);
    ensure!(
        refused(&r, true),
        "kernel write of user memory without stac: {r:x?}"
    );
    let v = p.run(|| user::read_u64(a));
    ensure!(v == Ok(0x5a5a), "kernel read with stac: {v:x?}");
    Ok(())
}

/// SMEP: the kernel cannot run code on a user page (a fetch fault from
/// supervisor mode on a present page: P and I set, U clear) that user mode
/// runs fine.
fn smep() -> Result<(), String> {
    if !crate::user::smep_enabled() {
        return Err(super::skip(
            "this CPU has no SMEP (CPUID.(EAX=7,ECX=0):EBX bit 7 clear), so nothing stops the kernel running user code",
        ));
    }
    let p = new_process()?;
    let code = map(&p, None, PG, RW, MapFlags::empty())?;
    // `jmp rsi` for user mode at +0, `ret` for the kernel at +16.
    write(&p, code, JMP_RSI).map_err(|e| format!("write jmp: {e}"))?;
    write(&p, code + 16, 0xc3).map_err(|e| format!("write ret: {e}"))?;
    p.mprotect(code, PG, Prot::READ | Prot::EXEC)
        .map_err(debug_str)?;
    p.agent()
        .jump(code)
        .map_err(|e| format!("user mode running its own code: {e}"))?;
    let target = code + 16;
    let r = p.run(|| {
        // SAFETY: the target holds `ret` (or faults, which `run` turns into
        // an error); no registers but the clobbered ones change.
        unsafe { core::arch::asm!("call {0}", in(reg) target, clobber_abi("C")) };
    });
    ensure!(
        matches!(r, Err(s) if s.addr == target
            && s.reason == SegvReason::KernelExec
            && s.error & (PF_P | PF_U | PF_I) == PF_P | PF_I),
        "kernel call into a user page: {r:x?}"
    );
    Ok(())
}

/// The agent's operations the other tests use less: a round trip, an
/// atomic add, a pattern that changes per word and per page (checked
/// against its formula word by word), the pointer-chase list (walked back
/// node by node), and a spin that sees its value and one that gives up.
fn agent_ops() -> Result<(), String> {
    let p = new_process()?;
    let ag = p.agent();
    let e = |what: &'static str| move |s: Segfault| format!("{what}: {s}");
    let a = map(&p, None, 4 * PG, RW, MapFlags::empty())?;
    let t0 = crate::arch::time::now_ns();
    for _ in 0..100 {
        ag.nop().map_err(e("nop"))?;
    }
    let t1 = crate::arch::time::now_ns();
    for _ in 0..100 {
        p.run(|| ())
            .map_err(|s| format!("kernel round trip: {s}"))?;
    }
    log::debug!(
        "agent round trip {} us, kernel-mode process::run {} us",
        (t1 - t0) / 100_000,
        (crate::arch::time::now_ns() - t1) / 100_000
    );
    ag.write_u64(a, 40).map_err(e("write"))?;
    let old = ag.atomic_add_u64(a, 2).map_err(e("atomic add"))?;
    ensure!(
        old == 40 && read(&p, a) == Ok(42),
        "atomic add: old {old}, now {:?}",
        read(&p, a)
    );
    let old = ag.atomic_add_repeat(a, 3, 1000).map_err(e("atomic adds"))?;
    ensure!(
        old == 42 + 3 * 999 && read(&p, a) == Ok(42 + 3000),
        "1000 atomic adds: last old {old}, now {:?}",
        read(&p, a)
    );
    ag.write_u64(a, 42).map_err(e("write"))?;
    ensure!(
        ag.spin_until(a, 42, 10) == Ok(None),
        "spin on a value that is there"
    );
    ensure!(
        ag.spin_until(a, 43, 1000) == Ok(Some(42)),
        "spin on a value that never comes"
    );
    let pat = Pattern {
        base: 0x1000,
        per_word: 3,
        per_page: 0x10_0000,
    };
    ag.fill(a + PG, 2 * PG, pat).map_err(e("fill"))?;
    ensure!(
        ag.check(a + PG, 2 * PG, pat) == Ok(None),
        "check of the pattern just filled"
    );
    for off in [0, 8, PG - 8, PG, PG + 8, 2 * PG - 8] {
        let got = read(&p, a + PG + off).map_err(e("read"))?;
        ensure!(
            got == pat.at(off),
            "+{off:#x}: {got:#x}, the formula says {:#x}",
            pat.at(off)
        );
    }
    let list = ChaseList {
        heap: a + 3 * PG,
        slots: PG / 16,
        step: 7,
        nodes: 100,
        value_offset: 3,
    };
    ag.build_list(list).map_err(e("build list"))?;
    let node = |i: u64| list.heap + ((i * list.step) % list.slots) * 16;
    let mut at = node(0);
    for i in 0..list.nodes {
        ensure!(
            at == node(i),
            "node {i} at {at:#x}, expected {:#x}",
            node(i)
        );
        let value = read(&p, at + 8).map_err(e("read node"))?;
        ensure!(value == i * i + 3, "node {i} holds {value}");
        at = read(&p, at).map_err(e("read next"))?;
    }
    ensure!(at == 0, "the last node points at {at:#x}");
    Ok(())
}
