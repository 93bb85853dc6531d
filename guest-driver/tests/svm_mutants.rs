//! Each driver mutant (`faultline_driver::gpu::mutant`, cargo feature
//! `mutants`) against the suite test that should catch it, in the host
//! loopback: the test passes on the real driver and fails with the mutant
//! active. `scripts/mutants.sh` runs these and the same pairs in the guest.
//!
//! The mutant is one global switch, so the cases take turns (`SERIAL`).

mod common;

use std::sync::Mutex;

use common::env::LoopEnv;
use faultline_abi::Counter;
use faultline_driver::gpu::mutant::{self, Mutant};
use faultline_driver::gpu::suite::{self, SvmEnv};

static SERIAL: Mutex<()> = Mutex::new(());

/// Runs of the mutated driver before a mutant counts as not caught.
const TRIES: u32 = 3;

/// The `--gpu-inject` spec that opens each mutant's window (none: the
/// test opens it itself). `scripts/mutants.sh` uses the same in the guest
/// and checks it against the line `check` prints.
fn window(m: Mutant) -> Option<&'static str> {
    match m {
        Mutant::NoAckWait => Some("seed=7,tlb_ack_delay_us=20000"),
        Mutant::NoSeqCheck | Mutant::StrongestAccess => None,
        Mutant::MprotectNoFlush | Mutant::UnmapAfterFree => Some("seed=7,tlb_ack_delay_steps=64"),
    }
}

/// Runs suite test `name` on a fresh loopback (its coherence checker
/// fatal unless `FAULTLINE_LOOPBACK_CHECK` says otherwise) injecting
/// `spec`, with `m` active; its result and the device's
/// coherence-violation count.
fn run_with(name: &str, spec: Option<&str>, m: Option<Mutant>) -> (Result<(), String>, u64) {
    let spec = spec.map(|s| s.parse().unwrap_or_else(|e| panic!("{s}: {e}")));
    mutant::set(m);
    let (env, r) = suite::run(name, |needs| {
        Ok(LoopEnv::with_inject(
            needs.memory_mib,
            needs.gpu_config(),
            spec,
        ))
    });
    let violations = env.as_ref().map_or(0, |e| {
        e.gpu().device_counter(Counter::CoherenceViolations as u32)
    });
    mutant::set(None);
    (r, violations)
}

fn check(m: Mutant) {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let name = m.test();
    let spec = window(m);
    let (real, v0) = run_with(name, spec, None);
    assert!(
        real.is_ok(),
        "{name} fails on the real driver: {}",
        real.unwrap_err()
    );
    // The streaming tests race the device's worker thread against the
    // test's munmap on a host scheduler: a window opened by a late ack can
    // still close before the device uses it (seen about once in a dozen
    // runs for (a) on an idle host). A mutant counts as caught if any of
    // `TRIES` fresh runs fails; the real driver must pass its one run.
    let mut tries = 0;
    let (mutated, v) = loop {
        tries += 1;
        let r = run_with(name, spec, Some(m));
        if r.0.is_err() || tries == TRIES {
            break r;
        }
    };
    // One line per mutant for scripts/mutants.sh.
    eprintln!(
        "mutant {} {}: {name}: inject {}: real ok ({v0} violations), mutant {} ({v} violations)",
        m.letter(),
        m.name(),
        spec.unwrap_or("-"),
        match &mutated {
            Ok(()) => format!("NOT caught in {tries} runs"),
            Err(e) if tries > 1 => format!("caught in run {tries}: {e}"),
            Err(e) => format!("caught: {e}"),
        }
    );
    assert!(
        mutated.is_err(),
        "{name} does not catch mutant {}",
        m.name()
    );
}

#[test]
fn no_ack_wait() {
    check(Mutant::NoAckWait);
}

#[test]
fn no_seq_check() {
    check(Mutant::NoSeqCheck);
}

#[test]
fn strongest_access() {
    check(Mutant::StrongestAccess);
}

#[test]
fn mprotect_no_flush() {
    check(Mutant::MprotectNoFlush);
}

#[test]
fn unmap_after_free() {
    check(Mutant::UnmapAfterFree);
}

#[test]
fn names_and_letters_parse() {
    for (i, m) in Mutant::ALL.into_iter().enumerate() {
        assert_eq!(m.letter(), (b'a' + i as u8) as char);
        assert_eq!(Mutant::parse(m.name()), Some(m));
        assert_eq!(Mutant::parse(&m.letter().to_string()), Some(m));
        assert!(suite::tests::<LoopEnv>().iter().any(|t| t.name == m.test()));
    }
    assert_eq!(Mutant::parse("f"), None);
    assert_eq!(Mutant::parse(""), None);
    assert_eq!(Mutant::parse("no_ack"), None);
}
