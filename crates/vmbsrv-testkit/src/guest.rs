//! A guest that speaks the vmbsrv protocol, on top of the simulator's [`Guest`] endpoint.
//!
//! It negotiates, reads deliveries, records in the [`Ledger`] exactly what it read (sequence, tag
//! and payload bytes, which the ledger compares with its own record of the post, never with the
//! checksum the host wrote), and acknowledges in whatever order the scenario asks for. Its list of
//! received-but-unacknowledged deliveries is part of the VM, so it survives a migration.

use std::time::Duration;
use std::vec::Vec;

use zerocopy::IntoBytes;

use super::Rng;
use super::ledger::Ledger;
use kmcl_sim::{Guest, HostPacket, Kmcl, Reply};
use vmbsrv::saved::crc32c;
use vmbsrv::vsp::protocol::{self, Header, Kind, NegotiateReply, NegotiateRequest};

/// One delivery the guest has read and not yet acknowledged.
#[derive(Debug, Clone, Copy)]
pub struct Held {
    /// The VMBus transaction id to complete.
    pub txid: u64,
    /// The delivery's sequence number.
    pub sequence: u64,
    /// CRC32C of the payload as received.
    pub received_crc: u32,
}

/// The guest side of a scenario.
#[derive(Debug)]
pub struct GuestModel {
    /// The simulator endpoint (the VM's memory for the channel).
    pub endpoint: Guest,
    held: Vec<Held>,
    /// Packets that were not deliveries, or had no transaction id.
    pub malformed: u64,
}

impl GuestModel {
    /// A guest bound to the channel with these interface ids.
    pub fn new(endpoint: Guest) -> Self {
        Self {
            endpoint,
            held: Vec::new(),
            malformed: 0,
        }
    }

    /// Opens the channel and negotiates version 1.0; returns the host's reply.
    pub fn open_and_negotiate(&self, kmcl: &Kmcl) -> Result<NegotiateReply, &'static str> {
        self.endpoint
            .open()
            .map_err(|_| "guest could not open the channel")?;
        kmcl.wait_idle();
        if !self.endpoint.is_open() {
            return Err("the host did not open the channel");
        }
        let request = NegotiateRequest {
            header: Header::new(Kind::NegotiateRequest, size_of::<NegotiateRequest>()),
            min_version: protocol::VERSION_1_0.into(),
            max_version: protocol::VERSION_1_0.into(),
        };
        let id = self
            .endpoint
            .send_request(request.as_bytes())
            .map_err(|_| "request refused")?;
        let reply = self
            .endpoint
            .wait_reply(id, Duration::from_secs(5))
            .ok_or("no reply to the negotiation")?;
        let Reply::Completed(bytes) = reply else {
            return Err("the host failed the negotiation packet");
        };
        let reply = zerocopy::FromBytes::read_from_bytes(bytes.as_slice())
            .map_err(|_| "malformed negotiation reply")?;
        Ok(reply)
    }

    /// Reads every packet in the ring, records it, and holds it for acknowledgement.
    pub fn pump(&mut self, ledger: &mut Ledger) -> usize {
        let mut count = 0;
        while let Some(packet) = self.endpoint.receive() {
            count += 1;
            self.accept(&packet, ledger);
        }
        count
    }

    /// Handles one packet read from the ring (what [`GuestModel::pump`] does with each): a
    /// delivery is recorded in the ledger as read and held for acknowledgement.
    pub fn accept(&mut self, packet: &HostPacket, ledger: &mut Ledger) {
        let (Some(txid), Some(delivery)) = (packet.txid, protocol::parse_delivery(&packet.bytes))
        else {
            self.malformed += 1;
            return;
        };
        ledger.received(delivery.sequence, delivery.tag, delivery.payload);
        self.held.push(Held {
            txid,
            sequence: delivery.sequence,
            received_crc: crc32c(delivery.payload),
        });
    }

    /// Deliveries read and not yet acknowledged.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Acknowledges up to `count` held deliveries: oldest first, or in random order.
    pub fn acknowledge(&mut self, count: usize, rng: Option<&mut Rng>) -> usize {
        let count = count.min(self.held.len());
        let picked: Vec<Held> = match rng {
            None => self.held.drain(..count).collect(),
            Some(rng) => (0..count)
                .map(|_| {
                    let index = rng.below(self.held.len() as u64) as usize;
                    self.held.swap_remove(index)
                })
                .collect(),
        };
        for held in &picked {
            let ack = protocol::encode_ack(held.sequence, 0, held.received_crc);
            // A completion the endpoint refuses (channel not open) is a scenario bug; the ledger
            // will report the delivery as lost.
            let _ = self.endpoint.complete(held.txid, &ack);
        }
        picked.len()
    }
}
