//! Saved-state records (filled by the saved-state issue).
#![forbid(unsafe_code)]
