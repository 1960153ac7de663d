//! Regression tests for the exactly-once holes of issue #11 (docs/reliability.md, "Exactly-once
//! hardening"). Each test drives the product the way a careless or hostile control client, a
//! forged saved-state file or an unlucky schedule would, and each failed on the main branch
//! before the fix named in its comment.

use std::sync::Mutex;
use std::time::Duration;

use kmcl_sim::{Guest, Kmcl, Reply, SimConfig};
use vmbsrv::kmcl::NtStatus;
use vmbsrv::saved::crc32c;
use vmbsrv::saved::stream::{FrameKind, FrameReader, FrameWriter, frame_len};
use vmbsrv::vsp::protocol::{self, Header, Kind};
use vmbsrv::vsp::{Outcome, OutcomeKind, Phase, PostRequest, RestoreProgress, VspChannel};
use vmbsrv_testkit::GuestModel;
use vmbsrv_testkit::fixtures::{drain_all as drain, split_stream};
use vmbsrv_testkit::migration::{
    Lock, SCENARIO_INSTANCE, SCENARIO_INTERFACE_TYPE, channel_config, query_server_interface,
    restore_channel, save_channel,
};
use zerocopy::IntoBytes;

const MAX_LEN: u32 = 64;

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
        post(&channel, tag);
    }
    kmcl.wait_idle();
    (channel, guest)
}

fn post(channel: &VspChannel<'_, Lock>, tag: u64) -> u64 {
    channel
        .post(&PostRequest {
            tag,
            payload: &[tag as u8; 40],
            posted_at: 0,
            trace_id: None,
        })
        .unwrap()
}

fn join(record: &[u8], chunks: &[Vec<u8>]) -> Vec<u8> {
    let mut total = vmbsrv::saved::stream::STREAM_HEADER_LEN
        + vmbsrv::saved::stream::FRAME_HEADER_LEN
        + frame_len(record.len()).unwrap();
    for chunk in chunks {
        total += frame_len(chunk.len()).unwrap();
    }
    let mut stream = vec![0u8; total];
    let mut writer = FrameWriter::new(&mut stream).unwrap();
    writer.push(FrameKind::ChannelRecord, record).unwrap();
    for chunk in chunks {
        writer.push(FrameKind::KmclChunk, chunk).unwrap();
    }
    let written = writer.finish();
    stream.truncate(written);
    stream
}

/// Rewrites a little-endian u32 of a saved record's body (offset counted from the record's start)
/// and re-seals its checksum, as a forger who read docs/saved-state.md would.
fn forge_u32(record: &mut [u8], offset: usize, value: u32) {
    record[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
    let total = u32::from_le_bytes(record[12..16].try_into().unwrap()) as usize;
    let checksum = crc32c(&record[8..total]);
    record[4..8].copy_from_slice(&checksum.to_le_bytes());
}

/// Offsets in a channel record (16-byte header, then the v1 body of docs/saved-state.md).
const RECORD_MAX_MESSAGE_LEN: usize = 16 + 16;
const RECORD_IN_FLIGHT: usize = 16 + 20;

/// Saves `count` in-flight deliveries of a fresh channel and completes the migration; returns
/// the stream.
fn migrated_stream(count: u64, chunk_size: usize) -> Vec<u8> {
    let kmcl = Kmcl::new(SimConfig::default());
    let stream = {
        let interface = query_server_interface(&kmcl).unwrap();
        let (channel, guest) = busy(&kmcl, &interface, count);
        guest.endpoint.detach();
        let (stream, _, _) = save_channel(&channel, chunk_size).unwrap();
        channel.complete_migration().unwrap();
        kmcl.wait_idle();
        stream
    };
    assert_eq!(kmcl.finish(), Vec::new());
    stream
}

/// Restores `stream` on a new simulator; returns the restore's result and, after a disable, the
/// outcomes and the cancelled counter.
fn restore_and_tear_down(
    stream: &[u8],
    sim: SimConfig,
) -> (Result<(), NtStatus>, Vec<Outcome>, u64) {
    let kmcl = Kmcl::new(sim);
    let interface = query_server_interface(&kmcl).unwrap();
    let channel: VspChannel<'_, Lock> =
        VspChannel::create_for_restore(&interface, &channel_config(&kmcl, 16, MAX_LEN)).unwrap();
    let mut result = Ok(());
    for frame in FrameReader::new(stream).unwrap() {
        let frame = frame.unwrap();
        let step = match frame.kind {
            FrameKind::ChannelRecord => channel.restore_channel_record(frame.payload),
            FrameKind::KmclChunk => channel.restore_chunk(frame.payload).map(|_| ()),
        };
        if let Err(status) = step {
            result = Err(status);
            break;
        }
    }
    channel.disable().unwrap();
    kmcl.wait_idle();
    let outcomes = drain(&channel);
    let cancelled = channel.statistics().stats.cancelled;
    drop(channel);
    drop(interface);
    kmcl.assert_no_violations();
    (result, outcomes, cancelled)
}

/// Defect 1. A client fetches every chunk but the last, then SaveEnd and CompleteMigration.
/// Before: `save_end` counted the save callback's size probes, so both calls succeeded and every
/// delivery was reported `Migrated` although the blob could never be restored. Now the save is
/// failed and the migration refused; the deliveries are still here and end exactly once.
#[test]
fn a_save_missing_its_last_chunk_cannot_complete_a_migration() {
    let kmcl = Kmcl::new(SimConfig::default());
    {
        let interface = query_server_interface(&kmcl).unwrap();
        let (channel, mut guest) = busy(&kmcl, &interface, 6);
        // Learn the smallest useful buffer (room for one unit), then how many chunks a whole
        // save takes with it; abandon both saves.
        let mut buffer = vec![0u8; 64];
        channel.save_begin().unwrap();
        let required = loop {
            let chunk = channel.save_continue(&mut buffer).unwrap();
            assert_ne!(
                chunk.status,
                NtStatus::SUCCESS,
                "a delivery fit in 64 bytes"
            );
            if chunk.status == NtStatus::BUFFER_TOO_SMALL {
                break chunk.required as usize;
            }
        };
        buffer = vec![0u8; required];
        channel.resume().unwrap();
        channel.save_begin().unwrap();
        let mut chunks = 0;
        loop {
            let chunk = channel.save_continue(&mut buffer).unwrap();
            assert_ne!(chunk.status, NtStatus::BUFFER_TOO_SMALL);
            chunks += 1;
            if chunk.status == NtStatus::SUCCESS {
                break;
            }
        }
        assert!(chunks >= 3, "the save must span several chunks ({chunks})");
        channel.resume().unwrap();
        // The careless client: every chunk but the last.
        channel.save_begin().unwrap();
        for _ in 0..chunks - 1 {
            let chunk = channel.save_continue(&mut buffer).unwrap();
            assert_eq!(chunk.status, NtStatus::BUFFER_OVERFLOW);
        }
        assert_eq!(channel.save_end(), Err(NtStatus::INVALID_DEVICE_STATE));
        assert_eq!(channel.phase(), Phase::SaveFailed);
        assert_eq!(
            channel.complete_migration(),
            Err(NtStatus::INVALID_DEVICE_STATE)
        );
        assert!(drain(&channel).is_empty(), "nothing ended");
        // Delivery continues here.
        channel.resume().unwrap();
        let mut ledger = vmbsrv_testkit::Ledger::new();
        kmcl.wait_idle();
        guest.pump(&mut ledger);
        guest.acknowledge(usize::MAX, None);
        kmcl.wait_idle();
        let outcomes = drain(&channel);
        assert_eq!(outcomes.len(), 6);
        assert!(outcomes.iter().all(|o| o.kind == OutcomeKind::Acked));
        channel.disable().unwrap();
        kmcl.wait_idle();
    }
    assert_eq!(kmcl.finish(), Vec::new());
}

static FIRST_RECORD: Mutex<Vec<u8>> = Mutex::new(Vec::new());

/// Stores the first restored packet's driver bytes and hands them back again as the second
/// one's: a re-sealed file in which one delivery appears twice.
fn duplicate_first_record(index: u64, bytes: &mut Vec<u8>) {
    let mut first = FIRST_RECORD.lock().unwrap();
    if index == 0 {
        *first = bytes.clone();
    } else if index == 1 {
        *bytes = first.clone();
    }
}

/// Defect 2. A forged blob carries one delivery twice. Before: both copies were inserted, the
/// restore failed only after the last chunk, and teardown ended that sequence twice (two
/// `Cancelled` outcomes, both counted). Now the second copy is refused when it is inserted.
#[test]
fn a_forged_duplicate_is_refused_on_insertion_and_ends_once() {
    let stream = migrated_stream(3, 4096);
    let sim = SimConfig {
        tamper_driver_bytes: Some(duplicate_first_record),
        ..SimConfig::default()
    };
    let (result, outcomes, cancelled) = restore_and_tear_down(&stream, sim);
    assert_eq!(result, Err(NtStatus::DATA_ERROR));
    let mut sequences: Vec<u64> = outcomes.iter().map(|o| o.sequence).collect();
    sequences.sort_unstable();
    let before = sequences.len();
    sequences.dedup();
    assert_eq!(
        before,
        sequences.len(),
        "a sequence ended twice: {outcomes:?}"
    );
    // The blob still carries them: handed over, not cancelled (and not counted here).
    assert!(outcomes.iter().all(|o| o.kind == OutcomeKind::Migrated));
    assert_eq!(cancelled, 0);
}

/// Defect 3. Garbled guest requests queued while the channel is paused are handled when it
/// starts again — possibly between `EvtChannelStarted` and `EvtChannelPostStarted`. Before: the
/// first one stopped the incoming queue (`VmbChannelPacketFail`) and `post_started` then wiped
/// the flag, so statistics said running and the guest's requests were never answered again.
/// Now a garbled request is answered with an error reply and the queue never stops.
#[test]
fn garbled_requests_queued_while_paused_never_stop_the_guest() {
    for round in 0..20 {
        let kmcl = Kmcl::new(SimConfig::default());
        {
            let interface = query_server_interface(&kmcl).unwrap();
            let (channel, guest) = busy(&kmcl, &interface, 1);
            channel.save_begin().unwrap();
            let garbled = [0xEEu8; 24];
            let mut ids = Vec::new();
            for _ in 0..3 {
                ids.push(guest.endpoint.send_request(&garbled).unwrap());
            }
            channel.resume().unwrap();
            for id in ids {
                let reply = guest.endpoint.wait_reply(id, Duration::from_secs(5));
                assert!(
                    matches!(reply, Some(Reply::Completed(_))),
                    "round {round}: garbled request answered with {reply:?}"
                );
            }
            let request = Header::new(Kind::StatisticsRequest, protocol::HEADER_LEN);
            let id = guest.endpoint.send_request(request.as_bytes()).unwrap();
            let reply = guest.endpoint.wait_reply(id, Duration::from_secs(5));
            assert!(
                matches!(reply, Some(Reply::Completed(_))),
                "round {round}: the guest's next request got {reply:?}"
            );
            assert_eq!(channel.statistics().stats.guest_garbled, 3);
            channel.disable().unwrap();
            kmcl.wait_idle();
        }
        assert_eq!(kmcl.finish(), Vec::new());
    }
}

/// Defect 9. A channel record from one save paired with the KMCL chunks of another save of the
/// same channel, with the same number of deliveries in flight. Before: accepted (the counts
/// matched), so the restored channel carried the other save's sequence counter and statistics.
/// Now every record carries the save's identity and a mismatch is a data error.
#[test]
fn a_record_paired_with_another_saves_chunks_is_refused() {
    let kmcl = Kmcl::new(SimConfig::default());
    let (first, second) = {
        let interface = query_server_interface(&kmcl).unwrap();
        let (channel, mut guest) = busy(&kmcl, &interface, 2);
        let (first, _, _) = save_channel(&channel, 4096).unwrap();
        channel.resume().unwrap();
        // One more delivery and the oldest acknowledged: two remain in flight.
        let mut ledger = vmbsrv_testkit::Ledger::new();
        post(&channel, 99);
        kmcl.wait_idle();
        guest.pump(&mut ledger);
        guest.acknowledge(1, None);
        kmcl.wait_idle();
        assert_eq!(channel.statistics().in_flight, 2);
        guest.endpoint.detach();
        let (second, _, _) = save_channel(&channel, 4096).unwrap();
        channel.complete_migration().unwrap();
        kmcl.wait_idle();
        (first, second)
    };
    assert_eq!(kmcl.finish(), Vec::new());
    let (first_record, first_chunks) = split_stream(&first);
    let (second_record, second_chunks) = split_stream(&second);
    for (record, chunks) in [
        (&first_record, &second_chunks),
        (&second_record, &first_chunks),
    ] {
        let (result, _, _) = restore_and_tear_down(&join(record, chunks), SimConfig::default());
        assert_eq!(result, Err(NtStatus::DATA_ERROR));
    }
    // Each save, whole, restores.
    for stream in [&first, &second] {
        let (result, _, _) = restore_and_tear_down(stream, SimConfig::default());
        assert_eq!(result, Ok(()));
    }
}

/// Defect 10. A forged channel record that claims a smaller `max_message_len` than the
/// deliveries it brings, or fewer deliveries than the chunks hold. Before: the first was
/// accepted (only the configured channel was checked) and the second failed with
/// `STATUS_INSUFFICIENT_RESOURCES`. Both are data errors.
#[test]
fn restored_deliveries_are_checked_against_the_saved_record() {
    let stream = migrated_stream(3, 4096);
    let (record, chunks) = split_stream(&stream);
    let mut small_messages = record.clone();
    forge_u32(&mut small_messages, RECORD_MAX_MESSAGE_LEN, 1);
    let (result, _, _) =
        restore_and_tear_down(&join(&small_messages, &chunks), SimConfig::default());
    assert_eq!(result, Err(NtStatus::DATA_ERROR));
    let mut fewer = record.clone();
    forge_u32(&mut fewer, RECORD_IN_FLIGHT, 1);
    let (result, _, _) = restore_and_tear_down(&join(&fewer, &chunks), SimConfig::default());
    assert_eq!(result, Err(NtStatus::DATA_ERROR));
}

/// Defect 9, second half: the product cannot stop one blob from being restored on two hosts,
/// so it makes it visible. Both restores report the same restored save and generation 1; a save
/// of a restored channel, restored again, is generation 2.
#[test]
fn a_blob_restored_twice_is_visible_in_statistics() {
    let stream = migrated_stream(2, 4096);
    let mut seen = Vec::new();
    for _ in 0..2 {
        let kmcl = Kmcl::new(SimConfig::default());
        {
            let interface = query_server_interface(&kmcl).unwrap();
            let channel: VspChannel<'_, Lock> =
                VspChannel::create_for_restore(&interface, &channel_config(&kmcl, 16, MAX_LEN))
                    .unwrap();
            restore_channel(&channel, &stream).unwrap();
            let stats = channel.statistics();
            assert_eq!(stats.restore_generation, 1);
            assert_ne!(stats.restored_save_id, 0);
            seen.push(stats.restored_save_id);
            let (again, _, _) = save_channel(&channel, 4096).unwrap();
            channel.complete_migration().unwrap();
            kmcl.wait_idle();
            let kmcl2 = Kmcl::new(SimConfig::default());
            {
                let interface2 = query_server_interface(&kmcl2).unwrap();
                let next: VspChannel<'_, Lock> = VspChannel::create_for_restore(
                    &interface2,
                    &channel_config(&kmcl2, 16, MAX_LEN),
                )
                .unwrap();
                restore_channel(&next, &again).unwrap();
                assert_eq!(next.statistics().restore_generation, 2);
                assert_ne!(next.statistics().restored_save_id, seen[seen.len() - 1]);
                next.disable().unwrap();
                kmcl2.wait_idle();
            }
            assert_eq!(kmcl2.finish(), Vec::new());
        }
        assert_eq!(kmcl.finish(), Vec::new());
    }
    assert_eq!(seen[0], seen[1], "one blob, one identity");
}

/// A post issued right after `resume` returns is accepted: `resume` returns once posting works
/// (it waits, boundedly, for `EvtChannelPostStarted` while the guest's channel is open).
#[test]
fn a_post_right_after_resume_is_accepted() {
    for _ in 0..50 {
        let kmcl = Kmcl::new(SimConfig::default());
        {
            let interface = query_server_interface(&kmcl).unwrap();
            let (channel, _guest) = busy(&kmcl, &interface, 1);
            channel.save_begin().unwrap();
            channel.resume().unwrap();
            let posted = channel.post(&PostRequest {
                tag: 7,
                payload: b"after resume",
                posted_at: 0,
                trace_id: None,
            });
            assert!(posted.is_ok(), "post right after resume: {posted:?}");
            channel.disable().unwrap();
            kmcl.wait_idle();
        }
        assert_eq!(kmcl.finish(), Vec::new());
    }
}

/// A restore that completes must have counted what it restored: an extra complete call after
/// `Complete` is refused without reaching KMCL.
#[test]
fn restore_progress_is_complete_once() {
    let stream = migrated_stream(2, 4096);
    let kmcl = Kmcl::new(SimConfig::default());
    {
        let interface = query_server_interface(&kmcl).unwrap();
        let channel: VspChannel<'_, Lock> =
            VspChannel::create_for_restore(&interface, &channel_config(&kmcl, 16, MAX_LEN))
                .unwrap();
        let (record, chunks) = split_stream(&stream);
        channel.restore_channel_record(&record).unwrap();
        let mut last = RestoreProgress::NeedMore;
        for chunk in &chunks {
            last = channel.restore_chunk(chunk).unwrap();
        }
        assert_eq!(last, RestoreProgress::Complete);
        assert_eq!(
            channel.restore_chunk(&chunks[0]),
            Err(NtStatus::INVALID_DEVICE_STATE)
        );
        channel.disable().unwrap();
        kmcl.wait_idle();
    }
    assert_eq!(kmcl.finish(), Vec::new());
}

// ---- Under every reading of KMCL's undocumented behaviour (docs/kmcl-bindings.md) ------------

fn with_readings(spec: &str) -> SimConfig {
    let mut config = SimConfig::default();
    config.apply_readings(spec).unwrap();
    config
}

/// Every sequence of `outcomes` once, and `count` of them.
fn each_once(outcomes: &[Outcome], count: usize) {
    let mut sequences: Vec<u64> = outcomes.iter().map(|o| o.sequence).collect();
    sequences.sort_unstable();
    sequences.dedup();
    assert_eq!(
        sequences.len(),
        outcomes.len(),
        "a sequence ended twice: {outcomes:?}"
    );
    assert_eq!(outcomes.len(), count, "{outcomes:?}");
}

/// Defect 4. A channel restored into and torn down before it was ever enabled, under each
/// reading of `VmbChannelDisable` on such a channel (returns the restored packets before it
/// returns / later / never) and each restore timing. Before: the context was freed after Cleanup
/// whatever KMCL still owned, and where Disable never returned the packets their deliveries never
/// ended. Now every delivery ends exactly once (handed over: the blob still carries it), and the
/// context is kept — a bounded, counted leak — exactly when KMCL still owns packets.
#[test]
fn a_restored_channel_torn_down_before_start_is_safe_under_every_disable_reading() {
    let stream = migrated_stream(6, 4096);
    for disable in ["before_return", "later", "never"] {
        for timing in ["before_enable", "after_enable"] {
            let spec = format!("disable_restored={disable},restore_timing={timing}");
            let kmcl = Kmcl::new(with_readings(&spec));
            {
                let interface = query_server_interface(&kmcl).unwrap();
                let channel: VspChannel<'_, Lock> =
                    VspChannel::create_for_restore(&interface, &channel_config(&kmcl, 16, MAX_LEN))
                        .unwrap();
                for frame in FrameReader::new(&stream).unwrap() {
                    let frame = frame.unwrap();
                    match frame.kind {
                        FrameKind::ChannelRecord => {
                            channel.restore_channel_record(frame.payload).unwrap();
                        }
                        FrameKind::KmclChunk => {
                            channel.restore_chunk(frame.payload).unwrap();
                        }
                    }
                }
                assert_eq!(channel.phase(), Phase::Restored, "{spec}");
                channel.disable().unwrap();
                kmcl.wait_idle();
                let outcomes = drain(&channel);
                each_once(&outcomes, 6);
                assert!(
                    outcomes.iter().all(|o| o.kind == OutcomeKind::Migrated),
                    "{spec}: {outcomes:?}"
                );
                assert_eq!(channel.statistics().in_flight, 0, "{spec}");
                channel.check_invariants().unwrap();
                drop(channel);
                // Only a channel whose library really never hands packets back keeps its context
                // (an enabled channel's Disable returns every packet under every reading).
                let kept = u32::from(disable == "never" && timing == "before_enable");
                assert_eq!(interface.leaked_channels(), kept, "{spec}");
            }
            assert_eq!(kmcl.finish(), Vec::new(), "{spec}");
        }
    }
}

/// Defect 5. Posts racing saves (each pauses the channel) where the library serializes
/// `VmbPacketSend` against `EvtChannelSuspend`. Before: the suspend callback waited for posts
/// under way, so a post blocked in its send behind the callback deadlocked the pause. Now nothing
/// waits in the callback; a post that crosses the suspend is refused and ends at once.
#[test]
fn posts_racing_pauses_never_deadlock_when_sends_are_serialized() {
    for spec in ["send_vs_suspend=serialized", "send_vs_suspend=concurrent"] {
        let kmcl = Kmcl::new(with_readings(spec));
        {
            let interface = query_server_interface(&kmcl).unwrap();
            let (channel, mut guest) = busy(&kmcl, &interface, 0);
            let accepted = Mutex::new(0u64);
            std::thread::scope(|scope| {
                scope.spawn(|| {
                    let mut ledger = vmbsrv_testkit::ledger::Ledger::new();
                    for tag in 0..400u64 {
                        let request = PostRequest {
                            tag,
                            payload: &[7u8; 40],
                            posted_at: 0,
                            trace_id: None,
                        };
                        if channel.post(&request).is_ok() {
                            *accepted.lock().unwrap() += 1;
                        }
                        if tag % 4 == 0 {
                            guest.pump(&mut ledger);
                            guest.acknowledge(guest.held(), None);
                        }
                    }
                });
                for _ in 0..10 {
                    if channel.save_begin().is_ok() {
                        channel.resume().unwrap();
                    }
                }
            });
            channel.disable().unwrap();
            kmcl.wait_idle();
            let mut outcomes = Vec::new();
            loop {
                let batch = drain(&channel);
                if batch.is_empty() {
                    break;
                }
                outcomes.extend(batch);
            }
            each_once(&outcomes, *accepted.lock().unwrap() as usize);
            channel.check_invariants().unwrap();
        }
        assert_eq!(kmcl.finish(), Vec::new(), "{spec}");
    }
}

/// Defect 7. A library whose `VmbPacketRestore` resets the completion routine but keeps the
/// context pointer. Before: the routine was set again only when the pointer had changed, so the
/// restored deliveries never completed. Now both are set after every restore.
#[test]
fn restored_deliveries_complete_when_only_the_routine_was_reset() {
    for spec in [
        "restored_context=reset_routine",
        "restored_context=reset",
        "restored_context=keep",
    ] {
        // Source: five deliveries in flight, the VM (and its ring) leaves with the save.
        let kmcl_a = Kmcl::new(SimConfig::default());
        let (stream, mut guest) = {
            let interface = query_server_interface(&kmcl_a).unwrap();
            let (channel, guest) = busy(&kmcl_a, &interface, 5);
            guest.endpoint.detach();
            let (stream, _, _) = save_channel(&channel, 4096).unwrap();
            channel.complete_migration().unwrap();
            kmcl_a.wait_idle();
            (stream, guest)
        };
        assert_eq!(kmcl_a.finish(), Vec::new());
        let kmcl = Kmcl::new(with_readings(spec));
        {
            let interface = query_server_interface(&kmcl).unwrap();
            let channel: VspChannel<'_, Lock> =
                VspChannel::create_for_restore(&interface, &channel_config(&kmcl, 16, MAX_LEN))
                    .unwrap();
            restore_channel(&channel, &stream).unwrap();
            kmcl.attach_guest(&guest.endpoint).unwrap();
            kmcl.wait_idle();
            let mut ledger = vmbsrv_testkit::ledger::Ledger::new();
            guest.pump(&mut ledger);
            guest.acknowledge(guest.held(), None);
            kmcl.wait_idle();
            let outcomes = drain(&channel);
            each_once(&outcomes, 5);
            assert!(
                outcomes.iter().all(|o| o.kind == OutcomeKind::Acked),
                "{spec}: {outcomes:?}"
            );
            channel.disable().unwrap();
            kmcl.wait_idle();
        }
        assert_eq!(kmcl.finish(), Vec::new(), "{spec}");
    }
}

/// Completions the library delivers while the channel is paused, between `save_begin` and
/// `save_end`: the save no longer holds exactly the deliveries in flight, so it fails (a blob
/// that carried an acknowledged delivery would deliver it twice); resuming ends each delivery
/// once, and a new save succeeds.
#[test]
fn completions_delivered_while_paused_fail_the_save_not_the_delivery() {
    let kmcl = Kmcl::new(with_readings("completions_while_paused=delivered"));
    {
        let interface = query_server_interface(&kmcl).unwrap();
        let (channel, mut guest) = busy(&kmcl, &interface, 4);
        let mut ledger = vmbsrv_testkit::ledger::Ledger::new();
        guest.pump(&mut ledger);
        channel.save_begin().unwrap();
        guest.acknowledge(2, None);
        kmcl.wait_idle();
        let mut buffer = vec![0u8; 4096];
        loop {
            let chunk = channel.save_continue(&mut buffer).unwrap();
            if chunk.status == NtStatus::SUCCESS {
                break;
            }
        }
        assert!(channel.save_end().is_err(), "a save with ended deliveries");
        assert_eq!(channel.phase(), Phase::SaveFailed);
        assert!(channel.complete_migration().is_err());
        channel.resume().unwrap();
        let first = drain(&channel);
        each_once(&first, 2);
        // The guest stops acknowledging; a save now holds exactly the two left.
        guest.endpoint.detach();
        let (stream, _, _) = save_channel(&channel, 4096).unwrap();
        channel.complete_migration().unwrap();
        kmcl.wait_idle();
        let rest = drain(&channel);
        assert!(rest.iter().all(|o| o.kind == OutcomeKind::Migrated));
        let mut all = first;
        all.extend(rest);
        each_once(&all, 4);
        assert!(!stream.is_empty());
    }
    assert_eq!(kmcl.finish(), Vec::new());
}

/// Whatever `VmbChannelPacketFail` does, vmbsrv never calls it: garbled requests are answered
/// with an error reply, and a pause after them returns.
#[test]
fn garbled_requests_never_reach_packet_fail_under_either_reading() {
    for spec in ["packet_fail=retires", "packet_fail=keeps"] {
        let kmcl = Kmcl::new(with_readings(spec));
        {
            let interface = query_server_interface(&kmcl).unwrap();
            let (channel, guest) = busy(&kmcl, &interface, 0);
            let id = guest.endpoint.send_request(&[0xEEu8; 24]).unwrap();
            let reply = guest.endpoint.wait_reply(id, Duration::from_secs(5));
            assert!(
                matches!(reply, Some(Reply::Completed(_))),
                "{spec}: {reply:?}"
            );
            channel.save_begin().unwrap();
            channel.resume().unwrap();
            assert_eq!(kmcl.call_count(kmcl_sim::KmclCall::ChannelPacketFail), 0);
            channel.disable().unwrap();
            kmcl.wait_idle();
        }
        assert_eq!(kmcl.finish(), Vec::new(), "{spec}");
    }
}

/// The header (19041 and later) refuses a second friendly name; vmbsrv sets it once per channel.
#[test]
fn the_friendly_name_is_set_once_per_channel() {
    let kmcl = Kmcl::new(SimConfig::default());
    {
        let interface = query_server_interface(&kmcl).unwrap();
        for _ in 0..3 {
            let channel: VspChannel<'_, Lock> =
                VspChannel::create_for_restore(&interface, &channel_config(&kmcl, 16, MAX_LEN))
                    .unwrap();
            drop(channel);
        }
        assert_eq!(
            kmcl.call_count(kmcl_sim::KmclCall::ChannelInitSetFriendlyName),
            3
        );
    }
    assert_eq!(kmcl.finish(), Vec::new());
}

/// A library whose Pause waits until the guest has completed every packet it holds: the main
/// job, with a guest that keeps running while the host pauses, delivers exactly once (what is
/// handed over is only what never reached the ring).
#[test]
fn a_pause_that_waits_for_outgoing_packets_still_migrates_exactly_once() {
    let mut config = vmbsrv_testkit::MigrationConfig::new(1500, 3).deterministic();
    config.sim.apply_readings("pause_waits=outgoing").unwrap();
    let report = vmbsrv_testkit::run_live_migration(&config).unwrap();
    assert!(report.violations.is_empty(), "{:?}", report.violations);
    assert_eq!(report.verdict.delivered, 1500, "{:?}", report.verdict);
    assert!(report.verdict.is_clean(), "{:?}", report.verdict);
}

/// Adversarial review, finding 4: under a library whose Disable never hands back restored
/// packets, each restore torn down before Start keeps its channel's context. Before: the bound
/// was 16 whole contexts (delivery tables included), after which every channel creation failed
/// until the driver reloaded — a client that kept failing restores disabled the driver. Now a
/// kept context first gives back its delivery table, and the bound is 4,096 such small contexts:
/// twenty failed restores later, channels are still created and migrations still restore.
#[test]
fn failed_restores_under_a_library_that_never_returns_packets_do_not_disable_the_driver() {
    let stream = migrated_stream(3, 4096);
    // Restored before Enable: an enabled channel's Disable returns every packet under any reading.
    let kmcl = Kmcl::new(with_readings(
        "disable_restored=never,restore_timing=before_enable",
    ));
    {
        let interface = query_server_interface(&kmcl).unwrap();
        for round in 0..20 {
            let channel: VspChannel<'_, Lock> =
                VspChannel::create_for_restore(&interface, &channel_config(&kmcl, 16, MAX_LEN))
                    .unwrap_or_else(|status| panic!("round {round}: create refused: {status}"));
            for frame in FrameReader::new(&stream).unwrap() {
                let frame = frame.unwrap();
                match frame.kind {
                    FrameKind::ChannelRecord => channel.restore_channel_record(frame.payload),
                    FrameKind::KmclChunk => channel.restore_chunk(frame.payload).map(|_| ()),
                }
                .unwrap();
            }
            channel.disable().unwrap();
            let outcomes = drain(&channel);
            each_once(&outcomes, 3);
            drop(channel);
            assert_eq!(interface.leaked_channels(), round + 1);
        }
        let channel: VspChannel<'_, Lock> =
            VspChannel::create_for_restore(&interface, &channel_config(&kmcl, 16, MAX_LEN))
                .unwrap();
        restore_channel(&channel, &stream).unwrap();
        assert_eq!(channel.statistics().in_flight, 3);
        channel.disable().unwrap();
    }
    assert_eq!(kmcl.finish(), Vec::new());
}
