//! Per-record encode and validated decode of a typical `DeliveryRecord` (56 bytes, no trace id)
//! against, in the same run:
//!
//! * `memcpy`: copying the same 56 bytes — the physical limit of producing or consuming them;
//! * `memcpy+crc`: the copy plus the same CRC32C over the same 48 bytes (written into, or checked
//!   against, the header) — the limit for a *checksummed* copy, which the format requires. Two
//!   ways: CRC of the copy just written, or of the source while copying; the latter is the limit (the
//!   faster one, and the baseline the ratio targets use);
//! * `postcard+crc`: the same fields through serde + postcard (varints) with the same CRC32C
//!   over the encoded bytes and the same range checks — what a user would pick instead.
//!
//! The table printed at the end holds the medians of criterion's samples and the ratios the
//! targets in docs/performance.md are judged by.

mod common;

use std::hint::black_box;

use common::{Recorder, ns, print_machine_line, ratio};
use serde::{Deserialize, Serialize};
use vmbsrv::saved::{DeliveryRecord, crc32c};

/// Offset of the first checksummed byte of a record (the header's CRC covers 8..total_len).
const COVERED_FROM: usize = 8;
const LEN: usize = DeliveryRecord::MIN_ENCODED_LEN;

/// The typical record every bench measures (testkit fixture).
fn typical() -> DeliveryRecord {
    vmbsrv_testkit::fixtures::typical_delivery_record()
}

/// The same fields, serde-derived, for postcard.
#[derive(Serialize, Deserialize)]
struct PostcardRecord {
    sequence: u64,
    tag: u64,
    posted_at: u64,
    payload_len: u32,
    payload_crc: u32,
    attempts: u16,
    trace_id: Option<[u8; 16]>,
}

/// postcard + CRC32C: validate, serialize, append the CRC of the serialized bytes.
fn postcard_encode(record: &DeliveryRecord, buf: &mut [u8]) -> Option<usize> {
    record.validate().ok()?;
    let value = PostcardRecord {
        sequence: record.sequence,
        tag: record.tag,
        posted_at: record.posted_at,
        payload_len: record.payload_len,
        payload_crc: record.payload_crc,
        attempts: record.attempts,
        trace_id: record.trace_id,
    };
    let used = postcard::to_slice(&value, buf).ok()?.len();
    let crc = crc32c(&buf[..used]);
    buf.get_mut(used..used + 4)?
        .copy_from_slice(&crc.to_le_bytes());
    Some(used + 4)
}

/// postcard + CRC32C: check the CRC, deserialize, apply the same range checks as the codec.
fn postcard_decode(bytes: &[u8]) -> Option<DeliveryRecord> {
    let (body, crc) = bytes.split_at_checked(bytes.len().checked_sub(4)?)?;
    if crc32c(body).to_le_bytes() != crc {
        return None;
    }
    let value: PostcardRecord = postcard::from_bytes(body).ok()?;
    let record = DeliveryRecord {
        sequence: value.sequence,
        tag: value.tag,
        posted_at: value.posted_at,
        payload_len: value.payload_len,
        payload_crc: value.payload_crc,
        attempts: value.attempts,
        trace_id: value.trace_id,
    };
    record.validate().ok()?;
    Some(record)
}

/// Diagnostic only, not the codec: the same 56 bytes as `DeliveryRecord::encode` (asserted equal
/// in `main`), but every field stored straight into the output buffer instead of into stack
/// temporaries (`BodyV1`, `Header`) that are then copied. Measures what the codec's encode would
/// cost without those temporaries (docs/performance.md §2).
fn encode_in_place(record: &DeliveryRecord, buf: &mut [u8]) -> Option<usize> {
    record.validate().ok()?;
    let (out, rest) = buf.split_at_mut_checked(LEN)?;
    out[0..4].copy_from_slice(&DeliveryRecord::MAGIC);
    out[8..10].copy_from_slice(&DeliveryRecord::VERSION.to_le_bytes());
    out[10..12].fill(0);
    out[12..16].copy_from_slice(&(LEN as u32).to_le_bytes());
    out[16..24].copy_from_slice(&record.sequence.to_le_bytes());
    out[24..32].copy_from_slice(&record.tag.to_le_bytes());
    out[32..40].copy_from_slice(&record.posted_at.to_le_bytes());
    out[40..44].copy_from_slice(&record.payload_len.to_le_bytes());
    out[44..48].copy_from_slice(&record.payload_crc.to_le_bytes());
    out[48..50].copy_from_slice(&record.attempts.to_le_bytes());
    out[50..56].fill(0);
    rest.fill(0);
    let crc = crc32c(&out[COVERED_FROM..]);
    out[4..COVERED_FROM].copy_from_slice(&crc.to_le_bytes());
    Some(LEN)
}

/// Every buffer the benches read or write starts on a cache line, so that a run's figures do not
/// depend on where ASLR happened to put the stack (a 56-byte record split across two lines, and
/// store-to-load forwarding across the split, moved the memcpy+crc baseline by ±30% between runs).
#[repr(C, align(64))]
struct Line<const N: usize>([u8; N]);

/// Diagnostic only, not the codec: the same 56 bytes again (asserted equal in `main`), assembled
/// as six little-endian `u64` words in registers, checksummed from those words and stored once
/// each — no narrow store is ever reloaded by the CRC (docs/performance.md §2).
fn encode_words(record: &DeliveryRecord, buf: &mut [u8]) -> Option<usize> {
    record.validate().ok()?;
    let (out, rest) = buf.split_at_mut_checked(LEN)?;
    let words: [u64; 6] = [
        1 | ((LEN as u64) << 32),
        record.sequence,
        record.tag,
        record.posted_at,
        u64::from(record.payload_len) | (u64::from(record.payload_crc) << 32),
        u64::from(record.attempts),
    ];
    let bytes = words.map(u64::to_le_bytes);
    let crc = crc32c(bytes.as_flattened());
    let head = u64::from_le_bytes([b'V', b'B', b'D', b'R', 0, 0, 0, 0]) | (u64::from(crc) << 32);
    let (h, body) = out.split_at_mut(8);
    h.copy_from_slice(&head.to_le_bytes());
    for (chunk, word) in body.chunks_exact_mut(8).zip(words) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    rest.fill(0);
    Some(LEN)
}

fn main() {
    let mut c = common::criterion();
    let rec = Recorder::new();
    let record = typical();
    let mut encoded_line = Line([0u8; LEN]);
    assert_eq!(record.encode(&mut encoded_line.0), Ok(LEN));
    let encoded = &encoded_line.0;
    let mut postcard_bytes = [0u8; 64];
    let postcard_len = postcard_encode(&record, &mut postcard_bytes).expect("postcard");
    let postcard_bytes = &postcard_bytes[..postcard_len];
    assert_eq!(postcard_decode(postcard_bytes), Some(record));
    let mut sketch = [0u8; LEN];
    assert_eq!(encode_in_place(&record, &mut sketch), Some(LEN));
    assert_eq!(
        &sketch, encoded,
        "the diagnostic encoder must produce the codec's bytes"
    );
    let traced = DeliveryRecord {
        trace_id: Some([0x42; 16]),
        ..record
    };
    let mut traced_line = Line([0u8; DeliveryRecord::MAX_ENCODED_LEN]);
    let traced_bytes = &mut traced_line.0;
    traced.encode(traced_bytes).expect("encode traced");
    // What the decode rows time must be the accepting path, not an early error.
    assert_eq!(DeliveryRecord::decode(encoded), Ok(record));
    assert_eq!(DeliveryRecord::decode(&*traced_bytes), Ok(traced));

    let mut group = c.benchmark_group("codec");
    let mut out_line = Line([0u8; 128]);
    let out = &mut out_line.0;

    // ---- encode side
    rec.bench(&mut group, "encode", || {
        black_box(&record).encode(black_box(&mut out[..LEN]))
    });
    rec.bench(&mut group, "encode memcpy", || {
        let dst = black_box(&mut out[..LEN]);
        dst.copy_from_slice(black_box(encoded));
    });
    rec.bench(&mut group, "encode memcpy+crc", || {
        let dst = black_box(&mut out[..LEN]);
        dst.copy_from_slice(black_box(encoded));
        let crc = crc32c(&dst[COVERED_FROM..]);
        dst[4..COVERED_FROM].copy_from_slice(&crc.to_le_bytes());
    });
    rec.bench(&mut group, "encode memcpy+crc of source", || {
        let src = black_box(encoded);
        let dst = black_box(&mut out[..LEN]);
        dst.copy_from_slice(src);
        let crc = crc32c(&src[COVERED_FROM..]);
        dst[4..COVERED_FROM].copy_from_slice(&crc.to_le_bytes());
    });
    rec.bench(&mut group, "encode postcard+crc", || {
        postcard_encode(black_box(&record), black_box(&mut out[..]))
    });
    rec.bench(&mut group, "encode in-place sketch", || {
        encode_in_place(black_box(&record), black_box(&mut out[..LEN]))
    });
    let mut words = [0u8; LEN];
    assert_eq!(encode_words(&record, &mut words), Some(LEN));
    assert_eq!(
        &words, encoded,
        "the diagnostic encoder must produce the codec's bytes"
    );
    rec.bench(&mut group, "encode words sketch", || {
        encode_words(black_box(&record), black_box(&mut out[..LEN]))
    });
    rec.bench(&mut group, "encode with trace id (76 B)", || {
        black_box(&traced).encode(black_box(&mut out[..DeliveryRecord::MAX_ENCODED_LEN]))
    });

    // ---- decode side
    rec.bench(&mut group, "decode", || {
        DeliveryRecord::decode(black_box(encoded))
    });
    rec.bench(&mut group, "decode memcpy", || {
        let dst = black_box(&mut out[..LEN]);
        dst.copy_from_slice(black_box(encoded));
    });
    rec.bench(&mut group, "decode memcpy+crc", || {
        let dst = black_box(&mut out[..LEN]);
        dst.copy_from_slice(black_box(encoded));
        crc32c(&dst[COVERED_FROM..]).to_le_bytes() == dst[4..COVERED_FROM]
    });
    rec.bench(&mut group, "decode memcpy+crc of source", || {
        let src = black_box(encoded);
        let ok = crc32c(&src[COVERED_FROM..]).to_le_bytes() == src[4..COVERED_FROM];
        black_box(&mut out[..LEN]).copy_from_slice(src);
        ok
    });
    rec.bench(&mut group, "decode postcard+crc", || {
        postcard_decode(black_box(postcard_bytes))
    });
    rec.bench(&mut group, "decode with trace id (76 B)", || {
        DeliveryRecord::decode(black_box(&*traced_bytes))
    });
    group.finish();

    print_machine_line("per-record codec, DeliveryRecord 56 B (median ns of criterion samples)");
    println!("postcard encoding of the same record: {postcard_len} B (incl. 4 B CRC) vs {LEN} B");
    // The checksummed-copy limit the targets are judged by: a copy with the CRC of the source
    // computed while copying. (CRC of the bytes just written is the other way; it waits on
    // store-to-load forwarding and is normally the slower one, and the noisier.)
    let limit = |side: &str| rec.median(&format!("{side} memcpy+crc of source"));
    println!(
        "| op | vmbsrv (ns) | memcpy (ns) | memcpy+crc of copy (ns) | memcpy+crc of source (ns) | postcard+crc (ns) | / memcpy | / memcpy+crc of source (limit) | postcard+crc / vmbsrv |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for side in ["encode", "decode"] {
        let own = rec.median(side);
        let memcpy = rec.median(&format!("{side} memcpy"));
        let postcard = rec.median(&format!("{side} postcard+crc"));
        println!(
            "| {side} | {} | {} | {} | {} | {} | {} | {} | {} |",
            ns(own),
            ns(memcpy),
            ns(rec.median(&format!("{side} memcpy+crc"))),
            ns(rec.median(&format!("{side} memcpy+crc of source"))),
            ns(postcard),
            ratio(own, memcpy),
            ratio(own, limit(side)),
            ratio(postcard, own),
        );
    }
    println!(
        "diagnostic: encode with fields stored in place (same bytes, not the codec): {} ns = {} limit",
        ns(rec.median("encode in-place sketch")),
        ratio(rec.median("encode in-place sketch"), limit("encode")),
    );
    println!(
        "diagnostic: encode from u64 words, CRC before storing (same bytes, not the codec): {} ns = {} limit",
        ns(rec.median("encode words sketch")),
        ratio(rec.median("encode words sketch"), limit("encode")),
    );
    println!(
        "with trace id (76 B): encode {} ns, decode {} ns",
        ns(rec.median("encode with trace id (76 B)")),
        ns(rec.median("decode with trace id (76 B)"))
    );
    let verdict = |name: &str, ratio: Option<f64>, ok: fn(f64) -> bool| {
        let (value, verdict) = match ratio {
            Some(r) if ok(r) => (format!("{r:.2}"), "met"),
            Some(r) => (format!("{r:.2}"), "MISSED"),
            None => ("-".into(), "not measured"),
        };
        println!("target {name}: {value} -> {verdict}");
    };
    let over = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
    let encode_ratio = over(rec.median("encode"), limit("encode"));
    let decode_ratio = over(rec.median("decode"), limit("decode"));
    let postcard_over_encode = over(rec.median("encode postcard+crc"), rec.median("encode"));
    let postcard_over_decode = over(rec.median("decode postcard+crc"), rec.median("decode"));
    verdict("encode / memcpy+crc <= 1.5", encode_ratio, |r| r <= 1.5);
    verdict("decode / memcpy+crc <= 1.5", decode_ratio, |r| r <= 1.5);
    verdict("postcard+crc / encode >= 6", postcard_over_encode, |r| {
        r >= 6.0
    });
    verdict("postcard+crc / decode >= 6", postcard_over_decode, |r| {
        r >= 6.0
    });
    c.final_summary();
    // One machine-readable line, last: ratios to the memcpy+CRC-of-source limit
    // (the faster checksummed copy), 2 decimals; `-` for what did not run (a criterion filter).
    let fixed =
        |v: Option<f64>, digits: usize| v.map_or("-".to_owned(), |v| format!("{v:.digits$}"));
    println!(
        "SUMMARY codec encode_ratio={} decode_ratio={} postcard_over_encode={} postcard_over_decode={} encode_ns={} decode_ns={}",
        fixed(encode_ratio, 2),
        fixed(decode_ratio, 2),
        fixed(postcard_over_encode, 2),
        fixed(postcard_over_decode, 2),
        fixed(rec.median("encode"), 2),
        fixed(rec.median("decode"), 2),
    );
}
