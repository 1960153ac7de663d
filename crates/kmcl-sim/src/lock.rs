//! The simulator's implementation of the VSP's [`DispatchLock`]: a spin lock that also raises the
//! holder's simulated IRQL to DISPATCH_LEVEL, as `KeAcquireSpinLock` does.
//!
//! Holding it therefore makes every PASSIVE-only KMCL call a recorded violation (for example a
//! `VmbChannelPause` made while the delivery table is locked), and a blocking wait inside it shows
//! up as the simulator's hang detection.
//!
//! A spin lock, like the `KSPIN_LOCK` it stands for, rather than `std::sync::Mutex`: its release
//! is a plain store, where the futex mutex's release is a second atomic read-modify-write (it
//! must learn whether a waiter sleeps). The VSP takes this lock once or twice per packet, so
//! that atomic was a measurable part of a packet's save and restore (docs/performance.md §8.9).
//! A thread that finds it held yields its processor between looks (`spin::relax::Yield`):
//! unlike a kernel spin-lock holder at DISPATCH_LEVEL, a simulator thread holding it can be
//! preempted, and a waiter must let it run even on one processor.

use super::irql::{Irql, raise_irql};
use kmcl::DispatchLock;
use spin::mutex::SpinMutex;
use spin::relax::Yield;

/// A spin lock as the simulator models one.
pub struct SimSpinLock<T>(SpinMutex<T, Yield>);

impl<T: core::fmt::Debug> core::fmt::Debug for SimSpinLock<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_tuple("SimSpinLock").field(&self.0).finish()
    }
}

impl<T: Send> DispatchLock<T> for SimSpinLock<T> {
    fn new(value: T) -> Self {
        Self(SpinMutex::new(value))
    }

    fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        // Raise first, as KeAcquireSpinLock does, so the IRQL is DISPATCH for the whole hold.
        // The guard is declared last, so it is released before the IRQL is lowered again.
        let _irql = raise_irql(Irql::Dispatch);
        let mut guard = self.0.lock();
        f(&mut guard)
    }

    fn relax() {
        // In deterministic mode there is no worker to give the processor to: the waiting thread
        // runs a step of the work itself (docs/simulator.md, deterministic mode).
        if super::schedule::drive_this_thread() {
            return;
        }
        // A PASSIVE-level wait in the driver gives the processor away (KeDelayExecutionThread);
        // a short sleep does that here, so the waited-for worker thread runs even on one core,
        // and the VSP's bounded wait rounds stand for real time.
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::current_irql;

    #[test]
    fn holds_at_dispatch_and_restores_the_irql() {
        let lock = SimSpinLock::new(5u32);
        assert_eq!(current_irql(), Irql::Passive);
        let seen = lock.with(|value| {
            *value += 1;
            current_irql()
        });
        assert_eq!(seen, Irql::Dispatch);
        assert_eq!(current_irql(), Irql::Passive);
        assert_eq!(lock.with(|value| *value), 6);
    }
}
