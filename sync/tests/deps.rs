//! The sync crate must stay a pure state machine: no async runtime, no
//! network, no database and no clock. This test reads the lock file and the
//! sources so the rule cannot erode silently.

use std::collections::{BTreeMap, BTreeSet};

const FORBIDDEN_CRATES: &[&str] = &[
    "tokio",
    "quinn",
    "quinn-proto",
    "rusqlite",
    "libsqlite3-sys",
    "rustls",
    "mio",
];

#[test]
fn sync_depends_on_no_runtime_network_or_database_crate() {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock"))
        .expect("Cargo.lock is committed");
    let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for block in lock.split("[[package]]").skip(1) {
        let name = block
            .lines()
            .find_map(|l| l.strip_prefix("name = \""))
            .and_then(|l| l.strip_suffix('"'))
            .expect("every package has a name")
            .to_string();
        let entry = deps.entry(name).or_default();
        let mut in_deps = false;
        for line in block.lines() {
            if line.starts_with("dependencies = [") {
                in_deps = true;
            } else if in_deps && line.starts_with(']') {
                in_deps = false;
            } else if in_deps {
                let dep = line.trim().trim_matches(|c| c == '"' || c == ',');
                entry.insert(dep.split(' ').next().unwrap_or(dep).to_string());
            }
        }
    }
    // The lock file's graph is a superset of what is really compiled, so
    // this can only err on the side of refusing.
    let mut seen = BTreeSet::new();
    let mut stack = vec!["fieldcase-sync".to_string()];
    while let Some(name) = stack.pop() {
        if seen.insert(name.clone()) {
            stack.extend(deps.get(&name).into_iter().flatten().cloned());
        }
    }
    for bad in FORBIDDEN_CRATES {
        assert!(
            !seen.contains(*bad),
            "fieldcase-sync must not depend on {bad}"
        );
    }
    assert!(seen.contains("automerge"), "the walk really ran");
}

#[test]
fn sync_sources_never_read_the_clock_or_touch_io() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for needle in [
            "Instant::now",
            "SystemTime",
            "std::fs",
            "std::net",
            "std::thread",
        ] {
            assert!(!text.contains(needle), "{} uses {needle}", path.display());
        }
        checked += 1;
    }
    assert!(checked >= 5);
}
