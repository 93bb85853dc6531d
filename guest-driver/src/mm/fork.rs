//! What both address spaces' `fork` do before the copy (docs/hmm.md "Fork
//! and copy-on-write"): the entries a copy cannot take are resolved, and
//! writable shared VMAs are populated, under the mmap lock for reading. The
//! copy itself, under the write lock, is each `Mm`'s own (its page tables).

use super::exclusive::exclusive_entry_restore;
use super::migrate::{device_private_fault, migration_entry_wait};
use super::{FaultError, FaultFlags, Mm, MmapReadGuard, PageState, VmFlags, PAGE_SIZE, PMD_SIZE};
use crate::errno::Errno;

/// Before a fork's copy, with `mmap` held for reading: every writable
/// shared VMA populated writable (it has no backing object: a page left
/// out would diverge on its first write), and in every other VMA each
/// device-private page brought back, each device-exclusive entry restored
/// and each migration waited for. `first_unforkable(start, end)` is the
/// first such entry of `[start, end)`, with its state. Errors: ENOMEM,
/// EFAULT (the address space went away), EAGAIN (an entry kept coming
/// back: a bounded number of tries per page).
pub fn fork_prepare<M: Mm>(
    mmap: &MmapReadGuard<'_, M>,
    first_unforkable: impl Fn(u64, u64) -> Option<(u64, PageState)>,
) -> Result<(), Errno> {
    let mm = mmap.mm();
    let mut next = 0;
    while let Some(v) = mm.find_vma(mmap, next) {
        next = v.end;
        if v.flags.contains(VmFlags::SHARED | VmFlags::WRITE) {
            let step = if v.flags.contains(VmFlags::HUGE) {
                PMD_SIZE
            } else {
                PAGE_SIZE
            };
            for a in (v.start..v.end).step_by(step as usize) {
                let writable = matches!(
                    mm.walk(mmap, a).state,
                    PageState::Present { writable: true, .. }
                        | PageState::Huge { writable: true, .. }
                );
                if !writable {
                    mm.handle_mm_fault(mmap, a, FaultFlags::WRITE)
                        .map_err(errno)?;
                }
            }
            continue;
        }
        // Each resolution makes progress unless a migration races it;
        // bounded all the same.
        let mut budget = (v.end - v.start) / PAGE_SIZE + 16;
        let mut from = v.start;
        while let Some((at, state)) = first_unforkable(from, v.end) {
            if budget == 0 {
                return Err(Errno::EAGAIN);
            }
            budget -= 1;
            match state {
                PageState::Exclusive { .. } => exclusive_entry_restore(mmap, at),
                PageState::Migration => {
                    migration_entry_wait(mmap, at, FaultFlags::empty()).map_err(errno)?
                }
                _ => device_private_fault(mmap, at, FaultFlags::empty()).map_err(errno)?,
            }
            from = at;
        }
    }
    Ok(())
}

fn errno(e: FaultError) -> Errno {
    match e {
        FaultError::Oom => Errno::ENOMEM,
        FaultError::Retry => Errno::EAGAIN,
        FaultError::Sigsegv | FaultError::Sigbus => Errno::EFAULT,
    }
}
