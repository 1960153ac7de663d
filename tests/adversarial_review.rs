//! Adversarial review of issue #11's exactly-once hardening, by a reviewer who did not write it.
//!
//! The two tests named for a defect failed on the reviewed code and are regression tests now:
//! deliveries a blob still carries (a failed or unstarted restore, a complete save that was never
//! resumed) come back `Migrated` from `disable`, never `Cancelled`, so a replay of the blob cannot
//! end them a second time. Tests named `withstands_...` are attacks the design survived, kept so
//! that the list of what was tried stays visible. Findings left open are listed in
//! docs/reliability.md §8.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kmcl_sim::{FaultPlan, Guest, Kmcl, SimConfig};
use vmbsrv::kmcl::NtStatus;
use vmbsrv::vsp::{Outcome, OutcomeKind, Phase, PostRequest, RestoreProgress, VspChannel};
use vmbsrv_testkit::fixtures::{drain_all as drain, split_stream};
use vmbsrv_testkit::migration::{
    Lock, SCENARIO_INSTANCE, SCENARIO_INTERFACE_TYPE, channel_config, query_server_interface,
    restore_channel, save_channel,
};
use vmbsrv_testkit::{GuestModel, Ledger};

const MAX_LEN: u32 = 64;

fn sim(readings: &str) -> SimConfig {
    let mut config = SimConfig::default();
    config.apply_readings(readings).unwrap();
    config
}

/// A negotiated channel on `kmcl` with `count` deliveries in flight (payloads of 40 bytes).
fn busy<'i>(
    kmcl: &Kmcl,
    interface: &'i vmbsrv::kmcl::ServerInterface,
    count: u64,
) -> (VspChannel<'i, Lock>, GuestModel) {
    let guest = GuestModel::new(Guest::new(SCENARIO_INTERFACE_TYPE, SCENARIO_INSTANCE));
    kmcl.attach_guest(&guest.endpoint).unwrap();
    let channel = VspChannel::create(interface, &channel_config(kmcl, 16, MAX_LEN)).unwrap();
    guest.open_and_negotiate(kmcl).unwrap();
    for tag in 0..count {
        post(&channel, tag).unwrap();
    }
    kmcl.wait_idle();
    (channel, guest)
}

fn post(channel: &VspChannel<'_, Lock>, tag: u64) -> Result<u64, NtStatus> {
    channel.post(&PostRequest {
        tag,
        payload: &[tag as u8; 40],
        posted_at: 0,
        trace_id: None,
    })
}

/// A source channel with `count` deliveries that the guest has read but not acknowledged; saved
/// and handed over. Returns the stream and the guest (holding the deliveries).
fn migrate_out(count: u64) -> (Vec<u8>, GuestModel) {
    let kmcl = Kmcl::new(SimConfig::default());
    let (stream, guest) = {
        let interface = query_server_interface(&kmcl).unwrap();
        let (channel, mut guest) = busy(&kmcl, &interface, count);
        let mut ledger = Ledger::new();
        guest.pump(&mut ledger);
        assert_eq!(guest.held() as u64, count);
        guest.endpoint.detach();
        let (stream, _, _) = save_channel(&channel, 4096).unwrap();
        channel.complete_migration().unwrap();
        kmcl.wait_idle();
        let outcomes = drain(&channel);
        assert!(outcomes.iter().all(|o| o.kind == OutcomeKind::Migrated));
        drop(channel);
        (stream, guest)
    };
    assert_eq!(kmcl.finish(), Vec::new());
    (stream, guest)
}

/// Sequence → every non-`Migrated` outcome it got, across all the channels passed in.
fn endings(all: &[Vec<Outcome>]) -> BTreeMap<u64, Vec<OutcomeKind>> {
    let mut map: BTreeMap<u64, Vec<OutcomeKind>> = BTreeMap::new();
    for outcomes in all {
        for o in outcomes {
            if o.kind != OutcomeKind::Migrated {
                map.entry(o.sequence).or_default().push(o.kind);
            }
        }
    }
    map
}

// ------------------------------------------------------------------------------------------------
// Findings (fail on the reviewed code)
// ------------------------------------------------------------------------------------------------

/// FINDING 1 — a failed restore ends deliveries that the documented retry then delivers again.
///
/// Attack (careless client following docs/control.md §6 "Replay", step 4: "On any failure:
/// DestroyChannel (rebuilt deliveries come back cancelled). The file is not consumed: it can be
/// replayed into a fresh channel."): the first restore attempt hits a transient failure (the 4th
/// `VmbPacketAllocate` fails) after three deliveries were rebuilt; the client destroys that
/// channel and replays the same file into a fresh channel, where the guest acknowledges all six.
///
/// Observed: sequences 1..=3 end twice — `Cancelled` on the failed attempt (counted in its
/// `cancelled` statistic) and `Acked` on the replay. A client that reacts to `Cancelled` by
/// re-posting duplicates those messages at the guest.
/// Expected: a restore that did not complete must not *end* the deliveries it rebuilt (they are
/// still owned by the blob, which the docs say may be replayed) — report them with a non-final
/// kind (like `Migrated`: "continues elsewhere") or not at all; each sequence ends exactly once
/// across the lineage.
#[test]
fn failed_restore_then_documented_replay_ends_sequences_twice() {
    let (stream, mut guest) = migrate_out(6);
    // First attempt: fails part-way.
    let first = {
        let kmcl = Kmcl::new(SimConfig {
            faults: FaultPlan::new().fail_nth_packet_allocate(4),
            ..SimConfig::default()
        });
        let outcomes = {
            let interface = query_server_interface(&kmcl).unwrap();
            let channel: VspChannel<'_, Lock> =
                VspChannel::create_for_restore(&interface, &channel_config(&kmcl, 16, MAX_LEN))
                    .unwrap();
            assert!(restore_channel(&channel, &stream).is_err());
            assert_eq!(channel.phase(), Phase::RestoreFailed);
            channel.disable().unwrap();
            kmcl.wait_idle();
            drain(&channel)
        };
        assert_eq!(kmcl.finish(), Vec::new());
        outcomes
    };
    // The documented replay into a fresh channel; the guest acknowledges everything.
    let second = {
        let kmcl = Kmcl::new(SimConfig::default());
        let outcomes = {
            let interface = query_server_interface(&kmcl).unwrap();
            let channel: VspChannel<'_, Lock> =
                VspChannel::create_for_restore(&interface, &channel_config(&kmcl, 16, MAX_LEN))
                    .unwrap();
            restore_channel(&channel, &stream).unwrap();
            kmcl.attach_guest(&guest.endpoint).unwrap();
            kmcl.wait_idle();
            let mut ledger = Ledger::new();
            guest.pump(&mut ledger);
            guest.acknowledge(usize::MAX, None);
            kmcl.wait_idle();
            let outcomes = drain(&channel);
            channel.disable().unwrap();
            kmcl.wait_idle();
            outcomes
        };
        assert_eq!(kmcl.finish(), Vec::new());
        outcomes
    };
    assert_eq!(
        second
            .iter()
            .filter(|o| o.kind == OutcomeKind::Acked)
            .count(),
        6,
        "the replay delivers all six: {second:?}"
    );
    let twice: Vec<_> = endings(&[first, second])
        .into_iter()
        .filter(|(_, kinds)| kinds.len() > 1)
        .collect();
    assert!(
        twice.is_empty(),
        "sequences ended more than once across the failed restore and its replay: {twice:?}"
    );
}

/// FINDING 5 (lower confidence: a contract gap more than a code bug) — a complete save whose
/// source channel is then disabled/destroyed instead of `CompleteMigration` ends every delivery
/// twice once the blob is restored.
///
/// Attack (careless orchestrator): SaveBegin … SaveEnd (phase Saved, blob complete), then
/// `DisableChannel`/`DestroyChannel` on the source — both "accepted in every phase" — and restore
/// the blob on the destination, where the guest acknowledges.
/// Observed: the source reports every in-flight delivery `Cancelled` (a final outcome, counted in
/// `cancelled`); the destination, restoring a blob the product itself declared complete, reports
/// them `Acked`. docs/control.md's "Restore at most once" only forbids restoring "after the source
/// resumed"; nothing marks the blob dead or tells the client.
/// Expected: either the source hands the deliveries over (`Migrated`) when it is torn down from
/// Saved, or the rule and the statistics make the blob's death visible (e.g. refuse Disable in
/// Saved without an explicit Resume, or document "never after the source was disabled"), so that
/// no sequence ends twice.
#[test]
fn disabling_a_saved_channel_leaves_a_restorable_blob_whose_deliveries_end_twice() {
    let kmcl = Kmcl::new(SimConfig::default());
    let (stream, mut guest, source) = {
        let interface = query_server_interface(&kmcl).unwrap();
        let (channel, mut guest) = busy(&kmcl, &interface, 4);
        let mut ledger = Ledger::new();
        guest.pump(&mut ledger);
        guest.endpoint.detach();
        let (stream, _, _) = save_channel(&channel, 4096).unwrap();
        assert_eq!(channel.phase(), Phase::Saved);
        channel.disable().unwrap();
        kmcl.wait_idle();
        let outcomes = drain(&channel);
        drop(channel);
        (stream, guest, outcomes)
    };
    assert_eq!(kmcl.finish(), Vec::new());
    let kmcl = Kmcl::new(SimConfig::default());
    let destination = {
        let interface = query_server_interface(&kmcl).unwrap();
        let channel: VspChannel<'_, Lock> =
            VspChannel::create_for_restore(&interface, &channel_config(&kmcl, 16, MAX_LEN))
                .unwrap();
        restore_channel(&channel, &stream).unwrap();
        kmcl.attach_guest(&guest.endpoint).unwrap();
        kmcl.wait_idle();
        let mut ledger = Ledger::new();
        guest.pump(&mut ledger);
        guest.acknowledge(usize::MAX, None);
        kmcl.wait_idle();
        let outcomes = drain(&channel);
        channel.disable().unwrap();
        kmcl.wait_idle();
        outcomes
    };
    assert_eq!(kmcl.finish(), Vec::new());
    let twice: Vec<_> = endings(&[source, destination])
        .into_iter()
        .filter(|(_, kinds)| kinds.len() > 1)
        .collect();
    assert!(twice.is_empty(), "sequences ended twice: {twice:?}");
}

// ------------------------------------------------------------------------------------------------
// Attacks the design withstood (pass)
// ------------------------------------------------------------------------------------------------

/// Control calls in the wrong order: restore operations on a running channel, a second channel
/// record, chunks before the record, a chunk after Complete, save calls outside a save,
/// complete_migration before SaveEnd, finish_restore twice. Every one is refused and nothing ends.
#[test]
fn withstands_calls_in_the_wrong_order() {
    let (stream, _guest) = migrate_out(3);
    let (record, chunks) = split_stream(&stream);
    let kmcl = Kmcl::new(SimConfig::default());
    {
        let interface = query_server_interface(&kmcl).unwrap();
        let (running, _g) = busy(&kmcl, &interface, 2);
        let mut buf = vec![0u8; 4096];
        assert!(running.restore_channel_record(&record).is_err());
        assert!(running.restore_chunk(&chunks[0]).is_err());
        assert!(running.save_continue(&mut buf).is_err());
        assert!(running.save_end().is_err());
        assert!(running.complete_migration().is_err());
        assert!(running.finish_restore().is_err());
        running.save_begin().unwrap();
        assert!(running.complete_migration().is_err(), "before SaveEnd");
        assert!(running.save_end().is_err(), "no last chunk");
        assert!(running.complete_migration().is_err(), "after a failed save");
        running.resume().unwrap();
        assert!(drain(&running).is_empty());
        running.disable().unwrap();
        kmcl.wait_idle();
        assert_eq!(drain(&running).len(), 2);

        let channel: VspChannel<'_, Lock> =
            VspChannel::create_for_restore(&interface, &channel_config(&kmcl, 16, MAX_LEN))
                .unwrap();
        assert!(
            channel.restore_chunk(&chunks[0]).is_err(),
            "chunk before record"
        );
        assert!(channel.finish_restore().is_err());
        channel.restore_channel_record(&record).unwrap();
        assert!(
            channel.restore_channel_record(&record).is_err(),
            "second record"
        );
        let mut last = RestoreProgress::NeedMore;
        for chunk in &chunks {
            last = channel.restore_chunk(chunk).unwrap();
        }
        assert_eq!(last, RestoreProgress::Complete);
        assert!(channel.restore_chunk(&chunks[0]).is_err());
        channel.finish_restore().unwrap();
        assert!(channel.finish_restore().is_err());
        assert!(channel.restore_channel_record(&record).is_err());
        channel.disable().unwrap();
        kmcl.wait_idle();
        let outcomes = drain(&channel);
        assert_eq!(outcomes.len(), 3);
        channel.check_invariants().unwrap();
    }
    assert_eq!(kmcl.finish(), Vec::new());
}

/// A client saves twice (Saved → SaveBegin again) and migrates with the second save; the first
/// blob is discarded. Then a save begun from SaveFailed. Each sequence ends exactly once.
#[test]
fn withstands_save_retry_from_saved_and_save_failed() {
    let kmcl = Kmcl::new(SimConfig::default());
    let stream = {
        let interface = query_server_interface(&kmcl).unwrap();
        let (channel, guest) = busy(&kmcl, &interface, 4);
        guest.endpoint.detach();
        let (_first, _, _) = save_channel(&channel, 4096).unwrap();
        assert_eq!(channel.phase(), Phase::Saved);
        // From Saved, an abandoned incomplete save: SaveFailed.
        channel.save_begin().unwrap();
        assert!(channel.save_end().is_err());
        assert_eq!(channel.phase(), Phase::SaveFailed);
        let (second, _, _) = save_channel(&channel, 100).unwrap();
        channel.complete_migration().unwrap();
        kmcl.wait_idle();
        let outcomes = drain(&channel);
        assert_eq!(outcomes.len(), 4);
        assert!(outcomes.iter().all(|o| o.kind == OutcomeKind::Migrated));
        second
    };
    assert_eq!(kmcl.finish(), Vec::new());
    let kmcl = Kmcl::new(SimConfig::default());
    {
        let interface = query_server_interface(&kmcl).unwrap();
        let channel: VspChannel<'_, Lock> =
            VspChannel::create_for_restore(&interface, &channel_config(&kmcl, 16, MAX_LEN))
                .unwrap();
        restore_channel(&channel, &stream).unwrap();
        assert_eq!(channel.statistics().in_flight, 4);
        channel.disable().unwrap();
        kmcl.wait_idle();
    }
    assert_eq!(kmcl.finish(), Vec::new());
}

/// Concurrent control calls: one thread runs whole saves and resumes while another hammers
/// save_continue / save_end / complete_migration / resume and a third posts. The busy flag
/// refuses overlapping calls; the guest acknowledges everything at the end and every posted
/// sequence ends exactly once (none Migrated: a stray complete_migration may land on a Saved
/// channel, in which case everything in flight must be Migrated exactly once instead).
#[test]
fn withstands_concurrent_control_calls_and_posts() {
    for round in 0..5 {
        let kmcl = Kmcl::new(SimConfig::default());
        {
            let interface = query_server_interface(&kmcl).unwrap();
            let (channel, mut guest) = busy(&kmcl, &interface, 0);
            let stop = AtomicBool::new(false);
            let posted = Mutex::new(Vec::new());
            std::thread::scope(|s| {
                s.spawn(|| {
                    for _ in 0..20 {
                        let _ = save_channel(&channel, 128);
                        let _ = channel.resume();
                    }
                    stop.store(true, Ordering::Release);
                });
                s.spawn(|| {
                    let mut buf = vec![0u8; 256];
                    while !stop.load(Ordering::Acquire) {
                        let _ = channel.save_continue(&mut buf);
                        let _ = channel.save_end();
                        let _ = channel.resume();
                        std::thread::yield_now();
                    }
                });
                s.spawn(|| {
                    let mut tag = 0;
                    while !stop.load(Ordering::Acquire) {
                        if let Ok(seq) = post(&channel, tag) {
                            posted.lock().unwrap().push(seq);
                        }
                        tag += 1;
                        std::thread::yield_now();
                    }
                });
                s.spawn(|| {
                    let mut ledger = Ledger::new();
                    let mut g = &mut guest;
                    while !stop.load(Ordering::Acquire) {
                        g.pump(&mut ledger);
                        g.acknowledge(1, None);
                        std::thread::sleep(Duration::from_millis(1));
                        g = &mut *g;
                    }
                });
            });
            // Make sure the channel runs, then let the guest finish.
            let _ = channel.resume();
            let mut ledger = Ledger::new();
            for _ in 0..50 {
                kmcl.wait_idle();
                guest.pump(&mut ledger);
                guest.acknowledge(usize::MAX, None);
                if channel.statistics().in_flight == 0 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            channel.disable().unwrap();
            kmcl.wait_idle();
            let outcomes = drain(&channel);
            channel.check_invariants().unwrap();
            let mut seen = BTreeMap::new();
            for o in &outcomes {
                *seen.entry(o.sequence).or_insert(0) += 1;
            }
            let posted = posted.into_inner().unwrap();
            // A round in which the saves kept every post out proves nothing, but is no failure.
            for seq in &posted {
                assert_eq!(seen.get(seq), Some(&1), "round {round}: sequence {seq}");
            }
            assert_eq!(seen.len(), posted.len(), "round {round}");
        }
        assert_eq!(kmcl.finish(), Vec::new(), "round {round}");
    }
}

/// Under `completions_while_paused=delivered` the guest keeps acknowledging between SaveEnd and
/// CompleteMigration: the migration is refused, the client resumes, and each delivery ends once.
#[test]
fn withstands_acks_between_save_end_and_complete_migration() {
    let kmcl = Kmcl::new(sim("completions_while_paused=delivered"));
    {
        let interface = query_server_interface(&kmcl).unwrap();
        let (channel, mut guest) = busy(&kmcl, &interface, 4);
        let mut ledger = Ledger::new();
        guest.pump(&mut ledger);
        let saved = save_channel(&channel, 4096);
        assert!(saved.is_ok());
        guest.acknowledge(2, None);
        kmcl.wait_idle();
        assert_eq!(
            channel.complete_migration(),
            Err(NtStatus::INVALID_DEVICE_STATE)
        );
        channel.resume().unwrap();
        guest.acknowledge(usize::MAX, None);
        kmcl.wait_idle();
        let outcomes = drain(&channel);
        assert_eq!(outcomes.len(), 4);
        assert!(outcomes.iter().all(|o| o.kind == OutcomeKind::Acked));
        channel.disable().unwrap();
        kmcl.wait_idle();
    }
    assert_eq!(kmcl.finish(), Vec::new());
}

/// A failed restore (or a restored channel never finished) torn down under each reading of
/// `VmbChannelDisable` on a never-enabled channel: no violation (no completion reaching freed
/// memory, no leaked packet of the driver's), each rebuilt delivery ends at most once, and a
/// channel whose packets never came back is counted as kept, not freed.
#[test]
fn withstands_failed_restore_teardown_under_every_disable_reading() {
    let (stream, _guest) = migrate_out(4);
    for reading in ["before_return", "later", "never"] {
        for timing in ["before_enable", "after_enable"] {
            for finish in [false, true] {
                let kmcl = Kmcl::new(sim(&format!(
                    "disable_restored={reading},restore_timing={timing}"
                )));
                {
                    let interface = query_server_interface(&kmcl).unwrap();
                    let channel: VspChannel<'_, Lock> = VspChannel::create_for_restore(
                        &interface,
                        &channel_config(&kmcl, 16, MAX_LEN),
                    )
                    .unwrap();
                    let (record, chunks) = split_stream(&stream);
                    channel.restore_channel_record(&record).unwrap();
                    for chunk in &chunks {
                        channel.restore_chunk(chunk).unwrap();
                    }
                    if finish {
                        channel.finish_restore().unwrap();
                    }
                    channel.disable().unwrap();
                    kmcl.wait_idle();
                    let outcomes = drain(&channel);
                    assert_eq!(outcomes.len(), 4, "{reading} {timing} {finish}");
                    channel.check_invariants().unwrap();
                    drop(channel);
                    assert!(interface.leaked_channels() <= 1);
                }
                assert_eq!(kmcl.finish(), Vec::new(), "{reading} {timing} {finish}");
            }
        }
    }
}

/// Dropping a channel at every phase of a save and of a restore (the owner's handle closes):
/// teardown ends the save, nothing panics, nothing is reported twice.
#[test]
fn withstands_teardown_at_every_phase() {
    let (stream, _guest) = migrate_out(3);
    let (record, chunks) = split_stream(&stream);
    for cut in 0..6 {
        let kmcl = Kmcl::new(SimConfig::default());
        {
            let interface = query_server_interface(&kmcl).unwrap();
            let (channel, _g) = busy(&kmcl, &interface, 3);
            let mut buf = vec![0u8; 100];
            if cut >= 1 {
                channel.save_begin().unwrap();
            }
            if cut >= 2 {
                let _ = channel.save_continue(&mut buf);
            }
            if cut >= 3 {
                buf = vec![0u8; 4096];
                let _ = channel.save_continue(&mut buf);
                let _ = channel.save_continue(&mut buf);
            }
            if cut >= 4 {
                let _ = channel.save_end();
            }
            if cut >= 5 {
                let _ = channel.complete_migration();
            }
            drop(channel);
        }
        assert_eq!(kmcl.finish(), Vec::new(), "save cut {cut}");
    }
    for cut in 0..=chunks.len() {
        for reading in ["before_return", "later", "never"] {
            let kmcl = Kmcl::new(sim(&format!("disable_restored={reading}")));
            {
                let interface = query_server_interface(&kmcl).unwrap();
                let channel: VspChannel<'_, Lock> =
                    VspChannel::create_for_restore(&interface, &channel_config(&kmcl, 16, MAX_LEN))
                        .unwrap();
                channel.restore_channel_record(&record).unwrap();
                for chunk in &chunks[..cut] {
                    channel.restore_chunk(chunk).unwrap();
                }
                drop(channel);
            }
            assert_eq!(kmcl.finish(), Vec::new(), "restore cut {cut} {reading}");
        }
    }
}

/// The project's end-to-end migration under each single non-default reading except
/// `pause_waits=outgoing` (FINDING 3b), with both acknowledgement orders: exactly once, no
/// violation.
#[test]
fn withstands_live_migration_under_each_other_reading() {
    for (point, readings) in kmcl_sim::READINGS {
        for reading in &readings[1..] {
            if *point == "pause_waits" {
                continue;
            }
            let spec = format!("{point}={reading}");
            let mut config = vmbsrv_testkit::MigrationConfig::new(300, 7);
            config.sim.apply_readings(&spec).unwrap();
            let report = vmbsrv_testkit::run_live_migration(&config).unwrap();
            assert!(report.verdict.is_clean(), "{spec}: {:?}", report.verdict);
            assert_eq!(report.verdict.delivered, 300, "{spec}");
            assert!(
                report.violations.is_empty(),
                "{spec}: {:#?}",
                report.violations
            );
        }
    }
}

/// The destination guest (whose channel survived the migration) is attached before the restore
/// begins, under both restore timings: under `after_enable` the channel is offered to it in the
/// middle of the restore. Its pending acknowledgements must not be processed before the
/// deliveries exist, and each ends exactly once.
#[test]
fn withstands_guest_attached_before_the_restore() {
    for timing in ["before_enable", "after_enable"] {
        for context in ["keep", "reset", "reset_routine"] {
            let (stream, mut guest) = migrate_out(5);
            let kmcl = Kmcl::new(sim(&format!(
                "restore_timing={timing},restored_context={context}"
            )));
            {
                let interface = query_server_interface(&kmcl).unwrap();
                kmcl.attach_guest(&guest.endpoint).unwrap();
                let channel: VspChannel<'_, Lock> =
                    VspChannel::create_for_restore(&interface, &channel_config(&kmcl, 16, MAX_LEN))
                        .unwrap();
                restore_channel(&channel, &stream).unwrap();
                kmcl.wait_idle();
                let mut ledger = Ledger::new();
                guest.pump(&mut ledger);
                guest.acknowledge(usize::MAX, None);
                kmcl.wait_idle();
                let outcomes = drain(&channel);
                assert_eq!(outcomes.len(), 5, "{timing} {context}: {outcomes:?}");
                assert!(
                    outcomes
                        .iter()
                        .all(|o| o.kind == OutcomeKind::Acked && o.attempts == 2),
                    "{timing} {context}: {outcomes:?}"
                );
                channel.disable().unwrap();
                kmcl.wait_idle();
                assert!(drain(&channel).is_empty());
            }
            assert_eq!(kmcl.finish(), Vec::new(), "{timing} {context}");
        }
    }
}
