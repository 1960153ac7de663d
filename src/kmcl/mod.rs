//! The KMCL boundary.
