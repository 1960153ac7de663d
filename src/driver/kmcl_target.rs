//! Obtaining the KMCL **server** interface (`KMCL_SERVER_INTERFACE_V1`) from a host-side device.
//!
//! vmbsrv is a root-enumerated device, not a VMBus child, so it cannot use
//! `WdfFdoQueryForInterface` on its own stack. It opens the VMBus KMCL device as a remote I/O
//! target and sends `IRP_MN_QUERY_INTERFACE` there with `WdfIoTargetQueryForInterface`, which the
//! KMCL documentation names as the alternative (docs/kmcl-bindings.md §R1).
//!
//! The interface type is the header's public `KMCL_SERVER_INTERFACE_TYPE` with
//! `KMCL_SERVER_INTERFACE_VERSION_V1` ([`raw::KMCL_SERVER_INTERFACE_TYPE`], docs/kmcl-bindings.md
//! "Public identifiers"). **Unverified (docs/windows.md, experiment 1):** that
//! `\Device\RootVMBus\kmcl_interface`, the device dxgkrnl's *host* path opens (observed in public
//! decompilations of dxgkrnl.sys), answers that GUID. A failure is reported with a status and a
//! DbgPrint line naming the device, the GUID, size and version.
//!
//! All of this runs at PASSIVE_LEVEL (`WdfIoTargetOpen` and `WdfIoTargetQueryForInterface` are
//! PASSIVE-only), once per device, on the first CreateChannel request (see `device.rs`).

use core::fmt;
use core::mem::{align_of, size_of};
use core::ptr;

use wdk_sys::{
    _WDF_EXECUTION_LEVEL, _WDF_IO_TARGET_OPEN_TYPE, _WDF_SYNCHRONIZATION_SCOPE, INTERFACE,
    UNICODE_STRING, WDF_IO_TARGET_OPEN_PARAMS, WDF_OBJECT_ATTRIBUTES, WDFDEVICE, WDFIOTARGET,
    WDFOBJECT, call_unsafe_wdf_function_binding,
};

use crate::driver::wdf_size;
use crate::kmcl::raw::{
    self, KMCL_SERVER_INTERFACE_TYPE, KMCL_SERVER_INTERFACE_V1, KMCL_SERVER_INTERFACE_VERSION_V1,
    PFN_VMB_CONVERT_VMBUS_HANDLE_TO_KERNEL_HANDLE,
};
use crate::kmcl::{NtStatus, SERVER_INTERFACE_V1_SIZE, ServerInterface};

/// The host-side KMCL device. Provenance: docs/kmcl-bindings.md §R1 — the name dxgkrnl.sys opens in its
/// host role (`\Device\VMBus\kmcl_interface` is the guest one), seen in public Hex-Rays output of
/// several dxgkrnl builds. Not documented by Microsoft.
pub(super) const KMCL_DEVICE_NAME: &str = r"\Device\RootVMBus\kmcl_interface";

const KMCL_DEVICE_NAME_LEN: usize = KMCL_DEVICE_NAME.len();

/// [`KMCL_DEVICE_NAME`] in UTF-16 (ASCII only), for the `UNICODE_STRING` of the open.
static KMCL_DEVICE_NAME_UTF16: [u16; KMCL_DEVICE_NAME_LEN] = ascii_to_utf16(KMCL_DEVICE_NAME);

const fn ascii_to_utf16<const N: usize>(text: &str) -> [u16; N] {
    let bytes = text.as_bytes();
    assert!(bytes.len() == N);
    let mut out = [0u16; N];
    let mut index = 0;
    while index < N {
        assert!(bytes[index].is_ascii());
        out[index] = bytes[index] as u16;
        index += 1;
    }
    out
}

/// `FILE_ALL_ACCESS` (0x001F01FF, wdm.h): the access dxgkrnl asks for when it opens the KMCL
/// device (docs/kmcl-bindings.md §R1). Spelled out because it is a macro expression.
const FILE_ALL_ACCESS: wdk_sys::ACCESS_MASK = 0x001F_01FF;
/// `FILE_OPEN` (wdm.h): open an existing object only.
const FILE_OPEN: wdk_sys::ULONG = 0x0000_0001;
/// `FILE_NON_DIRECTORY_FILE` (wdm.h).
const FILE_NON_DIRECTORY_FILE: wdk_sys::ULONG = 0x0000_0040;

// The interface GUID is `crate::kmcl::raw::GUID` (build.rs-generated constant); the WDF call takes
// `wdk_sys::GUID`. Both are the C `GUID` {u32, u16, u16, [u8; 8]}.
const _: () = assert!(size_of::<raw::GUID>() == size_of::<wdk_sys::GUID>());
const _: () = assert!(align_of::<raw::GUID>() == align_of::<wdk_sys::GUID>());
// `WdfIoTargetQueryForInterface` writes through a `PINTERFACE`; our table starts with `INTERFACE`.
const _: () = assert!(size_of::<raw::INTERFACE>() == size_of::<INTERFACE>());

/// What a successful acquisition hands to the device context.
pub(super) struct KmclBinding {
    /// The validated table; dropping it is the one `InterfaceDereference`.
    pub(super) interface: ServerInterface,
    /// `Server.VmbConvertVmbusHandleToKernelHandle`, copied out of the queried table because
    /// `ServerInterface` has no wrapper for it (reported). Valid while `interface` is held.
    pub(super) convert: PFN_VMB_CONVERT_VMBUS_HANDLE_TO_KERNEL_HANDLE,
    /// The open remote I/O target (child of the device). Kept open while the interface is held.
    pub(super) target: WDFIOTARGET,
}

/// Opens the KMCL device and queries `KMCL_SERVER_INTERFACE_V1`. PASSIVE_LEVEL.
pub(super) fn acquire(device: WDFDEVICE) -> Result<KmclBinding, NtStatus> {
    let target = create_target(device)?;
    match open_and_query(target) {
        Ok((interface, convert)) => Ok(KmclBinding {
            interface,
            convert,
            target,
        }),
        Err(status) => {
            delete_target(target);
            Err(status)
        }
    }
}

/// `WdfObjectDelete` on the target (which also closes it). PASSIVE_LEVEL.
pub(super) fn delete_target(target: WDFIOTARGET) {
    // SAFETY: `target` came from WdfIoTargetCreate and is deleted exactly once (by the failure
    // path of `acquire`, or by the device teardown that took it out of the device context).
    unsafe { call_unsafe_wdf_function_binding!(WdfObjectDelete, target as WDFOBJECT) };
}

fn create_target(device: WDFDEVICE) -> Result<WDFIOTARGET, NtStatus> {
    // WDF_OBJECT_ATTRIBUTES_INIT + ParentObject = device (also the default parent).
    let mut attributes = WDF_OBJECT_ATTRIBUTES {
        Size: wdf_size::<WDF_OBJECT_ATTRIBUTES>(),
        ExecutionLevel: _WDF_EXECUTION_LEVEL::WdfExecutionLevelInheritFromParent,
        SynchronizationScope: _WDF_SYNCHRONIZATION_SCOPE::WdfSynchronizationScopeInheritFromParent,
        ParentObject: device as WDFOBJECT,
        ..WDF_OBJECT_ATTRIBUTES::default()
    };
    let mut target: WDFIOTARGET = ptr::null_mut();
    // SAFETY: `device` is the live device whose callback is running; `attributes` and `target`
    // are locals that outlive the call.
    let status = unsafe {
        call_unsafe_wdf_function_binding!(
            WdfIoTargetCreate,
            device,
            &raw mut attributes,
            &raw mut target
        )
    };
    if !wdk::nt_success(status) {
        report("WdfIoTargetCreate", NtStatus(status));
        return Err(NtStatus(status));
    }
    Ok(target)
}

fn open_and_query(
    target: WDFIOTARGET,
) -> Result<
    (
        ServerInterface,
        PFN_VMB_CONVERT_VMBUS_HANDLE_TO_KERNEL_HANDLE,
    ),
    NtStatus,
> {
    // WDF_IO_TARGET_OPEN_PARAMS_INIT_OPEN_BY_NAME(&params, &name, FILE_ALL_ACCESS): zero, Size,
    // Type = WdfIoTargetOpenByName, TargetDeviceName, DesiredAccess, CreateOptions =
    // FILE_NON_DIRECTORY_FILE, CreateDisposition = FILE_OPEN (wdfiotarget.h, KMDF branch).
    let name_bytes = (KMCL_DEVICE_NAME_LEN * 2) as u16;
    let mut params = WDF_IO_TARGET_OPEN_PARAMS {
        Size: wdf_size::<WDF_IO_TARGET_OPEN_PARAMS>(),
        Type: _WDF_IO_TARGET_OPEN_TYPE::WdfIoTargetOpenByName,
        TargetDeviceName: UNICODE_STRING {
            Length: name_bytes,
            MaximumLength: name_bytes,
            // Only read (the open copies the name); the static is never written.
            Buffer: KMCL_DEVICE_NAME_UTF16.as_ptr().cast_mut(),
        },
        DesiredAccess: FILE_ALL_ACCESS,
        CreateOptions: FILE_NON_DIRECTORY_FILE,
        CreateDisposition: FILE_OPEN,
        ..WDF_IO_TARGET_OPEN_PARAMS::default()
    };
    // SAFETY: `target` was just created and is not open; `params` and the name it points to
    // outlive the call. PASSIVE_LEVEL (callers).
    let status =
        unsafe { call_unsafe_wdf_function_binding!(WdfIoTargetOpen, target, &raw mut params) };
    if !wdk::nt_success(status) {
        report("WdfIoTargetOpen", NtStatus(status));
        return Err(NtStatus(status));
    }

    // SAFETY: KMCL_SERVER_INTERFACE_V1 is `INTERFACE` (two u16, a pointer, two nullable function
    // pointers) followed by nullable function pointers only: all-zero is a valid value of every
    // field (0 / NULL / None). The query expects a zeroed structure (docs/kmcl-bindings.md §R1).
    let mut table: KMCL_SERVER_INTERFACE_V1 = unsafe { core::mem::zeroed() };
    let interface_type = KMCL_SERVER_INTERFACE_TYPE;
    // SAFETY: `target` is open; `interface_type` and `table` are locals that outlive the
    // synchronous call; `table` is exactly SERVER_INTERFACE_V1_SIZE bytes and starts with
    // INTERFACE (asserted above and in kmcl::raw's layout tests); no interface-specific data.
    let status = unsafe {
        call_unsafe_wdf_function_binding!(
            WdfIoTargetQueryForInterface,
            target,
            (&raw const interface_type).cast::<wdk_sys::GUID>(),
            (&raw mut table).cast::<INTERFACE>(),
            SERVER_INTERFACE_V1_SIZE,
            KMCL_SERVER_INTERFACE_VERSION_V1,
            ptr::null_mut()
        )
    };
    if !wdk::nt_success(status) {
        report("WdfIoTargetQueryForInterface", NtStatus(status));
        return Err(NtStatus(status));
    }

    let convert = table.Server.VmbConvertVmbusHandleToKernelHandle;
    // Takes over the query's reference: from here on exactly one InterfaceDereference happens,
    // in `from_queried`'s failure path or when the ServerInterface is dropped.
    match ServerInterface::from_queried(table, KMCL_SERVER_INTERFACE_VERSION_V1) {
        Ok(interface) => Ok((interface, convert)),
        Err(error) => {
            wdk::println!("vmbsrv: the KMCL server interface table was refused: {error:?}");
            report("ServerInterface::from_queried", error.status());
            Err(error.status())
        }
    }
}

/// One DbgPrint line naming the step, the device, the interface and the open question.
fn report(step: &str, status: NtStatus) {
    wdk::println!(
        "vmbsrv: {step} failed with {status}: device {KMCL_DEVICE_NAME}, interface \
         KMCL_SERVER_INTERFACE_TYPE {}, size {SERVER_INTERFACE_V1_SIZE}, version \
         {KMCL_SERVER_INTERFACE_VERSION_V1}. Whether this device answers the public server \
         interface GUID is experiment 1 of docs/windows.md.",
        GuidText(&KMCL_SERVER_INTERFACE_TYPE)
    );
}

/// `{xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx}`.
struct GuidText<'g>(&'g raw::GUID);

impl fmt::Display for GuidText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = self.0;
        let d = g.Data4;
        write!(
            f,
            "{{{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}}}",
            g.Data1, g.Data2, g.Data3, d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]
        )
    }
}
