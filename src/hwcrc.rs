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
//!   there is no run-time detection; the intrinsics still need `unsafe` (three one-instruction
//!   steps, each citing the build's `cfg`). `aarch64-pc-windows-msvc` does not enable `crc` by
//!   default, so a default ARM64 build uses the table. **Type-checked, never run** (`.ci/run`
//!   checks that target with `+crc`; there is no ARM64 CPU here); a driver that wants it at run
//!   time should ask `ExIsProcessorFeaturePresent(PF_ARM_V8_CRC32_INSTRUCTIONS_AVAILABLE)`.
//! * Anything else: always `None`.
//!
//! Short inputs (the 48–100-byte records, and anything under [`LONG`] bytes) are one serial chain
//! of `crc32` instructions, 8 bytes each: its speed is the instruction's latency (3 cycles). From
//! [`LONG`] bytes on (x86-64 only: the stream frames and payloads of up to 64 KiB), the input is
//! cut into groups of three [`BLOCK`]-byte blocks, each block of a group is checksummed as its own
//! chain (three chains in flight hide the latency), and the three results are folded into the
//! running CRC with a *shift operator*: a 4 × 256-entry table, computed at compile time by a
//! `const fn`, that multiplies a CRC register by x^(8·[`BLOCK`]) modulo the polynomial, i.e. feeds
//! it [`BLOCK`] zero bytes. Table lookups and XORs on general-purpose registers: no carry-less
//! multiply (`PCLMULQDQ` would need XMM registers). docs/performance.md §4 has the figures.

/// The block length of the three-stream path: one group is 3 × `BLOCK` bytes.
pub const BLOCK: usize = 256;

/// Inputs of at least this many bytes (one group of three blocks) take the three-stream path of
/// [`crc32c`] on x86-64; shorter ones the serial chain.
pub const LONG: usize = 3 * BLOCK;

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

/// The shift operator of the three-stream path: pure integer arithmetic over GF(2), evaluated at
/// compile time. The CRC register is *reflected*: bit 31 holds the coefficient of x^0, bit 0 that
/// of x^31 (the form the `crc32` instruction and the table both use).
#[cfg(target_arch = "x86_64")]
mod shift {
    /// CRC32C's polynomial `0x1EDC6F41`, reflected (x^32 implied).
    const POLY: u32 = 0x82F6_3B78;

    /// The register times x, modulo the polynomial: one zero bit fed into the CRC.
    const fn times_x(reg: u32) -> u32 {
        if reg & 1 != 0 {
            (reg >> 1) ^ POLY
        } else {
            reg >> 1
        }
    }

    /// `a` × `b` modulo the polynomial (both reflected).
    const fn multiply(a: u32, mut b: u32) -> u32 {
        let mut product = 0;
        let mut bit = 0;
        while bit < 32 {
            // The coefficient of x^bit in `a` (reflected: bit 31 − bit); `b` is b · x^bit here.
            if a & (1 << (31 - bit)) != 0 {
                product ^= b;
            }
            b = times_x(b);
            bit += 1;
        }
        product
    }

    /// x^(8 × `bytes`) modulo the polynomial, by square and multiply.
    const fn x_to_the_bits_of(bytes: usize) -> u32 {
        let mut result = 1 << 31; // x^0
        let mut power = 1 << 30; // x^1, then x^2, x^4, …
        let mut exponent = bytes * 8;
        while exponent != 0 {
            if exponent & 1 != 0 {
                result = multiply(result, power);
            }
            power = multiply(power, power);
            exponent >>= 1;
        }
        result
    }

    /// `table[k][b]` = (b << 8k) × x^(8 × `bytes`): the register (b << 8k) after `bytes` zero
    /// bytes. The operator is linear, so a register's image is the XOR of its four bytes'.
    pub(super) const fn table(bytes: usize) -> [[u32; 256]; 4] {
        let factor = x_to_the_bits_of(bytes);
        let mut table = [[0; 256]; 4];
        let mut k = 0;
        while k < 4 {
            let mut b = 0;
            while b < 256 {
                table[k][b] = multiply(factor, (b as u32) << (8 * k));
                b += 1;
            }
            k += 1;
        }
        table
    }

    /// Feeds [`BLOCK`](super::BLOCK) zero bytes to a CRC register. A `static`, not a `const`, so
    /// that there is one 4 KiB copy; in the image's read-only data (resident in a driver).
    pub(super) static BLOCK_SHIFT: [[u32; 256]; 4] = table(super::BLOCK);

    /// The register `reg` after [`BLOCK`](super::BLOCK) zero bytes: four lookups, three XORs.
    #[inline(always)]
    pub(super) fn block(reg: u32) -> u32 {
        let [b0, b1, b2, b3] = reg.to_le_bytes();
        let [t0, t1, t2, t3] = &BLOCK_SHIFT;
        // A `u8` index into 256 entries: always in bounds (no check is emitted, no panic path).
        t0[usize::from(b0)] ^ t1[usize::from(b1)] ^ t2[usize::from(b2)] ^ t3[usize::from(b3)]
    }
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

    /// The CRC32C register after `bytes` from `crc`, as [`update`] computes it, in three
    /// independent chains: every group of three [`BLOCK`](super::BLOCK)-byte blocks is checksummed
    /// block by block from a zero register, the three chains interleaved, and the results are
    /// folded into the running register with the shift operator
    /// (`reg(s, A‖B) = reg(s, A) · x^(8|B|) ⊕ reg(0, B)`); the bytes after the last whole group
    /// go through [`update`]. The running register is not an input of the chains, so the fold
    /// (three dependent lookups) overlaps the next group's instructions.
    ///
    /// Out of line so that [`update_bytes`]'s short path keeps [`update`]'s code and cost. Like
    /// `update`, it gives the compiler nothing to vectorize: its disassembly for the driver's
    /// target has no XMM/YMM operand and no call (docs/performance.md §4).
    #[inline(never)]
    #[target_feature(enable = "sse4.2")]
    fn update_long(mut crc: u32, bytes: &[u8]) -> u32 {
        let (blocks, rest) = bytes.as_chunks::<{ super::BLOCK }>();
        let (groups, rest_blocks) = blocks.as_chunks::<3>();
        for [a, b, c] in groups {
            // `BLOCK` is a multiple of 8, so each block is exactly `BLOCK / 8` words.
            let (a, _) = a.as_chunks::<8>();
            let (b, _) = b.as_chunks::<8>();
            let (c, _) = c.as_chunks::<8>();
            let (mut crc_a, mut crc_b, mut crc_c) = (0u64, 0u64, 0u64);
            for ((a, b), c) in a.iter().zip(b).zip(c) {
                crc_a = _mm_crc32_u64(crc_a, u64::from_le_bytes(*a));
                crc_b = _mm_crc32_u64(crc_b, u64::from_le_bytes(*b));
                crc_c = _mm_crc32_u64(crc_c, u64::from_le_bytes(*c));
            }
            // Zero-extended 32-bit results, as in `update`.
            crc = super::shift::block(crc) ^ crc_a as u32;
            crc = super::shift::block(crc) ^ crc_b as u32;
            crc = super::shift::block(crc) ^ crc_c as u32;
        }
        // At most two whole blocks (a multiple of 8 bytes), then fewer than `BLOCK` bytes.
        update(update(crc, rest_blocks.as_flattened()), rest)
    }

    /// The CRC32C register after `bytes` from `crc`: [`update`] under [`LONG`](super::LONG)
    /// bytes, [`update_long`] from there on.
    #[target_feature(enable = "sse4.2")]
    fn update_bytes(crc: u32, bytes: &[u8]) -> u32 {
        if bytes.len() < super::LONG {
            update(crc, bytes)
        } else {
            update_long(crc, bytes)
        }
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
        // SAFETY: `update_bytes` only requires the `sse4.2` target feature, i.e. that the `crc32`
        // instruction exists; `available()` just read CPUID.01H:ECX.SSE4_2 = 1 on this CPU.
        let crc = unsafe { update_bytes(!0, bytes) };
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

    /// The three register-level paths, for the tests: `update`, `update_long` and `update_bytes`
    /// on the same input from the same register.
    #[cfg(test)]
    #[target_feature(enable = "sse4.2")]
    fn every_path(crc: u32, bytes: &[u8]) -> [u32; 3] {
        [
            update(crc, bytes),
            update_long(crc, bytes),
            update_bytes(crc, bytes),
        ]
    }

    /// [`every_path`], or `None` without the instruction (no inversions: the raw register).
    #[cfg(test)]
    pub(super) fn registers(crc: u32, bytes: &[u8]) -> Option<[u32; 3]> {
        if !available() {
            return None;
        }
        // SAFETY: as in `crc32c`: `every_path` only requires the `sse4.2` target feature, and
        // `available()` just read CPUID.01H:ECX.SSE4_2 = 1 on this CPU.
        Some(unsafe { every_path(crc, bytes) })
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
    // Type-checked on the development machine and in CI (`.ci/run`: `cargo check --target
    // aarch64-pc-windows-msvc` with `-Ctarget-feature=+crc`), not run: there is no ARM64 CPU
    // here. The build enables the feature, but the intrinsics are `#[target_feature]` functions,
    // which a function without that attribute may only call in `unsafe` (E0133): the three
    // steps below are the only such calls.
    use core::arch::aarch64::{__crc32cb, __crc32cd, __crc32cw};

    #[inline(always)]
    fn step_u64(crc: u32, word: u64) -> u32 {
        // SAFETY: `__crc32cd` only requires the `crc` target feature, which this module's
        // `cfg(target_feature = "crc")` says the whole build enables: every CPU this code can
        // run on has the instruction.
        unsafe { __crc32cd(crc, word) }
    }

    #[inline(always)]
    fn step_u32(crc: u32, word: u32) -> u32 {
        // SAFETY: as in `step_u64`, for `__crc32cw`.
        unsafe { __crc32cw(crc, word) }
    }

    #[inline(always)]
    fn step_u8(crc: u32, byte: u8) -> u32 {
        // SAFETY: as in `step_u64`, for `__crc32cb`.
        unsafe { __crc32cb(crc, byte) }
    }

    pub(super) fn available() -> bool {
        true
    }

    pub(super) fn crc32c(bytes: &[u8]) -> Option<u32> {
        let (words, tail) = bytes.as_chunks::<8>();
        let mut crc = !0u32;
        for word in words {
            crc = step_u64(crc, u64::from_le_bytes(*word));
        }
        for &byte in tail {
            crc = step_u8(crc, byte);
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
        Some(words_with::<N, TAIL>(Token(()), words, tail))
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
            crc = step_u64(crc, word);
        }
        if TAIL {
            crc = step_u32(crc, tail);
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

    /// A fixed pseudo-random byte stream (xorshift64).
    #[cfg(target_arch = "x86_64")]
    fn random_bytes(len: usize, mut state: u64) -> std::vec::Vec<u8> {
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect()
    }

    /// The raw CRC32C register after `bytes` from `reg`, by the `crc` crate's table (which shares
    /// no code with this module): it bit-reverses a custom initial value of a reflected algorithm
    /// and inverts its result, so both are undone.
    #[cfg(target_arch = "x86_64")]
    fn table_register(reg: u32, bytes: &[u8]) -> u32 {
        const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);
        let mut digest = CRC.digest_with_initial(reg.reverse_bits());
        digest.update(bytes);
        !digest.finalize()
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn shift_operator_feeds_block_zero_bytes() {
        // Every single-bit register (the operator's 32 basis vectors), every byte value in each
        // byte position (the table's rows), and random registers.
        let zeros = [0u8; BLOCK];
        let mut regs: std::vec::Vec<u32> = (0..32).map(|bit| 1 << bit).collect();
        regs.extend((0..4).flat_map(|k| (0..=255u32).map(move |b| b << (8 * k))));
        let mut state = 0x0DDB_1A5E_5BAD_5EED_u64;
        regs.extend((0..256).map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 16) as u32
        }));
        regs.extend([0, !0]);
        for reg in regs {
            assert_eq!(
                shift::block(reg),
                table_register(reg, &zeros),
                "register {reg:#010x}"
            );
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_path_from_any_register_on_every_length() {
        if !available() {
            return; // nothing but the table to compare (also under Miri)
        }
        // Lengths 0..=2,100 (every tail, 0–2 leftover blocks, up to two groups of three), from
        // the CRC's initial register and from arbitrary ones (a continued checksum).
        let data = random_bytes(2_100 + 8, 0x2545_F491_4F6C_DD1D);
        let regs = [!0u32, 0, 0x1234_5678, 0xE306_9283];
        for len in 0..=2_100 {
            for (i, &reg) in regs.iter().enumerate() {
                let bytes = &data[i..i + len];
                let expected = table_register(reg, bytes);
                if let Some(paths) = imp::registers(reg, bytes) {
                    assert_eq!(paths, [expected; 3], "register {reg:#x}, {len} bytes");
                }
            }
        }
    }

    /// Lengths on both sides of every boundary of the long path: whole groups (3 × `BLOCK`), one
    /// or two leftover blocks, the word size, `LONG` itself, and 64 KiB (a frame).
    #[cfg(target_arch = "x86_64")]
    fn boundary_lengths() -> std::vec::Vec<usize> {
        let mut lengths = std::vec::Vec::new();
        let groups = (0..=6).chain(84..=86);
        for group in groups {
            for blocks in 0..3 {
                let base = group * LONG + blocks * BLOCK;
                for delta in [-9isize, -8, -7, -1, 0, 1, 7, 8, 9] {
                    if let Some(len) = base.checked_add_signed(delta) {
                        lengths.push(len);
                    }
                }
            }
        }
        lengths.extend([65_536 - 16, 65_536 - 4, 65_536, 65_536 + 4]);
        lengths.sort_unstable();
        lengths.dedup();
        lengths
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn long_path_around_every_boundary_and_split() {
        if !available() {
            return; // nothing but the table to compare (also under Miri)
        }
        let data = random_bytes(86 * LONG + 3 * BLOCK + 16, 0x9E37_79B9_7F4A_7C15);
        for len in boundary_lengths() {
            for offset in [0, 3] {
                let bytes = &data[offset..offset + len];
                let expected = table_register(!0, bytes);
                assert_eq!(
                    crc32c(bytes),
                    Some(!expected),
                    "offset {offset}, {len} bytes"
                );
                // Incremental: the register after a first part continues through the second,
                // split inside a word, at a block edge, after a group, and in the middle.
                let splits = [
                    1,
                    7,
                    BLOCK,
                    LONG,
                    LONG + 5,
                    len / 2,
                    len.saturating_sub(LONG),
                ];
                for split in splits.into_iter().filter(|&split| split <= len) {
                    let (first, second) = bytes.split_at(split);
                    let Some([_, _, after_first]) = imp::registers(!0, first) else {
                        continue;
                    };
                    let Some(paths) = imp::registers(after_first, second) else {
                        continue;
                    };
                    assert_eq!(paths, [expected; 3], "{len} bytes split at {split}");
                }
            }
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

    /// Review: 1 MiB and long random lengths at every start offset 0..8, against the `crc`
    /// crate, and continued registers through many pieces of random size (some straddling
    /// `LONG`, some whole groups).
    #[cfg(target_arch = "x86_64")]
    #[test]
    #[cfg_attr(miri, ignore)]
    fn review_long_inputs_offsets_and_pieces() {
        if !available() {
            return;
        }
        let data = random_bytes((1 << 20) + 16, 0xDEAD_BEEF_CAFE_F00D);
        let mut lengths = std::vec![
            1 << 20,
            (1 << 20) - 1,
            (1 << 20) + 1,
            767,
            768,
            769,
            3 * 768 - 1,
            3 * 768 + 1
        ];
        let mut state = 0x1357_9BDF_2468_ACE0_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..200 {
            lengths.push((next() % 70_000) as usize);
        }
        for &len in &lengths {
            for offset in 0..8 {
                let bytes = &data[offset..offset + len];
                assert_eq!(
                    crc32c(bytes),
                    Some(!table_register(!0, bytes)),
                    "offset {offset}, {len}"
                );
            }
        }
        // Pieces.
        for round in 0..50 {
            let total = (next() % 200_000) as usize;
            let bytes = &data[(round % 8)..(round % 8) + total];
            let expected = table_register(!0, bytes);
            let mut reg = !0u32;
            let mut at = 0;
            while at < total {
                let piece = match next() % 4 {
                    0 => LONG - 1 + (next() % 3) as usize,
                    1 => LONG * (1 + (next() % 5) as usize),
                    2 => (next() % 16) as usize,
                    _ => (next() % 5_000) as usize,
                }
                .min(total - at);
                let [serial, long, both] = imp::registers(reg, &bytes[at..at + piece]).unwrap();
                assert_eq!(serial, long);
                assert_eq!(serial, both);
                reg = both;
                at += piece;
            }
            assert_eq!(reg, expected, "round {round}, {total} bytes");
        }
    }
}
