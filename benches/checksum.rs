//! CRC32C throughput of the implementation `vmbsrv::saved::crc32c` dispatches to (the SSE4.2
//! `crc32` instruction where CPUID reports it, else the table), against the portable table it
//! falls back to (the `crc` crate's slicing-by-16, exactly as `saved::checksum` builds it) and a
//! bit-at-a-time baseline, at the sizes that matter: 48 B (what a `DeliveryRecord`'s header CRC
//! covers), 96 B (a `ChannelRecord`'s), 512 B and 64 KiB (message payloads, checksummed on every
//! post; 64 KiB is also a save-stream frame), and 1,024 B, just past `hwcrc::LONG` (768 B), where
//! the hardware path switches from one `crc32` chain to three.

mod common;

use std::hint::black_box;

use common::{Recorder, ns, print_machine_line, ratio};
use crc::{CRC_32_ISCSI, Crc, Table};
use criterion::Throughput;

static TABLE: Crc<u32, Table<16>> = Crc::<u32, Table<16>>::new(&CRC_32_ISCSI);

fn bitwise(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

const SIZES: [usize; 5] = [48, 96, 512, 1_024, 65_536];

fn main() {
    let mut c = common::criterion();
    let rec = Recorder::new();
    let mut state = 0x2545_F491_4F6C_DD1D_u64;
    let data: Vec<u8> = (0..SIZES[SIZES.len() - 1])
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let chosen = if vmbsrv::hwcrc::available() {
        "hardware"
    } else {
        "table"
    };
    for &size in &SIZES {
        let input = &data[..size];
        let expected = TABLE.checksum(input);
        assert_eq!(vmbsrv::saved::crc32c(input), expected);
        assert_eq!(bitwise(input), expected);
        let mut group = c.benchmark_group(format!("crc32c/{size}"));
        group.throughput(Throughput::Bytes(size as u64));
        rec.bench(&mut group, &format!("saved::crc32c/{size}"), || {
            vmbsrv::saved::crc32c(black_box(input))
        });
        rec.bench(&mut group, &format!("table16/{size}"), || {
            TABLE.checksum(black_box(input))
        });
        rec.bench(&mut group, &format!("bitwise/{size}"), || {
            bitwise(black_box(input))
        });
        group.finish();
    }

    print_machine_line(&format!(
        "CRC32C: saved::crc32c ({chosen}) vs table vs bitwise (median of criterion samples)"
    ));
    println!(
        "| bytes | saved::crc32c ns | GB/s | table16 ns | GB/s | bitwise ns | GB/s | table / chosen | bitwise / chosen |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let gbs =
        |size: usize, t: Option<f64>| t.map_or("-".into(), |t| format!("{:.2}", size as f64 / t));
    for &size in &SIZES {
        let chosen = rec.median(&format!("saved::crc32c/{size}"));
        let table = rec.median(&format!("table16/{size}"));
        let bit = rec.median(&format!("bitwise/{size}"));
        println!(
            "| {size} | {} | {} | {} | {} | {} | {} | {} | {} |",
            ns(chosen),
            gbs(size, chosen),
            ns(table),
            gbs(size, table),
            ns(bit),
            gbs(size, bit),
            ratio(table, chosen),
            ratio(bit, chosen),
        );
    }
    c.final_summary();
}
