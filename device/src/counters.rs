//! Device counters: the per-reset block the guest reads through the BAR0
//! counter window, and lifetime totals for the host (`named()`).

use faultline_abi::{Counter, DeviceError, Opcode, Status, COUNTER_NAMES, NUM_COUNTERS};

use crate::check::CheckFigures;

const N: usize = NUM_COUNTERS as usize;
const ERRORS: usize = DeviceError::COUNT;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counters {
    /// Since the last RESET (the BAR0 counter window, docs/gpu-abi.md).
    slots: [u64; N],
    /// What earlier reset periods counted: lifetime = retired + slots. Kept
    /// apart so the hot path increments one array only.
    retired: [u64; N],
    /// Device errors raised, per `DeviceError` code, over the device's
    /// lifetime (host-only: not in the BAR0 window).
    errors: [u64; ERRORS],
    /// Most faults ever held back at once for want of fault-buffer space
    /// (bounded by one per stalled access, `faults::MAX_BACKLOG`).
    backlog_peak: u64,
    /// The coherence checker's host-only figures (lifetime; its violation
    /// count is `Counter::CoherenceViolations` in `slots`).
    pub check: CheckFigures,
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            slots: [0; N],
            retired: [0; N],
            errors: [0; ERRORS],
            backlog_peak: 0,
            check: CheckFigures::default(),
        }
    }
}

impl Counters {
    pub fn get(&self, c: Counter) -> u64 {
        self.slots[c as usize]
    }

    /// Counter slot `i` since the last RESET (0 for unknown slots).
    pub fn slot(&self, i: u32) -> u64 {
        self.slots.get(i as usize).copied().unwrap_or(0)
    }

    /// Counter slot `i` over the device's whole life, RESETs included.
    pub fn lifetime_slot(&self, i: u32) -> u64 {
        let i = i as usize;
        match (self.slots.get(i), self.retired.get(i)) {
            (Some(s), Some(r)) => s.wrapping_add(*r),
            _ => 0,
        }
    }

    pub fn lifetime(&self, c: Counter) -> u64 {
        self.lifetime_slot(c as u32)
    }

    /// RESET: the guest-visible counters start again from 0; their totals
    /// move into the lifetime ones.
    pub fn reset(&mut self) {
        for (r, s) in self.retired.iter_mut().zip(self.slots.iter_mut()) {
            *r = r.wrapping_add(std::mem::take(s));
        }
    }

    /// Count one device error of kind `code`; returns how many of that
    /// kind the device has raised in its life, this one included.
    pub fn device_error(&mut self, code: DeviceError) -> u64 {
        let e = &mut self.errors[code as usize];
        *e = e.saturating_add(1);
        *e
    }

    /// Device errors of kind `code` raised over the device's lifetime.
    pub fn device_errors(&self, code: DeviceError) -> u64 {
        self.errors[code as usize]
    }

    /// The device holds `len` faults back: keep the high-water mark.
    pub fn note_fault_backlog(&mut self, len: usize) {
        self.backlog_peak = self.backlog_peak.max(len as u64);
    }

    /// Most faults the device ever held back at once (lifetime).
    pub fn fault_backlog_peak(&self) -> u64 {
        self.backlog_peak
    }

    pub fn add(&mut self, c: Counter, n: u64) {
        let s = &mut self.slots[c as usize];
        *s = s.wrapping_add(n);
    }

    pub fn inc(&mut self, c: Counter) {
        self.add(c, 1);
    }

    /// A command completed: count it per opcode (if it had a valid one)
    /// and per status.
    pub fn command_done(&mut self, op: Option<Opcode>, status: Status) {
        if let Some(op) = op {
            self.bump(Counter::command_slot(op));
        }
        self.bump(Counter::status_slot(status));
    }

    fn bump(&mut self, slot: u32) {
        let s = &mut self.slots[slot as usize];
        *s = s.wrapping_add(1);
    }

    /// Commands completed with opcode `op`.
    pub fn commands(&self, op: Opcode) -> u64 {
        self.slot(Counter::command_slot(op))
    }

    /// Commands completed with `status`.
    pub fn with_status(&self, status: Status) -> u64 {
        self.slot(Counter::status_slot(status))
    }

    /// The counters as (name, value), for printing at exit: first those
    /// since the last RESET (the names of the BAR0 window), then the same
    /// over the device's lifetime as `lifetime.<name>`. A run usually ends
    /// with the guest's RESET, which zeroes the first group. Per-status
    /// counts appear only when non-zero. Last, `errors.<Kind>`: device
    /// errors raised per kind over the lifetime (every kind listed),
    /// `fault_backlog_peak`, the most faults ever held back at once, and
    /// the coherence checker's `check.mode` (0 off, 1 warn, 2 fatal),
    /// `check.checked`, `check.unchecked` (contexts without a CPU table,
    /// and VRAM pages)
    /// and `check.unreported` (violations counted but not reported again),
    /// all lifetime.
    pub fn named(&self) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        for (prefix, get) in [
            ("", &Self::slot as &dyn Fn(&Self, u32) -> u64),
            ("lifetime.", &Self::lifetime_slot),
        ] {
            for (i, name) in COUNTER_NAMES.iter().enumerate() {
                out.push((format!("{prefix}{name}"), get(self, i as u32)));
            }
            for &op in Opcode::ALL {
                let v = get(self, Counter::command_slot(op));
                out.push((format!("{prefix}cmd_{}", op.name()), v));
            }
            for &st in Status::ALL {
                let v = get(self, Counter::status_slot(st));
                if v != 0 {
                    out.push((format!("{prefix}status_{st:?}"), v));
                }
            }
        }
        for &e in DeviceError::ALL {
            if e != DeviceError::None {
                out.push((format!("errors.{e:?}"), self.device_errors(e)));
            }
        }
        out.push(("fault_backlog_peak".into(), self.backlog_peak));
        let c = &self.check;
        out.push(("check.mode".into(), c.mode.code()));
        out.push(("check.checked".into(), c.checked));
        out.push(("check.unchecked".into(), c.unchecked));
        out.push(("check.unreported".into(), c.unreported));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_keeps_lifetime_totals() {
        let mut c = Counters::default();
        c.add(Counter::FaultsRaised, 3);
        c.command_done(Some(Opcode::Fill), Status::Ok);
        c.reset();
        c.inc(Counter::FaultsRaised);
        assert_eq!(c.get(Counter::FaultsRaised), 1);
        assert_eq!(c.lifetime(Counter::FaultsRaised), 4);
        assert_eq!(c.commands(Opcode::Fill), 0);
        assert_eq!(c.lifetime_slot(Counter::command_slot(Opcode::Fill)), 1);
        c.reset();
        let named = c.named();
        let v = |n: &str| named.iter().find(|(k, _)| k == n).map(|(_, v)| *v);
        assert_eq!(v("faults_raised"), Some(0));
        assert_eq!(v("lifetime.faults_raised"), Some(4));
        assert_eq!(v("lifetime.cmd_fill"), Some(1));
        assert_eq!(v("status_Ok"), None);
        assert_eq!(v("lifetime.status_Ok"), Some(1));
    }
}
