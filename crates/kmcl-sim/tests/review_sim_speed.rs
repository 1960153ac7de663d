//! review2 (sim-speed): adversarial checks of the simulator speed pass (a18007d..sim-speed): the
//! strong per-thread instance cache, the one-lookup table calls, `VmbPacketRestore` reading
//! `LibBuf` in place with restored payloads shared with the chunk, the radix-sorted save order and
//! the in-place chunk assembly. Each test states what the old code (a18007d) did.
// UNSAFETY: this test drives the KMCL ABI directly (raw table calls and `extern` callbacks).
#![allow(unsafe_code)]

mod support;

use std::cell::RefCell;
use std::ffi::c_void;
use std::ptr;
use std::sync::Barrier;

use kmcl::NtStatus;
use kmcl_sim::{Guest, Kmcl, SimConfig, Violation, ViolationKind};
use kmcl_sys::*;
use support::*;

// ---- a raw restore driver of its own -------------------------------------------------------------

/// What the restore callback of this file does (per thread: the callback runs on the thread that
/// calls `VmbChannelRestoreFromBuffer`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// `VmbPacketRestore` with the `LibBuf` pointer it was given (in place, no copy).
    InPlace,
    /// [`Mode::InPlace`], then the driver overwrites the payload bytes of the `LibBuf` it was
    /// given (a write through the `PVOID`: the buffer is `_In_`, so this is driver misuse that
    /// neither version detects).
    ScribbleAfter,
    /// A series of bad `VmbPacketRestore` calls (recorded), then the good one in place.
    EdgeCases,
}

thread_local! {
    static MODE: RefCell<Mode> = const { RefCell::new(Mode::InPlace) };
    static SEEN: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

fn set_mode(mode: Mode) {
    MODE.with(|m| *m.borrow_mut() = mode);
}

fn seen(line: String) {
    SEEN.with(|s| s.borrow_mut().push(line));
}

fn take_seen() -> Vec<String> {
    SEEN.with(|s| std::mem::take(&mut *s.borrow_mut()))
}

kmcl_sys::kmcl_fn! {
    unsafe fn my_completion(p: VMBPACKET, _status: NtStatus, _buffer: PVOID, _length: u32) {
        kcall!(Client.VmbPacketFree, p);
    }
}

kmcl_sys::kmcl_fn! {
    unsafe fn my_save(_ch: VMBCHANNEL, p: VMBPACKET, buf: PVOID, size: u32, needed: *mut u32) -> NtStatus {
        let tag = kcall!(Client.VmbPacketGetPointer, p).addr() as u64;
        if !needed.is_null() {
            // SAFETY: the simulator passes a valid, writable BytesNeeded.
            unsafe { needed.write(8) };
        }
        if size < 8 || buf.is_null() {
            return NtStatus::BUFFER_TOO_SMALL;
        }
        // SAFETY: the simulator passes `size` writable bytes at `buf`.
        unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), 8) }
            .copy_from_slice(&tag.to_le_bytes());
        NtStatus::SUCCESS
    }
}

fn restore_call(p: VMBPACKET, lib: *mut u8, len: u32) -> NtStatus {
    kcall!(Server.VmbPacketRestore, p, lib.cast::<c_void>(), len)
}

kmcl_sys::kmcl_fn! {
    unsafe fn my_restore(ch: VMBCHANNEL, lib: PVOID, lib_size: u32, save: PVOID, save_size: u32) -> NtStatus {
        let tag = if save_size >= 8 && !save.is_null() {
            // SAFETY: the simulator passes `save_size` readable bytes at `save`.
            let b = unsafe { std::slice::from_raw_parts(save.cast::<u8>(), 8) };
            u64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as usize
        } else {
            0
        };
        let p = kcall!(Client.VmbPacketAllocate, ch);
        if p.is_null() {
            return NtStatus::INSUFFICIENT_RESOURCES;
        }
        kcall!(Client.VmbPacketSetCompletionRoutine, p, Some(my_completion));
        kcall!(Client.VmbPacketSetPointer, p, ptr::without_provenance_mut(tag));
        let lib = lib.cast::<u8>();
        let mode = MODE.with(|m| *m.borrow());
        if mode == Mode::EdgeCases {
            // SAFETY: `lib` has `lib_size` readable bytes for the call.
            let mut copy = unsafe { std::slice::from_raw_parts(lib, lib_size as usize) }.to_vec();
            let save_ptr = save.cast::<u8>();
            let cases: Vec<(&str, *mut u8, u32)> = vec![
                ("NULL, 0", ptr::null_mut(), 0),
                ("NULL, 5", ptr::null_mut(), 5),
                ("lib, 0", lib, 0),
                ("lib, len-1", lib, lib_size - 1),
                // SAFETY: within the LibBuf.
                ("lib+1, len-1", unsafe { lib.add(1) }, lib_size - 1),
                ("lib, 31", lib, 31),
                ("lib, 35", lib, 35),
                ("save buf", save_ptr, save_size),
            ];
            for (what, p_lib, len) in cases {
                let status = restore_call(p, p_lib, len);
                seen(format!("{what}: {status:?}"));
            }
            // A copy with a bad CRC, then one with a changed txid and a good CRC.
            if let Some(last) = copy.last_mut() {
                *last ^= 1;
            }
            let status = restore_call(p, copy.as_mut_ptr(), lib_size);
            seen(format!("bad crc copy: {status:?}"));
            if let Some(last) = copy.last_mut() {
                *last ^= 1;
            }
            copy[8] ^= 0x40;
            refresh_lib_crc(&mut copy);
            let status = restore_call(p, copy.as_mut_ptr(), lib_size);
            seen(format!("other txid copy: {status:?}"));
        }
        let status = restore_call(p, lib, lib_size);
        seen(format!("in place: {status:?}"));
        if status != NtStatus::SUCCESS {
            kcall!(Client.VmbPacketFree, p);
            return status;
        }
        if mode == Mode::EdgeCases {
            let again = restore_call(p, lib, lib_size);
            seen(format!("in place again: {again:?}"));
        }
        if mode == Mode::ScribbleAfter && lib_size > 36 {
            // Driver misuse: writes into the `_In_` LibBuf after VmbPacketRestore returned.
            // SAFETY: in bounds: `lib` has `lib_size` (> 36) bytes the simulator handed out.
            let payload = unsafe { lib.add(32) };
            // SAFETY: (of the write itself, not of the contract: this is the misuse under test)
            // `lib_size - 36` bytes from `payload` lie within the `LibBuf`.
            unsafe { std::ptr::write_bytes(payload, 0xEE, lib_size as usize - 36) };
        }
        NtStatus::SUCCESS
    }
}

/// Points the channel's save/restore callbacks at this file's driver (the channel is disabled).
fn use_my_callbacks(ch: VMBCHANNEL) {
    assert_eq!(
        kcall!(
            Server.VmbServerChannelInitSetSaveRestorePacketCallbacks,
            ch,
            Some(my_save),
            Some(my_restore)
        ),
        NtStatus::SUCCESS
    );
}

// ---- CRC32C and chunk surgery (to forge transaction ids) ----------------------------------------

fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn refresh_lib_crc(lib: &mut [u8]) {
    let n = lib.len() - 4;
    let crc = crc32c(&lib[..n]);
    lib[n..].copy_from_slice(&crc.to_le_bytes());
}

fn refresh_chunk_crc(chunk: &mut [u8]) {
    chunk[28..32].fill(0);
    let crc = crc32c(chunk);
    chunk[28..32].copy_from_slice(&crc.to_le_bytes());
}

/// The (offset, length) of every `LibBuf` in a chunk.
fn libs_of(chunk: &[u8]) -> Vec<(usize, usize)> {
    let mut at = 32;
    let mut out = Vec::new();
    while at + 8 <= chunk.len() {
        let kind = chunk[at];
        let len = u32::from_le_bytes(chunk[at + 4..at + 8].try_into().unwrap()) as usize;
        if kind == 2 {
            let lib_len = u32::from_le_bytes(chunk[at + 8..at + 12].try_into().unwrap()) as usize;
            out.push((at + 8 + 12, lib_len));
        }
        at += 8 + len;
    }
    out
}

/// Rewrites the transaction ids of a chunk's packets (`txids[i]` for the i-th packet unit).
fn forge_txids(chunk: &mut [u8], txids: &[u64]) {
    for ((at, len), txid) in libs_of(chunk).into_iter().zip(txids) {
        let lib = &mut chunk[at..at + len];
        lib[8..16].copy_from_slice(&txid.to_le_bytes());
        refresh_lib_crc(lib);
    }
    refresh_chunk_crc(chunk);
}

// ---- scenarios -----------------------------------------------------------------------------------

/// The source side of `sim_save_restore.rs`: four packets (ring of 2: m1 read by the guest and
/// completed while paused, m2 in the ring, m3 and m4 on the host queue), saved in one chunk.
fn source(instance: u32) -> (Guest, Vec<Vec<u8>>) {
    let kmcl = Kmcl::new(SimConfig {
        ring_capacity: 2,
        ..SimConfig::default()
    });
    let (d, g) = running(&kmcl, instance);
    for tag in 1..=4 {
        d.post(tag, format!("m{tag}-payload-bytes").as_bytes());
    }
    kmcl.wait_idle();
    let first = g.receive().expect("first packet");
    d.pause();
    g.complete(first.txid.expect("txid"), b"ack1")
        .expect("complete");
    kmcl.wait_idle();
    let chunks = d.save(4096).expect("save");
    g.detach();
    d.disable();
    d.cleanup();
    assert_eq!(kmcl.finish(), vec![]);
    (g, chunks)
}

/// Restores `chunks` with `mode` on a fresh instance, then lets the guest receive what the host
/// sends; returns the bytes the guest received and every violation.
fn migrate(mode: Mode, instance: u32) -> (Vec<Vec<u8>>, Vec<String>, Vec<Violation>) {
    let (g, chunks) = source(instance);
    let kmcl = Kmcl::default();
    let d = Driver::new();
    let ch = d.create(&kmcl, instance);
    use_my_callbacks(ch);
    set_mode(mode);
    let status = d.restore(&chunks);
    set_mode(Mode::InPlace);
    assert_eq!(status, NtStatus::SUCCESS);
    let seen = take_seen();
    assert_eq!(d.enable(), NtStatus::SUCCESS);
    kmcl.attach_guest(&g).expect("attach");
    d.start();
    kmcl.wait_idle();
    let got: Vec<Vec<u8>> = g.receive_all().into_iter().map(|p| p.bytes).collect();
    for p in g.awaiting_completion() {
        let _ = g.complete(p, b"ok");
    }
    kmcl.wait_idle();
    teardown(&kmcl, &d);
    let violations = kmcl.finish();
    (got, seen, violations)
}

/// Attack (c)/(a): a driver that writes into the `LibBuf` it was given after `VmbPacketRestore`
/// returned. The buffer is `_In_`; neither version reports the write. Before the change the
/// restored packet owned a copy of its payload, so the write had no effect and the guest received
/// the saved bytes. After the change the packet shares the chunk's bytes, so the guest receives
/// the driver's scribble: the same misuse now silently changes what the restored channel sends.
///
/// Under Miri the driver's write is itself undefined behaviour on both versions (the simulator
/// hands `LibBuf` out from a shared borrow, `invoke::in_ptr`): the old code was robust to the
/// misuse, not checking it. Skipped under Miri for that reason.
#[test]
#[cfg_attr(
    miri,
    ignore = "the driver's write through the _In_ LibBuf is UB under Stacked Borrows"
)]
fn a_libbuf_written_after_packet_restore_does_not_change_the_restored_payload() {
    let (clean, _, v_clean) = migrate(Mode::InPlace, 71);
    let (scribbled, _, v_scribbled) = migrate(Mode::ScribbleAfter, 72);
    assert_eq!(v_clean, vec![]);
    assert_eq!(
        clean,
        vec![
            b"m2-payload-bytes".to_vec(),
            b"m3-payload-bytes".to_vec(),
            b"m4-payload-bytes".to_vec()
        ]
    );
    assert!(
        scribbled == clean || !v_scribbled.is_empty(),
        "a write into the _In_ LibBuf after VmbPacketRestore changed the restored packets' \
         payload without any violation: guest received {:?}",
        scribbled
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect::<Vec<_>>()
    );
}

/// Attack (a)/(c): `VmbPacketRestore` with NULL/0, NULL/5, a zero length, a truncated `LibBuf`,
/// one starting one byte in, a header-only length, one overlapping the driver's bytes, the
/// driver's `SaveBuf`, a copy with a bad CRC, a copy with another transaction id (good CRC), then
/// the right one, then the right one again. Statuses and violations are those of a18007d
/// (recorded by running this test there).
#[test]
fn packet_restore_edge_cases_give_the_old_statuses_and_violations() {
    let (got, seen, violations) = migrate(Mode::EdgeCases, 73);
    assert_eq!(
        got,
        vec![
            b"m2-payload-bytes".to_vec(),
            b"m3-payload-bytes".to_vec(),
            b"m4-payload-bytes".to_vec()
        ]
    );
    let violations: Vec<String> = violations.iter().map(|v| format!("{v}")).collect();
    let report = format!("{seen:#?}\n{violations:#?}");
    std::println!("{report}");
    let expected = include_str!("review_sim_speed_edge_cases.txt");
    assert_eq!(report.trim(), expected.trim());
}

/// Attack (c): restore forged transaction ids (beyond 32 bits, 2^32 - 1, 2^32, 2^32 + 1) and
/// save again: the second save presents the packets in transaction id order (the radix sort's
/// fallback path and its edge), and restores byte for byte.
#[test]
fn forged_wide_txids_save_in_txid_order() {
    let (g, mut chunks) = source(74);
    assert_eq!(chunks.len(), 1);
    // Beyond 32 bits but far from u64::MAX: the counter of transaction ids is process-wide and a
    // restore raises it (`a_restored_txid_of_u64_max_...` shows what u64::MAX does to it).
    let txids = [
        1u64 << 40,
        1u64 << 32,
        u64::from(u32::MAX),
        (1u64 << 32) + 1,
    ];
    forge_txids(&mut chunks[0], &txids);
    let kmcl = Kmcl::default();
    let d = Driver::new();
    let ch = d.create(&kmcl, 74);
    use_my_callbacks(ch);
    assert_eq!(d.restore(&chunks), NtStatus::SUCCESS);
    let _ = take_seen();
    // The packets restored; save again (never started: the channel is not running).
    let again = d.save(4096).expect("save again");
    let order: Vec<u64> = libs_of(&again[0])
        .into_iter()
        .map(|(at, _)| u64::from_le_bytes(again[0][at + 8..at + 16].try_into().unwrap()))
        .collect();
    let mut sorted = txids.to_vec();
    sorted.sort_unstable();
    assert_eq!(order, sorted, "saved in transaction id order");
    // Payloads and tags survive.
    let tags: Vec<u64> = libs_of(&again[0])
        .into_iter()
        .map(|(at, len)| {
            let drv = at + len;
            u64::from_le_bytes(again[0][drv..drv + 8].try_into().unwrap())
        })
        .collect();
    assert_eq!(tags.len(), 4);
    drop(g);
    d.disable();
    d.cleanup();
    let v = kmcl.finish();
    assert!(
        v.iter().all(|v| v.kind != ViolationKind::InternalError),
        "{v:?}"
    );
}

/// Attack (c): 150 packets in flight sent in an order unrelated to their allocation order (the
/// radix path: 64 keys or more): the save presents them in send (transaction id) order.
#[test]
fn many_in_flight_packets_save_in_send_order() {
    let kmcl = Kmcl::new(SimConfig {
        ring_capacity: 4,
        packet_pool_size: 1024,
        ..SimConfig::default()
    });
    let (d, g) = running(&kmcl, 75);
    let packets: Vec<VMBPACKET> = (0..150).map(|i| d.packet(1000 + i)).collect();
    let mut order: Vec<usize> = (0..150).collect();
    // A fixed shuffle.
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    for i in (1..order.len()).rev() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        order.swap(i, (s % (i as u64 + 1)) as usize);
    }
    for &i in &order {
        assert_eq!(d.send(packets[i], &[i as u8; 3]), NtStatus::SUCCESS);
    }
    kmcl.wait_idle();
    d.pause();
    let chunks = d.save(1 << 20).expect("save");
    let mut tags = Vec::new();
    let mut txids = Vec::new();
    for c in &chunks {
        for (at, len) in libs_of(c) {
            let drv = at + len;
            tags.push(u64::from_le_bytes(c[drv..drv + 8].try_into().unwrap()) as usize - 1000);
            txids.push((
                u64::from_le_bytes(c[at + 8..at + 16].try_into().unwrap()),
                c[at + 6],
            ));
        }
    }
    // Transaction ids come from one process-wide counter (other tests of this binary move it,
    // and a restored txid near u64::MAX wraps it: see `a_restored_txid_near_u64_max_...`), so
    // the order checked is the txid order, and every packet is there once.
    assert!(
        txids.windows(2).all(|w| w[0].0 < w[1].0),
        "saved in txid order: {txids:?}"
    );
    let mut all = tags.clone();
    all.sort_unstable();
    assert_eq!(all, (0..150).collect::<Vec<_>>());
    if txids.first().is_some_and(|t| t.0 > 0)
        && txids.last().is_some_and(|t| t.0 < u64::from(u32::MAX))
    {
        assert_eq!(tags, order, "saved in send order");
    }
    g.detach();
    d.disable();
    kmcl.wait_idle();
    d.cleanup();
    assert_eq!(kmcl.finish(), vec![]);
}

// ---- the strong per-thread cache ------------------------------------------------------------------

fn stale_on_this_thread() -> Vec<(ViolationKind, Option<kmcl_sim::KmclCall>)> {
    kmcl_sim::take_unattributed_violations()
        .into_iter()
        .map(|v| (v.kind, v.call))
        .collect()
}

/// Attack (e): a thread caches instance A (its calls name A), A is finished on another thread,
/// then the first thread calls with A's channel and packet handles (every entry point that now
/// lends from the cache): each must be refused as a handle of an instance that no longer exists,
/// exactly as before, and no call may reach A's state.
#[test]
fn a_finished_instance_cached_on_another_thread_is_refused() {
    let kmcl = Kmcl::default();
    let (d, g) = running(&kmcl, 76);
    let ch = d.ch().addr();
    let p = d.packet(5).addr();
    let (cached, finished) = (Barrier::new(2), Barrier::new(2));
    let (got, stale, violations) = std::thread::scope(|scope| {
        let worker = scope.spawn(|| {
            let ch: VMBCHANNEL = ptr::without_provenance_mut(ch);
            let p: VMBPACKET = ptr::without_provenance_mut(p);
            // Cache A on this thread through the lending entry points.
            assert!(!kcall!(Client.VmbChannelGetPointer, ch).is_null());
            assert_eq!(kcall!(Client.VmbPacketGetPointer, p).addr(), 5);
            cached.wait();
            finished.wait();
            let mut got = Vec::new();
            got.push(format!("{:?}", kcall!(Client.VmbChannelGetPointer, ch)));
            kcall!(Client.VmbChannelSetPointer, ch, ptr::null_mut());
            got.push(format!("{:?}", kcall!(Client.VmbPacketAllocate, ch)));
            got.push(format!("{:?}", kcall!(Client.VmbPacketGetPointer, p)));
            kcall!(Client.VmbPacketSetPointer, p, ptr::null_mut());
            kcall!(Client.VmbPacketSetCompletionRoutine, p, None);
            got.push(format!("{:?}", send_flags(p, b"x", 0)));
            got.push(format!(
                "{:?}",
                kcall!(Server.VmbPacketRestore, p, ptr::null_mut(), 0)
            ));
            kcall!(Client.VmbPacketFree, p);
            (got, stale_on_this_thread())
        });
        cached.wait();
        // Finish A here while the other thread still caches it.
        free(ptr::without_provenance_mut(p));
        g.detach();
        d.disable();
        kmcl.wait_idle();
        d.cleanup();
        let violations = kmcl.finish();
        finished.wait();
        let (got, stale) = worker.join().expect("worker");
        (got, stale, violations)
    });
    assert_eq!(violations, vec![]);
    assert_eq!(
        got,
        [
            "0x0",
            "0x0",
            "0x0",
            "STATUS_INVALID_PARAMETER_1",
            "STATUS_INVALID_PARAMETER_1"
        ]
        .map(String::from)
        .to_vec()
    );
    assert_eq!(stale.len(), 9, "{stale:?}");
    assert!(
        stale.iter().all(|(k, _)| *k == ViolationKind::StaleHandle),
        "{stale:?}"
    );
}

/// Attack (d)/(e): two instances used alternately on one thread (every call misses the cache),
/// one of them finished half way: the other keeps working, the finished one's handles are refused
/// (stale, unattributed), and neither instance records anything it should not.
#[test]
fn two_instances_interleaved_on_one_thread() {
    let a = Kmcl::default();
    let b = Kmcl::default();
    let (da, ga) = running(&a, 77);
    let (db, gb) = running(&b, 78);
    let pa = da.packet(0xA);
    let pb = db.packet(0xB);
    for i in 0..200usize {
        kcall!(
            Client.VmbPacketSetPointer,
            pa,
            ptr::without_provenance_mut(i)
        );
        kcall!(
            Client.VmbPacketSetPointer,
            pb,
            ptr::without_provenance_mut(i + 1)
        );
        assert_eq!(kcall!(Client.VmbPacketGetPointer, pa).addr(), i);
        assert_eq!(kcall!(Client.VmbPacketGetPointer, pb).addr(), i + 1);
    }
    // A packet handle of B given to A's channel calls: wrong kind / foreign checks as ever.
    assert!(kcall!(Client.VmbChannelGetPointer, pb.cast()).is_null());
    let wrong = b.take_violations();
    assert_eq!(
        wrong.iter().map(|v| v.kind).collect::<Vec<_>>(),
        vec![ViolationKind::WrongHandleType]
    );
    free(pa);
    ga.detach();
    da.disable();
    a.wait_idle();
    da.cleanup();
    let cha = da.ch();
    assert_eq!(a.finish(), vec![]);
    // A is gone, B answers, alternately.
    for i in 0..10usize {
        assert!(kcall!(Client.VmbChannelGetPointer, cha).is_null());
        kcall!(
            Client.VmbPacketSetPointer,
            pb,
            ptr::without_provenance_mut(i)
        );
        assert_eq!(kcall!(Client.VmbPacketGetPointer, pb).addr(), i);
        assert!(kcall!(Client.VmbPacketAllocate, cha).is_null());
    }
    let stale = stale_on_this_thread();
    assert_eq!(stale.len(), 20, "{stale:?}");
    assert!(stale.iter().all(|(k, _)| *k == ViolationKind::StaleHandle));
    // A new instance (a new id) is not confused with A.
    let c = Kmcl::default();
    let (dc, gc) = running(&c, 79);
    assert!(kcall!(Client.VmbChannelGetPointer, cha).is_null());
    assert!(!kcall!(Client.VmbChannelGetPointer, dc.ch()).is_null());
    assert_eq!(stale_on_this_thread().len(), 1);
    free(pb);
    gb.detach();
    db.disable();
    b.wait_idle();
    db.cleanup();
    assert_eq!(b.finish(), vec![]);
    gc.detach();
    dc.disable();
    c.wait_idle();
    dc.cleanup();
    assert_eq!(c.finish(), vec![]);
}

/// Attack (d): many threads hammer one instance through the lending entry points while it is
/// finished under them (a finish racing lent calls): no panic, no deadlock, no InternalError;
/// after the finish every call is refused as stale.
#[test]
fn finish_racing_lent_calls_on_other_threads() {
    for round in 0..20u32 {
        let kmcl = Kmcl::default();
        let (d, g) = running(&kmcl, 80 + round);
        let ch = d.ch().addr();
        let p = d.packet(9).addr();
        let go = Barrier::new(5);
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| {
                        let ch: VMBCHANNEL = ptr::without_provenance_mut(ch);
                        let p: VMBPACKET = ptr::without_provenance_mut(p);
                        go.wait();
                        let mut calls = 0u32;
                        while !stop.load(std::sync::atomic::Ordering::SeqCst) || calls < 50 {
                            let _ = kcall!(Client.VmbChannelGetPointer, ch);
                            let _ = kcall!(Client.VmbPacketGetPointer, p);
                            calls += 1;
                            if calls > 200_000 {
                                break;
                            }
                        }
                        // After the finish: all stale.
                        let before = stale_on_this_thread().len();
                        let _ = kcall!(Client.VmbChannelGetPointer, ch);
                        let after = stale_on_this_thread();
                        (before, after)
                    })
                })
                .collect();
            go.wait();
            free(ptr::without_provenance_mut(p));
            g.detach();
            d.disable();
            kmcl.wait_idle();
            d.cleanup();
            let v = kmcl.finish();
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            for w in workers {
                let (_, after) = w.join().expect("worker");
                assert_eq!(
                    after.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
                    vec![ViolationKind::StaleHandle]
                );
            }
            // The racing calls may land before or after the free/cleanup: only stale-handle
            // verdicts (on the instance: freed packet / cleaned channel) are acceptable.
            assert!(
                v.iter().all(|v| matches!(
                    v.kind,
                    ViolationKind::StaleHandle | ViolationKind::InvalidHandle
                )),
                "{v:?}"
            );
        });
    }
}

// ---- restore: the chunk copy and its sharing -----------------------------------------------------

/// Attack (b)/(c): the driver's chunk buffer is overwritten and freed right after
/// `VmbChannelRestoreFromBuffer` returns (it is the driver's, `_In_` for the call only); the
/// packets restored from it (sharing the simulator's copy) still send the saved bytes.
#[test]
fn restored_payloads_outlive_the_drivers_chunk_buffer() {
    let (g, chunks) = source(90);
    let kmcl = Kmcl::default();
    let d = Driver::new();
    let ch = d.create(&kmcl, 90);
    use_my_callbacks(ch);
    let mut copy = chunks[0].clone();
    assert_eq!(restore_chunk(ch, &copy), NtStatus::SUCCESS);
    let _ = take_seen();
    copy.fill(0xCC);
    drop(copy);
    assert_eq!(d.enable(), NtStatus::SUCCESS);
    kmcl.attach_guest(&g).expect("attach");
    d.start();
    kmcl.wait_idle();
    let got: Vec<Vec<u8>> = g.receive_all().into_iter().map(|p| p.bytes).collect();
    assert_eq!(
        got,
        vec![
            b"m2-payload-bytes".to_vec(),
            b"m3-payload-bytes".to_vec(),
            b"m4-payload-bytes".to_vec()
        ]
    );
    for p in g.awaiting_completion() {
        let _ = g.complete(p, b"ok");
    }
    kmcl.wait_idle();
    teardown(&kmcl, &d);
    assert_eq!(kmcl.finish(), vec![]);
}

/// Attack (c): one chunk restored twice: again on the same channel (refused: a channel is
/// restored once), and on a second instance (accepted), then the first instance's restored
/// channel saved again: the re-saved chunk carries the same packets (payload bytes and driver
/// bytes) as the original.
#[test]
fn the_same_chunk_restored_twice_and_saved_again() {
    let (_g, chunks) = source(91);
    let kmcl = Kmcl::default();
    let d = Driver::new();
    let ch = d.create(&kmcl, 91);
    use_my_callbacks(ch);
    assert_eq!(restore_chunk(ch, &chunks[0]), NtStatus::SUCCESS);
    assert_eq!(
        restore_chunk(ch, &chunks[0]),
        NtStatus::INVALID_DEVICE_STATE
    );
    let kinds: Vec<ViolationKind> = kmcl.take_violations().iter().map(|v| v.kind).collect();
    assert_eq!(kinds, vec![ViolationKind::WrongState]);
    let other = Kmcl::default();
    let d2 = Driver::new();
    let ch2 = d2.create(&other, 91);
    use_my_callbacks(ch2);
    assert_eq!(restore_chunk(ch2, &chunks[0]), NtStatus::SUCCESS);
    let _ = take_seen();
    let again = d.save(4096).expect("save again");
    // (The location byte is not compared: a packet restored as in the ring is saved again as
    // delivered, on a18007d too.)
    let units = |c: &[u8]| -> Vec<(Vec<u8>, Vec<u8>)> {
        libs_of(c)
            .into_iter()
            .map(|(at, len)| {
                let lib = &c[at..at + len];
                (
                    lib[32..len - 4].to_vec(),
                    c[at + len..at + len + 8].to_vec(),
                )
            })
            .collect()
    };
    assert_eq!(units(&again[0]), units(&chunks[0]));
    for (dd, k) in [(&d, &kmcl), (&d2, &other)] {
        dd.disable();
        k.wait_idle();
        dd.cleanup();
    }
    assert_eq!(kmcl.finish(), vec![]);
    assert_eq!(other.finish(), vec![]);
}

/// Pre-existing (a18007d too; not part of the speed pass): transaction ids come from one
/// process-wide counter that a restore raises with `fetch_max(txid + 1)`, saturating. A restored
/// (forged or just very old) txid of u64::MAX leaves the counter at u64::MAX: the next send on
/// the restored channel is given u64::MAX again, the txid of a packet that is still in flight on
/// that channel (two packets with one txid: a guest completion can only reach one of them), and
/// the counter then wraps to 0. Ignored: it moves the process-wide counter for the other tests of
/// the binary; run it alone (`-- --ignored --test-threads=1`).
#[test]
// Ignored in the suite because it moves the process-wide txid counter to its end, which would
// reorder the ids of the other tests in this binary; .ci/run runs it alone, in its own process.
#[ignore = "moves the process-wide txid counter; run alone (see .ci/run)"]
fn a_restored_txid_of_u64_max_is_not_given_to_a_new_send() {
    let (g, mut chunks) = source(92);
    forge_txids(
        &mut chunks[0],
        &[u64::MAX - 3, u64::MAX - 2, u64::MAX - 1, u64::MAX],
    );
    let kmcl = Kmcl::default();
    let d = Driver::new();
    let ch = d.create(&kmcl, 92);
    use_my_callbacks(ch);
    assert_eq!(restore_chunk(ch, &chunks[0]), NtStatus::SUCCESS);
    let _ = take_seen();
    assert_eq!(d.enable(), NtStatus::SUCCESS);
    kmcl.attach_guest(&g).expect("attach");
    d.start();
    kmcl.wait_idle();
    let p = d.packet(77);
    assert_eq!(d.send(p, b"new"), NtStatus::SUCCESS);
    kmcl.wait_idle();
    let got = g.receive_all();
    let txids: Vec<Option<u64>> = got.iter().map(|p| p.txid).collect();
    let mut unique = txids.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(
        unique.len(),
        txids.len(),
        "two packets with one txid: {txids:?}"
    );
    assert!(
        !txids.contains(&Some(0)),
        "the txid counter wrapped to 0: {txids:?}"
    );
    d.disable();
    d.cleanup();
    assert_eq!(kmcl.finish(), vec![]);
}

// ---- deterministic replay against a18007d ---------------------------------------------------------

/// A chunk with the process-wide fields masked (session, transaction ids and the CRCs over
/// them), so the digest does not depend on what other tests of the binary did.
fn masked(chunk: &[u8]) -> Vec<u8> {
    let mut c = chunk.to_vec();
    c[16..24].fill(0);
    c[28..32].fill(0);
    for (at, len) in libs_of(chunk) {
        c[at + 8..at + 16].fill(0);
        c[at + 24..at + 32].fill(0);
        c[at + len - 4..at + len].fill(0);
    }
    c
}

fn fnv(bytes: &[u8], mut h: u64) -> u64 {
    for &b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3);
    }
    h
}

/// Attack (c): one deterministic scenario (seeded schedule): 120 packets of varied sizes, some
/// read and completed by the guest, saved in 700-byte chunks, restored chunk by chunk on a
/// second deterministic instance with `LibBuf` passed in place, re-sent to the guest, saved again.
/// The digest of every output (chunks with process-wide fields masked, bytes the guest received,
/// completions, violations) is the one a18007d gives.
#[test]
fn deterministic_scenario_digest_matches_a18007d() {
    let det = |seed| SimConfig {
        ring_capacity: 3,
        packet_pool_size: 1024,
        schedule: kmcl_sim::Schedule::Deterministic { seed },
        ..SimConfig::default()
    };
    let mut digest = 0xCBF2_9CE4_8422_2325u64;
    let kmcl = Kmcl::new(det(7));
    let (d, g) = running(&kmcl, 93);
    for i in 0..120usize {
        let bytes: Vec<u8> = (0..(i * 7) % 200).map(|j| (i + j) as u8).collect();
        d.post(i + 1, &bytes);
        if i % 9 == 0 {
            kmcl.step();
            if let Some(p) = g.receive() {
                digest = fnv(&p.bytes, digest);
                if i % 2 == 0 {
                    g.complete(p.txid.expect("txid"), &[i as u8; 5])
                        .expect("complete");
                }
            }
        }
    }
    kmcl.wait_idle();
    d.pause();
    let chunks = d.save(700).expect("save");
    for c in &chunks {
        digest = fnv(&masked(c), digest);
    }
    for (tag, status, payload) in d.completions() {
        digest = fnv(&(tag as u64).to_le_bytes(), digest);
        digest = fnv(format!("{status:?}").as_bytes(), digest);
        digest = fnv(&payload, digest);
    }
    g.detach();
    d.disable();
    d.cleanup();
    let v1 = kmcl.finish();
    digest = fnv(format!("{v1:?}").as_bytes(), digest);

    let kmcl = Kmcl::new(det(11));
    let d2 = Driver::new();
    let ch = d2.create(&kmcl, 93);
    use_my_callbacks(ch);
    for (i, c) in chunks.iter().enumerate() {
        let status = restore_chunk(ch, c);
        digest = fnv(format!("{i}{status:?}").as_bytes(), digest);
    }
    let _ = take_seen();
    assert_eq!(d2.enable(), NtStatus::SUCCESS);
    kmcl.attach_guest(&g).expect("attach");
    d2.start();
    kmcl.wait_idle();
    let mut received = 0;
    loop {
        let got = g.receive_all();
        if got.is_empty() {
            break;
        }
        for p in &got {
            received += 1;
            digest = fnv(&p.bytes, digest);
        }
        kmcl.wait_idle();
    }
    d2.pause();
    let again = d2.save(900).expect("save again");
    for c in &again {
        digest = fnv(&masked(c), digest);
    }
    g.detach();
    d2.disable();
    d2.cleanup();
    let v2 = kmcl.finish();
    digest = fnv(format!("{v2:?}").as_bytes(), digest);
    std::println!(
        "digest {digest:#018x} chunks {} again {} received {received} v1 {} v2 {}",
        chunks.len(),
        again.len(),
        v1.len(),
        v2.len()
    );
    // Recorded on a18007d (same scenario, same test file).
    assert_eq!(digest, 0xe475_0c19_f488_30ea);
}
