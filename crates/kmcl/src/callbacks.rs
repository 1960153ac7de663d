//! The driver side of KMCL's callbacks: one handler trait, and `extern` trampolines generic over it.
//!
//! KMCL calls plain functions with raw handles. Each trampoline here recovers the channel's
//! [`Bound`] (handler + interface) through the library's own accessors, wraps the raw arguments
//! in the safe types of [`super::channel`], and calls the handler. The service (`vsp`) implements
//! [`ChannelEvents`] and never sees a raw pointer.

use core::ffi::c_void;
use core::slice;

use super::NtStatus;
use super::channel::{Bound, Channel, GuestBytes, IncomingPacket, Packet, PacketView};
use super::interface::callback_accessors;
use super::raw::{
    self, PFN_VMB_CHANNEL_PROCESS_PACKET, PFN_VMB_CHANNEL_PROCESSING_COMPLETE,
    PFN_VMB_CHANNEL_RESTORE_PACKET, PFN_VMB_CHANNEL_SAVE_PACKET, PFN_VMB_PACKET_COMPLETION_ROUTINE,
    VMB_CHANNEL_STATE_CHANGE_CALLBACKS, VMBCHANNEL, VMBPACKET, VMBPACKETCOMPLETION,
};
use kmcl_sys::kmcl_fn;

/// What a save-packet callback answers: the status and the `*BytesNeeded` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SavePacketAnswer {
    /// Failure on a size probe with state to save; success otherwise.
    pub status: NtStatus,
    /// The exact size of the state (probe), the bytes written (second call), or 0.
    pub bytes_needed: u32,
}

/// Everything KMCL can call on a server channel. IRQLs are KMCL's (docs/kmcl-bindings.md §R3).
///
/// Implementations must not panic: in the driver a panic is a bugcheck, and a panic cannot
/// unwind through KMCL's frames anyway.
pub trait ChannelEvents: Sync + Sized {
    /// `EvtChannelOpened` (PASSIVE): the guest opened the channel; a failure rolls the open back.
    fn opened(&self, channel: Channel<'_, Self>) -> NtStatus;
    /// `EvtChannelClosed` (PASSIVE): the guest closed, or the channel is being disabled.
    fn closed(&self, channel: Channel<'_, Self>);
    /// `EvtChannelSuspend` (PASSIVE): no more process-packet callbacks until the next start;
    /// stop sending, complete every outstanding incoming packet.
    fn suspend(&self, channel: Channel<'_, Self>);
    /// `EvtChannelStarted` (PASSIVE): the channel left the paused state; incoming queue not yet running.
    fn started(&self, channel: Channel<'_, Self>);
    /// `EvtChannelPostStarted` (PASSIVE): the incoming queue is running.
    fn post_started(&self, channel: Channel<'_, Self>);
    /// `EvtVmbChannelProcessPacket` (≤ DISPATCH_LEVEL): one guest packet, to be completed once.
    fn process_packet(&self, channel: Channel<'_, Self>, packet: IncomingPacket<'_>, flags: u32);
    /// `EvtVmbChannelProcessingComplete` (≤ DISPATCH_LEVEL): the end of a batch.
    fn processing_complete(&self, _channel: Channel<'_, Self>, _packets_processed: u32) {}
    /// Packets KMCL owns whose completion routine will reach this handler: sent or restored,
    /// not yet completed. Teardown frees the channel's context only once this is 0 (see
    /// [`OwnedChannel`](super::OwnedChannel)). The default, 0, is right only for a handler that
    /// never sends or restores a packet.
    fn outstanding_packets(&self) -> u32 {
        0
    }
    /// Of [`outstanding_packets`](Self::outstanding_packets), those teardown should still wait
    /// for; a handler that already waited for some (and gave them up) excludes them, so teardown
    /// does not wait twice. They still keep the context alive.
    fn packets_worth_waiting_for(&self) -> u32 {
        self.outstanding_packets()
    }
    /// Called at PASSIVE_LEVEL by teardown when it keeps the handler alive because
    /// [`outstanding_packets`](Self::outstanding_packets) is not 0: give back every allocation a
    /// late completion routine does not need (it must still account for its packet), so that a
    /// kept channel costs little.
    fn shed_memory(&self) {}
    /// Called at PASSIVE_LEVEL by teardown while [`outstanding_packets`](Self::outstanding_packets)
    /// is not 0, between two looks at it: give the processor to the thread that completes them.
    fn relax(&self) {
        core::hint::spin_loop();
    }
    /// The completion routine of an outgoing packet (≤ DISPATCH_LEVEL): the packet is the
    /// driver's again, to free or reuse.
    fn packet_completed(&self, packet: Packet<'_, Self>, status: NtStatus, payload: GuestBytes<'_>);
    /// `EvtVmbChannelSavePacket` (PASSIVE): `buffer` is `None` on the size probe.
    fn save_packet(
        &self,
        channel: Channel<'_, Self>,
        packet: PacketView<'_>,
        buffer: Option<&mut [u8]>,
    ) -> SavePacketAnswer;
    /// `EvtVmbChannelRestorePacket` (PASSIVE): rebuild one saved packet from KMCL's `lib_buf`
    /// and the driver's `save_buf` (both KMCL memory, valid for the call only).
    fn restore_packet(
        &self,
        channel: Channel<'_, Self>,
        lib_buf: &[u8],
        save_buf: &[u8],
    ) -> NtStatus;
}

/// Recovers the handler bound to `channel`.
///
/// # Safety
/// `channel` must be a channel allocated by [`super::ServerInterface::allocate_server_channel`]
/// for handler type `H` and not yet cleaned up; KMCL guarantees that for the channel handle it
/// passes to a callback registered by that channel.
unsafe fn bound<'x, H>(channel: VMBCHANNEL) -> Option<&'x Bound<'x, H>> {
    let context = callback_accessors()?.channel_pointer(channel);
    let bound = context.cast::<Bound<'x, H>>().cast_const();
    // SAFETY: the context pointer was set to the channel's `Bound<H>` right after allocation and
    // that allocation outlives the channel (`OwnedChannel` invariants); NULL maps to `None`.
    unsafe { bound.as_ref() }
}

/// Builds `&[u8]` over KMCL-owned memory valid for the duration of a callback.
///
/// # Safety
/// `pointer` must be readable for `len` bytes for `'x`, or be NULL.
unsafe fn kmcl_bytes<'x>(pointer: *const c_void, len: u32) -> &'x [u8] {
    if pointer.is_null() || len == 0 {
        return &[];
    }
    // SAFETY: non-NULL and readable for `len` bytes by the caller's contract; KMCL's buffers in
    // the restore callback are library memory the guest cannot write.
    unsafe { slice::from_raw_parts(pointer.cast::<u8>(), len as usize) }
}

kmcl_fn! {
    unsafe fn opened_trampoline<H: ChannelEvents>(channel: VMBCHANNEL) -> NtStatus {
        // SAFETY: KMCL passes the handle of the channel this callback was registered on.
        let Some(bound) = (unsafe { bound::<H>(channel) }) else { return NtStatus::INVALID_DEVICE_STATE };
        bound.handler.opened(Channel::from_raw(bound.interface, channel))
    }
}

/// Generates a trampoline for a `VOID (VMBCHANNEL)` state-change callback.
macro_rules! state_trampoline {
    ($name:ident, $method:ident) => {
        kmcl_fn! {
            unsafe fn $name<H: ChannelEvents>(channel: VMBCHANNEL) {
                // SAFETY: KMCL passes the handle of the channel this callback was registered on.
                if let Some(bound) = unsafe { bound::<H>(channel) } {
                    bound.handler.$method(Channel::from_raw(bound.interface, channel));
                }
            }
        }
    };
}

state_trampoline!(closed_trampoline, closed);
state_trampoline!(suspend_trampoline, suspend);
state_trampoline!(started_trampoline, started);
state_trampoline!(post_started_trampoline, post_started);

kmcl_fn! {
    unsafe fn process_packet_trampoline<H: ChannelEvents>(
        channel: VMBCHANNEL,
        packet: VMBPACKETCOMPLETION,
        buffer: *mut c_void,
        length: u32,
        flags: u32,
    ) {
        // SAFETY: KMCL passes the handle of the channel this callback was registered on.
        let Some(bound) = (unsafe { bound::<H>(channel) }) else { return };
        // SAFETY: KMCL passes the packet's bytes, readable for `length` bytes until completion.
        let bytes = unsafe { GuestBytes::new(buffer, length) };
        let incoming = IncomingPacket::from_raw(bound.interface, packet, bytes);
        bound.handler.process_packet(Channel::from_raw(bound.interface, channel), incoming, flags);
    }
}

kmcl_fn! {
    unsafe fn processing_complete_trampoline<H: ChannelEvents>(channel: VMBCHANNEL, processed: u32) {
        // SAFETY: KMCL passes the handle of the channel this callback was registered on.
        if let Some(bound) = unsafe { bound::<H>(channel) } {
            bound.handler.processing_complete(Channel::from_raw(bound.interface, channel), processed);
        }
    }
}

kmcl_fn! {
    unsafe fn packet_completion_trampoline<H: ChannelEvents>(
        packet: VMBPACKET,
        status: NtStatus,
        buffer: *mut c_void,
        length: u32,
    ) {
        let Some(accessors) = callback_accessors() else { return };
        let channel = accessors.packet_channel(packet);
        // SAFETY: this routine is only installed by `Packet<H>::set_completion_routine` on packets
        // of a channel bound to `H`, and KMCL runs it before the channel is cleaned up.
        let Some(bound) = (unsafe { bound::<H>(channel) }) else { return };
        // SAFETY: KMCL passes the completion payload, readable for `length` bytes during the call.
        let payload = unsafe { GuestBytes::new(buffer, length) };
        bound.handler.packet_completed(Packet::from_raw(bound.interface, packet), status, payload);
    }
}

kmcl_fn! {
    unsafe fn save_packet_trampoline<H: ChannelEvents>(
        channel: VMBCHANNEL,
        packet: VMBPACKET,
        save_buf: *mut c_void,
        save_buf_size: u32,
        bytes_needed: *mut u32,
    ) -> NtStatus {
        // SAFETY: KMCL passes the handle of the channel this callback was registered on.
        let Some(bound) = (unsafe { bound::<H>(channel) }) else { return NtStatus::INVALID_DEVICE_STATE };
        let buffer = if save_buf.is_null() || save_buf_size == 0 {
            // Never form a slice from a NULL pointer: the size probe may pass NULL.
            None
        } else {
            // SAFETY: KMCL hands a buffer writable for `save_buf_size` bytes, owned by KMCL and
            // not aliased by anything else during the call.
            Some(unsafe { slice::from_raw_parts_mut(save_buf.cast::<u8>(), save_buf_size as usize) })
        };
        let answer = bound.handler.save_packet(
            Channel::from_raw(bound.interface, channel),
            PacketView::from_raw(bound.interface, packet),
            buffer,
        );
        if !bytes_needed.is_null() {
            // SAFETY: a non-NULL `BytesNeeded` is KMCL's `_Out_ PUINT32`, writable for the call.
            unsafe { bytes_needed.write(answer.bytes_needed) };
        }
        answer.status
    }
}

kmcl_fn! {
    unsafe fn restore_packet_trampoline<H: ChannelEvents>(
        channel: VMBCHANNEL,
        lib_buf: *mut c_void,
        lib_buf_size: u32,
        save_buf: *mut c_void,
        save_buf_size: u32,
    ) -> NtStatus {
        // SAFETY: KMCL passes the handle of the channel this callback was registered on.
        let Some(bound) = (unsafe { bound::<H>(channel) }) else { return NtStatus::INVALID_DEVICE_STATE };
        // SAFETY: both buffers are KMCL memory readable for their sizes during the callback.
        let lib = unsafe { kmcl_bytes(lib_buf, lib_buf_size) };
        // SAFETY: as above.
        let saved = unsafe { kmcl_bytes(save_buf, save_buf_size) };
        bound.handler.restore_packet(Channel::from_raw(bound.interface, channel), lib, saved)
    }
}

/// The process-packet and processing-complete trampolines for `H`.
pub(super) fn process_packet_callbacks<H: ChannelEvents>() -> (
    PFN_VMB_CHANNEL_PROCESS_PACKET,
    PFN_VMB_CHANNEL_PROCESSING_COMPLETE,
) {
    (
        Some(process_packet_trampoline::<H>),
        Some(processing_complete_trampoline::<H>),
    )
}

/// The state-change callback structure for `H` (Version 1, Size 48).
pub(super) fn state_change_callbacks<H: ChannelEvents>() -> VMB_CHANNEL_STATE_CHANGE_CALLBACKS {
    VMB_CHANNEL_STATE_CHANGE_CALLBACKS {
        Version: raw::VMB_CHANNEL_STATE_CHANGE_CALLBACKS_VERSION_1,
        Size: core::mem::size_of::<VMB_CHANNEL_STATE_CHANGE_CALLBACKS>() as u32,
        EvtChannelOpened: Some(opened_trampoline::<H>),
        EvtChannelClosed: Some(closed_trampoline::<H>),
        EvtChannelSuspend: Some(suspend_trampoline::<H>),
        EvtChannelStarted: Some(started_trampoline::<H>),
        EvtChannelPostStarted: Some(post_started_trampoline::<H>),
    }
}

/// The save-packet and restore-packet trampolines for `H`.
pub(super) fn save_restore_callbacks<H: ChannelEvents>()
-> (PFN_VMB_CHANNEL_SAVE_PACKET, PFN_VMB_CHANNEL_RESTORE_PACKET) {
    (
        Some(save_packet_trampoline::<H>),
        Some(restore_packet_trampoline::<H>),
    )
}

/// The completion-routine trampoline for packets of a channel bound to `H`.
pub(super) fn packet_completion_routine<H: ChannelEvents>() -> PFN_VMB_PACKET_COMPLETION_ROUTINE {
    Some(packet_completion_trampoline::<H>)
}
