//! Registers, config space, fault buffer, replay/cancel, engines, channels.

use std::sync::Arc;
use std::time::{Duration, Instant};

use faultline_abi::{
    atomic_op, doorbell, engine, regs, status_block, vector, Access, ChannelStatus, Counter, CtlOp,
    DeviceError, FaultFlags, FaultReason, Features, Pte, Status, DEVICE_MAGIC, LEAF_2M, LEAF_4K,
};
use faultline_device::testing::{cmd, RecordingIrq, Rig, CTX_TABLE, DATA};
use faultline_device::{doorbell_offsets, Device, Worker};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const RWA: Pte = Pte::WRITE.union(Pte::ATOMIC);

fn rig() -> Rig {
    let mut r = Rig::new(64 << 20, 64);
    assert!(r.enable_channel(0, 0));
    r
}

// ------------------------------------------------------------ registers

#[test]
fn identity_registers_and_undefined_reads() {
    let mut r = rig();
    assert_eq!(r.r32(regs::MAGIC), DEVICE_MAGIC);
    assert_eq!(r.r32(regs::VERSION), 0x0001_0002);
    assert_eq!(r.r32(regs::NUM_CONTEXTS), 64);
    assert_eq!(r.r32(regs::NUM_CHANNELS), 8);
    assert_eq!(r.r32(regs::FAULT_BUF_MAX), 1 << 16);
    assert_eq!(r.r32(regs::TLB_ENTRIES), 4096);
    assert_eq!(r.r32(regs::FEATURES), Features::VRAM.bits());
    assert_eq!(r.r32(regs::VRAM_SIZE_LO), 256 << 20);
    assert_eq!(r.r32(regs::VRAM_SIZE_HI), 0);
    assert_eq!(r.r32(regs::STATUS), 1);
    for off in [0x0FC, 0x2000, 0x4000, 0xFFFC, 0x1_0000, u64::MAX - 3] {
        assert_eq!(r.r32(off), 0, "{off:#x}");
    }
    // Wrong sizes read as zero.
    let mut b = [0xAAu8; 2];
    r.dev.mmio_read(regs::MAGIC, &mut b);
    assert_eq!(b, [0, 0]);
    // Setup registers are frozen while enabled.
    r.w32(regs::FAULT_BUF_ENTRIES, 8);
    assert_eq!(r.r32(regs::FAULT_BUF_ENTRIES), 64);
    // Timestamps advance.
    let t0 = r.r32(regs::TIMESTAMP_LO);
    std::thread::sleep(Duration::from_millis(2));
    assert!(r.r32(regs::TIMESTAMP_LO).wrapping_sub(t0) > 1_000_000);
}

#[test]
fn host_sizing_is_reported_and_enforced() {
    use faultline_device::{Config, ConfigError};
    let mem = || GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
    let cfg = Config {
        max_fault_entries: 32,
        tlb_entries: 16,
        channels: 2,
        ..Config::default()
    };
    let mut r = Rig::with_config(mem(), 32, cfg);
    assert_eq!(r.r32(regs::STATUS), 1, "32 fault entries fit the limit");
    assert_eq!(r.r32(regs::NUM_CHANNELS), 2);
    assert_eq!(r.r32(regs::FAULT_BUF_MAX), 32);
    assert_eq!(r.r32(regs::TLB_ENTRIES), 16);
    assert_eq!(r.dev.config(), &cfg);
    // Channel 2 does not exist: its block reads 0 and ignores writes, and
    // its doorbell is harmless.
    r.w32(regs::channel_reg(2, regs::CH_QUEUE_SIZE), 8);
    assert_eq!(r.r32(regs::channel_reg(2, regs::CH_QUEUE_SIZE)), 0);
    r.w32(regs::channel_reg(2, regs::CH_ENABLE), 1);
    assert_eq!(r.r32(regs::channel_reg(2, regs::CH_ENABLE)), 0);
    r.ring(doorbell::channel(2));
    assert!(r.enable_channel(1, 0), "the last implemented channel works");
    // A TLB of 16 leaves evicts on the 17th page.
    r.map_range(0, DATA, DATA, 64 * LEAF_4K, LEAF_4K, Pte::WRITE);
    let t = r.exec(1, cmd::fill(DATA, 64 * LEAF_4K, 7));
    assert_eq!(r.status(t), Status::Ok);
    assert!(r.dev.counters().slot(Counter::TlbEvictions as u32) >= 64 - 16);
    // A fault buffer above the limit is a bad setup.
    r.w32(regs::ENABLE, 0);
    r.w32(regs::FAULT_BUF_ENTRIES, 64);
    r.w32(regs::ENABLE, 1);
    assert_eq!(r.r32(regs::ENABLE), 0);
    assert_eq!(r.r32(regs::ERROR_CODE), DeviceError::BadSetup as u32);
    // Invalid sizing never builds a device.
    let irq = Arc::new(RecordingIrq::default());
    let bad = Config { channels: 9, ..cfg };
    assert!(matches!(
        Device::with_config(mem(), irq, bad),
        Err(ConfigError::Channels(9))
    ));
}

#[test]
fn bad_setup_raises_error_interrupt() {
    let irq = Arc::new(RecordingIrq::default());
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let mut d = Device::new(mem, irq.clone());
    d.config_write(0x42, &(1u16 | (2 << 4)).to_le_bytes());
    let w = |d: &mut Device<GuestMemoryMmap>, o: u64, v: u32| d.mmio_write(o, &v.to_le_bytes());
    w(&mut d, regs::STATUS_BLOCK_LO, 0x800);
    w(&mut d, regs::FAULT_BUF_LO, 0x4000);
    w(&mut d, regs::FAULT_BUF_ENTRIES, 3); // not a power of two
    w(&mut d, regs::CTX_TABLE_LO, 0x1000);
    w(&mut d, regs::CTL_RING_LO, 0x2000);
    w(&mut d, regs::CTL_RING_ENTRIES, 8);
    w(&mut d, regs::ENABLE, 1);
    let mut b = [0u8; 4];
    d.mmio_read(regs::ENABLE, &mut b);
    assert_eq!(b, [0; 4]);
    d.mmio_read(regs::ERROR_CODE, &mut b);
    assert_eq!(u32::from_le_bytes(b), DeviceError::BadSetup as u32);
    assert_eq!(irq.take(), vec![vector::ERROR]);
    // Fault buffer beyond RAM.
    w(&mut d, regs::FAULT_BUF_ENTRIES, 1 << 16);
    w(&mut d, regs::FAULT_BUF_LO, 0xF_F000);
    w(&mut d, regs::ENABLE, 1);
    d.mmio_read(regs::ENABLE, &mut b);
    assert_eq!(b, [0; 4]);
    w(&mut d, regs::ERROR_CLEAR, 0);
    w(&mut d, regs::FAULT_BUF_LO, 0x4000);
    w(&mut d, regs::FAULT_BUF_ENTRIES, 16);
    w(&mut d, regs::ENABLE, 1);
    d.mmio_read(regs::STATUS, &mut b);
    assert_eq!(u32::from_le_bytes(b), 1);
}

#[test]
fn channel_setup_is_validated() {
    let mut r = rig();
    let c = 1;
    r.w32(regs::channel_reg(c, regs::CH_QUEUE_SIZE), 3);
    r.w32(regs::channel_reg(c, regs::CH_ENABLE), 1);
    assert_eq!(
        r.r32(regs::channel_reg(c, regs::CH_ENABLE)),
        2,
        "ERROR, not RUNNING"
    );
    assert_eq!(r.r32(regs::ERROR_CODE), DeviceError::BadChannelSetup as u32);
    assert_eq!(r.r32(regs::ERROR_INFO), 1);
    assert_eq!(
        r.sb(status_block::ERROR_CODE),
        DeviceError::BadChannelSetup as u32
    );
    // Misaligned descriptor table.
    r.w32(regs::channel_reg(c, regs::CH_QUEUE_SIZE), 16);
    r.w32(regs::channel_reg(c, regs::CH_DESC_LO), 0x30008);
    r.w32(regs::channel_reg(c, regs::CH_AVAIL_LO), 0x31000);
    r.w32(regs::channel_reg(c, regs::CH_USED_LO), 0x32000);
    r.w32(regs::channel_reg(c, regs::CH_ENABLE), 1);
    assert_eq!(r.r32(regs::channel_reg(c, regs::CH_ENABLE)), 2);
    // Context out of range.
    r.w32(regs::channel_reg(c, regs::CH_DESC_LO), 0x30000);
    r.w32(regs::channel_reg(c, regs::CH_CONTEXT), 64);
    r.w32(regs::channel_reg(c, regs::CH_ENABLE), 1);
    assert_eq!(r.r32(regs::channel_reg(c, regs::CH_ENABLE)), 2);
    r.w32(regs::channel_reg(c, regs::CH_CONTEXT), 0);
    r.w32(regs::channel_reg(c, regs::CH_ENABLE), 1);
    assert_eq!(r.r32(regs::channel_reg(c, regs::CH_ENABLE)), 1, "now valid");
    r.w32(regs::channel_reg(c, regs::CH_ENABLE), 0);
    // Rings outside RAM.
    r.w32(regs::channel_reg(c, regs::CH_DESC_HI), 0x10);
    r.w32(regs::channel_reg(c, regs::CH_ENABLE), 1);
    assert_eq!(r.r32(regs::channel_reg(c, regs::CH_ENABLE)), 2);
}

#[test]
fn doorbell_list_and_mmio_doorbells() {
    let list = doorbell_offsets();
    assert_eq!(list.len(), 11);
    assert_eq!(list[0], (doorbell::REPLAY, regs::DB_REPLAY));
    assert_eq!(list[3], (doorbell::channel(0), regs::DB_CHANNEL0));
    let mut r = rig();
    r.map(0, 0x1000, DATA, LEAF_4K, Pte::WRITE);
    let t = r.submit(0, cmd::fill(0x1000, 8, 7));
    // A doorbell written as a plain MMIO write, value ignored.
    r.dev
        .mmio_write(regs::DB_CHANNEL0, &0xDEADu32.to_le_bytes());
    r.dev.run_until_idle();
    assert_eq!(r.status(t), Status::Ok);
    assert_eq!(r.r32(regs::DB_CHANNEL0), 0, "doorbells read as zero");
}

#[test]
fn counters_readable_through_mmio() {
    let mut r = rig();
    r.map(0, 0x1000, DATA, LEAF_4K, Pte::WRITE);
    r.exec(0, cmd::fill(0x1000, 8, 7));
    r.exec(0, cmd::fill(0x1000, 8, 7));
    let mut b = [0u8; 8];
    r.dev
        .mmio_read(regs::counter(Counter::TlbHits as u32), &mut b);
    assert_eq!(u64::from_le_bytes(b), 1);
    assert_eq!(r.r32(regs::counter(Counter::CmdBase as u32 + 1)), 2);
    assert_eq!(r.r32(regs::counter(Counter::StatusBase as u32)), 2);
    assert!(r
        .dev
        .counters()
        .named()
        .iter()
        .any(|(n, v)| n == "cmd_fill" && *v == 2));
}

/// RESET zeroes the guest's counter window; the host's `named()` keeps
/// lifetime totals beside it, so stats taken after a run that ended with a
/// RESET are not all zeros.
#[test]
fn lifetime_counters_survive_reset() {
    let mut r = rig();
    r.map(0, 0x1000, DATA, LEAF_4K, Pte::WRITE);
    for _ in 0..3 {
        r.exec(0, cmd::fill(0x1000, 8, 7));
    }
    let t = r.exec(0, cmd::fill(0x9000, 8, 7));
    assert!(r.completion(t).is_none(), "stalled on the fault");
    r.w32(regs::RESET, regs::RESET_VALUE);
    assert_eq!(r.r32(regs::counter(Counter::FaultsRaised as u32)), 0);
    assert_eq!(r.r32(regs::counter(Counter::CmdBase as u32 + 1)), 0);
    let named = r.dev.counters().named();
    let v = |n: &str| named.iter().find(|(k, _)| k == n).map(|(_, v)| *v);
    assert_eq!(v("faults_raised"), Some(0));
    assert_eq!(v("cmd_fill"), Some(0));
    assert_eq!(v("lifetime.faults_raised"), Some(1));
    assert_eq!(v("lifetime.cmd_fill"), Some(3));
    assert_eq!(v("lifetime.status_Ok"), Some(3));
    // The names of the two groups never collide.
    let mut names: Vec<_> = named.iter().map(|(k, _)| k.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), named.len());
}

#[test]
fn reset_returns_to_power_on() {
    let mut r = rig();
    r.w32(regs::RESET, 1); // wrong value: ignored
    assert_eq!(r.r32(regs::ENABLE), 1);
    r.w32(regs::RESET, regs::RESET_VALUE);
    assert_eq!(r.r32(regs::ENABLE), 0);
    assert_eq!(r.r32(regs::STATUS_BLOCK_LO), 0);
    assert_eq!(r.r32(regs::channel_reg(0, regs::CH_ENABLE)), 0);
    assert_eq!(r.r32(regs::INT_ENABLE), 0xF);
    assert!(!r.dev.process());
}

#[test]
fn msi_state_and_masking_reach_the_host() {
    let mut r = rig();
    let msi = r.dev.msi_state();
    assert!(msi.enabled);
    assert_eq!(msi.vectors, 4);
    assert!(!r.irq.msi_changes.lock().unwrap().is_empty());
    r.irq.take();
    // Mask vector CHANNEL: the completion interrupt is held pending.
    r.dev
        .config_write(0x50, &(1u32 << vector::CHANNEL).to_le_bytes());
    r.map(0, 0x1000, DATA, LEAF_4K, Pte::WRITE);
    r.exec(0, cmd::fill(0x1000, 8, 7));
    assert!(r.irq.take().is_empty());
    assert_eq!(r.dev.msi_state().pending, 1 << vector::CHANNEL);
    r.dev.config_write(0x50, &0u32.to_le_bytes());
    assert_eq!(r.irq.take(), vec![vector::CHANNEL]);
    // INT_ENABLE gates causes but still latches INT_STATUS.
    r.w32(regs::INT_STATUS, 0xF);
    r.w32(regs::INT_ENABLE, 0);
    r.exec(0, cmd::fill(0x1000, 8, 7));
    assert!(r.irq.take().is_empty());
    assert_eq!(r.r32(regs::INT_STATUS), 2);
}

// -------------------------------------------------------- fault buffer

#[test]
fn fault_is_reported_in_memory_with_interrupt() {
    let mut r = rig();
    r.map(0, 0x2000, DATA, LEAF_4K, Pte::empty());
    r.irq.take();
    let t = r.exec(0, cmd::fill(0x2010, 8, 1));
    assert_eq!(r.completion(t), None);
    assert_eq!(r.irq.take(), vec![vector::FAULT]);
    assert_eq!(r.sb(status_block::FAULT_PUT), 1);
    let f = r.drain_faults();
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].va, 0x2000);
    assert_eq!(f[0].access, Access::Write as u8);
    assert_eq!(f[0].reason, FaultReason::WriteProtect as u8);
    assert_eq!(f[0].engine, engine::FILL);
    assert_eq!(f[0].channel, 0);
    assert!(f[0].timestamp > 0);
    r.map(0, 0x2000, DATA, LEAF_4K, Pte::WRITE);
    r.replay();
    assert_eq!(r.status(t), Status::Ok);
    assert_eq!(r.sb(status_block::REPLAY_SEQ), 1);
    assert_eq!(r.read_u64(DATA + 0x10), 1);
}

#[test]
fn pending_faults_are_deduplicated() {
    let mut r = rig();
    assert!(r.enable_channel(1, 0));
    // Two channels fault on the same (context, page, access).
    let a = r.submit(0, cmd::fill(0x5000, 8, 1));
    let b = r.submit(1, cmd::fill(0x5008, 8, 2));
    r.ring(doorbell::channel(0));
    r.ring(doorbell::channel(1));
    let f = r.drain_faults();
    assert_eq!(f.len(), 1);
    assert!(r.dev.counters().get(Counter::FaultsDeduplicated) >= 1);
    // A different access type on the same page is a separate fault.
    let c = r.submit(1, cmd::copy(0x9000, 0x5000, 8)); // queued behind b
    r.map(0, 0x5000, DATA, LEAF_4K, Pte::WRITE);
    r.replay();
    assert_eq!((r.status(a), r.status(b)), (Status::Ok, Status::Ok));
    assert_eq!(r.completion(c), None);
    let f = r.drain_faults();
    assert_eq!(f.len(), 1);
    assert_eq!((f[0].va, f[0].access), (0x9000, Access::Write as u8));
}

#[test]
fn fault_buffer_wraps() {
    let mut r = Rig::new(64 << 20, 4);
    assert!(r.enable_channel(0, 0));
    let mut seen = Vec::new();
    for round in 0..5u64 {
        let va = 0x10_0000 + round * 0x1000;
        let t = r.exec(0, cmd::fill(va, 8, round));
        let f = r.drain_faults();
        assert_eq!(f.len(), 1);
        seen.push(f[0].va);
        r.map(0, va, DATA + round * 0x1000, LEAF_4K, Pte::WRITE);
        r.replay();
        assert_eq!(r.status(t), Status::Ok);
    }
    assert_eq!(
        seen,
        (0..5).map(|i| 0x10_0000 + i * 0x1000).collect::<Vec<_>>()
    );
    assert_eq!(r.sb(status_block::FAULT_PUT), 5);
}

/// A kernel where every thread stores to its own page: 64 distinct faults
/// from one launch, into an 8-entry buffer.
fn scatter_kernel() -> Vec<u64> {
    use faultline_abi::isa::*;
    vec![
        encode(S2R, 5, 0, 0, sreg::GTID),
        encode(SHLI, 6, 5, 0, 12), // r6 = gtid * 4096
        encode(ADD, 6, 6, 1, 0),   // + base (arg0)
        encode(ST64, 0, 6, 5, 0),  // *r6 = gtid
        encode(EXIT, 0, 0, 0, 0),
    ]
}

#[test]
fn overflow_keeps_accesses_stalled_and_recovers() {
    let mut r = Rig::new(64 << 20, 8);
    assert!(r.enable_channel(0, 0));
    let code = DATA;
    r.write_code(code, &scatter_kernel());
    r.map(0, 0x1000, code, LEAF_4K, Pte::empty());
    let base = 0x100_0000u64;
    let t = r.exec(0, cmd::launch(0x1000, 5, 8, 8, [base, 0, 0, 0]));
    assert_eq!(r.completion(t), None);
    assert_eq!(r.sb(status_block::FAULT_FLAGS), FaultFlags::OVERFLOW.bits());
    // Drain, ring FAULT_GET, repeat: every fault arrives, none lost.
    let pages = drain_fault_pages(&mut r);
    assert_eq!(pages.len(), 64);
    assert_eq!(
        r.sb(status_block::FAULT_FLAGS),
        0,
        "overflow cleared once all written"
    );
    assert!(r.dev.counters().get(Counter::FaultOverflows) > 0);
    for p in &pages {
        r.map(0, *p, DATA + 0x10_0000 + (p - base), LEAF_4K, Pte::WRITE);
    }
    r.replay();
    assert_eq!(r.status(t), Status::Ok);
    for i in 0..64u64 {
        assert_eq!(r.read_u64(DATA + 0x10_0000 + i * 0x1000), i);
    }
}

/// Drains the fault buffer and rings FAULT_GET until nothing more comes
/// (at most 20 rounds); the faulting pages.
fn drain_fault_pages(r: &mut Rig) -> std::collections::BTreeSet<u64> {
    let mut pages = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let f = r.drain_faults();
        if f.is_empty() {
            break;
        }
        pages.extend(f.iter().map(|e| e.va));
        r.ring(doorbell::FAULT_GET);
    }
    pages
}

/// FLUSH_FAULTS drops the held-back faults and OVERFLOW, writes nothing;
/// the REPLAY after it reports every access still unmapped again, so the
/// driver loses nothing by discarding GET..PUT.
#[test]
fn flush_faults_drops_the_backlog_and_replay_reports_again() {
    let mut r = Rig::new(64 << 20, 8);
    assert!(r.enable_channel(0, 0));
    let code = DATA;
    r.write_code(code, &scatter_kernel());
    r.map(0, 0x1000, code, LEAF_4K, Pte::empty());
    let base = 0x100_0000u64;
    let t = r.exec(0, cmd::launch(0x1000, 5, 8, 8, [base, 0, 0, 0]));
    assert_eq!(r.sb(status_block::FAULT_FLAGS), FaultFlags::OVERFLOW.bits());
    assert!(r.dev.fault_backlog() > 0);
    let put = r.sb(status_block::FAULT_PUT);
    assert!(r.ctl_ok(CtlOp::FlushFaults, 0, 0, 0));
    assert_eq!(r.dev.fault_backlog(), 0, "held-back faults kept");
    assert_eq!(r.sb(status_block::FAULT_FLAGS), 0, "OVERFLOW kept");
    assert_eq!(
        r.sb(status_block::FAULT_PUT),
        put,
        "the flush wrote entries"
    );
    // The driver discards GET..PUT; a GET update finds nothing held back.
    assert_eq!(r.drain_faults().len(), 8);
    r.ring(doorbell::FAULT_GET);
    assert_eq!(r.sb(status_block::FAULT_PUT), put);
    // The replay makes every stalled access fault again: all 64 pages
    // arrive (8 at a time), none lost.
    r.replay();
    let pages = drain_fault_pages(&mut r);
    assert_eq!(pages.len(), 64);
    for p in &pages {
        r.map(0, *p, DATA + 0x10_0000 + (p - base), LEAF_4K, Pte::WRITE);
    }
    r.replay();
    assert_eq!(r.status(t), Status::Ok);
}

// ------------------------------------------- bounded fault bookkeeping

/// The flood: a 2-entry fault buffer the driver never drains, and
/// a LAUNCH of 512 threads each storing to its own unmapped page, whose
/// work is then thrown away, over and over. Cancelled or stopped work's
/// faults go with it: the backlog never exceeds one launch's faults, and
/// none of them is delivered later.
fn flood(end_cycle: impl Fn(&mut Rig)) {
    let mut r = Rig::new(64 << 20, 2);
    assert!(r.enable_channel(0, 0));
    let code = DATA;
    r.write_code(code, &scatter_kernel());
    r.map(0, 0x1000, code, LEAF_4K, Pte::empty());
    let base = 0x100_0000u64;
    for cycle in 0..40u64 {
        let t = r.exec(0, cmd::launch(0x1000, 5, 64, 8, [base, 0, 0, 0]));
        assert_eq!(r.completion(t), None, "cycle {cycle}: stalled");
        assert!(r.dev.fault_backlog() <= 512, "cycle {cycle}");
        assert!(r.dev.faults_pending() <= 512, "cycle {cycle}");
        end_cycle(&mut r);
        assert_eq!(r.dev.fault_backlog(), 0, "cycle {cycle}: backlog kept");
        assert_eq!(r.dev.faults_pending(), 0, "cycle {cycle}: pending kept");
    }
    let peak = r.dev.counters().fault_backlog_peak();
    assert!((1..=512).contains(&peak), "peak {peak}");
    assert!(peak as usize <= faultline_device::MAX_BACKLOG);
    assert_eq!(r.sb(status_block::FAULT_FLAGS), 0, "nothing held back");
    // The driver finally drains: only the first cycle's two entries were
    // ever written, and no stale fault of cancelled work follows.
    let first = r.drain_faults();
    assert_eq!(first.len(), 2);
    r.ring(doorbell::FAULT_GET);
    assert_eq!(r.drain_faults(), Vec::new(), "stale faults delivered");
    assert_eq!(r.sb(status_block::FAULT_PUT), 2);
}

#[test]
fn cancel_context_drops_the_faults_it_cancels() {
    flood(|r| {
        assert!(r.ctl_ok(CtlOp::CancelContext, 0, 0, 0));
    });
}

#[test]
fn cancel_range_drops_the_faults_it_cancels() {
    flood(|r| {
        assert!(r.ctl_ok(CtlOp::CancelRange, 0, 0x100_0000, 0x1000));
    });
}

#[test]
fn channel_stop_drops_the_faults_of_its_work() {
    flood(|r| {
        r.w32(regs::channel_reg(0, regs::CH_ENABLE), 0);
        assert!(r.enable_channel(0, 0));
    });
}

/// A command that faults and then fails (the source page is not mapped,
/// the destination's PTE is bad) waits on nothing: its fault is not kept.
#[test]
fn faults_of_failed_commands_are_not_kept() {
    let mut r = Rig::new(64 << 20, 2);
    assert!(r.enable_channel(0, 0));
    r.write_pte(
        0,
        0x20_0000,
        1,
        Pte::leaf(DATA, 1, Pte::WRITE).bits() | 1 << 4,
    );
    for i in 0..100u64 {
        let t = r.exec(0, cmd::copy(0x20_0000, 0x40_0000 + i * 0x1000, 8));
        assert_eq!(r.status(t), Status::BadPte);
    }
    assert_eq!(r.dev.fault_backlog(), 0);
    assert_eq!(r.dev.faults_pending(), 0);
    assert_eq!(r.drain_faults(), Vec::new());
}

/// A fault two channels wait on stays while either does: stopping one
/// channel leaves the other's report (held back, then written).
#[test]
fn a_fault_shared_by_two_channels_stays_for_the_other() {
    let mut r = Rig::new(64 << 20, 2);
    for ch in 0..2 {
        assert!(r.enable_channel(ch, 0));
    }
    // Fill the buffer with two other faults, then both channels fault on
    // page 0x9000: one held-back entry, two waiters.
    let a = r.exec(0, cmd::copy(0x5000, 0x6000, 8));
    let b = r.exec(1, cmd::fill(0x9000, 8, 1));
    r.w32(regs::channel_reg(0, regs::CH_ENABLE), 0);
    assert!(r.enable_channel(0, 0));
    let c = r.exec(0, cmd::fill(0x9000, 8, 2));
    assert_eq!(
        (r.completion(a), r.completion(b), r.completion(c)),
        (None, None, None)
    );
    // Channel 0's FILL goes: channel 1 still waits on 0x9000.
    r.w32(regs::channel_reg(0, regs::CH_ENABLE), 0);
    let mut seen: Vec<u64> = r.drain_faults().iter().map(|e| e.va).collect();
    r.ring(doorbell::FAULT_GET);
    seen.extend(r.drain_faults().iter().map(|e| e.va));
    assert_eq!(seen, [0x6000, 0x5000, 0x9000]);
    r.map(0, 0x9000, DATA, LEAF_4K, Pte::WRITE);
    r.replay();
    assert_eq!(r.status(b), Status::Ok);
}

// ---------------------------------------------------- replay and cancel

#[test]
fn cancel_range_fails_only_matching_work() {
    let mut r = rig();
    assert!(r.enable_channel(1, 0));
    let a = r.submit(0, cmd::fill(0x5000, 8, 1));
    let b = r.submit(1, cmd::fill(0x8000, 8, 2));
    r.ring(doorbell::channel(0));
    r.ring(doorbell::channel(1));
    assert_eq!(r.drain_faults().len(), 2);
    assert!(r.ctl_ok(CtlOp::CancelRange, 0, 0x5123, 0));
    assert_eq!(r.status(a), Status::Cancelled);
    assert_eq!(r.completion(b), None);
    assert_eq!(r.dev.counters().get(Counter::Cancels), 1);
    // The channel goes on with its next command.
    r.map(0, 0x1000, DATA, LEAF_4K, Pte::WRITE);
    let c = r.exec(0, cmd::fill(0x1000, 8, 3));
    assert_eq!(r.status(c), Status::Ok);
    // Wrong context cancels nothing; the right one cancels b.
    r.new_context(1);
    assert!(r.ctl_ok(CtlOp::CancelContext, 1, 0, 0));
    assert_eq!(r.completion(b), None);
    assert!(r.ctl_ok(CtlOp::CancelContext, 0, 0, 0));
    assert_eq!(r.status(b), Status::Cancelled);
}

#[test]
fn replay_without_fix_reports_again() {
    let mut r = rig();
    let t = r.exec(0, cmd::semaphore(0x3000, false, 5));
    assert_eq!(r.drain_faults().len(), 1);
    r.replay();
    assert_eq!(r.completion(t), None);
    assert_eq!(r.drain_faults().len(), 1, "still faulting: reported again");
    assert_eq!(r.dev.counters().get(Counter::Replays), 1);
}

#[test]
fn copy_reports_source_and_destination_faults_together_and_resumes() {
    let mut r = rig();
    let len = 3 * 0x1000;
    // Source mapped for the first page only; destination not at all.
    let src: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    r.write_bytes(DATA, &src);
    r.map(0, 0x10000, DATA, LEAF_4K, Pte::empty());
    let t = r.exec(0, cmd::copy(0x40000, 0x10000, len as u64));
    let f = r.drain_faults();
    assert_eq!(f.iter().map(|e| e.va).collect::<Vec<_>>(), vec![0x40000]);
    r.map_range(0, 0x40000, DATA + 0x10000, len as u64, LEAF_4K, Pte::WRITE);
    r.replay();
    let f = r.drain_faults();
    assert_eq!(
        f.iter().map(|e| (e.va, e.access)).collect::<Vec<_>>(),
        vec![(0x11000, 0)]
    );
    r.map_range(0, 0x11000, DATA + 0x1000, 0x2000, LEAF_4K, Pte::empty());
    r.replay();
    assert_eq!(r.status(t), Status::Ok);
    assert_eq!(r.read_bytes(DATA + 0x10000, len), src);
}

// -------------------------------------------------------------- engines

#[test]
fn fill_pattern_phase_across_pages() {
    let mut r = rig();
    r.map_range(0, 0x10000, DATA, 0x3000, LEAF_4K, Pte::WRITE);
    r.write_bytes(DATA, &[0xEE; 0x3000]);
    let t = r.exec(0, cmd::fill(0x10FFD, 0x1006, 0x8877_6655_4433_2211));
    assert_eq!(r.status(t), Status::Ok);
    let got = r.read_bytes(DATA + 0xFFC, 0x1008);
    assert_eq!(got[0], 0xEE);
    for (i, b) in got[1..0x1007].iter().enumerate() {
        assert_eq!(*b, 0x11 * (i as u8 % 8 + 1), "byte {i}");
    }
    assert_eq!(got[0x1007], 0xEE);
    let t = r.exec(0, cmd::fill(0x10000, 0, 0));
    assert_eq!(r.status(t), Status::Ok);
}

#[test]
fn copy_mixed_leaf_sizes() {
    let mut r = Rig::new(64 << 20, 64);
    assert!(r.enable_channel(0, 0));
    let len = 0x30_0000u64;
    let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
    r.write_bytes(8 << 20, &data);
    r.map(0, 0, 8 << 20, LEAF_2M, Pte::empty());
    r.map_range(0, LEAF_2M, 10 << 20, 0x10_0000, LEAF_4K, Pte::empty());
    r.map_range(0, 0x4000_0000 + 0x1000, 16 << 20, len, LEAF_4K, Pte::WRITE);
    let t = r.exec(0, cmd::copy(0x4000_1000, 0, len));
    assert_eq!(r.status(t), Status::Ok);
    assert_eq!(r.read_bytes(16 << 20, len as usize), data);
    assert_eq!(r.dev.counters().get(Counter::BytesCopied), len);
}

#[test]
fn invalid_commands_have_no_effect() {
    let mut r = rig();
    r.map_range(0, 0x1000, DATA, 0x4000, LEAF_4K, RWA);
    r.write_u64(DATA, 42);
    let mut bad_reserved = cmd::fill(0x1000, 8, 0);
    bad_reserved[40] = 1;
    let mut bad_flags = cmd::copy(0x1000, 0x2000, 8);
    bad_flags[4] = 1;
    let cases: Vec<([u8; 64], Status)> = vec![
        ([0u8; 64], Status::InvalidOpcode),
        (
            {
                let mut c = [0u8; 64];
                c[0] = 77;
                c
            },
            Status::InvalidOpcode,
        ),
        (bad_reserved, Status::InvalidCommand),
        (bad_flags, Status::InvalidCommand),
        (cmd::copy(0x1000, 0x1800, 0x1000), Status::InvalidCommand),
        (cmd::fill(0x1000, (1 << 40) + 1, 0), Status::InvalidCommand),
        (cmd::fill((1 << 48) - 4, 8, 0), Status::BadAddress),
        (cmd::copy(0x1000, u64::MAX - 2, 8), Status::BadAddress),
        (
            cmd::atomic(0x1004, atomic_op::ADD, true, 1, 0),
            Status::Misaligned,
        ),
        (cmd::atomic(0x1000, 7, true, 1, 0), Status::InvalidCommand),
        (
            cmd::atomic(0x1000, atomic_op::ADD, false, 1 << 32, 0),
            Status::InvalidCommand,
        ),
        (cmd::semaphore(0x1002, false, 1), Status::Misaligned),
        (cmd::semaphore(1 << 50, true, 1), Status::BadAddress),
        (cmd::launch(0x1000, 0, 1, 1, [0; 4]), Status::InvalidCommand),
        (cmd::launch(0x1004, 1, 1, 1, [0; 4]), Status::Misaligned),
        (cmd::launch(0x1000, 1, 0, 1, [0; 4]), Status::InvalidCommand),
        (
            cmd::launch(0x1000, 1, 1, 1025, [0; 4]),
            Status::InvalidCommand,
        ),
    ];
    for (c, want) in cases {
        let t = r.exec(0, c);
        assert_eq!(r.status(t), want, "{c:?}");
    }
    assert_eq!(r.read_u64(DATA), 42);
    assert_eq!(
        r.dev.counters().get(Counter::Accesses),
        0,
        "nothing translated"
    );
}

#[test]
fn atomics_32_and_64() {
    let mut r = rig();
    r.map(0, 0x1000, DATA, LEAF_4K, RWA);
    r.write_u64(DATA, 10);
    r.write_u32(DATA + 8, u32::MAX);
    let run = |r: &mut Rig, c| {
        let t = r.exec(0, c);
        match r.completion(t) {
            Some(Ok((Status::Ok, v))) => v,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(
        run(&mut r, cmd::atomic(0x1000, atomic_op::ADD, true, 5, 0)),
        10
    );
    assert_eq!(r.read_u64(DATA), 15);
    assert_eq!(
        run(&mut r, cmd::atomic(0x1000, atomic_op::CAS, true, 99, 14)),
        15
    );
    assert_eq!(r.read_u64(DATA), 15, "CAS with a wrong compare value");
    assert_eq!(
        run(&mut r, cmd::atomic(0x1000, atomic_op::CAS, true, 99, 15)),
        15
    );
    assert_eq!(r.read_u64(DATA), 99);
    assert_eq!(
        run(&mut r, cmd::atomic(0x1000, atomic_op::EXCHANGE, true, 7, 0)),
        99
    );
    assert_eq!(r.read_u64(DATA), 7);
    // 32-bit wraps in 32 bits and leaves the neighbour alone.
    assert_eq!(
        run(&mut r, cmd::atomic(0x1008, atomic_op::ADD, false, 2, 0)),
        u32::MAX as u64
    );
    assert_eq!(r.read_u32(DATA + 8), 1);
    assert_eq!(r.read_u32(DATA + 12), 0);
    assert_eq!(
        run(&mut r, cmd::atomic(0x1008, atomic_op::CAS, false, 5, 1)),
        1
    );
    assert_eq!(
        run(
            &mut r,
            cmd::atomic(0x100C, atomic_op::EXCHANGE, false, 3, 0)
        ),
        0
    );
    assert_eq!(r.read_u64(DATA + 8), (3 << 32) | 5);
}

#[test]
fn atomic_needs_the_atomic_bit() {
    let mut r = rig();
    r.map(0, 0x1000, DATA, LEAF_4K, Pte::WRITE);
    let t = r.exec(0, cmd::atomic(0x1000, atomic_op::ADD, true, 1, 0));
    let f = r.drain_faults();
    assert_eq!(
        (f[0].access, f[0].reason),
        (Access::Atomic as u8, FaultReason::AtomicProtect as u8)
    );
    r.map(0, 0x1000, DATA, LEAF_4K, RWA);
    r.replay();
    assert_eq!(r.status(t), Status::Ok);
    assert_eq!(r.read_u64(DATA), 1);
}

#[test]
fn semaphore_release_orders_after_earlier_work() {
    let mut r = rig();
    r.map_range(0, 0x1000, DATA, 0x2000, LEAF_4K, Pte::WRITE);
    r.submit(0, cmd::fill(0x1000, 0x1000, 0x0101_0101_0101_0101));
    let t = r.submit(0, cmd::semaphore(0x2008, true, 0xFE9CE));
    let t32 = r.submit(0, cmd::semaphore(0x2010, false, 0xABCD));
    r.ring(doorbell::channel(0));
    assert_eq!((r.status(t), r.status(t32)), (Status::Ok, Status::Ok));
    assert_eq!(r.read_u64(DATA + 0x1008), 0xFE9CE);
    assert_eq!(r.read_u64(DATA + 0x1010), 0xABCD);
    assert_eq!(r.read_u64(DATA + 0xFF8), 0x0101_0101_0101_0101);
    assert_eq!(r.used_idx(0), 3);
}

#[test]
fn commands_on_a_channel_run_in_order_and_block_on_a_stall() {
    let mut r = rig();
    r.map(0, 0x1000, DATA, LEAF_4K, Pte::WRITE);
    let a = r.submit(0, cmd::semaphore(0x7000, true, 1)); // faults
    let b = r.submit(0, cmd::semaphore(0x1000, true, 2));
    r.ring(doorbell::channel(0));
    assert_eq!((r.completion(a), r.completion(b)), (None, None));
    r.map(0, 0x7000, DATA + 0x1000, LEAF_4K, Pte::WRITE);
    r.replay();
    assert_eq!((r.status(a), r.status(b)), (Status::Ok, Status::Ok));
}

// ------------------------------------------------------ hostile chains

#[test]
fn malformed_chains_and_rings() {
    let mut r = rig();
    r.map(0, 0x1000, DATA, LEAF_4K, Pte::WRITE);
    // Descriptor 60/61: a command whose descriptor is write-only (no readable
    // command), added by hand at avail slot 0.
    let q = faultline_device::testing::QUEUES;
    let avail = q + 16 * 64;
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&(DATA + 0x800).to_le_bytes());
    d[8..12].copy_from_slice(&16u32.to_le_bytes());
    d[12..14].copy_from_slice(&2u16.to_le_bytes());
    r.write_bytes(q + 60 * 16, &d);
    r.write_bytes(avail + 4, &60u16.to_le_bytes());
    r.write_bytes(avail + 2, &1u16.to_le_bytes());
    r.irq.take();
    r.ring(doorbell::channel(0));
    assert_eq!(r.r32(regs::ERROR_CODE), DeviceError::BadChain as u32);
    assert!(r.irq.take().contains(&vector::ERROR));
    assert_eq!(r.used_idx(0), 1);
    // Descriptor pointing outside RAM.
    d[0..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    d[12..14].copy_from_slice(&0u16.to_le_bytes());
    d[8..12].copy_from_slice(&64u32.to_le_bytes());
    r.write_bytes(q + 60 * 16, &d);
    r.write_bytes(avail + 6, &60u16.to_le_bytes());
    r.write_bytes(avail + 2, &2u16.to_le_bytes());
    r.ring(doorbell::channel(0));
    assert_eq!(r.used_idx(0), 2);
    // Avail index far ahead: the channel stops with BadQueue.
    r.write_bytes(avail + 2, &500u16.to_le_bytes());
    r.ring(doorbell::channel(0));
    assert_eq!(r.r32(regs::ERROR_CODE), DeviceError::BadQueue as u32);
    assert_eq!(r.r32(regs::channel_reg(0, regs::CH_ENABLE)), 2);
    // Control ring producer far ahead.
    r.write_u32(faultline_device::testing::SB + status_block::CTL_PROD, 1000);
    r.ring(doorbell::CONTROL);
    assert_eq!(r.r32(regs::ERROR_CODE), DeviceError::BadControlRing as u32);
}

/// docs/gpu-abi.md: a broken queue stops the channel with BadQueue and
/// CH_ENABLE reads ERROR. A head index beyond the queue size is one.
#[test]
fn out_of_range_head_stops_the_channel_with_bad_queue() {
    let mut r = rig();
    let q = faultline_device::testing::QUEUES;
    let avail = q + 16 * 64;
    r.write_bytes(avail + 4, &200u16.to_le_bytes());
    r.write_bytes(avail + 2, &1u16.to_le_bytes());
    r.irq.take();
    r.ring(doorbell::channel(0));
    assert_eq!(r.r32(regs::ERROR_CODE), DeviceError::BadQueue as u32);
    assert_eq!(r.r32(regs::ERROR_INFO), 0);
    assert!(r.irq.take().contains(&vector::ERROR));
    assert_eq!(
        r.r32(regs::channel_reg(0, regs::CH_ENABLE)),
        ChannelStatus::ERROR.bits()
    );
    // Stopped: nothing more is consumed, and re-enabling recovers.
    assert_eq!(r.used_idx(0), 0);
    assert!(r.enable_channel(0, 0));
    r.map(0, 0x1000, DATA, LEAF_4K, Pte::WRITE);
    let t = r.exec(0, cmd::fill(0x1000, 8, 7));
    assert_eq!(r.status(t), Status::Ok);
}

#[test]
fn invalid_context_fails_commands() {
    let mut r = rig();
    assert!(r.enable_channel(2, 5));
    let t = r.exec(2, cmd::fill(0x1000, 8, 0));
    assert_eq!(r.status(t), Status::InvalidContext);
    r.write_u64(CTX_TABLE, 0x123); // root not page aligned
    assert!(r.ctl_ok(CtlOp::InvalidateAll, 0, 0, 0));
    let t = r.exec(0, cmd::fill(0x1000, 8, 0));
    assert_eq!(r.status(t), Status::BadPte);
}

// ----------------------------------------------- virtio-queue mock queue

#[test]
fn channel_driven_through_virtio_queue_mock() {
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    let mut r = Rig::new(64 << 20, 64);
    r.map(0, 0x1000, DATA, LEAF_4K, Pte::WRITE);
    let mem = r.mem().clone();
    let mock = MockSplitQueue::create(&mem, GuestAddress(0x30000), 16);
    let c = 3;
    r.w32(regs::channel_reg(c, regs::CH_QUEUE_SIZE), 16);
    r.w32(
        regs::channel_reg(c, regs::CH_DESC_LO),
        mock.desc_table_addr().0 as u32,
    );
    r.w32(
        regs::channel_reg(c, regs::CH_AVAIL_LO),
        mock.avail_addr().0 as u32,
    );
    r.w32(
        regs::channel_reg(c, regs::CH_USED_LO),
        mock.used_addr().0 as u32,
    );
    r.w32(regs::channel_reg(c, regs::CH_ENABLE), 1);
    assert_eq!(r.r32(regs::channel_reg(c, regs::CH_ENABLE)), 1);
    let cmd_addr = 0x38000u64;
    let comp = 0x38100u64;
    mem.write_slice(
        &cmd::semaphore(0x1000, true, 0x5EED),
        GuestAddress(cmd_addr),
    )
    .unwrap();
    let descs = [
        RawDescriptor::from(Descriptor::new(cmd_addr, 64, 1, 1)),
        RawDescriptor::from(Descriptor::new(comp, 16, 2, 0)),
    ];
    mock.add_desc_chains(&descs, 0).unwrap();
    r.irq.take();
    r.ring(doorbell::channel(c));
    assert_eq!(r.read_u64(DATA), 0x5EED);
    assert_eq!(mock.used().idx().load(), 1);
    let elem = mock.used().ring().ref_at(0).unwrap().load();
    assert_eq!(elem.id(), 0);
    assert_eq!(elem.len(), 16);
    assert_eq!(r.read_u32(comp), Status::Ok as u32);
    assert_eq!(r.irq.take(), vec![vector::CHANNEL]);
    // The device asked not to be notified while busy, and re-enabled
    // notifications once the ring was empty.
    let flags: u16 = mem.read_obj(mock.used_addr()).unwrap();
    assert_eq!(flags, 0);
    // The driver suppresses the completion interrupt.
    mem.write_obj(1u16, mock.avail_addr()).unwrap(); // VRING_AVAIL_F_NO_INTERRUPT
    mock.add_desc_chains(&descs, 2).unwrap();
    let descs2 = [
        RawDescriptor::from(Descriptor::new(cmd_addr, 64, 1, 3)),
        RawDescriptor::from(Descriptor::new(comp, 16, 2, 0)),
    ];
    mock.add_desc_chains(&descs2, 2).unwrap();
    r.ring(doorbell::channel(c));
    assert!(mock.used().idx().load() >= 2);
    assert!(r.irq.take().is_empty());
}

// --------------------------------------------------------------- worker

/// Runs `cmd` on channel 0 through a worker built by `spawn`, rung by
/// `ring`; returns the completion status once the data shows up.
fn through_worker(
    spawn: impl FnOnce(Arc<faultline_device::DeviceMutex<vm_memory::GuestMemoryMmap>>) -> Worker,
    ring: impl FnOnce(&Worker),
) {
    let mut r = rig();
    r.map(0, 0x1000, DATA, LEAF_4K, Pte::WRITE);
    let t = r.submit(0, cmd::semaphore(0x1000, true, 77));
    let mem = r.mem().clone();
    let dev = Arc::new(faultline_device::DeviceMutex::new(r.dev));
    let worker = spawn(dev.clone());
    ring(&worker);
    let deadline = Instant::now() + Duration::from_secs(10);
    while mem.read_obj::<u64>(GuestAddress(DATA)).unwrap() != 77 {
        assert!(Instant::now() < deadline, "worker never ran");
        std::thread::sleep(Duration::from_millis(1));
    }
    let st: u32 = mem.read_obj(GuestAddress(t.completion)).unwrap();
    assert_eq!(st, 0);
    worker.shutdown();
    // The device is free again once the worker stopped.
    assert!(!faultline_device::sync::lock(&dev).process());
}

#[test]
fn worker_thread_processes_doorbells() {
    through_worker(
        |dev| Worker::spawn(dev, Vec::new()).unwrap(),
        |w| w.waker().ring(doorbell::channel(0)),
    );
}

#[test]
fn worker_thread_processes_doorbell_eventfds() {
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    let fd = EventFd::new(EFD_NONBLOCK).unwrap();
    let host_side = fd.try_clone().unwrap();
    through_worker(
        |dev| Worker::spawn(dev, vec![(doorbell::channel(0), fd)]).unwrap(),
        |_| host_side.write(1).unwrap(),
    );
}

#[test]
fn event_idx_suppresses_and_requests_interrupts() {
    use faultline_abi::ChannelFlags;
    let mut r = Rig::new(64 << 20, 64);
    r.w32(
        regs::channel_reg(2, regs::CH_FLAGS),
        ChannelFlags::EVENT_IDX.bits(),
    );
    assert!(r.enable_channel(2, 0));
    r.map(0, 0x1000, DATA, LEAF_4K, Pte::WRITE);
    let q = faultline_device::testing::QUEUES + 2 * faultline_device::testing::QUEUE_STRIDE;
    let avail = q + 16 * 64;
    let used_event = avail + 4 + 2 * 64;
    let used = (avail + 6 + 2 * 64 + 3) & !3;
    let avail_event = used + 4 + 8 * 64;
    r.write_bytes(used_event, &5u16.to_le_bytes());
    r.irq.take();
    let t = r.exec(2, cmd::fill(0x1000, 8, 1));
    assert_eq!(r.status(t), Status::Ok);
    assert!(r.irq.take().is_empty(), "used_event not reached");
    r.write_bytes(used_event, &1u16.to_le_bytes());
    r.exec(2, cmd::fill(0x1000, 8, 2));
    assert_eq!(r.irq.take(), vec![vector::CHANNEL]);
    // Idle again: the device asked for a kick at the next avail index.
    let ae: u16 = r.mem().read_obj(GuestAddress(avail_event)).unwrap();
    assert_eq!(ae, 2);
}

/// A FILL that faults half way resumes with the pattern's phase where it
/// stopped (the pattern is built per run only as far as that run writes).
#[test]
fn fill_resumed_after_a_fault_keeps_its_phase() {
    let mut r = rig();
    r.map(0, 0x10000, DATA, LEAF_4K, Pte::WRITE);
    r.write_bytes(DATA, &[0xEE; 0x2000]);
    let t = r.submit(0, cmd::fill(0x10FFB, 0x0D, 0x8877_6655_4433_2211));
    r.dev.doorbell(doorbell::channel(0));
    r.dev.run_until_idle();
    assert_eq!(r.completion(t), None, "stalled on the second page");
    assert_eq!(r.drain_faults().len(), 1);
    r.map(0, 0x11000, DATA + 0x1000, LEAF_4K, Pte::WRITE);
    r.replay();
    assert_eq!(r.status(t), Status::Ok);
    let got = r.read_bytes(DATA + 0xFFA, 0x0F);
    assert_eq!(got[0], 0xEE);
    for (i, b) in got[1..0x0E].iter().enumerate() {
        assert_eq!(*b, 0x11 * (i as u8 % 8 + 1), "byte {i}");
    }
    assert_eq!(got[0x0E], 0xEE);
}
