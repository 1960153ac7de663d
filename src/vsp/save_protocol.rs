//! The two-call sizing protocol of `EvtVmbChannelSavePacket`, as a pure function.
//!
//! KMCL calls the save callback for every outstanding packet object, first with
//! `SaveBufSize == 0` to learn the size, then with a buffer at least that large. Keeping the
//! protocol here, away from the FFI trampoline, lets every branch be tested without KMCL: the
//! trampoline only turns pointers into `Option`s and writes `*BytesNeeded` back.

use crate::kmcl::NtStatus;
use crate::saved::{DeliveryRecord, RestoreError, SaveError};

/// What the save callback returns to KMCL: its status and the value to store in `*BytesNeeded`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaveCallAnswer {
    /// The callback's return value.
    pub status: NtStatus,
    /// Bytes written on success; the exact size required on `STATUS_BUFFER_TOO_SMALL`; else 0.
    pub bytes_needed: u32,
}

impl SaveCallAnswer {
    const fn new(status: NtStatus, bytes_needed: usize) -> Self {
        // Records are bounded by MAX_RECORD_LEN (4 KiB), so this never saturates in practice;
        // saturating keeps the function total rather than panicking.
        let bytes_needed = if bytes_needed > u32::MAX as usize {
            u32::MAX
        } else {
            bytes_needed as u32
        };
        Self {
            status,
            bytes_needed,
        }
    }
}

/// Answers one call of the save-packet callback (records without a save identity; see
/// [`answer_save`]).
pub fn answer_save_call(record: Option<&DeliveryRecord>, buf: Option<&mut [u8]>) -> SaveCallAnswer {
    answer_save(record, None, buf)
}

/// Answers one call of the save-packet callback.
///
/// * `record` is the packet's delivery, `None` if the packet carries no token or its token finds
///   no delivery.
/// * `save_id` is the open save's identity, written into the record (docs/saved-state.md §5).
/// * `buf` is KMCL's `SaveBuf`, `None` when `SaveBufSize == 0` (the probe). The caller never
///   forms a slice from a null pointer or a zero size.
///
/// | record | buffer | answer |
/// |---|---|---|
/// | `None` | any | `STATUS_NOT_FOUND`, 0 (a given buffer is zeroed): the save fails |
/// | `Some` | `None` | `STATUS_BUFFER_TOO_SMALL`, exact size |
/// | `Some` | too small | `STATUS_BUFFER_TOO_SMALL`, exact size; buffer untouched |
/// | `Some` | large enough | `STATUS_SUCCESS`, bytes written; rest of buffer zeroed |
/// | `Some`, invalid | any | `STATUS_INVALID_DEVICE_STATE`, 0; buffer untouched |
///
/// A packet with no delivery fails the save: answering "nothing to save" would produce a blob
/// that restores a packet the destination cannot account for. An invalid record is refused
/// already at the probe: saving it would only move the failure to restore time, where it would
/// cost the VM its state.
pub fn answer_save(
    record: Option<&DeliveryRecord>,
    save_id: Option<u64>,
    buf: Option<&mut [u8]>,
) -> SaveCallAnswer {
    let Some(record) = record else {
        // Leave no pool garbage in a buffer KMCL offered anyway.
        if let Some(buf) = buf {
            buf.fill(0);
        }
        return SaveCallAnswer::new(NtStatus::NOT_FOUND, 0);
    };
    let result = match buf {
        Some(buf) => record.encode_saved(save_id, buf),
        None => record.encode_saved(save_id, &mut []),
    };
    match result {
        Ok(written) => SaveCallAnswer::new(NtStatus::SUCCESS, written),
        Err(SaveError::BufferTooSmall { needed }) => {
            SaveCallAnswer::new(NtStatus::BUFFER_TOO_SMALL, needed)
        }
        Err(
            SaveError::InvalidRecord { .. } | SaveError::InvalidExtension | SaveError::TooLarge,
        ) => SaveCallAnswer::new(NtStatus::INVALID_DEVICE_STATE, 0),
    }
}

/// Whether [`answer_save`] with a buffer of `buf_len` bytes writes `record` and succeeds:
/// the record is valid and the buffer holds [`DeliveryRecord::encoded_len_saved`] bytes.
///
/// The save callback decides this under the delivery table's lock, so that it can count the
/// write in the same hold as the lookup, and encodes after releasing it (tested against
/// [`answer_save`] for every record shape and buffer length up to the largest record).
pub fn save_writes(record: &DeliveryRecord, save_id: Option<u64>, buf_len: usize) -> bool {
    record.validate().is_ok() && buf_len >= record.encoded_len_saved(save_id)
}

/// The status a restore callback returns for a record the codec rejected.
///
/// A newer format than this build reads maps to `STATUS_REVISION_MISMATCH` so that a rollback
/// failure is told apart from damage; a checksum mismatch to `STATUS_CRC_ERROR`; everything
/// else (malformed or out-of-range content) to `STATUS_DATA_ERROR`.
pub fn restore_status(err: RestoreError) -> NtStatus {
    match err {
        RestoreError::UnsupportedVersion { .. }
        | RestoreError::UnknownCriticalField { .. }
        | RestoreError::UnknownFrameKind { .. } => NtStatus::REVISION_MISMATCH,
        RestoreError::BadChecksum => NtStatus::CRC_ERROR,
        RestoreError::Truncated
        | RestoreError::BadMagic
        | RestoreError::BadLength
        | RestoreError::ReservedNotZero
        | RestoreError::MalformedExtension
        | RestoreError::OutOfRange { .. }
        | RestoreError::TrailingBytes => NtStatus::DATA_ERROR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(trace: bool) -> DeliveryRecord {
        DeliveryRecord {
            sequence: 3,
            tag: 4,
            posted_at: 5,
            payload_len: 6,
            payload_crc: 7,
            attempts: 1,
            trace_id: trace.then_some([0x5A; 16]),
        }
    }

    /// The save callback counts a write under the lock before it encodes: `save_writes` must
    /// say "writes" exactly when `answer_save` succeeds with a buffer, for every record shape,
    /// save identity and buffer length.
    #[test]
    fn save_writes_predicts_answer_save() {
        let mut shapes = std::vec::Vec::new();
        for trace in [false, true] {
            shapes.push(record(trace));
            shapes.push(DeliveryRecord {
                sequence: 0,
                ..record(trace)
            });
            shapes.push(DeliveryRecord {
                payload_len: 0,
                ..record(trace)
            });
            shapes.push(DeliveryRecord {
                attempts: 0,
                ..record(trace)
            });
        }
        let mut buf = [0u8; DeliveryRecord::MAX_SAVED_LEN + 8];
        for shape in &shapes {
            for save_id in [None, Some(9), Some(u64::MAX)] {
                for len in 1..=buf.len() {
                    let predicted = save_writes(shape, save_id, len);
                    let answer = answer_save(Some(shape), save_id, Some(&mut buf[..len]));
                    assert_eq!(
                        predicted,
                        answer.status.is_success(),
                        "{shape:?}, save id {save_id:?}, buffer {len}: {answer:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn probe_fails_with_exact_size() {
        for (trace, size) in [(false, 56), (true, 76)] {
            assert_eq!(
                answer_save_call(Some(&record(trace)), None),
                SaveCallAnswer {
                    status: NtStatus::BUFFER_TOO_SMALL,
                    bytes_needed: size
                }
            );
        }
    }

    /// Issue #11, defect 8: a packet with no delivery fails the save (it used to be answered
    /// `STATUS_SUCCESS` with 0 bytes, producing a blob the destination cannot account for).
    #[test]
    fn a_packet_without_a_delivery_fails_the_save() {
        let failed = SaveCallAnswer {
            status: NtStatus::NOT_FOUND,
            bytes_needed: 0,
        };
        assert_eq!(answer_save_call(None, None), failed);
        let mut buf = [0xAA; 8];
        assert_eq!(answer_save_call(None, Some(&mut buf)), failed);
        assert_eq!(buf, [0; 8]);
    }

    #[test]
    fn the_save_identity_is_written_and_read_back() {
        let rec = record(true);
        let probe = answer_save(Some(&rec), Some(0xABCD), None);
        assert_eq!(probe.status, NtStatus::BUFFER_TOO_SMALL);
        assert_eq!(probe.bytes_needed, 76 + 12);
        let mut buf = [0xAA; 100];
        let write = answer_save(Some(&rec), Some(0xABCD), Some(&mut buf));
        assert_eq!(write.status, NtStatus::SUCCESS);
        assert_eq!(DeliveryRecord::decode_saved(&buf), Ok((rec, Some(0xABCD))));
        // A reader that does not know the tag skips it: the record itself is unchanged.
        assert_eq!(DeliveryRecord::decode(&buf), Ok(rec));
    }

    #[test]
    fn second_call_writes_record_and_zeroes_tail() {
        let rec = record(true);
        let mut buf = [0xAA; 100];
        assert_eq!(
            answer_save_call(Some(&rec), Some(&mut buf)),
            SaveCallAnswer {
                status: NtStatus::SUCCESS,
                bytes_needed: 76
            }
        );
        assert!(buf[76..].iter().all(|&b| b == 0));
        assert_eq!(DeliveryRecord::decode(&buf), Ok(rec));

        let mut exact = [0xAA; 56];
        assert_eq!(
            answer_save_call(Some(&record(false)), Some(&mut exact)).bytes_needed,
            56
        );
        assert_eq!(DeliveryRecord::decode(&exact), Ok(record(false)));
    }

    #[test]
    fn too_small_second_call_writes_nothing() {
        let mut buf = [0xAA; 75];
        assert_eq!(
            answer_save_call(Some(&record(true)), Some(&mut buf)),
            SaveCallAnswer {
                status: NtStatus::BUFFER_TOO_SMALL,
                bytes_needed: 76
            }
        );
        assert_eq!(buf, [0xAA; 75]);
    }

    #[test]
    fn invalid_record_fails_the_save_without_writing() {
        let bad = DeliveryRecord {
            sequence: 0,
            ..record(false)
        };
        let invalid = SaveCallAnswer {
            status: NtStatus::INVALID_DEVICE_STATE,
            bytes_needed: 0,
        };
        assert_eq!(answer_save_call(Some(&bad), None), invalid);
        let mut buf = [0xAA; 64];
        assert_eq!(answer_save_call(Some(&bad), Some(&mut buf)), invalid);
        assert_eq!(buf, [0xAA; 64]);
    }

    #[test]
    fn restore_errors_map_to_distinct_families() {
        assert_eq!(
            restore_status(RestoreError::UnsupportedVersion { found: 2 }),
            NtStatus::REVISION_MISMATCH
        );
        assert_eq!(
            restore_status(RestoreError::UnknownCriticalField { tag: 9 }),
            NtStatus::REVISION_MISMATCH
        );
        assert_eq!(
            restore_status(RestoreError::BadChecksum),
            NtStatus::CRC_ERROR
        );
        assert_eq!(
            restore_status(RestoreError::Truncated),
            NtStatus::DATA_ERROR
        );
        assert!(!restore_status(RestoreError::TrailingBytes).is_success());
    }
}
