//! `DeliveryRecord`: the per-packet state the KMCL save callback persists.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::checksum::{TableCrc, WordsCrc, crc32c_array, crc32c_words, crc32c_words_u32};
use super::envelope::{self, Entries};
use super::{EXTENSION_ENTRY_HEADER_LEN, Extension, HEADER_LEN, RestoreError, SaveError};

/// Largest message payload the format can describe. The VSP enforces its own, smaller,
/// configured limit; this bound only keeps restored values sane.
pub const MAX_PAYLOAD_LEN: u32 = 64 * 1024;

/// Extension tag of [`DeliveryRecord::trace_id`] (16 bytes of data, optional).
pub const TAG_TRACE_ID: u16 = 0x0001;

/// Extension tag of the save identity (8 bytes, optional): the `save_id` of the channel record
/// written by the same save. It binds every delivery of a KMCL blob to the one channel record it
/// belongs with (docs/saved-state.md §5). Optional so that an older reader, which cannot check
/// the binding, still restores the delivery as it did before.
pub const TAG_SAVE_ID: u16 = 0x0002;

/// Every extension tag a `DeliveryRecord` v1 defines.
const KNOWN_TAGS: &[u16] = &[TAG_TRACE_ID, TAG_SAVE_ID];

const TRACE_ID_LEN: usize = 16;
const SAVE_ID_LEN: usize = 8;

/// One outstanding host->guest delivery: what the save callback persists per packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeliveryRecord {
    /// Per-channel sequence number; never 0, never reused.
    pub sequence: u64,
    /// Opaque value from the posting client.
    pub tag: u64,
    /// Host time of the post in 100 ns units; opaque to the format.
    pub posted_at: u64,
    /// Message payload length in bytes, `1..=MAX_PAYLOAD_LEN`.
    pub payload_len: u32,
    /// CRC32C of the payload as posted.
    pub payload_crc: u32,
    /// How many times this delivery has been (re)established: 1 when first sent, +1 per
    /// restore; never 0.
    pub attempts: u16,
    /// Optional correlation id from the client, stored as an optional extension
    /// ([`TAG_TRACE_ID`]).
    pub trace_id: Option<[u8; 16]>,
}

/// The fixed v1 body, following the header at offset 16.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct BodyV1 {
    sequence: U64,
    tag: U64,
    posted_at: U64,
    payload_len: U32,
    payload_crc: U32,
    attempts: U16,
    reserved: [u8; 6],
}

const BODY_V1_LEN: usize = 40;
const _: () = assert!(size_of::<BodyV1>() == BODY_V1_LEN);

// The word-at-a-time paths ([`DeliveryRecord::encode_known`], [`DeliveryRecord::decode_known`])
// see a record as little-endian `u64` words: word 0 is magic | checksum, word 1 is
// version | flags | total_len (the first checksummed word), words 2..=6 the v1 body, then the
// extension area. They produce and accept exactly what the general paths (`envelope::write`,
// `envelope::open` + the extension walk) do for the four layouts this build writes; the tests
// compare the two.

/// The magic as the low half of word 0.
const MAGIC_WORD: u64 = u32::from_le_bytes(DeliveryRecord::MAGIC) as u64;
/// The low half of word 1: version 1, flags 0.
const VERSION_WORD: u64 = DeliveryRecord::VERSION as u64;
/// An extension entry header (tag, then data length, both `u16`) as a little-endian `u32`.
const fn entry_header(tag: u16, len: usize) -> u32 {
    tag as u32 | (len as u32) << 16
}
const TRACE_ENTRY: u32 = entry_header(TAG_TRACE_ID, TRACE_ID_LEN);
const SAVE_ENTRY: u32 = entry_header(TAG_SAVE_ID, SAVE_ID_LEN);

/// The encoded sizes of the four layouts this build writes.
const LEN_PLAIN: usize = DeliveryRecord::MIN_ENCODED_LEN;
const LEN_SAVE_ID: usize = LEN_PLAIN + EXTENSION_ENTRY_HEADER_LEN + SAVE_ID_LEN;
const LEN_TRACE: usize = DeliveryRecord::MAX_ENCODED_LEN;
const LEN_BOTH: usize = DeliveryRecord::MAX_SAVED_LEN;
const _: () = assert!(LEN_PLAIN == 56 && LEN_SAVE_ID == 68 && LEN_TRACE == 76 && LEN_BOTH == 88);

/// Word 1 of a record of `total` bytes.
const fn header_word(total: usize) -> u64 {
    VERSION_WORD | (total as u64) << 32
}

/// Little-endian `u64` of 8 bytes.
#[inline(always)]
fn le64(bytes: &[u8; 8]) -> u64 {
    u64::from_le_bytes(*bytes)
}

/// A field [`DeliveryRecord::validate`] rejects. `usize`-sized so that every variant of [`Put`]
/// carries one `usize`-sized value: that makes `Put` a pair of scalars, returned in two registers.
#[derive(Clone, Copy)]
#[repr(usize)]
enum Field {
    Sequence,
    PayloadLen,
    Attempts,
}

impl Field {
    /// The name `validate` and [`SaveError::InvalidRecord`] report.
    const fn name(self) -> &'static str {
        match self {
            Self::Sequence => "sequence",
            Self::PayloadLen => "payload_len",
            Self::Attempts => "attempts",
        }
    }
}

/// The outcome of the word-at-a-time encoder, 16 bytes so that it comes back in two registers
/// (a `Result<usize, SaveError>` is 24 bytes and is returned through memory, where a caller's
/// 16-byte reload of its two 8-byte stores misses store-to-load forwarding: docs/performance.md
/// §2.5). [`into_result`](Self::into_result), inlined into the caller, makes the `Result`.
#[derive(Clone, Copy)]
enum Put {
    Written(usize),
    TooSmall(usize),
    Invalid(Field),
}

impl Put {
    #[inline(always)]
    fn into_result(self) -> Result<usize, SaveError> {
        match self {
            Self::Written(len) => Ok(len),
            Self::TooSmall(needed) => Err(SaveError::BufferTooSmall { needed }),
            Self::Invalid(field) => Err(SaveError::InvalidRecord {
                field: field.name(),
            }),
        }
    }
}

/// Stores a record of `8 + 8 * N (+ 4 if TAIL)` bytes: word 0 (magic and the checksum of
/// `covered` and `tail`), `covered`, and `tail`; zeroes the rest of `buf`. Nothing is written
/// when `buf` is too small.
#[inline(always)]
fn put_words<C: WordsCrc, const N: usize, const TAIL: bool>(
    crc: C,
    covered: &[u64; N],
    tail: u32,
    buf: &mut [u8],
) -> Put {
    let total = 8 + 8 * N + if TAIL { 4 } else { 0 };
    let Some((out, rest)) = buf.split_at_mut_checked(total) else {
        return Put::TooSmall(total);
    };
    // The checksum comes from the words in registers, before anything is stored: no load ever
    // waits for the stores below.
    let crc = crc.words::<N, TAIL>(covered, tail);
    let (words, tail_out) = out.as_chunks_mut::<8>();
    // Fixed-size on both sides, so the loop is unrolled into `N` stores from registers (over
    // slices, LLVM made it a vector copy out of a stack array, whose 16-byte loads of 8-byte
    // stores miss store-to-load forwarding).
    if let Some((head, body)) = words.split_first_mut()
        && let Some(body) = body.first_chunk_mut::<N>()
    {
        *head = (MAGIC_WORD | u64::from(crc) << 32).to_le_bytes();
        for i in 0..N {
            body[i] = covered[i].to_le_bytes();
        }
    }
    if TAIL {
        tail_out.copy_from_slice(&tail.to_le_bytes());
    }
    if !rest.is_empty() {
        rest.fill(0);
    }
    Put::Written(total)
}

impl DeliveryRecord {
    /// Magic of a delivery record: ASCII `VBDR`.
    pub const MAGIC: [u8; 4] = *b"VBDR";
    /// The format version this build writes (and the only one it reads).
    pub const VERSION: u16 = 1;
    /// Encoded size without extensions: 16-byte header + 40-byte body.
    pub const MIN_ENCODED_LEN: usize = HEADER_LEN + BODY_V1_LEN;
    /// Largest size [`encode`](Self::encode) produces: with a trace id.
    pub const MAX_ENCODED_LEN: usize =
        Self::MIN_ENCODED_LEN + EXTENSION_ENTRY_HEADER_LEN + TRACE_ID_LEN;
    /// Largest size [`encode_saved`](Self::encode_saved) produces: with a trace id and a save
    /// identity.
    pub const MAX_SAVED_LEN: usize =
        Self::MAX_ENCODED_LEN + EXTENSION_ENTRY_HEADER_LEN + SAVE_ID_LEN;

    /// Exact number of bytes [`encode`](Self::encode) writes for this value.
    pub const fn encoded_len(&self) -> usize {
        self.encoded_len_saved(None)
    }

    /// Exact number of bytes [`encode_saved`](Self::encode_saved) writes for this value.
    pub const fn encoded_len_saved(&self, save_id: Option<u64>) -> usize {
        let mut len = Self::MIN_ENCODED_LEN;
        if self.trace_id.is_some() {
            len += EXTENSION_ENTRY_HEADER_LEN + TRACE_ID_LEN;
        }
        if save_id.is_some() {
            len += EXTENSION_ENTRY_HEADER_LEN + SAVE_ID_LEN;
        }
        len
    }

    /// Checks the documented ranges; `Err` names the first offending field.
    pub const fn validate(&self) -> Result<(), &'static str> {
        match self.invalid_field() {
            Some(field) => Err(field.name()),
            None => Ok(()),
        }
    }

    /// The first field out of its documented range, if any.
    #[inline(always)]
    const fn invalid_field(&self) -> Option<Field> {
        if self.sequence == 0 {
            Some(Field::Sequence)
        } else if self.payload_len == 0 || self.payload_len > MAX_PAYLOAD_LEN {
            Some(Field::PayloadLen)
        } else if self.attempts == 0 {
            Some(Field::Attempts)
        } else {
            None
        }
    }

    /// Encodes into `buf`, returning [`encoded_len`](Self::encoded_len), and zeroes the rest of
    /// `buf` so stale memory never reaches a saved-state file. On error nothing is written.
    #[inline]
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, SaveError> {
        self.encode_with_extensions(&[], buf)
    }

    /// Like [`encode`](Self::encode), carrying `save_id` ([`TAG_SAVE_ID`]) when given: what the
    /// VSP's save callback writes.
    #[inline]
    pub fn encode_saved(&self, save_id: Option<u64>, buf: &mut [u8]) -> Result<usize, SaveError> {
        self.encode_inner(save_id, &[], buf)
    }

    /// Like [`encode`](Self::encode), plus `extra` extension entries this build does not define
    /// itself (for example to produce records as a newer build would, in version-skew tests).
    ///
    /// `extra` must be strictly ascending by tag, use tags in `1..=MAX_TAG` other than those
    /// this record type defines, and carry at most `MAX_EXTENSION_DATA_LEN` bytes each; the
    /// whole record must fit `MAX_RECORD_LEN`. On `BufferTooSmall` the `needed` size is exact.
    #[inline]
    pub fn encode_with_extensions(
        &self,
        extra: &[Extension<'_>],
        buf: &mut [u8],
    ) -> Result<usize, SaveError> {
        self.encode_inner(None, extra, buf)
    }

    #[inline]
    fn encode_inner(
        &self,
        save_id: Option<u64>,
        extra: &[Extension<'_>],
        buf: &mut [u8],
    ) -> Result<usize, SaveError> {
        if extra.is_empty() {
            self.encode_known(save_id, buf)
        } else {
            self.encode_general(save_id, extra, buf)
        }
    }

    /// The layouts this build writes (no foreign extensions), a word at a time: the covered
    /// bytes are built as little-endian words in registers, checksummed from the registers, and
    /// each word is stored once. Byte-identical to [`encode_general`](Self::encode_general)
    /// with no `extra` (tested).
    ///
    /// With a hardware CRC the whole encoder runs in one out-of-line function compiled for it
    /// (`hwcrc::with_hw`): the `crc32` instructions work on the words in registers, and the
    /// outcome comes back in two registers; only [`Put::into_result`] is inlined here.
    #[inline]
    fn encode_known(&self, save_id: Option<u64>, buf: &mut [u8]) -> Result<usize, SaveError> {
        // The save callback's size probe (an empty buffer) is answered here, inlined, without
        // the out-of-line call: what `put_known` answers for it, in its order (an invalid
        // record, else the exact size). Every record is at least `MIN_ENCODED_LEN` long.
        if buf.is_empty() {
            return Err(match self.invalid_field() {
                Some(field) => SaveError::InvalidRecord {
                    field: field.name(),
                },
                None => SaveError::BufferTooSmall {
                    needed: self.encoded_len_saved(save_id),
                },
            });
        }
        let out = &mut *buf;
        let put = match crate::hwcrc::with_hw(move |hw| self.put_known(hw, save_id, out)) {
            Some(put) => put,
            None => self.put_known_table(save_id, buf),
        };
        put.into_result()
    }

    /// [`put_known`](Self::put_known) with the table CRC.
    #[cold]
    #[inline(never)]
    fn put_known_table(&self, save_id: Option<u64>, buf: &mut [u8]) -> Put {
        self.put_known(TableCrc, save_id, buf)
    }

    #[inline(always)]
    fn put_known<C: WordsCrc>(&self, crc: C, save_id: Option<u64>, buf: &mut [u8]) -> Put {
        if let Some(field) = self.invalid_field() {
            return Put::Invalid(field);
        }
        let (sequence, tag, posted_at) = (self.sequence, self.tag, self.posted_at);
        let lens = u64::from(self.payload_len) | u64::from(self.payload_crc) << 32;
        // `attempts`, then the six reserved zero bytes.
        let attempts = u64::from(self.attempts);
        match (&self.trace_id, save_id) {
            (None, None) => put_words::<_, 6, false>(
                crc,
                &[
                    header_word(LEN_PLAIN),
                    sequence,
                    tag,
                    posted_at,
                    lens,
                    attempts,
                ],
                0,
                buf,
            ),
            (None, Some(id)) => put_words::<_, 7, true>(
                crc,
                &[
                    header_word(LEN_SAVE_ID),
                    sequence,
                    tag,
                    posted_at,
                    lens,
                    attempts,
                    u64::from(SAVE_ENTRY) | id << 32,
                ],
                (id >> 32) as u32,
                buf,
            ),
            (Some(trace), save_id) => {
                let (t0, rest) = trace.split_first_chunk::<4>().unwrap_or((&[0; 4], &[]));
                let (t1, t2) = rest.split_first_chunk::<8>().unwrap_or((&[0; 8], &[]));
                let t2: [u8; 4] = t2.try_into().unwrap_or([0; 4]);
                let first = u64::from(TRACE_ENTRY) | u64::from(u32::from_le_bytes(*t0)) << 32;
                let t2 = u32::from_le_bytes(t2);
                match save_id {
                    None => put_words::<_, 8, true>(
                        crc,
                        &[
                            header_word(LEN_TRACE),
                            sequence,
                            tag,
                            posted_at,
                            lens,
                            attempts,
                            first,
                            le64(t1),
                        ],
                        t2,
                        buf,
                    ),
                    Some(id) => put_words::<_, 10, false>(
                        crc,
                        &[
                            header_word(LEN_BOTH),
                            sequence,
                            tag,
                            posted_at,
                            lens,
                            attempts,
                            first,
                            le64(t1),
                            u64::from(t2) | u64::from(SAVE_ENTRY) << 32,
                            id,
                        ],
                        0,
                        buf,
                    ),
                }
            }
        }
    }

    /// Any layout, foreign extensions included, through the shared envelope writer.
    #[inline(never)]
    fn encode_general(
        &self,
        save_id: Option<u64>,
        extra: &[Extension<'_>],
        buf: &mut [u8],
    ) -> Result<usize, SaveError> {
        if let Err(field) = self.validate() {
            return Err(SaveError::InvalidRecord { field });
        }
        let body = BodyV1 {
            sequence: U64::new(self.sequence),
            tag: U64::new(self.tag),
            posted_at: U64::new(self.posted_at),
            payload_len: U32::new(self.payload_len),
            payload_crc: U32::new(self.payload_crc),
            attempts: U16::new(self.attempts),
            reserved: [0; 6],
        };
        let save_id_bytes = save_id.map(u64::to_le_bytes);
        // Ascending by tag, as the envelope requires.
        let mut entries = [Extension {
            tag: 0,
            critical: false,
            data: &[],
        }; 2];
        let mut count = 0;
        if let Some(id) = &self.trace_id {
            entries[count] = Extension {
                tag: TAG_TRACE_ID,
                critical: false,
                data: id,
            };
            count += 1;
        }
        if let Some(id) = &save_id_bytes {
            entries[count] = Extension {
                tag: TAG_SAVE_ID,
                critical: false,
                data: id,
            };
            count += 1;
        }
        let known = &entries[..count];
        let total = envelope::encoded_len(BODY_V1_LEN, known, KNOWN_TAGS, extra)?;
        envelope::write(
            Self::MAGIC,
            Self::VERSION,
            body.as_bytes(),
            known,
            extra,
            total,
            buf,
        )
    }

    /// Decodes and fully validates an untrusted record. `bytes` may be longer than the record
    /// (a padded restore buffer) as long as every byte after it is zero.
    #[inline]
    pub fn decode(bytes: &[u8]) -> Result<Self, RestoreError> {
        // The plain layout first, built straight into the caller's result: a shared path for
        // all four layouts merges a record with a trace id and one without through a stack
        // temporary, and copying that temporary (unaligned, at the trace id's odd offset) cost
        // more than the checks and the CRC together (docs/performance.md §2.2).
        match Self::decode_plain(bytes) {
            Some(record) => Ok(record),
            None => Self::decode_other(bytes),
        }
    }

    /// Like [`decode`](Self::decode), also returning the save identity ([`TAG_SAVE_ID`]) if the
    /// record carries one.
    #[inline]
    pub fn decode_saved(bytes: &[u8]) -> Result<(Self, Option<u64>), RestoreError> {
        match Self::decode_known(bytes) {
            Some(decoded) => Ok(decoded),
            None => Self::decode_general(bytes),
        }
    }

    /// [`decode`](Self::decode) for everything but a valid plain record: the other three
    /// layouts this build writes, and (through the general decoder) every error.
    #[inline(never)]
    fn decode_other(bytes: &[u8]) -> Result<Self, RestoreError> {
        Self::decode_saved(bytes).map(|(record, _)| record)
    }

    /// The words every layout this build writes starts with: word 0 (magic | checksum), the
    /// covered words 1..=6 and the bytes after them, and `total_len`; `None` unless the magic,
    /// version 1 and flags 0 are there.
    #[inline(always)]
    fn known_frame(bytes: &[u8]) -> Option<(u64, usize, &[u8; LEN_PLAIN - 8], &[u8])> {
        let (fixed, ext) = bytes.split_first_chunk::<LEN_PLAIN>()?;
        let (w0, covered) = fixed.split_first_chunk::<8>()?;
        let covered: &[u8; LEN_PLAIN - 8] = covered.try_into().ok()?;
        let w0 = le64(w0);
        let w1 = le64(covered.first_chunk::<8>()?);
        // Magic; version 1 and flags 0.
        if w0 as u32 != MAGIC_WORD as u32 || w1 as u32 != VERSION_WORD as u32 {
            return None;
        }
        Some((w0, (w1 >> 32) as usize, covered, ext))
    }

    /// The record from the v1 body (covered words 2..=6) and the trace id, if the reserved
    /// bytes are zero and every field is in range.
    #[inline(always)]
    fn known_body(
        covered: &[u8; LEN_PLAIN - 8],
        trace_id: Option<[u8; TRACE_ID_LEN]>,
    ) -> Option<Self> {
        let (words, _) = covered.as_chunks::<8>();
        let &[_, w2, w3, w4, w5, w6] = words else {
            return None;
        };
        let [w2, w3, w4, w5, w6] = [w2, w3, w4, w5, w6].map(u64::from_le_bytes);
        // The reserved bytes after `attempts`.
        if w6 >> 16 != 0 {
            return None;
        }
        let record = Self {
            sequence: w2,
            tag: w3,
            posted_at: w4,
            payload_len: w5 as u32,
            payload_crc: (w5 >> 32) as u32,
            attempts: w6 as u16,
            trace_id,
        };
        if record.validate().is_err() {
            return None;
        }
        Some(record)
    }

    /// Whether everything after the record's `total` bytes is zero (a padded restore buffer).
    #[inline(always)]
    fn zero_after(bytes: &[u8], total: usize) -> bool {
        bytes
            .get(total..)
            .is_some_and(|trailing| trailing.iter().all(|&b| b == 0))
    }

    /// A valid record in the plain layout (no extensions), validated from words loaded once and
    /// checksummed in place through one fixed-size call; `None` for anything else.
    #[inline(always)]
    fn decode_plain(bytes: &[u8]) -> Option<Self> {
        let (w0, total, covered, _) = Self::known_frame(bytes)?;
        if total != LEN_PLAIN || crc32c_array(covered) != (w0 >> 32) as u32 {
            return None;
        }
        if !Self::zero_after(bytes, total) {
            return None;
        }
        Self::known_body(covered, None)
    }

    /// Recognizes a valid record in one of the four layouts this build writes, validating it
    /// from words loaded once; `None` for anything else, valid or not, which
    /// [`decode_general`](Self::decode_general) then judges. So every error, and every record
    /// this path does not know, goes through the general decoder, and this path only has to
    /// accept nothing the general one would reject (tested: same result on every input).
    #[inline(always)]
    fn decode_known(bytes: &[u8]) -> Option<(Self, Option<u64>)> {
        let (w0, total, covered, ext) = Self::known_frame(bytes)?;
        // The plain layout's checksum straight from the input: no copy, one fixed-size call.
        let (crc, trace_id, save_id) = if total == LEN_PLAIN {
            (crc32c_array(covered), None, None)
        } else {
            Self::known_extensions(total, covered, ext)?
        };
        if crc != (w0 >> 32) as u32 || !Self::zero_after(bytes, total) {
            return None;
        }
        Some((Self::known_body(covered, trace_id)?, save_id))
    }

    /// The rest of [`decode_known`](Self::decode_known) for the layouts with extensions (save id,
    /// trace id, both): the checksum of `body` (words 1..=6) and the area `ext` after it, and
    /// the extensions, if `ext` holds exactly the entries this build writes for `total`. Out of
    /// line, so that the plain layout's path stays small.
    #[inline(never)]
    fn known_extensions(
        total: usize,
        covered: &[u8; LEN_PLAIN - 8],
        ext: &[u8],
    ) -> Option<(u32, Option<[u8; TRACE_ID_LEN]>, Option<u64>)> {
        let (words, _) = covered.as_chunks::<8>();
        let &[b1, b2, b3, b4, b5, b6] = words else {
            return None;
        };
        let [b1, b2, b3, b4, b5, b6] = [b1, b2, b3, b4, b5, b6].map(u64::from_le_bytes);
        let known = match total {
            LEN_SAVE_ID => {
                let area: &[u8; LEN_SAVE_ID - LEN_PLAIN] = ext.first_chunk()?;
                let (w7, t) = area.split_first_chunk::<8>()?;
                let (w7, t) = (le64(w7), u32::from_le_bytes(t.try_into().ok()?));
                if w7 as u32 != SAVE_ENTRY {
                    return None;
                }
                let id = w7 >> 32 | u64::from(t) << 32;
                let crc = crc32c_words_u32(&[b1, b2, b3, b4, b5, b6, w7], t);
                (crc, None, Some(id))
            }
            LEN_TRACE => {
                let area: &[u8; LEN_TRACE - LEN_PLAIN] = ext.first_chunk()?;
                let (head, t) = area.split_first_chunk::<16>()?;
                let (w7, w8) = head.split_first_chunk::<8>()?;
                let (w7, w8) = (le64(w7), le64(w8.try_into().ok()?));
                let t = u32::from_le_bytes(t.try_into().ok()?);
                if w7 as u32 != TRACE_ENTRY {
                    return None;
                }
                let trace: [u8; TRACE_ID_LEN] = area.get(4..20)?.try_into().ok()?;
                let crc = crc32c_words_u32(&[b1, b2, b3, b4, b5, b6, w7, w8], t);
                (crc, Some(trace), None)
            }
            LEN_BOTH => {
                let area: &[u8; LEN_BOTH - LEN_PLAIN] = ext.first_chunk()?;
                let (words, _) = area.as_chunks::<8>();
                let &[w7, w8, w9, w10] = words else {
                    return None;
                };
                let [w7, w8, w9, w10] = [w7, w8, w9, w10].map(u64::from_le_bytes);
                if w7 as u32 != TRACE_ENTRY || (w9 >> 32) as u32 != SAVE_ENTRY {
                    return None;
                }
                let trace: [u8; TRACE_ID_LEN] = area.get(4..20)?.try_into().ok()?;
                let crc = crc32c_words(&[b1, b2, b3, b4, b5, b6, w7, w8, w9, w10]);
                (crc, Some(trace), Some(w10))
            }
            _ => return None,
        };
        Some(known)
    }

    /// Any input, through the shared envelope reader and the extension walk: every error, and
    /// any record with extensions this build does not write.
    #[cold]
    #[inline(never)]
    fn decode_general(bytes: &[u8]) -> Result<(Self, Option<u64>), RestoreError> {
        let opened = envelope::open(Self::MAGIC, bytes)?;
        if opened.version != Self::VERSION {
            return Err(RestoreError::UnsupportedVersion {
                found: opened.version,
            });
        }
        if opened.flags != 0 {
            return Err(RestoreError::ReservedNotZero);
        }
        let (body, ext_area) =
            BodyV1::ref_from_prefix(opened.rest).map_err(|_| RestoreError::BadLength)?;
        if body.reserved != [0; 6] {
            return Err(RestoreError::ReservedNotZero);
        }

        let mut trace_id = None;
        let mut save_id = None;
        for ext in Entries::new(ext_area) {
            let ext = ext?;
            match ext.tag {
                TAG_SAVE_ID => {
                    let id = <[u8; SAVE_ID_LEN]>::try_from(ext.data)
                        .map_err(|_| RestoreError::MalformedExtension)?;
                    save_id = Some(u64::from_le_bytes(id));
                }
                TAG_TRACE_ID => {
                    let id = <[u8; TRACE_ID_LEN]>::try_from(ext.data)
                        .map_err(|_| RestoreError::MalformedExtension)?;
                    trace_id = Some(id);
                }
                tag if ext.critical => return Err(RestoreError::UnknownCriticalField { tag }),
                // An optional field from a newer writer: skipping it is its contract.
                _ => {}
            }
        }

        let record = Self {
            sequence: body.sequence.get(),
            tag: body.tag.get(),
            posted_at: body.posted_at.get(),
            payload_len: body.payload_len.get(),
            payload_crc: body.payload_crc.get(),
            attempts: body.attempts.get(),
            trace_id,
        };
        record
            .validate()
            .map_err(|field| RestoreError::OutOfRange { field })?;
        Ok((record, save_id))
    }
}

#[cfg(test)]
mod word_path_tests {
    //! The word-at-a-time paths against the general ones: same bytes out, same verdict in.

    use proptest::prelude::*;

    use super::*;
    use crate::saved::PRIVATE_TAG_MIN;
    use crate::saved::checksum::crc32c;

    fn any_record() -> impl Strategy<Value = DeliveryRecord> {
        // Mostly valid values, with the boundaries and invalid ones (0, too large) mixed in.
        let sequence = prop_oneof![Just(0u64), Just(1), Just(u64::MAX), any::<u64>()];
        let payload_len = prop_oneof![
            Just(0u32),
            Just(1),
            Just(MAX_PAYLOAD_LEN),
            Just(MAX_PAYLOAD_LEN + 1),
            1..=MAX_PAYLOAD_LEN,
            any::<u32>(),
        ];
        let attempts = prop_oneof![Just(0u16), Just(1), Just(u16::MAX), any::<u16>()];
        (
            sequence,
            any::<u64>(),
            any::<u64>(),
            payload_len,
            any::<u32>(),
            attempts,
            proptest::option::of(any::<[u8; 16]>()),
        )
            .prop_map(
                |(sequence, tag, posted_at, payload_len, payload_crc, attempts, trace_id)| {
                    DeliveryRecord {
                        sequence,
                        tag,
                        posted_at,
                        payload_len,
                        payload_crc,
                        attempts,
                        trace_id,
                    }
                },
            )
    }

    fn valid_record() -> impl Strategy<Value = DeliveryRecord> {
        any_record().prop_filter("valid", |r| r.validate().is_ok())
    }

    /// Recomputes the checksum of a record whose bytes a test changed, if its `total_len` is
    /// usable, so that the checks after the checksum are reached.
    pub(super) fn reseal(bytes: &mut [u8]) {
        let Some(total) = bytes.get(12..16) else {
            return;
        };
        let total = u32::from_le_bytes(total.try_into().unwrap()) as usize;
        if (8..=bytes.len()).contains(&total) {
            let crc = crc32c(&bytes[8..total]);
            bytes[4..8].copy_from_slice(&crc.to_le_bytes());
        }
    }

    /// Both public decoders (and so both word paths: `decode`'s plain-layout one and
    /// `decode_saved`'s four-layout one) say what the general decoder says.
    pub(super) fn same_verdict(bytes: &[u8]) {
        let general = DeliveryRecord::decode_general(bytes);
        assert_eq!(DeliveryRecord::decode_saved(bytes), general, "{bytes:02x?}");
        assert_eq!(
            DeliveryRecord::decode(bytes),
            general.map(|(record, _)| record),
            "{bytes:02x?}"
        );
        if let Some(record) = DeliveryRecord::decode_plain(bytes) {
            assert_eq!(
                general,
                Ok((record, None)),
                "plain path accepted {bytes:02x?}"
            );
        }
    }

    /// The size probe (an empty buffer) is answered before the word encoder runs: the same
    /// answer as the general encoder for every combination of invalid fields, trace id and
    /// save id, errors in the same order.
    #[test]
    fn the_empty_buffer_answer_matches_the_general_encoder() {
        for sequence in [0, 1, u64::MAX] {
            for payload_len in [0, 1, MAX_PAYLOAD_LEN, MAX_PAYLOAD_LEN + 1] {
                for attempts in [0, 1] {
                    for trace_id in [None, Some([7u8; 16])] {
                        let record = DeliveryRecord {
                            sequence,
                            tag: 5,
                            posted_at: 6,
                            payload_len,
                            payload_crc: 8,
                            attempts,
                            trace_id,
                        };
                        for save_id in [None, Some(0), Some(u64::MAX)] {
                            let general = record.encode_general(save_id, &[], &mut []);
                            assert!(general.is_err());
                            assert_eq!(record.encode_saved(save_id, &mut []), general);
                            if save_id.is_none() {
                                assert_eq!(record.encode(&mut []), general);
                            }
                        }
                    }
                }
            }
        }
    }

    proptest! {
        #[test]
        #[cfg_attr(miri, ignore)] // proptest persistence needs getcwd (Miri isolation)
        fn encode_matches_the_general_encoder(
            record in any_record(),
            save_id in proptest::option::of(any::<u64>()),
            len in 0usize..130,
            fill in any::<u8>(),
        ) {
            let mut fast = [fill; 130];
            let mut general = [fill; 130];
            let a = record.encode_saved(save_id, &mut fast[..len]);
            let b = record.encode_general(save_id, &[], &mut general[..len]);
            prop_assert_eq!(a, b);
            prop_assert_eq!(&fast[..], &general[..]);
            // The word encoder with the table CRC (what CPUs without the instruction run).
            let mut table = [fill; 130];
            let c = record.put_known_table(save_id, &mut table[..len]).into_result();
            prop_assert_eq!(c, b);
            prop_assert_eq!(&table[..], &general[..]);
            if save_id.is_none() {
                let mut plain = [fill; 130];
                prop_assert_eq!(record.encode(&mut plain[..len]), b);
                prop_assert_eq!(&plain[..], &general[..]);
            }
        }

        #[test]
        #[cfg_attr(miri, ignore)] // proptest persistence needs getcwd (Miri isolation)
        fn every_layout_round_trips_through_the_word_decoder(
            record in valid_record(),
            save_id in proptest::option::of(any::<u64>()),
            padding in 0usize..40,
        ) {
            let mut buf = [0u8; 128];
            let len = record.encode_saved(save_id, &mut buf).unwrap();
            prop_assert_eq!(len, record.encoded_len_saved(save_id));
            let bytes = &buf[..len + padding];
            // The word path takes it (so the fast path is what the benches measure)...
            prop_assert_eq!(DeliveryRecord::decode_known(bytes), Some((record, save_id)));
            let plain = record.trace_id.is_none() && save_id.is_none();
            prop_assert_eq!(DeliveryRecord::decode_plain(bytes), plain.then_some(record));
            // ...and agrees with the general one.
            prop_assert_eq!(DeliveryRecord::decode_general(bytes), Ok((record, save_id)));
            if padding > 0 {
                let mut dirty = buf;
                dirty[len + padding - 1] = 1;
                same_verdict(&dirty[..len + padding]);
            }
        }

        #[test]
        #[cfg_attr(miri, ignore)] // proptest persistence needs getcwd (Miri isolation)
        fn random_bytes_get_the_general_verdict(
            mut bytes in proptest::collection::vec(any::<u8>(), 0..100),
            magic in any::<bool>(),
            total in prop_oneof![Just(56u32), Just(68), Just(76), Just(88), any::<u32>()],
            seal in any::<bool>(),
        ) {
            if magic && bytes.len() >= 16 {
                bytes[..4].copy_from_slice(&DeliveryRecord::MAGIC);
                bytes[8..12].copy_from_slice(&[1, 0, 0, 0]);
                bytes[12..16].copy_from_slice(&total.to_le_bytes());
            }
            if seal {
                reseal(&mut bytes);
            }
            same_verdict(&bytes);
        }
    }

    /// Every single-byte change of every layout (with and without the checksum fixed up, so the
    /// checks behind it are reached), every truncation, and one more byte: the word path says what
    /// the general one says.
    #[test]
    fn every_single_byte_corruption_gets_the_general_verdict() {
        let base = DeliveryRecord {
            sequence: 123_456,
            tag: 0x1234_5678_9ABC_DEF0,
            posted_at: 133_500_000_000_000_000,
            payload_len: 512,
            payload_crc: 0xCAFE_F00D,
            attempts: 1,
            trace_id: None,
        };
        let traced = DeliveryRecord {
            trace_id: Some(core::array::from_fn(|i| 0xA0 + i as u8)),
            ..base
        };
        let mut cases = 0;
        for record in [base, traced] {
            for save_id in [None, Some(0x0102_0304_0506_0708)] {
                let mut buf = [0u8; 96];
                let len = record.encode_saved(save_id, &mut buf).unwrap();
                for padded in [len, len + 8] {
                    let clean = &buf[..padded];
                    assert!(DeliveryRecord::decode_known(clean).is_some());
                    for at in 0..padded {
                        // Under Miri (an interpreter, ~1000× slower) two flips per byte and
                        // no exhaustive values: the same code paths, far fewer cases.
                        let flips: &[u8] = if cfg!(miri) {
                            &[0x01, 0xFF]
                        } else {
                            &[0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0xFF]
                        };
                        for &flip in flips {
                            let mut bytes = buf;
                            bytes[at] ^= flip;
                            let bytes = &mut bytes[..padded];
                            same_verdict(bytes);
                            reseal(bytes);
                            same_verdict(bytes);
                            cases += 2;
                        }
                        // Every byte value at the reserved, flag and extension-header positions.
                        if !cfg!(miri) && matches!(at, 10..=15 | 48..=63 | 72..=79) {
                            for value in 0..=255u8 {
                                let mut bytes = buf;
                                bytes[at] = value;
                                let bytes = &mut bytes[..padded];
                                reseal(bytes);
                                same_verdict(bytes);
                                cases += 1;
                            }
                        }
                    }
                    for cut in 0..padded {
                        same_verdict(&buf[..cut]);
                    }
                    let mut longer = [0u8; 97];
                    longer[..96].copy_from_slice(&buf);
                    longer[padded] = 0x5A;
                    same_verdict(&longer[..=padded]);
                }
            }
        }
        assert!(cases > if cfg!(miri) { 1_000 } else { 10_000 });
    }

    /// Records with extensions this build does not write go through the general paths, which
    /// must still encode and decode them; critical-bit variants of known tags too.
    #[test]
    fn foreign_layouts_take_the_general_paths() {
        let record = DeliveryRecord {
            sequence: 9,
            tag: 1,
            posted_at: 2,
            payload_len: 3,
            payload_crc: 4,
            attempts: 5,
            trace_id: Some([7; 16]),
        };
        let extra = [Extension {
            tag: PRIVATE_TAG_MIN,
            critical: false,
            data: &[1, 2, 3],
        }];
        let mut buf = [0u8; 128];
        let len = record.encode_with_extensions(&extra, &mut buf).unwrap();
        assert_eq!(DeliveryRecord::decode_known(&buf[..len]), None);
        assert_eq!(DeliveryRecord::decode(&buf[..len]), Ok(record));
        // The trace id's entry with the critical bit set: still understood, by the general path.
        let len = record.encode(&mut buf).unwrap();
        buf[57] |= 0x80;
        let crc = crc32c(&buf[8..len]);
        buf[4..8].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(DeliveryRecord::decode_known(&buf[..len]), None);
        assert_eq!(DeliveryRecord::decode(&buf[..len]), Ok(record));
    }
}

#[cfg(test)]
mod review15_tests {
    //! review15: fast (`decode_known`) vs general (`decode_general`) on valid records of every
    //! layout after several random and structured mutations, the checksum recomputed afterwards
    //! so the mutations reach the field and extension checks.

    use proptest::prelude::*;

    use super::word_path_tests::{reseal, same_verdict};
    use super::*;
    extern crate alloc;
    #[allow(unused_imports)]
    use alloc::vec;
    use alloc::vec::Vec;

    #[derive(Debug, Clone)]
    enum Mutation {
        Byte(usize, u8),
        /// Overwrite `total_len` with one of the known lengths (or a neighbour).
        Total(u32),
        /// Overwrite a 4-byte window with an extension entry header.
        EntryHeader(usize, u16, u16),
        /// Overwrite the u16 at an offset.
        Word16(usize, u16),
        /// Truncate or extend with zeros / a byte.
        Resize(usize, u8),
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        let tag = prop_oneof![
            Just(TAG_TRACE_ID),
            Just(TAG_SAVE_ID),
            Just(TAG_TRACE_ID | 0x8000),
            Just(TAG_SAVE_ID | 0x8000),
            Just(3u16),
            Just(0u16),
            any::<u16>()
        ];
        let len = prop_oneof![
            Just(0u16),
            Just(8),
            Just(16),
            Just(4),
            Just(12),
            Just(20),
            any::<u16>()
        ];
        prop_oneof![
            4 => (0usize..96, any::<u8>()).prop_map(|(a, b)| Mutation::Byte(a, b)),
            2 => prop_oneof![
                Just(56u32), Just(68), Just(76), Just(88), Just(57), Just(64), Just(72),
                Just(80), Just(84), Just(92), Just(16), Just(0), Just(u32::MAX)
            ]
            .prop_map(Mutation::Total),
            2 => (prop_oneof![Just(56usize), Just(68), Just(76), 48usize..92], tag, len)
                .prop_map(|(a, t, l)| Mutation::EntryHeader(a, t, l)),
            1 => (prop_oneof![Just(8usize), Just(10), Just(48), Just(50), Just(52), Just(54)], any::<u16>())
                .prop_map(|(a, v)| Mutation::Word16(a, v)),
            1 => (40usize..100, any::<u8>()).prop_map(|(n, b)| Mutation::Resize(n, b)),
        ]
    }

    fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
        match *m {
            Mutation::Byte(at, v) => {
                if let Some(b) = bytes.get_mut(at) {
                    *b = v;
                }
            }
            Mutation::Total(t) => {
                if bytes.len() >= 16 {
                    bytes[12..16].copy_from_slice(&t.to_le_bytes());
                }
            }
            Mutation::EntryHeader(at, tag, len) => {
                if bytes.len() >= at + 4 {
                    bytes[at..at + 2].copy_from_slice(&tag.to_le_bytes());
                    bytes[at + 2..at + 4].copy_from_slice(&len.to_le_bytes());
                }
            }
            Mutation::Word16(at, v) => {
                if bytes.len() >= at + 2 {
                    bytes[at..at + 2].copy_from_slice(&v.to_le_bytes());
                }
            }
            Mutation::Resize(n, fill) => {
                let old = bytes.len();
                bytes.resize(n, 0);
                if n > old && fill & 1 == 1 {
                    bytes[n - 1] = fill;
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]
        // 20,000 cases are far too slow under Miri, and proptest's failure persistence asks for
        // the working directory, which Miri's isolation refuses; the fast/general agreement is
        // covered under Miri by the single-byte tests above.
        #[test]
        #[cfg_attr(miri, ignore)]
        fn review15_mutated_layouts_get_the_general_verdict(
            seq in 1u64..=u64::MAX,
            tag in any::<u64>(),
            posted in any::<u64>(),
            plen in 1u32..=MAX_PAYLOAD_LEN,
            pcrc in any::<u32>(),
            attempts in 1u16..=u16::MAX,
            trace in proptest::option::of(any::<[u8; 16]>()),
            save_id in proptest::option::of(any::<u64>()),
            padding in 0usize..12,
            mutations in proptest::collection::vec(mutation(), 1..4),
            seal in prop_oneof![4 => Just(true), 1 => Just(false)],
        ) {
            let record = DeliveryRecord {
                sequence: seq, tag, posted_at: posted, payload_len: plen,
                payload_crc: pcrc, attempts, trace_id: trace,
            };
            let mut buf = [0u8; 128];
            let len = record.encode_saved(save_id, &mut buf).unwrap();
            let mut bytes = buf[..len + padding].to_vec();
            prop_assert_eq!(DeliveryRecord::decode_saved(&bytes), Ok((record, save_id)));
            for m in &mutations {
                apply(&mut bytes, m);
            }
            if seal {
                reseal(&mut bytes);
            }
            let fast = DeliveryRecord::decode_known(&bytes);
            let general = DeliveryRecord::decode_general(&bytes);
            if let Some(fast) = fast {
                prop_assert_eq!(Ok(fast), general, "fast path accepted {:02x?}", bytes);
            }
            same_verdict(&bytes);
        }
    }
}

#[cfg(test)]
mod review_decode_tests {
    //! Adversarial review of `decode`'s plain-layout path (`decode_plain`) and the shared
    //! `known_frame` / `known_body` / `zero_after` helpers: every public decoder against the
    //! general one, and the plain path against an oracle written from the format description
    //! (docs/saved-state.md §2) with a bitwise CRC32C, so a bug shared by the general decoder
    //! and the word paths (or by every CRC entry point) would still show.

    use proptest::prelude::*;

    use super::word_path_tests::{reseal, same_verdict};
    use super::*;
    use crate::saved::checksum::crc32c;
    use crate::saved::{CRITICAL_BIT, MAX_RECORD_LEN};
    extern crate alloc;
    use alloc::vec::Vec;

    use crate::saved::checksum::tests::bitwise as bitwise_crc32c;

    /// The plain layout straight from the format description, byte offsets and all: `Some` only
    /// for a valid 56-byte record without extensions, followed by zero bytes only.
    fn plain_oracle(bytes: &[u8]) -> Option<DeliveryRecord> {
        let u16_at = |at: usize| u16::from_le_bytes(bytes[at..at + 2].try_into().unwrap());
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
        if bytes.len() < 56
            || bytes[0..4] != *b"VBDR"
            || u16_at(8) != 1
            || u16_at(10) != 0
            || u32_at(12) != 56
            || bitwise_crc32c(&bytes[8..56]) != u32_at(4)
            || bytes[50..56] != [0; 6]
            || bytes[56..].iter().any(|&b| b != 0)
        {
            return None;
        }
        let record = DeliveryRecord {
            sequence: u64_at(16),
            tag: u64_at(24),
            posted_at: u64_at(32),
            payload_len: u32_at(40),
            payload_crc: u32_at(44),
            attempts: u16_at(48),
            trace_id: None,
        };
        let valid = record.sequence != 0
            && (1..=MAX_PAYLOAD_LEN).contains(&record.payload_len)
            && record.attempts != 0;
        valid.then_some(record)
    }

    /// `same_verdict`, plus: whenever `total_len` says 56, `decode` accepts exactly what the
    /// oracle accepts (and the plain path exactly that too).
    fn check(bytes: &[u8]) {
        same_verdict(bytes);
        if bytes.get(12..16) == Some(&56u32.to_le_bytes()[..]) {
            let oracle = plain_oracle(bytes);
            assert_eq!(DeliveryRecord::decode(bytes).ok(), oracle, "{bytes:02x?}");
            assert_eq!(DeliveryRecord::decode_plain(bytes), oracle, "{bytes:02x?}");
        } else {
            assert_eq!(DeliveryRecord::decode_plain(bytes), None, "{bytes:02x?}");
        }
    }

    fn base() -> DeliveryRecord {
        DeliveryRecord {
            sequence: 0x0102_0304_0506_0708,
            tag: 0x1112_1314_1516_1718,
            posted_at: 0x2122_2324_2526_2728,
            payload_len: 0x1234,
            payload_crc: 0xDEAD_BEEF,
            attempts: 3,
            trace_id: None,
        }
    }

    /// The four layouts this build writes, encoded into a zeroed 160-byte buffer, with lengths.
    fn layouts() -> Vec<([u8; 160], usize)> {
        let traced = DeliveryRecord {
            trace_id: Some(core::array::from_fn(|i| 0xC0 ^ i as u8)),
            ..base()
        };
        let mut out = Vec::new();
        for record in [base(), traced] {
            for save_id in [None, Some(0xA1A2_A3A4_A5A6_A7A8)] {
                let mut buf = [0u8; 160];
                let len = record.encode_saved(save_id, &mut buf).unwrap();
                out.push((buf, len));
            }
        }
        assert_eq!(
            out.iter().map(|&(_, l)| l).collect::<Vec<_>>(),
            [56, 68, 76, 88]
        );
        out
    }

    const TOTALS: &[u32] = &[
        0,
        1,
        7,
        8,
        15,
        16,
        17,
        55,
        56,
        57,
        63,
        64,
        67,
        68,
        69,
        72,
        75,
        76,
        77,
        80,
        87,
        88,
        89,
        96,
        4095,
        4096,
        4097,
        0x8000_0038,
        0x1_0038,
        u32::MAX,
    ];

    /// Every slice length from 0 to 140 of every layout (zero padded), with every interesting
    /// `total_len`, resealed and not.
    #[test]
    #[cfg_attr(miri, ignore)] // tens of thousands of cases; the small tests here run under Miri
    fn lengths_and_totals_grid() {
        for (buf, _) in layouts() {
            for &total in TOTALS {
                let mut relabelled = buf;
                relabelled[12..16].copy_from_slice(&total.to_le_bytes());
                for len in 0..=140 {
                    let mut bytes = relabelled;
                    check(&bytes[..len]);
                    reseal(&mut bytes[..len]);
                    check(&bytes[..len]);
                }
            }
        }
    }

    /// A record of one layout labelled with another layout's `total_len` and resealed over that
    /// length: never the original record with a wrong `total`, and the same verdict.
    #[test]
    fn relabelled_layouts() {
        for (buf, len) in layouts() {
            for other in [56usize, 68, 76, 88] {
                let mut bytes = buf;
                bytes[12..16].copy_from_slice(&(other as u32).to_le_bytes());
                reseal(&mut bytes[..other]);
                for cut in [other, len.max(other), 96, 160] {
                    check(&bytes[..cut]);
                }
                if other != len {
                    // Shorter label: the rest of the real record is non-zero "padding";
                    // longer label: the zero padding is read as an extension area.
                    assert!(DeliveryRecord::decode(&bytes[..len.max(other)]).is_err());
                    assert!(DeliveryRecord::decode_saved(&bytes[..len.max(other)]).is_err());
                }
            }
        }
        // The extension layouts cut to 56 bytes and labelled 56 (a forged plain record with a
        // valid checksum): that one is a valid plain record, and only that.
        for (buf, _) in layouts() {
            let mut bytes = buf;
            bytes[12..16].copy_from_slice(&56u32.to_le_bytes());
            reseal(&mut bytes[..56]);
            assert_eq!(DeliveryRecord::decode(&bytes[..56]), Ok(base()));
        }
    }

    /// Any non-zero byte anywhere in up to 72 bytes of padding is `TrailingBytes`, on every
    /// layout, from both public decoders.
    #[test]
    #[cfg_attr(miri, ignore)] // tens of thousands of cases; the small tests here run under Miri
    fn nonzero_padding_is_rejected_everywhere() {
        for (buf, len) in layouts() {
            for pad in 1..=(160 - len) {
                for at in len..len + pad {
                    for value in [0x01u8, 0x80, 0xFF] {
                        let mut bytes = buf;
                        bytes[at] = value;
                        let bytes = &bytes[..len + pad];
                        assert_eq!(
                            DeliveryRecord::decode(bytes),
                            Err(RestoreError::TrailingBytes),
                            "len {len} pad {pad} at {at}"
                        );
                        check(bytes);
                    }
                }
                assert_eq!(
                    DeliveryRecord::decode_saved(&buf[..len + pad]).map(|(r, _)| r.sequence),
                    Ok(base().sequence)
                );
            }
        }
    }

    /// Header and body fields at and around their limits, resealed so every check behind the
    /// checksum is reached; every layout.
    #[test]
    fn fields_at_their_limits() {
        let mut cases = 0;
        for (buf, len) in layouts() {
            let mut variants: Vec<(usize, Vec<u8>)> = Vec::new();
            for v in [0u16, 1, 2, 0x0101, 0x8001, u16::MAX] {
                variants.push((8, v.to_le_bytes().to_vec()));
            }
            for bit in 0..16 {
                variants.push((10, (1u16 << bit).to_le_bytes().to_vec()));
            }
            for s in [0u64, 1, u64::MAX] {
                variants.push((16, s.to_le_bytes().to_vec()));
            }
            for p in [0u32, 1, MAX_PAYLOAD_LEN, MAX_PAYLOAD_LEN + 1, u32::MAX] {
                variants.push((40, p.to_le_bytes().to_vec()));
            }
            for a in [0u16, 1, u16::MAX] {
                variants.push((48, a.to_le_bytes().to_vec()));
            }
            for at in 50..56 {
                for v in [1u8, 0x80, 0xFF] {
                    variants.push((at, alloc::vec![v]));
                }
            }
            // Magic variants: one byte off, another record type's magic.
            variants.push((0, b"VBDr".to_vec()));
            variants.push((0, b"RDBV".to_vec()));
            for (at, value) in variants {
                let mut bytes = buf;
                bytes[at..at + value.len()].copy_from_slice(&value);
                for cut in [len, len + 8] {
                    let mut b = bytes;
                    check(&b[..cut]);
                    reseal(&mut b[..cut]);
                    check(&b[..cut]);
                    cases += 2;
                }
            }
        }
        assert!(cases > 400);
        // The limits themselves are accepted.
        let mut buf = [0u8; 56];
        let edge = DeliveryRecord {
            sequence: 1,
            payload_len: MAX_PAYLOAD_LEN,
            attempts: 1,
            ..base()
        };
        edge.encode(&mut buf).unwrap();
        assert_eq!(DeliveryRecord::decode(&buf), Ok(edge));
        assert_eq!(plain_oracle(&buf), Some(edge));
    }

    /// Extension entries in the 68/76/88 layouts with the critical bit, a wrong length, a wrong
    /// or swapped tag, passed to `decode` (which takes them through `decode_other`).
    #[test]
    fn extension_headers_through_decode() {
        for (buf, len) in layouts().into_iter().skip(1) {
            let headers: &[usize] = match len {
                68 => &[56],
                76 => &[56],
                88 => &[56, 76],
                _ => unreachable!(),
            };
            for &at in headers {
                let tag = u16::from_le_bytes([buf[at], buf[at + 1]]);
                let data_len = u16::from_le_bytes([buf[at + 2], buf[at + 3]]);
                let tags = [tag | CRITICAL_BIT, tag ^ 3, 0, 3, 3 | CRITICAL_BIT, 0x7FFF];
                let lens = [data_len, 0, data_len - 1, data_len + 1, 8, 16, u16::MAX];
                for t in tags {
                    for l in lens {
                        let mut bytes = buf;
                        bytes[at..at + 2].copy_from_slice(&t.to_le_bytes());
                        bytes[at + 2..at + 4].copy_from_slice(&l.to_le_bytes());
                        for cut in [len, len + 4, 160] {
                            let mut b = bytes;
                            reseal(&mut b[..cut]);
                            check(&b[..cut]);
                        }
                    }
                }
            }
            // Critical bit on a known tag: still accepted (the general path understands it).
            let mut bytes = buf;
            bytes[57] |= 0x80;
            reseal(&mut bytes[..len]);
            assert!(DeliveryRecord::decode(&bytes[..len]).is_ok());
            assert_eq!(DeliveryRecord::decode_plain(&bytes[..len]), None);
        }
    }

    /// `total_len` up to and past `MAX_RECORD_LEN` with inputs that long (zeros after the
    /// record, and a foreign extension filling the area).
    #[test]
    #[cfg_attr(miri, ignore)] // tens of thousands of cases; the small tests here run under Miri
    fn long_inputs_and_large_totals() {
        let mut big = alloc::vec![0u8; MAX_RECORD_LEN + 64];
        base().encode(&mut big).unwrap();
        for total in [56u32, 57, 4095, 4096, 4097, 4096 + 64, u32::MAX] {
            let mut bytes = big.clone();
            bytes[12..16].copy_from_slice(&total.to_le_bytes());
            for cut in [56, 57, 4095, 4096, 4097, MAX_RECORD_LEN + 64] {
                check(&bytes[..cut]);
                let mut b = bytes.clone();
                reseal(&mut b[..cut]);
                check(&b[..cut]);
            }
        }
        assert_eq!(DeliveryRecord::decode(&big), Ok(base()));
    }

    /// The fixed-size checksum the plain path uses against the bitwise one (and the slice and
    /// word entry points), on arbitrary 48-byte inputs.
    #[test]
    #[cfg_attr(miri, ignore)] // tens of thousands of cases; the small tests here run under Miri
    fn crc_entry_points_agree_with_bitwise() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..20_000 {
            let mut bytes = [0u8; 48];
            for b in &mut bytes {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *b = state as u8;
            }
            let want = bitwise_crc32c(&bytes);
            assert_eq!(crc32c_array(&bytes), want);
            assert_eq!(crc32c(&bytes), want);
            let (words, _) = bytes.as_chunks::<8>();
            let words: [u64; 6] = core::array::from_fn(|i| u64::from_le_bytes(words[i]));
            assert_eq!(super::super::checksum::crc32c_words(&words), want);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]
        /// Random plain records (valid or not in every field), optionally with one byte changed
        /// and resealed, and with random padding: the oracle's verdict, from `decode`.
        #[test]
        #[cfg_attr(miri, ignore)]
        fn random_plain_records_match_the_oracle(
            body in any::<[u8; 40]>(),
            small in any::<bool>(),
            flip in proptest::option::of((0usize..64, any::<u8>())),
            pad in 0usize..9,
            pad_byte in prop_oneof![3 => Just(0u8), 1 => any::<u8>()],
            seal in prop_oneof![4 => Just(true), 1 => Just(false)],
        ) {
            let mut bytes = alloc::vec![0u8; 56 + pad];
            bytes[0..4].copy_from_slice(b"VBDR");
            bytes[8..10].copy_from_slice(&1u16.to_le_bytes());
            bytes[12..16].copy_from_slice(&56u32.to_le_bytes());
            bytes[16..56].copy_from_slice(&body);
            if small {
                // Pull the ranged fields into range most of the time, reserved to zero.
                bytes[40..44].copy_from_slice(&(u32::from(body[0]) * 257).to_le_bytes());
                bytes[48] |= 1;
                bytes[50..56].fill(0);
            }
            if pad > 0 {
                bytes[56 + pad - 1] = pad_byte;
            }
            if let Some((at, v)) = flip
                && let Some(b) = bytes.get_mut(at)
            {
                *b = v;
            }
            if seal {
                let total = 56.min(bytes.len());
                let crc = bitwise_crc32c(&bytes[8..total]);
                bytes[4..8].copy_from_slice(&crc.to_le_bytes());
            }
            check(&bytes);
        }
    }
}

#[cfg(test)]
mod review_codec_tests {
    //! Adversarial review of the sse4.2 encoder (`with_hw` + `put_known`, the inline size probe,
    //! `Put`/`Field`) against the general encoder, deterministically: every layout, every buffer
    //! length 0..=200, several fill bytes, field values at their limits and every invalid
    //! combination; the table instance too; and what is written decodes back.

    use super::*;
    use crate::saved::checksum::tests::bitwise as bitwise_crc32c;
    extern crate alloc;
    use alloc::vec::Vec;

    fn records() -> Vec<DeliveryRecord> {
        let mut out = Vec::new();
        for sequence in [0, 1, u64::MAX] {
            for payload_len in [
                0,
                1,
                MAX_PAYLOAD_LEN - 1,
                MAX_PAYLOAD_LEN,
                MAX_PAYLOAD_LEN + 1,
                u32::MAX,
            ] {
                for attempts in [0, 1, u16::MAX] {
                    for trace_id in [
                        None,
                        Some([0u8; 16]),
                        Some([0xFF; 16]),
                        Some(core::array::from_fn(|i| {
                            (i as u8).wrapping_mul(17).wrapping_add(1)
                        })),
                    ] {
                        for (tag, posted_at, payload_crc) in [
                            (0, 0, 0),
                            (u64::MAX, u64::MAX, u32::MAX),
                            (0x0123_4567_89AB_CDEF, 1, 0x8000_0001),
                        ] {
                            out.push(DeliveryRecord {
                                sequence,
                                tag,
                                posted_at,
                                payload_len,
                                payload_crc,
                                attempts,
                                trace_id,
                            });
                        }
                    }
                }
            }
        }
        out
    }

    #[test]
    #[cfg_attr(miri, ignore)] // ~2.5 M encodes
    fn every_record_length_and_fill_matches_the_general_encoder() {
        const CAP: usize = 200;
        for record in records() {
            for save_id in [None, Some(0), Some(1), Some(u64::MAX)] {
                for len in 0..=CAP {
                    for fill in [0x00u8, 0xFF, 0xA5] {
                        let mut general = [fill; CAP + 8];
                        let g = record.encode_general(save_id, &[], &mut general[..len]);
                        let mut fast = [fill; CAP + 8];
                        let f = record.encode_saved(save_id, &mut fast[..len]);
                        assert_eq!(f, g, "{record:?} {save_id:?} len {len} fill {fill:#x}");
                        assert_eq!(fast, general, "{record:?} {save_id:?} len {len}");
                        let mut table = [fill; CAP + 8];
                        let t = record
                            .put_known_table(save_id, &mut table[..len])
                            .into_result();
                        assert_eq!(t, g, "table {record:?} {save_id:?} len {len}");
                        assert_eq!(table, general, "table {record:?} {save_id:?} len {len}");
                        if let Some(hw) = crate::hwcrc::with_hw(|hw| {
                            let mut buf = [fill; CAP + 8];
                            let r = record.put_known(hw, save_id, &mut buf[..len]).into_result();
                            (r, buf)
                        }) {
                            assert_eq!(hw.0, g);
                            assert_eq!(hw.1, general);
                        }
                        if save_id.is_none() {
                            let mut plain = [fill; CAP + 8];
                            assert_eq!(record.encode(&mut plain[..len]), g);
                            assert_eq!(plain, general);
                            let mut ext = [fill; CAP + 8];
                            assert_eq!(record.encode_with_extensions(&[], &mut ext[..len]), g);
                            assert_eq!(ext, general);
                        }
                        if let Ok(n) = g {
                            assert_eq!(n, record.encoded_len_saved(save_id));
                            // The stored checksum is CRC32C of bytes 8..n (after magic and checksum), bitwise.
                            let stored = u32::from_le_bytes(fast[4..8].try_into().unwrap());
                            assert_eq!(stored, bitwise_crc32c(&fast[8..n]));
                            assert!(fast[n..len].iter().all(|&b| b == 0));
                            assert!(fast[len..].iter().all(|&b| b == fill));
                            assert_eq!(
                                DeliveryRecord::decode_saved(&fast[..len]),
                                Ok((record, save_id))
                            );
                            assert_eq!(DeliveryRecord::decode(&fast[..len]), Ok(record));
                        }
                    }
                }
            }
        }
    }

    /// A checksum off by any one bit is refused by every decoder, for every layout.
    #[test]
    fn any_flipped_checksum_bit_is_refused() {
        let record = DeliveryRecord {
            sequence: 9,
            tag: 8,
            posted_at: 7,
            payload_len: MAX_PAYLOAD_LEN,
            payload_crc: 6,
            attempts: 5,
            trace_id: Some([3; 16]),
        };
        for trace in [false, true] {
            let record = DeliveryRecord {
                trace_id: record.trace_id.filter(|_| trace),
                ..record
            };
            for save_id in [None, Some(42)] {
                let mut buf = [0u8; 96];
                let n = record.encode_saved(save_id, &mut buf).unwrap();
                for bit in 32..64 {
                    let mut bad = buf;
                    bad[bit / 8] ^= 1 << (bit % 8);
                    assert!(
                        DeliveryRecord::decode_saved(&bad[..n]).is_err(),
                        "bit {bit}"
                    );
                    assert!(DeliveryRecord::decode(&bad).is_err(), "bit {bit}");
                }
            }
        }
    }
}
