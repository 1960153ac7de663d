//! Size, alignment and offset of every `#[repr(C)]` declaration, asserted against the header
//! layout on 64-bit targets (docs/kmcl-bindings.md). A wrong member shifts a later offset and
//! fails here.
use core::mem::{align_of, offset_of, size_of};

use crate::*;

/// Every client V1 slot with its documented x64 offset (docs/kmcl-bindings.md §R1).
const CLIENT_OFFSETS: [(usize, usize); 41] = [
    (
        offset_of!(KMCL_CLIENT_INTERFACE_V1, VmbChannelAllocate),
        0x20,
    ),
    (
        offset_of!(KMCL_CLIENT_INTERFACE_V1, VmbChannelCleanup),
        0x28,
    ),
    (
        offset_of!(KMCL_CLIENT_INTERFACE_V1, VmbChannelCreateGpadlFromBuffer),
        0x30,
    ),
    (
        offset_of!(KMCL_CLIENT_INTERFACE_V1, VmbChannelCreateGpadlFromMdl),
        0x38,
    ),
    (
        offset_of!(KMCL_CLIENT_INTERFACE_V1, VmbChannelDeleteGpadl),
        0x40,
    ),
    (
        offset_of!(KMCL_CLIENT_INTERFACE_V1, VmbChannelDisable),
        0x48,
    ),
    (offset_of!(KMCL_CLIENT_INTERFACE_V1, VmbChannelEnable), 0x50),
    (
        offset_of!(KMCL_CLIENT_INTERFACE_V1, VmbChannelGetInterfaceInstance),
        0x58,
    ),
    (
        offset_of!(KMCL_CLIENT_INTERFACE_V1, VmbChannelGetMmioSpace),
        0x60,
    ),
    (
        offset_of!(KMCL_CLIENT_INTERFACE_V1, VmbChannelGetPointer),
        0x68,
    ),
    (
        offset_of!(KMCL_CLIENT_INTERFACE_V1, VmbChannelInitSetClientContextSize),
        0x70,
    ),
    (
        offset_of!(KMCL_CLIENT_INTERFACE_V1, VmbChannelInitSetFlags),
        0x78,
    ),
    (
        offset_of!(KMCL_CLIENT_INTERFACE_V1, VmbChannelInitSetFriendlyName),
        0x80,
    ),
    (
        offset_of!(
            KMCL_CLIENT_INTERFACE_V1,
            VmbChannelInitSetMaximumExternalData
        ),
        0x88,
    ),
    (
        offset_of!(KMCL_CLIENT_INTERFACE_V1, VmbChannelInitSetMaximumPacketSize),
        0x90,
    ),
    (
        offset_of!(
            KMCL_CLIENT_INTERFACE_V1,
            VmbChannelInitSetProcessPacketCallbacks
        ),
        0x98,
    ),
    (
        offset_of!(
            KMCL_CLIENT_INTERFACE_V1,
            VmbChannelInitSetStateChangeCallbacks
        ),
        0xA0,
    ),
    (
        offset_of!(KMCL_CLIENT_INTERFACE_V1, VmbChannelPacketComplete),
        0xA8,
    ),
    (
        offset_of!(KMCL_CLIENT_INTERFACE_V1, VmbChannelPacketDeferToPassive),
        0xB0,
    ),
    (
        offset_of!(KMCL_CLIENT_INTERFACE_V1, VmbChannelPacketFail),
        0xB8,
    ),
    (
        offset_of!(KMCL_CLIENT_INTERFACE_V1, VmbChannelPacketGetExternalData),
        0xC0,
    ),
    (offset_of!(KMCL_CLIENT_INTERFACE_V1, VmbChannelPause), 0xC8),
    (
        offset_of!(KMCL_CLIENT_INTERFACE_V1, VmbChannelSendSynchronousRequest),
        0xD0,
    ),
    (
        offset_of!(
            KMCL_CLIENT_INTERFACE_V1,
            VmbChannelSetIncomingProcessingAtPassive
        ),
        0xD8,
    ),
    (
        offset_of!(KMCL_CLIENT_INTERFACE_V1, VmbChannelSetInterruptLatency),
        0xE0,
    ),
    (
        offset_of!(KMCL_CLIENT_INTERFACE_V1, VmbChannelSetPointer),
        0xE8,
    ),
    (
        offset_of!(KMCL_CLIENT_INTERFACE_V1, VmbChannelSetTransactionQuota),
        0xF0,
    ),
    (
        offset_of!(KMCL_CLIENT_INTERFACE_V1, VmbChannelSizeofPacket),
        0xF8,
    ),
    (offset_of!(KMCL_CLIENT_INTERFACE_V1, VmbChannelStart), 0x100),
    (
        offset_of!(
            KMCL_CLIENT_INTERFACE_V1,
            VmbClientChannelInitSetRingBufferPageCount
        ),
        0x108,
    ),
    (
        offset_of!(KMCL_CLIENT_INTERFACE_V1, VmbClientChannelInitSetTargetPnp),
        0x110,
    ),
    (
        offset_of!(KMCL_CLIENT_INTERFACE_V1, VmbPacketAllocate),
        0x118,
    ),
    (offset_of!(KMCL_CLIENT_INTERFACE_V1, VmbPacketFree), 0x120),
    (
        offset_of!(KMCL_CLIENT_INTERFACE_V1, VmbPacketGetChannel),
        0x128,
    ),
    (
        offset_of!(KMCL_CLIENT_INTERFACE_V1, VmbPacketGetPointer),
        0x130,
    ),
    (
        offset_of!(KMCL_CLIENT_INTERFACE_V1, VmbPacketInitialize),
        0x138,
    ),
    (offset_of!(KMCL_CLIENT_INTERFACE_V1, VmbPacketSend), 0x140),
    (
        offset_of!(KMCL_CLIENT_INTERFACE_V1, VmbPacketSendWithExternalMdl),
        0x148,
    ),
    (
        offset_of!(KMCL_CLIENT_INTERFACE_V1, VmbPacketSendWithExternalPfns),
        0x150,
    ),
    (
        offset_of!(KMCL_CLIENT_INTERFACE_V1, VmbPacketSetCompletionRoutine),
        0x158,
    ),
    (
        offset_of!(KMCL_CLIENT_INTERFACE_V1, VmbPacketSetPointer),
        0x160,
    ),
];

/// Every server-only slot with its offset inside `KMCL_SERVER_INTERFACE_V1` (docs/kmcl-bindings.md, Layout).
const SERVER_OFFSETS: [(usize, usize); 14] = [
    (
        offset_of!(KMCL_SERVER_ONLY_METHODS, VmbChannelMapGpadl),
        0x168,
    ),
    (
        offset_of!(KMCL_SERVER_ONLY_METHODS, VmbChannelRestoreFromBuffer),
        0x170,
    ),
    (
        offset_of!(KMCL_SERVER_ONLY_METHODS, VmbChannelSaveBegin),
        0x178,
    ),
    (
        offset_of!(KMCL_SERVER_ONLY_METHODS, VmbChannelSaveContinue),
        0x180,
    ),
    (
        offset_of!(KMCL_SERVER_ONLY_METHODS, VmbChannelSaveEnd),
        0x188,
    ),
    (
        offset_of!(KMCL_SERVER_ONLY_METHODS, VmbChannelUnmapGpadl),
        0x190,
    ),
    (
        offset_of!(
            KMCL_SERVER_ONLY_METHODS,
            VmbConvertVmbusHandleToKernelHandle
        ),
        0x198,
    ),
    (
        offset_of!(KMCL_SERVER_ONLY_METHODS, VmbPacketRestore),
        0x1A0,
    ),
    (
        offset_of!(KMCL_SERVER_ONLY_METHODS, VmbServerChannelInitSetFlags),
        0x1A8,
    ),
    (
        offset_of!(
            KMCL_SERVER_ONLY_METHODS,
            VmbServerChannelInitSetMmioMegabytes
        ),
        0x1B0,
    ),
    (
        offset_of!(
            KMCL_SERVER_ONLY_METHODS,
            VmbServerChannelInitSetSaveRestorePacketCallbacks
        ),
        0x1B8,
    ),
    (
        offset_of!(
            KMCL_SERVER_ONLY_METHODS,
            VmbServerChannelInitSetTargetInterfaceId
        ),
        0x1C0,
    ),
    (
        offset_of!(KMCL_SERVER_ONLY_METHODS, VmbServerChannelInitSetTargetVtl),
        0x1C8,
    ),
    (
        offset_of!(KMCL_SERVER_ONLY_METHODS, VmbServerChannelInitSetVmbusHandle),
        0x1D0,
    ),
];

#[test]
fn interface_header_layout() {
    assert_eq!(size_of::<INTERFACE>(), 32);
    assert_eq!(align_of::<INTERFACE>(), 8);
    assert_eq!(offset_of!(INTERFACE, Size), 0);
    assert_eq!(offset_of!(INTERFACE, Version), 2);
    assert_eq!(offset_of!(INTERFACE, Context), 8);
    assert_eq!(offset_of!(INTERFACE, InterfaceReference), 16);
    assert_eq!(offset_of!(INTERFACE, InterfaceDereference), 24);
}

#[test]
fn client_interface_v1_layout() {
    assert_eq!(offset_of!(KMCL_CLIENT_INTERFACE_V1, Interface), 0);
    for (index, (actual, documented)) in CLIENT_OFFSETS.iter().enumerate() {
        assert_eq!(actual, documented, "client slot {index}");
    }
    // 41 slots, in order, each exactly one pointer wide.
    for (index, (offset, _)) in CLIENT_OFFSETS.iter().enumerate() {
        assert_eq!(
            *offset,
            0x20 + 8 * index,
            "client slot {index} not contiguous"
        );
    }
    assert_eq!(size_of::<KMCL_CLIENT_INTERFACE_V1>(), 0x168);
    assert_eq!(align_of::<KMCL_CLIENT_INTERFACE_V1>(), 8);
}

#[test]
fn server_interface_v1_layout() {
    let server_base = offset_of!(KMCL_SERVER_INTERFACE_V1, Server);
    assert_eq!(offset_of!(KMCL_SERVER_INTERFACE_V1, Client), 0);
    assert_eq!(server_base, 0x168);
    for (index, (relative, documented)) in SERVER_OFFSETS.iter().enumerate() {
        // The table lists offsets inside the whole server interface.
        let in_server_only = documented - 0x168;
        assert_eq!(*relative, in_server_only, "server-only slot {index}");
        assert_eq!(server_base + relative, *documented, "server slot {index}");
    }
    assert_eq!(size_of::<KMCL_SERVER_ONLY_METHODS>(), 14 * 8);
    assert_eq!(size_of::<KMCL_SERVER_INTERFACE_V1>(), 0x1D8);
    assert_eq!(align_of::<KMCL_SERVER_INTERFACE_V1>(), 8);
}

#[test]
fn state_change_callbacks_layout() {
    type Callbacks = VMB_CHANNEL_STATE_CHANGE_CALLBACKS;
    assert_eq!(size_of::<Callbacks>(), 48);
    assert_eq!(offset_of!(Callbacks, Version), 0);
    assert_eq!(offset_of!(Callbacks, Size), 4);
    assert_eq!(offset_of!(Callbacks, EvtChannelOpened), 8);
    assert_eq!(offset_of!(Callbacks, EvtChannelClosed), 16);
    assert_eq!(offset_of!(Callbacks, EvtChannelSuspend), 24);
    assert_eq!(offset_of!(Callbacks, EvtChannelStarted), 32);
    assert_eq!(offset_of!(Callbacks, EvtChannelPostStarted), 40);
}

#[test]
fn scalar_and_handle_layouts() {
    assert_eq!(size_of::<GUID>(), 16);
    assert_eq!(align_of::<GUID>(), 4);
    assert_eq!(offset_of!(GUID, Data4), 8);
    assert_eq!(size_of::<UNICODE_STRING>(), 16);
    assert_eq!(offset_of!(UNICODE_STRING, Buffer), 8);
    assert_eq!(size_of::<VMBCHANNEL>(), 8);
    assert_eq!(size_of::<VMBPACKET>(), 8);
    assert_eq!(size_of::<VMBPACKETCOMPLETION>(), 8);
    assert_eq!(size_of::<NtStatus>(), 4);
    // A nullable function pointer is exactly one pointer (the niche makes `None` NULL).
    assert_eq!(size_of::<PFN_VMB_PACKET_SEND>(), 8);
}

#[test]
fn flag_masks_cover_their_flags() {
    assert_eq!(
        VMBUS_CHANNEL_FORMAT_FLAG_WAIT_FOR_COMPLETION
            | VMBUS_CHANNEL_FORMAT_FLAG_FORCE_MDL_LENGTH
            | VMBUS_CHANNEL_FORMAT_FLAG_PAGED_BUFFER
            | VMBUS_CHANNEL_FORMAT_FLAG_DATA_IN_ONLY
            | VMBUS_CHANNEL_FORMAT_FLAG_DATA_OUT_ONLY,
        VMBUS_CHANNEL_FORMAT_FLAGS
    );
    assert_eq!(
        VMBUS_SERVER_CHANNEL_INIT_FLAG_LOOPBACK_OFFER
            | VMBUS_SERVER_CHANNEL_INIT_FLAG_ENUMERATE_DEVICE_INTERFACE
            | VMBUS_SERVER_CHANNEL_INIT_FLAG_OFFER_AS_PIPE
            | VMBUS_SERVER_CHANNEL_INIT_FLAG_FORCE_NEW_CHANNEL
            | VMBUS_SERVER_CHANNEL_INIT_FLAG_TLNPI_PROVIDER_OFFER,
        VMBUS_SERVER_CHANNEL_INIT_FLAGS
    );
}

#[test]
fn interface_identifiers_match_the_header_text() {
    // The registry format of the two GUIDs as the header's comments write them.
    fn text(g: &GUID) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..4].copy_from_slice(&g.Data1.to_be_bytes());
        out[4..6].copy_from_slice(&g.Data2.to_be_bytes());
        out[6..8].copy_from_slice(&g.Data3.to_be_bytes());
        out[8..].copy_from_slice(&g.Data4);
        out
    }
    assert_eq!(
        u128::from_be_bytes(text(&KMCL_CLIENT_INTERFACE_TYPE)),
        0x4aecb860_e161_42bb_a5ca_77f3a9645905
    );
    assert_eq!(
        u128::from_be_bytes(text(&KMCL_SERVER_INTERFACE_TYPE)),
        0x83b21474_c5b9_4f65_b5e7_720c692bd371
    );
    assert_eq!(KMCL_SERVER_INTERFACE_VERSION_V1, 1);
    assert_eq!(KMCL_CLIENT_INTERFACE_VERSION_V1, 1);
}
