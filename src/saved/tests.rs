//! Unit tests of the codec's edge cases; the exhaustive and property tests live in `tests/`.

use super::stream::{FrameKind, FrameReader, FrameWriter};
use super::*;

fn delivery() -> DeliveryRecord {
    DeliveryRecord {
        sequence: 7,
        tag: 0xDEAD_BEEF,
        posted_at: 1234,
        payload_len: 100,
        payload_crc: 0x1234_5678,
        attempts: 1,
        trace_id: None,
    }
}

fn channel() -> ChannelRecord {
    ChannelRecord {
        next_sequence: 10,
        protocol_version: 0x0001_0000,
        max_in_flight: 64,
        max_message_len: 4096,
        in_flight: 3,
        stats: ChannelStats {
            posted: 9,
            acked: 5,
            nacked: 1,
            ..ChannelStats::default()
        },
    }
}

/// Recomputes a record's checksum after a test edited its bytes on purpose.
fn reseal(bytes: &mut [u8]) {
    let total = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    let c = crc32c(&bytes[8..total]);
    bytes[4..8].copy_from_slice(&c.to_le_bytes());
}

#[test]
fn sizes_are_the_documented_ones() {
    assert_eq!(DeliveryRecord::MIN_ENCODED_LEN, 56);
    assert_eq!(DeliveryRecord::MAX_ENCODED_LEN, 76);
    assert_eq!(ChannelRecord::ENCODED_LEN, 104);
    assert_eq!(delivery().encoded_len(), 56);
    let mut d = delivery();
    d.trace_id = Some([9; 16]);
    assert_eq!(d.encoded_len(), 76);
}

#[test]
fn encode_zeroes_the_tail_and_reports_its_length() {
    let mut buf = [0xAA; 100];
    assert_eq!(delivery().encode(&mut buf), Ok(56));
    assert!(buf[56..].iter().all(|&b| b == 0));
    assert_eq!(DeliveryRecord::decode(&buf), Ok(delivery()));
}

#[test]
fn failed_encode_writes_nothing() {
    let mut buf = [0xAA; 55];
    assert_eq!(
        delivery().encode(&mut buf),
        Err(SaveError::BufferTooSmall { needed: 56 })
    );
    assert!(buf.iter().all(|&b| b == 0xAA));

    let mut buf = [0xAA; 200];
    let bad = DeliveryRecord {
        attempts: 0,
        ..delivery()
    };
    assert_eq!(
        bad.encode(&mut buf),
        Err(SaveError::InvalidRecord { field: "attempts" })
    );
    let dup = [
        Extension {
            tag: 0x7001,
            critical: false,
            data: &[],
        },
        Extension {
            tag: 0x7001,
            critical: false,
            data: &[],
        },
    ];
    assert_eq!(
        delivery().encode_with_extensions(&dup, &mut buf),
        Err(SaveError::InvalidExtension)
    );
    assert!(buf.iter().all(|&b| b == 0xAA));
}

#[test]
fn probe_with_empty_buffer_reports_exact_size() {
    let mut d = delivery();
    d.trace_id = Some([1; 16]);
    assert_eq!(
        d.encode(&mut []),
        Err(SaveError::BufferTooSmall { needed: 76 })
    );
}

#[test]
fn extras_may_not_reuse_known_or_invalid_tags() {
    let mut buf = [0; 256];
    for tag in [0, TAG_TRACE_ID, MAX_TAG + 1, u16::MAX] {
        let ext = [Extension {
            tag,
            critical: false,
            data: &[],
        }];
        assert_eq!(
            delivery().encode_with_extensions(&ext, &mut buf),
            Err(SaveError::InvalidExtension),
            "tag {tag:#x}"
        );
    }
    let big = [0u8; MAX_EXTENSION_DATA_LEN + 1];
    let ext = [Extension {
        tag: 2,
        critical: false,
        data: &big,
    }];
    assert_eq!(
        delivery().encode_with_extensions(&ext, &mut buf),
        Err(SaveError::InvalidExtension)
    );
}

#[test]
fn records_larger_than_the_limit_are_refused() {
    let data = [0u8; MAX_EXTENSION_DATA_LEN];
    let exts: [Extension<'_>; 4] = core::array::from_fn(|i| Extension {
        // Tags this build does not define (1 is the trace id, 2 the save identity).
        tag: 3 + i as u16,
        critical: false,
        data: &data,
    });
    let mut buf = [0u8; 8192];
    assert_eq!(
        delivery().encode_with_extensions(&exts, &mut buf),
        Err(SaveError::TooLarge)
    );
    // Three full entries still fit: 56 + 3 * 1028 = 3140.
    assert_eq!(
        delivery().encode_with_extensions(&exts[..3], &mut buf),
        Ok(3140)
    );
    assert_eq!(DeliveryRecord::decode(&buf), Ok(delivery()));
}

#[test]
fn extras_are_merged_in_tag_order_with_known_entries() {
    let mut d = delivery();
    d.trace_id = Some([0x11; 16]);
    let ext = [
        Extension {
            tag: 3,
            critical: false,
            data: b"ab",
        },
        Extension {
            tag: 0x7FFF,
            critical: false,
            data: b"",
        },
    ];
    let mut buf = [0; 128];
    let n = d.encode_with_extensions(&ext, &mut buf).unwrap();
    assert_eq!(n, 76 + 6 + 4);
    assert_eq!(&buf[56..60], &[1, 0, 16, 0]);
    assert_eq!(&buf[76..82], &[3, 0, 2, 0, b'a', b'b']);
    assert_eq!(&buf[82..86], &[0xFF, 0x7F, 0, 0]);
    assert_eq!(DeliveryRecord::decode(&buf[..n]), Ok(d));
}

#[test]
fn known_tag_with_critical_bit_is_still_understood() {
    let mut d = delivery();
    d.trace_id = Some([0x22; 16]);
    let mut buf = [0; 76];
    d.encode(&mut buf).unwrap();
    buf[57] |= 0x80;
    reseal(&mut buf);
    assert_eq!(DeliveryRecord::decode(&buf), Ok(d));
}

#[test]
fn wrong_trace_id_size_is_malformed() {
    let mut d = delivery();
    d.trace_id = Some([0x22; 16]);
    let mut buf = [0; 76];
    d.encode(&mut buf).unwrap();
    // Claim 15 bytes, leaving one byte that cannot be an entry header.
    buf[58] = 15;
    reseal(&mut buf);
    assert_eq!(
        DeliveryRecord::decode(&buf),
        Err(RestoreError::MalformedExtension)
    );
}

#[test]
fn header_fields_are_checked() {
    let mut buf = [0; 56];
    delivery().encode(&mut buf).unwrap();

    let mut v2 = buf;
    v2[8] = 2;
    reseal(&mut v2);
    assert_eq!(
        DeliveryRecord::decode(&v2),
        Err(RestoreError::UnsupportedVersion { found: 2 })
    );

    let mut flags = buf;
    flags[11] = 0x80;
    reseal(&mut flags);
    assert_eq!(
        DeliveryRecord::decode(&flags),
        Err(RestoreError::ReservedNotZero)
    );

    let mut reserved = buf;
    reserved[55] = 1;
    reseal(&mut reserved);
    assert_eq!(
        DeliveryRecord::decode(&reserved),
        Err(RestoreError::ReservedNotZero)
    );

    let mut short = buf;
    short[12] = 55;
    reseal(&mut short);
    assert_eq!(
        DeliveryRecord::decode(&short[..55]),
        Err(RestoreError::BadLength)
    );

    let mut long = [0u8; 4200];
    long[..56].copy_from_slice(&buf);
    long[12..16].copy_from_slice(&4097u32.to_le_bytes());
    assert_eq!(DeliveryRecord::decode(&long), Err(RestoreError::BadLength));

    assert_eq!(
        ChannelRecord::decode(&buf),
        Err(RestoreError::BadMagic),
        "magics must keep the record types apart"
    );
}

#[test]
fn out_of_range_fields_are_named() {
    let mut buf = [0; 56];
    delivery().encode(&mut buf).unwrap();
    let mut zero_seq = buf;
    zero_seq[16..24].fill(0);
    reseal(&mut zero_seq);
    assert_eq!(
        DeliveryRecord::decode(&zero_seq),
        Err(RestoreError::OutOfRange { field: "sequence" })
    );
    let mut big = buf;
    big[40..44].copy_from_slice(&(MAX_PAYLOAD_LEN + 1).to_le_bytes());
    reseal(&mut big);
    assert_eq!(
        DeliveryRecord::decode(&big),
        Err(RestoreError::OutOfRange {
            field: "payload_len"
        })
    );
}

#[test]
fn channel_invariants() {
    let ok = channel();
    assert_eq!(ok.validate(), Ok(()));
    let cases: [(ChannelRecord, &str); 7] = [
        (
            ChannelRecord {
                next_sequence: 0,
                ..ok
            },
            "next_sequence",
        ),
        (
            ChannelRecord {
                max_in_flight: 0,
                ..ok
            },
            "max_in_flight",
        ),
        (
            ChannelRecord {
                max_in_flight: MAX_IN_FLIGHT_LIMIT + 1,
                ..ok
            },
            "max_in_flight",
        ),
        (
            ChannelRecord {
                max_message_len: MAX_PAYLOAD_LEN + 1,
                ..ok
            },
            "max_message_len",
        ),
        (
            ChannelRecord {
                in_flight: ok.max_in_flight + 1,
                ..ok
            },
            "in_flight",
        ),
        (
            ChannelRecord {
                stats: ChannelStats {
                    cancelled: 4,
                    ..ok.stats
                },
                ..ok
            },
            "stats",
        ),
        (
            ChannelRecord {
                stats: ChannelStats {
                    posted: u64::MAX,
                    acked: u64::MAX,
                    nacked: 1,
                    ..ok.stats
                },
                ..ok
            },
            "stats",
        ),
    ];
    for (rec, field) in cases {
        assert_eq!(rec.validate(), Err(field));
        let mut buf = [0xAA; 104];
        assert_eq!(
            rec.encode(&mut buf),
            Err(SaveError::InvalidRecord { field })
        );
        assert!(buf.iter().all(|&b| b == 0xAA));
    }
    let mut buf = [0; 104];
    assert_eq!(ok.encode(&mut buf), Ok(104));
    assert_eq!(ChannelRecord::decode(&buf), Ok(ok));
}

#[test]
fn stream_round_trip_and_skip() {
    let mut buf = [0xAA; 512];
    let mut w = FrameWriter::new(&mut buf).unwrap();
    w.push_channel_record(&channel()).unwrap();
    w.push(FrameKind::KmclChunk, b"chunk-1").unwrap();
    w.push(FrameKind::KmclChunk, b"").unwrap();
    let n = w.finish();
    assert_eq!(n, 8 + (12 + 104) + (12 + 7) + 12 + 12);
    assert!(buf[n..].iter().all(|&b| b == 0));

    let frames: std::vec::Vec<_> = FrameReader::new(&buf[..n]).unwrap().collect();
    assert_eq!(frames.len(), 3);
    let first = frames[0].unwrap();
    assert_eq!(first.kind, FrameKind::ChannelRecord);
    assert_eq!(ChannelRecord::decode(first.payload), Ok(channel()));
    assert_eq!(frames[1].unwrap().payload, b"chunk-1");
    assert_eq!(frames[2].unwrap().payload, b"");

    // Trailing bytes after End, even zeros, are refused: a stream is a file with an exact size.
    let mut r = FrameReader::new(&buf[..n + 1]).unwrap();
    assert!(r.by_ref().take(3).all(|f| f.is_ok()));
    assert_eq!(r.next(), Some(Err(RestoreError::TrailingBytes)));
    assert_eq!(r.next(), None);

    // Missing End.
    let mut r = FrameReader::new(&buf[..n - 12]).unwrap();
    assert!(r.by_ref().take(3).all(|f| f.is_ok()));
    assert_eq!(r.next(), Some(Err(RestoreError::Truncated)));
}

#[test]
fn stream_writer_reserves_room_for_end() {
    let mut small = [0u8; 19];
    assert_eq!(
        FrameWriter::new(&mut small).err(),
        Some(SaveError::BufferTooSmall { needed: 20 })
    );
    let mut buf = [0xAAu8; 40];
    let mut w = FrameWriter::new(&mut buf).unwrap();
    assert_eq!(
        w.push(FrameKind::KmclChunk, &[1; 9]),
        Err(SaveError::BufferTooSmall { needed: 41 })
    );
    w.push(FrameKind::KmclChunk, &[1; 8]).unwrap();
    assert_eq!(w.finish(), 40);
    assert_eq!(FrameReader::new(&buf).unwrap().count(), 1);
}
