//! review-locks: SimSpinLock (spin::SpinMutex<_, Yield>) under contention, with panics inside
//! the critical section, and the IRQL it reports; small enough for Miri.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::thread;

use kmcl::DispatchLock;
use kmcl_sim::{Irql, SimSpinLock, current_irql};

#[cfg(miri)]
const ROUNDS: u64 = 20;
#[cfg(not(miri))]
const ROUNDS: u64 = 200_000;

/// Four threads increment a counter the non-atomic way (read, yield-free gap, write) under the
/// lock; every tenth round of one thread panics in the middle of its update. Nothing is lost,
/// the lock is never left held, and each thread is back at PASSIVE after every hold.
#[test]
fn contended_with_panics_inside_loses_no_update() {
    let lock = Arc::new(SimSpinLock::new((0u64, 0u64)));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let lock = Arc::clone(&lock);
            thread::spawn(move || {
                let mut panicked = 0;
                for round in 0..ROUNDS {
                    let panics = t == 0 && round % 10 == 0;
                    let result = catch_unwind(AssertUnwindSafe(|| {
                        lock.with(|(count, inside)| {
                            assert_eq!(*inside, 0, "two holders at once");
                            assert_eq!(current_irql(), Irql::Dispatch);
                            *inside = 1;
                            let seen = *count;
                            std::hint::black_box(seen);
                            if panics {
                                *inside = 0;
                                panic!("inside the lock");
                            }
                            *count = seen + 1;
                            *inside = 0;
                        })
                    }));
                    if result.is_err() {
                        panicked += 1;
                    }
                    assert_eq!(current_irql(), Irql::Passive);
                }
                panicked
            })
        })
        .collect();
    let panicked: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    let (count, inside) = lock.with(|v| *v);
    assert_eq!(inside, 0);
    assert_eq!(count + panicked, 4 * ROUNDS);
}
