//! The migration benchmark's workload (hmm-tests' `benchmark_thp_migration`
//! intent): `bytes` of a process's anonymous memory, written by the CPU,
//! migrated to the GPU's VRAM and back with the explicit migration calls,
//! each direction timed, every word checked afterwards. Shared by the
//! loopback (`examples/bench_migrate.rs`) and the guest (`bench=migrate`),
//! as `scripts/bench.sh migrate` runs it.

use alloc::string::String;

use faultline_abi::PAGE_SIZE;

use super::helpers::*;
use super::{Pattern, SvmEnv};
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

/// Runs the workload over `bytes` (a multiple of 4 KiB, within VRAM).
pub fn run<E: SvmEnv>(env: &E, bytes: u64) -> Result<Outcome, String> {
    ensure!(
        bytes > 0 && bytes.is_multiple_of(PAGE_SIZE),
        "migration size {bytes} is not a positive multiple of 4 KiB"
    );
    let pages = bytes / PAGE_SIZE;
    let pat = Pattern::page_index(0x3141);
    let (p, va) = spawn_mapped(env, bytes)?;
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
        let t1 = clock();
        ensure!(moved == pages, "{moved} of {pages} pages went to VRAM");
        ensure!(
            env.cpu_phys(p, va).is_none() && env.cpu_phys(p, va + bytes - PAGE_SIZE).is_none(),
            "the CPU still maps a migrated page"
        );
        let back = ok(dmem.migrate_to_system(svm, va, va + bytes), "to system")?;
        let t2 = clock();
        ensure!(back == pages, "{back} of {pages} pages came back");
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
            to_device_ns: t1 - t0,
            to_system_ns: t2 - t1,
        });
        Ok(())
    })?;
    ok(dmem.teardown(), "VRAM left allocated")?;
    out.ok_or_else(|| String::from("no outcome"))
}
