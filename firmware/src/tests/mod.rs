//! The in-guest test runner.
//!
//! A suite is a `pub const TESTS: &[Test]` in its module; it joins the run by
//! being listed in [`SUITES`]. Output is one line per test,
//! `test <name> ... ok` or `test <name> ... FAILED: <reason>`, then the plain
//! summary `N passed, N failed`, then the exit port says pass (0) or fail (1).

use alloc::string::String;
use core::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

use crate::arch::exit::{exit, ExitCode};
use crate::cmdline::Options;
use crate::println;

pub mod crash;
pub mod exchange;
pub mod flood;
pub mod gpu;
pub mod hostile;
pub mod process;
pub mod selftest;
pub mod smp;
pub mod svm;

pub type TestFn = fn() -> Result<(), String>;

pub struct Test {
    pub name: &'static str,
    pub run: TestFn,
}

impl Test {
    pub const fn new(name: &'static str, run: TestFn) -> Test {
        Test { name, run }
    }
}

/// Every suite, in run order. Later modules (process address spaces, PCI,
/// the GPU driver) append their `TESTS` slice here.
const SUITES: &[&[Test]] = &[
    selftest::TESTS,
    smp::TESTS,
    process::TESTS,
    exchange::TESTS,
    gpu::TESTS,
    hostile::TESTS,
    svm::TESTS,
];

/// Tests that run only when `test=` names them exactly (long runs for
/// `scripts/soak.sh`); `list=1` shows them only then too.
const OPT_IN: &[Test] = flood::TESTS;

/// Parameters of the parameterised tests (`seed=`, `iterations=`,
/// `cycles=`) and the SVM tests' fault-pipeline policy (`svm=`), set once
/// before the tests run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Params {
    pub seed: Option<u64>,
    pub iterations: Option<u64>,
    pub cycles: Option<u64>,
    /// Read by `bench=policies` and `bench=migrate` only, which the default
    /// build lacks.
    #[cfg_attr(not(feature = "bench"), allow(dead_code))]
    pub mib: Option<u64>,
    pub svm: Option<faultline_driver::gpu::FaultPolicy>,
}

static PARAMS: crate::sync::Mutex<Params> = crate::sync::Mutex::new(Params {
    seed: None,
    iterations: None,
    cycles: None,
    mib: None,
    svm: None,
});

pub fn params() -> Params {
    *PARAMS.lock()
}

/// Marks a test's `Err` as a skip (hardware the test needs is absent and
/// the command line allows that): reported as SKIPPED, counted apart, and
/// announced loudly before the summary.
const SKIP_MARK: &str = "\u{1}skip:";

pub fn skip(reason: &str) -> String {
    alloc::format!("{SKIP_MARK}{reason}")
}

/// Only with `fail=1`: proves end to end that a failing guest fails the host.
const FAIL_SUITE: &[Test] = &[Test::new("deliberate_failure", deliberate_failure)];

fn deliberate_failure() -> Result<(), String> {
    Err(String::from("deliberate failure requested by fail=1"))
}

// The name of the running test, for the panic and exception reports.
static CURRENT_PTR: AtomicPtr<u8> = AtomicPtr::new(core::ptr::null_mut());
static CURRENT_LEN: AtomicUsize = AtomicUsize::new(0);

pub fn current_test() -> Option<&'static str> {
    let p = CURRENT_PTR.load(Ordering::SeqCst);
    if p.is_null() {
        return None;
    }
    // SAFETY: only ever set from a `&'static str` below (pointer + length).
    let bytes = unsafe { core::slice::from_raw_parts(p, CURRENT_LEN.load(Ordering::SeqCst)) };
    core::str::from_utf8(bytes).ok()
}

fn set_current(name: Option<&'static str>) {
    let (p, l) = name.map_or((core::ptr::null_mut(), 0), |n| {
        (n.as_ptr() as *mut u8, n.len())
    });
    CURRENT_LEN.store(l, Ordering::SeqCst);
    CURRENT_PTR.store(p, Ordering::SeqCst);
}

/// `test=A,B`: the tests whose name contains any of the non-empty parts
/// (an empty filter matches every test).
fn matches(filter: &str, name: &str) -> bool {
    filter.is_empty()
        || filter
            .split(',')
            .filter(|p| !p.is_empty())
            .any(|p| contains(name.as_bytes(), p.as_bytes()))
}

/// Whether `part` (not empty) occurs in `name`: a first-byte test per
/// position before any comparison, where `str::contains` builds a
/// searcher per call (a `test=` list of fifty names costs seconds of
/// emulated instructions that way).
fn contains(name: &[u8], part: &[u8]) -> bool {
    name.len() >= part.len()
        && (0..=name.len() - part.len())
            .any(|i| name[i] == part[0] && name[i..i + part.len()] == *part)
}

fn all_tests<'a>(opts: &'a Options<'a>) -> impl Iterator<Item = &'static Test> + 'a {
    let extra: &'static [Test] = if opts.fail { FAIL_SUITE } else { &[] };
    SUITES
        .iter()
        .flat_map(|s| s.iter())
        .chain(extra.iter())
        .filter(move |t| opts.test_filter.is_none_or(|f| matches(f, t.name)))
        .chain(
            OPT_IN
                .iter()
                .filter(move |t| opts.test_filter == Some(t.name)),
        )
}

const fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// The name of the first test whose name an earlier test already has, over
/// `suites` followed by `extra`.
const fn first_duplicate(suites: &[&[Test]], extra: &'static [Test]) -> Option<&'static str> {
    const fn suite<'a>(suites: &[&'a [Test]], extra: &'a [Test], i: usize) -> &'a [Test] {
        if i < suites.len() {
            suites[i]
        } else {
            extra
        }
    }
    let mut s = 0;
    while s <= suites.len() {
        let tests = suite(suites, extra, s);
        let mut t = 0;
        while t < tests.len() {
            let name = tests[t].name;
            // Every test before (s, t).
            let mut s2 = 0;
            while s2 <= s {
                let earlier = suite(suites, extra, s2);
                let end = if s2 == s { t } else { earlier.len() };
                let mut t2 = 0;
                while t2 < end {
                    if same(earlier[t2].name, name) {
                        return Some(name);
                    }
                    t2 += 1;
                }
                s2 += 1;
            }
            t += 1;
        }
        s += 1;
    }
    None
}

// Test names select tests (`test=`) and name them in reports, so they must
// be unique. Checked when the firmware is built: at run time, under an
// instruction-emulating hypervisor, the pairwise comparison cost ~20 ms of
// every boot.
const _: () = assert!(
    first_duplicate(SUITES, FAIL_SUITE).is_none()
        && first_duplicate(SUITES, OPT_IN).is_none()
        && first_duplicate(&[FAIL_SUITE], OPT_IN).is_none(),
    "duplicate test name"
);

/// Takes the parameters from the command line (benchmarks use them too).
pub fn set_params(opts: &Options<'_>) {
    *PARAMS.lock() = Params {
        seed: opts.seed,
        iterations: opts.iterations,
        cycles: opts.cycles,
        mib: opts.mib,
        svm: opts.svm.ok().flatten(),
    };
}

/// What `list=1` prints without `test=` or `fail=1`: every name of
/// [`SUITES`], one a line, assembled when the firmware is built. Printing
/// it costs one console write, where formatting the names one by one cost
/// ~0.4 ms each under an instruction-emulating hypervisor.
static LISTING: Listing = Listing(listing());

const LISTING_LEN: usize = {
    let mut n = 0;
    let mut s = 0;
    while s < SUITES.len() {
        let mut t = 0;
        while t < SUITES[s].len() {
            n += SUITES[s][t].name.len() + 1;
            t += 1;
        }
        s += 1;
    }
    n
};

/// Page-aligned, so the line console can take it in place.
#[repr(C, align(4096))]
struct Listing([u8; LISTING_LEN]);

const fn listing() -> [u8; LISTING_LEN] {
    let mut out = [0u8; LISTING_LEN];
    let mut at = 0;
    let mut s = 0;
    while s < SUITES.len() {
        let mut t = 0;
        while t < SUITES[s].len() {
            let name = SUITES[s][t].name.as_bytes();
            let mut i = 0;
            while i < name.len() {
                out[at] = name[i];
                at += 1;
                i += 1;
            }
            out[at] = b'\n';
            at += 1;
            t += 1;
        }
        s += 1;
    }
    out
}

pub fn run(opts: &Options<'_>) -> ! {
    set_params(opts);
    if opts.list {
        if opts.test_filter.is_none() && !opts.fail {
            crate::serial::print_static(&LISTING.0);
        } else {
            for t in all_tests(opts) {
                println!("{}", t.name);
            }
        }
        exit(ExitCode::Success);
    }

    let (mut passed, mut failed, mut skipped) = (0u32, 0u32, 0u32);
    for t in all_tests(opts) {
        set_current(Some(t.name));
        let start = crate::arch::time::now_ns();
        let result = (t.run)();
        let took_us = (crate::arch::time::now_ns() - start) / 1000;
        set_current(None);
        // Under an emulating hypervisor every instruction counts; keep an eye on it.
        log::debug!("test {} took {} us", t.name, took_us);
        match result {
            Ok(()) => {
                passed += 1;
                println!("test {} ... ok", t.name);
            }
            Err(reason) if reason.starts_with(SKIP_MARK) => {
                skipped += 1;
                println!(
                    "test {} ... SKIPPED: {}",
                    t.name,
                    &reason[SKIP_MARK.len()..]
                );
            }
            Err(reason) => {
                failed += 1;
                println!("test {} ... FAILED: {reason}", t.name);
            }
        }
    }
    if skipped > 0 {
        println!("*** {skipped} test(s) SKIPPED, see the SKIPPED lines above ***");
    }
    let selected_none = passed + failed + skipped == 0;
    if selected_none {
        // A typo in test= must not look like a green run.
        println!(
            "tests: filter '{}' matches no test",
            opts.test_filter.unwrap_or("")
        );
    }
    println!("{passed} passed, {failed} failed");
    exit(if failed == 0 && !selected_none {
        ExitCode::Success
    } else {
        ExitCode::TestsFailed
    })
}
