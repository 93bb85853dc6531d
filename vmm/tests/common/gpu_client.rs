//! A vfio-user client that plays a buggy driver against `faultline serve`:
//! it maps a page for the GPU that the CPU page table it names does not
//! map, so one FILL breaks the coherence rule (`--gpu-check`).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use faultline_abi::{
    doorbell, regs, virtq, Command, ContextEntry, ContextFlags, CpuRoot, Pte, COMMAND_SIZE,
};

const BAR0: u32 = 0;
const RAM: u64 = 1 << 20;
const SB: u64 = 0x1000;
const FAULT_BUF: u64 = 0x2000;
const CTX_TABLE: u64 = 0x3000;
const CTL_RING: u64 = 0x4000;
const QUEUE: u64 = 0x10000;
const QUEUE_SIZE: u16 = 4;
const CMD: u64 = 0x20000;
const COMPLETION: u64 = 0x20040;
/// Device page table: four levels mapping VA 0 to DATA.
const DEV_PT: u64 = 0x30000;
const DATA: u64 = 0x40000;
/// The CPU's PML4: empty, so the CPU maps nothing.
const CPU_PML4: u64 = 0x50000;

fn client(sock: &Path) -> vfio_user::Client {
    let t0 = Instant::now();
    loop {
        match vfio_user::Client::new(sock) {
            Ok(c) => return c,
            Err(_) if t0.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("vfio-user client on {}: {e:?}", sock.display()),
        }
    }
}

/// Runs one FILL of VA 0 that the device maps and the CPU does not, then
/// disconnects. Returns the command's completion status.
pub fn coherence_violation_session(sock: &Path) -> u32 {
    let mut c = client(sock);
    // SAFETY: a NUL-terminated name; the result is checked.
    let fd =
        unsafe { libc::memfd_create(c"faultline-check-ram".as_ptr(), libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: memfd_create just returned this descriptor to us.
    let ram = unsafe { File::from_raw_fd(fd) };
    ram.set_len(RAM).unwrap();
    c.dma_map(0, 0, RAM, ram.as_raw_fd()).unwrap();
    let put = |gpa: u64, b: &[u8]| ram.write_all_at(b, gpa).unwrap();
    let wr = |c: &mut vfio_user::Client, off: u64, v: u32| {
        c.region_write(BAR0, off, &v.to_le_bytes()).unwrap()
    };

    for level in 0..3u64 {
        let next = DEV_PT + (level + 1) * 0x1000;
        put(
            DEV_PT + level * 0x1000,
            &Pte::table(next).bits().to_le_bytes(),
        );
    }
    let leaf = Pte::leaf(DATA, 1, Pte::WRITE).bits();
    put(DEV_PT + 3 * 0x1000, &leaf.to_le_bytes());
    let ctx = ContextEntry {
        root: DEV_PT,
        flags: ContextFlags::VALID.bits(),
        cpu_root: CpuRoot::x86_64(CPU_PML4).unwrap().0,
    };
    put(CTX_TABLE, &ctx.to_le_bytes());

    let cmd = Command::Fill {
        dst: 0,
        len: 8,
        pattern: 1,
    };
    put(CMD, &cmd.to_le_bytes());
    put(COMPLETION, &[0xff; 16]);
    let descs = [
        virtq::Descriptor {
            addr: CMD,
            len: COMMAND_SIZE as u32,
            flags: virtq::DESC_F_NEXT,
            next: 1,
        },
        virtq::Descriptor {
            addr: COMPLETION,
            len: 16,
            flags: virtq::DESC_F_WRITE,
            next: 0,
        },
    ];
    for (i, d) in descs.iter().enumerate() {
        put(
            QUEUE + (i * virtq::Descriptor::SIZE) as u64,
            &d.to_le_bytes(),
        );
    }
    let avail = QUEUE + 0x100;
    let used = QUEUE + 0x200;
    put(avail + virtq::avail_entry(0) as u64, &0u16.to_le_bytes());
    put(avail + virtq::RING_IDX as u64, &1u16.to_le_bytes());

    wr(&mut c, regs::STATUS_BLOCK_LO, SB as u32);
    wr(&mut c, regs::FAULT_BUF_LO, FAULT_BUF as u32);
    wr(&mut c, regs::FAULT_BUF_ENTRIES, 16);
    wr(&mut c, regs::CTX_TABLE_LO, CTX_TABLE as u32);
    wr(&mut c, regs::CTL_RING_LO, CTL_RING as u32);
    wr(&mut c, regs::CTL_RING_ENTRIES, 8);
    wr(&mut c, regs::ENABLE, 1);
    let ch = |r| regs::channel_reg(0, r);
    wr(&mut c, ch(regs::CH_QUEUE_SIZE), QUEUE_SIZE.into());
    wr(&mut c, ch(regs::CH_DESC_LO), QUEUE as u32);
    wr(&mut c, ch(regs::CH_AVAIL_LO), avail as u32);
    wr(&mut c, ch(regs::CH_USED_LO), used as u32);
    wr(&mut c, ch(regs::CH_CONTEXT), 0);
    wr(&mut c, ch(regs::CH_ENABLE), 1);
    wr(&mut c, doorbell::offset(doorbell::channel(0)), 0);

    let t0 = Instant::now();
    let status = loop {
        let mut b = [0u8; 4];
        ram.read_exact_at(&mut b, COMPLETION).unwrap();
        let s = u32::from_le_bytes(b);
        if s != u32::MAX {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "FILL never completed"
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    drop(c);
    status
}
