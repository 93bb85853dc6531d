//! The device's own memory (VRAM) and the one way engines reach memory:
//! a physical location is a guest-physical address or, with the VRAM
//! aperture, an offset in VRAM (docs/gpu-abi.md "Device memory").
//!
//! VRAM is host memory the device owns, never part of guest RAM: one
//! anonymous private mapping with `MAP_NORESERVE`, so its size costs
//! address space only until pages are touched. Every access is
//! bounds-checked against it; an address outside is `Status::BadVram`,
//! never a host access.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use faultline_abi::{atomic_op, Status, LEAF_2M};
use vm_memory::bitmap::{BitmapSlice, MS};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, MmapRegion, VolatileMemory, VolatileSlice,
};

/// Default VRAM (`--gpu-vram`).
pub const DEFAULT_VRAM: u64 = 256 << 20;
/// Largest VRAM a host may ask for: address space only, until touched.
pub const MAX_VRAM: u64 = 64 << 30;
/// VRAM sizes are whole 2 MiB chunks (the large-page size).
pub const VRAM_CHUNK: u64 = LEAF_2M;

/// The device memory: its mapping (`None` for size 0) and which 2 MiB
/// chunks were written, so hosts can say what it cost.
pub struct Vram {
    map: Option<MmapRegion>,
    size: u64,
    /// A bit per chunk, set on the first write into it.
    touched: Box<[AtomicU64]>,
}

impl std::fmt::Debug for Vram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vram")
            .field("size", &self.size)
            .field("touched", &self.touched_bytes())
            .finish()
    }
}

impl Default for Vram {
    fn default() -> Self {
        Self::none()
    }
}

impl Vram {
    /// No device memory.
    pub fn none() -> Self {
        Self {
            map: None,
            size: 0,
            touched: Box::new([]),
        }
    }

    /// `size` bytes (a multiple of `VRAM_CHUNK`, at most `MAX_VRAM`, checked
    /// by `Config::validate`), reserved but not committed.
    pub fn new(size: u64) -> Result<Self, String> {
        if size == 0 {
            return Ok(Self::none());
        }
        let len = usize::try_from(size).map_err(|e| e.to_string())?;
        let map = MmapRegion::new(len).map_err(|e| e.to_string())?;
        let chunks = size.div_ceil(VRAM_CHUNK).div_ceil(64) as usize;
        Ok(Self {
            map: Some(map),
            size,
            touched: (0..chunks).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes of the 2 MiB chunks written at least once (what the mapping
    /// may have committed, at chunk granularity).
    pub fn touched_bytes(&self) -> u64 {
        let chunks: u32 = self
            .touched
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones())
            .sum();
        u64::from(chunks) * VRAM_CHUNK
    }

    /// Whether `[off, off + len)` lies inside VRAM.
    pub fn contains(&self, off: u64, len: u64) -> bool {
        off.checked_add(len).is_some_and(|end| end <= self.size)
    }

    /// Copy VRAM at `off` into `buf` (`PhysMem`'s FILL, LAUNCH and bounce
    /// copies; host tests).
    pub fn read(&self, off: u64, buf: &mut [u8]) -> Result<(), Status> {
        self.slice(off, buf.len() as u64)?
            .read_slice(buf, 0)
            .map_err(|_| Status::BadVram)
    }

    /// Copy `buf` into VRAM at `off` (`PhysMem`; host tests).
    pub fn write(&self, off: u64, buf: &[u8]) -> Result<(), Status> {
        self.slice_mut(off, buf.len() as u64)?
            .write_slice(buf, 0)
            .map_err(|_| Status::BadVram)
    }

    /// `[off, off + len)` of VRAM, or `BadVram`.
    fn slice(&self, off: u64, len: u64) -> Result<VolatileSlice<'_>, Status> {
        let map = self.map.as_ref().ok_or(Status::BadVram)?;
        if !self.contains(off, len) {
            return Err(Status::BadVram);
        }
        let (off, len) = (off as usize, len as usize);
        map.get_slice(off, len).map_err(|_| Status::BadVram)
    }

    /// As `slice`, for a write: marks the chunks it touches.
    fn slice_mut(&self, off: u64, len: u64) -> Result<VolatileSlice<'_>, Status> {
        let s = self.slice(off, len)?;
        let first = off / VRAM_CHUNK;
        let last = (off + len.max(1) - 1) / VRAM_CHUNK;
        for c in first..=last {
            if let Some(w) = self.touched.get((c / 64) as usize) {
                let bit = 1 << (c % 64);
                if w.load(Ordering::Relaxed) & bit == 0 {
                    w.fetch_or(bit, Ordering::Relaxed);
                }
            }
        }
        Ok(s)
    }
}

/// A physical location an engine accesses: `addr` in guest memory, or with
/// `vram` an offset in VRAM (the ABI's type, as MIGRATE entries name it).
pub use faultline_abi::PhysPage as Phys;

/// Guest memory and VRAM as engines see them: every data access of FILL,
/// COPY, ATOMIC, SEMAPHORE_RELEASE, LAUNCH and MIGRATE goes through here,
/// so each handles both apertures the same way. Failures: `MemoryError`
/// outside guest RAM, `BadVram` outside VRAM.
pub struct PhysMem<'a, M> {
    pub mem: &'a M,
    pub vram: &'a Vram,
}

impl<M> Clone for PhysMem<'_, M> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<M> Copy for PhysMem<'_, M> {}

/// Both slices of a copy, or why not: `Ok(false)` when a guest range is
/// not one host slice (the caller bounces), `BadVram` outside VRAM.
fn copy_slices<A: BitmapSlice, B: BitmapSlice>(
    src: Result<VolatileSlice<'_, A>, Status>,
    dst: Result<VolatileSlice<'_, B>, Status>,
) -> Result<bool, Status> {
    match (src, dst) {
        (Ok(s), Ok(d)) => {
            s.copy_to_volatile_slice(d);
            Ok(true)
        }
        (Err(Status::BadVram), _) | (_, Err(Status::BadVram)) => Err(Status::BadVram),
        _ => Ok(false),
    }
}

/// A naturally aligned 32/64-bit atomic on `slice`; returns the old value.
fn atomic_on<B: BitmapSlice>(
    slice: VolatileSlice<'_, B>,
    op: u32,
    wide: bool,
    operand: u64,
    compare: u64,
) -> Result<u64, Status> {
    if wide {
        let a = slice
            .get_atomic_ref::<AtomicU64>(0)
            .map_err(|_| Status::Misaligned)?;
        Ok(match op {
            atomic_op::ADD => a.fetch_add(operand, Ordering::SeqCst),
            atomic_op::EXCHANGE => a.swap(operand, Ordering::SeqCst),
            _ => match a.compare_exchange(compare, operand, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(v) | Err(v) => v,
            },
        })
    } else {
        let a = slice
            .get_atomic_ref::<AtomicU32>(0)
            .map_err(|_| Status::Misaligned)?;
        let (operand, compare) = (operand as u32, compare as u32);
        Ok(u64::from(match op {
            atomic_op::ADD => a.fetch_add(operand, Ordering::SeqCst),
            atomic_op::EXCHANGE => a.swap(operand, Ordering::SeqCst),
            _ => match a.compare_exchange(compare, operand, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(v) | Err(v) => v,
            },
        }))
    }
}

/// A release store of `value`'s low 4 or 8 bytes at the start of `slice`.
fn store_on<B: BitmapSlice>(
    slice: VolatileSlice<'_, B>,
    value: u64,
    wide: bool,
) -> Result<(), vm_memory::volatile_memory::Error> {
    if wide {
        slice.store(value.to_le(), 0, Ordering::Release)
    } else {
        slice.store((value as u32).to_le(), 0, Ordering::Release)
    }
}

impl<'a, M: GuestMemoryBackend> PhysMem<'a, M> {
    /// `len` bytes of guest memory at `gpa` as one host slice, if they are
    /// one (a range may cross regions: `MemoryError` then too).
    fn sys(&self, gpa: u64, len: u64) -> Result<VolatileSlice<'a, MS<'a, M>>, Status> {
        let len = usize::try_from(len).map_err(|_| Status::MemoryError)?;
        self.mem
            .get_slice(GuestAddress(gpa), len)
            .map_err(|_| Status::MemoryError)
    }

    pub fn read(&self, p: Phys, buf: &mut [u8]) -> Result<(), Status> {
        if p.vram {
            return self.vram.read(p.addr, buf);
        }
        self.mem
            .read_slice(buf, GuestAddress(p.addr))
            .map_err(|_| Status::MemoryError)
    }

    pub fn write(&self, p: Phys, buf: &[u8]) -> Result<(), Status> {
        if p.vram {
            return self.vram.write(p.addr, buf);
        }
        self.mem
            .write_slice(buf, GuestAddress(p.addr))
            .map_err(|_| Status::MemoryError)
    }

    /// Copy `n` bytes from `src` to `dst`, either aperture each: one bulk
    /// host copy when both sides are single host slices, else through a
    /// bounce buffer (a guest range crossing a region boundary).
    pub fn copy(&self, dst: Phys, src: Phys, n: u64) -> Result<(), Status> {
        let v = self.vram;
        let bulk = match (src.vram, dst.vram) {
            (false, false) => copy_slices(self.sys(src.addr, n), self.sys(dst.addr, n)),
            (false, true) => copy_slices(self.sys(src.addr, n), v.slice_mut(dst.addr, n)),
            (true, false) => copy_slices(v.slice(src.addr, n), self.sys(dst.addr, n)),
            (true, true) => copy_slices(v.slice(src.addr, n), v.slice_mut(dst.addr, n)),
        }?;
        if bulk {
            return Ok(());
        }
        let mut bounce = [0u8; 4096];
        let mut off = 0u64;
        while off < n {
            let m = (n - off).min(bounce.len() as u64) as usize;
            self.read(src.add(off), &mut bounce[..m])?;
            self.write(dst.add(off), &bounce[..m])?;
            off += m as u64;
        }
        Ok(())
    }

    /// A naturally aligned 32/64-bit atomic at `p`; returns the old value.
    pub fn atomic(
        &self,
        p: Phys,
        op: u32,
        wide: bool,
        operand: u64,
        compare: u64,
    ) -> Result<u64, Status> {
        let size = if wide { 8 } else { 4 };
        match p.vram {
            true => atomic_on(
                self.vram.slice_mut(p.addr, size)?,
                op,
                wide,
                operand,
                compare,
            ),
            false => atomic_on(self.sys(p.addr, size)?, op, wide, operand, compare),
        }
    }

    /// A release store of the low 4 (8 if `wide`) bytes of `value`.
    pub fn store_release(&self, p: Phys, value: u64, wide: bool) -> Result<(), Status> {
        let size = if wide { 8 } else { 4 };
        match p.vram {
            true => store_on(self.vram.slice_mut(p.addr, size)?, value, wide)
                .map_err(|_| Status::BadVram),
            false => {
                store_on(self.sys(p.addr, size)?, value, wide).map_err(|_| Status::MemoryError)
            }
        }
    }

    /// A little-endian load of 4 (8 if `wide`) bytes (LD32 / LD64).
    pub fn load(&self, p: Phys, wide: bool) -> Result<u64, Status> {
        let mut b = [0u8; 8];
        let n = if wide { 8 } else { 4 };
        self.read(p, &mut b[..n])?;
        Ok(u64::from_le_bytes(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn accesses_stay_inside_vram_and_count_touched_chunks() {
        let vram = Vram::new(2 * VRAM_CHUNK).unwrap();
        let m = mem();
        let pm = PhysMem {
            mem: &m,
            vram: &vram,
        };
        let v = |addr| Phys { addr, vram: true };
        assert_eq!(vram.touched_bytes(), 0);
        pm.write(v(VRAM_CHUNK + 8), &[1, 2, 3]).unwrap();
        assert_eq!(vram.touched_bytes(), VRAM_CHUNK);
        let mut b = [0u8; 3];
        pm.read(v(VRAM_CHUNK + 8), &mut b).unwrap();
        assert_eq!(b, [1, 2, 3]);
        assert_eq!(
            pm.write(v(2 * VRAM_CHUNK - 2), &[0; 4]),
            Err(Status::BadVram)
        );
        assert_eq!(pm.read(v(u64::MAX - 1), &mut b), Err(Status::BadVram));
        assert_eq!(
            pm.copy(v(0), Phys::system(0), 2 * VRAM_CHUNK + 1),
            Err(Status::BadVram)
        );
        assert_eq!(
            pm.atomic(v(2 * VRAM_CHUNK), 0, true, 1, 0),
            Err(Status::BadVram)
        );
        pm.copy(Phys::system(0x1000), v(VRAM_CHUNK + 8), 3).unwrap();
        assert_eq!(pm.load(Phys::system(0x1000), false).unwrap(), 0x030201);
        let none = Vram::none();
        let pm = PhysMem {
            mem: &m,
            vram: &none,
        };
        assert_eq!(pm.write(v(0), &[0]), Err(Status::BadVram));
        assert_eq!(pm.store_release(v(0), 1, false), Err(Status::BadVram));
    }
}
