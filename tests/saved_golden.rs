//! Golden blobs of saved-state format version 1, decoded against literal expected values.
//!
//! These files are the compatibility promise: a VM saved by any build that wrote them must
//! restore under every later build. Never edit or regenerate a golden file and never change an
//! expected value below; a format change adds a version (and new goldens) instead.

use vmbsrv::saved::stream::{FrameKind, FrameReader};
use vmbsrv::saved::{ChannelRecord, ChannelStats, DeliveryRecord, RestoreError};

const MIN: &[u8] = include_bytes!("golden/delivery_v1_min.bin");
const TRACE: &[u8] = include_bytes!("golden/delivery_v1_trace.bin");
const UNKNOWN_OPTIONAL: &[u8] = include_bytes!("golden/delivery_v1_unknown_optional.bin");
const UNKNOWN_CRITICAL: &[u8] = include_bytes!("golden/delivery_v1_unknown_critical.bin");
const PADDED: &[u8] = include_bytes!("golden/delivery_v1_padded.bin");
const CHANNEL: &[u8] = include_bytes!("golden/channel_v1.bin");
const STREAM: &[u8] = include_bytes!("golden/stream_v1.bin");

/// Every field distinct and at a boundary where possible, so a swapped or resized field shows.
const MIN_VALUE: DeliveryRecord = DeliveryRecord {
    sequence: 0x0102_0304_0506_0708,
    tag: 0x1112_1314_1516_1718,
    posted_at: 0x2122_2324_2526_2728,
    payload_len: 0x0001_0000,
    payload_crc: 0x3132_3334,
    attempts: 0xFFFF,
    trace_id: None,
};

/// The worked example of docs/saved-state.md §11.
const TRACE_VALUE: DeliveryRecord = DeliveryRecord {
    sequence: 42,
    tag: 0x1122_3344_5566_7788,
    posted_at: 0x01DB_1F2E_3D4C_5B6A,
    payload_len: 9,
    payload_crc: 0xE306_9283,
    attempts: 1,
    trace_id: Some([
        0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x0E,
        0x0F,
    ]),
};

const CHANNEL_VALUE: ChannelRecord = ChannelRecord {
    next_sequence: 0x0000_0001_0000_0002,
    protocol_version: 0x0003_0004,
    max_in_flight: 65536,
    max_message_len: 65536,
    in_flight: 17,
    stats: ChannelStats {
        posted: 1000,
        acked: 900,
        nacked: 50,
        cancelled: 33,
        bad_acks: 4,
        guest_requests: 0x0505_0505,
        guest_bad_requests: 6,
        guest_garbled: 7,
    },
};

const CHUNK_1: &[u8] = b"opaque KMCL chunk one";
const CHUNK_2: &[u8] = &[0xFF, 0x00, 0x5A];

#[test]
fn delivery_min_v1() {
    assert_eq!(MIN.len(), 56);
    assert_eq!(DeliveryRecord::decode(MIN), Ok(MIN_VALUE));
}

#[test]
fn delivery_trace_v1() {
    assert_eq!(TRACE.len(), 76);
    assert_eq!(DeliveryRecord::decode(TRACE), Ok(TRACE_VALUE));
}

#[test]
fn delivery_unknown_optional_extension_is_skipped() {
    assert_eq!(DeliveryRecord::decode(UNKNOWN_OPTIONAL), Ok(TRACE_VALUE));
}

#[test]
fn delivery_unknown_critical_extension_is_rejected() {
    assert_eq!(
        DeliveryRecord::decode(UNKNOWN_CRITICAL),
        Err(RestoreError::UnknownCriticalField { tag: 0x7002 })
    );
}

#[test]
fn delivery_padded_with_zeros_v1() {
    assert_eq!(PADDED.len(), 64);
    assert_eq!(DeliveryRecord::decode(PADDED), Ok(MIN_VALUE));
}

#[test]
fn channel_v1() {
    assert_eq!(CHANNEL.len(), 104);
    assert_eq!(ChannelRecord::decode(CHANNEL), Ok(CHANNEL_VALUE));
}

#[test]
fn stream_v1() {
    let mut frames = FrameReader::new(STREAM).unwrap();
    let f = frames.next().unwrap().unwrap();
    assert_eq!(f.kind, FrameKind::ChannelRecord);
    assert_eq!(ChannelRecord::decode(f.payload), Ok(CHANNEL_VALUE));
    let f = frames.next().unwrap().unwrap();
    assert_eq!((f.kind, f.payload), (FrameKind::KmclChunk, CHUNK_1));
    let f = frames.next().unwrap().unwrap();
    assert_eq!((f.kind, f.payload), (FrameKind::KmclChunk, CHUNK_2));
    assert_eq!(frames.next(), None);
}

/// Separate from the decode checks above: this pins what the *writer* emits for version 1. When
/// a new version becomes the default, this test changes; the decode tests never do.
#[test]
fn writer_still_emits_v1_bytes() {
    let mut buf = [0u8; 128];
    let n = MIN_VALUE.encode(&mut buf).unwrap();
    assert_eq!(&buf[..n], MIN);
    let n = TRACE_VALUE.encode(&mut buf).unwrap();
    assert_eq!(&buf[..n], TRACE);
    let n = CHANNEL_VALUE.encode(&mut buf).unwrap();
    assert_eq!(&buf[..n], CHANNEL);
    assert_eq!(build_stream(), STREAM);
}

fn build_stream() -> Vec<u8> {
    use vmbsrv::saved::stream::FrameWriter;
    let mut buf = vec![0u8; 512];
    let mut w = FrameWriter::new(&mut buf).unwrap();
    w.push_channel_record(&CHANNEL_VALUE).unwrap();
    w.push(FrameKind::KmclChunk, CHUNK_1).unwrap();
    w.push(FrameKind::KmclChunk, CHUNK_2).unwrap();
    let n = w.finish();
    buf.truncate(n);
    buf
}

/// Writes the golden files that are missing or empty; a file with content is never overwritten.
/// Run once when a format version is introduced (create the new files empty first, since
/// `include_bytes!` needs them to exist):
/// `cargo test --test saved_golden -- --ignored generate_missing_goldens`.
#[test]
#[ignore = "generates tests/golden/*.bin; run only when adding a format version"]
fn generate_missing_goldens() {
    use vmbsrv::saved::Extension;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let encode = |rec: &DeliveryRecord, ext: &[Extension<'_>]| {
        let mut buf = [0u8; 256];
        let n = rec.encode_with_extensions(ext, &mut buf).unwrap();
        buf[..n].to_vec()
    };
    let mut padded = encode(&MIN_VALUE, &[]);
    padded.resize(64, 0);
    let mut channel = [0u8; 104];
    CHANNEL_VALUE.encode(&mut channel).unwrap();
    let files: [(&str, Vec<u8>); 7] = [
        ("delivery_v1_min.bin", encode(&MIN_VALUE, &[])),
        ("delivery_v1_trace.bin", encode(&TRACE_VALUE, &[])),
        (
            "delivery_v1_unknown_optional.bin",
            encode(
                &TRACE_VALUE,
                &[Extension {
                    tag: 0x7001,
                    critical: false,
                    data: b"from a newer build",
                }],
            ),
        ),
        (
            "delivery_v1_unknown_critical.bin",
            encode(
                &TRACE_VALUE,
                &[Extension {
                    tag: 0x7002,
                    critical: true,
                    data: b"must understand",
                }],
            ),
        ),
        ("delivery_v1_padded.bin", padded),
        ("channel_v1.bin", channel.to_vec()),
        ("stream_v1.bin", build_stream()),
    ];
    for (name, bytes) in files {
        let path = dir.join(name);
        if std::fs::metadata(&path).map_or(true, |m| m.len() == 0) {
            std::fs::write(&path, bytes).unwrap();
        }
    }
}
