//! Hostile guest traffic into a live channel, end to end through the KMCL simulator: arbitrary
//! bytes as guest requests (the process-packet path) and as completion payloads of the host's
//! deliveries (the completion-routine path), mixed with posts, misdirected and duplicate
//! completions, close/reopen, queue restarts and aborted saves.
//!
//! Per input, a fresh simulator instance and channel (the steps are the input, see
//! `common/inputs.rs`). Properties: nothing panics or hangs; every post that succeeded ends in
//! exactly one outcome (after the final disable) and no outcome names anything else; the counters
//! add up; `Kmcl::finish()` reports no violation (no leaked packet, channel or reference, no
//! contract misuse).
#![no_main]
// `cfg!(overflow_checks)` in `checked_build` (fuzz builds are nightly-only).
#![feature(cfg_overflow_checks)]

#[path = "../common/checked_build.rs"]
mod checked_build;

#[path = "../common/harness.rs"]
mod harness;
#[path = "../common/inputs.rs"]
mod inputs;

use harness::{IN_FLIGHT, MAX_MESSAGE, Outcomes};
use inputs::GuestOp;
use kmcl_sim::{Guest, Kmcl};
use libfuzzer_sys::fuzz_target;
use vmbsrv::kmcl::NtStatus;
use vmbsrv::saved::crc32c;
use vmbsrv::vsp::protocol::{self, Kind};
use vmbsrv::vsp::{Phase, PostRequest, VspChannel};
use vmbsrv_testkit::GuestModel;
use vmbsrv_testkit::migration::{
    Lock, SCENARIO_INSTANCE, SCENARIO_INTERFACE_TYPE, channel_config, query_server_interface,
};

/// Steps per input: enough to fill the channel and drain it a few times.
const MAX_STEPS: usize = 48;

fuzz_target!(|data: &[u8]| run(data));

/// A delivery the guest read and has not completed.
struct Held {
    txid: u64,
    sequence: u64,
    crc: u32,
}

/// A well-formed `NegotiateRequest` for version 1.0 (docs/protocol.md).
fn negotiate_request() -> Vec<u8> {
    let mut bytes = Vec::with_capacity(24);
    bytes.extend_from_slice(&protocol::SIGNATURE.to_le_bytes());
    bytes.extend_from_slice(&(Kind::NegotiateRequest as u16).to_le_bytes());
    bytes.extend_from_slice(&0u16.to_le_bytes());
    bytes.extend_from_slice(&24u32.to_le_bytes());
    bytes.extend_from_slice(&0u32.to_le_bytes());
    bytes.extend_from_slice(&protocol::VERSION_1_0.to_le_bytes());
    bytes.extend_from_slice(&protocol::VERSION_1_0.to_le_bytes());
    bytes
}

fn run(data: &[u8]) {
    let steps = inputs::decode_guest_ops(data, MAX_STEPS);
    let kmcl = Kmcl::new(harness::sim_config(data));
    {
        let interface = query_server_interface(&kmcl).expect("interface");
        let guest = GuestModel::new(Guest::new(SCENARIO_INTERFACE_TYPE, SCENARIO_INSTANCE));
        let endpoint = guest.endpoint.clone();
        kmcl.attach_guest(&endpoint).expect("attach");
        let channel: VspChannel<'_, Lock> =
            VspChannel::create(&interface, &channel_config(&kmcl, IN_FLIGHT, MAX_MESSAGE))
                .expect("create");
        guest.open_and_negotiate(&kmcl).expect("negotiate");

        let mut posted = Vec::new();
        let mut outcomes = Outcomes::default();
        let mut held: Vec<Held> = Vec::new();
        let mut seen: Vec<u64> = Vec::new();
        for step in steps {
            match step {
                GuestOp::Request(bytes) => {
                    if let Ok(id) = endpoint.send_request(&bytes) {
                        kmcl.wait_idle();
                        // Answered (completed or failed) unless a garbled packet stopped the
                        // queue before it; either way the reply is the guest's business.
                        let _ = endpoint.take_reply(id);
                    }
                }
                GuestOp::Post { len } => {
                    let payload = vec![len ^ 0x5A; usize::from(len)];
                    let request = PostRequest {
                        tag: posted.len() as u64,
                        payload: &payload,
                        posted_at: 0,
                        trace_id: (len % 2 == 0).then_some([len; 16]),
                    };
                    match channel.post(&request) {
                        Ok(sequence) => posted.push(sequence),
                        Err(status) => assert!(
                            harness::expected_post_refusal(status),
                            "post refused with {status:?}"
                        ),
                    }
                    kmcl.wait_idle();
                }
                GuestOp::Receive => {
                    for packet in endpoint.receive_all() {
                        let Some(txid) = packet.txid else { continue };
                        seen.push(txid);
                        let delivery = protocol::parse_delivery(&packet.bytes)
                            .expect("the host sends well-formed deliveries");
                        assert_eq!(delivery.payload_crc, crc32c(delivery.payload));
                        held.push(Held {
                            txid,
                            sequence: delivery.sequence,
                            crc: delivery.payload_crc,
                        });
                    }
                }
                GuestOp::Complete { pick, payload } => {
                    if !held.is_empty() {
                        let h = held.remove(usize::from(pick) % held.len());
                        let _ = endpoint.complete(h.txid, &payload);
                        kmcl.wait_idle();
                    }
                }
                GuestOp::RawCompletion {
                    pick,
                    txid,
                    payload,
                } => {
                    let txid = if pick == 255 || seen.is_empty() {
                        txid
                    } else {
                        seen[usize::from(pick) % seen.len()]
                    };
                    held.retain(|h| h.txid != txid);
                    let _ = endpoint.send_completion(txid, &payload);
                    kmcl.wait_idle();
                }
                GuestOp::Reopen => {
                    let _ = endpoint.close();
                    kmcl.wait_idle();
                    // Closing cancelled what the guest had.
                    held.clear();
                    if endpoint.open().is_ok() {
                        kmcl.wait_idle();
                        if let Ok(id) = endpoint.send_request(&negotiate_request()) {
                            kmcl.wait_idle();
                            let _ = endpoint.take_reply(id);
                        }
                    }
                }
                GuestOp::RestartIncoming => {
                    let _ = channel.restart_incoming();
                    kmcl.wait_idle();
                }
                GuestOp::Ack {
                    pick,
                    status,
                    crc_xor,
                } => {
                    if !held.is_empty() {
                        let h = held.remove(usize::from(pick) % held.len());
                        let ack = protocol::encode_ack(h.sequence, status, h.crc ^ crc_xor);
                        let _ = endpoint.complete(h.txid, &ack);
                        kmcl.wait_idle();
                    }
                }
                GuestOp::SaveAndResume { chunk } => {
                    save_and_resume(&channel, usize::from(chunk).max(1));
                    kmcl.wait_idle();
                }
            }
            outcomes.drain(&channel);
        }

        channel.disable().expect("disable");
        kmcl.wait_idle();
        outcomes.drain(&channel);
        harness::assert_exactly_once(&posted, &outcomes);
        harness::assert_counters(&channel);
    }
    harness::finish(kmcl);
}

/// A whole save in `chunk`-byte buffers (grown when KMCL asks), then resume: an aborted migration.
fn save_and_resume(channel: &VspChannel<'_, Lock>, chunk: usize) {
    if channel.save_begin().is_err() {
        assert_eq!(channel.phase(), Phase::Running);
        return;
    }
    let mut buffer = vec![0u8; chunk];
    loop {
        let result = channel.save_continue(&mut buffer).expect("saving");
        match result.status {
            NtStatus::BUFFER_OVERFLOW => {}
            NtStatus::BUFFER_TOO_SMALL => {
                assert!(result.required as usize > buffer.len());
                buffer = vec![0u8; result.required as usize];
            }
            NtStatus::SUCCESS => break,
            other => panic!("save_continue: {other:?}"),
        }
    }
    channel
        .save_end()
        .expect("a save of a live channel is complete");
    channel.resume().expect("resume");
    assert_eq!(channel.phase(), Phase::Running);
}
