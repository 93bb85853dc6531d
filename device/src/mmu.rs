//! Device MMU: the 4-level page-table walker and the per-context TLB.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use faultline_abi::{
    level_shift, Access, ContextEntry, ContextFlags, Counter, FaultReason, Pte, Status,
    NUM_CONTEXTS, PAGE_SHIFT, PAGE_SIZE, PTE_ADDR_MASK, PTE_RESERVED_MASK, PT_ENTRIES, PT_LEVELS,
    VA_LIMIT,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::check::{CheckMode, Checker, CpuTables, Origin, Violation};
use crate::counters::Counters;
use crate::vram::Phys;

/// Default TLB entries per context, of each kind (4 KiB; larger), the
/// bound the spec promises unless the host configured another, see
/// `Config::tlb_entries`.
pub const TLB_CAPACITY: usize = 4096;
/// Most-recently-used large leaves checked before the map: COPY alternates
/// between a source and a destination leaf, so one entry is not enough.
const RECENT: usize = 4;

/// A successful translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// The guest-physical address, or with `vram` the offset in VRAM.
    pub addr: u64,
    /// Bytes from `addr` to the end of the leaf.
    pub avail: u64,
    /// The leaf has the VRAM aperture (`Pte::VRAM`).
    pub vram: bool,
}

impl Translation {
    /// Where the access goes.
    pub const fn phys(&self) -> Phys {
        Phys {
            addr: self.addr,
            vram: self.vram,
        }
    }
}

/// Leaf bits a TLB entry keeps: the permissions and the aperture.
const LEAF_BITS: Pte = Pte::VALID
    .union(Pte::WRITE)
    .union(Pte::ATOMIC)
    .union(Pte::VRAM);

/// Why a translation did not produce an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum XlateError {
    /// Replayable: the access must stall.
    #[error("page fault at {va:#x}: {reason:?}")]
    Fault { va: u64, reason: FaultReason },
    /// Not replayable: the command fails with this status.
    #[error("translation failed: {0:?}")]
    Fail(Status),
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    va: u64,
    size: u64,
    /// GPA, or with `Pte::VRAM` in `perms` the VRAM offset.
    gpa: u64,
    /// `LEAF_BITS` of the leaf.
    perms: Pte,
}

impl Entry {
    fn translate(&self, va: u64) -> Translation {
        let off = va - self.va;
        Translation {
            addr: self.gpa + off,
            avail: self.size - off,
            vram: self.perms.contains(Pte::VRAM),
        }
    }

    fn covers(&self, va: u64) -> bool {
        va.wrapping_sub(self.va) < self.size
    }
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.size != 0 && self.va < end && start < self.va + self.size
    }
}

/// Multiplicative hash for page-number keys; SipHash would dominate a TLB
/// hit. Keys have constant low bits (alignment + level) and a product's low
/// bits depend only on the input's low bits, so the high half is folded
/// down: hashbrown picks buckets from the low bits.
#[derive(Default)]
struct PageHasher(u64);
impl Hasher for PageHasher {
    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 32)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0 ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// Key: leaf-aligned VA with the level in the low bits.
fn key(va: u64, level: u32) -> u64 {
    (va & !((1u64 << level_shift(level)) - 1)) | u64::from(level)
}

/// Low bits of a page address: the 4 KiB entries keep flags there.
const IN_PAGE: u64 = PAGE_SIZE - 1;

/// One way of a 4 KiB set: a translation in two words.
#[derive(Debug, Clone, Copy, Default)]
struct CachedPage {
    /// Page VA | 1 when valid.
    tag: u64,
    /// Frame address | `LEAF_BITS` (all below bit 12).
    frame: u64,
}

impl CachedPage {
    fn entry(&self) -> Entry {
        Entry {
            va: self.tag & !IN_PAGE,
            size: PAGE_SIZE,
            gpa: self.frame & !IN_PAGE,
            perms: Pte::from_bits_truncate(self.frame & IN_PAGE),
        }
    }
}

/// Sets of the paging-structure cache, two ways each: 256 tables per
/// context, enough for the level-1 tables of 512 MiB of 4 KiB leaves.
const WALK_CACHE_SETS: usize = 128;

/// One cached table: the GPA of the table holding level-`level` entries
/// for the VAs `[base, base + span(level))`, where `span(level)` is the
/// reach of one level-`level + 1` entry.
#[derive(Debug, Clone, Copy, Default)]
struct CachedTable {
    /// `base | level` when valid (level 1..=3), 0 when empty.
    tag: u64,
    table: u64,
}

/// Reach of the table holding level-`level` entries (the span of the
/// entry one level up that points to it).
fn table_span(level: u32) -> u64 {
    1u64 << level_shift(level + 1)
}

fn table_tag(va: u64, level: u32) -> u64 {
    (va & !(table_span(level) - 1)) | u64::from(level)
}

/// The paging-structure cache of one context: tables reached through valid
/// non-leaf entries (docs/gpu-abi.md, "TLB and invalidation"), and the
/// context entry's root. Cleared and range-invalidated exactly when the
/// context's TLB is.
#[derive(Default)]
struct WalkCache {
    /// Root from a VALID context entry.
    root: Option<u64>,
    /// `WALK_CACHE_SETS` sets of two ways, most recent in way 0; allocated
    /// on first insert.
    sets: Vec<[CachedTable; 2]>,
}

fn table_set(tag: u64) -> usize {
    // The tag's low bits are the level and its middle bits are the same
    // for every block of one table: hash the whole tag.
    (tag.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize % WALK_CACHE_SETS
}

impl WalkCache {
    /// The deepest cached table on `va`'s walk: (table GPA, level of its
    /// entries); level 4 is the cached root.
    fn lookup(&self, va: u64) -> Option<(u64, u32)> {
        if !self.sets.is_empty() {
            for level in 1..PT_LEVELS {
                let tag = table_tag(va, level);
                for w in &self.sets[table_set(tag)] {
                    if w.tag == tag {
                        return Some((w.table, level));
                    }
                }
            }
        }
        self.root.map(|r| (r, PT_LEVELS))
    }

    fn insert(&mut self, va: u64, level: u32, table: u64) {
        if self.sets.is_empty() {
            self.sets = vec![[CachedTable::default(); 2]; WALK_CACHE_SETS];
        }
        let tag = table_tag(va, level);
        let set = &mut self.sets[table_set(tag)];
        let new = CachedTable { tag, table };
        if set[0].tag != tag {
            set[1] = set[0];
        }
        set[0] = new;
    }

    /// Forget the entry that gave `(table, level)` for `va`.
    fn remove(&mut self, va: u64, level: u32) {
        if level == PT_LEVELS {
            self.root = None;
            return;
        }
        let tag = table_tag(va, level);
        if let Some(set) = self.sets.get_mut(table_set(tag)) {
            for w in set.iter_mut() {
                if w.tag == tag {
                    *w = CachedTable::default();
                }
            }
        }
    }

    fn clear(&mut self) {
        self.root = None;
        self.sets.fill([CachedTable::default(); 2]);
    }

    /// Drop every table whose reach overlaps `[start, end)`; the root
    /// reaches everything.
    fn invalidate_range(&mut self, start: u64, end: u64) {
        self.root = None;
        for w in self.sets.iter_mut().flatten() {
            if w.tag == 0 {
                continue;
            }
            let level = (w.tag & IN_PAGE) as u32;
            let base = w.tag & !IN_PAGE;
            if base < end && start < base.saturating_add(table_span(level)) {
                *w = CachedTable::default();
            }
        }
    }

    fn len(&self) -> usize {
        usize::from(self.root.is_some()) + self.sets.iter().flatten().filter(|w| w.tag != 0).count()
    }
}

/// A context's 4 KiB TLB entries, borrowed for an engine's per-page loop
/// ([`Mmu::hits`]): a hit costs one set's two compares, with the
/// context, the checker and the set mask looked up once. `get` counts
/// nothing: the caller adds one `Accesses` and one `TlbHits` per hit
/// ([`Mmu::count_hits`]) before its slice ends; on `None` it calls
/// `translate_for`, which walks, counts and reports. A VA at or above
/// `VA_LIMIT` matches no entry (only walks insert, and they refuse such
/// VAs).
#[derive(Clone, Copy)]
pub struct PageHits<'a> {
    pages: &'a [[CachedPage; 2]],
    mask: usize,
}

impl PageHits<'_> {
    /// `va`'s translation if a 4 KiB entry grants `access`.
    #[inline(always)]
    pub fn get(&self, va: u64, access: Access) -> Option<Translation> {
        self.get_need(va, access.required())
    }

    #[inline(always)]
    fn get_need(&self, va: u64, need: Pte) -> Option<Translation> {
        let set = self.pages.get((va >> PAGE_SHIFT) as usize & self.mask)?;
        let tag = (va & !IN_PAGE) | 1;
        let need = need.bits();
        for w in set {
            if w.tag == tag && w.frame & need == need {
                let off = va & IN_PAGE;
                return Some(Translation {
                    addr: (w.frame & !IN_PAGE) | off,
                    avail: PAGE_SIZE - off,
                    vram: w.frame & Pte::VRAM.bits() != 0,
                });
            }
        }
        None
    }
}

struct Tlb {
    /// Large leaves used last (a subset of `map`).
    recent: [Option<Entry>; RECENT],
    /// The 4 KiB entries: `page_sets` sets of two ways, most recent in way
    /// 0, indexed by page number so a COPY's source and destination
    /// streams (same index, different tags) coexist and sequential pages
    /// touch sequential cache lines. Allocated on first insert: most
    /// contexts are never used.
    pages: Vec<[CachedPage; 2]>,
    /// A power of two, at most half the capacity (at least 1).
    page_sets: usize,
    next_recent: usize,
    /// The 2 MiB and 1 GiB leaves.
    map: HashMap<u64, Entry, BuildHasherDefault<PageHasher>>,
    /// Insertion order of `map` for eviction; may hold keys already
    /// invalidated, which eviction skips.
    order: VecDeque<u64>,
    capacity: usize,
    /// Upper-level tables, so a miss reads one entry instead of six.
    walk: WalkCache,
}

impl Default for Tlb {
    fn default() -> Self {
        Self::with_capacity(TLB_CAPACITY)
    }
}

impl Tlb {
    fn with_capacity(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            recent: [None; RECENT],
            pages: Vec::new(),
            // Two ways per set, so at most `capacity` 4 KiB entries (one
            // way used when the capacity is 1).
            page_sets: if capacity < 2 {
                1
            } else {
                1 << (capacity / 2).ilog2()
            },
            next_recent: 0,
            map: HashMap::default(),
            order: VecDeque::new(),
            capacity,
            walk: WalkCache::default(),
        }
    }

    fn page_set(&self, va: u64) -> usize {
        (va >> PAGE_SHIFT) as usize & (self.page_sets - 1)
    }

    fn hits(&self) -> PageHits<'_> {
        PageHits {
            pages: &self.pages,
            mask: self.page_sets - 1,
        }
    }

    /// The common case, kept small enough to inline: a 4 KiB entry that
    /// grants `need`.
    #[inline(always)]
    fn page_hit(&self, va: u64, need: Pte) -> Option<Translation> {
        self.hits().get_need(va, need)
    }

    fn lookup(&mut self, va: u64) -> Option<Entry> {
        if let Some(set) = self.pages.get(self.page_set(va)) {
            let tag = (va & !IN_PAGE) | 1;
            for w in set {
                if w.tag == tag {
                    return Some(w.entry());
                }
            }
        }
        if self.map.is_empty() {
            return None;
        }
        for e in self.recent.iter().flatten() {
            if e.covers(va) {
                return Some(*e);
            }
        }
        for level in 2..=3 {
            if let Some(e) = self.map.get(&key(va, level)) {
                let e = *e;
                self.remember(e);
                return Some(e);
            }
        }
        None
    }

    /// Insert a 4 KiB entry; true if it evicted one.
    fn insert_page(&mut self, e: Entry) -> bool {
        if self.pages.is_empty() {
            self.pages = vec![[CachedPage::default(); 2]; self.page_sets];
        }
        let one_way = self.capacity < 2;
        let i = self.page_set(e.va);
        let set = &mut self.pages[i];
        let new = CachedPage {
            tag: e.va | 1,
            frame: e.gpa | e.perms.bits(),
        };
        if set[0].tag == new.tag || one_way {
            let evicted = set[0].tag & 1 != 0 && set[0].tag != new.tag;
            set[0] = new;
            return evicted;
        }
        // A re-walk may have found different permissions: the old copy
        // goes, the new one is most recent.
        let evicted = set[1].tag & 1 != 0 && set[1].tag != new.tag;
        set[1] = set[0];
        set[0] = new;
        evicted
    }

    fn remember(&mut self, e: Entry) {
        self.recent[self.next_recent] = Some(e);
        self.next_recent = (self.next_recent + 1) % RECENT;
    }

    fn insert(&mut self, e: Entry, level: u32) -> bool {
        if level == 1 {
            // A large leaf this page was part of before must not shadow it
            // (lookups try pages first, but `recent` before `map`).
            self.forget_recent(e.va, e.va + e.size);
            return self.insert_page(e);
        }
        let k = key(e.va, level);
        let mut evicted = false;
        if self.map.insert(k, e).is_none() {
            self.order.push_back(k);
            while self.map.len() > self.capacity {
                let Some(old) = self.order.pop_front() else {
                    break;
                };
                if let Some(victim) = self.map.remove(&old) {
                    evicted = true;
                    self.forget_recent(victim.va, victim.va + victim.size);
                }
            }
            // Stale keys pile up in `order` under invalidation churn: rebuild.
            if self.order.len() > 4 * self.capacity {
                let map = &self.map;
                self.order.retain(|k| map.contains_key(k));
            }
        }
        // A re-walk may have found different permissions, or this leaf
        // replaced smaller ones: drop the old copies so lookups see it.
        self.forget(e.va, e.va + e.size);
        self.remember(e);
        evicted
    }

    fn forget_recent(&mut self, start: u64, end: u64) {
        for slot in self.recent.iter_mut() {
            if slot.is_some_and(|e| e.overlaps(start, end)) {
                *slot = None;
            }
        }
    }

    /// Drop cached leaves overlapping `[start, end)` outside `map`: the
    /// 4 KiB entries and the copies in `recent`.
    fn forget(&mut self, start: u64, end: u64) {
        self.forget_recent(start, end);
        if self.pages.is_empty() {
            return;
        }
        let hit = |w: &CachedPage| w.tag & 1 != 0 && w.entry().overlaps(start, end);
        let pages = (end.saturating_sub(start) >> PAGE_SHIFT).saturating_add(1);
        if pages < self.page_sets as u64 {
            let mut va = start & !IN_PAGE;
            while va < end {
                let i = self.page_set(va);
                for w in self.pages[i].iter_mut() {
                    if hit(w) {
                        *w = CachedPage::default();
                    }
                }
                va += PAGE_SIZE;
            }
        } else {
            for w in self.pages.iter_mut().flatten() {
                if hit(w) {
                    *w = CachedPage::default();
                }
            }
        }
    }

    /// Leaves held: 4 KiB entries and large ones.
    fn len(&self) -> usize {
        self.map.len()
            + self
                .pages
                .iter()
                .flatten()
                .filter(|w| w.tag & 1 != 0)
                .count()
    }

    fn clear(&mut self) {
        self.recent = [None; RECENT];
        self.pages.fill([CachedPage::default(); 2]);
        self.map.clear();
        self.order.clear();
        self.walk.clear();
    }

    fn invalidate_range(&mut self, start: u64, end: u64) {
        self.forget(start, end);
        self.map.retain(|_, e| !e.overlaps(start, end));
        self.walk.invalidate_range(start, end);
    }
}

/// The MMU: context table base plus one TLB per context.
pub struct Mmu {
    ctx_table: u64,
    tlbs: Vec<Tlb>,
    /// Bytes of VRAM: a VRAM leaf must lie inside.
    vram_size: u64,
    /// The coherence checker, `None` when off (the one branch a
    /// translation pays for it).
    checker: Option<Box<Checker>>,
}

impl Default for Mmu {
    fn default() -> Self {
        Self::new()
    }
}

impl Mmu {
    pub fn new() -> Self {
        Self::with_tlb_capacity(TLB_CAPACITY)
    }

    /// An MMU whose per-context TLBs hold at most `entries` leaves (at
    /// least 1).
    pub fn with_tlb_capacity(entries: usize) -> Self {
        Self {
            ctx_table: 0,
            tlbs: (0..NUM_CONTEXTS)
                .map(|_| Tlb::with_capacity(entries))
                .collect(),
            vram_size: 0,
            checker: None,
        }
    }

    /// The device's VRAM size, which bounds every VRAM leaf.
    pub fn set_vram_size(&mut self, bytes: u64) {
        self.vram_size = bytes;
        self.invalidate_all();
    }

    /// Turn the coherence checker on or off (`crate::check`); `tables`
    /// `None` walks x86-64 tables in the memory translations use. Starts
    /// afresh: pages reported before are reported again.
    pub fn set_checker(&mut self, mode: CheckMode, tables: Option<Arc<dyn CpuTables>>) {
        self.checker = Checker::new(mode, tables);
    }

    /// Violation reports not yet handed to the host (each (context, page)
    /// once).
    pub fn take_coherence_reports(&mut self) -> Vec<Violation> {
        self.checker
            .as_deref_mut()
            .map_or_else(Vec::new, Checker::take_reports)
    }

    pub fn set_context_table(&mut self, gpa: u64) {
        self.ctx_table = gpa;
        self.invalidate_all();
    }

    pub fn invalidate_all(&mut self) {
        self.tlbs.iter_mut().for_each(Tlb::clear);
    }

    pub fn invalidate_context(&mut self, ctx: u32) {
        if let Some(t) = self.tlbs.get_mut(ctx as usize) {
            t.clear();
        }
    }

    /// Drop entries of `ctx` overlapping `[start, end)`.
    pub fn invalidate_range(&mut self, ctx: u32, start: u64, end: u64) {
        if let Some(t) = self.tlbs.get_mut(ctx as usize) {
            t.invalidate_range(start, end);
        }
    }

    /// Number of cached entries of `ctx` (for tests and diagnostics).
    pub fn tlb_len(&self, ctx: u32) -> usize {
        self.tlbs.get(ctx as usize).map_or(0, Tlb::len)
    }

    /// Number of tables (the root included) in the paging-structure cache
    /// of `ctx` (for tests and diagnostics).
    pub fn walk_cache_len(&self, ctx: u32) -> usize {
        self.tlbs.get(ctx as usize).map_or(0, |t| t.walk.len())
    }

    /// Translate `va` in context `ctx` for `access`, on the host's behalf
    /// (`translate_for` with `Origin::HOST`).
    pub fn translate<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        counters: &mut Counters,
        ctx: u32,
        va: u64,
        access: Access,
    ) -> Result<Translation, XlateError> {
        self.translate_for(mem, counters, ctx, va, access, Origin::HOST)
    }

    /// The TLB-hit path of `translate_for` for an engine's per-page loop:
    /// the 4 KiB entries of `ctx`, `None` when the checker is on (every
    /// translation is checked then) or `ctx` is out of range. See
    /// [`PageHits`].
    pub fn hits(&self, ctx: u32) -> Option<PageHits<'_>> {
        if self.checker.is_some() {
            return None;
        }
        self.tlbs.get(ctx as usize).map(Tlb::hits)
    }

    /// Count `n` translations served by [`PageHits::get`].
    pub fn count_hits(counters: &mut Counters, n: u64) {
        counters.add(Counter::Accesses, n);
        counters.add(Counter::TlbHits, n);
    }

    /// Translate `va` in context `ctx` for `access` by `origin` (named in
    /// coherence reports). With the checker on, every translation returned,
    /// TLB hits included, was checked against the CPU's table and ends at
    /// its 4 KiB page, so a caller running across a leaf checks each page.
    pub fn translate_for<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        counters: &mut Counters,
        ctx: u32,
        va: u64,
        access: Access,
        origin: Origin,
    ) -> Result<Translation, XlateError> {
        let t = self.lookup(mem, counters, ctx, va, access)?;
        if self.checker.is_none() {
            return Ok(t);
        }
        self.recheck(mem, counters, ctx, va, access, t.phys(), origin)?;
        Ok(Translation {
            avail: t.avail.min(PAGE_SIZE - (va & IN_PAGE)),
            ..t
        })
    }

    /// Check `at`, the translation of `va`, against the CPU's table as it
    /// is now: `translate_for` does for each translation it returns, and an
    /// engine again for an access that held its
    /// translation since (fault injection's `engine_stall_us`) and uses it
    /// only now. `Err` under `Fatal`: the access must not happen. A VRAM
    /// page is compared with the CPU's device-private entry for `va`.
    #[allow(clippy::too_many_arguments)]
    pub fn recheck<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        counters: &mut Counters,
        ctx: u32,
        va: u64,
        access: Access,
        at: Phys,
        origin: Origin,
    ) -> Result<(), XlateError> {
        let Some(c) = self.checker.as_deref_mut() else {
            return Ok(());
        };
        c.check(mem, counters, self.ctx_table, ctx, va, access, at, origin)
            .map_err(|()| XlateError::Fail(Status::CoherenceViolation))
    }

    #[inline(always)]
    fn lookup<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        counters: &mut Counters,
        ctx: u32,
        va: u64,
        access: Access,
    ) -> Result<Translation, XlateError> {
        counters.inc(Counter::Accesses);
        if va >= VA_LIMIT {
            return Err(XlateError::Fail(Status::BadAddress));
        }
        let Some(tlb) = self.tlbs.get_mut(ctx as usize) else {
            return Err(XlateError::Fail(Status::InvalidContext));
        };
        let need = access.required();
        if let Some(t) = tlb.page_hit(va, need) {
            counters.inc(Counter::TlbHits);
            return Ok(t);
        }
        if let Some(e) = tlb.lookup(va) {
            if e.perms.contains(need) {
                counters.inc(Counter::TlbHits);
                return Ok(e.translate(va));
            }
        }
        counters.inc(Counter::TlbMisses);
        counters.inc(Counter::Walks);
        let vram = self.vram_size;
        let (e, level) = walk(mem, self.ctx_table, ctx, va, vram, &mut tlb.walk)?;
        // Cache the leaf even when it lacks permission: a later access that
        // it does allow can use it.
        if tlb.insert(e, level) {
            counters.inc(Counter::TlbEvictions);
        }
        if level == 1 {
            let evicted = prefetch(mem, tlb, va, vram);
            counters.add(Counter::TlbEvictions, evicted);
        }
        if !e.perms.contains(need) {
            let reason = if !e.perms.contains(Pte::WRITE) {
                FaultReason::WriteProtect
            } else {
                FaultReason::AtomicProtect
            };
            return Err(XlateError::Fault { va, reason });
        }
        Ok(e.translate(va))
    }
}

fn read_u64<M: GuestMemoryBackend>(mem: &M, gpa: u64) -> Result<u64, XlateError> {
    // The guest may update entries concurrently: one atomic 8-byte load
    // never sees a torn PTE.
    if !gpa.is_multiple_of(8) {
        return Err(XlateError::Fail(Status::MemoryError));
    }
    // `get_slice` + a slice load is one region lookup; `Bytes::load` on the
    // whole memory goes through the multi-region slice iterator, which cost
    // more than the rest of the walk.
    mem.get_slice(GuestAddress(gpa), 8)
        .and_then(|s| s.load::<u64>(0, Ordering::Acquire).map_err(Into::into))
        .map(u64::from_le)
        .map_err(|_| XlateError::Fail(Status::MemoryError))
}

/// 4 KiB leaves whose entries share a cache line with the one just walked.
const PREFETCH: u64 = 8;

/// After a walk to the 4 KiB leaf of `va`, caches the valid leaves beside it
/// in the same level-1 table (the entries in its 64-byte line), as GPU and
/// IOMMU walkers do: a stream of misses then walks once per 8 pages.
/// Returns the entries this evicted. A leaf the walk would refuse (a
/// reserved bit, VRAM outside `vram_size`) is left for the walk to report.
fn prefetch<M: GuestMemoryBackend>(mem: &M, tlb: &mut Tlb, va: u64, vram_size: u64) -> u64 {
    let Some((table, 1)) = tlb.walk.lookup(va) else {
        return 0;
    };
    let idx = (va >> PAGE_SHIFT) & (PT_ENTRIES - 1);
    let first = idx & !(PREFETCH - 1);
    let mut evicted = 0;
    for j in first..first + PREFETCH {
        if j == idx {
            continue;
        }
        let Ok(bits) = read_u64(mem, table + j * 8) else {
            return evicted;
        };
        let pte = Pte::from_bits_retain(bits);
        if !pte.contains(Pte::VALID)
            || bits & PTE_RESERVED_MASK != 0
            || leaf_check(pte, PAGE_SIZE, vram_size).is_err()
        {
            continue;
        }
        let e = Entry {
            va: (va & !((PT_ENTRIES << PAGE_SHIFT) - 1)) | (j << PAGE_SHIFT),
            size: PAGE_SIZE,
            gpa: bits & PTE_ADDR_MASK,
            perms: pte & LEAF_BITS,
        };
        evicted += u64::from(tlb.insert(e, 1));
    }
    evicted
}

/// Walk the page table of `ctx` for `va` (< 2^48), starting from the
/// deepest table `cache` holds for it. Returns the leaf and its level.
/// A walk from a cached table that does not end in a leaf is redone from
/// the context entry: a table the guest has unlinked since it was cached
/// may still give a stale leaf until invalidated (docs/gpu-abi.md), but
/// never a fault or an error the tables as they are now would not give.
fn walk<M: GuestMemoryBackend>(
    mem: &M,
    ctx_table: u64,
    ctx: u32,
    va: u64,
    vram_size: u64,
    cache: &mut WalkCache,
) -> Result<(Entry, u32), XlateError> {
    if let Some((table, level)) = cache.lookup(va) {
        if let Ok(leaf) = walk_from(mem, table, level, va, vram_size, cache) {
            return Ok(leaf);
        }
        cache.remove(va, level);
    }
    let root = read_root(mem, ctx_table, ctx)?;
    cache.root = Some(root);
    walk_from(mem, root, PT_LEVELS, va, vram_size, cache)
}

/// The checks a leaf of `size` bytes passes before the device uses it: its
/// address aligned to its size, and a VRAM leaf inside VRAM.
fn leaf_check(pte: Pte, size: u64, vram_size: u64) -> Result<(), XlateError> {
    let addr = pte.bits() & PTE_ADDR_MASK;
    if addr & (size - 1) != 0 {
        return Err(XlateError::Fail(Status::BadPte));
    }
    if pte.contains(Pte::VRAM) && addr.checked_add(size).is_none_or(|end| end > vram_size) {
        return Err(XlateError::Fail(Status::BadVram));
    }
    Ok(())
}

/// The root of a VALID context entry `ctx`.
fn read_root<M: GuestMemoryBackend>(mem: &M, ctx_table: u64, ctx: u32) -> Result<u64, XlateError> {
    let fail = XlateError::Fail;
    let ent = ctx_table
        .checked_add(u64::from(ctx) * ContextEntry::SIZE as u64)
        .ok_or(fail(Status::MemoryError))?;
    let root_at = ent
        .checked_add(ContextEntry::ROOT_OFFSET as u64)
        .ok_or(fail(Status::MemoryError))?;
    let root = read_u64(mem, root_at)?;
    // The root is 8-aligned (read_u64 checked), so the flags word is
    // aligned for an atomic load.
    let flags_at = ent
        .checked_add(ContextEntry::FLAGS_OFFSET as u64)
        .ok_or(fail(Status::MemoryError))?;
    let flags = mem
        .get_slice(GuestAddress(flags_at), 4)
        .and_then(|s| s.load::<u32>(0, Ordering::Acquire).map_err(Into::into))
        .map(u32::from_le)
        .map_err(|_| fail(Status::MemoryError))?;
    if !ContextFlags::from_bits_retain(flags).contains(ContextFlags::VALID) {
        return Err(fail(Status::InvalidContext));
    }
    if root & !PTE_ADDR_MASK != 0 {
        return Err(fail(Status::BadPte));
    }
    Ok(root)
}

/// Walk from `table`, which holds level-`top` entries for `va`, caching
/// every table the walk reaches. The loop runs at most `PT_LEVELS` times
/// whatever the table contents, so self-referencing tables cannot make it
/// spin.
fn walk_from<M: GuestMemoryBackend>(
    mem: &M,
    mut table: u64,
    top: u32,
    va: u64,
    vram_size: u64,
    cache: &mut WalkCache,
) -> Result<(Entry, u32), XlateError> {
    let fail = XlateError::Fail;
    for level in (1..=top.min(PT_LEVELS)).rev() {
        let shift = level_shift(level);
        let idx = (va >> shift) & (PT_ENTRIES - 1);
        let pte = Pte::from_bits_retain(read_u64(mem, table + idx * 8)?);
        if !pte.contains(Pte::VALID) {
            return Err(XlateError::Fault {
                va,
                reason: FaultReason::NotPresent,
            });
        }
        if pte.bits() & PTE_RESERVED_MASK != 0 {
            return Err(fail(Status::BadPte));
        }
        let addr = pte.bits() & PTE_ADDR_MASK;
        let is_leaf = level == 1 || (pte.contains(Pte::LEAF) && level < PT_LEVELS);
        if pte.contains(Pte::LEAF) && level == PT_LEVELS {
            return Err(fail(Status::BadPte));
        }
        if is_leaf {
            let size = 1u64 << shift;
            leaf_check(pte, size, vram_size)?;
            let perms = pte & LEAF_BITS;
            return Ok((
                Entry {
                    va: va & !(size - 1),
                    size,
                    gpa: addr,
                    perms,
                },
                level,
            ));
        }
        if pte.contains(Pte::VRAM) {
            // Page tables live in system memory only.
            return Err(fail(Status::BadPte));
        }
        table = addr;
        cache.insert(va, level - 1, table);
    }
    // Unreachable by construction (level 1 is always a leaf), but a
    // hostile-input path must not panic.
    Err(fail(Status::BadPte))
}
