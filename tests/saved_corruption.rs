//! Exhaustive damage tests: every single-byte corruption (every position, every non-zero XOR
//! mask) and every truncation of valid records and streams is rejected.

use vmbsrv::saved::stream::{FrameKind, FrameReader, FrameWriter};
use vmbsrv::saved::{
    ChannelRecord, ChannelStats, DeliveryRecord, Extension, PRIVATE_TAG_MIN, RestoreError,
};

fn delivery(trace: bool) -> DeliveryRecord {
    DeliveryRecord {
        sequence: 0x0102_0304_0506_0708,
        tag: 0x1112_1314_1516_1718,
        posted_at: 0x2122_2324_2526_2728,
        payload_len: 512,
        payload_crc: 0x3132_3334,
        attempts: 2,
        trace_id: trace.then_some([0xC3; 16]),
    }
}

fn channel() -> ChannelRecord {
    ChannelRecord {
        next_sequence: 77,
        protocol_version: 0x0002_0001,
        max_in_flight: 128,
        max_message_len: 8192,
        in_flight: 5,
        stats: ChannelStats {
            posted: 76,
            acked: 60,
            nacked: 6,
            cancelled: 5,
            bad_acks: 1,
            guest_requests: 12,
            guest_bad_requests: 2,
            guest_garbled: 1,
        },
    }
}

/// A decoder reduced to success or failure, so record types can share the loops below.
type Decode = fn(&[u8]) -> Result<(), RestoreError>;

/// Valid encodings under test, each with its decoder.
fn samples() -> Vec<(&'static str, Vec<u8>, Decode)> {
    fn enc(rec: &DeliveryRecord, ext: &[Extension<'_>]) -> Vec<u8> {
        let mut buf = vec![0u8; 512];
        let n = rec.encode_with_extensions(ext, &mut buf).unwrap();
        buf.truncate(n);
        buf
    }
    let d: Decode = |b| DeliveryRecord::decode(b).map(drop);
    let c: Decode = |b| ChannelRecord::decode(b).map(drop);
    let mut chan = vec![0u8; 104];
    channel().encode(&mut chan).unwrap();
    let unknown = [
        Extension {
            tag: PRIVATE_TAG_MIN,
            critical: false,
            data: b"newer",
        },
        Extension {
            tag: PRIVATE_TAG_MIN + 9,
            critical: false,
            data: &[],
        },
    ];
    vec![
        ("delivery", enc(&delivery(false), &[]), d),
        ("delivery+trace", enc(&delivery(true), &[]), d),
        ("delivery+trace+unknown", enc(&delivery(true), &unknown), d),
        ("channel", chan, c),
    ]
}

#[test]
fn samples_are_valid() {
    for (name, bytes, decode) in samples() {
        assert_eq!(decode(&bytes), Ok(()), "{name}");
    }
}

#[test]
fn every_single_byte_corruption_is_rejected() {
    for (name, bytes, decode) in samples() {
        for pos in 0..bytes.len() {
            for mask in 1..=255u8 {
                let mut damaged = bytes.clone();
                damaged[pos] ^= mask;
                let err = decode(&damaged).expect_err(name);
                // Where the error is predictable, pin it: damage reads as damage.
                match pos {
                    0..4 => assert_eq!(err, RestoreError::BadMagic, "{name} @{pos}"),
                    4..8 => assert_eq!(err, RestoreError::BadChecksum, "{name} @{pos}"),
                    12..16 => {}
                    _ => assert_eq!(err, RestoreError::BadChecksum, "{name} @{pos} ^{mask:#x}"),
                }
            }
        }
    }
}

#[test]
fn every_single_byte_corruption_with_padding_is_rejected() {
    for (name, bytes, decode) in samples() {
        let mut padded = bytes.clone();
        padded.resize(bytes.len() + 16, 0);
        assert_eq!(decode(&padded), Ok(()), "{name}");
        for pos in 0..padded.len() {
            for mask in [0x01, 0x80, 0xFF, 0x5A] {
                let mut damaged = padded.clone();
                damaged[pos] ^= mask;
                let err = decode(&damaged).expect_err(name);
                if pos >= bytes.len() {
                    assert_eq!(err, RestoreError::TrailingBytes, "{name} @{pos}");
                }
            }
        }
    }
}

#[test]
fn every_truncation_is_rejected() {
    for (name, bytes, decode) in samples() {
        for len in 0..bytes.len() {
            let err = decode(&bytes[..len]).expect_err(name);
            assert_eq!(err, RestoreError::Truncated, "{name} cut at {len}");
            // A truncated record padded back to size with zeros must fail too, unless the cut
            // only removed bytes that were zero anyway (then it is the same record).
            let mut refilled = bytes[..len].to_vec();
            refilled.resize(bytes.len(), 0);
            if refilled != bytes {
                assert!(
                    decode(&refilled).is_err(),
                    "{name} cut at {len}, zero-filled"
                );
            }
        }
    }
}

fn stream() -> Vec<u8> {
    let mut buf = vec![0u8; 512];
    let mut w = FrameWriter::new(&mut buf).unwrap();
    w.push_channel_record(&channel()).unwrap();
    w.push(FrameKind::KmclChunk, b"first KMCL chunk").unwrap();
    w.push(FrameKind::KmclChunk, &[0; 7]).unwrap();
    let n = w.finish();
    buf.truncate(n);
    buf
}

/// Reads a whole stream: `Ok` only if the header and every frame are valid up to `End`.
fn read_stream(bytes: &[u8]) -> Result<usize, RestoreError> {
    let mut frames = 0;
    for frame in FrameReader::new(bytes)? {
        frame?;
        frames += 1;
    }
    Ok(frames)
}

#[test]
fn every_single_byte_stream_corruption_is_rejected() {
    let bytes = stream();
    assert_eq!(read_stream(&bytes), Ok(3));
    for pos in 0..bytes.len() {
        for mask in 1..=255u8 {
            let mut damaged = bytes.clone();
            damaged[pos] ^= mask;
            assert!(read_stream(&damaged).is_err(), "@{pos} ^{mask:#x}");
        }
    }
}

#[test]
fn every_stream_truncation_and_extension_is_rejected() {
    let bytes = stream();
    for len in 0..bytes.len() {
        assert!(read_stream(&bytes[..len]).is_err(), "cut at {len}");
    }
    for extra in [0u8, 1, 0xFF] {
        let mut longer = bytes.clone();
        longer.push(extra);
        assert_eq!(read_stream(&longer), Err(RestoreError::TrailingBytes));
    }
}
