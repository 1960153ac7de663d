//! The live-migration scenario: a busy channel saved mid-flight in chunks, torn down, restored
//! into a new channel on a new simulator instance, and finished.
//!
//! ```mermaid
//! sequenceDiagram
//!     participant C as control client
//!     participant A as VSP on sim A
//!     participant G as guest (VM memory)
//!     participant B as VSP on sim B
//!     C->>A: create, post ... (guest acks some, out of order)
//!     C->>A: save_begin → channel record
//!     loop until STATUS_SUCCESS
//!         C->>A: save_continue(chunk buffer) → KMCL chunk
//!     end
//!     C->>A: save_end
//!     G-->>A: detach (VM paused)
//!     C->>A: complete_migration (in-flight → Migrated)
//!     C->>B: create_for_restore, restore_channel_record
//!     loop every chunk, in order
//!         C->>B: restore_chunk
//!     end
//!     C->>B: finish_restore (enable + start)
//!     G-->>B: attach (VM resumes; its channel is still open)
//!     C->>B: post the rest; guest acks everything
//! ```

use std::string::String;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use std::vec;
use std::vec::Vec;

use super::Rng;
use super::guest::GuestModel;
use super::ledger::{Ledger, Posted, Verdict};
use kmcl::{NtStatus, SERVER_INTERFACE_V1_SIZE, ServerInterface};
use kmcl_sim::{
    Guest, Kmcl, PauseWaits, SIM_KMCL_SERVER_INTERFACE_TYPE, SIM_KMCL_SERVER_INTERFACE_VERSION,
    Schedule, SimConfig, SimSpinLock, Violation,
};
use kmcl_sys::GUID;
use vmbsrv::saved::stream::{FrameKind, FrameReader, FrameWriter, frame_len};
use vmbsrv::vsp::{
    ChannelConfig, DeliveryTable, Outcome, OutcomeKind, PostRequest, RestoreProgress, Statistics,
    VspChannel,
};

/// The channel type GUID scenarios offer (a test value).
pub const SCENARIO_INTERFACE_TYPE: GUID = GUID {
    Data1: 0x7673_6d62,
    Data2: 0x0001,
    Data3: 0x4000,
    Data4: *b"vmbsrvT1",
};
/// The channel instance GUID scenarios offer (a test value).
pub const SCENARIO_INSTANCE: GUID = GUID {
    Data1: 0x7673_6d62,
    Data2: 0x0002,
    Data3: 0x4000,
    Data4: *b"vmbsrvI1",
};

/// The delivery table's lock in scenarios: the simulator's spin lock model.
pub type Lock = SimSpinLock<DeliveryTable>;

/// Where the save cuts into the traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Before the guest opens the channel: nothing posted, nothing negotiated.
    BeforeOpen,
    /// After this many posts, with the guest holding a random part of them unacknowledged.
    AfterPosts(u64),
    /// After this many posts, with the guest acknowledging nothing since the last burst: as much
    /// in flight as the channel allows.
    EverythingInFlight(u64),
    /// After this many posts, all acknowledged: nothing in flight.
    NothingInFlight(u64),
}

/// What to run.
#[derive(Debug, Clone)]
pub struct MigrationConfig {
    /// Messages to post in total.
    pub messages: u64,
    /// The channel's in-flight limit.
    pub max_in_flight: u32,
    /// Largest message payload (payload sizes vary from 1 byte up to this).
    pub max_message_len: u32,
    /// Bytes per `VmbChannelSaveContinue` buffer (grown to `BytesRequired` if KMCL asks).
    pub chunk_size: usize,
    /// Seed of every random choice.
    pub seed: u64,
    /// Where the save cuts.
    pub cut: Cut,
    /// Acknowledge in random order (else oldest first).
    pub out_of_order: bool,
    /// Settings of both simulator instances.
    pub sim: SimConfig,
    /// Called with (phase, done, total) as the run progresses.
    pub progress: Option<fn(&str, u64, u64)>,
}

impl MigrationConfig {
    /// A busy default: `messages` messages, cut halfway, out-of-order acknowledgements.
    pub fn new(messages: u64, seed: u64) -> Self {
        let max_in_flight = 256;
        Self {
            messages,
            max_in_flight,
            max_message_len: 512,
            chunk_size: 4096,
            seed,
            cut: Cut::AfterPosts(messages / 2),
            out_of_order: true,
            sim: Self::sim_for(max_in_flight),
            progress: None,
        }
    }

    /// The same run on deterministic simulators (docs/simulator.md, "Deterministic mode"): both
    /// instances schedule their work from `seed`, so the run replays exactly — same figures,
    /// same outcomes — while the default threaded simulators race as KMCL's contexts do.
    pub fn deterministic(mut self) -> Self {
        self.sim.schedule = Schedule::Deterministic { seed: self.seed };
        self
    }

    /// Whether the simulators run in deterministic mode.
    pub fn is_deterministic(&self) -> bool {
        matches!(self.sim.schedule, Schedule::Deterministic { .. })
    }

    /// Simulator settings with room for `max_in_flight` packet objects.
    pub fn sim_for(max_in_flight: u32) -> SimConfig {
        SimConfig {
            packet_pool_size: max_in_flight as usize + 8,
            ..SimConfig::default()
        }
    }
}

/// What a run measured.
#[derive(Debug, Clone, Default)]
pub struct MigrationReport {
    /// Messages posted in total.
    pub posted: u64,
    /// Deliveries outstanding when the save began.
    pub in_flight_at_save: u32,
    /// Of those, how many the guest had read (the rest were in the ring or the host queue).
    pub held_by_guest_at_save: usize,
    /// Bytes of the whole save stream (channel record + KMCL chunks + framing).
    pub saved_bytes: usize,
    /// KMCL chunks produced.
    pub chunks: usize,
    /// The chunk buffer size used (after any growth KMCL asked for).
    pub chunk_size: usize,
    /// Wall time of save_begin → save_end.
    pub save_time: Duration,
    /// Wall time of create_for_restore → finish_restore.
    pub restore_time: Duration,
    /// Deliveries handed over (source outcomes `Migrated`).
    pub migrated: u64,
    /// The judgement.
    pub verdict: Verdict,
    /// Every KMCL contract violation either simulator recorded.
    pub violations: Vec<Violation>,
    /// Guest packets that were not well-formed deliveries.
    pub malformed_at_guest: u64,
    /// Total run time.
    pub total_time: Duration,
    /// The destination channel's counters at the end.
    pub final_statistics: Statistics,
}

impl MigrationReport {
    /// Save cost per outstanding delivery, in nanoseconds.
    pub fn save_ns_per_packet(&self) -> f64 {
        per_packet(self.save_time, self.in_flight_at_save)
    }

    /// Restore cost per outstanding delivery, in nanoseconds.
    pub fn restore_ns_per_packet(&self) -> f64 {
        per_packet(self.restore_time, self.in_flight_at_save)
    }
}

fn per_packet(time: Duration, packets: u32) -> f64 {
    if packets == 0 {
        0.0
    } else {
        time.as_nanos() as f64 / f64::from(packets)
    }
}

/// Why a run could not complete (distinct from a run that completed with a bad verdict).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScenarioError {
    /// What was being done.
    pub step: String,
    /// The status it failed with.
    pub status: NtStatus,
}

fn fail(step: &str, status: NtStatus) -> ScenarioError {
    ScenarioError {
        step: step.into(),
        status,
    }
}

/// Queries the simulator's server interface exactly as the driver queries KMCL's.
pub fn query_server_interface(kmcl: &Kmcl) -> Result<ServerInterface, ScenarioError> {
    let table = kmcl
        .query_interface(
            &SIM_KMCL_SERVER_INTERFACE_TYPE,
            SERVER_INTERFACE_V1_SIZE,
            SIM_KMCL_SERVER_INTERFACE_VERSION,
        )
        .map_err(|status| fail("query interface", status))?;
    ServerInterface::from_queried(table, SIM_KMCL_SERVER_INTERFACE_VERSION)
        .map_err(|error| fail("validate interface", error.status()))
}

/// The channel configuration scenarios use on `kmcl`.
pub fn channel_config(kmcl: &Kmcl, max_in_flight: u32, max_message_len: u32) -> ChannelConfig {
    ChannelConfig {
        interface_type: SCENARIO_INTERFACE_TYPE,
        instance: SCENARIO_INSTANCE,
        max_in_flight,
        max_message_len,
        server_flags: 0,
        vmbus_handle: None,
        parent: kmcl.parent_device(),
    }
}

/// Everything the host side of one simulator instance is running.
struct Host<'i> {
    channel: VspChannel<'i, Lock>,
}

struct Traffic<'c> {
    config: &'c MigrationConfig,
    rng: Rng,
    ledger: Ledger,
    posted: u64,
    clock: Instant,
}

impl Traffic<'_> {
    fn payload(&mut self) -> Vec<u8> {
        let len = 1 + self.rng.below(u64::from(self.config.max_message_len)) as usize;
        let mut payload = vec![0u8; len];
        for chunk in payload.chunks_mut(8) {
            let bytes = self.rng.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        payload
    }

    /// Lets the host settle, then the guest reads its ring. A threaded simulator's DPC keeps
    /// refilling the ring while the guest reads, so the guest may read far more than one ring's
    /// worth; a deterministic one does nothing unless asked, so here the guest reads, the host
    /// runs one step (ring transfers and a callback), and so on, a number of rounds the seed
    /// decides (up to one in-flight window's worth of rings).
    fn read(&mut self, kmcl: &Kmcl, guest: &mut GuestModel) {
        kmcl.wait_idle();
        guest.pump(&mut self.ledger);
        if self.config.is_deterministic() {
            let ring = kmcl.config().ring_capacity.max(1) as u64;
            let rounds = self
                .rng
                .below(u64::from(self.config.max_in_flight) / ring + 2);
            for _ in 0..rounds {
                if !kmcl.step() {
                    break;
                }
                guest.pump(&mut self.ledger);
            }
        }
    }

    fn drain(&mut self, host: &Host<'_>) {
        let mut outcomes = [Outcome {
            sequence: 0,
            tag: 0,
            kind: OutcomeKind::Acked,
            attempts: 0,
        }; 256];
        loop {
            let count = host.channel.drain_outcomes(&mut outcomes);
            for outcome in &outcomes[..count] {
                self.ledger.outcome(outcome);
            }
            if count < outcomes.len() {
                break;
            }
        }
    }

    /// Posts until `target` messages are posted in total; the guest reads and acknowledges part of
    /// the traffic whenever the channel is full. With `hold_acks` the guest acknowledges nothing
    /// and posting stops early once the channel is full.
    fn post_until(
        &mut self,
        target: u64,
        host: &Host<'_>,
        kmcl: &Kmcl,
        guest: &mut GuestModel,
        hold_acks: bool,
    ) -> Result<(), ScenarioError> {
        while self.posted < target {
            let payload = self.payload();
            let tag = self.posted;
            let request = PostRequest {
                tag,
                payload: &payload,
                // A deterministic run must not let the wall clock into the saved bytes.
                posted_at: if self.config.is_deterministic() {
                    self.posted
                } else {
                    self.clock.elapsed().as_nanos() as u64 / 100
                },
                trace_id: tag.is_multiple_of(3).then_some([tag as u8; 16]),
            };
            match host.channel.post(&request) {
                Ok(sequence) => {
                    self.ledger.posted(sequence, Posted::new(tag, &payload));
                    self.posted += 1;
                    if let Some(progress) = self.config.progress
                        && self.posted.is_multiple_of(1000)
                    {
                        progress("posting", self.posted, self.config.messages);
                    }
                }
                Err(NtStatus::QUOTA_EXCEEDED) => {
                    self.read(kmcl, guest);
                    if hold_acks {
                        // The channel is full and the guest acknowledges nothing: cut here.
                        return Ok(());
                    }
                    let count = guest.held() / 2 + 1;
                    let rng = self.config.out_of_order.then_some(&mut self.rng);
                    guest.acknowledge(count, rng);
                    kmcl.wait_idle();
                    self.drain(host);
                }
                Err(status) => return Err(fail("post", status)),
            }
        }
        self.read(kmcl, guest);
        self.drain(host);
        Ok(())
    }

    /// Acknowledges everything until nothing is in flight.
    fn settle(
        &mut self,
        host: &Host<'_>,
        kmcl: &Kmcl,
        guest: &mut GuestModel,
    ) -> Result<(), ScenarioError> {
        for _ in 0..100_000 {
            self.read(kmcl, guest);
            let rng = self.config.out_of_order.then_some(&mut self.rng);
            guest.acknowledge(usize::MAX, rng);
            kmcl.wait_idle();
            self.drain(host);
            let stats = host.channel.statistics();
            if stats.in_flight == 0 && guest.held() == 0 {
                return Ok(());
            }
        }
        Err(fail("settle", NtStatus::UNSUCCESSFUL))
    }
}

/// Saves `channel` into a save stream (channel record frame, then one frame per KMCL chunk).
pub fn save_channel(
    channel: &VspChannel<'_, Lock>,
    chunk_size: usize,
) -> Result<(Vec<u8>, usize, usize), ScenarioError> {
    let record = channel
        .save_begin()
        .map_err(|status| fail("save_begin", status))?;
    let mut record_bytes = vec![0u8; record.encoded_len()];
    record
        .encode(&mut record_bytes)
        .map_err(|_| fail("encode channel record", NtStatus::UNSUCCESSFUL))?;
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    let mut buffer = vec![0u8; chunk_size.max(1)];
    loop {
        let chunk = match channel.save_continue(&mut buffer) {
            Ok(chunk) => chunk,
            Err(status) => {
                let _ = channel.resume();
                return Err(fail("save_continue", status));
            }
        };
        let filled = (chunk.filled as usize).min(buffer.len());
        match chunk.status {
            NtStatus::SUCCESS | NtStatus::BUFFER_OVERFLOW => {
                if filled > 0 {
                    chunks.push(buffer[..filled].to_vec());
                }
                if chunk.status == NtStatus::SUCCESS {
                    break;
                }
            }
            NtStatus::BUFFER_TOO_SMALL if chunk.required as usize > buffer.len() => {
                buffer = vec![0u8; chunk.required as usize];
            }
            status => {
                let _ = channel.resume();
                return Err(fail("save_continue", status));
            }
        }
    }
    channel
        .save_end()
        .map_err(|status| fail("save_end", status))?;
    let too_large = || fail("stream", NtStatus::INTEGER_OVERFLOW);
    let fixed = vmbsrv::saved::stream::STREAM_HEADER_LEN + vmbsrv::saved::stream::FRAME_HEADER_LEN;
    let total = chunks
        .iter()
        .map(|chunk| chunk.len())
        .chain(core::iter::once(record_bytes.len()))
        .try_fold(fixed, |total, len| {
            frame_len(len).and_then(|frame| total.checked_add(frame))
        })
        .ok_or_else(too_large)?;
    let mut stream = vec![0u8; total];
    let mut writer =
        FrameWriter::new(&mut stream).map_err(|_| fail("stream", NtStatus::BUFFER_TOO_SMALL))?;
    writer
        .push(FrameKind::ChannelRecord, &record_bytes)
        .map_err(|_| fail("stream", NtStatus::BUFFER_TOO_SMALL))?;
    for chunk in &chunks {
        writer
            .push(FrameKind::KmclChunk, chunk)
            .map_err(|_| fail("stream", NtStatus::BUFFER_TOO_SMALL))?;
    }
    let written = writer.finish();
    stream.truncate(written);
    Ok((stream, chunks.len(), buffer.len()))
}

/// Restores a save stream into a channel created with `create_for_restore`.
pub fn restore_channel(channel: &VspChannel<'_, Lock>, stream: &[u8]) -> Result<(), ScenarioError> {
    let reader = FrameReader::new(stream).map_err(|_| fail("stream", NtStatus::DATA_ERROR))?;
    let mut complete = false;
    for frame in reader {
        let frame = frame.map_err(|_| fail("stream", NtStatus::DATA_ERROR))?;
        match frame.kind {
            FrameKind::ChannelRecord => channel
                .restore_channel_record(frame.payload)
                .map_err(|status| fail("restore_channel_record", status))?,
            FrameKind::KmclChunk => {
                let progress = channel
                    .restore_chunk(frame.payload)
                    .map_err(|status| fail("restore_chunk", status))?;
                complete = progress == RestoreProgress::Complete;
            }
        }
    }
    if !complete {
        return Err(fail("restore", NtStatus::DATA_ERROR));
    }
    channel
        .finish_restore()
        .map_err(|status| fail("finish_restore", status))
}

/// Runs the whole scenario.
pub fn run_live_migration(config: &MigrationConfig) -> Result<MigrationReport, ScenarioError> {
    let started = Instant::now();
    let mut report = MigrationReport::default();
    let mut traffic = Traffic {
        config,
        rng: Rng::new(config.seed),
        ledger: Ledger::new(),
        posted: 0,
        clock: Instant::now(),
    };
    let mut guest = GuestModel::new(Guest::new(SCENARIO_INTERFACE_TYPE, SCENARIO_INSTANCE));

    // ---- source -------------------------------------------------------------------------------
    let kmcl_a = Kmcl::new(config.sim.clone());
    let stream = {
        let interface = query_server_interface(&kmcl_a)?;
        kmcl_a
            .attach_guest(&guest.endpoint)
            .map_err(|_| fail("attach guest", NtStatus::UNSUCCESSFUL))?;
        let host = Host {
            channel: VspChannel::create(
                &interface,
                &channel_config(&kmcl_a, config.max_in_flight, config.max_message_len),
            )
            .map_err(|status| fail("create channel", status))?,
        };
        let cut_posts = match config.cut {
            Cut::BeforeOpen => 0,
            Cut::AfterPosts(n) | Cut::EverythingInFlight(n) | Cut::NothingInFlight(n) => {
                n.min(config.messages)
            }
        };
        if config.cut != Cut::BeforeOpen {
            guest
                .open_and_negotiate(&kmcl_a)
                .map_err(|_| fail("negotiate", NtStatus::UNSUCCESSFUL))?;
            if matches!(config.cut, Cut::EverythingInFlight(_)) {
                let burst_start = cut_posts.saturating_sub(u64::from(config.max_in_flight));
                traffic.post_until(burst_start, &host, &kmcl_a, &mut guest, false)?;
                traffic.settle(&host, &kmcl_a, &mut guest)?;
                traffic.post_until(cut_posts, &host, &kmcl_a, &mut guest, true)?;
            } else {
                traffic.post_until(cut_posts, &host, &kmcl_a, &mut guest, false)?;
            }
            if matches!(config.cut, Cut::NothingInFlight(_)) {
                traffic.settle(&host, &kmcl_a, &mut guest)?;
            } else if matches!(config.cut, Cut::AfterPosts(_)) {
                // The guest reads everything and holds a random part of it.
                traffic.read(&kmcl_a, &mut guest);
                let count = guest.held() / 2;
                let rng = config.out_of_order.then_some(&mut traffic.rng);
                guest.acknowledge(count, rng);
                kmcl_a.wait_idle();
                traffic.drain(&host);
            }
        }
        report.in_flight_at_save = host.channel.statistics().in_flight;
        report.held_by_guest_at_save = guest.held();
        let save_started = Instant::now();
        let (stream, chunks, chunk_size) =
            if config.sim.pause_waits == PauseWaits::IncomingAndOutgoing {
                // Under this reading `VmbChannelPause` returns only once the guest has completed
                // every packet it holds (docs/kmcl-bindings.md): the VM keeps running while the
                // host pauses the channel, so the guest reads and acknowledges meanwhile.
                let pausing = AtomicBool::new(true);
                let ledger = &mut traffic.ledger;
                let guest = &mut guest;
                std::thread::scope(|scope| {
                    scope.spawn(|| {
                        while pausing.load(Ordering::Acquire) {
                            guest.pump(ledger);
                            guest.acknowledge(guest.held(), None);
                            std::thread::sleep(Duration::from_micros(100));
                        }
                    });
                    let saved = save_channel(&host.channel, config.chunk_size);
                    pausing.store(false, Ordering::Release);
                    saved
                })?
            } else {
                save_channel(&host.channel, config.chunk_size)?
            };
        report.save_time = save_started.elapsed();
        report.chunks = chunks;
        report.chunk_size = chunk_size;
        // The VM is paused and leaves this host; the source channel is torn down.
        guest.endpoint.detach();
        host.channel
            .complete_migration()
            .map_err(|status| fail("complete_migration", status))?;
        kmcl_a.wait_idle();
        traffic.drain(&host);
        drop(host);
        drop(interface);
        stream
    };
    report.violations.extend(kmcl_a.finish());
    report.saved_bytes = stream.len();

    // ---- destination --------------------------------------------------------------------------
    let kmcl_b = Kmcl::new(config.sim.clone());
    {
        let interface = query_server_interface(&kmcl_b)?;
        let restore_started = Instant::now();
        let host = Host {
            channel: VspChannel::create_for_restore(
                &interface,
                &channel_config(&kmcl_b, config.max_in_flight, config.max_message_len),
            )
            .map_err(|status| fail("create channel for restore", status))?,
        };
        restore_channel(&host.channel, &stream)?;
        report.restore_time = restore_started.elapsed();
        kmcl_b
            .attach_guest(&guest.endpoint)
            .map_err(|_| fail("attach guest", NtStatus::UNSUCCESSFUL))?;
        kmcl_b.wait_idle();
        if config.cut == Cut::BeforeOpen {
            guest
                .open_and_negotiate(&kmcl_b)
                .map_err(|_| fail("negotiate", NtStatus::UNSUCCESSFUL))?;
        }
        traffic.post_until(config.messages, &host, &kmcl_b, &mut guest, false)?;
        traffic.settle(&host, &kmcl_b, &mut guest)?;
        report.final_statistics = host.channel.statistics();
        host.channel
            .disable()
            .map_err(|status| fail("disable", status))?;
        kmcl_b.wait_idle();
        traffic.drain(&host);
        drop(host);
        drop(interface);
    }
    report.violations.extend(kmcl_b.finish());

    report.posted = traffic.posted;
    report.migrated = traffic.ledger.migrated_count();
    report.verdict = traffic.ledger.verdict();
    report.malformed_at_guest = guest.malformed;
    report.total_time = started.elapsed();
    Ok(report)
}
