//! The VMBus service provider (filled by the VSP issue).
#![forbid(unsafe_code)]
