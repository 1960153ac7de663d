//! CRC32C (Castagnoli), the one checksum every saved-state structure uses.
//!
//! Kept behind a single function so callers never see which implementation ran. The CPU's CRC32C
//! instruction is used when [`crate::hwcrc`] finds one (SSE4.2 `crc32` on x86-64, detected once
//! with CPUID; ARMv8 `crc32c*` on aarch64 builds with the `crc` feature); otherwise a
//! slicing-by-16 table, which is portable and needs no CPU feature at all. Both use
//! general-purpose registers only, so neither touches FP/SIMD state in the kernel. They are
//! tested against each other and against the catalog check values below; docs/performance.md has
//! the measurements behind the choice.

use crc::{CRC_32_ISCSI, Crc, Table};

// `static`, not `const`: a `const` would let every use site materialize its own 16 KiB table.
static CASTAGNOLI: Crc<u32, Table<16>> = Crc::<u32, Table<16>>::new(&CRC_32_ISCSI);

/// CRC32C (Castagnoli polynomial `0x1EDC6F41`, reflected, init and final XOR `0xFFFF_FFFF`) of
/// `bytes`, as used by iSCSI, ext4 and SSE4.2 `crc32`.
///
/// `crc32c(b"123456789") == 0xE306_9283`.
#[inline]
pub fn crc32c(bytes: &[u8]) -> u32 {
    match crate::hwcrc::crc32c(bytes) {
        Some(crc) => crc,
        None => table_crc32c(bytes),
    }
}

/// [`crc32c`] of the little-endian bytes of `words`: the fixed-size form the records' hot paths
/// use (the bytes are built as, or loaded into, words; no length dispatch).
#[inline]
pub(crate) fn crc32c_words<const N: usize>(words: &[u64; N]) -> u32 {
    match crate::hwcrc::crc32c_words(words) {
        Some(crc) => crc,
        None => table_crc32c_words(words, None),
    }
}

/// [`crc32c`] of the little-endian bytes of `words` followed by those of `tail`.
#[inline]
pub(crate) fn crc32c_words_u32<const N: usize>(words: &[u64; N], tail: u32) -> u32 {
    match crate::hwcrc::crc32c_words_u32(words, tail) {
        Some(crc) => crc,
        None => table_crc32c_words(words, Some(tail)),
    }
}

/// The finished CRC32C of `words` (then `tail` if `TAIL`) as one encoder computes it: generic,
/// so that the same encoder is compiled once inside [`crate::hwcrc::with_hw`] (the `crc32`
/// instructions inlined among its stores) and once with the table.
pub(crate) trait WordsCrc: Copy {
    fn words<const N: usize, const TAIL: bool>(self, words: &[u64; N], tail: u32) -> u32;
}

impl WordsCrc for crate::hwcrc::Hw {
    #[inline(always)]
    fn words<const N: usize, const TAIL: bool>(self, words: &[u64; N], tail: u32) -> u32 {
        self.crc32c_words::<N, TAIL>(words, tail)
    }
}

/// The portable table, for CPUs and builds without the instruction.
#[derive(Clone, Copy)]
pub(crate) struct TableCrc;

impl WordsCrc for TableCrc {
    #[inline]
    fn words<const N: usize, const TAIL: bool>(self, words: &[u64; N], tail: u32) -> u32 {
        table_crc32c_words(words, TAIL.then_some(tail))
    }
}

/// [`crc32c`] of a fixed-size array, checksummed where it lies: the decoders' form.
#[inline]
pub(crate) fn crc32c_array<const N: usize>(bytes: &[u8; N]) -> u32 {
    match crate::hwcrc::crc32c_array(bytes) {
        Some(crc) => crc,
        None => table_crc32c(bytes),
    }
}

/// The portable fallback: the `crc` crate's slicing-by-16 table.
fn table_crc32c(bytes: &[u8]) -> u32 {
    CASTAGNOLI.checksum(bytes)
}

/// The table fallback of the word entry points (out of line: the hardware is the common case).
#[inline(never)]
fn table_crc32c_words(words: &[u64], tail: Option<u32>) -> u32 {
    let mut digest = CASTAGNOLI.digest();
    for word in words {
        digest.update(&word.to_le_bytes());
    }
    if let Some(tail) = tail {
        digest.update(&tail.to_le_bytes());
    }
    digest.finalize()
}

#[cfg(test)]
pub(super) mod tests {
    use super::{crc32c, crc32c_words, crc32c_words_u32, table_crc32c, table_crc32c_words};

    /// Bit-at-a-time reference: the definition, with nothing to get wrong but the polynomial.
    /// Shares no code with `checksum` or `hwcrc` (the delivery decoder's oracle uses it too).
    pub(in crate::saved) fn bitwise(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &byte in bytes {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0x82F6_3B78
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    /// Known CRC32C values: the catalog check value, RFC 3720 (iSCSI) B.4 vectors, and a few
    /// classic ones.
    const VECTORS: &[(&[u8], u32)] = &[
        (b"", 0),
        (b"a", 0xC1D0_4330),
        (b"abc", 0x364B_3FB7),
        (b"123456789", 0xE306_9283),
        (b"The quick brown fox jumps over the lazy dog", 0x2262_0404),
        (&[0x00; 32], 0x8A91_36AA),
        (&[0xFF; 32], 0x62A8_AB43),
    ];

    fn ascending() -> [u8; 32] {
        core::array::from_fn(|i| i as u8)
    }

    fn descending() -> [u8; 32] {
        core::array::from_fn(|i| 31 - i as u8)
    }

    #[test]
    fn catalog_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn known_vectors_on_every_path() {
        let rfc3720 = [(ascending(), 0x46DD_794E_u32), (descending(), 0x113F_DB5C)];
        let all = VECTORS
            .iter()
            .copied()
            .chain(rfc3720.iter().map(|(data, crc)| (&data[..], *crc)));
        for (data, expected) in all {
            assert_eq!(bitwise(data), expected, "bitwise, {} bytes", data.len());
            assert_eq!(table_crc32c(data), expected, "table, {} bytes", data.len());
            assert_eq!(crc32c(data), expected, "dispatch, {} bytes", data.len());
            if let Some(hw) = crate::hwcrc::crc32c(data) {
                assert_eq!(hw, expected, "hardware, {} bytes", data.len());
            }
        }
    }

    #[test]
    fn hardware_and_table_agree_on_every_length_and_alignment() {
        // Lengths 0..=300 cover every tail length after the 8-byte words, and every offset 0..8
        // every alignment of the words; the content is a fixed pseudo-random stream.
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        let data: [u8; 320] = core::array::from_fn(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        });
        for offset in 0..8 {
            for len in 0..=300 {
                let slice = &data[offset..offset + len];
                let table = table_crc32c(slice);
                assert_eq!(crc32c(slice), table, "offset {offset}, {len} bytes");
                if let Some(hw) = crate::hwcrc::crc32c(slice) {
                    assert_eq!(hw, table, "offset {offset}, {len} bytes");
                }
                if len <= 64 {
                    assert_eq!(bitwise(slice), table, "offset {offset}, {len} bytes");
                }
            }
        }
    }

    #[test]
    fn long_inputs_agree_with_the_table_and_bitwise_on_every_length() {
        // Lengths 0..=2,100 cross `hwcrc::LONG` (768) and the group size twice, with every
        // tail and 0–2 leftover blocks; random content at two alignments.
        let mut state = 0xC3A5_C85C_97CB_3127_u64;
        let data: std::vec::Vec<u8> = (0..2_100 + 5)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 32) as u8
            })
            .collect();
        // Miri (the table only: no hardware there) takes every 211th length.
        for len in (0..=2_100).step_by(if cfg!(miri) { 211 } else { 1 }) {
            for offset in [0, 5] {
                let slice = &data[offset..offset + len];
                let table = table_crc32c(slice);
                assert_eq!(crc32c(slice), table, "offset {offset}, {len} bytes");
                if let Some(hw) = crate::hwcrc::crc32c(slice) {
                    assert_eq!(hw, table, "hardware, offset {offset}, {len} bytes");
                }
                if offset == 0 {
                    assert_eq!(bitwise(slice), table, "bitwise, {len} bytes");
                }
            }
        }
    }

    #[test]
    fn long_inputs_agree_around_every_block_boundary_up_to_64_kib() {
        use crate::hwcrc::{BLOCK, LONG};
        // Miri (the table only) takes the first group, without the bitwise oracle.
        let (groups, data_len): (&[usize], usize) = if cfg!(miri) {
            (&[1], 2 * LONG)
        } else {
            (&[1, 2, 3, 4, 5, 6, 84, 85, 86], 87 * LONG)
        };
        let mut state = 0x6A09_E667_F3BC_C908_u64;
        let data: std::vec::Vec<u8> = (0..data_len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as u8
            })
            .collect();
        // Whole groups of three blocks, plus 0, 1 or 2 blocks, each ± a few bytes; 64 KiB.
        let mut lengths: std::vec::Vec<usize> = groups
            .iter()
            .flat_map(|group| (0..3).map(move |blocks| group * LONG + blocks * BLOCK))
            .flat_map(|base| {
                [
                    base - 9,
                    base - 8,
                    base - 1,
                    base,
                    base + 1,
                    base + 8,
                    base + 9,
                ]
            })
            .collect();
        if !cfg!(miri) {
            lengths.extend([65_532, 65_536, 65_540]);
        }
        for len in lengths {
            let slice = &data[3..3 + len];
            let table = table_crc32c(slice);
            assert_eq!(crc32c(slice), table, "{len} bytes");
            if let Some(hw) = crate::hwcrc::crc32c(slice) {
                assert_eq!(hw, table, "hardware, {len} bytes");
            }
            if !cfg!(miri) {
                assert_eq!(bitwise(slice), table, "bitwise, {len} bytes");
            }
        }
    }

    #[test]
    fn word_forms_agree_with_the_byte_form_on_both_paths() {
        let mut state = 0x0123_4567_89AB_CDEF_u64;
        let words: [u64; 11] = core::array::from_fn(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        });
        let tail = 0xDEAD_BEEF_u32;
        let mut bytes = [0u8; 92];
        for (chunk, word) in bytes.chunks_exact_mut(8).zip(words) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        bytes[88..].copy_from_slice(&tail.to_le_bytes());
        for n in 0..=11 {
            let slice = &words[..n];
            let plain = table_crc32c(&bytes[..8 * n]);
            let mut tailed = [0u8; 92];
            tailed[..8 * n].copy_from_slice(&bytes[..8 * n]);
            tailed[8 * n..8 * n + 4].copy_from_slice(&tail.to_le_bytes());
            let tailed = table_crc32c(&tailed[..8 * n + 4]);
            assert_eq!(table_crc32c_words(slice, None), plain, "{n} words");
            assert_eq!(
                table_crc32c_words(slice, Some(tail)),
                tailed,
                "{n} words + tail"
            );
        }
        let six: &[u64; 6] = words.first_chunk().unwrap();
        assert_eq!(crc32c_words(six), crc32c(&bytes[..48]));
        let forty_eight: &[u8; 48] = bytes.first_chunk().unwrap();
        assert_eq!(super::crc32c_array(forty_eight), crc32c(&bytes[..48]));
        let seven: &[u64; 7] = words.first_chunk().unwrap();
        let mut tailed = [0u8; 60];
        tailed[..56].copy_from_slice(&bytes[..56]);
        tailed[56..].copy_from_slice(&tail.to_le_bytes());
        assert_eq!(crc32c_words_u32(seven, tail), crc32c(&tailed));
        assert_eq!(crc32c_words(&words), crc32c(&bytes[..88]));
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
