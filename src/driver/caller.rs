//! The caller class of a control handle (docs/control.md §10), read from the opener's token when
//! the handle is created. The decision itself is platform-neutral
//! ([`CallerClass::classify`](crate::vsp::control::CallerClass::classify)); this module only reads
//! the facts out of the create request: the requestor mode, and the token's user SID and enabled
//! group SIDs.
//!
//! The token is the one the I/O manager evaluated for the open: the create request's
//! `IO_SECURITY_CONTEXT.AccessState->SubjectSecurityContext` (`WDF_REQUEST_PARAMETERS.Parameters
//! .Create.SecurityContext`), whose effective token is the client (impersonation) token if there
//! is one, else the primary token (`SeQuerySubjectContextToken` in wdm.h). It is locked with
//! `SeLockSubjectContext` while `SeQueryInformationToken` copies the user and the groups into paged
//! pool, which is freed with `ExFreePool` (the SeQueryInformationToken DDI page). PASSIVE_LEVEL
//! (EvtDeviceFileCreate runs at PASSIVE_LEVEL).

use core::ffi::c_void;
use core::ptr;

use wdk_sys::ntddk::{
    ExFreePool, SeLockSubjectContext, SeQueryInformationToken, SeUnlockSubjectContext,
};
use wdk_sys::{
    _TOKEN_INFORMATION_CLASS, _WDF_REQUEST_TYPE, KPROCESSOR_MODE, PACCESS_TOKEN, PSID, ULONG,
    USHORT, WDF_REQUEST_PARAMETERS, WDFREQUEST, call_unsafe_wdf_function_binding,
};

use super::wdf_size;
use crate::vsp::control::CallerClass;
use crate::vsp::control::access::sid_len;

/// `KernelMode` of `KPROCESSOR_MODE` (wdm.h `MODE`).
const KERNEL_MODE: KPROCESSOR_MODE = 0;

/// `SE_GROUP_ENABLED` (`SID_AND_ATTRIBUTES.Attributes`, TOKEN_GROUPS documentation): the group is
/// enabled for access checks. Deny-only and disabled groups do not have it and never count.
const SE_GROUP_ENABLED: ULONG = 0x0000_0004;

/// Most groups looked at in one token; a token with more is classified on the first ones only
/// (the Virtual Machines and Administrators groups are ordinary groups among them).
const MAX_GROUPS: usize = 1024;

/// The class of the principal opening the control device with `request` (a create request), or
/// `None` if it falls in no class (the open is refused).
pub(super) fn class_of_create(request: WDFREQUEST) -> Option<CallerClass> {
    // SAFETY: `request` is the create request EvtDeviceFileCreate was given.
    let mode = unsafe { call_unsafe_wdf_function_binding!(WdfRequestGetRequestorMode, request) };
    if mode == KERNEL_MODE {
        return CallerClass::classify(true, &[], core::iter::empty());
    }
    let mut params = WDF_REQUEST_PARAMETERS {
        Size: wdf_size::<WDF_REQUEST_PARAMETERS>() as USHORT,
        ..WDF_REQUEST_PARAMETERS::default()
    };
    // SAFETY: `request` is this callback's; `params` is a valid local of the declared size.
    unsafe { call_unsafe_wdf_function_binding!(WdfRequestGetParameters, request, &raw mut params) };
    if params.Type != _WDF_REQUEST_TYPE::WdfRequestTypeCreate {
        return None;
    }
    // SAFETY: `Type` says `Create` is the member the framework filled in.
    let security = unsafe { params.Parameters.Create.SecurityContext };
    if security.is_null() {
        return None;
    }
    // SAFETY: the I/O manager's IO_SECURITY_CONTEXT of this create IRP, valid while the request is
    // being processed; read by value.
    let access_state = unsafe { (*security).AccessState };
    if access_state.is_null() {
        return None;
    }
    // SAFETY: the create's ACCESS_STATE lives as long as the IRP; its SubjectSecurityContext is
    // the field SeLockSubjectContext and SeUnlockSubjectContext take.
    let subject = unsafe { &raw mut (*access_state).SubjectSecurityContext };
    // SAFETY: `subject` is a captured subject context (the I/O manager captured it for the open);
    // locked here and unlocked below on every path.
    unsafe { SeLockSubjectContext(subject) };
    // SAFETY: `subject` is valid and locked; the context is copied out (four plain fields).
    let context = unsafe { subject.read() };
    let token = if context.ClientToken.is_null() {
        context.PrimaryToken
    } else {
        context.ClientToken
    };
    let class = if token.is_null() {
        None
    } else {
        class_of_token(token)
    };
    // SAFETY: locked above.
    unsafe { SeUnlockSubjectContext(subject) };
    class
}

/// Classifies a locked, referenced token by its user SID and enabled group SIDs.
fn class_of_token(token: PACCESS_TOKEN) -> Option<CallerClass> {
    let user = TokenInfo::query(token, _TOKEN_INFORMATION_CLASS::TokenUser)?;
    let groups = TokenInfo::query(token, _TOKEN_INFORMATION_CLASS::TokenGroups)?;
    // SAFETY: a TokenUser query returns a TOKEN_USER (SeQueryInformationToken DDI page).
    let user_sid = unsafe { (*user.0.cast::<wdk_sys::TOKEN_USER>()).User.Sid };
    // SAFETY: a SID inside the TOKEN_USER buffer, alive until `user` drops.
    let user_bytes = unsafe { sid_bytes(user_sid) }?;
    let groups_ptr = groups.0.cast::<wdk_sys::TOKEN_GROUPS>();
    // SAFETY: a TokenGroups query returns a TOKEN_GROUPS; GroupCount is read by value.
    let count = unsafe { (*groups_ptr).GroupCount } as usize;
    // SAFETY: `Groups` is the first of `GroupCount` SID_AND_ATTRIBUTES entries of the buffer
    // (ANYSIZE_ARRAY); the pointer is derived from the whole buffer, not from the one-element
    // array type.
    let first = unsafe { (&raw const (*groups_ptr).Groups).cast::<wdk_sys::SID_AND_ATTRIBUTES>() };
    let enabled = (0..count.min(MAX_GROUPS)).filter_map(|index| {
        // SAFETY: `index < GroupCount`: inside the TOKEN_GROUPS buffer, alive until `groups`
        // drops (after the classification below); read by value.
        let entry = unsafe { first.wrapping_add(index).read() };
        if entry.Attributes & SE_GROUP_ENABLED == 0 {
            return None;
        }
        // SAFETY: a SID inside the TOKEN_GROUPS buffer, alive until `groups` drops.
        unsafe { sid_bytes(entry.Sid) }
    });
    CallerClass::classify(false, user_bytes, enabled)
}

/// A buffer returned by `SeQueryInformationToken`, freed with `ExFreePool` on drop.
struct TokenInfo(*mut c_void);

impl TokenInfo {
    fn query(token: PACCESS_TOKEN, class: wdk_sys::TOKEN_INFORMATION_CLASS) -> Option<Self> {
        let mut buffer: *mut c_void = ptr::null_mut();
        // SAFETY: `token` is locked and referenced by the subject context; `buffer` is a valid
        // out-parameter; PASSIVE_LEVEL.
        let status = unsafe { SeQueryInformationToken(token, class, &raw mut buffer) };
        (wdk::nt_success(status) && !buffer.is_null()).then_some(Self(buffer))
    }
}

impl Drop for TokenInfo {
    fn drop(&mut self) {
        // SAFETY: allocated by SeQueryInformationToken, which says the caller frees it with
        // ExFreePool; freed exactly once, here.
        unsafe { ExFreePool(self.0) };
    }
}

/// The bytes of a binary SID, `8 + 4 * SubAuthorityCount` long; `None` for NULL or a malformed
/// header.
///
/// # Safety
/// `sid` is NULL or points to a SID that stays valid for `'a`.
unsafe fn sid_bytes<'a>(sid: PSID) -> Option<&'a [u8]> {
    if sid.is_null() {
        return None;
    }
    let base = sid.cast::<u8>().cast_const();
    // SAFETY: a SID starts with its revision byte ...
    let revision = unsafe { base.read() };
    // SAFETY: ... followed by its sub-authority count byte.
    let count = unsafe { base.wrapping_add(1).read() };
    let header = [revision, count];
    let len = sid_len(header)?;
    // SAFETY: a well-formed SID is exactly `len` bytes (header checked above), valid for 'a.
    Some(unsafe { core::slice::from_raw_parts(base, len) })
}
