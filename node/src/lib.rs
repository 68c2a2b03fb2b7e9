//! fieldcase node: everything between the pure sync protocol and a person.
//!
//! - [`case`]: the case model (procedures, derived status, conflicts).
//! - [`store`]: SQLite storage of case documents, peers and sync state.
//! - [`identity`]: node keys, node IDs and the mutual-TLS configuration.
//! - [`share`]: the one place deciding which cases a peer may see.
//! - [`net`]: the QUIC transport that drives `fieldcase_sync` sessions.
//! - [`notify`]: cross-process "a case changed" notifications for live push.
//! - [`blobs`]: content-addressed attachment bytes beside the database.
//! - [`transfer`]: attachment streams over QUIC, resumable and verified.
//! - [`config`]: per-node settings (blob size limit, fetch policy).
//! - [`congestion`]: the congestion controller for lossy village links.
//! - [`bulk`]: CSV and JSON Lines import and export of cases.
//! - [`node`]: the facade tying them together for the CLI and tests.

pub mod attach;
pub mod blobs;
pub mod bulk;
pub mod case;
pub mod config;
pub mod congestion;
pub mod identity;
pub mod net;
pub mod node;
pub mod notify;
pub mod share;
pub mod store;
pub mod transfer;
