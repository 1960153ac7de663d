//! Who may do what on the control device: the access model of docs/control.md §10.
//!
//! Three layers decide whether a control request runs:
//!
//! 1. **Opening the device.** The INF's security descriptor admits LocalSystem and
//!    Administrators (full access) and the group `NT VIRTUAL MACHINE\Virtual Machines`
//!    (`S-1-5-83-0`, read and write data only); nobody else gets a handle.
//! 2. **The caller class** ([`CallerClass`]), decided once per handle when it is opened, from the
//!    requestor mode and the opener's token ([`CallerClass::classify`]). A handle whose opener
//!    falls in no class is refused at open with `STATUS_ACCESS_DENIED`.
//! 3. **The operation** ([`authorize`]): what each class may ask, before the request is parsed
//!    any further; a refusal is `STATUS_ACCESS_DENIED` at the IOCTL level (no side effect).
//!    Channels themselves are bound to the handle that created them (the registry's owner
//!    binding, docs/control.md §7), so no class can see or use another handle's channel.
//!
//! | operation | LocalSystem | VM worker | Administrator |
//! |---|---|---|---|
//! | `QueryInfo` | yes | yes | yes |
//! | `CreateChannel` with a VMBus handle | yes | yes | **no** |
//! | `CreateChannel` without a VMBus handle (host-local) | yes | **no** | yes |
//! | every other operation (on its own channels only) | yes | yes | yes |
//!
//! Everything here is platform-neutral and allocation-free; the driver supplies the token facts.

use super::codes::ControlOp;
use super::parse::caller_context_vmbus_handle;
use crate::kmcl::NtStatus;

/// The class of the principal that opened a control handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallerClass {
    /// A kernel-mode requestor, or a user-mode process running as LocalSystem (`S-1-5-18`):
    /// host services that may do everything.
    System,
    /// A VM worker process: a member of `NT VIRTUAL MACHINE\Virtual Machines` (`S-1-5-83-0`),
    /// the group of every VM's virtual account. It creates channels only from a VMBus handle
    /// (of its own partition, converted in its own process), and drives only those channels.
    VmWorker,
    /// An elevated administrator (enabled `BUILTIN\Administrators`, `S-1-5-32-544`): observes
    /// the driver and may run host-local test channels, never one bound to a VM's VMBus handle.
    Administrator,
}

/// `S-1-5-18`, LocalSystem, in its binary `SID` form (revision 1, one sub-authority, NT
/// authority 5).
pub const SID_LOCAL_SYSTEM: [u8; 12] = [1, 1, 0, 0, 0, 0, 0, 5, 18, 0, 0, 0];
/// `S-1-5-32-544`, `BUILTIN\Administrators`.
pub const SID_BUILTIN_ADMINISTRATORS: [u8; 16] =
    [1, 2, 0, 0, 0, 0, 0, 5, 32, 0, 0, 0, 0x20, 0x02, 0, 0];
/// `S-1-5-83-0`, `NT VIRTUAL MACHINE\Virtual Machines`.
pub const SID_VIRTUAL_MACHINES: [u8; 16] = [1, 2, 0, 0, 0, 0, 0, 5, 83, 0, 0, 0, 0, 0, 0, 0];

/// The largest sub-authority count a `SID` may have (`SID_MAX_SUB_AUTHORITIES`, winnt.h).
pub const SID_MAX_SUB_AUTHORITIES: u8 = 15;

/// The length in bytes of a binary `SID` whose first two bytes are `header` (revision,
/// sub-authority count): `8 + 4 * count`. `None` for a revision other than 1 or a count above
/// [`SID_MAX_SUB_AUTHORITIES`].
pub const fn sid_len(header: [u8; 2]) -> Option<usize> {
    if header[0] != 1 || header[1] > SID_MAX_SUB_AUTHORITIES {
        return None;
    }
    Some(8 + 4 * header[1] as usize)
}

impl CallerClass {
    /// The class of an opener: `kernel_mode` requestors are [`CallerClass::System`]; otherwise
    /// the token's user SID `user` and its **enabled** group SIDs `groups` (binary form) decide,
    /// LocalSystem first, then the Virtual Machines group, then Administrators. `None` (refuse
    /// the open) for anyone else.
    ///
    /// The VM-worker check comes before the administrator check so that a process holding both
    /// is held to the VM worker's narrower rules for VM-bound channels.
    pub fn classify<'s>(
        kernel_mode: bool,
        user: &[u8],
        groups: impl IntoIterator<Item = &'s [u8]> + Clone,
    ) -> Option<Self> {
        if kernel_mode || user == SID_LOCAL_SYSTEM {
            return Some(Self::System);
        }
        let member = |sid: &[u8]| groups.clone().into_iter().any(|group| group == sid);
        if member(&SID_VIRTUAL_MACHINES) {
            Some(Self::VmWorker)
        } else if member(&SID_BUILTIN_ADMINISTRATORS) {
            Some(Self::Administrator)
        } else {
            None
        }
    }

    /// Whether this class may run `op`; for `CreateChannel`, `with_vmbus_handle` says whether the
    /// request names a VMBus handle (ignored for every other operation).
    pub const fn permits(self, op: ControlOp, with_vmbus_handle: bool) -> bool {
        match op {
            ControlOp::CreateChannel => match self {
                Self::System => true,
                Self::VmWorker => with_vmbus_handle,
                Self::Administrator => !with_vmbus_handle,
            },
            _ => true,
        }
    }
}

/// The access decision for one IOCTL: `Err(STATUS_ACCESS_DENIED)` if `class` may not send `code`
/// with this `input`. A code that names no operation, or a CreateChannel request too malformed
/// to name its handle, is let through: the dispatcher refuses it with its own status, with no
/// side effect either way.
pub fn authorize(class: CallerClass, code: u32, input: &[u8]) -> Result<(), NtStatus> {
    let Some(op) = ControlOp::from_code(code) else {
        return Ok(());
    };
    let with_vmbus_handle = match op {
        ControlOp::CreateChannel => match caller_context_vmbus_handle(code, input) {
            Ok(handle) => handle.is_some(),
            Err(_) => return Ok(()),
        },
        _ => false,
    };
    if class.permits(op, with_vmbus_handle) {
        Ok(())
    } else {
        Err(NtStatus::ACCESS_DENIED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_known_sids_have_their_own_length() {
        assert_eq!(sid_len([1, 1]), Some(SID_LOCAL_SYSTEM.len()));
        assert_eq!(sid_len([1, 2]), Some(SID_BUILTIN_ADMINISTRATORS.len()));
        assert_eq!(sid_len([1, 2]), Some(SID_VIRTUAL_MACHINES.len()));
        assert_eq!(sid_len([2, 1]), None);
        assert_eq!(sid_len([1, 16]), None);
    }
}
