//! The process mm's batched PTE exchange (`Mm::pte_exchange_run`, what a
//! migration does for a whole range at each step): each exchange succeeds
//! only where the PTE holds what it expects, fails alone with what it
//! holds instead, and frames change hands with the entries.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use faultline_driver::mm::{mmap_read_lock, Mm, PageState, PteSwap, PAGE_SIZE as PG};

use super::Test;
use crate::mm::process::{MapFlags, Process, Prot};

pub const TESTS: &[Test] = &[Test::new("process_pte_exchange_run", pte_exchange_run)];

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

/// Eight pages, the first four written: exchanges of matching and of
/// stale expectations in one run, then the way back.
fn pte_exchange_run() -> Result<(), String> {
    let p = Process::new().map_err(|e| format!("Process::new: {e:?}"))?;
    let a = p
        .mmap(None, 8 * PG, Prot::READ | Prot::WRITE, MapFlags::empty())
        .map_err(|e| format!("mmap: {e:?}"))?;
    for i in 0..4 {
        p.agent()
            .write_u64(a + i * PG, i + 1)
            .map_err(|e| format!("write page {i}: {e:?}"))?;
    }
    let state = |i: u64| p.translate(a + i * PG).state;
    let before: Vec<PageState> = (0..8).map(state).collect();
    let PageState::Present { writable, .. } = before[0] else {
        return Err(format!("page 0 after a write: {:?}", before[0]));
    };
    let data = p.stats().data_frames;
    let swap = |i: u64, old, new| PteSwap {
        addr: a + i * PG,
        old,
        new,
    };
    // Page 1 as it is but read-only: an expectation that no longer holds.
    let PageState::Present { pfn: pfn1, .. } = before[1] else {
        return Err(format!("page 1 after a write: {:?}", before[1]));
    };
    let stale = PageState::Present {
        pfn: pfn1,
        writable: !writable,
    };
    let out = [
        swap(0, before[0], PageState::Migration),
        swap(1, stale, PageState::Migration),
        swap(4, PageState::None, PageState::Migration),
        swap(5, PageState::Zero { pfn: 0 }, PageState::Migration),
    ];
    let mut done = [Ok(()); 4];
    {
        let g = mmap_read_lock(&**p.mm());
        p.mm().pte_exchange_run(&g, &out, &mut done);
    }
    let want = [Ok(()), Err(before[1]), Ok(()), Err(PageState::None)];
    ensure!(done == want, "results {done:?}, expected {want:?}");
    let now: Vec<PageState> = (0..8).map(state).collect();
    let mut expect = before.clone();
    expect[0] = PageState::Migration;
    expect[4] = PageState::Migration;
    ensure!(now == expect, "after the run: {now:?}, expected {expect:?}");
    ensure!(
        p.stats().data_frames == data - 1,
        "page 0's frame went out with its entry: {} data frames, {data} before",
        p.stats().data_frames
    );
    // Page 2 holds no migration entry: expecting one fails there alone.
    let back = [
        swap(0, PageState::Migration, before[0]),
        swap(2, PageState::Migration, PageState::None),
        swap(4, PageState::Migration, PageState::None),
    ];
    let mut done = [Err(PageState::None); 3];
    {
        let g = mmap_read_lock(&**p.mm());
        p.mm().pte_exchange_run(&g, &back, &mut done);
    }
    let want = [Ok(()), Err(before[2]), Ok(())];
    ensure!(done == want, "the way back: {done:?}, expected {want:?}");
    let now: Vec<PageState> = (0..8).map(state).collect();
    ensure!(
        now == before,
        "after the way back: {now:?}, expected {before:?}"
    );
    ensure!(
        p.stats().data_frames == data,
        "{} data frames after the way back, {data} before",
        p.stats().data_frames
    );
    let v = p
        .agent()
        .read_u64(a)
        .map_err(|e| format!("read page 0: {e:?}"))?;
    ensure!(v == 1, "page 0 reads {v:#x} after the way back, expected 1");
    Ok(())
}
