//! Device-private pages end to end in the host loopback: the real driver
//! (`gpu::DeviceMemory`, the SVM fault handler), the real device model
//! (VRAM, MIGRATE, VRAM leaves) and simulated processes whose frames are
//! the device's guest memory. The hmm-tests intents `migrate`,
//! `migrate_fault`, `migrate_release`, `migrate_shared`, `migrate_multiple`.

mod common;

use std::sync::Arc;

use common::env::LoopEnv;
use faultline_abi::Command;
use faultline_driver::gpu::suite::SvmEnv;
use faultline_driver::gpu::{
    Channel, DeviceMemory, GpuConfig, GpuError, MigratePolicy, SvmConfig, SvmContext,
};
use faultline_driver::mm::{PageState, VmFlags, PAGE_SIZE as PG};
use faultline_driver::sim::SimMm;

const RW: VmFlags = VmFlags::READ.union(VmFlags::WRITE);
const A: u64 = 0x20_0000_0000;
const B: u64 = 0x30_0000_0000;

struct Rig {
    env: LoopEnv,
    mm: Arc<SimMm>,
    svm: SvmContext<common::loopback::Loopback, SimMm>,
    chan: Channel<common::loopback::Loopback>,
    dmem: DeviceMemory<common::loopback::Loopback>,
}

/// Only the tests' explicit migrations move pages, whatever the GPU's
/// `migrate=` policy (FAULTLINE_LOOPBACK_SVM).
fn explicit() -> SvmConfig {
    SvmConfig {
        migrate: Some(MigratePolicy::None),
        ..SvmConfig::default()
    }
}

fn rig(pages: u64) -> Rig {
    let env = LoopEnv::new(64, GpuConfig::default());
    let mm = env.spawn().unwrap();
    mm.mmap(A, pages * PG, RW).unwrap();
    mm.mmap(B, pages * PG, RW).unwrap();
    let svm = SvmContext::new(&env.gpu, &mm, explicit()).unwrap();
    let chan = Channel::open(svm.context()).unwrap();
    let dmem = DeviceMemory::new(&env.gpu).unwrap();
    dmem.attach(&svm).unwrap();
    Rig {
        env,
        mm,
        svm,
        chan,
        dmem,
    }
}

/// The GPU copies `len` bytes from `src` to `dst` through its MMU.
fn gpu_copy(chan: &Channel<common::loopback::Loopback>, dst: u64, src: u64, len: u64) {
    chan.run(&Command::Copy { dst, src, len })
        .unwrap_or_else(|e| panic!("GPU copy {src:#x} -> {dst:#x}: {e}"));
}

fn pattern(len: u64, seed: u64) -> Vec<u8> {
    (0..len)
        .map(|i| (i * 7 + i / PG * 3 + seed * 29) as u8)
        .collect()
}

fn cpu_read(mm: &SimMm, va: u64, len: u64) -> Vec<u8> {
    let mut b = vec![0u8; len as usize];
    mm.read(va, &mut b).unwrap();
    b
}

fn on_device(r: &Rig, va: u64) -> bool {
    matches!(r.mm.cpu_state(va), PageState::DevicePrivate { owner, .. } if owner == r.dmem.owner())
}

/// The GPU copies A to B through its MMU: device pages of A are read
/// from VRAM without a CPU fault.
#[test]
fn migrate_gpu_reads_vram_and_cpu_faults_bring_pages_back() {
    let n = 32;
    let r = rig(n);
    let data = pattern(n * PG, 1);
    r.mm.write(A, &data).unwrap();
    let frames = r.mm.frames_in_use();
    assert_eq!(r.dmem.migrate_to_device(&r.svm, A, A + n * PG), Ok(n));
    assert!((0..n).all(|i| on_device(&r, A + i * PG)));
    assert_eq!(r.mm.device_pages(), n);
    assert_eq!(r.mm.frames_in_use(), frames - n);
    assert_eq!(r.dmem.stats().vram.pages, n);
    gpu_copy(&r.chan, B, A, n * PG);
    assert!(cpu_read(&r.mm, B, n * PG) == data, "the GPU read VRAM");
    assert!(
        (0..n).all(|i| on_device(&r, A + i * PG)),
        "device accesses do not migrate back"
    );
    assert_eq!(r.dmem.stats().cpu_faults, 0);
    let PageState::DevicePrivate { vram_pfn, .. } = r.mm.cpu_state(A + PG) else {
        unreachable!()
    };
    assert_eq!(
        r.svm.device_lookup(A + PG).map(|l| l.phys),
        Some(vram_pfn * PG),
        "a VRAM leaf"
    );
    // The GPU writes device pages too; the CPU sees the writes after its
    // faults bring the pages back.
    r.chan
        .run(&Command::Fill {
            dst: A,
            len: n * PG,
            pattern: 0x0102_0304_0506_0708,
        })
        .unwrap();
    let want: Vec<u8> = (0..n * PG).map(|i| 8 - (i % 8) as u8).collect();
    assert!(cpu_read(&r.mm, A, n * PG) == want);
    let s = r.dmem.stats();
    assert_eq!((s.to_device, s.cpu_faults, s.vram.pages), (n, n, 0));
    assert_eq!(r.mm.device_pages(), 0);
    assert_eq!(r.env.lb.coherence_violations(), 0);
    teardown(r);
}

#[test]
fn migrate_fault_half_back_then_the_mix_again() {
    let n = 16;
    let r = rig(n);
    let data = pattern(n * PG, 2);
    r.mm.write(A, &data).unwrap();
    assert_eq!(r.dmem.migrate_to_device(&r.svm, A, A + n * PG), Ok(n));
    for i in (0..n).step_by(2) {
        assert!(cpu_read(&r.mm, A + i * PG, PG) == data[(i * PG) as usize..][..PG as usize]);
    }
    assert_eq!(r.dmem.migrate_to_device(&r.svm, A, A + n * PG), Ok(n / 2));
    gpu_copy(&r.chan, B, A, n * PG);
    assert!(cpu_read(&r.mm, B, n * PG) == data);
    assert_eq!(r.dmem.migrate_to_system(&r.svm, A, A + n * PG), Ok(n));
    assert!(cpu_read(&r.mm, A, n * PG) == data);
    let s = r.dmem.stats();
    assert_eq!(
        (s.to_device, s.to_system, s.cpu_faults),
        (n + n / 2, n, n / 2)
    );
    teardown(r);
}

#[test]
fn migrate_release_frees_all_vram() {
    let n = 24;
    let r = rig(n);
    r.mm.write(A, &pattern(n * PG, 3)).unwrap();
    assert_eq!(r.dmem.migrate_to_device(&r.svm, A, A + n * PG), Ok(n));
    // GPU use of the device pages, then the process exits with them.
    gpu_copy(&r.chan, B, A, n * PG);
    let dmem = finish(r, false);
    assert_eq!(dmem.stats().vram.pages, 0, "exit freed every VRAM page");
    assert_eq!(dmem.teardown(), Ok(()));
}

#[test]
fn migrate_shared_is_refused() {
    let r = rig(1);
    let s = 0x40_0000_0000;
    r.mm.mmap(s, 4 * PG, RW | VmFlags::SHARED).unwrap();
    r.mm.write(s, &pattern(4 * PG, 4)).unwrap();
    assert_eq!(r.dmem.migrate_to_device(&r.svm, s, s + 4 * PG), Ok(0));
    assert_eq!(r.dmem.stats().vram.pages, 0);
    assert!(matches!(r.mm.cpu_state(s), PageState::Present { .. }));
    teardown(r);
}

#[test]
fn migrate_holes_become_zeroed_vram() {
    let n = 8;
    let r = rig(n);
    r.mm.write(A + 3 * PG, &pattern(PG, 5)).unwrap();
    assert_eq!(r.dmem.migrate_to_device(&r.svm, A, A + n * PG), Ok(n));
    gpu_copy(&r.chan, B, A, n * PG);
    let got = cpu_read(&r.mm, B, n * PG);
    let mut want = vec![0u8; (n * PG) as usize];
    want[(3 * PG) as usize..][..PG as usize].copy_from_slice(&pattern(PG, 5));
    assert!(got == want);
    assert_eq!(
        r.dmem.migrate_to_device(&r.svm, A + 1, A + PG),
        Err(GpuError::Mm(faultline_driver::errno::Errno::EINVAL))
    );
    r.dmem.migrate_to_system(&r.svm, A, A + n * PG).unwrap();
    teardown(r);
}

#[test]
fn migrate_multiple_round_trips() {
    let n = 8;
    let r = rig(n);
    for round in 0..10 {
        let data = pattern(n * PG, 10 + round);
        r.mm.write(A, &data).unwrap();
        assert_eq!(r.dmem.migrate_to_device(&r.svm, A, A + n * PG), Ok(n));
        gpu_copy(&r.chan, B, A, n * PG);
        assert!(cpu_read(&r.mm, B, n * PG) == data, "round {round}");
        assert_eq!(r.dmem.migrate_to_system(&r.svm, A, A + n * PG), Ok(n));
        assert!(cpu_read(&r.mm, A, n * PG) == data, "round {round}");
    }
    let s = r.dmem.stats();
    assert_eq!(
        (s.to_device, s.to_system, s.cpu_faults),
        (10 * n, 10 * n, 0)
    );
    teardown(r);
}

/// The process exits (its context detached from the device memory first
/// if `detach`, as a driver does after migrating back); the device memory
/// is what is left.
fn finish(r: Rig, detach: bool) -> DeviceMemory<common::loopback::Loopback> {
    let Rig {
        env,
        mm,
        svm,
        chan,
        dmem,
    } = r;
    if detach {
        dmem.detach(&svm);
    }
    drop(chan);
    env.exit(mm);
    assert!(svm.is_released());
    drop(svm);
    dmem
}

/// Everything back, detached, process gone: no VRAM left.
fn teardown(r: Rig) {
    assert_eq!(finish(r, true).teardown(), Ok(()), "no VRAM page leaks");
}

/// A migration waits for its copy without servicing GPU faults: it holds
/// the mmap lock and pages under migration, which a fault service would
/// need. A GPU fault raised before the migration is serviced after it.
#[test]
fn a_migration_does_not_service_faults_while_it_copies() {
    let n = 8;
    let r = rig(n);
    let c = 0x50_0000_0000;
    r.mm.mmap(c, n * PG, RW).unwrap();
    r.mm.write(A, &pattern(n * PG, 6)).unwrap();
    r.mm.write(c, &pattern(n * PG, 7)).unwrap();
    let t = r
        .chan
        .submit(&Command::Copy {
            dst: B,
            src: A,
            len: n * PG,
        })
        .unwrap();
    // Let the device raise the COPY's fault (nothing services it yet).
    std::thread::sleep(std::time::Duration::from_millis(100));
    let before = r.env.gpu.counters().snapshot().faults_read;
    assert_eq!(r.dmem.migrate_to_device(&r.svm, c, c + n * PG), Ok(n));
    let during = r.env.gpu.counters().snapshot().faults_read;
    assert_eq!(during, before, "the migration's wait serviced a fault");
    r.chan.wait(t).unwrap();
    assert!(cpu_read(&r.mm, B, n * PG) == pattern(n * PG, 6));
    assert!(cpu_read(&r.mm, c, n * PG) == pattern(n * PG, 7));
    teardown(r);
}

/// A copy that fails (the device stopped: the MIGRATE times out) leaves
/// every page in system memory with its data and gives its VRAM back.
#[test]
fn a_failed_copy_restores_the_pages_and_frees_their_vram() {
    let n = 8;
    let env = LoopEnv::new(
        64,
        GpuConfig {
            timeout_ns: 200_000_000,
            ..GpuConfig::default()
        },
    );
    let mm = env.spawn().unwrap();
    mm.mmap(A, n * PG, RW).unwrap();
    let data = pattern(n * PG, 8);
    mm.write(A, &data).unwrap();
    let svm = SvmContext::new(&env.gpu, &mm, SvmConfig::default()).unwrap();
    let dmem = DeviceMemory::new(&env.gpu).unwrap();
    dmem.attach(&svm).unwrap();
    env.lb.stop();
    assert!(matches!(
        dmem.migrate_to_device(&svm, A, A + n * PG),
        Err(GpuError::Timeout(_))
    ));
    assert!((0..n).all(|i| matches!(mm.cpu_state(A + i * PG), PageState::Present { .. })));
    assert!(cpu_read(&mm, A, n * PG) == data);
    assert_eq!(dmem.stats().vram.pages, 0, "the VRAM went back");
    assert_eq!(mm.device_pages(), 0);
}

#[test]
fn vram_parts_are_whole_chunks_inside_vram() {
    let env = LoopEnv::new(64, GpuConfig::default());
    let size = env.gpu.vram_size();
    let chunk = 2 << 20;
    for (off, len) in [(0, 0), (chunk / 2, chunk), (0, size + chunk), (size, chunk)] {
        assert!(
            matches!(
                DeviceMemory::part(&env.gpu, off, len),
                Err(GpuError::Invalid(_))
            ),
            "part {off:#x}+{len:#x}"
        );
    }
    let a = DeviceMemory::part(&env.gpu, 0, chunk).unwrap();
    let b = DeviceMemory::part(&env.gpu, size - chunk, chunk).unwrap();
    assert_ne!(a.owner(), b.owner());
}

/// VRAM full: the migration moves what fits and leaves the rest in system
/// memory; the GPU and the CPU see every page's data either way.
#[test]
fn vram_full_migrates_what_fits() {
    let chunk_pages = 512;
    let n = chunk_pages + 88;
    let env = LoopEnv::new(64, GpuConfig::default());
    let mm = env.spawn().unwrap();
    mm.mmap(A, n * PG, RW).unwrap();
    mm.mmap(B, n * PG, RW).unwrap();
    let data = pattern(n * PG, 9);
    mm.write(A, &data).unwrap();
    let svm = SvmContext::new(&env.gpu, &mm, explicit()).unwrap();
    let chan = Channel::open(svm.context()).unwrap();
    let dmem = DeviceMemory::part(&env.gpu, 0, chunk_pages * PG).unwrap();
    dmem.attach(&svm).unwrap();
    assert_eq!(dmem.migrate_to_device(&svm, A, A + n * PG), Ok(chunk_pages));
    assert_eq!(mm.device_pages(), chunk_pages);
    assert!(matches!(
        mm.cpu_state(A + (n - 1) * PG),
        PageState::Present { .. }
    ));
    gpu_copy(&chan, B, A, n * PG);
    assert!(cpu_read(&mm, B, n * PG) == data);
    assert_eq!(dmem.migrate_to_system(&svm, A, A + n * PG), Ok(chunk_pages));
    assert!(cpu_read(&mm, A, n * PG) == data);
    dmem.detach(&svm);
    drop(chan);
    env.exit(mm);
    drop(svm);
    assert_eq!(dmem.teardown(), Ok(()));
}

/// A MIGRATE the driver stopped waiting for (its deadline passed) may
/// still run: the pages it writes must not be handed out again meanwhile.
/// Here the device is stopped, `migrate_to_system` times out, the CPU then
/// writes fresh data into newly faulted pages, and only then does the
/// stale MIGRATE run: the fresh data must survive it.
#[test]
fn a_timed_out_migrate_never_writes_pages_given_back() {
    let n = 8;
    let cfg = GpuConfig {
        timeout_ns: 200_000_000,
        ..GpuConfig::default()
    };
    let env = LoopEnv::new(64, cfg);
    let mm = env.spawn().unwrap();
    mm.mmap(A, n * PG, RW).unwrap();
    mm.mmap(B, n * PG, RW).unwrap();
    let svm = SvmContext::new(&env.gpu, &mm, SvmConfig::default()).unwrap();
    let dmem = DeviceMemory::new(&env.gpu).unwrap();
    dmem.attach(&svm).unwrap();
    mm.write(A, &pattern(n * PG, 1)).unwrap();
    assert_eq!(dmem.migrate_to_device(&svm, A, A + n * PG), Ok(n));
    let vram_before = dmem.stats().vram;

    env.lb.stop();
    let r = dmem.migrate_to_system(&svm, A, A + n * PG);
    assert!(matches!(r, Err(GpuError::Timeout(_))), "{r:?}");
    assert!(
        (0..n).all(|i| matches!(mm.cpu_state(A + i * PG), PageState::DevicePrivate { .. })),
        "the pages stay in VRAM"
    );
    assert_eq!(dmem.stats().vram, vram_before);
    let fresh = pattern(n * PG, 2);
    mm.write(B, &fresh).unwrap();
    faultline_device::sync::lock(&env.lb.dev).run_until_idle();
    assert!(
        cpu_read(&mm, B, n * PG) == fresh,
        "the late MIGRATE wrote into frames the process was given since"
    );
}

/// The same for a CPU fault's `migrate_to_ram`: the frame its timed-out
/// MIGRATE may still write is not given back.
#[test]
fn a_timed_out_migrate_to_ram_never_writes_a_frame_given_back() {
    let cfg = GpuConfig {
        timeout_ns: 200_000_000,
        ..GpuConfig::default()
    };
    let env = LoopEnv::new(64, cfg);
    let mm = env.spawn().unwrap();
    mm.mmap(A, PG, RW).unwrap();
    mm.mmap(B, PG, RW).unwrap();
    let svm = SvmContext::new(&env.gpu, &mm, SvmConfig::default()).unwrap();
    let dmem = DeviceMemory::new(&env.gpu).unwrap();
    dmem.attach(&svm).unwrap();
    mm.write(A, &pattern(PG, 1)).unwrap();
    assert_eq!(dmem.migrate_to_device(&svm, A, A + PG), Ok(1));

    env.lb.stop();
    assert!(mm.read(A, &mut [0u8; 8]).is_err(), "the CPU fault fails");
    let fresh = pattern(PG, 2);
    mm.write(B, &fresh).unwrap();
    faultline_device::sync::lock(&env.lb.dev).run_until_idle();
    assert!(
        cpu_read(&mm, B, PG) == fresh,
        "the late MIGRATE wrote into a frame the process was given since"
    );
}

/// A range over VMAs and the gaps between them (one of 64 GiB): the pages
/// inside VMAs migrate, the gaps are stepped over, a range that starts and
/// ends in gaps included.
#[test]
fn migration_steps_over_the_gaps_between_vmas() {
    let env = LoopEnv::new(64, GpuConfig::default());
    let mm = env.spawn().unwrap();
    let far = A + (64 << 30);
    for (at, pages) in [(A + PG, 2), (A + 5 * PG, 1), (far, 3)] {
        mm.mmap(at, pages * PG, RW).unwrap();
        mm.write(at, &pattern(pages * PG, at / PG)).unwrap();
    }
    let svm = SvmContext::new(&env.gpu, &mm, SvmConfig::default()).unwrap();
    let dmem = DeviceMemory::new(&env.gpu).unwrap();
    dmem.attach(&svm).unwrap();
    let state = |va| matches!(mm.cpu_state(va), PageState::DevicePrivate { .. });
    assert_eq!(dmem.migrate_to_device(&svm, A, A + 4 * PG), Ok(2));
    assert_eq!(
        dmem.migrate_to_device(&svm, A + 2 * PG, far + 2 * PG),
        Ok(1 + 2)
    );
    assert!(state(far + PG) && !state(far + 2 * PG));
    assert_eq!(dmem.migrate_to_device(&svm, far + PG, far + 8 * PG), Ok(1));
    assert_eq!(dmem.migrate_to_device(&svm, A + 6 * PG, far), Ok(0));
    assert_eq!(dmem.migrate_to_system(&svm, A, far + 3 * PG), Ok(6));
    for (at, pages) in [(A + PG, 2), (A + 5 * PG, 1), (far, 3)] {
        assert!(cpu_read(&mm, at, pages * PG) == pattern(pages * PG, at / PG));
    }
    dmem.detach(&svm);
    env.exit(mm);
    drop(svm);
    assert_eq!(dmem.teardown(), Ok(()));
}
