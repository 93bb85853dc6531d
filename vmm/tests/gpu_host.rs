//! The GPU as a guest sees it, end to end under KVM: hand-assembled PVH
//! guests (flat 32-bit protected mode, paging off, so BAR0 at 0xc0000000 is
//! directly addressable) probe PCI config space, BAR0, a BAR move, and ring
//! a doorbell through its ioeventfd with the worker answering in guest
//! memory.

mod common;

use common::*;

const BAR0: u32 = 0xc000_0000;
const GPU_CFG: u32 = 0x8000_0000 | (4 << 11); // 00:04.0
const MAGIC: u32 = u32::from_le_bytes(*b"FLTG");

/// Just enough 32-bit x86 to poke ports and memory.
#[derive(Default)]
struct Asm(Vec<u8>);

impl Asm {
    fn mov_eax(&mut self, v: u32) -> &mut Self {
        self.0.push(0xb8);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn mov_dx(&mut self, port: u16) -> &mut Self {
        self.0.extend_from_slice(&[0x66, 0xba]);
        self.0.extend_from_slice(&port.to_le_bytes());
        self
    }
    /// CONFIG_ADDRESS = `addr`
    fn cfg_select(&mut self, addr: u32) -> &mut Self {
        self.mov_dx(0xcf8).mov_eax(addr);
        self.0.push(0xef); // out dx, eax
        self
    }
    fn cfg_read(&mut self, addr: u32) -> &mut Self {
        self.cfg_select(addr).mov_dx(0xcfc);
        self.0.push(0xed); // in eax, dx
        self
    }
    fn cfg_write(&mut self, addr: u32, v: u32) -> &mut Self {
        self.cfg_select(addr).mov_dx(0xcfc).mov_eax(v);
        self.0.push(0xef);
        self
    }
    fn load(&mut self, addr: u32) -> &mut Self {
        self.0.push(0xa1); // mov eax, [moffs32]
        self.0.extend_from_slice(&addr.to_le_bytes());
        self
    }
    fn store(&mut self, addr: u32, v: u32) -> &mut Self {
        self.mov_eax(v);
        self.0.push(0xa3); // mov [moffs32], eax
        self.0.extend_from_slice(&addr.to_le_bytes());
        self
    }
    /// Unless eax == v, exit with debug-exit value 1 (status 1).
    fn expect(&mut self, v: u32) -> &mut Self {
        self.0.push(0x3d); // cmp eax, imm32
        self.0.extend_from_slice(&v.to_le_bytes());
        let fail = exit_code(1);
        self.0.extend_from_slice(&[0x74, fail.len() as u8]); // je over
        self.0.extend_from_slice(&fail);
        self
    }
    /// Spin until the dword at `addr` equals `v`.
    fn wait_for(&mut self, addr: u32, v: u32) -> &mut Self {
        self.load(addr);
        self.0.push(0x3d);
        self.0.extend_from_slice(&v.to_le_bytes());
        self.0.extend_from_slice(&[0x75, (-12i8) as u8]); // jne back to load
        self
    }
    fn pass(&mut self) -> Vec<u8> {
        self.0.extend_from_slice(&exit_code(0));
        self.0.clone()
    }
}

fn run_guest(name: &str, code: &[u8], extra: &[&str]) -> std::process::Output {
    let p = write_temp(name, &pvh_elf(code, true, 0));
    let mut args = vec!["run", "--firmware", path_str(&p), "--timeout", "30"];
    args.extend_from_slice(extra);
    faultline(&args)
}

#[test]
fn config_space_bar0_and_bar_move() {
    if !kvm_or_skip("config_space_bar0_and_bar_move") {
        return;
    }
    let code = Asm::default()
        .cfg_read(GPU_CFG)
        .expect(0x0001_fa17)
        .cfg_read(GPU_CFG | 0x10)
        .expect(BAR0 | 0x4) // assigned by the VMM, 64-bit memory BAR
        .cfg_read(GPU_CFG | 0x04)
        .expect(0x0010_0006) // cap list; memory decode + bus master on
        .load(BAR0)
        .expect(MAGIC)
        // Move BAR0: the old range stops decoding, the new one answers.
        .cfg_write(GPU_CFG | 0x10, 0xd000_0000)
        .load(0xd000_0000)
        .expect(MAGIC)
        .load(BAR0)
        .expect(u32::MAX)
        .pass();
    let o = run_guest("gpu-cfg.elf", &code, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn gpu_sizing_options_reach_the_guest() {
    if !kvm_or_skip("gpu_sizing_options_reach_the_guest") {
        return;
    }
    let code = Asm::default()
        .load(BAR0 + 0x0c) // NUM_CHANNELS
        .expect(3)
        .load(BAR0 + 0x78) // FAULT_BUF_MAX
        .expect(256)
        .load(BAR0 + 0x7c) // TLB_ENTRIES
        .expect(100)
        .load(BAR0 + 0xa8) // VRAM_SIZE_LO
        .expect(6 << 20)
        .load(BAR0 + 0xac) // VRAM_SIZE_HI
        .expect(0)
        .pass();
    let o = run_guest(
        "gpu-sizing.elf",
        &code,
        &[
            "--gpu-channels",
            "3",
            "--gpu-fault-entries",
            "256",
            "--gpu-tlb-entries",
            "100",
            "--gpu-vram",
            "6M",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn no_gpu_leaves_the_slot_empty() {
    if !kvm_or_skip("no_gpu_leaves_the_slot_empty") {
        return;
    }
    let code = Asm::default()
        .cfg_read(GPU_CFG)
        .expect(u32::MAX)
        .cfg_read(0x8000_0000)
        .expect(0x0008_1b36) // the host bridge is still there
        .pass();
    let o = run_guest("gpu-none.elf", &code, &["--no-gpu"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn control_doorbell_through_ioeventfd_reaches_the_worker() {
    if !kvm_or_skip("control_doorbell_through_ioeventfd_reaches_the_worker") {
        return;
    }
    // Guest RAM starts zeroed, so every ring and table is empty.
    let (sb, fault_buf, ctx, ctl) = (0x20_0000u32, 0x20_1000, 0x20_2000, 0x20_3000);
    let code = Asm::default()
        .store(BAR0 + 0x40, sb)
        .store(BAR0 + 0x48, fault_buf)
        .store(BAR0 + 0x50, 2)
        .store(BAR0 + 0x58, ctx)
        .store(BAR0 + 0x60, ctl)
        .store(BAR0 + 0x68, 2)
        .store(BAR0 + 0x18, 1) // ENABLE
        .load(BAR0 + 0x14)
        .expect(1) // STATUS.ENABLED, no error
        .store(ctl, 1) // INVALIDATE_ALL
        .store(sb + 0x44, 1) // ctl_prod
        .store(BAR0 + 0x2008, 0) // DB_CONTROL: an ioeventfd, no exit
        .wait_for(sb + 0x08, 1) // ctl_cons
        .load(ctl + 4)
        .expect(1) // entry status Ok
        .pass();
    let json = std::env::temp_dir().join(format!("faultline-gpu-{}.json", std::process::id()));
    let o = run_guest(
        "gpu-ctl.elf",
        &code,
        &["--stats", "--stats-json", path_str(&json)],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("GPU counters"), "{}", stderr(&o));
    let text = std::fs::read_to_string(&json).unwrap();
    let _ = std::fs::remove_file(&json);
    assert!(text.contains("\"invalidations\": 1"), "{text}");
}

/// Cost of a doorbell write (ioeventfd, no exit to us) against a plain BAR0
/// register write (an MMIO exit to the VMM), from the wall time of whole
/// runs. `cargo test -p faultline --release --test gpu_host -- --ignored
/// --nocapture`
#[test]
#[ignore = "benchmark; run explicitly"]
fn bench_doorbell_vs_mmio_exit() {
    if !kvm_or_skip("bench_doorbell_vs_mmio_exit") {
        return;
    }
    const N: u32 = 20_000;
    // mov eax, 0xf; mov ecx, n; 1: mov [addr], eax; dec ecx; jnz 1b
    let looped = |addr: u32, n: u32| {
        let mut a = Asm::default();
        a.mov_eax(0xf);
        a.0.push(0xb9);
        a.0.extend_from_slice(&n.to_le_bytes());
        a.0.push(0xa3);
        a.0.extend_from_slice(&addr.to_le_bytes());
        a.0.extend_from_slice(&[0x49, 0x75, (-8i8) as u8]);
        a.pass()
    };
    let time = |name: &str, code: Vec<u8>| {
        let t = std::time::Instant::now();
        let o = run_guest(name, &code, &[]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        t.elapsed().as_secs_f64()
    };
    let base = time("bench-0.elf", looped(BAR0 + 0x34, 1));
    let bell = time("bench-db.elf", looped(BAR0 + 0x2000, N)) - base;
    let mmio = time("bench-mmio.elf", looped(BAR0 + 0x34, N)) - base; // INT_ENABLE
    let us = |t: f64| t * 1e6 / f64::from(N);
    println!(
        "doorbell (ioeventfd): {:.2} us/write; register write (MMIO exit): {:.2} us/write",
        us(bell),
        us(mmio)
    );
}
