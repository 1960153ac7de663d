//! kmcl: safe Rust over the Hyper-V VMBus Kernel Mode Client Library (KMCL) server interface.
//!
//! * [`ServerInterface`] — the `KMCL_SERVER_INTERFACE_V1` table obtained by interface query,
//!   validated once (size, version, every slot present) before any call;
//! * [`Channel`], [`OwnedChannel`], [`Packet`], [`IncomingPacket`] and friends — thin safe handles
//!   over `VMBCHANNEL`, `VMBPACKET` and `VMBPACKETCOMPLETION`;
//! * the `extern` callback trampolines that connect KMCL to a [`ChannelEvents`] handler;
//! * [`DispatchLock`] — the lock contract (a spin lock that raises IRQL) a VSP's state lives
//!   behind; a driver implements it with a `KSPIN_LOCK`, a simulator with its own model;
//! * [`fallible`] — allocation that reports failure instead of aborting (a bugcheck in a kernel).
//!
//! `no_std` + `alloc`, no dependency beyond [`kmcl_sys`] (re-exported as [`raw`]). It must not
//! depend on any particular VSP, on a simulator, or on the WDK crates: the driver supplies the
//! interface table, and on a development host `kmcl-sim` does.
//!
//! UNSAFETY: this crate is the FFI boundary — it calls through KMCL function pointers and turns
//! KMCL's raw pointers into references in the trampolines. Every block carries a `// SAFETY:`
//! comment naming the invariant it relies on.
// Fuzz builds (cargo-fuzz's `--cfg fuzzing`, nightly only) must keep this crate's debug assertions
// and overflow checks: the const below refuses to compile without them (docs/reliability.md F7).
#![cfg_attr(fuzzing, feature(cfg_overflow_checks))]
#![no_std]
#![allow(unsafe_code)]

#[cfg(fuzzing)]
const _: () = assert!(
    cfg!(debug_assertions) && cfg!(overflow_checks),
    "fuzz builds keep debug assertions and overflow checks (docs/reliability.md F7)"
);

extern crate alloc;

mod callbacks;
mod channel;
pub mod fallible;
mod interface;
pub mod lock;

/// The raw declarations ([`kmcl_sys`]), under the name this crate's users know them by.
pub use kmcl_sys as raw;

pub use callbacks::{ChannelEvents, SavePacketAnswer};
pub use channel::{
    Channel, GuestBytes, IncomingPacket, OwnedChannel, Packet, PacketView, ParentDevice,
    RestoredPacket, SaveChunk, VmbusHandle,
};
pub use interface::{
    InterfaceError, MAX_LEAKED_CHANNELS, SERVER_INTERFACE_V1_SIZE, ServerInterface,
};
pub use kmcl_sys::{NtStatus, Result};
pub use lock::DispatchLock;
