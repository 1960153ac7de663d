//! kmcl-sys: raw Rust declarations of the Hyper-V VMBus Kernel Mode Client Library (KMCL) as a
//! VMBus *server* (VSP) uses it — `vmbuskernelmodeclientlibapi.h`, client V1 and server V1.
//!
//! * `#[repr(C)]` interface tables, callback and entry-point function-pointer types, handle types
//!   and constants, named as in the C header so they can be compared member by member;
//! * [`NtStatus`] and the status values KMCL and a VSP exchange;
//! * the public interface identifiers ([`KMCL_SERVER_INTERFACE_TYPE`] and the V1 versions);
//! * [`kmcl_pfn!`] and [`kmcl_fn!`]: the KMCL calling convention (`"win64"` on every x86_64
//!   target, so a user-mode simulator is called exactly as Windows calls a driver);
//! * layout tests: every size and offset of the 64-bit layout is asserted.
//!
//! No logic, no build script, no `links` key (a driver obtains KMCL by an interface query, not by
//! linking) and no dependency beyond `core`: this crate builds for the kernel, for any host, and
//! without the WDK. The facts it encodes are written down in the repository's
//! `docs/kmcl-bindings.md`. The safe layer is the `kmcl` crate.
// Fuzz builds (cargo-fuzz's `--cfg fuzzing`, nightly only) must keep this crate's debug assertions
// and overflow checks: the const below refuses to compile without them (docs/reliability.md F7).
#![cfg_attr(fuzzing, feature(cfg_overflow_checks))]
#![no_std]
#![forbid(unsafe_code)]

#[cfg(fuzzing)]
const _: () = assert!(
    cfg!(debug_assertions) && cfg!(overflow_checks),
    "fuzz builds keep debug assertions and overflow checks (docs/reliability.md F7)"
);

mod abi;
mod raw;
mod status;

#[cfg(all(test, target_pointer_width = "64"))]
mod layout_tests;

pub use raw::*;
pub use status::{NtStatus, Result};
