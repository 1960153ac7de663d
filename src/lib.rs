//! vmbsrv: a Hyper-V host VMBus server (VSP) written as a KMDF driver.
//!
//! This crate is the driver: the service, its saved-state format, its control interface and the
//! KMDF glue. The KMCL bindings it is built on are crates of their own, usable by any Rust VSP,
//! and so is the user-mode KMCL simulator its tests run against. Data flows one way:
//!
//! ```text
//! driver (Windows, KMDF glue) ───┐
//!                                ├─> kmcl (safe KMCL) ─> vsp (the service) ─> saved (durable format)
//! kmcl-sim (user-mode KMCL,      │      └─ kmcl-sys (raw KMCL ABI)
//!           tests only) ─────────┘
//! ```
//!
//! * [`kmcl`] — the `kmcl` crate, re-exported: the validated server interface, thin safe
//!   wrappers and the `extern` callback trampolines; [`kmcl::raw`] is the `kmcl-sys` crate.
//! * [`saved`] — the saved-state record format: pure, allocation-free on encode, no KMCL.
//! * [`vsp`] — the service: guest protocol, delivery table, save/restore callbacks, control requests.
//! * [`fallible`] — allocation that reports failure instead of aborting (from `kmcl`).
//! * [`hwcrc`] — the CPU's CRC32C instruction, with a portable fallback.
//! * `driver` — KMDF glue, compiled only for Windows targets with the `driver` feature.
//!
//! The simulator (`kmcl-sim`) and the end-to-end scenarios (`vmbsrv-testkit`) are
//! dev-dependencies: nothing of them is in this crate or in a driver build.
//!
//! The whole crate is `no_std` + `alloc` on every target, so the code that runs in the kernel is
//! the code the Linux tests run. Outside the Windows driver build, `std` is linked — never
//! imported by the kernel modules — only to give the `cdylib` a panic handler and an allocator.
// Fuzz builds (cargo-fuzz's `--cfg fuzzing`, nightly only) must keep this crate's debug assertions
// and overflow checks: the const below refuses to compile without them (docs/reliability.md F7).
#![cfg_attr(fuzzing, feature(cfg_overflow_checks))]
#![no_std]
// UNSAFETY: the KMDF glue (`driver`, Windows only) calls WDF and the kernel through FFI, and
// [`hwcrc`] calls the CPU's CRC32C intrinsic. `vsp` and `saved` forbid unsafe code.
#![allow(unsafe_code)]

#[cfg(fuzzing)]
const _: () = assert!(
    cfg!(debug_assertions) && cfg!(overflow_checks),
    "fuzz builds keep debug assertions and overflow checks (docs/reliability.md F7)"
);

extern crate alloc;
#[cfg(any(not(all(target_os = "windows", feature = "driver")), test))]
extern crate std;

pub use kmcl;
pub use kmcl::fallible;
pub mod hwcrc;
pub mod saved;
pub mod vsp;

#[cfg(all(target_os = "windows", feature = "driver"))]
mod driver;
