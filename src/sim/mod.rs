//! The user-mode KMCL simulator (filled by the simulator issue).
