//! [`Vsp`] as KMCL's [`ChannelEvents`] handler: state changes, guest requests, completions of
//! host packets, and the save/restore packet callbacks.

use super::*;

impl<L: DispatchLock<DeliveryTable>> ChannelEvents for Vsp<L> {
    fn outstanding_packets(&self) -> u32 {
        // Every delivery in flight is a packet KMCL owns (sent or restored), and so is every
        // packet whose delivery was settled without it after a Disable; a post between
        // reservation and send also counts, which only makes teardown more careful.
        self.table.with(|table| table.packets_kmcl_owns())
    }

    fn packets_worth_waiting_for(&self) -> u32 {
        // `disable` already waited for the packets it gave up on.
        self.table.with(|table| table.in_flight())
    }

    fn relax(&self) {
        L::relax();
    }

    fn shed_memory(&self) {
        // Taken under the lock (a few pointer moves), freed after it is released.
        let storage = self.table.with(|table| table.take_storage());
        drop(storage);
    }

    fn opened(&self, _channel: Channel<'_, Self>) -> NtStatus {
        let keep = self.keep_version_on_open.swap(false, Ordering::AcqRel);
        if !keep {
            // A new guest connection negotiates afresh.
            self.table.with(|table| table.protocol_version = 0);
        }
        self.guest_open.store(true, Ordering::Release);
        NtStatus::SUCCESS
    }

    fn closed(&self, _channel: Channel<'_, Self>) {
        self.guest_open.store(false, Ordering::Release);
        self.table.with(|table| table.running = false);
    }

    fn suspend(&self, _channel: Channel<'_, Self>) {
        // No new post from here on. Nothing waits here: whether KMCL serializes VmbPacketSend
        // against this callback is not documented, and if it does, waiting for a send would
        // deadlock. Every pause and disable vmbsrv makes itself is preceded by `freeze_posts`
        // on the control side, so no send of ours is under way then; a suspend the guest causes
        // (closing its channel) can meet a send in progress, which KMCL then refuses (the post
        // reports the failure and frees its slot) or cancels (the delivery ends `Cancelled`):
        // either way it ends exactly once. Incoming packets are always completed inline, so
        // none is outstanding here.
        self.table.with(|table| table.running = false);
    }

    fn started(&self, _channel: Channel<'_, Self>) {}

    fn post_started(&self, _channel: Channel<'_, Self>) {
        self.table.with(|table| table.running = true);
    }

    fn process_packet(&self, _channel: Channel<'_, Self>, packet: IncomingPacket<'_>, flags: u32) {
        let bytes = packet.bytes();
        // One copy out of guest-writable memory; only the copy is parsed.
        let mut copy = [0u8; protocol::MAX_REQUEST_LEN];
        let copy = bytes.copy_prefix_to(&mut copy);
        let parsed = protocol::parse_request(copy, bytes.len());
        self.table.with(|table| {
            table.stats.guest_requests = table.stats.guest_requests.saturating_add(1)
        });
        match parsed {
            Err(RequestError::Garbled) => {
                // Answered with an error, never `VmbChannelPacketFail`: whether that call retires
                // the packet is undocumented, and under one reading the packet would stay
                // outstanding (and every later pause hang), under the other completing it would
                // be a double completion. An error reply is right under both, and a guest that
                // sends garbage cannot stop its own queue.
                self.table.with(|table| {
                    table.stats.guest_garbled = table.stats.guest_garbled.saturating_add(1)
                });
                self.reply_error(packet, 0, NtStatus::DATA_ERROR);
            }
            Err(RequestError::Invalid { kind, status }) => {
                self.table.with(|table| {
                    table.stats.guest_bad_requests =
                        table.stats.guest_bad_requests.saturating_add(1)
                });
                self.reply_error(packet, kind, status);
            }
            Ok(request) if flags & raw::VMBUS_CHANNEL_PROCESS_PACKET_FLAG_EXTERNAL_DATA != 0 => {
                // No request of this protocol carries external data.
                self.table.with(|table| {
                    table.stats.guest_bad_requests =
                        table.stats.guest_bad_requests.saturating_add(1)
                });
                self.reply_error(packet, request.kind() as u16, NtStatus::INVALID_PARAMETER);
            }
            Ok(Request::Negotiate { min, max }) => self.negotiate(packet, min, max),
            Ok(Request::Statistics) => self.report_statistics(packet),
        }
    }

    fn packet_completed(
        &self,
        packet: Packet<'_, Self>,
        status: NtStatus,
        payload: GuestBytes<'_>,
    ) {
        let mut copy = [0u8; protocol::MAX_ACK_LEN];
        let ack = if payload.len() == protocol::ACK_LEN {
            protocol::parse_ack(payload.copy_prefix_to(&mut copy))
        } else {
            None
        };
        if let Some(token) = packet.token() {
            // A token that matches nothing belongs to a packet whose delivery was already settled
            // after a Disable that did not return it (`abandon_unreturned`): nothing to record,
            // but the packet is accounted for.
            self.table.with(|table| {
                if table
                    .complete(token, |delivery| Self::classify(status, ack, delivery))
                    .is_none()
                {
                    table.completion_without_delivery();
                }
            });
        }
        packet.free();
    }

    fn save_packet(
        &self,
        _channel: Channel<'_, Self>,
        packet: PacketView<'_>,
        buffer: Option<&mut [u8]>,
    ) -> SavePacketAnswer {
        let token = packet.token();
        let buf_len = buffer.as_ref().map(|buf| buf.len());
        // One hold of the lock per call: the lookup, and, when this call will write the record
        // into KMCL's buffer, the count of that write (the size probe writes nothing). Whether
        // it will write depends only on the record and the buffer's length (`save_writes`), so
        // the encoding itself runs after the lock is released.
        let (delivery, save_id, counted) = self.table.with(|table| {
            let (delivery, save_id) = table.save_lookup(token);
            let counted = match (token, &delivery, buf_len) {
                (Some(token), Some(record), Some(len)) if save_writes(record, save_id, len) => {
                    table.record_save_write(token);
                    true
                }
                _ => false,
            };
            (delivery, save_id, counted)
        });
        let answer = answer_save(delivery.as_ref(), save_id, buffer);
        debug_assert_eq!(
            counted,
            buf_len.is_some() && token.is_some() && answer.status.is_success(),
            "save_writes must predict answer_save"
        );
        SavePacketAnswer {
            status: answer.status,
            bytes_needed: answer.bytes_needed,
        }
    }

    fn restore_packet(
        &self,
        channel: Channel<'_, Self>,
        lib_buf: &[u8],
        save_buf: &[u8],
    ) -> NtStatus {
        if self.phase() != Phase::Restoring {
            // The channel record must come first: it carries the sequence counter every
            // restored delivery is checked against.
            return NtStatus::INVALID_DEVICE_STATE;
        }
        // Validate everything before building anything.
        let (record, save_id) = match DeliveryRecord::decode_saved(save_buf) {
            Ok(decoded) => decoded,
            Err(error) => return restore_status(error),
        };
        let expected = self.expected_restored.load(Ordering::Acquire);
        let inserted = self
            .table
            .with(|table| table.accept_restored(record, save_id, self.max_message_len, expected));
        let token = match inserted {
            Ok(token) => token,
            Err(status) => return status,
        };
        let Some(packet) = channel.allocate_packet() else {
            self.table.with(|table| table.remove_restored(token));
            return NtStatus::INSUFFICIENT_RESOURCES;
        };
        // Completion routine and context first: a restored packet keeps nothing of its past.
        packet.set_completion_routine();
        packet.set_token(token);
        match packet.restore(lib_buf) {
            Ok(restored) => {
                restored.rebind(token);
                NtStatus::SUCCESS
            }
            Err((status, packet)) => {
                packet.free();
                self.table.with(|table| table.remove_restored(token));
                status
            }
        }
    }
}
