//! Stories of two nodes syncing through the pure session state machine,
//! with no sockets: bytes are carried between them by hand.

use automerge::transaction::Transactable;
use automerge::{ActorId, Automerge, ReadDoc, ROOT};
use fieldcase_sync::memory::MemoryNode;
use fieldcase_sync::wire::{GoodbyeCode, Message, PROTOCOL_VERSION};
use fieldcase_sync::{CaseId, Event, Phase, Session, SessionConfig, SessionError};

/// Upper bound on delivery rounds; a session that needs more is a
/// liveness bug.
const ROUNDS_MAX: usize = 200;

fn id(s: &str) -> CaseId {
    CaseId::new(s).unwrap()
}

fn new_case(actor: u8, code: &str, phone: &str) -> Automerge {
    let mut doc = Automerge::new().with_actor(ActorId::from(vec![actor; 16]));
    let mut tx = doc.transaction();
    tx.put(ROOT, "code", code).unwrap();
    tx.put(ROOT, "phone", phone).unwrap();
    tx.commit();
    doc
}

fn edit(node: &mut MemoryNode, actor: u8, code: &str, key: &str, value: &str) {
    let doc = node.docs.get_mut(&id(code)).unwrap();
    doc.set_actor(ActorId::from(vec![actor; 16]));
    let mut tx = doc.transaction();
    tx.put(ROOT, key, value).unwrap();
    tx.commit();
}

fn get(node: &MemoryNode, code: &str, key: &str) -> Option<String> {
    let doc = node.docs.get(&id(code))?;
    doc.get(ROOT, key)
        .unwrap()
        .and_then(|(v, _)| v.into_string().ok())
}

/// Which side failed, and how.
#[derive(Debug)]
enum Failure {
    Left(SessionError),
    Right(SessionError),
}

/// Carries every queued frame across until neither side sends anything.
/// `chunk` splits the byte stream into pieces of that size, to prove the
/// sessions do not depend on frame boundaries.
fn pump(
    left: (&mut Session, &mut MemoryNode),
    right: (&mut Session, &mut MemoryNode),
    chunk: usize,
) -> Result<(), Failure> {
    let (ls, ln) = left;
    let (rs, rn) = right;
    for _ in 0..ROUNDS_MAX {
        let mut moved = false;
        while let Some(bytes) = ls.poll_transmit() {
            moved = true;
            for piece in bytes.chunks(chunk) {
                rs.handle_bytes(piece, &mut rn.for_peer("left"))
                    .map_err(Failure::Right)?;
            }
        }
        while let Some(bytes) = rs.poll_transmit() {
            moved = true;
            for piece in bytes.chunks(chunk) {
                ls.handle_bytes(piece, &mut ln.for_peer("right"))
                    .map_err(Failure::Left)?;
            }
        }
        if !moved {
            // Let each side generate backlog (listings, offers) that no
            // incoming message prompted, as a transport does when its
            // send buffer drains; done when even that yields nothing.
            ls.fill(&mut ln.for_peer("right")).map_err(Failure::Left)?;
            rs.fill(&mut rn.for_peer("left")).map_err(Failure::Right)?;
            if !ls.has_queued() && !rs.has_queued() {
                return Ok(());
            }
        }
    }
    panic!("sessions did not go quiet within {ROUNDS_MAX} rounds");
}

fn start(node: &mut MemoryNode, peer: &str, config: SessionConfig) -> Session {
    let mut s = Session::new(config);
    s.start(&mut node.for_peer(peer)).unwrap();
    s
}

/// A node that speaks only protocol 1 (an older build).
fn protocol_1() -> SessionConfig {
    SessionConfig {
        version_min: 1,
        version_max: 1,
        ..SessionConfig::default()
    }
}

fn sync_once(laptop: &mut MemoryNode, center: &mut MemoryNode) -> (Session, Session) {
    let mut l = start(laptop, "right", SessionConfig::default());
    let mut c = start(center, "left", SessionConfig::default());
    pump((&mut l, laptop), (&mut c, center), usize::MAX).unwrap();
    assert!(l.is_finished() && c.is_finished(), "both sides finish");
    (l, c)
}

#[test]
fn laptop_and_center_exchange_their_offline_cases_in_both_directions() {
    let mut laptop = MemoryNode::default();
    let mut center = MemoryNode::default();
    laptop
        .docs
        .insert(id("LAP-1"), new_case(1, "LAP-1", "0901"));
    laptop
        .docs
        .insert(id("LAP-2"), new_case(1, "LAP-2", "0902"));
    center
        .docs
        .insert(id("CEN-1"), new_case(2, "CEN-1", "0903"));

    let (l, c) = sync_once(&mut laptop, &mut center);

    for code in ["LAP-1", "LAP-2", "CEN-1"] {
        assert_eq!(
            laptop.docs[&id(code)].get_heads(),
            center.docs[&id(code)].get_heads(),
            "{code} converged"
        );
    }
    assert_eq!(l.stats().cases_sent.len(), 2);
    assert_eq!(l.stats().cases_received.len(), 1);
    assert_eq!(c.stats().cases_received.len(), 2);
    assert_eq!(c.stats().cases_created.len(), 2);
}

#[test]
fn a_reconnect_with_nothing_changed_sends_no_per_case_message() {
    let mut laptop = MemoryNode::default();
    let mut center = MemoryNode::default();
    for i in 0..50 {
        let code = format!("LAP-{i}");
        laptop.docs.insert(id(&code), new_case(1, &code, "0901"));
    }
    sync_once(&mut laptop, &mut center);

    let (l, c) = sync_once(&mut laptop, &mut center);
    for s in [&l, &c] {
        assert_eq!(s.stats().case_messages_sent, 0);
        assert_eq!(s.stats().case_messages_received, 0);
        // Hello, cursor, listing start, an empty listing, blobs-done and
        // one idle each: nothing grows with the number of cases.
        assert_eq!(s.stats().frames_sent, 6);
    }
}

#[test]
fn after_a_restart_only_the_edited_case_is_sent_again() {
    let mut laptop = MemoryNode::default();
    let mut center = MemoryNode::default();
    for i in 0..20 {
        let code = format!("LAP-{i}");
        laptop.docs.insert(id(&code), new_case(1, &code, "0901"));
    }
    sync_once(&mut laptop, &mut center);
    // New sessions are new objects: only the persisted sync state survives,
    // exactly as across a process restart.
    edit(&mut laptop, 1, "LAP-7", "phone", "0999");
    let (l, c) = sync_once(&mut laptop, &mut center);
    assert_eq!(
        l.stats().cases_sent.iter().collect::<Vec<_>>(),
        vec![&id("LAP-7")]
    );
    assert_eq!(c.stats().cases_received.len(), 1);
    // One Automerge exchange for one case: heads, changes, acknowledgement.
    assert!(l.stats().case_messages_sent <= 3, "{:?}", l.stats());
    assert_eq!(get(&center, "LAP-7", "phone").as_deref(), Some("0999"));
}

#[test]
fn concurrent_edits_of_one_case_on_both_sides_merge() {
    let mut laptop = MemoryNode::default();
    let mut center = MemoryNode::default();
    laptop
        .docs
        .insert(id("LAP-1"), new_case(1, "LAP-1", "0901"));
    sync_once(&mut laptop, &mut center);
    edit(&mut laptop, 1, "LAP-1", "village", "Thon Dong");
    edit(&mut center, 2, "LAP-1", "assignee", "Chi Lan");
    edit(&mut laptop, 1, "LAP-1", "phone", "0911");
    edit(&mut center, 2, "LAP-1", "phone", "0922");
    sync_once(&mut laptop, &mut center);
    let (l, r) = (&laptop.docs[&id("LAP-1")], &center.docs[&id("LAP-1")]);
    assert_eq!(l.get_heads(), r.get_heads());
    assert_eq!(
        get(&center, "LAP-1", "village").as_deref(),
        Some("Thon Dong")
    );
    assert_eq!(
        get(&laptop, "LAP-1", "assignee").as_deref(),
        Some("Chi Lan")
    );
    assert_eq!(
        l.get_all(ROOT, "phone").unwrap().len(),
        2,
        "both phones kept"
    );
}

#[test]
fn bytes_arriving_one_at_a_time_make_no_difference() {
    let mut laptop = MemoryNode::default();
    let mut center = MemoryNode::default();
    laptop
        .docs
        .insert(id("LAP-1"), new_case(1, "LAP-1", "0901"));
    center
        .docs
        .insert(id("CEN-1"), new_case(2, "CEN-1", "0902"));
    let mut l = start(&mut laptop, "right", SessionConfig::default());
    let mut c = start(&mut center, "left", SessionConfig::default());
    pump((&mut l, &mut laptop), (&mut c, &mut center), 1).unwrap();
    assert!(l.is_finished() && c.is_finished());
    assert_eq!(laptop.docs.len(), 2);
    assert_eq!(center.docs.len(), 2);
}

/// A laptop with one case in a live session (`sync --watch`) with the
/// center, synced up: (laptop, center, laptop's session, center's).
fn live_pair() -> (MemoryNode, MemoryNode, Session, Session) {
    let mut laptop = MemoryNode::default();
    let mut center = MemoryNode::default();
    laptop
        .docs
        .insert(id("LAP-1"), new_case(1, "LAP-1", "0901"));
    let live = SessionConfig {
        live: true,
        ..SessionConfig::default()
    };
    let mut l = start(&mut laptop, "right", live);
    let mut c = start(&mut center, "left", SessionConfig::default());
    pump((&mut l, &mut laptop), (&mut c, &mut center), usize::MAX).unwrap();
    (laptop, center, l, c)
}

#[test]
fn a_live_session_pushes_an_edit_made_after_convergence() {
    let (mut laptop, mut center, mut l, mut c) = live_pair();
    assert_eq!(l.phase(), Phase::Sync, "live sessions stay open");
    assert_eq!(
        c.phase(),
        Phase::Sync,
        "the server follows the client's mode"
    );

    edit(&mut center, 2, "LAP-1", "status_note", "result ready");
    c.handle_local_change(&id("LAP-1"), &mut center.for_peer("left"))
        .unwrap();
    pump((&mut l, &mut laptop), (&mut c, &mut center), usize::MAX).unwrap();
    assert_eq!(
        get(&laptop, "LAP-1", "status_note").as_deref(),
        Some("result ready")
    );
    let events: Vec<Event> = std::iter::from_fn(|| l.poll_event()).collect();
    assert!(events.iter().filter(|e| **e == Event::Quiescent).count() >= 2);
    assert!(!events.contains(&Event::Finished));
}

#[test]
fn each_live_edit_is_one_message_and_is_recorded_as_shared_when_the_session_settles() {
    let (mut laptop, mut center, mut l, mut c) = live_pair();

    for (round, note) in ["received", "checked", "result ready"].iter().enumerate() {
        let sent_before = c.stats().case_messages_sent;
        let received_before = l.stats().case_messages_sent;
        edit(&mut center, 2, "LAP-1", "status_note", note);
        c.handle_local_change(&id("LAP-1"), &mut center.for_peer("left"))
            .unwrap();
        pump((&mut l, &mut laptop), (&mut c, &mut center), usize::MAX).unwrap();
        assert_eq!(get(&laptop, "LAP-1", "status_note").as_deref(), Some(*note));
        assert_eq!(
            (
                c.stats().case_messages_sent - sent_before,
                l.stats().case_messages_sent - received_before
            ),
            (1, 0),
            "round {round}: one message, no acknowledgement"
        );
        // Settled: the center knows the laptop holds its heads.
        let state = &center.sync_states[&("left".to_string(), id("LAP-1"))];
        let shared = automerge::sync::State::decode(state).unwrap().shared_heads;
        assert_eq!(
            shared,
            center.docs[&id("LAP-1")].get_heads(),
            "round {round}"
        );
    }
}

#[test]
fn garbage_from_a_peer_closes_the_session_and_writes_nothing() {
    let mut center = MemoryNode::default();
    let mut c = start(&mut center, "left", SessionConfig::default());
    let err = c
        .handle_bytes(b"\x00\x00\x00\x05GET /", &mut center.for_peer("left"))
        .unwrap_err();
    assert!(err.is_peer_fault(), "{err}");
    assert_eq!(c.phase(), Phase::Closed);
    assert_eq!(center.commits, 0);
    // The peer is told why before the connection closes.
    let frames: Vec<Vec<u8>> = std::iter::from_fn(|| c.poll_transmit()).collect();
    let last = Message::decode(&frames.last().unwrap()[4..]).unwrap();
    assert!(matches!(last, Message::Goodbye(g) if g.code == GoodbyeCode::ProtocolError));
}

#[test]
fn an_oversized_frame_is_refused_before_it_is_buffered() {
    let mut center = MemoryNode::default();
    let mut c = start(&mut center, "left", SessionConfig::default());
    let err = c
        .handle_bytes(
            &[0xff, 0xff, 0xff, 0xff, 1, 2, 3],
            &mut center.for_peer("left"),
        )
        .unwrap_err();
    assert!(matches!(err, SessionError::Frame(_)), "{err}");
}

#[test]
fn a_case_sync_before_the_handshake_is_a_protocol_error() {
    let mut center = MemoryNode::default();
    let mut c = start(&mut center, "left", SessionConfig::default());
    let msg = Message::CaseSync {
        case: id("X-1"),
        data: vec![0x42],
    };
    let frame = fieldcase_sync::frame::encode_frame(&msg.encode());
    let err = c
        .handle_bytes(&frame, &mut center.for_peer("left"))
        .unwrap_err();
    assert!(matches!(err, SessionError::Protocol(_)), "{err}");
    assert!(center.docs.is_empty());
}

#[test]
fn an_old_laptop_and_a_newer_center_both_say_they_cannot_talk() {
    let mut laptop = MemoryNode::default();
    let mut center = MemoryNode::default();
    laptop
        .docs
        .insert(id("LAP-1"), new_case(1, "LAP-1", "0901"));
    let old = protocol_1();
    let new = SessionConfig {
        version_min: 2,
        version_max: 3,
        ..SessionConfig::default()
    };
    let mut l = start(&mut laptop, "right", old);
    let mut c = start(&mut center, "left", new);
    // Each side reads the other's hello, fails on its own and says why.
    let mut texts = Vec::new();
    for _ in 0..2 {
        match pump((&mut l, &mut laptop), (&mut c, &mut center), usize::MAX) {
            Err(Failure::Left(e)) | Err(Failure::Right(e)) => texts.push(e.to_string()),
            Ok(()) => {}
        }
    }
    assert_eq!(texts.len(), 2, "{texts:?}");
    for text in &texts {
        assert!(text.contains("1..=1") && text.contains("2..=3"), "{text}");
    }
    assert_eq!(l.phase(), Phase::Closed);
    assert_eq!(c.phase(), Phase::Closed);
    assert!(center.docs.is_empty(), "no case data moved");
}

#[test]
fn changes_the_validator_refuses_are_never_committed() {
    let mut laptop = MemoryNode::default();
    let mut center = MemoryNode {
        validator: Some(|doc| match doc.get(ROOT, "code") {
            Ok(Some(_)) => Ok(()),
            _ => Err("a case needs a code".into()),
        }),
        ..MemoryNode::default()
    };
    let mut bad = Automerge::new();
    let mut tx = bad.transaction();
    tx.put(ROOT, "junk", 1).unwrap();
    tx.commit();
    laptop.docs.insert(id("BAD-1"), bad);
    let mut l = start(&mut laptop, "right", SessionConfig::default());
    let mut c = start(&mut center, "left", SessionConfig::default());
    let failure = pump((&mut l, &mut laptop), (&mut c, &mut center), usize::MAX).unwrap_err();
    assert!(
        matches!(failure, Failure::Right(SessionError::Rejected { .. })),
        "{failure:?}"
    );
    assert!(center.docs.is_empty());
    assert!(center.sync_states.is_empty(), "no sync marker moved");
}

#[test]
fn a_full_disk_stops_the_session_as_a_local_fault_and_acknowledges_nothing() {
    let mut laptop = MemoryNode::default();
    let mut center = MemoryNode {
        fail_next_commit: true,
        ..MemoryNode::default()
    };
    laptop
        .docs
        .insert(id("LAP-1"), new_case(1, "LAP-1", "0901"));
    let mut l = start(&mut laptop, "right", SessionConfig::default());
    let mut c = start(&mut center, "left", SessionConfig::default());
    let failure = pump((&mut l, &mut laptop), (&mut c, &mut center), usize::MAX).unwrap_err();
    match failure {
        Failure::Right(e) => assert!(!e.is_peer_fault(), "{e}"),
        other => panic!("{other:?}"),
    }
    assert!(center.docs.is_empty());
    // The next attempt, with the disk fixed, converges.
    sync_once(&mut laptop, &mut center);
    assert_eq!(center.docs.len(), 1);
}

#[test]
fn a_one_shot_session_waits_until_both_sides_fetched_their_attachments() {
    let mut laptop = MemoryNode::default();
    let mut center = MemoryNode::default();
    laptop
        .docs
        .insert(id("LAP-1"), new_case(1, "LAP-1", "0901"));
    let with_blobs = SessionConfig {
        blob_transfer: true,
        ..SessionConfig::default()
    };
    let mut l = start(&mut laptop, "right", with_blobs.clone());
    let mut c = start(&mut center, "left", with_blobs);
    pump((&mut l, &mut laptop), (&mut c, &mut center), usize::MAX).unwrap();
    // Case records converged first; neither side may close yet.
    assert_eq!(center.docs.len(), 1);
    assert!(!l.is_finished() && !c.is_finished());
    assert_eq!(
        l.poll_event(),
        Some(Event::Connected {
            version: PROTOCOL_VERSION,
            live: false
        })
    );
    assert_eq!(l.poll_event(), Some(Event::Quiescent));

    l.handle_local_blobs_done(&mut laptop.for_peer("right"))
        .unwrap();
    pump((&mut l, &mut laptop), (&mut c, &mut center), usize::MAX).unwrap();
    assert!(
        !l.is_finished() && !c.is_finished(),
        "the center still downloads"
    );

    c.handle_local_blobs_done(&mut center.for_peer("left"))
        .unwrap();
    pump((&mut l, &mut laptop), (&mut c, &mut center), usize::MAX).unwrap();
    assert!(l.is_finished() && c.is_finished());
}

#[test]
fn a_fresh_laptop_receives_each_missing_case_whole_in_one_message() {
    let mut laptop = MemoryNode::default();
    let mut center = MemoryNode::default();
    for n in 0..40u8 {
        let code = format!("CEN-{n}");
        center
            .docs
            .insert(id(&code), new_case(2, &code, &format!("09{n:02}")));
        edit(&mut center, 2, &code, "status", "received");
    }
    let (l, c) = sync_once(&mut laptop, &mut center);
    assert_eq!(laptop.docs.len(), 40);
    for (code, doc) in &center.docs {
        assert_eq!(laptop.docs[code].get_heads(), doc.get_heads(), "{code}");
    }
    // One document per case, no Automerge exchange: the laptop sent only
    // its requests, and stored a sync state at each case's heads.
    assert_eq!(l.stats().whole_docs_received, 40);
    assert_eq!(c.stats().whole_docs_sent, 40);
    assert_eq!(l.stats().case_messages_received, 40);
    assert_eq!(l.stats().case_messages_sent, 0);
    assert_eq!(l.stats().cases_created.len(), 40);
    assert_eq!(laptop.sync_states.len(), 40);

    // The next edit of one of them is one small Automerge exchange from
    // the stored state, not a re-send of the document.
    edit(&mut center, 2, "CEN-7", "status", "processing");
    let (l, _) = sync_once(&mut laptop, &mut center);
    assert_eq!(
        get(&laptop, "CEN-7", "status").as_deref(),
        Some("processing")
    );
    assert_eq!(l.stats().whole_docs_received, 0);
    assert_eq!(l.stats().cases_received.len(), 1);
}

#[test]
fn a_laptop_speaking_protocol_1_still_gets_every_case_through_automerge() {
    let mut laptop = MemoryNode::default();
    let mut center = MemoryNode::default();
    for code in ["CEN-1", "CEN-2"] {
        center.docs.insert(id(code), new_case(2, code, "0911"));
    }
    laptop
        .docs
        .insert(id("LAP-1"), new_case(1, "LAP-1", "0901"));
    let old = protocol_1();
    let mut l = start(&mut laptop, "right", old);
    let mut c = start(&mut center, "left", SessionConfig::default());
    pump((&mut l, &mut laptop), (&mut c, &mut center), usize::MAX).unwrap();
    assert!(l.is_finished() && c.is_finished());
    assert_eq!(
        l.poll_event(),
        Some(Event::Connected {
            version: 1,
            live: false
        })
    );
    for code in ["CEN-1", "CEN-2", "LAP-1"] {
        assert_eq!(
            laptop.docs[&id(code)].get_heads(),
            center.docs[&id(code)].get_heads(),
            "{code} converged"
        );
    }
    assert_eq!(c.stats().whole_docs_sent + l.stats().whole_docs_sent, 0);
}

#[test]
fn a_peer_downgraded_to_protocol_1_costs_one_failed_sync_then_works() {
    let mut laptop = MemoryNode::default();
    let mut center = MemoryNode::default();
    center
        .docs
        .insert(id("CEN-1"), new_case(2, "CEN-1", "0911"));
    sync_once(&mut laptop, &mut center);
    assert!(center.listed.contains_key("left"), "the center remembers");
    edit(&mut center, 2, "CEN-1", "status", "processing");

    // The laptop is replaced by an older build. The center's opening
    // already carried a protocol-2 listing the laptop cannot read.
    let old = protocol_1();
    let mut l = start(&mut laptop, "right", old.clone());
    let mut c = start(&mut center, "left", SessionConfig::default());
    c.fill(&mut center.for_peer("left")).unwrap();
    assert!(pump((&mut l, &mut laptop), (&mut c, &mut center), usize::MAX).is_err());
    assert!(!center.listed.contains_key("left"), "the center forgot");

    let mut l = start(&mut laptop, "right", old);
    let mut c = start(&mut center, "left", SessionConfig::default());
    pump((&mut l, &mut laptop), (&mut c, &mut center), usize::MAX).unwrap();
    assert!(l.is_finished() && c.is_finished());
    assert_eq!(
        get(&laptop, "CEN-1", "status").as_deref(),
        Some("processing")
    );
}
