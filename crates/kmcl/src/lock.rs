//! The lock abstraction a VSP's delivery state lives behind.
//!
//! Completion routines and process-packet callbacks run at DISPATCH_LEVEL, so the lock must be
//! a spin lock that raises IRQL (in a driver: a `KSPIN_LOCK` with `KeAcquireSpinLock`); a lock
//! that let a DPC preempt its holder on the same processor would deadlock. A service is generic
//! over this trait; the driver and the simulator (`kmcl-sim`'s `SimSpinLock`) provide the
//! implementations.
//!
//! Rules for callers (checked by the simulator's implementation): hold it briefly, never call a
//! KMCL function while holding it, never block while holding it, never re-enter it.
#![forbid(unsafe_code)]

/// A lock usable at IRQL ≤ DISPATCH_LEVEL that protects one `T`.
pub trait DispatchLock<T>: Send + Sync {
    /// Wraps `value`. Creating a spin lock cannot fail.
    fn new(value: T) -> Self;

    /// Runs `f` with exclusive access to the value, at DISPATCH_LEVEL.
    fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R;

    /// Called at PASSIVE_LEVEL, never with the lock held, between two looks at a condition
    /// another thread will make true soon (a post finishing its send, a start callback, a
    /// completion after Disable). Every such wait in the VSP is also bounded by a count of
    /// rounds. The default only hints the processor; a platform may yield instead.
    fn relax() {
        core::hint::spin_loop();
    }
}
