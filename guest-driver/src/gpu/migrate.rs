//! MIGRATE submission: page copies between system memory and VRAM by the
//! device's copy engine (docs/gpu-abi.md "Device memory (VRAM)"). The page
//! list lives in DMA memory the [`MigrateList`] owns and reuses; a batch
//! longer than one command takes (`MAX_MIGRATE_PAGES`) goes as several,
//! in order.

use alloc::sync::Arc;

use faultline_abi::{Command, MigrateEntry, PhysPage, MAX_MIGRATE_PAGES, PAGE_SIZE};

use super::{Channel, DmaRegion, GpuError, PageSize, Platform};

const LIST_BYTES: u64 = MAX_MIGRATE_PAGES as u64 * MigrateEntry::SIZE as u64;

/// A reusable MIGRATE page list. `&mut` in [`run`](Self::run): one batch
/// at a time owns the list until its commands completed.
pub struct MigrateList<P: Platform> {
    platform: Arc<P>,
    list: Option<DmaRegion>,
}

impl<P: Platform> MigrateList<P> {
    /// A list of `MAX_MIGRATE_PAGES` entries in DMA memory.
    pub fn new(platform: Arc<P>) -> Result<Self, GpuError> {
        let list = platform
            .dma_alloc(LIST_BYTES.div_ceil(PAGE_SIZE) as usize)
            .ok_or(GpuError::NoMemory)?;
        Ok(Self {
            platform,
            list: Some(list),
        })
    }

    /// Copy each `(src, dst)` page of `size` (4 KiB or 2 MiB) on `chan`,
    /// waiting for each command. Returns the pages copied; on a failure,
    /// the batches before the failing command were copied and the error is
    /// its status (`BadVram`, `BadList`, `Misaligned`, ...).
    pub fn run(
        &mut self,
        chan: &Channel<P>,
        pages: &[(PhysPage, PhysPage)],
        size: PageSize,
    ) -> Result<u64, GpuError> {
        let large = match size {
            PageSize::Size4K => false,
            PageSize::Size2M => true,
            PageSize::Size1G => {
                return Err(GpuError::Invalid("MIGRATE moves 4 KiB or 2 MiB pages"))
            }
        };
        let mut copied = 0;
        for batch in pages.chunks(MAX_MIGRATE_PAGES as usize) {
            let list = self.list.as_ref().ok_or(GpuError::NoMemory)?;
            for (i, &(src, dst)) in batch.iter().enumerate() {
                let e = MigrateEntry::new(src, dst);
                list.write_words(i * MigrateEntry::SIZE, &[e.src, e.dst]);
            }
            // MIGRATE never faults, and its callers may hold the mmap lock
            // and pages under migration: wait without servicing faults.
            let r = chan.run_quiet(&Command::Migrate {
                list: list.phys(),
                count: batch.len() as u32,
                large,
            });
            if let Err(GpuError::Timeout(_)) = r {
                // The command may still be queued and read the list later:
                // it is never given back to the platform (nor used again).
                self.list = None;
            }
            copied += r?;
        }
        Ok(copied)
    }
}

impl<P: Platform> Drop for MigrateList<P> {
    fn drop(&mut self) {
        if let Some(list) = self.list.take() {
            self.platform.dma_free(list);
        }
    }
}
