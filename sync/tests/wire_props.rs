//! Property tests of the wire encoding: every message survives
//! encode → frame → decode unchanged, and no byte string makes the decoder
//! panic.

use fieldcase_sync::frame::{encode_frame, FrameDecoder};
use fieldcase_sync::wire::{ChangesEnd, Goodbye, GoodbyeCode, Hello, Message, HEADS_HASH_BYTES};
use fieldcase_sync::CaseId;
use proptest::prelude::*;

fn case_id() -> impl Strategy<Value = CaseId> {
    "[A-Za-z0-9._-]{1,64}".prop_map(|s| CaseId::new(&s).unwrap())
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<u16>(), any::<u16>(), any::<bool>()).prop_map(|(a, b, live)| Message::Hello(
            Hello {
                version_min: a,
                version_max: b,
                live
            }
        )),
        (any::<[u8; 16]>(), any::<u64>())
            .prop_map(|(store_id, seq)| Message::Since { store_id, seq }),
        (
            prop::collection::vec((case_id(), any::<[u8; HEADS_HASH_BYTES]>()), 0..50),
            proptest::option::of((any::<[u8; 16]>(), any::<u64>()))
        )
            .prop_map(|(entries, end)| Message::Changes {
                entries,
                end: end.map(|(store_id, upto)| ChangesEnd { store_id, upto })
            }),
        (case_id(), prop::collection::vec(any::<u8>(), 0..2000))
            .prop_map(|(case, data)| Message::CaseSync { case, data }),
        (case_id(), prop::collection::vec(any::<u8>(), 0..2000))
            .prop_map(|(case, data)| Message::CasePush { case, data }),
        prop::collection::vec(case_id(), 0..50).prop_map(|cases| Message::Want { cases }),
        any::<u64>().prop_map(|after| Message::ListingStart { after }),
        (case_id(), prop::collection::vec(any::<u8>(), 0..2000))
            .prop_map(|(case, data)| Message::CaseDoc { case, data }),
        (
            any::<u64>(),
            any::<bool>(),
            prop::collection::vec(any::<u8>(), 0..2000)
        )
            .prop_map(|(offset, last, bytes)| Message::Part {
                offset,
                last,
                bytes
            }),
        (any::<u64>(), any::<u64>()).prop_map(|(received, sent)| Message::Idle { received, sent }),
        Just(Message::BlobsDone),
        (any::<[u8; 32]>(), any::<u64>())
            .prop_map(|(hash, offset)| Message::BlobRequest { hash, offset }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(size, offset)| Message::BlobHeader { size, offset }),
        "[ -~]{0,200}".prop_map(|reason| Message::BlobUnavailable { reason }),
        (1u16..=3, "[ -~]{0,200}").prop_map(|(code, reason)| Message::Goodbye(Goodbye {
            code: match code {
                1 => GoodbyeCode::VersionMismatch,
                2 => GoodbyeCode::ProtocolError,
                _ => GoodbyeCode::LocalFault,
            },
            reason
        })),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn every_message_round_trips_through_a_frame(msg in message(), split in 0usize..64) {
        let frame = encode_frame(&msg.encode());
        let mut dec = FrameDecoder::new();
        let cut = split.min(frame.len());
        dec.push(&frame[..cut]);
        let mut got = dec.next_frame().unwrap();
        if got.is_none() {
            dec.push(&frame[cut..]);
            got = dec.next_frame().unwrap();
        }
        let payload = got.expect("a whole frame was pushed");
        prop_assert_eq!(Message::decode(&payload).unwrap(), msg);
        prop_assert_eq!(dec.buffered_bytes(), 0);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoders(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = Message::decode(&bytes);
        let mut dec = FrameDecoder::new();
        dec.push(&bytes);
        while let Ok(Some(payload)) = dec.next_frame() {
            let _ = Message::decode(&payload);
        }
    }
}
