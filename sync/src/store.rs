//! The storage port: what a session asks of the node's storage.
//!
//! `sync` never touches disk itself. The node implements [`CaseStore`] over
//! SQLite; tests implement it in memory ([`crate::memory`]). Every method
//! returns a `Result`, because a write that failed must never be reported
//! to the peer as done.

use automerge::{Automerge, ChangeHash};
use thiserror::Error;

use crate::wire::{CaseId, StoreId};

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

/// A case the peer sent whole (see [`CaseStore::adopt_batch`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WholeDoc {
    /// The case.
    pub case: CaseId,
    /// Its saved bytes, as received.
    pub saved: Vec<u8>,
}

/// What became of one [`WholeDoc`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Adopted {
    /// Committed.
    Stored(CommitOutcome),
    /// Not a usable document; nothing was written. The session falls back
    /// to an Automerge exchange for the case.
    Unusable,
}

/// Loads a document received whole, or `None` if it is not usable: it
/// does not load, is empty, or holds changes whose dependencies are
/// missing (those would load into Automerge's queue, be stored with the
/// bytes and never apply).
pub fn load_whole(saved: &[u8]) -> Option<Automerge> {
    if saved.is_empty() {
        return None;
    }
    let doc = Automerge::load(saved).ok()?;
    let usable =
        !doc.get_heads().is_empty() && automerge::ReadDoc::get_missing_deps(&doc, &[]).is_empty();
    usable.then_some(doc)
}

/// The Automerge sync state stored with a case received whole: both sides
/// hold its heads, so the next exchange for the case starts from there
/// instead of from nothing.
pub fn whole_doc_sync_state(doc: &Automerge) -> Vec<u8> {
    let mut state = automerge::sync::State::new();
    let mut heads = doc.get_heads();
    heads.sort();
    state.shared_heads = heads;
    state.encode()
}

/// What a node remembers of its last convergence with a peer (see
/// [`CaseStore::listed_upto`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListedUpto {
    /// How far the peer had seen our store: our listing's end.
    pub seq: u64,
    /// The protocol version both spoke then. It decides what may go out in
    /// our first flight, before the peer's hello says what it speaks now: a
    /// listing from version 2 on, pushed changes from version 4 on.
    pub version: u16,
}

/// One entry of a change listing: a case and its heads, with the local
/// update sequence number at which it last changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangedCase {
    /// The local update sequence number of the case's last change.
    pub seq: u64,
    /// The case.
    pub case: CaseId,
    /// Its current heads.
    pub heads: Vec<ChangeHash>,
}

/// The storage a session works against, already narrowed to one peer:
/// listings include only the cases shared with that peer, and the sync
/// state and cursor read and written are that peer's.
///
/// Every local commit, whether a person's edit or changes merged from any
/// peer, gives the case a new, higher update sequence number. That number
/// is what a peer's cursor counts, so a change relayed through this node
/// (laptop A, then the center, then laptop B) is listed to every peer.
pub trait CaseStore {
    /// This store's identity (see [`StoreId`]).
    fn store_id(&mut self) -> Result<StoreId, StoreFault>;
    /// The highest update sequence number given out so far.
    fn current_seq(&mut self) -> Result<u64, StoreFault>;
    /// Shared cases whose last change has a sequence number in
    /// `(after, upto]`, in sequence order, at most `limit` of them. Also
    /// returns the last sequence number examined, so filtered-out cases do
    /// not stall paging.
    fn changes_page(
        &mut self,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<(Vec<ChangedCase>, u64), StoreFault>;
    /// The current heads of a case, without loading it; `None` if absent.
    fn heads(&mut self, case: &CaseId) -> Result<Option<Vec<ChangeHash>>, StoreFault>;
    /// The cursor held for this peer: its store id and the sequence number
    /// up to which everything it listed is held here.
    fn peer_cursor(&mut self) -> Result<Option<(StoreId, u64)>, StoreFault>;
    /// Moves the cursor forward. Called only once every listed case is
    /// committed here.
    fn save_peer_cursor(&mut self, store_id: StoreId, seq: u64) -> Result<(), StoreFault>;
    /// How far this peer had seen our store when we last converged with it
    /// (our listing's end), if we remember: a session lists from there at
    /// once instead of waiting a round trip for the peer's cursor. Only a
    /// hint; the peer's cursor decides (see [`Message::ListingStart`]).
    ///
    /// [`Message::ListingStart`]: crate::wire::Message::ListingStart
    fn listed_upto(&mut self) -> Result<Option<ListedUpto>, StoreFault> {
        Ok(None)
    }
    /// Remembers (or, with `None`, forgets) [`CaseStore::listed_upto`].
    fn save_listed_upto(&mut self, upto: Option<ListedUpto>) -> Result<(), StoreFault> {
        let _ = upto;
        Ok(())
    }
    /// The current document of a case shared with this peer, if any.
    fn load(&mut self, case: &CaseId) -> Result<Option<Automerge>, StoreFault>;
    /// The persisted Automerge sync state for this peer and case.
    fn load_sync_state(&mut self, case: &CaseId) -> Result<Option<Vec<u8>>, StoreFault>;
    /// Persists the sync state when it moved without new data arriving.
    fn save_sync_state(&mut self, case: &CaseId, state: &[u8]) -> Result<(), StoreFault>;
    /// The case's stored bytes, to send whole to a peer that lacks it
    /// (`Automerge::load` must accept them). `None` if absent or not
    /// shared with this peer. A store may return its bytes without loading
    /// them: the receiver verifies by loading, and bytes that do not load
    /// make it fall back to an Automerge exchange, whose [`CaseStore::load`]
    /// here then finds the damage.
    fn load_saved(&mut self, case: &CaseId) -> Result<Option<Vec<u8>>, StoreFault> {
        Ok(self.load(case)?.map(|doc| doc.save()))
    }
    /// Durably stores cases received whole, in order, each with the sync
    /// state [`whole_doc_sync_state`] gives. Bytes that are not a usable
    /// document ([`load_whole`]) are reported [`Adopted::Unusable`] and
    /// nothing is written for them. Same contract as
    /// [`CaseStore::commit`] otherwise; a case that arrived meanwhile from
    /// another peer is merged. The first refusal or failure ends the batch
    /// (what was stored before it stays: each case is valid on its own).
    ///
    /// A batch, so a store can load and check the documents in parallel
    /// (the costly part of a first sync) and keep the saved bytes as they
    /// are instead of saving each document again.
    fn adopt_batch(&mut self, docs: Vec<WholeDoc>) -> Result<Vec<Adopted>, (CaseId, CommitError)> {
        let mut out = Vec::with_capacity(docs.len());
        for d in docs {
            let adopted = match load_whole(&d.saved) {
                None => Adopted::Unusable,
                Some(doc) => Adopted::Stored(
                    self.commit(&d.case, &doc, &whole_doc_sync_state(&doc))
                        .map_err(|e| (d.case.clone(), e))?,
                ),
            };
            out.push(adopted);
        }
        Ok(out)
    }
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
