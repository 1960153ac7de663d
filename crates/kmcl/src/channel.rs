//! Safe handle types over the KMCL entry points: each method wraps exactly one KMCL call.
//!
//! Ownership is in the types: an [`OwnedChannel`] disables and cleans up its channel when dropped;
//! a [`Packet`] is a packet object the driver owns (allocated, or handed back by a completion) and
//! is consumed by `send`, `restore` or `free`; an [`IncomingPacket`] is completed exactly once.

use core::ffi::c_void;
use core::marker::PhantomData;
use core::mem::ManuallyDrop;
use core::num::NonZeroUsize;
use core::ptr;
use core::sync::atomic::{AtomicBool, Ordering};

use super::callbacks::{self, ChannelEvents};
use super::interface::ServerInterface;
use super::raw::{self, GUID, HANDLE, PDEVICE_OBJECT, VMBCHANNEL, VMBPACKET, VMBPACKETCOMPLETION};
use super::{NtStatus, Result};
use crate::fallible::FallibleBox;

/// What a channel's context pointer points at: the handler and the interface its callbacks use.
pub(super) struct Bound<'a, H> {
    pub(super) interface: &'a ServerInterface,
    pub(super) handler: H,
}

/// How many times teardown asks the handler to relax while packets KMCL owns are still
/// unaccounted for after `VmbChannelDisable` (see [`OwnedChannel`]'s `Drop`): 4,096 rounds of
/// 50 µs in the driver, about 0.2 s. Long enough for completions the library runs just after
/// Disable returns; a library that never returns them (a reading docs/kmcl-bindings.md lists)
/// costs this once per torn-down channel, and the context is then kept, not freed.
const TEARDOWN_WAIT_ROUNDS: u32 = 1 << 12;

/// A server channel this driver allocated; dropping it disables it (if it was enabled or restored
/// into) and cleans it up.
///
/// # Invariants
/// * `raw` is a channel returned by `VmbChannelAllocate` and not yet cleaned up.
/// * The channel's context pointer is the address of `*bound`, which does not move and outlives
///   every callback KMCL can still make: `Drop` runs `VmbChannelDisable` and `VmbChannelCleanup`,
///   and frees `bound` only if the handler then accounts for every packet KMCL owned
///   ([`ChannelEvents::outstanding_packets`] is 0). Otherwise `bound` is never freed.
///
/// # Why a channel may be kept forever
/// What `VmbChannelDisable` does with packets a channel owns when it was never enabled (restored
/// into, then torn down after a failed restore) is not documented (docs/kmcl-bindings.md,
/// "Undocumented points"): it may complete them before returning, shortly after, inside
/// `VmbChannelCleanup`, or never. Their completion routine reaches `bound`. So teardown waits a
/// bounded time after Disable, calls Cleanup, and if a packet is still unaccounted for it keeps
/// `bound` alive (a bounded leak, counted by [`ServerInterface::leaked_channels`]) rather than
/// free memory a completion routine could still reach; the handler first gives back what such a
/// routine does not need ([`ChannelEvents::shed_memory`]), so a kept channel costs a few hundred
/// bytes, not its delivery table.
pub struct OwnedChannel<'a, H: ChannelEvents> {
    bound: ManuallyDrop<FallibleBox<Bound<'a, H>>>,
    raw: VMBCHANNEL,
    /// Enabled, or packets restored into it: `VmbChannelDisable` must run before cleanup.
    needs_disable: AtomicBool,
}

// SAFETY: the channel handle may be used from any thread (KMCL itself calls back on arbitrary
// threads); the handler is required to be `Sync` by `ChannelEvents`.
unsafe impl<H: ChannelEvents + Send> Send for OwnedChannel<'_, H> {}
// SAFETY: as above; shared access only reaches `&H` (which is `Sync`) and KMCL calls.
unsafe impl<H: ChannelEvents> Sync for OwnedChannel<'_, H> {}

/// A borrowed channel handle, as callbacks and [`OwnedChannel::channel`] hand it out.
pub struct Channel<'a, H> {
    interface: &'a ServerInterface,
    raw: VMBCHANNEL,
    _handler: PhantomData<fn(&H)>,
}

impl<H> Clone for Channel<'_, H> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<H> Copy for Channel<'_, H> {}

/// Shorthand for calling a validated table slot.
macro_rules! slot {
    ($interface:expr, $part:ident . $name:ident) => {
        $interface.table().$part.$name
    };
}

/// Calls a slot that `ServerInterface` validated as present; a missing one yields `$absent`.
macro_rules! call {
    ($interface:expr, $part:ident . $name:ident ( $($arg:expr),* $(,)? ) else $absent:expr) => {
        match slot!($interface, $part.$name) {
            // SAFETY: the slot comes from a validated provider table; every argument is a handle
            // this module owns or borrows for the duration of the call, or a pointer to memory
            // that outlives the call (see each call site's comment).
            Some(function) => unsafe { function($($arg),*) },
            None => $absent,
        }
    };
}

/// The WDM device object a channel is allocated under (`ParentDeviceObject`).
#[derive(Clone, Copy, Debug)]
pub struct ParentDevice(PDEVICE_OBJECT);

impl ParentDevice {
    /// Wraps the driver's device object.
    ///
    /// # Safety
    /// `device` must be NULL or a device object that stays valid until every channel allocated
    /// under it has been cleaned up.
    pub unsafe fn new(device: PDEVICE_OBJECT) -> Self {
        Self(device)
    }

    /// No parent device object (the simulator, or a provider that does not need one).
    pub const fn none() -> Self {
        Self(ptr::null_mut())
    }
}

// SAFETY: a device object pointer is an identifier of a kernel object that lives until every
// channel under it is cleaned up (constructor contract); it is never dereferenced here, and KMCL
// accepts it from any thread.
unsafe impl Send for ParentDevice {}
// SAFETY: as above; `ParentDevice` is an immutable copy of the pointer.
unsafe impl Sync for ParentDevice {}

/// A kernel handle to a partition's VMBus, from `VmbConvertVmbusHandleToKernelHandle`.
#[derive(Clone, Copy, Debug)]
pub struct VmbusHandle(HANDLE);

// SAFETY: a kernel handle is valid in every thread context (unlike a user handle); it is an
// opaque value here, never dereferenced.
unsafe impl Send for VmbusHandle {}
// SAFETY: as above; `VmbusHandle` is an immutable copy of the handle value.
unsafe impl Sync for VmbusHandle {}

impl VmbusHandle {
    /// Wraps a kernel VMBus handle.
    ///
    /// # Safety
    /// `handle` must be a kernel handle obtained from `VmbConvertVmbusHandleToKernelHandle` (or
    /// the simulator's equivalent) that stays open while the channel uses it.
    pub unsafe fn new(handle: HANDLE) -> Self {
        Self(handle)
    }

    /// The raw handle value, for closing it.
    pub fn as_raw(self) -> HANDLE {
        self.0
    }
}

impl ServerInterface {
    /// `VmbChannelAllocate(parent, IsServer = TRUE)`, then `VmbChannelSetPointer` to `handler`.
    ///
    /// The channel starts Disabled, ready for the `set_*` initialization calls. PASSIVE_LEVEL.
    pub fn allocate_server_channel<H: ChannelEvents>(
        &self,
        parent: ParentDevice,
        handler: H,
    ) -> Result<OwnedChannel<'_, H>> {
        if self.leaked_channels() >= super::interface::MAX_LEAKED_CHANNELS {
            // Each kept channel holds its memory for good; past the bound, refuse new ones.
            return Err(NtStatus::INSUFFICIENT_RESOURCES);
        }
        let bound = FallibleBox::try_new(Bound {
            interface: self,
            handler,
        })
        .map_err(|_| NtStatus::INSUFFICIENT_RESOURCES)?;
        let mut raw: VMBCHANNEL = ptr::null_mut();
        // `&raw mut raw` is a local out-parameter valid for the call.
        let status = call!(self, Client.VmbChannelAllocate(parent.0, 1, &raw mut raw) else NtStatus::NOT_SUPPORTED);
        status.ok()?;
        if raw.is_null() {
            return Err(NtStatus::UNSUCCESSFUL);
        }
        let channel = OwnedChannel {
            bound: ManuallyDrop::new(bound),
            raw,
            needs_disable: AtomicBool::new(false),
        };
        let context: *const Bound<'_, H> = &**channel.bound;
        // The context is `*bound`, which outlives the channel (OwnedChannel invariants).
        call!(self, Client.VmbChannelSetPointer(raw, context.cast_mut().cast::<c_void>()) else ());
        Ok(channel)
    }
}

impl<'a, H: ChannelEvents> OwnedChannel<'a, H> {
    /// The borrowed handle view of this channel.
    pub fn channel(&self) -> Channel<'_, H> {
        Channel {
            interface: self.bound.interface,
            raw: self.raw,
            _handler: PhantomData,
        }
    }

    /// The handler the callbacks of this channel run on.
    pub fn handler(&self) -> &H {
        &self.bound.handler
    }

    fn interface(&self) -> &'a ServerInterface {
        self.bound.interface
    }

    /// `VmbServerChannelInitSetVmbusHandle`: which partition gets the offer.
    pub fn set_vmbus_handle(&self, vmbus_handle: VmbusHandle) -> Result<()> {
        call!(self.interface(), Server.VmbServerChannelInitSetVmbusHandle(self.raw, vmbus_handle.0) else NtStatus::NOT_SUPPORTED).ok()
    }

    /// `VmbServerChannelInitSetTargetInterfaceId` (both GUIDs by value, as declared).
    pub fn set_target_interface_id(&self, interface_type: GUID, instance: GUID) -> Result<()> {
        call!(self.interface(), Server.VmbServerChannelInitSetTargetInterfaceId(self.raw, interface_type, instance) else NtStatus::NOT_SUPPORTED).ok()
    }

    /// `VmbServerChannelInitSetFlags` (`VMBUS_SERVER_CHANNEL_INIT_FLAG_*`).
    pub fn set_server_flags(&self, flags: u32) -> Result<()> {
        call!(self.interface(), Server.VmbServerChannelInitSetFlags(self.raw, flags) else NtStatus::NOT_SUPPORTED).ok()
    }

    /// `VmbChannelInitSetMaximumPacketSize`: the largest buffer ever passed to `VmbPacketSend`.
    pub fn set_maximum_packet_size(&self, size: u32) -> Result<()> {
        call!(self.interface(), Client.VmbChannelInitSetMaximumPacketSize(self.raw, size) else NtStatus::NOT_SUPPORTED).ok()
    }

    /// `VmbChannelInitSetFriendlyName`. The name is `'static` because whether KMCL copies it is
    /// not documented.
    pub fn set_friendly_name(&self, name: &'static [u16]) -> Result<()> {
        let bytes = name
            .len()
            .checked_mul(2)
            .and_then(|n| u16::try_from(n).ok());
        let Some(length) = bytes else {
            return Err(NtStatus::INVALID_PARAMETER_2);
        };
        let unicode = raw::UNICODE_STRING {
            Length: length,
            MaximumLength: length,
            // KMCL only reads the name (`PCUNICODE_STRING`).
            Buffer: name.as_ptr().cast_mut(),
        };
        // `&raw const unicode` is a local valid for the call; its buffer is `'static`.
        call!(self.interface(), Client.VmbChannelInitSetFriendlyName(self.raw, &raw const unicode) else NtStatus::NOT_SUPPORTED).ok()
    }

    /// `VmbChannelInitSetProcessPacketCallbacks` with this handler's trampolines.
    pub fn set_process_packet_callbacks(&self) -> Result<()> {
        let (process, complete) = callbacks::process_packet_callbacks::<H>();
        call!(self.interface(), Client.VmbChannelInitSetProcessPacketCallbacks(self.raw, process, complete) else NtStatus::NOT_SUPPORTED).ok()
    }

    /// `VmbChannelInitSetStateChangeCallbacks` with this handler's trampolines (Version 1, 48 bytes).
    pub fn set_state_change_callbacks(&self) -> Result<()> {
        let mut callbacks = callbacks::state_change_callbacks::<H>();
        // `callbacks` is a local valid for the call; KMCL copies the structure.
        call!(self.interface(), Client.VmbChannelInitSetStateChangeCallbacks(self.raw, &raw mut callbacks) else NtStatus::NOT_SUPPORTED).ok()
    }

    /// `VmbServerChannelInitSetSaveRestorePacketCallbacks` with this handler's trampolines.
    pub fn set_save_restore_callbacks(&self) -> Result<()> {
        let (save, restore) = callbacks::save_restore_callbacks::<H>();
        call!(self.interface(), Server.VmbServerChannelInitSetSaveRestorePacketCallbacks(self.raw, save, restore) else NtStatus::NOT_SUPPORTED).ok()
    }

    /// `VmbChannelEnable`: offers the channel; returns without waiting for the guest.
    pub fn enable(&self) -> Result<()> {
        call!(self.interface(), Client.VmbChannelEnable(self.raw) else NtStatus::NOT_SUPPORTED)
            .ok()?;
        self.needs_disable.store(true, Ordering::Release);
        Ok(())
    }

    /// `VmbChannelStart`: leaves the paused state. Never from inside a state-change callback.
    pub fn start(&self) {
        call!(self.interface(), Client.VmbChannelStart(self.raw) else ());
    }

    /// `VmbChannelPause`: waits until suspended and every incoming packet is completed. PASSIVE.
    pub fn pause(&self) {
        call!(self.interface(), Client.VmbChannelPause(self.raw) else ());
    }

    /// `VmbChannelDisable`: revokes the offer and waits for full teardown. PASSIVE.
    ///
    /// Outstanding outgoing packets come back through their completion routine, cancelled.
    pub fn disable(&self) {
        if self.needs_disable.swap(false, Ordering::AcqRel) {
            call!(self.interface(), Client.VmbChannelDisable(self.raw) else ());
        }
    }

    /// Whether [`disable`](Self::disable) has something to tear down: the channel was enabled,
    /// or a restore put packets in flight, and no disable followed.
    pub fn needs_disable(&self) -> bool {
        self.needs_disable.load(Ordering::Acquire)
    }

    /// `VmbChannelSaveBegin`.
    pub fn save_begin(&self) -> Result<()> {
        call!(self.interface(), Server.VmbChannelSaveBegin(self.raw) else NtStatus::NOT_SUPPORTED)
            .ok()
    }

    /// `VmbChannelSaveContinue` into `buffer`: see [`SaveChunk`] for the three outcomes.
    pub fn save_continue(&self, buffer: &mut [u8]) -> SaveChunk {
        // KMCL takes a ULONG size; a larger buffer is simply offered in part.
        let size = u32::try_from(buffer.len()).unwrap_or(u32::MAX);
        let mut filled = 0u32;
        let mut required = 0u32;
        // `buffer` is writable for `size` bytes; the two counters are locals valid for the call.
        let status = call!(self.interface(), Server.VmbChannelSaveContinue(
            self.raw,
            buffer.as_mut_ptr().cast::<c_void>(),
            size,
            &raw mut filled,
            &raw mut required,
        ) else NtStatus::NOT_SUPPORTED);
        SaveChunk {
            status,
            filled,
            required,
        }
    }

    /// `VmbChannelSaveEnd`: frees the save context (also after a failed save).
    pub fn save_end(&self) {
        call!(self.interface(), Server.VmbChannelSaveEnd(self.raw) else ());
    }

    /// `VmbChannelRestoreFromBuffer` with one whole chunk.
    ///
    /// Returns the raw status: `STATUS_MORE_PROCESSING_REQUIRED` (error severity) means "send the
    /// next chunk" and must be compared explicitly.
    pub fn restore_from_buffer(&self, chunk: &[u8]) -> NtStatus {
        let Ok(size) = u32::try_from(chunk.len()) else {
            return NtStatus::INVALID_BUFFER_SIZE;
        };
        // Restored packets are in flight even though the channel was never enabled; only
        // VmbChannelDisable gives them back (cancelled), so teardown must call it.
        self.needs_disable.store(true, Ordering::Release);
        // KMCL only reads the chunk (`_In_reads_bytes_`), valid for the call.
        call!(self.interface(), Server.VmbChannelRestoreFromBuffer(self.raw, chunk.as_ptr().cast_mut().cast::<c_void>(), size) else NtStatus::NOT_SUPPORTED)
    }
}

impl<H: ChannelEvents> Drop for OwnedChannel<'_, H> {
    fn drop(&mut self) {
        self.disable();
        let handler = &self.bound.handler;
        let mut rounds = 0;
        while handler.packets_worth_waiting_for() != 0 && rounds < TEARDOWN_WAIT_ROUNDS {
            handler.relax();
            rounds += 1;
        }
        call!(self.interface(), Client.VmbChannelCleanup(self.raw) else ());
        if self.bound.handler.outstanding_packets() != 0 {
            // A completion routine may still reach `bound`: keep it (see the type's docs), with
            // only what such a routine needs.
            self.bound.handler.shed_memory();
            self.interface().record_leaked_channel();
            return;
        }
        // SAFETY: Disable and Cleanup returned and the handler accounts for every packet KMCL
        // owned, so no callback can reach `bound` any more; it is dropped exactly once, here, and
        // never used again (the channel is being dropped).
        unsafe { ManuallyDrop::drop(&mut self.bound) };
    }
}

/// The outcome of one `VmbChannelSaveContinue` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaveChunk {
    /// `STATUS_SUCCESS` (last chunk written), `STATUS_BUFFER_OVERFLOW` (a chunk written, more to
    /// come), `STATUS_BUFFER_TOO_SMALL` (nothing written, see `required`), or a failure.
    pub status: NtStatus,
    /// Bytes written into the buffer.
    pub filled: u32,
    /// With `STATUS_BUFFER_TOO_SMALL`: the buffer size needed to make progress.
    pub required: u32,
}

impl<'a, H: ChannelEvents> Channel<'a, H> {
    pub(super) fn from_raw(interface: &'a ServerInterface, raw: VMBCHANNEL) -> Self {
        Self {
            interface,
            raw,
            _handler: PhantomData,
        }
    }

    /// `VmbPacketAllocate`: a packet object from the channel's pool, or `None` when exhausted.
    pub fn allocate_packet(self) -> Option<Packet<'a, H>> {
        let raw = call!(self.interface, Client.VmbPacketAllocate(self.raw) else ptr::null_mut());
        (!raw.is_null()).then(|| Packet::from_raw(self.interface, raw))
    }

    /// The raw handle, for logging and identity comparisons only.
    pub fn as_raw(self) -> VMBCHANNEL {
        self.raw
    }
}

/// A packet object the driver owns: freshly allocated, or handed back by its completion routine.
///
/// Dropping it without `send`, `restore` or `free` leaks the packet object, so it is `must_use`.
#[must_use = "a packet object must be sent, restored or freed"]
pub struct Packet<'a, H> {
    interface: &'a ServerInterface,
    raw: VMBPACKET,
    _handler: PhantomData<fn(&H)>,
}

// SAFETY: a packet object may be used on any thread (completions arrive on arbitrary threads).
unsafe impl<H> Send for Packet<'_, H> {}

impl<'a, H: ChannelEvents> Packet<'a, H> {
    pub(super) fn from_raw(interface: &'a ServerInterface, raw: VMBPACKET) -> Self {
        Self {
            interface,
            raw,
            _handler: PhantomData,
        }
    }

    /// `VmbPacketSetCompletionRoutine` with the channel handler's completion trampoline.
    pub fn set_completion_routine(&self) {
        let routine = callbacks::packet_completion_routine::<H>();
        call!(self.interface, Client.VmbPacketSetCompletionRoutine(self.raw, routine) else ());
    }

    /// `VmbPacketSetPointer` with an opaque token (never dereferenced by anyone).
    pub fn set_token(&self, token: NonZeroUsize) {
        let pointer = ptr::without_provenance_mut::<c_void>(token.get());
        call!(self.interface, Client.VmbPacketSetPointer(self.raw, pointer) else ());
    }

    /// The token stored with [`set_token`](Self::set_token), if any.
    pub fn token(&self) -> Option<NonZeroUsize> {
        packet_token(self.interface, self.raw)
    }

    /// `VmbPacketSend` of `buffer`; on success the packet belongs to KMCL until its completion.
    pub fn send(self, buffer: &[u8], flags: u32) -> core::result::Result<(), (NtStatus, Self)> {
        let Ok(length) = u32::try_from(buffer.len()) else {
            return Err((NtStatus::INVALID_BUFFER_SIZE, self));
        };
        // KMCL reads (and, unless PAGED_BUFFER, copies) `buffer` during the call.
        let status = call!(self.interface, Client.VmbPacketSend(
            self.raw,
            buffer.as_ptr().cast_mut().cast::<c_void>(),
            length,
            ptr::null_mut(),
            flags,
        ) else NtStatus::NOT_SUPPORTED);
        if status.is_success() {
            Ok(())
        } else {
            Err((status, self))
        }
    }

    /// `VmbPacketRestore` from KMCL's saved library state; on success the packet is in flight
    /// and belongs to KMCL, exactly as after a send.
    pub fn restore(
        self,
        lib_buf: &[u8],
    ) -> core::result::Result<RestoredPacket<'a, H>, (NtStatus, Self)> {
        let Ok(length) = u32::try_from(lib_buf.len()) else {
            return Err((NtStatus::INVALID_BUFFER_SIZE, self));
        };
        // KMCL only reads `lib_buf` during the call.
        let status = call!(self.interface, Server.VmbPacketRestore(
            self.raw,
            lib_buf.as_ptr().cast_mut().cast::<c_void>(),
            length,
        ) else NtStatus::NOT_SUPPORTED);
        if status.is_success() {
            Ok(RestoredPacket {
                interface: self.interface,
                raw: self.raw,
                _handler: PhantomData,
            })
        } else {
            Err((status, self))
        }
    }

    /// `VmbPacketFree`.
    pub fn free(self) {
        call!(self.interface, Client.VmbPacketFree(self.raw) else ());
    }
}

/// A packet object that `VmbPacketRestore` just put back in flight (KMCL owns it).
///
/// Whether a restored packet keeps the completion routine and context pointer set before the
/// restore is not documented, and a library could reset one and keep the other. The driver sets
/// both before the restore and [`rebind`](Self::rebind)s both after it, unconditionally: correct
/// under every reading, and safe because the channel was never enabled, so no completion can run
/// between the restore and the rebind.
pub struct RestoredPacket<'a, H> {
    interface: &'a ServerInterface,
    raw: VMBPACKET,
    _handler: PhantomData<fn(&H)>,
}

impl<H: ChannelEvents> RestoredPacket<'_, H> {
    /// Installs the completion routine and `token` again (`VmbPacketSetCompletionRoutine` and
    /// `VmbPacketSetPointer`).
    pub fn rebind(&self, token: NonZeroUsize) {
        let routine = callbacks::packet_completion_routine::<H>();
        // The channel was never enabled: the packet's completion cannot run concurrently.
        call!(self.interface, Client.VmbPacketSetCompletionRoutine(self.raw, routine) else ());
        let pointer = ptr::without_provenance_mut::<c_void>(token.get());
        // As above.
        call!(self.interface, Client.VmbPacketSetPointer(self.raw, pointer) else ());
    }
}

/// A packet object KMCL owns, shown to the save callback: only its token can be read.
pub struct PacketView<'a> {
    interface: &'a ServerInterface,
    raw: VMBPACKET,
}

impl<'a> PacketView<'a> {
    pub(super) fn from_raw(interface: &'a ServerInterface, raw: VMBPACKET) -> Self {
        Self { interface, raw }
    }

    /// The token stored with [`Packet::set_token`], if any.
    pub fn token(&self) -> Option<NonZeroUsize> {
        packet_token(self.interface, self.raw)
    }
}

fn packet_token(interface: &ServerInterface, raw: VMBPACKET) -> Option<NonZeroUsize> {
    let pointer = call!(interface, Client.VmbPacketGetPointer(raw) else ptr::null_mut());
    NonZeroUsize::new(pointer.addr())
}

/// An incoming (guest→host) packet; completed exactly once — explicitly, or on drop with an
/// empty completion so that a forgotten packet can never stall `VmbChannelPause`.
pub struct IncomingPacket<'a> {
    interface: &'a ServerInterface,
    raw: VMBPACKETCOMPLETION,
    bytes: GuestBytes<'a>,
    completed: bool,
}

impl<'a> IncomingPacket<'a> {
    pub(super) fn from_raw(
        interface: &'a ServerInterface,
        raw: VMBPACKETCOMPLETION,
        bytes: GuestBytes<'a>,
    ) -> Self {
        Self {
            interface,
            raw,
            bytes,
            completed: false,
        }
    }

    /// The packet's bytes (guest memory: copy before validating).
    pub fn bytes(&self) -> GuestBytes<'a> {
        self.bytes
    }

    /// `VmbChannelPacketComplete` with `reply` as the completion payload.
    pub fn complete(mut self, reply: &[u8]) {
        self.complete_with(reply);
    }

    fn complete_with(&mut self, reply: &[u8]) {
        if core::mem::replace(&mut self.completed, true) {
            return;
        }
        // A reply longer than u32::MAX cannot be expressed; send none rather than a truncation.
        let (pointer, length) = match u32::try_from(reply.len()) {
            Ok(length) if length > 0 => (reply.as_ptr().cast_mut().cast::<c_void>(), length),
            _ => (ptr::null_mut(), 0),
        };
        // `reply` is read during the call; `raw` has not been completed yet (flag above).
        call!(self.interface, Client.VmbChannelPacketComplete(self.raw, pointer, length) else ());
    }

    /// `VmbChannelPacketFail`: for garbled framing only — it stops the channel's incoming queue.
    pub fn fail(mut self) {
        self.completed = true;
        // `raw` has not been completed yet; `fail` consumes the packet.
        call!(self.interface, Client.VmbChannelPacketFail(self.raw) else ());
    }
}

impl Drop for IncomingPacket<'_> {
    fn drop(&mut self) {
        self.complete_with(&[]);
    }
}

/// Bytes that live in memory the guest may still write (an incoming packet, a completion payload).
///
/// There is deliberately no `&[u8]` view: the only access is a single copy into host memory,
/// after which the copy is validated and parsed (no double fetch).
#[derive(Clone, Copy)]
pub struct GuestBytes<'a> {
    pointer: *const u8,
    len: usize,
    _lifetime: PhantomData<&'a [u8]>,
}

impl GuestBytes<'_> {
    /// # Safety
    /// `pointer` must be readable for `len` bytes for the lifetime `'a` (or be NULL, with any len,
    /// which reads as empty).
    pub(super) unsafe fn new(pointer: *const c_void, len: u32) -> Self {
        let len = if pointer.is_null() { 0 } else { len as usize };
        Self {
            pointer: pointer.cast::<u8>(),
            len,
            _lifetime: PhantomData,
        }
    }

    /// The length the peer claimed for these bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies the first `min(len, destination.len())` bytes; returns the copy.
    pub fn copy_prefix_to<'d>(&self, destination: &'d mut [u8]) -> &'d [u8] {
        let count = self.len.min(destination.len());
        let prefix = GuestBytes {
            pointer: self.pointer,
            len: count,
            _lifetime: PhantomData,
        };
        prefix.copy_to(destination).unwrap_or(&[])
    }

    /// Copies the bytes into `destination` if they fit; returns the copy, or `None` (nothing copied).
    pub fn copy_to<'d>(&self, destination: &'d mut [u8]) -> Option<&'d [u8]> {
        let target = destination.get_mut(..self.len)?;
        if self.len > 0 {
            // SAFETY: `pointer` is readable for `len` bytes (constructor contract) and `target`
            // is exactly `len` writable bytes of host memory that cannot overlap guest memory.
            unsafe { ptr::copy_nonoverlapping(self.pointer, target.as_mut_ptr(), self.len) };
        }
        Some(target)
    }
}
