//! The storage port: what a session asks of the node's storage.
//!
//! `sync` never touches disk itself. The node implements [`CaseStore`] over
//! SQLite; tests implement it in memory ([`crate::memory`]). Every method
//! returns a `Result`, because a write that failed must never be reported
//! to the peer as done.

use automerge::{Automerge, ChangeHash};
use thiserror::Error;

use crate::wire::CaseId;

/// Local storage failed (disk full, I/O error, corrupt file). The session
/// stops and the user is told; the peer did nothing wrong.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{0}")]
pub struct StoreFault(pub String);

/// Why a commit of received changes did not happen.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CommitError {
    /// The merged document would not be a valid case: the peer sent
    /// something invalid, and nothing was written.
    #[error("rejected: {0}")]
    Rejected(String),
    /// Local storage failed.
    #[error(transparent)]
    Fault(#[from] StoreFault),
}

/// What a successful commit changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitOutcome {
    /// The stored heads moved (new changes were merged).
    pub changed: bool,
    /// The case did not exist locally before.
    pub created: bool,
    /// Conflicts the merge introduced that were not there before.
    pub new_conflicts: u32,
}

/// The storage a session works against, already narrowed to one peer:
/// `inventory` lists only the cases shared with that peer, and the sync
/// state read and written is that peer's.
pub trait CaseStore {
    /// Every case shared with this peer, with its current heads.
    fn inventory(&mut self) -> Result<Vec<(CaseId, Vec<ChangeHash>)>, StoreFault>;
    /// The current document of a case shared with this peer, if any.
    fn load(&mut self, case: &CaseId) -> Result<Option<Automerge>, StoreFault>;
    /// The persisted Automerge sync state for this peer and case.
    fn load_sync_state(&mut self, case: &CaseId) -> Result<Option<Vec<u8>>, StoreFault>;
    /// Persists the sync state when it moved without new data arriving.
    fn save_sync_state(&mut self, case: &CaseId, state: &[u8]) -> Result<(), StoreFault>;
    /// Durably merges `doc` (which holds the received changes) into the
    /// stored case and saves `sync_state` in the same transaction, so the
    /// sync marker never runs ahead of the data it covers. Returns only
    /// after the commit.
    fn commit(
        &mut self,
        case: &CaseId,
        doc: &Automerge,
        sync_state: &[u8],
    ) -> Result<CommitOutcome, CommitError>;
}
