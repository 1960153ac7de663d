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

const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

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

/// The library's per-packet state (the restore callback's `LibBuf`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LibState {
    pub(crate) location: Location,
    pub(crate) txid: u64,
    pub(crate) flags: u32,
    pub(crate) session: u64,
    pub(crate) payload: Vec<u8>,
}

/// One unit of the stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Unit {
    /// Start of a save.
    Begin,
    /// One packet: encoded [`LibState`], the driver's bytes, and the size of the buffer the second
    /// save call was given.
    Packet {
        lib: Vec<u8>,
        driver: Vec<u8>,
        driver_alloc: u32,
    },
    /// End of the save, with the number of packet units.
    End { packets: u32 },
}

/// A decoded chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Chunk {
    pub(crate) index: u32,
    pub(crate) session: u64,
    pub(crate) last: bool,
    pub(crate) units: Vec<Unit>,
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
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
pub(crate) fn encode_lib(state: &LibState) -> Vec<u8> {
    let mut out = Vec::with_capacity(LIB_HEADER_LEN + state.payload.len() + 4);
    out.extend_from_slice(&LIB_MAGIC);
    put_u16(&mut out, FORMAT_VERSION);
    out.push(state.location as u8);
    out.push(0);
    put_u64(&mut out, state.txid);
    put_u32(&mut out, state.flags);
    put_u32(&mut out, len_u32(state.payload.len()));
    put_u64(&mut out, state.session);
    out.extend_from_slice(&state.payload);
    let crc = CRC.checksum(&out);
    put_u32(&mut out, crc);
    out
}

/// Decodes and validates a `LibBuf`.
pub(crate) fn decode_lib(bytes: &[u8]) -> Result<LibState, NtStatus> {
    let bad = NtStatus::INVALID_PARAMETER;
    let body_len = bytes.len().checked_sub(4).ok_or(bad)?;
    let (body, crc) = bytes.split_at(body_len);
    let crc = u32::from_le_bytes(crc.try_into().map_err(|_| bad)?);
    if CRC.checksum(body) != crc {
        return Err(NtStatus::DATA_ERROR);
    }
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
    let payload = r.take(payload_len).ok_or(bad)?.to_vec();
    if !r.bytes.is_empty() {
        return Err(bad);
    }
    Ok(LibState {
        location,
        txid,
        flags,
        session,
        payload,
    })
}

/// Encodes one unit (its header and body).
pub(crate) fn encode_unit(unit: &Unit) -> Vec<u8> {
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

/// Writes a chunk (header + the already encoded `units`) into `out`, which must be exactly
/// `CHUNK_HEADER_LEN + units.len()` bytes.
pub(crate) fn write_chunk(out: &mut [u8], index: u32, session: u64, last: bool, units: &[u8]) {
    let mut header = Vec::with_capacity(CHUNK_HEADER_LEN);
    header.extend_from_slice(&CHUNK_MAGIC);
    put_u16(&mut header, FORMAT_VERSION);
    put_u16(&mut header, if last { FLAG_LAST } else { 0 });
    put_u32(&mut header, index);
    put_u64(&mut header, session);
    put_u32(&mut header, len_u32(units.len()));
    put_u32(&mut header, 0);
    let mut digest = CRC.digest();
    digest.update(&header);
    digest.update(units);
    let crc = digest.finalize().to_le_bytes();
    if let Some(slot) = header.get_mut(CHUNK_HEADER_LEN - 4..) {
        slot.copy_from_slice(&crc);
    }
    for (dst, src) in out.iter_mut().zip(header.iter().chain(units.iter())) {
        *dst = *src;
    }
}

/// Decodes and validates one whole chunk (the exact bytes of one `VmbChannelSaveContinue` output).
///
/// Errors: `STATUS_INVALID_PARAMETER` for framing (too short, wrong magic, a length that does not
/// match the buffer — truncated or re-chunked input); `STATUS_REVISION_MISMATCH` for an unknown
/// version; `STATUS_DATA_ERROR` for a checksum mismatch or malformed units.
pub(crate) fn decode_chunk(bytes: &[u8]) -> Result<Chunk, NtStatus> {
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
    let mut digest = CRC.digest();
    digest.update(header.get(..CHUNK_HEADER_LEN - 4).ok_or(bad)?);
    digest.update(&[0, 0, 0, 0]);
    digest.update(body);
    if digest.finalize() != crc {
        return Err(NtStatus::DATA_ERROR);
    }
    if version != FORMAT_VERSION {
        return Err(NtStatus::REVISION_MISMATCH);
    }
    if flags & !FLAG_LAST != 0 {
        return Err(NtStatus::DATA_ERROR);
    }
    let corrupt = NtStatus::DATA_ERROR;
    let mut units = Vec::new();
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
                let lib = u.take(lib_len).ok_or(corrupt)?.to_vec();
                let driver = u.take(drv_len).ok_or(corrupt)?.to_vec();
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

    #[test]
    fn chunk_round_trip() {
        let units = vec![
            Unit::Begin,
            Unit::Packet {
                lib: vec![1; 5],
                driver: vec![2; 3],
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
