//! kmcl-sim: a user-mode simulator of the Hyper-V VMBus Kernel Mode Client Library (KMCL) — a
//! faithful, checking implementation of `KMCL_SERVER_INTERFACE_V1`, so a VSP's real code and its
//! real `extern` callbacks run end to end on a development host (Linux included).
//!
//! * [`Kmcl`] is the bus (`\Device\RootVMBus\kmcl_interface`): [`Kmcl::query_interface`] returns
//!   the filled function table exactly as `IRP_MN_QUERY_INTERFACE` would; [`Kmcl::device_object`]
//!   is the `ParentDeviceObject` for `VmbChannelAllocate`.
//! * [`Guest`] is the other end of a channel — and the VM's memory, so it can be migrated between
//!   simulator instances.
//! * [`SimConfig`] holds the undocumented behaviours (docs/kmcl-bindings.md, "Undocumented points") as settings, bounds, and a
//!   [`FaultPlan`].
//! * The verifier records every contract violation as a [`Violation`]; a test ends with
//!   [`Kmcl::assert_no_violations`] (or [`Kmcl::finish`]).
//! * [`current_irql`] is the calling thread's simulated IRQL.
//!
//! The simulator treats every byte the driver sends or saves as opaque: it knows nothing of any
//! VSP's protocol or saved-state format, and depends only on `kmcl-sys` and `kmcl` (never on a
//! VSP crate). The crate README shows how a VSP tests against it. See `docs/simulator.md` for the model and the rules
//! each check enforces.

// Fuzz builds (cargo-fuzz's `--cfg fuzzing`, nightly only) must keep this crate's debug assertions
// and overflow checks: the const below refuses to compile without them (docs/reliability.md F7).
#![cfg_attr(fuzzing, feature(cfg_overflow_checks))]
// UNSAFETY: the simulator is the other side of the FFI boundary: its entry points are `extern`
// functions called through the interface table with raw pointers, and it calls the driver's
// `extern` callbacks. Every block carries a `// SAFETY:` comment.
#![allow(unsafe_code)]

#[cfg(fuzzing)]
const _: () = assert!(
    cfg!(debug_assertions) && cfg!(overflow_checks),
    "fuzz builds keep debug assertions and overflow checks (docs/reliability.md F7)"
);

mod bus;
mod config;
mod container;
mod crc32c;
mod guest;
mod handle;
mod invoke;
mod irql;
mod lock;
mod schedule;
mod state;
mod table;
mod verifier;
mod workers;

pub use bus::{ChannelInfo, Kmcl};
pub use config::{
    CompletionsWhilePaused, DisableRestored, Fault, FaultPlan, IncomingAtSave, KmclCall,
    PacketFailReading, PauseWaits, READINGS, READINGS_ENV, ReadingsError, RestoreSaveBufSize,
    RestoreTiming, RestoredPacketContext, SaveRequires, Schedule, SendVsSuspend, SimConfig,
};
pub use guest::{Guest, GuestChannelState, GuestError, HostPacket, Reply};
pub use irql::{Irql, IrqlGuard, current_irql, raise_irql};
pub use lock::SimSpinLock;
pub use verifier::{Violation, ViolationKind, take_unattributed_violations};

use kmcl_sys::GUID;

/// The interface type GUID the simulator answers for the KMCL server interface: the real, public
/// `KMCL_SERVER_INTERFACE_TYPE` ([`kmcl_sys::KMCL_SERVER_INTERFACE_TYPE`],
/// docs/kmcl-bindings.md "Public identifiers"), so that code written against the simulator asks
/// for exactly what a Windows host is asked for. Any other GUID is refused with
/// `STATUS_NOT_SUPPORTED`.
pub const SIM_KMCL_SERVER_INTERFACE_TYPE: GUID = kmcl_sys::KMCL_SERVER_INTERFACE_TYPE;

/// The interface version the simulator answers: `KMCL_SERVER_INTERFACE_VERSION_V1`
/// ([`kmcl_sys::KMCL_SERVER_INTERFACE_VERSION_V1`]).
pub const SIM_KMCL_SERVER_INTERFACE_VERSION: u16 = kmcl_sys::KMCL_SERVER_INTERFACE_VERSION_V1;
