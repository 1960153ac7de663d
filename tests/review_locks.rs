//! review-locks: adversarial checks of c9836c4 + 43637b1 (one table-lock hold per save call,
//! SimSpinLock as a spin lock, the conditional NEXT_TXID raise).

use vmbsrv::saved::{DeliveryRecord, MAX_PAYLOAD_LEN};
use vmbsrv::vsp::save_protocol::{answer_save, save_writes};

/// `save_writes` agrees with `answer_save` for random records (every field at and around its
/// bounds) and buffer lengths well past the largest record.
#[test]
fn save_writes_agrees_with_answer_save_on_random_records() {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut buf = vec![0u8; 4096];
    let edges32 = [
        0u32,
        1,
        2,
        MAX_PAYLOAD_LEN - 1,
        MAX_PAYLOAD_LEN,
        MAX_PAYLOAD_LEN + 1,
        u32::MAX,
    ];
    let edges16 = [0u16, 1, 2, u16::MAX - 1, u16::MAX];
    let edges64 = [0u64, 1, u64::MAX];
    for _ in 0..200_000 {
        let r = next();
        let record = DeliveryRecord {
            sequence: if r & 1 == 0 {
                edges64[(next() % 3) as usize]
            } else {
                next()
            },
            tag: next(),
            posted_at: next(),
            payload_len: if r & 2 == 0 {
                edges32[(next() % 7) as usize]
            } else {
                next() as u32
            },
            payload_crc: next() as u32,
            attempts: if r & 4 == 0 {
                edges16[(next() % 5) as usize]
            } else {
                next() as u16
            },
            trace_id: (r & 8 == 0).then(|| [next() as u8; 16]),
        };
        let save_id = match (r >> 4) % 4 {
            0 => None,
            1 => Some(0),
            2 => Some(u64::MAX),
            _ => Some(next()),
        };
        let len = 1 + (next() % 4096) as usize;
        let predicted = save_writes(&record, save_id, len);
        let answer = answer_save(Some(&record), save_id, Some(&mut buf[..len]));
        assert_eq!(
            predicted,
            answer.status.is_success(),
            "{record:?} {save_id:?} {len}"
        );
    }
}

// ---- a completion forced into the save callback's windows ----------------------------------------

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use kmcl_sim::{Guest, Kmcl, SimConfig, SimSpinLock};
use vmbsrv::vsp::lock::DispatchLock;
use vmbsrv::vsp::table::DeliveryTable;
use vmbsrv::vsp::{Phase, PostRequest, VspChannel};
use vmbsrv_testkit::migration::{
    SCENARIO_INSTANCE, SCENARIO_INTERFACE_TYPE, channel_config, query_server_interface,
};
use vmbsrv_testkit::{GuestModel, Ledger, Posted};

/// The number of `with` calls to let pass before the hook runs, and the hook.
type Hook = (Cell<u32>, Box<dyn FnMut()>);

/// The delivery table's `in_flight()` at the end of the last hold of a [`HookLock`], on any
/// thread: how the hook sees the completion routine end a delivery without a reference to the
/// channel.
static IN_FLIGHT: AtomicU32 = AtomicU32::new(0);

thread_local! {
    /// While set (the control thread, inside `save_continue`): the hook.
    static HOOK: RefCell<Option<Hook>> = RefCell::new(None);
    static IN_HOOK: Cell<bool> = const { Cell::new(false) };
}

/// `SimSpinLock` plus a hook that runs right after the N-th release on the hooked thread: in
/// the save callback that is the window between the lock hold and the encode (new code), or
/// between the lookup and the count (old code).
struct HookLock<T>(SimSpinLock<T>);

impl DispatchLock<DeliveryTable> for HookLock<DeliveryTable> {
    fn new(value: DeliveryTable) -> Self {
        Self(SimSpinLock::new(value))
    }
    fn with<R>(&self, f: impl FnOnce(&mut DeliveryTable) -> R) -> R {
        let result = self.0.with(|table| {
            let result = f(table);
            IN_FLIGHT.store(table.in_flight(), Ordering::SeqCst);
            result
        });
        if !IN_HOOK.get() {
            let fire = HOOK.with(|hook| {
                let hook = hook.borrow();
                match hook.as_ref() {
                    Some((left, _)) if left.get() == 0 => true,
                    Some((left, _)) => {
                        left.set(left.get() - 1);
                        false
                    }
                    None => false,
                }
            });
            if fire {
                IN_HOOK.set(true);
                let taken = HOOK.with(|hook| hook.borrow_mut().take());
                if let Some((_, mut run)) = taken {
                    run();
                }
                IN_HOOK.set(false);
            }
        }
        result
    }
    fn relax() {
        <SimSpinLock<DeliveryTable> as DispatchLock<DeliveryTable>>::relax();
    }
}

/// Posts 4, the guest reads them; a save starts; after `skip` table-lock holds inside
/// `save_continue`, the guest acknowledges one delivery and the hook waits until the VSP's
/// completion routine ended it (completions_while_paused=delivered). Returns the save's result.
fn save_with_completion_after(skip: u32) -> (Result<(), String>, Ledger, bool) {
    let mut config = SimConfig::default();
    config
        .apply_readings("completions_while_paused=delivered,save_requires=any")
        .unwrap();
    config.packet_pool_size = 16;
    let kmcl = Kmcl::new(config);
    let mut ledger = Ledger::new();
    let guest = Rc::new(RefCell::new(GuestModel::new(Guest::new(
        SCENARIO_INTERFACE_TYPE,
        SCENARIO_INSTANCE,
    ))));
    let result;
    let fired;
    {
        let interface = query_server_interface(&kmcl).unwrap();
        kmcl.attach_guest(&guest.borrow().endpoint).unwrap();
        let channel: VspChannel<'_, HookLock<DeliveryTable>> =
            VspChannel::create(&interface, &channel_config(&kmcl, 8, 64)).unwrap();
        guest.borrow_mut().open_and_negotiate(&kmcl).unwrap();
        for tag in 0..4u64 {
            let payload = [tag as u8 + 1; 9];
            let sequence = channel
                .post(&PostRequest {
                    tag,
                    payload: &payload,
                    posted_at: tag,
                    trace_id: (tag % 2 == 1).then_some([tag as u8; 16]),
                })
                .unwrap();
            ledger.posted(sequence, Posted::new(tag, &payload));
        }
        kmcl.wait_idle();
        assert_eq!(guest.borrow_mut().pump(&mut ledger), 4);
        let record = channel.save_begin().unwrap();
        let _ = record;
        let g = Rc::clone(&guest);
        let stats = channel.statistics().in_flight;
        assert_eq!(stats, 4);
        IN_FLIGHT.store(stats, Ordering::SeqCst);
        HOOK.with(|hook| {
            *hook.borrow_mut() = Some((
                Cell::new(skip),
                Box::new(move || {
                    assert_eq!(g.borrow_mut().acknowledge(1, None), 1);
                    // The completion routine ends the delivery in a hold of the table lock,
                    // which records the new count in IN_FLIGHT.
                    let deadline = Instant::now() + Duration::from_secs(5);
                    while IN_FLIGHT.load(Ordering::SeqCst) == 4 {
                        assert!(Instant::now() < deadline, "completion never ran");
                        std::thread::sleep(Duration::from_micros(100));
                    }
                }),
            ));
        });
        let mut buffer = vec![0u8; 4096];
        let mut failure = None;
        loop {
            match channel.save_continue(&mut buffer) {
                Ok(chunk) if chunk.status == vmbsrv::kmcl::NtStatus::SUCCESS => break,
                Ok(chunk) if chunk.status == vmbsrv::kmcl::NtStatus::BUFFER_OVERFLOW => {}
                Ok(chunk) => {
                    failure = Some(format!("save_continue: {:?}", chunk.status));
                    break;
                }
                Err(status) => {
                    failure = Some(format!("save_continue refused: {status:?}"));
                    break;
                }
            }
        }
        fired = HOOK.with(|hook| hook.borrow_mut().take()).is_none();
        result = match failure {
            Some(f) => Err(f),
            None => channel
                .save_end()
                .map_err(|s| format!("save_end: {s:?} (hook fired {fired})")),
        };
        if result.is_ok() {
            assert!(!fired || channel.phase() == Phase::Saved);
        }
        let _ = channel.resume();
        kmcl.wait_idle();
        let mut g = guest.borrow_mut();
        g.pump(&mut ledger);
        g.acknowledge(usize::MAX, None);
        kmcl.wait_idle();
        let mut outcomes = [vmbsrv::vsp::Outcome {
            sequence: 0,
            tag: 0,
            kind: vmbsrv::vsp::OutcomeKind::Acked,
            attempts: 0,
        }; 16];
        let n = channel.drain_outcomes(&mut outcomes);
        for o in &outcomes[..n] {
            ledger.outcome(o);
        }
        channel.disable().unwrap();
        kmcl.wait_idle();
    }
    let violations = kmcl.finish();
    (
        result.and_then(|()| {
            if violations.is_empty() {
                Ok(())
            } else {
                Err(format!("{violations:?}"))
            }
        }),
        ledger,
        fired,
    )
}

/// A delivery that ends while a save is under way makes the save unusable, wherever in the save
/// callback's sequence of lock holds the completion lands (every hold count of a 4-delivery
/// save, probe and write), and the deliveries still end exactly once.
#[test]
fn a_completion_in_any_window_of_the_save_callback_fails_the_save() {
    let mut fired_in = 0;
    for skip in 0..16 {
        let (result, ledger, fired) = save_with_completion_after(skip);
        let verdict = ledger.verdict();
        println!("skip {skip}: fired {fired}, {result:?}");
        if fired {
            fired_in += 1;
            assert!(
                result.is_err(),
                "skip {skip}: the save was accepted: {result:?}"
            );
        } else {
            assert_eq!(result, Ok(()), "skip {skip}");
        }
        assert!(verdict.is_clean(), "skip {skip}: {verdict:?}");
        assert_eq!(verdict.delivered, 4, "skip {skip}: {verdict:?}");
    }
    assert!(fired_in >= 8, "the hook fired in {fired_in} runs only");
}
