//! `smp`: every CPU the platform described came up, knows who it is through
//! its per-CPU data, and runs functions sent to it by IPI.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicUsize, Ordering};

use x86_64::instructions::interrupts;

use super::Test;
use crate::arch::apic;
use crate::arch::time::Deadline;
use crate::smp::acpi::{read_madt, AcpiError};
use crate::smp::{self, CallError};
use crate::sync::{self, IrqMutex};

pub const TESTS: &[Test] = &[
    Test::new("smp", smp_test),
    Test::new("smp_irq_lock", irq_lock),
    Test::new("smp_madt_parse", madt_parse),
];

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

/// Lock rounds per CPU in `smp_irq_lock`.
const LOCK_ROUNDS: u64 = 2000;

static SHARED: IrqMutex<u64> = IrqMutex::new(0);
/// CPUs that reached `hammer`'s start line.
static ARRIVED: AtomicUsize = AtomicUsize::new(0);

/// Waits for every CPU at the start line, then takes and releases `SHARED`
/// `rounds` times, incrementing it by a separate load and store (a lost
/// update if exclusion failed). Checks on every round that this CPU's
/// interrupt-lock nesting is 1 inside and 0 outside, and that the interrupt
/// flag comes back as it was. Returns the checks that failed, or u64::MAX
/// if the others never arrived.
fn hammer(rounds: u64) -> u64 {
    let cpus = smp::cpus().len();
    ARRIVED.fetch_add(1, Ordering::AcqRel);
    let start = Deadline::after_ms(5000).poll(|| ARRIVED.load(Ordering::Acquire) >= cpus);
    if start.is_err() {
        return u64::MAX;
    }
    let if_before = interrupts::are_enabled();
    let mut bad = 0;
    for _ in 0..rounds {
        {
            let mut g = SHARED.lock();
            bad += u64::from(sync::irq_lock_depth() != 1);
            bad += u64::from(interrupts::are_enabled());
            let v = core::hint::black_box(*g);
            *g = v + 1;
        }
        bad += u64::from(sync::irq_lock_depth() != 0);
        bad += u64::from(interrupts::are_enabled() != if_before);
    }
    crate::println!(
        "smp_irq_lock: cpu {} took the lock {rounds} times, {bad} bad checks",
        smp::this_cpu().index
    );
    bad
}

/// Every CPU takes an interrupt-safe lock shared with the others, all at
/// once: the total under the lock is exact and each CPU's nesting and
/// interrupt flag are its own. Every CPU prints a line (console from an
/// AP). On one CPU, the boot CPU's rounds alone (`test=smp cpus=2` is the
/// step that requires the APs).
fn irq_lock() -> Result<(), String> {
    let cpus = smp::cpus();
    *SHARED.lock() = 0;
    ARRIVED.store(0, Ordering::Release);
    let pending: Vec<smp::Pending> = (1..cpus.len())
        .map(|i| smp::start_on(i, hammer, LOCK_ROUNDS).map_err(|e| format!("cpu {i}: {e:?}")))
        .collect::<Result<_, _>>()?;
    // With interrupts on here (the APs run calls with them off), so a
    // flag recorded by the wrong CPU shows.
    let was_on = interrupts::are_enabled();
    interrupts::enable();
    let mine = hammer(LOCK_ROUNDS);
    if !was_on {
        interrupts::disable();
    }
    let mut bad = vec![mine];
    for (i, p) in pending.into_iter().enumerate() {
        bad.push(
            p.wait(30_000)
                .map_err(|e| format!("cpu {}: {e:?}", i + 1))?,
        );
    }
    if bad.contains(&u64::MAX) {
        return Err(format!("not every CPU reached the start line: {bad:?}"));
    }
    let total = *SHARED.lock();
    let want = LOCK_ROUNDS * cpus.len() as u64;
    if total != want || bad.iter().any(|&b| b != 0) {
        return Err(format!(
            "counter {total}, expected {want}; failed nesting/IF checks per CPU {bad:?}"
        ));
    }
    Ok(())
}

/// The byte that makes `b` sum to zero.
fn fix(b: &mut [u8], at: usize) {
    b[at] = 0;
    b[at] = 0u8.wrapping_sub(b.iter().fold(0u8, |a, &x| a.wrapping_add(x)));
}

/// A table: 36-byte header (signature, length, checksum) then `body`.
fn sdt(sig: &[u8; 4], body: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(sig);
    t.extend_from_slice(&((36 + body.len()) as u32).to_le_bytes());
    t.resize(36, 0);
    t.extend_from_slice(body);
    fix(&mut t, 9);
    t
}

const RSDP_AT: usize = 0;
const ROOT_AT: usize = 0x40;
const MADT_AT: usize = 0x100;

/// RSDP, root table and MADT laid out in one page at physical `base`:
/// revision 2 with an XSDT, or revision 0 with an RSDT.
fn tables(base: u64, xsdt: bool, entries: &[u8]) -> Vec<u8> {
    let mut page = alloc::vec![0u8; 4096];
    let mut r = [0u8; 36];
    r[..8].copy_from_slice(b"RSD PTR ");
    let madt = base + MADT_AT as u64;
    let root = base + ROOT_AT as u64;
    let root_table = if xsdt {
        r[15] = 2;
        r[20..24].copy_from_slice(&36u32.to_le_bytes());
        r[24..32].copy_from_slice(&root.to_le_bytes());
        sdt(b"XSDT", &madt.to_le_bytes())
    } else {
        r[16..20].copy_from_slice(&(root as u32).to_le_bytes());
        sdt(b"RSDT", &(madt as u32).to_le_bytes())
    };
    fix(&mut r[..20], 8);
    if xsdt {
        fix(&mut r, 32);
    }
    page[RSDP_AT..RSDP_AT + 36].copy_from_slice(&r);
    page[ROOT_AT..ROOT_AT + root_table.len()].copy_from_slice(&root_table);
    let mut body = alloc::vec![0u8; 8];
    body.extend_from_slice(entries);
    let m = sdt(b"APIC", &body);
    page[MADT_AT..MADT_AT + m.len()].copy_from_slice(&m);
    page
}

fn lapic(id: u8, flags: u32) -> [u8; 8] {
    let f = flags.to_le_bytes();
    [0, 8, id, id, f[0], f[1], f[2], f[3]]
}

fn x2apic(id: u32, flags: u32) -> [u8; 16] {
    let mut e = [0u8; 16];
    e[0] = 9;
    e[1] = 16;
    e[4..8].copy_from_slice(&id.to_le_bytes());
    e[8..12].copy_from_slice(&flags.to_le_bytes());
    e
}

/// The MADT reader on good and on hostile tables (written to a frame, read
/// back through the identity map as the boot path reads the loader's).
fn madt_parse() -> Result<(), String> {
    // Without start_info's pointer the reader scans the BIOS area, where
    // both hypervisors put their RSDP: the same CPUs as the boot found.
    let scanned = read_madt(0).map_err(|e| format!("scan for the RSDP: {e}"))?;
    let booted = smp::cpus().len();
    if scanned.apic_ids.len().min(smp::MAX_CPUS) != booted {
        return Err(format!(
            "the scanned RSDP at {:#x} lists {} CPUs, boot found {booted}",
            scanned.rsdp,
            scanned.apic_ids.len()
        ));
    }
    let frame = crate::mm::frames::alloc().ok_or("no frame")?;
    let base = frame.as_u64();
    if base >= 4 << 30 {
        crate::mm::frames::free(frame);
        return Err(super::skip("no frame below 4 GiB"));
    }
    let r = madt_cases(base);
    crate::mm::frames::free(frame);
    r
}

fn madt_cases(base: u64) -> Result<(), String> {
    let write = |page: &[u8]| {
        let p = crate::mm::direct_map::phys_to_virt(x86_64::PhysAddr::new(base)).as_mut_ptr::<u8>();
        // SAFETY: the test's own frame, 4 KiB, reached through the direct map.
        unsafe { core::ptr::copy_nonoverlapping(page.as_ptr(), p, page.len()) };
    };
    let mut entries = Vec::new();
    entries.extend_from_slice(&lapic(0, 1));
    entries.extend_from_slice(&lapic(1, 1));
    entries.extend_from_slice(&lapic(2, 0)); // not enabled
    entries.extend_from_slice(&[1, 12, 0, 0, 0, 0, 0xc0, 0xfe, 0, 0, 0, 0]); // IOAPIC
    entries.extend_from_slice(&x2apic(300, 1));
    entries.extend_from_slice(&lapic(1, 1)); // a duplicate
    for xsdt in [true, false] {
        write(&tables(base, xsdt, &entries));
        let m = read_madt(base).map_err(|e| format!("valid tables (xsdt {xsdt}): {e}"))?;
        if m.apic_ids != [0, 1, 300] || m.skipped != 2 {
            return Err(format!(
                "xsdt {xsdt}: APIC IDs {:?}, {} skipped; expected [0, 1, 300], 2",
                m.apic_ids, m.skipped
            ));
        }
    }
    // Each corruption of the good tables, and the error it must give.
    type Corrupt = fn(&mut Vec<u8>);
    let cases: [(&str, Corrupt, AcpiError); 6] = [
        (
            "RSDP checksum",
            |p| p[RSDP_AT + 8] ^= 1,
            AcpiError::BadRsdp("bad checksum"),
        ),
        (
            "MADT checksum",
            |p| p[MADT_AT + 40] ^= 1,
            AcpiError::BadChecksum("MADT"),
        ),
        (
            "MADT length",
            |p| p[MADT_AT + 7] = 0xff,
            AcpiError::BadLength("MADT"),
        ),
        (
            "zero-length entry",
            |p| {
                p[MADT_AT + 45] = 0;
                fix(&mut p[MADT_AT..MADT_AT + 44 + 8 * 3 + 12 + 16 + 8], 9);
            },
            AcpiError::BadMadtEntry(0),
        ),
        (
            "entry past the end",
            |p| {
                p[MADT_AT + 44 + 8 * 3 + 12 + 16 + 1] = 200;
                fix(&mut p[MADT_AT..MADT_AT + 44 + 8 * 3 + 12 + 16 + 8], 9);
            },
            AcpiError::BadMadtEntry(0),
        ),
        (
            "XSDT entry above 4 GiB",
            |p| {
                p[ROOT_AT + 36 + 4] = 0x10;
                fix(&mut p[ROOT_AT..ROOT_AT + 44], 9);
            },
            AcpiError::NoMadt,
        ),
    ];
    for (what, corrupt, want) in cases {
        let mut page = tables(base, true, &entries);
        corrupt(&mut page);
        write(&page);
        let got = read_madt(base).err();
        let same = match (got, want) {
            (Some(AcpiError::BadMadtEntry(_)), AcpiError::BadMadtEntry(_)) => true,
            (g, w) => g == Some(w),
        };
        if !same {
            return Err(format!("{what}: got {got:?}, expected {want:?}"));
        }
    }
    Ok(())
}
