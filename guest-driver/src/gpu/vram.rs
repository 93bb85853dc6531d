//! The VRAM allocator: the device's memory ([`Gpu::vram_size`]) in 2 MiB
//! chunks, each either handed out whole (a 2 MiB device page) or carved
//! into 512 pages of 4 KiB, as nouveau's dmem and amdgpu's SVM carve their
//! VRAM. Addresses are VRAM offsets: what a `Pte::VRAM` leaf and a MIGRATE
//! entry take.
//!
//! Rules: 4 KiB pages come from a partly used chunk first (most recently
//! carved), so small allocations do not fragment every chunk; a chunk
//! whose last page is freed becomes free again, for either use. Lower
//! chunks are handed out first. Freeing what is not allocated (or a page
//! as a chunk, or the reverse) is an error and changes nothing. Nothing
//! allocated may be left at teardown: [`VramAllocator::teardown`] says how
//! much is, the way frame leaks are checked.
//!
//! [`Gpu::vram_size`]: super::Gpu::vram_size

use alloc::vec::Vec;

use faultline_abi::{LEAF_2M, PAGE_SIZE};

use super::GpuError;
use crate::sync::SpinMutex;

/// A chunk: the unit the allocator takes from VRAM.
pub const CHUNK_BYTES: u64 = LEAF_2M;
/// 4 KiB pages in a chunk.
pub const CHUNK_PAGES: u64 = CHUNK_BYTES / PAGE_SIZE;
const WORDS: usize = (CHUNK_PAGES / 64) as usize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Use {
    Free,
    /// Handed out whole.
    Whole,
    /// Carved into pages: the bitmap says which are allocated.
    Pages,
}

#[derive(Debug, Clone, Copy)]
struct Chunk {
    use_: Use,
    used: [u64; WORDS],
    count: u32,
}

#[derive(Debug)]
struct State {
    chunks: Vec<Chunk>,
    /// Free chunk indices, the lowest last (popped first).
    free: Vec<u32>,
    /// Carved chunks with a free page; the most recently carved last.
    partial: Vec<u32>,
    /// 4 KiB pages allocated, whole chunks counting 512.
    pages_in_use: u64,
}

/// How much VRAM is allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VramUsage {
    /// 4 KiB pages allocated (a whole chunk counts [`CHUNK_PAGES`]).
    pub pages: u64,
    /// Chunks not free (whole or carved).
    pub chunks: u64,
}

/// VRAM left allocated at teardown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VramLeak(pub VramUsage);

/// The allocator, shareable (it locks itself).
#[derive(Debug)]
pub struct VramAllocator {
    state: SpinMutex<State>,
    chunks: u32,
}

impl VramAllocator {
    /// An allocator over `[0, size)` of VRAM: its whole 2 MiB chunks (the
    /// device reports a multiple of 2 MiB; a tail is not used).
    pub fn new(size: u64) -> Self {
        let n = u32::try_from(size / CHUNK_BYTES).unwrap_or(u32::MAX);
        let empty = Chunk {
            use_: Use::Free,
            used: [0; WORDS],
            count: 0,
        };
        Self {
            state: SpinMutex::new(State {
                chunks: alloc::vec![empty; n as usize],
                free: (0..n).rev().collect(),
                partial: Vec::new(),
                pages_in_use: 0,
            }),
            chunks: n,
        }
    }

    /// Bytes this allocator manages.
    pub fn size(&self) -> u64 {
        u64::from(self.chunks) * CHUNK_BYTES
    }

    /// A whole 2 MiB chunk (2 MiB aligned VRAM offset), or `None` when no
    /// chunk is free.
    pub fn alloc_chunk(&self) -> Option<u64> {
        let mut guard = self.state.lock();
        let s = &mut *guard;
        let i = s.free.pop()?;
        let c = &mut s.chunks[i as usize];
        c.use_ = Use::Whole;
        s.pages_in_use += CHUNK_PAGES;
        Some(u64::from(i) * CHUNK_BYTES)
    }

    /// Give back a chunk from [`alloc_chunk`](Self::alloc_chunk).
    pub fn free_chunk(&self, offset: u64) -> Result<(), GpuError> {
        let mut guard = self.state.lock();
        let s = &mut *guard;
        let i = chunk_of(offset, self.chunks)
            .filter(|_| offset.is_multiple_of(CHUNK_BYTES))
            .ok_or(GpuError::Invalid("not a VRAM chunk"))?;
        let c = &mut s.chunks[i as usize];
        if c.use_ != Use::Whole {
            return Err(GpuError::Invalid("VRAM chunk not allocated whole"));
        }
        c.use_ = Use::Free;
        s.pages_in_use -= CHUNK_PAGES;
        s.free.push(i);
        Ok(())
    }

    /// A 4 KiB page (VRAM offset), or `None` when every chunk is in use
    /// and none has a free page.
    pub fn alloc_page(&self) -> Option<u64> {
        let mut guard = self.state.lock();
        let s = &mut *guard;
        let i = match s.partial.last() {
            Some(&i) => i,
            None => {
                let i = s.free.pop()?;
                s.chunks[i as usize].use_ = Use::Pages;
                s.partial.push(i);
                i
            }
        };
        let c = &mut s.chunks[i as usize];
        let (w, bit) = c
            .used
            .iter()
            .enumerate()
            .find_map(|(w, word)| (*word != u64::MAX).then(|| (w, word.trailing_ones())))?;
        c.used[w] |= 1 << bit;
        c.count += 1;
        let full = u64::from(c.count) == CHUNK_PAGES;
        if full {
            s.partial.pop();
        }
        s.pages_in_use += 1;
        let page = w as u64 * 64 + u64::from(bit);
        Some(u64::from(i) * CHUNK_BYTES + page * PAGE_SIZE)
    }

    /// Give back a page from [`alloc_page`](Self::alloc_page).
    pub fn free_page(&self, offset: u64) -> Result<(), GpuError> {
        let mut guard = self.state.lock();
        let s = &mut *guard;
        let i = chunk_of(offset, self.chunks)
            .filter(|_| offset.is_multiple_of(PAGE_SIZE))
            .ok_or(GpuError::Invalid("not a VRAM page"))?;
        let page = (offset % CHUNK_BYTES) / PAGE_SIZE;
        let (w, bit) = ((page / 64) as usize, page % 64);
        let c = &mut s.chunks[i as usize];
        if c.use_ != Use::Pages || c.used[w] & (1 << bit) == 0 {
            return Err(GpuError::Invalid("VRAM page not allocated"));
        }
        let was_full = u64::from(c.count) == CHUNK_PAGES;
        c.used[w] &= !(1 << bit);
        c.count -= 1;
        let empty = c.count == 0;
        if empty {
            c.use_ = Use::Free;
        }
        s.pages_in_use -= 1;
        if was_full {
            s.partial.push(i);
        }
        if empty {
            s.partial.retain(|&p| p != i);
            s.free.push(i);
        }
        Ok(())
    }

    /// What is allocated now.
    pub fn usage(&self) -> VramUsage {
        let s = self.state.lock();
        VramUsage {
            pages: s.pages_in_use,
            chunks: u64::from(self.chunks) - s.free.len() as u64,
        }
    }

    /// The teardown check: `Err` names what is still allocated.
    pub fn teardown(self) -> Result<(), VramLeak> {
        match self.usage() {
            u if u == VramUsage::default() => Ok(()),
            u => Err(VramLeak(u)),
        }
    }
}

/// The chunk index of `offset`, if it lies in the allocator's VRAM.
fn chunk_of(offset: u64, chunks: u32) -> Option<u32> {
    u32::try_from(offset / CHUNK_BYTES)
        .ok()
        .filter(|&i| i < chunks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn pages_fill_a_chunk_before_the_next_and_chunks_come_back() {
        let a = VramAllocator::new(2 * CHUNK_BYTES + 4096);
        assert_eq!(a.size(), 2 * CHUNK_BYTES);
        let pages: Vec<u64> = (0..CHUNK_PAGES).filter_map(|_| a.alloc_page()).collect();
        assert_eq!(
            pages,
            (0..CHUNK_PAGES).map(|p| p * 4096).collect::<Vec<_>>()
        );
        assert_eq!(a.alloc_chunk(), Some(CHUNK_BYTES));
        assert_eq!(a.alloc_chunk(), None);
        assert_eq!(a.alloc_page(), None);
        assert_eq!(
            a.usage(),
            VramUsage {
                pages: 2 * CHUNK_PAGES,
                chunks: 2
            }
        );
        a.free_page(0x5000).unwrap();
        assert_eq!(a.alloc_page(), Some(0x5000), "the freed page is reused");
        assert!(a.free_page(0x5001).is_err());
        assert!(
            a.free_page(CHUNK_BYTES).is_err(),
            "a whole chunk is no page"
        );
        assert!(a.free_chunk(0).is_err(), "a carved chunk is not whole");
        assert!(a.free_page(2 * CHUNK_BYTES).is_err(), "outside");
        for p in pages {
            a.free_page(p).unwrap();
        }
        assert!(a.free_page(0).is_err(), "double free");
        assert_eq!(a.usage().chunks, 1);
        assert_eq!(a.alloc_chunk(), Some(0), "an emptied chunk is free again");
        a.free_chunk(0).unwrap();
        a.free_chunk(CHUNK_BYTES).unwrap();
        assert!(a.free_chunk(CHUNK_BYTES).is_err());
        assert_eq!(a.teardown(), Ok(()));
    }

    #[test]
    fn teardown_reports_what_is_left() {
        let a = VramAllocator::new(4 * CHUNK_BYTES);
        a.alloc_page().unwrap();
        a.alloc_chunk().unwrap();
        assert_eq!(
            a.teardown(),
            Err(VramLeak(VramUsage {
                pages: CHUNK_PAGES + 1,
                chunks: 2
            }))
        );
        assert_eq!(VramAllocator::new(0).alloc_page(), None);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Page,
        Chunk,
        Free(usize),
        Bogus(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => Just(Op::Page),
            1 => Just(Op::Chunk),
            4 => any::<usize>().prop_map(Op::Free),
            1 => any::<u64>().prop_map(Op::Bogus),
        ]
    }

    proptest! {
        /// Against a model: allocations never overlap, stay inside VRAM
        /// and aligned, fail only when the model says VRAM is full, bad
        /// frees change nothing, and everything freed leaves no usage.
        #[test]
        fn matches_a_model(ops in proptest::collection::vec(op(), 1..400)) {
            let chunks = 3u64;
            let a = VramAllocator::new(chunks * CHUNK_BYTES);
            // (offset, whole chunk?)
            let mut held: Vec<(u64, bool)> = Vec::new();
            let mut pages = BTreeSet::new();
            for op in ops {
                match op {
                    Op::Page => match a.alloc_page() {
                        Some(p) => {
                            prop_assert!(p.is_multiple_of(PAGE_SIZE) && p < a.size());
                            prop_assert!(pages.insert(p), "page {p:#x} twice");
                            held.push((p, false));
                        }
                        None => prop_assert_eq!(pages.len() as u64, chunks * CHUNK_PAGES),
                    },
                    Op::Chunk => match a.alloc_chunk() {
                        Some(c) => {
                            prop_assert!(c.is_multiple_of(CHUNK_BYTES) && c < a.size());
                            for p in (c..c + CHUNK_BYTES).step_by(PAGE_SIZE as usize) {
                                prop_assert!(pages.insert(p), "chunk {c:#x} overlaps");
                            }
                            held.push((c, true));
                        }
                        None => {
                            let used: BTreeSet<u64> = pages.iter().map(|p| p / CHUNK_BYTES).collect();
                            prop_assert_eq!(used.len() as u64, chunks);
                        }
                    },
                    Op::Free(i) if !held.is_empty() => {
                        let (off, whole) = held.swap_remove(i % held.len());
                        if whole {
                            prop_assert!(a.free_chunk(off).is_ok());
                            for p in (off..off + CHUNK_BYTES).step_by(PAGE_SIZE as usize) {
                                pages.remove(&p);
                            }
                        } else {
                            prop_assert!(a.free_page(off).is_ok());
                            pages.remove(&off);
                        }
                    }
                    Op::Free(_) => {}
                    Op::Bogus(off) => {
                        let before = a.usage();
                        if !pages.contains(&off) {
                            prop_assert!(a.free_page(off).is_err());
                        }
                        if !held.contains(&(off, true)) {
                            prop_assert!(a.free_chunk(off).is_err());
                        }
                        prop_assert_eq!(a.usage(), before);
                    }
                }
                prop_assert_eq!(a.usage().pages, pages.len() as u64);
            }
            for (off, whole) in held {
                if whole {
                    a.free_chunk(off).unwrap();
                } else {
                    a.free_page(off).unwrap();
                }
            }
            prop_assert_eq!(a.teardown(), Ok(()));
        }
    }
}
