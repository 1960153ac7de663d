//! The channel slot table: bounded, allocated once, ids never reused, one owner per channel.
//!
//! [`RegistryTable`] is pure bookkeeping over values of any type `T` (the registry stores
//! `VspChannel`s; the tests store integers). It lives behind the registry's `DispatchLock` and
//! every method is O(1) and allocation-free, so it is fit for a spin lock: values are *checked
//! out* of the table (moved out) for the length of an operation, which then runs with no lock
//! held, and checked back in afterwards.
//!
//! # Channel ids
//!
//! `id = generation << 32 | (slot index + 1)`. A slot's generation grows by one each time it is
//! handed out, and a slot whose generation reached `u32::MAX` is retired instead of being reused,
//! so an id is never handed out twice in the life of a registry. Id 0 is never valid.
//!
//! # Slot states
//!
//! ```text
//! Free --reserve--> Creating --publish--> Idle <--check_in-- Busy
//!                      |                   |  --check_out-->  |
//!                      +--abandon--> Free  +--take--> Free    +--release--> Free
//! ```
//!
//! `Creating` and `Busy` slots may be *doomed* by an owner cleanup: the next `publish` or
//! `check_in` then frees the slot and hands the value back to be dropped.

use alloc::vec::Vec;

use super::STATUS_DEVICE_BUSY;
use crate::kmcl::NtStatus;

/// Who a channel belongs to: the driver uses the control file object, so closing the handle (or
/// the process dying) destroys that client's channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OwnerId(pub u64);

enum SlotState<T> {
    Free,
    Creating { doomed: bool },
    Idle(T),
    Busy { doomed: bool },
}

struct Slot<T> {
    generation: u32,
    owner: OwnerId,
    state: SlotState<T>,
}

/// Bounded channel slots; see the module documentation.
///
/// # Invariants
/// * `slots.len() == capacity`, `free.capacity() >= capacity`, both reserved at creation: no
///   method allocates.
/// * An index is on `free` exactly when its slot is `Free` and its generation is below
///   `u32::MAX`; `in_use` counts the slots that are not `Free`.
pub struct RegistryTable<T> {
    slots: Vec<Slot<T>>,
    free: Vec<u32>,
    in_use: u32,
}

const INDEX_MASK: u64 = 0xFFFF_FFFF;

/// The id of slot `index` at `generation`.
fn make_id(index: usize, generation: u32) -> u64 {
    // `index < capacity <= u32::MAX - 1`, so `index + 1` fits the low half.
    (u64::from(generation) << 32) | ((index as u64 + 1) & INDEX_MASK)
}

/// The slot index and generation an id names, if it can name one at all.
fn split_id(id: u64) -> Option<(usize, u32)> {
    let index = usize::try_from((id & INDEX_MASK).checked_sub(1)?).ok()?;
    let generation = u32::try_from(id >> 32).ok()?;
    (generation != 0).then_some((index, generation))
}

impl<T> RegistryTable<T> {
    /// A table of `capacity` free slots (`1..=u32::MAX - 1`); `STATUS_INSUFFICIENT_RESOURCES` if
    /// the memory cannot be had.
    pub fn try_new(capacity: u32) -> Result<Self, NtStatus> {
        if capacity == 0 || capacity == u32::MAX {
            return Err(NtStatus::INVALID_PARAMETER);
        }
        let count = capacity as usize;
        let mut slots = Vec::new();
        slots
            .try_reserve_exact(count)
            .map_err(|_| NtStatus::INSUFFICIENT_RESOURCES)?;
        let mut free = Vec::new();
        free.try_reserve_exact(count)
            .map_err(|_| NtStatus::INSUFFICIENT_RESOURCES)?;
        for _ in 0..count {
            // Within the reserved capacity: no allocation.
            slots.push(Slot {
                generation: 0,
                owner: OwnerId(0),
                state: SlotState::Free,
            });
        }
        // Popped from the end: low indexes are handed out first.
        free.extend((0..capacity).rev());
        Ok(Self {
            slots,
            free,
            in_use: 0,
        })
    }

    /// How many slots the table has.
    pub fn capacity(&self) -> u32 {
        // INVARIANT: created from a u32.
        self.slots.len() as u32
    }

    /// How many slots are not free (creating, idle or busy).
    pub fn in_use(&self) -> u32 {
        self.in_use
    }

    /// Takes a free slot for a channel `owner` is creating; returns its id.
    ///
    /// `STATUS_QUOTA_EXCEEDED` when every slot is in use (or retired).
    pub fn reserve(&mut self, owner: OwnerId) -> Result<u64, NtStatus> {
        let index = self.free.pop().ok_or(NtStatus::QUOTA_EXCEEDED)? as usize;
        let Some(slot) = self.slots.get_mut(index) else {
            return Err(NtStatus::QUOTA_EXCEEDED);
        };
        // INVARIANT: indexes on `free` have a generation below u32::MAX.
        slot.generation = slot.generation.saturating_add(1);
        slot.owner = owner;
        slot.state = SlotState::Creating { doomed: false };
        self.in_use = self.in_use.saturating_add(1);
        Ok(make_id(index, slot.generation))
    }

    /// Stores the created value in its reserved slot. If the owner was cleaned up meanwhile, the
    /// slot is freed and the value handed back (`Err`) for the caller to drop.
    pub fn publish(&mut self, id: u64, value: T) -> Result<(), T> {
        let Some(index) =
            self.index_in_state(id, |state| matches!(state, SlotState::Creating { .. }))
        else {
            return Err(value);
        };
        let Some(slot) = self.slots.get_mut(index) else {
            return Err(value);
        };
        if matches!(slot.state, SlotState::Creating { doomed: true }) {
            self.release(index);
            return Err(value);
        }
        slot.state = SlotState::Idle(value);
        Ok(())
    }

    /// Frees a reserved slot whose creation failed.
    pub fn abandon(&mut self, id: u64) {
        if let Some(index) =
            self.index_in_state(id, |state| matches!(state, SlotState::Creating { .. }))
        {
            self.release(index);
        }
    }

    /// Moves the value of channel `id` out for an operation by `owner`.
    ///
    /// `STATUS_NOT_FOUND` if `id` names no live channel of `owner` (a foreign channel is not
    /// found either: its existence is not revealed); [`STATUS_DEVICE_BUSY`] if another
    /// operation has it checked out.
    pub fn check_out(&mut self, id: u64, owner: OwnerId) -> Result<T, NtStatus> {
        let index = self.owned_index(id, owner).ok_or(NtStatus::NOT_FOUND)?;
        let slot = self.slots.get_mut(index).ok_or(NtStatus::NOT_FOUND)?;
        match core::mem::replace(&mut slot.state, SlotState::Busy { doomed: false }) {
            SlotState::Idle(value) => Ok(value),
            other => {
                let busy = matches!(other, SlotState::Busy { .. });
                slot.state = other;
                Err(if busy {
                    STATUS_DEVICE_BUSY
                } else {
                    NtStatus::NOT_FOUND
                })
            }
        }
    }

    /// Returns a checked-out value. If the channel was doomed meanwhile, the slot is freed and
    /// the value handed back (`Some`) for the caller to drop.
    pub fn check_in(&mut self, id: u64, value: T) -> Option<T> {
        let Some(index) = self.index_in_state(id, |state| matches!(state, SlotState::Busy { .. }))
        else {
            // Not checked out under this id: cannot happen; drop rather than store twice.
            return Some(value);
        };
        let Some(slot) = self.slots.get_mut(index) else {
            return Some(value);
        };
        if matches!(slot.state, SlotState::Busy { doomed: true }) {
            self.release(index);
            return Some(value);
        }
        slot.state = SlotState::Idle(value);
        None
    }

    /// Frees the slot of a checked-out value that the caller is destroying.
    pub fn release_checked_out(&mut self, id: u64) {
        if let Some(index) =
            self.index_in_state(id, |state| matches!(state, SlotState::Busy { .. }))
        {
            self.release(index);
        }
    }

    /// Owner cleanup, one slot at a time: if slot `index` belongs to `owner` (or to anyone, with
    /// `None`), an idle value is taken out (slot freed) and returned, and a creating or busy one is
    /// doomed. Returns whether the slot matched, and the value to drop.
    pub fn take_at(&mut self, index: usize, owner: Option<OwnerId>) -> (bool, Option<T>) {
        let Some(slot) = self.slots.get_mut(index) else {
            return (false, None);
        };
        if owner.is_some_and(|owner| owner != slot.owner) {
            return (false, None);
        }
        if matches!(slot.state, SlotState::Idle(_)) {
            let taken = core::mem::replace(&mut slot.state, SlotState::Free);
            self.release(index);
            return match taken {
                SlotState::Idle(value) => (true, Some(value)),
                _ => (false, None),
            };
        }
        match &mut slot.state {
            SlotState::Creating { doomed } | SlotState::Busy { doomed } => {
                let first = !*doomed;
                *doomed = true;
                (first, None)
            }
            SlotState::Free | SlotState::Idle(_) => (false, None),
        }
    }

    fn owned_index(&self, id: u64, owner: OwnerId) -> Option<usize> {
        let (index, generation) = split_id(id)?;
        let slot = self.slots.get(index)?;
        (slot.generation == generation
            && slot.owner == owner
            && matches!(slot.state, SlotState::Idle(_) | SlotState::Busy { .. }))
        .then_some(index)
    }

    fn index_in_state(&self, id: u64, state: impl FnOnce(&SlotState<T>) -> bool) -> Option<usize> {
        let (index, generation) = split_id(id)?;
        let slot = self.slots.get(index)?;
        (slot.generation == generation && state(&slot.state)).then_some(index)
    }

    fn release(&mut self, index: usize) {
        let Some(slot) = self.slots.get_mut(index) else {
            return;
        };
        slot.state = SlotState::Free;
        slot.owner = OwnerId(0);
        self.in_use = self.in_use.saturating_sub(1);
        if slot.generation < u32::MAX && self.free.len() < self.free.capacity() {
            // Within the reserved capacity: no allocation.
            self.free.push(index as u32);
        }
        // Else the slot is retired: its ids are used up.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: OwnerId = OwnerId(0xA);
    const B: OwnerId = OwnerId(0xB);

    fn live(table: &mut RegistryTable<u32>, owner: OwnerId, value: u32) -> u64 {
        let id = table.reserve(owner).unwrap();
        table.publish(id, value).unwrap();
        id
    }

    #[test]
    fn ids_have_index_and_generation_and_are_never_zero() {
        let mut table = RegistryTable::<u32>::try_new(2).unwrap();
        let first = live(&mut table, A, 1);
        let second = live(&mut table, A, 2);
        assert_eq!(first, (1 << 32) | 1);
        assert_eq!(second, (1 << 32) | 2);
        assert_eq!(split_id(0), None);
        assert_eq!(split_id(1), None, "generation 0 is never handed out");
        assert_eq!(split_id(1 << 32), None, "index part 0 is never handed out");
        assert_eq!(table.in_use(), 2);
        assert_eq!(table.reserve(A), Err(NtStatus::QUOTA_EXCEEDED));
    }

    #[test]
    fn a_freed_slot_comes_back_with_a_new_id_and_the_old_one_is_dead() {
        let mut table = RegistryTable::<u32>::try_new(1).unwrap();
        let old = live(&mut table, A, 1);
        assert_eq!(table.take_at(0, Some(A)), (true, Some(1)));
        assert_eq!(table.in_use(), 0);
        let new = live(&mut table, A, 2);
        assert_ne!(old, new);
        assert_eq!(new & INDEX_MASK, old & INDEX_MASK, "same slot");
        assert_eq!(table.check_out(old, A), Err(NtStatus::NOT_FOUND));
        assert_eq!(table.check_out(new, A), Ok(2));
        assert_eq!(table.check_in(new, 2), None);
        // Forged ids: another index, another generation, out of range.
        for forged in [new + 1, new ^ (1 << 40), (5 << 32) | 99, u64::MAX] {
            assert_eq!(
                table.check_out(forged, A),
                Err(NtStatus::NOT_FOUND),
                "{forged:#x}"
            );
        }
    }

    #[test]
    fn a_slot_whose_generation_is_used_up_is_retired() {
        let mut table = RegistryTable::<u32>::try_new(1).unwrap();
        table.slots[0].generation = u32::MAX - 1;
        let last = live(&mut table, A, 1);
        assert_eq!(last >> 32, u64::from(u32::MAX));
        assert_eq!(table.take_at(0, None), (true, Some(1)));
        // Never handed out again, so no id can repeat.
        assert_eq!(table.reserve(A), Err(NtStatus::QUOTA_EXCEEDED));
        assert_eq!(table.check_out(last, A), Err(NtStatus::NOT_FOUND));
    }

    #[test]
    fn another_owners_channel_is_not_found() {
        let mut table = RegistryTable::<u32>::try_new(2).unwrap();
        let a = live(&mut table, A, 1);
        assert_eq!(table.check_out(a, B), Err(NtStatus::NOT_FOUND));
        // Even while busy: B must not learn that the id exists.
        let value = table.check_out(a, A).unwrap();
        assert_eq!(table.check_out(a, B), Err(NtStatus::NOT_FOUND));
        assert_eq!(table.check_out(a, A), Err(STATUS_DEVICE_BUSY));
        assert_eq!(table.check_in(a, value), None);
        // B's cleanup leaves A's channel alone.
        assert_eq!(table.take_at(0, Some(B)), (false, None));
        assert_eq!(table.check_out(a, A), Ok(1));
    }

    #[test]
    fn a_creating_slot_is_invisible_and_cleanup_dooms_it() {
        let mut table = RegistryTable::<u32>::try_new(1).unwrap();
        let id = table.reserve(A).unwrap();
        assert_eq!(table.check_out(id, A), Err(NtStatus::NOT_FOUND));
        assert_eq!(table.take_at(0, Some(A)), (true, None));
        assert_eq!(table.take_at(0, Some(A)), (false, None), "counted once");
        assert_eq!(table.publish(id, 7), Err(7));
        assert_eq!(table.in_use(), 0);
        // Abandoning a failed creation frees the slot too.
        let id = table.reserve(A).unwrap();
        table.abandon(id);
        assert_eq!(table.in_use(), 0);
        assert_eq!(table.publish(id, 8), Err(8));
    }

    #[test]
    fn cleanup_of_a_busy_channel_is_deferred_to_its_check_in() {
        let mut table = RegistryTable::<u32>::try_new(1).unwrap();
        let id = live(&mut table, A, 5);
        let value = table.check_out(id, A).unwrap();
        assert_eq!(table.take_at(0, Some(A)), (true, None));
        assert_eq!(table.in_use(), 1);
        assert_eq!(table.check_in(id, value), Some(5));
        assert_eq!(table.in_use(), 0);
        assert_eq!(table.check_out(id, A), Err(NtStatus::NOT_FOUND));
    }

    #[test]
    fn destroy_releases_a_checked_out_slot() {
        let mut table = RegistryTable::<u32>::try_new(1).unwrap();
        let id = live(&mut table, A, 5);
        let _value = table.check_out(id, A).unwrap();
        table.release_checked_out(id);
        assert_eq!(table.in_use(), 0);
        assert_eq!(table.check_out(id, A), Err(NtStatus::NOT_FOUND));
        // A stray check-in of the destroyed id hands the value back instead of storing it.
        assert_eq!(table.check_in(id, 5), Some(5));
        assert_eq!(table.in_use(), 0);
    }

    #[test]
    fn capacity_bounds() {
        assert!(RegistryTable::<u32>::try_new(0).is_err());
        assert!(RegistryTable::<u32>::try_new(u32::MAX).is_err());
        let table = RegistryTable::<u32>::try_new(3).unwrap();
        assert_eq!(table.capacity(), 3);
    }
}
