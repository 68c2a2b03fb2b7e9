//! Trust: only nodes on the trust list sync, and a laptop only syncs with
//! the node it pinned.
//!
//! - An intruder that knows the center's ID and address, but that the
//!   center never added, is refused: its sync fails with a reason that says
//!   it is not trusted, the center logs the refusal, and no case moves in
//!   either direction.
//! - A laptop that pinned the wrong ID under the name `center` refuses the
//!   real center when it answers, naming both IDs, and no case moves.

use anyhow::{ensure, Result};
use fieldcase_tests::Node;

fn setup() {
    fieldcase_tests::use_bin(env!("CARGO_BIN_EXE_fieldcase-under-test"));
}

#[test]
fn a_node_the_center_never_trusted_cannot_sync() -> Result<()> {
    setup();
    let center = Node::init("center", "center")?;
    let laptop = Node::init("laptop-dong", "field")?;
    let intruder = Node::init("intruder", "field")?;
    let server = center.serve()?;
    center.trust(&laptop, None)?;
    laptop.trust(&center, Some(server.addr()))?;
    intruder.trust(&center, Some(server.addr()))?;

    center.case_new("certification", "Pham Thi Em", "Trung Tam", &[])?;
    laptop.case_new("health-insurance", "Tran Thi Cuc", "Thon Dong", &[])?;
    laptop.sync_ok("center")?;
    let intruder_case = intruder.case_new("certification", "Mallory", "Nowhere", &[])?;
    let center_before = center.snapshot()?;
    ensure!(center_before.cases.len() == 2);

    let out = intruder.sync("center")?.failed()?;
    ensure!(
        out.stderr.contains("not trusted"),
        "the refusal should say why:\n{}",
        out.describe()
    );
    ensure!(
        out.stderr.contains(intruder.id()),
        "the refusal should name the intruder's ID so the center's staff can add it if they mean to:\n{}",
        out.describe()
    );
    let line = server.wait_for_line(std::time::Duration::from_secs(10), |l| {
        l.contains("refused untrusted node")
    })?;
    ensure!(line.contains(intruder.id()), "{line}");
    ensure!(line.contains("intruder"), "{line}");

    ensure!(
        center.snapshot()? == center_before,
        "the center's data changed after an untrusted sync"
    );
    ensure!(
        intruder.codes()? == vec![intruder_case],
        "the intruder received cases"
    );
    // The trusted laptop is unaffected.
    let s = laptop.sync_ok("center")?;
    ensure!(
        (s.sent, s.received) == (0, 0),
        "nothing changed since the last sync: {s:?}"
    );
    Ok(())
}

#[test]
fn a_laptop_refuses_a_center_that_is_not_the_one_it_pinned() -> Result<()> {
    setup();
    let center = Node::init("center", "center")?;
    let impostor_id = Node::init("other-center", "center")?;
    let laptop = Node::init("laptop-tay", "field")?;
    let server = center.serve()?;
    // The center trusts the laptop: the refusal is the laptop's own.
    center.trust(&laptop, None)?;
    // The laptop wrote down the wrong ID for "center".
    laptop.trust_as(impostor_id.id(), "center", Some(server.addr()))?;

    center.case_new("certification", "Pham Thi Em", "Trung Tam", &[])?;
    let mine = laptop.case_new("land-survey", "Le Van Dung", "Thon Tay", &[])?;
    let center_before = center.snapshot()?;
    let laptop_before = laptop.snapshot()?;

    let out = laptop.sync("center")?.failed()?;
    let err = &out.stderr;
    ensure!(
        err.contains(center.id()) && err.contains(impostor_id.id()),
        "the error should name the ID that answered and the one pinned:\n{}",
        out.describe()
    );
    ensure!(err.contains("refusing to sync"), "{}", out.describe());
    ensure!(
        center.snapshot()? == center_before,
        "the center received data"
    );
    ensure!(
        laptop.snapshot()? == laptop_before,
        "the laptop received data"
    );
    ensure!(laptop.codes()? == vec![mine]);
    Ok(())
}
