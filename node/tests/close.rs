//! How a one-shot sync ends. The client closes the connection as soon as
//! it has read the center's whole stream (the center finishes its stream
//! only once its own session finished), without waiting for the ACK of
//! its own last bytes. Whatever order the two sides finish in, both must
//! end cleanly, with every record delivered both ways.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fieldcase_node::case::{self, NewCase};
use fieldcase_node::net::{self, Server, SyncOptions};
use fieldcase_node::node::{Node, Role};
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

fn new_case(node: &mut Node, who: &str) -> String {
    node.new_case(&NewCase {
        procedure: "certification".into(),
        applicant: format!("Applicant of {who}"),
        village: "Thon Dong".into(),
        fields: vec![],
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shot_syncs_end_cleanly_on_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    let (center_home, laptop_home) = (dir.path().join("center"), dir.path().join("laptop"));
    let center_id = Node::init(&center_home, "center", Role::Center).unwrap();
    let laptop_id = Node::init(&laptop_home, "laptop", Role::Field).unwrap();
    Node::open(&center_home)
        .unwrap()
        .add_peer(&laptop_id.to_string(), "laptop", None)
        .unwrap();

    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let server_log = log.clone();
    let server = Server::bind(
        &center_home,
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(move |line: &str| server_log.lock().unwrap().push(line.to_string())),
    )
    .unwrap();
    let addr = server.local_addr().unwrap().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    Node::open(&laptop_home)
        .unwrap()
        .add_peer(&center_id.to_string(), "center", Some(&addr))
        .unwrap();
    let peer = Node::open(&laptop_home).unwrap().peer("center").unwrap();

    const ROUNDS: usize = 8;
    for round in 0..ROUNDS {
        // Round 0 syncs nothing; then new cases on one side, the other or
        // both, so either side may be the one that finishes last.
        let (mut on_center, mut on_laptop) = (vec![], vec![]);
        if round % 3 != 0 {
            on_center.push(new_case(&mut Node::open(&center_home).unwrap(), "center"));
        }
        if round % 3 != 1 && round > 0 {
            let mut laptop = Node::open(&laptop_home).unwrap();
            let code = new_case(&mut laptop, "laptop");
            laptop
                .update(&code, |d, a, t| case::add_note(d, "visit", a, t))
                .unwrap();
            on_laptop.push(code);
        }
        let report = tokio::time::timeout(
            Duration::from_secs(30),
            net::sync_with(&laptop_home, &peer, quiet()),
        )
        .await
        .expect("sync finished in time")
        .unwrap();
        assert_eq!(report.stats.cases_received.len(), on_center.len());
        assert_eq!(report.stats.cases_sent.len(), on_laptop.len());
        // Everything arrived, both ways.
        let (mut center, mut laptop) = (
            Node::open(&center_home).unwrap(),
            Node::open(&laptop_home).unwrap(),
        );
        for code in on_center.iter().chain(&on_laptop) {
            let heads = center.store().case_heads(code).unwrap();
            assert!(heads.is_some(), "round {round}: {code} missing");
            assert_eq!(
                heads,
                laptop.store().case_heads(code).unwrap(),
                "round {round}: {code} differs"
            );
        }

        // The center ended this session with its summary, not an error.
        let summaries = || {
            log.lock()
                .unwrap()
                .iter()
                .filter(|l| l.starts_with("sync with laptop:"))
                .count()
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while summaries() < round + 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(summaries(), round + 1, "log: {:?}", log.lock().unwrap());
    }
    let errors: Vec<String> = log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("session ended") || l.contains("misbehaving"))
        .cloned()
        .collect();
    assert!(errors.is_empty(), "{errors:?}");

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("server stopped in time")
        .unwrap()
        .unwrap();
}
