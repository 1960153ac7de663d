//! Keeps docs/saved-state.md honest: its worked example must be exactly what the encoder writes.

use vmbsrv::saved::{DeliveryRecord, crc32c};

const SPEC: &str = include_str!("../docs/saved-state.md");

/// The hex bytes of the worked example: for each line of the block, the tokens after the offset
/// up to the first token that is not a two-digit hex byte.
fn worked_example_bytes() -> Vec<u8> {
    let block = SPEC
        .split("<!-- worked-example:begin -->")
        .nth(1)
        .and_then(|rest| rest.split("<!-- worked-example:end -->").next())
        .expect("worked-example markers in docs/saved-state.md");
    let mut bytes = Vec::new();
    for line in block.lines() {
        let mut tokens = line.split_whitespace();
        let Some(offset) = tokens.next() else {
            continue;
        };
        let Ok(offset) = usize::from_str_radix(offset, 16) else {
            continue; // fences and the column header
        };
        assert_eq!(offset, bytes.len(), "offset column of line {line:?}");
        for tok in tokens {
            match u8::from_str_radix(tok, 16) {
                Ok(b) if tok.len() == 2 => bytes.push(b),
                _ => break,
            }
        }
    }
    bytes
}

#[test]
fn worked_example_matches_encoder_byte_for_byte() {
    let record = DeliveryRecord {
        sequence: 42,
        tag: 0x1122_3344_5566_7788,
        posted_at: 0x01DB_1F2E_3D4C_5B6A,
        payload_len: 9,
        payload_crc: crc32c(b"123456789"),
        attempts: 1,
        trace_id: Some(core::array::from_fn(|i| i as u8)),
    };
    let expected = worked_example_bytes();
    assert_eq!(expected.len(), 76);
    let mut buf = [0u8; 76];
    assert_eq!(record.encode(&mut buf), Ok(76));
    assert_eq!(buf.as_slice(), expected.as_slice());
    assert_eq!(DeliveryRecord::decode(&expected), Ok(record));
    assert_eq!(
        expected.as_slice(),
        include_bytes!("golden/delivery_v1_trace.bin")
    );
}

#[test]
fn documented_checksum_check_value() {
    assert!(SPEC.contains("CRC32C(\"123456789\") = 0xE3069283"));
    assert_eq!(crc32c(b"123456789"), 0xE306_9283);
}
