//! Untrusted save-stream files into `vmbsrvctl inspect`'s reader (`vmbsrv_client::inspect`).
//!
//! Properties: nothing panics; the report renders; a file the inspector calls clean is a stream
//! the driver-side reader (`FrameReader`) accepts frame by frame.
#![no_main]
// `cfg!(overflow_checks)` in `checked_build` (fuzz builds are nightly-only).
#![feature(cfg_overflow_checks)]

#[path = "../common/checked_build.rs"]
mod checked_build;

use libfuzzer_sys::fuzz_target;
use vmbsrv::saved::stream::FrameReader;
use vmbsrv_client::inspect::inspect;

fuzz_target!(|data: &[u8]| {
    let inspection = inspect(data);
    let _ = inspection.to_string();
    if inspection.is_clean() {
        let reader = FrameReader::new(data).expect("a clean file has a valid stream header");
        for frame in reader {
            frame.expect("a clean file frames cleanly");
        }
    }
});
