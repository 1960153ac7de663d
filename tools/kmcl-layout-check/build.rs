//! Generates clang's view of the KMCL layout from the installed WDK (Windows hosts only).
//!
//! A bindgen run through wdk-build's `BuilderExt::wdk_default` (the WDK include paths, defines
//! and MS-compatibility flags wdk-sys uses, for the KMDF configuration that
//! `Config::from_env_auto` finds in vmbsrv's `[package.metadata.wdk.driver-model]`) parses a probe
//! header that includes `vmbuskernelmodeclientlibapi.h` and defines one enum whose constants clang
//! evaluates: `sizeof`, `_Alignof` and `__builtin_offsetof` of every member vmbsrv declares by
//! hand in `vmbsrv::kmcl::raw`, and the values of the header's flag and version macros. Asking
//! clang for the numbers (instead of comparing bindgen's generated structs) keeps the check
//! independent of how bindgen names the anonymous `INTERFACE;` member.
//!
//! Outputs in `$OUT_DIR`: `kmcl_c_layout.rs` (bindgen) and `kmcl_layout_checks.rs` (a table of
//! `Check { what, c, rust }` that `tests/layout.rs` compares), plus `cfg(kmcl_layout_bindings)`.
//! On other hosts nothing is generated and the crate compiles to nothing.

/// `(C struct, members)` for every hand-written struct; the Rust type in `vmbsrv::kmcl::raw` has
/// the same name and, for these members, the same field names.
const STRUCT_MEMBERS: &[(&str, &[&str])] = &[
    (
        "INTERFACE",
        &[
            "Size",
            "Version",
            "Context",
            "InterfaceReference",
            "InterfaceDereference",
        ],
    ),
    ("GUID", &["Data1", "Data2", "Data3", "Data4"]),
    ("UNICODE_STRING", &["Length", "MaximumLength", "Buffer"]),
    (
        "VMB_CHANNEL_STATE_CHANGE_CALLBACKS",
        &[
            "Version",
            "Size",
            "EvtChannelOpened",
            "EvtChannelClosed",
            "EvtChannelSuspend",
            "EvtChannelStarted",
            "EvtChannelPostStarted",
        ],
    ),
    (
        // The C struct starts with an anonymous `INTERFACE;` member (vmbsrv: field `Interface`);
        // its position is checked through the offset of the first method below.
        "KMCL_CLIENT_INTERFACE_V1",
        &[
            "VmbChannelAllocate",
            "VmbChannelCleanup",
            "VmbChannelCreateGpadlFromBuffer",
            "VmbChannelCreateGpadlFromMdl",
            "VmbChannelDeleteGpadl",
            "VmbChannelDisable",
            "VmbChannelEnable",
            "VmbChannelGetInterfaceInstance",
            "VmbChannelGetMmioSpace",
            "VmbChannelGetPointer",
            "VmbChannelInitSetClientContextSize",
            "VmbChannelInitSetFlags",
            "VmbChannelInitSetFriendlyName",
            "VmbChannelInitSetMaximumExternalData",
            "VmbChannelInitSetMaximumPacketSize",
            "VmbChannelInitSetProcessPacketCallbacks",
            "VmbChannelInitSetStateChangeCallbacks",
            "VmbChannelPacketComplete",
            "VmbChannelPacketDeferToPassive",
            "VmbChannelPacketFail",
            "VmbChannelPacketGetExternalData",
            "VmbChannelPause",
            "VmbChannelSendSynchronousRequest",
            "VmbChannelSetIncomingProcessingAtPassive",
            "VmbChannelSetInterruptLatency",
            "VmbChannelSetPointer",
            "VmbChannelSetTransactionQuota",
            "VmbChannelSizeofPacket",
            "VmbChannelStart",
            "VmbClientChannelInitSetRingBufferPageCount",
            "VmbClientChannelInitSetTargetPnp",
            "VmbPacketAllocate",
            "VmbPacketFree",
            "VmbPacketGetChannel",
            "VmbPacketGetPointer",
            "VmbPacketInitialize",
            "VmbPacketSend",
            "VmbPacketSendWithExternalMdl",
            "VmbPacketSendWithExternalPfns",
            "VmbPacketSetCompletionRoutine",
            "VmbPacketSetPointer",
        ],
    ),
    (
        "KMCL_SERVER_ONLY_METHODS",
        &[
            "VmbChannelMapGpadl",
            "VmbChannelRestoreFromBuffer",
            "VmbChannelSaveBegin",
            "VmbChannelSaveContinue",
            "VmbChannelSaveEnd",
            "VmbChannelUnmapGpadl",
            "VmbConvertVmbusHandleToKernelHandle",
            "VmbPacketRestore",
            "VmbServerChannelInitSetFlags",
            "VmbServerChannelInitSetMmioMegabytes",
            "VmbServerChannelInitSetSaveRestorePacketCallbacks",
            "VmbServerChannelInitSetTargetInterfaceId",
            "VmbServerChannelInitSetTargetVtl",
            "VmbServerChannelInitSetVmbusHandle",
        ],
    ),
    // Members are embedded anonymously in C (`KMCL_CLIENT_INTERFACE_V1; KMCL_SERVER_ONLY_METHODS;`)
    // and as `Client`/`Server` in vmbsrv; only size, alignment and the split point are compared.
    ("KMCL_SERVER_INTERFACE_V1", &[]),
];

/// Header macros that `vmbsrv::kmcl::raw` repeats as `pub const` with the same name.
const MACROS: &[&str] = &[
    "KMCL_CLIENT_INTERFACE_VERSION_V1",
    "KMCL_SERVER_INTERFACE_VERSION_V1",
    "VMBUS_CHANNEL_FORMAT_FLAG_WAIT_FOR_COMPLETION",
    "VMBUS_CHANNEL_FORMAT_FLAG_FORCE_MDL_LENGTH",
    "VMBUS_CHANNEL_FORMAT_FLAG_PAGED_BUFFER",
    "VMBUS_CHANNEL_FORMAT_FLAG_DATA_IN_ONLY",
    "VMBUS_CHANNEL_FORMAT_FLAG_DATA_OUT_ONLY",
    "VMBUS_CHANNEL_FORMAT_FLAGS",
    "VMBUS_CHANNEL_GPADL_FLAG_READ_ONLY",
    "VMBUS_CHANNEL_GPADL_FLAGS",
    "VMBUS_CHANNEL_INIT_FLAG_IS_PIPE",
    "VMBUS_CHANNEL_INIT_FLAGS",
    "VMBUS_SERVER_CHANNEL_INIT_FLAG_LOOPBACK_OFFER",
    "VMBUS_SERVER_CHANNEL_INIT_FLAG_ENUMERATE_DEVICE_INTERFACE",
    "VMBUS_SERVER_CHANNEL_INIT_FLAG_OFFER_AS_PIPE",
    "VMBUS_SERVER_CHANNEL_INIT_FLAG_FORCE_NEW_CHANNEL",
    "VMBUS_SERVER_CHANNEL_INIT_FLAG_TLNPI_PROVIDER_OFFER",
    "VMBUS_SERVER_CHANNEL_INIT_FLAGS",
    "VMBUS_CHANNEL_PROCESS_PACKET_FLAG_EXTERNAL_DATA",
    "VMBUS_CHANNEL_PROCESS_PACKET_FLAGS",
    "VMBUS_CHANNEL_PACKET_EXTERNAL_DATA_FLAG_READ_ONLY",
    "VMBUS_CHANNEL_PACKET_EXTERNAL_DATA_FLAGS",
    "VMBUS_SERVER_CHANNEL_INIT_MAXIMUM_OFFER_DATA",
];

const ENUM_NAME: &str = "vmbsrv_kmcl_layout";

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rustc-check-cfg=cfg(kmcl_layout_bindings)");
    // wdk-build's `emit_check_cfg_settings` declares this one on Windows; declare it everywhere.
    println!(
        r#"cargo::rustc-check-cfg=cfg(driver_model__driver_type, values("WDM", "KMDF", "UMDF"))"#
    );

    #[cfg(windows)]
    if let Err(error) = windows_host::generate() {
        eprintln!("error: {error}");
        std::process::exit(1);
    }
}

/// The probe header: the KMCL header and one enum of clang-evaluated numbers.
#[cfg_attr(not(windows), allow(dead_code))]
fn probe_header() -> String {
    let mut entries = Vec::new();
    for (ty, members) in STRUCT_MEMBERS {
        entries.push(format!("    VMBSRV_SIZE__{ty} = sizeof({ty}),"));
        entries.push(format!("    VMBSRV_ALIGN__{ty} = _Alignof({ty}),"));
        for member in *members {
            entries.push(format!(
                "    VMBSRV_OFFSET__{ty}__{member} = __builtin_offsetof({ty}, {member}),"
            ));
        }
    }
    for name in MACROS {
        entries.push(format!("    VMBSRV_MACRO__{name} = ({name}),"));
    }
    format!(
        "#include <ntddk.h>\n#include <wdf.h>\n#include <vmbuskernelmodeclientlibapi.h>\n\n\
         enum {ENUM_NAME} {{\n{}\n}};\n",
        entries.join("\n")
    )
}

/// The Rust table: clang's number next to the same quantity computed from `vmbsrv::kmcl::raw`.
#[cfg_attr(not(windows), allow(dead_code))]
fn checks_source() -> String {
    const RAW: &str = "::vmbsrv::kmcl::raw";
    let c = |name: &str| format!("crate::c::{ENUM_NAME}::{name} as i128");
    let mut rows: Vec<(String, String, String)> = Vec::new();
    for (ty, members) in STRUCT_MEMBERS {
        rows.push((
            format!("size_of::<{ty}>()"),
            c(&format!("VMBSRV_SIZE__{ty}")),
            format!("::core::mem::size_of::<{RAW}::{ty}>() as i128"),
        ));
        rows.push((
            format!("align_of::<{ty}>()"),
            c(&format!("VMBSRV_ALIGN__{ty}")),
            format!("::core::mem::align_of::<{RAW}::{ty}>() as i128"),
        ));
        for member in *members {
            rows.push((
                format!("offset_of!({ty}, {member})"),
                c(&format!("VMBSRV_OFFSET__{ty}__{member}")),
                format!("::core::mem::offset_of!({RAW}::{ty}, {member}) as i128"),
            ));
        }
    }
    // The anonymous `INTERFACE;` header ends where the first method starts.
    rows.push((
        "KMCL_CLIENT_INTERFACE_V1: INTERFACE header ends at the first method".to_owned(),
        c("VMBSRV_OFFSET__KMCL_CLIENT_INTERFACE_V1__VmbChannelAllocate"),
        format!(
            "(::core::mem::offset_of!({RAW}::KMCL_CLIENT_INTERFACE_V1, Interface) \
             + ::core::mem::size_of::<{RAW}::INTERFACE>()) as i128"
        ),
    ));
    // KMCL_SERVER_INTERFACE_V1 = client V1 followed by the server-only methods.
    rows.push((
        "KMCL_SERVER_INTERFACE_V1: server-only methods start after the client V1 table".to_owned(),
        c("VMBSRV_SIZE__KMCL_CLIENT_INTERFACE_V1"),
        format!("::core::mem::offset_of!({RAW}::KMCL_SERVER_INTERFACE_V1, Server) as i128"),
    ));
    rows.push((
        "KMCL_SERVER_INTERFACE_V1: nothing after the server-only methods".to_owned(),
        c("VMBSRV_SIZE__KMCL_SERVER_INTERFACE_V1"),
        format!(
            "(::core::mem::size_of::<{RAW}::KMCL_CLIENT_INTERFACE_V1>() \
             + ::core::mem::size_of::<{RAW}::KMCL_SERVER_ONLY_METHODS>()) as i128"
        ),
    ));
    for name in MACROS {
        rows.push((
            format!("macro {name}"),
            c(&format!("VMBSRV_MACRO__{name}")),
            format!("{RAW}::{name} as i128"),
        ));
    }
    let mut out = String::from(
        "// @generated by tools/kmcl-layout-check/build.rs. Do not edit.\n\n\
         /// Every comparison: clang on the WDK header (`c`) against vmbsrv (`rust`).\n\
         pub const CHECKS: &[crate::Check] = &[\n",
    );
    for (what, c_expr, rust_expr) in rows {
        out.push_str(&format!(
            "    crate::Check {{\n        what: {what:?},\n        c: {c_expr},\n        rust: {rust_expr},\n    }},\n"
        ));
    }
    out.push_str("];\n");
    out
}

#[cfg(windows)]
mod windows_host {
    use std::env;
    use std::fs;
    use std::path::PathBuf;

    use wdk_build::BuilderExt;

    /// File name of the KMCL header, relative to a WDK `km` include directory.
    const HEADER_FILE_NAME: &str = "vmbuskernelmodeclientlibapi.h";

    type BoxError = Box<dyn std::error::Error>;

    pub(super) fn generate() -> Result<(), String> {
        let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?);
        let mut generated = false;
        // `configure_wdk_library_build_and_then` (wdk-build-0.6.0/src/lib.rs) emits the cfg
        // settings and calls the closure with the `Config` -- or, if no WDK metadata is found,
        // only warns and returns Ok without calling it. `generated` catches that case.
        wdk_build::configure_wdk_library_build_and_then(|config| -> Result<(), BoxError> {
            let include_paths: Vec<PathBuf> = config
                .include_paths()
                .map_err(|error| format!("WDK include paths: {error}"))?
                .collect();
            let header = include_paths
                .iter()
                .map(|dir| dir.join(HEADER_FILE_NAME))
                .find(|candidate| candidate.is_file())
                .ok_or_else(|| {
                    format!(
                        "{} not found in the WDK include paths {include_paths:?}",
                        HEADER_FILE_NAME
                    )
                })?;
            let bindings = bindgen::Builder::wdk_default(&config)
                .map_err(|error| format!("wdk_default: {error}"))?
                .header_contents("vmbsrv_kmcl_probe.h", &super::probe_header())
                .allowlist_type(super::ENUM_NAME)
                .constified_enum_module(super::ENUM_NAME)
                .generate()
                .map_err(|error| format!("bindgen over {}: {error}", header.display()))?;
            bindings
                .write_to_file(out_dir.join("kmcl_c_layout.rs"))
                .map_err(|error| format!("writing kmcl_c_layout.rs: {error}"))?;
            fs::write(
                out_dir.join("kmcl_layout_checks.rs"),
                super::checks_source(),
            )
            .map_err(|error| format!("writing kmcl_layout_checks.rs: {error}"))?;
            println!("cargo::rustc-cfg=kmcl_layout_bindings");
            generated = true;
            Ok(())
        })
        .map_err(|error: BoxError| error.to_string())?;
        if !generated {
            return Err(
                "wdk-build found no [package.metadata.wdk] configuration (expected \
                        vmbsrv's KMDF driver-model through the path dependency)"
                    .to_owned(),
            );
        }
        Ok(())
    }
}
