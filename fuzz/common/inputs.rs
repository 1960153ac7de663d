//! The byte formats of the end-to-end fuzz targets' inputs, shared by the targets (which decode
//! them) and by the seed generator `tests/reliability_fuzz_seeds.rs` (which encodes real
//! scenarios into them). Plain std, no dependency: both sides include this file with `#[path]`.
//!
//! Decoding is total: any byte string decodes to *some* input (missing fields read as empty or
//! zero), so libFuzzer never wastes an execution on a parse failure.
#![allow(dead_code)] // each includer uses part of it

/// The simulator's deterministic-schedule seed for an input: FNV-1a over all its bytes, so an
/// input replays exactly (every end-to-end target runs `Schedule::Deterministic` with it).
pub(crate) fn schedule_seed(data: &[u8]) -> u64 {
    data.iter().fold(0xCBF2_9CE4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// A reader over fuzz bytes that yields zeros / empty slices once the input runs out.
pub(crate) struct Cursor<'a> {
    bytes: &'a [u8],
}

impl<'a> Cursor<'a> {
    /// Reads from `bytes`.
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    /// Whether everything was read.
    pub(crate) fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Up to `len` bytes (fewer at the end of the input).
    pub(crate) fn take(&mut self, len: usize) -> &'a [u8] {
        let len = len.min(self.bytes.len());
        let (head, tail) = self.bytes.split_at(len);
        self.bytes = tail;
        head
    }

    /// One byte, 0 past the end.
    pub(crate) fn u8(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }

    /// A little-endian u16 (missing bytes are 0).
    pub(crate) fn u16(&mut self) -> u16 {
        let mut b = [0u8; 2];
        let t = self.take(2);
        b[..t.len()].copy_from_slice(t);
        u16::from_le_bytes(b)
    }

    /// A little-endian u32 (missing bytes are 0).
    pub(crate) fn u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        let t = self.take(4);
        b[..t.len()].copy_from_slice(t);
        u32::from_le_bytes(b)
    }

    /// A little-endian u64 (missing bytes are 0).
    pub(crate) fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        let t = self.take(8);
        b[..t.len()].copy_from_slice(t);
        u64::from_le_bytes(b)
    }

    /// A u8-length-prefixed byte string.
    pub(crate) fn bytes8(&mut self) -> &'a [u8] {
        let len = usize::from(self.u8());
        self.take(len)
    }

    /// A u16-length-prefixed byte string.
    pub(crate) fn bytes16(&mut self) -> &'a [u8] {
        let len = usize::from(self.u16());
        self.take(len)
    }

    /// A u32-length-prefixed byte string.
    pub(crate) fn bytes32(&mut self) -> &'a [u8] {
        let len = self.u32() as usize;
        self.take(len)
    }
}

// ---- restore_e2e --------------------------------------------------------------------------------

/// `restore_e2e` flag: repair the channel record's magic, length and CRC before restoring it.
pub(crate) const RESTORE_SEAL_RECORD: u8 = 0x01;
/// `restore_e2e` flag: repair each driver-bytes override as a delivery record (magic, length, CRC).
pub(crate) const RESTORE_SEAL_OVERRIDES: u8 = 0x02;
/// `restore_e2e` flag: after a complete restore, `finish_restore` (enable + start) before teardown.
pub(crate) const RESTORE_FINISH: u8 = 0x04;
/// `restore_e2e` flag: the simulator hands the restore callback zero-padded save buffers.
pub(crate) const RESTORE_PADDED_SAVE_BUF: u8 = 0x08;
/// `restore_e2e` flag: `VmbPacketRestore` resets the packet's routine and context pointer.
pub(crate) const RESTORE_RESET_CONTEXT: u8 = 0x10;
/// `restore_e2e` flag: restore the built-in real save's chunks instead of `chunks`.
pub(crate) const RESTORE_REAL_CHUNKS: u8 = 0x20;
/// `restore_e2e` flag: use the built-in real save's channel record instead of `record`.
pub(crate) const RESTORE_REAL_RECORD: u8 = 0x40;

/// One `restore_e2e` input: what is fed to a fresh channel's restore.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RestoreInput {
    /// `RESTORE_*` flags.
    pub(crate) flags: u8,
    /// The channel record handed to `restore_channel_record`.
    pub(crate) record: Vec<u8>,
    /// The KMCL chunks handed to `restore_chunk`, in order.
    pub(crate) chunks: Vec<Vec<u8>>,
    /// `(ordinal, bytes)`: the driver bytes the restore callback of saved packet `ordinal` sees
    /// instead of the saved ones (through `SimConfig::tamper_driver_bytes`).
    pub(crate) overrides: Vec<(u8, Vec<u8>)>,
}

impl RestoreInput {
    /// Decodes fuzz bytes (total).
    pub(crate) fn decode(bytes: &[u8]) -> Self {
        let mut c = Cursor::new(bytes);
        let flags = c.u8();
        let record = c.bytes16().to_vec();
        let chunk_count = c.u8() % 32;
        let chunks = (0..chunk_count).map(|_| c.bytes32().to_vec()).collect();
        let override_count = c.u8() % 16;
        let overrides = (0..override_count)
            .map(|_| {
                let ordinal = c.u8();
                (ordinal, c.bytes16().to_vec())
            })
            .collect();
        Self {
            flags,
            record,
            chunks,
            overrides,
        }
    }

    /// Encodes (the inverse of [`RestoreInput::decode`] for in-range inputs).
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = vec![self.flags];
        put16(&mut out, &self.record);
        out.push(self.chunks.len() as u8);
        for chunk in &self.chunks {
            out.extend_from_slice(&(chunk.len() as u32).to_le_bytes());
            out.extend_from_slice(chunk);
        }
        out.push(self.overrides.len() as u8);
        for (ordinal, bytes) in &self.overrides {
            out.push(*ordinal);
            put16(&mut out, bytes);
        }
        out
    }
}

fn put16(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn put8(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(bytes.len() as u8);
    out.extend_from_slice(bytes);
}

// ---- guest_packets ------------------------------------------------------------------------------

/// One step of a `guest_packets` input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum GuestOp {
    /// The guest sends these bytes as a request (an incoming packet for the host).
    Request(Vec<u8>),
    /// The host posts a message of `len` bytes (0 is refused by the VSP: also a test).
    Post { len: u8 },
    /// The guest reads everything in its ring.
    Receive,
    /// The guest completes its `pick`-th held packet with these bytes as the payload.
    Complete { pick: u8, payload: Vec<u8> },
    /// The guest sends a completion for an arbitrary transaction id (`pick` = 255: `txid`
    /// itself; otherwise the `pick`-th id ever received, completed or not).
    RawCompletion {
        pick: u8,
        txid: u64,
        payload: Vec<u8>,
    },
    /// The guest closes the channel, reopens it and negotiates again.
    Reopen,
    /// The host restarts a stopped incoming queue.
    RestartIncoming,
    /// The guest completes its `pick`-th held packet with a well-formed acknowledgement of that
    /// delivery, carrying `status` and the payload checksum XOR `crc_xor` (0: the right one).
    Ack { pick: u8, status: u32, crc_xor: u32 },
    /// The host saves the channel (in `chunk`-byte chunks) and resumes (an aborted migration).
    SaveAndResume { chunk: u8 },
}

/// Decodes fuzz bytes into at most `max` steps (total).
pub(crate) fn decode_guest_ops(bytes: &[u8], max: usize) -> Vec<GuestOp> {
    let mut c = Cursor::new(bytes);
    let mut ops = Vec::new();
    while !c.is_empty() && ops.len() < max {
        let op = match c.u8() % 9 {
            0 => GuestOp::Request(c.bytes8().to_vec()),
            1 => GuestOp::Post { len: c.u8() },
            2 => GuestOp::Receive,
            3 => GuestOp::Complete {
                pick: c.u8(),
                payload: c.bytes8().to_vec(),
            },
            4 => GuestOp::RawCompletion {
                pick: c.u8(),
                txid: c.u64(),
                payload: c.bytes8().to_vec(),
            },
            5 => GuestOp::Reopen,
            6 => GuestOp::RestartIncoming,
            7 => GuestOp::Ack {
                pick: c.u8(),
                status: c.u32(),
                crc_xor: c.u32(),
            },
            _ => GuestOp::SaveAndResume { chunk: c.u8() },
        };
        ops.push(op);
    }
    ops
}

/// Encodes steps (the inverse of [`decode_guest_ops`]).
pub(crate) fn encode_guest_ops(ops: &[GuestOp]) -> Vec<u8> {
    let mut out = Vec::new();
    for op in ops {
        match op {
            GuestOp::Request(bytes) => {
                out.push(0);
                put8(&mut out, bytes);
            }
            GuestOp::Post { len } => out.extend_from_slice(&[1, *len]),
            GuestOp::Receive => out.push(2),
            GuestOp::Complete { pick, payload } => {
                out.extend_from_slice(&[3, *pick]);
                put8(&mut out, payload);
            }
            GuestOp::RawCompletion {
                pick,
                txid,
                payload,
            } => {
                out.extend_from_slice(&[4, *pick]);
                out.extend_from_slice(&txid.to_le_bytes());
                put8(&mut out, payload);
            }
            GuestOp::Reopen => out.push(5),
            GuestOp::RestartIncoming => out.push(6),
            GuestOp::Ack {
                pick,
                status,
                crc_xor,
            } => {
                out.extend_from_slice(&[7, *pick]);
                out.extend_from_slice(&status.to_le_bytes());
                out.extend_from_slice(&crc_xor.to_le_bytes());
            }
            GuestOp::SaveAndResume { chunk } => out.extend_from_slice(&[8, *chunk]),
        }
    }
    out
}

// ---- control_ioctl ------------------------------------------------------------------------------

/// One step of a `control_ioctl` input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ControlStep {
    /// One IOCTL. `code_pick` < 0x80 picks a known control code (modulo their number);
    /// otherwise `raw_code` is used as is. With `patch_id`, bytes 8..16 of the input are
    /// overwritten with the `id_pick`-th channel id created so far (most requests carry the
    /// channel id there). `buffered` routes it through `dispatch_buffered` (one shared buffer).
    Ioctl {
        owner: u8,
        code_pick: u8,
        raw_code: u32,
        patch_id: bool,
        id_pick: u8,
        buffered: bool,
        output_len: u16,
        input: Vec<u8>,
    },
    /// The guest opens the offered channel and negotiates.
    GuestOpen,
    /// The guest reads everything and acknowledges all it holds.
    GuestAckAll,
    /// The owner's control handle is closed (`destroy_owned_by`).
    Cleanup { owner: u8 },
}

/// Decodes fuzz bytes into at most `max` steps (total).
pub(crate) fn decode_control_steps(bytes: &[u8], max: usize) -> Vec<ControlStep> {
    let mut c = Cursor::new(bytes);
    let mut steps = Vec::new();
    while !c.is_empty() && steps.len() < max {
        let op = c.u8();
        let step = match op % 8 {
            5 => ControlStep::GuestOpen,
            6 => ControlStep::GuestAckAll,
            7 => ControlStep::Cleanup { owner: c.u8() },
            _ => {
                let owner = c.u8();
                let code_pick = c.u8();
                let raw_code = if code_pick >= 0x80 { c.u32() } else { 0 };
                let id_pick = c.u8();
                let output_len = c.u16();
                let input = c.bytes16().to_vec();
                ControlStep::Ioctl {
                    owner,
                    code_pick,
                    raw_code,
                    patch_id: op & 0x10 != 0,
                    id_pick,
                    buffered: op & 0x20 != 0,
                    output_len,
                    input,
                }
            }
        };
        steps.push(step);
    }
    steps
}

/// Encodes steps (the inverse of [`decode_control_steps`]).
pub(crate) fn encode_control_steps(steps: &[ControlStep]) -> Vec<u8> {
    let mut out = Vec::new();
    for step in steps {
        match step {
            ControlStep::GuestOpen => out.push(5),
            ControlStep::GuestAckAll => out.push(6),
            ControlStep::Cleanup { owner } => out.extend_from_slice(&[7, *owner]),
            ControlStep::Ioctl {
                owner,
                code_pick,
                raw_code,
                patch_id,
                id_pick,
                buffered,
                output_len,
                input,
            } => {
                let op = (u8::from(*patch_id) * 0x10) | (u8::from(*buffered) * 0x20);
                out.extend_from_slice(&[op, *owner, *code_pick]);
                if *code_pick >= 0x80 {
                    out.extend_from_slice(&raw_code.to_le_bytes());
                }
                out.push(*id_pick);
                out.extend_from_slice(&output_len.to_le_bytes());
                put16(&mut out, input);
            }
        }
    }
    out
}
