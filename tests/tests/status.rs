//! Status: concurrent status moves made offline on different nodes settle
//! the same way everywhere, and never drag a case back.
//!
//! Status is derived from an append-only list of moves. Two nodes move the
//! same case from `received` while apart (e.g. the center starts processing
//! while a laptop asks the citizen for documents). After the laptops pass
//! by the center, in both orders, every node shows the same status and the
//! same history, the status is the higher-ranked of the two moves, and the
//! history keeps both moves, marking the lower one as superseded
//! (`applied: false`) when it comes after the higher one.
//!
//! Invalid moves on the command line fail with a reason and write nothing.

use anyhow::{ensure, Context, Result};
use fieldcase_tests::{seeded_rng, shuffle, Node};
use serde_json::Value;

fn setup() {
    fieldcase_tests::use_bin(env!("CARGO_BIN_EXE_fieldcase-under-test"));
}

fn rank(status: &str) -> u8 {
    match status {
        "received" => 0,
        "needs-documents" => 1,
        "processing" => 2,
        "result-ready" => 3,
        "delivered" => 4,
        "rejected" => 5,
        other => panic!("unknown status {other}"),
    }
}

/// Marks every required checklist item received, via the view's checklist.
fn receive_all_required(node: &Node, code: &str) -> Result<()> {
    let v = node.show_json(code)?;
    for item in v["checklist"].as_array().context("checklist")? {
        if item["required"] == true {
            let id = item["item"].as_str().context("item id")?;
            node.ok(&["case", "doc", code, id, "received"])?;
        }
    }
    let v = node.show_json(code)?;
    ensure!(
        v["missing_required"] == serde_json::json!([]),
        "{}",
        v["missing_required"]
    );
    Ok(())
}

struct Nodes {
    center: Node,
    laptops: [Node; 2],
    _server: fieldcase_tests::Server,
}

impl Nodes {
    fn all(&self) -> [&Node; 3] {
        [&self.center, &self.laptops[0], &self.laptops[1]]
    }
    fn by_name(&self, name: &str) -> &Node {
        self.all()
            .into_iter()
            .find(|n| n.name == name)
            .expect("node")
    }
}

fn nodes() -> Result<Nodes> {
    let center = Node::init("center", "center")?;
    let a = Node::init("laptop-dong", "field")?;
    let b = Node::init("laptop-tay", "field")?;
    let server = center.serve()?;
    for l in [&a, &b] {
        center.trust(l, None)?;
        l.trust(&center, Some(server.addr()))?;
    }
    Ok(Nodes {
        center,
        laptops: [a, b],
        _server: server,
    })
}

/// One concurrent pair of moves on one fresh case; `first` is the laptop
/// that syncs first in the first round.
fn concurrent_moves(
    nodes: &Nodes,
    moves: [(&str, &str); 2],
    first: usize,
    rng: &mut impl rand::Rng,
) -> Result<()> {
    let ctx = format!("moves {moves:?}, laptop {first} syncs first");
    // A case every node holds at `received`, with its documents complete.
    let code =
        nodes.laptops[0].case_new("birth-registration", "Nguyen Van An", "Thon Dong", &[])?;
    receive_all_required(&nodes.laptops[0], &code)?;
    nodes.laptops[0].sync_ok("center")?;
    nodes.laptops[1].sync_ok("center")?;
    for n in nodes.all() {
        ensure!(n.show_json(&code)?["status"] == "received");
    }

    // Apart, two nodes move it.
    for (who, to) in moves {
        let out = nodes
            .by_name(who)
            .ok(&["case", "status", &code, to])
            .with_context(|| ctx.clone())?;
        ensure!(
            out.stdout.contains(&format!("status is now {to}")),
            "{}",
            out.stdout
        );
    }

    // Two rounds: the first in the chosen order, the second seeded.
    let mut order = [first, 1 - first];
    for round in 0..2 {
        if round > 0 {
            shuffle(rng, &mut order);
        }
        for i in order {
            nodes.laptops[i].sync_ok("center")?;
        }
    }

    let views: Vec<Value> = nodes
        .all()
        .iter()
        .map(|n| n.show_json(&code))
        .collect::<Result<_>>()?;
    for (n, v) in nodes.all().iter().zip(&views) {
        ensure!(
            v == &views[0],
            "{ctx}: {} disagrees with the center:\n{}\n---\n{}",
            n.name,
            views[0],
            v
        );
        let row = n
            .list_json()?
            .as_array()
            .context("list")?
            .iter()
            .find(|r| r["code"] == code.as_str())
            .cloned()
            .context("row")?;
        ensure!(
            row["status"] == v["status"],
            "{ctx}: {row} vs {}",
            v["status"]
        );
    }
    let v = &views[0];
    let highest = moves.iter().map(|(_, to)| rank(to)).max().expect("two");
    let status = v["status"].as_str().context("status")?;
    ensure!(
        rank(status) == highest,
        "{ctx}: status {status} ranks below the highest concurrent move"
    );

    let history = v["history"].as_array().context("history")?;
    ensure!(history.len() == 2, "{ctx}: {}", v["history"]);
    for (who, to) in moves {
        ensure!(
            history
                .iter()
                .any(|h| h["from"] == "received" && h["to"] == to && h["name"] == who),
            "{ctx}: move by {who} to {to} missing from {}",
            v["history"]
        );
    }
    let hi = history
        .iter()
        .position(|h| rank(h["to"].as_str().unwrap_or("received")) == highest)
        .context("higher move")?;
    let lo = 1 - hi;
    ensure!(history[hi]["applied"] == true, "{ctx}: {}", v["history"]);
    // A lower move listed after the higher one is superseded; listed
    // before it, it applied and was then overtaken.
    let lo_applied = lo < hi;
    ensure!(
        history[lo]["applied"] == lo_applied,
        "{ctx}: expected the lower move applied={lo_applied}: {}",
        v["history"]
    );
    eprintln!(
        "{ctx}: status {status}, lower move {}",
        if lo_applied {
            "applied then overtaken"
        } else {
            "superseded"
        }
    );
    let unapplied = history.iter().filter(|h| h["applied"] == false).count();
    ensure!(unapplied == usize::from(!lo_applied), "{ctx}");
    Ok(())
}

#[test]
fn concurrent_moves_settle_on_the_higher_status_everywhere() -> Result<()> {
    setup();
    let (mut rng, _) = seeded_rng("status", 7);
    let nodes = nodes()?;
    let pairs: [[(&str, &str); 2]; 3] = [
        [("center", "processing"), ("laptop-dong", "needs-documents")],
        [("center", "processing"), ("laptop-tay", "rejected")],
        [
            ("laptop-dong", "needs-documents"),
            ("laptop-tay", "processing"),
        ],
    ];
    for moves in pairs {
        for first in [0, 1] {
            concurrent_moves(&nodes, moves, first, &mut rng)?;
        }
    }
    Ok(())
}

#[test]
fn invalid_moves_fail_with_a_reason_and_write_nothing() -> Result<()> {
    setup();
    let center = Node::init("center", "center")?;
    let code = center.case_new("birth-registration", "Nguyen Van An", "Thon Dong", &[])?;
    let before = center.show_json(&code)?;

    // Documents are missing: no processing yet, and the error names them.
    let out = center
        .run(&["case", "status", &code, "processing"])?
        .failed()?;
    ensure!(
        out.stderr
            .contains("cannot move the case from received to processing"),
        "{}",
        out.describe()
    );
    for item in before["missing_required"].as_array().context("missing")? {
        let item = item.as_str().context("item")?;
        ensure!(
            out.stderr.contains(item),
            "the error should name missing document {item}:\n{}",
            out.describe()
        );
    }

    // Not an edge of the workflow.
    let out = center
        .run(&["case", "status", &code, "delivered"])?
        .failed()?;
    ensure!(
        out.stderr
            .contains("cannot move the case from received to delivered"),
        "{}",
        out.describe()
    );
    // Not a status at all.
    let out = center.run(&["case", "status", &code, "done"])?.failed()?;
    ensure!(
        out.stderr.contains("unknown status 'done'") && out.stderr.contains("result-ready"),
        "{}",
        out.describe()
    );
    ensure!(
        center.show_json(&code)? == before,
        "a refused move changed the case"
    );

    // A terminal status never moves again.
    center.ok(&["case", "status", &code, "rejected"])?;
    let rejected = center.show_json(&code)?;
    let out = center
        .run(&["case", "status", &code, "needs-documents"])?
        .failed()?;
    ensure!(
        out.stderr
            .contains("cannot move the case from rejected to needs-documents"),
        "{}",
        out.describe()
    );
    ensure!(center.show_json(&code)? == rejected);
    Ok(())
}
