//! KMDF glue: `DriverEntry`, the root-enumerated device, the control queue, and the lazily
//! acquired KMCL server interface. Compiled only for Windows targets with the `driver` feature
//! (`src/lib.rs`), so **it is never compiled on the Linux development machines**: every WDF/DDI
//! name here was checked by hand against the windows-drivers-rs samples and the DDI reference
//! (see the comments at each use and `docs/windows.md`), and the code is kept thin. Everything
//! that decides something lives in `crate::vsp` and runs in the simulator tests.
//!
//! # Layout
//!
//! * [`context`] — `WDF_OBJECT_CONTEXT_TYPE_INFO` statics and typed context access (the pattern
//!   of Windows-rust-driver-samples `general/echo/kmdf/driver/DriverSync/src/wdf_object_context.rs`,
//!   written out without `paste`).
//! * [`lock`] — [`crate::vsp::DispatchLock`] over a `KSPIN_LOCK`.
//! * [`device`] — `EvtDriverDeviceAdd`, the device context ([`device::DeviceState`]), teardown.
//! * [`kmcl_target`] — `WdfIoTargetCreate`/`WdfIoTargetOpen`/`WdfIoTargetQueryForInterface` on
//!   `\Device\RootVMBus\kmcl_interface`.
//! * [`control`] — the IOCTL path: `EvtIoInCallerContext` (CreateChannel, in the caller's process),
//!   the parallel default queue (everything else), `EvtFileCleanup`, the `ControlEnvironment`.
//!
//! # Call sequence
//!
//! ```text
//! DriverEntry ─ WdfDriverCreate(EvtDriverDeviceAdd, EvtDriverUnload)
//! EvtDriverDeviceAdd (PASSIVE)
//!   ChannelRegistry::try_new(1024, close_vmbus_handle)
//!   WdfDeviceInitSetPnpPowerEventCallbacks(EvtDeviceSelfManagedIoCleanup)
//!   WdfDeviceInitSetFileObjectConfig(EvtFileCleanup, FileContext)
//!   WdfDeviceInitSetIoInCallerContextCallback
//!   WdfDeviceCreate(DeviceContext, EvtCleanupCallback) ─ WdfWaitLockCreate ─ ptr::write(context)
//!   ExInitializeRundownProtection ─ WdfDeviceCreateDeviceInterface(GUID_DEVINTERFACE_VMBSRV_CONTROL)
//!   WdfIoQueueCreate(default, parallel, PASSIVE, EvtIoDeviceControl)
//! EvtIoInCallerContext (caller's thread)
//!   not CreateChannel ─ WdfDeviceEnqueueRequest
//!   CreateChannel ─ PASSIVE? ─ file guard ─ rundown ─ parse::prepare
//!     ─ KMCL interface (first time: WdfIoTargetCreate, WdfIoTargetOpen(by name),
//!       WdfIoTargetQueryForInterface, ServerInterface::from_queried)
//!     ─ dispatch_buffered (the conversion VmbConvertVmbusHandleToKernelHandle runs here, in the
//!       caller's process) ─ WdfRequestCompleteWithInformation
//! EvtIoDeviceControl (queue, PASSIVE) ─ file guard ─ rundown ─ dispatch_buffered ─ complete
//! EvtFileCleanup ─ close the owner ─ ChannelRegistry::destroy_owned_by
//! EvtDeviceSelfManagedIoCleanup ─ wait for the rundown ─ destroy_all ─ drop ServerInterface
//!   (one InterfaceDereference) ─ WdfObjectDelete(io target)
//! EvtCleanupCallback(device) ─ same teardown if it has not run ─ drop the context
//! ```

mod caller;
mod context;
mod control;
mod device;
mod kmcl_target;
mod lock;

use wdk_sys::{
    NTSTATUS, PCUNICODE_STRING, PDRIVER_OBJECT, WDF_DRIVER_CONFIG, WDF_NO_HANDLE,
    WDF_NO_OBJECT_ATTRIBUTES, WDFDRIVER, call_unsafe_wdf_function_binding,
};

// The panic handler (wdk-panic 0.5: `int 3` in debug builds, then `KeBugCheckEx(0x52504E43)`;
// docs/windows-build.md §10.4) and the allocator (`ExAllocatePool2(POOL_FLAG_NON_PAGED, .., 'rust')`; docs/windows-build.md §10.3).
// Both only where `std` is not linked: `src/lib.rs` links `std` for `test`,
// and `std` brings its own panic handler and allocator.
//
// WdkAllocator ignores `Layout::align()`; ExAllocatePool2 returns 16-byte aligned blocks on 64-bit
// Windows. No type in this crate asks for more than 16 (no `#[repr(align)]` outside the
// simulator; the largest alignment in the driver's data is 8).
#[cfg(not(test))]
extern crate wdk_panic;

#[cfg(not(test))]
#[global_allocator]
static GLOBAL_ALLOCATOR: wdk_alloc::WdkAllocator = wdk_alloc::WdkAllocator;

/// `sizeof(T)` as the `ULONG` `Size` member of a WDF structure (the `WDF_*_INIT` helpers are C
/// inlines that wdk-sys does not generate; docs/windows-build.md §10.2).
pub(crate) const fn wdf_size<T>() -> wdk_sys::ULONG {
    let size = core::mem::size_of::<T>();
    assert!(size <= wdk_sys::ULONG::MAX as usize);
    size as wdk_sys::ULONG
}

/// The driver's entry point, called by KMDF's `FxDriverEntry` (wdk-build links with
/// `/ENTRY:FxDriverEntry`, docs/windows-build.md §10.1). Edition 2024 spelling of the export (docs/windows-build.md §10.1); with
/// wdk-sys's `test-stubs` the stub crate provides `DriverEntry`, hence the `not(test)` gate.
#[cfg_attr(not(test), unsafe(export_name = "DriverEntry"))]
#[cfg_attr(test, allow(dead_code))]
extern "system" fn driver_entry(
    driver: PDRIVER_OBJECT,
    registry_path: PCUNICODE_STRING,
) -> NTSTATUS {
    // WDF_DRIVER_CONFIG_INIT(&config, EvtDriverDeviceAdd) plus EvtDriverUnload. Teardown of
    // everything a device owns happens per device (device::evt_self_managed_io_cleanup and the
    // device context's EvtCleanupCallback), so unload has nothing left to free.
    let mut config = WDF_DRIVER_CONFIG {
        Size: wdf_size::<WDF_DRIVER_CONFIG>(),
        EvtDriverDeviceAdd: Some(device::evt_driver_device_add),
        EvtDriverUnload: Some(evt_driver_unload),
        ..WDF_DRIVER_CONFIG::default()
    };
    // SAFETY: `driver` and `registry_path` are the pointers the system passed to DriverEntry;
    // `config` lives across the call; no attributes and no output handle are allowed
    // (Windows-rust-driver-samples DriverSync/src/driver.rs makes the same call).
    let status = unsafe {
        call_unsafe_wdf_function_binding!(
            WdfDriverCreate,
            driver,
            registry_path,
            WDF_NO_OBJECT_ATTRIBUTES,
            &raw mut config,
            WDF_NO_HANDLE.cast::<WDFDRIVER>(),
        )
    };
    if !wdk::nt_success(status) {
        wdk::println!("vmbsrv: WdfDriverCreate failed {status:#010x}");
    }
    status
}

/// `EvtDriverUnload`: every device is gone by now, and with it every channel and the KMCL
/// interface reference.
extern "C" fn evt_driver_unload(_driver: WDFDRIVER) {
    wdk::println!("vmbsrv: driver unload");
}
