//! Guest physical memory: layout, size parsing, and the memfd-backed
//! vm-memory regions registered with KVM.
//!
//! Layout: RAM from 0 up to the 32-bit MMIO hole at 3 GiB, the rest above
//! 4 GiB. The hole is where the VMM places device BARs; it is never RAM.
//! RAM lives in one memfd so that its pages can be shared with another
//! process (a vfio-user or vhost peer).

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::FromRawFd;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::error::{Error, Result};

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
/// Start of the 32-bit MMIO hole (device BARs) and of high RAM.
pub const MMIO_HOLE_START: u64 = 3 * GIB;
pub const HIGH_RAM_START: u64 = 4 * GIB;
/// Below this the firmware has no room for its heap and page tables.
pub const MIN_MEMORY: u64 = 16 * MIB;
/// Far above what a test bench needs; keeps the address arithmetic and the
/// guest's 4-level paging comfortably in range.
pub const MAX_MEMORY: u64 = 1 << 40;

/// Parses a size as QEMU's `-m` does: a bare number is MiB; K, M, G, T
/// suffixes (optionally followed by "iB" or "B") are binary units.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    if t.len() > 1 && t[..2].eq_ignore_ascii_case("0x") {
        return Err("hexadecimal sizes are not accepted; use a number with K, M, G or T".into());
    }
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    if num.is_empty() {
        return Err("expected a number with an optional K/M/G/T suffix, e.g. 512M".into());
    }
    let n: u64 = num.parse().map_err(|_| "number too large".to_string())?;
    let unit: u64 = match suffix.to_ascii_uppercase().as_str() {
        "" | "M" | "MB" | "MIB" => MIB,
        "K" | "KB" | "KIB" => 1 << 10,
        "G" | "GB" | "GIB" => GIB,
        "T" | "TB" | "TIB" => 1 << 40,
        _ => return Err(format!("unknown size suffix '{suffix}' (use K, M, G or T)")),
    };
    n.checked_mul(unit)
        .ok_or_else(|| "size overflows".to_string())
}

/// The largest RAM size accepted on a host with `host_ram` bytes.
pub fn max_size(host_ram: Option<u64>) -> u64 {
    host_ram.map_or(MAX_MEMORY, |h| h.min(MAX_MEMORY))
}

/// Checks a requested RAM size against the bench's and the host's limits;
/// the error is the reason.
pub fn validate_size(bytes: u64, host_ram: Option<u64>) -> std::result::Result<u64, String> {
    if bytes < MIN_MEMORY {
        return Err(format!("at least {} MiB is needed", MIN_MEMORY / MIB));
    }
    if !bytes.is_multiple_of(4 << 10) {
        return Err("must be a multiple of 4 KiB".into());
    }
    if bytes > MAX_MEMORY {
        return Err(format!("at most {} GiB is supported", MAX_MEMORY / GIB));
    }
    if let Some(host) = host_ram {
        if bytes > host {
            return Err(format!("larger than this host's {} MiB of RAM", host / MIB));
        }
    }
    Ok(bytes)
}

/// MemTotal from /proc/meminfo, if it can be read.
pub fn host_ram_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The RAM ranges (guest address, length) for `size` bytes of RAM.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_HOLE_START),
            (GuestAddress(HIGH_RAM_START), size - MMIO_HOLE_START),
        ]
    }
}

/// Creates guest RAM backed by one memfd, one vm-memory region per range.
pub fn create_guest_memory(size: u64) -> Result<GuestMemoryMmap> {
    let name: &CStr = c"faultline-guest-ram";
    // SAFETY: `name` is a valid NUL-terminated string; the return value is
    // checked before use.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::io("memfd_create for guest RAM")(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(Error::io("sizing the guest RAM memfd"))?;
    let mut offset = 0;
    let mut ranges = Vec::new();
    for (addr, len) in ram_ranges(size) {
        let file = file
            .try_clone()
            .map_err(Error::io("duplicating the guest RAM memfd"))?;
        ranges.push((addr, len as usize, Some(FileOffset::new(file, offset))));
        offset += len;
    }
    GuestMemoryMmap::from_ranges_with_files(ranges).map_err(|e| Error::GuestMemory(e.to_string()))
}

/// Registers every region as a KVM memory slot.
pub fn register_with_kvm(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<()> {
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| Error::GuestMemory(e.to_string()))?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping of `memory_size` bytes owned by
        // `mem`, which the VM outlives only after all vCPUs have stopped.
        unsafe { vm.set_user_memory_region(r) }.map_err(Error::kvm("registering guest RAM"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_qemu() {
        assert_eq!(parse_size("512"), Ok(512 * MIB));
        assert_eq!(parse_size("512M"), Ok(512 * MIB));
        assert_eq!(parse_size("2G"), Ok(2 * GIB));
        assert_eq!(parse_size("1GiB"), Ok(GIB));
        assert_eq!(parse_size("65536k"), Ok(64 * MIB));
        assert!(parse_size("abc").is_err());
        assert!(parse_size("12X").is_err());
        // The user's own text, not an upper-cased copy.
        assert_eq!(
            parse_size("12xyz").unwrap_err(),
            "unknown size suffix 'xyz' (use K, M, G or T)"
        );
        assert!(parse_size("0x40000000")
            .unwrap_err()
            .contains("hexadecimal"));
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
        assert!(parse_size("18446744073709551615T").is_err());
    }

    #[test]
    fn size_limits() {
        assert!(validate_size(MIB, None).is_err());
        assert!(validate_size(16 * MIB + 1, None).is_err());
        assert!(validate_size(64 * GIB, Some(24 * GIB)).is_err());
        assert_eq!(validate_size(512 * MIB, Some(GIB)).unwrap(), 512 * MIB);
    }

    #[test]
    fn layout_skips_the_mmio_hole() {
        assert_eq!(ram_ranges(512 * MIB), vec![(GuestAddress(0), 512 * MIB)]);
        let r = ram_ranges(4 * GIB);
        assert_eq!(r[0], (GuestAddress(0), 3 * GIB));
        assert_eq!(r[1], (GuestAddress(4 * GIB), GIB));
    }

    #[test]
    fn guest_memory_is_one_memfd_in_two_regions() {
        let mem = create_guest_memory(3 * GIB + 2 * MIB).unwrap();
        assert_eq!(mem.num_regions(), 2);
        let high = mem.find_region(GuestAddress(4 * GIB)).unwrap();
        assert_eq!(high.len(), 2 * MIB);
        assert_eq!(high.file_offset().unwrap().start(), 3 * GIB);
        assert!(mem.find_region(GuestAddress(3 * GIB + MIB)).is_none());
    }
}
