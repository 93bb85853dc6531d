//! The density prefetcher's state (`Prefetch::Density`): per 2 MiB region a
//! bitmap of its 512 pages that faulted or were mapped. The subtrees of the
//! bitmap tree are the aligned runs of 1, 2, 4 … 512 pages; a subtree's
//! count is the popcount of its run, so the tree needs no storage of its
//! own.
//!
//! Bounded: at most [`MAX_REGIONS`] regions are tracked (64 bytes each);
//! a new region beyond that evicts the lowest-addressed one, which only
//! makes its later faults prefetch less.

use alloc::collections::BTreeMap;

use faultline_abi::{LEAF_2M, PAGE_SIZE};

/// Regions tracked per context (1024 × 2 MiB = 2 GiB of address space,
/// 64 KiB of bitmaps).
pub const MAX_REGIONS: usize = 1024;

const PAGES: u64 = LEAF_2M / PAGE_SIZE;

type Bits = [u64; (PAGES / 64) as usize];

#[derive(Default)]
pub(super) struct Density {
    regions: BTreeMap<u64, Bits>,
}

fn count(bits: &Bits, base: u64, len: u64) -> u64 {
    if len >= 64 {
        let (w, n) = ((base / 64) as usize, (len / 64) as usize);
        bits[w..w + n]
            .iter()
            .map(|b| u64::from(b.count_ones()))
            .sum()
    } else {
        let mask = ((1u64 << len) - 1) << (base % 64);
        u64::from((bits[(base / 64) as usize] & mask).count_ones())
    }
}

impl Density {
    fn region(&mut self, va: u64) -> &mut Bits {
        let key = va / LEAF_2M;
        if !self.regions.contains_key(&key) && self.regions.len() >= MAX_REGIONS {
            self.regions.pop_first();
        }
        self.regions.entry(key).or_default()
    }

    /// Records a fault on the page of `va` and returns the window to map:
    /// the largest aligned subtree around it whose faulted-or-resident
    /// pages are more than `pct` % of it (at least the page), less the runs
    /// of resident pages at either end (mapped already; mapping them again
    /// would double a sequential stream's work).
    pub(super) fn window(&mut self, va: u64, pct: u8) -> (u64, u64) {
        let idx = (va % LEAF_2M) / PAGE_SIZE;
        let region = va - va % LEAF_2M;
        let bits = self.region(va);
        let set = |bits: &Bits, p: u64| bits[(p / 64) as usize] & (1 << (p % 64)) != 0;
        bits[(idx / 64) as usize] |= 1 << (idx % 64);
        let mut best = 1;
        let mut len = 2;
        while len <= PAGES {
            let base = idx & !(len - 1);
            if count(bits, base, len) * 100 > u64::from(pct) * len {
                best = len;
            }
            len *= 2;
        }
        let (mut lo, mut hi) = (idx & !(best - 1), (idx & !(best - 1)) + best);
        // Whole words of resident pages at a time: guest kernel loops stay
        // short.
        while lo < idx && set(bits, lo) {
            lo += if lo % 64 == 0 && lo + 64 <= idx && bits[(lo / 64) as usize] == !0 {
                64
            } else {
                1
            };
        }
        while hi - 1 > idx && set(bits, hi - 1) {
            hi -= if hi % 64 == 0 && hi - 64 > idx && bits[((hi - 64) / 64) as usize] == !0 {
                64
            } else {
                1
            };
        }
        (region + lo * PAGE_SIZE, region + hi * PAGE_SIZE)
    }

    /// `[start, end)` was mapped (within one 2 MiB region).
    pub(super) fn mark(&mut self, start: u64, end: u64) {
        let base = start & !(LEAF_2M - 1);
        let last = (end - base).div_ceil(PAGE_SIZE).min(PAGES);
        let bits = self.region(start);
        for p in (start - base) / PAGE_SIZE..last {
            bits[(p / 64) as usize] |= 1 << (p % 64);
        }
    }

    /// `[start, end)` is no longer resident.
    pub(super) fn clear(&mut self, start: u64, end: u64) {
        if end <= start {
            return;
        }
        let (first, last) = (start / LEAF_2M, (end - 1) / LEAF_2M);
        let keys: alloc::vec::Vec<u64> =
            self.regions.range(first..=last).map(|(k, _)| *k).collect();
        for k in keys {
            let base = k * LEAF_2M;
            let (s, e) = (start.max(base), end.min(base + LEAF_2M));
            if s == base && e == base + LEAF_2M {
                self.regions.remove(&k);
                continue;
            }
            if let Some(bits) = self.regions.get_mut(&k) {
                for p in (s - base) / PAGE_SIZE..(e - base).div_ceil(PAGE_SIZE) {
                    bits[(p / 64) as usize] &= !(1 << (p % 64));
                }
            }
        }
    }

    /// Regions tracked.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.regions.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: u64 = 0x40_0000_0000;
    const P: u64 = PAGE_SIZE;

    /// The window's size, and that it holds the faulting page.
    fn size(d: &mut Density, va: u64, pct: u8) -> u64 {
        let (s, e) = d.window(va, pct);
        assert!(s <= va && va < e, "{va:#x} outside {s:#x}..{e:#x}");
        e - s
    }

    #[test]
    fn a_subtree_is_taken_only_above_the_threshold() {
        let mut d = Density::default();
        // One page of two is 50 %: not more than 51 % or 50 %, more than 49 %.
        assert_eq!(size(&mut d, R, 51), P);
        assert_eq!(size(&mut d, R + 8 * P, 50), P);
        assert_eq!(d.window(R + 16 * P, 49), (R + 16 * P, R + 18 * P));
        // Pages 20, 21, 22 of 20..24: 75 % > 51 %; 20 and 21 are resident,
        // so the window is 22..24.
        d.mark(R + 20 * P, R + 22 * P);
        assert_eq!(d.window(R + 22 * P, 51), (R + 22 * P, R + 24 * P));
        // 0 %: any subtree, so the whole region less its resident ends.
        let mut d = Density::default();
        assert_eq!(d.window(R + 100 * P, 0), (R, R + LEAF_2M));
        // 100 %: never beyond the page.
        assert_eq!(size(&mut d, R + 3 * P * 1000, 100), P);
    }

    #[test]
    fn a_sequential_stream_maps_each_page_once() {
        let mut d = Density::default();
        let mut next = 0;
        let mut windows = 0;
        while next < PAGES {
            let (s, e) = d.window(R + next * P, 51);
            assert_eq!(s, R + next * P, "page {next} remapped");
            d.mark(s, e);
            next = (e - R) / P;
            windows += 1;
        }
        // Wider windows as the region fills: fewer than a 64 KiB window's 32.
        assert!(windows < 32, "{windows} windows");
    }

    #[test]
    fn mapped_pages_count_and_invalidated_ones_stop_counting() {
        let mut d = Density::default();
        d.mark(R + 64 * P, R + 128 * P);
        // 64 of the 128 pages in 0..128, plus this one: 65/128 > 50 %; the
        // resident half is not mapped again.
        assert_eq!(d.window(R + 3 * P, 50), (R, R + 64 * P));
        d.clear(R + 64 * P, R + 128 * P);
        assert_eq!(size(&mut d, R + 5 * P, 50), P);
        d.clear(R, R + LEAF_2M);
        assert_eq!(d.len(), 0);
    }

    #[test]
    fn regions_are_bounded() {
        let mut d = Density::default();
        for i in 0..(MAX_REGIONS as u64 + 10) {
            d.window(R + i * LEAF_2M, 51);
        }
        assert_eq!(d.len(), MAX_REGIONS);
    }
}
