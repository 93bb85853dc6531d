//! The counter window (`regs::counter(i)`, docs/gpu-abi.md "Counters").

use crate::command::Opcode;
use crate::status::Status;

/// Counters in the counter window (`regs::counter(i)`).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    Accesses = 0,
    TlbHits = 1,
    TlbMisses = 2,
    TlbEvictions = 3,
    Walks = 4,
    FaultsRaised = 5,
    FaultsDeduplicated = 6,
    FaultOverflows = 7,
    Replays = 8,
    Cancels = 9,
    Invalidations = 10,
    BytesCopied = 11,
    /// Translations the coherence checker found the CPU does not allow.
    CoherenceViolations = 12,
    /// Bytes MIGRATE copied (either direction).
    BytesMigrated = 13,
    /// `CMD_BASE + opcode`: commands completed per opcode.
    CmdBase = 16,
    /// `STATUS_BASE + status`: commands completed per status.
    StatusBase = 24,
}

impl Counter {
    /// Slot of the "commands completed with opcode `op`" counter.
    pub const fn command_slot(op: Opcode) -> u32 {
        Counter::CmdBase as u32 + op as u32
    }
    /// Slot of the "commands completed with status `s`" counter.
    pub const fn status_slot(s: Status) -> u32 {
        Counter::StatusBase as u32 + s as u32
    }
}

// Every opcode has its slot between CmdBase and StatusBase.
const _: () = {
    let mut i = 0;
    while i < Opcode::COUNT {
        assert!(Counter::command_slot(Opcode::ALL[i]) < Counter::StatusBase as u32);
        i += 1;
    }
};

/// Number of counter slots.
pub const NUM_COUNTERS: u32 = Counter::StatusBase as u32 + Status::COUNT as u32;
pub const COUNTER_NAMES: [&str; 14] = [
    "accesses",
    "tlb_hits",
    "tlb_misses",
    "tlb_evictions",
    "walks",
    "faults_raised",
    "faults_deduplicated",
    "fault_overflows",
    "replays",
    "cancels",
    "invalidations",
    "bytes_copied",
    "coherence_violations",
    "bytes_migrated",
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::regs;

    /// docs/gpu-abi.md: 16+op per opcode, 24+s per status, all inside the
    /// counter window.
    #[test]
    fn slots_match_the_documented_window() {
        assert_eq!(Counter::command_slot(Opcode::Fill), 17);
        assert_eq!(Counter::command_slot(Opcode::Launch), 21);
        assert_eq!(Counter::status_slot(Status::Ok), 24);
        assert_eq!(Counter::status_slot(Status::Timeout), 34);
        assert_eq!(Counter::status_slot(Status::CoherenceViolation), 35);
        assert_eq!(Counter::command_slot(Opcode::Migrate), 22);
        assert_eq!(Counter::status_slot(Status::BadList), 37);
        assert_eq!(NUM_COUNTERS, 38);
        assert!(regs::counter(NUM_COUNTERS) <= 0x4000);
    }
}
