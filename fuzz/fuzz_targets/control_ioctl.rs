//! Hostile control requests: arbitrary IOCTL codes, request bytes and output sizes from several
//! owners into the control dispatcher (`vsp::control::ChannelRegistry`), over the KMCL simulator,
//! with a guest that opens, negotiates and acknowledges what it gets, and owner cleanups.
//!
//! Properties per input: nothing panics or hangs; a refused IOCTL writes nothing and reports no
//! output; an answered one writes a well-formed response header whose size is the reported
//! length; no channel yields two outcomes for one sequence, and a channel that was never restored
//! into yields outcomes only for what it posted; a destroyed channel has nothing in flight; every
//! VMBus handle the registry took over is closed exactly once; after `destroy_all` no slot is in
//! use and `Kmcl::finish()` reports no violation.
#![no_main]
// `cfg!(overflow_checks)` in `checked_build` (fuzz builds are nightly-only).
#![feature(cfg_overflow_checks)]

#[path = "../common/checked_build.rs"]
mod checked_build;

#[path = "../common/inputs.rs"]
mod inputs;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};

use inputs::ControlStep;
use kmcl_sim::{Guest, Kmcl, KmclCall, Schedule, SimConfig, SimSpinLock, ViolationKind};
use libfuzzer_sys::fuzz_target;
use vmbsrv::kmcl::{NtStatus, ParentDevice, Result, ServerInterface, VmbusHandle};
use vmbsrv::vsp::control::wire::{self, CREATE_MODE_START, OUTCOME_ENTRY_LEN};
use vmbsrv::vsp::control::{
    CONTROL_VERSION, ChannelRegistry, ChannelTable, ControlEnvironment, ControlOp, OwnerId,
};
use vmbsrv::vsp::protocol::{self, Kind};
use vmbsrv_testkit::MigrationConfig;
use vmbsrv_testkit::migration::{
    Lock, SCENARIO_INSTANCE, SCENARIO_INTERFACE_TYPE, query_server_interface,
};

type Registry<'i> = ChannelRegistry<'i, Lock, SimSpinLock<ChannelTable<'i, Lock>>>;

/// Steps per input.
const MAX_STEPS: usize = 32;
/// Largest output buffer offered (the fuzzed `output_len` is capped to it).
const MAX_OUTPUT: usize = 8192;
/// What an output buffer holds before the IOCTL: every byte 0xEE.
static UNTOUCHED: [u8; MAX_OUTPUT] = [0xEE; MAX_OUTPUT];

static CONVERTED: AtomicU64 = AtomicU64::new(0);
static CLOSED: AtomicU64 = AtomicU64::new(0);

fn close_handle(_: VmbusHandle) {
    CLOSED.fetch_add(1, Ordering::Relaxed);
}

struct Env<'i> {
    interface: &'i ServerInterface,
    parent: ParentDevice,
}

impl<'i> ControlEnvironment<'i> for Env<'i> {
    fn server_interface(&self) -> &'i ServerInterface {
        self.interface
    }

    fn parent_device(&self) -> ParentDevice {
        self.parent
    }

    fn current_time(&self) -> u64 {
        0
    }

    fn convert_vmbus_handle(&self, user_handle: u64) -> Result<VmbusHandle> {
        if user_handle & 0xFF == 0xEE {
            // A handle value the caller's process does not own.
            return Err(NtStatus(0xC000_0008_u32 as i32)); // STATUS_INVALID_HANDLE
        }
        CONVERTED.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the simulator treats the VMBus handle as an opaque value and never dereferences
        // it; the registry only stores it and hands it back to `close_handle`.
        Ok(unsafe { VmbusHandle::new(user_handle as usize as *mut core::ffi::c_void) })
    }
}

fuzz_target!(|data: &[u8]| run(data));

/// What the harness knows about one channel id.
#[derive(Default)]
struct Tracked {
    started: bool,
    posted: BTreeSet<u64>,
    ended: BTreeSet<u64>,
}

fn run(data: &[u8]) {
    let steps = inputs::decode_control_steps(data, MAX_STEPS);
    CONVERTED.store(0, Ordering::Relaxed);
    CLOSED.store(0, Ordering::Relaxed);
    // The deterministic schedule seeded from the input, as every end-to-end target runs it
    // (common/harness.rs, `sim_config`), with room for 64 packets per channel.
    let kmcl = Kmcl::new(SimConfig {
        hang_timeout: std::time::Duration::from_secs(2),
        schedule: Schedule::Deterministic {
            seed: inputs::schedule_seed(data),
        },
        ..MigrationConfig::sim_for(64)
    });
    {
        let interface = query_server_interface(&kmcl).expect("interface");
        let env = Env {
            interface: &interface,
            parent: kmcl.parent_device(),
        };
        let registry: Registry<'_> = ChannelRegistry::try_new(4, close_handle).expect("registry");
        let guest = Guest::new(SCENARIO_INTERFACE_TYPE, SCENARIO_INSTANCE);
        kmcl.attach_guest(&guest).expect("attach");
        let mut ids: Vec<u64> = Vec::new();
        let mut tracked: BTreeMap<u64, Tracked> = BTreeMap::new();
        let mut held: Vec<(u64, u64, u32)> = Vec::new();

        for step in steps {
            match step {
                ControlStep::Ioctl {
                    owner,
                    code_pick,
                    raw_code,
                    patch_id,
                    id_pick,
                    buffered,
                    output_len,
                    mut input,
                } => {
                    let owner = OwnerId(1 + u64::from(owner % 3));
                    let code = if code_pick < 0x80 {
                        let ops = ControlOp::ALL;
                        ops[usize::from(code_pick) % ops.len()].code()
                    } else {
                        raw_code
                    };
                    if code_pick & 0x40 != 0 && code_pick < 0x80 && input.len() >= 8 {
                        // A consistent request header, so the body is what gets exercised.
                        let size = input.len() as u32;
                        input[0..2].copy_from_slice(&CONTROL_VERSION.to_le_bytes());
                        input[2..4].copy_from_slice(&[0, 0]);
                        input[4..8].copy_from_slice(&size.to_le_bytes());
                    }
                    if patch_id && input.len() >= 16 && !ids.is_empty() {
                        let id = ids[usize::from(id_pick) % ids.len()];
                        input[8..16].copy_from_slice(&id.to_le_bytes());
                    }
                    let output_len = usize::from(output_len).min(MAX_OUTPUT);
                    let (result, output) = if buffered {
                        let mut buffer = vec![0xEEu8; input.len().max(output_len)];
                        buffer[..input.len()].copy_from_slice(&input);
                        let result = registry.dispatch_buffered(
                            owner,
                            code,
                            &mut buffer,
                            input.len(),
                            output_len,
                            &env,
                        );
                        buffer.truncate(output_len);
                        (result, buffer)
                    } else {
                        let mut output = vec![0xEEu8; output_len];
                        let result = registry.dispatch(owner, code, &input, &mut output, &env);
                        if !result.status.is_success() {
                            // One slice comparison (a `memcmp`), not a compare per byte: the
                            // byte loop over up to 8 KiB, coverage-instrumented, was ~40% of an
                            // execution (docs/performance.md §8.5).
                            assert!(
                                output[..] == UNTOUCHED[..output.len()],
                                "a refused IOCTL wrote output"
                            );
                        }
                        (result, output)
                    };
                    check_response(code, &input, &result, &output, &mut ids, &mut tracked);
                }
                ControlStep::GuestOpen => {
                    if guest.open().is_ok() {
                        kmcl.wait_idle();
                        if let Ok(id) = guest.send_request(&negotiate_request()) {
                            kmcl.wait_idle();
                            let _ = guest.take_reply(id);
                        }
                    }
                }
                ControlStep::GuestAckAll => {
                    for packet in guest.receive_all() {
                        let (Some(txid), Some(delivery)) =
                            (packet.txid, protocol::parse_delivery(&packet.bytes))
                        else {
                            panic!("the host sent something that is not a delivery");
                        };
                        held.push((txid, delivery.sequence, delivery.payload_crc));
                    }
                    for (txid, sequence, crc) in held.drain(..) {
                        let _ = guest.complete(txid, &protocol::encode_ack(sequence, 0, crc));
                    }
                }
                ControlStep::Cleanup { owner } => {
                    registry.destroy_owned_by(OwnerId(1 + u64::from(owner % 3)));
                }
            }
            kmcl.wait_idle();
        }
        registry.destroy_all();
        kmcl.wait_idle();
        assert_eq!(registry.channels_in_use(), 0);
        drop(registry);
        assert_eq!(
            CONVERTED.load(Ordering::Relaxed),
            CLOSED.load(Ordering::Relaxed),
            "every VMBus handle the registry took over is closed exactly once"
        );
        drop(interface);
    }
    // `CreateChannel` accepts every defined server flag, including OFFER_AS_PIPE, and the
    // simulator does not model pipe offers: it flags them `Unmodelled` at
    // `VmbServerChannelInitSetFlags` (not a contract violation, a limit of what it can check).
    let violations: Vec<_> = kmcl
        .finish()
        .into_iter()
        .filter(|v| {
            !(v.kind == ViolationKind::Unmodelled
                && v.call == Some(KmclCall::ServerChannelInitSetFlags))
        })
        .collect();
    assert!(violations.is_empty(), "KMCL violations: {violations:#?}");
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

/// Checks one IOCTL's completion and learns channel ids, posts and outcomes from it.
fn check_response(
    code: u32,
    input: &[u8],
    result: &vmbsrv::vsp::control::DispatchResult,
    output: &[u8],
    ids: &mut Vec<u64>,
    tracked: &mut BTreeMap<u64, Tracked>,
) {
    if !result.status.is_success() {
        assert_eq!(result.information, 0, "a refused IOCTL reported output");
        return;
    }
    assert!(result.information <= output.len(), "{result:?}");
    assert!(
        result.information >= wire::RESPONSE_HEADER_LEN,
        "{result:?}"
    );
    let response = &output[..result.information];
    assert_eq!(
        u16::from_le_bytes([response[0], response[1]]),
        CONTROL_VERSION
    );
    assert_eq!(u32_at(response, 4) as usize, result.information);
    let op_status = NtStatus(u32_at(response, 8) as i32);
    let Some(op) = ControlOp::from_code(code) else {
        panic!("unknown code {code:#x} answered");
    };
    let channel_id = || u64_at(input, 8);
    match op {
        ControlOp::CreateChannel if op_status.is_success() => {
            let id = u64_at(response, 16);
            assert_ne!(id, 0);
            assert!(!ids.contains(&id), "channel id {id:#x} handed out twice");
            ids.push(id);
            let mode = u16::from_le_bytes([input[60], input[61]]);
            tracked.entry(id).or_default().started = mode == CREATE_MODE_START;
        }
        ControlOp::PostMessage if op_status.is_success() => {
            let sequence = u64_at(response, 16);
            let entry = tracked.entry(channel_id()).or_default();
            assert!(
                entry.posted.insert(sequence),
                "sequence {sequence} posted twice"
            );
        }
        ControlOp::FetchOutcomes if op_status.is_success() => {
            let count = u32_at(response, 16) as usize;
            assert_eq!(
                response.len(),
                wire::FETCH_OUTCOMES_RESPONSE_LEN + count * OUTCOME_ENTRY_LEN
            );
            let entry = tracked.entry(channel_id()).or_default();
            for i in 0..count {
                let at = wire::FETCH_OUTCOMES_RESPONSE_LEN + i * OUTCOME_ENTRY_LEN;
                let sequence = u64_at(response, at);
                assert!(
                    entry.ended.insert(sequence),
                    "delivery {sequence} ended twice"
                );
                if entry.started {
                    assert!(
                        entry.posted.contains(&sequence),
                        "outcome for {sequence}, never posted on this channel"
                    );
                }
            }
        }
        ControlOp::DestroyChannel if op_status.is_success() => {
            assert_eq!(
                u32_at(response, 20),
                0,
                "a destroyed channel kept deliveries in flight"
            );
        }
        _ => {}
    }
}

/// A well-formed `NegotiateRequest` for version 1.0 (docs/protocol.md).
fn negotiate_request() -> Vec<u8> {
    let mut bytes = Vec::with_capacity(24);
    bytes.extend_from_slice(&protocol::SIGNATURE.to_le_bytes());
    bytes.extend_from_slice(&(Kind::NegotiateRequest as u16).to_le_bytes());
    bytes.extend_from_slice(&0u16.to_le_bytes());
    bytes.extend_from_slice(&24u32.to_le_bytes());
    bytes.extend_from_slice(&0u32.to_le_bytes());
    bytes.extend_from_slice(&protocol::VERSION_1_0.to_le_bytes());
    bytes.extend_from_slice(&protocol::VERSION_1_0.to_le_bytes());
    bytes
}
