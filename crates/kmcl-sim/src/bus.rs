//! The simulated bus: [`Kmcl`] stands in for `\Device\RootVMBus\kmcl_interface` — it answers the
//! interface query, owns the simulator's state and worker threads, hosts guests, and is the
//! verifier's front end.

use std::string::String;
use std::sync::{Arc, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};
use std::vec::Vec;

use super::config::{Fault, KmclCall, SimConfig};
use super::guest::{Guest, GuestError, GuestShared};
use super::handle::{self, Kind};
use super::state::{Lifecycle, Link, Shared};
use super::verifier::{self, Violation};
use super::{SIM_KMCL_SERVER_INTERFACE_TYPE, SIM_KMCL_SERVER_INTERFACE_VERSION, table};
use super::{schedule, workers};
use kmcl::NtStatus;
use kmcl_sys::{GUID, KMCL_SERVER_INTERFACE_V1, PDEVICE_OBJECT, VMBCHANNEL};

/// A snapshot of one channel, for test assertions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelInfo {
    /// The channel handle.
    pub handle: usize,
    /// `VmbChannelEnable` called (and not yet torn down by `VmbChannelDisable`).
    pub enabled: bool,
    /// `EvtChannelOpened` succeeded and `EvtChannelClosed` has not run since.
    pub opened: bool,
    /// `EvtChannelStarted` ran and `EvtChannelSuspend` has not run since.
    pub running: bool,
    /// The incoming queue is delivering packets.
    pub queue_running: bool,
    /// The incoming queue was stopped by `VmbChannelPacketFail`.
    pub queue_failed: bool,
    /// The driver asked for the channel to run (`VmbChannelStart` since the last Pause).
    pub start_requested: bool,
    /// Packet objects allocated and not freed.
    pub packets_allocated: usize,
    /// Packets sent and awaiting the guest's completion.
    pub packets_in_flight: usize,
    /// Packets sent but waiting on the host queue (ring full, or channel not running).
    pub packets_queued: usize,
    /// Incoming packets delivered and not yet completed.
    pub incoming_outstanding: u32,
    /// `VmbChannelInitSetFriendlyName`.
    pub friendly_name: String,
    /// `VmbChannelInitSetMaximumPacketSize` (or the simulator default).
    pub max_packet_size: u32,
    /// `VmbServerChannelInitSetTargetInterfaceId`.
    pub interface_type: GUID,
    /// `VmbServerChannelInitSetTargetInterfaceId`.
    pub interface_instance: GUID,
    /// `VmbServerChannelInitSetFlags`.
    pub server_flags: u32,
    /// `VmbChannelSetIncomingProcessingAtPassive`.
    pub incoming_at_passive: bool,
    /// A guest is bound (attached, matching ids).
    pub guest_bound: bool,
}

/// One simulated KMCL provider (one host's VMBus kernel-mode client library, with its guests).
///
/// Create one per test; instances are fully independent and may run in parallel. Dropping it
/// stops its threads and runs the teardown checks; if unreported violations remain, the drop
/// panics (like Driver Verifier bugchecking), unless the thread is already panicking. Use
/// [`Kmcl::finish`] to get them instead.
pub struct Kmcl {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    finished: bool,
}

impl core::fmt::Debug for Kmcl {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Kmcl")
            .field("instance", &self.shared.id)
            .finish_non_exhaustive()
    }
}

impl Default for Kmcl {
    fn default() -> Kmcl {
        Kmcl::new(SimConfig::default())
    }
}

impl Kmcl {
    /// A new simulator instance with its two worker threads (none in deterministic mode: see
    /// [`SimConfig::schedule`]).
    ///
    /// # Panics
    ///
    /// If the operating system cannot start a thread.
    pub fn new(config: SimConfig) -> Kmcl {
        let id = handle::next_instance_id();
        let shared = Arc::new(Shared::new(id, config));
        handle::register(id, &shared);
        let spawn = |name: &str, body: fn(Arc<Shared>)| {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name(std::format!("kmcl-sim-{id}-{name}"))
                .spawn(move || body(shared))
                .expect("failed to start a simulator thread")
        };
        let workers = if shared.schedule.is_deterministic() {
            // No threads: waiting threads run the work (docs/simulator.md, deterministic mode).
            schedule::adopt(&shared);
            Vec::new()
        } else {
            std::vec![
                spawn("passive", workers::passive_loop),
                spawn("dpc", workers::dpc_loop)
            ]
        };
        Kmcl {
            shared,
            workers,
            finished: false,
        }
    }

    /// The settings this instance runs with.
    pub fn config(&self) -> &SimConfig {
        &self.shared.config
    }

    /// `IRP_MN_QUERY_INTERFACE` on the bus: returns the server table, with one interface reference
    /// taken (release it with `InterfaceDereference(Context)`).
    ///
    /// Errors: `STATUS_NOT_SUPPORTED` for a GUID other than [`SIM_KMCL_SERVER_INTERFACE_TYPE`] or a
    /// version other than [`SIM_KMCL_SERVER_INTERFACE_VERSION`] (what an exporter that does not
    /// know the request leaves in the IRP); `STATUS_BUFFER_TOO_SMALL` for a `size` smaller than
    /// `sizeof(KMCL_SERVER_INTERFACE_V1)` (a larger size is accepted; only the V1 part is filled).
    pub fn query_interface(
        &self,
        interface_type: &GUID,
        size: u16,
        version: u16,
    ) -> Result<KMCL_SERVER_INTERFACE_V1, NtStatus> {
        if *interface_type != SIM_KMCL_SERVER_INTERFACE_TYPE
            || version != SIM_KMCL_SERVER_INTERFACE_VERSION
        {
            return Err(NtStatus::NOT_SUPPORTED);
        }
        if usize::from(size) < core::mem::size_of::<KMCL_SERVER_INTERFACE_V1>() {
            return Err(NtStatus::BUFFER_TOO_SMALL);
        }
        self.shared.interface_ref(1);
        Ok(table::server_table(self.shared.handle(0, Kind::Bus)))
    }

    /// The `PDEVICE_OBJECT` to pass as `ParentDeviceObject` to `VmbChannelAllocate`: it names
    /// this instance (the entry points are global; this is how a new channel finds its simulator).
    pub fn device_object(&self) -> PDEVICE_OBJECT {
        handle::to_ptr(self.shared.handle(0, Kind::Device))
    }

    /// [`Kmcl::parent_device`] as the `ParentDevice` a driver passes to channel allocation.
    pub fn parent_device(&self) -> kmcl::ParentDevice {
        // SAFETY: the device object names this instance, which outlives every channel allocated
        // under it (`Kmcl::finish`/drop reports channels not cleaned up).
        unsafe { kmcl::ParentDevice::new(self.device_object()) }
    }

    /// Interface references currently held.
    pub fn interface_references(&self) -> i64 {
        self.shared.lock().iface_refs
    }

    /// Attaches a guest (a VM) to this host. It binds to the enabled channel offered with its
    /// interface ids, now or when one is enabled. A guest whose channel is open (it was detached
    /// from another instance) is treated as already open: see `docs/simulator.md` (migration).
    pub fn attach_guest(&self, guest: &Guest) -> Result<(), GuestError> {
        if guest.inner.attached() {
            return Err(GuestError::AlreadyAttached);
        }
        guest
            .inner
            .set_attachment(Some(Arc::downgrade(&self.shared)));
        let mut st = self.shared.lock();
        st.guests.push(Arc::clone(&guest.inner));
        st.bind_guests();
        drop(st);
        self.shared.notify();
        Ok(())
    }

    /// Waits until the simulator is idle: no callback running, no state transition pending, and
    /// nothing the DPC could deliver (packets blocked by a stopped queue, a full ring or a quota
    /// do not count).
    ///
    /// # Panics
    ///
    /// If it is not idle within [`SimConfig::hang_timeout`] (a driver callback that blocks, or a
    /// simulator bug).
    pub fn wait_idle(&self) {
        assert!(
            self.try_wait_idle(self.shared.config.hang_timeout),
            "simulator not idle after {:?}",
            self.shared.config.hang_timeout
        );
    }

    /// [`Kmcl::wait_idle`] with a timeout; returns whether it became idle.
    pub fn try_wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            // Deterministic mode: a step that ran means the instance was not idle, so the idle
            // check is needed only once nothing ran (`run_one` finds nothing runnable when idle).
            if Instant::now() < deadline {
                let (guard, ran) = self.shared.run_one(st);
                st = guard;
                if ran {
                    continue;
                }
            }
            if workers::is_idle(&st, &self.shared.config) {
                return true;
            }
            let (guard, timed_out) = self.shared.wait_deadline(st, deadline);
            st = guard;
            if timed_out {
                return workers::is_idle(&st, &self.shared.config);
            }
        }
    }

    /// Deterministic mode ([`Schedule::Deterministic`](super::Schedule::Deterministic)): runs one
    /// step of pending KMCL work on the calling thread (one state transition, or ring transfers
    /// and one DPC callback; the seed picks which when both are pending) and returns whether
    /// anything ran. Threaded mode: does nothing and returns `false` (the workers run the work).
    ///
    /// Waiting calls ([`Kmcl::wait_idle`], blocking KMCL calls) step on their own; this is for a
    /// test that interleaves guest actions with single steps.
    pub fn step(&self) -> bool {
        self.shared.step()
    }

    /// Calls of `call` that named a valid object so far (plan fault sweeps with it).
    pub fn call_count(&self, call: KmclCall) -> u64 {
        self.shared.lock().count(call)
    }

    /// Adds a fault at run time (its `nth` counts from the instance's creation).
    pub fn add_fault(&self, fault: Fault) {
        self.shared.lock().faults.faults.push(fault);
    }

    /// Makes the next call of `call` fail with `status` (NULL for `VmbPacketAllocate`).
    pub fn fail_next(&self, call: KmclCall, status: NtStatus) {
        let mut st = self.shared.lock();
        let nth = st.count(call) + 1;
        st.faults.faults.push(Fault {
            call,
            nth,
            sticky: false,
            status,
        });
    }

    /// Removes every fault.
    pub fn clear_faults(&self) {
        self.shared.lock().faults.faults.clear();
    }

    /// The violations recorded so far (not removed).
    pub fn violations(&self) -> Vec<Violation> {
        self.shared.lock().violations.clone()
    }

    /// Takes the violations recorded so far, plus those recorded on the calling thread that named
    /// no instance (see [`take_unattributed_violations`](super::take_unattributed_violations)).
    pub fn take_violations(&self) -> Vec<Violation> {
        let mut all = core::mem::take(&mut self.shared.lock().violations);
        all.extend(verifier::take_unattributed_violations());
        all
    }

    /// Panics with the list of violations if any was recorded (and takes them).
    ///
    /// # Panics
    ///
    /// If any violation was recorded.
    pub fn assert_no_violations(&self) {
        let violations = self.take_violations();
        if !violations.is_empty() {
            let list: Vec<String> = violations.iter().map(|v| std::format!("  {v}")).collect();
            panic!(
                "{} KMCL contract violation(s):\n{}",
                violations.len(),
                list.join("\n")
            );
        }
    }

    /// Every live channel.
    pub fn channels(&self) -> Vec<VMBCHANNEL> {
        let st = self.shared.lock();
        st.channels
            .keys()
            .map(|seq| handle::to_ptr(self.shared.handle(*seq, Kind::Channel)))
            .collect()
    }

    /// A snapshot of a live channel of this instance.
    pub fn channel_info(&self, channel: VMBCHANNEL) -> Option<ChannelInfo> {
        let token = handle::decode(handle::addr(channel))?;
        if token.instance != self.shared.id || token.kind != Kind::Channel {
            return None;
        }
        let st = self.shared.lock();
        let c = st.channels.get(&token.seq)?;
        Some(ChannelInfo {
            handle: handle::addr(channel),
            enabled: c.lifecycle != Lifecycle::Disabled,
            opened: c.opened,
            running: c.running,
            queue_running: c.running && c.queue_enabled && !c.queue_failed,
            queue_failed: c.queue_failed,
            start_requested: c.start_requested,
            packets_allocated: c.allocated,
            packets_in_flight: c.in_flight.len(),
            packets_queued: c.host_queue.len(),
            incoming_outstanding: c.incoming_outstanding,
            friendly_name: c.friendly_name.clone(),
            max_packet_size: c.max_packet_size,
            interface_type: c.interface_type,
            interface_instance: c.interface_instance,
            server_flags: c.server_flags,
            incoming_at_passive: c.incoming_at_passive,
            guest_bound: matches!(c.link, Link::Bound(_)),
        })
    }

    /// Stops the instance, runs the teardown checks (channels not cleaned up, interface references
    /// outstanding) and returns every violation recorded (including this thread's unattributed
    /// ones). Attached guests are detached (their memory is kept).
    pub fn finish(mut self) -> Vec<Violation> {
        self.finished = true;
        self.stop();
        self.take_violations()
    }

    fn stop(&mut self) {
        self.shared.final_checks();
        {
            let mut st = self.shared.lock();
            st.shutdown = true;
            for g in core::mem::take(&mut st.guests) {
                g.set_attachment(None);
            }
            for c in st.channels.values_mut() {
                if matches!(c.link, Link::Bound(_)) {
                    c.link = Link::Frozen;
                }
            }
        }
        self.shared.notify();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
        handle::unregister(self.shared.id);
    }
}

impl Drop for Kmcl {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        self.stop();
        let violations = self.take_violations();
        if !violations.is_empty() && !thread::panicking() {
            let list: Vec<String> = violations.iter().map(|v| std::format!("  {v}")).collect();
            panic!(
                "simulator dropped with {} unreported KMCL contract violation(s):\n{}",
                violations.len(),
                list.join("\n")
            );
        }
    }
}

/// Detaches `guest` from `bus` (the channel it was bound to freezes).
pub(crate) fn detach(bus: &Shared, guest: &Arc<GuestShared>) {
    let mut st = bus.lock();
    st.guests.retain(|g| !Arc::ptr_eq(g, guest));
    for c in st.channels.values_mut() {
        if matches!(&c.link, Link::Bound(g) if Arc::ptr_eq(g, guest)) {
            c.link = Link::Frozen;
        }
    }
    drop(st);
    bus.notify();
}

/// Keeps `Weak` in scope for the attachment type.
#[allow(dead_code)]
type Attachment = Option<Weak<Shared>>;
