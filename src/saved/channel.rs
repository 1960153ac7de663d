//! `ChannelRecord`: the VSP's channel-level state, which KMCL does not save for us.

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::envelope::{self, Entries};
use super::{Extension, HEADER_LEN, MAX_PAYLOAD_LEN, RestoreError, SaveError};

/// Upper bound of [`ChannelRecord::max_in_flight`] the format accepts.
pub const MAX_IN_FLIGHT_LIMIT: u32 = 65536;

/// Extension tag of the channel record's [`SaveIdentity`] (16 bytes, optional; docs/saved-state.md
/// §5). Optional so that an older reader, which cannot check the binding, still restores.
pub const TAG_CHANNEL_SAVE_IDENTITY: u16 = 0x0001;

/// Every extension tag a `ChannelRecord` v1 defines.
const KNOWN_TAGS: &[u16] = &[TAG_CHANNEL_SAVE_IDENTITY];

const SAVE_IDENTITY_LEN: usize = 16;

/// Which save wrote a channel record, and how many restores its channel's lineage went through.
///
/// Every `DeliveryRecord` written by the same save carries the same `save_id`
/// ([`TAG_SAVE_ID`](super::delivery::TAG_SAVE_ID)), so a record can only be restored together with
/// the KMCL chunks of its own save.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SaveIdentity {
    /// Identifies one save of one channel lineage; never 0.
    pub save_id: u64,
    /// Restores this channel's lineage went through before this save (0 for a channel that was
    /// never restored). The channel restored from this record reports one more.
    pub restore_generation: u32,
}

/// Channel-level state the VSP keeps outside per-packet records (KMCL saves only per-packet
/// state).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChannelRecord {
    /// The next sequence number to assign; at least 1.
    pub next_sequence: u64,
    /// Negotiated guest protocol version; 0 = not negotiated yet.
    pub protocol_version: u32,
    /// Bound on outstanding deliveries, `1..=MAX_IN_FLIGHT_LIMIT`.
    pub max_in_flight: u32,
    /// Largest message payload, `1..=MAX_PAYLOAD_LEN`.
    pub max_message_len: u32,
    /// Number of `DeliveryRecord`s the KMCL blob must bring back; at most `max_in_flight`.
    pub in_flight: u32,
    /// Counters carried across save/restore.
    pub stats: ChannelStats,
}

/// Channel counters. They only ever grow, so they must survive a save/restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ChannelStats {
    /// Messages accepted from host clients.
    pub posted: u64,
    /// Deliveries the guest acknowledged as processed.
    pub acked: u64,
    /// Deliveries the guest completed with a failure.
    pub nacked: u64,
    /// Deliveries cancelled before the guest completed them.
    pub cancelled: u64,
    /// Completions that matched no outstanding delivery.
    pub bad_acks: u64,
    /// Guest->host requests received.
    pub guest_requests: u64,
    /// Well-framed guest requests that were answered with an error.
    pub guest_bad_requests: u64,
    /// Guest packets whose framing was garbled.
    pub guest_garbled: u64,
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct BodyV1 {
    next_sequence: U64,
    protocol_version: U32,
    max_in_flight: U32,
    max_message_len: U32,
    in_flight: U32,
    posted: U64,
    acked: U64,
    nacked: U64,
    cancelled: U64,
    bad_acks: U64,
    guest_requests: U64,
    guest_bad_requests: U64,
    guest_garbled: U64,
}

const BODY_V1_LEN: usize = 88;
const _: () = assert!(size_of::<BodyV1>() == BODY_V1_LEN);

impl ChannelRecord {
    /// Magic of a channel record: ASCII `VBCR`.
    pub const MAGIC: [u8; 4] = *b"VBCR";
    /// The format version this build writes (and the only one it reads).
    pub const VERSION: u16 = 1;
    /// Encoded size: 16-byte header + 88-byte body; v1 writes no extensions.
    pub const ENCODED_LEN: usize = HEADER_LEN + BODY_V1_LEN;

    /// Exact number of bytes [`encode`](Self::encode) writes for this value.
    pub const fn encoded_len(&self) -> usize {
        Self::ENCODED_LEN
    }

    /// Checks the documented ranges and the counter invariant; `Err` names the offending field.
    pub const fn validate(&self) -> Result<(), &'static str> {
        let s = &self.stats;
        let completed = match s.acked.checked_add(s.nacked) {
            Some(n) => n.checked_add(s.cancelled),
            None => None,
        };
        if self.next_sequence == 0 {
            Err("next_sequence")
        } else if self.max_in_flight == 0 || self.max_in_flight > MAX_IN_FLIGHT_LIMIT {
            Err("max_in_flight")
        } else if self.max_message_len == 0 || self.max_message_len > MAX_PAYLOAD_LEN {
            Err("max_message_len")
        } else if self.in_flight > self.max_in_flight {
            Err("in_flight")
        } else {
            match completed {
                Some(n) if n <= s.posted => Ok(()),
                _ => Err("stats"),
            }
        }
    }

    /// Encodes into `buf`, returning [`ENCODED_LEN`](Self::ENCODED_LEN), and zeroes the rest of
    /// `buf`. On error nothing is written.
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, SaveError> {
        self.encode_with_extensions(&[], buf)
    }

    /// Exact number of bytes [`encode_saved`](Self::encode_saved) writes.
    pub const fn encoded_len_saved(&self, identity: Option<SaveIdentity>) -> usize {
        match identity {
            Some(_) => Self::ENCODED_LEN + super::EXTENSION_ENTRY_HEADER_LEN + SAVE_IDENTITY_LEN,
            None => Self::ENCODED_LEN,
        }
    }

    /// Like [`encode`](Self::encode), carrying `identity` when given: what a save writes.
    pub fn encode_saved(
        &self,
        identity: Option<SaveIdentity>,
        buf: &mut [u8],
    ) -> Result<usize, SaveError> {
        let Some(identity) = identity else {
            return self.encode(buf);
        };
        if identity.save_id == 0 {
            return Err(SaveError::InvalidRecord { field: "save_id" });
        }
        let mut data = [0u8; SAVE_IDENTITY_LEN];
        data[..8].copy_from_slice(&identity.save_id.to_le_bytes());
        data[8..12].copy_from_slice(&identity.restore_generation.to_le_bytes());
        let known = [Extension {
            tag: TAG_CHANNEL_SAVE_IDENTITY,
            critical: false,
            data: &data,
        }];
        self.encode_inner(&known, &[], buf)
    }

    /// Like [`encode`](Self::encode), plus `extra` extension entries (same rules as
    /// [`DeliveryRecord::encode_with_extensions`](super::DeliveryRecord::encode_with_extensions)).
    pub fn encode_with_extensions(
        &self,
        extra: &[Extension<'_>],
        buf: &mut [u8],
    ) -> Result<usize, SaveError> {
        self.encode_inner(&[], extra, buf)
    }

    fn encode_inner(
        &self,
        known: &[Extension<'_>],
        extra: &[Extension<'_>],
        buf: &mut [u8],
    ) -> Result<usize, SaveError> {
        if let Err(field) = self.validate() {
            return Err(SaveError::InvalidRecord { field });
        }
        let s = &self.stats;
        let body = BodyV1 {
            next_sequence: U64::new(self.next_sequence),
            protocol_version: U32::new(self.protocol_version),
            max_in_flight: U32::new(self.max_in_flight),
            max_message_len: U32::new(self.max_message_len),
            in_flight: U32::new(self.in_flight),
            posted: U64::new(s.posted),
            acked: U64::new(s.acked),
            nacked: U64::new(s.nacked),
            cancelled: U64::new(s.cancelled),
            bad_acks: U64::new(s.bad_acks),
            guest_requests: U64::new(s.guest_requests),
            guest_bad_requests: U64::new(s.guest_bad_requests),
            guest_garbled: U64::new(s.guest_garbled),
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

    /// Decodes and fully validates an untrusted record; bytes after it must be zero.
    pub fn decode(bytes: &[u8]) -> Result<Self, RestoreError> {
        Self::decode_saved(bytes).map(|(record, _)| record)
    }

    /// Like [`decode`](Self::decode), also returning the [`SaveIdentity`] if the record carries
    /// one.
    pub fn decode_saved(bytes: &[u8]) -> Result<(Self, Option<SaveIdentity>), RestoreError> {
        let opened = envelope::open(Self::MAGIC, bytes)?;
        if opened.version != Self::VERSION {
            return Err(RestoreError::UnsupportedVersion {
                found: opened.version,
            });
        }
        if opened.flags != 0 {
            return Err(RestoreError::ReservedNotZero);
        }
        let (b, ext_area) =
            BodyV1::ref_from_prefix(opened.rest).map_err(|_| RestoreError::BadLength)?;
        let mut identity = None;
        for ext in Entries::new(ext_area) {
            let ext = ext?;
            match ext.tag {
                TAG_CHANNEL_SAVE_IDENTITY => {
                    let data = <[u8; SAVE_IDENTITY_LEN]>::try_from(ext.data)
                        .map_err(|_| RestoreError::MalformedExtension)?;
                    let word = |range: core::ops::Range<usize>| {
                        data.get(range).map_or(0, |bytes| {
                            bytes
                                .iter()
                                .rev()
                                .fold(0u64, |value, byte| (value << 8) | u64::from(*byte))
                        })
                    };
                    let save_id = word(0..8);
                    let generation = word(8..12);
                    if save_id == 0 {
                        return Err(RestoreError::OutOfRange { field: "save_id" });
                    }
                    if word(12..16) != 0 {
                        return Err(RestoreError::ReservedNotZero);
                    }
                    identity = Some(SaveIdentity {
                        save_id,
                        // Read from 4 bytes, so it fits.
                        restore_generation: u32::try_from(generation).unwrap_or(u32::MAX),
                    });
                }
                tag if ext.critical => return Err(RestoreError::UnknownCriticalField { tag }),
                _ => {}
            }
        }
        let record = Self {
            next_sequence: b.next_sequence.get(),
            protocol_version: b.protocol_version.get(),
            max_in_flight: b.max_in_flight.get(),
            max_message_len: b.max_message_len.get(),
            in_flight: b.in_flight.get(),
            stats: ChannelStats {
                posted: b.posted.get(),
                acked: b.acked.get(),
                nacked: b.nacked.get(),
                cancelled: b.cancelled.get(),
                bad_acks: b.bad_acks.get(),
                guest_requests: b.guest_requests.get(),
                guest_bad_requests: b.guest_bad_requests.get(),
                guest_garbled: b.guest_garbled.get(),
            },
        };
        record
            .validate()
            .map_err(|field| RestoreError::OutOfRange { field })?;
        Ok((record, identity))
    }
}
