//! [`DispatchLock`] over an executive spin lock (`KSPIN_LOCK`).
//!
//! wdm.h facts this relies on (checked against the header text, and the DDI pages
//! `nf-wdm-keacquirespinlockraisetodpc` / `nf-wdm-kereleasespinlock`):
//! * On 64-bit targets `KeAcquireSpinLock(SpinLock, OldIrql)` is a **macro**,
//!   `*(OldIrql) = KeAcquireSpinLockRaiseToDpc(SpinLock)`; `KeAcquireSpinLockRaiseToDpc` and
//!   `KeReleaseSpinLock` are real `NTKERNELAPI` exports, so bindgen generates them in
//!   `wdk_sys::ntddk` and this file calls them directly.
//! * `KeInitializeSpinLock` is a `FORCEINLINE` `*SpinLock = 0` outside x86, so there is no binding;
//!   zero is the initialized, released state, written directly.
//!
//! `wdk::wdf::SpinLock` (a WDFSPINLOCK) is not used because creating it can fail and needs a
//! parent object, while `DispatchLock::new` is infallible and runs deep inside `crate::vsp`.

use core::cell::UnsafeCell;

use wdk_sys::KSPIN_LOCK;
use wdk_sys::ntddk::{KeAcquireSpinLockRaiseToDpc, KeReleaseSpinLock, KeStallExecutionProcessor};

use crate::vsp::DispatchLock;

/// A value behind a `KSPIN_LOCK`: `with` raises to DISPATCH_LEVEL for the length of the closure.
///
/// Callers must be at IRQL ≤ DISPATCH_LEVEL (KMCL callbacks and control requests are) and must
/// follow the trait's rules: short, no KMCL call, no blocking, no re-entry.
pub(crate) struct KSpinLock<T> {
    lock: UnsafeCell<KSPIN_LOCK>,
    value: UnsafeCell<T>,
}

// SAFETY: the lock owns its `T`; moving it to another thread moves the `T`, which is `Send`.
unsafe impl<T: Send> Send for KSpinLock<T> {}
// SAFETY: `&KSpinLock<T>` only reaches the `T` through `with`, which holds the spin lock, so at
// most one thread has `&mut T` at a time; `T: Send` because that thread may differ from the one
// that created it.
unsafe impl<T: Send> Sync for KSpinLock<T> {}

impl<T: Send> DispatchLock<T> for KSpinLock<T> {
    fn new(value: T) -> Self {
        // `KeInitializeSpinLock` == `*SpinLock = 0` (wdm.h, non-x86). The lock is not held, so it
        // may be moved into its final place afterwards: only a held lock must stay put, and
        // `with` borrows `self` for as long as it is held.
        Self {
            lock: UnsafeCell::new(0),
            value: UnsafeCell::new(value),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        // SAFETY: `lock` was initialized by `new` and lives (borrowed) until the release below;
        // the caller is at IRQL <= DISPATCH_LEVEL (trait rule). Raises IRQL to DISPATCH_LEVEL.
        let old_irql = unsafe { KeAcquireSpinLockRaiseToDpc(self.lock.get()) };
        // SAFETY: the spin lock is held, so no other `&mut T` exists (see the Sync impl); the
        // reference does not outlive `f`. `f` must not re-enter this lock (trait rule).
        let result = f(unsafe { &mut *self.value.get() });
        // SAFETY: releases the lock acquired above with the IRQL it returned. (A panic in `f`
        // never gets here, but panics bugcheck in this driver, docs/windows-build.md §10.4.)
        unsafe { KeReleaseSpinLock(self.lock.get(), old_irql) };
        result
    }

    fn relax() {
        // One round of a bounded PASSIVE_LEVEL wait is 50 µs, the longest stall wdm.h's
        // documentation of KeStallExecutionProcessor recommends (docs/windows.md, "Waits").
        // SAFETY: KeStallExecutionProcessor only busy-waits for the given number of microseconds;
        // it is callable at any IRQL and touches no memory of ours.
        unsafe { KeStallExecutionProcessor(RELAX_MICROSECONDS) };
    }
}

/// The length of one [`DispatchLock::relax`] round in the driver.
const RELAX_MICROSECONDS: u32 = 50;
