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
