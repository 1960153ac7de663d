//! The save path allocates nothing; the restore path allocates only what it must.
//!
//! A counting `#[global_allocator]` counts per thread, only while the test thread has switched
//! counting on, so the simulator's worker threads and the test harness are never counted.
//!
//! Two levels:
//!
//! 1. **Direct**: the VSP's per-packet work called as plain functions — `answer_save_call` (probe,
//!    write, too-small buffer, invalid record, no record), `DeliveryRecord::decode` (plain,
//!    padded, with trace id, corrupted) and `restore_status` — must make **zero** allocations.
//!    The delivery-table lookup and insert cannot be reached with real deliveries from outside the
//!    crate (`DeliveryTable`'s state is `pub(super)`): only their refusal paths are run here, and
//!    the real ones are covered by level 2.
//! 2. **Through the simulator**: the real `Vsp` callbacks, reached through the `kmcl`
//!    trampolines from the simulator's `VmbChannelSaveContinue` / `VmbChannelRestoreFromBuffer`,
//!    which call them synchronously on the calling thread. The simulator allocates on that
//!    thread too (it is a user-mode model with `Vec`s everywhere), so every allocation made
//!    while counting is on is **attributed** from its stack trace: to the innermost `vmbsrv::`
//!    frame's module (`sim` = the simulator, i.e. KMCL's side; `vsp`/`saved`/`kmcl`/`hwcrc` =
//!    the driver), and "in a callback" if a save/restore trampoline is on the stack. This needs
//!    symbols (the test profiles have debug info); a positive control proves the attribution
//!    sees driver allocations where there are some, so the zero results cannot come from
//!    attribution that sees nothing.
//!
//! Asserted: the driver allocates nothing during a whole save (`save_begin`, every
//! `save_continue` with its 2 callback calls per packet, `save_end`); nothing in any restore
//! callback (decode, table insert, packet allocate/restore calls); and outside the callbacks
//! exactly one allocation per restore: `verify_restored`'s scratch vector for the duplicate
//! check (one `u64` per restored delivery), made once after the last chunk. Allocations the
//! simulator makes on KMCL's behalf (its save buffers, packet objects) are reported, not judged.
// UNSAFETY: this test drives the KMCL ABI directly (raw table calls and `extern` callbacks).
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::backtrace::Backtrace;
use std::cell::{Cell, RefCell};

use kmcl_sim::{Guest, Kmcl};
use vmbsrv::kmcl::NtStatus;
use vmbsrv::saved::{DeliveryRecord, RestoreError, crc32c};
use vmbsrv::vsp::save_protocol::{answer_save_call, restore_status};
use vmbsrv::vsp::{DeliveryTable, PostRequest, RestoreProgress, VspChannel};
use vmbsrv_testkit::GuestModel;
use vmbsrv_testkit::MigrationConfig;
use vmbsrv_testkit::migration::{
    Lock, SCENARIO_INSTANCE, SCENARIO_INTERFACE_TYPE, channel_config, query_server_interface,
};

// ---- the counting allocator ---------------------------------------------------------------------

thread_local! {
    /// Count this thread's allocations.
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    /// Also capture a stack trace of each counted allocation.
    static TRACING: Cell<bool> = const { Cell::new(false) };
    /// Inside the allocator's own bookkeeping (capturing a trace allocates): don't recurse.
    static BUSY: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<u64> = const { Cell::new(0) };
    static TRACES: RefCell<Vec<Backtrace>> = const { RefCell::new(Vec::new()) };
}

struct Counting;

impl Counting {
    fn note(&self) {
        let counting = COUNTING.try_with(Cell::get).unwrap_or(false);
        if !counting || BUSY.try_with(Cell::get).unwrap_or(true) {
            return;
        }
        let _ = COUNT.try_with(|c| c.set(c.get() + 1));
        if TRACING.try_with(Cell::get).unwrap_or(false) {
            let _ = BUSY.try_with(|b| b.set(true));
            let trace = Backtrace::force_capture();
            let _ = TRACES.try_with(|t| t.borrow_mut().push(trace));
            let _ = BUSY.try_with(|b| b.set(false));
        }
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; the counting
// only touches this thread's `Cell`s and never fails or unwinds into the caller.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.note();
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which `System` shares.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.note();
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        self.note();
        // SAFETY: `ptr` was allocated by this allocator, i.e. by `System`, with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by this allocator, i.e. by `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Allocations (`alloc`, `alloc_zeroed`, `realloc`) this thread makes during `body`.
fn count<R>(body: impl FnOnce() -> R) -> (R, u64) {
    COUNT.with(|c| c.set(0));
    COUNTING.with(|c| c.set(true));
    let result = body();
    COUNTING.with(|c| c.set(false));
    (result, COUNT.with(Cell::get))
}

/// Who made an allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// Code the driver links: `vmbsrv::{vsp, saved, hwcrc}`, `kmcl` (with `fallible`), `kmcl_sys`.
    Driver,
    /// The simulator, i.e. KMCL's side of the interface.
    Simulator,
    /// Scenario helpers, the test itself, or no `vmbsrv` frame at all.
    Other,
}

/// One attributed allocation.
#[derive(Debug, Clone)]
struct Site {
    owner: Owner,
    /// A save or restore callback trampoline is on the stack.
    in_callback: bool,
    /// The frame the owner was taken from (for failure messages).
    frame: String,
    /// Every `vmbsrv` frame, innermost first.
    stack: Vec<String>,
}

/// The symbol names of a trace, innermost first (`   12: name` lines of its `Display`).
fn symbols(trace: &Backtrace) -> Vec<String> {
    trace
        .to_string()
        .lines()
        .filter_map(|line| {
            let (index, name) = line.trim_start().split_once(": ")?;
            index
                .chars()
                .all(|c| c.is_ascii_digit())
                .then(|| name.to_owned())
        })
        .collect()
}

/// Who a symbol belongs to, if it is one of the workspace's: the simulator (`kmcl_sim`) or code
/// the driver links (`kmcl`, `kmcl_sys`, and `vmbsrv`'s own modules).
fn owner_of(symbol: &str) -> Option<Owner> {
    let path = symbol.strip_prefix('<').unwrap_or(symbol);
    let mut segments = path.split("::");
    match segments.next()? {
        "kmcl_sim" => Some(Owner::Simulator),
        "kmcl" | "kmcl_sys" => Some(Owner::Driver),
        "vmbsrv" => match segments.next()? {
            "vsp" | "saved" | "hwcrc" => Some(Owner::Driver),
            _ => Some(Owner::Other),
        },
        _ => None,
    }
}

fn attribute(trace: &Backtrace) -> Site {
    let stack: Vec<String> = symbols(trace)
        .into_iter()
        .filter(|s| owner_of(s).is_some())
        .collect();
    let in_callback = stack
        .iter()
        .any(|s| s.contains("save_packet_trampoline") || s.contains("restore_packet_trampoline"));
    let (owner, frame) = match stack.first() {
        None => (Owner::Other, String::new()),
        Some(innermost) => {
            let owner = owner_of(innermost).unwrap_or(Owner::Other);
            (owner, innermost.clone())
        }
    };
    Site {
        owner,
        in_callback,
        frame,
        stack,
    }
}

/// Runs `body` counting and tracing this thread's allocations; returns them attributed.
fn traced<R>(body: impl FnOnce() -> R) -> (R, Vec<Site>) {
    TRACES.with(|t| t.borrow_mut().clear());
    TRACING.with(|t| t.set(true));
    let (result, _) = count(body);
    TRACING.with(|t| t.set(false));
    let traces = TRACES.with(|t| std::mem::take(&mut *t.borrow_mut()));
    (result, traces.iter().map(attribute).collect())
}

fn driver_sites(sites: &[Site]) -> Vec<&Site> {
    sites.iter().filter(|s| s.owner == Owner::Driver).collect()
}

// ---- level 1: direct ------------------------------------------------------------------------------

fn record(sequence: u64, trace: bool) -> DeliveryRecord {
    DeliveryRecord {
        sequence,
        tag: 0x1234_5678_9ABC_DEF0,
        posted_at: 133_500_000_000_000_000,
        payload_len: 512,
        payload_crc: 0xCAFE_F00D,
        attempts: 1,
        trace_id: trace.then_some([0x42; 16]),
    }
}

#[test]
fn save_callback_work_allocates_nothing() {
    let plain = record(7, false);
    let traced_record = record(8, true);
    let invalid = DeliveryRecord {
        sequence: 0,
        ..plain
    };
    // Warm the CRC's CPU detection first, so the measured calls are the steady state (it does
    // not allocate either; this only keeps the runs identical).
    crc32c(b"warm up");
    let mut buffer = [0xCC_u8; DeliveryRecord::MAX_ENCODED_LEN + 32];
    let (statuses, allocations) = count(|| {
        let mut statuses = [NtStatus::SUCCESS; 10];
        for (i, rec) in [&plain, &traced_record, &invalid].into_iter().enumerate() {
            let probe = answer_save_call(Some(rec), None);
            let needed = probe.bytes_needed as usize;
            let write = answer_save_call(Some(rec), Some(&mut buffer[..needed.max(1) + 32]));
            let small = answer_save_call(Some(rec), Some(&mut buffer[..8]));
            statuses[i * 3] = probe.status;
            statuses[i * 3 + 1] = write.status;
            statuses[i * 3 + 2] = small.status;
        }
        statuses[9] = answer_save_call(None, Some(&mut buffer[..])).status;
        statuses
    });
    assert_eq!(allocations, 0, "the save callback's work allocated");
    assert_eq!(
        statuses,
        [
            NtStatus::BUFFER_TOO_SMALL,
            NtStatus::SUCCESS,
            NtStatus::BUFFER_TOO_SMALL,
            NtStatus::BUFFER_TOO_SMALL,
            NtStatus::SUCCESS,
            NtStatus::BUFFER_TOO_SMALL,
            NtStatus::INVALID_DEVICE_STATE,
            NtStatus::INVALID_DEVICE_STATE,
            NtStatus::INVALID_DEVICE_STATE,
            // A packet with no delivery fails the save (issue #11, defect 8).
            NtStatus::NOT_FOUND,
        ]
    );
}

#[test]
fn restore_callback_validation_allocates_nothing() {
    let plain = record(7, false);
    let with_trace = record(8, true);
    let mut plain_bytes = [0u8; DeliveryRecord::MIN_ENCODED_LEN + 32];
    plain.encode(&mut plain_bytes).unwrap();
    let mut trace_bytes = [0u8; DeliveryRecord::MAX_ENCODED_LEN];
    with_trace.encode(&mut trace_bytes).unwrap();
    let mut corrupted = plain_bytes;
    corrupted[20] ^= 1;
    crc32c(b"warm up");
    let (results, allocations) = count(|| {
        [
            DeliveryRecord::decode(&plain_bytes[..DeliveryRecord::MIN_ENCODED_LEN]),
            DeliveryRecord::decode(&plain_bytes), // padded with zeros, as KMCL may hand it back
            DeliveryRecord::decode(&trace_bytes),
            DeliveryRecord::decode(&corrupted),
            DeliveryRecord::decode(&plain_bytes[..20]),
        ]
    });
    let status = count(|| restore_status(RestoreError::BadChecksum));
    assert_eq!(allocations, 0, "decoding allocated");
    assert_eq!(status, (NtStatus::CRC_ERROR, 0));
    assert_eq!(results[0], Ok(plain));
    assert_eq!(results[1], Ok(plain));
    assert_eq!(results[2], Ok(with_trace));
    assert_eq!(results[3], Err(RestoreError::BadChecksum));
    assert_eq!(results[4], Err(RestoreError::Truncated));
}

#[test]
fn table_refusal_paths_allocate_nothing() {
    // Only what is reachable from outside the crate: a lookup with a token that matches no
    // delivery, and an insert the (fresh) sequence counter refuses. The hit paths run in the
    // simulator test below.
    let mut table = DeliveryTable::try_new(64).unwrap();
    let token = std::num::NonZeroUsize::new(1).unwrap();
    let (results, allocations) = count(|| {
        (
            table.delivery_for_save(Some(token)),
            table
                .insert_restored(record(1, false), 1)
                .map_err(|e| e.status()),
        )
    });
    assert_eq!(allocations, 0);
    assert_eq!(results, (None, Err(NtStatus::DATA_ERROR)));
}

#[test]
fn counting_is_per_thread_and_sees_allocations() {
    let (boxed, here) = count(|| Box::new(5_u64));
    assert_eq!((*boxed, here), (5, 1));
    let (_, elsewhere) = count(|| {
        std::thread::scope(|s| {
            // Spawning allocates on this thread; the thread's own allocation is not counted.
            s.spawn(|| drop(Box::new(6_u64))).join().unwrap();
        })
    });
    let (_, spawn_only) = count(|| std::thread::scope(|s| s.spawn(|| ()).join().unwrap()));
    assert_eq!(elsewhere, spawn_only);
}

// ---- level 2: through the simulator --------------------------------------------------------------

const PACKETS: u32 = 24;

#[test]
fn real_callbacks_through_the_simulator() {
    // ---- source: a channel holding PACKETS undelivered posts (a third with trace ids)
    let kmcl = Kmcl::new(MigrationConfig::sim_for(PACKETS + 1));
    let guest = GuestModel::new(Guest::new(SCENARIO_INTERFACE_TYPE, SCENARIO_INSTANCE));
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    let mut record_bytes = [0u8; vmbsrv::saved::ChannelRecord::ENCODED_LEN + 20];
    {
        let interface = query_server_interface(&kmcl).unwrap();
        kmcl.attach_guest(&guest.endpoint).unwrap();
        let channel =
            VspChannel::<Lock>::create(&interface, &channel_config(&kmcl, PACKETS + 1, 256))
                .unwrap();
        guest.open_and_negotiate(&kmcl).unwrap();
        let payload = [0x5A_u8; 64];
        let post = |tag: u64| PostRequest {
            tag,
            payload: &payload,
            posted_at: tag,
            trace_id: tag.is_multiple_of(3).then_some([tag as u8; 16]),
        };
        for tag in 0..u64::from(PACKETS) - 1 {
            channel.post(&post(tag)).unwrap();
        }
        // Positive control: a post allocates its message buffer in `VspChannel::post`, and the
        // attribution must see it as the driver's (and the simulator's copy as the simulator's).
        let (sequence, sites) = traced(|| channel.post(&post(u64::from(PACKETS) - 1)));
        sequence.unwrap();
        let driver = driver_sites(&sites);
        assert!(
            driver
                .iter()
                .any(|s| s.frame.contains("VspChannel") && s.frame.contains("post")),
            "attribution broken (no symbols?): {sites:#?}"
        );
        assert!(sites.iter().any(|s| s.owner == Owner::Simulator));
        kmcl.wait_idle();
        assert_eq!(channel.statistics().in_flight, PACKETS);

        // ---- the save, every call the control side makes
        let mut buffer = vec![0u8; 2048]; // several chunks
        let (saved, sites) = traced(|| {
            let record = channel.save_begin()?;
            let mut progress = Vec::new();
            loop {
                let chunk = channel.save_continue(&mut buffer)?;
                progress.push((chunk.status, chunk.filled as usize));
                if chunk.status != NtStatus::BUFFER_OVERFLOW {
                    break;
                }
            }
            channel.save_end()?;
            Ok::<_, NtStatus>((record, progress))
        });
        // `progress` is the test's own Vec (Owner::Other); copy the chunks out afterwards.
        let (_, progress) = saved.unwrap();
        assert!(progress.len() > 1, "expected several chunks: {progress:?}");
        let driver = driver_sites(&sites);
        assert!(
            driver.is_empty(),
            "the driver allocated during a save: {driver:#?}"
        );
        // The save protocol ran on this thread: the simulator's save buffer, grown inside the
        // protocol right before the first second-call (which runs synchronously on the same
        // thread, as every packet's calls do: VmbChannelSaveContinue calls them in turn). The
        // simulator reuses that buffer from packet to packet, so it allocates once per save, not
        // once per packet (docs/performance.md §6); the packets' calls all run inside the traced
        // `save_continue` calls on this thread, and the restore below rebuilds all PACKETS.
        let protocol = sites
            .iter()
            .filter(|s| s.stack.iter().any(|f| f.contains("save_packet_protocol")))
            .count();
        assert!(protocol >= 1, "{protocol} < 1: {sites:#?}");
        let in_callback = sites.iter().filter(|s| s.in_callback).count();
        println!(
            "save of {PACKETS} packets: {} allocations on this thread, driver 0, simulator {} ({} inside callbacks)",
            sites.len(),
            sites.iter().filter(|s| s.owner == Owner::Simulator).count(),
            in_callback,
        );
        // Re-save into chunks the restore can use (the traced run's chunks went into `buffer`
        // one at a time); the same channel can be saved again. The channel record must be this
        // save's: each save has its own identity, and a record restores only with its own chunks.
        let record = channel.save_begin().unwrap();
        let _ = record.encode(&mut record_bytes).unwrap();
        loop {
            let chunk = channel.save_continue(&mut buffer).unwrap();
            chunks.push(buffer[..chunk.filled as usize].to_vec());
            if chunk.status != NtStatus::BUFFER_OVERFLOW {
                assert_eq!(chunk.status, NtStatus::SUCCESS);
                break;
            }
        }
        channel.save_end().unwrap();
        guest.endpoint.detach();
        channel.complete_migration().unwrap();
        kmcl.wait_idle();
    }
    assert_eq!(kmcl.finish(), vec![]);

    // ---- destination: the restore, chunk by chunk
    let kmcl = Kmcl::new(MigrationConfig::sim_for(PACKETS + 1));
    {
        let interface = query_server_interface(&kmcl).unwrap();
        // Creating the channel allocates its delivery table, once, before any restore.
        let channel = VspChannel::<Lock>::create_for_restore(
            &interface,
            &channel_config(&kmcl, PACKETS + 1, 256),
        )
        .unwrap();
        let (result, sites) = traced(|| channel.restore_channel_record(&record_bytes));
        result.unwrap();
        assert!(driver_sites(&sites).is_empty(), "{sites:#?}");

        let mut all = Vec::new();
        let mut last = None;
        for chunk in &chunks {
            let (progress, sites) = traced(|| channel.restore_chunk(chunk));
            last = Some(progress.unwrap());
            all.extend(sites);
        }
        assert_eq!(last, Some(RestoreProgress::Complete));
        assert_eq!(channel.statistics().in_flight, PACKETS);

        let in_callback: Vec<&Site> = all
            .iter()
            .filter(|s| s.owner == Owner::Driver && s.in_callback)
            .collect();
        assert!(
            in_callback.is_empty(),
            "the restore callback allocated: {in_callback:#?}"
        );
        let outside: Vec<&Site> = all
            .iter()
            .filter(|s| s.owner == Owner::Driver && !s.in_callback)
            .collect();
        // Duplicates are refused on insertion through the index the table allocated at creation,
        // so the restore allocates nothing at all in the driver (the sorted scratch copy it once
        // needed is gone, issue #11).
        assert!(
            outside.is_empty(),
            "the restore allocated outside its callback: {outside:#?}"
        );
        // The callbacks ran on this thread: the simulator's copy of each saved buffer is made
        // right before it calls the restore callback, synchronously.
        let feeds = all
            .iter()
            .filter(|s| s.stack.iter().any(|f| f.contains("restore_from_buffer")))
            .count();
        assert!(feeds >= PACKETS as usize, "{feeds} < {PACKETS}");
        println!(
            "restore of {PACKETS} packets: {} allocations on this thread, driver 0, simulator {} ({} inside callbacks: packet objects)",
            all.len(),
            all.iter().filter(|s| s.owner == Owner::Simulator).count(),
            all.iter()
                .filter(|s| s.owner == Owner::Simulator && s.in_callback)
                .count(),
        );
        channel.disable().unwrap();
        kmcl.wait_idle();
    }
    assert_eq!(kmcl.finish(), vec![]);
}
