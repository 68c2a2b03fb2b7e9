//! Deterministic simulation of the sync protocol.
//!
//! `fieldcase-sync` is a pure state machine, so a whole commune — the center
//! and up to six field laptops — runs inside one thread: every replica is a
//! [`MemoryNode`] (its "disk", which survives crashes) validated by the case
//! model, every connection is a pair of [`Session`]s, and a scheduler
//! carries byte chunks between them on a simulated clock. Everything random
//! comes from one seeded [`ChaCha8Rng`] and every event is ordered by
//! (time, sequence number), so a seed replays exactly; the trace hash proves
//! it.
//!
//! One seed ([`run`]):
//! 1. **Workload**: officers create cases, edit fields (also the same field
//!    on two laptops at the same instant), add notes, move statuses, mark
//!    documents and resolve conflicts. Every edit the case model accepted
//!    and the store kept is an *acknowledged write*, recorded in a history.
//! 2. **Faults**, meanwhile: connections cut mid-stream, partitions that come
//!    and go, chunk delays and arbitrary chunk boundaries, duplicated or
//!    reordered frames (a corrupted stream, which must be refused as a peer
//!    fault or at worst stall; never a panic, never a bad commit), crashes at
//!    random moments and right after a commit before its reply is sent, and
//!    full disks.
//! 3. **Heal**: faults stop, everyone restarts, and rounds of sessions (all
//!    laptops with the center at once, plus laptop pairs) run until every
//!    replica holds the same heads — within a step bound, which makes this a
//!    liveness check — then one more round must commit nothing.
//! 4. **Checks**: identical heads, views and projections everywhere; a
//!    Jepsen-style set check of the history (every acknowledged case, note,
//!    status move and resolution present everywhere, nothing present that
//!    was never written, no write refused by a full disk anywhere); and no
//!    status went backwards on any replica at any sync step except through a
//!    deliberate sequential move.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use automerge::{ActorId, Automerge, ChangeHash};
use fieldcase_node::case::{self, Author, CaseError, DocState, NewCase, Status};
use fieldcase_sync::memory::MemoryNode;
use fieldcase_sync::{CaseId, Event, Session, SessionConfig, SessionError};
use rand::seq::IndexedRandom;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Replica names: index 0 is the commune center, the rest field laptops.
pub const REPLICA_NAMES: [&str; 7] = [
    "center", "laptop-1", "laptop-2", "laptop-3", "laptop-4", "laptop-5", "laptop-6",
];

/// Case code prefixes, one per replica, so codes never collide.
const PREFIXES: [&str; 7] = ["CTR", "LT1", "LT2", "LT3", "LT4", "LT5", "LT6"];

/// Simulated time zero: 2025-03-03 00:00 UTC, in Unix milliseconds.
const EPOCH_MS: i64 = 1_740_960_000_000;

/// The workload and its faults happen within this much simulated time.
const HORIZON_MS: u64 = 60_000;

/// A one-shot session with no input for this long is stalled. Between
/// honest peers that is a liveness failure; on a corrupted stream it is one
/// of the allowed outcomes (the real node closes the connection).
const STALL_MS: u64 = 5_000;

/// Hard bound on scheduler steps during the workload; far above what any
/// seed needs (see RELIABILITY.md), so hitting it means a session loops.
const WORKLOAD_STEPS_MAX: u64 = 2_000_000;

/// Liveness bound: steps (delivered chunks and other events) from healing
/// to identical heads on every replica.
pub const HEAL_STEPS_MAX: u64 = 100_000;

/// Bound on fill calls per flush: the session generates at most
/// `OUTBOX_FRAMES_TARGET` frames per fill, and a seed holds well under a
/// hundred cases.
const FILL_ROUNDS_MAX: usize = 1_000;

/// Liveness bound on heal rounds.
const HEAL_ROUNDS_MAX: usize = 8;

/// Set this environment variable to print every frame and event of a run.
pub const LOG_ENV: &str = "FIELDCASE_SIM_LOG";

/// The environment variable the `replay` test reads.
pub const SEED_ENV: &str = "FIELDCASE_SIM_SEED";

/// The one-line command that replays `seed` exactly.
pub fn replay_command(seed: u64) -> String {
    format!(
        "{SEED_ENV}={seed} cargo test -p fieldcase-tests --test simulation replay -- --nocapture"
    )
}

/// Knobs of a run. [`SimConfig::new`] is what CI and the soak use; story
/// tests turn one fault up to make sure it is exercised.
#[derive(Clone, Debug, PartialEq)]
pub struct SimConfig {
    pub seed: u64,
    /// Probability that a flush of frames onto a connection corrupts the
    /// stream (duplicates or swaps a frame).
    pub corrupt_p: f64,
    /// Probability that a replica crashes right after a delivery that
    /// committed, before any reply leaves.
    pub crash_after_commit_p: f64,
    /// Whether this is the default configuration (the replay command only
    /// reproduces that one).
    pub default: bool,
}

impl SimConfig {
    /// The default configuration for `seed`.
    pub fn new(seed: u64) -> SimConfig {
        SimConfig {
            seed,
            corrupt_p: 0.005,
            crash_after_commit_p: 0.02,
            default: true,
        }
    }
}

/// Fault counts of one or many seeds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// Connections cut at a random moment, frames in flight dropped.
    pub cuts: u64,
    /// Streams corrupted by a duplicated frame.
    pub duplicated: u64,
    /// Streams corrupted by two swapped frames.
    pub reordered: u64,
    /// Corrupted sessions that failed with a peer-fault error.
    pub corrupt_detected: u64,
    /// Corrupted sessions that still converged (the corruption was
    /// harmless, e.g. a repeated idle message).
    pub corrupt_converged: u64,
    /// Corrupted sessions that stalled and were closed by the stall timer.
    pub corrupt_stalled: u64,
    /// Corrupted sessions that ended otherwise first (cut, crash,
    /// partition, end of a live connection, full disk).
    pub corrupt_other: u64,
    /// Replica crashes at random moments.
    pub crashes: u64,
    /// Crashes right after a commit, before the reply frames were sent.
    pub crashes_after_commit: u64,
    /// Full disks injected (the next commit or local write fails).
    pub disk_full: u64,
    /// Sessions that stopped on a full disk.
    pub disk_full_sessions: u64,
    /// Local edits refused because the disk was full.
    pub disk_full_edits: u64,
    /// Partitions (a group of replicas cut off from the rest for a while).
    pub partitions: u64,
    /// Connection attempts refused by a partition.
    pub blocked_connects: u64,
    /// Live connections closed at the end of their lifetime.
    pub live_closed: u64,
}

impl Faults {
    fn add(&mut self, o: &Faults) {
        self.cuts += o.cuts;
        self.duplicated += o.duplicated;
        self.reordered += o.reordered;
        self.corrupt_detected += o.corrupt_detected;
        self.corrupt_converged += o.corrupt_converged;
        self.corrupt_stalled += o.corrupt_stalled;
        self.corrupt_other += o.corrupt_other;
        self.crashes += o.crashes;
        self.crashes_after_commit += o.crashes_after_commit;
        self.disk_full += o.disk_full;
        self.disk_full_sessions += o.disk_full_sessions;
        self.disk_full_edits += o.disk_full_edits;
        self.partitions += o.partitions;
        self.blocked_connects += o.blocked_connects;
        self.live_closed += o.live_closed;
    }

    /// Every fault injected, of every kind.
    pub fn total_injected(&self) -> u64 {
        self.cuts
            + self.duplicated
            + self.reordered
            + self.crashes
            + self.crashes_after_commit
            + self.disk_full
            + self.partitions
    }
}

/// What one seed did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SeedReport {
    pub seed: u64,
    pub replicas: usize,
    /// Workload operations attempted on a running replica.
    pub ops: u64,
    /// Acknowledged writes (each checked by the set check).
    pub acked: u64,
    /// Operations the case model refused (e.g. a status move it forbids).
    pub refused: u64,
    /// Pairs of same-field edits made on two replicas at the same instant.
    pub concurrent_edits: u64,
    pub cases: u64,
    pub sessions: u64,
    pub sessions_finished: u64,
    /// Byte chunks delivered.
    pub chunks: u64,
    /// Commits of received changes.
    pub commits: u64,
    pub faults: Faults,
    /// Steps from healing to identical heads everywhere.
    pub heal_steps: u64,
    pub heal_rounds: u64,
    /// Hash of every delivered chunk, operation and fault, in order.
    pub trace_hash: u64,
}

/// A failed seed.
#[derive(Clone, Debug)]
pub struct SimFailure {
    pub seed: u64,
    pub default_config: bool,
    pub message: String,
}

impl SimFailure {
    /// How to rerun it.
    pub fn replay(&self) -> String {
        if self.default_config {
            replay_command(self.seed)
        } else {
            format!(
                "seed {} with a non-default SimConfig: rerun the test that printed this",
                self.seed
            )
        }
    }
}

impl fmt::Display for SimFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "simulation seed {} failed: {}\nreplay: {}",
            self.seed,
            self.message,
            self.replay()
        )
    }
}

/// Totals over many seeds.
#[derive(Clone, Debug, Default)]
pub struct Totals {
    pub seeds: u64,
    pub ops: u64,
    pub acked: u64,
    pub refused: u64,
    pub concurrent_edits: u64,
    pub cases: u64,
    pub sessions: u64,
    pub sessions_finished: u64,
    pub chunks: u64,
    pub commits: u64,
    pub faults: Faults,
    pub max_heal_steps: u64,
    pub max_heal_rounds: u64,
    pub failures: Vec<SimFailure>,
}

impl Totals {
    /// Adds one seed's outcome.
    pub fn add(&mut self, outcome: Result<SeedReport, SimFailure>) {
        self.seeds += 1;
        match outcome {
            Ok(r) => {
                self.ops += r.ops;
                self.acked += r.acked;
                self.refused += r.refused;
                self.concurrent_edits += r.concurrent_edits;
                self.cases += r.cases;
                self.sessions += r.sessions;
                self.sessions_finished += r.sessions_finished;
                self.chunks += r.chunks;
                self.commits += r.commits;
                self.faults.add(&r.faults);
                self.max_heal_steps = self.max_heal_steps.max(r.heal_steps);
                self.max_heal_rounds = self.max_heal_rounds.max(r.heal_rounds);
            }
            Err(f) => self.failures.push(f),
        }
    }

    /// A multi-line summary, the format RELIABILITY.md quotes.
    pub fn summary(&self) -> String {
        let f = &self.faults;
        let mut s = format!(
            "seeds: {}\n\
             ops: {} attempted, {} acknowledged writes, {} refused by the case model, {} concurrent same-field edit pairs\n\
             cases: {}; sessions: {} opened, {} finished; chunks delivered: {}; commits of received changes: {}\n\
             faults injected: {} total\n\
             \x20 cuts: {}\n\
             \x20 corruptions: {} ({} duplicated, {} reordered frames): {} refused as peer faults, {} converged harmlessly, {} stalled and closed, {} ended otherwise first\n\
             \x20 crashes: {} at random moments + {} between commit and reply\n\
             \x20 disk full: {} injected: {} sessions stopped, {} local edits refused\n\
             \x20 partitions: {} ({} connection attempts blocked)\n\
             \x20 live connections closed at end of life: {}\n\
             max steps to quiescence: {} (bound {}), max heal rounds: {}\n\
             failures: {}",
            self.seeds,
            self.ops,
            self.acked,
            self.refused,
            self.concurrent_edits,
            self.cases,
            self.sessions,
            self.sessions_finished,
            self.chunks,
            self.commits,
            f.total_injected(),
            f.cuts,
            f.duplicated + f.reordered,
            f.duplicated,
            f.reordered,
            f.corrupt_detected,
            f.corrupt_converged,
            f.corrupt_stalled,
            f.corrupt_other,
            f.crashes,
            f.crashes_after_commit,
            f.disk_full,
            f.disk_full_sessions,
            f.disk_full_edits,
            f.partitions,
            f.blocked_connects,
            f.live_closed,
            self.max_heal_steps,
            HEAL_STEPS_MAX,
            self.max_heal_rounds,
            self.failures.len(),
        );
        for fail in &self.failures {
            s.push_str(&format!("\n  {fail}"));
        }
        s
    }
}

/// Runs one seed with the default configuration.
pub fn run_seed(seed: u64) -> Result<SeedReport, SimFailure> {
    run(SimConfig::new(seed))
}

/// Runs one configuration; a panic anywhere (protocol, case model or
/// harness) is turned into a failure with the replay command.
pub fn run(config: SimConfig) -> Result<SeedReport, SimFailure> {
    let seed = config.seed;
    let default_config = config.default;
    let fail = |message: String| SimFailure {
        seed,
        default_config,
        message,
    };
    match std::panic::catch_unwind(move || Sim::new(config).run()) {
        Ok(Ok(report)) => Ok(report),
        Ok(Err(message)) => Err(fail(message)),
        Err(panic) => {
            let text = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "non-text panic".into());
            Err(fail(format!("panicked: {text}")))
        }
    }
}

// ---------------------------------------------------------------------------
// The history of acknowledged writes.

/// One acknowledged write.
#[derive(Clone, Debug)]
enum Write {
    Create {
        code: String,
    },
    Field {
        code: String,
        field: String,
        value: String,
    },
    Note {
        code: String,
        text: String,
    },
    Status {
        code: String,
        by: String,
        at_ms: i64,
        from: Status,
        to: Status,
    },
    /// A checklist document marked (its state is a 3-valued scalar, so
    /// only validity is checked, by the view).
    Doc,
    Resolve {
        code: String,
        field: String,
        value: String,
    },
}

/// A status history entry as a comparable key.
type HistKey = (String, i64, Status, Status);

/// What a replica last showed for a case, for the no-backwards check.
struct Seen {
    heads: Vec<ChangeHash>,
    /// Length of the status event list.
    events: usize,
    status: Status,
    /// Applied history entries, as a multiset.
    applied: BTreeMap<HistKey, usize>,
}

struct Replica {
    name: &'static str,
    node: MemoryNode,
    author: Author,
    up: bool,
    next_case: u32,
    seen: BTreeMap<CaseId, Seen>,
}

// ---------------------------------------------------------------------------
// Connections and the scheduler.

/// Why a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    Finished,
    Error,
    Stalled,
    Other,
}

struct Conn {
    ends: [usize; 2],
    sessions: [Session; 2],
    live: bool,
    blob: [bool; 2],
    blobs_done_scheduled: [bool; 2],
    fin_scheduled: [bool; 2],
    fin_received: [bool; 2],
    /// Arrival time of the last chunk towards each side, so that the
    /// stream stays ordered whatever each chunk's delay.
    last_arrival: [u64; 2],
    latency: u64,
    jitter: u64,
    last_activity: u64,
    corrupted: bool,
}

#[derive(Debug)]
enum Ev {
    Op(usize),
    ConcurrentEdit,
    Connect,
    ConnectPair(usize, usize),
    Deliver {
        conn: u64,
        to: usize,
        bytes: Vec<u8>,
    },
    Fin {
        conn: u64,
        to: usize,
    },
    BlobsDone {
        conn: u64,
        side: usize,
    },
    CloseLive {
        conn: u64,
    },
    StallCheck {
        conn: u64,
    },
    Cut,
    Crash,
    Restart(usize),
    Partition,
    Unpartition(u64),
    DiskFull,
}

/// FNV-1a, 64 bits: a stable hash for the trace (std's hasher may change
/// between Rust releases).
struct Trace(u64);

impl Trace {
    fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 ^= u64::from(x);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn num(&mut self, n: u64) {
        self.bytes(&n.to_le_bytes());
    }

    fn text(&mut self, s: &str) {
        self.num(s.len() as u64);
        self.bytes(s.as_bytes());
    }
}

struct Sim {
    config: SimConfig,
    rng: ChaCha8Rng,
    now: u64,
    seq: u64,
    steps: u64,
    queue: BTreeMap<(u64, u64), Ev>,
    replicas: Vec<Replica>,
    conns: BTreeMap<u64, Conn>,
    next_conn: u64,
    /// Pairs (low, high) that cannot connect, with how many partitions
    /// block them.
    blocked: BTreeMap<(usize, usize), u32>,
    partitions: BTreeMap<u64, Vec<(usize, usize)>>,
    next_partition: u64,
    /// Healing: no faults, and every failure to converge is a bug.
    healing: bool,
    next_op: u64,
    history: Vec<Write>,
    /// Values of writes refused by a full disk: they must appear nowhere.
    refused_values: BTreeSet<String>,
    trace: Trace,
    report: SeedReport,
    /// Print every frame and event (`FIELDCASE_SIM_LOG=1`), for replays.
    log: bool,
}

fn pair(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

/// The store validator: the case model's own check of a whole document.
fn validate(doc: &Automerge) -> Result<(), String> {
    case::validate(doc).map_err(|e| e.to_string())
}

/// One line about a frame, for the log.
fn describe_frame(frame: &[u8]) -> String {
    use fieldcase_sync::wire::Message;
    match Message::decode(&frame[4.min(frame.len())..]) {
        Ok(Message::CaseSync { case, data }) => match automerge::sync::Message::decode(&data) {
            Ok(m) => format!(
                "case-sync {case}: heads {:?} need {:?} have {} changes {}",
                m.heads
                    .iter()
                    .map(|h| h.to_string()[..8].to_string())
                    .collect::<Vec<_>>(),
                m.need
                    .iter()
                    .map(|h| h.to_string()[..8].to_string())
                    .collect::<Vec<_>>(),
                m.have.len(),
                m.changes.len()
            ),
            Err(e) => format!("case-sync {case}: undecodable {e}"),
        },
        Ok(m) => format!("{m:?}"),
        Err(e) => format!("undecodable frame: {e}"),
    }
}

/// Length of a case's status event list (0 if it has none yet).
fn status_events_len(doc: &Automerge) -> usize {
    use automerge::ReadDoc;
    match doc.get(automerge::ROOT, "status_events") {
        Ok(Some((automerge::Value::Object(_), id))) => doc.length(&id),
        _ => 0,
    }
}

fn applied_multiset(v: &case::CaseView) -> BTreeMap<HistKey, usize> {
    let mut m = BTreeMap::new();
    for h in v.history.iter().filter(|h| h.applied) {
        *m.entry((h.by.clone(), h.at_ms, h.from, h.to)).or_insert(0) += 1;
    }
    m
}

/// Outcome of a local edit.
enum Local {
    Acked,
    Refused,
    DiskFull,
}

/// Fields the workload edits: valid for every procedure.
const EDIT_FIELDS: [&str; 4] = ["phone", "assignee", "applicant", "village"];

impl Sim {
    fn new(config: SimConfig) -> Sim {
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let n = rng.random_range(3..=7usize);
        let replicas = (0..n)
            .map(|i| Replica {
                name: REPLICA_NAMES[i],
                node: MemoryNode {
                    validator: Some(validate),
                    ..MemoryNode::with_store_id([i as u8 + 1; 16])
                },
                author: Author {
                    actor: ActorId::from(vec![i as u8 + 1; 16]),
                    node_id: format!("node-{}", REPLICA_NAMES[i]),
                    name: REPLICA_NAMES[i].to_string(),
                },
                up: true,
                next_case: 1,
                seen: BTreeMap::new(),
            })
            .collect();
        let report = SeedReport {
            seed: config.seed,
            replicas: n,
            ..SeedReport::default()
        };
        Sim {
            config,
            rng,
            now: 0,
            seq: 0,
            steps: 0,
            queue: BTreeMap::new(),
            replicas,
            conns: BTreeMap::new(),
            next_conn: 1,
            blocked: BTreeMap::new(),
            partitions: BTreeMap::new(),
            next_partition: 1,
            healing: false,
            next_op: 1,
            history: Vec::new(),
            refused_values: BTreeSet::new(),
            trace: Trace(0xcbf2_9ce4_8422_2325),
            report,
            log: std::env::var_os(LOG_ENV).is_some(),
        }
    }

    fn run(mut self) -> Result<SeedReport, String> {
        self.plan_workload();
        self.run_queue(WORKLOAD_STEPS_MAX)
            .map_err(|e| format!("during the workload: {e}"))?;
        self.heal().map_err(|e| format!("while healing: {e}"))?;
        self.check_final()
            .map_err(|e| format!("final check: {e}"))?;
        self.report.trace_hash = self.trace.0;
        self.report.cases = self.replicas[0].node.docs.len() as u64;
        Ok(self.report)
    }

    fn schedule(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.insert((at, self.seq), ev);
    }

    fn at_random(&mut self) -> u64 {
        self.rng.random_range(0..HORIZON_MS)
    }

    /// Puts the whole workload and its faults on the queue.
    fn plan_workload(&mut self) {
        let ops = self.rng.random_range(20..=60u32);
        for _ in 0..ops {
            let t = self.at_random();
            let r = self.rng.random_range(0..self.replicas.len());
            self.schedule(t, Ev::Op(r));
        }
        for _ in 0..self.rng.random_range(0..=3u32) {
            let t = self.at_random();
            self.schedule(t, Ev::ConcurrentEdit);
        }
        for _ in 0..(ops + self.rng.random_range(0..=ops / 2)) {
            let t = self.at_random();
            self.schedule(t, Ev::Connect);
        }
        let cuts = self.rng.random_range(0..=5u32);
        let crashes = self.rng.random_range(0..=3u32);
        let partitions = self.rng.random_range(0..=2u32);
        let disk_full = self.rng.random_range(0..=2u32);
        let faults: [(u32, fn() -> Ev); 4] = [
            (cuts, || Ev::Cut),
            (crashes, || Ev::Crash),
            (partitions, || Ev::Partition),
            (disk_full, || Ev::DiskFull),
        ];
        for (n, make) in faults {
            for _ in 0..n {
                let t = self.at_random();
                self.schedule(t, make());
            }
        }
    }

    fn run_queue(&mut self, bound: u64) -> Result<(), String> {
        let start = self.steps;
        while let Some(((t, _), ev)) = self.queue.pop_first() {
            self.steps += 1;
            if self.steps - start > bound {
                let open: Vec<String> = self
                    .conns
                    .values()
                    .map(|c| {
                        format!(
                            "{}<->{} phases {:?}/{:?} stats {:?} / {:?}",
                            REPLICA_NAMES[c.ends[0]],
                            REPLICA_NAMES[c.ends[1]],
                            c.sessions[0].phase(),
                            c.sessions[1].phase(),
                            c.sessions[0].stats(),
                            c.sessions[1].stats()
                        )
                    })
                    .collect();
                return Err(format!(
                    "not quiescent within {bound} steps (t={t} ms); open: {open:?}"
                ));
            }
            self.now = t;
            self.trace.num(t);
            self.handle(ev)?;
        }
        Ok(())
    }

    fn handle(&mut self, ev: Ev) -> Result<(), String> {
        match ev {
            Ev::Op(r) => self.op(r),
            Ev::ConcurrentEdit => self.concurrent_edit(),
            Ev::Connect => {
                self.connect_random();
                Ok(())
            }
            Ev::ConnectPair(a, b) => self.open(a, b),
            Ev::Deliver { conn, to, bytes } => self.deliver(conn, to, bytes),
            Ev::Fin { conn, to } => self.fin(conn, to),
            Ev::BlobsDone { conn, side } => self.blobs_done(conn, side),
            Ev::CloseLive { conn } => {
                if self.conns.contains_key(&conn) {
                    self.trace.text("close-live");
                    self.report.faults.live_closed += 1;
                    self.close(conn, End::Other);
                }
                Ok(())
            }
            Ev::StallCheck { conn } => self.stall_check(conn),
            Ev::Cut => {
                let ids: Vec<u64> = self.conns.keys().copied().collect();
                if let Some(&id) = ids.choose(&mut self.rng) {
                    self.trace.text("cut");
                    self.trace.num(id);
                    self.report.faults.cuts += 1;
                    self.close(id, End::Other);
                }
                Ok(())
            }
            Ev::Crash => {
                let up: Vec<usize> = (0..self.replicas.len())
                    .filter(|&r| self.replicas[r].up)
                    .collect();
                if let Some(&r) = up.choose(&mut self.rng) {
                    self.report.faults.crashes += 1;
                    self.crash(r);
                }
                Ok(())
            }
            Ev::Restart(r) => {
                self.trace.text("restart");
                self.trace.num(r as u64);
                self.replicas[r].up = true;
                Ok(())
            }
            Ev::Partition => {
                self.partition();
                Ok(())
            }
            Ev::Unpartition(id) => {
                self.trace.text("unpartition");
                for p in self.partitions.remove(&id).unwrap_or_default() {
                    if let Some(n) = self.blocked.get_mut(&p) {
                        *n -= 1;
                        if *n == 0 {
                            self.blocked.remove(&p);
                        }
                    }
                }
                Ok(())
            }
            Ev::DiskFull => {
                let r = self.rng.random_range(0..self.replicas.len());
                self.trace.text("disk-full");
                self.trace.num(r as u64);
                self.report.faults.disk_full += 1;
                self.replicas[r].node.fail_next_commit = true;
                Ok(())
            }
        }
    }

    // -- Workload ----------------------------------------------------------

    fn now_ms(&self) -> i64 {
        EPOCH_MS + self.now as i64
    }

    /// A fresh value for `field`, unique in this seed so the set check can
    /// tell where any value came from.
    fn fresh_value(&mut self, field: &str) -> String {
        let id = self.next_op;
        self.next_op += 1;
        match field {
            "phone" => format!("09{id:08}"),
            "assignee" => format!("Can bo {id}"),
            "applicant" => format!("Nguyen Van {id}"),
            "village" => format!("Thon {id}"),
            f if f.starts_with(case::DOC_PREFIX) => {
                let states = [DocState::Received, DocState::Missing, DocState::Invalid];
                states.choose(&mut self.rng).expect("nonempty").to_string()
            }
            other => unreachable!("the workload does not edit {other}"),
        }
    }

    /// Applies a local edit to a copy of the case and keeps it unless the
    /// model refuses it or the disk is full.
    fn local(
        &mut self,
        r: usize,
        code: &CaseId,
        f: impl FnOnce(&mut Automerge, &Author, i64) -> Result<(), CaseError>,
    ) -> Result<Local, String> {
        let now = self.now_ms();
        let rep = &mut self.replicas[r];
        let mut doc = rep.node.docs[code].clone();
        if f(&mut doc, &rep.author, now).is_err() {
            self.report.refused += 1;
            return Ok(Local::Refused);
        }
        if rep.node.fail_next_commit {
            rep.node.fail_next_commit = false;
            self.report.faults.disk_full_edits += 1;
            return Ok(Local::DiskFull);
        }
        rep.node.docs.insert(code.clone(), doc);
        self.report.acked += 1;
        Ok(Local::Acked)
    }

    /// After a local edit: record the new state, and offer the change on
    /// every live connection of the replica.
    fn after_local(&mut self, r: usize, code: &CaseId) -> Result<(), String> {
        self.observe(r, false)?;
        self.notify(r, code, None)
    }

    fn op(&mut self, r: usize) -> Result<(), String> {
        if !self.replicas[r].up {
            return Ok(());
        }
        self.report.ops += 1;
        let codes: Vec<CaseId> = self.replicas[r].node.docs.keys().cloned().collect();
        let roll = self.rng.random_range(0..100u32);
        self.trace.text("op");
        self.trace.num(r as u64);
        self.trace.num(u64::from(roll));
        if codes.is_empty() || roll < 15 {
            return self.op_create(r);
        }
        let code = codes.choose(&mut self.rng).expect("nonempty").clone();
        match roll {
            15..=34 => {
                let field = *EDIT_FIELDS.choose(&mut self.rng).expect("nonempty");
                self.op_field(r, &code, field)
            }
            35..=54 => self.op_note(r, &code),
            55..=71 => self.op_status(r, &code),
            72..=87 => self.op_doc(r, &code),
            _ => self.op_resolve(r, &codes),
        }
    }

    fn op_create(&mut self, r: usize) -> Result<(), String> {
        let n = self.replicas[r].next_case;
        self.replicas[r].next_case += 1;
        let code = format!("{}-{n:06}", PREFIXES[r]);
        let procs = case::procedures();
        let proc = procs.choose(&mut self.rng).expect("nonempty").id;
        let id = self.next_op;
        self.next_op += 1;
        let new = NewCase {
            procedure: proc.to_string(),
            applicant: format!("Tran Thi {id}"),
            village: format!("Ap {}", id % 9),
            fields: vec![("phone".into(), format!("08{id:08}"))],
        };
        let now = self.now_ms();
        let rep = &mut self.replicas[r];
        let doc = case::create(&code, &new, &rep.author, now)
            .map_err(|e| format!("{} could not create {code}: {e}", rep.name))?;
        self.trace.text(&code);
        if rep.node.fail_next_commit {
            rep.node.fail_next_commit = false;
            self.report.faults.disk_full_edits += 1;
            self.refused_values.insert(code);
            return Ok(());
        }
        let cid = CaseId::new(&code).expect("case codes are valid case ids");
        rep.node.docs.insert(cid.clone(), doc);
        self.report.acked += 1;
        self.history.push(Write::Create { code: code.clone() });
        self.history.push(Write::Field {
            code: code.clone(),
            field: "applicant".into(),
            value: new.applicant,
        });
        self.history.push(Write::Field {
            code: code.clone(),
            field: "village".into(),
            value: new.village,
        });
        self.history.push(Write::Field {
            code,
            field: "phone".into(),
            value: new.fields[0].1.clone(),
        });
        self.after_local(r, &cid)
    }

    fn op_field(&mut self, r: usize, code: &CaseId, field: &str) -> Result<(), String> {
        let value = self.fresh_value(field);
        self.trace.text(&value);
        let v = value.clone();
        match self.local(r, code, |d, a, now| case::set_field(d, field, &v, a, now))? {
            Local::Acked => {
                self.history.push(Write::Field {
                    code: code.to_string(),
                    field: field.into(),
                    value,
                });
                self.after_local(r, code)
            }
            Local::DiskFull => {
                self.refused_values.insert(value);
                Ok(())
            }
            Local::Refused => Ok(()),
        }
    }

    fn op_note(&mut self, r: usize, code: &CaseId) -> Result<(), String> {
        let text = format!(
            "note {} by {} seed {}",
            self.next_op, self.replicas[r].name, self.config.seed
        );
        self.next_op += 1;
        self.trace.text(&text);
        let t = text.clone();
        match self.local(r, code, |d, a, now| case::add_note(d, &t, a, now))? {
            Local::Acked => {
                self.history.push(Write::Note {
                    code: code.to_string(),
                    text,
                });
                self.after_local(r, code)
            }
            Local::DiskFull => {
                self.refused_values.insert(text);
                Ok(())
            }
            Local::Refused => Ok(()),
        }
    }

    fn op_status(&mut self, r: usize, code: &CaseId) -> Result<(), String> {
        let from = case::view(&self.replicas[r].node.docs[code])
            .map_err(|e| format!("stored case {code} does not load: {e}"))?
            .status;
        let next = from.next_statuses();
        // Mostly a move the workflow allows; sometimes anything, which the
        // model must refuse without writing. Rejection is rarer, as in life.
        let mut to = if !next.is_empty() && self.rng.random_bool(0.85) {
            *next.choose(&mut self.rng).expect("nonempty")
        } else {
            *Status::ALL.choose(&mut self.rng).expect("nonempty")
        };
        if to == Status::Rejected && self.rng.random_bool(0.6) {
            to = *Status::ALL.choose(&mut self.rng).expect("nonempty");
        }
        self.trace.text(to.as_str());
        match self.local(r, code, |d, a, now| case::change_status(d, to, a, now))? {
            Local::Acked => {
                let status = case::view(&self.replicas[r].node.docs[code])
                    .map_err(|e| e.to_string())?
                    .status;
                if status != to {
                    return Err(format!(
                        "{} moved {code} {from} -> {to} but it shows {status}",
                        self.replicas[r].name
                    ));
                }
                self.history.push(Write::Status {
                    code: code.to_string(),
                    by: self.replicas[r].author.node_id.clone(),
                    at_ms: self.now_ms(),
                    from,
                    to,
                });
                self.after_local(r, code)
            }
            Local::Refused | Local::DiskFull => Ok(()),
        }
    }

    fn op_doc(&mut self, r: usize, code: &CaseId) -> Result<(), String> {
        let proc = case::view(&self.replicas[r].node.docs[code])
            .map_err(|e| e.to_string())?
            .procedure;
        let proc = case::procedure(&proc).map_err(|e| e.to_string())?;
        let item = proc.checklist.choose(&mut self.rng).expect("nonempty").id;
        let state = if self.rng.random_bool(0.8) {
            DocState::Received
        } else {
            *[DocState::Missing, DocState::Invalid]
                .choose(&mut self.rng)
                .expect("nonempty")
        };
        self.trace.text(item);
        self.trace.text(state.as_str());
        match self.local(r, code, |d, a, now| {
            case::mark_document(d, item, state, a, now)
        })? {
            Local::Acked => {
                self.history.push(Write::Doc);
                self.after_local(r, code)
            }
            Local::Refused | Local::DiskFull => Ok(()),
        }
    }

    fn op_resolve(&mut self, r: usize, codes: &[CaseId]) -> Result<(), String> {
        let mut conflicted = Vec::new();
        // A few cases, not all: viewing a case is the slow part of a run.
        let sample: Vec<&CaseId> = codes.sample(&mut self.rng, 4).collect();
        for code in sample {
            let v = case::view(&self.replicas[r].node.docs[code]).map_err(|e| e.to_string())?;
            for c in v.conflicts {
                conflicted.push((code.clone(), c));
            }
        }
        let Some((code, conflict)) = conflicted.choose(&mut self.rng).cloned() else {
            // Nothing to resolve here: make a conflict likelier instead.
            let code = codes.choose(&mut self.rng).expect("nonempty").clone();
            return self.op_field(r, &code, "phone");
        };
        let fresh = self.rng.random_bool(0.5);
        let value = if !fresh {
            conflict
                .candidates
                .choose(&mut self.rng)
                .expect("a conflict has candidates")
                .value
                .clone()
        } else {
            self.fresh_value(&conflict.field)
        };
        self.trace.text(&conflict.field);
        self.trace.text(&value);
        let field = conflict.field.clone();
        let v = value.clone();
        match self.local(r, &code, |d, a, now| case::resolve(d, &field, &v, a, now))? {
            Local::Acked => {
                let after =
                    case::view(&self.replicas[r].node.docs[&code]).map_err(|e| e.to_string())?;
                if after.conflicts.iter().any(|c| c.field == field) {
                    return Err(format!("resolving {field} of {code} left it in conflict"));
                }
                self.history.push(Write::Resolve {
                    code: code.to_string(),
                    field: field.clone(),
                    value: value.clone(),
                });
                if !field.starts_with(case::DOC_PREFIX) {
                    self.history.push(Write::Field {
                        code: code.to_string(),
                        field,
                        value,
                    });
                }
                self.after_local(r, &code)
            }
            Local::DiskFull => {
                if fresh && !field.starts_with(case::DOC_PREFIX) {
                    self.refused_values.insert(value);
                }
                Ok(())
            }
            Local::Refused => Ok(()),
        }
    }

    /// Two replicas that hold the same case write the same field at the
    /// same instant, neither seeing the other: a guaranteed conflict.
    fn concurrent_edit(&mut self) -> Result<(), String> {
        let up: Vec<usize> = (0..self.replicas.len())
            .filter(|&r| self.replicas[r].up)
            .collect();
        let mut candidates = Vec::new();
        for (i, &a) in up.iter().enumerate() {
            for &b in &up[i + 1..] {
                for code in self.replicas[a].node.docs.keys() {
                    if self.replicas[b].node.docs.contains_key(code) {
                        candidates.push((a, b, code.clone()));
                    }
                }
            }
        }
        let Some((a, b, code)) = candidates.choose(&mut self.rng).cloned() else {
            return Ok(());
        };
        let field = *["phone", "assignee"]
            .choose(&mut self.rng)
            .expect("nonempty");
        self.trace.text("concurrent");
        self.report.concurrent_edits += 1;
        self.op_field(a, &code, field)?;
        self.op_field(b, &code, field)
    }

    // -- Connections -------------------------------------------------------

    fn connect_random(&mut self) {
        let up: Vec<usize> = (0..self.replicas.len())
            .filter(|&r| self.replicas[r].up)
            .collect();
        if up.len() < 2 {
            return;
        }
        let laptops: Vec<usize> = up.iter().copied().filter(|&r| r != 0).collect();
        let (a, b) = if self.replicas[0].up && self.rng.random_bool(0.7) {
            (
                0,
                *laptops
                    .choose(&mut self.rng)
                    .expect("two up, one is a laptop"),
            )
        } else {
            let a = *up.choose(&mut self.rng).expect("nonempty");
            let others: Vec<usize> = up.iter().copied().filter(|&r| r != a).collect();
            (a, *others.choose(&mut self.rng).expect("nonempty"))
        };
        if self.blocked.contains_key(&pair(a, b)) {
            self.report.faults.blocked_connects += 1;
            return;
        }
        if self
            .conns
            .values()
            .any(|c| pair(c.ends[0], c.ends[1]) == pair(a, b))
        {
            return;
        }
        if let Err(e) = self.open(a, b) {
            unreachable!("opening a session against memory cannot fail: {e}");
        }
    }

    fn open(&mut self, a: usize, b: usize) -> Result<(), String> {
        let live = !self.healing && self.rng.random_bool(0.3);
        // Sometimes only one side asks for live: the other follows.
        let live_sides = [live && self.rng.random_bool(0.7), live];
        let blob = [self.rng.random_bool(0.3), self.rng.random_bool(0.3)];
        // Half the sessions send nearly every case message in tiny parts,
        // so the ordering rules of split messages (nothing overtakes an
        // Idle, one case's messages keep their order) meet cuts, crashes,
        // corrupted streams and live edits. Real thresholds would never
        // split a sim case.
        let split = [(); 2].map(|()| {
            self.rng
                .random_bool(0.5)
                .then(|| (self.rng.random_range(0..600), self.rng.random_range(1..200)))
        });
        let mut sessions = Vec::with_capacity(2);
        for (side, (me, peer)) in [(a, b), (b, a)].into_iter().enumerate() {
            let defaults = SessionConfig::default();
            let (split_above_bytes, part_bytes) =
                split[side].unwrap_or((defaults.split_above_bytes, defaults.part_bytes));
            let mut s = Session::new(SessionConfig {
                live: live_sides[side],
                blob_transfer: blob[side],
                split_above_bytes,
                part_bytes,
                ..defaults
            });
            let peer_name = self.replicas[peer].name;
            s.start(&mut self.replicas[me].node.for_peer(peer_name))
                .map_err(|e| format!("{} could not start a session: {e}", REPLICA_NAMES[me]))?;
            sessions.push(s);
        }
        let s1 = sessions.pop().expect("two");
        let s0 = sessions.pop().expect("two");
        let id = self.next_conn;
        self.next_conn += 1;
        let latency = self.rng.random_range(1..=80u64);
        let jitter = self.rng.random_range(0..=50u64);
        self.conns.insert(
            id,
            Conn {
                ends: [a, b],
                sessions: [s0, s1],
                live,
                blob,
                blobs_done_scheduled: [false; 2],
                fin_scheduled: [false; 2],
                fin_received: [false; 2],
                last_arrival: [self.now; 2],
                latency,
                jitter,
                last_activity: self.now,
                corrupted: false,
            },
        );
        self.report.sessions += 1;
        self.trace.text("open");
        self.trace.num(id);
        self.trace.num(a as u64);
        self.trace.num(b as u64);
        self.trace.num(u64::from(live));
        if live {
            let life = self.rng.random_range(200..=20_000u64);
            self.schedule(self.now + life, Ev::CloseLive { conn: id });
        } else {
            self.schedule(self.now + STALL_MS, Ev::StallCheck { conn: id });
        }
        self.flush(id)
    }

    fn close(&mut self, id: u64, end: End) {
        let Some(conn) = self.conns.remove(&id) else {
            return;
        };
        if end == End::Finished {
            self.report.sessions_finished += 1;
        }
        if conn.corrupted {
            let f = &mut self.report.faults;
            match end {
                End::Finished => f.corrupt_converged += 1,
                End::Error => f.corrupt_detected += 1,
                End::Stalled => f.corrupt_stalled += 1,
                End::Other => f.corrupt_other += 1,
            }
        }
    }

    fn crash(&mut self, r: usize) {
        self.trace.text("crash");
        self.trace.num(r as u64);
        let ids: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.ends.contains(&r))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.close(id, End::Other);
        }
        self.replicas[r].up = false;
        let down = self.rng.random_range(100..=5_000u64);
        self.schedule(self.now + down, Ev::Restart(r));
    }

    fn partition(&mut self) {
        let n = self.replicas.len();
        // A random group, neither empty nor everyone, cut off from the rest.
        let mask = self.rng.random_range(1..(1u32 << n) - 1);
        let inside = |r: usize| mask & (1 << r) != 0;
        let mut pairs = Vec::new();
        for a in 0..n {
            for b in a + 1..n {
                if inside(a) != inside(b) {
                    pairs.push((a, b));
                    *self.blocked.entry((a, b)).or_insert(0) += 1;
                }
            }
        }
        self.trace.text("partition");
        self.trace.num(u64::from(mask));
        self.report.faults.partitions += 1;
        let ids: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| inside(c.ends[0]) != inside(c.ends[1]))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.close(id, End::Other);
        }
        let id = self.next_partition;
        self.next_partition += 1;
        self.partitions.insert(id, pairs);
        let dur = self.rng.random_range(2_000..=20_000u64);
        self.schedule(self.now + dur, Ev::Unpartition(id));
    }

    /// Splits a flushed byte run into chunks at arbitrary boundaries.
    fn chunks(&mut self, bytes: Vec<u8>) -> Vec<Vec<u8>> {
        let len = bytes.len();
        let mode = self.rng.random_range(0..10u32);
        let mut cuts: Vec<usize> = match mode {
            0..=4 => Vec::new(),
            5 if len <= 256 => {
                let mut v = Vec::new();
                let mut at = 0;
                while at < len {
                    at += self.rng.random_range(1..=16usize);
                    v.push(at.min(len));
                }
                v
            }
            _ => (0..self.rng.random_range(1..=4u32))
                .map(|_| self.rng.random_range(0..=len))
                .collect(),
        };
        cuts.push(len);
        cuts.sort_unstable();
        cuts.dedup();
        let mut out = Vec::new();
        let mut start = 0;
        for c in cuts {
            if c > start {
                out.push(bytes[start..c].to_vec());
                start = c;
            }
        }
        out
    }

    /// Moves everything both sessions of `id` want to send onto the
    /// network, corrupting the stream now and then, and reacts to their
    /// events.
    fn flush(&mut self, id: u64) -> Result<(), String> {
        for side in 0..2 {
            let to = 1 - side;
            let Some(conn) = self.conns.get_mut(&id) else {
                return Ok(());
            };
            let (me, peer) = (conn.ends[side], conn.ends[to]);
            let peer_name = self.replicas[peer].name;
            let mut frames: Vec<Vec<u8>> = Vec::new();
            // Drain the outbox, then let the session generate its backlog
            // (listing pages, offers) as a transport does when its send
            // buffer empties; bounded, as every loop here.
            let mut filled = Ok(());
            for _ in 0..FILL_ROUNDS_MAX {
                frames.extend(std::iter::from_fn(|| conn.sessions[side].poll_transmit()));
                if !conn.sessions[side].has_backlog() {
                    break;
                }
                filled = conn.sessions[side].fill(&mut self.replicas[me].node.for_peer(peer_name));
                if filled.is_err() {
                    break;
                }
            }
            if conn.sessions[side].has_backlog() && filled.is_ok() {
                return Err(format!(
                    "{}'s session still has a backlog after {FILL_ROUNDS_MAX} fills",
                    REPLICA_NAMES[me]
                ));
            }
            let events: Vec<Event> =
                std::iter::from_fn(|| conn.sessions[side].poll_event()).collect();
            let (latency, jitter) = (conn.latency, conn.jitter);
            if !frames.is_empty()
                && !self.healing
                && !conn.corrupted
                && self.rng.random_bool(self.config.corrupt_p)
            {
                conn.corrupted = true;
                let i = self.rng.random_range(0..frames.len());
                if i + 1 < frames.len() && self.rng.random_bool(0.5) {
                    frames.swap(i, i + 1);
                    self.report.faults.reordered += 1;
                } else {
                    let dup = frames[i].clone();
                    frames.insert(i, dup);
                    self.report.faults.duplicated += 1;
                }
                self.trace.text("corrupt");
            }
            if self.log {
                for f in &frames {
                    eprintln!(
                        "t={} conn {id} {} -> {}: {}",
                        self.now,
                        REPLICA_NAMES[me],
                        REPLICA_NAMES[peer],
                        describe_frame(f)
                    );
                }
            }
            if !frames.is_empty() {
                let bytes = frames.concat();
                for chunk in self.chunks(bytes) {
                    let spike = if self.rng.random_bool(0.02) { 400 } else { 0 };
                    let delay = latency + self.rng.random_range(0..=jitter) + spike;
                    let conn = self.conns.get_mut(&id).expect("still open");
                    let at = (self.now + delay).max(conn.last_arrival[to]);
                    conn.last_arrival[to] = at;
                    self.schedule(
                        at,
                        Ev::Deliver {
                            conn: id,
                            to,
                            bytes: chunk,
                        },
                    );
                }
            }
            for ev in events {
                let conn = self.conns.get_mut(&id).expect("still open");
                match ev {
                    Event::Connected { .. } => {}
                    // As the node does: the fetch (here a delay) starts
                    // when records are complete, whichever comes first.
                    Event::NothingMoreToReceive | Event::Quiescent => {
                        if conn.blob[side] && !conn.blobs_done_scheduled[side] {
                            conn.blobs_done_scheduled[side] = true;
                            let at = self.now + self.rng.random_range(1..=200u64);
                            self.schedule(at, Ev::BlobsDone { conn: id, side });
                        }
                    }
                    Event::Finished => {
                        if !conn.fin_scheduled[side] {
                            conn.fin_scheduled[side] = true;
                            let at = (self.now + latency).max(conn.last_arrival[to]);
                            conn.last_arrival[to] = at;
                            self.schedule(at, Ev::Fin { conn: id, to });
                        }
                    }
                }
            }
            if let Err(e) = filled {
                return self.session_error(id, side, e, "generating its backlog");
            }
        }
        Ok(())
    }

    /// A session returned an error: allowed only as the consequence of an
    /// injected fault. The connection closes either way.
    fn session_error(
        &mut self,
        id: u64,
        side: usize,
        err: SessionError,
        what: &str,
    ) -> Result<(), String> {
        let conn = &self.conns[&id];
        let me = REPLICA_NAMES[conn.ends[side]];
        let peer = REPLICA_NAMES[conn.ends[1 - side]];
        let corrupted = conn.corrupted;
        self.trace.text("error");
        self.trace.text(&err.to_string());
        match &err {
            SessionError::Local(f) if f.0.contains("simulated disk full") => {
                self.report.faults.disk_full_sessions += 1;
                // A full disk that stopped a corrupted session first says
                // nothing about the corruption.
                if let Some(c) = self.conns.get_mut(&id) {
                    c.corrupted = false;
                }
                self.close(id, End::Other);
                Ok(())
            }
            e if corrupted && e.is_peer_fault() => {
                self.close(id, End::Error);
                Ok(())
            }
            e if corrupted => Err(format!(
                "{me}'s session with {peer} got a corrupted stream and failed with an error \
                 that is not a peer fault ({what}): {e}"
            )),
            e => Err(format!(
                "{me}'s session with {peer} failed between honest peers ({what}, t={} ms): {e}",
                self.now
            )),
        }
    }

    fn deliver(&mut self, id: u64, to: usize, bytes: Vec<u8>) -> Result<(), String> {
        let Some(conn) = self.conns.get_mut(&id) else {
            return Ok(()); // the connection died with this chunk in flight
        };
        self.report.chunks += 1;
        self.trace.num(id);
        self.trace.bytes(&bytes);
        conn.last_activity = self.now;
        let (me, peer) = (conn.ends[to], conn.ends[1 - to]);
        let peer_name = self.replicas[peer].name;
        let node = &mut self.replicas[me].node;
        let commits = node.commits;
        let result = conn.sessions[to].handle_bytes(&bytes, &mut node.for_peer(peer_name));
        let committed = node.commits > commits;
        self.report.commits += node.commits - commits;
        if committed {
            // The committed document must be a valid case that never went
            // backwards; changed cases are offered on live connections.
            let changed = self.observe(me, true)?;
            if !self.healing && self.rng.random_bool(self.config.crash_after_commit_p) {
                // Crash between the write and its acknowledgement: the
                // reply frames are still in the session's outbox and die
                // with it.
                self.report.faults.crashes_after_commit += 1;
                self.crash(me);
                return Ok(());
            }
            for code in changed {
                self.notify(me, &code, Some(id))?;
            }
        }
        if let Err(e) = result {
            return self.session_error(id, to, e, "receiving bytes");
        }
        self.flush(id)
    }

    /// Offers a changed case on every live connection of `r` (except the
    /// one it came from), as the node's change broadcast does.
    fn notify(&mut self, r: usize, code: &CaseId, except: Option<u64>) -> Result<(), String> {
        let ids: Vec<u64> = self
            .conns
            .iter()
            .filter(|(id, c)| c.live && c.ends.contains(&r) && Some(**id) != except)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            let Some(conn) = self.conns.get_mut(&id) else {
                continue;
            };
            let side = if conn.ends[0] == r { 0 } else { 1 };
            let peer_name = self.replicas[conn.ends[1 - side]].name;
            let node = &mut self.replicas[r].node;
            let result =
                conn.sessions[side].handle_local_change(code, &mut node.for_peer(peer_name));
            match result {
                Ok(()) => self.flush(id)?,
                Err(e) => self.session_error(id, side, e, "offering a local change")?,
            }
        }
        Ok(())
    }

    fn fin(&mut self, id: u64, to: usize) -> Result<(), String> {
        let Some(conn) = self.conns.get_mut(&id) else {
            return Ok(());
        };
        self.trace.text("fin");
        conn.fin_received[to] = true;
        conn.last_activity = self.now;
        if let Err(e) = conn.sessions[to].handle_peer_finished() {
            return self.session_error(id, to, e, "peer finished its stream");
        }
        if conn.fin_received[0] && conn.fin_received[1] {
            self.close(id, End::Finished);
            return Ok(());
        }
        self.flush(id)
    }

    fn blobs_done(&mut self, id: u64, side: usize) -> Result<(), String> {
        let Some(conn) = self.conns.get_mut(&id) else {
            return Ok(());
        };
        self.trace.text("blobs-done");
        conn.last_activity = self.now;
        let peer_name = self.replicas[conn.ends[1 - side]].name;
        let node = &mut self.replicas[conn.ends[side]].node;
        if let Err(e) = conn.sessions[side].handle_local_blobs_done(&mut node.for_peer(peer_name)) {
            return self.session_error(id, side, e, "announcing blobs done");
        }
        self.flush(id)
    }

    fn stall_check(&mut self, id: u64) -> Result<(), String> {
        let Some(conn) = self.conns.get(&id) else {
            return Ok(());
        };
        let at = conn.last_activity + STALL_MS;
        if self.now < at {
            self.schedule(at, Ev::StallCheck { conn: id });
            return Ok(());
        }
        if !conn.corrupted {
            return Err(format!(
                "the one-shot session between {} and {} stalled for {STALL_MS} ms \
                 (phases {:?} / {:?}) between honest peers",
                REPLICA_NAMES[conn.ends[0]],
                REPLICA_NAMES[conn.ends[1]],
                conn.sessions[0].phase(),
                conn.sessions[1].phase()
            ));
        }
        self.trace.text("stalled");
        self.close(id, End::Stalled);
        Ok(())
    }

    // -- Checks ------------------------------------------------------------

    /// Records what replica `r` now shows for every case whose heads moved,
    /// and after a sync step checks that no status went backwards except
    /// through a deliberate sequential move that now applies. Returns the
    /// changed cases.
    fn observe(&mut self, r: usize, via_sync: bool) -> Result<Vec<CaseId>, String> {
        let rep = &mut self.replicas[r];
        let mut changed = Vec::new();
        for (code, doc) in &rep.node.docs {
            let heads = doc.get_heads();
            let prev = rep.seen.get(code);
            if prev.map(|s| &s.heads) == Some(&heads) {
                continue;
            }
            // Status is a fold over the status events: without a new
            // event it cannot move, and the (slow) view can be skipped.
            let events = status_events_len(doc);
            if let Some(seen) = rep.seen.get_mut(code) {
                if seen.events == events {
                    seen.heads = heads;
                    changed.push(code.clone());
                    continue;
                }
            }
            let prev = rep.seen.get(code);
            let v = case::view(doc)
                .map_err(|e| format!("{} stored an invalid case {code}: {e}", rep.name))?;
            let applied = applied_multiset(&v);
            if let (true, Some(prev)) = (via_sync, prev) {
                if v.status.rank() < prev.status.rank() {
                    let sequential = applied.iter().any(|(k, n)| {
                        k.2 == prev.status && *n > prev.applied.get(k).copied().unwrap_or(0)
                    });
                    if !sequential {
                        return Err(format!(
                            "case {code} went backwards on {} from {} to {} by a sync, \
                             with no sequential move from {}; history: {:?}",
                            rep.name, prev.status, v.status, prev.status, v.history
                        ));
                    }
                }
            }
            rep.seen.insert(
                code.clone(),
                Seen {
                    heads,
                    events,
                    status: v.status,
                    applied,
                },
            );
            changed.push(code.clone());
        }
        Ok(changed)
    }

    fn converged(&self) -> bool {
        let first = &self.replicas[0].node.docs;
        self.replicas[1..].iter().all(|r| {
            r.node.docs.len() == first.len()
                && r.node
                    .docs
                    .iter()
                    .zip(first)
                    .all(|((c1, d1), (c2, d2))| c1 == c2 && d1.get_heads() == d2.get_heads())
        })
    }

    fn heal_round(&mut self, round: usize) -> Result<(), String> {
        let n = self.replicas.len();
        for l in 1..n {
            self.schedule(self.now, Ev::ConnectPair(0, l));
        }
        if round % 2 == 1 {
            for a in 1..n {
                for b in a + 1..n {
                    if self.rng.random_bool(0.3) {
                        self.schedule(self.now, Ev::ConnectPair(a, b));
                    }
                }
            }
        }
        let left = HEAL_STEPS_MAX.saturating_sub(self.report.heal_steps);
        let before = self.steps;
        let result = self.run_queue(left);
        self.report.heal_steps += self.steps - before;
        result
    }

    /// Stops every fault, restarts everyone and syncs until every replica
    /// holds the same heads; then one more round must commit nothing.
    fn heal(&mut self) -> Result<(), String> {
        self.healing = true;
        self.trace.text("heal");
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for id in ids {
            self.close(id, End::Other);
        }
        self.blocked.clear();
        self.partitions.clear();
        for r in &mut self.replicas {
            r.up = true;
            r.node.fail_next_commit = false;
        }
        for round in 0..HEAL_ROUNDS_MAX {
            self.heal_round(round)?;
            self.report.heal_rounds += 1;
            if self.converged() {
                let commits: Vec<u64> = self.replicas.iter().map(|r| r.node.commits).collect();
                let steps = self.report.heal_steps;
                let sessions = self.report.sessions_finished;
                self.heal_round(0)?;
                self.report.heal_steps = steps;
                let after: Vec<u64> = self.replicas.iter().map(|r| r.node.commits).collect();
                if commits != after {
                    return Err(format!(
                        "a converged network still committed: {commits:?} -> {after:?}"
                    ));
                }
                let expected = sessions + self.replicas.len() as u64 - 1;
                if self.report.sessions_finished != expected || !self.conns.is_empty() {
                    return Err("a session of the confirming round did not finish".into());
                }
                return Ok(());
            }
        }
        Err(format!(
            "replicas still differ after {HEAL_ROUNDS_MAX} heal rounds ({} steps)",
            self.report.heal_steps
        ))
    }

    fn check_final(&self) -> Result<(), String> {
        // Identical heads, views and projections everywhere.
        let mut views = BTreeMap::new();
        for (code, doc) in &self.replicas[0].node.docs {
            let v = case::view(doc).map_err(|e| format!("{code}: {e}"))?;
            let json = serde_json::to_string(&v).map_err(|e| e.to_string())?;
            let proj = serde_json::to_string(&case::projection(doc).map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
            views.insert(code.to_string(), (v, json, proj));
        }
        for r in &self.replicas[1..] {
            if r.node.docs.len() != views.len() {
                return Err(format!(
                    "{} holds {} cases, center {}",
                    r.name,
                    r.node.docs.len(),
                    views.len()
                ));
            }
            for (code, doc) in &r.node.docs {
                let (_, json, proj) = views
                    .get(code.as_str())
                    .ok_or_else(|| format!("{} holds {code}, the center does not", r.name))?;
                let v = case::view(doc).map_err(|e| format!("{code}: {e}"))?;
                if serde_json::to_string(&v).map_err(|e| e.to_string())? != *json {
                    return Err(format!("{code}: {} shows a different view", r.name));
                }
                let p = case::projection(doc).map_err(|e| e.to_string())?;
                if serde_json::to_string(&p).map_err(|e| e.to_string())? != *proj {
                    return Err(format!("{code}: {} shows a different projection", r.name));
                }
            }
        }
        // Set check: the cases are exactly the acknowledged creations.
        let created: BTreeSet<&str> = self
            .history
            .iter()
            .filter_map(|w| match w {
                Write::Create { code } => Some(code.as_str()),
                _ => None,
            })
            .collect();
        let present: BTreeSet<&str> = views.keys().map(String::as_str).collect();
        if created != present {
            return Err(format!(
                "cases lost: {:?}; cases never created: {:?}",
                created.difference(&present).collect::<Vec<_>>(),
                present.difference(&created).collect::<Vec<_>>()
            ));
        }
        // Per case: notes, status moves and resolutions are exactly the
        // acknowledged ones; every field value was written by someone.
        let mut notes: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        let mut moves: BTreeMap<&str, Vec<HistKey>> = BTreeMap::new();
        let mut resolutions: BTreeMap<&str, Vec<(&str, &str)>> = BTreeMap::new();
        let mut written: BTreeMap<(&str, &str), BTreeSet<&str>> = BTreeMap::new();
        for w in &self.history {
            match w {
                Write::Note { code, text } => notes.entry(code).or_default().push(text),
                Write::Status {
                    code,
                    by,
                    at_ms,
                    from,
                    to,
                } => moves
                    .entry(code)
                    .or_default()
                    .push((by.clone(), *at_ms, *from, *to)),
                Write::Resolve { code, field, value } => {
                    resolutions.entry(code).or_default().push((field, value))
                }
                Write::Field { code, field, value } => {
                    written.entry((code, field)).or_default().insert(value);
                }
                Write::Create { .. } | Write::Doc => {}
            }
        }
        for (code, (v, json, _)) in &views {
            let code = code.as_str();
            for refused in &self.refused_values {
                if json.contains(&format!("\"{refused}\"")) {
                    return Err(format!(
                        "{code} shows {refused:?}, a write the full disk refused"
                    ));
                }
            }
            let mut have: Vec<&str> = v.notes.iter().map(|n| n.text.as_str()).collect();
            let mut want = notes.get(code).cloned().unwrap_or_default();
            have.sort_unstable();
            want.sort_unstable();
            if have != want {
                return Err(format!(
                    "{code}: notes differ from the acknowledged ones: have {have:?}, acknowledged {want:?}"
                ));
            }
            let mut have: Vec<HistKey> = v
                .history
                .iter()
                .map(|h| (h.by.clone(), h.at_ms, h.from, h.to))
                .collect();
            let mut want = moves.get(code).cloned().unwrap_or_default();
            have.sort();
            want.sort();
            if have != want {
                return Err(format!(
                    "{code}: status history differs from the acknowledged moves: have {have:?}, acknowledged {want:?}"
                ));
            }
            let mut have: Vec<(&str, &str)> = v
                .resolutions
                .iter()
                .map(|r| (r.field.as_str(), r.value.as_str()))
                .collect();
            let mut want = resolutions.get(code).cloned().unwrap_or_default();
            have.sort_unstable();
            want.sort_unstable();
            if have != want {
                return Err(format!(
                    "{code}: resolutions differ: have {have:?}, acknowledged {want:?}"
                ));
            }
            let mut shown: Vec<(&str, &str)> = vec![
                ("applicant", v.applicant.name.as_str()),
                ("village", v.applicant.village.as_str()),
                ("phone", v.applicant.phone.as_str()),
            ];
            if !v.assignee.is_empty() {
                shown.push(("assignee", v.assignee.as_str()));
            }
            for c in &v.conflicts {
                if !c.field.starts_with(case::DOC_PREFIX) {
                    for cand in &c.candidates {
                        shown.push((c.field.as_str(), cand.value.as_str()));
                    }
                }
            }
            for (field, value) in shown {
                let ok = written
                    .get(&(code, field))
                    .is_some_and(|s| s.contains(value));
                if !ok {
                    return Err(format!(
                        "{code}: {field} shows {value:?}, which was never written"
                    ));
                }
            }
        }
        Ok(())
    }
}
