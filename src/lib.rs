//! vmbsrv: a Hyper-V host VMBus server (VSP) written as a KMDF driver.
//!
//! The crate is laid out by concern, and data flows one way:
//!
//! ```text
//! driver (Windows, KMDF glue) ─┐
//!                              ├─> kmcl (FFI boundary) ─> vsp (the service) ─> saved (durable format)
//! sim (user-mode KMCL, tests) ─┘
//! ```
//!
//! * [`kmcl`] — the VMBus Kernel Mode Client Library boundary: hand-written `#[repr(C)]` tables,
//!   thin safe wrappers, and the `extern` callback trampolines. With `driver`, `sim` and the one
//!   intrinsic call in [`hwcrc`] (the CPU's CRC32C instruction), the only place that holds
//!   `unsafe`.
//! * [`saved`] — the saved-state record format: pure, allocation-free on encode, no KMCL.
//! * [`vsp`] — the service: guest protocol, delivery table, save/restore callbacks, control requests.
//! * [`fallible`] — allocation that reports failure instead of aborting (a bugcheck in a driver).
//! * `driver` — KMDF glue, compiled only for Windows targets with the `driver` feature.
//! * `sim` — a user-mode KMCL implementing the same function table (feature `sim`).
//! * `scenario` — end-to-end scenarios over the simulator: a guest model and the exactly-once
//!   ledger (feature `sim`).
//!
//! The whole crate is `no_std` + `alloc` on every target, so the code that runs in the kernel is
//! the code the Linux tests run. Outside the Windows driver build, `std` is linked — never
//! imported by the kernel modules — only to give the `cdylib` a panic handler and an allocator,
//! and for the simulator.
#![no_std]

extern crate alloc;
#[cfg(any(
    not(all(target_os = "windows", feature = "driver")),
    test,
    feature = "std"
))]
extern crate std;

pub mod fallible;
pub mod hwcrc;
pub mod kmcl;
pub mod saved;
pub mod vsp;

#[cfg(all(target_os = "windows", feature = "driver"))]
mod driver;

#[cfg(feature = "sim")]
pub mod sim;

#[cfg(feature = "sim")]
pub mod scenario;
