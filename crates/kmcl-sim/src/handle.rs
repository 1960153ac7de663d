//! Handles as tokens: every `VMBCHANNEL`, `VMBPACKET`, `VMBPACKETCOMPLETION`, interface context and
//! device object the simulator hands out is an integer that encodes (instance id, object sequence
//! number, object type). The simulator never dereferences a handle: it decodes it and looks the
//! object up, so a stale, foreign or garbage handle is detected without undefined behaviour.
//!
//! Layout (64-bit): `instance (24 bits) << 40 | sequence (32 bits) << 8 | tag (8 bits)`. Sequence
//! numbers are never reused within an instance and instance ids never within a process, so a
//! freed handle stays recognisable as freed forever.

use core::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use super::state::Shared;

#[cfg(not(target_pointer_width = "64"))]
compile_error!("the KMCL simulator encodes handles in 64-bit pointers");

/// What a handle names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A `VMBCHANNEL`.
    Channel = 0x11,
    /// A `VMBPACKET`.
    Packet = 0x22,
    /// A `VMBPACKETCOMPLETION`.
    Completion = 0x33,
    /// The `INTERFACE.Context` of a queried table (names the bus).
    Bus = 0x44,
    /// The `PDEVICE_OBJECT` a driver passes to `VmbChannelAllocate`.
    Device = 0x55,
}

impl Kind {
    fn from_tag(tag: u8) -> Option<Kind> {
        match tag {
            0x11 => Some(Kind::Channel),
            0x22 => Some(Kind::Packet),
            0x33 => Some(Kind::Completion),
            0x44 => Some(Kind::Bus),
            0x55 => Some(Kind::Device),
            _ => None,
        }
    }
}

/// A decoded handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Token {
    pub(crate) instance: u32,
    pub(crate) seq: u32,
    pub(crate) kind: Kind,
}

const INSTANCE_BITS: u32 = 24;

/// Encodes a token as the address of a handle.
pub(crate) fn encode(instance: u32, seq: u32, kind: Kind) -> usize {
    ((instance as usize & ((1 << INSTANCE_BITS) - 1)) << 40) | ((seq as usize) << 8) | kind as usize
}

/// Decodes a handle address; `None` if it cannot be a simulator handle (NULL, wrong tag).
pub(crate) fn decode(address: usize) -> Option<Token> {
    let kind = Kind::from_tag((address & 0xFF) as u8)?;
    let instance = (address >> 40) as u32;
    if instance == 0 {
        return None;
    }
    Some(Token {
        instance,
        seq: ((address >> 8) & 0xFFFF_FFFF) as u32,
        kind,
    })
}

/// Makes a pointer-typed handle from a token address (no provenance: it is never dereferenced).
pub(crate) fn to_ptr<T>(address: usize) -> *mut T {
    core::ptr::without_provenance_mut(address)
}

/// The address of a pointer-typed handle.
pub(crate) fn addr<T>(pointer: *mut T) -> usize {
    pointer.addr()
}

static NEXT_INSTANCE: AtomicU32 = AtomicU32::new(1);
static INSTANCES: Mutex<BTreeMap<u32, Weak<Shared>>> = Mutex::new(BTreeMap::new());

/// A fresh instance id: never 0 (the invalid id). Ids wrap after 2^24 - 1 instances; a live
/// instance that old is not expected, and `register` replaces a dead one's entry.
pub(crate) fn next_instance_id() -> u32 {
    loop {
        let id = NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed) & ((1 << INSTANCE_BITS) - 1);
        if id != 0 {
            return id;
        }
    }
}

/// Makes an instance reachable from its handles.
///
/// Ids wrap (`next_instance_id`), so an id can come back while an older instance under it is
/// still alive: the one it replaces stops counting as registered, so no thread's cache
/// (`lookup`) keeps resolving the id to it.
pub(crate) fn register(id: u32, shared: &Arc<Shared>) {
    shared.registered.store(true, Ordering::Release);
    let replaced = INSTANCES
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(id, Arc::downgrade(shared));
    if let Some(old) = replaced.as_ref().and_then(Weak::upgrade)
        && !Arc::ptr_eq(&old, shared)
    {
        old.registered.store(false, Ordering::Release);
    }
}

/// Removes an instance (its handles become unknown).
pub(crate) fn unregister(id: u32) {
    let removed = INSTANCES
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&id);
    if let Some(shared) = removed.as_ref().and_then(Weak::upgrade) {
        shared.registered.store(false, Ordering::Release);
    }
    forget(id);
}

std::thread_local! {
    /// The instance this thread looked up last: every table call resolves a handle, and a thread
    /// almost always talks to one instance, so most lookups skip the global registry's lock, and
    /// [`with_instance`] lends the instance out without touching its reference count.
    ///
    /// A strong reference: the cached instance answers only while it is registered (`unregister`,
    /// and a `register` that replaces it under a reused id, clear the flag), exactly as the
    /// registry would; it is let go by `unregister` on this thread, by this thread's next lookup
    /// that misses the cache, or when the thread exits.
    static LAST: RefCell<Option<(u32, Arc<Shared>)>> = const { RefCell::new(None) };
}

/// The live instance with this id.
pub(crate) fn lookup(id: u32) -> Option<Arc<Shared>> {
    LAST.with(|last| {
        if let Ok(cache) = last.try_borrow()
            && let Some((cached_id, shared)) = &*cache
            && *cached_id == id
            && shared.registered.load(Ordering::Acquire)
        {
            return Some(Arc::clone(shared));
        }
        lookup_registry(id, last)
    })
}

/// Runs `f` on the live instance with this id, lent from this thread's cache when it names the
/// instance (no reference counting); gives `f` back if no live instance has the id. Same answer as
/// [`lookup`].
pub(crate) fn with_instance<R, F: FnOnce(&Shared) -> R>(id: u32, f: F) -> Result<R, F> {
    LAST.with(|last| {
        if let Ok(cache) = last.try_borrow()
            && let Some((cached_id, shared)) = &*cache
            && *cached_id == id
            && shared.registered.load(Ordering::Acquire)
        {
            // The shared borrow of the cache is held while `f` runs: a nested lookup on this
            // thread (a callback inside the call) still reads the cache, and one that misses it
            // asks the registry without caching (`lookup_registry`).
            return Ok(f(shared));
        }
        match lookup_registry(id, last) {
            Some(shared) => Ok(f(&shared)),
            None => Err(f),
        }
    })
}

/// The registry's answer for `id`, remembered in this thread's cache (or, when the registry has no
/// live instance under `id`, the cache forgets an instance that is no longer registered). The
/// cache is left alone while an outer call on this thread is using it.
#[cold]
fn lookup_registry(id: u32, last: &RefCell<Option<(u32, Arc<Shared>)>>) -> Option<Arc<Shared>> {
    let found = INSTANCES
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&id)
        .and_then(Weak::upgrade);
    let evicted = match last.try_borrow_mut() {
        Ok(mut cache) => match &found {
            Some(shared) => cache.replace((id, Arc::clone(shared))),
            None if cache
                .as_ref()
                .is_some_and(|(_, cached)| !cached.registered.load(Ordering::Acquire)) =>
            {
                cache.take()
            }
            None => None,
        },
        Err(_) => None,
    };
    // An evicted instance is dropped here, with the cache no longer borrowed.
    drop(evicted);
    found
}

/// Lets go of this thread's cached instance if it is `id` (on `unregister`).
fn forget(id: u32) {
    let evicted = LAST
        .try_with(|last| match last.try_borrow_mut() {
            Ok(mut cache) if cache.as_ref().is_some_and(|(cached, _)| *cached == id) => {
                cache.take()
            }
            _ => None,
        })
        .ok()
        .flatten();
    drop(evicted);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let a = encode(5, 0xDEAD_BEEF, Kind::Packet);
        assert_eq!(
            decode(a),
            Some(Token {
                instance: 5,
                seq: 0xDEAD_BEEF,
                kind: Kind::Packet
            })
        );
        assert_ne!(a, 0);
        let p: *mut u8 = to_ptr(a);
        assert_eq!(addr(p), a);
    }

    #[test]
    fn garbage_is_not_a_handle() {
        assert_eq!(decode(0), None);
        assert_eq!(decode(0x1000), None);
        // Right tag but instance 0.
        assert_eq!(decode(0x0000_0000_0000_0111), None);
        assert!(lookup(0x00FF_FFFF).is_none());
    }

    // review15: the per-thread cache against the registry when an id is registered again (ids
    // wrap after 2^24 - 1 instances, `next_instance_id`; `register` replaces the entry). The
    // registry answers with the instance registered now; the cache must not answer otherwise.

    /// The cached instance finished (unregistered, dropped); its id is registered again by a new
    /// instance. This thread must find the new instance, as the registry does, not `None`
    /// ("handle of simulator instance N which no longer exists" for a live instance).
    #[test]
    fn review15_reused_id_after_a_dead_cached_instance_finds_the_new_one() {
        let id = next_instance_id();
        let old = Arc::new(Shared::new(id, crate::SimConfig::default()));
        register(id, &old);
        assert!(lookup(id).is_some_and(|s| Arc::ptr_eq(&s, &old)));
        unregister(id);
        drop(old);
        assert!(lookup(id).is_none());
        // The id comes round again (wrap).
        let new = Arc::new(Shared::new(id, crate::SimConfig::default()));
        register(id, &new);
        let registry = INSTANCES
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .and_then(Weak::upgrade);
        assert!(registry.is_some_and(|s| Arc::ptr_eq(&s, &new)));
        assert!(
            lookup(id).is_some_and(|s| Arc::ptr_eq(&s, &new)),
            "the thread-local cache hides the instance the registry holds for this id"
        );
        unregister(id);
    }

    /// The cached instance is still alive and was never unregistered when its id is registered
    /// again (`register` replaced its entry): the registry now names the new instance, so this
    /// thread's lookups must resolve to it too, not to the instance the registry dropped.
    #[test]
    fn review15_reused_id_over_a_live_cached_instance_follows_the_registry() {
        let id = next_instance_id();
        let old = Arc::new(Shared::new(id, crate::SimConfig::default()));
        register(id, &old);
        assert!(lookup(id).is_some_and(|s| Arc::ptr_eq(&s, &old)));
        let new = Arc::new(Shared::new(id, crate::SimConfig::default()));
        register(id, &new);
        assert!(
            lookup(id).is_some_and(|s| Arc::ptr_eq(&s, &new)),
            "the thread-local cache resolves the id to an instance the registry replaced"
        );
        unregister(id);
        drop(old);
    }

    // The cache holds its instance strongly (`with_instance` lends it without reference
    // counting): it must still answer exactly as the registry does, never hold a borrow that a
    // nested lookup trips over, and not keep a finished instance alive on the thread that
    // unregistered it.

    /// An unregistered instance is no longer lent, on this thread or on another one that cached
    /// it, and the unregistering thread lets go of it.
    #[test]
    fn the_cache_lends_only_a_registered_instance_and_unregister_lets_go() {
        let id = next_instance_id();
        let shared = Arc::new(Shared::new(id, crate::SimConfig::default()));
        register(id, &shared);
        assert_eq!(with_instance(id, |s| s.id).ok(), Some(id));
        let (cached, release) = (std::sync::Barrier::new(2), std::sync::Barrier::new(2));
        let other = std::thread::scope(|scope| {
            let worker = scope.spawn(|| {
                assert!(with_instance(id, |_| ()).is_ok());
                cached.wait();
                release.wait();
                (with_instance(id, |_| ()).is_err(), lookup(id).is_none())
            });
            cached.wait();
            unregister(id);
            release.wait();
            worker.join().unwrap_or((false, false))
        });
        assert_eq!(
            other,
            (true, true),
            "another thread's cache answered after unregister"
        );
        assert!(with_instance(id, |_| ()).is_err());
        let weak = Arc::downgrade(&shared);
        drop(shared);
        assert_eq!(
            weak.strong_count(),
            0,
            "this thread's cache kept the instance alive"
        );
    }

    /// A lookup nested inside `with_instance` (a driver callback inside a table call) finds its
    /// instance whether or not the cache names it, while the cache is lent out.
    #[test]
    fn a_lookup_nested_in_a_lent_instance_finds_another_one() {
        let (a, b) = (next_instance_id(), next_instance_id());
        let first = Arc::new(Shared::new(a, crate::SimConfig::default()));
        let second = Arc::new(Shared::new(b, crate::SimConfig::default()));
        register(a, &first);
        register(b, &second);
        let nested = with_instance(a, |outer| {
            let inner = with_instance(b, |s| s.id).ok();
            let again = lookup(a).map(|s| s.id);
            (outer.id, inner, again)
        });
        assert_eq!(nested.ok(), Some((a, Some(b), Some(a))));
        assert_eq!(lookup(b).map(|s| s.id), Some(b));
        unregister(a);
        unregister(b);
    }

    // review2 (sim-speed): the strong cache against thread exit, an unregister from inside a lent
    // call, and a thread that cached an instance another thread finished.

    /// A thread that cached an instance and exits lets go of it (the instance is freed when its
    /// owner drops it).
    #[test]
    fn review2_thread_exit_releases_the_cached_instance() {
        let id = next_instance_id();
        let shared = Arc::new(Shared::new(id, crate::SimConfig::default()));
        register(id, &shared);
        std::thread::scope(|scope| {
            scope
                .spawn(|| assert!(with_instance(id, |_| ()).is_ok()))
                .join()
                .ok();
        });
        unregister(id);
        let weak = Arc::downgrade(&shared);
        drop(shared);
        assert_eq!(weak.strong_count(), 0, "an exited thread's cache kept it");
    }

    /// `unregister` from inside a lent call (the cache is borrowed, `forget` cannot take it):
    /// the instance is no longer answered, by this thread or by a nested lookup, and the next
    /// lookup on the thread lets go of it.
    #[test]
    fn review2_unregister_inside_a_lent_call() {
        let id = next_instance_id();
        let shared = Arc::new(Shared::new(id, crate::SimConfig::default()));
        register(id, &shared);
        assert!(lookup(id).is_some());
        let inner = with_instance(id, |_| {
            unregister(id);
            (with_instance(id, |_| ()).is_err(), lookup(id).is_none())
        });
        assert_eq!(inner.ok(), Some((true, true)));
        assert!(with_instance(id, |_| ()).is_err());
        assert!(lookup(id).is_none());
        let weak = Arc::downgrade(&shared);
        drop(shared);
        assert_eq!(weak.strong_count(), 0, "kept after the next lookup");
    }

    /// Another thread cached an instance that this thread finished: it is kept alive there until
    /// that thread looks anything up again (or exits), and is never answered meanwhile.
    #[test]
    fn review2_a_finished_instance_cached_elsewhere_is_kept_but_not_answered() {
        let id = next_instance_id();
        let shared = Arc::new(Shared::new(id, crate::SimConfig::default()));
        register(id, &shared);
        let weak = Arc::downgrade(&shared);
        let (cached, finished, looked) = (
            std::sync::Barrier::new(2),
            std::sync::Barrier::new(2),
            std::sync::Barrier::new(2),
        );
        let kept = std::thread::scope(|scope| {
            let worker = scope.spawn(|| {
                assert!(with_instance(id, |_| ()).is_ok());
                cached.wait();
                finished.wait();
                // Kept alive by this thread's cache alone, until this lookup.
                let alive_before = weak.strong_count();
                let refused = with_instance(id, |_| ()).is_err();
                let alive_after = weak.strong_count();
                looked.wait();
                (alive_before, refused, alive_after)
            });
            cached.wait();
            unregister(id);
            drop(shared);
            finished.wait();
            looked.wait();
            worker.join().unwrap_or((9, false, 9))
        });
        assert_eq!(kept, (1, true, 0));
    }
}
