//! The SVM test suite, shared by the host loopback (`cargo test`) and the
//! in-guest suite: every test is generic over [`SvmEnv`], the few things an
//! OS offers a GPU test (processes, mmap/munmap/mprotect, CPU access to
//! process memory, frame accounting).
//!
//! A test is a module in one of the theme files (`basic`, `protection`,
//! `teardown`, `races`, `mutants`, `scale`, `surgery`, `fork`, ...) holding its body, `run`, and what it needs
//! from its host, `NEEDS` (a [`Needs`]); [`svm_suite!`](crate::svm_suite)
//! lists every test by name, in run order. Hosts take the list from
//! [`tests`] and run one with [`run`], which builds the environment for the
//! test's needs first. Each returns `Err(message)` on failure.

use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;

use bitflags::bitflags;

use faultline_abi::PAGE_SIZE;

use super::{Gpu, GpuConfig, Platform};
use crate::errno::Errno;
use crate::mm::{Mm, Mremap};

mod helpers;

mod basic;
mod dmem;
mod dmem_huge;
mod dmem_mixed;
mod evict;
mod exclusive_access;
mod first_touch;
mod fork;
pub mod migration;
mod mutants;
mod protection;
mod races;
mod scale;
mod surgery;
mod teardown;
pub mod workloads;

use basic::*;
use dmem::*;
use dmem_huge::*;
use dmem_mixed::*;
use evict::*;
use exclusive_access::*;
use first_touch::*;
use fork::*;
use mutants::*;
use protection::*;
use races::*;
use scale::*;
use surgery::*;
use teardown::*;

bitflags! {
    /// mmap/mprotect protection (empty = PROT_NONE).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Prot: u32 {
        /// PROT_READ.
        const READ = 1;
        /// PROT_WRITE (implies READ for the CPU here).
        const WRITE = 2;
    }
}

impl Prot {
    /// PROT_READ | PROT_WRITE.
    pub const RW: Prot = Prot::READ.union(Prot::WRITE);
    /// PROT_NONE.
    pub const NONE: Prot = Prot::empty();
}

/// A CPU access that would have raised SIGSEGV (or SIGBUS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segv;

/// u64 words over a range, for whole-range CPU fills and checks: the word
/// at byte offset `off` from the range's start holds
/// `base + (off / 8) * per_word + (off / PAGE_SIZE) * per_page` (wrapping).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pattern {
    /// The first word.
    pub base: u64,
    /// Added per word.
    pub per_word: u64,
    /// Added per page.
    pub per_page: u64,
}

impl Pattern {
    /// Every word `v`.
    pub const fn constant(v: u64) -> Pattern {
        Pattern {
            base: v,
            per_word: 0,
            per_page: 0,
        }
    }

    /// Every word of page `i` (counted from the range's start) `base + i`.
    pub const fn page_index(base: u64) -> Pattern {
        Pattern {
            base,
            per_word: 0,
            per_page: 1,
        }
    }

    /// The word at byte offset `off`.
    pub fn at(&self, off: u64) -> u64 {
        self.base
            .wrapping_add((off / 8).wrapping_mul(self.per_word))
            .wrapping_add((off / PAGE_SIZE).wrapping_mul(self.per_page))
    }
}

/// The first word of a range that did not hold its [`Pattern`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mismatch {
    /// Its address.
    pub addr: u64,
    /// What the CPU read.
    pub found: u64,
    /// What the pattern says.
    pub expected: u64,
}

/// The pointer-chase list: `nodes` nodes of 16 bytes `{next, value}`, node
/// `i` at [`ChaseList::node`], `next` the address of node `i + 1` (0 for
/// the last), `value` = [`ChaseList::value`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChaseList {
    /// Where the slots start.
    pub heap: u64,
    /// 16-byte slots in the heap.
    pub slots: u64,
    /// Node `i` goes to slot `(i * step) % slots`.
    pub step: u64,
    /// How many nodes.
    pub nodes: u64,
    /// Added to `i * i` for node `i`'s value.
    pub value_offset: u64,
}

impl ChaseList {
    /// The address of node `i`.
    pub fn node(&self, i: u64) -> u64 {
        self.heap + (i.wrapping_mul(self.step) % self.slots) * 16
    }

    /// The value of node `i`.
    pub fn value(&self, i: u64) -> u64 {
        i.wrapping_mul(i).wrapping_add(self.value_offset)
    }
}

/// What the suite needs from its host.
pub trait SvmEnv {
    /// The machine interface of the GPU.
    type P: Platform;
    /// The process address space.
    type M: Mm;
    /// A process (dropping it without [`SvmEnv::exit`] is not expected).
    type Process;

    /// The probed GPU.
    fn gpu(&self) -> &Arc<Gpu<Self::P>>;
    /// A new process with an empty address space.
    fn spawn(&self) -> Result<Self::Process, String>;
    /// Its address space (a structure reference).
    fn mm(&self, p: &Self::Process) -> Arc<Self::M>;
    /// Process exit: drops the process's users reference on its mm.
    fn exit(&self, p: Self::Process);
    /// `fork`: a child of `p` with a copy of its address space (private
    /// pages copy-on-write, shared mappings shared, pages in device memory
    /// brought back first) and no mirror; it exits through
    /// [`SvmEnv::exit`].
    fn fork(&self, p: &Self::Process) -> Result<Self::Process, String>;
    /// Anonymous private mapping at `hint` (fixed, must not overlap; 0 lets
    /// the host choose). `huge`: 2 MiB pages (hint and len 2 MiB aligned).
    fn mmap(
        &self,
        p: &Self::Process,
        hint: u64,
        len: u64,
        prot: Prot,
        huge: bool,
    ) -> Result<u64, Errno>;
    /// Anonymous shared mapping (`MAP_SHARED | MAP_ANONYMOUS`, 4 KiB pages)
    /// at `hint`, placed as by [`SvmEnv::mmap`]. Within one process it
    /// faults like a private one; a [`SvmEnv::fork`] keeps its frames
    /// shared. HMM mirrors it as usual, migration to device memory
    /// refuses it.
    fn mmap_shared(&self, p: &Self::Process, hint: u64, len: u64, prot: Prot)
        -> Result<u64, Errno>;
    /// munmap.
    fn munmap(&self, p: &Self::Process, addr: u64, len: u64) -> Result<(), Errno>;
    /// mprotect.
    fn mprotect(&self, p: &Self::Process, addr: u64, len: u64, prot: Prot) -> Result<(), Errno>;
    /// mremap (move, grow, shrink; [`Mremap::plan`] says which): the new
    /// address.
    fn mremap(&self, p: &Self::Process, args: Mremap) -> Result<u64, Errno>;
    /// madvise(MADV_DONTNEED): the range's pages are dropped, the next
    /// access faults fresh zero pages.
    fn madvise_dontneed(&self, p: &Self::Process, addr: u64, len: u64) -> Result<(), Errno>;
    /// munmap on the address space alone: for code that holds only the mm,
    /// such as a driver check hook (`'static`, so it cannot borrow the
    /// environment or the process).
    fn mm_munmap(mm: &Self::M, addr: u64, len: u64) -> Result<(), Errno>;
    /// mprotect on the address space alone (see [`SvmEnv::mm_munmap`]).
    fn mm_mprotect(mm: &Self::M, addr: u64, len: u64, prot: Prot) -> Result<(), Errno>;
    /// A CPU read of process memory.
    fn read(&self, p: &Self::Process, addr: u64, out: &mut [u8]) -> Result<(), Segv>;
    /// A CPU write of process memory.
    fn write(&self, p: &Self::Process, addr: u64, data: &[u8]) -> Result<(), Segv>;
    /// A CPU atomic add on the u64 at `addr` (naturally aligned); old value.
    fn atomic_add_u64(&self, p: &Self::Process, addr: u64, v: u64) -> Result<u64, Segv>;
    /// `times` CPU atomic adds of `v` on the u64 at `addr`, back to back
    /// (one loop in the process, where the host can).
    fn atomic_add_repeat(
        &self,
        p: &Self::Process,
        addr: u64,
        v: u64,
        times: u64,
    ) -> Result<(), Segv> {
        for _ in 0..times {
            self.atomic_add_u64(p, addr, v)?;
        }
        Ok(())
    }
    /// CPU stores of `pat` over `[addr, addr + len)` (8-byte aligned, whole
    /// words). A host whose CPU accesses are costly one by one (a guest's
    /// user-mode agent) does the range in one go.
    fn fill_pattern(
        &self,
        p: &Self::Process,
        addr: u64,
        len: u64,
        pat: Pattern,
    ) -> Result<(), Segv> {
        let mut off = 0;
        while off < len {
            let n = (len - off).min(PAGE_SIZE);
            let words: Vec<u8> = (0..n / 8)
                .flat_map(|w| pat.at(off + w * 8).to_le_bytes())
                .collect();
            self.write(p, addr + off, &words)?;
            off += n;
        }
        Ok(())
    }
    /// CPU loads of every word of `[addr, addr + len)`, compared with
    /// `pat`: the first that differs.
    fn check_pattern(
        &self,
        p: &Self::Process,
        addr: u64,
        len: u64,
        pat: Pattern,
    ) -> Result<Option<Mismatch>, Segv> {
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        let mut off = 0;
        while off < len {
            let n = (len - off).min(PAGE_SIZE);
            self.read(p, addr + off, &mut buf[..n as usize])?;
            for (w, b) in buf[..n as usize].chunks_exact(8).enumerate() {
                let o = off + w as u64 * 8;
                let found = u64::from_le_bytes(b.try_into().expect("8 bytes"));
                if found != pat.at(o) {
                    return Ok(Some(Mismatch {
                        addr: addr + o,
                        found,
                        expected: pat.at(o),
                    }));
                }
            }
            off += n;
        }
        Ok(None)
    }
    /// CPU stores that build `list`.
    fn build_list(&self, p: &Self::Process, list: ChaseList) -> Result<(), Segv> {
        for i in 0..list.nodes {
            let next = if i + 1 < list.nodes {
                list.node(i + 1)
            } else {
                0
            };
            let mut node = [0u8; 16];
            node[..8].copy_from_slice(&next.to_le_bytes());
            node[8..].copy_from_slice(&list.value(i).to_le_bytes());
            self.write(p, list.node(i), &node)?;
        }
        Ok(())
    }
    /// The CPU spins on the u64 at `addr` until it holds `value` (which the
    /// GPU writes), running the driver's bottom half between polls, for up
    /// to the driver's timeout: whether it saw the value.
    fn wait_u64(&self, p: &Self::Process, addr: u64, value: u64) -> Result<bool, Segv> {
        let gpu = self.gpu();
        let deadline = gpu.platform().now_ns() + gpu.config().timeout_ns;
        loop {
            let mut b = [0u8; 8];
            self.read(p, addr, &mut b)?;
            if u64::from_le_bytes(b) == value {
                return Ok(true);
            }
            if gpu.platform().now_ns() > deadline {
                return Ok(false);
            }
            gpu.poll(true);
        }
    }
    /// Physical address of the frame the CPU maps at `addr` right now.
    fn cpu_phys(&self, p: &Self::Process, addr: u64) -> Option<u64>;
    /// Free physical frames (for leak checks).
    fn free_frames(&self) -> u64;
    /// `Some(canary)`: from now on every process frame freed is filled with
    /// the 8-byte `canary` right after it is freed (after the invalidation
    /// that unmapped it completed), recorded, and held back from reuse.
    /// `None`: stop, and release the held frames.
    fn track_freed(&self, canary: Option<u64>);
    /// Physical addresses of the frames recorded since the last call.
    fn take_freed(&self) -> Vec<u64>;
    /// Reads physical memory.
    fn read_phys(&self, pa: u64, out: &mut [u8]);
    /// Bytes `large_first_touch` touches (256 MiB unless the host is small).
    fn large_bytes(&self) -> u64 {
        256 << 20
    }
}

/// What a test needs from its host, declared beside its body (`NEEDS`).
/// A host builds each test's environment from it: the driver is probed with
/// [`Needs::gpu_config`], and the memory is sized (loopback) or checked
/// (firmware) against `memory_mib`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needs {
    /// Fault-buffer entries to probe the driver with; `None`: the driver's
    /// default ([`GpuConfig::fault_entries`]).
    pub fault_entries: Option<u32>,
    /// How long one wait for the device may take; `None`: the driver's
    /// default ([`GpuConfig::timeout_ns`]). A lost interrupt then shows up
    /// as a timeout, not a hang.
    pub timeout_ns: Option<u64>,
    /// Guest memory the test uses in all, in MiB: its processes' frames plus
    /// the driver's page tables and rings.
    pub memory_mib: u64,
}

impl Needs {
    /// What most tests need: the driver's defaults and 64 MiB.
    pub const DEFAULT: Needs = Needs {
        fault_entries: None,
        timeout_ns: None,
        memory_mib: 64,
    };

    /// The driver configuration to probe with: the defaults, with the
    /// fault-buffer size and timeout these needs ask for.
    pub fn gpu_config(&self) -> GpuConfig {
        let d = GpuConfig::default();
        GpuConfig {
            fault_entries: self.fault_entries.unwrap_or(d.fault_entries),
            timeout_ns: self.timeout_ns.unwrap_or(d.timeout_ns),
            ..d
        }
    }
}

/// A test's outcome.
pub type TestResult = Result<(), String>;
/// A test's body.
pub type TestFn<E> = fn(&E) -> TestResult;

/// One test of the suite.
pub struct SvmTest<E: SvmEnv> {
    /// Its name (the module's).
    pub name: &'static str,
    /// What its host must provide.
    pub needs: Needs,
    /// Its body.
    pub run: TestFn<E>,
}

/// The names of every test, in run order: the one list the hosts share.
/// `svm_suite!(m)` expands to `m! { open_close, anon_read, ... }`, so each
/// host (this module's [`tests`], the loopback's `#[test]`s, the firmware's
/// runner) generates its own entry per name. A new test's module goes in a
/// theme file; its name goes here.
#[macro_export]
macro_rules! svm_suite {
    ($m:ident) => {
        $m! {
            open_close,
            anon_read,
            anon_read_prot,
            anon_write,
            anon_write_prot,
            anon_write_huge,
            anon_read_multiple,
            anon_write_multiple,
            anon_teardown,
            snapshot,
            double_map,
            two_processes,
            mprotect_downgrade,
            mixed_access_ro_window,
            munmap_reuse,
            release_with_context,
            release_waits_for_range,
            register_dead_mm,
            invalidate_during_fault,
            munmap_during_stream,
            mprotect_during_stream,
            munmap_frees_after_clear,
            munmap_between_fault_and_map,
            window_access_per_page,
            fault_buffer_overflow,
            mapped_page_faults,
            pointer_chase,
            atomic_counter,
            large_first_touch,
            migrate,
            migrate_fault,
            migrate_release,
            migrate_multiple,
            migrate_partial_unmap_fault,
            snapshot_device,
            migrate_shared,
            migrate_mixed,
            migrate_race,
            evict_oversubscribe,
            vram_alloc_fail,
            migrate_first_touch,
            migrate_first_touch_fallback,
            migrate_huge,
            migrate_huge_empty,
            mremap_move,
            mremap_dontunmap,
            partial_munmap_start,
            partial_munmap_middle,
            partial_munmap_end,
            partial_mprotect_middle,
            madvise_dontneed,
            exclusive,
            exclusive_mprotect,
            exclusive_cow,
            anon_write_child,
            anon_write_child_shared,
            hmm_cow_in_device,
        }
    };
}

/// The entry of the test module `$name`.
macro_rules! svm_test {
    ($name:ident) => {
        SvmTest {
            name: stringify!($name),
            needs: $name::NEEDS,
            run: $name::run::<E> as TestFn<E>,
        }
    };
}

/// Every test, in run order.
pub fn tests<E: SvmEnv>() -> Vec<SvmTest<E>> {
    macro_rules! list {
        ($($name:ident),* $(,)?) => {
            vec![$(svm_test!($name)),*]
        };
    }
    crate::svm_suite!(list)
}

/// The test called `name`, without building [`tests`]' list: the guest
/// looks one up per test it runs, and every emulated instruction counts.
fn find<E: SvmEnv>(name: &str) -> Option<SvmTest<E>> {
    macro_rules! find {
        ($($name:ident),* $(,)?) => {
            $(if name == stringify!($name) {
                return Some(svm_test!($name));
            })*
        };
    }
    crate::svm_suite!(find);
    None
}

/// Runs the test called `name` on the environment `make_env` builds for its
/// [`Needs`]. Returns that environment (for the host's report, `None` if
/// there is no such test or the environment could not be built: the result
/// says which) and the test's result.
pub fn run<E: SvmEnv>(
    name: &str,
    make_env: impl FnOnce(&Needs) -> Result<E, String>,
) -> (Option<E>, TestResult) {
    let Some(test) = find::<E>(name) else {
        return (None, Err(format!("no suite test {name}")));
    };
    let env = match make_env(&test.needs) {
        Ok(env) => env,
        Err(e) => return (None, Err(e)),
    };
    let r = (test.run)(&env);
    (Some(env), r)
}
