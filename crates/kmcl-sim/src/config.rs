//! Simulator settings: the undocumented KMCL behaviours (docs/kmcl-bindings.md, "Undocumented points") as switches, resource
//! bounds, and the fault plan.

use std::format;
use std::string::String;
use std::time::Duration;
use std::vec::Vec;

use kmcl::NtStatus;

pub use crate::table::KmclCall;

impl KmclCall {
    /// Position in [`KmclCall::ALL`] (the slot index in the server table).
    pub const fn index(self) -> usize {
        self as usize
    }

    /// Whether an injected [`Fault`] can change this call's result: the call returns an
    /// `NTSTATUS` or (for `VmbPacketAllocate`) a handle that can be NULL. Faults aimed at `VOID`
    /// calls are never taken.
    pub const fn is_fallible(self) -> bool {
        use KmclCall::*;
        !matches!(
            self,
            ChannelCleanup
                | ChannelDeleteGpadl
                | ChannelDisable
                | ChannelGetInterfaceInstance
                | ChannelGetMmioSpace
                | ChannelGetPointer
                | ChannelPacketComplete
                | ChannelPacketDeferToPassive
                | ChannelPacketFail
                | ChannelPause
                | ChannelSetIncomingProcessingAtPassive
                | ChannelSetPointer
                | ChannelSetTransactionQuota
                | ChannelSizeofPacket
                | ChannelStart
                | PacketFree
                | PacketGetChannel
                | PacketGetPointer
                | PacketSetCompletionRoutine
                | PacketSetPointer
                | ChannelSaveEnd
                | ChannelUnmapGpadl
        )
    }
}

/// One injected failure: the `nth` call (1-based, counted over the simulator instance's lifetime)
/// of kind `call` returns `status` (or NULL for `VmbPacketAllocate`) without any other effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// The call kind to fail.
    pub call: KmclCall,
    /// Which call of that kind fails, 1-based, counted since the instance was created (see
    /// [`Kmcl::call_count`](super::Kmcl::call_count) to plan a sweep).
    pub nth: u64,
    /// If true, every call from the `nth` on fails, not only the `nth`.
    pub sticky: bool,
    /// The status returned (ignored for `VmbPacketAllocate`, which returns NULL).
    pub status: NtStatus,
}

/// A list of [`Fault`]s. Faults are checked after the handle has been validated (a bad handle is
/// still reported as a violation) and before the call has any effect.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultPlan {
    /// The faults, in any order.
    pub faults: Vec<Fault>,
}

impl FaultPlan {
    /// No faults.
    pub fn new() -> FaultPlan {
        FaultPlan::default()
    }

    /// Adds: the `nth` call of `call` fails with `status`.
    pub fn fail_nth(mut self, call: KmclCall, nth: u64, status: NtStatus) -> FaultPlan {
        self.faults.push(Fault {
            call,
            nth,
            sticky: false,
            status,
        });
        self
    }

    /// Adds: every call of `call` from the `nth` on fails with `status`.
    pub fn fail_from(mut self, call: KmclCall, nth: u64, status: NtStatus) -> FaultPlan {
        self.faults.push(Fault {
            call,
            nth,
            sticky: true,
            status,
        });
        self
    }

    /// Adds: the `nth` `VmbPacketAllocate` returns NULL.
    pub fn fail_nth_packet_allocate(self, nth: u64) -> FaultPlan {
        self.fail_nth(
            KmclCall::PacketAllocate,
            nth,
            NtStatus::INSUFFICIENT_RESOURCES,
        )
    }

    /// The fault (if any) that applies to call number `count` (1-based) of kind `call`.
    pub(crate) fn find(&self, call: KmclCall, count: u64) -> Option<NtStatus> {
        if self.faults.is_empty() || !call.is_fallible() {
            return None;
        }
        self.faults
            .iter()
            .find(|f| f.call == call && (f.nth == count || (f.sticky && count >= f.nth)))
            .map(|f| f.status)
    }
}

/// docs/kmcl-bindings.md, "Undocumented points": the channel state `VmbChannelSaveBegin` requires.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SaveRequires {
    /// Default (conservative): the channel must not be running (paused by `VmbChannelPause`, or
    /// never started / closed). Saving a running channel is refused with
    /// `STATUS_INVALID_DEVICE_STATE` and recorded as a violation.
    #[default]
    Paused,
    /// A running channel may be saved; packets that complete between `VmbChannelSaveBegin` and
    /// the `VmbChannelSaveContinue` that would save them are skipped.
    AnyState,
}

/// docs/kmcl-bindings.md, "Undocumented points": incoming (guest → host) packets not yet completed at `VmbChannelSaveBegin`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IncomingAtSave {
    /// Default: `VmbChannelSaveBegin` fails with `STATUS_INVALID_DEVICE_STATE` (no violation: the
    /// driver may complete them and retry). With [`SaveRequires::Paused`] this cannot happen,
    /// because a pause waits for every incoming packet to be completed.
    #[default]
    Refuse,
    /// They are not saved (the guest never gets their completion after a restore).
    NotSaved,
}

/// docs/kmcl-bindings.md, "Undocumented points": when `VmbChannelRestoreFromBuffer` is accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RestoreTiming {
    /// Default: on an initialised channel **before** `VmbChannelEnable`. Chosen because the
    /// restored packet objects must exist before the guest's existing channel reconnects: after
    /// Enable, the guest's pending completions could be processed before the packets they
    /// complete were restored.
    #[default]
    BeforeEnable,
    /// Only after `VmbChannelEnable` and before the channel is started (completions are only
    /// processed while started, so nothing can race the restore).
    AfterEnable,
}

/// docs/kmcl-bindings.md, "Undocumented points": the `SaveBufSize` the restore callback receives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RestoreSaveBufSize {
    /// Default: exactly the `BytesNeeded` the save callback reported.
    #[default]
    AsReported,
    /// The size of the buffer the save handed to the second save call (`BytesNeeded` +
    /// [`SimConfig::save_buffer_slack`]), with the extra bytes **zero** (the driver's decoder is
    /// expected to accept trailing zero padding; garbage there would be indistinguishable from
    /// corruption).
    PaddedWithZeros,
}

/// docs/kmcl-bindings.md, "Undocumented points": the completion routine and context pointer of a restored packet.
///
/// A restored packet never has the routine/pointer of the packet that was saved (function
/// pointers and addresses cannot survive migration); the question is what the *new* packet
/// object keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RestoredPacketContext {
    /// Default: `VmbPacketRestore` keeps the routine and pointer the driver set on the fresh
    /// packet before calling it, and changing the completion routine of a packet the library
    /// owns (in flight, including restored) is a violation — proving the driver sets them first,
    /// the only order that is safe under either reading.
    #[default]
    KeepSetBeforeRestore,
    /// `VmbPacketRestore` resets routine and pointer (as if it re-initialised the object); the
    /// driver must set them after a successful restore, which this mode allows.
    ResetOnRestore,
    /// `VmbPacketRestore` resets the completion routine but keeps the context pointer: a driver
    /// that re-sets the routine only when the pointer changed never hears of the delivery again.
    ResetRoutineKeepPointer,
}

/// docs/kmcl-bindings.md, "Undocumented points": what `VmbChannelDisable` does to packets restored into a channel that was
/// never enabled (a restore that failed, or a restored channel torn down before Enable).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DisableRestored {
    /// Default: Disable cancels them and returns once every completion routine has run.
    #[default]
    CompleteBeforeReturn,
    /// Disable returns at once; their completion routines run later on the DPC (before or after
    /// `VmbChannelCleanup` — a driver that frees its context at Cleanup is then used after free).
    CompleteLater,
    /// Disable does not touch them: their completion routines never run, and Cleanup drops the
    /// packet objects (the library owns them).
    Never,
}

/// docs/kmcl-bindings.md, "Undocumented points": what `VmbChannelPause` waits for before it returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PauseWaits {
    /// Default (the header's state model): the suspend callback ran and no incoming packet is
    /// outstanding.
    #[default]
    Incoming,
    /// Also (the header's `VmbChannelPause` text, "all packets that are waiting for completion
    /// have completed") every outgoing packet the guest holds: completions keep being delivered
    /// while it waits, and it returns only when the guest has completed them all.
    IncomingAndOutgoing,
}

/// docs/kmcl-bindings.md, "Undocumented points": whether `VmbPacketSend` runs concurrently with `EvtChannelSuspend`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SendVsSuspend {
    /// Default: a send may run while the suspend callback runs (one send per thread may cross it;
    /// it is refused).
    #[default]
    Concurrent,
    /// The library serializes them: a send issued while the suspend callback runs waits until the
    /// callback has returned (and is then refused). A driver that waits in its suspend callback
    /// for a send under way deadlocks.
    Serialized,
}

/// docs/kmcl-bindings.md, "Undocumented points": whether packet completions run while the channel is paused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CompletionsWhilePaused {
    /// Default: guest completions wait in the ring until the channel runs again.
    #[default]
    Held,
    /// The library keeps processing guest completions while the channel is open but paused,
    /// including between `VmbChannelSaveBegin` and `VmbChannelSaveEnd`.
    Delivered,
}

/// docs/kmcl-bindings.md, "Undocumented points": what `VmbChannelPacketFail` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PacketFailReading {
    /// Default: the incoming packet is retired (as if completed) and the incoming queue stops.
    #[default]
    Retires,
    /// The queue stops but the packet stays outstanding: a later Pause waits for it forever.
    DoesNotRetire,
}

/// Simulator settings. `SimConfig::default()` is the conservative reading of every undocumented
/// point; each field says what the other reading does.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Undocumented point (docs/kmcl-bindings.md) — state required by `VmbChannelSaveBegin`.
    pub save_requires: SaveRequires,
    /// Undocumented point (docs/kmcl-bindings.md) — incoming packets outstanding at `VmbChannelSaveBegin`.
    pub incoming_at_save: IncomingAtSave,
    /// Undocumented point (docs/kmcl-bindings.md) — when a restore is accepted.
    pub restore_timing: RestoreTiming,
    /// Undocumented point (docs/kmcl-bindings.md) — `SaveBufSize` passed to the restore callback.
    pub restore_save_buf_size: RestoreSaveBufSize,
    /// Whether packet objects allocated but never sent are presented to the save callback
    /// (default `false`: only packets the library owns, i.e. in flight, are saved). If `true`,
    /// such a packet is saved as "idle" and `VmbPacketRestore` gives back an idle packet the
    /// driver owns.
    pub save_unsent_packets: bool,
    /// Undocumented point (docs/kmcl-bindings.md) — routine/pointer of restored packets.
    pub restored_packet_context: RestoredPacketContext,
    /// Packet objects per channel (`VmbPacketAllocate` returns NULL beyond it). Default 64.
    pub packet_pool_size: usize,
    /// Host → guest ring capacity in packets; more sends wait on the channel's host queue.
    /// Default 16.
    pub ring_capacity: usize,
    /// Maximum packet size of a channel that never called
    /// `VmbChannelInitSetMaximumPacketSize`. Default 4096.
    pub default_max_packet_size: u32,
    /// Extra bytes (beyond `BytesNeeded`) of the buffer given to the second save-callback call;
    /// the whole buffer is pre-filled with `0xCC`. Default 32.
    pub save_buffer_slack: u32,
    /// Largest `BytesNeeded` a save callback may ask for (bigger is a violation). Default 1 MiB.
    pub max_save_bytes_per_packet: u32,
    /// How long a blocking call (Pause, Disable, waits for the driver to complete incoming
    /// packets after Suspend, `wait_idle`) waits before it records a
    /// [`ViolationKind::Hang`](super::ViolationKind::Hang) and gives up. Default 5 s.
    pub hang_timeout: Duration,
    /// Faults to inject from the start.
    pub faults: FaultPlan,
    /// Rewrites the driver's saved bytes of the n-th restored packet (counting from 0 across the
    /// restore) before the restore callback sees them: a saved-state file tampered with by someone
    /// who also re-sealed the library's own container, so only the driver's validation stands
    /// between the bytes and the kernel. `None` (default) hands them back unchanged.
    pub tamper_driver_bytes: Option<fn(u64, &mut Vec<u8>)>,
    /// Undocumented point (docs/kmcl-bindings.md) — `VmbChannelDisable` on a never-enabled channel holding restored packets.
    pub disable_restored: DisableRestored,
    /// Undocumented point (docs/kmcl-bindings.md) — what `VmbChannelPause` waits for.
    pub pause_waits: PauseWaits,
    /// Undocumented point (docs/kmcl-bindings.md) — `VmbPacketSend` against `EvtChannelSuspend`.
    pub send_vs_suspend: SendVsSuspend,
    /// Undocumented point (docs/kmcl-bindings.md) — guest completions while the channel is paused.
    pub completions_while_paused: CompletionsWhilePaused,
    /// Undocumented point (docs/kmcl-bindings.md) — `VmbChannelPacketFail`.
    pub packet_fail: PacketFailReading,
    /// Who runs the simulated KMCL work: worker threads (default) or, in deterministic mode, the
    /// thread that waits for it, in an order drawn from a seed (docs/simulator.md,
    /// "Deterministic mode").
    pub schedule: Schedule,
}

impl Default for SimConfig {
    /// The strictest reading of every undocumented point, then any readings named in the
    /// environment variable [`READINGS_ENV`] (see [`SimConfig::apply_readings`]), so that a whole
    /// test suite can be run under another reading without changing a line of it.
    fn default() -> SimConfig {
        let mut config = SimConfig {
            save_requires: SaveRequires::default(),
            incoming_at_save: IncomingAtSave::default(),
            restore_timing: RestoreTiming::default(),
            restore_save_buf_size: RestoreSaveBufSize::default(),
            save_unsent_packets: false,
            restored_packet_context: RestoredPacketContext::default(),
            packet_pool_size: 64,
            ring_capacity: 16,
            default_max_packet_size: 4096,
            save_buffer_slack: 32,
            max_save_bytes_per_packet: 1 << 20,
            hang_timeout: Duration::from_secs(5),
            faults: FaultPlan::default(),
            tamper_driver_bytes: None,
            disable_restored: DisableRestored::default(),
            pause_waits: PauseWaits::default(),
            send_vs_suspend: SendVsSuspend::default(),
            completions_while_paused: CompletionsWhilePaused::default(),
            packet_fail: PacketFailReading::default(),
            schedule: Schedule::default(),
        };
        if let Ok(spec) = std::env::var(READINGS_ENV) {
            // A malformed setting must not silently test the defaults: fail loudly.
            if let Err(e) = config.apply_readings(&spec) {
                panic!("{READINGS_ENV}={spec:?}: {e}");
            }
        }
        config
    }
}

/// How a simulator instance schedules KMCL's own work: state transitions and their callbacks
/// (the passive context), process-packet callbacks, completion routines and host → guest ring
/// transfers (the DPC context). See docs/simulator.md, "Deterministic mode".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Schedule {
    /// Default: two worker threads, one per context, racing the driver's threads as KMCL's
    /// contexts do on Windows. Runs differ from one another; this is what finds races.
    #[default]
    Threaded,
    /// No worker threads. A thread that waits for KMCL (a blocking call such as
    /// `VmbChannelPause`, [`Kmcl::wait_idle`](super::Kmcl::wait_idle), the guest's polling
    /// waits, the VSP's bounded waits) runs the pending work itself, one step at a time. `seed`
    /// decides which context goes first when both have work, and how far each DPC step fills
    /// the guest's ring. The same driver calls with the same seed replay exactly.
    Deterministic {
        /// Seed of the scheduling choices.
        seed: u64,
    },
}

/// Environment variable read by [`SimConfig::default`]: a reading specification such as
/// `pause_waits=outgoing,disable_restored=never` (see [`SimConfig::apply_readings`]).
pub const READINGS_ENV: &str = "VMBSRV_SIM_READINGS";

/// Every undocumented point the simulator can play, with its readings; the first reading of each
/// is the default. `scripts/readings-matrix.sh` builds its combinations from this table.
pub const READINGS: &[(&str, &[&str])] = &[
    ("save_requires", &["paused", "any"]),
    ("incoming_at_save", &["refuse", "not_saved"]),
    ("restore_timing", &["before_enable", "after_enable"]),
    ("restore_buf", &["as_reported", "padded"]),
    ("save_unsent", &["no", "yes"]),
    ("restored_context", &["keep", "reset", "reset_routine"]),
    ("disable_restored", &["before_return", "later", "never"]),
    ("pause_waits", &["incoming", "outgoing"]),
    ("send_vs_suspend", &["concurrent", "serialized"]),
    ("completions_while_paused", &["held", "delivered"]),
    ("packet_fail", &["retires", "keeps"]),
];

/// Why a reading specification was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadingsError(pub String);

impl core::fmt::Display for ReadingsError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(&self.0)
    }
}

impl SimConfig {
    /// Applies a reading specification: comma-separated `point=reading` pairs from [`READINGS`]
    /// (whitespace around items ignored, empty items allowed). Unknown points or readings are
    /// refused and nothing is changed.
    pub fn apply_readings(&mut self, spec: &str) -> Result<(), ReadingsError> {
        let mut next = self.clone();
        for item in spec.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let Some((point, reading)) = item.split_once('=') else {
                return Err(ReadingsError(format!("`{item}` is not point=reading")));
            };
            let (point, reading) = (point.trim(), reading.trim());
            let Some((_, readings)) = READINGS.iter().find(|(p, _)| *p == point) else {
                return Err(ReadingsError(format!("unknown point `{point}`")));
            };
            let Some(k) = readings.iter().position(|r| *r == reading) else {
                return Err(ReadingsError(format!(
                    "`{point}` has no reading `{reading}` (one of {})",
                    readings.join(", ")
                )));
            };
            next.set_reading(point, k);
        }
        *self = next;
        Ok(())
    }

    /// Sets point `point` to its `k`-th reading in [`READINGS`] (both already validated).
    fn set_reading(&mut self, point: &str, k: usize) {
        match point {
            "save_requires" => {
                self.save_requires = [SaveRequires::Paused, SaveRequires::AnyState][k];
            }
            "incoming_at_save" => {
                self.incoming_at_save = [IncomingAtSave::Refuse, IncomingAtSave::NotSaved][k];
            }
            "restore_timing" => {
                self.restore_timing = [RestoreTiming::BeforeEnable, RestoreTiming::AfterEnable][k];
            }
            "restore_buf" => {
                self.restore_save_buf_size = [
                    RestoreSaveBufSize::AsReported,
                    RestoreSaveBufSize::PaddedWithZeros,
                ][k];
            }
            "save_unsent" => self.save_unsent_packets = k == 1,
            "restored_context" => {
                self.restored_packet_context = [
                    RestoredPacketContext::KeepSetBeforeRestore,
                    RestoredPacketContext::ResetOnRestore,
                    RestoredPacketContext::ResetRoutineKeepPointer,
                ][k];
            }
            "disable_restored" => {
                self.disable_restored = [
                    DisableRestored::CompleteBeforeReturn,
                    DisableRestored::CompleteLater,
                    DisableRestored::Never,
                ][k];
            }
            "pause_waits" => {
                self.pause_waits = [PauseWaits::Incoming, PauseWaits::IncomingAndOutgoing][k];
            }
            "send_vs_suspend" => {
                self.send_vs_suspend = [SendVsSuspend::Concurrent, SendVsSuspend::Serialized][k];
            }
            "completions_while_paused" => {
                self.completions_while_paused = [
                    CompletionsWhilePaused::Held,
                    CompletionsWhilePaused::Delivered,
                ][k];
            }
            "packet_fail" => {
                self.packet_fail =
                    [PacketFailReading::Retires, PacketFailReading::DoesNotRetire][k];
            }
            _ => {}
        }
    }

    /// The readings this configuration plays, as a specification [`SimConfig::apply_readings`]
    /// accepts (every point named, in [`READINGS`] order).
    pub fn readings(&self) -> String {
        let chosen = [
            self.save_requires as usize,
            self.incoming_at_save as usize,
            self.restore_timing as usize,
            self.restore_save_buf_size as usize,
            usize::from(self.save_unsent_packets),
            self.restored_packet_context as usize,
            self.disable_restored as usize,
            self.pause_waits as usize,
            self.send_vs_suspend as usize,
            self.completions_while_paused as usize,
            self.packet_fail as usize,
        ];
        READINGS
            .iter()
            .zip(chosen)
            .map(|((point, readings), k)| format!("{point}={}", readings[k]))
            .collect::<Vec<_>>()
            .join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_round_trip_through_their_specification() {
        for (point, readings) in READINGS {
            for reading in *readings {
                let mut config = SimConfig::default();
                config
                    .apply_readings(&format!("{point}={reading}"))
                    .unwrap();
                let spec = config.readings();
                assert!(spec.contains(&format!("{point}={reading}")), "{spec}");
                let mut again = SimConfig::default();
                again.apply_readings(&spec).unwrap();
                assert_eq!(again.readings(), spec);
            }
        }
    }

    #[test]
    fn a_bad_specification_changes_nothing() {
        let mut config = SimConfig::default();
        let before = config.readings();
        for bad in [
            "pause_waits=outgoing,nonsense=1",
            "pause_waits",
            "pause_waits=sideways",
        ] {
            assert!(config.apply_readings(bad).is_err(), "{bad}");
            assert_eq!(config.readings(), before);
        }
    }
}
