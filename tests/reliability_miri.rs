//! Tiny end-to-end scenarios, small enough to run under Miri (`scripts/sanitizers.sh`): the real
//! VSP through the real `extern` trampolines and the `kmcl` wrappers, over the simulator's
//! threads and condition variables. Every test name starts with `miri_` so the script can select
//! them; they also run (in milliseconds) with the normal suite.
//!
//! Under Miri they check what the other suites cannot: that the `unsafe` at the KMCL boundary
//! (slices from KMCL buffers, the context pointer back to the channel's handler, the token in the
//! packet context, `GuestBytes` copies) is free of undefined behaviour on the paths these runs
//! take, including data races between the simulator's threads and the caller's.

use std::time::Duration;

use kmcl_sim::{Guest, Kmcl, Reply, SimConfig};
use vmbsrv::kmcl::NtStatus;
use vmbsrv::saved::crc32c;
use vmbsrv::vsp::protocol::{self, Header, Kind};
use vmbsrv::vsp::{Outcome, OutcomeKind, PostRequest, VspChannel};
use vmbsrv_testkit::migration::{
    Lock, SCENARIO_INSTANCE, SCENARIO_INTERFACE_TYPE, channel_config, query_server_interface,
    restore_channel, save_channel,
};
use vmbsrv_testkit::{GuestModel, Ledger, MigrationConfig, Posted};
use zerocopy::IntoBytes;

fn sim() -> SimConfig {
    MigrationConfig::sim_for(4)
}

fn drain(channel: &VspChannel<'_, Lock>, ledger: &mut Ledger) -> usize {
    let mut outcomes = [Outcome {
        sequence: 0,
        tag: 0,
        kind: OutcomeKind::Acked,
        attempts: 0,
    }; 8];
    let count = channel.drain_outcomes(&mut outcomes);
    for outcome in &outcomes[..count] {
        ledger.outcome(outcome);
    }
    count
}

/// Post 3, the guest acknowledges 1 and holds 2, save in small chunks, migrate, restore into a
/// new channel, the guest acknowledges the rest there: exactly once, no violation.
///
/// One simulator instance and one interface query for the whole process (the source channel is
/// torn down before the destination channel is created on the same instance): under Miri a
/// function's address is not unique, so the simulator's table differs from query to query and
/// `ServerInterface::from_queried` refuses the second table's accessors (see docs/reliability.md).
#[test]
fn miri_tiny_migration() {
    let mut ledger = Ledger::new();
    let mut guest = GuestModel::new(Guest::new(SCENARIO_INTERFACE_TYPE, SCENARIO_INSTANCE));
    let kmcl = Kmcl::new(sim());
    {
        let interface = query_server_interface(&kmcl).unwrap();
        kmcl.attach_guest(&guest.endpoint).unwrap();
        let stream = {
            let channel: VspChannel<'_, Lock> =
                VspChannel::create(&interface, &channel_config(&kmcl, 4, 16)).unwrap();
            guest.open_and_negotiate(&kmcl).unwrap();
            for tag in 0..3u64 {
                let payload = [tag as u8 + 1; 5];
                let sequence = channel
                    .post(&PostRequest {
                        tag,
                        payload: &payload,
                        posted_at: tag,
                        trace_id: (tag == 1).then_some([7; 16]),
                    })
                    .unwrap();
                ledger.posted(sequence, Posted::new(tag, &payload));
            }
            kmcl.wait_idle();
            assert_eq!(guest.pump(&mut ledger), 3);
            guest.acknowledge(1, None);
            kmcl.wait_idle();
            assert_eq!(drain(&channel, &mut ledger), 1);
            let (stream, chunks, _) = save_channel(&channel, 96).unwrap();
            assert!(chunks > 1, "{chunks} chunk(s)");
            guest.endpoint.detach();
            channel.complete_migration().unwrap();
            kmcl.wait_idle();
            assert_eq!(drain(&channel, &mut ledger), 2);
            stream
        };
        let channel: VspChannel<'_, Lock> =
            VspChannel::create_for_restore(&interface, &channel_config(&kmcl, 4, 16)).unwrap();
        restore_channel(&channel, &stream).unwrap();
        kmcl.attach_guest(&guest.endpoint).unwrap();
        kmcl.wait_idle();
        assert_eq!(guest.acknowledge(usize::MAX, None), 2);
        kmcl.wait_idle();
        assert_eq!(drain(&channel, &mut ledger), 2);
        assert_eq!(channel.statistics().in_flight, 0);
        channel.disable().unwrap();
        kmcl.wait_idle();
    }
    assert_eq!(kmcl.finish(), Vec::new());
    let verdict = ledger.verdict();
    assert!(verdict.is_clean(), "{verdict:?}");
    assert_eq!(verdict.delivered, 3);
}

/// Guest requests through the process-packet trampoline (valid, invalid, garbled) and hostile
/// completion payloads through the completion trampoline.
#[test]
fn miri_guest_requests_and_hostile_completions() {
    let kmcl = Kmcl::new(sim());
    {
        let interface = query_server_interface(&kmcl).unwrap();
        let guest = Guest::new(SCENARIO_INTERFACE_TYPE, SCENARIO_INSTANCE);
        kmcl.attach_guest(&guest).unwrap();
        let channel: VspChannel<'_, Lock> =
            VspChannel::create(&interface, &channel_config(&kmcl, 4, 16)).unwrap();
        GuestModel::new(guest.clone())
            .open_and_negotiate(&kmcl)
            .unwrap();
        let ask = |bytes: &[u8]| {
            let id = guest.send_request(bytes).unwrap();
            kmcl.wait_idle();
            guest.wait_reply(id, Duration::from_secs(5))
        };
        let statistics = Header::new(Kind::StatisticsRequest, protocol::HEADER_LEN);
        assert!(matches!(
            ask(statistics.as_bytes()),
            Some(Reply::Completed(_))
        ));
        // Longer than any request: answered with an error, read no further than the copy.
        let mut long = vec![0u8; 200];
        let header = Header::new(Kind::StatisticsRequest, long.len());
        long[..16].copy_from_slice(header.as_bytes());
        assert!(matches!(ask(&long), Some(Reply::Completed(_))));
        // Garbled: an error reply, never VmbChannelPacketFail (issue #11).
        assert!(matches!(ask(b"garbled"), Some(Reply::Completed(_))));
        channel.restart_incoming().unwrap();
        kmcl.wait_idle();

        let sequence = channel
            .post(&PostRequest {
                tag: 1,
                payload: b"hello",
                posted_at: 0,
                trace_id: None,
            })
            .unwrap();
        kmcl.wait_idle();
        let txid = guest.receive().unwrap().txid.unwrap();
        // A completion payload longer than any acknowledgement, then a duplicate.
        guest.complete(txid, &[0xA5; 300]).unwrap();
        guest
            .send_completion(txid, &protocol::encode_ack(sequence, 0, crc32c(b"hello")))
            .unwrap();
        kmcl.wait_idle();
        let mut outcomes = [Outcome {
            sequence: 0,
            tag: 0,
            kind: OutcomeKind::Acked,
            attempts: 0,
        }; 2];
        assert_eq!(channel.drain_outcomes(&mut outcomes), 1);
        assert_eq!(outcomes[0].kind, OutcomeKind::BadAck);
        assert_eq!(channel.statistics().stats.guest_garbled, 1);
        assert_eq!(
            channel.post(&PostRequest {
                tag: 2,
                payload: &[],
                posted_at: 0,
                trace_id: None
            }),
            Err(NtStatus::INVALID_BUFFER_SIZE)
        );
        channel.disable().unwrap();
        kmcl.wait_idle();
    }
    assert_eq!(kmcl.finish(), Vec::new());
}
