//! `DeliveryRecord`: the per-packet state the KMCL save callback persists.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::envelope::{self, Entries};
use super::{EXTENSION_ENTRY_HEADER_LEN, Extension, HEADER_LEN, RestoreError, SaveError};

/// Largest message payload the format can describe. The VSP enforces its own, smaller,
/// configured limit; this bound only keeps restored values sane.
pub const MAX_PAYLOAD_LEN: u32 = 64 * 1024;

/// Extension tag of [`DeliveryRecord::trace_id`] (16 bytes of data, optional).
pub const TAG_TRACE_ID: u16 = 0x0001;

/// Extension tag of the save identity (8 bytes, optional): the `save_id` of the channel record
/// written by the same save. It binds every delivery of a KMCL blob to the one channel record it
/// belongs with (docs/saved-state.md §5). Optional so that an older reader, which cannot check
/// the binding, still restores the delivery as it did before.
pub const TAG_SAVE_ID: u16 = 0x0002;

/// Every extension tag a `DeliveryRecord` v1 defines.
const KNOWN_TAGS: &[u16] = &[TAG_TRACE_ID, TAG_SAVE_ID];

const TRACE_ID_LEN: usize = 16;
const SAVE_ID_LEN: usize = 8;

/// One outstanding host->guest delivery: what the save callback persists per packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeliveryRecord {
    /// Per-channel sequence number; never 0, never reused.
    pub sequence: u64,
    /// Opaque value from the posting client.
    pub tag: u64,
    /// Host time of the post in 100 ns units; opaque to the format.
    pub posted_at: u64,
    /// Message payload length in bytes, `1..=MAX_PAYLOAD_LEN`.
    pub payload_len: u32,
    /// CRC32C of the payload as posted.
    pub payload_crc: u32,
    /// How many times this delivery has been (re)established: 1 when first sent, +1 per
    /// restore; never 0.
    pub attempts: u16,
    /// Optional correlation id from the client, stored as an optional extension
    /// ([`TAG_TRACE_ID`]).
    pub trace_id: Option<[u8; 16]>,
}

/// The fixed v1 body, following the header at offset 16.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct BodyV1 {
    sequence: U64,
    tag: U64,
    posted_at: U64,
    payload_len: U32,
    payload_crc: U32,
    attempts: U16,
    reserved: [u8; 6],
}

const BODY_V1_LEN: usize = 40;
const _: () = assert!(size_of::<BodyV1>() == BODY_V1_LEN);

impl DeliveryRecord {
    /// Magic of a delivery record: ASCII `VBDR`.
    pub const MAGIC: [u8; 4] = *b"VBDR";
    /// The format version this build writes (and the only one it reads).
    pub const VERSION: u16 = 1;
    /// Encoded size without extensions: 16-byte header + 40-byte body.
    pub const MIN_ENCODED_LEN: usize = HEADER_LEN + BODY_V1_LEN;
    /// Largest size [`encode`](Self::encode) produces: with a trace id.
    pub const MAX_ENCODED_LEN: usize =
        Self::MIN_ENCODED_LEN + EXTENSION_ENTRY_HEADER_LEN + TRACE_ID_LEN;
    /// Largest size [`encode_saved`](Self::encode_saved) produces: with a trace id and a save
    /// identity.
    pub const MAX_SAVED_LEN: usize =
        Self::MAX_ENCODED_LEN + EXTENSION_ENTRY_HEADER_LEN + SAVE_ID_LEN;

    /// Exact number of bytes [`encode`](Self::encode) writes for this value.
    pub const fn encoded_len(&self) -> usize {
        self.encoded_len_saved(None)
    }

    /// Exact number of bytes [`encode_saved`](Self::encode_saved) writes for this value.
    pub const fn encoded_len_saved(&self, save_id: Option<u64>) -> usize {
        let mut len = Self::MIN_ENCODED_LEN;
        if self.trace_id.is_some() {
            len += EXTENSION_ENTRY_HEADER_LEN + TRACE_ID_LEN;
        }
        if save_id.is_some() {
            len += EXTENSION_ENTRY_HEADER_LEN + SAVE_ID_LEN;
        }
        len
    }

    /// Checks the documented ranges; `Err` names the first offending field.
    pub const fn validate(&self) -> Result<(), &'static str> {
        if self.sequence == 0 {
            Err("sequence")
        } else if self.payload_len == 0 || self.payload_len > MAX_PAYLOAD_LEN {
            Err("payload_len")
        } else if self.attempts == 0 {
            Err("attempts")
        } else {
            Ok(())
        }
    }

    /// Encodes into `buf`, returning [`encoded_len`](Self::encoded_len), and zeroes the rest of
    /// `buf` so stale memory never reaches a saved-state file. On error nothing is written.
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, SaveError> {
        self.encode_with_extensions(&[], buf)
    }

    /// Like [`encode`](Self::encode), carrying `save_id` ([`TAG_SAVE_ID`]) when given: what the
    /// VSP's save callback writes.
    pub fn encode_saved(&self, save_id: Option<u64>, buf: &mut [u8]) -> Result<usize, SaveError> {
        self.encode_inner(save_id, &[], buf)
    }

    /// Like [`encode`](Self::encode), plus `extra` extension entries this build does not define
    /// itself (for example to produce records as a newer build would, in version-skew tests).
    ///
    /// `extra` must be strictly ascending by tag, use tags in `1..=MAX_TAG` other than those
    /// this record type defines, and carry at most `MAX_EXTENSION_DATA_LEN` bytes each; the
    /// whole record must fit `MAX_RECORD_LEN`. On `BufferTooSmall` the `needed` size is exact.
    pub fn encode_with_extensions(
        &self,
        extra: &[Extension<'_>],
        buf: &mut [u8],
    ) -> Result<usize, SaveError> {
        self.encode_inner(None, extra, buf)
    }

    fn encode_inner(
        &self,
        save_id: Option<u64>,
        extra: &[Extension<'_>],
        buf: &mut [u8],
    ) -> Result<usize, SaveError> {
        if let Err(field) = self.validate() {
            return Err(SaveError::InvalidRecord { field });
        }
        let body = BodyV1 {
            sequence: U64::new(self.sequence),
            tag: U64::new(self.tag),
            posted_at: U64::new(self.posted_at),
            payload_len: U32::new(self.payload_len),
            payload_crc: U32::new(self.payload_crc),
            attempts: U16::new(self.attempts),
            reserved: [0; 6],
        };
        let save_id_bytes = save_id.map(u64::to_le_bytes);
        // Ascending by tag, as the envelope requires.
        let mut entries = [Extension {
            tag: 0,
            critical: false,
            data: &[],
        }; 2];
        let mut count = 0;
        if let Some(id) = &self.trace_id {
            entries[count] = Extension {
                tag: TAG_TRACE_ID,
                critical: false,
                data: id,
            };
            count += 1;
        }
        if let Some(id) = &save_id_bytes {
            entries[count] = Extension {
                tag: TAG_SAVE_ID,
                critical: false,
                data: id,
            };
            count += 1;
        }
        let known = &entries[..count];
        let total = envelope::encoded_len(BODY_V1_LEN, known, KNOWN_TAGS, extra)?;
        envelope::write(
            Self::MAGIC,
            Self::VERSION,
            body.as_bytes(),
            known,
            extra,
            total,
            buf,
        )
    }

    /// Decodes and fully validates an untrusted record. `bytes` may be longer than the record
    /// (a padded restore buffer) as long as every byte after it is zero.
    pub fn decode(bytes: &[u8]) -> Result<Self, RestoreError> {
        Self::decode_saved(bytes).map(|(record, _)| record)
    }

    /// Like [`decode`](Self::decode), also returning the save identity ([`TAG_SAVE_ID`]) if the
    /// record carries one.
    pub fn decode_saved(bytes: &[u8]) -> Result<(Self, Option<u64>), RestoreError> {
        let opened = envelope::open(Self::MAGIC, bytes)?;
        if opened.version != Self::VERSION {
            return Err(RestoreError::UnsupportedVersion {
                found: opened.version,
            });
        }
        if opened.flags != 0 {
            return Err(RestoreError::ReservedNotZero);
        }
        let (body, ext_area) =
            BodyV1::ref_from_prefix(opened.rest).map_err(|_| RestoreError::BadLength)?;
        if body.reserved != [0; 6] {
            return Err(RestoreError::ReservedNotZero);
        }

        let mut trace_id = None;
        let mut save_id = None;
        for ext in Entries::new(ext_area) {
            let ext = ext?;
            match ext.tag {
                TAG_SAVE_ID => {
                    let id = <[u8; SAVE_ID_LEN]>::try_from(ext.data)
                        .map_err(|_| RestoreError::MalformedExtension)?;
                    save_id = Some(u64::from_le_bytes(id));
                }
                TAG_TRACE_ID => {
                    let id = <[u8; TRACE_ID_LEN]>::try_from(ext.data)
                        .map_err(|_| RestoreError::MalformedExtension)?;
                    trace_id = Some(id);
                }
                tag if ext.critical => return Err(RestoreError::UnknownCriticalField { tag }),
                // An optional field from a newer writer: skipping it is its contract.
                _ => {}
            }
        }

        let record = Self {
            sequence: body.sequence.get(),
            tag: body.tag.get(),
            posted_at: body.posted_at.get(),
            payload_len: body.payload_len.get(),
            payload_crc: body.payload_crc.get(),
            attempts: body.attempts.get(),
            trace_id,
        };
        record
            .validate()
            .map_err(|field| RestoreError::OutOfRange { field })?;
        Ok((record, save_id))
    }
}
