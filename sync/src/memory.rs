//! An in-memory [`CaseStore`] for deterministic tests and simulations.
//!
//! It behaves like the real store where it matters to the protocol:
//! commits merge into the stored document (so concurrent local edits are
//! never overwritten), every change gets a new update sequence number, and
//! a validator can refuse documents.
//!
//! Tests may edit `docs` directly; update sequence numbers are assigned
//! lazily, the next time the store is asked, to every document whose heads
//! moved since it was last seen.

use std::collections::BTreeMap;

use automerge::{Automerge, ChangeHash};

use crate::store::{CaseStore, ChangedCase, CommitError, CommitOutcome, ListedUpto, StoreFault};
use crate::wire::{CaseId, StoreId};

/// Decides whether a merged document is acceptable; `Err` explains why not.
pub type Validator = fn(&Automerge) -> Result<(), String>;

/// One node's documents, its per-peer sync states and cursors.
#[derive(Default)]
pub struct MemoryNode {
    /// The node's cases.
    pub docs: BTreeMap<CaseId, Automerge>,
    /// Persisted sync state per (peer, case).
    pub sync_states: BTreeMap<(String, CaseId), Vec<u8>>,
    /// Persisted cursor per peer.
    pub cursors: BTreeMap<String, (StoreId, u64)>,
    /// Per peer, how far it had seen this store at the last convergence.
    pub listed: BTreeMap<String, ListedUpto>,
    /// This store's id; all zero unless a test sets it (set distinct ids
    /// when nodes should tell each other's stores apart).
    pub store_id: StoreId,
    /// Optional validation of merged documents.
    pub validator: Option<Validator>,
    /// When set, the next commit fails with a storage fault (simulates a
    /// full disk).
    pub fail_next_commit: bool,
    /// Commits that succeeded, for assertions.
    pub commits: u64,
    /// Update sequence bookkeeping; leave it at its default.
    pub seqs: SeqTracker,
}

/// Lazily assigned update sequence numbers (see the module docs).
#[derive(Default)]
pub struct SeqTracker {
    /// Heads last seen per case and the sequence number given to them.
    seen: BTreeMap<CaseId, (Vec<ChangeHash>, u64)>,
    /// Highest sequence number given out.
    seq: u64,
}

impl MemoryNode {
    /// A node with the given store id.
    pub fn with_store_id(store_id: StoreId) -> Self {
        MemoryNode {
            store_id,
            ..MemoryNode::default()
        }
    }

    /// The store as seen by a session with `peer`.
    pub fn for_peer<'a>(&'a mut self, peer: &str) -> PeerView<'a> {
        PeerView {
            node: self,
            peer: peer.to_string(),
        }
    }

    /// Gives a new sequence number to every document whose heads moved.
    fn refresh(&mut self) {
        let t = &mut self.seqs;
        for (id, doc) in &self.docs {
            let heads = doc.get_heads();
            let moved = t.seen.get(id).map(|(h, _)| h != &heads).unwrap_or(true);
            if moved {
                t.seq += 1;
                t.seen.insert(id.clone(), (heads, t.seq));
            }
        }
    }
}

/// A [`MemoryNode`] narrowed to one peer.
pub struct PeerView<'a> {
    node: &'a mut MemoryNode,
    peer: String,
}

impl CaseStore for PeerView<'_> {
    fn store_id(&mut self) -> Result<StoreId, StoreFault> {
        Ok(self.node.store_id)
    }

    fn current_seq(&mut self) -> Result<u64, StoreFault> {
        self.node.refresh();
        Ok(self.node.seqs.seq)
    }

    fn changes_page(
        &mut self,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<(Vec<ChangedCase>, u64), StoreFault> {
        self.node.refresh();
        let mut listed: Vec<ChangedCase> = self
            .node
            .seqs
            .seen
            .iter()
            .filter(|(_, (_, seq))| *seq > after && *seq <= upto)
            .map(|(id, (heads, seq))| ChangedCase {
                seq: *seq,
                case: id.clone(),
                heads: heads.clone(),
            })
            .collect();
        listed.sort_by_key(|c| c.seq);
        listed.truncate(limit);
        let last = if listed.len() == limit {
            listed.last().map(|c| c.seq).unwrap_or(upto)
        } else {
            upto
        };
        Ok((listed, last))
    }

    fn heads(&mut self, case: &CaseId) -> Result<Option<Vec<ChangeHash>>, StoreFault> {
        Ok(self.node.docs.get(case).map(|d| d.get_heads()))
    }

    fn peer_cursor(&mut self) -> Result<Option<(StoreId, u64)>, StoreFault> {
        Ok(self.node.cursors.get(&self.peer).copied())
    }

    fn save_peer_cursor(&mut self, store_id: StoreId, seq: u64) -> Result<(), StoreFault> {
        self.node.cursors.insert(self.peer.clone(), (store_id, seq));
        Ok(())
    }

    fn listed_upto(&mut self) -> Result<Option<ListedUpto>, StoreFault> {
        Ok(self.node.listed.get(&self.peer).copied())
    }

    fn save_listed_upto(&mut self, upto: Option<ListedUpto>) -> Result<(), StoreFault> {
        match upto {
            Some(seq) => self.node.listed.insert(self.peer.clone(), seq),
            None => self.node.listed.remove(&self.peer),
        };
        Ok(())
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
