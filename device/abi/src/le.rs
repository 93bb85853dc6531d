//! Little-endian fields at byte offsets: the one reader of packed data,
//! shared by the guest-memory structures of this crate and by the hosts'
//! own wire formats (ELF headers, vfio-user messages).
//!
//! Every reader returns `None` when the buffer ends before the field, so a
//! truncated or hostile buffer is an error value, never a panic.

/// The `N` bytes at `at`, or `None` if `b` ends first.
pub fn array_at<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
    b.get(at..)?.first_chunk().copied()
}

/// The little-endian u16 at byte `at` of `b`.
pub fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    array_at(b, at).map(u16::from_le_bytes)
}

/// The little-endian u32 at byte `at` of `b`.
pub fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    array_at(b, at).map(u32::from_le_bytes)
}

/// The little-endian u64 at byte `at` of `b`.
pub fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    array_at(b, at).map(u64::from_le_bytes)
}

/// Field access for the fixed-size encodings below: offsets come from
/// `offset_of!` on the `#[repr(C)]` type whose size the buffer has, so they
/// are in bounds by construction and the fallbacks never apply.
pub(crate) fn field<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    array_at(b, at).unwrap_or([0; N])
}

pub(crate) fn set_field(b: &mut [u8], at: usize, v: &[u8]) {
    if let Some(dst) = b.get_mut(at..at + v.len()) {
        dst.copy_from_slice(v);
    }
}

/// `SIZE`, `to_le_bytes` and `from_le_bytes` for a `#[repr(C)]` structure
/// of integer fields, each field at its `offset_of!`: the struct definition
/// is the layout, and nothing else encodes it. Fields not listed (reserved
/// ones) are written as zero and read back as their `Default`.
macro_rules! le_struct {
    ($ty:ident { $($field:ident: $fty:ty),+ $(,)? }) => {
        impl $ty {
            /// Bytes the structure occupies in guest memory.
            pub const SIZE: usize = core::mem::size_of::<$ty>();

            /// The guest-memory encoding.
            pub fn to_le_bytes(&self) -> [u8; Self::SIZE] {
                let mut b = [0u8; Self::SIZE];
                $(
                    $crate::le::set_field(
                        &mut b,
                        core::mem::offset_of!($ty, $field),
                        &self.$field.to_le_bytes(),
                    );
                )+
                b
            }

            /// Decodes the guest-memory encoding (layout only: field values
            /// are not checked).
            // The update fills reserved fields; structures without any need
            // none.
            #[allow(clippy::needless_update)]
            pub fn from_le_bytes(b: &[u8; Self::SIZE]) -> Self {
                Self {
                    $(
                        $field: <$fty>::from_le_bytes($crate::le::field(
                            b,
                            core::mem::offset_of!($ty, $field),
                        )),
                    )+
                    ..Self::default()
                }
            }
        }
    };
}
pub(crate) use le_struct;

/// A `#[repr(u32)]` code (a status, an error, an opcode) with a fallible
/// `from_u32` and the list of its values, generated from one variant list
/// so that adding a value cannot miss the decoder.
macro_rules! code_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $value:expr ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[repr(u32)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant = $value ),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            /// Number of values.
            pub const COUNT: usize = Self::ALL.len();

            /// The value encoded as `v`, if any.
            pub const fn from_u32(v: u32) -> Option<Self> {
                $( if v == $value { return Some(Self::$variant); } )+
                None
            }
        }

        impl From<$name> for u32 {
            fn from(v: $name) -> u32 {
                v as u32
            }
        }
    };
}
pub(crate) use code_enum;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_stop_at_the_end() {
        let b = [1, 2, 3, 4, 5, 6, 7, 8, 9];
        assert_eq!(u16_at(&b, 0), Some(0x0201));
        assert_eq!(u32_at(&b, 1), Some(0x0504_0302));
        assert_eq!(u64_at(&b, 1), Some(0x0908_0706_0504_0302));
        assert_eq!(u64_at(&b, 2), None);
        assert_eq!(u32_at(&b, 6), None);
        assert_eq!(u16_at(&b, usize::MAX), None);
        assert_eq!(array_at::<0>(&b, 9), Some([]));
    }
}
