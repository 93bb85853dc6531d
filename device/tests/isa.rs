//! Compute ISA: every instruction, divergence, per-warp stalls, and the
//! SAXPY / pointer-chase / atomic-counter kernels checked against the host.

use faultline_abi::isa::*;
use faultline_abi::{engine, Pte, Status, LEAF_4K};
use faultline_device::testing::{cmd, Rig, DATA};

const CODE_VA: u64 = 0x1000;
const CODE_GPA: u64 = DATA;
const OUT_VA: u64 = 0x10_0000;
const OUT_GPA: u64 = DATA + 0x10_0000;
const RWA: Pte = Pte::WRITE.union(Pte::ATOMIC);

fn e(op: u8, rd: u8, rs1: u8, rs2: u8, imm: i32) -> u64 {
    encode(op, rd, rs1, rs2, imm)
}

/// A rig with the code page(s) and a 256 KiB output area mapped.
fn rig_with(code: &[u64]) -> Rig {
    let mut r = Rig::new(64 << 20, 256);
    assert!(r.enable_channel(0, 0));
    r.write_code(CODE_GPA, code);
    let pages = (code.len() as u64 * 8).div_ceil(LEAF_4K);
    r.map_range(0, CODE_VA, CODE_GPA, pages * LEAF_4K, LEAF_4K, Pte::empty());
    r.map_range(0, OUT_VA, OUT_GPA, 0x40000, LEAF_4K, RWA);
    r
}

fn launch(r: &mut Rig, code_len: usize, grid: u32, block: u32, args: [u64; 4]) -> Status {
    let t = r.exec(0, cmd::launch(CODE_VA, code_len as u32, grid, block, args));
    r.status(t)
}

/// Run `body` in one thread with r1 = OUT_VA; return out[0..n].
fn run1(body: &[u64], n: usize) -> Vec<u64> {
    let mut code = body.to_vec();
    code.push(e(EXIT, 0, 0, 0, 0));
    let mut r = rig_with(&code);
    assert_eq!(
        launch(&mut r, code.len(), 1, 1, [OUT_VA, 0, 0, 0]),
        Status::Ok
    );
    (0..n).map(|i| r.read_u64(OUT_GPA + 8 * i as u64)).collect()
}

/// Load a 64-bit constant into `rd` with MOVI + MOVHI.
fn li(rd: u8, v: u64) -> [u64; 2] {
    [
        e(MOVI, rd, 0, 0, v as u32 as i32),
        e(MOVHI, rd, 0, 0, (v >> 32) as u32 as i32),
    ]
}

#[test]
fn alu_register_ops() {
    let a: u64 = 0xFFFF_FFFF_FFFF_FFF0; // -16
    let b: u64 = 3;
    let ops: [(u8, u64); 13] = [
        (ADD, a.wrapping_add(b)),
        (SUB, a.wrapping_sub(b)),
        (MUL, a.wrapping_mul(b)),
        (AND, a & b),
        (OR, a | b),
        (XOR, a ^ b),
        (SHL, a << 3),
        (SHR, a >> 3),
        (SAR, ((a as i64) >> 3) as u64),
        (SLT, 1),
        (SLTU, 0),
        (DIVU, a / 3),
        (REMU, a % 3),
    ];
    let mut body = Vec::new();
    body.extend(li(2, a));
    body.extend(li(3, b));
    for (i, (op, _)) in ops.iter().enumerate() {
        body.push(e(*op, 4, 2, 3, 0));
        body.push(e(ST64, 0, 1, 4, 8 * i as i32));
    }
    // Division by zero is defined.
    body.push(e(DIVU, 4, 2, 0, 0));
    body.push(e(ST64, 0, 1, 4, 8 * 13));
    body.push(e(REMU, 4, 2, 0, 0));
    body.push(e(ST64, 0, 1, 4, 8 * 14));
    let out = run1(&body, 15);
    for (i, (op, want)) in ops.iter().enumerate() {
        assert_eq!(out[i], *want, "op {op:#x}");
    }
    assert_eq!(out[13], u64::MAX);
    assert_eq!(out[14], a);
}

#[test]
fn alu_immediate_ops_movi_movhi_and_r0() {
    let a: u64 = 0x1234_5678_9ABC_DEF0;
    let imm: i32 = -3;
    let s = imm as i64 as u64;
    let ops: [(u8, u64); 7] = [
        (ADDI, a.wrapping_add(s)),
        (MULI, a.wrapping_mul(s)),
        (ANDI, a & s),
        (ORI, a | s),
        (XORI, a ^ s),
        (SHLI, a << (s & 63)),
        (SHRI, a >> (s & 63)),
    ];
    let mut body = Vec::new();
    body.extend(li(2, a));
    for (i, (op, _)) in ops.iter().enumerate() {
        body.push(e(*op, 4, 2, 0, imm));
        body.push(e(ST64, 0, 1, 4, 8 * i as i32));
    }
    body.push(e(MOVI, 5, 0, 0, -1));
    body.push(e(ST64, 0, 1, 5, 56));
    body.push(e(ADDI, 0, 0, 0, 5)); // r0 stays zero
    body.push(e(ST64, 0, 1, 0, 64));
    body.push(e(NOP, 0, 0, 0, 0));
    body.push(e(ST64, 0, 1, 2, 72));
    let out = run1(&body, 10);
    for (i, (op, want)) in ops.iter().enumerate() {
        assert_eq!(out[i], *want, "op {op:#x}");
    }
    assert_eq!(out[7], u64::MAX, "MOVI sign-extends");
    assert_eq!(out[8], 0);
    assert_eq!(out[9], a, "MOVI + MOVHI build a 64-bit constant");
}

#[test]
fn branches_taken_and_not_taken() {
    let ops = [BEQ, BNE, BLT, BGE, BLTU, BGEU];
    // (a, b) pairs: equal, a<b signed but a>b unsigned.
    let pairs: [(i32, i32); 2] = [(5, 5), (-1, 1)];
    let mut body = Vec::new();
    let mut want = Vec::new();
    let mut slot = 0;
    for (a, b) in pairs {
        for op in ops {
            body.push(e(MOVI, 2, 0, 0, a));
            body.push(e(MOVI, 3, 0, 0, b));
            body.push(e(MOVI, 4, 0, 0, 0));
            body.push(e(op, 0, 2, 3, 2)); // taken: skip the ORI
            body.push(e(ORI, 4, 4, 0, 1));
            body.push(e(ST64, 0, 1, 4, 8 * slot));
            slot += 1;
            let (ua, ub) = (a as i64 as u64, b as i64 as u64);
            let taken = match op {
                BEQ => a == b,
                BNE => a != b,
                BLT => a < b,
                BGE => a >= b,
                BLTU => ua < ub,
                _ => ua >= ub,
            };
            want.push(u64::from(!taken));
        }
    }
    body.push(e(JMP, 0, 0, 0, 2));
    body.push(e(ST64, 0, 1, 1, 8 * slot)); // skipped by JMP
    let out = run1(&body, want.len() + 1);
    assert_eq!(&out[..want.len()], &want[..]);
    assert_eq!(out[want.len()], 0);
}

#[test]
fn loads_stores_and_atomics() {
    let mut body = Vec::new();
    body.extend(li(2, 0x1111_2222_3333_4444));
    body.push(e(ST64, 0, 1, 2, 0)); // out[0] = 0x1111222233334444
    body.push(e(ST32, 0, 1, 2, 8)); // out[1] low half = 0x33334444
    body.push(e(LD32, 3, 1, 0, 4)); // r3 = 0x11112222 (zero-extended)
    body.push(e(ST64, 0, 1, 3, 16));
    body.push(e(LD64, 4, 1, 0, 0));
    body.push(e(ST64, 0, 1, 4, 24));
    body.push(e(MOVI, 5, 0, 0, 10));
    body.push(e(ATOM_ADD64, 6, 1, 5, 0)); // out[0] += 10, r6 = old
    body.push(e(ST64, 0, 1, 6, 32));
    body.push(e(ATOM_ADD32, 6, 1, 5, 8)); // out[1].lo += 10
    body.push(e(ATOM_XCHG64, 7, 1, 5, 16)); // out[2] = 10, r7 = old
    body.push(e(ST64, 0, 1, 7, 40));
    body.push(e(ATOM_XCHG32, 7, 1, 0, 12)); // out[1].hi = 0 (was 0)
    body.push(e(MOVI, 8, 0, 0, 10));
    body.push(e(MOVI, 9, 0, 0, 77));
    body.push(e(ATOM_CAS64, 8, 1, 9, 16)); // out[2]: 10 -> 77, r8 = 10
    body.push(e(ST64, 0, 1, 8, 48));
    body.push(e(MOVI, 8, 0, 0, 1)); // wrong compare
    body.push(e(ATOM_CAS32, 8, 1, 9, 8)); // out[1].lo unchanged, r8 = old
    body.push(e(ST64, 0, 1, 8, 56));
    let out = run1(&body, 8);
    assert_eq!(out[0], 0x1111_2222_3333_4444 + 10);
    assert_eq!(out[1], 0x3333_4444 + 10);
    assert_eq!(out[2], 77);
    assert_eq!(out[3], 0x1111_2222_3333_4444);
    assert_eq!(out[4], 0x1111_2222_3333_4444);
    assert_eq!(out[5], 0x1111_2222);
    assert_eq!(out[6], 10);
    assert_eq!(out[7], 0x3333_4444 + 10);
}

#[test]
fn special_registers_and_partial_warps() {
    let mut code = Vec::new();
    code.push(e(S2R, 2, 0, 0, sreg::GTID));
    code.push(e(SHLI, 3, 2, 0, 6)); // 64 bytes per thread
    code.push(e(ADD, 3, 3, 1, 0));
    for k in 0..7 {
        code.push(e(S2R, 4, 0, 0, k));
        code.push(e(ST64, 0, 3, 4, 8 * k));
    }
    code.push(e(EXIT, 0, 0, 0, 0));
    let mut r = rig_with(&code);
    let (grid, block) = (3u32, 13u32);
    assert_eq!(
        launch(&mut r, code.len(), grid, block, [OUT_VA, 0, 0, 0]),
        Status::Ok
    );
    let wpb = block.div_ceil(WARP_SIZE);
    for b in 0..grid {
        for t in 0..block {
            let g = b * block + t;
            let base = OUT_GPA + u64::from(g) * 64;
            let got: Vec<u64> = (0..7).map(|k| r.read_u64(base + 8 * k)).collect();
            let want = [t, b, block, grid, g, t % WARP_SIZE, b * wpb + t / WARP_SIZE];
            assert_eq!(got, want.map(u64::from).to_vec(), "thread {g}");
        }
    }
    // One past the last thread wrote nothing.
    assert_eq!(r.read_u64(OUT_GPA + u64::from(grid * block) * 64 + 32), 0);
}

#[test]
fn divergent_branches_reconverge() {
    // Odd lanes store 100 + tid, even lanes 200 + tid, then all add 1000.
    let code = vec![
        e(S2R, 2, 0, 0, sreg::GTID),
        e(ANDI, 3, 2, 0, 1),
        e(SHLI, 5, 2, 0, 3),
        e(ADD, 5, 5, 1, 0),
        e(BEQ, 0, 3, 0, 3), // even -> pc 7
        e(ADDI, 4, 2, 0, 100),
        e(JMP, 0, 0, 0, 2), // -> pc 8
        e(ADDI, 4, 2, 0, 200),
        e(ADDI, 4, 4, 0, 1000),
        e(ST64, 0, 5, 4, 0),
        // Falls off the end: same as EXIT.
    ];
    let mut r = rig_with(&code);
    assert_eq!(
        launch(&mut r, code.len(), 2, 16, [OUT_VA, 0, 0, 0]),
        Status::Ok
    );
    for t in 0..32u64 {
        let want = t + 1000 + if t % 2 == 1 { 100 } else { 200 };
        assert_eq!(r.read_u64(OUT_GPA + 8 * t), want);
    }
}

#[test]
fn bad_kernels_fail_before_running() {
    let store = e(ST64, 0, 1, 1, 0);
    let cases: Vec<(Vec<u64>, Status)> = vec![
        (vec![store, e(0x7F, 0, 0, 0, 0)], Status::InvalidInstruction),
        (vec![store, e(ADD, 16, 0, 0, 0)], Status::InvalidInstruction),
        (vec![store, e(BEQ, 0, 0, 0, 5)], Status::InvalidInstruction),
        (vec![store, e(JMP, 0, 0, 0, -2)], Status::InvalidInstruction),
        (vec![store, e(S2R, 1, 0, 0, 7)], Status::InvalidInstruction),
    ];
    for (code, want) in cases {
        let mut r = rig_with(&code);
        assert_eq!(launch(&mut r, code.len(), 1, 1, [OUT_VA, 0, 0, 0]), want);
        assert_eq!(r.read_u64(OUT_GPA), 0, "nothing ran");
    }
    // Runtime errors.
    let code = vec![e(LD64, 2, 1, 0, 4)];
    let mut r = rig_with(&code);
    assert_eq!(
        launch(&mut r, 1, 1, 1, [OUT_VA, 0, 0, 0]),
        Status::Misaligned
    );
    let code = vec![e(LD64, 2, 1, 0, 0)];
    let mut r = rig_with(&code);
    assert_eq!(
        launch(&mut r, 1, 1, 1, [1 << 48, 0, 0, 0]),
        Status::BadAddress
    );
    // Infinite loop: Timeout.
    let code = vec![e(JMP, 0, 0, 0, 0)];
    let mut r = rig_with(&code);
    r.dev.set_launch_step_limit(10_000);
    assert_eq!(launch(&mut r, 1, 4, 32, [0; 4]), Status::Timeout);
}

/// Service faults like a driver until `t` completes: map every faulting
/// page to `gpa_of(va)` with `flags`, replay. Returns the most faults seen
/// outstanding at once.
fn serve(
    r: &mut Rig,
    t: faultline_device::testing::Ticket,
    gpa_of: impl Fn(u64) -> u64,
    flags: Pte,
) -> usize {
    let mut most = 0;
    for _ in 0..1000 {
        if r.completion(t).is_some() {
            return most;
        }
        let f = r.drain_faults();
        most = most.max(f.len());
        for e in &f {
            r.map(e.context, e.va, gpa_of(e.va), LEAF_4K, flags);
        }
        r.ring(faultline_abi::doorbell::FAULT_GET);
        r.replay();
    }
    panic!("kernel never completed");
}

#[test]
fn saxpy_with_demand_faults() {
    let code = vec![
        e(S2R, 5, 0, 0, sreg::GTID),
        e(BGEU, 0, 5, 4, 9), // gtid >= n -> EXIT
        e(SHLI, 6, 5, 0, 3),
        e(ADD, 7, 1, 6, 0),
        e(LD64, 8, 7, 0, 0),
        e(ADD, 9, 2, 6, 0),
        e(LD64, 10, 9, 0, 0),
        e(MUL, 8, 8, 3, 0),
        e(ADD, 10, 10, 8, 0),
        e(ST64, 0, 9, 10, 0),
        e(EXIT, 0, 0, 0, 0),
    ];
    let mut r = rig_with(&code);
    let n = 3000u64;
    let (x_va, y_va) = (0x100_0000u64, 0x200_0000u64);
    let (x_gpa, y_gpa) = (DATA + 0x100_0000, DATA + 0x200_0000);
    let a = 7u64;
    let xs: Vec<u64> = (0..n).map(|i| i * 3 + 1).collect();
    let ys: Vec<u64> = (0..n).map(|i| i ^ 0x55).collect();
    for i in 0..n {
        r.write_u64(x_gpa + 8 * i, xs[i as usize]);
        r.write_u64(y_gpa + 8 * i, ys[i as usize]);
    }
    // Nothing of x or y is mapped: every page is demand-faulted.
    let t = r.exec(
        0,
        cmd::launch(CODE_VA, code.len() as u32, 24, 128, [x_va, y_va, a, n]),
    );
    let gpa_of = |va: u64| {
        if va >= y_va {
            y_gpa + (va - y_va)
        } else {
            x_gpa + (va - x_va)
        }
    };
    let most = serve(&mut r, t, gpa_of, Pte::WRITE);
    assert_eq!(r.status(t), Status::Ok);
    // All resident warps touch the same x page first, so faults arrive one
    // page at a time here (several-at-once is covered by
    // `a_faulting_warp_stalls_alone` and the overflow test).
    assert!(most >= 1);
    for i in 0..n {
        assert_eq!(
            r.read_u64(y_gpa + 8 * i),
            a * xs[i as usize] + ys[i as usize]
        );
    }
}

#[test]
fn linked_list_pointer_chase() {
    let code = vec![
        e(S2R, 5, 0, 0, sreg::GTID),
        e(SHLI, 6, 5, 0, 3),
        e(ADD, 7, 1, 6, 0),
        e(LD64, 8, 7, 0, 0), // node = heads[gtid]
        e(MOVI, 9, 0, 0, 0),
        e(BEQ, 0, 8, 0, 5), // pc5: node == 0 -> pc10
        e(LD64, 10, 8, 0, 8),
        e(ADD, 9, 9, 10, 0),
        e(LD64, 8, 8, 0, 0),
        e(JMP, 0, 0, 0, -4),
        e(ADD, 11, 2, 6, 0), // pc10
        e(ST64, 0, 11, 9, 0),
        e(EXIT, 0, 0, 0, 0),
    ];
    let mut r = rig_with(&code);
    // 16 lists, nodes scattered over 1 MiB mapped at 0x300_0000.
    let (nodes_va, nodes_gpa) = (0x300_0000u64, DATA + 0x300_0000);
    r.map_range(0, nodes_va, nodes_gpa, 0x10_0000, LEAF_4K, Pte::WRITE);
    let heads_va = OUT_VA + 0x20000;
    let heads_gpa = OUT_GPA + 0x20000;
    let mut want = [0u64; 16];
    let mut seed = 12345u64;
    let mut next_slot = 0u64;
    for (list, sum) in want.iter_mut().enumerate() {
        let mut prev: Option<u64> = None;
        for k in 0..(list as u64 * 3 + 1) {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // Pseudo-random but unique 16-byte slots.
            let slot = (next_slot * 7919) % 65536;
            next_slot += 1;
            let off = slot * 16;
            let value = (seed >> 20) % 1000 + k;
            r.write_u64(nodes_gpa + off, 0);
            r.write_u64(nodes_gpa + off + 8, value);
            match prev {
                None => r.write_u64(heads_gpa + 8 * list as u64, nodes_va + off),
                Some(p) => r.write_u64(nodes_gpa + p, nodes_va + off),
            }
            prev = Some(off);
            *sum += value;
        }
    }
    assert_eq!(
        launch(&mut r, code.len(), 1, 16, [heads_va, OUT_VA, 0, 0]),
        Status::Ok
    );
    for (i, w) in want.iter().enumerate() {
        assert_eq!(r.read_u64(OUT_GPA + 8 * i as u64), *w, "list {i}");
    }
}

#[test]
fn atomic_counter_from_many_threads() {
    let code = vec![
        e(S2R, 5, 0, 0, sreg::GTID),
        e(ADDI, 6, 5, 0, 1),
        e(ATOM_ADD64, 0, 1, 6, 0), // sum += gtid + 1
        e(MOVI, 7, 0, 0, 1),
        e(ATOM_ADD32, 0, 1, 7, 8), // count32 += 1
        // CAS loop: counter at +16 incremented by one per thread.
        e(LD64, 8, 1, 0, 16), // pc5
        e(ADDI, 9, 8, 0, 1),
        e(ADD, 10, 8, 0, 0),
        e(ATOM_CAS64, 10, 1, 9, 16),
        e(BNE, 0, 10, 8, -4),
        e(EXIT, 0, 0, 0, 0),
    ];
    let mut r = rig_with(&code);
    let (grid, block) = (32u32, 96u32);
    assert_eq!(
        launch(&mut r, code.len(), grid, block, [OUT_VA, 0, 0, 0]),
        Status::Ok
    );
    let n = u64::from(grid * block);
    assert_eq!(r.read_u64(OUT_GPA), n * (n + 1) / 2);
    assert_eq!(r.read_u32(OUT_GPA + 8), n as u32);
    assert_eq!(r.read_u64(OUT_GPA + 16), n);
}

#[test]
fn atomics_need_the_atomic_bit() {
    let code = vec![e(ATOM_ADD64, 0, 1, 1, 0), e(EXIT, 0, 0, 0, 0)];
    let mut r = rig_with(&code);
    r.map(0, 0x50_0000, DATA + 0x50_0000, LEAF_4K, Pte::WRITE);
    let t = r.exec(0, cmd::launch(CODE_VA, 2, 1, 1, [0x50_0000, 0, 0, 0]));
    let f = r.drain_faults();
    assert_eq!(f.len(), 1);
    assert_eq!(
        (f[0].access, f[0].reason, f[0].engine),
        (2, 2, engine::COMPUTE)
    );
    r.map(0, 0x50_0000, DATA + 0x50_0000, LEAF_4K, RWA);
    r.replay();
    assert_eq!(r.status(t), Status::Ok);
    assert_eq!(r.read_u64(DATA + 0x50_0000), 0x50_0000);
}

#[test]
fn a_faulting_warp_stalls_alone() {
    // Warp w stores to page base + w * 4 KiB.
    let code = vec![
        e(S2R, 2, 0, 0, sreg::WARP),
        e(SHLI, 3, 2, 0, 12),
        e(ADD, 3, 3, 1, 0),
        e(S2R, 4, 0, 0, sreg::LANE),
        e(SHLI, 5, 4, 0, 3),
        e(ADD, 3, 3, 5, 0),
        e(ADDI, 6, 4, 0, 1),
        e(ST64, 0, 3, 6, 0),
        e(EXIT, 0, 0, 0, 0),
    ];
    let mut r = rig_with(&code);
    let base = 0x80_0000u64;
    let gpa = DATA + 0x80_0000;
    // Warps 1..4 mapped, warp 0's page not.
    r.map_range(0, base + 0x1000, gpa + 0x1000, 0x3000, LEAF_4K, Pte::WRITE);
    let t = r.exec(
        0,
        cmd::launch(CODE_VA, code.len() as u32, 1, 32, [base, 0, 0, 0]),
    );
    assert_eq!(r.completion(t), None);
    for w in 1..4u64 {
        assert_eq!(r.read_u64(gpa + w * 0x1000 + 8 * 7), 8, "warp {w} finished");
    }
    let f = r.drain_faults();
    assert_eq!(f.len(), 1);
    assert_eq!((f[0].va, f[0].info), (base, 0));
    r.map(0, base, gpa, LEAF_4K, Pte::WRITE);
    r.replay();
    assert_eq!(r.status(t), Status::Ok);
    assert_eq!(r.read_u64(gpa), 1);
}

#[test]
fn code_fetch_faults_and_resumes() {
    let code = vec![
        e(MOVI, 2, 0, 0, 9),
        e(ST64, 0, 1, 2, 0),
        e(EXIT, 0, 0, 0, 0),
    ];
    let mut r = rig_with(&code);
    r.write_code(DATA + 0x9000, &code);
    let t = r.exec(0, cmd::launch(0x9_0000, 3, 1, 1, [OUT_VA, 0, 0, 0]));
    let f = r.drain_faults();
    assert_eq!(
        (f.len(), f[0].va, f[0].engine),
        (1, 0x9_0000, engine::COMPUTE)
    );
    r.map(0, 0x9_0000, DATA + 0x9000, LEAF_4K, Pte::empty());
    r.replay();
    assert_eq!(r.status(t), Status::Ok);
    assert_eq!(r.read_u64(OUT_GPA), 9);
}

#[test]
fn cancelled_launch_stops_all_warps() {
    let code = vec![
        e(S2R, 2, 0, 0, sreg::WARP),
        e(SHLI, 2, 2, 0, 12),
        e(ADD, 2, 2, 1, 0),
        e(ST64, 0, 2, 2, 0),
    ];
    let mut r = rig_with(&code);
    let t = r.exec(0, cmd::launch(CODE_VA, 4, 4, 8, [0x90_0000, 0, 0, 0]));
    assert_eq!(r.drain_faults().len(), 4);
    assert!(r.ctl_ok(faultline_abi::CtlOp::CancelRange, 0, 0x90_2000, 0x1000));
    assert_eq!(r.status(t), Status::Cancelled);
}
