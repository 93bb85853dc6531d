//! Deterministic fault injection (`faultline run/serve --gpu-inject SPEC`,
//! docs/testing.md "Fault injection"): the device widens the windows real
//! hardware leaves open (a late TLB-invalidate ack, a late FAULT MSI,
//! reordered, duplicated or spurious fault entries, an early OVERFLOW, an
//! engine paused between its translation and its access), so driver races
//! happen on purpose.
//!
//! Every random decision comes from one seeded PRNG, drawn in device-step
//! order: the same seed and the same guest give the same decisions. A
//! device without a spec carries `None` and pays one branch per hook.

use std::fmt;
use std::str::FromStr;

use faultline_abi::InjectKnobs;

use crate::engine::FaultRec;

/// Probabilities are kept as parts per million.
pub const PPM: u32 = 1_000_000;
/// Longest delay in steps: a deferral must end.
pub const MAX_DELAY_STEPS: u64 = 1 << 20;
/// Longest delay in µs (1 s): a deferral must end, and well before a
/// driver's timeout.
pub const MAX_DELAY_US: u64 = 1_000_000;
/// Spurious fault reports one step may queue; more are not reported
/// (reporting them is optional anyway), so a LAUNCH hammering mapped
/// pages cannot grow the queue.
pub const MAX_SPURIOUS_PER_STEP: usize = 1024;

/// Knob names in `InjectKnobs` bit order (counters `inject.fired.<name>`).
pub const KNOB_NAMES: [&str; 8] = [
    "tlb_ack_delay_steps",
    "tlb_ack_delay_us",
    "fault_msi_delay_us",
    "fault_reorder",
    "fault_dup",
    "spurious",
    "fault_overflow_at",
    "engine_stall",
];

/// A parsed `--gpu-inject` spec: `key=value` pairs separated by commas.
/// Zero means off for every knob but `seed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InjectSpec {
    pub seed: u64,
    pub tlb_ack_delay_steps: u64,
    pub tlb_ack_delay_us: u64,
    pub fault_msi_delay_us: u64,
    pub fault_reorder: bool,
    pub fault_dup_ppm: u32,
    pub spurious_ppm: u32,
    /// Entries outstanding at which the buffer counts as full (0: off).
    pub fault_overflow_at: u32,
    pub engine_stall_us: u64,
    /// Chance per FILL/COPY/ATOMIC translation to pause (with
    /// `engine_stall_us`; 1.0 unless `engine_stall=P` says otherwise).
    pub engine_stall_ppm: u32,
}

impl Default for InjectSpec {
    fn default() -> Self {
        Self {
            seed: 1,
            tlb_ack_delay_steps: 0,
            tlb_ack_delay_us: 0,
            fault_msi_delay_us: 0,
            fault_reorder: false,
            fault_dup_ppm: 0,
            spurious_ppm: 0,
            fault_overflow_at: 0,
            engine_stall_us: 0,
            engine_stall_ppm: PPM,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    #[error("empty fault-injection spec (want key=value[,key=value...])")]
    Empty,
    #[error("'{0}' is not key=value")]
    NotKeyValue(String),
    #[error("unknown fault-injection knob '{0}' (knobs: seed, {known})", known = KNOB_LIST)]
    UnknownKey(String),
    #[error("{key}={value}: {why}")]
    BadValue {
        key: String,
        value: String,
        why: &'static str,
    },
    #[error("knob '{0}' given twice")]
    Duplicate(String),
    #[error("engine_stall={0} needs engine_stall_us")]
    StallWithoutTime(String),
}

const KNOB_LIST: &str = "tlb_ack_delay_steps, tlb_ack_delay_us, fault_msi_delay_us, \
    fault_reorder, fault_dup, spurious, fault_overflow_at, engine_stall_us, engine_stall";

fn bad(key: &str, value: &str, why: &'static str) -> InjectError {
    InjectError::BadValue {
        key: key.into(),
        value: value.into(),
        why,
    }
}

fn int(key: &str, value: &str, max: u64) -> Result<u64, InjectError> {
    let v: u64 = value
        .parse()
        .map_err(|_| bad(key, value, "not a non-negative integer"))?;
    if v > max {
        return Err(bad(key, value, "too large"));
    }
    Ok(v)
}

/// A probability `0..=1` as a decimal ("0.01", "1", ".5") in ppm; more
/// than six decimals is refused rather than rounded.
fn prob(key: &str, value: &str) -> Result<u32, InjectError> {
    let err = || {
        bad(
            key,
            value,
            "not a probability between 0 and 1 (at most 6 decimals)",
        )
    };
    let (whole, frac) = value.split_once('.').unwrap_or((value, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && frac.is_empty()) || !digits(whole) || !digits(frac) || frac.len() > 6 {
        return Err(err());
    }
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| err())?
    };
    let frac_ppm: u64 = format!("{frac:0<6}").parse().map_err(|_| err())?;
    let ppm = whole
        .checked_mul(u64::from(PPM))
        .and_then(|w| w.checked_add(frac_ppm))
        .filter(|p| *p <= u64::from(PPM))
        .ok_or_else(err)?;
    Ok(ppm as u32)
}

fn fmt_prob(ppm: u32) -> String {
    if ppm == PPM {
        return "1".into();
    }
    let s = format!("0.{ppm:06}");
    s.trim_end_matches('0').to_string()
}

impl FromStr for InjectSpec {
    type Err = InjectError;

    fn from_str(s: &str) -> Result<Self, InjectError> {
        if s.trim().is_empty() {
            return Err(InjectError::Empty);
        }
        let mut spec = InjectSpec::default();
        let mut seen: Vec<&str> = Vec::new();
        let mut stall_prob = None;
        for item in s.split(',') {
            let item = item.trim();
            let Some((key, value)) = item.split_once('=') else {
                return Err(InjectError::NotKeyValue(item.into()));
            };
            let (key, value) = (key.trim(), value.trim());
            if seen.contains(&key) {
                return Err(InjectError::Duplicate(key.into()));
            }
            seen.push(key);
            match key {
                "seed" => spec.seed = int(key, value, u64::MAX)?,
                "tlb_ack_delay_steps" => {
                    spec.tlb_ack_delay_steps = int(key, value, MAX_DELAY_STEPS)?
                }
                "tlb_ack_delay_us" => spec.tlb_ack_delay_us = int(key, value, MAX_DELAY_US)?,
                "fault_msi_delay_us" => spec.fault_msi_delay_us = int(key, value, MAX_DELAY_US)?,
                "fault_reorder" => {
                    spec.fault_reorder = match value {
                        "0" => false,
                        "1" => true,
                        _ => return Err(bad(key, value, "want 0 or 1")),
                    }
                }
                "fault_dup" => spec.fault_dup_ppm = prob(key, value)?,
                "spurious" => spec.spurious_ppm = prob(key, value)?,
                "fault_overflow_at" => {
                    let max = u64::from(faultline_abi::MAX_FAULT_ENTRIES);
                    let v = int(key, value, max)?;
                    if v == 0 {
                        // A buffer that is always full would report
                        // nothing ever: no window, just a hang.
                        return Err(bad(key, value, "must be at least 1"));
                    }
                    spec.fault_overflow_at = v as u32;
                }
                "engine_stall_us" => spec.engine_stall_us = int(key, value, MAX_DELAY_US)?,
                "engine_stall" => {
                    spec.engine_stall_ppm = prob(key, value)?;
                    stall_prob = Some(value.to_string());
                }
                _ => return Err(InjectError::UnknownKey(key.into())),
            }
        }
        if let Some(p) = stall_prob.filter(|_| spec.engine_stall_us == 0) {
            return Err(InjectError::StallWithoutTime(p));
        }
        Ok(spec)
    }
}

impl fmt::Display for InjectSpec {
    /// The canonical spec: `seed` and every knob that is on, in
    /// `KNOB_NAMES` order; parses back to the same spec.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seed={}", self.seed)?;
        let mut kv = |k: &str, v: String| write!(f, ",{k}={v}");
        if self.tlb_ack_delay_steps != 0 {
            kv("tlb_ack_delay_steps", self.tlb_ack_delay_steps.to_string())?;
        }
        if self.tlb_ack_delay_us != 0 {
            kv("tlb_ack_delay_us", self.tlb_ack_delay_us.to_string())?;
        }
        if self.fault_msi_delay_us != 0 {
            kv("fault_msi_delay_us", self.fault_msi_delay_us.to_string())?;
        }
        if self.fault_reorder {
            kv("fault_reorder", "1".into())?;
        }
        if self.fault_dup_ppm != 0 {
            kv("fault_dup", fmt_prob(self.fault_dup_ppm))?;
        }
        if self.spurious_ppm != 0 {
            kv("spurious", fmt_prob(self.spurious_ppm))?;
        }
        if self.fault_overflow_at != 0 {
            kv("fault_overflow_at", self.fault_overflow_at.to_string())?;
        }
        if self.engine_stall_us != 0 {
            kv("engine_stall_us", self.engine_stall_us.to_string())?;
            if self.engine_stall_ppm != PPM {
                kv("engine_stall", fmt_prob(self.engine_stall_ppm))?;
            }
        }
        Ok(())
    }
}

impl InjectSpec {
    /// The knobs that have an effect (`regs::INJECT_ACTIVE`).
    pub fn active(&self) -> InjectKnobs {
        let mut k = InjectKnobs::empty();
        k.set(
            InjectKnobs::TLB_ACK_DELAY_STEPS,
            self.tlb_ack_delay_steps != 0,
        );
        k.set(InjectKnobs::TLB_ACK_DELAY_US, self.tlb_ack_delay_us != 0);
        k.set(InjectKnobs::FAULT_MSI_DELAY, self.fault_msi_delay_us != 0);
        k.set(InjectKnobs::FAULT_REORDER, self.fault_reorder);
        k.set(InjectKnobs::FAULT_DUP, self.fault_dup_ppm != 0);
        k.set(InjectKnobs::SPURIOUS, self.spurious_ppm != 0);
        k.set(InjectKnobs::FAULT_OVERFLOW_AT, self.fault_overflow_at != 0);
        k.set(
            InjectKnobs::ENGINE_STALL,
            self.engine_stall_us != 0 && self.engine_stall_ppm != 0,
        );
        k
    }

    /// The spec as (name, value) pairs for `--stats` (probabilities in
    /// ppm), every knob listed.
    pub fn named(&self) -> Vec<(String, u64)> {
        [
            ("seed", self.seed),
            ("tlb_ack_delay_steps", self.tlb_ack_delay_steps),
            ("tlb_ack_delay_us", self.tlb_ack_delay_us),
            ("fault_msi_delay_us", self.fault_msi_delay_us),
            ("fault_reorder", u64::from(self.fault_reorder)),
            ("fault_dup_ppm", u64::from(self.fault_dup_ppm)),
            ("spurious_ppm", u64::from(self.spurious_ppm)),
            ("fault_overflow_at", u64::from(self.fault_overflow_at)),
            ("engine_stall_us", self.engine_stall_us),
            ("engine_stall_ppm", u64::from(self.engine_stall_ppm)),
        ]
        .into_iter()
        .map(|(k, v)| (format!("inject.spec.{k}"), v))
        .collect()
    }
}

/// splitmix64: a few lines, full period, and good enough to pick
/// permutations and coin flips.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// True with probability `ppm` / 10^6; no draw for 0 or 1, so a knob
    /// that is off never shifts the sequence of the others.
    pub fn chance(&mut self, ppm: u32) -> bool {
        match ppm {
            0 => false,
            p if p >= PPM => true,
            p => self.next_u64() % u64::from(PPM) < u64::from(p),
        }
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Which knob fired (index into the fired counters, `KNOB_NAMES`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Knob {
    TlbAckDelaySteps = 0,
    TlbAckDelayUs = 1,
    FaultMsiDelay = 2,
    FaultReorder = 3,
    FaultDup = 4,
    Spurious = 5,
    FaultOverflowAt = 6,
    EngineStall = 7,
}

/// The device's injection state: the spec, the PRNG, what each knob did,
/// and the work it deferred (all bounded: a few words).
#[derive(Debug)]
pub struct Injector {
    pub spec: InjectSpec,
    pub rng: Rng,
    fired: [u64; KNOB_NAMES.len()],
    /// A control doorbell not served yet: due at (step, device ns).
    pub(crate) ctl_due: Option<(u64, u64)>,
    /// CONTROL/REPLAY doorbells held back while the control ring waits
    /// (for its delay, or for a paused engine to finish its access).
    pub(crate) withheld: u64,
    /// The control ring stopped at an invalidate overlapping a paused
    /// engine's translation; retried every step.
    pub(crate) ctl_blocked: bool,
    /// A FAULT MSI not sent yet, due at this device time (ns).
    pub(crate) msi_due: Option<u64>,
    /// Spurious fault reports queued during this step.
    pub(crate) spurious: Vec<FaultRec>,
}

impl Injector {
    pub fn new(spec: InjectSpec) -> Self {
        Self {
            spec,
            rng: Rng::new(spec.seed),
            fired: [0; KNOB_NAMES.len()],
            ctl_due: None,
            withheld: 0,
            ctl_blocked: false,
            msi_due: None,
            spurious: Vec::new(),
        }
    }

    pub fn fire(&mut self, k: Knob) {
        let c = &mut self.fired[k as usize];
        *c = c.saturating_add(1);
    }

    /// How often knob `k` fired over the device's life.
    pub fn fired(&self, k: Knob) -> u64 {
        self.fired[k as usize]
    }

    /// Deferred work goes with a disable or RESET (the rings it was for
    /// start afresh at the next enable); the PRNG and counts carry on.
    pub(crate) fn drop_deferred(&mut self) {
        self.ctl_due = None;
        self.withheld = 0;
        self.ctl_blocked = false;
        self.msi_due = None;
        self.spurious.clear();
    }

    /// Whether the device must step again at once: a control delay counted
    /// in steps only passes while steps run.
    pub(crate) fn busy(&self, step: u64) -> bool {
        self.ctl_due.is_some_and(|(s, _)| step < s)
    }

    /// The spec and the fired counts, for `--stats`.
    pub fn named(&self) -> Vec<(String, u64)> {
        let mut out = self.spec.named();
        for (name, n) in KNOB_NAMES.iter().zip(self.fired) {
            out.push((format!("inject.fired.{name}"), n));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probabilities_parse_exactly() {
        assert_eq!(prob("p", "0.01"), Ok(10_000));
        assert_eq!(prob("p", ".5"), Ok(500_000));
        assert_eq!(prob("p", "1"), Ok(PPM));
        assert_eq!(prob("p", "1.000000"), Ok(PPM));
        assert_eq!(prob("p", "0"), Ok(0));
        for bad in [
            "",
            ".",
            "1.0000001",
            "1.5",
            "-0.1",
            "2",
            "0x1",
            "1e-2",
            "0.1.2",
        ] {
            assert!(prob("p", bad).is_err(), "{bad} accepted");
        }
        assert_eq!(fmt_prob(10_000), "0.01");
        assert_eq!(fmt_prob(PPM), "1");
    }

    #[test]
    fn rng_is_a_pure_function_of_the_seed() {
        let a: Vec<u64> = (0..4)
            .map({
                let mut r = Rng::new(7);
                move |_| r.next_u64()
            })
            .collect();
        let mut r = Rng::new(7);
        assert_eq!(a, (0..4).map(|_| r.next_u64()).collect::<Vec<_>>());
        let mut other = Rng::new(8);
        assert_ne!(a[0], other.next_u64());
    }
}
