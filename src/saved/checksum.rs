//! CRC32C (Castagnoli), the one checksum every saved-state structure uses.
//!
//! Kept behind a single function so that a hardware path (SSE4.2 `crc32`, ARMv8 `crc32c*`) can
//! replace the table without touching any caller. The table variant is portable, needs no CPU
//! feature detection and no FP/SIMD state, which is what a kernel driver wants by default.

use crc::{CRC_32_ISCSI, Crc, Table};

// `static`, not `const`: a `const` would let every use site materialize its own 16 KiB table.
static CASTAGNOLI: Crc<u32, Table<16>> = Crc::<u32, Table<16>>::new(&CRC_32_ISCSI);

/// CRC32C (Castagnoli polynomial `0x1EDC6F41`, reflected, init and final XOR `0xFFFF_FFFF`) of
/// `bytes`, as used by iSCSI, ext4 and SSE4.2 `crc32`.
///
/// `crc32c(b"123456789") == 0xE306_9283`.
#[inline]
pub fn crc32c(bytes: &[u8]) -> u32 {
    CASTAGNOLI.checksum(bytes)
}

#[cfg(test)]
mod tests {
    use super::crc32c;

    #[test]
    fn catalog_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn empty_input() {
        assert_eq!(crc32c(&[]), 0);
    }

    #[test]
    fn zeros_do_not_checksum_to_zero() {
        // A zero-filled region must never look like a valid checksummed structure.
        assert_ne!(crc32c(&[0; 56]), 0);
    }
}
