//! The one declaration of the simulator's `KMCL_SERVER_INTERFACE_V1` entry points, in table order:
//! each entry names the table slot, its [`KmclCall`] and the entry point's signature, then the
//! value returned if the simulator itself panics, then the body. `kmcl_entry_points!` (in the
//! parent module) expands it into the [`KmclCall`] enum and its `ALL` list, the 55 `extern`
//! functions with the guard every entry point needs, and `server_table`. Adding a KMCL function
//! is one entry here; a slot left out is a compile error in `server_table`.

use super::Refusal::{ClientOnly, Unmodelled};
use super::*;

kmcl_entry_points! {
client {
    VmbChannelAllocate => ChannelAllocate: fn vmb_channel_allocate(parent: PDEVICE_OBJECT, is_server: BOOLEAN, out: *mut VMBCHANNEL) -> NtStatus,
        neutral NtStatus::INVALID_PARAMETER,
        |call| {
            let Some((shared, _)) = resolve(call, handle::addr(parent), Kind::Device) else {
                return NtStatus::INVALID_PARAMETER_1;
            };
            if out.is_null() {
                bad_argument(&shared, call, "Channel out pointer is NULL");
                return NtStatus::INVALID_PARAMETER_3;
            }
            match shared.channel_allocate(is_server != 0) {
                Ok(h) => {
                    write_out(out, handle::to_ptr(h));
                    NtStatus::SUCCESS
                }
                Err(status) => {
                    write_out(out, core::ptr::null_mut());
                    status
                }
            }
        };

    VmbChannelCleanup => ChannelCleanup: fn vmb_channel_cleanup(ch: VMBCHANNEL),
        neutral (),
        |call| {
            if let Some((shared, seq)) = channel(call, ch) {
                shared.channel_cleanup(seq);
            }
        };

    VmbChannelCreateGpadlFromBuffer => ChannelCreateGpadlFromBuffer: fn vmb_channel_create_gpadl_from_buffer(ch: VMBCHANNEL, _flags: u32, _buffer: PVOID, _count: u32, gpadl: *mut u32) -> NtStatus,
        neutral NtStatus::NOT_SUPPORTED,
        |call| {
            write_out(gpadl, 0);
            refuse(channel(call, ch), call, ClientOnly, NtStatus::NOT_SUPPORTED)
        };

    VmbChannelCreateGpadlFromMdl => ChannelCreateGpadlFromMdl: fn vmb_channel_create_gpadl_from_mdl(ch: VMBCHANNEL, _flags: u32, _mdl: PMDL, _offset: u32, _length: u32, gpadl: *mut u32) -> NtStatus,
        neutral NtStatus::NOT_SUPPORTED,
        |call| {
            write_out(gpadl, 0);
            refuse(channel(call, ch), call, ClientOnly, NtStatus::NOT_SUPPORTED)
        };

    VmbChannelDeleteGpadl => ChannelDeleteGpadl: fn vmb_channel_delete_gpadl(ch: VMBCHANNEL, _gpadl: u32),
        neutral (),
        |call| refuse(channel(call, ch), call, ClientOnly, ());

    VmbChannelDisable => ChannelDisable: fn vmb_channel_disable(ch: VMBCHANNEL),
        neutral (),
        |call| {
            if let Some((shared, seq)) = channel(call, ch) {
                shared.channel_disable(seq);
            }
        };

    VmbChannelEnable => ChannelEnable: fn vmb_channel_enable(ch: VMBCHANNEL) -> NtStatus,
        neutral NtStatus::INVALID_PARAMETER_1,
        |call| match channel(call, ch) {
            Some((shared, seq)) => shared.channel_enable(seq),
            None => NtStatus::INVALID_PARAMETER_1,
        };

    VmbChannelGetInterfaceInstance => ChannelGetInterfaceInstance: fn vmb_channel_get_interface_instance(ch: VMBCHANNEL, out: *mut GUID),
        neutral (),
        |call| {
            let Some((shared, seq)) = channel(call, ch) else {
                return;
            };
            if let Some(guid) = shared.with_channel(seq, call, |c| c.interface_instance)
                && !write_out(out, guid)
            {
                bad_argument(&shared, call, "InterfaceInstance out pointer is NULL");
            }
        };

    VmbChannelGetMmioSpace => ChannelGetMmioSpace: fn vmb_channel_get_mmio_space(ch: VMBCHANNEL, address: *mut u64, size: *mut u64),
        neutral (),
        |call| {
            write_out(address, 0);
            write_out(size, 0);
            refuse(channel(call, ch), call, Unmodelled("guest MMIO space"), ())
        };

    VmbChannelGetPointer => ChannelGetPointer: fn vmb_channel_get_pointer(ch: VMBCHANNEL) -> PVOID,
        neutral core::ptr::null_mut(),
        |call| {
            on_channel(call, ch, |shared, seq| shared.with_channel(seq, call, |c| c.pointer.0))
                .flatten()
                .unwrap_or(core::ptr::null_mut())
        };

    VmbChannelInitSetClientContextSize => ChannelInitSetClientContextSize: fn vmb_channel_init_set_client_context_size(ch: VMBCHANNEL, size: u32) -> NtStatus,
        neutral NtStatus::INVALID_PARAMETER_1,
        |call| init(channel(call, ch), call, |c, _| {
            c.client_context_size = size;
            NtStatus::SUCCESS
        });

    VmbChannelInitSetFlags => ChannelInitSetFlags: fn vmb_channel_init_set_flags(ch: VMBCHANNEL, flags: u32) -> NtStatus,
        neutral NtStatus::INVALID_PARAMETER_1,
        |call| init(channel(call, ch), call, |c, found| {
            if flags & !VMBUS_CHANNEL_INIT_FLAGS != 0 {
                found.push((ViolationKind::InvalidArgument, format!("undefined flags {flags:#x}")));
                return NtStatus::INVALID_PARAMETER_2;
            }
            if flags & VMBUS_CHANNEL_INIT_FLAG_IS_PIPE != 0 {
                found.push((ViolationKind::Unmodelled, String::from("pipe mode is not modelled")));
                return NtStatus::NOT_SUPPORTED;
            }
            c.init_flags = flags;
            NtStatus::SUCCESS
        });

    VmbChannelInitSetFriendlyName => ChannelInitSetFriendlyName: fn vmb_channel_init_set_friendly_name(ch: VMBCHANNEL, name: *const UNICODE_STRING) -> NtStatus,
        neutral NtStatus::INVALID_PARAMETER_1,
        |call| {
            let Some((shared, seq)) = channel(call, ch) else {
                return NtStatus::INVALID_PARAMETER_1;
            };
            let name = read_unicode(name);
            shared.init_call(seq, call, |c, found| match name {
                // The header (19041 and later): a second call returns STATUS_INVALID_PARAMETER_2
                // (docs/kmcl-bindings.md, "Undocumented points").
                Ok(_) if c.friendly_name_set => {
                    found.push((
                        ViolationKind::InvalidArgument,
                        String::from("friendly name set twice"),
                    ));
                    NtStatus::INVALID_PARAMETER_2
                }
                Ok(name) => {
                    c.friendly_name = name;
                    c.friendly_name_set = true;
                    NtStatus::SUCCESS
                }
                Err(problem) => {
                    found.push((ViolationKind::InvalidArgument, String::from(problem)));
                    NtStatus::INVALID_PARAMETER_2
                }
            })
        };

    VmbChannelInitSetMaximumExternalData => ChannelInitSetMaximumExternalData: fn vmb_channel_init_set_maximum_external_data(ch: VMBCHANNEL, size: u32, chain: u32) -> NtStatus,
        neutral NtStatus::INVALID_PARAMETER_1,
        |call| init(channel(call, ch), call, |c, found| {
            if size == 0 {
                found.push((ViolationKind::InvalidArgument, String::from("DataSize is 0")));
                return NtStatus::INVALID_PARAMETER_2;
            }
            if chain == 0 {
                found.push((ViolationKind::InvalidArgument, String::from("ChainLength is 0")));
                return NtStatus::INVALID_PARAMETER_3;
            }
            c.max_external_data = (size, chain);
            NtStatus::SUCCESS
        });

    VmbChannelInitSetMaximumPacketSize => ChannelInitSetMaximumPacketSize: fn vmb_channel_init_set_maximum_packet_size(ch: VMBCHANNEL, size: u32) -> NtStatus,
        neutral NtStatus::INVALID_PARAMETER_1,
        |call| init(channel(call, ch), call, |c, found| {
            if size == 0 {
                found.push((ViolationKind::InvalidArgument, String::from("PacketSize is 0")));
                return NtStatus::INVALID_PARAMETER_2;
            }
            c.max_packet_size = size;
            NtStatus::SUCCESS
        });

    VmbChannelInitSetProcessPacketCallbacks => ChannelInitSetProcessPacketCallbacks: fn vmb_channel_init_set_process_packet_callbacks(ch: VMBCHANNEL, process: PFN_VMB_CHANNEL_PROCESS_PACKET, complete: PFN_VMB_CHANNEL_PROCESSING_COMPLETE) -> NtStatus,
        neutral NtStatus::INVALID_PARAMETER_1,
        |call| init(channel(call, ch), call, |c, found| {
            if process.is_none() {
                found.push((
                    ViolationKind::InvalidArgument,
                    String::from("ProcessPacketCallback is NULL (it is _In_)"),
                ));
                return NtStatus::INVALID_PARAMETER_2;
            }
            c.process_packet = process;
            c.processing_complete = complete;
            NtStatus::SUCCESS
        });

    VmbChannelInitSetStateChangeCallbacks => ChannelInitSetStateChangeCallbacks: fn vmb_channel_init_set_state_change_callbacks(ch: VMBCHANNEL, callbacks: *mut VMB_CHANNEL_STATE_CHANGE_CALLBACKS) -> NtStatus,
        neutral NtStatus::INVALID_PARAMETER_1,
        |call| {
            let Some((shared, seq)) = channel(call, ch) else {
                return NtStatus::INVALID_PARAMETER_1;
            };
            let read = if callbacks.is_null() {
                None
            } else {
                // SAFETY: the KMCL contract (`_In_`) is that a non-NULL pointer designates a
                // readable VMB_CHANNEL_STATE_CHANGE_CALLBACKS for the duration of the call; the
                // struct is copied with an unaligned read.
                Some(unsafe { callbacks.read_unaligned() })
            };
            shared.init_call(seq, call, |c, found| {
                let Some(cbs) = read else {
                    found.push((ViolationKind::InvalidArgument, String::from("callbacks pointer is NULL")));
                    return NtStatus::INVALID_PARAMETER_2;
                };
                let size = core::mem::size_of::<VMB_CHANNEL_STATE_CHANGE_CALLBACKS>() as u32;
                if cbs.Version != VMB_CHANNEL_STATE_CHANGE_CALLBACKS_VERSION_1 || cbs.Size != size {
                    found.push((
                        ViolationKind::InvalidArgument,
                        format!("Version {} / Size {} (expected 1 / {size})", cbs.Version, cbs.Size),
                    ));
                    return NtStatus::INVALID_PARAMETER_2;
                }
                c.state_callbacks = Some(cbs);
                NtStatus::SUCCESS
            })
        };

    VmbChannelPacketComplete => ChannelPacketComplete: fn vmb_channel_packet_complete(pc: VMBPACKETCOMPLETION, buffer: PVOID, size: u32),
        neutral (),
        |call| {
            let Some((shared, seq)) = completion(call, pc) else {
                return;
            };
            let reply = copy_in(&shared, call, buffer, size).unwrap_or_default();
            shared.incoming_complete(seq, Some(reply));
        };

    VmbChannelPacketDeferToPassive => ChannelPacketDeferToPassive: fn vmb_channel_packet_defer_to_passive(pc: VMBPACKETCOMPLETION),
        neutral (),
        |call| {
            if let Some((shared, seq)) = completion(call, pc) {
                shared.defer_to_passive(seq);
            }
        };

    VmbChannelPacketFail => ChannelPacketFail: fn vmb_channel_packet_fail(pc: VMBPACKETCOMPLETION),
        neutral (),
        |call| {
            if let Some((shared, seq)) = completion(call, pc) {
                shared.incoming_complete(seq, None);
            }
        };

    VmbChannelPacketGetExternalData => ChannelPacketGetExternalData: fn vmb_channel_packet_get_external_data(pc: VMBPACKETCOMPLETION, _flags: u32, mdl: *mut PMDL) -> NtStatus,
        neutral NtStatus::NOT_SUPPORTED,
        |call| {
            if let Some((shared, seq)) = completion(call, pc)
                && shared.check_live(call, Kind::Completion, seq)
            {
                unmodelled(&shared, call, "external data (the simulated guest never sends any)");
            }
            write_out(mdl, core::ptr::null_mut());
            NtStatus::NOT_SUPPORTED
        };

    VmbChannelPause => ChannelPause: fn vmb_channel_pause(ch: VMBCHANNEL),
        neutral (),
        |call| {
            if let Some((shared, seq)) = channel(call, ch) {
                shared.channel_pause(seq);
            }
        };

    VmbChannelSendSynchronousRequest => ChannelSendSynchronousRequest: fn vmb_channel_send_synchronous_request(ch: VMBCHANNEL, buffer: PVOID, size: u32, mdl: PMDL, flags: u32, _completion_buffer: PVOID, _completion_size: *mut u32, timeout: *mut i64) -> NtStatus,
        neutral NtStatus::NOT_SUPPORTED,
        |call| {
            let Some((shared, seq)) = channel(call, ch) else {
                return NtStatus::INVALID_PARAMETER_1;
            };
            if !mdl.is_null() {
                unmodelled(&shared, call, "external data MDLs");
                return NtStatus::NOT_SUPPORTED;
            }
            let zero_timeout = !timeout.is_null() && {
                // SAFETY: `_In_opt_ PLARGE_INTEGER`: a non-NULL `timeout` points to a readable
                // 8-byte value for the duration of the call; read unaligned.
                let value = unsafe { timeout.read_unaligned() };
                value == 0
            };
            if !zero_timeout || flags & VMBUS_CHANNEL_FORMAT_FLAG_WAIT_FOR_COMPLETION != 0 {
                bad_argument(
                    &shared,
                    call,
                    "the host may only call it with *Timeout == 0 and without WAIT_FOR_COMPLETION (docs/kmcl-bindings.md §R3)",
                );
                return NtStatus::NOT_SUPPORTED;
            }
            if flags & !VMBUS_CHANNEL_FORMAT_FLAGS != 0
                || flags & crate::state::MDL_ONLY_FORMAT_FLAGS != 0
            {
                bad_argument(
                    &shared,
                    call,
                    "undefined flag bits, or an MDL flag on a request without an MDL",
                );
                return NtStatus::INVALID_PARAMETER;
            }
            match copy_in(&shared, call, buffer, size) {
                Some(bytes) => shared.send_sync(seq, bytes),
                None => NtStatus::INVALID_PARAMETER_2,
            }
        };

    VmbChannelSetIncomingProcessingAtPassive => ChannelSetIncomingProcessingAtPassive: fn vmb_channel_set_incoming_processing_at_passive(ch: VMBCHANNEL, passive: BOOLEAN),
        neutral (),
        |call| {
            if let Some((shared, seq)) = channel(call, ch) {
                shared.set_incoming_at_passive(seq, passive != 0);
            }
        };

    VmbChannelSetInterruptLatency => ChannelSetInterruptLatency: fn vmb_channel_set_interrupt_latency(ch: VMBCHANNEL, _latency: u16, original: *mut u16) -> NtStatus,
        neutral NtStatus::NOT_SUPPORTED,
        |call| {
            write_out(original, 0);
            refuse(channel(call, ch), call, Unmodelled("guest interrupt latency"), NtStatus::NOT_SUPPORTED)
        };

    VmbChannelSetPointer => ChannelSetPointer: fn vmb_channel_set_pointer(ch: VMBCHANNEL, pointer: PVOID),
        neutral (),
        |call| {
            on_channel(call, ch, |shared, seq| {
                shared.with_channel(seq, call, |c| c.pointer = DriverPtr(pointer));
            });
        };

    VmbChannelSetTransactionQuota => ChannelSetTransactionQuota: fn vmb_channel_set_transaction_quota(ch: VMBCHANNEL, quota: u32),
        neutral (),
        |call| {
            if let Some((shared, seq)) = channel(call, ch) {
                shared.set_quota(seq, quota);
            }
        };

    VmbChannelSizeofPacket => ChannelSizeofPacket: fn vmb_channel_sizeof_packet(ch: VMBCHANNEL) -> u32,
        neutral 0,
        |call| refuse(channel(call, ch), call, Unmodelled("caller-allocated packets (VmbPacketInitialize)"), 0);

    VmbChannelStart => ChannelStart: fn vmb_channel_start(ch: VMBCHANNEL),
        neutral (),
        |call| {
            if let Some((shared, seq)) = channel(call, ch) {
                shared.channel_start(seq);
            }
        };

    VmbClientChannelInitSetRingBufferPageCount => ClientChannelInitSetRingBufferPageCount: fn vmb_client_channel_init_set_ring_buffer_page_count(ch: VMBCHANNEL, _incoming: u32, _outgoing: u32) -> NtStatus,
        neutral NtStatus::NOT_SUPPORTED,
        |call| refuse(channel(call, ch), call, ClientOnly, NtStatus::NOT_SUPPORTED);

    VmbClientChannelInitSetTargetPnp => ClientChannelInitSetTargetPnp: fn vmb_client_channel_init_set_target_pnp(ch: VMBCHANNEL, _interface_type: *const GUID, _interface_instance: *const GUID, _failure: PFN_VMB_CHANNEL_PNP_FAILURE) -> NtStatus,
        neutral NtStatus::NOT_SUPPORTED,
        |call| refuse(channel(call, ch), call, ClientOnly, NtStatus::NOT_SUPPORTED);

    VmbPacketAllocate => PacketAllocate: fn vmb_packet_allocate(ch: VMBCHANNEL) -> VMBPACKET,
        neutral core::ptr::null_mut(),
        |call| {
            on_channel(call, ch, |shared, seq| handle::to_ptr(shared.packet_allocate(seq)))
                .unwrap_or(core::ptr::null_mut())
        };

    VmbPacketFree => PacketFree: fn vmb_packet_free(p: VMBPACKET),
        neutral (),
        |call| {
            on_packet(call, p, |shared, seq| shared.packet_free(seq));
        };

    VmbPacketGetChannel => PacketGetChannel: fn vmb_packet_get_channel(p: VMBPACKET) -> VMBCHANNEL,
        neutral core::ptr::null_mut(),
        |call| {
            packet(call, p)
                .and_then(|(shared, seq)| {
                    let ch = shared.with_packet(seq, call, |p| p.channel)?;
                    Some(handle::to_ptr(shared.handle(ch, Kind::Channel)))
                })
                .unwrap_or(core::ptr::null_mut())
        };

    VmbPacketGetPointer => PacketGetPointer: fn vmb_packet_get_pointer(p: VMBPACKET) -> PVOID,
        neutral core::ptr::null_mut(),
        |call| {
            on_packet(call, p, |shared, seq| shared.with_packet(seq, call, |p| p.pointer.0))
                .flatten()
                .unwrap_or(core::ptr::null_mut())
        };

    VmbPacketInitialize => PacketInitialize: fn vmb_packet_initialize(ch: VMBCHANNEL, _p: VMBPACKET, _count: u32) -> NtStatus,
        neutral NtStatus::NOT_SUPPORTED,
        |call| refuse(channel(call, ch), call, Unmodelled("caller-allocated packets (VmbPacketInitialize)"), NtStatus::NOT_SUPPORTED);

    VmbPacketSend => PacketSend: fn vmb_packet_send(p: VMBPACKET, buffer: PVOID, length: u32, mdl: PMDL, flags: u32) -> NtStatus,
        neutral NtStatus::INVALID_PARAMETER,
        |call| {
            on_packet(call, p, |shared, seq| {
                if !mdl.is_null() {
                    unmodelled(shared, call, "external data MDLs");
                    return NtStatus::NOT_SUPPORTED;
                }
                match copy_in(shared, call, buffer, length) {
                    Some(bytes) => shared.packet_send(seq, bytes, flags),
                    None => NtStatus::INVALID_PARAMETER_2,
                }
            })
            .unwrap_or(NtStatus::INVALID_PARAMETER_1)
        };

    VmbPacketSendWithExternalMdl => PacketSendWithExternalMdl: fn vmb_packet_send_with_external_mdl(p: VMBPACKET, _buffer: PVOID, _length: u32, _mdl: PMDL, _offset: u32, _mdl_length: u32, _flags: u32) -> NtStatus,
        neutral NtStatus::NOT_SUPPORTED,
        |call| refuse(packet(call, p), call, Unmodelled("external data MDLs"), NtStatus::NOT_SUPPORTED);

    VmbPacketSendWithExternalPfns => PacketSendWithExternalPfns: fn vmb_packet_send_with_external_pfns(p: VMBPACKET, _buffer: PVOID, _length: u32, _pfns: *mut PFN_NUMBER, _pfn_length: u32, _flags: u32) -> NtStatus,
        neutral NtStatus::NOT_SUPPORTED,
        |call| refuse(packet(call, p), call, Unmodelled("external data PFNs"), NtStatus::NOT_SUPPORTED);

    VmbPacketSetCompletionRoutine => PacketSetCompletionRoutine: fn vmb_packet_set_completion_routine(p: VMBPACKET, routine: PFN_VMB_PACKET_COMPLETION_ROUTINE),
        neutral (),
        |call| {
            on_packet(call, p, |shared, seq| shared.packet_set_routine(seq, routine));
        };

    VmbPacketSetPointer => PacketSetPointer: fn vmb_packet_set_pointer(p: VMBPACKET, pointer: PVOID),
        neutral (),
        |call| {
            on_packet(call, p, |shared, seq| {
                shared.with_packet(seq, call, |p| p.pointer = DriverPtr(pointer));
            });
        };
}
server {
    VmbChannelMapGpadl => ChannelMapGpadl: fn vmb_channel_map_gpadl(ch: VMBCHANNEL, _flags: u32, _gpadl: u32, mdl: *mut PMDL) -> NtStatus,
        neutral NtStatus::NOT_SUPPORTED,
        |call| {
            write_out(mdl, core::ptr::null_mut());
            refuse(channel(call, ch), call, Unmodelled("GPADLs"), NtStatus::NOT_SUPPORTED)
        };

    VmbChannelRestoreFromBuffer => ChannelRestoreFromBuffer: fn vmb_channel_restore_from_buffer(ch: VMBCHANNEL, buffer: PVOID, size: u32) -> NtStatus,
        neutral NtStatus::INVALID_PARAMETER,
        |call| {
            let Some((shared, seq)) = channel(call, ch) else {
                return NtStatus::INVALID_PARAMETER_1;
            };
            // Copied in before any driver callback runs, into the buffer restored packets share.
            match copy_in_as(&shared, call, buffer, size, shared_copy) {
                Some(chunk) => shared.restore_from_buffer(seq, &chunk),
                None => NtStatus::INVALID_PARAMETER_2,
            }
        };

    VmbChannelSaveBegin => ChannelSaveBegin: fn vmb_channel_save_begin(ch: VMBCHANNEL) -> NtStatus,
        neutral NtStatus::INVALID_PARAMETER_1,
        |call| match channel(call, ch) {
            Some((shared, seq)) => shared.save_begin(seq),
            None => NtStatus::INVALID_PARAMETER_1,
        };

    VmbChannelSaveContinue => ChannelSaveContinue: fn vmb_channel_save_continue(ch: VMBCHANNEL, buffer: PVOID, size: u32, filled: *mut u32, required: *mut u32) -> NtStatus,
        neutral NtStatus::INVALID_PARAMETER,
        |call| {
            let Some((shared, seq)) = channel(call, ch) else {
                return NtStatus::INVALID_PARAMETER_1;
            };
            if filled.is_null() || required.is_null() {
                bad_argument(&shared, call, "BytesFilled or BytesRequired is NULL");
                return NtStatus::INVALID_PARAMETER;
            }
            write_out(filled, 0);
            write_out(required, 0);
            let size = if buffer.is_null() {
                if size != 0 {
                    bad_argument(&shared, call, "NULL SaveBuffer with a nonzero size");
                    return NtStatus::INVALID_PARAMETER_2;
                }
                0
            } else {
                size
            };
            let out = shared.save_continue(seq, size as usize);
            if !out.chunk.is_empty() {
                let n = out.chunk.len().min(size as usize);
                // The source is a simulator-owned Vec: it cannot overlap driver memory.
                // SAFETY: `_Out_writes_bytes_to_(SaveBufferSize, ..)`: the non-NULL `buffer` has
                // `size` writable bytes for the call, and `n <= size`.
                unsafe {
                    core::ptr::copy_nonoverlapping(out.chunk.as_ptr(), buffer.cast::<u8>(), n)
                };
                write_out(filled, u32::try_from(n).unwrap_or(u32::MAX));
            }
            write_out(required, out.required);
            out.status
        };

    VmbChannelSaveEnd => ChannelSaveEnd: fn vmb_channel_save_end(ch: VMBCHANNEL),
        neutral (),
        |call| {
            if let Some((shared, seq)) = channel(call, ch) {
                shared.save_end(seq);
            }
        };

    VmbChannelUnmapGpadl => ChannelUnmapGpadl: fn vmb_channel_unmap_gpadl(ch: VMBCHANNEL, _gpadl: u32),
        neutral (),
        |call| refuse(channel(call, ch), call, Unmodelled("GPADLs"), ());

    VmbConvertVmbusHandleToKernelHandle => ConvertVmbusHandleToKernelHandle: fn vmb_convert_vmbus_handle_to_kernel_handle(_vmbus_handle: HANDLE, kernel_handle: *mut HANDLE) -> NtStatus,
        neutral NtStatus::NOT_SUPPORTED,
        |call| {
            orphan(
                call,
                ViolationKind::Unmodelled,
                String::from("VMBus handle conversion is not modelled"),
            );
            write_out(kernel_handle, core::ptr::null_mut());
            NtStatus::NOT_SUPPORTED
        };

    VmbPacketRestore => PacketRestore: fn vmb_packet_restore(p: VMBPACKET, buffer: PVOID, size: u32) -> NtStatus,
        neutral NtStatus::INVALID_PARAMETER,
        |call| {
            on_packet(call, p, |shared, seq| {
                with_bytes_in_place(shared, call, buffer, size, |bytes| {
                    shared.packet_restore(seq, bytes)
                })
            })
            .unwrap_or(NtStatus::INVALID_PARAMETER_1)
        };

    VmbServerChannelInitSetFlags => ServerChannelInitSetFlags: fn vmb_server_channel_init_set_flags(ch: VMBCHANNEL, flags: u32) -> NtStatus,
        neutral NtStatus::INVALID_PARAMETER_1,
        |call| init(channel(call, ch), call, |c, found| {
            if flags & !VMBUS_SERVER_CHANNEL_INIT_FLAGS != 0 {
                found.push((ViolationKind::InvalidArgument, format!("undefined flags {flags:#x}")));
                return NtStatus::INVALID_PARAMETER_2;
            }
            let unsupported = VMBUS_SERVER_CHANNEL_INIT_FLAG_OFFER_AS_PIPE
                | VMBUS_SERVER_CHANNEL_INIT_FLAG_TLNPI_PROVIDER_OFFER;
            if flags & unsupported != 0 {
                found.push((
                    ViolationKind::Unmodelled,
                    String::from("pipe / socket offers are not modelled"),
                ));
                return NtStatus::NOT_SUPPORTED;
            }
            c.server_flags = flags;
            NtStatus::SUCCESS
        });

    VmbServerChannelInitSetMmioMegabytes => ServerChannelInitSetMmioMegabytes: fn vmb_server_channel_init_set_mmio_megabytes(ch: VMBCHANNEL, megabytes: u16, optional: u16) -> NtStatus,
        neutral NtStatus::INVALID_PARAMETER_1,
        |call| init(channel(call, ch), call, |c, found| {
            if megabytes == 0 && optional == 0 {
                found.push((ViolationKind::InvalidArgument, String::from("both sizes are 0")));
                return NtStatus::INVALID_PARAMETER;
            }
            c.mmio_megabytes = (megabytes, optional);
            NtStatus::SUCCESS
        });

    VmbServerChannelInitSetSaveRestorePacketCallbacks => ServerChannelInitSetSaveRestorePacketCallbacks: fn vmb_server_channel_init_set_save_restore_packet_callbacks(ch: VMBCHANNEL, save: PFN_VMB_CHANNEL_SAVE_PACKET, restore: PFN_VMB_CHANNEL_RESTORE_PACKET) -> NtStatus,
        neutral NtStatus::INVALID_PARAMETER_1,
        |call| init(channel(call, ch), call, |c, found| {
            if save.is_none() || restore.is_none() {
                found.push((
                    ViolationKind::InvalidArgument,
                    String::from("both callbacks are _In_ (non-NULL)"),
                ));
                return NtStatus::INVALID_PARAMETER_2;
            }
            c.save_packet = save;
            c.restore_packet = restore;
            NtStatus::SUCCESS
        });

    VmbServerChannelInitSetTargetInterfaceId => ServerChannelInitSetTargetInterfaceId: fn vmb_server_channel_init_set_target_interface_id(ch: VMBCHANNEL, interface_type: GUID, interface_instance: GUID) -> NtStatus,
        neutral NtStatus::INVALID_PARAMETER_1,
        |call| init(channel(call, ch), call, |c, _| {
            c.interface_type = interface_type;
            c.interface_instance = interface_instance;
            NtStatus::SUCCESS
        });

    VmbServerChannelInitSetTargetVtl => ServerChannelInitSetTargetVtl: fn vmb_server_channel_init_set_target_vtl(ch: VMBCHANNEL, vtl: u8) -> NtStatus,
        neutral NtStatus::INVALID_PARAMETER_1,
        |call| init(channel(call, ch), call, |c, found| {
            if vtl > 2 {
                found.push((ViolationKind::InvalidArgument, format!("VTL {vtl} does not exist")));
                return NtStatus::INVALID_PARAMETER_2;
            }
            c.target_vtl = vtl;
            NtStatus::SUCCESS
        });

    VmbServerChannelInitSetVmbusHandle => ServerChannelInitSetVmbusHandle: fn vmb_server_channel_init_set_vmbus_handle(ch: VMBCHANNEL, vmbus: HANDLE) -> NtStatus,
        neutral NtStatus::INVALID_PARAMETER_1,
        |call| init(channel(call, ch), call, |c, _| {
            c.vmbus_handle = handle::addr(vmbus);
            NtStatus::SUCCESS
        });
}
}
