//! The format flags of `VmbPacketSend` in the simulator: the full public mask
//! (`VMBUS_CHANNEL_FORMAT_FLAGS` = 0x1F from SDK 10.0.18362, docs/kmcl-bindings.md) and what the
//! simulator accepts (docs/simulator.md, "Format flags"): `WAIT_FOR_COMPLETION` and
//! `PAGED_BUFFER` on an inline buffer; the MDL flags (`FORCE_MDL_LENGTH`, `DATA_IN_ONLY`,
//! `DATA_OUT_ONLY`) are refused on a send without an MDL, and so is every bit outside the mask.
// UNSAFETY: this test drives the KMCL ABI directly (raw table calls and `extern` callbacks).
#![allow(unsafe_code)]

mod support;

use std::ffi::c_void;
use std::ptr;

use kmcl::NtStatus;
use kmcl_sim::{Kmcl, ViolationKind};
use kmcl_sys::*;
use support::*;

#[test]
fn the_mask_is_the_or_of_the_five_public_flags() {
    assert_eq!(VMBUS_CHANNEL_FORMAT_FLAG_DATA_IN_ONLY, 0x8);
    assert_eq!(VMBUS_CHANNEL_FORMAT_FLAG_DATA_OUT_ONLY, 0x10);
    assert_eq!(VMBUS_CHANNEL_FORMAT_FLAGS, 0x1F);
}

#[test]
fn inline_sends_accept_the_inline_flags_only() {
    let kmcl = Kmcl::default();
    let (d, _guest) = running(&kmcl, 21);

    // Accepted: no flag, and PAGED_BUFFER at PASSIVE_LEVEL (the test thread).
    for flags in [0, VMBUS_CHANNEL_FORMAT_FLAG_PAGED_BUFFER] {
        let p = d.packet(1);
        assert_eq!(
            send_flags(p, b"ok", flags),
            NtStatus::SUCCESS,
            "flags {flags:#x}"
        );
    }
    assert!(kmcl.take_violations().is_empty());

    // Refused: each MDL flag without an MDL, both direction flags together, and the first bit
    // above the mask. Each refusal is one InvalidArgument violation.
    let refused = [
        VMBUS_CHANNEL_FORMAT_FLAG_FORCE_MDL_LENGTH,
        VMBUS_CHANNEL_FORMAT_FLAG_DATA_IN_ONLY,
        VMBUS_CHANNEL_FORMAT_FLAG_DATA_OUT_ONLY,
        VMBUS_CHANNEL_FORMAT_FLAG_DATA_IN_ONLY | VMBUS_CHANNEL_FORMAT_FLAG_DATA_OUT_ONLY,
        VMBUS_CHANNEL_FORMAT_FLAGS + 1,
    ];
    for flags in refused {
        let p = d.packet(2);
        assert_eq!(
            send_flags(p, b"no", flags),
            NtStatus::INVALID_PARAMETER,
            "flags {flags:#x}"
        );
        free(p);
    }
    let kinds: Vec<ViolationKind> = kmcl.take_violations().iter().map(|v| v.kind).collect();
    assert_eq!(kinds, vec![ViolationKind::InvalidArgument; refused.len()]);

    // The same rule on the synchronous-request path (no MDL there either), called with the only
    // form the host may use: a zero timeout and no WAIT_FOR_COMPLETION.
    let mut zero_timeout: i64 = 0;
    let status = kcall!(
        Client.VmbChannelSendSynchronousRequest,
        d.ch(),
        b"x".as_ptr().cast_mut().cast::<c_void>(),
        1,
        ptr::null_mut(),
        VMBUS_CHANNEL_FORMAT_FLAG_DATA_OUT_ONLY,
        ptr::null_mut(),
        ptr::null_mut(),
        &raw mut zero_timeout
    );
    assert_eq!(status, NtStatus::INVALID_PARAMETER);
    let kinds: Vec<ViolationKind> = kmcl.take_violations().iter().map(|v| v.kind).collect();
    assert_eq!(kinds, vec![ViolationKind::InvalidArgument]);

    teardown(&kmcl, &d);
}
