//! The fault pipeline's policies (docs/architecture.md "Fault pipeline
//! policies"): how the bottom half batches the fault buffer, when it rings
//! REPLAY, and how much the SVM layer maps around a fault. One per GPU
//! ([`GpuConfig::policy`](super::GpuConfig)); the guest command line's
//! `svm=` and the loopback's `FAULTLINE_LOOPBACK_SVM` are parsed here.
//!
//! Syntax: comma-separated items, each `key:value` or `key=value`:
//! `batch:N` (entries per batch, 1..=65536, clipped to the fault buffer),
//! `batches:N` (batches per service call before yielding, 1..=65536),
//! `replay=block|batch|batch_flush|once`,
//! `prefetch=fault_around|none|density:PCT` (PCT 0..=100),
//! `migrate=none|first_touch`. Items not given keep their default; an
//! empty string is the default policy.

use core::fmt;

use faultline_abi::MAX_FAULT_ENTRIES;

/// When the bottom half rings REPLAY.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    /// After each fault's servicing (each page of a batch).
    Block,
    /// After each batch.
    Batch,
    /// After each batch, preceded by a fault-buffer FLUSH (`CtlOp::FlushFaults`)
    /// that discards the entries still in the buffer: the replay makes
    /// their accesses fault again, so none is serviced twice.
    BatchFlush,
    /// Once the fault buffer is empty: after the last batch of a drain,
    /// however many service calls that takes.
    Once,
}

impl Replay {
    const ALL: [(Replay, &'static str); 4] = [
        (Replay::Block, "block"),
        (Replay::Batch, "batch"),
        (Replay::BatchFlush, "batch_flush"),
        (Replay::Once, "once"),
    ];

    /// Its command-line name.
    pub fn name(self) -> &'static str {
        name_in(&Self::ALL, self)
    }
}

/// `v`'s name in a policy item's table of (value, name).
fn name_in<T: PartialEq>(all: &[(T, &'static str)], v: T) -> &'static str {
    all.iter().find(|(x, _)| *x == v).map_or("", |x| x.1)
}

/// The value named `name` in a policy item's table of (value, name).
fn named<T: Copy>(all: &[(T, &'static str)], name: &str) -> Option<T> {
    all.iter().find(|(_, n)| *n == name).map(|x| x.0)
}

/// What the SVM layer maps for a fault, always clipped to the fault's VMA
/// (a 2 MiB-page VMA always maps the fault's 2 MiB leaf).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefetch {
    /// The aligned fault-around window of the context
    /// ([`SvmConfig::fault_around`](super::SvmConfig), 64 KiB by default).
    FaultAround,
    /// The faulting page only.
    None,
    /// Density over each 2 MiB region: the largest aligned subtree (1, 2, 4
    /// … 512 pages) around the fault whose faulted-or-resident pages are
    /// more than this percentage of it.
    Density(u8),
}

/// Where a GPU fault puts the pages of its window, on a context with
/// device memory attached ([`DeviceMemory::attach`](super::DeviceMemory)).
/// Without device memory both map system memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigratePolicy {
    /// Map the pages where they are: device pages with VRAM leaves, system
    /// pages with system leaves. Only explicit migrations move pages.
    None,
    /// Migrate on the device's touch (Xe's and amdgpu's fault-driven
    /// placement): a fault's window is first migrated to VRAM (its system
    /// pages, and its holes as zeroed VRAM pages), then mapped with VRAM
    /// leaves; a full VRAM evicts as for any migration. What cannot move
    /// (pages of shared or read-only VMAs, pages `migrate_vma` does not
    /// collect, pages that find VRAM full with nothing to evict) is mapped
    /// from system memory as under `None`.
    FirstTouch,
}

impl MigratePolicy {
    const ALL: [(MigratePolicy, &'static str); 2] = [
        (MigratePolicy::None, "none"),
        (MigratePolicy::FirstTouch, "first_touch"),
    ];

    /// Its command-line name.
    pub fn name(self) -> &'static str {
        name_in(&Self::ALL, self)
    }
}

/// The fault pipeline's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultPolicy {
    /// Entries drained per batch (clipped to the fault buffer's entries).
    pub batch: u32,
    /// Batches per service call before it returns to the waiter.
    pub batches: u32,
    /// When to ring REPLAY.
    pub replay: Replay,
    /// What to map around a fault.
    pub prefetch: Prefetch,
    /// Whether a fault migrates its window to device memory.
    pub migrate: MigratePolicy,
}

impl Default for FaultPolicy {
    /// Today's pipeline: the whole buffer in one batch, one batch per call,
    /// one replay per batch, 64 KiB fault-around, no migration.
    fn default() -> Self {
        FaultPolicy {
            batch: MAX_FAULT_ENTRIES,
            batches: 1,
            replay: Replay::Batch,
            prefetch: Prefetch::FaultAround,
            migrate: MigratePolicy::None,
        }
    }
}

/// A bad policy string: the item and what is wrong with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyError<'a> {
    /// The offending item as written.
    pub item: &'a str,
    /// What is wrong.
    pub why: &'static str,
}

impl fmt::Display for PolicyError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad svm policy item `{}`: {}", self.item, self.why)
    }
}

fn number(s: &str, max: u32) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u32>().ok().filter(|v| *v <= max)
}

impl FaultPolicy {
    /// Parses `s` (module docs) over the defaults.
    pub fn parse(s: &str) -> Result<FaultPolicy, PolicyError<'_>> {
        let mut p = FaultPolicy::default();
        for item in s.split(',').filter(|i| !i.is_empty()) {
            let err = |why| PolicyError { item, why };
            let Some(at) = item.find([':', '=']) else {
                return Err(err(
                    "expected key:value (batch, batches, replay, prefetch, migrate)",
                ));
            };
            let (key, value) = (&item[..at], &item[at + 1..]);
            match key {
                "batch" => {
                    p.batch = number(value, MAX_FAULT_ENTRIES)
                        .filter(|v| *v >= 1)
                        .ok_or(err("batch size must be 1..=65536"))?;
                }
                "batches" => {
                    p.batches = number(value, 65536)
                        .filter(|v| *v >= 1)
                        .ok_or(err("batches per call must be 1..=65536"))?;
                }
                "replay" => {
                    p.replay = named(&Replay::ALL, value)
                        .ok_or(err("replay is block, batch, batch_flush or once"))?;
                }
                "prefetch" => {
                    p.prefetch = match value {
                        "fault_around" => Prefetch::FaultAround,
                        "none" => Prefetch::None,
                        _ => match value.strip_prefix("density:") {
                            Some(pct) => Prefetch::Density(
                                number(pct, 100)
                                    .ok_or(err("density threshold must be 0..=100 (%)"))?
                                    as u8,
                            ),
                            None => {
                                return Err(err("prefetch is fault_around, none or density:PCT"))
                            }
                        },
                    };
                }
                "migrate" => {
                    p.migrate = named(&MigratePolicy::ALL, value)
                        .ok_or(err("migrate is none or first_touch"))?;
                }
                _ => {
                    return Err(err(
                        "unknown key (batch, batches, replay, prefetch, migrate)",
                    ))
                }
            }
        }
        Ok(p)
    }

    /// The batch size for a fault buffer of `entries`.
    pub fn batch_for(&self, entries: u32) -> u32 {
        self.batch.clamp(1, entries.max(1))
    }
}

impl fmt::Display for FaultPolicy {
    /// The canonical form, which [`FaultPolicy::parse`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "batch:{},batches:{},replay={},prefetch=",
            self.batch,
            self.batches,
            self.replay.name()
        )?;
        match self.prefetch {
            Prefetch::FaultAround => write!(f, "fault_around"),
            Prefetch::None => write!(f, "none"),
            Prefetch::Density(p) => write!(f, "density:{p}"),
        }?;
        write!(f, ",migrate={}", self.migrate.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;

    #[test]
    fn empty_is_the_default() {
        assert_eq!(FaultPolicy::parse(""), Ok(FaultPolicy::default()));
    }

    #[test]
    fn every_item_parses() {
        let p = FaultPolicy::parse(
            "batch:32,batches=4,replay=batch_flush,prefetch=density:51,migrate=first_touch",
        )
        .unwrap();
        assert_eq!(
            p,
            FaultPolicy {
                batch: 32,
                batches: 4,
                replay: Replay::BatchFlush,
                prefetch: Prefetch::Density(51),
                migrate: MigratePolicy::FirstTouch,
            }
        );
        for (m, n) in MigratePolicy::ALL {
            assert_eq!(
                FaultPolicy::parse(&format!("migrate:{n}")).unwrap().migrate,
                m
            );
        }
        for (r, n) in Replay::ALL {
            assert_eq!(
                FaultPolicy::parse(&format!("replay:{n}")).unwrap().replay,
                r
            );
        }
        assert_eq!(
            FaultPolicy::parse("prefetch=none").unwrap().prefetch,
            Prefetch::None
        );
        assert_eq!(
            FaultPolicy::parse("prefetch=fault_around,batch:1")
                .unwrap()
                .prefetch,
            Prefetch::FaultAround
        );
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "batch:1,batches:1,replay=block,prefetch=none,migrate=none",
            "batch:65536,batches:7,replay=once,prefetch=density:0,migrate=first_touch",
            "batch:256,batches:1,replay=batch,prefetch=fault_around,migrate=none",
        ] {
            let p = FaultPolicy::parse(s).unwrap();
            assert_eq!(format!("{p}"), s);
        }
    }

    #[test]
    fn bad_items_name_the_item_and_the_rule() {
        let cases = [
            ("batch:0", "batch:0", "batch size must be 1..=65536"),
            ("batch:65537", "batch:65537", "batch size must be 1..=65536"),
            ("batch:-1", "batch:-1", "batch size must be 1..=65536"),
            (
                "batches:0",
                "batches:0",
                "batches per call must be 1..=65536",
            ),
            (
                "replay=later",
                "replay=later",
                "replay is block, batch, batch_flush or once",
            ),
            (
                "prefetch=density:101",
                "prefetch=density:101",
                "density threshold must be 0..=100 (%)",
            ),
            (
                "prefetch=density",
                "prefetch=density",
                "prefetch is fault_around, none or density:PCT",
            ),
            (
                "migrate=always",
                "migrate=always",
                "migrate is none or first_touch",
            ),
            (
                "batch:8,size:3",
                "size:3",
                "unknown key (batch, batches, replay, prefetch, migrate)",
            ),
            (
                "batch",
                "batch",
                "expected key:value (batch, batches, replay, prefetch, migrate)",
            ),
        ];
        for (s, item, why) in cases {
            assert_eq!(FaultPolicy::parse(s), Err(PolicyError { item, why }), "{s}");
        }
        assert_eq!(
            format!("{}", FaultPolicy::parse("replay=x").unwrap_err()),
            "bad svm policy item `replay=x`: replay is block, batch, batch_flush or once"
        );
    }

    #[test]
    fn batch_is_clipped_to_the_buffer() {
        let p = FaultPolicy::default();
        assert_eq!(p.batch_for(256), 256);
        let p = FaultPolicy::parse("batch:8").unwrap();
        assert_eq!((p.batch_for(256), p.batch_for(4)), (8, 4));
    }
}
