//! Incoming packets (completion, deferral to PASSIVE) and packet objects (allocate, free,
//! completion routine, send, synchronous request).

use super::*;

impl Shared {
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
                "only allowed inline from the process-packet callback of that packet (docs/kmcl-bindings.md §R3)",
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
        let mut guard = self.lock();
        let st = &mut *guard;
        // One channel lookup: the live check, then the call is counted, then the pool.
        let Some(c) = st.channels.get_mut(&ch) else {
            st.dead_handle(call, Kind::Channel, ch);
            return 0;
        };
        if tick_in(&mut st.counts, &st.faults, call).is_some() {
            return 0;
        }
        if c.allocated >= self.config.packet_pool_size {
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
                payload: Payload::EMPTY,
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
        let mut guard = self.lock();
        let st = &mut *guard;
        // One lookup: the live check, then the call is counted, then `f` runs on the packet.
        let Some(p) = st.packets.get_mut(&seq) else {
            st.dead_handle(call, Kind::Packet, seq);
            return None;
        };
        let _ = tick_in(&mut st.counts, &st.faults, call);
        Some(f(p))
    }

    /// `VmbPacketSetCompletionRoutine`.
    pub(crate) fn packet_set_routine(&self, seq: u32, routine: PFN_VMB_PACKET_COMPLETION_ROUTINE) {
        let call = KmclCall::PacketSetCompletionRoutine;
        let mut guard = self.lock();
        let st = &mut *guard;
        // One lookup: the live check, then the call is counted, then the packet is updated.
        let Some(p) = st.packets.get_mut(&seq) else {
            st.dead_handle(call, Kind::Packet, seq);
            return;
        };
        let _ = tick_in(&mut st.counts, &st.faults, call);
        let keep =
            self.config.restored_packet_context == RestoredPacketContext::KeepSetBeforeRestore;
        // A packet restored into a channel that has not run since cannot complete yet, so its
        // routine may be set again (the driver re-binds restored packets under every reading);
        // on a channel that may be running, a change races the completion.
        let quiet = || {
            st.channels.get(&p.channel).is_some_and(|c| {
                c.lifecycle == Lifecycle::Disabled
                    || (self.config.restore_timing == RestoreTiming::AfterEnable && !c.running)
            })
        };
        if p.state != PacketState::Idle && keep && !quiet() {
            violation_in(
                &mut st.violations,
                ViolationKind::PacketModifiedInFlight,
                call,
                "completion routine changed while the library owns the packet (set it before \
                 VmbPacketSend / VmbPacketRestore; docs/kmcl-bindings.md §R4 and its undocumented points)",
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
            // suspend: the violation (docs/kmcl-bindings.md §R2).
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
                     thread whose earlier late send was already refused (docs/kmcl-bindings.md §R2)",
                );
            }
            return NtStatus::INVALID_DEVICE_STATE;
        }
        let txid = next_txid(&NEXT_TXID, st.channels.get(&ch).map(|c| &c.live_txids));
        if let Some(p) = st.packets.get_mut(&seq) {
            p.txid = txid;
            p.flags = flags;
            p.payload = Payload::Owned(bytes);
            p.state = PacketState::Queued;
        }
        st.txid_live(ch, txid);
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
                "packets are not flowing (use it from EvtChannelPostStarted on, docs/kmcl-bindings.md §R3)",
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
}
