//! Physical frame allocator: one bit per 4 KiB frame of RAM (1 = free).
//!
//! A bitmap rather than a free list so that a double free or a free of a
//! frame we never handed out is caught on the spot, and so the free count is
//! exact: tests compare it before and after to find leaks.

use x86_64::PhysAddr;

use crate::boot::pvh::{BootInfo, E820_RAM};
use crate::sync::Mutex;

pub const FRAME_SIZE: u64 = 4096;
/// Everything below 1 MiB is legacy BIOS land (IVT, EBDA, option ROMs, and
/// QEMU's start_info): never hand it out.
const LOW_LIMIT: u64 = 1 << 20;
/// The bitmap is reached through the boot identity map.
const IDENTITY_LIMIT: u64 = 4 << 30;

pub struct FrameAllocator {
    bitmap: &'static mut [u64],
    frames: u64,
    free: u64,
    /// Lowest word that may contain a free bit: keeps allocations low (page
    /// tables built before the direct map must be identity-reachable).
    hint: usize,
    bitmap_range: (u64, u64),
    /// One bit per frame, set when the frame is first handed out; only
    /// kept (and only meaningful) when RAM came zeroed (`ram=zero`): a
    /// clear bit then means the frame still holds the hypervisor's zeros.
    used_since_boot: Option<&'static mut [u64]>,
    /// Whether the last allocation was all pristine frames (see
    /// `used_since_boot`); read under the same lock by `alloc_zeroed`.
    last_pristine: bool,
    /// `alloc_zeroed_2m` prefers blocks never used since boot (on unless a
    /// test turns it off to exercise the zeroing of a reused block).
    prefer_pristine_2m: bool,
}

static FRAMES: Mutex<Option<FrameAllocator>> = Mutex::new(None);

#[derive(Debug, Clone, Copy)]
pub struct FrameStats {
    pub free: u64,
    pub total_usable: u64,
}

static TOTAL_USABLE: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// Frames `[first, last)` as bitmap words: up to two words only partly
/// inside (index and mask of the bits inside) and the run of words entirely
/// inside.
struct Words {
    parts: [Option<(usize, u64)>; 2],
    whole: core::ops::Range<usize>,
}

fn words_of(first: u64, last: u64) -> Words {
    let mut w = Words {
        parts: [None, None],
        whole: 0..0,
    };
    if first >= last {
        return w;
    }
    // Bits lo..hi of one word, 0 <= lo < hi <= 64.
    let bits = |lo: u64, hi: u64| (u64::MAX >> (64 - (hi - lo))) << lo;
    let (fw, lw) = ((first / 64) as usize, ((last - 1) / 64) as usize);
    if fw == lw {
        w.parts[0] = Some((fw, bits(first % 64, (last - 1) % 64 + 1)));
        return w;
    }
    let (mut lo, mut hi) = (fw, lw + 1);
    if !first.is_multiple_of(64) {
        w.parts[0] = Some((fw, bits(first % 64, 64)));
        lo += 1;
    }
    if !last.is_multiple_of(64) {
        w.parts[1] = Some((lw, bits(0, last % 64)));
        hi -= 1;
    }
    w.whole = lo..hi.max(lo);
    w
}

/// Stores `value` into every word with one `rep stosq` (~1,700 cycles per
/// word under PVM, against several emulated instructions per word for a
/// loop).
fn fill(words: &mut [u64], value: u64) {
    // SAFETY: rep stosq writes exactly `words.len()` qwords from the
    // slice's start (DF is clear, as the ABI guarantees), all inside the
    // slice we hold mutably.
    unsafe {
        core::arch::asm!(
            "rep stosq",
            inout("rcx") words.len() => _,
            inout("rdi") words.as_mut_ptr() => _,
            in("rax") value,
            options(nostack, preserves_flags)
        );
    }
}

/// Picks a place for the bitmap: RAM, above 1 MiB, below 4 GiB, clear of
/// every range in `avoid`.
fn place_bitmap(boot: &BootInfo, bytes: u64, avoid: &[(u64, u64)]) -> Option<u64> {
    for e in boot.memmap().iter().filter(|e| e.kind == E820_RAM) {
        let mut cand = align_up(e.addr.max(LOW_LIMIT), FRAME_SIZE);
        'retry: loop {
            let end = cand.checked_add(bytes)?;
            if end > e.end() || end > IDENTITY_LIMIT {
                break;
            }
            // Also keep off any non-RAM entry overlapping this RAM entry.
            let clash = avoid
                .iter()
                .copied()
                .chain(
                    boot.memmap()
                        .iter()
                        .filter(|r| r.kind != E820_RAM)
                        .map(|r| (r.addr, r.end())),
                )
                .find(|&r| overlaps((cand, end), r));
            match clash {
                Some(r) => {
                    cand = align_up(r.1, FRAME_SIZE);
                    continue 'retry;
                }
                None => return Some(cand),
            }
        }
    }
    None
}

impl FrameAllocator {
    fn set_free(&mut self, idx: u64) {
        self.bitmap[(idx / 64) as usize] |= 1 << (idx % 64);
    }

    fn set_used(&mut self, idx: u64) {
        self.bitmap[(idx / 64) as usize] &= !(1 << (idx % 64));
    }

    fn is_free(&self, idx: u64) -> bool {
        self.bitmap[(idx / 64) as usize] & (1 << (idx % 64)) != 0
    }

    /// Sets frames `[first, last)` free or used: masks for the partial words
    /// at the ends, one `rep stosq` for the whole words between (under an
    /// instruction-emulating hypervisor every instruction of a per-frame or
    /// per-word loop costs ~2,000 cycles).
    fn set_range(&mut self, first: u64, last: u64, free: bool) {
        let value = if free { u64::MAX } else { 0 };
        let w = words_of(first, last);
        for (i, mask) in w.parts.into_iter().flatten() {
            self.bitmap[i] = (self.bitmap[i] & !mask) | (value & mask);
        }
        fill(&mut self.bitmap[w.whole], value);
    }

    /// Marks every frame touching `[start, end)` used; returns how many of
    /// them were free.
    fn reserve(&mut self, start: u64, end: u64) -> u64 {
        let first = (start / FRAME_SIZE).min(self.frames);
        let last = end.div_ceil(FRAME_SIZE).min(self.frames);
        let w = words_of(first, last);
        let mut taken = 0;
        for (i, mask) in w.parts.into_iter().flatten() {
            taken += u64::from((self.bitmap[i] & mask).count_ones());
            self.bitmap[i] &= !mask;
        }
        for word in &mut self.bitmap[w.whole] {
            taken += u64::from(word.count_ones());
            *word = 0;
        }
        taken
    }

    /// Records that `[first, first + n)` were handed out; returns whether
    /// they all still held the hypervisor's zeros (false if RAM was not
    /// declared zeroed).
    fn mark_used(&mut self, first: u64, n: u64) -> bool {
        let Some(used) = self.used_since_boot.as_deref_mut() else {
            return false;
        };
        if n == 1 {
            // Page tables and single frames, most of boot's allocations:
            // one bit without the masks of `words_of`.
            let (i, m) = ((first / 64) as usize, 1u64 << (first % 64));
            let pristine = used[i] & m == 0;
            used[i] |= m;
            return pristine;
        }
        let w = words_of(first, first + n);
        let mut pristine = true;
        for (i, mask) in w.parts.into_iter().flatten() {
            pristine &= used[i] & mask == 0;
            used[i] |= mask;
        }
        for word in &mut used[w.whole] {
            pristine &= *word == 0;
            *word = u64::MAX;
        }
        pristine
    }

    fn recount(&mut self) -> u64 {
        self.bitmap.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    fn alloc_low(&mut self) -> Option<PhysAddr> {
        for w in self.hint..self.bitmap.len() {
            let word = self.bitmap[w];
            if word != 0 {
                let idx = w as u64 * 64 + u64::from(word.trailing_zeros());
                self.set_used(idx);
                self.free -= 1;
                self.hint = w;
                self.last_pristine = self.mark_used(idx, 1);
                return Some(PhysAddr::new(idx * FRAME_SIZE));
            }
        }
        None
    }

    /// [`FrameAllocator::alloc_low`] for `out.len()` frames: a word of the
    /// bitmap at a time (its free bits taken in order, the used-since-boot
    /// word read and written once), each slot the frame's address with
    /// bit 0 set while it still held the hypervisor's zeros. Returns how
    /// many it got.
    fn alloc_low_batch(&mut self, out: &mut [u64]) -> usize {
        let mut k = 0;
        let mut w = self.hint;
        while k < out.len() && w < self.bitmap.len() {
            let mut word = self.bitmap[w];
            if word == 0 {
                w += 1;
                continue;
            }
            let used = self.used_since_boot.as_deref().map(|u| u[w]);
            let mut taken = 0u64;
            while word != 0 && k < out.len() {
                let bit = word.trailing_zeros();
                let m = 1u64 << bit;
                word &= !m;
                taken |= m;
                let pristine = used.is_some_and(|u| u & m == 0);
                out[k] = ((w as u64 * 64 + u64::from(bit)) * FRAME_SIZE) | u64::from(pristine);
                k += 1;
            }
            self.bitmap[w] = word;
            if let Some(u) = self.used_since_boot.as_deref_mut() {
                u[w] |= taken;
            }
            self.free -= u64::from(taken.count_ones());
            self.hint = w;
        }
        k
    }

    fn alloc_high(&mut self) -> Option<PhysAddr> {
        for w in (self.hint..self.bitmap.len()).rev() {
            let word = self.bitmap[w];
            if word != 0 {
                let idx = w as u64 * 64 + 63 - u64::from(word.leading_zeros());
                self.set_used(idx);
                self.free -= 1;
                self.last_pristine = self.mark_used(idx, 1);
                return Some(PhysAddr::new(idx * FRAME_SIZE));
            }
        }
        None
    }

    /// A free, 2 MiB-aligned run of 512 frames, searched from the top so low
    /// memory stays available for single frames.
    /// `prefer_pristine`: with `ram=zero`, a block never used since boot
    /// first (only callers that zero want that).
    fn alloc_2m(&mut self, prefer_pristine: bool) -> Option<PhysAddr> {
        const WORDS: usize = 512 / 64;
        // Zeroing 2 MiB costs ~170 ms where the kernel is emulated, so with
        // `ram=zero` a block never used since boot is preferred; the first
        // free block (from the top) is the fallback.
        let used = self.used_since_boot.as_deref().filter(|_| prefer_pristine);
        let mut fallback = None;
        let mut found = None;
        let mut w = self.bitmap.len() / WORDS * WORDS;
        while w >= WORDS {
            w -= WORDS;
            if self.bitmap[w..w + WORDS].iter().all(|&x| x == u64::MAX) {
                match used {
                    Some(u) if u[w..w + WORDS].iter().any(|&x| x != 0) => {
                        fallback.get_or_insert(w);
                    }
                    _ => {
                        found = Some(w);
                        break;
                    }
                }
            }
        }
        let w = found.or(fallback)?;
        self.bitmap[w..w + WORDS].fill(0);
        self.free -= 512;
        self.last_pristine = self.mark_used(w as u64 * 64, 512);
        Some(PhysAddr::new(w as u64 * 64 * FRAME_SIZE))
    }

    /// `n` physically contiguous frames, starting on a 64-frame (256 KiB)
    /// boundary, searched from the top like `alloc_2m`. Whole bitmap words
    /// are checked, which keeps the search cheap; the unused tail of the
    /// last word stays free.
    fn alloc_contiguous(&mut self, n: u64) -> Option<PhysAddr> {
        let words = n.div_ceil(64) as usize;
        let mut w = self.bitmap.len();
        while w >= words {
            w -= words;
            if self.bitmap[w..w + words].iter().all(|&x| x == u64::MAX) {
                let first = w as u64 * 64;
                self.set_range(first, first + n, false);
                self.free -= n;
                self.last_pristine = self.mark_used(first, n);
                return Some(PhysAddr::new(first * FRAME_SIZE));
            }
        }
        None
    }

    fn free(&mut self, addr: PhysAddr) {
        let a = addr.as_u64();
        assert!(
            a.is_multiple_of(FRAME_SIZE),
            "frame free: {a:#x} is not page aligned"
        );
        let idx = a / FRAME_SIZE;
        assert!(idx < self.frames, "frame free: {a:#x} is beyond RAM");
        assert!(!self.is_free(idx), "frame free: double free of {a:#x}");
        assert!(
            a >= LOW_LIMIT && !overlaps((a, a + FRAME_SIZE), self.bitmap_range),
            "frame free: {a:#x} was never allocatable"
        );
        self.set_free(idx);
        self.free += 1;
        self.hint = self.hint.min((idx / 64) as usize);
    }
}

impl FrameAllocator {
    /// Returns a run from [`FrameAllocator::alloc_2m`]: eight bitmap words
    /// at once (a per-frame loop costs milliseconds under PVM).
    fn free_2m(&mut self, addr: PhysAddr) {
        const WORDS: usize = 512 / 64;
        let a = addr.as_u64();
        assert!(
            a.is_multiple_of(512 * FRAME_SIZE),
            "frame free_2m: {a:#x} is not 2 MiB aligned"
        );
        let w = (a / FRAME_SIZE / 64) as usize;
        assert!(
            w + WORDS <= self.bitmap.len(),
            "frame free_2m: {a:#x} is beyond RAM"
        );
        assert!(
            self.bitmap[w..w + WORDS].iter().all(|&x| x == 0),
            "frame free_2m: part of {a:#x}..+2MiB is already free"
        );
        assert!(
            a >= LOW_LIMIT && !overlaps((a, a + 512 * FRAME_SIZE), self.bitmap_range),
            "frame free_2m: {a:#x} was never allocatable"
        );
        self.bitmap[w..w + WORDS].fill(u64::MAX);
        self.free += 512;
        self.hint = self.hint.min(w);
    }

    /// Returns `n` physically consecutive frames from `addr` on, checked
    /// and freed a bitmap word at a time (an address space's teardown
    /// gives back long runs; the per-frame checks of `free` cost more than
    /// the free itself under PVM).
    fn free_run(&mut self, addr: PhysAddr, n: u64) {
        let a = addr.as_u64();
        assert!(
            a.is_multiple_of(FRAME_SIZE),
            "frame free: {a:#x} is not page aligned"
        );
        let (first, last) = (a / FRAME_SIZE, a / FRAME_SIZE + n);
        assert!(last <= self.frames, "frame free: {a:#x}+{n} is beyond RAM");
        assert!(
            a >= LOW_LIMIT && !overlaps((a, last * FRAME_SIZE), self.bitmap_range),
            "frame free: {a:#x}+{n} was never allocatable"
        );
        let w = words_of(first, last);
        let double = w
            .parts
            .into_iter()
            .flatten()
            .any(|(i, mask)| self.bitmap[i] & mask != 0)
            || self.bitmap[w.whole.clone()].iter().any(|&x| x != 0);
        assert!(!double, "frame free: double free in {a:#x}+{n}");
        self.set_range(first, last, true);
        self.free += n;
        self.hint = self.hint.min((first / 64) as usize);
    }
}

/// What [`init`] sets aside for the boot's own permanent memory, so that
/// neither needs an allocator search per 2 MiB or per frame (~0.1 ms each
/// under an instruction-emulating hypervisor): `heap` bytes (a multiple of
/// 2 MiB) 2 MiB-aligned at the top of the highest RAM range, and `stack`
/// bytes (a multiple of 256 KiB) just below.
#[derive(Clone, Copy)]
pub struct BootRunSizes {
    pub heap: u64,
    pub stack: u64,
}

/// Where [`init`] put the runs of [`BootRunSizes`]: both or neither (the
/// highest RAM range was too small, or loader data sat in the way); their
/// frames are in use and never return to the allocator.
#[derive(Clone, Copy)]
pub struct BootRuns {
    pub heap: Option<PhysAddr>,
    pub stack: Option<PhysAddr>,
}

/// Frames `[first, last)` for the boot runs: below the top of the highest
/// RAM frame range `ram`, clear of `avoid` and every non-RAM entry.
fn place_boot_runs(
    boot: &BootInfo,
    ram: (u64, u64),
    sizes: BootRunSizes,
    avoid: &[(u64, u64)],
) -> Option<(u64, u64)> {
    const LARGE_FRAMES: u64 = 512;
    let n = (sizes.heap + sizes.stack) / FRAME_SIZE;
    let last = ram.1 / LARGE_FRAMES * LARGE_FRAMES;
    let first = last.checked_sub(n)?;
    let bytes = (first * FRAME_SIZE, last * FRAME_SIZE);
    let clash = first < ram.0
        || bytes.0 < LOW_LIMIT
        || avoid.iter().any(|&r| overlaps(bytes, r))
        || boot
            .memmap()
            .iter()
            .any(|e| e.kind != E820_RAM && overlaps(bytes, (e.addr, e.end())));
    (!clash && n > 0).then_some((first, last))
}

/// Free-bitmap words the image carries, all ones (free): 1 GiB of frames
/// in 32 KiB of .data, which the loader writes, where filling them cost
/// ~1 µs a word under an instruction-emulating hypervisor. `init` then
/// only clears what is not free RAM.
const PREFILLED_WORDS: usize = 4096;
static mut PREFILLED: [u64; PREFILLED_WORDS] = [u64::MAX; PREFILLED_WORDS];

/// Builds the allocator from the memory map, with the boot runs of `runs`
/// set aside.
///
/// `ram_zero`: the hypervisor handed RAM over zeroed (`ram=zero`), so
/// [`alloc_zeroed`] may skip frames nobody has used since boot.
///
/// # Safety
/// Call once, with the boot identity map active; `boot` must describe this
/// machine and `image` must cover the loaded image including .bss; with
/// `ram_zero`, every RAM frame outside the image and loader data must read
/// as zero.
pub unsafe fn init(
    boot: &BootInfo,
    image: (u64, u64),
    ram_zero: bool,
    runs: BootRunSizes,
) -> BootRuns {
    let ram_end = boot
        .memmap()
        .iter()
        .filter(|e| e.kind == E820_RAM)
        .map(|e| e.end())
        .max()
        .unwrap_or(0);
    let ram_frames = ram_end / FRAME_SIZE;

    // Loader data, the image, the low 1 MiB, and the boot runs (the last
    // slot, in bytes) are never free.
    let mut avoid = [(0u64, 0u64); crate::boot::pvh::RESERVED_MAX + 3];
    avoid[0] = (0, LOW_LIMIT);
    avoid[1] = image;
    for (slot, r) in avoid[2..].iter_mut().zip(boot.reserved()) {
        *slot = *r;
    }
    let n_avoid = 2 + boot.reserved().len();
    // The boot runs come from the top of the highest RAM entry.
    let carved = boot
        .memmap()
        .iter()
        .rfind(|e| e.kind == E820_RAM)
        .and_then(|e| {
            let top = (
                align_up(e.addr, FRAME_SIZE) / FRAME_SIZE,
                e.end() / FRAME_SIZE,
            );
            place_boot_runs(boot, top, runs, &avoid[..n_avoid])
        });
    if let Some((f, l)) = carved {
        avoid[n_avoid] = (f * FRAME_SIZE, l * FRAME_SIZE);
    }
    let avoid = &avoid[..n_avoid + 1];
    // Runs that end RAM stay out of the bitmaps altogether: no bit to
    // write for them (they never come back). Otherwise they are reserved
    // like loader data below.
    let frames = match carved {
        Some((f, l)) if l == ram_frames => f,
        _ => ram_frames,
    };
    let words = frames.div_ceil(64);
    // Up to 1 GiB the free bitmap is the image's, which arrives all free;
    // beyond, it goes into RAM. With `ram_zero` the used-since-boot bitmap
    // goes into RAM after it; it starts all clear, which zeroed RAM already
    // is: not written here.
    let prefilled = words as usize <= PREFILLED_WORDS;
    let ram_words = if prefilled { 0 } else { words };
    let bytes = (ram_words + if ram_zero { words } else { 0 }) * 8;

    let base = if bytes == 0 {
        0
    } else {
        place_bitmap(boot, bytes, avoid).expect("no room for the frame bitmap below 4 GiB")
    };

    // SAFETY: [base, base+bytes) is RAM below 4 GiB (identity-mapped), clear
    // of the image, loader data and firmware areas, and not yet handed out;
    // PREFILLED is only ever used here, once.
    let bitmap = unsafe {
        let at = if prefilled {
            (&raw mut PREFILLED).cast::<u64>()
        } else {
            base as *mut u64
        };
        core::slice::from_raw_parts_mut(at, words as usize)
    };
    let used_since_boot = ram_zero.then(|| {
        // SAFETY: the part of the same reserved range after the free bitmap.
        unsafe {
            core::slice::from_raw_parts_mut((base + ram_words * 8) as *mut u64, words as usize)
        }
    });
    let bitmap_range = if bytes == 0 {
        (0, 0)
    } else {
        (base, align_up(base + bytes, FRAME_SIZE))
    };
    // What the free bitmap already holds: all free (the image's), all used
    // (zeroed RAM), or anything. Writes that change nothing are skipped.
    let (ones, zeros) = (prefilled, ram_zero && !prefilled);
    let mut fa = FrameAllocator {
        bitmap,
        frames,
        free: 0,
        hint: 0,
        bitmap_range,
        used_since_boot,
        last_pristine: false,
        prefer_pristine_2m: true,
    };

    // One pass over the bitmap in address order: the gap before each RAM
    // range used, the range free (the memory map is sorted; overlapping or
    // adjacent RAM entries are merged so no word is written twice), the
    // tail after the last range used. The free count is the sum of the RAM
    // ranges minus what the reservations below take back: no recount.
    let mut cursor = 0;
    let mut ram = boot
        .memmap()
        .iter()
        .filter(|e| e.kind == E820_RAM)
        .map(|e| {
            let first = (align_up(e.addr, FRAME_SIZE) / FRAME_SIZE).min(frames);
            let last = (e.end() / FRAME_SIZE).min(frames);
            (first, last.max(first))
        })
        .peekable();
    while let Some((first, mut last)) = ram.next() {
        while let Some(&(f, l)) = ram.peek() {
            if f > last {
                break;
            }
            last = last.max(l);
            ram.next();
        }
        let first = first.max(cursor);
        if first >= last {
            continue;
        }
        if !zeros {
            fa.set_range(cursor, first, false);
        }
        if !ones {
            fa.set_range(first, last, true);
        }
        fa.free += last - first;
        cursor = last;
    }
    if !zeros {
        fa.set_range(cursor, words * 64, false);
    }
    // Where RAM and non-RAM entries overlap, the reservation wins. Ranges
    // that touch the one before are reserved with it (the low 1 MiB, the
    // image and the bitmaps usually make one), those below LOW_LIMIT go
    // with it, and those beyond the bitmap need nothing: each `reserve`
    // costs ~0.15 ms here.
    let non_ram = boot
        .memmap()
        .iter()
        .filter(|e| e.kind != E820_RAM)
        .map(|e| (e.addr, e.end()));
    let mut taken = 0;
    let mut run = (0, LOW_LIMIT);
    let rest = [avoid[1], bitmap_range]
        .into_iter()
        .chain(non_ram)
        .chain(avoid[2..].iter().copied());
    for (s, e) in rest {
        if e <= LOW_LIMIT || s >= frames * FRAME_SIZE || s >= e {
            continue;
        }
        if s <= run.1 && e >= run.0 {
            run = (run.0.min(s), run.1.max(e));
        } else {
            taken += fa.reserve(run.0, run.1);
            run = (s, e);
        }
    }
    taken += fa.reserve(run.0, run.1);
    fa.free -= taken;
    if let (Some((f, l)), Some(used)) = (carved, fa.used_since_boot.as_deref_mut()) {
        if l <= frames {
            // Handed out for good: whole words (both ends are multiples
            // of 64 frames).
            fill(&mut used[(f / 64) as usize..(l / 64) as usize], u64::MAX);
        }
    }
    let carved_frames = carved.map_or(0, |(f, l)| l - f);
    TOTAL_USABLE.store(
        fa.free + carved_frames,
        core::sync::atomic::Ordering::Relaxed,
    );
    log::debug!(
        "frames: bitmap at {:#x} ({} bytes{}), {} of {} frames free, RAM {}",
        fa.bitmap.as_ptr() as u64,
        words * 8,
        if prefilled { ", the image's" } else { "" },
        fa.free,
        frames,
        if ram_zero {
            "zeroed by the hypervisor (ram=zero)"
        } else {
            "of unknown contents"
        }
    );
    *FRAMES.lock() = Some(fa);
    let stack_frames = runs.stack / FRAME_SIZE;
    BootRuns {
        heap: carved.map(|(f, _)| PhysAddr::new((f + stack_frames) * FRAME_SIZE)),
        stack: carved.map(|(f, _)| PhysAddr::new(f * FRAME_SIZE)),
    }
}

/// Boot only: a frame for a page table, preferring low addresses, zeroed
/// through `phys_offset` (0 while only the boot identity map exists: None
/// if the lowest free frame is above 4 GiB) unless it
/// still holds the hypervisor's zeros (`ram=zero`). A table frame zeroed
/// for nothing costs 512 emulated stores (~0.5 ms) here.
pub fn alloc_table_at_boot(phys_offset: u64) -> Option<PhysAddr> {
    let (pa, pristine) = with(|fa| {
        let pa = fa.alloc_low()?;
        if phys_offset == 0 && pa.as_u64() + FRAME_SIZE > IDENTITY_LIMIT {
            fa.free(pa);
            return None;
        }
        Some((pa, fa.last_pristine))
    })?;
    if !pristine {
        // SAFETY: a fresh frame nobody else references, reachable through
        // `phys_offset` (the identity map reaches it, checked above; the
        // direct map reaches all RAM); 512 qwords is the frame.
        unsafe { zero_words((phys_offset + pa.as_u64()) as *mut u64, FRAME_SIZE / 8) };
    }
    Some(pa)
}

fn with<R>(f: impl FnOnce(&mut FrameAllocator) -> R) -> R {
    f(FRAMES
        .lock()
        .as_mut()
        .expect("frame allocator used before init"))
}

/// Allocates one frame, preferring low addresses. Contents are undefined.
pub fn alloc() -> Option<PhysAddr> {
    with(|fa| fa.alloc_low())
}

/// Stores zeros over `words` qwords at `p` with one `rep stosq` (under PVM
/// ~1,700 cycles per qword; `rep stosb`, what a byte memset may use, costs
/// 8x as much per byte).
///
/// # Safety
/// `[p, p + 8 * words)` must be writable memory nobody else uses.
unsafe fn zero_words(p: *mut u64, words: u64) {
    // SAFETY: per the contract; DF is clear (ABI).
    unsafe {
        core::arch::asm!(
            "rep stosq",
            inout("rcx") words => _,
            inout("rdi") p => _,
            in("rax") 0u64,
            options(nostack, preserves_flags)
        );
    }
}

/// Allocates `frames` frames with `alloc` and zeroes them through the
/// direct map, unless they still hold the zeros the hypervisor handed over
/// (`ram=zero`, never allocated since boot).
fn zeroed(
    frames: u64,
    alloc: impl FnOnce(&mut FrameAllocator) -> Option<PhysAddr>,
) -> Option<PhysAddr> {
    let (pa, pristine) = with(|fa| {
        let pa = alloc(fa)?;
        Some((pa, fa.last_pristine))
    })?;
    if !pristine {
        // SAFETY: fresh frames nobody else references, inside the direct
        // map (all RAM is).
        unsafe {
            zero_words(
                super::direct_map::phys_to_virt(pa).as_mut_ptr(),
                frames * FRAME_SIZE / 8,
            )
        };
    }
    Some(pa)
}

/// Allocates one frame, preferring low addresses, and zeroes it (see
/// [`zeroed`]). After boot only: it writes through the direct map.
pub fn alloc_zeroed() -> Option<PhysAddr> {
    zeroed(1, |fa| fa.alloc_low())
}

/// Fills `out` with frames, preferring low addresses, under one lock,
/// then zeroes each (see [`zeroed`]); returns how many it got (fewer than
/// `out.len()` only when RAM ran out).
pub fn alloc_zeroed_batch(out: &mut [u64]) -> usize {
    // Frames are page aligned: bit 0 carries "still pristine".
    let got = with(|fa| fa.alloc_low_batch(out));
    for slot in &mut out[..got] {
        let pristine = *slot & 1 != 0;
        *slot &= !1;
        if !pristine {
            // SAFETY: a fresh frame nobody else references, in the direct map.
            unsafe {
                zero_words(
                    super::direct_map::phys_to_virt(PhysAddr::new(*slot)).as_mut_ptr(),
                    FRAME_SIZE / 8,
                )
            };
        }
    }
    got
}

/// [`alloc_2m`], zeroed (see [`zeroed`]).
pub fn alloc_zeroed_2m() -> Option<PhysAddr> {
    zeroed(512, |fa| fa.alloc_2m(fa.prefer_pristine_2m))
}

/// Allocates one frame from the top of RAM (tests use it to reach high memory).
pub fn alloc_high() -> Option<PhysAddr> {
    with(|fa| fa.alloc_high())
}

/// Whether [`alloc_zeroed_2m`] prefers 2 MiB blocks never used since boot
/// (default on; [`alloc_2m`], which does not zero, never does); returns
/// the previous setting. Tests turn
/// it off to get a block just freed back.
pub fn set_prefer_pristine_2m(on: bool) -> bool {
    with(|fa| core::mem::replace(&mut fa.prefer_pristine_2m, on))
}

/// Whether the allocator knows which frames are still the hypervisor's
/// zeros (`ram=zero`).
pub fn tracks_pristine() -> bool {
    with(|fa| fa.used_since_boot.is_some())
}

/// Allocates 512 contiguous frames, 2 MiB aligned (for 2 MiB mappings).
pub fn alloc_2m() -> Option<PhysAddr> {
    with(|fa| fa.alloc_2m(false))
}

/// Allocates `n` (≥ 1) physically contiguous frames (device DMA buffers);
/// free them one by one with [`free`].
pub fn alloc_contiguous(n: u64) -> Option<PhysAddr> {
    if n <= 1 {
        return alloc();
    }
    with(|fa| fa.alloc_contiguous(n))
}

/// Returns a frame obtained from [`alloc`], [`alloc_high`] or [`alloc_contiguous`].
/// Panics on double free or on a frame that was never allocatable.
pub fn free(addr: PhysAddr) {
    with(|fa| fa.free(addr))
}

/// The allocator locked once for many frees (an address space's teardown
/// gives back tens of thousands of frames; under PVM a lock round trip per
/// frame costs more than the free itself).
pub struct Batch(lock_api::MutexGuard<'static, crate::sync::RawSpinlock, Option<FrameAllocator>>);

pub fn batch() -> Batch {
    Batch(FRAMES.lock())
}

impl Batch {
    fn fa(&mut self) -> &mut FrameAllocator {
        self.0.as_mut().expect("frame allocator used before init")
    }

    /// [`free`] under the held lock.
    pub fn free(&mut self, addr: PhysAddr) {
        self.fa().free(addr);
    }

    /// `n` consecutive frames from `addr` under the held lock (checked and
    /// freed a bitmap word at a time).
    pub fn free_run(&mut self, addr: PhysAddr, n: u64) {
        self.fa().free_run(addr, n);
    }

    /// [`free_2m`] under the held lock.
    pub fn free_2m(&mut self, addr: PhysAddr) {
        self.fa().free_2m(addr);
    }
}

/// Returns a run obtained from [`alloc_2m`]. Panics if any of its frames is
/// already free.
pub fn free_2m(addr: PhysAddr) {
    with(|fa| fa.free_2m(addr))
}

pub fn stats() -> FrameStats {
    FrameStats {
        free: with(|fa| fa.free),
        total_usable: TOTAL_USABLE.load(core::sync::atomic::Ordering::Relaxed),
    }
}

/// Free count recomputed from the bitmap, to cross-check the counter.
pub fn recount() -> u64 {
    with(|fa| fa.recount())
}

/// Frames (as indices) the allocator believes are free, for a cheap test of
/// the "never hand out reserved memory" rule.
pub fn is_free(addr: PhysAddr) -> bool {
    with(|fa| {
        let idx = addr.as_u64() / FRAME_SIZE;
        idx < fa.frames && fa.is_free(idx)
    })
}

/// Adapter for the `x86_64` crate's mapper, which allocates page-table frames.
pub struct PageTableFrames {
    /// Before the direct map exists, page tables are written through the
    /// identity map and so must sit below this limit.
    pub limit: u64,
}

// SAFETY: every frame returned comes from the bitmap, is marked used, and is
// never returned twice without an intervening free.
unsafe impl x86_64::structures::paging::FrameAllocator<x86_64::structures::paging::Size4KiB>
    for PageTableFrames
{
    fn allocate_frame(&mut self) -> Option<x86_64::structures::paging::PhysFrame> {
        let a = alloc()?;
        if a.as_u64() + FRAME_SIZE > self.limit {
            free(a);
            return None;
        }
        Some(x86_64::structures::paging::PhysFrame::containing_address(a))
    }
}
