//! The delivery table: every outstanding host→guest delivery, in storage allocated once per channel.
//!
//! A delivery occupies a slot from the moment a post reserves it until its completion routine
//! (or a failed send) releases it. The packet object's context pointer holds the slot's
//! [`Token`] — slot index plus a generation — so a completion can find its delivery without any
//! pointer being dereferenced, and a stale or forged token finds nothing.
//!
//! # Invariants
//! * `slots.len() == free.capacity() == outcomes.capacity() == capacity`, all reserved at
//!   creation: no operation here allocates.
//! * A slot index is either on the `free` stack or its slot holds `Some(delivery)`, never both;
//!   `in_flight` counts the latter.
//! * `in_flight + outcomes.len() <= capacity`: a post is refused before it could produce an
//!   outcome with no room to record it, so outcomes are never dropped.
//! * `next_sequence` only grows; no sequence number is handed out twice, including across a
//!   restore (the channel record carries it).
//! * No two deliveries in flight share a sequence number: every slot that is occupied is in the
//!   [`SequenceIndex`], and inserting into a slot refuses a sequence already there. With
//!   the two invariants above (posts take fresh numbers, restores only fill a fresh table) no
//!   sequence ends twice on a channel, on any path. [`DeliveryTable::check_invariants`] checks
//!   all of this (tests and fuzzers call it).
//! * Save accounting counts *writes*: a delivery is saved in an epoch when the save callback
//!   wrote its record into a buffer KMCL provided, not when it answered the size probe.

use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::num::NonZeroUsize;

use super::sequence_index::{IndexError, SequenceIndex, mix};
use crate::fallible::AllocError;
use crate::kmcl::NtStatus;
use crate::saved::{ChannelStats, DeliveryRecord, SaveIdentity};

/// Bits of a token that hold `slot index + 1` (the rest is the slot's generation).
const INDEX_BITS: u32 = 17;
const INDEX_MASK: usize = (1 << INDEX_BITS) - 1;

/// The largest table (the saved format's `MAX_IN_FLIGHT_LIMIT`); fits in `INDEX_BITS`.
pub const MAX_CAPACITY: u32 = crate::saved::MAX_IN_FLIGHT_LIMIT;
const _: () = assert!((MAX_CAPACITY as usize) < INDEX_MASK);

/// The value stored as a packet object's context pointer.
pub type Token = NonZeroUsize;

/// How one delivery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutcomeKind {
    /// The guest acknowledged the message with success and the payload checksum it saw matched.
    Acked,
    /// The guest acknowledged the message with its own error code.
    Nacked {
        /// The guest's status.
        guest_status: u32,
    },
    /// The guest acknowledged a payload whose checksum differs from what was posted.
    Corrupted,
    /// The completion payload was not a well-formed acknowledgement of this delivery.
    BadAck,
    /// The transaction was cancelled (guest closed the channel, or the channel was torn down).
    Cancelled,
    /// The channel was torn down after a migration save: the delivery continues on the
    /// destination, where its outcome will be recorded.
    Migrated,
}

/// The recorded end of one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The delivery's sequence number.
    pub sequence: u64,
    /// The posting client's tag.
    pub tag: u64,
    /// How it ended.
    pub kind: OutcomeKind,
    /// 1 for a delivery that never crossed a save/restore, +1 per restore.
    pub attempts: u16,
}

#[derive(Clone)]
struct Slot {
    generation: usize,
    delivery: Option<DeliveryRecord>,
    /// The save epoch in which this slot's record was last written into a save buffer.
    saved_epoch: u32,
}

/// What one save saw, from `begin_save` until it is ended by `resume` or a completed migration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SaveAccount {
    /// A save is open: anything that ends a delivery now makes the save stale.
    pub open: bool,
    /// Deliveries in flight when the save began: each must be written exactly once.
    pub expected: u32,
    /// Distinct deliveries whose record the save callback wrote.
    pub written: u32,
    /// The save callback wrote one delivery twice.
    pub written_twice: bool,
    /// The save callback was shown a packet that is no delivery of this table.
    pub unknown_packet: bool,
    /// A delivery ended (completed or cancelled) after the save began: the blob holds a
    /// delivery this channel already finished.
    pub ended_during_save: bool,
}

impl SaveAccount {
    /// Whether the save holds every delivery in flight exactly once and nothing has ended since.
    pub fn is_complete(&self) -> bool {
        self.open
            && self.written == self.expected
            && !self.written_twice
            && !self.unknown_packet
            && !self.ended_during_save
    }
}

/// The channel's delivery state. It lives behind a [`super::lock::DispatchLock`].
pub struct DeliveryTable {
    slots: Vec<Slot>,
    /// Sequence numbers in flight (see the module invariants).
    index: SequenceIndex,
    free: Vec<u32>,
    outcomes: VecDeque<Outcome>,
    in_flight: u32,
    /// Posts between reservation and the end of their send.
    pub(super) posts_in_progress: u32,
    /// The next sequence number to hand out (≥ 1).
    pub(super) next_sequence: u64,
    /// Counters, persisted in the channel record.
    pub(super) stats: ChannelStats,
    /// Outcomes that were classified as corrupted (per channel instance, not persisted).
    pub(super) corrupted: u64,
    /// The negotiated protocol version, 0 before negotiation.
    pub(super) protocol_version: u32,
    /// Between `EvtChannelPostStarted` and `EvtChannelSuspend`: the channel may send.
    pub(super) running: bool,
    /// No new post may start (save in progress or done, teardown).
    pub(super) frozen: bool,
    /// Cancellations are recorded as [`OutcomeKind::Migrated`].
    pub(super) migrated: bool,
    /// The current save epoch (0: never saved) and what it saw.
    save_epoch: u32,
    pub(super) save: SaveAccount,
    /// Deliveries rebuilt by the restore callback.
    pub(super) restored: u32,
    /// The identity of the open save (written into every delivery record it saves).
    pub(super) save_identity: Option<SaveIdentity>,
    /// The last save identity of this channel's lineage (restored from the channel record):
    /// the next save's identity is derived from it, so ids never repeat along a lineage.
    last_save_id: u64,
    /// Restores this channel's lineage went through (1 for a channel restored once).
    pub(super) restore_generation: u32,
    /// The save this channel was restored from (0: not restored, or from a record without one).
    pub(super) restored_save_id: u64,
    /// While restoring: the save identity every delivery record must carry (`None`: the channel
    /// record carried none, so no delivery record may carry one either).
    pub(super) restore_binding: Option<u64>,
    /// While restoring: the largest payload the saved channel allowed.
    pub(super) restore_max_message_len: u32,
    /// Packets KMCL still owns whose deliveries were settled without them
    /// ([`abandon_unreturned`](Self::abandon_unreturned)); a completion that finds no delivery
    /// accounts for one of them.
    unreturned: u32,
}

/// Storage taken out of a [`DeliveryTable`] by [`DeliveryTable::take_storage`], to be dropped
/// outside the table's lock.
pub struct TableStorage {
    _slots: Vec<Slot>,
    _free: Vec<u32>,
    _outcomes: VecDeque<Outcome>,
    _index: Vec<u32>,
}

/// Why a post could not reserve a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReserveError {
    /// Not negotiated, not running, or frozen for a save.
    NotReady,
    /// `in_flight + unfetched outcomes` reached the configured capacity.
    Full,
    /// The sequence space is exhausted (after 2^64 - 1 posts).
    SequenceExhausted,
}

/// Why a restored delivery was not inserted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertError {
    /// The record contradicts the channel record or another restored delivery (a sequence that
    /// was never handed out, one already restored, more deliveries than the record announced).
    Forged,
    /// No room (the channel was created with a smaller capacity than the blob needs).
    NoRoom,
}

impl InsertError {
    /// The status the restore callback reports.
    pub const fn status(self) -> NtStatus {
        match self {
            Self::Forged => NtStatus::DATA_ERROR,
            Self::NoRoom => NtStatus::INSUFFICIENT_RESOURCES,
        }
    }
}

impl ReserveError {
    /// The status a refused post reports.
    pub const fn status(self) -> NtStatus {
        match self {
            Self::NotReady => NtStatus::INVALID_DEVICE_STATE,
            Self::Full => NtStatus::QUOTA_EXCEEDED,
            Self::SequenceExhausted => NtStatus::INTEGER_OVERFLOW,
        }
    }
}

impl DeliveryTable {
    /// Allocates a table for `capacity` deliveries (1..=[`MAX_CAPACITY`]).
    pub fn try_new(capacity: u32) -> Result<Self, AllocError> {
        let slots = crate::fallible::try_vec_filled(
            capacity as usize,
            Slot {
                generation: 0,
                delivery: None,
                saved_epoch: 0,
            },
        )?;
        let mut free = Vec::new();
        free.try_reserve_exact(capacity as usize)
            .map_err(|_| AllocError)?;
        // Pop order hands out low indexes first, which keeps tokens small and tests readable.
        free.extend((0..capacity).rev());
        let mut outcomes = VecDeque::new();
        outcomes
            .try_reserve_exact(capacity as usize)
            .map_err(|_| AllocError)?;
        let index = SequenceIndex::try_new(capacity)?;
        Ok(Self {
            slots,
            index,
            free,
            outcomes,
            in_flight: 0,
            posts_in_progress: 0,
            next_sequence: 1,
            stats: ChannelStats::default(),
            corrupted: 0,
            protocol_version: 0,
            running: false,
            frozen: false,
            migrated: false,
            save_epoch: 0,
            save: SaveAccount::default(),
            restored: 0,
            save_identity: None,
            last_save_id: 0,
            restore_generation: 0,
            restored_save_id: 0,
            restore_binding: None,
            restore_max_message_len: 0,
            unreturned: 0,
        })
    }

    /// Benchmark support (`benches/save_restore.rs`), not for the driver: a table as a
    /// negotiated, running channel has it, ready for posts ([`reserve`](Self::reserve)) and a
    /// save ([`begin_save`](Self::begin_save)), so the save callback's table work can be timed
    /// without a simulator.
    #[doc(hidden)]
    pub fn bench_running(capacity: u32) -> Result<Self, AllocError> {
        let mut table = Self::try_new(capacity)?;
        table.protocol_version = 1;
        table.running = true;
        Ok(table)
    }

    /// Benchmark support (`benches/save_restore.rs`), not for the driver: a fresh table as the
    /// restore of a channel record with `next_sequence`, `max_message_len` and save identity
    /// `save_id` leaves it, so the restore callback's table work
    /// ([`accept_restored`](Self::accept_restored)) can be timed without a simulator.
    #[doc(hidden)]
    pub fn bench_restoring(
        capacity: u32,
        next_sequence: u64,
        max_message_len: u32,
        save_id: Option<u64>,
    ) -> Result<Self, AllocError> {
        let mut table = Self::try_new(capacity)?;
        table.next_sequence = next_sequence;
        table.restore_max_message_len = max_message_len;
        table.adopt_saved_identity(save_id.map(|save_id| SaveIdentity {
            save_id,
            restore_generation: 0,
        }));
        Ok(table)
    }

    /// How many deliveries the table holds at most.
    pub fn capacity(&self) -> u32 {
        // INVARIANT: `slots.len()` was created from a u32.
        self.slots.len() as u32
    }

    /// Deliveries currently outstanding.
    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// Outcomes recorded and not yet fetched.
    pub fn pending_outcomes(&self) -> usize {
        self.outcomes.len()
    }

    /// Whether a post may start now.
    pub fn accepting(&self) -> bool {
        self.running && !self.frozen && self.protocol_version != 0
    }

    fn has_room(&self) -> bool {
        (self.in_flight as usize).saturating_add(self.outcomes.len()) < self.slots.len()
    }

    fn token(index: u32, generation: usize) -> Token {
        let raw = (generation << INDEX_BITS) | (index as usize + 1);
        // `index + 1` is never 0, so neither is `raw`.
        NonZeroUsize::new(raw).unwrap_or(NonZeroUsize::MIN)
    }

    fn sequence_in(slots: &[Slot], index: u32) -> Option<u64> {
        slots
            .get(index as usize)
            .and_then(|slot| slot.delivery.as_ref())
            .map(|delivery| delivery.sequence)
    }

    /// Puts `record` in a free slot; refuses a sequence already in flight.
    fn occupy(&mut self, record: DeliveryRecord) -> Result<Token, IndexError> {
        let Some(&index) = self.free.last() else {
            return Err(IndexError::Crowded);
        };
        let slots = &self.slots;
        self.index
            .insert(record.sequence, index, |i| Self::sequence_in(slots, i))?;
        self.free.pop();
        let Some(slot) = self.slots.get_mut(index as usize) else {
            return Err(IndexError::Crowded);
        };
        slot.generation = slot.generation.wrapping_add(1) & (usize::MAX >> INDEX_BITS);
        slot.delivery = Some(record);
        slot.saved_epoch = 0;
        self.in_flight += 1;
        Ok(Self::token(index, slot.generation))
    }

    fn slot_for(&mut self, token: Token) -> Option<&mut Slot> {
        let index = (token.get() & INDEX_MASK).checked_sub(1)?;
        let generation = token.get() >> INDEX_BITS;
        let slot = self.slots.get_mut(index)?;
        (slot.generation == generation && slot.delivery.is_some()).then_some(slot)
    }

    /// Reserves a slot and a sequence number for a new post.
    pub fn reserve(
        &mut self,
        tag: u64,
        posted_at: u64,
        payload_len: u32,
        payload_crc: u32,
        trace_id: Option<[u8; 16]>,
    ) -> Result<(Token, DeliveryRecord), ReserveError> {
        if !self.accepting() {
            return Err(ReserveError::NotReady);
        }
        if !self.has_room() {
            return Err(ReserveError::Full);
        }
        let sequence = self.next_sequence;
        let next = sequence
            .checked_add(1)
            .ok_or(ReserveError::SequenceExhausted)?;
        let record = DeliveryRecord {
            sequence,
            tag,
            posted_at,
            payload_len,
            payload_crc,
            attempts: 1,
            trace_id,
        };
        // A fresh sequence is above every one in flight, so only a full index can refuse it.
        let token = self.occupy(record).map_err(|_| ReserveError::Full)?;
        self.next_sequence = next;
        self.posts_in_progress = self.posts_in_progress.saturating_add(1);
        self.stats.posted = self.stats.posted.saturating_add(1);
        Ok((token, record))
    }

    /// Ends a post's send phase; a failed send gives the slot back (the sequence stays used).
    pub fn finish_post(&mut self, token: Token, sent: bool) {
        self.posts_in_progress = self.posts_in_progress.saturating_sub(1);
        if !sent {
            self.release(token);
            self.stats.posted = self.stats.posted.saturating_sub(1);
        }
    }

    fn release(&mut self, token: Token) -> Option<DeliveryRecord> {
        let index = (token.get() & INDEX_MASK).checked_sub(1)?;
        let sequence = self.slot_for(token)?.delivery.as_ref()?.sequence;
        let slots = &self.slots;
        self.index
            .remove(sequence, index as u32, |i| Self::sequence_in(slots, i));
        let delivery = self.slot_for(token)?.delivery.take()?;
        // INVARIANT: the index was occupied, so it is not on the free stack; the stack has
        // capacity for every index.
        self.free.push(index as u32);
        self.in_flight -= 1;
        Some(delivery)
    }

    /// The delivery behind `token`, if it is outstanding.
    pub fn delivery(&mut self, token: Token) -> Option<DeliveryRecord> {
        self.slot_for(token).and_then(|slot| slot.delivery)
    }

    /// The delivery behind `token` for the save callback. A token that finds nothing marks the
    /// open save as unusable: KMCL is saving a packet this table cannot account for.
    pub fn delivery_for_save(&mut self, token: Option<Token>) -> Option<DeliveryRecord> {
        let delivery = token.and_then(|token| self.delivery(token));
        if delivery.is_none() && self.save.open {
            self.save.unknown_packet = true;
        }
        delivery
    }

    /// What the save callback needs under the lock, per call: the delivery behind `token` (see
    /// [`delivery_for_save`](Self::delivery_for_save)) and the open save's identity, which goes
    /// into the record.
    pub fn save_lookup(&mut self, token: Option<Token>) -> (Option<DeliveryRecord>, Option<u64>) {
        let delivery = self.delivery_for_save(token);
        (
            delivery,
            self.save_identity.map(|identity| identity.save_id),
        )
    }

    /// Records that the save callback wrote `token`'s record into KMCL's buffer (a probe is no
    /// write). A second write of one delivery in one save fails the save.
    pub fn record_save_write(&mut self, token: Token) {
        if !self.save.open {
            return;
        }
        let epoch = self.save_epoch;
        let Some(slot) = self.slot_for(token) else {
            self.save.unknown_packet = true;
            return;
        };
        if slot.saved_epoch == epoch {
            self.save.written_twice = true;
        } else {
            slot.saved_epoch = epoch;
            self.save.written = self.save.written.saturating_add(1);
        }
    }

    /// Opens a new save epoch with a fresh identity; returns the number of deliveries it must
    /// write.
    ///
    /// The identity chains from the lineage's previous one and mixes in this table's key and
    /// state, so two saves of one lineage never share it, and saves of different channels
    /// collide only by chance (2^-64).
    pub fn begin_save(&mut self) -> u32 {
        self.save_epoch = self.save_epoch.wrapping_add(1).max(1);
        let save_id = mix(self.last_save_id
            ^ mix(self.index.key() ^ u64::from(self.save_epoch))
            ^ mix(self.next_sequence.rotate_left(21) ^ self.stats.posted))
        .max(1);
        self.last_save_id = save_id;
        self.save_identity = Some(SaveIdentity {
            save_id,
            restore_generation: self.restore_generation,
        });
        self.save = SaveAccount {
            open: true,
            expected: self.in_flight,
            ..SaveAccount::default()
        };
        self.in_flight
    }

    /// Closes the save window (the channel resumes, or was torn down for the migration).
    pub fn close_save(&mut self) {
        self.save.open = false;
    }

    /// Takes over the lineage of a restored channel record.
    pub fn adopt_saved_identity(&mut self, identity: Option<SaveIdentity>) {
        self.restore_binding = identity.map(|identity| identity.save_id);
        self.restored_save_id = identity.map_or(0, |identity| identity.save_id);
        self.last_save_id = identity.map_or(0, |identity| identity.save_id);
        self.restore_generation = identity
            .map_or(0, |identity| identity.restore_generation)
            .saturating_add(1);
    }

    /// Ends a delivery: releases its slot and records the outcome.
    pub fn complete(
        &mut self,
        token: Token,
        classify: impl FnOnce(&DeliveryRecord) -> OutcomeKind,
    ) -> Option<Outcome> {
        let delivery = self.release(token)?;
        if self.save.open {
            self.save.ended_during_save = true;
        }
        let mut kind = classify(&delivery);
        if self.migrated {
            // The saved blob carries this delivery; its outcome belongs to the destination, which
            // delivers it again (a guest recognises a redelivery by its sequence number,
            // docs/protocol.md). This includes an acknowledgement that raced the teardown.
            kind = OutcomeKind::Migrated;
        }
        match kind {
            OutcomeKind::Acked => self.stats.acked = self.stats.acked.saturating_add(1),
            OutcomeKind::Nacked { .. } => self.stats.nacked = self.stats.nacked.saturating_add(1),
            OutcomeKind::Corrupted => {
                self.corrupted = self.corrupted.saturating_add(1);
                self.stats.bad_acks = self.stats.bad_acks.saturating_add(1);
            }
            OutcomeKind::BadAck => self.stats.bad_acks = self.stats.bad_acks.saturating_add(1),
            OutcomeKind::Cancelled => self.stats.cancelled = self.stats.cancelled.saturating_add(1),
            // Counted where the delivery ends, on the destination.
            OutcomeKind::Migrated => {}
        }
        let outcome = Outcome {
            sequence: delivery.sequence,
            tag: delivery.tag,
            kind,
            attempts: delivery.attempts,
        };
        // INVARIANT: `in_flight + outcomes.len() <= capacity` held before the release, so there
        // is room; `push_back` within reserved capacity does not allocate.
        if self.outcomes.len() < self.outcomes.capacity() {
            self.outcomes.push_back(outcome);
        }
        Some(outcome)
    }

    /// Takes up to `out.len()` recorded outcomes, oldest first; returns how many.
    pub fn drain_outcomes(&mut self, out: &mut [Outcome]) -> usize {
        let mut count = 0;
        for place in out.iter_mut() {
            let Some(outcome) = self.outcomes.pop_front() else {
                break;
            };
            *place = outcome;
            count += 1;
        }
        count
    }

    /// The restore callback's work under the lock for one decoded record: it must carry the save
    /// identity the channel record carried (none if that carried none), its payload must fit the
    /// saved channel's and `max_message_len` (this channel's) limit, then it is
    /// [inserted](Self::insert_restored). `Err` is the status the callback returns.
    pub fn accept_restored(
        &mut self,
        record: DeliveryRecord,
        save_id: Option<u64>,
        max_message_len: u32,
        expected: u32,
    ) -> Result<Token, NtStatus> {
        if save_id != self.restore_binding {
            // Another save's delivery (or a record stripped of, or given, an identity).
            return Err(NtStatus::DATA_ERROR);
        }
        if record.payload_len > self.restore_max_message_len.min(max_message_len) {
            // Larger than the saved channel (or this one) ever allowed.
            return Err(NtStatus::DATA_ERROR);
        }
        self.insert_restored(record, expected)
            .map_err(|error| error.status())
    }

    /// Inserts a delivery rebuilt from a saved record; its `attempts` grows by one.
    ///
    /// `expected` is how many deliveries the channel record announced: one more is forged.
    pub fn insert_restored(
        &mut self,
        mut record: DeliveryRecord,
        expected: u32,
    ) -> Result<Token, InsertError> {
        if record.sequence == 0 || record.sequence >= self.next_sequence {
            // The channel record says this sequence was never handed out.
            return Err(InsertError::Forged);
        }
        if self.restored >= expected {
            return Err(InsertError::Forged);
        }
        if !self.has_room() {
            return Err(InsertError::NoRoom);
        }
        record.attempts = record.attempts.saturating_add(1);
        let token = self.occupy(record).map_err(|error| match error {
            IndexError::Duplicate => InsertError::Forged,
            IndexError::Crowded => InsertError::NoRoom,
        })?;
        self.restored = self.restored.saturating_add(1);
        Ok(token)
    }

    /// Settles every delivery still in flight as [`OutcomeKind::Cancelled`] after a
    /// `VmbChannelDisable` that did not hand their packets back (a channel that never ran: a
    /// restore that failed or was never finished; whether and when the library returns such
    /// packets is undocumented). Their tokens go stale, so a completion that still arrives finds
    /// nothing and only [accounts](Self::completion_without_delivery) for its packet. Returns how
    /// many were settled.
    pub fn abandon_unreturned(&mut self) -> u32 {
        let mut settled = 0;
        for index in 0..self.slots.len() {
            let Some(slot) = self.slots.get(index) else {
                break;
            };
            if slot.delivery.is_none() {
                continue;
            }
            let token = Self::token(index as u32, slot.generation);
            if self.complete(token, |_| OutcomeKind::Cancelled).is_some() {
                settled += 1;
            }
        }
        self.restored = self.restored.saturating_sub(settled);
        self.unreturned = self.unreturned.saturating_add(settled);
        settled
    }

    /// A completion whose token found no delivery: one of the
    /// [abandoned](Self::abandon_unreturned) packets came back after all.
    pub fn completion_without_delivery(&mut self) {
        self.unreturned = self.unreturned.saturating_sub(1);
    }

    /// Gives up the table's storage for good (the channel is being kept only because KMCL may
    /// still complete packets): every delivery still in flight becomes an unreturned packet, and
    /// the slots, index and outcomes are handed to the caller to free outside the lock. Afterwards
    /// every token finds nothing, so a late completion only accounts for its packet.
    pub fn take_storage(&mut self) -> TableStorage {
        self.unreturned = self.unreturned.saturating_add(self.in_flight);
        self.in_flight = 0;
        self.restored = 0;
        TableStorage {
            _slots: core::mem::take(&mut self.slots),
            _free: core::mem::take(&mut self.free),
            _outcomes: core::mem::take(&mut self.outcomes),
            _index: self.index.take_storage(),
        }
    }

    /// Packets KMCL may still hand back: deliveries in flight plus abandoned packets not yet seen.
    pub fn packets_kmcl_owns(&self) -> u32 {
        self.in_flight.saturating_add(self.unreturned)
    }

    /// Undoes [`insert_restored`](Self::insert_restored) when the packet could not be restored.
    pub fn remove_restored(&mut self, token: Token) {
        if self.release(token).is_some() {
            self.restored = self.restored.saturating_sub(1);
        }
    }

    /// Checks the module invariants with a full scan; `Err` names the first one broken.
    ///
    /// For tests and fuzzers: it walks every slot, so it is not for the driver's hot paths.
    pub fn check_invariants(&self) -> Result<(), &'static str> {
        let occupied = self.slots.iter().filter(|s| s.delivery.is_some()).count();
        if occupied != self.in_flight as usize {
            return Err("in_flight counts the occupied slots");
        }
        if occupied + self.free.len() != self.slots.len() {
            return Err("every slot is either free or occupied");
        }
        if self.index.len() != occupied {
            return Err("the sequence index holds exactly the deliveries in flight");
        }
        for (position, slot) in self.slots.iter().enumerate() {
            let Some(delivery) = &slot.delivery else {
                continue;
            };
            let found = self
                .index
                .find(delivery.sequence, |i| Self::sequence_in(&self.slots, i));
            if found != u32::try_from(position).ok() {
                return Err("no two deliveries in flight share a sequence");
            }
            if delivery.sequence == 0 || delivery.sequence >= self.next_sequence {
                return Err("every sequence in flight was handed out");
            }
        }
        if (self.in_flight as usize).saturating_add(self.outcomes.len()) > self.slots.len() {
            return Err("in_flight + outcomes <= capacity");
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "table_tests.rs"]
mod tests;
