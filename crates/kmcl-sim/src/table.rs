//! The simulator's `KMCL_SERVER_INTERFACE_V1`: 55 global entry points with the table's exact ABI
//! (`kmcl_fn!`), plus `InterfaceReference` / `InterfaceDereference`.
//!
//! Each entry point: catches any simulator panic (a panic must not unwind out of an `extern` fn),
//! decodes its handle (never dereferencing it), copies driver buffers in or out after checking
//! them, and calls the safe operation in `core.rs` on the instance the handle belongs to.

use core::ffi::c_void;
use core::panic::AssertUnwindSafe;
use std::format;
use std::string::String;
use std::sync::Arc;
use std::vec::Vec;

use super::config::KmclCall;
use super::handle::{self, Kind};
use super::irql;
use super::state::{DriverPtr, Shared};
use super::verifier::{self, Violation, ViolationKind};
use kmcl::NtStatus;
use kmcl_sys::kmcl_fn;
use kmcl_sys::*;

// ---- helpers -----------------------------------------------------------------------------------

/// Runs an entry point's body, turning a simulator panic into a recorded violation and `neutral`.
fn guard<R>(call: KmclCall, neutral: R, body: impl FnOnce() -> R) -> R {
    match std::panic::catch_unwind(AssertUnwindSafe(body)) {
        Ok(result) => result,
        Err(_) => {
            orphan(
                call,
                ViolationKind::InternalError,
                String::from("panic inside the simulator (a simulator bug)"),
            );
            neutral
        }
    }
}

/// Records a violation that names no live instance: on the instance whose callback this thread is
/// running, else on the thread's unattributed list.
fn orphan(call: KmclCall, kind: ViolationKind, detail: String) {
    if let Some(shared) = irql::top_frame().and_then(|f| handle::lookup(f.instance)) {
        shared.lock().violation(kind, Some(call), detail);
        return;
    }
    verifier::record_unattributed(Violation {
        kind,
        call: Some(call),
        detail,
    });
}

/// Decodes a handle of the expected kind to its instance and sequence number; records a violation
/// and returns `None` for NULL, garbage, a dead instance, or the wrong kind.
fn resolve(call: KmclCall, address: usize, kind: Kind) -> Option<(Arc<Shared>, u32)> {
    let Some(token) = handle::decode(address) else {
        orphan(
            call,
            ViolationKind::InvalidHandle,
            format!("{kind:?} handle {address:#x} was never issued by a simulator"),
        );
        return None;
    };
    let Some(shared) = handle::lookup(token.instance) else {
        orphan(
            call,
            ViolationKind::StaleHandle,
            format!(
                "{kind:?} handle of simulator instance {} which no longer exists",
                token.instance
            ),
        );
        return None;
    };
    if token.kind != kind {
        shared.lock().violation(
            ViolationKind::WrongHandleType,
            Some(call),
            format!("expected a {kind:?} handle, got a {:?} handle", token.kind),
        );
        return None;
    }
    Some((shared, token.seq))
}

fn channel(call: KmclCall, ch: VMBCHANNEL) -> Option<(Arc<Shared>, u32)> {
    resolve(call, handle::addr(ch), Kind::Channel)
}

fn packet(call: KmclCall, p: VMBPACKET) -> Option<(Arc<Shared>, u32)> {
    resolve(call, handle::addr(p), Kind::Packet)
}

fn completion(call: KmclCall, pc: VMBPACKETCOMPLETION) -> Option<(Arc<Shared>, u32)> {
    resolve(call, handle::addr(pc), Kind::Completion)
}

fn bad_argument(shared: &Shared, call: KmclCall, detail: &str) {
    shared
        .lock()
        .violation(ViolationKind::InvalidArgument, Some(call), detail);
}

/// Copies `len` bytes in from a driver buffer (`_In_reads_bytes_(len)`); `None` (and a violation)
/// for NULL with a nonzero length.
fn copy_in(shared: &Shared, call: KmclCall, ptr: *const c_void, len: u32) -> Option<Vec<u8>> {
    if len == 0 {
        return Some(Vec::new());
    }
    if ptr.is_null() {
        bad_argument(shared, call, "NULL buffer with a nonzero length");
        return None;
    }
    // SAFETY: the KMCL contract (`_In_reads_bytes_(len)`) is that the caller passes `len` readable,
    // initialized bytes at `ptr` for the duration of the call; `ptr` was checked non-NULL and a
    // byte slice has no alignment requirement. The bytes are copied before returning.
    let bytes = unsafe { core::slice::from_raw_parts(ptr.cast::<u8>(), len as usize) };
    Some(bytes.to_vec())
}

/// Writes an out parameter if the pointer is not NULL; returns whether it wrote.
fn write_out<T>(ptr: *mut T, value: T) -> bool {
    if ptr.is_null() {
        return false;
    }
    // SAFETY: the KMCL contract (`_Out_`) is that a non-NULL out pointer designates writable
    // storage for one `T` for the duration of the call; `write_unaligned` needs no alignment.
    unsafe { ptr.write_unaligned(value) };
    true
}

fn unmodelled(shared: &Shared, call: KmclCall, what: &str) {
    shared.unmodelled(
        call,
        ViolationKind::Unmodelled,
        &format!("{what} is not modelled by the simulator"),
    );
}

fn client_only(shared: &Shared, call: KmclCall) {
    shared.unmodelled(
        call,
        ViolationKind::ClientOnly,
        "client-only call on a server channel (kmcl-reference §2.2)",
    );
}

// ---- INTERFACE header ----------------------------------------------------------------------------

kmcl_fn! {
    unsafe fn interface_reference(context: PVOID) {
        guard(KmclCall::ChannelAllocate, (), || {
            if let Some((shared, _)) = resolve_bus(context) {
                shared.interface_ref(1);
            }
        });
    }
}

kmcl_fn! {
    unsafe fn interface_dereference(context: PVOID) {
        guard(KmclCall::ChannelAllocate, (), || {
            if let Some((shared, _)) = resolve_bus(context) {
                shared.interface_ref(-1);
            }
        });
    }
}

fn resolve_bus(context: PVOID) -> Option<(Arc<Shared>, u32)> {
    let address = handle::addr(context);
    let token = handle::decode(address).filter(|t| t.kind == Kind::Bus);
    let Some(shared) = token.and_then(|t| handle::lookup(t.instance)) else {
        verifier::record_unattributed(Violation {
            kind: ViolationKind::InvalidHandle,
            call: None,
            detail: format!("interface Context {address:#x} is not a live simulator bus"),
        });
        return None;
    };
    Some((shared, 0))
}

// ---- client V1 entry points -----------------------------------------------------------------------

kmcl_fn! {
    unsafe fn vmb_channel_allocate(
        parent: PDEVICE_OBJECT,
        is_server: BOOLEAN,
        out: *mut VMBCHANNEL,
    ) -> NtStatus {
        let call = KmclCall::ChannelAllocate;
        guard(call, NtStatus::INVALID_PARAMETER, || {
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
        })
    }
}

kmcl_fn! {
    unsafe fn vmb_channel_cleanup(ch: VMBCHANNEL) {
        let call = KmclCall::ChannelCleanup;
        guard(call, (), || {
            if let Some((shared, seq)) = channel(call, ch) {
                shared.channel_cleanup(seq);
            }
        });
    }
}

kmcl_fn! {
    unsafe fn vmb_channel_create_gpadl_from_buffer(
        ch: VMBCHANNEL,
        _flags: u32,
        _buffer: PVOID,
        _count: u32,
        gpadl: *mut u32,
    ) -> NtStatus {
        let call = KmclCall::ChannelCreateGpadlFromBuffer;
        guard(call, NtStatus::NOT_SUPPORTED, || {
            if let Some((shared, _)) = channel(call, ch) {
                client_only(&shared, call);
            }
            write_out(gpadl, 0);
            NtStatus::NOT_SUPPORTED
        })
    }
}

kmcl_fn! {
    unsafe fn vmb_channel_create_gpadl_from_mdl(
        ch: VMBCHANNEL,
        _flags: u32,
        _mdl: PMDL,
        _offset: u32,
        _length: u32,
        gpadl: *mut u32,
    ) -> NtStatus {
        let call = KmclCall::ChannelCreateGpadlFromMdl;
        guard(call, NtStatus::NOT_SUPPORTED, || {
            if let Some((shared, _)) = channel(call, ch) {
                client_only(&shared, call);
            }
            write_out(gpadl, 0);
            NtStatus::NOT_SUPPORTED
        })
    }
}

kmcl_fn! {
    unsafe fn vmb_channel_delete_gpadl(ch: VMBCHANNEL, _gpadl: u32) {
        let call = KmclCall::ChannelDeleteGpadl;
        guard(call, (), || {
            if let Some((shared, _)) = channel(call, ch) {
                client_only(&shared, call);
            }
        });
    }
}

kmcl_fn! {
    unsafe fn vmb_channel_disable(ch: VMBCHANNEL) {
        let call = KmclCall::ChannelDisable;
        guard(call, (), || {
            if let Some((shared, seq)) = channel(call, ch) {
                shared.channel_disable(seq);
            }
        });
    }
}

kmcl_fn! {
    unsafe fn vmb_channel_enable(ch: VMBCHANNEL) -> NtStatus {
        let call = KmclCall::ChannelEnable;
        guard(call, NtStatus::INVALID_PARAMETER_1, || match channel(call, ch) {
            Some((shared, seq)) => shared.channel_enable(seq),
            None => NtStatus::INVALID_PARAMETER_1,
        })
    }
}

kmcl_fn! {
    unsafe fn vmb_channel_get_interface_instance(ch: VMBCHANNEL, out: *mut GUID) {
        let call = KmclCall::ChannelGetInterfaceInstance;
        guard(call, (), || {
            let Some((shared, seq)) = channel(call, ch) else {
                return;
            };
            if let Some(guid) = shared.with_channel(seq, call, |c| c.interface_instance)
                && !write_out(out, guid)
            {
                bad_argument(&shared, call, "InterfaceInstance out pointer is NULL");
            }
        });
    }
}

kmcl_fn! {
    unsafe fn vmb_channel_get_mmio_space(ch: VMBCHANNEL, address: *mut u64, size: *mut u64) {
        let call = KmclCall::ChannelGetMmioSpace;
        guard(call, (), || {
            if let Some((shared, _)) = channel(call, ch) {
                unmodelled(&shared, call, "guest MMIO space");
            }
            write_out(address, 0);
            write_out(size, 0);
        });
    }
}

kmcl_fn! {
    unsafe fn vmb_channel_get_pointer(ch: VMBCHANNEL) -> PVOID {
        let call = KmclCall::ChannelGetPointer;
        guard(call, core::ptr::null_mut(), || {
            channel(call, ch)
                .and_then(|(shared, seq)| shared.with_channel(seq, call, |c| c.pointer.0))
                .unwrap_or(core::ptr::null_mut())
        })
    }
}

kmcl_fn! {
    unsafe fn vmb_channel_init_set_client_context_size(ch: VMBCHANNEL, size: u32) -> NtStatus {
        let call = KmclCall::ChannelInitSetClientContextSize;
        guard(call, NtStatus::INVALID_PARAMETER_1, || match channel(call, ch) {
            Some((shared, seq)) => shared.init_call(seq, call, |c, _| {
                c.client_context_size = size;
                NtStatus::SUCCESS
            }),
            None => NtStatus::INVALID_PARAMETER_1,
        })
    }
}

kmcl_fn! {
    unsafe fn vmb_channel_init_set_flags(ch: VMBCHANNEL, flags: u32) -> NtStatus {
        let call = KmclCall::ChannelInitSetFlags;
        guard(call, NtStatus::INVALID_PARAMETER_1, || match channel(call, ch) {
            Some((shared, seq)) => shared.init_call(seq, call, |c, found| {
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
            }),
            None => NtStatus::INVALID_PARAMETER_1,
        })
    }
}

/// Reads a `UNICODE_STRING` the driver passed; `Err` describes what is wrong with it.
fn read_unicode(name: *const UNICODE_STRING) -> Result<String, &'static str> {
    if name.is_null() {
        return Err("Name is NULL");
    }
    // SAFETY: the KMCL contract (`PCUNICODE_STRING`, `_In_`) is that a non-NULL `name` points to a
    // readable UNICODE_STRING for the duration of the call; read_unaligned needs no alignment.
    let us = unsafe { name.read_unaligned() };
    if us.Length % 2 != 0 || us.Length > us.MaximumLength {
        return Err("UNICODE_STRING Length is odd or exceeds MaximumLength");
    }
    if us.Length == 0 {
        return Ok(String::new());
    }
    if us.Buffer.is_null() || !us.Buffer.is_aligned() {
        return Err("UNICODE_STRING Buffer is NULL or misaligned");
    }
    // SAFETY: a valid UNICODE_STRING's `Buffer` holds `Length` bytes (`Length / 2` UTF-16 units)
    // of readable memory; it was checked non-NULL and 2-byte aligned. The units are copied out.
    let units = unsafe { core::slice::from_raw_parts(us.Buffer, usize::from(us.Length / 2)) };
    Ok(String::from_utf16_lossy(units))
}

kmcl_fn! {
    unsafe fn vmb_channel_init_set_friendly_name(
        ch: VMBCHANNEL,
        name: *const UNICODE_STRING,
    ) -> NtStatus {
        let call = KmclCall::ChannelInitSetFriendlyName;
        guard(call, NtStatus::INVALID_PARAMETER_1, || {
            let Some((shared, seq)) = channel(call, ch) else {
                return NtStatus::INVALID_PARAMETER_1;
            };
            let name = read_unicode(name);
            shared.init_call(seq, call, |c, found| match name {
                // The header (19041 and later): a second call returns STATUS_INVALID_PARAMETER_2
                // (kmcl-reference §0.1).
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
        })
    }
}

kmcl_fn! {
    unsafe fn vmb_channel_init_set_maximum_external_data(
        ch: VMBCHANNEL,
        size: u32,
        chain: u32,
    ) -> NtStatus {
        let call = KmclCall::ChannelInitSetMaximumExternalData;
        guard(call, NtStatus::INVALID_PARAMETER_1, || match channel(call, ch) {
            Some((shared, seq)) => shared.init_call(seq, call, |c, found| {
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
            }),
            None => NtStatus::INVALID_PARAMETER_1,
        })
    }
}

kmcl_fn! {
    unsafe fn vmb_channel_init_set_maximum_packet_size(ch: VMBCHANNEL, size: u32) -> NtStatus {
        let call = KmclCall::ChannelInitSetMaximumPacketSize;
        guard(call, NtStatus::INVALID_PARAMETER_1, || match channel(call, ch) {
            Some((shared, seq)) => shared.init_call(seq, call, |c, found| {
                if size == 0 {
                    found.push((ViolationKind::InvalidArgument, String::from("PacketSize is 0")));
                    return NtStatus::INVALID_PARAMETER_2;
                }
                c.max_packet_size = size;
                NtStatus::SUCCESS
            }),
            None => NtStatus::INVALID_PARAMETER_1,
        })
    }
}

kmcl_fn! {
    unsafe fn vmb_channel_init_set_process_packet_callbacks(
        ch: VMBCHANNEL,
        process: PFN_VMB_CHANNEL_PROCESS_PACKET,
        complete: PFN_VMB_CHANNEL_PROCESSING_COMPLETE,
    ) -> NtStatus {
        let call = KmclCall::ChannelInitSetProcessPacketCallbacks;
        guard(call, NtStatus::INVALID_PARAMETER_1, || match channel(call, ch) {
            Some((shared, seq)) => shared.init_call(seq, call, |c, found| {
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
            }),
            None => NtStatus::INVALID_PARAMETER_1,
        })
    }
}

kmcl_fn! {
    unsafe fn vmb_channel_init_set_state_change_callbacks(
        ch: VMBCHANNEL,
        callbacks: *mut VMB_CHANNEL_STATE_CHANGE_CALLBACKS,
    ) -> NtStatus {
        let call = KmclCall::ChannelInitSetStateChangeCallbacks;
        guard(call, NtStatus::INVALID_PARAMETER_1, || {
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
        })
    }
}

kmcl_fn! {
    unsafe fn vmb_channel_packet_complete(pc: VMBPACKETCOMPLETION, buffer: PVOID, size: u32) {
        let call = KmclCall::ChannelPacketComplete;
        guard(call, (), || {
            let Some((shared, seq)) = completion(call, pc) else {
                return;
            };
            let reply = copy_in(&shared, call, buffer, size).unwrap_or_default();
            shared.incoming_complete(seq, Some(reply));
        });
    }
}

kmcl_fn! {
    unsafe fn vmb_channel_packet_defer_to_passive(pc: VMBPACKETCOMPLETION) {
        let call = KmclCall::ChannelPacketDeferToPassive;
        guard(call, (), || {
            if let Some((shared, seq)) = completion(call, pc) {
                shared.defer_to_passive(seq);
            }
        });
    }
}

kmcl_fn! {
    unsafe fn vmb_channel_packet_fail(pc: VMBPACKETCOMPLETION) {
        let call = KmclCall::ChannelPacketFail;
        guard(call, (), || {
            if let Some((shared, seq)) = completion(call, pc) {
                shared.incoming_complete(seq, None);
            }
        });
    }
}

kmcl_fn! {
    unsafe fn vmb_channel_packet_get_external_data(
        pc: VMBPACKETCOMPLETION,
        _flags: u32,
        mdl: *mut PMDL,
    ) -> NtStatus {
        let call = KmclCall::ChannelPacketGetExternalData;
        guard(call, NtStatus::NOT_SUPPORTED, || {
            if let Some((shared, seq)) = completion(call, pc)
                && shared.check_live(call, Kind::Completion, seq)
            {
                unmodelled(&shared, call, "external data (the simulated guest never sends any)");
            }
            write_out(mdl, core::ptr::null_mut());
            NtStatus::NOT_SUPPORTED
        })
    }
}

kmcl_fn! {
    unsafe fn vmb_channel_pause(ch: VMBCHANNEL) {
        let call = KmclCall::ChannelPause;
        guard(call, (), || {
            if let Some((shared, seq)) = channel(call, ch) {
                shared.channel_pause(seq);
            }
        });
    }
}

kmcl_fn! {
    unsafe fn vmb_channel_send_synchronous_request(
        ch: VMBCHANNEL,
        buffer: PVOID,
        size: u32,
        mdl: PMDL,
        flags: u32,
        _completion_buffer: PVOID,
        _completion_size: *mut u32,
        timeout: *mut i64,
    ) -> NtStatus {
        let call = KmclCall::ChannelSendSynchronousRequest;
        guard(call, NtStatus::NOT_SUPPORTED, || {
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
                    "the host may only call it with *Timeout == 0 and without WAIT_FOR_COMPLETION (§2.5)",
                );
                return NtStatus::NOT_SUPPORTED;
            }
            if flags & !VMBUS_CHANNEL_FORMAT_FLAGS != 0
                || flags & super::state::MDL_ONLY_FORMAT_FLAGS != 0
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
        })
    }
}

kmcl_fn! {
    unsafe fn vmb_channel_set_incoming_processing_at_passive(ch: VMBCHANNEL, passive: BOOLEAN) {
        let call = KmclCall::ChannelSetIncomingProcessingAtPassive;
        guard(call, (), || {
            if let Some((shared, seq)) = channel(call, ch) {
                shared.set_incoming_at_passive(seq, passive != 0);
            }
        });
    }
}

kmcl_fn! {
    unsafe fn vmb_channel_set_interrupt_latency(
        ch: VMBCHANNEL,
        _latency: u16,
        original: *mut u16,
    ) -> NtStatus {
        let call = KmclCall::ChannelSetInterruptLatency;
        guard(call, NtStatus::NOT_SUPPORTED, || {
            if let Some((shared, _)) = channel(call, ch) {
                unmodelled(&shared, call, "guest interrupt latency");
            }
            write_out(original, 0);
            NtStatus::NOT_SUPPORTED
        })
    }
}

kmcl_fn! {
    unsafe fn vmb_channel_set_pointer(ch: VMBCHANNEL, pointer: PVOID) {
        let call = KmclCall::ChannelSetPointer;
        guard(call, (), || {
            if let Some((shared, seq)) = channel(call, ch) {
                shared.with_channel(seq, call, |c| c.pointer = DriverPtr(pointer));
            }
        });
    }
}

kmcl_fn! {
    unsafe fn vmb_channel_set_transaction_quota(ch: VMBCHANNEL, quota: u32) {
        let call = KmclCall::ChannelSetTransactionQuota;
        guard(call, (), || {
            if let Some((shared, seq)) = channel(call, ch) {
                shared.set_quota(seq, quota);
            }
        });
    }
}

kmcl_fn! {
    unsafe fn vmb_channel_sizeof_packet(ch: VMBCHANNEL) -> u32 {
        let call = KmclCall::ChannelSizeofPacket;
        guard(call, 0, || {
            if let Some((shared, _)) = channel(call, ch) {
                unmodelled(&shared, call, "caller-allocated packets (VmbPacketInitialize)");
            }
            0
        })
    }
}

kmcl_fn! {
    unsafe fn vmb_channel_start(ch: VMBCHANNEL) {
        let call = KmclCall::ChannelStart;
        guard(call, (), || {
            if let Some((shared, seq)) = channel(call, ch) {
                shared.channel_start(seq);
            }
        });
    }
}

kmcl_fn! {
    unsafe fn vmb_client_channel_init_set_ring_buffer_page_count(
        ch: VMBCHANNEL,
        _incoming: u32,
        _outgoing: u32,
    ) -> NtStatus {
        let call = KmclCall::ClientChannelInitSetRingBufferPageCount;
        guard(call, NtStatus::NOT_SUPPORTED, || {
            if let Some((shared, _)) = channel(call, ch) {
                client_only(&shared, call);
            }
            NtStatus::NOT_SUPPORTED
        })
    }
}

kmcl_fn! {
    unsafe fn vmb_client_channel_init_set_target_pnp(
        ch: VMBCHANNEL,
        _interface_type: *const GUID,
        _interface_instance: *const GUID,
        _failure: PFN_VMB_CHANNEL_PNP_FAILURE,
    ) -> NtStatus {
        let call = KmclCall::ClientChannelInitSetTargetPnp;
        guard(call, NtStatus::NOT_SUPPORTED, || {
            if let Some((shared, _)) = channel(call, ch) {
                client_only(&shared, call);
            }
            NtStatus::NOT_SUPPORTED
        })
    }
}

kmcl_fn! {
    unsafe fn vmb_packet_allocate(ch: VMBCHANNEL) -> VMBPACKET {
        let call = KmclCall::PacketAllocate;
        guard(call, core::ptr::null_mut(), || {
            channel(call, ch)
                .map(|(shared, seq)| handle::to_ptr(shared.packet_allocate(seq)))
                .unwrap_or(core::ptr::null_mut())
        })
    }
}

kmcl_fn! {
    unsafe fn vmb_packet_free(p: VMBPACKET) {
        let call = KmclCall::PacketFree;
        guard(call, (), || {
            if let Some((shared, seq)) = packet(call, p) {
                shared.packet_free(seq);
            }
        });
    }
}

kmcl_fn! {
    unsafe fn vmb_packet_get_channel(p: VMBPACKET) -> VMBCHANNEL {
        let call = KmclCall::PacketGetChannel;
        guard(call, core::ptr::null_mut(), || {
            packet(call, p)
                .and_then(|(shared, seq)| {
                    let ch = shared.with_packet(seq, call, |p| p.channel)?;
                    Some(handle::to_ptr(shared.handle(ch, Kind::Channel)))
                })
                .unwrap_or(core::ptr::null_mut())
        })
    }
}

kmcl_fn! {
    unsafe fn vmb_packet_get_pointer(p: VMBPACKET) -> PVOID {
        let call = KmclCall::PacketGetPointer;
        guard(call, core::ptr::null_mut(), || {
            packet(call, p)
                .and_then(|(shared, seq)| shared.with_packet(seq, call, |p| p.pointer.0))
                .unwrap_or(core::ptr::null_mut())
        })
    }
}

kmcl_fn! {
    unsafe fn vmb_packet_initialize(ch: VMBCHANNEL, _p: VMBPACKET, _count: u32) -> NtStatus {
        let call = KmclCall::PacketInitialize;
        guard(call, NtStatus::NOT_SUPPORTED, || {
            if let Some((shared, _)) = channel(call, ch) {
                unmodelled(&shared, call, "caller-allocated packets (VmbPacketInitialize)");
            }
            NtStatus::NOT_SUPPORTED
        })
    }
}

kmcl_fn! {
    unsafe fn vmb_packet_send(
        p: VMBPACKET,
        buffer: PVOID,
        length: u32,
        mdl: PMDL,
        flags: u32,
    ) -> NtStatus {
        let call = KmclCall::PacketSend;
        guard(call, NtStatus::INVALID_PARAMETER, || {
            let Some((shared, seq)) = packet(call, p) else {
                return NtStatus::INVALID_PARAMETER_1;
            };
            if !mdl.is_null() {
                unmodelled(&shared, call, "external data MDLs");
                return NtStatus::NOT_SUPPORTED;
            }
            match copy_in(&shared, call, buffer, length) {
                Some(bytes) => shared.packet_send(seq, bytes, flags),
                None => NtStatus::INVALID_PARAMETER_2,
            }
        })
    }
}

kmcl_fn! {
    unsafe fn vmb_packet_send_with_external_mdl(
        p: VMBPACKET,
        _buffer: PVOID,
        _length: u32,
        _mdl: PMDL,
        _offset: u32,
        _mdl_length: u32,
        _flags: u32,
    ) -> NtStatus {
        let call = KmclCall::PacketSendWithExternalMdl;
        guard(call, NtStatus::NOT_SUPPORTED, || {
            if let Some((shared, _)) = packet(call, p) {
                unmodelled(&shared, call, "external data MDLs");
            }
            NtStatus::NOT_SUPPORTED
        })
    }
}

kmcl_fn! {
    unsafe fn vmb_packet_send_with_external_pfns(
        p: VMBPACKET,
        _buffer: PVOID,
        _length: u32,
        _pfns: *mut PFN_NUMBER,
        _pfn_length: u32,
        _flags: u32,
    ) -> NtStatus {
        let call = KmclCall::PacketSendWithExternalPfns;
        guard(call, NtStatus::NOT_SUPPORTED, || {
            if let Some((shared, _)) = packet(call, p) {
                unmodelled(&shared, call, "external data PFNs");
            }
            NtStatus::NOT_SUPPORTED
        })
    }
}

kmcl_fn! {
    unsafe fn vmb_packet_set_completion_routine(
        p: VMBPACKET,
        routine: PFN_VMB_PACKET_COMPLETION_ROUTINE,
    ) {
        let call = KmclCall::PacketSetCompletionRoutine;
        guard(call, (), || {
            if let Some((shared, seq)) = packet(call, p) {
                shared.packet_set_routine(seq, routine);
            }
        });
    }
}

kmcl_fn! {
    unsafe fn vmb_packet_set_pointer(p: VMBPACKET, pointer: PVOID) {
        let call = KmclCall::PacketSetPointer;
        guard(call, (), || {
            if let Some((shared, seq)) = packet(call, p) {
                shared.with_packet(seq, call, |p| p.pointer = DriverPtr(pointer));
            }
        });
    }
}

// ---- server-only entry points ----------------------------------------------------------------------

kmcl_fn! {
    unsafe fn vmb_channel_map_gpadl(
        ch: VMBCHANNEL,
        _flags: u32,
        _gpadl: u32,
        mdl: *mut PMDL,
    ) -> NtStatus {
        let call = KmclCall::ChannelMapGpadl;
        guard(call, NtStatus::NOT_SUPPORTED, || {
            if let Some((shared, _)) = channel(call, ch) {
                unmodelled(&shared, call, "GPADLs");
            }
            write_out(mdl, core::ptr::null_mut());
            NtStatus::NOT_SUPPORTED
        })
    }
}

kmcl_fn! {
    unsafe fn vmb_channel_restore_from_buffer(
        ch: VMBCHANNEL,
        buffer: PVOID,
        size: u32,
    ) -> NtStatus {
        let call = KmclCall::ChannelRestoreFromBuffer;
        guard(call, NtStatus::INVALID_PARAMETER, || {
            let Some((shared, seq)) = channel(call, ch) else {
                return NtStatus::INVALID_PARAMETER_1;
            };
            match copy_in(&shared, call, buffer, size) {
                Some(bytes) => shared.restore_from_buffer(seq, &bytes),
                None => NtStatus::INVALID_PARAMETER_2,
            }
        })
    }
}

kmcl_fn! {
    unsafe fn vmb_channel_save_begin(ch: VMBCHANNEL) -> NtStatus {
        let call = KmclCall::ChannelSaveBegin;
        guard(call, NtStatus::INVALID_PARAMETER_1, || match channel(call, ch) {
            Some((shared, seq)) => shared.save_begin(seq),
            None => NtStatus::INVALID_PARAMETER_1,
        })
    }
}

kmcl_fn! {
    unsafe fn vmb_channel_save_continue(
        ch: VMBCHANNEL,
        buffer: PVOID,
        size: u32,
        filled: *mut u32,
        required: *mut u32,
    ) -> NtStatus {
        let call = KmclCall::ChannelSaveContinue;
        guard(call, NtStatus::INVALID_PARAMETER, || {
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
        })
    }
}

kmcl_fn! {
    unsafe fn vmb_channel_save_end(ch: VMBCHANNEL) {
        let call = KmclCall::ChannelSaveEnd;
        guard(call, (), || {
            if let Some((shared, seq)) = channel(call, ch) {
                shared.save_end(seq);
            }
        });
    }
}

kmcl_fn! {
    unsafe fn vmb_channel_unmap_gpadl(ch: VMBCHANNEL, _gpadl: u32) {
        let call = KmclCall::ChannelUnmapGpadl;
        guard(call, (), || {
            if let Some((shared, _)) = channel(call, ch) {
                unmodelled(&shared, call, "GPADLs");
            }
        });
    }
}

kmcl_fn! {
    unsafe fn vmb_convert_vmbus_handle_to_kernel_handle(
        _vmbus_handle: HANDLE,
        kernel_handle: *mut HANDLE,
    ) -> NtStatus {
        let call = KmclCall::ConvertVmbusHandleToKernelHandle;
        guard(call, NtStatus::NOT_SUPPORTED, || {
            orphan(
                call,
                ViolationKind::Unmodelled,
                String::from("VMBus handle conversion is not modelled"),
            );
            write_out(kernel_handle, core::ptr::null_mut());
            NtStatus::NOT_SUPPORTED
        })
    }
}

kmcl_fn! {
    unsafe fn vmb_packet_restore(p: VMBPACKET, buffer: PVOID, size: u32) -> NtStatus {
        let call = KmclCall::PacketRestore;
        guard(call, NtStatus::INVALID_PARAMETER, || {
            let Some((shared, seq)) = packet(call, p) else {
                return NtStatus::INVALID_PARAMETER_1;
            };
            match copy_in(&shared, call, buffer, size) {
                Some(bytes) => shared.packet_restore(seq, &bytes),
                None => NtStatus::INVALID_PARAMETER_2,
            }
        })
    }
}

kmcl_fn! {
    unsafe fn vmb_server_channel_init_set_flags(ch: VMBCHANNEL, flags: u32) -> NtStatus {
        let call = KmclCall::ServerChannelInitSetFlags;
        guard(call, NtStatus::INVALID_PARAMETER_1, || match channel(call, ch) {
            Some((shared, seq)) => shared.init_call(seq, call, |c, found| {
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
            }),
            None => NtStatus::INVALID_PARAMETER_1,
        })
    }
}

kmcl_fn! {
    unsafe fn vmb_server_channel_init_set_mmio_megabytes(
        ch: VMBCHANNEL,
        megabytes: u16,
        optional: u16,
    ) -> NtStatus {
        let call = KmclCall::ServerChannelInitSetMmioMegabytes;
        guard(call, NtStatus::INVALID_PARAMETER_1, || match channel(call, ch) {
            Some((shared, seq)) => shared.init_call(seq, call, |c, found| {
                if megabytes == 0 && optional == 0 {
                    found.push((ViolationKind::InvalidArgument, String::from("both sizes are 0")));
                    return NtStatus::INVALID_PARAMETER;
                }
                c.mmio_megabytes = (megabytes, optional);
                NtStatus::SUCCESS
            }),
            None => NtStatus::INVALID_PARAMETER_1,
        })
    }
}

kmcl_fn! {
    unsafe fn vmb_server_channel_init_set_save_restore_packet_callbacks(
        ch: VMBCHANNEL,
        save: PFN_VMB_CHANNEL_SAVE_PACKET,
        restore: PFN_VMB_CHANNEL_RESTORE_PACKET,
    ) -> NtStatus {
        let call = KmclCall::ServerChannelInitSetSaveRestorePacketCallbacks;
        guard(call, NtStatus::INVALID_PARAMETER_1, || match channel(call, ch) {
            Some((shared, seq)) => shared.init_call(seq, call, |c, found| {
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
            }),
            None => NtStatus::INVALID_PARAMETER_1,
        })
    }
}

kmcl_fn! {
    unsafe fn vmb_server_channel_init_set_target_interface_id(
        ch: VMBCHANNEL,
        interface_type: GUID,
        interface_instance: GUID,
    ) -> NtStatus {
        let call = KmclCall::ServerChannelInitSetTargetInterfaceId;
        guard(call, NtStatus::INVALID_PARAMETER_1, || match channel(call, ch) {
            Some((shared, seq)) => shared.init_call(seq, call, |c, _| {
                c.interface_type = interface_type;
                c.interface_instance = interface_instance;
                NtStatus::SUCCESS
            }),
            None => NtStatus::INVALID_PARAMETER_1,
        })
    }
}

kmcl_fn! {
    unsafe fn vmb_server_channel_init_set_target_vtl(ch: VMBCHANNEL, vtl: u8) -> NtStatus {
        let call = KmclCall::ServerChannelInitSetTargetVtl;
        guard(call, NtStatus::INVALID_PARAMETER_1, || match channel(call, ch) {
            Some((shared, seq)) => shared.init_call(seq, call, |c, found| {
                if vtl > 2 {
                    found.push((ViolationKind::InvalidArgument, format!("VTL {vtl} does not exist")));
                    return NtStatus::INVALID_PARAMETER_2;
                }
                c.target_vtl = vtl;
                NtStatus::SUCCESS
            }),
            None => NtStatus::INVALID_PARAMETER_1,
        })
    }
}

kmcl_fn! {
    unsafe fn vmb_server_channel_init_set_vmbus_handle(ch: VMBCHANNEL, vmbus: HANDLE) -> NtStatus {
        let call = KmclCall::ServerChannelInitSetVmbusHandle;
        guard(call, NtStatus::INVALID_PARAMETER_1, || match channel(call, ch) {
            Some((shared, seq)) => shared.init_call(seq, call, |c, _| {
                c.vmbus_handle = handle::addr(vmbus);
                NtStatus::SUCCESS
            }),
            None => NtStatus::INVALID_PARAMETER_1,
        })
    }
}

/// The filled server table for a bus whose context token is `context`.
pub(crate) fn server_table(context: usize) -> KMCL_SERVER_INTERFACE_V1 {
    KMCL_SERVER_INTERFACE_V1 {
        Client: KMCL_CLIENT_INTERFACE_V1 {
            Interface: INTERFACE {
                Size: core::mem::size_of::<KMCL_SERVER_INTERFACE_V1>() as u16,
                Version: super::SIM_KMCL_SERVER_INTERFACE_VERSION,
                Context: handle::to_ptr(context),
                InterfaceReference: Some(interface_reference),
                InterfaceDereference: Some(interface_dereference),
            },
            VmbChannelAllocate: Some(vmb_channel_allocate),
            VmbChannelCleanup: Some(vmb_channel_cleanup),
            VmbChannelCreateGpadlFromBuffer: Some(vmb_channel_create_gpadl_from_buffer),
            VmbChannelCreateGpadlFromMdl: Some(vmb_channel_create_gpadl_from_mdl),
            VmbChannelDeleteGpadl: Some(vmb_channel_delete_gpadl),
            VmbChannelDisable: Some(vmb_channel_disable),
            VmbChannelEnable: Some(vmb_channel_enable),
            VmbChannelGetInterfaceInstance: Some(vmb_channel_get_interface_instance),
            VmbChannelGetMmioSpace: Some(vmb_channel_get_mmio_space),
            VmbChannelGetPointer: Some(vmb_channel_get_pointer),
            VmbChannelInitSetClientContextSize: Some(vmb_channel_init_set_client_context_size),
            VmbChannelInitSetFlags: Some(vmb_channel_init_set_flags),
            VmbChannelInitSetFriendlyName: Some(vmb_channel_init_set_friendly_name),
            VmbChannelInitSetMaximumExternalData: Some(vmb_channel_init_set_maximum_external_data),
            VmbChannelInitSetMaximumPacketSize: Some(vmb_channel_init_set_maximum_packet_size),
            VmbChannelInitSetProcessPacketCallbacks: Some(
                vmb_channel_init_set_process_packet_callbacks,
            ),
            VmbChannelInitSetStateChangeCallbacks: Some(
                vmb_channel_init_set_state_change_callbacks,
            ),
            VmbChannelPacketComplete: Some(vmb_channel_packet_complete),
            VmbChannelPacketDeferToPassive: Some(vmb_channel_packet_defer_to_passive),
            VmbChannelPacketFail: Some(vmb_channel_packet_fail),
            VmbChannelPacketGetExternalData: Some(vmb_channel_packet_get_external_data),
            VmbChannelPause: Some(vmb_channel_pause),
            VmbChannelSendSynchronousRequest: Some(vmb_channel_send_synchronous_request),
            VmbChannelSetIncomingProcessingAtPassive: Some(
                vmb_channel_set_incoming_processing_at_passive,
            ),
            VmbChannelSetInterruptLatency: Some(vmb_channel_set_interrupt_latency),
            VmbChannelSetPointer: Some(vmb_channel_set_pointer),
            VmbChannelSetTransactionQuota: Some(vmb_channel_set_transaction_quota),
            VmbChannelSizeofPacket: Some(vmb_channel_sizeof_packet),
            VmbChannelStart: Some(vmb_channel_start),
            VmbClientChannelInitSetRingBufferPageCount: Some(
                vmb_client_channel_init_set_ring_buffer_page_count,
            ),
            VmbClientChannelInitSetTargetPnp: Some(vmb_client_channel_init_set_target_pnp),
            VmbPacketAllocate: Some(vmb_packet_allocate),
            VmbPacketFree: Some(vmb_packet_free),
            VmbPacketGetChannel: Some(vmb_packet_get_channel),
            VmbPacketGetPointer: Some(vmb_packet_get_pointer),
            VmbPacketInitialize: Some(vmb_packet_initialize),
            VmbPacketSend: Some(vmb_packet_send),
            VmbPacketSendWithExternalMdl: Some(vmb_packet_send_with_external_mdl),
            VmbPacketSendWithExternalPfns: Some(vmb_packet_send_with_external_pfns),
            VmbPacketSetCompletionRoutine: Some(vmb_packet_set_completion_routine),
            VmbPacketSetPointer: Some(vmb_packet_set_pointer),
        },
        Server: KMCL_SERVER_ONLY_METHODS {
            VmbChannelMapGpadl: Some(vmb_channel_map_gpadl),
            VmbChannelRestoreFromBuffer: Some(vmb_channel_restore_from_buffer),
            VmbChannelSaveBegin: Some(vmb_channel_save_begin),
            VmbChannelSaveContinue: Some(vmb_channel_save_continue),
            VmbChannelSaveEnd: Some(vmb_channel_save_end),
            VmbChannelUnmapGpadl: Some(vmb_channel_unmap_gpadl),
            VmbConvertVmbusHandleToKernelHandle: Some(vmb_convert_vmbus_handle_to_kernel_handle),
            VmbPacketRestore: Some(vmb_packet_restore),
            VmbServerChannelInitSetFlags: Some(vmb_server_channel_init_set_flags),
            VmbServerChannelInitSetMmioMegabytes: Some(vmb_server_channel_init_set_mmio_megabytes),
            VmbServerChannelInitSetSaveRestorePacketCallbacks: Some(
                vmb_server_channel_init_set_save_restore_packet_callbacks,
            ),
            VmbServerChannelInitSetTargetInterfaceId: Some(
                vmb_server_channel_init_set_target_interface_id,
            ),
            VmbServerChannelInitSetTargetVtl: Some(vmb_server_channel_init_set_target_vtl),
            VmbServerChannelInitSetVmbusHandle: Some(vmb_server_channel_init_set_vmbus_handle),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_simulator_panic_becomes_a_violation_and_the_neutral_value() {
        let status = guard(KmclCall::PacketSend, NtStatus::INVALID_PARAMETER, || {
            panic!("simulated simulator bug")
        });
        assert_eq!(status, NtStatus::INVALID_PARAMETER);
        let violations = verifier::take_unattributed_violations();
        assert_eq!(violations.len(), 1);
        assert_eq!(violations[0].kind, ViolationKind::InternalError);
        assert_eq!(violations[0].call, Some(KmclCall::PacketSend));
    }

    #[test]
    fn the_table_has_every_slot() {
        let table = server_table(handle::encode(1, 0, Kind::Bus));
        assert!(!std::format!("{table:?}").contains("None"));
        assert_eq!(usize::from(table.Client.Interface.Size), 0x1D8);
    }
}
