//! Platform tables: the minimal ACPI a guest needs to find its CPUs.
//!
//! One RSDP (revision 2) → one XSDT → one MADT, in the reserved BIOS area
//! below 1 MiB (`0xe0000`, where the ACPI spec lets an OS scan for the RSDP
//! when no loader tells it where to look). `hvm_start_info.rsdp_paddr`
//! points at the RSDP, as QEMU's PVH boot does, so the firmware reads the
//! same structure under both hypervisors.
//!
//! ACPI rather than an Intel MP table: QEMU's microvm and q35 give the guest
//! a MADT and no MP table, so a firmware that runs under both must read the
//! MADT anyway; and the MADT is what Linux uses first. No FADT or DSDT: the
//! firmware has no use for them (no power management, no AML), and writing
//! them would pretend to a platform this VMM does not emulate.
//!
//! The MADT lists one processor-local APIC entry per vCPU (APIC ID = vCPU
//! index, as `vstate.rs` puts in CPUID), the in-kernel IOAPIC, and the
//! PCAT_COMPAT flag (KVM's irqchip has the two 8259s).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::error::{Error, Result};

/// Start of the tables (the RSDP first, 16-byte aligned).
pub const RSDP_ADDR: u64 = 0xe_0000;
/// The tables must end inside the reserved BIOS area.
const TABLES_END: u64 = 0x10_0000;
const RSDP_LEN: usize = 36;
const HEADER_LEN: usize = 36;
const XSDT_ADDR: u64 = RSDP_ADDR + 0x40;
const MADT_ADDR: u64 = XSDT_ADDR + 0x40;
/// Where KVM's in-kernel IOAPIC answers, with GSI base 0.
const IOAPIC_ADDR: u32 = 0xfec0_0000;
const LAPIC_ADDR: u32 = 0xfee0_0000;
const MADT_PCAT_COMPAT: u32 = 1;
const MADT_LAPIC: u8 = 0;
const MADT_IOAPIC: u8 = 1;
const LAPIC_ENABLED: u32 = 1;
const OEM_ID: &[u8; 6] = b"FLTLNE";
const OEM_TABLE_ID: &[u8; 8] = b"FAULTLNE";

/// The byte that makes `bytes` sum to zero (mod 256).
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b)))
}

/// A system description table: header (checksum at byte 9 filled in last)
/// followed by `body`.
fn sdt(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let len = (HEADER_LEN + body.len()) as u32;
    let mut t = Vec::with_capacity(len as usize);
    t.extend_from_slice(signature);
    t.extend_from_slice(&len.to_le_bytes());
    t.push(revision);
    t.push(0); // checksum
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    t.extend_from_slice(b"FLVM"); // creator ID
    t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

/// The MADT for `vcpus` CPUs with APIC IDs 0..vcpus.
pub fn madt(vcpus: u32) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    body.extend_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    for id in 0..vcpus {
        // The 8-bit entry: `--vcpus` stops at 255 CPUs (IDs 0..=254), below
        // the broadcast ID, so no x2APIC (type 9) entry is ever needed.
        let id = u8::try_from(id).expect("vCPU count is limited to 255");
        body.extend_from_slice(&[MADT_LAPIC, 8, id, id]);
        body.extend_from_slice(&LAPIC_ENABLED.to_le_bytes());
    }
    body.extend_from_slice(&[MADT_IOAPIC, 12, 0, 0]);
    body.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    sdt(b"APIC", 5, &body)
}

/// RSDP revision 2: RsdtAddress 0 (there is only an XSDT), XsdtAddress set,
/// both checksums (first 20 bytes, whole structure) valid.
fn rsdp(xsdt: u64) -> [u8; RSDP_LEN] {
    let mut r = [0u8; RSDP_LEN];
    r[0..8].copy_from_slice(b"RSD PTR ");
    r[9..15].copy_from_slice(OEM_ID);
    r[15] = 2;
    r[20..24].copy_from_slice(&(RSDP_LEN as u32).to_le_bytes());
    r[24..32].copy_from_slice(&xsdt.to_le_bytes());
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

/// Writes the tables for `vcpus` CPUs; returns the RSDP's address.
pub fn write_acpi(mem: &GuestMemoryMmap, vcpus: u32) -> Result<u64> {
    let madt = madt(vcpus);
    if MADT_ADDR + madt.len() as u64 > TABLES_END {
        return Err(Error::Load(format!(
            "the MADT for {vcpus} vCPUs does not fit below 1 MiB"
        )));
    }
    let xsdt = sdt(b"XSDT", 1, &MADT_ADDR.to_le_bytes());
    let write = |bytes: &[u8], at: u64| {
        mem.write_slice(bytes, GuestAddress(at))
            .map_err(|e| Error::Load(format!("writing ACPI tables: {e}")))
    };
    write(&rsdp(XSDT_ADDR), RSDP_ADDR)?;
    write(&xsdt, XSDT_ADDR)?;
    write(&madt, MADT_ADDR)?;
    Ok(RSDP_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sums_to_zero(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x)) == 0
    }

    #[test]
    fn tables_checksum_and_chain() {
        let mem = crate::memory::create_guest_memory(64 << 20).unwrap();
        assert_eq!(write_acpi(&mem, 3).unwrap(), RSDP_ADDR);
        let mut rsdp = [0u8; RSDP_LEN];
        mem.read_slice(&mut rsdp, GuestAddress(RSDP_ADDR)).unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(sums_to_zero(&rsdp[..20]) && sums_to_zero(&rsdp));
        let xsdt_at = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let mut xsdt = [0u8; HEADER_LEN + 8];
        mem.read_slice(&mut xsdt, GuestAddress(xsdt_at)).unwrap();
        assert_eq!(&xsdt[..4], b"XSDT");
        assert!(sums_to_zero(&xsdt));
        let madt_at = u64::from_le_bytes(xsdt[HEADER_LEN..].try_into().unwrap());
        let len = madt(3).len();
        let mut m = vec![0u8; len];
        mem.read_slice(&mut m, GuestAddress(madt_at)).unwrap();
        assert_eq!(&m[..4], b"APIC");
        assert_eq!(
            u32::from_le_bytes(m[4..8].try_into().unwrap()) as usize,
            len
        );
        assert!(sums_to_zero(&m));
        // Entries after the 44-byte header: three enabled LAPICs, IDs 0..3.
        let mut ids = Vec::new();
        let mut at = HEADER_LEN + 8;
        while at < len {
            let (ty, elen) = (m[at], m[at + 1] as usize);
            if ty == MADT_LAPIC {
                assert_eq!(m[at + 4] & 1, 1);
                ids.push(m[at + 3]);
            }
            at += elen;
        }
        assert_eq!(at, len);
        assert_eq!(ids, [0, 1, 2]);
    }

    #[test]
    fn the_largest_madt_fits_below_1_mib() {
        let mem = crate::memory::create_guest_memory(64 << 20).unwrap();
        write_acpi(&mem, crate::vmm::MAX_VCPUS as u32).unwrap();
    }
}
