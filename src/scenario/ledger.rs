//! The exactly-once ledger: what the host posted, what the guest saw, and how each delivery
//! ended, checked against each other.

use std::collections::{BTreeMap, HashMap};
use std::vec::Vec;

use crate::vsp::{Outcome, OutcomeKind};

/// What the host posted for one sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Posted {
    /// The client tag.
    pub tag: u64,
    /// CRC32C of the payload as posted.
    pub payload_crc: u32,
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
    /// Messages whose payload differed somewhere between post and acknowledgement.
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
    /// How often the guest received each sequence, and whether any copy was damaged.
    received: HashMap<u64, (u32, bool)>,
    /// Terminal outcomes per sequence (Migrated is a hand-over, not terminal).
    outcomes: HashMap<u64, Vec<OutcomeKind>>,
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

    /// The guest received `sequence`; `intact` says whether the payload matched its checksum.
    pub fn received(&mut self, sequence: u64, intact: bool) {
        let entry = self.received.entry(sequence).or_insert((0, false));
        entry.0 += 1;
        entry.1 |= !intact;
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
            .push(outcome.kind);
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
            .filter(|v| v.as_slice() == [OutcomeKind::Acked])
            .count() as u64
    }

    /// Judges the run.
    pub fn verdict(&self) -> Verdict {
        let mut verdict = Verdict::default();
        for sequence in self.posted.keys() {
            let outcomes = self
                .outcomes
                .get(sequence)
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            let (times_received, damaged) =
                self.received.get(sequence).copied().unwrap_or((0, false));
            let acked = outcomes
                .iter()
                .filter(|k| **k == OutcomeKind::Acked)
                .count();
            let corrupted = damaged || outcomes.contains(&OutcomeKind::Corrupted);
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

    fn outcome(sequence: u64, kind: OutcomeKind) -> Outcome {
        Outcome {
            sequence,
            tag: 0,
            kind,
            attempts: 1,
        }
    }

    #[test]
    fn clean_run() {
        let mut ledger = Ledger::new();
        ledger.posted(
            1,
            Posted {
                tag: 1,
                payload_crc: 0,
            },
        );
        ledger.received(1, true);
        ledger.outcome(&outcome(1, OutcomeKind::Migrated));
        ledger.outcome(&outcome(1, OutcomeKind::Acked));
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
            ledger.posted(
                sequence,
                Posted {
                    tag: 0,
                    payload_crc: 0,
                },
            );
        }
        // 1: never acknowledged.
        ledger.received(1, true);
        // 2: acknowledged twice.
        ledger.received(2, true);
        ledger.outcome(&outcome(2, OutcomeKind::Acked));
        ledger.outcome(&outcome(2, OutcomeKind::Acked));
        // 3: received twice, acknowledged once.
        ledger.received(3, true);
        ledger.received(3, true);
        ledger.outcome(&outcome(3, OutcomeKind::Acked));
        // 4: damaged payload.
        ledger.received(4, false);
        ledger.outcome(&outcome(4, OutcomeKind::Acked));
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
}
