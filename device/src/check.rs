//! The SVM coherence checker (a test facility, not hardware;
//! docs/gpu-abi.md "Coherence checker"). Whenever the device uses a
//! translation of GPU VA `v` to frame `f` for an access, the CPU page table
//! of the mirrored process (the context entry's `cpu_root`) must map `v` to
//! `f` with at least that access. A correct driver keeps this true at every
//! instant; a stale device TLB entry or a device PTE the CPU never granted
//! breaks it, and the checker says where.

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use faultline_abi::{
    engine, Access, ContextEntry, Counter, CpuDevicePrivate, CpuExclusive, CpuPagingMode, CpuRoot,
    LEAF_2M, PAGE_SIZE,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::counters::Counters;
use crate::vram::Phys;

/// What the checker does (`--gpu-check`, `Config::check`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CheckMode {
    /// No checking; the translation path pays one branch.
    #[default]
    Off,
    /// Count and report violations; the access proceeds.
    Warn,
    /// Count and report; the access fails the command with
    /// `Status::CoherenceViolation`.
    Fatal,
}

impl CheckMode {
    pub fn name(self) -> &'static str {
        match self {
            CheckMode::Off => "off",
            CheckMode::Warn => "warn",
            CheckMode::Fatal => "fatal",
        }
    }

    /// The value of the `check.mode` counter: 0 off, 1 warn, 2 fatal.
    pub fn code(self) -> u64 {
        self as u64
    }
}

impl fmt::Display for CheckMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a checker mode (warn, fatal or off)")]
pub struct BadCheckMode(pub String);

impl FromStr for CheckMode {
    type Err = BadCheckMode;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(CheckMode::Off),
            "warn" => Ok(CheckMode::Warn),
            "fatal" => Ok(CheckMode::Fatal),
            _ => Err(BadCheckMode(s.to_string())),
        }
    }
}

/// What a CPU page table says about one 4 KiB page (for the loopback's simulated mm).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuLookup {
    /// `frame`: the 4 KiB frame holding the page (inside a large leaf, the
    /// leaf's base plus the page's offset); `writable` and `user` are the
    /// effective RW and US (the AND over all levels); `pte` the raw leaf.
    Mapped {
        frame: u64,
        writable: bool,
        user: bool,
        pte: u64,
    },
    /// A device-private entry ([`CpuDevicePrivate`]): the page lives in
    /// VRAM at offset `vram` (4 KiB aligned), the device may write it when
    /// `writable`; `pte` the raw leaf.
    DevicePrivate { vram: u64, writable: bool, pte: u64 },
    /// Not present, or a table the walk could not follow (unreadable, a
    /// reserved bit, a misaligned large leaf): `pte` is the raw entry where
    /// it stopped (0 when the root itself was unreadable).
    NotMapped { pte: u64 },
}

/// A source of CPU page-table lookups. `None` in `Device::set_checker`
/// means the built-in x86-64 walker over the device's own guest memory.
pub trait CpuTables: Send + Sync {
    fn lookup(&self, root: CpuRoot, va: u64) -> CpuLookup;
}

/// The built-in walker as a `CpuTables` over a memory of its own (for a
/// host whose CPU tables live in another memory than the device's DMA).
pub struct X86Tables<M>(pub M);

impl<M: GuestMemoryBackend + Send + Sync> CpuTables for X86Tables<M> {
    fn lookup(&self, root: CpuRoot, va: u64) -> CpuLookup {
        x86_64_lookup(&self.0, root, va)
    }
}

/// x86-64 paging-structure bits the walker uses.
const P: u64 = 1;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const PS: u64 = 1 << 7;
/// Physical address bits 12..51 of an entry.
const ADDR: u64 = 0x000f_ffff_ffff_f000;

fn load_u64<M: GuestMemoryBackend>(mem: &M, gpa: u64) -> Option<u64> {
    // Aligned atomic loads, as the device's own walker: the CPU may rewrite
    // entries while the device reads them.
    if !gpa.is_multiple_of(8) {
        return None;
    }
    mem.get_slice(GuestAddress(gpa), 8)
        .ok()?
        .load::<u64>(0, Ordering::Acquire)
        .ok()
        .map(u64::from_le)
}

/// Walk an x86-64 4-level table rooted at `root.root()` for the 4 KiB page
/// of `va` (bits 0..47 used). Four reads at most, whatever the tables hold,
/// so loops and tables outside RAM end the walk instead of hanging it. A
/// non-present 4 KiB leaf in the [`CpuDevicePrivate`] encoding is a
/// device-private page, and so is a non-present PDE in that encoding with
/// PS set (a 2 MiB device page, 2 MiB aligned in VRAM). A non-present
/// 4 KiB leaf in the [`CpuExclusive`] encoding maps its frame: the only
/// device given a translation of it is the one holding it.
pub fn x86_64_lookup<M: GuestMemoryBackend>(mem: &M, root: CpuRoot, va: u64) -> CpuLookup {
    let mut table = root.root();
    let mut parent = 0;
    let (mut writable, mut user) = (true, true);
    for level in (1..=4u32).rev() {
        let shift = 12 + 9 * (level - 1);
        let idx = (va >> shift) & 511;
        let Some(pte) = load_u64(mem, table + idx * 8) else {
            return CpuLookup::NotMapped { pte: parent };
        };
        if pte & P == 0 {
            // The frame a device-exclusive entry keeps is its holder's to
            // use, as mapped.
            if let (1, Some(x)) = (level, CpuExclusive::decode(pte)) {
                return CpuLookup::Mapped {
                    frame: x.frame,
                    writable: writable && x.writable,
                    user: user && pte & US != 0,
                    pte,
                };
            }
            return match CpuDevicePrivate::decode(pte) {
                Some(d) if level == 1 => CpuLookup::DevicePrivate {
                    vram: d.vram,
                    writable: d.writable,
                    pte,
                },
                // A 2 MiB device page: the 4 KiB page of `va` in it.
                Some(d) if level == 2 && pte & PS != 0 && d.vram % LEAF_2M == 0 => {
                    CpuLookup::DevicePrivate {
                        vram: d.vram + (va & (LEAF_2M - 1) & !(PAGE_SIZE - 1)),
                        writable: d.writable,
                        pte,
                    }
                }
                _ => CpuLookup::NotMapped { pte },
            };
        }
        writable &= pte & RW != 0;
        user &= pte & US != 0;
        let large = level > 1 && pte & PS != 0;
        if large && level == 4 {
            // PS is reserved in a PML4 entry.
            return CpuLookup::NotMapped { pte };
        }
        if level == 1 || large {
            let size = 1u64 << shift;
            // Bit 12 of a large leaf is PAT; the bits between it and the
            // leaf size are reserved.
            let base = if large {
                pte & ADDR & !0x1000
            } else {
                pte & ADDR
            };
            if base & (size - 1) != 0 {
                return CpuLookup::NotMapped { pte };
            }
            return CpuLookup::Mapped {
                frame: base + (va & (size - 1) & !(PAGE_SIZE - 1)),
                writable,
                user,
                pte,
            };
        }
        parent = pte;
        table = pte & ADDR;
    }
    // Level 1 always returns above; a hostile-input path must not panic.
    CpuLookup::NotMapped { pte: parent }
}

/// What the device was doing when it used a translation, for the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// `faultline_abi::engine` code (1 FILL .. 5 COMPUTE), 0 for the host
    /// calling `Mmu::translate` directly.
    pub engine: u8,
    pub channel: u8,
    /// COMPUTE: the warp index.
    pub info: u32,
}

impl Origin {
    pub const HOST: Origin = Origin {
        engine: 0,
        channel: 0,
        info: 0,
    };

    /// The command the engine runs.
    fn command(self) -> &'static str {
        match self.engine {
            engine::FILL => "FILL",
            engine::COPY => "COPY",
            engine::ATOMIC => "ATOMIC",
            engine::SEMAPHORE => "SEMAPHORE_RELEASE",
            engine::COMPUTE => "LAUNCH",
            _ => "host",
        }
    }
}

/// Why a translation broke the rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViolationKind {
    /// The CPU does not map the page.
    NotMapped,
    /// The CPU maps it to system frame `cpu_frame`, and the device used
    /// another frame or a VRAM page.
    FrameMismatch { cpu_frame: u64 },
    /// The CPU's entry is device-private, naming VRAM page `cpu_vram`, and
    /// the device used a system frame or another VRAM page.
    DevicePrivate { cpu_vram: u64 },
    /// A write or atomic where the CPU allows reads only.
    ReadOnly,
    /// The CPU maps it for the kernel only (US clear somewhere on the walk).
    Supervisor,
    /// `cpu_root` names a paging mode the checker does not know (or the
    /// context entry could not be read).
    BadCpuRoot { cpu_root: u32 },
}

/// One violation, reported once per (context, 4 KiB page).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Violation {
    pub ctx: u32,
    /// The accessed VA.
    pub va: u64,
    pub access: Access,
    /// The frame the device's translation gave: a guest-physical address,
    /// or with `device_vram` a VRAM offset.
    pub device_frame: u64,
    pub device_vram: bool,
    /// The CPU's entry where its walk ended (0 if none was read).
    pub cpu_pte: u64,
    pub kind: ViolationKind,
    pub origin: Origin,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let why = match self.kind {
            ViolationKind::NotMapped => "the CPU does not map it".to_string(),
            ViolationKind::FrameMismatch { cpu_frame } => {
                format!("the CPU maps it to frame {cpu_frame:#x}")
            }
            ViolationKind::DevicePrivate { cpu_vram } => {
                format!("the CPU's entry is device-private, VRAM page {cpu_vram:#x}")
            }
            ViolationKind::ReadOnly => "the CPU maps it read-only".to_string(),
            ViolationKind::Supervisor => "the CPU maps it supervisor-only".to_string(),
            ViolationKind::BadCpuRoot { cpu_root } => {
                format!("cpu_root {cpu_root:#x} names no known paging mode")
            }
        };
        write!(
            f,
            "GPU coherence violation: context {} VA {:#x} {:?} through {} {:#x}, but {} \
             (CPU PTE {:#x}); {} on channel {}",
            self.ctx,
            self.va,
            self.access,
            if self.device_vram {
                "VRAM page"
            } else {
                "device frame"
            },
            self.device_frame,
            why,
            self.cpu_pte,
            self.origin.command(),
            self.origin.channel,
        )?;
        if self.origin.engine == engine::COMPUTE {
            write!(f, " warp {}", self.origin.info)?;
        }
        f.write_str(
            "; later violations on this page are counted (coherence_violations), not logged",
        )
    }
}

/// Distinct (context, page) pairs reported in the device's life; beyond
/// that violations are only counted (`check.unreported`).
pub const REPORT_PAGES: usize = 4096;

/// The checker's host-only figures (`check.*` in `Counters::named`),
/// lifetime totals: RESET does not clear them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckFigures {
    pub mode: CheckMode,
    /// Translations compared against a CPU table.
    pub checked: u64,
    /// Translations of contexts without a CPU table (`cpu_root` mode 0).
    pub unchecked: u64,
    /// Violations on pages already reported, or beyond `REPORT_PAGES`.
    pub unreported: u64,
}

/// The checker's state, held by the MMU while a mode other than `Off` is
/// set.
pub(crate) struct Checker {
    fatal: bool,
    tables: Option<Arc<dyn CpuTables>>,
    reported: HashSet<(u32, u64)>,
    /// Reports waiting for the host (`Device::take_coherence_reports`);
    /// bounded by `REPORT_PAGES` since each is a new page.
    pending: Vec<Violation>,
}

impl Checker {
    pub(crate) fn new(mode: CheckMode, tables: Option<Arc<dyn CpuTables>>) -> Option<Box<Self>> {
        (mode != CheckMode::Off).then(|| {
            Box::new(Self {
                fatal: mode == CheckMode::Fatal,
                tables,
                reported: HashSet::new(),
                pending: Vec::new(),
            })
        })
    }

    pub(crate) fn take_reports(&mut self) -> Vec<Violation> {
        std::mem::take(&mut self.pending)
    }

    /// Check one translation the device is about to use. `Err(())` means
    /// a violation under `Fatal`: the access must not happen.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn check<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        counters: &mut Counters,
        ctx_table: u64,
        ctx: u32,
        va: u64,
        access: Access,
        target: Phys,
        origin: Origin,
    ) -> Result<(), ()> {
        let device_frame = target.addr & !(PAGE_SIZE - 1);
        let at = ctx_table.checked_add(
            u64::from(ctx) * ContextEntry::SIZE as u64 + ContextEntry::CPU_ROOT_OFFSET as u64,
        );
        let word = at.and_then(|a| {
            mem.get_slice(GuestAddress(a), 4)
                .ok()?
                .load::<u32>(0, Ordering::Acquire)
                .ok()
                .map(u32::from_le)
        });
        let root = CpuRoot(word.unwrap_or(u32::MAX));
        let lookup = match (word, root.mode()) {
            (Some(_), Some(CpuPagingMode::None)) => {
                counters.check.unchecked += 1;
                return Ok(());
            }
            (Some(_), Some(CpuPagingMode::X86_64Level4)) => Some(match &self.tables {
                Some(t) => t.lookup(root, va),
                None => x86_64_lookup(mem, root, va),
            }),
            _ => None,
        };
        counters.check.checked += 1;
        let (kind, cpu_pte) = match lookup {
            None => (ViolationKind::BadCpuRoot { cpu_root: root.0 }, 0),
            Some(CpuLookup::NotMapped { pte }) => (ViolationKind::NotMapped, pte),
            Some(CpuLookup::DevicePrivate {
                vram,
                writable,
                pte,
            }) => {
                let kind = if !target.vram || vram != device_frame {
                    ViolationKind::DevicePrivate { cpu_vram: vram }
                } else if access != Access::Read && !writable {
                    ViolationKind::ReadOnly
                } else {
                    return Ok(());
                };
                (kind, pte)
            }
            Some(CpuLookup::Mapped {
                frame,
                writable,
                user,
                pte,
            }) => {
                let kind = if target.vram || frame != device_frame {
                    ViolationKind::FrameMismatch { cpu_frame: frame }
                } else if !user {
                    ViolationKind::Supervisor
                } else if access != Access::Read && !writable {
                    ViolationKind::ReadOnly
                } else {
                    return Ok(());
                };
                (kind, pte)
            }
        };
        counters.inc(Counter::CoherenceViolations);
        let page = va & !(PAGE_SIZE - 1);
        if self.reported.len() < REPORT_PAGES && self.reported.insert((ctx, page)) {
            self.pending.push(Violation {
                ctx,
                va,
                access,
                device_frame,
                device_vram: target.vram,
                cpu_pte,
                kind,
                origin,
            });
        } else {
            counters.check.unreported += 1;
        }
        if self.fatal {
            Err(())
        } else {
            Ok(())
        }
    }
}
