//! Linux error codes, the subset the mirror layer returns.
//!
//! A hand-written `Display` keeps the crate free of proc-macro dependencies in
//! the firmware build; the numeric values are Linux's so that a reader (and a
//! log line) can match them against kernel code that returns `-EFAULT` & co.

use core::fmt;

/// A Linux errno. `as_neg()` gives the kernel-style negative return value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum Errno {
    /// Operation not permitted: no read permission, or a write request on a
    /// mapping that can never become writable.
    EPERM = 1,
    /// Try again: the range was invalidated (or a non-blockable invalidation
    /// could not proceed).
    EAGAIN = 11,
    /// Out of memory while faulting.
    ENOMEM = 12,
    /// Bad address: a hole, a special mapping, a failed fault, or an address
    /// space that is already dying.
    EFAULT = 14,
    /// Busy: a fault would have to block and the caller said it may not.
    /// Also returned when registering a range that is already registered.
    EBUSY = 16,
    /// Invalid argument: misaligned/empty range, unsupported page size, an
    /// unregistered range, or a lock guard for the wrong address space.
    EINVAL = 22,
}

impl Errno {
    /// The kernel-style negative value (`-EFAULT` is -14).
    pub const fn as_neg(self) -> i32 {
        -(self as i32)
    }

    /// The symbolic name, as in `<errno.h>`.
    pub const fn name(self) -> &'static str {
        match self {
            Errno::EPERM => "EPERM",
            Errno::EAGAIN => "EAGAIN",
            Errno::ENOMEM => "ENOMEM",
            Errno::EFAULT => "EFAULT",
            Errno::EBUSY => "EBUSY",
            Errno::EINVAL => "EINVAL",
        }
    }

    const fn description(self) -> &'static str {
        match self {
            Errno::EPERM => "operation not permitted",
            Errno::EAGAIN => "try again",
            Errno::ENOMEM => "out of memory",
            Errno::EFAULT => "bad address",
            Errno::EBUSY => "device or resource busy",
            Errno::EINVAL => "invalid argument",
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.description())
    }
}

impl core::error::Error for Errno {}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn errno_values_match_linux() {
        assert_eq!(Errno::EPERM.as_neg(), -1);
        assert_eq!(Errno::EAGAIN.as_neg(), -11);
        assert_eq!(Errno::ENOMEM.as_neg(), -12);
        assert_eq!(Errno::EFAULT.as_neg(), -14);
        assert_eq!(Errno::EBUSY.as_neg(), -16);
        assert_eq!(Errno::EINVAL.as_neg(), -22);
    }

    #[test]
    fn errno_display_names_the_code() {
        assert_eq!(Errno::EFAULT.to_string(), "EFAULT (bad address)");
    }
}
