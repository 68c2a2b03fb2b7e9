//! Story: a commune center and two field laptops over real QUIC on loopback.
//!
//! The laptops work offline in their villages: each takes its own new
//! applications, the three nodes edit different fields of one shared case,
//! both laptops write the applicant's phone number (a real conflict), and
//! everybody adds notes. The laptops then pass by the center in orders
//! picked by a seeded RNG. At the end the three replicas are identical
//! (heads and the whole `case show --json`), no note is lost, the phone
//! conflict is shown on every node with both values and who wrote them,
//! and once a person resolves it on one node, the resolution reaches
//! everybody and the conflict is gone everywhere.

use anyhow::{bail, ensure, Result};
use fieldcase_tests::{seeded_rng, shuffle, Node, Summary};
use serde_json::Value;

const PHONE_DONG: &str = "0912 345 678";
const PHONE_TAY: &str = "0987 654 321";

fn setup() {
    fieldcase_tests::use_bin(env!("CARGO_BIN_EXE_fieldcase-under-test"));
}

/// Every node shows exactly the same data; returns the center's snapshot.
fn assert_converged(nodes: &[&Node]) -> Result<fieldcase_tests::Snapshot> {
    let first = nodes[0].snapshot()?;
    for n in &nodes[1..] {
        let other = n.snapshot()?;
        ensure!(
            other.cases.keys().eq(first.cases.keys()),
            "{} holds {:?} but {} holds {:?}",
            n.name,
            other.cases.keys().collect::<Vec<_>>(),
            nodes[0].name,
            first.cases.keys().collect::<Vec<_>>()
        );
        for (code, v) in &first.cases {
            ensure!(
                other.cases[code]["heads"] == v["heads"],
                "{code}: heads differ between {} and {}",
                nodes[0].name,
                n.name
            );
            ensure!(
                &other.cases[code] == v,
                "{code}: case show --json differs between {} and {}:\n{}\n---\n{}",
                nodes[0].name,
                n.name,
                serde_json::to_string_pretty(v)?,
                serde_json::to_string_pretty(&other.cases[code])?
            );
        }
        ensure!(
            other.list == first.list,
            "case list --json differs between {} and {}",
            nodes[0].name,
            n.name
        );
    }
    Ok(first)
}

fn texts(v: &Value, list: &str) -> Vec<String> {
    v[list]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|n| n["text"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn phone_conflict(v: &Value) -> Option<&Value> {
    v["conflicts"]
        .as_array()?
        .iter()
        .find(|c| c["field"] == "phone")
}

/// The conflict on `phone` lists both laptops' values with their names.
fn assert_phone_conflict(node: &Node, code: &str) -> Result<()> {
    let v = node.show_json(code)?;
    let Some(c) = phone_conflict(&v) else {
        bail!(
            "{}: no phone conflict on {code}: {}",
            node.name,
            v["conflicts"]
        );
    };
    let mut cands: Vec<(String, String)> = c["candidates"]
        .as_array()
        .expect("candidates")
        .iter()
        .map(|c| {
            (
                c["value"].as_str().unwrap_or_default().to_string(),
                c["node_name"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    cands.sort();
    ensure!(
        cands
            == vec![
                (PHONE_DONG.to_string(), "laptop-dong".to_string()),
                (PHONE_TAY.to_string(), "laptop-tay".to_string()),
            ],
        "{}: phone conflict candidates are {cands:?}",
        node.name
    );
    ensure!(
        v["conflicts"].as_array().map(|a| a.len()) == Some(1),
        "{}: only the phone should conflict, got {}",
        node.name,
        v["conflicts"]
    );
    // People read the plain view, too.
    let text = node.ok(&["case", "show", code])?.stdout;
    ensure!(
        text.contains("CONFLICTS") && text.contains(PHONE_DONG) && text.contains(PHONE_TAY),
        "{}: the plain view does not show the conflict:\n{text}",
        node.name
    );
    Ok(())
}

#[test]
fn offline_edits_converge_and_the_phone_conflict_is_shown_then_resolved() -> Result<()> {
    setup();
    let (mut rng, _seed) = seeded_rng("story", 20_240_611);

    let center = Node::init("center", "center")?;
    let dong = Node::init("laptop-dong", "field")?;
    let tay = Node::init("laptop-tay", "field")?;
    let server = center.serve()?;
    center.trust(&dong, None)?;
    center.trust(&tay, None)?;
    dong.trust(&center, Some(server.addr()))?;
    tay.trust(&center, Some(server.addr()))?;

    // Morning: laptop-dong takes a birth registration and passes the
    // center; laptop-tay picks it up before leaving.
    let shared = dong.case_new(
        "birth-registration",
        "Nguyen Van An",
        "Thon Dong",
        &[("phone", "0912 000 111"), ("mother-name", "Tran Thi Mai")],
    )?;
    let s = dong.sync_ok("center")?;
    ensure!(
        s == Summary {
            sent: 1,
            received: 0,
            new_conflicts: 0
        },
        "{s:?}"
    );
    let s = tay.sync_ok("center")?;
    ensure!(
        s == Summary {
            sent: 0,
            received: 1,
            new_conflicts: 0
        },
        "{s:?}"
    );
    assert_converged(&[&center, &dong, &tay])?;

    // Offline, all at once.
    let case_dong = dong.case_new("health-insurance", "Tran Thi Cuc", "Thon Dong", &[])?;
    let case_tay = tay.case_new(
        "land-survey",
        "Le Van Dung",
        "Thon Tay",
        &[("parcel-number", "112")],
    )?;
    let case_center = center.case_new("certification", "Pham Thi Em", "Trung Tam", &[])?;
    // Different fields of the shared case on three nodes.
    dong.ok(&["case", "set", &shared, "child-name", "Nguyen Thi Binh"])?;
    tay.ok(&["case", "set", &shared, "birth-place", "Tram y te xa"])?;
    center.ok(&["case", "set", &shared, "assignee", "Officer Lan"])?;
    // The same field on both laptops.
    dong.ok(&["case", "set", &shared, "phone", PHONE_DONG])?;
    tay.ok(&["case", "set", &shared, "phone", PHONE_TAY])?;
    // Notes everywhere.
    let notes = [
        (&dong, "Father will bring his ID on Friday"),
        (&tay, "Mother says the father works in the city"),
        (&center, "Assigned to Officer Lan"),
        (&dong, "Family asks for two copies"),
    ];
    for (node, text) in notes {
        node.ok(&["case", "note", &shared, text])?;
    }

    // Afternoon: three rounds of laptop visits, in seeded orders.
    let mut seen_conflict = [false, false];
    let mut log = Vec::new();
    for round in 1..=3 {
        let mut order = [0usize, 1];
        shuffle(&mut rng, &mut order);
        for i in order {
            let laptop = [&dong, &tay][i];
            let s = laptop.sync_ok("center")?;
            log.push(format!("round {round}: {} {s:?}", laptop.name));
            // The conflict is new to a laptop exactly once: on the first
            // sync that brings it the other laptop's phone.
            let has = phone_conflict(&laptop.show_json(&shared)?).is_some();
            let expected_new = usize::from(has && !seen_conflict[i]);
            ensure!(
                s.new_conflicts == expected_new,
                "{}: expected {expected_new} new conflicts, got {s:?}\n{}",
                laptop.name,
                log.join("\n")
            );
            seen_conflict[i] |= has;
            if round == 1 {
                // First visit: the shared case and the laptop's own case go
                // up; the shared case, the center's case and (for the
                // second laptop) the other laptop's case come down.
                let first = log.len() == 1;
                let want = (2, if first { 2 } else { 3 });
                ensure!(
                    (s.sent, s.received) == want,
                    "{}: expected (sent, received) {want:?}, got {s:?}",
                    laptop.name
                );
            }
        }
        if round == 1 {
            // After the first round the center has heard from both.
            assert_phone_conflict(&center, &shared)?;
        }
    }
    ensure!(
        seen_conflict == [true, true],
        "both laptops should have seen the conflict:\n{}",
        log.join("\n")
    );
    // The server reported the conflict it received, in the same format.
    let line = server.wait_for_line(std::time::Duration::from_secs(10), |l| {
        l.starts_with("sync with laptop-") && l.ends_with(", 1 new conflict")
    })?;
    Summary::parse(&line)?;

    let snap = assert_converged(&[&center, &dong, &tay])?;
    let mut codes = vec![
        shared.clone(),
        case_dong.clone(),
        case_tay.clone(),
        case_center.clone(),
    ];
    codes.sort();
    ensure!(
        snap.cases.keys().cloned().collect::<Vec<_>>() == codes,
        "{:?}",
        snap.cases.keys()
    );
    let v = &snap.cases[&shared];
    for (_, text) in notes {
        ensure!(
            texts(v, "notes").iter().any(|t| t == text),
            "note {text:?} lost: {}",
            v["notes"]
        );
    }
    ensure!(texts(v, "notes").len() == notes.len(), "{}", v["notes"]);
    ensure!(
        v["fields"]["child-name"] == "Nguyen Thi Binh",
        "{}",
        v["fields"]
    );
    ensure!(
        v["fields"]["birth-place"] == "Tram y te xa",
        "{}",
        v["fields"]
    );
    ensure!(v["assignee"] == "Officer Lan", "{}", v["assignee"]);
    ensure!(snap.cases[&case_tay]["fields"]["parcel-number"] == "112");
    for n in [&center, &dong, &tay] {
        assert_phone_conflict(n, &shared)?;
    }
    let row = snap
        .list
        .as_array()
        .expect("array")
        .iter()
        .find(|r| r["code"] == shared.as_str())
        .expect("row");
    ensure!(row["conflicts"] == 1, "{row}");

    // A person on laptop-tay settles it: the father's number.
    tay.ok(&["case", "resolve", &shared, "phone", PHONE_DONG])?;
    ensure!(phone_conflict(&tay.show_json(&shared)?).is_none());
    ensure!(
        phone_conflict(&dong.show_json(&shared)?).is_some(),
        "laptop-dong has not synced yet and still shows the conflict"
    );
    // Two more seeded rounds carry the resolution everywhere.
    for _ in 0..2 {
        let mut order = [0usize, 1];
        shuffle(&mut rng, &mut order);
        for i in order {
            let s = [&dong, &tay][i].sync_ok("center")?;
            ensure!(s.new_conflicts == 0, "{s:?}");
        }
    }
    let snap = assert_converged(&[&center, &dong, &tay])?;
    let v = &snap.cases[&shared];
    ensure!(
        v["conflicts"] == serde_json::json!([]),
        "{}",
        v["conflicts"]
    );
    ensure!(v["applicant"]["phone"] == PHONE_DONG, "{}", v["applicant"]);
    let res = v["resolutions"].as_array().expect("resolutions");
    ensure!(res.len() == 1, "{}", v["resolutions"]);
    ensure!(res[0]["field"] == "phone" && res[0]["value"] == PHONE_DONG);
    ensure!(res[0]["name"] == "laptop-tay", "{}", res[0]);
    let mut replaced: Vec<&str> = res[0]["replaced"]
        .as_array()
        .expect("replaced")
        .iter()
        .map(|c| c["value"].as_str().unwrap_or_default())
        .collect();
    replaced.sort();
    ensure!(replaced == vec![PHONE_DONG, PHONE_TAY], "{replaced:?}");
    for r in snap.list.as_array().expect("array") {
        ensure!(r["conflicts"] == 0, "{r}");
    }
    Ok(())
}

#[test]
fn summary_lines_use_singular_and_plural() -> Result<()> {
    setup();
    let one = Summary::parse("sync with center: 1 case sent, 2 cases received, 1 new conflict")?;
    ensure!(
        one == Summary {
            sent: 1,
            received: 2,
            new_conflicts: 1
        }
    );
    ensure!(
        Summary::parse("sync with center: 1 cases sent, 0 cases received, 0 new conflicts")
            .is_err()
    );
    ensure!(
        Summary::parse("sync with center: 0 case sent, 0 cases received, 0 new conflicts").is_err()
    );
    Ok(())
}
