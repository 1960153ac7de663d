//! Errors: every failure carries the NTSTATUS and a readable message.

use std::fmt;

use vmbsrv::kmcl::NtStatus;
use vmbsrv::vsp::control::{ControlOp, STATUS_DEVICE_BUSY};

/// Where a request failed (docs/control.md §3 keeps the two statuses apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The IOCTL was refused: the request was malformed or not allowed; nothing happened.
    Ioctl,
    /// The IOCTL succeeded but the operation failed (the response's `status`).
    Operation,
    /// The request never reached the driver (device not found, handle could not be opened).
    Transport,
    /// The driver answered something this client cannot read (a short or inconsistent response).
    Protocol,
    /// A local input/output error (reading or writing a save-stream file).
    Io,
}

/// A failed control request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// The request, if the failure belongs to one.
    pub op: Option<ControlOp>,
    /// Where it failed.
    pub failure: Failure,
    /// The NTSTATUS (for `Transport` and `Io`, `STATUS_UNSUCCESSFUL` unless a better one is known).
    pub status: NtStatus,
    /// A readable explanation.
    pub message: String,
}

impl Error {
    /// An error of `failure` kind for `op` with `status` and a message.
    pub fn new(
        op: Option<ControlOp>,
        failure: Failure,
        status: NtStatus,
        message: impl Into<String>,
    ) -> Self {
        Self {
            op,
            failure,
            status,
            message: message.into(),
        }
    }

    pub(crate) fn protocol(op: ControlOp, message: impl Into<String>) -> Self {
        Self::new(Some(op), Failure::Protocol, NtStatus::UNSUCCESSFUL, message)
    }

    pub(crate) fn operation(op: ControlOp, status: NtStatus) -> Self {
        Self::new(
            Some(op),
            Failure::Operation,
            status,
            explain_operation(op, status),
        )
    }

    pub(crate) fn ioctl(op: ControlOp, status: NtStatus) -> Self {
        Self::new(Some(op), Failure::Ioctl, status, explain_ioctl(status))
    }

    pub(crate) fn io(message: impl Into<String>) -> Self {
        Self::new(None, Failure::Io, NtStatus::UNSUCCESSFUL, message)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let place = match self.failure {
            Failure::Ioctl => "IOCTL refused",
            Failure::Operation => "operation failed",
            Failure::Transport => "cannot reach the driver",
            Failure::Protocol => "unreadable response",
            Failure::Io => "I/O error",
        };
        if let Some(op) = self.op {
            write!(f, "{op:?}: ")?;
        }
        write!(
            f,
            "{place}: {} ({}): {}",
            status_name(self.status),
            hex(self.status),
            self.message
        )
    }
}

impl std::error::Error for Error {}

fn hex(status: NtStatus) -> String {
    format!("{:#010x}", status.as_u32())
}

/// The `ntstatus.h` name of a status, or its hex value.
pub fn status_name(status: NtStatus) -> String {
    if status == STATUS_DEVICE_BUSY {
        return "STATUS_DEVICE_BUSY".into();
    }
    match status.name() {
        Some(name) => name.into(),
        None => hex(status),
    }
}

fn explain_ioctl(status: NtStatus) -> String {
    match status {
        NtStatus::INVALID_DEVICE_REQUEST => "the driver does not know this IOCTL code".into(),
        NtStatus::INVALID_BUFFER_SIZE => "the request has the wrong length".into(),
        NtStatus::REVISION_MISMATCH => "the driver speaks another control version".into(),
        NtStatus::INVALID_PARAMETER => "a request field is out of range or reserved".into(),
        NtStatus::BUFFER_TOO_SMALL => "the output buffer is smaller than the response".into(),
        NtStatus::ACCESS_DENIED => {
            "this caller's class may not run the operation (docs/control.md §10)".into()
        }
        other => format!("the IOCTL failed with {}", status_name(other)),
    }
}

fn explain_operation(op: ControlOp, status: NtStatus) -> String {
    match status {
        NtStatus::NOT_FOUND => "no live channel of this handle has that id".into(),
        s if s == STATUS_DEVICE_BUSY => {
            "another request is using the channel; retry when it completes".into()
        }
        NtStatus::INVALID_DEVICE_STATE => match op {
            ControlOp::PostMessage => {
                "the channel cannot take posts now (guest not negotiated, not running, or saving)"
                    .into()
            }
            ControlOp::SaveEnd => {
                "the save is incomplete (phase SaveFailed): Resume, or SaveBegin again".into()
            }
            _ => "the channel's phase does not allow this operation".into(),
        },
        NtStatus::QUOTA_EXCEEDED => match op {
            ControlOp::CreateChannel => "the registry is full".into(),
            _ => "max_in_flight reached: fetch outcomes first".into(),
        },
        NtStatus::INVALID_PARAMETER | NtStatus::INVALID_PARAMETER_1
            if op == ControlOp::CreateChannel =>
        {
            "the VMBus handle could not be converted: it must be a VMBus handle valid in the \
             calling process, which only the VM's worker process holds (docs/control.md §10)"
                .into()
        }
        NtStatus::INVALID_BUFFER_SIZE => "the message is longer than the channel allows".into(),
        NtStatus::DATA_ERROR => "the saved state failed verification".into(),
        NtStatus::IO_TIMEOUT => "the channel did not settle within the bounded wait".into(),
        other => format!("the driver answered {}", status_name(other)),
    }
}
