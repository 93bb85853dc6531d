//! Device counters, readable through the BAR0 counter window.

use faultline_abi::{Counter, Opcode, Status, COUNTER_NAMES, NUM_COUNTERS};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counters {
    slots: [u64; NUM_COUNTERS as usize],
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            slots: [0; NUM_COUNTERS as usize],
        }
    }
}

impl Counters {
    pub fn get(&self, c: Counter) -> u64 {
        self.slots[c as usize]
    }

    /// Counter slot `i` (0 for unknown slots).
    pub fn slot(&self, i: u32) -> u64 {
        self.slots.get(i as usize).copied().unwrap_or(0)
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

    /// Non-zero counters as (name, value), for printing at exit.
    pub fn named(&self) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        for (i, name) in COUNTER_NAMES.iter().enumerate() {
            out.push((name.to_string(), self.slots[i]));
        }
        for &op in Opcode::ALL {
            out.push((format!("cmd_{}", op.name()), self.commands(op)));
        }
        for &st in Status::ALL {
            let v = self.with_status(st);
            if v != 0 {
                out.push((format!("status_{st:?}"), v));
            }
        }
        out
    }
}
