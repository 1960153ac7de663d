//! Version-skew and untrusted-layout tests: what a reader does with records from other builds
//! and with hand-made extension areas.

use vmbsrv::saved::stream::{FrameKind, FrameReader, FrameWriter};
use vmbsrv::saved::{
    CRITICAL_BIT, ChannelRecord, ChannelStats, DeliveryRecord, Extension, MAX_EXTENSION_DATA_LEN,
    PRIVATE_TAG_MIN, RestoreError, TAG_TRACE_ID, crc32c,
};

fn delivery() -> DeliveryRecord {
    DeliveryRecord {
        sequence: 5,
        tag: 6,
        posted_at: 7,
        payload_len: 8,
        payload_crc: 9,
        attempts: 1,
        trace_id: Some([0xEE; 16]),
    }
}

fn channel() -> ChannelRecord {
    ChannelRecord {
        next_sequence: 3,
        protocol_version: 1,
        max_in_flight: 4,
        max_message_len: 100,
        in_flight: 2,
        stats: ChannelStats {
            posted: 2,
            ..ChannelStats::default()
        },
    }
}

/// Builds a record the way some other build might have: any version, flags, body and extension
/// area, with a correct length and checksum.
fn craft(magic: [u8; 4], version: u16, flags: u16, body: &[u8], ext_area: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&magic);
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    let total = 16 + body.len() + ext_area.len();
    out.extend_from_slice(&(total as u32).to_le_bytes());
    out.extend_from_slice(body);
    out.extend_from_slice(ext_area);
    let c = crc32c(&out[8..]);
    out[4..8].copy_from_slice(&c.to_le_bytes());
    out
}

fn entry(raw_tag: u16, data: &[u8]) -> Vec<u8> {
    let mut e = raw_tag.to_le_bytes().to_vec();
    e.extend_from_slice(&(data.len() as u16).to_le_bytes());
    e.extend_from_slice(data);
    e
}

/// The v1 body of `delivery()`, taken from a real encoding.
fn delivery_body() -> Vec<u8> {
    let mut buf = [0u8; 56];
    DeliveryRecord {
        trace_id: None,
        ..delivery()
    }
    .encode(&mut buf)
    .unwrap();
    buf[16..56].to_vec()
}

#[test]
fn crafted_record_matches_encoder() {
    let mut buf = [0u8; 76];
    delivery().encode(&mut buf).unwrap();
    let crafted = craft(
        DeliveryRecord::MAGIC,
        1,
        0,
        &delivery_body(),
        &entry(TAG_TRACE_ID, &[0xEE; 16]),
    );
    assert_eq!(crafted, buf);
}

#[test]
fn unknown_optional_entries_are_skipped_anywhere_after_known_ones() {
    let mut area = entry(TAG_TRACE_ID, &[0xEE; 16]);
    area.extend(entry(3, b"tag three from a newer build"));
    area.extend(entry(0x0100, &[]));
    area.extend(entry(0x7FFF, &[1; MAX_EXTENSION_DATA_LEN]));
    let rec = craft(DeliveryRecord::MAGIC, 1, 0, &delivery_body(), &area);
    assert_eq!(DeliveryRecord::decode(&rec), Ok(delivery()));

    let mut buf = [0u8; 104];
    channel().encode(&mut buf).unwrap();
    let rec = craft(
        ChannelRecord::MAGIC,
        1,
        0,
        &buf[16..],
        &entry(2, b"a channel field v1 does not know"),
    );
    assert_eq!(ChannelRecord::decode(&rec), Ok(channel()));
}

#[test]
fn unknown_critical_entries_are_rejected() {
    let mut area = entry(TAG_TRACE_ID, &[0xEE; 16]);
    area.extend(entry(3 | CRITICAL_BIT, &[]));
    let rec = craft(DeliveryRecord::MAGIC, 1, 0, &delivery_body(), &area);
    assert_eq!(
        DeliveryRecord::decode(&rec),
        Err(RestoreError::UnknownCriticalField { tag: 3 })
    );

    let ext = [Extension {
        tag: PRIVATE_TAG_MIN,
        critical: true,
        data: b"x",
    }];
    let mut buf = [0u8; 256];
    channel().encode_with_extensions(&ext, &mut buf).unwrap();
    assert_eq!(
        ChannelRecord::decode(&buf),
        Err(RestoreError::UnknownCriticalField {
            tag: PRIVATE_TAG_MIN
        })
    );
    delivery().encode_with_extensions(&ext, &mut buf).unwrap();
    assert_eq!(
        DeliveryRecord::decode(&buf),
        Err(RestoreError::UnknownCriticalField {
            tag: PRIVATE_TAG_MIN
        })
    );
}

#[test]
fn malformed_extension_areas_are_rejected() {
    let trace = entry(TAG_TRACE_ID, &[0xEE; 16]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("tag 0", entry(0, &[])),
        ("tag 0 critical", entry(CRITICAL_BIT, &[])),
        ("duplicate known", [trace.clone(), trace.clone()].concat()),
        (
            "duplicate unknown",
            [entry(9, &[]), entry(9 | CRITICAL_BIT, &[])].concat(),
        ),
        ("descending", [entry(9, &[]), trace.clone()].concat()),
        ("trace too short", entry(TAG_TRACE_ID, &[0; 15])),
        ("trace too long", entry(TAG_TRACE_ID, &[0; 17])),
        ("partial entry header", vec![0x09, 0x00, 0x00]),
        ("data beyond area", {
            let mut e = entry(9, &[1, 2, 3]);
            e.pop();
            e
        }),
        (
            "data over limit",
            entry(9, &[0; MAX_EXTENSION_DATA_LEN + 1]),
        ),
    ];
    for (name, area) in cases {
        let rec = craft(DeliveryRecord::MAGIC, 1, 0, &delivery_body(), &area);
        assert_eq!(
            DeliveryRecord::decode(&rec),
            Err(RestoreError::MalformedExtension),
            "{name}"
        );
    }
}

#[test]
fn newer_versions_and_flags_are_refused_cleanly() {
    for version in [0, 2, 3, u16::MAX] {
        let rec = craft(DeliveryRecord::MAGIC, version, 0, &delivery_body(), &[]);
        assert_eq!(
            DeliveryRecord::decode(&rec),
            Err(RestoreError::UnsupportedVersion { found: version })
        );
        // A v2 body may be any size: the version is judged before the body's length.
        let rec = craft(ChannelRecord::MAGIC, version, 0, &[0xAB; 7], &[]);
        assert_eq!(
            ChannelRecord::decode(&rec),
            Err(RestoreError::UnsupportedVersion { found: version })
        );
    }
    for flags in [1, 0x8000] {
        let rec = craft(DeliveryRecord::MAGIC, 1, flags, &delivery_body(), &[]);
        assert_eq!(
            DeliveryRecord::decode(&rec),
            Err(RestoreError::ReservedNotZero)
        );
    }
}

#[test]
fn v1_body_shorter_than_its_layout_is_bad_length() {
    let body = delivery_body();
    for len in 0..body.len() {
        let rec = craft(DeliveryRecord::MAGIC, 1, 0, &body[..len], &[]);
        assert_eq!(
            DeliveryRecord::decode(&rec),
            Err(RestoreError::BadLength),
            "{len}"
        );
    }
}

#[test]
fn trailing_zeros_accepted_trailing_non_zero_rejected() {
    let mut buf = vec![0u8; 76];
    delivery().encode(&mut buf).unwrap();
    for pad in [1, 7, 8, 100, 4096] {
        let mut padded = buf.clone();
        padded.resize(76 + pad, 0);
        assert_eq!(DeliveryRecord::decode(&padded), Ok(delivery()));
        for pos in [76, 76 + pad / 2, 76 + pad - 1] {
            let mut dirty = padded.clone();
            dirty[pos] = 1;
            assert_eq!(
                DeliveryRecord::decode(&dirty),
                Err(RestoreError::TrailingBytes),
                "pad {pad} pos {pos}"
            );
        }
    }
    // A second record after the first is trailing garbage too: one buffer, one record.
    let twice = [buf.clone(), buf.clone()].concat();
    assert_eq!(
        DeliveryRecord::decode(&twice),
        Err(RestoreError::TrailingBytes)
    );
}

#[test]
fn record_types_do_not_mix() {
    let mut d = [0u8; 76];
    delivery().encode(&mut d).unwrap();
    let mut c = [0u8; 104];
    channel().encode(&mut c).unwrap();
    assert_eq!(ChannelRecord::decode(&d), Err(RestoreError::BadMagic));
    assert_eq!(DeliveryRecord::decode(&c), Err(RestoreError::BadMagic));
    assert!(FrameReader::new(&d).is_err());
}

/// A stream with frames of kinds this build does not know, as a newer control client could
/// write them.
fn stream_with_raw_frame(kind: u16, payload: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 512];
    let mut w = FrameWriter::new(&mut buf).unwrap();
    w.push_channel_record(&channel()).unwrap();
    let n = w.finish();
    buf.truncate(n - 12); // drop End, splice the foreign frame in, re-add End
    for (k, p) in [(kind, payload), (3, &[][..])] {
        let mut frame = vec![0u8; 4];
        frame.extend_from_slice(&k.to_le_bytes());
        frame.extend_from_slice(&[0, 0]);
        frame.extend_from_slice(&(p.len() as u32).to_le_bytes());
        frame.extend_from_slice(p);
        let c = crc32c(&frame[4..]);
        frame[..4].copy_from_slice(&c.to_le_bytes());
        buf.extend_from_slice(&frame);
    }
    buf
}

#[test]
fn stream_unknown_optional_frames_are_skipped_critical_rejected() {
    let skip = stream_with_raw_frame(0x0042, b"newer data");
    let frames: Vec<_> = FrameReader::new(&skip).unwrap().collect();
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].unwrap().kind, FrameKind::ChannelRecord);

    let reject = stream_with_raw_frame(0x8042, b"must understand");
    let mut r = FrameReader::new(&reject).unwrap();
    assert!(r.next().unwrap().is_ok());
    assert_eq!(
        r.next(),
        Some(Err(RestoreError::UnknownFrameKind { kind: 0x8042 }))
    );
    assert_eq!(r.next(), None);

    let zero = stream_with_raw_frame(0, b"");
    let mut r = FrameReader::new(&zero).unwrap();
    assert!(r.next().unwrap().is_ok());
    assert_eq!(
        r.next(),
        Some(Err(RestoreError::UnknownFrameKind { kind: 0 }))
    );

    // A known kind is recognized with the critical bit too.
    let chunk = stream_with_raw_frame(2 | 0x8000, b"chunk");
    let frames: Vec<_> = FrameReader::new(&chunk).unwrap().collect();
    assert_eq!(frames[1].unwrap().kind, FrameKind::KmclChunk);
}

#[test]
fn stream_header_checks() {
    assert_eq!(FrameReader::new(b"").err(), Some(RestoreError::Truncated));
    assert_eq!(
        FrameReader::new(b"VBSS\x01\x00").err(),
        Some(RestoreError::Truncated)
    );
    assert_eq!(
        FrameReader::new(b"VBSX\x01\x00\x00\x00").err(),
        Some(RestoreError::BadMagic)
    );
    assert_eq!(
        FrameReader::new(b"VBSS\x02\x00\x00\x00").err(),
        Some(RestoreError::UnsupportedVersion { found: 2 })
    );
    assert_eq!(
        FrameReader::new(b"VBSS\x01\x00\x00\x01").err(),
        Some(RestoreError::ReservedNotZero)
    );
    // Header alone: no End frame.
    let mut r = FrameReader::new(b"VBSS\x01\x00\x00\x00").unwrap();
    assert_eq!(r.next(), Some(Err(RestoreError::Truncated)));
}

#[test]
fn stream_frame_length_is_bounded_before_use() {
    let mut s = b"VBSS\x01\x00\x00\x00".to_vec();
    let mut frame = vec![0u8; 4];
    frame.extend_from_slice(&2u16.to_le_bytes());
    frame.extend_from_slice(&[0, 0]);
    frame.extend_from_slice(&u32::MAX.to_le_bytes());
    s.extend_from_slice(&frame);
    let mut r = FrameReader::new(&s).unwrap();
    assert_eq!(r.next(), Some(Err(RestoreError::BadLength)));
    // Within the bound but beyond the input.
    s[16..20].copy_from_slice(&100u32.to_le_bytes());
    let mut r = FrameReader::new(&s).unwrap();
    assert_eq!(r.next(), Some(Err(RestoreError::Truncated)));
}

#[test]
fn stream_end_with_payload_is_bad_length() {
    let mut s = stream_with_raw_frame(0x0042, b"");
    // Turn the trailing End (12 bytes, empty) into an End with a 1-byte payload.
    let end = s.len() - 12;
    s.truncate(end);
    let mut frame = vec![0u8; 4];
    frame.extend_from_slice(&3u16.to_le_bytes());
    frame.extend_from_slice(&[0, 0]);
    frame.extend_from_slice(&1u32.to_le_bytes());
    frame.push(0);
    let c = crc32c(&frame[4..]);
    frame[..4].copy_from_slice(&c.to_le_bytes());
    s.extend_from_slice(&frame);
    let results: Vec<_> = FrameReader::new(&s).unwrap().collect();
    assert_eq!(results.last(), Some(&Err(RestoreError::BadLength)));
}
