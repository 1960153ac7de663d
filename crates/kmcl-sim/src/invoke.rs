//! Calls into the driver's callbacks, each at the documented simulated IRQL and inside a
//! thread-local callback frame (so the simulator can tell, when the driver calls back into the
//! table, which callback it is in). No simulator lock is held by any caller of these functions.

use core::ffi::c_void;
use core::ptr;

use super::handle;
use super::irql::{self, Frame, FrameKind, Irql};
use kmcl::NtStatus;
use kmcl_sys::{
    PFN_VMB_CHANNEL_CLOSED, PFN_VMB_CHANNEL_OPENED, PFN_VMB_CHANNEL_PROCESS_PACKET,
    PFN_VMB_CHANNEL_PROCESSING_COMPLETE, PFN_VMB_CHANNEL_RESTORE_PACKET,
    PFN_VMB_CHANNEL_SAVE_PACKET, PFN_VMB_PACKET_COMPLETION_ROUTINE, VMBCHANNEL, VMBPACKET,
    VMBPACKETCOMPLETION,
};

/// Pointer for a read-only byte buffer given to the driver: NULL when empty (as KMCL may do, and
/// which a driver must not turn into a slice).
fn in_ptr(bytes: &[u8]) -> *mut c_void {
    if bytes.is_empty() {
        ptr::null_mut()
    } else {
        bytes.as_ptr().cast_mut().cast()
    }
}

fn len32(bytes: &[u8]) -> u32 {
    u32::try_from(bytes.len()).unwrap_or(u32::MAX)
}

/// `EvtChannelOpened` at PASSIVE. A missing callback counts as success.
pub(crate) fn opened(instance: u32, cb: PFN_VMB_CHANNEL_OPENED, channel: usize) -> NtStatus {
    let Some(cb) = cb else {
        return NtStatus::SUCCESS;
    };
    let _irql = irql::set_irql(Irql::Passive);
    let _frame = irql::push_frame(Frame {
        instance,
        kind: FrameKind::StateChange,
    });
    let channel: VMBCHANNEL = handle::to_ptr(channel);
    // `channel` is a token the driver only hands back through the table, never dereferences.
    // SAFETY: `cb` is the driver's `PFN_VMB_CHANNEL_OPENED`, registered with this exact signature
    // and ABI; KMCL calls it at PASSIVE with the channel's handle, which `channel` is.
    unsafe { cb(channel) }
}

/// One of the `VOID (VMBCHANNEL)` state-change callbacks (Closed, Suspend, Started, PostStarted)
/// at PASSIVE.
pub(crate) fn state_change(instance: u32, cb: PFN_VMB_CHANNEL_CLOSED, channel: usize) {
    let Some(cb) = cb else {
        return;
    };
    let _irql = irql::set_irql(Irql::Passive);
    let _frame = irql::push_frame(Frame {
        instance,
        kind: FrameKind::StateChange,
    });
    let channel: VMBCHANNEL = handle::to_ptr(channel);
    // SAFETY: `cb` is a driver state-change callback (`PFN_VMB_CHANNEL_CLOSED` and the Suspend /
    // Started / PostStarted pointers share its type) registered with this signature and ABI; it
    // is called at PASSIVE with the channel's handle, as KMCL does.
    unsafe { cb(channel) }
}

/// One incoming packet to hand to the process-packet callback.
pub(crate) struct Delivery {
    /// Channel handle.
    pub(crate) channel: usize,
    /// The incoming packet's object sequence number.
    pub(crate) pc_seq: u32,
    /// Its completion handle.
    pub(crate) pc: usize,
    /// The packet bytes (owned by the incoming-packet object).
    pub(crate) buffer: *const u8,
    /// Their length.
    pub(crate) length: u32,
    /// The IRQL to run the callback at.
    pub(crate) level: Irql,
}

/// `EvtVmbChannelProcessPacket`; returns whether the driver deferred the packet to PASSIVE.
pub(crate) fn process_packet(
    instance: u32,
    cb: PFN_VMB_CHANNEL_PROCESS_PACKET,
    delivery: &Delivery,
) -> bool {
    let Some(cb) = cb else {
        return false;
    };
    let _irql = irql::set_irql(delivery.level);
    let frame = irql::push_frame(Frame {
        instance,
        kind: FrameKind::ProcessPacket {
            pc: delivery.pc_seq,
            deferred: false,
        },
    });
    let channel: VMBCHANNEL = handle::to_ptr(delivery.channel);
    let pc: VMBPACKETCOMPLETION = handle::to_ptr(delivery.pc);
    let length = delivery.length;
    let buffer: *mut c_void = if length == 0 {
        ptr::null_mut()
    } else {
        delivery.buffer.cast_mut().cast()
    };
    // `buffer`: `length` initialized bytes of the incoming-packet object, alive and unwritten
    // until the driver completes the packet; `pc` is that packet's completion handle.
    // SAFETY: `cb` is the driver's process-packet callback, registered with this signature/ABI.
    unsafe { cb(channel, pc, buffer, length, 0) };
    matches!(
        frame.take().map(|f| f.kind),
        Some(FrameKind::ProcessPacket { deferred: true, .. })
    )
}

/// `EvtVmbChannelProcessingComplete`.
pub(crate) fn processing_complete(
    instance: u32,
    cb: PFN_VMB_CHANNEL_PROCESSING_COMPLETE,
    channel: usize,
    count: u32,
    level: Irql,
) {
    let Some(cb) = cb else {
        return;
    };
    let _irql = irql::set_irql(level);
    let _frame = irql::push_frame(Frame {
        instance,
        kind: FrameKind::ProcessingComplete,
    });
    let channel: VMBCHANNEL = handle::to_ptr(channel);
    // SAFETY: the driver's processing-complete callback, registered with this signature and ABI,
    // called with the channel's handle and a packet count.
    unsafe { cb(channel, count) }
}

/// A packet completion routine at DISPATCH.
pub(crate) fn completion(
    instance: u32,
    routine: PFN_VMB_PACKET_COMPLETION_ROUTINE,
    packet: usize,
    status: NtStatus,
    payload: &[u8],
) {
    let Some(routine) = routine else {
        return;
    };
    let _irql = irql::set_irql(Irql::Dispatch);
    let _frame = irql::push_frame(Frame {
        instance,
        kind: FrameKind::Completion,
    });
    let packet: VMBPACKET = handle::to_ptr(packet);
    // SAFETY: `routine` was set by the driver with VmbPacketSetCompletionRoutine (this signature and
    // ABI). `payload` is a live simulator buffer of `len32(payload)` bytes for the duration of the
    // call (NULL when empty); `packet` is the completed packet's handle.
    unsafe { routine(packet, status, in_ptr(payload), len32(payload)) }
}

/// `EvtVmbChannelSavePacket` at PASSIVE: the size probe (`buffer = None`) or the real call.
pub(crate) fn save_packet(
    instance: u32,
    cb: SaveFn,
    channel: usize,
    packet: usize,
    buffer: Option<&mut [u8]>,
    needed: &mut u32,
) -> NtStatus {
    let _irql = irql::set_irql(Irql::Passive);
    let _frame = irql::push_frame(Frame {
        instance,
        kind: FrameKind::SavePacket,
    });
    let (ptr, size) = match buffer {
        Some(buffer) => {
            let size = len32(buffer);
            (buffer.as_mut_ptr().cast::<c_void>(), size)
        }
        None => (ptr::null_mut(), 0),
    };
    let channel: VMBCHANNEL = handle::to_ptr(channel);
    let packet: VMBPACKET = handle::to_ptr(packet);
    let needed: *mut u32 = needed;
    // SAFETY: `cb` is the driver's save-packet callback (this signature and ABI). `ptr` is NULL with
    // size 0 (the probe) or an exclusively borrowed simulator buffer of `size` writable bytes;
    // `needed` is a valid, exclusive `u32` for the duration of the call.
    unsafe { cb(channel, packet, ptr, size, needed) }
}

/// The save callback's function type, as stored (the table's `Option` unwrapped).
pub(crate) type SaveFn = <PFN_VMB_CHANNEL_SAVE_PACKET as OptionInner>::Inner;
/// The restore callback's function type, as stored.
pub(crate) type RestoreFn = <PFN_VMB_CHANNEL_RESTORE_PACKET as OptionInner>::Inner;

/// Names the `T` of an `Option<T>`.
pub(crate) trait OptionInner {
    /// The wrapped type.
    type Inner;
}
impl<T> OptionInner for Option<T> {
    type Inner = T;
}

/// `EvtVmbChannelRestorePacket` at PASSIVE; returns its status and the packet `VmbPacketRestore`
/// restored during it (if any).
pub(crate) fn restore_packet(
    instance: u32,
    cb: RestoreFn,
    channel: usize,
    channel_seq: u32,
    txid: u64,
    lib: &[u8],
    save: &[u8],
) -> (NtStatus, Option<u32>) {
    let _irql = irql::set_irql(Irql::Passive);
    let frame = irql::push_frame(Frame {
        instance,
        kind: FrameKind::RestorePacket {
            channel: channel_seq,
            txid,
            restored: None,
        },
    });
    let channel: VMBCHANNEL = handle::to_ptr(channel);
    // SAFETY: `cb` is the driver's restore-packet callback (this signature and ABI). `lib` and
    // `save` are live simulator buffers of the given lengths (NULL when empty), only read by the
    // driver, valid for the duration of the call.
    let status = unsafe { cb(channel, in_ptr(lib), len32(lib), in_ptr(save), len32(save)) };
    let restored = match frame.take().map(|f| f.kind) {
        Some(FrameKind::RestorePacket { restored, .. }) => restored,
        _ => None,
    };
    (status, restored)
}
