//! Soak runner for the deterministic simulation of the sync protocol.
//!
//! `cargo run --release -p fieldcase-tests --bin sim-soak -- --seeds 20000 [--start N] [--jobs J]`
//!
//! Runs seeds `start .. start+seeds` on `jobs` threads (default: all
//! cores), then prints the totals: seeds, operations, acknowledged writes,
//! faults injected by kind, the most steps any seed needed to reach
//! quiescence, and every failure with its one-line replay command. Exits
//! with status 1 if any seed failed. Each seed is independent and
//! deterministic, so the totals do not depend on `jobs`.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use fieldcase_tests::sim::{run_seed, SeedReport, SimFailure, Totals};

fn usage() -> ExitCode {
    eprintln!("usage: sim-soak [--seeds N] [--start N] [--jobs N]");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut seeds: u64 = 20_000;
    let mut start: u64 = 0;
    let mut jobs: usize = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().and_then(|v| v.parse::<u64>().ok());
        match (arg.as_str(), value) {
            ("--seeds", Some(v)) => seeds = v,
            ("--start", Some(v)) => start = v,
            ("--jobs", Some(v)) if v > 0 => jobs = v as usize,
            _ => return usage(),
        }
    }
    // Failures are reported with their replay command; the default hook
    // would also print every caught panic, which is noise here.
    std::panic::set_hook(Box::new(|_| {}));
    println!(
        "sim-soak: seeds {start}..{} on {jobs} threads",
        start + seeds
    );
    let began = Instant::now();
    let next = AtomicU64::new(start);
    let done = AtomicU64::new(0);
    let results: Mutex<Vec<(u64, Result<SeedReport, SimFailure>)>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= start + seeds {
                    break;
                }
                let outcome = run_seed(seed);
                if let Err(f) = &outcome {
                    eprintln!("FAILED {f}");
                }
                results.lock().expect("lock").push((seed, outcome));
                let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_multiple_of(1000) {
                    eprintln!("{n} seeds done ({:.0} s)", began.elapsed().as_secs_f64());
                }
            });
        }
    });
    let mut results = results.into_inner().expect("lock");
    results.sort_by_key(|(seed, _)| *seed);
    let mut totals = Totals::default();
    for (_, outcome) in results {
        totals.add(outcome);
    }
    println!("{}", totals.summary());
    println!(
        "wall time: {:.1} s on {jobs} threads",
        began.elapsed().as_secs_f64()
    );
    if totals.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
