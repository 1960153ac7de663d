//! Every fuzz target includes this file: it refuses to compile unless debug assertions (and with
//! them overflow checks) are on.
//!
//! `cargo fuzz build -O` alone builds *without* them (`-a` puts them back, see `cargo fuzz build
//! --help`), and for a long time `scripts/fuzz.sh` did exactly that while docs/reliability.md said
//! the targets ran with debug assertions: an arithmetic overflow on a hostile input wrapped
//! silently instead of failing the input, and the simulator's `debug_assert!` cross-checks never
//! ran. A build that drops them now fails here instead of fuzzing with fewer checks.

const _: () = assert!(
    cfg!(debug_assertions),
    "fuzz targets must be built with debug assertions and overflow checks: cargo fuzz build -O -a"
);
