//! Port I/O helpers. Thin wrappers so callers read like the datasheets.

use x86_64::instructions::port::Port;

/// # Safety
/// Writing an I/O port has device side effects; the caller owns that device.
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: forwarded to the caller's contract.
    unsafe { Port::<u8>::new(port).write(value) }
}

/// # Safety
/// Reading an I/O port can have device side effects; the caller owns that device.
pub unsafe fn inb(port: u16) -> u8 {
    // SAFETY: forwarded to the caller's contract.
    unsafe { Port::<u8>::new(port).read() }
}

/// # Safety
/// As for [`inb`].
pub unsafe fn inl(port: u16) -> u32 {
    // SAFETY: forwarded to the caller's contract.
    unsafe { Port::<u32>::new(port).read() }
}

/// # Safety
/// As for [`outb`].
pub unsafe fn outl(port: u16, value: u32) {
    // SAFETY: forwarded to the caller's contract.
    unsafe { Port::<u32>::new(port).write(value) }
}
