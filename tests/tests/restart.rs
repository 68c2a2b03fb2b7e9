//! Restart: what two nodes learned about each other survives the center's
//! process going away, cleanly (SIGTERM) or not (SIGKILL).
//!
//! A laptop uploads 20 cases. The center is shut down and started again
//! from the same home. The laptop edits one case: the next sync moves
//! exactly that one case, not all 20 (persisted per-peer sync state and
//! digest comparison). After a crash of the center, a sync with nothing
//! changed moves nothing at all.

use std::time::Duration;

use anyhow::{ensure, Result};
use fieldcase_tests::{Node, Summary};

fn setup() {
    fieldcase_tests::use_bin(env!("CARGO_BIN_EXE_fieldcase-under-test"));
}

const CASES: usize = 20;

#[test]
fn only_what_changed_moves_after_the_center_restarts() -> Result<()> {
    setup();
    let center = Node::init("center", "center")?;
    let laptop = Node::init("laptop-dong", "field")?;
    center.trust(&laptop, None)?;

    let mut codes = Vec::new();
    for i in 0..CASES {
        codes.push(laptop.case_new(
            "certification",
            &format!("Applicant {i}"),
            "Thon Dong",
            &[],
        )?);
    }

    let server = center.serve()?;
    laptop.trust(&center, Some(server.addr()))?;
    let s = laptop.sync_ok("center")?;
    ensure!(
        s == Summary {
            sent: CASES,
            received: 0,
            new_conflicts: 0
        },
        "{s:?}"
    );
    ensure!(center.codes()?.len() == CASES);
    server.wait_for_line(Duration::from_secs(10), |l| {
        l == "sync with laptop-dong: 0 cases sent, 20 cases received, 0 new conflicts"
    })?;

    // Clean shutdown, then a new process on the same home (a new port).
    let (status, log) = server.terminate()?;
    ensure!(status.success(), "serve exited with {status}:\n{log}");
    ensure!(log.contains("shut down cleanly"), "{log}");
    let server = center.serve()?;
    // The center moved to another port; the laptop learns the new address.
    laptop.trust(&center, Some(server.addr()))?;

    laptop.ok(&["case", "set", &codes[7], "phone", "0912 000 777"])?;
    let s = laptop.sync_ok("center")?;
    ensure!(
        s == Summary {
            sent: 1,
            received: 0,
            new_conflicts: 0
        },
        "one edited case should move, not {s:?}"
    );
    server.wait_for_line(Duration::from_secs(10), |l| {
        l == "sync with laptop-dong: 0 cases sent, 1 case received, 0 new conflicts"
    })?;
    ensure!(center.show_json(&codes[7])?["applicant"]["phone"] == "0912 000 777");
    ensure!(laptop.show_json(&codes[7])? == center.show_json(&codes[7])?);

    // A crash this time.
    server.kill();
    let server = center.serve()?;
    laptop.trust(&center, Some(server.addr()))?;
    let s = laptop.sync_ok("center")?;
    ensure!(
        s == Summary {
            sent: 0,
            received: 0,
            new_conflicts: 0
        },
        "nothing changed, nothing should move: {s:?}"
    );
    server.wait_for_line(Duration::from_secs(10), |l| {
        l == "sync with laptop-dong: 0 cases sent, 0 cases received, 0 new conflicts"
    })?;
    for code in &codes {
        ensure!(
            laptop.show_json(code)?["heads"] == center.show_json(code)?["heads"],
            "{code}: heads differ"
        );
    }
    Ok(())
}
