//! The save stream: how the host control client lays out a whole channel save in a file.
//!
//! ```text
//! stream header (8) | frame | frame | ... | End frame (12)
//! frame = checksum u32 | kind u16 | reserved u16 | len u32 | payload[len]
//! ```
//!
//! A writer emits one `ChannelRecord` frame, then the KMCL blob as one `KmclChunk` frame per
//! chunk `VmbChannelSaveContinue` produced (restore must feed KMCL whole chunks), then `End`.
//! The framing layer checks integrity and bounds only; the order is the consumer's to check.
//! See docs/saved-state.md §6.

use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::checksum::crc32c;
use super::{CRITICAL_BIT, ChannelRecord, MAX_TAG, RestoreError, SaveError};

/// Magic of a save stream: ASCII `VBSS`.
pub const STREAM_MAGIC: [u8; 4] = *b"VBSS";
/// The stream format version this build writes (and the only one it reads).
pub const STREAM_VERSION: u16 = 1;
/// Size of the stream header.
pub const STREAM_HEADER_LEN: usize = 8;
/// Size of a frame header (checksum, kind, reserved, length).
pub const FRAME_HEADER_LEN: usize = 12;
/// Largest frame payload accepted or written: 16 MiB.
pub const MAX_FRAME_LEN: usize = 16 * 1024 * 1024;

/// Wire value of the frame that terminates a stream (payload always empty).
const KIND_END: u16 = 3;
/// The checksum covers a frame from its `kind` field to the end of its payload.
const CHECKSUMMED_FROM: usize = 4;

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct StreamHeader {
    magic: [u8; 4],
    version: U16,
    flags: U16,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct FrameHeader {
    checksum: U32,
    kind: U16,
    reserved: U16,
    len: U32,
}

const _: () = assert!(size_of::<StreamHeader>() == STREAM_HEADER_LEN);
const _: () = assert!(size_of::<FrameHeader>() == FRAME_HEADER_LEN);

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// An encoded [`ChannelRecord`] (wire kind 1).
    ChannelRecord,
    /// One chunk of the KMCL channel blob, exactly as `VmbChannelSaveContinue` produced it
    /// (wire kind 2).
    KmclChunk,
}

impl FrameKind {
    /// The kind's wire value.
    pub const fn wire(self) -> u16 {
        match self {
            Self::ChannelRecord => 1,
            Self::KmclChunk => 2,
        }
    }
}

/// One frame read from a stream; `payload` borrows the input and has passed the checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// What the payload is.
    pub kind: FrameKind,
    /// The payload bytes (not yet decoded or validated beyond the frame checksum).
    pub payload: &'a [u8],
}

/// Exact size of a frame with a `payload_len`-byte payload, or `None` if it would overflow.
pub const fn frame_len(payload_len: usize) -> Option<usize> {
    FRAME_HEADER_LEN.checked_add(payload_len)
}

/// Writes a save stream into a caller buffer without allocating.
///
/// Space for the `End` frame is reserved from the start, so [`finish`](Self::finish) cannot
/// fail; a `push` that fails writes nothing.
#[derive(Debug)]
pub struct FrameWriter<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> FrameWriter<'a> {
    /// Starts a stream in `buf`, writing the stream header.
    pub fn new(buf: &'a mut [u8]) -> Result<Self, SaveError> {
        let needed = STREAM_HEADER_LEN + FRAME_HEADER_LEN;
        if buf.len() < needed {
            return Err(SaveError::BufferTooSmall { needed });
        }
        let header = StreamHeader {
            magic: STREAM_MAGIC,
            version: U16::new(STREAM_VERSION),
            flags: U16::ZERO,
        };
        buf[..STREAM_HEADER_LEN].copy_from_slice(header.as_bytes());
        Ok(Self {
            buf,
            pos: STREAM_HEADER_LEN,
        })
    }

    /// Bytes written so far, not counting the `End` frame `finish` adds.
    pub fn len(&self) -> usize {
        self.pos
    }

    /// Always `false`: a stream holds at least its header.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Appends a frame carrying a copy of `payload`.
    pub fn push(&mut self, kind: FrameKind, payload: &[u8]) -> Result<(), SaveError> {
        let slot = self.reserve(payload.len())?;
        slot.copy_from_slice(payload);
        self.seal(kind, payload.len());
        Ok(())
    }

    /// Appends a `ChannelRecord` frame, encoding the record in place.
    pub fn push_channel_record(&mut self, record: &ChannelRecord) -> Result<(), SaveError> {
        if let Err(field) = record.validate() {
            return Err(SaveError::InvalidRecord { field });
        }
        let len = record.encoded_len();
        let slot = self.reserve(len)?;
        let written = record.encode(slot)?;
        debug_assert_eq!(written, len);
        self.seal(FrameKind::ChannelRecord, len);
        Ok(())
    }

    /// Writes the `End` frame, zeroes the rest of the buffer, and returns the stream's length.
    pub fn finish(self) -> usize {
        let end = self.pos + FRAME_HEADER_LEN;
        let (frame, rest) = self.buf[self.pos..].split_at_mut(FRAME_HEADER_LEN);
        write_frame_header(frame, KIND_END, 0);
        rest.fill(0);
        end
    }

    /// The payload slot for a frame of `len` bytes, after checking that it and the `End` frame
    /// fit; nothing is written here.
    fn reserve(&mut self, len: usize) -> Result<&mut [u8], SaveError> {
        if len > MAX_FRAME_LEN {
            return Err(SaveError::TooLarge);
        }
        let start = self.pos + FRAME_HEADER_LEN;
        // Cannot overflow: pos <= buf.len() and len <= MAX_FRAME_LEN, but stay checked anyway.
        let needed = start
            .checked_add(len)
            .and_then(|n| n.checked_add(FRAME_HEADER_LEN))
            .ok_or(SaveError::TooLarge)?;
        if self.buf.len() < needed {
            return Err(SaveError::BufferTooSmall { needed });
        }
        Ok(&mut self.buf[start..start + len])
    }

    /// Writes the header of the frame whose payload `reserve` just filled, and advances.
    fn seal(&mut self, kind: FrameKind, len: usize) {
        let frame = &mut self.buf[self.pos..self.pos + FRAME_HEADER_LEN + len];
        write_frame_header(frame, kind.wire(), len);
        self.pos += FRAME_HEADER_LEN + len;
    }
}

/// Fills the header of `frame` (header + payload already in place) including its checksum.
fn write_frame_header(frame: &mut [u8], kind: u16, len: usize) {
    let header = FrameHeader {
        checksum: U32::ZERO,
        kind: U16::new(kind),
        reserved: U16::ZERO,
        // Callers bound len by MAX_FRAME_LEN.
        len: U32::new(len as u32),
    };
    frame[..FRAME_HEADER_LEN].copy_from_slice(header.as_bytes());
    let checksum = crc32c(&frame[CHECKSUMMED_FROM..]);
    frame[..CHECKSUMMED_FROM].copy_from_slice(&checksum.to_le_bytes());
}

/// Reads the frames of an untrusted save stream without copying.
///
/// Yields `ChannelRecord` and `KmclChunk` frames in order, skips frames of unknown kinds whose
/// critical bit is clear, and ends (`None`) after a valid `End` frame that nothing follows. A
/// stream that ends without `End` yields `Err(Truncated)`. After the first error it yields
/// `None`.
#[derive(Debug, Clone)]
pub struct FrameReader<'a> {
    rest: &'a [u8],
    done: bool,
}

impl<'a> FrameReader<'a> {
    /// Checks the stream header and positions the reader on the first frame.
    pub fn new(bytes: &'a [u8]) -> Result<Self, RestoreError> {
        match bytes.get(..4) {
            None => return Err(RestoreError::Truncated),
            Some(m) if m != STREAM_MAGIC => return Err(RestoreError::BadMagic),
            Some(_) => {}
        }
        let (header, rest) =
            StreamHeader::ref_from_prefix(bytes).map_err(|_| RestoreError::Truncated)?;
        if header.version.get() != STREAM_VERSION {
            return Err(RestoreError::UnsupportedVersion {
                found: header.version.get(),
            });
        }
        if header.flags.get() != 0 {
            return Err(RestoreError::ReservedNotZero);
        }
        Ok(Self { rest, done: false })
    }

    fn next_frame(&mut self) -> Result<Option<Frame<'a>>, RestoreError> {
        loop {
            let (header, after) =
                FrameHeader::ref_from_prefix(self.rest).map_err(|_| RestoreError::Truncated)?;
            let len = usize::try_from(header.len.get()).map_err(|_| RestoreError::BadLength)?;
            if len > MAX_FRAME_LEN {
                return Err(RestoreError::BadLength);
            }
            let (payload, after) = after.split_at_checked(len).ok_or(RestoreError::Truncated)?;
            // FRAME_HEADER_LEN + len <= self.rest.len() was just established.
            let covered = &self.rest[CHECKSUMMED_FROM..FRAME_HEADER_LEN + len];
            if crc32c(covered) != header.checksum.get() {
                return Err(RestoreError::BadChecksum);
            }
            if header.reserved.get() != 0 {
                return Err(RestoreError::ReservedNotZero);
            }
            self.rest = after;
            let raw_kind = header.kind.get();
            let kind = match raw_kind & MAX_TAG {
                1 => FrameKind::ChannelRecord,
                2 => FrameKind::KmclChunk,
                KIND_END => {
                    if len != 0 {
                        return Err(RestoreError::BadLength);
                    }
                    if !self.rest.is_empty() {
                        return Err(RestoreError::TrailingBytes);
                    }
                    return Ok(None);
                }
                0 => return Err(RestoreError::UnknownFrameKind { kind: raw_kind }),
                _ if raw_kind & CRITICAL_BIT != 0 => {
                    return Err(RestoreError::UnknownFrameKind { kind: raw_kind });
                }
                // An optional frame from a newer writer.
                _ => continue,
            };
            return Ok(Some(Frame { kind, payload }));
        }
    }
}

impl<'a> Iterator for FrameReader<'a> {
    type Item = Result<Frame<'a>, RestoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let item = self.next_frame().transpose();
        if !matches!(item, Some(Ok(_))) {
            self.done = true;
        }
        item
    }
}

impl core::iter::FusedIterator for FrameReader<'_> {}
