//! The save-stream inspector on hostile bytes: it never panics, and it never calls a damaged
//! file clean. (The cargo-fuzz target `fuzz/fuzz_targets/inspect.rs` runs the same reader under
//! libFuzzer.)

use proptest::prelude::*;
use vmbsrv::saved::crc32c;
use vmbsrv_client::inspect::inspect;

/// A real save stream: `vmbsrvctl --sim demo`'s file (10 delivery records).
const DEMO: &[u8] = include_bytes!("../../vmbsrvctl/tests/fixtures/demo.vbss");

/// Frames `payloads` (kind, bytes) as a stream with valid checksums, so the inspector gets past
/// the framing.
fn sealed(payloads: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut out = b"VBSS\x01\x00\x00\x00".to_vec();
    for (kind, payload) in payloads {
        let mut frame = Vec::new();
        frame.extend_from_slice(&kind.to_le_bytes());
        frame.extend_from_slice(&[0, 0]);
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        frame.extend_from_slice(payload);
        out.extend_from_slice(&crc32c(&frame).to_le_bytes());
        out.extend_from_slice(&frame);
    }
    out
}

#[test]
fn the_fixture_is_clean() {
    let inspection = inspect(DEMO);
    assert!(inspection.is_clean(), "{inspection}");
    assert_eq!(inspection.deliveries.len(), 10);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let inspection = inspect(&bytes);
        let _ = inspection.to_string();
        prop_assert!(!inspection.is_clean() || bytes.starts_with(b"VBSS"));
    }

    #[test]
    fn a_stream_prefix_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut file = b"VBSS\x01\x00\x00\x00".to_vec();
        file.extend_from_slice(&bytes);
        let _ = inspect(&file).to_string();
    }

    #[test]
    fn every_single_byte_change_of_a_real_stream_is_a_defect(at in 0..DEMO.len(), flip in 1..=255u8) {
        let mut file = DEMO.to_vec();
        file[at] ^= flip;
        let inspection = inspect(&file);
        prop_assert!(!inspection.is_clean(), "flip {flip:#x} at {at} went unnoticed");
        prop_assert!(!inspection.defects.is_empty());
        let _ = inspection.to_string();
    }

    #[test]
    fn every_truncation_is_a_defect(len in 0..DEMO.len()) {
        let inspection = inspect(&DEMO[..len]);
        prop_assert!(!inspection.is_clean());
        prop_assert!(!inspection.defects.is_empty());
    }

    #[test]
    fn sealed_frames_with_planted_record_headers_never_panic(
        frames in proptest::collection::vec(
            (0u16..6, proptest::collection::vec(any::<u8>(), 0..600), any::<bool>(), 0usize..600, any::<u32>()),
            0..5,
        ),
    ) {
        // Plant record magics and plausible lengths in the payloads so that the record decoders
        // and the delivery scan run on adversarial candidates.
        let payloads: Vec<(u16, Vec<u8>)> = frames
            .into_iter()
            .map(|(kind, mut payload, plant, at, len)| {
                if plant && payload.len() >= 16 {
                    let at = at % (payload.len() - 15);
                    let magic: &[u8; 4] = if kind == 1 { b"VBCR" } else { b"VBDR" };
                    payload[at..at + 4].copy_from_slice(magic);
                    payload[at + 12..at + 16].copy_from_slice(&(len % 5000).to_le_bytes());
                }
                (kind, payload)
            })
            .collect();
        let inspection = inspect(&sealed(&payloads));
        let _ = inspection.to_string();
    }
}
