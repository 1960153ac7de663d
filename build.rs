//! Build script (placeholder until the Windows build configuration lands).
fn main() {}
