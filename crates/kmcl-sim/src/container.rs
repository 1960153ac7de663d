//! The simulator's own saved-state container (it stands in for KMCL's private format).
//!
//! ```text
//! chunk  := header(32) unit*                      one VmbChannelSaveContinue output
//! header := magic "VSIMSAVE" | version u16 | flags u16 (bit 0: last chunk) | index u32
//!           | session u64 | body_len u32 | crc32c u32 (over header with crc = 0, then body)
//! unit   := kind u8 | 0 0 0 | len u32 | body[len]  never split across chunks
//!   kind 1 Begin  := format u32                    first unit of chunk 0
//!   kind 2 Packet := lib_len u32 | drv_len u32 | drv_alloc u32 | lib | drv
//!   kind 3 End    := packet_units u32              last unit of the last chunk
//! lib    := magic "VSLB" | version u16 | location u8 | 0 | txid u64 | flags u32
//!           | payload_len u32 | session u64 | payload | crc32c u32   (the LibBuf)
//! ```
//!
//! All integers little-endian. Everything is validated on decode; nothing here panics on any input.

use std::vec::Vec;

use kmcl::NtStatus;

use super::crc32c::{self, Crc32c};

/// Chunk magic.
const CHUNK_MAGIC: [u8; 8] = *b"VSIMSAVE";
/// Container format version this simulator writes and reads.
pub(crate) const FORMAT_VERSION: u16 = 1;
/// Bytes of a chunk header.
pub(crate) const CHUNK_HEADER_LEN: usize = 32;
const UNIT_HEADER_LEN: usize = 8;
const LIB_MAGIC: [u8; 4] = *b"VSLB";
const LIB_HEADER_LEN: usize = 32;
const FLAG_LAST: u16 = 1;

/// Where a saved packet was when it was saved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Location {
    /// Allocated, never sent (only saved with `save_unsent_packets`).
    Idle = 0,
    /// On the host-side queue: host memory, re-sent after restore.
    HostQueue = 1,
    /// In the host → guest ring, unread: guest memory.
    Ring = 2,
    /// Read by the guest, not completed: guest memory.
    Delivered = 3,
}

impl Location {
    fn from_u8(value: u8) -> Option<Location> {
        match value {
            0 => Some(Location::Idle),
            1 => Some(Location::HostQueue),
            2 => Some(Location::Ring),
            3 => Some(Location::Delivered),
            _ => None,
        }
    }
}

/// The library's per-packet state (the restore callback's `LibBuf`), owned (tests).
#[cfg(test)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LibState {
    pub(crate) location: Location,
    pub(crate) txid: u64,
    pub(crate) flags: u32,
    pub(crate) session: u64,
    pub(crate) payload: Vec<u8>,
}

/// A decoded `LibBuf`, borrowing its payload from the bytes it was decoded from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LibView<'a> {
    pub(crate) location: Location,
    pub(crate) txid: u64,
    pub(crate) flags: u32,
    pub(crate) session: u64,
    pub(crate) payload: &'a [u8],
}

/// One unit of the stream (a decoded packet unit borrows from the chunk bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Unit<'a> {
    /// Start of a save.
    Begin,
    /// One packet: encoded [`LibState`], the driver's bytes, and the size of the buffer the second
    /// save call was given.
    Packet {
        lib: &'a [u8],
        driver: &'a [u8],
        driver_alloc: u32,
    },
    /// End of the save, with the number of packet units.
    End { packets: u32 },
}

/// A decoded chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Chunk<'a> {
    pub(crate) index: u32,
    pub(crate) session: u64,
    pub(crate) last: bool,
    pub(crate) units: Vec<Unit<'a>>,
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// A bounds-checked little-endian reader.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.bytes.len() {
            return None;
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).and_then(|b| b.first().copied())
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2)?.try_into().ok().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)?.try_into().ok().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)?.try_into().ok().map(u64::from_le_bytes)
    }
}

fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Encodes a [`LibState`].
#[cfg(test)]
pub(crate) fn encode_lib(state: &LibState) -> Vec<u8> {
    let mut out = Vec::new();
    encode_lib_into(
        &mut out,
        state.location,
        state.txid,
        state.flags,
        state.session,
        &state.payload,
    );
    out
}

/// Appends an encoded `LibBuf` to `out`; returns its length.
pub(crate) fn encode_lib_into(
    out: &mut Vec<u8>,
    location: Location,
    txid: u64,
    flags: u32,
    session: u64,
    payload: &[u8],
) -> usize {
    let start = out.len();
    let mut header = [0u8; LIB_HEADER_LEN];
    header[..4].copy_from_slice(&LIB_MAGIC);
    header[4..6].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[6] = location as u8;
    header[8..16].copy_from_slice(&txid.to_le_bytes());
    header[16..20].copy_from_slice(&flags.to_le_bytes());
    header[20..24].copy_from_slice(&len_u32(payload.len()).to_le_bytes());
    header[24..32].copy_from_slice(&session.to_le_bytes());
    let mut digest = Crc32c::new();
    digest.update(&header);
    digest.update(payload);
    out.extend_from_slice(&header);
    out.extend_from_slice(payload);
    out.extend_from_slice(&digest.finish().to_le_bytes());
    out.len() - start
}

/// Decodes and validates a `LibBuf` (owned copy; the simulator itself uses [`decode_lib_view`]).
#[cfg(test)]
pub(crate) fn decode_lib(bytes: &[u8]) -> Result<LibState, NtStatus> {
    decode_lib_view(bytes).map(|v| LibState {
        location: v.location,
        txid: v.txid,
        flags: v.flags,
        session: v.session,
        payload: v.payload.to_vec(),
    })
}

/// Decodes and validates a `LibBuf`, borrowing the payload.
pub(crate) fn decode_lib_view(bytes: &[u8]) -> Result<LibView<'_>, NtStatus> {
    let bad = NtStatus::INVALID_PARAMETER;
    let body_len = bytes.len().checked_sub(4).ok_or(bad)?;
    let (body, crc) = bytes.split_at(body_len);
    let crc = u32::from_le_bytes(crc.try_into().map_err(|_| bad)?);
    if crc32c::checksum(body) != crc {
        return Err(NtStatus::DATA_ERROR);
    }
    decode_lib_body(body)
}

/// The fields of a `LibBuf` body (its CRC already checked). A whole header is read in place: the
/// same checks, in the same order, with the same results as [`decode_lib_body_reader`], which
/// handles a truncated one.
fn decode_lib_body(body: &[u8]) -> Result<LibView<'_>, NtStatus> {
    let bad = NtStatus::INVALID_PARAMETER;
    if let Some((header, payload)) = body.split_first_chunk::<LIB_HEADER_LEN>() {
        let field = |at: usize| -> [u8; 8] {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&header[at..at + 8]);
            bytes
        };
        if header[..4] != LIB_MAGIC {
            return Err(bad);
        }
        if u16::from_le_bytes([header[4], header[5]]) != FORMAT_VERSION {
            return Err(NtStatus::REVISION_MISMATCH);
        }
        let location = Location::from_u8(header[6]).ok_or(bad)?;
        let txid = u64::from_le_bytes(field(8));
        let flags = u32::from_le_bytes([header[16], header[17], header[18], header[19]]);
        let payload_len = u32::from_le_bytes([header[20], header[21], header[22], header[23]]);
        let session = u64::from_le_bytes(field(24));
        if payload.len() != payload_len as usize {
            return Err(bad);
        }
        return Ok(LibView {
            location,
            txid,
            flags,
            session,
            payload,
        });
    }
    decode_lib_body_reader(body)
}

/// [`decode_lib_body`] field by field with a bounds-checked reader.
fn decode_lib_body_reader(body: &[u8]) -> Result<LibView<'_>, NtStatus> {
    let bad = NtStatus::INVALID_PARAMETER;
    let mut r = Reader { bytes: body };
    if r.take(4) != Some(&LIB_MAGIC[..]) {
        return Err(bad);
    }
    if r.u16() != Some(FORMAT_VERSION) {
        return Err(NtStatus::REVISION_MISMATCH);
    }
    let location = r.u8().and_then(Location::from_u8).ok_or(bad)?;
    let _reserved = r.u8().ok_or(bad)?;
    let txid = r.u64().ok_or(bad)?;
    let flags = r.u32().ok_or(bad)?;
    let payload_len = r.u32().ok_or(bad)? as usize;
    let session = r.u64().ok_or(bad)?;
    let payload = r.take(payload_len).ok_or(bad)?;
    if !r.bytes.is_empty() {
        return Err(bad);
    }
    Ok(LibView {
        location,
        txid,
        flags,
        session,
        payload,
    })
}

/// Appends the start of a packet unit to `out` (its header and sizes, to be completed by
/// [`finish_packet_unit`] once the `LibBuf` and the driver's bytes follow); returns where the unit
/// starts.
pub(crate) fn start_packet_unit(out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.extend_from_slice(&[2, 0, 0, 0]);
    out.extend_from_slice(&[0u8; 16]);
    start
}

/// Completes the packet unit that starts at `start` in `out`, whose `LibBuf` of `lib_len` bytes
/// was appended after [`start_packet_unit`]: appends the driver's bytes and fills in the sizes.
pub(crate) fn finish_packet_unit(
    out: &mut Vec<u8>,
    start: usize,
    lib_len: usize,
    driver: &[u8],
    driver_alloc: u32,
) {
    out.extend_from_slice(driver);
    let body_len = out.len() - start - UNIT_HEADER_LEN;
    let mut sizes = [0u8; 16];
    sizes[..4].copy_from_slice(&len_u32(body_len).to_le_bytes());
    sizes[4..8].copy_from_slice(&len_u32(lib_len).to_le_bytes());
    sizes[8..12].copy_from_slice(&len_u32(driver.len()).to_le_bytes());
    sizes[12..16].copy_from_slice(&driver_alloc.to_le_bytes());
    if let Some(slot) = out.get_mut(start + 4..start + 20) {
        slot.copy_from_slice(&sizes);
    }
}

/// Encodes one unit (its header and body).
pub(crate) fn encode_unit(unit: &Unit<'_>) -> Vec<u8> {
    let mut body = Vec::new();
    let kind = match unit {
        Unit::Begin => {
            put_u32(&mut body, u32::from(FORMAT_VERSION));
            1
        }
        Unit::Packet {
            lib,
            driver,
            driver_alloc,
        } => {
            put_u32(&mut body, len_u32(lib.len()));
            put_u32(&mut body, len_u32(driver.len()));
            put_u32(&mut body, *driver_alloc);
            body.extend_from_slice(lib);
            body.extend_from_slice(driver);
            2
        }
        Unit::End { packets } => {
            put_u32(&mut body, *packets);
            3
        }
    };
    let mut out = Vec::with_capacity(UNIT_HEADER_LEN + body.len());
    out.push(kind);
    out.extend_from_slice(&[0, 0, 0]);
    put_u32(&mut out, len_u32(body.len()));
    out.extend_from_slice(&body);
    out
}

/// Writes a chunk (header + the already encoded `units`) into `out` (tests: the simulator
/// assembles chunks from [`chunk_header`]), which must be exactly
/// `CHUNK_HEADER_LEN + units.len()` bytes.
#[cfg(test)]
pub(crate) fn write_chunk(out: &mut [u8], index: u32, session: u64, last: bool, units: &[u8]) {
    let header = chunk_header(index, session, last, units);
    let (head, body) = out.split_at_mut(CHUNK_HEADER_LEN.min(out.len()));
    head.copy_from_slice(&header[..head.len()]);
    let n = body.len().min(units.len());
    body[..n].copy_from_slice(&units[..n]);
}

/// The header (checksum included) of a chunk whose body is `units`.
pub(crate) fn chunk_header(
    index: u32,
    session: u64,
    last: bool,
    units: &[u8],
) -> [u8; CHUNK_HEADER_LEN] {
    let mut header = [0u8; CHUNK_HEADER_LEN];
    header[..8].copy_from_slice(&CHUNK_MAGIC);
    header[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[10..12].copy_from_slice(&(if last { FLAG_LAST } else { 0 }).to_le_bytes());
    header[12..16].copy_from_slice(&index.to_le_bytes());
    header[16..24].copy_from_slice(&session.to_le_bytes());
    header[24..28].copy_from_slice(&len_u32(units.len()).to_le_bytes());
    let mut digest = Crc32c::new();
    digest.update(&header);
    digest.update(units);
    header[28..32].copy_from_slice(&digest.finish().to_le_bytes());
    header
}

/// Decodes and validates one whole chunk (the exact bytes of one `VmbChannelSaveContinue` output).
///
/// Errors: `STATUS_INVALID_PARAMETER` for framing (too short, wrong magic, a length that does not
/// match the buffer — truncated or re-chunked input); `STATUS_REVISION_MISMATCH` for an unknown
/// version; `STATUS_DATA_ERROR` for a checksum mismatch or malformed units.
pub(crate) fn decode_chunk(bytes: &[u8]) -> Result<Chunk<'_>, NtStatus> {
    let bad = NtStatus::INVALID_PARAMETER;
    if bytes.len() < CHUNK_HEADER_LEN {
        return Err(bad);
    }
    let (header, body) = bytes.split_at(CHUNK_HEADER_LEN);
    let mut r = Reader { bytes: header };
    if r.take(8) != Some(&CHUNK_MAGIC[..]) {
        return Err(bad);
    }
    let version = r.u16().ok_or(bad)?;
    let flags = r.u16().ok_or(bad)?;
    let index = r.u32().ok_or(bad)?;
    let session = r.u64().ok_or(bad)?;
    let body_len = r.u32().ok_or(bad)? as usize;
    let crc = r.u32().ok_or(bad)?;
    if body_len != body.len() {
        return Err(bad);
    }
    let mut digest = Crc32c::new();
    digest.update(header.get(..CHUNK_HEADER_LEN - 4).ok_or(bad)?);
    digest.update(&[0, 0, 0, 0]);
    digest.update(body);
    if digest.finish() != crc {
        return Err(NtStatus::DATA_ERROR);
    }
    if version != FORMAT_VERSION {
        return Err(NtStatus::REVISION_MISMATCH);
    }
    if flags & !FLAG_LAST != 0 {
        return Err(NtStatus::DATA_ERROR);
    }
    let corrupt = NtStatus::DATA_ERROR;
    let mut units = Vec::with_capacity(body.len() / 128 + 2);
    let mut r = Reader { bytes: body };
    while !r.bytes.is_empty() {
        let kind = r.u8().ok_or(corrupt)?;
        if r.take(3) != Some(&[0u8, 0, 0][..]) {
            return Err(corrupt);
        }
        let len = r.u32().ok_or(corrupt)? as usize;
        let mut u = Reader {
            bytes: r.take(len).ok_or(corrupt)?,
        };
        let unit = match kind {
            1 => {
                if u.u32() != Some(u32::from(FORMAT_VERSION)) {
                    return Err(corrupt);
                }
                Unit::Begin
            }
            2 => {
                let lib_len = u.u32().ok_or(corrupt)? as usize;
                let drv_len = u.u32().ok_or(corrupt)? as usize;
                let driver_alloc = u.u32().ok_or(corrupt)?;
                let lib = u.take(lib_len).ok_or(corrupt)?;
                let driver = u.take(drv_len).ok_or(corrupt)?;
                if (driver_alloc as usize) < drv_len {
                    return Err(corrupt);
                }
                Unit::Packet {
                    lib,
                    driver,
                    driver_alloc,
                }
            }
            3 => Unit::End {
                packets: u.u32().ok_or(corrupt)?,
            },
            _ => return Err(corrupt),
        };
        if !u.bytes.is_empty() {
            return Err(corrupt);
        }
        units.push(unit);
    }
    if units.is_empty() {
        return Err(corrupt);
    }
    Ok(Chunk {
        index,
        session,
        last: flags & FLAG_LAST != 0,
        units,
    })
}

#[cfg(test)]
mod tests {
    use std::vec;

    use super::*;

    fn chunk(index: u32, last: bool, units: &[Unit]) -> Vec<u8> {
        let body: Vec<u8> = units.iter().flat_map(encode_unit).collect();
        let mut out = vec![0u8; CHUNK_HEADER_LEN + body.len()];
        write_chunk(&mut out, index, 42, last, &body);
        out
    }

    #[test]
    fn lib_round_trip_and_corruption() {
        let state = LibState {
            location: Location::Delivered,
            txid: 9,
            flags: 1,
            session: 77,
            payload: vec![1, 2, 3],
        };
        let bytes = encode_lib(&state);
        assert_eq!(decode_lib(&bytes), Ok(state));
        let mut bad = bytes.clone();
        bad[12] ^= 1;
        assert_eq!(decode_lib(&bad), Err(NtStatus::DATA_ERROR));
        assert!(decode_lib(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode_lib(&[]).is_err());
    }

    /// The in-place header read gives the reader's answer (value or error status) for every
    /// truncation, every single-byte change and a longer and a shorter payload length.
    #[test]
    fn the_in_place_lib_decode_is_the_reader_decode() {
        let state = LibState {
            location: Location::Ring,
            txid: 0x0102_0304_0506_0708,
            flags: 0x11,
            session: 0xAABB_CCDD,
            payload: (0..40u8).collect(),
        };
        let bytes = encode_lib(&state);
        let body = &bytes[..bytes.len() - 4];
        let mut bodies: Vec<Vec<u8>> = (0..=body.len()).map(|n| body[..n].to_vec()).collect();
        for at in 0..body.len() {
            for value in [0u8, 1, 2, 3, 4, 0x7F, 0xFF] {
                let mut changed = body.to_vec();
                changed[at] = value;
                bodies.push(changed);
            }
        }
        let mut longer = body.to_vec();
        longer.push(0);
        bodies.push(longer);
        for body in &bodies {
            assert_eq!(
                decode_lib_body(body),
                decode_lib_body_reader(body),
                "{body:?}"
            );
        }
    }

    #[test]
    fn a_packet_unit_built_in_place_is_the_encoded_unit() {
        let payload = [7u8; 11];
        let mut lib = Vec::new();
        encode_lib_into(&mut lib, Location::Ring, 5, 1, 9, &payload);
        let expected = encode_unit(&Unit::Packet {
            lib: &lib,
            driver: &[3, 4, 5],
            driver_alloc: 35,
        });
        let mut out = vec![0xEE];
        let start = start_packet_unit(&mut out);
        let lib_len = encode_lib_into(&mut out, Location::Ring, 5, 1, 9, &payload);
        finish_packet_unit(&mut out, start, lib_len, &[3, 4, 5], 35);
        assert_eq!(&out[1..], &expected[..]);
    }

    #[test]
    fn chunk_round_trip() {
        let units = vec![
            Unit::Begin,
            Unit::Packet {
                lib: &[1; 5],
                driver: &[2; 3],
                driver_alloc: 35,
            },
            Unit::End { packets: 1 },
        ];
        let bytes = chunk(0, true, &units);
        let decoded = decode_chunk(&bytes).unwrap();
        assert_eq!(decoded.units, units);
        assert!(decoded.last);
        assert_eq!(decoded.session, 42);
    }

    #[test]
    fn chunk_rejects_bad_input() {
        let bytes = chunk(3, false, &[Unit::End { packets: 0 }]);
        // Truncated.
        assert_eq!(
            decode_chunk(&bytes[..bytes.len() - 1]),
            Err(NtStatus::INVALID_PARAMETER)
        );
        // Two chunks in one buffer.
        let mut two = bytes.clone();
        two.extend_from_slice(&bytes);
        assert_eq!(decode_chunk(&two), Err(NtStatus::INVALID_PARAMETER));
        // Flipped bit anywhere.
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(decode_chunk(&bad).is_err(), "flip at {i}");
        }
        assert!(decode_chunk(&[]).is_err());
    }
}
