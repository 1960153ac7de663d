//! Version skew through the VSP path, not just the decoder: saved state written by other builds
//! handed to a fresh channel's restore over the simulator.
//!
//! * Every golden blob of every format version (only v1 exists: `tests/golden/*.bin`) restores on
//!   this build: the delivery records are handed to the restore callback in place of the driver
//!   bytes of a real save (`SimConfig::tamper_driver_bytes`) and must be rebuilt with exactly
//!   their values; the channel record is restored ahead of a real save's chunks.
//! * A save written by this build with an extra **optional** extension in the private tag range
//!   (what a newer build adds) — in every delivery record and in the channel record — restores
//!   and then delivers exactly once.
//! * An unknown **critical** extension is refused cleanly: `STATUS_REVISION_MISMATCH`, nothing
//!   half-built, no leak (`Kmcl::finish` reports no violation), what was rebuilt before it comes
//!   back cancelled.

use std::cell::RefCell;

use kmcl_sim::{Guest, Kmcl, RestoreSaveBufSize, SimConfig};
use vmbsrv::kmcl::NtStatus;
use vmbsrv::saved::stream::{FrameKind, FrameReader};
use vmbsrv::saved::{
    ChannelRecord, ChannelStats, DeliveryRecord, Extension, MAX_RECORD_LEN, PRIVATE_TAG_MIN,
};
use vmbsrv::vsp::protocol::VERSION_1_0;
use vmbsrv::vsp::{Outcome, OutcomeKind, Phase, PostRequest, RestoreProgress, VspChannel};
use vmbsrv_testkit::fixtures::split_stream;
use vmbsrv_testkit::migration::{
    Lock, SCENARIO_INSTANCE, SCENARIO_INTERFACE_TYPE, channel_config, query_server_interface,
    save_channel,
};
use vmbsrv_testkit::{GuestModel, Ledger, MigrationConfig, Posted};

const MIN: &[u8] = include_bytes!("golden/delivery_v1_min.bin");
const TRACE: &[u8] = include_bytes!("golden/delivery_v1_trace.bin");
const PADDED: &[u8] = include_bytes!("golden/delivery_v1_padded.bin");
const UNKNOWN_OPTIONAL: &[u8] = include_bytes!("golden/delivery_v1_unknown_optional.bin");
const UNKNOWN_CRITICAL: &[u8] = include_bytes!("golden/delivery_v1_unknown_critical.bin");
const CHANNEL: &[u8] = include_bytes!("golden/channel_v1.bin");
const STREAM: &[u8] = include_bytes!("golden/stream_v1.bin");

/// The source channel's limits.
const SOURCE_IN_FLIGHT: u32 = 24;
const SOURCE_MESSAGE: u32 = 64;

// ---- the tamper hook: per test thread (restore callbacks run on the caller's thread) ---------

type Tamper = Box<dyn Fn(u64, &mut Vec<u8>)>;

std::thread_local! {
    static TAMPER: RefCell<Option<Tamper>> = const { RefCell::new(None) };
}

fn tamper_hook(ordinal: u64, bytes: &mut Vec<u8>) {
    // The destination restores a blob as a build before save identities wrote it
    // (docs/saved-state.md §4): the channel records these tests build carry no identity, so
    // neither may the deliveries (a mix is refused as another save's chunks).
    if let Ok((record, Some(_))) = DeliveryRecord::decode_saved(bytes) {
        let len = bytes.len();
        *bytes = encode_delivery(&record, &[]);
        bytes.resize(len.max(bytes.len()), 0);
    }
    TAMPER.with(|tamper| {
        if let Some(tamper) = tamper.borrow().as_ref() {
            tamper(ordinal, bytes);
        }
    });
}

/// Simulator settings whose restore hands the driver bytes through `tamper` first.
fn tampering(tamper: impl Fn(u64, &mut Vec<u8>) + 'static, padded: bool) -> SimConfig {
    TAMPER.with(|slot| *slot.borrow_mut() = Some(Box::new(tamper)));
    SimConfig {
        tamper_driver_bytes: Some(tamper_hook),
        restore_save_buf_size: if padded {
            RestoreSaveBufSize::PaddedWithZeros
        } else {
            RestoreSaveBufSize::AsReported
        },
        ..MigrationConfig::sim_for(SOURCE_IN_FLIGHT)
    }
}

fn plain() -> SimConfig {
    TAMPER.with(|slot| *slot.borrow_mut() = None);
    MigrationConfig::sim_for(SOURCE_IN_FLIGHT)
}

// ---- a real save ---------------------------------------------------------------------------

/// A channel saved with `in_flight` deliveries in flight: `in_flight + 1` were posted, the guest
/// read what its ring held (16 at most) and acknowledged one of them before the save.
struct Source {
    guest: GuestModel,
    ledger: Ledger,
    record: Vec<u8>,
    chunks: Vec<Vec<u8>>,
    posts: u64,
}

fn source(in_flight: u64) -> Source {
    let posts = in_flight + 1;
    let mut guest = GuestModel::new(Guest::new(SCENARIO_INTERFACE_TYPE, SCENARIO_INSTANCE));
    let mut ledger = Ledger::new();
    let kmcl = Kmcl::new(plain());
    let stream = {
        let interface = query_server_interface(&kmcl).unwrap();
        kmcl.attach_guest(&guest.endpoint).unwrap();
        let channel: VspChannel<'_, Lock> = VspChannel::create(
            &interface,
            &channel_config(&kmcl, SOURCE_IN_FLIGHT, SOURCE_MESSAGE),
        )
        .unwrap();
        guest.open_and_negotiate(&kmcl).unwrap();
        for tag in 0..posts {
            let payload = vec![tag as u8; 1 + (tag as usize * 3) % SOURCE_MESSAGE as usize];
            let sequence = channel
                .post(&PostRequest {
                    tag,
                    payload: &payload,
                    posted_at: tag,
                    trace_id: (tag % 2 == 0).then_some([tag as u8; 16]),
                })
                .unwrap();
            ledger.posted(sequence, Posted::new(tag, &payload));
        }
        kmcl.wait_idle();
        guest.pump(&mut ledger);
        guest.acknowledge(1, None);
        kmcl.wait_idle();
        drain(&channel, &mut ledger);
        let (stream, _, _) = save_channel(&channel, 128).unwrap();
        guest.endpoint.detach();
        channel.complete_migration().unwrap();
        kmcl.wait_idle();
        drain(&channel, &mut ledger);
        stream
    };
    assert_eq!(kmcl.finish(), Vec::new());
    let (record, chunks) = split_stream(&stream);
    assert!(chunks.len() > 1);
    Source {
        guest,
        ledger,
        record,
        chunks,
        posts,
    }
}

fn drain(channel: &VspChannel<'_, Lock>, ledger: &mut Ledger) -> Vec<Outcome> {
    let mut all = Vec::new();
    let mut batch = [Outcome {
        sequence: 0,
        tag: 0,
        kind: OutcomeKind::Acked,
        attempts: 0,
    }; 16];
    loop {
        let count = channel.drain_outcomes(&mut batch);
        for outcome in &batch[..count] {
            ledger.outcome(outcome);
        }
        all.extend_from_slice(&batch[..count]);
        if count < batch.len() {
            return all;
        }
    }
}

fn encode_channel(record: &ChannelRecord, extensions: &[Extension<'_>]) -> Vec<u8> {
    let mut bytes = vec![0u8; MAX_RECORD_LEN];
    let len = record
        .encode_with_extensions(extensions, &mut bytes)
        .unwrap();
    bytes.truncate(len);
    bytes
}

fn encode_delivery(record: &DeliveryRecord, extensions: &[Extension<'_>]) -> Vec<u8> {
    let mut bytes = vec![0u8; MAX_RECORD_LEN];
    let len = record
        .encode_with_extensions(extensions, &mut bytes)
        .unwrap();
    bytes.truncate(len);
    bytes
}

/// What the destination did.
struct Restored {
    /// Every outcome recorded on the destination (after its final disable).
    outcomes: Vec<Outcome>,
    /// The statistics right after `finish_restore`.
    statistics: vmbsrv::vsp::Statistics,
}

/// Restores `record` + `chunks` into a fresh channel (`max_in_flight`, `max_message_len`) on a
/// fresh simulator instance. With a guest, it is attached after `finish_restore`, acknowledges
/// everything, and `post_after` more messages are posted and acknowledged. Any refusal is
/// returned after a full teardown; either way the instance must finish without a violation.
#[allow(clippy::too_many_arguments)]
fn destination(
    config: SimConfig,
    max_in_flight: u32,
    max_message_len: u32,
    record: &[u8],
    chunks: &[Vec<u8>],
    mut guest: Option<(&mut GuestModel, &mut Ledger)>,
    post_after: u64,
) -> Result<Restored, NtStatus> {
    let kmcl = Kmcl::new(config);
    let result = {
        let interface = query_server_interface(&kmcl).unwrap();
        let channel: VspChannel<'_, Lock> = VspChannel::create_for_restore(
            &interface,
            &channel_config(&kmcl, max_in_flight, max_message_len),
        )
        .unwrap();
        let fed = (|| {
            channel.restore_channel_record(record)?;
            let mut complete = false;
            for chunk in chunks {
                complete = channel.restore_chunk(chunk)? == RestoreProgress::Complete;
            }
            assert!(complete, "the chunks of a whole save complete the restore");
            channel.finish_restore()
        })();
        let mut scratch = Ledger::new();
        match fed {
            Err(status) => {
                assert_ne!(channel.phase(), Phase::Running);
                let rebuilt = channel.statistics().in_flight as usize;
                channel.disable().unwrap();
                kmcl.wait_idle();
                let outcomes = drain(&channel, &mut scratch);
                assert_eq!(outcomes.len(), rebuilt, "every rebuilt delivery comes back");
                assert!(outcomes.iter().all(|o| o.kind == OutcomeKind::Migrated));
                Err(status)
            }
            Ok(()) => {
                let statistics = channel.statistics();
                let mut outcomes = Vec::new();
                if let Some((guest, ledger)) = guest.as_mut() {
                    kmcl.attach_guest(&guest.endpoint).unwrap();
                    // Opened / Started / PostStarted run on the simulator's thread.
                    kmcl.wait_idle();
                    for tag in 0..post_after {
                        let payload = [0x5A; 7];
                        let sequence = channel
                            .post(&PostRequest {
                                tag: 1000 + tag,
                                payload: &payload,
                                posted_at: 0,
                                trace_id: None,
                            })
                            .unwrap();
                        ledger.posted(sequence, Posted::new(1000 + tag, &payload));
                    }
                    for _ in 0..100 {
                        kmcl.wait_idle();
                        guest.pump(ledger);
                        guest.acknowledge(usize::MAX, None);
                        kmcl.wait_idle();
                        outcomes.extend(drain(&channel, ledger));
                        if channel.statistics().in_flight == 0 {
                            break;
                        }
                    }
                }
                channel.disable().unwrap();
                kmcl.wait_idle();
                let ledger = match guest.as_mut() {
                    Some((_, ledger)) => &mut **ledger,
                    None => &mut scratch,
                };
                outcomes.extend(drain(&channel, ledger));
                Ok(Restored {
                    outcomes,
                    statistics,
                })
            }
        }
    };
    let violations = kmcl.finish();
    assert!(violations.is_empty(), "{violations:#?}");
    result
}

/// The source's channel record with `next_sequence` raised past every golden sequence number.
fn record_with_room(source: &Source) -> Vec<u8> {
    let mut record = ChannelRecord::decode(&source.record).unwrap();
    record.next_sequence = 0x0102_0304_0506_0709;
    // Restored deliveries are checked against the saved channel's message limit too.
    record.max_message_len = 65536;
    encode_channel(&record, &[])
}

#[test]
fn golden_delivery_records_are_rebuilt_by_the_restore_callback() {
    let source = source(3);
    let record = record_with_room(&source);
    for (name, golden) in [
        ("delivery_v1_min", MIN),
        ("delivery_v1_trace", TRACE),
        ("delivery_v1_padded", PADDED),
        ("delivery_v1_unknown_optional", UNKNOWN_OPTIONAL),
    ] {
        let expected = DeliveryRecord::decode(golden).unwrap();
        for padded in [false, true] {
            let config = tampering(
                move |ordinal, bytes| {
                    if ordinal == 0 {
                        *bytes = golden.to_vec();
                    }
                },
                padded,
            );
            // The minimum golden carries a 64 KiB payload length: the channel must allow it.
            let restored = destination(
                config,
                SOURCE_IN_FLIGHT,
                65536,
                &record,
                &source.chunks,
                None,
                0,
            )
            .unwrap_or_else(|status| panic!("{name} (padded {padded}): {status:?}"));
            assert_eq!(restored.statistics.in_flight, 3, "{name}");
            let outcome = restored
                .outcomes
                .iter()
                .find(|o| o.sequence == expected.sequence)
                .unwrap_or_else(|| panic!("{name}: not rebuilt: {:?}", restored.outcomes));
            assert_eq!(outcome.tag, expected.tag, "{name}");
            assert_eq!(
                outcome.attempts,
                expected.attempts.saturating_add(1),
                "{name}"
            );
            assert_eq!(outcome.kind, OutcomeKind::Cancelled, "{name}");
        }
    }
}

#[test]
fn a_golden_critical_extension_is_refused_cleanly() {
    let source = source(3);
    let record = record_with_room(&source);
    // At the first packet (nothing rebuilt yet) and at the last (two rebuilt before it).
    for at in [0u64, 2] {
        let config = tampering(
            move |ordinal, bytes| {
                if ordinal == at {
                    *bytes = UNKNOWN_CRITICAL.to_vec();
                }
            },
            false,
        );
        assert_eq!(
            destination(
                config,
                SOURCE_IN_FLIGHT,
                65536,
                &record,
                &source.chunks,
                None,
                0
            )
            .err(),
            Some(NtStatus::REVISION_MISMATCH),
            "critical extension at packet {at}"
        );
    }
}

/// The golden channel record (also the record inside `stream_v1.bin`) ahead of a real save of
/// its 17 deliveries. Its protocol version, 0x0003_0004, is one this build does not speak, so —
/// as docs/saved-state.md specifies — the VSP refuses it with `STATUS_REVISION_MISMATCH` before
/// taking anything over, and nothing is left behind. (The next test restores the same record with
/// a spoken version and checks every other field.)
#[test]
fn the_golden_channel_record_is_checked_by_the_vsp() {
    let golden = ChannelRecord::decode(CHANNEL).unwrap();
    let frame = FrameReader::new(STREAM).unwrap().next().unwrap().unwrap();
    assert_eq!(
        (frame.kind, frame.payload),
        (FrameKind::ChannelRecord, CHANNEL)
    );
    let source = source(u64::from(golden.in_flight));
    let result = destination(
        plain(),
        golden.max_in_flight,
        golden.max_message_len,
        CHANNEL,
        &source.chunks,
        None,
        0,
    );
    assert_eq!(result.err(), Some(NtStatus::REVISION_MISMATCH));
}

/// The golden channel record with its protocol version set to one this build speaks (and the
/// checksum re-sealed): every other field is taken over exactly, and delivery continues exactly
/// once.
#[test]
fn the_golden_channel_record_with_a_spoken_protocol_version_restores_exactly() {
    let mut golden = ChannelRecord::decode(CHANNEL).unwrap();
    golden.protocol_version = VERSION_1_0;
    let record = encode_channel(&golden, &[]);
    let mut source = source(u64::from(golden.in_flight));
    let restored = destination(
        tampering(|_, _| {}, false),
        golden.max_in_flight,
        golden.max_message_len,
        &record,
        &source.chunks,
        Some((&mut source.guest, &mut source.ledger)),
        2,
    )
    .unwrap();
    assert_golden_state(&restored, &golden);
    let verdict = source.ledger.verdict();
    assert!(verdict.is_clean(), "{verdict:?}");
    assert_eq!(verdict.delivered, source.posts + 2);
}

fn assert_golden_state(restored: &Restored, golden: &ChannelRecord) {
    let statistics = restored.statistics;
    assert_eq!(statistics.in_flight, golden.in_flight);
    assert_eq!(statistics.next_sequence, golden.next_sequence);
    assert_eq!(statistics.protocol_version, golden.protocol_version);
    assert_eq!(statistics.stats, golden.stats);
    // The two posts after the restore continue the golden's sequence numbers.
    let mut posted_after: Vec<u64> = restored
        .outcomes
        .iter()
        .map(|o| o.sequence)
        .filter(|s| *s >= golden.next_sequence)
        .collect();
    posted_after.sort_unstable();
    assert_eq!(
        posted_after,
        [golden.next_sequence, golden.next_sequence + 1]
    );
}

#[test]
fn optional_extensions_from_a_newer_build_restore_and_deliver_exactly_once() {
    let mut source = source(12);
    let future = [Extension {
        tag: PRIVATE_TAG_MIN + 0x10,
        critical: false,
        data: b"a field only a newer build understands",
    }];
    let channel = ChannelRecord::decode(&source.record).unwrap();
    let record = encode_channel(&channel, &future);
    assert!(record.len() > ChannelRecord::ENCODED_LEN);
    let config = tampering(
        |_, bytes| {
            let delivery = DeliveryRecord::decode(bytes).unwrap();
            *bytes = encode_delivery(
                &delivery,
                &[Extension {
                    tag: PRIVATE_TAG_MIN + 0x11,
                    critical: false,
                    data: &[0xEE; 200],
                }],
            );
        },
        true,
    );
    let restored = destination(
        config,
        SOURCE_IN_FLIGHT,
        SOURCE_MESSAGE,
        &record,
        &source.chunks,
        Some((&mut source.guest, &mut source.ledger)),
        3,
    )
    .unwrap();
    assert_eq!(restored.statistics.stats, channel.stats);
    assert_eq!(restored.statistics.in_flight, channel.in_flight);
    let verdict = source.ledger.verdict();
    assert!(verdict.is_clean(), "{verdict:?}");
    assert_eq!(verdict.delivered, source.posts + 3);
}

#[test]
fn critical_extensions_are_refused_cleanly() {
    let source = source(6);
    let must_understand = [Extension {
        tag: PRIVATE_TAG_MIN + 0x12,
        critical: true,
        data: b"must understand",
    }];
    // In the channel record: refused before any chunk.
    let channel = ChannelRecord::decode(&source.record).unwrap();
    let record = encode_channel(&channel, &must_understand);
    assert_eq!(
        destination(
            plain(),
            SOURCE_IN_FLIGHT,
            SOURCE_MESSAGE,
            &record,
            &source.chunks,
            None,
            0
        )
        .err(),
        Some(NtStatus::REVISION_MISMATCH)
    );
    // In every delivery record, or only in the fourth: refused, and the deliveries rebuilt
    // before it come back cancelled (checked by `destination`). The record is written as the
    // tampered deliveries are, without a save identity.
    let legacy_record = encode_channel(&channel, &[]);
    for only in [None, Some(3u64)] {
        let config = tampering(
            move |ordinal, bytes| {
                if only.is_none_or(|at| at == ordinal) {
                    let delivery = DeliveryRecord::decode(bytes).unwrap();
                    *bytes = encode_delivery(&delivery, &must_understand);
                }
            },
            false,
        );
        assert_eq!(
            destination(
                config,
                SOURCE_IN_FLIGHT,
                SOURCE_MESSAGE,
                &legacy_record,
                &source.chunks,
                None,
                0
            )
            .err(),
            Some(NtStatus::REVISION_MISMATCH),
            "critical extension in {only:?}"
        );
    }
}

/// The counters a v1 record carries are exactly the ones this build persists (a field added to
/// `ChannelStats` without a format change would be silently dropped by a restore).
#[test]
fn channel_stats_are_the_v1_fields() {
    let ChannelStats {
        posted: _,
        acked: _,
        nacked: _,
        cancelled: _,
        bad_acks: _,
        guest_requests: _,
        guest_bad_requests: _,
        guest_garbled: _,
    } = ChannelRecord::decode(CHANNEL).unwrap().stats;
}
