//! A laptop's stored copy of a case is damaged on disk (a bad sector, a
//! half-written backup restore). Reading it must say so, never return a
//! wrong document, and the next sync with the center must rebuild it.

use std::sync::Arc;

use fieldcase_node::case::{self, NewCase};
use fieldcase_node::net::{self, Server, SyncOptions};
use fieldcase_node::node::{Node, NodeError, Role, DB_FILE};
use fieldcase_node::transfer::no_progress;

fn quiet() -> SyncOptions {
    SyncOptions {
        live: false,
        changes: None,
        log: Arc::new(|_: &str| {}),
        progress: no_progress(),
        only_blob: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_case_is_detected_on_read_and_refetched_from_the_center() {
    let dir = tempfile::tempdir().unwrap();
    let (center_home, laptop_home) = (dir.path().join("center"), dir.path().join("laptop"));
    let center_id = Node::init(&center_home, "center", Role::Center).unwrap();
    let laptop_id = Node::init(&laptop_home, "laptop-thon-dong", Role::Field).unwrap();
    Node::open(&center_home)
        .unwrap()
        .add_peer(&laptop_id.to_string(), "laptop-thon-dong", None)
        .unwrap();

    // The laptop takes a case and edits it a few times.
    let mut laptop = Node::open(&laptop_home).unwrap();
    let code = laptop
        .new_case(&NewCase {
            procedure: "certification".into(),
            applicant: "Pham Thi Em".into(),
            village: "Thon Dong".into(),
            fields: vec![],
        })
        .unwrap();
    for i in 0..3 {
        laptop
            .update(&code, |d, a, t| {
                case::add_note(d, &format!("visit {i}"), a, t)
            })
            .unwrap();
    }
    let good = laptop.show(&code).unwrap();

    let server = Server::bind(
        &center_home,
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(|_: &str| {}),
    )
    .unwrap();
    let addr = server.local_addr().unwrap().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    laptop
        .add_peer(&center_id.to_string(), "center", Some(&addr))
        .unwrap();
    let peer = laptop.peer("center").unwrap();
    net::sync_with(&laptop_home, &peer, quiet()).await.unwrap();
    drop(laptop);

    // A change chunk on the laptop's disk is overwritten with garbage.
    let conn = rusqlite::Connection::open(laptop_home.join(DB_FILE)).unwrap();
    let n = conn
        .execute(
            "UPDATE case_changes SET data = X'DEADBEEF' WHERE id = (SELECT max(id) FROM case_changes WHERE code = ?1)",
            [&code],
        )
        .unwrap();
    assert_eq!(n, 1);
    drop(conn);

    // Reading says the case is damaged and will be repaired; no wrong view.
    let laptop = Node::open(&laptop_home).unwrap();
    match laptop.show(&code) {
        Err(NodeError::Damaged { marked: true, .. }) => {}
        other => panic!("expected a damaged-case error, got {other:?}"),
    }
    drop(laptop);

    // The next sync rebuilds it from the center.
    let report = net::sync_with(&laptop_home, &peer, quiet()).await.unwrap();
    assert_eq!(report.stats.cases_received.len(), 1, "{}", report.summary());
    let repaired = Node::open(&laptop_home).unwrap().show(&code).unwrap();
    assert_eq!(
        repaired, good,
        "the repaired case is exactly the one written"
    );

    let _ = stop.send(());
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), task).await;
}
