//! `NTSTATUS` as a newtype, with every status value vmbsrv produces or tests for.

use core::fmt;

/// A Windows `NTSTATUS` (`LONG`): severity in the top two bits, facility, code.
///
/// `#[repr(transparent)]` so it crosses the FFI boundary exactly as the C type does.
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
#[must_use]
pub struct NtStatus(pub i32);

/// The result of a KMCL-facing operation: `Ok` carries the value, `Err` a failing status.
pub type Result<T, E = NtStatus> = core::result::Result<T, E>;

macro_rules! statuses {
    ($($(#[$doc:meta])* $name:ident = $value:literal;)*) => {
        impl NtStatus {
            $($(#[$doc])* pub const $name: NtStatus = NtStatus($value as u32 as i32);)*

            /// The `ntstatus.h` name of a status this crate knows, if any.
            pub const fn name(self) -> Option<&'static str> {
                match self.0 as u32 {
                    $($value => Some(concat!("STATUS_", stringify!($name))),)*
                    _ => None,
                }
            }
        }
    };
}

statuses! {
    /// `STATUS_SUCCESS`.
    SUCCESS = 0x0000_0000;
    /// `STATUS_PENDING`: the operation continues asynchronously.
    PENDING = 0x0000_0103;
    /// `STATUS_BUFFER_OVERFLOW` (warning): some bytes were written, more remain.
    BUFFER_OVERFLOW = 0x8000_0005;
    /// `STATUS_UNSUCCESSFUL`.
    UNSUCCESSFUL = 0xC000_0001;
    /// `STATUS_IO_TIMEOUT`: a bounded wait ended before the condition it waited for.
    IO_TIMEOUT = 0xC000_00B5;
    /// `STATUS_NOT_IMPLEMENTED`.
    NOT_IMPLEMENTED = 0xC000_0002;
    /// `STATUS_INVALID_PARAMETER`.
    INVALID_PARAMETER = 0xC000_000D;
    /// `STATUS_NO_MEMORY`.
    NO_MEMORY = 0xC000_0017;
    /// `STATUS_MORE_PROCESSING_REQUIRED` (error severity!): a restore wants the next chunk.
    MORE_PROCESSING_REQUIRED = 0xC000_0016;
    /// `STATUS_ACCESS_DENIED`: the caller's class may not do this (docs/control.md §10).
    ACCESS_DENIED = 0xC000_0022;
    /// `STATUS_BUFFER_TOO_SMALL`: nothing was written; a larger buffer is required.
    BUFFER_TOO_SMALL = 0xC000_0023;
    /// `STATUS_OBJECT_NAME_NOT_FOUND`.
    OBJECT_NAME_NOT_FOUND = 0xC000_0034;
    /// `STATUS_DATA_ERROR`: data failed an integrity check.
    DATA_ERROR = 0xC000_003E;
    /// `STATUS_CRC_ERROR`: a checksum did not match.
    CRC_ERROR = 0xC000_003F;
    /// `STATUS_INSUFFICIENT_RESOURCES`: an allocation or a bounded pool is exhausted.
    INSUFFICIENT_RESOURCES = 0xC000_009A;
    /// `STATUS_NOT_SUPPORTED`: also the initial status of a query-interface IRP.
    NOT_SUPPORTED = 0xC000_00BB;
    /// `STATUS_INVALID_PARAMETER_1`.
    INVALID_PARAMETER_1 = 0xC000_00EF;
    /// `STATUS_INVALID_PARAMETER_2`.
    INVALID_PARAMETER_2 = 0xC000_00F0;
    /// `STATUS_INVALID_PARAMETER_3`.
    INVALID_PARAMETER_3 = 0xC000_00F1;
    /// `STATUS_INVALID_PARAMETER_4`.
    INVALID_PARAMETER_4 = 0xC000_00F2;
    /// `STATUS_INVALID_PARAMETER_5`.
    INVALID_PARAMETER_5 = 0xC000_00F3;
    /// `STATUS_CANCELLED`.
    CANCELLED = 0xC000_0120;
    /// `STATUS_INVALID_DEVICE_STATE`: the object is not in a state that allows the call.
    INVALID_DEVICE_STATE = 0xC000_0184;
    /// `STATUS_REVISION_MISMATCH`: a version this build does not speak.
    REVISION_MISMATCH = 0xC000_0059;
    /// `STATUS_INVALID_BUFFER_SIZE`.
    INVALID_BUFFER_SIZE = 0xC000_0206;
    /// `STATUS_NOT_FOUND`.
    NOT_FOUND = 0xC000_0225;
    /// `STATUS_DEVICE_REMOVED`.
    DEVICE_REMOVED = 0xC000_02B6;
    /// `STATUS_QUOTA_EXCEEDED`: a configured bound (for example messages in flight) is reached.
    QUOTA_EXCEEDED = 0xC000_0044;
    /// `STATUS_DUPLICATE_OBJECTID`: an object with this identity already exists.
    DUPLICATE_OBJECTID = 0xC000_022A;
    /// `STATUS_INTEGER_OVERFLOW`.
    INTEGER_OVERFLOW = 0xC000_0095;
    /// `STATUS_INVALID_DEVICE_REQUEST`: the request is not valid for this device.
    INVALID_DEVICE_REQUEST = 0xC000_0010;
    /// `STATUS_UNKNOWN_REVISION`: a structure revision is not recognized.
    UNKNOWN_REVISION = 0xC000_0058;
    /// `STATUS_ALREADY_INITIALIZED`.
    ALREADY_INITIALIZED = 0xC000_0510;
}

impl NtStatus {
    /// `NT_SUCCESS`: success and informational severities (the sign bit is clear).
    pub const fn is_success(self) -> bool {
        self.0 >= 0
    }

    /// Converts to `Result`: `Ok(())` for `NT_SUCCESS`, else `Err(self)`.
    ///
    /// Do not use this for `MORE_PROCESSING_REQUIRED` from a restore, which is an
    /// error-severity code that means "continue"; compare it explicitly.
    pub const fn ok(self) -> Result<()> {
        if self.is_success() { Ok(()) } else { Err(self) }
    }

    /// The raw value as the unsigned hex form Windows tools print.
    pub const fn as_u32(self) -> u32 {
        self.0 as u32
    }
}

impl fmt::Debug for NtStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name}"),
            None => write!(f, "NTSTATUS({:#010x})", self.as_u32()),
        }
    }
}

impl fmt::Display for NtStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name} ({:#010x})", self.as_u32()),
            None => write!(f, "{:#010x}", self.as_u32()),
        }
    }
}

impl From<NtStatus> for i32 {
    fn from(status: NtStatus) -> i32 {
        status.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_match_ntstatus_h() {
        assert_eq!(NtStatus::BUFFER_OVERFLOW.as_u32(), 0x8000_0005);
        assert_eq!(NtStatus::MORE_PROCESSING_REQUIRED.as_u32(), 0xC000_0016);
        assert_eq!(NtStatus::BUFFER_TOO_SMALL.as_u32(), 0xC000_0023);
        assert_eq!(NtStatus::INVALID_DEVICE_STATE.as_u32(), 0xC000_0184);
        assert_eq!(NtStatus::CANCELLED.as_u32(), 0xC000_0120);
        assert_eq!(NtStatus::DEVICE_REMOVED.as_u32(), 0xC000_02B6);
        assert_eq!(NtStatus::INVALID_PARAMETER_2.as_u32(), 0xC000_00F0);
    }

    #[test]
    fn severity() {
        assert!(NtStatus::SUCCESS.is_success());
        assert!(NtStatus::PENDING.is_success());
        // A warning is not NT_SUCCESS.
        assert!(!NtStatus::BUFFER_OVERFLOW.is_success());
        // "Continue with the next chunk" is an error-severity code.
        assert!(!NtStatus::MORE_PROCESSING_REQUIRED.is_success());
        assert_eq!(NtStatus::CANCELLED.ok(), Err(NtStatus::CANCELLED));
    }

    #[test]
    fn formatting_names_known_values() {
        extern crate std;
        use std::format;
        assert_eq!(format!("{:?}", NtStatus::CANCELLED), "STATUS_CANCELLED");
        assert_eq!(format!("{}", NtStatus(0x1234)), "0x00001234");
    }
}
