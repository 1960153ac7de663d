//! [`ChannelRegistry`]: the live channels of the control interface, and the dispatcher.
//!
//! # Synchronization
//!
//! The registry's slot table sits behind `R:` [`DispatchLock`], the crate's spin-lock
//! abstraction, and is held only for O(1) bookkeeping: never across a KMCL call, never while
//! blocking, allocating or dropping a channel. An operation *checks its channel out* of the
//! table (moves the `VspChannel` out — its KMCL context lives in its own heap allocation, so the
//! move is invisible to KMCL), runs at PASSIVE_LEVEL with no lock held, and checks it back in.
//! Consequently:
//!
//! * requests on different channels run in parallel (the driver may use a parallel queue);
//! * a second request on a channel that is checked out fails at once with
//!   [`STATUS_DEVICE_BUSY`](super::STATUS_DEVICE_BUSY) in its response instead of waiting —
//!   platform-neutral code never blocks, so it can never deadlock; a client issues one request per
//!   channel at a time (or retries);
//! * [`ChannelRegistry::destroy_owned_by`] (file cleanup) never waits for a request either: a
//!   channel that is checked out is *doomed*, and the request holding it drops it when it
//!   finishes; one being created is dropped as soon as its creation returns.
//!
//! # The Windows driver's part
//!
//! * Control queue: `METHOD_BUFFERED`, any dispatch type. In `EvtIoDeviceControl` (PASSIVE) call
//!   [`ChannelRegistry::dispatch_buffered`] with the system buffer (input and output share it),
//!   the input and output lengths, and the file object as [`OwnerId`]; complete the request with
//!   `DispatchResult::status` and `information`.
//! * `CreateChannel`: `VmbConvertVmbusHandleToKernelHandle` must run in the *caller's* process
//!   context, which the queue does not guarantee. The driver handles this request entirely in
//!   `EvtIoInCallerContext`: [`caller_context_vmbus_handle`](super::caller_context_vmbus_handle)
//!   checks the input, then [`ChannelRegistry::dispatch_buffered`] runs there, and
//!   [`ControlEnvironment::convert_vmbus_handle`] converts in the caller's context. The registry
//!   owns the kernel handle from then on and closes it with the `close_vmbus_handle` function given
//!   to [`ChannelRegistry::try_new`] (`ZwClose`) when the channel is destroyed or its creation
//!   fails. No handle is parked in a request context (a cancelled queued request is cleaned up at
//!   DISPATCH_LEVEL, where `ZwClose` cannot run).
//! * `EvtFileCleanup`: [`ChannelRegistry::destroy_owned_by`] with the file object.
//! * Device teardown: drop the registry (or call [`ChannelRegistry::destroy_all`]) after the
//!   queue is purged.

use core::marker::PhantomData;

use zerocopy::little_endian::{U32, U64};
use zerocopy::{Immutable, IntoBytes};

use super::codes::ControlOp;
use super::parse::{self, CreateMode, CreateParams, Parsed};
use super::registry::{OwnerId, RegistryTable};
use super::wire::{
    self, CreateChannelResponse, DestroyChannelResponse, FetchOutcomesResponse, InfoResponse,
    OutcomeEntry, PostMessageResponse, ResponseHeader, RestoreChunkResponse, SaveBeginResponse,
    SaveContinueResponse, StatisticsResponse,
};
use super::{CONTROL_VERSION, MAX_CHANNELS, MAX_CHUNK_LEN, MAX_RECORD_LEN};
use crate::kmcl::{NtStatus, ParentDevice, Result, ServerInterface, VmbusHandle};
use crate::saved::{MAX_IN_FLIGHT_LIMIT, MAX_PAYLOAD_LEN, SaveError};
use crate::vsp::channel::{ChannelConfig, Phase, PostRequest, RestoreProgress, VspChannel};
use crate::vsp::lock::DispatchLock;
use crate::vsp::protocol;
use crate::vsp::table::{DeliveryTable, Outcome, OutcomeKind};

/// How the IOCTL completes: its status and `IoStatus.Information` (bytes of output written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DispatchResult {
    /// `STATUS_SUCCESS` when a response was written; else why the request was refused.
    pub status: NtStatus,
    /// Bytes of response written (0 when `status` is an error).
    pub information: usize,
}

impl DispatchResult {
    const fn refused(status: NtStatus) -> Self {
        Self {
            status,
            information: 0,
        }
    }
}

/// What only the platform knows, supplied per request.
pub trait ControlEnvironment<'a> {
    /// The KMCL server interface new channels are created on.
    fn server_interface(&self) -> &'a ServerInterface;
    /// The device object new channels are allocated under.
    fn parent_device(&self) -> ParentDevice;
    /// The current host time in 100 ns units (a delivery's `posted_at`).
    fn current_time(&self) -> u64;
    /// The kernel VMBus handle for the caller's user-mode handle value `user_handle` (never 0).
    ///
    /// On Windows the conversion itself must already have happened in the caller's process
    /// context (see the module documentation); this hands the converted handle over. On success
    /// the registry owns the handle and closes it.
    fn convert_vmbus_handle(&self, user_handle: u64) -> Result<VmbusHandle>;
}

/// The slot table type a [`ChannelRegistry`] keeps behind its lock.
pub type ChannelTable<'a, L> = RegistryTable<VspChannel<'a, L>>;

/// A [`ChannelRegistry`] over the host-only [`HostLock`](crate::vsp::lock::HostLock), for tests
/// and host tools.
///
/// Usable once `VspChannel` is `Send`: today `ChannelConfig` holds `ParentDevice` and
/// `VmbusHandle`, raw pointers without `Send`, so `HostLock` cannot hold a channel table.
#[cfg(test)]
pub type HostChannelRegistry<'a> = ChannelRegistry<
    'a,
    crate::vsp::lock::HostLock<DeliveryTable>,
    crate::vsp::lock::HostLock<ChannelTable<'a, crate::vsp::lock::HostLock<DeliveryTable>>>,
>;

/// The live channels of the control interface, each tied to an owner.
///
/// See the module documentation for the synchronization design and the driver's part.
pub struct ChannelRegistry<'a, L, R>
where
    L: DispatchLock<DeliveryTable>,
    R: DispatchLock<ChannelTable<'a, L>>,
{
    table: R,
    capacity: u32,
    close_vmbus_handle: fn(VmbusHandle),
    _channels: PhantomData<fn() -> VspChannel<'a, L>>,
}

/// The input and output of one request: two buffers, or `METHOD_BUFFERED`'s one system buffer.
enum Buffers<'b> {
    Split {
        input: &'b [u8],
        output: &'b mut [u8],
    },
    Shared {
        buffer: &'b mut [u8],
        input_len: usize,
        output_len: usize,
    },
}

impl Buffers<'_> {
    fn input(&self) -> &[u8] {
        match self {
            Self::Split { input, .. } => input,
            Self::Shared {
                buffer, input_len, ..
            } => buffer.get(..*input_len).unwrap_or(&[]),
        }
    }

    fn output(&mut self) -> &mut [u8] {
        match self {
            Self::Split { output, .. } => output,
            Self::Shared {
                buffer, output_len, ..
            } => buffer.get_mut(..*output_len).unwrap_or(&mut []),
        }
    }

    fn output_len(&self) -> usize {
        match self {
            Self::Split { output, .. } => output.len(),
            Self::Shared { output_len, .. } => *output_len,
        }
    }
}

/// Outcomes drained per batch (on the stack).
const FETCH_BATCH: usize = 16;

const EMPTY_OUTCOME: Outcome = Outcome {
    sequence: 0,
    tag: 0,
    kind: OutcomeKind::Cancelled,
    attempts: 0,
};

impl<'a, L, R> ChannelRegistry<'a, L, R>
where
    L: DispatchLock<DeliveryTable>,
    R: DispatchLock<ChannelTable<'a, L>>,
{
    /// A registry for at most `capacity` channels (`1..=MAX_CHANNELS`), all memory allocated
    /// now. `close_vmbus_handle` closes a kernel VMBus handle the registry owns (`ZwClose` in the
    /// driver) once the channel that used it is gone.
    pub fn try_new(capacity: u32, close_vmbus_handle: fn(VmbusHandle)) -> Result<Self> {
        if capacity == 0 || capacity > MAX_CHANNELS {
            return Err(NtStatus::INVALID_PARAMETER);
        }
        let table = RegistryTable::try_new(capacity)?;
        Ok(Self {
            table: R::new(table),
            capacity,
            close_vmbus_handle,
            _channels: PhantomData,
        })
    }

    /// The most channels this registry holds.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Channel slots in use (created, being created, or destroyed but still checked out).
    pub fn channels_in_use(&self) -> u32 {
        self.table.with(|table| table.in_use())
    }

    /// Handles one control request with separate input and output buffers (host tools, tests).
    /// PASSIVE_LEVEL.
    pub fn dispatch<E: ControlEnvironment<'a>>(
        &self,
        owner: OwnerId,
        code: u32,
        input: &[u8],
        output: &mut [u8],
        env: &E,
    ) -> DispatchResult {
        self.run(owner, code, Buffers::Split { input, output }, env)
    }

    /// Handles one `METHOD_BUFFERED` request in place: `buffer` is the system buffer (at least
    /// `max(input_len, output_len)` bytes), read as the request and then overwritten by the
    /// response. PASSIVE_LEVEL.
    pub fn dispatch_buffered<E: ControlEnvironment<'a>>(
        &self,
        owner: OwnerId,
        code: u32,
        buffer: &mut [u8],
        input_len: usize,
        output_len: usize,
        env: &E,
    ) -> DispatchResult {
        if input_len > buffer.len() || output_len > buffer.len() {
            return DispatchResult::refused(NtStatus::INVALID_PARAMETER);
        }
        let buffers = Buffers::Shared {
            buffer,
            input_len,
            output_len,
        };
        self.run(owner, code, buffers, env)
    }

    /// Runs `f` on channel `id` of `owner`, checked out for the duration (see the module
    /// documentation): `STATUS_NOT_FOUND` for an id that names no channel of `owner`,
    /// [`STATUS_DEVICE_BUSY`](super::STATUS_DEVICE_BUSY) if another request is using it.
    pub fn with_channel<T>(
        &self,
        owner: OwnerId,
        id: u64,
        f: impl FnOnce(&VspChannel<'a, L>) -> T,
    ) -> Result<T> {
        let channel = self.table.with(|table| table.check_out(id, owner))?;
        let result = f(&channel);
        if let Some(doomed) = self.table.with(|table| table.check_in(id, channel)) {
            self.dispose(doomed);
        }
        Ok(result)
    }

    /// Destroys every channel of `owner` (the driver's `EvtFileCleanup`); returns how many were
    /// destroyed or, being in use by a request right now, doomed to be destroyed when it ends.
    pub fn destroy_owned_by(&self, owner: OwnerId) -> usize {
        self.destroy_where(Some(owner))
    }

    /// Destroys every channel (teardown); returns how many, as [`destroy_owned_by`](Self::destroy_owned_by).
    pub fn destroy_all(&self) -> usize {
        self.destroy_where(None)
    }

    fn destroy_where(&self, owner: Option<OwnerId>) -> usize {
        let mut count = 0usize;
        for index in 0..self.capacity as usize {
            let (matched, taken) = self.table.with(|table| table.take_at(index, owner));
            if matched {
                count = count.saturating_add(1);
            }
            if let Some(channel) = taken {
                self.dispose(channel);
            }
        }
        count
    }

    /// Drops a channel that has left the table, then closes its VMBus handle.
    fn dispose(&self, channel: VspChannel<'a, L>) {
        if channel.phase() == Phase::Saving {
            // Free KMCL's save context: disable and cleanup do not.
            let _ = channel.save_end();
        }
        let handle = channel.config().vmbus_handle;
        drop(channel);
        if let Some(handle) = handle {
            (self.close_vmbus_handle)(handle);
        }
    }

    fn run<E: ControlEnvironment<'a>>(
        &self,
        owner: OwnerId,
        code: u32,
        mut io: Buffers<'_>,
        env: &E,
    ) -> DispatchResult {
        let parsed = match parse::prepare(code, io.input(), io.output_len()) {
            Ok(parsed) => parsed,
            Err(status) => return DispatchResult::refused(status),
        };
        match self.execute(owner, parsed, &mut io, env) {
            Some(information) => DispatchResult {
                status: NtStatus::SUCCESS,
                information,
            },
            // The fixed response did not fit after all: `prepare` makes this unreachable.
            None => DispatchResult::refused(NtStatus::BUFFER_TOO_SMALL),
        }
    }

    /// Performs a validated request and writes its response; returns the response's size.
    fn execute<E: ControlEnvironment<'a>>(
        &self,
        owner: OwnerId,
        parsed: Parsed,
        io: &mut Buffers<'_>,
        env: &E,
    ) -> Option<usize> {
        match parsed {
            Parsed::QueryInfo => self.query_info(io.output()),
            Parsed::CreateChannel(params) => {
                let (status, id) = self.create(owner, &params, env);
                let len = wire::CREATE_CHANNEL_RESPONSE_LEN;
                let response = CreateChannelResponse {
                    header: ResponseHeader::new(status, len),
                    channel_id: id.into(),
                };
                put(io.output(), 0, &response).map(|()| len)
            }
            Parsed::PostMessage {
                channel_id,
                tag,
                trace_id,
                payload,
            } => {
                let result = {
                    let payload = io.input().get(payload).unwrap_or(&[]);
                    let request = PostRequest {
                        tag,
                        payload,
                        posted_at: env.current_time(),
                        trace_id,
                    };
                    self.with_channel(owner, channel_id, |channel| channel.post(&request))
                        .flatten()
                };
                let (status, sequence) = split(result, 0);
                let len = wire::POST_MESSAGE_RESPONSE_LEN;
                let response = PostMessageResponse {
                    header: ResponseHeader::new(status, len),
                    sequence: sequence.into(),
                };
                put(io.output(), 0, &response).map(|()| len)
            }
            Parsed::FetchOutcomes {
                channel_id,
                max_outcomes,
            } => self.fetch_outcomes(owner, channel_id, max_outcomes, io.output()),
            Parsed::RestoreChannelRecord { channel_id, record } => {
                let status = {
                    let record = io.input().get(record).unwrap_or(&[]);
                    status_of(self.with_channel(owner, channel_id, |channel| {
                        channel.restore_channel_record(record)
                    }))
                };
                status_only(io.output(), status)
            }
            Parsed::RestoreChunk { channel_id, chunk } => {
                let result = {
                    let chunk = io.input().get(chunk).unwrap_or(&[]);
                    self.with_channel(owner, channel_id, |channel| channel.restore_chunk(chunk))
                        .flatten()
                };
                let (status, progress) = match result {
                    Ok(RestoreProgress::NeedMore) => (NtStatus::SUCCESS, wire::RESTORE_NEED_MORE),
                    Ok(RestoreProgress::Complete) => (NtStatus::SUCCESS, wire::RESTORE_COMPLETE),
                    Err(status) => (status, 0),
                };
                let len = wire::RESTORE_CHUNK_RESPONSE_LEN;
                let response = RestoreChunkResponse {
                    header: ResponseHeader::new(status, len),
                    progress: progress.into(),
                    reserved: 0.into(),
                };
                put(io.output(), 0, &response).map(|()| len)
            }
            Parsed::Channel { op, channel_id } => {
                self.channel_op(owner, op, channel_id, io.output())
            }
        }
    }

    fn channel_op(&self, owner: OwnerId, op: ControlOp, id: u64, out: &mut [u8]) -> Option<usize> {
        let simple =
            |f: fn(&VspChannel<'a, L>) -> Result<()>| status_of(self.with_channel(owner, id, f));
        match op {
            ControlOp::DestroyChannel => self.destroy(owner, id, out),
            ControlOp::QueryStatistics => self.query_statistics(owner, id, out),
            ControlOp::SaveBegin => self.save_begin(owner, id, out),
            ControlOp::SaveContinue => self.save_continue(owner, id, out),
            ControlOp::DisableChannel => status_only(out, simple(VspChannel::disable)),
            ControlOp::SaveEnd => status_only(out, simple(VspChannel::save_end)),
            ControlOp::Resume => status_only(out, simple(VspChannel::resume)),
            ControlOp::CompleteMigration => {
                status_only(out, simple(VspChannel::complete_migration))
            }
            ControlOp::FinishRestore => status_only(out, simple(VspChannel::finish_restore)),
            ControlOp::RestartIncoming => status_only(out, simple(VspChannel::restart_incoming)),
            // Never parsed as a channel-only request.
            ControlOp::QueryInfo
            | ControlOp::CreateChannel
            | ControlOp::PostMessage
            | ControlOp::FetchOutcomes
            | ControlOp::RestoreChannelRecord
            | ControlOp::RestoreChunk => status_only(out, NtStatus::INVALID_DEVICE_REQUEST),
        }
    }

    fn query_info(&self, out: &mut [u8]) -> Option<usize> {
        let len = wire::INFO_RESPONSE_LEN;
        let response = InfoResponse {
            header: ResponseHeader::new(NtStatus::SUCCESS, len),
            control_version: u32::from(CONTROL_VERSION).into(),
            guest_protocol_version: protocol::SUPPORTED_VERSIONS
                .first()
                .copied()
                .unwrap_or(0)
                .into(),
            max_channels: self.capacity.into(),
            channels_in_use: self.channels_in_use().into(),
            max_in_flight: MAX_IN_FLIGHT_LIMIT.into(),
            max_message_len: MAX_PAYLOAD_LEN.into(),
            max_record_len: len32(MAX_RECORD_LEN),
            max_chunk_len: len32(MAX_CHUNK_LEN),
        };
        put(out, 0, &response).map(|()| len)
    }

    fn create<E: ControlEnvironment<'a>>(
        &self,
        owner: OwnerId,
        params: &CreateParams,
        env: &E,
    ) -> (NtStatus, u64) {
        let id = match self.table.with(|table| table.reserve(owner)) {
            Ok(id) => id,
            Err(status) => return (status, 0),
        };
        let vmbus_handle = if params.vmbus_handle == 0 {
            None
        } else {
            match env.convert_vmbus_handle(params.vmbus_handle) {
                Ok(handle) => Some(handle),
                Err(status) => {
                    self.table.with(|table| table.abandon(id));
                    return (status, 0);
                }
            }
        };
        let config = ChannelConfig {
            interface_type: params.interface_type,
            instance: params.instance,
            max_in_flight: params.max_in_flight,
            max_message_len: params.max_message_len,
            server_flags: params.server_flags,
            vmbus_handle,
            parent: env.parent_device(),
        };
        let interface = env.server_interface();
        let created = match params.mode {
            CreateMode::Start => VspChannel::create(interface, &config),
            CreateMode::ForRestore => VspChannel::create_for_restore(interface, &config),
        };
        match created {
            Err(status) => {
                // The half-built channel is already cleaned up; its handle is ours to close.
                self.table.with(|table| table.abandon(id));
                if let Some(handle) = vmbus_handle {
                    (self.close_vmbus_handle)(handle);
                }
                (status, 0)
            }
            Ok(channel) => match self.table.with(|table| table.publish(id, channel)) {
                Ok(()) => (NtStatus::SUCCESS, id),
                Err(channel) => {
                    // The owner was cleaned up while the channel was being created.
                    self.dispose(channel);
                    (NtStatus::CANCELLED, 0)
                }
            },
        }
    }

    fn destroy(&self, owner: OwnerId, id: u64, out: &mut [u8]) -> Option<usize> {
        let (status, unfetched, in_flight) =
            match self.table.with(|table| table.check_out(id, owner)) {
                Err(status) => (status, 0, 0),
                Ok(channel) => {
                    if channel.phase() == Phase::Saving {
                        let _ = channel.save_end();
                    }
                    // Disable first, so that the cancellations are counted.
                    let _ = channel.disable();
                    let statistics = channel.statistics();
                    self.dispose(channel);
                    self.table.with(|table| table.release_checked_out(id));
                    (
                        NtStatus::SUCCESS,
                        statistics.pending_outcomes,
                        statistics.in_flight,
                    )
                }
            };
        let len = wire::DESTROY_CHANNEL_RESPONSE_LEN;
        let response = DestroyChannelResponse {
            header: ResponseHeader::new(status, len),
            unfetched_outcomes: unfetched.into(),
            in_flight: in_flight.into(),
        };
        put(out, 0, &response).map(|()| len)
    }

    fn fetch_outcomes(&self, owner: OwnerId, id: u64, max: u32, out: &mut [u8]) -> Option<usize> {
        let room =
            out.len().saturating_sub(wire::FETCH_OUTCOMES_RESPONSE_LEN) / wire::OUTCOME_ENTRY_LEN;
        let want = room.min(usize::try_from(max).unwrap_or(usize::MAX));
        let result = self.with_channel(owner, id, |channel| {
            let count = drain_into(channel, want, out);
            (count, channel.statistics().pending_outcomes)
        });
        let (status, (count, remaining)) = split(result, (0, 0));
        let size = wire::OUTCOME_ENTRY_LEN
            .checked_mul(count)
            .and_then(|n| n.checked_add(wire::FETCH_OUTCOMES_RESPONSE_LEN))?;
        let response = FetchOutcomesResponse {
            header: ResponseHeader::new(status, size),
            count: len32(count),
            remaining: remaining.into(),
        };
        put(out, 0, &response).map(|()| size)
    }

    fn query_statistics(&self, owner: OwnerId, id: u64, out: &mut [u8]) -> Option<usize> {
        let result = self.with_channel(owner, id, |channel| {
            (
                channel.statistics(),
                channel.phase(),
                channel.config().max_in_flight,
                channel.config().max_message_len,
            )
        });
        let len = wire::STATISTICS_RESPONSE_LEN;
        let status = match &result {
            Ok(_) => NtStatus::SUCCESS,
            Err(status) => *status,
        };
        let mut response = StatisticsResponse::new_zeroed_with(ResponseHeader::new(status, len));
        if let Ok((statistics, phase, max_in_flight, max_message_len)) = result {
            let stats = statistics.stats;
            response.phase = u32::from(phase as u8).into();
            // No flag is defined any more (see `wire::STATS_FLAG_INCOMING_STOPPED`).
            response.flags = 0.into();
            response.restore_generation = statistics.restore_generation.into();
            response.protocol_version = statistics.protocol_version.into();
            response.in_flight = statistics.in_flight.into();
            response.pending_outcomes = statistics.pending_outcomes.into();
            response.max_in_flight = max_in_flight.into();
            response.max_message_len = max_message_len.into();
            response.next_sequence = statistics.next_sequence.into();
            response.corrupted = statistics.corrupted.into();
            response.posted = stats.posted.into();
            response.acked = stats.acked.into();
            response.nacked = stats.nacked.into();
            response.cancelled = stats.cancelled.into();
            response.bad_acks = stats.bad_acks.into();
            response.guest_requests = stats.guest_requests.into();
            response.guest_bad_requests = stats.guest_bad_requests.into();
            response.guest_garbled = stats.guest_garbled.into();
        }
        put(out, 0, &response).map(|()| len)
    }

    fn save_begin(&self, owner: OwnerId, id: u64, out: &mut [u8]) -> Option<usize> {
        let fixed = wire::SAVE_BEGIN_RESPONSE_LEN;
        let result = self
            .with_channel(owner, id, |channel| {
                let record = channel.save_begin()?;
                let encoded = fixed
                    .checked_add(record.encoded_len())
                    .and_then(|end| out.get_mut(fixed..end))
                    .ok_or(NtStatus::BUFFER_TOO_SMALL)
                    .and_then(|place| record.encode(place).map_err(save_error_status));
                if encoded.is_err() {
                    // Leave the channel as a failed SaveBegin does: running.
                    let _ = channel.resume();
                }
                encoded
            })
            .flatten();
        let (status, record_len) = split(result, 0);
        let size = fixed.checked_add(record_len)?;
        let response = SaveBeginResponse {
            header: ResponseHeader::new(status, size),
            record_len: len32(record_len),
            reserved: 0.into(),
        };
        put(out, 0, &response).map(|()| size)
    }

    fn save_continue(&self, owner: OwnerId, id: u64, out: &mut [u8]) -> Option<usize> {
        let fixed = wire::SAVE_CONTINUE_RESPONSE_LEN;
        let room = out.len().saturating_sub(fixed).min(MAX_CHUNK_LEN);
        let result = self
            .with_channel(owner, id, |channel| {
                let place = fixed
                    .checked_add(room)
                    .and_then(|end| out.get_mut(fixed..end))
                    .ok_or(NtStatus::BUFFER_TOO_SMALL)?;
                channel.save_continue(place)
            })
            .flatten();
        let (status, kmcl_status, filled, required, chunk_len) = match result {
            Err(status) => (status, NtStatus::SUCCESS, 0, 0, 0),
            Ok(chunk) => {
                let filled = chunk.filled as usize;
                let carries_chunk =
                    chunk.status == NtStatus::SUCCESS || chunk.status == NtStatus::BUFFER_OVERFLOW;
                let (status, chunk_len) = if filled > room {
                    // KMCL claims more than it was offered: return none of it.
                    (NtStatus::UNSUCCESSFUL, 0)
                } else if carries_chunk {
                    (NtStatus::SUCCESS, filled)
                } else {
                    (NtStatus::SUCCESS, 0)
                };
                (
                    status,
                    chunk.status,
                    chunk.filled,
                    chunk.required,
                    chunk_len,
                )
            }
        };
        let size = fixed.checked_add(chunk_len)?;
        let response = SaveContinueResponse {
            header: ResponseHeader::new(status, size),
            kmcl_status: kmcl_status.0.into(),
            bytes_filled: filled.into(),
            bytes_required: required.into(),
            reserved: 0.into(),
        };
        put(out, 0, &response).map(|()| size)
    }
}

impl<'a, L, R> Drop for ChannelRegistry<'a, L, R>
where
    L: DispatchLock<DeliveryTable>,
    R: DispatchLock<ChannelTable<'a, L>>,
{
    fn drop(&mut self) {
        self.destroy_all();
    }
}

/// Drains up to `want` outcomes into the entries after `out`'s fixed part; returns how many.
///
/// Only as many outcomes are taken from the channel as there are entries to hold them, so none
/// is lost.
fn drain_into<L: DispatchLock<DeliveryTable>>(
    channel: &VspChannel<'_, L>,
    want: usize,
    out: &mut [u8],
) -> usize {
    let mut batch = [EMPTY_OUTCOME; FETCH_BATCH];
    let mut count = 0usize;
    while count < want {
        let asked = FETCH_BATCH.min(want - count);
        let Some(place) = batch.get_mut(..asked) else {
            break;
        };
        let got = channel.drain_outcomes(place);
        for outcome in batch.iter().take(got) {
            let offset = count
                .checked_mul(wire::OUTCOME_ENTRY_LEN)
                .and_then(|n| n.checked_add(wire::FETCH_OUTCOMES_RESPONSE_LEN));
            // `count < want <= room`, so the entry fits; were it not, stop rather than drop it.
            if offset
                .and_then(|offset| put(out, offset, &outcome_entry(outcome)))
                .is_none()
            {
                return count;
            }
            count += 1;
        }
        if got < asked {
            break;
        }
    }
    count
}

/// The wire form of an outcome.
pub fn outcome_entry(outcome: &Outcome) -> OutcomeEntry {
    let (kind, guest_status) = match outcome.kind {
        OutcomeKind::Acked => (wire::OUTCOME_ACKED, 0),
        OutcomeKind::Nacked { guest_status } => (wire::OUTCOME_NACKED, guest_status),
        OutcomeKind::Corrupted => (wire::OUTCOME_CORRUPTED, 0),
        OutcomeKind::BadAck => (wire::OUTCOME_BAD_ACK, 0),
        OutcomeKind::Cancelled => (wire::OUTCOME_CANCELLED, 0),
        OutcomeKind::Migrated => (wire::OUTCOME_MIGRATED, 0),
    };
    OutcomeEntry {
        sequence: outcome.sequence.into(),
        tag: outcome.tag.into(),
        kind: kind.into(),
        attempts: outcome.attempts.into(),
        guest_status: guest_status.into(),
    }
}

/// The status a failed channel-record encode reports.
fn save_error_status(error: SaveError) -> NtStatus {
    match error {
        SaveError::BufferTooSmall { .. } => NtStatus::BUFFER_TOO_SMALL,
        SaveError::InvalidRecord { .. } | SaveError::InvalidExtension | SaveError::TooLarge => {
            NtStatus::INVALID_DEVICE_STATE
        }
    }
}

impl StatisticsResponse {
    fn new_zeroed_with(header: ResponseHeader) -> Self {
        let zero32 = U32::ZERO;
        let zero64 = U64::ZERO;
        Self {
            header,
            phase: zero32,
            flags: zero32,
            protocol_version: zero32,
            in_flight: zero32,
            pending_outcomes: zero32,
            max_in_flight: zero32,
            max_message_len: zero32,
            restore_generation: zero32,
            next_sequence: zero64,
            corrupted: zero64,
            posted: zero64,
            acked: zero64,
            nacked: zero64,
            cancelled: zero64,
            bad_acks: zero64,
            guest_requests: zero64,
            guest_bad_requests: zero64,
            guest_garbled: zero64,
        }
    }
}

/// Writes `value` at `offset`; `None` if it does not fit.
fn put<T: IntoBytes + Immutable>(out: &mut [u8], offset: usize, value: &T) -> Option<()> {
    let end = offset.checked_add(size_of::<T>())?;
    value.write_to(out.get_mut(offset..end)?).ok()
}

/// Writes a header-only response.
fn status_only(out: &mut [u8], status: NtStatus) -> Option<usize> {
    let len = wire::RESPONSE_HEADER_LEN;
    put(out, 0, &ResponseHeader::new(status, len)).map(|()| len)
}

/// The status of a checked-out operation that returns `Result<()>`.
fn status_of(result: Result<Result<()>>) -> NtStatus {
    match result.flatten() {
        Ok(()) => NtStatus::SUCCESS,
        Err(status) => status,
    }
}

/// `(SUCCESS, value)` or `(error, default)`.
fn split<T>(result: Result<T>, default: T) -> (NtStatus, T) {
    match result {
        Ok(value) => (NtStatus::SUCCESS, value),
        Err(status) => (status, default),
    }
}

/// A length as a wire `u32` (every length here is bounded far below `u32::MAX`).
fn len32(len: usize) -> U32 {
    U32::new(u32::try_from(len).unwrap_or(u32::MAX))
}
