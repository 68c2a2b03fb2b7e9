//! A trusted peer lists thousands of cases we do not hold and then never
//! answers our offers. Our side must keep only a bounded number of
//! exchanges open, so its memory does not grow with the peer's listing.

use fieldcase_sync::frame::encode_frame;
use fieldcase_sync::memory::MemoryNode;
use fieldcase_sync::session::OFFERS_IN_FLIGHT_MAX;
use fieldcase_sync::wire::{ChangesEnd, Hello, Message, PROTOCOL_VERSION};
use fieldcase_sync::{CaseId, Session, SessionConfig};

fn frame(m: &Message) -> Vec<u8> {
    encode_frame(&m.encode())
}

#[test]
fn a_peer_that_lists_much_and_answers_nothing_gets_a_bounded_number_of_offers() {
    let mut center = MemoryNode::with_store_id([1; 16]);
    let mut session = Session::new(SessionConfig::default());
    session.start(&mut center.for_peer("flooder")).unwrap();
    let mut input = frame(&Message::Hello(Hello {
        version_min: PROTOCOL_VERSION,
        version_max: PROTOCOL_VERSION,
        live: false,
    }));
    input.extend(frame(&Message::Since {
        store_id: [1; 16],
        seq: 0,
    }));
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
    let mut offers = 0usize;
    for _ in 0..1000 {
        let mut moved = false;
        while let Some(f) = session.poll_transmit() {
            moved = true;
            if matches!(Message::decode(&f[4..]).unwrap(), Message::CaseSync { .. }) {
                offers += 1;
            }
        }
        session.fill(&mut center.for_peer("flooder")).unwrap();
        if !moved && !session.has_queued() {
            break;
        }
    }
    assert_eq!(
        offers, OFFERS_IN_FLIGHT_MAX,
        "offers stop at the in-flight bound"
    );
    assert!(
        session.has_backlog(),
        "the rest waits for answers that never come"
    );
    assert!(center.docs.is_empty(), "nothing was written");
}
