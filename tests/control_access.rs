//! The control device's access model (docs/control.md §10, `vmbsrv::vsp::control::access`): who
//! is which caller class, and which class may run which operation. Owner binding (a caller only
//! ever reaches its own channels) is tested in tests/control_e2e.rs.

use vmbsrv::kmcl::NtStatus;
use vmbsrv::kmcl::raw::GUID;
use vmbsrv::vsp::control::access::{
    SID_BUILTIN_ADMINISTRATORS, SID_LOCAL_SYSTEM, SID_VIRTUAL_MACHINES, sid_len,
};
use vmbsrv::vsp::control::wire::{ChannelRequest, CreateChannelRequest, RequestHeader};
use vmbsrv::vsp::control::{CallerClass, ControlOp, authorize};
use zerocopy::IntoBytes;

/// A virtual account of one VM: `S-1-5-83-1-...` (five sub-authorities).
const VM_ACCOUNT: [u8; 28] = [
    1, 5, 0, 0, 0, 0, 0, 5, 83, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
];
/// An ordinary user, `S-1-5-21-1-2-3-1001`.
const USER: [u8; 28] = [
    1, 5, 0, 0, 0, 0, 0, 5, 21, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 0xE9, 3, 0, 0,
];
/// `S-1-1-0`, Everyone.
const EVERYONE: [u8; 12] = [1, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0];
/// `S-1-5-32-545`, `BUILTIN\Users`.
const USERS: [u8; 16] = [1, 2, 0, 0, 0, 0, 0, 5, 32, 0, 0, 0, 0x21, 0x02, 0, 0];

fn classify(kernel: bool, user: &[u8], groups: &[&[u8]]) -> Option<CallerClass> {
    CallerClass::classify(kernel, user, groups.iter().copied())
}

#[test]
fn callers_are_classified_by_requestor_mode_user_and_enabled_groups() {
    // Kernel-mode requestors and LocalSystem are System whatever their groups.
    assert_eq!(classify(true, &USER, &[]), Some(CallerClass::System));
    assert_eq!(
        classify(false, &SID_LOCAL_SYSTEM, &[&EVERYONE]),
        Some(CallerClass::System)
    );
    // A VM worker: its virtual account is in the Virtual Machines group.
    assert_eq!(
        classify(false, &VM_ACCOUNT, &[&EVERYONE, &SID_VIRTUAL_MACHINES]),
        Some(CallerClass::VmWorker)
    );
    // An elevated administrator.
    assert_eq!(
        classify(
            false,
            &USER,
            &[&EVERYONE, &USERS, &SID_BUILTIN_ADMINISTRATORS]
        ),
        Some(CallerClass::Administrator)
    );
    // Both groups: held to the VM worker's rules.
    assert_eq!(
        classify(
            false,
            &USER,
            &[&SID_BUILTIN_ADMINISTRATORS, &SID_VIRTUAL_MACHINES]
        ),
        Some(CallerClass::VmWorker)
    );
    // Nobody else: a plain user, a VM account outside the group, an empty token.
    assert_eq!(classify(false, &USER, &[&EVERYONE, &USERS]), None);
    assert_eq!(classify(false, &VM_ACCOUNT, &[&EVERYONE]), None);
    assert_eq!(classify(false, &[], &[]), None);
    // A SID that only starts like a well-known one is not it.
    assert_eq!(classify(false, &USER, &[&SID_VIRTUAL_MACHINES[..12]]), None);
}

#[test]
fn binary_sids_have_the_documented_lengths() {
    for sid in [
        &SID_LOCAL_SYSTEM[..],
        &SID_BUILTIN_ADMINISTRATORS,
        &SID_VIRTUAL_MACHINES,
    ] {
        assert_eq!(sid_len([sid[0], sid[1]]), Some(sid.len()));
    }
    assert_eq!(
        sid_len([VM_ACCOUNT[0], VM_ACCOUNT[1]]),
        Some(VM_ACCOUNT.len())
    );
}

#[test]
fn the_policy_table() {
    use CallerClass::*;
    for op in ControlOp::ALL.iter().copied() {
        for class in [System, VmWorker, Administrator] {
            for handle in [false, true] {
                let expected = match (op, class) {
                    (ControlOp::CreateChannel, System) => true,
                    (ControlOp::CreateChannel, VmWorker) => handle,
                    (ControlOp::CreateChannel, Administrator) => !handle,
                    _ => true,
                };
                assert_eq!(
                    class.permits(op, handle),
                    expected,
                    "{class:?} {op:?} with handle {handle}"
                );
            }
        }
    }
}

fn create(handle: u64) -> CreateChannelRequest {
    CreateChannelRequest::new(handle, GUID::default(), GUID::default(), 8, 256, 0, 1)
}

#[test]
fn authorize_reads_the_vmbus_handle_of_a_create_request() {
    let create_code = ControlOp::CreateChannel.code();
    let with = create(0x1234);
    let without = create(0);

    assert_eq!(
        authorize(CallerClass::VmWorker, create_code, with.as_bytes()),
        Ok(())
    );
    assert_eq!(
        authorize(CallerClass::VmWorker, create_code, without.as_bytes()),
        Err(NtStatus::ACCESS_DENIED)
    );
    assert_eq!(
        authorize(CallerClass::Administrator, create_code, with.as_bytes()),
        Err(NtStatus::ACCESS_DENIED)
    );
    assert_eq!(
        authorize(CallerClass::Administrator, create_code, without.as_bytes()),
        Ok(())
    );
    assert_eq!(
        authorize(CallerClass::System, create_code, with.as_bytes()),
        Ok(())
    );
    assert_eq!(
        authorize(CallerClass::System, create_code, without.as_bytes()),
        Ok(())
    );

    // Channel operations and QueryInfo are open to every class (the owner binding keeps each
    // caller to its own channels).
    let channel = ChannelRequest::new(7);
    for op in [
        ControlOp::PostMessage,
        ControlOp::DestroyChannel,
        ControlOp::SaveBegin,
    ] {
        for class in [CallerClass::VmWorker, CallerClass::Administrator] {
            assert_eq!(authorize(class, op.code(), channel.as_bytes()), Ok(()));
        }
    }
    let info = RequestHeader::new(8);
    assert_eq!(
        authorize(
            CallerClass::Administrator,
            ControlOp::QueryInfo.code(),
            info.as_bytes()
        ),
        Ok(())
    );

    // Unknown codes and unreadable create requests are left to the dispatcher's own refusal.
    assert_eq!(
        authorize(CallerClass::Administrator, 0x1234_5678, &[]),
        Ok(())
    );
    assert_eq!(
        authorize(CallerClass::VmWorker, create_code, &[0; 3]),
        Ok(())
    );
}
