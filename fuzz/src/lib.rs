//! The logic of fieldcase's fuzz targets, as plain functions.
//!
//! Each `fuzz_targets/<name>.rs` is one line that hands libFuzzer's input to
//! the function of the same name here. Keeping the logic in plain functions
//! means the normal test suite (on stable, without libFuzzer) runs every
//! target over its committed seed corpus (`tests/tests/fuzz_corpus.rs`
//! includes this file as a module), so the targets cannot rot.
//!
//! Every function must return normally for *any* input; a panic is a bug,
//! either in the code under test or in an invariant asserted here.
//!
//! This file is compiled both as the `fieldcase_fuzz` library and as a
//! module of the test suite, so it never names `crate::`.

use std::collections::{BTreeMap, VecDeque};

use arbitrary::{Arbitrary, Unstructured};
use automerge::transaction::Transactable;
use automerge::{ActorId, Automerge, ChangeHash, ReadDoc, ROOT};
use fieldcase_node::case::{self, Author, NewCase};
use fieldcase_sync::frame::{encode_frame, FrameDecoder, FrameError, FRAME_BYTES_MAX};
use fieldcase_sync::memory::MemoryNode;
use fieldcase_sync::store::ChangedCase;
use fieldcase_sync::wire::{ChangesEnd, Goodbye, GoodbyeCode, Hello, Message, StoreId};
use fieldcase_sync::{
    CaseId, CaseStore, CommitError, CommitOutcome, Session, SessionConfig, StoreFault,
};

/// A target's entry point.
pub type Target = fn(&[u8]);

/// The five targets, by name, as they appear under `fuzz/corpus/`.
pub const TARGETS: [(&str, Target); 5] = [
    ("frame_decoder", frame_decoder),
    ("wire_message", wire_message),
    ("handshake", handshake),
    ("session_ops", session_ops),
    ("stored_case", stored_case),
];

// ---------------------------------------------------------------- frames

/// Most chunk sizes read from the front of a `frame_decoder` input.
const SPLITS_MAX: usize = 8;

/// `frame_decoder`: the first byte says how many of the next bytes are
/// chunk sizes (`data[0] % 9`); the rest is a byte stream. The stream is
/// pushed into a [`FrameDecoder`] once whole and once in those chunks
/// (cycled). Both must yield the same frames and the same error, no frame
/// may exceed the limit, re-framing the frames must give back exactly the
/// bytes consumed, and the buffer never holds more than one maximal frame
/// plus one chunk.
pub fn frame_decoder(data: &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = (n as usize % (SPLITS_MAX + 1)).min(rest.len());
    let (sizes, stream) = rest.split_at(n);
    let sizes: Vec<usize> = if sizes.is_empty() {
        vec![stream.len().max(1)]
    } else {
        sizes.iter().map(|&s| s as usize + 1).collect()
    };

    let whole = decode_stream(&[stream]);
    let mut chunks = Vec::new();
    let mut at = 0;
    let mut i = 0;
    while at < stream.len() {
        let end = (at + sizes[i % sizes.len()]).min(stream.len());
        chunks.push(&stream[at..end]);
        at = end;
        i += 1;
    }
    let chunked = decode_stream(&chunks);
    assert_eq!(whole.frames, chunked.frames, "frames depend on the split");
    assert_eq!(whole.error, chunked.error, "errors depend on the split");

    let mut reframed = Vec::new();
    for f in &whole.frames {
        assert!(f.len() <= FRAME_BYTES_MAX);
        reframed.extend_from_slice(&encode_frame(f));
    }
    assert!(
        stream.starts_with(&reframed),
        "frames are not the stream's bytes"
    );
    if whole.error.is_none() {
        assert_eq!(whole.buffered, stream.len() - reframed.len());
        assert_eq!(chunked.buffered, whole.buffered);
        assert_eq!(whole.finish.is_ok(), whole.buffered == 0);
    }
    let largest_chunk = sizes.iter().copied().max().unwrap_or(0);
    assert!(chunked.peak_buffered <= 4 + FRAME_BYTES_MAX + largest_chunk);
}

struct Decoded {
    frames: Vec<Vec<u8>>,
    error: Option<FrameError>,
    buffered: usize,
    peak_buffered: usize,
    finish: Result<(), FrameError>,
}

fn decode_stream(chunks: &[&[u8]]) -> Decoded {
    let mut dec = FrameDecoder::new();
    let mut frames = Vec::new();
    let mut peak_buffered = 0;
    'outer: for chunk in chunks {
        dec.push(chunk);
        peak_buffered = peak_buffered.max(dec.buffered_bytes());
        loop {
            match dec.next_frame() {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => {
                    return Decoded {
                        frames,
                        error: Some(e),
                        buffered: dec.buffered_bytes(),
                        peak_buffered,
                        finish: Ok(()),
                    };
                }
            }
            if dec.buffered_bytes() == 0 {
                continue 'outer;
            }
        }
    }
    Decoded {
        frames,
        error: None,
        buffered: dec.buffered_bytes(),
        peak_buffered,
        finish: dec.finish(),
    }
}

// ---------------------------------------------------------------- messages

/// `wire_message`: anything that decodes re-encodes to bytes that decode
/// to the same message, and that encoding is stable (encoding the second
/// decode gives the same bytes).
pub fn wire_message(data: &[u8]) {
    let Ok(msg) = Message::decode(data) else {
        return;
    };
    let bytes = msg.encode();
    let again = Message::decode(&bytes)
        .unwrap_or_else(|e| panic!("{msg:?} re-encoded to bytes that do not decode: {e}"));
    assert_eq!(again, msg, "round trip changed the message");
    assert_eq!(again.encode(), bytes, "encoding is not stable");
    assert!(bytes.len() <= data.len().max(FRAME_BYTES_MAX));
}

// ---------------------------------------------------------------- handshake

/// Fixed clock and actors, so seeds generated today still drive the same
/// documents tomorrow.
const SEED_TIME_MS: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z

/// The case the `handshake` node holds before the peer speaks.
pub const HANDSHAKE_CASE: &str = "K7QF2M-000001";

fn author(byte: u8, name: &str) -> Author {
    Author {
        actor: ActorId::from(vec![byte; 16]),
        node_id: format!("node-{byte:02x}"),
        name: name.to_string(),
    }
}

/// A real, valid case document.
pub fn real_case(code: &str, actor: u8) -> Automerge {
    let new = NewCase {
        procedure: "birth-registration".into(),
        applicant: "Nguyen Van An".into(),
        village: "Thon Dong".into(),
        fields: vec![("phone".into(), "0912 000 111".into())],
    };
    case::create(code, &new, &author(actor, "center"), SEED_TIME_MS).expect("a valid new case")
}

/// The store a hostile peer talks to in `handshake`: a [`MemoryNode`] that,
/// like the node's SQLite `PeerStore`, only commits documents that are
/// valid cases carrying the code they are stored under.
pub struct ValidatingStore<'a>(pub &'a mut MemoryNode);

impl CaseStore for ValidatingStore<'_> {
    fn store_id(&mut self) -> Result<StoreId, StoreFault> {
        self.0.for_peer("peer").store_id()
    }
    fn current_seq(&mut self) -> Result<u64, StoreFault> {
        self.0.for_peer("peer").current_seq()
    }
    fn changes_page(
        &mut self,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<(Vec<ChangedCase>, u64), StoreFault> {
        self.0.for_peer("peer").changes_page(after, upto, limit)
    }
    fn heads(&mut self, case: &CaseId) -> Result<Option<Vec<ChangeHash>>, StoreFault> {
        self.0.for_peer("peer").heads(case)
    }
    fn peer_cursor(&mut self) -> Result<Option<(StoreId, u64)>, StoreFault> {
        self.0.for_peer("peer").peer_cursor()
    }
    fn save_peer_cursor(&mut self, store_id: StoreId, seq: u64) -> Result<(), StoreFault> {
        self.0.for_peer("peer").save_peer_cursor(store_id, seq)
    }
    fn load(&mut self, case: &CaseId) -> Result<Option<Automerge>, StoreFault> {
        self.0.for_peer("peer").load(case)
    }
    fn load_sync_state(&mut self, case: &CaseId) -> Result<Option<Vec<u8>>, StoreFault> {
        self.0.for_peer("peer").load_sync_state(case)
    }
    fn save_sync_state(&mut self, case: &CaseId, state: &[u8]) -> Result<(), StoreFault> {
        self.0.for_peer("peer").save_sync_state(case, state)
    }
    fn commit(
        &mut self,
        case: &CaseId,
        doc: &Automerge,
        sync_state: &[u8],
    ) -> Result<CommitOutcome, CommitError> {
        case::validate_code(doc, case.as_str())
            .map_err(|e| CommitError::Rejected(e.to_string()))?;
        self.0.for_peer("peer").commit(case, doc, sync_state)
    }
}

fn validate_merged(doc: &Automerge) -> Result<(), String> {
    case::validate(doc).map_err(|e| e.to_string())
}

/// The node `handshake` starts from: one valid case, validator on.
pub fn handshake_node() -> MemoryNode {
    let mut node = MemoryNode {
        validator: Some(validate_merged),
        ..MemoryNode::with_store_id([1; 16])
    };
    node.docs.insert(
        CaseId::new(HANDSHAKE_CASE).expect("valid id"),
        real_case(HANDSHAKE_CASE, 1),
    );
    node
}

/// `handshake`: a fresh [`Session`] over [`handshake_node`] is fed the
/// input as the peer's byte stream, then told the peer finished. It must
/// never panic; everything it sends must decode; it commits nothing before
/// receiving a case-sync message; whatever it commits is a valid case under
/// its own code; and no change it held before is lost.
pub fn handshake(data: &[u8]) {
    let mut node = handshake_node();
    let before: BTreeMap<CaseId, Vec<ChangeHash>> = node
        .docs
        .iter()
        .map(|(id, d)| (id.clone(), d.get_heads()))
        .collect();
    let mut session = Session::new(SessionConfig::default());
    session
        .start(&mut ValidatingStore(&mut node))
        .expect("an in-memory store does not fail");
    // Two pieces, split where the input says, so a frame cut across reads
    // is exercised too.
    let split = data.first().map_or(0, |&b| b as usize).min(data.len());
    let _ = session.handle_bytes(&data[..split], &mut ValidatingStore(&mut node));
    let _ = session.handle_bytes(&data[split..], &mut ValidatingStore(&mut node));
    let _ = session.handle_peer_finished();

    let mut dec = FrameDecoder::new();
    while let Some(frame) = session.poll_transmit() {
        dec.push(&frame);
    }
    while let Some(payload) = dec.next_frame().expect("our own frames are in bounds") {
        Message::decode(&payload).expect("everything we send decodes");
    }
    assert_eq!(dec.buffered_bytes(), 0);
    if node.commits > 0 {
        assert!(
            session.stats().case_messages_received > 0,
            "committed without a case-sync message"
        );
    }
    for (id, doc) in &node.docs {
        if let Err(e) = case::validate_code(doc, id.as_str()) {
            panic!("committed an invalid case {id}: {e}");
        }
    }
    for (id, heads) in before {
        let doc = &node.docs[&id];
        for h in heads {
            assert!(doc.get_change_by_hash(&h).is_some(), "lost change {h}");
        }
    }
}

// ---------------------------------------------------------------- session ops

/// Cases `session_ops` works on.
const OPS_CASES: [&str; 3] = ["CASE-A", "CASE-B", "CASE-C"];

/// Most operations taken from one input.
const OPS_MAX: usize = 200;

/// Bound on delivery rounds when healing; more is a liveness bug.
const HEAL_ROUNDS_MAX: usize = 500;

/// One step of the `session_ops` script.
#[derive(Arbitrary, Debug)]
pub enum Op {
    /// Carry up to `bytes + 1` in-flight bytes one way.
    Deliver {
        /// Direction: left to right when true.
        to_right: bool,
        /// How many bytes, minus one.
        bytes: u16,
    },
    /// Carry everything in flight both ways, once.
    DeliverAll,
    /// The link drops: bytes in flight are lost and both sides start new
    /// sessions from what their stores hold.
    Cut,
    /// A local edit, committed and then announced to that side's session.
    Edit {
        /// Which node edits.
        left: bool,
        /// Which case (modulo the case count).
        case: u8,
        /// Which key (modulo 4).
        key: u8,
        /// The value written.
        value: u8,
    },
}

/// The `session_ops` input.
#[derive(Arbitrary, Debug)]
pub struct Script {
    /// Whether the left side asks for a live session.
    pub left_live: bool,
    /// Whether the right side asks for a live session.
    pub right_live: bool,
    /// The steps.
    pub ops: Vec<Op>,
}

struct Side {
    node: MemoryNode,
    session: Session,
    actor: u8,
    live: bool,
    /// Bytes this side sent that the other has not received yet.
    in_flight: VecDeque<u8>,
}

impl Side {
    fn new(actor: u8, live: bool) -> Side {
        Side {
            node: MemoryNode::with_store_id([actor; 16]),
            session: Session::new(SessionConfig::default()),
            actor,
            live,
            in_flight: VecDeque::new(),
        }
    }

    fn restart(&mut self, live: bool) {
        self.in_flight.clear();
        self.session = Session::new(SessionConfig {
            live,
            ..SessionConfig::default()
        });
        self.session
            .start(&mut self.node.for_peer("other"))
            .expect("an in-memory store does not fail");
        self.collect();
    }

    fn collect(&mut self) {
        while let Some(frame) = self.session.poll_transmit() {
            self.in_flight.extend(frame);
        }
    }

    fn edit(&mut self, case: &CaseId, key: u8, value: u8) {
        let actor = ActorId::from(vec![self.actor; 16]);
        let doc = self.node.docs.entry(case.clone()).or_insert_with(|| {
            let mut d = Automerge::new().with_actor(actor.clone());
            let mut tx = d.transaction();
            tx.put(ROOT, "code", case.as_str()).expect("put");
            tx.commit();
            d
        });
        doc.set_actor(actor);
        let mut tx = doc.transaction();
        tx.put(ROOT, format!("k{}", key % 4), i64::from(value))
            .expect("put");
        tx.commit();
        self.session
            .handle_local_change(case, &mut self.node.for_peer("other"))
            .unwrap_or_else(|e| panic!("an honest local change failed the session: {e}"));
        self.collect();
    }
}

/// Moves up to `n` in-flight bytes from `from` to `to`.
fn deliver(from: &mut Side, to: &mut Side, n: usize) -> bool {
    let n = n.min(from.in_flight.len());
    if n == 0 {
        return false;
    }
    let bytes: Vec<u8> = from.in_flight.drain(..n).collect();
    to.session
        .handle_bytes(&bytes, &mut to.node.for_peer("other"))
        .unwrap_or_else(|e| panic!("honest peers broke a session: {e}"));
    to.collect();
    true
}

/// `session_ops`: two honest nodes run sessions over a link the script
/// controls: partial deliveries at any byte boundary, cuts that lose bytes
/// in flight and restart both sessions, and local edits at any moment.
/// No honest session may ever fail. After the script, a clean one-shot
/// session on a perfect link must finish on both sides within a bounded
/// number of rounds with identical documents: nothing either side wrote is
/// lost.
pub fn session_ops(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(script) = Script::arbitrary(&mut u) else {
        return;
    };
    let mut left = Side::new(0xAA, script.left_live);
    let mut right = Side::new(0xBB, script.right_live);
    left.restart(left.live);
    right.restart(right.live);
    for op in script.ops.into_iter().take(OPS_MAX) {
        match op {
            Op::Deliver { to_right, bytes } => {
                let n = usize::from(bytes) + 1;
                if to_right {
                    deliver(&mut left, &mut right, n);
                } else {
                    deliver(&mut right, &mut left, n);
                }
            }
            Op::DeliverAll => {
                deliver(&mut left, &mut right, usize::MAX);
                deliver(&mut right, &mut left, usize::MAX);
            }
            Op::Cut => {
                left.restart(left.live);
                right.restart(right.live);
            }
            Op::Edit {
                left: on_left,
                case,
                key,
                value,
            } => {
                let id = CaseId::new(OPS_CASES[case as usize % OPS_CASES.len()]).expect("id");
                let side = if on_left { &mut left } else { &mut right };
                side.edit(&id, key, value);
            }
        }
    }
    // Heal: a clean one-shot session on a perfect link.
    left.restart(false);
    right.restart(false);
    let mut rounds = 0;
    loop {
        let a = deliver(&mut left, &mut right, usize::MAX);
        let b = deliver(&mut right, &mut left, usize::MAX);
        if !a && !b {
            break;
        }
        rounds += 1;
        assert!(rounds <= HEAL_ROUNDS_MAX, "no quiescence after healing");
    }
    assert!(
        left.session.is_finished() && right.session.is_finished(),
        "the healing session did not finish: {:?} / {:?}",
        left.session.phase(),
        right.session.phase()
    );
    let heads = |n: &MemoryNode| -> BTreeMap<CaseId, Vec<ChangeHash>> {
        n.docs
            .iter()
            .map(|(id, d)| {
                let mut h = d.get_heads();
                h.sort();
                (id.clone(), h)
            })
            .collect()
    };
    assert_eq!(heads(&left.node), heads(&right.node), "replicas differ");
    for doc in left.node.docs.values() {
        assert!(doc.get(ROOT, "code").ok().flatten().is_some());
    }
}

// ---------------------------------------------------------------- stored case

/// `stored_case`: arbitrary bytes loaded as a stored case (whole, and as an
/// incremental chunk on top of a real case) go through `validate`, `view`
/// and `projection` without panicking, and the three agree on whether the
/// document is a valid case.
pub fn stored_case(data: &[u8]) {
    if let Ok(doc) = Automerge::load(data) {
        check_case(&doc);
    }
    let mut doc = Automerge::new();
    if doc.load_incremental(data).is_ok() {
        check_case(&doc);
    }
}

fn check_case(doc: &Automerge) {
    let valid = case::validate(doc).is_ok();
    assert_eq!(case::view(doc).is_ok(), valid);
    assert_eq!(case::projection(doc).is_ok(), valid);
    if let Ok(v) = case::view(doc) {
        assert!(case::validate_code(doc, &v.code).is_ok());
    }
}

// ---------------------------------------------------------------- seeds

/// A real seed corpus: `(target, file name, bytes)`. Written to
/// `fuzz/corpus/<target>/<name>` by the corpus test when
/// `FIELDCASE_WRITE_FUZZ_SEEDS=1` is set.
pub fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();

    // A real session transcript: what an honest peer holding a second case
    // and an edit of the shared one sends to the handshake node.
    let (peer_bytes, our_bytes) = transcript();
    out.push((
        "handshake",
        "peer-transcript".to_string(),
        peer_bytes.clone(),
    ));
    out.push((
        "handshake",
        "hello-only".to_string(),
        encode_frame(&hello().encode()),
    ));
    // Hello, a cursor and an empty listing: the shortest way to a point
    // where case-sync messages are expected.
    out.push(("handshake", "empty-listing".to_string(), {
        let mut v = encode_frame(&hello().encode());
        v.extend(encode_frame(
            &Message::Since {
                store_id: [1; 16],
                seq: 0,
            }
            .encode(),
        ));
        v.extend(encode_frame(
            &Message::Changes {
                entries: vec![],
                end: Some(ChangesEnd {
                    store_id: [2; 16],
                    upto: 0,
                }),
            }
            .encode(),
        ));
        v
    }));
    out.push(("frame_decoder", "transcript-whole".into(), {
        let mut v = vec![0u8];
        v.extend_from_slice(&peer_bytes);
        v
    }));
    out.push(("frame_decoder", "transcript-split".into(), {
        let mut v = vec![3u8, 0, 6, 250];
        v.extend_from_slice(&our_bytes);
        v
    }));
    out.push((
        "frame_decoder",
        "oversized-header".into(),
        vec![0, 0x00, 0x80, 0x00, 0x01, 1, 2, 3],
    ));

    // Every message kind, and the real ones from the transcript.
    let mut dec = FrameDecoder::new();
    dec.push(&peer_bytes);
    dec.push(&our_bytes);
    let mut i = 0;
    while let Ok(Some(payload)) = dec.next_frame() {
        out.push(("wire_message", format!("transcript-{i:02}"), payload));
        i += 1;
    }
    let id = CaseId::new(HANDSHAKE_CASE).expect("id");
    let made = [
        Message::Since {
            store_id: [7; 16],
            seq: u64::MAX,
        },
        Message::Changes {
            entries: vec![
                (id.clone(), [1; 16]),
                (CaseId::new("Z-1").expect("id"), [2; 16]),
            ],
            end: None,
        },
        Message::Changes {
            entries: vec![(id.clone(), [3; 16])],
            end: Some(ChangesEnd {
                store_id: [4; 16],
                upto: 77,
            }),
        },
        Message::Idle {
            received: 300,
            sent: u64::MAX,
        },
        Message::Goodbye(Goodbye {
            code: GoodbyeCode::Other(77),
            reason: "tạm biệt".into(),
        }),
        Message::BlobRequest {
            hash: [9; 32],
            offset: 1 << 40,
        },
        Message::BlobHeader {
            size: 20_000_000,
            offset: 5,
        },
        Message::BlobUnavailable {
            reason: "no shared case refers to this blob".into(),
        },
        Message::BlobsDone,
        Message::ListingStart { after: 12_345 },
        Message::Want {
            cases: vec![id.clone(), CaseId::new("Z-1").expect("id")],
        },
        Message::CaseDoc {
            case: id.clone(),
            data: real_case(HANDSHAKE_CASE, 5).save(),
        },
        Message::CasePush {
            case: id.clone(),
            data: {
                use automerge::sync::SyncDoc;
                real_case(HANDSHAKE_CASE, 5)
                    .generate_sync_message(&mut automerge::sync::State::new())
                    .expect("a first message")
                    .encode()
            },
        },
        Message::Part {
            offset: 0,
            last: false,
            bytes: Message::CaseDoc {
                case: id.clone(),
                data: real_case(HANDSHAKE_CASE, 5).save(),
            }
            .encode(),
        },
    ];
    for (i, m) in made.iter().enumerate() {
        out.push((
            "wire_message",
            format!("{}-{i}", m.kind().replace(' ', "-")),
            m.encode(),
        ));
    }

    // Stored cases: a new one, and one with history.
    let fresh = real_case("K7QF2M-000002", 3);
    out.push(("stored_case", "new-case".into(), fresh.clone().save()));
    let mut edited = fresh;
    let a = author(4, "laptop");
    case::add_note(
        &mut edited,
        "Father brings his ID on Friday",
        &a,
        SEED_TIME_MS + 1000,
    )
    .expect("note");
    case::set_field(
        &mut edited,
        "phone",
        "0912 999 888",
        &a,
        SEED_TIME_MS + 2000,
    )
    .expect("field");
    out.push(("stored_case", "edited-case".into(), edited.save()));
    let heads = edited.get_heads();
    out.push((
        "stored_case",
        "incremental-chunk".into(),
        edited.save_after(&heads[..0]),
    ));

    // Op scripts: a few fixed byte patterns the `arbitrary` decoder turns
    // into deliveries, cuts and edits.
    let mut x: u32 = 0x2545_F491;
    for n in 0..4 {
        let bytes: Vec<u8> = (0..64 + 96 * n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x >> 24) as u8
            })
            .collect();
        out.push(("session_ops", format!("script-{n}"), bytes));
    }
    out
}

fn hello() -> Message {
    Message::Hello(Hello {
        version_min: 1,
        version_max: 1,
        live: false,
    })
}

/// Runs an honest peer against [`handshake_node`] and returns the bytes the
/// peer sent and the bytes the handshake node sent.
fn transcript() -> (Vec<u8>, Vec<u8>) {
    let mut ours = handshake_node();
    let mut theirs = MemoryNode::with_store_id([2; 16]);
    let mut shared = ours.docs[&CaseId::new(HANDSHAKE_CASE).expect("id")].fork();
    case::add_note(
        &mut shared,
        "visited",
        &author(2, "laptop"),
        SEED_TIME_MS + 5,
    )
    .expect("note");
    theirs
        .docs
        .insert(CaseId::new(HANDSHAKE_CASE).expect("id"), shared);
    theirs.docs.insert(
        CaseId::new("K7QF2M-000009").expect("id"),
        real_case("K7QF2M-000009", 2),
    );
    let mut a = Session::new(SessionConfig::default());
    let mut b = Session::new(SessionConfig::default());
    a.start(&mut ValidatingStore(&mut ours)).expect("start");
    b.start(&mut theirs.for_peer("x")).expect("start");
    let (mut sent_by_us, mut sent_by_them) = (Vec::new(), Vec::new());
    for _ in 0..HEAL_ROUNDS_MAX {
        let mut moved = false;
        while let Some(f) = a.poll_transmit() {
            moved = true;
            sent_by_us.extend_from_slice(&f);
            b.handle_bytes(&f, &mut theirs.for_peer("x"))
                .expect("honest");
        }
        while let Some(f) = b.poll_transmit() {
            moved = true;
            sent_by_them.extend_from_slice(&f);
            a.handle_bytes(&f, &mut ValidatingStore(&mut ours))
                .expect("honest");
        }
        if !moved {
            break;
        }
    }
    assert!(a.is_finished() && b.is_finished(), "transcript converges");
    (sent_by_them, sent_by_us)
}
