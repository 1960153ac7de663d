//! The client against vmbsrv's dispatcher over the simulator (the in-process transport).

use vmbsrv_client::inspect::inspect;
use vmbsrv_client::sim::{SimGuest, SimHost, demo_payload, run_demo, sim_channel_config};
use vmbsrv_client::{
    Client, CreateMode, Failure, NtStatus, OutcomeKindName, Phase, PostOptions, Transport,
};

fn host() -> Client<SimHost> {
    Client::new(SimHost::new().expect("simulated host"))
}

#[test]
fn info_reports_the_interface_limits() {
    let mut client = host();
    let info = client.info().unwrap();
    assert_eq!(info.control_version, 1);
    assert_eq!(info.guest_protocol_version, 0x0001_0000);
    assert_eq!(info.channels_in_use, 0);
    assert_eq!(info.max_chunk_len, 16 * 1024 * 1024);
}

#[test]
fn post_fetch_statistics_disable_destroy() {
    let mut client = host();
    let mut guest = SimGuest::new();
    guest.attach(client.transport()).unwrap();
    let id = client
        .create(&sim_channel_config(CreateMode::Start, 8))
        .unwrap();
    // Before the guest negotiated: the operation fails, with the channel's status.
    let early = client
        .post(id, b"early", PostOptions::default())
        .unwrap_err();
    assert_eq!(early.failure, Failure::Operation);
    assert_eq!(early.status, NtStatus::INVALID_DEVICE_STATE);
    assert!(
        early.to_string().contains("STATUS_INVALID_DEVICE_STATE"),
        "{early}"
    );

    guest.open(client.transport()).unwrap();
    for tag in 0..5 {
        let payload = demo_payload(tag);
        let sequence = client
            .post(
                id,
                &payload,
                PostOptions {
                    tag,
                    trace_id: None,
                },
            )
            .unwrap();
        assert_eq!(sequence, tag + 1);
        guest.posted(sequence, tag, &payload);
    }
    assert_eq!(guest.acknowledge(client.transport(), 3), 3);
    let first = client.fetch(id, 2).unwrap();
    assert_eq!((first.outcomes.len(), first.remaining), (2, 1));
    let rest = client.fetch_all(id).unwrap();
    assert_eq!(rest.len(), 1);
    for o in first.outcomes.iter().chain(&rest) {
        assert_eq!(o.kind, OutcomeKindName::Acked);
        assert_eq!(o.attempts, 1);
    }
    let stats = client.statistics(id).unwrap();
    assert_eq!(stats.phase, Phase::Running);
    assert_eq!((stats.posted, stats.acked, stats.in_flight), (5, 3, 2));

    client.disable(id).unwrap();
    assert_eq!(client.statistics(id).unwrap().phase, Phase::Disabled);
    let cancelled = client.fetch_all(id).unwrap();
    assert_eq!(cancelled.len(), 2);
    assert!(
        cancelled
            .iter()
            .all(|o| o.kind == OutcomeKindName::Cancelled)
    );
    let report = client.destroy(id).unwrap();
    assert_eq!((report.unfetched_outcomes, report.in_flight), (0, 0));
    let gone = client.statistics(id).unwrap_err();
    assert_eq!(gone.status, NtStatus::NOT_FOUND);
}

#[test]
fn a_vmbus_handle_cannot_be_converted_by_the_simulated_host() {
    let mut client = host();
    let mut config = sim_channel_config(CreateMode::Start, 8);
    config.vmbus_handle = 0x1234;
    let error = client.create(&config).unwrap_err();
    assert_eq!(error.failure, Failure::Operation);
    assert_eq!(error.status, NtStatus::INVALID_PARAMETER);
}

#[test]
fn a_malformed_request_fails_the_ioctl_with_its_status() {
    let mut host = SimHost::new().unwrap();
    let mut output = [0u8; 48];
    let refused = host.ioctl(
        vmbsrv::vsp::control::IOCTL_VMBSRV_QUERY_INFO,
        &[1, 0],
        &mut output,
    );
    assert_eq!(
        refused,
        Err(vmbsrv_client::IoctlError::Status(
            NtStatus::INVALID_BUFFER_SIZE
        ))
    );
}

#[test]
fn save_to_a_file_and_restore_into_a_new_host_exactly_once() {
    let (stream, report) = run_demo(12, 4, &mut |s| Ok(s.to_vec()), &mut |_| {}).unwrap();
    assert!(report.exactly_once, "{report:?}");
    assert_eq!(report.migrated, 8);
    assert_eq!(report.restored_deliveries, 8);
    assert_eq!(report.delivered, 14);
    let inspection = inspect(&stream);
    assert!(inspection.is_clean(), "{inspection}");
    assert_eq!(inspection.deliveries.len(), 8);
    let channel = inspection.channel.unwrap();
    assert_eq!(channel.in_flight, 8);
    assert_eq!(channel.next_sequence, 13);
    let mut sequences: Vec<u64> = inspection.deliveries.iter().map(|d| d.sequence).collect();
    sequences.sort_unstable();
    assert_eq!(sequences, (5..=12).collect::<Vec<_>>());
    assert!(
        inspection
            .deliveries
            .iter()
            .all(|d| d.trace_id.is_some() && d.attempts == 1)
    );
}

#[test]
fn a_damaged_stream_is_refused_by_restore_before_anything_is_sent() {
    let (mut stream, _) = run_demo(4, 0, &mut |s| Ok(s.to_vec()), &mut |_| {}).unwrap();
    let last = stream.len() - 20;
    stream[last] ^= 0x40;
    let mut client = host();
    let id = client
        .create(&sim_channel_config(CreateMode::ForRestore, 8))
        .unwrap();
    let error = client.restore_stream(id, &stream, &mut |_| {}).unwrap_err();
    assert_eq!(error.status, NtStatus::DATA_ERROR, "{error}");
    client.destroy(id).unwrap();
}
