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
//! 1. Both sides send [`Hello`] and, right behind it, [`Message::Since`]:
//!    the cursor they hold for the other's store. Each checks for a common
//!    version on its own; with none, each sends a [`Goodbye`] naming both
//!    ranges and stops.
//! 2. Each lists, in [`Message::Changes`] batches, the shared cases it
//!    changed after the peer's cursor (every local commit, including
//!    changes merged from third nodes, gets a new update sequence number),
//!    with a digest of their heads. A reconnect where nothing changed lists
//!    nothing: no per-case message is sent, whatever the number of cases.
//!    In protocol 2 a listing opens with [`Message::ListingStart`], and a
//!    node that remembers how far the peer had seen it (at their last
//!    convergence) lists from there in its first flight, a round trip
//!    before the peer's cursor arrives. If the cursor turns out to be
//!    older (the peer crashed before storing it, or was restored), the
//!    listing restarts from the cursor; the peer counts only a listing
//!    that starts at or before the cursor it sent.
//! 3. For each listed case it lacks, the receiver asks for the whole
//!    document ([`Message::Want`], batched); the lister answers with its
//!    saved bytes ([`Message::CaseDoc`]), one message per case and no
//!    Automerge sync state. For each listed case whose heads differ from
//!    its own, the receiver starts an Automerge sync. Requests, documents
//!    and offers are generated lazily, a bounded number at a time, so
//!    neither side ever holds all cases in memory. (With a version-1 peer,
//!    lacking cases are synced with Automerge too.)
//! 4. Automerge sync messages flow per case until neither side has more.
//!    A side that has listed everything, received the whole listing and
//!    has nothing to send says [`Message::Idle`] with its counts of data
//!    messages received and sent. When both sides' counts match, every
//!    message has been processed and the session has converged; only then
//!    does each side store the peer's cursor.
//!
//! Received changes are committed through the store before any reply that
//! depends on them is queued, so nothing we tell the peer runs ahead of our
//! disk, and a cursor never covers a change that is not durable here.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use automerge::sync::{BloomFilter, Have, Message as AmMessage, State as AmState, SyncDoc};
use automerge::{Automerge, ChangeHash};
use thiserror::Error;

use crate::frame::FRAME_BYTES_MAX;
use crate::frame::{encode_frame, FrameDecoder, FrameError};
use crate::inventory::heads_hash;
use crate::store::{Adopted, CaseStore, CommitError, ListedUpto, StoreFault, WholeDoc};
use crate::wire::{
    CaseId, ChangesEnd, DecodeError, Goodbye, GoodbyeCode, HeadsHash, Hello, Message, StoreId,
    CHANGES_ENTRIES_MAX, PROTOCOL_VERSION, PROTOCOL_VERSION_MIN, WANT_CASES_MAX,
};

/// First protocol version with whole-document transfer.
const WHOLE_DOCS_VERSION: u16 = 2;

/// First protocol version with [`Message::ListingStart`] and listings sent
/// before the peer's cursor arrives.
const OPTIMISTIC_LISTING_VERSION: u16 = 2;

/// First protocol version with [`Message::Part`].
const PARTS_VERSION: u16 = 3;

/// First protocol version with [`Message::CasePush`].
const PUSH_VERSION: u16 = 4;

/// Listed cases one session pushes at most. A reconnect with a handful of
/// changed cases pushes them all; past this, the peer asks for the rest
/// the usual way, so the sync states held for pushes stay bounded.
pub const PUSHES_MAX: usize = 512;

/// Exchanges that ended without an answer (see [`Message::CasePush`])
/// whose shared heads a session records at convergence. Past this, a
/// case's stored state stays where it was: its next exchange costs a
/// message more, nothing else.
const UNANSWERED_MAX: usize = 65_536;

/// Cases sent whole per session whose heads are recorded as shared with
/// the peer at convergence, so their next change is pushed. A reconnect's
/// new cases fit; a first sync's thousands would cost as many writes at
/// its very end, so past this they are not recorded, and each costs two
/// messages the first time it changes.
const WHOLE_RECORDED_MAX: usize = 1024;

/// Case messages whose payload is larger than this are sent in parts, so
/// a large case shares the link with the small ones behind it instead of
/// holding them back: at 1 Mbit/s an 8 MiB frame is a minute of nothing
/// else. Below it, a message costs at most a fraction of a second.
pub const SPLIT_ABOVE_BYTES: usize = 32 * 1024;

/// Bytes of one [`Message::Part`]. Whole frames and parts alternate by
/// bytes (see [`Session::poll_transmit`]), so a small message waits behind
/// at most this much of a large one in our queue.
pub const PART_BYTES: usize = 16 * 1024;

/// Bytes of split messages generated ahead of the transport. Generating
/// stops here until they are sent, as it does at
/// [`OUTBOX_FRAMES_TARGET`] for whole frames, so memory stays bounded when
/// many large cases are asked for at once.
const LARGE_QUEUED_BYTES_MAX: usize = 2 * FRAME_BYTES_MAX;

/// Largest saved document sent whole: what fits in one frame with its
/// case id and lengths. A larger case is synced with Automerge instead.
const CASE_DOC_BYTES_MAX: usize = FRAME_BYTES_MAX - 128;

/// Cases received whole that are committed together (in one call to the
/// store, which may check them in parallel).
const DOCS_BATCH_MAX: usize = 256;

/// Bytes of cases received whole held before they are committed.
const DOCS_BATCH_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Whole documents requested and not yet received. More requests wait, so
/// the peer's queue of documents to send us stays bounded by what we
/// asked, and so does ours.
pub const WANTS_IN_FLIGHT_MAX: usize = 2 * WANT_CASES_MAX;

/// Most cases one session may queue offers for (the peer's listing of cases
/// that differ). A case id costs about 150 bytes here, so a listing without
/// end is refused at about 150 MB; a district hub with hundreds of
/// thousands of cases stays well inside.
pub const ACTIVE_CASES_MAX: usize = 1_000_000;

/// Cases we have offered and not yet seen converge. New offers wait while
/// this many exchanges are open, so memory for Automerge sync states stays
/// bounded however many cases differ, and a peer that never answers stalls
/// its own session instead of growing ours.
pub const OFFERS_IN_FLIGHT_MAX: usize = 1024;

/// Most Automerge sync states one session holds at once. An honest peer
/// keeps at most [`OFFERS_IN_FLIGHT_MAX`] exchanges open, and so do we; a
/// converged case's state is dropped. More means the peer is flooding us
/// with offers for cases it never finishes.
pub const SYNC_STATES_MAX: usize = 16 * OFFERS_IN_FLIGHT_MAX;

/// Frames the session generates ahead of the transport. Lazily generated
/// listings and offers stop here, so a first sync of 100,000 cases holds a
/// few dozen messages in memory, not every document.
pub const OUTBOX_FRAMES_TARGET: usize = 64;

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
    /// Case messages above this many bytes are sent in parts (protocol 3;
    /// [`SPLIT_ABOVE_BYTES`]). Tests lower it so that every case goes in
    /// parts.
    pub split_above_bytes: usize,
    /// Bytes per part ([`PART_BYTES`]); at least 1.
    pub part_bytes: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            live: false,
            version_min: PROTOCOL_VERSION_MIN,
            version_max: PROTOCOL_VERSION,
            blob_transfer: false,
            split_above_bytes: SPLIT_ABOVE_BYTES,
            part_bytes: PART_BYTES,
        }
    }
}

/// Where the session is in the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the peer's hello.
    Hello,
    /// Exchanging change listings and per-case Automerge sync messages.
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
    /// Every case record the peer will send in this session is here: its
    /// listing is complete, nothing we asked for is outstanding, and we
    /// listed nothing it could start an exchange about. The caller may
    /// fetch attachments now instead of waiting for [`Event::Quiescent`],
    /// which costs another round trip. Emitted at most once per session.
    NothingMoreToReceive,
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
    /// Cases received as whole documents (a subset of `cases_received`).
    pub whole_docs_received: u64,
    /// Cases sent as whole documents.
    pub whole_docs_sent: u64,
    /// Frames we sent, of any kind.
    pub frames_sent: u64,
    /// Frames we received, of any kind.
    pub frames_received: u64,
    /// Session bytes we sent (frames with their headers), excluding QUIC
    /// and TLS overhead.
    pub bytes_sent: u64,
    /// Session bytes we received.
    pub bytes_received: u64,
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
    /// The protocol version agreed with the peer (0 before its hello).
    version: u16,
    live: bool,
    decoder: FrameDecoder,
    /// What to send, in order; see [`Session::poll_transmit`] for which
    /// items may overtake which.
    outbox: VecDeque<Outgoing>,
    /// Payload bytes of the split messages in `outbox`.
    large_bytes: usize,
    /// Bytes of whole frames sent since the last part.
    since_part: usize,
    /// The split message being received, joined so far.
    assembling: Vec<u8>,
    events: VecDeque<Event>,
    /// Our store's id, sent with our listing's end.
    store_id: StoreId,
    /// Our update sequence number when the session started: our listing
    /// covers changes up to here.
    list_upto: u64,
    /// How far our listing has been sent; `None` until the peer's cursor
    /// arrived.
    list_after: Option<u64>,
    /// Our listing was sent completely.
    list_done: bool,
    /// Where our current listing started (protocol 2 tells the peer).
    list_from: u64,
    /// We started listing before the peer's cursor arrived.
    optimistic: bool,
    /// The protocol version remembered with that listing position (what
    /// the peer spoke when we last converged); 0 if none.
    remembered_version: u16,
    /// Cases we pushed ([`Message::CasePush`]) in this session; not
    /// offered when the peer lists them, since the push started their
    /// exchange.
    pushed: BTreeSet<CaseId>,
    /// Of those, the ones the peer has not answered, with the heads we
    /// pushed: recorded as shared with the peer once the session converges.
    pushed_unanswered: BTreeMap<CaseId, Vec<ChangeHash>>,
    /// We pushed before the peer's hello said which version it speaks.
    pushed_before_hello: bool,
    /// Cases sent whole whose heads we record as shared at convergence
    /// (see [`WHOLE_RECORDED_MAX`]).
    whole_recorded: usize,
    /// The peer's cursor named our store: it has synced with us before.
    peer_knows_us: bool,
    /// Cases the peer pushed to us while its listing was open; not offered
    /// when their entries arrive (the push started their exchange).
    pushes_received: BTreeSet<CaseId>,
    /// Entries our listings carried so far.
    listed_entries: u64,
    /// The cursor we sent the peer (the sequence number of its store we
    /// have seen; 0 if we hold none for the store it turns out to have).
    since_sent: ([u8; 16], u64),
    /// Where the peer's current listing started ([`Message::ListingStart`];
    /// protocol 1 has none, and its listings always start at our cursor).
    peer_listing_from: Option<u64>,
    /// [`Event::NothingMoreToReceive`] was emitted.
    nothing_more_sent: bool,
    /// The end of the peer's listing, once received.
    peer_end: Option<ChangesEnd>,
    /// The peer's cursor was stored (once per session).
    cursor_saved: bool,
    /// Cases to offer, in order, generated lazily.
    to_offer: VecDeque<CaseId>,
    /// The same cases, to avoid queueing one twice.
    queued: BTreeSet<CaseId>,
    /// Cases we lack, to request whole, in listing order.
    to_want: VecDeque<CaseId>,
    /// Cases in `to_want` or requested and not yet received.
    wanted: BTreeSet<CaseId>,
    /// How many of `wanted` were requested (sent in a [`Message::Want`]).
    wants_in_flight: usize,
    /// Cases the peer asked for whole, to send in order.
    peer_wants: VecDeque<CaseId>,
    /// Cases received whole, not yet committed (see [`Session::flush_docs`]).
    docs: Vec<WholeDoc>,
    /// Their saved bytes.
    docs_bytes: usize,
    /// Cases with an exchange in progress (see [`OFFERS_IN_FLIGHT_MAX`]).
    in_flight: BTreeSet<CaseId>,
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

/// One item of the outbox.
enum Outgoing {
    /// A whole frame, length-prefixed.
    Frame {
        frame: Vec<u8>,
        /// An [`Message::Idle`]: a barrier in the outbox.
        idle: bool,
    },
    /// A case message sent in parts ([`Message::Part`]).
    Large {
        case: CaseId,
        /// The encoded message.
        payload: Vec<u8>,
        /// Bytes of it already sent.
        sent: usize,
    },
}

impl Session {
    /// A session that has not started.
    pub fn new(config: SessionConfig) -> Self {
        let live = config.live;
        Session {
            config,
            phase: Phase::Hello,
            version: 0,
            live,
            decoder: FrameDecoder::new(),
            outbox: VecDeque::new(),
            large_bytes: 0,
            since_part: 0,
            assembling: Vec::new(),
            events: VecDeque::new(),
            store_id: [0; 16],
            list_upto: 0,
            list_after: None,
            list_done: false,
            list_from: 0,
            optimistic: false,
            remembered_version: 0,
            pushed: BTreeSet::new(),
            pushed_unanswered: BTreeMap::new(),
            pushed_before_hello: false,
            whole_recorded: 0,
            peer_knows_us: false,
            pushes_received: BTreeSet::new(),
            listed_entries: 0,
            since_sent: ([0; 16], 0),
            peer_listing_from: None,
            nothing_more_sent: false,
            peer_end: None,
            cursor_saved: false,
            to_offer: VecDeque::new(),
            queued: BTreeSet::new(),
            to_want: VecDeque::new(),
            wanted: BTreeSet::new(),
            wants_in_flight: 0,
            peer_wants: VecDeque::new(),
            docs: Vec::new(),
            docs_bytes: 0,
            in_flight: BTreeSet::new(),
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

    /// Queues our hello and our cursor for the peer. Call once, first.
    pub fn start(&mut self, store: &mut dyn CaseStore) -> Result<(), SessionError> {
        let result = self.start_inner(store);
        self.fail_on_err(result)
    }

    fn start_inner(&mut self, store: &mut dyn CaseStore) -> Result<(), SessionError> {
        self.store_id = store.store_id()?;
        self.list_upto = store.current_seq()?;
        let (peer_store, seq) = store.peer_cursor()?.unwrap_or(([0; 16], 0));
        self.since_sent = (peer_store, seq);
        self.send(Message::Hello(Hello {
            version_min: self.config.version_min,
            version_max: self.config.version_max,
            live: self.config.live,
        }));
        self.send(Message::Since {
            store_id: peer_store,
            seq,
        });
        // A remembered position beyond our counter (our store was restored
        // from an older copy) is no position at all.
        let remembered = store.listed_upto()?.filter(|r| r.seq <= self.list_upto);
        if let (Some(r), true) = (
            remembered,
            self.config.version_max >= OPTIMISTIC_LISTING_VERSION,
        ) {
            self.optimistic = true;
            self.remembered_version = r.version;
            self.start_listing(r.seq);
        }
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
                // Pushed at once when we synced the case with this peer
                // before (protocol 4): one message. Otherwise offered
                // ahead of any queued backlog: a person is waiting.
                let result = self.push_case(case, store).and_then(|pushed| {
                    if !pushed && self.queued.insert(case.clone()) {
                        self.to_offer.push_front(case.clone());
                    }
                    self.fill_inner(store)?;
                    self.after_input(store)
                });
                self.fail_on_err(result)
            }
            Phase::Hello => {
                self.pending_local.insert(case.clone());
                Ok(())
            }
            Phase::Finished | Phase::Closed => Ok(()),
        }
    }

    /// The next frame to send, already length-prefixed.
    ///
    /// Frames leave in the order they were queued, with one exception: a
    /// whole frame may overtake a message being sent in parts, and the
    /// two alternate by bytes, so a large case takes at most half the link
    /// while small ones are waiting. Nothing overtakes an
    /// [`Message::Idle`], and it overtakes nothing: its counts describe
    /// exactly the messages before it. Later messages for a case with a
    /// split message queued are queued behind it (see [`Session::send`]),
    /// so one case's messages never reorder.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        if self.large_bytes == 0 {
            // Nothing is being split (the usual case): plain order.
            return match self.outbox.pop_front()? {
                Outgoing::Frame { frame, .. } => Some(frame),
                Outgoing::Large { .. } => unreachable!("large_bytes counts every split message"),
            };
        }
        // Items before the first Idle may go in any order described above.
        let window = self
            .outbox
            .iter()
            .position(|o| matches!(o, Outgoing::Frame { idle: true, .. }))
            .unwrap_or(self.outbox.len());
        let first_large = self
            .outbox
            .iter()
            .take(window)
            .position(|o| matches!(o, Outgoing::Large { .. }));
        let first_whole = self
            .outbox
            .iter()
            .take(window)
            .position(|o| matches!(o, Outgoing::Frame { .. }));
        let take_part = match (first_large, first_whole) {
            (Some(_), None) => true,
            (Some(large), Some(whole)) => {
                large < whole && self.since_part >= self.config.part_bytes
            }
            (None, _) => false,
        };
        if take_part {
            let index = first_large.expect("take_part implies a split message");
            self.since_part = 0;
            return Some(self.next_part(index));
        }
        let frame = match first_whole {
            Some(index) => self.outbox.remove(index),
            None => self.outbox.pop_front(), // the Idle at the front
        };
        match frame? {
            Outgoing::Frame { frame, .. } => {
                self.since_part += frame.len();
                Some(frame)
            }
            Outgoing::Large { .. } => unreachable!("only whole frames are taken here"),
        }
    }

    /// Cuts the next part off the split message at `index`, dropping the
    /// message once its last part is out.
    fn next_part(&mut self, index: usize) -> Vec<u8> {
        let Some(Outgoing::Large { payload, sent, .. }) = self.outbox.get_mut(index) else {
            unreachable!("the caller found a split message at this index")
        };
        let offset = *sent;
        let end = (offset + self.config.part_bytes.max(1)).min(payload.len());
        let last = end == payload.len();
        let bytes = payload[offset..end].to_vec();
        *sent = end;
        if last {
            self.large_bytes -= payload.len();
            self.outbox.remove(index);
        }
        let frame = encode_frame(
            &Message::Part {
                offset: offset as u64,
                last,
                bytes,
            }
            .encode(),
        );
        self.stats.frames_sent += 1;
        self.stats.bytes_sent += frame.len() as u64;
        frame
    }

    /// Generates more frames (listing batches, case offers) when the
    /// outbox runs low. Every `handle_*` call does this too; a transport
    /// calls it after draining the outbox so a long backlog keeps flowing
    /// even while the peer is quiet.
    pub fn fill(&mut self, store: &mut dyn CaseStore) -> Result<(), SessionError> {
        if !self.may_list() {
            return Ok(());
        }
        let result = self
            .fill_inner(store)
            .and_then(|()| self.after_input(store));
        self.fail_on_err(result)
    }

    /// True when frames (or parts) are waiting in the outbox.
    pub fn has_queued(&self) -> bool {
        !self.outbox.is_empty()
    }

    /// True while listing batches, requests, documents or case offers can
    /// be generated now. Requests and offers held back by their in-flight
    /// bounds do not count: a transport that waited for send room on their
    /// account would spin, filling nothing, until the peer answers.
    pub fn has_backlog(&self) -> bool {
        self.may_list()
            && ((self.list_after.is_some() && !self.list_done)
                || !self.peer_wants.is_empty()
                || (!self.to_want.is_empty() && self.wants_in_flight < WANTS_IN_FLIGHT_MAX)
                || (!self.to_offer.is_empty() && self.in_flight.len() < OFFERS_IN_FLIGHT_MAX))
    }

    /// Listings may be generated: in the sync phase, or before it when we
    /// list optimistically.
    fn may_list(&self) -> bool {
        self.phase == Phase::Sync || (self.phase == Phase::Hello && self.optimistic)
    }

    /// Starts (or restarts) our listing after sequence number `after`.
    fn start_listing(&mut self, after: u64) {
        self.list_after = Some(after);
        self.list_from = after;
        self.list_done = false;
        self.send(Message::ListingStart { after });
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
            // The peer gets the Goodbye after the small frames, not after
            // megabytes of a case it can no longer use.
            self.outbox.retain(|o| matches!(o, Outgoing::Frame { .. }));
            self.large_bytes = 0;
            if let Some(goodbye) = err.goodbye() {
                self.send(Message::Goodbye(goodbye));
            }
            self.phase = Phase::Closed;
        }
        result
    }

    fn send(&mut self, msg: Message) {
        if matches!(
            msg,
            Message::Changes { .. }
                | Message::CaseSync { .. }
                | Message::CasePush { .. }
                | Message::Want { .. }
                | Message::CaseDoc { .. }
        ) {
            self.data_sent += 1;
        }
        let payload = msg.encode();
        let case = match &msg {
            Message::CaseSync { case, .. } | Message::CaseDoc { case, .. } => Some(case),
            _ => None,
        };
        if let Some(case) = case.filter(|_| self.version >= PARTS_VERSION) {
            // Behind a split message for the same case, even a small one
            // waits its turn: one case's messages keep their order.
            let behind = self.large_bytes > 0
                && self.outbox.iter().any(|o| match o {
                    Outgoing::Large { case: c, .. } => c == case,
                    Outgoing::Frame { .. } => false,
                });
            if behind || payload.len() > self.config.split_above_bytes {
                self.large_bytes += payload.len();
                self.outbox.push_back(Outgoing::Large {
                    case: case.clone(),
                    payload,
                    sent: 0,
                });
                return;
            }
        }
        self.stats.frames_sent += 1;
        let frame = encode_frame(&payload);
        self.stats.bytes_sent += frame.len() as u64;
        self.outbox.push_back(Outgoing::Frame {
            frame,
            idle: matches!(msg, Message::Idle { .. }),
        });
    }

    /// Joins a [`Message::Part`] to the message being received; the whole
    /// message once the last part is in.
    fn on_part(
        &mut self,
        offset: u64,
        last: bool,
        bytes: Vec<u8>,
    ) -> Result<Option<Message>, SessionError> {
        if self.phase != Phase::Sync || self.version < PARTS_VERSION {
            return Err(SessionError::Protocol(format!(
                "unexpected part message in phase {:?} of protocol {}",
                self.phase, self.version
            )));
        }
        if bytes.is_empty() && !last {
            return Err(SessionError::Protocol("peer sent an empty part".into()));
        }
        // A part out of place would join into a message that may still
        // decode, with damaged changes inside that Automerge skips without
        // a word; the exchange would then ask for them forever.
        if offset != self.assembling.len() as u64 {
            return Err(SessionError::Protocol(format!(
                "peer sent a part for offset {offset}; {} bytes of the message are in",
                self.assembling.len()
            )));
        }
        if self.assembling.len() + bytes.len() > FRAME_BYTES_MAX {
            return Err(SessionError::Protocol(format!(
                "peer's message in parts exceeds {FRAME_BYTES_MAX} bytes"
            )));
        }
        self.assembling.extend_from_slice(&bytes);
        if !last {
            return Ok(None);
        }
        let whole = std::mem::take(&mut self.assembling);
        match Message::decode(&whole)? {
            msg @ (Message::CaseSync { .. } | Message::CaseDoc { .. }) => Ok(Some(msg)),
            other => Err(SessionError::Protocol(format!(
                "peer sent a {} message in parts; only case messages are split",
                other.kind()
            ))),
        }
    }

    fn drain_frames(&mut self, store: &mut dyn CaseStore) -> Result<(), SessionError> {
        while let Some(payload) = self.decoder.next_frame()? {
            self.stats.frames_received += 1;
            self.stats.bytes_received += (payload.len() + crate::frame::FRAME_HEADER_BYTES) as u64;
            let msg = match Message::decode(&payload)? {
                Message::Part {
                    offset,
                    last,
                    bytes,
                } => match self.on_part(offset, last, bytes)? {
                    Some(whole) => whole,
                    None => continue,
                },
                Message::Idle { .. } if !self.assembling.is_empty() => {
                    return Err(SessionError::Protocol(
                        "peer said Idle in the middle of a message in parts".into(),
                    ));
                }
                msg => msg,
            };
            if !matches!(msg, Message::CaseDoc { .. }) {
                self.flush_docs(store)?;
            }
            self.handle_message(msg, store)?;
            if self.is_closed() {
                return Ok(());
            }
        }
        self.flush_docs(store)?;
        self.fill_inner(store)?;
        self.after_input(store)
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
            (Phase::Hello, Message::Hello(h)) => self.on_hello(h, store),
            (Phase::Sync, Message::Since { store_id, seq }) => self.on_since(store_id, seq, store),
            (Phase::Sync, Message::ListingStart { after })
                if self.version >= OPTIMISTIC_LISTING_VERSION =>
            {
                self.on_listing_start(after)
            }
            (Phase::Sync, Message::Changes { entries, end }) => {
                self.data_received += 1;
                self.on_changes(entries, end, store)
            }
            (Phase::Sync, Message::CaseSync { case, data }) => {
                self.data_received += 1;
                self.on_case_sync(case, data, store)
            }
            (Phase::Sync, Message::CasePush { case, data }) if self.version >= PUSH_VERSION => {
                self.data_received += 1;
                self.on_case_push(case, data, store)
            }
            (Phase::Sync, Message::Want { cases }) if self.version >= WHOLE_DOCS_VERSION => {
                self.data_received += 1;
                self.on_want(cases)
            }
            (Phase::Sync, Message::CaseDoc { case, data })
                if self.version >= WHOLE_DOCS_VERSION =>
            {
                self.data_received += 1;
                self.on_case_doc(case, data, store)
            }
            (Phase::Sync, Message::Idle { received, sent }) => self.on_idle(received, sent),
            (Phase::Sync, Message::BlobsDone) if self.peer_blobs_done => {
                Err(SessionError::Protocol("peer sent BlobsDone twice".into()))
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

    /// Checks the peer's Idle against what an honest peer can say, so that
    /// an endless stream of Idle frames cannot keep a session (and its
    /// connection slot and task) alive forever while nothing is exchanged.
    ///
    /// An honest peer sends Idle only after its data messages, on the same
    /// ordered stream, so its `sent` count is exactly what we have received
    /// by then and its `received` count at most what we have sent. And it
    /// sends Idle only when its counts moved since its last Idle
    /// ([`Session::after_input`]), so two Idles in a row never carry the
    /// same counts. Either break is a protocol error.
    fn on_idle(&mut self, received: u64, sent: u64) -> Result<(), SessionError> {
        if sent != self.data_received || received > self.data_sent {
            return Err(SessionError::Protocol(format!(
                "peer's Idle claims {sent} data messages sent and {received} received; \
                 we received {} and sent {}",
                self.data_received, self.data_sent
            )));
        }
        if self.peer_idle == Some((received, sent)) {
            return Err(SessionError::Protocol(
                "peer repeated an Idle with unchanged counts".into(),
            ));
        }
        self.peer_idle = Some((received, sent));
        Ok(())
    }

    fn on_hello(&mut self, h: Hello, store: &mut dyn CaseStore) -> Result<(), SessionError> {
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
        self.version = high;
        if self.optimistic && high < OPTIMISTIC_LISTING_VERSION {
            // Our first flight carried a listing this peer cannot read (it
            // was downgraded); it will refuse it. Forget the position so
            // the next session waits for its cursor.
            store.save_listed_upto(None)?;
            return Err(SessionError::Protocol(format!(
                "the peer now speaks protocol {high}, too old for the listing we opened with; \
                 the next sync will work"
            )));
        }
        if self.pushed_before_hello && high < PUSH_VERSION {
            // The same for changes we pushed in our first flight.
            store.save_listed_upto(None)?;
            return Err(SessionError::Protocol(format!(
                "the peer now speaks protocol {high}, too old for the changes we opened with; \
                 the next sync will work"
            )));
        }
        self.events.push_back(Event::Connected {
            version: high,
            live: self.live,
        });
        self.phase = Phase::Sync;
        if !self.config.blob_transfer {
            self.local_blobs_done = true;
            self.send(Message::BlobsDone);
        }
        for case in std::mem::take(&mut self.pending_local) {
            self.queue_offer(case)?;
        }
        Ok(())
    }

    /// The peer's cursor for our store. A cursor for another store (we
    /// were re-initialised) or beyond our counter (restored from an older
    /// backup) cannot be trusted: we list everything.
    fn on_since(
        &mut self,
        store_id: StoreId,
        seq: u64,
        store: &mut dyn CaseStore,
    ) -> Result<(), SessionError> {
        if self.list_after.is_some() && !self.optimistic {
            return Err(SessionError::Protocol(
                "a second cursor in one session".into(),
            ));
        }
        let after = if store_id == self.store_id && seq <= self.list_upto {
            seq
        } else {
            0
        };
        self.peer_knows_us = store_id == self.store_id && seq > 0;
        if std::mem::replace(&mut self.optimistic, false) {
            if !listing_covers(self.list_from, self.store_id, (store_id, seq)) {
                // The peer has seen less than we remembered: list again
                // from its cursor, and do not start from our memory next
                // time until a session converges again.
                store.save_listed_upto(None)?;
                self.start_listing(after);
            }
            return Ok(());
        }
        if self.version >= OPTIMISTIC_LISTING_VERSION {
            self.start_listing(after);
        } else {
            self.list_after = Some(after);
        }
        Ok(())
    }

    /// The peer opens (or restarts) a listing; see [`listing_covers`] for
    /// which one counts.
    fn on_listing_start(&mut self, after: u64) -> Result<(), SessionError> {
        if self.peer_end.is_some() {
            return Err(SessionError::Protocol(
                "a new listing after the end of a complete one".into(),
            ));
        }
        self.peer_listing_from = Some(after);
        Ok(())
    }

    fn on_changes(
        &mut self,
        entries: Vec<(CaseId, HeadsHash)>,
        end: Option<ChangesEnd>,
        store: &mut dyn CaseStore,
    ) -> Result<(), SessionError> {
        if self.peer_end.is_some() {
            return Err(SessionError::Protocol(
                "changes after the end of the listing".into(),
            ));
        }
        if self.version >= OPTIMISTIC_LISTING_VERSION && self.peer_listing_from.is_none() {
            return Err(SessionError::Protocol(
                "a change listing without its start".into(),
            ));
        }
        for (case, hash) in entries {
            // A case pushed either way has its exchange running already.
            if self.pushed.contains(&case) || self.pushes_received.contains(&case) {
                continue;
            }
            match store.heads(&case)? {
                Some(ours) if heads_hash(&ours) == hash => {}
                Some(_) => self.queue_offer(case)?,
                None if self.version >= WHOLE_DOCS_VERSION => self.queue_want(case)?,
                None => self.queue_offer(case)?,
            }
        }
        match (end, self.peer_listing_from) {
            (None, _) => {}
            (Some(end), Some(from)) if !listing_covers(from, end.store_id, self.since_sent) => {
                // A listing from the peer's memory that misses part of
                // what we lack; the peer restarts it from our cursor.
                self.peer_listing_from = None;
            }
            (Some(end), _) => {
                self.peer_end = Some(end);
                self.pushes_received.clear();
            }
        }
        Ok(())
    }

    /// Counts cases this session holds in a queue against
    /// [`ACTIVE_CASES_MAX`].
    fn check_active(&self) -> Result<(), SessionError> {
        if self.queued.len() + self.wanted.len() >= ACTIVE_CASES_MAX {
            return Err(SessionError::Protocol(format!(
                "session would touch more than {ACTIVE_CASES_MAX} cases"
            )));
        }
        Ok(())
    }

    fn queue_want(&mut self, case: CaseId) -> Result<(), SessionError> {
        if self.wanted.contains(&case) || self.queued.contains(&case) {
            return Ok(());
        }
        self.check_active()?;
        self.wanted.insert(case.clone());
        self.to_want.push_back(case);
        Ok(())
    }

    /// The peer lacks these cases: queue their documents.
    fn on_want(&mut self, cases: Vec<CaseId>) -> Result<(), SessionError> {
        if self.peer_wants.len() + cases.len() > ACTIVE_CASES_MAX {
            return Err(SessionError::Protocol(format!(
                "peer wants more than {ACTIVE_CASES_MAX} cases at once"
            )));
        }
        self.peer_wants.extend(cases);
        Ok(())
    }

    /// A case we asked for arrived whole. It waits in a batch, committed
    /// (see [`Session::flush_docs`]) before any other message is handled
    /// and before anything is said to the peer.
    fn on_case_doc(
        &mut self,
        case: CaseId,
        data: Vec<u8>,
        store: &mut dyn CaseStore,
    ) -> Result<(), SessionError> {
        if !self.wanted.remove(&case) {
            return Err(SessionError::Protocol(format!(
                "peer sent case {case} whole without being asked"
            )));
        }
        // Every document answers a request we counted; a dishonest peer's
        // extra answers were refused above, so this never underflows.
        self.wants_in_flight = self.wants_in_flight.saturating_sub(1);
        self.stats.case_messages_received += 1;
        self.docs_bytes += data.len();
        self.docs.push(WholeDoc { case, saved: data });
        if self.docs.len() >= DOCS_BATCH_MAX || self.docs_bytes >= DOCS_BATCH_BYTES_MAX {
            self.flush_docs(store)?;
        }
        Ok(())
    }

    /// Commits the batch of cases received whole. Each is stored with a
    /// sync state that records both sides at its heads, so the next
    /// exchange for it starts from there. A document that is not usable
    /// (the sender's copy is damaged, or it sent nothing) is synced with
    /// Automerge instead, which finds damage on the side that has it.
    fn flush_docs(&mut self, store: &mut dyn CaseStore) -> Result<(), SessionError> {
        if self.docs.is_empty() {
            return Ok(());
        }
        self.docs_bytes = 0;
        let docs = std::mem::take(&mut self.docs);
        let cases: Vec<CaseId> = docs.iter().map(|d| d.case.clone()).collect();
        let adopted = store.adopt_batch(docs).map_err(|(case, e)| match e {
            CommitError::Rejected(reason) => SessionError::Rejected { case, reason },
            CommitError::Fault(f) => SessionError::Local(f),
        })?;
        for (case, adopted) in cases.into_iter().zip(adopted) {
            match adopted {
                Adopted::Unusable => self.queue_offer(case)?,
                Adopted::Stored(outcome) => {
                    self.stats.whole_docs_received += 1;
                    if outcome.changed {
                        self.stats.cases_received.insert(case.clone());
                        self.stats.new_conflicts += u64::from(outcome.new_conflicts);
                    }
                    if outcome.created {
                        self.stats.cases_created.insert(case);
                    }
                }
            }
        }
        Ok(())
    }

    /// Sends one case the peer asked for, whole if it fits in a frame.
    fn send_case_doc(
        &mut self,
        case: CaseId,
        store: &mut dyn CaseStore,
    ) -> Result<(), SessionError> {
        let data = match store.load_saved(&case)? {
            Some(bytes) if bytes.len() <= CASE_DOC_BYTES_MAX => {
                self.stats.whole_docs_sent += 1;
                self.stats.cases_sent.insert(case.clone());
                // Remember what the peer will hold, so that this case's
                // next change can be pushed: for a reconnect's few new
                // cases, not for a first sync's thousands (their writes
                // would hold back the end of the session).
                if self.version >= PUSH_VERSION && self.whole_recorded < WHOLE_RECORDED_MAX {
                    if let Some(heads) = store.heads(&case)? {
                        self.whole_recorded += 1;
                        self.finish_unanswered(&case, heads);
                    }
                }
                bytes
            }
            _ => Vec::new(),
        };
        self.stats.case_messages_sent += 1;
        self.send(Message::CaseDoc { case, data });
        Ok(())
    }

    fn queue_offer(&mut self, case: CaseId) -> Result<(), SessionError> {
        if self.queued.contains(&case) {
            return Ok(());
        }
        if self.queued.len() + self.wanted.len() >= ACTIVE_CASES_MAX {
            return Err(SessionError::Protocol(format!(
                "session would touch more than {ACTIVE_CASES_MAX} cases"
            )));
        }
        self.queued.insert(case.clone());
        self.to_offer.push_back(case);
        Ok(())
    }

    /// Generates listing batches and offers until the outbox holds
    /// [`OUTBOX_FRAMES_TARGET`] frames or nothing is left to generate.
    fn fill_inner(&mut self, store: &mut dyn CaseStore) -> Result<(), SessionError> {
        while self.outbox.len() < OUTBOX_FRAMES_TARGET && self.large_bytes < LARGE_QUEUED_BYTES_MAX
        {
            if let (Some(after), false) = (self.list_after, self.list_done) {
                let (page, last) =
                    store.changes_page(after, self.list_upto, CHANGES_ENTRIES_MAX)?;
                if self.may_push() {
                    for changed in &page {
                        if self.pushed.len() >= PUSHES_MAX {
                            break;
                        }
                        self.try_push(&changed.case, store)?;
                    }
                }
                let entries: Vec<(CaseId, HeadsHash)> = page
                    .into_iter()
                    .map(|c| (c.case, heads_hash(&c.heads)))
                    .collect();
                let done = last >= self.list_upto || entries.is_empty();
                self.listed_entries += entries.len() as u64;
                self.list_after = Some(last);
                self.list_done = done;
                self.send(Message::Changes {
                    entries,
                    end: done.then_some(ChangesEnd {
                        store_id: self.store_id,
                        upto: self.list_upto,
                    }),
                });
                continue;
            }
            if !self.to_want.is_empty() && self.wants_in_flight < WANTS_IN_FLIGHT_MAX {
                let room = (WANTS_IN_FLIGHT_MAX - self.wants_in_flight).min(WANT_CASES_MAX);
                let n = room.min(self.to_want.len());
                let cases: Vec<CaseId> = self.to_want.drain(..n).collect();
                self.wants_in_flight += n;
                self.send(Message::Want { cases });
                continue;
            }
            if let Some(case) = self.peer_wants.pop_front() {
                self.send_case_doc(case, store)?;
                continue;
            }
            if self.in_flight.len() >= OFFERS_IN_FLIGHT_MAX {
                break;
            }
            let Some(case) = self.to_offer.pop_front() else {
                break;
            };
            self.queued.remove(&case);
            self.offer_case(&case, store)?;
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
            if self.states.len() >= SYNC_STATES_MAX {
                return Err(SessionError::Protocol(format!(
                    "peer keeps more than {SYNC_STATES_MAX} case exchanges open"
                )));
            }
            // A persisted state that no longer decodes is our own damaged
            // data; starting fresh costs a little bandwidth and loses nothing.
            let mut state = store
                .load_sync_state(case)?
                .and_then(|bytes| AmState::decode(&bytes).ok())
                .unwrap_or_default();
            // Protocol 4: our first message of the exchange carries our
            // changes since the heads we last shared, as a push does.
            if self.version >= PUSH_VERSION {
                assume_peer_holds_shared(&mut state);
            }
            self.persisted_shared
                .insert(case.clone(), state.shared_heads.clone());
            self.states.insert(case.clone(), state);
        }
        Ok(self.states.get_mut(case).expect("inserted above"))
    }

    /// Generates and queues our next sync message for a case. A case we
    /// do not hold is offered from an empty document, which asks the peer
    /// for all of it.
    fn offer_case(&mut self, case: &CaseId, store: &mut dyn CaseStore) -> Result<(), SessionError> {
        let doc = store.load(case)?.unwrap_or_default();
        self.reply(case, &doc, store)
    }

    fn reply(
        &mut self,
        case: &CaseId,
        doc: &Automerge,
        store: &mut dyn CaseStore,
    ) -> Result<(), SessionError> {
        let state = self.state_for(case, store)?;
        match doc.generate_sync_message(state) {
            Some(msg) => {
                if !msg.changes.is_empty() {
                    self.stats.cases_sent.insert(case.clone());
                }
                self.stats.case_messages_sent += 1;
                // Every case message is answered (until Automerge has
                // nothing more to say), so the in-flight bound holds the
                // peer's queue of answers to us to what we asked. Only a
                // push goes unanswered, and pushes are bounded apart.
                self.in_flight.insert(case.clone());
                self.send(Message::CaseSync {
                    case: case.clone(),
                    data: msg.encode(),
                });
            }
            None => {
                // Converged when the peer's last word was our very heads:
                // drop the exchange (its shared heads are persisted; a late
                // message reloads them), so memory follows the cases in
                // flight, not the cases synced.
                let mut ours = doc.get_heads();
                ours.sort();
                let mut theirs = state.their_heads.clone().unwrap_or_default();
                theirs.sort();
                if theirs == ours {
                    self.in_flight.remove(case);
                    self.states.remove(case);
                    self.persisted_shared.remove(case);
                }
            }
        }
        Ok(())
    }

    /// Our last message for `case` leaves the peer at `heads`, with
    /// nothing to answer: the exchange is over on our side. Its state is
    /// dropped (memory follows exchanges in flight) and, once the session
    /// converges, stored as shared at `heads`.
    fn finish_unanswered(&mut self, case: &CaseId, heads: Vec<ChangeHash>) {
        self.in_flight.remove(case);
        self.states.remove(case);
        self.persisted_shared.remove(case);
        if self.pushed_unanswered.len() < UNANSWERED_MAX {
            self.pushed_unanswered.insert(case.clone(), heads);
        }
    }

    fn on_case_sync(
        &mut self,
        case: CaseId,
        data: Vec<u8>,
        store: &mut dyn CaseStore,
    ) -> Result<(), SessionError> {
        let (doc, _) = self.apply_case_message(&case, &data, store)?;
        self.reply(&case, &doc, store)
    }

    /// A case the peer pushed: applied like any case message, answered
    /// only if we hold changes the peer lacks.
    fn on_case_push(
        &mut self,
        case: CaseId,
        data: Vec<u8>,
        store: &mut dyn CaseStore,
    ) -> Result<(), SessionError> {
        if self.peer_end.is_none() {
            self.pushes_received.insert(case.clone());
        }
        let (doc, theirs) = self.apply_case_message(&case, &data, store)?;
        if same_heads(&doc.get_heads(), theirs) {
            return self.end_quietly(&case);
        }
        self.reply(&case, &doc, store)
    }

    /// A push left us at the pusher's very heads, so neither side lacks
    /// anything and we do not answer (Automerge would send a message just
    /// to say so). The sync state was persisted with the commit; the peer
    /// records the same at convergence. An exchange of ours for the case
    /// that crossed the push still gets its answer.
    fn end_quietly(&mut self, case: &CaseId) -> Result<(), SessionError> {
        if self.in_flight.contains(case) {
            return Ok(());
        }
        self.states.remove(case);
        self.persisted_shared.remove(case);
        Ok(())
    }

    /// Pushes `case` to the peer if we synced it with this peer before and
    /// hold changes since: our sync message, generated as if the peer had
    /// just said it holds the heads we last shared. Nothing is pushed for
    /// a case with an exchange already running, or whose message would be
    /// split; the peer asks for those the usual way.
    fn try_push(&mut self, case: &CaseId, store: &mut dyn CaseStore) -> Result<(), SessionError> {
        if !self.pushed.contains(case) && self.push_case(case, store)? {
            self.pushed.insert(case.clone());
            self.pushed_before_hello |= self.phase == Phase::Hello;
        }
        Ok(())
    }

    /// Sends `case` as a [`Message::CasePush`] if the peer speaks protocol
    /// 4, no exchange for it is running, and we hold a sync state for it
    /// with changes since; true if sent.
    fn push_case(
        &mut self,
        case: &CaseId,
        store: &mut dyn CaseStore,
    ) -> Result<bool, SessionError> {
        let version = match self.phase {
            Phase::Hello => self.remembered_version.min(self.config.version_max),
            _ => self.version,
        };
        if version < PUSH_VERSION || self.queued.contains(case) || self.states.contains_key(case) {
            return Ok(false);
        }
        let Some(mut state) = store
            .load_sync_state(case)?
            .and_then(|bytes| AmState::decode(&bytes).ok())
        else {
            return Ok(false);
        };
        if state.shared_heads.is_empty() {
            return Ok(false);
        }
        let Some(doc) = store.load(case)? else {
            return Ok(false);
        };
        assume_peer_holds_shared(&mut state);
        let Some(msg) = doc.generate_sync_message(&mut state) else {
            return Ok(false);
        };
        if msg.changes.is_empty() {
            // The peer holds all we have of it; the listing says so.
            return Ok(false);
        }
        let data = msg.encode();
        if data.len() > self.config.split_above_bytes {
            return Ok(false);
        }
        self.finish_unanswered(case, doc.get_heads());
        self.stats.cases_sent.insert(case.clone());
        self.stats.case_messages_sent += 1;
        self.send(Message::CasePush {
            case: case.clone(),
            data,
        });
        Ok(true)
    }

    /// Whether listed cases may be pushed now: the peer speaks protocol 4
    /// (or spoke it when we last converged, before its hello arrives), and
    /// we have met this peer's store before (we remember converging with
    /// it, or its cursor names our store). A first sync pushes nothing and
    /// looks up no sync state per listed case.
    fn may_push(&self) -> bool {
        let version = match self.phase {
            Phase::Hello => self.remembered_version.min(self.config.version_max),
            _ => self.version,
        };
        version >= PUSH_VERSION
            && (self.remembered_version > 0 || self.peer_knows_us)
            && self.pushed.len() < PUSHES_MAX
    }

    /// Decodes and applies one Automerge sync message for `case`, and
    /// commits what it brought. Returns the merged document and the heads
    /// the peer announced.
    fn apply_case_message(
        &mut self,
        case: &CaseId,
        data: &[u8],
        store: &mut dyn CaseStore,
    ) -> Result<(Automerge, Vec<ChangeHash>), SessionError> {
        let case = case.clone();
        self.pushed_unanswered.remove(&case);
        self.stats.case_messages_received += 1;
        let msg = AmMessage::decode(data).map_err(|e| SessionError::BadSyncMessage {
            case: case.clone(),
            reason: e.to_string(),
        })?;
        let their_heads = msg.heads.clone();
        let mut doc = store.load(&case)?.unwrap_or_default();
        let before = doc.get_heads();
        let state = self.state_for(&case, store)?;
        doc.receive_sync_message(state, msg)
            .map_err(|e| SessionError::BadSyncMessage {
                case: case.clone(),
                reason: e.to_string(),
            })?;
        // Changes whose dependencies we lack wait in `doc`'s queue, which
        // dies with `doc` (we reload from the store per message). The peer
        // counts them as sent and would never send them again, so both
        // sides would ask each other forever. Ask the peer to forget what
        // it sent and resend (found by the deterministic simulation).
        if !automerge::ReadDoc::get_missing_deps(&doc, &[]).is_empty() {
            state.needs_reset = true;
        }
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
        Ok((doc, their_heads))
    }

    /// Runs after each batch of input: announces quiescence, stores the
    /// peer's cursor once everything it listed is held, and checks whether
    /// the session is finished.
    fn after_input(&mut self, store: &mut dyn CaseStore) -> Result<(), SessionError> {
        if self.phase != Phase::Sync
            || !self.list_done
            || self.peer_end.is_none()
            || !self.to_offer.is_empty()
            || !self.to_want.is_empty()
            || !self.peer_wants.is_empty()
        {
            return Ok(());
        }
        if !self.nothing_more_sent
            && self.listed_entries == 0
            && self.wanted.is_empty()
            && self.in_flight.is_empty()
            && self.docs.is_empty()
            && self.assembling.is_empty()
        {
            self.nothing_more_sent = true;
            self.events.push_back(Event::NothingMoreToReceive);
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
        if converged && !self.wanted.is_empty() {
            // The peer says it processed all our requests, yet some case
            // we asked for never came: storing its cursor would skip it.
            return Err(SessionError::Protocol(format!(
                "peer left {} requested cases unanswered",
                self.wanted.len()
            )));
        }
        if converged && !self.cursor_saved {
            if let Some(end) = &self.peer_end {
                store.save_peer_cursor(end.store_id, end.upto)?;
            }
            // The peer counted our listing's end, so it stores the same
            // position for our store: next time we list from there at once.
            if self.version >= OPTIMISTIC_LISTING_VERSION {
                store.save_listed_upto(Some(ListedUpto {
                    seq: self.list_upto,
                    version: self.version,
                }))?;
            }
            self.cursor_saved = true;
        }
        if converged {
            // The peer processed our last message of each exchange that
            // ended without an answer (its counts say so), and committed
            // it before saying so: it holds our heads of those cases. The
            // next push starts from there. A live session converges again
            // after each round of edits, and records each round's.
            for (case, heads) in std::mem::take(&mut self.pushed_unanswered) {
                let state = AmState {
                    shared_heads: heads,
                    ..AmState::default()
                };
                store.save_sync_state(&case, &state.encode())?;
            }
        }
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
    pub fn handle_local_blobs_done(
        &mut self,
        store: &mut dyn CaseStore,
    ) -> Result<(), SessionError> {
        if self.phase != Phase::Sync || self.local_blobs_done {
            return Ok(());
        }
        self.local_blobs_done = true;
        self.send(Message::BlobsDone);
        let result = self.after_input(store);
        self.fail_on_err(result)
    }
}

/// Sets up a sync state as if the peer had just said it holds the heads we
/// last shared with it, and nothing more: the next message then carries
/// every change since those heads. Nothing happens to a state without
/// shared heads (we never synced the case with this peer). Should the
/// peer hold less (restored from an older copy), the changes arrive with
/// missing dependencies and the peer asks for a reset (see
/// `Session::apply_case_message`).
fn assume_peer_holds_shared(state: &mut AmState) {
    if state.shared_heads.is_empty() || state.their_heads.is_some() {
        return;
    }
    let shared = state.shared_heads.clone();
    state.their_heads = Some(shared.clone());
    state.their_need = Some(Vec::new());
    state.their_have = Some(vec![Have {
        last_sync: shared,
        bloom: BloomFilter::default(),
    }]);
}

/// Whether two sets of heads are the same, in any order.
fn same_heads(ours: &[ChangeHash], mut theirs: Vec<ChangeHash>) -> bool {
    let mut ours = ours.to_vec();
    ours.sort();
    theirs.sort();
    ours == theirs
}

/// Whether a listing of `lister`'s changes after sequence number `from`
/// covers everything the receiver lacks, given the cursor the receiver
/// sent, `(store, seq)`: it starts at the beginning, or no later than the
/// cursor when the cursor is for the lister's own store. Both sides apply
/// this same rule, the lister to decide whether to restart a listing it
/// began from memory, the receiver to decide whether its end counts.
fn listing_covers(from: u64, lister: StoreId, since: (StoreId, u64)) -> bool {
    from == 0 || (since.0 == lister && from <= since.1)
}
