//! The verifier: every kind of contract violation is caught and reported as a typed `Violation`.
// UNSAFETY: this test drives the KMCL ABI directly (raw table calls and `extern` callbacks).
#![allow(unsafe_code)]

mod support;

use std::ffi::c_void;
use std::ptr;
use std::sync::atomic::Ordering;

use kmcl::NtStatus;
use kmcl_sim::{self as sim, Irql, Kmcl, SimConfig, ViolationKind};
use kmcl_sys::*;
use support::*;

/// The kinds of the violations taken from `kmcl`.
fn kinds(kmcl: &Kmcl) -> Vec<ViolationKind> {
    kmcl.take_violations().into_iter().map(|v| v.kind).collect()
}

fn garbage<T>(address: usize) -> *mut T {
    ptr::without_provenance_mut(address)
}

#[test]
fn invalid_handles_and_wrong_types() {
    let kmcl = Kmcl::default();
    kcall!(Client.VmbChannelStart, ptr::null_mut());
    kcall!(Client.VmbPacketFree, garbage(0x1234_5678));
    assert_eq!(
        kinds(&kmcl),
        vec![ViolationKind::InvalidHandle, ViolationKind::InvalidHandle],
        "unattributed violations are collected on the calling thread"
    );
    let d = Driver::new();
    let ch = d.create(&kmcl, 1);
    let p = d.packet(1);
    // A packet where a channel is expected, and a channel where a packet is.
    kcall!(Client.VmbChannelStart, p.cast());
    kcall!(Client.VmbPacketFree, ch.cast());
    assert_eq!(
        kinds(&kmcl),
        vec![
            ViolationKind::WrongHandleType,
            ViolationKind::WrongHandleType
        ]
    );
    free(p);
    d.cleanup();
    assert_eq!(kmcl.finish(), vec![]);
}

#[test]
fn stale_handles_after_free_cleanup_or_instance_end() {
    let kmcl = Kmcl::default();
    let d = Driver::new();
    let ch = d.create(&kmcl, 2);
    let p = d.packet(1);
    free(p);
    assert!(kcall!(Client.VmbPacketGetPointer, p).is_null());
    d.cleanup();
    assert!(kcall!(Client.VmbChannelGetPointer, ch).is_null());
    assert_eq!(
        kinds(&kmcl),
        vec![ViolationKind::StaleHandle, ViolationKind::StaleHandle]
    );
    assert_eq!(kmcl.finish(), vec![]);
    // The instance is gone: its handles are stale, reported on this thread.
    kcall!(Client.VmbChannelStart, ch);
    let v = sim::take_unattributed_violations();
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].kind, ViolationKind::StaleHandle);
}

#[test]
fn double_completion_of_an_incoming_packet() {
    for mode in [IncomingMode::CompleteTwice, IncomingMode::FailThenComplete] {
        let kmcl = Kmcl::default();
        let (d, g) = running(&kmcl, 3);
        d.behave().incoming = mode;
        g.send_request(b"x").expect("send");
        kmcl.wait_idle();
        assert_eq!(
            kinds(&kmcl),
            vec![ViolationKind::DoubleCompletion],
            "{mode:?}"
        );
        teardown(&kmcl, &d);
        assert_eq!(kmcl.finish(), vec![]);
    }
}

#[test]
fn double_free_and_packets_in_flight() {
    let kmcl = Kmcl::default();
    let (d, g) = running(&kmcl, 4);
    let p = d.packet(1);
    free(p);
    free(p);
    assert_eq!(kinds(&kmcl), vec![ViolationKind::DoubleFree]);
    let p = d.post(2, b"x");
    free(p); // in flight: the library owns it
    assert_eq!(d.send(p, b"again"), NtStatus::INVALID_DEVICE_STATE);
    kcall!(Client.VmbPacketSetCompletionRoutine, p, None);
    assert_eq!(
        kinds(&kmcl),
        vec![
            ViolationKind::PacketInFlight,
            ViolationKind::PacketInFlight,
            ViolationKind::PacketModifiedInFlight
        ]
    );
    kmcl.wait_idle();
    let got = g.receive().expect("packet");
    g.complete(got.txid.expect("txid"), b"").expect("complete");
    kmcl.wait_idle();
    assert_eq!(d.completions().len(), 1, "the routine was not changed");
    teardown(&kmcl, &d);
    assert_eq!(kmcl.finish(), vec![]);
}

#[test]
fn calls_in_the_wrong_state() {
    let kmcl = Kmcl::default();
    let d = Driver::new();
    let ch = d.create(&kmcl, 5);
    d.start(); // before Enable
    let p = d.packet(1);
    assert_eq!(d.send(p, b"x"), NtStatus::INVALID_DEVICE_STATE); // disabled channel
    assert_eq!(
        kinds(&kmcl),
        vec![ViolationKind::WrongState, ViolationKind::WrongState]
    );
    assert_eq!(d.enable(), NtStatus::SUCCESS);
    assert_eq!(d.enable(), NtStatus::INVALID_DEVICE_STATE);
    assert_eq!(
        kcall!(Client.VmbChannelInitSetMaximumPacketSize, ch, 512),
        NtStatus::INVALID_PARAMETER_1,
        "Init* only while disabled"
    );
    kcall!(Client.VmbChannelSetIncomingProcessingAtPassive, ch, 1);
    d.cleanup(); // still enabled
    assert_eq!(
        kinds(&kmcl),
        vec![ViolationKind::WrongState; 4],
        "enable twice, init after enable, passive after enable, cleanup while enabled"
    );
    assert!(kmcl.channel_info(ch).is_some(), "cleanup refused");
    free(p);
    d.disable();
    d.cleanup();
    assert_eq!(kmcl.finish(), vec![]);
}

#[test]
fn calls_at_the_wrong_irql() {
    let kmcl = Kmcl::default();
    {
        let _dispatch = sim::raise_irql(Irql::Dispatch);
        assert_eq!(sim::current_irql(), Irql::Dispatch);
        let mut ch: VMBCHANNEL = ptr::null_mut();
        let status = kcall!(Client.VmbChannelAllocate, kmcl.device_object(), 1, &mut ch);
        assert_eq!(status, NtStatus::INVALID_DEVICE_STATE);
    }
    assert_eq!(kinds(&kmcl), vec![ViolationKind::WrongIrql]);
    // Pause from a completion routine (DISPATCH_LEVEL).
    let (d, g) = running(&kmcl, 6);
    d.behave().misuse = Misuse::PauseInCompletion;
    d.post(1, b"x");
    kmcl.wait_idle();
    let got = g.receive().expect("packet");
    g.complete(got.txid.expect("txid"), b"").expect("complete");
    kmcl.wait_idle();
    assert_eq!(kinds(&kmcl), vec![ViolationKind::WrongIrql]);
    assert!(
        kmcl.channel_info(d.ch()).expect("info").running,
        "no effect"
    );
    teardown(&kmcl, &d);
    assert_eq!(kmcl.finish(), vec![]);
}

#[test]
fn start_and_pause_inside_state_change_callbacks() {
    let kmcl = Kmcl::default();
    let d = Driver::new();
    d.create(&kmcl, 7);
    d.behave().misuse = Misuse::PauseInOpened;
    let g = sim::Guest::new(TYPE_ID, instance_id(7));
    kmcl.attach_guest(&g).expect("attach");
    assert_eq!(d.enable(), NtStatus::SUCCESS);
    d.start();
    g.open().expect("open");
    kmcl.wait_idle();
    assert_eq!(kinds(&kmcl), vec![ViolationKind::CalledFromCallback]);
    d.behave().misuse = Misuse::StartInStarted;
    d.pause();
    d.start();
    kmcl.wait_idle();
    assert_eq!(kinds(&kmcl), vec![ViolationKind::CalledFromCallback]);
    d.behave().misuse = Misuse::None;
    teardown(&kmcl, &d);
    assert_eq!(kmcl.finish(), vec![]);
}

#[test]
fn invalid_arguments() {
    let kmcl = Kmcl::default();
    let d = Driver::new();
    let ch = d.create(&kmcl, 8);
    assert_eq!(
        kcall!(Client.VmbChannelInitSetMaximumPacketSize, ch, 0),
        NtStatus::INVALID_PARAMETER_2
    );
    let mut callbacks = VMB_CHANNEL_STATE_CHANGE_CALLBACKS {
        Version: 2,
        Size: 48,
        EvtChannelOpened: None,
        EvtChannelClosed: None,
        EvtChannelSuspend: None,
        EvtChannelStarted: None,
        EvtChannelPostStarted: None,
    };
    assert_eq!(
        kcall!(
            Client.VmbChannelInitSetStateChangeCallbacks,
            ch,
            &mut callbacks
        ),
        NtStatus::INVALID_PARAMETER_2
    );
    assert_eq!(
        kcall!(Server.VmbServerChannelInitSetFlags, ch, 0x100),
        NtStatus::INVALID_PARAMETER_2
    );
    assert_eq!(
        kcall!(
            Client.VmbChannelAllocate,
            kmcl.device_object(),
            1,
            ptr::null_mut()
        ),
        NtStatus::INVALID_PARAMETER_3
    );
    assert_eq!(kinds(&kmcl), vec![ViolationKind::InvalidArgument; 4]);
    teardown(&kmcl, &d);
    let (d, _g) = running(&kmcl, 9);
    let p = d.packet(1);
    assert_eq!(send_flags(p, b"x", 0x80), NtStatus::INVALID_PARAMETER);
    let status = kcall!(
        Client.VmbPacketSend,
        p,
        ptr::null_mut(),
        4,
        ptr::null_mut(),
        VMBUS_CHANNEL_FORMAT_FLAG_WAIT_FOR_COMPLETION
    );
    assert_eq!(status, NtStatus::INVALID_PARAMETER_2);
    // The host may not wait in VmbChannelSendSynchronousRequest.
    let status = kcall!(
        Client.VmbChannelSendSynchronousRequest,
        d.ch(),
        b"x".as_ptr().cast_mut().cast::<c_void>(),
        1,
        ptr::null_mut(),
        VMBUS_CHANNEL_FORMAT_FLAG_WAIT_FOR_COMPLETION,
        ptr::null_mut(),
        ptr::null_mut(),
        ptr::null_mut()
    );
    assert_eq!(status, NtStatus::NOT_SUPPORTED);
    assert_eq!(kinds(&kmcl), vec![ViolationKind::InvalidArgument; 3]);
    free(p);
    teardown(&kmcl, &d);
    assert_eq!(kmcl.finish(), vec![]);
}

#[test]
fn packet_larger_than_the_maximum() {
    let kmcl = Kmcl::default();
    let (d, _g) = running(&kmcl, 10);
    let p = d.packet(1);
    assert_eq!(d.send(p, &[0; 257]), NtStatus::INVALID_PARAMETER);
    assert_eq!(kinds(&kmcl), vec![ViolationKind::PacketTooLarge]);
    assert_eq!(d.send(p, &[0; 256]), NtStatus::SUCCESS);
    teardown(&kmcl, &d);
    assert_eq!(kmcl.finish(), vec![]);
}

#[test]
fn send_after_suspend() {
    let kmcl = Kmcl::default();
    let (d, g) = running(&kmcl, 11);
    d.pause();
    // One send per thread may cross the suspend (it was under way): refused, not a violation.
    let p = d.packet(1);
    assert_eq!(d.send(p, b"late"), NtStatus::INVALID_DEVICE_STATE);
    assert_eq!(kinds(&kmcl), vec![]);
    // A second one from the same thread was started after the suspend: the violation.
    assert_eq!(d.send(p, b"later"), NtStatus::INVALID_DEVICE_STATE);
    assert_eq!(kinds(&kmcl), vec![ViolationKind::SendWhileSuspended]);
    // Nothing was queued; after a start, sends work again.
    d.start();
    kmcl.wait_idle();
    assert_eq!(g.ring_len(), 0);
    assert_eq!(d.send(p, b"again"), NtStatus::SUCCESS);
    kmcl.wait_idle();
    assert_eq!(g.ring_len(), 1);
    teardown(&kmcl, &d);
    assert_eq!(kmcl.finish(), vec![]);
}

#[test]
fn defer_to_passive_outside_the_callback() {
    let kmcl = Kmcl::default();
    let (d, g) = running(&kmcl, 12);
    d.behave().incoming = IncomingMode::Hold;
    g.send_request(b"x").expect("send");
    kmcl.wait_idle();
    let pc = d.held.lock().expect("held").first().copied().expect("held");
    kcall!(Client.VmbChannelPacketDeferToPassive, garbage(pc));
    assert_eq!(kinds(&kmcl), vec![ViolationKind::DeferNotInline]);
    teardown(&kmcl, &d);
    assert_eq!(kmcl.finish(), vec![]);
}

#[test]
fn leaks_at_cleanup_and_finish() {
    let kmcl = Kmcl::default();
    let table = query(&kmcl);
    let d = Driver::new();
    d.create(&kmcl, 13);
    d.packet(1);
    d.cleanup();
    assert_eq!(kinds(&kmcl), vec![ViolationKind::PacketLeaked]);
    let d2 = Driver::new();
    d2.create(&kmcl, 14);
    let v: Vec<ViolationKind> = kmcl.finish().into_iter().map(|v| v.kind).collect();
    assert_eq!(
        v,
        vec![ViolationKind::ChannelLeaked, ViolationKind::InterfaceLeaked]
    );
    let _ = table;
}

#[test]
fn interface_released_too_often() {
    let kmcl = Kmcl::default();
    let table = query(&kmcl);
    release(&table);
    release(&table);
    assert_eq!(kmcl.interface_references(), 0);
    assert_eq!(kinds(&kmcl), vec![ViolationKind::InterfaceOverReleased]);
    assert_eq!(kmcl.finish(), vec![]);
}

#[test]
#[should_panic(expected = "unreported KMCL contract violation")]
fn dropping_the_simulator_with_unreported_violations_panics() {
    let kmcl = Kmcl::default();
    let _table = query(&kmcl);
    drop(kmcl);
}

/// Saves a channel with one packet in flight using `mode`; returns the save result.
fn save_with(kmcl: &Kmcl, mode: SaveMode) -> Result<Vec<Vec<u8>>, NtStatus> {
    let (d, _g) = running(kmcl, 15);
    d.post(1, b"x");
    kmcl.wait_idle();
    d.pause();
    d.behave().save = mode;
    let result = d.save(4096);
    teardown(kmcl, &d);
    result
}

#[test]
fn save_callback_protocol_violations() {
    for (mode, fails) in [
        (SaveMode::ProbeSuccessWithSize, false),
        (SaveMode::ProbeFailNoSize, true),
        (SaveMode::SecondFails, true),
    ] {
        let kmcl = Kmcl::default();
        assert_eq!(save_with(&kmcl, mode).is_err(), fails, "{mode:?}");
        assert_eq!(
            kinds(&kmcl),
            vec![ViolationKind::SaveCallbackProtocol],
            "{mode:?}"
        );
        assert_eq!(kmcl.finish(), vec![]);
    }
    // Nothing to save is fine; so is writing the whole `_Out_writes_bytes_(SaveBufSize)` buffer
    // (only the BytesNeeded bytes are kept).
    for mode in [SaveMode::Nothing, SaveMode::WritePast] {
        let kmcl = Kmcl::default();
        assert!(save_with(&kmcl, mode).is_ok(), "{mode:?}");
        assert_eq!(kmcl.finish(), vec![], "{mode:?}");
    }
}

#[test]
fn save_calls_out_of_sequence() {
    let kmcl = Kmcl::default();
    let (d, _g) = running(&kmcl, 16);
    d.pause();
    let ch = d.ch();
    let mut buf = vec![0u8; 4096];
    let (mut filled, mut required) = (0u32, 0u32);
    let mut cont = || {
        kcall!(
            Server.VmbChannelSaveContinue,
            ch,
            buf.as_mut_ptr().cast::<c_void>(),
            4096,
            &mut filled,
            &mut required
        )
    };
    assert_eq!(cont(), NtStatus::INVALID_DEVICE_STATE); // no Begin
    kcall!(Server.VmbChannelSaveEnd, ch); // no Begin
    assert_eq!(kcall!(Server.VmbChannelSaveBegin, ch), NtStatus::SUCCESS);
    assert_eq!(
        kcall!(Server.VmbChannelSaveBegin, ch),
        NtStatus::INVALID_DEVICE_STATE
    );
    assert_eq!(cont(), NtStatus::SUCCESS);
    assert_eq!(cont(), NtStatus::INVALID_DEVICE_STATE); // after the last chunk
    kcall!(Server.VmbChannelSaveEnd, ch);
    assert_eq!(kinds(&kmcl), vec![ViolationKind::SaveSequence; 4]);
    teardown(&kmcl, &d);
    assert_eq!(kmcl.finish(), vec![]);
}

/// Chunks of a saved channel with two packets in flight.
fn two_packet_blob() -> Vec<Vec<u8>> {
    let kmcl = Kmcl::default();
    let (d, _g) = running(&kmcl, 17);
    d.post(1, b"a");
    d.post(2, b"b");
    kmcl.wait_idle();
    d.pause();
    let chunks = d.save(4096).expect("save");
    teardown(&kmcl, &d);
    assert_eq!(kmcl.finish(), vec![]);
    chunks
}

fn restore_with(mode: RestoreMode) -> (Kmcl, std::sync::Arc<Driver>, NtStatus) {
    let chunks = two_packet_blob();
    let kmcl = Kmcl::default();
    let d = Driver::new();
    d.create(&kmcl, 17);
    d.behave().restore = mode;
    let status = d.restore(&chunks);
    (kmcl, d, status)
}

#[test]
fn restore_callback_success_without_packet_restore() {
    let (kmcl, d, status) = restore_with(RestoreMode::SuccessWithoutRestore);
    assert_eq!(status, NtStatus::SUCCESS);
    assert_eq!(
        kinds(&kmcl),
        vec![ViolationKind::RestoreWithoutPacketRestore; 2]
    );
    d.cleanup();
    assert_eq!(kmcl.finish(), vec![]);
}

#[test]
fn restore_callback_failure_after_packet_restore() {
    let (kmcl, d, status) = restore_with(RestoreMode::FailAfterRestore);
    assert_eq!(status, NtStatus::DATA_ERROR);
    assert_eq!(
        kinds(&kmcl),
        vec![ViolationKind::RestoreFailedAfterPacketRestore]
    );
    // That packet is the library's now: freeing it is a violation; teardown cancels it.
    let p: VMBPACKET = garbage(d.spare_packet.load(Ordering::SeqCst));
    free(p);
    assert_eq!(kinds(&kmcl), vec![ViolationKind::PacketInFlight]);
    d.disable();
    assert_eq!(d.completions().len(), 1);
    assert_eq!(d.completions()[0].1, NtStatus::CANCELLED);
    d.cleanup();
    assert_eq!(kmcl.finish(), vec![]);
}

#[test]
fn packet_restore_misuse() {
    for mode in [RestoreMode::WrongLibBuf, RestoreMode::RestoreTwice] {
        let (kmcl, d, _status) = restore_with(mode);
        let v = kinds(&kmcl);
        assert!(
            v.contains(&ViolationKind::PacketRestoreMisuse),
            "{mode:?}: {v:?}"
        );
        d.disable();
        d.cleanup();
        let _ = kmcl.finish();
    }
    // Outside a restore callback.
    let kmcl = Kmcl::default();
    let d = Driver::new();
    d.create(&kmcl, 18);
    let p = d.packet(1);
    let mut lib = [0u8; 16];
    let status = kcall!(
        Server.VmbPacketRestore,
        p,
        lib.as_mut_ptr().cast::<c_void>(),
        16
    );
    assert_eq!(status, NtStatus::INVALID_DEVICE_STATE);
    assert_eq!(kinds(&kmcl), vec![ViolationKind::PacketRestoreMisuse]);
    free(p);
    d.cleanup();
    assert_eq!(kmcl.finish(), vec![]);
}

#[test]
fn driver_that_never_completes_incoming_packets_hangs_pause() {
    let kmcl = Kmcl::new(SimConfig {
        hang_timeout: std::time::Duration::from_millis(300),
        ..SimConfig::default()
    });
    let (d, g) = running(&kmcl, 19);
    {
        let mut b = d.behave();
        b.incoming = IncomingMode::Hold;
        b.complete_held_in_suspend = false;
    }
    g.send_request(b"x").expect("send");
    kmcl.wait_idle();
    d.pause();
    for pc in std::mem::take(&mut *d.held.lock().expect("held")) {
        complete(pc, b"");
    }
    assert!(kmcl.try_wait_idle(std::time::Duration::from_secs(10)));
    let v = kinds(&kmcl);
    assert!(v.contains(&ViolationKind::Hang), "{v:?}");
    d.disable();
    d.cleanup();
    assert_eq!(kmcl.finish(), vec![]);
}

#[test]
fn unmodelled_and_client_only_slots() {
    let kmcl = Kmcl::default();
    let d = Driver::new();
    let ch = d.create(&kmcl, 20);
    let mut mdl: PMDL = ptr::null_mut();
    assert_eq!(
        kcall!(Server.VmbChannelMapGpadl, ch, 0, 1, &mut mdl),
        NtStatus::NOT_SUPPORTED
    );
    assert_eq!(kcall!(Client.VmbChannelSizeofPacket, ch), 0);
    let mut kernel: HANDLE = ptr::null_mut();
    assert_eq!(
        kcall!(
            Server.VmbConvertVmbusHandleToKernelHandle,
            ptr::null_mut(),
            &mut kernel
        ),
        NtStatus::NOT_SUPPORTED
    );
    assert_eq!(kinds(&kmcl), vec![ViolationKind::Unmodelled; 3]);
    assert_eq!(
        kcall!(Client.VmbClientChannelInitSetRingBufferPageCount, ch, 4, 4),
        NtStatus::NOT_SUPPORTED
    );
    let mut client: VMBCHANNEL = ptr::null_mut();
    assert_eq!(
        kcall!(
            Client.VmbChannelAllocate,
            kmcl.device_object(),
            0,
            &mut client
        ),
        NtStatus::NOT_SUPPORTED
    );
    assert_eq!(kinds(&kmcl), vec![ViolationKind::ClientOnly; 2]);
    d.cleanup();
    assert_eq!(kmcl.finish(), vec![]);
}
