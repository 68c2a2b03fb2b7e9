//! Stories of one large case among many small ones, over a slow link: the
//! large case travels in parts ([`Message::Part`]) between the small ones,
//! so it never holds them back.
//!
//! The link is modelled the way a transport drives a session: each side
//! moves frames into a bounded send buffer (the socket and QUIC buffers),
//! and each round the link carries a fixed number of bytes each way.

use std::collections::BTreeMap;

use automerge::transaction::Transactable;
use automerge::{ActorId, Automerge, ReadDoc, ROOT};
use fieldcase_sync::memory::MemoryNode;
use fieldcase_sync::session::{PART_BYTES, SPLIT_ABOVE_BYTES};
use fieldcase_sync::wire::Message;
use fieldcase_sync::{CaseId, Session, SessionConfig};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Bytes the link carries each way per round (the slow field link).
const LINK_BYTES_PER_ROUND: usize = 8 * 1024;
/// Bytes a side moves into its send buffer ahead of the link.
const SEND_BUFFER_BYTES: usize = 64 * 1024;
/// Upper bound on rounds; a session that needs more is a liveness bug.
const ROUNDS_MAX: usize = 5_000;
/// Small cases queued behind the large one.
const SMALL_CASES: usize = 40;

fn id(s: &str) -> CaseId {
    CaseId::new(s).unwrap()
}

fn small_case(code: &str) -> Automerge {
    let mut doc = Automerge::new().with_actor(ActorId::from(vec![2; 16]));
    let mut tx = doc.transaction();
    tx.put(ROOT, "code", code).unwrap();
    tx.put(ROOT, "phone", "0903 555 111").unwrap();
    tx.commit();
    doc
}

/// Text that does not compress much, as a long typed-up survey note
/// does not once it is more than a few words: `bytes` of it, drawn from a
/// seeded RNG.
fn note_text(rng: &mut ChaCha8Rng, bytes: usize) -> String {
    const LETTERS: &[u8] = b"abcdeghiklmnopqrstuvxyABCDEGHIKLMNOPQRSTUVXY0123456789 .,-";
    (0..bytes)
        .map(|_| char::from(LETTERS[rng.random_range(0..LETTERS.len())]))
        .collect()
}

fn put_note(doc: &mut Automerge, text: &str) {
    let mut tx = doc.transaction();
    tx.put(ROOT, "survey-note", text).unwrap();
    tx.commit();
}

/// When each case first reached the laptop, and what each side sent.
struct Run {
    arrived: BTreeMap<CaseId, usize>,
    parts_from_center: usize,
}

impl Run {
    /// The round in which the large case arrived.
    fn large_at(&self) -> usize {
        self.arrived[&id("DAT-000001")]
    }
    fn small_rounds(&self) -> impl Iterator<Item = usize> + '_ {
        (0..SMALL_CASES).map(|i| self.arrived[&id(&format!("KS-{i:06}"))])
    }
    /// The round in which the last small case arrived.
    fn last_small(&self) -> usize {
        self.small_rounds().max().expect("small cases")
    }
    /// The round in which the first small case arrived.
    fn first_small(&self) -> usize {
        self.small_rounds().min().expect("small cases")
    }
}

/// Syncs `laptop` with `center` over the slow link until both finish.
fn sync_over_slow_link(
    laptop: &mut MemoryNode,
    center: &mut MemoryNode,
    center_config: SessionConfig,
) -> Run {
    let mut l = Session::new(SessionConfig::default());
    l.start(&mut laptop.for_peer("center")).unwrap();
    let mut c = Session::new(center_config);
    c.start(&mut center.for_peer("laptop")).unwrap();
    let mut to_center: Vec<u8> = Vec::new();
    let mut to_laptop: Vec<u8> = Vec::new();
    let mut run = Run {
        arrived: BTreeMap::new(),
        parts_from_center: 0,
    };
    for round in 0..ROUNDS_MAX {
        // Each side fills its send buffer, generating backlog as a
        // transport does when the buffer drains.
        for (session, node, peer, buffer, parts) in [
            (&mut l, &mut *laptop, "center", &mut to_center, None),
            (
                &mut c,
                &mut *center,
                "laptop",
                &mut to_laptop,
                Some(&mut run.parts_from_center),
            ),
        ] {
            let mut parts = parts;
            while buffer.len() < SEND_BUFFER_BYTES {
                match session.poll_transmit() {
                    Some(frame) => {
                        if matches!(Message::decode(&frame[4..]), Ok(Message::Part { .. })) {
                            if let Some(p) = parts.as_deref_mut() {
                                *p += 1;
                            }
                        }
                        buffer.extend_from_slice(&frame);
                    }
                    None if session.has_backlog() => {
                        session.fill(&mut node.for_peer(peer)).unwrap();
                        if !session.has_queued() {
                            break;
                        }
                    }
                    None => break,
                }
            }
        }
        // The link carries a slice of each buffer.
        let n = to_laptop.len().min(LINK_BYTES_PER_ROUND);
        let bytes: Vec<u8> = to_laptop.drain(..n).collect();
        l.handle_bytes(&bytes, &mut laptop.for_peer("center"))
            .unwrap();
        let n = to_center.len().min(LINK_BYTES_PER_ROUND);
        let bytes: Vec<u8> = to_center.drain(..n).collect();
        c.handle_bytes(&bytes, &mut center.for_peer("laptop"))
            .unwrap();
        for (case, doc) in &laptop.docs {
            if center.docs.get(case).map(|d| d.get_heads()) == Some(doc.get_heads()) {
                run.arrived.entry(case.clone()).or_insert(round);
            }
        }
        if l.is_finished() && c.is_finished() {
            return run;
        }
    }
    panic!("the sync did not finish within {ROUNDS_MAX} rounds");
}

/// The center holds one case with a long survey note, listed first, and
/// [`SMALL_CASES`] small ones listed after it.
fn center_with_one_large_case(rng: &mut ChaCha8Rng, note_bytes: usize) -> MemoryNode {
    let mut center = MemoryNode::with_store_id([2; 16]);
    let mut large = small_case("DAT-000001");
    put_note(&mut large, &note_text(rng, note_bytes));
    center.docs.insert(id("DAT-000001"), large);
    for i in 0..SMALL_CASES {
        let code = format!("KS-{i:06}");
        center.docs.insert(id(&code), small_case(&code));
    }
    center
}

#[test]
fn a_survey_case_with_a_long_note_does_not_hold_back_the_small_cases_behind_it() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x1a2e_0001);
    let mut center = center_with_one_large_case(&mut rng, 1_500_000);
    assert!(center.docs[&id("DAT-000001")].save().len() > 20 * SPLIT_ABOVE_BYTES);
    let mut laptop = MemoryNode::with_store_id([1; 16]);

    let run = sync_over_slow_link(&mut laptop, &mut center, SessionConfig::default());

    assert_eq!(laptop.docs.len(), SMALL_CASES + 1, "everything arrived");
    let (large_at, last_small) = (run.large_at(), run.last_small());
    assert!(
        last_small < large_at / 4,
        "every small case arrived (by round {last_small}) long before the large one \
         (round {large_at})"
    );
    assert!(
        run.parts_from_center >= 1_000_000 / PART_BYTES,
        "the large case went in parts ({} sent)",
        run.parts_from_center
    );
}

#[test]
fn a_long_note_added_to_a_case_the_laptop_has_does_not_hold_back_other_edits() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x1a2e_0002);
    let mut center = center_with_one_large_case(&mut rng, 0);
    let mut laptop = MemoryNode::with_store_id([1; 16]);
    sync_over_slow_link(&mut laptop, &mut center, SessionConfig::default());

    // Back at the center: a surveyor types up the long note first, then
    // clerks make small edits to the other cases.
    let text = note_text(&mut rng, 1_000_000);
    put_note(center.docs.get_mut(&id("DAT-000001")).unwrap(), &text);
    for i in 0..SMALL_CASES {
        let doc = center.docs.get_mut(&id(&format!("KS-{i:06}"))).unwrap();
        let mut tx = doc.transaction();
        tx.put(ROOT, "status", "processing").unwrap();
        tx.commit();
    }

    let run = sync_over_slow_link(&mut laptop, &mut center, SessionConfig::default());

    let (large_at, last_small) = (run.large_at(), run.last_small());
    assert!(
        last_small < large_at / 2,
        "the small edits arrived (by round {last_small}) before the note finished (round {large_at})"
    );
    let note = laptop.docs[&id("DAT-000001")]
        .get(ROOT, "survey-note")
        .unwrap()
        .and_then(|(v, _)| v.into_string().ok());
    assert_eq!(
        note.as_deref(),
        Some(text.as_str()),
        "the note arrived whole"
    );
}

#[test]
fn a_protocol_2_center_still_sends_the_large_case_whole_in_one_frame() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x1a2e_0003);
    let mut center = center_with_one_large_case(&mut rng, 300_000);
    let mut laptop = MemoryNode::with_store_id([1; 16]);
    let old = SessionConfig {
        version_max: 2,
        ..SessionConfig::default()
    };

    let run = sync_over_slow_link(&mut laptop, &mut center, old);

    assert_eq!(laptop.docs.len(), SMALL_CASES + 1, "everything arrived");
    assert_eq!(run.parts_from_center, 0, "protocol 2 has no parts");
    // Which is exactly why protocol 3 exists: the small cases behind the
    // large one waited for all of it.
    let (large_at, first_small) = (run.large_at(), run.first_small());
    assert!(first_small >= large_at, "{first_small} < {large_at}");
}
