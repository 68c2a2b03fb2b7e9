//! Every fuzz target's logic, run over its committed seed corpus on stable.
//!
//! The fuzz targets themselves (`fuzz/`, cargo-fuzz, libFuzzer) need a
//! nightly-flagged build and are not part of this workspace. Their logic
//! lives in `fuzz/src/lib.rs` as plain functions; this test includes that
//! file as a module and runs each function over every file in
//! `fuzz/corpus/<target>/`, so CI exercises every target's code, every
//! invariant it asserts, and the corpus itself, on every run.
//!
//! Regenerate the seeds (after a wire or case-model change) with
//! `FIELDCASE_WRITE_FUZZ_SEEDS=1 cargo test -p fieldcase-tests --test fuzz_corpus`.

use std::path::{Path, PathBuf};

#[allow(dead_code)] // the seed generator and helpers are for the fuzz crate too
#[path = "../../fuzz/src/lib.rs"]
mod fuzz_targets;

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus")
}

#[test]
fn every_fuzz_target_survives_its_seed_corpus() {
    if std::env::var_os("FIELDCASE_WRITE_FUZZ_SEEDS").is_some() {
        for (target, name, bytes) in fuzz_targets::seeds() {
            let dir = corpus_dir().join(target);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
    for (target, run) in fuzz_targets::TARGETS {
        let dir = corpus_dir().join(target);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert!(
            files.len() >= 3,
            "{target}: the committed corpus should hold real seeds, found {}",
            files.len()
        );
        for file in files {
            let bytes = std::fs::read(&file).unwrap();
            let outcome = std::panic::catch_unwind(|| run(&bytes));
            assert!(
                outcome.is_ok(),
                "fuzz target {target} panicked on {}; replay with \
                 `RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz {target} {}`",
                file.display(),
                file.display()
            );
        }
    }
}

/// The seed generator itself runs the handshake node against an honest
/// peer to completion; the seeds it produces must pass their targets.
#[test]
fn freshly_generated_seeds_pass_their_targets() {
    for (target, name, bytes) in fuzz_targets::seeds() {
        let run = fuzz_targets::TARGETS
            .iter()
            .find(|(t, _)| *t == target)
            .map(|(_, f)| *f)
            .unwrap_or_else(|| panic!("seed {name} names unknown target {target}"));
        run(&bytes);
    }
}
