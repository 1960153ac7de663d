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
//! chunk as the §5 slope is). Prints the wall time of the timed part per packet.

use std::time::{Duration, Instant};

use kmcl_sim::{Guest, Kmcl};
use vmbsrv::vsp::{PostRequest, VspChannel};
use vmbsrv_testkit::GuestModel;
use vmbsrv_testkit::MigrationConfig;
use vmbsrv_testkit::migration::{
    Lock, SCENARIO_INSTANCE, SCENARIO_INTERFACE_TYPE, channel_config, query_server_interface,
    restore_channel, save_channel,
};

const MAX_MESSAGE_LEN: u32 = 256;

/// A loaded channel's save stream, in `chunk` byte chunks, and the time `save_channel` took.
fn loaded_save(packets: u32, chunk: usize) -> (Vec<u8>, Duration) {
    let kmcl = Kmcl::new(MigrationConfig::sim_for(packets));
    let guest = GuestModel::new(Guest::new(SCENARIO_INTERFACE_TYPE, SCENARIO_INSTANCE));
    let out = {
        let interface = query_server_interface(&kmcl).expect("interface");
        kmcl.attach_guest(&guest.endpoint).expect("attach");
        let channel = VspChannel::<Lock>::create(
            &interface,
            &channel_config(&kmcl, packets, MAX_MESSAGE_LEN),
        )
        .expect("create");
        guest.open_and_negotiate(&kmcl).expect("negotiate");
        let payload = [0x5A_u8; 64];
        for tag in 0..u64::from(packets) {
            channel
                .post(&PostRequest {
                    tag,
                    payload: &payload,
                    posted_at: tag,
                    trace_id: None,
                })
                .expect("post");
        }
        kmcl.wait_idle();
        let start = Instant::now();
        let stream = timed_save(&channel, chunk);
        let elapsed = start.elapsed();
        guest.endpoint.detach();
        channel.complete_migration().expect("complete_migration");
        kmcl.wait_idle();
        (stream, elapsed)
    };
    let violations = kmcl.finish();
    assert!(violations.is_empty(), "{violations:?}");
    out
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
    let kmcl = Kmcl::new(MigrationConfig::sim_for(packets));
    let elapsed = {
        let interface = query_server_interface(&kmcl).expect("interface");
        let channel = VspChannel::<Lock>::create_for_restore(
            &interface,
            &channel_config(&kmcl, packets, MAX_MESSAGE_LEN),
        )
        .expect("create_for_restore");
        let start = Instant::now();
        timed_restore(&channel, stream);
        let elapsed = start.elapsed();
        assert_eq!(channel.statistics().in_flight, packets);
        channel.disable().expect("disable");
        kmcl.wait_idle();
        elapsed
    };
    let violations = kmcl.finish();
    assert!(violations.is_empty(), "{violations:?}");
    elapsed
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: sim_profile save|restore PACKETS";
    let mode = args.get(1).expect(usage).as_str();
    let packets: u32 = args.get(2).expect(usage).parse().expect(usage);
    match mode {
        "save" => {
            let (_, elapsed) = loaded_save(packets, 64 * 1024);
            println!(
                "save {packets}: {:?}, {:.1} ns/packet",
                elapsed,
                elapsed.as_nanos() as f64 / f64::from(packets)
            );
        }
        "restore" => {
            let (stream, _) = loaded_save(packets, 4096 + packets as usize * 1024);
            let elapsed = restore_once(packets, &stream);
            println!(
                "restore {packets}: {:?}, {:.1} ns/packet",
                elapsed,
                elapsed.as_nanos() as f64 / f64::from(packets)
            );
        }
        _ => panic!("{usage}"),
    }
}
