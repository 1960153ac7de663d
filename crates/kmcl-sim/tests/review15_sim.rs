//! review15: adversarial checks of the simulator's save sequence.
// UNSAFETY: this test drives the KMCL ABI directly (raw table calls and `extern` callbacks).
#![allow(unsafe_code)]

mod support;

use kmcl_sim::{Kmcl, ViolationKind};
use support::*;

/// A driver that ends and begins the save from inside its save-packet callback, i.e. while its own
/// `VmbChannelSaveContinue` is still running. `save_end` does not look at `SaveCtx::busy`, so the
/// simulator records nothing; the outer SaveContinue then finishes the unit it started into the
/// *new* save (`finish_packet_unit` on the new, empty `SaveCtx::unit`: 8 stray driver bytes before
/// the Begin unit, `End { packets: 2 }` for one packet) and returns STATUS_SUCCESS with a chunk no
/// restore accepts. Before the change the stray unit was a whole packet unit of the old session;
/// either way a contract violation goes unreported and the blob is silently corrupt.
#[test]
fn save_end_and_begin_inside_save_continue_is_reported() {
    let kmcl = Kmcl::default();
    let (d, _g) = running(&kmcl, 61);
    d.post(0x0A0B, b"x");
    kmcl.wait_idle();
    d.pause();
    d.behave().save = SaveMode::RestartSave;
    let result = d.save(4096);
    d.behave().save = SaveMode::Tag;
    teardown(&kmcl, &d);
    let violations = kmcl.finish();
    assert!(
        violations
            .iter()
            .any(|v| v.kind == ViolationKind::SaveSequence),
        "SaveEnd/SaveBegin during a running SaveContinue went unreported; the save returned \
         {result:02x?}; violations: {violations:?}"
    );
}
