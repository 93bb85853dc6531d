//! Property test in the host loopback: random CPU mmap/munmap/mprotect,
//! mremap (MREMAP_FIXED, with or without DONTUNMAP), madvise(DONTNEED) and
//! writes interleaved with GPU FILLs and reads of the same pages, and a
//! forked child (no mirror) writing and reading its copy-on-write view,
//! then exiting or being forked anew. After every
//! step the device page table must be a subset of the CPU's (every device
//! leaf maps the frame the CPU maps at that address, never more permission),
//! GPU results must match a model of the CPU mappings, and no frame freed
//! by the CPU side may be written afterwards (canaries).

mod common;

use common::env::LoopEnv;
use faultline_abi::{Pte, Status, PAGE_SIZE};
use faultline_driver::errno::Errno;
use faultline_driver::gpu::suite::{Prot, SvmEnv};
use faultline_driver::gpu::{Channel, Command, GpuConfig, GpuError, SvmConfig, SvmContext};
use faultline_driver::mm::{Mremap, MremapFlags};
use proptest::prelude::*;

const PAGES: u64 = 8;
const BASE: u64 = 0x40_0000_0000;
const SCRATCH: u64 = 0x50_0000_0000;
const CANARY: u64 = 0x0bad_c0de_0bad_c0de;

#[derive(Debug, Clone)]
enum Op {
    Map(u64, u64, u8),
    Unmap(u64, u64),
    Protect(u64, u64, u8),
    /// mremap of `n` pages from the first page to the second (FIXED),
    /// with DONTUNMAP if set.
    Remap(u64, u64, u64, bool),
    DontNeed(u64, u64),
    CpuWrite(u64, u64),
    GpuFill(u64, u64),
    GpuRead(u64),
    /// Fork (a child there already exits first).
    Fork,
    /// A CPU write in the child.
    ChildWrite(u64, u64),
    /// A CPU read in the child.
    ChildRead(u64),
    ChildExit,
}

fn prot(p: u8) -> Prot {
    match p % 3 {
        0 => Prot::NONE,
        1 => Prot::READ,
        _ => Prot::RW,
    }
}

fn op() -> impl Strategy<Value = Op> {
    let page = 0..PAGES;
    let span = 1..=3u64;
    prop_oneof![
        (page.clone(), span.clone(), any::<u8>()).prop_map(|(p, n, r)| Op::Map(p, n, r)),
        (page.clone(), span.clone()).prop_map(|(p, n)| Op::Unmap(p, n)),
        (page.clone(), span.clone(), any::<u8>()).prop_map(|(p, n, r)| Op::Protect(p, n, r)),
        (page.clone(), span.clone(), page.clone(), any::<bool>())
            .prop_map(|(p, n, t, d)| Op::Remap(p, n, t, d)),
        (page.clone(), span).prop_map(|(p, n)| Op::DontNeed(p, n)),
        (page.clone(), any::<u64>()).prop_map(|(p, v)| Op::CpuWrite(p, v)),
        (page.clone(), any::<u64>()).prop_map(|(p, v)| Op::GpuFill(p, v)),
        page.clone().prop_map(Op::GpuRead),
        Just(Op::Fork),
        (page.clone(), any::<u64>()).prop_map(|(p, v)| Op::ChildWrite(p, v)),
        page.prop_map(Op::ChildRead),
        Just(Op::ChildExit),
    ]
}

/// Per page: None = no VMA; Some((prot, first word)).
type Model = [Option<(Prot, u64)>; PAGES as usize];

fn va(page: u64) -> u64 {
    BASE + page * PAGE_SIZE
}

fn run_case(ops: &[Op], around: u64, canaries: bool) -> Result<(), TestCaseError> {
    let env = LoopEnv::new(16, GpuConfig::default());
    let p = env.spawn().map_err(TestCaseError::fail)?;
    env.mmap(&p, SCRATCH, PAGE_SIZE, Prot::RW, false)
        .map_err(|e| TestCaseError::fail(format!("{e}")))?;
    let svm = SvmContext::new(
        env.gpu(),
        &p,
        SvmConfig {
            fault_around: around,
            ..SvmConfig::default()
        },
    )
    .map_err(|e| TestCaseError::fail(format!("{e}")))?;
    let chan = Channel::open(svm.context()).map_err(|e| TestCaseError::fail(format!("{e}")))?;
    if canaries {
        env.track_freed(Some(CANARY));
    }
    let mut model: Model = [None; PAGES as usize];
    // The child and its own model (its pages as they were at the fork,
    // then its own writes).
    let mut child: Option<(<LoopEnv as SvmEnv>::Process, Model)> = None;
    let mut freed: Vec<u64> = Vec::new();
    for (step, op) in ops.iter().enumerate() {
        match *op {
            Op::Map(pg, n, r) => {
                let n = n.min(PAGES - pg);
                let free = (pg..pg + n).all(|i| model[i as usize].is_none());
                let res = env.mmap(&p, va(pg), n * PAGE_SIZE, prot(r), false);
                prop_assert_eq!(res.is_ok(), free, "step {}: {:?}", step, op);
                if free {
                    for i in pg..pg + n {
                        model[i as usize] = Some((prot(r), 0));
                    }
                }
            }
            Op::Unmap(pg, n) => {
                let n = n.min(PAGES - pg);
                env.munmap(&p, va(pg), n * PAGE_SIZE)
                    .map_err(|e| TestCaseError::fail(format!("munmap: {e}")))?;
                for i in pg..pg + n {
                    model[i as usize] = None;
                }
            }
            Op::Protect(pg, n, r) => {
                let n = n.min(PAGES - pg);
                env.mprotect(&p, va(pg), n * PAGE_SIZE, prot(r))
                    .map_err(|e| TestCaseError::fail(format!("mprotect: {e}")))?;
                for i in pg..pg + n {
                    if let Some((pr, _)) = model[i as usize].as_mut() {
                        *pr = prot(r);
                    }
                }
            }
            Op::Remap(pg, n, to, dontunmap) => {
                let n = n.min(PAGES - pg).min(PAGES - to);
                let mut flags = MremapFlags::MAYMOVE | MremapFlags::FIXED;
                if dontunmap {
                    flags |= MremapFlags::DONTUNMAP;
                }
                let r = env.mremap(
                    &p,
                    Mremap {
                        old: va(pg),
                        old_len: n * PAGE_SIZE,
                        new_len: n * PAGE_SIZE,
                        flags,
                        new_addr: va(to),
                    },
                );
                let overlap = to < pg + n && pg < to + n;
                let mapped = (pg..pg + n).all(|i| model[i as usize].is_some());
                if overlap {
                    prop_assert_eq!(r, Err(Errno::EINVAL), "step {}: {:?}", step, op);
                } else if !mapped {
                    prop_assert_eq!(r, Err(Errno::EFAULT), "step {}: {:?}", step, op);
                } else {
                    // The range may span two VMAs (mprotect splits them, the
                    // simulated mm never merges): EFAULT, nothing changed.
                    prop_assert!(
                        r == Ok(va(to)) || r == Err(Errno::EFAULT),
                        "step {}: {:?}: {:?}",
                        step,
                        op,
                        r
                    );
                    if r.is_ok() {
                        for i in 0..n {
                            let from = model[(pg + i) as usize];
                            model[(to + i) as usize] = from;
                            model[(pg + i) as usize] = if dontunmap {
                                from.map(|(pr, _)| (pr, 0))
                            } else {
                                None
                            };
                        }
                    }
                }
            }
            Op::DontNeed(pg, n) => {
                let n = n.min(PAGES - pg);
                let r = env.madvise_dontneed(&p, va(pg), n * PAGE_SIZE);
                let holes = (pg..pg + n).any(|i| model[i as usize].is_none());
                let want = if holes { Err(Errno::ENOMEM) } else { Ok(()) };
                prop_assert_eq!(r, want, "step {}: {:?}", step, op);
                for i in pg..pg + n {
                    if let Some((_, v)) = model[i as usize].as_mut() {
                        *v = 0;
                    }
                }
            }
            Op::CpuWrite(pg, v) => {
                let ok = env.write(&p, va(pg), &v.to_le_bytes()).is_ok();
                let want = matches!(model[pg as usize], Some((pr, _)) if pr.contains(Prot::WRITE));
                prop_assert_eq!(ok, want, "step {}: {:?}", step, op);
                if ok {
                    model[pg as usize] = model[pg as usize].map(|(pr, _)| (pr, v));
                }
            }
            Op::GpuFill(pg, v) => {
                let r = chan.run(&Command::Fill {
                    dst: va(pg),
                    len: PAGE_SIZE,
                    pattern: v,
                });
                let want = matches!(model[pg as usize], Some((pr, _)) if pr.contains(Prot::WRITE));
                if want {
                    prop_assert_eq!(r, Ok(0), "step {}: {:?}", step, op);
                    model[pg as usize] = model[pg as usize].map(|(pr, _)| (pr, v));
                } else {
                    prop_assert_eq!(
                        r,
                        Err(GpuError::Command(Status::Cancelled)),
                        "step {}: {:?}",
                        step,
                        op
                    );
                }
            }
            Op::Fork => {
                if let Some((c, _)) = child.take() {
                    env.exit(c);
                }
                let c = env.fork(&p).map_err(TestCaseError::fail)?;
                child = Some((c, model));
            }
            Op::ChildWrite(pg, v) => {
                if let Some((c, m)) = child.as_mut() {
                    let ok = env.write(c, va(pg), &v.to_le_bytes()).is_ok();
                    let want = matches!(m[pg as usize], Some((pr, _)) if pr.contains(Prot::WRITE));
                    prop_assert_eq!(ok, want, "step {}: {:?}", step, op);
                    if ok {
                        m[pg as usize] = m[pg as usize].map(|(pr, _)| (pr, v));
                    }
                    // The parent's copy is untouched.
                    if let Some((pr, want)) = model[pg as usize] {
                        if pr.contains(Prot::READ) {
                            let mut b = [0u8; 8];
                            env.read(&p, va(pg), &mut b)
                                .map_err(|_| TestCaseError::fail("parent read"))?;
                            prop_assert_eq!(u64::from_le_bytes(b), want, "step {}: {:?}", step, op);
                        }
                    }
                }
            }
            Op::ChildRead(pg) => {
                if let Some((c, m)) = child.as_ref() {
                    let mut b = [0u8; 8];
                    let r = env.read(c, va(pg), &mut b).map(|()| u64::from_le_bytes(b));
                    match m[pg as usize] {
                        Some((pr, v)) if pr.contains(Prot::READ) => {
                            prop_assert_eq!(r, Ok(v), "step {}: {:?}", step, op)
                        }
                        _ => prop_assert!(r.is_err(), "step {}: {:?}: {:?}", step, op, r),
                    }
                }
            }
            Op::ChildExit => {
                if let Some((c, _)) = child.take() {
                    env.exit(c);
                }
            }
            Op::GpuRead(pg) => {
                env.write(&p, SCRATCH, &u64::MAX.to_le_bytes())
                    .map_err(|_| TestCaseError::fail("scratch"))?;
                let r = chan.run(&Command::Copy {
                    dst: SCRATCH,
                    src: va(pg),
                    len: 8,
                });
                match model[pg as usize] {
                    Some((pr, v)) if pr.contains(Prot::READ) => {
                        prop_assert_eq!(r, Ok(0), "step {}: {:?}", step, op);
                        let mut b = [0u8; 8];
                        env.read(&p, SCRATCH, &mut b)
                            .map_err(|_| TestCaseError::fail("scratch"))?;
                        prop_assert_eq!(u64::from_le_bytes(b), v, "step {}: GPU read", step);
                    }
                    _ => prop_assert_eq!(
                        r,
                        Err(GpuError::Command(Status::Cancelled)),
                        "step {}: {:?}",
                        step,
                        op
                    ),
                }
            }
        }
        // The device never maps what the CPU does not, nor with more rights.
        for pg in 0..PAGES {
            if let Some(leaf) = svm.device_lookup(va(pg)) {
                let cpu = env.cpu_phys(&p, va(pg));
                prop_assert_eq!(
                    Some(leaf.phys),
                    cpu,
                    "step {}: page {} device vs CPU",
                    step,
                    pg
                );
                let m = model[pg as usize];
                prop_assert!(
                    matches!(m, Some((pr, _)) if pr.contains(Prot::READ)),
                    "step {}: device maps page {} the CPU cannot read",
                    step,
                    pg
                );
                if leaf.perms.contains(Pte::WRITE) {
                    prop_assert!(
                        matches!(m, Some((pr, _)) if pr.contains(Prot::WRITE)),
                        "step {}: device may write read-only page {}",
                        step,
                        pg
                    );
                }
            }
        }
        // No device write into a frame after the CPU side freed it.
        freed.extend(env.take_freed());
        for &pa in &freed {
            for off in [0, PAGE_SIZE - 8] {
                let mut b = [0u8; 8];
                env.read_phys(pa + off, &mut b);
                prop_assert_eq!(
                    u64::from_le_bytes(b),
                    CANARY,
                    "step {}: frame {:#x}",
                    step,
                    pa
                );
            }
        }
    }
    drop(chan);
    env.track_freed(None);
    if let Some((c, _)) = child {
        env.exit(c);
    }
    env.exit(p);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn device_never_outlives_the_cpu_mapping(
        ops in proptest::collection::vec(op(), 1..40),
        around in prop_oneof![Just(4096u64), Just(16384), Just(65536)],
        canaries in any::<bool>(),
    ) {
        run_case(&ops, around, canaries)?;
    }
}
