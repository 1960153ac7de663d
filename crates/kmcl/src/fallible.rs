//! Fallible heap allocation for kernel paths.
//!
//! Stable Rust's `Box::new` and `Vec::push` abort the process when the allocator fails; in a driver
//! an abort is a bugcheck. Everything on a runtime path allocates through here (or through
//! `Vec::try_reserve*` directly), so an exhausted pool becomes `STATUS_INSUFFICIENT_RESOURCES`.
#![forbid(unsafe_code)]

use alloc::vec::Vec;
use core::ops::{Deref, DerefMut};

/// The allocator refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocError;

/// A heap-allocated `T` whose allocation could fail without aborting.
///
/// It is a one-element `Vec` under the hood: `try_reserve_exact` is the stable fallible
/// allocation primitive, and a `Vec` that is never pushed to again never moves its element, so
/// the address of the value is stable for the box's lifetime (the channel context pointer relies
/// on that).
pub struct FallibleBox<T> {
    // INVARIANT: exactly one element, and the vector is never grown after construction.
    storage: Vec<T>,
}

impl<T> FallibleBox<T> {
    /// Moves `value` to the heap, or gives it back with the error if the allocation fails.
    pub fn try_new(value: T) -> Result<Self, (AllocError, T)> {
        let mut storage = Vec::new();
        if storage.try_reserve_exact(1).is_err() {
            return Err((AllocError, value));
        }
        // Capacity is reserved, so this push cannot allocate.
        storage.push(value);
        Ok(Self { storage })
    }
}

impl<T> Deref for FallibleBox<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // INVARIANT: `storage` holds exactly one element.
        &self.storage[0]
    }
}

impl<T> DerefMut for FallibleBox<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.storage[0]
    }
}

/// Builds a `Vec` of `len` clones of `value`, failing instead of aborting if memory is short.
pub fn try_vec_filled<T: Clone>(len: usize, value: T) -> Result<Vec<T>, AllocError> {
    let mut vec = Vec::new();
    vec.try_reserve_exact(len).map_err(|_| AllocError)?;
    vec.resize(len, value);
    Ok(vec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn box_keeps_its_address() {
        let boxed = FallibleBox::try_new([7u64; 4]).map_err(|(e, _)| e).unwrap();
        let before: *const [u64; 4] = &*boxed;
        let moved = boxed;
        assert_eq!(before, &*moved as *const [u64; 4]);
        assert_eq!(moved[3], 7);
    }

    #[test]
    fn filled_vec_has_exact_length() {
        let v = try_vec_filled(5, 1u8).unwrap();
        assert_eq!(v.len(), 5);
        assert!(try_vec_filled(usize::MAX, 0u8).is_err());
    }
}
