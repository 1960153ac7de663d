//! Request and response layouts: little-endian, `#[repr(C)]`, no implicit padding.
//!
//! Every request starts with a [`RequestHeader`] and every response with a [`ResponseHeader`].
//! Fields are laid out so that every `u64` sits at a multiple of 8 from the start of the buffer,
//! which lets a C client declare the same structures with natural alignment. The types are
//! `zerocopy` structs over little-endian integers, so reading untrusted bytes is a bounds-checked
//! copy that cannot panic, and the layouts are asserted below.
//!
//! GUIDs travel as their 16-byte Windows in-memory form (`Data1` LE u32, `Data2` LE u16, `Data3`
//! LE u16, `Data4` 8 bytes): a C client copies a `GUID` as is.

use zerocopy::little_endian::{I32, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::CONTROL_VERSION;
use crate::kmcl::NtStatus;
use crate::kmcl::raw::GUID;
use crate::saved::ChannelRecord;

macro_rules! wire_struct {
    ($(#[$doc:meta])* $name:ident, $len_name:ident = $len:literal { $($(#[$fdoc:meta])* $field:ident : $ty:ty,)* }) => {
        $(#[$doc])*
        #[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(C)]
        pub struct $name {
            $($(#[$fdoc])* pub $field: $ty,)*
        }

        #[doc = concat!("Size of [`", stringify!($name), "`] in bytes.")]
        pub const $len_name: usize = $len;
        const _: () = assert!(size_of::<$name>() == $len_name);
    };
}

wire_struct! {
    /// The first 8 bytes of every request.
    RequestHeader, REQUEST_HEADER_LEN = 8 {
        /// [`CONTROL_VERSION`]; another value fails the IOCTL with `STATUS_REVISION_MISMATCH`.
        version: U16,
        /// Zero.
        reserved: U16,
        /// Total request length in bytes, header included: must equal the IOCTL input length.
        size: U32,
    }
}

wire_struct! {
    /// The first 16 bytes of every response.
    ResponseHeader, RESPONSE_HEADER_LEN = 16 {
        /// [`CONTROL_VERSION`].
        version: U16,
        /// Zero.
        reserved: U16,
        /// Bytes of response written, header included (= the IOCTL's `Information`).
        size: U32,
        /// The operation's NTSTATUS.
        status: I32,
        /// Zero (keeps what follows 8-byte aligned).
        reserved2: U32,
    }
}

wire_struct! {
    /// `QueryInfo` response: the interface's version and limits.
    InfoResponse, INFO_RESPONSE_LEN = 48 {
        /// Header.
        header: ResponseHeader,
        /// The highest request version this driver speaks ([`CONTROL_VERSION`]).
        control_version: U32,
        /// The highest guest protocol version this driver speaks (`major << 16 | minor`).
        guest_protocol_version: U32,
        /// How many channels the registry holds at most.
        max_channels: U32,
        /// How many channel slots are in use right now.
        channels_in_use: U32,
        /// Largest `max_in_flight` a channel can be created with.
        max_in_flight: U32,
        /// Largest `max_message_len` a channel can be created with.
        max_message_len: U32,
        /// Largest channel record `RestoreChannelRecord` accepts.
        max_record_len: U32,
        /// Largest chunk `SaveContinue` produces or `RestoreChunk` accepts.
        max_chunk_len: U32,
    }
}

/// [`CreateChannelRequest::mode`]: create, offer (enable) and start the channel.
pub const CREATE_MODE_START: u16 = 1;
/// [`CreateChannelRequest::mode`]: create and configure only; a restore follows.
pub const CREATE_MODE_FOR_RESTORE: u16 = 2;

wire_struct! {
    /// `CreateChannel` request.
    CreateChannelRequest, CREATE_CHANNEL_REQUEST_LEN = 64 {
        /// Header, `size` = 64.
        header: RequestHeader,
        /// The caller's user-mode VMBus handle value for the partition, or 0 for none. The
        /// driver converts it in the caller's process context before dispatch.
        vmbus_handle: U64,
        /// The interface type GUID offered to the guest.
        interface_type: [u8; 16],
        /// The instance GUID of the offer.
        instance: [u8; 16],
        /// Most deliveries outstanding (and unfetched outcomes), `1..=65536`.
        max_in_flight: U32,
        /// Largest message payload, `1..=65536`.
        max_message_len: U32,
        /// `VMBUS_SERVER_CHANNEL_INIT_FLAG_*` (only the defined bits, `0x1F`).
        server_flags: U32,
        /// [`CREATE_MODE_START`] or [`CREATE_MODE_FOR_RESTORE`].
        mode: U16,
        /// Zero.
        reserved: U16,
    }
}

wire_struct! {
    /// `CreateChannel` response.
    CreateChannelResponse, CREATE_CHANNEL_RESPONSE_LEN = 24 {
        /// Header.
        header: ResponseHeader,
        /// The new channel's id (0 if the operation failed).
        channel_id: U64,
    }
}

wire_struct! {
    /// The request of every operation that names only a channel.
    ChannelRequest, CHANNEL_REQUEST_LEN = 16 {
        /// Header, `size` = 16.
        header: RequestHeader,
        /// The channel id `CreateChannel` returned.
        channel_id: U64,
    }
}

wire_struct! {
    /// `DestroyChannel` response.
    DestroyChannelResponse, DESTROY_CHANNEL_RESPONSE_LEN = 24 {
        /// Header.
        header: ResponseHeader,
        /// Outcomes recorded and never fetched, discarded with the channel (including the
        /// cancellations the disable produced).
        unfetched_outcomes: U32,
        /// Deliveries still outstanding when the channel was dropped (0 after a clean disable).
        in_flight: U32,
    }
}

/// [`PostMessageRequest::flags`]: `trace_id` is present.
pub const POST_FLAG_TRACE_ID: u32 = 0x1;

wire_struct! {
    /// `PostMessage` request; `payload_len` payload bytes follow.
    PostMessageRequest, POST_MESSAGE_REQUEST_LEN = 48 {
        /// Header, `size` = 48 + `payload_len`.
        header: RequestHeader,
        /// The channel.
        channel_id: U64,
        /// Opaque client value, returned with the outcome.
        tag: U64,
        /// [`POST_FLAG_TRACE_ID`] or 0.
        flags: U32,
        /// Payload length, `1..=65536` (and at most the channel's `max_message_len`).
        payload_len: U32,
        /// Correlation id saved with the delivery; all zero when the flag is clear.
        trace_id: [u8; 16],
    }
}

wire_struct! {
    /// `PostMessage` response.
    PostMessageResponse, POST_MESSAGE_RESPONSE_LEN = 24 {
        /// Header.
        header: ResponseHeader,
        /// The delivery's sequence number (0 if the post failed).
        sequence: U64,
    }
}

wire_struct! {
    /// `FetchOutcomes` request.
    FetchOutcomesRequest, FETCH_OUTCOMES_REQUEST_LEN = 24 {
        /// Header, `size` = 24.
        header: RequestHeader,
        /// The channel.
        channel_id: U64,
        /// Most outcomes to take, `1..=65536`; fewer are taken if the output has less room.
        max_outcomes: U32,
        /// Zero.
        reserved: U32,
    }
}

wire_struct! {
    /// `FetchOutcomes` response; `count` [`OutcomeEntry`] follow.
    FetchOutcomesResponse, FETCH_OUTCOMES_RESPONSE_LEN = 24 {
        /// Header; `size` = 24 + 24 × `count`.
        header: ResponseHeader,
        /// Outcomes in this response, oldest first.
        count: U32,
        /// Outcomes still recorded after this fetch.
        remaining: U32,
    }
}

/// [`OutcomeEntry::kind`]: acknowledged with success and a matching checksum.
pub const OUTCOME_ACKED: u16 = 1;
/// [`OutcomeEntry::kind`]: acknowledged with the guest's error in `guest_status`.
pub const OUTCOME_NACKED: u16 = 2;
/// [`OutcomeEntry::kind`]: the guest acknowledged a payload with another checksum.
pub const OUTCOME_CORRUPTED: u16 = 3;
/// [`OutcomeEntry::kind`]: the completion was not a well-formed acknowledgement.
pub const OUTCOME_BAD_ACK: u16 = 4;
/// [`OutcomeEntry::kind`]: cancelled (guest closed, or channel disabled).
pub const OUTCOME_CANCELLED: u16 = 5;
/// [`OutcomeEntry::kind`]: torn down after a migration save; it ends on the destination.
pub const OUTCOME_MIGRATED: u16 = 6;

wire_struct! {
    /// One outcome in a `FetchOutcomes` response.
    OutcomeEntry, OUTCOME_ENTRY_LEN = 24 {
        /// The delivery's sequence number.
        sequence: U64,
        /// The tag it was posted with.
        tag: U64,
        /// `OUTCOME_*`.
        kind: U16,
        /// 1 for a delivery that never crossed a save/restore, +1 per restore.
        attempts: U16,
        /// The guest's status for [`OUTCOME_NACKED`], else 0.
        guest_status: U32,
    }
}

/// [`StatisticsResponse::flags`] bit 0, "a garbled guest packet stopped the incoming queue", as
/// the first interface defined it. This build never sets it: vmbsrv answers a garbled packet
/// with an error reply instead of `VmbChannelPacketFail` (docs/protocol.md), so the queue never
/// stops. The bit stays reserved so that no later meaning is confused with the old one.
pub const STATS_FLAG_INCOMING_STOPPED: u32 = 0x1;

wire_struct! {
    /// `QueryStatistics` response: every counter of `vsp::Statistics`, plus phase and limits.
    StatisticsResponse, STATISTICS_RESPONSE_LEN = 128 {
        /// Header.
        header: ResponseHeader,
        /// The channel's `vsp::Phase` (0 Initialized, 1 Restoring, 2 Restored, 3 RestoreFailed,
        /// 4 Running, 5 Saving, 6 Saved, 7 Migrated, 8 Disabled).
        phase: U32,
        /// `STATS_FLAG_*`.
        flags: U32,
        /// The negotiated guest protocol version (0: none).
        protocol_version: U32,
        /// Deliveries outstanding.
        in_flight: U32,
        /// Outcomes recorded and not yet fetched.
        pending_outcomes: U32,
        /// The channel's `max_in_flight`.
        max_in_flight: U32,
        /// The channel's `max_message_len`.
        max_message_len: U32,
        /// Restores the channel's lineage went through (0: never restored). Zero from builds
        /// before it was defined.
        restore_generation: U32,
        /// The next sequence number to be assigned.
        next_sequence: U64,
        /// Outcomes classified as corrupted (this channel instance only).
        corrupted: U64,
        /// Messages posted.
        posted: U64,
        /// Deliveries acknowledged with success.
        acked: U64,
        /// Deliveries acknowledged with a guest error.
        nacked: U64,
        /// Deliveries cancelled.
        cancelled: U64,
        /// Completions that were not a well-formed, matching acknowledgement.
        bad_acks: U64,
        /// Guest requests received.
        guest_requests: U64,
        /// Well-framed guest requests answered with an error.
        guest_bad_requests: U64,
        /// Guest packets with garbled framing.
        guest_garbled: U64,
    }
}

wire_struct! {
    /// `SaveBegin` response; on success `record_len` bytes of encoded channel record follow.
    SaveBeginResponse, SAVE_BEGIN_RESPONSE_LEN = 24 {
        /// Header; `size` = 24 + `record_len`.
        header: ResponseHeader,
        /// Length of the encoded `saved::ChannelRecord` that follows (0 on failure).
        record_len: U32,
        /// Zero.
        reserved: U32,
    }
}

/// The smallest output `SaveBegin` accepts: its fixed part plus a v1 channel record with its
/// save identity extension (24 + 104 + 20 = 148; docs/saved-state.md §5). Clients should offer
/// [`SAVE_BEGIN_RECOMMENDED_OUTPUT_LEN`] so a longer future record fits.
pub const SAVE_BEGIN_MIN_OUTPUT_LEN: usize = SAVE_BEGIN_RESPONSE_LEN
    + ChannelRecord::ENCODED_LEN
    + crate::saved::EXTENSION_ENTRY_HEADER_LEN
    + 16;

/// An output size for `SaveBegin` that fits any record the format allows.
pub const SAVE_BEGIN_RECOMMENDED_OUTPUT_LEN: usize =
    SAVE_BEGIN_RESPONSE_LEN + crate::saved::MAX_RECORD_LEN;

wire_struct! {
    /// `SaveContinue` response; `size` − 32 chunk bytes follow.
    SaveContinueResponse, SAVE_CONTINUE_RESPONSE_LEN = 32 {
        /// Header; `status` says whether KMCL was called at all.
        header: ResponseHeader,
        /// What `VmbChannelSaveContinue` returned: `STATUS_SUCCESS` (last chunk),
        /// `STATUS_BUFFER_OVERFLOW` (a chunk, more to come), `STATUS_BUFFER_TOO_SMALL` (nothing
        /// written; offer `bytes_required` chunk bytes), or a failure. 0 (and the counts 0) when
        /// the header's `status` is not `STATUS_SUCCESS`: KMCL was not called.
        kmcl_status: I32,
        /// Bytes KMCL wrote.
        bytes_filled: U32,
        /// With `STATUS_BUFFER_TOO_SMALL`: the chunk room needed (output = 32 + this).
        bytes_required: U32,
        /// Zero.
        reserved: U32,
    }
}

wire_struct! {
    /// `RestoreChannelRecord` and `RestoreChunk` request; `data_len` bytes follow.
    ChannelDataRequest, CHANNEL_DATA_REQUEST_LEN = 24 {
        /// Header, `size` = 24 + `data_len`.
        header: RequestHeader,
        /// The channel.
        channel_id: U64,
        /// The record (`1..=4096`) or chunk (`1..=16 MiB`) length.
        data_len: U32,
        /// Zero.
        reserved: U32,
    }
}

/// [`RestoreChunkResponse::progress`]: KMCL wants the next chunk.
pub const RESTORE_NEED_MORE: u32 = 1;
/// [`RestoreChunkResponse::progress`]: restore complete and verified; call `FinishRestore`.
pub const RESTORE_COMPLETE: u32 = 2;

wire_struct! {
    /// `RestoreChunk` response.
    RestoreChunkResponse, RESTORE_CHUNK_RESPONSE_LEN = 24 {
        /// Header.
        header: ResponseHeader,
        /// [`RESTORE_NEED_MORE`] or [`RESTORE_COMPLETE`]; 0 when `status` is a failure.
        progress: U32,
        /// Zero.
        reserved: U32,
    }
}

impl RequestHeader {
    /// A header for a request of `size` bytes in total.
    pub fn new(size: usize) -> Self {
        Self {
            version: CONTROL_VERSION.into(),
            reserved: 0.into(),
            size: U32::new(u32::try_from(size).unwrap_or(u32::MAX)),
        }
    }
}

impl ResponseHeader {
    /// A header for a response of `size` bytes with operation status `status`.
    pub fn new(status: NtStatus, size: usize) -> Self {
        Self {
            version: CONTROL_VERSION.into(),
            reserved: 0.into(),
            size: U32::new(u32::try_from(size).unwrap_or(u32::MAX)),
            status: status.0.into(),
            reserved2: 0.into(),
        }
    }

    /// The operation's status.
    pub fn op_status(&self) -> NtStatus {
        NtStatus(self.status.get())
    }
}

impl CreateChannelRequest {
    /// A complete request (header `size` filled in).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vmbus_handle: u64,
        interface_type: GUID,
        instance: GUID,
        max_in_flight: u32,
        max_message_len: u32,
        server_flags: u32,
        mode: u16,
    ) -> Self {
        Self {
            header: RequestHeader::new(CREATE_CHANNEL_REQUEST_LEN),
            vmbus_handle: vmbus_handle.into(),
            interface_type: guid_to_bytes(interface_type),
            instance: guid_to_bytes(instance),
            max_in_flight: max_in_flight.into(),
            max_message_len: max_message_len.into(),
            server_flags: server_flags.into(),
            mode: mode.into(),
            reserved: 0.into(),
        }
    }
}

impl ChannelRequest {
    /// A complete request (header `size` filled in).
    pub fn new(channel_id: u64) -> Self {
        Self {
            header: RequestHeader::new(CHANNEL_REQUEST_LEN),
            channel_id: channel_id.into(),
        }
    }
}

impl PostMessageRequest {
    /// The fixed part of a request whose `payload_len` payload bytes follow.
    pub fn new(channel_id: u64, tag: u64, trace_id: Option<[u8; 16]>, payload_len: u32) -> Self {
        Self {
            header: RequestHeader::new(
                POST_MESSAGE_REQUEST_LEN.saturating_add(payload_len as usize),
            ),
            channel_id: channel_id.into(),
            tag: tag.into(),
            flags: if trace_id.is_some() {
                POST_FLAG_TRACE_ID
            } else {
                0
            }
            .into(),
            payload_len: payload_len.into(),
            trace_id: trace_id.unwrap_or([0; 16]),
        }
    }
}

impl FetchOutcomesRequest {
    /// A complete request (header `size` filled in).
    pub fn new(channel_id: u64, max_outcomes: u32) -> Self {
        Self {
            header: RequestHeader::new(FETCH_OUTCOMES_REQUEST_LEN),
            channel_id: channel_id.into(),
            max_outcomes: max_outcomes.into(),
            reserved: 0.into(),
        }
    }
}

impl ChannelDataRequest {
    /// The fixed part of a request whose `data_len` bytes follow.
    pub fn new(channel_id: u64, data_len: u32) -> Self {
        Self {
            header: RequestHeader::new(CHANNEL_DATA_REQUEST_LEN.saturating_add(data_len as usize)),
            channel_id: channel_id.into(),
            data_len: data_len.into(),
            reserved: 0.into(),
        }
    }
}

/// A GUID's 16-byte Windows in-memory form.
pub fn guid_to_bytes(guid: GUID) -> [u8; 16] {
    let mut bytes = [0u8; 16];
    let (data1, rest) = bytes.split_at_mut(4);
    data1.copy_from_slice(&guid.Data1.to_le_bytes());
    let (data2, rest) = rest.split_at_mut(2);
    data2.copy_from_slice(&guid.Data2.to_le_bytes());
    let (data3, data4) = rest.split_at_mut(2);
    data3.copy_from_slice(&guid.Data3.to_le_bytes());
    data4.copy_from_slice(&guid.Data4);
    bytes
}

/// The GUID whose Windows in-memory form is `bytes`.
pub fn guid_from_bytes(bytes: [u8; 16]) -> GUID {
    let [a0, a1, a2, a3, b0, b1, c0, c1, d @ ..] = bytes;
    GUID {
        Data1: u32::from_le_bytes([a0, a1, a2, a3]),
        Data2: u16::from_le_bytes([b0, b1]),
        Data3: u16::from_le_bytes([c0, c1]),
        Data4: d,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;

    #[test]
    fn layout_sizes() {
        assert_eq!(REQUEST_HEADER_LEN, 8);
        assert_eq!(RESPONSE_HEADER_LEN, 16);
        assert_eq!(INFO_RESPONSE_LEN, 48);
        assert_eq!(CREATE_CHANNEL_REQUEST_LEN, 64);
        assert_eq!(CREATE_CHANNEL_RESPONSE_LEN, 24);
        assert_eq!(CHANNEL_REQUEST_LEN, 16);
        assert_eq!(DESTROY_CHANNEL_RESPONSE_LEN, 24);
        assert_eq!(POST_MESSAGE_REQUEST_LEN, 48);
        assert_eq!(POST_MESSAGE_RESPONSE_LEN, 24);
        assert_eq!(FETCH_OUTCOMES_REQUEST_LEN, 24);
        assert_eq!(FETCH_OUTCOMES_RESPONSE_LEN, 24);
        assert_eq!(OUTCOME_ENTRY_LEN, 24);
        assert_eq!(STATISTICS_RESPONSE_LEN, 128);
        assert_eq!(SAVE_BEGIN_RESPONSE_LEN, 24);
        assert_eq!(SAVE_BEGIN_MIN_OUTPUT_LEN, 148);
        assert_eq!(SAVE_BEGIN_RECOMMENDED_OUTPUT_LEN, 24 + 4096);
        assert_eq!(SAVE_CONTINUE_RESPONSE_LEN, 32);
        assert_eq!(CHANNEL_DATA_REQUEST_LEN, 24);
        assert_eq!(RESTORE_CHUNK_RESPONSE_LEN, 24);
    }

    #[test]
    fn u64_fields_are_naturally_aligned() {
        assert_eq!(offset_of!(CreateChannelRequest, vmbus_handle), 8);
        assert_eq!(offset_of!(CreateChannelRequest, interface_type), 16);
        assert_eq!(offset_of!(CreateChannelRequest, instance), 32);
        assert_eq!(offset_of!(CreateChannelRequest, max_in_flight), 48);
        assert_eq!(offset_of!(CreateChannelRequest, mode), 60);
        assert_eq!(offset_of!(ChannelRequest, channel_id), 8);
        assert_eq!(offset_of!(PostMessageRequest, channel_id), 8);
        assert_eq!(offset_of!(PostMessageRequest, tag), 16);
        assert_eq!(offset_of!(PostMessageRequest, flags), 24);
        assert_eq!(offset_of!(PostMessageRequest, payload_len), 28);
        assert_eq!(offset_of!(PostMessageRequest, trace_id), 32);
        assert_eq!(offset_of!(ResponseHeader, status), 8);
        assert_eq!(offset_of!(CreateChannelResponse, channel_id), 16);
        assert_eq!(offset_of!(PostMessageResponse, sequence), 16);
        assert_eq!(offset_of!(StatisticsResponse, next_sequence), 48);
        assert_eq!(offset_of!(StatisticsResponse, guest_garbled), 120);
        assert_eq!(offset_of!(OutcomeEntry, kind), 16);
        assert_eq!(offset_of!(OutcomeEntry, guest_status), 20);
        assert_eq!(offset_of!(SaveContinueResponse, kmcl_status), 16);
        assert_eq!(offset_of!(ChannelDataRequest, data_len), 16);
    }

    #[test]
    fn headers_encode_little_endian() {
        let request = RequestHeader::new(0x0102_0304);
        assert_eq!(request.as_bytes(), &[1, 0, 0, 0, 4, 3, 2, 1]);
        let response = ResponseHeader::new(NtStatus::NOT_FOUND, 24);
        assert_eq!(
            response.as_bytes(),
            &[1, 0, 0, 0, 24, 0, 0, 0, 0x25, 0x02, 0x00, 0xC0, 0, 0, 0, 0]
        );
        assert_eq!(response.op_status(), NtStatus::NOT_FOUND);
    }

    #[test]
    fn guid_bytes_are_the_windows_memory_form() {
        let guid = GUID {
            Data1: 0x0403_0201,
            Data2: 0x0605,
            Data3: 0x0807,
            Data4: [9, 10, 11, 12, 13, 14, 15, 16],
        };
        let bytes = guid_to_bytes(guid);
        assert_eq!(
            bytes,
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
        );
        assert_eq!(guid_from_bytes(bytes), guid);
    }
}
