//! Untrusted saved-state bytes into both record decoders and the save-stream reader.
//!
//! Properties: nothing panics; whatever decodes re-encodes to bytes that decode to the same
//! value; whatever frames a stream yields re-frame into a stream that yields the same frames.
//!
//! Random bytes almost never carry a valid CRC32C, which would confine the fuzzer to the
//! envelope checks. So besides the raw input, each run also decodes a "sealed" variant whose
//! magic, length and checksums are repaired, letting it explore bodies, extension areas and
//! frame sequences.
#![no_main]
// `cfg!(overflow_checks)` in `checked_build` (fuzz builds are nightly-only).
#![feature(cfg_overflow_checks)]

#[path = "../common/checked_build.rs"]
mod checked_build;

use libfuzzer_sys::fuzz_target;
use vmbsrv::saved::stream::{FrameKind, FrameReader, FrameWriter};
use vmbsrv::saved::{ChannelRecord, DeliveryRecord, MAX_RECORD_LEN, crc32c};

fuzz_target!(|data: &[u8]| {
    check_records(data);
    check_stream(data);
    if let Some((&mode, rest)) = data.split_first() {
        if mode & 4 == 0 {
            if let Some(sealed) = seal_record(mode, rest) {
                check_records(&sealed);
            }
        } else if let Some(sealed) = seal_stream(rest) {
            check_stream(&sealed);
        }
    }
});

fn check_records(bytes: &[u8]) {
    if let Ok(rec) = DeliveryRecord::decode(bytes) {
        let mut buf = [0u8; DeliveryRecord::MAX_ENCODED_LEN];
        let n = rec.encode(&mut buf).expect("a decoded record must encode");
        assert_eq!(n, rec.encoded_len());
        assert_eq!(DeliveryRecord::decode(&buf[..n]), Ok(rec));
    }
    if let Ok(rec) = ChannelRecord::decode(bytes) {
        let mut buf = [0u8; ChannelRecord::ENCODED_LEN];
        let n = rec.encode(&mut buf).expect("a decoded record must encode");
        assert_eq!(ChannelRecord::decode(&buf[..n]), Ok(rec));
    }
    // The save identity survives a round trip (docs/saved-state.md §5.3).
    if let Ok((rec, id)) = DeliveryRecord::decode_saved(bytes) {
        let mut buf = [0u8; DeliveryRecord::MAX_SAVED_LEN];
        let n = rec
            .encode_saved(id, &mut buf)
            .expect("a decoded record must encode");
        assert_eq!(n, rec.encoded_len_saved(id));
        assert_eq!(DeliveryRecord::decode_saved(&buf[..n]), Ok((rec, id)));
    }
    if let Ok((rec, identity)) = ChannelRecord::decode_saved(bytes) {
        let mut buf = [0u8; ChannelRecord::ENCODED_LEN + 20];
        let n = rec
            .encode_saved(identity, &mut buf)
            .expect("a decoded record must encode");
        assert_eq!(n, rec.encoded_len_saved(identity));
        assert_eq!(ChannelRecord::decode_saved(&buf[..n]), Ok((rec, identity)));
    }
}

fn check_stream(bytes: &[u8]) {
    let Ok(reader) = FrameReader::new(bytes) else {
        return;
    };
    let mut frames = Vec::new();
    for frame in reader {
        match frame {
            Ok(f) => frames.push(f),
            Err(_) => return,
        }
    }
    // A valid stream cannot be longer than its input, so re-framing fits in input-sized space
    // plus headers (skipped unknown frames only make the copy smaller).
    let mut buf = vec![0u8; bytes.len() + 32];
    let mut w = FrameWriter::new(&mut buf).expect("room for an empty stream");
    for f in &frames {
        w.push(f.kind, f.payload).expect("re-framing fits");
    }
    let n = w.finish();
    let again: Vec<_> = FrameReader::new(&buf[..n])
        .expect("own stream header")
        .collect::<Result<_, _>>()
        .expect("own stream reads back");
    assert_eq!(frames, again);
    for f in frames {
        if f.kind == FrameKind::ChannelRecord {
            check_records(f.payload);
        }
    }
}

/// `rest` as a record of the type `mode` picks, with magic, checksum and (unless `mode` bit 1
/// asks to keep the fuzzed one) `total_len` made consistent.
fn seal_record(mode: u8, rest: &[u8]) -> Option<Vec<u8>> {
    if rest.len() < 16 {
        return None;
    }
    let mut rec = rest.to_vec();
    let magic = if mode & 1 == 0 {
        DeliveryRecord::MAGIC
    } else {
        ChannelRecord::MAGIC
    };
    rec[..4].copy_from_slice(&magic);
    if mode & 2 == 0 {
        let len = rec.len().min(MAX_RECORD_LEN) as u32;
        rec[12..16].copy_from_slice(&len.to_le_bytes());
    }
    let total = u32::from_le_bytes(rec[12..16].try_into().unwrap()) as usize;
    if (16..=rec.len()).contains(&total) {
        let c = crc32c(&rec[8..total]);
        rec[4..8].copy_from_slice(&c.to_le_bytes());
    }
    Some(rec)
}

/// `rest` as a stream with a valid header and every frame checksum that fits repaired.
fn seal_stream(rest: &[u8]) -> Option<Vec<u8>> {
    if rest.len() < 8 {
        return None;
    }
    let mut s = rest.to_vec();
    s[..8].copy_from_slice(b"VBSS\x01\x00\x00\x00");
    let mut pos = 8;
    while pos + 12 <= s.len() {
        let len = u32::from_le_bytes(s[pos + 8..pos + 12].try_into().unwrap()) as usize;
        let Some(end) = (pos + 12).checked_add(len).filter(|&e| e <= s.len()) else {
            break;
        };
        let c = crc32c(&s[pos + 4..end]);
        s[pos..pos + 4].copy_from_slice(&c.to_le_bytes());
        pos = end;
    }
    Some(s)
}
