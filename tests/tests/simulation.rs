//! Deterministic simulation of the sync protocol: a commune center and its
//! field laptops edit cases while connections drop, streams get corrupted,
//! nodes crash and disks fill up; after healing, every replica must hold the
//! same cases, nothing acknowledged may be lost, nothing unwritten may
//! appear, and no status may go backwards. See `fieldcase_tests::sim`.
//!
//! A failing seed prints its one-line replay command:
//! `FIELDCASE_SIM_SEED=N cargo test -p fieldcase-tests --test simulation replay -- --nocapture`.

use fieldcase_tests::sim::{self, run, run_seed, SimConfig, Totals, SEED_ENV};

/// Seeds in the CI budget: four tests of this many run in parallel.
const CI_SEEDS_PER_TEST: u64 = 125;

/// Runs `count` seeds from `start` and fails with every failing seed's
/// replay command.
fn budget(start: u64, count: u64) -> Totals {
    let mut totals = Totals::default();
    for seed in start..start + count {
        totals.add(run_seed(seed));
    }
    eprintln!("seeds {start}..{}:\n{}", start + count, totals.summary());
    assert!(
        totals.failures.is_empty(),
        "{} of {count} seeds failed:\n{}",
        totals.failures.len(),
        totals
            .failures
            .iter()
            .map(|f| f.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
    totals
}

/// Every fault kind must actually happen in a budget, or the simulation
/// would pass without testing anything.
fn assert_faults_exercised(t: &Totals) {
    let f = &t.faults;
    for (what, n) in [
        ("cuts", f.cuts),
        ("corrupted streams", f.duplicated + f.reordered),
        ("corruptions refused as peer faults", f.corrupt_detected),
        ("crashes", f.crashes),
        ("crashes between commit and reply", f.crashes_after_commit),
        ("full disks", f.disk_full),
        ("partitions", f.partitions),
        ("concurrent same-field edits", t.concurrent_edits),
    ] {
        assert!(n > 0, "no {what} in {} seeds:\n{}", t.seeds, t.summary());
    }
    assert!(t.acked > 10 * t.seeds, "too few writes:\n{}", t.summary());
}

#[test]
fn ci_budget_seeds_0_to_124_converge_and_lose_nothing() {
    assert_faults_exercised(&budget(0, CI_SEEDS_PER_TEST));
}

#[test]
fn ci_budget_seeds_125_to_249_converge_and_lose_nothing() {
    assert_faults_exercised(&budget(CI_SEEDS_PER_TEST, CI_SEEDS_PER_TEST));
}

#[test]
fn ci_budget_seeds_250_to_374_converge_and_lose_nothing() {
    assert_faults_exercised(&budget(2 * CI_SEEDS_PER_TEST, CI_SEEDS_PER_TEST));
}

#[test]
fn ci_budget_seeds_375_to_499_converge_and_lose_nothing() {
    assert_faults_exercised(&budget(3 * CI_SEEDS_PER_TEST, CI_SEEDS_PER_TEST));
}

#[test]
fn replay() {
    let seed = std::env::var(SEED_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_240_611);
    eprintln!("replaying seed {seed} ({})", sim::replay_command(seed));
    match run_seed(seed) {
        Ok(report) => eprintln!("{report:#?}"),
        Err(failure) => panic!("{failure}"),
    }
}

#[test]
fn the_same_seed_gives_the_same_trace_twice_and_another_seed_does_not() {
    for seed in [7, 1_000_003] {
        let first = run_seed(seed).unwrap_or_else(|f| panic!("{f}"));
        let second = run_seed(seed).unwrap_or_else(|f| panic!("{f}"));
        assert_eq!(first.trace_hash, second.trace_hash, "seed {seed}");
        assert_eq!(first, second, "seed {seed}: every count replays too");
    }
    let a = run_seed(7).unwrap_or_else(|f| panic!("{f}")).trace_hash;
    let b = run_seed(8).unwrap_or_else(|f| panic!("{f}")).trace_hash;
    assert_ne!(a, b, "the trace depends on the seed");
}

#[test]
fn a_corrupted_stream_is_refused_as_a_peer_fault_and_commits_nothing_wrong() {
    // Corrupt nearly every flush: duplicated and swapped frames everywhere.
    // Sessions must fail as peer faults (or stall, or shrug off a harmless
    // repeat); the final checks prove no wrong commit was made.
    let mut totals = Totals::default();
    for seed in 0..20 {
        totals.add(run(SimConfig {
            corrupt_p: 0.9,
            default: false,
            ..SimConfig::new(seed)
        }));
    }
    eprintln!("{}", totals.summary());
    assert!(totals.failures.is_empty(), "{}", totals.summary());
    let f = &totals.faults;
    assert!(
        f.duplicated > 50 && f.reordered > 50,
        "{}",
        totals.summary()
    );
    assert!(f.corrupt_detected > 50, "{}", totals.summary());
}

#[test]
fn crashing_right_after_every_commit_before_the_reply_loses_nothing() {
    // The node commits what the peer sent and dies before saying so; the
    // peer does not know, and the next sessions must sort it out.
    let mut totals = Totals::default();
    for seed in 0..20 {
        totals.add(run(SimConfig {
            crash_after_commit_p: 1.0,
            default: false,
            ..SimConfig::new(seed)
        }));
    }
    eprintln!("{}", totals.summary());
    assert!(totals.failures.is_empty(), "{}", totals.summary());
    assert!(
        totals.faults.crashes_after_commit > 100,
        "{}",
        totals.summary()
    );
}

#[test]
fn seed_20240611_no_longer_livelocks_on_a_change_whose_dependency_was_missing() {
    // Before the fix in `Session::on_case_sync`, this seed's center and
    // laptop-3 asked each other for case LT2-000001 forever after healing:
    // the laptop dropped a change that arrived before its dependency, and
    // the center, counting it as sent, never sent it again.
    let report = run_seed(20_240_611).unwrap_or_else(|f| panic!("{f}"));
    assert!(report.heal_steps < 5_000, "{report:#?}");
}

#[test]
fn a_change_that_arrives_before_its_dependency_is_sent_again() {
    use automerge::sync::State;
    use automerge::ActorId;
    use fieldcase_node::case::{self, Author, NewCase};
    use fieldcase_sync::memory::MemoryNode;
    use fieldcase_sync::{CaseId, Session, SessionConfig};

    let officer = Author {
        actor: ActorId::from(vec![1; 16]),
        node_id: "node-center".into(),
        name: "center".into(),
    };
    let code = "CTR-000001";
    let id = CaseId::new(code).unwrap();
    let new = NewCase {
        procedure: "birth-registration".into(),
        applicant: "Tran Thi Mai".into(),
        village: "Thon 3".into(),
        fields: Vec::new(),
    };
    let now = 1_740_960_000_000;
    let created = case::create(code, &new, &officer, now).unwrap();
    let mut center_doc = created.clone();
    case::add_note(&mut center_doc, "first visit", &officer, now + 1).unwrap();
    let first = center_doc.get_heads();
    case::add_note(&mut center_doc, "second visit", &officer, now + 2).unwrap();

    let mut center = MemoryNode::with_store_id([1; 16]);
    center.docs.insert(id.clone(), center_doc.clone());
    let mut laptop = MemoryNode::with_store_id([2; 16]);
    laptop.docs.insert(id.clone(), created);
    // The laptop's sync marker claims it holds the first note (its data
    // was restored from an older backup), so the center sends only the
    // second, which the laptop cannot apply yet.
    let mut marker = State::new();
    marker.shared_heads = first;
    laptop
        .sync_states
        .insert(("center".into(), id.clone()), marker.encode());

    let mut l = Session::new(SessionConfig::default());
    let mut c = Session::new(SessionConfig::default());
    l.start(&mut laptop.for_peer("center")).unwrap();
    c.start(&mut center.for_peer("laptop")).unwrap();
    for _ in 0..200 {
        let mut moved = false;
        while let Some(bytes) = l.poll_transmit() {
            moved = true;
            c.handle_bytes(&bytes, &mut center.for_peer("laptop"))
                .unwrap();
        }
        while let Some(bytes) = c.poll_transmit() {
            moved = true;
            l.handle_bytes(&bytes, &mut laptop.for_peer("center"))
                .unwrap();
        }
        if !moved {
            l.fill(&mut laptop.for_peer("center")).unwrap();
            c.fill(&mut center.for_peer("laptop")).unwrap();
            if !l.has_queued() && !c.has_queued() {
                break;
            }
        }
    }
    assert!(l.is_finished() && c.is_finished(), "both sides finish");
    assert_eq!(laptop.docs[&id].get_heads(), center_doc.get_heads());
    let notes = case::view(&laptop.docs[&id]).unwrap().notes;
    assert_eq!(notes.len(), 2, "{notes:?}");
}
