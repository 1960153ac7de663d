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

/// Every extension tag a `DeliveryRecord` v1 defines.
const KNOWN_TAGS: &[u16] = &[TAG_TRACE_ID];

const TRACE_ID_LEN: usize = 16;

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

    /// Exact number of bytes [`encode`](Self::encode) writes for this value.
    pub const fn encoded_len(&self) -> usize {
        match self.trace_id {
            Some(_) => Self::MAX_ENCODED_LEN,
            None => Self::MIN_ENCODED_LEN,
        }
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
        let trace;
        let known: &[Extension<'_>] = match &self.trace_id {
            Some(id) => {
                trace = [Extension {
                    tag: TAG_TRACE_ID,
                    critical: false,
                    data: id,
                }];
                &trace
            }
            None => &[],
        };
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
        for ext in Entries::new(ext_area) {
            let ext = ext?;
            match ext.tag {
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
        Ok(record)
    }
}
