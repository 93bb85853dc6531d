//! Basic access: the GPU reads and writes what the CPU sees, in 4 KiB and
//! 2 MiB pages, across remaps, per process, and from a kernel walking CPU
//! pointers; contexts bind and unbind without leaks; snapshots report every
//! page state.

use alloc::string::String;

use faultline_abi::{LEAF_2M, PAGE_SIZE};

use super::helpers::*;
use super::{ChaseList, Needs, Pattern, Prot, SvmEnv, TestResult};
use crate::errno::Errno;
use crate::gpu::{PageSize, SnapEntry};

/// Bind and unbind a context repeatedly: no leaked frames, slots reused.
pub(super) mod open_close {
    use super::*;

    /// Nothing beyond the defaults.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let len = 64 << 10;
        let (p, va) = spawn_mapped(env, len)?;
        // Populate the process side first: what is counted below is the
        // driver's own memory (page tables, rings).
        cpu_fill(env, &p, va, len, Pattern::constant(1))?;
        let base = env.free_frames();
        for round in 0..20u64 {
            let (svm, chan) = bind(env, &p)?;
            ok(fill(&chan, va, len, round), "fill")?;
            ensure!(
                svm.device_leaves() >= 16,
                "round {round}: device not mapped"
            );
            drop(chan);
            drop(svm);
            let now = env.free_frames();
            ensure!(
                now == base,
                "round {round}: {} frames leaked",
                base as i64 - now as i64
            );
        }
        cpu_check(env, &p, va, len, Pattern::constant(19))?;
        env.exit(p);
        Ok(())
    }
}

/// GPU COPY reads CPU-written data; untouched pages read as zero.
pub(super) mod anon_read {
    use super::*;

    /// Nothing beyond the defaults.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let len = 256 << 10;
        let (p, src) = spawn_mapped(env, len)?;
        let dst = mmap_rw(env, &p, len, "mmap dst")?;
        // CPU writes the first half; the second half stays untouched.
        let pat = Pattern::page_index(0x1000);
        cpu_fill(env, &p, src, len / 2, pat)?;
        bound(env, p, |p, _, chan| {
            let before = counters(env);
            ok(copy(chan, dst, src, len), "copy")?;
            let after = counters(env);
            cpu_check(env, p, dst, len / 2, pat)?;
            cpu_check(env, p, dst + len / 2, len / 2, Pattern::constant(0))?;
            ensure!(after.faults_read > before.faults_read, "no faults counted");
            ensure!(
                after.pages_mapped - before.pages_mapped >= 2 * len / PAGE_SIZE,
                "pages mapped: {}",
                after.pages_mapped - before.pages_mapped
            );
            Ok(())
        })
    }
}

/// GPU FILL, CPU reads it.
pub(super) mod anon_write {
    use super::*;

    /// Nothing beyond the defaults.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let len = 1 << 20;
        let (p, va) = spawn_mapped(env, len)?;
        bound(env, p, |p, _, chan| {
            ok(fill(chan, va, len, PAT), "fill")?;
            cpu_check(env, p, va, len, Pattern::constant(PAT))
        })
    }
}

/// A 2 MiB mapping gets 2 MiB device leaves, data correct.
pub(super) mod anon_write_huge {
    use super::*;

    /// Nothing beyond the defaults.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let p = env.spawn()?;
        let len = 2 * LEAF_2M;
        let va = ok(env.mmap(&p, 0, len, Prot::RW, true), "mmap huge")?;
        bound(env, p, |p, svm, chan| {
            ok(fill(chan, va, len, PAT), "fill")?;
            for off in [0, LEAF_2M] {
                let leaf = svm.device_lookup(va + off + 0x3000);
                ensure!(
                    leaf.is_some_and(|l| l.size == PageSize::Size2M),
                    "device leaf at +{off:#x}: {leaf:?}"
                );
                let cpu = env.cpu_phys(p, va + off + 0x3000);
                ensure!(
                    leaf.map(|l| l.phys) == cpu,
                    "device {leaf:?} vs CPU {cpu:?}"
                );
            }
            cpu_check(env, p, va, len, Pattern::constant(PAT))
        })
    }
}

/// anon_read repeated with remaps at the same address.
pub(super) mod anon_read_multiple {
    use super::*;

    /// Nothing beyond the defaults.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let len = 64 << 10;
        let (p, src) = spawn_mapped(env, len)?;
        let dst = mmap_rw(env, &p, len, "mmap dst")?;
        bound(env, p, |p, _, chan| {
            for round in 0..4u64 {
                let pat = Pattern::page_index(round << 32);
                cpu_fill(env, p, src, len, pat)?;
                ok(copy(chan, dst, src, len), "copy")?;
                cpu_check(env, p, dst, len, pat)?;
                ok(env.munmap(p, src, len), "munmap")?;
                let again = ok(env.mmap(p, src, len, Prot::RW, false), "remap")?;
                ensure!(again == src, "remap moved");
            }
            Ok(())
        })
    }
}

/// anon_write repeated with remaps at the same address.
pub(super) mod anon_write_multiple {
    use super::*;

    /// Nothing beyond the defaults.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let len = 128 << 10;
        let (p, va) = spawn_mapped(env, len)?;
        bound(env, p, |p, _, chan| {
            for round in 0..4u64 {
                ok(fill(chan, va, len, PAT ^ round), "fill")?;
                cpu_check(env, p, va, len, Pattern::constant(PAT ^ round))?;
                ok(env.munmap(p, va, len), "munmap")?;
                ok(env.mmap(p, va, len, Prot::RW, false), "remap")?;
                cpu_check(env, p, va, len, Pattern::constant(0))?;
            }
            Ok(())
        })
    }
}

/// Every page state, as `range_snapshot` reports it through the mirror.
pub(super) mod snapshot {
    use super::*;

    /// Nothing beyond the defaults.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let p = env.spawn()?;
        bound(env, p, |p, svm, _| {
            let pg = PAGE_SIZE;
            // hole: a mapping removed again.
            let hole = mmap_rw(env, p, pg, "mmap hole")?;
            ok(env.munmap(p, hole, pg), "munmap hole")?;
            let r = svm.snapshot(hole, hole + pg, 12);
            ensure!(r == Err(Errno::EFAULT), "hole: {r:?}");
            // PROT_NONE.
            let none = ok(env.mmap(p, 0, pg, Prot::NONE, false), "mmap none")?;
            let r = svm.snapshot(none, none + pg, 12);
            ensure!(r == Err(Errno::EPERM), "PROT_NONE: {r:?}");
            // untouched, zero page (CPU read), writable (CPU write), read-only.
            let va = mmap_rw(env, p, 4 * pg, "mmap")?;
            env.read(p, va + pg, &mut [0; 8])
                .map_err(|_| String::from("read"))?;
            write_u64(env, p, va + 2 * pg, 1)?;
            write_u64(env, p, va + 3 * pg, 2)?;
            ok(env.mprotect(p, va + 3 * pg, pg, Prot::READ), "mprotect")?;
            let r = ok(svm.snapshot(va, va + 4 * pg, 12), "snapshot")?;
            ensure!(r[0] == SnapEntry::None, "untouched: {:?}", r[0]);
            let zero = env.cpu_phys(p, va + pg);
            ensure!(
                matches!(r[1], SnapEntry::Valid { writable: false, phys } if Some(phys) == zero),
                "zero page: {:?} (CPU {zero:?})",
                r[1]
            );
            let w = env.cpu_phys(p, va + 2 * pg);
            ensure!(
                matches!(r[2], SnapEntry::Valid { writable: true, phys } if Some(phys) == w && Some(phys) != zero),
                "writable: {:?} (CPU {w:?})",
                r[2]
            );
            let ro = env.cpu_phys(p, va + 3 * pg);
            ensure!(
                matches!(r[3], SnapEntry::Valid { writable: false, phys } if Some(phys) == ro),
                "read-only: {:?} (CPU {ro:?})",
                r[3]
            );
            // 2 MiB: one entry per leaf, untouched then touched.
            let huge = ok(env.mmap(p, 0, LEAF_2M, Prot::RW, true), "mmap huge")?;
            let r = ok(svm.snapshot(huge, huge + LEAF_2M, 21), "snapshot huge")?;
            ensure!(r == [SnapEntry::None], "untouched huge: {r:?}");
            write_u64(env, p, huge + 0x1000, 3)?;
            let r = ok(svm.snapshot(huge, huge + LEAF_2M, 21), "snapshot huge")?;
            let hp = env.cpu_phys(p, huge);
            ensure!(
                matches!(r[..], [SnapEntry::Valid { writable: true, phys }] if Some(phys) == hp && phys % LEAF_2M == 0),
                "huge: {r:?} (CPU {hp:?})"
            );
            // A snapshot never faults: the untouched page is still untouched.
            ensure!(env.cpu_phys(p, va).is_none(), "snapshot faulted a page in");
            Ok(())
        })
    }
}

/// Same address in two processes, different data: each context sees its own.
pub(super) mod two_processes {
    use super::*;

    /// Nothing beyond the defaults.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let len = 64 << 10;
        let (p1, va) = spawn_mapped(env, len)?;
        let p2 = env.spawn()?;
        let va2 = ok(
            env.mmap(&p2, va, len, Prot::RW, false),
            "mmap 2 at the same address",
        )?;
        ensure!(va2 == va, "fixed mapping moved");
        let d1 = mmap_rw(env, &p1, len, "dst 1")?;
        let d2 = ok(env.mmap(&p2, d1, len, Prot::RW, false), "dst 2")?;
        ensure!(d1 == d2, "fixed mapping moved");
        let (pat1, pat2) = (
            Pattern::page_index(0x1111_0000),
            Pattern::page_index(0x2222_0000),
        );
        cpu_fill(env, &p1, va, len, pat1)?;
        cpu_fill(env, &p2, va, len, pat2)?;
        let (_s1, c1) = bind(env, &p1)?;
        let (_s2, c2) = bind(env, &p2)?;
        ok(copy(&c1, d1, va, len), "copy 1")?;
        ok(copy(&c2, d2, va, len), "copy 2")?;
        cpu_check(env, &p1, d1, len, pat1)?;
        cpu_check(env, &p2, d2, len, pat2)?;
        drop((c1, c2));
        env.exit(p1);
        env.exit(p2);
        Ok(())
    }
}

/// The CPU builds a linked list; a kernel walks it through SVM.
pub(super) mod pointer_chase {
    use super::*;

    /// Nothing beyond the defaults.
    pub const NEEDS: Needs = Needs::DEFAULT;

    pub fn run<E: SvmEnv>(env: &E) -> TestResult {
        let pages = 64u64;
        let (p, heap) = spawn_mapped(env, pages * PAGE_SIZE)?;
        let out = mmap_rw(env, &p, PAGE_SIZE, "mmap out")?;
        let code = mmap_rw(env, &p, PAGE_SIZE, "mmap code")?;
        // 300 nodes {next, value} scattered over the heap pages in a scrambled
        // order (a multiplicative walk), as a heap after churn would place them.
        let list = ChaseList {
            heap,
            slots: pages * PAGE_SIZE / 16,
            step: 7919,
            nodes: 300,
            value_offset: 3,
        };
        let sum = (0..list.nodes).fold(0u64, |s, i| s.wrapping_add(list.value(i)));
        env.build_list(&p, list)
            .map_err(|_| String::from("building the list faulted"))?;
        let k = CHASE_KERNEL;
        write_code(env, &p, code, &k)?;
        bound(env, p, |p, _, chan| {
            ok(
                chan.run(&launch(code, &k, 1, 1, [list.node(0), 0, 0, out])),
                "launch",
            )?;
            let got = read_u64(env, p, out)?;
            ensure!(got == sum, "sum {got}, expected {sum}");
            Ok(())
        })
    }
}
