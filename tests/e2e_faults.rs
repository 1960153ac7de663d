//! End-to-end failure paths: tampered and corrupted saved state, allocation and KMCL call
//! failures, malformed guest packets. Each must end in a precise NTSTATUS, with no leaked packet or
//! channel and no KMCL contract violation.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kmcl_sim::{FaultPlan, Guest, Kmcl, KmclCall, Reply, SimConfig};
use vmbsrv::kmcl::{NtStatus, ServerInterface};
use vmbsrv::vsp::protocol::{self, Header, Kind, NegotiateRequest};
use vmbsrv::vsp::{Outcome, OutcomeKind, Phase, PostRequest, RestoreProgress, VspChannel};
use vmbsrv_testkit::fixtures::split_stream;
use vmbsrv_testkit::migration::{Lock, channel_config, query_server_interface, save_channel};
use vmbsrv_testkit::{GuestModel, Ledger, MigrationConfig, Posted};
use zerocopy::IntoBytes;

const IN_FLIGHT: u32 = 24;

/// A saved busy channel: the save stream and the number of deliveries it holds.
struct Saved {
    record: Vec<u8>,
    chunks: Vec<Vec<u8>>,
    in_flight: u32,
}

fn sim() -> SimConfig {
    MigrationConfig::sim_for(IN_FLIGHT)
}

/// Posts `IN_FLIGHT` messages that the guest never acknowledges, saves, and hands the channel over.
fn save_busy_channel(chunk_size: usize) -> Saved {
    let kmcl = Kmcl::new(sim());
    let interface = query_server_interface(&kmcl).unwrap();
    let guest = GuestModel::new(Guest::new(
        vmbsrv_testkit::migration::SCENARIO_INTERFACE_TYPE,
        vmbsrv_testkit::migration::SCENARIO_INSTANCE,
    ));
    kmcl.attach_guest(&guest.endpoint).unwrap();
    let channel: VspChannel<'_, Lock> =
        VspChannel::create(&interface, &channel_config(&kmcl, IN_FLIGHT, 64)).unwrap();
    guest.open_and_negotiate(&kmcl).unwrap();
    for tag in 0..u64::from(IN_FLIGHT) {
        let payload = [tag as u8; 40];
        channel
            .post(&PostRequest {
                tag,
                payload: &payload,
                posted_at: tag,
                trace_id: None,
            })
            .unwrap();
    }
    kmcl.wait_idle();
    let (stream, _, _) = save_channel(&channel, chunk_size).unwrap();
    guest.endpoint.detach();
    channel.complete_migration().unwrap();
    drop(channel);
    drop(interface);
    assert_eq!(kmcl.finish(), Vec::new());
    let (record, chunks) = split_stream(&stream);
    Saved {
        record,
        chunks,
        in_flight: IN_FLIGHT,
    }
}

/// Restores `record` + `chunks` on a fresh simulator; returns the first failure (or `Ok`), after a
/// full teardown that must leave no violation. Restored deliveries that a failed restore leaves
/// behind must come back as handed-over (`Migrated`) outcomes: the blob still carries them.
fn restore_on_fresh_sim(
    config: SimConfig,
    record: &[u8],
    chunks: &[Vec<u8>],
) -> Result<(), NtStatus> {
    let kmcl = Kmcl::new(config);
    let result = {
        let interface: ServerInterface = query_server_interface(&kmcl).unwrap();
        let channel: VspChannel<'_, Lock> =
            VspChannel::create_for_restore(&interface, &channel_config(&kmcl, IN_FLIGHT, 64))
                .unwrap();
        let result = (|| {
            channel.restore_channel_record(record)?;
            let mut complete = false;
            for chunk in chunks {
                complete = channel.restore_chunk(chunk)? == RestoreProgress::Complete;
            }
            if complete {
                Ok(())
            } else {
                Err(NtStatus::MORE_PROCESSING_REQUIRED)
            }
        })();
        if result.is_err() {
            assert_ne!(channel.phase(), Phase::Running);
            assert!(
                channel.finish_restore().is_err(),
                "a failed restore cannot be started"
            );
        }
        let restored = channel.statistics().in_flight;
        channel.disable().unwrap();
        kmcl.wait_idle();
        let mut outcomes = vec![
            Outcome {
                sequence: 0,
                tag: 0,
                kind: OutcomeKind::Acked,
                attempts: 0
            };
            64
        ];
        let count = channel.drain_outcomes(&mut outcomes);
        assert_eq!(
            count as u32, restored,
            "every restored delivery comes back exactly once"
        );
        // The blob still carries them (it may be replayed): handed over, never cancelled.
        assert!(
            outcomes[..count]
                .iter()
                .all(|o| o.kind == OutcomeKind::Migrated)
        );
        assert_eq!(channel.statistics().in_flight, 0);
        result
    };
    let violations = kmcl.finish();
    assert!(violations.is_empty(), "violations: {violations:#?}");
    result
}

#[test]
fn an_intact_save_restores_on_a_fresh_simulator() {
    let saved = save_busy_channel(512);
    assert!(saved.chunks.len() > 1);
    // Every delivery is rebuilt; the helper's teardown then cancels each exactly once.
    assert_eq!(
        restore_on_fresh_sim(sim(), &saved.record, &saved.chunks),
        Ok(())
    );
    assert_eq!(saved.in_flight, IN_FLIGHT);
}

static TAMPER_AT: AtomicUsize = AtomicUsize::new(0);
static TAMPER_SERIAL: Mutex<()> = Mutex::new(());

#[allow(clippy::ptr_arg)] // the simulator's tamper hook takes the Vec (others grow or shrink it)
fn flip_byte_of_packet_three(ordinal: u64, bytes: &mut Vec<u8>) {
    if ordinal == 3 {
        let at = TAMPER_AT.load(Ordering::Relaxed);
        if let Some(byte) = bytes.get_mut(at) {
            *byte ^= 0x5A;
        }
    }
}

#[test]
fn every_tampered_byte_of_a_delivery_record_is_refused_before_anything_is_built() {
    let _serial = TAMPER_SERIAL.lock().unwrap();
    let saved = save_busy_channel(1 << 16);
    for at in 0..56 {
        TAMPER_AT.store(at, Ordering::Relaxed);
        let config = SimConfig {
            tamper_driver_bytes: Some(flip_byte_of_packet_three),
            ..sim()
        };
        let status = restore_on_fresh_sim(config, &saved.record, &saved.chunks).unwrap_err();
        assert!(
            [
                NtStatus::CRC_ERROR,
                NtStatus::DATA_ERROR,
                NtStatus::REVISION_MISMATCH
            ]
            .contains(&status),
            "byte {at}: {status:?}"
        );
    }
}

fn truncate_first(ordinal: u64, bytes: &mut Vec<u8>) {
    if ordinal == 0 {
        bytes.truncate(bytes.len() / 2);
    }
}

fn nonzero_padding(ordinal: u64, bytes: &mut Vec<u8>) {
    if ordinal == 1 {
        bytes.extend_from_slice(&[0, 0, 1]);
    }
}

fn zero_padding(_: u64, bytes: &mut Vec<u8>) {
    bytes.extend_from_slice(&[0; 40]);
}

fn emptied(ordinal: u64, bytes: &mut Vec<u8>) {
    if ordinal == 5 {
        bytes.clear();
    }
}

#[test]
fn truncated_padded_and_missing_driver_bytes() {
    let saved = save_busy_channel(4096);
    let run = |tamper: fn(u64, &mut Vec<u8>)| {
        restore_on_fresh_sim(
            SimConfig {
                tamper_driver_bytes: Some(tamper),
                ..sim()
            },
            &saved.record,
            &saved.chunks,
        )
    };
    assert_eq!(run(truncate_first), Err(NtStatus::DATA_ERROR));
    assert_eq!(run(nonzero_padding), Err(NtStatus::DATA_ERROR));
    assert_eq!(run(emptied), Err(NtStatus::DATA_ERROR));
    // Zero padding is what a restore may legitimately hand back.
    assert_eq!(run(zero_padding), Ok(()));
}

#[test]
fn corrupted_reordered_dropped_and_duplicated_chunks_are_refused() {
    let saved = save_busy_channel(256);
    assert!(saved.chunks.len() >= 3);
    let mut flipped = saved.chunks.clone();
    flipped[1][20] ^= 1;
    let mut reordered = saved.chunks.clone();
    reordered.swap(0, 1);
    let mut dropped = saved.chunks.clone();
    dropped.remove(1);
    let mut duplicated = saved.chunks.clone();
    duplicated.insert(1, saved.chunks[0].clone());
    let mut truncated = saved.chunks.clone();
    truncated[0].truncate(10);
    for (name, chunks) in [
        ("flipped", flipped),
        ("reordered", reordered),
        ("dropped", dropped),
        ("duplicated", duplicated),
        ("truncated", truncated),
    ] {
        let result = restore_on_fresh_sim(sim(), &saved.record, &chunks);
        assert!(result.is_err(), "{name} chunks were accepted");
        assert_ne!(
            result,
            Err(NtStatus::MORE_PROCESSING_REQUIRED),
            "{name}: not detected"
        );
    }
    // The last chunk missing: the restore never completes.
    let short = &saved.chunks[..saved.chunks.len() - 1];
    assert_eq!(
        restore_on_fresh_sim(sim(), &saved.record, short),
        Err(NtStatus::MORE_PROCESSING_REQUIRED)
    );
}

#[test]
fn a_corrupted_channel_record_is_refused() {
    let saved = save_busy_channel(4096);
    for at in 0..saved.record.len() {
        let mut record = saved.record.clone();
        record[at] ^= 0x80;
        let status = restore_on_fresh_sim(sim(), &record, &saved.chunks).unwrap_err();
        assert!(
            [
                NtStatus::CRC_ERROR,
                NtStatus::DATA_ERROR,
                NtStatus::REVISION_MISMATCH
            ]
            .contains(&status),
            "byte {at}: {status:?}"
        );
    }
    // Restoring the chunks without the record first is refused too.
    assert_eq!(
        restore_on_fresh_sim(sim(), &[], &saved.chunks),
        Err(NtStatus::DATA_ERROR)
    );
}

#[test]
fn packet_allocation_failure_at_every_point_of_a_restore() {
    let saved = save_busy_channel(4096);
    for nth in 1..=u64::from(IN_FLIGHT) {
        let config = SimConfig {
            faults: FaultPlan::new().fail_nth_packet_allocate(nth),
            ..sim()
        };
        assert_eq!(
            restore_on_fresh_sim(config, &saved.record, &saved.chunks),
            Err(NtStatus::INSUFFICIENT_RESOURCES),
            "allocation {nth}"
        );
    }
}

#[test]
fn packet_restore_failure_frees_only_that_packet() {
    let saved = save_busy_channel(4096);
    for nth in [1, 7, u64::from(IN_FLIGHT)] {
        let config = SimConfig {
            faults: FaultPlan::new().fail_nth(
                KmclCall::PacketRestore,
                nth,
                NtStatus::INVALID_PARAMETER,
            ),
            ..sim()
        };
        assert_eq!(
            restore_on_fresh_sim(config, &saved.record, &saved.chunks),
            Err(NtStatus::INVALID_PARAMETER),
            "VmbPacketRestore {nth}"
        );
    }
}

#[test]
fn every_failing_bring_up_call_unwinds_cleanly() {
    let calls = [
        KmclCall::ChannelAllocate,
        KmclCall::ServerChannelInitSetTargetInterfaceId,
        KmclCall::ServerChannelInitSetFlags,
        KmclCall::ChannelInitSetMaximumPacketSize,
        KmclCall::ChannelInitSetFriendlyName,
        KmclCall::ChannelInitSetProcessPacketCallbacks,
        KmclCall::ChannelInitSetStateChangeCallbacks,
        KmclCall::ServerChannelInitSetSaveRestorePacketCallbacks,
        KmclCall::ChannelEnable,
    ];
    for call in calls {
        let kmcl = Kmcl::new(SimConfig {
            faults: FaultPlan::new().fail_nth(call, 1, NtStatus::INSUFFICIENT_RESOURCES),
            ..sim()
        });
        {
            let interface = query_server_interface(&kmcl).unwrap();
            let result = VspChannel::<Lock>::create(&interface, &channel_config(&kmcl, 4, 64));
            assert_eq!(
                result.err(),
                Some(NtStatus::INSUFFICIENT_RESOURCES),
                "{call:?}"
            );
        }
        assert_eq!(kmcl.finish(), Vec::new(), "{call:?}");
    }
}

fn negotiate_bytes(min: u32, max: u32) -> Vec<u8> {
    NegotiateRequest {
        header: Header::new(Kind::NegotiateRequest, size_of::<NegotiateRequest>()),
        min_version: min.into(),
        max_version: max.into(),
    }
    .as_bytes()
    .to_vec()
}

#[test]
fn malformed_guest_packets_get_precise_answers_and_garbling_is_recovered() {
    let kmcl = Kmcl::new(sim());
    {
        let interface = query_server_interface(&kmcl).unwrap();
        let guest = Guest::new(
            vmbsrv_testkit::migration::SCENARIO_INTERFACE_TYPE,
            vmbsrv_testkit::migration::SCENARIO_INSTANCE,
        );
        kmcl.attach_guest(&guest).unwrap();
        let channel: VspChannel<'_, Lock> =
            VspChannel::create(&interface, &channel_config(&kmcl, 8, 64)).unwrap();
        guest.open().unwrap();
        kmcl.wait_idle();
        let ask = |bytes: &[u8]| {
            let id = guest.send_request(bytes).unwrap();
            kmcl.wait_idle();
            guest.wait_reply(id, Duration::from_secs(5))
        };
        let error_status = |reply: Option<Reply>| match reply {
            Some(Reply::Completed(bytes)) => {
                let reply: protocol::ErrorReply =
                    zerocopy::FromBytes::read_from_bytes(bytes.as_slice()).unwrap();
                NtStatus(reply.status.get())
            }
            other => panic!("expected an error reply, got {other:?}"),
        };
        // Well framed but invalid: answered with a status, the queue keeps running.
        assert_eq!(
            error_status(ask(&negotiate_bytes(9, 3))),
            NtStatus::INVALID_PARAMETER
        );
        assert_eq!(
            error_status(ask(&negotiate_bytes(0x0009_0000, 0x000A_0000))),
            NtStatus::REVISION_MISMATCH
        );
        let mut unknown = negotiate_bytes(1, 1);
        unknown[4] = 0x33;
        assert_eq!(
            error_status(ask(&unknown)),
            NtStatus::INVALID_DEVICE_REQUEST
        );
        // Garbled framing: an error reply (never VmbChannelPacketFail, whose effect on the packet
        // is undocumented), and the queue keeps running.
        let mut garbled = negotiate_bytes(1, 1);
        garbled[0] ^= 0xFF;
        assert_eq!(error_status(ask(&garbled)), NtStatus::DATA_ERROR);
        let stats = channel.statistics().stats;
        assert_eq!((stats.guest_bad_requests, stats.guest_garbled), (3, 1));
        let pending = guest
            .send_request(&negotiate_bytes(
                protocol::VERSION_1_0,
                protocol::VERSION_1_0,
            ))
            .unwrap();
        assert!(matches!(
            guest.wait_reply(pending, Duration::from_secs(5)),
            Some(Reply::Completed(_))
        ));
        // The old recovery request still works (a pause and a start).
        channel.restart_incoming().unwrap();
        assert_eq!(channel.statistics().protocol_version, protocol::VERSION_1_0);
        // Garbage acknowledgements are recorded as such, exactly once each.
        let payload = [7u8; 10];
        let sequence = channel
            .post(&PostRequest {
                tag: 1,
                payload: &payload,
                posted_at: 0,
                trace_id: None,
            })
            .unwrap();
        kmcl.wait_idle();
        let packet = guest.receive().unwrap();
        let txid = packet.txid.unwrap();
        guest.complete(txid, b"not an ack").unwrap();
        guest
            .send_completion(txid, &protocol::encode_ack(sequence, 0, 0))
            .unwrap();
        kmcl.wait_idle();
        let mut outcomes = [Outcome {
            sequence: 0,
            tag: 0,
            kind: OutcomeKind::Acked,
            attempts: 0,
        }; 4];
        assert_eq!(channel.drain_outcomes(&mut outcomes), 1);
        assert_eq!(outcomes[0].kind, OutcomeKind::BadAck);
        assert_eq!(
            guest.ignored_completions(),
            1,
            "the duplicate completion never reached the VSP"
        );
        channel.disable().unwrap();
        kmcl.wait_idle();
    }
    assert_eq!(kmcl.finish(), Vec::new());
}

#[test]
fn a_corrupted_payload_is_reported_as_corrupted() {
    let kmcl = Kmcl::new(sim());
    {
        let interface = query_server_interface(&kmcl).unwrap();
        let mut guest = GuestModel::new(Guest::new(
            vmbsrv_testkit::migration::SCENARIO_INTERFACE_TYPE,
            vmbsrv_testkit::migration::SCENARIO_INSTANCE,
        ));
        kmcl.attach_guest(&guest.endpoint).unwrap();
        let channel: VspChannel<'_, Lock> =
            VspChannel::create(&interface, &channel_config(&kmcl, 8, 64)).unwrap();
        guest.open_and_negotiate(&kmcl).unwrap();
        let payload = [1u8, 2, 3];
        let sequence = channel
            .post(&PostRequest {
                tag: 9,
                payload: &payload,
                posted_at: 0,
                trace_id: None,
            })
            .unwrap();
        kmcl.wait_idle();
        let mut ledger = Ledger::new();
        ledger.posted(sequence, Posted::new(9, &payload));
        assert_eq!(guest.pump(&mut ledger), 1);
        let txid = guest.endpoint.awaiting_completion()[0];
        // The guest claims it saw different bytes.
        guest
            .endpoint
            .complete(txid, &protocol::encode_ack(sequence, 0, 0xBAD))
            .unwrap();
        kmcl.wait_idle();
        let mut outcomes = [Outcome {
            sequence: 0,
            tag: 0,
            kind: OutcomeKind::Acked,
            attempts: 0,
        }; 2];
        assert_eq!(channel.drain_outcomes(&mut outcomes), 1);
        assert_eq!(outcomes[0].kind, OutcomeKind::Corrupted);
        assert_eq!(channel.statistics().corrupted, 1);
        channel.disable().unwrap();
        kmcl.wait_idle();
    }
    assert_eq!(kmcl.finish(), Vec::new());
}

#[test]
fn teardown_in_the_middle_of_a_save_ends_the_save_first() {
    for disable_explicitly in [true, false] {
        let kmcl = Kmcl::new(sim());
        {
            let interface = query_server_interface(&kmcl).unwrap();
            let guest = GuestModel::new(Guest::new(
                vmbsrv_testkit::migration::SCENARIO_INTERFACE_TYPE,
                vmbsrv_testkit::migration::SCENARIO_INSTANCE,
            ));
            kmcl.attach_guest(&guest.endpoint).unwrap();
            let channel: VspChannel<'_, Lock> =
                VspChannel::create(&interface, &channel_config(&kmcl, 8, 64)).unwrap();
            guest.open_and_negotiate(&kmcl).unwrap();
            for tag in 0..5 {
                channel
                    .post(&PostRequest {
                        tag,
                        payload: &[1, 2, 3],
                        posted_at: 0,
                        trace_id: None,
                    })
                    .unwrap();
            }
            kmcl.wait_idle();
            channel.save_begin().unwrap();
            let mut buffer = [0u8; 64];
            channel.save_continue(&mut buffer).unwrap();
            // A save cut short cannot be used for a migration.
            assert_eq!(
                channel.complete_migration(),
                Err(NtStatus::INVALID_DEVICE_STATE)
            );
            if disable_explicitly {
                channel.disable().unwrap();
                kmcl.wait_idle();
                assert_eq!(channel.statistics().stats.cancelled, 5);
            }
        }
        assert_eq!(
            kmcl.finish(),
            Vec::new(),
            "disable_explicitly = {disable_explicitly}"
        );
    }
}
