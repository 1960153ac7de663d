//! A user-mode KMCL simulator (feature `sim`): a faithful, checking implementation of
//! `KMCL_SERVER_INTERFACE_V1` so the real driver code runs end to end on Linux.
//!
//! * [`Kmcl`] is the bus (`\Device\RootVMBus\kmcl_interface`): [`Kmcl::query_interface`] returns
//!   the filled function table exactly as `IRP_MN_QUERY_INTERFACE` would; [`Kmcl::device_object`]
//!   is the `ParentDeviceObject` for `VmbChannelAllocate`.
//! * [`Guest`] is the other end of a channel — and the VM's memory, so it can be migrated between
//!   simulator instances.
//! * [`SimConfig`] holds the undocumented behaviours (kmcl-reference §7) as settings, bounds, and a
//!   [`FaultPlan`].
//! * The verifier records every contract violation as a [`Violation`]; a test ends with
//!   [`Kmcl::assert_no_violations`] (or [`Kmcl::finish`]).
//! * [`current_irql`] is the calling thread's simulated IRQL.
//!
//! The simulator treats every byte the driver sends or saves as opaque: it knows nothing of
//! vmbsrv's protocol or saved-state format. See `docs/simulator.md` for the model and the rules
//! each check enforces.

mod bus;
mod config;
mod container;
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

use crate::kmcl::raw::GUID;

/// The interface type GUID the **simulator** answers for the KMCL server interface.
///
/// This is a simulator-only value, made up for this crate (`{5e3b0c1a-7f64-4d2e-9a51-53494d4b4d43}`,
/// the last bytes spell "SIMKMC"). It is **not** the real `KMCL_SERVER_INTERFACE_TYPE`, whose value
/// is not public (kmcl-reference §7.1): a Windows build must take that from the WDK header.
pub const SIM_KMCL_SERVER_INTERFACE_TYPE: GUID = GUID {
    Data1: 0x5e3b_0c1a,
    Data2: 0x7f64,
    Data3: 0x4d2e,
    Data4: [0x9a, 0x51, 0x53, 0x49, 0x4d, 0x4b, 0x4d, 0x43],
};

/// The interface version the simulator answers (`KMCL_SERVER_INTERFACE_VERSION_V1` is very likely
/// 1, kmcl-reference §1.6).
pub const SIM_KMCL_SERVER_INTERFACE_VERSION: u16 = 1;
