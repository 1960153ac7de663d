//! The save/restore callbacks per packet, and whole-channel save and restore through the
//! simulator, with the ratio tables docs/performance.md quotes.
//!
//! * `callbacks`: the pure VSP work of one packet, called directly, without the simulator or the
//!   lock — per packet of a 1,024-delivery table (`DeliveryTable::bench_running` /
//!   `bench_restoring`, hidden bench-support constructors):
//!   * save: what `save_packet` does over its two calls (the size probe, then the write into
//!     KMCL's `needed + 32`-byte buffer): `save_lookup` (`delivery_for_save` + the save identity)
//!     and `answer_save` each time, then `record_save_write` — a 68-byte record with the save id;
//!   * restore: what `restore_packet` does before it calls KMCL: `DeliveryRecord::decode_saved`,
//!     then `accept_restored` (save-identity and payload-length checks + `insert_restored`).
//!
//!   The record-only figures of before (`answer_save_call` probe/write without a save id,
//!   `decode` + length check) are kept alongside.
//! * `channel_save` / `channel_restore`: a channel with `max_in_flight = N`, a guest that opened
//!   and negotiated but reads nothing, N messages posted (64-byte payloads, no trace id), then
//!   `scenario::migration::save_channel` (64 KiB chunks) and, on a fresh simulator instance each
//!   time, `restore_channel` are timed. Set-up and tear-down are outside the timed part.
//!   N = 1, 100, 10,000 and 65,536 — `MAX_IN_FLIGHT_LIMIT`, the largest channel the format and
//!   the VSP allow, stands in for 100,000; quick mode drops it.
//!
//! The through-the-simulator cost of one packet is the slope between the two largest sizes,
//! which removes the fixed cost of a save (SaveBegin/End, stream assembly) or a restore.

mod common;

use std::hint::black_box;
use std::time::{Duration, Instant};

use common::{Recorder, ns, print_machine_line, quick, ratio, sample_size};
use criterion::{SamplingMode, Throughput};
use vmbsrv::saved::DeliveryRecord;
use vmbsrv::vsp::DeliveryTable;
use vmbsrv::vsp::VspChannel;
use vmbsrv::vsp::save_protocol::{answer_save, answer_save_call, save_writes};
use vmbsrv::vsp::table::Token;
use vmbsrv_testkit::fixtures;
use vmbsrv_testkit::migration::{Lock, restore_channel, save_channel};

const PAYLOAD_LEN: usize = 64;
const MAX_MESSAGE_LEN: u32 = 256;
const CHUNK_SIZE: usize = 64 * 1024;
/// `SimConfig::save_buffer_slack`'s default: KMCL's second save call gets `needed + 32` bytes.
const SAVE_SLACK: usize = 32;

/// The typical record every bench measures (testkit fixture).
fn typical() -> DeliveryRecord {
    vmbsrv_testkit::fixtures::typical_delivery_record()
}

fn sizes() -> Vec<u32> {
    if quick() {
        vec![1, 100, 10_000]
    } else {
        vec![1, 100, 10_000, 65_536]
    }
}

/// One loaded channel of `packets` posts of `PAYLOAD_LEN` bytes (testkit fixture).
fn with_loaded_channel<R>(packets: u32, body: impl FnOnce(&VspChannel<'_, Lock>) -> R) -> R {
    fixtures::with_loaded_channel(packets, PAYLOAD_LEN, MAX_MESSAGE_LEN, body)
}

/// Restores `stream` into a fresh simulator instance; returns the time of `restore_channel`.
fn restore_once(packets: u32, stream: &[u8]) -> Duration {
    fixtures::with_restoring_channel(packets, MAX_MESSAGE_LEN, |channel| {
        let start = Instant::now();
        restore_channel(channel, stream).expect("restore");
        start.elapsed()
    })
}

struct CallbackFigures {
    probe: Option<f64>,
    write: Option<f64>,
    /// Record only: probe + write of `answer_save_call` (no save id, no table).
    both: Option<f64>,
    /// Record only: `decode` + the payload-length check.
    restore: Option<f64>,
    /// Per packet: the save callback's table and record work (lookup, probe, lookup, write,
    /// `record_save_write`).
    vsp_save: Option<f64>,
    /// Per packet: the restore callback's work before KMCL (decode, checks, insert).
    vsp_restore: Option<f64>,
}

/// Deliveries per timed pass of the per-packet VSP figures.
const TABLE_PACKETS: u32 = 1024;
/// The save identity the VSP figures' records carry.
const SAVE_ID: u64 = 0x5AFE_1D00_0000_0001;

fn callbacks(c: &mut criterion::Criterion) -> CallbackFigures {
    let rec = Recorder::new();
    let mut group = c.benchmark_group("callbacks");
    let record = typical();
    let mut buffer = [0u8; DeliveryRecord::MIN_ENCODED_LEN + SAVE_SLACK];
    let mut saved = [0u8; DeliveryRecord::MIN_ENCODED_LEN];
    record.encode(&mut saved).expect("encode");
    // The restore row must time the accepting path, not an early error.
    assert_eq!(DeliveryRecord::decode(&saved), Ok(record));

    rec.bench(&mut group, "save probe", || {
        answer_save_call(Some(black_box(&record)), None)
    });
    rec.bench(&mut group, "save write", || {
        answer_save_call(Some(black_box(&record)), Some(black_box(&mut buffer[..])))
    });
    rec.bench(&mut group, "save probe+write", || {
        let probe = answer_save_call(Some(black_box(&record)), None);
        let write = answer_save_call(Some(black_box(&record)), Some(black_box(&mut buffer[..])));
        (probe, write)
    });
    rec.bench(&mut group, "restore decode+check", || {
        DeliveryRecord::decode(black_box(&saved))
            .ok()
            .filter(|r| r.payload_len <= black_box(MAX_MESSAGE_LEN))
    });

    // ---- the VSP's per-packet work, table included: one pass over TABLE_PACKETS deliveries
    let mut table = DeliveryTable::bench_running(TABLE_PACKETS).expect("table");
    let payload_crc = vmbsrv::saved::crc32c(&[0x5A; PAYLOAD_LEN]);
    let tokens: Vec<Token> = (0..u64::from(TABLE_PACKETS))
        .map(|tag| {
            let (token, _) = table
                .reserve(tag, tag, PAYLOAD_LEN as u32, payload_crc, None)
                .expect("reserve");
            table.finish_post(token, true);
            token
        })
        .collect();
    const SAVED_LEN: usize = DeliveryRecord::MIN_ENCODED_LEN + 12;
    let mut save_buffer = [0u8; SAVED_LEN + SAVE_SLACK];
    rec.bench(&mut group, "vsp save pass", || {
        black_box(table.begin_save());
        for &token in &tokens {
            // Call 1, the size probe.
            let (delivery, save_id) = table.save_lookup(Some(black_box(token)));
            let probe = answer_save(delivery.as_ref(), save_id, None);
            // Call 2, the write into KMCL's buffer of `needed + slack` bytes: as the callback
            // does it, the lookup and the count of the write in one hold, then the encoding.
            let buf = black_box(&mut save_buffer[..probe.bytes_needed as usize + SAVE_SLACK]);
            let (delivery, save_id) = table.save_lookup(Some(black_box(token)));
            if let Some(record) = &delivery
                && save_writes(record, save_id, buf.len())
            {
                table.record_save_write(token);
            }
            black_box(answer_save(delivery.as_ref(), save_id, Some(buf)));
        }
    });
    assert_eq!(
        table
            .save_lookup(tokens.first().copied())
            .0
            .map(|d| d.encoded_len_saved(Some(1))),
        Some(SAVED_LEN)
    );

    let records: Vec<[u8; SAVED_LEN]> = (1..=u64::from(TABLE_PACKETS))
        .map(|sequence| {
            let mut bytes = [0u8; SAVED_LEN];
            let delivery = DeliveryRecord {
                sequence,
                tag: sequence,
                posted_at: sequence,
                payload_len: PAYLOAD_LEN as u32,
                payload_crc,
                attempts: 1,
                trace_id: None,
            };
            assert_eq!(
                delivery.encode_saved(Some(SAVE_ID), &mut bytes),
                Ok(SAVED_LEN)
            );
            bytes
        })
        .collect();
    let next_sequence = u64::from(TABLE_PACKETS) + 1;
    rec.bench_custom(&mut group, "vsp restore pass", sample_size(), |iters| {
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            // A fresh table per pass, as a restore fills one; its allocation is not timed.
            let mut table = DeliveryTable::bench_restoring(
                TABLE_PACKETS,
                next_sequence,
                MAX_MESSAGE_LEN,
                Some(SAVE_ID),
            )
            .expect("table");
            let start = Instant::now();
            for bytes in &records {
                let inserted = match DeliveryRecord::decode_saved(black_box(bytes)) {
                    Ok((record, save_id)) => table
                        .accept_restored(record, save_id, MAX_MESSAGE_LEN, TABLE_PACKETS)
                        .map_err(|_| ()),
                    Err(_) => Err(()),
                };
                black_box(inserted).expect("restored");
            }
            total += start.elapsed();
            assert_eq!(table.in_flight(), TABLE_PACKETS);
            drop(black_box(table));
        }
        total
    });
    group.finish();
    let per_packet = |id: &str| rec.median(id).map(|t| t / f64::from(TABLE_PACKETS));
    CallbackFigures {
        probe: rec.median("save probe"),
        write: rec.median("save write"),
        both: rec.median("save probe+write"),
        restore: rec.median("restore decode+check"),
        vsp_save: per_packet("vsp save pass"),
        vsp_restore: per_packet("vsp restore pass"),
    }
}

/// The pure-VSP per-packet table; printed even when a criterion filter skipped the channels.
fn report_callbacks(cb: &CallbackFigures) {
    print_machine_line("per-packet VSP save/restore work, direct (no simulator, no lock)");
    println!("| per packet | ns |");
    println!("|---|---:|");
    println!(
        "| save: 2 x save_lookup + probe + write (68 B, save id) + record_save_write | {} |",
        ns(cb.vsp_save)
    );
    println!(
        "| restore: decode_saved + accept_restored (identity, length, insert) | {} |",
        ns(cb.vsp_restore)
    );
    println!(
        "| record only: answer_save_call probe + write (56 B) | {} |",
        ns(cb.both)
    );
    println!(
        "| record only: decode + length check | {} |",
        ns(cb.restore)
    );
    let target = |v: Option<f64>| match v {
        Some(v) if v <= 25.0 => "met",
        Some(_) => "MISSED",
        None => "not measured",
    };
    println!(
        "target vsp save <= 25 ns: {}; target vsp restore <= 25 ns: {}",
        target(cb.vsp_save),
        target(cb.vsp_restore)
    );
}

fn print_vsp_summary(cb: &CallbackFigures) {
    let fixed = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
    println!(
        "SUMMARY vsp vsp_save_ns={} vsp_restore_ns={}",
        fixed(cb.vsp_save),
        fixed(cb.vsp_restore)
    );
}

/// Median total time (ns) of a save and of a restore of `packets` outstanding packets.
#[derive(Clone, Copy)]
struct Row {
    packets: u32,
    save: Option<f64>,
    /// Restore of the save made with 64 KiB chunks.
    restore: Option<f64>,
    /// Restore of the same channel saved into a single chunk.
    restore_one_chunk: Option<f64>,
}

struct ChannelFigures {
    rows: Vec<Row>,
}

/// A chunk buffer large enough for the whole save of `packets` (the simulator's per-packet unit
/// is a few hundred bytes with a 64-byte payload).
fn one_chunk(packets: u32) -> usize {
    4096 + packets as usize * 1024
}

fn channel(c: &mut criterion::Criterion) -> ChannelFigures {
    let rec = Recorder::new();
    let samples = 10; // criterion's minimum; the large points take seconds each
    let mut rows = Vec::new();
    for packets in sizes() {
        let save_id = format!("save/{packets}");
        let restore_id = format!("restore/{packets}");
        let (stream, whole) = with_loaded_channel(packets, |channel| {
            let mut group = c.benchmark_group("channel_save");
            group
                .sampling_mode(SamplingMode::Flat)
                .sample_size(samples)
                .warm_up_time(Duration::from_millis(1))
                .measurement_time(Duration::from_millis(if quick() { 100 } else { 1000 }))
                .throughput(Throughput::Elements(u64::from(packets)));
            let mut last = Vec::new();
            rec.bench_custom(&mut group, &save_id, samples, |iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    let (stream, _, _) = save_channel(channel, CHUNK_SIZE).expect("save");
                    total += start.elapsed();
                    last = stream;
                }
                total
            });
            group.finish();
            // The same channel once more, into a single chunk (saving a saved channel again is
            // the documented retry path).
            let (whole, chunks, _) =
                save_channel(channel, one_chunk(packets)).expect("save, one chunk");
            assert_eq!(chunks, 1);
            (last, whole)
        });
        let mut group = c.benchmark_group("channel_restore");
        group
            .sampling_mode(SamplingMode::Flat)
            .sample_size(samples)
            .warm_up_time(Duration::from_millis(1))
            .measurement_time(Duration::from_millis(if quick() { 20 } else { 100 }))
            .throughput(Throughput::Elements(u64::from(packets)));
        rec.bench_custom(&mut group, &restore_id, samples, |iters| {
            (0..iters).map(|_| restore_once(packets, &stream)).sum()
        });
        let whole_id = format!("restore-one-chunk/{packets}");
        rec.bench_custom(&mut group, &whole_id, samples, |iters| {
            (0..iters).map(|_| restore_once(packets, &whole)).sum()
        });
        group.finish();
        rows.push(Row {
            packets,
            save: rec.median(&save_id),
            restore: rec.median(&restore_id),
            restore_one_chunk: rec.median(&whole_id),
        });
    }
    ChannelFigures { rows }
}

/// The machine-readable line of the channel part:
/// `SUMMARY sim save_ns_per_packet=… restore_ns_per_packet=… linear_save=… linear_restore=…
/// largest=N`. Per packet is the slope between 100 packets and the largest size this run has
/// (65,536 in a full run, 10,000 in quick mode), as docs/performance.md §5 computes it; `linear_*`
/// is ns/packet at the largest size over ns/packet at 100. Restore is the one-chunk restore (the
/// §5 slope); the 64 KiB-chunk figures are in the table above. `-` when a point did not run.
fn print_sim_summary(ch: &ChannelFigures) {
    let small = ch.rows.iter().find(|r| r.packets == 100).copied();
    let large = ch.rows.last().copied().filter(|r| r.packets > 100);
    let fmt = |v: Option<f64>, digits: usize| v.map_or("-".to_owned(), |v| format!("{v:.digits$}"));
    let slope = |pick: fn(&Row) -> Option<f64>| {
        let (small, large) = (small?, large?);
        Some((pick(&large)? - pick(&small)?) / f64::from(large.packets - small.packets))
    };
    let linear = |pick: fn(&Row) -> Option<f64>| {
        let (small, large) = (small?, large?);
        Some(per_packet(pick(&large), large.packets)? / per_packet(pick(&small), small.packets)?)
    };
    println!(
        "SUMMARY sim save_ns_per_packet={} restore_ns_per_packet={} linear_save={} linear_restore={} largest={}",
        fmt(slope(|r| r.save), 1),
        fmt(slope(|r| r.restore_one_chunk), 1),
        fmt(linear(|r| r.save), 3),
        fmt(linear(|r| r.restore_one_chunk), 3),
        large.map_or("-".to_owned(), |r| r.packets.to_string()),
    );
}

fn per_packet(total: Option<f64>, packets: u32) -> Option<f64> {
    total.map(|t| t / f64::from(packets))
}

fn micros(total: Option<f64>) -> String {
    total.map_or("-".into(), |t| format!("{:.1}", t / 1e3))
}

fn report(cb: &CallbackFigures, ch: &ChannelFigures) {
    print_machine_line("whole-channel save/restore through the simulator (median of 10 samples)");
    println!(
        "| packets | save (us) | save ns/packet | restore, 64 KiB chunks (us) | ns/packet | restore, one chunk (us) | ns/packet |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for r in &ch.rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.packets,
            micros(r.save),
            ns(per_packet(r.save, r.packets)),
            micros(r.restore),
            ns(per_packet(r.restore, r.packets)),
            micros(r.restore_one_chunk),
            ns(per_packet(r.restore_one_chunk, r.packets)),
        );
    }
    // Linearity: per-packet cost at the largest size over that at 100, the smallest size whose
    // per-packet figure is not dominated by the fixed cost of a save or restore.
    let small = ch.rows.iter().find(|r| r.packets == 100).copied();
    let large = ch.rows.last().copied().filter(|r| r.packets > 100);
    let (Some(small), Some(large)) = (small, large) else {
        return;
    };
    let growth = |pick: fn(&Row) -> Option<f64>| {
        ratio(
            per_packet(pick(&large), large.packets),
            per_packet(pick(&small), small.packets),
        )
    };
    println!(
        "linearity, ns/packet at {} over ns/packet at 100: save {}, restore (64 KiB chunks) {}, restore (one chunk) {}",
        large.packets,
        growth(|r| r.save),
        growth(|r| r.restore),
        growth(|r| r.restore_one_chunk),
    );
    // Per-packet cost through the simulator: the slope between 100 and the largest size.
    let slope = |pick: fn(&Row) -> Option<f64>| {
        let (ts, tl) = (pick(&small)?, pick(&large)?);
        Some((tl - ts) / f64::from(large.packets - small.packets))
    };

    print_machine_line("per-packet callback cost: pure VSP (direct) vs through the simulator");
    println!(
        "| per packet | pure VSP, direct (ns) | through simulator, slope 100..{} (ns) | rest (ns) | VSP codec share |",
        large.packets
    );
    println!("|---|---:|---:|---:|---:|");
    let row = |name: &str, pure: Option<f64>, through: Option<f64>| {
        let rest = pure.zip(through).map(|(p, t)| t - p);
        let share = pure
            .zip(through)
            .map_or("-".into(), |(p, t)| format!("{:.1}%", 100.0 * p / t));
        println!(
            "| {name} | {} | {} | {} | {share} |",
            ns(pure),
            ns(through),
            ns(rest)
        );
    };
    row("save: probe + write", cb.both, slope(|r| r.save));
    row(
        "restore: decode + check (one chunk)",
        cb.restore,
        slope(|r| r.restore_one_chunk),
    );
    println!(
        "save probe alone {} ns, write alone {} ns",
        ns(cb.probe),
        ns(cb.write)
    );
}

fn main() {
    let mut c = common::criterion();
    let cb = callbacks(&mut c);
    let ch = channel(&mut c);
    report(&cb, &ch);
    report_callbacks(&cb);
    print_sim_summary(&ch);
    c.final_summary();
    print_vsp_summary(&cb);
}
