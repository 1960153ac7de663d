//! Seed corpora for the cargo-fuzz targets, built from real runs of the driver over the simulator.
//!
//! `scripts/fuzz.sh` runs this (`cargo test --test reliability_fuzz_seeds --
//! --ignored`); it writes into `fuzz/corpus/<target>/` (gitignored), or under
//! `$VMBSRV_FUZZ_CORPUS` if set. The input formats are the fuzz targets' own
//! (`fuzz/common/inputs.rs`, included here so both sides always agree). The non-ignored test
//! checks that the formats round-trip, so a change to one side cannot silently break seeding.

#[path = "../fuzz/common/inputs.rs"]
mod inputs;

use std::fs;
use std::path::PathBuf;

use inputs::{
    ControlStep, GuestOp, RESTORE_FINISH, RESTORE_PADDED_SAVE_BUF, RESTORE_REAL_CHUNKS,
    RESTORE_REAL_RECORD, RESTORE_RESET_CONTEXT, RESTORE_SEAL_OVERRIDES, RESTORE_SEAL_RECORD,
    RestoreInput,
};
use kmcl_sim::{Guest, Kmcl};
use vmbsrv::saved::{DeliveryRecord, Extension, PRIVATE_TAG_MIN};
use vmbsrv::vsp::control::ControlOp;
use vmbsrv::vsp::control::wire::{
    self, CREATE_MODE_FOR_RESTORE, CREATE_MODE_START, ChannelDataRequest, ChannelRequest,
    CreateChannelRequest, FetchOutcomesRequest, PostMessageRequest, RequestHeader,
};
use vmbsrv::vsp::protocol::{self, Header, Kind, NegotiateRequest};
use vmbsrv::vsp::{PostRequest, VspChannel};
use vmbsrv_testkit::fixtures::split_stream;
use vmbsrv_testkit::migration::{
    Lock, SCENARIO_INSTANCE, SCENARIO_INTERFACE_TYPE, channel_config, query_server_interface,
    save_channel,
};
use vmbsrv_testkit::{GuestModel, Ledger, MigrationConfig};
use zerocopy::IntoBytes;

/// A save taken from a real channel: stream, channel record and KMCL chunks.
struct RealSave {
    stream: Vec<u8>,
    record: Vec<u8>,
    chunks: Vec<Vec<u8>>,
}

/// Saves a channel with `posts` deliveries in flight (the guest read the first half) in
/// `chunk_size`-byte chunks, through the scenario helpers.
fn real_save(posts: u64, chunk_size: usize) -> RealSave {
    let kmcl = Kmcl::new(MigrationConfig::sim_for(8));
    let stream = {
        let interface = query_server_interface(&kmcl).unwrap();
        let mut guest = GuestModel::new(Guest::new(SCENARIO_INTERFACE_TYPE, SCENARIO_INSTANCE));
        kmcl.attach_guest(&guest.endpoint).unwrap();
        let channel: VspChannel<'_, Lock> =
            VspChannel::create(&interface, &channel_config(&kmcl, 8, 64)).unwrap();
        guest.open_and_negotiate(&kmcl).unwrap();
        let mut ledger = Ledger::new();
        for tag in 0..posts {
            let payload = vec![0x40 + tag as u8; 3 + 5 * tag as usize];
            channel
                .post(&PostRequest {
                    tag,
                    payload: &payload,
                    posted_at: 1000 + tag,
                    trace_id: (tag % 2 == 1).then_some([tag as u8; 16]),
                })
                .unwrap();
            if tag + 1 == posts / 2 {
                kmcl.wait_idle();
                guest.pump(&mut ledger);
            }
        }
        kmcl.wait_idle();
        let (stream, _, _) = save_channel(&channel, chunk_size).unwrap();
        guest.endpoint.detach();
        channel.complete_migration().unwrap();
        drop(channel);
        stream
    };
    assert_eq!(kmcl.finish(), Vec::new());
    let (record, chunks) = split_stream(&stream);
    RealSave {
        stream,
        record,
        chunks,
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

fn statistics_bytes() -> Vec<u8> {
    Header::new(Kind::StatisticsRequest, protocol::HEADER_LEN)
        .as_bytes()
        .to_vec()
}

fn delivery_record(sequence: u64, attempts: u16, trace: bool) -> DeliveryRecord {
    DeliveryRecord {
        sequence,
        tag: sequence.wrapping_mul(10),
        posted_at: 7,
        payload_len: 9,
        payload_crc: 0x1234_5678,
        attempts,
        trace_id: trace.then_some([0xAB; 16]),
    }
}

fn encode_record(record: &DeliveryRecord, extensions: &[Extension<'_>]) -> Vec<u8> {
    let mut buffer = vec![0u8; vmbsrv::saved::MAX_RECORD_LEN];
    let len = record
        .encode_with_extensions(extensions, &mut buffer)
        .unwrap();
    buffer.truncate(len);
    buffer
}

fn golden(name: &str) -> Vec<u8> {
    fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(name),
    )
    .unwrap()
}

fn guest_packets_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use GuestOp::*;
    let v1 = protocol::VERSION_1_0;
    let ack = |pick| Ack {
        pick,
        status: 0,
        crc_xor: 0,
    };
    let mut garbled = negotiate_bytes(v1, v1);
    garbled[0] ^= 0xFF;
    let seeds: Vec<(&str, Vec<GuestOp>)> = vec![
        (
            "requests",
            vec![
                Request(negotiate_bytes(v1, v1)),
                Request(statistics_bytes()),
                Request(negotiate_bytes(9, 3)),
                Request(negotiate_bytes(0x0009_0000, 0x000A_0000)),
            ],
        ),
        (
            "post-receive-ack",
            vec![
                Post { len: 10 },
                Post { len: 64 },
                Post { len: 1 },
                Receive,
                ack(0),
                ack(1),
                ack(0),
            ],
        ),
        (
            "nack-and-corrupted",
            vec![
                Post { len: 5 },
                Post { len: 6 },
                Receive,
                Ack {
                    pick: 0,
                    status: 0xC000_0001,
                    crc_xor: 0,
                },
                Ack {
                    pick: 0,
                    status: 0,
                    crc_xor: 1,
                },
            ],
        ),
        (
            "bad-and-duplicate-completions",
            vec![
                Post { len: 7 },
                Receive,
                Complete {
                    pick: 0,
                    payload: b"not an ack".to_vec(),
                },
                RawCompletion {
                    pick: 0,
                    txid: 0,
                    payload: protocol::encode_ack(1, 0, 0).to_vec(),
                },
                RawCompletion {
                    pick: 255,
                    txid: 0xDEAD_BEEF,
                    payload: Vec::new(),
                },
            ],
        ),
        (
            "close-reopen",
            vec![
                Post { len: 3 },
                Post { len: 4 },
                Receive,
                Reopen,
                Post { len: 5 },
                Receive,
                ack(0),
            ],
        ),
        (
            "garbled-then-restart",
            vec![
                Request(garbled),
                Request(statistics_bytes()),
                RestartIncoming,
                Request(statistics_bytes()),
            ],
        ),
        (
            "save-and-resume",
            vec![
                Post { len: 20 },
                Post { len: 30 },
                Post { len: 40 },
                Receive,
                ack(0),
                SaveAndResume { chunk: 64 },
                Post { len: 8 },
                Receive,
                ack(0),
                ack(0),
                ack(0),
            ],
        ),
        (
            "fill-to-quota",
            std::iter::repeat_n(Post { len: 12 }, 10)
                .chain([Receive, ack(0), ack(0), ack(0), Post { len: 1 }])
                .collect(),
        ),
    ];
    seeds
        .into_iter()
        .map(|(name, ops)| (name, inputs::encode_guest_ops(&ops)))
        .collect()
}

fn ioctl(op: ControlOp, input: Vec<u8>, output_len: u16, id_pick: Option<u8>) -> ControlStep {
    let code_pick = ControlOp::ALL.iter().position(|o| *o == op).unwrap() as u8;
    ControlStep::Ioctl {
        owner: 0,
        code_pick,
        raw_code: 0,
        patch_id: id_pick.is_some(),
        id_pick: id_pick.unwrap_or(0),
        buffered: false,
        output_len,
        input,
    }
}

fn control_seeds(save: &RealSave) -> Vec<(&'static str, Vec<u8>)> {
    let create = |mode| {
        CreateChannelRequest::new(
            0x1234,
            SCENARIO_INTERFACE_TYPE,
            SCENARIO_INSTANCE,
            8,
            64,
            0,
            mode,
        )
        .as_bytes()
        .to_vec()
    };
    let channel = |op, pick, out| {
        ioctl(
            op,
            ChannelRequest::new(0).as_bytes().to_vec(),
            out,
            Some(pick),
        )
    };
    let post = |pick: u8, len: u32| {
        let mut input =
            PostMessageRequest::new(0, 5, len.is_multiple_of(2).then_some([1; 16]), len)
                .as_bytes()
                .to_vec();
        input.extend(std::iter::repeat_n(0x61u8, len as usize));
        ioctl(ControlOp::PostMessage, input, 24, Some(pick))
    };
    let data = |op, pick, bytes: &[u8]| {
        let mut input = ChannelDataRequest::new(0, bytes.len() as u32)
            .as_bytes()
            .to_vec();
        input.extend_from_slice(bytes);
        ioctl(op, input, 24, Some(pick))
    };
    let fetch = |pick| {
        ioctl(
            ControlOp::FetchOutcomes,
            FetchOutcomesRequest::new(0, 16).as_bytes().to_vec(),
            24 + 16 * 24,
            Some(pick),
        )
    };
    let mut restore = vec![
        ioctl(
            ControlOp::CreateChannel,
            create(CREATE_MODE_START),
            24,
            None,
        ),
        ControlStep::GuestOpen,
        post(0, 8),
        post(0, 9),
        ControlStep::GuestAckAll,
        post(0, 10),
        channel(ControlOp::SaveBegin, 0, 512),
        channel(ControlOp::SaveContinue, 0, 4096),
        channel(ControlOp::SaveEnd, 0, 16),
        channel(ControlOp::CompleteMigration, 0, 16),
        fetch(0),
        ioctl(
            ControlOp::CreateChannel,
            create(CREATE_MODE_FOR_RESTORE),
            24,
            None,
        ),
        data(ControlOp::RestoreChannelRecord, 1, &save.record),
    ];
    for chunk in &save.chunks {
        restore.push(data(ControlOp::RestoreChunk, 1, chunk));
    }
    restore.extend([
        channel(ControlOp::FinishRestore, 1, 16),
        ControlStep::GuestAckAll,
        fetch(1),
        channel(ControlOp::QueryStatistics, 1, 128),
        channel(ControlOp::DestroyChannel, 1, 24),
    ]);
    let seeds: Vec<(&str, Vec<ControlStep>)> = vec![
        (
            "query-info",
            vec![ioctl(
                ControlOp::QueryInfo,
                RequestHeader::new(wire::REQUEST_HEADER_LEN)
                    .as_bytes()
                    .to_vec(),
                48,
                None,
            )],
        ),
        (
            "post-fetch-destroy",
            vec![
                ioctl(
                    ControlOp::CreateChannel,
                    create(CREATE_MODE_START),
                    24,
                    None,
                ),
                ControlStep::GuestOpen,
                post(0, 1),
                post(0, 64),
                ControlStep::GuestAckAll,
                fetch(0),
                channel(ControlOp::QueryStatistics, 0, 128),
                channel(ControlOp::DisableChannel, 0, 16),
                channel(ControlOp::DestroyChannel, 0, 24),
            ],
        ),
        (
            "save-resume-cleanup",
            vec![
                ioctl(
                    ControlOp::CreateChannel,
                    create(CREATE_MODE_START),
                    24,
                    None,
                ),
                ControlStep::GuestOpen,
                post(0, 3),
                post(0, 4),
                channel(ControlOp::SaveBegin, 0, 512),
                channel(ControlOp::SaveContinue, 0, 24 + 40),
                channel(ControlOp::SaveContinue, 0, 24 + 400),
                channel(ControlOp::Resume, 0, 16),
                channel(ControlOp::SaveBegin, 0, 512),
                ControlStep::Cleanup { owner: 0 },
            ],
        ),
        ("migrate-and-restore", restore),
        (
            // The first finding of this target (tests/reliability_findings.rs): a second
            // SaveContinue after the last chunk. Kept as a regression seed.
            "regression-save-continue-after-last-chunk",
            vec![
                ioctl(
                    ControlOp::CreateChannel,
                    create(CREATE_MODE_START),
                    24,
                    None,
                ),
                ControlStep::GuestOpen,
                post(0, 5),
                channel(ControlOp::SaveBegin, 0, 512),
                channel(ControlOp::SaveContinue, 0, 4096),
                channel(ControlOp::SaveContinue, 0, 4096),
                channel(ControlOp::SaveEnd, 0, 16),
                channel(ControlOp::Resume, 0, 16),
            ],
        ),
    ];
    seeds
        .into_iter()
        .map(|(name, steps)| (name, inputs::encode_control_steps(&steps)))
        .collect()
}

fn restore_seeds(save: &RealSave) -> Vec<(&'static str, Vec<u8>)> {
    let real = |flags, overrides| RestoreInput {
        flags: flags | RESTORE_REAL_RECORD | RESTORE_REAL_CHUNKS,
        record: Vec::new(),
        chunks: Vec::new(),
        overrides,
    };
    let unknown_optional = [Extension {
        tag: PRIVATE_TAG_MIN,
        critical: false,
        data: b"future",
    }];
    let unknown_critical = [Extension {
        tag: PRIVATE_TAG_MIN + 1,
        critical: true,
        data: b"future",
    }];
    let seeds = vec![
        (
            "explicit-save-finish",
            RestoreInput {
                flags: RESTORE_FINISH,
                record: save.record.clone(),
                chunks: save.chunks.clone(),
                overrides: Vec::new(),
            },
        ),
        (
            "explicit-save-padded-reset",
            RestoreInput {
                flags: RESTORE_PADDED_SAVE_BUF | RESTORE_RESET_CONTEXT,
                record: save.record.clone(),
                chunks: save.chunks.clone(),
                overrides: Vec::new(),
            },
        ),
        (
            "sealed-record",
            RestoreInput {
                flags: RESTORE_SEAL_RECORD | RESTORE_REAL_CHUNKS,
                record: save.record.clone(),
                chunks: Vec::new(),
                overrides: Vec::new(),
            },
        ),
        (
            "golden-channel-record",
            RestoreInput {
                flags: RESTORE_REAL_CHUNKS,
                record: golden("channel_v1.bin"),
                chunks: Vec::new(),
                overrides: Vec::new(),
            },
        ),
        ("real-finish", real(RESTORE_FINISH, Vec::new())),
        (
            "golden-delivery-overrides",
            real(
                0,
                vec![
                    (0, golden("delivery_v1_min.bin")),
                    (1, golden("delivery_v1_trace.bin")),
                    (2, golden("delivery_v1_padded.bin")),
                    (3, golden("delivery_v1_unknown_optional.bin")),
                    (4, golden("delivery_v1_unknown_critical.bin")),
                ],
            ),
        ),
        (
            "record-overrides",
            real(
                RESTORE_FINISH,
                vec![
                    (0, encode_record(&delivery_record(1, 1, false), &[])),
                    (
                        1,
                        encode_record(&delivery_record(2, 3, true), &unknown_optional),
                    ),
                ],
            ),
        ),
        (
            "duplicate-and-future-sequences",
            real(
                0,
                vec![
                    (0, encode_record(&delivery_record(2, 1, false), &[])),
                    (1, encode_record(&delivery_record(2, 1, false), &[])),
                    (2, encode_record(&delivery_record(u64::MAX, 1, false), &[])),
                ],
            ),
        ),
        (
            "critical-extension",
            real(
                0,
                vec![(
                    0,
                    encode_record(&delivery_record(1, 1, false), &unknown_critical),
                )],
            ),
        ),
        (
            "sealed-overrides",
            real(
                RESTORE_SEAL_OVERRIDES,
                vec![(5, encode_record(&delivery_record(3, 9, true), &[]))],
            ),
        ),
    ];
    seeds
        .into_iter()
        .map(|(name, input)| (name, input.encode()))
        .collect()
}

/// The decode_saved target reads raw bytes, and with a mode byte first a re-sealed variant.
fn decode_saved_seeds(save: &RealSave) -> Vec<(&'static str, Vec<u8>)> {
    let prefixed = |mode: u8, bytes: &[u8]| [&[mode][..], bytes].concat();
    let record = encode_record(&delivery_record(4, 2, true), &[]);
    vec![
        ("real-channel-record", save.record.clone()),
        ("real-stream", save.stream.clone()),
        ("real-delivery-record", record.clone()),
        ("sealed-real-channel-record", prefixed(1, &save.record)),
        ("sealed-real-stream", prefixed(4, &save.stream)),
        ("sealed-real-delivery-record", prefixed(0, &record)),
    ]
}

fn corpus_root() -> PathBuf {
    std::env::var_os("VMBSRV_FUZZ_CORPUS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus"))
}

#[test]
#[ignore = "writes seed files: run by scripts/fuzz.sh"]
fn write_fuzz_seeds() {
    let save = real_save(6, 200);
    assert!(save.chunks.len() > 1, "several chunks");
    let root = corpus_root();
    let sets = [
        ("guest_packets", guest_packets_seeds()),
        ("control_ioctl", control_seeds(&save)),
        ("restore_e2e", restore_seeds(&save)),
        ("decode_saved", decode_saved_seeds(&save)),
    ];
    for (target, seeds) in sets {
        let dir = root.join(target);
        fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in &seeds {
            fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
        }
        println!("{target}: {} seeds in {}", seeds.len(), dir.display());
    }
}

#[test]
fn seed_formats_round_trip() {
    let save = real_save(4, 4096);
    let input = RestoreInput {
        flags: RESTORE_FINISH,
        record: save.record.clone(),
        chunks: save.chunks.clone(),
        overrides: vec![(3, vec![1, 2, 3])],
    };
    assert_eq!(RestoreInput::decode(&input.encode()), input);
    for (_, bytes) in guest_packets_seeds() {
        let ops = inputs::decode_guest_ops(&bytes, usize::MAX);
        assert_eq!(inputs::encode_guest_ops(&ops), bytes);
    }
    for (_, bytes) in control_seeds(&save) {
        let steps = inputs::decode_control_steps(&bytes, usize::MAX);
        assert_eq!(inputs::encode_control_steps(&steps), bytes);
    }
    // Decoding is total: garbage decodes to something, never panics.
    for len in 0..64 {
        let garbage: Vec<u8> = (0..len).map(|i| (i * 37 + len) as u8).collect();
        RestoreInput::decode(&garbage);
        inputs::decode_guest_ops(&garbage, 16);
        inputs::decode_control_steps(&garbage, 16);
    }
}
