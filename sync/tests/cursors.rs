//! Stories about change cursors: what a reconnect costs, how changes
//! travel through intermediate nodes, and what a crash mid-session leaves.

use automerge::transaction::Transactable;
use automerge::{ActorId, Automerge, ReadDoc, ROOT};
use fieldcase_sync::memory::MemoryNode;
use fieldcase_sync::{CaseId, Message, Session, SessionConfig, SessionError};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Upper bound on delivery rounds in one session.
const ROUNDS_MAX: usize = 10_000;

fn id(s: &str) -> CaseId {
    CaseId::new(s).unwrap()
}

fn node(n: u8) -> MemoryNode {
    MemoryNode::with_store_id([n; 16])
}

fn create(node: &mut MemoryNode, actor: u8, code: &str) {
    let mut doc = Automerge::new().with_actor(ActorId::from(vec![actor; 16]));
    let mut tx = doc.transaction();
    tx.put(ROOT, "code", code).unwrap();
    tx.commit();
    node.docs.insert(id(code), doc);
}

fn edit(node: &mut MemoryNode, actor: u8, code: &str, key: &str, value: &str) {
    let doc = node.docs.get_mut(&id(code)).unwrap();
    doc.set_actor(ActorId::from(vec![actor; 16]));
    let mut tx = doc.transaction();
    tx.put(ROOT, key, value).unwrap();
    tx.commit();
}

/// Runs a one-shot session between `a` (named `an`) and `b` (named `bn`),
/// delivering at most `cut_after` frames before the connection dies.
/// Returns both sessions' stats when it completes.
fn session(
    a: &mut MemoryNode,
    an: &str,
    b: &mut MemoryNode,
    bn: &str,
    cut_after: Option<usize>,
) -> Result<(Session, Session), SessionError> {
    let newest = fieldcase_sync::PROTOCOL_VERSION;
    exchange((a, an, newest), (b, bn, newest), cut_after)
}

/// Like [`session`], with a chosen newest protocol version on each side.
fn session_speaking(
    a: (&mut MemoryNode, &str, u16),
    b: (&mut MemoryNode, &str, u16),
) -> Result<(Session, Session), SessionError> {
    exchange(a, b, None)
}

fn exchange(
    a: (&mut MemoryNode, &str, u16),
    b: (&mut MemoryNode, &str, u16),
    cut_after: Option<usize>,
) -> Result<(Session, Session), SessionError> {
    let (a, an, av) = a;
    let (b, bn, bv) = b;
    let config = |v: u16| SessionConfig {
        version_max: v,
        ..SessionConfig::default()
    };
    let mut sa = Session::new(config(av));
    let mut sb = Session::new(config(bv));
    // Started and filled at once, as the transport does: a listing (and
    // pushes) from memory go out before the peer's hello arrives.
    sa.start(&mut a.for_peer(bn))?;
    sa.fill(&mut a.for_peer(bn))?;
    sb.start(&mut b.for_peer(an))?;
    sb.fill(&mut b.for_peer(an))?;
    let mut delivered = 0usize;
    for _ in 0..ROUNDS_MAX {
        let mut moved = false;
        while let Some(f) = sa.poll_transmit() {
            if cut_after.is_some_and(|n| delivered >= n) {
                return Ok((sa, sb));
            }
            delivered += 1;
            moved = true;
            sb.handle_bytes(&f, &mut b.for_peer(an))?;
        }
        while let Some(f) = sb.poll_transmit() {
            if cut_after.is_some_and(|n| delivered >= n) {
                return Ok((sa, sb));
            }
            delivered += 1;
            moved = true;
            sa.handle_bytes(&f, &mut a.for_peer(bn))?;
        }
        if !moved {
            sa.fill(&mut a.for_peer(bn))?;
            sb.fill(&mut b.for_peer(an))?;
            if !sa.has_queued() && !sb.has_queued() {
                assert!(
                    sa.is_finished() && sb.is_finished(),
                    "quiet but not finished"
                );
                return Ok((sa, sb));
            }
        }
    }
    panic!("no quiescence within {ROUNDS_MAX} rounds");
}

fn heads_of(n: &MemoryNode) -> Vec<(CaseId, Vec<automerge::ChangeHash>)> {
    n.docs
        .iter()
        .map(|(k, d)| (k.clone(), d.get_heads()))
        .collect()
}

#[test]
fn after_the_first_sync_a_reconnect_lists_only_what_changed() {
    let mut center = node(1);
    let mut laptop = node(2);
    for i in 0..500 {
        create(&mut center, 1, &format!("C-{i}"));
    }
    let (_, l) = session(&mut center, "center", &mut laptop, "laptop", None).unwrap();
    assert_eq!(l.stats().cases_received.len(), 500);

    // Nothing changed: no per-case message, the same small frame count
    // whatever the number of cases.
    let (c, l) = session(&mut center, "center", &mut laptop, "laptop", None).unwrap();
    for s in [&c, &l] {
        assert_eq!(s.stats().case_messages_sent, 0);
        assert_eq!(
            s.stats().frames_sent,
            6,
            "hello, since, listing-start, empty changes, blobs-done, idle"
        );
    }

    // Ten changed on each side: exactly those are exchanged.
    for i in 0..10 {
        edit(
            &mut center,
            1,
            &format!("C-{i}"),
            "status_note",
            "processed",
        );
        edit(&mut laptop, 2, &format!("C-{}", 100 + i), "phone", "0912");
    }
    let (c, l) = session(&mut center, "center", &mut laptop, "laptop", None).unwrap();
    assert_eq!(c.stats().cases_sent.len(), 10);
    assert_eq!(l.stats().cases_sent.len(), 10);
    assert!(c.stats().case_messages_sent <= 40, "{:?}", c.stats());
    assert_eq!(heads_of(&center), heads_of(&laptop));
}

#[test]
fn a_change_travels_from_laptop_to_laptop_through_the_center_and_a_district_hub() {
    // laptop-a — center-1 — district — center-2 — laptop-b
    let mut nodes: Vec<MemoryNode> = (1..=5).map(node).collect();
    let names = ["laptop-a", "center-1", "district", "center-2", "laptop-b"];
    create(&mut nodes[0], 10, "A-1");
    create(&mut nodes[4], 50, "B-1");
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_0005);
    // Random orders of edge syncs; four sweeps cover the diameter.
    for _ in 0..4 {
        let mut edges: Vec<usize> = (0..4).collect();
        for i in (1..edges.len()).rev() {
            let j = rng.random_range(0..=i);
            edges.swap(i, j);
        }
        for e in edges {
            let (left, right) = nodes.split_at_mut(e + 1);
            session(&mut left[e], names[e], &mut right[0], names[e + 1], None).unwrap();
        }
    }
    for n in &nodes {
        assert_eq!(heads_of(n), heads_of(&nodes[0]));
        assert_eq!(n.docs.len(), 2);
    }
    // An edit on laptop-b reaches laptop-a the same way.
    edit(
        &mut nodes[4],
        50,
        "A-1",
        "answer",
        "certificate ready Friday",
    );
    for e in (0..4).rev() {
        let (left, right) = nodes.split_at_mut(e + 1);
        session(&mut left[e], names[e], &mut right[0], names[e + 1], None).unwrap();
    }
    let answer = nodes[0].docs[&id("A-1")]
        .get(ROOT, "answer")
        .unwrap()
        .map(|(v, _)| v.into_string().unwrap());
    assert_eq!(answer.as_deref(), Some("certificate ready Friday"));
}

#[test]
fn a_star_of_laptops_converges_in_any_order() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x57a2);
    let mut center = node(1);
    let mut laptops: Vec<MemoryNode> = (2..=4).map(node).collect();
    for (i, l) in laptops.iter_mut().enumerate() {
        for k in 0..5 {
            create(l, 2 + i as u8, &format!("L{i}-{k}"));
        }
    }
    for _ in 0..2 {
        let mut order: Vec<usize> = (0..3).collect();
        for i in (1..order.len()).rev() {
            let j = rng.random_range(0..=i);
            order.swap(i, j);
        }
        for i in order {
            session(
                &mut laptops[i],
                &format!("laptop-{i}"),
                &mut center,
                "center",
                None,
            )
            .unwrap();
        }
    }
    for l in &laptops {
        assert_eq!(heads_of(l), heads_of(&center));
    }
    assert_eq!(center.docs.len(), 15);
}

#[test]
fn a_crash_mid_session_leaves_the_cursor_behind_and_the_next_sync_resends_only_the_rest() {
    let mut center = node(1);
    let mut laptop = node(2);
    for i in 0..300 {
        create(&mut center, 1, &format!("C-{i:03}"));
    }
    // The connection dies after a few hundred frames: part of the cases
    // arrived (and were committed), the rest did not.
    session(&mut center, "center", &mut laptop, "laptop", Some(400)).unwrap();
    let got = laptop.docs.len();
    assert!(got > 0 && got < 300, "the cut came mid-way ({got} cases)");
    assert!(
        !laptop.cursors.contains_key("center"),
        "the cursor never moves before everything listed is held"
    );
    // The next session converges, sending only what is missing.
    let (c, _) = session(&mut center, "center", &mut laptop, "laptop", None).unwrap();
    assert_eq!(c.stats().cases_sent.len(), 300 - got);
    assert_eq!(heads_of(&center), heads_of(&laptop));
    assert!(laptop.cursors.contains_key("center"));
}

#[test]
fn a_center_restored_from_an_old_backup_is_listed_from_the_start() {
    let mut center = node(1);
    let mut laptop = node(2);
    create(&mut center, 1, "C-1");
    session(&mut center, "center", &mut laptop, "laptop", None).unwrap();
    // The center's disk is replaced: a new store id, and a case the laptop
    // has never seen with a low sequence number.
    let mut restored = node(9);
    create(&mut restored, 1, "C-2");
    let (_, l) = session(&mut restored, "center", &mut laptop, "laptop", None).unwrap();
    assert_eq!(
        l.stats().cases_received.len(),
        1,
        "the new store is listed from zero"
    );
    assert!(
        restored.docs.contains_key(&id("C-1")),
        "and the laptop restores what it lost"
    );
}

#[test]
fn a_reconnect_lists_from_memory_in_its_first_flight() {
    let mut center = node(1);
    let mut laptop = node(2);
    for i in 0..50 {
        create(&mut center, 1, &format!("C-{i}"));
    }
    session(&mut center, "center", &mut laptop, "laptop", None).unwrap();
    edit(&mut center, 1, "C-7", "status_note", "processed");

    // Before hearing anything from the laptop, the center's opening
    // already carries its listing: hello, cursor, listing start (from the
    // position the laptop stored last time) and the changed case.
    let mut sc = Session::new(SessionConfig::default());
    sc.start(&mut center.for_peer("laptop")).unwrap();
    sc.fill(&mut center.for_peer("laptop")).unwrap();
    let opening: Vec<Message> = std::iter::from_fn(|| sc.poll_transmit())
        .map(|f| Message::decode(&f[4..]).unwrap())
        .collect();
    let listed: Vec<&str> = opening
        .iter()
        .flat_map(|m| match m {
            Message::Changes { entries, .. } => entries.iter().map(|(c, _)| c.as_str()).collect(),
            _ => Vec::new(),
        })
        .collect();
    assert!(
        matches!(opening[2], Message::ListingStart { after } if after > 0),
        "{opening:?}"
    );
    assert_eq!(listed, vec!["C-7"], "only what changed since last time");

    // And the session it opens converges as usual.
    let (c, l) = session(&mut center, "center", &mut laptop, "laptop", None).unwrap();
    assert_eq!(c.stats().cases_sent.len(), 1);
    assert_eq!(l.stats().cases_received.len(), 1);
    assert_eq!(heads_of(&center), heads_of(&laptop));
}

#[test]
fn a_laptop_that_lost_its_cursor_gets_a_listing_restarted_from_the_beginning() {
    let mut center = node(1);
    let mut laptop = node(2);
    for i in 0..50 {
        create(&mut center, 1, &format!("C-{i}"));
    }
    session(&mut center, "center", &mut laptop, "laptop", None).unwrap();
    // The laptop loses its cursor (restored from a copy taken before the
    // sync) and a case it held: the center's listing from memory would
    // skip it.
    laptop.cursors.clear();
    laptop.docs.remove(&id("C-3"));
    let (c, l) = session(&mut center, "center", &mut laptop, "laptop", None).unwrap();
    assert_eq!(l.stats().cases_received.len(), 1, "C-3 came back");
    assert_eq!(
        c.stats().case_messages_sent,
        1,
        "one whole case, nothing else"
    );
    assert_eq!(heads_of(&center), heads_of(&laptop));
    assert!(
        center.listed.contains_key("laptop"),
        "converged again, so the next session lists from memory"
    );
}

/// The shared heads `n` stored for `case` with `peer`.
fn shared_with(n: &MemoryNode, peer: &str, case: &str) -> Vec<automerge::ChangeHash> {
    let bytes = &n.sync_states[&(peer.to_string(), id(case))];
    automerge::sync::State::decode(bytes).unwrap().shared_heads
}

#[test]
fn a_reconnect_costs_one_message_per_changed_case_once_both_sides_have_synced_it() {
    // More cases than a session records as shared after sending them
    // whole (1,024), numbered so that listings follow the numbers.
    let code = |i: usize| format!("C-{i:04}");
    let mut center = node(1);
    let mut laptop = node(2);
    for i in 0..1100 {
        create(&mut center, 1, &code(i));
    }
    session(&mut center, "center", &mut laptop, "laptop", None).unwrap();
    // A quiet reconnect: the laptop lists back the cases it merged in the
    // first sync (they changed its store after the position the center
    // holds), and from then on each side lists only its own edits.
    session(&mut center, "center", &mut laptop, "laptop", None).unwrap();

    // The center edits ten of the last cases it sent, the laptop ten
    // others. The laptop stored every case it got whole as shared with
    // the center, so it pushes its edits: one message each. The center
    // recorded only the first 1,024 it sent, so the laptop asks for its
    // edits the Automerge way: ask, answer, acknowledge.
    let edit_twenty = |center: &mut MemoryNode, laptop: &mut MemoryNode, what: &str| {
        for i in 0..10 {
            edit(center, 1, &code(1090 + i), "status_note", what);
            edit(laptop, 2, &code(50 + i), "phone", what);
        }
    };
    edit_twenty(&mut center, &mut laptop, "first");
    let (c, l) = session(&mut center, "center", &mut laptop, "laptop", None).unwrap();
    assert_eq!(heads_of(&center), heads_of(&laptop));
    assert_eq!(
        l.stats().case_messages_sent,
        30,
        "10 pushes, 10 requests, 10 acks"
    );
    assert_eq!(c.stats().case_messages_sent, 10, "10 answers");
    // Both now store the cases as shared at their new heads ...
    for i in [50, 59, 1090, 1099] {
        let case = code(i);
        let heads = center.docs[&id(&case)].get_heads();
        assert_eq!(shared_with(&center, "laptop", &case), heads, "{case}");
        assert_eq!(shared_with(&laptop, "center", &case), heads, "{case}");
    }

    // ... so the next reconnect pushes every change: one message per case.
    edit_twenty(&mut center, &mut laptop, "second");
    let (c, l) = session(&mut center, "center", &mut laptop, "laptop", None).unwrap();
    assert_eq!(heads_of(&center), heads_of(&laptop));
    assert_eq!(l.stats().case_messages_sent, 10);
    assert_eq!(c.stats().case_messages_sent, 10);
    assert_eq!(l.stats().cases_received.len(), 10);
    assert_eq!(c.stats().cases_received.len(), 10);

    // Nothing changed: nothing per case, as before.
    let (c, l) = session(&mut center, "center", &mut laptop, "laptop", None).unwrap();
    assert_eq!(
        c.stats().case_messages_sent + l.stats().case_messages_sent,
        0
    );
}

#[test]
fn a_case_edited_on_both_sides_since_the_last_sync_merges_in_two_messages() {
    let mut center = node(1);
    let mut laptop = node(2);
    create(&mut center, 1, "C-1");
    session(&mut center, "center", &mut laptop, "laptop", None).unwrap();
    edit(&mut center, 1, "C-1", "x", "1");
    session(&mut center, "center", &mut laptop, "laptop", None).unwrap();

    // Both sides push; each push meets changes the other lacks, so each
    // side answers once with its own, and both end at the merge.
    edit(&mut center, 1, "C-1", "status_note", "center");
    edit(&mut laptop, 2, "C-1", "phone", "laptop");
    let (c, l) = session(&mut center, "center", &mut laptop, "laptop", None).unwrap();
    assert_eq!(heads_of(&center), heads_of(&laptop));
    assert_eq!(center.docs[&id("C-1")].get_heads().len(), 2, "a merge");
    let total = c.stats().case_messages_sent + l.stats().case_messages_sent;
    assert!(total <= 4, "{total} messages");
}

#[test]
fn a_protocol_3_laptop_and_a_protocol_4_center_sync_as_two_protocol_3_nodes_do() {
    // The same day twice: with a protocol-4 center, and with both on 3.
    let mut counts = Vec::new();
    for center_version in [4, 3] {
        let mut center = node(1);
        let mut laptop = node(2);
        for i in 0..20 {
            create(&mut center, 1, &format!("C-{i}"));
        }
        for _ in 0..2 {
            session_speaking(
                (&mut center, "center", center_version),
                (&mut laptop, "laptop", 3),
            )
            .unwrap();
        }
        for i in 0..5 {
            edit(&mut center, 1, &format!("C-{i}"), "status_note", "x");
            edit(&mut laptop, 2, &format!("C-{}", 10 + i), "phone", "y");
        }
        let (c, l) = session_speaking(
            (&mut center, "center", center_version),
            (&mut laptop, "laptop", 3),
        )
        .unwrap();
        assert!(c.is_finished() && l.is_finished());
        assert_eq!(heads_of(&center), heads_of(&laptop));
        counts.push(c.stats().case_messages_sent + l.stats().case_messages_sent);
    }
    assert_eq!(
        counts[0], counts[1],
        "no pushes and no skipped answers with protocol 3"
    );
}

#[test]
fn a_laptop_downgraded_below_protocol_4_costs_one_failed_sync_then_works() {
    let mut center = node(1);
    let mut laptop = node(2);
    for i in 0..20 {
        create(&mut center, 1, &format!("C-{i}"));
    }
    session(&mut center, "center", &mut laptop, "laptop", None).unwrap();
    session(&mut center, "center", &mut laptop, "laptop", None).unwrap();
    edit(&mut center, 1, "C-3", "status_note", "x");
    session(&mut center, "center", &mut laptop, "laptop", None).unwrap();
    // The center remembers a protocol-4 laptop that holds C-3 as shared,
    // and opens with a push. The laptop was reinstalled with an older
    // build: it cannot read the push.
    edit(&mut center, 1, "C-3", "status_note", "y");
    let mut sc = Session::new(SessionConfig::default());
    sc.start(&mut center.for_peer("laptop")).unwrap();
    sc.fill(&mut center.for_peer("laptop")).unwrap();
    let opening: Vec<Vec<u8>> = std::iter::from_fn(|| sc.poll_transmit()).collect();
    assert!(
        opening
            .iter()
            .any(|f| matches!(Message::decode(&f[4..]), Ok(Message::CasePush { .. }))),
        "the center opens with a push"
    );
    let mut sl = Session::new(SessionConfig {
        version_max: 3,
        ..SessionConfig::default()
    });
    sl.start(&mut laptop.for_peer("center")).unwrap();
    let laptop_opening: Vec<Vec<u8>> = std::iter::from_fn(|| sl.poll_transmit()).collect();
    let laptop_err = opening
        .iter()
        .find_map(|f| sl.handle_bytes(f, &mut laptop.for_peer("center")).err());
    assert!(laptop_err.is_some(), "the old laptop refuses the push");
    let center_err = laptop_opening
        .iter()
        .find_map(|f| sc.handle_bytes(f, &mut center.for_peer("laptop")).err());
    assert!(
        matches!(&center_err, Some(SessionError::Protocol(r)) if r.contains("next sync will work")),
        "{center_err:?}"
    );
    assert!(!center.listed.contains_key("laptop"), "the center forgot");
    let (c, l) = session_speaking((&mut center, "center", 4), (&mut laptop, "laptop", 3)).unwrap();
    assert!(c.is_finished() && l.is_finished());
    assert_eq!(heads_of(&center), heads_of(&laptop));
}

#[test]
fn a_case_created_at_the_center_between_syncs_is_pushed_the_next_time_it_changes() {
    let mut center = node(1);
    let mut laptop = node(2);
    create(&mut center, 1, "C-1");
    session(&mut center, "center", &mut laptop, "laptop", None).unwrap();
    session(&mut center, "center", &mut laptop, "laptop", None).unwrap();

    // A citizen walks in: a new case goes to the laptop whole ...
    create(&mut center, 1, "C-2");
    let (c, _) = session(&mut center, "center", &mut laptop, "laptop", None).unwrap();
    assert_eq!(c.stats().whole_docs_sent, 1);
    assert_eq!(
        shared_with(&center, "laptop", "C-2"),
        center.docs[&id("C-2")].get_heads(),
        "the center knows what the laptop holds"
    );

    // ... and its next change is pushed: one message.
    edit(&mut center, 1, "C-2", "status_note", "processing");
    let (c, l) = session(&mut center, "center", &mut laptop, "laptop", None).unwrap();
    assert_eq!(heads_of(&center), heads_of(&laptop));
    assert_eq!(
        c.stats().case_messages_sent + l.stats().case_messages_sent,
        1
    );
}
