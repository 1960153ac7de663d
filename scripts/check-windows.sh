#!/usr/bin/env bash
# Type-checks the KMDF driver (feature `driver`, the default) for x86_64- and aarch64-pc-windows-msvc
# on a Linux host, against the WDK headers of a given tree, and optionally audits the kernel
# routines the driver imports. docs/windows-build.md ("Checking the driver on Linux") explains
# every step; the facts behind them are in docs/windows-check.md.
#
#   scripts/check-windows.sh [--imports] WDK_ROOT
#
# WDK_ROOT is a WDKContentRoot-shaped tree: Include/<10.x>/{km,km/crt,km/ufx/1.1,shared} and
# Include/wdf/kmdf/<kmdf> (an official WDK NuGet package or eWDK extracted, or a tree assembled
# from public mirrors). The tree is only read. Everything the script makes lives under
# target/windows-check/: a case-insensitive symlink view of the headers, empty library folders,
# a patched copy of wdk-build and one log per step.
#
# Output: one line per target (plus the first errors of a failing step); exit 0 when every step
# passed, 1 when a check failed, 2 on a usage error or a missing tool (named with the command that
# installs it; nothing is installed here).
set -euo pipefail

usage() {
  echo "usage: $0 [--imports] WDK_ROOT" >&2
  exit 2
}

imports=false
root=
for arg in "$@"; do
  case $arg in
    --imports) imports=true ;;
    -h | --help) usage ;;
    -*) echo "unknown option: $arg" >&2; usage ;;
    *) [ -z "$root" ] || usage; root=$arg ;;
  esac
done
[ -n "$root" ] || usage

cd "$(dirname "$0")/.."
project=$PWD
targets=(x86_64-pc-windows-msvc aarch64-pc-windows-msvc)
work=$project/target/windows-check
mkdir -p "$work"

# ---- tools: named, never installed ----------------------------------------------------------------
missing=()
need() { # need NAME INSTALL-HINT [FOUND-PATH]
  if [ -z "${3:-}" ]; then missing+=("$1 (install: $2)"); fi
}
newest_llvm_bin() { # the newest /usr/lib/llvm-N/bin/NAME
  local found
  found=$(ls -d /usr/lib/llvm-*/bin/"$1" 2>/dev/null | sort -V | tail -n 1 || true)
  echo "$found"
}
find_tool() { command -v "$1" 2>/dev/null || newest_llvm_bin "$1"; }

# clang acts as clang-cl when invoked under that name; Debian's clang package has no clang-cl.
clang_cl=$(find_tool clang-cl)
[ -n "$clang_cl" ] || clang_cl=$(find_tool clang)
llvm_lib=$(find_tool llvm-lib)
llvm_nm=$(find_tool llvm-nm)
libclang=$(ls -d /usr/lib/llvm-*/lib/libclang.so* /usr/lib/x86_64-linux-gnu/libclang*.so* 2>/dev/null \
  | sort -V | tail -n 1 || true)
need "clang (used as clang-cl)" "apt-get install clang" "$clang_cl"
need llvm-lib "apt-get install llvm" "$llvm_lib"
need "libclang (bindgen)" "apt-get install libclang-dev" "$libclang"
need python3 "apt-get install python3" "$(command -v python3 || true)"
need patch "apt-get install patch" "$(command -v patch || true)"
need cargo-clippy "rustup component add clippy" "$(cargo clippy --version 2>/dev/null || true)"
if $imports; then need llvm-nm "apt-get install llvm" "$llvm_nm"; fi
installed_targets=$(rustup target list --installed 2>/dev/null || true)
for target in "${targets[@]}"; do
  if ! grep -qx "$target" <<<"$installed_targets"; then
    missing+=("Rust target $target (install: rustup target add $target)")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  for item in "${missing[@]}"; do echo "missing: $item" >&2; done
  exit 2
fi

# ---- the given tree ---------------------------------------------------------------------------------
[ -d "$root/Include" ] || { echo "error: $root has no Include/ folder (expected a WDKContentRoot)" >&2; exit 2; }
root=$(cd "$root" && pwd)
kmdf_minor=$(sed -n 's/^target-kmdf-version-minor *= *\([0-9]*\).*/\1/p' Cargo.toml)
kmdf=1.$kmdf_minor
sdk=
for dir in $(ls -d "$root"/Include/10.* 2>/dev/null | sort -V); do
  [ -d "$dir/km" ] && [ -d "$dir/shared" ] && sdk=$(basename "$dir")
done
[ -n "$sdk" ] || { echo "error: no Include/10.*/ with km/ and shared/ under $root" >&2; exit 2; }
for sub in "Include/$sdk/km/crt" "Include/$sdk/km/ufx/1.1" "Include/wdf/kmdf/$kmdf"; do
  [ -d "$root/$sub" ] || { echo "error: $root/$sub is missing (KMDF $kmdf from Cargo.toml)" >&2; exit 2; }
done

# ---- a case-insensitive view of the headers, and empty library folders ----------------------------
# The headers include names whose case differs from the files (DriverSpecs.h vs driverspecs.h):
# the view holds a symlink per file plus one per differently-cased name that some header includes.
view=$work/wdk
stamp="$root $sdk $kmdf"
if [ "$(cat "$view.stamp" 2>/dev/null || true)" != "$stamp" ]; then
  rm -rf "$view" "$view.stamp"
  python3 - "$root" "$view" "Include/$sdk" "Include/wdf/kmdf/$kmdf" <<'PY'
import os, re, sys
root, view, *subtrees = sys.argv[1:]
include = re.compile(rb'^\s*#\s*include\s*[<"]([^>"]+)[>"]', re.M)
dirs, wanted = {}, set()
for sub in subtrees:
    for here, _, files in os.walk(os.path.join(root, sub)):
        rel = os.path.relpath(here, root)
        os.makedirs(os.path.join(view, rel), exist_ok=True)
        dirs[rel] = files
        for name in files:
            src = os.path.join(here, name)
            os.symlink(src, os.path.join(view, rel, name))
            if name.lower().endswith(('.h', '.hpp', '.inl', '.idl')) or '.' not in name:
                with open(src, 'rb') as f:
                    for m in include.finditer(f.read()):
                        wanted.add(os.path.basename(m.group(1).decode('latin-1').replace('\\', '/')))
aliases = 0
for rel, files in dirs.items():
    by_lower = {}
    for name in files:
        by_lower.setdefault(name.lower(), name)
    present = set(files)
    for name in wanted:
        real = by_lower.get(name.lower())
        if real and name not in present:
            os.symlink(real, os.path.join(view, rel, name))
            present.add(name)
            aliases += 1
print(f"header view: {sum(len(f) for f in dirs.values())} files, {aliases} case aliases")
PY
  for arch in x64 ARM64; do
    mkdir -p "$view/Lib/$sdk/km/$arch" "$view/Lib/wdf/kmdf/$arch/$kmdf"
  done
  echo "$stamp" >"$view.stamp"
fi

# ---- wdk-build with the project's patch for non-Windows hosts --------------------------------------
# Applied to a copy and used through `--config patch.crates-io...`: neither Cargo.toml nor the
# Windows build changes. Cargo records the patch in Cargo.lock, so the lockfile is put back after
# every cargo call (trap below).
wdk_build_version=$(python3 - <<'PY'
import re
text = open("Cargo.lock").read()
m = re.search(r'name = "wdk-build"\nversion = "([^"]+)"', text)
print(m.group(1) if m else "")
PY
)
patch_file=scripts/wdk-build-patch/wdk-build-$wdk_build_version.patch
[ -f "$patch_file" ] || { echo "error: no $patch_file for wdk-build $wdk_build_version (Cargo.lock)" >&2; exit 1; }
cargo fetch --locked --quiet
registry_copy=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"wdk-build-$wdk_build_version" | head -n 1)
patched=$work/wdk-build-$wdk_build_version
if [ ! -f "$patched/.vmbsrv-patched" ] || [ "$patch_file" -nt "$patched/.vmbsrv-patched" ]; then
  rm -rf "$patched"
  cp -r "$registry_copy" "$patched"
  patch --quiet -p1 -d "$patched" <"$patch_file"
  touch "$patched/.vmbsrv-patched"
fi

cp Cargo.lock "$work/Cargo.lock.saved"
trap 'cp "$work/Cargo.lock.saved" "$project/Cargo.lock"' EXIT

# ---- environment read by wdk-build, bindgen, cc and vmbsrv's build.rs ------------------------------
# clang-cl for wdf.c: cc picks the compiler family by its name, and clang switches to its MSVC
# driver mode when called as clang-cl.
mkdir -p "$work/bin"
ln -sf "$clang_cl" "$work/bin/clang-cl"
export WDKContentRoot=$view Version_Number=$sdk
export LIBCLANG_PATH
LIBCLANG_PATH=$(dirname "$libclang")
export VMBSRV_WINDOWS_CHECK=1 CARGO_TERM_COLOR=never
export CC_x86_64_pc_windows_msvc=$work/bin/clang-cl CC_aarch64_pc_windows_msvc=$work/bin/clang-cl
export AR_x86_64_pc_windows_msvc=$llvm_lib AR_aarch64_pc_windows_msvc=$llvm_lib
# wdm.h's ARM64 register macros paste tokens that MSVC's preprocessor accepts and clang rejects.
export CFLAGS_aarch64_pc_windows_msvc=-Wno-invalid-token-paste
patch_config="patch.crates-io.wdk-build.path=\"$patched\""

status=0
first_errors() { grep -E '^(error|warning)' "$1" | grep -v '^warning: .* generated [0-9]* warning' | head -n 8 | sed 's/^/    /'; }

for target in "${targets[@]}"; do
  log=$work/$target.log
  : >"$log"
  result="ok (cargo check + cargo clippy --lib -D warnings, feature driver, WDK $sdk, KMDF $kmdf)"
  if ! cargo check --config "$patch_config" --target "$target" >>"$log" 2>&1; then
    errors=$(grep -c '^error' "$log" || true)
    result="FAILED: cargo check, $errors error line(s); log $log"
  elif ! cargo clippy --config "$patch_config" --target "$target" --lib -- -D warnings >>"$log" 2>&1; then
    errors=$(grep -c '^error' "$log" || true)
    result="FAILED: cargo clippy --lib -D warnings, $errors error line(s); log $log"
  fi
  echo "$target: $result"
  case $result in FAILED*) first_errors "$log"; status=1 ;; esac
done

# The public KMCL constants against the tree's header (tests/kmcl_header_crosscheck.rs), on the host.
header=$root/Include/$sdk/km/vmbuskernelmodeclientlibapi.h
if [ -f "$header" ]; then
  log=$work/kmcl-header.log
  if env -u VMBSRV_WINDOWS_CHECK VMBSRV_KMCL_HEADER="$header" \
      cargo test --all-features --test kmcl_header_crosscheck -- --nocapture >"$log" 2>&1; then
    echo "KMCL header cross-check: ok ($(grep -m1 -o '[0-9]* GUIDs and [0-9]* macros' "$log" || echo 'see log') match crates/kmcl-sys/src/raw.rs)"
  else
    echo "KMCL header cross-check: FAILED; log $log"
    first_errors "$log"
    grep -m3 -E 'panicked|assertion' "$log" | sed 's/^/    /' || true
    status=1
  fi
else
  echo "KMCL header cross-check: skipped (no km/vmbuskernelmodeclientlibapi.h in $root)"
fi

if $imports && [ $status -eq 0 ]; then
  # The driver image's imports without linking (the import libraries are not public): a staticlib
  # of the release profile (LTO: the crate and its Rust dependencies become one object, holding
  # only what the driver's entry points reach). scripts/check-imports.py follows the members a
  # linker would pull in from that object and checks what stays undefined -- the routines the
  # image imports from the kernel and the KMDF stub library -- against docs/windows-imports.md.
  for target in "${targets[@]}"; do
    log=$work/$target.imports.log
    if ! cargo rustc --config "$patch_config" --target "$target" --release --lib \
        --crate-type staticlib >"$log" 2>&1; then
      echo "$target imports: FAILED to build the staticlib; log $log"
      first_errors "$log"
      status=1
      continue
    fi
    lib=target/$target/release/vmbsrv.lib
    "$llvm_nm" -A "$lib" >"$work/$target.nm" 2>/dev/null || true
    if ! python3 scripts/check-imports.py "$target" "$work/$target.nm"; then
      status=1
    fi
  done
elif $imports; then
  echo "imports: not audited (the type-check failed)"
fi

exit $status
