//! vmbsrv's hand-written KMCL layout equals the WDK header's (Windows hosts with the WDK only).

/// On Windows the build script must have produced the bindings; a silent skip would hide a
/// broken check.
#[cfg(windows)]
#[test]
fn bindings_were_generated() {
    assert!(
        cfg!(kmcl_layout_bindings),
        "build.rs did not generate the KMCL layout bindings"
    );
}

#[cfg(kmcl_layout_bindings)]
#[test]
fn hand_written_layout_matches_the_wdk_header() {
    let checks = kmcl_layout_check::checks::CHECKS;
    assert!(checks.len() > 90, "only {} checks generated", checks.len());
    let mismatches: Vec<_> = checks
        .iter()
        .filter(|check| check.c != check.rust)
        .collect();
    for check in &mismatches {
        eprintln!(
            "MISMATCH {}: WDK header {} (0x{:x}), vmbsrv {} (0x{:x})",
            check.what, check.c, check.c, check.rust, check.rust
        );
    }
    println!(
        "{} layout/constant checks against the WDK header",
        checks.len()
    );
    assert!(
        mismatches.is_empty(),
        "{} of {} checks differ from the WDK header",
        mismatches.len(),
        checks.len()
    );
}
