//! Regression tests for what the hostile-peer tests caught: a peer that
//! speaks the protocol correctly but never stops talking, so a one-shot
//! session (and the connection slot and task it holds) would never end.

use fieldcase_sync::frame::encode_frame;
use fieldcase_sync::memory::MemoryNode;
use fieldcase_sync::wire::{ChangesEnd, Hello, Message, PROTOCOL_VERSION};
use fieldcase_sync::{Phase, Session, SessionConfig, SessionError};

fn frames(msgs: &[Message]) -> Vec<u8> {
    msgs.iter()
        .flat_map(|m| encode_frame(&m.encode()))
        .collect()
}

/// A session over an empty node that has received a correct opening from
/// the peer: hello, a cursor and an empty listing (one data message).
fn opened(node: &mut MemoryNode) -> Session {
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
        Message::Changes {
            entries: vec![],
            end: Some(ChangesEnd {
                store_id: [9; 16],
                upto: 0,
            }),
        },
    ]);
    s.handle_bytes(&bytes, &mut node.for_peer("peer")).unwrap();
    assert_eq!(s.phase(), Phase::Sync);
    s
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
