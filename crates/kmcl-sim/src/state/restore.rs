//! Channel restore: `VmbChannelRestoreFromBuffer` by chunks (with the restore-packet callback)
//! and `VmbPacketRestore`.

use super::*;

impl Shared {
    // ---- restore ---------------------------------------------------------------------------------

    /// `VmbChannelRestoreFromBuffer` with a copy of the driver's buffer.
    pub(crate) fn restore_from_buffer(&self, seq: u32, chunk_copy: &Arc<[u8]>) -> NtStatus {
        let bytes: &[u8] = chunk_copy;
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
        // Looked up in the channel's set of live transaction ids, kept in step with every packet
        // state change, so each unit costs one lookup and a chunked restore stays linear.
        let duplicate = libs
            .iter()
            .flatten()
            .any(|lib| c.live_txids.contains_key(&lib.txid));
        #[cfg(debug_assertions)]
        {
            // The definition, checked against the set in debug builds (every test run).
            let chunk_txids: std::collections::BTreeSet<u64> =
                libs.iter().flatten().map(|lib| lib.txid).collect();
            let scanned = st.packets.values().any(|p| {
                p.channel == seq && p.state != PacketState::Idle && chunk_txids.contains(&p.txid)
            });
            debug_assert_eq!(duplicate, scanned, "live transaction id set out of step");
        }
        let Some(c) = st.channels.get_mut(&seq) else {
            return NtStatus::INVALID_PARAMETER_1;
        };
        // The same transaction id twice within the chunk: forged as well (a save writes each
        // packet once).
        let mut chunk_txids: KeyMap<u64, ()> = KeyMap::default();
        chunk_txids.reserve(libs.len());
        let repeated = libs
            .iter()
            .flatten()
            .any(|lib| chunk_txids.insert(lib.txid, ()).is_some());
        if duplicate || repeated {
            c.restore = RestorePhase::Failed;
            return NtStatus::DATA_ERROR;
        }
        // Sends during the restore (a channel restored after Enable) draw their ids above the
        // chunk's, so no unit restored later finds its id taken.
        if let Some(highest) = chunk_txids.keys().max() {
            NEXT_TXID.fetch_max(highest.saturating_add(1), Ordering::Relaxed);
        }
        session.get_or_insert(chunk.session);
        c.restore = RestorePhase::Busy;
        // Room up front for what the chunk's packets will add (the driver allocates and restores
        // one packet object per unit, each carrying a live transaction id), so the maps do not
        // grow one rehash at a time during the callbacks.
        let units = libs.iter().flatten().count();
        c.live_txids.reserve(units);
        // The restore callbacks get their `LibBuf` and `SaveBuf` from a second copy of the chunk,
        // so that a driver writing into them (they are `_In_`) cannot reach the bytes restored
        // packets share (`RestoreChunk`).
        let driver_view: Vec<u8> = bytes.to_vec();
        let in_view = |part| in_view(part, bytes, &driver_view);
        c.restore_chunk = Some(RestoreChunk {
            shared: Arc::clone(chunk_copy),
            driver_view: driver_view.as_ptr().addr(),
        });
        st.packets.reserve(units);
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
            // The driver's bytes as saved, unless a setting pads or a test tampers with them.
            let owned;
            let save_buf: &[u8] = if padded || self.config.tamper_driver_bytes.is_some() {
                let mut bytes = driver.to_vec();
                if padded {
                    bytes.resize(*driver_alloc as usize, 0);
                }
                if let Some(tamper) = self.config.tamper_driver_bytes {
                    tamper(u64::from(packets), &mut bytes);
                }
                owned = bytes;
                &owned
            } else {
                in_view(driver)
            };
            let (status, restored) = crate::invoke::restore_packet(
                self.id,
                restore_cb,
                ch_handle,
                seq,
                lib.txid,
                in_view(lib_bytes),
                save_buf,
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
                        c.restore_chunk = None;
                    }
                    return status;
                }
            }
        }
        let mut st = self.lock();
        let Some(c) = st.channels.get_mut(&seq) else {
            return NtStatus::INVALID_DEVICE_STATE;
        };
        c.restore_chunk = None;
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

    /// `VmbPacketRestore` (`lib_bytes`: the driver's `LibBuf`, read in place by the FFI layer).
    pub(crate) fn packet_restore(&self, seq: u32, lib_bytes: &[u8]) -> NtStatus {
        let call = KmclCall::PacketRestore;
        let mut guard = self.lock();
        let st = &mut *guard;
        // One packet lookup for the whole call: the live check, then the IRQL check, then the
        // call is counted, then the checks and the update below (same order as ever).
        let Some(p) = st.packets.get_mut(&seq) else {
            st.dead_handle(call, Kind::Packet, seq);
            return NtStatus::INVALID_PARAMETER_1;
        };
        if !require_passive_in(&mut st.violations, call) {
            return NtStatus::INVALID_DEVICE_STATE;
        }
        if let Some(status) = tick_in(&mut st.counts, &st.faults, call) {
            return status;
        }
        let ch = p.channel;
        let violations = &mut st.violations;
        let frame = irql::top_frame().filter(|f| f.instance == self.id);
        let Some(FrameKind::RestorePacket {
            channel,
            txid,
            restored,
        }) = frame.map(|f| f.kind)
        else {
            violation_in(
                violations,
                ViolationKind::PacketRestoreMisuse,
                call,
                "VmbPacketRestore outside the restore callback",
            );
            return NtStatus::INVALID_DEVICE_STATE;
        };
        if channel != ch {
            violation_in(
                violations,
                ViolationKind::PacketRestoreMisuse,
                call,
                "packet was allocated on another channel than the one being restored",
            );
            return NtStatus::INVALID_PARAMETER_1;
        }
        if restored.is_some() {
            violation_in(
                violations,
                ViolationKind::PacketRestoreMisuse,
                call,
                "VmbPacketRestore called twice for one saved packet",
            );
            return NtStatus::INVALID_DEVICE_STATE;
        }
        if p.state != PacketState::Idle {
            violation_in(
                violations,
                ViolationKind::PacketInFlight,
                call,
                "restoring into a packet that is in flight",
            );
            return NtStatus::INVALID_DEVICE_STATE;
        }
        let lib = match container::decode_lib_view(lib_bytes) {
            Ok(lib) if lib.txid == txid => lib,
            _ => {
                violation_in(
                    violations,
                    ViolationKind::PacketRestoreMisuse,
                    call,
                    "LibBuf is not the one this restore callback was given",
                );
                return NtStatus::INVALID_PARAMETER;
            }
        };
        // The chunk's ids were checked against the live ones and each other before any callback,
        // and the counter was moved past them, so a send during the restore cannot have taken
        // this one; kept as the last word on "one live packet per transaction id".
        if st
            .channels
            .get(&ch)
            .is_some_and(|c| c.live_txids.contains_key(&lib.txid))
        {
            return NtStatus::DATA_ERROR;
        }
        // The counter only grows, and the chunk's ids already moved it past this one: the
        // read-modify-write (a locked instruction, on a counter every instance shares) is
        // needed only when a plain read says it did not.
        let above = lib.txid.saturating_add(1);
        if NEXT_TXID.load(Ordering::Relaxed) < above {
            NEXT_TXID.fetch_max(above, Ordering::Relaxed);
        }
        let reset_routine =
            self.config.restored_packet_context != RestoredPacketContext::KeepSetBeforeRestore;
        let reset_pointer =
            self.config.restored_packet_context == RestoredPacketContext::ResetOnRestore;
        let mut c = st.channels.get_mut(&ch);
        let force_new = c.as_ref().is_some_and(|c| {
            c.server_flags & VMBUS_SERVER_CHANNEL_INIT_FLAG_FORCE_NEW_CHANNEL != 0
        });
        let wait = lib.flags & VMBUS_CHANNEL_FORMAT_FLAG_WAIT_FOR_COMPLETION != 0;
        if reset_routine {
            p.routine = None;
        }
        if reset_pointer {
            p.pointer = DriverPtr::NULL;
        }
        p.txid = lib.txid;
        p.flags = lib.flags;
        // The payload is shared with the chunk being restored when `LibBuf` lies in it (the
        // buffer the restore callback was given), copied otherwise.
        p.payload = Payload::from_chunk(
            c.as_ref().and_then(|c| c.restore_chunk.as_ref()),
            lib.payload,
        );
        let requeue = force_new || !wait;
        let new_state = match lib.location {
            Location::Idle => PacketState::Idle,
            Location::HostQueue => PacketState::Queued,
            Location::Ring | Location::Delivered if requeue => PacketState::Queued,
            Location::Ring | Location::Delivered => PacketState::Sent,
        };
        p.state = new_state;
        if let Some(c) = c.as_mut() {
            if new_state != PacketState::Idle {
                // `State::txid_live`, on the channel already looked up.
                *c.live_txids.entry(lib.txid).or_insert(0) += 1;
            }
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
}

/// Structural checks of a decoded chunk against the restore so far; returns, per unit, the decoded
/// `LibBuf` of a packet unit.
fn validate_chunk<'a>(
    chunk: &container::Chunk<'a>,
    expected: u32,
    session: Option<u64>,
    packets_so_far: u32,
) -> Result<Vec<Option<LibView<'a>>>, NtStatus> {
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
                let lib = container::decode_lib_view(lib).map_err(|_| NtStatus::DATA_ERROR)?;
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

/// The bytes of `view` (a copy of `chunk`) where `part` lies in `chunk`; `part` itself if it does
/// not lie there.
fn in_view<'a>(part: &'a [u8], chunk: &[u8], view: &'a [u8]) -> &'a [u8] {
    let start = part.as_ptr().addr().wrapping_sub(chunk.as_ptr().addr());
    start
        .checked_add(part.len())
        .filter(|&end| end <= chunk.len())
        .and_then(|end| view.get(start..end))
        .unwrap_or(part)
}
