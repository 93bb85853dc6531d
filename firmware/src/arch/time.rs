//! Time: the TSC, with its frequency from CPUID (leaf 0x15/0x16), the
//! hypervisor timing leaf 0x40000010, KVM's pvclock scale, or a measurement
//! against the PIT (channel 2, or channel 0 where port 0x61 is missing).

use core::arch::x86_64::__cpuid;
use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use super::port::{inb, outb};

const PIT_HZ: u64 = 1_193_182;
const PIT_DATA: u16 = 0x40;
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
    KvmClock = 4,
    Pit = 5,
}

impl TscSource {
    pub fn name(self) -> &'static str {
        match self {
            TscSource::Uncalibrated => "uncalibrated",
            TscSource::CpuidCrystal => "cpuid 0x15",
            TscSource::CpuidBaseFreq => "cpuid 0x16",
            TscSource::Hypervisor => "hypervisor leaf 0x40000010",
            TscSource::KvmClock => "kvmclock",
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

/// Which PIT channel we can read: 2 (gated through port 0x61, untouched by
/// any timer interrupt) where port 0x61 exists, else 0 (microvm has a PIT but
/// no port 0x61). None when no PIT answers at all.
pub fn pit_channel() -> Option<u8> {
    static CHANNEL: AtomicU8 = AtomicU8::new(0xfe);
    let cached = CHANNEL.load(Ordering::Relaxed);
    if cached != 0xfe {
        return (cached != 0xff).then_some(cached);
    }
    // SAFETY: reading port B has no side effects.
    let port_b = unsafe { inb(PORT_B) } != 0xff;
    // A VMM may answer unclaimed ports with any constant, so only a counter
    // seen moving counts. Interrupts are off and the PIC masked, so
    // reprogramming channel 0 disturbs nobody.
    let ch = [2u8, 0]
        .into_iter()
        .filter(|&ch| ch != 2 || port_b)
        .find(|&ch| pit_counter_runs(ch));
    CHANNEL.store(ch.unwrap_or(0xff), Ordering::Relaxed);
    ch
}

fn pit_counter_runs(ch: u8) -> bool {
    pit_start(ch);
    let first = pit_read(ch);
    let t0 = rdtsc();
    // ~4 ms at 2.5 GHz: hundreds of PIT ticks if there is a PIT.
    while rdtsc() - t0 < 10_000_000 {
        if pit_read(ch) != first {
            return true;
        }
    }
    false
}

/// Starts `ch` as a free-running down-counter (mode 2, reload 65536).
fn pit_start(ch: u8) {
    // SAFETY: the PIT channel (and, for channel 2, port B's gate bit) is ours;
    // the speaker output stays off.
    unsafe {
        if ch == 2 {
            outb(PORT_B, (inb(PORT_B) & !0x02) | 0x01);
        }
        outb(PIT_CMD, (ch << 6) | 0b0011_0100); // lobyte/hibyte, mode 2, binary
        outb(PIT_DATA + u16::from(ch), 0);
        outb(PIT_DATA + u16::from(ch), 0);
    }
}

/// Current count of `ch`, latched so the two bytes belong together.
fn pit_read(ch: u8) -> u16 {
    // SAFETY: a latch command followed by two reads of the data port.
    unsafe {
        outb(PIT_CMD, ch << 6);
        let lo = inb(PIT_DATA + u16::from(ch));
        let hi = inb(PIT_DATA + u16::from(ch));
        u16::from_le_bytes([lo, hi])
    }
}

/// Measures the TSC against `ms` milliseconds of PIT ticks; None if there is
/// no PIT or it stops counting.
pub fn pit_measure_tsc_hz(ms: u64) -> Option<u64> {
    let ch = pit_channel()?;
    let target = PIT_HZ * ms / 1000;
    pit_start(ch);
    let mut last = pit_read(ch);
    // Start on a tick edge so the window is not short by a partial tick.
    let t_edge = rdtsc();
    loop {
        let now = pit_read(ch);
        if now != last {
            last = now;
            break;
        }
        if rdtsc() - t_edge > PIT_GIVE_UP_TICKS {
            return None;
        }
    }
    let t0 = rdtsc();
    let mut ticks = 0u64;
    while ticks < target {
        let now = pit_read(ch);
        // Down-counter modulo 65536: valid while polls are < 54 ms apart.
        ticks += u64::from(last.wrapping_sub(now));
        last = now;
        if rdtsc() - t0 > PIT_GIVE_UP_TICKS {
            return None;
        }
    }
    let t1 = rdtsc();
    Some(((u128::from(t1 - t0) * u128::from(PIT_HZ)) / u128::from(ticks)) as u64)
}

/// Elapsed time over `f` by the PIT alone; `f` must take less than 54 ms.
pub fn pit_time_ns(f: impl FnOnce()) -> Option<u64> {
    let ch = pit_channel()?;
    pit_start(ch);
    let start = pit_read(ch);
    f();
    let end = pit_read(ch);
    Some(u64::from(start.wrapping_sub(end)) * 1_000_000_000 / PIT_HZ)
}

/// TSC frequency from KVM's paravirtual clock: KVM publishes the exact
/// TSC→ns scale it uses for the guest. Registered only long enough to read.
fn from_kvmclock() -> Option<u64> {
    const KVM_FEATURE_CLOCKSOURCE: u32 = 1 << 0;
    const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;
    const MSR_KVM_SYSTEM_TIME: u32 = 0x12;
    const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;

    #[repr(C, align(64))]
    struct PvclockTimeInfo {
        version: u32,
        pad0: u32,
        tsc_timestamp: u64,
        system_time: u64,
        tsc_to_system_mul: u32,
        tsc_shift: i8,
        flags: u8,
        pad: [u8; 2],
    }
    static PVCLOCK: crate::sync::CpuStatic<PvclockTimeInfo> =
        crate::sync::CpuStatic::new(PvclockTimeInfo {
            version: 0,
            pad0: 0,
            tsc_timestamp: 0,
            system_time: 0,
            tsc_to_system_mul: 0,
            tsc_shift: 0,
            flags: 0,
            pad: [0; 2],
        });

    if __cpuid(1).ecx & (1 << 31) == 0 {
        return None;
    }
    let sig = __cpuid(0x4000_0000);
    if (sig.ebx, sig.ecx, sig.edx) != (0x4b4d_564b, 0x564b_4d56, 0x4d) {
        return None;
    }
    let features = __cpuid(0x4000_0001).eax;
    let msr = if features & KVM_FEATURE_CLOCKSOURCE2 != 0 {
        MSR_KVM_SYSTEM_TIME_NEW
    } else if features & KVM_FEATURE_CLOCKSOURCE != 0 {
        MSR_KVM_SYSTEM_TIME
    } else {
        return None;
    };
    let ptr = PVCLOCK.get();
    // The image is identity-mapped: the static's address is its physical one.
    let paddr = ptr as u64;
    let mut msr = x86_64::registers::model_specific::Msr::new(msr);
    // SAFETY: KVM advertised this MSR; it makes KVM write a 32-byte
    // pvclock record into PVCLOCK, which only this function reads.
    unsafe { msr.write(paddr | 1) };
    let mut sample = None;
    for _ in 0..1000 {
        // SAFETY: KVM writes the record on guest entry; volatile reads plus
        // the even/unchanged version protocol give a consistent snapshot.
        let (v1, mul, shift, v2) = unsafe {
            let v1 = core::ptr::read_volatile(&raw const (*ptr).version);
            let mul = core::ptr::read_volatile(&raw const (*ptr).tsc_to_system_mul);
            let shift = core::ptr::read_volatile(&raw const (*ptr).tsc_shift);
            let v2 = core::ptr::read_volatile(&raw const (*ptr).version);
            (v1, mul, shift, v2)
        };
        if v1 == v2 && v1 % 2 == 0 && mul != 0 {
            sample = Some((mul, shift));
            break;
        }
        core::hint::spin_loop();
    }
    // SAFETY: writing 0 disables the clock so KVM stops writing our memory.
    unsafe { msr.write(0) };
    let (mul, shift) = sample?;
    // ns = ((ticks << shift) * mul) >> 32, so Hz = 1e9 * 2^32 / mul / 2^shift.
    let hz = (1_000_000_000u128 << 32) / u128::from(mul);
    let hz = if shift >= 0 {
        hz >> shift
    } else {
        hz << -shift
    };
    Some(hz as u64)
}

pub fn init() -> (u64, TscSource) {
    let (hz, src) = if let Some(r) = from_cpuid() {
        r
    } else if let Some(hz) = from_hypervisor() {
        (hz, TscSource::Hypervisor)
    } else if let Some(hz) = from_kvmclock() {
        (hz, TscSource::KvmClock)
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

/// At `loglevel=debug`: what CPUID offers and, unless the frequency came
/// from it, what the PIT measures (a 20 ms window). Apart from `init` so
/// the boot phases it reports do not include it.
pub fn log_sources() {
    if !log::log_enabled!(log::Level::Debug) {
        return;
    }
    log::debug!(
        "time: cpuid max {:#x}, hypervisor max {:#x}, PIT channel {:?}",
        __cpuid(0).eax,
        if __cpuid(1).ecx & (1 << 31) != 0 {
            __cpuid(0x4000_0000).eax
        } else {
            0
        },
        pit_channel()
    );
    let src = source();
    if src != TscSource::Pit {
        if let Some(pit_hz) = pit_measure_tsc_hz(20) {
            log::debug!(
                "time: {} says {} Hz, PIT measures {pit_hz} Hz",
                src.name(),
                tsc_hz()
            );
        }
    }
}

pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

pub fn source() -> TscSource {
    match SOURCE.load(Ordering::Relaxed) {
        1 => TscSource::CpuidCrystal,
        2 => TscSource::CpuidBaseFreq,
        3 => TscSource::Hypervisor,
        4 => TscSource::KvmClock,
        5 => TscSource::Pit,
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

pub fn ns_to_ticks(ns: u64) -> u64 {
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
        Deadline {
            tsc: rdtsc().saturating_add(ns_to_ticks(ns)),
        }
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
