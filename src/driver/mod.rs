//! KMDF glue (Windows targets with the `driver` feature only; filled by the Windows driver issue).
