//! Channel save: `VmbChannelSaveBegin` / `SaveContinue` / `SaveEnd`, and the two-call
//! save-packet protocol with the driver.

use super::*;

/// The most a `SaveContinue` reserves for a chunk body before it knows how much it will write
/// (1 MiB; a larger chunk still grows as needed).
const MAX_CHUNK_RESERVE: usize = 1 << 20;

impl Shared {
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
                "save of a running channel (SimConfig::save_requires = Paused, docs/kmcl-bindings.md, Undocumented points)",
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
        // In-flight packets in (transaction id, sequence number) order.
        let mut queue: VecDeque<u32> = in_flight_order(in_flight);
        // Unsent packets in allocation order (the packet map is not ordered).
        idle.sort_unstable();
        queue.extend(idle);
        let session = (u64::from(self.id) << 40) | NEXT_SESSION.fetch_add(1, Ordering::Relaxed);
        if let Some(c) = st.channels.get_mut(&seq) {
            c.save = Some(SaveCtx {
                session,
                stage: SaveStage::Begin,
                queue,
                pending: None,
                unit: Vec::new(),
                body: Vec::new(),
                scratch: Vec::new(),
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
        // From inside the driver's own save-packet callback: the running `SaveContinue` still
        // owns the save context (it finishes the unit it started into it), so ending the save
        // here is a sequence error; the context is kept and that `SaveContinue` ends normally.
        if st
            .channels
            .get(&seq)
            .and_then(|c| c.save.as_ref())
            .is_some_and(|ctx| ctx.busy)
        {
            st.violation(
                ViolationKind::SaveSequence,
                Some(call),
                "VmbChannelSaveEnd while VmbChannelSaveContinue is running on the channel",
            );
            return;
        }
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
        let mut last = false;
        // The chunk is assembled in `body`: room for its header first (filled in at the end),
        // then the units. Room for all the chunk can hold is allocated once, but never more
        // than `MAX_CHUNK_RESERVE` of units up front: `size` is the driver's buffer size, which
        // may be far larger than what is left to save.
        if let Some(ctx) = st.channels.get_mut(&seq).and_then(|c| c.save.as_mut()) {
            ctx.body.clear();
            ctx.body.reserve(
                container::CHUNK_HEADER_LEN
                    + size
                        .saturating_sub(container::CHUNK_HEADER_LEN)
                        .min(MAX_CHUNK_RESERVE),
            );
            ctx.body.resize(container::CHUNK_HEADER_LEN, 0);
        }
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
            let Some(is_end) = ctx.pending else {
                break;
            };
            let no_units = ctx.body.len() == container::CHUNK_HEADER_LEN;
            if ctx.body.len() + ctx.unit.len() > size {
                if no_units {
                    let required = container::CHUNK_HEADER_LEN + ctx.unit.len();
                    ctx.busy = false;
                    return SaveOutput {
                        status: NtStatus::BUFFER_TOO_SMALL,
                        chunk: Vec::new(),
                        required: u32::try_from(required).unwrap_or(u32::MAX),
                    };
                }
                break;
            }
            ctx.body.extend_from_slice(&ctx.unit);
            ctx.pending = None;
            if is_end {
                last = true;
                break;
            }
        }
        let Some(ctx) = st.channels.get_mut(&seq).and_then(|c| c.save.as_mut()) else {
            return fail(NtStatus::INVALID_DEVICE_STATE);
        };
        let (head, units) = ctx.body.split_at_mut(container::CHUNK_HEADER_LEN);
        head.copy_from_slice(&container::chunk_header(
            ctx.chunk_index,
            ctx.session,
            last,
            units,
        ));
        // The assembled chunk is handed out as it is (the next chunk starts a new buffer).
        let chunk = core::mem::take(&mut ctx.body);
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

    /// Produces the next save unit into `ctx.unit` / `ctx.pending` (calling the driver's save
    /// callback, with the lock released, for a packet unit).
    #[allow(clippy::type_complexity)]
    fn next_save_unit<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        seq: u32,
    ) -> Result<MutexGuard<'a, State>, (MutexGuard<'a, State>, NtStatus)> {
        loop {
            let st_ref = &mut *st;
            let Some(c) = st_ref.channels.get_mut(&seq) else {
                return Err((st, NtStatus::INVALID_DEVICE_STATE));
            };
            let save_cb = c.save_packet;
            let link = &c.link;
            let Some(ctx) = c.save.as_mut() else {
                return Err((st, NtStatus::INVALID_DEVICE_STATE));
            };
            match ctx.stage {
                SaveStage::Done => return Ok(st),
                SaveStage::Begin => {
                    ctx.unit.clear();
                    ctx.unit
                        .extend_from_slice(&container::encode_unit(&Unit::Begin));
                    ctx.pending = Some(false);
                    ctx.stage = SaveStage::Packets;
                    return Ok(st);
                }
                SaveStage::Packets => {}
            }
            let session = ctx.session;
            let Some(pseq) = ctx.queue.pop_front() else {
                let packets = ctx.packets_saved;
                ctx.unit.clear();
                ctx.unit
                    .extend_from_slice(&container::encode_unit(&Unit::End { packets }));
                ctx.pending = Some(true);
                ctx.stage = SaveStage::Done;
                return Ok(st);
            };
            // Snapshot the library state of this packet, unless it is no longer saveable.
            let Some(p) = st_ref.packets.get(&pseq) else {
                continue;
            };
            let location = match p.state {
                PacketState::Idle if self.config.save_unsent_packets && p.txid == 0 => {
                    Location::Idle
                }
                PacketState::Idle => continue,
                PacketState::Queued => Location::HostQueue,
                PacketState::Sent => {
                    let in_ring = match link {
                        Link::Bound(g) => g.memory().ring.iter().any(|e| e.txid == Some(p.txid)),
                        _ => false,
                    };
                    if in_ring {
                        Location::Ring
                    } else {
                        Location::Delivered
                    }
                }
            };
            // The unit's header, then the LibBuf, encoded now (the snapshot); the driver's bytes
            // follow once its callback returned.
            ctx.unit.clear();
            let start = container::start_packet_unit(&mut ctx.unit);
            let lib_len = container::encode_lib_into(
                &mut ctx.unit,
                location,
                p.txid,
                p.flags,
                session,
                &p.payload,
            );
            let mut scratch = core::mem::take(&mut ctx.scratch);
            let ch_handle = self.handle(seq, Kind::Channel);
            let pkt_handle = self.handle(pseq, Kind::Packet);
            drop(st);
            let result = self.save_packet_protocol(save_cb, ch_handle, pkt_handle, &mut scratch);
            st = self.lock();
            let Some(ctx) = st.channels.get_mut(&seq).and_then(|c| c.save.as_mut()) else {
                return Err((st, NtStatus::INVALID_DEVICE_STATE));
            };
            let (kept, driver_alloc) = match result {
                Ok(saved) => saved,
                Err(status) => {
                    ctx.scratch = scratch;
                    return Err((st, status));
                }
            };
            ctx.packets_saved = ctx.packets_saved.saturating_add(1);
            let driver = scratch.get(..kept).unwrap_or(&[]);
            container::finish_packet_unit(&mut ctx.unit, start, lib_len, driver, driver_alloc);
            ctx.scratch = scratch;
            ctx.pending = Some(false);
            return Ok(st);
        }
    }

    /// The two-call save-packet protocol (docs/kmcl-bindings.md §R4). Runs without the lock.
    fn save_packet_protocol(
        &self,
        cb: PFN_VMB_CHANNEL_SAVE_PACKET,
        ch: usize,
        pkt: usize,
        buffer: &mut Vec<u8>,
    ) -> Result<(usize, u32), NtStatus> {
        let call = Some(KmclCall::ChannelSaveContinue);
        let Some(cb) = cb else {
            self.lock().violation(
                ViolationKind::WrongState,
                call,
                "packets to save but no save callback registered \
                 (VmbServerChannelInitSetSaveRestorePacketCallbacks)",
            );
            return Ok((0, 0));
        };
        let mut needed: u32 = 0;
        let status = crate::invoke::save_packet(self.id, cb, ch, pkt, None, &mut needed);
        if status.is_success() {
            if needed != 0 {
                self.lock().violation(
                    ViolationKind::SaveCallbackProtocol,
                    call,
                    format!("size probe returned success but BytesNeeded = {needed}"),
                );
            }
            return Ok((0, 0));
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
        buffer.clear();
        buffer.resize(alloc as usize, 0xCC);
        let mut needed_again = needed;
        let status =
            crate::invoke::save_packet(self.id, cb, ch, pkt, Some(buffer), &mut needed_again);
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
        Ok((needed as usize, alloc))
    }
}

/// The sequence numbers of `packets` (transaction id, sequence number) in the order
/// `sort_unstable` puts the pairs in. While every transaction id fits 32 bits (it counts up from 1
/// through the process), each pair is packed into one `u64` that sorts the same way and sorted by
/// [`sort_keys`]; otherwise the pairs are sorted as they are.
fn in_flight_order(mut packets: Vec<(u64, u32)>) -> VecDeque<u32> {
    if packets.iter().all(|&(txid, _)| txid <= u64::from(u32::MAX)) {
        let mut keys: Vec<u64> = packets
            .iter()
            .map(|&(txid, pseq)| (txid << 32) | u64::from(pseq))
            .collect();
        sort_keys(&mut keys);
        keys.into_iter().map(|key| key as u32).collect()
    } else {
        packets.sort_unstable();
        packets.into_iter().map(|(_, pseq)| pseq).collect()
    }
}

/// Sorts `keys` ascending (the same result as `sort_unstable`: equal keys are indistinguishable)
/// by a least-significant-byte-first radix sort that skips every byte position where all keys
/// agree. A channel's in-flight keys differ in a few low bytes of the transaction id and of the
/// sequence number, so this is a handful of linear passes instead of a comparison sort.
fn sort_keys(keys: &mut Vec<u64>) {
    if keys.len() < 64 {
        keys.sort_unstable();
        return;
    }
    // One pass counts every byte position's digits.
    let mut counts = [[0usize; 256]; 8];
    for &key in keys.iter() {
        for (byte, count) in key.to_le_bytes().into_iter().zip(counts.iter_mut()) {
            count[usize::from(byte)] += 1;
        }
    }
    let mut scratch = std::vec![0u64; keys.len()];
    for (position, count) in counts.iter().enumerate() {
        if count.contains(&keys.len()) {
            continue; // every key has the same byte here
        }
        let mut offsets = [0usize; 256];
        let mut total = 0;
        for (offset, &n) in offsets.iter_mut().zip(count.iter()) {
            *offset = total;
            total += n;
        }
        let shift = position * 8;
        for &key in keys.iter() {
            let digit = usize::from((key >> shift) as u8);
            if let Some(slot) = scratch.get_mut(offsets[digit]) {
                *slot = key;
            }
            offsets[digit] += 1;
        }
        core::mem::swap(keys, &mut scratch);
    }
}

#[cfg(test)]
mod tests {
    use super::{VecDeque, in_flight_order, sort_keys};
    use std::vec::Vec;

    /// The radix sort agrees with `sort_unstable` on short and long inputs, duplicates, keys that
    /// differ only in high bytes, and the channel-shaped keys it is used for; and the in-flight
    /// order is the pairs' order, with or without transaction ids beyond 32 bits.
    #[test]
    fn sort_keys_matches_sort_unstable() {
        let mut state = 0x1234_5678_9ABC_DEF0_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for len in [0usize, 1, 2, 63, 64, 65, 500, 2100] {
            for shape in 0..5 {
                let pairs: Vec<(u64, u32)> = (0..len)
                    .map(|i| match shape {
                        0 => (next(), next() as u32),
                        1 => (1000 + next() % 3000, (i % 4000) as u32),
                        2 => ((next() % 4) << 28, 7),
                        3 => (next() % 3, (next() % 3) as u32),
                        _ => (next() & 0xFFFF_FFFF, next() as u32),
                    })
                    .collect();
                let mut expected = pairs.clone();
                expected.sort_unstable();
                let expected: VecDeque<u32> = expected.into_iter().map(|(_, p)| p).collect();
                assert_eq!(in_flight_order(pairs.clone()), expected, "length {len}");
                let mut keys: Vec<u64> = pairs.iter().map(|&(t, p)| t ^ u64::from(p)).collect();
                let mut sorted = keys.clone();
                sorted.sort_unstable();
                sort_keys(&mut keys);
                assert_eq!(keys, sorted, "length {len}");
            }
        }
    }
}
