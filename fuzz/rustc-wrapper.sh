#!/usr/bin/env bash
# RUSTC_WRAPPER of scripts/fuzz.sh: compiles the KMCL simulator (crate `kmcl_sim`) without
# libFuzzer's coverage instrumentation; every other crate is compiled exactly as cargo-fuzz asks.
#
# Why (docs/performance.md §8.8): the simulator is the targets' environment, not the code under
# test. Instrumented, it held 83 % of a target's coverage counters and about two thirds of the
# features of every input, and libFuzzer's per-input bookkeeping of those features was half of
# guest_packets' time. Uninstrumented, guest_packets ran 1.9–2.2× more inputs per second and its
# corpus reached the same coverage of everything else (measured in §8.8). What stays the same:
# the simulator's code and every check in it (its contract verifier, `debug_assert!`s, overflow
# checks and AddressSanitizer all remain); only its edges no longer steer the search.
#
# cargo-fuzz puts `-Cpasses=sancov-module` into RUSTFLAGS, which cargo applies to every crate and
# after any per-package `rustflags` of fuzz/Cargo.toml, so a package setting cannot take it out
# again; this wrapper drops that one argument from the simulator's rustc command line. It acts
# only when scripts/fuzz.sh's marker `--cfg=vmbsrv_fuzz_uninstrumented_sim="<hash>"` is on the
# command line too. scripts/fuzz.sh puts it in RUSTFLAGS with the first 16 hex digits of this
# file's SHA-256 as the value: cargo's fingerprint covers RUSTFLAGS but neither RUSTC_WRAPPER nor
# the wrapper's contents, so the hash is what makes cargo rebuild when a build switches between
# the two set-ups or this file changes. The build fails, rather than silently leaving the simulator
# instrumented or half-instrumented, when the simulator is compiled with the marker but without
# exactly the one argument expected, with another sancov-module argument, or from an `@argfile`
# (which this wrapper does not read; refused whenever the marker is in RUSTFLAGS).
#
# Usage (cargo calls it): rustc-wrapper.sh RUSTC ARGS...
set -euo pipefail

rustc="$1"
shift

crate=""
marker=0
argfile=0
previous=""
for arg in "$@"; do
    case "$arg" in
        --crate-name=*) crate="${arg#--crate-name=}" ;;
        --cfg=vmbsrv_fuzz_uninstrumented_sim=*) marker=1 ;;
        @*) argfile=1 ;;
    esac
    if [ "$previous" = "--crate-name" ]; then
        crate="$arg"
    fi
    previous="$arg"
done

# Cargo moves *every* argument into an @argfile when the command line is too long, marker
# included, so the marker is looked for in the RUSTFLAGS cargo-fuzz passed down as well.
case " ${RUSTFLAGS:-} " in
    *" --cfg=vmbsrv_fuzz_uninstrumented_sim="*) env_marker=1 ;;
    *) env_marker=0 ;;
esac
if [ "$argfile" -eq 1 ] && { [ "$marker" -eq 1 ] || [ "$env_marker" -eq 1 ]; }; then
    echo "fuzz/rustc-wrapper.sh: rustc arguments in an @argfile are not supported" >&2
    exit 1
fi
if [ "$crate" != "kmcl_sim" ] || [ "$marker" -eq 0 ]; then
    exec "$rustc" "$@"
fi

kept=()
dropped=0
for arg in "$@"; do
    if [ "$arg" = "-Cpasses=sancov-module" ]; then
        dropped=$((dropped + 1))
    else
        kept+=("$arg")
    fi
done
for arg in "${kept[@]}"; do
    case "$arg" in
        *sancov-module*)
            echo "fuzz/rustc-wrapper.sh: unexpected coverage argument '$arg' for kmcl_sim" >&2
            exit 1
            ;;
    esac
done
if [ "$dropped" -ne 1 ]; then
    echo "fuzz/rustc-wrapper.sh: expected one -Cpasses=sancov-module for kmcl_sim, found $dropped" >&2
    echo "(did cargo-fuzz change how it adds coverage instrumentation?)" >&2
    exit 1
fi
exec "$rustc" "${kept[@]}"
