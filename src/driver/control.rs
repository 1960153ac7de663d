//! The control interface's I/O path (docs/control.md §9): IOCTLs in, `ChannelRegistry` calls,
//! completions out. No decision is made here beyond "which callback, which buffer, which owner".
//!
//! * **CreateChannel** is handled entirely in `EvtIoInCallerContext`, i.e. in the thread of the
//!   process that sent it, because `VmbConvertVmbusHandleToKernelHandle` must run in the context
//!   of the process that owns the user-mode VMBus handle (docs/kmcl-bindings.md §R6). The request
//!   is dispatched and completed there (EVT_WDF_IO_IN_CALLER_CONTEXT Remarks: the callback either
//!   enqueues the request or completes it). Doing the whole creation there, instead of converting
//!   the handle into a request context and enqueueing, means a converted kernel handle is never
//!   parked in a request that the framework might cancel and clean up at DISPATCH_LEVEL, where
//!   `ZwClose` cannot run: the handle goes straight from the conversion into the registry, which
//!   closes it on every failure path (`ChannelRegistry` docs).
//! * **Every other IOCTL** is enqueued to the default queue: parallel (the registry serializes per
//!   channel and answers `STATUS_DEVICE_BUSY` instead of blocking, docs/control.md §8), with
//!   `ExecutionLevel = WdfExecutionLevelPassive` (queues support it from KMDF 1.9,
//!   WDF_EXECUTION_LEVEL Remarks) because the registry runs at PASSIVE_LEVEL.
//! * **Access** (docs/control.md §10): `EvtDeviceFileCreate` classifies the opener once
//!   ([`super::caller::class_of_create`]) and refuses anyone outside the model with
//!   `STATUS_ACCESS_DENIED`; every request is then checked with
//!   [`authorize`](crate::vsp::control::authorize) against that class before it is dispatched.
//! * **Owners** are framework file objects: `OwnerId` is the `WDFFILEOBJECT` handle value.
//!   `EvtFileCleanup` (last handle closed, including process exit) destroys the owner's channels.
//!   A per-file guard ([`FileGuard`]) closes the race between that cleanup and a request of the
//!   same file object that reserves a channel slot only after the cleanup swept: the request that
//!   finishes last after the close sweeps again.
//! * METHOD_BUFFERED only: input and output share one system buffer of `max(in, out)` bytes
//!   (`dispatch_buffered`). Lengths come from the request parameters and are checked against what
//!   `WdfRequestRetrieveInputBuffer`/`OutputBuffer` return before a slice is formed; the part of the
//!   buffer beyond the input is zero-filled first (it is uninitialized pool otherwise).

use core::ffi::c_void;
use core::ptr;
use core::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use wdk_sys::ntddk::{KeGetCurrentIrql, KeQuerySystemTimePrecise};
use wdk_sys::{
    _WDF_EXECUTION_LEVEL, _WDF_FILEOBJECT_CLASS, _WDF_IO_QUEUE_DISPATCH_TYPE, _WDF_REQUEST_TYPE,
    _WDF_SYNCHRONIZATION_SCOPE, _WDF_TRI_STATE, KPROCESSOR_MODE, LARGE_INTEGER, NTSTATUS,
    PASSIVE_LEVEL, PWDFDEVICE_INIT, ULONG, USHORT, WDF_FILEOBJECT_CONFIG, WDF_IO_QUEUE_CONFIG,
    WDF_NO_HANDLE, WDF_OBJECT_ATTRIBUTES, WDF_REQUEST_PARAMETERS, WDFDEVICE, WDFFILEOBJECT,
    WDFOBJECT, WDFQUEUE, WDFREQUEST, call_unsafe_wdf_function_binding,
};

use super::caller::class_of_create;

use super::context::context_type;
use super::device::{DeviceState, RundownGuard, device_state};
use super::wdf_size;
use crate::kmcl::raw::{HANDLE, PFN_VMB_CONVERT_VMBUS_HANDLE_TO_KERNEL_HANDLE};
use crate::kmcl::{NtStatus, ParentDevice, ServerInterface, VmbusHandle};
use crate::vsp::control::parse;
use crate::vsp::control::{
    CallerClass, ControlEnvironment, DispatchResult, IOCTL_VMBSRV_CREATE_CHANNEL, METHOD_BUFFERED,
    OwnerId, authorize, caller_context_vmbus_handle,
};

/// `UserMode` of `KPROCESSOR_MODE` (wdm.h `MODE`: KernelMode = 0, UserMode = 1).
const USER_MODE: KPROCESSOR_MODE = 1;

/// The context of every framework file object (one per open handle): the owner's [`FileGuard`]
/// and its caller class. All-zero (as WDF allocates it) is "open, no request in progress, no
/// class": a handle whose class was never set can do nothing. Nothing to drop.
pub(super) struct FileContext {
    guard: FileGuard,
    /// [`class_code`] of the opener's [`CallerClass`]; 0 = none (every request refused).
    class: AtomicU8,
}

/// The stored form of a caller class (0 is reserved for "none").
const fn class_code(class: CallerClass) -> u8 {
    match class {
        CallerClass::System => 1,
        CallerClass::VmWorker => 2,
        CallerClass::Administrator => 3,
    }
}

/// The caller class stored by [`class_code`]; `None` for 0 or an unknown value.
const fn class_from_code(code: u8) -> Option<CallerClass> {
    match code {
        1 => Some(CallerClass::System),
        2 => Some(CallerClass::VmWorker),
        3 => Some(CallerClass::Administrator),
        _ => None,
    }
}

context_type! {
    /// `WDF_DECLARE_CONTEXT_TYPE(FileContext)`.
    static FILE_CONTEXT: FileContext;
}

/// Requests in progress for one owner, and whether the owner has been cleaned up.
///
/// Bit 0: closed (EvtFileCleanup ran). Bits 1..: requests in progress, in units of 2.
struct FileGuard(AtomicUsize);

const GUARD_CLOSED: usize = 1;
const GUARD_ONE: usize = 2;

impl FileGuard {
    /// Starts a request; `false` once the owner is closed.
    fn enter(&self) -> bool {
        let mut current = self.0.load(Ordering::Acquire);
        loop {
            if current & GUARD_CLOSED != 0 {
                return false;
            }
            let Some(next) = current.checked_add(GUARD_ONE) else {
                return false;
            };
            match self
                .0
                .compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return true,
                Err(seen) => current = seen,
            }
        }
    }

    /// Ends a request; `true` if the owner was closed meanwhile and this was its last request,
    /// which must then sweep the owner's channels once more.
    fn leave(&self) -> bool {
        self.0.fetch_sub(GUARD_ONE, Ordering::AcqRel) == GUARD_CLOSED | GUARD_ONE
    }

    /// Marks the owner closed: no request of it starts any more.
    fn close(&self) {
        self.0.fetch_or(GUARD_CLOSED, Ordering::AcqRel);
    }
}

/// What only the platform knows, per request (`ControlEnvironment`).
struct Environment {
    /// The KMCL server interface; `Some` for CreateChannel (always), and for other requests once
    /// it has been acquired. Only CreateChannel consults it (`ChannelRegistry::create`).
    interface: Option<&'static ServerInterface>,
    /// `VmbConvertVmbusHandleToKernelHandle`; `Some` only in the caller's context.
    convert: PFN_VMB_CONVERT_VMBUS_HANDLE_TO_KERNEL_HANDLE,
    parent: ParentDevice,
}

impl ControlEnvironment<'static> for Environment {
    fn server_interface(&self) -> &'static ServerInterface {
        match self.interface {
            Some(interface) => interface,
            // Unreachable: only CreateChannel asks, and CreateChannel is dispatched only with the
            // interface present (evt_io_in_caller_context); the queue refuses it
            // (evt_io_device_control). A panic here bugchecks (docs/windows-build.md §10.4).
            None => panic!("vmbsrv: control environment without a KMCL interface"),
        }
    }

    fn parent_device(&self) -> ParentDevice {
        self.parent
    }

    fn current_time(&self) -> u64 {
        let mut now: i64 = 0;
        // SAFETY: KeQuerySystemTimePrecise writes one LARGE_INTEGER (8 bytes, 8-aligned, the
        // QuadPart of a signed 64-bit count of 100 ns since 1601) to a valid local i64; any IRQL
        // (DDI page nf-wdm-kequerysystemtimeprecise, Windows 8 and later).
        unsafe { KeQuerySystemTimePrecise((&raw mut now).cast::<LARGE_INTEGER>()) };
        u64::try_from(now).unwrap_or(0)
    }

    fn convert_vmbus_handle(&self, user_handle: u64) -> crate::kmcl::Result<VmbusHandle> {
        // Outside the caller's context there is nothing to convert with.
        let Some(convert) = self.convert else {
            return Err(NtStatus::INVALID_DEVICE_STATE);
        };
        let value = usize::try_from(user_handle).map_err(|_| NtStatus::INVALID_PARAMETER)?;
        let mut kernel: HANDLE = ptr::null_mut();
        // We run in the requesting process's thread (EvtIoInCallerContext, PASSIVE_LEVEL, UserMode
        // requestor), as the call requires (docs/kmcl-bindings.md §R6); a handle value has no provenance.
        // SAFETY: `convert` is from the validated KMCL table held for the device's life, and
        // `kernel` is a valid out-parameter.
        let status = unsafe {
            convert(
                ptr::without_provenance_mut::<c_void>(value),
                &raw mut kernel,
            )
        };
        if !status.is_success() {
            wdk::println!(
                "vmbsrv: VmbConvertVmbusHandleToKernelHandle({user_handle:#x}) failed {status}"
            );
            return Err(status);
        }
        if kernel.is_null() {
            return Err(NtStatus::UNSUCCESSFUL);
        }
        // SAFETY: a kernel handle just returned by VmbConvertVmbusHandleToKernelHandle; from here
        // the registry owns it and closes it with `close_vmbus_handle` (ZwClose).
        Ok(unsafe { VmbusHandle::new(kernel) })
    }
}

/// The `WDFDEVICE_INIT` settings of the control path: file objects with [`FileContext`] and
/// `EvtFileCleanup`, and `EvtIoInCallerContext`.
///
/// # Safety
/// `device_init` must be the framework's `WDFDEVICE_INIT` of the running `EvtDriverDeviceAdd`,
/// before `WdfDeviceCreate`.
pub(super) unsafe fn configure_device_init(device_init: PWDFDEVICE_INIT) {
    // WDF_FILEOBJECT_CONFIG_INIT(&config, EvtDeviceFileCreate, NULL, EvtFileCleanup):
    // AutoForwardCleanupClose = WdfUseDefault, FileObjectClass =
    // WdfFileObjectWdfCannotUseFsContexts. EvtDeviceFileCreate classifies the opener and
    // completes every create itself.
    let mut file_config = WDF_FILEOBJECT_CONFIG {
        Size: wdf_size::<WDF_FILEOBJECT_CONFIG>(),
        EvtDeviceFileCreate: Some(evt_device_file_create),
        EvtFileClose: None,
        EvtFileCleanup: Some(evt_file_cleanup),
        AutoForwardCleanupClose: _WDF_TRI_STATE::WdfUseDefault,
        FileObjectClass: _WDF_FILEOBJECT_CLASS::WdfFileObjectWdfCannotUseFsContexts,
    };
    let mut file_attributes = WDF_OBJECT_ATTRIBUTES {
        Size: wdf_size::<WDF_OBJECT_ATTRIBUTES>(),
        ExecutionLevel: _WDF_EXECUTION_LEVEL::WdfExecutionLevelInheritFromParent,
        SynchronizationScope: _WDF_SYNCHRONIZATION_SCOPE::WdfSynchronizationScopeInheritFromParent,
        ContextTypeInfo: FILE_CONTEXT.info(),
        ..WDF_OBJECT_ATTRIBUTES::default()
    };
    // SAFETY: `device_init` per the contract; both structures are copied during the call.
    unsafe {
        call_unsafe_wdf_function_binding!(
            WdfDeviceInitSetFileObjectConfig,
            device_init,
            &raw mut file_config,
            &raw mut file_attributes
        )
    };
    // SAFETY: `device_init` per the contract.
    unsafe {
        call_unsafe_wdf_function_binding!(
            WdfDeviceInitSetIoInCallerContextCallback,
            device_init,
            Some(evt_io_in_caller_context)
        )
    };
}

/// The default queue: parallel, PASSIVE_LEVEL callbacks, `EvtIoDeviceControl` only (other request
/// types are failed by the framework with STATUS_INVALID_DEVICE_REQUEST).
pub(super) fn create_queue(device: WDFDEVICE) -> NTSTATUS {
    // WDF_IO_QUEUE_CONFIG_INIT_DEFAULT_QUEUE(&config, WdfIoQueueDispatchParallel), which also sets
    // Settings.Parallel.NumberOfPresentedRequests = (ULONG)-1 (left zero, a parallel queue
    // presents nothing).
    let mut config = WDF_IO_QUEUE_CONFIG {
        Size: wdf_size::<WDF_IO_QUEUE_CONFIG>(),
        PowerManaged: _WDF_TRI_STATE::WdfUseDefault,
        DefaultQueue: u8::from(true),
        DispatchType: _WDF_IO_QUEUE_DISPATCH_TYPE::WdfIoQueueDispatchParallel,
        EvtIoDeviceControl: Some(evt_io_device_control),
        ..WDF_IO_QUEUE_CONFIG::default()
    };
    config.Settings.Parallel.NumberOfPresentedRequests = ULONG::MAX;
    let mut attributes = WDF_OBJECT_ATTRIBUTES {
        Size: wdf_size::<WDF_OBJECT_ATTRIBUTES>(),
        ExecutionLevel: _WDF_EXECUTION_LEVEL::WdfExecutionLevelPassive,
        SynchronizationScope: _WDF_SYNCHRONIZATION_SCOPE::WdfSynchronizationScopeInheritFromParent,
        ..WDF_OBJECT_ATTRIBUTES::default()
    };
    // SAFETY: live device (inside its EvtDriverDeviceAdd); locals outlive the call; the queue
    // handle is not needed (WDF_NO_HANDLE), the queue is a child of the device.
    let status = unsafe {
        call_unsafe_wdf_function_binding!(
            WdfIoQueueCreate,
            device,
            &raw mut config,
            &raw mut attributes,
            WDF_NO_HANDLE.cast::<WDFQUEUE>()
        )
    };
    if !wdk::nt_success(status) {
        wdk::println!("vmbsrv: WdfIoQueueCreate failed {status:#010x}");
    }
    status
}

/// `EvtIoInCallerContext`: CreateChannel runs here (module docs); everything else is enqueued.
extern "C" fn evt_io_in_caller_context(device: WDFDEVICE, request: WDFREQUEST) {
    // WDF_REQUEST_PARAMETERS_INIT: zero + Size (a USHORT).
    let mut params = WDF_REQUEST_PARAMETERS {
        Size: wdf_size::<WDF_REQUEST_PARAMETERS>() as USHORT,
        ..WDF_REQUEST_PARAMETERS::default()
    };
    // SAFETY: `request` is the request this callback was given; `params` is a valid local.
    unsafe { call_unsafe_wdf_function_binding!(WdfRequestGetParameters, request, &raw mut params) };
    let io_control = if params.Type == _WDF_REQUEST_TYPE::WdfRequestTypeDeviceControl {
        // SAFETY: `Type` says `DeviceIoControl` is the union member the framework filled in.
        Some(unsafe { params.Parameters.DeviceIoControl })
    } else {
        None
    };
    match io_control {
        Some(io) if io.IoControlCode == IOCTL_VMBSRV_CREATE_CHANNEL => {
            let result = create_channel_in_caller_context(
                device,
                request,
                io.IoControlCode,
                io.InputBufferLength,
                io.OutputBufferLength,
            );
            complete(request, result);
        }
        _ => {
            // SAFETY: `device` and `request` are this callback's; WdfDeviceEnqueueRequest may only
            // be called from EvtIoInCallerContext, which this is.
            let status = unsafe {
                call_unsafe_wdf_function_binding!(WdfDeviceEnqueueRequest, device, request)
            };
            if !wdk::nt_success(status) {
                // The request is still ours (WdfDeviceEnqueueRequest Remarks): complete it.
                complete(request, refused(NtStatus(status)));
            }
        }
    }
}

/// CreateChannel, in the sender's thread.
fn create_channel_in_caller_context(
    device: WDFDEVICE,
    request: WDFREQUEST,
    code: u32,
    input_len: usize,
    output_len: usize,
) -> DispatchResult {
    // A kernel-mode sender may call at up to DISPATCH_LEVEL (EVT_WDF_IO_IN_CALLER_CONTEXT
    // Remarks); channel creation, the wait lock and the I/O target need PASSIVE_LEVEL.
    // SAFETY: reads the current processor's IRQL.
    if unsafe { KeGetCurrentIrql() } != PASSIVE_LEVEL as u8 {
        return refused(NtStatus::INVALID_DEVICE_REQUEST);
    }
    let Some(state) = device_state(device) else {
        return refused(NtStatus::INVALID_DEVICE_STATE);
    };
    with_owner(state, request, |owner, class, rundown| {
        with_system_buffer(request, code, input_len, output_len, |buffer| {
            let input = buffer.get(..input_len).unwrap_or(&[]);
            // Malformed requests are refused exactly as dispatch would refuse them, before any
            // driver state (the KMCL interface) is involved.
            if let Err(status) = parse::prepare(code, input, output_len) {
                return refused(status);
            }
            // The access model, before the handle is looked at or converted.
            if let Err(status) = authorize(class, code, input) {
                return refused(status);
            }
            match caller_context_vmbus_handle(code, input) {
                Err(status) => return refused(status),
                Ok(Some(_)) => {
                    // The value is a handle in the *sender's* user-mode handle table.
                    // SAFETY: this callback's request.
                    let mode = unsafe {
                        call_unsafe_wdf_function_binding!(WdfRequestGetRequestorMode, request)
                    };
                    if mode != USER_MODE {
                        return refused(NtStatus::INVALID_PARAMETER);
                    }
                }
                Ok(None) => {}
            }
            // Driver-state failure at the IOCTL level (docs/windows.md): without the KMCL server
            // interface no channel can exist, and the environment cannot be built.
            let binding = match state.kmcl(device, rundown) {
                Ok(binding) => binding,
                Err(status) => return refused(status),
            };
            let environment = Environment {
                interface: Some(&binding.interface),
                convert: binding.convert,
                parent: state.parent,
            };
            state.registry.dispatch_buffered(
                owner,
                code,
                buffer,
                input_len,
                output_len,
                &environment,
            )
        })
    })
}

/// `EvtIoDeviceControl` of the default queue (PASSIVE_LEVEL: queue ExecutionLevel).
extern "C" fn evt_io_device_control(
    queue: WDFQUEUE,
    request: WDFREQUEST,
    output_len: usize,
    input_len: usize,
    code: ULONG,
) {
    // SAFETY: `queue` is the queue this callback belongs to.
    let device = unsafe { call_unsafe_wdf_function_binding!(WdfIoQueueGetDevice, queue) };
    let result = if code == IOCTL_VMBSRV_CREATE_CHANNEL {
        // Only reachable if EvtIoInCallerContext was bypassed; the handle could not be converted
        // here (wrong process), so refuse rather than create a channel without it.
        refused(NtStatus::INVALID_DEVICE_STATE)
    } else {
        match device_state(device) {
            None => refused(NtStatus::INVALID_DEVICE_STATE),
            Some(state) => with_owner(state, request, |owner, class, rundown| {
                with_system_buffer(request, code, input_len, output_len, |buffer| {
                    let input = buffer.get(..input_len).unwrap_or(&[]);
                    if let Err(status) = authorize(class, code, input) {
                        return refused(status);
                    }
                    let environment = Environment {
                        interface: state.kmcl_bound(rundown).map(|binding| &binding.interface),
                        convert: None,
                        parent: state.parent,
                    };
                    state.registry.dispatch_buffered(
                        owner,
                        code,
                        buffer,
                        input_len,
                        output_len,
                        &environment,
                    )
                })
            }),
        }
    };
    complete(request, result);
}

/// `EvtDeviceFileCreate`: classifies the opener (docs/control.md §10) and stores the class in the
/// file object's context; an opener outside the access model is refused with
/// `STATUS_ACCESS_DENIED`. The INF's security descriptor already keeps everyone else out; this is
/// the second, per-operation layer.
extern "C" fn evt_device_file_create(
    _device: WDFDEVICE,
    request: WDFREQUEST,
    file_object: WDFFILEOBJECT,
) {
    let status = match (class_of_create(request), file_context(file_object)) {
        (Some(class), Some(context)) => {
            context.class.store(class_code(class), Ordering::Release);
            NtStatus::SUCCESS
        }
        (None, _) => NtStatus::ACCESS_DENIED,
        (Some(_), None) => NtStatus::INVALID_DEVICE_STATE,
    };
    // SAFETY: the create request this callback was given, completed exactly once, here
    // (EVT_WDF_DEVICE_FILE_CREATE: the driver must complete it).
    unsafe { call_unsafe_wdf_function_binding!(WdfRequestComplete, request, status.0) };
}

/// `EvtFileCleanup`: the last handle of a file object was closed (also on process exit).
extern "C" fn evt_file_cleanup(file_object: WDFFILEOBJECT) {
    let Some(guard) = file_guard(file_object) else {
        return;
    };
    guard.close();
    // SAFETY: `file_object` is the file object this callback was given.
    let device = unsafe { call_unsafe_wdf_function_binding!(WdfFileObjectGetDevice, file_object) };
    let Some(state) = device_state(device) else {
        return;
    };
    // After the device teardown began, destroy_all has taken (or will take) every channel.
    let Some(_rundown) = state.enter() else {
        return;
    };
    let destroyed = state.registry.destroy_owned_by(owner_of(file_object));
    if destroyed != 0 {
        wdk::println!("vmbsrv: file cleanup destroyed {destroyed} channel(s)");
    }
}

/// Runs `f` for the request's owner with the device's rundown and the owner's guard held; sweeps
/// the owner's channels if it was closed meanwhile and this was its last request.
fn with_owner(
    state: &DeviceState,
    request: WDFREQUEST,
    f: impl FnOnce(OwnerId, CallerClass, &RundownGuard<'_>) -> DispatchResult,
) -> DispatchResult {
    // SAFETY: this callback's request.
    let file_object =
        unsafe { call_unsafe_wdf_function_binding!(WdfRequestGetFileObject, request) };
    if file_object.is_null() {
        // A request without a file object has no owner to tie channels to.
        return refused(NtStatus::INVALID_DEVICE_REQUEST);
    }
    let Some(context) = file_context(file_object) else {
        return refused(NtStatus::INVALID_DEVICE_STATE);
    };
    // A handle that was never classified (EvtDeviceFileCreate refused or did not run) gets
    // nothing.
    let Some(class) = class_from_code(context.class.load(Ordering::Acquire)) else {
        return refused(NtStatus::ACCESS_DENIED);
    };
    let guard = &context.guard;
    let Some(rundown) = state.enter() else {
        return refused(NtStatus::DEVICE_REMOVED);
    };
    if !guard.enter() {
        return refused(NtStatus(wdk_sys::STATUS_FILE_CLOSED));
    }
    let owner = owner_of(file_object);
    let result = f(owner, class, &rundown);
    if guard.leave() {
        state.registry.destroy_owned_by(owner);
    }
    drop(rundown);
    result
}

/// The owner id of a file object: its handle value, unique while the file object exists (and no
/// channel of it outlives it: EvtFileCleanup and [`FileGuard`]).
fn owner_of(file_object: WDFFILEOBJECT) -> OwnerId {
    OwnerId(file_object as usize as u64)
}

/// The [`FileGuard`] in a file object's context.
fn file_guard<'f>(file_object: WDFFILEOBJECT) -> Option<&'f FileGuard> {
    file_context(file_object).map(|context| &context.guard)
}

/// A file object's [`FileContext`].
fn file_context<'f>(file_object: WDFFILEOBJECT) -> Option<&'f FileContext> {
    // SAFETY: `file_object` is a live file object handle (from a callback or a live request).
    let context =
        unsafe { FILE_CONTEXT.raw_context(file_object as WDFOBJECT) }.cast::<FileContext>();
    if context.is_null() {
        return None;
    }
    // SAFETY: the file object's FileContext, WDF memory zero-filled at creation (a valid
    // FileContext: zero atomics) that lives as long as the file object; only accessed through
    // atomics.
    Some(unsafe { &*context })
}

/// Runs `f` on the request's METHOD_BUFFERED system buffer, `max(input_len, output_len)` bytes.
fn with_system_buffer(
    request: WDFREQUEST,
    code: u32,
    input_len: usize,
    output_len: usize,
    f: impl FnOnce(&mut [u8]) -> DispatchResult,
) -> DispatchResult {
    // The transfer type is the code's low two bits (CTL_CODE). Every vmbsrv code is
    // METHOD_BUFFERED; anything else is refused before a buffer is touched.
    if code & 3 != METHOD_BUFFERED {
        return refused(NtStatus::INVALID_DEVICE_REQUEST);
    }
    let len = input_len.max(output_len);
    if len == 0 {
        return f(&mut []);
    }
    let mut input: *mut c_void = ptr::null_mut();
    if input_len != 0 {
        let mut got: usize = 0;
        // SAFETY: this callback's request; out-parameters are valid locals. For METHOD_BUFFERED
        // this returns the system buffer and the input length.
        let status = unsafe {
            call_unsafe_wdf_function_binding!(
                WdfRequestRetrieveInputBuffer,
                request,
                input_len,
                &raw mut input,
                &raw mut got
            )
        };
        if !wdk::nt_success(status) || input.is_null() || got < input_len {
            return refused(NtStatus::INVALID_BUFFER_SIZE);
        }
    }
    let mut output: *mut c_void = ptr::null_mut();
    if output_len != 0 {
        let mut got: usize = 0;
        // SAFETY: as above; for METHOD_BUFFERED this is the same system buffer.
        let status = unsafe {
            call_unsafe_wdf_function_binding!(
                WdfRequestRetrieveOutputBuffer,
                request,
                output_len,
                &raw mut output,
                &raw mut got
            )
        };
        if !wdk::nt_success(status) || output.is_null() || got < output_len {
            return refused(NtStatus::BUFFER_TOO_SMALL);
        }
    }
    let buffer = match (input.is_null(), output.is_null()) {
        (false, false) if input != output => return refused(NtStatus::INVALID_DEVICE_REQUEST),
        (false, _) => input,
        (true, _) => output,
    }
    .cast::<u8>();
    if output_len > input_len {
        // SAFETY: the I/O manager allocated the system buffer with max(input, output) bytes for
        // METHOD_BUFFERED; [input_len, output_len) lies inside it and holds no input.
        unsafe { ptr::write_bytes(buffer.wrapping_add(input_len), 0, output_len - input_len) };
    }
    // SAFETY: `len` bytes of non-paged system buffer owned by this request until it is completed,
    // which happens only after `f` returns; every byte is initialized (input copied in by the I/O
    // manager, the rest zeroed above); no other reference to it exists.
    let slice = unsafe { core::slice::from_raw_parts_mut(buffer, len) };
    f(slice)
}

/// A refused request: the IOCTL fails with `status` and writes nothing.
fn refused(status: NtStatus) -> DispatchResult {
    DispatchResult {
        status,
        information: 0,
    }
}

/// `WdfRequestCompleteWithInformation(request, status, information)`.
fn complete(request: WDFREQUEST, result: DispatchResult) {
    let information = if result.status.is_success() {
        result.information as u64
    } else {
        0
    };
    // SAFETY: the request is owned by this driver (caller-context callback or presented by the
    // queue) and completed exactly once, here; no buffer borrowed from it is alive any more.
    unsafe {
        call_unsafe_wdf_function_binding!(
            WdfRequestCompleteWithInformation,
            request,
            result.status.0,
            information
        )
    };
}
