//! Property tests: every valid value round-trips, every invalid one is refused, and no input
//! makes a decoder panic.

use proptest::prelude::*;
use vmbsrv::saved::stream::{FrameKind, FrameReader, FrameWriter};
use vmbsrv::saved::{
    ChannelRecord, ChannelStats, DeliveryRecord, Extension, MAX_EXTENSION_DATA_LEN,
    MAX_IN_FLIGHT_LIMIT, MAX_PAYLOAD_LEN, MAX_TAG, PRIVATE_TAG_MIN, SaveError,
};

fn delivery() -> impl Strategy<Value = DeliveryRecord> {
    (
        1..=u64::MAX,
        any::<u64>(),
        any::<u64>(),
        1..=MAX_PAYLOAD_LEN,
        any::<u32>(),
        1..=u16::MAX,
        any::<Option<[u8; 16]>>(),
    )
        .prop_map(
            |(sequence, tag, posted_at, payload_len, payload_crc, attempts, trace_id)| {
                DeliveryRecord {
                    sequence,
                    tag,
                    posted_at,
                    payload_len,
                    payload_crc,
                    attempts,
                    trace_id,
                }
            },
        )
}

/// Splits `posted` into acked/nacked/cancelled plus a remainder, so the counter invariant holds
/// while each counter still spans its whole range (including sums right at `u64::MAX`).
fn stats() -> impl Strategy<Value = ChannelStats> {
    any::<u64>()
        .prop_flat_map(|posted| (Just(posted), 0..=posted))
        .prop_flat_map(|(posted, acked)| (Just(posted), Just(acked), 0..=posted - acked))
        .prop_flat_map(|(posted, acked, nacked)| {
            (
                Just(posted),
                Just(acked),
                Just(nacked),
                0..=posted - acked - nacked,
                any::<[u64; 4]>(),
            )
        })
        .prop_map(|(posted, acked, nacked, cancelled, g)| ChannelStats {
            posted,
            acked,
            nacked,
            cancelled,
            bad_acks: g[0],
            guest_requests: g[1],
            guest_bad_requests: g[2],
            guest_garbled: g[3],
        })
}

fn channel() -> impl Strategy<Value = ChannelRecord> {
    (1..=MAX_IN_FLIGHT_LIMIT)
        .prop_flat_map(|max_in_flight| {
            (
                1..=u64::MAX,
                any::<u32>(),
                Just(max_in_flight),
                1..=MAX_PAYLOAD_LEN,
                0..=max_in_flight,
                stats(),
            )
        })
        .prop_map(
            |(
                next_sequence,
                protocol_version,
                max_in_flight,
                max_message_len,
                in_flight,
                stats,
            )| {
                ChannelRecord {
                    next_sequence,
                    protocol_version,
                    max_in_flight,
                    max_message_len,
                    in_flight,
                    stats,
                }
            },
        )
}

/// Extension entries a newer build might add: tags from the never-assigned range, ascending,
/// optional only, so every reader must skip them.
fn unknown_optional_extensions() -> impl Strategy<Value = Vec<(u16, Vec<u8>)>> {
    proptest::collection::btree_map(
        PRIVATE_TAG_MIN..=MAX_TAG,
        proptest::collection::vec(any::<u8>(), 0..40),
        0..6,
    )
    .prop_map(|m| m.into_iter().collect())
}

fn as_extensions(v: &[(u16, Vec<u8>)]) -> Vec<Extension<'_>> {
    v.iter()
        .map(|(tag, data)| Extension {
            tag: *tag,
            critical: false,
            data,
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn delivery_round_trips(rec in delivery(), slack in 0usize..64, fill in any::<u8>()) {
        let mut buf = vec![fill; rec.encoded_len() + slack];
        prop_assert_eq!(rec.encode(&mut buf), Ok(rec.encoded_len()));
        prop_assert!(buf[rec.encoded_len()..].iter().all(|&b| b == 0));
        prop_assert_eq!(DeliveryRecord::decode(&buf), Ok(rec));
    }

    #[test]
    fn channel_round_trips(rec in channel(), slack in 0usize..64, fill in any::<u8>()) {
        let mut buf = vec![fill; ChannelRecord::ENCODED_LEN + slack];
        prop_assert_eq!(rec.encode(&mut buf), Ok(ChannelRecord::ENCODED_LEN));
        prop_assert!(buf[ChannelRecord::ENCODED_LEN..].iter().all(|&b| b == 0));
        prop_assert_eq!(ChannelRecord::decode(&buf), Ok(rec));
    }

    #[test]
    fn unknown_optional_extensions_are_skipped(
        rec in delivery(),
        chan in channel(),
        exts in unknown_optional_extensions(),
    ) {
        let exts = as_extensions(&exts);
        let mut buf = vec![0u8; 1024];
        let n = rec.encode_with_extensions(&exts, &mut buf).unwrap();
        prop_assert!(n >= rec.encoded_len());
        prop_assert_eq!(DeliveryRecord::decode(&buf), Ok(rec));
        let n = chan.encode_with_extensions(&exts, &mut buf).unwrap();
        prop_assert!(n >= ChannelRecord::ENCODED_LEN);
        prop_assert_eq!(ChannelRecord::decode(&buf), Ok(chan));
    }

    #[test]
    fn too_small_buffer_is_untouched_and_needed_is_exact(
        rec in delivery(),
        short in 0usize..76,
        fill in any::<u8>(),
    ) {
        let len = rec.encoded_len();
        prop_assume!(short < len);
        let mut buf = vec![fill; short];
        prop_assert_eq!(rec.encode(&mut buf), Err(SaveError::BufferTooSmall { needed: len }));
        prop_assert!(buf.iter().all(|&b| b == fill));
    }

    #[test]
    fn invalid_delivery_is_refused_without_writing(
        rec in delivery(),
        which in 0..4u8,
        fill in any::<u8>(),
    ) {
        let bad = match which {
            0 => DeliveryRecord { sequence: 0, ..rec },
            1 => DeliveryRecord { payload_len: 0, ..rec },
            2 => DeliveryRecord { payload_len: MAX_PAYLOAD_LEN + 1 + (rec.payload_len % 1000), ..rec },
            _ => DeliveryRecord { attempts: 0, ..rec },
        };
        let mut buf = vec![fill; 128];
        let refused = matches!(bad.encode(&mut buf), Err(SaveError::InvalidRecord { .. }));
        prop_assert!(refused);
        prop_assert!(buf.iter().all(|&b| b == fill));
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_decoded_values_re_encode(
        bytes in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        if let Ok(rec) = DeliveryRecord::decode(&bytes) {
            let mut buf = [0u8; 128];
            let n = rec.encode(&mut buf).unwrap();
            prop_assert_eq!(DeliveryRecord::decode(&buf[..n]), Ok(rec));
        }
        if let Ok(rec) = ChannelRecord::decode(&bytes) {
            let mut buf = [0u8; 128];
            let n = rec.encode(&mut buf).unwrap();
            prop_assert_eq!(ChannelRecord::decode(&buf[..n]), Ok(rec));
        }
        if let Ok(reader) = FrameReader::new(&bytes) {
            for frame in reader {
                let _ = frame;
            }
        }
    }

    /// Arbitrary bytes behind a valid header and checksum, so the body and extension parsers see
    /// random content rather than stopping at the checksum.
    #[test]
    fn arbitrary_checksummed_content_never_panics(
        content in proptest::collection::vec(any::<u8>(), 0..200),
        magic_is_channel in any::<bool>(),
    ) {
        let magic = if magic_is_channel { ChannelRecord::MAGIC } else { DeliveryRecord::MAGIC };
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&magic);
        bytes.extend_from_slice(&[0; 4]);
        bytes.extend_from_slice(&1u16.to_le_bytes());
        bytes.extend_from_slice(&0u16.to_le_bytes());
        bytes.extend_from_slice(&(16 + content.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&content);
        let c = vmbsrv::saved::crc32c(&bytes[8..]);
        bytes[4..8].copy_from_slice(&c.to_le_bytes());
        if let Ok(rec) = DeliveryRecord::decode(&bytes) {
            let mut buf = [0u8; 128];
            let n = rec.encode(&mut buf).unwrap();
            prop_assert_eq!(DeliveryRecord::decode(&buf[..n]), Ok(rec));
        }
        if let Ok(rec) = ChannelRecord::decode(&bytes) {
            let mut buf = [0u8; 128];
            let n = rec.encode(&mut buf).unwrap();
            prop_assert_eq!(ChannelRecord::decode(&buf[..n]), Ok(rec));
        }
    }

    #[test]
    fn frames_round_trip(
        chan in proptest::option::of(channel()),
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8),
        slack in 0usize..32,
    ) {
        let size = 8 + 12 + chan.map_or(0, |_| 12 + ChannelRecord::ENCODED_LEN)
            + chunks.iter().map(|c| 12 + c.len()).sum::<usize>();
        let mut buf = vec![0xA5u8; size + slack];
        let mut w = FrameWriter::new(&mut buf).unwrap();
        if let Some(c) = &chan {
            w.push_channel_record(c).unwrap();
        }
        for c in &chunks {
            w.push(FrameKind::KmclChunk, c).unwrap();
        }
        prop_assert_eq!(w.finish(), size);
        prop_assert!(buf[size..].iter().all(|&b| b == 0));

        let mut reader = FrameReader::new(&buf[..size]).unwrap();
        if let Some(c) = chan {
            let f = reader.next().unwrap().unwrap();
            prop_assert_eq!(f.kind, FrameKind::ChannelRecord);
            prop_assert_eq!(ChannelRecord::decode(f.payload), Ok(c));
        }
        for c in &chunks {
            let f = reader.next().unwrap().unwrap();
            prop_assert_eq!(f.kind, FrameKind::KmclChunk);
            prop_assert_eq!(f.payload, c.as_slice());
        }
        prop_assert_eq!(reader.next(), None);
    }
}

#[test]
fn boundary_values_round_trip() {
    let extremes = [
        DeliveryRecord {
            sequence: 1,
            tag: 0,
            posted_at: 0,
            payload_len: 1,
            payload_crc: 0,
            attempts: 1,
            trace_id: None,
        },
        DeliveryRecord {
            sequence: u64::MAX,
            tag: u64::MAX,
            posted_at: u64::MAX,
            payload_len: MAX_PAYLOAD_LEN,
            payload_crc: u32::MAX,
            attempts: u16::MAX,
            trace_id: Some([0xFF; 16]),
        },
    ];
    for rec in extremes {
        let mut buf = [0u8; 76];
        let n = rec.encode(&mut buf).unwrap();
        assert_eq!(DeliveryRecord::decode(&buf[..n]), Ok(rec));
    }
    let full = ChannelRecord {
        next_sequence: u64::MAX,
        protocol_version: u32::MAX,
        max_in_flight: MAX_IN_FLIGHT_LIMIT,
        max_message_len: MAX_PAYLOAD_LEN,
        in_flight: MAX_IN_FLIGHT_LIMIT,
        stats: ChannelStats {
            posted: u64::MAX,
            acked: u64::MAX - 2,
            nacked: 1,
            cancelled: 1,
            bad_acks: u64::MAX,
            guest_requests: u64::MAX,
            guest_bad_requests: u64::MAX,
            guest_garbled: u64::MAX,
        },
    };
    let mut buf = [0u8; 104];
    full.encode(&mut buf).unwrap();
    assert_eq!(ChannelRecord::decode(&buf), Ok(full));
}

#[test]
fn largest_record_round_trips() {
    let data = [0x5Au8; MAX_EXTENSION_DATA_LEN];
    let rec = DeliveryRecord {
        sequence: 1,
        tag: 2,
        posted_at: 3,
        payload_len: 4,
        payload_crc: 5,
        attempts: 6,
        trace_id: Some([7; 16]),
    };
    // 76 + 3 * 1028 = 3160; fill the rest up to exactly 4096 with one more entry.
    let last = vec![0u8; 4096 - 3160 - 4];
    let exts = [
        Extension {
            tag: PRIVATE_TAG_MIN,
            critical: false,
            data: &data,
        },
        Extension {
            tag: PRIVATE_TAG_MIN + 1,
            critical: false,
            data: &data,
        },
        Extension {
            tag: PRIVATE_TAG_MIN + 2,
            critical: false,
            data: &data,
        },
        Extension {
            tag: PRIVATE_TAG_MIN + 3,
            critical: false,
            data: &last,
        },
    ];
    let mut buf = vec![0u8; 4096];
    assert_eq!(rec.encode_with_extensions(&exts, &mut buf), Ok(4096));
    assert_eq!(DeliveryRecord::decode(&buf), Ok(rec));
    let too_long = vec![0u8; last.len() + 1];
    let exts = [
        exts[0],
        exts[1],
        exts[2],
        Extension {
            data: &too_long,
            ..exts[3]
        },
    ];
    let mut bigger = vec![0u8; 8192];
    assert_eq!(
        rec.encode_with_extensions(&exts, &mut bigger),
        Err(SaveError::TooLarge)
    );
}
