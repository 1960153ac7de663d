//! The KMCL boundary.

pub(crate) mod abi;
pub mod raw;
mod status;

pub use status::{NtStatus, Result};
