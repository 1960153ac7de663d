//! Unit tests of the delivery table (`src/vsp/table.rs`), kept beside it in their own file.
use super::*;

fn ready(capacity: u32) -> DeliveryTable {
    let mut table = DeliveryTable::try_new(capacity).unwrap();
    table.running = true;
    table.protocol_version = 1;
    table
}

#[test]
fn a_table_without_storage_still_accounts_for_late_completions() {
    let mut table = ready(4);
    let (a, _) = table.reserve(1, 0, 1, 0, None).unwrap();
    table.finish_post(a, true);
    let (b, _) = table.reserve(2, 0, 1, 0, None).unwrap();
    table.finish_post(b, true);
    assert_eq!(table.abandon_unreturned(), 2);
    let (c, _) = table.reserve(3, 0, 1, 0, None).unwrap();
    table.finish_post(c, true);
    assert_eq!(table.packets_kmcl_owns(), 3);
    let storage = table.take_storage();
    drop(storage);
    assert_eq!((table.in_flight(), table.packets_kmcl_owns()), (0, 3));
    for token in [c, a, b] {
        assert!(table.complete(token, |_| OutcomeKind::Acked).is_none());
        assert!(table.delivery(token).is_none());
        table.completion_without_delivery();
    }
    assert_eq!(table.packets_kmcl_owns(), 0);
    table.completion_without_delivery();
    assert_eq!(table.packets_kmcl_owns(), 0, "never below zero");
}

#[test]
fn reserve_complete_and_outcome_bound() {
    let mut table = ready(2);
    let (a, ra) = table.reserve(7, 0, 1, 0, None).unwrap();
    table.finish_post(a, true);
    let (b, rb) = table.reserve(8, 0, 1, 0, None).unwrap();
    table.finish_post(b, true);
    assert_eq!((ra.sequence, rb.sequence), (1, 2));
    assert_eq!(
        table.reserve(9, 0, 1, 0, None).unwrap_err(),
        ReserveError::Full
    );
    table.complete(a, |_| OutcomeKind::Acked).unwrap();
    // The outcome still occupies room until it is fetched.
    assert_eq!(
        table.reserve(9, 0, 1, 0, None).unwrap_err(),
        ReserveError::Full
    );
    let mut out = [Outcome {
        sequence: 0,
        tag: 0,
        kind: OutcomeKind::Acked,
        attempts: 0,
    }; 4];
    assert_eq!(table.drain_outcomes(&mut out), 1);
    assert_eq!(out[0].sequence, 1);
    let (c, rc) = table.reserve(9, 0, 1, 0, None).unwrap();
    assert_eq!(rc.sequence, 3);
    // A stale token finds nothing, even though slot 0 is reused.
    assert!(table.complete(a, |_| OutcomeKind::Acked).is_none());
    assert!(table.delivery(c).is_some());
}

#[test]
fn failed_send_releases_but_never_reuses_the_sequence() {
    let mut table = ready(1);
    let (a, _) = table.reserve(1, 0, 1, 0, None).unwrap();
    table.finish_post(a, false);
    assert_eq!(table.in_flight(), 0);
    assert_eq!(table.stats.posted, 0);
    let (_, record) = table.reserve(1, 0, 1, 0, None).unwrap();
    assert_eq!(record.sequence, 2);
}

#[test]
fn not_ready_until_negotiated_running_and_unfrozen() {
    let mut table = DeliveryTable::try_new(1).unwrap();
    assert_eq!(
        table.reserve(1, 0, 1, 0, None).unwrap_err(),
        ReserveError::NotReady
    );
    table.running = true;
    assert_eq!(
        table.reserve(1, 0, 1, 0, None).unwrap_err(),
        ReserveError::NotReady
    );
    table.protocol_version = 1;
    table.frozen = true;
    assert_eq!(
        table.reserve(1, 0, 1, 0, None).unwrap_err(),
        ReserveError::NotReady
    );
}

fn record(sequence: u64) -> DeliveryRecord {
    DeliveryRecord {
        sequence,
        tag: 0,
        posted_at: 0,
        payload_len: 1,
        payload_crc: 0,
        attempts: 1,
        trace_id: None,
    }
}

#[test]
fn restored_records_are_checked_against_the_sequence_counter() {
    let mut table = DeliveryTable::try_new(4).unwrap();
    table.next_sequence = 10;
    assert_eq!(
        table.insert_restored(record(10), 4),
        Err(InsertError::Forged)
    );
    let token = table.insert_restored(record(9), 4).unwrap();
    assert_eq!(table.delivery(token).unwrap().attempts, 2);
    table.check_invariants().unwrap();
}

/// Issue #11, defect 2: the second copy of a sequence is refused when it is inserted, so no
/// teardown can end that sequence twice.
#[test]
fn a_duplicate_is_refused_on_insertion() {
    let mut table = DeliveryTable::try_new(4).unwrap();
    table.next_sequence = 10;
    let first = table.insert_restored(record(9), 4).unwrap();
    assert_eq!(
        table.insert_restored(record(9), 4),
        Err(InsertError::Forged)
    );
    assert_eq!(table.in_flight(), 1);
    table.check_invariants().unwrap();
    // After the first copy is gone the sequence is simply absent: still once.
    table.remove_restored(first);
    assert_eq!(table.in_flight(), 0);
    table.check_invariants().unwrap();
}

/// Issue #11, defect 10: a blob bringing more deliveries than the record announced is forged,
/// not short of resources.
#[test]
fn more_deliveries_than_announced_is_forged() {
    let mut table = DeliveryTable::try_new(8).unwrap();
    table.next_sequence = 10;
    table.insert_restored(record(1), 2).unwrap();
    table.insert_restored(record(2), 2).unwrap();
    assert_eq!(
        table.insert_restored(record(3), 2),
        Err(InsertError::Forged)
    );
}

/// Issue #11, defect 1: probes do not count, a write does, a second write fails the save, and
/// so does anything ending while the save is open.
#[test]
fn save_accounting_counts_writes_once() {
    let mut table = ready(3);
    let (a, _) = table.reserve(1, 0, 1, 0, None).unwrap();
    table.finish_post(a, true);
    let (b, _) = table.reserve(2, 0, 1, 0, None).unwrap();
    table.finish_post(b, true);
    assert_eq!(table.begin_save(), 2);
    // Probes of both deliveries.
    table.delivery_for_save(Some(a)).unwrap();
    table.delivery_for_save(Some(b)).unwrap();
    assert!(!table.save.is_complete());
    table.record_save_write(a);
    table.record_save_write(b);
    assert!(table.save.is_complete());
    table.record_save_write(a);
    assert!(table.save.written_twice && !table.save.is_complete());

    assert_eq!(table.begin_save(), 2);
    table.record_save_write(a);
    table.record_save_write(b);
    assert!(table.save.is_complete());
    table.complete(a, |_| OutcomeKind::Acked).unwrap();
    assert!(table.save.ended_during_save && !table.save.is_complete());

    table.begin_save();
    assert!(table.delivery_for_save(None).is_none());
    assert!(table.save.unknown_packet);
}

#[test]
fn migrated_cancellations_are_not_failures() {
    let mut table = ready(1);
    let (a, _) = table.reserve(1, 0, 1, 0, None).unwrap();
    table.finish_post(a, true);
    table.migrated = true;
    let outcome = table.complete(a, |_| OutcomeKind::Cancelled).unwrap();
    assert_eq!(outcome.kind, OutcomeKind::Migrated);
    assert_eq!(table.stats.cancelled, 0);
}
