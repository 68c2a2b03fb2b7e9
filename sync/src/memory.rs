//! An in-memory [`CaseStore`] for deterministic tests and simulations.
//!
//! It behaves like the real store where it matters to the protocol:
//! commits merge into the stored document (so concurrent local edits are
//! never overwritten), and a validator can refuse documents.

use std::collections::BTreeMap;

use automerge::{Automerge, ChangeHash};

use crate::store::{CaseStore, CommitError, CommitOutcome, StoreFault};
use crate::wire::CaseId;

/// Decides whether a merged document is acceptable; `Err` explains why not.
pub type Validator = fn(&Automerge) -> Result<(), String>;

/// One node's documents and its per-peer sync states.
#[derive(Default)]
pub struct MemoryNode {
    /// The node's cases.
    pub docs: BTreeMap<CaseId, Automerge>,
    /// Persisted sync state per (peer, case).
    pub sync_states: BTreeMap<(String, CaseId), Vec<u8>>,
    /// Optional validation of merged documents.
    pub validator: Option<Validator>,
    /// When set, the next commit fails with a storage fault (simulates a
    /// full disk).
    pub fail_next_commit: bool,
    /// Commits that succeeded, for assertions.
    pub commits: u64,
}

impl MemoryNode {
    /// The store as seen by a session with `peer`.
    pub fn for_peer<'a>(&'a mut self, peer: &str) -> PeerView<'a> {
        PeerView {
            node: self,
            peer: peer.to_string(),
        }
    }
}

/// A [`MemoryNode`] narrowed to one peer.
pub struct PeerView<'a> {
    node: &'a mut MemoryNode,
    peer: String,
}

impl CaseStore for PeerView<'_> {
    fn inventory(&mut self) -> Result<Vec<(CaseId, Vec<ChangeHash>)>, StoreFault> {
        Ok(self
            .node
            .docs
            .iter()
            .map(|(id, d)| (id.clone(), d.get_heads()))
            .collect())
    }

    fn load(&mut self, case: &CaseId) -> Result<Option<Automerge>, StoreFault> {
        Ok(self.node.docs.get(case).cloned())
    }

    fn load_sync_state(&mut self, case: &CaseId) -> Result<Option<Vec<u8>>, StoreFault> {
        Ok(self
            .node
            .sync_states
            .get(&(self.peer.clone(), case.clone()))
            .cloned())
    }

    fn save_sync_state(&mut self, case: &CaseId, state: &[u8]) -> Result<(), StoreFault> {
        self.node
            .sync_states
            .insert((self.peer.clone(), case.clone()), state.to_vec());
        Ok(())
    }

    fn commit(
        &mut self,
        case: &CaseId,
        doc: &Automerge,
        sync_state: &[u8],
    ) -> Result<CommitOutcome, CommitError> {
        if self.node.fail_next_commit {
            self.node.fail_next_commit = false;
            return Err(StoreFault("simulated disk full".into()).into());
        }
        let created = !self.node.docs.contains_key(case);
        let mut merged = self.node.docs.get(case).cloned().unwrap_or_default();
        let before = merged.get_heads();
        merged
            .merge(&mut doc.clone())
            .map_err(|e| CommitError::Rejected(e.to_string()))?;
        if let Some(validate) = self.node.validator {
            validate(&merged).map_err(CommitError::Rejected)?;
        }
        let changed = merged.get_heads() != before;
        self.node.docs.insert(case.clone(), merged);
        self.node
            .sync_states
            .insert((self.peer.clone(), case.clone()), sync_state.to_vec());
        self.node.commits += 1;
        Ok(CommitOutcome {
            changed,
            created,
            new_conflicts: 0,
        })
    }
}
