//! Small fixtures the end-to-end test files share (each used to be copied into several of them).
#![forbid(unsafe_code)]

use std::vec::Vec;

use kmcl_sim::{Guest, Kmcl};
use vmbsrv::saved::DeliveryRecord;
use vmbsrv::saved::stream::{FrameKind, FrameReader};
use vmbsrv::vsp::{Outcome, OutcomeKind, PostRequest, VspChannel};

use crate::GuestModel;
use crate::migration::{
    Lock, MigrationConfig, SCENARIO_INSTANCE, SCENARIO_INTERFACE_TYPE, channel_config,
    query_server_interface,
};

/// Builds a simulator instance with one running channel holding `packets` undelivered posts of
/// `payload_len` bytes (tags 0..packets, no trace ids; the guest opened and negotiated but reads
/// nothing), runs `body` on it, then tears it down (guest detached, `complete_migration`) and
/// asserts the simulator saw no contract violation. The save benches and `examples/sim_profile`
/// time what `body` does.
pub fn with_loaded_channel<R>(
    packets: u32,
    payload_len: usize,
    max_message_len: u32,
    body: impl FnOnce(&VspChannel<'_, Lock>) -> R,
) -> R {
    let kmcl = Kmcl::new(MigrationConfig::sim_for(packets));
    let guest = GuestModel::new(Guest::new(SCENARIO_INTERFACE_TYPE, SCENARIO_INSTANCE));
    let result = {
        let interface = query_server_interface(&kmcl).expect("interface");
        kmcl.attach_guest(&guest.endpoint).expect("attach");
        let channel = VspChannel::<Lock>::create(
            &interface,
            &channel_config(&kmcl, packets, max_message_len),
        )
        .expect("create");
        guest.open_and_negotiate(&kmcl).expect("negotiate");
        let payload = vec![0x5A_u8; payload_len];
        for tag in 0..u64::from(packets) {
            channel
                .post(&PostRequest {
                    tag,
                    payload: &payload,
                    posted_at: tag,
                    trace_id: None,
                })
                .expect("post");
        }
        kmcl.wait_idle();
        assert_eq!(channel.statistics().in_flight, packets);
        let result = body(&channel);
        guest.endpoint.detach();
        channel.complete_migration().expect("complete_migration");
        kmcl.wait_idle();
        result
    };
    let violations = kmcl.finish();
    assert!(violations.is_empty(), "{violations:?}");
    result
}

/// Creates a channel for restore (room for `packets`) on a fresh simulator instance, runs
/// `restore` on it (which restores a save of `packets` deliveries into it), asserts they are all
/// in flight, disables the channel and asserts the simulator saw no contract violation.
pub fn with_restoring_channel<R>(
    packets: u32,
    max_message_len: u32,
    restore: impl FnOnce(&VspChannel<'_, Lock>) -> R,
) -> R {
    let kmcl = Kmcl::new(MigrationConfig::sim_for(packets));
    let result = {
        let interface = query_server_interface(&kmcl).expect("interface");
        let channel = VspChannel::<Lock>::create_for_restore(
            &interface,
            &channel_config(&kmcl, packets, max_message_len),
        )
        .expect("create_for_restore");
        let result = restore(&channel);
        assert_eq!(channel.statistics().in_flight, packets);
        channel.disable().expect("disable");
        kmcl.wait_idle();
        result
    };
    let violations = kmcl.finish();
    assert!(violations.is_empty(), "{violations:?}");
    result
}

/// The frames of a valid save stream: the channel record and the KMCL chunks, in order.
///
/// Panics if `stream` is not a well-formed save stream (fixtures are built from real saves).
pub fn split_stream(stream: &[u8]) -> (Vec<u8>, Vec<Vec<u8>>) {
    let mut record = Vec::new();
    let mut chunks = Vec::new();
    for frame in FrameReader::new(stream).expect("a save stream header") {
        let frame = frame.expect("a well-formed frame");
        match frame.kind {
            FrameKind::ChannelRecord => record = frame.payload.to_vec(),
            FrameKind::KmclChunk => chunks.push(frame.payload.to_vec()),
        }
    }
    (record, chunks)
}

/// Every outcome the channel has recorded so far, drained in batches until none is left.
pub fn drain_all(channel: &VspChannel<'_, Lock>) -> Vec<Outcome> {
    let mut all = Vec::new();
    loop {
        let mut out = [Outcome {
            sequence: 0,
            tag: 0,
            kind: OutcomeKind::Acked,
            attempts: 0,
        }; 64];
        let count = channel.drain_outcomes(&mut out);
        if count == 0 {
            return all;
        }
        all.extend_from_slice(&out[..count]);
    }
}

/// The benches' typical delivery record: sequence 123,456, a full 64-bit tag, a 2024-ish
/// `posted_at`, a 512-byte payload, first attempt, no trace id (56 bytes encoded).
pub fn typical_delivery_record() -> DeliveryRecord {
    DeliveryRecord {
        sequence: 123_456,
        tag: 0x1234_5678_9ABC_DEF0,
        posted_at: 133_500_000_000_000_000,
        payload_len: 512,
        payload_crc: 0xCAFE_F00D,
        attempts: 1,
        trace_id: None,
    }
}
