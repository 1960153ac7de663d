//! The Windows transport: `DeviceIoControl` on the vmbsrv control device.
//!
//! The device is found through its device interface class
//! [`GUID_DEVINTERFACE_VMBSRV_CONTROL`](vmbsrv::vsp::control::GUID_DEVINTERFACE_VMBSRV_CONTROL)
//! (`CM_Get_Device_Interface_ListW`) and opened with `CreateFileW` for read and write. Who may
//! open it, and what each caller class may do, is docs/control.md §10.
// UNSAFETY: this module is the FFI edge of the client: Win32 calls on buffers it owns.
#![allow(unsafe_code)]

use std::ffi::OsString;
use std::os::windows::ffi::OsStringExt;
use std::ptr;

use vmbsrv::kmcl::NtStatus;
use vmbsrv::vsp::control::GUID_DEVINTERFACE_VMBSRV_CONTROL;
use windows_sys::Win32::Devices::DeviceAndDriverInstallation::{
    CM_GET_DEVICE_INTERFACE_LIST_PRESENT, CM_Get_Device_Interface_List_SizeW,
    CM_Get_Device_Interface_ListW, CR_SUCCESS,
};
use windows_sys::Win32::Foundation::{
    CloseHandle, ERROR_ACCESS_DENIED, ERROR_BAD_COMMAND, ERROR_GEN_FAILURE,
    ERROR_INSUFFICIENT_BUFFER, ERROR_INVALID_FUNCTION, ERROR_INVALID_PARAMETER,
    ERROR_INVALID_USER_BUFFER, ERROR_NOT_SUPPORTED, ERROR_REVISION_MISMATCH, GENERIC_READ,
    GENERIC_WRITE, GetLastError, HANDLE, INVALID_HANDLE_VALUE,
};
use windows_sys::Win32::Storage::FileSystem::{
    CreateFileW, FILE_ATTRIBUTE_NORMAL, FILE_SHARE_READ, FILE_SHARE_WRITE, OPEN_EXISTING,
};
use windows_sys::Win32::System::IO::DeviceIoControl;
use windows_sys::core::GUID;

use crate::{Error, Failure, IoctlError, Transport};

/// An open handle on the vmbsrv control device: one owner (docs/control.md §7). Closing it
/// destroys the channels it created.
#[derive(Debug)]
pub struct DeviceTransport {
    handle: HANDLE,
}

fn transport_error(message: String) -> Error {
    Error::new(None, Failure::Transport, NtStatus::UNSUCCESSFUL, message)
}

fn interface_guid() -> GUID {
    let g = GUID_DEVINTERFACE_VMBSRV_CONTROL;
    GUID {
        data1: g.Data1,
        data2: g.Data2,
        data3: g.Data3,
        data4: g.Data4,
    }
}

/// The device interface paths of every present vmbsrv control device.
pub fn device_paths() -> Result<Vec<OsString>, Error> {
    let guid = interface_guid();
    let mut len: u32 = 0;
    // SAFETY: `guid` and `len` are live locals; a null device id means "all devices".
    let cr = unsafe {
        CM_Get_Device_Interface_List_SizeW(
            &mut len,
            &guid,
            ptr::null(),
            CM_GET_DEVICE_INTERFACE_LIST_PRESENT,
        )
    };
    if cr != CR_SUCCESS {
        return Err(transport_error(format!(
            "CM_Get_Device_Interface_List_SizeW failed (CONFIGRET {cr})"
        )));
    }
    let mut buffer = vec![0u16; len.max(1) as usize];
    // SAFETY: `buffer` holds `len` (at least 1) UTF-16 units, as the size call asked for.
    let cr = unsafe {
        CM_Get_Device_Interface_ListW(
            &guid,
            ptr::null(),
            buffer.as_mut_ptr(),
            u32::try_from(buffer.len()).unwrap_or(u32::MAX),
            CM_GET_DEVICE_INTERFACE_LIST_PRESENT,
        )
    };
    if cr != CR_SUCCESS {
        return Err(transport_error(format!(
            "CM_Get_Device_Interface_ListW failed (CONFIGRET {cr})"
        )));
    }
    Ok(buffer
        .split(|c| *c == 0)
        .filter(|s| !s.is_empty())
        .map(OsString::from_wide)
        .collect())
}

impl DeviceTransport {
    /// Opens the first present vmbsrv control device.
    pub fn open() -> Result<Self, Error> {
        let paths = device_paths()?;
        let Some(path) = paths.first() else {
            return Err(transport_error(
                "no vmbsrv control device is present (is the driver installed and started?)".into(),
            ));
        };
        Self::open_path(path)
    }

    /// Opens the control device at `path` (a device interface path).
    pub fn open_path(path: &OsString) -> Result<Self, Error> {
        use std::os::windows::ffi::OsStrExt;
        let wide: Vec<u16> = path.encode_wide().chain([0]).collect();
        // SAFETY: `wide` is a NUL-terminated UTF-16 string that outlives the call; no security
        // attributes, no template.
        let handle = unsafe {
            CreateFileW(
                wide.as_ptr(),
                GENERIC_READ | GENERIC_WRITE,
                FILE_SHARE_READ | FILE_SHARE_WRITE,
                ptr::null(),
                OPEN_EXISTING,
                FILE_ATTRIBUTE_NORMAL,
                ptr::null_mut(),
            )
        };
        if handle == INVALID_HANDLE_VALUE {
            // SAFETY: no preconditions.
            let code = unsafe { GetLastError() };
            let hint = if code == ERROR_ACCESS_DENIED {
                ": only LocalSystem, elevated Administrators and VM worker processes may open it \
                 (docs/control.md §10)"
            } else {
                ""
            };
            return Err(Error::new(
                None,
                Failure::Transport,
                if code == ERROR_ACCESS_DENIED {
                    NtStatus::ACCESS_DENIED
                } else {
                    NtStatus::UNSUCCESSFUL
                },
                format!(
                    "CreateFileW({}) failed with Win32 error {code}{hint}",
                    path.to_string_lossy()
                ),
            ));
        }
        Ok(Self { handle })
    }
}

/// The NTSTATUS behind the Win32 error `DeviceIoControl` reports (the I/O manager's
/// `RtlNtStatusToDosError` mapping, for the statuses the control interface uses, §3).
fn status_of(code: u32) -> Option<NtStatus> {
    Some(match code {
        ERROR_INVALID_FUNCTION => NtStatus::INVALID_DEVICE_REQUEST,
        ERROR_INVALID_USER_BUFFER => NtStatus::INVALID_BUFFER_SIZE,
        ERROR_REVISION_MISMATCH => NtStatus::REVISION_MISMATCH,
        ERROR_INVALID_PARAMETER => NtStatus::INVALID_PARAMETER,
        ERROR_INSUFFICIENT_BUFFER => NtStatus::BUFFER_TOO_SMALL,
        ERROR_ACCESS_DENIED => NtStatus::ACCESS_DENIED,
        ERROR_BAD_COMMAND => NtStatus::INVALID_DEVICE_STATE,
        ERROR_NOT_SUPPORTED => NtStatus::NOT_SUPPORTED,
        ERROR_GEN_FAILURE => NtStatus::UNSUCCESSFUL,
        _ => return None,
    })
}

impl Transport for DeviceTransport {
    fn ioctl(&mut self, code: u32, input: &[u8], output: &mut [u8]) -> Result<usize, IoctlError> {
        // METHOD_BUFFERED: the I/O manager copies `input` into the system buffer and copies back
        // `returned` bytes of it into `output`.
        let mut returned: u32 = 0;
        let input_len = u32::try_from(input.len()).map_err(|_| IoctlError::Transport {
            code: 0,
            message: "request longer than 4 GiB".into(),
        })?;
        let output_len = u32::try_from(output.len()).map_err(|_| IoctlError::Transport {
            code: 0,
            message: "output longer than 4 GiB".into(),
        })?;
        // SAFETY: `self.handle` is the open device handle this value owns; `input` and `output`
        // are live for the whole (synchronous: no OVERLAPPED) call with the lengths given, and
        // `returned` is a live local.
        let ok = unsafe {
            DeviceIoControl(
                self.handle,
                code,
                input.as_ptr().cast(),
                input_len,
                output.as_mut_ptr().cast(),
                output_len,
                &mut returned,
                ptr::null_mut(),
            )
        };
        if ok != 0 {
            return Ok(returned as usize);
        }
        // SAFETY: no preconditions.
        let error = unsafe { GetLastError() };
        match status_of(error) {
            Some(status) => Err(IoctlError::Status(status)),
            None => Err(IoctlError::Transport {
                code: error,
                message: format!("DeviceIoControl({code:#010x}) failed"),
            }),
        }
    }
}

impl Drop for DeviceTransport {
    fn drop(&mut self) {
        // SAFETY: the handle is open and owned by this value; it is closed exactly once.
        unsafe {
            CloseHandle(self.handle);
        }
    }
}
