//! Validation of untrusted request bytes.
//!
//! A request is checked completely, in this order, before anything happens:
//!
//! 1. the IOCTL code names an operation — else `STATUS_INVALID_DEVICE_REQUEST`;
//! 2. the input holds a [`RequestHeader`] — else `STATUS_INVALID_BUFFER_SIZE`;
//! 3. `version` is [`CONTROL_VERSION`] — else `STATUS_REVISION_MISMATCH` (checked before any
//!    size, so that a client of another version learns exactly that);
//! 4. `reserved` is zero — else `STATUS_INVALID_PARAMETER`;
//! 5. `size` equals the input length — else `STATUS_INVALID_BUFFER_SIZE`;
//! 6. the input is exactly the operation's fixed length, or for a variable request the fixed part
//!    plus the declared data length — else `STATUS_INVALID_BUFFER_SIZE`;
//! 7. every field is in its documented range and every reserved field zero — else
//!    `STATUS_INVALID_PARAMETER`;
//! 8. the output holds the operation's fixed response — else `STATUS_BUFFER_TOO_SMALL`.
//!
//! The result, [`Parsed`], owns every fixed field and refers to variable bytes by range, so the
//! driver's shared `METHOD_BUFFERED` system buffer can be parsed and then overwritten by the
//! response without the two ever being borrowed at once.

use core::ops::Range;

use zerocopy::FromBytes;

use super::codes::{ControlOp, IOCTL_VMBSRV_CREATE_CHANNEL};
use super::wire::{
    self, ChannelDataRequest, ChannelRequest, CreateChannelRequest, FetchOutcomesRequest,
    PostMessageRequest, RequestHeader,
};
use super::{CONTROL_VERSION, MAX_CHUNK_LEN, MAX_RECORD_LEN};
use crate::kmcl::NtStatus;
use crate::kmcl::raw::{GUID, VMBUS_SERVER_CHANNEL_INIT_FLAGS};
use crate::saved::{MAX_IN_FLIGHT_LIMIT, MAX_PAYLOAD_LEN};

/// How `CreateChannel` brings the channel up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateMode {
    /// `VspChannel::create`: configure, enable, start.
    Start,
    /// `VspChannel::create_for_restore`: configure only.
    ForRestore,
}

/// A validated `CreateChannel` request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreateParams {
    /// The caller's user-mode VMBus handle value; 0 = none.
    pub vmbus_handle: u64,
    /// Interface type GUID.
    pub interface_type: GUID,
    /// Instance GUID.
    pub instance: GUID,
    /// `1..=MAX_IN_FLIGHT_LIMIT`.
    pub max_in_flight: u32,
    /// `1..=MAX_PAYLOAD_LEN`.
    pub max_message_len: u32,
    /// Defined `VMBUS_SERVER_CHANNEL_INIT_FLAG_*` bits only.
    pub server_flags: u32,
    /// Bring-up mode.
    pub mode: CreateMode,
}

/// A validated request: fixed fields by value, variable bytes as a range of the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// `QueryInfo`.
    QueryInfo,
    /// `CreateChannel`.
    CreateChannel(CreateParams),
    /// An operation that names only a channel (`op` says which).
    Channel {
        /// The operation.
        op: ControlOp,
        /// The channel id.
        channel_id: u64,
    },
    /// `PostMessage`.
    PostMessage {
        /// The channel id.
        channel_id: u64,
        /// Client tag.
        tag: u64,
        /// Optional correlation id.
        trace_id: Option<[u8; 16]>,
        /// The payload's position in the input.
        payload: Range<usize>,
    },
    /// `FetchOutcomes`.
    FetchOutcomes {
        /// The channel id.
        channel_id: u64,
        /// `1..=MAX_IN_FLIGHT_LIMIT`.
        max_outcomes: u32,
    },
    /// `RestoreChannelRecord`.
    RestoreChannelRecord {
        /// The channel id.
        channel_id: u64,
        /// The record's position in the input.
        record: Range<usize>,
    },
    /// `RestoreChunk`.
    RestoreChunk {
        /// The channel id.
        channel_id: u64,
        /// The chunk's position in the input.
        chunk: Range<usize>,
    },
}

/// Checks steps 1–8 (see the module documentation) for a request of `code` with `input` bytes
/// and an output buffer of `output_len` bytes.
pub fn prepare(code: u32, input: &[u8], output_len: usize) -> Result<Parsed, NtStatus> {
    let op = ControlOp::from_code(code).ok_or(NtStatus::INVALID_DEVICE_REQUEST)?;
    let parsed = parse_request(op, input)?;
    if output_len < op.min_output_len() {
        return Err(NtStatus::BUFFER_TOO_SMALL);
    }
    Ok(parsed)
}

/// Checks the header (steps 2–5).
pub fn parse_header(input: &[u8]) -> Result<RequestHeader, NtStatus> {
    let (header, _) =
        RequestHeader::read_from_prefix(input).map_err(|_| NtStatus::INVALID_BUFFER_SIZE)?;
    if header.version.get() != CONTROL_VERSION {
        return Err(NtStatus::REVISION_MISMATCH);
    }
    if header.reserved.get() != 0 {
        return Err(NtStatus::INVALID_PARAMETER);
    }
    if usize::try_from(header.size.get()).ok() != Some(input.len()) {
        return Err(NtStatus::INVALID_BUFFER_SIZE);
    }
    Ok(header)
}

/// Checks steps 2–7 for `op`.
pub fn parse_request(op: ControlOp, input: &[u8]) -> Result<Parsed, NtStatus> {
    parse_header(input)?;
    match op {
        ControlOp::QueryInfo => {
            exact::<RequestHeader>(input)?;
            Ok(Parsed::QueryInfo)
        }
        ControlOp::CreateChannel => parse_create(input).map(Parsed::CreateChannel),
        ControlOp::PostMessage => parse_post(input),
        ControlOp::FetchOutcomes => {
            let request = exact::<FetchOutcomesRequest>(input)?;
            let max_outcomes = request.max_outcomes.get();
            if request.reserved.get() != 0 || !(1..=MAX_IN_FLIGHT_LIMIT).contains(&max_outcomes) {
                return Err(NtStatus::INVALID_PARAMETER);
            }
            Ok(Parsed::FetchOutcomes {
                channel_id: request.channel_id.get(),
                max_outcomes,
            })
        }
        ControlOp::RestoreChannelRecord => {
            let (channel_id, record) = parse_channel_data(input, MAX_RECORD_LEN)?;
            Ok(Parsed::RestoreChannelRecord { channel_id, record })
        }
        ControlOp::RestoreChunk => {
            let (channel_id, chunk) = parse_channel_data(input, MAX_CHUNK_LEN)?;
            Ok(Parsed::RestoreChunk { channel_id, chunk })
        }
        ControlOp::DestroyChannel
        | ControlOp::DisableChannel
        | ControlOp::QueryStatistics
        | ControlOp::SaveBegin
        | ControlOp::SaveContinue
        | ControlOp::SaveEnd
        | ControlOp::Resume
        | ControlOp::CompleteMigration
        | ControlOp::FinishRestore
        | ControlOp::RestartIncoming => {
            let request = exact::<ChannelRequest>(input)?;
            Ok(Parsed::Channel {
                op,
                channel_id: request.channel_id.get(),
            })
        }
    }
}

/// For the driver's `EvtIoInCallerContext`: the user-mode VMBus handle a request carries, which
/// must be converted (`VmbConvertVmbusHandleToKernelHandle`) in the caller's process context
/// before the request is queued.
///
/// * `Ok(None)`: nothing to convert (another operation, or a `CreateChannel` with handle 0) —
///   queue the request as is.
/// * `Ok(Some(handle))`: a valid `CreateChannel` request; convert `handle` now, keep the kernel
///   handle with the request, and hand it over through
///   [`ControlEnvironment::convert_vmbus_handle`](super::ControlEnvironment::convert_vmbus_handle).
/// * `Err(status)`: the request is malformed; complete it with `status` (the same status
///   dispatch would give), without converting anything.
pub fn caller_context_vmbus_handle(code: u32, input: &[u8]) -> Result<Option<u64>, NtStatus> {
    if code != IOCTL_VMBSRV_CREATE_CHANNEL {
        return Ok(None);
    }
    let params = parse_create(input)?;
    Ok((params.vmbus_handle != 0).then_some(params.vmbus_handle))
}

fn parse_create(input: &[u8]) -> Result<CreateParams, NtStatus> {
    parse_header(input)?;
    let request = exact::<CreateChannelRequest>(input)?;
    let mode = match request.mode.get() {
        wire::CREATE_MODE_START => CreateMode::Start,
        wire::CREATE_MODE_FOR_RESTORE => CreateMode::ForRestore,
        _ => return Err(NtStatus::INVALID_PARAMETER),
    };
    let max_in_flight = request.max_in_flight.get();
    let max_message_len = request.max_message_len.get();
    let server_flags = request.server_flags.get();
    if request.reserved.get() != 0
        || !(1..=MAX_IN_FLIGHT_LIMIT).contains(&max_in_flight)
        || !(1..=MAX_PAYLOAD_LEN).contains(&max_message_len)
        || server_flags & !VMBUS_SERVER_CHANNEL_INIT_FLAGS != 0
    {
        return Err(NtStatus::INVALID_PARAMETER);
    }
    Ok(CreateParams {
        vmbus_handle: request.vmbus_handle.get(),
        interface_type: wire::guid_from_bytes(request.interface_type),
        instance: wire::guid_from_bytes(request.instance),
        max_in_flight,
        max_message_len,
        server_flags,
        mode,
    })
}

fn parse_post(input: &[u8]) -> Result<Parsed, NtStatus> {
    let (request, payload) = variable::<PostMessageRequest>(input, |r| r.payload_len.get())?;
    let flags = request.flags.get();
    if flags & !wire::POST_FLAG_TRACE_ID != 0 {
        return Err(NtStatus::INVALID_PARAMETER);
    }
    let trace_id = if flags & wire::POST_FLAG_TRACE_ID != 0 {
        Some(request.trace_id)
    } else if request.trace_id != [0; 16] {
        return Err(NtStatus::INVALID_PARAMETER);
    } else {
        None
    };
    if payload.is_empty() || payload.len() > MAX_PAYLOAD_LEN as usize {
        return Err(NtStatus::INVALID_PARAMETER);
    }
    Ok(Parsed::PostMessage {
        channel_id: request.channel_id.get(),
        tag: request.tag.get(),
        trace_id,
        payload,
    })
}

fn parse_channel_data(input: &[u8], max_len: usize) -> Result<(u64, Range<usize>), NtStatus> {
    let (request, data) = variable::<ChannelDataRequest>(input, |r| r.data_len.get())?;
    if request.reserved.get() != 0 || data.is_empty() || data.len() > max_len {
        return Err(NtStatus::INVALID_PARAMETER);
    }
    Ok((request.channel_id.get(), data))
}

/// A request that is exactly one `T`.
fn exact<T: FromBytes>(input: &[u8]) -> Result<T, NtStatus> {
    T::read_from_bytes(input).map_err(|_| NtStatus::INVALID_BUFFER_SIZE)
}

/// A request that is one `T` followed by exactly `data_len(&T)` bytes; returns their range.
fn variable<T: FromBytes>(
    input: &[u8],
    data_len: impl FnOnce(&T) -> u32,
) -> Result<(T, Range<usize>), NtStatus> {
    let (fixed, rest) = T::read_from_prefix(input).map_err(|_| NtStatus::INVALID_BUFFER_SIZE)?;
    if usize::try_from(data_len(&fixed)).ok() != Some(rest.len()) {
        return Err(NtStatus::INVALID_BUFFER_SIZE);
    }
    let start = size_of::<T>();
    Ok((fixed, start..input.len()))
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use zerocopy::IntoBytes;

    use super::*;
    use crate::vsp::control::codes::*;
    use crate::vsp::control::wire::*;

    const GUID_A: GUID = GUID {
        Data1: 0x1122_3344,
        Data2: 0x5566,
        Data3: 0x7788,
        Data4: [1, 2, 3, 4, 5, 6, 7, 8],
    };

    fn create(mode: u16) -> CreateChannelRequest {
        CreateChannelRequest::new(0x1234, GUID_A, GUID_A, 8, 256, 0x2, mode)
    }

    fn post_bytes(payload: &[u8], trace: Option<[u8; 16]>) -> Vec<u8> {
        let mut bytes = PostMessageRequest::new(7, 9, trace, payload.len() as u32)
            .as_bytes()
            .to_vec();
        bytes.extend_from_slice(payload);
        bytes
    }

    fn data_bytes(data: &[u8]) -> Vec<u8> {
        let mut bytes = ChannelDataRequest::new(7, data.len() as u32)
            .as_bytes()
            .to_vec();
        bytes.extend_from_slice(data);
        bytes
    }

    fn big_output(op: ControlOp) -> usize {
        op.min_output_len()
    }

    #[test]
    fn well_formed_requests_parse() {
        let bytes = create(CREATE_MODE_FOR_RESTORE);
        let parsed = prepare(IOCTL_VMBSRV_CREATE_CHANNEL, bytes.as_bytes(), 24).unwrap();
        assert_eq!(
            parsed,
            Parsed::CreateChannel(CreateParams {
                vmbus_handle: 0x1234,
                interface_type: GUID_A,
                instance: GUID_A,
                max_in_flight: 8,
                max_message_len: 256,
                server_flags: 2,
                mode: CreateMode::ForRestore,
            })
        );
        let post = post_bytes(b"hello", Some([3; 16]));
        assert_eq!(
            prepare(IOCTL_VMBSRV_POST_MESSAGE, &post, 24).unwrap(),
            Parsed::PostMessage {
                channel_id: 7,
                tag: 9,
                trace_id: Some([3; 16]),
                payload: 48..53,
            }
        );
        let fetch = FetchOutcomesRequest::new(7, 3);
        assert_eq!(
            prepare(IOCTL_VMBSRV_FETCH_OUTCOMES, fetch.as_bytes(), 24).unwrap(),
            Parsed::FetchOutcomes {
                channel_id: 7,
                max_outcomes: 3
            }
        );
        let record = data_bytes(&[0xAB; 104]);
        assert_eq!(
            prepare(IOCTL_VMBSRV_RESTORE_CHANNEL_RECORD, &record, 16).unwrap(),
            Parsed::RestoreChannelRecord {
                channel_id: 7,
                record: 24..128
            }
        );
        let chunk = data_bytes(&[1]);
        assert_eq!(
            prepare(IOCTL_VMBSRV_RESTORE_CHUNK, &chunk, 24).unwrap(),
            Parsed::RestoreChunk {
                channel_id: 7,
                chunk: 24..25
            }
        );
        let info = RequestHeader::new(8);
        assert_eq!(
            prepare(IOCTL_VMBSRV_QUERY_INFO, info.as_bytes(), 48).unwrap(),
            Parsed::QueryInfo
        );
        for op in ControlOp::ALL {
            if op.request_fixed_len() == CHANNEL_REQUEST_LEN && !op.has_variable_input() {
                let request = ChannelRequest::new(5);
                assert_eq!(
                    prepare(op.code(), request.as_bytes(), big_output(*op)).unwrap(),
                    Parsed::Channel {
                        op: *op,
                        channel_id: 5
                    }
                );
            }
        }
    }

    #[test]
    fn unknown_code_is_invalid_device_request() {
        let request = ChannelRequest::new(1);
        assert_eq!(
            prepare(IOCTL_VMBSRV_SAVE_END | 2, request.as_bytes(), 64),
            Err(NtStatus::INVALID_DEVICE_REQUEST)
        );
        assert_eq!(
            prepare(0x0022_0000, &[], 0),
            Err(NtStatus::INVALID_DEVICE_REQUEST)
        );
    }

    #[test]
    fn header_errors() {
        let good = ChannelRequest::new(1);
        let code = IOCTL_VMBSRV_SAVE_END;
        // Too short for a header, including empty.
        assert_eq!(prepare(code, &[], 16), Err(NtStatus::INVALID_BUFFER_SIZE));
        assert_eq!(
            prepare(code, &good.as_bytes()[..7], 16),
            Err(NtStatus::INVALID_BUFFER_SIZE)
        );
        // Another version is reported as such, even when the sizes are also wrong.
        let mut v2 = good;
        v2.header.version = 2.into();
        assert_eq!(
            prepare(code, v2.as_bytes(), 16),
            Err(NtStatus::REVISION_MISMATCH)
        );
        let mut v0 = good;
        v0.header.version = 0.into();
        v0.header.size = 99.into();
        assert_eq!(
            prepare(code, v0.as_bytes(), 16),
            Err(NtStatus::REVISION_MISMATCH)
        );
        // Reserved must be zero.
        let mut reserved = good;
        reserved.header.reserved = 1.into();
        assert_eq!(
            prepare(code, reserved.as_bytes(), 16),
            Err(NtStatus::INVALID_PARAMETER)
        );
        // Size must equal the input length: smaller, larger, and u32::MAX.
        for size in [15u32, 17, u32::MAX, 0] {
            let mut wrong = good;
            wrong.header.size = size.into();
            assert_eq!(
                prepare(code, wrong.as_bytes(), 16),
                Err(NtStatus::INVALID_BUFFER_SIZE),
                "size {size}"
            );
        }
    }

    #[test]
    fn fixed_requests_must_be_exact() {
        for op in ControlOp::ALL.iter().filter(|op| !op.has_variable_input()) {
            let fixed = op.request_fixed_len();
            for len in [wire::REQUEST_HEADER_LEN, fixed - 1, fixed + 1, fixed + 8] {
                if len == fixed || len < wire::REQUEST_HEADER_LEN {
                    continue;
                }
                let mut bytes = std::vec![0u8; len];
                bytes[..8].copy_from_slice(RequestHeader::new(len).as_bytes());
                assert_eq!(
                    prepare(op.code(), &bytes, 4096),
                    Err(NtStatus::INVALID_BUFFER_SIZE),
                    "{op:?} with {len} bytes"
                );
            }
        }
    }

    #[test]
    fn create_field_errors() {
        let code = IOCTL_VMBSRV_CREATE_CHANNEL;
        let check = |request: CreateChannelRequest| prepare(code, request.as_bytes(), 24);
        assert!(check(create(CREATE_MODE_START)).is_ok());
        for mode in [0u16, 3, 0xFFFF] {
            assert_eq!(
                check(create(mode)),
                Err(NtStatus::INVALID_PARAMETER),
                "mode {mode}"
            );
        }
        let mut reserved = create(1);
        reserved.reserved = 1.into();
        assert_eq!(check(reserved), Err(NtStatus::INVALID_PARAMETER));
        for max_in_flight in [0u32, MAX_IN_FLIGHT_LIMIT + 1, u32::MAX] {
            let mut request = create(1);
            request.max_in_flight = max_in_flight.into();
            assert_eq!(check(request), Err(NtStatus::INVALID_PARAMETER));
        }
        let mut edge = create(1);
        edge.max_in_flight = MAX_IN_FLIGHT_LIMIT.into();
        edge.max_message_len = MAX_PAYLOAD_LEN.into();
        edge.server_flags = VMBUS_SERVER_CHANNEL_INIT_FLAGS.into();
        assert!(check(edge).is_ok());
        for max_message_len in [0u32, MAX_PAYLOAD_LEN + 1] {
            let mut request = create(1);
            request.max_message_len = max_message_len.into();
            assert_eq!(check(request), Err(NtStatus::INVALID_PARAMETER));
        }
        let mut flags = create(1);
        flags.server_flags = 0x20.into();
        assert_eq!(check(flags), Err(NtStatus::INVALID_PARAMETER));
    }

    #[test]
    fn post_field_errors() {
        let code = IOCTL_VMBSRV_POST_MESSAGE;
        // Payload length disagrees with the bytes that follow.
        let mut short = post_bytes(b"abcd", None);
        short.pop();
        let len = short.len() as u32;
        short[4..8].copy_from_slice(&len.to_le_bytes());
        assert_eq!(
            prepare(code, &short, 24),
            Err(NtStatus::INVALID_BUFFER_SIZE)
        );
        let mut long = post_bytes(b"abcd", None);
        long.push(0);
        let len = long.len() as u32;
        long[4..8].copy_from_slice(&len.to_le_bytes());
        assert_eq!(prepare(code, &long, 24), Err(NtStatus::INVALID_BUFFER_SIZE));
        // Only the fixed part, or less.
        let fixed = PostMessageRequest::new(1, 1, None, 0);
        assert_eq!(
            prepare(code, &fixed.as_bytes()[..40], 24),
            Err(NtStatus::INVALID_BUFFER_SIZE)
        );
        // Empty payload.
        assert_eq!(
            prepare(code, fixed.as_bytes(), 24),
            Err(NtStatus::INVALID_PARAMETER)
        );
        // Payload over the interface limit (consistent sizes).
        let huge = post_bytes(&std::vec![0u8; MAX_PAYLOAD_LEN as usize + 1], None);
        assert_eq!(prepare(code, &huge, 24), Err(NtStatus::INVALID_PARAMETER));
        let limit = post_bytes(&std::vec![0u8; MAX_PAYLOAD_LEN as usize], None);
        assert!(prepare(code, &limit, 24).is_ok());
        // Unknown flag bits.
        let mut flags = post_bytes(b"x", None);
        flags[24] = 0x2;
        assert_eq!(prepare(code, &flags, 24), Err(NtStatus::INVALID_PARAMETER));
        // Trace bytes without the flag.
        let mut stray = post_bytes(b"x", None);
        stray[40] = 1;
        assert_eq!(prepare(code, &stray, 24), Err(NtStatus::INVALID_PARAMETER));
        // A zero trace id with the flag set is a valid trace id.
        assert!(matches!(
            prepare(code, &post_bytes(b"x", Some([0; 16])), 24),
            Ok(Parsed::PostMessage {
                trace_id: Some(id),
                ..
            }) if id == [0; 16]
        ));
    }

    #[test]
    fn fetch_field_errors() {
        let code = IOCTL_VMBSRV_FETCH_OUTCOMES;
        for max in [0u32, MAX_IN_FLIGHT_LIMIT + 1] {
            let request = FetchOutcomesRequest::new(1, max);
            assert_eq!(
                prepare(code, request.as_bytes(), 24),
                Err(NtStatus::INVALID_PARAMETER)
            );
        }
        let mut reserved = FetchOutcomesRequest::new(1, 1);
        reserved.reserved = 1.into();
        assert_eq!(
            prepare(code, reserved.as_bytes(), 24),
            Err(NtStatus::INVALID_PARAMETER)
        );
    }

    #[test]
    fn channel_data_field_errors() {
        for (code, max) in [
            (IOCTL_VMBSRV_RESTORE_CHANNEL_RECORD, MAX_RECORD_LEN),
            (IOCTL_VMBSRV_RESTORE_CHUNK, MAX_CHUNK_LEN),
        ] {
            assert_eq!(
                prepare(code, &data_bytes(&[]), 64),
                Err(NtStatus::INVALID_PARAMETER)
            );
            let over = data_bytes(&std::vec![0u8; max + 1]);
            assert_eq!(prepare(code, &over, 64), Err(NtStatus::INVALID_PARAMETER));
            assert!(prepare(code, &data_bytes(&std::vec![0u8; max]), 64).is_ok());
            let mut reserved = data_bytes(&[1, 2]);
            reserved[20] = 1;
            assert_eq!(
                prepare(code, &reserved, 64),
                Err(NtStatus::INVALID_PARAMETER)
            );
            let mut mismatch = data_bytes(&[1, 2]);
            mismatch[16] = 3;
            assert_eq!(
                prepare(code, &mismatch, 64),
                Err(NtStatus::INVALID_BUFFER_SIZE)
            );
            let fixed_only = &data_bytes(&[])[..23];
            assert_eq!(
                prepare(code, fixed_only, 64),
                Err(NtStatus::INVALID_BUFFER_SIZE)
            );
        }
    }

    #[test]
    fn output_below_the_fixed_response_is_buffer_too_small() {
        for op in ControlOp::ALL {
            let input: Vec<u8> = match op {
                ControlOp::QueryInfo => RequestHeader::new(8).as_bytes().to_vec(),
                ControlOp::CreateChannel => create(1).as_bytes().to_vec(),
                ControlOp::PostMessage => post_bytes(b"m", None),
                ControlOp::FetchOutcomes => FetchOutcomesRequest::new(1, 1).as_bytes().to_vec(),
                ControlOp::RestoreChannelRecord | ControlOp::RestoreChunk => data_bytes(&[1]),
                _ => ChannelRequest::new(1).as_bytes().to_vec(),
            };
            let min = op.min_output_len();
            assert!(prepare(op.code(), &input, min).is_ok(), "{op:?}");
            assert_eq!(
                prepare(op.code(), &input, min - 1),
                Err(NtStatus::BUFFER_TOO_SMALL),
                "{op:?}"
            );
            // Input errors win over output errors.
            assert_eq!(
                prepare(op.code(), &input[..7], 0),
                Err(NtStatus::INVALID_BUFFER_SIZE),
                "{op:?}"
            );
        }
    }

    #[test]
    fn caller_context_handle() {
        let request = create(1);
        assert_eq!(
            caller_context_vmbus_handle(IOCTL_VMBSRV_CREATE_CHANNEL, request.as_bytes()),
            Ok(Some(0x1234))
        );
        let none = CreateChannelRequest::new(0, GUID_A, GUID_A, 1, 1, 0, 1);
        assert_eq!(
            caller_context_vmbus_handle(IOCTL_VMBSRV_CREATE_CHANNEL, none.as_bytes()),
            Ok(None)
        );
        assert_eq!(
            caller_context_vmbus_handle(IOCTL_VMBSRV_CREATE_CHANNEL, create(9).as_bytes()),
            Err(NtStatus::INVALID_PARAMETER)
        );
        assert_eq!(
            caller_context_vmbus_handle(IOCTL_VMBSRV_POST_MESSAGE, &[1, 2, 3]),
            Ok(None)
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        proptest::proptest!(|(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..96), op_index in 0usize..16, output in 0usize..200)| {
            let op = ControlOp::ALL[op_index];
            let _ = prepare(op.code(), &bytes, output);
            // With a consistent header, only the body is under test.
            let mut fixed = bytes.clone();
            if fixed.len() >= 8 {
                let len = fixed.len();
                fixed[..8].copy_from_slice(RequestHeader::new(len).as_bytes());
            }
            if let Ok(parsed) = prepare(op.code(), &fixed, output) {
                let range = match parsed {
                    Parsed::PostMessage { payload, .. } => Some(payload),
                    Parsed::RestoreChannelRecord { record, .. } => Some(record),
                    Parsed::RestoreChunk { chunk, .. } => Some(chunk),
                    _ => None,
                };
                if let Some(range) = range {
                    proptest::prop_assert!(range.end == fixed.len() && range.start <= range.end);
                }
            }
        });
    }
}
