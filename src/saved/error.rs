//! Typed errors of the saved-state codec. The VSP maps them to `NTSTATUS`; this module knows none.

use core::fmt;

/// Why bytes could not be restored into a value. Every variant means "reject the whole blob".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RestoreError {
    /// The input ends before the structure it announces (header, `total_len`, frame, end marker).
    Truncated,
    /// The first four bytes are not the magic of the expected structure.
    BadMagic,
    /// The format version is not one this build reads (`found` is the raw value).
    UnsupportedVersion {
        /// The version field as stored.
        found: u16,
    },
    /// A length field is outside its limits or inconsistent with the version's fixed layout.
    BadLength,
    /// The stored CRC32C does not match the covered bytes.
    BadChecksum,
    /// A flag or reserved field that must be zero in this version is not.
    ReservedNotZero,
    /// An extension tag this build does not know carries the critical bit.
    UnknownCriticalField {
        /// The tag number (critical bit removed).
        tag: u16,
    },
    /// The extension area is not a well-formed, ascending list of entries, or a known entry has
    /// the wrong size or appears twice.
    MalformedExtension,
    /// A field's value is outside its documented range, or fields contradict each other.
    OutOfRange {
        /// The name of the field (as in the Rust value) that failed.
        field: &'static str,
    },
    /// Non-zero bytes follow the record, or any bytes follow a stream's end frame.
    TrailingBytes,
    /// A save-stream frame has an unknown kind with the critical bit set.
    UnknownFrameKind {
        /// The frame kind as stored (critical bit included).
        kind: u16,
    },
}

impl fmt::Display for RestoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated => f.write_str("saved state is truncated"),
            Self::BadMagic => f.write_str("saved state has the wrong magic"),
            Self::UnsupportedVersion { found } => {
                write!(f, "saved-state format version {found} is not supported")
            }
            Self::BadLength => f.write_str("saved-state length field is invalid"),
            Self::BadChecksum => f.write_str("saved-state checksum mismatch"),
            Self::ReservedNotZero => f.write_str("saved-state reserved bits are not zero"),
            Self::UnknownCriticalField { tag } => {
                write!(f, "saved state has unknown critical extension {tag:#06x}")
            }
            Self::MalformedExtension => f.write_str("saved-state extension area is malformed"),
            Self::OutOfRange { field } => write!(f, "saved-state field `{field}` is out of range"),
            Self::TrailingBytes => f.write_str("saved state has trailing bytes"),
            Self::UnknownFrameKind { kind } => {
                write!(f, "save stream has unknown critical frame kind {kind:#06x}")
            }
        }
    }
}

impl core::error::Error for RestoreError {}

/// Why a value could not be saved. On any of these the output buffer is left untouched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SaveError {
    /// The buffer is shorter than the encoding; `needed` is the exact size required.
    BufferTooSmall {
        /// Exact number of bytes the encoding needs.
        needed: usize,
    },
    /// The value violates a documented range, so no reader would accept it; saving it would only
    /// move the failure to restore time.
    InvalidRecord {
        /// The name of the offending field.
        field: &'static str,
    },
    /// An extra extension has tag 0, a tag above `MAX_TAG`, a tag this build already
    /// writes itself, data longer than `MAX_EXTENSION_DATA_LEN`, or the list is not
    /// strictly ascending by tag.
    InvalidExtension,
    /// The encoding would exceed the format's size limit for this structure.
    TooLarge,
}

impl fmt::Display for SaveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BufferTooSmall { needed } => {
                write!(f, "save buffer too small: {needed} bytes needed")
            }
            Self::InvalidRecord { field } => write!(f, "record field `{field}` is out of range"),
            Self::InvalidExtension => f.write_str("invalid extension entry"),
            Self::TooLarge => f.write_str("encoding exceeds the format's size limit"),
        }
    }
}

impl core::error::Error for SaveError {}
