//! The guest end of a channel, driven by tests.
//!
//! A [`Guest`] *is* the VM's memory for one channel: whether its channel is open, the host → guest
//! ring (packets written, not yet read), the packets it read but has not completed, and the guest
//! → host ring (requests and completions written, not yet consumed by the host). Nothing of that
//! lives in the simulator instance, so a guest can be detached from one instance (the VM is saved
//! or migrated), that instance torn down, and the same guest attached to a new instance which
//! restored the host side: the guest then completes, on the new host, the packets it received from
//! the old one.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::thread;
use std::time::{Duration, Instant};
use std::vec::Vec;

use super::state::{Lifecycle, Link, Shared, State};
use kmcl::NtStatus;
use kmcl_sys::GUID;

/// The guest's view of its channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestChannelState {
    /// Not open.
    Closed,
    /// The guest asked to open; the host's `EvtChannelOpened` has not run yet.
    Opening,
    /// Open: packets flow (once the host has started the channel).
    Open,
    /// The host's `EvtChannelOpened` failed with this status; the channel is closed again.
    OpenFailed(NtStatus),
    /// The host revoked the offer (`VmbChannelDisable`) or forced a new channel instance
    /// (`FORCE_NEW_CHANNEL` after a restore): everything the guest had for it is gone.
    Rescinded,
}

pub(crate) use GuestChannelState as OpenState;

/// What the host answered to one guest request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// `VmbChannelPacketComplete` with these bytes (possibly empty).
    Completed(Vec<u8>),
    /// `VmbChannelPacketFail`.
    Failed,
}

/// A host → guest packet as the guest reads it from the ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPacket {
    /// The transaction id to complete it with; `None` if the host did not ask for a completion
    /// (sent without `WAIT_FOR_COMPLETION`, or by `VmbChannelSendSynchronousRequest`).
    pub txid: Option<u64>,
    /// The packet bytes.
    pub bytes: Vec<u8>,
}

/// Why a guest operation was refused (these are test-usage errors, not driver violations).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestError {
    /// The guest is not attached to a simulator instance.
    NotAttached,
    /// The guest is already attached to a simulator instance.
    AlreadyAttached,
    /// No enabled channel with the guest's interface ids is offered.
    NotOffered,
    /// The guest's channel is not open.
    NotOpen,
    /// The guest's channel is already open or opening.
    AlreadyOpen,
    /// The transaction id is not one the guest received and has not completed.
    UnknownTransaction,
}

/// One entry of the host → guest ring.
#[derive(Clone, Debug)]
pub(crate) struct RingEntry {
    pub(crate) txid: Option<u64>,
    pub(crate) bytes: Vec<u8>,
}

/// One entry of the guest → host ring.
#[derive(Clone, Debug)]
pub(crate) enum ToHost {
    Request { id: u64, bytes: Vec<u8> },
    Completion { txid: u64, payload: Vec<u8> },
}

/// The guest's memory for its channel.
pub(crate) struct GuestMemory {
    pub(crate) interface_type: GUID,
    pub(crate) interface_instance: GUID,
    pub(crate) open: GuestChannelState,
    /// Incremented by every open, so the host can tell a reopen from the open it already handled.
    pub(crate) generation: u64,
    pub(crate) ring: VecDeque<RingEntry>,
    pub(crate) received: BTreeMap<u64, Vec<u8>>,
    pub(crate) to_host: VecDeque<ToHost>,
    pub(crate) replies: BTreeMap<u64, Reply>,
    next_request: u64,
    pub(crate) ignored_completions: u64,
}

impl GuestMemory {
    /// Drops everything that belonged to the open channel.
    fn clear_channel(&mut self) {
        self.ring.clear();
        self.received.clear();
        self.to_host.clear();
    }

    /// The host revoked the channel.
    pub(crate) fn rescind(&mut self) {
        self.open = GuestChannelState::Rescinded;
        self.clear_channel();
    }

    /// The host's `EvtChannelOpened` failed.
    pub(crate) fn open_failed(&mut self, status: NtStatus) {
        self.open = GuestChannelState::OpenFailed(status);
        self.clear_channel();
    }
}

/// Shared guest state: its memory, and which simulator instance it is attached to.
pub(crate) struct GuestShared {
    memory: Mutex<GuestMemory>,
    attachment: Mutex<Option<Weak<Shared>>>,
}

impl GuestShared {
    /// Locks the guest's memory (lock order: instance state, then guest memory).
    pub(crate) fn memory(&self) -> MutexGuard<'_, GuestMemory> {
        self.memory.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn attachment(&self) -> MutexGuard<'_, Option<Weak<Shared>>> {
        self.attachment
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The instance this guest is attached to, if it still exists.
    fn bus(&self) -> Option<Arc<Shared>> {
        self.attachment().as_ref().and_then(Weak::upgrade)
    }

    /// Sets the attachment (by the bus).
    pub(crate) fn set_attachment(&self, bus: Option<Weak<Shared>>) {
        *self.attachment() = bus;
    }

    /// Runs one step of the attached instance's work if it is in deterministic mode (a polling
    /// guest is then the thread that waits; see `schedule.rs`); whether anything ran.
    fn drive_host(&self) -> bool {
        self.bus().is_some_and(|bus| bus.step())
    }

    /// Whether attached to a live instance.
    pub(crate) fn attached(&self) -> bool {
        self.bus().is_some()
    }
}

/// A guest (VM) endpoint for one channel. Cloning gives another handle to the same guest.
#[derive(Clone)]
pub struct Guest {
    pub(crate) inner: Arc<GuestShared>,
}

impl core::fmt::Debug for Guest {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Guest")
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl Guest {
    /// A guest that will bind to the channel offered with these interface ids
    /// (`VmbServerChannelInitSetTargetInterfaceId`; all-zero GUIDs match a channel that never set
    /// them).
    pub fn new(interface_type: GUID, interface_instance: GUID) -> Guest {
        Guest {
            inner: Arc::new(GuestShared {
                memory: Mutex::new(GuestMemory {
                    interface_type,
                    interface_instance,
                    open: GuestChannelState::Closed,
                    generation: 0,
                    ring: VecDeque::new(),
                    received: BTreeMap::new(),
                    to_host: VecDeque::new(),
                    replies: BTreeMap::new(),
                    next_request: 1,
                    ignored_completions: 0,
                }),
                attachment: Mutex::new(None),
            }),
        }
    }

    /// Runs `f` on the guest memory, with the instance state locked too if attached, then wakes
    /// the instance's workers.
    fn with_bus<R>(&self, f: impl FnOnce(Option<&mut State>, &mut GuestMemory) -> R) -> R {
        match self.inner.bus() {
            Some(bus) => {
                let mut st = bus.lock();
                let mut mem = self.inner.memory();
                let result = f(Some(&mut st), &mut mem);
                drop(mem);
                drop(st);
                bus.notify();
                result
            }
            None => {
                let mut mem = self.inner.memory();
                f(None, &mut mem)
            }
        }
    }

    /// The guest's view of its channel.
    pub fn state(&self) -> GuestChannelState {
        self.inner.memory().open
    }

    /// Whether the channel is open (the host's `EvtChannelOpened` succeeded).
    pub fn is_open(&self) -> bool {
        self.state() == GuestChannelState::Open
    }

    /// Whether the guest is attached to a live simulator instance.
    pub fn is_attached(&self) -> bool {
        self.inner.attached()
    }

    /// Opens the offered channel. Returns at once; the host's `EvtChannelOpened` (then
    /// Started/PostStarted once the host started the channel) run on the simulator's threads —
    /// use [`Kmcl::wait_idle`](super::Kmcl::wait_idle), then [`Guest::state`].
    pub fn open(&self) -> Result<(), GuestError> {
        let this = Arc::clone(&self.inner);
        self.with_bus(|st, mem| {
            let st = st.ok_or(GuestError::NotAttached)?;
            let offered = st.channels.values().any(|c| {
                c.lifecycle == Lifecycle::Enabled
                    && matches!(&c.link, Link::Bound(g) if Arc::ptr_eq(g, &this))
            });
            if !offered {
                return Err(GuestError::NotOffered);
            }
            if matches!(
                mem.open,
                GuestChannelState::Open | GuestChannelState::Opening
            ) {
                return Err(GuestError::AlreadyOpen);
            }
            mem.clear_channel();
            mem.generation = mem.generation.wrapping_add(1);
            mem.open = GuestChannelState::Opening;
            Ok(())
        })
    }

    /// Closes the channel: the ring, unread and unanswered state are gone (the host sees
    /// Suspend/Closed and cancels the packets it had sent).
    pub fn close(&self) -> Result<(), GuestError> {
        self.with_bus(|_, mem| {
            if !matches!(
                mem.open,
                GuestChannelState::Open | GuestChannelState::Opening
            ) {
                return Err(GuestError::NotOpen);
            }
            mem.open = GuestChannelState::Closed;
            mem.clear_channel();
            Ok(())
        })
    }

    /// Writes a request (an incoming packet for the host) into the guest → host ring; returns its
    /// id, under which the host's reply appears ([`Guest::take_reply`]).
    pub fn send_request(&self, bytes: &[u8]) -> Result<u64, GuestError> {
        self.with_bus(|_, mem| {
            if mem.open != GuestChannelState::Open {
                return Err(GuestError::NotOpen);
            }
            let id = mem.next_request;
            mem.next_request += 1;
            mem.to_host.push_back(ToHost::Request {
                id,
                bytes: bytes.to_vec(),
            });
            Ok(id)
        })
    }

    /// Takes the host's reply to request `id`, if it has arrived.
    pub fn take_reply(&self, id: u64) -> Option<Reply> {
        self.inner.memory().replies.remove(&id)
    }

    /// Waits up to `timeout` for the reply to request `id` (polls; for drivers that complete
    /// incoming packets from their own threads).
    pub fn wait_reply(&self, id: u64, timeout: Duration) -> Option<Reply> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(reply) = self.take_reply(id) {
                return Some(reply);
            }
            if Instant::now() >= deadline {
                return None;
            }
            if self.inner.drive_host() {
                continue;
            }
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// Takes every reply that has arrived, by request id.
    pub fn take_replies(&self) -> Vec<(u64, Reply)> {
        core::mem::take(&mut self.inner.memory().replies)
            .into_iter()
            .collect()
    }

    /// Reads the next packet from the host → guest ring. A packet with a transaction id then
    /// awaits the guest's completion ([`Guest::complete`]).
    pub fn receive(&self) -> Option<HostPacket> {
        self.with_bus(|_, mem| {
            if mem.open != GuestChannelState::Open {
                return None;
            }
            let entry = mem.ring.pop_front()?;
            if let Some(txid) = entry.txid {
                mem.received.insert(txid, entry.bytes.clone());
            }
            Some(HostPacket {
                txid: entry.txid,
                bytes: entry.bytes,
            })
        })
    }

    /// Reads every packet currently in the ring.
    pub fn receive_all(&self) -> Vec<HostPacket> {
        core::iter::from_fn(|| self.receive()).collect()
    }

    /// Waits up to `timeout` until the ring holds at least `count` unread packets (polls).
    pub fn wait_ring(&self, count: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.ring_len() >= count {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            if self.inner.drive_host() {
                continue;
            }
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// Unread packets in the host → guest ring.
    pub fn ring_len(&self) -> usize {
        self.inner.memory().ring.len()
    }

    /// Transaction ids received and not yet completed, ascending.
    pub fn awaiting_completion(&self) -> Vec<u64> {
        self.inner.memory().received.keys().copied().collect()
    }

    /// Completes a received packet with `payload` (arbitrary, untrusted bytes for the host).
    pub fn complete(&self, txid: u64, payload: &[u8]) -> Result<(), GuestError> {
        self.with_bus(|_, mem| {
            if mem.open != GuestChannelState::Open {
                return Err(GuestError::NotOpen);
            }
            if mem.received.remove(&txid).is_none() {
                return Err(GuestError::UnknownTransaction);
            }
            mem.to_host.push_back(ToHost::Completion {
                txid,
                payload: payload.to_vec(),
            });
            Ok(())
        })
    }

    /// Sends a completion for `txid` whether or not the guest has it outstanding — a misbehaving
    /// guest completing twice or inventing ids. The host ignores completions for transactions it
    /// does not have in flight (counted in [`Guest::ignored_completions`]).
    pub fn send_completion(&self, txid: u64, payload: &[u8]) -> Result<(), GuestError> {
        self.with_bus(|_, mem| {
            if mem.open != GuestChannelState::Open {
                return Err(GuestError::NotOpen);
            }
            mem.received.remove(&txid);
            mem.to_host.push_back(ToHost::Completion {
                txid,
                payload: payload.to_vec(),
            });
            Ok(())
        })
    }

    /// Completions the host ignored (unknown or already completed transaction ids).
    pub fn ignored_completions(&self) -> u64 {
        self.inner.memory().ignored_completions
    }

    /// Entries in the guest → host ring not yet consumed by the host.
    pub fn pending_to_host(&self) -> usize {
        self.inner.memory().to_host.len()
    }

    /// Detaches the guest from its simulator instance (the VM is paused for save or migration).
    /// The host side sees nothing: its channel keeps its state, but no traffic flows until a guest
    /// is attached again. The guest's memory is untouched.
    pub fn detach(&self) {
        if let Some(bus) = self.inner.bus() {
            super::bus::detach(&bus, &self.inner);
        }
        self.inner.set_attachment(None);
    }
}
