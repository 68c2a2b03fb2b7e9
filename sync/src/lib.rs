//! The fieldcase sync protocol as a pure state machine.
//!
//! This crate is shaped like `quinn-proto`: it turns bytes in into bytes
//! out and storage calls, and nothing else. It has no tokio, no quinn, no
//! SQLite and no clock; a test over the manifest enforces that. Storage is
//! reached only through the [`store::CaseStore`] port.
//!
//! - [`frame`]: length-prefixed framing with a size limit.
//! - [`wire`]: the messages and their bounded binary encoding.
//! - [`inventory`]: digests that find which cases differ.
//! - [`session`]: one sync session with one peer.
//! - [`memory`]: an in-memory store for deterministic tests.

pub mod frame;
pub mod inventory;
pub mod memory;
pub mod session;
pub mod store;
pub mod wire;

pub use session::{Event, Phase, Session, SessionConfig, SessionError, SessionStats};
pub use store::{CaseStore, CommitError, CommitOutcome, StoreFault};
pub use wire::{CaseId, Message, PROTOCOL_VERSION};
