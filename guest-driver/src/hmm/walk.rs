//! `range_snapshot` and `range_fault`: the walk over the CPU page tables
//! that fills a range's pfns, faulting pages in on request.

use core::ptr;
use core::sync::atomic::Ordering;

use super::notifier::{Hmm, RangeLink};
use super::range::{encode, HmmRange};
use super::{HmmPfnFlag, HmmPfnValue};
use crate::errno::Errno;
use crate::mm::{
    DeviceOwner, FaultError, FaultFlags, Mm, MmapReadGuard, PageState, VmFlags, PAGE_SHIFT,
    PMD_SHIFT, PMD_SIZE,
};

/// `hmm_range_snapshot`: fill `pfns` from the CPU page tables without
/// faulting. Caller holds the mmap lock for read (the guard is the proof).
///
/// Returns the number of entries filled (all of them) or: EINVAL (range not
/// registered, guard of another address space, `page_shift` 21 outside a
/// huge VMA), EAGAIN (range invalid; `pfns` untouched), EFAULT (hole, special
/// VMA or special PTE), EPERM (VMA without read). On error, entries before the
/// failing one keep their values, the failing one is `values[None]` (or
/// `values[Special]`) and the rest are `values[None]`.
pub fn range_snapshot<M: Mm>(
    range: &mut HmmRange<M>,
    mmap: &MmapReadGuard<'_, M>,
) -> Result<usize, Errno> {
    range_walk(range, mmap, None)
}

/// `hmm_range_fault`: like [`range_snapshot`], but pages whose request
/// (`(pfns[i] & pfn_flags_mask) | default_flags`) asks for `Valid` (and
/// `Write`) more than the CPU page table gives are faulted in through
/// `handle_mm_fault`. Additional errors: EPERM for a write request on a VMA
/// without write, EFAULT (failing entry `values[Error]`) when the fault
/// fails, ENOMEM, EBUSY when `!block` and the fault would block, EAGAIN when
/// the range was invalidated while faulting.
pub fn range_fault<M: Mm>(
    range: &mut HmmRange<M>,
    mmap: &MmapReadGuard<'_, M>,
    block: bool,
) -> Result<usize, Errno> {
    range_walk(range, mmap, Some(block))
}

/// Pages asked for in one `Mm::walk_ptes` call (a window rarely spans
/// more).
const PTE_RUN: usize = 64;

/// What the CPU says about the entry at `addr` (entries of `1 << shift`
/// bytes): (valid, writable, its first frame), or the entry's error. A
/// device-private page of `owner` is valid (its frame is the device's);
/// anyone else's, and a page under migration, is not (a fault brings it
/// back or waits).
fn decode_state(
    state: PageState,
    addr: u64,
    shift: u32,
    owner: Option<DeviceOwner>,
) -> Result<(bool, bool, u64), (HmmPfnValue, Errno)> {
    // The frame of `addr` in a 2 MiB page starting at `pfn`.
    let in_huge = |pfn: u64| pfn + ((addr & (PMD_SIZE - 1)) >> PAGE_SHIFT);
    Ok(match state {
        PageState::None | PageState::Migration => (false, false, 0),
        PageState::DevicePrivate {
            owner: o,
            vram_pfn,
            writable,
            huge,
        } if Some(o) == owner && (huge || shift == PAGE_SHIFT) => (
            true,
            writable,
            if huge { in_huge(vram_pfn) } else { vram_pfn },
        ),
        PageState::DevicePrivate { huge, .. } if huge || shift == PAGE_SHIFT => (false, false, 0),
        PageState::Present { pfn, writable } if shift == PAGE_SHIFT => (true, writable, pfn),
        PageState::Zero { pfn } if shift == PAGE_SHIFT => (true, false, pfn),
        PageState::Huge { pfn, writable } => (true, writable, in_huge(pfn)),
        // The device holding it sees the frame; anyone else faults it back.
        PageState::Exclusive {
            owner: o,
            pfn,
            writable,
        } if Some(o) == owner && shift == PAGE_SHIFT => (true, writable, pfn),
        PageState::Exclusive { .. } if shift == PAGE_SHIFT => (false, false, 0),
        PageState::Special => return Err((HmmPfnValue::Special, Errno::EFAULT)),
        // A 4 KiB PTE where a 2 MiB entry was asked for: the `Mm` broke the
        // HUGE-VMA contract.
        PageState::Present { .. }
        | PageState::Zero { .. }
        | PageState::DevicePrivate { .. }
        | PageState::Exclusive { .. } => return Err((HmmPfnValue::Error, Errno::EFAULT)),
    })
}

/// An error at entry `at`: that entry gets `value`, the rest `values[None]`.
struct WalkError {
    at: usize,
    value: HmmPfnValue,
    err: Errno,
}

fn range_walk<M: Mm>(
    range: &mut HmmRange<M>,
    mmap: &MmapReadGuard<'_, M>,
    fault: Option<bool>,
) -> Result<usize, Errno> {
    // Taken out for the walk (and put back on every way out) so the walk
    // can borrow the range's vectors beside it.
    let reg = range.reg.take().ok_or(Errno::EINVAL)?;
    let r = walk_registered(range, &reg.hmm, &reg.link, mmap, fault);
    range.reg = Some(reg);
    r
}

fn walk_registered<M: Mm>(
    range: &mut HmmRange<M>,
    hmm: &Hmm<M>,
    link: &RangeLink,
    mmap: &MmapReadGuard<'_, M>,
    fault: Option<bool>,
) -> Result<usize, Errno> {
    let mm: &M = &hmm.mm;
    if !ptr::eq(mmap.mm(), mm) {
        return Err(Errno::EINVAL);
    }
    if range.pfns.len() != range.npages() {
        return Err(Errno::EINVAL);
    }
    // read_begin: note the stamp before looking at any PTE. No hmm->lock:
    // an invalidation clears `valid` before it stores its stamp (Release),
    // so reading the stamp first and `valid` second (Acquire) either sees
    // the new stamp with `valid` cleared (EAGAIN, or set again by an end
    // after the CPU change was made) or the old stamp, which the later
    // check then finds changed.
    let seq = link.invalidate_seq.load(Ordering::Acquire);
    if !link.valid.load(Ordering::Acquire) {
        return Err(Errno::EAGAIN);
    }
    range.notifier_seq = seq;
    if range.page_shift == PAGE_SHIFT && range.pfns.len() == 1 {
        if let Some(r) = walk_one(range, mm, mmap, link, fault) {
            return r;
        }
    }
    match walk_entries(range, mm, mmap, link, fault) {
        Ok(()) => Ok(range.pfns.len()),
        Err(e) => {
            let none = range.values[HmmPfnValue::None as usize];
            range.pfns[e.at] = range.values[e.value as usize];
            range.pfns[e.at + 1..].fill(none);
            Err(e.err)
        }
    }
}

/// The commonest walk, one 4 KiB entry (a GPU fault without fault-around),
/// in as few instructions as the kernel can spend: the VMA looked up once,
/// the PTE read once, a missing page faulted in with one
/// `handle_mm_fault_range` whose told state settles the entry. `None` when
/// the entry needs more than that (a VMA or PTE state the general walk
/// judges, a read-only page asked for write, a fault that told nothing):
/// the general walk then does it all, from the PTE read on; nothing here
/// has changed what it will see but a fault that succeeded.
fn walk_one<M: Mm>(
    range: &mut HmmRange<M>,
    mm: &M,
    mmap: &MmapReadGuard<'_, M>,
    link: &RangeLink,
    fault: Option<bool>,
) -> Option<Result<usize, Errno>> {
    let addr = range.start;
    let vma = mm.vma_lookup(mmap, addr)?;
    if !vma.flags.contains(VmFlags::READ) || vma.flags.intersects(VmFlags::SPECIAL_KINDS) {
        return None;
    }
    let req = (range.pfns[0] & range.pfn_flags_mask) | range.default_flags;
    let want = fault.is_some() && req & range.flags[HmmPfnFlag::Valid as usize] != 0;
    let want_write = want && req & range.flags[HmmPfnFlag::Write as usize] != 0;
    if range.run.is_empty() {
        range.run.push(PageState::None);
    }
    let out = &mut range.run[..1];
    let state = match mm.walk_ptes(mmap, addr, out) {
        0 => match mm.walk(mmap, addr) {
            w if w.shift == PAGE_SHIFT || w.state == PageState::None => w.state,
            _ => return None,
        },
        _ => out[0],
    };
    if let (PageState::None, Some(block)) = (state, fault.filter(|_| want)) {
        if want_write && !vma.flags.contains(VmFlags::WRITE) {
            return None;
        }
        let ff = fault_flags(want_write, block);
        let failed = match mm.handle_mm_fault_range(mmap, addr, addr + (1 << PAGE_SHIFT), ff, out) {
            // Faults are slow and can race with invalidations, as in the
            // general walk.
            (_, _, Ok(())) if !link.valid.load(Ordering::Acquire) => {
                (HmmPfnValue::None, Errno::EAGAIN)
            }
            (_, 0, Ok(())) => return None,
            (_, _, Ok(())) => {
                let told = out[0];
                return settle(range, told, want, want_write);
            }
            (_, _, Err(e)) => fault_error(e),
        };
        range.pfns[0] = range.values[failed.0 as usize];
        return Some(Err(failed.1));
    }
    settle(range, state, want, want_write)
}

/// The flags of a device fault (write or read, blocking or not).
fn fault_flags(write: bool, block: bool) -> FaultFlags {
    let mut ff = FaultFlags::REMOTE;
    if write {
        ff |= FaultFlags::WRITE;
    }
    if !block {
        ff |= FaultFlags::ALLOW_RETRY;
    }
    ff
}

/// A failed fault's entry value and errno.
fn fault_error(e: FaultError) -> (HmmPfnValue, Errno) {
    match e {
        FaultError::Retry => (HmmPfnValue::None, Errno::EBUSY),
        FaultError::Oom => (HmmPfnValue::Error, Errno::ENOMEM),
        FaultError::Sigsegv | FaultError::Sigbus => (HmmPfnValue::Error, Errno::EFAULT),
    }
}

/// `walk_one`'s entry from the page's state, if that settles it.
fn settle<M: Mm>(
    range: &mut HmmRange<M>,
    state: PageState,
    want: bool,
    want_write: bool,
) -> Option<Result<usize, Errno>> {
    range.pfns[0] = match state {
        PageState::Present { pfn, writable } if writable || !want_write => {
            encode(&range.flags, range.pfn_shift, pfn, writable)
        }
        PageState::None if !want => range.values[HmmPfnValue::None as usize],
        _ => return None,
    };
    Some(Ok(1))
}

fn walk_entries<M: Mm>(
    range: &mut HmmRange<M>,
    mm: &M,
    mmap: &MmapReadGuard<'_, M>,
    link: &RangeLink,
    fault: Option<bool>,
) -> Result<(), WalkError> {
    let (start, shift, pfn_shift) = (range.start, range.page_shift, range.pfn_shift);
    let (flags, values) = (range.flags, range.values);
    let (default_flags, mask) = (range.default_flags, range.pfn_flags_mask);
    let req_valid = flags[HmmPfnFlag::Valid as usize];
    let req_write = flags[HmmPfnFlag::Write as usize];
    let (owner, device_flag) = (
        range.dev_private_owner,
        flags[HmmPfnFlag::DevicePrivate as usize],
    );
    let none = values[HmmPfnValue::None as usize];
    let npages = range.pfns.len();
    let pfns = &mut range.pfns[..];
    let fail = |at: usize, value: HmmPfnValue, err: Errno| WalkError { at, value, err };

    // PTE-level answers, filled before they are read. Kept in the range
    // and grown once: where the kernel is emulated, setting up a buffer per
    // walk costs as much as a short walk.
    let run = &mut range.run;
    if shift == PAGE_SHIFT && run.len() < PTE_RUN.min(npages) {
        run.resize(PTE_RUN.min(npages), PageState::None);
    }
    let mut i = 0;
    while i < npages {
        let addr = start + ((i as u64) << shift);
        let vma = mm
            .vma_lookup(mmap, addr)
            .ok_or(fail(i, HmmPfnValue::None, Errno::EFAULT))?;
        if vma.flags.intersects(VmFlags::SPECIAL_KINDS) {
            return Err(fail(i, HmmPfnValue::Special, Errno::EFAULT));
        }
        if shift == PMD_SHIFT && !vma.flags.contains(VmFlags::HUGE) {
            return Err(fail(i, HmmPfnValue::None, Errno::EINVAL));
        }
        if !vma.flags.contains(VmFlags::READ) {
            return Err(fail(i, HmmPfnValue::None, Errno::EPERM));
        }
        // Entries entirely inside this VMA.
        let vma_end = npages.min(((vma.end - start) >> shift) as usize);
        if vma_end <= i {
            // A 2 MiB entry straddling the VMA end: not a huge VMA after all.
            return Err(fail(i, HmmPfnValue::None, Errno::EINVAL));
        }
        // Faults taken for the entry at index `faulted_at`, to stop a handler
        // that reports success without mapping anything.
        let mut faulted_at = usize::MAX;
        let mut tries = 0;
        // An error `handle_mm_fault_range` hit past the start of its run:
        // (entry, error), reported when the walk reaches that entry.
        let mut pending: Option<(usize, FaultError)> = None;
        // Entries from `i` on whose states the last `handle_mm_fault_range`
        // left in `run`: taken as walked.
        let mut known = 0;
        // A fault's first walk asks for one page: in a window the CPU never
        // touched that is all it needs before faulting the whole run (which
        // tells the states it installed), and a page already there sends
        // the walk on for the rest.
        let mut probe = fault.is_some();
        'vma: while i < vma_end {
            let addr = start + ((i as u64) << shift);
            // How many entries this answer covers: for 4 KiB entries, the
            // run of pages from `addr` in its 2 MiB block that one
            // `walk_ptes` call reads from the last-level table; else (no
            // such table, or 2 MiB entries) one `walk`, whose block answer
            // covers all of the block's entries.
            let ptes = if shift == PAGE_SHIFT {
                let in_block = ((PMD_SIZE - (addr & (PMD_SIZE - 1))) >> PAGE_SHIFT) as usize;
                let want = match core::mem::take(&mut probe) {
                    true => 1,
                    false => in_block.min(vma_end - i).min(run.len()),
                };
                match core::mem::take(&mut known) {
                    0 => mm.walk_ptes(mmap, addr, &mut run[..want]).min(want),
                    k => k.min(want),
                }
            } else {
                0
            };
            let (n, w) = if ptes > 0 {
                (ptes, None)
            } else {
                let w = mm.walk(mmap, addr);
                let n = if w.shift > shift {
                    let block_end = (addr | ((1u64 << w.shift) - 1)) + 1;
                    (((block_end - addr) >> shift) as usize).min(vma_end - i)
                } else {
                    1
                };
                (n, Some(w.state))
            };
            // `k` also numbers the entry (`j`), which a fault re-walks from.
            #[allow(clippy::needless_range_loop)]
            for k in 0..n {
                let state = w.unwrap_or_else(|| run[k]);
                let j = i + k;
                // The common answer first, in as few instructions as the
                // kernel can spend per page: a 4 KiB page present with the
                // access asked for (anything else, including a request
                // this does not settle, takes the general path below).
                if let (PageState::Present { pfn, writable }, PAGE_SHIFT) = (state, shift) {
                    let asks_write =
                        fault.is_some() && ((pfns[j] & mask) | default_flags) & req_write != 0;
                    if writable || !asks_write {
                        pfns[j] = encode(&flags, pfn_shift, pfn, writable);
                        continue;
                    }
                }
                let (cpu_valid, cpu_write, pfn) =
                    decode_state(state, start + ((j as u64) << shift), shift, owner)
                        .map_err(|(value, err)| fail(j, value, err))?;
                if let Some(block) = fault {
                    let req = (pfns[j] & mask) | default_flags;
                    let want = req & req_valid != 0;
                    let want_write = want && req & req_write != 0;
                    if want && state == PageState::Migration {
                        // Under migration: no wait here (a device fault
                        // may be serviced beneath the migration it would
                        // wait for); the driver retries, as Linux's
                        // EBUSY after migration_entry_wait asks.
                        return Err(fail(j, HmmPfnValue::None, Errno::EAGAIN));
                    }
                    if want && (!cpu_valid || (want_write && !cpu_write)) {
                        if want_write && !vma.flags.contains(VmFlags::WRITE) {
                            return Err(fail(j, HmmPfnValue::None, Errno::EPERM));
                        }
                        if faulted_at == j {
                            tries += 1;
                        } else {
                            faulted_at = j;
                            tries = 1;
                        }
                        let fault_addr = start + ((j as u64) << shift);
                        if tries > 2 {
                            log::error!(
                                "hmm: handle_mm_fault succeeded twice but {fault_addr:#x} is still not mapped"
                            );
                            return Err(fail(j, HmmPfnValue::Error, Errno::EFAULT));
                        }
                        let ff = fault_flags(want_write, block);
                        // 4 KiB entries: fault the whole run of entries from
                        // here that ask for the same access, in one call (the
                        // `Mm` may do it in one page-table pass; entries
                        // already satisfied are left alone).
                        let result = if shift == PAGE_SHIFT {
                            let wants_same = |e: u64| {
                                let r = (e & mask) | default_flags;
                                r & req_valid != 0 && (r & req_write != 0) == want_write
                            };
                            // Without per-entry bits (`mask` 0) every entry
                            // asks the same.
                            let run_end = match mask {
                                0 => vma_end,
                                _ => (j + 1..vma_end)
                                    .find(|&x| !wants_same(pfns[x]))
                                    .unwrap_or(vma_end),
                            };
                            let end = start + ((run_end as u64) << shift);
                            match pending.take() {
                                // The error a run hit at this entry, after
                                // the walk filled in the entries before it.
                                Some((at, e)) if at == j => Err(e),
                                _ => match mm.handle_mm_fault_range(
                                    mmap,
                                    fault_addr,
                                    end,
                                    ff,
                                    &mut run[..],
                                ) {
                                    // Pages done before the error: take
                                    // them as walked, then report the error
                                    // here.
                                    (done, told, Err(e)) if done > 0 => {
                                        pending = Some((j + done as usize, e));
                                        known = told.min(done as usize);
                                        Ok(())
                                    }
                                    (done, told, r) => {
                                        known = told.min(done as usize);
                                        r
                                    }
                                },
                            }
                        } else {
                            mm.handle_mm_fault(mmap, fault_addr, ff)
                        };
                        if let Err(e) = result {
                            let (value, err) = fault_error(e);
                            return Err(fail(j, value, err));
                        }
                        // Faults are slow and can race with invalidations; stop
                        // early rather than fill pfns the driver will discard.
                        if !link.valid.load(Ordering::Acquire) {
                            return Err(fail(j, HmmPfnValue::None, Errno::EAGAIN));
                        }
                        // Re-walk from the faulted entry (what the fault
                        // told is not walked again).
                        i = j;
                        continue 'vma;
                    }
                }
                pfns[j] = if cpu_valid {
                    let e = encode(&flags, pfn_shift, pfn, cpu_write);
                    if matches!(state, PageState::DevicePrivate { .. }) {
                        e | device_flag
                    } else {
                        e
                    }
                } else {
                    none
                };
            }
            i += n;
        }
    }
    Ok(())
}
