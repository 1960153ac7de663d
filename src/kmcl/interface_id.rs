//! The KMCL interface identifiers: `KMCL_SERVER_INTERFACE_TYPE`, `KMCL_CLIENT_INTERFACE_TYPE`
//! (GUIDs) and `KMCL_SERVER_INTERFACE_VERSION_V1` (the `USHORT` version of the interface query).
//!
//! The GUID values appear in no public source, so this crate never writes them down. On a Windows
//! driver build (`target_os = "windows"` with the `driver` feature, on a Windows host) `build.rs`
//! finds `km/vmbuskernelmodeclientlibapi.h` through wdk-build's `Config::include_paths()`, reads
//! the `DEFINE_GUID` entries and the `#define` with `build/kmcl_header.rs`, and writes them to
//! `$OUT_DIR/kmcl_interface_ids.rs`, which this module includes as three documented `pub const`
//! items (`KMCL_SERVER_INTERFACE_TYPE: GUID`, `KMCL_CLIENT_INTERFACE_TYPE: GUID`,
//! `KMCL_SERVER_INTERFACE_VERSION_V1: u16`, with [`GUID`](super::raw::GUID) from `raw`). If the
//! header or a symbol is missing, the build fails with the header path and the symbol name.
//!
//! On every other configuration this module is empty: the user-mode simulator (feature `sim`)
//! answers interface queries with a GUID of its own, and nothing platform-neutral depends on the
//! real values.

#[cfg(all(target_os = "windows", feature = "driver"))]
include!(concat!(env!("OUT_DIR"), "/kmcl_interface_ids.rs"));
