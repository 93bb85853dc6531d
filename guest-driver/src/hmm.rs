//! HMM: a device driver's mirror of a process address space (Linux HMM as of
//! mid-2019, with two rules of its own: `range_register` takes the mirror,
//! whose `Hmm` the range shares, and a registered range holds an mm *users*
//! reference for its lifetime, so release cannot run while a range exists).
//!
//! Driver pattern (docs/hmm.md has the full contract):
//!
//! ```text
//! mirror = mirror_register(mm, &mmap_write_lock(mm), ops)
//! range_register(&mut range, &mirror, start, end, PAGE_SHIFT)
//! loop {
//!     { let mmap = mmap_read_lock(mm); range_fault(&mut range, &mmap, true)? }
//!     lock driver update lock
//!     if !range_check_seq(&range) { unlock; continue }   // invalidated: retry
//!     write device PTEs from range.pfns; unlock; break
//! }
//! range_unregister(&mut range)
//! ```
//!
//! Improvement over 2019: `range_valid()` (the 2019 `range->valid` flag) turns
//! true again as soon as all invalidations have ended, so an invalidation that
//! starts *and* ends between `range_fault` and the driver's check is invisible
//! to it. Every invalidation therefore also stamps the ranges it overlaps with
//! a fresh value of a per-address-space sequence; `range_fault` /
//! `range_snapshot` remember the stamp they started from and
//! [`range_check_seq`] compares it under the driver's update lock
//! (the `mmu_interval_read_begin` / `mmu_interval_read_retry` idea of 5.5).

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::ptr;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use lock_api::{Mutex, RwLock};

use crate::errno::Errno;
use crate::mm::{
    mmget_not_zero, mmput, mmu_notifier_register, FaultError, FaultFlags, Mm, MmapReadGuard,
    MmapWriteGuard, MmuNotifier, MmuNotifierRange, MmuNotifyEvent, PageState, VmFlags, PAGE_SHIFT,
    PMD_SHIFT,
};

/// Indices into [`HmmRange::flags`] (`enum hmm_pfn_flag_e`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum HmmPfnFlag {
    /// The entry is a valid translation (request: the page must be present).
    Valid = 0,
    /// The translation allows writes (request: the page must be writable).
    Write = 1,
    /// Device-private memory. Kept for the table layout; this implementation
    /// has no device-private pages and never sets it.
    DevicePrivate = 2,
}

/// Number of entries in [`HmmRange::flags`].
pub const HMM_PFN_FLAG_MAX: usize = 3;

/// Indices into [`HmmRange::values`] (`enum hmm_pfn_value_e`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum HmmPfnValue {
    /// Faulting this entry failed.
    Error = 0,
    /// No translation (or not filled because of an earlier error).
    None = 1,
    /// A special mapping the device must not use.
    Special = 2,
}

/// Number of entries in [`HmmRange::values`].
pub const HMM_PFN_VALUE_MAX: usize = 3;

/// What a mirror is told when the CPU page tables change (`struct hmm_update`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HmmUpdate {
    /// First byte of the invalidated range.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// Why (5.3 only had `HMM_UPDATE_INVALIDATE`). The notifier event is
    /// passed through because on `ProtectionPage` a driver may downgrade its
    /// translations to read-only instead of clearing them; every other event
    /// needs them cleared.
    pub event: MmuNotifyEvent,
    /// Whether the callback may block (wait for the update lock or the device's
    /// TLB-invalidate acknowledgement).
    pub blockable: bool,
}

/// The driver's side of a mirror (`struct hmm_mirror_ops`).
///
/// Re-entrancy (as in Linux): `sync_cpu_device_pagetables` runs with
/// `mirrors_sem` held for read, so it must not register or unregister a
/// mirror of the same address space, nor drop a range that may hold the last
/// mm users reference (release would need `mirrors_sem` for write).
pub trait HmmMirrorOps<M: Mm>: Send + Sync {
    /// Remove every device translation in `[update.start, update.end)` (or,
    /// on `ProtectionPage`, make it read-only) and wait until the device no
    /// longer uses the old ones. Take the driver's update lock: that is what orders this against
    /// `range_check_seq`. If `!update.blockable` and this would have to block,
    /// return `Err(Errno::EAGAIN)` without blocking. Errors on a blockable
    /// update are logged and ignored (as in Linux).
    fn sync_cpu_device_pagetables(&self, update: &HmmUpdate) -> Result<(), Errno>;

    /// The address space is going away (last `mmput`): stop using it. After
    /// this no more `sync_cpu_device_pagetables` calls arrive for this mirror.
    fn release(&self) {}
}

/// One registered range, as the address space's invalidations see it.
struct RangeLink {
    start: u64,
    end: u64,
    /// The 2019 `range->valid` flag: false from an overlapping
    /// `invalidate_range_start` until *all* invalidations of the address
    /// space have ended.
    valid: AtomicBool,
    /// Value of [`HmmState::invalidate_seq`] taken by the last invalidation
    /// that overlapped this range (written under `Hmm::lock`).
    invalidate_seq: AtomicU64,
}

impl RangeLink {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        start < self.end && self.start < end
    }
}

struct HmmState {
    /// `hmm->ranges`.
    ranges: Vec<Arc<RangeLink>>,
    /// Invalidations in progress (`hmm->notifiers`).
    notifiers: usize,
    /// The per-address-space invalidation sequence: bumped by every
    /// `invalidate_range_start`.
    invalidate_seq: u64,
}

struct MirrorEntry<M: Mm> {
    id: u64,
    ops: Arc<dyn HmmMirrorOps<M>>,
}

/// The per-address-space HMM state (`struct hmm`). Refcounted by `Arc`: each
/// mirror and each registered range holds a reference; the address space only
/// points to it weakly (`mm->hmm`, and its notifier chain entry).
pub struct Hmm<M: Mm> {
    /// Structure reference (`mmgrab`): the `M` outlives its `Hmm`.
    mm: Arc<M>,
    /// `hmm->lock`: ranges, notifier count, sequence. Never held while
    /// calling out.
    lock: Mutex<M::RawMutex, HmmState>,
    /// `hmm->mirrors_sem`: held for read across the sync callbacks so that
    /// `mirror_unregister` (write) waits for callbacks in flight.
    mirrors: RwLock<M::RawRwLock, Vec<MirrorEntry<M>>>,
    next_mirror_id: AtomicU64,
}

impl<M: Mm> Hmm<M> {
    /// The address space this mirrors.
    pub fn mm(&self) -> &Arc<M> {
        &self.mm
    }

    /// Number of registered ranges (diagnostics and tests).
    pub fn range_count(&self) -> usize {
        self.lock.lock().ranges.len()
    }

    /// Number of registered (and not released) mirrors.
    pub fn mirror_count(&self) -> usize {
        self.mirrors.read().len()
    }

    /// Invalidations currently between start and end.
    pub fn notifiers_in_progress(&self) -> usize {
        self.lock.lock().notifiers
    }

    /// Current value of the per-address-space invalidation sequence.
    pub fn invalidate_seq(&self) -> u64 {
        self.lock.lock().invalidate_seq
    }

    /// Close one invalidation (also used to undo an aborted start).
    fn end_invalidation(&self) {
        // Blocking even for non-blockable callers: the critical section is a
        // few stores and never calls out, and leaving `notifiers` raised would
        // keep every range invalid forever.
        let mut st = self.lock.lock();
        debug_assert!(st.notifiers > 0, "invalidate_range_end without start");
        st.notifiers = st.notifiers.saturating_sub(1);
        if st.notifiers == 0 {
            // The 2019 rule: valid again once nothing is in flight. This is
            // exactly why `range_valid` alone is not a sufficient check.
            for r in &st.ranges {
                r.valid.store(true, Ordering::Release);
            }
        }
    }
}

impl<M: Mm> MmuNotifier<M> for Hmm<M> {
    fn invalidate_range_start(&self, _mm: &M, nrange: &MmuNotifierRange) -> Result<(), Errno> {
        let update = HmmUpdate {
            start: nrange.start,
            end: nrange.end,
            event: nrange.event,
            blockable: nrange.blockable,
        };
        {
            let mut st = if update.blockable {
                self.lock.lock()
            } else {
                self.lock.try_lock().ok_or(Errno::EAGAIN)?
            };
            st.notifiers += 1;
            // Bump and stamp *before* any mirror is told: a driver check that
            // takes the update lock after the sync callback released it must
            // see the new stamp.
            st.invalidate_seq += 1;
            let seq = st.invalidate_seq;
            for r in st
                .ranges
                .iter()
                .filter(|r| r.overlaps(update.start, update.end))
            {
                r.valid.store(false, Ordering::Release);
                r.invalidate_seq.store(seq, Ordering::Release);
            }
        }

        let mirrors = if update.blockable {
            self.mirrors.read()
        } else if let Some(m) = self.mirrors.try_read() {
            m
        } else {
            self.end_invalidation();
            return Err(Errno::EAGAIN);
        };
        let mut ret = Ok(());
        for m in mirrors.iter() {
            if let Err(e) = m.ops.sync_cpu_device_pagetables(&update) {
                if update.blockable {
                    log::warn!("hmm: mirror {} failed a blockable sync: {}", m.id, e);
                    continue;
                }
                ret = Err(Errno::EAGAIN);
                break;
            }
        }
        drop(mirrors);
        if ret.is_err() {
            // Abort cleanly: the chain will not call `end` for us.
            self.end_invalidation();
        }
        ret
    }

    fn invalidate_range_end(&self, _mm: &M, _nrange: &MmuNotifierRange) {
        self.end_invalidation();
    }

    fn release(&self, _mm: &M) {
        // A registered range holds an mm users reference, so the last mmput
        // (our caller) cannot happen while one exists.
        assert!(
            self.lock.lock().ranges.is_empty(),
            "hmm release with a registered range: range_register's mmget was lost"
        );
        loop {
            // Take one mirror at a time and call it without `mirrors_sem`: its
            // release may wait for work that itself triggers a notifier.
            let entry = {
                let mut mirrors = self.mirrors.write();
                if mirrors.is_empty() {
                    break;
                }
                mirrors.remove(0)
            };
            entry.ops.release();
        }
    }
}

/// `hmm_get_or_create`: the one `Hmm` of `mm`, created and hooked into its
/// notifier chain on first use.
fn hmm_get_or_create<M: Mm>(mm: &Arc<M>) -> Arc<Hmm<M>> {
    let mut slot = mm.core().hmm.lock();
    if let Some(hmm) = slot.upgrade() {
        return hmm;
    }
    let hmm = Arc::new(Hmm {
        mm: Arc::clone(mm),
        lock: Mutex::new(HmmState {
            ranges: Vec::new(),
            notifiers: 0,
            invalidate_seq: 0,
        }),
        mirrors: RwLock::new(Vec::new()),
        next_mirror_id: AtomicU64::new(1),
    });
    let weak = Arc::downgrade(&hmm);
    mmu_notifier_register::<M>(mm, weak);
    *slot = Arc::downgrade(&hmm);
    hmm
}

/// A registered mirror (`struct hmm_mirror`). Dropping it unregisters it.
pub struct HmmMirror<M: Mm> {
    hmm: Option<Arc<Hmm<M>>>,
    id: u64,
}

impl<M: Mm> HmmMirror<M> {
    /// The address space's `Hmm`, `None` after `mirror_unregister`.
    pub fn hmm(&self) -> Option<&Arc<Hmm<M>>> {
        self.hmm.as_ref()
    }
}

impl<M: Mm> Drop for HmmMirror<M> {
    fn drop(&mut self) {
        mirror_unregister(self);
    }
}

/// `hmm_mirror_register`: mirror `mm` for a device. Demands the mmap lock
/// held for write (as 5.3 asserts). The caller must hold a users reference on
/// `mm` (it is the process's address space the driver was opened with);
/// EFAULT if the address space is already dying, EINVAL if the guard is for
/// another address space.
pub fn mirror_register<M: Mm>(
    mm: &Arc<M>,
    mmap: &MmapWriteGuard<'_, M>,
    ops: Arc<dyn HmmMirrorOps<M>>,
) -> Result<HmmMirror<M>, Errno> {
    if !ptr::eq(mmap.mm(), &**mm) {
        return Err(Errno::EINVAL);
    }
    if mm.core().users() == 0 {
        return Err(Errno::EFAULT);
    }
    let hmm = hmm_get_or_create(mm);
    let id = hmm.next_mirror_id.fetch_add(1, Ordering::Relaxed);
    hmm.mirrors.write().push(MirrorEntry { id, ops });
    Ok(HmmMirror { hmm: Some(hmm), id })
}

/// `hmm_mirror_unregister`: stop mirroring. When it returns, no sync callback
/// for this mirror is running or will run. Harmless if called twice (and on a
/// mirror that was already released).
pub fn mirror_unregister<M: Mm>(mirror: &mut HmmMirror<M>) {
    if let Some(hmm) = mirror.hmm.take() {
        hmm.mirrors.write().retain(|m| m.id != mirror.id);
        // Dropping `hmm` is `hmm_put`.
    }
}

struct Registration<M: Mm> {
    hmm: Arc<Hmm<M>>,
    link: Arc<RangeLink>,
}

/// A range of the address space tracked for a device (`struct hmm_range`).
///
/// `pfns` is input and output: before `range_fault`, each entry may carry
/// request bits (`flags[Valid]`, `flags[Write]`), combined as
/// `(pfns[i] & pfn_flags_mask) | default_flags`; afterwards each entry is
/// `(pfn << pfn_shift) | flags[Valid] [| flags[Write]]` or one of `values[]`.
/// The flag bits must lie below `pfn_shift`.
pub struct HmmRange<M: Mm> {
    /// One entry per `1 << page_shift` bytes; sized by `range_register`.
    pub pfns: Vec<u64>,
    /// The driver's encoding of [`HmmPfnFlag`]s.
    pub flags: [u64; HMM_PFN_FLAG_MAX],
    /// The driver's encoding of [`HmmPfnValue`]s.
    pub values: [u64; HMM_PFN_VALUE_MAX],
    /// Request bits applied to every entry.
    pub default_flags: u64,
    /// Mask applied to each entry's own request bits.
    pub pfn_flags_mask: u64,
    /// Where the pfn starts in an output entry.
    pub pfn_shift: u32,
    start: u64,
    end: u64,
    page_shift: u32,
    notifier_seq: u64,
    reg: Option<Registration<M>>,
}

impl<M: Mm> HmmRange<M> {
    /// An unregistered range with the driver's encoding tables. Requests come
    /// from the per-entry bits (`pfn_flags_mask = !0`, `default_flags = 0`).
    pub fn new(
        flags: [u64; HMM_PFN_FLAG_MAX],
        values: [u64; HMM_PFN_VALUE_MAX],
        pfn_shift: u32,
    ) -> Self {
        HmmRange {
            pfns: Vec::new(),
            flags,
            values,
            default_flags: 0,
            pfn_flags_mask: !0,
            pfn_shift,
            start: 0,
            end: 0,
            page_shift: PAGE_SHIFT,
            notifier_seq: 0,
            reg: None,
        }
    }

    /// First byte (set by `range_register`).
    pub fn start(&self) -> u64 {
        self.start
    }

    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// log2 of the bytes one entry covers: 12 or 21.
    pub fn page_shift(&self) -> u32 {
        self.page_shift
    }

    /// Number of entries.
    pub fn npages(&self) -> usize {
        ((self.end - self.start) >> self.page_shift) as usize
    }

    /// Whether the range is registered.
    pub fn is_registered(&self) -> bool {
        self.reg.is_some()
    }

    /// The `Hmm` the range is registered with.
    pub fn hmm(&self) -> Option<&Arc<Hmm<M>>> {
        self.reg.as_ref().map(|r| &r.hmm)
    }

    /// The sequence stamp the last `range_fault`/`range_snapshot` started from.
    pub fn notifier_seq(&self) -> u64 {
        self.notifier_seq
    }

    /// `hmm_device_entry_from_pfn` plus the permission bits.
    pub fn entry_from_pfn(&self, pfn: u64, writable: bool) -> u64 {
        encode(&self.flags, self.pfn_shift, pfn, writable)
    }

    /// `hmm_device_entry_to_pfn`: the pfn of a valid output entry, `None` for
    /// the special values and entries without `flags[Valid]`.
    pub fn entry_to_pfn(&self, entry: u64) -> Option<u64> {
        if self.values.contains(&entry) || entry & self.flags[HmmPfnFlag::Valid as usize] == 0 {
            return None;
        }
        Some(entry >> self.pfn_shift)
    }

    /// Whether an output entry carries `flags[Write]`.
    pub fn entry_is_writable(&self, entry: u64) -> bool {
        self.entry_to_pfn(entry).is_some() && entry & self.flags[HmmPfnFlag::Write as usize] != 0
    }
}

impl<M: Mm> Drop for HmmRange<M> {
    fn drop(&mut self) {
        range_unregister(self);
    }
}

fn encode(flags: &[u64; HMM_PFN_FLAG_MAX], pfn_shift: u32, pfn: u64, writable: bool) -> u64 {
    let mut e = (pfn << pfn_shift) | flags[HmmPfnFlag::Valid as usize];
    if writable {
        e |= flags[HmmPfnFlag::Write as usize];
    }
    e
}

/// `hmm_range_register`: start tracking `[start, end)` for `mirror`.
///
/// EINVAL if `page_shift` is not 12 or 21, if start/end are not aligned to
/// it, or if `start >= end`; EBUSY if the range is already registered; EINVAL
/// if the mirror was unregistered; EFAULT if the address space is already
/// dying. On success the range holds a reference on the mirror's `Hmm` and an
/// mm users reference until `range_unregister`, so the address space cannot
/// be released meanwhile. `pfns` is resized to the number of entries
/// (existing request bits are kept).
pub fn range_register<M: Mm>(
    range: &mut HmmRange<M>,
    mirror: &HmmMirror<M>,
    start: u64,
    end: u64,
    page_shift: u32,
) -> Result<(), Errno> {
    if range.reg.is_some() {
        return Err(Errno::EBUSY);
    }
    if page_shift != PAGE_SHIFT && page_shift != PMD_SHIFT {
        return Err(Errno::EINVAL);
    }
    let mask = (1u64 << page_shift) - 1;
    if start & mask != 0 || end & mask != 0 || start >= end {
        return Err(Errno::EINVAL);
    }
    let hmm = mirror.hmm.as_ref().ok_or(Errno::EINVAL)?;
    range.start = start;
    range.end = end;
    range.page_shift = page_shift;

    // The range holds an mm users reference for its lifetime, so release
    // cannot run while it exists.
    if !mmget_not_zero(&*hmm.mm) {
        return Err(Errno::EFAULT);
    }
    range.pfns.resize(range.npages(), 0);

    let link = {
        let mut st = hmm.lock.lock();
        // If invalidations are in flight the range starts invalid and the
        // caller waits (`range_wait_until_valid`), as in 2019.
        let link = Arc::new(RangeLink {
            start,
            end,
            valid: AtomicBool::new(st.notifiers == 0),
            invalidate_seq: AtomicU64::new(st.invalidate_seq),
        });
        st.ranges.push(Arc::clone(&link));
        link
    };
    range.notifier_seq = link.invalidate_seq.load(Ordering::Acquire);
    // The range shares the mirror's `Hmm`: a plain clone, no lookup through
    // the address space (which may be dying).
    range.reg = Some(Registration {
        hmm: Arc::clone(hmm),
        link,
    });
    Ok(())
}

/// `hmm_range_unregister`: stop tracking. Unlinks the range, marks it invalid,
/// drops the mm users reference (possibly the last: then the address space is
/// released right here, calling every mirror's `release`) and the `Hmm`
/// reference. Harmless if called twice; the range may be registered again.
pub fn range_unregister<M: Mm>(range: &mut HmmRange<M>) {
    let Some(reg) = range.reg.take() else {
        return;
    };
    reg.hmm
        .lock
        .lock()
        .ranges
        .retain(|r| !Arc::ptr_eq(r, &reg.link));
    reg.link.valid.store(false, Ordering::Release);
    // No lock held: this may be the last mmput and run release.
    mmput(&*reg.hmm.mm);
    drop(reg);
}

/// `hmm_range_valid`, the 2019 check: false while an overlapping invalidation
/// is in flight. **Not** sufficient on its own for the driver's final check;
/// use [`range_check_seq`].
pub fn range_valid<M: Mm>(range: &HmmRange<M>) -> bool {
    range
        .reg
        .as_ref()
        .is_some_and(|r| r.link.valid.load(Ordering::Acquire))
}

/// The race-free driver check, done under the driver's update lock (the same
/// lock its `sync_cpu_device_pagetables` takes): true iff the range is valid
/// and no invalidation overlapping it started since the last `range_fault` /
/// `range_snapshot` began. False means: drop the pfns and retry.
pub fn range_check_seq<M: Mm>(range: &HmmRange<M>) -> bool {
    let Some(reg) = range.reg.as_ref() else {
        return false;
    };
    // Under hmm->lock so the answer is ordered with invalidate_range_start's
    // stamping (the lock order is driver update lock -> hmm->lock; HMM never
    // takes the update lock while holding hmm->lock).
    let _st = reg.hmm.lock.lock();
    reg.link.valid.load(Ordering::Acquire)
        && reg.link.invalidate_seq.load(Ordering::Acquire) == range.notifier_seq
}

/// `hmm_range_wait_until_valid`: poll until no invalidation keeps the range
/// invalid, or `timeout_ms` elapsed. Returns `range_valid()`.
pub fn range_wait_until_valid<M: Mm>(range: &HmmRange<M>, timeout_ms: u64) -> bool {
    let Some(reg) = range.reg.as_ref() else {
        return false;
    };
    let mm = &reg.hmm.mm;
    let deadline = mm
        .now_ns()
        .saturating_add(timeout_ms.saturating_mul(1_000_000));
    loop {
        if reg.link.valid.load(Ordering::Acquire) {
            return true;
        }
        if mm.now_ns() >= deadline {
            return false;
        }
        mm.cpu_relax();
    }
}

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
    let reg = range.reg.as_ref().ok_or(Errno::EINVAL)?;
    let hmm = Arc::clone(&reg.hmm);
    let link = Arc::clone(&reg.link);
    let mm: &M = &hmm.mm;
    if !ptr::eq(mmap.mm(), mm) {
        return Err(Errno::EINVAL);
    }
    if range.pfns.len() != range.npages() {
        return Err(Errno::EINVAL);
    }
    {
        // read_begin: note the stamp before looking at any PTE.
        let _st = hmm.lock.lock();
        if !link.valid.load(Ordering::Acquire) {
            return Err(Errno::EAGAIN);
        }
        range.notifier_seq = link.invalidate_seq.load(Ordering::Acquire);
    }
    match walk_entries(range, mm, mmap, &link, fault) {
        Ok(()) => Ok(range.pfns.len()),
        Err(e) => {
            let none = range.values[HmmPfnValue::None as usize];
            range.pfns[e.at] = range.values[e.value as usize];
            range.pfns[e.at + 1..].fill(none);
            Err(e.err)
        }
    }
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
    let none = values[HmmPfnValue::None as usize];
    let npages = range.pfns.len();
    let pfns = &mut range.pfns[..];
    let fail = |at: usize, value: HmmPfnValue, err: Errno| WalkError { at, value, err };

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
        'vma: while i < vma_end {
            let addr = start + ((i as u64) << shift);
            let w = mm.walk(mmap, addr);
            // How many entries this answer covers.
            let n = if w.shift > shift {
                let block_end = (addr | ((1u64 << w.shift) - 1)) + 1;
                (((block_end - addr) >> shift) as usize).min(vma_end - i)
            } else {
                1
            };
            let (cpu_valid, cpu_write, pfn0) = match w.state {
                PageState::None => (false, false, 0),
                PageState::Present { pfn, writable } if shift == PAGE_SHIFT => {
                    (true, writable, pfn)
                }
                PageState::Zero { pfn } if shift == PAGE_SHIFT => (true, false, pfn),
                PageState::Huge { pfn, writable } => {
                    let leaf_base = addr & !((1u64 << PMD_SHIFT) - 1);
                    (true, writable, pfn + ((addr - leaf_base) >> PAGE_SHIFT))
                }
                PageState::Special => return Err(fail(i, HmmPfnValue::Special, Errno::EFAULT)),
                // A 4 KiB PTE where a 2 MiB entry was asked for: the `Mm`
                // broke the HUGE-VMA contract.
                PageState::Present { .. } | PageState::Zero { .. } => {
                    return Err(fail(i, HmmPfnValue::Error, Errno::EFAULT));
                }
            };
            let pfn_step = if cpu_valid && matches!(w.state, PageState::Huge { .. }) {
                1u64 << (shift - PAGE_SHIFT)
            } else {
                0
            };
            for k in 0..n {
                let j = i + k;
                if let Some(block) = fault {
                    let req = (pfns[j] & mask) | default_flags;
                    let want = req & req_valid != 0;
                    let want_write = want && req & req_write != 0;
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
                        let mut ff = FaultFlags::REMOTE;
                        if want_write {
                            ff |= FaultFlags::WRITE;
                        }
                        if !block {
                            ff |= FaultFlags::ALLOW_RETRY;
                        }
                        match mm.handle_mm_fault(mmap, fault_addr, ff) {
                            Ok(()) => {}
                            Err(FaultError::Retry) => {
                                return Err(fail(j, HmmPfnValue::None, Errno::EBUSY))
                            }
                            Err(FaultError::Oom) => {
                                return Err(fail(j, HmmPfnValue::Error, Errno::ENOMEM))
                            }
                            Err(FaultError::Sigsegv | FaultError::Sigbus) => {
                                return Err(fail(j, HmmPfnValue::Error, Errno::EFAULT));
                            }
                        }
                        // Faults are slow and can race with invalidations; stop
                        // early rather than fill pfns the driver will discard.
                        if !link.valid.load(Ordering::Acquire) {
                            return Err(fail(j, HmmPfnValue::None, Errno::EAGAIN));
                        }
                        // Re-walk from the faulted entry.
                        i = j;
                        continue 'vma;
                    }
                }
                pfns[j] = if cpu_valid {
                    encode(&flags, pfn_shift, pfn0 + k as u64 * pfn_step, cpu_write)
                } else {
                    none
                };
            }
            i += n;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
