//! vmbsrv-testkit: vmbsrv's end-to-end test support over the KMCL simulator (`kmcl-sim`) — a guest
//! that speaks vmbsrv's protocol, a host control client, the [`Ledger`] that checks exactly-once
//! delivery, the live-migration scenario, and the fixtures the test files share.
//!
//! A dev-dependency only (of the root `vmbsrv` package's integration tests, examples and benches,
//! and of the fuzz targets); never a dependency of the driver, and never used by unit tests inside
//! `vmbsrv` (they would see a second copy of its types).
//!
//! This is the only crate that knows both the simulator and the service. The simulator stays
//! ignorant of vmbsrv's protocol and format, so a bug in the service cannot hide behind a
//! matching one in the simulator; the ledger checks every payload and tag the guest read against
//! its own record of the post, never against anything the service wrote.
//! The end-to-end tests, the `live_migration` example (the main job) and the benches use it.
// Fuzz builds (cargo-fuzz's `--cfg fuzzing`, nightly only) must keep this crate's debug assertions
// and overflow checks: the const below refuses to compile without them (docs/reliability.md F7).
#![cfg_attr(fuzzing, feature(cfg_overflow_checks))]
#![forbid(unsafe_code)]

#[cfg(fuzzing)]
const _: () = assert!(
    cfg!(debug_assertions) && cfg!(overflow_checks),
    "fuzz builds keep debug assertions and overflow checks (docs/reliability.md F7)"
);

pub mod fixtures;
pub mod guest;
pub mod ledger;
pub mod migration;

pub use guest::GuestModel;
pub use ledger::{Digest, Ledger, Posted, Verdict};
pub use migration::{Cut, MigrationConfig, MigrationReport, run_live_migration};

/// A small deterministic generator (SplitMix64): scenarios must replay exactly from a seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `0..bound` (0 when `bound` is 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        if bound == 0 {
            0
        } else {
            self.next_u64() % bound
        }
    }
}
