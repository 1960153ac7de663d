//! The exactly-once ledger: what the host posted, what the guest saw, and how each delivery
//! ended, checked against each other.
//!
//! The ledger trusts nothing the VSP writes. It keeps its own digest of every posted payload and
//! the posted tag, and compares them with the bytes and tag the guest actually read, and with the
//! tag of every outcome. A VSP that sent message 2's payload (with a matching checksum) under
//! message 1's sequence, or mixed up two tags, would pass a check against the VSP's own checksum
//! field; it does not pass this one.

use core::hash::Hasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::DefaultHasher;
use std::vec::Vec;

use vmbsrv::vsp::{Outcome, OutcomeKind};

/// The ledger's own digest of a payload: SipHash-1-3 with fixed keys (`DefaultHasher::new`,
/// the same for every instance in one build) over the length and the bytes. Independent of the
/// CRC32C the VSP computes, and strong enough that two different payloads of a run colliding is
/// not a practical concern (the VSP is under test, not an adversary choosing payloads).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest(u64);

impl Digest {
    /// The digest of `payload`.
    pub fn of(payload: &[u8]) -> Self {
        let mut hasher = DefaultHasher::new();
        hasher.write_usize(payload.len());
        hasher.write(payload);
        Self(hasher.finish())
    }
}

/// What the host posted for one sequence number, as the scenario (not the VSP) recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Posted {
    /// The client tag.
    pub tag: u64,
    /// The ledger's digest of the payload as posted.
    pub digest: Digest,
}

impl Posted {
    /// The record of posting `payload` with `tag`.
    pub fn new(tag: u64, payload: &[u8]) -> Self {
        Self {
            tag,
            digest: Digest::of(payload),
        }
    }
}

/// The verdict over a whole run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Verdict {
    /// Posted messages acknowledged exactly once, with intact payloads.
    pub delivered: u64,
    /// Posted messages with no acknowledgement at the end of the run.
    pub lost: u64,
    /// Messages that reached the guest, or were acknowledged, more than once.
    pub duplicated: u64,
    /// Messages whose payload or tag, as the guest read it or as an outcome reported it, differed
    /// from what was posted (or whose acknowledgement reported a damaged payload).
    pub corrupted: u64,
}

impl Verdict {
    /// Whether nothing was lost, duplicated or corrupted.
    pub fn is_clean(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.corrupted == 0
    }
}

/// Records a run and judges it.
#[derive(Debug, Default)]
pub struct Ledger {
    posted: BTreeMap<u64, Posted>,
    /// What the guest read for each sequence: one (tag, digest) per copy. Compared with
    /// `posted` only in [`Ledger::verdict`], so a receipt may be recorded before its post (a
    /// guest thread can read a delivery before the posting thread records it).
    received: HashMap<u64, Vec<(u64, Digest)>>,
    /// Terminal outcomes per sequence, with the tag each reported (Migrated is a hand-over, not
    /// terminal).
    outcomes: HashMap<u64, Vec<(OutcomeKind, u64)>>,
    /// Outcomes for sequences the host never posted.
    unknown_outcomes: u64,
    migrated: u64,
    /// Sequence numbers the host handed out more than once.
    reused_sequences: u64,
}

impl Ledger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    /// The host posted `sequence`.
    pub fn posted(&mut self, sequence: u64, posted: Posted) {
        if self.posted.insert(sequence, posted).is_some() {
            self.reused_sequences += 1;
        }
    }

    /// The guest read a delivery of `sequence` labelled `tag` carrying `payload` (the bytes the
    /// guest read, not any checksum the host wrote).
    pub fn received(&mut self, sequence: u64, tag: u64, payload: &[u8]) {
        self.received
            .entry(sequence)
            .or_default()
            .push((tag, Digest::of(payload)));
    }

    /// The host recorded an outcome.
    pub fn outcome(&mut self, outcome: &Outcome) {
        if outcome.kind == OutcomeKind::Migrated {
            self.migrated += 1;
            return;
        }
        if !self.posted.contains_key(&outcome.sequence) {
            self.unknown_outcomes += 1;
        }
        self.outcomes
            .entry(outcome.sequence)
            .or_default()
            .push((outcome.kind, outcome.tag));
    }

    /// Number of messages posted.
    pub fn posted_count(&self) -> u64 {
        self.posted.len() as u64
    }

    /// Number of hand-overs recorded on a source channel.
    pub fn migrated_count(&self) -> u64 {
        self.migrated
    }

    /// Number of terminal outcomes recorded so far.
    pub fn outcome_count(&self) -> u64 {
        self.outcomes.values().map(|v| v.len() as u64).sum()
    }

    /// How many sequences have exactly one `Acked` outcome so far.
    pub fn acked_count(&self) -> u64 {
        self.outcomes
            .values()
            .filter(|v| matches!(v.as_slice(), [(OutcomeKind::Acked, _)]))
            .count() as u64
    }

    /// Judges the run.
    pub fn verdict(&self) -> Verdict {
        let mut verdict = Verdict::default();
        for (sequence, posted) in &self.posted {
            let outcomes = self
                .outcomes
                .get(sequence)
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            let receipts = self
                .received
                .get(sequence)
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            let times_received = receipts.len();
            // What the guest read must be what was posted: the ledger's own digest and tag.
            let misread = receipts
                .iter()
                .any(|&(tag, digest)| tag != posted.tag || digest != posted.digest);
            let mislabelled = outcomes.iter().any(|&(_, tag)| tag != posted.tag);
            let acked = outcomes
                .iter()
                .filter(|(k, _)| *k == OutcomeKind::Acked)
                .count();
            let corrupted = misread
                || mislabelled
                || outcomes.iter().any(|(k, _)| *k == OutcomeKind::Corrupted);
            if corrupted {
                verdict.corrupted += 1;
            }
            if outcomes.len() > 1 || times_received > 1 {
                verdict.duplicated += 1;
            }
            if acked == 0 {
                verdict.lost += 1;
            } else if acked == 1 && outcomes.len() == 1 && times_received == 1 && !corrupted {
                verdict.delivered += 1;
            }
        }
        // A sequence number handed out twice duplicates a message identity.
        verdict.duplicated += self.reused_sequences;
        // An outcome or a guest receipt for a sequence never posted is a duplicate of nothing:
        // count it where it hurts most, as corruption of the sequence space.
        verdict.corrupted += self.unknown_outcomes;
        verdict.corrupted += self
            .received
            .keys()
            .filter(|s| !self.posted.contains_key(s))
            .count() as u64;
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(sequence: u64, tag: u64, kind: OutcomeKind) -> Outcome {
        Outcome {
            sequence,
            tag,
            kind,
            attempts: 1,
        }
    }

    #[test]
    fn clean_run() {
        let mut ledger = Ledger::new();
        ledger.posted(1, Posted::new(7, b"one"));
        ledger.received(1, 7, b"one");
        ledger.outcome(&outcome(1, 7, OutcomeKind::Migrated));
        ledger.outcome(&outcome(1, 7, OutcomeKind::Acked));
        assert_eq!(
            ledger.verdict(),
            Verdict {
                delivered: 1,
                ..Verdict::default()
            }
        );
    }

    #[test]
    fn every_failure_is_counted() {
        let mut ledger = Ledger::new();
        for sequence in 1..=4 {
            ledger.posted(sequence, Posted::new(0, b"p"));
        }
        // 1: never acknowledged.
        ledger.received(1, 0, b"p");
        // 2: acknowledged twice.
        ledger.received(2, 0, b"p");
        ledger.outcome(&outcome(2, 0, OutcomeKind::Acked));
        ledger.outcome(&outcome(2, 0, OutcomeKind::Acked));
        // 3: received twice, acknowledged once.
        ledger.received(3, 0, b"p");
        ledger.received(3, 0, b"p");
        ledger.outcome(&outcome(3, 0, OutcomeKind::Acked));
        // 4: damaged payload.
        ledger.received(4, 0, b"q");
        ledger.outcome(&outcome(4, 0, OutcomeKind::Acked));
        let verdict = ledger.verdict();
        assert_eq!(
            verdict,
            Verdict {
                delivered: 0,
                lost: 1,
                duplicated: 2,
                corrupted: 1
            }
        );
        assert!(!verdict.is_clean());
    }

    /// Two messages of equal length whose payloads the host swapped, each with a checksum that
    /// matches what it carries (so a check against the host's own checksum passes), and
    /// acknowledged normally: the ledger's own digests catch both.
    #[test]
    fn swapped_payloads_are_corrupted() {
        let mut ledger = Ledger::new();
        ledger.posted(1, Posted::new(10, b"first"));
        ledger.posted(2, Posted::new(20, b"other"));
        ledger.received(1, 10, b"other");
        ledger.received(2, 20, b"first");
        ledger.outcome(&outcome(1, 10, OutcomeKind::Acked));
        ledger.outcome(&outcome(2, 20, OutcomeKind::Acked));
        assert_eq!(
            ledger.verdict(),
            Verdict {
                delivered: 0,
                lost: 0,
                duplicated: 0,
                corrupted: 2
            }
        );
    }

    /// The host delivered the right payloads under swapped tags.
    #[test]
    fn swapped_tags_are_corrupted() {
        let mut ledger = Ledger::new();
        ledger.posted(1, Posted::new(10, b"first"));
        ledger.posted(2, Posted::new(20, b"other"));
        ledger.received(1, 20, b"first");
        ledger.received(2, 10, b"other");
        ledger.outcome(&outcome(1, 10, OutcomeKind::Acked));
        ledger.outcome(&outcome(2, 20, OutcomeKind::Acked));
        assert_eq!(ledger.verdict().corrupted, 2);
        assert_eq!(ledger.verdict().delivered, 0);
    }

    /// The guest saw the right tags, but the outcomes the host reported carry swapped tags (a
    /// client would credit the wrong requests).
    #[test]
    fn outcomes_with_swapped_tags_are_corrupted() {
        let mut ledger = Ledger::new();
        ledger.posted(1, Posted::new(10, b"first"));
        ledger.posted(2, Posted::new(20, b"other"));
        ledger.received(1, 10, b"first");
        ledger.received(2, 20, b"other");
        ledger.outcome(&outcome(1, 20, OutcomeKind::Acked));
        ledger.outcome(&outcome(2, 10, OutcomeKind::Acked));
        assert_eq!(ledger.verdict().corrupted, 2);
    }

    /// A receipt recorded before its post (another thread posts) is judged at the end.
    #[test]
    fn receipt_before_post_is_fine() {
        let mut ledger = Ledger::new();
        ledger.received(1, 10, b"first");
        ledger.posted(1, Posted::new(10, b"first"));
        ledger.outcome(&outcome(1, 10, OutcomeKind::Acked));
        assert_eq!(ledger.verdict().delivered, 1);
        assert!(ledger.verdict().is_clean());
    }

    #[test]
    fn digests_tell_payloads_apart() {
        assert_eq!(Digest::of(b"abc"), Digest::of(b"abc"));
        assert_ne!(Digest::of(b"abc"), Digest::of(b"abd"));
        assert_ne!(Digest::of(b""), Digest::of(b"\0"));
    }
}
