//! Regression tests for the bugs this tools found in the VSP (docs/reliability.md §7):
//! each started as a minimal reproducer asserting the correct behaviour, and both were fixed in
//! `vsp: refuse SaveContinue after the last chunk …` (709d5e1).

use kmcl_sim::{Guest, Kmcl, SimConfig};
use vmbsrv::kmcl::NtStatus;
use vmbsrv::saved::ChannelRecord;
use vmbsrv::vsp::{PostRequest, VspChannel};
use vmbsrv_testkit::GuestModel;
use vmbsrv_testkit::migration::{
    Lock, SCENARIO_INSTANCE, SCENARIO_INTERFACE_TYPE, channel_config, query_server_interface,
    save_channel,
};

/// A negotiated channel with two deliveries in flight, on `kmcl`.
fn busy<'i>(
    kmcl: &Kmcl,
    interface: &'i vmbsrv::kmcl::ServerInterface,
) -> (VspChannel<'i, Lock>, GuestModel) {
    let guest = GuestModel::new(Guest::new(SCENARIO_INTERFACE_TYPE, SCENARIO_INSTANCE));
    kmcl.attach_guest(&guest.endpoint).unwrap();
    let channel = VspChannel::create(interface, &channel_config(kmcl, 8, 64)).unwrap();
    guest.open_and_negotiate(kmcl).unwrap();
    for tag in 0..2 {
        channel
            .post(&PostRequest {
                tag,
                payload: b"hello",
                posted_at: 0,
                trace_id: None,
            })
            .unwrap();
    }
    kmcl.wait_idle();
    (channel, guest)
}

/// Found by the `control_ioctl` fuzz target in its first minute (SaveBegin, SaveContinue,
/// SaveContinue from a control client).
///
/// src/vsp/channel.rs, `VspChannel::save_continue`: it only checked that the phase is `Saving`,
/// so after `VmbChannelSaveContinue` returned `STATUS_SUCCESS` (the last chunk) a second request
/// calls `VmbChannelSaveContinue` again — a KMCL contract violation (the simulator records
/// `SaveSequence: VmbChannelSaveContinue after it returned STATUS_SUCCESS`) that any user-mode
/// control client can trigger. Expected: `Err(STATUS_INVALID_DEVICE_STATE)` without a KMCL call
/// (remember in the channel that the last chunk was produced; `save_end`/`resume` still work).
#[test]
fn save_continue_after_the_last_chunk_is_refused_without_a_kmcl_call() {
    let kmcl = Kmcl::new(SimConfig::default());
    {
        let interface = query_server_interface(&kmcl).unwrap();
        let (channel, _guest) = busy(&kmcl, &interface);
        channel.save_begin().unwrap();
        let mut buffer = vec![0u8; 1 << 16];
        let last = channel.save_continue(&mut buffer).unwrap();
        assert_eq!(
            last.status,
            NtStatus::SUCCESS,
            "one chunk holds the whole save"
        );
        assert_eq!(
            channel.save_continue(&mut buffer).map(|chunk| chunk.status),
            Err(NtStatus::INVALID_DEVICE_STATE)
        );
        channel.save_end().unwrap();
        channel.resume().unwrap();
        channel.disable().unwrap();
        kmcl.wait_idle();
    }
    assert_eq!(kmcl.finish(), Vec::new());
}

/// Found by the version-skew tests (the v1 golden channel record carries protocol version
/// 0x0003_0004).
///
/// src/vsp/channel.rs, `VspChannel::restore_channel_record`: docs/saved-state.md (channel record,
/// field `protocol_version`: "0 = not negotiated yet (the VSP checks it is one it speaks)") — the
/// code stored any value, so a channel restored from a newer build's save runs with a protocol
/// version this build does not speak (and keeps it across the guest's reopen). Expected:
/// `Err(STATUS_REVISION_MISMATCH)` for a version that is neither 0 nor in
/// `protocol::SUPPORTED_VERSIONS`, before anything is taken over.
#[test]
fn an_unspoken_protocol_version_is_refused() {
    let kmcl = Kmcl::new(SimConfig::default());
    let record = {
        let interface = query_server_interface(&kmcl).unwrap();
        let (channel, guest) = busy(&kmcl, &interface);
        let (stream, _, _) = save_channel(&channel, 4096).unwrap();
        guest.endpoint.detach();
        channel.complete_migration().unwrap();
        let frame = vmbsrv::saved::stream::FrameReader::new(&stream)
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        let mut record = ChannelRecord::decode(frame.payload).unwrap();
        record.protocol_version = 0x0002_0000;
        let mut bytes = [0u8; ChannelRecord::ENCODED_LEN];
        record.encode(&mut bytes).unwrap();
        bytes
    };
    assert_eq!(kmcl.finish(), Vec::new());
    let kmcl = Kmcl::new(SimConfig::default());
    {
        let interface = query_server_interface(&kmcl).unwrap();
        let channel: VspChannel<'_, Lock> =
            VspChannel::create_for_restore(&interface, &channel_config(&kmcl, 8, 64)).unwrap();
        assert_eq!(
            channel.restore_channel_record(&record),
            Err(NtStatus::REVISION_MISMATCH)
        );
    }
    assert_eq!(kmcl.finish(), Vec::new());
}
