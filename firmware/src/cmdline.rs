//! Kernel command line: space-separated `key=value` words.
//!
//! Nothing is ignored silently: an unknown key, a word without `=`, or a bad
//! value each produce one `cmdline:` line, so a typo in a test invocation is
//! visible in the log instead of quietly running the wrong thing.

use faultline_driver::gpu::policy::{FaultPolicy, PolicyError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options<'a> {
    /// Run only tests whose name contains this.
    pub test_filter: Option<&'a str>,
    pub log_level: log::LevelFilter,
    /// Register the deliberately failing self-test.
    pub fail: bool,
    /// Print the test names and exit with success.
    pub list: bool,
    /// Die on purpose after boot, to prove the fatal paths (exit status 2).
    pub crash: Option<Crash>,
    /// `gpu=optional`: GPU tests skip (loudly) instead of failing when no
    /// GPU is found.
    pub gpu_optional: bool,
    /// `bench=<name>`: run that in-guest benchmark instead of the tests.
    pub bench: Option<Bench>,
    /// `seed=N`: the seed of the randomised tests (`gpu_hostile`).
    pub seed: Option<u64>,
    /// `iterations=N`: how long `gpu_hostile` runs; in `bench=faults`, run
    /// only the single faults, N per variant.
    pub iterations: Option<u64>,
    /// `cycles=N`: how long `gpu_fault_flood` runs.
    pub cycles: Option<u64>,
    /// `mib=N`: the size of each `bench=policies` workload.
    pub mib: Option<u64>,
    /// `cpus=N`: how many CPUs the run was given (`test=smp` checks that
    /// exactly that many came up).
    pub cpus: Option<u64>,
    /// `ram=zero`: the hypervisor handed RAM over zeroed, so a frame nobody
    /// has used since boot needs no zeroing. Off by default: a warm reset
    /// (QEMU `system_reset`) leaves RAM as the last boot left it.
    pub ram_zero: bool,
    /// `svm=POLICY`: the fault-pipeline policy every SVM test's driver is
    /// probed with (`faultline_driver::gpu::policy`); `Err` holds a bad
    /// value, which fails the run.
    pub svm: Result<Option<FaultPolicy>, ()>,
    /// `mutant=<letter or name>`: the driver mutant to run the tests with
    /// (`faultline_driver::gpu::mutant`; the `mutants` build only).
    #[cfg(feature = "mutants")]
    pub mutant: Option<faultline_driver::gpu::mutant::Mutant>,
}

/// In-guest benchmarks (machine-readable output, see `bench/`; bench build only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bench {
    /// VM-exit costs of the GPU paths (`scripts/bench.sh exits`).
    Exits,
    /// SVM fault and invalidation costs (`scripts/bench.sh faults`).
    Faults,
    /// The fault pipeline's workloads under the `svm=` policy
    /// (`scripts/bench.sh policies`).
    Policies,
    /// Migration to VRAM and back of `mib=` MiB (`scripts/bench.sh migrate`).
    Migrate,
}

impl Bench {
    const ALL: [Bench; 4] = [Bench::Exits, Bench::Faults, Bench::Policies, Bench::Migrate];

    /// The `bench=` value that selects it.
    pub fn name(self) -> &'static str {
        match self {
            Bench::Exits => "exits",
            Bench::Faults => "faults",
            Bench::Policies => "policies",
            Bench::Migrate => "migrate",
        }
    }
}

/// Deliberate fatal errors, each exercising a different handler path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crash {
    /// Rust panic: message and location, then exit 2.
    Panic,
    /// Unexpected #UD: vector, RIP, then exit 2.
    InvalidOpcode,
    /// Unexpected #PF on an unmapped address: error code and CR2.
    PageFault,
    /// #PF with an unusable stack escalates to #DF, which must run on its IST stack.
    DoubleFault,
    /// Unbounded recursion: hits the kernel stack's guard page (#PF → #DF).
    StackOverflow,
}

impl Default for Options<'_> {
    fn default() -> Self {
        Options {
            test_filter: None,
            log_level: log::LevelFilter::Info,
            fail: false,
            list: false,
            crash: None,
            gpu_optional: false,
            bench: None,
            seed: None,
            iterations: None,
            cycles: None,
            mib: None,
            cpus: None,
            ram_zero: false,
            svm: Ok(None),
            #[cfg(feature = "mutants")]
            mutant: None,
        }
    }
}

/// One diagnostic per offending word; the caller prints them once logging works.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Complaint<'a> {
    UnknownKey(&'a str),
    NotKeyValue(&'a str),
    BadValue {
        key: &'a str,
        value: &'a str,
        expected: &'static str,
    },
    /// A bad `svm=` policy: not ignored, the run fails.
    BadSvm(PolicyError<'a>),
}

impl core::fmt::Display for Complaint<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Complaint::UnknownKey(k) => write!(f, "cmdline: unknown key '{k}' ignored"),
            Complaint::NotKeyValue(w) => write!(f, "cmdline: '{w}' is not key=value, ignored"),
            Complaint::BadSvm(e) => write!(f, "cmdline: svm: {e}; the run fails"),
            Complaint::BadValue {
                key,
                value,
                expected,
            } => {
                write!(
                    f,
                    "cmdline: bad value '{value}' for '{key}' (expected {expected}), ignored"
                )
            }
        }
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

fn parse_u64(v: &str) -> Option<u64> {
    match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => v.parse().ok(),
    }
}

fn parse_level(v: &str) -> Option<log::LevelFilter> {
    Some(match v {
        "off" => log::LevelFilter::Off,
        "error" => log::LevelFilter::Error,
        "warn" => log::LevelFilter::Warn,
        "info" => log::LevelFilter::Info,
        "debug" => log::LevelFilter::Debug,
        "trace" => log::LevelFilter::Trace,
        _ => return None,
    })
}

/// Parses `line`, calling `complain` for each word it cannot use.
pub fn parse<'a>(line: &'a str, mut complain: impl FnMut(Complaint<'a>)) -> Options<'a> {
    let mut o = Options::default();
    for word in line.split_ascii_whitespace() {
        // A byte search: `str::split_once(char)` runs a char searcher,
        // dozens of emulated instructions per byte at boot.
        let Some(eq) = word.bytes().position(|b| b == b'=') else {
            complain(Complaint::NotKeyValue(word));
            continue;
        };
        // '=' is ASCII, so both sides are whole UTF-8.
        let (key, value) = (&word[..eq], &word[eq + 1..]);
        match key {
            "test" => o.test_filter = Some(value),
            "loglevel" => match parse_level(value) {
                Some(l) => o.log_level = l,
                None => complain(Complaint::BadValue {
                    key,
                    value,
                    expected: "off|error|warn|info|debug|trace",
                }),
            },
            "fail" | "list" => match parse_bool(value) {
                Some(b) if key == "fail" => o.fail = b,
                Some(b) => o.list = b,
                None => complain(Complaint::BadValue {
                    key,
                    value,
                    expected: "0 or 1",
                }),
            },
            "crash" => match value {
                "panic" => o.crash = Some(Crash::Panic),
                "ud" => o.crash = Some(Crash::InvalidOpcode),
                "pagefault" => o.crash = Some(Crash::PageFault),
                "doublefault" => o.crash = Some(Crash::DoubleFault),
                "stackoverflow" => o.crash = Some(Crash::StackOverflow),
                _ => complain(Complaint::BadValue {
                    key,
                    value,
                    expected: "panic|ud|pagefault|doublefault|stackoverflow",
                }),
            },
            "svm" => match FaultPolicy::parse(value) {
                Ok(p) => o.svm = Ok(Some(p)),
                Err(e) => {
                    o.svm = Err(());
                    complain(Complaint::BadSvm(e));
                }
            },
            "ram" => match value {
                "zero" => o.ram_zero = true,
                "unknown" => o.ram_zero = false,
                _ => complain(Complaint::BadValue {
                    key,
                    value,
                    expected: "zero|unknown",
                }),
            },
            "gpu" => match value {
                "required" => o.gpu_optional = false,
                "optional" => o.gpu_optional = true,
                _ => complain(Complaint::BadValue {
                    key,
                    value,
                    expected: "required|optional",
                }),
            },
            "bench" => match Bench::ALL.into_iter().find(|b| b.name() == value) {
                Some(b) => o.bench = Some(b),
                None => complain(Complaint::BadValue {
                    key,
                    value,
                    expected: "exits|faults|policies",
                }),
            },
            "seed" | "iterations" | "cycles" | "mib" | "cpus" => match parse_u64(value) {
                Some(n) if key == "seed" => o.seed = Some(n),
                Some(n) if key == "cpus" => o.cpus = Some(n),
                Some(n) if key == "mib" => o.mib = Some(n),
                Some(n) if key == "iterations" => o.iterations = Some(n),
                Some(n) => o.cycles = Some(n),
                None => complain(Complaint::BadValue {
                    key,
                    value,
                    expected: "a decimal or 0x-hex number",
                }),
            },
            #[cfg(feature = "mutants")]
            "mutant" => match faultline_driver::gpu::mutant::Mutant::parse(value) {
                Some(m) => o.mutant = Some(m),
                None => complain(Complaint::BadValue {
                    key,
                    value,
                    expected: "a letter a..e or a mutant name (docs/testing.md)",
                }),
            },
            _ => complain(Complaint::UnknownKey(key)),
        }
    }
    o
}
