//! The simulator's `KMCL_SERVER_INTERFACE_V1`: 55 global entry points with the table's exact ABI
//! (`kmcl_fn!`), plus `InterfaceReference` / `InterfaceDereference`.
//!
//! Each entry point: catches any simulator panic (a panic must not unwind out of an `extern` fn),
//! decodes its handle (never dereferencing it), copies driver buffers in or out after checking
//! them, and calls the safe operation on the instance the handle belongs to (`state`).
//!
//! The entry points are declared once, in table order, in `entries.rs`; [`kmcl_entry_points!`]
//! turns that declaration into the [`KmclCall`] enum, the `extern` functions and the filled table.

use core::ffi::c_void;
use core::panic::AssertUnwindSafe;
use std::format;
use std::string::String;
use std::sync::Arc;
use std::vec::Vec;

use crate::handle::{self, Kind};
use crate::irql;
use crate::state::{Channel, DriverPtr, Shared};
use crate::verifier::{self, Violation, ViolationKind};
use kmcl::NtStatus;
use kmcl_sys::kmcl_fn;
use kmcl_sys::*;

// ---- helpers -----------------------------------------------------------------------------------

/// Runs an entry point's body, turning a simulator panic into a recorded violation and `neutral`.
fn guard<R>(call: KmclCall, neutral: R, body: impl FnOnce() -> R) -> R {
    match std::panic::catch_unwind(AssertUnwindSafe(body)) {
        Ok(result) => result,
        Err(_) => {
            orphan(
                call,
                ViolationKind::InternalError,
                String::from("panic inside the simulator (a simulator bug)"),
            );
            neutral
        }
    }
}

/// Records a violation that names no live instance: on the instance whose callback this thread is
/// running, else on the thread's unattributed list.
fn orphan(call: KmclCall, kind: ViolationKind, detail: String) {
    if let Some(shared) = irql::top_frame().and_then(|f| handle::lookup(f.instance)) {
        shared.lock().violation(kind, Some(call), detail);
        return;
    }
    verifier::record_unattributed(Violation {
        kind,
        call: Some(call),
        detail,
    });
}

/// Decodes a handle of the expected kind to its instance and sequence number; records a violation
/// and returns `None` for NULL, garbage, a dead instance, or the wrong kind.
fn resolve(call: KmclCall, address: usize, kind: Kind) -> Option<(Arc<Shared>, u32)> {
    let Some(token) = handle::decode(address) else {
        orphan(
            call,
            ViolationKind::InvalidHandle,
            format!("{kind:?} handle {address:#x} was never issued by a simulator"),
        );
        return None;
    };
    let Some(shared) = handle::lookup(token.instance) else {
        orphan(
            call,
            ViolationKind::StaleHandle,
            format!(
                "{kind:?} handle of simulator instance {} which no longer exists",
                token.instance
            ),
        );
        return None;
    };
    if token.kind != kind {
        shared.lock().violation(
            ViolationKind::WrongHandleType,
            Some(call),
            format!("expected a {kind:?} handle, got a {:?} handle", token.kind),
        );
        return None;
    }
    Some((shared, token.seq))
}

/// [`resolve`], then `body` on the instance and sequence number, without reference counting the
/// instance (it is lent from this thread's cache, `handle::with_instance`). `None` after the same
/// violation `resolve` records for NULL, garbage, a dead instance or the wrong kind.
fn on_handle<R>(
    call: KmclCall,
    address: usize,
    kind: Kind,
    body: impl FnOnce(&Shared, u32) -> R,
) -> Option<R> {
    if let Some(token) = handle::decode(address).filter(|t| t.kind == kind) {
        match handle::with_instance(token.instance, |shared| body(shared, token.seq)) {
            Ok(result) => Some(result),
            // No live instance: `resolve` records why (or finds one registered since).
            Err(body) => resolve(call, address, kind).map(|(shared, _)| body(&shared)),
        }
    } else {
        // Garbage, or the wrong kind: `resolve` runs the checks in its order and records why.
        resolve(call, address, kind).map(|(shared, seq)| body(&shared, seq))
    }
}

/// [`on_handle`] for a channel handle.
fn on_channel<R>(
    call: KmclCall,
    ch: VMBCHANNEL,
    body: impl FnOnce(&Shared, u32) -> R,
) -> Option<R> {
    on_handle(call, handle::addr(ch), Kind::Channel, body)
}

/// [`on_handle`] for a packet handle.
fn on_packet<R>(call: KmclCall, p: VMBPACKET, body: impl FnOnce(&Shared, u32) -> R) -> Option<R> {
    on_handle(call, handle::addr(p), Kind::Packet, body)
}

fn channel(call: KmclCall, ch: VMBCHANNEL) -> Option<(Arc<Shared>, u32)> {
    resolve(call, handle::addr(ch), Kind::Channel)
}

fn packet(call: KmclCall, p: VMBPACKET) -> Option<(Arc<Shared>, u32)> {
    resolve(call, handle::addr(p), Kind::Packet)
}

fn completion(call: KmclCall, pc: VMBPACKETCOMPLETION) -> Option<(Arc<Shared>, u32)> {
    resolve(call, handle::addr(pc), Kind::Completion)
}

fn bad_argument(shared: &Shared, call: KmclCall, detail: &str) {
    shared
        .lock()
        .violation(ViolationKind::InvalidArgument, Some(call), detail);
}

/// Copies `len` bytes in from a driver buffer (`_In_reads_bytes_(len)`); `None` (and a violation)
/// for NULL with a nonzero length.
fn copy_in(shared: &Shared, call: KmclCall, ptr: *const c_void, len: u32) -> Option<Vec<u8>> {
    copy_in_as(shared, call, ptr, len, <[u8]>::to_vec)
}

/// [`copy_in`] into the owned form `copy` makes of the bytes (a `Vec`, an `Arc<[u8]>`): `copy`
/// cannot keep a borrow of the driver's buffer (its result does not depend on the borrow).
fn copy_in_as<T>(
    shared: &Shared,
    call: KmclCall,
    ptr: *const c_void,
    len: u32,
    copy: impl for<'a> FnOnce(&'a [u8]) -> T,
) -> Option<T> {
    if len == 0 {
        return Some(copy(&[]));
    }
    if ptr.is_null() {
        bad_argument(shared, call, "NULL buffer with a nonzero length");
        return None;
    }
    // The bytes are copied (by `copy`, whose result cannot borrow them) before returning.
    // SAFETY: the KMCL contract (`_In_reads_bytes_(len)`) is that the caller passes `len` readable,
    // initialized bytes at `ptr` for the duration of the call; `ptr` was checked non-NULL and a
    // byte slice has no alignment requirement.
    let bytes = unsafe { core::slice::from_raw_parts(ptr.cast::<u8>(), len as usize) };
    Some(copy(bytes))
}

/// A reference-counted copy of `bytes` (for [`copy_in_as`]).
fn shared_copy(bytes: &[u8]) -> Arc<[u8]> {
    Arc::from(bytes)
}

/// Writes an out parameter if the pointer is not NULL; returns whether it wrote.
fn write_out<T>(ptr: *mut T, value: T) -> bool {
    if ptr.is_null() {
        return false;
    }
    // SAFETY: the KMCL contract (`_Out_`) is that a non-NULL out pointer designates writable
    // storage for one `T` for the duration of the call; `write_unaligned` needs no alignment.
    unsafe { ptr.write_unaligned(value) };
    true
}

fn unmodelled(shared: &Shared, call: KmclCall, what: &str) {
    shared.unmodelled(
        call,
        ViolationKind::Unmodelled,
        &format!("{what} is not modelled by the simulator"),
    );
}

fn client_only(shared: &Shared, call: KmclCall) {
    shared.unmodelled(
        call,
        ViolationKind::ClientOnly,
        "client-only call on a server channel (docs/kmcl-bindings.md §R2)",
    );
}

/// Why the simulator refuses a slot outright.
enum Refusal {
    /// A client-only call made on a server channel (docs/kmcl-bindings.md §R2).
    ClientOnly,
    /// A feature the simulator does not model (named).
    Unmodelled(&'static str),
}

/// The body of a refused slot: records the refusal on the instance `found` names (none is recorded
/// for a bad handle beyond the lookup's own violation) and returns `result`.
fn refuse<R>(found: Option<(Arc<Shared>, u32)>, call: KmclCall, why: Refusal, result: R) -> R {
    if let Some((shared, _)) = found {
        match why {
            Refusal::ClientOnly => client_only(&shared, call),
            Refusal::Unmodelled(what) => unmodelled(&shared, call, what),
        }
    }
    result
}

/// Runs `op` on `len` bytes of the driver's `buffer`, read in place (not copied): for a call that
/// runs no driver code while `op` reads them, so the driver has no way to change them under the
/// simulator without breaking `_In_` itself. `STATUS_INVALID_PARAMETER_2` (and a violation) for
/// NULL with a nonzero length.
fn with_bytes_in_place(
    shared: &Shared,
    call: KmclCall,
    buffer: *const c_void,
    len: u32,
    op: impl FnOnce(&[u8]) -> NtStatus,
) -> NtStatus {
    if len == 0 {
        return op(&[]);
    }
    if buffer.is_null() {
        bad_argument(shared, call, "NULL buffer with a nonzero length");
        return NtStatus::INVALID_PARAMETER_2;
    }
    // The slice is only lent to `op` (it cannot outlive this call), and `op` runs no driver code.
    // SAFETY: the KMCL contract (`_In_reads_bytes_(len)`) is that the caller passes `len` readable,
    // initialized bytes at `buffer` that stay unchanged for the duration of the call; `buffer` was
    // checked non-NULL and a byte slice has no alignment requirement.
    let bytes = unsafe { core::slice::from_raw_parts(buffer.cast::<u8>(), len as usize) };
    op(bytes)
}

/// The body of a channel initialization call (`…InitSet…`): runs `apply` on the channel's settings
/// if the channel is live and in a state that accepts initialization (`Shared::init_call`);
/// `STATUS_INVALID_PARAMETER_1` for a bad handle.
fn init(
    found: Option<(Arc<Shared>, u32)>,
    call: KmclCall,
    apply: impl FnOnce(&mut Channel, &mut Vec<(ViolationKind, String)>) -> NtStatus,
) -> NtStatus {
    match found {
        Some((shared, seq)) => shared.init_call(seq, call, apply),
        None => NtStatus::INVALID_PARAMETER_1,
    }
}

// ---- INTERFACE header ----------------------------------------------------------------------------

kmcl_fn! {
    unsafe fn interface_reference(context: PVOID) {
        guard(KmclCall::ChannelAllocate, (), || {
            if let Some((shared, _)) = resolve_bus(context) {
                shared.interface_ref(1);
            }
        });
    }
}

kmcl_fn! {
    unsafe fn interface_dereference(context: PVOID) {
        guard(KmclCall::ChannelAllocate, (), || {
            if let Some((shared, _)) = resolve_bus(context) {
                shared.interface_ref(-1);
            }
        });
    }
}

fn resolve_bus(context: PVOID) -> Option<(Arc<Shared>, u32)> {
    let address = handle::addr(context);
    let token = handle::decode(address).filter(|t| t.kind == Kind::Bus);
    let Some(shared) = token.and_then(|t| handle::lookup(t.instance)) else {
        verifier::record_unattributed(Violation {
            kind: ViolationKind::InvalidHandle,
            call: None,
            detail: format!("interface Context {address:#x} is not a live simulator bus"),
        });
        return None;
    };
    Some((shared, 0))
}

/// Reads a `UNICODE_STRING` the driver passed; `Err` describes what is wrong with it.
fn read_unicode(name: *const UNICODE_STRING) -> Result<String, &'static str> {
    if name.is_null() {
        return Err("Name is NULL");
    }
    // SAFETY: the KMCL contract (`PCUNICODE_STRING`, `_In_`) is that a non-NULL `name` points to a
    // readable UNICODE_STRING for the duration of the call; read_unaligned needs no alignment.
    let us = unsafe { name.read_unaligned() };
    if us.Length % 2 != 0 || us.Length > us.MaximumLength {
        return Err("UNICODE_STRING Length is odd or exceeds MaximumLength");
    }
    if us.Length == 0 {
        return Ok(String::new());
    }
    if us.Buffer.is_null() || !us.Buffer.is_aligned() {
        return Err("UNICODE_STRING Buffer is NULL or misaligned");
    }
    // SAFETY: a valid UNICODE_STRING's `Buffer` holds `Length` bytes (`Length / 2` UTF-16 units)
    // of readable memory; it was checked non-NULL and 2-byte aligned. The units are copied out.
    let units = unsafe { core::slice::from_raw_parts(us.Buffer, usize::from(us.Length / 2)) };
    Ok(String::from_utf16_lossy(units))
}

// ---- the table slots ------------------------------------------------------------------------------

/// Expands the slot declaration in `entries.rs` (client V1 slots, then server-only slots, each in
/// table order) into:
///
/// * [`KmclCall`], one variant per slot, with `COUNT` and `ALL` (the slot order);
/// * one `kmcl_fn!` entry point per slot, whose body runs under [`guard`] with the slot's
///   `KmclCall` bound to the name the entry gives (`|call|`) and the declared neutral value
///   returned if the simulator panics;
/// * `server_table`, the filled `KMCL_SERVER_INTERFACE_V1` (a struct literal: a slot missing from
///   the declaration does not compile).
macro_rules! kmcl_entry_points {
    (
        client { $(
            $c_field:ident => $c_call:ident :
            fn $c_name:ident ( $($c_arg:ident : $c_ty:ty),* $(,)? ) $(-> $c_ret:ty)?,
            neutral $c_neutral:expr,
            |$c_var:ident| $c_body:expr;
        )* }
        server { $(
            $s_field:ident => $s_call:ident :
            fn $s_name:ident ( $($s_arg:ident : $s_ty:ty),* $(,)? ) $(-> $s_ret:ty)?,
            neutral $s_neutral:expr,
            |$s_var:ident| $s_body:expr;
        )* }
    ) => {
        /// Every slot of `KMCL_SERVER_INTERFACE_V1`, in table order (docs/kmcl-bindings.md §R1).
        ///
        /// Used to count calls per kind, to aim faults at the k-th call of a kind, and to name the
        /// call a [`Violation`](crate::Violation) was recorded in.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[allow(missing_docs)] // one variant per table slot, named after the slot without `Vmb`
        pub enum KmclCall {
            $($c_call,)*
            $($s_call,)*
        }

        impl KmclCall {
            /// Number of table slots (41 client V1 + 14 server-only).
            pub const COUNT: usize = [$(KmclCall::$c_call,)* $(KmclCall::$s_call,)*].len();

            /// Every slot, in table order.
            pub const ALL: [KmclCall; Self::COUNT] = [$(KmclCall::$c_call,)* $(KmclCall::$s_call,)*];
        }

        $(kmcl_entry_points!(@entry $c_name ($($c_arg: $c_ty),*) $(-> $c_ret)?;
            $c_call, $c_neutral, $c_var, $c_body);)*
        $(kmcl_entry_points!(@entry $s_name ($($s_arg: $s_ty),*) $(-> $s_ret)?;
            $s_call, $s_neutral, $s_var, $s_body);)*

        /// The filled server table for a bus whose context token is `context`.
        pub(crate) fn server_table(context: usize) -> KMCL_SERVER_INTERFACE_V1 {
            KMCL_SERVER_INTERFACE_V1 {
                Client: KMCL_CLIENT_INTERFACE_V1 {
                    Interface: INTERFACE {
                        Size: core::mem::size_of::<KMCL_SERVER_INTERFACE_V1>() as u16,
                        Version: crate::SIM_KMCL_SERVER_INTERFACE_VERSION,
                        Context: handle::to_ptr(context),
                        InterfaceReference: Some(interface_reference),
                        InterfaceDereference: Some(interface_dereference),
                    },
                    $($c_field: Some($c_name),)*
                },
                Server: KMCL_SERVER_ONLY_METHODS {
                    $($s_field: Some($s_name),)*
                },
            }
        }
    };
    (@entry $name:ident ($($arg:ident: $ty:ty),*) $(-> $ret:ty)?;
        $call:ident, $neutral:expr, $var:ident, $body:expr) => {
        kmcl_fn! {
            unsafe fn $name($($arg: $ty),*) $(-> $ret)? {
                let $var = KmclCall::$call;
                guard($var, $neutral, || $body)
            }
        }
    };
}

mod entries;

pub use entries::KmclCall;
pub(crate) use entries::server_table;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_simulator_panic_becomes_a_violation_and_the_neutral_value() {
        let status = guard(KmclCall::PacketSend, NtStatus::INVALID_PARAMETER, || {
            panic!("simulated simulator bug")
        });
        assert_eq!(status, NtStatus::INVALID_PARAMETER);
        let violations = verifier::take_unattributed_violations();
        assert_eq!(violations.len(), 1);
        assert_eq!(violations[0].kind, ViolationKind::InternalError);
        assert_eq!(violations[0].call, Some(KmclCall::PacketSend));
    }

    #[test]
    fn the_table_has_every_slot() {
        let table = server_table(handle::encode(1, 0, Kind::Bus));
        assert!(!std::format!("{table:?}").contains("None"));
        assert_eq!(usize::from(table.Client.Interface.Size), 0x1D8);
    }
}
