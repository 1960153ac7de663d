//! Concurrency stress: the races that matter for exactly-once delivery, with real threads.
//!
//! The simulator delivers completions and runs process-packet callbacks on its own DPC thread and
//! the state-change callbacks on its passive thread; the tests add a guest thread (the VM's
//! vCPUs) and a host posting thread (a control client) next to the test thread's control
//! operations:
//!
//! * completion routines racing a save — the guest completes held deliveries while the host
//!   runs `save_begin` (freeze, pause, `VmbChannelSaveBegin`), the chunks and `save_end`, then
//!   either migrates (restore on a new simulator instance) or resumes (an aborted migration);
//! * posts racing suspend — a thread posts in a loop while the host pauses through
//!   `save_begin` … `save_end` + `resume`, again and again (the simulator records any
//!   `VmbPacketSend` after `EvtChannelSuspend` as a `SendWhileSuspended` violation);
//! * posts racing a guest close/reopen — the same poster while the guest closes (its deliveries
//!   come back cancelled) and reopens;
//! * restore racing guest completions — the guest (whose channel survived the migration) is
//!   attached and completes its held deliveries while `finish_restore` enables and starts the
//!   restored channel.
//!
//! Random, seeded delays shift the interleavings from one iteration to the next. Every iteration
//! ends with no KMCL violation on any instance and the exactly-once ledger clean (`Ledger`; for
//! the close/reopen race, every delivery the close cancelled is accounted for as exactly one
//! `Cancelled` outcome and nothing else is lost). The default iteration counts keep the file under
//! a few seconds in debug; `heavy_stress` (ignored) runs each race 1000 times.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use kmcl_sim::{Guest, Kmcl, SimConfig};
use vmbsrv::kmcl::NtStatus;
use vmbsrv::vsp::{Outcome, OutcomeKind, Phase, PostRequest, VspChannel};
use vmbsrv_testkit::migration::{
    Lock, SCENARIO_INSTANCE, SCENARIO_INTERFACE_TYPE, channel_config, query_server_interface,
    restore_channel, save_channel,
};
use vmbsrv_testkit::{GuestModel, Ledger, MigrationConfig, Posted, Rng, Verdict};

const IN_FLIGHT: u32 = 16;
const MAX_MESSAGE: u32 = 48;

fn sim() -> SimConfig {
    MigrationConfig::sim_for(IN_FLIGHT)
}

/// A short random pause: nothing, a few yields, or a few microseconds of sleep.
fn jitter(rng: &mut Rng) {
    match rng.below(4) {
        0 => {}
        1 => (0..rng.below(8)).for_each(|_| thread::yield_now()),
        2 => (0..rng.below(2000)).for_each(|_| std::hint::spin_loop()),
        _ => thread::sleep(Duration::from_micros(rng.below(200))),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Drains every recorded outcome into `ledger`; returns the cancelled ones.
fn drain(channel: &VspChannel<'_, Lock>, ledger: &Mutex<Ledger>) -> u64 {
    let mut batch = [Outcome {
        sequence: 0,
        tag: 0,
        kind: OutcomeKind::Acked,
        attempts: 0,
    }; 32];
    let mut cancelled = 0;
    loop {
        let count = channel.drain_outcomes(&mut batch);
        let mut ledger = lock(ledger);
        for outcome in &batch[..count] {
            cancelled += u64::from(outcome.kind == OutcomeKind::Cancelled);
            ledger.outcome(outcome);
        }
        if count < batch.len() {
            return cancelled;
        }
    }
}

/// Posts one message with a payload derived from `tag`; records it in the ledger on success.
fn post(channel: &VspChannel<'_, Lock>, ledger: &Mutex<Ledger>, tag: u64) -> Result<u64, NtStatus> {
    let payload: Vec<u8> = (0..1 + tag % u64::from(MAX_MESSAGE))
        .map(|i| (tag ^ i) as u8)
        .collect();
    let sequence = channel.post(&PostRequest {
        tag,
        payload: &payload,
        posted_at: tag,
        trace_id: None,
    })?;
    lock(ledger).posted(sequence, Posted::new(tag, &payload));
    Ok(sequence)
}

/// The guest reads and acknowledges everything until nothing is in flight.
fn settle(
    kmcl: &Kmcl,
    guest: &mut GuestModel,
    channel: &VspChannel<'_, Lock>,
    ledger: &Mutex<Ledger>,
) -> u64 {
    let mut cancelled = 0;
    for _ in 0..10_000 {
        kmcl.wait_idle();
        guest.pump(&mut lock(ledger));
        guest.acknowledge(usize::MAX, None);
        kmcl.wait_idle();
        cancelled += drain(channel, ledger);
        if channel.statistics().in_flight == 0 && guest.held() == 0 {
            return cancelled;
        }
    }
    panic!("deliveries never settled: {:?}", channel.statistics());
}

fn assert_clean(what: &str, verdict: Verdict, posted: u64) {
    assert!(verdict.is_clean(), "{what}: {verdict:?}");
    assert_eq!(verdict.delivered, posted, "{what}: {verdict:?}");
}

fn finish(kmcl: Kmcl, what: &str) {
    let violations = kmcl.finish();
    assert!(violations.is_empty(), "{what}: {violations:#?}");
}

/// A source channel with `posts` deliveries the guest holds (read, not acknowledged).
struct Busy<'i> {
    channel: VspChannel<'i, Lock>,
    guest: GuestModel,
    ledger: Mutex<Ledger>,
}

fn busy<'i>(kmcl: &Kmcl, interface: &'i vmbsrv::kmcl::ServerInterface, posts: u64) -> Busy<'i> {
    let guest = GuestModel::new(Guest::new(SCENARIO_INTERFACE_TYPE, SCENARIO_INSTANCE));
    kmcl.attach_guest(&guest.endpoint).unwrap();
    let channel = VspChannel::create(interface, &channel_config(kmcl, IN_FLIGHT, MAX_MESSAGE))
        .expect("create");
    guest.open_and_negotiate(kmcl).expect("negotiate");
    let ledger = Mutex::new(Ledger::new());
    for tag in 0..posts {
        post(&channel, &ledger, tag).expect("post");
    }
    kmcl.wait_idle();
    let mut busy = Busy {
        channel,
        guest,
        ledger,
    };
    busy.guest.pump(&mut lock(&busy.ledger));
    busy
}

/// Race 1: the guest completes its held deliveries one by one while the host saves; then the
/// save is used for a migration (odd seeds) or abandoned with `resume` (even seeds). Returns
/// whether the save cut into the completions (some, but not all, were processed before it).
fn completions_race_a_save(seed: u64) -> bool {
    let what = format!("completions vs save, seed {seed}");
    let mut rng = Rng::new(seed);
    let posts = 4 + rng.below(u64::from(IN_FLIGHT) - 4);
    let migrate = seed % 2 == 1;
    let cut;
    let kmcl = Kmcl::new(sim());
    let (stream, mut guest, ledger) = {
        let interface = query_server_interface(&kmcl).unwrap();
        let Busy {
            channel,
            mut guest,
            ledger,
        } = busy(&kmcl, &interface, posts);
        let mut guest_rng = Rng::new(seed ^ 0xA5A5);
        let (stream, guest_back) = thread::scope(|scope| {
            let acking = scope.spawn(move || {
                while guest.held() > 0 {
                    guest.acknowledge(1, Some(&mut guest_rng));
                    jitter(&mut guest_rng);
                }
                guest
            });
            jitter(&mut rng);
            let (stream, _, _) = save_channel(&channel, 64 + rng.below(512) as usize)
                .unwrap_or_else(|e| panic!("{what}: {e:?}"));
            (stream, acking.join().unwrap())
        });
        let saved = saved_in_flight(&stream);
        cut = saved > 0 && u64::from(saved) < posts;
        guest = guest_back;
        assert_eq!(channel.phase(), Phase::Saved);
        if migrate {
            guest.endpoint.detach();
            channel.complete_migration().unwrap();
            kmcl.wait_idle();
            drain(&channel, &ledger);
        } else {
            channel.resume().unwrap();
            assert_eq!(settle(&kmcl, &mut guest, &channel, &ledger), 0);
            channel.disable().unwrap();
            kmcl.wait_idle();
            drain(&channel, &ledger);
        }
        drop(channel);
        (stream, guest, ledger)
    };
    finish(kmcl, &what);
    if migrate {
        let kmcl = Kmcl::new(sim());
        {
            let interface = query_server_interface(&kmcl).unwrap();
            let channel: VspChannel<'_, Lock> = VspChannel::create_for_restore(
                &interface,
                &channel_config(&kmcl, IN_FLIGHT, MAX_MESSAGE),
            )
            .unwrap();
            restore_channel(&channel, &stream).unwrap_or_else(|e| panic!("{what}: {e:?}"));
            kmcl.attach_guest(&guest.endpoint).unwrap();
            assert_eq!(settle(&kmcl, &mut guest, &channel, &ledger), 0);
            channel.disable().unwrap();
            kmcl.wait_idle();
            drain(&channel, &ledger);
        }
        finish(kmcl, &what);
    }
    assert_clean(&what, lock(&ledger).verdict(), posts);
    cut
}

/// Deliveries a save stream's channel record says are in flight.
fn saved_in_flight(stream: &[u8]) -> u32 {
    use vmbsrv::saved::stream::{FrameKind, FrameReader};
    let frame = FrameReader::new(stream)
        .unwrap()
        .map(Result::unwrap)
        .find(|frame| frame.kind == FrameKind::ChannelRecord)
        .unwrap();
    vmbsrv::saved::ChannelRecord::decode(frame.payload)
        .unwrap()
        .in_flight
}

/// What the host's control thread does to the channel while a thread posts.
#[derive(Clone, Copy, Debug)]
enum Disturbance {
    /// `save_begin` (freeze, pause), the whole save, `save_end`, `resume`.
    PauseBySave,
    /// The guest closes its channel (its deliveries come back cancelled) and reopens it.
    GuestReopen,
}

/// Sets its flag when dropped, also while unwinding.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Races 2 and 3: a thread posts in a loop and a guest thread acknowledges, while the test
/// thread disturbs the channel three times. Returns (posts accepted, posts refused because the
/// channel was frozen or had no negotiated guest at that moment).
fn posts_race(disturbance: Disturbance, seed: u64) -> (u64, u64) {
    let what = format!("posts vs {disturbance:?}, seed {seed}");
    let mut rng = Rng::new(seed);
    let kmcl = Kmcl::new(sim());
    let (posted, refused, cancelled, verdict) = {
        let interface = query_server_interface(&kmcl).unwrap();
        let Busy {
            channel,
            guest,
            ledger,
        } = busy(&kmcl, &interface, 0);
        let guest = Mutex::new(guest);
        let stop = AtomicBool::new(false);
        let (posted, refused, cancelled_during) = thread::scope(|scope| {
            // A failed disturbance panics on this thread; `thread::scope` then waits for the
            // loops below before passing the panic on, so they must be told to stop on the way
            // out too (they ran forever, and the test hung instead of failing).
            let _stop_on_exit = StopOnDrop(&stop);
            let poster = scope.spawn(|| {
                let mut rng = Rng::new(seed ^ 0x5151);
                let mut tag = 0;
                let mut posted = 0u64;
                let mut cancelled = 0u64;
                let mut refused = 0u64;
                while !stop.load(Ordering::Acquire) {
                    match post(&channel, &ledger, tag) {
                        Ok(_) => posted += 1,
                        Err(NtStatus::QUOTA_EXCEEDED) => cancelled += drain(&channel, &ledger),
                        // Frozen for a save, or no negotiated guest right now.
                        Err(NtStatus::INVALID_DEVICE_STATE) => {
                            refused += 1;
                            thread::yield_now();
                        }
                        Err(status) => panic!("post refused with {status:?}"),
                    }
                    tag += 1;
                    jitter(&mut rng);
                }
                (posted, refused, cancelled)
            });
            let acker = scope.spawn(|| {
                let mut rng = Rng::new(seed ^ 0x7777);
                while !stop.load(Ordering::Acquire) {
                    {
                        let mut guest = lock(&guest);
                        guest.pump(&mut lock(&ledger));
                        guest.acknowledge(usize::MAX, Some(&mut rng));
                    }
                    jitter(&mut rng);
                }
            });
            for _ in 0..3 {
                jitter(&mut rng);
                thread::sleep(Duration::from_micros(300));
                match disturbance {
                    Disturbance::PauseBySave => {
                        save_channel(&channel, 256).unwrap_or_else(|e| panic!("{what}: {e:?}"));
                        jitter(&mut rng);
                        channel.resume().unwrap();
                    }
                    Disturbance::GuestReopen => {
                        let mut closing = lock(&guest);
                        closing.endpoint.close().unwrap();
                        kmcl.wait_idle();
                        // What the guest held was cancelled with the close.
                        closing.acknowledge(usize::MAX, None);
                        drop(closing);
                        jitter(&mut rng);
                        lock(&guest).open_and_negotiate(&kmcl).unwrap();
                    }
                }
            }
            thread::sleep(Duration::from_micros(300));
            stop.store(true, Ordering::Release);
            let counts = poster.join().unwrap();
            acker.join().unwrap();
            counts
        });
        let mut guest = guest.into_inner().unwrap();
        let cancelled = cancelled_during + settle(&kmcl, &mut guest, &channel, &ledger);
        channel.disable().unwrap();
        kmcl.wait_idle();
        assert_eq!(
            drain(&channel, &ledger),
            0,
            "{what}: nothing left to cancel"
        );
        let verdict = lock(&ledger).verdict();
        (posted, refused, cancelled, verdict)
    };
    finish(kmcl, &what);
    match disturbance {
        Disturbance::PauseBySave => {
            assert_eq!(cancelled, 0, "{what}");
            assert_clean(&what, verdict, posted);
        }
        Disturbance::GuestReopen => {
            // Exactly once or cancelled exactly once: never duplicated, corrupted or silently
            // lost (every unacknowledged delivery has its one Cancelled outcome).
            assert_eq!(verdict.duplicated, 0, "{what}: {verdict:?}");
            assert_eq!(verdict.corrupted, 0, "{what}: {verdict:?}");
            assert_eq!(verdict.lost, cancelled, "{what}: {verdict:?}");
            assert_eq!(verdict.delivered + cancelled, posted, "{what}: {verdict:?}");
        }
    }
    (posted, refused)
}

/// Race 4: the guest, whose open channel survived the migration and who had completions
/// pending in its memory, is attached and completes its held deliveries while the host finishes
/// the restore (enable + start). Returns whether the guest completed some deliveries before
/// `finish_restore` returned and some after.
fn restore_races_completions(seed: u64) -> bool {
    let what = format!("restore vs completions, seed {seed}");
    let mut rng = Rng::new(seed);
    let posts = 4 + rng.below(u64::from(IN_FLIGHT) - 4);
    let kmcl = Kmcl::new(sim());
    let (stream, mut guest, ledger) = {
        let interface = query_server_interface(&kmcl).unwrap();
        let Busy {
            channel,
            mut guest,
            ledger,
        } = busy(&kmcl, &interface, posts);
        let (stream, _, _) = save_channel(&channel, 512).unwrap();
        // The paused VM still completes some packets: those completions stay in its memory.
        guest.acknowledge(rng.below(posts) as usize, Some(&mut rng));
        guest.endpoint.detach();
        channel.complete_migration().unwrap();
        kmcl.wait_idle();
        drain(&channel, &ledger);
        drop(channel);
        (stream, guest, ledger)
    };
    finish(kmcl, &what);

    let kmcl = Kmcl::new(sim());
    let raced;
    {
        let interface = query_server_interface(&kmcl).unwrap();
        let channel: VspChannel<'_, Lock> = VspChannel::create_for_restore(
            &interface,
            &channel_config(&kmcl, IN_FLIGHT, MAX_MESSAGE),
        )
        .unwrap();
        let mut chunks_only = stream.clone();
        // Feed everything but finish the restore separately, on this thread, racing the guest.
        restore_without_finish(&channel, &mut chunks_only);
        kmcl.attach_guest(&guest.endpoint).unwrap();
        let mut guest_rng = Rng::new(seed ^ 0x3C3C);
        let finished = AtomicBool::new(false);
        let (guest_back, before, after) = thread::scope(|scope| {
            let acking = scope.spawn(|| {
                let (mut before, mut after) = (0, 0);
                while guest.held() > 0 {
                    jitter(&mut guest_rng);
                    let count =
                        guest.acknowledge(1 + guest_rng.below(3) as usize, Some(&mut guest_rng));
                    if finished.load(Ordering::Acquire) {
                        after += count;
                    } else {
                        before += count;
                    }
                }
                (guest, before, after)
            });
            jitter(&mut rng);
            channel
                .finish_restore()
                .unwrap_or_else(|e| panic!("{what}: {e:?}"));
            finished.store(true, Ordering::Release);
            acking.join().unwrap()
        });
        guest = guest_back;
        raced = before > 0 && after > 0;
        assert_eq!(settle(&kmcl, &mut guest, &channel, &ledger), 0);
        channel.disable().unwrap();
        kmcl.wait_idle();
        drain(&channel, &ledger);
    }
    finish(kmcl, &what);
    assert_clean(&what, lock(&ledger).verdict(), posts);
    raced
}

/// Feeds a save stream's record and chunks, leaving the channel `Restored` (not started).
fn restore_without_finish(channel: &VspChannel<'_, Lock>, stream: &mut [u8]) {
    use vmbsrv::saved::stream::{FrameKind, FrameReader};
    for frame in FrameReader::new(stream).unwrap() {
        let frame = frame.unwrap();
        match frame.kind {
            FrameKind::ChannelRecord => channel.restore_channel_record(frame.payload).unwrap(),
            FrameKind::KmclChunk => {
                channel.restore_chunk(frame.payload).unwrap();
            }
        }
    }
    assert_eq!(channel.phase(), Phase::Restored);
}

/// Iterations of each race in the default run (the whole file stays within a few seconds).
const ITERATIONS: u64 = 400;
/// Iterations of each race in `heavy_stress`.
const HEAVY_ITERATIONS: u64 = 20_000;

/// Runs `race` for `seeds`; returns in how many iterations the race really happened.
fn stress(seeds: std::ops::Range<u64>, race: impl Fn(u64) -> bool) -> u64 {
    seeds.map(|seed| u64::from(race(seed))).sum()
}

#[test]
fn completion_routines_race_a_save() {
    let cut = stress(0..ITERATIONS, completions_race_a_save);
    println!("completions vs save: {ITERATIONS} iterations, {cut} saves cut into the completions");
    assert!(cut > 0, "the save never cut into the guest's completions");
}

#[test]
fn posts_race_a_pause_by_save() {
    let (mut posted, mut refused) = (0, 0);
    for seed in 0..ITERATIONS / 2 {
        let (p, r) = posts_race(Disturbance::PauseBySave, seed);
        posted += p;
        refused += r;
    }
    println!(
        "posts vs pause: {} iterations, {posted} posts delivered exactly once, {refused} refused \
         while frozen",
        ITERATIONS / 2
    );
    assert!(posted > 0, "nothing was ever posted");
    assert!(refused > 0, "no post ever met a frozen channel");
}

#[test]
fn posts_race_a_guest_close_and_reopen() {
    let (mut posted, mut refused) = (0, 0);
    for seed in 0..ITERATIONS / 2 {
        let (p, r) = posts_race(Disturbance::GuestReopen, seed);
        posted += p;
        refused += r;
    }
    println!(
        "posts vs guest close/reopen: {} iterations, {posted} posts accounted for exactly once, \
         {refused} refused while the guest was away",
        ITERATIONS / 2
    );
    assert!(posted > 0, "nothing was ever posted");
    assert!(refused > 0, "no post ever met a closed channel");
}

#[test]
fn restore_races_guest_completions() {
    let raced = stress(0..ITERATIONS, restore_races_completions);
    println!(
        "restore vs completions: {ITERATIONS} iterations, {raced} with completions on both sides \
         of finish_restore"
    );
    assert!(raced > 0, "the guest never completed across finish_restore");
}

#[test]
#[ignore = "heavy: 20000 iterations of each race (a few minutes); run before a release"]
fn heavy_stress() {
    let seeds = ITERATIONS..ITERATIONS + HEAVY_ITERATIONS;
    let cut = stress(seeds.clone(), completions_race_a_save);
    let paused = stress(seeds.clone(), |s| {
        posts_race(Disturbance::PauseBySave, s).1 > 0
    });
    let reopened = stress(seeds.clone(), |s| {
        posts_race(Disturbance::GuestReopen, s).1 > 0
    });
    let raced = stress(seeds, restore_races_completions);
    println!(
        "heavy: {HEAVY_ITERATIONS} iterations per race; cut {cut}, paused {paused}, reopened \
         {reopened}, raced {raced}"
    );
}
