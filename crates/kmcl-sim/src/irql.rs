//! A simulated IRQL per thread, and the simulator's per-thread record of which callback (if any)
//! the thread is running.
//!
//! Every thread starts at [`Irql::Passive`]. The simulator raises the calling thread's IRQL to
//! [`Irql::Dispatch`] around process-packet callbacks (unless the channel asked for PASSIVE
//! processing) and completion routines; state-change, save and restore callbacks run at PASSIVE.
//! Code under test can assert with [`current_irql`], and a lock abstraction can model a spin lock
//! with [`raise_irql`].

use core::cell::{Cell, RefCell};
use std::vec::Vec;

/// A simulated interrupt request level (only the levels a KMCL client sees).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Irql {
    /// `PASSIVE_LEVEL` (0): may block, may touch pageable memory.
    Passive,
    /// `APC_LEVEL` (1).
    Apc,
    /// `DISPATCH_LEVEL` (2): DPCs and spin locks; must not block.
    Dispatch,
}

std::thread_local! {
    static IRQL: Cell<Irql> = const { Cell::new(Irql::Passive) };
    static FRAMES: RefCell<Vec<Frame>> = const { RefCell::new(Vec::new()) };
    static WORKER: Cell<Option<u32>> = const { Cell::new(None) };
}

/// The calling thread's simulated IRQL.
pub fn current_irql() -> Irql {
    IRQL.with(Cell::get)
}

/// Restores the previous IRQL when dropped (the `KeLowerIrql` half of [`raise_irql`]).
#[must_use = "the IRQL is lowered again when the guard is dropped"]
#[derive(Debug)]
pub struct IrqlGuard {
    previous: Irql,
}

impl Drop for IrqlGuard {
    fn drop(&mut self) {
        IRQL.with(|irql| irql.set(self.previous));
    }
}

/// Raises the calling thread's simulated IRQL to `level` until the guard is dropped
/// (`KeRaiseIrql`). Raising to a *lower* level than the current one is a bug in real Windows; here
/// the IRQL is left unchanged in that case.
pub fn raise_irql(level: Irql) -> IrqlGuard {
    let previous = current_irql();
    if level > previous {
        IRQL.with(|irql| irql.set(level));
    }
    IrqlGuard { previous }
}

/// Sets the IRQL to exactly `level` (used by the simulator to run PASSIVE callbacks).
pub(crate) fn set_irql(level: Irql) -> IrqlGuard {
    let previous = current_irql();
    IRQL.with(|irql| irql.set(level));
    IrqlGuard { previous }
}

/// What a thread is doing inside a driver callback the simulator invoked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FrameKind {
    /// A state-change callback (Opened, Closed, Suspend, Started, PostStarted).
    StateChange,
    /// A process-packet callback for incoming packet `pc` (its object sequence number).
    ProcessPacket { pc: u32, deferred: bool },
    /// A processing-complete callback.
    ProcessingComplete,
    /// A packet completion routine.
    Completion,
    /// A save-packet callback.
    SavePacket,
    /// A restore-packet callback for the unit with transaction id `txid`; `restored` is the
    /// packet `VmbPacketRestore` restored from it, once it did.
    RestorePacket {
        channel: u32,
        txid: u64,
        restored: Option<u32>,
    },
}

/// One callback invocation on this thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Frame {
    /// The simulator instance that made the call.
    pub(crate) instance: u32,
    /// What kind of callback.
    pub(crate) kind: FrameKind,
}

/// Pops the frame pushed by [`push_frame`] when dropped, returning it through [`FrameGuard::take`].
pub(crate) struct FrameGuard {
    depth: usize,
}

impl FrameGuard {
    /// Pops the frame now and returns its final contents (as updated during the callback).
    pub(crate) fn take(self) -> Option<Frame> {
        let depth = self.depth;
        core::mem::forget(self);
        FRAMES.with(|frames| {
            let mut frames = frames.borrow_mut();
            if frames.len() == depth + 1 {
                frames.pop()
            } else {
                frames.truncate(depth);
                None
            }
        })
    }
}

impl Drop for FrameGuard {
    fn drop(&mut self) {
        FRAMES.with(|frames| frames.borrow_mut().truncate(self.depth));
    }
}

/// Records that this thread enters a driver callback.
pub(crate) fn push_frame(frame: Frame) -> FrameGuard {
    FRAMES.with(|frames| {
        let mut frames = frames.borrow_mut();
        let depth = frames.len();
        frames.push(frame);
        FrameGuard { depth }
    })
}

/// The innermost callback frame of this thread, if any.
pub(crate) fn top_frame() -> Option<Frame> {
    FRAMES.with(|frames| frames.borrow().last().copied())
}

/// Whether any frame of this thread is a state-change callback.
pub(crate) fn in_state_change_callback() -> bool {
    FRAMES.with(|frames| {
        frames
            .borrow()
            .iter()
            .any(|f| f.kind == FrameKind::StateChange)
    })
}

/// Updates the innermost frame in place.
pub(crate) fn update_top_frame(update: impl FnOnce(&mut Frame)) {
    FRAMES.with(|frames| {
        if let Some(frame) = frames.borrow_mut().last_mut() {
            update(frame);
        }
    });
}

/// Marks this thread as a worker ("DPC" or "passive work item") of simulator instance `instance`.
pub(crate) fn mark_worker(instance: u32) {
    WORKER.with(|w| w.set(Some(instance)));
}

/// Marks this thread as a worker of `instance` until the guard drops: a waiting thread running a
/// step of deterministic mode (`schedule.rs`) is, for that step, the simulator's worker.
pub(crate) fn enter_worker(instance: u32) -> WorkerGuard {
    WorkerGuard(WORKER.with(|w| w.replace(Some(instance))))
}

/// Restores the thread's previous worker marking on drop.
pub(crate) struct WorkerGuard(Option<u32>);

impl Drop for WorkerGuard {
    fn drop(&mut self) {
        WORKER.with(|w| w.set(self.0));
    }
}

/// Whether this thread is one of the simulator's own worker threads (a blocking call made here
/// would wait for itself).
pub(crate) fn on_worker_thread() -> bool {
    WORKER.with(Cell::get).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raise_and_restore() {
        assert_eq!(current_irql(), Irql::Passive);
        {
            let _g = raise_irql(Irql::Dispatch);
            assert_eq!(current_irql(), Irql::Dispatch);
            {
                let _lower = raise_irql(Irql::Apc);
                assert_eq!(current_irql(), Irql::Dispatch);
            }
            let _p = set_irql(Irql::Passive);
            assert_eq!(current_irql(), Irql::Passive);
        }
        assert_eq!(current_irql(), Irql::Passive);
    }

    #[test]
    fn frames_nest() {
        assert!(top_frame().is_none());
        let outer = push_frame(Frame {
            instance: 1,
            kind: FrameKind::StateChange,
        });
        assert!(in_state_change_callback());
        let inner = push_frame(Frame {
            instance: 1,
            kind: FrameKind::RestorePacket {
                channel: 1,
                txid: 7,
                restored: None,
            },
        });
        update_top_frame(|f| {
            if let FrameKind::RestorePacket { restored, .. } = &mut f.kind {
                *restored = Some(3);
            }
        });
        let frame = inner.take().map(|f| f.kind);
        assert_eq!(
            frame,
            Some(FrameKind::RestorePacket {
                channel: 1,
                txid: 7,
                restored: Some(3)
            })
        );
        drop(outer);
        assert!(!in_state_change_callback());
    }
}
