//! A profiling harness for the simulator's per-packet save and restore cost
//! (docs/performance.md §8): the channel part of `benches/save_restore.rs` without criterion, so
//! that `valgrind --tool=callgrind` can count instructions of the timed part only.
//!
//! ```text
//! cargo build --release --example sim_profile
//! valgrind --tool=callgrind --collect-atstart=no --toggle-collect='*timed_save*' \
//!     target/release/examples/sim_profile save 2000
//! valgrind --tool=callgrind --collect-atstart=no --toggle-collect='*timed_restore*' \
//!     target/release/examples/sim_profile restore 2000
//! ```
//!
//! `save N` / `restore N`: one channel with N undelivered posts of 64 bytes, saved in 64 KiB
//! chunks (`save`), or that save restored once into a fresh instance (`restore`, fed as one
//! chunk as the §5 slope is; `restore-chunked`, in the 64 KiB chunks it was saved in). Prints the
//! wall time of the timed part per packet. An optional third argument repeats the timed part
//! (mean printed), so that `perf record` samples mostly it:
//! `perf record -F 5000 -g target/release/examples/sim_profile save 10000 300`. With
//! `SIM_PROFILE_PERF_CTL` naming perf's control FIFO, each timed part is bracketed by `enable` /
//! `disable` (`mkfifo /tmp/ctl; SIM_PROFILE_PERF_CTL=/tmp/ctl perf record -D -1
//! --control=fifo:/tmp/ctl …`), so that a restore's set-up on a fresh instance is not sampled;
//! perf acts on the FIFO a little late, so a few samples of the tear-down remain.

use std::time::{Duration, Instant};

use vmbsrv::vsp::VspChannel;
use vmbsrv_testkit::fixtures;
use vmbsrv_testkit::migration::{Lock, restore_channel, save_channel};

const MAX_MESSAGE_LEN: u32 = 256;

/// A loaded channel's save stream, in `chunk` byte chunks, and the time `save_channel` took.
fn loaded_save(packets: u32, chunk: usize, repeat: u32, sampled: bool) -> (Vec<u8>, Duration) {
    fixtures::with_loaded_channel(packets, 64, MAX_MESSAGE_LEN, |channel| {
        if sampled {
            perf_ctl("enable");
        }
        let start = Instant::now();
        let mut stream = timed_save(channel, chunk);
        for _ in 1..repeat {
            stream = timed_save(channel, chunk);
        }
        let elapsed = start.elapsed();
        if sampled {
            perf_ctl("disable");
        }
        (stream, elapsed / repeat)
    })
}

/// Writes `command` to perf's control FIFO named by `SIM_PROFILE_PERF_CTL`, if set.
fn perf_ctl(command: &str) {
    if let Some(path) = std::env::var_os("SIM_PROFILE_PERF_CTL") {
        std::fs::write(&path, format!("{command}\n")).expect("write to perf's control FIFO");
    }
}

#[inline(never)]
fn timed_save(channel: &VspChannel<'_, Lock>, chunk: usize) -> Vec<u8> {
    save_channel(channel, chunk).expect("save").0
}

#[inline(never)]
fn timed_restore(channel: &VspChannel<'_, Lock>, stream: &[u8]) {
    restore_channel(channel, stream).expect("restore");
}

fn restore_once(packets: u32, stream: &[u8]) -> Duration {
    fixtures::with_restoring_channel(packets, MAX_MESSAGE_LEN, |channel| {
        perf_ctl("enable");
        let start = Instant::now();
        timed_restore(channel, stream);
        let elapsed = start.elapsed();
        perf_ctl("disable");
        elapsed
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: sim_profile save|restore|restore-chunked PACKETS [REPEAT]";
    let mode = args.get(1).expect(usage).as_str();
    let packets: u32 = args.get(2).expect(usage).parse().expect(usage);
    // REPEAT > 1 runs the timed part that many times (for `perf record`) and prints the mean.
    let repeat: u32 = args.get(3).map_or(1, |r| r.parse().expect(usage)).max(1);
    let restore_repeated = |stream: &[u8]| -> Duration {
        (0..repeat)
            .map(|_| restore_once(packets, stream))
            .sum::<Duration>()
            / repeat
    };
    match mode {
        "save" => {
            let (_, elapsed) = loaded_save(packets, 64 * 1024, repeat, true);
            println!(
                "save {packets}: {:?}, {:.1} ns/packet",
                elapsed,
                elapsed.as_nanos() as f64 / f64::from(packets)
            );
        }
        "restore" => {
            let (stream, _) = loaded_save(packets, 4096 + packets as usize * 1024, 1, false);
            let elapsed = restore_repeated(&stream);
            println!(
                "restore {packets}: {:?}, {:.1} ns/packet",
                elapsed,
                elapsed.as_nanos() as f64 / f64::from(packets)
            );
        }
        "restore-chunked" => {
            let (stream, _) = loaded_save(packets, 64 * 1024, 1, false);
            let elapsed = restore_repeated(&stream);
            println!(
                "restore in 64 KiB chunks {packets}: {:?}, {:.1} ns/packet",
                elapsed,
                elapsed.as_nanos() as f64 / f64::from(packets)
            );
        }
        _ => panic!("{usage}"),
    }
}
