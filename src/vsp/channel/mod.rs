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
//!     Saving --> Saved: save_end (last chunk produced, every delivery written exactly once, nothing ended)
//!     Saving --> SaveFailed: save_end (anything else)
//!     SaveFailed --> Running: resume
//!     SaveFailed --> Saving: save_begin (retry)
//!     Saving --> Running: resume (aborted save)
//!     Saved --> Running: resume (aborted migration)
//!     Saved --> Saving: save_begin (retry)
//!     Saved --> SaveFailed: complete_migration refused (a delivery ended after the save began)
//!     Saved --> Migrated: complete_migration (teardown; in-flight = Migrated)
//!     Running --> Disabled: disable
//!     RestoreFailed --> Disabled: disable (restored packets come back Cancelled)
//!     Migrated --> [*]
//!     Disabled --> [*]
//! ```
//!
//! # Exactly once across a save
//! A save is usable for a migration only if it holds every delivery that was in flight when it
//! began, each written exactly once, and no delivery has ended on this channel since (an ended
//! delivery in the blob would be delivered again on the destination). The table's
//! [`SaveAccount`](super::table::SaveAccount) tracks exactly that from `save_begin` until `resume`
//! or `complete_migration`; `save_end` and `complete_migration` both demand it, and the save's
//! last chunk. Every record of one save carries the save's identity, so a channel record is only
//! restored with the chunks of its own save.
//!
//! # Waits
//! Nothing here waits inside a KMCL callback. The control side waits, at PASSIVE_LEVEL and for a
//! bounded number of [`DispatchLock::relax`] rounds, for posts to finish their send before it
//! pauses or disables the channel, and for the start callbacks after `resume`.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use zerocopy::IntoBytes;

use super::lock::DispatchLock;
use super::protocol::{self, Request, RequestError};
use super::save_protocol::{answer_save, restore_status, save_writes};
use super::table::{DeliveryTable, MAX_CAPACITY, Outcome, OutcomeKind, Token};
use crate::kmcl::raw::{self, GUID};
use crate::kmcl::{
    Channel, ChannelEvents, GuestBytes, IncomingPacket, NtStatus, OwnedChannel, Packet, PacketView,
    ParentDevice, Result, SaveChunk, SavePacketAnswer, ServerInterface, VmbusHandle,
};
use crate::saved::{
    ChannelRecord, ChannelStats, DeliveryRecord, MAX_PAYLOAD_LEN, SaveError, SaveIdentity, crc32c,
};

/// Rounds of [`DispatchLock::relax`] a control operation waits for posts to finish their send
/// (each send is non-blocking; in the driver a round is 50 µs, so this is one second).
const POST_WAIT_ROUNDS: u32 = 20_000;
/// Rounds `resume` waits for the channel to run again after `VmbChannelStart` (one second).
const START_WAIT_ROUNDS: u32 = 20_000;
/// Rounds `disable` waits for KMCL to hand back packets after `VmbChannelDisable` (0.1 s).
const RETURN_WAIT_ROUNDS: u32 = 2_048;

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
    /// Restores this channel's lineage went through (0: never restored).
    pub restore_generation: u32,
    /// The identity of the save this channel was restored from (0: not restored). One saved
    /// blob must be restored at most once; two channels reporting the same value were restored
    /// from the same blob (docs/control.md, "Restore at most once").
    pub restored_save_id: u64,
}

/// The channel record a save begins with, and the save's identity (written with it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaveRecord {
    /// The channel state.
    pub record: ChannelRecord,
    /// Which save this is.
    pub identity: SaveIdentity,
}

impl core::ops::Deref for SaveRecord {
    type Target = ChannelRecord;
    fn deref(&self) -> &ChannelRecord {
        &self.record
    }
}

impl SaveRecord {
    /// Exact size of [`encode`](Self::encode)'s output.
    pub const fn encoded_len(&self) -> usize {
        self.record.encoded_len_saved(Some(self.identity))
    }

    /// Encodes the record with its save identity (docs/saved-state.md §5).
    pub fn encode(&self, buf: &mut [u8]) -> core::result::Result<usize, SaveError> {
        self.record.encode_saved(Some(self.identity), buf)
    }
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
    /// Between `EvtChannelOpened` and `EvtChannelClosed`: a start will run the channel.
    guest_open: AtomicBool,
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

    /// Freezes posting and waits until no post is between reservation and the end of its send.
    ///
    /// Control side only (PASSIVE_LEVEL, never in a KMCL callback). After `frozen` is set no new
    /// post can start; a post in progress finishes without blocking (`VmbPacketSend` does not
    /// wait for the ring), so the bounded wait ends quickly unless KMCL's send hangs, which is
    /// reported as `STATUS_IO_TIMEOUT` (posting stays frozen).
    fn freeze_posts(&self) -> Result<()> {
        self.table.with(|table| table.frozen = true);
        for _ in 0..POST_WAIT_ROUNDS {
            if self.table.with(|table| table.posts_in_progress) == 0 {
                return Ok(());
            }
            L::relax();
        }
        Err(NtStatus::IO_TIMEOUT)
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
            restore_generation: table.restore_generation,
            restored_save_id: table.restored_save_id,
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

/// A vmbsrv channel, owned by the control interface.
pub struct VspChannel<'a, L: DispatchLock<DeliveryTable>> {
    channel: OwnedChannel<'a, Vsp<L>>,
    config: ChannelConfig,
    /// Serializes control operations (save, restore, resume, disable); posts do not take it.
    busy: AtomicBool,
    /// The channel was enabled (not started) so that the library would take a restore.
    enabled_for_restore: AtomicBool,
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
    /// Creates, configures, enables and starts a channel (docs/kmcl-bindings.md §R5 order).
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
            guest_open: AtomicBool::new(false),
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
            enabled_for_restore: AtomicBool::new(false),
        })
    }

    fn enable_and_start(&self) -> Result<()> {
        if !self.enabled_for_restore.load(Ordering::Acquire) {
            self.channel.enable()?;
        }
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

    /// Checks the delivery table's invariants with a full scan (see [`DeliveryTable`]): for tests
    /// and fuzzers, which call it after every step; never on a driver path.
    pub fn check_invariants(&self) -> core::result::Result<(), &'static str> {
        self.vsp().table.with(|table| table.check_invariants())
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

    /// Disables the channel: in-flight deliveries come back cancelled. The object stays
    /// usable for fetching outcomes and statistics. PASSIVE_LEVEL.
    pub fn disable(&self) -> Result<()> {
        let _guard = self.control()?;
        let phase = self.vsp().phase();
        let restored_never_ran = matches!(
            phase,
            Phase::Restoring | Phase::RestoreFailed | Phase::Restored
        );
        self.vsp().table.with(|table| {
            // Deliveries a blob still carries end where the blob is restored, not here: those of
            // a restore that failed or was never started (the blob may be replayed), and those
            // of a complete save that was never resumed (the blob is their only copy now). They
            // come back `Migrated`, never `Cancelled`, so a client never re-posts what the blob
            // will deliver (docs/control.md, "Restore at most once").
            if restored_never_ran || (phase == Phase::Saved && table.save.is_complete()) {
                table.migrated = true;
            }
        });
        self.end_save_in_progress();
        // Best effort: a send still under way after the bounded wait meets a disabled channel,
        // which refuses it (the post reports the failure and frees its slot).
        let _ = self.vsp().freeze_posts();
        self.vsp().table.with(|table| table.close_save());
        self.channel.disable();
        // On a channel that never ran (restored into, or enabled for a restore and never
        // started) Disable may return before handing the restored packets back, or never hand
        // them back (undocumented; docs/kmcl-bindings.md). Wait a bounded time, then settle what
        // is left (as handed over, above): the guest never saw those packets here. The packets
        // themselves stay counted until KMCL returns them, so teardown never frees what KMCL can
        // reach.
        // Only such a channel: on one that ran, Disable hands every packet back, and a slot
        // still occupied there can belong to a post whose send is under way — settling it here
        // would end a delivery the failing post also reports.
        if restored_never_ran {
            let vsp = self.vsp();
            let mut rounds = 0;
            while vsp.table.with(|table| table.in_flight()) != 0 && rounds < RETURN_WAIT_ROUNDS {
                L::relax();
                rounds += 1;
            }
            vsp.table.with(|table| table.abandon_unreturned());
        }
        if self.vsp().phase() != Phase::Migrated {
            self.vsp().set_phase(Phase::Disabled);
        }
        Ok(())
    }
}

mod events;
mod migration;
