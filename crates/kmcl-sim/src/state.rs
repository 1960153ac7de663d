//! The simulator's state (one [`Shared`] per simulator instance) and the safe implementation of
//! every modelled KMCL operation. The FFI layer (`table.rs`) validates pointers and turns handles
//! into sequence numbers; everything here is safe code except the driver-callback invocations,
//! which live in `invoke.rs`.
//!
//! Locking: one mutex per instance (`Shared::state`) plus one per guest (its memory); the order is
//! always instance state → guest memory. No simulator lock is ever held while a driver callback
//! runs.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::format;
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
use super::container::{self, LibState, Location, Unit};
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
/// never complete a new packet with an old id).
static NEXT_TXID: AtomicU64 = AtomicU64::new(1);
static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

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
    pending: Option<(Vec<u8>, bool)>,
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
    pub(crate) incoming_outstanding: u32,
    pub(crate) deferred: VecDeque<u32>,
    pub(crate) batch: u32,
    pub(crate) save: Option<SaveCtx>,
    pub(crate) restore: RestorePhase,
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
    pub(crate) payload: Vec<u8>,
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
    pub(crate) packets: BTreeMap<u32, Packet>,
    pub(crate) incoming: BTreeMap<u32, Incoming>,
    retired: BTreeSet<u32>,
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
        let slot = self.counts.get_mut(call.index())?;
        *slot = slot.saturating_add(1);
        let count = *slot;
        self.faults.find(call, count)
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
        self.retired.insert(seq);
    }

    /// Records the right violation for a handle of kind `kind` with sequence `seq` that is not
    /// live.
    fn dead_handle(&mut self, call: KmclCall, kind: Kind, seq: u32) {
        let (vk, what) = if self.retired.contains(&seq) {
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
        let level = irql::current_irql();
        if level == Irql::Passive {
            true
        } else {
            self.violation(
                ViolationKind::WrongIrql,
                Some(call),
                format!("called at {level:?}; requires PASSIVE_LEVEL"),
            );
            false
        }
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
                "called from inside a state-change callback (kmcl-reference §2.1, §5.7)",
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
        let c = self.channels.get(&seq)?;
        match &c.link {
            Link::Bound(g) => {
                let mem = g.memory();
                (mem.open == OpenState::Open
                    && (!c.opened || mem.generation == c.opened_generation))
                    .then(|| Arc::clone(g))
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
                bytes: p.payload.clone(),
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
        self.open_guest(seq)
            .is_some_and(|g| g.memory().ring.len() < ring_capacity)
    }

    /// Whether the channel's incoming ring is being processed.
    pub(crate) fn flowing(&self, seq: u32) -> Option<Arc<GuestShared>> {
        let c = self.channels.get(&seq)?;
        if !(c.running && c.queue_enabled && !c.queue_failed) {
            return None;
        }
        self.open_guest(seq)
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
        if let Some(guest) = self.flowing(seq) {
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
        self.open_guest(seq)
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
            config,
            state: Mutex::new(State {
                shutdown: false,
                next_seq: 1,
                iface_refs: 0,
                channels: BTreeMap::new(),
                packets: BTreeMap::new(),
                incoming: BTreeMap::new(),
                retired: BTreeSet::new(),
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

    // ---- channel lifetime ----------------------------------------------------------------------

    /// `VmbChannelAllocate` (the device object was already resolved to this instance).
    pub(crate) fn channel_allocate(&self, is_server: bool) -> Result<usize, NtStatus> {
        let call = KmclCall::ChannelAllocate;
        let mut st = self.lock();
        if !st.require_passive(call) {
            return Err(NtStatus::INVALID_DEVICE_STATE);
        }
        if let Some(status) = st.tick(call) {
            return Err(status);
        }
        if !is_server {
            st.violation(
                ViolationKind::ClientOnly,
                Some(call),
                "IsServer = FALSE: client channels are not modelled by this server simulator",
            );
            return Err(NtStatus::NOT_SUPPORTED);
        }
        let seq = st.new_seq();
        st.channels.insert(
            seq,
            Channel {
                lifecycle: Lifecycle::Disabled,
                max_packet_size: self.config.default_max_packet_size,
                process_packet: None,
                processing_complete: None,
                state_callbacks: None,
                save_packet: None,
                restore_packet: None,
                server_flags: 0,
                init_flags: 0,
                interface_type: GUID::default(),
                interface_instance: GUID::default(),
                friendly_name: String::new(),
                friendly_name_set: false,
                suspend_callback_running: false,
                ran_since_enable: false,
                vmbus_handle: 0,
                target_vtl: 0,
                mmio_megabytes: (0, 0),
                client_context_size: 0,
                max_external_data: (0, 0),
                incoming_at_passive: false,
                pointer: DriverPtr::NULL,
                quota: None,
                start_requested: false,
                opened: false,
                opened_generation: 0,
                running: false,
                suspended: false,
                suspend_generation: 0,
                late_senders: Vec::new(),
                late_generation: 0,
                queue_enabled: false,
                queue_failed: false,
                passive_busy: false,
                link: Link::None,
                allocated: 0,
                host_queue: VecDeque::new(),
                in_flight: BTreeMap::new(),
                incoming_outstanding: 0,
                deferred: VecDeque::new(),
                batch: 0,
                save: None,
                restore: RestorePhase::Idle,
            },
        );
        Ok(self.handle(seq, Kind::Channel))
    }

    /// `VmbChannelCleanup`.
    pub(crate) fn channel_cleanup(&self, seq: u32) {
        let call = KmclCall::ChannelCleanup;
        let mut st = self.lock();
        if !st.live_channel(call, seq) {
            return;
        }
        st.require_passive(call);
        let _ = st.tick(call);
        let lifecycle = st.channels.get(&seq).map(|c| c.lifecycle);
        if lifecycle != Some(Lifecycle::Disabled) {
            st.violation(
                ViolationKind::WrongState,
                Some(call),
                format!(
                    "channel is {lifecycle:?}; it must be disabled first (kmcl-reference §2.1)"
                ),
            );
            return;
        }
        if st.channels.get(&seq).is_some_and(|c| c.save.is_some()) {
            st.violation(
                ViolationKind::SaveSequence,
                Some(call),
                "VmbChannelSaveBegin without VmbChannelSaveEnd",
            );
        }
        // Completion routines the library still owes this channel (Disable returned before
        // running them) run before Cleanup frees the channel: the library cannot call back
        // through a channel it has freed.
        st = self.wait_until(
            st,
            Some(call),
            "completion routines owed to the channel",
            |st| st.dpc_busy != Some(seq) && !st.dpc_work.iter().any(|w| w.channel == seq),
        );
        // Packets the library still owns (never handed back, under
        // `DisableRestored::Never`) are the library's to drop; only the driver's own are leaks.
        let owned: Vec<u32> = st
            .packets
            .iter()
            .filter_map(|(p, pk)| {
                (pk.channel == seq && pk.state != PacketState::Idle).then_some(*p)
            })
            .collect();
        for p in owned {
            st.packets.remove(&p);
            st.retire(p);
        }
        if let Some(c) = st.channels.get_mut(&seq) {
            c.in_flight.clear();
            c.host_queue.clear();
        }
        let leaked: Vec<u32> = st
            .packets
            .iter()
            .filter_map(|(p, pk)| (pk.channel == seq).then_some(*p))
            .collect();
        if !leaked.is_empty() {
            st.violation(
                ViolationKind::PacketLeaked,
                Some(call),
                format!(
                    "{} packet object(s) still allocated at cleanup",
                    leaked.len()
                ),
            );
        }
        for p in leaked {
            st.packets.remove(&p);
            st.retire(p);
        }
        let incoming: Vec<u32> = st
            .incoming
            .iter()
            .filter_map(|(i, inc)| (inc.channel == seq).then_some(*i))
            .collect();
        for i in incoming {
            st.incoming.remove(&i);
            st.retire(i);
        }
        st.dpc_work.retain(|w| w.channel != seq);
        st.channels.remove(&seq);
        st.retire(seq);
        drop(st);
        self.notify();
    }

    /// `VmbChannelEnable`.
    pub(crate) fn channel_enable(&self, seq: u32) -> NtStatus {
        let call = KmclCall::ChannelEnable;
        let mut st = self.lock();
        if !st.live_channel(call, seq) {
            return NtStatus::INVALID_PARAMETER_1;
        }
        if !st.require_passive(call) {
            return NtStatus::INVALID_DEVICE_STATE;
        }
        if let Some(status) = st.tick(call) {
            return status;
        }
        let Some(c) = st.channels.get_mut(&seq) else {
            return NtStatus::INVALID_PARAMETER_1;
        };
        if c.lifecycle != Lifecycle::Disabled {
            let lifecycle = c.lifecycle;
            st.violation(
                ViolationKind::WrongState,
                Some(call),
                format!("channel is already {lifecycle:?}"),
            );
            return NtStatus::INVALID_DEVICE_STATE;
        }
        if matches!(
            c.restore,
            RestorePhase::InProgress { .. } | RestorePhase::Busy
        ) {
            st.violation(
                ViolationKind::WrongState,
                Some(call),
                "enabled while a restore is incomplete (RestoreFromBuffer asked for more chunks)",
            );
            return NtStatus::INVALID_DEVICE_STATE;
        }
        c.lifecycle = Lifecycle::Enabled;
        c.ran_since_enable = false;
        c.suspended = false;
        c.opened = false;
        c.running = false;
        st.bind_guests();
        drop(st);
        self.notify();
        NtStatus::SUCCESS
    }

    /// `VmbChannelDisable`: waits until Suspend/Closed ran and in-flight packets were cancelled.
    pub(crate) fn channel_disable(&self, seq: u32) {
        let call = KmclCall::ChannelDisable;
        let mut st = self.lock();
        if !st.live_channel(call, seq) {
            return;
        }
        let _ = st.tick(call);
        if !st.may_block(call) {
            return;
        }
        let Some(c) = st.channels.get_mut(&seq) else {
            return;
        };
        match c.lifecycle {
            Lifecycle::Disabled => {
                // Never enabled (or already disabled): packets restored into it are still in
                // flight and are cancelled like those of a running channel.
                // What happens to them is undocumented (kmcl-reference §0.1): one reading each.
                if c.in_flight.is_empty() && c.host_queue.is_empty() {
                    return;
                }
                match self.config.disable_restored {
                    DisableRestored::Never => return,
                    DisableRestored::CompleteLater => {
                        st.cancel_in_flight(seq, true);
                        drop(st);
                        self.notify();
                        return;
                    }
                    DisableRestored::CompleteBeforeReturn => {}
                }
                st.cancel_in_flight(seq, true);
                self.notify();
                let st = self.wait_until(st, Some(call), "cancelled packets", |st| {
                    st.dpc_busy != Some(seq) && !st.dpc_work.iter().any(|w| w.channel == seq)
                });
                drop(st);
                return;
            }
            Lifecycle::Enabled => c.lifecycle = Lifecycle::Disabling,
            Lifecycle::Disabling => {}
        }
        self.notify();
        let st = self.wait_until(st, Some(call), "the channel to be torn down", |st| {
            st.channels
                .get(&seq)
                .is_none_or(|c| c.lifecycle == Lifecycle::Disabled)
        });
        drop(st);
    }

    /// `VmbChannelStart`.
    pub(crate) fn channel_start(&self, seq: u32) {
        let call = KmclCall::ChannelStart;
        let mut st = self.lock();
        if !st.live_channel(call, seq) {
            return;
        }
        let _ = st.tick(call);
        if !st.require_passive(call) {
            return;
        }
        if irql::in_state_change_callback() {
            st.violation(
                ViolationKind::CalledFromCallback,
                Some(call),
                "VmbChannelStart inside a state-change callback (kmcl-reference §2.1)",
            );
            return;
        }
        let Some(c) = st.channels.get_mut(&seq) else {
            return;
        };
        if c.lifecycle != Lifecycle::Enabled {
            let lifecycle = c.lifecycle;
            st.violation(
                ViolationKind::WrongState,
                Some(call),
                format!("channel is {lifecycle:?}; Start is allowed after Enable, before Disable"),
            );
            return;
        }
        c.start_requested = true;
        drop(st);
        self.notify();
    }

    /// `VmbChannelPause`: waits until EvtChannelSuspend ran and no incoming packet is outstanding.
    pub(crate) fn channel_pause(&self, seq: u32) {
        let call = KmclCall::ChannelPause;
        let mut st = self.lock();
        if !st.live_channel(call, seq) {
            return;
        }
        let _ = st.tick(call);
        if !st.may_block(call) {
            return;
        }
        let Some(c) = st.channels.get_mut(&seq) else {
            return;
        };
        c.start_requested = false;
        if c.lifecycle == Lifecycle::Disabled {
            // "If called while disabled: channel will auto-pause when enabled."
            return;
        }
        self.notify();
        let outgoing = self.config.pause_waits == PauseWaits::IncomingAndOutgoing;
        let st = self.wait_until(st, Some(call), "the channel to pause", |st| {
            st.channels.get(&seq).is_none_or(|c| {
                !c.running && !c.passive_busy && (!outgoing || !c.opened || c.in_flight.is_empty())
            })
        });
        drop(st);
    }

    /// Common checks of every `Init*` call: live handle, PASSIVE, fault, channel disabled.
    pub(crate) fn init_call(
        &self,
        seq: u32,
        call: KmclCall,
        apply: impl FnOnce(&mut Channel, &mut Vec<(ViolationKind, String)>) -> NtStatus,
    ) -> NtStatus {
        let mut st = self.lock();
        if !st.live_channel(call, seq) {
            return NtStatus::INVALID_PARAMETER_1;
        }
        if !st.require_passive(call) {
            return NtStatus::INVALID_DEVICE_STATE;
        }
        if let Some(status) = st.tick(call) {
            return status;
        }
        let Some(c) = st.channels.get_mut(&seq) else {
            return NtStatus::INVALID_PARAMETER_1;
        };
        if c.lifecycle != Lifecycle::Disabled {
            let lifecycle = c.lifecycle;
            st.violation(
                ViolationKind::WrongState,
                Some(call),
                format!("Init* call on a channel that is {lifecycle:?} (only while disabled)"),
            );
            return NtStatus::INVALID_PARAMETER_1;
        }
        let mut found = Vec::new();
        let status = apply(c, &mut found);
        for (kind, detail) in found {
            st.violation(kind, Some(call), detail);
        }
        status
    }

    /// Reads something from a live channel (no state rules, any IRQL).
    pub(crate) fn with_channel<R>(
        &self,
        seq: u32,
        call: KmclCall,
        read: impl FnOnce(&mut Channel) -> R,
    ) -> Option<R> {
        let mut st = self.lock();
        if !st.live_channel(call, seq) {
            return None;
        }
        let _ = st.tick(call);
        st.channels.get_mut(&seq).map(read)
    }

    /// `VmbChannelSetIncomingProcessingAtPassive`.
    pub(crate) fn set_incoming_at_passive(&self, seq: u32, passive: bool) {
        let call = KmclCall::ChannelSetIncomingProcessingAtPassive;
        let mut st = self.lock();
        if !st.live_channel(call, seq) {
            return;
        }
        let _ = st.tick(call);
        st.require_passive(call);
        let Some(c) = st.channels.get_mut(&seq) else {
            return;
        };
        if c.lifecycle != Lifecycle::Disabled {
            st.violation(
                ViolationKind::WrongState,
                Some(call),
                "set after VmbChannelEnable (treated as an init-time setting)",
            );
            return;
        }
        c.incoming_at_passive = passive;
    }

    /// `VmbChannelSetTransactionQuota`.
    pub(crate) fn set_quota(&self, seq: u32, quota: u32) {
        let call = KmclCall::ChannelSetTransactionQuota;
        let mut st = self.lock();
        if !st.live_channel(call, seq) {
            return;
        }
        let _ = st.tick(call);
        if quota == 0 {
            st.violation(
                ViolationKind::InvalidArgument,
                Some(call),
                "quota must be > 0",
            );
            return;
        }
        if let Some(c) = st.channels.get_mut(&seq) {
            c.quota = Some(quota);
        }
        drop(st);
        self.notify();
    }

    /// Records an unmodelled call on a valid object of this instance.
    pub(crate) fn unmodelled(&self, call: KmclCall, kind: ViolationKind, detail: &str) {
        let mut st = self.lock();
        let _ = st.tick(call);
        st.violation(kind, Some(call), detail.to_string());
    }

    /// Validates a handle's object exists (for unmodelled calls).
    pub(crate) fn check_live(&self, call: KmclCall, kind: Kind, seq: u32) -> bool {
        let mut st = self.lock();
        match kind {
            Kind::Channel => st.live_channel(call, seq),
            Kind::Packet => st.live_packet(call, seq),
            Kind::Completion => {
                if st.incoming.contains_key(&seq) {
                    true
                } else {
                    st.dead_handle(call, kind, seq);
                    false
                }
            }
            Kind::Bus | Kind::Device => true,
        }
    }

    // ---- incoming packets --------------------------------------------------------------------

    /// `VmbChannelPacketComplete` (`reply = Some`) or `VmbChannelPacketFail` (`reply = None`).
    pub(crate) fn incoming_complete(&self, pc: u32, reply: Option<Vec<u8>>) {
        let call = if reply.is_some() {
            KmclCall::ChannelPacketComplete
        } else {
            KmclCall::ChannelPacketFail
        };
        let mut st = self.lock();
        if reply.is_none() && self.config.packet_fail == PacketFailReading::DoesNotRetire {
            // The queue stops; the packet stays outstanding and the guest gets no answer.
            let Some(channel) = st.incoming.get(&pc).map(|inc| inc.channel) else {
                st.dead_handle(call, Kind::Completion, pc);
                return;
            };
            let _ = st.tick(call);
            if let Some(c) = st.channels.get_mut(&channel) {
                c.queue_failed = true;
            }
            drop(st);
            self.notify();
            return;
        }
        let Some(inc) = st.incoming.remove(&pc) else {
            st.dead_handle(call, Kind::Completion, pc);
            return;
        };
        let _ = st.tick(call);
        st.retire(pc);
        let failed = reply.is_none();
        if let Some(c) = st.channels.get_mut(&inc.channel) {
            c.incoming_outstanding = c.incoming_outstanding.saturating_sub(1);
            c.deferred.retain(|d| *d != pc);
            if failed {
                // "fails the packet and stops the queue (channel processing ceases)".
                c.queue_failed = true;
            }
        }
        if let Some(g) = inc.guest.upgrade() {
            let mut mem = g.memory();
            if mem.open == OpenState::Open && mem.generation == inc.generation {
                let reply = reply.map_or(Reply::Failed, Reply::Completed);
                mem.replies.insert(inc.request, reply);
            }
        }
        drop(st);
        self.notify();
    }

    /// `VmbChannelPacketDeferToPassive`.
    pub(crate) fn defer_to_passive(&self, pc: u32) {
        let call = KmclCall::ChannelPacketDeferToPassive;
        let mut st = self.lock();
        if !st.incoming.contains_key(&pc) {
            st.dead_handle(call, Kind::Completion, pc);
            return;
        }
        let _ = st.tick(call);
        let inline = irql::top_frame().is_some_and(|f| {
            f.instance == self.id
                && matches!(f.kind, FrameKind::ProcessPacket { pc: p, .. } if p == pc)
        });
        if !inline {
            st.violation(
                ViolationKind::DeferNotInline,
                Some(call),
                "only allowed inline from the process-packet callback of that packet (§2.4)",
            );
            return;
        }
        irql::update_top_frame(|f| {
            if let FrameKind::ProcessPacket { deferred, .. } = &mut f.kind {
                *deferred = true;
            }
        });
    }

    // ---- packet objects ------------------------------------------------------------------------

    /// `VmbPacketAllocate`: 0 (NULL) on pool exhaustion or injected fault.
    pub(crate) fn packet_allocate(&self, ch: u32) -> usize {
        let call = KmclCall::PacketAllocate;
        let mut st = self.lock();
        if !st.live_channel(call, ch) {
            return 0;
        }
        if st.tick(call).is_some() {
            return 0;
        }
        let pool = self.config.packet_pool_size;
        let Some(c) = st.channels.get_mut(&ch) else {
            return 0;
        };
        if c.allocated >= pool {
            return 0;
        }
        c.allocated += 1;
        let seq = st.new_seq();
        st.packets.insert(
            seq,
            Packet {
                channel: ch,
                pointer: DriverPtr::NULL,
                routine: None,
                state: PacketState::Idle,
                txid: 0,
                flags: 0,
                payload: Vec::new(),
            },
        );
        self.handle(seq, Kind::Packet)
    }

    /// `VmbPacketFree`.
    pub(crate) fn packet_free(&self, seq: u32) {
        let call = KmclCall::PacketFree;
        let mut st = self.lock();
        if !st.live_packet(call, seq) {
            return;
        }
        let _ = st.tick(call);
        let Some(p) = st.packets.get(&seq) else {
            return;
        };
        if p.state != PacketState::Idle {
            let state = p.state;
            st.violation(
                ViolationKind::PacketInFlight,
                Some(call),
                format!("packet is {state:?}: it belongs to the library until its completion routine runs"),
            );
            return;
        }
        let ch = p.channel;
        st.packets.remove(&seq);
        st.retire(seq);
        if let Some(c) = st.channels.get_mut(&ch) {
            c.allocated = c.allocated.saturating_sub(1);
        }
    }

    /// Reads or updates a live packet.
    pub(crate) fn with_packet<R>(
        &self,
        seq: u32,
        call: KmclCall,
        f: impl FnOnce(&mut Packet) -> R,
    ) -> Option<R> {
        let mut st = self.lock();
        if !st.live_packet(call, seq) {
            return None;
        }
        let _ = st.tick(call);
        st.packets.get_mut(&seq).map(f)
    }

    /// `VmbPacketSetCompletionRoutine`.
    pub(crate) fn packet_set_routine(&self, seq: u32, routine: PFN_VMB_PACKET_COMPLETION_ROUTINE) {
        let call = KmclCall::PacketSetCompletionRoutine;
        let mut st = self.lock();
        if !st.live_packet(call, seq) {
            return;
        }
        let _ = st.tick(call);
        let keep =
            self.config.restored_packet_context == RestoredPacketContext::KeepSetBeforeRestore;
        // A packet restored into a channel that has not run since cannot complete yet, so its
        // routine may be set again (the driver re-binds restored packets under every reading);
        // on a channel that may be running, a change races the completion.
        let quiet = st.packets.get(&seq).is_some_and(|p| {
            st.channels.get(&p.channel).is_some_and(|c| {
                c.lifecycle == Lifecycle::Disabled
                    || (self.config.restore_timing == RestoreTiming::AfterEnable && !c.running)
            })
        });
        let Some(p) = st.packets.get_mut(&seq) else {
            return;
        };
        if p.state != PacketState::Idle && keep && !quiet {
            st.violation(
                ViolationKind::PacketModifiedInFlight,
                Some(call),
                "completion routine changed while the library owns the packet (set it before \
                 VmbPacketSend / VmbPacketRestore; kmcl-reference §3.3, §7.7)",
            );
            return;
        }
        p.routine = routine;
    }

    /// `VmbPacketSend` (the FFI layer copied the buffer and rejected external MDLs).
    pub(crate) fn packet_send(&self, seq: u32, bytes: Vec<u8>, flags: u32) -> NtStatus {
        let call = KmclCall::PacketSend;
        let mut st = self.lock();
        if !st.live_packet(call, seq) {
            return NtStatus::INVALID_PARAMETER_1;
        }
        if let Some(status) = st.tick(call) {
            return status;
        }
        if flags & !VMBUS_CHANNEL_FORMAT_FLAGS != 0 || flags & MDL_ONLY_FORMAT_FLAGS != 0 {
            st.violation(
                ViolationKind::InvalidArgument,
                Some(call),
                format!(
                    "flags {flags:#x}: undefined bits, or an MDL flag (FORCE_MDL_LENGTH, \
                     DATA_IN_ONLY, DATA_OUT_ONLY) on a send without an MDL"
                ),
            );
            return NtStatus::INVALID_PARAMETER;
        }
        if flags & VMBUS_CHANNEL_FORMAT_FLAG_PAGED_BUFFER == 0 {
            // Any IRQL up to DISPATCH.
        } else if irql::current_irql() != Irql::Passive {
            st.violation(
                ViolationKind::WrongIrql,
                Some(call),
                "PAGED_BUFFER above PASSIVE_LEVEL",
            );
            return NtStatus::INVALID_PARAMETER;
        }
        let Some(ch) = st.packets.get(&seq).map(|p| p.channel) else {
            return NtStatus::INVALID_PARAMETER_1;
        };
        let suspending = |st: &State| {
            st.channels
                .get(&ch)
                .is_some_and(|c| c.suspend_callback_running)
        };
        if self.config.send_vs_suspend == SendVsSuspend::Serialized && suspending(&st) {
            if irql::in_state_change_callback() {
                st.violation(
                    ViolationKind::SendWhileSuspended,
                    Some(call),
                    "send from inside EvtChannelSuspend: deadlocks where sends are serialized \
                     against it",
                );
                return NtStatus::INVALID_DEVICE_STATE;
            }
            st = self.wait_until(
                st,
                Some(call),
                "EvtChannelSuspend to return (sends are serialized against it)",
                |st| !suspending(st),
            );
        }
        let Some(p) = st.packets.get(&seq) else {
            return NtStatus::INVALID_PARAMETER_1;
        };
        if p.state != PacketState::Idle {
            let state = p.state;
            st.violation(
                ViolationKind::PacketInFlight,
                Some(call),
                format!("packet is already {state:?}"),
            );
            return NtStatus::INVALID_DEVICE_STATE;
        }
        let Some(c) = st.channels.get(&ch) else {
            return NtStatus::INVALID_DEVICE_STATE;
        };
        if bytes.len() > c.max_packet_size as usize {
            let max = c.max_packet_size;
            st.violation(
                ViolationKind::PacketTooLarge,
                Some(call),
                format!("{} bytes > maximum packet size {max}", bytes.len()),
            );
            return NtStatus::INVALID_PARAMETER;
        }
        if c.lifecycle != Lifecycle::Enabled {
            let lifecycle = c.lifecycle;
            st.violation(
                ViolationKind::WrongState,
                Some(call),
                format!("send on a channel that is {lifecycle:?}"),
            );
            return NtStatus::INVALID_DEVICE_STATE;
        }
        if c.opened && c.suspended {
            // A driver cannot make a send already under way return before its suspend callback
            // does without waiting in that callback (which deadlocks if the library serializes
            // sends against it), so one send per thread may cross the suspend: it is refused.
            // A thread that sends again after that refusal started a new send after the
            // suspend: the violation (§3.1).
            let thread = std::thread::current().id();
            let generation = c.suspend_generation;
            let c = st.channels.get_mut(&ch);
            let repeated = c.is_some_and(|c| {
                if c.late_generation != generation {
                    c.late_senders.clear();
                    c.late_generation = generation;
                }
                let repeated = c.late_senders.contains(&thread);
                if !repeated {
                    c.late_senders.push(thread);
                }
                repeated
            });
            if repeated {
                st.violation(
                    ViolationKind::SendWhileSuspended,
                    Some(call),
                    "send after EvtChannelSuspend, before the next EvtChannelStarted, from a \
                     thread whose earlier late send was already refused (§3.1)",
                );
            }
            return NtStatus::INVALID_DEVICE_STATE;
        }
        let txid = NEXT_TXID.fetch_add(1, Ordering::Relaxed);
        if let Some(p) = st.packets.get_mut(&seq) {
            p.txid = txid;
            p.flags = flags;
            p.payload = bytes;
            p.state = PacketState::Queued;
        }
        if let Some(c) = st.channels.get_mut(&ch) {
            c.host_queue.push_back(seq);
        }
        st.flush(ch, self.config.ring_capacity);
        drop(st);
        self.notify();
        NtStatus::SUCCESS
    }

    /// `VmbChannelSendSynchronousRequest`, fire-and-forget form (timeout 0, no completion).
    pub(crate) fn send_sync(&self, seq: u32, bytes: Vec<u8>) -> NtStatus {
        let call = KmclCall::ChannelSendSynchronousRequest;
        let mut st = self.lock();
        if !st.live_channel(call, seq) {
            return NtStatus::INVALID_PARAMETER_1;
        }
        if let Some(status) = st.tick(call) {
            return status;
        }
        let Some(c) = st.channels.get(&seq) else {
            return NtStatus::INVALID_PARAMETER_1;
        };
        if bytes.len() > c.max_packet_size as usize {
            st.violation(
                ViolationKind::PacketTooLarge,
                Some(call),
                format!("{} bytes > maximum packet size", bytes.len()),
            );
            return NtStatus::INVALID_PARAMETER;
        }
        if !(c.running && c.queue_enabled) {
            st.violation(
                ViolationKind::WrongState,
                Some(call),
                "packets are not flowing (use it from EvtChannelPostStarted on, §2.5)",
            );
            return NtStatus::INVALID_DEVICE_STATE;
        }
        let queue_empty = c.host_queue.is_empty();
        let Some(g) = st.open_guest(seq) else {
            return NtStatus::DEVICE_REMOVED;
        };
        let mut mem = g.memory();
        if !queue_empty || mem.ring.len() >= self.config.ring_capacity {
            return NtStatus::BUFFER_OVERFLOW;
        }
        mem.ring.push_back(RingEntry { txid: None, bytes });
        NtStatus::SUCCESS
    }

    // ---- save ------------------------------------------------------------------------------------

    /// `VmbChannelSaveBegin`.
    pub(crate) fn save_begin(&self, seq: u32) -> NtStatus {
        let call = KmclCall::ChannelSaveBegin;
        let mut st = self.lock();
        if !st.live_channel(call, seq) {
            return NtStatus::INVALID_PARAMETER_1;
        }
        if !st.require_passive(call) {
            return NtStatus::INVALID_DEVICE_STATE;
        }
        if let Some(status) = st.tick(call) {
            return status;
        }
        let Some(c) = st.channels.get(&seq) else {
            return NtStatus::INVALID_PARAMETER_1;
        };
        if c.save.is_some() {
            st.violation(
                ViolationKind::SaveSequence,
                Some(call),
                "VmbChannelSaveBegin while a save is in progress",
            );
            return NtStatus::INVALID_DEVICE_STATE;
        }
        if self.config.save_requires == SaveRequires::Paused && (c.running || c.passive_busy) {
            st.violation(
                ViolationKind::WrongState,
                Some(call),
                "save of a running channel (SimConfig::save_requires = Paused, §7.4)",
            );
            return NtStatus::INVALID_DEVICE_STATE;
        }
        if c.incoming_outstanding > 0 && self.config.incoming_at_save == IncomingAtSave::Refuse {
            return NtStatus::INVALID_DEVICE_STATE;
        }
        // Let host-side completion work of this channel finish, so the snapshot is stable.
        let mut st = self.wait_until(st, Some(call), "completion routines to drain", |st| {
            st.dpc_busy != Some(seq) && !st.dpc_work.iter().any(|w| w.channel == seq)
        });
        let save_unsent = self.config.save_unsent_packets;
        let mut in_flight: Vec<(u64, u32)> = Vec::new();
        let mut idle: Vec<u32> = Vec::new();
        for (pseq, p) in &st.packets {
            if p.channel != seq {
                continue;
            }
            match p.state {
                PacketState::Queued | PacketState::Sent => in_flight.push((p.txid, *pseq)),
                PacketState::Idle if save_unsent => idle.push(*pseq),
                PacketState::Idle => {}
            }
        }
        in_flight.sort_unstable();
        let mut queue: VecDeque<u32> = in_flight.into_iter().map(|(_, p)| p).collect();
        queue.extend(idle);
        let session = (u64::from(self.id) << 40) | NEXT_SESSION.fetch_add(1, Ordering::Relaxed);
        if let Some(c) = st.channels.get_mut(&seq) {
            c.save = Some(SaveCtx {
                session,
                stage: SaveStage::Begin,
                queue,
                pending: None,
                chunk_index: 0,
                packets_saved: 0,
                failed: None,
                finished: false,
                busy: false,
            });
        }
        NtStatus::SUCCESS
    }

    /// `VmbChannelSaveEnd`.
    pub(crate) fn save_end(&self, seq: u32) {
        let call = KmclCall::ChannelSaveEnd;
        let mut st = self.lock();
        if !st.live_channel(call, seq) {
            return;
        }
        let _ = st.tick(call);
        st.require_passive(call);
        let had = st.channels.get_mut(&seq).and_then(|c| c.save.take());
        if had.is_none() {
            st.violation(
                ViolationKind::SaveSequence,
                Some(call),
                "VmbChannelSaveEnd without VmbChannelSaveBegin",
            );
        }
    }

    /// `VmbChannelSaveContinue` into a buffer of `size` bytes.
    pub(crate) fn save_continue(&self, seq: u32, size: usize) -> SaveOutput {
        let call = KmclCall::ChannelSaveContinue;
        let fail = |status| SaveOutput {
            status,
            chunk: Vec::new(),
            required: 0,
        };
        let mut st = self.lock();
        if !st.live_channel(call, seq) {
            return fail(NtStatus::INVALID_PARAMETER_1);
        }
        if !st.require_passive(call) {
            return fail(NtStatus::INVALID_DEVICE_STATE);
        }
        if let Some(status) = st.tick(call) {
            return fail(status);
        }
        let problem = match st.channels.get_mut(&seq).and_then(|c| c.save.as_mut()) {
            None => Some("VmbChannelSaveContinue without VmbChannelSaveBegin"),
            Some(ctx) if ctx.busy => Some("concurrent VmbChannelSaveContinue on one channel"),
            Some(ctx) if ctx.finished => {
                Some("VmbChannelSaveContinue after it returned STATUS_SUCCESS")
            }
            Some(ctx) => {
                if let Some(status) = ctx.failed {
                    return fail(status);
                }
                ctx.busy = true;
                None
            }
        };
        if let Some(problem) = problem {
            st.violation(ViolationKind::SaveSequence, Some(call), problem);
            return fail(NtStatus::INVALID_DEVICE_STATE);
        }
        let mut body: Vec<u8> = Vec::new();
        let mut last = false;
        loop {
            // Make sure the next unit is encoded.
            let needs_unit = st
                .channels
                .get(&seq)
                .and_then(|c| c.save.as_ref())
                .is_some_and(|ctx| ctx.pending.is_none() && ctx.stage != SaveStage::Done);
            if needs_unit {
                match self.next_save_unit(st, seq) {
                    Ok(guard) => st = guard,
                    Err((guard, status)) => {
                        st = guard;
                        if let Some(ctx) = st.channels.get_mut(&seq).and_then(|c| c.save.as_mut()) {
                            ctx.failed = Some(status);
                            ctx.busy = false;
                        }
                        return fail(status);
                    }
                }
            }
            let Some(ctx) = st.channels.get_mut(&seq).and_then(|c| c.save.as_mut()) else {
                return fail(NtStatus::INVALID_DEVICE_STATE);
            };
            let Some((unit, is_end)) = ctx.pending.as_ref() else {
                break;
            };
            if container::CHUNK_HEADER_LEN + body.len() + unit.len() > size {
                if body.is_empty() {
                    let required = container::CHUNK_HEADER_LEN + unit.len();
                    ctx.busy = false;
                    return SaveOutput {
                        status: NtStatus::BUFFER_TOO_SMALL,
                        chunk: Vec::new(),
                        required: u32::try_from(required).unwrap_or(u32::MAX),
                    };
                }
                break;
            }
            body.extend_from_slice(unit);
            let is_end = *is_end;
            ctx.pending = None;
            if is_end {
                last = true;
                break;
            }
        }
        let Some(ctx) = st.channels.get_mut(&seq).and_then(|c| c.save.as_mut()) else {
            return fail(NtStatus::INVALID_DEVICE_STATE);
        };
        let mut chunk = std::vec![0u8; container::CHUNK_HEADER_LEN + body.len()];
        container::write_chunk(&mut chunk, ctx.chunk_index, ctx.session, last, &body);
        ctx.chunk_index = ctx.chunk_index.saturating_add(1);
        ctx.busy = false;
        if last {
            ctx.finished = true;
        }
        SaveOutput {
            status: if last {
                NtStatus::SUCCESS
            } else {
                NtStatus::BUFFER_OVERFLOW
            },
            chunk,
            required: 0,
        }
    }

    /// Produces the next save unit into `ctx.pending` (calling the driver's save callback, with the
    /// lock released, for a packet unit).
    #[allow(clippy::type_complexity)]
    fn next_save_unit<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        seq: u32,
    ) -> Result<MutexGuard<'a, State>, (MutexGuard<'a, State>, NtStatus)> {
        loop {
            let Some(c) = st.channels.get_mut(&seq) else {
                return Err((st, NtStatus::INVALID_DEVICE_STATE));
            };
            let save_cb = c.save_packet;
            let Some(ctx) = c.save.as_mut() else {
                return Err((st, NtStatus::INVALID_DEVICE_STATE));
            };
            match ctx.stage {
                SaveStage::Done => return Ok(st),
                SaveStage::Begin => {
                    ctx.pending = Some((container::encode_unit(&Unit::Begin), false));
                    ctx.stage = SaveStage::Packets;
                    return Ok(st);
                }
                SaveStage::Packets => {}
            }
            let session = ctx.session;
            let Some(pseq) = ctx.queue.pop_front() else {
                let packets = ctx.packets_saved;
                ctx.pending = Some((container::encode_unit(&Unit::End { packets }), true));
                ctx.stage = SaveStage::Done;
                return Ok(st);
            };
            // Snapshot the library state of this packet, unless it is no longer saveable.
            let Some(p) = st.packets.get(&pseq) else {
                continue;
            };
            let location = match p.state {
                PacketState::Idle if self.config.save_unsent_packets && p.txid == 0 => {
                    Location::Idle
                }
                PacketState::Idle => continue,
                PacketState::Queued => Location::HostQueue,
                PacketState::Sent => {
                    let in_ring = st.channels.get(&seq).is_some_and(|c| match &c.link {
                        Link::Bound(g) => g.memory().ring.iter().any(|e| e.txid == Some(p.txid)),
                        _ => false,
                    });
                    if in_ring {
                        Location::Ring
                    } else {
                        Location::Delivered
                    }
                }
            };
            let lib = LibState {
                location,
                txid: p.txid,
                flags: p.flags,
                session,
                payload: p.payload.clone(),
            };
            let ch_handle = self.handle(seq, Kind::Channel);
            let pkt_handle = self.handle(pseq, Kind::Packet);
            drop(st);
            let result = self.save_packet_protocol(save_cb, ch_handle, pkt_handle);
            st = self.lock();
            let (driver, driver_alloc) = match result {
                Ok(saved) => saved,
                Err(status) => return Err((st, status)),
            };
            let Some(ctx) = st.channels.get_mut(&seq).and_then(|c| c.save.as_mut()) else {
                return Err((st, NtStatus::INVALID_DEVICE_STATE));
            };
            ctx.packets_saved = ctx.packets_saved.saturating_add(1);
            ctx.pending = Some((
                container::encode_unit(&Unit::Packet {
                    lib: container::encode_lib(&lib),
                    driver,
                    driver_alloc,
                }),
                false,
            ));
            return Ok(st);
        }
    }

    /// The two-call save-packet protocol (kmcl-reference §3.3). Runs without the lock.
    fn save_packet_protocol(
        &self,
        cb: PFN_VMB_CHANNEL_SAVE_PACKET,
        ch: usize,
        pkt: usize,
    ) -> Result<(Vec<u8>, u32), NtStatus> {
        let call = Some(KmclCall::ChannelSaveContinue);
        let Some(cb) = cb else {
            self.lock().violation(
                ViolationKind::WrongState,
                call,
                "packets to save but no save callback registered \
                 (VmbServerChannelInitSetSaveRestorePacketCallbacks)",
            );
            return Ok((Vec::new(), 0));
        };
        let mut needed: u32 = 0;
        let status = super::invoke::save_packet(self.id, cb, ch, pkt, None, &mut needed);
        if status.is_success() {
            if needed != 0 {
                self.lock().violation(
                    ViolationKind::SaveCallbackProtocol,
                    call,
                    format!("size probe returned success but BytesNeeded = {needed}"),
                );
            }
            return Ok((Vec::new(), 0));
        }
        if needed == 0 {
            self.lock().violation(
                ViolationKind::SaveCallbackProtocol,
                call,
                format!("size probe failed ({status:?}) without setting BytesNeeded"),
            );
            return Err(status);
        }
        if needed > self.config.max_save_bytes_per_packet {
            self.lock().violation(
                ViolationKind::SaveCallbackProtocol,
                call,
                format!("BytesNeeded = {needed} exceeds the simulator's limit"),
            );
            return Err(NtStatus::INSUFFICIENT_RESOURCES);
        }
        let alloc = needed.saturating_add(self.config.save_buffer_slack);
        let mut buffer = std::vec![0xCCu8; alloc as usize];
        let mut needed_again = needed;
        let status =
            super::invoke::save_packet(self.id, cb, ch, pkt, Some(&mut buffer), &mut needed_again);
        if !status.is_success() {
            self.lock().violation(
                ViolationKind::SaveCallbackProtocol,
                call,
                format!(
                    "second save call (buffer of {alloc} >= {needed} bytes) failed: {status:?}"
                ),
            );
            return Err(status);
        }
        if needed_again > alloc {
            self.lock().violation(
                ViolationKind::SaveCallbackProtocol,
                call,
                format!("second save call set BytesNeeded = {needed_again} > buffer size {alloc}"),
            );
        }
        // The buffer is `_Out_writes_bytes_(SaveBufSize)`: the callback may write all of it (vmbsrv
        // zeroes the slack so no stale pool bytes survive). The library keeps the `needed` bytes
        // the probe asked for; the 0xCC pre-fill makes a callback that leaves part of those
        // unwritten visible to the driver's own decoder at restore time.
        buffer.truncate(needed as usize);
        Ok((buffer, alloc))
    }

    // ---- restore ---------------------------------------------------------------------------------

    /// `VmbChannelRestoreFromBuffer` with a copy of the driver's buffer.
    pub(crate) fn restore_from_buffer(&self, seq: u32, bytes: &[u8]) -> NtStatus {
        let call = KmclCall::ChannelRestoreFromBuffer;
        let mut st = self.lock();
        if !st.live_channel(call, seq) {
            return NtStatus::INVALID_PARAMETER_1;
        }
        if !st.require_passive(call) {
            return NtStatus::INVALID_DEVICE_STATE;
        }
        if let Some(status) = st.tick(call) {
            return status;
        }
        let Some(c) = st.channels.get_mut(&seq) else {
            return NtStatus::INVALID_PARAMETER_1;
        };
        let timing_ok = match self.config.restore_timing {
            RestoreTiming::BeforeEnable => c.lifecycle == Lifecycle::Disabled,
            RestoreTiming::AfterEnable => {
                c.lifecycle == Lifecycle::Enabled && !c.running && !c.passive_busy
            }
        };
        if !timing_ok
            && self.config.restore_timing == RestoreTiming::AfterEnable
            && c.lifecycle == Lifecycle::Disabled
            && c.restore == RestorePhase::Idle
        {
            // A clean refusal, nothing changed: the driver may enable the channel and retry (the
            // timing is undocumented, so asking is legitimate).
            return NtStatus::INVALID_DEVICE_STATE;
        }
        if !timing_ok {
            let detail = format!(
                "restore on a channel that is {:?} (running: {}); SimConfig::restore_timing = {:?}",
                c.lifecycle, c.running, self.config.restore_timing
            );
            st.violation(ViolationKind::WrongState, Some(call), detail);
            return NtStatus::INVALID_DEVICE_STATE;
        }
        let Some(restore_cb) = c.restore_packet else {
            st.violation(
                ViolationKind::WrongState,
                Some(call),
                "no restore callback registered",
            );
            return NtStatus::INVALID_DEVICE_STATE;
        };
        let (expected, mut session, mut packets) = match c.restore {
            RestorePhase::Idle => (0, None, 0),
            RestorePhase::InProgress {
                next,
                session,
                packets,
            } => (next, Some(session), packets),
            phase => {
                st.violation(
                    ViolationKind::WrongState,
                    Some(call),
                    format!("restore is {phase:?}; a channel is restored once"),
                );
                return NtStatus::INVALID_DEVICE_STATE;
            }
        };
        // Validate the whole chunk before any callback.
        let chunk = match container::decode_chunk(bytes) {
            Ok(chunk) => chunk,
            Err(status) => {
                c.restore = RestorePhase::Failed;
                return status;
            }
        };
        let structure = validate_chunk(&chunk, expected, session, packets);
        let libs = match structure {
            Ok(libs) => libs,
            Err(status) => {
                c.restore = RestorePhase::Failed;
                return status;
            }
        };
        // A transaction id already in flight on this channel: the blob was fed twice or forged.
        // One pass over the packets per chunk (not one per unit), so a restore stays linear in
        // chunks × packets rather than quadratic in packets.
        let duplicate = {
            let chunk_txids: std::collections::BTreeSet<u64> =
                libs.iter().flatten().map(|lib| lib.txid).collect();
            !chunk_txids.is_empty()
                && st.packets.values().any(|p| {
                    p.channel == seq
                        && p.state != PacketState::Idle
                        && chunk_txids.contains(&p.txid)
                })
        };
        let Some(c) = st.channels.get_mut(&seq) else {
            return NtStatus::INVALID_PARAMETER_1;
        };
        if duplicate {
            c.restore = RestorePhase::Failed;
            return NtStatus::DATA_ERROR;
        }
        session.get_or_insert(chunk.session);
        c.restore = RestorePhase::Busy;
        let padded = self.config.restore_save_buf_size == RestoreSaveBufSize::PaddedWithZeros;
        let ch_handle = self.handle(seq, Kind::Channel);
        drop(st);
        for (unit, lib) in chunk.units.iter().zip(libs.iter()) {
            let (
                Unit::Packet {
                    lib: lib_bytes,
                    driver,
                    driver_alloc,
                },
                Some(lib),
            ) = (unit, lib)
            else {
                continue;
            };
            let mut save_buf = driver.clone();
            if padded {
                save_buf.resize(*driver_alloc as usize, 0);
            }
            if let Some(tamper) = self.config.tamper_driver_bytes {
                tamper(u64::from(packets), &mut save_buf);
            }
            let (status, restored) = super::invoke::restore_packet(
                self.id, restore_cb, ch_handle, seq, lib.txid, lib_bytes, &save_buf,
            );
            packets = packets.saturating_add(1);
            match (status.is_success(), restored) {
                (true, Some(_)) => {}
                (true, None) => self.lock().violation(
                    ViolationKind::RestoreWithoutPacketRestore,
                    Some(call),
                    format!(
                        "restore callback returned success without VmbPacketRestore (txid {})",
                        lib.txid
                    ),
                ),
                (false, restored) => {
                    let mut st = self.lock();
                    if restored.is_some() {
                        st.violation(
                            ViolationKind::RestoreFailedAfterPacketRestore,
                            Some(call),
                            format!(
                                "restore callback failed ({status:?}) after VmbPacketRestore \
                                 succeeded (txid {}); the packet stays in flight",
                                lib.txid
                            ),
                        );
                    }
                    if let Some(c) = st.channels.get_mut(&seq) {
                        c.restore = RestorePhase::Failed;
                    }
                    return status;
                }
            }
        }
        let mut st = self.lock();
        let Some(c) = st.channels.get_mut(&seq) else {
            return NtStatus::INVALID_DEVICE_STATE;
        };
        if chunk.last {
            c.restore = RestorePhase::Done;
            drop(st);
            self.notify();
            NtStatus::SUCCESS
        } else {
            c.restore = RestorePhase::InProgress {
                next: expected.saturating_add(1),
                session: session.unwrap_or(chunk.session),
                packets,
            };
            NtStatus::MORE_PROCESSING_REQUIRED
        }
    }

    /// `VmbPacketRestore` (the FFI layer copied `LibBuf`).
    pub(crate) fn packet_restore(&self, seq: u32, lib_bytes: &[u8]) -> NtStatus {
        let call = KmclCall::PacketRestore;
        let mut st = self.lock();
        if !st.live_packet(call, seq) {
            return NtStatus::INVALID_PARAMETER_1;
        }
        if !st.require_passive(call) {
            return NtStatus::INVALID_DEVICE_STATE;
        }
        if let Some(status) = st.tick(call) {
            return status;
        }
        let Some(p) = st.packets.get(&seq) else {
            return NtStatus::INVALID_PARAMETER_1;
        };
        let ch = p.channel;
        let frame = irql::top_frame().filter(|f| f.instance == self.id);
        let Some(FrameKind::RestorePacket {
            channel,
            txid,
            restored,
        }) = frame.map(|f| f.kind)
        else {
            st.violation(
                ViolationKind::PacketRestoreMisuse,
                Some(call),
                "VmbPacketRestore outside the restore callback",
            );
            return NtStatus::INVALID_DEVICE_STATE;
        };
        if channel != ch {
            st.violation(
                ViolationKind::PacketRestoreMisuse,
                Some(call),
                "packet was allocated on another channel than the one being restored",
            );
            return NtStatus::INVALID_PARAMETER_1;
        }
        if restored.is_some() {
            st.violation(
                ViolationKind::PacketRestoreMisuse,
                Some(call),
                "VmbPacketRestore called twice for one saved packet",
            );
            return NtStatus::INVALID_DEVICE_STATE;
        }
        if p.state != PacketState::Idle {
            st.violation(
                ViolationKind::PacketInFlight,
                Some(call),
                "restoring into a packet that is in flight",
            );
            return NtStatus::INVALID_DEVICE_STATE;
        }
        let lib = match container::decode_lib(lib_bytes) {
            Ok(lib) if lib.txid == txid => lib,
            _ => {
                st.violation(
                    ViolationKind::PacketRestoreMisuse,
                    Some(call),
                    "LibBuf is not the one this restore callback was given",
                );
                return NtStatus::INVALID_PARAMETER;
            }
        };
        NEXT_TXID.fetch_max(lib.txid.saturating_add(1), Ordering::Relaxed);
        let reset_routine =
            self.config.restored_packet_context != RestoredPacketContext::KeepSetBeforeRestore;
        let reset_pointer =
            self.config.restored_packet_context == RestoredPacketContext::ResetOnRestore;
        let force_new = st.channels.get(&ch).is_some_and(|c| {
            c.server_flags & VMBUS_SERVER_CHANNEL_INIT_FLAG_FORCE_NEW_CHANNEL != 0
        });
        let wait = lib.flags & VMBUS_CHANNEL_FORMAT_FLAG_WAIT_FOR_COMPLETION != 0;
        let Some(p) = st.packets.get_mut(&seq) else {
            return NtStatus::INVALID_PARAMETER_1;
        };
        if reset_routine {
            p.routine = None;
        }
        if reset_pointer {
            p.pointer = DriverPtr::NULL;
        }
        p.txid = lib.txid;
        p.flags = lib.flags;
        p.payload = lib.payload;
        let requeue = force_new || !wait;
        let new_state = match lib.location {
            Location::Idle => PacketState::Idle,
            Location::HostQueue => PacketState::Queued,
            Location::Ring | Location::Delivered if requeue => PacketState::Queued,
            Location::Ring | Location::Delivered => PacketState::Sent,
        };
        p.state = new_state;
        if let Some(c) = st.channels.get_mut(&ch) {
            match new_state {
                PacketState::Queued => c.host_queue.push_back(seq),
                PacketState::Sent => {
                    c.in_flight.insert(lib.txid, seq);
                }
                PacketState::Idle => {}
            }
        }
        irql::update_top_frame(|f| {
            if let FrameKind::RestorePacket { restored, .. } = &mut f.kind {
                *restored = Some(seq);
            }
        });
        NtStatus::SUCCESS
    }

    // ---- interface reference counting ------------------------------------------------------------

    /// `InterfaceReference` / `InterfaceDereference`.
    pub(crate) fn interface_ref(&self, delta: i64) {
        let mut st = self.lock();
        let refs = st.iface_refs + delta;
        if refs < 0 {
            st.violation(
                ViolationKind::InterfaceOverReleased,
                None,
                "InterfaceDereference without a matching reference",
            );
            return;
        }
        st.iface_refs = refs;
    }

    /// Teardown checks (channels not cleaned up, interface references outstanding).
    pub(crate) fn final_checks(&self) {
        let mut st = self.lock();
        let channels: Vec<(u32, String)> = st
            .channels
            .iter()
            .map(|(seq, c)| (*seq, c.friendly_name.clone()))
            .collect();
        for (seq, name) in channels {
            st.violation(
                ViolationKind::ChannelLeaked,
                None,
                format!("channel #{seq} {name:?} never cleaned up (VmbChannelCleanup)"),
            );
        }
        if st.iface_refs > 0 {
            let refs = st.iface_refs;
            st.violation(
                ViolationKind::InterfaceLeaked,
                None,
                format!("{refs} interface reference(s) never released (InterfaceDereference)"),
            );
        }
    }
}

/// Structural checks of a decoded chunk against the restore so far; returns, per unit, the decoded
/// `LibBuf` of a packet unit.
fn validate_chunk(
    chunk: &container::Chunk,
    expected: u32,
    session: Option<u64>,
    packets_so_far: u32,
) -> Result<Vec<Option<LibState>>, NtStatus> {
    if chunk.index != expected {
        return Err(NtStatus::INVALID_PARAMETER);
    }
    if session.is_some_and(|s| s != chunk.session) {
        return Err(NtStatus::INVALID_PARAMETER);
    }
    let mut libs = Vec::with_capacity(chunk.units.len());
    let mut packets = packets_so_far;
    let count = chunk.units.len();
    for (i, unit) in chunk.units.iter().enumerate() {
        match unit {
            Unit::Begin => {
                if !(expected == 0 && i == 0) {
                    return Err(NtStatus::DATA_ERROR);
                }
                libs.push(None);
            }
            Unit::End { packets: n } => {
                if !(chunk.last && i + 1 == count) || *n != packets {
                    return Err(NtStatus::DATA_ERROR);
                }
                libs.push(None);
            }
            Unit::Packet { lib, .. } => {
                if expected == 0 && i == 0 {
                    return Err(NtStatus::DATA_ERROR);
                }
                let lib = container::decode_lib(lib).map_err(|_| NtStatus::DATA_ERROR)?;
                if lib.session != chunk.session {
                    return Err(NtStatus::DATA_ERROR);
                }
                packets = packets.saturating_add(1);
                libs.push(Some(lib));
            }
        }
    }
    if expected == 0 && !matches!(chunk.units.first(), Some(Unit::Begin)) {
        return Err(NtStatus::DATA_ERROR);
    }
    if chunk.last && !matches!(chunk.units.last(), Some(Unit::End { .. })) {
        return Err(NtStatus::DATA_ERROR);
    }
    Ok(libs)
}
