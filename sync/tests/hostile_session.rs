//! Regression tests for what the hostile-peer tests caught: a peer that
//! speaks the protocol correctly but never stops talking, so a one-shot
//! session (and the connection slot and task it holds) would never end.

use fieldcase_sync::frame::encode_frame;
use fieldcase_sync::memory::MemoryNode;
use fieldcase_sync::wire::{ChangesEnd, Hello, Message, PROTOCOL_VERSION};
use fieldcase_sync::{CaseId, Phase, Session, SessionConfig, SessionError};

fn frames(msgs: &[Message]) -> Vec<u8> {
    msgs.iter()
        .flat_map(|m| encode_frame(&m.encode()))
        .collect()
}

/// A session over an empty node that has received a correct opening from
/// the peer: hello, a cursor and a listing of `listed` that ends at `upto`
/// (one data message).
fn opened_with(node: &mut MemoryNode, listed: &[&str], upto: u64) -> Session {
    let mut s = Session::new(SessionConfig::default());
    s.start(&mut node.for_peer("peer")).unwrap();
    let bytes = frames(&[
        Message::Hello(Hello {
            version_min: PROTOCOL_VERSION,
            version_max: PROTOCOL_VERSION,
            live: false,
        }),
        Message::Since {
            store_id: [9; 16],
            seq: 0,
        },
        Message::ListingStart { after: 0 },
        Message::Changes {
            entries: listed
                .iter()
                .map(|c| (CaseId::new(c).unwrap(), [3; 16]))
                .collect(),
            end: Some(ChangesEnd {
                store_id: [9; 16],
                upto,
            }),
        },
    ]);
    s.handle_bytes(&bytes, &mut node.for_peer("peer")).unwrap();
    assert_eq!(s.phase(), Phase::Sync);
    s
}

/// [`opened_with`] an empty listing.
fn opened(node: &mut MemoryNode) -> Session {
    opened_with(node, &[], 0)
}

#[test]
fn an_endless_stream_of_idle_frames_is_a_protocol_error() {
    let mut node = MemoryNode::default();
    let mut s = opened(&mut node);
    // One Idle with the counts an honest peer would send is fine: it sent
    // one data message (its listing) and received none it must count.
    let idle = frames(&[Message::Idle {
        received: 0,
        sent: 1,
    }]);
    s.handle_bytes(&idle, &mut node.for_peer("peer")).unwrap();
    // The same again, with nothing exchanged in between, is not.
    let err = s
        .handle_bytes(&idle, &mut node.for_peer("peer"))
        .unwrap_err();
    assert!(
        matches!(&err, SessionError::Protocol(r) if r.contains("repeated an Idle")),
        "{err}"
    );
    assert!(err.is_peer_fault());
    assert!(s.is_closed());
}

#[test]
fn an_idle_claiming_messages_we_never_received_is_a_protocol_error() {
    for (received, sent) in [(0, 2), (0, 0), (1_000, 1)] {
        let mut node = MemoryNode::default();
        let mut s = opened(&mut node);
        let err = s
            .handle_bytes(
                &frames(&[Message::Idle { received, sent }]),
                &mut node.for_peer("peer"),
            )
            .unwrap_err();
        assert!(
            matches!(&err, SessionError::Protocol(r) if r.contains("Idle claims")),
            "({received}, {sent}): {err}"
        );
    }
}

#[test]
fn blobs_done_twice_is_a_protocol_error() {
    let mut node = MemoryNode::default();
    let mut s = opened(&mut node);
    let done = frames(&[Message::BlobsDone]);
    s.handle_bytes(&done, &mut node.for_peer("peer")).unwrap();
    let err = s
        .handle_bytes(&done, &mut node.for_peer("peer"))
        .unwrap_err();
    assert!(matches!(&err, SessionError::Protocol(r) if r.contains("BlobsDone twice")));
}

/// A session over an empty node whose peer listed `CEN-1`, which the node
/// lacks; the node has asked for it whole.
fn asked_for_cen_1(node: &mut MemoryNode) -> Session {
    let mut s = opened_with(node, &["CEN-1"], 1);
    let sent: Vec<Message> = std::iter::from_fn(|| s.poll_transmit())
        .map(|f| Message::decode(&f[4..]).unwrap())
        .collect();
    assert!(
        sent.iter()
            .any(|m| matches!(m, Message::Want { cases } if cases.len() == 1)),
        "{sent:?}"
    );
    s
}

#[test]
fn a_whole_case_nobody_asked_for_is_a_protocol_error() {
    let mut node = MemoryNode::default();
    let mut s = asked_for_cen_1(&mut node);
    let err = s
        .handle_bytes(
            &frames(&[Message::CaseDoc {
                case: CaseId::new("OTHER-1").unwrap(),
                data: vec![1, 2, 3],
            }]),
            &mut node.for_peer("peer"),
        )
        .unwrap_err();
    assert!(
        matches!(&err, SessionError::Protocol(r) if r.contains("without being asked")),
        "{err}"
    );
    assert!(node.docs.is_empty());
}

#[test]
fn garbage_instead_of_a_whole_case_falls_back_to_an_automerge_exchange() {
    let mut node = MemoryNode::default();
    let mut s = asked_for_cen_1(&mut node);
    s.handle_bytes(
        &frames(&[Message::CaseDoc {
            case: CaseId::new("CEN-1").unwrap(),
            data: b"not an automerge document".to_vec(),
        }]),
        &mut node.for_peer("peer"),
    )
    .unwrap();
    assert!(node.docs.is_empty(), "nothing corrupt is stored");
    let sent: Vec<Message> = std::iter::from_fn(|| s.poll_transmit())
        .map(|f| Message::decode(&f[4..]).unwrap())
        .collect();
    assert!(
        sent.iter()
            .any(|m| matches!(m, Message::CaseSync { case, .. } if case.as_str() == "CEN-1")),
        "the case is offered the usual way instead: {sent:?}"
    );
}

#[test]
fn a_peer_that_claims_to_be_done_without_sending_a_requested_case_is_caught() {
    let mut node = MemoryNode::default();
    let mut s = asked_for_cen_1(&mut node);
    // It received our request (2 data messages: ... our listing and the
    // Want) and claims it sent only its listing: the case never came.
    let err = s
        .handle_bytes(
            &frames(&[Message::Idle {
                received: 2,
                sent: 1,
            }]),
            &mut node.for_peer("peer"),
        )
        .unwrap_err();
    assert!(
        matches!(&err, SessionError::Protocol(r) if r.contains("unanswered")),
        "{err}"
    );
}

/// Feeds `msgs` to a freshly opened session and returns its error.
fn error_after(msgs: &[Message]) -> SessionError {
    let mut node = MemoryNode::default();
    let mut s = asked_for_cen_1(&mut node);
    let err = s
        .handle_bytes(&frames(msgs), &mut node.for_peer("peer"))
        .unwrap_err();
    assert!(err.is_peer_fault(), "{err}");
    assert!(s.is_closed());
    assert!(node.docs.is_empty(), "nothing was stored");
    err
}

fn part(offset: usize, last: bool, bytes: &[u8]) -> Message {
    Message::Part {
        offset: offset as u64,
        last,
        bytes: bytes.to_vec(),
    }
}

#[test]
fn parts_that_join_into_anything_but_a_case_message_are_a_protocol_error() {
    let idle = Message::Idle {
        received: 0,
        sent: 1,
    }
    .encode();
    let err = error_after(&[part(0, false, &idle[..1]), part(1, true, &idle[1..])]);
    assert!(
        matches!(&err, SessionError::Protocol(r) if r.contains("only case messages")),
        "{err}"
    );
    let nested = part(0, true, b"x").encode();
    let err = error_after(&[part(0, true, &nested)]);
    assert!(
        matches!(&err, SessionError::Protocol(r) if r.contains("only case messages")),
        "{err}"
    );
}

#[test]
fn parts_adding_up_to_more_than_a_frame_are_refused_before_they_are_buffered() {
    let chunk = vec![0u8; 1024 * 1024];
    let msgs: Vec<Message> = (0..9)
        .map(|i| part(i * chunk.len(), false, &chunk))
        .collect();
    let err = error_after(&msgs);
    assert!(
        matches!(&err, SessionError::Protocol(r) if r.contains("exceeds")),
        "{err}"
    );
}

#[test]
fn an_idle_or_an_empty_part_in_the_middle_of_a_split_message_is_a_protocol_error() {
    let doc = Message::CaseDoc {
        case: CaseId::new("CEN-1").unwrap(),
        data: vec![7; 100],
    }
    .encode();
    let err = error_after(&[
        part(0, false, &doc[..50]),
        Message::Idle {
            received: 2,
            sent: 1,
        },
    ]);
    assert!(
        matches!(&err, SessionError::Protocol(r) if r.contains("middle")),
        "{err}"
    );
    let err = error_after(&[part(0, false, &doc[..50]), part(50, false, &[])]);
    assert!(
        matches!(&err, SessionError::Protocol(r) if r.contains("empty part")),
        "{err}"
    );
}

/// What a fresh session says to a peer speaking at most `version` that
/// sends `msg` right after its hello. Nothing may be stored.
fn error_from_older_peer(version: u16, msg: Message) -> SessionError {
    let mut node = MemoryNode::default();
    let mut s = Session::new(SessionConfig::default());
    s.start(&mut node.for_peer("peer")).unwrap();
    let hello = Message::Hello(Hello {
        version_min: 1,
        version_max: version,
        live: false,
    });
    let err = s
        .handle_bytes(&frames(&[hello, msg]), &mut node.for_peer("peer"))
        .unwrap_err();
    assert!(node.docs.is_empty());
    err
}

#[test]
fn a_protocol_2_peer_cannot_send_parts() {
    let err = error_from_older_peer(2, part(0, true, b"x"));
    assert!(
        matches!(&err, SessionError::Protocol(r) if r.contains("unexpected part")),
        "{err}"
    );
}

#[test]
fn a_case_asked_for_whole_may_arrive_in_parts() {
    let mut node = MemoryNode::default();
    let mut s = asked_for_cen_1(&mut node);
    let mut doc = automerge::Automerge::new();
    {
        use automerge::transaction::Transactable;
        let mut tx = doc.transaction();
        tx.put(automerge::ROOT, "code", "CEN-1").unwrap();
        tx.commit();
    }
    let whole = Message::CaseDoc {
        case: CaseId::new("CEN-1").unwrap(),
        data: doc.save(),
    }
    .encode();
    let (a, b) = whole.split_at(whole.len() / 2);
    s.handle_bytes(&frames(&[part(0, false, a)]), &mut node.for_peer("peer"))
        .unwrap();
    assert!(node.docs.is_empty(), "half a case is not a case");
    s.handle_bytes(
        &frames(&[part(a.len(), true, b)]),
        &mut node.for_peer("peer"),
    )
    .unwrap();
    assert_eq!(
        node.docs[&CaseId::new("CEN-1").unwrap()].get_heads(),
        doc.get_heads()
    );
}

#[test]
fn a_swapped_or_repeated_part_is_refused_instead_of_joined_into_damaged_changes() {
    let doc = Message::CaseDoc {
        case: CaseId::new("CEN-1").unwrap(),
        data: vec![7; 300],
    }
    .encode();
    let (a, rest) = doc.split_at(100);
    let (b, c) = rest.split_at(100);
    // The middle part arrives before the first...
    let err = error_after(&[part(100, false, b), part(0, false, a), part(200, true, c)]);
    assert!(
        matches!(&err, SessionError::Protocol(r) if r.contains("offset 100")),
        "{err}"
    );
    // ... or twice.
    let err = error_after(&[
        part(0, false, a),
        part(0, false, a),
        part(100, false, b),
        part(200, true, c),
    ]);
    assert!(
        matches!(&err, SessionError::Protocol(r) if r.contains("offset 0")),
        "{err}"
    );
}

#[test]
fn a_push_from_a_peer_that_speaks_protocol_3_is_a_protocol_error() {
    let push = Message::CasePush {
        case: CaseId::new("CEN-1").unwrap(),
        data: Vec::new(),
    };
    let err = error_from_older_peer(3, push);
    assert!(
        matches!(&err, SessionError::Protocol(r) if r.contains("unexpected case-push")),
        "{err}"
    );
}
