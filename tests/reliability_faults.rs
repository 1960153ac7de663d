//! Systematic fault injection over one representative migration: every injection point, one run
//! each.
//!
//! The scenario: create a channel, the guest opens and negotiates, post N = 20, the guest reads
//! what its ring holds and acknowledges half, save in small chunks, complete the migration, restore
//! on a fresh simulator instance, finish the restore, post 4 more, the guest acknowledges
//! everything. It is run once cleanly to learn the injection points, then once per point with
//! exactly that one fault:
//!
//! * (i) the k-th heap allocation made by driver code, for every k — through [`FailingAllocator`],
//!   this binary's `#[global_allocator]`;
//! * (ii) the k-th `VmbPacketAllocate` (`FaultPlan::fail_nth_packet_allocate`), for every k, on
//!   the source and on the destination instance;
//! * (iii) the k-th call of every other fallible KMCL entry point the scenario calls, for every k,
//!   on both instances (`Kmcl::call_count` of the clean run gives each kind's count).
//!
//! The client side reacts as a real control client would: a refused step is retried (a failed
//! post is posted again, a failed save is resumed and saved again, a failed restore is torn down
//! and restored into a new channel). Every run must then (a) see only statuses from the expected
//! set, (b) end with no KMCL contract violation on either instance (`Kmcl::finish`: no leaked
//! packet, channel or interface reference), and (c) deliver all 24 messages exactly once
//! (`scenario::Ledger`). A fault that hit the save therefore proves that the retry of the save
//! succeeds and the restored result is exactly-once clean.
//!
//! # What "driver code" means for (i)
//!
//! A thread-local mode says whose code is running. It is `Driver` while the test thread is inside
//! a call into the VSP (`VspChannel::*`, `ServerInterface::from_queried`, dropping either) and
//! while any thread runs one of the driver's KMCL callbacks (process-packet, processing-complete,
//! the five state-change callbacks, packet completion, save-packet, restore-packet); it is `Kmcl`
//! while any thread is inside a KMCL entry point the driver called. To get there, the driver is
//! given a *shimmed* copy of the simulator's function table: every entry point the driver uses is
//! a wrapper that switches to `Kmcl` mode around the real one, and the callback-registration
//! wrappers hand the simulator wrappers of the driver's callbacks that switch to `Driver` mode.
//! The allocator counts (and fails) only allocations made in `Driver` mode, on any thread. The
//! simulator's own allocations, the test's (guest model, ledger, buffers) and the Rust runtime's
//! are never failed: they are not the code under test, and they allocate infallibly.
#![cfg(target_arch = "x86_64")]
// UNSAFETY: this test drives the KMCL ABI directly (raw table calls and `extern` callbacks).
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError, RwLock};

use kmcl_sim::{
    FaultPlan, Guest, Kmcl, KmclCall, RestoreSaveBufSize, RestoredPacketContext,
    SIM_KMCL_SERVER_INTERFACE_TYPE, SIM_KMCL_SERVER_INTERFACE_VERSION, SaveRequires, SimConfig,
    Violation,
};
use vmbsrv::kmcl::raw::{
    GUID, HANDLE, KMCL_SERVER_INTERFACE_V1, PDEVICE_OBJECT, PFN_VMB_CHANNEL_CLOSED,
    PFN_VMB_CHANNEL_OPENED, PFN_VMB_CHANNEL_POST_STARTED, PFN_VMB_CHANNEL_PROCESS_PACKET,
    PFN_VMB_CHANNEL_PROCESSING_COMPLETE, PFN_VMB_CHANNEL_RESTORE_PACKET,
    PFN_VMB_CHANNEL_SAVE_PACKET, PFN_VMB_CHANNEL_STARTED, PFN_VMB_CHANNEL_SUSPEND,
    PFN_VMB_PACKET_COMPLETION_ROUTINE, PVOID, UNICODE_STRING, VMB_CHANNEL_STATE_CHANGE_CALLBACKS,
    VMBCHANNEL, VMBPACKET, VMBPACKETCOMPLETION,
};
use vmbsrv::kmcl::{NtStatus, SERVER_INTERFACE_V1_SIZE, ServerInterface, VmbusHandle};
use vmbsrv::vsp::{
    ChannelConfig, Outcome, OutcomeKind, Phase, PostRequest, RestoreProgress, VspChannel,
};
use vmbsrv_testkit::migration::{Lock, SCENARIO_INSTANCE, SCENARIO_INTERFACE_TYPE, channel_config};
use vmbsrv_testkit::{GuestModel, Ledger, MigrationConfig, Posted, Verdict};

// ---- whose code is running ------------------------------------------------------------------

const TEST: u8 = 0;
const DRIVER: u8 = 1;
const KMCL: u8 = 2;

std::thread_local! {
    static MODE: Cell<u8> = const { Cell::new(TEST) };
}

/// Restores the previous mode when dropped.
struct ModeGuard(u8);

impl Drop for ModeGuard {
    fn drop(&mut self) {
        MODE.with(|mode| mode.set(self.0));
    }
}

fn enter(mode: u8) -> ModeGuard {
    ModeGuard(MODE.with(|m| m.replace(mode)))
}

/// Runs driver code (a call into the VSP) on the test thread.
fn drv<R>(f: impl FnOnce() -> R) -> R {
    let _mode = enter(DRIVER);
    f()
}

// ---- the failing allocator ------------------------------------------------------------------

/// Counting is on (only while the allocation sweep runs; other tests never see a failure).
static COUNTING: AtomicBool = AtomicBool::new(false);
/// Driver allocations counted since the last reset.
static DRIVER_ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
/// Of those, made on a thread other than the one that started counting (callbacks on simulator
/// threads).
static OFF_THREAD_ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
/// The 1-based driver allocation to fail (0: none).
static FAIL_AT: AtomicU64 = AtomicU64::new(0);
/// Driver allocations failed since the last reset.
static FAILED: AtomicU64 = AtomicU64::new(0);
/// Fail every driver allocation from the [`FAIL_AT`]-th on (persistent memory exhaustion).
static FAIL_STICKY: AtomicBool = AtomicBool::new(false);

std::thread_local! {
    static SWEEP_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// The global allocator of this test binary: [`System`], except that while [`COUNTING`] is on it
/// counts the allocations made in `Driver` mode and fails the [`FAIL_AT`]-th one.
struct FailingAllocator;

impl FailingAllocator {
    /// Whether this allocation (or reallocation) is to fail.
    fn fails_now() -> bool {
        if !COUNTING.load(Ordering::Relaxed) {
            return false;
        }
        if MODE.try_with(Cell::get).unwrap_or(TEST) != DRIVER {
            return false;
        }
        if !SWEEP_THREAD.try_with(Cell::get).unwrap_or(false) {
            OFF_THREAD_ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        let n = DRIVER_ALLOCATIONS.fetch_add(1, Ordering::Relaxed) + 1;
        let at = FAIL_AT.load(Ordering::Relaxed);
        if n == at || (at != 0 && n > at && FAIL_STICKY.load(Ordering::Relaxed)) {
            FAILED.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        false
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments, or reports failure
// (NULL) without touching memory, which `GlobalAlloc` allows for `alloc`, `alloc_zeroed` and
// `realloc` (a failed `realloc` leaves the old block untouched).
unsafe impl GlobalAlloc for FailingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if Self::fails_now() {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract for `alloc` is `System.alloc`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if Self::fails_now() {
            return std::ptr::null_mut();
        }
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if Self::fails_now() {
            return std::ptr::null_mut();
        }
        // SAFETY: `ptr` was allocated by this allocator, i.e. by `System`, with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by this allocator, i.e. by `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: FailingAllocator = FailingAllocator;

/// The allocation sweep needs the whole process to itself (the counters are global); the other
/// tests share it.
static EXCLUSIVE: RwLock<()> = RwLock::new(());

// ---- the shimmed KMCL table -----------------------------------------------------------------

/// A copy of the simulator's table: its entry points are global functions, the same for every
/// instance, so one copy serves every shim.
struct Original(KMCL_SERVER_INTERFACE_V1);
// SAFETY: only the function pointers are read from the copy (never its `Context`), and KMCL
// entry points may be called from any thread.
unsafe impl Send for Original {}
// SAFETY: as above; the copy is never written after initialization.
unsafe impl Sync for Original {}

static ORIGINAL: OnceLock<Original> = OnceLock::new();

fn original() -> &'static KMCL_SERVER_INTERFACE_V1 {
    &ORIGINAL.get().expect("a table was queried").0
}

/// Generates, per slot, a wrapper that runs the real entry point in `Kmcl` mode, and
/// `shim_table`, which installs them.
macro_rules! kmcl_shims {
    ($($part:ident . $slot:ident ( $($arg:ident : $ty:ty),* ) $(-> $ret:ty)? ;)*) => {
        $(
            #[allow(non_snake_case)]
            unsafe extern "win64" fn $slot($($arg: $ty),*) $(-> $ret)? {
                let _mode = enter(KMCL);
                let real = original().$part.$slot.expect("present in the simulator's table");
                // SAFETY: the same entry point, called with the arguments the driver passed.
                unsafe { real($($arg),*) }
            }
        )*

        fn install_kmcl_shims(table: &mut KMCL_SERVER_INTERFACE_V1) {
            $(table.$part.$slot = Some($slot);)*
        }
    };
}

kmcl_shims! {
    Client.VmbChannelAllocate(parent: PDEVICE_OBJECT, is_server: u8, channel: *mut VMBCHANNEL) -> NtStatus;
    Client.VmbChannelCleanup(channel: VMBCHANNEL);
    Client.VmbChannelDisable(channel: VMBCHANNEL);
    Client.VmbChannelEnable(channel: VMBCHANNEL) -> NtStatus;
    Client.VmbChannelGetPointer(channel: VMBCHANNEL) -> PVOID;
    Client.VmbChannelInitSetFriendlyName(channel: VMBCHANNEL, name: *const UNICODE_STRING) -> NtStatus;
    Client.VmbChannelInitSetMaximumPacketSize(channel: VMBCHANNEL, size: u32) -> NtStatus;
    Client.VmbChannelPacketComplete(packet: VMBPACKETCOMPLETION, buffer: PVOID, size: u32);
    Client.VmbChannelPacketFail(packet: VMBPACKETCOMPLETION);
    Client.VmbChannelPause(channel: VMBCHANNEL);
    Client.VmbChannelSetPointer(channel: VMBCHANNEL, pointer: PVOID);
    Client.VmbChannelStart(channel: VMBCHANNEL);
    Client.VmbPacketAllocate(channel: VMBCHANNEL) -> VMBPACKET;
    Client.VmbPacketFree(packet: VMBPACKET);
    Client.VmbPacketGetChannel(packet: VMBPACKET) -> VMBCHANNEL;
    Client.VmbPacketGetPointer(packet: VMBPACKET) -> PVOID;
    Client.VmbPacketSend(packet: VMBPACKET, buffer: PVOID, length: u32, mdl: *mut vmbsrv::kmcl::raw::MDL, flags: u32) -> NtStatus;
    Client.VmbPacketSetPointer(packet: VMBPACKET, pointer: PVOID);
    Server.VmbChannelRestoreFromBuffer(channel: VMBCHANNEL, buffer: PVOID, size: u32) -> NtStatus;
    Server.VmbChannelSaveBegin(channel: VMBCHANNEL) -> NtStatus;
    Server.VmbChannelSaveContinue(channel: VMBCHANNEL, buffer: PVOID, size: u32, filled: *mut u32, required: *mut u32) -> NtStatus;
    Server.VmbChannelSaveEnd(channel: VMBCHANNEL);
    Server.VmbConvertVmbusHandleToKernelHandle(handle: HANDLE, kernel: *mut HANDLE) -> NtStatus;
    Server.VmbPacketRestore(packet: VMBPACKET, buffer: PVOID, size: u32) -> NtStatus;
    Server.VmbServerChannelInitSetFlags(channel: VMBCHANNEL, flags: u32) -> NtStatus;
    Server.VmbServerChannelInitSetTargetInterfaceId(channel: VMBCHANNEL, interface_type: GUID, instance: GUID) -> NtStatus;
    Server.VmbServerChannelInitSetVmbusHandle(channel: VMBCHANNEL, handle: HANDLE) -> NtStatus;
}

unsafe extern "win64" fn interface_dereference(context: PVOID) {
    let _mode = enter(KMCL);
    let real = original()
        .Client
        .Interface
        .InterfaceDereference
        .expect("present");
    // SAFETY: the simulator's own routine, with the context the driver got from the query.
    unsafe { real(context) }
}

/// The driver's callbacks, as it registered them (one handler type in this binary, so one each).
#[derive(Default)]
struct DriverCallbacks {
    process: Option<PFN_VMB_CHANNEL_PROCESS_PACKET>,
    processing_complete: Option<PFN_VMB_CHANNEL_PROCESSING_COMPLETE>,
    opened: Option<PFN_VMB_CHANNEL_OPENED>,
    closed: Option<PFN_VMB_CHANNEL_CLOSED>,
    suspend: Option<PFN_VMB_CHANNEL_SUSPEND>,
    started: Option<PFN_VMB_CHANNEL_STARTED>,
    post_started: Option<PFN_VMB_CHANNEL_POST_STARTED>,
    save: Option<PFN_VMB_CHANNEL_SAVE_PACKET>,
    restore: Option<PFN_VMB_CHANNEL_RESTORE_PACKET>,
    completion: Option<PFN_VMB_PACKET_COMPLETION_ROUTINE>,
}

static CALLBACKS: Mutex<DriverCallbacks> = Mutex::new(DriverCallbacks {
    process: None,
    processing_complete: None,
    opened: None,
    closed: None,
    suspend: None,
    started: None,
    post_started: None,
    save: None,
    restore: None,
    completion: None,
});

fn callbacks() -> std::sync::MutexGuard<'static, DriverCallbacks> {
    CALLBACKS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Reads one recorded driver callback (set before the simulator can call its wrapper).
macro_rules! driver_callback {
    ($field:ident) => {{
        let callback = callbacks().$field.flatten();
        callback.expect("the driver registered this callback first")
    }};
}

unsafe extern "win64" fn process_packet_wrapper(
    channel: VMBCHANNEL,
    packet: VMBPACKETCOMPLETION,
    buffer: PVOID,
    length: u32,
    flags: u32,
) {
    let callback = driver_callback!(process);
    let _mode = enter(DRIVER);
    // SAFETY: the driver's own callback, with the arguments KMCL passed to the wrapper.
    unsafe { callback(channel, packet, buffer, length, flags) }
}

unsafe extern "win64" fn processing_complete_wrapper(channel: VMBCHANNEL, processed: u32) {
    let callback = driver_callback!(processing_complete);
    let _mode = enter(DRIVER);
    // SAFETY: as above.
    unsafe { callback(channel, processed) }
}

unsafe extern "win64" fn opened_wrapper(channel: VMBCHANNEL) -> NtStatus {
    let callback = driver_callback!(opened);
    let _mode = enter(DRIVER);
    // SAFETY: as above.
    unsafe { callback(channel) }
}

/// Generates the wrappers of the `VOID (VMBCHANNEL)` state-change callbacks.
macro_rules! state_wrapper {
    ($name:ident, $field:ident) => {
        unsafe extern "win64" fn $name(channel: VMBCHANNEL) {
            let callback = driver_callback!($field);
            let _mode = enter(DRIVER);
            // SAFETY: as above.
            unsafe { callback(channel) }
        }
    };
}

state_wrapper!(closed_wrapper, closed);
state_wrapper!(suspend_wrapper, suspend);
state_wrapper!(started_wrapper, started);
state_wrapper!(post_started_wrapper, post_started);

unsafe extern "win64" fn save_wrapper(
    channel: VMBCHANNEL,
    packet: VMBPACKET,
    buffer: PVOID,
    size: u32,
    needed: *mut u32,
) -> NtStatus {
    let callback = driver_callback!(save);
    let _mode = enter(DRIVER);
    // SAFETY: as above.
    unsafe { callback(channel, packet, buffer, size, needed) }
}

unsafe extern "win64" fn restore_wrapper(
    channel: VMBCHANNEL,
    lib: PVOID,
    lib_size: u32,
    save: PVOID,
    save_size: u32,
) -> NtStatus {
    let callback = driver_callback!(restore);
    let _mode = enter(DRIVER);
    // SAFETY: as above.
    unsafe { callback(channel, lib, lib_size, save, save_size) }
}

unsafe extern "win64" fn completion_wrapper(
    packet: VMBPACKET,
    status: NtStatus,
    buffer: PVOID,
    length: u32,
) {
    let callback = driver_callback!(completion);
    let _mode = enter(DRIVER);
    // SAFETY: as above.
    unsafe { callback(packet, status, buffer, length) }
}

unsafe extern "win64" fn set_process_packet_callbacks(
    channel: VMBCHANNEL,
    process: PFN_VMB_CHANNEL_PROCESS_PACKET,
    complete: PFN_VMB_CHANNEL_PROCESSING_COMPLETE,
) -> NtStatus {
    let _mode = enter(KMCL);
    {
        let mut recorded = callbacks();
        recorded.process = Some(process);
        recorded.processing_complete = Some(complete);
    }
    let real = original()
        .Client
        .VmbChannelInitSetProcessPacketCallbacks
        .expect("present");
    let process = process.map(|_| process_packet_wrapper as _);
    let complete = complete.map(|_| processing_complete_wrapper as _);
    // SAFETY: the real entry point, with wrappers of exactly the driver's callback types.
    unsafe { real(channel, process, complete) }
}

unsafe extern "win64" fn set_state_change_callbacks(
    channel: VMBCHANNEL,
    callbacks_in: *mut VMB_CHANNEL_STATE_CHANGE_CALLBACKS,
) -> NtStatus {
    let _mode = enter(KMCL);
    let real = original()
        .Client
        .VmbChannelInitSetStateChangeCallbacks
        .expect("present");
    if callbacks_in.is_null() {
        // SAFETY: the real entry point, with the driver's (NULL) argument.
        return unsafe { real(channel, callbacks_in) };
    }
    // SAFETY: non-NULL, and the driver passes a valid structure for the duration of the call.
    let mut wrapped = unsafe { callbacks_in.read() };
    {
        let mut recorded = callbacks();
        recorded.opened = Some(wrapped.EvtChannelOpened);
        recorded.closed = Some(wrapped.EvtChannelClosed);
        recorded.suspend = Some(wrapped.EvtChannelSuspend);
        recorded.started = Some(wrapped.EvtChannelStarted);
        recorded.post_started = Some(wrapped.EvtChannelPostStarted);
    }
    wrapped.EvtChannelOpened = wrapped.EvtChannelOpened.map(|_| opened_wrapper as _);
    wrapped.EvtChannelClosed = wrapped.EvtChannelClosed.map(|_| closed_wrapper as _);
    wrapped.EvtChannelSuspend = wrapped.EvtChannelSuspend.map(|_| suspend_wrapper as _);
    wrapped.EvtChannelStarted = wrapped.EvtChannelStarted.map(|_| started_wrapper as _);
    wrapped.EvtChannelPostStarted = wrapped
        .EvtChannelPostStarted
        .map(|_| post_started_wrapper as _);
    // SAFETY: the real entry point, with a copy of the driver's structure (KMCL copies it).
    unsafe { real(channel, &raw mut wrapped) }
}

unsafe extern "win64" fn set_save_restore_callbacks(
    channel: VMBCHANNEL,
    save: PFN_VMB_CHANNEL_SAVE_PACKET,
    restore: PFN_VMB_CHANNEL_RESTORE_PACKET,
) -> NtStatus {
    let _mode = enter(KMCL);
    {
        let mut recorded = callbacks();
        recorded.save = Some(save);
        recorded.restore = Some(restore);
    }
    let real = original()
        .Server
        .VmbServerChannelInitSetSaveRestorePacketCallbacks
        .expect("present");
    let save = save.map(|_| save_wrapper as _);
    let restore = restore.map(|_| restore_wrapper as _);
    // SAFETY: the real entry point, with wrappers of exactly the driver's callback types.
    unsafe { real(channel, save, restore) }
}

unsafe extern "win64" fn set_completion_routine(
    packet: VMBPACKET,
    routine: PFN_VMB_PACKET_COMPLETION_ROUTINE,
) {
    let _mode = enter(KMCL);
    callbacks().completion = Some(routine);
    let real = original()
        .Client
        .VmbPacketSetCompletionRoutine
        .expect("present");
    let routine = routine.map(|_| completion_wrapper as _);
    // SAFETY: the real entry point, with a wrapper of exactly the driver's routine type.
    unsafe { real(packet, routine) }
}

/// Queries the simulator's table and hands the driver the shimmed copy (in driver mode).
fn query(kmcl: &Kmcl) -> ServerInterface {
    let mut table = kmcl
        .query_interface(
            &SIM_KMCL_SERVER_INTERFACE_TYPE,
            SERVER_INTERFACE_V1_SIZE,
            SIM_KMCL_SERVER_INTERFACE_VERSION,
        )
        .expect("query");
    ORIGINAL.get_or_init(|| Original(table));
    install_kmcl_shims(&mut table);
    table.Client.Interface.InterfaceDereference = Some(interface_dereference);
    table.Client.VmbChannelInitSetProcessPacketCallbacks = Some(set_process_packet_callbacks);
    table.Client.VmbChannelInitSetStateChangeCallbacks = Some(set_state_change_callbacks);
    table
        .Server
        .VmbServerChannelInitSetSaveRestorePacketCallbacks = Some(set_save_restore_callbacks);
    table.Client.VmbPacketSetCompletionRoutine = Some(set_completion_routine);
    drv(|| ServerInterface::from_queried(table, SIM_KMCL_SERVER_INTERFACE_VERSION))
        .expect("the shimmed table validates")
}

// ---- the scenario ---------------------------------------------------------------------------

/// Messages posted on the source.
const POSTS: u64 = 20;
/// Messages posted on the destination after the restore.
const POSTS_AFTER: u64 = 4;
const IN_FLIGHT: u32 = 32;
const MAX_MESSAGE: u32 = 64;
/// Bytes per `VmbChannelSaveContinue` buffer: several chunks for the scenario's save.
const CHUNK: usize = 160;
/// The status every injected KMCL failure returns (distinct, so its propagation is visible).
const INJECTED: NtStatus = NtStatus::UNSUCCESSFUL;
/// Attempts per step before a run is declared stuck.
const ATTEMPTS: usize = 4;

/// Every status a step may fail with under a single injected fault.
const EXPECTED: [NtStatus; 4] = [
    INJECTED,
    // An allocation failed: heap (driver) or packet pool (`VmbPacketAllocate` returned NULL).
    NtStatus::INSUFFICIENT_RESOURCES,
    // A save that KMCL ended without presenting every delivery (`save_end`).
    NtStatus::INVALID_DEVICE_STATE,
    // A restore that lost a delivery to a failed callback (`restore_chunk` verification).
    NtStatus::DATA_ERROR,
];

/// Which reading of KMCL's undocumented points (docs/kmcl-bindings.md, "Undocumented points") the simulator takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Readings {
    /// `SimConfig::default()`: the conservative reading of every point.
    Default,
    /// The other reading where it changes the driver's path: `VmbPacketRestore` resets the
    /// packet's routine and context (the driver re-installs them), the restore callback gets
    /// zero-padded save buffers, and a running channel may be saved.
    Alternate,
}

const READINGS: [Readings; 2] = [Readings::Default, Readings::Alternate];

fn sim(readings: Readings, faults: FaultPlan) -> SimConfig {
    let base = SimConfig {
        faults,
        ..MigrationConfig::sim_for(IN_FLIGHT)
    };
    match readings {
        Readings::Default => base,
        Readings::Alternate => SimConfig {
            restored_packet_context: RestoredPacketContext::ResetOnRestore,
            restore_save_buf_size: RestoreSaveBufSize::PaddedWithZeros,
            save_requires: SaveRequires::AnyState,
            ..base
        },
    }
}

/// The channel configuration: the scenario's limits, and a partition VMBus handle, so that
/// `VmbServerChannelInitSetVmbusHandle` is among the calls swept.
fn config(kmcl: &Kmcl) -> ChannelConfig {
    // SAFETY: the simulator stores the handle as an opaque value and never dereferences it.
    let handle = unsafe { VmbusHandle::new(std::ptr::without_provenance_mut(0x5EED)) };
    ChannelConfig {
        vmbus_handle: Some(handle),
        ..channel_config(kmcl, IN_FLIGHT, MAX_MESSAGE)
    }
}

/// One refused step of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Step {
    Create,
    Post,
    SaveBegin,
    SaveContinue,
    SaveEnd,
    CreateForRestore,
    RestoreRecord,
    RestoreChunk,
    FinishRestore,
}

impl Step {
    fn is_save(self) -> bool {
        matches!(self, Self::SaveBegin | Self::SaveContinue | Self::SaveEnd)
    }
}

/// What one run saw.
#[derive(Debug, Default)]
struct Run {
    refused: Vec<(Step, NtStatus)>,
    /// The step that still failed after [`ATTEMPTS`] (only under persistent faults).
    gave_up: Option<Step>,
    verdict: Verdict,
    delivered_expected: u64,
    violations: Vec<Violation>,
    calls_source: BTreeMap<KmclCall, u64>,
    calls_destination: BTreeMap<KmclCall, u64>,
}

impl Run {
    /// Panics unless the run ended as every run must (see the module documentation).
    fn check(&self, what: &str) {
        self.check_clean_end(what);
        assert_eq!(self.gave_up, None, "{what}: gave up: {:?}", self.refused);
        assert!(self.verdict.is_clean(), "{what}: {:?}", self.verdict);
        assert_eq!(
            self.verdict.delivered, self.delivered_expected,
            "{what}: {:?}",
            self.verdict
        );
    }

    /// Under a persistent fault the scenario cannot finish; it must still end cleanly: expected
    /// statuses only, no violation (nothing leaked), and nothing duplicated or corrupted.
    fn check_clean_end(&self, what: &str) {
        assert!(
            self.violations.is_empty(),
            "{what}: KMCL violations {:#?}",
            self.violations
        );
        for (step, status) in &self.refused {
            assert!(
                EXPECTED.contains(status),
                "{what}: {step:?} failed with unexpected {status:?}"
            );
        }
        assert_eq!(self.verdict.duplicated, 0, "{what}: {:?}", self.verdict);
        assert_eq!(self.verdict.corrupted, 0, "{what}: {:?}", self.verdict);
    }

    fn hit_save(&self) -> bool {
        self.refused.iter().any(|(step, _)| step.is_save())
    }
}

fn counts(kmcl: &Kmcl) -> BTreeMap<KmclCall, u64> {
    KmclCall::ALL
        .iter()
        .map(|call| (*call, kmcl.call_count(*call)))
        .filter(|(_, count)| *count > 0)
        .collect()
}

fn drain(channel: &VspChannel<'_, Lock>, into: &mut Vec<Outcome>) {
    let mut batch = [Outcome {
        sequence: 0,
        tag: 0,
        kind: OutcomeKind::Acked,
        attempts: 0,
    }; 16];
    loop {
        let count = drv(|| channel.drain_outcomes(&mut batch));
        into.extend_from_slice(&batch[..count]);
        if count < batch.len() {
            break;
        }
    }
}

fn drain_to_ledger(channel: &VspChannel<'_, Lock>, ledger: &mut Ledger) {
    let mut outcomes = Vec::new();
    drain(channel, &mut outcomes);
    for outcome in &outcomes {
        ledger.outcome(outcome);
    }
}

/// Runs `f` until it succeeds, recording each refusal; gives up (records the step, `None`) after
/// [`ATTEMPTS`].
fn retry<T>(run: &mut Run, step: Step, mut f: impl FnMut() -> Result<T, NtStatus>) -> Option<T> {
    for _ in 0..ATTEMPTS {
        match f() {
            Ok(value) => return Some(value),
            Err(status) => run.refused.push((step, status)),
        }
    }
    run.gave_up = Some(step);
    None
}

fn post(
    run: &mut Run,
    channel: &VspChannel<'_, Lock>,
    ledger: &mut Ledger,
    tag: u64,
) -> Option<()> {
    let payload: Vec<u8> = (0..1 + tag % 24).map(|i| (tag * 7 + i) as u8).collect();
    let request = PostRequest {
        tag,
        payload: &payload,
        posted_at: tag,
        trace_id: tag.is_multiple_of(3).then_some([tag as u8; 16]),
    };
    let sequence = retry(run, Step::Post, || drv(|| channel.post(&request)))?;
    ledger.posted(sequence, Posted::new(tag, &payload));
    Some(())
}

/// A save: the channel record and the KMCL chunks.
struct Saved {
    record: Vec<u8>,
    chunks: Vec<Vec<u8>>,
}

/// One whole save; on a refusal the step and status (the channel is left for the caller to
/// resume).
fn save_once(channel: &VspChannel<'_, Lock>) -> Result<Saved, (Step, NtStatus)> {
    let record = drv(|| channel.save_begin()).map_err(|s| (Step::SaveBegin, s))?;
    let mut record_bytes = vec![0u8; record.encoded_len()];
    record.encode(&mut record_bytes).expect("encode");
    let mut chunks = Vec::new();
    let mut buffer = vec![0u8; CHUNK];
    loop {
        let chunk =
            drv(|| channel.save_continue(&mut buffer)).map_err(|s| (Step::SaveContinue, s))?;
        match chunk.status {
            NtStatus::SUCCESS | NtStatus::BUFFER_OVERFLOW => {
                chunks.push(buffer[..chunk.filled as usize].to_vec());
                if chunk.status == NtStatus::SUCCESS {
                    break;
                }
            }
            NtStatus::BUFFER_TOO_SMALL if chunk.required as usize > buffer.len() => {
                buffer = vec![0u8; chunk.required as usize];
            }
            status => return Err((Step::SaveContinue, status)),
        }
    }
    drv(|| channel.save_end()).map_err(|s| (Step::SaveEnd, s))?;
    Ok(Saved {
        record: record_bytes,
        chunks,
    })
}

/// Feeds the record and every chunk.
fn restore_once(channel: &VspChannel<'_, Lock>, saved: &Saved) -> Result<(), (Step, NtStatus)> {
    drv(|| channel.restore_channel_record(&saved.record)).map_err(|s| (Step::RestoreRecord, s))?;
    let mut complete = false;
    for chunk in &saved.chunks {
        complete = drv(|| channel.restore_chunk(chunk)).map_err(|s| (Step::RestoreChunk, s))?
            == RestoreProgress::Complete;
    }
    assert!(complete, "an intact save restores completely");
    Ok(())
}

/// Acknowledges everything until nothing is in flight.
fn settle(
    kmcl: &Kmcl,
    guest: &mut GuestModel,
    channel: &VspChannel<'_, Lock>,
    ledger: &mut Ledger,
) {
    for _ in 0..1000 {
        kmcl.wait_idle();
        guest.pump(ledger);
        guest.acknowledge(usize::MAX, None);
        kmcl.wait_idle();
        drain_to_ledger(channel, ledger);
        if drv(|| channel.statistics()).in_flight == 0 && guest.held() == 0 {
            return;
        }
    }
    panic!("deliveries never settled");
}

/// The whole scenario with `source` / `destination` faults planned on the two instances.
fn run(readings: Readings, source: FaultPlan, destination: FaultPlan) -> Run {
    let mut run = Run {
        delivered_expected: POSTS + POSTS_AFTER,
        ..Run::default()
    };
    let mut ledger = Ledger::new();
    let mut guest = GuestModel::new(Guest::new(SCENARIO_INTERFACE_TYPE, SCENARIO_INSTANCE));
    let kmcl = Kmcl::new(sim(readings, source));
    let saved = source_side(&mut run, &kmcl, &mut guest, &mut ledger);
    run.calls_source = counts(&kmcl);
    run.violations.extend(kmcl.finish());
    if let Some(saved) = saved {
        let kmcl = Kmcl::new(sim(readings, destination));
        destination_side(&mut run, &kmcl, &mut guest, &mut ledger, &saved);
        run.calls_destination = counts(&kmcl);
        run.violations.extend(kmcl.finish());
    }
    run.verdict = ledger.verdict();
    run
}

/// Tears a channel down in driver mode, after draining its outcomes.
fn teardown(kmcl: &Kmcl, channel: VspChannel<'_, Lock>, ledger: &mut Ledger) {
    drv(|| channel.disable()).expect("disable");
    kmcl.wait_idle();
    drain_to_ledger(&channel, ledger);
    drv(|| drop(channel));
}

/// The source instance: create, post, the guest acknowledges half, save (retried), migrate.
/// `None` if a step kept failing (persistent faults); everything is torn down either way.
fn source_side(
    run: &mut Run,
    kmcl: &Kmcl,
    guest: &mut GuestModel,
    ledger: &mut Ledger,
) -> Option<Saved> {
    let interface = query(kmcl);
    let saved = source_channel(run, kmcl, &interface, guest, ledger);
    drv(|| drop(interface));
    saved
}

fn source_channel(
    run: &mut Run,
    kmcl: &Kmcl,
    interface: &ServerInterface,
    guest: &mut GuestModel,
    ledger: &mut Ledger,
) -> Option<Saved> {
    kmcl.attach_guest(&guest.endpoint).unwrap();
    let config = config(kmcl);
    let channel = retry(run, Step::Create, || {
        drv(|| VspChannel::<Lock>::create(interface, &config))
    })?;
    guest.open_and_negotiate(kmcl).expect("negotiate");
    for tag in 0..POSTS {
        if post(run, &channel, ledger, tag).is_none() {
            teardown(kmcl, channel, ledger);
            return None;
        }
    }
    // The guest reads what its ring holds (16 of 20) and acknowledges half of everything.
    kmcl.wait_idle();
    guest.pump(ledger);
    guest.acknowledge(POSTS as usize / 2, None);
    kmcl.wait_idle();
    drain_to_ledger(&channel, ledger);
    let mut saved = None;
    for _ in 0..ATTEMPTS {
        match save_once(&channel) {
            Ok(done) => {
                saved = Some(done);
                break;
            }
            Err(refusal) => {
                run.refused.push(refusal);
                // An aborted save: delivery continues here until the next attempt.
                assert!(matches!(
                    channel.phase(),
                    Phase::Running | Phase::Saving | Phase::SaveFailed
                ));
                if channel.phase() != Phase::Running {
                    drv(|| channel.resume()).expect("resume after a failed save");
                }
                kmcl.wait_idle();
                drain_to_ledger(&channel, ledger);
            }
        }
    }
    let Some(saved) = saved else {
        run.gave_up = Some(Step::SaveContinue);
        teardown(kmcl, channel, ledger);
        return None;
    };
    guest.endpoint.detach();
    drv(|| channel.complete_migration()).expect("complete_migration");
    kmcl.wait_idle();
    drain_to_ledger(&channel, ledger);
    drv(|| drop(channel));
    Some(saved)
}

/// The destination instance: restore (a failed attempt is torn down and retried on a new
/// channel), finish, post more, the guest acknowledges everything.
fn destination_side(
    run: &mut Run,
    kmcl: &Kmcl,
    guest: &mut GuestModel,
    ledger: &mut Ledger,
    saved: &Saved,
) {
    let interface = query(kmcl);
    destination_channel(run, kmcl, &interface, guest, ledger, saved);
    drv(|| drop(interface));
}

fn destination_channel(
    run: &mut Run,
    kmcl: &Kmcl,
    interface: &ServerInterface,
    guest: &mut GuestModel,
    ledger: &mut Ledger,
    saved: &Saved,
) {
    let config = config(kmcl);
    let mut restored = None;
    for _ in 0..ATTEMPTS {
        let Some(channel) = retry(run, Step::CreateForRestore, || {
            drv(|| VspChannel::<Lock>::create_for_restore(interface, &config))
        }) else {
            break;
        };
        match restore_once(&channel, saved) {
            Ok(()) => {
                restored = Some(channel);
                break;
            }
            Err(refusal) => {
                run.refused.push(refusal);
                // The failed attempt is torn down: what it rebuilt comes back handed over (the
                // blob still carries it), and is not an outcome of the migration.
                let rebuilt = drv(|| channel.statistics()).in_flight as usize;
                drv(|| channel.disable()).expect("disable");
                kmcl.wait_idle();
                let mut discarded = Vec::new();
                drain(&channel, &mut discarded);
                assert_eq!(discarded.len(), rebuilt);
                assert!(discarded.iter().all(|o| o.kind == OutcomeKind::Migrated));
                drv(|| drop(channel));
            }
        }
    }
    let Some(channel) = restored else {
        run.gave_up.get_or_insert(Step::RestoreChunk);
        return;
    };
    if retry(run, Step::FinishRestore, || {
        drv(|| channel.finish_restore())
    })
    .is_none()
    {
        teardown(kmcl, channel, ledger);
        return;
    }
    kmcl.attach_guest(&guest.endpoint).unwrap();
    kmcl.wait_idle();
    for tag in POSTS..POSTS + POSTS_AFTER {
        if post(run, &channel, ledger, tag).is_none() {
            break;
        }
    }
    settle(kmcl, guest, &channel, ledger);
    teardown(kmcl, channel, ledger);
}

fn shared() -> std::sync::RwLockReadGuard<'static, ()> {
    EXCLUSIVE.read().unwrap_or_else(PoisonError::into_inner)
}

/// Runs `jobs` on two threads (the CI machines have two cores); returns their results in order.
fn parallel<J: Sync, R: Send>(jobs: &[J], f: impl Fn(&J) -> R + Sync) -> Vec<R> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Mutex<Vec<Option<R>>> = Mutex::new((0..jobs.len()).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else { break };
                    let result = f(job);
                    results.lock().unwrap()[i] = Some(result);
                }
            });
        }
    });
    results
        .into_inner()
        .unwrap()
        .into_iter()
        .map(|r| r.expect("every job ran"))
        .collect()
}

/// A summary of a sweep: points covered, refusals seen by step and status.
fn summarize(name: &str, runs: &[(String, Run)]) {
    let mut by: BTreeMap<(Step, &str), usize> = BTreeMap::new();
    let mut save_hits = 0;
    for (_, run) in runs {
        for (step, status) in &run.refused {
            *by.entry((*step, status.name().unwrap_or("?"))).or_default() += 1;
        }
        save_hits += usize::from(run.hit_save());
    }
    println!(
        "{name}: {} injection points, 0 failures; {save_hits} hit the save; refusals by step/status: {by:?}",
        runs.len()
    );
}

#[test]
fn the_clean_run_delivers_exactly_once() {
    let _shared = shared();
    for readings in READINGS {
        let run = run(readings, FaultPlan::new(), FaultPlan::new());
        run.check(&format!("clean run, {readings:?} readings"));
        assert!(run.refused.is_empty(), "{:?}", run.refused);
        assert!(
            run.calls_source[&KmclCall::ChannelSaveContinue] > 2,
            "several chunks"
        );
        assert!(run.calls_destination[&KmclCall::PacketRestore] > 0);
    }
}

/// (ii): the k-th `VmbPacketAllocate`, every k, on either instance.
#[test]
fn every_packet_allocation_fails_once() {
    let _shared = shared();
    let mut jobs: Vec<(Readings, bool, u64)> = Vec::new();
    for readings in READINGS {
        let clean = run(readings, FaultPlan::new(), FaultPlan::new());
        let source = clean.calls_source[&KmclCall::PacketAllocate];
        let destination = clean.calls_destination[&KmclCall::PacketAllocate];
        jobs.extend((1..=source).map(|k| (readings, true, k)));
        jobs.extend((1..=destination).map(|k| (readings, false, k)));
    }
    let runs = parallel(&jobs, |&(readings, on_source, k)| {
        let plan = FaultPlan::new().fail_nth_packet_allocate(k);
        let run = if on_source {
            run(readings, plan, FaultPlan::new())
        } else {
            run(readings, FaultPlan::new(), plan)
        };
        let what = format!(
            "VmbPacketAllocate #{k} on the {}, {readings:?} readings",
            if on_source { "source" } else { "destination" }
        );
        run.check(&what);
        assert!(
            run.refused
                .iter()
                .any(|(_, s)| *s == NtStatus::INSUFFICIENT_RESOURCES),
            "{what}: the NULL packet was never reported: {:?}",
            run.refused
        );
        (what, run)
    });
    summarize("packet allocations (source + destination)", &runs);
}

/// (iii): the k-th call of every fallible KMCL entry point the scenario calls, every k, on
/// either instance (`VmbPacketAllocate` is (ii)).
#[test]
fn every_fallible_kmcl_call_fails_once() {
    let _shared = shared();
    let mut jobs: Vec<(Readings, bool, KmclCall, u64)> = Vec::new();
    for readings in READINGS {
        let clean = run(readings, FaultPlan::new(), FaultPlan::new());
        for (on_source, calls) in [
            (true, &clean.calls_source),
            (false, &clean.calls_destination),
        ] {
            for (call, count) in calls {
                if call.is_fallible() && *call != KmclCall::PacketAllocate {
                    jobs.extend((1..=*count).map(|k| (readings, on_source, *call, k)));
                }
            }
        }
    }
    let kinds: BTreeSet<KmclCall> = jobs.iter().map(|(_, _, call, _)| *call).collect();
    let runs = parallel(&jobs, |&(readings, on_source, call, k)| {
        let plan = FaultPlan::new().fail_nth(call, k, INJECTED);
        let run = if on_source {
            run(readings, plan, FaultPlan::new())
        } else {
            run(readings, FaultPlan::new(), plan)
        };
        let what = format!(
            "{call:?} #{k} on the {}, {readings:?} readings",
            if on_source { "source" } else { "destination" }
        );
        run.check(&what);
        (what, run)
    });
    // Every injected failure surfaced as a refused step: none was swallowed.
    for (what, run) in &runs {
        assert!(
            !run.refused.is_empty(),
            "{what}: the failure was never reported"
        );
    }
    println!("fallible KMCL kinds swept: {kinds:?}");
    summarize("KMCL call faults (source + destination)", &runs);
}

/// (i): the k-th heap allocation made by driver code, every k; then, for every k, every
/// allocation from the k-th on (persistent exhaustion: the scenario cannot finish, but must end
/// cleanly).
#[test]
fn every_driver_allocation_fails() {
    let _exclusive = EXCLUSIVE.write().unwrap_or_else(PoisonError::into_inner);
    SWEEP_THREAD.with(|t| t.set(true));
    let reset = |fail_at, sticky| {
        DRIVER_ALLOCATIONS.store(0, Ordering::Relaxed);
        OFF_THREAD_ALLOCATIONS.store(0, Ordering::Relaxed);
        FAILED.store(0, Ordering::Relaxed);
        FAIL_AT.store(fail_at, Ordering::Relaxed);
        FAIL_STICKY.store(sticky, Ordering::Relaxed);
    };
    let counted = |readings| {
        COUNTING.store(true, Ordering::Relaxed);
        let run = run(readings, FaultPlan::new(), FaultPlan::new());
        COUNTING.store(false, Ordering::Relaxed);
        run
    };
    let mut once = Vec::new();
    let mut persistent = Vec::new();
    let mut totals = Vec::new();
    for readings in READINGS {
        reset(0, false);
        let clean = counted(readings);
        let total = DRIVER_ALLOCATIONS.load(Ordering::Relaxed);
        let off_thread = OFF_THREAD_ALLOCATIONS.load(Ordering::Relaxed);
        clean.check("clean counted run");
        assert!(
            total >= 10,
            "the driver allocates per channel and per post: {total}"
        );
        totals.push((readings, total, off_thread));
        for k in 1..=total {
            reset(k, false);
            let run = counted(readings);
            let what = format!("driver allocation #{k} of {total}, {readings:?} readings");
            assert_eq!(FAILED.load(Ordering::Relaxed), 1, "{what} was never made");
            run.check(&what);
            assert!(
                run.refused
                    .iter()
                    .any(|(_, s)| *s == NtStatus::INSUFFICIENT_RESOURCES),
                "{what}: the failure was never reported: {:?}",
                run.refused
            );
            once.push((what, run));
            reset(k, true);
            let run = counted(readings);
            let what = format!("driver allocations #{k}.. of {total}, {readings:?} readings");
            assert!(
                FAILED.load(Ordering::Relaxed) >= 1,
                "{what} were never made"
            );
            run.check_clean_end(&what);
            persistent.push((what, run));
        }
    }
    reset(0, false);
    SWEEP_THREAD.with(|t| t.set(false));
    for (readings, total, off_thread) in totals {
        println!(
            "driver heap allocations per run ({readings:?} readings): {total}, {off_thread} of \
             them in callbacks on simulator threads"
        );
    }
    summarize("driver allocations, one failure", &once);
    summarize("driver allocations, every one from k on", &persistent);
}

/// (ii) and (iii) persistently: every call of a kind from the k-th on fails, for every kind and
/// k of the clean run, on either instance. The scenario cannot finish; every run must still end
/// with expected statuses, nothing leaked and nothing duplicated.
#[test]
fn every_fallible_kmcl_call_fails_from_k_on() {
    let _shared = shared();
    let mut jobs: Vec<(Readings, bool, KmclCall, u64)> = Vec::new();
    for readings in READINGS {
        let clean = run(readings, FaultPlan::new(), FaultPlan::new());
        for (on_source, calls) in [
            (true, &clean.calls_source),
            (false, &clean.calls_destination),
        ] {
            for (call, count) in calls {
                if call.is_fallible() {
                    jobs.extend((1..=*count).map(|k| (readings, on_source, *call, k)));
                }
            }
        }
    }
    let runs = parallel(&jobs, |&(readings, on_source, call, k)| {
        let plan = FaultPlan::new().fail_from(call, k, INJECTED);
        let run = if on_source {
            run(readings, plan, FaultPlan::new())
        } else {
            run(readings, FaultPlan::new(), plan)
        };
        let what = format!(
            "{call:?} #{k}.. on the {}, {readings:?} readings",
            if on_source { "source" } else { "destination" }
        );
        run.check_clean_end(&what);
        (what, run)
    });
    let gave_up = runs.iter().filter(|(_, run)| run.gave_up.is_some()).count();
    println!(
        "persistent KMCL faults: {gave_up} of {} runs could not finish",
        runs.len()
    );
    summarize("KMCL calls failing from k on (source + destination)", &runs);
}
