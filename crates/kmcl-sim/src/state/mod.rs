//! The simulator's state (one [`Shared`] per simulator instance) and the safe implementation of
//! every modelled KMCL operation. The FFI layer (`table.rs`) validates pointers and turns handles
//! into sequence numbers; everything here is safe code except the driver-callback invocations,
//! which live in `invoke.rs`.
//!
//! Locking: one mutex per instance (`Shared::state`) plus one per guest (its memory); the order is
//! always instance state → guest memory. No simulator lock is ever held while a driver callback
//! runs.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::format;
use std::hash::{BuildHasherDefault, Hasher};
use std::string::{String, ToString};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Instant;
use std::vec::Vec;

use super::config::{
    CompletionsWhilePaused, DisableRestored, IncomingAtSave, KmclCall, PacketFailReading,
    PauseWaits, RestoreSaveBufSize, RestoreTiming, RestoredPacketContext, SaveRequires,
    SendVsSuspend, SimConfig,
};
use super::container::{self, LibView, Location, Unit};
use super::guest::{GuestShared, OpenState, Reply, RingEntry};
use super::handle::{self, Kind};
use super::irql::{self, FrameKind, Irql};
use super::verifier::{Violation, ViolationKind};
use kmcl::NtStatus;
use kmcl_sys::{
    GUID, PFN_VMB_CHANNEL_PROCESS_PACKET, PFN_VMB_CHANNEL_PROCESSING_COMPLETE,
    PFN_VMB_CHANNEL_RESTORE_PACKET, PFN_VMB_CHANNEL_SAVE_PACKET, PFN_VMB_PACKET_COMPLETION_ROUTINE,
    VMB_CHANNEL_STATE_CHANGE_CALLBACKS, VMBUS_CHANNEL_FORMAT_FLAG_PAGED_BUFFER,
    VMBUS_CHANNEL_FORMAT_FLAG_WAIT_FOR_COMPLETION, VMBUS_CHANNEL_FORMAT_FLAGS,
    VMBUS_SERVER_CHANNEL_INIT_FLAG_FORCE_NEW_CHANNEL,
};

/// Format flags that describe the packet's external-data MDL (`FORCE_MDL_LENGTH`, and from SDK
/// 10.0.18362 `DATA_IN_ONLY` / `DATA_OUT_ONLY`). The simulator models no external MDLs, so a send
/// carrying any of them is refused with `STATUS_INVALID_PARAMETER` and recorded as a violation: a
/// simulator decision (docs/simulator.md, "Format flags"), not a documented KMCL result.
pub(crate) const MDL_ONLY_FORMAT_FLAGS: u32 = kmcl_sys::VMBUS_CHANNEL_FORMAT_FLAG_FORCE_MDL_LENGTH
    | kmcl_sys::VMBUS_CHANNEL_FORMAT_FLAG_DATA_IN_ONLY
    | kmcl_sys::VMBUS_CHANNEL_FORMAT_FLAG_DATA_OUT_ONLY;

/// Transaction ids are unique in the whole process (so a guest migrated between instances can
/// never complete a new packet with an old id) — until a restored `LibBuf` carries an id near
/// `u64::MAX` (only a forged one can: sends count up from 1), which moves the counter to its end;
/// from there [`next_txid`] still never gives a channel an id one of its packets carries, nor 0.
static NEXT_TXID: AtomicU64 = AtomicU64::new(1);

/// The transaction id of a new send on a channel whose live ids are `live`: the next value of
/// `counter` that is neither 0 nor live on the channel. At most `live.len() + 2` draws, since
/// the counter yields consecutive values (wrapping at the end of the range).
pub(crate) fn next_txid(counter: &AtomicU64, live: Option<&KeyMap<u64, u32>>) -> u64 {
    loop {
        let txid = counter.fetch_add(1, Ordering::Relaxed);
        if txid != 0 && !live.is_some_and(|live| live.contains_key(&txid)) {
            return txid;
        }
    }
}
static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// A [`Hasher`] for the simulator's own integer keys (object sequence numbers, transaction
/// ids): one multiplication, no random state — so iteration order, where any code depends on
/// it, is the same from run to run (the deterministic schedule replays).
#[derive(Clone, Copy, Default)]
pub(crate) struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n);
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A map keyed by sequence number or transaction id (see [`KeyHasher`]).
pub(crate) type KeyMap<K, V> = HashMap<K, V, BuildHasherDefault<KeyHasher>>;

/// Channel lifecycle (header state model: Disabled → Enabled → … → Disabled).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lifecycle {
    Disabled,
    Enabled,
    /// `VmbChannelDisable` in progress (Suspend/Closed/cancellations pending).
    Disabling,
}

/// Which guest the channel talks to.
#[derive(Clone)]
pub(crate) enum Link {
    /// No guest.
    None,
    /// An attached guest whose interface ids match.
    Bound(Arc<GuestShared>),
    /// The guest was detached (its VM was saved / migrated away): the channel keeps the state it
    /// had, no traffic flows, and the guest does not see anything that happens here.
    Frozen,
}

/// A restore session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RestorePhase {
    Idle,
    InProgress {
        next: u32,
        session: u64,
        packets: u32,
    },
    Busy,
    Done,
    Failed,
}

/// Save progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SaveStage {
    Begin,
    Packets,
    Done,
}

pub(crate) struct SaveCtx {
    session: u64,
    stage: SaveStage,
    queue: VecDeque<u32>,
    /// The next unit, encoded in `unit`: `Some(is_end)` once ready.
    pending: Option<bool>,
    /// The next unit's bytes (reused from unit to unit).
    unit: Vec<u8>,
    /// The chunk being assembled: room for its header, then the units (handed out whole).
    body: Vec<u8>,
    /// The buffer the second save call is given (reused from packet to packet).
    scratch: Vec<u8>,
    chunk_index: u32,
    packets_saved: u32,
    failed: Option<NtStatus>,
    finished: bool,
    busy: bool,
}

/// A channel (a `VMBCHANNEL`).
pub(crate) struct Channel {
    pub(crate) lifecycle: Lifecycle,
    pub(crate) max_packet_size: u32,
    pub(crate) process_packet: PFN_VMB_CHANNEL_PROCESS_PACKET,
    pub(crate) processing_complete: PFN_VMB_CHANNEL_PROCESSING_COMPLETE,
    pub(crate) state_callbacks: Option<VMB_CHANNEL_STATE_CHANGE_CALLBACKS>,
    pub(crate) save_packet: PFN_VMB_CHANNEL_SAVE_PACKET,
    pub(crate) restore_packet: PFN_VMB_CHANNEL_RESTORE_PACKET,
    pub(crate) server_flags: u32,
    pub(crate) init_flags: u32,
    pub(crate) interface_type: GUID,
    pub(crate) interface_instance: GUID,
    pub(crate) friendly_name: String,
    pub(crate) friendly_name_set: bool,
    pub(crate) vmbus_handle: usize,
    pub(crate) target_vtl: u8,
    pub(crate) mmio_megabytes: (u16, u16),
    pub(crate) client_context_size: u32,
    pub(crate) max_external_data: (u32, u32),
    pub(crate) incoming_at_passive: bool,
    pub(crate) pointer: DriverPtr,
    pub(crate) quota: Option<u32>,
    pub(crate) start_requested: bool,
    pub(crate) opened: bool,
    pub(crate) opened_generation: u64,
    pub(crate) running: bool,
    pub(crate) suspended: bool,
    /// Counts EvtChannelSuspend calls; `late_senders` belong to one of them.
    pub(crate) suspend_generation: u64,
    /// Threads that sent after the suspend of `late_generation` returned (each was refused).
    pub(crate) late_senders: Vec<std::thread::ThreadId>,
    pub(crate) late_generation: u64,
    /// `EvtChannelSuspend` is running ([`SendVsSuspend::Serialized`] makes sends wait for it).
    pub(crate) suspend_callback_running: bool,
    /// EvtChannelStarted ran since the last `VmbChannelEnable`.
    pub(crate) ran_since_enable: bool,
    pub(crate) queue_enabled: bool,
    pub(crate) queue_failed: bool,
    pub(crate) passive_busy: bool,
    pub(crate) link: Link,
    pub(crate) allocated: usize,
    pub(crate) host_queue: VecDeque<u32>,
    pub(crate) in_flight: BTreeMap<u64, u32>,
    /// Transaction ids of this channel's packets that are not idle (sent, queued or restored),
    /// with how many packets carry each: what the restore's "transaction id already in flight"
    /// check looks up, kept in step with every packet state change.
    pub(crate) live_txids: KeyMap<u64, u32>,
    pub(crate) incoming_outstanding: u32,
    pub(crate) deferred: VecDeque<u32>,
    pub(crate) batch: u32,
    pub(crate) save: Option<SaveCtx>,
    pub(crate) restore: RestorePhase,
    /// The chunk `VmbChannelRestoreFromBuffer` is restoring from, while its restore callbacks
    /// run: a packet restored from one of its `LibBuf`s shares its payload bytes.
    pub(crate) restore_chunk: Option<RestoreChunk>,
}

/// The chunk being restored, in two copies: `shared`, immutable, whose ranges restored packets
/// keep as their payloads; and the copy the restore callbacks' `LibBuf`s point into
/// (`driver_view` is its address), which a driver could write to despite `_In_`. Sharing only
/// from the copy the driver never sees keeps a restored packet's bytes what they were when
/// `VmbPacketRestore` read them, as a copy per packet would.
pub(crate) struct RestoreChunk {
    pub(crate) shared: Arc<[u8]>,
    /// Address of the first byte of the driver's copy (same length as `shared`); only compared,
    /// never dereferenced.
    pub(crate) driver_view: usize,
}

/// A pointer the driver stored (channel or packet context). The simulator never dereferences it;
/// it only keeps it, with its provenance, and hands it back, as KMCL does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DriverPtr(pub(crate) *mut core::ffi::c_void);

impl DriverPtr {
    /// No pointer.
    pub(crate) const NULL: DriverPtr = DriverPtr(core::ptr::null_mut());
}

// SAFETY: `DriverPtr` is only stored and returned, never dereferenced by the simulator, so moving
// it between threads cannot cause a data race here; what the driver does with its own pointer is
// the driver's contract (KMCL stores it the same way).
unsafe impl Send for DriverPtr {}

/// Library-side state of a packet object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PacketState {
    /// Owned by the driver.
    Idle,
    /// Sent, on the host queue (ring full or channel not running).
    Queued,
    /// Sent, in the guest's ring or read by the guest.
    Sent,
}

/// A packet object (a `VMBPACKET`).
pub(crate) struct Packet {
    pub(crate) channel: u32,
    pub(crate) pointer: DriverPtr,
    pub(crate) routine: PFN_VMB_PACKET_COMPLETION_ROUTINE,
    pub(crate) state: PacketState,
    pub(crate) txid: u64,
    pub(crate) flags: u32,
    pub(crate) payload: Payload,
}

/// A packet's bytes: its own copy (sent by the driver), or a range of the restored chunk it came
/// from (shared by the packets restored from that chunk instead of a copy each).
pub(crate) enum Payload {
    /// Bytes of this packet alone.
    Owned(Vec<u8>),
    /// `chunk[range]`.
    Restored {
        chunk: Arc<[u8]>,
        range: core::ops::Range<usize>,
    },
}

impl Payload {
    /// No bytes.
    pub(crate) const EMPTY: Payload = Payload::Owned(Vec::new());

    /// `payload` as `VmbPacketRestore` read it: shared from `chunk.shared` if it lies within the
    /// driver's view of the chunk and the view still holds the chunk's bytes there, else copied.
    pub(crate) fn from_chunk(chunk: Option<&RestoreChunk>, payload: &[u8]) -> Payload {
        if let Some(chunk) = chunk {
            let len = chunk.shared.len();
            let start = payload.as_ptr().addr().wrapping_sub(chunk.driver_view);
            if start <= len && payload.len() <= len - start {
                let range = start..start + payload.len();
                if chunk.shared.get(range.clone()) == Some(payload) {
                    return Payload::Restored {
                        chunk: Arc::clone(&chunk.shared),
                        range,
                    };
                }
            }
        }
        Payload::Owned(payload.to_vec())
    }
}

impl core::ops::Deref for Payload {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Payload::Owned(bytes) => bytes,
            Payload::Restored { chunk, range } => chunk.get(range.clone()).unwrap_or(&[]),
        }
    }
}

/// An incoming packet (a `VMBPACKETCOMPLETION`).
pub(crate) struct Incoming {
    pub(crate) channel: u32,
    pub(crate) request: u64,
    pub(crate) generation: u64,
    pub(crate) guest: std::sync::Weak<GuestShared>,
    /// The packet bytes; the process-packet callback's `Buffer` points here until completion.
    pub(crate) buffer: Vec<u8>,
}

/// Host-side completion work for the DPC (cancellations, non-waiting sends placed in the ring).
pub(crate) struct DpcWork {
    pub(crate) channel: u32,
    pub(crate) packet: u32,
    pub(crate) status: NtStatus,
}

/// All mutable state of one simulator instance.
pub(crate) struct State {
    pub(crate) shutdown: bool,
    next_seq: u32,
    pub(crate) iface_refs: i64,
    pub(crate) channels: BTreeMap<u32, Channel>,
    pub(crate) packets: KeyMap<u32, Packet>,
    pub(crate) incoming: KeyMap<u32, Incoming>,
    /// One bit per sequence number: set once its object was freed, completed or cleaned up.
    retired: Vec<u64>,
    pub(crate) guests: Vec<Arc<GuestShared>>,
    counts: [u64; KmclCall::COUNT],
    pub(crate) faults: super::config::FaultPlan,
    pub(crate) violations: Vec<Violation>,
    pub(crate) dpc_work: VecDeque<DpcWork>,
    pub(crate) passive_busy: bool,
    pub(crate) dpc_busy: Option<u32>,
}

/// One simulator instance, shared by the bus object, its worker threads and (weakly) the handle
/// registry and attached guests.
pub(crate) struct Shared {
    pub(crate) id: u32,
    /// Reachable from its handles (`handle::register` / `unregister`).
    pub(crate) registered: std::sync::atomic::AtomicBool,
    pub(crate) config: SimConfig,
    state: Mutex<State>,
    cond: Condvar,
    /// Who runs the work: worker threads, or waiting threads (deterministic mode).
    pub(crate) schedule: super::schedule::Scheduler,
}

/// Result of a save-continue step, copied into the driver's buffer by the FFI layer.
pub(crate) struct SaveOutput {
    pub(crate) status: NtStatus,
    pub(crate) chunk: Vec<u8>,
    pub(crate) required: u32,
}

/// [`State::tick`] on the two fields it uses, so a caller can tick while it holds a borrow of
/// another field (the object the call names).
fn tick_in(
    counts: &mut [u64; KmclCall::COUNT],
    faults: &super::config::FaultPlan,
    call: KmclCall,
) -> Option<NtStatus> {
    let slot = counts.get_mut(call.index())?;
    *slot = slot.saturating_add(1);
    let count = *slot;
    faults.find(call, count)
}

/// [`State::violation`] on the violation list alone (see [`tick_in`]).
fn violation_in(
    violations: &mut Vec<Violation>,
    kind: ViolationKind,
    call: KmclCall,
    detail: impl Into<String>,
) {
    violations.push(Violation {
        kind,
        call: Some(call),
        detail: detail.into(),
    });
}

/// [`State::require_passive`] on the violation list alone (see [`tick_in`]).
fn require_passive_in(violations: &mut Vec<Violation>, call: KmclCall) -> bool {
    let level = irql::current_irql();
    if level == Irql::Passive {
        true
    } else {
        violation_in(
            violations,
            ViolationKind::WrongIrql,
            call,
            format!("called at {level:?}; requires PASSIVE_LEVEL"),
        );
        false
    }
}

impl State {
    /// Records a violation.
    pub(crate) fn violation(
        &mut self,
        kind: ViolationKind,
        call: Option<KmclCall>,
        detail: impl Into<String>,
    ) {
        self.violations.push(Violation {
            kind,
            call,
            detail: detail.into(),
        });
    }

    /// Counts a call that named a valid object and returns the injected fault for it, if any.
    pub(crate) fn tick(&mut self, call: KmclCall) -> Option<NtStatus> {
        tick_in(&mut self.counts, &self.faults, call)
    }

    /// Calls of `call` counted so far.
    pub(crate) fn count(&self, call: KmclCall) -> u64 {
        self.counts.get(call.index()).copied().unwrap_or(0)
    }

    pub(crate) fn new_seq(&mut self) -> u32 {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.saturating_add(1);
        seq
    }

    pub(crate) fn retire(&mut self, seq: u32) {
        let word = (seq / 64) as usize;
        if self.retired.len() <= word {
            self.retired.resize(word + 1, 0);
        }
        if let Some(bits) = self.retired.get_mut(word) {
            *bits |= 1 << (seq % 64);
        }
    }

    fn is_retired(&self, seq: u32) -> bool {
        self.retired
            .get((seq / 64) as usize)
            .is_some_and(|bits| bits & (1 << (seq % 64)) != 0)
    }

    /// A packet of channel `ch` carrying `txid` left the idle state (sent or restored).
    pub(crate) fn txid_live(&mut self, ch: u32, txid: u64) {
        if let Some(c) = self.channels.get_mut(&ch) {
            *c.live_txids.entry(txid).or_insert(0) += 1;
        }
    }

    /// A packet of channel `ch` carrying `txid` became idle again (handed back to the driver).
    pub(crate) fn txid_idle(&mut self, ch: u32, txid: u64) {
        if let Some(c) = self.channels.get_mut(&ch)
            && let Some(count) = c.live_txids.get_mut(&txid)
        {
            *count -= 1;
            if *count == 0 {
                c.live_txids.remove(&txid);
            }
        }
    }

    /// Records the right violation for a handle of kind `kind` with sequence `seq` that is not
    /// live.
    fn dead_handle(&mut self, call: KmclCall, kind: Kind, seq: u32) {
        let (vk, what) = if self.is_retired(seq) {
            match (kind, call) {
                (Kind::Completion, _) => (
                    ViolationKind::DoubleCompletion,
                    "incoming packet already completed or failed",
                ),
                (Kind::Packet, KmclCall::PacketFree) => {
                    (ViolationKind::DoubleFree, "packet object already freed")
                }
                (Kind::Packet, _) => (ViolationKind::StaleHandle, "packet object already freed"),
                _ => (ViolationKind::StaleHandle, "channel already cleaned up"),
            }
        } else {
            (ViolationKind::InvalidHandle, "handle was never issued")
        };
        self.violation(vk, Some(call), format!("{what} ({kind:?} #{seq})"));
    }

    /// Whether channel `seq` is live; records a violation if not.
    pub(crate) fn live_channel(&mut self, call: KmclCall, seq: u32) -> bool {
        if self.channels.contains_key(&seq) {
            true
        } else {
            self.dead_handle(call, Kind::Channel, seq);
            false
        }
    }

    /// Whether packet `seq` is live; records a violation if not.
    pub(crate) fn live_packet(&mut self, call: KmclCall, seq: u32) -> bool {
        if self.packets.contains_key(&seq) {
            true
        } else {
            self.dead_handle(call, Kind::Packet, seq);
            false
        }
    }

    /// Records a violation if the caller is above PASSIVE_LEVEL; returns whether it is at PASSIVE.
    pub(crate) fn require_passive(&mut self, call: KmclCall) -> bool {
        require_passive_in(&mut self.violations, call)
    }

    /// Whether a blocking call may wait here (PASSIVE, not in a state-change callback, not on a
    /// simulator worker thread); records the violation if not.
    fn may_block(&mut self, call: KmclCall) -> bool {
        if !self.require_passive(call) {
            return false;
        }
        if irql::in_state_change_callback() {
            self.violation(
                ViolationKind::CalledFromCallback,
                Some(call),
                "called from inside a state-change callback (docs/kmcl-bindings.md §R2)",
            );
            return false;
        }
        if irql::on_worker_thread() {
            self.violation(
                ViolationKind::CalledFromCallback,
                Some(call),
                "blocking call from a KMCL callback thread (it would wait for itself)",
            );
            return false;
        }
        true
    }

    /// The guest memory of a channel bound to a guest whose channel is open (same generation).
    fn open_guest(&self, seq: u32) -> Option<Arc<GuestShared>> {
        self.open_guest_ref(seq).map(Arc::clone)
    }

    /// [`State::open_guest`] without the reference count (for checks under the state lock).
    fn open_guest_ref(&self, seq: u32) -> Option<&Arc<GuestShared>> {
        let c = self.channels.get(&seq)?;
        match &c.link {
            Link::Bound(g) => {
                let mem = g.memory();
                (mem.open == OpenState::Open
                    && (!c.opened || mem.generation == c.opened_generation))
                    .then_some(g)
            }
            _ => None,
        }
    }

    /// Whether the channel's guest wants it open (for the state machine).
    pub(crate) fn connected(&self, seq: u32) -> bool {
        let Some(c) = self.channels.get(&seq) else {
            return false;
        };
        if c.lifecycle != Lifecycle::Enabled {
            return false;
        }
        match &c.link {
            Link::None => false,
            Link::Frozen => c.opened,
            Link::Bound(g) => {
                let mem = g.memory();
                matches!(mem.open, OpenState::Opening | OpenState::Open)
                    && (!c.opened || mem.generation == c.opened_generation)
            }
        }
    }

    /// Moves packets from the channel's host queue into the guest's ring while it has room.
    pub(crate) fn flush(&mut self, seq: u32, ring_capacity: usize) {
        let running = self.channels.get(&seq).is_some_and(|c| c.running);
        if !running {
            return;
        }
        let Some(guest) = self.open_guest(seq) else {
            return;
        };
        let mut mem = guest.memory();
        loop {
            if mem.ring.len() >= ring_capacity {
                break;
            }
            let Some(c) = self.channels.get_mut(&seq) else {
                break;
            };
            let Some(pseq) = c.host_queue.pop_front() else {
                break;
            };
            let Some(p) = self.packets.get_mut(&pseq) else {
                continue;
            };
            let wait = p.flags & VMBUS_CHANNEL_FORMAT_FLAG_WAIT_FOR_COMPLETION != 0;
            mem.ring.push_back(RingEntry {
                txid: wait.then_some(p.txid),
                bytes: p.payload.to_vec(),
            });
            p.state = PacketState::Sent;
            if wait {
                c.in_flight.insert(p.txid, pseq);
            } else {
                self.dpc_work.push_back(DpcWork {
                    channel: seq,
                    packet: pseq,
                    status: NtStatus::SUCCESS,
                });
            }
        }
    }

    /// Whether a flush would move something.
    pub(crate) fn flushable(&self, seq: u32, ring_capacity: usize) -> bool {
        let Some(c) = self.channels.get(&seq) else {
            return false;
        };
        if !c.running || c.host_queue.is_empty() {
            return false;
        }
        self.open_guest_ref(seq)
            .is_some_and(|g| g.memory().ring.len() < ring_capacity)
    }

    /// Whether the channel's incoming ring is being processed.
    pub(crate) fn flowing(&self, seq: u32) -> Option<Arc<GuestShared>> {
        self.flowing_ref(seq).map(Arc::clone)
    }

    /// [`State::flowing`] without the reference count (for checks under the state lock).
    pub(crate) fn flowing_ref(&self, seq: u32) -> Option<&Arc<GuestShared>> {
        let c = self.channels.get(&seq)?;
        if !(c.running && c.queue_enabled && !c.queue_failed) {
            return None;
        }
        self.open_guest_ref(seq)
    }

    /// Whether guest completions on the channel are being processed: while incoming packets are
    /// ([`State::flowing`]), and also while the channel is open but paused where the reading says
    /// the library keeps completing ([`CompletionsWhilePaused::Delivered`], or a Pause that waits
    /// for outgoing packets, [`PauseWaits::IncomingAndOutgoing`]).
    pub(crate) fn completions_flow(
        &self,
        seq: u32,
        config: &SimConfig,
    ) -> Option<Arc<GuestShared>> {
        self.completions_flow_ref(seq, config).map(Arc::clone)
    }

    /// [`State::completions_flow`] without the reference count.
    pub(crate) fn completions_flow_ref(
        &self,
        seq: u32,
        config: &SimConfig,
    ) -> Option<&Arc<GuestShared>> {
        if let Some(guest) = self.flowing_ref(seq) {
            return Some(guest);
        }
        let c = self.channels.get(&seq)?;
        let while_paused = config.completions_while_paused == CompletionsWhilePaused::Delivered
            || config.pause_waits == PauseWaits::IncomingAndOutgoing;
        // Only on a channel that ran since it was enabled: one enabled for a restore (never
        // started) processes nothing, or completions would race the restore.
        if !(while_paused && c.opened && c.ran_since_enable && c.lifecycle != Lifecycle::Disabled) {
            return None;
        }
        self.open_guest_ref(seq)
    }

    /// Queues cancellation of the channel's packets in flight (`Sent` only, or also `Queued`).
    pub(crate) fn cancel_in_flight(&mut self, seq: u32, include_queued: bool) {
        let Some(c) = self.channels.get_mut(&seq) else {
            return;
        };
        let mut victims: Vec<u32> = core::mem::take(&mut c.in_flight).into_values().collect();
        if include_queued {
            victims.extend(c.host_queue.drain(..));
        }
        for pseq in victims {
            self.dpc_work.push_back(DpcWork {
                channel: seq,
                packet: pseq,
                status: NtStatus::CANCELLED,
            });
        }
    }

    /// Binds attached guests to enabled channels with matching interface ids.
    pub(crate) fn bind_guests(&mut self) {
        let guests = self.guests.clone();
        for g in guests {
            if self
                .channels
                .values()
                .any(|c| matches!(&c.link, Link::Bound(b) if Arc::ptr_eq(b, &g)))
            {
                continue;
            }
            let (ty, inst) = {
                let mem = g.memory();
                (mem.interface_type, mem.interface_instance)
            };
            let target = self.channels.iter().find_map(|(seq, c)| {
                (c.lifecycle == Lifecycle::Enabled
                    && !matches!(c.link, Link::Bound(_))
                    && c.interface_type == ty
                    && c.interface_instance == inst)
                    .then_some(*seq)
            });
            let Some(seq) = target else { continue };
            let force_new = self.channels.get(&seq).is_some_and(|c| {
                c.server_flags & VMBUS_SERVER_CHANNEL_INIT_FLAG_FORCE_NEW_CHANNEL != 0
                    && !matches!(c.link, Link::Frozen)
            });
            {
                let mut mem = g.memory();
                let open = matches!(mem.open, OpenState::Open | OpenState::Opening);
                if force_new && open {
                    // The old channel instance is abandoned: the guest sees it rescinded and must
                    // open the new offer; what it had received is gone, so the library re-sends.
                    mem.rescind();
                    drop(mem);
                    self.requeue_sent(seq);
                }
            }
            if let Some(c) = self.channels.get_mut(&seq) {
                c.link = Link::Bound(g);
            }
        }
    }

    /// Moves the channel's `Sent` packets back to the front of its host queue (in send order).
    fn requeue_sent(&mut self, seq: u32) {
        let Some(c) = self.channels.get_mut(&seq) else {
            return;
        };
        let sent: Vec<u32> = core::mem::take(&mut c.in_flight).into_values().collect();
        for pseq in sent.into_iter().rev() {
            c.host_queue.push_front(pseq);
            if let Some(p) = self.packets.get_mut(&pseq) {
                p.state = PacketState::Queued;
            }
        }
    }
}

impl Shared {
    /// A new instance with `config` (not yet registered, no threads).
    pub(crate) fn new(id: u32, config: SimConfig) -> Shared {
        let faults = config.faults.clone();
        let schedule = super::schedule::Scheduler::new(config.schedule);
        Shared {
            id,
            registered: std::sync::atomic::AtomicBool::new(false),
            config,
            state: Mutex::new(State {
                shutdown: false,
                next_seq: 1,
                iface_refs: 0,
                channels: BTreeMap::new(),
                packets: KeyMap::default(),
                incoming: KeyMap::default(),
                retired: Vec::new(),
                guests: Vec::new(),
                counts: [0; KmclCall::COUNT],
                faults,
                violations: Vec::new(),
                dpc_work: VecDeque::new(),
                passive_busy: false,
                dpc_busy: None,
            }),
            cond: Condvar::new(),
            schedule,
        }
    }

    /// Locks the instance state (a poisoned lock is recovered: the state stays usable).
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wakes every waiter (workers, blocking calls, `wait_idle`).
    pub(crate) fn notify(&self) {
        self.cond.notify_all();
    }

    /// Waits on the state condition variable until `deadline`.
    pub(crate) fn wait_deadline<'a>(
        &'a self,
        guard: MutexGuard<'a, State>,
        deadline: Instant,
    ) -> (MutexGuard<'a, State>, bool) {
        let now = Instant::now();
        if now >= deadline {
            return (guard, true);
        }
        // Deterministic mode: the waiting thread runs the work it waits for (schedule.rs).
        let (guard, ran) = self.run_one(guard);
        if ran {
            return (guard, false);
        }
        let (guard, result) = self
            .cond
            .wait_timeout(guard, deadline - now)
            .unwrap_or_else(PoisonError::into_inner);
        (guard, result.timed_out())
    }

    /// Waits (no deadline) for a notification.
    pub(crate) fn wait<'a>(&self, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.cond
            .wait(guard)
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until `done` holds or the hang timeout expires (then records a [`ViolationKind::Hang`]
    /// naming `what`).
    pub(crate) fn wait_until<'a>(
        &'a self,
        mut guard: MutexGuard<'a, State>,
        call: Option<KmclCall>,
        what: &str,
        mut done: impl FnMut(&State) -> bool,
    ) -> MutexGuard<'a, State> {
        let deadline = Instant::now() + self.config.hang_timeout;
        loop {
            if done(&guard) || guard.shutdown {
                return guard;
            }
            let (g, timed_out) = self.wait_deadline(guard, deadline);
            guard = g;
            if timed_out && !done(&guard) {
                guard.violation(
                    ViolationKind::Hang,
                    call,
                    format!(
                        "gave up after {:?} waiting for {what}",
                        self.config.hang_timeout
                    ),
                );
                return guard;
            }
        }
    }

    /// A handle for object `seq` of kind `kind` of this instance.
    pub(crate) fn handle(&self, seq: u32, kind: Kind) -> usize {
        handle::encode(self.id, seq, kind)
    }
}

mod lifecycle;
mod packets;
mod restore;
mod save;

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (review of the third speed pass): after a restored id of `u64::MAX` the
    /// counter had saturated there, so the next send got `u64::MAX` again — the id of a restored
    /// packet still in flight on the channel — and the one after wrapped to 0.
    #[test]
    fn a_new_send_never_gets_an_id_live_on_its_channel_or_zero() {
        let counter = AtomicU64::new(u64::MAX - 1);
        let mut live: KeyMap<u64, u32> = KeyMap::default();
        for txid in [u64::MAX - 1, u64::MAX, 1, 2] {
            live.insert(txid, 1);
        }
        let ids: Vec<u64> = (0..3).map(|_| next_txid(&counter, Some(&live))).collect();
        assert_eq!(ids, [3, 4, 5]);
        let fresh = AtomicU64::new(7);
        assert_eq!(next_txid(&fresh, None), 7);
        assert_eq!(next_txid(&fresh, Some(&live)), 8);
    }

    /// A payload inside the driver's view of the restored chunk is shared from the immutable
    /// copy (same bytes, no copy) while the view still holds those bytes; one anywhere else (the
    /// driver passed its own copy of `LibBuf`), or one the driver changed in its view, is copied;
    /// either way it reads what `VmbPacketRestore` was given.
    #[test]
    fn a_payload_is_shared_only_from_an_unchanged_view_of_the_chunk() {
        let bytes = [1u8, 2, 3, 4, 5, 6];
        let mut view = bytes.to_vec();
        let chunk = RestoreChunk {
            shared: Arc::from(&bytes[..]),
            driver_view: view.as_ptr().addr(),
        };
        let shared = Payload::from_chunk(Some(&chunk), view.get(2..5).unwrap_or(&[]));
        assert!(matches!(&shared, Payload::Restored { range, .. } if *range == (2..5)));
        assert_eq!(&*shared, &[3, 4, 5]);
        // The immutable copy itself is not the driver's view: copied, not shared.
        let from_shared = Payload::from_chunk(Some(&chunk), chunk.shared.get(2..5).unwrap_or(&[]));
        assert!(matches!(from_shared, Payload::Owned(_)));
        let at_end = view.get(6..).unwrap_or(&[1]);
        assert_eq!(&*Payload::from_chunk(Some(&chunk), at_end), &[] as &[u8]);
        let copy = std::vec![3u8, 4, 5];
        let owned = Payload::from_chunk(Some(&chunk), &copy);
        assert!(matches!(owned, Payload::Owned(_)));
        assert_eq!(&*owned, &[3, 4, 5]);
        // The driver wrote into its view before VmbPacketRestore: those bytes are what it gave.
        if let Some(byte) = view.get_mut(3) {
            *byte = 0xEE;
        }
        let changed = Payload::from_chunk(Some(&chunk), view.get(2..5).unwrap_or(&[]));
        assert!(matches!(changed, Payload::Owned(_)));
        assert_eq!(&*changed, &[3, 0xEE, 5]);
        // ...and a write after it does not reach a packet that shares.
        if let Some(byte) = view.get_mut(2) {
            *byte = 0xEE;
        }
        assert_eq!(&*shared, &[3, 4, 5]);
        let straddling: Vec<u8> = std::vec![0u8; 64];
        assert!(matches!(
            Payload::from_chunk(None, &straddling),
            Payload::Owned(_)
        ));
    }

    /// review3: a payload that straddles either end of the driver's view, one at a stale view
    /// address now holding other bytes (the freed view's address reused by another buffer), one
    /// there holding the same bytes, and an empty one at the very end: each reads exactly the
    /// bytes the call was given, shared only when those equal the immutable copy's at that offset.
    #[test]
    fn a_payload_at_a_reused_or_straddling_address_reads_what_was_given() {
        let bytes: std::vec::Vec<u8> = (0u8..32).collect();
        // One buffer playing the part of memory around and at the (stale) view address.
        let mut memory = std::vec![0xAAu8; 96];
        let view_at = 32;
        let chunk = RestoreChunk {
            shared: Arc::from(&bytes[..]),
            driver_view: memory.as_ptr().addr() + view_at,
        };
        // Straddling the start and the end of the view: copied.
        for range in [view_at - 4..view_at + 4, view_at + 28..view_at + 36] {
            let given = memory.get(range.clone()).unwrap_or(&[]);
            let p = Payload::from_chunk(Some(&chunk), given);
            assert!(matches!(p, Payload::Owned(_)), "{range:?}");
            assert_eq!(&*p, given);
        }
        // Inside, but other bytes (address reused by a buffer with other contents): copied.
        let given = memory.get(view_at + 8..view_at + 16).unwrap_or(&[]);
        let p = Payload::from_chunk(Some(&chunk), given);
        assert!(matches!(p, Payload::Owned(_)));
        assert_eq!(&*p, &[0xAA; 8]);
        // Inside, with the same bytes as the chunk there: shared, and still those bytes after
        // the buffer changes.
        if let Some(dst) = memory.get_mut(view_at + 8..view_at + 16) {
            dst.copy_from_slice(&bytes[8..16]);
        }
        let given = memory.get(view_at + 8..view_at + 16).unwrap_or(&[]);
        let p = Payload::from_chunk(Some(&chunk), given);
        assert!(matches!(&p, Payload::Restored { range, .. } if *range == (8..16)));
        memory.fill(0x55);
        assert_eq!(&*p, &bytes[8..16]);
        // Empty, at the end of the view: empty either way.
        let end = memory.get(view_at + 32..view_at + 32).unwrap_or(&[]);
        assert_eq!(&*Payload::from_chunk(Some(&chunk), end), &[] as &[u8]);
    }
}
