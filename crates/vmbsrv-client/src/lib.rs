//! User-mode client of vmbsrv's control interface (docs/control.md).
//!
//! [`Client`] sends every control request as typed calls over a [`Transport`]:
//!
//! * `windows::DeviceTransport` (Windows only): `DeviceIoControl` on the vmbsrv control device,
//!   found through its device interface class
//!   [`GUID_DEVINTERFACE_VMBSRV_CONTROL`](vmbsrv::vsp::control::GUID_DEVINTERFACE_VMBSRV_CONTROL).
//! * [`sim::SimHost`] (feature `sim`, any platform): vmbsrv's own dispatcher
//!   (`ChannelRegistry::dispatch`) over the KMCL simulator with a guest that speaks the vmbsrv
//!   protocol, the path `tests/control_e2e.rs` drives.
//!
//! The request and response layouts, the IOCTL codes and the save-stream codec are vmbsrv's own
//! (`vmbsrv::vsp::control::wire`, `codes`, `vmbsrv::saved::stream`): nothing is redefined here.
//!
//! [`inspect`] decodes a save-stream file for humans and tools, on any platform, and never
//! panics on any input.
//!
//! `unsafe` is denied crate-wide (workspace lints) and allowed only in the `windows` module, at
//! the FFI edge (`DeviceIoControl`, `CreateFileW`, the configuration manager).

// Fuzz builds (cargo-fuzz's `--cfg fuzzing`, nightly only) must keep this crate's debug assertions
// and overflow checks: the const below refuses to compile without them (docs/reliability.md F7).
#![cfg_attr(fuzzing, feature(cfg_overflow_checks))]

#[cfg(fuzzing)]
const _: () = assert!(
    cfg!(debug_assertions) && cfg!(overflow_checks),
    "fuzz builds keep debug assertions and overflow checks (docs/reliability.md F7)"
);

pub mod inspect;
#[cfg(feature = "sim")]
pub mod sim;
#[cfg(windows)]
pub mod windows;

mod client;
mod error;

pub use client::{
    ChannelConfig, Client, CreateMode, DestroyReport, Info, OutcomeKindName, OutcomeRecord,
    Outcomes, Phase, PostOptions, Progress, RestoreReport, SaveReport, Statistics,
};
pub use error::{Error, Failure, status_name};

pub use vmbsrv::kmcl::NtStatus;
pub use vmbsrv::vsp::control::ControlOp;

/// How requests reach the driver.
///
/// `ioctl` sends one `METHOD_BUFFERED` request: `input` is the whole request, `output` the buffer
/// the response is written to. It returns how many bytes of `output` were written (the IOCTL's
/// `Information`), or the IOCTL's own failure status (docs/control.md §3: the request was
/// refused before the driver did anything, and nothing was written).
pub trait Transport {
    /// Sends one IOCTL.
    fn ioctl(&mut self, code: u32, input: &[u8], output: &mut [u8]) -> Result<usize, IoctlError>;
}

/// Why an IOCTL itself failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoctlError {
    /// The driver (or the I/O manager) refused the IOCTL with this status.
    Status(NtStatus),
    /// The transport could not deliver the request (a Win32 error code and its text).
    Transport {
        /// Win32 error code, 0 if none.
        code: u32,
        /// What happened.
        message: String,
    },
}

/// A GUID in its Windows in-memory form (vmbsrv's KMCL binding type).
pub use vmbsrv::kmcl::raw::GUID as Guid;

/// The channel interface type vmbsrvctl offers by default: the test value of the simulator
/// scenarios (`vmbsrv_testkit::migration::SCENARIO_INTERFACE_TYPE`, checked equal by a test), which
/// the simulated guest binds to. Not a product interface.
pub const TEST_INTERFACE_TYPE: Guid = Guid {
    Data1: 0x7673_6d62,
    Data2: 0x0001,
    Data3: 0x4000,
    Data4: *b"vmbsrvT1",
};

/// The channel instance vmbsrvctl offers by default (the scenarios' `SCENARIO_INSTANCE`).
pub const TEST_INSTANCE: Guid = Guid {
    Data1: 0x7673_6d62,
    Data2: 0x0002,
    Data3: 0x4000,
    Data4: *b"vmbsrvI1",
};
