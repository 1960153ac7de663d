//! Sanitizer canaries: two deliberate bugs, `#[ignore]`d so that no normal run executes them.
//!
//! `scripts/sanitizers.sh` runs each under AddressSanitizer and requires it to be *caught*: a
//! sanitizer run that reports nothing proves something only if the sanitizer demonstrably works
//! in that build (instrumented code, leak checking on at exit).
// UNSAFETY: this test drives the KMCL ABI directly (raw table calls and `extern` callbacks).
#![allow(unsafe_code)]

/// Leaks 4 KiB whose only pointer is lost: LeakSanitizer must report it at exit.
#[test]
#[ignore = "deliberate leak: run only by scripts/sanitizers.sh under LeakSanitizer"]
fn leak_canary() {
    #[inline(never)]
    fn lose(bytes: Vec<u8>) {
        std::mem::forget(std::hint::black_box(bytes));
    }
    lose(vec![0xA5; 4096]);
}

/// Reads one byte past a heap allocation: AddressSanitizer must stop it.
#[test]
#[ignore = "deliberate out-of-bounds read: run only by scripts/sanitizers.sh under AddressSanitizer"]
fn overflow_canary() {
    let bytes = std::hint::black_box(vec![1u8; 16]);
    let past_the_end = bytes.as_ptr().wrapping_add(16);
    // SAFETY: none — this read is out of bounds on purpose. The test is ignored and only ever
    // run under AddressSanitizer, which must abort right here (heap-buffer-overflow).
    let byte = unsafe { past_the_end.read_volatile() };
    std::hint::black_box(byte);
}
