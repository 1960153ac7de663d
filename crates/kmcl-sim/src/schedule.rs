//! Deterministic mode ([`Schedule::Deterministic`]): an instance without worker threads, whose
//! KMCL work is run by the threads that wait for it, in an order drawn from a seed.
//!
//! In threaded mode (the default) the passive and DPC workers (`workers.rs`) race the driver's
//! threads, so two runs of one scenario interleave differently and report different figures
//! (issue 11: three runs of the main job with one seed had 991, 1002 and 922 deliveries in flight
//! at the save). In deterministic mode there are no workers. Every place where a thread waits for
//! the simulator instead runs one step of pending work and looks again:
//!
//! * `Shared::wait_deadline`, under every blocking KMCL call (`VmbChannelPause`, `Disable`,
//!   `SaveBegin`'s drain) and under [`Kmcl::wait_idle`](super::Kmcl::wait_idle);
//! * the guest's polling waits ([`Guest::wait_reply`](super::Guest::wait_reply),
//!   [`Guest::wait_ring`](super::Guest::wait_ring)), for the instance the guest is attached to;
//! * the VSP's bounded waits (`DispatchLock::relax` of [`SimSpinLock`](super::SimSpinLock)),
//!   for the deterministic instances created on the calling thread;
//! * [`Kmcl::step`](super::Kmcl::step), for a test that wants to interleave by hand.
//!
//! A step is one turn of one context's loop, what its worker would have done next: a state
//! transition with its callbacks (passive), or ring transfers plus one completion routine,
//! process-packet callback or processing-complete callback (DPC). The seed decides two things:
//! which context goes first when both have work, and how far a DPC step fills the host → guest
//! ring (1 to `ring_capacity` packets), which is what a guest reading concurrently would see. The step runs on the waiting thread marked as a
//! simulator worker of the instance, so the contract checks stay what they are in threaded mode
//! (a blocking KMCL call from a callback is still a violation). While one context's step is under
//! way (say a Suspend transition waiting for incoming packets to be completed), a nested wait can
//! only step the other context, as the other worker would have.
//!
//! When nothing can run and the awaited condition is false, the thread waits on the condition
//! variable as in threaded mode: another thread (a guest driven from a test thread) may still
//! change the state. A scenario that runs everything on one thread is fully reproducible.

use core::cell::RefCell;
use core::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, MutexGuard, Weak};
use std::vec::Vec;

use super::config::Schedule;
use super::irql;
use super::state::{Shared, State};
use super::workers;

/// The scheduling state of one instance.
#[derive(Debug)]
pub(crate) struct Scheduler {
    /// SplitMix64 state; `None` in threaded mode.
    rng: Option<AtomicU64>,
}

impl Scheduler {
    /// The scheduler `schedule` asks for.
    pub(crate) fn new(schedule: Schedule) -> Scheduler {
        Scheduler {
            rng: match schedule {
                Schedule::Threaded => None,
                Schedule::Deterministic { seed } => Some(AtomicU64::new(seed)),
            },
        }
    }

    /// Whether waiting threads run the work (no worker threads).
    pub(crate) fn is_deterministic(&self) -> bool {
        self.rng.is_some()
    }

    /// The next scheduling choice (SplitMix64, the generator the scenarios use). Only called
    /// with the instance state locked, so the order of draws is the order of steps.
    fn next(&self) -> u64 {
        let Some(rng) = &self.rng else {
            return 0;
        };
        let mut z = rng
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

impl Shared {
    /// Deterministic mode: runs one step of pending work on the calling thread; returns whether
    /// anything ran (the caller looks at the state again). Threaded mode: does nothing.
    pub(crate) fn run_one<'a>(
        &'a self,
        st: MutexGuard<'a, State>,
    ) -> (MutexGuard<'a, State>, bool) {
        if !self.schedule.is_deterministic() || st.shutdown {
            return (st, false);
        }
        let passive = workers::passive_runnable(&st);
        let dpc = workers::dpc_ready(&st, &self.config);
        let passive_first = match (passive, dpc) {
            (false, false) => return (st, false),
            (true, false) => true,
            (false, true) => false,
            (true, true) => self.schedule.next() & 1 == 0,
        };
        let _worker = irql::enter_worker(self.id);
        if passive_first {
            workers::passive_once(self, st)
        } else {
            // The transfers of this step fill the ring only part of the way, as far as the seed
            // says: a DPC racing a reading guest moves a varying share before the guest looks.
            // Later steps (and `wait_idle`, which counts a ring with room as work) fill the rest.
            let capacity = self.config.ring_capacity.max(1);
            let limit = 1 + (self.schedule.next() % capacity as u64) as usize;
            // Ring transfers alone (no callback to run) are progress too.
            let (st, _) = workers::dpc_once(self, st, limit);
            (st, true)
        }
    }
}

std::thread_local! {
    /// Deterministic instances created on this thread: the VSP's bounded waits drive them.
    static DRIVEN: RefCell<Vec<Weak<Shared>>> = const { RefCell::new(Vec::new()) };
}

/// Registers a deterministic instance created on this thread.
pub(crate) fn adopt(shared: &Arc<Shared>) {
    DRIVEN.with(|driven| {
        let mut driven = driven.borrow_mut();
        driven.retain(|weak| weak.strong_count() > 0);
        driven.push(Arc::downgrade(shared));
    });
}

/// Runs one step of each live deterministic instance created on this thread; returns whether
/// anything ran. Called where the driver gives the processor away (`DispatchLock::relax`).
pub(crate) fn drive_this_thread() -> bool {
    let instances: Vec<Arc<Shared>> =
        DRIVEN.with(|driven| driven.borrow().iter().filter_map(Weak::upgrade).collect());
    let mut ran = false;
    for shared in instances {
        ran |= shared.step();
    }
    ran
}

impl Shared {
    /// One step of pending work (deterministic mode); whether anything ran.
    pub(crate) fn step(&self) -> bool {
        let st = self.lock();
        let (st, ran) = self.run_one(st);
        drop(st);
        ran
    }
}
