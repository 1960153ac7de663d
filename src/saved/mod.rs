//! Saved-state records: the durable, versioned byte format of what vmbsrv saves.
//!
//! These bytes outlive the driver that wrote them (a VM saved under vmbsrv N is restored under
//! N+1, and after a rollback N may meet N+1's bytes) and come back from a file that may be
//! damaged or forged, so this module treats every input as hostile: it never panics, never
//! allocates, checks every length before use and every field before returning a value.
//! The byte-level specification is `docs/saved-state.md`; this code implements it.
//!
//! * [`DeliveryRecord`] — one outstanding host->guest delivery, saved per packet via KMCL.
//!   56 bytes, 76 with a trace id.
//! * [`ChannelRecord`] — the VSP's channel-level state, 104 bytes.
//! * [`stream`] — the framing the control client uses to put a whole channel save in a file.
//!
//! Each record is a frozen 16-byte header (magic, CRC32C, version, flags, total length), a fixed
//! little-endian body per version, and an extension area of tagged entries: unknown optional
//! entries are skipped, unknown critical ones reject the record.
//!
//! Encoding writes exactly `encoded_len()` bytes and zeroes the rest of the buffer, or writes
//! nothing at all. Decoding accepts trailing zero padding but nothing else after a record.
#![forbid(unsafe_code)]

mod channel;
mod checksum;
mod delivery;
mod envelope;
mod error;
pub mod stream;

pub use channel::{
    ChannelRecord, ChannelStats, MAX_IN_FLIGHT_LIMIT, SaveIdentity, TAG_CHANNEL_SAVE_IDENTITY,
};
pub use checksum::crc32c;
pub use delivery::{DeliveryRecord, MAX_PAYLOAD_LEN, TAG_SAVE_ID, TAG_TRACE_ID};
pub use error::{RestoreError, SaveError};

/// Size of the record header every record type and version starts with.
pub const HEADER_LEN: usize = 16;

/// Largest record any reader accepts or any writer produces, header and extensions included.
/// Part of the frozen header contract: it bounds what a restore ever has to scan.
pub const MAX_RECORD_LEN: usize = 4096;

/// Largest data of one extension entry.
pub const MAX_EXTENSION_DATA_LEN: usize = 1024;

/// Size of an extension entry's header (tag `u16`, length `u16`).
pub const EXTENSION_ENTRY_HEADER_LEN: usize = 4;

/// Bit 15 of a stored extension tag (and of a stream frame kind): a reader that does not know
/// the tag must reject the record instead of skipping the entry.
pub const CRITICAL_BIT: u16 = 0x8000;

/// Largest extension tag number (the 15 bits below [`CRITICAL_BIT`]). Tag 0 is invalid.
pub const MAX_TAG: u16 = 0x7FFF;

/// First of the tag numbers `0x7000..=0x7FFF` the format never assigns: free for tests and
/// experiments, so a record built with them stays "unknown" to every future reader.
pub const PRIVATE_TAG_MIN: u16 = 0x7000;

/// One entry of a record's extension area, as written by
/// [`DeliveryRecord::encode_with_extensions`] / [`ChannelRecord::encode_with_extensions`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Extension<'a> {
    /// Tag number, `1..=MAX_TAG` (without the critical bit).
    pub tag: u16,
    /// Whether a reader that does not know `tag` must reject the record.
    pub critical: bool,
    /// The entry's data, at most [`MAX_EXTENSION_DATA_LEN`] bytes.
    pub data: &'a [u8],
}

#[cfg(test)]
mod tests;
