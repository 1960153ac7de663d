//! The scenario ledger is independent evidence: it does not trust what the VSP wrote.
//!
//! A real VSP on the simulator posts two messages; between the guest's ring and the guest model,
//! the test rewrites the delivery packets the way a buggy VSP could have produced them — two
//! payloads swapped (each still with a matching checksum) or two tags swapped — and checks that
//! the ledger's verdict counts both messages as corrupted. A ledger that compared the payload
//! with the checksum the VSP wrote (as it once did) passes both rewrites, as the assertions on the
//! rewritten packets show; so does the VSP's own check of the guest's acknowledgement for a tag
//! swap.

use kmcl_sim::{Guest, HostPacket, Kmcl};
use vmbsrv::saved::crc32c;
use vmbsrv::vsp::protocol::{DeliveryHeader, parse_delivery};
use vmbsrv::vsp::{Outcome, OutcomeKind, PostRequest, VspChannel};
use vmbsrv_testkit::migration::{
    Lock, SCENARIO_INSTANCE, SCENARIO_INTERFACE_TYPE, channel_config, query_server_interface,
};
use vmbsrv_testkit::{GuestModel, Ledger, MigrationConfig, Posted, Verdict};
use zerocopy::FromBytes;

/// How the test rewrites the two delivery packets before the guest model reads them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rewrite {
    /// Unchanged: the control case.
    None,
    /// The two packets' sequence numbers exchanged: each sequence arrives with the other
    /// message's payload, tag and (matching) checksum.
    SwapPayloads,
    /// The two packets' tags exchanged; payloads and checksums untouched.
    SwapTags,
}

fn header(packet: &mut HostPacket) -> &mut DeliveryHeader {
    DeliveryHeader::mut_from_prefix(&mut packet.bytes)
        .expect("a delivery packet")
        .0
}

fn rewrite(packets: &mut [HostPacket], how: Rewrite) {
    let [first, second] = packets else {
        panic!("expected two deliveries, got {}", packets.len());
    };
    match how {
        Rewrite::None => {}
        Rewrite::SwapPayloads => {
            let a = header(first).sequence;
            let b = header(second).sequence;
            header(first).sequence = b;
            header(second).sequence = a;
        }
        Rewrite::SwapTags => {
            let a = header(first).tag;
            let b = header(second).tag;
            header(first).tag = b;
            header(second).tag = a;
        }
    }
    // Every rewritten packet is still well-formed and self-consistent: the checksum the VSP wrote
    // matches the payload it carries, so a check against it would pass.
    for packet in packets.iter() {
        let delivery = parse_delivery(&packet.bytes).expect("still a well-formed delivery");
        assert_eq!(crc32c(delivery.payload), delivery.payload_crc);
    }
}

/// Returns the verdict right after the guest read the packets, the verdict after the guest
/// acknowledged them, and the outcome kinds the VSP reported.
fn run(how: Rewrite) -> (Verdict, Verdict, Vec<OutcomeKind>) {
    let kmcl = Kmcl::new(MigrationConfig::sim_for(8));
    let mut guest = GuestModel::new(Guest::new(SCENARIO_INTERFACE_TYPE, SCENARIO_INSTANCE));
    let mut ledger = Ledger::new();
    let mut kinds = Vec::new();
    let read = {
        let interface = query_server_interface(&kmcl).unwrap();
        kmcl.attach_guest(&guest.endpoint).unwrap();
        let channel: VspChannel<'_, Lock> =
            VspChannel::create(&interface, &channel_config(&kmcl, 8, 64)).unwrap();
        guest.open_and_negotiate(&kmcl).unwrap();
        // Equal lengths, so a swap cannot be noticed from a length either.
        for (tag, payload) in [(100u64, b"payload-one"), (200, b"payload-two")] {
            let sequence = channel
                .post(&PostRequest {
                    tag,
                    payload,
                    posted_at: 0,
                    trace_id: None,
                })
                .unwrap();
            ledger.posted(sequence, Posted::new(tag, payload));
        }
        kmcl.wait_idle();
        let mut packets = guest.endpoint.receive_all();
        rewrite(&mut packets, how);
        for packet in &packets {
            guest.accept(packet, &mut ledger);
        }
        let read = ledger.verdict();
        guest.acknowledge(usize::MAX, None);
        kmcl.wait_idle();
        let mut outcomes = [Outcome {
            sequence: 0,
            tag: 0,
            kind: OutcomeKind::Acked,
            attempts: 0,
        }; 8];
        let count = channel.drain_outcomes(&mut outcomes);
        for outcome in &outcomes[..count] {
            ledger.outcome(outcome);
            kinds.push(outcome.kind);
        }
        channel.disable().unwrap();
        kmcl.wait_idle();
        drop(channel);
        drop(interface);
        read
    };
    assert_eq!(kmcl.finish(), Vec::new());
    (read, ledger.verdict(), kinds)
}

#[test]
fn untouched_deliveries_are_clean() {
    let (read, done, kinds) = run(Rewrite::None);
    assert_eq!(read.corrupted, 0, "{read:?}");
    assert_eq!(
        done,
        Verdict {
            delivered: 2,
            ..Verdict::default()
        }
    );
    assert_eq!(kinds, [OutcomeKind::Acked, OutcomeKind::Acked]);
}

/// Swapped payloads are caught as soon as the guest reads them, before any acknowledgement gives
/// the VSP a chance to notice: only the ledger's own digests can see it then.
#[test]
fn swapped_payloads_are_caught_by_the_ledger() {
    let (read, done, _) = run(Rewrite::SwapPayloads);
    assert_eq!(read.corrupted, 2, "{read:?}");
    assert_eq!(done.corrupted, 2, "{done:?}");
    assert_eq!(done.delivered, 0, "{done:?}");
    assert!(!done.is_clean());
}

/// Swapped tags pass the VSP's own acknowledgement check (the acknowledgement carries sequence
/// and payload checksum, not the tag): the VSP reports both as acknowledged, the ledger does not.
#[test]
fn swapped_tags_are_caught_by_the_ledger() {
    let (read, done, kinds) = run(Rewrite::SwapTags);
    assert_eq!(kinds, [OutcomeKind::Acked, OutcomeKind::Acked]);
    assert_eq!(read.corrupted, 2, "{read:?}");
    assert_eq!(done.corrupted, 2, "{done:?}");
    assert_eq!(done.delivered, 0, "{done:?}");
}
