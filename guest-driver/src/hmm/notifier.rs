//! The per-address-space HMM state (`struct hmm`) and its side of the
//! mmu-notifier chain: invalidations stamp the ranges they overlap and
//! reach every mirror; the last `mmput` releases the mirrors.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use lock_api::{Mutex, RwLock};

use super::{HmmMirrorOps, HmmUpdate};
use crate::errno::Errno;
use crate::mm::{mmu_notifier_register, Mm, MmuNotifier, MmuNotifierRange};

/// One registered range, as the address space's invalidations see it.
pub(super) struct RangeLink {
    pub(super) start: u64,
    pub(super) end: u64,
    /// The 2019 `range->valid` flag: false from an overlapping
    /// `invalidate_range_start` until *all* invalidations of the address
    /// space have ended.
    pub(super) valid: AtomicBool,
    /// Value of [`HmmState::invalidate_seq`] taken by the last invalidation
    /// that overlapped this range (written under `Hmm::lock`).
    pub(super) invalidate_seq: AtomicU64,
}

impl RangeLink {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        start < self.end && self.start < end
    }
}

pub(super) struct HmmState {
    /// `hmm->ranges`.
    pub(super) ranges: Vec<Arc<RangeLink>>,
    /// Invalidations in progress (`hmm->notifiers`).
    pub(super) notifiers: usize,
    /// The per-address-space invalidation sequence: bumped by every
    /// `invalidate_range_start`.
    pub(super) invalidate_seq: u64,
}

pub(super) struct MirrorEntry<M: Mm> {
    pub(super) id: u64,
    pub(super) ops: Arc<dyn HmmMirrorOps<M>>,
}

/// The per-address-space HMM state (`struct hmm`). Refcounted by `Arc`: each
/// mirror and each registered range holds a reference; the address space only
/// points to it weakly (`mm->hmm`, and its notifier chain entry).
pub struct Hmm<M: Mm> {
    /// Structure reference (`mmgrab`): the `M` outlives its `Hmm`.
    pub(super) mm: Arc<M>,
    /// `hmm->lock`: ranges, notifier count, sequence. Never held while
    /// calling out.
    pub(super) lock: Mutex<M::RawMutex, HmmState>,
    /// `hmm->mirrors_sem`: held for read across the sync callbacks so that
    /// `mirror_unregister` (write) waits for callbacks in flight.
    pub(super) mirrors: RwLock<M::RawRwLock, Vec<MirrorEntry<M>>>,
    pub(super) next_mirror_id: AtomicU64,
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
                // In this order: the walk's lock-free `read_begin` reads
                // the stamp first and `valid` second.
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
pub(super) fn hmm_get_or_create<M: Mm>(mm: &Arc<M>) -> Arc<Hmm<M>> {
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
