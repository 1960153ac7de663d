//! The KMCL boundary: raw FFI declarations, the validated server interface, safe handle wrappers,
//! and the callback trampolines that connect KMCL to a [`ChannelEvents`] handler.
//!
//! With `driver` and `sim`, this is the only module tree that holds `unsafe`; every block
//! carries a `// SAFETY:` comment naming the invariant it relies on.

pub(crate) mod abi;
mod callbacks;
mod channel;
mod interface;
pub mod raw;
mod status;

pub use callbacks::{ChannelEvents, SavePacketAnswer};
pub use channel::{
    Channel, GuestBytes, IncomingPacket, OwnedChannel, Packet, PacketView, ParentDevice,
    RestoredPacket, SaveChunk, VmbusHandle,
};
pub use interface::{
    InterfaceError, MAX_LEAKED_CHANNELS, SERVER_INTERFACE_V1_SIZE, ServerInterface,
};
pub use status::{NtStatus, Result};
