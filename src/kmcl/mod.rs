//! The KMCL boundary.

mod status;

pub use status::{NtStatus, Result};
