//! Raw `#[repr(C)]` declarations of `vmbuskernelmodeclientlibapi.h` (KMCL V1 + server V1).
//!
//! Hand-written from the documented header layout (see `docs/kmcl-bindings.md` and the
//! project's KMCL reference): the KMCL is not covered by `wdk-sys`. Names follow the C header so
//! that the Windows CI's bindgen cross-check can compare member by member. Every size and offset is
//! asserted in `tests` below; a wrong member shifts a later offset and fails the build's tests.
//!
//! The interface identifiers (`KMCL_SERVER_INTERFACE_TYPE`, `KMCL_CLIENT_INTERFACE_TYPE` and the V1
//! versions) are public values of that header, identical in every SDK from 10.0.17134 on, and are
//! constants here ([`KMCL_SERVER_INTERFACE_TYPE`]); `docs/kmcl-bindings.md` ("Public identifiers")
//! lists them with their sources. A build needs no header; `tools/kmcl-layout-check` compares
//! these constants with a header when one is available.
#![allow(non_camel_case_types, non_snake_case, missing_docs)]

use core::ffi::c_void;

use crate::NtStatus;
use crate::kmcl_pfn;

/// Declares an opaque C struct type whose pointer is a KMCL handle (`DECLARE_HANDLE`).
macro_rules! opaque {
    ($($(#[$doc:meta])* $name:ident;)*) => {$(
        $(#[$doc])*
        #[repr(C)]
        pub struct $name {
            _opaque: [u8; 0],
            _not_send_sync_unpin: core::marker::PhantomData<(*mut u8, core::marker::PhantomPinned)>,
        }
    )*};
}

opaque! {
    /// `struct VMBCHANNEL__` (a `DECLARE_HANDLE`).
    VMBCHANNEL__;
    /// `struct VMBPACKET__` (a `DECLARE_HANDLE`).
    VMBPACKET__;
    /// `struct VMBPACKETCOMPLETION__` (a `DECLARE_HANDLE`).
    VMBPACKETCOMPLETION__;
    /// `MDL`, only ever handled by pointer here.
    MDL;
    /// `DEVICE_OBJECT`, only ever handled by pointer here.
    DEVICE_OBJECT;
}

/// A channel handle.
pub type VMBCHANNEL = *mut VMBCHANNEL__;
/// An outgoing packet object handle.
pub type VMBPACKET = *mut VMBPACKET__;
/// An incoming packet's completion handle, valid until the packet is completed.
pub type VMBPACKETCOMPLETION = *mut VMBPACKETCOMPLETION__;
/// `PMDL`.
pub type PMDL = *mut MDL;
/// `PDEVICE_OBJECT`.
pub type PDEVICE_OBJECT = *mut DEVICE_OBJECT;
/// `HANDLE`.
pub type HANDLE = *mut c_void;
/// `PVOID`.
pub type PVOID = *mut c_void;
/// `BOOLEAN` (a byte, 0 or 1).
pub type BOOLEAN = u8;
/// `PFN_NUMBER` on 64-bit targets.
pub type PFN_NUMBER = u64;

/// `GUID`: 16 bytes, 4-byte aligned.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct GUID {
    pub Data1: u32,
    pub Data2: u16,
    pub Data3: u16,
    pub Data4: [u8; 8],
}

/// `UNICODE_STRING`: lengths in bytes, buffer not necessarily NUL-terminated.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct UNICODE_STRING {
    pub Length: u16,
    pub MaximumLength: u16,
    pub Buffer: *mut u16,
}

/// `PINTERFACE_REFERENCE` / `PINTERFACE_DEREFERENCE`.
pub type PINTERFACE_REFERENCE = kmcl_pfn!((Context: PVOID));
/// See [`PINTERFACE_REFERENCE`].
pub type PINTERFACE_DEREFERENCE = kmcl_pfn!((Context: PVOID));

/// `INTERFACE` (wdm.h): the header of every interface returned by `IRP_MN_QUERY_INTERFACE`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct INTERFACE {
    pub Size: u16,
    pub Version: u16,
    pub Context: PVOID,
    pub InterfaceReference: PINTERFACE_REFERENCE,
    pub InterfaceDereference: PINTERFACE_DEREFERENCE,
}

// ---- callbacks the driver provides -----------------------------------------------------------

pub type PFN_VMB_CHANNEL_OPENED = kmcl_pfn!((Channel: VMBCHANNEL) -> NtStatus);
pub type PFN_VMB_CHANNEL_CLOSED = kmcl_pfn!((Channel: VMBCHANNEL));
pub type PFN_VMB_CHANNEL_SUSPEND = kmcl_pfn!((Channel: VMBCHANNEL));
pub type PFN_VMB_CHANNEL_STARTED = kmcl_pfn!((Channel: VMBCHANNEL));
pub type PFN_VMB_CHANNEL_POST_STARTED = kmcl_pfn!((Channel: VMBCHANNEL));
pub type PFN_VMB_CHANNEL_PROCESS_PACKET = kmcl_pfn!((
    Channel: VMBCHANNEL,
    Packet: VMBPACKETCOMPLETION,
    Buffer: PVOID,
    BufferLength: u32,
    Flags: u32,
));
pub type PFN_VMB_CHANNEL_PROCESSING_COMPLETE =
    kmcl_pfn!((Channel: VMBCHANNEL, PacketsProcessed: u32));
pub type PFN_VMB_PACKET_COMPLETION_ROUTINE = kmcl_pfn!((
    Packet: VMBPACKET,
    Status: NtStatus,
    Buffer: PVOID,
    BufferLength: u32,
));
pub type PFN_VMB_CHANNEL_PNP_FAILURE = kmcl_pfn!((Channel: VMBCHANNEL, FailureStatus: NtStatus));
pub type PFN_VMB_CHANNEL_SAVE_PACKET = kmcl_pfn!((
    Channel: VMBCHANNEL,
    Packet: VMBPACKET,
    SaveBuf: PVOID,
    SaveBufSize: u32,
    BytesNeeded: *mut u32,
) -> NtStatus);
pub type PFN_VMB_CHANNEL_RESTORE_PACKET = kmcl_pfn!((
    Channel: VMBCHANNEL,
    LibBuf: PVOID,
    LibBufSize: u32,
    SaveBuf: PVOID,
    SaveBufSize: u32,
) -> NtStatus);

/// `VMB_CHANNEL_STATE_CHANGE_CALLBACKS` (Version 1, Size 48 on 64-bit).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct VMB_CHANNEL_STATE_CHANGE_CALLBACKS {
    pub Version: u32,
    pub Size: u32,
    pub EvtChannelOpened: PFN_VMB_CHANNEL_OPENED,
    pub EvtChannelClosed: PFN_VMB_CHANNEL_CLOSED,
    pub EvtChannelSuspend: PFN_VMB_CHANNEL_SUSPEND,
    pub EvtChannelStarted: PFN_VMB_CHANNEL_STARTED,
    pub EvtChannelPostStarted: PFN_VMB_CHANNEL_POST_STARTED,
}

/// The only `Version` of [`VMB_CHANNEL_STATE_CHANGE_CALLBACKS`] (the header's init helper writes 1).
pub const VMB_CHANNEL_STATE_CHANGE_CALLBACKS_VERSION_1: u32 = 1;

// ---- KMCL entry points (client V1, alphabetical as in the header) -----------------------------

pub type PFN_VMB_CHANNEL_ALLOCATE = kmcl_pfn!((
    ParentDeviceObject: PDEVICE_OBJECT,
    IsServer: BOOLEAN,
    Channel: *mut VMBCHANNEL,
) -> NtStatus);
pub type PFN_VMB_CHANNEL_CLEANUP = kmcl_pfn!((Channel: VMBCHANNEL));
pub type PFN_VMB_CHANNEL_CREATE_GPADL_FROM_BUFFER = kmcl_pfn!((
    Channel: VMBCHANNEL,
    Flags: u32,
    Buffer: PVOID,
    ByteCount: u32,
    GpadlHandle: *mut u32,
) -> NtStatus);
pub type PFN_VMB_CHANNEL_CREATE_GPADL_FROM_MDL = kmcl_pfn!((
    Channel: VMBCHANNEL,
    Flags: u32,
    Mdl: PMDL,
    StartOffsetWithinMdl: u32,
    DataLengthWithinMdl: u32,
    GpadlHandle: *mut u32,
) -> NtStatus);
pub type PFN_VMB_CHANNEL_DELETE_GPADL = kmcl_pfn!((Channel: VMBCHANNEL, GpadlHandle: u32));
pub type PFN_VMB_CHANNEL_DISABLE = kmcl_pfn!((Channel: VMBCHANNEL));
pub type PFN_VMB_CHANNEL_ENABLE = kmcl_pfn!((Channel: VMBCHANNEL) -> NtStatus);
pub type PFN_VMB_CHANNEL_GET_INTERFACE_INSTANCE =
    kmcl_pfn!((Channel: VMBCHANNEL, InterfaceInstance: *mut GUID));
pub type PFN_VMB_CHANNEL_GET_MMIO_SPACE =
    kmcl_pfn!((Channel: VMBCHANNEL, MmioAddress: *mut u64, MmioSize: *mut u64));
pub type PFN_VMB_CHANNEL_GET_POINTER = kmcl_pfn!((Channel: VMBCHANNEL) -> PVOID);
pub type PFN_VMB_CHANNEL_INIT_SET_CLIENT_CONTEXT_SIZE =
    kmcl_pfn!((Channel: VMBCHANNEL, ContextSize: u32) -> NtStatus);
pub type PFN_VMB_CHANNEL_INIT_SET_FLAGS = kmcl_pfn!((Channel: VMBCHANNEL, Flags: u32) -> NtStatus);
pub type PFN_VMB_CHANNEL_INIT_SET_FRIENDLY_NAME =
    kmcl_pfn!((Channel: VMBCHANNEL, Name: *const UNICODE_STRING) -> NtStatus);
pub type PFN_VMB_CHANNEL_INIT_SET_MAXIMUM_EXTERNAL_DATA =
    kmcl_pfn!((Channel: VMBCHANNEL, DataSize: u32, ChainLength: u32) -> NtStatus);
pub type PFN_VMB_CHANNEL_INIT_SET_MAXIMUM_PACKET_SIZE =
    kmcl_pfn!((Channel: VMBCHANNEL, PacketSize: u32) -> NtStatus);
pub type PFN_VMB_CHANNEL_INIT_SET_PROCESS_PACKET_CALLBACKS = kmcl_pfn!((
    Channel: VMBCHANNEL,
    ProcessPacketCallback: PFN_VMB_CHANNEL_PROCESS_PACKET,
    ProcessingCompleteCallback: PFN_VMB_CHANNEL_PROCESSING_COMPLETE,
) -> NtStatus);
pub type PFN_VMB_CHANNEL_INIT_SET_STATE_CHANGE_CALLBACKS = kmcl_pfn!((
    Channel: VMBCHANNEL,
    StateChangeCallbacks: *mut VMB_CHANNEL_STATE_CHANGE_CALLBACKS,
) -> NtStatus);
pub type PFN_VMB_CHANNEL_PACKET_COMPLETE = kmcl_pfn!((
    PacketCompletionContext: VMBPACKETCOMPLETION,
    PacketCompletionBuffer: PVOID,
    BufSize: u32,
));
pub type PFN_VMB_CHANNEL_PACKET_DEFER_TO_PASSIVE =
    kmcl_pfn!((PacketCompletionContext: VMBPACKETCOMPLETION));
pub type PFN_VMB_CHANNEL_PACKET_FAIL = kmcl_pfn!((PacketCompletionContext: VMBPACKETCOMPLETION));
pub type PFN_VMB_CHANNEL_PACKET_GET_EXTERNAL_DATA = kmcl_pfn!((
    PacketCompletionContext: VMBPACKETCOMPLETION,
    Flags: u32,
    Mdl: *mut PMDL,
) -> NtStatus);
pub type PFN_VMB_CHANNEL_PAUSE = kmcl_pfn!((Channel: VMBCHANNEL));
pub type PFN_VMB_CHANNEL_SEND_SYNCHRONOUS_REQUEST = kmcl_pfn!((
    Channel: VMBCHANNEL,
    Buffer: PVOID,
    BufferSize: u32,
    ExternalDataMdl: PMDL,
    Flags: u32,
    CompletionBuffer: PVOID,
    CompletionBufferSize: *mut u32,
    Timeout: *mut i64,
) -> NtStatus);
pub type PFN_VMB_CHANNEL_SET_INCOMING_PROCESSING_AT_PASSIVE =
    kmcl_pfn!((Channel: VMBCHANNEL, RequirePassive: BOOLEAN));
pub type PFN_VMB_CHANNEL_SET_INTERRUPT_LATENCY = kmcl_pfn!((
    Channel: VMBCHANNEL,
    Latency: u16,
    OriginalLatency: *mut u16,
) -> NtStatus);
pub type PFN_VMB_CHANNEL_SET_POINTER = kmcl_pfn!((Channel: VMBCHANNEL, Pointer: PVOID));
pub type PFN_VMB_CHANNEL_SET_TRANSACTION_QUOTA = kmcl_pfn!((Channel: VMBCHANNEL, Quota: u32));
pub type PFN_VMB_CHANNEL_SIZEOF_PACKET = kmcl_pfn!((Channel: VMBCHANNEL) -> u32);
pub type PFN_VMB_CHANNEL_START = kmcl_pfn!((Channel: VMBCHANNEL));
pub type PFN_VMB_CLIENT_CHANNEL_INIT_SET_RING_BUFFER_PAGE_COUNT = kmcl_pfn!((
    Channel: VMBCHANNEL,
    IncomingPageCount: u32,
    OutgoingPageCount: u32,
) -> NtStatus);
pub type PFN_VMB_CLIENT_CHANNEL_INIT_SET_TARGET_PNP = kmcl_pfn!((
    Channel: VMBCHANNEL,
    InterfaceType: *const GUID,
    InterfaceInstance: *const GUID,
    PnpFailureCallback: PFN_VMB_CHANNEL_PNP_FAILURE,
) -> NtStatus);
pub type PFN_VMB_PACKET_ALLOCATE = kmcl_pfn!((Channel: VMBCHANNEL) -> VMBPACKET);
pub type PFN_VMB_PACKET_FREE = kmcl_pfn!((VmbPacket: VMBPACKET));
pub type PFN_VMB_PACKET_GET_CHANNEL = kmcl_pfn!((VmbPacket: VMBPACKET) -> VMBCHANNEL);
pub type PFN_VMB_PACKET_GET_POINTER = kmcl_pfn!((VmbPacket: VMBPACKET) -> PVOID);
pub type PFN_VMB_PACKET_INITIALIZE = kmcl_pfn!((
    Channel: VMBCHANNEL,
    VmbPacket: VMBPACKET,
    ByteCount: u32,
) -> NtStatus);
pub type PFN_VMB_PACKET_SEND = kmcl_pfn!((
    VmbPacket: VMBPACKET,
    Buffer: PVOID,
    BufferLength: u32,
    ExternalDataMdl: PMDL,
    Flags: u32,
) -> NtStatus);
pub type PFN_VMB_PACKET_SEND_WITH_EXTERNAL_MDL = kmcl_pfn!((
    VmbPacket: VMBPACKET,
    Buffer: PVOID,
    BufferLength: u32,
    ExternalDataMdl: PMDL,
    MdlOffset: u32,
    MdlLength: u32,
    Flags: u32,
) -> NtStatus);
pub type PFN_VMB_PACKET_SEND_WITH_EXTERNAL_PFNS = kmcl_pfn!((
    VmbPacket: VMBPACKET,
    Buffer: PVOID,
    BufferLength: u32,
    ExternalDataPfns: *mut PFN_NUMBER,
    PfnLength: u32,
    Flags: u32,
) -> NtStatus);
pub type PFN_VMB_PACKET_SET_COMPLETION_ROUTINE = kmcl_pfn!((
    VmbPacket: VMBPACKET,
    CompletionRoutine: PFN_VMB_PACKET_COMPLETION_ROUTINE,
));
pub type PFN_VMB_PACKET_SET_POINTER = kmcl_pfn!((VmbPacket: VMBPACKET, Pointer: PVOID));

// ---- server-only entry points (alphabetical) ---------------------------------------------------

pub type PFN_VMB_CHANNEL_MAP_GPADL = kmcl_pfn!((
    Channel: VMBCHANNEL,
    Flags: u32,
    GpadlHandle: u32,
    Mdl: *mut PMDL,
) -> NtStatus);
pub type PFN_VMB_CHANNEL_RESTORE_FROM_BUFFER =
    kmcl_pfn!((Channel: VMBCHANNEL, Buffer: PVOID, BufferSize: u32) -> NtStatus);
pub type PFN_VMB_CHANNEL_SAVE_BEGIN = kmcl_pfn!((Channel: VMBCHANNEL) -> NtStatus);
pub type PFN_VMB_CHANNEL_SAVE_CONTINUE = kmcl_pfn!((
    Channel: VMBCHANNEL,
    SaveBuffer: PVOID,
    SaveBufferSize: u32,
    BytesFilled: *mut u32,
    BytesRequired: *mut u32,
) -> NtStatus);
pub type PFN_VMB_CHANNEL_SAVE_END = kmcl_pfn!((Channel: VMBCHANNEL));
pub type PFN_VMB_CHANNEL_UNMAP_GPADL = kmcl_pfn!((Channel: VMBCHANNEL, GpadlHandle: u32));
pub type PFN_VMB_CONVERT_VMBUS_HANDLE_TO_KERNEL_HANDLE =
    kmcl_pfn!((VmbusHandle: HANDLE, KernelHandle: *mut HANDLE) -> NtStatus);
pub type PFN_VMB_PACKET_RESTORE =
    kmcl_pfn!((PacketObject: VMBPACKET, Buffer: PVOID, BufferSize: u32) -> NtStatus);
pub type PFN_VMB_SERVER_CHANNEL_INIT_SET_FLAGS =
    kmcl_pfn!((Channel: VMBCHANNEL, Flags: u32) -> NtStatus);
pub type PFN_VMB_SERVER_CHANNEL_INIT_SET_MMIO_MEGABYTES = kmcl_pfn!((
    Channel: VMBCHANNEL,
    MmioMegabytes: u16,
    MmioMegabytesOptional: u16,
) -> NtStatus);
pub type PFN_VMB_SERVER_CHANNEL_INIT_SET_SAVE_RESTORE_PACKET_CALLBACKS = kmcl_pfn!((
    Channel: VMBCHANNEL,
    SavePacketCallback: PFN_VMB_CHANNEL_SAVE_PACKET,
    RestorePacketCallback: PFN_VMB_CHANNEL_RESTORE_PACKET,
) -> NtStatus);
pub type PFN_VMB_SERVER_CHANNEL_INIT_SET_TARGET_INTERFACE_ID = kmcl_pfn!((
    Channel: VMBCHANNEL,
    InterfaceType: GUID,
    InterfaceInstance: GUID,
) -> NtStatus);
pub type PFN_VMB_SERVER_CHANNEL_INIT_SET_TARGET_VTL =
    kmcl_pfn!((Channel: VMBCHANNEL, TargetVtl: u8) -> NtStatus);
pub type PFN_VMB_SERVER_CHANNEL_INIT_SET_VMBUS_HANDLE =
    kmcl_pfn!((Channel: VMBCHANNEL, VmbusHandle: HANDLE) -> NtStatus);

/// `KMCL_CLIENT_INTERFACE_V1`: the `INTERFACE` header and 41 entry points, alphabetical.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KMCL_CLIENT_INTERFACE_V1 {
    pub Interface: INTERFACE,
    pub VmbChannelAllocate: PFN_VMB_CHANNEL_ALLOCATE,
    pub VmbChannelCleanup: PFN_VMB_CHANNEL_CLEANUP,
    pub VmbChannelCreateGpadlFromBuffer: PFN_VMB_CHANNEL_CREATE_GPADL_FROM_BUFFER,
    pub VmbChannelCreateGpadlFromMdl: PFN_VMB_CHANNEL_CREATE_GPADL_FROM_MDL,
    pub VmbChannelDeleteGpadl: PFN_VMB_CHANNEL_DELETE_GPADL,
    pub VmbChannelDisable: PFN_VMB_CHANNEL_DISABLE,
    pub VmbChannelEnable: PFN_VMB_CHANNEL_ENABLE,
    pub VmbChannelGetInterfaceInstance: PFN_VMB_CHANNEL_GET_INTERFACE_INSTANCE,
    pub VmbChannelGetMmioSpace: PFN_VMB_CHANNEL_GET_MMIO_SPACE,
    pub VmbChannelGetPointer: PFN_VMB_CHANNEL_GET_POINTER,
    pub VmbChannelInitSetClientContextSize: PFN_VMB_CHANNEL_INIT_SET_CLIENT_CONTEXT_SIZE,
    pub VmbChannelInitSetFlags: PFN_VMB_CHANNEL_INIT_SET_FLAGS,
    pub VmbChannelInitSetFriendlyName: PFN_VMB_CHANNEL_INIT_SET_FRIENDLY_NAME,
    pub VmbChannelInitSetMaximumExternalData: PFN_VMB_CHANNEL_INIT_SET_MAXIMUM_EXTERNAL_DATA,
    pub VmbChannelInitSetMaximumPacketSize: PFN_VMB_CHANNEL_INIT_SET_MAXIMUM_PACKET_SIZE,
    pub VmbChannelInitSetProcessPacketCallbacks: PFN_VMB_CHANNEL_INIT_SET_PROCESS_PACKET_CALLBACKS,
    pub VmbChannelInitSetStateChangeCallbacks: PFN_VMB_CHANNEL_INIT_SET_STATE_CHANGE_CALLBACKS,
    pub VmbChannelPacketComplete: PFN_VMB_CHANNEL_PACKET_COMPLETE,
    pub VmbChannelPacketDeferToPassive: PFN_VMB_CHANNEL_PACKET_DEFER_TO_PASSIVE,
    pub VmbChannelPacketFail: PFN_VMB_CHANNEL_PACKET_FAIL,
    pub VmbChannelPacketGetExternalData: PFN_VMB_CHANNEL_PACKET_GET_EXTERNAL_DATA,
    pub VmbChannelPause: PFN_VMB_CHANNEL_PAUSE,
    pub VmbChannelSendSynchronousRequest: PFN_VMB_CHANNEL_SEND_SYNCHRONOUS_REQUEST,
    pub VmbChannelSetIncomingProcessingAtPassive:
        PFN_VMB_CHANNEL_SET_INCOMING_PROCESSING_AT_PASSIVE,
    pub VmbChannelSetInterruptLatency: PFN_VMB_CHANNEL_SET_INTERRUPT_LATENCY,
    pub VmbChannelSetPointer: PFN_VMB_CHANNEL_SET_POINTER,
    pub VmbChannelSetTransactionQuota: PFN_VMB_CHANNEL_SET_TRANSACTION_QUOTA,
    pub VmbChannelSizeofPacket: PFN_VMB_CHANNEL_SIZEOF_PACKET,
    pub VmbChannelStart: PFN_VMB_CHANNEL_START,
    pub VmbClientChannelInitSetRingBufferPageCount:
        PFN_VMB_CLIENT_CHANNEL_INIT_SET_RING_BUFFER_PAGE_COUNT,
    pub VmbClientChannelInitSetTargetPnp: PFN_VMB_CLIENT_CHANNEL_INIT_SET_TARGET_PNP,
    pub VmbPacketAllocate: PFN_VMB_PACKET_ALLOCATE,
    pub VmbPacketFree: PFN_VMB_PACKET_FREE,
    pub VmbPacketGetChannel: PFN_VMB_PACKET_GET_CHANNEL,
    pub VmbPacketGetPointer: PFN_VMB_PACKET_GET_POINTER,
    pub VmbPacketInitialize: PFN_VMB_PACKET_INITIALIZE,
    pub VmbPacketSend: PFN_VMB_PACKET_SEND,
    pub VmbPacketSendWithExternalMdl: PFN_VMB_PACKET_SEND_WITH_EXTERNAL_MDL,
    pub VmbPacketSendWithExternalPfns: PFN_VMB_PACKET_SEND_WITH_EXTERNAL_PFNS,
    pub VmbPacketSetCompletionRoutine: PFN_VMB_PACKET_SET_COMPLETION_ROUTINE,
    pub VmbPacketSetPointer: PFN_VMB_PACKET_SET_POINTER,
}

/// `KMCL_SERVER_ONLY_METHODS`: 14 server-only entry points, alphabetical, no header of its own.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KMCL_SERVER_ONLY_METHODS {
    pub VmbChannelMapGpadl: PFN_VMB_CHANNEL_MAP_GPADL,
    pub VmbChannelRestoreFromBuffer: PFN_VMB_CHANNEL_RESTORE_FROM_BUFFER,
    pub VmbChannelSaveBegin: PFN_VMB_CHANNEL_SAVE_BEGIN,
    pub VmbChannelSaveContinue: PFN_VMB_CHANNEL_SAVE_CONTINUE,
    pub VmbChannelSaveEnd: PFN_VMB_CHANNEL_SAVE_END,
    pub VmbChannelUnmapGpadl: PFN_VMB_CHANNEL_UNMAP_GPADL,
    pub VmbConvertVmbusHandleToKernelHandle: PFN_VMB_CONVERT_VMBUS_HANDLE_TO_KERNEL_HANDLE,
    pub VmbPacketRestore: PFN_VMB_PACKET_RESTORE,
    pub VmbServerChannelInitSetFlags: PFN_VMB_SERVER_CHANNEL_INIT_SET_FLAGS,
    pub VmbServerChannelInitSetMmioMegabytes: PFN_VMB_SERVER_CHANNEL_INIT_SET_MMIO_MEGABYTES,
    pub VmbServerChannelInitSetSaveRestorePacketCallbacks:
        PFN_VMB_SERVER_CHANNEL_INIT_SET_SAVE_RESTORE_PACKET_CALLBACKS,
    pub VmbServerChannelInitSetTargetInterfaceId:
        PFN_VMB_SERVER_CHANNEL_INIT_SET_TARGET_INTERFACE_ID,
    pub VmbServerChannelInitSetTargetVtl: PFN_VMB_SERVER_CHANNEL_INIT_SET_TARGET_VTL,
    pub VmbServerChannelInitSetVmbusHandle: PFN_VMB_SERVER_CHANNEL_INIT_SET_VMBUS_HANDLE,
}

/// `KMCL_SERVER_INTERFACE_V1`: the client V1 table followed by the server-only methods.
///
/// The C definition embeds both as anonymous members, so the layout is flat; nesting the two
/// `#[repr(C)]` structs gives the same offsets because both are 8-byte aligned with no tail padding.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KMCL_SERVER_INTERFACE_V1 {
    pub Client: KMCL_CLIENT_INTERFACE_V1,
    pub Server: KMCL_SERVER_ONLY_METHODS,
}

// ---- flag constants (header values) ------------------------------------------------------------

pub const VMBUS_CHANNEL_FORMAT_FLAG_WAIT_FOR_COMPLETION: u32 = 0x1;
pub const VMBUS_CHANNEL_FORMAT_FLAG_FORCE_MDL_LENGTH: u32 = 0x2;
pub const VMBUS_CHANNEL_FORMAT_FLAG_PAGED_BUFFER: u32 = 0x4;
/// `VMBUS_CHANNEL_FORMAT_FLAG_DATA_IN_ONLY`, in the header from SDK 10.0.18362 on
/// (`docs/kmcl-bindings.md`, "Format flags").
pub const VMBUS_CHANNEL_FORMAT_FLAG_DATA_IN_ONLY: u32 = 0x8;
/// `VMBUS_CHANNEL_FORMAT_FLAG_DATA_OUT_ONLY`, in the header from SDK 10.0.18362 on.
pub const VMBUS_CHANNEL_FORMAT_FLAG_DATA_OUT_ONLY: u32 = 0x10;
/// `VMBUS_CHANNEL_FORMAT_FLAGS`, the mask of every format flag: 0x1F from SDK 10.0.18362 on (0x7 in
/// the 17134 and 17763 headers, before the two data-direction flags).
pub const VMBUS_CHANNEL_FORMAT_FLAGS: u32 = 0x1F;
pub const VMBUS_CHANNEL_GPADL_FLAG_READ_ONLY: u32 = 0x1;
pub const VMBUS_CHANNEL_GPADL_FLAGS: u32 = 0x1;
pub const VMBUS_CHANNEL_INIT_FLAG_IS_PIPE: u32 = 0x1;
pub const VMBUS_CHANNEL_INIT_FLAGS: u32 = 0x1;
pub const VMBUS_SERVER_CHANNEL_INIT_FLAG_LOOPBACK_OFFER: u32 = 0x1;
pub const VMBUS_SERVER_CHANNEL_INIT_FLAG_ENUMERATE_DEVICE_INTERFACE: u32 = 0x2;
pub const VMBUS_SERVER_CHANNEL_INIT_FLAG_OFFER_AS_PIPE: u32 = 0x4;
pub const VMBUS_SERVER_CHANNEL_INIT_FLAG_FORCE_NEW_CHANNEL: u32 = 0x8;
pub const VMBUS_SERVER_CHANNEL_INIT_FLAG_TLNPI_PROVIDER_OFFER: u32 = 0x10;
pub const VMBUS_SERVER_CHANNEL_INIT_FLAGS: u32 = 0x1F;
pub const VMBUS_CHANNEL_PROCESS_PACKET_FLAG_EXTERNAL_DATA: u32 = 0x1;
pub const VMBUS_CHANNEL_PROCESS_PACKET_FLAGS: u32 = 0x1;
pub const VMBUS_CHANNEL_PACKET_EXTERNAL_DATA_FLAG_READ_ONLY: u32 = 0x1;
pub const VMBUS_CHANNEL_PACKET_EXTERNAL_DATA_FLAGS: u32 = 0x1;
pub const VMBUS_SERVER_CHANNEL_INIT_MAXIMUM_OFFER_DATA: u32 = 120;

// ---- interface identifiers (public header values, docs/kmcl-bindings.md "Public identifiers") ---

/// `KMCL_CLIENT_INTERFACE_VERSION_V1`: the `Version` of a client V1 query (`Size` 0x168).
pub const KMCL_CLIENT_INTERFACE_VERSION_V1: u16 = 1;

/// `KMCL_SERVER_INTERFACE_VERSION_V1`: the `Version` of a server V1 query (`Size` 0x1D8).
///
/// The headers also define `..._VERSION_LATEST`, which grows with the SDK (5 from 10.0.19041);
/// this crate only ever asks for V1, the table every host from Windows 10 1803 on provides.
pub const KMCL_SERVER_INTERFACE_VERSION_V1: u16 = 1;

/// `KMCL_CLIENT_INTERFACE_TYPE`, `{4aecb860-e161-42bb-a5ca-77f3a9645905}`: the interface type of
/// the KMCL client interface (`DEFINE_GUID` in `km/vmbuskernelmodeclientlibapi.h`, SDK 10.0.17134
/// through 10.0.22621, unchanged).
pub const KMCL_CLIENT_INTERFACE_TYPE: GUID = GUID {
    Data1: 0x4aec_b860,
    Data2: 0xe161,
    Data3: 0x42bb,
    Data4: [0xa5, 0xca, 0x77, 0xf3, 0xa9, 0x64, 0x59, 0x05],
};

/// `KMCL_SERVER_INTERFACE_TYPE`, `{83b21474-c5b9-4f65-b5e7-720c692bd371}`: the interface type a
/// VSP queries from the VMBus root device for the server table (`DEFINE_GUID` in
/// `km/vmbuskernelmodeclientlibapi.h`, SDK 10.0.17134 through 10.0.22621, unchanged).
pub const KMCL_SERVER_INTERFACE_TYPE: GUID = GUID {
    Data1: 0x83b2_1474,
    Data2: 0xc5b9,
    Data3: 0x4f65,
    Data4: [0xb5, 0xe7, 0x72, 0x0c, 0x69, 0x2b, 0xd3, 0x71],
};
