//! Just enough ACPI to list the CPUs: RSDP → XSDT (or RSDT) → MADT, and the
//! MADT's processor-local APIC (type 0) and x2APIC (type 9) entries.
//!
//! The tables are the loader's (our VMM's `vmm/src/platform.rs`, QEMU's
//! firmware): untrusted input, read through the boot identity map, so every
//! address and length is checked against the 4 GiB it covers and every
//! table's checksum is verified before any field of it is used. A table that
//! fails a check is an error, never a panic.

use alloc::vec::Vec;

const IDENTITY_LIMIT: u64 = 4 << 30;
const HEADER_LEN: u64 = 36;
/// More than any MADT for `MAX_CPUS` x2APIC entries; a bigger `length` is
/// taken for garbage rather than scanned.
const TABLE_MAX: u64 = 64 << 10;
const MADT_LAPIC: u8 = 0;
const MADT_X2APIC: u8 = 9;
/// Processor Local APIC flags: Enabled, Online Capable.
const LAPIC_ENABLED: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcpiError {
    NoRsdp,
    BadRsdp(&'static str),
    /// A table (signature) lies outside the identity map or is too long.
    OutOfRange(&'static str, u64),
    BadChecksum(&'static str),
    BadLength(&'static str),
    NoMadt,
    BadMadtEntry(u64),
}

impl core::fmt::Display for AcpiError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            AcpiError::NoRsdp => write!(f, "no RSDP (start_info has none, none in 0xe0000..1 MiB)"),
            AcpiError::BadRsdp(why) => write!(f, "RSDP: {why}"),
            AcpiError::OutOfRange(t, a) => write!(f, "{t} at {a:#x} is outside the identity map"),
            AcpiError::BadChecksum(t) => write!(f, "{t}: bad checksum"),
            AcpiError::BadLength(t) => write!(f, "{t}: bad length"),
            AcpiError::NoMadt => write!(f, "no MADT (APIC) among the root table's entries"),
            AcpiError::BadMadtEntry(at) => write!(f, "MADT: malformed entry at {at:#x}"),
        }
    }
}

/// `len` bytes of physical memory at `paddr`, if the identity map covers them.
fn phys(what: &'static str, paddr: u64, len: u64) -> Result<&'static [u8], AcpiError> {
    match paddr.checked_add(len) {
        Some(end) if paddr != 0 && end <= IDENTITY_LIMIT => {
            // SAFETY: [paddr, end) is below 4 GiB, which the boot identity
            // map covers for the firmware's whole life; the bytes are only
            // read, and RAM or reserved areas read as whatever they hold.
            Ok(unsafe { core::slice::from_raw_parts(paddr as *const u8, len as usize) })
        }
        _ => Err(AcpiError::OutOfRange(what, paddr)),
    }
}

/// Whether the bytes of `b` sum to 0 mod 256. Eight bytes a step, in four
/// 16-bit lanes kept mod 256 (so none carries into the next), then the
/// lanes and the tail: under PVM each instruction of a byte loop costs
/// ~1 µs.
fn sums_to_zero(b: &[u8]) -> bool {
    const LOW: u64 = 0x00ff_00ff_00ff_00ff;
    let mut chunks = b.chunks_exact(8);
    let mut lanes = 0u64;
    for c in &mut chunks {
        let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        lanes = (lanes + (w & LOW) + ((w >> 8) & LOW)) & LOW;
    }
    let folded = (0..4).fold(0u8, |a, i| a.wrapping_add((lanes >> (16 * i)) as u8));
    chunks
        .remainder()
        .iter()
        .fold(folded, |a, &x| a.wrapping_add(x))
        == 0
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | u64::from(u32_at(b, at + 4)) << 32
}

/// A checked RSDP at `paddr`: (root table address, its entries are 8 bytes).
fn rsdp_at(paddr: u64) -> Result<(u64, bool), AcpiError> {
    let r = phys("RSDP", paddr, 20)?;
    if &r[..8] != b"RSD PTR " {
        return Err(AcpiError::BadRsdp("no signature"));
    }
    if !sums_to_zero(r) {
        return Err(AcpiError::BadRsdp("bad checksum"));
    }
    if r[15] >= 2 {
        let r = phys("RSDP", paddr, 36)?;
        let len = u32_at(r, 20);
        if !(36..=4096).contains(&len) || !sums_to_zero(phys("RSDP", paddr, u64::from(len))?) {
            return Err(AcpiError::BadRsdp("bad extended checksum"));
        }
        let xsdt = u64_at(r, 24);
        if xsdt != 0 {
            return Ok((xsdt, true));
        }
    }
    Ok((u64::from(u32_at(r, 16)), false))
}

/// The spec's fallback when nobody passes the RSDP: a 16-byte aligned
/// signature in the BIOS area (the first KiB of the EBDA is not searched:
/// no loader here puts one there).
fn scan_bios_area() -> Option<u64> {
    let signature = u64::from_le_bytes(*b"RSD PTR ");
    (0xe_0000u64..0x10_0000).step_by(16).find(|&a| {
        // SAFETY: the BIOS area is below 1 MiB, identity-mapped; an aligned
        // read of 8 bytes there has no side effect.
        let head = unsafe { core::ptr::read_volatile(a as *const u64) };
        head == signature && rsdp_at(a).is_ok()
    })
}

/// A table with a valid header and checksum: its bytes, header included.
fn table(what: &'static str, paddr: u64) -> Result<&'static [u8], AcpiError> {
    let h = phys(what, paddr, HEADER_LEN)?;
    let len = u64::from(u32_at(h, 4));
    if !(HEADER_LEN..=TABLE_MAX).contains(&len) {
        return Err(AcpiError::BadLength(what));
    }
    let t = phys(what, paddr, len)?;
    if !sums_to_zero(t) {
        return Err(AcpiError::BadChecksum(what));
    }
    Ok(t)
}

/// The CPUs a MADT lists.
pub struct Madt {
    /// APIC IDs of the enabled processors, in table order.
    pub apic_ids: Vec<u32>,
    /// Processor entries not started: not enabled (online-capable or
    /// absent), or repeating an ID already listed.
    pub skipped: u32,
    pub rsdp: u64,
}

/// Reads the MADT through the RSDP at `rsdp_paddr` (0: scan for one).
pub fn read_madt(rsdp_paddr: u64) -> Result<Madt, AcpiError> {
    let rsdp = match rsdp_paddr {
        0 => scan_bios_area().ok_or(AcpiError::NoRsdp)?,
        p => p,
    };
    let (root, wide) = rsdp_at(rsdp)?;
    let root_name = if wide { "XSDT" } else { "RSDT" };
    let rt = table(root_name, root)?;
    let width = if wide { 8 } else { 4 };
    let madt = rt[HEADER_LEN as usize..]
        .chunks_exact(width)
        .map(|e| {
            if wide {
                u64_at(e, 0)
            } else {
                u64::from(u32_at(e, 0))
            }
        })
        .find(|&a| phys("table", a, 4).is_ok_and(|s| s == b"APIC"))
        .ok_or(AcpiError::NoMadt)?;
    let m = table("MADT", madt)?;
    let mut out = Madt {
        apic_ids: Vec::new(),
        skipped: 0,
        rsdp,
    };
    // After the header: local APIC address (4) and flags (4), then entries
    // of (type, length, ...).
    let mut at = HEADER_LEN as usize + 8;
    while at < m.len() {
        let bad = AcpiError::BadMadtEntry(madt + at as u64);
        let (ty, len) = match m.get(at..at + 2) {
            Some(&[ty, len]) => (ty, usize::from(len)),
            _ => return Err(bad),
        };
        let e = m.get(at..at + len).filter(|_| len >= 2).ok_or(bad)?;
        let cpu = match ty {
            MADT_LAPIC if len >= 8 => Some((u32::from(e[3]), u32_at(e, 4))),
            MADT_X2APIC if len >= 16 => Some((u32_at(e, 4), u32_at(e, 8))),
            MADT_LAPIC | MADT_X2APIC => return Err(bad),
            _ => None,
        };
        match cpu {
            // A duplicate ID would start one CPU twice.
            Some((id, flags)) if flags & LAPIC_ENABLED != 0 && !out.apic_ids.contains(&id) => {
                out.apic_ids.push(id)
            }
            Some(_) => out.skipped += 1,
            None => {}
        }
        at += len;
    }
    Ok(out)
}
