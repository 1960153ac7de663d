//! Save/restore as KMCL does it: chunked save with the two-call save-packet protocol, chunk-exact
//! restore, live migration of the guest between simulator instances, and the §7 settings.
// UNSAFETY: this test drives the KMCL ABI directly (raw table calls and `extern` callbacks).
#![allow(unsafe_code)]

mod support;

use std::ffi::c_void;

use kmcl::NtStatus;
use kmcl_sim::{
    Guest, GuestChannelState, IncomingAtSave, Kmcl, RestoreSaveBufSize, RestoreTiming,
    RestoredPacketContext, SaveRequires, SimConfig, ViolationKind,
};
use kmcl_sys::*;
use support::*;

/// Source side of a migration: four packets posted (ring of 2: two in the ring, one of them read
/// by the guest and completed while paused, two on the host queue), paused, saved, guest
/// detached, channel torn down. Returns the guest and the chunks.
fn source(config: SimConfig, chunk: u32) -> (Guest, Vec<Vec<u8>>) {
    let kmcl = Kmcl::new(SimConfig {
        ring_capacity: 2,
        ..config
    });
    let (d, g) = running(&kmcl, 20);
    for tag in 1..=4 {
        d.post(tag, format!("m{tag}").as_bytes());
    }
    kmcl.wait_idle();
    let first = g.receive().expect("first packet");
    assert_eq!(first.bytes, b"m1");
    d.pause();
    // Completed while the host is paused: the completion waits in guest memory.
    g.complete(first.txid.expect("txid"), b"ack1")
        .expect("complete");
    kmcl.wait_idle();
    assert_eq!(g.pending_to_host(), 1);
    let chunks = d.save(chunk).expect("save");
    assert_eq!(
        d.events().iter().filter(|e| **e == Ev::SaveProbe).count(),
        4,
        "every packet in flight is presented to the save callback"
    );
    g.detach();
    d.disable();
    // Tearing the source down cancels its packets (the driver frees them).
    let cancelled: Vec<usize> = d
        .completions()
        .into_iter()
        .filter(|(_, s, _)| *s == NtStatus::CANCELLED)
        .map(|(t, _, _)| t)
        .collect();
    assert_eq!(cancelled.len(), 4);
    d.cleanup();
    assert_eq!(kmcl.finish(), vec![]);
    assert_eq!(g.state(), GuestChannelState::Open, "the guest saw nothing");
    (g, chunks)
}

/// Destination side: restore, enable, attach the guest, start.
fn destination(kmcl: &Kmcl, g: &Guest, chunks: &[Vec<u8>]) -> std::sync::Arc<Driver> {
    let d = Driver::new();
    d.create(kmcl, 20);
    assert_eq!(d.restore(chunks), NtStatus::SUCCESS);
    assert_eq!(d.enable(), NtStatus::SUCCESS);
    kmcl.attach_guest(g).expect("attach");
    d.start();
    kmcl.wait_idle();
    d
}

#[test]
fn live_migration_delivers_every_packet_exactly_once() {
    let (g, chunks) = source(SimConfig::default(), 4096);
    assert_eq!(chunks.len(), 1);
    let kmcl = Kmcl::default();
    let d = destination(&kmcl, &g, &chunks);
    let restores: Vec<Vec<u8>> = d
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Ev::Restore { save_buf } => Some(save_buf),
            _ => None,
        })
        .collect();
    let tags: Vec<u64> = restores
        .iter()
        .map(|b| u64::from_le_bytes(b[..8].try_into().expect("8 bytes")))
        .collect();
    assert_eq!(
        tags,
        vec![1, 2, 3, 4],
        "restored in send order, SaveBuf as saved"
    );
    // Attaching an open guest: Opened/Started/PostStarted, the guest sees no close.
    assert_eq!(d.states(), vec![Ev::Opened, Ev::Started, Ev::PostStarted]);
    assert_eq!(g.state(), GuestChannelState::Open);
    // The completion the guest sent while paused reaches the restored packet.
    assert_eq!(
        d.completions(),
        vec![(1, NtStatus::SUCCESS, b"ack1".to_vec())]
    );
    // The packet that was in the ring is still there (guest memory); the host-queued ones are
    // re-sent; nothing is duplicated.
    let got = g.receive_all();
    let bytes: Vec<&[u8]> = got.iter().map(|p| p.bytes.as_slice()).collect();
    assert_eq!(bytes, vec![b"m2".as_slice(), b"m3", b"m4"]);
    for p in &got {
        g.complete(p.txid.expect("txid"), b"ok").expect("complete");
    }
    kmcl.wait_idle();
    let mut done: Vec<usize> = d.completions().into_iter().map(|(t, _, _)| t).collect();
    done.sort_unstable();
    assert_eq!(done, vec![1, 2, 3, 4]);
    assert_eq!(g.ignored_completions(), 0);
    teardown(&kmcl, &d);
    assert_eq!(kmcl.finish(), vec![]);
}

#[test]
fn small_chunks_restore_one_by_one() {
    let (g, chunks) = source(SimConfig::default(), 160);
    assert!(chunks.len() >= 3, "{} chunks", chunks.len());
    let kmcl = Kmcl::default();
    let d = Driver::new();
    d.create(&kmcl, 20);
    for (i, c) in chunks.iter().enumerate() {
        let expected = if i + 1 == chunks.len() {
            NtStatus::SUCCESS
        } else {
            NtStatus::MORE_PROCESSING_REQUIRED
        };
        assert_eq!(restore_chunk(d.ch(), c), expected, "chunk {i}");
    }
    assert_eq!(d.enable(), NtStatus::SUCCESS);
    kmcl.attach_guest(&g).expect("attach");
    d.start();
    kmcl.wait_idle();
    for p in g.receive_all() {
        g.complete(p.txid.expect("txid"), b"").expect("complete");
    }
    kmcl.wait_idle();
    assert_eq!(d.completions().len(), 4);
    teardown(&kmcl, &d);
    assert_eq!(kmcl.finish(), vec![]);
}

#[test]
fn save_continue_too_small_overflow_and_success() {
    let kmcl = Kmcl::default();
    let (d, _g) = running(&kmcl, 21);
    d.post(1, b"x");
    kmcl.wait_idle();
    d.pause();
    let ch = d.ch();
    assert_eq!(kcall!(Server.VmbChannelSaveBegin, ch), NtStatus::SUCCESS);
    let call = |buf: &mut Vec<u8>| {
        let (mut filled, mut required) = (7u32, 7u32);
        let status = kcall!(
            Server.VmbChannelSaveContinue,
            ch,
            buf.as_mut_ptr().cast::<c_void>(),
            buf.len() as u32,
            &mut filled,
            &mut required
        );
        (status, filled, required)
    };
    // Too small for the first unit: nothing written, BytesRequired says how much.
    let mut tiny = vec![0x77u8; 16];
    let (status, filled, required) = call(&mut tiny);
    assert_eq!(status, NtStatus::BUFFER_TOO_SMALL);
    assert_eq!(filled, 0);
    assert!(required > 16);
    assert!(tiny.iter().all(|b| *b == 0x77), "nothing written");
    // Exactly the first unit: a partial chunk, more to come.
    let mut first = vec![0u8; required as usize];
    let (status, filled, _) = call(&mut first);
    assert_eq!((status, filled), (NtStatus::BUFFER_OVERFLOW, required));
    // The packet unit does not fit in the same size: too small again, nothing written.
    let (status, filled, required2) = call(&mut first);
    assert_eq!((status, filled), (NtStatus::BUFFER_TOO_SMALL, 0));
    assert!(required2 > required);
    let mut rest = vec![0u8; 4096];
    let (status, filled, _) = call(&mut rest);
    assert_eq!(status, NtStatus::SUCCESS);
    assert!(filled > 0);
    kcall!(Server.VmbChannelSaveEnd, ch);
    // The probe ran once: a BUFFER_TOO_SMALL does not ask the driver again.
    assert_eq!(
        d.events().iter().filter(|e| **e == Ev::SaveProbe).count(),
        1
    );
    teardown(&kmcl, &d);
    assert_eq!(kmcl.finish(), vec![]);
}

#[test]
fn restore_refuses_damaged_reordered_or_rechunked_input() {
    let (_g, chunks) = source(SimConfig::default(), 160);
    assert!(chunks.len() >= 3);
    let kmcl = Kmcl::default();
    let fresh = || {
        let d = Driver::new();
        d.create(&kmcl, 30);
        d
    };
    let mut cases: Vec<(&str, Vec<Vec<u8>>, NtStatus)> = Vec::new();
    let mut truncated = chunks.clone();
    truncated[0].pop();
    cases.push(("truncated", truncated, NtStatus::INVALID_PARAMETER));
    let mut corrupted = chunks.clone();
    let mid = corrupted[1].len() / 2;
    corrupted[1][mid] ^= 0x01;
    cases.push(("corrupted", corrupted, NtStatus::DATA_ERROR));
    let mut reordered = chunks.clone();
    reordered.swap(1, 2);
    cases.push(("reordered", reordered, NtStatus::INVALID_PARAMETER));
    let rechunked = vec![[chunks[0].clone(), chunks[1].clone()].concat()];
    cases.push(("re-chunked", rechunked, NtStatus::INVALID_PARAMETER));
    cases.push((
        "missing first",
        chunks[1..].to_vec(),
        NtStatus::INVALID_PARAMETER,
    ));
    for (name, input, expected) in cases {
        let d = fresh();
        assert_eq!(d.restore(&input), expected, "{name}");
        // A failed restore leaves the channel unrestorable; the driver tears it down.
        assert_eq!(d.restore(&chunks), NtStatus::INVALID_DEVICE_STATE, "{name}");
        let v = kmcl.take_violations();
        assert_eq!(v.len(), 1, "{name}: {v:?}");
        assert_eq!(v[0].kind, ViolationKind::WrongState);
        d.disable();
        d.cleanup();
    }
    // A truncated stream (last chunk missing) leaves the restore incomplete: Enable refuses.
    let d = fresh();
    assert_eq!(
        d.restore(&chunks[..chunks.len() - 1]),
        NtStatus::MORE_PROCESSING_REQUIRED
    );
    assert_eq!(d.enable(), NtStatus::INVALID_DEVICE_STATE);
    assert_eq!(kmcl.take_violations()[0].kind, ViolationKind::WrongState);
    // Packets restored so far are in flight: the driver cleans them up through cancellation.
    d.disable();
    d.cleanup();
    assert_eq!(kmcl.finish(), vec![]);
}

#[test]
fn save_requires_a_paused_channel_by_default() {
    let kmcl = Kmcl::default();
    let (d, _g) = running(&kmcl, 22);
    assert_eq!(d.save(4096), Err(NtStatus::INVALID_DEVICE_STATE));
    let v = kmcl.take_violations();
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].kind, ViolationKind::WrongState);
    teardown(&kmcl, &d);
    assert_eq!(kmcl.finish(), vec![]);

    let kmcl = kmcl_with(|c| c.save_requires = SaveRequires::AnyState);
    let (d, _g) = running(&kmcl, 22);
    d.post(1, b"x");
    kmcl.wait_idle();
    assert!(d.save(4096).is_ok());
    teardown(&kmcl, &d);
    assert_eq!(kmcl.finish(), vec![]);
}

#[test]
fn incoming_packets_at_save_refuse_or_are_not_saved() {
    for (setting, expected) in [
        (IncomingAtSave::Refuse, Err(NtStatus::INVALID_DEVICE_STATE)),
        (IncomingAtSave::NotSaved, Ok(())),
    ] {
        let kmcl = kmcl_with(|c| {
            c.save_requires = SaveRequires::AnyState;
            c.incoming_at_save = setting;
        });
        let (d, g) = running(&kmcl, 23);
        d.behave().incoming = IncomingMode::Hold;
        g.send_request(b"pending").expect("send");
        kmcl.wait_idle();
        assert_eq!(d.save(4096).map(|_| ()), expected, "{setting:?}");
        teardown(&kmcl, &d);
        assert_eq!(kmcl.finish(), vec![]);
    }
}

#[test]
fn restore_timing_setting() {
    let (_g, chunks) = source(SimConfig::default(), 4096);
    // Default: before Enable only.
    let kmcl = Kmcl::default();
    let d = Driver::new();
    d.create(&kmcl, 24);
    assert_eq!(d.enable(), NtStatus::SUCCESS);
    assert_eq!(d.restore(&chunks), NtStatus::INVALID_DEVICE_STATE);
    assert_eq!(kmcl.take_violations()[0].kind, ViolationKind::WrongState);
    teardown(&kmcl, &d);
    assert_eq!(kmcl.finish(), vec![]);
    // AfterEnable: refused before — cleanly, nothing changed, so a driver may enable and ask
    // again — and accepted after (before Start).
    let kmcl = kmcl_with(|c| c.restore_timing = RestoreTiming::AfterEnable);
    let d = Driver::new();
    d.create(&kmcl, 24);
    assert_eq!(d.restore(&chunks), NtStatus::INVALID_DEVICE_STATE);
    assert_eq!(kmcl.take_violations(), vec![]);
    assert_eq!(d.enable(), NtStatus::SUCCESS);
    assert_eq!(d.restore(&chunks), NtStatus::SUCCESS);
    teardown(&kmcl, &d);
    assert_eq!(kmcl.finish(), vec![]);
}

#[test]
fn restore_save_buf_size_setting() {
    let (_g, chunks) = source(SimConfig::default(), 4096);
    for (setting, len) in [
        (RestoreSaveBufSize::AsReported, 8usize),
        (RestoreSaveBufSize::PaddedWithZeros, 8 + 32),
    ] {
        let kmcl = kmcl_with(|c| c.restore_save_buf_size = setting);
        let d = Driver::new();
        d.create(&kmcl, 25);
        assert_eq!(d.restore(&chunks), NtStatus::SUCCESS);
        for e in d.events() {
            if let Ev::Restore { save_buf } = e {
                assert_eq!(save_buf.len(), len, "{setting:?}");
                assert!(save_buf[8..].iter().all(|b| *b == 0), "zero padding");
            }
        }
        d.disable();
        d.cleanup();
        assert_eq!(kmcl.finish(), vec![]);
    }
}

#[test]
fn the_save_buffer_is_prefilled_with_garbage() {
    // A driver that writes fewer bytes than it asked for saves 0xCC garbage.
    let kmcl = Kmcl::default();
    let (d, _g) = running(&kmcl, 26);
    d.post(0x0102_0304, b"x");
    kmcl.wait_idle();
    d.pause();
    d.behave().save = SaveMode::WriteShort;
    let chunks = d.save(4096).expect("save");
    teardown(&kmcl, &d);
    assert_eq!(kmcl.finish(), vec![]);
    let kmcl = Kmcl::default();
    let d = Driver::new();
    d.create(&kmcl, 26);
    d.behave().restore = RestoreMode::Fail;
    assert_eq!(d.restore(&chunks), NtStatus::DATA_ERROR);
    let saved = d.events().into_iter().find_map(|e| match e {
        Ev::Restore { save_buf } => Some(save_buf),
        _ => None,
    });
    assert_eq!(saved, Some(vec![4, 3, 2, 1, 0xCC, 0xCC, 0xCC, 0xCC]));
    d.cleanup();
    assert_eq!(kmcl.finish(), vec![]);
}

#[test]
fn unsent_packets_are_saved_only_with_the_setting() {
    for (setting, probes) in [(false, 1usize), (true, 2)] {
        let kmcl = kmcl_with(|c| c.save_unsent_packets = setting);
        let (d, _g) = running(&kmcl, 27);
        d.post(1, b"sent");
        let idle = d.packet(2);
        kmcl.wait_idle();
        d.pause();
        let chunks = d.save(4096).expect("save");
        assert_eq!(
            d.events().iter().filter(|e| **e == Ev::SaveProbe).count(),
            probes
        );
        free(idle);
        teardown(&kmcl, &d);
        assert_eq!(kmcl.finish(), vec![]);
        // The idle packet comes back idle (owned by the driver).
        let kmcl = Kmcl::default();
        let d = Driver::new();
        let ch = d.create(&kmcl, 27);
        assert_eq!(d.restore(&chunks), NtStatus::SUCCESS);
        let info = kmcl.channel_info(ch).expect("info");
        assert_eq!(info.packets_allocated, probes);
        assert_eq!(info.packets_in_flight + info.packets_queued, 1);
        d.disable(); // cancels the in-flight one; the driver frees it
        if setting {
            // Free the idle restored packet: it is the driver's.
            let leftover = kmcl.channel_info(ch).expect("info").packets_allocated;
            assert_eq!(leftover, 1);
        }
        let v = {
            d.cleanup();
            kmcl.finish()
        };
        if setting {
            assert_eq!(v.len(), 1);
            assert_eq!(v[0].kind, ViolationKind::PacketLeaked);
        } else {
            assert_eq!(v, vec![]);
        }
    }
}

#[test]
fn restored_packet_context_setting() {
    let (g, chunks) = source(SimConfig::default(), 4096);
    // Default (keep what was set before VmbPacketRestore): setting the routine again after the
    // restore is allowed while the channel has never run — no completion can race it, and a
    // driver must be able to re-bind under every reading (vmbsrv does).
    let kmcl = Kmcl::default();
    let d = Driver::new();
    d.create(&kmcl, 20);
    d.behave().restore = RestoreMode::SetAfter;
    assert_eq!(d.restore(&chunks), NtStatus::SUCCESS);
    assert_eq!(kmcl.take_violations(), vec![]);
    d.disable();
    d.cleanup();
    kmcl.take_violations();
    drop(kmcl.finish());

    // Reset on restore: what was set before is lost (KMCL's default routine frees the packet, the
    // driver never hears of it) ...
    let kmcl = kmcl_with(|c| c.restored_packet_context = RestoredPacketContext::ResetOnRestore);
    let d = Driver::new();
    d.create(&kmcl, 20);
    assert_eq!(d.restore(&chunks), NtStatus::SUCCESS);
    d.disable();
    assert_eq!(d.completions(), vec![], "routines were reset");
    d.cleanup();
    assert_eq!(kmcl.finish(), vec![]);
    // ... and setting them after restore works.
    let kmcl = kmcl_with(|c| c.restored_packet_context = RestoredPacketContext::ResetOnRestore);
    let d = Driver::new();
    d.create(&kmcl, 20);
    d.behave().restore = RestoreMode::SetAfter;
    assert_eq!(d.restore(&chunks), NtStatus::SUCCESS);
    assert_eq!(d.enable(), NtStatus::SUCCESS);
    kmcl.attach_guest(&g).expect("attach");
    d.start();
    kmcl.wait_idle();
    assert_eq!(
        d.completions(),
        vec![(1, NtStatus::SUCCESS, b"ack1".to_vec())]
    );
    teardown(&kmcl, &d);
    assert_eq!(kmcl.finish(), vec![]);
}

#[test]
fn force_new_channel_rescinds_the_old_instance_and_resends() {
    let (g, chunks) = source(SimConfig::default(), 4096);
    let kmcl = Kmcl::default();
    let d = Driver::new();
    let ch = d.create(&kmcl, 20);
    assert_eq!(
        kcall!(
            Server.VmbServerChannelInitSetFlags,
            ch,
            VMBUS_SERVER_CHANNEL_INIT_FLAG_FORCE_NEW_CHANNEL
        ),
        NtStatus::SUCCESS
    );
    assert_eq!(d.restore(&chunks), NtStatus::SUCCESS);
    assert_eq!(d.enable(), NtStatus::SUCCESS);
    kmcl.attach_guest(&g).expect("attach");
    d.start();
    kmcl.wait_idle();
    assert_eq!(g.state(), GuestChannelState::Rescinded);
    assert_eq!(d.states(), vec![]);
    g.open().expect("open the new offer");
    kmcl.wait_idle();
    let got = g.receive_all();
    let bytes: Vec<&[u8]> = got.iter().map(|p| p.bytes.as_slice()).collect();
    assert_eq!(bytes, vec![b"m1".as_slice(), b"m2", b"m3", b"m4"]);
    for p in &got {
        g.complete(p.txid.expect("txid"), b"").expect("complete");
    }
    kmcl.wait_idle();
    assert_eq!(d.completions().len(), 4);
    teardown(&kmcl, &d);
    assert_eq!(kmcl.finish(), vec![]);
}

#[test]
fn faults_in_save_and_restore_calls() {
    use kmcl_sim::KmclCall;
    let (_g, chunks) = source(SimConfig::default(), 160);
    let kmcl = Kmcl::default();
    let d = Driver::new();
    d.create(&kmcl, 28);
    kmcl.fail_next(
        KmclCall::ChannelRestoreFromBuffer,
        NtStatus::INSUFFICIENT_RESOURCES,
    );
    assert_eq!(
        restore_chunk(d.ch(), &chunks[0]),
        NtStatus::INSUFFICIENT_RESOURCES
    );
    // An injected failure has no effect: the same chunk is accepted next.
    assert_eq!(d.restore(&chunks), NtStatus::SUCCESS);
    kmcl.fail_next(KmclCall::PacketRestore, NtStatus::INSUFFICIENT_RESOURCES);
    d.disable();
    d.cleanup();
    kmcl.clear_faults();
    assert_eq!(kmcl.finish(), vec![]);

    let kmcl = Kmcl::default();
    let (d, _g) = running(&kmcl, 28);
    d.post(1, b"x");
    kmcl.wait_idle();
    d.pause();
    kmcl.fail_next(KmclCall::ChannelSaveBegin, NtStatus::INSUFFICIENT_RESOURCES);
    assert_eq!(d.save(4096), Err(NtStatus::INSUFFICIENT_RESOURCES));
    kmcl.fail_next(
        KmclCall::ChannelSaveContinue,
        NtStatus::INSUFFICIENT_RESOURCES,
    );
    assert_eq!(d.save(4096), Err(NtStatus::INSUFFICIENT_RESOURCES));
    assert!(d.save(4096).is_ok());
    teardown(&kmcl, &d);
    assert_eq!(kmcl.finish(), vec![]);
}
