//! Self-tests of the firmware's own machinery. Each checks something that
//! can really break, and reports what it saw when it does.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use x86_64::{PhysAddr, VirtAddr};

use super::Test;
use crate::arch::{apic, idt, paging, time};
use crate::mm::{self, direct_map, frames, heap};

pub const TESTS: &[Test] = &[
    Test::new("cmdline_parse", cmdline_parse),
    Test::new("serial_decimal", serial_decimal),
    Test::new("frame_alloc", frame_alloc),
    Test::new("frame_alloc_zeroed", frame_alloc_zeroed),
    Test::new("heap", heap_test),
    Test::new("direct_map", direct_map_test),
    Test::new("page_map", page_map),
    Test::new("timer_monotonic", timer_monotonic),
    Test::new("exception_recovery", exception_recovery),
    Test::new("x2apic", x2apic),
    Test::new("address_space_layout", address_space_layout),
];

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)*) => {
        if !$cond {
            return Err(format!($($fmt)*));
        }
    };
}

fn cmdline_parse() -> Result<(), String> {
    use crate::cmdline::{parse, Complaint};
    let mut seen = Vec::new();
    let o = parse(
        "  test=heap loglevel=debug foo=1 junk loglevel=loud list=0 fail=1  ",
        |c| seen.push(c),
    );
    ensure!(o.test_filter == Some("heap"), "filter {:?}", o.test_filter);
    ensure!(
        o.log_level == log::LevelFilter::Debug,
        "bad loglevel overrode a good one: {:?}",
        o.log_level
    );
    ensure!(o.fail && !o.list, "fail={} list={}", o.fail, o.list);
    let want = [
        Complaint::UnknownKey("foo"),
        Complaint::NotKeyValue("junk"),
        Complaint::BadValue {
            key: "loglevel",
            value: "loud",
            expected: "off|error|warn|info|debug|trace",
        },
    ];
    ensure!(seen == want, "complaints {seen:?}");
    let empty = parse("", |c| seen.push(c));
    ensure!(
        empty == crate::cmdline::Options::default() && seen.len() == 3,
        "empty cmdline not default"
    );
    // svm=: a good policy is kept; a bad one is complained about by item
    // and marks the options as failing the run.
    let mut seen = Vec::new();
    let good = parse("svm=batch:8,replay=once", |c| seen.push(c));
    ensure!(
        good.svm
            == Ok(Some(faultline_driver::gpu::FaultPolicy {
                batch: 8,
                replay: faultline_driver::gpu::Replay::Once,
                ..Default::default()
            }))
            && seen.is_empty(),
        "svm= policy {:?}, complaints {seen:?}",
        good.svm
    );
    let bad = parse("svm=batch:8,prefetch=most", |c| seen.push(c));
    ensure!(
        bad.svm.is_err() && matches!(seen[..], [Complaint::BadSvm(e)] if e.item == "prefetch=most"),
        "bad svm=: {:?}, complaints {seen:?}",
        bad.svm
    );
    // test=A,B selects by any of its parts.
    ensure!(
        super::matches("anon_,snap", "snapshot")
            && super::matches("anon_,snap", "anon_read")
            && !super::matches("anon_,snap", "heap")
            && super::matches("", "heap")
            && super::matches("x,shot", "snapshot")
            && super::matches("apsh", "snapshot")
            && !super::matches("snapshots,hots", "snapshot"),
        "test= alternatives"
    );
    // `mutant=` exists only in the mutants build; elsewhere it is a typo.
    let mut seen = Vec::new();
    let _m = parse("mutant=c mutant=zz", |c| seen.push(c));
    #[cfg(feature = "mutants")]
    ensure!(
        _m.mutant == Some(faultline_driver::gpu::mutant::Mutant::StrongestAccess)
            && seen.len() == 1
            && matches!(
                seen[0],
                Complaint::BadValue {
                    key: "mutant",
                    value: "zz",
                    ..
                }
            ),
        "mutant=: {:?}, complaints {seen:?}",
        _m.mutant
    );
    #[cfg(not(feature = "mutants"))]
    ensure!(
        seen == [
            Complaint::UnknownKey("mutant"),
            Complaint::UnknownKey("mutant")
        ],
        "mutant= in the default build: {seen:?}"
    );
    Ok(())
}

/// The console's own number formatting (the boot banner's) against
/// core::fmt's.
fn serial_decimal() -> Result<(), String> {
    let mut buf = [0; 20];
    for v in [
        0,
        1,
        9,
        10,
        11,
        99,
        100,
        101,
        999,
        1000,
        1005,
        5000,
        65_536,
        123_456_789,
    ]
    .into_iter()
    .chain([u64::MAX, u64::MAX / 10, 10_000_000_000_000_000_000])
    {
        for min in [1, 3] {
            let got = crate::serial::decimal(v, min, &mut buf);
            let want = format!("{v:0min$}");
            ensure!(
                got == want.as_bytes(),
                "{v} (at least {min} digits) printed as {:?}, expected {want}",
                core::str::from_utf8(got)
            );
        }
    }
    Ok(())
}

fn frame_alloc() -> Result<(), String> {
    const N: usize = 512;
    let before = frames::stats().free;
    let (img_start, img_end) = crate::boot::image_range();
    let mut got: Vec<PhysAddr> = Vec::with_capacity(N);
    for i in 0..N {
        let f = if i % 2 == 0 {
            frames::alloc()
        } else {
            frames::alloc_high()
        };
        let f = f.ok_or_else(|| format!("out of frames after {i}"))?;
        got.push(f);
    }
    ensure!(
        frames::stats().free == before - N as u64,
        "counter {} after {N} allocs from {before}",
        frames::stats().free
    );
    for &f in &got {
        let a = f.as_u64();
        ensure!(a % frames::FRAME_SIZE == 0, "unaligned frame {a:#x}");
        ensure!(a >= 1 << 20, "frame {a:#x} below 1 MiB");
        ensure!(
            a + frames::FRAME_SIZE <= img_start || a >= img_end,
            "frame {a:#x} inside the image"
        );
        ensure!(a < mm::ram_end(), "frame {a:#x} beyond RAM");
        ensure!(
            !frames::is_free(f),
            "allocated frame {a:#x} still marked free"
        );
    }
    // Nor the heap's or the kernel stack's frames, set aside at boot.
    let heap = paging::translate(VirtAddr::new(mm::HEAP_BASE)).ok_or("heap not mapped")?;
    let stack = paging::translate(VirtAddr::from_ptr(&got)).ok_or("stack not mapped")?;
    for pa in [heap, stack].map(|p| p.align_down(frames::FRAME_SIZE)) {
        ensure!(
            !frames::is_free(pa) && !got.contains(&pa),
            "boot frame {:#x} is the allocator's",
            pa.as_u64()
        );
    }
    let mut sorted = got.clone();
    sorted.sort_unstable();
    sorted.dedup();
    ensure!(
        sorted.len() == N,
        "{} duplicate frames handed out",
        N - sorted.len()
    );
    // Distinct contents per frame: overlapping frames would clobber each other.
    for (i, &f) in got.iter().enumerate() {
        let p = direct_map::phys_to_virt(f).as_mut_ptr::<u64>();
        // SAFETY: we own the frame and it is mapped in the direct map; both
        // words are inside it (first and last).
        unsafe {
            p.write_volatile(i as u64 ^ 0xfeed_0000);
            p.add(511).write_volatile(!(i as u64));
        }
    }
    for (i, &f) in got.iter().enumerate() {
        let p = direct_map::phys_to_virt(f).as_ptr::<u64>();
        // SAFETY: as above.
        let (a, b) = unsafe { (p.read_volatile(), p.add(511).read_volatile()) };
        ensure!(
            a == i as u64 ^ 0xfeed_0000 && b == !(i as u64),
            "frame {:#x} contents clobbered",
            f.as_u64()
        );
    }
    for f in got {
        frames::free(f);
    }
    let after = frames::stats().free;
    ensure!(
        after == before,
        "free frames {before} before, {after} after"
    );
    let recount = frames::recount();
    ensure!(
        recount == after,
        "counter says {after} free, bitmap says {recount}"
    );
    Ok(())
}

/// `alloc_zeroed` may skip zeroing only frames never used since boot
/// (`ram=zero`): a frame dirtied and freed comes back zeroed (the allocator
/// returns the lowest free frame, so the one just freed).
fn frame_alloc_zeroed() -> Result<(), String> {
    let words = (frames::FRAME_SIZE / 8) as usize;
    let read = |f: PhysAddr| {
        let p = direct_map::phys_to_virt(f).as_ptr::<u64>();
        // SAFETY: a frame we own, mapped in the direct map; in bounds.
        (0..words).find(|&i| unsafe { p.add(i).read_volatile() } != 0)
    };
    let dirty = frames::alloc().ok_or("no frame")?;
    let p = direct_map::phys_to_virt(dirty).as_mut_ptr::<u64>();
    for i in 0..words {
        // SAFETY: as above.
        unsafe { p.add(i).write_volatile(0xdead_0000 + i as u64) };
    }
    frames::free(dirty);
    let again = frames::alloc_zeroed().ok_or("no frame")?;
    let reused = again == dirty;
    let nonzero = read(again);
    frames::free(again);
    // The same through the batch the fault path uses: four dirtied frames
    // freed, four taken back in one batch (the lowest free ones again).
    let mut dirty4 = [PhysAddr::new(0); 4];
    for d in &mut dirty4 {
        *d = frames::alloc().ok_or("no frame")?;
        let p = direct_map::phys_to_virt(*d).as_mut_ptr::<u64>();
        for i in 0..words {
            // SAFETY: as above.
            unsafe { p.add(i).write_volatile(!(i as u64)) };
        }
    }
    for &d in &dirty4 {
        frames::free(d);
    }
    let mut batch = [0u64; 4];
    let got = frames::alloc_zeroed_batch(&mut batch);
    let batch_reused = batch.iter().all(|&b| dirty4.contains(&PhysAddr::new(b)));
    let batch_nonzero = batch[..got]
        .iter()
        .find_map(|&b| read(PhysAddr::new(b)).map(|w| (b, w)));
    for &b in &batch[..got] {
        frames::free(PhysAddr::new(b));
    }
    ensure!(got == 4, "batch of 4 gave {got}");
    ensure!(
        batch_reused,
        "the batch did not reuse the freed frames: {batch:x?}"
    );
    ensure!(
        batch_nonzero.is_none(),
        "a dirtied frame came back from the batch nonzero: {batch_nonzero:x?}"
    );
    ensure!(reused, "the frame just freed was not handed out again");
    ensure!(
        nonzero.is_none(),
        "a dirtied, freed frame came back with word {nonzero:?} nonzero"
    );
    frame_alloc_zeroed_2m()
}

/// The 2 MiB case: a dirtied, freed block is zeroed when handed out again
/// (the preference for blocks never used since boot turned off to get it
/// back), and with the preference on, the block handed out instead holds
/// zeros too and, with `ram=zero`, is another one.
fn frame_alloc_zeroed_2m() -> Result<(), String> {
    let words = (512 * frames::FRAME_SIZE / 8) as usize;
    let block = |f: PhysAddr| direct_map::phys_to_virt(f).as_mut_ptr::<u64>();
    // Sparse: one word per 256 bytes (writing all 2 MiB from ring 0 takes
    // longer than the zeroing being tested).
    // Without the preference, the topmost free block both times.
    let was = frames::set_prefer_pristine_2m(false);
    let dirty = frames::alloc_2m();
    let Some(dirty) = dirty else {
        frames::set_prefer_pristine_2m(was);
        return Err("no 2 MiB block".into());
    };
    for i in (0..words).step_by(32) {
        // SAFETY: a block we own, mapped in the direct map; in bounds.
        unsafe { block(dirty).add(i).write_volatile(0xbad0_0000 + i as u64) };
    }
    frames::free_2m(dirty);
    // The words written, and as many elsewhere in the other block.
    let first_nonzero = |f: PhysAddr| {
        (0..words)
            .step_by(32)
            // SAFETY: as above.
            .find(|&i| unsafe { block(f).add(i).read_volatile() } != 0)
    };
    let again = frames::alloc_zeroed_2m();
    frames::set_prefer_pristine_2m(was);
    let again = again.ok_or("no 2 MiB block")?;
    let reused = (again == dirty, first_nonzero(again));
    frames::free_2m(again);
    let other = frames::alloc_zeroed_2m().ok_or("no 2 MiB block")?;
    let other_nonzero = first_nonzero(other);
    frames::free_2m(other);
    ensure!(
        reused.0,
        "the 2 MiB block just freed was not handed out again"
    );
    ensure!(
        reused.1.is_none(),
        "a dirtied, freed 2 MiB block came back with word {:?} nonzero",
        reused.1
    );
    ensure!(
        other_nonzero.is_none(),
        "a 2 MiB block came back with word {other_nonzero:?} nonzero"
    );
    // With `ram=zero`, a block never used since boot (the suite's 512 MiB
    // has plenty) beats the one just freed, which would need zeroing.
    ensure!(
        !frames::tracks_pristine() || other != dirty,
        "alloc_zeroed_2m took the reused block {dirty:#x} over a pristine one"
    );
    Ok(())
}

fn heap_test() -> Result<(), String> {
    let before = heap::stats();
    {
        // Awkward small sizes, byte patterns.
        let sizes = [
            1usize, 2, 3, 7, 8, 15, 16, 31, 64, 100, 255, 256, 1000, 4095, 4096, 4097,
        ];
        let mut vecs: Vec<Vec<u8>> = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            vecs.push((0..n).map(|j| (i * 31 + j) as u8).collect());
        }
        // Larger ones with word patterns (byte loops over megabytes are slow
        // when the hypervisor emulates every instruction).
        let words: Vec<Vec<u64>> = [512usize, 2048, 8192]
            .iter()
            .enumerate()
            .map(|(t, &n)| (0..n as u64).map(|j| (t as u64) << 48 | j).collect())
            .collect();
        // One 1 MiB block: filled by memset, checked at both ends of each page.
        let big = alloc::vec![0xa5u8; 1 << 20];
        let boxes: Vec<Box<[u64]>> = (1..32)
            .map(|n| (0..n * 7).map(|j| (n as u64) << 32 | j as u64).collect())
            .collect();
        let mut map = BTreeMap::new();
        for k in 0..256u64 {
            let k = k.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            map.insert(k, Box::new([k; 3]));
        }
        // Replace every other small vec, to exercise reuse of freed chunks.
        for v in vecs.iter_mut().step_by(2) {
            *v = v.iter().map(|b| !b).collect();
        }
        for (i, v) in vecs.iter().enumerate() {
            let flip = if i % 2 == 0 { 0xff } else { 0 };
            for (j, &b) in v.iter().enumerate() {
                ensure!(
                    b == ((i * 31 + j) as u8 ^ flip),
                    "vec {i} (len {}) byte {j} = {b:#x}",
                    v.len()
                );
            }
        }
        for (t, w) in words.iter().enumerate() {
            for (j, &x) in w.iter().enumerate() {
                ensure!(
                    x == (t as u64) << 48 | j as u64,
                    "word vec {t} word {j} = {x:#x}"
                );
            }
        }
        for page in big.chunks(4096) {
            ensure!(
                page[0] == 0xa5 && page[page.len() - 1] == 0xa5,
                "1 MiB block corrupted"
            );
        }
        for (n, b) in (1u64..).zip(&boxes) {
            ensure!(b.len() as u64 == n * 7, "box {n} length {}", b.len());
            for (j, &x) in b.iter().enumerate() {
                ensure!(x == n << 32 | j as u64, "box {n} word {j} = {x:#x}");
            }
        }
        ensure!(map.len() == 256, "map has {} entries", map.len());
        for (k, v) in &map {
            ensure!(**v == [*k; 3], "map entry {k:#x} corrupted");
        }
        let in_heap = |p: usize| (mm::HEAP_BASE as usize..mm::VMAP_BASE as usize).contains(&p);
        ensure!(
            vecs.iter()
                .filter(|v| !v.is_empty())
                .all(|v| in_heap(v.as_ptr() as usize))
                && in_heap(big.as_ptr() as usize),
            "allocation outside the heap window"
        );
    }
    let after = heap::stats();
    ensure!(
        after.allocated_bytes == before.allocated_bytes
            && after.allocation_count == before.allocation_count,
        "heap leak: {before:?} -> {after:?}"
    );
    Ok(())
}

fn check_alias(pa: PhysAddr) -> Result<(), String> {
    let dm = direct_map::phys_to_virt(pa);
    ensure!(
        paging::translate(dm) == Some(pa),
        "direct map of {:#x} translates to {:?}",
        pa.as_u64(),
        paging::translate(dm)
    );
    // Write through one alias, read through the other, both directions.
    let (writer, reader) = if pa.as_u64() + 4096 <= 4 << 30 {
        (VirtAddr::new(pa.as_u64()), dm)
    } else {
        // Above the identity map: borrow a vmap slot as the second alias.
        let va = mm::vmap::reserve(1);
        // SAFETY: a vmap slot this test owns, mapping a frame it owns.
        unsafe { paging::map_4k(va, pa, paging::kernel_data_flags()) }
            .map_err(|e| format!("{e:?}"))?;
        (va, dm)
    };
    for (round, (w, r)) in [(writer, reader), (reader, writer)].into_iter().enumerate() {
        for i in 0..512u64 {
            // SAFETY: both addresses map the same owned frame; i < 512 words.
            unsafe {
                w.as_mut_ptr::<u64>()
                    .add(i as usize)
                    .write_volatile(pa.as_u64() ^ i ^ (round as u64 * 0x5555))
            };
        }
        for i in 0..512u64 {
            // SAFETY: as above.
            let v = unsafe { r.as_ptr::<u64>().add(i as usize).read_volatile() };
            ensure!(
                v == pa.as_u64() ^ i ^ (round as u64 * 0x5555),
                "frame {:#x} word {i}: alias mismatch",
                pa.as_u64()
            );
        }
    }
    if writer.as_u64() >= mm::VMAP_BASE {
        // SAFETY: no reference into the page outlives this point.
        unsafe { paging::unmap_4k(writer) }.map_err(|e| format!("{e:?}"))?;
    }
    Ok(())
}

fn direct_map_test() -> Result<(), String> {
    let before = frames::stats().free;
    let low = frames::alloc().ok_or("no low frame")?;
    let high = frames::alloc_high().ok_or("no high frame")?;
    ensure!(
        high > low,
        "high frame {:#x} not above low {:#x}",
        high.as_u64(),
        low.as_u64()
    );
    let r = check_alias(low).and_then(|_| check_alias(high));
    frames::free(low);
    frames::free(high);
    r?;
    // The map must reach the last byte of RAM and stop at the top of RAM.
    let last = mm::ram_end() - 1;
    let t = paging::translate(VirtAddr::new(mm::DIRECT_MAP_BASE + last));
    ensure!(
        t == Some(PhysAddr::new(last)),
        "last RAM byte {last:#x} maps to {t:?}"
    );
    // Nothing that is not RAM: the page after the top of RAM, and the
    // legacy VGA/BIOS hole at 640 KiB, which no PC memory map gives as RAM.
    for hole in [mm::ram_end(), 0xa_0000] {
        let t = paging::translate(VirtAddr::new(mm::DIRECT_MAP_BASE + hole));
        ensure!(
            t.is_none(),
            "non-RAM {hole:#x} is in the direct map at {t:?}"
        );
    }
    ensure!(frames::stats().free >= before - 3, "frames leaked");
    Ok(())
}

fn page_map() -> Result<(), String> {
    let va = mm::vmap::reserve(1);
    let mut free_after_first = 0;
    // Round 1 may allocate intermediate tables that stay; round 2 must
    // return exactly the frames it took.
    for round in 0..2 {
        let before = frames::stats().free;
        ensure!(
            paging::translate(va).is_none(),
            "{:#x} mapped before the test",
            va.as_u64()
        );
        let frame = frames::alloc().ok_or("no frame")?;
        // SAFETY: a vmap address this test owns, mapping a frame it owns.
        unsafe { paging::map_4k(va, frame, paging::kernel_data_flags()) }
            .map_err(|e| format!("map: {e:?}"))?;
        ensure!(
            paging::translate(va + 0x123u64) == Some(frame + 0x123u64),
            "translate after map"
        );
        for i in 0..512u64 {
            // SAFETY: freshly mapped page, 512 words.
            unsafe {
                va.as_mut_ptr::<u64>()
                    .add(i as usize)
                    .write_volatile(i * 0x0101_0101 + round)
            };
        }
        let dm = direct_map::phys_to_virt(frame).as_ptr::<u64>();
        for i in 0..512u64 {
            // SAFETY: the frame is RAM, hence in the direct map.
            let v = unsafe { dm.add(i as usize).read_volatile() };
            ensure!(
                v == i * 0x0101_0101 + round,
                "word {i} via direct map = {v:#x}"
            );
        }
        // SAFETY: no references into the page remain.
        let got = unsafe { paging::unmap_4k(va) }.map_err(|e| format!("unmap: {e:?}"))?;
        ensure!(
            got == frame,
            "unmap returned {:#x}, mapped {:#x}",
            got.as_u64(),
            frame.as_u64()
        );
        ensure!(paging::translate(va).is_none(), "still mapped after unmap");
        frames::free(frame);
        let after = frames::stats().free;
        if round == 0 {
            free_after_first = after;
            ensure!(
                before - after <= 3,
                "first map used {} frames for tables",
                before - after
            );
        } else {
            ensure!(
                after == before && after == free_after_first,
                "round 2 leaked: {before} -> {after}"
            );
        }
    }
    Ok(())
}

fn timer_monotonic() -> Result<(), String> {
    ensure!(
        time::source() != time::TscSource::Uncalibrated,
        "TSC frequency unknown"
    );
    let mut prev = time::now_ns();
    for i in 0..1000 {
        let t = time::now_ns();
        ensure!(
            t > prev,
            "now_ns not increasing at step {i}: {prev} then {t}"
        );
        prev = t;
    }
    const WAIT_MS: u64 = 10;
    let lo = WAIT_MS * 1_000_000 / 2;
    let hi = WAIT_MS * 1_000_000 * 3 / 2;
    // Best of three: a descheduled vCPU only ever makes a window longer.
    let mut best = u64::MAX;
    for _ in 0..3 {
        let t0 = time::now_ns();
        time::Deadline::after_ms(WAIT_MS).wait();
        best = best.min(time::now_ns() - t0);
    }
    ensure!(
        best >= WAIT_MS * 1_000_000,
        "deadline released early: {best} ns"
    );
    // Upper bounds on waits measured by the same clock only catch a deadline
    // that fires far too late: a descheduled or emulating vCPU overshoots by
    // milliseconds, so they are loose. Calibration is checked against the PIT.
    ensure!(best <= 10 * hi, "10 ms wait took {best} ns by the TSC");
    // The timeout helper: a condition that never holds must time out, on time.
    let t0 = time::now_ns();
    let r = time::Deadline::after_us(2000).poll(|| false);
    let took = time::now_ns() - t0;
    ensure!(
        r == Err(time::TimedOut),
        "poll on a false condition returned {r:?}"
    );
    ensure!(
        (2_000_000..=100_000_000).contains(&took),
        "2 ms poll timeout took {took} ns"
    );
    let mut calls = 0;
    let r = time::Deadline::after_ms(1000).poll(|| {
        calls += 1;
        calls == 3
    });
    ensure!(
        r == Ok(()) && calls == 3,
        "poll stopped after {calls} calls with {r:?}"
    );
    let t0 = time::now_ns();
    time::busy_wait_ns(500_000);
    let took = time::now_ns() - t0;
    ensure!(
        (500_000..=50_000_000).contains(&took),
        "0.5 ms busy wait took {took} ns"
    );

    if time::pit_channel().is_some() {
        let mut pit_best = u64::MAX;
        for _ in 0..3 {
            if let Some(ns) = time::pit_time_ns(|| time::Deadline::after_ms(WAIT_MS).wait()) {
                pit_best = pit_best.min(ns);
            }
        }
        ensure!(pit_best != u64::MAX, "PIT present but unreadable");
        ensure!(
            (lo..=hi).contains(&pit_best),
            "10 ms TSC wait measured {pit_best} ns by the PIT (TSC {} Hz from {})",
            time::tsc_hz(),
            time::source().name()
        );
        log::debug!("timer: 10 ms wait = {best} ns (TSC), {pit_best} ns (PIT)");
    } else {
        log::debug!("timer: 10 ms wait = {best} ns (TSC), no PIT to cross-check");
    }
    Ok(())
}

fn exception_recovery() -> Result<(), String> {
    // #UD: the handler resumes at label 2, skipping the `mov` that marks
    // "execution fell through".
    let mut fell_through: u64 = 0;
    idt::arm_recovery(6);
    // SAFETY: recovery is armed for #UD and the resume address is stored in
    // the slot before ud2 executes; label 2 is inside this asm block, so all
    // register state the compiler knows about is intact there.
    unsafe {
        core::arch::asm!(
            "lea {tmp}, [rip + 2f]",
            "mov [{slot}], {tmp}",
            "ud2",
            "mov {hit}, 1",
            "2:",
            tmp = out(reg) _,
            slot = in(reg) idt::recovery_rip_slot(),
            hit = inout(reg) fell_through,
        );
    }
    let (frame, _) = idt::take_recovered().ok_or("ud2 did not reach the handler")?;
    ensure!(fell_through == 0, "execution continued after ud2");
    ensure!(
        frame.vector == 6,
        "expected #UD (6), got vector {}",
        frame.vector
    );

    // #PF: read an address in the vmap window that is never mapped.
    let bad = mm::vmap::NEVER_MAPPED;
    ensure!(
        paging::translate(VirtAddr::new(bad)).is_none(),
        "probe address unexpectedly mapped"
    );
    let mut value: u64 = 0x1234;
    idt::arm_recovery(14);
    // SAFETY: as above, for #PF; the faulting load never completes, so
    // `value` keeps its old contents.
    unsafe {
        core::arch::asm!(
            "lea {tmp}, [rip + 2f]",
            "mov [{slot}], {tmp}",
            "mov {val}, [{addr}]",
            "2:",
            tmp = out(reg) _,
            slot = in(reg) idt::recovery_rip_slot(),
            val = inout(reg) value,
            addr = in(reg) bad,
        );
    }
    let (frame, cr2) = idt::take_recovered().ok_or("unmapped read did not fault")?;
    ensure!(
        frame.vector == 14,
        "expected #PF (14), got vector {}",
        frame.vector
    );
    ensure!(cr2 == bad, "CR2 {cr2:#x}, expected {bad:#x}");
    // Not-present (bit 0), read (bit 1), supervisor (bit 2): all clear.
    ensure!(
        frame.error_code & 0x7 == 0,
        "page fault error code {:#x}",
        frame.error_code
    );
    ensure!(value == 0x1234, "faulting load wrote its destination");
    Ok(())
}

fn x2apic() -> Result<(), String> {
    ensure!(
        apic::x2apic_supported(),
        "CPU has no x2APIC (CPUID.1:ECX[21])"
    );
    ensure!(apic::enabled(), "x2APIC supported but not enabled");
    let (base, svr, id) = apic::snapshot();
    ensure!(
        base & (3 << 10) == 3 << 10,
        "IA32_APIC_BASE {base:#x}: EN/EXTD not both set"
    );
    ensure!(
        svr & 0x1ff == 0x100 | u64::from(idt::SPURIOUS_VECTOR),
        "SVR {svr:#x}"
    );
    // CPUID leaf 0xB reports the same x2APIC ID in EDX.
    if core::arch::x86_64::__cpuid(0).eax >= 0xb {
        let cpuid_id = core::arch::x86_64::__cpuid_count(0xb, 0).edx;
        ensure!(
            cpuid_id == id,
            "x2APIC ID {id} but CPUID.0xB says {cpuid_id}"
        );
    }
    Ok(())
}

/// The layout promise later modules build on: PML4[0] is the identity map,
/// PML4[1..256) is empty for user processes, and the kernel half is fully
/// populated at boot so process PML4s can copy it once.
fn address_space_layout() -> Result<(), String> {
    use x86_64::structures::paging::PageTable;
    let pml4_pa = paging::kernel_pml4_phys();
    // SAFETY: the PML4 is RAM, so it is in the direct map; read-only use.
    let pml4 = unsafe { &*direct_map::phys_to_virt(pml4_pa).as_ptr::<PageTable>() };
    let index = |va: u64| ((va >> 39) & 0x1ff) as usize;
    ensure!(!pml4[0].is_unused(), "PML4[0] (identity map) missing");
    for i in index(mm::USER_BASE)..=index(mm::USER_END - 1) {
        ensure!(
            pml4[i].is_unused(),
            "PML4[{i}] in the user range is in use: {:?}",
            pml4[i]
        );
    }
    for (what, va) in [
        ("direct map", mm::DIRECT_MAP_BASE),
        ("heap", mm::HEAP_BASE),
        ("vmap", mm::VMAP_BASE),
    ] {
        let e = &pml4[index(va)];
        ensure!(!e.is_unused(), "PML4[{}] ({what}) not populated", index(va));
        ensure!(
            !e.flags()
                .contains(x86_64::structures::paging::PageTableFlags::USER_ACCESSIBLE),
            "PML4[{}] ({what}) is user-accessible",
            index(va)
        );
    }
    // The identity map is still there for the first 4 GiB, in 2 MiB pages.
    for pa in [0x20_0000u64, 0xffe0_0000] {
        let t = paging::translate(VirtAddr::new(pa + 0x1234));
        ensure!(
            t == Some(PhysAddr::new(pa + 0x1234)),
            "identity map of {pa:#x} translates to {t:?}"
        );
    }
    ensure!(
        mm::ram_bytes() > 0 && mm::ram_bytes() <= mm::ram_end(),
        "RAM facts inconsistent"
    );
    Ok(())
}
