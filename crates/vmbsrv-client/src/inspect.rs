//! The save-stream inspector: decodes a save-stream file (`docs/saved-state.md` §6) for a human
//! or a tool and explains every defect precisely (offset, field, expected, found).
//!
//! It walks the stream itself, frame by frame, so that it can keep going after a defect where the
//! format allows (a bad frame checksum still has a length to skip by), and decodes the payloads
//! with vmbsrv's own codec (`ChannelRecord::decode_saved`, `DeliveryRecord::decode_saved`). The
//! KMCL chunks are KMCL's private format; the delivery records the save callback wrote sit inside
//! them verbatim, so the inspector finds them by their envelope magic `VBDR` and decodes each
//! candidate (a candidate that does not decode is reported as a defect with its offset).
//!
//! Nothing here panics on any input, allocates more than a bounded multiple of the input, or
//! loops more than a bounded multiple of the input length (`tests/inspect_fuzz.rs`).
#![forbid(unsafe_code)]

use std::fmt::{self, Write as _};

use serde::Serialize;
use vmbsrv::saved::stream::{
    FRAME_HEADER_LEN, MAX_FRAME_LEN, STREAM_HEADER_LEN, STREAM_MAGIC, STREAM_VERSION,
};
use vmbsrv::saved::{
    ChannelRecord, DeliveryRecord, HEADER_LEN, MAX_RECORD_LEN, RestoreError, crc32c,
};

/// Record envelope magic of a `DeliveryRecord` (`saved-state.md` §3).
const DELIVERY_MAGIC: &[u8; 4] = b"VBDR";
/// Record envelope magic of a `ChannelRecord`.
const CHANNEL_MAGIC: &[u8; 4] = b"VBCR";
/// Frame kind values (`saved-state.md` §6).
const KIND_CHANNEL_RECORD: u16 = 1;
const KIND_KMCL_CHUNK: u16 = 2;
const KIND_END: u16 = 3;
const CRITICAL: u16 = 0x8000;

/// One defect: where, which field, what was expected and what was found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Defect {
    /// Byte offset in the file.
    pub offset: u64,
    /// The field (or structure) at fault.
    pub field: String,
    /// What the format requires there.
    pub expected: String,
    /// What the file holds.
    pub found: String,
    /// What it means.
    pub explanation: String,
}

/// One frame of the stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FrameInfo {
    /// Offset of the frame header in the file.
    pub offset: u64,
    /// The raw kind value.
    pub kind: u16,
    /// Its name.
    pub kind_name: String,
    /// Payload length.
    pub len: u32,
    /// Whether the frame checksum matched.
    pub checksum_ok: bool,
}

/// The decoded channel record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChannelInfo {
    /// Offset of the record in the file.
    pub offset: u64,
    /// Record length.
    pub len: usize,
    /// Next sequence number to assign.
    pub next_sequence: u64,
    /// Negotiated guest protocol version (0 = none).
    pub protocol_version: u32,
    /// `max_in_flight`.
    pub max_in_flight: u32,
    /// `max_message_len`.
    pub max_message_len: u32,
    /// Delivery records the KMCL blob must bring back.
    pub in_flight: u32,
    /// The save's identity, if recorded.
    pub save_id: Option<u64>,
    /// Restores the lineage went through before this save.
    pub restore_generation: Option<u32>,
    /// Counters: posted, acked, nacked, cancelled, bad_acks, guest_requests, guest_bad_requests,
    /// guest_garbled.
    pub stats: [u64; 8],
}

/// One decoded delivery record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeliveryInfo {
    /// Offset of the record in the file.
    pub offset: u64,
    /// Index of the chunk frame it sits in (0-based among chunks).
    pub chunk: usize,
    /// Sequence number.
    pub sequence: u64,
    /// Client tag.
    pub tag: u64,
    /// Payload length.
    pub payload_len: u32,
    /// CRC32C of the payload as posted.
    pub payload_crc: u32,
    /// Attempts.
    pub attempts: u16,
    /// Trace id, hex, if present.
    pub trace_id: Option<String>,
    /// The save identity the record carries.
    pub save_id: Option<u64>,
    /// The record checksum state ("ok": the record decoded, so its checksum matched).
    pub checksum: &'static str,
}

/// Everything the inspector learned about a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct Inspection {
    /// File length.
    pub file_len: u64,
    /// Stream format version, if the header could be read.
    pub stream_version: Option<u16>,
    /// The frames, in order.
    pub frames: Vec<FrameInfo>,
    /// The channel record, if one decoded.
    pub channel: Option<ChannelInfo>,
    /// Every delivery record that decoded, in file order.
    pub deliveries: Vec<DeliveryInfo>,
    /// Every defect found, in file order.
    pub defects: Vec<Defect>,
    /// Whether the stream ended with a valid `End` frame and nothing after it.
    pub complete: bool,
}

impl Inspection {
    /// Whether nothing is wrong with the file.
    pub fn is_clean(&self) -> bool {
        self.defects.is_empty() && self.complete && self.channel.is_some()
    }
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    let b = bytes.get(at..at.checked_add(2)?)?;
    Some(u16::from_le_bytes([b[0], b[1]]))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn show_bytes(bytes: &[u8]) -> String {
    let printable = bytes.iter().all(|b| b.is_ascii_graphic());
    if printable && !bytes.is_empty() {
        format!("\"{}\"", String::from_utf8_lossy(bytes))
    } else {
        let mut s = String::new();
        for b in bytes {
            let _ = write!(s, "{b:02x}");
        }
        format!("0x{s}")
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

struct Walk<'a> {
    file: &'a [u8],
    out: Inspection,
}

impl Walk<'_> {
    fn defect(
        &mut self,
        offset: usize,
        field: &str,
        expected: impl Into<String>,
        found: impl Into<String>,
        explanation: &str,
    ) {
        self.out.defects.push(Defect {
            offset: offset as u64,
            field: field.into(),
            expected: expected.into(),
            found: found.into(),
            explanation: explanation.into(),
        });
    }

    /// Explains why a record at `base` (file offset) failed to decode.
    fn record_defect(
        &mut self,
        base: usize,
        record: &[u8],
        magic: &[u8; 4],
        what: &str,
        err: RestoreError,
    ) {
        let at = |off: usize| base.saturating_add(off);
        match err {
            RestoreError::BadMagic => self.defect(
                at(0),
                &format!("{what}.magic"),
                show_bytes(magic),
                show_bytes(record.get(..4).unwrap_or(record)),
                "not a record of this type",
            ),
            RestoreError::BadChecksum => {
                let total = u32_at(record, 12).map_or(record.len(), |t| t as usize);
                let computed = record.get(8..total.min(record.len())).map_or(0, crc32c);
                self.defect(
                    at(4),
                    &format!("{what}.checksum"),
                    format!("{computed:#010x} (CRC32C of bytes 8..{total})"),
                    format!("{:#010x}", u32_at(record, 4).unwrap_or(0)),
                    "the record is damaged",
                );
            }
            RestoreError::BadLength => self.defect(
                at(12),
                &format!("{what}.total_len"),
                format!(
                    "{HEADER_LEN}..={MAX_RECORD_LEN}, at least header + body, within the frame"
                ),
                u32_at(record, 12).map_or("(missing)".into(), |v| v.to_string()),
                "the record length is invalid",
            ),
            RestoreError::Truncated => self.defect(
                at(0),
                &format!("{what}.total_len"),
                format!("at most the {} bytes available", record.len()),
                u32_at(record, 12).map_or(format!("{} bytes, no header", record.len()), |v| {
                    v.to_string()
                }),
                "the record is truncated",
            ),
            RestoreError::UnsupportedVersion { found } => self.defect(
                at(8),
                &format!("{what}.version"),
                "1",
                found.to_string(),
                "a record version this build cannot read",
            ),
            RestoreError::ReservedNotZero => self.defect(
                at(10),
                &format!("{what}.flags/reserved"),
                "0",
                format!(
                    "flags {:#06x} (or a non-zero reserved body byte)",
                    u16_at(record, 10).unwrap_or(0)
                ),
                "reserved bits must be zero",
            ),
            RestoreError::TrailingBytes => self.defect(
                at(u32_at(record, 12).map_or(0, |t| t as usize)),
                &format!("{what}.padding"),
                "zero bytes after total_len",
                "a non-zero byte",
                "bytes after the record",
            ),
            RestoreError::OutOfRange { field } => self.defect(
                at(HEADER_LEN),
                &format!("{what}.{field}"),
                "a value in its documented range (saved-state.md §5)",
                "out of range",
                "the record's fields are inconsistent",
            ),
            RestoreError::UnknownCriticalField { tag } => self.defect(
                at(HEADER_LEN),
                &format!("{what}.extension"),
                "only known critical extensions",
                format!("critical tag {tag:#06x}"),
                "written by a newer build this one must not restore",
            ),
            other => self.defect(
                at(HEADER_LEN),
                &format!("{what}.extensions"),
                "a well-formed extension area",
                other.to_string(),
                "the record is malformed",
            ),
        }
    }

    fn header(&mut self) -> bool {
        let file = self.file;
        let Some(magic) = file.get(..4) else {
            self.defect(
                0,
                "stream.magic",
                show_bytes(&STREAM_MAGIC),
                format!("{} bytes of file", file.len()),
                "too short to be a save stream",
            );
            return false;
        };
        if magic != STREAM_MAGIC {
            self.defect(
                0,
                "stream.magic",
                show_bytes(&STREAM_MAGIC),
                show_bytes(magic),
                "not a vmbsrv save stream",
            );
            return false;
        }
        let (Some(version), Some(flags)) = (u16_at(file, 4), u16_at(file, 6)) else {
            self.defect(
                4,
                "stream.header",
                format!("{STREAM_HEADER_LEN} bytes"),
                format!("{} bytes", file.len()),
                "the stream header is truncated",
            );
            return false;
        };
        self.out.stream_version = Some(version);
        if version != STREAM_VERSION {
            self.defect(
                4,
                "stream.version",
                STREAM_VERSION.to_string(),
                version.to_string(),
                "a stream version this build cannot read",
            );
            return false;
        }
        if flags != 0 {
            self.defect(
                6,
                "stream.flags",
                "0",
                format!("{flags:#06x}"),
                "reserved flags must be zero",
            );
        }
        true
    }

    fn frames(&mut self) {
        let file = self.file;
        let mut at = STREAM_HEADER_LEN;
        let mut chunk_index = 0usize;
        let mut record_seen = false;
        loop {
            if at == file.len() {
                self.defect(
                    at,
                    "stream.End",
                    "an End frame",
                    "end of file",
                    "the stream is truncated: no End frame",
                );
                return;
            }
            let Some(header) = file.get(at..at.saturating_add(FRAME_HEADER_LEN)) else {
                self.defect(
                    at,
                    "frame.header",
                    format!("{FRAME_HEADER_LEN} bytes"),
                    format!("{} bytes", file.len() - at),
                    "the stream is truncated inside a frame header",
                );
                return;
            };
            let stored = u32_at(header, 0).unwrap_or(0);
            let kind = u16_at(header, 4).unwrap_or(0);
            let reserved = u16_at(header, 6).unwrap_or(0);
            let len = u32_at(header, 8).unwrap_or(0);
            if len as usize > MAX_FRAME_LEN {
                self.defect(
                    at + 8,
                    "frame.len",
                    format!("at most {MAX_FRAME_LEN}"),
                    len.to_string(),
                    "frame length out of bounds: the rest of the file cannot be framed",
                );
                return;
            }
            let payload_at = at + FRAME_HEADER_LEN;
            let Some(payload) = file.get(payload_at..payload_at + len as usize) else {
                self.defect(
                    at + 8,
                    "frame.len",
                    format!("at most the {} bytes left", file.len() - payload_at),
                    len.to_string(),
                    "the stream is truncated inside a frame payload",
                );
                return;
            };
            let computed = crc32c(&file[at + 4..payload_at + len as usize]);
            let checksum_ok = computed == stored;
            let base = kind & !CRITICAL;
            let kind_name = match base {
                KIND_CHANNEL_RECORD => "ChannelRecord".to_string(),
                KIND_KMCL_CHUNK => "KmclChunk".to_string(),
                KIND_END => "End".to_string(),
                0 => "invalid(0)".to_string(),
                other if kind & CRITICAL != 0 => format!("unknown critical ({other:#06x})"),
                other => format!("unknown optional ({other:#06x}), skipped"),
            };
            self.out.frames.push(FrameInfo {
                offset: at as u64,
                kind,
                kind_name,
                len,
                checksum_ok,
            });
            if !checksum_ok {
                self.defect(
                    at,
                    "frame.checksum",
                    format!(
                        "{computed:#010x} (CRC32C of frame bytes 4..{})",
                        FRAME_HEADER_LEN + len as usize
                    ),
                    format!("{stored:#010x}"),
                    "the frame is damaged; its contents are decoded below but must not be trusted",
                );
            }
            if reserved != 0 {
                self.defect(
                    at + 6,
                    "frame.reserved",
                    "0",
                    format!("{reserved:#06x}"),
                    "reserved field must be zero",
                );
            }
            match base {
                KIND_CHANNEL_RECORD => {
                    if record_seen {
                        self.defect(
                            at + 4,
                            "frame.kind",
                            "KmclChunk or End (one ChannelRecord per stream)",
                            "a second ChannelRecord",
                            "a damaged or spliced save",
                        );
                    } else if chunk_index > 0 {
                        self.defect(
                            at + 4,
                            "frame.kind",
                            "ChannelRecord first",
                            "ChannelRecord after a chunk",
                            "frames out of order",
                        );
                    }
                    record_seen = true;
                    self.channel_record(payload_at, payload);
                }
                KIND_KMCL_CHUNK => {
                    if !record_seen {
                        self.defect(
                            at + 4,
                            "frame.kind",
                            "ChannelRecord (the first frame)",
                            "KmclChunk",
                            "a chunk before the channel record",
                        );
                    }
                    self.chunk(payload_at, payload, chunk_index);
                    chunk_index += 1;
                }
                KIND_END => {
                    if len != 0 {
                        self.defect(
                            at + 8,
                            "frame.len",
                            "0 (End is empty)",
                            len.to_string(),
                            "a malformed End frame",
                        );
                    }
                    let after = payload_at + len as usize;
                    if after != file.len() {
                        self.defect(
                            after,
                            "stream.trailing",
                            "end of file after End",
                            format!("{} more bytes", file.len() - after),
                            "bytes after the End frame",
                        );
                    } else {
                        self.out.complete = record_seen && chunk_index > 0 && len == 0;
                    }
                    if !record_seen {
                        self.defect(
                            at,
                            "stream.ChannelRecord",
                            "one ChannelRecord frame",
                            "none",
                            "the stream holds no channel record",
                        );
                    } else if chunk_index == 0 {
                        self.defect(
                            at,
                            "stream.KmclChunk",
                            "at least one KmclChunk frame",
                            "none",
                            "the stream holds no KMCL blob",
                        );
                    }
                    return;
                }
                0 => self.defect(
                    at + 4,
                    "frame.kind",
                    "1 ChannelRecord, 2 KmclChunk, 3 End",
                    "0",
                    "kind 0 is invalid",
                ),
                _ if kind & CRITICAL != 0 => self.defect(
                    at + 4,
                    "frame.kind",
                    "a known kind (critical bit set: must be understood)",
                    format!("{kind:#06x}"),
                    "written by a newer build; a reader must refuse it",
                ),
                _ => {}
            }
            at = payload_at + len as usize;
        }
    }

    fn channel_record(&mut self, base: usize, payload: &[u8]) {
        match ChannelRecord::decode_saved(payload) {
            Ok((record, identity)) => {
                let s = record.stats;
                self.out.channel = Some(ChannelInfo {
                    offset: base as u64,
                    len: payload.len(),
                    next_sequence: record.next_sequence,
                    protocol_version: record.protocol_version,
                    max_in_flight: record.max_in_flight,
                    max_message_len: record.max_message_len,
                    in_flight: record.in_flight,
                    save_id: identity.map(|i| i.save_id),
                    restore_generation: identity.map(|i| i.restore_generation),
                    stats: [
                        s.posted,
                        s.acked,
                        s.nacked,
                        s.cancelled,
                        s.bad_acks,
                        s.guest_requests,
                        s.guest_bad_requests,
                        s.guest_garbled,
                    ],
                });
            }
            Err(err) => self.record_defect(base, payload, CHANNEL_MAGIC, "ChannelRecord", err),
        }
    }

    fn chunk(&mut self, base: usize, chunk: &[u8], index: usize) {
        let mut p = 0usize;
        while let Some(found) = find(chunk, p, DELIVERY_MAGIC) {
            let total = u32_at(chunk, found + 12).map_or(0, |t| t as usize);
            let end = found.saturating_add(total).min(chunk.len());
            let candidate = if (HEADER_LEN..=MAX_RECORD_LEN).contains(&total) {
                &chunk[found..end]
            } else {
                &chunk[found..chunk.len().min(found + HEADER_LEN)]
            };
            match DeliveryRecord::decode_saved(candidate) {
                Ok((record, save_id)) => {
                    self.out.deliveries.push(DeliveryInfo {
                        offset: (base + found) as u64,
                        chunk: index,
                        sequence: record.sequence,
                        tag: record.tag,
                        payload_len: record.payload_len,
                        payload_crc: record.payload_crc,
                        attempts: record.attempts,
                        trace_id: record.trace_id.map(|t| hex(&t)),
                        save_id,
                        checksum: "ok",
                    });
                    p = found + total.max(4);
                }
                Err(err) => {
                    self.record_defect(
                        base + found,
                        candidate,
                        DELIVERY_MAGIC,
                        "DeliveryRecord",
                        err,
                    );
                    p = found + 4;
                }
            }
        }
    }

    fn cross_checks(&mut self) {
        let Some(channel) = self.out.channel.clone() else {
            return;
        };
        let found = self.out.deliveries.len();
        if found != channel.in_flight as usize {
            self.defect(
                channel.offset as usize,
                "ChannelRecord.in_flight",
                format!("{found} (delivery records found in the chunks)"),
                channel.in_flight.to_string(),
                "the KMCL blob does not hold the deliveries the channel record announces",
            );
        }
        let mut seen = std::collections::BTreeSet::new();
        let deliveries = self.out.deliveries.clone();
        for d in &deliveries {
            if d.sequence >= channel.next_sequence {
                self.defect(
                    d.offset as usize + HEADER_LEN,
                    "DeliveryRecord.sequence",
                    format!("below next_sequence {}", channel.next_sequence),
                    d.sequence.to_string(),
                    "a delivery from after the save",
                );
            }
            if !seen.insert(d.sequence) {
                self.defect(
                    d.offset as usize + HEADER_LEN,
                    "DeliveryRecord.sequence",
                    "unique in the save",
                    format!("{} again", d.sequence),
                    "a delivery saved twice",
                );
            }
            if channel.save_id.is_some() && d.save_id != channel.save_id {
                self.defect(
                    d.offset as usize,
                    "DeliveryRecord.save_id",
                    format!("{:?} (the channel record's)", channel.save_id),
                    format!("{:?}", d.save_id),
                    "a record from another save",
                );
            }
        }
    }
}

fn find(haystack: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    let rest = haystack.get(from..)?;
    rest.windows(needle.len())
        .position(|w| w == needle)
        .map(|i| i + from)
}

/// Inspects a save-stream file. Never panics; every problem is a [`Defect`].
pub fn inspect(file: &[u8]) -> Inspection {
    let mut walk = Walk {
        file,
        out: Inspection {
            file_len: file.len() as u64,
            ..Inspection::default()
        },
    };
    if walk.header() {
        walk.frames();
        walk.cross_checks();
    }
    walk.out
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.stream_version {
            Some(v) => writeln!(f, "save stream: {} bytes, version {v}", self.file_len)?,
            None => writeln!(
                f,
                "save stream: {} bytes, no readable header",
                self.file_len
            )?,
        }
        let mut deliveries = self.deliveries.iter().peekable();
        let mut chunk = 0usize;
        for (i, frame) in self.frames.iter().enumerate() {
            writeln!(
                f,
                "frame {i} @{}: {}, {} bytes, checksum {}",
                frame.offset,
                frame.kind_name,
                frame.len,
                if frame.checksum_ok { "ok" } else { "BAD" }
            )?;
            match frame.kind & !CRITICAL {
                KIND_CHANNEL_RECORD => {
                    if let Some(c) = self
                        .channel
                        .as_ref()
                        .filter(|c| c.offset == frame.offset + FRAME_HEADER_LEN as u64)
                    {
                        writeln!(
                            f,
                            "  channel record: next_sequence {}, protocol {:#010x}, max_in_flight {}, max_message_len {}, in_flight {}",
                            c.next_sequence,
                            c.protocol_version,
                            c.max_in_flight,
                            c.max_message_len,
                            c.in_flight
                        )?;
                        match (c.save_id, c.restore_generation) {
                            (Some(id), Some(generation)) => writeln!(
                                f,
                                "  save identity: save_id {id:#018x}, restore_generation {generation}"
                            )?,
                            _ => writeln!(f, "  save identity: none")?,
                        }
                        let [
                            posted,
                            acked,
                            nacked,
                            cancelled,
                            bad_acks,
                            requests,
                            bad_requests,
                            garbled,
                        ] = c.stats;
                        writeln!(
                            f,
                            "  counters: posted {posted}, acked {acked}, nacked {nacked}, cancelled {cancelled}, bad_acks {bad_acks}, guest_requests {requests}, guest_bad_requests {bad_requests}, guest_garbled {garbled}"
                        )?;
                    }
                }
                KIND_KMCL_CHUNK => {
                    while let Some(d) = deliveries.next_if(|d| d.chunk == chunk) {
                        writeln!(
                            f,
                            "  delivery @{}: sequence {}, tag {}, length {}, attempts {}, trace {}, checksum {}",
                            d.offset,
                            d.sequence,
                            d.tag,
                            d.payload_len,
                            d.attempts,
                            d.trace_id.as_deref().unwrap_or("-"),
                            d.checksum
                        )?;
                    }
                    chunk += 1;
                }
                _ => {}
            }
        }
        for d in &self.defects {
            writeln!(
                f,
                "defect @{}: {}: expected {}, found {} ({})",
                d.offset, d.field, d.expected, d.found, d.explanation
            )?;
        }
        write!(
            f,
            "summary: {} frames, channel record {}, {} delivery records, {} defects: {}",
            self.frames.len(),
            if self.channel.is_some() {
                "ok"
            } else {
                "missing"
            },
            self.deliveries.len(),
            self.defects.len(),
            if self.is_clean() { "clean" } else { "DAMAGED" }
        )
    }
}
