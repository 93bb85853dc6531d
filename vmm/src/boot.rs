//! Loads the PVH firmware and prepares the boot vCPU's entry state.
//!
//! PVH (Xen's direct boot ABI, also used by QEMU and Cloud Hypervisor):
//! enter at the ELF note's 32-bit entry in flat protected mode, paging off,
//! with EBX pointing at `hvm_start_info`, which lists RAM and the command line.

use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use faultline_abi::le;
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use linux_loader::loader::elf::Elf;
use linux_loader::loader::{load_cmdline, KernelLoader};
use vm_memory::{Address, GuestAddress, GuestMemoryMmap};

use crate::error::{Error, Result};
use crate::memory::{ram_ranges, MIB};

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// Boot data sits in low memory below 1 MiB, where the firmware never
/// allocates (it treats everything below 1 MiB as reserved).
pub const START_INFO_ADDR: u64 = 0x6000;
const MEMMAP_ADDR: u64 = 0x7000;
const CMDLINE_ADDR: u64 = 0x2_0000;
pub const CMDLINE_MAX: usize = 4096;
/// Legacy VGA/BIOS area: reported reserved, as on a PC.
const LOW_RAM_END: u64 = 0x9_fc00;
const HIGH_MEMORY_START: u64 = MIB;

/// What a pre-pass over the ELF headers learns, so bad images get a precise
/// message before anything is written to guest memory.
#[derive(Debug, PartialEq, Eq)]
pub struct ElfInfo {
    /// The ELF header's entry point.
    pub elf_entry: u64,
    /// The PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY).
    pub entry: u64,
    /// One past the highest guest-physical byte a PT_LOAD segment occupies.
    pub load_end: u64,
    pub segments: Vec<Segment>,
}

/// One PT_LOAD program header.
#[derive(Debug, PartialEq, Eq)]
pub struct Segment {
    /// Its index among the program headers.
    pub index: usize,
    pub offset: u64,
    pub filesz: u64,
    pub paddr: u64,
    pub memsz: u64,
}

impl std::fmt::Display for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PT_LOAD segment {} (guest {:#x}..{:#x}, file bytes {:#x}..{:#x})",
            self.index,
            self.paddr,
            self.paddr.saturating_add(self.memsz),
            self.offset,
            self.offset.saturating_add(self.filesz)
        )
    }
}

/// Note segments larger than this are not read (the PVH note is 20 bytes).
const MAX_NOTES: u64 = 64 << 10;

/// Reads `len` bytes at `offset` of an image, None past its end.
pub trait Image {
    fn bytes_at(&self, offset: u64, len: usize) -> Option<Vec<u8>>;
}

impl Image for [u8] {
    fn bytes_at(&self, offset: u64, len: usize) -> Option<Vec<u8>> {
        let o = usize::try_from(offset).ok()?;
        self.get(o..o.checked_add(len)?).map(<[u8]>::to_vec)
    }
}

impl Image for File {
    fn bytes_at(&self, offset: u64, len: usize) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.read_exact_at(&mut buf, offset).ok()?;
        Some(buf)
    }
}

/// Reads the ELF and program headers and the notes, never the segments'
/// contents, so a huge file is judged as fast as a small one.
pub fn inspect_elf(image: &(impl Image + ?Sized)) -> std::result::Result<ElfInfo, String> {
    let Some(ehdr) = image.bytes_at(0, 64).or_else(|| image.bytes_at(0, 6)) else {
        return Err("not an ELF file (bad magic)".into());
    };
    let u16_at = |b: &[u8], at: usize| le::u16_at(b, at);
    let u32_at = |b: &[u8], at: usize| le::u32_at(b, at);
    let u64_at = |b: &[u8], at: usize| le::u64_at(b, at);
    if ehdr.get(..4) != Some(b"\x7fELF") {
        return Err("not an ELF file (bad magic)".into());
    }
    if ehdr.get(4) != Some(&2) || ehdr.get(5) != Some(&1) {
        return Err("not a 64-bit little-endian ELF".into());
    }
    const EM_X86_64: u16 = 62;
    if ehdr.len() < 64 {
        return Err("truncated ELF header".into());
    }
    if u16_at(&ehdr, 18) != Some(EM_X86_64) {
        return Err("not an x86-64 ELF".into());
    }
    let short = || "truncated ELF header".to_string();
    let elf_entry = u64_at(&ehdr, 24).ok_or_else(short)?;
    let phoff = u64_at(&ehdr, 32).ok_or_else(short)?;
    let phentsize = u16_at(&ehdr, 54).ok_or_else(short)? as usize;
    let phnum = u16_at(&ehdr, 56).ok_or_else(short)? as usize;
    if phentsize != 56 {
        return Err(format!("unexpected program header size {phentsize}"));
    }
    let phdrs = image
        .bytes_at(phoff, phnum * phentsize)
        .ok_or("the program headers lie outside the file")?;
    const PT_LOAD: u32 = 1;
    const PT_NOTE: u32 = 4;
    let mut load_end = 0u64;
    let mut entry = None;
    let mut segments = Vec::new();
    for (index, ph) in phdrs.chunks_exact(phentsize).enumerate() {
        let field = |at| u64_at(ph, at).unwrap_or(0);
        let p_type = u32_at(ph, 0).unwrap_or(0);
        let (offset, paddr, filesz, memsz) = (field(8), field(24), field(32), field(40));
        if p_type == PT_NOTE {
            if filesz > MAX_NOTES {
                return Err(format!(
                    "note segment {index} is {filesz:#x} bytes (at most {MAX_NOTES:#x} are read)"
                ));
            }
            let notes = image
                .bytes_at(offset, filesz as usize)
                .ok_or_else(|| format!("note segment {index} lies outside the file"))?;
            entry = entry.or(pvh_entry(&notes));
        }
        if p_type != PT_LOAD {
            continue;
        }
        let seg = Segment {
            index,
            offset,
            filesz,
            paddr,
            memsz,
        };
        let end = paddr
            .checked_add(memsz.max(filesz))
            .ok_or_else(|| format!("{seg}: its address range overflows"))?;
        load_end = load_end.max(end);
        segments.push(seg);
    }
    if load_end == 0 {
        return Err("no loadable segments".into());
    }
    let Some(entry) = entry else {
        return Err(
            "no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); faultline boots PVH images only".into(),
        );
    };
    Ok(ElfInfo {
        elf_entry,
        entry,
        load_end,
        segments,
    })
}

/// A guest image checked against the file it lives in and the guest RAM
/// it is for; nothing of its contents read yet.
pub struct Firmware {
    pub path: PathBuf,
    file: File,
    info: ElfInfo,
}

/// Opens and checks the image before any VM setup: it must be a regular
/// file (a FIFO or device would block or never end), an x86-64 PVH ELF
/// whose segments lie inside the file and inside low RAM at or above
/// 1 MiB, with its PVH entry point inside one of them.
pub fn open_firmware(path: &Path, mem_size: u64) -> Result<Firmware> {
    use std::os::unix::fs::OpenOptionsExt;
    let invalid = |reason: String| Error::FirmwareInvalid {
        path: path.to_path_buf(),
        reason,
    };
    // O_NONBLOCK: opening a FIFO must not wait for a writer.
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::FirmwareMissing(path.to_path_buf()))
        }
        Err(source) => {
            return Err(Error::FirmwareRead {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let meta = file.metadata().map_err(|source| Error::FirmwareRead {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_file() {
        let ft = meta.file_type();
        let kind = if ft.is_dir() {
            "a directory"
        } else if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_char_device() || ft.is_block_device() {
            "a device"
        } else if ft.is_socket() {
            "a socket"
        } else {
            "not a file"
        };
        return Err(invalid(format!("not a regular file ({kind})")));
    }
    let info = inspect_elf(&file).map_err(invalid)?;
    let file_len = meta.len();
    let low_ram = ram_ranges(mem_size)[0].1;
    for seg in &info.segments {
        if seg
            .offset
            .checked_add(seg.filesz)
            .is_none_or(|e| e > file_len)
        {
            return Err(invalid(format!(
                "{seg} extends past the end of the file ({file_len:#x} bytes)"
            )));
        }
        if seg.paddr < HIGH_MEMORY_START {
            return Err(invalid(format!(
                "{seg} starts below 1 MiB, where the boot data lives"
            )));
        }
    }
    if info.load_end > low_ram {
        return Err(Error::FirmwareTooBig {
            path: path.to_path_buf(),
            need_mib: info.load_end.div_ceil(MIB),
            have_mib: mem_size / MIB,
        });
    }
    if info.elf_entry < HIGH_MEMORY_START {
        return Err(invalid(format!(
            "the ELF entry point {:#x} is below 1 MiB",
            info.elf_entry
        )));
    }
    let inside = |s: &Segment| (s.paddr..s.paddr + s.memsz.max(s.filesz)).contains(&info.entry);
    if !info.segments.iter().any(inside) {
        let where_ = if info.entry >= low_ram {
            format!("outside guest RAM (0..{low_ram:#x})")
        } else {
            "outside every loaded segment".into()
        };
        return Err(invalid(format!(
            "the PVH entry point {:#x} is {where_}",
            info.entry
        )));
    }
    Ok(Firmware {
        path: path.to_path_buf(),
        file,
        info,
    })
}

/// Scans ELF notes for Xen's PHYS32_ENTRY (type 18, name "Xen") and
/// returns its address (a 32-bit descriptor, or 64-bit).
fn pvh_entry(mut notes: &[u8]) -> Option<u64> {
    const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
    let word = le::u32_at;
    while let (Some(namesz), Some(descsz), Some(ty)) =
        (word(notes, 0), word(notes, 4), word(notes, 8))
    {
        let name_len = (namesz as usize).div_ceil(4) * 4;
        let desc_len = (descsz as usize).div_ceil(4) * 4;
        let name = notes.get(12..12 + namesz as usize);
        if ty == XEN_ELFNOTE_PHYS32_ENTRY && name == Some(b"Xen\0".as_slice()) {
            let desc = 12 + name_len;
            return match descsz {
                8 => le::u64_at(notes, desc),
                _ => le::u32_at(notes, desc).map(u64::from),
            };
        }
        match 12usize
            .checked_add(name_len)
            .and_then(|n| n.checked_add(desc_len))
            .and_then(|n| notes.get(n..))
        {
            Some(rest) if rest.len() < notes.len() => notes = rest,
            _ => return None,
        }
    }
    None
}

/// Loads the checked image into guest memory and writes `hvm_start_info`
/// and the ACPI tables describing `vcpus` CPUs; returns the 32-bit PVH
/// entry point.
pub fn load_firmware(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    fw: &Firmware,
    cmdline: &str,
    vcpus: u32,
) -> Result<GuestAddress> {
    let path = &fw.path;
    let invalid = |reason: String| Error::FirmwareInvalid {
        path: path.to_path_buf(),
        reason,
    };
    let mut file = fw.file.try_clone().map_err(|source| Error::FirmwareRead {
        path: path.to_path_buf(),
        source,
    })?;
    // `kernel_offset` must be None: linux-loader only reports the PVH entry
    // for images loaded at their own physical addresses. Every condition
    // it checks was checked by `open_firmware` with a precise message; its
    // own messages repeat their prefix, hence the cleanup.
    Elf::load(mem, None, &mut file, Some(GuestAddress(HIGH_MEMORY_START)))
        .map_err(|e| invalid(format!("{e}").replace("Kernel Loader: ", "")))?;
    let entry = GuestAddress(fw.info.entry);

    if cmdline.len() >= CMDLINE_MAX {
        return Err(Error::Load(format!(
            "--cmdline is {} bytes; at most {} fit",
            cmdline.len(),
            CMDLINE_MAX - 1
        )));
    }
    let mut cl = Cmdline::new(CMDLINE_MAX).map_err(|e| Error::Load(e.to_string()))?;
    if !cmdline.is_empty() {
        cl.insert_str(cmdline)
            .map_err(|e| Error::Load(format!("--cmdline: {e}")))?;
    }
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cl).map_err(|e| Error::Load(e.to_string()))?;

    let rsdp_paddr = crate::platform::write_acpi(mem, vcpus)?;
    let memmap = memory_map(mem_size);
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        rsdp_paddr,
        memmap_paddr: MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(START_INFO_ADDR));
    params.set_sections(&memmap, GuestAddress(MEMMAP_ADDR));
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(|e| Error::Load(e.to_string()))?;
    log::debug!(
        "firmware {} loaded, entry {:#x}, image ends at {:#x}",
        path.display(),
        entry.raw_value(),
        fw.info.load_end
    );
    Ok(entry)
}

/// The E820-style map handed to the guest: RAM below the VGA hole, the BIOS
/// area reserved, RAM from 1 MiB to the MMIO hole, then RAM above 4 GiB.
pub fn memory_map(mem_size: u64) -> Vec<hvm_memmap_table_entry> {
    let e = |addr: u64, size: u64, type_: u32| hvm_memmap_table_entry {
        addr,
        size,
        type_,
        reserved: 0,
    };
    let mut map = vec![
        e(0, LOW_RAM_END, E820_RAM),
        e(LOW_RAM_END, HIGH_MEMORY_START - LOW_RAM_END, E820_RESERVED),
    ];
    for (i, (addr, len)) in ram_ranges(mem_size).into_iter().enumerate() {
        if i == 0 {
            map.push(e(HIGH_MEMORY_START, len - HIGH_MEMORY_START, E820_RAM));
        } else {
            map.push(e(addr.raw_value(), len, E820_RAM));
        }
    }
    map
}

/// General registers for the PVH entry: EBX = start info, interrupts off.
pub fn entry_regs(entry: GuestAddress) -> kvm_regs {
    kvm_regs {
        rip: entry.raw_value(),
        rbx: START_INFO_ADDR,
        rflags: 0x2,
        ..Default::default()
    }
}

/// Flat 32-bit protected mode, paging off, as the PVH ABI specifies. The
/// hidden segment state is what counts: the firmware loads its own GDT
/// before it reloads any selector.
pub fn entry_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let seg = |selector: u16, type_: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.cs = seg(0x08, 0xb); // execute/read, accessed
    let data = seg(0x10, 0x3); // read/write, accessed
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.cr0 = 0x11; // PE | ET
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    sregs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_map_covers_ram_and_skips_the_hole() {
        let map = memory_map(4 << 30);
        let ram: u64 = map
            .iter()
            .filter(|e| e.type_ == E820_RAM)
            .map(|e| e.size)
            .sum();
        // All RAM but the 0x9fc00..1 MiB window is reported usable.
        assert_eq!(ram, (4 << 30) - (HIGH_MEMORY_START - LOW_RAM_END));
        assert!(map
            .iter()
            .all(|e| e.addr + e.size <= 3 << 30 || e.addr >= 4 << 30));
    }

    #[test]
    fn inspect_rejects_non_elf_and_reports_extent() {
        assert!(inspect_elf(&b"MZ\x90\x00"[..])
            .unwrap_err()
            .contains("not an ELF"));
        assert!(inspect_elf(&b"\x7fELF\x01\x01"[..])
            .unwrap_err()
            .contains("64-bit"));
        // A real host ELF: x86-64 with loadable segments but no PVH note.
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(inspect_elf(&exe[..])
            .unwrap_err()
            .contains("no PVH entry note"));
    }

    #[test]
    fn pvh_note_is_found_among_others() {
        let mut notes = Vec::new();
        // A GNU build-id note first, then Xen's entry note.
        notes.extend_from_slice(&4u32.to_le_bytes());
        notes.extend_from_slice(&3u32.to_le_bytes());
        notes.extend_from_slice(&3u32.to_le_bytes());
        notes.extend_from_slice(b"GNU\0abc\0");
        assert_eq!(pvh_entry(&notes), None);
        notes.extend_from_slice(&4u32.to_le_bytes());
        notes.extend_from_slice(&4u32.to_le_bytes());
        notes.extend_from_slice(&18u32.to_le_bytes());
        notes.extend_from_slice(b"Xen\0\0\0\x10\0");
        assert_eq!(pvh_entry(&notes), Some(0x10_0000));
        assert_eq!(pvh_entry(&notes[..30]), None);
        let mut huge = notes.clone();
        huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(pvh_entry(&huge), None);
    }

    #[test]
    fn truncated_headers_are_errors_not_panics() {
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        for len in [5, 20, 40, 63, 64, 100] {
            let _ = inspect_elf(&exe[..len]);
        }
        assert!(inspect_elf(&exe[..30]).is_err());
    }
}
