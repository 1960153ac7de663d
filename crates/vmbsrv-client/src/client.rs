//! Typed requests over a [`Transport`].

use std::io::{Read, Write};

use serde::Serialize;
use vmbsrv::kmcl::NtStatus;
use vmbsrv::kmcl::raw::GUID;
use vmbsrv::saved::stream::{
    FRAME_HEADER_LEN, FrameKind, FrameReader, FrameWriter, MAX_FRAME_LEN, STREAM_HEADER_LEN,
    frame_len,
};
use vmbsrv::vsp::control::ControlOp;
use vmbsrv::vsp::control::wire::{
    self, CREATE_MODE_FOR_RESTORE, CREATE_MODE_START, ChannelDataRequest, ChannelRequest,
    CreateChannelRequest, CreateChannelResponse, DestroyChannelResponse, FetchOutcomesRequest,
    FetchOutcomesResponse, InfoResponse, OUTCOME_ENTRY_LEN, OutcomeEntry, PostMessageRequest,
    PostMessageResponse, RESPONSE_HEADER_LEN, RequestHeader, ResponseHeader, RestoreChunkResponse,
    SAVE_BEGIN_RECOMMENDED_OUTPUT_LEN, SAVE_CONTINUE_RESPONSE_LEN, SaveBeginResponse,
    SaveContinueResponse, StatisticsResponse,
};
use zerocopy::{FromBytes, IntoBytes};

use crate::{Error, Failure, IoctlError, Transport};

/// What `QueryInfo` reports (docs/control.md §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Info {
    /// Control interface version (1).
    pub control_version: u32,
    /// Highest guest protocol version.
    pub guest_protocol_version: u32,
    /// Registry capacity.
    pub max_channels: u32,
    /// Channels alive now (all owners).
    pub channels_in_use: u32,
    /// Largest `max_in_flight` a channel may have.
    pub max_in_flight: u32,
    /// Largest message.
    pub max_message_len: u32,
    /// Largest channel record.
    pub max_record_len: u32,
    /// Largest save chunk.
    pub max_chunk_len: u32,
}

/// How a channel is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum CreateMode {
    /// Configure, enable, start: the offer is made.
    Start,
    /// Configure only, to restore a save into.
    ForRestore,
}

/// `CreateChannel`'s parameters (docs/control.md §4.2).
#[derive(Debug, Clone, Copy)]
pub struct ChannelConfig {
    /// A VMBus handle valid in the calling process (0 = none: a host-local channel).
    pub vmbus_handle: u64,
    /// The interface type GUID offered to the guest.
    pub interface_type: GUID,
    /// The instance GUID.
    pub instance: GUID,
    /// 1..=65536.
    pub max_in_flight: u32,
    /// 1..=65536.
    pub max_message_len: u32,
    /// `VMBUS_SERVER_CHANNEL_INIT_FLAG_*` (bits 0x1F).
    pub server_flags: u32,
    /// Start or ForRestore.
    pub mode: CreateMode,
}

/// Options of a post.
#[derive(Debug, Clone, Copy, Default)]
pub struct PostOptions {
    /// Opaque client value returned with the outcome.
    pub tag: u64,
    /// Correlation id stored with the delivery.
    pub trace_id: Option<[u8; 16]>,
}

/// Outcome kinds by wire value (docs/control.md §4.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum OutcomeKindName {
    /// 1.
    Acked,
    /// 2.
    Nacked,
    /// 3.
    Corrupted,
    /// 4.
    BadAck,
    /// 5.
    Cancelled,
    /// 6.
    Migrated,
    /// Any other value.
    Unknown(u16),
}

impl OutcomeKindName {
    fn from_wire(kind: u16) -> Self {
        match kind {
            wire::OUTCOME_ACKED => Self::Acked,
            wire::OUTCOME_NACKED => Self::Nacked,
            wire::OUTCOME_CORRUPTED => Self::Corrupted,
            wire::OUTCOME_BAD_ACK => Self::BadAck,
            wire::OUTCOME_CANCELLED => Self::Cancelled,
            wire::OUTCOME_MIGRATED => Self::Migrated,
            other => Self::Unknown(other),
        }
    }
}

/// One outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct OutcomeRecord {
    /// The delivery's sequence.
    pub sequence: u64,
    /// The post's tag.
    pub tag: u64,
    /// What happened.
    pub kind: OutcomeKindName,
    /// 1, plus one per restore crossed.
    pub attempts: u16,
    /// The guest's code for Nacked.
    pub guest_status: u32,
}

/// A fetch's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Outcomes {
    /// Oldest first.
    pub outcomes: Vec<OutcomeRecord>,
    /// Still recorded afterwards.
    pub remaining: u32,
}

/// Channel phase (docs/control.md §4.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Phase {
    /// 0.
    Initialized,
    /// 1.
    Restoring,
    /// 2.
    Restored,
    /// 3.
    RestoreFailed,
    /// 4.
    Running,
    /// 5.
    Saving,
    /// 6.
    Saved,
    /// 7.
    Migrated,
    /// 8.
    Disabled,
    /// 9.
    SaveFailed,
    /// Any other value.
    Unknown(u32),
}

impl Phase {
    fn from_wire(value: u32) -> Self {
        match value {
            0 => Self::Initialized,
            1 => Self::Restoring,
            2 => Self::Restored,
            3 => Self::RestoreFailed,
            4 => Self::Running,
            5 => Self::Saving,
            6 => Self::Saved,
            7 => Self::Migrated,
            8 => Self::Disabled,
            9 => Self::SaveFailed,
            other => Self::Unknown(other),
        }
    }
}

/// `QueryStatistics` (docs/control.md §4.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[allow(missing_docs)] // field for field the documented response
pub struct Statistics {
    pub phase: Phase,
    pub flags: u32,
    pub protocol_version: u32,
    pub in_flight: u32,
    pub pending_outcomes: u32,
    pub max_in_flight: u32,
    pub max_message_len: u32,
    pub restore_generation: u32,
    pub next_sequence: u64,
    pub corrupted: u64,
    pub posted: u64,
    pub acked: u64,
    pub nacked: u64,
    pub cancelled: u64,
    pub bad_acks: u64,
    pub guest_requests: u64,
    pub guest_bad_requests: u64,
    pub guest_garbled: u64,
}

/// What `DestroyChannel` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DestroyReport {
    /// Outcomes never fetched.
    pub unfetched_outcomes: u32,
    /// Deliveries outstanding at the drop.
    pub in_flight: u32,
}

/// Progress of a save or restore, for a progress indicator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// A chunk was saved (index from 0, its length, total bytes so far).
    Saved {
        /// Chunk index.
        chunk: usize,
        /// Bytes of this chunk.
        len: usize,
        /// Bytes saved so far.
        total: u64,
    },
    /// A frame was restored (bytes restored so far of `of`).
    Restored {
        /// Bytes restored so far.
        done: u64,
        /// Bytes in the file.
        of: u64,
    },
}

/// What a save wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SaveReport {
    /// Bytes of the channel record.
    pub record_len: usize,
    /// Length of each KMCL chunk, in order.
    pub chunks: Vec<usize>,
    /// Bytes of the stream.
    pub stream_len: usize,
}

/// What a restore replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RestoreReport {
    /// KMCL chunks replayed.
    pub chunks: usize,
    /// Bytes of the stream.
    pub stream_len: usize,
}

/// The client: one handle on the control device (one owner, docs/control.md §7).
#[derive(Debug)]
pub struct Client<T> {
    transport: T,
}

/// Room offered per `SaveContinue` at first (grown to what KMCL asks for).
const INITIAL_CHUNK_ROOM: usize = 64 * 1024;

impl<T: Transport> Client<T> {
    /// A client over `transport`.
    pub fn new(transport: T) -> Self {
        Self { transport }
    }

    /// The transport.
    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// The transport, mutably.
    pub fn transport_mut(&mut self) -> &mut T {
        &mut self.transport
    }

    /// Sends one request; checks the IOCTL status, the response header and the operation status.
    /// Returns the response bytes (exactly `Information` long).
    fn call(&mut self, op: ControlOp, input: &[u8], output_len: usize) -> Result<Vec<u8>, Error> {
        let mut output = vec![0u8; output_len.max(op.min_output_len())];
        let written = match self.transport.ioctl(op.code(), input, &mut output) {
            Ok(n) => n,
            Err(IoctlError::Status(status)) => return Err(Error::ioctl(op, status)),
            Err(IoctlError::Transport { code, message }) => {
                return Err(Error::new(
                    Some(op),
                    Failure::Transport,
                    NtStatus::UNSUCCESSFUL,
                    format!("{message} (Win32 error {code})"),
                ));
            }
        };
        if written > output.len() {
            return Err(Error::protocol(op, "the transport wrote past the output"));
        }
        output.truncate(written);
        let Ok((header, _)) = ResponseHeader::read_from_prefix(&output) else {
            return Err(Error::protocol(
                op,
                format!("response of {written} bytes holds no header ({RESPONSE_HEADER_LEN})"),
            ));
        };
        if header.size.get() as usize != written {
            return Err(Error::protocol(
                op,
                format!(
                    "response header says {} bytes, {written} written",
                    header.size.get()
                ),
            ));
        }
        let status = header.op_status();
        if status != NtStatus::SUCCESS {
            return Err(Error::operation(op, status));
        }
        Ok(output)
    }

    fn fixed<R: FromBytes>(op: ControlOp, bytes: &[u8]) -> Result<(R, &[u8]), Error> {
        R::read_from_prefix(bytes)
            .map_err(|_| Error::protocol(op, format!("response of {} bytes is short", bytes.len())))
    }

    fn channel_call(
        &mut self,
        op: ControlOp,
        id: u64,
        output_len: usize,
    ) -> Result<Vec<u8>, Error> {
        self.call(op, ChannelRequest::new(id).as_bytes(), output_len)
    }

    /// `QueryInfo`.
    pub fn info(&mut self) -> Result<Info, Error> {
        let op = ControlOp::QueryInfo;
        let out = self.call(op, RequestHeader::new(8).as_bytes(), 0)?;
        let (r, _) = Self::fixed::<InfoResponse>(op, &out)?;
        Ok(Info {
            control_version: r.control_version.get(),
            guest_protocol_version: r.guest_protocol_version.get(),
            max_channels: r.max_channels.get(),
            channels_in_use: r.channels_in_use.get(),
            max_in_flight: r.max_in_flight.get(),
            max_message_len: r.max_message_len.get(),
            max_record_len: r.max_record_len.get(),
            max_chunk_len: r.max_chunk_len.get(),
        })
    }

    /// `CreateChannel`: returns the channel id.
    pub fn create(&mut self, config: &ChannelConfig) -> Result<u64, Error> {
        let op = ControlOp::CreateChannel;
        let mode = match config.mode {
            CreateMode::Start => CREATE_MODE_START,
            CreateMode::ForRestore => CREATE_MODE_FOR_RESTORE,
        };
        let request = CreateChannelRequest::new(
            config.vmbus_handle,
            config.interface_type,
            config.instance,
            config.max_in_flight,
            config.max_message_len,
            config.server_flags,
            mode,
        );
        let out = self.call(op, request.as_bytes(), 0)?;
        Ok(Self::fixed::<CreateChannelResponse>(op, &out)?
            .0
            .channel_id
            .get())
    }

    /// `PostMessage`: returns the delivery's sequence.
    pub fn post(&mut self, id: u64, payload: &[u8], options: PostOptions) -> Result<u64, Error> {
        let op = ControlOp::PostMessage;
        let len = u32::try_from(payload.len()).map_err(|_| {
            Error::new(
                Some(op),
                Failure::Ioctl,
                NtStatus::INVALID_PARAMETER,
                "payload longer than 4 GiB",
            )
        })?;
        let mut input = PostMessageRequest::new(id, options.tag, options.trace_id, len)
            .as_bytes()
            .to_vec();
        input.extend_from_slice(payload);
        let out = self.call(op, &input, 0)?;
        Ok(Self::fixed::<PostMessageResponse>(op, &out)?
            .0
            .sequence
            .get())
    }

    /// `FetchOutcomes`: up to `max` outcomes (1..=65536), oldest first.
    pub fn fetch(&mut self, id: u64, max: u32) -> Result<Outcomes, Error> {
        let op = ControlOp::FetchOutcomes;
        let room = (max as usize).clamp(1, 4096);
        let out = self.call(
            op,
            FetchOutcomesRequest::new(id, max).as_bytes(),
            wire::FETCH_OUTCOMES_RESPONSE_LEN + room * OUTCOME_ENTRY_LEN,
        )?;
        let (r, entries) = Self::fixed::<FetchOutcomesResponse>(op, &out)?;
        let count = r.count.get() as usize;
        if entries.len() != count.saturating_mul(OUTCOME_ENTRY_LEN) {
            return Err(Error::protocol(
                op,
                format!("{count} outcomes announced, {} bytes follow", entries.len()),
            ));
        }
        let outcomes = entries
            .chunks_exact(OUTCOME_ENTRY_LEN)
            .filter_map(|bytes| OutcomeEntry::read_from_bytes(bytes).ok())
            .map(|e| OutcomeRecord {
                sequence: e.sequence.get(),
                tag: e.tag.get(),
                kind: OutcomeKindName::from_wire(e.kind.get()),
                attempts: e.attempts.get(),
                guest_status: e.guest_status.get(),
            })
            .collect();
        Ok(Outcomes {
            outcomes,
            remaining: r.remaining.get(),
        })
    }

    /// Fetches until nothing remains.
    pub fn fetch_all(&mut self, id: u64) -> Result<Vec<OutcomeRecord>, Error> {
        let mut all = Vec::new();
        loop {
            let batch = self.fetch(id, 4096)?;
            let empty = batch.outcomes.is_empty();
            all.extend(batch.outcomes);
            if batch.remaining == 0 || empty {
                return Ok(all);
            }
        }
    }

    /// `QueryStatistics`.
    pub fn statistics(&mut self, id: u64) -> Result<Statistics, Error> {
        let op = ControlOp::QueryStatistics;
        let out = self.channel_call(op, id, 0)?;
        let (r, _) = Self::fixed::<StatisticsResponse>(op, &out)?;
        Ok(Statistics {
            phase: Phase::from_wire(r.phase.get()),
            flags: r.flags.get(),
            protocol_version: r.protocol_version.get(),
            in_flight: r.in_flight.get(),
            pending_outcomes: r.pending_outcomes.get(),
            max_in_flight: r.max_in_flight.get(),
            max_message_len: r.max_message_len.get(),
            restore_generation: r.restore_generation.get(),
            next_sequence: r.next_sequence.get(),
            corrupted: r.corrupted.get(),
            posted: r.posted.get(),
            acked: r.acked.get(),
            nacked: r.nacked.get(),
            cancelled: r.cancelled.get(),
            bad_acks: r.bad_acks.get(),
            guest_requests: r.guest_requests.get(),
            guest_bad_requests: r.guest_bad_requests.get(),
            guest_garbled: r.guest_garbled.get(),
        })
    }

    /// `DisableChannel`.
    pub fn disable(&mut self, id: u64) -> Result<(), Error> {
        self.channel_call(ControlOp::DisableChannel, id, 0)
            .map(drop)
    }

    /// `DestroyChannel`.
    pub fn destroy(&mut self, id: u64) -> Result<DestroyReport, Error> {
        let op = ControlOp::DestroyChannel;
        let out = self.channel_call(op, id, 0)?;
        let (r, _) = Self::fixed::<DestroyChannelResponse>(op, &out)?;
        Ok(DestroyReport {
            unfetched_outcomes: r.unfetched_outcomes.get(),
            in_flight: r.in_flight.get(),
        })
    }

    /// `Resume`: abandons a save; the channel continues.
    pub fn resume(&mut self, id: u64) -> Result<(), Error> {
        self.channel_call(ControlOp::Resume, id, 0).map(drop)
    }

    /// `CompleteMigration`.
    pub fn complete_migration(&mut self, id: u64) -> Result<(), Error> {
        self.channel_call(ControlOp::CompleteMigration, id, 0)
            .map(drop)
    }

    /// `RestartIncoming`.
    pub fn restart_incoming(&mut self, id: u64) -> Result<(), Error> {
        self.channel_call(ControlOp::RestartIncoming, id, 0)
            .map(drop)
    }

    /// Saves the channel as a save stream (docs/control.md §6 steps 1–4): `SaveBegin`, every
    /// `SaveContinue` chunk, `SaveEnd`. On failure after `SaveBegin` the save is abandoned with
    /// `Resume` and the error returned. The channel stays in phase Saved: follow with
    /// [`complete_migration`](Self::complete_migration) or [`resume`](Self::resume).
    pub fn save_stream(
        &mut self,
        id: u64,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<(Vec<u8>, SaveReport), Error> {
        let begin = ControlOp::SaveBegin;
        let out = self.channel_call(begin, id, SAVE_BEGIN_RECOMMENDED_OUTPUT_LEN)?;
        let record = match Self::fixed::<SaveBeginResponse>(begin, &out) {
            Ok((r, rest)) if r.record_len.get() as usize == rest.len() => rest.to_vec(),
            Ok((r, rest)) => {
                let _ = self.resume(id);
                return Err(Error::protocol(
                    begin,
                    format!(
                        "record_len {} but {} bytes follow",
                        r.record_len.get(),
                        rest.len()
                    ),
                ));
            }
            Err(e) => {
                let _ = self.resume(id);
                return Err(e);
            }
        };
        match self.save_chunks(id, progress) {
            Ok(chunks) => {
                let stream = build_stream(&record, &chunks).inspect_err(|_| {
                    let _ = self.resume(id);
                })?;
                let report = SaveReport {
                    record_len: record.len(),
                    chunks: chunks.iter().map(Vec::len).collect(),
                    stream_len: stream.len(),
                };
                Ok((stream, report))
            }
            Err(e) => {
                let _ = self.resume(id);
                Err(e)
            }
        }
    }

    fn save_chunks(
        &mut self,
        id: u64,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Vec<Vec<u8>>, Error> {
        let op = ControlOp::SaveContinue;
        let mut chunks = Vec::new();
        let mut room = INITIAL_CHUNK_ROOM;
        let mut total = 0u64;
        loop {
            let out = self.channel_call(op, id, SAVE_CONTINUE_RESPONSE_LEN + room)?;
            let (r, chunk) = Self::fixed::<SaveContinueResponse>(op, &out)?;
            let kmcl = NtStatus(r.kmcl_status.get());
            match kmcl {
                NtStatus::SUCCESS | NtStatus::BUFFER_OVERFLOW => {
                    if chunk.is_empty() {
                        return Err(Error::protocol(
                            op,
                            "an empty chunk: the save makes no progress",
                        ));
                    }
                    total += chunk.len() as u64;
                    progress(Progress::Saved {
                        chunk: chunks.len(),
                        len: chunk.len(),
                        total,
                    });
                    chunks.push(chunk.to_vec());
                    if kmcl == NtStatus::SUCCESS {
                        break;
                    }
                }
                NtStatus::BUFFER_TOO_SMALL => {
                    let required = r.bytes_required.get() as usize;
                    if required <= room || required > MAX_FRAME_LEN {
                        return Err(Error::protocol(
                            op,
                            format!(
                                "KMCL asks for {required} bytes of chunk room (offered {room})"
                            ),
                        ));
                    }
                    room = required;
                }
                other => {
                    return Err(Error::new(
                        Some(op),
                        Failure::Operation,
                        other,
                        "VmbChannelSaveContinue failed",
                    ));
                }
            }
        }
        self.channel_call(ControlOp::SaveEnd, id, 0)?;
        Ok(chunks)
    }

    /// Saves the channel into `writer` (see [`save_stream`](Self::save_stream)).
    pub fn save_to(
        &mut self,
        id: u64,
        writer: &mut dyn Write,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<SaveReport, Error> {
        let (stream, report) = self.save_stream(id, progress)?;
        writer
            .write_all(&stream)
            .and_then(|()| writer.flush())
            .map_err(|e| Error::io(format!("writing the save stream: {e}")))?;
        Ok(report)
    }

    /// Replays a save stream into a channel created `ForRestore` (docs/control.md §6 "Replay"),
    /// then `FinishRestore`. On failure the channel is left as the driver left it (destroy it).
    pub fn restore_stream(
        &mut self,
        id: u64,
        stream: &[u8],
        progress: &mut dyn FnMut(Progress),
    ) -> Result<RestoreReport, Error> {
        let bad = |message: String| {
            Error::new(
                Some(ControlOp::RestoreChunk),
                Failure::Io,
                NtStatus::DATA_ERROR,
                message,
            )
        };
        let reader = FrameReader::new(stream).map_err(|e| bad(format!("save stream: {e}")))?;
        let mut record_seen = false;
        let mut chunks = 0usize;
        let mut complete = false;
        let mut done = STREAM_HEADER_LEN as u64;
        for frame in reader {
            let frame = frame.map_err(|e| bad(format!("save stream: {e}")))?;
            let len = u32::try_from(frame.payload.len())
                .map_err(|_| bad("frame longer than 4 GiB".into()))?;
            let mut input = ChannelDataRequest::new(id, len).as_bytes().to_vec();
            input.extend_from_slice(frame.payload);
            match frame.kind {
                FrameKind::ChannelRecord => {
                    if record_seen || chunks > 0 {
                        return Err(bad("a second channel record, or one after a chunk".into()));
                    }
                    record_seen = true;
                    self.call(ControlOp::RestoreChannelRecord, &input, 0)?;
                }
                FrameKind::KmclChunk => {
                    if !record_seen {
                        return Err(bad("a chunk before the channel record".into()));
                    }
                    if complete {
                        return Err(bad("a chunk after the restore completed".into()));
                    }
                    let op = ControlOp::RestoreChunk;
                    let out = self.call(op, &input, 0)?;
                    let (r, _) = Self::fixed::<RestoreChunkResponse>(op, &out)?;
                    chunks += 1;
                    complete = r.progress.get() == wire::RESTORE_COMPLETE;
                }
            }
            done += (FRAME_HEADER_LEN + frame.payload.len()) as u64;
            progress(Progress::Restored {
                done,
                of: stream.len() as u64,
            });
        }
        if !record_seen {
            return Err(bad("the stream holds no channel record".into()));
        }
        if !complete {
            return Err(bad(
                "the stream ended while the restore needed more chunks".into()
            ));
        }
        self.channel_call(ControlOp::FinishRestore, id, 0)?;
        Ok(RestoreReport {
            chunks,
            stream_len: stream.len(),
        })
    }

    /// Reads a save stream from `reader` and replays it (see
    /// [`restore_stream`](Self::restore_stream)).
    pub fn restore_from(
        &mut self,
        id: u64,
        reader: &mut dyn Read,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<RestoreReport, Error> {
        let mut stream = Vec::new();
        reader
            .read_to_end(&mut stream)
            .map_err(|e| Error::io(format!("reading the save stream: {e}")))?;
        self.restore_stream(id, &stream, progress)
    }
}

/// Frames a channel record and its chunks as a save stream (`saved-state.md` §6).
pub(crate) fn build_stream(record: &[u8], chunks: &[Vec<u8>]) -> Result<Vec<u8>, Error> {
    let too_big = || Error::io("the save does not fit a save stream");
    let mut total = STREAM_HEADER_LEN + FRAME_HEADER_LEN;
    for len in chunks.iter().map(Vec::len).chain([record.len()]) {
        total = total
            .checked_add(frame_len(len).ok_or_else(too_big)?)
            .ok_or_else(too_big)?;
    }
    let mut stream = vec![0u8; total];
    let mut writer = FrameWriter::new(&mut stream).map_err(|e| Error::io(e.to_string()))?;
    writer
        .push(FrameKind::ChannelRecord, record)
        .map_err(|e| Error::io(e.to_string()))?;
    for chunk in chunks {
        writer
            .push(FrameKind::KmclChunk, chunk)
            .map_err(|e| Error::io(e.to_string()))?;
    }
    let written = writer.finish();
    stream.truncate(written);
    Ok(stream)
}
