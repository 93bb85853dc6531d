//! `smp`: every CPU the platform described came up, knows who it is through
//! its per-CPU data, and runs functions sent to it by IPI.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use super::Test;
use crate::arch::apic;
use crate::smp::{self, CallError};

pub const TESTS: &[Test] = &[Test::new("smp", smp_test)];

/// Calls per CPU and function.
const ROUNDS: u64 = 32;

/// Who runs this: (per-CPU index, per-CPU APIC ID, the x2APIC's own ID),
/// packed 16 bits each, with the low 16 bits of `arg` echoed back.
fn whoami(arg: u64) -> u64 {
    let me = smp::this_cpu();
    u64::from(me.index) << 48
        | u64::from(me.apic_id()) << 32
        | u64::from(apic::id()) << 16
        | (arg & 0xffff)
}

/// Real work whose answer the caller knows: 1 + 2 + ... + n.
fn sum_to(n: u64) -> u64 {
    (1..=core::hint::black_box(n)).sum()
}

fn smp_test() -> Result<(), String> {
    let cpus = smp::cpus();
    let offline: Vec<String> = cpus
        .iter()
        .filter(|c| !c.online())
        .map(|c| {
            format!(
                "cpu {} (APIC {}, stage {})",
                c.index,
                c.apic_id(),
                c.stage()
            )
        })
        .collect();
    if !offline.is_empty() {
        return Err(format!("not online: {}", offline.join(", ")));
    }
    if let Some(n) = smp::expected_cpus() {
        if cpus.len() as u64 != n {
            return Err(format!(
                "cpus={n} given, the platform tables list {}",
                cpus.len()
            ));
        }
    }
    let mut ids: Vec<u32> = cpus.iter().map(|c| c.apic_id()).collect();
    ids.sort_unstable();
    ids.dedup();
    if ids.len() != cpus.len() {
        return Err(format!("APIC IDs not distinct: {ids:?}"));
    }
    let before: Vec<u64> = cpus.iter().map(|c| c.calls()).collect();
    for round in 0..ROUNDS {
        for (i, cpu) in cpus.iter().enumerate() {
            let arg = round << 8 | i as u64;
            let got = smp::call_on(i, whoami, arg).map_err(|e| format!("cpu {i}: {e:?}"))?;
            let want = (i as u64) << 48
                | u64::from(cpu.apic_id()) << 32
                | u64::from(cpu.apic_id()) << 16
                | (arg & 0xffff);
            if got != want {
                return Err(format!(
                    "cpu {i} round {round}: whoami {got:#x}, expected {want:#x} \
                     (index << 48 | per-CPU APIC ID << 32 | x2APIC ID << 16 | arg)"
                ));
            }
            let n = 1000 + round * 37 + i as u64;
            let sum = smp::call_on(i, sum_to, n).map_err(|e| format!("cpu {i}: {e:?}"))?;
            if sum != n * (n + 1) / 2 {
                return Err(format!("cpu {i}: sum_to({n}) = {sum}"));
            }
        }
    }
    for (i, cpu) in cpus.iter().enumerate() {
        let ran = cpu.calls() - before[i];
        if ran != 2 * ROUNDS {
            return Err(format!("cpu {i} ran {ran} calls, {} were sent", 2 * ROUNDS));
        }
    }
    match smp::call_on(cpus.len(), whoami, 0) {
        Err(CallError::NoSuchCpu) => {}
        r => {
            return Err(format!(
                "a call to cpu {} (none) returned {r:?}",
                cpus.len()
            ))
        }
    }
    crate::println!("smp: {} CPUs, {} calls each", cpus.len(), 2 * ROUNDS);
    Ok(())
}
