//! A minimal raw KMCL driver for the simulator's own tests: callbacks defined with the table's ABI,
//! calling back through the table, recording what happened. Deliberately independent of `vsp`.
#![allow(dead_code, unreachable_pub)]

use std::ffi::c_void;
use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use kmcl::NtStatus;
use kmcl_sim::{
    self as sim, Irql, Kmcl, SIM_KMCL_SERVER_INTERFACE_TYPE, SIM_KMCL_SERVER_INTERFACE_VERSION,
};
use kmcl_sys::*;

/// Defines a callback with the KMCL ABI: `kmcl_sys::kmcl_fn!`, which alone knows the convention.
macro_rules! kmcl_callback {
    ($(#[$m:meta])* fn $($rest:tt)*) => {
        kmcl_sys::kmcl_fn! { $(#[$m])* unsafe fn $($rest)* }
    };
}

pub const TYPE_ID: GUID = GUID {
    Data1: 0x1234_5678,
    Data2: 0x9abc,
    Data3: 0xdef0,
    Data4: [1, 2, 3, 4, 5, 6, 7, 8],
};

/// A distinct instance id per test channel.
pub fn instance_id(n: u32) -> GUID {
    GUID {
        Data1: n,
        Data2: 0x5151,
        Data3: 0x7,
        Data4: [9; 8],
    }
}

/// The table, shareable between threads.
pub struct Table(pub KMCL_SERVER_INTERFACE_V1);

// SAFETY: the table holds function pointers and the `Context` token of an instance that no longer
// exists; the tests only call the function pointers (which are thread-safe simulator entry
// points) and never dereference or use `Context`.
unsafe impl Sync for Table {}
// SAFETY: as for `Sync`: nothing in it is tied to a thread.
unsafe impl Send for Table {}

static TABLE: OnceLock<Table> = OnceLock::new();

/// The entry points (identical in every simulator instance's table; only `Context` differs).
pub fn t() -> &'static KMCL_SERVER_INTERFACE_V1 {
    &TABLE
        .get_or_init(|| {
            let kmcl = Kmcl::default();
            let table = kmcl
                .query_interface(&SIM_KMCL_SERVER_INTERFACE_TYPE, 472, 1)
                .expect("query");
            release(&table);
            assert!(kmcl.finish().is_empty());
            Table(table)
        })
        .0
}

/// Drops one interface reference.
pub fn release(table: &KMCL_SERVER_INTERFACE_V1) {
    if let Some(deref) = table.Client.Interface.InterfaceDereference {
        // SAFETY: `deref` is the simulator's InterfaceDereference and Context is the value the
        // query returned with it.
        unsafe { deref(table.Client.Interface.Context) };
    }
}

/// Calls a table slot: `kcall!(Client.VmbChannelStart, ch)`.
macro_rules! kcall {
    ($part:ident . $slot:ident $(, $arg:expr)* $(,)?) => {{
        let f = $crate::support::t().$part.$slot.expect(stringify!($slot));
        // SAFETY: `f` is a simulator entry point with this slot's signature; the simulator
        // validates every handle and pointer it is given, and the tests pass valid buffers.
        unsafe { f($($arg),*) }
    }};
}
#[allow(unused_imports)] // not every test file calls table slots directly
pub(crate) use kcall;

/// One thing the driver saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ev {
    Opened,
    Closed,
    Suspend,
    Started,
    PostStarted,
    Process(Vec<u8>),
    BatchDone(u32),
    Completion {
        tag: usize,
        status: NtStatus,
        payload: Vec<u8>,
    },
    SaveProbe,
    Save,
    Restore {
        save_buf: Vec<u8>,
    },
}

/// How incoming packets are handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IncomingMode {
    /// Complete at once with the same bytes, prefixed by `b"re:"`.
    Echo,
    /// Keep them (in `held`), complete later.
    Hold,
    /// `VmbChannelPacketFail`.
    Fail,
    /// Defer the first delivery to PASSIVE, echo the redelivery.
    Defer,
    /// Complete twice.
    CompleteTwice,
    /// Fail then complete.
    FailThenComplete,
}

/// How the save callback behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveMode {
    /// Save the packet's tag as 8 bytes (probe fails with BytesNeeded = 8).
    Tag,
    /// Nothing to save.
    Nothing,
    /// Probe succeeds but claims bytes.
    ProbeSuccessWithSize,
    /// Probe fails without a size.
    ProbeFailNoSize,
    /// The second call fails.
    SecondFails,
    /// Writes 8 bytes past BytesNeeded.
    WritePast,
    /// Asks for 8 bytes, writes 4.
    WriteShort,
    /// review15: in the second call, ends the save and begins a new one on the same channel
    /// (`VmbChannelSaveEnd` + `VmbChannelSaveBegin` from inside the callback), then saves the tag.
    RestartSave,
}

/// How the restore callback behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestoreMode {
    /// Allocate, set routine + pointer, VmbPacketRestore.
    Normal,
    /// Allocate, VmbPacketRestore, then set routine + pointer.
    SetAfter,
    /// Return success without restoring.
    SuccessWithoutRestore,
    /// Restore, then return failure.
    FailAfterRestore,
    /// Return failure before allocating.
    Fail,
    /// Pass a corrupted LibBuf to VmbPacketRestore.
    WrongLibBuf,
    /// VmbPacketRestore twice.
    RestoreTwice,
}

/// Misuse performed from inside a callback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Misuse {
    None,
    PauseInOpened,
    StartInStarted,
    PauseInCompletion,
}

pub struct Behaviour {
    pub opened_status: NtStatus,
    pub incoming: IncomingMode,
    pub complete_held_in_suspend: bool,
    pub free_on_completion: bool,
    pub save: SaveMode,
    pub restore: RestoreMode,
    pub misuse: Misuse,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            opened_status: NtStatus::SUCCESS,
            incoming: IncomingMode::Echo,
            complete_held_in_suspend: true,
            free_on_completion: true,
            save: SaveMode::Tag,
            restore: RestoreMode::Normal,
            misuse: Misuse::None,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The test driver's per-channel context (what `VmbChannelSetPointer` points at).
pub struct Driver {
    pub channel: AtomicUsize,
    pub log: Mutex<Vec<(Ev, Irql)>>,
    pub behaviour: Mutex<Behaviour>,
    pub held: Mutex<Vec<usize>>,
    pub spare_packet: AtomicUsize,
}

impl Driver {
    pub fn new() -> Arc<Driver> {
        Arc::new(Driver {
            channel: AtomicUsize::new(0),
            log: Mutex::new(Vec::new()),
            behaviour: Mutex::new(Behaviour::default()),
            held: Mutex::new(Vec::new()),
            spare_packet: AtomicUsize::new(0),
        })
    }

    pub fn ch(&self) -> VMBCHANNEL {
        ptr::without_provenance_mut(self.channel.load(Ordering::SeqCst))
    }

    pub fn behave(&self) -> MutexGuard<'_, Behaviour> {
        lock(&self.behaviour)
    }

    fn record(&self, ev: Ev) {
        lock(&self.log).push((ev, sim::current_irql()));
    }

    /// Events so far (without IRQLs).
    pub fn events(&self) -> Vec<Ev> {
        lock(&self.log).iter().map(|(e, _)| e.clone()).collect()
    }

    /// Events with the IRQL they ran at.
    pub fn events_irql(&self) -> Vec<(Ev, Irql)> {
        lock(&self.log).clone()
    }

    /// State-change events only.
    pub fn states(&self) -> Vec<Ev> {
        self.events()
            .into_iter()
            .filter(|e| {
                matches!(
                    e,
                    Ev::Opened | Ev::Closed | Ev::Suspend | Ev::Started | Ev::PostStarted
                )
            })
            .collect()
    }

    pub fn clear(&self) {
        lock(&self.log).clear();
    }

    /// Completions recorded: (tag, status, payload).
    pub fn completions(&self) -> Vec<(usize, NtStatus, Vec<u8>)> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Ev::Completion {
                    tag,
                    status,
                    payload,
                } => Some((tag, status, payload)),
                _ => None,
            })
            .collect()
    }

    /// Allocates a channel on `kmcl`, fully initialised (not enabled).
    pub fn create(self: &Arc<Self>, kmcl: &Kmcl, instance: u32) -> VMBCHANNEL {
        let mut ch: VMBCHANNEL = ptr::null_mut();
        let status = kcall!(Client.VmbChannelAllocate, kmcl.device_object(), 1, &mut ch);
        assert_eq!(status, NtStatus::SUCCESS);
        self.channel.store(ch.addr(), Ordering::SeqCst);
        self.init(ch, instance);
        ch
    }

    /// The Init* sequence on a disabled channel.
    pub fn init(self: &Arc<Self>, ch: VMBCHANNEL, instance: u32) {
        assert_eq!(
            kcall!(
                Server.VmbServerChannelInitSetTargetInterfaceId,
                ch,
                TYPE_ID,
                instance_id(instance)
            ),
            NtStatus::SUCCESS
        );
        assert_eq!(
            kcall!(Client.VmbChannelInitSetMaximumPacketSize, ch, 256),
            NtStatus::SUCCESS
        );
        let mut callbacks = VMB_CHANNEL_STATE_CHANGE_CALLBACKS {
            Version: 1,
            Size: 48,
            EvtChannelOpened: Some(on_opened),
            EvtChannelClosed: Some(on_closed),
            EvtChannelSuspend: Some(on_suspend),
            EvtChannelStarted: Some(on_started),
            EvtChannelPostStarted: Some(on_post_started),
        };
        assert_eq!(
            kcall!(
                Client.VmbChannelInitSetStateChangeCallbacks,
                ch,
                &mut callbacks
            ),
            NtStatus::SUCCESS
        );
        assert_eq!(
            kcall!(
                Client.VmbChannelInitSetProcessPacketCallbacks,
                ch,
                Some(on_process),
                Some(on_batch_done)
            ),
            NtStatus::SUCCESS
        );
        assert_eq!(
            kcall!(
                Server.VmbServerChannelInitSetSaveRestorePacketCallbacks,
                ch,
                Some(on_save),
                Some(on_restore)
            ),
            NtStatus::SUCCESS
        );
        let mut name: Vec<u16> = "Test".encode_utf16().collect();
        let us = UNICODE_STRING {
            Length: 8,
            MaximumLength: 8,
            Buffer: name.as_mut_ptr(),
        };
        assert_eq!(
            kcall!(Client.VmbChannelInitSetFriendlyName, ch, &us),
            NtStatus::SUCCESS
        );
        kcall!(
            Client.VmbChannelSetPointer,
            ch,
            Arc::as_ptr(self).cast_mut().cast()
        );
    }

    pub fn enable(&self) -> NtStatus {
        kcall!(Client.VmbChannelEnable, self.ch())
    }
    pub fn start(&self) {
        kcall!(Client.VmbChannelStart, self.ch());
    }
    pub fn pause(&self) {
        kcall!(Client.VmbChannelPause, self.ch());
    }
    pub fn disable(&self) {
        kcall!(Client.VmbChannelDisable, self.ch());
    }
    pub fn cleanup(&self) {
        kcall!(Client.VmbChannelCleanup, self.ch());
    }

    /// Allocates a packet with the completion routine and `tag` as its context pointer.
    pub fn packet(&self, tag: usize) -> VMBPACKET {
        let p = kcall!(Client.VmbPacketAllocate, self.ch());
        assert!(!p.is_null(), "allocation failed");
        kcall!(Client.VmbPacketSetCompletionRoutine, p, Some(on_completion));
        kcall!(
            Client.VmbPacketSetPointer,
            p,
            ptr::without_provenance_mut(tag)
        );
        p
    }

    /// Sends `bytes` on `p` with WAIT_FOR_COMPLETION.
    pub fn send(&self, p: VMBPACKET, bytes: &[u8]) -> NtStatus {
        send_flags(p, bytes, VMBUS_CHANNEL_FORMAT_FLAG_WAIT_FOR_COMPLETION)
    }

    /// Allocates and sends a tagged packet.
    pub fn post(&self, tag: usize, bytes: &[u8]) -> VMBPACKET {
        let p = self.packet(tag);
        assert_eq!(self.send(p, bytes), NtStatus::SUCCESS);
        p
    }

    /// SaveBegin / SaveContinue (buffers of `chunk` bytes) / SaveEnd; the chunks in order.
    pub fn save(&self, chunk: u32) -> Result<Vec<Vec<u8>>, NtStatus> {
        let ch = self.ch();
        let status = kcall!(Server.VmbChannelSaveBegin, ch);
        if status != NtStatus::SUCCESS {
            return Err(status);
        }
        let mut chunks = Vec::new();
        let result = loop {
            let mut buf = vec![0u8; chunk as usize];
            let (mut filled, mut required) = (0u32, 0u32);
            let status = kcall!(
                Server.VmbChannelSaveContinue,
                ch,
                buf.as_mut_ptr().cast::<c_void>(),
                chunk,
                &mut filled,
                &mut required
            );
            if status == NtStatus::SUCCESS || status == NtStatus::BUFFER_OVERFLOW {
                buf.truncate(filled as usize);
                chunks.push(buf);
                if status == NtStatus::SUCCESS {
                    break Ok(chunks);
                }
            } else {
                break Err(status);
            }
        };
        kcall!(Server.VmbChannelSaveEnd, ch);
        result
    }

    /// Feeds the chunks; returns the status of the last call made.
    pub fn restore(&self, chunks: &[Vec<u8>]) -> NtStatus {
        let mut last = NtStatus::SUCCESS;
        for (i, c) in chunks.iter().enumerate() {
            last = restore_chunk(self.ch(), c);
            let expected = if i + 1 == chunks.len() {
                NtStatus::SUCCESS
            } else {
                NtStatus::MORE_PROCESSING_REQUIRED
            };
            if last != expected {
                return last;
            }
        }
        last
    }
}

pub fn restore_chunk(ch: VMBCHANNEL, bytes: &[u8]) -> NtStatus {
    kcall!(
        Server.VmbChannelRestoreFromBuffer,
        ch,
        bytes.as_ptr().cast_mut().cast::<c_void>(),
        bytes.len() as u32
    )
}

pub fn send_flags(p: VMBPACKET, bytes: &[u8], flags: u32) -> NtStatus {
    kcall!(
        Client.VmbPacketSend,
        p,
        bytes.as_ptr().cast_mut().cast::<c_void>(),
        bytes.len() as u32,
        ptr::null_mut(),
        flags
    )
}

pub fn free(p: VMBPACKET) {
    kcall!(Client.VmbPacketFree, p);
}

pub fn complete(pc: usize, bytes: &[u8]) {
    kcall!(
        Client.VmbChannelPacketComplete,
        ptr::without_provenance_mut(pc),
        bytes.as_ptr().cast_mut().cast::<c_void>(),
        bytes.len() as u32
    );
}

pub fn fail(pc: usize) {
    kcall!(Client.VmbChannelPacketFail, ptr::without_provenance_mut(pc));
}

/// The driver a channel belongs to.
fn driver<'a>(ch: VMBCHANNEL) -> Option<&'a Driver> {
    let p = kcall!(Client.VmbChannelGetPointer, ch)
        .cast::<Driver>()
        .cast_const();
    // SAFETY: the channel pointer was set to `Arc::as_ptr` of a Driver that every test keeps
    // alive until after the channel is cleaned up; NULL is mapped to None.
    unsafe { p.as_ref() }
}

fn packet_driver<'a>(p: VMBPACKET) -> Option<&'a Driver> {
    let ch = kcall!(Client.VmbPacketGetChannel, p);
    driver(ch)
}

// ---- callbacks --------------------------------------------------------------------------------

kmcl_callback! {
    fn on_opened(ch: VMBCHANNEL) -> NtStatus {
        let Some(d) = driver(ch) else { return NtStatus::UNSUCCESSFUL };
        d.record(Ev::Opened);
        let (status, misuse) = {
            let b = d.behave();
            (b.opened_status, b.misuse)
        };
        if misuse == Misuse::PauseInOpened {
            kcall!(Client.VmbChannelPause, ch);
        }
        status
    }
}

kmcl_callback! {
    fn on_closed(ch: VMBCHANNEL) {
        if let Some(d) = driver(ch) {
            d.record(Ev::Closed);
        }
    }
}

kmcl_callback! {
    fn on_suspend(ch: VMBCHANNEL) {
        let Some(d) = driver(ch) else { return };
        d.record(Ev::Suspend);
        let complete_held = d.behave().complete_held_in_suspend;
        if complete_held {
            for pc in std::mem::take(&mut *lock(&d.held)) {
                complete(pc, b"cancelled");
            }
        }
    }
}

kmcl_callback! {
    fn on_started(ch: VMBCHANNEL) {
        let Some(d) = driver(ch) else { return };
        d.record(Ev::Started);
        if d.behave().misuse == Misuse::StartInStarted {
            kcall!(Client.VmbChannelStart, ch);
        }
    }
}

kmcl_callback! {
    fn on_post_started(ch: VMBCHANNEL) {
        if let Some(d) = driver(ch) {
            d.record(Ev::PostStarted);
        }
    }
}

kmcl_callback! {
    fn on_process(ch: VMBCHANNEL, pc: VMBPACKETCOMPLETION, buffer: PVOID, length: u32, _flags: u32) {
        let Some(d) = driver(ch) else { return };
        let bytes = if length == 0 || buffer.is_null() {
            Vec::new()
        } else {
            // SAFETY: the simulator passes `length` readable bytes at `buffer`, valid until the
            // packet is completed (which happens below, after the copy).
            unsafe { std::slice::from_raw_parts(buffer.cast::<u8>(), length as usize) }.to_vec()
        };
        d.record(Ev::Process(bytes.clone()));
        let mode = d.behave().incoming;
        let echo = [b"re:".as_slice(), &bytes].concat();
        match mode {
            IncomingMode::Echo => complete(pc.addr(), &echo),
            IncomingMode::Hold => lock(&d.held).push(pc.addr()),
            IncomingMode::Fail => fail(pc.addr()),
            IncomingMode::Defer => {
                if sim::current_irql() == Irql::Dispatch {
                    kcall!(Client.VmbChannelPacketDeferToPassive, pc);
                } else {
                    complete(pc.addr(), &echo);
                }
            }
            IncomingMode::CompleteTwice => {
                complete(pc.addr(), &echo);
                complete(pc.addr(), &echo);
            }
            IncomingMode::FailThenComplete => {
                fail(pc.addr());
                complete(pc.addr(), &echo);
            }
        }
    }
}

kmcl_callback! {
    fn on_batch_done(ch: VMBCHANNEL, count: u32) {
        if let Some(d) = driver(ch) {
            d.record(Ev::BatchDone(count));
        }
    }
}

kmcl_callback! {
    fn on_completion(p: VMBPACKET, status: NtStatus, buffer: PVOID, length: u32) {
        let Some(d) = packet_driver(p) else { return };
        let payload = if length == 0 || buffer.is_null() {
            Vec::new()
        } else {
            // SAFETY: the simulator passes `length` readable bytes at `buffer` for the call.
            unsafe { std::slice::from_raw_parts(buffer.cast::<u8>(), length as usize) }.to_vec()
        };
        let tag = kcall!(Client.VmbPacketGetPointer, p).addr();
        d.record(Ev::Completion { tag, status, payload });
        let (free_it, misuse) = {
            let b = d.behave();
            (b.free_on_completion, b.misuse)
        };
        if misuse == Misuse::PauseInCompletion {
            let ch = kcall!(Client.VmbPacketGetChannel, p);
            kcall!(Client.VmbChannelPause, ch);
        }
        if free_it {
            kcall!(Client.VmbPacketFree, p);
        }
    }
}

kmcl_callback! {
    fn on_save(ch: VMBCHANNEL, p: VMBPACKET, buf: PVOID, size: u32, needed: *mut u32) -> NtStatus {
        let Some(d) = driver(ch) else { return NtStatus::UNSUCCESSFUL };
        let tag = kcall!(Client.VmbPacketGetPointer, p).addr() as u64;
        let mode = d.behave().save;
        let set_needed = |n: u32| {
            if !needed.is_null() {
                // SAFETY: the simulator passes a valid, writable BytesNeeded.
                unsafe { needed.write(n) };
            }
        };
        if size == 0 {
            d.record(Ev::SaveProbe);
            return match mode {
                SaveMode::Nothing => NtStatus::SUCCESS,
                SaveMode::ProbeSuccessWithSize => {
                    set_needed(8);
                    NtStatus::SUCCESS
                }
                SaveMode::ProbeFailNoSize => NtStatus::BUFFER_TOO_SMALL,
                _ => {
                    set_needed(8);
                    NtStatus::BUFFER_TOO_SMALL
                }
            };
        }
        d.record(Ev::Save);
        if buf.is_null() || size < 8 {
            return NtStatus::BUFFER_TOO_SMALL;
        }
        // SAFETY: the simulator passes `size` writable bytes at `buf` for the duration of the call.
        let out = unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), size as usize) };
        match mode {
            SaveMode::RestartSave => {
                // Once: the restarted save presents the packet again.
                d.behave().save = SaveMode::Tag;
                kcall!(Server.VmbChannelSaveEnd, ch);
                let _ = kcall!(Server.VmbChannelSaveBegin, ch);
                out[..8].copy_from_slice(&tag.to_le_bytes());
            }
            SaveMode::SecondFails => return NtStatus::UNSUCCESSFUL,
            SaveMode::WriteShort => out[..4].copy_from_slice(&tag.to_le_bytes()[..4]),
            SaveMode::WritePast => {
                let n = out.len().min(16);
                out[..n].fill(0xAB);
                out[..8].copy_from_slice(&tag.to_le_bytes());
            }
            _ => out[..8].copy_from_slice(&tag.to_le_bytes()),
        }
        set_needed(8);
        NtStatus::SUCCESS
    }
}

kmcl_callback! {
    fn on_restore(ch: VMBCHANNEL, lib: PVOID, lib_size: u32, save: PVOID, save_size: u32) -> NtStatus {
        let Some(d) = driver(ch) else { return NtStatus::UNSUCCESSFUL };
        let save_buf = if save_size == 0 || save.is_null() {
            Vec::new()
        } else {
            // SAFETY: the simulator passes `save_size` readable bytes at `save` for the call.
            unsafe { std::slice::from_raw_parts(save.cast::<u8>(), save_size as usize) }.to_vec()
        };
        d.record(Ev::Restore { save_buf: save_buf.clone() });
        let mode = d.behave().restore;
        if mode == RestoreMode::Fail {
            return NtStatus::DATA_ERROR;
        }
        if mode == RestoreMode::SuccessWithoutRestore {
            return NtStatus::SUCCESS;
        }
        let tag = save_buf
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
            .unwrap_or(0) as usize;
        let p = kcall!(Client.VmbPacketAllocate, ch);
        if p.is_null() {
            return NtStatus::INSUFFICIENT_RESOURCES;
        }
        if mode != RestoreMode::SetAfter {
            kcall!(Client.VmbPacketSetCompletionRoutine, p, Some(on_completion));
            kcall!(Client.VmbPacketSetPointer, p, ptr::without_provenance_mut(tag));
        }
        let mut lib_copy = if lib_size == 0 || lib.is_null() {
            Vec::new()
        } else {
            // SAFETY: the simulator passes `lib_size` readable bytes at `lib` for the call.
            unsafe { std::slice::from_raw_parts(lib.cast::<u8>(), lib_size as usize) }.to_vec()
        };
        if mode == RestoreMode::WrongLibBuf
            && let Some(b) = lib_copy.get_mut(10)
        {
            *b ^= 0xFF;
        }
        let status = kcall!(
            Server.VmbPacketRestore,
            p,
            lib_copy.as_mut_ptr().cast::<c_void>(),
            lib_copy.len() as u32
        );
        if mode == RestoreMode::RestoreTwice {
            let _ = kcall!(
                Server.VmbPacketRestore,
                p,
                lib_copy.as_mut_ptr().cast::<c_void>(),
                lib_copy.len() as u32
            );
        }
        if status != NtStatus::SUCCESS {
            kcall!(Client.VmbPacketFree, p);
            return status;
        }
        d.spare_packet.store(p.addr(), Ordering::SeqCst);
        if mode == RestoreMode::SetAfter {
            kcall!(Client.VmbPacketSetCompletionRoutine, p, Some(on_completion));
            kcall!(Client.VmbPacketSetPointer, p, ptr::without_provenance_mut(tag));
        }
        if mode == RestoreMode::FailAfterRestore {
            return NtStatus::DATA_ERROR;
        }
        NtStatus::SUCCESS
    }
}

/// A simulator with a short hang timeout, and `setup`.
pub fn kmcl_with(setup: impl FnOnce(&mut sim::SimConfig)) -> Kmcl {
    let mut config = sim::SimConfig {
        hang_timeout: std::time::Duration::from_secs(5),
        ..Default::default()
    };
    setup(&mut config);
    Kmcl::new(config)
}

/// Queries the interface and checks it.
pub fn query(kmcl: &Kmcl) -> KMCL_SERVER_INTERFACE_V1 {
    kmcl.query_interface(
        &SIM_KMCL_SERVER_INTERFACE_TYPE,
        std::mem::size_of::<KMCL_SERVER_INTERFACE_V1>() as u16,
        SIM_KMCL_SERVER_INTERFACE_VERSION,
    )
    .expect("query_interface")
}

/// A running channel with an open guest: (driver, guest).
pub fn running(kmcl: &Kmcl, instance: u32) -> (Arc<Driver>, sim::Guest) {
    let d = Driver::new();
    d.create(kmcl, instance);
    assert_eq!(d.enable(), NtStatus::SUCCESS);
    d.start();
    let g = sim::Guest::new(TYPE_ID, instance_id(instance));
    kmcl.attach_guest(&g).expect("attach");
    g.open().expect("open");
    kmcl.wait_idle();
    assert!(g.is_open());
    (d, g)
}

/// Disable + cleanup, with the guest's outstanding packets cancelled and freed by the driver.
pub fn teardown(kmcl: &Kmcl, d: &Driver) {
    d.disable();
    kmcl.wait_idle();
    d.cleanup();
}
