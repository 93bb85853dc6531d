//! Leaving the VM with a status, QEMU isa-debug-exit style: writing `v` to
//! port 0xf4 ends QEMU with status `(v << 1) | 1`. Our VMM uses the same port
//! and meaning, so one image reports pass/fail on both.

const EXIT_PORT: u16 = 0xf4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ExitCode {
    /// Every selected test passed (QEMU status 1).
    Success = 0,
    /// At least one test failed (QEMU status 3).
    TestsFailed = 1,
    /// Panic, unexpected exception or fatal boot error (QEMU status 5).
    Fatal = 2,
}

pub fn exit(code: ExitCode) -> ! {
    x86_64::instructions::interrupts::disable();
    // SAFETY: port 0xf4 is the exit device by contract with the hypervisor;
    // the write has no effect on our memory.
    unsafe { super::port::outl(EXIT_PORT, code as u32) };
    // Without an exit device (or if the write is ignored) park the CPU. With
    // interrupts off only an NMI can wake us, and we go straight back.
    loop {
        x86_64::instructions::hlt();
    }
}
