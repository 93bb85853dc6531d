//! Device counters, readable through the BAR0 counter window.

use faultline_abi::{Counter, Status, COUNTER_NAMES, NUM_COUNTERS};

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

    pub fn command_done(&mut self, opcode: u32, status: Status) {
        if (1..6).contains(&opcode) {
            let i = Counter::CmdBase as usize + opcode as usize;
            self.slots[i] = self.slots[i].wrapping_add(1);
        }
        let i = Counter::StatusBase as usize + status as usize;
        self.slots[i] = self.slots[i].wrapping_add(1);
    }

    pub fn commands(&self, opcode: u32) -> u64 {
        if (1..6).contains(&opcode) {
            self.slots[Counter::CmdBase as usize + opcode as usize]
        } else {
            0
        }
    }

    pub fn with_status(&self, status: Status) -> u64 {
        self.slots[Counter::StatusBase as usize + status as usize]
    }

    /// Non-zero counters as (name, value), for printing at exit.
    pub fn named(&self) -> Vec<(String, u64)> {
        const OPS: [&str; 6] = ["", "fill", "copy", "atomic", "semaphore", "launch"];
        let mut out = Vec::new();
        for (i, name) in COUNTER_NAMES.iter().enumerate() {
            out.push((name.to_string(), self.slots[i]));
        }
        for (op, name) in OPS.iter().enumerate().skip(1) {
            out.push((format!("cmd_{name}"), self.commands(op as u32)));
        }
        for s in 0..Status::COUNT as u32 {
            if let Some(st) = Status::from_u32(s) {
                let v = self.with_status(st);
                if v != 0 {
                    out.push((format!("status_{st:?}"), v));
                }
            }
        }
        out
    }
}
