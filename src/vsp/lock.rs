//! The lock abstraction the delivery state lives behind: [`DispatchLock`], whose contract lives in
//! the `kmcl` crate (so a simulator can implement it without knowing the VSP).
//!
//! Completion routines and process-packet callbacks run at DISPATCH_LEVEL, so the lock must be
//! a spin lock that raises IRQL (in the driver: a `KSPIN_LOCK` with `KeAcquireSpinLock`); a lock
//! that let a DPC preempt its holder on the same processor would deadlock. The service is
//! generic over this trait; `driver/` and `sim/` provide the implementations.
//!
//! Rules for callers (checked by the simulator's implementation): hold it briefly, never call a
//! KMCL function while holding it, never block while holding it, never re-enter it.

pub use kmcl::DispatchLock;

/// A host-only implementation over `std::sync::Mutex`, for unit tests and host tools.
///
/// It does not raise any IRQL, so it must never stand in for the driver's spin lock.
#[cfg(test)]
pub struct HostLock<T>(std::sync::Mutex<T>);

#[cfg(test)]
impl<T: Send> DispatchLock<T> for HostLock<T> {
    fn new(value: T) -> Self {
        Self(std::sync::Mutex::new(value))
    }

    fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        // A panic while holding the lock aborts (panic = "abort"), so poisoning only matters in
        // unwinding test builds, where the data is still consistent enough to report from.
        let mut guard = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut guard)
    }
}
