//! Where process data frames go when an address space lets go of them, and
//! an optional watch on that for tests: with a canary set, every data frame
//! freed by munmap or teardown is filled with it, recorded and held back
//! from the allocator, so a test can later prove that nothing (a GPU, say)
//! wrote to it after the unmap returned. Page-table pages are not watched.

use alloc::vec::Vec;

use faultline_driver::mm::{PAGE_SIZE, PMD_SIZE};
use x86_64::PhysAddr;

use crate::mm::{frames, DIRECT_MAP_BASE};
use crate::sync::IrqMutex;

struct Watch {
    canary: u64,
    /// Runs held back from the allocator: (address, 2 MiB run).
    held: Vec<(u64, bool)>,
    /// 4 KiB frames recorded since the last [`take`].
    recorded: Vec<u64>,
}

static WATCH: IrqMutex<Option<Watch>> = IrqMutex::new(None);

/// `Some(canary)`: start watching (frames freed from now on are filled,
/// recorded and held). `None`: stop and give every held frame back.
pub fn track(canary: Option<u64>) {
    let old = {
        let mut w = WATCH.lock();
        match (canary, w.as_mut()) {
            (Some(c), Some(w)) => {
                w.canary = c;
                return;
            }
            (Some(c), None) => {
                *w = Some(Watch {
                    canary: c,
                    held: Vec::new(),
                    recorded: Vec::new(),
                });
                return;
            }
            (None, _) => w.take(),
        }
    };
    for (pa, huge) in old.map(|w| w.held).unwrap_or_default() {
        release(pa, huge);
    }
}

/// The frames recorded since the last call (2 MiB runs as 512 entries).
pub fn take() -> Vec<u64> {
    WATCH
        .lock()
        .as_mut()
        .map(|w| core::mem::take(&mut w.recorded))
        .unwrap_or_default()
}

fn release(pa: u64, huge: bool) {
    if huge {
        frames::free_2m(PhysAddr::new(pa));
    } else {
        frames::free(PhysAddr::new(pa));
    }
}

/// `rep stosq`: one instruction for the whole run, which matters where
/// supervisor code is emulated instruction by instruction.
fn fill_u64(pa: u64, bytes: u64, v: u64) {
    let dst = (DIRECT_MAP_BASE + pa) as *mut u64;
    // SAFETY: a frame run that was just taken out of a process's page
    // tables and is not yet back in the allocator: nobody else uses it;
    // the direct map covers all RAM.
    unsafe {
        core::arch::asm!(
            "rep stosq",
            inout("rdi") dst => _,
            inout("rcx") bytes / 8 => _,
            in("rax") v,
            options(nostack)
        );
    }
}

/// Gives frames back with both locks taken once: many frames per
/// munmap or teardown, and a lock round trip costs more than a free under
/// PVM. Lock order: the watch, then the frame allocator.
pub struct Freer {
    watch: lock_api::MutexGuard<'static, crate::sync::RawIrqSpinlock, Option<Watch>>,
    frames: frames::Batch,
    /// 4 KiB data frames not yet given back: a physically consecutive run
    /// (start, frames), freed as one when the next frame does not extend it
    /// and when the `Freer` goes.
    run: (u64, u64),
}

impl Freer {
    pub fn new() -> Freer {
        let watch = WATCH.lock();
        Freer {
            watch,
            frames: frames::batch(),
            run: (0, 0),
        }
    }

    fn flush(&mut self) {
        let (start, n) = core::mem::take(&mut self.run);
        if n > 0 {
            self.frames.free_run(PhysAddr::new(start), n);
        }
    }

    /// A data frame (4 KiB) or run (2 MiB) that a process no longer maps
    /// (after the invalidation that unmapped it completed).
    /// A frame another PTE still maps (after a fork) only loses a
    /// reference.
    pub fn data(&mut self, pa: u64, huge: bool) {
        if super::fork::drop_ref(pa) {
            return;
        }
        if let Some(w) = self.watch.as_mut() {
            let bytes = if huge { PMD_SIZE } else { PAGE_SIZE };
            fill_u64(pa, bytes, w.canary);
            w.held.push((pa, huge));
            w.recorded
                .extend((0..bytes / PAGE_SIZE).map(|i| pa + i * PAGE_SIZE));
        } else if huge {
            self.frames.free_2m(PhysAddr::new(pa));
        } else if self.run.1 > 0 && pa == self.run.0 + self.run.1 * PAGE_SIZE {
            self.run.1 += 1;
        } else {
            self.flush();
            self.run = (pa, 1);
        }
    }

    /// A page-table page (never watched).
    pub fn table(&mut self, pa: u64) {
        self.frames.free(PhysAddr::new(pa));
    }
}

impl Drop for Freer {
    fn drop(&mut self) {
        self.flush();
    }
}
