//! CRC-32C (Castagnoli, the `crc` crate's `CRC_32_ISCSI`) for the simulator's container: the
//! SSE4.2 `crc32` instruction when the CPU has it (detected once by `std`), the `crc` crate's
//! table otherwise. Both give the same values (tested below). Incremental: [`Crc32c::update`].

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

#[cfg(target_arch = "x86_64")]
fn update(state: u32, bytes: &[u8]) -> u32 {
    if std::is_x86_feature_detected!("sse4.2") {
        // SAFETY: `hw_update` only needs SSE4.2, which the CPU was just checked to support.
        unsafe { hw_update(state, bytes) }
    } else {
        table_update(state, bytes)
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

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
fn hw_update(state: u32, bytes: &[u8]) -> u32 {
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

    #[test]
    fn matches_the_crc_crate_on_every_length_and_split() {
        let data: std::vec::Vec<u8> = (0..300u32).map(|i| (i * 7 + i / 3) as u8).collect();
        assert_eq!(checksum(b"123456789"), 0xE306_9283);
        for len in 0..data.len() {
            let bytes = &data[..len];
            let expected = TABLE.checksum(bytes);
            assert_eq!(checksum(bytes), expected, "length {len}");
            assert_eq!(!table_update(!0, bytes), expected, "table, length {len}");
            let split = len / 3;
            let mut digest = Crc32c::new();
            digest.update(&bytes[..split]);
            digest.update(&bytes[split..]);
            assert_eq!(digest.finish(), expected, "split {split} of {len}");
        }
    }
}
