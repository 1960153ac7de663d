//! The queried server interface: validation on arrival, one dereference on drop.

use core::mem::size_of;
use core::ptr;
use core::sync::atomic::{AtomicPtr, AtomicU32, Ordering};

use super::NtStatus;
use super::raw::{
    KMCL_SERVER_INTERFACE_V1, PFN_VMB_CHANNEL_GET_POINTER, PFN_VMB_PACKET_GET_CHANNEL, VMBCHANNEL,
    VMBPACKET,
};

/// `sizeof(KMCL_SERVER_INTERFACE_V1)` as the query's `USHORT Size` argument.
pub const SERVER_INTERFACE_V1_SIZE: u16 = {
    assert!(size_of::<KMCL_SERVER_INTERFACE_V1>() <= u16::MAX as usize);
    size_of::<KMCL_SERVER_INTERFACE_V1>() as u16
};

/// One slot of the table that vmbsrv calls, by name, so a refusal can say which one was missing.
struct RequiredSlot {
    name: &'static str,
    present: fn(&KMCL_SERVER_INTERFACE_V1) -> bool,
}

macro_rules! required_slots {
    ($($part:ident . $slot:ident),* $(,)?) => {
        &[$(RequiredSlot { name: stringify!($slot), present: |t| t.$part.$slot.is_some() }),*]
    };
}

/// Every entry point vmbsrv calls. A provider whose table lacks one is refused up front, so no
/// call site has to cope with a missing function later.
const REQUIRED_SLOTS: &[RequiredSlot] = required_slots![
    Client.VmbChannelAllocate,
    Client.VmbChannelCleanup,
    Client.VmbChannelDisable,
    Client.VmbChannelEnable,
    Client.VmbChannelGetPointer,
    Client.VmbChannelInitSetFriendlyName,
    Client.VmbChannelInitSetMaximumPacketSize,
    Client.VmbChannelInitSetProcessPacketCallbacks,
    Client.VmbChannelInitSetStateChangeCallbacks,
    Client.VmbChannelPacketComplete,
    Client.VmbChannelPacketFail,
    Client.VmbChannelPause,
    Client.VmbChannelSetPointer,
    Client.VmbChannelStart,
    Client.VmbPacketAllocate,
    Client.VmbPacketFree,
    Client.VmbPacketGetChannel,
    Client.VmbPacketGetPointer,
    Client.VmbPacketSend,
    Client.VmbPacketSetCompletionRoutine,
    Client.VmbPacketSetPointer,
    Server.VmbChannelRestoreFromBuffer,
    Server.VmbChannelSaveBegin,
    Server.VmbChannelSaveContinue,
    Server.VmbChannelSaveEnd,
    Server.VmbConvertVmbusHandleToKernelHandle,
    Server.VmbPacketRestore,
    Server.VmbServerChannelInitSetFlags,
    Server.VmbServerChannelInitSetSaveRestorePacketCallbacks,
    Server.VmbServerChannelInitSetTargetInterfaceId,
    Server.VmbServerChannelInitSetVmbusHandle,
];

/// Why a queried table was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterfaceError {
    /// `INTERFACE.Size` is not `sizeof(KMCL_SERVER_INTERFACE_V1)`.
    WrongSize {
        /// What the provider wrote.
        found: u16,
    },
    /// `INTERFACE.Version` is not the version that was asked for.
    WrongVersion {
        /// What the provider wrote.
        found: u16,
    },
    /// An entry point vmbsrv calls is NULL.
    MissingSlot {
        /// The member name in the C header.
        name: &'static str,
    },
    /// The header has no `InterfaceDereference`, so the reference could never be returned.
    NoDereference,
    /// The handle accessors differ from those of a table already in use (see `callback_accessors`).
    AccessorMismatch,
}

impl InterfaceError {
    /// The status a failed interface acquisition reports.
    pub const fn status(self) -> NtStatus {
        match self {
            Self::WrongSize { .. } | Self::WrongVersion { .. } => NtStatus::REVISION_MISMATCH,
            Self::MissingSlot { .. } | Self::NoDereference => NtStatus::NOT_SUPPORTED,
            Self::AccessorMismatch => NtStatus::INVALID_DEVICE_STATE,
        }
    }
}

/// The KMCL server interface this driver holds one reference on.
///
/// # Invariants
/// * Every slot in `REQUIRED_SLOTS` is non-NULL, as is `Interface.InterfaceDereference`.
/// * The reference taken by the query is released exactly once, in `Drop`.
pub struct ServerInterface {
    table: KMCL_SERVER_INTERFACE_V1,
    /// Channels whose context teardown had to keep (see `OwnedChannel`).
    leaked_channels: AtomicU32,
}

/// At most this many channels may be kept by teardown (each keeps its context after giving back
/// its large allocations, [`ChannelEvents::shed_memory`](super::ChannelEvents::shed_memory): a few
/// hundred bytes); past it, new channels are refused with `STATUS_INSUFFICIENT_RESOURCES`, so a
/// client that makes restores fail again and again cannot exhaust the pool — it needs 4,096
/// failed restores, under a library that never returns restored packets, to reach the bound.
pub const MAX_LEAKED_CHANNELS: u32 = 4096;

// SAFETY: the table holds function pointers and the provider's opaque `Context`. KMCL entry points
// are callable from any thread (they are called from DPCs and worker threads alike), and `Context`
// is only ever handed back to the provider's own reference functions.
unsafe impl Send for ServerInterface {}
// SAFETY: as above; `ServerInterface` has no interior mutability of its own.
unsafe impl Sync for ServerInterface {}

impl ServerInterface {
    /// Takes over the reference held by a freshly queried table and validates it.
    ///
    /// On refusal the reference is still released (exactly once), so the caller never has to.
    pub fn from_queried(
        table: KMCL_SERVER_INTERFACE_V1,
        requested_version: u16,
    ) -> Result<Self, InterfaceError> {
        let header = table.Client.Interface;
        let Some(_) = header.InterfaceDereference else {
            // Nothing can be released without a dereference routine.
            return Err(InterfaceError::NoDereference);
        };
        // From here on `Drop` releases the reference, whatever the verdict.
        let interface = Self {
            table,
            leaked_channels: AtomicU32::new(0),
        };
        if header.Size != SERVER_INTERFACE_V1_SIZE {
            return Err(InterfaceError::WrongSize { found: header.Size });
        }
        if header.Version != requested_version {
            return Err(InterfaceError::WrongVersion {
                found: header.Version,
            });
        }
        if let Some(missing) = REQUIRED_SLOTS
            .iter()
            .find(|slot| !(slot.present)(&interface.table))
        {
            return Err(InterfaceError::MissingSlot { name: missing.name });
        }
        register_callback_accessors(&interface.table)?;
        Ok(interface)
    }

    /// The validated table, for the wrappers in this module tree.
    pub(super) fn table(&self) -> &KMCL_SERVER_INTERFACE_V1 {
        &self.table
    }

    /// Channels whose context teardown kept because KMCL still owned packets after
    /// `VmbChannelDisable` and `VmbChannelCleanup` (bounded by [`MAX_LEAKED_CHANNELS`]).
    pub fn leaked_channels(&self) -> u32 {
        self.leaked_channels.load(Ordering::Acquire)
    }

    pub(super) fn record_leaked_channel(&self) {
        self.leaked_channels.fetch_add(1, Ordering::AcqRel);
    }
}

impl Drop for ServerInterface {
    fn drop(&mut self) {
        let header = self.table.Client.Interface;
        if let Some(dereference) = header.InterfaceDereference {
            // SAFETY: `Context` and the routine come from the provider's own header, and this
            // object owns exactly one reference (taken by the query), released only here.
            unsafe { dereference(header.Context) };
        }
    }
}

// ---- handle accessors for callbacks -------------------------------------------------------------
//
// KMCL callbacks receive only a VMBCHANNEL or VMBPACKET. Getting from there to our context takes
// the library's own accessors (VmbChannelGetPointer, VmbPacketGetChannel),
// which therefore have to be reachable from a bare `extern` function. They are recorded here once,
// when the first interface is validated; later interfaces must carry the same accessors, which
// holds for any one provider (a driver holds one interface; the simulator's tables all point at the
// same functions).

static CHANNEL_GET_POINTER: AtomicPtr<()> = AtomicPtr::new(ptr::null_mut());
static PACKET_GET_CHANNEL: AtomicPtr<()> = AtomicPtr::new(ptr::null_mut());

fn record_accessor(cell: &AtomicPtr<()>, value: *mut ()) -> Result<(), InterfaceError> {
    match cell.compare_exchange(ptr::null_mut(), value, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => Ok(()),
        Err(existing) if existing == value => Ok(()),
        Err(_) => Err(InterfaceError::AccessorMismatch),
    }
}

fn register_callback_accessors(table: &KMCL_SERVER_INTERFACE_V1) -> Result<(), InterfaceError> {
    let missing = InterfaceError::MissingSlot { name: "accessor" };
    let channel_get = table.Client.VmbChannelGetPointer.ok_or(missing)?;
    let packet_channel = table.Client.VmbPacketGetChannel.ok_or(missing)?;
    record_accessor(&CHANNEL_GET_POINTER, channel_get as *mut ())?;
    record_accessor(&PACKET_GET_CHANNEL, packet_channel as *mut ())
}

/// The library's handle accessors, as recorded by the first validated interface.
#[derive(Clone, Copy)]
pub(super) struct CallbackAccessors {
    channel_get_pointer: PFN_VMB_CHANNEL_GET_POINTER,
    packet_get_channel: PFN_VMB_PACKET_GET_CHANNEL,
}

/// Loads one recorded accessor back as its function-pointer type.
macro_rules! load_accessor {
    ($cell:expr, $pfn:ty) => {{
        let raw = $cell.load(Ordering::Acquire);
        if raw.is_null() {
            None
        } else {
            // SAFETY: the only non-null values stored in this cell are function pointers of
            // exactly type `$pfn` (see `register_callback_accessors`), and function pointers and
            // data pointers have the same size and representation on every supported target.
            Some(unsafe { core::mem::transmute::<*mut (), <$pfn as AccessorPfn>::Fn>(raw) })
        }
    }};
}

/// Maps an `Option<fn>` slot type to its non-null function type.
trait AccessorPfn {
    type Fn;
}
impl<F> AccessorPfn for Option<F> {
    type Fn = F;
}

/// The recorded accessors, or `None` if no interface was ever validated.
pub(super) fn callback_accessors() -> Option<CallbackAccessors> {
    Some(CallbackAccessors {
        channel_get_pointer: Some(load_accessor!(
            CHANNEL_GET_POINTER,
            PFN_VMB_CHANNEL_GET_POINTER
        )?),
        packet_get_channel: Some(load_accessor!(
            PACKET_GET_CHANNEL,
            PFN_VMB_PACKET_GET_CHANNEL
        )?),
    })
}

impl CallbackAccessors {
    /// `VmbChannelGetPointer(channel)`.
    pub(super) fn channel_pointer(self, channel: VMBCHANNEL) -> *mut core::ffi::c_void {
        match self.channel_get_pointer {
            // SAFETY: `channel` is the handle KMCL passed to the running callback, which is valid
            // for the duration of the callback; the accessor only reads the stored pointer.
            Some(get) => unsafe { get(channel) },
            None => ptr::null_mut(),
        }
    }

    /// `VmbPacketGetChannel(packet)`.
    pub(super) fn packet_channel(self, packet: VMBPACKET) -> VMBCHANNEL {
        match self.packet_get_channel {
            // SAFETY: `packet` is the handle KMCL passed to the running callback.
            Some(get) => unsafe { get(packet) },
            None => ptr::null_mut(),
        }
    }
}
