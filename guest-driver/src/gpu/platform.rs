//! The machine interface of the GPU driver.

use core::ptr::NonNull;

/// What the driver needs from the machine it runs on.
///
/// Ordering rules an implementation must keep:
/// * `write32` is a posted MMIO write that is ordered after every earlier
///   store to DMA memory (x86 UC/WC writes are; a loopback must not reorder).
/// * `take_interrupts` returns each raised vector at least once after it was
///   raised: a vector raised while the driver is handling the previous batch
///   shows up in the next call, never lost.
pub trait Platform: Send + Sync + 'static {
    /// Reads the 32-bit BAR0 register at `offset` (see `faultline_abi::regs`).
    fn read32(&self, offset: u64) -> u32;

    /// Writes the 32-bit BAR0 register at `offset`. Doorbells are writes too.
    fn write32(&self, offset: u64, value: u32);

    /// Allocates `pages` zeroed, physically contiguous 4 KiB pages the device
    /// may read and write, or `None` when memory is exhausted.
    fn dma_alloc(&self, pages: usize) -> Option<DmaRegion>;

    /// Returns a region from [`Platform::dma_alloc`]. The caller guarantees
    /// the device no longer accesses it (the owning queue or context is
    /// disabled, or the device was reset).
    fn dma_free(&self, region: DmaRegion);

    /// Bitmask of MSI vectors (bit `faultline_abi::vector::*`) raised since the
    /// previous call; clears what it returns.
    fn take_interrupts(&self) -> u32;

    /// Sleeps until an interrupt may have been raised or `timeout_ns` passed.
    /// Returns at once if a vector is pending (raised and not yet taken by
    /// `take_interrupts`). May return early (spurious wake-ups are allowed);
    /// callers re-check.
    fn wait_interrupt(&self, timeout_ns: u64);

    /// A monotonic clock in nanoseconds.
    fn now_ns(&self) -> u64;

    /// A monotonic tick counter for the driver's latency statistics
    /// (`gpu::stats`), read at both ends of every timed step, so it should
    /// be the cheapest clock there is (the TSC); the ticks become ns only
    /// when the statistics are read ([`Platform::stats_ticks_to_ns`]). The
    /// default is [`Platform::now_ns`].
    fn stats_ticks(&self) -> u64 {
        self.now_ns()
    }

    /// `ticks` of [`Platform::stats_ticks`] in ns (the default: they are
    /// ns already), on the same scale and epoch as [`Platform::now_ns`].
    fn stats_ticks_to_ns(&self, ticks: u64) -> u64 {
        ticks
    }

    /// The CPU's time-stamp counter (`rdtsc`), for the events the driver
    /// adds to the host's fault timeline (docs/gpu-abi.md "Trace ring"):
    /// read once per event, and only while the host traces. `None` (the
    /// default): the driver writes no trace.
    fn trace_tsc(&self) -> Option<u64> {
        None
    }
}

/// Physically contiguous memory shared with the device.
///
/// `phys` is the address the device uses (a guest-physical address: the
/// device has no IOMMU); `virt` is where the driver reaches the same bytes.
/// The device writes it concurrently, so every access is volatile.
#[derive(Debug)]
pub struct DmaRegion {
    phys: u64,
    virt: NonNull<u8>,
    len: usize,
}

// SAFETY: the region is plain memory owned by whoever holds the DmaRegion;
// all accesses go through volatile reads/writes of naturally aligned words,
// which are sound from any thread (the device writes it concurrently anyway).
unsafe impl Send for DmaRegion {}
// SAFETY: as above; `&DmaRegion` only allows volatile word accesses.
unsafe impl Sync for DmaRegion {}

impl DmaRegion {
    /// Wraps memory a [`Platform`] allocated.
    ///
    /// # Safety
    /// `virt..virt+len` must be valid for reads and writes for as long as the
    /// region lives, 4 KiB aligned, and reach the same bytes the device sees
    /// at `phys..phys+len`.
    pub unsafe fn new(phys: u64, virt: NonNull<u8>, len: usize) -> Self {
        DmaRegion { phys, virt, len }
    }

    /// The device-visible address of byte 0.
    pub fn phys(&self) -> u64 {
        self.phys
    }

    /// The driver-visible address of byte 0.
    pub fn virt(&self) -> NonNull<u8> {
        self.virt
    }

    /// Length in bytes (a multiple of 4 KiB).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: regions are at least one page.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn ptr<T>(&self, offset: usize) -> *mut T {
        let size = core::mem::size_of::<T>();
        assert!(
            offset.is_multiple_of(size) && offset + size <= self.len,
            "DMA access at {offset:#x} (+{size}) outside a {:#x}-byte region",
            self.len
        );
        // SAFETY: in bounds by the assert; alignment follows from the page
        // aligned base and the offset check.
        unsafe { self.virt.as_ptr().add(offset).cast() }
    }

    /// Volatile 16-bit read at `offset`.
    pub fn read_u16(&self, offset: usize) -> u16 {
        // SAFETY: `ptr` checks bounds and alignment; the memory is valid per `new`.
        unsafe { self.ptr::<u16>(offset).read_volatile() }
    }

    /// Volatile 16-bit write at `offset`.
    pub fn write_u16(&self, offset: usize, value: u16) {
        // SAFETY: as in `read_u16`.
        unsafe { self.ptr::<u16>(offset).write_volatile(value) }
    }

    /// Volatile 32-bit read at `offset`.
    pub fn read_u32(&self, offset: usize) -> u32 {
        // SAFETY: `ptr` checks bounds and alignment; the memory is valid per `new`.
        unsafe { self.ptr::<u32>(offset).read_volatile() }
    }

    /// Volatile 32-bit write at `offset`.
    pub fn write_u32(&self, offset: usize, value: u32) {
        // SAFETY: as in `read_u32`.
        unsafe { self.ptr::<u32>(offset).write_volatile(value) }
    }

    /// Volatile 64-bit read at `offset`.
    pub fn read_u64(&self, offset: usize) -> u64 {
        // SAFETY: as in `read_u32`.
        unsafe { self.ptr::<u64>(offset).read_volatile() }
    }

    /// Volatile 64-bit write at `offset`.
    pub fn write_u64(&self, offset: usize, value: u64) {
        // SAFETY: as in `read_u32`.
        unsafe { self.ptr::<u64>(offset).write_volatile(value) }
    }

    /// Volatile copy of the `N` bytes of a device structure at `offset`
    /// (`faultline_abi`'s `from_le_bytes` decodes it), in the widest
    /// naturally aligned words `offset` and `N` allow.
    pub fn read_array<const N: usize>(&self, offset: usize) -> [u8; N] {
        let mut out = [0u8; N];
        match (offset | N) % 8 {
            0 => {
                let p = self.span::<u64>(offset, N);
                for (i, c) in out.chunks_exact_mut(8).enumerate() {
                    // SAFETY: `span` checked that all `N / 8` words are in
                    // bounds and aligned; the memory is valid per `new`.
                    c.copy_from_slice(&unsafe { p.add(i).read_volatile() }.to_ne_bytes());
                }
            }
            4 => {
                let p = self.span::<u32>(offset, N);
                for (i, c) in out.chunks_exact_mut(4).enumerate() {
                    // SAFETY: as above, for `N / 4` words.
                    c.copy_from_slice(&unsafe { p.add(i).read_volatile() }.to_ne_bytes());
                }
            }
            _ => self.read_bytes(offset, &mut out),
        }
        out
    }

    /// Volatile store of a device structure's encoding (`to_le_bytes`) at
    /// `offset`, in words as [`DmaRegion::read_array`].
    pub fn write_array<const N: usize>(&self, offset: usize, bytes: &[u8; N]) {
        match (offset | N) % 8 {
            0 => {
                let p = self.span::<u64>(offset, N);
                for (i, c) in bytes.chunks_exact(8).enumerate() {
                    let w = u64::from_ne_bytes(c.try_into().unwrap_or([0; 8]));
                    // SAFETY: `span` checked bounds and alignment.
                    unsafe { p.add(i).write_volatile(w) }
                }
            }
            4 => {
                let p = self.span::<u32>(offset, N);
                for (i, c) in bytes.chunks_exact(4).enumerate() {
                    let w = u32::from_ne_bytes(c.try_into().unwrap_or([0; 4]));
                    // SAFETY: `span` checked bounds and alignment.
                    unsafe { p.add(i).write_volatile(w) }
                }
            }
            _ => self.write_bytes(offset, bytes),
        }
    }

    /// The `T`-aligned start of `bytes` bytes at `offset`, all in bounds:
    /// one check for a whole structure.
    fn span<T>(&self, offset: usize, bytes: usize) -> *mut T {
        assert!(
            offset.is_multiple_of(core::mem::size_of::<T>())
                && offset.checked_add(bytes).is_some_and(|end| end <= self.len),
            "DMA access at {offset:#x} (+{bytes}) outside a {:#x}-byte region",
            self.len
        );
        // SAFETY: in bounds by the assert; alignment follows from the page
        // aligned base and the offset check.
        unsafe { self.virt.as_ptr().add(offset).cast() }
    }

    /// Volatile stores of consecutive 64-bit words from `offset` (a
    /// command's `encode()`).
    pub fn write_words(&self, offset: usize, words: &[u64]) {
        for (i, w) in words.iter().enumerate() {
            self.write_u64(offset + 8 * i, *w);
        }
    }

    /// Copies `len(out)` bytes at `offset` into `out` with volatile reads.
    pub fn read_bytes(&self, offset: usize, out: &mut [u8]) {
        assert!(offset + out.len() <= self.len, "DMA read out of bounds");
        for (i, b) in out.iter_mut().enumerate() {
            // SAFETY: in bounds by the assert above.
            *b = unsafe { self.virt.as_ptr().add(offset + i).read_volatile() }
        }
    }

    /// Copies `bytes` to `offset` with volatile byte writes.
    pub fn write_bytes(&self, offset: usize, bytes: &[u8]) {
        assert!(offset + bytes.len() <= self.len, "DMA write out of bounds");
        for (i, b) in bytes.iter().enumerate() {
            // SAFETY: in bounds by the assert above.
            unsafe { self.virt.as_ptr().add(offset + i).write_volatile(*b) }
        }
    }
}
