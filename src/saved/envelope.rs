//! The part every record type shares: the 16-byte header ("envelope") and the extension area.
//!
//! The header is frozen across all format versions of all record types, so any reader can check
//! magic, length and checksum of a record written by any other build before it looks at the
//! version. See docs/saved-state.md §2.

use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::checksum::crc32c;
use super::{
    CRITICAL_BIT, EXTENSION_ENTRY_HEADER_LEN, Extension, HEADER_LEN, MAX_EXTENSION_DATA_LEN,
    MAX_RECORD_LEN, MAX_TAG, RestoreError, SaveError,
};

/// Offset of the first byte the checksum covers: everything after the checksum field itself, so
/// the covered bytes are one contiguous slice and the checksum is a single `crc32c` call.
const CHECKSUMMED_FROM: usize = 8;

/// The record header, byte for byte. Alignment 1, so it can overlay any byte slice.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct Header {
    magic: [u8; 4],
    checksum: U32,
    version: U16,
    flags: U16,
    total_len: U32,
}

const _: () = assert!(size_of::<Header>() == HEADER_LEN);
const _: () = assert!(CHECKSUMMED_FROM == 4 + size_of::<U32>());

/// What [`open`] hands to the per-type decoder: header fields that depend on the version, and
/// the bytes after the header up to `total_len`.
pub(crate) struct Opened<'a> {
    pub(crate) version: u16,
    pub(crate) flags: u16,
    pub(crate) rest: &'a [u8],
}

/// Checks the version-independent envelope of an untrusted record: magic, `total_len` within
/// limits and within the input, checksum, and that everything after `total_len` is zero.
pub(crate) fn open<'a>(magic: [u8; 4], bytes: &'a [u8]) -> Result<Opened<'a>, RestoreError> {
    match bytes.get(..4) {
        None => return Err(RestoreError::Truncated),
        Some(m) if m != magic => return Err(RestoreError::BadMagic),
        Some(_) => {}
    }
    let (header, _) = Header::ref_from_prefix(bytes).map_err(|_| RestoreError::Truncated)?;
    // A length beyond u32 cannot occur on the 32/64-bit targets this runs on, but stay total.
    let total = usize::try_from(header.total_len.get()).map_err(|_| RestoreError::BadLength)?;
    if !(HEADER_LEN..=MAX_RECORD_LEN).contains(&total) {
        return Err(RestoreError::BadLength);
    }
    let (record, trailing) = bytes
        .split_at_checked(total)
        .ok_or(RestoreError::Truncated)?;
    let covered = record
        .get(CHECKSUMMED_FROM..)
        .ok_or(RestoreError::Truncated)?;
    if crc32c(covered) != header.checksum.get() {
        return Err(RestoreError::BadChecksum);
    }
    if trailing.iter().any(|&b| b != 0) {
        return Err(RestoreError::TrailingBytes);
    }
    let rest = record.get(HEADER_LEN..).ok_or(RestoreError::Truncated)?;
    Ok(Opened {
        version: header.version.get(),
        flags: header.flags.get(),
        rest,
    })
}

/// Iterates the entries of an untrusted extension area, enforcing its framing rules: entry
/// headers and data inside the area, tag numbers non-zero and strictly ascending (so no tag
/// appears twice), data within [`MAX_EXTENSION_DATA_LEN`].
pub(crate) struct Entries<'a> {
    area: &'a [u8],
    last_tag: u16,
}

impl<'a> Entries<'a> {
    pub(crate) fn new(area: &'a [u8]) -> Self {
        Self { area, last_tag: 0 }
    }
}

impl<'a> Iterator for Entries<'a> {
    type Item = Result<Extension<'a>, RestoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.area.is_empty() {
            return None;
        }
        let entry = parse_entry(self.area, self.last_tag);
        match entry {
            Ok((ext, rest)) => {
                self.area = rest;
                self.last_tag = ext.tag;
                Some(Ok(ext))
            }
            Err(e) => {
                // Fuse: after a framing error nothing that follows can be trusted.
                self.area = &[];
                Some(Err(e))
            }
        }
    }
}

fn parse_entry(area: &[u8], last_tag: u16) -> Result<(Extension<'_>, &[u8]), RestoreError> {
    let (head, rest) = area
        .split_at_checked(EXTENSION_ENTRY_HEADER_LEN)
        .ok_or(RestoreError::MalformedExtension)?;
    let raw_tag = u16::from_le_bytes([head[0], head[1]]);
    let len = usize::from(u16::from_le_bytes([head[2], head[3]]));
    let tag = raw_tag & MAX_TAG;
    if tag == 0 || tag <= last_tag || len > MAX_EXTENSION_DATA_LEN {
        return Err(RestoreError::MalformedExtension);
    }
    let (data, rest) = rest
        .split_at_checked(len)
        .ok_or(RestoreError::MalformedExtension)?;
    let ext = Extension {
        tag,
        critical: raw_tag & CRITICAL_BIT != 0,
        data,
    };
    Ok((ext, rest))
}

/// Total encoded size of a record, after checking the caller-supplied `extra` entries. `known`
/// are the entries this build writes for the value (trusted, ascending); `known_tags` is every
/// tag the record type defines, present or not, which `extra` must not use.
pub(crate) fn encoded_len(
    body_len: usize,
    known: &[Extension<'_>],
    known_tags: &[u16],
    extra: &[Extension<'_>],
) -> Result<usize, SaveError> {
    let mut total = HEADER_LEN + body_len;
    for ext in known {
        total += EXTENSION_ENTRY_HEADER_LEN + ext.data.len();
    }
    let mut last_tag = 0;
    for ext in extra {
        if ext.tag == 0
            || ext.tag > MAX_TAG
            || ext.tag <= last_tag
            || known_tags.contains(&ext.tag)
            || ext.data.len() > MAX_EXTENSION_DATA_LEN
        {
            return Err(SaveError::InvalidExtension);
        }
        last_tag = ext.tag;
        total = total
            .checked_add(EXTENSION_ENTRY_HEADER_LEN + ext.data.len())
            .ok_or(SaveError::TooLarge)?;
    }
    if total > MAX_RECORD_LEN {
        return Err(SaveError::TooLarge);
    }
    Ok(total)
}

/// Writes a complete record into `buf` and zeroes the rest of `buf`. `total` must come from
/// [`encoded_len`] for the same arguments; everything that can fail is checked before the first
/// byte is written, so on error `buf` is untouched.
pub(crate) fn write(
    magic: [u8; 4],
    version: u16,
    body: &[u8],
    known: &[Extension<'_>],
    extra: &[Extension<'_>],
    total: usize,
    buf: &mut [u8],
) -> Result<usize, SaveError> {
    if buf.len() < total {
        return Err(SaveError::BufferTooSmall { needed: total });
    }
    let total_len = u32::try_from(total).map_err(|_| SaveError::TooLarge)?;
    let (record, rest) = buf.split_at_mut(total);
    let header = Header {
        magic,
        checksum: U32::ZERO,
        version: U16::new(version),
        flags: U16::ZERO,
        total_len: U32::new(total_len),
    };
    let (head, tail) = record.split_at_mut(HEADER_LEN);
    head.copy_from_slice(header.as_bytes());
    let (body_out, mut ext_out) = tail.split_at_mut(body.len());
    body_out.copy_from_slice(body);

    // Merge the two ascending lists so the area stays sorted whatever tags the extras use.
    let (mut k, mut x) = (known.iter().peekable(), extra.iter().peekable());
    loop {
        let next = match (k.peek(), x.peek()) {
            (Some(a), Some(b)) if a.tag < b.tag => k.next(),
            (Some(_), Some(_)) => x.next(),
            (Some(_), None) => k.next(),
            (None, Some(_)) => x.next(),
            (None, None) => break,
        };
        if let Some(ext) = next {
            ext_out = put_entry(ext, ext_out);
        }
    }
    debug_assert!(ext_out.is_empty(), "encoded_len and write disagree");
    rest.fill(0);

    let checksum = crc32c(&record[CHECKSUMMED_FROM..]);
    record[4..CHECKSUMMED_FROM].copy_from_slice(&checksum.to_le_bytes());
    Ok(total)
}

fn put_entry<'b>(ext: &Extension<'_>, out: &'b mut [u8]) -> &'b mut [u8] {
    let raw_tag = if ext.critical {
        ext.tag | CRITICAL_BIT
    } else {
        ext.tag
    };
    // `encoded_len` bounded the length by MAX_EXTENSION_DATA_LEN, far below u16::MAX.
    let len = ext.data.len() as u16;
    let (head, rest) = out.split_at_mut(EXTENSION_ENTRY_HEADER_LEN);
    head[..2].copy_from_slice(&raw_tag.to_le_bytes());
    head[2..].copy_from_slice(&len.to_le_bytes());
    let (data, rest) = rest.split_at_mut(ext.data.len());
    data.copy_from_slice(ext.data);
    rest
}
