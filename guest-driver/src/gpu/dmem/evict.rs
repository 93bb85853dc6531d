//! What eviction needs to know about VRAM (test_hmm's `dmirror_devmem_evict`,
//! nouveau's `nouveau_dmem_evict_chunk`, drm_pagemap's evict): per chunk,
//! when a migration last filled it (the LRU stamp) and what each of its
//! pages backs (a reverse map: which address space and VA), and the
//! address spaces served, each held weakly (an exited process is never
//! kept alive by its device pages).
//!
//! Entries are written when a migration allocates a page and cleared when
//! the page goes back to the allocator (`free_vram`), whichever path frees
//! it (migration back, munmap, exit, a failed copy). An entry is a hint:
//! eviction migrates the recorded VA back only if its CPU entry still names
//! a page of the chunk being evicted, so a stale entry moves nothing wrong.

use alloc::sync::{Arc, Weak};
use alloc::vec::Vec;

use faultline_abi::PAGE_SIZE;

use super::{to_frame, Dmem, Step};
use crate::gpu::vram::{CHUNK_BYTES, CHUNK_PAGES};
use crate::gpu::{GpuError, Platform};
use crate::mm::migrate::{MigratePfn, MigrateSelect, MigrateSrc};
use crate::mm::{Mm, PAGE_SHIFT};

/// Address spaces one memory can serve at once: an entry keeps its slot in
/// the low bits of the page-aligned VA (0 = no entry).
const MAX_SLOTS: usize = (PAGE_SIZE - 1) as usize;

/// The reverse map and LRU stamps of one memory's chunks, and the address
/// spaces it serves. A leaf lock: nothing is called while it is held.
pub(super) struct Rmap<P: Platform> {
    chunks: Vec<ChunkMap>,
    /// Slot `i + 1` is `spaces[i]`.
    spaces: Vec<Option<Arc<dyn Space<P>>>>,
}

#[derive(Default)]
struct ChunkMap {
    /// The generation of the last migration that allocated a page here
    /// (0: never).
    stamp: u64,
    /// Entries set (a whole-chunk entry counts one).
    live: u32,
    /// `va | slot` per page, 0 for none; empty until the chunk is used.
    pages: Vec<u64>,
    /// `va | slot` of the 2 MiB page that fills the chunk, 0 for none:
    /// one entry, not 512 (a chunk is allocated and freed whole or page
    /// by page, never both at once).
    whole: u64,
}

impl<P: Platform> Rmap<P> {
    /// The map of a memory of `chunks` chunks.
    pub(super) fn new(chunks: u64) -> Self {
        let mut v = Vec::new();
        v.resize_with(chunks as usize, ChunkMap::default);
        Rmap {
            chunks: v,
            spaces: Vec::new(),
        }
    }

    /// Serve `mm` (held weakly). Slots of address spaces that went away
    /// are reused. `None` when every slot is taken.
    pub(super) fn add_space<M: Mm>(&mut self, mm: &Arc<M>) -> Option<()> {
        let space: Arc<dyn Space<P>> = Arc::new(MmSpace(Arc::downgrade(mm)));
        for s in &mut self.spaces {
            if s.as_ref().is_none_or(|s| !s.alive()) {
                *s = Some(space);
                return Some(());
            }
        }
        if self.spaces.len() == MAX_SLOTS {
            return None;
        }
        self.spaces.push(Some(space));
        Some(())
    }

    /// Stop serving `mm`.
    pub(super) fn remove_space<M: Mm>(&mut self, mm: &M) {
        if let Some(slot) = self.slot_of(mm) {
            self.spaces[slot as usize - 1] = None;
        }
    }

    /// The slot of `mm`, if served.
    pub(super) fn slot_of<M: Mm>(&self, mm: &M) -> Option<u64> {
        let addr = core::ptr::from_ref(mm) as usize;
        self.spaces
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| s.addr() == addr))
            .map(|i| i as u64 + 1)
    }

    /// The page at offset `off` (from the memory's base) now backs `va` of
    /// the address space in `slot`, for the migration of generation `gen`.
    pub(super) fn record(&mut self, off: u64, slot: u64, va: u64, gen: u64) {
        let Some((c, p)) = self.index(off) else {
            return;
        };
        if c.pages.is_empty() {
            c.pages.resize(CHUNK_PAGES as usize, 0);
        }
        if c.pages[p] == 0 {
            c.live += 1;
        }
        c.pages[p] = va | slot;
        c.stamp = c.stamp.max(gen);
    }

    /// The chunk at offset `off` now backs the 2 MiB page at `va` of the
    /// address space in `slot`, for the migration of generation `gen`.
    pub(super) fn record_chunk(&mut self, off: u64, slot: u64, va: u64, gen: u64) {
        let Some((c, _)) = self.index(off) else {
            return;
        };
        if c.whole == 0 {
            c.live += 1;
        }
        c.whole = va | slot;
        c.stamp = c.stamp.max(gen);
    }

    /// The chunk at offset `off`, recorded whole, went back to the
    /// allocator.
    pub(super) fn forget_chunk(&mut self, off: u64) {
        if let Some((c, _)) = self.index(off) {
            if c.whole != 0 {
                c.whole = 0;
                c.live -= 1;
            }
        }
    }

    /// The page at offset `off` went back to the allocator.
    pub(super) fn forget(&mut self, off: u64) {
        if let Some((c, p)) = self.index(off) {
            if c.pages.get(p).is_some_and(|&e| e != 0) {
                c.pages[p] = 0;
                c.live -= 1;
            }
        }
    }

    fn index(&mut self, off: u64) -> Option<(&mut ChunkMap, usize)> {
        let c = self.chunks.get_mut((off / CHUNK_BYTES) as usize)?;
        Some((c, ((off % CHUNK_BYTES) / PAGE_SIZE) as usize))
    }

    /// The least recently migrated chunk holding pages, of those filled
    /// before the migration of generation `gen` (never one it filled: it
    /// would evict its own pages) and not in `tried`.
    pub(super) fn victim(&self, gen: u64, tried: &[u32]) -> Option<u32> {
        (0u32..)
            .zip(&self.chunks)
            .filter(|(i, c)| c.live > 0 && c.stamp < gen && !tried.contains(i))
            .min_by_key(|(_, c)| c.stamp)
            .map(|(i, _)| i)
    }

    /// The recorded VAs of chunk `c`, sorted, per address space still
    /// served.
    pub(super) fn pages_of(&self, c: u32) -> Vec<(Arc<dyn Space<P>>, Vec<u64>)> {
        let mut out: Vec<(u64, Vec<u64>)> = Vec::new();
        let Some(chunk) = self.chunks.get(c as usize) else {
            return Vec::new();
        };
        let whole = (chunk.whole != 0).then(|| {
            let (va, slot) = (
                chunk.whole & !(PAGE_SIZE - 1),
                chunk.whole & (PAGE_SIZE - 1),
            );
            (0..CHUNK_PAGES).map(move |k| (va + k * PAGE_SIZE) | slot)
        });
        let pages = chunk.pages.iter().copied().filter(|&e| e != 0);
        for e in pages.chain(whole.into_iter().flatten()) {
            let (va, slot) = (e & !(PAGE_SIZE - 1), e & (PAGE_SIZE - 1));
            match out.iter_mut().find(|(s, _)| *s == slot) {
                Some((_, vas)) => vas.push(va),
                None => out.push((slot, alloc::vec![va])),
            }
        }
        out.into_iter()
            .filter_map(|(slot, mut vas)| {
                let space = self.spaces.get(slot as usize - 1)?.clone()?;
                vas.sort_unstable();
                Some((space, vas))
            })
            .collect()
    }
}

/// An address space a memory serves, as eviction sees it (type-erased:
/// one memory may serve address spaces of any `Mm`).
pub(super) trait Space<P: Platform>: Send + Sync {
    /// The address of its `Mm` (identity).
    fn addr(&self) -> usize;
    /// Whether the `Mm` still exists.
    fn alive(&self) -> bool;
    /// Migrate back to system memory the device pages of `d` in the chunk
    /// at VRAM offset `chunk` that are mapped at `vas` (sorted); returns
    /// how many moved. Takes the address space's mmap lock: never call it
    /// with an mmap lock or the copier held.
    fn evict(&self, d: &Dmem<P>, vas: &[u64], chunk: u64) -> Result<u64, GpuError>;
}

struct MmSpace<M: Mm>(Weak<M>);

impl<P: Platform, M: Mm> Space<P> for MmSpace<M> {
    fn addr(&self) -> usize {
        Weak::as_ptr(&self.0) as usize
    }

    fn alive(&self) -> bool {
        self.0.strong_count() > 0
    }

    fn evict(&self, d: &Dmem<P>, vas: &[u64], chunk: u64) -> Result<u64, GpuError> {
        let Some(mm) = self.0.upgrade() else {
            return Ok(0);
        };
        let in_chunk = chunk..chunk + CHUNK_BYTES;
        let mut moved = 0;
        for (a, b) in runs(vas) {
            let r = d.migrate(
                &*mm,
                None,
                a,
                b,
                MigrateSelect::DEVICE_PRIVATE,
                |mm, _, src, huge| match src {
                    MigrateSrc::Page(MigratePfn::Device { vram_pfn, .. })
                        if in_chunk.contains(&(vram_pfn << PAGE_SHIFT)) =>
                    {
                        to_frame(mm, huge)
                    }
                    _ => Step::Skip,
                },
            );
            match r {
                Ok((n, stop)) => {
                    moved += n;
                    if stop.is_some() {
                        // Frames ran out: what moved is what eviction got.
                        break;
                    }
                }
                // The address space is dying (its exit frees the pages) or
                // no longer served: nothing to move there.
                Err(GpuError::Mm(_) | GpuError::Invalid(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(moved)
    }
}

/// The runs of consecutive pages in sorted page addresses, as `[a, b)`.
fn runs(vas: &[u64]) -> impl Iterator<Item = (u64, u64)> + '_ {
    let mut i = 0;
    core::iter::from_fn(move || {
        let a = *vas.get(i)?;
        let mut b = a + PAGE_SIZE;
        i += 1;
        while vas.get(i) == Some(&b) {
            b += PAGE_SIZE;
            i += 1;
        }
        Some((a, b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_split_at_gaps() {
        let vas = [0x1000, 0x2000, 0x3000, 0x5000, 0x7000, 0x8000];
        let r: Vec<_> = runs(&vas).collect();
        assert_eq!(r, [(0x1000, 0x4000), (0x5000, 0x6000), (0x7000, 0x9000)]);
        assert_eq!(runs(&[]).count(), 0);
    }
}
