//! Hostile saved state, end to end: arbitrary bytes as the channel record, as the KMCL restore
//! chunks, and as the driver's per-packet bytes inside an otherwise intact chunk (through the
//! simulator's `tamper_driver_bytes`), restored into a fresh channel on a fresh simulator instance.
//!
//! Random bytes rarely pass a checksum, so the input can ask for the record and the per-packet
//! bytes to be re-sealed (magic, length and CRC repaired), and for the built-in real save's record
//! or chunks to be used as they are (see `common/inputs.rs`): the fuzzer then explores the fields
//! behind the envelope — sequence numbers against the channel record, counts, limits, attempts.
//!
//! Properties per input: nothing panics or hangs; a restore either completes with exactly the
//! deliveries the record announced or fails with an NTSTATUS; a completed restore can be finished
//! (enabled and started); every delivery it rebuilt comes back exactly once, cancelled, when the
//! channel is disabled; `Kmcl::finish()` reports no violation (no leaked or half-restored packet).
#![no_main]
// `cfg!(overflow_checks)` in `checked_build` (fuzz builds are nightly-only).
#![feature(cfg_overflow_checks)]

#[path = "../common/checked_build.rs"]
mod checked_build;

#[path = "../common/harness.rs"]
mod harness;
#[path = "../common/inputs.rs"]
mod inputs;

use std::sync::{Mutex, OnceLock};

use harness::{IN_FLIGHT, MAX_MESSAGE, Outcomes};
use inputs::{
    RESTORE_FINISH, RESTORE_PADDED_SAVE_BUF, RESTORE_REAL_CHUNKS, RESTORE_REAL_RECORD,
    RESTORE_RESET_CONTEXT, RESTORE_SEAL_OVERRIDES, RESTORE_SEAL_RECORD, RestoreInput,
};
use kmcl_sim::{Guest, Kmcl, RestoreSaveBufSize, RestoredPacketContext, SimConfig};
use libfuzzer_sys::fuzz_target;
use vmbsrv::kmcl::NtStatus;
use vmbsrv::saved::stream::{FrameKind, FrameReader};
use vmbsrv::saved::{ChannelRecord, DeliveryRecord, MAX_RECORD_LEN, crc32c};
use vmbsrv::vsp::{OutcomeKind, Phase, PostRequest, RestoreProgress, VspChannel};
use vmbsrv_testkit::GuestModel;
use vmbsrv_testkit::migration::{
    Lock, SCENARIO_INSTANCE, SCENARIO_INTERFACE_TYPE, channel_config, query_server_interface,
    save_channel,
};

/// A real save: the channel record and the KMCL chunks of a channel with deliveries in flight.
struct RealSave {
    record: Vec<u8>,
    chunks: Vec<Vec<u8>>,
}

/// Deliveries in flight in the real save (the guest holds half of them, half are in its ring).
const REAL_IN_FLIGHT: u64 = 6;

fn real_save() -> &'static RealSave {
    static SAVE: OnceLock<RealSave> = OnceLock::new();
    SAVE.get_or_init(|| {
        let kmcl = Kmcl::new(harness::sim_config(&[]));
        let stream = {
            let interface = query_server_interface(&kmcl).unwrap();
            let mut guest = GuestModel::new(Guest::new(SCENARIO_INTERFACE_TYPE, SCENARIO_INSTANCE));
            kmcl.attach_guest(&guest.endpoint).unwrap();
            let channel: VspChannel<'_, Lock> =
                VspChannel::create(&interface, &channel_config(&kmcl, IN_FLIGHT, MAX_MESSAGE))
                    .unwrap();
            guest.open_and_negotiate(&kmcl).unwrap();
            let mut ledger = vmbsrv_testkit::Ledger::new();
            for tag in 0..REAL_IN_FLIGHT {
                let payload = vec![tag as u8; 1 + tag as usize * 7];
                channel
                    .post(&PostRequest {
                        tag,
                        payload: &payload,
                        posted_at: tag,
                        trace_id: (tag % 2 == 0).then_some([tag as u8; 16]),
                    })
                    .unwrap();
                if tag == REAL_IN_FLIGHT / 2 {
                    kmcl.wait_idle();
                    guest.pump(&mut ledger);
                }
            }
            kmcl.wait_idle();
            let (stream, _, _) = save_channel(&channel, 256).unwrap();
            guest.endpoint.detach();
            channel.complete_migration().unwrap();
            drop(channel);
            stream
        };
        harness::finish(kmcl);
        let mut save = RealSave {
            record: Vec::new(),
            chunks: Vec::new(),
        };
        for frame in FrameReader::new(&stream).unwrap() {
            let frame = frame.unwrap();
            match frame.kind {
                FrameKind::ChannelRecord => save.record = frame.payload.to_vec(),
                FrameKind::KmclChunk => save.chunks.push(frame.payload.to_vec()),
            }
        }
        save
    })
}

/// The per-packet driver bytes of the current input (the tamper hook is a plain `fn`).
static OVERRIDES: Mutex<Vec<(u8, Vec<u8>)>> = Mutex::new(Vec::new());

fn tamper(ordinal: u64, bytes: &mut Vec<u8>) {
    let overrides = OVERRIDES.lock().unwrap();
    if let Some((_, replacement)) = overrides.iter().find(|(o, _)| u64::from(*o) == ordinal) {
        bytes.clear();
        bytes.extend_from_slice(replacement);
    }
}

/// `bytes` with the record envelope repaired: magic, `total_len` (= the length, capped) and CRC.
fn seal(magic: [u8; 4], bytes: &[u8]) -> Vec<u8> {
    let mut record = bytes.to_vec();
    if record.len() < 16 {
        record.resize(16, 0);
    }
    record.truncate(MAX_RECORD_LEN);
    record[..4].copy_from_slice(&magic);
    let total = record.len() as u32;
    record[12..16].copy_from_slice(&total.to_le_bytes());
    let crc = crc32c(&record[8..]);
    record[4..8].copy_from_slice(&crc.to_le_bytes());
    record
}

fuzz_target!(|data: &[u8]| run(data));

fn run(data: &[u8]) {
    let input = RestoreInput::decode(data);
    let real = real_save();
    let record = if input.flags & RESTORE_REAL_RECORD != 0 {
        real.record.clone()
    } else if input.flags & RESTORE_SEAL_RECORD != 0 {
        seal(ChannelRecord::MAGIC, &input.record)
    } else {
        input.record.clone()
    };
    let chunks = if input.flags & RESTORE_REAL_CHUNKS != 0 {
        &real.chunks
    } else {
        &input.chunks
    };
    *OVERRIDES.lock().unwrap() = input
        .overrides
        .iter()
        .map(|(ordinal, bytes)| {
            let bytes = if input.flags & RESTORE_SEAL_OVERRIDES != 0 {
                seal(DeliveryRecord::MAGIC, bytes)
            } else {
                bytes.clone()
            };
            (*ordinal, bytes)
        })
        .collect();
    let config = SimConfig {
        tamper_driver_bytes: (!input.overrides.is_empty())
            .then_some(tamper as fn(u64, &mut Vec<u8>)),
        restore_save_buf_size: if input.flags & RESTORE_PADDED_SAVE_BUF != 0 {
            RestoreSaveBufSize::PaddedWithZeros
        } else {
            RestoreSaveBufSize::AsReported
        },
        restored_packet_context: if input.flags & RESTORE_RESET_CONTEXT != 0 {
            RestoredPacketContext::ResetOnRestore
        } else {
            RestoredPacketContext::KeepSetBeforeRestore
        },
        ..harness::sim_config(data)
    };

    let kmcl = Kmcl::new(config);
    {
        let interface = query_server_interface(&kmcl).expect("interface");
        let channel: VspChannel<'_, Lock> = VspChannel::create_for_restore(
            &interface,
            &channel_config(&kmcl, IN_FLIGHT, MAX_MESSAGE),
        )
        .expect("create for restore");
        let announced = ChannelRecord::decode(&record).map(|r| r.in_flight);
        let outcome = restore(&channel, &record, chunks);
        match outcome {
            Ok(true) => {
                assert_eq!(channel.phase(), Phase::Restored);
                let announced = announced.expect("an accepted record decodes");
                assert_eq!(channel.statistics().in_flight, announced);
                if input.flags & RESTORE_FINISH != 0 {
                    channel
                        .finish_restore()
                        .expect("a verified restore can be started");
                    kmcl.wait_idle();
                    assert_eq!(channel.phase(), Phase::Running);
                }
            }
            Ok(false) => assert_eq!(channel.phase(), Phase::Restoring),
            Err(status) => {
                assert!(!status.is_success());
                assert_ne!(channel.phase(), Phase::Running);
                assert!(
                    channel.finish_restore().is_err(),
                    "a failed restore cannot start"
                );
            }
        }
        channel
            .check_invariants()
            .expect("delivery table invariants after the restore");
        let restored = channel.statistics().in_flight as usize;
        // A restored channel that never ran hands its deliveries back to the blob (`Migrated`:
        // the blob may be replayed); one that ran cancels them (docs/control.md §6).
        let expected = if channel.phase() == Phase::Running {
            OutcomeKind::Cancelled
        } else {
            OutcomeKind::Migrated
        };
        channel.disable().expect("disable");
        kmcl.wait_idle();
        channel
            .check_invariants()
            .expect("delivery table invariants after the disable");
        let mut outcomes = Outcomes::default();
        outcomes.drain(&channel);
        // One outcome per rebuilt packet, and no sequence ends twice: a forged blob that carries
        // one sequence twice is refused when the second copy arrives (issue #11).
        assert_eq!(outcomes.count(), restored, "{outcomes:?}");
        assert!(
            outcomes.by_sequence.values().all(|kinds| kinds.len() == 1),
            "a sequence ended twice: {outcomes:?}"
        );
        assert!(
            outcomes
                .by_sequence
                .values()
                .flatten()
                .all(|kind| *kind == expected),
            "{outcomes:?}"
        );
        assert_eq!(channel.statistics().in_flight, 0);
    }
    harness::finish(kmcl);
}

/// Feeds the record, then the chunks; `Ok(true)` once the restore completed.
fn restore(
    channel: &VspChannel<'_, Lock>,
    record: &[u8],
    chunks: &[Vec<u8>],
) -> Result<bool, NtStatus> {
    channel.restore_channel_record(record)?;
    let mut complete = false;
    for chunk in chunks {
        if complete {
            // Nothing is accepted after the last chunk.
            assert_eq!(
                channel.restore_chunk(chunk),
                Err(NtStatus::INVALID_DEVICE_STATE)
            );
            continue;
        }
        complete = channel.restore_chunk(chunk)? == RestoreProgress::Complete;
    }
    Ok(complete)
}
