//! Channel lifetime (allocate, enable, start, pause, disable, cleanup), initialization calls,
//! liveness checks, and the interface reference count with the end-of-instance checks.

use super::*;

impl Shared {
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
                live_txids: KeyMap::default(),
                incoming_outstanding: 0,
                deferred: VecDeque::new(),
                batch: 0,
                save: None,
                restore: RestorePhase::Idle,
                restore_chunk: None,
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
                    "channel is {lifecycle:?}; it must be disabled first (docs/kmcl-bindings.md §R2)"
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
            c.live_txids.clear();
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
                // What happens to them is undocumented (docs/kmcl-bindings.md, "Undocumented points"): one reading each.
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
                "VmbChannelStart inside a state-change callback (docs/kmcl-bindings.md §R2)",
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
        let mut guard = self.lock();
        let st = &mut *guard;
        // One lookup: the live check, then the call is counted, then `read` runs on the channel.
        let Some(c) = st.channels.get_mut(&seq) else {
            st.dead_handle(call, Kind::Channel, seq);
            return None;
        };
        let _ = tick_in(&mut st.counts, &st.faults, call);
        Some(read(c))
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
