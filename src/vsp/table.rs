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

use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::num::NonZeroUsize;

use crate::fallible::AllocError;
use crate::kmcl::NtStatus;
use crate::saved::{ChannelStats, DeliveryRecord};

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

/// The channel's delivery state. It lives behind a [`super::lock::DispatchLock`].
pub struct DeliveryTable {
    slots: Vec<Slot>,
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
    /// The current save epoch and how many distinct records it has written.
    pub(super) save_epoch: u32,
    pub(super) saved_in_epoch: u32,
    /// Deliveries rebuilt by the restore callback.
    pub(super) restored: u32,
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
        Ok(Self {
            slots,
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
            saved_in_epoch: 0,
            restored: 0,
        })
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

    fn occupy(&mut self, record: DeliveryRecord) -> Option<Token> {
        let index = self.free.pop()?;
        let slot = self.slots.get_mut(index as usize)?;
        slot.generation = slot.generation.wrapping_add(1) & (usize::MAX >> INDEX_BITS);
        slot.delivery = Some(record);
        slot.saved_epoch = 0;
        self.in_flight += 1;
        Some(Self::token(index, slot.generation))
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
        let token = self.occupy(record).ok_or(ReserveError::Full)?;
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

    /// The delivery behind `token` for the save callback; counts it once per save epoch.
    pub fn delivery_for_save(&mut self, token: Token) -> Option<DeliveryRecord> {
        let epoch = self.save_epoch;
        let slot = self.slot_for(token)?;
        let delivery = slot.delivery?;
        let first_time = slot.saved_epoch != epoch;
        slot.saved_epoch = epoch;
        if first_time {
            self.saved_in_epoch += 1;
        }
        Some(delivery)
    }

    /// Starts a new save epoch; returns the number of deliveries it must save.
    pub fn begin_save_epoch(&mut self) -> u32 {
        self.save_epoch = self.save_epoch.wrapping_add(1).max(1);
        self.saved_in_epoch = 0;
        self.in_flight
    }

    /// Ends a delivery: releases its slot and records the outcome.
    pub fn complete(
        &mut self,
        token: Token,
        classify: impl FnOnce(&DeliveryRecord) -> OutcomeKind,
    ) -> Option<Outcome> {
        let delivery = self.release(token)?;
        let mut kind = classify(&delivery);
        if kind == OutcomeKind::Cancelled && self.migrated {
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

    /// Inserts a delivery rebuilt from a saved record; its `attempts` grows by one.
    pub fn insert_restored(&mut self, mut record: DeliveryRecord) -> Result<Token, NtStatus> {
        if record.sequence == 0 || record.sequence >= self.next_sequence {
            // The channel record says this sequence was never handed out.
            return Err(NtStatus::DATA_ERROR);
        }
        if !self.has_room() {
            return Err(NtStatus::INSUFFICIENT_RESOURCES);
        }
        record.attempts = record.attempts.saturating_add(1);
        let token = self
            .occupy(record)
            .ok_or(NtStatus::INSUFFICIENT_RESOURCES)?;
        self.restored = self.restored.saturating_add(1);
        Ok(token)
    }

    /// Undoes [`insert_restored`](Self::insert_restored) when the packet could not be restored.
    pub fn remove_restored(&mut self, token: Token) {
        if self.release(token).is_some() {
            self.restored = self.restored.saturating_sub(1);
        }
    }

    /// Whether two outstanding deliveries share a sequence number (a tampered blob).
    ///
    /// `scratch` must have room for `in_flight` entries; it is reused to sort them.
    pub fn has_duplicate_sequences(&self, scratch: &mut Vec<u64>) -> bool {
        scratch.clear();
        for slot in &self.slots {
            if let Some(delivery) = &slot.delivery {
                if scratch.len() == scratch.capacity() {
                    // Cannot happen (capacity == slots); refuse rather than allocate.
                    return true;
                }
                scratch.push(delivery.sequence);
            }
        }
        scratch.sort_unstable();
        scratch.windows(2).any(|pair| pair[0] == pair[1])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(capacity: u32) -> DeliveryTable {
        let mut table = DeliveryTable::try_new(capacity).unwrap();
        table.running = true;
        table.protocol_version = 1;
        table
    }

    #[test]
    fn reserve_complete_and_outcome_bound() {
        let mut table = ready(2);
        let (a, ra) = table.reserve(7, 0, 1, 0, None).unwrap();
        table.finish_post(a, true);
        let (b, rb) = table.reserve(8, 0, 1, 0, None).unwrap();
        table.finish_post(b, true);
        assert_eq!((ra.sequence, rb.sequence), (1, 2));
        assert_eq!(
            table.reserve(9, 0, 1, 0, None).unwrap_err(),
            ReserveError::Full
        );
        table.complete(a, |_| OutcomeKind::Acked).unwrap();
        // The outcome still occupies room until it is fetched.
        assert_eq!(
            table.reserve(9, 0, 1, 0, None).unwrap_err(),
            ReserveError::Full
        );
        let mut out = [Outcome {
            sequence: 0,
            tag: 0,
            kind: OutcomeKind::Acked,
            attempts: 0,
        }; 4];
        assert_eq!(table.drain_outcomes(&mut out), 1);
        assert_eq!(out[0].sequence, 1);
        let (c, rc) = table.reserve(9, 0, 1, 0, None).unwrap();
        assert_eq!(rc.sequence, 3);
        // A stale token finds nothing, even though slot 0 is reused.
        assert!(table.complete(a, |_| OutcomeKind::Acked).is_none());
        assert!(table.delivery(c).is_some());
    }

    #[test]
    fn failed_send_releases_but_never_reuses_the_sequence() {
        let mut table = ready(1);
        let (a, _) = table.reserve(1, 0, 1, 0, None).unwrap();
        table.finish_post(a, false);
        assert_eq!(table.in_flight(), 0);
        assert_eq!(table.stats.posted, 0);
        let (_, record) = table.reserve(1, 0, 1, 0, None).unwrap();
        assert_eq!(record.sequence, 2);
    }

    #[test]
    fn not_ready_until_negotiated_running_and_unfrozen() {
        let mut table = DeliveryTable::try_new(1).unwrap();
        assert_eq!(
            table.reserve(1, 0, 1, 0, None).unwrap_err(),
            ReserveError::NotReady
        );
        table.running = true;
        assert_eq!(
            table.reserve(1, 0, 1, 0, None).unwrap_err(),
            ReserveError::NotReady
        );
        table.protocol_version = 1;
        table.frozen = true;
        assert_eq!(
            table.reserve(1, 0, 1, 0, None).unwrap_err(),
            ReserveError::NotReady
        );
    }

    #[test]
    fn restored_records_are_checked_against_the_sequence_counter() {
        let mut table = DeliveryTable::try_new(4).unwrap();
        table.next_sequence = 10;
        let record = DeliveryRecord {
            sequence: 10,
            tag: 0,
            posted_at: 0,
            payload_len: 1,
            payload_crc: 0,
            attempts: 1,
            trace_id: None,
        };
        assert_eq!(table.insert_restored(record), Err(NtStatus::DATA_ERROR));
        let token = table
            .insert_restored(DeliveryRecord {
                sequence: 9,
                ..record
            })
            .unwrap();
        assert_eq!(table.delivery(token).unwrap().attempts, 2);
        table
            .insert_restored(DeliveryRecord {
                sequence: 9,
                ..record
            })
            .unwrap();
        let mut scratch = Vec::with_capacity(4);
        assert!(table.has_duplicate_sequences(&mut scratch));
        table.remove_restored(token);
        assert!(!table.has_duplicate_sequences(&mut scratch));
    }

    #[test]
    fn save_epoch_counts_each_delivery_once() {
        let mut table = ready(3);
        let (a, _) = table.reserve(1, 0, 1, 0, None).unwrap();
        table.finish_post(a, true);
        assert_eq!(table.begin_save_epoch(), 1);
        table.delivery_for_save(a).unwrap();
        table.delivery_for_save(a).unwrap();
        assert_eq!(table.saved_in_epoch, 1);
    }

    #[test]
    fn migrated_cancellations_are_not_failures() {
        let mut table = ready(1);
        let (a, _) = table.reserve(1, 0, 1, 0, None).unwrap();
        table.finish_post(a, true);
        table.migrated = true;
        let outcome = table.complete(a, |_| OutcomeKind::Cancelled).unwrap();
        assert_eq!(outcome.kind, OutcomeKind::Migrated);
        assert_eq!(table.stats.cancelled, 0);
    }
}
