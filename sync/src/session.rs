//! One sync session with one peer, as a pure state machine.
//!
//! The caller feeds received bytes in with [`Session::handle_bytes`] and
//! local edits with [`Session::handle_local_change`], then drains frames to
//! send with [`Session::poll_transmit`] and events with
//! [`Session::poll_event`]. Storage is reached only through the
//! [`CaseStore`] port passed to each call. There is no clock, socket or
//! thread in here, so a whole network of sessions can be driven
//! deterministically by a test.
//!
//! # Protocol (version 1)
//!
//! 1. Both sides send [`Hello`]. Each checks for a common version on its own;
//!    with none, each sends a [`Goodbye`] naming both ranges and stops.
//! 2. Both send a [`Message::Digest`] of the cases they share with the
//!    other. Equal digests: nothing differs, no per-case message is sent.
//! 3. Otherwise both send their inventory (case id, heads hash) in batches.
//!    Each side then starts an Automerge sync for every case it holds whose
//!    heads hash differs from the peer's, or that the peer lacks.
//! 4. Automerge sync messages flow per case until neither side has more.
//!    After handling input, a side that is quiescent sends
//!    [`Message::Idle`] with its counts of data messages received and sent.
//!    When both sides' counts match, every message has been processed and
//!    the session has converged.
//!
//! Received changes are committed through the store before any reply that
//! depends on them is queued, so nothing we tell the peer runs ahead of our
//! disk.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use automerge::sync::{Message as AmMessage, State as AmState, SyncDoc};
use automerge::{Automerge, ChangeHash};
use thiserror::Error;

use crate::frame::{encode_frame, FrameDecoder, FrameError};
use crate::inventory::{heads_hash, root_hash};
use crate::store::{CaseStore, CommitError, StoreFault};
use crate::wire::{
    CaseId, DecodeError, Goodbye, GoodbyeCode, HeadsHash, Hello, Message, INVENTORY_ENTRIES_MAX,
    PROTOCOL_VERSION, PROTOCOL_VERSION_MIN,
};

/// Most cases a peer may announce in one inventory, which bounds the
/// memory a peer can make us spend on its inventory (about 100 bytes each).
pub const INVENTORY_TOTAL_MAX: usize = 2_000_000;

/// Most cases one session tracks sync state for, for the same reason.
pub const ACTIVE_CASES_MAX: usize = 2_000_000;

/// How a session is set up.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Keep the session open after convergence and push live edits.
    /// The session is live if either side asks for it.
    pub live: bool,
    /// Oldest protocol version to speak (tests lower it to simulate old
    /// nodes).
    pub version_min: u16,
    /// Newest protocol version to speak.
    pub version_max: u16,
    /// The caller fetches attachments after the case records converge and
    /// calls [`Session::handle_local_blobs_done`] when finished. Without
    /// it, this side announces at once that it fetches nothing.
    pub blob_transfer: bool,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            live: false,
            version_min: PROTOCOL_VERSION_MIN,
            version_max: PROTOCOL_VERSION,
            blob_transfer: false,
        }
    }
}

/// Where the session is in the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the peer's hello.
    Hello,
    /// Waiting for the peer's digest.
    Digest,
    /// Receiving the peer's inventory.
    Inventory,
    /// Exchanging per-case Automerge sync messages.
    Sync,
    /// Converged, in a one-shot session.
    Finished,
    /// Ended by an error on either side.
    Closed,
}

/// Something the caller should know about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Versions agreed; the peer is a compatible fieldcase node.
    Connected {
        /// The version both speak.
        version: u16,
        /// Whether the session stays open after converging.
        live: bool,
    },
    /// Both sides have processed everything and have nothing to send.
    /// In a one-shot session this is followed by [`Event::Finished`].
    Quiescent,
    /// A one-shot session converged; the caller may close the stream.
    Finished,
}

/// Counts for the one-line summary and for tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Cases for which we sent changes the peer did not have.
    pub cases_sent: BTreeSet<CaseId>,
    /// Cases whose stored history grew from what the peer sent.
    pub cases_received: BTreeSet<CaseId>,
    /// Cases that did not exist here before this session.
    pub cases_created: BTreeSet<CaseId>,
    /// Conflicts introduced by received changes.
    pub new_conflicts: u64,
    /// Per-case sync messages we sent.
    pub case_messages_sent: u64,
    /// Per-case sync messages we received.
    pub case_messages_received: u64,
    /// Frames we sent, of any kind.
    pub frames_sent: u64,
    /// Frames we received, of any kind.
    pub frames_received: u64,
}

/// Why a session ended badly. [`SessionError::is_peer_fault`] separates
/// "the peer misbehaved" from "our storage failed".
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SessionError {
    /// The byte stream could not be split into frames.
    #[error("peer sent a bad frame: {0}")]
    Frame(#[from] FrameError),
    /// A frame did not decode as a message.
    #[error("peer sent a malformed message: {0}")]
    Decode(#[from] DecodeError),
    /// A well-formed message arrived at the wrong time.
    #[error("peer broke the protocol: {0}")]
    Protocol(String),
    /// An Automerge sync message did not decode or apply.
    #[error("peer sent an invalid sync message for case {case}: {reason}")]
    BadSyncMessage {
        /// The case concerned.
        case: CaseId,
        /// What Automerge said.
        reason: String,
    },
    /// Applying the peer's changes would have made the case invalid;
    /// nothing was written.
    #[error("peer sent changes that would make case {case} invalid: {reason}")]
    Rejected {
        /// The case concerned.
        case: CaseId,
        /// Why the result was refused.
        reason: String,
    },
    /// The two nodes share no protocol version.
    #[error(
        "incompatible protocol versions: this node speaks {ours_min}..={ours_max}, \
         the peer speaks {theirs_min}..={theirs_max}; upgrade the older node"
    )]
    VersionMismatch {
        /// Our oldest version.
        ours_min: u16,
        /// Our newest version.
        ours_max: u16,
        /// The peer's oldest version.
        theirs_min: u16,
        /// The peer's newest version.
        theirs_max: u16,
    },
    /// The peer ended the session and said why.
    #[error("peer ended the session: {reason}")]
    PeerGoodbye {
        /// The peer's reason code.
        code: GoodbyeCode,
        /// The peer's explanation.
        reason: String,
    },
    /// Our own storage failed.
    #[error("local storage failed: {0}")]
    Local(#[from] StoreFault),
}

impl SessionError {
    /// True when the peer did something wrong (close that connection and
    /// report the peer), false when the fault is ours or mutual.
    pub fn is_peer_fault(&self) -> bool {
        matches!(
            self,
            SessionError::Frame(_)
                | SessionError::Decode(_)
                | SessionError::Protocol(_)
                | SessionError::BadSyncMessage { .. }
                | SessionError::Rejected { .. }
        )
    }

    fn goodbye(&self) -> Option<Goodbye> {
        let code = match self {
            SessionError::PeerGoodbye { .. } => return None,
            SessionError::VersionMismatch { .. } => GoodbyeCode::VersionMismatch,
            SessionError::Local(_) => GoodbyeCode::LocalFault,
            _ => GoodbyeCode::ProtocolError,
        };
        let reason = match self {
            SessionError::VersionMismatch {
                ours_min,
                ours_max,
                theirs_min,
                theirs_max,
            } => format!(
                "incompatible protocol versions: this node speaks {ours_min}..={ours_max}, \
                 you speak {theirs_min}..={theirs_max}; upgrade the older node"
            ),
            SessionError::Local(_) => "the peer's local storage failed; try again later".into(),
            other => format!("you sent something invalid: {other}"),
        };
        Some(Goodbye { code, reason })
    }
}

/// One session with one peer. See the module docs for the protocol.
pub struct Session {
    config: SessionConfig,
    phase: Phase,
    live: bool,
    decoder: FrameDecoder,
    outbox: VecDeque<Vec<u8>>,
    events: VecDeque<Event>,
    /// Our inventory, sorted by id, taken when the session started.
    local_inventory: Vec<(CaseId, HeadsHash)>,
    /// The peer's inventory as it arrives, only when digests differ.
    peer_inventory: BTreeMap<CaseId, HeadsHash>,
    /// Automerge sync state per case touched in this session.
    states: BTreeMap<CaseId, AmState>,
    /// The shared heads last persisted per case, to skip redundant writes.
    persisted_shared: BTreeMap<CaseId, Vec<ChangeHash>>,
    /// Local edits that arrived before the sync phase began.
    pending_local: BTreeSet<CaseId>,
    /// Data messages (inventory, case sync) received and sent.
    data_received: u64,
    data_sent: u64,
    last_idle_sent: Option<(u64, u64)>,
    peer_idle: Option<(u64, u64)>,
    /// The (received, sent) state at which we last reported quiescence.
    quiescent_at: Option<(u64, u64)>,
    /// We told the peer we fetched every blob we wanted.
    local_blobs_done: bool,
    /// The peer told us the same.
    peer_blobs_done: bool,
    stats: SessionStats,
}

impl Session {
    /// A session that has not started.
    pub fn new(config: SessionConfig) -> Self {
        let live = config.live;
        Session {
            config,
            phase: Phase::Hello,
            live,
            decoder: FrameDecoder::new(),
            outbox: VecDeque::new(),
            events: VecDeque::new(),
            local_inventory: Vec::new(),
            peer_inventory: BTreeMap::new(),
            states: BTreeMap::new(),
            persisted_shared: BTreeMap::new(),
            pending_local: BTreeSet::new(),
            data_received: 0,
            data_sent: 0,
            last_idle_sent: None,
            peer_idle: None,
            quiescent_at: None,
            local_blobs_done: false,
            peer_blobs_done: false,
            stats: SessionStats::default(),
        }
    }

    /// Takes the inventory and queues our hello. Call once, first.
    pub fn start(&mut self, store: &mut dyn CaseStore) -> Result<(), SessionError> {
        let result = self.start_inner(store);
        self.fail_on_err(result)
    }

    fn start_inner(&mut self, store: &mut dyn CaseStore) -> Result<(), SessionError> {
        let mut inventory: Vec<(CaseId, HeadsHash)> = store
            .inventory()?
            .into_iter()
            .map(|(id, heads)| (id, heads_hash(&heads)))
            .collect();
        inventory.sort_by(|a, b| a.0.cmp(&b.0));
        inventory.dedup_by(|a, b| a.0 == b.0);
        self.local_inventory = inventory;
        self.send(Message::Hello(Hello {
            version_min: self.config.version_min,
            version_max: self.config.version_max,
            live: self.config.live,
        }));
        Ok(())
    }

    /// Feeds bytes received from the peer and processes every complete
    /// frame. On error a [`Goodbye`] is queued for the peer (drain it with
    /// [`Session::poll_transmit`] before closing) and the session closes.
    pub fn handle_bytes(
        &mut self,
        bytes: &[u8],
        store: &mut dyn CaseStore,
    ) -> Result<(), SessionError> {
        if self.is_closed() {
            return Ok(());
        }
        self.decoder.push(bytes);
        let result = self.drain_frames(store);
        self.fail_on_err(result)
    }

    /// The peer finished its stream. Fine after convergence; anything else
    /// means the peer left mid-session.
    pub fn handle_peer_finished(&mut self) -> Result<(), SessionError> {
        if self.is_closed() {
            return Ok(());
        }
        let result = match self.decoder.finish() {
            Err(e) => Err(SessionError::Frame(e)),
            Ok(()) if self.phase == Phase::Sync && self.quiescent_at.is_some() => Ok(()),
            Ok(()) => Err(SessionError::Protocol(
                "peer closed its stream before the session converged".into(),
            )),
        };
        self.fail_on_err(result)
    }

    /// A case changed locally (a committed edit). In the sync phase its new
    /// changes are offered to the peer at once; earlier, it is remembered
    /// until the sync phase begins.
    pub fn handle_local_change(
        &mut self,
        case: &CaseId,
        store: &mut dyn CaseStore,
    ) -> Result<(), SessionError> {
        match self.phase {
            Phase::Sync => {
                let result = self
                    .offer_case(case, store)
                    .and_then(|()| self.after_input());
                self.fail_on_err(result)
            }
            Phase::Hello | Phase::Digest | Phase::Inventory => {
                self.pending_local.insert(case.clone());
                Ok(())
            }
            Phase::Finished | Phase::Closed => Ok(()),
        }
    }

    /// The next frame to send, already length-prefixed.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.outbox.pop_front()
    }

    /// The next event for the caller.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// True once a one-shot session converged.
    pub fn is_finished(&self) -> bool {
        self.phase == Phase::Finished
    }

    /// True once the session ended with an error.
    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed | Phase::Finished)
    }

    /// Counts so far.
    pub fn stats(&self) -> &SessionStats {
        &self.stats
    }

    fn fail_on_err(&mut self, result: Result<(), SessionError>) -> Result<(), SessionError> {
        if let Err(err) = &result {
            if let Some(goodbye) = err.goodbye() {
                self.send(Message::Goodbye(goodbye));
            }
            self.phase = Phase::Closed;
        }
        result
    }

    fn send(&mut self, msg: Message) {
        if matches!(msg, Message::Inventory { .. } | Message::CaseSync { .. }) {
            self.data_sent += 1;
        }
        self.stats.frames_sent += 1;
        self.outbox.push_back(encode_frame(&msg.encode()));
    }

    fn drain_frames(&mut self, store: &mut dyn CaseStore) -> Result<(), SessionError> {
        while let Some(payload) = self.decoder.next_frame()? {
            self.stats.frames_received += 1;
            let msg = Message::decode(&payload)?;
            self.handle_message(msg, store)?;
            if self.is_closed() {
                return Ok(());
            }
        }
        self.after_input()
    }

    fn handle_message(
        &mut self,
        msg: Message,
        store: &mut dyn CaseStore,
    ) -> Result<(), SessionError> {
        match (self.phase, msg) {
            (_, Message::Goodbye(g)) => Err(SessionError::PeerGoodbye {
                code: g.code,
                reason: g.reason,
            }),
            (Phase::Hello, Message::Hello(h)) => self.on_hello(h),
            (Phase::Digest, Message::Digest { count, root }) => self.on_digest(count, root, store),
            (Phase::Inventory, Message::Inventory { entries, last }) => {
                self.data_received += 1;
                self.on_inventory(entries, last, store)
            }
            (Phase::Sync, Message::CaseSync { case, data }) => {
                self.data_received += 1;
                self.on_case_sync(case, data, store)
            }
            (Phase::Sync, Message::Idle { received, sent }) => {
                self.peer_idle = Some((received, sent));
                Ok(())
            }
            (Phase::Sync, Message::BlobsDone) => {
                self.peer_blobs_done = true;
                Ok(())
            }
            (phase, msg) => Err(SessionError::Protocol(format!(
                "unexpected {} message in phase {phase:?}",
                msg.kind()
            ))),
        }
    }

    fn on_hello(&mut self, h: Hello) -> Result<(), SessionError> {
        let low = h.version_min.max(self.config.version_min);
        let high = h.version_max.min(self.config.version_max);
        if h.version_min > h.version_max || low > high {
            return Err(SessionError::VersionMismatch {
                ours_min: self.config.version_min,
                ours_max: self.config.version_max,
                theirs_min: h.version_min,
                theirs_max: h.version_max,
            });
        }
        self.live = self.config.live || h.live;
        self.events.push_back(Event::Connected {
            version: high,
            live: self.live,
        });
        let root = root_hash(&self.local_inventory);
        self.send(Message::Digest {
            count: self.local_inventory.len() as u64,
            root,
        });
        self.phase = Phase::Digest;
        Ok(())
    }

    fn on_digest(
        &mut self,
        count: u64,
        root: [u8; 32],
        store: &mut dyn CaseStore,
    ) -> Result<(), SessionError> {
        let ours = root_hash(&self.local_inventory);
        if count == self.local_inventory.len() as u64 && root == ours {
            return self.enter_sync(Vec::new(), store);
        }
        let inventory = std::mem::take(&mut self.local_inventory);
        let batches: Vec<&[(CaseId, HeadsHash)]> = if inventory.is_empty() {
            vec![&[]]
        } else {
            inventory.chunks(INVENTORY_ENTRIES_MAX).collect()
        };
        let n = batches.len();
        for (i, batch) in batches.into_iter().enumerate() {
            self.send(Message::Inventory {
                entries: batch.to_vec(),
                last: i + 1 == n,
            });
        }
        self.local_inventory = inventory;
        self.phase = Phase::Inventory;
        Ok(())
    }

    fn on_inventory(
        &mut self,
        entries: Vec<(CaseId, HeadsHash)>,
        last: bool,
        store: &mut dyn CaseStore,
    ) -> Result<(), SessionError> {
        for (id, hash) in entries {
            if let Some((prev, _)) = self.peer_inventory.last_key_value() {
                if *prev >= id {
                    return Err(SessionError::Protocol(
                        "inventory is not in strictly ascending case order".into(),
                    ));
                }
            }
            if self.peer_inventory.len() >= INVENTORY_TOTAL_MAX {
                return Err(SessionError::Protocol(format!(
                    "inventory exceeds {INVENTORY_TOTAL_MAX} cases"
                )));
            }
            self.peer_inventory.insert(id, hash);
        }
        if !last {
            return Ok(());
        }
        let differing: Vec<CaseId> = self
            .local_inventory
            .iter()
            .filter(|(id, hash)| self.peer_inventory.get(id) != Some(hash))
            .map(|(id, _)| id.clone())
            .collect();
        // The peer's inventory is only needed for this comparison.
        self.peer_inventory = BTreeMap::new();
        self.enter_sync(differing, store)
    }

    /// Starts the per-case phase: offers every differing case, plus local
    /// edits that arrived while the inventories were being compared.
    fn enter_sync(
        &mut self,
        mut cases: Vec<CaseId>,
        store: &mut dyn CaseStore,
    ) -> Result<(), SessionError> {
        self.phase = Phase::Sync;
        if !self.config.blob_transfer {
            self.local_blobs_done = true;
            self.send(Message::BlobsDone);
        }
        cases.extend(std::mem::take(&mut self.pending_local));
        cases.sort();
        cases.dedup();
        for id in cases {
            self.offer_case(&id, store)?;
        }
        Ok(())
    }

    /// Loads the sync state for `case`: this session's, else the persisted
    /// one, else fresh.
    fn state_for(
        &mut self,
        case: &CaseId,
        store: &mut dyn CaseStore,
    ) -> Result<&mut AmState, SessionError> {
        if !self.states.contains_key(case) {
            if self.states.len() >= ACTIVE_CASES_MAX {
                return Err(SessionError::Protocol(format!(
                    "session touches more than {ACTIVE_CASES_MAX} cases"
                )));
            }
            // A persisted state that no longer decodes is our own damaged
            // data; starting fresh costs a little bandwidth and loses nothing.
            let state = store
                .load_sync_state(case)?
                .and_then(|bytes| AmState::decode(&bytes).ok())
                .unwrap_or_default();
            self.persisted_shared
                .insert(case.clone(), state.shared_heads.clone());
            self.states.insert(case.clone(), state);
        }
        Ok(self.states.get_mut(case).expect("inserted above"))
    }

    /// Generates and queues our next sync message for a case we hold.
    fn offer_case(&mut self, case: &CaseId, store: &mut dyn CaseStore) -> Result<(), SessionError> {
        let Some(doc) = store.load(case)? else {
            return Ok(());
        };
        self.reply(case, &doc, store)
    }

    fn reply(
        &mut self,
        case: &CaseId,
        doc: &Automerge,
        store: &mut dyn CaseStore,
    ) -> Result<(), SessionError> {
        let state = self.state_for(case, store)?;
        if let Some(msg) = doc.generate_sync_message(state) {
            if !msg.changes.is_empty() {
                self.stats.cases_sent.insert(case.clone());
            }
            self.stats.case_messages_sent += 1;
            self.send(Message::CaseSync {
                case: case.clone(),
                data: msg.encode(),
            });
        }
        Ok(())
    }

    fn on_case_sync(
        &mut self,
        case: CaseId,
        data: Vec<u8>,
        store: &mut dyn CaseStore,
    ) -> Result<(), SessionError> {
        self.stats.case_messages_received += 1;
        let msg = AmMessage::decode(&data).map_err(|e| SessionError::BadSyncMessage {
            case: case.clone(),
            reason: e.to_string(),
        })?;
        let mut doc = store.load(&case)?.unwrap_or_default();
        let before = doc.get_heads();
        let state = self.state_for(&case, store)?;
        doc.receive_sync_message(state, msg)
            .map_err(|e| SessionError::BadSyncMessage {
                case: case.clone(),
                reason: e.to_string(),
            })?;
        let encoded = state.encode();
        let shared = state.shared_heads.clone();
        if doc.get_heads() != before {
            let outcome = store.commit(&case, &doc, &encoded).map_err(|e| match e {
                CommitError::Rejected(reason) => SessionError::Rejected {
                    case: case.clone(),
                    reason,
                },
                CommitError::Fault(f) => SessionError::Local(f),
            })?;
            if outcome.changed {
                self.stats.cases_received.insert(case.clone());
                self.stats.new_conflicts += u64::from(outcome.new_conflicts);
            }
            if outcome.created {
                self.stats.cases_created.insert(case.clone());
            }
            self.persisted_shared.insert(case.clone(), shared);
        } else if self.persisted_shared.get(&case) != Some(&shared) {
            store.save_sync_state(&case, &encoded)?;
            self.persisted_shared.insert(case.clone(), shared);
        }
        self.reply(&case, &doc, store)
    }

    /// Runs after each batch of input: announces quiescence and checks
    /// whether both sides have converged.
    fn after_input(&mut self) -> Result<(), SessionError> {
        if self.phase != Phase::Sync {
            return Ok(());
        }
        let counts = (self.data_received, self.data_sent);
        if self.last_idle_sent != Some(counts) {
            self.last_idle_sent = Some(counts);
            self.send(Message::Idle {
                received: counts.0,
                sent: counts.1,
            });
        }
        let converged = self.peer_idle == Some((self.data_sent, self.data_received));
        if converged && self.quiescent_at != Some(counts) {
            self.quiescent_at = Some(counts);
            self.events.push_back(Event::Quiescent);
        }
        if converged && !self.live && self.local_blobs_done && self.peer_blobs_done {
            self.phase = Phase::Finished;
            self.events.push_back(Event::Finished);
        }
        Ok(())
    }

    /// The caller finished fetching the attachments it wanted from this
    /// peer. A one-shot session finishes once both sides said so and the
    /// case records are converged.
    pub fn handle_local_blobs_done(&mut self) -> Result<(), SessionError> {
        if self.phase != Phase::Sync || self.local_blobs_done {
            return Ok(());
        }
        self.local_blobs_done = true;
        self.send(Message::BlobsDone);
        let result = self.after_input();
        self.fail_on_err(result)
    }
}
