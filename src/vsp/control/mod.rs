//! The control interface: what a host tool asks the driver to do, as IOCTLs.
//!
//! The Windows driver's control queue carries these requests as `METHOD_BUFFERED` IOCTLs on the
//! vmbsrv control device; host tools and tests call the same dispatcher directly. Everything
//! here is platform-neutral (no KMDF, no `unsafe`): the driver only copies buffers, converts the
//! caller's VMBus handle in the caller's process context, and passes the results in.
//!
//! * [`access`] — the access model: [`CallerClass`] and which class may run which operation.
//! * [`codes`] — the IOCTL codes ([`ctl_code`]) and the [`ControlOp`] they name.
//! * [`wire`] — the versioned little-endian request and response layouts.
//! * [`parse`] — validation of untrusted request bytes into a [`parse::Parsed`] request.
//! * [`registry`] — [`RegistryTable`]: bounded channel slots with never-reused ids and owners.
//! * [`dispatch`] — [`ChannelRegistry`]: the live channels and [`ChannelRegistry::dispatch`].
//!
//! `docs/control.md` is the specification (IOCTL table, error rules, save/restore procedure,
//! owner and concurrency rules); this module is its implementation.
//!
//! # Two levels of status
//!
//! A `METHOD_BUFFERED` IOCTL completed with an error status copies no output back, so the
//! interface separates *"was the request understood and answered"* from *"what did the operation
//! do"*:
//!
//! * The IOCTL fails (`DispatchResult::status` is an error, `information` is 0, nothing is
//!   written) only for a request that is wrong independent of any driver state: an unknown code
//!   (`STATUS_INVALID_DEVICE_REQUEST`), a request of another version (`STATUS_REVISION_MISMATCH`),
//!   sizes that disagree (`STATUS_INVALID_BUFFER_SIZE`), a field out of its documented range or a
//!   reserved field not zero (`STATUS_INVALID_PARAMETER`), or an output buffer smaller than the
//!   operation's fixed response (`STATUS_BUFFER_TOO_SMALL`). All of these are decided before
//!   anything happens, so a failed IOCTL never has a side effect.
//! * Otherwise the IOCTL succeeds and the response's `status` field carries the operation's
//!   NTSTATUS (`STATUS_NOT_FOUND` for an unknown or foreign channel id, `STATUS_DEVICE_BUSY` for a
//!   channel that another request is using, `STATUS_INVALID_DEVICE_STATE` for a call in the wrong
//!   phase, a KMCL status, ...). The response's fixed part is always written in full.

pub mod access;
pub mod codes;
pub mod dispatch;
pub mod parse;
pub mod registry;
pub mod wire;

pub use access::{CallerClass, authorize};
pub use codes::{
    ControlOp, FILE_DEVICE_VMBSRV, FILE_READ_DATA, FILE_WRITE_DATA,
    GUID_DEVINTERFACE_VMBSRV_CONTROL, IOCTL_VMBSRV_COMPLETE_MIGRATION, IOCTL_VMBSRV_CREATE_CHANNEL,
    IOCTL_VMBSRV_DESTROY_CHANNEL, IOCTL_VMBSRV_DISABLE_CHANNEL, IOCTL_VMBSRV_FETCH_OUTCOMES,
    IOCTL_VMBSRV_FINISH_RESTORE, IOCTL_VMBSRV_POST_MESSAGE, IOCTL_VMBSRV_QUERY_INFO,
    IOCTL_VMBSRV_QUERY_STATISTICS, IOCTL_VMBSRV_RESTART_INCOMING,
    IOCTL_VMBSRV_RESTORE_CHANNEL_RECORD, IOCTL_VMBSRV_RESTORE_CHUNK, IOCTL_VMBSRV_RESUME,
    IOCTL_VMBSRV_SAVE_BEGIN, IOCTL_VMBSRV_SAVE_CONTINUE, IOCTL_VMBSRV_SAVE_END, METHOD_BUFFERED,
    ctl_code,
};
#[cfg(test)]
pub use dispatch::HostChannelRegistry;
pub use dispatch::{ChannelRegistry, ChannelTable, ControlEnvironment, DispatchResult};
pub use parse::caller_context_vmbus_handle;
pub use registry::{OwnerId, RegistryTable};

use crate::kmcl::NtStatus;

/// The request and response layout version this build speaks (the `version` header field).
pub const CONTROL_VERSION: u16 = 1;

/// Most channels a registry can be created for.
pub const MAX_CHANNELS: u32 = 4096;

/// Largest KMCL chunk carried by `SaveContinue` or `RestoreChunk`: the save stream's
/// [`MAX_FRAME_LEN`](crate::saved::stream::MAX_FRAME_LEN), so every chunk fits one frame.
pub const MAX_CHUNK_LEN: usize = crate::saved::stream::MAX_FRAME_LEN;

/// Largest channel record `RestoreChannelRecord` accepts ([`crate::saved::MAX_RECORD_LEN`]).
pub const MAX_RECORD_LEN: usize = crate::saved::MAX_RECORD_LEN;

/// `STATUS_DEVICE_BUSY` (0x80000011, warning severity): another control request is using the
/// channel right now; retry after it completes. Not in [`NtStatus`]'s list, so defined here.
pub const STATUS_DEVICE_BUSY: NtStatus = NtStatus(0x8000_0011_u32 as i32);
