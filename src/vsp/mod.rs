//! The VMBus service provider: guest protocol, delivery table, save/restore callbacks, control.
//!
//! Everything here is platform-neutral and `forbid(unsafe_code)`: it reaches KMCL only through
//! the safe types of [`crate::kmcl`], and it persists state only through [`crate::saved`].
#![forbid(unsafe_code)]

pub mod channel;
pub mod control;
pub mod lock;
pub mod protocol;
pub mod save_protocol;
pub mod sequence_index;
pub mod table;

pub use channel::{
    ChannelConfig, Phase, PostRequest, RestoreProgress, SaveRecord, Statistics, Vsp, VspChannel,
};
pub use lock::DispatchLock;
pub use table::{DeliveryTable, Outcome, OutcomeKind};
