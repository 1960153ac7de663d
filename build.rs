//! Build script of vmbsrv.
//!
//! `cfg!(windows)` below is the **host** (build scripts are compiled for the machine running
//! Cargo); `CARGO_CFG_TARGET_OS` is the **target**. wdk-build 0.6.0 only compiles on a Windows host
//! (its `windows` 0.62 dependency chain and its deliberate `compile_error!` for other hosts), which
//! is why it sits in `[target.'cfg(windows)'.build-dependencies]` and is only named under
//! `#[cfg(windows)]` here.
//!
//! | host    | target      | feature `driver` | what happens |
//! |---------|-------------|------------------|--------------|
//! | any     | not Windows | any              | nothing WDK-related (the Linux build and tests) |
//! | Windows | Windows     | on               | wdk-build binary configuration: kernel link arguments and the `driver_model__driver_type` cfg |
//! | Windows | Windows     | off              | nothing WDK-related (e.g. host tests with `--workspace --no-default-features`) |
//! | other   | Windows     | on, `VMBSRV_WINDOWS_CHECK=1` | type-check mode of `scripts/check-windows.sh`: the `driver_model__driver_type="KMDF"` cfg that wdk-build would emit, no link configuration (a check never links) |
//! | other   | Windows     | otherwise        | a `cargo::warning` only; never fails here |
//!
//! The KMCL identifiers are constants in `crates/kmcl-sys/src/raw.rs` (public header values,
//! docs/kmcl-bindings.md), so no build reads a header.

use std::env;

/// Set by `scripts/check-windows.sh`: a Windows-target type-check on a non-Windows host, with the
/// WDK headers of a given tree and a patched wdk-build (docs/windows-build.md, "Checking the driver
/// on Linux").
const CHECK_MODE_ENV: &str = "VMBSRV_WINDOWS_CHECK";

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed={CHECK_MODE_ENV}");
    // wdk-build's `Config::emit_cfg_settings` emits `driver_model__driver_type="KMDF"` on Windows
    // driver builds (key `DRIVER_MODEL-DRIVER_TYPE`, values WDM | KMDF | UMDF, in
    // wdk-build-0.6.0/src/lib.rs `EXPORTED_CFG_SETTINGS`). Declare it on every host so code that
    // mentions it is checked the same way everywhere.
    println!(
        r#"cargo::rustc-check-cfg=cfg(driver_model__driver_type, values("WDM", "KMDF", "UMDF"))"#
    );

    let target_os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if target_os != "windows" {
        return;
    }
    let driver = env::var_os("CARGO_FEATURE_DRIVER").is_some();

    if cfg!(windows) {
        if driver {
            #[cfg(windows)]
            if let Err(message) = windows_host::configure_driver_build() {
                eprintln!("error: {message}");
                std::process::exit(1);
            }
        }
    } else {
        non_windows_host(driver);
    }
}

/// A Windows target on a Linux (or other) host. Never fails: `cargo check --target
/// x86_64-pc-windows-msvc --no-default-features` must work on Linux.
fn non_windows_host(driver: bool) {
    if driver && env::var_os(CHECK_MODE_ENV).is_some_and(|value| value == "1") {
        // Type-check mode: wdk-sys generates its bindings from the tree the script names; the
        // only thing vmbsrv's own configuration contributes to compiling (not linking) the crate
        // is the driver-model cfg, emitted exactly as wdk-build would for KMDF metadata.
        println!(r#"cargo::rustc-cfg=driver_model__driver_type="KMDF""#);
    } else if driver {
        println!(
            "cargo::warning=vmbsrv: Windows target on a non-Windows host: the KMDF driver glue \
             (feature `driver`) needs the WDK; type-check it with scripts/check-windows.sh \
             <WDK tree>, or use `--no-default-features` for the platform-neutral code"
        );
    } else {
        println!(
            "cargo::warning=vmbsrv: Windows target on a non-Windows host: the KMDF driver glue \
             (feature `driver`) is not compiled; only the platform-neutral code is checked"
        );
    }
}

#[cfg(windows)]
mod windows_host {
    //! Windows host, Windows target, feature `driver`.

    /// Environment variables that move the WDK (wdk-build-0.6.0/src/utils.rs
    /// `detect_wdk_content_root`, `detect_windows_sdk_version`).
    const WDK_LOCATION_ENV: [&str; 4] = [
        "WDKContentRoot",
        "MicrosoftKitRoot",
        "WDKKitVersion",
        "Version_Number",
    ];

    pub(super) fn configure_driver_build() -> Result<(), String> {
        for var in WDK_LOCATION_ENV {
            println!("cargo::rerun-if-env-changed={var}");
        }
        // `wdk_build::configure_wdk_binary_build()` is exactly
        // `Config::from_env_auto()?.configure_binary_build()` (wdk-build-0.6.0/src/lib.rs).
        // `from_env_auto` reads `[package.metadata.wdk.driver-model]` through `cargo metadata`;
        // `configure_binary_build` checks `crt-static`, emits the link search paths, the KMDF
        // cdylib link arguments (/DRIVER, /ENTRY:FxDriverEntry, ...) and
        // `cargo::rustc-cfg=driver_model__driver_type="KMDF"`.
        let config = wdk_build::Config::from_env_auto().map_err(|error| {
            format!("wdk-build could not derive the WDK configuration: {error}")
        })?;
        config.configure_binary_build().map_err(|error| {
            format!(
                "wdk-build could not configure the driver build: {error} (is RUSTFLAGS \
                 `-C target-feature=+crt-static` overriding .cargo/config.toml correctly, and is \
                 the WDK installed?)"
            )
        })
    }
}
