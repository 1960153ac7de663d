//! WDF object contexts: `WDF_DECLARE_CONTEXT_TYPE` and `WdfObjectGet_<T>` by hand.
//!
//! wdk-sys has none of the C context macros (docs/windows-build.md §10.2). The pattern follows
//! Windows-rust-driver-samples `general/echo/kmdf/driver/DriverSync/src/wdf_object_context.rs`:
//! a `#[repr(transparent)]` wrapper around `WDF_OBJECT_CONTEXT_TYPE_INFO` in a static whose
//! `UniqueType` points at itself, and `WdfObjectGetTypedContextWorker(handle, UniqueType)` to
//! reach the context. WDF allocates the context zero-filled together with the object and never
//! runs Rust `Drop` on it: the owners (`device.rs`, `control.rs`) initialize with `ptr::write`
//! and release in `EvtCleanupCallback`.

use wdk_sys::{
    PCWDF_OBJECT_CONTEXT_TYPE_INFO, WDF_OBJECT_CONTEXT_TYPE_INFO, WDFOBJECT,
    call_unsafe_wdf_function_binding,
};

/// One context type's `WDF_OBJECT_CONTEXT_TYPE_INFO`, as a static (see [`context_type!`]).
#[repr(transparent)]
pub(super) struct ContextType(pub(super) WDF_OBJECT_CONTEXT_TYPE_INFO);

// SAFETY: the value is never mutated after constant initialization; its pointers lead to a
// `'static` NUL-terminated name and to the static itself, both immutable.
unsafe impl Sync for ContextType {}

impl ContextType {
    /// `WDF_GET_CONTEXT_TYPE_INFO(T)`: what `WDF_OBJECT_ATTRIBUTES.ContextTypeInfo` takes.
    pub(super) const fn info(&'static self) -> PCWDF_OBJECT_CONTEXT_TYPE_INFO {
        self.0.UniqueType
    }

    /// `WdfObjectGetTypedContextWorker(handle, info)`: the context of this type on `handle`, or
    /// NULL if the object has none of this type.
    ///
    /// # Safety
    /// `handle` must be a live framework object handle.
    pub(super) unsafe fn raw_context(&'static self, handle: WDFOBJECT) -> *mut core::ffi::c_void {
        // SAFETY: `handle` is live (caller contract) and `info()` is a `'static` type info.
        unsafe {
            call_unsafe_wdf_function_binding!(WdfObjectGetTypedContextWorker, handle, self.info())
        }
    }
}

/// Declares `static NAME: ContextType` for the context type `Ty`
/// (`WDF_DECLARE_CONTEXT_TYPE_WITH_NAME`).
macro_rules! context_type {
    ($(#[$meta:meta])* static $name:ident: $ty:ty;) => {
        $(#[$meta])*
        // Placed in `.data` exactly as the sample's `wdf_declare_context_type_with_name!` does
        // (its reason is not stated there; the info is only read).
        #[unsafe(link_section = ".data")]
        static $name: $crate::driver::context::ContextType =
            $crate::driver::context::ContextType(wdk_sys::WDF_OBJECT_CONTEXT_TYPE_INFO {
                Size: $crate::driver::wdf_size::<wdk_sys::WDF_OBJECT_CONTEXT_TYPE_INFO>(),
                ContextName: concat!(stringify!($ty), "\0").as_ptr().cast(),
                ContextSize: core::mem::size_of::<$ty>(),
                UniqueType: (&raw const $name).cast(),
                EvtDriverGetUniqueContextType: None,
            });
    };
}

pub(super) use context_type;
