//! The in-process transport: vmbsrv's control dispatcher over the KMCL simulator.
//!
//! [`SimHost`] is one simulated host: a `kmcl_sim::Kmcl` instance, its server interface, and a
//! `ChannelRegistry` — the driver's own dispatcher, called exactly as `EvtIoDeviceControl` calls
//! it (`tests/control_e2e.rs` drives the same path). [`SimGuest`] is a guest that speaks the
//! vmbsrv protocol and keeps an exactly-once [`Ledger`]; it can move from one host to another, which
//! is what [`run_demo`] does.
//!
//! The simulator instance and its server interface are leaked (`Box::leak`): the registry borrows
//! the interface for the host's whole life, and a tool process or a test ends soon after. The
//! simulated host has no VMBus handles: a `CreateChannel` that names one fails with
//! `STATUS_INVALID_PARAMETER` from the handle conversion, as a handle from another process would.
#![forbid(unsafe_code)]

use std::time::Instant;

use kmcl_sim::{Guest, Kmcl, SimConfig, SimSpinLock};
use serde::Serialize;
use vmbsrv::kmcl::{NtStatus, ParentDevice, Result as KmclResult, ServerInterface, VmbusHandle};
use vmbsrv::vsp::control::{ChannelRegistry, ChannelTable, ControlEnvironment, OwnerId};
use vmbsrv::vsp::{DeliveryTable, Outcome, OutcomeKind};
use vmbsrv_testkit::migration::{
    SCENARIO_INSTANCE, SCENARIO_INTERFACE_TYPE, query_server_interface,
};
use vmbsrv_testkit::{GuestModel, Ledger, Posted, Verdict};

use crate::{
    ChannelConfig, Client, CreateMode, Error, Failure, IoctlError, OutcomeKindName, OutcomeRecord,
    PostOptions, Progress, Transport,
};

type Lock = SimSpinLock<DeliveryTable>;
type Registry = ChannelRegistry<'static, Lock, SimSpinLock<ChannelTable<'static, Lock>>>;

/// The owner every request of a [`SimHost`] comes from (one control handle).
pub const SIM_OWNER: OwnerId = OwnerId(0x5117);

/// Registry capacity of a simulated host.
pub const SIM_MAX_CHANNELS: u32 = 16;

fn close_handle(_handle: VmbusHandle) {}

struct Env {
    interface: &'static ServerInterface,
    parent: ParentDevice,
    clock: Instant,
}

impl ControlEnvironment<'static> for Env {
    fn server_interface(&self) -> &'static ServerInterface {
        self.interface
    }

    fn parent_device(&self) -> ParentDevice {
        self.parent
    }

    fn current_time(&self) -> u64 {
        u64::try_from(self.clock.elapsed().as_nanos() / 100).unwrap_or(u64::MAX)
    }

    fn convert_vmbus_handle(&self, _user_handle: u64) -> KmclResult<VmbusHandle> {
        Err(NtStatus::INVALID_PARAMETER)
    }
}

/// One simulated host running vmbsrv's control dispatcher.
pub struct SimHost {
    kmcl: &'static Kmcl,
    env: Env,
    registry: Registry,
}

impl std::fmt::Debug for SimHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimHost")
            .field("channels_in_use", &self.registry.channels_in_use())
            .finish_non_exhaustive()
    }
}

impl SimHost {
    /// A new simulated host with its own simulator instance.
    pub fn new() -> Result<Self, Error> {
        let kmcl: &'static Kmcl = Box::leak(Box::new(Kmcl::new(SimConfig::default())));
        let interface = query_server_interface(kmcl).map_err(|e| {
            Error::new(
                None,
                Failure::Transport,
                e.status,
                format!("simulator: {}", e.step),
            )
        })?;
        let interface: &'static ServerInterface = Box::leak(Box::new(interface));
        let registry = Registry::try_new(SIM_MAX_CHANNELS, close_handle).map_err(|status| {
            Error::new(None, Failure::Transport, status, "simulator: registry")
        })?;
        Ok(Self {
            kmcl,
            env: Env {
                interface,
                parent: kmcl.parent_device(),
                clock: Instant::now(),
            },
            registry,
        })
    }

    /// The simulator instance.
    pub fn kmcl(&self) -> &'static Kmcl {
        self.kmcl
    }

    /// Waits until the simulator's workers are idle.
    pub fn wait_idle(&self) {
        self.kmcl.wait_idle();
    }
}

impl Transport for SimHost {
    fn ioctl(&mut self, code: u32, input: &[u8], output: &mut [u8]) -> Result<usize, IoctlError> {
        let result = self
            .registry
            .dispatch(SIM_OWNER, code, input, output, &self.env);
        if result.status == NtStatus::SUCCESS {
            Ok(result.information)
        } else {
            Err(IoctlError::Status(result.status))
        }
    }
}

/// A simulated guest speaking the vmbsrv protocol, with an exactly-once ledger.
pub struct SimGuest {
    model: GuestModel,
    ledger: Ledger,
}

impl std::fmt::Debug for SimGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimGuest").finish_non_exhaustive()
    }
}

impl Default for SimGuest {
    fn default() -> Self {
        Self::new()
    }
}

impl SimGuest {
    /// A guest for the scenario channel GUIDs ([`sim_channel_config`]).
    pub fn new() -> Self {
        Self {
            model: GuestModel::new(Guest::new(SCENARIO_INTERFACE_TYPE, SCENARIO_INSTANCE)),
            ledger: Ledger::new(),
        }
    }

    /// Plugs the guest into `host` (the VM runs there).
    pub fn attach(&self, host: &SimHost) -> Result<(), Error> {
        host.kmcl.attach_guest(&self.model.endpoint).map_err(|e| {
            Error::new(
                None,
                Failure::Transport,
                NtStatus::UNSUCCESSFUL,
                format!("simulator: attach guest: {e:?}"),
            )
        })
    }

    /// Unplugs the guest (the VM is paused for the save).
    pub fn detach(&self) {
        self.model.endpoint.detach();
    }

    /// Opens the channel and negotiates the protocol.
    pub fn open(&self, host: &SimHost) -> Result<(), Error> {
        self.model
            .open_and_negotiate(host.kmcl)
            .map(drop)
            .map_err(|e| {
                Error::new(
                    None,
                    Failure::Transport,
                    NtStatus::UNSUCCESSFUL,
                    format!("simulated guest: {e}"),
                )
            })
    }

    /// Records a post in the ledger.
    pub fn posted(&mut self, sequence: u64, tag: u64, payload: &[u8]) {
        self.ledger.posted(sequence, Posted::new(tag, payload));
    }

    /// Reads the ring and acknowledges up to `count` held packets; returns how many.
    pub fn acknowledge(&mut self, host: &SimHost, count: usize) -> usize {
        host.wait_idle();
        self.model.pump(&mut self.ledger);
        let acked = self.model.acknowledge(count, None);
        host.wait_idle();
        acked
    }

    /// Records fetched outcomes in the ledger.
    pub fn outcomes(&mut self, outcomes: &[OutcomeRecord]) {
        for o in outcomes {
            if let Some(outcome) = to_outcome(o) {
                self.ledger.outcome(&outcome);
            }
        }
    }

    /// The ledger's verdict.
    pub fn verdict(&self) -> Verdict {
        self.ledger.verdict()
    }
}

fn to_outcome(o: &OutcomeRecord) -> Option<Outcome> {
    let kind = match o.kind {
        OutcomeKindName::Acked => OutcomeKind::Acked,
        OutcomeKindName::Nacked => OutcomeKind::Nacked {
            guest_status: o.guest_status,
        },
        OutcomeKindName::Corrupted => OutcomeKind::Corrupted,
        OutcomeKindName::BadAck => OutcomeKind::BadAck,
        OutcomeKindName::Cancelled => OutcomeKind::Cancelled,
        OutcomeKindName::Migrated => OutcomeKind::Migrated,
        OutcomeKindName::Unknown(_) => return None,
    };
    Some(Outcome {
        sequence: o.sequence,
        tag: o.tag,
        kind,
        attempts: o.attempts,
    })
}

/// The channel configuration of simulated channels (the scenario GUIDs, no VMBus handle).
pub fn sim_channel_config(mode: CreateMode, max_in_flight: u32) -> ChannelConfig {
    ChannelConfig {
        vmbus_handle: 0,
        interface_type: SCENARIO_INTERFACE_TYPE,
        instance: SCENARIO_INSTANCE,
        max_in_flight,
        max_message_len: 4096,
        server_flags: 0,
        mode,
    }
}

/// The payload of the demo's post with `tag`.
pub fn demo_payload(tag: u64) -> Vec<u8> {
    let len = usize::try_from(tag % 61 + 8).unwrap_or(8);
    (0..len)
        .map(|i| u8::try_from((i as u64 ^ tag.wrapping_mul(31)) & 0xFF).unwrap_or(0))
        .collect()
}

/// Where [`run_demo`] keeps the stream between the hosts: takes the saved bytes, returns the bytes
/// to restore.
pub type StoreFn<'a> = dyn FnMut(&[u8]) -> Result<Vec<u8>, Error> + 'a;

/// What [`run_demo`] did.
#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    /// Channel id on the source host.
    pub source_channel: u64,
    /// Channel id on the destination host.
    pub destination_channel: u64,
    /// Messages posted on the source.
    pub posted_on_source: u64,
    /// Acknowledged on the source before the save.
    pub acked_on_source: u64,
    /// In flight in the save (handed over as Migrated on the source).
    pub migrated: u64,
    /// Bytes of the save stream.
    pub stream_len: usize,
    /// KMCL chunks in it.
    pub chunks: usize,
    /// Messages posted on the destination after the restore.
    pub posted_on_destination: u64,
    /// Outcomes fetched on the destination with attempts 2 (crossed the restore).
    pub restored_deliveries: u64,
    /// The ledger's verdict: deliveries, duplicates, losses.
    pub delivered: u64,
    /// Deliveries seen twice by the guest.
    pub duplicates: u64,
    /// Posts with no final outcome.
    pub lost: u64,
    /// Deliveries whose payload or tag differed from the post.
    pub corrupted: u64,
    /// Exactly once: every post delivered once, none lost, none duplicated.
    pub exactly_once: bool,
    /// The ledger's full verdict, for humans.
    pub verdict: String,
}

/// The demo: create a channel on simulated host A, post a burst, let the guest acknowledge part
/// of it, save the channel (the VM paused) into a save stream, hand the in-flight deliveries over,
/// restore the stream into a new channel on simulated host B, finish the traffic there, and check
/// exactly-once with the ledger. The stream goes through `store` on its way from A to B (the CLI
/// writes it to a file and reads the file back; tests may damage it). Returns the stream as saved
/// and the report.
pub fn run_demo(
    burst: u64,
    ack_before_save: u64,
    store: &mut StoreFn<'_>,
    progress: &mut dyn FnMut(Progress),
) -> Result<(Vec<u8>, DemoReport), Error> {
    let burst = burst.clamp(1, 4096);
    let ack_before_save = ack_before_save.min(burst);
    let max_in_flight = u32::try_from(burst).unwrap_or(4096).max(8);
    let mut guest = SimGuest::new();

    // Source.
    let mut a = Client::new(SimHost::new()?);
    guest.attach(a.transport())?;
    let source = a.create(&sim_channel_config(CreateMode::Start, max_in_flight))?;
    guest.open(a.transport())?;
    for tag in 0..burst {
        let payload = demo_payload(tag);
        let sequence = a.post(
            source,
            &payload,
            PostOptions {
                tag,
                trace_id: Some(trace_id(tag)),
            },
        )?;
        guest.posted(sequence, tag, &payload);
    }
    let acked =
        guest.acknowledge(a.transport(), usize::try_from(ack_before_save).unwrap_or(0)) as u64;
    let early = a.fetch_all(source)?;
    guest.outcomes(&early);
    guest.detach();
    let (stream, save) = a.save_stream(source, progress)?;
    a.complete_migration(source)?;
    a.transport().wait_idle();
    let handed_over = a.fetch_all(source)?;
    guest.outcomes(&handed_over);
    a.destroy(source)?;

    // Destination.
    let mut b = Client::new(SimHost::new()?);
    let destination = b.create(&sim_channel_config(CreateMode::ForRestore, max_in_flight))?;
    let stored = store(&stream)?;
    b.restore_stream(destination, &stored, progress)?;
    guest.attach(b.transport())?;
    b.transport().wait_idle();
    let more = 2u64;
    for tag in burst..burst + more {
        let payload = demo_payload(tag);
        let sequence = b.post(
            destination,
            &payload,
            PostOptions {
                tag,
                trace_id: None,
            },
        )?;
        guest.posted(sequence, tag, &payload);
    }
    guest.acknowledge(b.transport(), usize::MAX);
    let late = b.fetch_all(destination)?;
    guest.outcomes(&late);
    b.destroy(destination)?;

    let verdict = guest.verdict();
    let report = DemoReport {
        source_channel: source,
        destination_channel: destination,
        posted_on_source: burst,
        acked_on_source: acked,
        migrated: handed_over
            .iter()
            .filter(|o| o.kind == OutcomeKindName::Migrated)
            .count() as u64,
        stream_len: stream.len(),
        chunks: save.chunks.len(),
        posted_on_destination: more,
        restored_deliveries: late.iter().filter(|o| o.attempts >= 2).count() as u64,
        delivered: verdict.delivered,
        duplicates: verdict.duplicated,
        lost: verdict.lost,
        corrupted: verdict.corrupted,
        exactly_once: verdict.is_clean() && verdict.delivered == burst + more,
        verdict: format!("{verdict:?}"),
    };
    Ok((stream, report))
}

/// The demo's trace id for `tag`.
pub fn trace_id(tag: u64) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(b"vmbsrvTR");
    id[8..].copy_from_slice(&tag.to_be_bytes());
    id
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_default_guids_are_the_scenario_guids() {
        assert_eq!(crate::TEST_INTERFACE_TYPE, super::SCENARIO_INTERFACE_TYPE);
        assert_eq!(crate::TEST_INSTANCE, super::SCENARIO_INSTANCE);
    }
}
