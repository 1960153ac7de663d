//! The two threads of a simulator instance, standing in for KMCL's execution contexts:
//!
//! * the **passive worker** runs state-change callbacks (Opened, Started, PostStarted, Suspend,
//!   Closed) at PASSIVE_LEVEL, one transition at a time, converging each channel's actual state
//!   towards what the driver (Start/Pause/Disable) and the guest (open/close) asked for;
//! * the **DPC worker** runs process-packet callbacks (DISPATCH_LEVEL unless the channel asked
//!   for PASSIVE), processing-complete callbacks and packet completion routines (DISPATCH_LEVEL),
//!   and moves host-queued packets into the guest's ring.
//!
//! They are separate so that a driver may block in `EvtChannelPostStarted` (synchronous protocol
//! negotiation) while packets and completions keep flowing, as on Windows.

use std::sync::{Arc, MutexGuard};
use std::vec::Vec;

use super::config::SimConfig;
use super::guest::{OpenState, ToHost};
use super::handle::Kind;
use super::invoke;
use super::irql::{self, Irql};
use super::state::{Incoming, Lifecycle, Link, PacketState, Shared, State};
use kmcl::NtStatus;
use kmcl_sys::{PFN_VMB_CHANNEL_PROCESSING_COMPLETE, PFN_VMB_PACKET_COMPLETION_ROUTINE};

/// A state transition of one channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PassiveJob {
    Opened,
    Started,
    Suspend,
    Closed,
    FinishDisable,
}

/// The next transition any channel needs (channels in handle order).
fn next_passive_job(st: &State) -> Option<(u32, PassiveJob)> {
    st.channels.iter().find_map(|(&seq, c)| {
        if c.lifecycle == Lifecycle::Disabled {
            return None;
        }
        let connected = st.connected(seq);
        let job = if c.running && (!connected || !c.start_requested) {
            PassiveJob::Suspend
        } else if c.opened && !c.running && !connected {
            PassiveJob::Closed
        } else if !c.opened && connected {
            PassiveJob::Opened
        } else if c.opened && !c.running && connected && c.start_requested {
            PassiveJob::Started
        } else if c.lifecycle == Lifecycle::Disabling && !c.opened && !c.running {
            PassiveJob::FinishDisable
        } else {
            return None;
        };
        Some((seq, job))
    })
}

/// The passive worker's loop.
pub(crate) fn passive_loop(shared: Arc<Shared>) {
    irql::mark_worker(shared.id);
    let mut st = shared.lock();
    loop {
        if st.shutdown {
            return;
        }
        let (guard, ran) = passive_once(&shared, st);
        st = guard;
        if !ran {
            st = shared.wait(st);
        }
    }
}

/// Whether the passive context has a transition to run and is free to run it (in deterministic
/// mode a transition may be waiting inside another one on the same thread).
pub(crate) fn passive_runnable(st: &State) -> bool {
    !st.passive_busy && next_passive_job(st).is_some()
}

/// Runs the next transition, if any; returns whether one ran. One turn of the passive worker's
/// loop, or (deterministic mode, `schedule.rs`) one step run by a waiting thread.
pub(crate) fn passive_once<'a>(
    shared: &'a Shared,
    mut st: MutexGuard<'a, State>,
) -> (MutexGuard<'a, State>, bool) {
    let Some((seq, job)) = next_passive_job(&st) else {
        return (st, false);
    };
    st.passive_busy = true;
    if let Some(c) = st.channels.get_mut(&seq) {
        c.passive_busy = true;
    }
    st = run_passive(shared, st, seq, job);
    st.passive_busy = false;
    if let Some(c) = st.channels.get_mut(&seq) {
        c.passive_busy = false;
    }
    shared.notify();
    (st, true)
}

fn run_passive<'a>(
    shared: &'a Shared,
    mut st: MutexGuard<'a, State>,
    seq: u32,
    job: PassiveJob,
) -> MutexGuard<'a, State> {
    let id = shared.id;
    let handle = shared.handle(seq, Kind::Channel);
    let Some(c) = st.channels.get(&seq) else {
        return st;
    };
    let callbacks = c.state_callbacks;
    match job {
        PassiveJob::Opened => {
            let generation = match &c.link {
                Link::Bound(g) => g.memory().generation,
                _ => c.opened_generation,
            };
            drop(st);
            let status = invoke::opened(id, callbacks.and_then(|c| c.EvtChannelOpened), handle);
            st = shared.lock();
            let Some(c) = st.channels.get_mut(&seq) else {
                return st;
            };
            if status.is_success() {
                c.opened = true;
                c.opened_generation = generation;
                c.suspended = false;
            }
            if let Link::Bound(g) = &c.link {
                let mut mem = g.memory();
                if mem.generation == generation && mem.open == OpenState::Opening {
                    if status.is_success() {
                        mem.open = OpenState::Open;
                    } else {
                        mem.open_failed(status);
                    }
                } else if !status.is_success() && mem.generation == generation {
                    mem.open_failed(status);
                }
            }
        }
        PassiveJob::Started => {
            drop(st);
            invoke::state_change(id, callbacks.and_then(|c| c.EvtChannelStarted), handle);
            st = shared.lock();
            if let Some(c) = st.channels.get_mut(&seq) {
                c.running = true;
                c.ran_since_enable = true;
                c.suspended = false;
                c.queue_enabled = true;
                c.queue_failed = false;
                c.batch = 0;
            }
            st.flush(seq, shared.config.ring_capacity);
            shared.notify();
            drop(st);
            invoke::state_change(id, callbacks.and_then(|c| c.EvtChannelPostStarted), handle);
            st = shared.lock();
        }
        PassiveJob::Suspend => {
            if let Some(c) = st.channels.get_mut(&seq) {
                c.queue_enabled = false;
            }
            st = shared.wait_until(st, None, "process-packet callbacks to return", |st| {
                st.dpc_busy != Some(seq)
            });
            if let Some(c) = st.channels.get_mut(&seq) {
                c.suspend_callback_running = true;
            }
            drop(st);
            invoke::state_change(id, callbacks.and_then(|c| c.EvtChannelSuspend), handle);
            st = shared.lock();
            if let Some(c) = st.channels.get_mut(&seq) {
                c.suspend_callback_running = false;
            }
            shared.notify();
            // Packets deferred to PASSIVE but not redelivered are retired by the library.
            let deferred: Vec<u32> = st
                .channels
                .get_mut(&seq)
                .map(|c| c.deferred.drain(..).collect())
                .unwrap_or_default();
            for pc in deferred {
                if st.incoming.remove(&pc).is_some() {
                    st.retire(pc);
                    if let Some(c) = st.channels.get_mut(&seq) {
                        c.incoming_outstanding = c.incoming_outstanding.saturating_sub(1);
                    }
                }
            }
            st = shared.wait_until(
                st,
                None,
                "the driver to complete every incoming packet after EvtChannelSuspend",
                |st| {
                    st.channels
                        .get(&seq)
                        .is_none_or(|c| c.incoming_outstanding == 0)
                },
            );
            if let Some(c) = st.channels.get_mut(&seq) {
                c.running = false;
                c.suspended = true;
                c.suspend_generation = c.suspend_generation.wrapping_add(1);
                c.batch = 0;
            }
        }
        PassiveJob::Closed => {
            drop(st);
            invoke::state_change(id, callbacks.and_then(|c| c.EvtChannelClosed), handle);
            st = shared.lock();
            if let Some(c) = st.channels.get_mut(&seq) {
                c.opened = false;
            }
            // The ring is gone: whatever the guest had in it or had read is never completed.
            st.cancel_in_flight(seq, false);
        }
        PassiveJob::FinishDisable => {
            st.cancel_in_flight(seq, true);
            shared.notify();
            st = shared.wait_until(st, None, "cancelled packets' completion routines", |st| {
                st.dpc_busy != Some(seq) && !st.dpc_work.iter().any(|w| w.channel == seq)
            });
            if let Some(c) = st.channels.get_mut(&seq) {
                if let Link::Bound(g) = &c.link {
                    let mut mem = g.memory();
                    if matches!(mem.open, OpenState::Open | OpenState::Opening) {
                        mem.rescind();
                    }
                }
                c.lifecycle = Lifecycle::Disabled;
                c.link = Link::None;
                c.start_requested = false;
                c.queue_enabled = false;
                c.queue_failed = false;
                c.suspended = false;
            }
        }
    }
    st
}

/// Work for the DPC worker.
enum DpcJob {
    Complete {
        channel: u32,
        packet: u32,
        routine: PFN_VMB_PACKET_COMPLETION_ROUTINE,
        status: NtStatus,
        payload: Vec<u8>,
    },
    Process {
        channel: u32,
        pc: u32,
        level: Irql,
    },
    BatchDone {
        channel: u32,
        count: u32,
        level: Irql,
        cb: PFN_VMB_CHANNEL_PROCESSING_COMPLETE,
    },
}

impl DpcJob {
    fn channel(&self) -> u32 {
        match self {
            DpcJob::Complete { channel, .. }
            | DpcJob::Process { channel, .. }
            | DpcJob::BatchDone { channel, .. } => *channel,
        }
    }
}

/// Hands a packet back to the driver: its completion routine job, or (no routine set: KMCL's
/// default routine) frees it.
fn complete_packet(
    st: &mut State,
    channel: u32,
    packet: u32,
    status: NtStatus,
    payload: Vec<u8>,
) -> Option<DpcJob> {
    let p = st.packets.get_mut(&packet)?;
    let was = core::mem::replace(&mut p.state, PacketState::Idle);
    let (txid, routine) = (p.txid, p.routine);
    if was != PacketState::Idle {
        st.txid_idle(channel, txid);
    }
    match routine {
        Some(_) => Some(DpcJob::Complete {
            channel,
            packet,
            routine,
            status,
            payload,
        }),
        None => {
            st.packets.remove(&packet);
            st.retire(packet);
            if let Some(c) = st.channels.get_mut(&channel) {
                c.allocated = c.allocated.saturating_sub(1);
            }
            None
        }
    }
}

fn level(incoming_at_passive: bool) -> Irql {
    if incoming_at_passive {
        Irql::Passive
    } else {
        Irql::Dispatch
    }
}

/// Takes the next DPC job (doing any pure bookkeeping on the way).
fn take_dpc_job(st: &mut State, config: &SimConfig, ring_limit: usize) -> Option<DpcJob> {
    let ring_capacity = ring_limit;
    let seqs: Vec<u32> = st.channels.keys().copied().collect();
    for &seq in &seqs {
        st.flush(seq, ring_capacity);
    }
    while let Some(work) = st.dpc_work.pop_front() {
        if let Some(job) = complete_packet(st, work.channel, work.packet, work.status, Vec::new()) {
            return Some(job);
        }
    }
    for &seq in &seqs {
        if st.flowing(seq).is_some() {
            continue;
        }
        if let Some(job) = paused_completion(st, seq, config) {
            return Some(job);
        }
    }
    for seq in seqs {
        loop {
            let Some(guest) = st.flowing(seq) else {
                break;
            };
            let Some(c) = st.channels.get_mut(&seq) else {
                break;
            };
            if let Some(pc) = c.deferred.pop_front() {
                return Some(DpcJob::Process {
                    channel: seq,
                    pc,
                    level: Irql::Passive,
                });
            }
            let mut mem = guest.memory();
            match mem.to_host.front() {
                Some(ToHost::Completion { .. }) => {
                    let Some(ToHost::Completion { txid, payload }) = mem.to_host.pop_front() else {
                        break;
                    };
                    match c.in_flight.remove(&txid) {
                        Some(packet) => {
                            drop(mem);
                            if let Some(job) =
                                complete_packet(st, seq, packet, NtStatus::SUCCESS, payload)
                            {
                                return Some(job);
                            }
                        }
                        None => mem.ignored_completions += 1,
                    }
                }
                Some(ToHost::Request { .. }) => {
                    if c.quota.is_some_and(|q| c.incoming_outstanding >= q) {
                        break;
                    }
                    let Some(ToHost::Request { id, bytes }) = mem.to_host.pop_front() else {
                        break;
                    };
                    let generation = mem.generation;
                    drop(mem);
                    c.incoming_outstanding += 1;
                    c.batch += 1;
                    let level = level(c.incoming_at_passive);
                    let pc = st.new_seq();
                    st.incoming.insert(
                        pc,
                        Incoming {
                            channel: seq,
                            request: id,
                            generation,
                            guest: Arc::downgrade(&guest),
                            buffer: bytes,
                        },
                    );
                    return Some(DpcJob::Process {
                        channel: seq,
                        pc,
                        level,
                    });
                }
                None => {
                    drop(mem);
                    if c.batch > 0 {
                        let count = core::mem::take(&mut c.batch);
                        if c.processing_complete.is_some() {
                            return Some(DpcJob::BatchDone {
                                channel: seq,
                                count,
                                level: level(c.incoming_at_passive),
                                cb: c.processing_complete,
                            });
                        }
                    }
                    break;
                }
            }
        }
    }
    None
}

/// Processes one guest completion of a channel that is open but not running, where the reading
/// says completions keep flowing while paused (requests stay queued: the library buffers them).
fn paused_completion(st: &mut State, seq: u32, config: &SimConfig) -> Option<DpcJob> {
    loop {
        let guest = st.completions_flow(seq, config)?;
        let mut mem = guest.memory();
        let at = mem
            .to_host
            .iter()
            .position(|m| matches!(m, ToHost::Completion { .. }))?;
        let Some(ToHost::Completion { txid, payload }) = mem.to_host.remove(at) else {
            return None;
        };
        let packet = st.channels.get_mut(&seq)?.in_flight.remove(&txid);
        match packet {
            Some(packet) => {
                drop(mem);
                if let Some(job) = complete_packet(st, seq, packet, NtStatus::SUCCESS, payload) {
                    return Some(job);
                }
            }
            None => mem.ignored_completions += 1,
        }
    }
}

/// Whether the DPC worker has something to do.
fn dpc_runnable(st: &State, config: &SimConfig) -> bool {
    let ring_capacity = config.ring_capacity;
    if !st.dpc_work.is_empty() {
        return true;
    }
    st.channels.iter().any(|(&seq, c)| {
        if st.flushable(seq, ring_capacity) {
            return true;
        }
        let Some(guest) = st.flowing_ref(seq) else {
            return st.completions_flow_ref(seq, config).is_some_and(|g| {
                g.memory()
                    .to_host
                    .iter()
                    .any(|m| matches!(m, ToHost::Completion { .. }))
            });
        };
        if !c.deferred.is_empty() {
            return true;
        }
        let mem = guest.memory();
        match mem.to_host.front() {
            Some(ToHost::Completion { .. }) => true,
            Some(ToHost::Request { .. }) => c.quota.is_none_or(|q| c.incoming_outstanding < q),
            None => c.batch > 0 && c.processing_complete.is_some(),
        }
    })
}

/// Whether the instance is idle: no callback running, no transition pending, nothing the DPC
/// could process.
pub(crate) fn is_idle(st: &State, config: &SimConfig) -> bool {
    !st.passive_busy
        && st.dpc_busy.is_none()
        && next_passive_job(st).is_none()
        && !dpc_runnable(st, config)
}

/// The DPC worker's loop.
pub(crate) fn dpc_loop(shared: Arc<Shared>) {
    irql::mark_worker(shared.id);
    let mut st = shared.lock();
    loop {
        if st.shutdown {
            return;
        }
        let (guard, ran) = dpc_once(&shared, st, shared.config.ring_capacity);
        st = guard;
        if !ran {
            st = shared.wait(st);
        }
    }
}

/// Whether the DPC context has work and is free to do it (see [`passive_runnable`]).
pub(crate) fn dpc_ready(st: &State, config: &SimConfig) -> bool {
    st.dpc_busy.is_none() && dpc_runnable(st, config)
}

/// Runs the next DPC job, if any (after the bookkeeping that comes first: ring transfers, which
/// fill each ring up to `ring_limit` packets); returns whether a job ran. One turn of the DPC
/// worker's loop (`ring_limit` is the ring capacity), or one deterministic step (a seeded limit
/// up to it: the DPC got that far before the guest looked).
pub(crate) fn dpc_once<'a>(
    shared: &'a Shared,
    mut st: MutexGuard<'a, State>,
    ring_limit: usize,
) -> (MutexGuard<'a, State>, bool) {
    let id = shared.id;
    let Some(job) = take_dpc_job(&mut st, &shared.config, ring_limit) else {
        // Bookkeeping may have changed what waiters see.
        shared.notify();
        return (st, false);
    };
    let channel = job.channel();
    st.dpc_busy = Some(channel);
    let ch_handle = shared.handle(channel, Kind::Channel);
    match job {
        DpcJob::Complete {
            packet,
            routine,
            status,
            payload,
            ..
        } => {
            drop(st);
            let handle = shared.handle(packet, Kind::Packet);
            invoke::completion(id, routine, handle, status, &payload);
            st = shared.lock();
        }
        DpcJob::Process { pc, level, .. } => {
            let Some(inc) = st.incoming.get(&pc) else {
                st.dpc_busy = None;
                return (st, true);
            };
            let buffer = inc.buffer.as_ptr();
            let length = u32::try_from(inc.buffer.len()).unwrap_or(u32::MAX);
            let cb = st.channels.get(&channel).and_then(|c| c.process_packet);
            let pc_handle = shared.handle(pc, Kind::Completion);
            drop(st);
            let deferred = invoke::process_packet(
                id,
                cb,
                &invoke::Delivery {
                    channel: ch_handle,
                    pc_seq: pc,
                    pc: pc_handle,
                    buffer,
                    length,
                    level,
                },
            );
            st = shared.lock();
            if deferred
                && st.incoming.contains_key(&pc)
                && let Some(c) = st.channels.get_mut(&channel)
            {
                c.deferred.push_back(pc);
            }
        }
        DpcJob::BatchDone {
            count, level, cb, ..
        } => {
            drop(st);
            invoke::processing_complete(id, cb, ch_handle, count, level);
            st = shared.lock();
        }
    }
    st.dpc_busy = None;
    shared.notify();
    (st, true)
}
