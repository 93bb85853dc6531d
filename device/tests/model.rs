//! Property test: random map / unmap / protect / access / invalidate /
//! replay / cancel sequences against a simple reference model, checking the
//! data every access sees and every fault the device reports.

use faultline_abi::{Access, CtlOp, FaultReason, Pte, Status, LEAF_4K};
use faultline_device::testing::{cmd, Rig, DATA};
use proptest::prelude::*;

const PAGES: u64 = 8;
const FRAMES: u64 = 8;
const SLOTS: u64 = 4;
const VA: u64 = 0x40_0000;
const SCRATCH_VA: u64 = 0x80_0000;
const SCRATCH_GPA: u64 = DATA + 0x10_0000;

fn frame_gpa(f: u64) -> u64 {
    DATA + f * LEAF_4K
}

#[derive(Debug, Clone)]
enum Op {
    /// Map an unmapped page (no invalidation needed: nothing is cached).
    Map {
        page: u64,
        frame: u64,
        writable: bool,
    },
    /// Clear the PTE, then invalidate (range, context or all).
    Unmap { page: u64, how: u8 },
    /// Read-only → writable: no invalidation needed.
    Upgrade { page: u64 },
    /// Writable → read-only, then invalidate.
    Downgrade { page: u64, how: u8 },
    /// Device write (SEMAPHORE_RELEASE); on a fault fix or cancel.
    Write {
        page: u64,
        slot: u64,
        value: u64,
        fix: bool,
        frame: u64,
    },
    /// Device read (COPY to a scratch page); on a fault fix or cancel.
    Read {
        page: u64,
        slot: u64,
        fix: bool,
        frame: u64,
    },
    /// REPLAY with nothing stalled.
    Replay,
}

fn op() -> impl Strategy<Value = Op> {
    let page = 0..PAGES;
    prop_oneof![
        (page.clone(), 0..FRAMES, any::<bool>()).prop_map(|(page, frame, writable)| Op::Map {
            page,
            frame,
            writable
        }),
        (page.clone(), 0u8..3).prop_map(|(page, how)| Op::Unmap { page, how }),
        page.clone().prop_map(|page| Op::Upgrade { page }),
        (page.clone(), 0u8..3).prop_map(|(page, how)| Op::Downgrade { page, how }),
        (
            page.clone(),
            0..SLOTS,
            any::<u64>(),
            any::<bool>(),
            0..FRAMES
        )
            .prop_map(|(page, slot, value, fix, frame)| Op::Write {
                page,
                slot,
                value,
                fix,
                frame
            }),
        (page, 0..SLOTS, any::<bool>(), 0..FRAMES).prop_map(|(page, slot, fix, frame)| Op::Read {
            page,
            slot,
            fix,
            frame
        }),
        Just(Op::Replay),
    ]
}

#[derive(Default)]
struct Model {
    pte: [Option<(u64, bool)>; PAGES as usize],
    data: [[u64; SLOTS as usize]; FRAMES as usize],
}

fn invalidate(rig: &mut Rig, page: u64, how: u8) {
    let va = VA + page * LEAF_4K;
    let ok = match how {
        0 => rig.ctl_ok(CtlOp::InvalidateRange, 0, va, LEAF_4K),
        1 => rig.ctl_ok(CtlOp::InvalidateContext, 0, 0, 0),
        _ => rig.ctl_ok(CtlOp::InvalidateAll, 0, 0, 0),
    };
    assert!(ok, "invalidation acknowledged");
}

/// Run a command that may fault once. Returns the completion status after
/// the fault (if any) was fixed or cancelled.
fn access(
    rig: &mut Rig,
    m: &mut Model,
    c: [u8; 64],
    page: u64,
    access: Access,
    fix: bool,
    frame: u64,
) -> Result<Status, TestCaseError> {
    let t = rig.exec(0, c);
    let va = VA + page * LEAF_4K;
    let expect_fault = match m.pte[page as usize] {
        None => Some(FaultReason::NotPresent),
        Some((_, false)) if access == Access::Write => Some(FaultReason::WriteProtect),
        _ => None,
    };
    let faults = rig.drain_faults();
    let Some(reason) = expect_fault else {
        prop_assert!(faults.is_empty(), "unexpected faults {faults:?}");
        return Ok(rig.status(t));
    };
    prop_assert_eq!(faults.len(), 1, "exactly one fault report");
    prop_assert_eq!(faults[0].va, va);
    prop_assert_eq!(faults[0].access, access as u8);
    prop_assert_eq!(faults[0].reason, reason as u8);
    prop_assert!(rig.completion(t).is_none(), "stalled until replay");
    if fix {
        let (frame, _) = m.pte[page as usize].unwrap_or((frame, true));
        rig.map(0, va, frame_gpa(frame), LEAF_4K, Pte::WRITE);
        m.pte[page as usize] = Some((frame, true));
        rig.replay();
    } else {
        prop_assert!(rig.ctl_ok(CtlOp::CancelRange, 0, va, 0));
    }
    let st = rig.status(t);
    prop_assert_eq!(st, if fix { Status::Ok } else { Status::Cancelled });
    Ok(st)
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut rig = Rig::new(32 << 20, 64);
    assert!(rig.enable_channel(0, 0));
    rig.map(0, SCRATCH_VA, SCRATCH_GPA, LEAF_4K, Pte::WRITE);
    let mut m = Model::default();
    for f in 0..FRAMES {
        for s in 0..SLOTS {
            let v = f * 1000 + s;
            rig.write_u64(frame_gpa(f) + s * 8, v);
            m.data[f as usize][s as usize] = v;
        }
    }
    for op in ops {
        match op {
            Op::Map {
                page,
                frame,
                writable,
            } => {
                if m.pte[page as usize].is_none() {
                    let flags = if writable { Pte::WRITE } else { Pte::empty() };
                    rig.map(0, VA + page * LEAF_4K, frame_gpa(frame), LEAF_4K, flags);
                    m.pte[page as usize] = Some((frame, writable));
                }
            }
            Op::Unmap { page, how } => {
                rig.unmap(0, VA + page * LEAF_4K, LEAF_4K);
                m.pte[page as usize] = None;
                invalidate(&mut rig, page, how);
            }
            Op::Upgrade { page } => {
                if let Some((frame, _)) = m.pte[page as usize] {
                    rig.map(
                        0,
                        VA + page * LEAF_4K,
                        frame_gpa(frame),
                        LEAF_4K,
                        Pte::WRITE,
                    );
                    m.pte[page as usize] = Some((frame, true));
                }
            }
            Op::Downgrade { page, how } => {
                if let Some((frame, _)) = m.pte[page as usize] {
                    rig.map(
                        0,
                        VA + page * LEAF_4K,
                        frame_gpa(frame),
                        LEAF_4K,
                        Pte::empty(),
                    );
                    m.pte[page as usize] = Some((frame, false));
                    invalidate(&mut rig, page, how);
                }
            }
            Op::Write {
                page,
                slot,
                value,
                fix,
                frame,
            } => {
                let va = VA + page * LEAF_4K + slot * 8;
                let st = access(
                    &mut rig,
                    &mut m,
                    cmd::semaphore(va, true, value),
                    page,
                    Access::Write,
                    fix,
                    frame,
                )?;
                if st == Status::Ok {
                    let Some((f, _)) = m.pte[page as usize] else {
                        return Err(TestCaseError::fail("wrote through an unmapped page"));
                    };
                    m.data[f as usize][slot as usize] = value;
                }
            }
            Op::Read {
                page,
                slot,
                fix,
                frame,
            } => {
                let va = VA + page * LEAF_4K + slot * 8;
                rig.write_u64(SCRATCH_GPA, u64::MAX);
                let st = access(
                    &mut rig,
                    &mut m,
                    cmd::copy(SCRATCH_VA, va, 8),
                    page,
                    Access::Read,
                    fix,
                    frame,
                )?;
                if st == Status::Ok {
                    let Some((f, _)) = m.pte[page as usize] else {
                        return Err(TestCaseError::fail("read through an unmapped page"));
                    };
                    prop_assert_eq!(rig.read_u64(SCRATCH_GPA), m.data[f as usize][slot as usize]);
                } else {
                    prop_assert_eq!(
                        rig.read_u64(SCRATCH_GPA),
                        u64::MAX,
                        "cancelled read wrote nothing"
                    );
                }
            }
            Op::Replay => rig.replay(),
        }
    }
    // Every frame holds exactly what the model says.
    for f in 0..FRAMES {
        for s in 0..SLOTS {
            prop_assert_eq!(
                rig.read_u64(frame_gpa(f) + s * 8),
                m.data[f as usize][s as usize]
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn device_matches_reference_model(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops)?;
    }
}
