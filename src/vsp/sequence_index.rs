//! The set of sequence numbers in flight on one channel, so that a second delivery with a sequence
//! already in flight is refused when it is inserted — before a second copy exists.
//!
//! Open addressing with linear probing over slot indexes, allocated once per channel (twice the
//! table's capacity, rounded up to a power of two, so the load factor never exceeds ½). Sequence
//! numbers of restored deliveries come from a saved blob and are hostile: the hash is keyed with
//! a per-channel value an attacker does not choose, and no key ever sits more than
//! [`MAX_PROBE`] places from its home, so every operation is bounded even against a blob crafted
//! to collide. Deletion shifts later entries back (no tombstones), which keeps that bound.
#![forbid(unsafe_code)]

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::fallible::AllocError;

/// Longest probe sequence an entry may have. With a load factor of at most ½ and a keyed hash,
/// an honest set of 65,536 sequences needs far fewer; an insert that would need more is refused.
pub const MAX_PROBE: usize = 128;

const EMPTY: u32 = u32::MAX;

/// Why [`SequenceIndex::insert`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexError {
    /// The sequence is already in flight.
    Duplicate,
    /// No free place within [`MAX_PROBE`] of the sequence's home.
    Crowded,
}

/// Sequence → slot index, for the deliveries in flight.
pub struct SequenceIndex {
    /// Slot indexes, or [`EMPTY`]; the sequence of an entry is read through the caller.
    places: Vec<u32>,
    mask: usize,
    key: u64,
}

/// Feeds the per-channel keys: distinct for every index created in this driver instance.
static KEYS: AtomicU64 = AtomicU64::new(0x9E37_79B9_7F4A_7C15);

/// A 64-bit finalizer (SplitMix64's): every input bit affects every output bit.
pub(crate) const fn mix(mut value: u64) -> u64 {
    value ^= value >> 30;
    value = value.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    value ^= value >> 27;
    value = value.wrapping_mul(0x94D0_49BB_1331_11EB);
    value ^ (value >> 31)
}

impl SequenceIndex {
    /// Empties the index for good and returns its storage (to be freed outside a lock); every
    /// lookup afterwards finds nothing.
    pub fn take_storage(&mut self) -> Vec<u32> {
        self.mask = 0;
        core::mem::take(&mut self.places)
    }

    /// An empty index for up to `capacity` sequences.
    pub fn try_new(capacity: u32) -> Result<Self, AllocError> {
        let size = (capacity as usize)
            .max(1)
            .checked_mul(2)
            .and_then(usize::checked_next_power_of_two)
            .ok_or(AllocError)?;
        let places = crate::fallible::try_vec_filled(size, EMPTY)?;
        // The key mixes a counter with the address of this channel's allocation: not chosen by
        // whoever wrote a blob, and different for every channel.
        let counter = KEYS.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
        let key = mix(counter ^ (places.as_ptr().addr() as u64).rotate_left(32));
        Ok(Self {
            places,
            mask: size - 1,
            key,
        })
    }

    fn home(&self, sequence: u64) -> usize {
        // Truncation keeps the low bits, which the mask selects anyway.
        mix(sequence ^ self.key) as usize & self.mask
    }

    /// The slot holding `sequence`, looked up through `sequence_of` (slot → its sequence).
    pub fn find(&self, sequence: u64, sequence_of: impl Fn(u32) -> Option<u64>) -> Option<u32> {
        let home = self.home(sequence);
        for step in 0..MAX_PROBE {
            let place = self.places.get((home + step) & self.mask).copied()?;
            if place == EMPTY {
                return None;
            }
            if sequence_of(place) == Some(sequence) {
                return Some(place);
            }
        }
        None
    }

    /// Records that `slot` holds `sequence`; refuses a sequence already present.
    pub fn insert(
        &mut self,
        sequence: u64,
        slot: u32,
        sequence_of: impl Fn(u32) -> Option<u64>,
    ) -> Result<(), IndexError> {
        let home = self.home(sequence);
        for step in 0..MAX_PROBE {
            let at = (home + step) & self.mask;
            let Some(place) = self.places.get_mut(at) else {
                return Err(IndexError::Crowded);
            };
            if *place == EMPTY {
                *place = slot;
                return Ok(());
            }
            if sequence_of(*place) == Some(sequence) {
                return Err(IndexError::Duplicate);
            }
        }
        Err(IndexError::Crowded)
    }

    /// Forgets `sequence` (held by `slot`), shifting later entries of its cluster back so no
    /// lookup stops early.
    pub fn remove(&mut self, sequence: u64, slot: u32, sequence_of: impl Fn(u32) -> Option<u64>) {
        let home = self.home(sequence);
        let Some(mut hole) = (0..MAX_PROBE)
            .map(|step| (home + step) & self.mask)
            .find(|&at| self.places.get(at) == Some(&slot))
        else {
            return;
        };
        let mut next = (hole + 1) & self.mask;
        while let Some(&entry) = self.places.get(next) {
            if entry == EMPTY {
                break;
            }
            // An entry may move back into the hole only if the hole lies between its home and
            // its place (cyclically): otherwise a lookup from its home would pass over the hole.
            let movable = sequence_of(entry).is_some_and(|entry_sequence| {
                let entry_home = self.home(entry_sequence);
                let distance_to_hole = hole.wrapping_sub(entry_home) & self.mask;
                let distance_to_entry = next.wrapping_sub(entry_home) & self.mask;
                distance_to_hole <= distance_to_entry
            });
            if movable {
                if let Some(target) = self.places.get_mut(hole) {
                    *target = entry;
                }
                hole = next;
            }
            next = (next + 1) & self.mask;
            if next == hole {
                break;
            }
        }
        if let Some(place) = self.places.get_mut(hole) {
            *place = EMPTY;
        }
    }

    /// This index's key (per channel, not chosen by any input).
    pub fn key(&self) -> u64 {
        self.key
    }

    /// How many sequences are recorded (test support: a full scan).
    pub fn len(&self) -> usize {
        self.places.iter().filter(|&&place| place != EMPTY).count()
    }

    /// Whether no sequence is recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    struct Model {
        index: SequenceIndex,
        slots: Vec<Option<u64>>,
    }

    impl Model {
        fn new(capacity: u32) -> Self {
            Self {
                index: SequenceIndex::try_new(capacity).unwrap(),
                slots: vec![None; capacity as usize],
            }
        }

        fn insert(&mut self, slot: u32, sequence: u64) -> Result<(), IndexError> {
            let slots = &self.slots;
            self.index.insert(sequence, slot, |s| slots[s as usize])?;
            self.slots[slot as usize] = Some(sequence);
            Ok(())
        }

        fn remove(&mut self, slot: u32) {
            let sequence = self.slots[slot as usize].unwrap();
            let slots = &self.slots;
            self.index.remove(sequence, slot, |s| slots[s as usize]);
            self.slots[slot as usize] = None;
        }

        fn find(&self, sequence: u64) -> Option<u32> {
            self.index.find(sequence, |s| self.slots[s as usize])
        }
    }

    #[test]
    fn duplicates_are_refused_and_removal_keeps_every_other_entry_reachable() {
        let mut model = Model::new(512);
        for slot in 0..512u32 {
            model.insert(slot, u64::from(slot) * 7 + 1).unwrap();
        }
        assert_eq!(model.index.len(), 512);
        assert_eq!(model.insert(0, 8), Err(IndexError::Duplicate));
        // Remove every third entry, then check every survivor is found and every removed one not.
        for slot in (0..512u32).step_by(3) {
            model.remove(slot);
        }
        for slot in 0..512u32 {
            let found = model.find(u64::from(slot) * 7 + 1);
            if slot % 3 == 0 {
                assert_eq!(found, None);
            } else {
                assert_eq!(found, Some(slot));
            }
        }
        // The removed sequences may come back (a restore into a fresh table never does this,
        // but the index itself allows it).
        model.insert(0, 1).unwrap();
        assert_eq!(model.find(1), Some(0));
    }

    #[test]
    fn randomized_against_a_model() {
        let mut model = Model::new(64);
        let mut state = 0x1234_5678_u64;
        let mut next = || {
            state = mix(state);
            state
        };
        // Miri runs some 10^4 times slower: fewer rounds still reach every path there.
        let rounds = if cfg!(miri) { 300 } else { 20_000 };
        for _ in 0..rounds {
            let slot = (next() % 64) as u32;
            match model.slots[slot as usize] {
                Some(_) => model.remove(slot),
                None => {
                    // Small sequence space, so duplicates happen often.
                    let sequence = next() % 96 + 1;
                    let present = model.slots.contains(&Some(sequence));
                    let result = model.insert(slot, sequence);
                    assert_eq!(result.is_err(), present, "{sequence}");
                }
            }
            for (slot, sequence) in model.slots.iter().enumerate() {
                if let Some(sequence) = sequence {
                    assert_eq!(model.find(*sequence), Some(slot as u32));
                }
            }
        }
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "65,536 inserts take hours under Miri; the natively run test covers it"
    )]
    fn a_full_table_at_the_format_limit_fits() {
        let capacity = crate::saved::MAX_IN_FLIGHT_LIMIT;
        let mut model = Model::new(capacity);
        // Sequences a forger might pick: a stride that is a power of two.
        for slot in 0..capacity {
            model.insert(slot, (u64::from(slot) << 20) + 1).unwrap();
        }
        assert_eq!(model.index.len(), capacity as usize);
    }
}
