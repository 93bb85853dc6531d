//! Fault injection (`--gpu-inject`, `faultline_device::inject`): the spec
//! parser, INJECT_ACTIVE, determinism, and each knob observably firing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use faultline_abi::{
    doorbell, engine, regs, status_block, vector, Access, CtlEntry, CtlOp, CtlStatus, FaultFlags,
    FaultReason, InjectKnobs, Pte, Status, LEAF_4K,
};
use faultline_device::inject::{InjectError, Knob, PPM};
use faultline_device::testing::{cmd, Rig, DATA};
use faultline_device::{InjectSpec, Worker};
use vm_memory::{Bytes, GuestAddress};

const MEM: u64 = 64 << 20;

fn spec(s: &str) -> InjectSpec {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// A rig with injection `s` on the manual clock: deadlines pass only when
/// the test (or `Rig::settle`) says so.
fn rig(s: &str, fault_entries: u32) -> Rig {
    let mut r = Rig::with_inject(MEM, fault_entries, spec(s));
    r.manual_clock();
    for ch in 0..8 {
        assert!(r.enable_channel(ch, 0));
    }
    r
}

fn fired(r: &Rig, k: Knob) -> u64 {
    r.dev.injector().map_or(0, |i| i.fired(k))
}

fn ctl_status(r: &Rig, entry: u64) -> u32 {
    r.read_u32(entry + CtlEntry::STATUS_OFFSET as u64)
}

// -------------------------------------------------------------- parsing

#[test]
fn specs_parse_and_print_canonically() {
    let s = spec("seed=7,tlb_ack_delay_steps=64,fault_reorder=1,spurious=0.01");
    assert_eq!(s.seed, 7);
    assert_eq!(s.tlb_ack_delay_steps, 64);
    assert!(s.fault_reorder);
    assert_eq!(s.spurious_ppm, 10_000);
    assert_eq!(
        s.to_string(),
        "seed=7,tlb_ack_delay_steps=64,fault_reorder=1,spurious=0.01"
    );
    let all = "seed=3,tlb_ack_delay_steps=2,tlb_ack_delay_us=5,fault_msi_delay_us=6,\
               fault_reorder=1,fault_dup=0.5,spurious=1,fault_overflow_at=9,\
               engine_stall_us=7,engine_stall=0.25";
    let s = spec(all);
    assert_eq!(spec(&s.to_string()), s, "Display parses back");
    assert_eq!(s.engine_stall_ppm, PPM / 4);
    // Defaults: seed 1, everything off; spaces around items are fine.
    let d = spec(" seed = 1 ");
    assert_eq!(d, InjectSpec::default());
    assert_eq!(d.to_string(), "seed=1");
}

#[test]
fn bad_specs_name_the_bad_key_or_value() {
    let err = |s: &str| s.parse::<InjectSpec>().unwrap_err();
    assert_eq!(err(""), InjectError::Empty);
    assert_eq!(err("seed"), InjectError::NotKeyValue("seed".into()));
    assert_eq!(err("nope=1"), InjectError::UnknownKey("nope".into()));
    assert_eq!(err("seed=1,seed=2"), InjectError::Duplicate("seed".into()));
    assert_eq!(
        err("engine_stall=0.5"),
        InjectError::StallWithoutTime("0.5".into())
    );
    for (s, key, value) in [
        ("seed=-1", "seed", "-1"),
        ("spurious=1.5", "spurious", "1.5"),
        ("fault_dup=abc", "fault_dup", "abc"),
        ("fault_reorder=2", "fault_reorder", "2"),
        ("fault_overflow_at=0", "fault_overflow_at", "0"),
        ("fault_overflow_at=65537", "fault_overflow_at", "65537"),
        ("tlb_ack_delay_us=1000001", "tlb_ack_delay_us", "1000001"),
        ("tlb_ack_delay_steps=x", "tlb_ack_delay_steps", "x"),
    ] {
        match err(s) {
            InjectError::BadValue {
                key: k, value: v, ..
            } => {
                assert_eq!((k.as_str(), v.as_str()), (key, value), "{s}")
            }
            e => panic!("{s}: {e:?}"),
        }
        assert!(err(s).to_string().starts_with(&format!("{key}={value}: ")));
    }
}

// ------------------------------------------------------- INJECT_ACTIVE

#[test]
fn inject_active_reports_the_knobs_in_effect() {
    let mut off = Rig::new(MEM, 64);
    assert_eq!(off.r32(regs::INJECT_ACTIVE), 0);
    assert!(off.dev.injector().is_none());
    let mut seed_only = rig("seed=5", 64);
    assert_eq!(seed_only.r32(regs::INJECT_ACTIVE), 0);
    let mut r = rig(
        "tlb_ack_delay_us=3,fault_reorder=1,spurious=0.5,engine_stall_us=2,engine_stall=0",
        64,
    );
    let want = InjectKnobs::TLB_ACK_DELAY_US | InjectKnobs::FAULT_REORDER | InjectKnobs::SPURIOUS;
    assert_eq!(r.r32(regs::INJECT_ACTIVE), want.bits());
    let mut all = rig(
        "tlb_ack_delay_steps=1,tlb_ack_delay_us=1,fault_msi_delay_us=1,fault_reorder=1,\
         fault_dup=0.1,spurious=0.1,fault_overflow_at=4,engine_stall_us=1",
        64,
    );
    assert_eq!(all.r32(regs::INJECT_ACTIVE), InjectKnobs::all().bits());
    // Read-only: a write changes nothing.
    all.w32(regs::INJECT_ACTIVE, 0);
    assert_eq!(all.r32(regs::INJECT_ACTIVE), InjectKnobs::all().bits());
}

#[test]
fn stats_carry_the_spec_and_the_fired_counts() {
    let mut r = rig("seed=9,fault_dup=1", 64);
    r.exec(0, cmd::fill(0x1000, 8, 1));
    let named = r.dev.named_counters();
    let v = |n: &str| named.iter().find(|(k, _)| k == n).map(|(_, v)| *v);
    assert_eq!(v("inject.spec.seed"), Some(9));
    assert_eq!(v("inject.spec.fault_dup_ppm"), Some(u64::from(PPM)));
    assert_eq!(v("inject.fired.fault_dup"), Some(1));
    assert_eq!(v("inject.fired.spurious"), Some(0));
    let plain = Rig::new(MEM, 64);
    assert!(plain
        .dev
        .named_counters()
        .iter()
        .all(|(k, _)| !k.starts_with("inject.")));
}

// ------------------------------------------------- fault-buffer knobs

/// Four channels FILL four unmapped pages: one step, one batch of four
/// faults. Returns the entries' pages in buffer order.
fn four_fault_batch(r: &mut Rig) -> Vec<u64> {
    for ch in 0..4 {
        r.submit(ch, cmd::fill(0x10_0000 * (ch as u64 + 1), 8, 1));
        r.dev.doorbell(doorbell::channel(ch as u32));
    }
    r.dev.run_until_idle();
    r.drain_faults().iter().map(|e| e.va).collect()
}

#[test]
fn fault_reorder_permutes_a_batch_deterministically_by_seed() {
    let plain = four_fault_batch(&mut rig("seed=1", 64));
    assert_eq!(plain, [0x10_0000, 0x20_0000, 0x30_0000, 0x40_0000]);
    let mut orders = Vec::new();
    for seed in 1..=8 {
        let s = format!("seed={seed},fault_reorder=1");
        let mut a = rig(&s, 64);
        let order = four_fault_batch(&mut a);
        assert_eq!(fired(&a, Knob::FaultReorder), 1);
        assert_eq!(
            order,
            four_fault_batch(&mut rig(&s, 64)),
            "same seed, same order"
        );
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, plain, "a permutation of the same faults");
        orders.push(order);
    }
    assert!(
        orders.iter().any(|o| *o != plain),
        "no seed reordered anything: {orders:x?}"
    );
}

#[test]
fn fault_dup_writes_entries_twice_deterministically() {
    let mut all = rig("fault_dup=1", 64);
    let pages = four_fault_batch(&mut all);
    assert_eq!(
        pages,
        [0x10_0000, 0x10_0000, 0x20_0000, 0x20_0000, 0x30_0000, 0x30_0000, 0x40_0000, 0x40_0000]
    );
    assert_eq!(fired(&all, Knob::FaultDup), 4);
    let half = |seed| {
        let mut r = rig(&format!("seed={seed},fault_dup=0.5"), 64);
        (four_fault_batch(&mut r), fired(&r, Knob::FaultDup))
    };
    for seed in 1..=4 {
        let (pages, dups) = half(seed);
        assert_eq!((pages.len() as u64), 4 + dups);
        assert_eq!(half(seed), (pages, dups), "seed {seed}");
    }
    // The driver still gets each fault; a REPLAY after mapping finishes.
    all.map_range(0, 0x10_0000, DATA, 0x40_0000, LEAF_4K, Pte::WRITE);
    all.replay();
    assert!(all.drain_faults().is_empty());
}

#[test]
fn spurious_reports_a_hit_and_never_hides_a_real_fault() {
    let mut r = rig("spurious=1", 64);
    r.map(0, 0x1000, DATA, LEAF_4K, Pte::WRITE);
    let t = r.exec(0, cmd::fill(0x1000, 8, 0x55));
    assert_eq!(r.status(t), Status::Ok, "the access proceeds");
    assert_eq!(r.read_u64(DATA), 0x55);
    let e = r.drain_faults();
    assert_eq!(e.len(), 1);
    assert_eq!((e[0].va, e[0].access), (0x1000, Access::Write as u8));
    assert_eq!(e[0].engine, engine::FILL);
    assert_eq!(e[0].reason, FaultReason::NotPresent as u8);
    assert_eq!(fired(&r, Knob::Spurious), 1);
    // The same (context, page, access) faulting for real afterwards is
    // reported, not deduplicated against the spurious one.
    r.unmap(0, 0x1000, LEAF_4K);
    assert!(r.ctl_ok(CtlOp::InvalidateRange, 0, 0x1000, 0x1000));
    let t = r.exec(0, cmd::fill(0x1000, 8, 0x66));
    assert_eq!(r.completion(t), None, "stalled");
    let e = r.drain_faults();
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].va, 0x1000);
    assert_eq!(fired(&r, Knob::Spurious), 1, "a fault is no hit");
}

#[test]
fn spurious_at_half_is_deterministic() {
    let run = || {
        let mut r = rig("seed=11,spurious=0.5", 64);
        r.map_range(0, 0x1000, DATA, 32 * 0x1000, LEAF_4K, Pte::WRITE);
        for i in 0..32u64 {
            r.exec(0, cmd::fill(0x1000 * (i + 1), 8, i));
        }
        let pages: Vec<u64> = r.drain_faults().iter().map(|e| e.va).collect();
        (pages, fired(&r, Knob::Spurious))
    };
    let (pages, n) = run();
    assert_eq!(pages.len() as u64, n);
    assert!((4..=28).contains(&n), "{n} of 32 at p = 0.5");
    assert_eq!(run(), (pages, n));
}

#[test]
fn fault_overflow_at_overflows_early() {
    let mut r = rig("fault_overflow_at=2", 64);
    let pages = four_fault_batch(&mut r);
    assert_eq!(pages.len(), 2, "only two fit the injected limit");
    assert_eq!(r.sb(status_block::FAULT_FLAGS), FaultFlags::OVERFLOW.bits());
    assert_eq!(r.dev.fault_backlog(), 2);
    assert_eq!(fired(&r, Knob::FaultOverflowAt), 2);
    // GET advanced by two: the held-back two come out, and OVERFLOW clears.
    r.ring(doorbell::FAULT_GET);
    assert_eq!(r.drain_faults().len(), 2);
    assert_eq!(r.sb(status_block::FAULT_FLAGS), 0);
}

// ------------------------------------------------------ control delays

#[test]
fn tlb_ack_arrives_only_after_the_delay_in_steps() {
    let mut r = rig("tlb_ack_delay_steps=5", 64);
    r.map(0, 0x1000, DATA, LEAF_4K, Pte::WRITE);
    r.exec(0, cmd::fill(0x1000, 8, 1));
    assert_eq!(r.dev.mmu_mut().tlb_len(0), 1);
    let e = r.post_ctl(CtlOp::InvalidateRange, 0, 0x1000, 0x1000);
    let mut steps = 0;
    while !r.ctl_acked() {
        steps += 1;
        assert!(steps <= 100, "never acknowledged");
        assert!(
            r.dev.process() || r.ctl_acked(),
            "busy while the ack is due"
        );
        if !r.ctl_acked() {
            // Not served at all yet: the TLB still holds the entry.
            assert_eq!(r.dev.mmu_mut().tlb_len(0), 1);
        }
    }
    assert_eq!(steps, 6, "the doorbell's step and five more");
    assert_eq!(ctl_status(&r, e), CtlStatus::Ok as u32);
    assert_eq!(r.dev.mmu_mut().tlb_len(0), 0);
    assert_eq!(fired(&r, Knob::TlbAckDelaySteps), 1);
}

#[test]
fn a_replay_after_a_delayed_invalidate_waits_for_it() {
    let mut r = rig("tlb_ack_delay_steps=8", 64);
    let t = r.exec(0, cmd::fill(0x1000, 8, 1));
    assert_eq!(r.drain_faults().len(), 1);
    r.map(0, 0x1000, DATA, LEAF_4K, Pte::WRITE);
    r.post_ctl(CtlOp::InvalidateRange, 0, 0x1000, 0x1000);
    r.dev.doorbell(doorbell::REPLAY);
    let mut steps = 0;
    while !r.ctl_acked() {
        assert_eq!(r.sb(status_block::REPLAY_SEQ), 0, "replayed before the ack");
        assert_eq!(r.completion(t), None);
        r.dev.process();
        steps += 1;
        assert!(steps < 100);
    }
    r.dev.run_until_idle();
    assert_eq!(r.sb(status_block::REPLAY_SEQ), 1);
    assert_eq!(r.status(t), Status::Ok);
}

#[test]
fn tlb_ack_delay_in_us_is_a_deadline_not_a_spin() {
    let mut r = rig("tlb_ack_delay_us=30000", 64);
    let clock = r.manual_clock();
    r.post_ctl(CtlOp::InvalidateAll, 0, 0, 0);
    r.dev.run_until_idle();
    assert!(!r.ctl_acked());
    let d = r.dev.next_deadline().expect("a deadline");
    assert_eq!(d, Duration::from_millis(30));
    clock.advance(29_999_999);
    r.dev.process();
    assert!(!r.ctl_acked(), "acked before the delay");
    r.settle();
    assert!(r.ctl_acked());
    assert_eq!(clock.now(), 30_000_000);
    assert_eq!(fired(&r, Knob::TlbAckDelayUs), 1);
    assert_eq!(r.dev.next_deadline(), None);

    // Through the worker on the host's clock: it sleeps until the deadline
    // (a timerfd), so it runs a handful of steps, not thousands.
    let mut r = Rig::with_inject(MEM, 64, spec("tlb_ack_delay_us=30000"));
    r.post_ctl(CtlOp::InvalidateAll, 0, 0, 0);
    let mem = r.mem().clone();
    let steps = r.dev.step_counter();
    let dev = Arc::new(faultline_device::DeviceMutex::new(r.dev));
    let start = Instant::now();
    let worker = Worker::spawn(dev, Vec::new()).unwrap();
    worker.waker().wake();
    let cons = || -> u32 {
        mem.read_obj(GuestAddress(
            faultline_device::testing::SB + status_block::CTL_CONS,
        ))
        .unwrap()
    };
    while cons() != 1 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "worker never acked"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let took = start.elapsed();
    worker.shutdown();
    assert!(took >= Duration::from_millis(30), "{took:?}");
    let n = steps.load(std::sync::atomic::Ordering::Relaxed);
    assert!(n < 20, "{n} steps: the worker spun");
}

#[test]
fn fault_msi_comes_after_the_delay() {
    let mut r = rig("fault_msi_delay_us=30000", 64);
    let clock = r.manual_clock();
    r.irq.take();
    r.exec(0, cmd::fill(0x1000, 8, 1));
    assert_eq!(r.sb(status_block::FAULT_PUT), 1, "the entry is written now");
    assert!(!r.irq.take().contains(&vector::FAULT), "the MSI is late");
    r.settle();
    assert_eq!(clock.now(), 30_000_000);
    assert_eq!(r.irq.take(), [vector::FAULT]);
    assert_eq!(fired(&r, Knob::FaultMsiDelay), 1);
}

// ------------------------------------------------------- engine stall

#[test]
fn a_stalled_engine_defers_an_overlapping_invalidate_ack() {
    let mut r = rig("engine_stall_us=30000", 64);
    let clock = r.manual_clock();
    r.map(0, 0x1000, DATA, LEAF_4K, Pte::WRITE);
    r.map(0, 0x9000, DATA + 0x8000, LEAF_4K, Pte::WRITE);
    let t = r.exec(0, cmd::fill(0x1000, 8, 0x77));
    assert_eq!(
        r.completion(t),
        None,
        "paused between translation and access"
    );
    assert_eq!(r.read_u64(DATA), 0);
    assert_eq!(fired(&r, Knob::EngineStall), 1);
    // An invalidate elsewhere is acknowledged at once.
    let other = r.post_ctl(CtlOp::InvalidateRange, 0, 0x9000, 0x1000);
    r.dev.run_until_idle();
    assert!(r.ctl_acked());
    assert_eq!(ctl_status(&r, other), CtlStatus::Ok as u32);
    // The munmap: the CPU side clears the PTE, then invalidates.
    r.unmap(0, 0x1000, LEAF_4K);
    r.post_ctl(CtlOp::InvalidateRange, 0, 0x1000, 0x1000);
    r.dev.run_until_idle();
    assert!(!r.ctl_acked(), "acknowledged under a held translation");
    let start = Instant::now();
    while !r.ctl_acked() {
        assert!(start.elapsed() < Duration::from_secs(10));
        // The first time the ack is visible, the access is complete
        // (checked right after the loop).
        let d = r.dev.next_deadline().unwrap_or_default();
        clock.advance(d.as_nanos().max(1) as u64);
        r.dev.process();
    }
    assert_eq!(r.status(t), Status::Ok);
    assert_eq!(r.read_u64(DATA), 0x77);
    assert_eq!(r.dev.next_deadline(), None);
}

#[test]
fn stalled_copy_and_atomic_complete_with_their_translations() {
    let mut r = rig("engine_stall_us=2000", 64);
    r.map_range(0, 0x1000, DATA, 0x4000, LEAF_4K, Pte::WRITE | Pte::ATOMIC);
    r.write_u64(DATA, 0x1234);
    let c = r.exec(0, cmd::copy(0x3000, 0x1000, 8));
    let a = r.exec(
        1,
        cmd::atomic(0x2000, faultline_abi::atomic_op::ADD, true, 5, 0),
    );
    assert_eq!((r.completion(c), r.completion(a)), (None, None));
    // A context-wide invalidate overlaps both: acknowledged after both.
    r.post_ctl(CtlOp::InvalidateContext, 0, 0, 0);
    r.dev.run_until_idle();
    assert!(!r.ctl_acked());
    r.settle();
    assert!(r.ctl_acked());
    assert_eq!(r.status(c), Status::Ok);
    assert_eq!(r.read_u64(DATA + 0x2000), 0x1234);
    assert_eq!(r.completion(a), Some(Ok((Status::Ok, 0))));
    assert_eq!(r.read_u64(DATA + 0x1000), 5);
    assert_eq!(fired(&r, Knob::EngineStall), 2);
}

#[test]
fn stopping_a_stalled_channel_releases_the_invalidate() {
    let mut r = rig("engine_stall_us=1000000", 64);
    r.map(0, 0x1000, DATA, LEAF_4K, Pte::WRITE);
    let t = r.exec(0, cmd::fill(0x1000, 8, 1));
    r.post_ctl(CtlOp::InvalidateAll, 0, 0, 0);
    r.dev.run_until_idle();
    assert!(!r.ctl_acked());
    // The access never happens: nothing to drain.
    r.w32(regs::channel_reg(0, regs::CH_ENABLE), 0);
    r.dev.run_until_idle();
    assert!(r.ctl_acked());
    assert_eq!(r.completion(t), None);
    assert_eq!(r.read_u64(DATA), 0);
}

// ------------------------------------------- engine stall + the checker

/// A paused FILL under the fatal coherence checker, with the CPU's table
/// mapping the page; `cpu_flags_at_resume` is what the CPU's PTE says when
/// the access finally runs. Returns the FILL's status and the violations.
fn paused_fill_under_checker(cpu_flags_at_resume: u64) -> (Status, u64) {
    use faultline_abi::Counter;
    use faultline_device::check::CheckMode;
    use faultline_device::testing::CpuPageTable;
    const VA: u64 = 0x7000_0000;
    let mut r = rig("engine_stall_us=2000", 64);
    r.dev.set_checker(CheckMode::Fatal, None);
    let mut cpu = CpuPageTable::new(&r, 0x80_0000, 0xC0_0000);
    cpu.attach(&r, 0);
    r.map(0, VA, DATA, LEAF_4K, Pte::WRITE);
    cpu.map(&r, VA, DATA, LEAF_4K, CpuPageTable::USER_RW);
    let t = r.exec(0, cmd::fill(VA, 8, 0x42));
    assert_eq!(r.completion(t), None, "paused");
    assert_eq!(r.dev.counters().get(Counter::CoherenceViolations), 0);
    cpu.map(&r, VA, DATA, LEAF_4K, cpu_flags_at_resume);
    r.settle();
    let violations = r.dev.counters().get(Counter::CoherenceViolations);
    (r.status(t), violations)
}

#[test]
fn a_paused_access_is_checked_again_when_it_runs() {
    use faultline_device::testing::CpuPageTable;
    assert_eq!(
        paused_fill_under_checker(CpuPageTable::USER_RW),
        (Status::Ok, 0),
        "still mapped: fine"
    );
    // The CPU dropped the page while the access held its translation
    // (a driver that does not wait for the ack): caught at the access.
    assert_eq!(
        paused_fill_under_checker(0),
        (Status::CoherenceViolation, 1)
    );
}

#[test]
fn knob_indices_match_the_inject_active_bits() {
    // Each knob alone sets exactly its bit, which is its index in
    // KNOB_NAMES and `Knob` (the names of the fired counters).
    use faultline_device::inject::KNOB_NAMES;
    for (k, s) in [
        (Knob::TlbAckDelaySteps, "tlb_ack_delay_steps=1"),
        (Knob::TlbAckDelayUs, "tlb_ack_delay_us=1"),
        (Knob::FaultMsiDelay, "fault_msi_delay_us=1"),
        (Knob::FaultReorder, "fault_reorder=1"),
        (Knob::FaultDup, "fault_dup=0.5"),
        (Knob::Spurious, "spurious=0.5"),
        (Knob::FaultOverflowAt, "fault_overflow_at=1"),
        (Knob::EngineStall, "engine_stall_us=1"),
    ] {
        assert_eq!(spec(s).active().bits(), 1 << k as u32, "{s}");
        assert!(s.starts_with(KNOB_NAMES[k as usize]), "{s}");
    }
}

#[test]
fn a_replay_behind_an_invalidate_blocked_by_a_paused_engine_waits() {
    let mut r = rig("engine_stall_us=20000", 64);
    r.map(0, 0x1000, DATA, LEAF_4K, Pte::WRITE);
    let paused = r.exec(0, cmd::fill(0x1000, 8, 1));
    let stalled = r.exec(1, cmd::fill(0x5000, 8, 2));
    assert_eq!(r.drain_faults().len(), 1);
    r.map(0, 0x5000, DATA + 0x4000, LEAF_4K, Pte::WRITE);
    r.post_ctl(CtlOp::InvalidateRange, 0, 0x1000, 0x1000);
    r.dev.doorbell(doorbell::REPLAY);
    r.dev.run_until_idle();
    assert!(!r.ctl_acked());
    assert_eq!(r.sb(status_block::REPLAY_SEQ), 0, "replayed before the ack");
    assert_eq!(r.completion(stalled), None);
    r.settle();
    assert!(r.ctl_acked());
    assert_eq!(r.sb(status_block::REPLAY_SEQ), 1);
    assert_eq!(r.status(paused), Status::Ok);
    assert_eq!(r.status(stalled), Status::Ok);
}
