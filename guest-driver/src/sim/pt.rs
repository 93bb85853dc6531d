//! The simulated page table: a 2 MiB-block map of either a 2 MiB leaf or a
//! table of 512 PTEs, and the operations that change translations.

use std::boxed::Box;
use std::collections::HashMap;
use std::vec::Vec;

use crate::mm::{DeviceOwner, PAGE_SHIFT, PAGE_SIZE, PMD_SHIFT, PMD_SIZE};

pub(super) const PTRS: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SimPte {
    None,
    Page {
        pfn: u64,
        writable: bool,
    },
    Zero,
    Special,
    DevicePrivate {
        owner: DeviceOwner,
        vram_pfn: u64,
        writable: bool,
    },
    Migration,
    /// Device-exclusive: frame `pfn` is held by `owner`'s device.
    Exclusive {
        owner: DeviceOwner,
        pfn: u64,
        writable: bool,
    },
}

pub(super) enum Pmd {
    Table(Box<[SimPte; PTRS]>),
    Huge {
        pfn: u64,
        writable: bool,
    },
    /// A 2 MiB device page (512 device pages from `vram_pfn`).
    DevicePrivate {
        owner: DeviceOwner,
        vram_pfn: u64,
        writable: bool,
    },
    /// A 2 MiB page under migration.
    Migration,
}

pub(super) fn pte_index(addr: u64) -> usize {
    ((addr >> PAGE_SHIFT) as usize) % PTRS
}

pub(super) fn table_mut(pt: &mut HashMap<u64, Pmd>, addr: u64) -> &mut [SimPte; PTRS] {
    let pmd = pt
        .entry(addr >> PMD_SHIFT)
        .or_insert_with(|| Pmd::Table(Box::new([SimPte::None; PTRS])));
    match pmd {
        Pmd::Table(t) => t,
        _ => panic!("sim: 4 KiB operation on a 2 MiB entry at {addr:#x}"),
    }
}

/// A device page a zap took out: owner, page, whether it is a 2 MiB one.
pub(super) type ZappedDev = (DeviceOwner, u64, bool);

/// Clear every translation in `[start, end)`; returns the frames to free,
/// and adds the device pages to free to `devs`. A 2 MiB entry that
/// overlaps goes whole.
pub(super) fn zap(
    pt: &mut HashMap<u64, Pmd>,
    start: u64,
    end: u64,
    devs: &mut Vec<ZappedDev>,
) -> Vec<u64> {
    let mut freed = Vec::new();
    let keys: Vec<u64> = pt
        .keys()
        .copied()
        .filter(|&k| {
            let (b, e) = (k << PMD_SHIFT, (k << PMD_SHIFT) + PMD_SIZE);
            b < end && start < e
        })
        .collect();
    for k in keys {
        let base = k << PMD_SHIFT;
        let remove = match pt.get_mut(&k).expect("key just listed") {
            Pmd::Huge { pfn, .. } => {
                freed.extend(*pfn..*pfn + PTRS as u64);
                true
            }
            Pmd::DevicePrivate {
                owner, vram_pfn, ..
            } => {
                devs.push((*owner, *vram_pfn, true));
                true
            }
            // The migration that holds it finds its entry gone and frees
            // what it held.
            Pmd::Migration => true,
            Pmd::Table(t) => {
                for (i, pte) in t.iter_mut().enumerate() {
                    let a = base + i as u64 * PAGE_SIZE;
                    if a < start || a >= end {
                        continue;
                    }
                    match *pte {
                        SimPte::Page { pfn, .. } | SimPte::Exclusive { pfn, .. } => freed.push(pfn),
                        SimPte::DevicePrivate {
                            owner, vram_pfn, ..
                        } => devs.push((owner, vram_pfn, false)),
                        _ => {}
                    }
                    *pte = SimPte::None;
                }
                t.iter().all(|p| *p == SimPte::None)
            }
        };
        if remove {
            pt.remove(&k);
        }
    }
    freed
}

/// Clears write permission on every translation in `[start, end)` (a whole
/// 2 MiB leaf if it overlaps).
pub(super) fn write_protect(pt: &mut HashMap<u64, Pmd>, start: u64, end: u64) {
    for (&k, pmd) in pt.iter_mut() {
        let base = k << PMD_SHIFT;
        match pmd {
            Pmd::Huge { writable, .. } | Pmd::DevicePrivate { writable, .. }
                if base < end && start < base + PMD_SIZE =>
            {
                *writable = false
            }
            Pmd::Huge { .. } | Pmd::DevicePrivate { .. } | Pmd::Migration => {}
            Pmd::Table(t) => {
                for (i, pte) in t.iter_mut().enumerate() {
                    let a = base + i as u64 * PAGE_SIZE;
                    if let SimPte::Page { writable, .. } | SimPte::DevicePrivate { writable, .. } =
                        pte
                    {
                        if start <= a && a < end {
                            *writable = false;
                        }
                    }
                }
            }
        }
    }
}

/// Turns every device-exclusive entry in `[start, end)` back into the
/// present PTE it stands for (an mprotect's change restores them, its own
/// invalidation revoking the device's hold).
pub(super) fn restore_exclusive(pt: &mut HashMap<u64, Pmd>, start: u64, end: u64) {
    for (&k, pmd) in pt.iter_mut() {
        let Pmd::Table(t) = pmd else { continue };
        let base = k << PMD_SHIFT;
        for (i, pte) in t.iter_mut().enumerate() {
            let a = base + i as u64 * PAGE_SIZE;
            if let (true, SimPte::Exclusive { pfn, writable, .. }) = (start <= a && a < end, *pte) {
                *pte = SimPte::Page { pfn, writable };
            }
        }
    }
}

/// Moves every translation of `[start, end)` to the same offset from `to`
/// (mremap): entries change place, frames and device pages stay with them.
/// The two ranges do not overlap; a 2 MiB entry (leaf, device page,
/// migration) moves whole (both ranges are then 2 MiB aligned).
pub(super) fn move_range(pt: &mut HashMap<u64, Pmd>, start: u64, end: u64, to: u64) {
    let mut a = start;
    while a < end {
        let k = a >> PMD_SHIFT;
        let block_end = (k + 1) << PMD_SHIFT;
        match pt.get_mut(&k) {
            None => {}
            Some(Pmd::Table(t)) => {
                let stop = end.min(block_end);
                let mut moving = Vec::new();
                for b in (a..stop).step_by(PAGE_SIZE as usize) {
                    let pte = core::mem::replace(&mut t[pte_index(b)], SimPte::None);
                    if pte != SimPte::None {
                        moving.push((b, pte));
                    }
                }
                if t.iter().all(|p| *p == SimPte::None) {
                    pt.remove(&k);
                }
                for (b, pte) in moving {
                    let dst = to + (b - start);
                    table_mut(pt, dst)[pte_index(dst)] = pte;
                }
            }
            // A 2 MiB leaf, device page or migration entry.
            Some(_) => {
                debug_assert!(a.is_multiple_of(PMD_SIZE) && to.is_multiple_of(PMD_SIZE));
                let leaf = pt.remove(&k).expect("just seen");
                pt.insert((to + (a - start)) >> PMD_SHIFT, leaf);
            }
        }
        a = block_end;
    }
}
