//! Every fuzz target includes this file: it refuses to compile unless debug assertions and
//! overflow checks are both on (each is its own switch: `-Cdebug-assertions` alone can be paired
//! with `-Coverflow-checks=off`).
//!
//! `cargo fuzz build -O` alone builds *without* them (`-a` puts them back, see `cargo fuzz build
//! --help`), and for a long time `scripts/fuzz.sh` did exactly that while docs/reliability.md said
//! the targets ran with debug assertions: an arithmetic overflow on a hostile input wrapped
//! silently instead of failing the input, and the simulator's `debug_assert!` cross-checks never
//! ran (docs/reliability.md F7). This checks the target crate; the workspace's library crates the
//! targets link (vmbsrv, kmcl, kmcl-sys, kmcl-sim, vmbsrv-testkit, vmbsrv-client) make the same
//! check on themselves under `cfg(fuzzing)`, so a per-package profile setting cannot switch them
//! off unnoticed either. That needs `cfg(fuzzing)` to be set, which cargo-fuzz does for every crate
//! through `RUSTFLAGS` unless told `--no-cfg-fuzzing` (and a per-package setting cannot remove a
//! `--cfg`): so it is checked here too.

const _: () = assert!(
    cfg!(debug_assertions) && cfg!(overflow_checks),
    "fuzz targets must be built with debug assertions and overflow checks: cargo fuzz build -O -a"
);
const _: () = assert!(
    cfg!(fuzzing),
    "fuzz targets must be built with cfg(fuzzing) (no --no-cfg-fuzzing): the library crates check \
     their own debug assertions and overflow checks under it"
);
