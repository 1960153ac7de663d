//! Tests of `build/kmcl_header.rs`, the parser `build.rs` runs on the WDK's
//! `km/vmbuskernelmodeclientlibapi.h` during a Windows driver build.
//!
//! TEST DATA ONLY: every GUID and version below is made up for these tests (the Data1 values
//! spell `0x7e57....`, "test"). The real KMCL GUIDs are not public and are never written in this
//! repository; they are read from the installed WDK at build time. The sample header text follows
//! the documented `DEFINE_GUID(name, l, w1, w2, b1, ..., b8)` syntax of `guiddef.h`.

#[path = "../build/kmcl_header.rs"]
mod kmcl_header;

use kmcl_header::{
    CLIENT_INTERFACE_TYPE, Guid, Header, HeaderError, KmclIds, SERVER_INTERFACE_TYPE,
    SERVER_INTERFACE_VERSION_V1, decode_header_bytes, extract_kmcl_ids, parse_integer_literal,
    render_rust, splice_lines, strip_comments,
};

/// FAKE test value (not the real KMCL server GUID).
const FAKE_SERVER: Guid = Guid {
    data1: 0x7e57_0001,
    data2: 0x1111,
    data3: 0x2222,
    data4: [0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08],
};
/// FAKE test value (not the real KMCL client GUID).
const FAKE_CLIENT: Guid = Guid {
    data1: 0x7e57_0002,
    data2: 0xaaaa,
    data3: 0xbbbb,
    data4: [0xf0, 0xe1, 0xd2, 0xc3, 0xb4, 0xa5, 0x96, 0x87],
};

/// A header in the shape the WDK uses, with FAKE values.
const SAMPLE_HEADER: &str = r#"
/*++
    Sample written for vmbsrv's tests. TEST DATA: the GUIDs below are fake.
--*/
#pragma once
#include <wdm.h>

//
// DEFINE_GUID(KMCL_SERVER_INTERFACE_TYPE, 0xdeadbeef, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);  (commented out: ignored)
//
/* DEFINE_GUID(KMCL_CLIENT_INTERFACE_TYPE, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11); also ignored */

#define KMCL_CLIENT_INTERFACE_VERSION_V1 1
#define KMCL_SERVER_INTERFACE_VERSION_V1 1

DEFINE_GUID(KMCL_CLIENT_INTERFACE_TYPE,
    0x7e570002, 0xaaaa, 0xbbbb, 0xf0, 0xe1, 0xd2, 0xc3, 0xb4, 0xa5, 0x96, 0x87);

DEFINE_GUID(KMCL_SERVER_INTERFACE_TYPE, 0x7e570001L, 0x1111, 0x2222,
            0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08);

typedef struct _KMCL_SERVER_INTERFACE_V1 {
    INTERFACE;
} KMCL_SERVER_INTERFACE_V1;
"#;

fn fake_ids() -> KmclIds {
    KmclIds {
        server_interface_type: FAKE_SERVER,
        client_interface_type: FAKE_CLIENT,
        server_interface_version_v1: 1,
    }
}

#[test]
fn extracts_all_three_identifiers_from_a_sample_header() {
    assert_eq!(extract_kmcl_ids(SAMPLE_HEADER), Ok(fake_ids()));
}

#[test]
fn guid_arguments_may_span_continuations_comments_and_odd_spacing() {
    let text = "DEFINE_GUID ( KMCL_SERVER_INTERFACE_TYPE , \\\n\
                \t0x7E570001UL,/* Data1 */ 0x1111 , \\\r\n\
                0x2222,   // Data3\n\
                0x01,0x02, 0x03 ,0x04,\n\
                0x05, 0x06, 0x07, 0x08 ) ;";
    let header = Header::parse(text);
    assert_eq!(header.guid(SERVER_INTERFACE_TYPE), Ok(FAKE_SERVER));
}

#[test]
fn guid_arguments_accept_decimal_octal_suffixes_casts_and_parentheses() {
    // 2119630849 == 0x7e570001, 010421 (octal) == 0x1111, 8738 == 0x2222.
    let text = "DEFINE_GUID(KMCL_SERVER_INTERFACE_TYPE, 2119630849ul, 010421, (USHORT)8738, \
                (0x01), 2u, 0x3i64, (UCHAR)(4), 5L, 6LL, 7ULL, 0b1000);";
    assert_eq!(
        Header::parse(text).guid(SERVER_INTERFACE_TYPE),
        Ok(FAKE_SERVER)
    );
}

#[test]
fn extern_guid_and_initializer_forms_are_understood() {
    let extern_guid = "EXTERN_GUID(KMCL_CLIENT_INTERFACE_TYPE, 0x7e570002, 0xaaaa, 0xbbbb, \
                       0xf0, 0xe1, 0xd2, 0xc3, 0xb4, 0xa5, 0x96, 0x87);";
    assert_eq!(
        Header::parse(extern_guid).guid(CLIENT_INTERFACE_TYPE),
        Ok(FAKE_CLIENT)
    );

    let initializer = "EXTERN_C const GUID DECLSPEC_SELECTANY KMCL_CLIENT_INTERFACE_TYPE =\n\
                       { 0x7e570002, 0xaaaa, 0xbbbb, { 0xf0, 0xe1, 0xd2, 0xc3, 0xb4, 0xa5, 0x96, 0x87, } };";
    assert_eq!(
        Header::parse(initializer).guid(CLIENT_INTERFACE_TYPE),
        Ok(FAKE_CLIENT)
    );
}

#[test]
fn declarations_without_a_value_are_not_definitions() {
    let text = "extern const GUID KMCL_SERVER_INTERFACE_TYPE;\n\
                #define DEFINE_KMCL(n) DEFINE_GUID(n, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11)\n\
                NTSTATUS Query(const GUID* Type = &KMCL_SERVER_INTERFACE_TYPE);";
    let error = Header::parse(text).guid(SERVER_INTERFACE_TYPE).unwrap_err();
    assert!(matches!(error, HeaderError::Missing { .. }), "{error:?}");
}

#[test]
fn identical_repeated_definitions_are_accepted_and_different_ones_rejected() {
    let same = format!("{SAMPLE_HEADER}\n#define KMCL_SERVER_INTERFACE_VERSION_V1 (1)\n");
    assert_eq!(extract_kmcl_ids(&same), Ok(fake_ids()));

    let conflicting = format!(
        "{SAMPLE_HEADER}\nDEFINE_GUID(KMCL_SERVER_INTERFACE_TYPE, 0x7e570009, 0x1111, 0x2222, \
         1, 2, 3, 4, 5, 6, 7, 8);\n"
    );
    let error = extract_kmcl_ids(&conflicting).unwrap_err();
    assert!(
        matches!(error, HeaderError::Conflicting { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains(SERVER_INTERFACE_TYPE));
}

#[test]
fn version_define_forms() {
    for body in [
        "1",
        "(1)",
        "0x1",
        "1u",
        "0x0001UL",
        "((USHORT)1)",
        "(unsigned short) 1",
        "KMCL_VERSION_ONE",
        "(KMCL_VERSION_ONE)",
        "0 | 1",
        "(1 << 0)",
        "0 + 1",
    ] {
        let text = format!(
            "#define KMCL_VERSION_ONE 1\n#  define   KMCL_SERVER_INTERFACE_VERSION_V1\t{body} // V1\n"
        );
        assert_eq!(
            Header::parse(&text).define_u16(SERVER_INTERFACE_VERSION_V1),
            Ok(1),
            "body `{body}`"
        );
    }
}

#[test]
fn version_define_with_continuation_line() {
    let text = "#define KMCL_SERVER_INTERFACE_VERSION_V1 \\\n    0x2\n";
    assert_eq!(
        Header::parse(text).define_u16(SERVER_INTERFACE_VERSION_V1),
        Ok(2)
    );
}

#[test]
fn missing_symbols_are_named_in_the_error() {
    let without_server_guid = SAMPLE_HEADER.replace(
        "DEFINE_GUID(KMCL_SERVER_INTERFACE_TYPE,",
        "DEFINE_GUID(SOME_OTHER_INTERFACE_TYPE,",
    );
    let error = extract_kmcl_ids(&without_server_guid).unwrap_err();
    assert_eq!(error.symbol(), SERVER_INTERFACE_TYPE);
    assert!(matches!(error, HeaderError::Missing { .. }));
    assert!(
        error
            .to_string()
            .contains("`KMCL_SERVER_INTERFACE_TYPE` is not defined")
    );

    let without_version = SAMPLE_HEADER.replace(
        "#define KMCL_SERVER_INTERFACE_VERSION_V1 1",
        "#define KMCL_SERVER_INTERFACE_VERSION_LATEST 1",
    );
    let error = extract_kmcl_ids(&without_version).unwrap_err();
    assert_eq!(error.symbol(), SERVER_INTERFACE_VERSION_V1);
    assert!(matches!(error, HeaderError::Missing { .. }));

    let error = extract_kmcl_ids("").unwrap_err();
    assert_eq!(error.symbol(), SERVER_INTERFACE_TYPE);
}

#[test]
fn malformed_definitions_are_errors_not_guesses() {
    let cases = [
        // Too few numbers.
        "DEFINE_GUID(KMCL_SERVER_INTERFACE_TYPE, 0x7e570001, 0x1111, 0x2222, 1, 2, 3, 4, 5, 6, 7);",
        // Too many numbers.
        "DEFINE_GUID(KMCL_SERVER_INTERFACE_TYPE, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12);",
        // Data2 does not fit a USHORT.
        "DEFINE_GUID(KMCL_SERVER_INTERFACE_TYPE, 1, 0x10000, 3, 4, 5, 6, 7, 8, 9, 10, 11);",
        // A byte does not fit a UCHAR.
        "DEFINE_GUID(KMCL_SERVER_INTERFACE_TYPE, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0x100);",
        // Not a number.
        "DEFINE_GUID(KMCL_SERVER_INTERFACE_TYPE, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, UNKNOWN_MACRO);",
        // Negative values are not part of the supported subset.
        "DEFINE_GUID(KMCL_SERVER_INTERFACE_TYPE, -1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11);",
        // Unterminated argument list.
        "DEFINE_GUID(KMCL_SERVER_INTERFACE_TYPE, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11",
    ];
    for text in cases {
        let error = Header::parse(text).guid(SERVER_INTERFACE_TYPE).unwrap_err();
        assert!(
            matches!(error, HeaderError::Malformed { .. }),
            "{text}: {error:?}"
        );
        assert_eq!(error.symbol(), SERVER_INTERFACE_TYPE);
    }

    for body in ["0x10000", "", "SELF", "1.0", "-1", "FUNC(1)", "(1"] {
        let text = format!(
            "#define FUNC(x) x\n#define SELF SELF\n#define KMCL_SERVER_INTERFACE_VERSION_V1 {body}\n"
        );
        let error = Header::parse(&text)
            .define_u16(SERVER_INTERFACE_VERSION_V1)
            .unwrap_err();
        assert!(
            matches!(error, HeaderError::Malformed { .. }),
            "`{body}`: {error:?}"
        );
    }
}

#[test]
fn conflicting_version_defines_are_rejected() {
    let text = "#if A\n#define KMCL_SERVER_INTERFACE_VERSION_V1 1\n#else\n\
                #define KMCL_SERVER_INTERFACE_VERSION_V1 2\n#endif\n";
    let error = Header::parse(text)
        .define_u16(SERVER_INTERFACE_VERSION_V1)
        .unwrap_err();
    assert!(
        matches!(error, HeaderError::Conflicting { .. }),
        "{error:?}"
    );
}

#[test]
fn function_like_macro_of_the_same_name_is_not_a_value() {
    let text = "#define KMCL_SERVER_INTERFACE_VERSION_V1(x) x\n";
    let error = Header::parse(text)
        .define_u16(SERVER_INTERFACE_VERSION_V1)
        .unwrap_err();
    assert!(matches!(error, HeaderError::Missing { .. }), "{error:?}");
}

#[test]
fn integer_literals() {
    assert_eq!(parse_integer_literal("0"), Ok(0));
    assert_eq!(parse_integer_literal("00"), Ok(0));
    assert_eq!(parse_integer_literal("017"), Ok(15));
    assert_eq!(parse_integer_literal("0x7E570001"), Ok(0x7e57_0001));
    assert_eq!(parse_integer_literal("0XffffFFFFul"), Ok(0xffff_ffff));
    assert_eq!(parse_integer_literal("42LLU"), Ok(42));
    assert_eq!(parse_integer_literal("42ui16"), Ok(42));
    assert_eq!(parse_integer_literal("0b101"), Ok(5));
    assert_eq!(
        parse_integer_literal("0xFFFFFFFFFFFFFFFF"),
        Ok(u128::from(u64::MAX))
    );
    for bad in ["0x", "08", "12ab", "0x1FFFFFFFFFFFFFFFF", "u"] {
        assert!(parse_integer_literal(bad).is_err(), "{bad}");
    }
}

#[test]
fn line_splicing_and_comment_removal_follow_c_phases() {
    assert_eq!(splice_lines("a\\\nb\\\r\nc\\ d"), "abc\\ d");
    assert_eq!(strip_comments("a/* x\ny */b // z\nc"), "a b \nc");
    assert_eq!(
        strip_comments(r#"s = "/* not a comment */"; // gone"#),
        r#"s = "/* not a comment */"; "#
    );
    // A line continuation inside a `//` comment extends the comment (phase 2 before phase 3).
    let header = Header::parse(
        "// DEFINE_GUID(KMCL_SERVER_INTERFACE_TYPE, \\\n1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11);\n",
    );
    assert!(matches!(
        header.guid(SERVER_INTERFACE_TYPE),
        Err(HeaderError::Missing { .. })
    ));
}

#[test]
fn header_bytes_in_utf8_or_utf16_decode_the_same() {
    let mut utf16le = vec![0xFF, 0xFE];
    let mut utf16be = vec![0xFE, 0xFF];
    for unit in SAMPLE_HEADER.encode_utf16() {
        utf16le.extend_from_slice(&unit.to_le_bytes());
        utf16be.extend_from_slice(&unit.to_be_bytes());
    }
    let mut utf8_bom = vec![0xEF, 0xBB, 0xBF];
    utf8_bom.extend_from_slice(SAMPLE_HEADER.as_bytes());
    for bytes in [
        SAMPLE_HEADER.as_bytes().to_vec(),
        utf8_bom,
        utf16le,
        utf16be,
    ] {
        assert_eq!(
            extract_kmcl_ids(&decode_header_bytes(&bytes)),
            Ok(fake_ids())
        );
    }
}

#[test]
fn guid_display_is_registry_format() {
    assert_eq!(
        FAKE_CLIENT.to_string(),
        "{7e570002-aaaa-bbbb-f0e1-d2c3b4a59687}"
    );
}

#[test]
fn rendered_rust_defines_the_three_constants() {
    let rust = render_rust(
        &fake_ids(),
        r"C:\WDK\Include\10.0.26100.0\km\vmbuskernelmodeclientlibapi.h",
    );
    assert!(rust.starts_with("// @generated"));
    assert!(
        rust.contains(r"// Source: C:\WDK\Include\10.0.26100.0\km\vmbuskernelmodeclientlibapi.h")
    );
    let compact: String = rust.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(compact.contains(
        "pub const KMCL_SERVER_INTERFACE_TYPE: crate::kmcl::raw::GUID = crate::kmcl::raw::GUID { \
         Data1: 0x7e570001, Data2: 0x1111, Data3: 0x2222, \
         Data4: [0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08], };"
    ));
    assert!(compact.contains(
        "pub const KMCL_CLIENT_INTERFACE_TYPE: crate::kmcl::raw::GUID = crate::kmcl::raw::GUID { \
         Data1: 0x7e570002, Data2: 0xaaaa, Data3: 0xbbbb, \
         Data4: [0xf0, 0xe1, 0xd2, 0xc3, 0xb4, 0xa5, 0x96, 0x87], };"
    ));
    assert!(compact.contains("pub const KMCL_SERVER_INTERFACE_VERSION_V1: u16 = 1;"));
    // Every item is documented (the crate warns on missing docs).
    assert_eq!(rust.matches("\npub const ").count(), 3);
    for item in rust.split("\npub const ").skip(1) {
        assert!(!item.is_empty());
    }
    assert_eq!(
        rust.lines().filter(|l| l.starts_with("/// `KMCL_")).count(),
        3,
        "each constant starts with a doc comment"
    );
    // Control characters in the path cannot break out of the comment line.
    let hostile = render_rust(&fake_ids(), "C:\\a\nb");
    assert!(hostile.contains("// Source: C:\\a?b\n"));
}
