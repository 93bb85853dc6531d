//! Time: the TSC, with its frequency from CPUID (leaf 0x15/0x16), the
//! hypervisor timing leaf 0x40000010, or a measurement against PIT channel 2.

use core::arch::x86_64::__cpuid;
use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use super::port::{inb, outb};

const PIT_HZ: u64 = 1_193_182;
const PIT_CH2: u16 = 0x42;
const PIT_CMD: u16 = 0x43;
const PORT_B: u16 = 0x61;
/// PIT measurement windows give up after this many TSC ticks (≈ 5 s at
/// 3 GHz): a VMM without a PIT must not hang boot.
const PIT_GIVE_UP_TICKS: u64 = 15_000_000_000;

static TSC_HZ: AtomicU64 = AtomicU64::new(0);
static SOURCE: AtomicU8 = AtomicU8::new(0);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum TscSource {
    Uncalibrated = 0,
    CpuidCrystal = 1,
    CpuidBaseFreq = 2,
    Hypervisor = 3,
    Pit = 4,
}

impl TscSource {
    pub fn name(self) -> &'static str {
        match self {
            TscSource::Uncalibrated => "uncalibrated",
            TscSource::CpuidCrystal => "cpuid 0x15",
            TscSource::CpuidBaseFreq => "cpuid 0x16",
            TscSource::Hypervisor => "hypervisor leaf 0x40000010",
            TscSource::Pit => "PIT",
        }
    }
}

pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDTSC only reads the counter (CR4.TSD is never set); LFENCE
    // keeps it from executing ahead of earlier instructions.
    unsafe {
        core::arch::asm!("lfence", "rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags));
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

fn from_cpuid() -> Option<(u64, TscSource)> {
    let max = __cpuid(0).eax;
    if max >= 0x15 {
        let l = __cpuid(0x15);
        let (den, num, crystal) = (u64::from(l.eax), u64::from(l.ebx), u64::from(l.ecx));
        if den != 0 && num != 0 && crystal != 0 {
            return Some((crystal * num / den, TscSource::CpuidCrystal));
        }
    }
    if max >= 0x16 {
        let mhz = u64::from(__cpuid(0x16).eax & 0xffff);
        if mhz != 0 {
            return Some((mhz * 1_000_000, TscSource::CpuidBaseFreq));
        }
    }
    None
}

fn from_hypervisor() -> Option<u64> {
    if __cpuid(1).ecx & (1 << 31) == 0 {
        return None;
    }
    if __cpuid(0x4000_0000).eax < 0x4000_0010 {
        return None;
    }
    let khz = u64::from(__cpuid(0x4000_0010).eax);
    (khz != 0).then_some(khz * 1000)
}

/// True when something answers at port 0x61 (a floating bus reads 0xff).
pub fn pit_present() -> bool {
    // SAFETY: reading port B has no side effects.
    unsafe { inb(PORT_B) != 0xff }
}

/// Starts PIT channel 2 counting down from `count` in mode 0 (output goes
/// high at terminal count), gated on, speaker off.
fn pit_start(count: u16) {
    // SAFETY: channel 2 and port B's gate bit are ours; the speaker stays off.
    unsafe {
        outb(PORT_B, (inb(PORT_B) & !0x02) | 0x01);
        outb(PIT_CMD, 0b1011_0000); // channel 2, lobyte/hibyte, mode 0, binary
        outb(PIT_CH2, count as u8);
        outb(PIT_CH2, (count >> 8) as u8);
    }
}

fn pit_done() -> bool {
    // SAFETY: reading port B has no side effects.
    unsafe { inb(PORT_B) & 0x20 != 0 }
}

/// Current channel 2 count (latched, so lo/hi belong together).
pub fn pit_read() -> u16 {
    // SAFETY: latch command for channel 2, then two reads of its data port.
    unsafe {
        outb(PIT_CMD, 0b1000_0000);
        let lo = inb(PIT_CH2);
        let hi = inb(PIT_CH2);
        u16::from_le_bytes([lo, hi])
    }
}

/// Measures the TSC against a `ms`-millisecond PIT countdown; None if the
/// PIT never reaches terminal count.
pub fn pit_measure_tsc_hz(ms: u64) -> Option<u64> {
    if !pit_present() {
        return None;
    }
    let count = PIT_HZ * ms / 1000;
    assert!(count > 0 && count <= 0xffff);
    pit_start(count as u16);
    let t0 = rdtsc();
    while !pit_done() {
        if rdtsc() - t0 > PIT_GIVE_UP_TICKS {
            return None;
        }
        core::hint::spin_loop();
    }
    let t1 = rdtsc();
    Some((t1 - t0) * PIT_HZ / count)
}

/// Elapsed time over `f`, measured by PIT channel 2 alone (≤ 50 ms).
pub fn pit_time_ns(f: impl FnOnce()) -> Option<u64> {
    if !pit_present() {
        return None;
    }
    pit_start(0xffff);
    let start = pit_read();
    f();
    let end = pit_read();
    let ticks = start.checked_sub(end)?;
    Some(u64::from(ticks) * 1_000_000_000 / PIT_HZ)
}

pub fn init() -> (u64, TscSource) {
    log::debug!(
        "time: cpuid max {:#x}, hv max {:#x}, port61 {:#x}",
        __cpuid(0).eax,
        if __cpuid(1).ecx & (1 << 31) != 0 { __cpuid(0x4000_0000).eax } else { 0 },
        // SAFETY: reading port B has no side effects.
        unsafe { inb(PORT_B) }
    );
    let (hz, src) = if let Some(r) = from_cpuid() {
        r
    } else if let Some(hz) = from_hypervisor() {
        (hz, TscSource::Hypervisor)
    } else if let Some(hz) = (0..3).filter_map(|_| pit_measure_tsc_hz(20)).min() {
        // Min of three: an exit or preemption only ever lengthens a window.
        (hz, TscSource::Pit)
    } else {
        // Nothing to calibrate against. Keep time moving (1 GHz guess) so
        // timeouts still expire, and let the timer self-test fail loudly.
        log::error!("time: no TSC frequency source (cpuid, hypervisor leaf, PIT); assuming 1 GHz");
        (1_000_000_000, TscSource::Uncalibrated)
    };
    TSC_HZ.store(hz, Ordering::SeqCst);
    SOURCE.store(src as u8, Ordering::SeqCst);
    (hz, src)
}

pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

pub fn source() -> TscSource {
    match SOURCE.load(Ordering::Relaxed) {
        1 => TscSource::CpuidCrystal,
        2 => TscSource::CpuidBaseFreq,
        3 => TscSource::Hypervisor,
        4 => TscSource::Pit,
        _ => TscSource::Uncalibrated,
    }
}

/// Nanoseconds since TSC reset. u128 intermediate: ticks × 1e9 overflows u64
/// after a few seconds at GHz rates.
pub fn now_ns() -> u64 {
    ticks_to_ns(rdtsc())
}

pub fn ticks_to_ns(ticks: u64) -> u64 {
    let hz = tsc_hz().max(1);
    (u128::from(ticks) * 1_000_000_000 / u128::from(hz)) as u64
}

fn ns_to_ticks(ns: u64) -> u64 {
    (u128::from(ns) * u128::from(tsc_hz()) / 1_000_000_000) as u64
}

/// A point in time to wait for; compare against the TSC without conversions.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    tsc: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimedOut;

impl Deadline {
    pub fn after_ns(ns: u64) -> Deadline {
        Deadline { tsc: rdtsc().saturating_add(ns_to_ticks(ns)) }
    }

    pub fn after_us(us: u64) -> Deadline {
        Self::after_ns(us.saturating_mul(1000))
    }

    pub fn after_ms(ms: u64) -> Deadline {
        Self::after_ns(ms.saturating_mul(1_000_000))
    }

    pub fn expired(&self) -> bool {
        rdtsc() >= self.tsc
    }

    /// Busy-waits until the deadline.
    pub fn wait(&self) {
        while !self.expired() {
            core::hint::spin_loop();
        }
    }

    /// Polls `cond` until it holds or the deadline passes.
    pub fn poll(&self, mut cond: impl FnMut() -> bool) -> Result<(), TimedOut> {
        loop {
            if cond() {
                return Ok(());
            }
            if self.expired() {
                return if cond() { Ok(()) } else { Err(TimedOut) };
            }
            core::hint::spin_loop();
        }
    }
}

pub fn busy_wait_ns(ns: u64) {
    Deadline::after_ns(ns).wait();
}
