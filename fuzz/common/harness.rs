//! What the end-to-end fuzz targets share: the simulator settings, outcome bookkeeping and the
//! end-of-input checks (every delivery ended exactly once, counters add up, no KMCL violation).
#![allow(dead_code)] // each target uses part of it

use std::collections::BTreeMap;
use std::time::Duration;

use kmcl_sim::{Kmcl, Schedule, SimConfig};
use vmbsrv::kmcl::NtStatus;
use vmbsrv::vsp::{Outcome, OutcomeKind, VspChannel};
use vmbsrv_testkit::MigrationConfig;
use vmbsrv_testkit::migration::Lock;

/// The in-flight limit of every fuzzed channel: small, so that "full" is reachable.
pub(crate) const IN_FLIGHT: u32 = 8;
/// The message limit of every fuzzed channel.
pub(crate) const MAX_MESSAGE: u32 = 64;

/// Default simulator settings with room for the channel's packets and a short hang timeout, so a
/// hang is reported (as a panic) well within libFuzzer's `-timeout`.
///
/// The simulator runs in its deterministic mode (docs/simulator.md §3), seeded from the input:
/// no worker threads to start, hand work to and join per input, and no sleeping waits — the
/// thread that waits runs the KMCL work itself, at the same IRQLs, in the same callback frames,
/// under the same contract checks. The schedule (which context runs first, how far each DPC step
/// fills the ring) is drawn from the input's bytes, so an input replays exactly: a crash found
/// here reproduces, and the fuzzer explores interleavings through the input. Races between real
/// threads are the threaded mode's job (the default, used by most tests).
pub(crate) fn sim_config(data: &[u8]) -> SimConfig {
    SimConfig {
        hang_timeout: Duration::from_secs(2),
        schedule: Schedule::Deterministic {
            seed: crate::inputs::schedule_seed(data),
        },
        ..MigrationConfig::sim_for(IN_FLIGHT)
    }
}

/// Every outcome a channel recorded, by sequence number.
#[derive(Default, Debug)]
pub(crate) struct Outcomes {
    /// Outcome kinds per sequence, in arrival order.
    pub(crate) by_sequence: BTreeMap<u64, Vec<OutcomeKind>>,
}

impl Outcomes {
    /// Takes every outcome `channel` recorded so far.
    pub(crate) fn drain(&mut self, channel: &VspChannel<'_, Lock>) {
        let mut batch = [Outcome {
            sequence: 0,
            tag: 0,
            kind: OutcomeKind::Acked,
            attempts: 0,
        }; 16];
        loop {
            let count = channel.drain_outcomes(&mut batch);
            for outcome in &batch[..count] {
                self.by_sequence
                    .entry(outcome.sequence)
                    .or_default()
                    .push(outcome.kind);
            }
            if count < batch.len() {
                break;
            }
        }
    }

    /// Total outcomes recorded.
    pub(crate) fn count(&self) -> usize {
        self.by_sequence.values().map(Vec::len).sum()
    }
}

/// Asserts that every sequence in `posted` ended exactly once and nothing else ended.
pub(crate) fn assert_exactly_once(posted: &[u64], outcomes: &Outcomes) {
    for sequence in posted {
        let kinds = outcomes
            .by_sequence
            .get(sequence)
            .map(Vec::len)
            .unwrap_or(0);
        assert_eq!(
            kinds, 1,
            "delivery {sequence} ended {kinds} times: {outcomes:?}"
        );
    }
    assert_eq!(
        outcomes.count(),
        posted.len(),
        "outcomes for deliveries never posted: {outcomes:?} (posted {posted:?})"
    );
}

/// Asserts the channel's counters add up once nothing is in flight.
pub(crate) fn assert_counters(channel: &VspChannel<'_, Lock>) {
    let statistics = channel.statistics();
    let s = statistics.stats;
    assert_eq!(statistics.in_flight, 0, "{statistics:?}");
    assert_eq!(
        s.posted,
        s.acked + s.nacked + s.cancelled + s.bad_acks,
        "counters do not add up: {statistics:?}"
    );
}

/// Ends the simulator instance; any KMCL contract violation (leaked packet, channel or interface
/// reference included) fails the input.
pub(crate) fn finish(kmcl: Kmcl) {
    let violations = kmcl.finish();
    assert!(violations.is_empty(), "KMCL violations: {violations:#?}");
}

/// Whether `status` is one a post may legitimately be refused with.
pub(crate) fn expected_post_refusal(status: NtStatus) -> bool {
    [
        NtStatus::INVALID_BUFFER_SIZE,
        NtStatus::INVALID_DEVICE_STATE,
        NtStatus::QUOTA_EXCEEDED,
        NtStatus::INSUFFICIENT_RESOURCES,
    ]
    .contains(&status)
}
