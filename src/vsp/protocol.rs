//! The guest wire protocol: message layouts, parsing of untrusted bytes, and reply encoding.
//!
//! Every message starts with a 16-byte [`Header`]; all integers are little-endian. The layouts
//! are `zerocopy` structs over byte arrays, so parsing is a bounds-checked read of a *copy* of
//! the guest's bytes (never of guest memory itself) and cannot panic. `docs/protocol.md` is the
//! specification; this module is its implementation.

use zerocopy::little_endian::{I32, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::kmcl::NtStatus;

/// `"vmbs"` read as a little-endian u32: every message starts with it.
pub const SIGNATURE: u32 = u32::from_le_bytes(*b"vmbs");

/// Protocol version 1.0 (`major << 16 | minor`).
pub const VERSION_1_0: u32 = 0x0001_0000;

/// The versions this build speaks, best first.
pub const SUPPORTED_VERSIONS: &[u32] = &[VERSION_1_0];

/// The largest guest request this build accepts. Requests are small fixed-size structures, so a
/// bigger packet can only be a mistake or an attack; copying at most this much keeps the
/// DISPATCH_LEVEL stack use bounded.
pub const MAX_REQUEST_LEN: usize = 64;

/// The size of a guest's completion payload for a delivery that this build reads.
pub const MAX_ACK_LEN: usize = 64;

/// Message kinds. Guest→host requests have the top bit clear; host replies set it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// Guest→host: agree on a protocol version.
    NegotiateRequest = 0x0001,
    /// Guest→host: ask for the channel's counters.
    StatisticsRequest = 0x0002,
    /// Host→guest delivery packet (sent with WAIT_FOR_COMPLETION).
    Delivery = 0x0101,
    /// Guest→host completion payload of a delivery.
    Ack = 0x0102,
    /// Host reply to [`Kind::NegotiateRequest`].
    NegotiateReply = 0x8001,
    /// Host reply to [`Kind::StatisticsRequest`].
    StatisticsReply = 0x8002,
    /// Host reply to a well-framed request it refuses.
    ErrorReply = 0x8003,
}

impl Kind {
    /// The kind for a raw value, if it is one.
    pub const fn from_raw(raw: u16) -> Option<Self> {
        Some(match raw {
            0x0001 => Self::NegotiateRequest,
            0x0002 => Self::StatisticsRequest,
            0x0101 => Self::Delivery,
            0x0102 => Self::Ack,
            0x8001 => Self::NegotiateReply,
            0x8002 => Self::StatisticsReply,
            0x8003 => Self::ErrorReply,
            _ => return None,
        })
    }
}

/// The header of every message.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct Header {
    /// [`SIGNATURE`].
    pub signature: U32,
    /// A [`Kind`].
    pub kind: U16,
    /// Reserved, zero.
    pub flags: U16,
    /// Total message length in bytes, header included.
    pub length: U32,
    /// Reserved, zero.
    pub reserved: U32,
}

/// The length of [`Header`].
pub const HEADER_LEN: usize = 16;
const _: () = assert!(size_of::<Header>() == HEADER_LEN);

impl Header {
    /// A header for a message of `kind` and total length `length`.
    pub fn new(kind: Kind, length: usize) -> Self {
        Self {
            signature: SIGNATURE.into(),
            kind: (kind as u16).into(),
            flags: 0.into(),
            // Lengths of our own messages are bounded by the maximum packet size.
            length: U32::new(u32::try_from(length).unwrap_or(u32::MAX)),
            reserved: 0.into(),
        }
    }
}

/// Guest→host: the versions the guest can speak, as an inclusive range.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct NegotiateRequest {
    /// Header, kind [`Kind::NegotiateRequest`].
    pub header: Header,
    /// Lowest acceptable version.
    pub min_version: U32,
    /// Highest acceptable version.
    pub max_version: U32,
}

/// Host→guest (completion payload): the outcome of a negotiation.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct NegotiateReply {
    /// Header, kind [`Kind::NegotiateReply`].
    pub header: Header,
    /// Always `STATUS_SUCCESS`: a refused negotiation is answered with an [`ErrorReply`].
    pub status: I32,
    /// The chosen version.
    pub version: U32,
    /// The largest delivery payload the host will send.
    pub max_message_len: U32,
    /// The most deliveries the host keeps outstanding at once.
    pub max_in_flight: U32,
}

/// Host→guest (completion payload): the channel's counters.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct StatisticsReply {
    /// Header, kind [`Kind::StatisticsReply`].
    pub header: Header,
    /// `STATUS_SUCCESS`.
    pub status: I32,
    /// The negotiated version.
    pub version: U32,
    /// Messages posted.
    pub posted: U64,
    /// Deliveries the guest acknowledged with success.
    pub acked: U64,
    /// Deliveries the guest acknowledged with an error.
    pub nacked: U64,
    /// Deliveries cancelled (channel closed or torn down).
    pub cancelled: U64,
    /// Deliveries outstanding right now.
    pub in_flight: U32,
    /// Reserved, zero.
    pub reserved: U32,
}

/// Host→guest (completion payload): a well-framed request was refused.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct ErrorReply {
    /// Header, kind [`Kind::ErrorReply`].
    pub header: Header,
    /// Why (an NTSTATUS).
    pub status: I32,
    /// The kind of the refused request.
    pub request_kind: U16,
    /// Reserved, zero.
    pub reserved: U16,
}

/// Host→guest delivery: this header, then `payload_len` payload bytes.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct DeliveryHeader {
    /// Header, kind [`Kind::Delivery`]; `length` = 40 + payload length.
    pub header: Header,
    /// The delivery's sequence number (never reused on this channel, across save/restore too).
    pub sequence: U64,
    /// The posting client's tag.
    pub tag: U64,
    /// Payload length in bytes.
    pub payload_len: U32,
    /// CRC32C of the payload.
    pub payload_crc: U32,
}

/// The length of [`DeliveryHeader`].
pub const DELIVERY_HEADER_LEN: usize = 40;
const _: () = assert!(size_of::<DeliveryHeader>() == DELIVERY_HEADER_LEN);

/// Guest→host completion payload of a delivery.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub struct Ack {
    /// Header, kind [`Kind::Ack`], length 32.
    pub header: Header,
    /// The sequence number of the delivery being acknowledged.
    pub sequence: U64,
    /// 0: the guest accepted the message; anything else: the guest's own error code.
    pub status: U32,
    /// CRC32C of the payload as the guest received it.
    pub payload_crc: U32,
}

/// The length of [`Ack`].
pub const ACK_LEN: usize = 32;
const _: () = assert!(size_of::<Ack>() == ACK_LEN);

/// A guest request, parsed from a copy of its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Agree on a version in `min..=max`.
    Negotiate {
        /// Lowest acceptable version.
        min: u32,
        /// Highest acceptable version.
        max: u32,
    },
    /// Report the counters.
    Statistics,
}

impl Request {
    /// The message kind the request arrived as.
    pub const fn kind(self) -> Kind {
        match self {
            Self::Negotiate { .. } => Kind::NegotiateRequest,
            Self::Statistics => Kind::StatisticsRequest,
        }
    }
}

/// Why a guest packet was not a valid request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestError {
    /// The packet cannot be framed: too short for a header, wrong signature, a length field that
    /// disagrees with the packet, or header bits that must be zero are not. Answered with
    /// `VmbChannelPacketFail`.
    Garbled,
    /// Well framed, but not a request this build accepts; answered with an [`ErrorReply`].
    Invalid {
        /// The request kind as sent.
        kind: u16,
        /// The status to report.
        status: NtStatus,
    },
}

/// Parses a guest request.
///
/// `copy` holds the first bytes of the packet (at most [`MAX_REQUEST_LEN`]) and `packet_len` is
/// the length KMCL reported for the whole packet: only the copy is ever read.
pub fn parse_request(copy: &[u8], packet_len: usize) -> Result<Request, RequestError> {
    let Ok((header, _)) = Header::read_from_prefix(copy) else {
        return Err(RequestError::Garbled);
    };
    if header.signature.get() != SIGNATURE
        || header.flags.get() != 0
        || header.reserved.get() != 0
        || usize::try_from(header.length.get()).ok() != Some(packet_len)
    {
        return Err(RequestError::Garbled);
    }
    let kind = header.kind.get();
    let invalid = |status| Err(RequestError::Invalid { kind, status });
    if packet_len > copy.len() {
        // Framed correctly, but larger than any request: refuse without reading the rest.
        return invalid(NtStatus::INVALID_BUFFER_SIZE);
    }
    match Kind::from_raw(kind) {
        Some(Kind::NegotiateRequest) => {
            let Ok(request) = NegotiateRequest::read_from_bytes(copy) else {
                return invalid(NtStatus::INVALID_BUFFER_SIZE);
            };
            let (min, max) = (request.min_version.get(), request.max_version.get());
            if min > max {
                return invalid(NtStatus::INVALID_PARAMETER);
            }
            Ok(Request::Negotiate { min, max })
        }
        Some(Kind::StatisticsRequest) => {
            if copy.len() != HEADER_LEN {
                return invalid(NtStatus::INVALID_BUFFER_SIZE);
            }
            Ok(Request::Statistics)
        }
        _ => invalid(NtStatus::INVALID_DEVICE_REQUEST),
    }
}

/// The best version both sides speak, if any.
pub fn choose_version(min: u32, max: u32) -> Option<u32> {
    SUPPORTED_VERSIONS
        .iter()
        .copied()
        .find(|v| (min..=max).contains(v))
}

/// A guest acknowledgement, parsed from a copy of a completion payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckInfo {
    /// The acknowledged sequence number.
    pub sequence: u64,
    /// The guest's status: 0 = accepted.
    pub status: u32,
    /// CRC32C of what the guest received.
    pub payload_crc: u32,
}

/// Parses a guest's completion payload; `None` if it is not exactly a well-formed [`Ack`].
pub fn parse_ack(copy: &[u8]) -> Option<AckInfo> {
    let ack = Ack::read_from_bytes(copy).ok()?;
    let header = ack.header;
    let well_formed = header.signature.get() == SIGNATURE
        && header.kind.get() == Kind::Ack as u16
        && header.flags.get() == 0
        && header.reserved.get() == 0
        && header.length.get() as usize == ACK_LEN;
    well_formed.then(|| AckInfo {
        sequence: ack.sequence.get(),
        status: ack.status.get(),
        payload_crc: ack.payload_crc.get(),
    })
}

/// Builds the guest's acknowledgement bytes (used by guest models in tests and tools).
pub fn encode_ack(sequence: u64, status: u32, payload_crc: u32) -> [u8; ACK_LEN] {
    let ack = Ack {
        header: Header::new(Kind::Ack, ACK_LEN),
        sequence: sequence.into(),
        status: status.into(),
        payload_crc: payload_crc.into(),
    };
    let mut bytes = [0u8; ACK_LEN];
    bytes.copy_from_slice(ack.as_bytes());
    bytes
}

/// A parsed host→guest delivery (used by guest models in tests and tools).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryView<'a> {
    /// Sequence number.
    pub sequence: u64,
    /// Client tag.
    pub tag: u64,
    /// CRC32C the host computed.
    pub payload_crc: u32,
    /// The payload.
    pub payload: &'a [u8],
}

/// Parses a delivery packet as a guest would; `None` if malformed.
pub fn parse_delivery(bytes: &[u8]) -> Option<DeliveryView<'_>> {
    let (header, payload) = DeliveryHeader::read_from_prefix(bytes).ok()?;
    let framing = header.header;
    let payload_len = header.payload_len.get() as usize;
    let well_formed = framing.signature.get() == SIGNATURE
        && framing.kind.get() == Kind::Delivery as u16
        && framing.length.get() as usize == bytes.len()
        && payload.len() == payload_len;
    well_formed.then_some(DeliveryView {
        sequence: header.sequence.get(),
        tag: header.tag.get(),
        payload_crc: header.payload_crc.get(),
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn negotiate(min: u32, max: u32) -> [u8; 24] {
        let request = NegotiateRequest {
            header: Header::new(Kind::NegotiateRequest, 24),
            min_version: min.into(),
            max_version: max.into(),
        };
        let mut bytes = [0u8; 24];
        bytes.copy_from_slice(request.as_bytes());
        bytes
    }

    #[test]
    fn negotiate_parses_and_chooses() {
        let bytes = negotiate(VERSION_1_0, 0x0002_0000);
        assert_eq!(
            parse_request(&bytes, bytes.len()),
            Ok(Request::Negotiate {
                min: VERSION_1_0,
                max: 0x0002_0000
            })
        );
        assert_eq!(choose_version(VERSION_1_0, 0x0002_0000), Some(VERSION_1_0));
        assert_eq!(choose_version(0x0002_0000, 0x0003_0000), None);
    }

    #[test]
    fn framing_errors_are_garbled() {
        let bytes = negotiate(1, 2);
        assert_eq!(parse_request(&bytes[..8], 8), Err(RequestError::Garbled));
        // Length field disagrees with the packet.
        assert_eq!(parse_request(&bytes, 23), Err(RequestError::Garbled));
        let mut bad_signature = bytes;
        bad_signature[0] ^= 1;
        assert_eq!(
            parse_request(&bad_signature, 24),
            Err(RequestError::Garbled)
        );
        let mut flags = bytes;
        flags[6] = 1;
        assert_eq!(parse_request(&flags, 24), Err(RequestError::Garbled));
    }

    #[test]
    fn well_framed_but_invalid_requests_get_a_status() {
        let reversed = negotiate(3, 2);
        assert!(matches!(
            parse_request(&reversed, 24),
            Err(RequestError::Invalid {
                status: NtStatus::INVALID_PARAMETER,
                ..
            })
        ));
        let mut unknown = negotiate(1, 1);
        unknown[4] = 0x77;
        assert!(matches!(
            parse_request(&unknown, 24),
            Err(RequestError::Invalid {
                kind: 0x0077,
                status: NtStatus::INVALID_DEVICE_REQUEST
            })
        ));
        // Header claims (and KMCL reports) 1000 bytes; we only copied 64.
        let mut big = [0u8; MAX_REQUEST_LEN];
        big[..24].copy_from_slice(&negotiate(1, 1));
        big[8..12].copy_from_slice(&1000u32.to_le_bytes());
        assert!(matches!(
            parse_request(&big, 1000),
            Err(RequestError::Invalid {
                status: NtStatus::INVALID_BUFFER_SIZE,
                ..
            })
        ));
    }

    #[test]
    fn ack_round_trip_and_rejection() {
        let bytes = encode_ack(42, 0, 0xDEAD_BEEF);
        assert_eq!(
            parse_ack(&bytes),
            Some(AckInfo {
                sequence: 42,
                status: 0,
                payload_crc: 0xDEAD_BEEF
            })
        );
        assert_eq!(parse_ack(&bytes[..31]), None);
        let mut wrong_kind = bytes;
        wrong_kind[4] = 1;
        assert_eq!(parse_ack(&wrong_kind), None);
    }

    #[test]
    fn any_bytes_parse_without_panicking() {
        proptest::proptest!(|(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..80), claimed in 0usize..200)| {
            let copy = &bytes[..bytes.len().min(MAX_REQUEST_LEN)];
            let _ = parse_request(copy, claimed);
            let _ = parse_ack(&bytes);
            let _ = parse_delivery(&bytes);
        });
    }
}
