//! Mirrors (`struct hmm_mirror`): a device driver's registration on an
//! address space's `Hmm`.

use alloc::sync::Arc;
use core::ptr;
use core::sync::atomic::Ordering;

use super::notifier::{hmm_get_or_create, Hmm, MirrorEntry};
use super::HmmMirrorOps;
use crate::errno::Errno;
use crate::mm::{Mm, MmapWriteGuard};

/// A registered mirror (`struct hmm_mirror`). Dropping it unregisters it.
pub struct HmmMirror<M: Mm> {
    pub(super) hmm: Option<Arc<Hmm<M>>>,
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
