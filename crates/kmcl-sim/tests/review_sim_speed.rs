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
    /// review3: before `VmbPacketRestore`, the driver overwrites the payload in its `LibBuf`
    /// with `X` and refreshes the `LibBuf` CRC (misuse, but a valid `LibBuf`); restores in
    /// place; then scribbles `0xEE` over the payload again.
    WriteBeforeGoodCrc,
    /// review3: as [`Mode::WriteBeforeGoodCrc`] without refreshing the CRC.
    WriteBeforeBadCrc,
    /// review3: the driver moves its `LibBuf` to the start of the buffer it was given it in
    /// (the driver's view of the chunk: its header, already consumed), restores from there,
    /// then scribbles `0xEE` over both the moved and the original payload.
    MovedToViewStart,
    /// review3: in place, then the driver sends a new packet on the channel from inside the
    /// restore callback (channel enabled: `RestoreTiming::AfterEnable`).
    SendDuringRestore,
}

thread_local! {
    /// review3: the offset of each `LibBuf` in the chunk being restored, and the number of
    /// restore callbacks so far (for [`Mode::MovedToViewStart`]).
    static LIB_OFFSETS: RefCell<(Vec<usize>, usize)> = const { RefCell::new((Vec::new(), 0)) };
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
        if matches!(mode, Mode::WriteBeforeGoodCrc | Mode::WriteBeforeBadCrc) && lib_size > 36 {
            // SAFETY: (of the write itself; the write is the misuse under test) `lib` has
            // `lib_size` (> 36) bytes the simulator handed out.
            let all = unsafe { std::slice::from_raw_parts_mut(lib, lib_size as usize) };
            let n = all.len();
            all[32..n - 4].fill(b'X');
            if mode == Mode::WriteBeforeGoodCrc {
                refresh_lib_crc(all);
            }
        }
        if mode == Mode::MovedToViewStart {
            let offset = LIB_OFFSETS.with(|o| {
                let mut o = o.borrow_mut();
                let at = o.0.get(o.1).copied();
                o.1 += 1;
                at
            });
            let offset = offset.expect("offset of this LibBuf");
            // SAFETY: `lib` lies `offset` bytes into the buffer the simulator gave the driver
            // (its view of the whole chunk), so `base .. base + lib_size` is in that buffer.
            let base = unsafe { lib.sub(offset) };
            // SAFETY: both ranges lie in that buffer (misuse: it is `_In_`); may overlap.
            unsafe { std::ptr::copy(lib, base, lib_size as usize) };
            let status = restore_call(p, base, lib_size);
            seen(format!("moved: {status:?}"));
            if status != NtStatus::SUCCESS {
                kcall!(Client.VmbPacketFree, p);
                return status;
            }
            for at in [base, lib] {
                // SAFETY: as above: `at + 32 .. at + lib_size - 4` is the payload of one of the
                // two copies, in the driver's view (the write is the misuse under test).
                let payload = unsafe { at.add(32) };
                // SAFETY: see above.
                unsafe { std::ptr::write_bytes(payload, 0xEE, lib_size as usize - 36) };
            }
            return NtStatus::SUCCESS;
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
        if mode == Mode::SendDuringRestore {
            let q = kcall!(Client.VmbPacketAllocate, ch);
            if !q.is_null() {
                kcall!(Client.VmbPacketSetCompletionRoutine, q, Some(my_completion));
                let status = send_flags(q, b"sent-during-restore", VMBUS_CHANNEL_FORMAT_FLAG_WAIT_FOR_COMPLETION);
                seen(format!("send during restore: {status:?}"));
            }
        }
        if matches!(mode, Mode::ScribbleAfter | Mode::WriteBeforeGoodCrc) && lib_size > 36 {
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

// ---- review3: the driver's view of the chunk, and transaction ids near the wrap ------------------

/// What a review3 scenario produced.
struct Outcome {
    /// The status of the last `VmbChannelRestoreFromBuffer`.
    status: NtStatus,
    /// What the guest received afterwards (transaction id, bytes), if the restore succeeded.
    got: Vec<(Option<u64>, Vec<u8>)>,
    /// What the restore callbacks recorded.
    seen: Vec<String>,
    /// The restored channel saved again right after the restore (before it starts): each
    /// packet's (transaction id, payload) — what the restored packet objects hold.
    resaved: Vec<(u64, Vec<u8>)>,
    /// Every violation.
    violations: Vec<Violation>,
}

/// Restores `chunks` with `mode` on a fresh instance with `config` (enabled first when
/// `config.restore_timing` is `AfterEnable`), then, if that succeeded, starts the channel and
/// lets `g` receive what it sends.
fn restore_with(
    mode: Mode,
    instance: u32,
    config: SimConfig,
    g: &Guest,
    chunks: &[Vec<u8>],
) -> Outcome {
    let after_enable = config.restore_timing == kmcl_sim::RestoreTiming::AfterEnable;
    let kmcl = Kmcl::new(config);
    let d = Driver::new();
    let ch = d.create(&kmcl, instance);
    use_my_callbacks(ch);
    if after_enable {
        assert_eq!(d.enable(), NtStatus::SUCCESS);
    }
    set_mode(mode);
    let mut status = NtStatus::SUCCESS;
    for chunk in chunks {
        LIB_OFFSETS.with(|o| {
            *o.borrow_mut() = (libs_of(chunk).into_iter().map(|(at, _)| at).collect(), 0)
        });
        status = restore_chunk(ch, chunk);
        if status != NtStatus::SUCCESS && status != NtStatus::MORE_PROCESSING_REQUIRED {
            break;
        }
    }
    set_mode(Mode::InPlace);
    let seen = take_seen();
    let mut got = Vec::new();
    let mut resaved = Vec::new();
    if status == NtStatus::SUCCESS {
        for chunk in d.save(1 << 16).expect("save again") {
            for (at, len) in libs_of(&chunk) {
                let lib = &chunk[at..at + len];
                let txid = u64::from_le_bytes(lib[8..16].try_into().unwrap());
                resaved.push((txid, lib[32..len - 4].to_vec()));
            }
        }
        if !after_enable {
            assert_eq!(d.enable(), NtStatus::SUCCESS);
        }
        kmcl.attach_guest(g).expect("attach");
        d.start();
        kmcl.wait_idle();
        got = g
            .receive_all()
            .into_iter()
            .map(|p| (p.txid, p.bytes))
            .collect();
        for p in g.awaiting_completion() {
            let _ = g.complete(p, b"ok");
        }
        kmcl.wait_idle();
        teardown(&kmcl, &d);
    } else {
        d.cleanup();
    }
    let violations = kmcl.finish();
    Outcome {
        status,
        got,
        seen,
        resaved,
        violations,
    }
}

fn bytes_of(got: &[(Option<u64>, Vec<u8>)]) -> Vec<Vec<u8>> {
    got.iter().map(|(_, b)| b.clone()).collect()
}

fn payloads(resaved: &[(u64, Vec<u8>)]) -> Vec<Vec<u8>> {
    resaved.iter().map(|(_, b)| b.clone()).collect()
}

fn assert_unique_txids(resaved: &[(u64, Vec<u8>)], violations: &[Violation]) {
    let txids: Vec<u64> = resaved.iter().map(|(t, _)| *t).collect();
    let mut unique = txids.clone();
    unique.sort_unstable();
    unique.dedup();
    assert!(
        unique.len() == txids.len() && !txids.contains(&0),
        "restored channel saved again: two packets with one txid (or txid 0): {txids:?} \
         (violations {violations:?})"
    );
}

/// The payloads of all four packets of [`source`] (m1 saved as idle).
fn all_saved_payloads() -> Vec<Vec<u8>> {
    let mut all = vec![b"m1-payload-bytes".to_vec()];
    all.extend(saved_payloads());
    all
}

fn saved_payloads() -> Vec<Vec<u8>> {
    vec![
        b"m2-payload-bytes".to_vec(),
        b"m3-payload-bytes".to_vec(),
        b"m4-payload-bytes".to_vec(),
    ]
}

/// review3 attack: the driver writes `X` over the payload of its `LibBuf` *before*
/// `VmbPacketRestore` and refreshes the CRC. The `LibBuf` is then valid, so the restored packet
/// carries the `X`s (what `VmbPacketRestore` read) — and the driver's `0xEE` scribble after the
/// call does not reach it.
#[test]
#[cfg_attr(
    miri,
    ignore = "the driver's write through the _In_ LibBuf is UB under Stacked Borrows"
)]
fn a_libbuf_written_before_packet_restore_with_a_good_crc_restores_the_written_bytes() {
    let (g, chunks) = source(93);
    let out = restore_with(
        Mode::WriteBeforeGoodCrc,
        93,
        SimConfig::default(),
        &g,
        &chunks,
    );
    assert_eq!(out.status, NtStatus::SUCCESS, "{:?}", out.seen);
    // What the restored packets hold (a packet that was in the ring when saved is read by the
    // guest from its own ring memory, so the guest's view is checked only for the others).
    // (m1, completed by the guest before the save, is saved and restored as an idle packet.)
    let xs: Vec<Vec<u8>> = all_saved_payloads()
        .iter()
        .map(|p| vec![b'X'; p.len()])
        .collect();
    assert_eq!(payloads(&out.resaved), xs);
    assert!(
        bytes_of(&out.got)
            .iter()
            .all(|b| b.iter().all(|&x| x == b'X') || saved_payloads().contains(b))
    );
    assert_eq!(out.violations, vec![]);
}

/// review3 attack: as above without refreshing the CRC: refused as a copy with a bad CRC is
/// (`STATUS_INVALID_PARAMETER`, `PacketRestoreMisuse`), and the restore fails with that status.
#[test]
#[cfg_attr(
    miri,
    ignore = "the driver's write through the _In_ LibBuf is UB under Stacked Borrows"
)]
fn a_libbuf_written_before_packet_restore_with_a_bad_crc_is_refused() {
    let (g, chunks) = source(94);
    let out = restore_with(
        Mode::WriteBeforeBadCrc,
        94,
        SimConfig::default(),
        &g,
        &chunks,
    );
    assert_eq!(out.status, NtStatus::INVALID_PARAMETER, "{:?}", out.seen);
    assert_eq!(
        out.seen,
        vec!["in place: STATUS_INVALID_PARAMETER".to_string()]
    );
    let kinds: Vec<ViolationKind> = out.violations.iter().map(|v| v.kind).collect();
    assert_eq!(kinds, vec![ViolationKind::PacketRestoreMisuse]);
}

/// review3 attack: the driver moves its `LibBuf` to the start of its view of the chunk (where
/// the chunk header was: inside the view, but not at the `LibBuf`'s offset), restores from there,
/// then scribbles over both copies. The packets carry the saved payloads.
#[test]
#[cfg_attr(
    miri,
    ignore = "the driver's write through the _In_ LibBuf is UB under Stacked Borrows"
)]
fn a_libbuf_moved_within_the_view_restores_the_saved_bytes() {
    let (g, chunks) = source(95);
    let out = restore_with(
        Mode::MovedToViewStart,
        95,
        SimConfig::default(),
        &g,
        &chunks,
    );
    assert_eq!(out.status, NtStatus::SUCCESS, "{:?}", out.seen);
    assert_eq!(payloads(&out.resaved), all_saved_payloads());
    assert_eq!(bytes_of(&out.got), saved_payloads());
    assert_eq!(out.violations, vec![]);
}

/// review3 attack: the same two chunks fed one after the other (the second restore of a chunk
/// saved in small buffers), with a scribble after every `VmbPacketRestore`: every packet carries
/// its saved payload (the second chunk's view may reuse the first's freed address).
#[test]
#[cfg_attr(
    miri,
    ignore = "the driver's write through the _In_ LibBuf is UB under Stacked Borrows"
)]
fn several_chunks_with_scribbles_restore_the_saved_bytes() {
    for (i, mode) in [Mode::ScribbleAfter, Mode::MovedToViewStart]
        .into_iter()
        .enumerate()
    {
        let instance = 96 + 10 * i as u32;
        let kmcl = Kmcl::new(SimConfig {
            ring_capacity: 2,
            ..SimConfig::default()
        });
        let (d, g) = running(&kmcl, instance);
        let mut want = Vec::new();
        for tag in 1..=6 {
            let bytes = format!("p{tag}-{}", "z".repeat(tag * 7)).into_bytes();
            d.post(tag, &bytes);
            want.push(bytes);
        }
        kmcl.wait_idle();
        d.pause();
        kmcl.wait_idle();
        let chunks = d.save(160).expect("save");
        assert!(chunks.len() >= 3, "{} chunks", chunks.len());
        g.detach();
        d.disable();
        kmcl.wait_idle();
        d.cleanup();
        let _ = kmcl.finish();
        let out = restore_with(mode, instance, SimConfig::default(), &g, &chunks);
        assert_eq!(out.status, NtStatus::SUCCESS, "{mode:?} {:?}", out.seen);
        let mut got = bytes_of(&out.got);
        got.sort();
        let mut w = want.clone();
        w.sort();
        assert_eq!(got, w, "{mode:?}");
        let mut resaved = payloads(&out.resaved);
        resaved.sort();
        assert_eq!(resaved, w, "{mode:?}");
        assert_eq!(out.violations, vec![], "{mode:?}");
    }
}

/// review3 attack: the restore callback of the first unit (after its `VmbPacketRestore`) sends a
/// new packet on the channel being restored (`RestoreTiming::AfterEnable`: the channel is
/// enabled, and `VmbPacketSend` does not look at the restore phase). The saved blob comes from
/// "another process" (its transaction ids are above this process's counter, as after a real
/// servicing restart; simulated here by rewriting them to 2^62 + 0, 1, 2, 3). The send draws the
/// counter, which the first unit's `VmbPacketRestore` raised to 2^62 + 1 — the id of the *next*
/// unit, not yet live, so `next_txid` hands it out; that unit then restores it as well (the
/// duplicate check ran once, before the callbacks). Two live packets with one id on the channel.
/// Moves the process-wide counter: ignored, run alone.
#[test]
#[ignore = "moves the process-wide txid counter; run alone"]
fn a_send_during_restore_does_not_duplicate_a_txid_of_a_later_unit() {
    let (g, mut chunks) = source(97);
    let base = 1u64 << 62;
    forge_txids(&mut chunks[0], &[base, base + 1, base + 2, base + 3]);
    let config = SimConfig {
        restore_timing: kmcl_sim::RestoreTiming::AfterEnable,
        ..SimConfig::default()
    };
    let out = restore_with(Mode::SendDuringRestore, 97, config, &g, &chunks);
    std::println!("{:?}\n{:?}\n{:?}", out.status, out.seen, out.resaved);
    if out.status == NtStatus::SUCCESS {
        assert_unique_txids(&out.resaved, &out.violations);
    }
}

/// review3 attack (counter-independent twin): one chunk whose two packet units carry the same
/// transaction id (forged with valid CRCs). The duplicate check compares the chunk's ids with
/// the ids already live on the channel, not with each other: both are restored.
#[test]
fn a_chunk_with_one_txid_twice_is_refused() {
    let (g, mut chunks) = source(98);
    let libs = libs_of(&chunks[0]);
    let txid_at = |i: usize| {
        let (at, _) = libs[i];
        u64::from_le_bytes(chunks[0][at + 8..at + 16].try_into().unwrap())
    };
    let ids: Vec<u64> = (0..libs.len()).map(txid_at).collect();
    let mut forged = ids.clone();
    forged[2] = ids[1];
    forge_txids(&mut chunks[0], &forged);
    let out = restore_with(Mode::InPlace, 98, SimConfig::default(), &g, &chunks);
    std::println!("{:?}\n{:?}\n{:?}", out.status, out.resaved, out.violations);
    if out.status == NtStatus::SUCCESS {
        assert_unique_txids(&out.resaved, &out.violations);
    }
}

/// A restored, running channel whose 16 restored packets carry (besides the two the guest holds
/// in its ring) u64::MAX - 1, u64::MAX and low ids; the process-wide counter is at u64::MAX.
fn restored_near_the_wrap(instance: u32) -> (Kmcl, std::sync::Arc<Driver>, Guest) {
    let (g, chunks) = near_the_wrap_source(instance);
    restore_near_the_wrap(instance, g, &chunks)
}

/// The source side of [`restored_near_the_wrap`]: the forged chunk (take every source before
/// any restore moves the counter, or a source's own sends draw u64::MAX).
fn near_the_wrap_source(instance: u32) -> (Guest, Vec<Vec<u8>>) {
    let kmcl = Kmcl::new(SimConfig {
        ring_capacity: 2,
        ..SimConfig::default()
    });
    let (d, g) = running(&kmcl, instance);
    for tag in 1..=16 {
        d.post(tag, format!("s{tag}").as_bytes());
    }
    kmcl.wait_idle();
    d.pause();
    kmcl.wait_idle();
    let mut chunks = d.save(8192).expect("save");
    g.detach();
    d.disable();
    kmcl.wait_idle();
    d.cleanup();
    let _ = kmcl.finish();
    assert_eq!(chunks.len(), 1);
    // The first two packets are in the guest's ring memory with their own ids (the guest reads
    // them from there): keep those; the fourteen on the host queue get u64::MAX - 1, u64::MAX and
    // the lowest ids other than those two.
    let libs = libs_of(&chunks[0]);
    assert_eq!(libs.len(), 16);
    let orig: Vec<u64> = libs
        .iter()
        .map(|&(at, _)| u64::from_le_bytes(chunks[0][at + 8..at + 16].try_into().unwrap()))
        .collect();
    let mut forged = vec![orig[0], orig[1], u64::MAX - 1, u64::MAX];
    forged.extend((1..).filter(|id| !orig[..2].contains(id)).take(12));
    forge_txids(&mut chunks[0], &forged);
    (g, chunks)
}

/// The restore side of [`restored_near_the_wrap`].
fn restore_near_the_wrap(
    instance: u32,
    g: Guest,
    chunks: &[Vec<u8>],
) -> (Kmcl, std::sync::Arc<Driver>, Guest) {
    let kmcl = Kmcl::new(SimConfig {
        ring_capacity: 1024,
        packet_pool_size: 1024,
        ..SimConfig::default()
    });
    let d = Driver::new();
    let ch = d.create(&kmcl, instance);
    use_my_callbacks(ch);
    assert_eq!(restore_chunk(ch, &chunks[0]), NtStatus::SUCCESS);
    let _ = take_seen();
    assert_eq!(d.enable(), NtStatus::SUCCESS);
    kmcl.attach_guest(&g).expect("attach");
    d.start();
    kmcl.wait_idle();
    (kmcl, d, g)
}

/// review3 attack: the counter at its end with many ids live on the channel: a restored chunk
/// carries u64::MAX - 1, u64::MAX and 1..=14; then 40 sends. Every id the guest sees is distinct
/// and none is 0. Ignored, run alone.
#[test]
#[ignore = "moves the process-wide txid counter; run alone"]
fn many_sends_after_the_wrap_skip_every_live_id() {
    let (kmcl, d, g) = restored_near_the_wrap(99);
    for tag in 0..40 {
        let p = d.packet(1000 + tag);
        assert_eq!(d.send(p, b"new"), NtStatus::SUCCESS);
    }
    kmcl.wait_idle();
    let txids: Vec<Option<u64>> = g.receive_all().iter().map(|p| p.txid).collect();
    std::println!("{txids:?}");
    assert_eq!(txids.len(), 56);
    let mut unique = txids.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), txids.len(), "duplicate txids: {txids:?}");
    assert!(!txids.contains(&Some(0)), "txid 0: {txids:?}");
    for p in g.awaiting_completion() {
        let _ = g.complete(p, b"ok");
    }
    kmcl.wait_idle();
    teardown(&kmcl, &d);
    assert_eq!(kmcl.finish(), vec![]);
}

/// review3 attack: two restored channels (two instances), both with u64::MAX - 1, u64::MAX and
/// low ids live, send 300 packets each from two threads at once across the wrap: on each channel
/// every id is distinct and none is 0. Ignored, run alone.
#[test]
#[ignore = "moves the process-wide txid counter; run alone"]
fn concurrent_sends_on_two_channels_across_the_wrap() {
    let (ga, ca) = near_the_wrap_source(100);
    let (gb, cb) = near_the_wrap_source(101);
    let a = restore_near_the_wrap(100, ga, &ca);
    let b = restore_near_the_wrap(101, gb, &cb);
    let barrier = Barrier::new(2);
    std::thread::scope(|s| {
        for (_, d, _) in [&a, &b] {
            let barrier = &barrier;
            s.spawn(move || {
                barrier.wait();
                for tag in 0..300 {
                    let p = d.packet(2000 + tag);
                    assert_eq!(d.send(p, b"new"), NtStatus::SUCCESS);
                }
            });
        }
    });
    for (kmcl, d, g) in [a, b] {
        kmcl.wait_idle();
        let txids: Vec<Option<u64>> = g.receive_all().iter().map(|p| p.txid).collect();
        assert_eq!(txids.len(), 316);
        let mut unique = txids.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), txids.len(), "duplicate txids: {txids:?}");
        assert!(!txids.contains(&Some(0)), "txid 0: {txids:?}");
        for p in g.awaiting_completion() {
            let _ = g.complete(p, b"ok");
        }
        kmcl.wait_idle();
        teardown(&kmcl, &d);
        assert_eq!(kmcl.finish(), vec![]);
    }
}

thread_local! {
    /// review3: the address and bytes of the last `LibBuf` a restore callback was given.
    static LAST_LIB: RefCell<(usize, Vec<u8>)> = const { RefCell::new((0, Vec::new())) };
}

kmcl_sys::kmcl_fn! {
    unsafe fn stash_restore(ch: VMBCHANNEL, lib: PVOID, lib_size: u32, _save: PVOID, _save_size: u32) -> NtStatus {
        // SAFETY: the simulator passes `lib_size` readable bytes at `lib`.
        let bytes = unsafe { std::slice::from_raw_parts(lib.cast::<u8>(), lib_size as usize) }.to_vec();
        LAST_LIB.with(|l| *l.borrow_mut() = (lib.addr(), bytes));
        let p = kcall!(Client.VmbPacketAllocate, ch);
        kcall!(Client.VmbPacketSetCompletionRoutine, p, Some(my_completion));
        restore_call(p, lib.cast::<u8>(), lib_size)
    }
}

/// review3 attack: after `VmbChannelRestoreFromBuffer` returned (its view of the chunk freed),
/// the driver calls `VmbPacketRestore` outside any restore callback with a valid `LibBuf` copy
/// placed in a fresh buffer of the chunk's size, at the `LibBuf`'s offset (the allocator may well
/// give it the freed view's address): refused as outside the callback, as before.
#[test]
fn packet_restore_after_the_restore_at_the_old_view_address_is_refused() {
    let (_g, chunks) = source(102);
    let kmcl = Kmcl::default();
    let d = Driver::new();
    let ch = d.create(&kmcl, 102);
    assert_eq!(
        kcall!(
            Server.VmbServerChannelInitSetSaveRestorePacketCallbacks,
            ch,
            Some(my_save),
            Some(stash_restore)
        ),
        NtStatus::SUCCESS
    );
    assert_eq!(restore_chunk(ch, &chunks[0]), NtStatus::SUCCESS);
    let (addr, lib) = LAST_LIB.with(|l| l.borrow().clone());
    let (at, _) = *libs_of(&chunks[0]).last().expect("a LibBuf");
    let mut fresh = vec![0u8; chunks[0].len()];
    fresh[at..at + lib.len()].copy_from_slice(&lib);
    std::println!(
        "old LibBuf at {addr:#x}, new one at {:#x}",
        fresh.as_ptr().addr() + at
    );
    let p = d.packet(5);
    // SAFETY: in bounds of `fresh`.
    let status = restore_call(p, unsafe { fresh.as_mut_ptr().add(at) }, lib.len() as u32);
    assert_eq!(status, NtStatus::INVALID_DEVICE_STATE);
    let kinds: Vec<ViolationKind> = kmcl.take_violations().iter().map(|v| v.kind).collect();
    assert_eq!(kinds, vec![ViolationKind::PacketRestoreMisuse]);
    free(p);
    d.cleanup();
    let _ = kmcl.finish();
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
