//! The control interface end to end: IOCTL bytes in, IOCTL bytes out, over the KMCL simulator
//! and a guest that speaks the vmbsrv protocol.
// UNSAFETY: this test drives the KMCL ABI directly (raw table calls and `extern` callbacks).
#![allow(unsafe_code)]

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use kmcl_sim::{Guest, Kmcl, KmclCall, SimConfig, SimSpinLock};
use vmbsrv::kmcl::{NtStatus, ParentDevice, Result, ServerInterface, VmbusHandle};
use vmbsrv::saved::ChannelRecord;
use vmbsrv::saved::stream::{FrameKind, FrameReader, FrameWriter, frame_len};
use vmbsrv::vsp::control::wire::{self, *};
use vmbsrv::vsp::control::*;
use vmbsrv::vsp::{DeliveryTable, Outcome, OutcomeKind};
use vmbsrv_testkit::migration::{
    SCENARIO_INSTANCE, SCENARIO_INTERFACE_TYPE, query_server_interface,
};
use vmbsrv_testkit::{GuestModel, Ledger, Posted};
use zerocopy::{FromBytes, IntoBytes};

/// The simulator's spin-lock model, for the delivery tables and for the registry's own table.
type Lock = SimSpinLock<DeliveryTable>;
type Registry<'i> = ChannelRegistry<'i, Lock, SimSpinLock<ChannelTable<'i, Lock>>>;

const ALICE: OwnerId = OwnerId(0xA11CE);
const BOB: OwnerId = OwnerId(0xB0B);

/// Every kernel VMBus handle the registry closed, by value (the tests run in parallel, so each
/// test uses its own handle values).
static CLOSED: Mutex<Vec<usize>> = Mutex::new(Vec::new());
static CONVERTED: AtomicUsize = AtomicUsize::new(0);

fn close_handle(handle: VmbusHandle) {
    CLOSED.lock().unwrap().push(handle.as_raw() as usize);
}

fn closed(value: usize) -> usize {
    CLOSED
        .lock()
        .unwrap()
        .iter()
        .filter(|v| **v == value)
        .count()
}

struct Env<'i> {
    interface: &'i ServerInterface,
    parent: ParentDevice,
    clock: Instant,
    /// `convert_vmbus_handle` fails with this status.
    refuse_conversion: Option<NtStatus>,
}

impl<'i> ControlEnvironment<'i> for Env<'i> {
    fn server_interface(&self) -> &'i ServerInterface {
        self.interface
    }

    fn parent_device(&self) -> ParentDevice {
        self.parent
    }

    fn current_time(&self) -> u64 {
        self.clock.elapsed().as_nanos() as u64 / 100
    }

    fn convert_vmbus_handle(&self, user_handle: u64) -> Result<VmbusHandle> {
        if let Some(status) = self.refuse_conversion {
            return Err(status);
        }
        CONVERTED.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the simulator stores the handle as an opaque value and never dereferences it.
        Ok(unsafe { VmbusHandle::new(user_handle as usize as *mut core::ffi::c_void) })
    }
}

fn env<'i>(kmcl: &Kmcl, interface: &'i ServerInterface) -> Env<'i> {
    Env {
        interface,
        parent: kmcl.parent_device(),
        clock: Instant::now(),
        refuse_conversion: None,
    }
}

/// One IOCTL: returns how it completed and the output bytes it produced.
fn ioctl<'i>(
    registry: &Registry<'i>,
    env: &Env<'i>,
    owner: OwnerId,
    code: u32,
    input: &[u8],
    output_len: usize,
) -> (DispatchResult, Vec<u8>) {
    let mut output = vec![0xEEu8; output_len];
    let result = registry.dispatch(owner, code, input, &mut output, env);
    output.truncate(result.information);
    (result, output)
}

/// An IOCTL that must succeed; returns the response bytes after checking the header.
fn call<'i>(
    registry: &Registry<'i>,
    env: &Env<'i>,
    owner: OwnerId,
    code: u32,
    input: &[u8],
    output_len: usize,
) -> (NtStatus, Vec<u8>) {
    let (result, output) = ioctl(registry, env, owner, code, input, output_len);
    assert_eq!(result.status, NtStatus::SUCCESS, "IOCTL {code:#x} refused");
    let (header, _) = ResponseHeader::read_from_prefix(&output).unwrap();
    assert_eq!(header.version.get(), CONTROL_VERSION);
    assert_eq!(header.size.get() as usize, result.information);
    (header.op_status(), output)
}

fn create<'i>(
    registry: &Registry<'i>,
    env: &Env<'i>,
    owner: OwnerId,
    handle: u64,
    mode: u16,
) -> (NtStatus, u64) {
    let request = CreateChannelRequest::new(
        handle,
        SCENARIO_INTERFACE_TYPE,
        SCENARIO_INSTANCE,
        8,
        256,
        0,
        mode,
    );
    let (status, out) = call(
        registry,
        env,
        owner,
        IOCTL_VMBSRV_CREATE_CHANNEL,
        request.as_bytes(),
        24,
    );
    let response = CreateChannelResponse::read_from_bytes(&out).unwrap();
    (status, response.channel_id.get())
}

fn channel_op<'i>(
    registry: &Registry<'i>,
    env: &Env<'i>,
    owner: OwnerId,
    code: u32,
    id: u64,
    output_len: usize,
) -> (NtStatus, Vec<u8>) {
    call(
        registry,
        env,
        owner,
        code,
        ChannelRequest::new(id).as_bytes(),
        output_len,
    )
}

fn post<'i>(
    registry: &Registry<'i>,
    env: &Env<'i>,
    owner: OwnerId,
    id: u64,
    tag: u64,
    payload: &[u8],
) -> (NtStatus, u64) {
    let mut input = PostMessageRequest::new(id, tag, Some([tag as u8; 16]), payload.len() as u32)
        .as_bytes()
        .to_vec();
    input.extend_from_slice(payload);
    let (status, out) = call(registry, env, owner, IOCTL_VMBSRV_POST_MESSAGE, &input, 24);
    (
        status,
        PostMessageResponse::read_from_bytes(&out)
            .unwrap()
            .sequence
            .get(),
    )
}

fn statistics<'i>(
    registry: &Registry<'i>,
    env: &Env<'i>,
    owner: OwnerId,
    id: u64,
) -> (NtStatus, StatisticsResponse) {
    let (status, out) = channel_op(registry, env, owner, IOCTL_VMBSRV_QUERY_STATISTICS, id, 128);
    (status, StatisticsResponse::read_from_bytes(&out).unwrap())
}

fn to_outcome(entry: &OutcomeEntry) -> Outcome {
    let kind = match entry.kind.get() {
        wire::OUTCOME_ACKED => OutcomeKind::Acked,
        wire::OUTCOME_NACKED => OutcomeKind::Nacked {
            guest_status: entry.guest_status.get(),
        },
        wire::OUTCOME_CORRUPTED => OutcomeKind::Corrupted,
        wire::OUTCOME_BAD_ACK => OutcomeKind::BadAck,
        wire::OUTCOME_CANCELLED => OutcomeKind::Cancelled,
        wire::OUTCOME_MIGRATED => OutcomeKind::Migrated,
        other => panic!("unknown outcome kind {other}"),
    };
    Outcome {
        sequence: entry.sequence.get(),
        tag: entry.tag.get(),
        kind,
        attempts: entry.attempts.get(),
    }
}

/// Fetches with room for `room` entries; returns the outcomes and `remaining`.
fn fetch<'i>(
    registry: &Registry<'i>,
    env: &Env<'i>,
    owner: OwnerId,
    id: u64,
    max: u32,
    room: usize,
) -> (Vec<Outcome>, u32) {
    let request = FetchOutcomesRequest::new(id, max);
    let (status, out) = call(
        registry,
        env,
        owner,
        IOCTL_VMBSRV_FETCH_OUTCOMES,
        request.as_bytes(),
        24 + 24 * room,
    );
    assert_eq!(status, NtStatus::SUCCESS);
    let (response, entries) = FetchOutcomesResponse::read_from_prefix(&out).unwrap();
    let count = response.count.get() as usize;
    assert_eq!(entries.len(), count * OUTCOME_ENTRY_LEN);
    let outcomes = entries
        .chunks_exact(OUTCOME_ENTRY_LEN)
        .map(|bytes| to_outcome(&OutcomeEntry::read_from_bytes(bytes).unwrap()))
        .collect();
    (outcomes, response.remaining.get())
}

fn fetch_all<'i>(registry: &Registry<'i>, env: &Env<'i>, owner: OwnerId, id: u64) -> Vec<Outcome> {
    let (outcomes, remaining) = fetch(registry, env, owner, id, 65536, 64);
    assert_eq!(remaining, 0);
    outcomes
}

fn payload(tag: u64) -> Vec<u8> {
    (0..(tag as usize % 200 + 1))
        .map(|i| (i as u64 ^ tag) as u8)
        .collect()
}

#[test]
fn query_info_reports_the_limits() {
    let kmcl = Kmcl::new(SimConfig::default());
    let interface = query_server_interface(&kmcl).unwrap();
    let env = env(&kmcl, &interface);
    let registry = Registry::try_new(4, close_handle).unwrap();
    let (status, out) = call(
        &registry,
        &env,
        ALICE,
        IOCTL_VMBSRV_QUERY_INFO,
        RequestHeader::new(8).as_bytes(),
        48,
    );
    assert_eq!(status, NtStatus::SUCCESS);
    let info = InfoResponse::read_from_bytes(&out).unwrap();
    assert_eq!(info.control_version.get(), 1);
    assert_eq!(info.guest_protocol_version.get(), 0x0001_0000);
    assert_eq!(info.max_channels.get(), 4);
    assert_eq!(info.channels_in_use.get(), 0);
    assert_eq!(info.max_message_len.get(), 65536);
    assert_eq!(info.max_chunk_len.get(), 16 * 1024 * 1024);
    drop(registry);
    kmcl.assert_no_violations();
}

#[test]
fn post_fetch_statistics_destroy() {
    let kmcl = Kmcl::new(SimConfig::default());
    let interface = query_server_interface(&kmcl).unwrap();
    let env = env(&kmcl, &interface);
    let registry = Registry::try_new(4, close_handle).unwrap();
    let mut guest = GuestModel::new(Guest::new(SCENARIO_INTERFACE_TYPE, SCENARIO_INSTANCE));
    kmcl.attach_guest(&guest.endpoint).unwrap();

    let (status, id) = create(&registry, &env, ALICE, 0, CREATE_MODE_START);
    assert_eq!(status, NtStatus::SUCCESS);
    assert_ne!(id, 0);

    // Before the guest negotiated, a post is refused by the channel (not by the IOCTL).
    let (status, sequence) = post(&registry, &env, ALICE, id, 1, b"early");
    assert_eq!((status, sequence), (NtStatus::INVALID_DEVICE_STATE, 0));

    guest.open_and_negotiate(&kmcl).unwrap();
    let mut ledger = Ledger::new();
    for tag in 0..6u64 {
        let payload = payload(tag);
        let (status, sequence) = post(&registry, &env, ALICE, id, tag, &payload);
        assert_eq!(status, NtStatus::SUCCESS);
        ledger.posted(sequence, Posted::new(tag, &payload));
    }
    // Over the channel's own limit (256): the channel says so.
    let (status, _) = post(&registry, &env, ALICE, id, 99, &[0u8; 257]);
    assert_eq!(status, NtStatus::INVALID_BUFFER_SIZE);

    kmcl.wait_idle();
    guest.pump(&mut ledger);
    assert_eq!(guest.acknowledge(6, None), 6);
    kmcl.wait_idle();

    // Room for two entries: two come back, the rest stay recorded.
    let (first, remaining) = fetch(&registry, &env, ALICE, id, 10, 2);
    assert_eq!((first.len(), remaining), (2, 4));
    // `max` bounds it too.
    let (second, remaining) = fetch(&registry, &env, ALICE, id, 1, 10);
    assert_eq!((second.len(), remaining), (1, 3));
    // No room at all: a peek at `remaining`.
    let (none, remaining) = fetch(&registry, &env, ALICE, id, 10, 0);
    assert_eq!((none.len(), remaining), (0, 3));
    let rest = fetch_all(&registry, &env, ALICE, id);
    assert_eq!(rest.len(), 3);
    for outcome in first.iter().chain(&second).chain(&rest) {
        assert_eq!(outcome.kind, OutcomeKind::Acked);
        assert_eq!(outcome.attempts, 1);
        ledger.outcome(outcome);
    }
    let verdict = ledger.verdict();
    assert!(verdict.is_clean() && verdict.delivered == 6, "{verdict:?}");

    let (status, stats) = statistics(&registry, &env, ALICE, id);
    assert_eq!(status, NtStatus::SUCCESS);
    assert_eq!(stats.phase.get(), 4, "Running");
    assert_eq!(stats.posted.get(), 6);
    assert_eq!(stats.acked.get(), 6);
    assert_eq!(stats.in_flight.get(), 0);
    assert_eq!(stats.next_sequence.get(), 7);
    assert_eq!(stats.protocol_version.get(), 0x0001_0000);
    assert_eq!(stats.max_in_flight.get(), 8);
    assert_eq!(stats.max_message_len.get(), 256);
    assert_eq!(stats.flags.get(), 0);

    // Two posts the guest never acknowledges: the destroy cancels them and reports them.
    assert_eq!(
        post(&registry, &env, ALICE, id, 100, b"x").0,
        NtStatus::SUCCESS
    );
    assert_eq!(
        post(&registry, &env, ALICE, id, 101, b"y").0,
        NtStatus::SUCCESS
    );
    kmcl.wait_idle();
    let (status, out) = channel_op(&registry, &env, ALICE, IOCTL_VMBSRV_DESTROY_CHANNEL, id, 24);
    assert_eq!(status, NtStatus::SUCCESS);
    let destroyed = DestroyChannelResponse::read_from_bytes(&out).unwrap();
    assert_eq!(destroyed.unfetched_outcomes.get(), 2);
    assert_eq!(destroyed.in_flight.get(), 0);
    assert_eq!(registry.channels_in_use(), 0);
    let (status, _) = statistics(&registry, &env, ALICE, id);
    assert_eq!(status, NtStatus::NOT_FOUND);
    drop(registry);
    drop(interface);
    assert!(kmcl.finish().is_empty());
}

#[test]
fn owners_are_isolated_and_cleanup_destroys_their_channels() {
    let kmcl = Kmcl::new(SimConfig::default());
    let interface = query_server_interface(&kmcl).unwrap();
    let env = env(&kmcl, &interface);
    let registry = Registry::try_new(4, close_handle).unwrap();
    let (_, alice) = create(&registry, &env, ALICE, 0x7001, CREATE_MODE_START);
    let (_, bob) = create(&registry, &env, BOB, 0x7002, CREATE_MODE_START);
    assert!(CONVERTED.load(Ordering::Relaxed) >= 2);

    for code in [
        IOCTL_VMBSRV_QUERY_STATISTICS,
        IOCTL_VMBSRV_SAVE_BEGIN,
        IOCTL_VMBSRV_DESTROY_CHANNEL,
        IOCTL_VMBSRV_DISABLE_CHANNEL,
    ] {
        let (status, _) = channel_op(&registry, &env, BOB, code, alice, 4096);
        assert_eq!(status, NtStatus::NOT_FOUND, "{code:#x}");
    }
    assert_eq!(
        post(&registry, &env, BOB, alice, 1, b"m").0,
        NtStatus::NOT_FOUND
    );
    // Unknown and zero ids.
    assert_eq!(statistics(&registry, &env, ALICE, 0).0, NtStatus::NOT_FOUND);
    assert_eq!(
        statistics(&registry, &env, ALICE, alice + 1).0,
        NtStatus::NOT_FOUND
    );

    assert_eq!(registry.destroy_owned_by(ALICE), 1);
    assert_eq!(
        closed(0x7001),
        1,
        "the VMBus handle is closed with the channel"
    );
    assert_eq!(
        statistics(&registry, &env, ALICE, alice).0,
        NtStatus::NOT_FOUND
    );
    assert_eq!(statistics(&registry, &env, BOB, bob).0, NtStatus::SUCCESS);
    assert_eq!(registry.channels_in_use(), 1);

    // A new channel in the freed slot gets a new id; the old one stays dead.
    let (_, again) = create(&registry, &env, ALICE, 0, CREATE_MODE_START);
    assert_ne!(again, alice);
    assert_eq!(again & 0xFFFF_FFFF, alice & 0xFFFF_FFFF, "same slot");
    assert_eq!(
        statistics(&registry, &env, ALICE, alice).0,
        NtStatus::NOT_FOUND
    );

    drop(registry);
    assert_eq!(closed(0x7002), 1, "dropping the registry closes the rest");
    drop(interface);
    assert!(kmcl.finish().is_empty());
}

#[test]
fn a_busy_channel_reports_device_busy_and_cleanup_waits_for_its_request() {
    let kmcl = Kmcl::new(SimConfig::default());
    let interface = query_server_interface(&kmcl).unwrap();
    let env = env(&kmcl, &interface);
    let registry = Registry::try_new(2, close_handle).unwrap();
    let (_, id) = create(&registry, &env, ALICE, 0x7101, CREATE_MODE_START);
    registry
        .with_channel(ALICE, id, |_channel| {
            // A second request on the same channel while this one holds it.
            let (status, _) = statistics(&registry, &env, ALICE, id);
            assert_eq!(status, STATUS_DEVICE_BUSY);
            // Bob still learns nothing.
            assert_eq!(statistics(&registry, &env, BOB, id).0, NtStatus::NOT_FOUND);
            // The owner goes away: the channel is doomed, not destroyed under our feet.
            assert_eq!(registry.destroy_owned_by(ALICE), 1);
            assert_eq!(closed(0x7101), 0);
        })
        .unwrap();
    // The request finished: now it is gone.
    assert_eq!(closed(0x7101), 1);
    assert_eq!(registry.channels_in_use(), 0);
    assert_eq!(
        statistics(&registry, &env, ALICE, id).0,
        NtStatus::NOT_FOUND
    );
    drop(registry);
    drop(interface);
    assert!(kmcl.finish().is_empty());
}

#[test]
fn failed_creations_free_their_slot_and_handle() {
    let kmcl = Kmcl::new(SimConfig::default());
    let interface = query_server_interface(&kmcl).unwrap();
    let mut env = env(&kmcl, &interface);
    let registry = Registry::try_new(1, close_handle).unwrap();

    // KMCL refuses part of the bring-up.
    kmcl.fail_next(
        KmclCall::ServerChannelInitSetTargetInterfaceId,
        NtStatus::INSUFFICIENT_RESOURCES,
    );
    let (status, id) = create(&registry, &env, ALICE, 0x7201, CREATE_MODE_START);
    assert_eq!((status, id), (NtStatus::INSUFFICIENT_RESOURCES, 0));
    assert_eq!(closed(0x7201), 1);
    assert_eq!(registry.channels_in_use(), 0);

    // The handle cannot be converted.
    env.refuse_conversion = Some(NtStatus::INVALID_PARAMETER_1);
    let (status, id) = create(&registry, &env, ALICE, 0x7202, CREATE_MODE_START);
    assert_eq!((status, id), (NtStatus::INVALID_PARAMETER_1, 0));
    assert_eq!(closed(0x7202), 0, "nothing was converted, nothing to close");
    env.refuse_conversion = None;

    // The registry is full.
    let (status, _) = create(&registry, &env, ALICE, 0, CREATE_MODE_START);
    assert_eq!(status, NtStatus::SUCCESS);
    let (status, id) = create(&registry, &env, BOB, 0, CREATE_MODE_START);
    assert_eq!((status, id), (NtStatus::QUOTA_EXCEEDED, 0));
    drop(registry);
    drop(interface);
    kmcl.clear_faults();
    let violations = kmcl.finish();
    // The injected failure is not a driver violation; nothing else may be recorded.
    assert!(violations.is_empty(), "{violations:?}");
}

#[test]
fn malformed_requests_fail_the_ioctl_without_output_or_effect() {
    let kmcl = Kmcl::new(SimConfig::default());
    let interface = query_server_interface(&kmcl).unwrap();
    let env = env(&kmcl, &interface);
    let registry = Registry::try_new(2, close_handle).unwrap();
    let good =
        CreateChannelRequest::new(0, SCENARIO_INTERFACE_TYPE, SCENARIO_INSTANCE, 8, 256, 0, 1);
    let cases: Vec<(u32, Vec<u8>, usize, NtStatus)> = vec![
        (
            0x0022_2000,
            good.as_bytes().to_vec(),
            24,
            NtStatus::INVALID_DEVICE_REQUEST,
        ),
        (
            IOCTL_VMBSRV_CREATE_CHANNEL,
            good.as_bytes()[..63].to_vec(),
            24,
            NtStatus::INVALID_BUFFER_SIZE,
        ),
        (
            IOCTL_VMBSRV_CREATE_CHANNEL,
            good.as_bytes().to_vec(),
            23,
            NtStatus::BUFFER_TOO_SMALL,
        ),
        (
            IOCTL_VMBSRV_CREATE_CHANNEL,
            {
                let mut bad = good;
                bad.header.version = 2.into();
                bad.as_bytes().to_vec()
            },
            24,
            NtStatus::REVISION_MISMATCH,
        ),
        (
            IOCTL_VMBSRV_CREATE_CHANNEL,
            {
                let mut bad = good;
                bad.mode = 7.into();
                bad.as_bytes().to_vec()
            },
            24,
            NtStatus::INVALID_PARAMETER,
        ),
    ];
    for (code, input, output_len, expected) in cases {
        let (result, output) = ioctl(&registry, &env, ALICE, code, &input, output_len);
        assert_eq!(
            result,
            DispatchResult {
                status: expected,
                information: 0
            }
        );
        assert!(output.is_empty());
    }
    assert_eq!(registry.channels_in_use(), 0, "no side effect");
    // The shared-buffer form rejects lengths beyond its buffer.
    let mut buffer = [0u8; 16];
    let result =
        registry.dispatch_buffered(ALICE, IOCTL_VMBSRV_QUERY_INFO, &mut buffer, 8, 48, &env);
    assert_eq!(result.status, NtStatus::INVALID_PARAMETER);
    drop(registry);
    drop(interface);
    assert!(kmcl.finish().is_empty());
}

#[test]
fn the_shared_system_buffer_is_read_then_overwritten() {
    let kmcl = Kmcl::new(SimConfig::default());
    let interface = query_server_interface(&kmcl).unwrap();
    let env = env(&kmcl, &interface);
    let registry = Registry::try_new(2, close_handle).unwrap();
    let guest = GuestModel::new(Guest::new(SCENARIO_INTERFACE_TYPE, SCENARIO_INSTANCE));
    kmcl.attach_guest(&guest.endpoint).unwrap();
    // METHOD_BUFFERED: one buffer of max(input, output) bytes.
    let create =
        CreateChannelRequest::new(0, SCENARIO_INTERFACE_TYPE, SCENARIO_INSTANCE, 8, 256, 0, 1);
    let mut buffer = create.as_bytes().to_vec();
    let result = registry.dispatch_buffered(
        ALICE,
        IOCTL_VMBSRV_CREATE_CHANNEL,
        &mut buffer,
        64,
        24,
        &env,
    );
    assert_eq!(result.information, 24);
    let id = CreateChannelResponse::read_from_bytes(&buffer[..24])
        .unwrap()
        .channel_id
        .get();
    guest.open_and_negotiate(&kmcl).unwrap();
    let message = b"in place";
    let mut buffer = PostMessageRequest::new(id, 5, None, message.len() as u32)
        .as_bytes()
        .to_vec();
    buffer.extend_from_slice(message);
    let input_len = buffer.len();
    let result = registry.dispatch_buffered(
        ALICE,
        IOCTL_VMBSRV_POST_MESSAGE,
        &mut buffer,
        input_len,
        24,
        &env,
    );
    assert_eq!(
        result,
        DispatchResult {
            status: NtStatus::SUCCESS,
            information: 24
        }
    );
    let response = PostMessageResponse::read_from_bytes(&buffer[..24]).unwrap();
    assert_eq!(response.header.op_status(), NtStatus::SUCCESS);
    assert_eq!(response.sequence.get(), 1);
    kmcl.wait_idle();
    let packet = guest.endpoint.receive().unwrap();
    let delivery = vmbsrv::vsp::protocol::parse_delivery(&packet.bytes).unwrap();
    assert_eq!(delivery.payload, message);
    assert_eq!(delivery.tag, 5);
    drop(registry);
    drop(interface);
    assert!(kmcl.finish().is_empty());
}

/// Saves channel `id` through the control interface into a save stream file, as a host tool
/// would: the channel record frame, one frame per KMCL chunk, End.
fn save_to_stream<'i>(
    registry: &Registry<'i>,
    env: &Env<'i>,
    owner: OwnerId,
    id: u64,
    chunk_room: usize,
) -> Vec<u8> {
    let (status, out) = channel_op(
        registry,
        env,
        owner,
        IOCTL_VMBSRV_SAVE_BEGIN,
        id,
        SAVE_BEGIN_RECOMMENDED_OUTPUT_LEN,
    );
    assert_eq!(status, NtStatus::SUCCESS);
    let (begin, record) = SaveBeginResponse::read_from_prefix(&out).unwrap();
    assert_eq!(begin.record_len.get() as usize, record.len());
    let (_, identity) = ChannelRecord::decode_saved(record).unwrap();
    let identity = identity.expect("a save writes its identity");
    assert_eq!(
        record.len(),
        ChannelRecord::ENCODED_LEN + 4 + 16,
        "{identity:?}"
    );
    let record = record.to_vec();

    let mut chunks: Vec<Vec<u8>> = Vec::new();
    let mut room = chunk_room;
    let mut grew = false;
    loop {
        let (status, out) = channel_op(
            registry,
            env,
            owner,
            IOCTL_VMBSRV_SAVE_CONTINUE,
            id,
            SAVE_CONTINUE_RESPONSE_LEN + room,
        );
        assert_eq!(status, NtStatus::SUCCESS);
        let (response, chunk) = SaveContinueResponse::read_from_prefix(&out).unwrap();
        let kmcl_status = NtStatus(response.kmcl_status.get());
        match kmcl_status {
            NtStatus::SUCCESS | NtStatus::BUFFER_OVERFLOW => {
                assert_eq!(chunk.len(), response.bytes_filled.get() as usize);
                assert!(!chunk.is_empty());
                chunks.push(chunk.to_vec());
                if kmcl_status == NtStatus::SUCCESS {
                    break;
                }
            }
            NtStatus::BUFFER_TOO_SMALL => {
                assert!(chunk.is_empty());
                let required = response.bytes_required.get() as usize;
                assert!(required > room);
                room = required;
                grew = true;
            }
            other => panic!("SaveContinue: {other:?}"),
        }
    }
    assert!(grew || chunk_room > 0);
    let (status, _) = channel_op(registry, env, owner, IOCTL_VMBSRV_SAVE_END, id, 16);
    assert_eq!(status, NtStatus::SUCCESS);

    let total = chunks
        .iter()
        .map(Vec::len)
        .chain([record.len()])
        .map(|len| frame_len(len).unwrap())
        .sum::<usize>()
        + vmbsrv::saved::stream::STREAM_HEADER_LEN
        + vmbsrv::saved::stream::FRAME_HEADER_LEN;
    let mut stream = vec![0u8; total];
    let mut writer = FrameWriter::new(&mut stream).unwrap();
    writer.push(FrameKind::ChannelRecord, &record).unwrap();
    for chunk in &chunks {
        writer.push(FrameKind::KmclChunk, chunk).unwrap();
    }
    let written = writer.finish();
    assert_eq!(written, total);
    stream
}

/// Replays a save stream file into a channel created with mode ForRestore.
fn restore_from_stream<'i>(
    registry: &Registry<'i>,
    env: &Env<'i>,
    owner: OwnerId,
    id: u64,
    stream: &[u8],
) {
    let mut progress = 0;
    for frame in FrameReader::new(stream).unwrap() {
        let frame = frame.unwrap();
        let mut input = ChannelDataRequest::new(id, frame.payload.len() as u32)
            .as_bytes()
            .to_vec();
        input.extend_from_slice(frame.payload);
        match frame.kind {
            FrameKind::ChannelRecord => {
                let (status, _) = call(
                    registry,
                    env,
                    owner,
                    IOCTL_VMBSRV_RESTORE_CHANNEL_RECORD,
                    &input,
                    16,
                );
                assert_eq!(status, NtStatus::SUCCESS);
            }
            FrameKind::KmclChunk => {
                let (status, out) =
                    call(registry, env, owner, IOCTL_VMBSRV_RESTORE_CHUNK, &input, 24);
                assert_eq!(status, NtStatus::SUCCESS);
                progress = RestoreChunkResponse::read_from_bytes(&out)
                    .unwrap()
                    .progress
                    .get();
            }
        }
    }
    assert_eq!(progress, RESTORE_COMPLETE);
    let (status, _) = channel_op(registry, env, owner, IOCTL_VMBSRV_FINISH_RESTORE, id, 16);
    assert_eq!(status, NtStatus::SUCCESS);
}

#[test]
fn migration_through_the_control_interface_delivers_exactly_once() {
    let mut ledger = Ledger::new();
    let mut guest = GuestModel::new(Guest::new(SCENARIO_INTERFACE_TYPE, SCENARIO_INSTANCE));

    // Source.
    let kmcl_a = Kmcl::new(SimConfig::default());
    let stream = {
        let interface = query_server_interface(&kmcl_a).unwrap();
        let env = env(&kmcl_a, &interface);
        let registry = Registry::try_new(2, close_handle).unwrap();
        kmcl_a.attach_guest(&guest.endpoint).unwrap();
        let (_, id) = create(&registry, &env, ALICE, 0, CREATE_MODE_START);
        guest.open_and_negotiate(&kmcl_a).unwrap();
        for tag in 0..8u64 {
            let payload = payload(tag);
            let (status, sequence) = post(&registry, &env, ALICE, id, tag, &payload);
            assert_eq!(status, NtStatus::SUCCESS);
            ledger.posted(sequence, Posted::new(tag, &payload));
        }
        kmcl_a.wait_idle();
        guest.pump(&mut ledger);
        guest.acknowledge(3, None);
        kmcl_a.wait_idle();
        for outcome in fetch_all(&registry, &env, ALICE, id) {
            ledger.outcome(&outcome);
        }
        // A save aborted by Resume leaves the channel running.
        let (status, _) = channel_op(
            &registry,
            &env,
            ALICE,
            IOCTL_VMBSRV_SAVE_BEGIN,
            id,
            SAVE_BEGIN_MIN_OUTPUT_LEN,
        );
        assert_eq!(status, NtStatus::SUCCESS);
        assert_eq!(
            statistics(&registry, &env, ALICE, id).1.phase.get(),
            5,
            "Saving"
        );
        let (status, _) = channel_op(&registry, &env, ALICE, IOCTL_VMBSRV_RESUME, id, 16);
        assert_eq!(status, NtStatus::SUCCESS);
        assert_eq!(
            statistics(&registry, &env, ALICE, id).1.phase.get(),
            4,
            "Running"
        );

        // The real save, starting with no chunk room at all so that KMCL says how much it needs.
        let stream = save_to_stream(&registry, &env, ALICE, id, 0);
        guest.endpoint.detach();
        let (status, _) = channel_op(
            &registry,
            &env,
            ALICE,
            IOCTL_VMBSRV_COMPLETE_MIGRATION,
            id,
            16,
        );
        assert_eq!(status, NtStatus::SUCCESS);
        kmcl_a.wait_idle();
        let handed_over = fetch_all(&registry, &env, ALICE, id);
        assert_eq!(handed_over.len(), 5);
        for outcome in &handed_over {
            assert_eq!(outcome.kind, OutcomeKind::Migrated);
            ledger.outcome(outcome);
        }
        let (status, _) = channel_op(&registry, &env, ALICE, IOCTL_VMBSRV_DESTROY_CHANNEL, id, 24);
        assert_eq!(status, NtStatus::SUCCESS);
        drop(registry);
        drop(interface);
        stream
    };
    assert!(kmcl_a.finish().is_empty());

    // Destination.
    let kmcl_b = Kmcl::new(SimConfig::default());
    {
        let interface = query_server_interface(&kmcl_b).unwrap();
        let env = env(&kmcl_b, &interface);
        let registry = Registry::try_new(2, close_handle).unwrap();
        let (status, id) = create(&registry, &env, ALICE, 0, CREATE_MODE_FOR_RESTORE);
        assert_eq!(status, NtStatus::SUCCESS);
        assert_eq!(
            statistics(&registry, &env, ALICE, id).1.phase.get(),
            0,
            "Initialized"
        );
        restore_from_stream(&registry, &env, ALICE, id, &stream);
        kmcl_b.attach_guest(&guest.endpoint).unwrap();
        kmcl_b.wait_idle();
        let (_, stats) = statistics(&registry, &env, ALICE, id);
        assert_eq!(stats.in_flight.get(), 5);
        assert_eq!(
            stats.next_sequence.get(),
            9,
            "the sequence counter travelled"
        );
        // More traffic on the destination, then everything is acknowledged.
        for tag in 8..10u64 {
            let payload = payload(tag);
            let (status, sequence) = post(&registry, &env, ALICE, id, tag, &payload);
            assert_eq!(status, NtStatus::SUCCESS);
            ledger.posted(sequence, Posted::new(tag, &payload));
        }
        kmcl_b.wait_idle();
        guest.pump(&mut ledger);
        guest.acknowledge(usize::MAX, None);
        kmcl_b.wait_idle();
        let outcomes = fetch_all(&registry, &env, ALICE, id);
        assert_eq!(outcomes.len(), 7);
        for outcome in &outcomes {
            let restored = outcome.sequence <= 8;
            assert_eq!(
                outcome.attempts,
                if restored { 2 } else { 1 },
                "{outcome:?}"
            );
            ledger.outcome(outcome);
        }
        drop(registry);
        drop(interface);
    }
    assert!(kmcl_b.finish().is_empty());
    let verdict = ledger.verdict();
    assert!(verdict.is_clean(), "{verdict:?}");
    assert_eq!(verdict.delivered, 10);
}

#[test]
fn a_garbled_guest_packet_is_answered_and_never_stops_the_queue() {
    let kmcl = Kmcl::new(SimConfig::default());
    let interface = query_server_interface(&kmcl).unwrap();
    let env = env(&kmcl, &interface);
    let registry = Registry::try_new(1, close_handle).unwrap();
    let guest = GuestModel::new(Guest::new(SCENARIO_INTERFACE_TYPE, SCENARIO_INSTANCE));
    kmcl.attach_guest(&guest.endpoint).unwrap();
    let (_, id) = create(&registry, &env, ALICE, 0, CREATE_MODE_START);
    guest.open_and_negotiate(&kmcl).unwrap();

    // Wrong signature: garbled framing, answered with an error reply (never
    // VmbChannelPacketFail, whose effect on the packet KMCL leaves undocumented); the flag the
    // first interface defined for a stopped queue is never set.
    let garbled = guest.endpoint.send_request(&[0xFF; 16]).unwrap();
    kmcl.wait_idle();
    let (_, stats) = statistics(&registry, &env, ALICE, id);
    assert_eq!(stats.flags.get() & STATS_FLAG_INCOMING_STOPPED, 0);
    assert_eq!(stats.guest_garbled.get(), 1);
    assert!(matches!(
        guest.endpoint.take_reply(garbled),
        Some(kmcl_sim::Reply::Completed(_))
    ));
    // RestartIncoming is still accepted (a pause and a start) for clients of the first interface.

    let (status, _) = channel_op(
        &registry,
        &env,
        ALICE,
        IOCTL_VMBSRV_RESTART_INCOMING,
        id,
        16,
    );
    assert_eq!(status, NtStatus::SUCCESS);
    kmcl.wait_idle();
    let (_, stats) = statistics(&registry, &env, ALICE, id);
    assert_eq!(stats.flags.get(), 0);
    assert_eq!(stats.phase.get(), 4, "Running");
    // RestartIncoming is for a running channel only.
    let (status, _) = channel_op(&registry, &env, ALICE, IOCTL_VMBSRV_DISABLE_CHANNEL, id, 16);
    assert_eq!(status, NtStatus::SUCCESS);
    let (status, _) = channel_op(
        &registry,
        &env,
        ALICE,
        IOCTL_VMBSRV_RESTART_INCOMING,
        id,
        16,
    );
    assert_eq!(status, NtStatus::INVALID_DEVICE_STATE);
    drop(registry);
    drop(interface);
    assert!(kmcl.finish().is_empty());
}

#[test]
fn destroying_a_channel_mid_save_ends_the_save() {
    let kmcl = Kmcl::new(SimConfig::default());
    let interface = query_server_interface(&kmcl).unwrap();
    let env = env(&kmcl, &interface);
    let registry = Registry::try_new(2, close_handle).unwrap();
    let (_, first) = create(&registry, &env, ALICE, 0, CREATE_MODE_START);
    let (_, second) = create(&registry, &env, ALICE, 0, CREATE_MODE_START);
    for id in [first, second] {
        let (status, _) = channel_op(
            &registry,
            &env,
            ALICE,
            IOCTL_VMBSRV_SAVE_BEGIN,
            id,
            SAVE_BEGIN_MIN_OUTPUT_LEN,
        );
        assert_eq!(status, NtStatus::SUCCESS);
    }
    let before = kmcl.call_count(KmclCall::ChannelSaveEnd);
    let (status, _) = channel_op(
        &registry,
        &env,
        ALICE,
        IOCTL_VMBSRV_DESTROY_CHANNEL,
        first,
        24,
    );
    assert_eq!(status, NtStatus::SUCCESS);
    // The client dies mid-save: its cleanup ends the other save too.
    assert_eq!(registry.destroy_owned_by(ALICE), 1);
    assert_eq!(kmcl.call_count(KmclCall::ChannelSaveEnd), before + 2);
    drop(registry);
    drop(interface);
    assert!(kmcl.finish().is_empty());
}
