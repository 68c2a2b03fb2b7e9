//! A land-survey case whose notes run to a megabyte does not hold back the
//! small cases behind it on a slow link: real nodes, real stores, real
//! QUIC through the seeded relay (in-process, so the test can read the
//! laptop's store afterwards).
//!
//! What is asserted is the order in which the laptop committed the cases
//! (its update sequence numbers), not how long anything took: the small
//! cases, listed after the large one, are committed before it.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, ensure, Result};
use fieldcase_node::case::{self, NewCase, MAX_TEXT_CHARS};
use fieldcase_node::net;
use fieldcase_node::node::{open_store, Node, Role};
use fieldcase_tests::relay::{LinkProfile, Relay};
use fieldcase_tests::seeded_rng;
use fieldcase_tests::{quiet_sync_options, InProcServer};
use rand::RngExt;
use rand_chacha::ChaCha8Rng;

/// Small cases created after the large one.
const SMALL_CASES: usize = 60;
/// Notes on the large case, each as long as a note may be.
const LARGE_NOTES: usize = 250;
/// Longest the sync may take: about 1.2 MB at 6 Mbit/s is under 2 s of
/// link time.
const SYNC_TIMEOUT: Duration = Duration::from_secs(120);

fn new_case(applicant: &str) -> NewCase {
    NewCase {
        procedure: "land-survey".into(),
        applicant: applicant.into(),
        village: "Thon 3".into(),
        fields: vec![("parcel-number".into(), "412".into())],
    }
}

/// A note a surveyor typed up, `MAX_TEXT_CHARS` long, drawn from `rng`.
fn survey_note(rng: &mut ChaCha8Rng) -> String {
    const LETTERS: &[u8] = b"abcdeghiklmnopqrstuvxyABCDEGHIKLMNOPQRSTUVXY0123456789 .,-";
    (0..MAX_TEXT_CHARS)
        .map(|_| char::from(LETTERS[rng.random_range(0..LETTERS.len())]))
        .collect()
}

/// The laptop's cases in the order it committed them.
fn commit_order(home: &Path) -> Result<Vec<String>> {
    let store = open_store(home)?;
    Ok(store
        .changes_page(0, u64::MAX >> 1, 10_000)?
        .into_iter()
        .map(|(_, code, _)| code)
        .collect())
}

#[test]
fn a_survey_case_with_a_megabyte_of_notes_arrives_after_the_small_cases_behind_it() -> Result<()> {
    let (mut rng, seed) = seeded_rng("large_case", 0x1a2e_c0de);
    let dir = tempfile::tempdir()?;
    let (center_home, laptop_home) = (dir.path().join("center"), dir.path().join("laptop"));
    let center_id = Node::init(&center_home, "center", Role::Center)?;
    let laptop_id = Node::init(&laptop_home, "laptop-lan", Role::Field)?;

    // The center: the survey case first, its notes typed in ten sittings,
    // then the small cases of the week.
    let mut center = Node::open(&center_home)?;
    center.add_peer(&laptop_id.to_string(), "laptop-lan", None)?;
    let large = center.new_case(&new_case("Pham Van Dat"))?;
    for _ in 0..10 {
        let notes: Vec<String> = (0..LARGE_NOTES / 10)
            .map(|_| survey_note(&mut rng))
            .collect();
        center.update(&large, |doc, author, now| {
            notes
                .iter()
                .try_for_each(|n| case::add_note(doc, n, author, now))
        })?;
    }
    let large_bytes = center
        .store()
        .case_saved(&large)?
        .ok_or_else(|| anyhow!("no {large}"))?
        .len();
    ensure!(
        large_bytes > 700_000,
        "the large case is large: {large_bytes} bytes"
    );
    let small: Vec<String> = (0..SMALL_CASES)
        .map(|i| center.new_case(&new_case(&format!("Nguyen Thi Nho {i}"))))
        .collect::<Result<_, _>>()?;
    drop(center);

    let rt = fieldcase_tests::runtime();
    let order = rt.block_on(async {
        let server = InProcServer::start(&center_home)?;
        // A slow link: 6 Mbit/s, 60 ms RTT, no loss.
        let profile = LinkProfile {
            rtt: Duration::from_millis(60),
            bandwidth_bps: Some(6_000_000),
            queue_bytes: 96 * 1024,
            ..LinkProfile::perfect()
        };
        let relay = Relay::start(server.addr, profile, seed).await?;
        let mut laptop = Node::open(&laptop_home)?;
        laptop.add_peer(
            &center_id.to_string(),
            "center",
            Some(&relay.addr().to_string()),
        )?;
        let peer = laptop.peer("center")?;
        drop(laptop);
        let opts = quiet_sync_options();
        let report = tokio::time::timeout(SYNC_TIMEOUT, net::sync_with(&laptop_home, &peer, opts))
            .await
            .map_err(|_| anyhow!("sync did not finish within {SYNC_TIMEOUT:?}"))??;
        server.stop().await;
        ensure!(
            report.stats.cases_received.len() == SMALL_CASES + 1,
            "the laptop received every case: {:?}",
            report.stats.cases_received.len()
        );
        commit_order(&laptop_home)
    })?;

    let large_at = order
        .iter()
        .position(|c| c == &large)
        .ok_or_else(|| anyhow!("{large} missing on the laptop"))?;
    let small_before = small.iter().filter(|c| {
        order
            .iter()
            .position(|o| o == *c)
            .is_some_and(|at| at < large_at)
    });
    ensure!(
        small_before.count() == SMALL_CASES,
        "every small case was committed before the {large_bytes}-byte case: {order:?}"
    );
    Ok(())
}
