//! A trusted peer lists thousands of cases we do not hold and then never
//! answers our requests (protocol 2) or offers (protocol 1). Our side must
//! keep only a bounded number of them open, so its memory does not grow
//! with the peer's listing.

use fieldcase_sync::frame::encode_frame;
use fieldcase_sync::memory::MemoryNode;
use fieldcase_sync::session::{OFFERS_IN_FLIGHT_MAX, WANTS_IN_FLIGHT_MAX};
use fieldcase_sync::wire::{ChangesEnd, Hello, Message, PROTOCOL_VERSION};
use fieldcase_sync::{CaseId, Session, SessionConfig};

fn frame(m: &Message) -> Vec<u8> {
    encode_frame(&m.encode())
}

/// Cases offered (Automerge) and requested whole by a center that was
/// flooded by a peer speaking `version`, once it has sent all it will.
struct Sent {
    offers: usize,
    wanted: usize,
}

fn flood(version: u16) -> Sent {
    let mut center = MemoryNode::with_store_id([1; 16]);
    let mut session = Session::new(SessionConfig::default());
    session.start(&mut center.for_peer("flooder")).unwrap();
    let mut input = frame(&Message::Hello(Hello {
        version_min: version,
        version_max: version,
        live: false,
    }));
    input.extend(frame(&Message::Since {
        store_id: [1; 16],
        seq: 0,
    }));
    if version >= 2 {
        input.extend(frame(&Message::ListingStart { after: 0 }));
    }
    session
        .handle_bytes(&input, &mut center.for_peer("flooder"))
        .unwrap();
    // 3 x 4,000 listed cases that the center does not hold.
    for batch in 0..3 {
        let entries = (0..4000)
            .map(|i| {
                (
                    CaseId::new(&format!("FAKE-{batch}-{i:05}")).unwrap(),
                    [7u8; 16],
                )
            })
            .collect();
        let end = (batch == 2).then_some(ChangesEnd {
            store_id: [2; 16],
            upto: 12_000,
        });
        session
            .handle_bytes(
                &frame(&Message::Changes { entries, end }),
                &mut center.for_peer("flooder"),
            )
            .unwrap();
    }
    // Drain everything the center is willing to send, as a transport would,
    // without ever answering.
    let mut sent = Sent {
        offers: 0,
        wanted: 0,
    };
    for _ in 0..1000 {
        let mut moved = false;
        while let Some(f) = session.poll_transmit() {
            moved = true;
            match Message::decode(&f[4..]).unwrap() {
                Message::CaseSync { .. } => sent.offers += 1,
                Message::Want { cases } => sent.wanted += cases.len(),
                _ => {}
            }
        }
        session.fill(&mut center.for_peer("flooder")).unwrap();
        if !moved && !session.has_queued() {
            break;
        }
    }
    assert!(
        !session.has_backlog(),
        "the rest waits for answers that never come, without asking the transport for room"
    );
    assert!(center.docs.is_empty(), "nothing was written");
    sent
}

#[test]
fn a_peer_that_lists_much_and_answers_nothing_gets_a_bounded_number_of_requests() {
    let sent = flood(PROTOCOL_VERSION);
    assert_eq!(
        sent.wanted, WANTS_IN_FLIGHT_MAX,
        "requests for whole cases stop at the in-flight bound"
    );
    assert_eq!(sent.offers, 0, "cases we lack are requested, not offered");
}

#[test]
fn an_old_peer_that_lists_much_and_answers_nothing_gets_a_bounded_number_of_offers() {
    let sent = flood(1);
    assert_eq!(
        sent.offers, OFFERS_IN_FLIGHT_MAX,
        "offers stop at the in-flight bound"
    );
    assert_eq!(sent.wanted, 0, "protocol 1 has no whole-case requests");
}
