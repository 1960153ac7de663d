//! IOCTL codes: defined once, here.
//!
//! `CTL_CODE(DeviceType, Function, Method, Access)` is
//! `(DeviceType << 16) | (Access << 14) | (Function << 2) | Method`. vmbsrv uses the vendor device
//! type [`FILE_DEVICE_VMBSRV`] (`0x8000..=0xFFFF` is reserved for third parties), functions from
//! `0x800` (below is Microsoft's), `METHOD_BUFFERED`, and `FILE_READ_DATA | FILE_WRITE_DATA` for
//! every request that changes something, `FILE_READ_DATA` for pure queries. The I/O manager checks
//! the access bits against the handle's granted access before the driver sees the request.

use super::wire;

/// The device interface class of vmbsrv's control interface: {1C4356BF-8309-406C-BC89-651208E3C2C1}
/// (a fresh random GUID, `uuid4`, owned by vmbsrv; documented in docs/windows.md). The driver
/// registers it (`src/driver/device.rs`); host tools find the device with
/// `CM_Get_Device_Interface_List` / `SetupDiGetClassDevs(DIGCF_DEVICEINTERFACE)`.
pub const GUID_DEVINTERFACE_VMBSRV_CONTROL: crate::kmcl::raw::GUID = crate::kmcl::raw::GUID {
    Data1: 0x1C43_56BF,
    Data2: 0x8309,
    Data3: 0x406C,
    Data4: [0xBC, 0x89, 0x65, 0x12, 0x08, 0xE3, 0xC2, 0xC1],
};

/// The vmbsrv device type (vendor range `0x8000..=0xFFFF`).
pub const FILE_DEVICE_VMBSRV: u32 = 0xA7B5;
/// `METHOD_BUFFERED`: the I/O manager copies input and output through one system buffer.
pub const METHOD_BUFFERED: u32 = 0;
/// `FILE_READ_DATA` (= `FILE_READ_ACCESS`).
pub const FILE_READ_DATA: u32 = 1;
/// `FILE_WRITE_DATA` (= `FILE_WRITE_ACCESS`).
pub const FILE_WRITE_DATA: u32 = 2;

/// `CTL_CODE` from `devioctl.h`.
pub const fn ctl_code(device_type: u32, function: u32, method: u32, access: u32) -> u32 {
    (device_type << 16) | (access << 14) | (function << 2) | method
}

const READ: u32 = FILE_READ_DATA;
const READ_WRITE: u32 = FILE_READ_DATA | FILE_WRITE_DATA;

macro_rules! ioctls {
    ($($(#[$doc:meta])* $variant:ident = $name:ident, $function:literal, $access:ident;)*) => {
        $(
            $(#[$doc])*
            #[doc = concat!("\n\nIOCTL code: function `", stringify!($function), "`, access `",
                stringify!($access), "`.")]
            pub const $name: u32 = ctl_code(FILE_DEVICE_VMBSRV, $function, METHOD_BUFFERED, $access);
        )*

        /// One control operation, named by its IOCTL code.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ControlOp {
            $($(#[$doc])* $variant,)*
        }

        impl ControlOp {
            /// Every operation, in function-number order.
            pub const ALL: &'static [ControlOp] = &[$(ControlOp::$variant,)*];

            /// The operation an IOCTL code names; `None` for any other code (including one with
            /// a known function number but another device type, method or access).
            pub const fn from_code(code: u32) -> Option<Self> {
                match code {
                    $($name => Some(Self::$variant),)*
                    _ => None,
                }
            }

            /// The operation's IOCTL code.
            pub const fn code(self) -> u32 {
                match self {
                    $(Self::$variant => $name,)*
                }
            }
        }
    };
}

ioctls! {
    /// Limits and version of the interface. Input [`wire::RequestHeader`]; output
    /// [`wire::InfoResponse`].
    QueryInfo = IOCTL_VMBSRV_QUERY_INFO, 0x800, READ;
    /// Create (and, in mode Start, offer) a channel. Input [`wire::CreateChannelRequest`]; output
    /// [`wire::CreateChannelResponse`].
    CreateChannel = IOCTL_VMBSRV_CREATE_CHANNEL, 0x801, READ_WRITE;
    /// Disable and drop a channel. Input [`wire::ChannelRequest`]; output
    /// [`wire::DestroyChannelResponse`].
    DestroyChannel = IOCTL_VMBSRV_DESTROY_CHANNEL, 0x802, READ_WRITE;
    /// Disable a channel but keep it for fetching outcomes and statistics. Input
    /// [`wire::ChannelRequest`]; output [`wire::ResponseHeader`].
    DisableChannel = IOCTL_VMBSRV_DISABLE_CHANNEL, 0x803, READ_WRITE;
    /// Post one message. Input [`wire::PostMessageRequest`] + payload; output
    /// [`wire::PostMessageResponse`].
    PostMessage = IOCTL_VMBSRV_POST_MESSAGE, 0x804, READ_WRITE;
    /// Take recorded outcomes (destructive). Input [`wire::FetchOutcomesRequest`]; output
    /// [`wire::FetchOutcomesResponse`] + [`wire::OutcomeEntry`] array.
    FetchOutcomes = IOCTL_VMBSRV_FETCH_OUTCOMES, 0x805, READ_WRITE;
    /// Read a channel's counters. Input [`wire::ChannelRequest`]; output
    /// [`wire::StatisticsResponse`].
    QueryStatistics = IOCTL_VMBSRV_QUERY_STATISTICS, 0x806, READ;
    /// Start a save. Input [`wire::ChannelRequest`]; output [`wire::SaveBeginResponse`] + the
    /// encoded channel record.
    SaveBegin = IOCTL_VMBSRV_SAVE_BEGIN, 0x807, READ_WRITE;
    /// Take the next KMCL chunk. Input [`wire::ChannelRequest`]; output
    /// [`wire::SaveContinueResponse`] + chunk bytes.
    SaveContinue = IOCTL_VMBSRV_SAVE_CONTINUE, 0x808, READ_WRITE;
    /// End a save. Input [`wire::ChannelRequest`]; output [`wire::ResponseHeader`].
    SaveEnd = IOCTL_VMBSRV_SAVE_END, 0x809, READ_WRITE;
    /// Resume after a save that will not be used. Input [`wire::ChannelRequest`]; output
    /// [`wire::ResponseHeader`].
    Resume = IOCTL_VMBSRV_RESUME, 0x80A, READ_WRITE;
    /// Tear a saved channel down after the migration completed. Input [`wire::ChannelRequest`];
    /// output [`wire::ResponseHeader`].
    CompleteMigration = IOCTL_VMBSRV_COMPLETE_MIGRATION, 0x80B, READ_WRITE;
    /// First restore step: the channel record. Input [`wire::ChannelDataRequest`] + record;
    /// output [`wire::ResponseHeader`].
    RestoreChannelRecord = IOCTL_VMBSRV_RESTORE_CHANNEL_RECORD, 0x80C, READ_WRITE;
    /// Feed one KMCL chunk. Input [`wire::ChannelDataRequest`] + chunk; output
    /// [`wire::RestoreChunkResponse`].
    RestoreChunk = IOCTL_VMBSRV_RESTORE_CHUNK, 0x80D, READ_WRITE;
    /// Enable and start a restored channel. Input [`wire::ChannelRequest`]; output
    /// [`wire::ResponseHeader`].
    FinishRestore = IOCTL_VMBSRV_FINISH_RESTORE, 0x80E, READ_WRITE;
    /// Restart the incoming queue after a garbled guest packet stopped it. Input
    /// [`wire::ChannelRequest`]; output [`wire::ResponseHeader`].
    RestartIncoming = IOCTL_VMBSRV_RESTART_INCOMING, 0x80F, READ_WRITE;
}

impl ControlOp {
    /// The smallest output buffer the operation accepts: its response's fixed part (for
    /// `SaveBegin` plus the v1 channel record). A smaller one fails the IOCTL with
    /// `STATUS_BUFFER_TOO_SMALL` before anything happens.
    pub const fn min_output_len(self) -> usize {
        match self {
            Self::QueryInfo => wire::INFO_RESPONSE_LEN,
            Self::CreateChannel => wire::CREATE_CHANNEL_RESPONSE_LEN,
            Self::DestroyChannel => wire::DESTROY_CHANNEL_RESPONSE_LEN,
            Self::PostMessage => wire::POST_MESSAGE_RESPONSE_LEN,
            Self::FetchOutcomes => wire::FETCH_OUTCOMES_RESPONSE_LEN,
            Self::QueryStatistics => wire::STATISTICS_RESPONSE_LEN,
            Self::SaveBegin => wire::SAVE_BEGIN_MIN_OUTPUT_LEN,
            Self::SaveContinue => wire::SAVE_CONTINUE_RESPONSE_LEN,
            Self::RestoreChunk => wire::RESTORE_CHUNK_RESPONSE_LEN,
            Self::DisableChannel
            | Self::SaveEnd
            | Self::Resume
            | Self::CompleteMigration
            | Self::RestoreChannelRecord
            | Self::FinishRestore
            | Self::RestartIncoming => wire::RESPONSE_HEADER_LEN,
        }
    }

    /// The fixed part of the request; for `PostMessage`, `RestoreChannelRecord` and
    /// `RestoreChunk` variable bytes follow it, every other request is exactly this long.
    pub const fn request_fixed_len(self) -> usize {
        match self {
            Self::QueryInfo => wire::REQUEST_HEADER_LEN,
            Self::CreateChannel => wire::CREATE_CHANNEL_REQUEST_LEN,
            Self::PostMessage => wire::POST_MESSAGE_REQUEST_LEN,
            Self::FetchOutcomes => wire::FETCH_OUTCOMES_REQUEST_LEN,
            Self::RestoreChannelRecord | Self::RestoreChunk => wire::CHANNEL_DATA_REQUEST_LEN,
            Self::DestroyChannel
            | Self::DisableChannel
            | Self::QueryStatistics
            | Self::SaveBegin
            | Self::SaveContinue
            | Self::SaveEnd
            | Self::Resume
            | Self::CompleteMigration
            | Self::FinishRestore
            | Self::RestartIncoming => wire::CHANNEL_REQUEST_LEN,
        }
    }

    /// Whether variable bytes follow the fixed part of the request.
    pub const fn has_variable_input(self) -> bool {
        matches!(
            self,
            Self::PostMessage | Self::RestoreChannelRecord | Self::RestoreChunk
        )
    }

    /// Whether the operation only reads state (IOCTL access `FILE_READ_DATA`).
    pub const fn is_query(self) -> bool {
        matches!(self, Self::QueryInfo | Self::QueryStatistics)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctl_code_by_hand() {
        // (0xA7B5 << 16) | (3 << 14) | (0x801 << 2) | 0
        //   = 0xA7B5_0000 | 0xC000 | 0x2004 = 0xA7B5_E004
        assert_eq!(IOCTL_VMBSRV_CREATE_CHANNEL, 0xA7B5_E004);
        // Query: access 1 → (1 << 14) = 0x4000; 0x800 << 2 = 0x2000.
        assert_eq!(IOCTL_VMBSRV_QUERY_INFO, 0xA7B5_6000);
        assert_eq!(IOCTL_VMBSRV_QUERY_STATISTICS, 0xA7B5_6018);
        assert_eq!(IOCTL_VMBSRV_RESTART_INCOMING, 0xA7B5_E03C);
        // A well-known Microsoft code computes the same way: IOCTL_DISK_GET_DRIVE_GEOMETRY.
        assert_eq!(ctl_code(0x07, 0x0000, 0, 0), 0x0007_0000);
        // FSCTL_GET_REPARSE_POINT = CTL_CODE(FILE_DEVICE_FILE_SYSTEM, 42, METHOD_BUFFERED, FILE_ANY_ACCESS)
        assert_eq!(ctl_code(0x09, 42, 0, 0), 0x0009_00A8);
    }

    /// The table in docs/control.md §2.
    #[test]
    fn documented_code_table() {
        let documented: [(ControlOp, u32); 16] = [
            (ControlOp::QueryInfo, 0xA7B5_6000),
            (ControlOp::CreateChannel, 0xA7B5_E004),
            (ControlOp::DestroyChannel, 0xA7B5_E008),
            (ControlOp::DisableChannel, 0xA7B5_E00C),
            (ControlOp::PostMessage, 0xA7B5_E010),
            (ControlOp::FetchOutcomes, 0xA7B5_E014),
            (ControlOp::QueryStatistics, 0xA7B5_6018),
            (ControlOp::SaveBegin, 0xA7B5_E01C),
            (ControlOp::SaveContinue, 0xA7B5_E020),
            (ControlOp::SaveEnd, 0xA7B5_E024),
            (ControlOp::Resume, 0xA7B5_E028),
            (ControlOp::CompleteMigration, 0xA7B5_E02C),
            (ControlOp::RestoreChannelRecord, 0xA7B5_E030),
            (ControlOp::RestoreChunk, 0xA7B5_E034),
            (ControlOp::FinishRestore, 0xA7B5_E038),
            (ControlOp::RestartIncoming, 0xA7B5_E03C),
        ];
        for (op, code) in documented {
            assert_eq!(op.code(), code, "{op:?}");
        }
    }

    #[test]
    fn codes_are_distinct_vendor_buffered_and_round_trip() {
        for (i, op) in ControlOp::ALL.iter().enumerate() {
            let code = op.code();
            assert_eq!(ControlOp::from_code(code), Some(*op));
            assert_eq!(code >> 16, FILE_DEVICE_VMBSRV);
            assert!(code >> 16 >= 0x8000, "vendor device type");
            assert_eq!(code & 3, METHOD_BUFFERED);
            assert_eq!(
                (code >> 2) & 0xFFF,
                0x800 + i as u32,
                "functions from 0x800, in order"
            );
            let access = (code >> 14) & 3;
            let expected = if op.is_query() {
                FILE_READ_DATA
            } else {
                FILE_READ_DATA | FILE_WRITE_DATA
            };
            assert_eq!(access, expected, "{op:?}");
            for other in &ControlOp::ALL[i + 1..] {
                assert_ne!(code, other.code());
            }
        }
        assert_eq!(ControlOp::ALL.len(), 16);
    }

    #[test]
    fn near_miss_codes_are_unknown() {
        let code = IOCTL_VMBSRV_POST_MESSAGE;
        assert_eq!(ControlOp::from_code(code | 1), None, "METHOD_IN_DIRECT");
        assert_eq!(
            ControlOp::from_code(code & !(FILE_WRITE_DATA << 14)),
            None,
            "read-only access"
        );
        assert_eq!(
            ControlOp::from_code(code ^ (1 << 16)),
            None,
            "other device type"
        );
        assert_eq!(
            ControlOp::from_code(ctl_code(FILE_DEVICE_VMBSRV, 0x810, 0, 3)),
            None
        );
        assert_eq!(ControlOp::from_code(0), None);
    }
}
