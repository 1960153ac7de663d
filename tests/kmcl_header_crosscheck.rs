//! Optional cross-check of the public KMCL constants in `vmbsrv::kmcl::raw` against a copy of the
//! header `km/vmbuskernelmodeclientlibapi.h` (docs/kmcl-bindings.md, "Public identifiers").
//!
//! The build never needs the header. When `VMBSRV_KMCL_HEADER` names one (scripts/check-windows.sh
//! sets it to the header of the tree it checks), every `DEFINE_GUID` and numeric `#define` below is
//! read from the text and compared; any mismatch or missing name fails. Without the variable the
//! test passes and says it was skipped. Struct layout is compared by clang in
//! tools/kmcl-layout-check (Windows CI); this only needs the text.

use std::collections::BTreeMap;

use vmbsrv::kmcl::raw::{self, GUID};

/// `DEFINE_GUID(NAME, l, w1, w2, b1, ..., b8)` entries of the header text.
fn guids(text: &str) -> BTreeMap<String, GUID> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.trim_start().strip_prefix("DEFINE_GUID(") else {
            continue;
        };
        let Some(args) = rest.split(')').next() else {
            continue;
        };
        let args: Vec<&str> = args.split(',').map(str::trim).collect();
        if args.len() != 12 {
            continue;
        }
        let num = |s: &str| u32::from_str_radix(s.trim_start_matches("0x"), 16).ok();
        let Some(values) = args[1..]
            .iter()
            .map(|a| num(a))
            .collect::<Option<Vec<u32>>>()
        else {
            continue;
        };
        let mut data4 = [0u8; 8];
        for (slot, value) in data4.iter_mut().zip(&values[3..]) {
            *slot = u8::try_from(*value).unwrap_or(0);
        }
        out.insert(
            args[0].to_owned(),
            GUID {
                Data1: values[0],
                Data2: u16::try_from(values[1]).unwrap_or(0),
                Data3: u16::try_from(values[2]).unwrap_or(0),
                Data4: data4,
            },
        );
    }
    out
}

/// `#define NAME <integer>` entries (hex or decimal) of the header text.
fn defines(text: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("#define") {
            continue;
        }
        let (Some(name), Some(value)) = (words.next(), words.next()) else {
            continue;
        };
        let parsed = match value.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => value.parse().ok(),
        };
        if let Some(v) = parsed {
            out.insert(name.to_owned(), v);
        }
    }
    out
}

#[test]
fn public_constants_match_a_given_header() {
    let Some(path) = std::env::var_os("VMBSRV_KMCL_HEADER") else {
        println!("skipped: VMBSRV_KMCL_HEADER names no header");
        return;
    };
    let bytes = std::fs::read(&path).expect("VMBSRV_KMCL_HEADER is readable");
    let text = String::from_utf8_lossy(&bytes).replace('\r', "");
    let guids = guids(&text);
    let defines = defines(&text);

    let expected_guids = [
        (
            "KMCL_CLIENT_INTERFACE_TYPE",
            raw::KMCL_CLIENT_INTERFACE_TYPE,
        ),
        (
            "KMCL_SERVER_INTERFACE_TYPE",
            raw::KMCL_SERVER_INTERFACE_TYPE,
        ),
    ];
    for (name, ours) in expected_guids {
        assert_eq!(
            guids.get(name),
            Some(&ours),
            "{name}: header vs vmbsrv::kmcl::raw"
        );
    }
    // Single-valued flags and versions. The mask `VMBUS_CHANNEL_FORMAT_FLAGS` is an OR expression
    // in the header; it is the OR of the five flags, which raw's own tests assert.
    let expected_defines = [
        (
            "KMCL_CLIENT_INTERFACE_VERSION_V1",
            u64::from(raw::KMCL_CLIENT_INTERFACE_VERSION_V1),
        ),
        (
            "KMCL_SERVER_INTERFACE_VERSION_V1",
            u64::from(raw::KMCL_SERVER_INTERFACE_VERSION_V1),
        ),
        (
            "VMBUS_CHANNEL_FORMAT_FLAG_WAIT_FOR_COMPLETION",
            u64::from(raw::VMBUS_CHANNEL_FORMAT_FLAG_WAIT_FOR_COMPLETION),
        ),
        (
            "VMBUS_CHANNEL_FORMAT_FLAG_FORCE_MDL_LENGTH",
            u64::from(raw::VMBUS_CHANNEL_FORMAT_FLAG_FORCE_MDL_LENGTH),
        ),
        (
            "VMBUS_CHANNEL_FORMAT_FLAG_PAGED_BUFFER",
            u64::from(raw::VMBUS_CHANNEL_FORMAT_FLAG_PAGED_BUFFER),
        ),
        (
            "VMBUS_CHANNEL_FORMAT_FLAG_DATA_IN_ONLY",
            u64::from(raw::VMBUS_CHANNEL_FORMAT_FLAG_DATA_IN_ONLY),
        ),
        (
            "VMBUS_CHANNEL_FORMAT_FLAG_DATA_OUT_ONLY",
            u64::from(raw::VMBUS_CHANNEL_FORMAT_FLAG_DATA_OUT_ONLY),
        ),
    ];
    for (name, ours) in expected_defines {
        assert_eq!(
            defines.get(name),
            Some(&ours),
            "{name}: header vs vmbsrv::kmcl::raw"
        );
    }
    println!(
        "{} GUIDs and {} macros of {} match vmbsrv::kmcl::raw",
        expected_guids.len(),
        expected_defines.len(),
        std::path::Path::new(&path).display()
    );
}
