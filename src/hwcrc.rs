//! CRC32C in hardware, behind a safe function that says `None` when the CPU cannot do it.
//!
//! [`crate::saved`] checksums every saved-state record with CRC32C and falls back to its portable
//! table when [`crc32c`] returns `None`; the two must agree bit for bit (tested in
//! `saved::checksum`). Why a hardware path at all, and why it is acceptable in kernel code, is in
//! docs/performance.md §4. In short:
//!
//! * **x86-64**: the SSE4.2 `crc32` instruction. Despite the "SSE" in the name it reads and
//!   writes **general-purpose registers only** (`crc32 r64, r/m64`), so no XMM/YMM state is
//!   touched and no `KeSaveExtendedProcessorState` is needed at any IRQL. Its presence is
//!   detected once with `CPUID` (leaf 1, `ECX` bit 20) — `no_std` has no
//!   `is_x86_feature_detected!` — and the answer is cached in an atomic. The instruction needs no
//!   OS support (no `XSAVE` state), only the CPUID bit, so the bit alone decides.
//! * **aarch64**: the ARMv8 `crc32c{b,d}` instructions (also general-purpose registers only), used
//!   only when the build enables the `crc` target feature (e.g. `-C target-feature=+crc`), so
//!   there is no run-time detection and no `unsafe` on that path. `aarch64-pc-windows-msvc` does
//!   not enable `crc` by default, so a default ARM64 build uses the table. **Not compiled or
//!   tested here** (this machine has no aarch64 standard library); a driver that wants it at run
//!   time should ask `ExIsProcessorFeaturePresent(PF_ARM_V8_CRC32_INSTRUCTIONS_AVAILABLE)`.
//! * Anything else: always `None`.
//!
//! One stream, 8 bytes per instruction. Interleaving three streams (the usual trick to hide the
//! instruction's 3-cycle latency) needs a combine step and only pays off on inputs of hundreds of
//! bytes; the records this checksums are 48–100 bytes, so it is not done.

/// Whether [`crc32c`] uses a hardware instruction on this CPU (detected once, then cached).
pub fn available() -> bool {
    imp::available()
}

/// CRC32C (Castagnoli, reflected, init and final XOR `0xFFFF_FFFF`) of `bytes` computed with the
/// CPU's CRC32C instruction, or `None` if this CPU or build has none.
///
/// `crc32c(b"123456789")` is `Some(0xE306_9283)` or `None`.
#[inline]
pub fn crc32c(bytes: &[u8]) -> Option<u32> {
    imp::crc32c(bytes)
}

/// CRC32C of the little-endian bytes of `words` (8 × `N` bytes), or `None` without a hardware
/// instruction: the fixed-size entry point of the saved-state records' hot paths, which build
/// their covered bytes as words in registers. No length dispatch: one small out-of-line call of
/// `N` `crc32` instructions.
///
/// `crc32c_words(&[u64::from_le_bytes(*b"12345678")])` equals `crc32c(b"12345678")`.
#[inline]
pub fn crc32c_words<const N: usize>(words: &[u64; N]) -> Option<u32> {
    imp::crc32c_words::<N, false>(words, 0)
}

/// Like [`crc32c_words`], followed by the 4 little-endian bytes of `tail`: CRC32C of
/// 8 × `N` + 4 bytes.
#[inline]
pub fn crc32c_words_u32<const N: usize>(words: &[u64; N], tail: u32) -> Option<u32> {
    imp::crc32c_words::<N, true>(words, tail)
}

/// CRC32C of a fixed-size array, or `None` without a hardware instruction: the decoders' entry
/// point, which checksums the input where it lies (no copy, no length dispatch).
#[inline]
pub fn crc32c_array<const N: usize>(bytes: &[u8; N]) -> Option<u32> {
    imp::crc32c_array(bytes)
}

/// Proof that this CPU has a CRC32C instruction: only [`with_hw`] makes one, and only after the
/// detection said yes (a copy that escapes `f` stays a valid proof). Its steps are meant to be inlined into the function `with_hw` runs, which
/// is compiled with the instruction enabled: the words stay in registers and the `crc32`
/// instructions sit among the caller's own code (no call, no stack array).
#[derive(Clone, Copy)]
pub struct Hw(imp::Token);

impl Hw {
    /// The finished CRC32C (inversions included) of the little-endian bytes of `words`, then of
    /// `tail` if `TAIL`: `N` (+1) `crc32` instructions once inlined into [`with_hw`]'s function
    /// (a call of them anywhere else).
    #[inline(always)]
    pub fn crc32c_words<const N: usize, const TAIL: bool>(
        self,
        words: &[u64; N],
        tail: u32,
    ) -> u32 {
        imp::words_with::<N, TAIL>(self.0, words, tail)
    }
}

/// Runs `f` inside a function compiled with the CPU's CRC32C instruction enabled and returns its
/// result, or `None` (without calling `f`) if this CPU or build has no such instruction. One
/// out-of-line call of that function with `f` inlined into it; its result comes back in
/// registers when it is small enough.
#[inline]
pub fn with_hw<R>(f: impl FnOnce(Hw) -> R) -> Option<R> {
    imp::with_hw(f)
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use core::arch::x86_64::{__cpuid, _mm_crc32_u8, _mm_crc32_u32, _mm_crc32_u64};
    use core::sync::atomic::{AtomicU8, Ordering};

    const UNKNOWN: u8 = 0;
    const ABSENT: u8 = 1;
    const PRESENT: u8 = 2;

    /// The cached CPUID answer. Every core of a system reports the same feature set, so a race
    /// between two first callers only runs CPUID twice; `Relaxed` is enough because the value is
    /// the same whoever stores it and guards no other memory.
    static SSE42: AtomicU8 = AtomicU8::new(UNKNOWN);

    /// `CPUID.01H:ECX.SSE4_2[bit 20]`: the `crc32` instruction exists.
    const ECX_SSE42: u32 = 1 << 20;

    #[cold]
    fn detect() -> bool {
        // Miri cannot execute CPUID (inline assembly); the table path is exact, so use it there.
        if cfg!(miri) {
            SSE42.store(ABSENT, Ordering::Relaxed);
            return false;
        }
        // Leaf 1 exists on every x86-64 CPU. Under a hypervisor CPUID is a VM exit, which is
        // why the answer is cached.
        let present = __cpuid(1).ecx & ECX_SSE42 != 0;
        SSE42.store(if present { PRESENT } else { ABSENT }, Ordering::Relaxed);
        present
    }

    pub(super) fn available() -> bool {
        match SSE42.load(Ordering::Relaxed) {
            PRESENT => true,
            ABSENT => false,
            _ => detect(),
        }
    }

    /// The CRC32C register after `bytes`, starting from `crc` (no pre/post inversion).
    ///
    /// Kept tiny on purpose: enabling `sse4.2` would allow the compiler to use XMM registers for
    /// other work in this function; a serial loop of `crc32` instructions gives it none to do
    /// (docs/performance.md §4 shows the disassembly check).
    #[target_feature(enable = "sse4.2")]
    fn update(crc: u32, bytes: &[u8]) -> u32 {
        let (words, tail) = bytes.as_chunks::<8>();
        let mut wide = u64::from(crc);
        for word in words {
            wide = _mm_crc32_u64(wide, u64::from_le_bytes(*word));
        }
        // The instruction zero-extends its 32-bit result, so the upper half is always 0.
        let mut crc = wide as u32;
        for &byte in tail {
            crc = _mm_crc32_u8(crc, byte);
        }
        crc
    }

    /// The finished CRC32C (inversions included) of `words`, then of `tail` if `TAIL`. Fixed
    /// size: the loop is unrolled into `N` (+1) `crc32` instructions, nothing else. Inlined into
    /// [`run`]; a call everywhere else.
    #[target_feature(enable = "sse4.2")]
    #[inline]
    fn update_words<const N: usize, const TAIL: bool>(words: &[u64; N], tail: u32) -> u32 {
        let mut wide = u64::from(!0u32);
        for &word in words {
            wide = _mm_crc32_u64(wide, word);
        }
        // Zero-extended 32-bit result, as in `update`.
        let mut crc = wide as u32;
        if TAIL {
            crc = _mm_crc32_u32(crc, tail);
        }
        !crc
    }

    pub(super) fn crc32c(bytes: &[u8]) -> Option<u32> {
        if !available() {
            return None;
        }
        // SAFETY: `update` only requires the `sse4.2` target feature, i.e. that the `crc32`
        // instruction exists; `available()` just read CPUID.01H:ECX.SSE4_2 = 1 on this CPU.
        let crc = unsafe { update(!0, bytes) };
        Some(!crc)
    }

    /// The finished CRC32C of a fixed-size array: the same loop as `update`, unrolled for `N`.
    #[target_feature(enable = "sse4.2")]
    fn update_array<const N: usize>(bytes: &[u8; N]) -> u32 {
        !update(!0, bytes)
    }

    #[inline]
    pub(super) fn crc32c_array<const N: usize>(bytes: &[u8; N]) -> Option<u32> {
        if !available() {
            return None;
        }
        // SAFETY: as in `crc32c`: `update_array` only requires the `sse4.2` target feature, and
        // `available()` just read CPUID.01H:ECX.SSE4_2 = 1 on this CPU.
        Some(unsafe { update_array(bytes) })
    }

    #[inline]
    pub(super) fn crc32c_words<const N: usize, const TAIL: bool>(
        words: &[u64; N],
        tail: u32,
    ) -> Option<u32> {
        if !available() {
            return None;
        }
        // SAFETY: as in `crc32c`: `update_words` only requires the `sse4.2` target feature, and
        // `available()` just read CPUID.01H:ECX.SSE4_2 = 1 on this CPU.
        Some(unsafe { update_words::<N, TAIL>(words, tail) })
    }

    /// What a [`super::Hw`] holds: made only in [`run`], which only `with_hw` calls, after
    /// `available()` said yes. So a `Token`, wherever it is used, proves this CPU has `crc32`.
    #[derive(Clone, Copy)]
    pub(super) struct Token(());

    #[inline(always)]
    pub(super) fn words_with<const N: usize, const TAIL: bool>(
        _token: Token,
        words: &[u64; N],
        tail: u32,
    ) -> u32 {
        // SAFETY: `update_words` only requires the `sse4.2` target feature. A `Token` is made
        // only in `run`, which `with_hw` calls only after `available()` read
        // CPUID.01H:ECX.SSE4_2 = 1 on this CPU.
        unsafe { update_words::<N, TAIL>(words, tail) }
    }

    /// `f` compiled with `sse4.2` enabled (inlined here, so `words_with` inlines its `crc32`s).
    /// Unlike `update`, this compiles the caller's own code with the feature too; SSE4.2 adds no
    /// register state, and docs/performance.md §4's disassembly check (command 6 of §7) finds
    /// no `%xmm` operand in the only instance, `DeliveryRecord`'s encoder.
    #[target_feature(enable = "sse4.2")]
    fn run<R>(f: impl FnOnce(super::Hw) -> R) -> R {
        f(super::Hw(Token(())))
    }

    #[inline]
    pub(super) fn with_hw<R>(f: impl FnOnce(super::Hw) -> R) -> Option<R> {
        if !available() {
            return None;
        }
        // SAFETY: `run` only requires the `sse4.2` target feature, and `available()` just read
        // CPUID.01H:ECX.SSE4_2 = 1 on this CPU.
        Some(unsafe { run(f) })
    }
}

#[cfg(all(target_arch = "aarch64", target_feature = "crc"))]
mod imp {
    // Not compiled on the development machine (no aarch64 standard library there): see the
    // module documentation. The build guarantees the feature, so every call here is safe.
    use core::arch::aarch64::{__crc32cb, __crc32cd, __crc32cw};

    pub(super) fn available() -> bool {
        true
    }

    pub(super) fn crc32c(bytes: &[u8]) -> Option<u32> {
        let (words, tail) = bytes.as_chunks::<8>();
        let mut crc = !0u32;
        for word in words {
            crc = __crc32cd(crc, u64::from_le_bytes(*word));
        }
        for &byte in tail {
            crc = __crc32cb(crc, byte);
        }
        Some(!crc)
    }

    #[inline]
    pub(super) fn crc32c_array<const N: usize>(bytes: &[u8; N]) -> Option<u32> {
        crc32c(bytes)
    }

    #[inline]
    pub(super) fn crc32c_words<const N: usize, const TAIL: bool>(
        words: &[u64; N],
        tail: u32,
    ) -> Option<u32> {
        let mut crc = !0u32;
        for &word in words {
            crc = __crc32cd(crc, word);
        }
        if TAIL {
            crc = __crc32cw(crc, tail);
        }
        Some(!crc)
    }

    /// What a [`super::Hw`] holds; the build guarantees the instructions.
    #[derive(Clone, Copy)]
    pub(super) struct Token(());

    #[inline(always)]
    pub(super) fn words_with<const N: usize, const TAIL: bool>(
        _token: Token,
        words: &[u64; N],
        tail: u32,
    ) -> u32 {
        let mut crc = !0u32;
        for &word in words {
            crc = __crc32cd(crc, word);
        }
        if TAIL {
            crc = __crc32cw(crc, tail);
        }
        !crc
    }

    #[inline]
    pub(super) fn with_hw<R>(f: impl FnOnce(super::Hw) -> R) -> Option<R> {
        Some(f(super::Hw(Token(()))))
    }
}

#[cfg(not(any(
    target_arch = "x86_64",
    all(target_arch = "aarch64", target_feature = "crc")
)))]
mod imp {
    pub(super) fn available() -> bool {
        false
    }

    pub(super) fn crc32c(_bytes: &[u8]) -> Option<u32> {
        None
    }

    pub(super) fn crc32c_words<const N: usize, const TAIL: bool>(
        _words: &[u64; N],
        _tail: u32,
    ) -> Option<u32> {
        None
    }

    pub(super) fn crc32c_array<const N: usize>(_bytes: &[u8; N]) -> Option<u32> {
        None
    }

    /// No instruction, so no [`super::Hw`] can exist.
    #[derive(Clone, Copy)]
    pub(super) enum Token {}

    pub(super) fn words_with<const N: usize, const TAIL: bool>(
        token: Token,
        _words: &[u64; N],
        _tail: u32,
    ) -> u32 {
        match token {}
    }

    pub(super) fn with_hw<R>(_f: impl FnOnce(super::Hw) -> R) -> Option<R> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_value_when_present() {
        // This machine's CPU decides which branch runs; docs/performance.md records which.
        match crc32c(b"123456789") {
            Some(crc) => {
                assert!(available());
                assert_eq!(crc, 0xE306_9283);
            }
            None => assert!(!available()),
        }
    }

    #[test]
    fn word_entry_points_match_the_byte_one() {
        let mut state = 0x2545_F491_4F6C_DD1D_u64;
        let words: [u64; 12] = core::array::from_fn(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        });
        let bytes = words.map(u64::to_le_bytes);
        let bytes = bytes.as_flattened();
        let tail = 0xA5C3_0F1E_u32;
        let mut with_tail = [0u8; 100];
        with_tail[..96].copy_from_slice(bytes);
        with_tail[96..].copy_from_slice(&tail.to_le_bytes());
        fn check<const N: usize>(words: &[u64; 12], bytes: &[u8], tail: u32, with_tail: &[u8]) {
            let head: &[u64; N] = words.first_chunk().unwrap();
            assert_eq!(crc32c_words(head), crc32c(&bytes[..8 * N]), "{N} words");
            let array: &[u8; N] = bytes.first_chunk().unwrap();
            assert_eq!(crc32c_array(array), crc32c(&bytes[..N]), "{N} bytes");
            let mut tailed = [0u8; 100];
            tailed[..8 * N].copy_from_slice(&bytes[..8 * N]);
            tailed[8 * N..8 * N + 4].copy_from_slice(&tail.to_le_bytes());
            assert_eq!(
                crc32c_words_u32(head, tail),
                crc32c(&tailed[..8 * N + 4]),
                "{N} words + 4 bytes"
            );
            if N == 12 {
                assert_eq!(crc32c_words_u32(head, tail), crc32c(with_tail));
            }
        }
        check::<0>(&words, bytes, tail, &with_tail);
        check::<1>(&words, bytes, tail, &with_tail);
        check::<6>(&words, bytes, tail, &with_tail);
        check::<7>(&words, bytes, tail, &with_tail);
        check::<8>(&words, bytes, tail, &with_tail);
        check::<10>(&words, bytes, tail, &with_tail);
        check::<12>(&words, bytes, tail, &with_tail);
        if available() {
            assert_eq!(
                crc32c_words(&[u64::from_le_bytes(*b"12345678")]),
                crc32c(b"12345678")
            );
            assert!(crc32c_words(&[0u64; 6]).is_some());
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn detection_is_cached_and_stable() {
        let first = available();
        for _ in 0..4 {
            assert_eq!(available(), first);
        }
    }
}
