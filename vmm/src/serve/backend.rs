//! The Faultline GPU behind `vfio_user::ServerBackend`: PCI config space and
//! BAR0 as vfio regions, MSI through the eventfds the client hands over with
//! SET_IRQS, DMA through the memory the client maps with DMA_MAP.
//!
//! Config space is the device crate's own emulation (`Device::config_*`),
//! the one the in-process host exposes through 0xCF8/0xCFC; only the
//! splitting of arbitrary-length vfio accesses into PCI-sized ones is here.

use std::fs::File;
use std::io::{Error, ErrorKind, Write};
use std::sync::{Arc, Mutex};

use faultline_abi::pci::{BAR0_SIZE, CONFIG_SPACE_SIZE, MSI_VECTORS};
use faultline_device::sync::lock;
use faultline_device::InterruptSink;
use vfio_bindings::bindings::vfio::{
    vfio_region_info, VFIO_DMA_UNMAP_FLAG_ALL, VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_SET_ACTION_MASK,
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE, VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_PCI_ERR_IRQ_INDEX, VFIO_PCI_MSI_IRQ_INDEX, VFIO_PCI_NUM_IRQS, VFIO_PCI_NUM_REGIONS,
    VFIO_PCI_REQ_IRQ_INDEX, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::{DmaMapFlags, DmaUnmapFlags, IrqInfo, ServerBackend, ServerRegion};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

/// The device's lock (fair hand-over from its worker, `faultline_device::sync`).
pub type ServedGpuLock = faultline_device::DeviceMutex<GuestMemoryMmap>;

const BAR0: u32 = VFIO_PCI_BAR0_REGION_INDEX;
const CONFIG: u32 = VFIO_PCI_CONFIG_REGION_INDEX;
const MSI: u32 = VFIO_PCI_MSI_IRQ_INDEX;

/// The regions the device has, indexed like vfio-pci's: BAR0 and config
/// space; every other BAR, the ROM and VGA are empty.
pub fn regions() -> Vec<ServerRegion> {
    (0..VFIO_PCI_NUM_REGIONS)
        .map(|index| {
            let size = match index {
                BAR0 => BAR0_SIZE,
                CONFIG => CONFIG_SPACE_SIZE as u64,
                _ => 0,
            };
            let flags = if size > 0 {
                VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE
            } else {
                0
            };
            ServerRegion {
                region_info: vfio_region_info {
                    argsz: std::mem::size_of::<vfio_region_info>() as u32,
                    flags,
                    index,
                    cap_offset: 0,
                    size,
                    offset: 0,
                },
                sparse_areas: Vec::new(),
                mmap_fd: None,
            }
        })
        .collect()
}

/// MSI with the device's 4 vectors; no INTx (interrupt pin 0), no MSI-X.
/// The error and request notifiers exist (one eventfd each) so a client
/// can wire them, but the device never signals them.
pub fn irqs() -> Vec<IrqInfo> {
    (0..VFIO_PCI_NUM_IRQS)
        .map(|index| match index {
            MSI => IrqInfo {
                index,
                flags: VFIO_IRQ_INFO_EVENTFD,
                count: MSI_VECTORS,
            },
            VFIO_PCI_ERR_IRQ_INDEX | VFIO_PCI_REQ_IRQ_INDEX => IrqInfo {
                index,
                flags: VFIO_IRQ_INFO_EVENTFD,
                count: 1,
            },
            _ => IrqInfo {
                index,
                flags: 0,
                count: 0,
            },
        })
        .collect()
}

/// The device's MSI vectors, delivered by writing the client's eventfds.
#[derive(Default)]
pub struct MsiEventfds {
    fds: Mutex<Vec<Option<File>>>,
}

impl MsiEventfds {
    fn set(&self, start: u32, fds: Vec<File>) {
        let mut v = lock(&self.fds);
        for (i, f) in fds.into_iter().enumerate() {
            let slot = start as usize + i;
            if v.len() <= slot {
                v.resize_with(slot + 1, || None);
            }
            v[slot] = Some(f);
        }
    }

    fn clear(&self, start: u32, count: u32) {
        let mut v = lock(&self.fds);
        let end = (start as usize + count as usize).min(v.len());
        for slot in v.iter_mut().take(end).skip(start as usize) {
            *slot = None;
        }
    }
}

impl InterruptSink for MsiEventfds {
    /// Called by the device's worker under the device lock: the write never
    /// blocks (`eventfd_for_msi` made the descriptor non-blocking).
    fn trigger(&self, vector: u32) {
        let v = lock(&self.fds);
        match v.get(vector as usize) {
            Some(Some(f)) => {
                let mut f: &File = f;
                match f.write(&1u64.to_ne_bytes()) {
                    Ok(_) => {}
                    // The counter is saturated: the client has not read it,
                    // so an interrupt is pending anyway.
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        log::debug!("MSI vector {vector}: its eventfd is full");
                    }
                    Err(e) => log::debug!("MSI vector {vector}: writing its eventfd: {e}"),
                }
            }
            // The client has not wired the vector (MSI off on its side):
            // like a real bus, nobody receives the message.
            _ => log::debug!("MSI vector {vector} raised without an eventfd"),
        }
    }
}

fn invalid(msg: String) -> Error {
    Error::new(ErrorKind::InvalidInput, msg)
}

/// Splits `[offset, offset + len)` into naturally aligned pieces of at most
/// `max` bytes (a power of two), as PCI config cycles and 32-bit registers
/// want them.
fn pieces(
    offset: u64,
    len: usize,
    max: usize,
) -> impl Iterator<Item = (u64, std::ops::Range<usize>)> {
    let mut done = 0usize;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let at = offset + done as u64;
        let mut n = max;
        while n > 1 && (!at.is_multiple_of(n as u64) || n > len - done) {
            n /= 2;
        }
        let r = done..done + n;
        done += n;
        Some((at, r))
    })
}

pub struct Backend {
    device: Arc<ServedGpuLock>,
    irq: Arc<MsiEventfds>,
    /// What the client has mapped; the device holds a copy (region list
    /// shared through `Arc`s).
    mem: GuestMemoryMmap,
}

impl Backend {
    pub fn new(device: Arc<ServedGpuLock>, irq: Arc<MsiEventfds>) -> Self {
        Self {
            device,
            irq,
            mem: GuestMemoryMmap::new(),
        }
    }

    fn check_range(region: u32, offset: u64, len: usize) -> std::io::Result<u64> {
        let size = match region {
            BAR0 => BAR0_SIZE,
            CONFIG => CONFIG_SPACE_SIZE as u64,
            _ => return Err(invalid(format!("region {region} does not exist"))),
        };
        match offset.checked_add(len as u64) {
            Some(end) if end <= size => Ok(size),
            _ => Err(invalid(format!(
                "access of {len} bytes at {offset:#x} is outside region {region} ({size:#x} bytes)"
            ))),
        }
    }

    fn publish(&mut self, mem: GuestMemoryMmap) {
        lock(&self.device).set_memory(mem.clone());
        self.mem = mem;
    }
}

impl ServerBackend for Backend {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> std::io::Result<()> {
        Self::check_range(region, offset, data.len())?;
        let mut d = lock(&self.device);
        if region == CONFIG {
            for (at, r) in pieces(offset, data.len(), 4) {
                d.config_read(at, &mut data[r]);
            }
        } else if matches!(data.len(), 1 | 2 | 4 | 8) {
            d.mmio_read(offset, data);
        } else {
            for (at, r) in pieces(offset, data.len(), 4) {
                d.mmio_read(at, &mut data[r]);
            }
        }
        Ok(())
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> std::io::Result<()> {
        Self::check_range(region, offset, data.len())?;
        {
            let mut d = lock(&self.device);
            if region == CONFIG {
                for (at, r) in pieces(offset, data.len(), 4) {
                    d.config_write(at, &data[r]);
                }
                return Ok(());
            }
            if matches!(data.len(), 1 | 2 | 4 | 8) {
                d.mmio_write(offset, data);
            } else {
                for (at, r) in pieces(offset, data.len(), 4) {
                    d.mmio_write(at, &data[r]);
                }
            }
        }
        // mmio_write woke the worker (`Device::set_waker`).
        Ok(())
    }

    fn dma_map(
        &mut self,
        flags: DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> std::io::Result<()> {
        let what = format!("DMA map of {size:#x} bytes at {address:#x}");
        if !flags.contains(DmaMapFlags::WRITE) {
            // QEMU maps its ROMs and PAM-shadowed BIOS areas read-only. The
            // GPU needs writable memory, and a writable mapping of them
            // would let it write what the guest cannot: leave them out, so
            // device DMA there fails like DMA outside RAM.
            log::info!("read-only {what} not mapped: device DMA there fails");
            return Ok(());
        }
        let Some(file) = fd else {
            return Err(invalid(format!(
                "{what} without a file descriptor: guest RAM must be shared memory \
                 (QEMU: -object memory-backend-memfd,share=on)"
            )));
        };
        let len = usize::try_from(size)
            .ok()
            .filter(|&l| l > 0 && address.checked_add(size).is_some());
        let Some(len) = len else {
            return Err(invalid(format!("{what}: empty or wrapping range")));
        };
        // Seal first, then check the size: once sealed the file can only
        // grow, so the size checked is a lower bound for the mapping's life.
        if !file.metadata()?.file_type().is_file() {
            return Err(invalid(format!(
                "{what}: the descriptor is not a memory file"
            )));
        }
        seal_against_shrinking(&file).map_err(|e| invalid(format!("{what}: {e}")))?;
        let meta = file.metadata()?;
        if offset.checked_add(size).is_none_or(|e| e > meta.len()) {
            return Err(invalid(format!(
                "{what}: the file is {:#x} bytes, the map needs {:#x}",
                meta.len(),
                offset.saturating_add(size)
            )));
        }
        let mapping = MmapRegionBuilder::new(len)
            .with_file_offset(FileOffset::new(file, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| invalid(format!("{what}: mmap: {e}")))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(address))
            .ok_or_else(|| invalid(format!("{what}: range wraps")))?;
        let mem = self
            .mem
            .insert_region(Arc::new(region))
            .map_err(|e| invalid(format!("{what}: {e}")))?;
        log::info!("{what} (file offset {offset:#x})");
        self.publish(mem);
        Ok(())
    }

    fn dma_unmap(&mut self, flags: DmaUnmapFlags, address: u64, size: u64) -> std::io::Result<()> {
        if flags.bits() & VFIO_DMA_UNMAP_FLAG_ALL != 0 {
            self.publish(GuestMemoryMmap::new());
            return Ok(());
        }
        if flags.bits() != 0 {
            return Err(invalid(format!(
                "DMA unmap flags {:#x} are not supported",
                flags.bits()
            )));
        }
        let end = address.saturating_add(size);
        let mut doomed = Vec::new();
        for r in self.mem.iter() {
            let (s, len) = (r.start_addr(), r.len());
            let e = s.0 + len;
            if s.0 >= address && e <= end {
                doomed.push((s, len));
            } else if s.0 < end && address < e {
                return Err(invalid(format!(
                    "DMA unmap {address:#x}+{size:#x} cuts the mapping {:#x}..{e:#x}",
                    s.0
                )));
            }
        }
        // Unmapping what was never mapped (e.g. ranges whose map we
        // refused) succeeds, as with the kernel's type1 IOMMU.
        if !doomed.is_empty() {
            let mut mem = self.mem.clone();
            for (s, len) in doomed {
                mem = mem
                    .remove_region(s, len)
                    .map_err(|e| invalid(format!("DMA unmap: {e}")))?
                    .0;
            }
            self.publish(mem);
        }
        Ok(())
    }

    fn reset(&mut self) -> std::io::Result<()> {
        lock(&self.device).reset();
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> std::io::Result<()> {
        let data = flags & 0x7;
        let action = flags & 0x38;
        if matches!(index, VFIO_PCI_ERR_IRQ_INDEX | VFIO_PCI_REQ_IRQ_INDEX) && count <= 1 {
            // Never signalled: accepting (and dropping) the eventfd is all.
            return Ok(());
        }
        if index != MSI {
            // Only "disable" is meaningful for interrupt types we lack.
            if count == 0 && data == VFIO_IRQ_SET_DATA_NONE && fds.is_empty() {
                return Ok(());
            }
            return Err(invalid(format!(
                "interrupt index {index} is not supported (MSI only)"
            )));
        }
        let in_range = start
            .checked_add(count)
            .is_some_and(|end| end <= MSI_VECTORS);
        match (action, data) {
            (VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_NONE) if count == 0 => {
                self.irq.clear(0, MSI_VECTORS);
                Ok(())
            }
            (VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_NONE) if in_range => {
                // A loopback test of the wiring: fire the vectors.
                (start..start + count).for_each(|v| self.irq.trigger(v));
                Ok(())
            }
            (VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD)
                if in_range && fds.len() == count as usize =>
            {
                for (i, f) in fds.iter().enumerate() {
                    eventfd_for_msi(f)
                        .map_err(|why| invalid(format!("MSI vector {}: {why}", start + i as u32)))?;
                }
                self.irq.set(start, fds);
                Ok(())
            }
            (VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD) if in_range && fds.is_empty() => {
                self.irq.clear(start, count);
                Ok(())
            }
            // Masking is the MSI capability's job (per-vector mask bits in
            // config space, which the device emulates).
            (VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_ACTION_UNMASK, _) if in_range => Ok(()),
            _ => Err(invalid(format!(
                "SET_IRQS flags {flags:#x} start {start} count {count} with {} fds is not supported",
                fds.len()
            ))),
        }
    }
}

/// Checks that a client's MSI descriptor is an eventfd (a pipe or socket
/// nobody drains would block the device's worker) and makes it
/// non-blocking, so a saturated counter cannot block it either. The flag
/// is shared with the client's copy; QEMU's eventfds are non-blocking
/// already.
fn eventfd_for_msi(f: &File) -> Result<(), String> {
    let fd = std::os::fd::AsRawFd::as_raw_fd(f);
    let target = std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map_err(|e| format!("cannot tell what its descriptor is: {e}"))?;
    if target.as_os_str() != "anon_inode:[eventfd]" {
        return Err(format!(
            "its descriptor is {}, not an eventfd",
            target.display()
        ));
    }
    // SAFETY: fcntl on a descriptor we own; F_GETFL takes no argument.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above; F_SETFL takes the new status flags as an int.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(format!(
            "cannot make its eventfd non-blocking: {}",
            Error::last_os_error()
        ));
    }
    Ok(())
}

/// Device DMA goes through a shared mapping of the client's file: if the
/// client shrank the file afterwards, a DMA access would raise SIGBUS in this
/// process. A file sealed against shrinking cannot do that, so the seal is a
/// condition of the map (QEMU's memfd backend seals by default).
fn seal_against_shrinking(file: &File) -> Result<(), String> {
    let fd = std::os::fd::AsRawFd::as_raw_fd(file);
    // SAFETY: fcntl on a descriptor we own; F_GET_SEALS takes no argument.
    let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
    if seals >= 0 && seals & libc::F_SEAL_SHRINK != 0 {
        return Ok(());
    }
    // SAFETY: as above; F_ADD_SEALS takes the seal bits as an int.
    if seals >= 0 && unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) } == 0 {
        return Ok(());
    }
    Err(
        "the file cannot be sealed against shrinking, so the client could make device \
         DMA fault in the server: back guest RAM with a sealable memfd \
         (QEMU: memory-backend-memfd, seal=on is its default)"
            .into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_are_naturally_aligned_and_cover_the_range() {
        let got: Vec<_> = pieces(0x3, 9, 4).map(|(a, r)| (a, r.len())).collect();
        assert_eq!(got, vec![(3, 1), (4, 4), (8, 4)]);
        let got: Vec<_> = pieces(0x2, 3, 4).map(|(a, r)| (a, r.len())).collect();
        assert_eq!(got, vec![(2, 2), (4, 1)]);
        assert_eq!(pieces(0, 256, 4).count(), 64);
        assert_eq!(pieces(0, 0, 4).count(), 0);
    }

    #[test]
    fn region_and_irq_tables_follow_vfio_pci_indices() {
        let r = regions();
        assert_eq!(r.len(), 9);
        assert_eq!(r[0].region_info.size, BAR0_SIZE);
        assert_eq!(r[7].region_info.size, 256);
        assert!(r
            .iter()
            .enumerate()
            .all(|(i, x)| x.region_info.index == i as u32));
        assert_eq!(r[1].region_info.flags, 0);
        let i = irqs();
        assert_eq!(i.len(), 5);
        assert_eq!((i[1].index, i[1].count), (1, 4));
        assert_eq!(i[0].count, 0, "no INTx");
        assert_eq!(i[2].count, 0, "no MSI-X");
    }
}
