//! The migration benchmark's workload (hmm-tests' `benchmark_thp_migration`
//! intent): `bytes` of a process's anonymous memory, written by the CPU,
//! migrated to the GPU's VRAM and back with the explicit migration calls,
//! each direction timed, every word checked afterwards. The range is a
//! 4 KiB-page VMA, or a HUGE one (hmm-tests' THP buffer), whose 2 MiB
//! pages must move whole: one VRAM chunk each and back into 2 MiB frame
//! runs, checked outside the timed calls. Shared by the loopback
//! (`examples/bench_migrate.rs`) and the guest (`bench=migrate`), as
//! `scripts/bench.sh migrate` runs it.

use alloc::format;
use alloc::string::String;

use faultline_abi::{LEAF_2M, PAGE_SIZE};

use super::dmem_huge::{cpu_huge, device_chunks};
use super::helpers::*;
use super::{Pattern, Prot, SvmEnv};
use crate::gpu::{DeviceMemory, DmemStats, Platform};

/// What one run measured (ns on the platform clock).
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    /// The CPU's own pass over the bytes (the pattern written), the
    /// yardstick each side of a migration is compared with.
    pub cpu_fill_ns: u64,
    /// `migrate_to_device` of the whole range.
    pub to_device_ns: u64,
    /// `migrate_to_system` of the whole range.
    pub to_system_ns: u64,
}

/// Runs the workload over `bytes` (a multiple of 4 KiB, within VRAM) of
/// 4 KiB pages, or (`huge`) of 2 MiB pages (a multiple of 2 MiB).
pub fn run<E: SvmEnv>(env: &E, bytes: u64, huge: bool) -> Result<Outcome, String> {
    let page = if huge { LEAF_2M } else { PAGE_SIZE };
    ensure!(
        bytes > 0 && bytes.is_multiple_of(page),
        "migration size {bytes} is not a positive multiple of {} KiB",
        page >> 10
    );
    let pages = bytes / PAGE_SIZE;
    let leaves = bytes / LEAF_2M;
    let pat = Pattern::page_index(0x3141);
    let p = env.spawn()?;
    let va = ok(env.mmap(&p, 0, bytes, Prot::RW, huge), "mmap")?;
    let clock = || env.gpu().platform().now_ns();
    let t0 = clock();
    cpu_fill(env, &p, va, bytes, pat)?;
    let cpu_fill_ns = clock() - t0;
    let dmem = ok(
        DeviceMemory::new(env.gpu()),
        "device memory (the GPU needs VRAM)",
    )?;
    let mut out = None;
    bound(env, p, |p, svm, _| {
        ok(dmem.attach(svm), "attach")?;
        let t0 = clock();
        let moved = ok(dmem.migrate_to_device(svm, va, va + bytes), "to device")?;
        let to_device_ns = clock() - t0;
        ensure!(moved == pages, "{moved} of {pages} pages went to VRAM");
        ensure!(
            env.cpu_phys(p, va).is_none() && env.cpu_phys(p, va + bytes - PAGE_SIZE).is_none(),
            "the CPU still maps a migrated page"
        );
        if huge {
            let chunks = device_chunks::<E>(svm, va, leaves)
                .map_err(|e| format!("the range as 2 MiB device pages: {e}"))?;
            let whole = chunks
                .iter()
                .filter(|c| c.is_some_and(|v| v % LEAF_2M == 0));
            let s = dmem.stats();
            ensure!(
                whole.count() as u64 == leaves && s.vram.chunks == leaves,
                "{leaves} 2 MiB pages are not {leaves} whole VRAM chunks: {s:?}"
            );
        }
        let t0 = clock();
        let back = ok(dmem.migrate_to_system(svm, va, va + bytes), "to system")?;
        let to_system_ns = clock() - t0;
        ensure!(back == pages, "{back} of {pages} pages came back");
        if let Some(k) = (0..leaves).find(|&k| huge && !cpu_huge(env, p, va + k * LEAF_2M)) {
            return Err(format!(
                "2 MiB page {k} did not come back as a 2 MiB frame run"
            ));
        }
        cpu_check(env, p, va, bytes, pat)?;
        let s = dmem.stats();
        ensure!(
            s == DmemStats {
                to_device: pages,
                by_fault: 0,
                to_system: pages,
                cpu_faults: 0,
                ..Default::default()
            },
            "{s:?}"
        );
        dmem.detach(svm);
        out = Some(Outcome {
            cpu_fill_ns,
            to_device_ns,
            to_system_ns,
        });
        Ok(())
    })?;
    ok(dmem.teardown(), "VRAM left allocated")?;
    out.ok_or_else(|| String::from("no outcome"))
}
