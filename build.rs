//! Build script of vmbsrv.
//!
//! `cfg!(windows)` below is the **host** (build scripts are compiled for the machine running
//! Cargo); `CARGO_CFG_TARGET_OS` is the **target**. wdk-build 0.6.0 only compiles on a Windows host
//! (its `windows` 0.62 dependency chain and its deliberate `compile_error!` for other hosts), which
//! is why it sits in `[target.'cfg(windows)'.build-dependencies]` and is only named under
//! `#[cfg(windows)]` here.
//!
//! | host    | target  | feature `driver` | what happens |
//! |---------|---------|------------------|--------------|
//! | any     | not Windows | any          | nothing WDK-related (the Linux build and tests) |
//! | Windows | Windows | on               | wdk-build binary configuration (kernel link arguments, `driver_model__driver_type` cfg) and the KMCL identifiers read from the installed WDK into `$OUT_DIR/kmcl_interface_ids.rs` |
//! | Windows | Windows | off              | nothing WDK-related (e.g. host tests with `--no-default-features --features sim`) |
//! | other   | Windows | any              | a `cargo::warning` only; never fails here |
//!
//! The header parser lives in `build/kmcl_header.rs` so that `tests/build_kmcl_header.rs` can
//! test it on every platform.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};

#[path = "build/kmcl_header.rs"]
mod kmcl_header;

/// The generated file that `src/kmcl/interface_id.rs` includes.
const IDS_FILE: &str = "kmcl_interface_ids.rs";

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=build/kmcl_header.rs");
    // wdk-build's `Config::emit_cfg_settings` emits `driver_model__driver_type="KMDF"` on Windows
    // driver builds (key `DRIVER_MODEL-DRIVER_TYPE`, values WDM | KMDF | UMDF, in
    // wdk-build-0.6.0/src/lib.rs `EXPORTED_CFG_SETTINGS`). Declare it on every host so code that
    // mentions it is checked the same way everywhere.
    println!(
        r#"cargo::rustc-check-cfg=cfg(driver_model__driver_type, values("WDM", "KMDF", "UMDF"))"#
    );
    // Set below when the KMCL identifiers were read from a real WDK header.
    println!("cargo::rustc-check-cfg=cfg(vmbsrv_kmcl_ids)");

    let target_os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if target_os != "windows" {
        return;
    }
    let driver = env::var_os("CARGO_FEATURE_DRIVER").is_some();
    let out_dir =
        PathBuf::from(env::var_os("OUT_DIR").expect("Cargo sets OUT_DIR for build scripts"));

    if cfg!(windows) {
        if driver {
            #[cfg(windows)]
            if let Err(message) = windows_host::configure_driver_build(&out_dir) {
                fail(&message);
            }
        }
    } else {
        non_windows_host(driver, &out_dir);
    }
}

/// A Windows target on a Linux (or other) host: the WDK is not available and wdk-build cannot
/// even compile, so nothing is configured. Never fails: `cargo check --target
/// x86_64-pc-windows-msvc --no-default-features` must work on Linux.
fn non_windows_host(driver: bool, out_dir: &Path) {
    if driver {
        println!(
            "cargo::warning=vmbsrv: Windows target on a non-Windows host: the KMDF driver glue \
             (feature `driver`) needs the WDK and a Windows host and cannot be built here; \
             use `--no-default-features` to type-check the platform-neutral code"
        );
        // If the build ever gets as far as `src/kmcl/interface_id.rs`, say why instead of
        // "couldn't read kmcl_interface_ids.rs". No value is invented.
        let text = "compile_error!(\"the KMCL interface identifiers are read from the installed WDK's \
                    km/vmbuskernelmodeclientlibapi.h by build.rs, which needs a Windows host\");\n";
        if let Err(error) = fs::write(out_dir.join(IDS_FILE), text) {
            println!("cargo::warning=vmbsrv: could not write {IDS_FILE}: {error}");
        }
    } else {
        println!(
            "cargo::warning=vmbsrv: Windows target on a non-Windows host: the KMDF driver glue \
             (feature `driver`) is not compiled; only the platform-neutral code is checked"
        );
    }
}

/// Stops the build with `message` on stderr (Cargo shows it under "--- stderr").
#[cfg_attr(not(windows), allow(dead_code))]
fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1);
}

#[cfg(windows)]
mod windows_host {
    //! Windows host, Windows target, feature `driver`.

    use std::fs;
    use std::path::{Path, PathBuf};

    use super::{IDS_FILE, kmcl_header};

    /// Environment variables that move the WDK (wdk-build-0.6.0/src/utils.rs
    /// `detect_wdk_content_root`, `detect_windows_sdk_version`).
    const WDK_LOCATION_ENV: [&str; 4] = [
        "WDKContentRoot",
        "MicrosoftKitRoot",
        "WDKKitVersion",
        "Version_Number",
    ];

    pub(super) fn configure_driver_build(out_dir: &Path) -> Result<(), String> {
        for var in WDK_LOCATION_ENV {
            println!("cargo::rerun-if-env-changed={var}");
        }

        // `wdk_build::configure_wdk_binary_build()` is exactly
        // `Config::from_env_auto()?.configure_binary_build()` (wdk-build-0.6.0/src/lib.rs); it is
        // spelled out so that the same `Config` also gives the include paths. There is no
        // `configure_wdk_binary_build_and_then` in 0.6.0 (only the library variant).
        // `from_env_auto` reads `[package.metadata.wdk.driver-model]` (KMDF 1.27) through
        // `cargo metadata`; `configure_binary_build` checks `crt-static`, emits the link search
        // paths, the KMDF cdylib link arguments (/DRIVER, /ENTRY:FxDriverEntry, ...) and
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
        })?;

        // `Config::include_paths` yields `<WDKContentRoot>/Include/<sdk>/km/crt`, `.../km`,
        // `.../shared`, `Include/wdf/kmdf/1.27`, `.../km/ufx/1.1`, each checked to exist.
        let include_paths: Vec<PathBuf> = config
            .include_paths()
            .map_err(|error| format!("wdk-build could not list the WDK include paths: {error}"))?
            .collect();
        let header = include_paths
            .iter()
            .map(|dir| dir.join(kmcl_header::HEADER_FILE_NAME))
            .find(|candidate| candidate.is_file())
            .ok_or_else(|| {
                let searched: Vec<String> = include_paths
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect();
                format!(
                    "{} was not found in the WDK include paths [{}]; vmbsrv needs the VMBus KMCL \
                     header of a Windows 10 1809 (build 17763) or later WDK",
                    kmcl_header::HEADER_FILE_NAME,
                    searched.join("; ")
                )
            })?;
        println!("cargo::rerun-if-changed={}", header.display());

        let bytes = fs::read(&header)
            .map_err(|error| format!("cannot read {}: {error}", header.display()))?;
        let text = kmcl_header::decode_header_bytes(&bytes);
        let ids = kmcl_header::extract_kmcl_ids(&text).map_err(|error| {
            format!(
                "{}: {error}. vmbsrv never guesses `{}`; it must come from the installed WDK \
                 (Windows 10 1809 / build 17763 or later).",
                header.display(),
                error.symbol()
            )
        })?;

        let target = out_dir.join(IDS_FILE);
        let rust = kmcl_header::render_rust(&ids, &header.display().to_string());
        fs::write(&target, rust)
            .map_err(|error| format!("cannot write {}: {error}", target.display()))?;
        println!("cargo::rustc-cfg=vmbsrv_kmcl_ids");
        Ok(())
    }
}
