//! One vmbsrv channel: bring-up, posting, the KMCL callbacks, save, restore and teardown.
//!
//! [`VspChannel`] is the control side (PASSIVE_LEVEL, called from the control interface);
//! [`Vsp`] is the handler KMCL's callbacks reach through the `kmcl` trampolines. Both share
//! the [`DeliveryTable`] behind a [`DispatchLock`].
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> Initialized: create / create_for_restore
//!     Initialized --> Running: enable + start
//!     Initialized --> Restoring: restore_channel_record
//!     Restoring --> Restoring: restore_chunk (more)
//!     Restoring --> Restored: restore_chunk (done, counts verified)
//!     Restoring --> RestoreFailed: any failure
//!     Restored --> Running: finish_restore (enable + start)
//!     Running --> Saving: save_begin (freeze posts, pause, VmbChannelSaveBegin)
//!     Saving --> Saved: save_end (every delivery saved exactly once)
//!     Saving --> SaveFailed: save_end (a delivery missing or saved twice)
//!     SaveFailed --> Running: resume
//!     SaveFailed --> Saving: save_begin (retry)
//!     Saving --> Running: resume (aborted save)
//!     Saved --> Running: resume (aborted migration)
//!     Saved --> Saving: save_begin (retry)
//!     Saved --> Migrated: complete_migration (teardown; in-flight = Migrated)
//!     Running --> Disabled: disable
//!     RestoreFailed --> Disabled: disable (restored packets come back Cancelled)
//!     Migrated --> [*]
//!     Disabled --> [*]
//! ```

use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use zerocopy::IntoBytes;

use super::lock::DispatchLock;
use super::protocol::{self, Request, RequestError};
use super::save_protocol::{answer_save_call, restore_status};
use super::table::{DeliveryTable, MAX_CAPACITY, Outcome, OutcomeKind, Token};
use crate::kmcl::raw::{self, GUID};
use crate::kmcl::{
    Channel, ChannelEvents, GuestBytes, IncomingPacket, NtStatus, OwnedChannel, Packet, PacketView,
    ParentDevice, Result, SaveChunk, SavePacketAnswer, ServerInterface, VmbusHandle,
};
use crate::saved::{ChannelRecord, ChannelStats, DeliveryRecord, MAX_PAYLOAD_LEN, crc32c};

/// What a channel is created with.
#[derive(Clone, Copy, Debug)]
pub struct ChannelConfig {
    /// The protocol GUID offered to the guest (basis of the guest device's hardware id).
    pub interface_type: GUID,
    /// The instance GUID of this offer.
    pub instance: GUID,
    /// Most deliveries outstanding at once (and most unfetched outcomes), `1..=65536`.
    pub max_in_flight: u32,
    /// Largest message payload, `1..=65536` bytes.
    pub max_message_len: u32,
    /// `VMBUS_SERVER_CHANNEL_INIT_FLAG_*`.
    pub server_flags: u32,
    /// The partition's VMBus (kernel handle); `None` only where the provider needs none.
    pub vmbus_handle: Option<VmbusHandle>,
    /// The device object channels are allocated under.
    pub parent: ParentDevice,
}

/// The friendly name every vmbsrv channel carries (UTF-16, for KMCL's debugging output).
pub static FRIENDLY_NAME: [u16; 6] = [
    b'v' as u16,
    b'm' as u16,
    b'b' as u16,
    b's' as u16,
    b'r' as u16,
    b'v' as u16,
];

impl ChannelConfig {
    fn validate(&self) -> Result<()> {
        if self.max_in_flight == 0 || self.max_in_flight > MAX_CAPACITY {
            return Err(NtStatus::INVALID_PARAMETER);
        }
        if self.max_message_len == 0 || self.max_message_len > MAX_PAYLOAD_LEN {
            return Err(NtStatus::INVALID_PARAMETER);
        }
        if self.server_flags & !raw::VMBUS_SERVER_CHANNEL_INIT_FLAGS != 0 {
            return Err(NtStatus::INVALID_PARAMETER);
        }
        if self.server_flags & raw::VMBUS_SERVER_CHANNEL_INIT_FLAG_OFFER_AS_PIPE != 0 {
            // vmbsrv's protocol is transactions with completions; a pipe offer has none.
            return Err(NtStatus::INVALID_PARAMETER);
        }
        Ok(())
    }

    /// The largest packet this channel sends: a delivery header plus the largest payload.
    pub fn max_packet_size(&self) -> u32 {
        protocol::DELIVERY_HEADER_LEN as u32 + self.max_message_len
    }
}

/// The control-side phase of a channel (see the module diagram).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Allocated and configured, not enabled.
    Initialized = 0,
    /// The channel record was accepted; KMCL chunks are being restored.
    Restoring = 1,
    /// Every saved delivery was rebuilt and verified; not yet enabled.
    Restored = 2,
    /// A restore failed; the channel can only be disabled.
    RestoreFailed = 3,
    /// Enabled and started.
    Running = 4,
    /// Between `VmbChannelSaveBegin` and `VmbChannelSaveEnd`.
    Saving = 5,
    /// Saved and paused: resume (aborted migration) or complete the migration.
    Saved = 6,
    /// Torn down after a migration save.
    Migrated = 7,
    /// Disabled.
    Disabled = 8,
    /// `save_end` found the save incomplete: its output is unusable. Resume, or save again.
    SaveFailed = 9,
}

impl Phase {
    fn from_raw(raw: u8) -> Self {
        match raw {
            0 => Self::Initialized,
            1 => Self::Restoring,
            2 => Self::Restored,
            3 => Self::RestoreFailed,
            4 => Self::Running,
            5 => Self::Saving,
            6 => Self::Saved,
            7 => Self::Migrated,
            9 => Self::SaveFailed,
            _ => Self::Disabled,
        }
    }
}

/// A snapshot of a channel's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Statistics {
    /// The persisted counters.
    pub stats: ChannelStats,
    /// Deliveries outstanding.
    pub in_flight: u32,
    /// Outcomes not yet fetched.
    pub pending_outcomes: u32,
    /// Deliveries whose acknowledgement carried a different payload checksum (this instance).
    pub corrupted: u64,
    /// The negotiated protocol version (0: none).
    pub protocol_version: u32,
    /// The next sequence number to be assigned.
    pub next_sequence: u64,
}

/// One message to post.
#[derive(Clone, Copy, Debug)]
pub struct PostRequest<'p> {
    /// Opaque client value, returned with the outcome.
    pub tag: u64,
    /// The message bytes, `1..=max_message_len`.
    pub payload: &'p [u8],
    /// Host time of the post, 100 ns units.
    pub posted_at: u64,
    /// Optional correlation id, saved with the delivery.
    pub trace_id: Option<[u8; 16]>,
}

/// The result of feeding one chunk to a restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreProgress {
    /// KMCL wants the next chunk.
    NeedMore,
    /// The restore is complete and verified; call [`VspChannel::finish_restore`].
    Complete,
}

/// The callback side of a channel: what KMCL's trampolines call.
///
/// # Invariants
/// * All delivery state is in `table`; `phase` only gates control operations and the restore
///   callback, so a callback never needs more than the one lock.
pub struct Vsp<L> {
    table: L,
    phase: AtomicU8,
    max_message_len: u32,
    /// Deliveries the channel record says the KMCL blob brings back.
    expected_restored: core::sync::atomic::AtomicU32,
    /// The first open after a restore keeps the restored protocol version (the guest's channel
    /// survived the migration and it does not renegotiate).
    keep_version_on_open: AtomicBool,
    /// `VmbChannelPacketFail` stopped the incoming queue; `restart_incoming` recovers.
    incoming_stopped: AtomicBool,
    /// The current save's `VmbChannelSaveContinue` returned `STATUS_SUCCESS` (the last chunk).
    save_produced_last_chunk: AtomicBool,
}

impl<L: DispatchLock<DeliveryTable>> Vsp<L> {
    fn phase(&self) -> Phase {
        Phase::from_raw(self.phase.load(Ordering::Acquire))
    }

    fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Release);
    }

    /// Waits until no post is between reservation and the end of its send.
    ///
    /// Called at PASSIVE_LEVEL after `running` was cleared or the table frozen, so no new post
    /// can start; a post in progress finishes without blocking (`VmbPacketSend` does not wait
    /// for the ring), so this is a short spin.
    fn wait_for_posts(&self) {
        while self.table.with(|table| table.posts_in_progress) != 0 {
            core::hint::spin_loop();
        }
    }

    fn reply(&self, packet: IncomingPacket<'_>, bytes: &[u8]) {
        packet.complete(bytes);
    }

    fn reply_error(&self, packet: IncomingPacket<'_>, kind: u16, status: NtStatus) {
        let reply = protocol::ErrorReply {
            header: protocol::Header::new(
                protocol::Kind::ErrorReply,
                size_of::<protocol::ErrorReply>(),
            ),
            status: status.0.into(),
            request_kind: kind.into(),
            reserved: 0.into(),
        };
        self.reply(packet, reply.as_bytes());
    }

    fn negotiate(&self, packet: IncomingPacket<'_>, min: u32, max: u32) {
        let kind = protocol::Kind::NegotiateRequest as u16;
        let Some(version) = protocol::choose_version(min, max) else {
            self.table.with(|table| {
                table.stats.guest_bad_requests = table.stats.guest_bad_requests.saturating_add(1)
            });
            return self.reply_error(packet, kind, NtStatus::REVISION_MISMATCH);
        };
        let (accepted, capacity) = self.table.with(|table| {
            // Switching versions under outstanding deliveries would change their format mid-flight.
            let accepted = table.protocol_version == version
                || table.protocol_version == 0
                || table.in_flight() == 0;
            if accepted {
                table.protocol_version = version;
            } else {
                table.stats.guest_bad_requests = table.stats.guest_bad_requests.saturating_add(1);
            }
            (accepted, table.capacity())
        });
        if !accepted {
            return self.reply_error(packet, kind, NtStatus::INVALID_DEVICE_STATE);
        }
        let reply = protocol::NegotiateReply {
            header: protocol::Header::new(
                protocol::Kind::NegotiateReply,
                size_of::<protocol::NegotiateReply>(),
            ),
            status: NtStatus::SUCCESS.0.into(),
            version: version.into(),
            max_message_len: self.max_message_len.into(),
            max_in_flight: capacity.into(),
        };
        self.reply(packet, reply.as_bytes());
    }

    fn report_statistics(&self, packet: IncomingPacket<'_>) {
        let snapshot = self.statistics();
        let reply = protocol::StatisticsReply {
            header: protocol::Header::new(
                protocol::Kind::StatisticsReply,
                size_of::<protocol::StatisticsReply>(),
            ),
            status: NtStatus::SUCCESS.0.into(),
            version: snapshot.protocol_version.into(),
            posted: snapshot.stats.posted.into(),
            acked: snapshot.stats.acked.into(),
            nacked: snapshot.stats.nacked.into(),
            cancelled: snapshot.stats.cancelled.into(),
            in_flight: snapshot.in_flight.into(),
            reserved: 0.into(),
        };
        self.reply(packet, reply.as_bytes());
    }

    fn statistics(&self) -> Statistics {
        self.table.with(|table| Statistics {
            stats: table.stats,
            in_flight: table.in_flight(),
            pending_outcomes: u32::try_from(table.pending_outcomes()).unwrap_or(u32::MAX),
            corrupted: table.corrupted,
            protocol_version: table.protocol_version,
            next_sequence: table.next_sequence,
        })
    }

    fn classify(
        status: NtStatus,
        ack: Option<protocol::AckInfo>,
        delivery: &DeliveryRecord,
    ) -> OutcomeKind {
        if !status.is_success() {
            return OutcomeKind::Cancelled;
        }
        match ack {
            Some(ack) if ack.sequence == delivery.sequence => {
                if ack.payload_crc != delivery.payload_crc {
                    OutcomeKind::Corrupted
                } else if ack.status != 0 {
                    OutcomeKind::Nacked {
                        guest_status: ack.status,
                    }
                } else {
                    OutcomeKind::Acked
                }
            }
            _ => OutcomeKind::BadAck,
        }
    }
}

impl<L: DispatchLock<DeliveryTable>> ChannelEvents for Vsp<L> {
    fn opened(&self, _channel: Channel<'_, Self>) -> NtStatus {
        let keep = self.keep_version_on_open.swap(false, Ordering::AcqRel);
        if !keep {
            // A new guest connection negotiates afresh.
            self.table.with(|table| table.protocol_version = 0);
        }
        NtStatus::SUCCESS
    }

    fn closed(&self, _channel: Channel<'_, Self>) {
        self.table.with(|table| table.running = false);
    }

    fn suspend(&self, _channel: Channel<'_, Self>) {
        // No new sends from here on; let any send already under way finish first.
        self.table.with(|table| table.running = false);
        self.wait_for_posts();
        // Incoming packets are always completed inline, so none is outstanding here.
    }

    fn started(&self, _channel: Channel<'_, Self>) {}

    fn post_started(&self, _channel: Channel<'_, Self>) {
        self.incoming_stopped.store(false, Ordering::Release);
        self.table.with(|table| table.running = true);
    }

    fn process_packet(&self, _channel: Channel<'_, Self>, packet: IncomingPacket<'_>, flags: u32) {
        let bytes = packet.bytes();
        // One copy out of guest-writable memory; only the copy is parsed.
        let mut copy = [0u8; protocol::MAX_REQUEST_LEN];
        let copy = bytes.copy_prefix_to(&mut copy);
        let parsed = protocol::parse_request(copy, bytes.len());
        self.table.with(|table| {
            table.stats.guest_requests = table.stats.guest_requests.saturating_add(1)
        });
        match parsed {
            Err(RequestError::Garbled) => {
                self.table.with(|table| {
                    table.stats.guest_garbled = table.stats.guest_garbled.saturating_add(1)
                });
                self.incoming_stopped.store(true, Ordering::Release);
                packet.fail();
            }
            Err(RequestError::Invalid { kind, status }) => {
                self.table.with(|table| {
                    table.stats.guest_bad_requests =
                        table.stats.guest_bad_requests.saturating_add(1)
                });
                self.reply_error(packet, kind, status);
            }
            Ok(request) if flags & raw::VMBUS_CHANNEL_PROCESS_PACKET_FLAG_EXTERNAL_DATA != 0 => {
                // No request of this protocol carries external data.
                self.table.with(|table| {
                    table.stats.guest_bad_requests =
                        table.stats.guest_bad_requests.saturating_add(1)
                });
                self.reply_error(packet, request.kind() as u16, NtStatus::INVALID_PARAMETER);
            }
            Ok(Request::Negotiate { min, max }) => self.negotiate(packet, min, max),
            Ok(Request::Statistics) => self.report_statistics(packet),
        }
    }

    fn packet_completed(
        &self,
        packet: Packet<'_, Self>,
        status: NtStatus,
        payload: GuestBytes<'_>,
    ) {
        let mut copy = [0u8; protocol::MAX_ACK_LEN];
        let ack = if payload.len() == protocol::ACK_LEN {
            protocol::parse_ack(payload.copy_prefix_to(&mut copy))
        } else {
            None
        };
        if let Some(token) = packet.token() {
            // A token that matches nothing (it cannot happen for our own packets) is ignored:
            // there is no delivery to record it against.
            self.table.with(|table| {
                table.complete(token, |delivery| Self::classify(status, ack, delivery))
            });
        }
        packet.free();
    }

    fn save_packet(
        &self,
        _channel: Channel<'_, Self>,
        packet: PacketView<'_>,
        buffer: Option<&mut [u8]>,
    ) -> SavePacketAnswer {
        let delivery = packet
            .token()
            .and_then(|token| self.table.with(|table| table.delivery_for_save(token)));
        let answer = answer_save_call(delivery.as_ref(), buffer);
        SavePacketAnswer {
            status: answer.status,
            bytes_needed: answer.bytes_needed,
        }
    }

    fn restore_packet(
        &self,
        channel: Channel<'_, Self>,
        lib_buf: &[u8],
        save_buf: &[u8],
    ) -> NtStatus {
        if self.phase() != Phase::Restoring {
            // The channel record must come first: it carries the sequence counter every
            // restored delivery is checked against.
            return NtStatus::INVALID_DEVICE_STATE;
        }
        // Validate everything before building anything.
        let record = match DeliveryRecord::decode(save_buf) {
            Ok(record) => record,
            Err(error) => return restore_status(error),
        };
        if record.payload_len > self.max_message_len {
            return NtStatus::DATA_ERROR;
        }
        let token = match self.table.with(|table| table.insert_restored(record)) {
            Ok(token) => token,
            Err(status) => return status,
        };
        let Some(packet) = channel.allocate_packet() else {
            self.table.with(|table| table.remove_restored(token));
            return NtStatus::INSUFFICIENT_RESOURCES;
        };
        // Completion routine and context first: a restored packet keeps nothing of its past.
        packet.set_completion_routine();
        packet.set_token(token);
        match packet.restore(lib_buf) {
            Ok(restored) => {
                restored.ensure_context(token);
                NtStatus::SUCCESS
            }
            Err((status, packet)) => {
                packet.free();
                self.table.with(|table| table.remove_restored(token));
                status
            }
        }
    }
}

/// A vmbsrv channel, owned by the control interface.
pub struct VspChannel<'a, L: DispatchLock<DeliveryTable>> {
    channel: OwnedChannel<'a, Vsp<L>>,
    config: ChannelConfig,
    /// Serializes control operations (save, restore, resume, disable); posts do not take it.
    busy: AtomicBool,
}

impl<L: DispatchLock<DeliveryTable>> Drop for VspChannel<'_, L> {
    fn drop(&mut self) {
        // The channel's own drop disables and cleans up; a save in progress must end first.
        self.end_save_in_progress();
    }
}

/// Holds [`VspChannel::busy`] for the length of one control operation.
struct ControlGuard<'g>(&'g AtomicBool);

impl Drop for ControlGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl<'a, L: DispatchLock<DeliveryTable>> VspChannel<'a, L> {
    /// Creates, configures, enables and starts a channel (kmcl-reference §5 order).
    pub fn create(interface: &'a ServerInterface, config: &ChannelConfig) -> Result<Self> {
        let channel = Self::bring_up(interface, config)?;
        channel.enable_and_start()?;
        Ok(channel)
    }

    /// Creates and configures a channel that will be restored before it is enabled.
    pub fn create_for_restore(
        interface: &'a ServerInterface,
        config: &ChannelConfig,
    ) -> Result<Self> {
        Self::bring_up(interface, config)
    }

    fn bring_up(interface: &'a ServerInterface, config: &ChannelConfig) -> Result<Self> {
        config.validate()?;
        let table = DeliveryTable::try_new(config.max_in_flight)
            .map_err(|_| NtStatus::INSUFFICIENT_RESOURCES)?;
        let handler = Vsp {
            table: L::new(table),
            phase: AtomicU8::new(Phase::Initialized as u8),
            max_message_len: config.max_message_len,
            expected_restored: core::sync::atomic::AtomicU32::new(0),
            keep_version_on_open: AtomicBool::new(false),
            incoming_stopped: AtomicBool::new(false),
            save_produced_last_chunk: AtomicBool::new(false),
        };
        // From here on, dropping `channel` on an error path runs VmbChannelCleanup.
        let channel = interface.allocate_server_channel(config.parent, handler)?;
        if let Some(handle) = config.vmbus_handle {
            channel.set_vmbus_handle(handle)?;
        }
        channel.set_target_interface_id(config.interface_type, config.instance)?;
        channel.set_server_flags(config.server_flags)?;
        channel.set_maximum_packet_size(config.max_packet_size())?;
        channel.set_friendly_name(&FRIENDLY_NAME)?;
        channel.set_process_packet_callbacks()?;
        channel.set_state_change_callbacks()?;
        channel.set_save_restore_callbacks()?;
        Ok(Self {
            channel,
            config: *config,
            busy: AtomicBool::new(false),
        })
    }

    fn enable_and_start(&self) -> Result<()> {
        self.channel.enable()?;
        self.channel.start();
        self.vsp().set_phase(Phase::Running);
        Ok(())
    }

    fn vsp(&self) -> &Vsp<L> {
        self.channel.handler()
    }

    fn control(&self) -> Result<ControlGuard<'_>> {
        self.busy
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .map(|_| ControlGuard(&self.busy))
            .map_err(|_| NtStatus::INVALID_DEVICE_STATE)
    }

    fn expect_phase(&self, allowed: &[Phase]) -> Result<Phase> {
        let phase = self.vsp().phase();
        if allowed.contains(&phase) {
            Ok(phase)
        } else {
            Err(NtStatus::INVALID_DEVICE_STATE)
        }
    }

    /// The channel's configuration.
    pub fn config(&self) -> &ChannelConfig {
        &self.config
    }

    /// The control-side phase.
    pub fn phase(&self) -> Phase {
        self.vsp().phase()
    }

    /// A snapshot of the counters.
    pub fn statistics(&self) -> Statistics {
        self.vsp().statistics()
    }

    /// Whether a garbled guest packet stopped the incoming queue.
    pub fn incoming_stopped(&self) -> bool {
        self.vsp().incoming_stopped.load(Ordering::Acquire)
    }

    /// Takes up to `out.len()` recorded outcomes, oldest first; returns how many.
    pub fn drain_outcomes(&self, out: &mut [Outcome]) -> usize {
        self.vsp().table.with(|table| table.drain_outcomes(out))
    }

    /// Posts one message; returns its sequence number. PASSIVE_LEVEL.
    ///
    /// Refused with `STATUS_INVALID_BUFFER_SIZE` (payload empty or over the limit),
    /// `STATUS_INVALID_DEVICE_STATE` (no negotiated guest, not running, or saving),
    /// `STATUS_QUOTA_EXCEEDED` (in-flight + unfetched outcomes at the limit) or
    /// `STATUS_INSUFFICIENT_RESOURCES` (no memory or no packet object).
    pub fn post(&self, request: &PostRequest<'_>) -> Result<u64> {
        let length =
            u32::try_from(request.payload.len()).map_err(|_| NtStatus::INVALID_BUFFER_SIZE)?;
        if length == 0 || length > self.config.max_message_len {
            return Err(NtStatus::INVALID_BUFFER_SIZE);
        }
        let crc = crc32c(request.payload);
        let mut message = Vec::new();
        message
            .try_reserve_exact(protocol::DELIVERY_HEADER_LEN + request.payload.len())
            .map_err(|_| NtStatus::INSUFFICIENT_RESOURCES)?;
        let vsp = self.vsp();
        let (token, record) = vsp
            .table
            .with(|table| {
                table.reserve(
                    request.tag,
                    request.posted_at,
                    length,
                    crc,
                    request.trace_id,
                )
            })
            .map_err(|error| error.status())?;
        let sent = self.send_delivery(token, &record, request.payload, &mut message);
        vsp.table
            .with(|table| table.finish_post(token, sent.is_ok()));
        sent.map(|()| record.sequence)
    }

    fn send_delivery(
        &self,
        token: Token,
        record: &DeliveryRecord,
        payload: &[u8],
        message: &mut Vec<u8>,
    ) -> Result<()> {
        let header = protocol::DeliveryHeader {
            header: protocol::Header::new(
                protocol::Kind::Delivery,
                protocol::DELIVERY_HEADER_LEN + payload.len(),
            ),
            sequence: record.sequence.into(),
            tag: record.tag.into(),
            payload_len: record.payload_len.into(),
            payload_crc: record.payload_crc.into(),
        };
        // Capacity was reserved for exactly these bytes: no allocation here.
        message.extend_from_slice(header.as_bytes());
        message.extend_from_slice(payload);
        let packet = self
            .channel
            .channel()
            .allocate_packet()
            .ok_or(NtStatus::INSUFFICIENT_RESOURCES)?;
        packet.set_completion_routine();
        packet.set_token(token);
        packet
            .send(message, raw::VMBUS_CHANNEL_FORMAT_FLAG_WAIT_FOR_COMPLETION)
            .map_err(|(status, packet)| {
                packet.free();
                status
            })
    }

    /// Starts a save: freezes posts, pauses the channel, `VmbChannelSaveBegin`. Returns the
    /// channel record, which must be restored before the KMCL chunks. PASSIVE_LEVEL.
    pub fn save_begin(&self) -> Result<ChannelRecord> {
        let _guard = self.control()?;
        self.expect_phase(&[Phase::Running, Phase::Saved, Phase::SaveFailed])?;
        let vsp = self.vsp();
        vsp.table.with(|table| table.frozen = true);
        vsp.wait_for_posts();
        self.channel.pause();
        if let Err(status) = self.channel.save_begin() {
            self.resume_locked();
            return Err(status);
        }
        vsp.save_produced_last_chunk.store(false, Ordering::Release);
        let record = vsp.table.with(|table| {
            let in_flight = table.begin_save_epoch();
            ChannelRecord {
                next_sequence: table.next_sequence,
                protocol_version: table.protocol_version,
                max_in_flight: table.capacity(),
                max_message_len: self.config.max_message_len,
                in_flight,
                stats: table.stats,
            }
        });
        vsp.set_phase(Phase::Saving);
        Ok(record)
    }

    /// `VmbChannelSaveContinue` into the caller's buffer (see [`SaveChunk`]).
    ///
    /// After KMCL produced the last chunk (`STATUS_SUCCESS`) a further call is refused with
    /// `STATUS_INVALID_DEVICE_STATE` without reaching KMCL, which forbids it.
    pub fn save_continue(&self, buffer: &mut [u8]) -> Result<SaveChunk> {
        let _guard = self.control()?;
        self.expect_phase(&[Phase::Saving])?;
        let vsp = self.vsp();
        if vsp.save_produced_last_chunk.load(Ordering::Acquire) {
            return Err(NtStatus::INVALID_DEVICE_STATE);
        }
        let chunk = self.channel.save_continue(buffer);
        if chunk.status == NtStatus::SUCCESS {
            vsp.save_produced_last_chunk.store(true, Ordering::Release);
        }
        Ok(chunk)
    }

    /// `VmbChannelSaveEnd`, then checks that KMCL presented every outstanding delivery.
    pub fn save_end(&self) -> Result<()> {
        let _guard = self.control()?;
        self.expect_phase(&[Phase::Saving])?;
        self.channel.save_end();
        let vsp = self.vsp();
        let complete = vsp
            .table
            .with(|table| table.saved_in_epoch == table.in_flight());
        if complete {
            vsp.set_phase(Phase::Saved);
            Ok(())
        } else {
            // KMCL did not present every delivery exactly once: this save must never be used
            // for a migration (complete_migration refuses it).
            vsp.set_phase(Phase::SaveFailed);
            Err(NtStatus::INVALID_DEVICE_STATE)
        }
    }

    /// Resumes after a save that will not be used (aborted migration): delivery continues
    /// here, exactly once.
    pub fn resume(&self) -> Result<()> {
        let _guard = self.control()?;
        let phase = self.expect_phase(&[Phase::Saving, Phase::Saved, Phase::SaveFailed])?;
        if phase == Phase::Saving {
            self.channel.save_end();
        }
        self.resume_locked();
        Ok(())
    }

    /// `VmbChannelSaveEnd` for a save that is being abandoned (teardown in the middle of it).
    fn end_save_in_progress(&self) {
        if self.vsp().phase() == Phase::Saving {
            self.channel.save_end();
            self.vsp().set_phase(Phase::SaveFailed);
        }
    }

    fn resume_locked(&self) {
        let vsp = self.vsp();
        vsp.table.with(|table| table.frozen = false);
        self.channel.start();
        vsp.set_phase(Phase::Running);
    }

    /// Tears the saved channel down for a completed migration: in-flight deliveries come back
    /// cancelled and are recorded as [`OutcomeKind::Migrated`], not as failures.
    pub fn complete_migration(&self) -> Result<()> {
        let _guard = self.control()?;
        self.expect_phase(&[Phase::Saved])?;
        let vsp = self.vsp();
        vsp.table.with(|table| table.migrated = true);
        self.channel.disable();
        vsp.set_phase(Phase::Migrated);
        Ok(())
    }

    /// Restores the channel record (first step of a restore).
    pub fn restore_channel_record(&self, bytes: &[u8]) -> Result<()> {
        let _guard = self.control()?;
        self.expect_phase(&[Phase::Initialized])?;
        let record = ChannelRecord::decode(bytes).map_err(restore_status)?;
        let vsp = self.vsp();
        if record.max_in_flight > self.config.max_in_flight
            || record.max_message_len > self.config.max_message_len
            || record.in_flight > self.config.max_in_flight
        {
            // Valid, but this channel was created with smaller limits than the saved one.
            return Err(NtStatus::INVALID_PARAMETER);
        }
        if record.protocol_version != 0
            && !protocol::SUPPORTED_VERSIONS.contains(&record.protocol_version)
        {
            // Saved by a build that had negotiated a version this one does not speak.
            return Err(NtStatus::REVISION_MISMATCH);
        }
        vsp.table.with(|table| {
            table.next_sequence = record.next_sequence;
            table.protocol_version = record.protocol_version;
            table.stats = record.stats;
        });
        vsp.expected_restored
            .store(record.in_flight, Ordering::Release);
        vsp.keep_version_on_open
            .store(record.protocol_version != 0, Ordering::Release);
        vsp.set_phase(Phase::Restoring);
        Ok(())
    }

    /// Feeds one KMCL chunk, exactly as the save produced it.
    pub fn restore_chunk(&self, chunk: &[u8]) -> Result<RestoreProgress> {
        let _guard = self.control()?;
        self.expect_phase(&[Phase::Restoring])?;
        let vsp = self.vsp();
        let status = self.channel.restore_from_buffer(chunk);
        if status == NtStatus::MORE_PROCESSING_REQUIRED {
            return Ok(RestoreProgress::NeedMore);
        }
        if let Err(status) = status.ok() {
            vsp.set_phase(Phase::RestoreFailed);
            return Err(status);
        }
        if let Err(status) = self.verify_restored() {
            vsp.set_phase(Phase::RestoreFailed);
            return Err(status);
        }
        vsp.set_phase(Phase::Restored);
        Ok(RestoreProgress::Complete)
    }

    fn verify_restored(&self) -> Result<()> {
        let vsp = self.vsp();
        let expected = vsp.expected_restored.load(Ordering::Acquire);
        let (restored, in_flight) = vsp.table.with(|table| (table.restored, table.in_flight()));
        if restored != expected || in_flight != expected {
            return Err(NtStatus::DATA_ERROR);
        }
        let mut scratch = Vec::new();
        scratch
            .try_reserve_exact(in_flight as usize)
            .map_err(|_| NtStatus::INSUFFICIENT_RESOURCES)?;
        let duplicated = vsp
            .table
            .with(|table| table.has_duplicate_sequences(&mut scratch));
        if duplicated {
            Err(NtStatus::DATA_ERROR)
        } else {
            Ok(())
        }
    }

    /// Enables and starts a restored channel; restored deliveries continue.
    pub fn finish_restore(&self) -> Result<()> {
        let _guard = self.control()?;
        self.expect_phase(&[Phase::Restored])?;
        self.enable_and_start()
    }

    /// Restarts the incoming queue after a garbled packet stopped it (pause + start). PASSIVE.
    pub fn restart_incoming(&self) -> Result<()> {
        let _guard = self.control()?;
        self.expect_phase(&[Phase::Running])?;
        self.channel.pause();
        self.channel.start();
        Ok(())
    }

    /// Disables the channel: in-flight deliveries come back cancelled. The object stays
    /// usable for fetching outcomes and statistics. PASSIVE_LEVEL.
    pub fn disable(&self) -> Result<()> {
        let _guard = self.control()?;
        self.end_save_in_progress();
        self.channel.disable();
        if self.vsp().phase() != Phase::Migrated {
            self.vsp().set_phase(Phase::Disabled);
        }
        Ok(())
    }
}
