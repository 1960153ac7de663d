//! CRC-32C (Castagnoli, the `crc` crate's `CRC_32_ISCSI`) for the simulator's container: the
//! SSE4.2 `crc32` instruction when the CPU has it (detected once by `std`), the `crc` crate's
//! table otherwise. Both give the same values (tested below). Incremental: [`Crc32c::update`].
//!
//! From [`LONG`] bytes on (a chunk of up to 64 KiB; a `LibBuf`'s 32-byte header, and the 64-byte
//! payloads of the benches, stay below), the hardware path runs three independent `crc32` chains,
//! one per [`BLOCK`]-byte block of each group of three, and folds them into the running register
//! with a compile-time shift table: the instruction's 3-cycle latency is hidden, not paid per
//! word. The same scheme as the driver's `vmbsrv::hwcrc`, which this crate cannot depend on. The
//! `crc32c` crate from crates.io does a similar thing; it was measured and not taken: 2–4× slower
//! than the single chain at 32–256 bytes, where most of this module's calls are, and 1.6× slower
//! than this code at 64 KiB (docs/performance.md §4.1).

const TABLE: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// A running CRC-32C.
#[derive(Clone, Copy)]
pub(crate) struct Crc32c {
    /// The register before the final inversion (initial value `!0`).
    state: u32,
}

impl Crc32c {
    /// A fresh digest.
    pub(crate) fn new() -> Crc32c {
        Crc32c { state: !0 }
    }

    /// Feeds `bytes`.
    pub(crate) fn update(&mut self, bytes: &[u8]) {
        self.state = update(self.state, bytes);
    }

    /// The checksum of everything fed.
    pub(crate) fn finish(self) -> u32 {
        !self.state
    }
}

/// CRC-32C of `bytes`.
pub(crate) fn checksum(bytes: &[u8]) -> u32 {
    let mut digest = Crc32c::new();
    digest.update(bytes);
    digest.finish()
}

/// The block length of the three-chain path (a group is three blocks).
const BLOCK: usize = 256;

/// Inputs of at least this many bytes (one group) take the three-chain path.
const LONG: usize = 3 * BLOCK;

#[cfg(target_arch = "x86_64")]
fn update(state: u32, bytes: &[u8]) -> u32 {
    if std::is_x86_feature_detected!("sse4.2") {
        // SAFETY: `hw_update` only needs SSE4.2, which the CPU was just checked to support.
        unsafe { hw_update(state, bytes) }
    } else {
        table_update(state, bytes)
    }
}

/// Multiplication by x^(8·[`BLOCK`]) modulo the polynomial, i.e. [`BLOCK`] zero bytes fed to a
/// (reflected) CRC register: GF(2) arithmetic evaluated at compile time.
mod shift {
    /// CRC-32C's polynomial, reflected: bit 31 is the coefficient of x^0.
    const POLY: u32 = 0x82F6_3B78;

    /// `reg` × x modulo the polynomial: one zero bit fed.
    const fn times_x(reg: u32) -> u32 {
        if reg & 1 != 0 {
            (reg >> 1) ^ POLY
        } else {
            reg >> 1
        }
    }

    /// `a` × `b` modulo the polynomial.
    const fn multiply(a: u32, mut b: u32) -> u32 {
        let mut product = 0;
        let mut bit = 0;
        while bit < 32 {
            if a & (1 << (31 - bit)) != 0 {
                product ^= b;
            }
            b = times_x(b);
            bit += 1;
        }
        product
    }

    /// x^(8 × `bytes`) modulo the polynomial (square and multiply).
    const fn x_to_the_bits_of(bytes: usize) -> u32 {
        let mut result = 1 << 31;
        let mut power = 1 << 30;
        let mut exponent = bytes * 8;
        while exponent != 0 {
            if exponent & 1 != 0 {
                result = multiply(result, power);
            }
            power = multiply(power, power);
            exponent >>= 1;
        }
        result
    }

    /// `TABLE[k][b]` = (b << 8k) × x^(8·BLOCK): linear, so a register's image is the XOR of its
    /// four bytes' images.
    static TABLE: [[u32; 256]; 4] = {
        let factor = x_to_the_bits_of(super::BLOCK);
        let mut table = [[0; 256]; 4];
        let mut k = 0;
        while k < 4 {
            let mut b = 0;
            while b < 256 {
                table[k][b] = multiply(factor, (b as u32) << (8 * k));
                b += 1;
            }
            k += 1;
        }
        table
    };

    /// The register `reg` after `BLOCK` zero bytes.
    #[inline(always)]
    pub(super) fn block(reg: u32) -> u32 {
        let [b0, b1, b2, b3] = reg.to_le_bytes();
        let [t0, t1, t2, t3] = &TABLE;
        t0[usize::from(b0)] ^ t1[usize::from(b1)] ^ t2[usize::from(b2)] ^ t3[usize::from(b3)]
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn update(state: u32, bytes: &[u8]) -> u32 {
    table_update(state, bytes)
}

/// The register update with the `crc` crate's table (no SIMD, any CPU).
fn table_update(state: u32, bytes: &[u8]) -> u32 {
    // The crate bit-reverses a custom initial value of a reflected algorithm and inverts the
    // result (`xorout`): undo both to run the raw register update from `state`.
    let mut digest = TABLE.digest_with_initial(state.reverse_bits());
    digest.update(bytes);
    !digest.finalize()
}

/// The register after `bytes` with the `crc32` instruction: one chain under [`LONG`] bytes,
/// three from there on.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
fn hw_update(state: u32, bytes: &[u8]) -> u32 {
    if bytes.len() < LONG {
        hw_serial(state, bytes)
    } else {
        hw_long(state, bytes)
    }
}

/// Three chains: each group of three [`BLOCK`]-byte blocks is checksummed block by block from a
/// zero register, interleaved, and folded into the running register
/// (`reg(s, A‖B) = reg(s, A) · x^(8|B|) ⊕ reg(0, B)`); what follows the last group goes through
/// [`hw_serial`]. The chains do not depend on the running register, so the fold overlaps the
/// next group.
#[cfg(target_arch = "x86_64")]
#[inline(never)]
#[target_feature(enable = "sse4.2")]
fn hw_long(mut state: u32, bytes: &[u8]) -> u32 {
    use core::arch::x86_64::_mm_crc32_u64;
    let (blocks, rest) = bytes.as_chunks::<BLOCK>();
    let (groups, rest_blocks) = blocks.as_chunks::<3>();
    for [a, b, c] in groups {
        // `BLOCK` is a multiple of 8: no remainder.
        let (a, _) = a.as_chunks::<8>();
        let (b, _) = b.as_chunks::<8>();
        let (c, _) = c.as_chunks::<8>();
        let (mut crc_a, mut crc_b, mut crc_c) = (0u64, 0u64, 0u64);
        for ((a, b), c) in a.iter().zip(b).zip(c) {
            crc_a = _mm_crc32_u64(crc_a, u64::from_le_bytes(*a));
            crc_b = _mm_crc32_u64(crc_b, u64::from_le_bytes(*b));
            crc_c = _mm_crc32_u64(crc_c, u64::from_le_bytes(*c));
        }
        state = shift::block(state) ^ crc_a as u32;
        state = shift::block(state) ^ crc_b as u32;
        state = shift::block(state) ^ crc_c as u32;
    }
    hw_serial(hw_serial(state, rest_blocks.as_flattened()), rest)
}

/// One chain of `crc32` instructions, 8 bytes each.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
fn hw_serial(state: u32, bytes: &[u8]) -> u32 {
    use core::arch::x86_64::{_mm_crc32_u8, _mm_crc32_u64};
    let mut crc = u64::from(state);
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        let mut le = [0u8; 8];
        le.copy_from_slice(word);
        crc = _mm_crc32_u64(crc, u64::from_le_bytes(le));
    }
    let mut crc = crc as u32;
    for &byte in words.remainder() {
        crc = _mm_crc32_u8(crc, byte);
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixed pseudo-random byte stream (xorshift64).
    fn random_bytes(len: usize, mut state: u64) -> std::vec::Vec<u8> {
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect()
    }

    /// `bytes` checksummed at once, and in two parts split at `split`, against the `crc` crate.
    fn check(bytes: &[u8], splits: &[usize]) {
        let expected = TABLE.checksum(bytes);
        let len = bytes.len();
        assert_eq!(checksum(bytes), expected, "length {len}");
        assert_eq!(!table_update(!0, bytes), expected, "table, length {len}");
        for &split in splits.iter().filter(|&&split| split <= len) {
            let mut digest = Crc32c::new();
            digest.update(&bytes[..split]);
            digest.update(&bytes[split..]);
            assert_eq!(digest.finish(), expected, "split {split} of {len}");
        }
    }

    #[test]
    fn matches_the_crc_crate_on_every_length_and_split() {
        // Every length to 2,100 (under `LONG`, one or two groups, 0–2 leftover blocks, every
        // tail), split in a word, at a block or group edge, in the middle and near the end. Miri
        // (the table only, as `is_x86_feature_detected!` says no there) takes every 101st length.
        assert_eq!(checksum(b"123456789"), 0xE306_9283);
        let data = random_bytes(2_100 + 3, 0x2545_F491_4F6C_DD1D);
        for len in (0..=2_100).step_by(if cfg!(miri) { 101 } else { 1 }) {
            for offset in [0, 3] {
                let splits = [len / 3, 5, BLOCK, LONG + 1, len / 2, len.saturating_sub(9)];
                check(&data[offset..offset + len], &splits);
            }
        }
    }

    #[test]
    fn matches_the_crc_crate_around_every_group_boundary_up_to_64_kib() {
        // Whole groups plus 0–2 blocks, ± a few bytes, and a 64 KiB chunk; Miri: one group.
        let groups: &[usize] = if cfg!(miri) {
            &[1]
        } else {
            &[1, 2, 3, 4, 84, 85, 86]
        };
        let data = random_bytes(87 * LONG, 0x9E37_79B9_7F4A_7C15);
        let mut lengths: std::vec::Vec<usize> = groups
            .iter()
            .flat_map(|group| (0..3).map(move |blocks| group * LONG + blocks * BLOCK))
            .flat_map(|base| [base - 9, base - 1, base, base + 1, base + 8, base + 9])
            .collect();
        if !cfg!(miri) {
            lengths.extend([65_532, 65_536]);
        }
        for len in lengths {
            check(
                &data[1..1 + len],
                &[LONG, len / 2, len.saturating_sub(LONG)],
            );
        }
    }

    #[test]
    fn shift_table_feeds_block_zero_bytes() {
        // The 32 single-bit registers (the operator's basis) and random ones, against the `crc`
        // crate fed `BLOCK` zero bytes.
        let zeros = [0u8; BLOCK];
        let mut state = 0x0DDB_1A5E_5BAD_5EED_u64;
        let random = (0..64).map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 16) as u32
        });
        for reg in (0..32).map(|bit| 1u32 << bit).chain(random).chain([0, !0]) {
            assert_eq!(shift::block(reg), table_update(reg, &zeros), "{reg:#010x}");
        }
    }

    /// Review: `Crc32c::update` fed many pieces of random size (some straddling `LONG`, some
    /// whole groups, some empty), at odd offsets, up to 1 MiB, against the `crc` crate.
    #[test]
    #[cfg_attr(miri, ignore)]
    fn review_pieces_straddling_long() {
        let data = random_bytes((1 << 20) + 8, 0xFEED_FACE_0BAD_F00D);
        let mut state = 0x0F1E_2D3C_4B5A_6978_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..60 {
            let total = if round == 0 {
                1 << 20
            } else {
                (next() % 150_000) as usize
            };
            let offset = round % 8;
            let bytes = &data[offset..offset + total];
            let expected = TABLE.checksum(bytes);
            assert_eq!(checksum(bytes), expected);
            let mut digest = Crc32c::new();
            let mut at = 0;
            while at < total {
                let piece = match next() % 4 {
                    0 => LONG - 1 + (next() % 3) as usize,
                    1 => LONG * (1 + (next() % 5) as usize) + (next() % 2) as usize,
                    2 => (next() % 16) as usize,
                    _ => (next() % 5_000) as usize,
                }
                .min(total - at);
                digest.update(&bytes[at..at + piece]);
                at += piece;
            }
            assert_eq!(digest.finish(), expected, "round {round}, {total} bytes");
        }
    }
}
