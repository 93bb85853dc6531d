//! COPY's per-page path: TLB hits served without `translate_for` still
//! count as accesses and hits, the per-slice region cache copies into the
//! right place however the frames spread over guest-memory regions, and a
//! run crossing a region boundary still copies.

use faultline_abi::{Counter, Pte, Status, LEAF_4K};
use faultline_device::testing::{cmd, Rig, DATA};
use vm_memory::{GuestAddress, GuestMemoryMmap};

const SRC_VA: u64 = 0x10_0000_0000;
const DST_VA: u64 = 0x20_0000_0000;

fn pattern(len: u64, seed: u64) -> Vec<u8> {
    (0..len).map(|i| ((i * 31 + seed) % 251) as u8).collect()
}

/// A rig over two adjacent 16 MiB regions, `[0, 16M)` and `[16M, 32M)`:
/// contiguous GPAs, separate host mappings.
fn two_regions() -> Rig {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), 16 << 20),
        (GuestAddress(16 << 20), 16 << 20),
    ])
    .unwrap();
    let mut r = Rig::with_memory(mem, 64);
    assert!(r.enable_channel(0, 0));
    r
}

/// Copies `pages` pages from `SRC_VA + src_off` to `DST_VA + dst_off`, the
/// pages of each side mapped to the frames `src_frame(i)` / `dst_frame(i)`,
/// and checks every destination byte (and the bytes around it untouched).
/// The mappings are new: a rig whose TLB holds the VAs would use those.
fn copy_and_check(
    r: &mut Rig,
    pages: u64,
    (src_off, dst_off): (u64, u64),
    src_frame: impl Fn(u64) -> u64,
    dst_frame: impl Fn(u64) -> u64,
) {
    // One page more on each side for the offsets.
    for i in 0..=pages {
        r.map(0, SRC_VA + i * LEAF_4K, src_frame(i), LEAF_4K, Pte::empty());
        r.map(0, DST_VA + i * LEAF_4K, dst_frame(i), LEAF_4K, Pte::WRITE);
        r.write_bytes(src_frame(i), &pattern(LEAF_4K, i));
        r.write_bytes(dst_frame(i), &[0xEE; LEAF_4K as usize]);
    }
    let len = pages * LEAF_4K;
    let t = r.exec(0, cmd::copy(DST_VA + dst_off, SRC_VA + src_off, len));
    assert_eq!(r.status(t), Status::Ok);
    // What the source VAs hold, byte by byte, and what the destination
    // VAs must hold now.
    let src_byte = |va_off: u64| pattern(LEAF_4K, va_off / LEAF_4K)[(va_off % LEAF_4K) as usize];
    for i in 0..=pages {
        let got = r.read_bytes(dst_frame(i), LEAF_4K as usize);
        for (j, &b) in got.iter().enumerate() {
            let off = i * LEAF_4K + j as u64;
            let want = if (dst_off..dst_off + len).contains(&off) {
                src_byte(off - dst_off + src_off)
            } else {
                0xEE
            };
            assert_eq!(b, want, "destination page {i}, byte {j}");
        }
    }
}

#[test]
fn warm_tlb_hits_count_as_accesses_and_hits() {
    let mut r = Rig::new(64 << 20, 64);
    assert!(r.enable_channel(0, 0));
    let pages = 64;
    let shuffled = |i: u64| DATA + (16 << 20) + ((i * 37 + 5) % (pages + 1)) * LEAF_4K;
    copy_and_check(&mut r, pages, (0, 0), |i| DATA + i * LEAF_4K, shuffled);
    // Again with the TLB warm: every page's two translations hit.
    let c = r.dev.counters();
    let (acc, hits, bytes) = (
        c.get(Counter::Accesses),
        c.get(Counter::TlbHits),
        c.get(Counter::BytesCopied),
    );
    let t = r.exec(0, cmd::copy(DST_VA, SRC_VA, pages * LEAF_4K));
    assert_eq!(r.status(t), Status::Ok);
    let c = r.dev.counters();
    assert_eq!(c.get(Counter::Accesses) - acc, 2 * pages);
    assert_eq!(c.get(Counter::TlbHits) - hits, 2 * pages);
    assert_eq!(c.get(Counter::BytesCopied) - bytes, pages * LEAF_4K);
}

#[test]
fn frames_alternating_between_regions() {
    // Source frames alternate between the regions; destination frames
    // shuffled over both.
    let src = |i: u64| if i.is_multiple_of(2) { DATA } else { 20 << 20 } + (i / 2) * LEAF_4K;
    let dst = |i: u64| (16 << 20) + (64 << 10) - ((i * 7) % 17) * 2 * LEAF_4K - LEAF_4K;
    copy_and_check(&mut two_regions(), 16, (0, 0), src, dst);
    // Unequal page offsets: every page's copy splits in two.
    copy_and_check(&mut two_regions(), 16, (0x120, 0xF08), src, dst);
}

#[test]
fn a_run_across_a_region_boundary() {
    // Both sides physically contiguous across 16 MiB: one run spanning
    // both regions (no single host slice holds it).
    let across = |i: u64| (16 << 20) - 4 * LEAF_4K + i * LEAF_4K;
    let below = |i: u64| (8 << 20) + i * LEAF_4K;
    copy_and_check(&mut two_regions(), 8, (0, 0), across, below);
    copy_and_check(&mut two_regions(), 8, (0x80, 0x40), below, across);
}
