//! GPU tests: the device on PCI, its MSI path, hostile register writes, and
//! commands through the driver.
//!
//! Policy when there is no GPU: fail, unless the command line says
//! `gpu=optional`, in which case each test reports SKIPPED and the run
//! prints a SKIPPED banner before the summary (see firmware/README.md).

use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;

use faultline_abi::{pci as id, regs, IntCause, Pte, Status, ABI_VERSION, DEVICE_MAGIC};
use faultline_driver::gpu::{
    Channel, Command, Context, DmaRegion, GpuConfig, GpuError, PageSize, PageTable, Platform,
};

use super::Test;
use crate::arch::{apic, irq, time};
use crate::gpu::{self, Gpu, Policy};
use crate::pci;

pub const TESTS: &[Test] = &[
    Test::new("gpu_probe", gpu_probe),
    Test::new("gpu_msi", gpu_msi),
    Test::new("gpu_fill_copy", gpu_fill_copy),
    Test::new("gpu_bad_input", gpu_bad_input),
];

type Driver = faultline_driver::gpu::Gpu<gpu::FwPlatform>;

/// The driver on the firmware's platform, with a 2 s wait limit (a lost
/// interrupt shows up as a timeout, not a hang).
fn driver(g: &Gpu) -> Result<(Arc<gpu::FwPlatform>, Arc<Driver>), String> {
    let p = Arc::new(g.platform.clone());
    let cfg = GpuConfig {
        timeout_ns: 2_000_000_000,
        ..GpuConfig::default()
    };
    let d = Driver::probe(p.clone(), cfg).map_err(|e| format!("driver probe: {e}"))?;
    Ok((p, d))
}

/// A DMA buffer identity-mapped (VA == GPA) in a fresh context, with a
/// channel on it. Drop order (channel, context, buffer) is the caller's.
struct Setup {
    chan: Channel<gpu::FwPlatform>,
    ctx: Context<gpu::FwPlatform>,
    buf: DmaRegion,
}

fn identity_setup(
    p: &Arc<gpu::FwPlatform>,
    d: &Arc<Driver>,
    pages: usize,
) -> Result<Setup, String> {
    let buf = p.dma_alloc(pages).ok_or("dma_alloc failed")?;
    let e = |what: &str, err: GpuError| format!("{what}: {err}");
    let mut pt = PageTable::new(p.clone()).map_err(|x| e("page table", x))?;
    pt.map_range(
        buf.phys(),
        buf.phys(),
        (pages * 4096) as u64,
        PageSize::Size4K,
        Pte::WRITE,
    )
    .map_err(|x| e("map", x))?;
    let ctx = Context::new(d, pt).map_err(|x| e("context", x))?;
    let chan = Channel::open(&ctx).map_err(|x| e("channel", x))?;
    Ok(Setup { chan, ctx, buf })
}

fn teardown(p: &gpu::FwPlatform, s: Setup) {
    let Setup { chan, ctx, buf } = s;
    drop(chan);
    drop(ctx);
    p.dma_free(buf);
}

/// FILL half a buffer, COPY it to the other half, each completion taken
/// through the CHANNEL MSI; the data is checked through the CPU mapping.
fn gpu_fill_copy() -> Result<(), String> {
    let g = device()?;
    let frames_before = crate::mm::frames::stats().free;
    probe_fill_copy(g)?;
    no_frames_leaked(frames_before)
}

/// Every frame free at `frames_before` (read before a test allocated
/// anything) is free again.
pub(super) fn no_frames_leaked(frames_before: u64) -> Result<(), String> {
    let frames_after = crate::mm::frames::stats().free;
    if frames_after != frames_before {
        return Err(format!(
            "frames leaked: {frames_before} free before, {frames_after} after"
        ));
    }
    Ok(())
}

/// A fresh driver probe, then [`gpu_fill_copy`]'s FILL + COPY with its data
/// checked; the driver is dropped (RESET) at the end.
pub(super) fn probe_fill_copy(g: &Gpu) -> Result<(), String> {
    let (p, d) = driver(g)?;
    let s = identity_setup(&p, &d, 4)?;
    let (src, half) = (s.buf.phys(), 8192u64);
    const PATTERN: u64 = 0x0123_4567_89ab_cdef;
    // Stale bytes the FILL must overwrite and the COPY must replace.
    s.buf.write_bytes(0, &[0x5a; 16]);
    s.buf.write_bytes(half as usize, &[0xa5; 16]);
    let msis = irq::count(faultline_abi::vector::CHANNEL);
    let r = s.chan.run(&Command::Fill {
        dst: src,
        len: half,
        pattern: PATTERN,
    });
    r.map_err(|e| format!("FILL: {e}"))?;
    s.chan
        .run(&Command::Copy {
            dst: src + half,
            src,
            len: half,
        })
        .map_err(|e| format!("COPY: {e}"))?;
    let got = irq::count(faultline_abi::vector::CHANNEL) - msis;
    if got == 0 {
        return Err("both commands completed but no CHANNEL MSI arrived".into());
    }
    // Every word of the first and last 64 bytes of each half, one word
    // per 64 bytes in between (each read is slow under PVM).
    let words = 2 * half as usize / 8;
    let edge = |i: usize| i % (half as usize / 8) < 8 || (i + 8) % (half as usize / 8) < 8;
    for i in (0..words).filter(|&i| i % 8 == 3 || edge(i)) {
        let v = s.buf.read_u64(i * 8);
        if v != PATTERN {
            return Err(format!("word {i} reads {v:#x}, expected {PATTERN:#x}"));
        }
    }
    let copied = d.device_counter(11);
    if copied < half {
        return Err(format!(
            "device counted {copied} bytes copied, expected >= {half}"
        ));
    }
    teardown(&p, s);
    drop(d);
    Ok(())
}

/// Bad commands on a live channel: each gets its error status, and the
/// channel still runs a good command afterwards.
fn bad_commands(d: &Arc<Driver>, s: &Setup) -> Result<(), String> {
    let base = s.buf.phys();
    let fill = |dst, len| Command::Fill {
        dst,
        len,
        pattern: 0x77,
    };
    let mut reserved = fill(base, 64).encode();
    reserved[5] = 1;
    let cases = [
        (
            "unknown opcode",
            Command::Raw([99, 0, 0, 0, 0, 0, 0, 0]),
            Status::InvalidOpcode,
        ),
        (
            "reserved field set",
            Command::Raw(reserved),
            Status::InvalidCommand,
        ),
        ("FILL beyond 2^48", fill(1 << 48, 64), Status::BadAddress),
        (
            "FILL of an unmapped VA",
            fill(0x7000_0000_0000, 64),
            Status::Cancelled,
        ),
        (
            "misaligned ATOMIC",
            Command::Atomic {
                va: base + 3,
                op: faultline_abi::atomic_op::ADD,
                wide: true,
                operand: 1,
                compare: 0,
            },
            Status::Misaligned,
        ),
    ];
    for (what, cmd, want) in cases {
        match s.chan.run(&cmd) {
            Err(GpuError::Command(st)) if st == want => {}
            other => return Err(format!("{what}: {other:?}, expected Command({want:?})")),
        }
    }
    s.chan
        .run(&fill(base, 4096))
        .map_err(|e| format!("good FILL after bad commands: {e}"))?;
    if s.buf.read_u64(4088) != 0x77 {
        return Err("good FILL after bad commands wrote nothing".into());
    }
    let invalid = d.device_counter(24 + Status::InvalidOpcode as u32);
    if invalid == 0 {
        return Err("device counter for InvalidOpcode is 0".into());
    }
    Ok(())
}

/// `ERROR_CODE` values the tests expect (docs/gpu-abi.md "Device errors").
const BAD_SETUP: u32 = 1;
const BAD_CHANNEL_SETUP: u32 = 2;

pub(super) fn device() -> Result<&'static Gpu, String> {
    match gpu::get()? {
        Some(g) => Ok(g),
        None if gpu::policy() == Policy::Optional => Err(super::skip(
            "no Faultline GPU on PCI bus 0 and gpu=optional",
        )),
        None => Err(format!(
            "no Faultline GPU ({:04x}:{:04x}) on PCI bus 0{}; boot with the GPU or pass gpu=optional",
            id::VENDOR_ID,
            id::DEVICE_ID,
            if pci::present() { "" } else { " (no PCI ports at all)" }
        )),
    }
}

fn check(what: &str, got: u32, want: u32) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}: read {got:#x}, expected {want:#x}"))
    }
}

/// Full reset plus a clean interrupt slate: INT_STATUS cleared, nothing
/// pending in the firmware's mask.
fn reset(p: &impl Platform) -> Result<(), String> {
    p.write32(regs::RESET, regs::RESET_VALUE);
    check("STATUS after RESET", p.read32(regs::STATUS), 0)?;
    check("ERROR_CODE after RESET", p.read32(regs::ERROR_CODE), 0)?;
    p.write32(regs::INT_STATUS, u32::MAX);
    p.take_interrupts();
    Ok(())
}

/// Waits for `vector` (ABI vector number) for up to `ms`, sleeping in
/// `wait_interrupt`; returns every vector seen.
fn wait_vector(p: &impl Platform, vector: u32, ms: u64) -> Result<u32, String> {
    let deadline = p.now_ns() + ms * 1_000_000;
    let mut seen = 0;
    loop {
        seen |= p.take_interrupts();
        if seen & (1 << vector) != 0 {
            return Ok(seen);
        }
        let now = p.now_ns();
        if now >= deadline {
            return Err(format!(
                "MSI vector {vector} did not arrive within {ms} ms (seen mask {seen:#x})"
            ));
        }
        p.wait_interrupt(deadline - now);
    }
}

fn gpu_probe() -> Result<(), String> {
    let g = device()?;
    let p = &g.platform;
    let f = g.function;
    check("MAGIC", p.read32(regs::MAGIC), DEVICE_MAGIC)?;
    check(
        "VERSION major",
        p.read32(regs::VERSION) >> 16,
        ABI_VERSION >> 16,
    )?;
    check("NUM_CONTEXTS", p.read32(regs::NUM_CONTEXTS), 64)?;
    check("NUM_CHANNELS", p.read32(regs::NUM_CHANNELS), 8)?;
    reset(p)?;
    check("INT_ENABLE after RESET", p.read32(regs::INT_ENABLE), 0xf)?;
    let t0 =
        u64::from(p.read32(regs::TIMESTAMP_LO)) | u64::from(p.read32(regs::TIMESTAMP_HI)) << 32;
    time::busy_wait_ns(1_000_000);
    let t1 =
        u64::from(p.read32(regs::TIMESTAMP_LO)) | u64::from(p.read32(regs::TIMESTAMP_HI)) << 32;
    if t1 <= t0 {
        return Err(format!("device TIMESTAMP not advancing: {t0} then {t1}"));
    }
    // PCI side, as the firmware left it.
    let cmd = f.read16(pci::COMMAND);
    let want = pci::COMMAND_MEMORY | pci::COMMAND_BUS_MASTER | pci::COMMAND_INTX_DISABLE;
    if cmd & want != want {
        return Err(format!("COMMAND {cmd:#x} lacks {want:#x}"));
    }
    if g.bar.size != id::BAR0_SIZE {
        return Err(format!(
            "BAR0 sized {:#x}, expected {:#x}",
            g.bar.size,
            id::BAR0_SIZE
        ));
    }
    if g.bar_assigned_here && g.bar.base < crate::mm::low_top() {
        return Err(format!(
            "firmware placed BAR0 at {:#x}, inside the memory map",
            g.bar.base
        ));
    }
    let bar = pci::probe_bar64(f, pci::BAR0).map_err(|e| String::from(e.0))?;
    if bar != g.bar {
        return Err(format!("BAR0 now {bar:x?}, probed as {:x?}", g.bar));
    }
    let cap = g.msi.cap;
    check("MSI cap id", u32::from(f.read8(cap)), 0x05)?;
    let ctrl = f.read16(cap + 2);
    check("MSI enable", u32::from(ctrl & 1), 1)?;
    check(
        "MSI vectors enabled (MME)",
        1 << ((ctrl >> 4) & 7),
        id::MSI_VECTORS,
    )?;
    check(
        "MSI address",
        f.read32(cap + 4),
        0xfee0_0000 | (apic::id() << 12),
    )?;
    check(
        "MSI data",
        f.read32(cap + 0xc) & 0xffff,
        u32::from(irq::GPU_VECTOR_BASE),
    )?;
    // Still the same device after all that config traffic.
    check("MAGIC again", p.read32(regs::MAGIC), DEVICE_MAGIC)
}

/// The MSI path end to end without the driver: enabling the device with
/// no setup is a BadSetup error, which raises the ERROR vector; with ERROR
/// cleared in INT_ENABLE the cause only latches.
fn gpu_msi() -> Result<(), String> {
    let g = device()?;
    let p = &g.platform;
    reset(p)?;
    let before = irq::count(faultline_abi::vector::ERROR);
    p.write32(regs::ENABLE, 1);
    let seen = wait_vector(p, faultline_abi::vector::ERROR, 2000)?;
    check("ERROR_CODE", p.read32(regs::ERROR_CODE), BAD_SETUP)?;
    check("STATUS", p.read32(regs::STATUS), 2)?;
    if seen != 1 << faultline_abi::vector::ERROR {
        return Err(format!("vectors {seen:#x} arrived, only ERROR expected"));
    }
    if irq::count(faultline_abi::vector::ERROR) == before {
        return Err("pending bit set but no interrupt counted".into());
    }
    check(
        "INT_STATUS",
        p.read32(regs::INT_STATUS),
        IntCause::ERROR.bits(),
    )?;
    p.write32(regs::INT_STATUS, IntCause::ERROR.bits());
    p.write32(regs::ERROR_CLEAR, 1);
    check(
        "ERROR_CODE after ERROR_CLEAR",
        p.read32(regs::ERROR_CODE),
        0,
    )?;

    // Masked by INT_ENABLE: latched, no MSI.
    p.write32(regs::INT_ENABLE, 0xf & !IntCause::ERROR.bits());
    p.write32(regs::ENABLE, 1);
    check(
        "ERROR_CODE (masked cause)",
        p.read32(regs::ERROR_CODE),
        BAD_SETUP,
    )?;
    check(
        "INT_STATUS (masked cause)",
        p.read32(regs::INT_STATUS),
        IntCause::ERROR.bits(),
    )?;
    if wait_vector(p, faultline_abi::vector::ERROR, 50).is_ok() {
        return Err("ERROR vector sent although INT_ENABLE masks it".into());
    }
    reset(p)
}

/// xorshift64: deterministic garbage.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// High halves of every DMA address register: garbage there lands beyond
/// guest RAM, so a garbage ENABLE can never make the device write over the
/// firmware.
fn high_halves() -> impl Iterator<Item = u64> {
    [
        regs::STATUS_BLOCK_HI,
        regs::FAULT_BUF_HI,
        regs::CTX_TABLE_HI,
        regs::CTL_RING_HI,
    ]
    .into_iter()
    .chain((0..8).flat_map(|ch| {
        [regs::CH_DESC_HI, regs::CH_AVAIL_HI, regs::CH_USED_HI].map(|r| regs::channel_reg(ch, r))
    }))
}

/// Hostile register traffic: garbage of every size at random offsets of
/// the register file, channel blocks, doorbells and counters. The device
/// must report errors through ERROR_CODE and come back clean after RESET.
fn gpu_bad_input() -> Result<(), String> {
    let g = device()?;
    let p = &g.platform;
    reset(p)?;
    for (i, off) in high_halves().enumerate() {
        p.write32(off, 0xdead_0000 | i as u32);
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let base = p.regs_virt();
    let mut writes = 0;
    while writes < 400 {
        let r = rng.next();
        // Mostly the first page (setup registers), channel blocks and
        // doorbells, some counters.
        let off = match r % 4 {
            0 | 1 => (r >> 8) % 0x80,
            2 => 0x1000 + (r >> 8) % 0x200,
            _ => 0x2000 + (r >> 8) % 0x1100,
        };
        let value = (r >> 32) as u32;
        if off & !3 == regs::RESET || high_halves().any(|h| h == off & !3) {
            continue;
        }
        // SAFETY: inside the uncached BAR0 mapping; odd sizes and
        // alignments are what this test is about (the ABI ignores them).
        unsafe {
            match (r >> 2) % 3 {
                0 => ((base + off) as *mut u8).write_volatile(value as u8),
                1 => ((base + (off & !1)) as *mut u16).write_volatile(value as u16),
                _ => ((base + (off & !3)) as *mut u32).write_volatile(value),
            }
        }
        writes += 1;
    }
    check("MAGIC after garbage", p.read32(regs::MAGIC), DEVICE_MAGIC)?;
    if p.read32(regs::STATUS) & 1 != 0 {
        return Err("device enabled itself from garbage (addresses are beyond RAM)".into());
    }
    // Deterministic errors on top of the garbage.
    p.write32(regs::ERROR_CLEAR, 1);
    p.write32(regs::ENABLE, 1);
    check(
        "ERROR_CODE after bad ENABLE",
        p.read32(regs::ERROR_CODE),
        BAD_SETUP,
    )?;
    check("STATUS after bad ENABLE", p.read32(regs::STATUS), 2)?;
    p.write32(regs::ERROR_CLEAR, 1);
    p.write32(regs::channel_reg(5, regs::CH_ENABLE), 1);
    check(
        "ERROR_CODE after CH_ENABLE on a disabled device",
        p.read32(regs::ERROR_CODE),
        BAD_CHANNEL_SETUP,
    )?;
    check("ERROR_INFO (channel)", p.read32(regs::ERROR_INFO), 5)?;
    check(
        "CH_ENABLE status",
        p.read32(regs::channel_reg(5, regs::CH_ENABLE)),
        2,
    )?;
    reset(p)?;
    check("MAGIC after RESET", p.read32(regs::MAGIC), DEVICE_MAGIC)?;
    check(
        "STATUS_BLOCK_HI after RESET",
        p.read32(regs::STATUS_BLOCK_HI),
        0,
    )?;

    // Usable after all that: the driver brings it up, bad commands fail
    // with their statuses, a good one still works.
    let (p, d) = driver(g)?;
    let s = identity_setup(&p, &d, 1)?;
    let r = bad_commands(&d, &s);
    teardown(&p, s);
    // Left enabled (dropping the driver would RESET the device and zero
    // its counters) so `faultline run --stats` shows the error statuses.
    *RETAINED.lock() = Some(d);
    r
}

/// The driver of the last `gpu_bad_input` run; see there.
static RETAINED: crate::sync::Mutex<Option<Arc<Driver>>> = crate::sync::Mutex::new(None);
