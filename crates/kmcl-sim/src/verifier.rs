//! The verifier's record: typed contract violations.

use core::cell::RefCell;
use core::fmt;
use std::string::String;
use std::vec::Vec;

use super::config::KmclCall;

/// What rule a driver broke (`docs/simulator.md` names the rule each kind enforces).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ViolationKind {
    /// A handle (channel, packet, completion, interface context, device object) that this
    /// simulator never issued, or NULL.
    InvalidHandle,
    /// A handle that was valid once but has been freed / cleaned up / completed (use after free).
    StaleHandle,
    /// A handle of one type passed where another is expected (a packet as a channel, …).
    WrongHandleType,
    /// An incoming packet completed (`VmbChannelPacketComplete` / `…Fail`) a second time.
    DoubleCompletion,
    /// A packet object freed twice.
    DoubleFree,
    /// A packet object the library owns (in flight) freed, sent or restored.
    PacketInFlight,
    /// The completion routine of a packet the library owns was changed
    /// ([`RestoredPacketContext::KeepSetBeforeRestore`](super::RestoredPacketContext)).
    PacketModifiedInFlight,
    /// A call made in a channel state that does not allow it (Init* after Enable, Start before
    /// Enable, Cleanup of an enabled channel, save of a running channel, restore at the wrong
    /// time, …).
    WrongState,
    /// A call made at a simulated IRQL above the one it allows.
    WrongIrql,
    /// Start / Pause / Disable (or another blocking call) made from inside a state-change
    /// callback or on a simulator worker thread.
    CalledFromCallback,
    /// A bad argument: NULL where a buffer or out pointer is required, undefined flag bits,
    /// a wrong callbacks version/size, a zero size.
    InvalidArgument,
    /// `VmbPacketSend` longer than the channel's maximum packet size.
    PacketTooLarge,
    /// `VmbPacketSend` after `EvtChannelSuspend` and before the next `EvtChannelStarted`.
    SendWhileSuspended,
    /// `VmbChannelPacketDeferToPassive` not called inline from the process-packet callback.
    DeferNotInline,
    /// Packet objects still allocated when their channel was cleaned up.
    PacketLeaked,
    /// A channel not cleaned up when the simulator was finished.
    ChannelLeaked,
    /// Interface references outstanding when the simulator was finished.
    InterfaceLeaked,
    /// `InterfaceDereference` called more often than references were taken.
    InterfaceOverReleased,
    /// A save-packet callback broke the two-call protocol (success with `BytesNeeded != 0`,
    /// failure without a size, a too-large size, failure of the second call, a second
    /// `BytesNeeded` larger than the buffer).
    SaveCallbackProtocol,
    /// Save calls out of order (Continue without Begin, Begin twice, Continue after the end).
    SaveSequence,
    /// A restore callback returned success without restoring its packet with `VmbPacketRestore`.
    RestoreWithoutPacketRestore,
    /// A restore callback returned failure after `VmbPacketRestore` succeeded for its packet
    /// (the packet is in flight and the library's; the driver thinks it failed).
    RestoreFailedAfterPacketRestore,
    /// `VmbPacketRestore` outside a restore callback, twice for one saved packet, or with a
    /// `LibBuf` that is not the one the callback was given.
    PacketRestoreMisuse,
    /// The driver did not complete incoming packets after `EvtChannelSuspend`, or a blocking
    /// call did not finish within [`SimConfig::hang_timeout`](super::SimConfig).
    Hang,
    /// A table slot the simulator does not model was called.
    Unmodelled,
    /// A client-only call on a server channel, or a client channel requested.
    ClientOnly,
    /// A panic inside the simulator (a simulator bug), caught at the FFI boundary.
    InternalError,
}

/// One recorded contract violation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The rule broken.
    pub kind: ViolationKind,
    /// The table call during which it was detected (`None`: detected by the simulator itself,
    /// e.g. at teardown or after a callback returned).
    pub call: Option<KmclCall>,
    /// Human-readable details.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.call {
            Some(call) => write!(f, "{:?} in {:?}: {}", self.kind, call, self.detail),
            None => write!(f, "{:?}: {}", self.kind, self.detail),
        }
    }
}

std::thread_local! {
    static UNATTRIBUTED: RefCell<Vec<Violation>> = const { RefCell::new(Vec::new()) };
}

/// Records a violation that cannot be attributed to a simulator instance (a garbage handle whose
/// instance is unknown) on the calling thread; [`Kmcl::take_violations`](super::Kmcl) on the
/// same thread, or [`take_unattributed_violations`], collects it.
pub(crate) fn record_unattributed(violation: Violation) {
    UNATTRIBUTED.with(|list| list.borrow_mut().push(violation));
}

/// Takes the violations recorded on this thread that named no simulator instance (for example a
/// call with a NULL or garbage handle made outside any simulator callback).
pub fn take_unattributed_violations() -> Vec<Violation> {
    UNATTRIBUTED.with(|list| core::mem::take(&mut *list.borrow_mut()))
}
