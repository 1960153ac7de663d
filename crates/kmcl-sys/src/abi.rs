//! The calling convention of every KMCL entry point and callback, as one macro pair.
//!
//! On x64 Windows `extern "system"` is the Microsoft x64 convention; Rust names the same
//! convention `"win64"` and accepts it on every x86_64 target. Declaring our function-pointer
//! types and trampolines `"win64"` on x86_64 means the simulator on x86_64 Linux is called exactly
//! as KMCL calls a driver on Windows: by-value `GUID`s passed as pointers to caller copies, the same
//! callee-saved registers, the same shadow space. On other architectures (aarch64 Windows is the
//! other driver target) `"system"` is the platform C convention.

/// Expands to `Option<unsafe extern ABI fn(args) -> ret>`: a nullable KMCL function pointer.
#[cfg(target_arch = "x86_64")]
#[macro_export]
macro_rules! kmcl_pfn {
    ($($signature:tt)*) => { Option<unsafe extern "win64" fn $($signature)*> };
}

/// Expands to `Option<unsafe extern ABI fn(args) -> ret>`: a nullable KMCL function pointer.
#[cfg(not(target_arch = "x86_64"))]
#[macro_export]
macro_rules! kmcl_pfn {
    ($($signature:tt)*) => { Option<unsafe extern "system" fn $($signature)*> };
}

/// Defines a function with the KMCL calling convention: `kmcl_fn! { pub unsafe fn name(..) {..} }`.
#[cfg(target_arch = "x86_64")]
#[macro_export]
macro_rules! kmcl_fn {
    ($(#[$meta:meta])* $vis:vis unsafe fn $($rest:tt)*) => {
        $(#[$meta])* $vis unsafe extern "win64" fn $($rest)*
    };
}

/// Defines a function with the KMCL calling convention: `kmcl_fn! { pub unsafe fn name(..) {..} }`.
#[cfg(not(target_arch = "x86_64"))]
#[macro_export]
macro_rules! kmcl_fn {
    ($(#[$meta:meta])* $vis:vis unsafe fn $($rest:tt)*) => {
        $(#[$meta])* $vis unsafe extern "system" fn $($rest)*
    };
}
