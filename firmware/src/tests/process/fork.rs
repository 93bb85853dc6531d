//! Fork without a GPU: copy-on-write of private pages (4 KiB and 2 MiB),
//! shared mappings staying shared, the zero page, the notifier the
//! parent's mirror would see, device-exclusive entries restored at fork,
//! and frame references: every frame back once both processes exited,
//! none freed while the other side still maps it.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use faultline_driver::mm::{
    make_device_exclusive, mmap_read_lock, DeviceOwner, Mm, MmuNotifyEvent, PageState, PAGE_SHIFT,
    PAGE_SIZE as PG, PMD_SIZE as HUGE,
};

use super::{debug_str, map, present_at, read, watched, write, RW};
use crate::mm::process::Prot;
use crate::mm::process::{fork, freed, MapFlags, Process};
use crate::mm::{frames, USER_BASE};

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)*) => {
        if !$cond {
            return Err(format!($($fmt)*));
        }
    };
}

/// Private pages of the fork test's 4 KiB mapping.
const PAGES: u64 = 8;
/// Held-back frames are filled with this (never a value the test writes).
const CANARY: u64 = 0xdead_f0f0_dead_f0f0;

fn fork_of(p: &Process) -> Result<Process, String> {
    p.fork().map_err(|e| format!("fork: {e:?}"))
}

fn rd(p: &Process, a: u64) -> Result<u64, String> {
    read(p, a).map_err(|e| format!("read {a:#x}: {e}"))
}

fn wr(p: &Process, a: u64, v: u64) -> Result<(), String> {
    write(p, a, v).map_err(|e| format!("write {a:#x}: {e}"))
}

fn pfn_at(p: &Process, a: u64) -> Option<u64> {
    match p.translate(a).state {
        PageState::Present { pfn, .. } | PageState::Huge { pfn, .. } => Some(pfn),
        _ => None,
    }
}

/// Every frame back (`free` of them, as before the test's processes) and
/// no frame references left.
fn all_back(free: u64) -> Result<(), String> {
    ensure!(
        frames::stats().free == free && fork::shared_frames() == 0,
        "frames before {free}, after {}; {} still shared",
        frames::stats().free,
        fork::shared_frames()
    );
    Ok(())
}

/// The frames freed (watched) since the last call, as pfns.
fn freed_pfns() -> alloc::vec::Vec<u64> {
    freed::take()
        .into_iter()
        .map(|pa| pa >> PAGE_SHIFT)
        .collect()
}

pub fn fork_cow() -> Result<(), String> {
    let free = frames::stats().free;
    freed::track(Some(CANARY));
    let r = fork_cow_body();
    freed::track(None);
    r?;
    ensure!(
        frames::stats().free == free && frames::recount() == free,
        "frames before {free}, after both exited {} (bitmap {})",
        frames::stats().free,
        frames::recount()
    );
    ensure!(
        fork::shared_frames() == 0,
        "{} frames still shared after both exited",
        fork::shared_frames()
    );
    Ok(())
}

fn fork_cow_body() -> Result<(), String> {
    let (p, rec, a) = watched(PAGES * PG, MapFlags::empty())?;
    let s = map(&p, None, 4 * PG, RW, MapFlags::SHARED)?;
    let h = map(&p, Some(USER_BASE + (301 << 30)), HUGE, RW, MapFlags::HUGE)?;
    // Pages 0..7 written, except page 7 read (the zero page); shared page
    // 0 written, the others populated by the fork; the 2 MiB page written.
    for i in 0..PAGES - 1 {
        wr(&p, a + i * PG, 100 + i)?;
    }
    ensure!(rd(&p, a + 7 * PG)? == 0, "fresh page");
    wr(&p, s, 500)?;
    wr(&p, h + 8, 900)?;
    let before = p.stats();
    let free_before = frames::stats().free;
    rec.take();
    let c = fork_of(&p)?;
    // The parent's notifiers: one write-protection per private VMA, the
    // leaves still writable at `_start`, read-only at `_end`; nothing for
    // the shared VMA (its three unpopulated pages were never mapped, so
    // their population needs no notifier either).
    let log = rec.take();
    let pp = Some(MmuNotifyEvent::ProtectionPage);
    ensure!(
        log.len() == 4
            && (log[0].phase, log[0].start, log[0].end, log[0].event)
                == ("start", a, a + PAGES * PG, pp)
            && (log[1].phase, log[1].start, log[1].end, log[1].event)
                == ("end", a, a + PAGES * PG, pp)
            && (log[2].phase, log[2].start, log[2].end, log[2].event) == ("start", h, h + HUGE, pp)
            && (log[3].phase, log[3].start, log[3].end, log[3].event) == ("end", h, h + HUGE, pp),
        "fork notifications {log:?}"
    );
    ensure!(
        present_at(&log[0]).is_some_and(|(_, w)| w) && present_at(&log[1]).is_some_and(|(_, w)| !w),
        "write-protect not inside the bracket: {log:?}"
    );
    // No data frame copied: the child's tables, and the shared VMA's
    // three populated pages.
    let (ps, cs) = (p.stats(), c.stats());
    ensure!(
        ps.data_frames == before.data_frames + 3 && cs.data_frames == ps.data_frames,
        "data frames: parent {before:?} then {ps:?}, child {cs:?}"
    );
    let used = free_before - frames::stats().free;
    ensure!(
        used == cs.page_tables + 3,
        "fork took {used} frames; the child's tables are {} (+3 shared pages)",
        cs.page_tables
    );
    for i in 0..PAGES - 1 {
        let x = a + i * PG;
        ensure!(
            pfn_at(&p, x) == pfn_at(&c, x)
                && matches!(
                    p.translate(x).state,
                    PageState::Present {
                        writable: false,
                        ..
                    }
                ),
            "page {i}: parent {:?}, child {:?}",
            p.translate(x),
            c.translate(x)
        );
        ensure!(rd(&c, x)? == 100 + i, "child reads page {i}");
    }
    // The child writes page 0: its own copy, the parent keeps its data.
    wr(&c, a, 1000)?;
    ensure!(rd(&p, a)? == 100 && rd(&c, a)? == 1000, "child's write");
    ensure!(
        c.core().cow_breaks() == 1 && p.core().cow_breaks() == 0,
        "COW breaks: child {}, parent {}",
        c.core().cow_breaks(),
        p.core().cow_breaks()
    );
    // Page 0's old frame is the parent's alone now: its write reuses it.
    let old0 = pfn_at(&p, a);
    wr(&p, a, 101)?;
    ensure!(
        pfn_at(&p, a) == old0 && p.core().cow_breaks() == 0,
        "the last sharer's write copied: {:?}",
        p.translate(a)
    );
    // The parent writes page 1: the child keeps the old data.
    wr(&p, a + PG, 2001)?;
    ensure!(
        rd(&c, a + PG)? == 101 && rd(&p, a + PG)? == 2001 && p.core().cow_breaks() == 1,
        "parent's write on page 1 (COW breaks {})",
        p.core().cow_breaks()
    );
    // Page 7 was the zero page: each side's write makes its own frame.
    wr(&c, a + 7 * PG, 7)?;
    ensure!(
        rd(&p, a + 7 * PG)? == 0 && c.core().cow_breaks() == 1,
        "zero page after the child's write"
    );
    // Shared: the same frames, writable, each side sees the other's stores.
    for i in 0..4 {
        let x = s + i * PG;
        ensure!(
            pfn_at(&p, x).is_some() && pfn_at(&p, x) == pfn_at(&c, x),
            "shared page {i}: parent {:?}, child {:?}",
            p.translate(x),
            c.translate(x)
        );
    }
    wr(&c, s + 3 * PG, 77)?;
    wr(&p, s + 8, 88)?;
    ensure!(
        rd(&p, s + 3 * PG)? == 77 && rd(&c, s + 8)? == 88 && rd(&c, s)? == 500,
        "shared mapping not shared"
    );
    // 2 MiB: copied as a unit on the child's write.
    let hp = pfn_at(&p, h);
    wr(&c, h + HUGE - 8, 901)?;
    ensure!(
        pfn_at(&c, h) != hp && pfn_at(&p, h) == hp && c.core().cow_breaks() == 2,
        "2 MiB COW: parent {:?}, child {:?}",
        p.translate(h),
        c.translate(h)
    );
    ensure!(
        rd(&c, h + 8)? == 900 && rd(&p, h + HUGE - 8)? == 0 && rd(&p, h + 8)? == 900,
        "2 MiB page data after the COW"
    );
    // The child exits first: only its own frames go (page 0's copy,
    // page 1's old frame, which the parent's COW left it, page 7's, the
    // 2 MiB copy); nothing the parent maps is freed.
    freed_pfns();
    let child_own = [pfn_at(&c, a), pfn_at(&c, a + PG), pfn_at(&c, a + 7 * PG)];
    drop(c);
    let gone = freed_pfns();
    ensure!(
        gone.len() == 3 + 512
            && child_own
                .iter()
                .all(|f| f.is_some_and(|f| gone.contains(&f))),
        "child's exit freed {} frames (want its 3 + 512 own): {:x?}",
        gone.len(),
        &gone[..gone.len().min(8)]
    );
    for i in 1..PAGES - 1 {
        let want = if i == 1 { 2001 } else { 100 + i };
        ensure!(
            rd(&p, a + i * PG)? == want,
            "parent's page {i} after the child's exit"
        );
    }
    ensure!(
        rd(&p, s + 3 * PG)? == 77,
        "shared page after the child's exit"
    );
    // Its last sharer gone, a parent write reuses the frame.
    let f2 = pfn_at(&p, a + 2 * PG);
    wr(&p, a + 2 * PG, 3)?;
    ensure!(
        pfn_at(&p, a + 2 * PG) == f2 && p.core().cow_breaks() == 1,
        "write after the child's exit copied"
    );
    drop(rec);
    drop(p);
    Ok(())
}

/// The parent exits first; the child's data survive, then everything
/// comes back. A second generation forks from the child.
pub fn fork_exit_order() -> Result<(), String> {
    let free = frames::stats().free;
    {
        let p = super::new_process()?;
        let a = map(&p, None, 4 * PG, RW, MapFlags::empty())?;
        for i in 0..4 {
            wr(&p, a + i * PG, 10 + i)?;
        }
        let c = fork_of(&p)?;
        let g = fork_of(&c)?;
        drop(p);
        wr(&c, a, 20)?;
        ensure!(
            rd(&g, a)? == 10 && rd(&c, a)? == 20 && rd(&c, a + PG)? == 11,
            "after the parent's exit"
        );
        ensure!(
            c.core().cow_breaks() == 1,
            "child's COW breaks {}",
            c.core().cow_breaks()
        );
        drop(c);
        // The grandchild is the last: a write reuses every frame.
        let pfns: alloc::vec::Vec<_> = (0..4).map(|i| pfn_at(&g, a + i * PG)).collect();
        for i in 0..4 {
            wr(&g, a + i * PG, 30 + i)?;
        }
        let now: alloc::vec::Vec<_> = (0..4).map(|i| pfn_at(&g, a + i * PG)).collect();
        ensure!(
            pfns == now && g.core().cow_breaks() == 0,
            "the last of three copied: {pfns:x?} -> {now:x?}"
        );
    }
    all_back(free)
}

/// A shared mapping whose leaves lost write through an mprotect round
/// trip (read-only, then read-write again) stays shared on both sides:
/// the next write fault upgrades the leaf in place, 4 KiB and 2 MiB,
/// instead of copying the frame another PTE maps. Device-exclusive access
/// to such a frame is refused.
pub fn fork_shared_mprotect() -> Result<(), String> {
    let free = frames::stats().free;
    {
        let p = super::new_process()?;
        let s = map(&p, None, 2 * PG, RW, MapFlags::SHARED)?;
        let h = map(&p, None, HUGE, RW, MapFlags::SHARED | MapFlags::HUGE)?;
        wr(&p, s, 1)?;
        wr(&p, h, 2)?;
        let c = fork_of(&p)?;
        // The child maps the frame too: no exclusive access for a device.
        let owner = DeviceOwner::alloc().ok_or("no owner id left")?;
        let taken = {
            let mmap = mmap_read_lock(&**p.mm());
            make_device_exclusive(&mmap, s, s + PG, owner)
        };
        ensure!(
            taken == Err(faultline_driver::errno::Errno::EBUSY),
            "exclusive access to a frame the child maps: {taken:?}"
        );
        for (mm, other, who) in [(&p, &c, "parent"), (&c, &p, "child")] {
            for (a, len) in [(s, 2 * PG), (h, HUGE)] {
                for prot in [Prot::READ, RW] {
                    mm.mprotect(a, len, prot)
                        .map_err(|e| format!("{who} mprotect {a:#x} {prot:?}: {e:?}"))?;
                }
                let v = rd(mm, a)? + 10;
                wr(mm, a + PG, v)?;
                wr(mm, a, v)?;
                ensure!(
                    rd(other, a)? == v && rd(other, a + PG)? == v,
                    "{who} wrote {v} at {a:#x} after mprotect RO/RW; the other side reads {} and {}",
                    rd(other, a)?,
                    rd(other, a + PG)?
                );
                ensure!(
                    pfn_at(mm, a).is_some() && pfn_at(mm, a) == pfn_at(other, a),
                    "{who} {a:#x}: frames {:?} and {:?}",
                    pfn_at(mm, a),
                    pfn_at(other, a)
                );
            }
        }
        ensure!(
            p.core().cow_breaks() == 0 && c.core().cow_breaks() == 0,
            "COW breaks in a shared mapping: parent {}, child {}",
            p.core().cow_breaks(),
            c.core().cow_breaks()
        );
        drop(c);
        ensure!(
            rd(&p, s)? == 21 && rd(&p, h)? == 22,
            "after the child's exit"
        );
    }
    all_back(free)
}

/// Out of frames in the middle of a fork: with every frame held but `k`,
/// each fork fails with ENOMEM until `k` covers the child's tables; a
/// failed fork gives back every frame and reference it took (some of its
/// VMAs were copied, with references, before the tables of the next ran
/// out), and the parent keeps its data and writes its frames in place.
pub fn fork_enomem() -> Result<(), String> {
    let free = frames::stats().free;
    {
        let p = super::new_process()?;
        let a = map(&p, None, 2 * PG, RW, MapFlags::empty())?;
        let b = map(&p, Some(USER_BASE + (302 << 30)), PG, RW, MapFlags::empty())?;
        let h = map(&p, Some(USER_BASE + (303 << 30)), HUGE, RW, MapFlags::HUGE)?;
        let vals = [(a, 1), (a + PG, 2), (b, 3), (h + 8, 4)];
        for (x, v) in vals {
            wr(&p, x, v)?;
        }
        let mut big = Vec::with_capacity((frames::stats().free / 512 + 8) as usize);
        while let Some(f) = frames::alloc_2m() {
            big.push(f);
        }
        let mut small = Vec::with_capacity((frames::stats().free + 8) as usize);
        while let Some(f) = frames::alloc() {
            small.push(f);
        }
        let mut child = None;
        let mut k = 0;
        while k < 32 && child.is_none() {
            if let Some(f) = small.pop() {
                frames::free(f);
                k += 1;
            }
            match p.fork() {
                Ok(c) => child = Some(c),
                Err(faultline_driver::errno::Errno::ENOMEM) => {
                    let now = (frames::stats().free, fork::shared_frames());
                    for (x, v) in vals {
                        let got = rd(&p, x)?;
                        ensure!(got == v, "after ENOMEM with {k} frames: {x:#x} reads {got}");
                    }
                    ensure!(
                        now == (k, 0),
                        "fork failed with {k} frames free: {} free, {} shared after it",
                        now.0,
                        now.1
                    );
                }
                Err(e) => return Err(format!("fork with {k} frames free: {e:?}")),
            }
        }
        for f in small {
            frames::free(f);
        }
        for f in big {
            frames::free_2m(f);
        }
        let c = child.ok_or("fork failed with 32 frames free")?;
        ensure!(
            k >= 4,
            "the fork needed only {k} frames: nothing failed mid-copy"
        );
        for (x, v) in vals {
            ensure!(rd(&c, x)? == v, "child {x:#x}");
        }
        drop(c);
        for (x, v) in vals {
            wr(&p, x, v + 10)?;
            ensure!(rd(&p, x)? == v + 10, "parent {x:#x} after the child's exit");
        }
        ensure!(
            p.core().cow_breaks() == 0,
            "{} COW breaks of frames no one shares",
            p.core().cow_breaks()
        );
    }
    all_back(free)
}

/// Device-exclusive entries are restored at fork (the parent's mirror
/// sees the revoke), then shared copy-on-write like any page.
pub fn fork_exclusive() -> Result<(), String> {
    let free = frames::stats().free;
    {
        let (p, rec, a) = watched(2 * PG, MapFlags::empty())?;
        wr(&p, a, 5)?;
        wr(&p, a + PG, 6)?;
        let owner = DeviceOwner::alloc().ok_or("no owner id left")?;
        {
            let mmap = mmap_read_lock(&**p.mm());
            make_device_exclusive(&mmap, a, a + 2 * PG, owner).map_err(debug_str)?;
        }
        rec.take();
        let c = fork_of(&p)?;
        let log = rec.take();
        let revoke = Some(MmuNotifyEvent::Exclusive { owner: None });
        let revokes = log
            .iter()
            .filter(|s| s.phase == "start" && s.event == revoke)
            .count();
        ensure!(revokes == 2, "revokes at fork: {log:?}");
        ensure!(
            log.iter()
                .filter(|s| s.event == Some(MmuNotifyEvent::ProtectionPage))
                .count()
                == 2,
            "no write-protection after the restore: {log:?}"
        );
        wr(&p, a, 50)?;
        ensure!(
            rd(&c, a)? == 5 && rd(&c, a + PG)? == 6 && rd(&p, a)? == 50,
            "data after a fork of exclusive pages"
        );
        drop(rec);
        drop(c);
        drop(p);
    }
    all_back(free)
}
