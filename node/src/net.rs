//! The QUIC transport: runs [`fieldcase_sync::Session`]s over quinn.
//!
//! This is the thin runtime around the pure protocol, the way `quinn` wraps
//! `quinn-proto`: it moves bytes between a QUIC stream and a session, hands
//! the session a store narrowed to the peer, and decides *who* may connect.
//!
//! Trust is checked right after the TLS handshake, before the sync stream
//! is accepted: TLS proves the peer holds the key behind its node ID, and
//! the trust list decides whether that ID may sync. An untrusted node gets
//! a connection close whose reason says what to do, and no case data moves.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use automerge::{Automerge, ChangeHash};
use fieldcase_sync::store::{
    load_whole, whole_doc_sync_state, Adopted, ChangedCase, ListedUpto, WholeDoc,
};
use fieldcase_sync::wire::StoreId;
use fieldcase_sync::{
    CaseId, CaseStore, CommitError, CommitOutcome, Event, Session, SessionConfig, SessionError,
    SessionStats, StoreFault,
};
use thiserror::Error;
use tokio::sync::broadcast;

use crate::identity::{self, Identity, IdentityError, NodeId};
use crate::node::{now_ms, open_store, NodeError};
use crate::notify::{ChangeListener, CHANNEL_CAPACITY};
use crate::share::SharePolicy;
use crate::store::{par_map, MergeError, MergeOutcome, PeerRow, Store, StoreError};
use crate::transfer::{self, FetchReport, ProgressSink};

/// Close code: the session converged and ended normally.
pub const CLOSE_DONE: u32 = 0;
/// Close code: the connecting node is not on the trust list.
pub const CLOSE_UNTRUSTED: u32 = 1;
/// Close code: the node answering is not the one we pinned.
pub const CLOSE_WRONG_PEER: u32 = 2;
/// Close code: the peer broke the protocol or sent invalid data.
pub const CLOSE_MISBEHAVED: u32 = 3;
/// Close code: our own storage failed.
pub const CLOSE_LOCAL_FAULT: u32 = 4;
/// Close code: the server is shutting down.
pub const CLOSE_SHUTDOWN: u32 = 5;
/// Close code: the two nodes share no protocol version.
pub const CLOSE_VERSION: u32 = 6;
/// Close code: the peer ended the session with a Goodbye; we only echo it.
pub const CLOSE_PEER_GOODBYE: u32 = 7;

/// How long to wait for a QUIC handshake before calling a peer
/// unreachable. Village links have RTTs near a second; ten leaves room
/// for several retransmissions.
pub const CONNECT_TIMEOUT_MS: u64 = 10_000;

/// A one-shot session that receives nothing for this long is abandoned.
/// QUIC keep-alives keep the connection up but carry no session bytes, so
/// this bounds a peer that stalls on purpose.
pub const SESSION_STALL_TIMEOUT_MS: u64 = 60_000;

/// Longest a finished client waits for its close frame to leave.
pub const CLOSE_LINGER_MS: u64 = 20;

/// How long to wait for the peer to finish its side after we finished ours.
pub const FINISH_TIMEOUT_MS: u64 = 10_000;

/// Largest chunk read from a stream at once; frames larger than this simply
/// arrive in several reads. Everything one read brings is committed in one
/// transaction (one fsync) and its whole cases are checked in parallel, so
/// a read may take as much as the stream has buffered.
const READ_CHUNK_BYTES: usize = 1024 * 1024;

/// Backoff bounds for `sync --watch` while the peer is unreachable.
pub const BACKOFF_MIN_MS: u64 = 500;
/// See [`BACKOFF_MIN_MS`].
pub const BACKOFF_MAX_MS: u64 = 30_000;

/// Where human-readable progress lines go.
pub type Logger = Arc<dyn Fn(&str) + Send + Sync>;

/// A logger that writes to stderr.
pub fn stderr_logger() -> Logger {
    Arc::new(|line: &str| eprintln!("{line}"))
}

/// Why a network operation failed.
#[derive(Debug, Error)]
pub enum NetError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The peer has no address to connect to.
    #[error("peer '{0}' has no address; add one with `fieldcase peer add ID --name NAME --addr HOST:PORT`")]
    NoAddress(String),
    /// The peer's address did not resolve.
    #[error("cannot resolve address '{addr}' of peer '{peer}'")]
    BadAddress {
        /// The peer.
        peer: String,
        /// The address as stored.
        addr: String,
    },
    /// No handshake completed in time, or the connection failed to start.
    #[error("cannot reach {peer} at {addr}: {reason}")]
    Unreachable {
        /// The peer.
        peer: String,
        /// The address tried.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The node that answered is not the one we trust under that name.
    #[error("the node at {addr} is {got}, not {expected} ('{peer}'); refusing to sync")]
    WrongPeer {
        /// The peer name.
        peer: String,
        /// The address.
        addr: SocketAddr,
        /// The ID we pinned.
        expected: String,
        /// The ID that answered.
        got: String,
    },
    /// The peer closed the connection and said why (for example: we are not
    /// on its trust list, or it found our data invalid).
    #[error("{peer} closed the connection: {reason}")]
    Refused {
        /// The peer.
        peer: String,
        /// The peer's reason.
        reason: String,
    },
    /// The connection dropped.
    #[error("connection to {peer} lost: {reason}")]
    ConnectionLost {
        /// The peer.
        peer: String,
        /// What QUIC said.
        reason: String,
    },
    /// The session failed; see [`SessionError::is_peer_fault`].
    #[error("sync with {peer} failed: {source}")]
    Session {
        /// The peer.
        peer: String,
        /// The protocol error.
        source: SessionError,
    },
    /// The peer sent bytes that broke the rules (attachment bytes that do
    /// not match their hash, say); we closed the connection.
    #[error("closed the connection to {peer}: {reason}")]
    PeerMisbehaved {
        /// The peer.
        peer: String,
        /// What it did.
        reason: String,
    },
    /// The peer sent nothing for too long.
    #[error("{peer} stopped responding")]
    Stalled {
        /// The peer.
        peer: String,
    },
    /// Local storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Identity or TLS setup failed.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// Opening the node failed.
    #[error(transparent)]
    Node(#[from] NodeError),
}

impl NetError {
    /// True when the peer misbehaved (as opposed to the link or us).
    pub fn is_peer_fault(&self) -> bool {
        matches!(self, NetError::Session { source, .. } if source.is_peer_fault())
            || matches!(self, NetError::PeerMisbehaved { .. })
    }
}

/// Runs `f` on the store without stalling other tasks: SQLite calls block
/// for an fsync, so on a multi-threaded runtime they move off the worker.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// The store narrowed to one peer, as the session sees it.
pub struct PeerStore<'a> {
    store: &'a mut Store,
    peer_id: String,
    policy: SharePolicy,
}

impl<'a> PeerStore<'a> {
    /// Narrows `store` to `peer`.
    pub fn new(store: &'a mut Store, peer: &PeerRow) -> Self {
        PeerStore {
            store,
            peer_id: peer.node_id.clone(),
            policy: SharePolicy::for_peer(peer),
        }
    }
}

impl PeerStore<'_> {
    /// Runs one of the store's merges for a received document, after
    /// checking the document carries the case's own code (anything else
    /// would let a peer overwrite another case), and counts the conflicts
    /// the merge introduced.
    fn commit_with(
        &mut self,
        case: &CaseId,
        doc: &Automerge,
        merge: impl FnOnce(&mut Store) -> Result<MergeOutcome, MergeError>,
    ) -> Result<CommitOutcome, CommitError> {
        crate::case::validate_code(doc, case.as_str())
            .map_err(|e| CommitError::Rejected(e.to_string()))?;
        let conflicts_before = self
            .store
            .case_conflicts(case.as_str())
            .map_err(|e| CommitError::Fault(fault(e)))?
            .unwrap_or(0);
        let outcome = merge(self.store).map_err(merge_error)?;
        let conflicts_after = self
            .store
            .case_conflicts(case.as_str())
            .map_err(|e| CommitError::Fault(fault(e)))?
            .unwrap_or(0);
        Ok(CommitOutcome {
            changed: outcome.changed,
            created: outcome.created,
            new_conflicts: u32::try_from(conflicts_after - conflicts_before).unwrap_or(0),
        })
    }
}

fn merge_error(e: MergeError) -> CommitError {
    match e {
        MergeError::Rejected(reason) => CommitError::Rejected(reason),
        MergeError::Store(e) => CommitError::Fault(fault(e)),
    }
}

fn fault(e: StoreError) -> StoreFault {
    StoreFault(e.to_string())
}

impl CaseStore for PeerStore<'_> {
    fn store_id(&mut self) -> Result<StoreId, StoreFault> {
        self.store.store_id().map_err(fault)
    }

    fn current_seq(&mut self) -> Result<u64, StoreFault> {
        self.store.update_seq().map_err(fault)
    }

    fn changes_page(
        &mut self,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<(Vec<ChangedCase>, u64), StoreFault> {
        let page = self.store.changes_page(after, upto, limit).map_err(fault)?;
        let last = if page.len() == limit {
            page.last().map(|(seq, _, _)| *seq).unwrap_or(upto)
        } else {
            upto
        };
        let shared = page
            .into_iter()
            .filter(|(_, code, _)| self.policy.shares_code(code))
            // Codes in our own store were validated on the way in.
            .filter_map(|(seq, code, heads)| {
                CaseId::new(&code)
                    .ok()
                    .map(|case| ChangedCase { seq, case, heads })
            })
            .collect();
        Ok((shared, last))
    }

    fn heads(&mut self, case: &CaseId) -> Result<Option<Vec<ChangeHash>>, StoreFault> {
        self.store.case_heads(case.as_str()).map_err(fault)
    }

    fn peer_cursor(&mut self) -> Result<Option<(StoreId, u64)>, StoreFault> {
        self.store.peer_cursor(&self.peer_id).map_err(fault)
    }

    fn save_peer_cursor(&mut self, store_id: StoreId, seq: u64) -> Result<(), StoreFault> {
        self.store
            .save_peer_cursor(&self.peer_id, store_id, seq)
            .map_err(fault)
    }

    fn load(&mut self, case: &CaseId) -> Result<Option<Automerge>, StoreFault> {
        if !self.policy.shares_code(case.as_str()) {
            return Ok(None);
        }
        match self.store.load_case(case.as_str()) {
            // A damaged local copy counts as absent: the peer then sends
            // the whole case and the commit rebuilds it.
            Err(StoreError::CorruptCase { .. }) => {
                self.store.mark_damaged(case.as_str()).map_err(fault)?;
                Ok(None)
            }
            other => other.map_err(fault),
        }
    }

    fn load_sync_state(&mut self, case: &CaseId) -> Result<Option<Vec<u8>>, StoreFault> {
        self.store
            .load_sync_state(&self.peer_id, case.as_str())
            .map_err(fault)
    }

    fn save_sync_state(&mut self, case: &CaseId, state: &[u8]) -> Result<(), StoreFault> {
        self.store
            .save_sync_state(&self.peer_id, case.as_str(), state)
            .map_err(fault)
    }

    fn listed_upto(&mut self) -> Result<Option<ListedUpto>, StoreFault> {
        self.store.listed_upto(&self.peer_id).map_err(fault)
    }

    fn save_listed_upto(&mut self, upto: Option<ListedUpto>) -> Result<(), StoreFault> {
        self.store
            .save_listed_upto(&self.peer_id, upto)
            .map_err(fault)
    }

    fn load_saved(&mut self, case: &CaseId) -> Result<Option<Vec<u8>>, StoreFault> {
        if !self.policy.shares_code(case.as_str()) {
            return Ok(None);
        }
        self.store.case_saved(case.as_str()).map_err(fault)
    }

    fn commit(
        &mut self,
        case: &CaseId,
        doc: &Automerge,
        sync_state: &[u8],
    ) -> Result<CommitOutcome, CommitError> {
        let peer = self.peer_id.clone();
        self.commit_with(case, doc, |store| {
            store.merge_remote(&peer, case.as_str(), doc, sync_state)
        })
    }

    fn adopt_batch(&mut self, docs: Vec<WholeDoc>) -> Result<Vec<Adopted>, (CaseId, CommitError)> {
        // The costly part, loading and checking each document (one full
        // view), runs on every core, and so does freeing it (an Automerge
        // document is many small allocations); the writes then go in
        // order, with only what they need.
        let prepared = par_map(&docs, |d| {
            load_whole(&d.saved).map(|doc| {
                let projection = crate::node::project_case(&doc, d.case.as_str());
                (doc.get_heads(), whole_doc_sync_state(&doc), projection)
            })
        });
        let mut out = Vec::with_capacity(docs.len());
        for (d, prepared) in docs.into_iter().zip(prepared) {
            let Some((heads, state, projection)) = prepared else {
                out.push(Adopted::Unusable);
                continue;
            };
            let fail = |e: CommitError| (d.case.clone(), e);
            let projection = projection.map_err(|r| fail(CommitError::Rejected(r)))?;
            let inserted = self
                .store
                .insert_whole(
                    &self.peer_id,
                    d.case.as_str(),
                    &d.saved,
                    &heads,
                    &projection,
                    &state,
                )
                .map_err(|e| fail(merge_error(e)))?;
            let outcome = if inserted {
                CommitOutcome {
                    changed: true,
                    created: true,
                    new_conflicts: u32::try_from(projection.conflicts).unwrap_or(0),
                }
            } else {
                // It arrived meanwhile, or our copy is damaged: merge. It
                // loaded above, so it loads again.
                match load_whole(&d.saved) {
                    Some(doc) => self.commit(&d.case, &doc, &state).map_err(fail)?,
                    None => {
                        out.push(Adopted::Unusable);
                        continue;
                    }
                }
            };
            out.push(Adopted::Stored(outcome));
        }
        Ok(out)
    }
}

/// What a session achieved, for the one-line summary.
#[derive(Clone, Debug)]
pub struct SyncReport {
    /// The peer's name on our trust list.
    pub peer: String,
    /// The session's counters.
    pub stats: SessionStats,
    /// Attachments downloaded in this session.
    pub blobs: FetchReport,
    /// Connections lost mid-session and opened again to resume (see
    /// [`sync_resuming`]); the counters are those of the last session.
    pub resumed: u32,
    /// UDP payload bytes this node sent and received on the connection,
    /// handshake and close included (quinn's counters; the last
    /// connection's when a sync resumed). What the link carried, without
    /// a relay in the way to count it.
    pub udp_bytes: (u64, u64),
}

impl SyncReport {
    /// "sync with center: 2 cases sent, 1 case received, 1 new conflict",
    /// plus the files received when there were any.
    pub fn summary(&self) -> String {
        let mut line = summary_line(&self.peer, &self.stats);
        if self.blobs.fetched > 0 {
            line.push_str(&format!(
                ", {} ({:.1} MB)",
                plural(
                    self.blobs.fetched as usize,
                    "file received",
                    "files received"
                ),
                self.blobs.bytes as f64 / 1e6
            ));
        }
        if self.resumed > 0 {
            line.push_str(&format!(
                " (resumed after {})",
                plural(self.resumed as usize, "lost connection", "lost connections")
            ));
        }
        line
    }
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The one-line summary of a session.
pub fn summary_line(peer: &str, stats: &SessionStats) -> String {
    format!(
        "sync with {peer}: {} sent, {} received, {}",
        plural(stats.cases_sent.len(), "case", "cases"),
        plural(stats.cases_received.len(), "case", "cases"),
        plural(
            stats.new_conflicts as usize,
            "new conflict",
            "new conflicts"
        ),
    )
}

/// Describes a quinn connection error, using the peer's own words when it
/// closed the connection on purpose.
fn describe_close(peer: &str, e: &quinn::ConnectionError) -> NetError {
    match e {
        quinn::ConnectionError::ApplicationClosed(close) => NetError::Refused {
            peer: peer.to_string(),
            reason: String::from_utf8_lossy(&close.reason).into_owned(),
        },
        other => NetError::ConnectionLost {
            peer: peer.to_string(),
            reason: other.to_string(),
        },
    }
}

fn read_error(peer: &str, e: quinn::ReadError) -> NetError {
    match e {
        quinn::ReadError::ConnectionLost(c) => describe_close(peer, &c),
        other => NetError::ConnectionLost {
            peer: peer.to_string(),
            reason: other.to_string(),
        },
    }
}

fn write_error(peer: &str, e: quinn::WriteError) -> NetError {
    match e {
        quinn::WriteError::ConnectionLost(c) => describe_close(peer, &c),
        other => NetError::ConnectionLost {
            peer: peer.to_string(),
            reason: other.to_string(),
        },
    }
}

#[allow(clippy::too_many_arguments)] // each argument is one distinct piece of the session's context
async fn drive(
    conn: &quinn::Connection,
    send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    store: &mut Store,
    peer: &PeerRow,
    config: SessionConfig,
    mut changes: Option<broadcast::Receiver<String>>,
    log: &Logger,
    home: &Path,
    progress: &ProgressSink,
    only_blob: Option<String>,
) -> Result<(SessionStats, FetchReport), NetError> {
    let name = peer.name.clone();
    // Case records outrank attachment bytes on the wire.
    let _ = send.set_priority(CONTROL_STREAM_PRIORITY);
    // Writing happens in its own task, fed through a bounded queue: if we
    // wrote inline, two peers each blocked on the other's full receive
    // window would never read again (a flow-control deadlock). The bound
    // is what keeps a session's memory flat while it streams 100,000 cases.
    let (tx, rx) = tokio::sync::mpsc::channel::<(Vec<u8>, u32)>(WRITE_QUEUE_FRAMES);
    let budget = Arc::new(tokio::sync::Semaphore::new(WRITE_QUEUE_BYTES));
    let peer_ended = Arc::new(tokio::sync::Notify::new());
    let mut writer = Some(tokio::spawn(write_frames(
        send,
        rx,
        budget.clone(),
        peer_ended.clone(),
    )));
    let mut tx = Some(WriteQueue { tx, budget });
    // Serve the peer's attachment requests for as long as the connection
    // lives; aborted when this session ends.
    let activity = transfer::Activity::default();
    let mut activity_seen = 0u64;
    let blob_server = AbortOnDrop(tokio::spawn(transfer::serve_blob_streams(
        conn.clone(),
        home.to_path_buf(),
        peer.clone(),
        activity.clone(),
    )));
    let mut fetch: Option<tokio::task::JoinHandle<FetchReport>> = None;
    let mut refetch = false;
    // Per-case messages received when the running (or last) fetch
    // started: a new convergence needs another fetch only if records
    // arrived since.
    let mut fetched_at_received: Option<u64> = None;
    let mut blob_totals = FetchReport::default();
    let mut session = Session::new(config);
    let started = blocking(|| session.start(&mut PeerStore::new(store, peer)));
    if let Err(source) = started {
        return Err(NetError::Session { peer: name, source });
    }

    let mut buf = vec![0u8; READ_CHUNK_BYTES];
    let mut unsent_replies_invalid = false;
    let mut we_finished = false;
    let mut live = false;
    let mut reported = SessionStats::default();
    loop {
        // Hand the writer whatever it has room for, generating more
        // (listings, offers) from the store as the queue drains.
        let step = match tx.as_ref() {
            Some(queue) => feed_writer(&mut session, queue, store, peer),
            None => Ok(()),
        };
        let step = match step {
            Err(source) => Err(source),
            Ok(()) => {
                let wants_room = tx.is_some() && (session.has_queued() || session.has_backlog());
                let stall = if we_finished {
                    Duration::from_millis(FINISH_TIMEOUT_MS)
                } else if live {
                    // Live sessions are quiet for hours; QUIC's idle timeout
                    // and keep-alives decide when the link is gone.
                    Duration::from_secs(365 * 24 * 3600)
                } else {
                    Duration::from_millis(SESSION_STALL_TIMEOUT_MS)
                };
                tokio::select! {
                    room = async {
                        match tx.as_ref() {
                            Some(queue) => queue.room().await,
                            None => std::future::pending().await,
                        }
                    }, if wants_room => {
                        match room {
                            Ok(()) => Ok(()),
                            Err(_) => return Err(writer_error(&name, writer.take()).await),
                        }
                    }
                    read = tokio::time::timeout(stall, recv.read(&mut buf)) => {
                        match read {
                            Err(_) if we_finished => break,
                            // Quiet control stream, but attachment bytes are
                            // still flowing: not a stall.
                            Err(_) if activity.get() != activity_seen => {
                                activity_seen = activity.get();
                                Ok(())
                            }
                            Err(_) => {
                                conn.close(CLOSE_MISBEHAVED.into(), b"session stalled");
                                return Err(NetError::Stalled { peer: name });
                            }
                            // The peer closed after we both converged: done.
                            Ok(Err(quinn::ReadError::ConnectionLost(
                                quinn::ConnectionError::ApplicationClosed(c),
                            ))) if we_finished && c.error_code == CLOSE_DONE.into() => {
                                peer_ended.notify_one();
                                break;
                            }
                            Ok(Err(e)) => return Err(read_error(&name, e)),
                            Ok(Ok(Some(n))) => blocking(|| {
                                // One transaction for everything these bytes
                                // bring; replies leave only after it commits.
                                store.begin_batch().map_err(|e| SessionError::Local(fault(e)))?;
                                let r = session.handle_bytes(&buf[..n], &mut PeerStore::new(store, peer));
                                match r {
                                    Ok(()) => store.end_batch().map_err(|e| {
                                        // The replies just queued describe
                                        // merges that did not happen.
                                        unsent_replies_invalid = true;
                                        SessionError::Local(fault(e))
                                    }),
                                    Err(e) => {
                                        // Keep what was merged before the
                                        // bad frame; it is valid on its own.
                                        if store.end_batch().is_err() {
                                            unsent_replies_invalid = true;
                                        }
                                        Err(e)
                                    }
                                }
                            }),
                            Ok(Ok(None)) => {
                                let r = session.handle_peer_finished();
                                if r.is_ok() && we_finished {
                                    // A peer finishes its stream only once
                                    // its own session finished (or after a
                                    // Goodbye, which failed ours before
                                    // this): it holds everything it needs
                                    // from us, so the ACK of our FIN need
                                    // not be awaited.
                                    peer_ended.notify_one();
                                    break;
                                }
                                if r.is_ok() {
                                    return Err(NetError::ConnectionLost {
                                        peer: name,
                                        reason: "peer ended the session early".into(),
                                    });
                                }
                                r
                            }
                        }
                    }
                    code = async {
                        match changes.as_mut() {
                            Some(rx) => rx.recv().await,
                            None => std::future::pending().await,
                        }
                    }, if live => {
                        match code {
                            Ok(code) => match CaseId::new(&code) {
                                Ok(id) => blocking(|| {
                                    session.handle_local_change(&id, &mut PeerStore::new(store, peer))
                                }),
                                Err(_) => Ok(()),
                            },
                            // Lagged: some notifications were dropped. Nothing
                            // is lost; they go out on the next session.
                            Err(broadcast::error::RecvError::Lagged(_)) => Ok(()),
                            Err(broadcast::error::RecvError::Closed) => {
                                changes = None;
                                Ok(())
                            }
                        }
                    }
                    joined = async {
                        match fetch.as_mut() {
                            Some(handle) => handle.await,
                            None => std::future::pending().await,
                        }
                    } => {
                        fetch = None;
                        let report = joined.unwrap_or_default();
                        blob_totals.fetched += report.fetched;
                        blob_totals.bytes += report.bytes;
                        blob_totals.unavailable += report.unavailable;
                        blob_totals.over_limit += report.over_limit;
                        if let Some(reason) = report.misbehaved {
                            let reason = format!("misbehaving peer: {reason}");
                            log(&format!("{name}: {reason}"));
                            conn.close(CLOSE_MISBEHAVED.into(), truncate(&reason).as_bytes());
                            return Err(NetError::PeerMisbehaved { peer: name, reason });
                        }
                        if let Some(reason) = report.interrupted {
                            return Err(NetError::ConnectionLost {
                                peer: name,
                                reason: format!("attachment transfer interrupted: {reason}"),
                            });
                        }
                        if refetch {
                            refetch = false;
                            fetch = Some(tokio::spawn(transfer::fetch_wanted(
                                conn.clone(),
                                home.to_path_buf(),
                                name.clone(),
                                progress.clone(),
                                only_blob.clone(),
                                activity.clone(),
                            )));
                            Ok(())
                        } else {
                            blocking(|| {
                                session.handle_local_blobs_done(&mut PeerStore::new(store, peer))
                            })
                        }
                    }
                }
            }
        };
        if let Err(source) = step {
            // Tell the peer why before closing; best effort, bounded. If a
            // batch failed to commit, queued replies would claim data we
            // do not hold: send nothing more.
            if unsent_replies_invalid {
                tx = None;
            }
            if let Some(queue) = tx.take() {
                while let Some(frame) = session.poll_transmit() {
                    if queue.tx.try_send((frame, 0)).is_err() {
                        break;
                    }
                }
            }
            if let Some(w) = writer.take() {
                let _ = tokio::time::timeout(Duration::from_millis(500), w).await;
            }
            let (code, reason) = match &source {
                e if e.is_peer_fault() => (CLOSE_MISBEHAVED, format!("misbehaving peer: {e}")),
                SessionError::VersionMismatch { .. } => (CLOSE_VERSION, source.to_string()),
                SessionError::PeerGoodbye { .. } => (CLOSE_PEER_GOODBYE, source.to_string()),
                _ => (CLOSE_LOCAL_FAULT, source.to_string()),
            };
            conn.close(code.into(), truncate(&reason).as_bytes());
            return Err(NetError::Session { peer: name, source });
        }
        while let Some(event) = session.poll_event() {
            match event {
                Event::Connected { live: l, .. } => live = l,
                Event::NothingMoreToReceive | Event::Quiescent => {
                    // Case records first, then attachment bytes. Records
                    // complete before convergence (nothing listed on our
                    // side) lets the fetch, and so our BlobsDone, start a
                    // round trip earlier.
                    let received = session.stats().case_messages_received;
                    let new_records = fetched_at_received != Some(received);
                    if fetch.is_none() && new_records {
                        fetched_at_received = Some(received);
                        fetch = Some(tokio::spawn(transfer::fetch_wanted(
                            conn.clone(),
                            home.to_path_buf(),
                            name.clone(),
                            progress.clone(),
                            only_blob.clone(),
                            activity.clone(),
                        )));
                    } else if new_records {
                        fetched_at_received = Some(received);
                        refetch = true;
                    }
                    if event == Event::NothingMoreToReceive {
                        continue;
                    }
                    // Converged: everything both sides hold is durable on
                    // both sides, so this is a successful sync to record.
                    blocking(|| {
                        let seq = store.update_seq()?;
                        store.record_sync(&peer.node_id, now_ms(), seq)
                    })?;
                    let stats = session.stats();
                    if live
                        && (stats.cases_sent != reported.cases_sent
                            || stats.cases_received != reported.cases_received)
                    {
                        // Report only what this round moved, not the
                        // running total of a session that lasts all day.
                        let delta = SessionStats {
                            cases_sent: stats
                                .cases_sent
                                .difference(&reported.cases_sent)
                                .cloned()
                                .collect(),
                            cases_received: stats
                                .cases_received
                                .difference(&reported.cases_received)
                                .cloned()
                                .collect(),
                            new_conflicts: stats.new_conflicts - reported.new_conflicts,
                            ..SessionStats::default()
                        };
                        log(&summary_line(&name, &delta));
                        reported = stats.clone();
                    }
                }
                Event::Finished => {
                    we_finished = true;
                    // Everything queued goes out, then the writer finishes
                    // the stream and waits (bounded) until the peer has it.
                    if let Some(queue) = tx.take() {
                        while let Some(frame) = session.poll_transmit() {
                            if queue.tx.send((frame, 0)).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            }
        }
    }
    if let Some(queue) = tx.take() {
        drop(queue);
    }
    if let Some(w) = writer.take() {
        let _ = tokio::time::timeout(Duration::from_millis(FINISH_TIMEOUT_MS), w).await;
    }
    drop(blob_server);
    Ok((session.stats().clone(), blob_totals))
}

/// Frames queued between a session and its stream writer.
const WRITE_QUEUE_FRAMES: usize = 64;

/// Bytes queued between a session and its stream writer (give or take
/// one frame). The session decides which frame goes next when it hands
/// one over (a small case may overtake the parts of a large one, see
/// `Session::poll_transmit`); once queued, frames go out in order. So
/// what sits here is how long a small case can wait behind a large one:
/// 256 KiB is two seconds at 1 Mbit/s, against 64 frames of 16 KiB parts
/// (a megabyte) with the frame count alone.
const WRITE_QUEUE_BYTES: usize = 256 * 1024;

/// The writer's queue: bounded in frames and in bytes. Each frame carries
/// the byte permits it took, which the writer returns once it wrote it.
struct WriteQueue {
    tx: tokio::sync::mpsc::Sender<(Vec<u8>, u32)>,
    budget: Arc<tokio::sync::Semaphore>,
}

impl WriteQueue {
    /// Waits until a frame may be queued; `Err` when the writer is gone.
    async fn room(&self) -> Result<(), ()> {
        // The budget is never closed; a byte permit is free once one frame
        // was written.
        drop(self.budget.acquire().await);
        self.tx.reserve().await.map(drop).map_err(drop)
    }
}

/// Moves frames from the session to the writer queue while it has room,
/// generating more from the store as needed.
fn feed_writer(
    session: &mut Session,
    queue: &WriteQueue,
    store: &mut Store,
    peer: &PeerRow,
) -> Result<(), SessionError> {
    loop {
        let available = queue.budget.available_permits();
        if available == 0 {
            return Ok(());
        }
        let Ok(permit) = queue.tx.try_reserve() else {
            return Ok(());
        };
        match session.poll_transmit() {
            Some(frame) => {
                // Take what the frame costs, or what is left: the queue
                // overshoots its bound by at most one frame.
                let taken = frame.len().min(available) as u32;
                if let Ok(bytes) = queue.budget.try_acquire_many(taken) {
                    bytes.forget();
                }
                permit.send((frame, taken))
            }
            None if session.has_backlog() => {
                drop(permit);
                blocking(|| session.fill(&mut PeerStore::new(store, peer)))?;
                if !session.has_queued() {
                    return Ok(());
                }
            }
            None => return Ok(()),
        }
    }
}

/// Writes queued frames to the stream; when the queue closes, finishes
/// the stream and waits (bounded) until the peer has read it all, so the
/// connection is not closed under our last frames. That wait ends early
/// when `peer_ended` is notified: the peer finished its own stream after
/// its session finished, so nothing we still have in flight (at most our
/// FIN and frames a finished session ignores) is needed, and waiting for
/// the ACK of our FIN would cost a round trip plus the peer's ACK delay.
async fn write_frames(
    mut send: quinn::SendStream,
    mut rx: tokio::sync::mpsc::Receiver<(Vec<u8>, u32)>,
    budget: Arc<tokio::sync::Semaphore>,
    peer_ended: Arc<tokio::sync::Notify>,
) -> Result<(), quinn::WriteError> {
    while let Some((frame, taken)) = rx.recv().await {
        send.write_all(&frame).await?;
        budget.add_permits(taken as usize);
    }
    let _ = send.finish();
    tokio::select! {
        _ = tokio::time::timeout(Duration::from_millis(FINISH_TIMEOUT_MS), send.stopped()) => {}
        _ = peer_ended.notified() => {}
    }
    Ok(())
}

/// The writer stopped taking frames: say why.
async fn writer_error(
    peer: &str,
    writer: Option<tokio::task::JoinHandle<Result<(), quinn::WriteError>>>,
) -> NetError {
    match writer {
        Some(w) => match w.await {
            Ok(Err(e)) => write_error(peer, e),
            _ => NetError::ConnectionLost {
                peer: peer.to_string(),
                reason: "stream writer ended".into(),
            },
        },
        None => NetError::ConnectionLost {
            peer: peer.to_string(),
            reason: "stream writer ended".into(),
        },
    }
}

/// Priority of the case-sync stream; blob streams keep the default 0.
const CONTROL_STREAM_PRIORITY: i32 = 10;

/// Aborts a background task when the session that owns it ends.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Close reasons travel in one QUIC frame; keep them short.
fn truncate(s: &str) -> String {
    s.chars().take(400).collect()
}

/// A server logs one line per finished or failed attachment download.
fn server_progress(log: &Logger) -> ProgressSink {
    let log = log.clone();
    Arc::new(move |p: &transfer::BlobProgress| {
        if let transfer::BlobProgress::Finished { hash, ok, message } = p {
            let short = hash.get(..12).unwrap_or(hash);
            log(&format!(
                "attachment {short}: {}{message}",
                if *ok { "" } else { "failed: " }
            ));
        }
    })
}

/// Options for an outgoing sync.
pub struct SyncOptions {
    /// Stay connected and push live edits.
    pub live: bool,
    /// Local change notifications (needed when `live`).
    pub changes: Option<broadcast::Receiver<String>>,
    /// Progress lines.
    pub log: Logger,
    /// Attachment download progress.
    pub progress: ProgressSink,
    /// Fetch only this blob (hex hash), whatever the fetch policy: how
    /// `case open` gets bytes a metadata-only laptop does not hold.
    pub only_blob: Option<String>,
}

/// Connections a one-shot sync opens in all when established ones keep
/// being lost mid-session (see [`sync_resuming`]).
pub const RESUME_ATTEMPTS_MAX: u32 = 3;

/// Pause before connecting again, times the attempt number.
pub const RESUME_BACKOFF_MS: u64 = 1_000;

/// [`sync_with`] for a one-shot sync over a link that drops: when an
/// established connection is lost mid-session (a blackout longer than
/// QUIC's idle timeout, say), it connects again and the new session
/// resumes where the last one stopped, since cursors, sync states and
/// partial attachment files are all durable. At most
/// [`RESUME_ATTEMPTS_MAX`] connections. Anything else (unreachable,
/// refused, a misbehaving peer, a local fault) is returned at once, and a
/// live sync is left to [`watch`], which reconnects on its own.
pub async fn sync_resuming(
    home: &Path,
    peer: &PeerRow,
    opts: SyncOptions,
) -> Result<SyncReport, NetError> {
    if opts.live {
        return sync_with(home, peer, opts).await;
    }
    let mut attempt = 1;
    loop {
        let once = SyncOptions {
            live: false,
            changes: None,
            log: opts.log.clone(),
            progress: opts.progress.clone(),
            only_blob: opts.only_blob.clone(),
        };
        match sync_with(home, peer, once).await {
            Ok(mut report) => {
                report.resumed = attempt - 1;
                return Ok(report);
            }
            Err(NetError::ConnectionLost { peer: name, reason })
                if attempt < RESUME_ATTEMPTS_MAX =>
            {
                (opts.log)(&format!(
                    "{name}: connection lost ({reason}); connecting again to resume \
                     (attempt {} of {RESUME_ATTEMPTS_MAX})",
                    attempt + 1
                ));
                tokio::time::sleep(Duration::from_millis(
                    RESUME_BACKOFF_MS * u64::from(attempt),
                ))
                .await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The endpoint of one outgoing sync (see
/// [`identity::client_endpoint_config`]).
fn client_endpoint(bind: SocketAddr) -> Result<quinn::Endpoint, NetError> {
    let err = |source| NetError::Bind { addr: bind, source };
    let socket = std::net::UdpSocket::bind(bind).map_err(err)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| err(std::io::Error::other("no async runtime found")))?;
    quinn::Endpoint::new(identity::client_endpoint_config(), None, socket, runtime).map_err(err)
}

/// Closes `conn` and waits (at most [`CLOSE_LINGER_MS`]) until the
/// datagram carrying the close has been handed to the socket, so that a
/// process exiting right after still tells the peer. Waiting for the
/// endpoint to be idle would add QUIC's drain period (three probe
/// timeouts) to every sync; the peer needs no more than the close frame,
/// and a lost one only makes it notice through its idle timeout. After a
/// close quinn sends nothing but the close, so the first datagram counted
/// after the close call is that one. The count is taken just before the
/// call: taken after it, the driver (woken by the call on another core)
/// had sometimes sent the close already, and the wait ran to its bound.
async fn close_and_send(conn: &quinn::Connection, code: u32, reason: &[u8]) {
    let sent = conn.stats().udp_tx.datagrams;
    conn.close(code.into(), reason);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(CLOSE_LINGER_MS);
    while conn.stats().udp_tx.datagrams == sent && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Connects to `peer`, checks it is the node we pinned, and runs a session.
pub async fn sync_with(
    home: &Path,
    peer: &PeerRow,
    opts: SyncOptions,
) -> Result<SyncReport, NetError> {
    let identity = Identity::load(home)?;
    let addr_text = peer
        .addr
        .clone()
        .ok_or_else(|| NetError::NoAddress(peer.name.clone()))?;
    let addr = tokio::net::lookup_host(&addr_text)
        .await
        .ok()
        .and_then(|mut it| it.next())
        .ok_or_else(|| NetError::BadAddress {
            peer: peer.name.clone(),
            addr: addr_text.clone(),
        })?;
    let bind: SocketAddr = if addr.is_ipv6() {
        "[::]:0".parse().expect("literal")
    } else {
        "0.0.0.0:0".parse().expect("literal")
    };
    let mut endpoint = client_endpoint(bind)?;
    endpoint.set_default_client_config(identity::client_config(&identity)?);
    let unreachable = |reason: String| NetError::Unreachable {
        peer: peer.name.clone(),
        addr,
        reason,
    };
    let connecting = endpoint
        .connect(addr, identity::SERVER_NAME)
        .map_err(|e| unreachable(e.to_string()))?;
    let conn =
        match tokio::time::timeout(Duration::from_millis(CONNECT_TIMEOUT_MS), connecting).await {
            Err(_) => return Err(unreachable("no answer (timed out)".into())),
            Ok(Err(quinn::ConnectionError::ApplicationClosed(close))) => {
                return Err(NetError::Refused {
                    peer: peer.name.clone(),
                    reason: String::from_utf8_lossy(&close.reason).into_owned(),
                })
            }
            Ok(Err(e)) => return Err(unreachable(e.to_string())),
            Ok(Ok(conn)) => conn,
        };
    let got = identity::peer_node_id(&conn)?;
    if got.to_string() != peer.node_id {
        let reason = format!(
            "you are {got}, but this node expected {} ('{}')",
            peer.node_id, peer.name
        );
        conn.close(CLOSE_WRONG_PEER.into(), truncate(&reason).as_bytes());
        return Err(NetError::WrongPeer {
            peer: peer.name.clone(),
            addr,
            expected: peer.node_id.clone(),
            got: got.to_string(),
        });
    }
    let result = async {
        let (send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| describe_close(&peer.name, &e))?;
        let mut store = open_store(home)?;
        let config = SessionConfig {
            live: opts.live,
            blob_transfer: true,
            ..SessionConfig::default()
        };
        drive(
            &conn,
            send,
            recv,
            &mut store,
            peer,
            config,
            opts.changes,
            &opts.log,
            home,
            &opts.progress,
            opts.only_blob.clone(),
        )
        .await
    }
    .await;
    match &result {
        Ok(_) => close_and_send(&conn, CLOSE_DONE, b"done").await,
        Err(e) => {
            close_and_send(
                &conn,
                CLOSE_LOCAL_FAULT,
                truncate(&e.to_string()).as_bytes(),
            )
            .await
        }
    }
    let udp = conn.stats();
    drop(endpoint);
    result.map(|(stats, blobs)| SyncReport {
        peer: peer.name.clone(),
        stats,
        blobs,
        resumed: 0,
        udp_bytes: (udp.udp_tx.bytes, udp.udp_rx.bytes),
    })
}

/// Keeps syncing with `peer` in live mode, reconnecting with exponential
/// backoff (with jitter) while it is unreachable, until `shutdown` fires.
pub async fn watch(
    home: PathBuf,
    peer: PeerRow,
    changes: broadcast::Sender<String>,
    log: Logger,
    progress: ProgressSink,
    mut shutdown: broadcast::Receiver<()>,
) {
    let mut backoff_ms = BACKOFF_MIN_MS;
    loop {
        let opts = SyncOptions {
            live: true,
            changes: Some(changes.subscribe()),
            log: log.clone(),
            progress: progress.clone(),
            only_blob: None,
        };
        let started = std::time::Instant::now();
        tokio::select! {
            result = sync_with(&home, &peer, opts) => {
                match result {
                    Ok(report) => log(&report.summary()),
                    Err(e) => log(&format!("{e}; retrying in {:.1} s", backoff_ms as f64 / 1000.0)),
                }
            }
            _ = shutdown.recv() => return,
        }
        if started.elapsed() > Duration::from_secs(30) {
            // A session that lasted was a good link: start over gently.
            backoff_ms = BACKOFF_MIN_MS;
        }
        let jitter = (now_ms() as u64) % (backoff_ms / 4 + 1);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(backoff_ms + jitter)) => {}
            _ = shutdown.recv() => return,
        }
        backoff_ms = (backoff_ms * 2).min(BACKOFF_MAX_MS);
    }
}

/// A listening node.
pub struct Server {
    endpoint: quinn::Endpoint,
    home: PathBuf,
    name: String,
    log: Logger,
    changes: broadcast::Sender<String>,
    _listener: Option<ChangeListener>,
}

impl Server {
    /// Binds the QUIC endpoint. Must run inside a tokio runtime.
    pub fn bind(home: &Path, addr: SocketAddr, log: Logger) -> Result<Server, NetError> {
        let identity = Identity::load(home)?;
        let config = identity::server_config(&identity)?;
        let endpoint = quinn::Endpoint::server(config, addr)
            .map_err(|source| NetError::Bind { addr, source })?;
        let (changes, _) = broadcast::channel(CHANNEL_CAPACITY);
        let listener = ChangeListener::bind(home, changes.clone()).ok();
        Ok(Server {
            endpoint,
            home: home.to_path_buf(),
            name: identity.name().to_string(),
            log,
            changes,
            _listener: listener,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, NetError> {
        self.endpoint.local_addr().map_err(|source| NetError::Bind {
            addr: "0.0.0.0:0".parse().expect("literal"),
            source,
        })
    }

    /// Accepts connections until `shutdown` resolves, then closes every
    /// connection and waits (bounded) for them to finish.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), NetError> {
        let limit = Arc::new(tokio::sync::Semaphore::new(
            identity::INCOMING_CONNECTIONS_MAX,
        ));
        let mut tasks = tokio::task::JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let Ok(permit) = limit.clone().try_acquire_owned() else {
                        incoming.refuse();
                        (self.log)("refused a connection: too many connections");
                        continue;
                    };
                    let home = self.home.clone();
                    let log = self.log.clone();
                    let name = self.name.clone();
                    let changes = self.changes.subscribe();
                    tasks.spawn(async move {
                        handle_incoming(incoming, home, name, log, changes).await;
                        drop(permit);
                    });
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = &mut shutdown => break,
            }
        }
        self.endpoint
            .close(CLOSE_SHUTDOWN.into(), b"server shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        Ok(())
    }
}

async fn handle_incoming(
    incoming: quinn::Incoming,
    home: PathBuf,
    our_name: String,
    log: Logger,
    changes: broadcast::Receiver<String>,
) {
    let remote = incoming.remote_address();
    let conn = match tokio::time::timeout(Duration::from_millis(CONNECT_TIMEOUT_MS), incoming).await
    {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            log(&format!("handshake with {remote} failed: {e}"));
            return;
        }
        Err(_) => {
            log(&format!("handshake with {remote} timed out"));
            return;
        }
    };
    let peer_id: NodeId = match identity::peer_node_id(&conn) {
        Ok(id) => id,
        Err(e) => {
            conn.close(CLOSE_UNTRUSTED.into(), b"no usable certificate");
            log(&format!("refused {remote}: {e}"));
            return;
        }
    };
    let result = async {
        let mut store = open_store(&home)?;
        let Some(peer) = blocking(|| store.peer_by_id(&peer_id.to_string()))? else {
            let claimed = identity::peer_name(&conn).unwrap_or_else(|| "?".into());
            let reason = format!(
                "node {peer_id} is not trusted by '{our_name}'; on '{our_name}' run: \
                 fieldcase peer add {peer_id} --name NAME"
            );
            conn.close(CLOSE_UNTRUSTED.into(), truncate(&reason).as_bytes());
            log(&format!(
                "refused untrusted node {peer_id} (calls itself '{claimed}') from {remote}: not on the trust list"
            ));
            return Ok(None);
        };
        log(&format!("{} ({peer_id}) connected from {remote}", peer.name));
        let (send, recv) = tokio::time::timeout(Duration::from_millis(CONNECT_TIMEOUT_MS), conn.accept_bi())
            .await
            .map_err(|_| NetError::Stalled { peer: peer.name.clone() })?
            .map_err(|e| describe_close(&peer.name, &e))?;
        let (stats, blobs) = drive(
            &conn,
            send,
            recv,
            &mut store,
            &peer,
            SessionConfig {
                blob_transfer: true,
                ..SessionConfig::default()
            },
            Some(changes),
            &log,
            &home,
            &server_progress(&log),
            None,
        )
        .await?;
        let udp = conn.stats();
        Ok::<_, NetError>(Some(SyncReport {
            peer: peer.name.clone(),
            stats,
            blobs,
            resumed: 0,
            udp_bytes: (udp.udp_tx.bytes, udp.udp_rx.bytes),
        }))
    }
    .await;
    match result {
        Ok(Some(report)) => {
            log(&report.summary());
            // The client closes once it has our last frames.
            let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
        }
        Ok(None) => {}
        Err(e) if e.is_peer_fault() => {
            log(&format!("closed connection from misbehaving peer: {e}"))
        }
        Err(e) => log(&format!("session ended: {e}")),
    }
}
