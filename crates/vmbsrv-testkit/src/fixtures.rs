//! Small fixtures the end-to-end test files share (each used to be copied into several of them).
#![forbid(unsafe_code)]

use std::vec::Vec;

use vmbsrv::saved::stream::{FrameKind, FrameReader};
use vmbsrv::vsp::{Outcome, OutcomeKind, VspChannel};

use crate::migration::Lock;

/// The frames of a valid save stream: the channel record and the KMCL chunks, in order.
///
/// Panics if `stream` is not a well-formed save stream (fixtures are built from real saves).
pub fn split_stream(stream: &[u8]) -> (Vec<u8>, Vec<Vec<u8>>) {
    let mut record = Vec::new();
    let mut chunks = Vec::new();
    for frame in FrameReader::new(stream).expect("a save stream header") {
        let frame = frame.expect("a well-formed frame");
        match frame.kind {
            FrameKind::ChannelRecord => record = frame.payload.to_vec(),
            FrameKind::KmclChunk => chunks.push(frame.payload.to_vec()),
        }
    }
    (record, chunks)
}

/// Every outcome the channel has recorded so far, drained in batches until none is left.
pub fn drain_all(channel: &VspChannel<'_, Lock>) -> Vec<Outcome> {
    let mut all = Vec::new();
    loop {
        let mut out = [Outcome {
            sequence: 0,
            tag: 0,
            kind: OutcomeKind::Acked,
            attempts: 0,
        }; 64];
        let count = channel.drain_outcomes(&mut out);
        if count == 0 {
            return all;
        }
        all.extend_from_slice(&out[..count]);
    }
}
