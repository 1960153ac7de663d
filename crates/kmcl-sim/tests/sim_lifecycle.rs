//! The simulator's documented behaviour: interface query, channel state machine and callback
//! order, incoming and outgoing packets, IRQLs, rings and queues, faults.
// UNSAFETY: this test drives the KMCL ABI directly (raw table calls and `extern` callbacks).
#![allow(unsafe_code)]

mod support;

use std::ptr;

use kmcl::NtStatus;
use kmcl_sim::{
    FaultPlan, Guest, GuestChannelState, GuestError, Irql, Kmcl, KmclCall, Reply,
    SIM_KMCL_SERVER_INTERFACE_TYPE, SIM_KMCL_SERVER_INTERFACE_VERSION,
};
use kmcl_sys::*;
use support::*;

#[test]
fn query_interface_follows_irp_mn_query_interface() {
    let kmcl = Kmcl::default();
    let size = std::mem::size_of::<KMCL_SERVER_INTERFACE_V1>() as u16;
    assert_eq!(size, 0x1D8);
    let wrong = GUID {
        Data1: 1,
        ..SIM_KMCL_SERVER_INTERFACE_TYPE
    };
    assert_eq!(
        kmcl.query_interface(&wrong, size, 1).err(),
        Some(NtStatus::NOT_SUPPORTED)
    );
    assert_eq!(
        kmcl.query_interface(&SIM_KMCL_SERVER_INTERFACE_TYPE, size, 2)
            .err(),
        Some(NtStatus::NOT_SUPPORTED)
    );
    assert_eq!(
        kmcl.query_interface(&SIM_KMCL_SERVER_INTERFACE_TYPE, 0x168, 1)
            .err(),
        Some(NtStatus::BUFFER_TOO_SMALL)
    );
    assert_eq!(kmcl.interface_references(), 0);
    let table = kmcl
        .query_interface(
            &SIM_KMCL_SERVER_INTERFACE_TYPE,
            size + 8,
            SIM_KMCL_SERVER_INTERFACE_VERSION,
        )
        .expect("a larger buffer is fine");
    assert_eq!(table.Client.Interface.Size, size);
    assert_eq!(table.Client.Interface.Version, 1);
    assert_eq!(
        kmcl.interface_references(),
        1,
        "the query takes one reference"
    );
    // Every one of the 55 slots (and both header functions) is filled.
    assert!(!format!("{table:?}").contains("None"));
    let reference = table
        .Client
        .Interface
        .InterfaceReference
        .expect("reference");
    // SAFETY: the simulator's InterfaceReference with the Context the query returned.
    unsafe { reference(table.Client.Interface.Context) };
    assert_eq!(kmcl.interface_references(), 2);
    release(&table);
    release(&table);
    assert_eq!(kmcl.interface_references(), 0);
    assert_eq!(kmcl.finish(), vec![]);
}

#[test]
fn callbacks_fire_in_documented_order() {
    let kmcl = Kmcl::default();
    let table = query(&kmcl);
    let d = Driver::new();
    let ch = d.create(&kmcl, 1);
    let info = kmcl.channel_info(ch).expect("info");
    assert_eq!(info.friendly_name, "Test");
    assert_eq!(info.max_packet_size, 256);
    assert_eq!(info.interface_instance, instance_id(1));
    assert!(!info.enabled);
    let g = Guest::new(TYPE_ID, instance_id(1));
    kmcl.attach_guest(&g).expect("attach");
    assert_eq!(
        g.open(),
        Err(GuestError::NotOffered),
        "not offered before Enable"
    );

    assert_eq!(d.enable(), NtStatus::SUCCESS);
    g.open().expect("open");
    kmcl.wait_idle();
    // Opened when the guest opens after Enable; not started yet.
    assert_eq!(d.states(), vec![Ev::Opened]);
    assert!(g.is_open());
    d.start();
    kmcl.wait_idle();
    assert_eq!(d.states(), vec![Ev::Opened, Ev::Started, Ev::PostStarted]);
    assert!(kmcl.channel_info(ch).expect("info").queue_running);
    // All state-change callbacks ran at PASSIVE.
    assert!(
        d.events_irql()
            .iter()
            .all(|(_, irql)| *irql == Irql::Passive)
    );

    d.clear();
    d.pause();
    assert_eq!(
        d.states(),
        vec![Ev::Suspend],
        "Pause returns after Suspend ran"
    );
    d.start();
    kmcl.wait_idle();
    assert_eq!(d.states(), vec![Ev::Suspend, Ev::Started, Ev::PostStarted]);

    d.clear();
    g.close().expect("close");
    kmcl.wait_idle();
    assert_eq!(d.states(), vec![Ev::Suspend, Ev::Closed]);
    g.open().expect("reopen");
    kmcl.wait_idle();
    assert_eq!(
        d.states(),
        vec![
            Ev::Suspend,
            Ev::Closed,
            Ev::Opened,
            Ev::Started,
            Ev::PostStarted
        ]
    );

    d.clear();
    d.disable();
    assert_eq!(
        d.states(),
        vec![Ev::Suspend, Ev::Closed],
        "Disable waits for both"
    );
    assert_eq!(g.state(), GuestChannelState::Rescinded);
    assert!(!kmcl.channel_info(ch).expect("info").enabled);
    d.cleanup();
    release(&table);
    assert_eq!(kmcl.finish(), vec![]);
}

#[test]
fn start_before_open_and_pause_while_disabled() {
    let kmcl = Kmcl::default();
    let d = Driver::new();
    let ch = d.create(&kmcl, 2);
    // Pause while disabled: auto-paused at Enable (no-op here, no violation).
    d.pause();
    assert_eq!(d.enable(), NtStatus::SUCCESS);
    d.start();
    kmcl.wait_idle();
    assert_eq!(d.states(), vec![], "nothing before the guest opens");
    let g = Guest::new(TYPE_ID, instance_id(2));
    kmcl.attach_guest(&g).expect("attach");
    g.open().expect("open");
    kmcl.wait_idle();
    assert_eq!(d.states(), vec![Ev::Opened, Ev::Started, Ev::PostStarted]);
    assert!(kmcl.channel_info(ch).expect("info").running);
    teardown(&kmcl, &d);
    assert_eq!(kmcl.finish(), vec![]);
}

#[test]
fn opened_failure_rolls_back() {
    let kmcl = Kmcl::default();
    let d = Driver::new();
    let ch = d.create(&kmcl, 3);
    d.behave().opened_status = NtStatus::INSUFFICIENT_RESOURCES;
    assert_eq!(d.enable(), NtStatus::SUCCESS);
    d.start();
    let g = Guest::new(TYPE_ID, instance_id(3));
    kmcl.attach_guest(&g).expect("attach");
    g.open().expect("open");
    kmcl.wait_idle();
    assert_eq!(d.states(), vec![Ev::Opened]);
    assert_eq!(
        g.state(),
        GuestChannelState::OpenFailed(NtStatus::INSUFFICIENT_RESOURCES)
    );
    assert!(!kmcl.channel_info(ch).expect("info").opened);
    assert_eq!(g.send_request(b"x"), Err(GuestError::NotOpen));
    // The guest may try again.
    d.behave().opened_status = NtStatus::SUCCESS;
    g.open().expect("open again");
    kmcl.wait_idle();
    assert_eq!(
        d.states(),
        vec![Ev::Opened, Ev::Opened, Ev::Started, Ev::PostStarted]
    );
    teardown(&kmcl, &d);
    assert_eq!(kmcl.finish(), vec![]);
}

#[test]
fn requests_are_processed_at_dispatch_only_while_started() {
    let kmcl = Kmcl::default();
    let d = Driver::new();
    d.create(&kmcl, 4);
    assert_eq!(d.enable(), NtStatus::SUCCESS);
    let g = Guest::new(TYPE_ID, instance_id(4));
    kmcl.attach_guest(&g).expect("attach");
    g.open().expect("open");
    kmcl.wait_idle();
    // Open but not started: requests wait in the guest's ring.
    let r1 = g.send_request(b"one").expect("send");
    kmcl.wait_idle();
    assert_eq!(g.pending_to_host(), 1);
    assert!(!d.events().iter().any(|e| matches!(e, Ev::Process(_))));
    d.start();
    kmcl.wait_idle();
    assert_eq!(g.take_reply(r1), Some(Reply::Completed(b"re:one".to_vec())));
    let events = d.events_irql();
    let process: Vec<_> = events
        .iter()
        .filter(|(e, _)| matches!(e, Ev::Process(_)))
        .collect();
    assert_eq!(process.len(), 1);
    assert_eq!(process[0].1, Irql::Dispatch);
    // Process only after Started/PostStarted began; batch end reported.
    let names: Vec<_> = d.events();
    let started = names
        .iter()
        .position(|e| *e == Ev::Started)
        .expect("started");
    let processed = names
        .iter()
        .position(|e| matches!(e, Ev::Process(_)))
        .expect("process");
    assert!(started < processed);
    assert!(names.contains(&Ev::BatchDone(1)));
    // Paused: nothing is delivered until the next Start.
    d.pause();
    let r2 = g.send_request(b"two").expect("send");
    kmcl.wait_idle();
    assert_eq!(g.take_reply(r2), None);
    d.start();
    kmcl.wait_idle();
    assert_eq!(g.take_reply(r2), Some(Reply::Completed(b"re:two".to_vec())));
    teardown(&kmcl, &d);
    assert_eq!(kmcl.finish(), vec![]);
}

#[test]
fn incoming_at_passive_when_requested_and_defer_to_passive() {
    let kmcl = Kmcl::default();
    let d = Driver::new();
    let ch = d.create(&kmcl, 5);
    kcall!(Client.VmbChannelSetIncomingProcessingAtPassive, ch, 1);
    assert!(kmcl.channel_info(ch).expect("info").incoming_at_passive);
    assert_eq!(d.enable(), NtStatus::SUCCESS);
    d.start();
    let g = Guest::new(TYPE_ID, instance_id(5));
    kmcl.attach_guest(&g).expect("attach");
    g.open().expect("open");
    kmcl.wait_idle();
    let r = g.send_request(b"p").expect("send");
    kmcl.wait_idle();
    assert_eq!(g.take_reply(r), Some(Reply::Completed(b"re:p".to_vec())));
    assert!(
        d.events_irql()
            .iter()
            .filter(|(e, _)| matches!(e, Ev::Process(_)))
            .all(|(_, irql)| *irql == Irql::Passive)
    );
    teardown(&kmcl, &d);

    // DeferToPassive from a DISPATCH delivery: redelivered at PASSIVE.
    let (d, g) = running(&kmcl, 6);
    d.behave().incoming = IncomingMode::Defer;
    let r = g.send_request(b"d").expect("send");
    kmcl.wait_idle();
    assert_eq!(g.take_reply(r), Some(Reply::Completed(b"re:d".to_vec())));
    let irqls: Vec<Irql> = d
        .events_irql()
        .into_iter()
        .filter(|(e, _)| matches!(e, Ev::Process(_)))
        .map(|(_, irql)| irql)
        .collect();
    assert_eq!(irqls, vec![Irql::Dispatch, Irql::Passive]);
    teardown(&kmcl, &d);
    assert_eq!(kmcl.finish(), vec![]);
}

#[test]
fn packet_fail_stops_the_queue_until_restart() {
    let kmcl = Kmcl::default();
    let (d, g) = running(&kmcl, 7);
    d.behave().incoming = IncomingMode::Fail;
    let r1 = g.send_request(b"bad").expect("send");
    let r2 = g.send_request(b"good").expect("send");
    kmcl.wait_idle();
    assert_eq!(g.take_reply(r1), Some(Reply::Failed));
    assert_eq!(g.take_reply(r2), None, "queue stopped");
    let info = kmcl.channel_info(d.ch()).expect("info");
    assert!(info.queue_failed && !info.queue_running);
    d.behave().incoming = IncomingMode::Echo;
    d.pause();
    d.start();
    kmcl.wait_idle();
    assert_eq!(
        g.take_reply(r2),
        Some(Reply::Completed(b"re:good".to_vec()))
    );
    teardown(&kmcl, &d);
    assert_eq!(kmcl.finish(), vec![]);
}

#[test]
fn pause_waits_for_incoming_completion_in_suspend() {
    let kmcl = Kmcl::default();
    let (d, g) = running(&kmcl, 8);
    d.behave().incoming = IncomingMode::Hold;
    let r = g.send_request(b"held").expect("send");
    kmcl.wait_idle();
    assert_eq!(
        kmcl.channel_info(d.ch())
            .expect("info")
            .incoming_outstanding,
        1
    );
    d.pause(); // Suspend completes the held packet.
    assert_eq!(
        g.take_reply(r),
        Some(Reply::Completed(b"cancelled".to_vec()))
    );
    assert_eq!(
        kmcl.channel_info(d.ch())
            .expect("info")
            .incoming_outstanding,
        0
    );
    teardown(&kmcl, &d);
    assert_eq!(kmcl.finish(), vec![]);
}

#[test]
fn transaction_quota_limits_outstanding_incoming() {
    let kmcl = Kmcl::default();
    let (d, g) = running(&kmcl, 9);
    kcall!(Client.VmbChannelSetTransactionQuota, d.ch(), 1);
    d.behave().incoming = IncomingMode::Hold;
    g.send_request(b"a").expect("send");
    g.send_request(b"b").expect("send");
    kmcl.wait_idle();
    assert_eq!(
        d.events()
            .iter()
            .filter(|e| matches!(e, Ev::Process(_)))
            .count(),
        1
    );
    let pc = d.held.lock().unwrap().pop().expect("held");
    complete(pc, b"ok");
    kmcl.wait_idle();
    assert_eq!(
        d.events()
            .iter()
            .filter(|e| matches!(e, Ev::Process(_)))
            .count(),
        2
    );
    teardown(&kmcl, &d);
    assert_eq!(kmcl.finish(), vec![]);
}

#[test]
fn outgoing_packets_complete_in_any_order_with_guest_payload() {
    let kmcl = Kmcl::default();
    let (d, g) = running(&kmcl, 10);
    for tag in 1..=3 {
        d.post(tag, format!("msg{tag}").as_bytes());
    }
    kmcl.wait_idle();
    let got = g.receive_all();
    assert_eq!(got.len(), 3);
    assert_eq!(got[1].bytes, b"msg2");
    let txids: Vec<u64> = got
        .iter()
        .map(|p| p.txid.expect("wants completion"))
        .collect();
    // Out of order, arbitrary payloads.
    g.complete(txids[2], &[0xFF; 3]).expect("complete");
    g.complete(txids[0], b"").expect("complete");
    kmcl.wait_idle();
    let completions = d.completions();
    assert_eq!(
        completions,
        vec![
            (3, NtStatus::SUCCESS, vec![0xFF; 3]),
            (1, NtStatus::SUCCESS, vec![])
        ]
    );
    assert!(
        d.events_irql()
            .iter()
            .filter(|(e, _)| matches!(e, Ev::Completion { .. }))
            .all(|(_, irql)| *irql == Irql::Dispatch)
    );
    // A misbehaving guest completes twice: the routine runs once.
    g.complete(txids[1], b"x").expect("complete");
    g.send_completion(txids[1], b"again").expect("raw");
    g.send_completion(999_999_999, b"invented").expect("raw");
    kmcl.wait_idle();
    assert_eq!(d.completions().len(), 3);
    assert_eq!(g.ignored_completions(), 2);
    assert_eq!(
        kmcl.channel_info(d.ch()).expect("info").packets_allocated,
        0
    );
    teardown(&kmcl, &d);
    assert_eq!(kmcl.finish(), vec![]);
}

#[test]
fn full_ring_queues_on_the_host_and_drains_as_the_guest_reads() {
    let kmcl = kmcl_with(|c| c.ring_capacity = 2);
    let d = Driver::new();
    d.create(&kmcl, 11);
    assert_eq!(d.enable(), NtStatus::SUCCESS);
    // Queued before the guest opens: not sent.
    for tag in 1..=5 {
        d.post(tag, &[tag as u8]);
    }
    let info = kmcl.channel_info(d.ch()).expect("info");
    assert_eq!((info.packets_queued, info.packets_in_flight), (5, 0));
    d.start();
    let g = Guest::new(TYPE_ID, instance_id(11));
    kmcl.attach_guest(&g).expect("attach");
    g.open().expect("open");
    kmcl.wait_idle();
    assert_eq!(g.ring_len(), 2);
    let info = kmcl.channel_info(d.ch()).expect("info");
    assert_eq!((info.packets_queued, info.packets_in_flight), (3, 2));
    let mut seen = Vec::new();
    while seen.len() < 5 {
        let p = g.receive().expect("a packet");
        seen.push(p.bytes[0]);
        kmcl.wait_idle();
    }
    assert_eq!(seen, vec![1, 2, 3, 4, 5], "FIFO across the host queue");
    for txid in g.awaiting_completion() {
        g.complete(txid, b"").expect("complete");
    }
    kmcl.wait_idle();
    assert_eq!(d.completions().len(), 5);
    teardown(&kmcl, &d);
    assert_eq!(kmcl.finish(), vec![]);
}

#[test]
fn disable_and_guest_close_cancel_packets_in_flight() {
    let kmcl = kmcl_with(|c| c.ring_capacity = 1);
    let (d, g) = running(&kmcl, 12);
    d.post(1, b"a");
    d.post(2, b"b"); // queued on the host
    kmcl.wait_idle();
    g.receive().expect("a");
    kmcl.wait_idle();
    // Guest closes: the packet it had is cancelled; the host-queued one is kept.
    g.close().expect("close");
    kmcl.wait_idle();
    let c = d.completions();
    assert_eq!(
        c.len(),
        2,
        "both sent packets were in the ring or read: {c:?}"
    );
    assert!(c.iter().all(|(_, s, _)| *s == NtStatus::CANCELLED));
    d.post(3, b"c");
    kmcl.wait_idle();
    // Disable cancels what is still queued.
    d.disable();
    let c = d.completions();
    assert_eq!(c.last(), Some(&(3, NtStatus::CANCELLED, vec![])));
    d.cleanup();
    assert_eq!(kmcl.finish(), vec![]);
}

#[test]
fn sends_without_completion_and_default_routine() {
    let kmcl = Kmcl::default();
    let (d, g) = running(&kmcl, 13);
    let p = d.packet(7);
    assert_eq!(send_flags(p, b"fire", 0), NtStatus::SUCCESS);
    kmcl.wait_idle();
    // Completed when placed in the ring.
    assert_eq!(d.completions(), vec![(7, NtStatus::SUCCESS, vec![])]);
    let got = g.receive().expect("packet");
    assert_eq!(got.txid, None);
    // No completion routine set: KMCL's default routine frees the packet.
    let p = kcall!(Client.VmbPacketAllocate, d.ch());
    assert!(!p.is_null());
    assert_eq!(d.send(p, b"x"), NtStatus::SUCCESS);
    kmcl.wait_idle();
    assert_eq!(
        kmcl.channel_info(d.ch()).expect("info").packets_allocated,
        1
    );
    let got = g.receive().expect("packet");
    g.complete(got.txid.expect("txid"), b"").expect("complete");
    kmcl.wait_idle();
    assert_eq!(
        kmcl.channel_info(d.ch()).expect("info").packets_allocated,
        0
    );
    // Fire-and-forget synchronous request (the only form the host may use).
    let mut timeout: i64 = 0;
    let status = kcall!(
        Client.VmbChannelSendSynchronousRequest,
        d.ch(),
        b"sync".as_ptr().cast_mut().cast(),
        4,
        ptr::null_mut(),
        0,
        ptr::null_mut(),
        ptr::null_mut(),
        &mut timeout
    );
    assert_eq!(status, NtStatus::SUCCESS);
    assert_eq!(g.receive().map(|p| p.bytes), Some(b"sync".to_vec()));
    teardown(&kmcl, &d);
    assert_eq!(kmcl.finish(), vec![]);
}

#[test]
fn packet_pool_is_bounded_and_pointers_round_trip() {
    let kmcl = kmcl_with(|c| c.packet_pool_size = 2);
    let d = Driver::new();
    let ch = d.create(&kmcl, 14);
    let a = d.packet(1);
    let b = d.packet(2);
    assert!(
        kcall!(Client.VmbPacketAllocate, ch).is_null(),
        "pool exhausted"
    );
    assert_eq!(kcall!(Client.VmbPacketGetChannel, a), ch);
    assert_eq!(kcall!(Client.VmbPacketGetPointer, b).addr(), 2);
    let mut context = 5u32;
    kcall!(Client.VmbChannelSetPointer, ch, (&raw mut context).cast());
    assert_eq!(
        kcall!(Client.VmbChannelGetPointer, ch),
        (&raw mut context).cast()
    );
    let mut guid = GUID::default();
    kcall!(Client.VmbChannelGetInterfaceInstance, ch, &mut guid);
    assert_eq!(guid, instance_id(14));
    free(a);
    free(b);
    d.cleanup();
    assert_eq!(kmcl.finish(), vec![]);
}

#[test]
fn faults_fail_the_kth_call_and_calls_are_counted() {
    let kmcl = kmcl_with(|c| {
        c.faults = FaultPlan::new().fail_nth_packet_allocate(2).fail_nth(
            KmclCall::ChannelEnable,
            1,
            NtStatus::INSUFFICIENT_RESOURCES,
        );
    });
    let d = Driver::new();
    let ch = d.create(&kmcl, 15);
    let a = kcall!(Client.VmbPacketAllocate, ch);
    let b = kcall!(Client.VmbPacketAllocate, ch);
    let c = kcall!(Client.VmbPacketAllocate, ch);
    assert!(!a.is_null() && b.is_null() && !c.is_null());
    assert_eq!(kmcl.call_count(KmclCall::PacketAllocate), 3);
    assert_eq!(d.enable(), NtStatus::INSUFFICIENT_RESOURCES);
    assert!(!kmcl.channel_info(ch).expect("info").enabled, "no effect");
    assert_eq!(d.enable(), NtStatus::SUCCESS);
    kmcl.fail_next(KmclCall::PacketSend, NtStatus::DEVICE_REMOVED);
    assert_eq!(d.send(a, b"x"), NtStatus::DEVICE_REMOVED);
    assert_eq!(d.send(a, b"x"), NtStatus::SUCCESS);
    d.disable();
    free(c);
    d.cleanup();
    assert_eq!(kmcl.finish(), vec![]);
}

#[test]
fn fault_sweep_over_every_send() {
    // Count the sends of a small scenario, then fail each in turn.
    let scenario = |kmcl: &Kmcl| -> usize {
        let (d, g) = running(kmcl, 16);
        let mut ok = 0;
        for tag in 1..=4 {
            let p = d.packet(tag);
            if d.send(p, b"m") == NtStatus::SUCCESS {
                ok += 1;
            } else {
                free(p);
            }
        }
        kmcl.wait_idle();
        for p in g.receive_all() {
            g.complete(p.txid.expect("txid"), b"").expect("complete");
        }
        kmcl.wait_idle();
        teardown(kmcl, &d);
        ok
    };
    let kmcl = Kmcl::default();
    assert_eq!(scenario(&kmcl), 4);
    let sends = kmcl.call_count(KmclCall::PacketSend);
    assert_eq!(kmcl.finish(), vec![]);
    for k in 1..=sends {
        let kmcl = kmcl_with(|c| {
            c.faults = FaultPlan::new().fail_nth(KmclCall::PacketSend, k, NtStatus::UNSUCCESSFUL);
        });
        assert_eq!(scenario(&kmcl), 3, "fault at send {k}");
        assert_eq!(kmcl.finish(), vec![]);
    }
}

#[test]
fn independent_instances_run_in_parallel() {
    let threads: Vec<_> = (0..4)
        .map(|i| {
            std::thread::spawn(move || {
                let kmcl = Kmcl::default();
                let (d, g) = running(&kmcl, 100 + i);
                for tag in 0..20 {
                    d.post(tag, &[i as u8]);
                }
                let mut done = 0;
                while done < 20 {
                    kmcl.wait_idle();
                    for p in g.receive_all() {
                        assert_eq!(p.bytes, vec![i as u8]);
                        g.complete(p.txid.expect("txid"), b"").expect("complete");
                        done += 1;
                    }
                }
                kmcl.wait_idle();
                assert_eq!(d.completions().len(), 20);
                teardown(&kmcl, &d);
                kmcl.finish()
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().expect("thread"), vec![]);
    }
}
