//! GPU contexts: a device page table bound to a context slot.

use alloc::sync::Arc;

use faultline_abi::CpuRoot;

use super::device::FaultHandler;
use super::pagetable::PageTable;
use super::{Gpu, GpuError, Platform};
use crate::sync::{SpinGuard, SpinMutex};

/// A GPU address space: a context-table slot whose root is `page_table`.
///
/// The page-table lock is the driver's *update lock*: whoever changes
/// leaves holds it, and invalidates the TLB (through [`Context::invalidate`])
/// before relying on a downgrade or removal. Dropping the context marks the
/// slot invalid, cancels its stalled work, invalidates its TLB and then frees
/// the page tables.
pub struct Context<P: Platform> {
    gpu: Arc<Gpu<P>>,
    index: u32,
    pt: SpinMutex<PageTable<P>>,
}

impl<P: Platform> Context<P> {
    /// Binds `pt` to a free context slot (and invalidates the slot's TLB).
    /// No CPU page table is named, so the coherence checker skips it.
    pub fn new(gpu: &Arc<Gpu<P>>, pt: PageTable<P>) -> Result<Self, GpuError> {
        Self::mirroring(gpu, pt, CpuRoot::NONE)
    }

    /// Like [`Context::new`] for a context that mirrors the process whose
    /// CPU page table is `cpu_root`: the device's coherence checker holds
    /// every translation it uses to that table.
    pub fn mirroring(
        gpu: &Arc<Gpu<P>>,
        pt: PageTable<P>,
        cpu_root: CpuRoot,
    ) -> Result<Self, GpuError> {
        let index = gpu.alloc_context(pt.root(), cpu_root)?;
        Ok(Context {
            gpu: gpu.clone(),
            index,
            pt: SpinMutex::new(pt),
        })
    }

    /// The context-table index (what channels and fault entries name).
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The device this context lives on.
    pub fn gpu(&self) -> &Arc<Gpu<P>> {
        &self.gpu
    }

    /// Locks the page table (the update lock).
    pub fn page_table(&self) -> SpinGuard<'_, PageTable<P>> {
        self.pt.lock()
    }

    /// Locks the page table if nobody holds it.
    pub fn page_table_try(&self) -> Option<SpinGuard<'_, PageTable<P>>> {
        self.pt.try_lock()
    }

    /// Drops the device TLB entries for `[start, start + len)` and waits for
    /// the device's acknowledgement.
    pub fn invalidate(&self, start: u64, len: u64) -> Result<(), GpuError> {
        self.gpu.invalidate_range(self.index, start, len)
    }

    /// Routes this context's faults to `handler` (`None`: cancel them all).
    pub fn set_fault_handler(&self, handler: Option<Arc<dyn FaultHandler>>) {
        self.gpu.set_handler(self.index, handler);
    }
}

impl<P: Platform> Drop for Context<P> {
    fn drop(&mut self) {
        // The slot goes first so the device stops walking the tables
        // before `pt` frees them.
        self.gpu.free_context(self.index);
    }
}
